#!/usr/bin/env python3
"""One sealed policy table, read by worker processes without a copy.

The parent builds the table once in a share=True pool and seals it
(protect()).  Workers started any way multiprocessing starts them (here
"spawn", the default on macOS and for many services, and "forkserver")
receive it through multiprocessing's own descriptor passing and map the
same physical pages read-only: no pickling of the data, no copy per worker,
and no process, the parent included, can ever write it again.

A gunicorn-style preforking server needs even less: build and protect the
table before the workers fork (gunicorn's --preload); sealed memory is
shared across fork() as it is.

Run it (with prmem installed):  python examples/shared_workers.py
"""
from __future__ import annotations

import multiprocessing
import os
from typing import Optional

import prmem

_table: Optional[prmem.FrozenMap] = None


def init_worker(table: prmem.FrozenMap) -> None:
    """Pool initializer: keep the worker's handle on the shared table."""
    global _table
    _table = table


def allowed(request: tuple[str, str]) -> tuple[int, str, bool]:
    user, net = request
    assert _table is not None, "init_worker() did not run"
    entry = _table.get(user)
    return os.getpid(), user, entry is not None and net in entry["nets"]


def main() -> None:
    pool = prmem.Pool(prmem.Mode.RO, name="acl", share=True)
    table = pool.freeze({
        "alice": {"role": "admin", "nets": ["10.0.0.0/8", "192.168.0.0/16"]},
        "bob": {"role": "user", "nets": ["10.1.0.0/16"]},
    })
    pool.protect()                       # sealed: shareable, immutable for everyone

    requests = [("alice", "10.0.0.0/8"), ("bob", "10.0.0.0/8"), ("mallory", "10.0.0.0/8")]
    for method in ("spawn", "forkserver"):
        ctx = multiprocessing.get_context(method)
        with ctx.Pool(2, initializer=init_worker, initargs=(table,)) as workers:
            answers = workers.map(allowed, requests)
        del workers                      # it keeps its initargs, the table among them
        assert [ok for _pid, _user, ok in answers] == [True, False, False]
        assert all(pid != os.getpid() for pid, _user, _ok in answers)
        print(f"{method}: {[(user, ok) for _pid, user, ok in answers]}")

    del table                            # the last handle; then the pool can go
    pool.destroy()
    print("ok")


if __name__ == "__main__":
    main()
