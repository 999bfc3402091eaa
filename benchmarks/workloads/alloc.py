"""alloc: what handing out one small protectable object costs.

Part 1, per-call cost.  Every implementation runs the same compiled loop,
``_keep[_i] = <allocate 32 bytes>``, 1000 times per sample, over many
samples taken round-robin between implementations (so drift hits all of them
alike); we report the median and p99 of the per-sample mean ns per call.
The objects are kept alive in a preallocated list during the sample and
released *after* the clock stops; the release is timed separately with the
same loop shape and reported as its own column.

Part 2, scaling.  Allocate n objects of 32 bytes and keep all of them:
time, RSS growth and number of new VMAs (lines of /proc/self/maps, which
vm.max_map_count limits).  prmem and bytearray go to 10^6; the C peers stop
at a cap (10^4.5) or at their first failure, which is recorded with errno.
For prmem the pool is then written (32 bytes into every object) and
protect()ed, and RSS and VMAs are measured again.

Part 3, before/after (issue 14).  ``pool.alloc(32)`` within an existing
area, timed in subprocesses against the builds of earlier revisions and this
tree (``benchmarks.baseline``); skipped in quick runs.
"""
from __future__ import annotations

import ctypes
import errno
import gc
import math
from array import array
from typing import Any, Callable, Dict, List, Optional

import prmem

from .. import baseline, peers
from ..harness import (PAGE_SIZE, Budget, RunContext, batch_loop, gc_paused, perf_ns, ratio,
                       rss_bytes, summarize, vma_count)
from ..report import fmt_num, fmt_ratio, md_table, save_figure, targets_table

NAME = "alloc"
TITLE = "alloc — one 32-byte object"
SIZE = 32
BATCH = 1000

#: The before/after script (``benchmarks.baseline``): alloc(32) within an area
#: the untimed first call opened (refill 64 MiB: every timed call fits in it),
#: a fresh pool per repetition.  Only API every baseline revision has.
BASELINE_STATEMENT = "a(32) with a = Pool(Mode.WR, refill=64 << 20).alloc, area already open"
BASELINE_SCRIPT = """
def measure(n):
    p = Pool(Mode.WR, refill=64 << 20)
    a = p.alloc
    a(32)
    t = time.perf_counter_ns()
    for _ in range(n):
        a(32)
    t = time.perf_counter_ns() - t
    p.destroy()
    return t
"""
BASELINE_CALLS = 200_000  # 6.4 MB of the 64 MiB area

#: OpenSSL's secure heap has a fixed arena, set once per process.
OPENSSL_ARENA = 1 << 23  # 8 MiB: 10^4.5 objects of 32 B use ~1 MiB of it


class Impl:
    """One way of allocating: the timed statement and how to release."""

    def __init__(self, key: str, label: str, protection: str, stmt: str, names: List[str],
                 values: List[Any], release_stmt: str, release_names: List[str],
                 release_values: List[Any], is_peer: bool = True,
                 check: Optional[Callable[[List[Any]], Optional[str]]] = None,
                 note: str = "", teardown: Optional[Callable[[], None]] = None) -> None:
        self.key = key
        self.label = label
        self.protection = protection
        self.loop = batch_loop(stmt, ["_keep"] + names, label=f"alloc {key}")
        self.values = values
        self.release = batch_loop(release_stmt, ["_keep"] + release_names,
                                  label=f"release {key}")
        self.release_values = release_values
        self.is_peer = is_peer
        self.check = check
        self.note = note
        self.teardown = teardown
        self.samples: List[float] = []
        self.release_samples: List[float] = []
        self.error: Optional[str] = None


def _null_check(what: str) -> Callable[[List[Any]], Optional[str]]:
    def check(keep: List[Any]) -> Optional[str]:
        for p in keep:
            if not p or p == peers.MAP_FAILED:
                err = ctypes.get_errno()
                return f"{what} returned NULL ({errno.errorcode.get(err, err)})"
        return None
    return check


def _implementations(ctx: RunContext) -> List[Impl]:
    impls: List[Impl] = []
    pool = prmem.Pool(prmem.Mode.RO, name="bench", refill=65536)
    impls.append(Impl(
        "prmem", "prmem Pool.alloc(32)", "pool pages, write-protected at protect()",
        "_keep[_i] = f(32)", ["f"], [pool.alloc],
        "_keep[_i] = None", [], [], is_peer=False,
        note="RO pool, refill=65536; release = dropping the Allocation object "
             "(pool memory is only returned by destroy())",
        teardown=pool.destroy))
    impls.append(Impl(
        "bytearray", "bytearray(32)", "none",
        "_keep[_i] = f(32)", ["f"], [bytearray],
        "_keep[_i] = None", [], [],
        note="plain Python object, no protection; the speed reference"))
    try:
        sodium = peers.get("sodium")
        impls.append(Impl(
            "sodium", "libsodium sodium_malloc(32)",
            "guard pages + canary + mlock; sodium_mprotect_* per object",
            "_keep[_i] = f(32)", ["f"], [sodium.malloc],
            "free(_keep[_i])", ["free"], [sodium.free],
            check=_null_check("sodium_malloc"),
            note=f"libsodium {sodium.version}; release = sodium_free"))
    except peers.PeerUnavailable as exc:
        ctx.skip(NAME, "libsodium sodium_malloc", str(exc))
    try:
        ossl = peers.get("openssl", arena_bytes=OPENSSL_ARENA)
        impls.append(Impl(
            "openssl", "OpenSSL CRYPTO_secure_malloc(32)",
            "mlocked arena with guard pages; no write protection of objects",
            "_keep[_i] = f(32, None, 0)", ["f"], [ossl.malloc],
            "free(_keep[_i], None, 0)", ["free"], [ossl.free],
            check=_null_check("CRYPTO_secure_malloc"),
            note=f"{ossl.version}; secure heap of {OPENSSL_ARENA >> 20} MiB "
                 f"(init returned {ossl.init_result}); release = CRYPTO_secure_free"))
    except peers.PeerUnavailable as exc:
        ctx.skip(NAME, "OpenSSL CRYPTO_secure_malloc", str(exc))
    try:
        libc = peers.get("libc")
        impls.append(Impl(
            "naive", "mmap(1 page) + mprotect(PROT_READ)", "one page per object, read-only",
            "_p = mmap(None, page, rw, flags, -1, 0)\n"
            "mprotect(_p, page, ro)\n"
            "_keep[_i] = _p",
            ["mmap", "mprotect", "page", "rw", "flags", "ro"],
            [libc.mmap, libc.mprotect, PAGE_SIZE, peers.PROT_READ | peers.PROT_WRITE,
             peers.MAP_PRIVATE | peers.MAP_ANONYMOUS, peers.PROT_READ],
            "munmap(_keep[_i], page)", ["munmap", "page"], [libc.munmap, PAGE_SIZE],
            check=_null_check("mmap"),
            note="libc mmap/mprotect through ctypes; release = munmap"))
    except peers.PeerUnavailable as exc:
        ctx.skip(NAME, "naive mmap+mprotect", str(exc))
    impls.append(Impl(
        "overhead", "loop overhead: abs(32)", "—",
        "_keep[_i] = f(32)", ["f"], [abs],
        "_keep[_i] = None", [], [], is_peer=False,
        note="the same loop around a trivial C call: the floor every row pays"))
    return impls


def _sample(impl: Impl, keep: List[Any], nones: List[None]) -> None:
    ns = impl.loop(BATCH, keep, *impl.values)
    problem = impl.check(keep) if impl.check else None
    rel = impl.release(BATCH, keep, *impl.release_values)
    keep[:] = nones
    if problem:
        impl.error = problem
        return
    impl.samples.append(ns / BATCH)
    impl.release_samples.append(rel / BATCH)


def _per_call(ctx: RunContext, impls: List[Impl]) -> None:
    rounds = ctx.pick(3, 8)
    per_impl_s = ctx.pick(0.5, 4.0)
    min_samples = ctx.pick(5, 20)
    max_samples = ctx.pick(300, 2000)
    keep: List[Any] = [None] * BATCH
    nones: List[None] = [None] * BATCH
    with gc_paused():
        for impl in impls:  # warm-up
            _sample(impl, keep, nones)
            impl.samples.clear()
            impl.release_samples.clear()
        for r in range(rounds):
            for impl in impls:
                if impl.error:
                    continue
                budget = Budget(per_impl_s / rounds, max(1, min_samples // rounds),
                                max_samples // rounds)
                taken = 0
                while budget.more(taken) and not impl.error:
                    _sample(impl, keep, nones)
                    taken += 1
            gc.collect()
    for impl in impls:
        if impl.teardown:
            impl.teardown()


# ---------------------------------------------------------------- scaling


def _fill_py(f: Callable[[int], Any], keep: List[Any], n: int) -> int:
    for i in range(n):
        keep[i] = f(SIZE)
    return n


def _fill_c(f: Callable[..., Any], keep: array, n: int) -> int:
    for i in range(n):
        p = f(SIZE)
        if not p:
            return i
        keep[i] = p
    return n


def _fill_ossl(f: Callable[..., Any], keep: array, n: int) -> int:
    for i in range(n):
        p = f(SIZE, None, 0)
        if not p:
            return i
        keep[i] = p
    return n


def _fill_naive(libc: Any, keep: array, n: int) -> int:
    mmap_, mprotect = libc.mmap, libc.mprotect
    page, rw, ro = PAGE_SIZE, peers.PROT_READ | peers.PROT_WRITE, peers.PROT_READ
    flags = peers.MAP_PRIVATE | peers.MAP_ANONYMOUS
    failed = peers.MAP_FAILED
    for i in range(n):
        p = mmap_(None, page, rw, flags, -1, 0)
        if not p or p == failed:
            return i
        if mprotect(p, page, ro) != 0:
            libc.munmap(p, page)
            return i
        keep[i] = p
    return n


def _trim() -> None:
    """Give freed heap memory back to the kernel (glibc malloc_trim), so that
    an RSS delta is less hidden by memory the process already held."""
    try:
        trim = peers.get("libc").malloc_trim
    except peers.PeerUnavailable:
        return
    if trim is not None:
        trim(0)


def _measure(fill: Callable[[], int], n: int) -> Dict[str, Any]:
    gc.collect()
    _trim()
    rss0, vmas0 = rss_bytes(), vma_count()
    with gc_paused():
        t0 = perf_ns()
        try:
            done = fill()
            failure = None
        except MemoryError as exc:
            done, failure = -1, f"MemoryError: {exc}"
        elapsed = perf_ns() - t0
    err = ctypes.get_errno()
    row: Dict[str, Any] = {"n": n, "allocated": done, "time_ms": elapsed / 1e6,
                           "_before": (rss0, vmas0)}
    if failure is None and done < n:
        failure = f"failed after {done:,} objects: {errno.errorcode.get(err, err)}"
    row["failure"] = failure
    try:  # at the map-count limit even reading /proc may fail; we keep going
        row["rss_delta_bytes"] = rss_bytes() - rss0
        row["vmas_delta"] = vma_count() - vmas0
        row["vmas_total"] = vmas0 + row["vmas_delta"]
    except (OSError, MemoryError):
        row["rss_delta_bytes"] = row["vmas_delta"] = row["vmas_total"] = None
    if done > 0:
        row["ns_per_alloc"] = elapsed / done
    return row


def _scale_prmem(n: int) -> Dict[str, Any]:
    keep: List[Any] = [None] * n
    pool = prmem.Pool(prmem.Mode.RO, name="bench-scale", refill=65536)
    try:
        row = _measure(lambda: _fill_py(pool.alloc, keep, n), n)
        rss0, vmas0 = row.pop("_before")
        if row["failure"] is None:
            data = b"\xa5" * SIZE
            for a in keep:
                a.write(data)
            row["written_rss_delta_bytes"] = rss_bytes() - rss0
            t0 = perf_ns()
            pool.protect()
            row["protect_ms"] = (perf_ns() - t0) / 1e6
            # protect() re-maps the sealed chunk, so its pages leave RSS until
            # read again (they stay in memory as shmem): only VMAs are
            # meaningful after protect().
            row["protected_vmas_delta"] = vma_count() - vmas0
            st = pool.stats()
            row["pool_areas"], row["pool_chunks"] = st.areas, st.chunks
            row["pool_bytes_mapped"] = st.bytes_mapped
    finally:
        keep = None  # type: ignore[assignment]
        pool.destroy()
    return row


def _scale_bytearray(n: int) -> Dict[str, Any]:
    keep: List[Any] = [None] * n
    row = _measure(lambda: _fill_py(bytearray, keep, n), n)
    del keep
    row.pop("_before")
    return row


def _capture_maps(buf: bytearray) -> int:
    """Copy /proc/self/maps into the preallocated ``buf`` (no allocation of
    our own, so it works with the map count at its limit); returns the
    length, or -1 if it did not fit."""
    view = memoryview(buf)
    pos = 0
    with open("/proc/self/maps", "rb", buffering=0) as f:
        while pos < len(buf):
            got = f.readinto(view[pos:pos + 32768])
            if not got:
                return pos
            pos += got
    return -1


def _unguarded(maps_text: bytes, addrs: array, n: int) -> int:
    """How many sodium_malloc(32) blocks have no PROT_NONE page right after
    the page holding their data (libsodium puts a guard page there)."""
    starts: List[int] = []
    ends: List[int] = []
    perms: List[bytes] = []
    for line in maps_text.splitlines():
        rng, perm = line.split(None, 2)[:2]
        lo, hi = rng.split(b"-")
        starts.append(int(lo, 16))
        ends.append(int(hi, 16))
        perms.append(perm)
    import bisect
    missing = 0
    for i in range(n):
        guard = (addrs[i] & ~(PAGE_SIZE - 1)) + PAGE_SIZE
        j = bisect.bisect_right(starts, guard) - 1
        if j < 0 or guard >= ends[j] or perms[j][:3] != b"---":
            missing += 1
    return missing


def _scale_c(n: int, fill: Callable[[array, int], int], release: Callable[[int], None],
             check_guards: bool = False) -> Dict[str, Any]:
    keep = array("Q", bytes(8 * n))
    maps_buf = bytearray(16 << 20) if check_guards and n >= 10_000 else None
    maps_len = -1
    done = [0]

    def run() -> int:
        done[0] = fill(keep, n)
        return done[0]
    try:
        row = _measure(run, n)
        row.pop("_before")
        if maps_buf is not None:
            maps_len = _capture_maps(maps_buf)
    finally:
        for i in range(done[0]):
            release(keep[i])
    if maps_buf is not None and maps_len >= 0:
        row["unguarded"] = _unguarded(bytes(maps_buf[:maps_len]), keep, done[0])
    return row


def _scalers(ctx: RunContext) -> Dict[str, Callable[[int], Dict[str, Any]]]:
    out: Dict[str, Callable[[int], Dict[str, Any]]] = {
        "prmem": _scale_prmem, "bytearray": _scale_bytearray}
    try:
        s = peers.get("sodium")
        out["sodium"] = lambda n: _scale_c(n, lambda k, m: _fill_c(s.malloc, k, m), s.free,
                                           check_guards=True)
    except peers.PeerUnavailable:
        pass
    try:
        o = peers.get("openssl", arena_bytes=OPENSSL_ARENA)
        out["openssl"] = lambda n: _scale_c(n, lambda k, m: _fill_ossl(o.malloc, k, m),
                                            lambda p: o.free(p, None, 0))
    except peers.PeerUnavailable:
        pass
    try:
        libc = peers.get("libc")
        out["naive"] = lambda n: _scale_c(n, lambda k, m: _fill_naive(libc, k, m),
                                          lambda p: libc.munmap(p, PAGE_SIZE))
    except peers.PeerUnavailable:
        pass
    return out


def _scaling(ctx: RunContext) -> Dict[str, Any]:
    exps = ctx.pick([2, 3, 4, 4.5, 5, 6], [2, 2.5, 3, 3.5, 4, 4.5, 5, 5.5, 6])
    points = [int(round(10 ** e)) for e in exps]
    c_cap = int(round(10 ** 4.5))
    reps = ctx.pick(1, 3)
    scalers = _scalers(ctx)
    raw: Dict[str, Dict[int, List[Dict[str, Any]]]] = {k: {} for k in scalers}
    for _ in range(reps):
        for n in points:
            for key, fn in scalers.items():
                if key not in ("prmem", "bytearray") and n > c_cap:
                    continue
                raw[key].setdefault(n, []).append(fn(n))
    rows = []
    for key, by_n in raw.items():
        for n, reps_rows in sorted(by_n.items()):
            rows.append(_merge_reps(key, n, reps_rows))
    return {"points": points, "c_peer_cap": c_cap, "repetitions": reps, "rows": rows}


def _median(values: List[Optional[float]]) -> Optional[float]:
    vals = sorted(v for v in values if v is not None)
    return summarize(vals)["median"] if vals else None


def _merge_reps(key: str, n: int, reps_rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    merged: Dict[str, Any] = {"impl": key, "n": n, "repetitions": len(reps_rows)}
    numeric = set()
    for r in reps_rows:
        numeric.update(k for k, v in r.items() if isinstance(v, (int, float)) and k != "n")
    for k in sorted(numeric):
        merged[k] = _median([r.get(k) for r in reps_rows])
        if k == "unguarded":
            continue
        if k in ("allocated", "vmas_delta", "vmas_total", "rss_delta_bytes", "pool_areas",
                 "pool_chunks", "pool_bytes_mapped", "protected_vmas_delta",
                 "written_rss_delta_bytes") and merged[k] is not None:
            merged[k] = int(merged[k])
    runs = len(reps_rows)
    failures = [r["failure"] for r in reps_rows if r.get("failure")]
    merged["failure"] = None
    if failures:
        merged["failure"] = failures[0] + (f" (in {len(failures)} of {runs} runs)"
                                           if runs > 1 else "")
    unguarded = [r["unguarded"] for r in reps_rows if r.get("unguarded")]
    merged["unguarded"] = max(unguarded) if unguarded else (0 if any(
        "unguarded" in r for r in reps_rows) else None)
    merged["unguarded_runs"] = len(unguarded)
    return merged


# -------------------------------------------------------------------- run


def run(ctx: RunContext) -> Dict[str, Any]:
    # Scaling first, while the process holds little freed memory that could
    # hide RSS growth.
    ctx.log(f"[{NAME}] scaling 10^2 .. 10^6 objects ...")
    scaling = _scaling(ctx)
    ctx.log(f"[{NAME}] per-call cost, {BATCH} calls per sample ...")
    impls = _implementations(ctx)
    _per_call(ctx, impls)
    before_after = baseline.compare(ctx, NAME, "alloc", BASELINE_STATEMENT, BASELINE_SCRIPT,
                                    BASELINE_CALLS)
    rows = []
    by_key: Dict[str, Dict[str, Any]] = {}
    for impl in impls:
        s = summarize(impl.samples)
        rel = summarize(impl.release_samples)
        row = {
            "impl": impl.key, "label": impl.label, "protection": impl.protection,
            "is_peer": impl.is_peer,
            "median_ns": s["median"], "p99_ns": s["p99"], "min_ns": s["min"],
            "mean_ns": s["mean"], "samples": s["n"], "calls_per_sample": BATCH,
            "release_median_ns": rel["median"], "error": impl.error, "note": impl.note,
        }
        rows.append(row)
        by_key[impl.key] = row
    prmem_ns = by_key["prmem"]["median_ns"]
    peer_medians = [r["median_ns"] for r in rows if r["is_peer"] and r["samples"]]
    best_peer = min(peer_medians) if peer_medians else None
    for row in rows:
        if row["samples"]:
            row["ratio_vs_best_peer"] = ratio(row["median_ns"], best_peer)
        if row["impl"] not in ("prmem", "overhead") and row["samples"]:
            row["ratio_vs_prmem"] = ratio(row["median_ns"], prmem_ns)

    def med(key: str) -> Optional[float]:
        r = by_key.get(key)
        return r["median_ns"] if r and r["samples"] else None

    overhead = med("overhead")
    targets = [
        _target("prmem / bytearray", ratio(med("prmem"), med("bytearray")), "≤ 2×",
                lambda v: v <= 2.0, "median ns per alloc(32) vs bytearray(32)"),
        _target("sodium_malloc / prmem", ratio(med("sodium"), med("prmem")), "≥ 50×",
                lambda v: v >= 50.0, "median ns per sodium_malloc(32) vs alloc(32)"),
    ] + baseline.targets(before_after)
    extra = {
        "prmem_over_bytearray_minus_loop_overhead": ratio(
            None if overhead is None or med("prmem") is None else med("prmem") - overhead,
            None if overhead is None or med("bytearray") is None else med("bytearray") - overhead),
        "prmem_over_openssl": ratio(med("prmem"), med("openssl")),
        "naive_over_prmem": ratio(med("naive"), med("prmem")),
    }
    notes = [
        "Per-call rows: median and p99 over samples of the mean ns per call of "
        f"{BATCH} consecutive calls (the p99 is of those sample means).",
        "Objects are released after the clock stops; 'release ns' times that "
        "release separately (same loop).",
        "The C peers are called through ctypes.PyDLL; each call pays ctypes' call and "
        "argument conversion (see 'one ctypes call' in the machine table), which the 'loop "
        "overhead' row does not include.",
        "Scaling (run first, with glibc malloc_trim() before each point): n objects kept "
        "alive; RSS Δ from /proc/self/statm, VMAs Δ = new lines in /proc/self/maps; medians "
        "over repetitions. Small RSS Δs are unreliable: the process reuses memory it "
        "already holds (a few MiB), so read RSS at the larger n. prmem's alloc() does not "
        "touch the memory (fresh pool pages are zero; each Allocation is a "
        f"{_allocation_object_size()}-byte Python object), sodium_malloc fills its page and "
        "mlock()s it, "
        f"OpenSSL's arena ({OPENSSL_ARENA >> 20} MiB, mlocked) was committed at init and "
        "is not in the Δ, the naive pages are never touched.",
        "Adjacent naive pages with the same protection are merged by the kernel into one "
        "VMA, so the naive peer does not run into vm.max_map_count here; libsodium's "
        "guard pages keep its allocations apart (about 4 VMAs each).",
        "At vm.max_map_count libsodium either fails (sodium_malloc returns NULL, ENOMEM) or, "
        "when the new mapping merges with a neighbour, succeeds while the mprotect() of its "
        "guard pages fails and is ignored: 'unguarded' counts blocks (n ≥ 10^4) whose data "
        "page is not followed by a PROT_NONE page, read from /proc/self/maps. Which of the two "
        "happens depends on the address-space layout at the time.",
    ]
    return {"rows": rows, "targets": targets, "extra_ratios": extra,
            "loop_overhead_ns": overhead, "scaling": scaling, "notes": notes,
            "before_after": before_after}


def _allocation_object_size() -> int:
    import sys

    with prmem.Pool(prmem.Mode.RO, name="bench-sizeof") as pool:
        return sys.getsizeof(pool.alloc(SIZE))


def _target(name: str, value: Optional[float], target: str, ok: Callable[[float], bool],
            description: str) -> Dict[str, Any]:
    return {"name": name, "value": value, "target": target,
            "met": None if value is None else bool(ok(value)), "description": description}


# ----------------------------------------------------------------- output


def _problems(r: Dict[str, Any]) -> str:
    parts = []
    if r.get("failure"):
        parts.append(r["failure"])
    if r.get("unguarded"):
        runs = r.get("repetitions", 1)
        where = f" (in {r['unguarded_runs']} of {runs} runs)" if runs > 1 else ""
        parts.append(f"up to {r['unguarded']:,} block(s) returned without their guard page "
                     f"(its mprotect() failed at the VMA limit){where}")
    return "; ".join(parts)


def _mib(value: Optional[int]) -> str:
    return "—" if value is None else f"{value / 1048576:,.1f}"


def markdown(result: Dict[str, Any]) -> str:
    out = [f"## {TITLE}", ""]
    rows = []
    for r in result["rows"]:
        vs = "" if r["impl"] in ("prmem", "overhead") else fmt_ratio(r.get("ratio_vs_prmem"))
        best = "" if r["impl"] == "overhead" else fmt_ratio(r.get("ratio_vs_best_peer"))
        rows.append([r["label"], r["median_ns"] if r["samples"] else "—",
                     r["p99_ns"] if r["samples"] else "—",
                     r["release_median_ns"] if r["samples"] else "—",
                     f"{r['samples']:,} × {r['calls_per_sample']:,}", best, vs,
                     r["protection"], r["error"] or ""])
    out.append(md_table(["implementation", "median ns/call", "p99 ns/call", "release ns/call",
                         "samples × calls", "vs best peer", "vs prmem", "protection", "error"],
                        rows))
    out += ["", targets_table(result["targets"]), ""]
    extra = result["extra_ratios"]
    out.append("Other ratios: prmem/bytearray after subtracting the loop overhead "
               f"{fmt_ratio(extra['prmem_over_bytearray_minus_loop_overhead'])}; "
               f"prmem/OpenSSL secure heap {fmt_ratio(extra['prmem_over_openssl'])}; "
               f"naive mmap+mprotect/prmem {fmt_ratio(extra['naive_over_prmem'])}.")
    before_after = baseline.markdown(result.get("before_after"))
    if before_after:
        out += [""] + before_after
    sc = result["scaling"]
    out += ["", f"### Scaling: n × 32 B kept alive (medians of {sc['repetitions']} run(s); "
            f"C peers capped at {sc['c_peer_cap']:,})", ""]
    srows = []
    for r in sc["rows"]:
        srows.append([r["impl"], r["n"], r.get("allocated"), r.get("time_ms"),
                      r.get("ns_per_alloc"), _mib(r.get("rss_delta_bytes")), r.get("vmas_delta"),
                      r.get("vmas_total"), _problems(r)])
    out.append(md_table(["impl", "n", "allocated", "time ms", "ns/alloc", "RSS Δ MiB",
                         "VMAs Δ", "VMAs total", "failure / degradation"], srows))
    prows = [[r["n"], _mib(r.get("written_rss_delta_bytes")), r.get("protect_ms"),
              r.get("protected_vmas_delta"), _mib(r.get("pool_bytes_mapped")),
              r.get("pool_areas"), r.get("pool_chunks")]
             for r in sc["rows"] if r["impl"] == "prmem" and "protect_ms" in r]
    if prows:
        out += ["", "prmem, then writing 32 B into every object (RSS Δ, from before the "
                "allocations) and `protect()` (VMAs Δ after it; protect() re-maps the sealed "
                "pages, which then leave RSS until read although they stay in memory):", "",
                md_table(["n", "RSS Δ MiB after writes", "protect() ms", "VMAs Δ after protect",
                          "pool MiB mapped", "areas", "chunks"], prows)]
    out += ["", "Notes:", ""] + [f"- {n}" for n in result["notes"]]
    out += [f"- {r['label']}: {r['note']}" for r in result["rows"] if r.get("note")]
    return "\n".join(out) + "\n"


def summary(result: Dict[str, Any]) -> List[List[str]]:
    rows = []
    for r in result["rows"]:
        if r["impl"] == "overhead":
            continue
        rows.append([f"alloc {r['impl']}", f"{fmt_num(r['median_ns'])} ns/call" if r["samples"]
                     else (r["error"] or "no samples")])
    for t in result["targets"]:
        rows.append([t["name"], f"{fmt_ratio(t['value'])} (target {t['target']}: "
                     f"{'—' if t['met'] is None else ('met' if t['met'] else 'NOT met')})"])
    big = [r for r in result["scaling"]["rows"] if r["impl"] == "prmem"]
    if big:
        r = max(big, key=lambda x: x["n"])
        rows.append([f"prmem {r['n']:,} × 32 B",
                     f"{fmt_num(r.get('vmas_delta'))} new VMAs, after write+protect "
                     f"{fmt_num(r.get('protected_vmas_delta'))}"])
    for r in result["scaling"]["rows"]:
        if r.get("failure") or r.get("unguarded"):
            rows.append([f"{r['impl']} at n={r['n']:,}", _problems(r)])
    return rows


def plot(result: Dict[str, Any], out_dir: str, plt: Any) -> List[str]:

    paths = []
    rows = [r for r in result["rows"] if r["samples"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh([r["label"] for r in rows], [r["median_ns"] for r in rows], color=[
        "tab:green" if r["impl"] == "prmem" else "tab:gray" if r["impl"] == "overhead"
        else "tab:blue" for r in rows])
    ax.set_xscale("log")
    ax.set_xlabel("median ns per 32-byte allocation (log)")
    ax.invert_yaxis()
    ax.set_title("alloc: per-call cost")
    path = save_figure(plt, fig, out_dir, "alloc")
    paths.append(path)

    sc = result["scaling"]["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for key in sorted({r["impl"] for r in sc}):
        pts = [r for r in sc if r["impl"] == key]
        ns = [r["n"] for r in pts]
        def val(r: Dict[str, Any], k: str, scale: float = 1.0, floor: float = 0.0) -> float:
            v = r.get(k)
            return math.nan if v is None else max(v, 0) / scale + floor
        axes[0].plot(ns, [val(r, "ns_per_alloc") for r in pts], marker="o", label=key)
        axes[1].plot(ns, [val(r, "vmas_delta", floor=1) for r in pts], marker="o", label=key)
        axes[2].plot(ns, [val(r, "rss_delta_bytes", 1048576, 0.01) for r in pts],
                     marker="o", label=key)
        for r in pts:
            if r.get("failure") or r.get("unguarded"):
                for ax in axes:
                    ax.axvline(r["n"], color="tab:red", alpha=0.3, linestyle="--")
                what = (f"fails after {r.get('allocated', 0):,}" if r.get("failure")
                        else f"{r['unguarded']:,} unguarded")
                axes[1].annotate(f"{key}: {what}",
                                 (r["n"], val(r, "vmas_delta", floor=1)), fontsize="small")
    for ax, title in zip(axes, ["ns per allocation", "new VMAs + 1", "RSS Δ MiB (+0.01)"]):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("objects kept alive")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    path = save_figure(plt, fig, out_dir, "alloc_scaling")
    paths.append(path)
    return paths
