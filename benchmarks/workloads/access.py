"""access: opening no-access memory for a read and closing it again.

One page of key material that is unreadable between uses; one round trip
opens it, reads one byte, and makes it unreadable again:

* prmem: ``with pool.access(): a[0]`` on a protected ``Pool(noaccess=True)``
  (two mprotect() calls inside prmem, plus the with-statement and the
  checked read), with and without ``secret=True``;
* libsodium: ``sodium_mprotect_readonly(p)``, read one byte,
  ``sodium_mprotect_noaccess(p)`` on ``sodium_malloc(4080)`` (the peer's
  own no-access API), each call through ctypes;
* naive: ``mprotect(PROT_READ)``, read, ``mprotect(PROT_NONE)`` on one
  mmap()ed page through ctypes.

The ctypes peers pay two foreign calls (about 2 x "one ctypes call" in the
machine table) that a C program would not; prmem pays its own Python-level
with-statement.  Both are what a Python program pays.
"""
from __future__ import annotations

import ctypes
from typing import Any, Dict, List

import prmem

from .. import peers
from ..harness import Budget, gc_paused, new_samples, per_call_loop, ratio, summarize
from ..harness import RunContext
from ..report import fmt_num, fmt_ratio, md_table, targets_table

NAME = "access"
TITLE = "access — opening no-access memory for one read"
PROT_NONE, PROT_READ = 0, 1
CHUNK = 2000


def _measure(stmt: str, names: List[str], values: List[Any], budget: Budget) -> Dict[str, float]:
    loop = per_call_loop(stmt, names, label="access")
    out = new_samples(CHUNK)
    samples: List[int] = []
    loop(200, out, *values)  # warm up
    with gc_paused():
        while budget.more(len(samples)):
            loop(CHUNK, out, *values)
            samples.extend(out)
    return summarize(samples)


def run(ctx: RunContext) -> Dict[str, Any]:
    seconds = ctx.pick(0.3, 2.0)
    rows: List[Dict[str, Any]] = []
    notes: List[str] = []

    def add(impl: str, label: str, stmt: str, names: List[str], values: List[Any]) -> None:
        stats = _measure(stmt, names, values, Budget(seconds, 2 * CHUNK, 2_000_000))
        rows.append({"impl": impl, "label": label, "median_ns": stats["median"],
                     "p99_ns": stats["p99"], "calls": stats["n"]})

    for secret in (False, True):
        if secret and "memfd_secret" not in prmem.features:
            notes.append(ctx.skip(NAME, "prmem secret=True", "kernel lacks memfd_secret"))
            continue
        pool = prmem.Pool(prmem.Mode.WR, noaccess=True, secret=secret, name="bench-access")
        a = pool.alloc(32)
        a.write(bytes(range(32)))
        pool.protect()
        label = "prmem noaccess" + (" + secret" if secret else "")
        add("prmem_secret" if secret else "prmem", label,
            "with pool.access():\n    a[0]", ["pool", "a"], [pool, a])
        pool.destroy()

    try:
        sodium = peers.get("sodium")
        p = sodium.malloc(4080)
        sodium.mprotect_noaccess(p)
        buf = (ctypes.c_char * 1).from_address(p)
        add("sodium", "libsodium readonly/noaccess",
            "ro(p)\nbuf[0]\nna(p)", ["ro", "na", "p", "buf"],
            [sodium.mprotect_readonly, sodium.mprotect_noaccess, p, buf])
        sodium.mprotect_readwrite(p)
        sodium.free(p)
    except peers.PeerUnavailable as e:
        notes.append(ctx.skip(NAME, "libsodium", str(e)))

    libc = peers.get("libc")
    page = libc.map_page(4096)
    libc.mprotect(page, 4096, PROT_NONE)
    buf = (ctypes.c_char * 1).from_address(page)
    add("naive", "naive mprotect pair (ctypes)",
        "mp(page, 4096, 1)\nbuf[0]\nmp(page, 4096, 0)", ["mp", "page", "buf"],
        [libc.mprotect, page, buf])
    libc.munmap(page, 4096)

    by = {r["impl"]: r for r in rows}
    prm = by.get("prmem", {}).get("median_ns")
    for r in rows:
        r["ratio_vs_prmem"] = ratio(r["median_ns"], prm)
    sodium_ratio = ratio(by.get("sodium", {}).get("median_ns"), prm)
    targets = [{"name": "libsodium readonly/noaccess pair / prmem access() round trip",
                "value": sodium_ratio, "target": "report (no target in the issue)",
                "met": None,
                "description": "both from Python; > 1 means prmem is faster"}]
    notes.append("Each figure includes one clock read (see the machine table).")
    return {"rows": rows, "targets": targets, "notes": notes}


def markdown(result: Dict[str, Any]) -> str:
    out = [f"## {TITLE}", ""]
    out.append(md_table(["implementation", "median ns", "p99 ns", "calls", "vs prmem"],
                        [[r["label"], r["median_ns"], r["p99_ns"], f"{r['calls']:,}",
                          fmt_ratio(r.get("ratio_vs_prmem"))] for r in result["rows"]]))
    out += ["", targets_table(result["targets"]), "", "Notes:", ""]
    out += [f"- {n}" for n in result["notes"]]
    return "\n".join(out) + "\n"


def summary(result: Dict[str, Any]) -> List[List[str]]:
    return [[f"access {r['impl']}", f"median {fmt_num(r['median_ns'])} ns"]
            for r in result["rows"]]


def plot(result: Dict[str, Any], out_dir: str, plt: Any) -> List[str]:
    return []
