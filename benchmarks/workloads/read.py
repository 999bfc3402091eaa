"""read: numpy reading protected memory at full speed.

64 MiB of int64 data, summed with ``ndarray.sum()``, from:

* prmem ``Pool(Mode.RO)``: one 64 MiB allocation, written through a
  writable memoryview, ``protect()``ed (sealed and re-mapped read-only),
  then ``numpy.frombuffer(memoryview(alloc))`` (a read-only array);
* prmem ``Pool(Mode.WR)``: the same, protect() = mprotect only;
* an ordinary numpy array (``src.copy()``);
* ``numpy.frombuffer(bytearray)``;
* naive: an anonymous mmap()ed region made read-only with ``mprotect``,
  wrapped with ctypes and ``numpy.frombuffer``.

First pass: each repetition builds every buffer afresh (write, protect),
then times the first ``sum()``, with the minor page faults and the RSS
growth it caused: protect() of an RO pool re-maps the pages, so its first
read faults them back in.  Steady state: the last buffers built are summed
again and again, round-robin across implementations; median of the passes.
The result of every sum is checked.
"""
from __future__ import annotations

import ctypes
import gc
import random
from typing import Any, Callable, Dict, List, Optional

import prmem

from .. import peers
from ..harness import (RunContext, gc_paused, minor_faults, perf_ns, ratio, rss_bytes, smaps_range,
                       summarize)
from ..report import fmt_num, fmt_ratio, md_table, save_figure, targets_table

NAME = "read"
TITLE = "read — numpy sum() of 64 MiB in protected memory"
MiB = 1 << 20
SIZE = 64 * MiB


class Source:
    """A way of holding SIZE bytes of data that numpy reads."""

    def __init__(self, key: str, label: str, how: str, is_peer: bool,
                 build: Callable[[Any], tuple]) -> None:
        self.key = key
        self.label = label
        self.how = how
        self.is_peer = is_peer
        self._build = build
        self.array: Any = None
        self._cleanup: Optional[Callable[[], None]] = None
        self.first: List[Dict[str, Any]] = []
        self.steady_ns: List[int] = []
        self.build_medians: List[float] = []
        self.error: Optional[str] = None
        self.huge_page_bytes: Optional[int] = None
        self.read_only: Optional[bool] = None

    def build(self, src: Any) -> None:
        self.array, self._cleanup = self._build(src)

    def release(self) -> None:
        self.array = None
        if self._cleanup is not None:
            cleanup, self._cleanup = self._cleanup, None
            cleanup()


def _sources(ctx: RunContext, np: Any) -> List[Source]:
    def prmem_builder(mode: prmem.Mode) -> Callable[[Any], tuple]:
        def build(src: Any) -> tuple:
            pool = prmem.Pool(mode, name=f"bench-read-{mode.name}")
            a = pool.alloc(SIZE, align_order=12)
            wv = memoryview(a)
            w = np.frombuffer(wv, dtype=src.dtype)
            w[...] = src
            del w
            wv.release()
            pool.protect()
            view = memoryview(a)  # read-only now

            def cleanup() -> None:
                view.release()
                pool.destroy()
            return np.frombuffer(view, dtype=src.dtype), cleanup
        return build

    def numpy_build(src: Any) -> tuple:
        return src.copy(), None

    def numpy_small_pages_build(src: Any) -> tuple:
        toggle = _madvise_hugepage_toggle(np)
        previous = toggle(False)
        try:
            return src.copy(), None
        finally:
            toggle(previous)

    def bytearray_build(src: Any) -> tuple:
        ba = bytearray(SIZE)
        np.frombuffer(ba, dtype=src.dtype)[...] = src
        return np.frombuffer(ba, dtype=src.dtype), None

    out = [
        Source("prmem_ro", "prmem RO pool, protected", "Pool(Mode.RO), one 64 MiB allocation, "
               "protect() (sealed + re-mapped), numpy.frombuffer(memoryview(alloc))", False,
               prmem_builder(prmem.Mode.RO)),
        Source("prmem_wr", "prmem WR pool, protected", "Pool(Mode.WR), protect() (mprotect), "
               "numpy.frombuffer(memoryview(alloc))", False, prmem_builder(prmem.Mode.WR)),
        Source("numpy", "ordinary numpy array", "src.copy(): numpy's own allocation", True,
               numpy_build),
    ]
    if _madvise_hugepage_toggle(np) is not None:
        out.append(Source("numpy_4k", "numpy array, huge pages off",
                          "src.copy() with numpy's madvise(MADV_HUGEPAGE) switched off "
                          "(numpy._core.multiarray._set_madvise_hugepage(False))", True,
                          numpy_small_pages_build))
    else:
        ctx.skip(NAME, "numpy array without huge pages",
                 "this numpy cannot switch its madvise(MADV_HUGEPAGE) off")
    out += [
        Source("bytearray", "numpy.frombuffer(bytearray)", "bytearray(64 MiB) filled, then "
               "numpy.frombuffer", True, bytearray_build),
    ]
    try:
        libc = peers.get("libc")

        def naive_build(src: Any) -> tuple:
            addr = libc.map_page(SIZE)
            buf = (ctypes.c_char * SIZE).from_address(addr)
            np.frombuffer(buf, dtype=src.dtype)[...] = src
            if libc.mprotect(addr, SIZE, peers.PROT_READ) != 0:
                libc.munmap(addr, SIZE)
                raise OSError(ctypes.get_errno(), "mprotect failed")
            return np.frombuffer(buf, dtype=src.dtype), lambda: libc.munmap(addr, SIZE)
        out.append(Source("naive", "naive mmap + mprotect(PROT_READ)", "anonymous mmap, "
                          "filled, mprotect read-only, numpy.frombuffer over a ctypes array",
                          True, naive_build))
    except peers.PeerUnavailable as exc:
        ctx.skip(NAME, "naive mmap+mprotect", str(exc))
    return out


def _madvise_hugepage_toggle(np: Any) -> Optional[Callable[[bool], bool]]:
    """numpy's switch for asking for transparent huge pages on large arrays
    (returns the previous setting), or None if this numpy has none."""
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            mod = __import__(module, fromlist=["_set_madvise_hugepage"])
        except ImportError:
            continue
        toggle = getattr(mod, "_set_madvise_hugepage", None)
        if toggle is not None:
            return toggle
    return None


def _time_sum(arr: Any) -> tuple:
    t0 = perf_ns()
    total = arr.sum()
    return perf_ns() - t0, int(total)


def run(ctx: RunContext) -> Dict[str, Any]:
    try:
        import numpy as np
    except ImportError:
        message = ctx.skip(NAME, "the whole workload", "numpy is not installed")
        return {"rows": [], "targets": [], "notes": [message], "skipped": True}
    reps = ctx.pick(2, 10)
    passes = ctx.pick(6, 12)
    src = np.arange(SIZE // 8, dtype=np.int64)
    expected = int(src.sum())
    sources = _sources(ctx, np)
    ctx.log(f"[{NAME}] sum() of {SIZE // MiB} MiB: {reps} fresh builds, each with a timed first "
            f"pass and {passes} steady-state passes per implementation ...")
    order = random.Random(20261122)
    for rep in range(reps):
        for s in sources:
            s.release()
        gc.collect()
        live = [s for s in sources if not s.error]
        order.shuffle(live)  # who gets which freed pages changes from build to build
        for s in live:
            try:
                s.build(src)
            except Exception as exc:
                s.error = f"{type(exc).__name__}: {exc}"
                s.release()
                continue
            with gc_paused():
                f0, r0 = minor_faults(), rss_bytes()
                ns, total = _time_sum(s.array)
                faults, rss = minor_faults() - f0, rss_bytes() - r0
                ns2, total2 = _time_sum(s.array)
            if total != expected or total2 != expected:
                s.error = f"sum {total} != {expected}"
            s.first.append({"ns": ns, "faults": faults, "rss_growth": rss, "second_ns": ns2})
        live = [s for s in live if s.array is not None and not s.error]
        for s in live:
            addr = s.array.__array_interface__["data"][0]
            vma = smaps_range(addr, SIZE) or {}
            s.huge_page_bytes = sum(vma.get(k, 0) for k in ("AnonHugePages", "ShmemPmdMapped",
                                                             "FilePmdMapped"))
            s.read_only = not s.array.flags.writeable
        this_build: Dict[str, List[int]] = {s.key: [] for s in live}
        with gc_paused():
            for _ in range(passes):
                order.shuffle(live)  # no implementation always runs right after another
                for s in live:
                    ns, total = _time_sum(s.array)
                    if total != expected:
                        s.error = f"sum {total} != {expected}"
                    this_build[s.key].append(ns)
        for s in live:
            s.steady_ns.extend(this_build[s.key])
            s.build_medians.append(summarize(this_build[s.key])["median"])
    for s in sources:
        s.release()
    del src
    gc.collect()
    return _result(sources, reps, passes)


def _result(sources: List[Source], reps: int, passes: int) -> Dict[str, Any]:
    rows = []
    for s in sources:
        first = summarize(f["ns"] for f in s.first)
        second = summarize(f["second_ns"] for f in s.first)
        steady = summarize(s.steady_ns)
        row = {
            "impl": s.key, "label": s.label, "how": s.how, "is_peer": s.is_peer,
            "first_ms": first["median"] / 1e6 if first["n"] else None,
            "second_ms": second["median"] / 1e6 if second["n"] else None,
            "first_faults": (int(summarize(f["faults"] for f in s.first)["median"])
                             if s.first else None),
            "first_rss_growth_bytes": (int(summarize(f["rss_growth"] for f in s.first)["median"])
                                       if s.first else None),
            "steady_ms": steady["median"] / 1e6 if steady["n"] else None,
            "steady_p99_ms": steady["p99"] / 1e6 if steady["n"] else None,
            "steady_min_ms": steady["min"] / 1e6 if steady["n"] else None,
            "passes": steady["n"], "first_reps": first["n"],
            "build_min_ms": min(s.build_medians) / 1e6 if s.build_medians else None,
            "build_max_ms": max(s.build_medians) / 1e6 if s.build_medians else None,
            "steady_GBps": SIZE / steady["median"] if steady["n"] else None,
            "huge_page_bytes": s.huge_page_bytes, "read_only_array": s.read_only,
            "error": s.error,
        }
        row["first_over_steady"] = ratio(row["first_ms"], row["steady_ms"])
        rows.append(row)
    by = {r["impl"]: r for r in rows}
    best_steady = min((r["steady_ms"] for r in rows if r["is_peer"] and r["steady_ms"]),
                      default=None)
    best_first = min((r["first_ms"] for r in rows if r["is_peer"] and r["first_ms"]),
                     default=None)
    for r in rows:
        r["ratio_vs_best_peer"] = ratio(r["steady_ms"], best_steady)
        r["first_ratio_vs_best_peer"] = ratio(r["first_ms"], best_first)
        r["ratio_vs_numpy"] = ratio(r["steady_ms"], by.get("numpy", {}).get("steady_ms"))
        r["first_ratio_vs_numpy"] = ratio(r["first_ms"], by.get("numpy", {}).get("first_ms"))

    def tgt(key: str, field: str, name: str, description: str) -> Dict[str, Any]:
        value = by.get(key, {}).get(field)
        return {"name": name, "value": value, "target": "0.95–1.05×",
                "met": None if value is None else 0.95 <= value <= 1.05,
                "description": description}
    targets = [
        tgt("prmem_ro", "ratio_vs_numpy", "prmem RO / numpy array, steady state",
            "median sum() time over the steady-state passes"),
        tgt("prmem_wr", "ratio_vs_numpy", "prmem WR / numpy array, steady state",
            "median sum() time over the steady-state passes"),
    ]
    ro = by.get("prmem_ro", {})
    notes = [
        f"Data: {SIZE // MiB} MiB of int64 (numpy.arange), summed with ndarray.sum() (the "
        "result is checked). Each pass reads all of it once; at this size the sum is "
        "memory-bound.",
        f"{reps} builds: every buffer is built afresh (written, protected; in a shuffled "
        "order), and its first sum() timed right away: 'faults' = minor page faults it took "
        "(getrusage), 'RSS growth' = what it added to RSS; 'second pass' = the sum() right "
        f"after it (medians over the builds). Steady state: then {passes} more passes per "
        "implementation, interleaved (each round in a shuffled order); 'steady' is the median "
        f"over all {reps} × {passes} passes.",
        "'per-build range': the lowest and highest per-build median. On this VM a 64 MiB "
        "buffer's read speed depends on which physical pages it got, by up to ~10% from one "
        "build to the next, for every implementation alike; pooling passes over several "
        "builds (whose pages are recycled among the implementations) averages that out.",
        "prmem RO: protect() seals the memfd and re-maps the chunk read-only, dropping its "
        "page-table entries; the pages stay in memory (shmem) but the first read maps them back "
        f"in: {fmt_num(ro.get('first_faults'))} minor faults (the kernel maps up to 16 "
        "neighbouring pages per fault) and +"
        f"{(ro.get('first_rss_growth_bytes') or 0) / MiB:.0f} MiB RSS in the first pass, "
        f"{fmt_ratio(ro.get('first_over_steady'))} the steady-state time. prmem WR keeps its "
        "page-table entries (mprotect only) and has no such first-pass cost.",
        "'huge pages' = bytes of the buffer's mappings backed by transparent huge pages "
        "(/proc/self/smaps). numpy asks for them (madvise(MADV_HUGEPAGE)) on large arrays "
        f"and got {_mib(by.get('numpy', {}).get('huge_page_bytes'))} MiB here; prmem's memfd "
        "(shmem) mapping, the bytearray, the naive mapping and the numpy array with huge pages "
        f"switched off use 4 KiB pages (THP for shmem is '{_thp('shmem_enabled')}' on this "
        "machine), which can cost a few percent of read bandwidth in TLB misses. Against the "
        "best peer with 4 KiB pages prmem RO takes "
        f"{fmt_ratio(_vs_small_pages(rows, 'prmem_ro'))} and prmem WR "
        f"{fmt_ratio(_vs_small_pages(rows, 'prmem_wr'))} of its time.",
    ]
    extra = {"prmem_ro_over_best_4k_peer": _vs_small_pages(rows, "prmem_ro"),
             "prmem_wr_over_best_4k_peer": _vs_small_pages(rows, "prmem_wr"),
             "prmem_ro_first_over_steady": ro.get("first_over_steady")}
    return {"rows": rows, "targets": targets, "extra_ratios": extra, "notes": notes,
            "size_bytes": SIZE,
            "dtype": "int64", "reps": reps, "passes": passes}


def _mib(value: Optional[int]) -> str:
    return "—" if value is None else f"{value / MiB:,.0f}"


def _thp(name: str) -> str:
    from .protect import _thp_mode

    return _thp_mode(name)


def _vs_small_pages(rows: List[Dict[str, Any]], key: str) -> Optional[float]:
    """Steady-state time of ``key`` / the best peer without huge pages."""
    mine = next((r["steady_ms"] for r in rows if r["impl"] == key), None)
    peers_ms = [r["steady_ms"] for r in rows if r["is_peer"] and r["steady_ms"]
                and not r.get("huge_page_bytes")]
    return ratio(mine, min(peers_ms)) if peers_ms else None


# ----------------------------------------------------------------- output


def markdown(result: Dict[str, Any]) -> str:
    out = [f"## {TITLE}", ""]
    if result.get("skipped"):
        return "\n".join(out + [f"- {n}" for n in result["notes"]]) + "\n"
    rows = []
    for r in result["rows"]:
        rng = ("—" if r["build_min_ms"] is None
               else f"{fmt_num(r['build_min_ms'])}–{fmt_num(r['build_max_ms'])}")
        rows.append([r["label"], r["steady_ms"], rng, r["steady_GBps"],
                     fmt_ratio(r.get("ratio_vs_best_peer")), fmt_ratio(r.get("ratio_vs_numpy")),
                     r["first_ms"], fmt_ratio(r.get("first_ratio_vs_numpy")), r["first_faults"],
                     "—" if r["first_rss_growth_bytes"] is None
                     else f"{r['first_rss_growth_bytes'] / MiB:,.1f}",
                     r["second_ms"],
                     "—" if r["huge_page_bytes"] is None else f"{r['huge_page_bytes'] / MiB:,.0f}",
                     "yes" if r["read_only_array"] else ("no" if r["read_only_array"] is not None
                                                         else "—"),
                     r["error"] or ""])
    out.append(md_table(["implementation", "steady ms (median)", "per-build range ms", "GB/s",
                         "vs best peer", "vs numpy", "first pass ms", "first vs numpy's first",
                         "first-pass faults", "first-pass RSS growth MiB", "second pass ms",
                         "huge pages MiB", "read-only array", "error"], rows))
    out += ["", targets_table(result["targets"]), ""]
    x = result.get("extra_ratios", {})
    out.append("Other ratios (steady state): prmem RO / best peer with 4 KiB pages "
               f"{fmt_ratio(x.get('prmem_ro_over_best_4k_peer'))}, prmem WR / best peer with "
               f"4 KiB pages {fmt_ratio(x.get('prmem_wr_over_best_4k_peer'))}; prmem RO first "
               f"pass / its steady state {fmt_ratio(x.get('prmem_ro_first_over_steady'))}.")
    out += ["", "Notes:", ""]
    out += [f"- {n}" for n in result["notes"]]
    out += [f"- {r['label']}: {r['how']}" for r in result["rows"]]
    return "\n".join(out) + "\n"


def summary(result: Dict[str, Any]) -> List[List[str]]:
    if result.get("skipped"):
        return [["read", "skipped (numpy not installed)"]]
    rows = []
    for r in result["rows"]:
        value = (f"steady {fmt_num(r['steady_ms'])} ms ({fmt_ratio(r.get('ratio_vs_numpy'))} "
                 f"of numpy), first pass {fmt_num(r['first_ms'])} ms"
                 if r["steady_ms"] is not None else (r["error"] or "no samples"))
        rows.append([f"read {r['impl']}", value])
    for t in result["targets"]:
        rows.append([t["name"], f"{fmt_ratio(t['value'])} (target {t['target']}: "
                     f"{'—' if t['met'] is None else ('met' if t['met'] else 'NOT met')})"])
    return rows


def plot(result: Dict[str, Any], out_dir: str, plt: Any) -> List[str]:
    rows = [r for r in result["rows"] if r["steady_ms"] is not None]
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(9, 4.6))
    ys = list(range(len(rows)))
    h = 0.38
    ax.barh([y - h / 2 for y in ys], [r["first_ms"] for r in rows], height=h,
            color="tab:orange", label="first pass after write + protect")
    ax.barh([y + h / 2 for y in ys], [r["steady_ms"] for r in rows], height=h,
            color="tab:blue", label="steady state (median)")
    ax.set_yticks(ys)
    ax.set_yticklabels([r["label"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"ms per sum() of {result['size_bytes'] // MiB} MiB")
    ax.set_title("read: numpy sum() over protected and ordinary memory")
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    ax.grid(True, axis="x", alpha=0.3)
    path = save_figure(plt, fig, out_dir, "read")
    return [path]
