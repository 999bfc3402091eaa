"""rare_write: latency of one 8-byte update of write-protected memory.

Each implementation owns one page of protected data and changes its first
8 bytes:

* prmem ``pool.rare_write(a, data)`` on a protected WR pool (pwrite() on the
  pool's memfd; the mapping stays read-only in every thread), and the
  module-level ``prmem.rare_write(a, data)`` (same, through the Python
  wrapper);
* libsodium: ``sodium_mprotect_readwrite(p)``, ``memcpy(p, data, 8)``,
  ``sodium_mprotect_readonly(p)`` on ``sodium_malloc(4080)`` (4080 B + the
  16-byte canary fill exactly the one page that sodium_mprotect_* changes);
* naive: ``mprotect(PROT_READ|PROT_WRITE)``, ``memcpy``,
  ``mprotect(PROT_READ)`` on one mmap()ed page;
* ``bytearray`` slice assignment ``ba[0:8] = data``: no protection, the
  floor.

Each is measured alone and with one concurrent reader thread (see
``harness.BufferReader``): the reader, pinned to the other CPU, keeps
summing the same protected page with numpy (a stride-0 view repeats the page
so that one ``sum()`` reads it thousands of times with the GIL released).
While it runs, the page is in the reader CPU's TLB, so every mprotect() that
removes write permission must interrupt that CPU (TLB shootdown); prmem's
pwrite() changes no page table.

Per-call latencies are individual ``perf_counter_ns`` readings around one
update (each includes one clock read, reported as "clock read" in the
machine table); "batch mean" is the mean over uninterrupted batches, without
per-call clock reads.

Before/after (issue 14): ``pool.rare_write(a, data)`` of 8 bytes on a
protected WR pool, timed in subprocesses against the builds of earlier
revisions and this tree (``benchmarks.baseline``); skipped in quick runs.
"""
from __future__ import annotations

import ctypes
import os
import sys
from array import array
from typing import Any, Callable, Dict, List, Optional

import prmem

from .. import baseline, peers
from ..harness import (PAGE_SIZE, Budget, BufferReader, RunContext, batch_loop, gc_paused,
                       new_samples, per_call_loop, ratio, summarize, usable_cpus)
from ..report import fmt_num, fmt_ratio, md_table, save_figure, targets_table

NAME = "rare_write"
TITLE = "rare_write — one 8-byte update of write-protected memory"
DATA = b"prmem!\x01\x02"
CHUNK = 2000
#: sys.setswitchinterval() while the reader runs: how long the reader waits
#: for the GIL between passes (default 5 ms).
SWITCH_INTERVAL_S = 0.0002

#: The before/after script (``benchmarks.baseline``): the update of the
#: "prmem pool.rare_write" row, alone, in a batch loop.  Only API every
#: baseline revision has.
BASELINE_STATEMENT = ("rw(x, d): rw = pool.rare_write of a protected Pool(Mode.WR), "
                      "x = a page-aligned 4 KiB allocation, d = 8 bytes")
BASELINE_SCRIPT = """
p = Pool(Mode.WR, refill=65536)
x = p.alloc(4096, align_order=12)
p.protect()
def measure(n, rw=p.rare_write, x=x, d=%r):
    t = time.perf_counter_ns()
    for _ in range(n):
        rw(x, d)
    t = time.perf_counter_ns() - t
    if bytes(memoryview(x)[:8]) != d:
        raise SystemExit("the rare write did not land")
    return t
""" % (DATA,)
BASELINE_CALLS = 50_000


class Target:
    """One protected page and the statement that updates it."""

    def __init__(self, key: str, label: str, stmt: str, names: List[str], values: List[Any],
                 buffer: Any, readback: Callable[[], bytes], protected_bytes: int,
                 teardown: Callable[[], None], note: str, is_peer: bool = True) -> None:
        self.key = key
        self.label = label
        self.per_call = per_call_loop(stmt, names, label=f"rare_write {key}")
        self.batch = batch_loop(stmt, names, label=f"rare_write batch {key}")
        self.values = values
        self.buffer = buffer
        self.readback = readback
        self.protected_bytes = protected_bytes
        self.teardown = teardown
        self.note = note
        self.is_peer = is_peer
        self.samples: Dict[int, array] = {0: array("q"), 1: array("q")}
        self.batch_ns: Dict[int, int] = {0: 0, 1: 0}
        self.batch_calls: Dict[int, int] = {0: 0, 1: 0}
        self.reader: Dict[int, List[Dict[str, float]]] = {0: [], 1: []}
        self.error: Optional[str] = None


def _vma_size(addr: int) -> Optional[int]:
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split(None, 1)[0].split("-"))
            if lo <= addr < hi:
                return hi - lo
    return None


def _targets(ctx: RunContext) -> List[Target]:
    out: List[Target] = []
    data = DATA

    pool = prmem.Pool(prmem.Mode.WR, name="bench-rw", refill=65536)
    a = pool.alloc(PAGE_SIZE, align_order=12)
    pool.protect()
    view = memoryview(a)

    def prmem_teardown() -> None:
        view.release()
        pool.destroy()
    out.append(Target("prmem", "prmem pool.rare_write", "rw(a, d)", ["rw", "a", "d"],
                      [pool.rare_write, a, data], view, lambda: bytes(view[0:8]), PAGE_SIZE,
                      prmem_teardown, "WR pool, protected; pwrite() on the pool's memfd",
                      is_peer=False))
    out.append(Target("prmem_module", "prmem.rare_write (module function)", "rw(a, d)",
                      ["rw", "a", "d"], [prmem.rare_write, a, data], view,
                      lambda: bytes(view[0:8]), PAGE_SIZE, lambda: None,
                      "the same write through the module-level Python wrapper",
                      is_peer=False))
    try:
        s = peers.get("sodium")
        libc = peers.get("libc")
        size = PAGE_SIZE - 16  # + libsodium's 16-byte canary = exactly one page
        p = s.malloc(size)
        if not p:
            raise peers.PeerUnavailable("sodium_malloc returned NULL")
        s.mprotect_readonly(p)
        sbuf = (ctypes.c_char * size).from_address(p)
        vma = _vma_size(p)
        out.append(Target(
            "sodium", "libsodium mprotect toggle",
            "rw(p)\ncopy(p, d, 8)\nro(p)", ["rw", "copy", "ro", "p", "d"],
            [s.mprotect_readwrite, libc.memcpy, s.mprotect_readonly, p, data], sbuf,
            lambda: ctypes.string_at(p, 8), vma or 0, lambda: s.free(p),
            f"libsodium {s.version}: sodium_malloc({size}); sodium_mprotect_readwrite, "
            f"memcpy, sodium_mprotect_readonly (VMA of {vma} B)"))
    except peers.PeerUnavailable as exc:
        ctx.skip(NAME, "libsodium toggle", str(exc))
    try:
        libc = peers.get("libc")
        page = libc.map_page(PAGE_SIZE)
        libc.mprotect(page, PAGE_SIZE, peers.PROT_READ)
        nbuf = (ctypes.c_char * PAGE_SIZE).from_address(page)
        out.append(Target(
            "naive", "naive mprotect toggle",
            "mprotect(p, n, rw)\ncopy(p, d, 8)\nmprotect(p, n, ro)",
            ["mprotect", "copy", "p", "n", "rw", "ro", "d"],
            [libc.mprotect, libc.memcpy, page, PAGE_SIZE, peers.PROT_READ | peers.PROT_WRITE,
             peers.PROT_READ, data], nbuf, lambda: ctypes.string_at(page, 8), PAGE_SIZE,
            lambda: libc.munmap(page, PAGE_SIZE),
            "one mmap()ed page; mprotect RW, memcpy, mprotect RO (libc via ctypes)"))
    except peers.PeerUnavailable as exc:
        ctx.skip(NAME, "naive mprotect toggle", str(exc))
    ba = bytearray(PAGE_SIZE)
    out.append(Target("bytearray", "bytearray slice write (unprotected)", "ba[0:8] = d",
                      ["ba", "d"], [ba, data], ba, lambda: bytes(ba[0:8]), 0, lambda: None,
                      "no protection at all: the floor"))
    return out


def _measure(t: Target, readers: int, seconds: float, min_calls: int, max_calls: int,
             reader_cpu: Optional[int], pass_ms: float) -> None:
    reader = None
    old_interval = sys.getswitchinterval()
    if readers:
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        reader = BufferReader(t.buffer, cpu=reader_cpu, pass_ms=pass_ms)
        reader.start_and_wait()
        if reader.error is not None:
            raise RuntimeError(f"reader thread failed: {reader.error!r}")
    out = new_samples(CHUNK)
    try:
        with gc_paused():
            t.per_call(200, out, *t.values)  # warm-up
            first = reader.snapshot() if reader else None
            budget = Budget(seconds, min_calls // CHUNK, max_calls // CHUNK)
            taken = 0
            while budget.more(taken):
                t.per_call(CHUNK, out, *t.values)
                t.samples[readers].extend(out)
                t.batch_ns[readers] += t.batch(CHUNK, *t.values)
                t.batch_calls[readers] += CHUNK
                taken += 1
            if reader:
                t.reader[readers].append(reader.throughput(first, reader.snapshot()))
    finally:
        if reader:
            reader.stop()
        sys.setswitchinterval(old_interval)
    got = t.readback()
    if got != DATA:
        t.error = f"read back {got!r} after the writes, expected {DATA!r}"


def _warm_up(targets: List[Target], seconds: float) -> None:
    """Run every update untimed for a while first: the first target measured
    should not pay for cold caches or a CPU still ramping up its clock."""
    out = new_samples(CHUNK)
    with gc_paused():
        for t in targets:
            budget = Budget(seconds / len(targets), 1, 10_000)
            taken = 0
            while budget.more(taken):
                t.per_call(CHUNK, out, *t.values)
                taken += 1


def run(ctx: RunContext) -> Dict[str, Any]:
    cpus = usable_cpus()
    writer_cpu = cpus[0] if len(cpus) >= 2 else None
    reader_cpu = cpus[1] if len(cpus) >= 2 else None
    try:
        import numpy  # noqa: F401
        have_numpy = True
    except ImportError:
        have_numpy = False
        ctx.skip(NAME, "the runs with a concurrent reader", "numpy is not installed")
    notes: List[str] = []
    if len(cpus) < 2:
        notes.append("Only one usable CPU: the reader shares the writer's CPU, so no TLB "
                     "shootdown IPI is needed and the reader rows mostly show time slicing.")
    rounds = ctx.pick(1, 4)
    seconds = ctx.pick(0.25, 4.0)
    min_calls = ctx.pick(4000, 20000)
    max_calls = ctx.pick(400_000, 2_000_000)
    pass_ms = ctx.pick(10.0, 20.0)
    reader_configs = [0, 1] if have_numpy else [0]
    ctx.log(f"[{NAME}] 8-byte updates, alone and with 1 reader "
            f"(writer CPU {writer_cpu}, reader CPU {reader_cpu}) ...")
    targets = _targets(ctx)
    old_affinity = None
    if writer_cpu is not None:
        old_affinity = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {writer_cpu})
    try:
        _warm_up(targets, seconds=ctx.pick(0.2, 0.5))
        for _ in range(rounds):
            for t in targets:
                for readers in reader_configs:
                    if t.error:
                        continue
                    try:
                        _measure(t, readers, seconds / rounds, min_calls // rounds,
                                 max_calls // rounds, reader_cpu, pass_ms)
                    except Exception as exc:  # a peer misbehaving: report, go on
                        t.error = f"{type(exc).__name__}: {exc}"
    finally:
        if old_affinity is not None:
            os.sched_setaffinity(0, old_affinity)
        for t in targets:
            try:
                t.teardown()
            except Exception as exc:  # pragma: no cover - reported
                t.error = (t.error or "") + f" teardown: {exc!r}"
    result = _result(targets, reader_configs, notes, writer_cpu, reader_cpu, pass_ms)
    before_after = baseline.compare(ctx, NAME, "rare_write 8 B", BASELINE_STATEMENT,
                                    BASELINE_SCRIPT, BASELINE_CALLS)
    result["targets"] += baseline.targets(before_after)
    result["before_after"] = before_after
    low = [r for r in result["rows"] if r["readers"] and r.get("reader_on_cpu") is not None
           and r["reader_on_cpu"] < 0.8]
    if low:
        worst = min(r["reader_on_cpu"] for r in low)
        message = (f"the reader thread was on its CPU only {worst:.0%} of the time in some "
                   "runs (another process wanted that CPU): the with-reader numbers of the "
                   "mprotect-based peers understate the TLB-shootdown cost; rerun on a "
                   "quiet machine")
        result["notes"].append("Warning: " + message + ".")
        ctx.log(f"[{NAME}] warning: {message}")
    return result


def _result(targets: List[Target], reader_configs: List[int], notes: List[str],
            writer_cpu: Optional[int], reader_cpu: Optional[int], pass_ms: float) -> Dict[str, Any]:
    rows = []
    med: Dict[tuple, Optional[float]] = {}
    for t in targets:
        for readers in reader_configs:
            s = summarize(t.samples[readers])
            rd = t.reader[readers]
            row = {
                "impl": t.key, "label": t.label, "readers": readers, "is_peer": t.is_peer,
                "median_ns": s["median"], "p99_ns": s["p99"], "min_ns": s["min"],
                "max_ns": s["max"], "calls": s["n"],
                "batch_mean_ns": (t.batch_ns[readers] / t.batch_calls[readers]
                                  if t.batch_calls[readers] else None),
                "protected_bytes": t.protected_bytes, "error": t.error, "note": t.note,
            }
            if rd:
                passes = sum(x["passes"] for x in rd)
                row["reader_read_GBps"] = summarize([x["read_GBps"] for x in rd])["median"]
                row["reader_speed"] = summarize([x["speed"] for x in rd])["median"]
                on_cpu = [x["on_cpu"] for x in rd if x["on_cpu"] is not None]
                row["reader_on_cpu"] = summarize(on_cpu)["median"] if on_cpu else None
                row["reader_passes"] = passes
                row["reader_pass_ms_solo"] = rd[0]["pass_ms_solo"]
            rows.append(row)
            med[(t.key, readers)] = s["median"] if s["n"] else None
    for row in rows:
        readers = row["readers"]
        prm = med.get(("prmem", readers))
        peer_meds = [med[(t.key, readers)] for t in targets
                     if t.is_peer and med.get((t.key, readers)) is not None]
        if row["calls"]:
            row["ratio_vs_best_peer"] = (ratio(row["median_ns"], min(peer_meds))
                                         if peer_meds else None)
        if row["impl"] != "prmem" and row["calls"]:
            row["ratio_vs_prmem"] = ratio(row["median_ns"], prm)

    def m(key: str, readers: int) -> Optional[float]:
        return med.get((key, readers))

    tg = [
        {"name": "prmem rare_write median, alone", "value": m("prmem", 0), "unit": "ns",
         "target": "≤ 1,000 ns", "met": None if m("prmem", 0) is None else m("prmem", 0) <= 1000,
         "description": "median of single-call latencies (includes one clock read)"},
        _t("libsodium toggle / prmem, alone", ratio(m("sodium", 0), m("prmem", 0)), "≥ 5×", 5.0,
           "median latency, no other thread"),
    ]
    if 1 in reader_configs:
        tg.append(_t("libsodium toggle / prmem, 1 reader", ratio(m("sodium", 1), m("prmem", 1)),
                     "≥ 15×", 15.0, "median latency while a reader thread reads the page"))
    p99: Dict[tuple, Optional[float]] = {
        (r["impl"], r["readers"]): r["p99_ns"] if r["calls"] else None for r in rows}
    extra = {
        "sodium_over_prmem_p99_alone": ratio(p99.get(("sodium", 0)), p99.get(("prmem", 0))),
        "sodium_over_prmem_p99_reader": ratio(p99.get(("sodium", 1)), p99.get(("prmem", 1))),
        "naive_over_prmem_alone": ratio(m("naive", 0), m("prmem", 0)),
        "naive_over_prmem_reader": ratio(m("naive", 1), m("prmem", 1)),
        "prmem_over_bytearray_alone": ratio(m("prmem", 0), m("bytearray", 0)),
        "prmem_reader_over_alone": ratio(m("prmem", 1), m("prmem", 0)),
        "sodium_reader_over_alone": ratio(m("sodium", 1), m("sodium", 0)),
        "naive_reader_over_alone": ratio(m("naive", 1), m("naive", 0)),
    }
    notes = notes + [
        "Latencies are single calls timed with time.perf_counter_ns from Python; they include "
        "the Python call and one clock read. 'batch mean' times uninterrupted batches instead.",
        "The peers run from Python through ctypes.PyDLL (GIL kept): three foreign calls per "
        "update for the toggles, one C method call for prmem.",
        f"Reader: a thread pinned to CPU {reader_cpu} (writer pinned to CPU {writer_cpu}) "
        f"looping numpy .sum() over a stride-0 view that repeats the protected page "
        f"(~{pass_ms:.0f} ms per pass, GIL released inside each pass; switch interval "
        f"{SWITCH_INTERVAL_S * 1e3:g} ms while it runs, so it gets the GIL back quickly). "
        "'reader on-CPU' = its thread CPU time / wall time: the share of the window it was "
        "running, which is when an mprotect() must interrupt its CPU. 'reader speed' = its "
        "read rate relative to running alone; the unprotected bytearray row is the control "
        "for slowdowns that have nothing to do with protection (on a VM, a busy sibling "
        "vCPU alone can halve it).",
        f"Python {sys.version.split()[0]}: the reader needs the GIL for a few bytecodes "
        "between passes, so about once per pass the writer hands the GIL over; these rare "
        "hand-offs show up as outliers (max_ns in latest.json).",
    ]
    return {"rows": rows, "targets": tg, "extra_ratios": extra, "notes": notes,
            "data": DATA.hex(), "writer_cpu": writer_cpu, "reader_cpu": reader_cpu}


def _t(name: str, value: Optional[float], target: str, floor: float,
       description: str) -> Dict[str, Any]:
    return {"name": name, "value": value, "target": target,
            "met": None if value is None else value >= floor, "description": description}


def markdown(result: Dict[str, Any]) -> str:
    out = [f"## {TITLE}", ""]
    rows = []
    for r in result["rows"]:
        vs = "" if r["impl"] == "prmem" else fmt_ratio(r.get("ratio_vs_prmem"))
        rows.append([r["label"], "1" if r["readers"] else "0",
                     r["median_ns"] if r["calls"] else "—", r["p99_ns"] if r["calls"] else "—",
                     r["batch_mean_ns"], f"{r['calls']:,}", fmt_ratio(r.get("ratio_vs_best_peer")),
                     vs,
                     "—" if r.get("reader_on_cpu") is None else f"{r['reader_on_cpu']:.2f}",
                     "—" if r.get("reader_speed") is None else f"{r['reader_speed']:.2f}",
                     "—" if r.get("reader_read_GBps") is None else f"{r['reader_read_GBps']:.1f}",
                     r["error"] or ""])
    out.append(md_table(["implementation", "readers", "median ns", "p99 ns", "batch mean ns",
                         "calls", "vs best peer", "vs prmem", "reader on-CPU", "reader speed",
                         "reader GB/s", "error"], rows))
    out += ["", targets_table(result["targets"]), ""]
    x = result["extra_ratios"]
    out.append(
        "Other ratios: libsodium toggle/prmem at p99 alone "
        f"{fmt_ratio(x['sodium_over_prmem_p99_alone'])}, with reader "
        f"{fmt_ratio(x['sodium_over_prmem_p99_reader'])}; naive toggle/prmem alone "
        f"{fmt_ratio(x['naive_over_prmem_alone'])}, with reader "
        f"{fmt_ratio(x['naive_over_prmem_reader'])}; prmem/bytearray alone "
        f"{fmt_ratio(x['prmem_over_bytearray_alone'])}; slowdown from the reader: prmem "
        f"{fmt_ratio(x['prmem_reader_over_alone'])}, libsodium "
        f"{fmt_ratio(x['sodium_reader_over_alone'])}, naive "
        f"{fmt_ratio(x['naive_reader_over_alone'])}.")
    before_after = baseline.markdown(result.get("before_after"))
    if before_after:
        out += [""] + before_after
    out += ["", "Notes:", ""] + [f"- {n}" for n in result["notes"]]
    seen = set()
    for r in result["rows"]:
        if r["label"] not in seen and r.get("note"):
            seen.add(r["label"])
            out.append(f"- {r['label']}: {r['note']}")
    return "\n".join(out) + "\n"


def summary(result: Dict[str, Any]) -> List[List[str]]:
    rows = []
    for r in result["rows"]:
        if r["impl"] == "prmem_module":
            continue
        value = (f"median {fmt_num(r['median_ns'])} ns, p99 {fmt_num(r['p99_ns'])} ns"
                 if r["calls"] else (r["error"] or "no samples"))
        rows.append([f"rare_write {r['impl']} ({r['readers']} reader)", value])
    for t in result["targets"]:
        value = (fmt_num(t["value"]) + " ns") if t.get("unit") == "ns" else fmt_ratio(t["value"])
        rows.append([t["name"], f"{value} (target {t['target']}: "
                     f"{'—' if t['met'] is None else ('met' if t['met'] else 'NOT met')})"])
    return rows


def plot(result: Dict[str, Any], out_dir: str, plt: Any) -> List[str]:

    rows = [r for r in result["rows"] if r["calls"]]
    labels = []
    for r in rows:
        if r["label"] not in labels:
            labels.append(r["label"])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    height = 0.2
    for j, (readers, stat, color) in enumerate([(0, "median_ns", "tab:blue"),
                                                 (0, "p99_ns", "tab:cyan"),
                                                 (1, "median_ns", "tab:red"),
                                                 (1, "p99_ns", "tab:orange")]):
        xs, ys = [], []
        for i, label in enumerate(labels):
            for r in rows:
                if r["label"] == label and r["readers"] == readers:
                    xs.append(i + (j - 1.5) * height)
                    ys.append(r[stat])
        if xs:
            ax.barh(xs, ys, height=height, color=color,
                    label=f"{stat.split('_')[0]}, {readers} reader")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("ns per 8-byte update (log)")
    ax.set_title("rare_write: latency alone and with a concurrent reader")
    ax.legend(fontsize="small")
    path = save_figure(plt, fig, out_dir, "rare_write")
    return [path]
