"""Race test: threads and a signal handler hammer a few shared pools.

Hypothesis generates, for each example, 1-3 shared pools (RO or WR mode)
and one operation program for each of 8 threads (the main thread runs one
of them): alloc / strdup, plain writes, rare_write / rare_memset / a
rare-write session, writes and reads through memoryviews (held for a
moment, so protect() and destroy() meet live views), reads (bytes(a),
slices, indexing), stats(), protect(), make_ro() and, now and then,
destroy().  Meanwhile a SIGALRM handler, fired every 2 ms by
signal.setitimer(), calls stats(), alloc() and bytes() of a shared
allocation in the main thread.  sys.setswitchinterval() is turned down so
threads switch often.

What must hold:

* no hang, no crash: the child (``python -X dev``, so the allocator debug
  hooks check the GIL is held whenever CPython memory is touched) exits 0;
* the only exceptions are the documented, typed ones for each operation:
  ProtectionError, PoolDestroyedError, BufferError, ValueError for an
  out-of-bounds write; anything else fails the example;
* a content model: each allocation is written only by the thread that made
  it, so that thread knows its exact bytes; every read it makes, and a
  final check after all threads joined, must match (a refused write
  changes nothing); states never go backwards, a refused write is
  explained by the state or mode; stats() counts every allocation; and
  with every view released, each pool can be destroyed.

Hypothesis runs inside the child (one interpreter for all examples), with
``derandomize=True`` so every run tries the same programs, and without
shrinking (a race rarely replays).  Each example re-arms a faulthandler
watchdog: an example that takes longer than ``EXAMPLE_HANG`` seconds dumps
every thread's stack and the child exits, and the test fails as HUNG with
the stacks and the program of the example that hung (a crash likewise
shows that program).  ``PRMEM_RACE_EXAMPLES=N`` runs more examples (a soak
test); ``python -X dev tests/test_races.py`` runs the child by hand.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

N_THREADS = 8
EXAMPLES = int(os.environ.get("PRMEM_RACE_EXAMPLES", "400"))
#: Seconds one example may take before it counts as hung (each takes < 1 s).
EXAMPLE_HANG = 20
#: The parent's backstop for the whole child.
KILL_AFTER = 300
ALARM_INTERVAL = 0.002


# =============================================================== the child
#
# child_main() runs in the child only (python -X dev tests/test_races.py).


def child_main(log_path=None):  # noqa: C901 - one self-contained program
    import faulthandler
    import signal
    import threading
    import traceback
    from collections import Counter

    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    import prmem
    from prmem import Mode, PoolDestroyedError, ProtectionError, State

    sys.setswitchinterval(1e-4)

    # -------------------------------------------------------- strategies

    payload = st.binary(min_size=1, max_size=48)
    pool_ix = st.integers(0, 2)
    own_ix = st.integers(0, 15)
    # (kind, ...): `gate` makes protect/make_ro/destroy rarer than the rest
    # (the operation runs only when gate == 0).
    operation = st.one_of(
        st.tuples(st.just("alloc"), pool_ix, st.integers(1, 300)),
        st.tuples(st.just("strdup"), pool_ix, st.binary(max_size=40)),
        st.tuples(st.just("write"), own_ix, st.integers(0, 400), payload),
        st.tuples(st.just("rare_write"), own_ix, st.integers(0, 400), payload,
                  st.sampled_from(["func", "pool", "memset", "session"])),
        st.tuples(st.just("view"), own_ix, payload),
        st.tuples(st.just("out_of_bounds"), own_ix, st.integers(1, 16)),
        st.tuples(st.just("read"), st.integers(0, 255),
                  st.sampled_from(["bytes", "slice", "index", "view"])),
        st.tuples(st.just("stats"), pool_ix),
        st.tuples(st.just("protect"), pool_ix, st.integers(0, 3)),
        st.tuples(st.just("make_ro"), pool_ix, st.integers(0, 5)),
        st.tuples(st.just("destroy"), pool_ix, st.integers(0, 15)),
    )
    pool_specs = st.lists(st.tuples(st.sampled_from(["RO", "WR"]),
                                    st.sampled_from([4096, 65536])), min_size=1, max_size=3)
    programs = st.lists(st.lists(operation, min_size=4, max_size=30),
                        min_size=N_THREADS, max_size=N_THREADS)

    # ----------------------------------------------------------- running

    # Exceptions each operation may raise (exact types): anything else fails.
    ALLOWED = {
        "alloc": (PoolDestroyedError,),
        "strdup": (PoolDestroyedError,),
        "write": (ProtectionError, PoolDestroyedError),
        "rare_write": (ProtectionError, PoolDestroyedError),
        "view": (PoolDestroyedError,),
        "out_of_bounds": (ValueError, PoolDestroyedError),
        "read": (PoolDestroyedError,),
        "stats": (PoolDestroyedError,),
        "protect": (PoolDestroyedError, BufferError),
        "make_ro": (PoolDestroyedError, BufferError),
        "destroy": (BufferError,),
        "state": (PoolDestroyedError,),
    }
    totals = Counter()

    class Entry:
        """An allocation and the model of its bytes (kept by its owner)."""
        __slots__ = ("obj", "pool_ix", "owner", "contents")

        def __init__(self, obj, pool_ix, owner, contents):
            self.obj, self.pool_ix, self.owner = obj, pool_ix, owner
            self.contents = bytearray(contents)

    def run_example(specs, progs):
        pools = [prmem.Pool(Mode[mode], name=f"race{i}", refill=refill)
                 for i, (mode, refill) in enumerate(specs)]
        registry = []          # every Entry, appended by its owner (atomic)
        failures = []          # (who, what) of everything that went wrong
        outcomes = Counter()   # op:result counts, merged per thread below
        handler_log = {"calls": 0, "allocs": []}

        def fail(who, what):
            failures.append((who, what))

        def attempt(who, kind, fn, counts):
            """(True, result) or (False, the allowed exception)."""
            try:
                result = fn()
            except BaseException as e:   # noqa: B902 - sorted below
                if type(e) in ALLOWED[kind]:
                    counts[f"{kind}:{type(e).__name__}"] += 1
                    return False, e
                fail(who, f"{kind} raised {type(e).__name__}: {e}\n"
                          f"{traceback.format_exc()}")
                return False, e
            counts[f"{kind}:ok"] += 1
            return True, result

        def state_of(who, entry, seen, counts):
            ok, state = attempt(who, "state", lambda: entry.obj.state, counts)
            if not ok:
                return None
            last = seen.get(id(entry), State.WRITABLE)
            if state < last:
                fail(who, f"state went back from {last.name} to {state.name}")
            seen[id(entry)] = state
            return state

        def check_own(who, entry, counts):
            ok, data = attempt(who, "read", lambda: bytes(entry.obj), counts)
            if ok and data != entry.contents:
                fail(who, f"allocation of {len(entry.contents)} bytes in pool "
                          f"{entry.pool_ix} ({specs[entry.pool_ix][0]}) reads "
                          f"{data!r}, the model says {bytes(entry.contents)!r}")

        def run_program(who, prog, start):
            counts = Counter()
            mine, seen = [], {}
            try:
                start.wait()
                for op in prog:
                    kind = op[0]
                    if kind in ("alloc", "strdup"):
                        ix = op[1] % len(pools)
                        pool = pools[ix]
                        if kind == "alloc":
                            fn, init = (lambda: pool.alloc(op[2])), bytes(op[2])
                        else:
                            text = op[2].replace(b"\0", b"\1")
                            fn, init = (lambda: pool.strdup(text)), text + b"\0"
                        ok, obj = attempt(who, kind, fn, counts)
                        if ok:
                            entry = Entry(obj, ix, who, init)
                            mine.append(entry)
                            registry.append(entry)
                            check_own(who, entry, counts)
                        continue
                    if kind in ("write", "rare_write", "view", "out_of_bounds"):
                        if not mine:
                            continue
                        entry = mine[op[1] % len(mine)]
                        obj, size = entry.obj, len(entry.contents)
                        if kind == "out_of_bounds":
                            # ends one byte past the allocation: ValueError
                            attempt(who, kind, lambda: obj.write(b"\xee" * op[2],
                                                                 size - op[2] + 1), counts)
                        elif kind == "view":
                            attempt(who, kind, lambda: view_write(who, entry, op[2]), counts)
                        else:
                            off = op[2] % (size + 1)
                            data = op[3][:size - off]
                            how = op[4] if kind == "rare_write" else "plain"
                            if how == "memset":
                                data = data[:1] * len(data)
                            ok, e = attempt(who, kind, lambda: do_write(
                                entry, how, data, off), counts)
                            if ok:
                                entry.contents[off:off + len(data)] = data
                            elif isinstance(e, ProtectionError):
                                explain_refusal(who, entry, kind, seen, counts)
                        check_own(who, entry, counts)
                        continue
                    if kind == "read":
                        if not registry:
                            continue
                        entry = registry[op[1] % len(registry)]
                        ok, data = attempt(who, kind, lambda: read(entry, op[2]), counts)
                        if ok and entry.owner == who and data != bytes(entry.contents):
                            fail(who, f"read ({op[2]}) of an own allocation gives "
                                      f"{data!r}, the model says {bytes(entry.contents)!r}")
                        if ok and len(data) != len(entry.contents):
                            fail(who, f"read ({op[2]}) gives {len(data)} bytes of "
                                      f"{len(entry.contents)}")
                        continue
                    ix = op[1] % len(pools)
                    if kind == "stats":
                        attempt(who, kind, pools[ix].stats, counts)
                    elif op[2] == 0:
                        ok, _ = attempt(who, kind, getattr(pools[ix], kind), counts)
                        if ok:
                            check_protected(who, kind, ix, mine, seen, counts)
                    for entry in mine:
                        state_of(who, entry, seen, counts)
            except BaseException:   # noqa: B902 - a bug in this test or in prmem
                fail(who, traceback.format_exc())
            finally:
                outcomes.update(counts)

        def do_write(entry, how, data, off):
            obj, pool = entry.obj, pools[entry.pool_ix]
            if how == "plain":
                obj.write(data, off)
            elif how == "func":
                prmem.rare_write(obj, data, off)
            elif how == "pool":
                pool.rare_write(obj, data, off)
            elif how == "memset":
                prmem.rare_memset(obj, data[0] if data else 0, off, len(data))
            else:
                with pool.rare_write_session() as session:
                    session.write(obj, data, off)

        def check_protected(who, kind, ix, mine, seen, counts):
            """After protect() / make_ro() / destroy() of pool ix returned:
            every allocation made before (all of this thread's) is covered."""
            mode = specs[ix][0]
            for entry in mine:
                if entry.pool_ix != ix:
                    continue
                state = state_of(who, entry, seen, counts)
                if kind == "destroy":
                    if state is not None:
                        fail(who, f"allocation still {state.name} after destroy()")
                elif state is None:
                    continue   # another thread destroyed the pool since
                elif kind == "protect" and (state == State.WRITABLE or (
                        mode == "RO" and state != State.READ_ONLY)):
                    fail(who, f"allocation of an {mode} pool {state.name} after protect()")
                elif kind == "make_ro" and mode == "WR" and state != State.READ_ONLY:
                    fail(who, f"allocation of a WR pool {state.name} after make_ro()")

        def explain_refusal(who, entry, kind, seen, counts):
            state = state_of(who, entry, seen, counts)
            if state is None:
                return
            if kind == "write" and state == State.WRITABLE:
                fail(who, "a plain write was refused on WRITABLE memory")
            if (kind == "rare_write" and specs[entry.pool_ix][0] == "WR"
                    and state != State.READ_ONLY):
                fail(who, f"rare_write was refused on {state.name} memory of a WR pool")

        def view_write(who, entry, data):
            with memoryview(entry.obj) as view:
                n = min(len(data), len(view))
                if not view.readonly:
                    view[:n] = data[:n]
                    entry.contents[:n] = data[:n]
                time.sleep(0.0002)     # hold the view while others protect/destroy
                if bytes(view) != entry.contents:
                    fail(who, f"view reads {bytes(view)!r}, the model says "
                              f"{bytes(entry.contents)!r}")

        def read(entry, how):
            obj = entry.obj
            if how == "bytes":
                return bytes(obj)
            if how == "slice":
                return obj[:]
            if how == "index":
                return bytes(obj[i] for i in range(len(obj)))
            with memoryview(obj) as view:
                return view.tobytes()

        def on_alarm(signum, frame):
            # Runs in the main thread between two bytecodes of whatever it is
            # doing (its own program, or joining the others).
            try:
                handler_log["calls"] += 1
                pool = pools[handler_log["calls"] % len(pools)]
                try:
                    pool.stats()
                    if len(handler_log["allocs"]) < 100:
                        obj = pool.alloc(24)
                        handler_log["allocs"].append(Entry(obj, pools.index(pool),
                                                           "handler", bytes(24)))
                except PoolDestroyedError:
                    pass
                if registry:
                    try:
                        bytes(registry[handler_log["calls"] % len(registry)].obj)
                    except PoolDestroyedError:
                        pass
            except BaseException:   # noqa: B902
                fail("SIGALRM handler", traceback.format_exc())

        start = threading.Barrier(N_THREADS)
        threads = [threading.Thread(target=run_program, args=(f"thread {i}", progs[i], start))
                   for i in range(1, N_THREADS)]
        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, ALARM_INTERVAL, ALARM_INTERVAL)
        try:
            for t in threads:
                t.start()
            run_program("main thread", progs[0], start)
            for t in threads:
                t.join()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
            signal.signal(signal.SIGALRM, previous)

        # ------------------------------------------------- after the race
        for entry in registry + handler_log["allocs"]:
            pool = pools[entry.pool_ix]
            try:
                data = bytes(entry.obj)
            except PoolDestroyedError:
                if not pool.destroyed:
                    fail("final check", "PoolDestroyedError from a live pool")
                continue
            if data != entry.contents:
                fail("final check", f"allocation of {entry.owner} in pool {entry.pool_ix} "
                                    f"({specs[entry.pool_ix][0]}) reads {data!r}, the "
                                    f"model says {bytes(entry.contents)!r}")
        for ix, pool in enumerate(pools):
            if pool.destroyed:
                continue
            made = [e for e in registry + handler_log["allocs"] if e.pool_ix == ix]
            s = pool.stats()
            if (s.allocations, s.bytes_requested) != (len(made),
                                                      sum(len(e.contents) for e in made)):
                fail("final check", f"pool {ix}: stats count {s.allocations} allocations of "
                                    f"{s.bytes_requested} bytes, the threads made "
                                    f"{len(made)} of {sum(len(e.contents) for e in made)}")
            if (s.buffer_views, s.writable_buffer_views) != (0, 0):
                fail("final check", f"pool {ix}: {s.buffer_views} buffer views counted "
                                    "after every view was released")
            try:
                pool.destroy()
            except BufferError as e:
                fail("final check", f"pool {ix} cannot be destroyed: {e}")
        outcomes["signal handler calls"] += handler_log["calls"]
        totals.update(outcomes)
        totals["examples"] += 1
        if failures:
            raise AssertionError("\n\n".join(f"[{who}] {what}" for who, what in failures))

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], report_multiple_bugs=False,
              suppress_health_check=list(HealthCheck))
    @given(specs=pool_specs, progs=programs)
    def race(specs, progs):
        faulthandler.dump_traceback_later(EXAMPLE_HANG, exit=True)
        if log_path:
            with open(log_path, "w") as f:
                f.write(f"pools={specs!r}\nprograms={progs!r}\n")
        run_example(specs, progs)
        faulthandler.cancel_dump_traceback_later()

    race()
    print("RESULT", json.dumps(dict(sorted(totals.items()))), flush=True)


# ============================================================== the test

TIMEOUT_LINE = re.compile(r"^Timeout \(\d+:\d\d:\d\d(\.\d+)?\)!$", re.M)


def test_threads_and_a_signal_handler_race_on_shared_pools(tmp_path):
    import pytest

    import prmem

    log = tmp_path / "example.txt"
    env = dict(os.environ)
    # the child imports the very prmem these tests import
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(prmem.__file__)))
    env["PYTHONPATH"] = package_dir + os.pathsep + env.get("PYTHONPATH", "")
    try:
        proc = subprocess.run([sys.executable, "-X", "dev", __file__, str(log)],
                              capture_output=True, text=True, timeout=KILL_AFTER, env=env,
                              stdin=subprocess.DEVNULL)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, err, rc = e.stdout or "", e.stderr or "", None
    example = log.read_text() if log.exists() else "(none)"
    if rc is None or TIMEOUT_LINE.search(err):
        pytest.fail(f"HUNG: an example did not finish within {EXAMPLE_HANG} s.  Stacks "
                    f"(faulthandler):\n{err[-10000:]}\nThe example:\n{example}",
                    pytrace=False)
    assert rc == 0, (f"the race child exited with {rc}\nstdout:\n{out[-6000:]}\n"
                     f"stderr:\n{err[-10000:]}\nlast example run:\n{example}")
    result = next(json.loads(line[len("RESULT "):]) for line in out.splitlines()
                  if line.startswith("RESULT "))
    print(json.dumps(result, indent=1))
    assert result["examples"] == EXAMPLES
    assert result["signal handler calls"] > 0
    assert err.strip() == "", err[-6000:]


if __name__ == "__main__":
    child_main(sys.argv[1] if len(sys.argv) > 1 else None)
