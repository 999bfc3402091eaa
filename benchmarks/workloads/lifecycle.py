"""lifecycle: what a pool costs around its data (issue 12, "Lifecycle performance").

Seven measurements, each prmem side by side with its plain-Linux equivalent
in the same run:

1. fork: ``os.fork()`` + child ``os._exit(0)`` + parent ``waitpid``, timed in
   the parent, with 1 GiB (quick: 64 MiB) of written memory held as a
   protected WR pool, the same pool before protect() (writable), a sealed
   READ_ONLY pool, a bytearray, or nothing.  Separately, "fork + first
   change in the child": the child makes one 8-byte change (``rare_write``
   on a pool, a slice assignment on the bytearray) and reports through a
   pipe when it was done; the parent's clock reading before fork() is the
   start (``perf_counter_ns`` is CLOCK_MONOTONIC, one clock for both
   processes).  The child's own part (fork() returned → change done) is
   reported too: if the copy of the child's pool memory becomes lazy (copy
   on first change), cost moves from "fork+exit" to that column.  Runs in a
   fresh child interpreter, one subject in memory at a time, so each fork
   copies only the page tables of the subject and a small Python process.
2. destroy: ``pool.destroy()`` of a written, unsealed pool against
   ``mmap.mmap(-1, n).close()`` (Python's default: a MAP_SHARED anonymous
   mapping), a MAP_PRIVATE anonymous mapping and a memfd mapping
   (``close()`` of the mapping + ``os.close`` of the descriptor).
3. the GIL during large rare writes: the main thread writes 8 B, 64 KiB or
   1 MiB in a loop while a second Python thread "ticks" (reads the clock in
   a loop and records every gap longer than 5 µs: a stall, when it could
   not run); prmem ``rare_write`` against ``os.pwrite`` to a memfd (releases
   the GIL) and libc ``pwrite`` called through ``ctypes.PyDLL`` (same
   syscall, GIL held: the control for "not released").
4. two threads rare-writing 8 B to two pools: total writes/s with one
   thread and with two, against two threads ``os.pwrite``-ing 8 B to two
   memfds (the GIL-bound floor).
5. protect() + first read: a written 64 MiB (quick: 8 MiB) prmem RO pool
   ``protect()``ed and then summed once with numpy, timed as one figure,
   against an anonymous mapping ``mprotect(PROT_READ)``ed and summed; then
   the steady-state sum of each.
6. rare_write 8 B against a C loop of ``pwrite()`` (a small shared library
   compiled at run time with the system ``cc``; skipped without one) and
   ``os.pwrite`` from Python.
7. the shmem transparent-huge-page setting, and whether the pool's memory
   got huge pages.
"""
from __future__ import annotations

import ctypes
import gc
import json
import mmap
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from array import array
from typing import Any, Callable, Dict, List, Optional, Tuple

import prmem

from .. import peers
from ..harness import (Budget, CpuLoadProbe, RunContext, _bracketed, batch_loop, child_env,
                       gc_paused, minor_faults, perf_ns, ratio, smaps_range, summarize)
from ..report import (NOISY_LOAD, fmt_num, fmt_ratio, fmt_target_value, md_table, save_figure,
                      targets_table)

NAME = "lifecycle"
TITLE = ("lifecycle — fork, destroy, large rare writes and the GIL, two writer threads, "
         "protect() + first read, the pwrite floor")
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
FILL = 0x01
DATA8 = b"prmem!\x01\x02"
#: A gap in the ticker thread's clock readings longer than this is a stall.
STALL_NS = 5000
GIL_SIZES = (8, 64 * KiB, MiB)
CHUNK = 2000

_C_SOURCE = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* n pwrite()s of 8 bytes at offset 0 of fd; ns per call, or -1 on error */
double pwrite_loop(int fd, int n)
{
    static const char data[8] = "prmem!\x01\x02";
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < n; i++)
        if (pwrite(fd, data, sizeof data, 0) != (ssize_t)sizeof data)
            return -1.0;
    clock_gettime(CLOCK_MONOTONIC, &b);
    return ((double)(b.tv_sec - a.tv_sec) * 1e9 + (double)(b.tv_nsec - a.tv_nsec)) / n;
}

/* The same, each pwrite() preceded by the identity check prmem makes before
 * every rare write: with want_statx, statx() of the descriptor for its
 * inode alone (as prmem; fstat() where statx() with a NULL path is
 * refused), else fstat(), which also reads the change time (why prmem does
 * not use it); then a comparison with the inode seen first. */
static int identity(int fd, int use_statx, unsigned long long *ino)
{
#ifdef SYS_statx
    if (use_statx) {
        struct statx sx;
        if (syscall(SYS_statx, fd, (const char *)0, AT_EMPTY_PATH, STATX_INO, &sx) < 0)
            return -1;
        *ino = sx.stx_ino;
        return 0;
    }
#endif
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -1;
    *ino = st.st_ino;
    return 0;
}

double identity_pwrite_loop(int fd, int n, int want_statx)
{
    static const char data[8] = "prmem!\x01\x02";
    unsigned long long first, ino;
    int use_statx = want_statx && identity(fd, 1, &first) == 0;
    if (!use_statx && identity(fd, 0, &first) < 0)
        return -1.0;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < n; i++) {
        if (identity(fd, use_statx, &ino) < 0 || ino != first)
            return -1.0;
        if (pwrite(fd, data, sizeof data, 0) != (ssize_t)sizeof data)
            return -1.0;
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    return ((double)(b.tv_sec - a.tv_sec) * 1e9 + (double)(b.tv_nsec - a.tv_nsec)) / n;
}
"""


def _size(n: int) -> str:
    if n >= GiB and n % GiB == 0:
        return f"{n // GiB} GiB"
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB} MiB"
    if n >= KiB and n % KiB == 0:
        return f"{n // KiB} KiB"
    return f"{n} B"


def _ms(ns: Optional[float]) -> Optional[float]:
    return None if ns is None else ns / 1e6


def _us(ns: Optional[float]) -> Optional[float]:
    return None if ns is None else ns / 1e3


def _row(section: str, group: str, impl: str, label: str, samples: Any, is_peer: bool,
         note: str = "", error: Optional[str] = None, **extra: Any) -> Dict[str, Any]:
    s = summarize(samples)
    row = {"section": section, "group": group, "impl": impl, "label": label,
           "is_peer": is_peer, "n": s["n"],
           "median_ns": s["median"] if s["n"] else None,
           "p99_ns": s["p99"] if s["n"] else None,
           "min_ns": s["min"] if s["n"] else None,
           "max_ns": s["max"] if s["n"] else None,
           "error": error, "note": note}
    row.update(extra)
    return row


def _add_ratios(rows: List[Dict[str, Any]]) -> None:
    """ratio_vs_best_peer within each (section, group), on median_ns."""
    best: Dict[Tuple[str, str], float] = {}
    for r in rows:
        if r["is_peer"] and r["median_ns"] is not None:
            key = (r["section"], r["group"])
            best[key] = min(best.get(key, r["median_ns"]), r["median_ns"])
    for r in rows:
        r["ratio_vs_best_peer"] = ratio(r["median_ns"], best.get((r["section"], r["group"])))


def _median(rows: List[Dict[str, Any]], section: str, group: str, impl: str) -> Optional[float]:
    for r in rows:
        if r["section"] == section and r["group"] == group and r["impl"] == impl:
            return r["median_ns"]
    return None


def _target(name: str, value: Any, target: str, met: Optional[bool], description: str,
            unit: Optional[str] = None) -> Dict[str, Any]:
    t = {"name": name, "value": value, "target": target, "met": met,
         "description": description}
    if unit:
        t["unit"] = unit
    return t


def _fill(addr_or_buf: Any, size: int) -> None:
    ctypes.memset(addr_or_buf, FILL, size)


def _fill_buffer(obj: Any, size: int) -> None:
    """Write every byte of a writable Python buffer (bytearray, mmap)."""
    cbuf = (ctypes.c_char * size).from_buffer(obj)
    ctypes.memset(cbuf, FILL, size)
    del cbuf  # the export ends here: mmap.close() refuses while it lives


# ------------------------------------------------------------------ 1. fork

FORK_SUBJECTS = [
    ("nothing", "nothing (a small Python process)", False,
     "the floor: fork() of this interpreter with no large memory"),
    ("bytearray", "bytearray, written", True,
     "anonymous private memory: fork() copies its page tables; the child's first "
     "change copies one page (copy on write)"),
    ("pool_writable", "prmem Pool(WR), written, not protected", False,
     "the same pool as the next row, before protect(): WRITABLE areas"),
    ("pool_wr", "prmem Pool(WR), written, protect()ed (write-rare)", False,
     "WRITE_RARE areas; the child's change is a rare_write (pwrite on its memfd)"),
    ("pool_ro", "prmem Pool(RO), written, protect()ed (sealed READ_ONLY)", False,
     "sealed chunks stay shared with the child: nothing to copy; no change possible"),
]


def fork_child_main(argv: List[str]) -> int:
    """Entry point of the child interpreter that runs the fork measurements;
    prints one JSON line."""
    size, reps, rounds = (int(x) for x in argv[:3])
    with gc_paused():
        out = _fork_measure(size, reps, rounds)
    print(json.dumps(out))
    return 0


def _fork_exit() -> Tuple[int, int]:
    """(fork()+exit+waitpid ns, fork() call ns in the parent)."""
    t0 = perf_ns()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    t1 = perf_ns()
    _, status = os.waitpid(pid, 0)
    t2 = perf_ns()
    if status != 0:
        raise RuntimeError(f"fork child exited with status {status:#x}")
    return t2 - t0, t1 - t0


def _fork_change(change: Callable[[], None], readback: Callable[[], bytes]) -> Tuple[int, int, int]:
    """Fork; the child makes its first change and reports its clock
    readings.  Returns (parent's t0 → change done in the child, child's
    fork() return → change done, fork+change+exit+waitpid in the parent)."""
    r, w = os.pipe()
    t0 = perf_ns()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            t1 = perf_ns()
            change()
            t2 = perf_ns()
            ok = readback() == DATA8
            os.write(w, struct.pack("qq?", t1, t2, ok))
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        data = b""
        while True:
            part = os.read(r, 64)
            if not part:
                break
            data += part
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    t3 = perf_ns()
    if status != 0 or len(data) != struct.calcsize("qq?"):
        raise RuntimeError(f"fork child failed (status {status:#x}, {len(data)} bytes reported)")
    t1, t2, ok = struct.unpack("qq?", data)
    if not ok:
        raise RuntimeError("the child did not read back its own change")
    return t2 - t0, t2 - t1, t3 - t0


def _fork_measure(size: int, reps: int, rounds: int) -> Dict[str, Any]:
    samples: Dict[str, Dict[str, List[int]]] = {
        key: {"exit": [], "fork_call": [], "change_total": [], "change_child": [],
              "change_exit": []} for key, *_ in FORK_SUBJECTS}
    errors: Dict[str, str] = {}
    checks: Dict[str, Any] = {}

    def measure(key: str, change: Optional[Callable[[], None]] = None,
                readback: Optional[Callable[[], bytes]] = None,
                parent_view: Optional[Callable[[], bytes]] = None) -> None:
        if key in errors:
            return
        s = samples[key]
        try:
            _fork_exit()  # warm-up, untimed: the first copy meets fresh memory
            for _ in range(reps):
                total, call = _fork_exit()
                s["exit"].append(total)
                s["fork_call"].append(call)
                if change is not None:
                    whole, child, with_exit = _fork_change(change, readback)
                    s["change_total"].append(whole)
                    s["change_child"].append(child)
                    s["change_exit"].append(with_exit)
            if parent_view is not None:
                # the child's changes must not show in the parent
                checks[f"{key}_parent_unchanged"] = parent_view() == bytes([FILL]) * 8
        except Exception as exc:
            errors[key] = f"{type(exc).__name__}: {exc}"

    for _ in range(rounds):
        measure("nothing")

        ba = bytearray(size)
        _fill_buffer(ba, size)

        def ba_change() -> None:
            ba[0:8] = DATA8
        measure("bytearray", ba_change, lambda: bytes(ba[0:8]), lambda: bytes(ba[0:8]))
        del ba

        pool = prmem.Pool(prmem.Mode.WR, name="bench-fork-wr")
        a = pool.alloc(size, align_order=12)
        _fill(a.address, size)
        rw = pool.rare_write
        addr = a.address
        measure("pool_writable", lambda: rw(a, DATA8), lambda: ctypes.string_at(addr, 8),
                lambda: ctypes.string_at(addr, 8))
        pool.protect()
        st = pool.stats()
        checks["pool_wr_write_rare"] = st.areas_by_state[prmem.State.WRITE_RARE] == st.areas
        measure("pool_wr", lambda: rw(a, DATA8), lambda: ctypes.string_at(addr, 8),
                lambda: ctypes.string_at(addr, 8))
        del a, rw
        pool.destroy()

        ro = prmem.Pool(prmem.Mode.RO, name="bench-fork-ro")
        b = ro.alloc(size, align_order=12)
        _fill(b.address, size)
        ro.protect()
        st = ro.stats()
        checks["pool_ro_sealed"] = st.sealed_chunks == st.chunks
        measure("pool_ro")
        del b
        ro.destroy()
    return {"samples": samples, "errors": errors, "checks": checks}


def _run_fork_child(size: int, reps: int, rounds: int) -> Dict[str, Any]:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "-c",
           "import sys\nfrom benchmarks.workloads.lifecycle import fork_child_main\n"
           "sys.exit(fork_child_main(sys.argv[1:]))", str(size), str(reps), str(rounds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=repo,
                          env=child_env())
    if proc.returncode != 0:
        raise RuntimeError(f"fork child interpreter failed: {proc.stderr.strip()[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _section_fork(ctx: RunContext, rows: List[Dict[str, Any]], info: Dict[str, Any]) -> None:
    size = ctx.pick(64 * MiB, GiB)
    reps = 3
    rounds = ctx.pick(1, 2)
    ctx.log(f"[{NAME}] fork with {_size(size)} of written memory, {rounds} round(s) of "
            f"{reps} (in a child interpreter) ...")
    got = _run_fork_child(size, reps, rounds)
    info["fork"] = {"size_bytes": size, "reps_per_round": reps, "rounds": rounds,
                    "checks": got["checks"], "errors": got["errors"]}
    for key, label, is_peer, note in FORK_SUBJECTS:
        s = got["samples"][key]
        err = got["errors"].get(key)
        rows.append(_row("fork", "fork+exit", key, label, s["exit"], is_peer, note, err,
                         size_bytes=size,
                         fork_call_median_ns=summarize(s["fork_call"])["median"]
                         if s["fork_call"] else None))
        if key in ("nothing", "pool_ro"):
            continue
        rows.append(_row("fork", "fork+first change", key, label, s["change_total"], is_peer,
                         note, err, size_bytes=size,
                         child_median_ns=summarize(s["change_child"])["median"]
                         if s["change_child"] else None,
                         with_exit_median_ns=summarize(s["change_exit"])["median"]
                         if s["change_exit"] else None))


# --------------------------------------------------------------- 2. destroy

def _destroy_subjects() -> List[Tuple[str, str, bool, Callable[[int], Callable[[], None]], str]]:
    def pool_setup(protect: bool) -> Callable[[int], Callable[[], None]]:
        def setup(size: int) -> Callable[[], None]:
            pool = prmem.Pool(prmem.Mode.WR, name="bench-destroy")
            a = pool.alloc(size, align_order=12)
            _fill(a.address, size)
            del a
            if protect:
                pool.protect()
            return pool.destroy
        return setup

    def mmap_setup(flags: Optional[int]) -> Callable[[int], Callable[[], None]]:
        def setup(size: int) -> Callable[[], None]:
            m = mmap.mmap(-1, size) if flags is None else mmap.mmap(-1, size, flags=flags)
            _fill_buffer(m, size)
            return m.close
        return setup

    def memfd_setup(size: int) -> Callable[[], None]:
        fd = os.memfd_create("bench-destroy", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size)  # keeps its own dup of fd

        def release() -> None:
            m.close()
            os.close(fd)
        _fill_buffer(m, size)
        return release

    return [
        ("prmem_writable", "prmem Pool(WR).destroy(), written, not protected", False,
         pool_setup(False), "unsealed pool of WRITABLE areas"),
        ("prmem_wr", "prmem Pool(WR).destroy(), written, protect()ed", False,
         pool_setup(True), "unsealed pool of WRITE_RARE areas"),
        ("mmap_shared", "mmap.mmap(-1, n).close() (MAP_SHARED anonymous)", True,
         mmap_setup(None), "Python's default anonymous mmap: MAP_SHARED, shmem-backed"),
        ("mmap_private", "mmap.mmap(-1, n, MAP_PRIVATE).close()", True,
         mmap_setup(mmap.MAP_PRIVATE), "ordinary anonymous private memory"),
        ("memfd", "memfd mapping: mmap.close() + os.close(fd)", True, memfd_setup,
         "a memfd (like a pool's) mapped MAP_SHARED; its pages go at the last close"),
    ]


def _section_destroy(ctx: RunContext, rows: List[Dict[str, Any]], info: Dict[str, Any]) -> None:
    size = ctx.pick(64 * MiB, GiB)
    rounds = ctx.pick(3, 3)
    subjects = _destroy_subjects()
    ctx.log(f"[{NAME}] destroy / munmap of {_size(size)} of written memory, {rounds} rounds ...")
    samples: Dict[str, List[int]] = {key: [] for key, *_ in subjects}
    errors: Dict[str, str] = {}
    with gc_paused():
        for rnd in range(rounds):
            order = subjects[rnd % len(subjects):] + subjects[:rnd % len(subjects)]
            for key, _label, _peer, setup, _note in order:
                if key in errors:
                    continue
                try:
                    release = setup(size)
                    t0 = perf_ns()
                    release()
                    samples[key].append(perf_ns() - t0)
                except Exception as exc:
                    errors[key] = f"{type(exc).__name__}: {exc}"
    info["destroy"] = {"size_bytes": size, "rounds": rounds}
    for key, label, is_peer, _setup, note in subjects:
        rows.append(_row("destroy", "destroy", key, label, samples[key], is_peer, note,
                         errors.get(key), size_bytes=size))


# ------------------------------------------------------------------ 3. GIL

def _writer_solo(write: Callable[[], Any], seconds: float, min_calls: int) -> array:
    times = array("q")
    pc = perf_ns
    end = pc() + int(seconds * 1e9)
    while pc() < end or len(times) < min_calls:
        t0 = pc()
        write()
        times.append(pc() - t0)
    return times


def _with_ticker(write: Callable[[], Any], seconds: float, min_calls: int) -> Dict[str, Any]:
    stop = [False]
    count = [0]
    stalls = array("q")
    span = [0, 0]

    def ticker() -> None:
        pc = perf_ns
        add = stalls.append
        limit = STALL_NS
        n = 0
        last = first = pc()
        while not stop[0]:
            now = pc()
            if now - last > limit:
                add(now - last)
            last = now
            n += 1
            count[0] = n
        span[0], span[1] = first, last

    th = threading.Thread(target=ticker, name="benchmarks-ticker", daemon=True)
    th.start()
    while count[0] < 1000:  # running
        pass
    times = array("q")
    ran = 0
    pc = perf_ns
    end = pc() + int(seconds * 1e9)
    try:
        while pc() < end or len(times) < min_calls:
            c0 = count[0]
            t0 = pc()
            write()
            t1 = pc()
            if count[0] != c0:
                ran += 1
            times.append(t1 - t0)
    finally:
        stop[0] = True
        th.join()
    ticks = count[0]
    wall = max(span[1] - span[0], 1)
    return {"times": times, "stalls": stalls, "ran": ran, "ticks": ticks, "wall_ns": wall,
            "stalled_share": sum(stalls) / wall, "ticks_per_s": ticks * 1e9 / wall}


def _section_gil(ctx: RunContext, rows: List[Dict[str, Any]], info: Dict[str, Any]) -> None:
    solo_s = ctx.pick(0.05, 0.2)
    slice_s = ctx.pick(0.08, 0.15)
    min_slices = ctx.pick(3, 5)
    max_slices = ctx.pick(8, 12)
    need_valid = ctx.pick(2, 3)
    ctx.log(f"[{NAME}] rare writes of 8 B / 64 KiB / 1 MiB with a ticking thread ...")
    pool = prmem.Pool(prmem.Mode.WR, name="bench-gil")
    a = pool.alloc(MiB, align_order=12)
    pool.protect()
    fd = os.memfd_create("bench-gil", os.MFD_CLOEXEC)
    os.ftruncate(fd, MiB)
    os.pwrite(fd, bytes(MiB), 0)
    impls: List[Tuple[str, str, bool, Callable[[bytes], Callable[[], Any]], str]] = [
        ("prmem", "prmem pool.rare_write", False, lambda d: lambda: pool.rare_write(a, d),
         "protected WR pool; prmem releases the GIL from 64 KiB (PRMEM_RARE_WRITE_NOGIL)"),
        ("os_pwrite", "os.pwrite to a memfd (GIL released)", True,
         lambda d: lambda: os.pwrite(fd, d, 0),
         "CPython releases the GIL around every os.pwrite: the positive control"),
    ]
    try:
        cpw = peers.get("libc").pwrite
        impls.append(("pydll_pwrite", "libc pwrite via ctypes.PyDLL (GIL held)", True,
                      lambda d: lambda: cpw(fd, d, len(d), 0),
                      "the same syscall with the GIL kept: the control for 'not released'"))
    except peers.PeerUnavailable as exc:
        ctx.skip(NAME, "the GIL-holding pwrite control", str(exc))
    switch = sys.getswitchinterval()
    gil: Dict[str, Any] = {"switch_interval_s": switch, "stall_threshold_ns": STALL_NS,
                           "sizes": list(GIL_SIZES), "slice_s": slice_s,
                           "min_slices": min_slices, "max_slices": max_slices,
                           "need_valid_slices": need_valid, "released": {}, "slices": {}}
    info["gil"] = gil
    try:
        with gc_paused():
            for size in GIL_SIZES:
                rows.extend(_gil_size(ctx, impls, size, solo_s, slice_s, min_slices,
                                      max_slices, need_valid, switch, gil))
    finally:
        del a
        pool.destroy()
        os.close(fd)


def _gil_size(ctx: RunContext, impls: List[Tuple[str, str, bool, Any, str]], size: int,
              solo_s: float, slice_s: float, min_slices: int, max_slices: int,
              need_valid: int, switch: float, gil: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Rows for one write size.  The ticker runs in short slices, the
    writers one after the other in each slice (rotated), so load from
    elsewhere that comes and goes hits all of them alike.  In each slice a
    writer counts as releasing the GIL when the share of time the ticker
    spent in long stalls (≥ half a switch interval: waits for a forced
    switch) is ≤ ¼ of that share with the GIL-holding control in the same
    slice.  From 64 KiB a slice only counts ("valid") when os.pwrite, which
    does release the GIL, passes that test: when it does not, the ticker had
    no free CPU and the slice says nothing.  A tie is no verdict."""
    group = _size(size)
    data = bytes([0x5A]) * size
    min_calls = 20 if size >= 64 * KiB else 1000
    writes = {key: make(data) for key, _l, _p, make, _n in impls}
    solo: Dict[str, Any] = {}
    errors: Dict[str, str] = {}
    for key, write in writes.items():
        try:
            _writer_solo(write, 0.01, 10)  # warm-up
            solo[key] = _writer_solo(write, solo_s, min_calls)
        except Exception as exc:
            errors[key] = f"{type(exc).__name__}: {exc}"
    keys = [k for k in writes if k not in errors]
    per: Dict[str, List[Dict[str, Any]]] = {k: [] for k in keys}
    gated = size >= 64 * KiB and "os_pwrite" in keys
    valid = passed = taken = 0
    while keys and taken < max_slices:
        order = keys[taken % len(keys):] + keys[:taken % len(keys)]
        got = {}
        for key in order:
            try:
                got[key] = _with_ticker(writes[key], slice_s, 3)
            except Exception as exc:
                errors[key] = f"{type(exc).__name__}: {exc}"
        if any(k in errors for k in keys):
            break
        taken += 1
        long_ns = switch * 1e9 / 2
        for t in got.values():
            t["long_share"] = sum(x for x in t["stalls"] if x >= long_ns) / t["wall_ns"]
        held = got.get("pydll_pwrite")
        ref = held["long_share"] if held is not None else 0.4
        for key, t in got.items():
            t["released"] = t["long_share"] <= 0.25 * ref
            per[key].append(t)
        if not gated or got["os_pwrite"]["released"]:
            valid += 1
            passed += bool(got["prmem"]["released"]) if "prmem" in got else 0
        if (taken >= min_slices and (not gated or valid >= need_valid)
                and passed * 2 != valid):
            break
    if gated and valid < need_valid and taken:
        ctx.log(f"[{NAME}] {group}: os.pwrite looked GIL-bound in {taken - valid} of {taken} "
                "slices (no free CPU for the ticker?)")
    # a tie (or nothing counted) is no verdict
    verdict = None if "prmem" not in per or passed * 2 == valid else passed * 2 > valid
    gil["released"][group] = verdict
    gil["slices"][group] = {"taken": taken, "valid": valid, "prmem_released": passed,
                            "gated_by_os_pwrite": gated}
    out = []
    for key, label, is_peer, _make, note in impls:
        if key in errors or not per.get(key):
            out.append(_row("gil", group, key, label, solo.get(key, []), is_peer, note,
                            errors.get(key, "no samples"), size_bytes=size))
            continue
        stalls = array("q")
        times = array("q")
        ran = 0
        for t in per[key]:
            stalls.extend(t["stalls"])
            times.extend(t["times"])
            ran += t["ran"]
        st = summarize(stalls)
        wt = summarize(times)
        row = _row("gil", group, key, label, solo[key], is_peer, note, size_bytes=size,
                   with_ticker_median_ns=wt["median"], with_ticker_calls=wt["n"],
                   stalls=st["n"], stall_median_ns=st["median"] if st["n"] else 0.0,
                   stall_p99_ns=st["p99"] if st["n"] else 0.0,
                   stall_max_ns=st["max"] if st["n"] else 0.0,
                   ticker_ran_share=ran / max(wt["n"], 1),
                   ticker_stalled_share=summarize(
                       [t["stalled_share"] for t in per[key]])["median"],
                   long_stall_share=summarize([t["long_share"] for t in per[key]])["median"],
                   slices_released=sum(bool(t["released"]) for t in per[key]),
                   slices=len(per[key]))
        row["stall_p99_over_write"] = ratio(row["stall_p99_ns"], row["median_ns"])
        if key == "prmem":
            row["gil_released"] = verdict
        elif key == "os_pwrite":
            row["gil_released"] = row["slices_released"] * 2 > row["slices"]
        out.append(row)
    return out


# ---------------------------------------------------------------- 4. threads

def _throughput(stmt_loop: Callable[..., int], args_per_thread: List[List[Any]],
                seconds: float) -> float:
    """Writes per second of len(args_per_thread) threads, each running
    ``stmt_loop(CHUNK, *args)`` until told to stop."""
    n = len(args_per_thread)
    stop = [False]
    counts = [0] * n
    spans: List[Tuple[int, int]] = [(0, 0)] * n
    barrier = threading.Barrier(n + 1)

    def body(i: int) -> None:
        args = args_per_thread[i]
        barrier.wait()
        t0 = perf_ns()
        c = 0
        while not stop[0]:
            stmt_loop(CHUNK, *args)
            c += CHUNK
        counts[i] = c
        spans[i] = (t0, perf_ns())

    threads = [threading.Thread(target=body, args=(i,), name=f"benchmarks-writer-{i}",
                                daemon=True) for i in range(n)]
    for th in threads:
        th.start()
    barrier.wait()
    time.sleep(seconds)  # the GIL is free for the writers meanwhile
    stop[0] = True
    for th in threads:
        th.join()
    wall = max(e for _, e in spans) - min(s for s, _ in spans)
    return sum(counts) * 1e9 / wall


def _section_threads(ctx: RunContext, rows: List[Dict[str, Any]], info: Dict[str, Any]) -> None:
    # many short rounds: load from elsewhere that comes and goes then hits the
    # 1- and 2-thread runs of a round alike (the ratio is taken per round)
    rounds = ctx.pick(6, 10)
    seconds = ctx.pick(0.04, 0.15)
    ctx.log(f"[{NAME}] 8-byte writes from 1 and 2 threads, {rounds} rounds ...")
    pools = [prmem.Pool(prmem.Mode.WR, name=f"bench-thread-{i}") for i in range(2)]
    allocs = [p.alloc(4096, align_order=12) for p in pools]
    for p in pools:
        p.protect()
    fds = [os.memfd_create(f"bench-thread-{i}", os.MFD_CLOEXEC) for i in range(2)]
    for fd in fds:
        os.ftruncate(fd, 4096)
    rw_loop = batch_loop("rw(a, d)", ["rw", "a", "d"], label="lifecycle thread rare_write")
    pw_loop = batch_loop("pw(fd, d, 0)", ["pw", "fd", "d"], label="lifecycle thread pwrite")
    impls = [
        ("prmem", "prmem rare_write 8 B, one pool per thread", False, rw_loop,
         [[pools[i].rare_write, allocs[i], DATA8] for i in range(2)]),
        ("os_pwrite", "os.pwrite 8 B, one memfd per thread", True, pw_loop,
         [[os.pwrite, fds[i], DATA8] for i in range(2)]),
    ]
    tput: Dict[Tuple[str, int], List[float]] = {(k, n): [] for k, *_ in impls for n in (1, 2)}
    errors: Dict[str, str] = {}
    try:
        with gc_paused():
            for key, _l, _p, loop, args in impls:  # warm-up
                _throughput(loop, args[:1], 0.02)
            configs = [(impl, n) for impl in impls for n in (1, 2)]
            for rnd in range(rounds):
                order = configs[rnd % len(configs):] + configs[:rnd % len(configs)]
                for (key, _label, _peer, loop, args), n in order:
                    if key in errors:
                        continue
                    try:
                        tput[(key, n)].append(_throughput(loop, args[:n], seconds))
                    except Exception as exc:
                        errors[key] = f"{type(exc).__name__}: {exc}"
        for i, a in enumerate(allocs):
            if bytes(memoryview(a)[0:8]) != DATA8:
                errors["prmem"] = f"pool {i} does not hold the data written"
    finally:
        del allocs
        for p in pools:
            p.destroy()
        for fd in fds:
            os.close(fd)
    ratios: Dict[str, Optional[float]] = {}
    for key, label, is_peer, _loop, _args in impls:
        one, two = tput[(key, 1)], tput[(key, 2)]
        per_round = [t2 / t1 for t1, t2 in zip(one, two)]
        ratios[key] = summarize(per_round)["median"] if per_round else None
        for n in (1, 2):
            vals = tput[(key, n)]
            s = summarize(vals)
            rows.append(_row("threads", f"{n} thread{'s' if n > 1 else ''}", key, label,
                             [1e9 / v for v in vals], is_peer, error=errors.get(key),
                             threads=n, writes_per_s=s["median"] if vals else None,
                             writes_per_s_min=s["min"] if vals else None,
                             writes_per_s_max=s["max"] if vals else None,
                             two_over_one=ratios[key] if n == 2 else None,
                             two_over_one_rounds=per_round if n == 2 else None))
    info["threads"] = {"rounds": rounds, "seconds_per_config": seconds,
                       "two_over_one": ratios}


# ------------------------------------------------------- 5. protect + read

def _section_protect_read(ctx: RunContext, rows: List[Dict[str, Any]],
                          info: Dict[str, Any]) -> None:
    try:
        import numpy as np
    except ImportError:
        ctx.skip(NAME, "protect() + first read", "numpy is not installed")
        return
    size = ctx.pick(8 * MiB, 64 * MiB)
    reps = ctx.pick(3, 7)
    passes = ctx.pick(3, 6)
    ctx.log(f"[{NAME}] protect() + first read of {_size(size)}, {reps} repetitions ...")
    expected = (0x0101010101010101 * FILL * (size // 8)) % (1 << 64)
    libc = peers.get("libc")

    class Subject:
        def __init__(self, key: str, label: str, steady_label: str, is_peer: bool,
                     note: str) -> None:
            self.key, self.label, self.is_peer, self.note = key, label, is_peer, note
            self.steady_label = steady_label
            self.total: List[int] = []
            self.protect: List[int] = []
            self.first: List[int] = []
            self.faults: List[int] = []
            self.steady: List[int] = []
            self.error: Optional[str] = None
            self.arr: Any = None
            self.smaps: Optional[Dict[str, Any]] = None

    class PrmemSubject(Subject):
        def __init__(self, mode: prmem.Mode, note: str) -> None:
            super().__init__(f"prmem_{mode.name.lower()}",
                             f"prmem Pool({mode.name}): protect() + first sum()",
                             f"prmem Pool({mode.name}): steady-state sum()", False, note)
            self.mode = mode

        def build(self) -> None:
            self.view: Optional[memoryview] = None
            self.pool = prmem.Pool(self.mode, name=f"bench-first-read-{self.mode.name}")
            self.alloc = self.pool.alloc(size, align_order=12)
            _fill(self.alloc.address, size)

        def protect_and_read(self) -> Tuple[int, int, int, int]:
            f0 = minor_faults()
            t0 = perf_ns()
            self.pool.protect()
            t1 = perf_ns()
            self.view = memoryview(self.alloc)
            self.arr = np.frombuffer(self.view, dtype=np.uint64)
            s = int(self.arr.sum())
            t2 = perf_ns()
            if s != expected:
                raise RuntimeError(f"sum {s:#x}, expected {expected:#x}")
            return t1 - t0, t2 - t1, t2 - t0, minor_faults() - f0

        def address(self) -> int:
            return self.alloc.address

        def teardown(self) -> None:
            self.arr = None  # numpy's reference to the view goes first
            if self.view is not None:
                self.view.release()
            self.alloc = None
            self.pool.destroy()

    class NaiveSubject(Subject):
        def build(self) -> None:
            self.addr = libc.map_page(size)
            self.buf = (ctypes.c_char * size).from_address(self.addr)
            _fill(self.addr, size)
            self.arr = np.frombuffer(self.buf, dtype=np.uint64)

        def protect_and_read(self) -> Tuple[int, int, int, int]:
            f0 = minor_faults()
            t0 = perf_ns()
            if libc.mprotect(self.addr, size, peers.PROT_READ) != 0:
                raise OSError(ctypes.get_errno(), "mprotect failed")
            t1 = perf_ns()
            s = int(self.arr.sum())
            t2 = perf_ns()
            if s != expected:
                raise RuntimeError(f"sum {s:#x}, expected {expected:#x}")
            return t1 - t0, t2 - t1, t2 - t0, minor_faults() - f0

        def address(self) -> int:
            return self.addr

        def teardown(self) -> None:
            self.arr = None
            self.buf = None
            libc.munmap(self.addr, size)

    subjects: List[Any] = [
        PrmemSubject(prmem.Mode.RO, "protect() seals the memfd and re-maps it read-only: "
                     "the page-table entries are dropped, the first read faults them back"),
        NaiveSubject("naive", "anonymous mmap: mprotect(PROT_READ) + first sum()",
                     "anonymous mmap, mprotect()ed: steady-state sum()", True,
                     "one mprotect() of an anonymous private mapping (libc via ctypes); "
                     "page-table entries stay"),
        PrmemSubject(prmem.Mode.WR, "protect() = mprotect(PROT_READ) of the areas; "
                     "page-table entries stay"),
    ]
    with gc_paused():
        for rep in range(reps):
            order = subjects[rep % len(subjects):] + subjects[:rep % len(subjects)]
            built = []
            for s in order:
                if s.error:
                    continue
                try:
                    s.build()
                    built.append(s)
                except Exception as exc:
                    s.error = f"{type(exc).__name__}: {exc}"
            for s in built:
                try:
                    p, f, t, faults = s.protect_and_read()
                    s.protect.append(p)
                    s.first.append(f)
                    s.total.append(t)
                    s.faults.append(faults)
                except Exception as exc:
                    s.error = f"{type(exc).__name__}: {exc}"
            for _ in range(passes):
                for s in built:
                    if s.error or s.arr is None:
                        continue
                    t0 = perf_ns()
                    v = int(s.arr.sum())
                    s.steady.append(perf_ns() - t0)
                    if v != expected:
                        s.error = "steady-state sum differs"
            if rep == reps - 1:
                for s in built:
                    if not s.error:
                        s.smaps = smaps_range(s.address(), size)
            for s in built:
                try:
                    s.teardown()
                except Exception as exc:
                    s.error = (s.error or "") + f" teardown: {type(exc).__name__}: {exc}"
    for s in subjects:
        hp = None
        if s.smaps is not None:
            hp = sum(s.smaps.get(k, 0) for k in
                     ("AnonHugePages", "ShmemPmdMapped", "FilePmdMapped"))
        rows.append(_row("protect_read", "protect + first read", s.key, s.label, s.total,
                         s.is_peer, s.note, s.error, size_bytes=size,
                         protect_median_ns=summarize(s.protect)["median"] if s.protect else None,
                         first_read_median_ns=summarize(s.first)["median"] if s.first else None,
                         first_read_faults=summarize(s.faults)["median"] if s.faults else None,
                         huge_page_bytes=hp))
        rows.append(_row("protect_read", "steady-state read", s.key, s.steady_label,
                         s.steady, s.is_peer, "", s.error, size_bytes=size))
    info["protect_read"] = {"size_bytes": size, "reps": reps, "steady_passes_per_rep": passes}


# ------------------------------------------------------------ 6. pwrite floor

def _c_compiler() -> Optional[str]:
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _compile_floor(ctx: RunContext,
                   tmp: str) -> Optional[Tuple[Callable[[int, int], float],
                                               Callable[[int, int], float]]]:
    cc = _c_compiler()
    if cc is None:
        ctx.skip(NAME, "the C pwrite floor", "no C compiler (cc) on PATH")
        return None
    src = os.path.join(tmp, "pwrite_floor.c")
    lib = os.path.join(tmp, "libpwrite_floor.so")
    with open(src, "w") as f:
        f.write(_C_SOURCE)
    try:
        proc = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", lib, src],
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        ctx.skip(NAME, "the C pwrite floor", f"{cc} failed to run: {exc}")
        return None
    if proc.returncode != 0:
        ctx.skip(NAME, "the C pwrite floor", f"{cc} failed: {proc.stderr.strip()[-400:]}")
        return None
    dll = ctypes.PyDLL(lib)
    dll.pwrite_loop.restype = dll.identity_pwrite_loop.restype = ctypes.c_double
    dll.pwrite_loop.argtypes = [ctypes.c_int, ctypes.c_int]
    dll.identity_pwrite_loop.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return dll.pwrite_loop, dll.identity_pwrite_loop


def _section_floor(ctx: RunContext, rows: List[Dict[str, Any]], info: Dict[str, Any]) -> None:
    seconds = ctx.pick(0.3, 2.0)
    ctx.log(f"[{NAME}] rare_write 8 B against a C pwrite() loop ...")
    fd = os.memfd_create("bench-floor", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4096)
    fmap = mmap.mmap(fd, 4096, prot=mmap.PROT_READ)  # mapped, like a pool's memfd
    fmap[0]
    pool = prmem.Pool(prmem.Mode.WR, name="bench-floor")
    a = pool.alloc(4096, align_order=12)
    pool.protect()
    try:
        with tempfile.TemporaryDirectory(prefix="prmem-bench-") as tmp:
            c_loops = _compile_floor(ctx, tmp)
            rw = batch_loop("rw(a, d)", ["rw", "a", "d"], label="lifecycle floor rare_write")
            pw = batch_loop("pw(fd, d, 0)", ["pw", "fd", "d"], label="lifecycle floor os.pwrite")
            empty = batch_loop("pass", label="lifecycle floor loop overhead")
            timed: List[Tuple[str, str, bool, Callable[[], float], str]] = [
                ("prmem", "prmem pool.rare_write 8 B", False,
                 lambda: rw(CHUNK, pool.rare_write, a, DATA8) / CHUNK,
                 "a compiled Python loop of pool.rare_write(a, data) on a protected WR pool"),
                ("prmem_module", "prmem.rare_write 8 B (module function)", False,
                 lambda: rw(CHUNK, prmem.rare_write, a, DATA8) / CHUNK,
                 "the same through the module-level function"),
                ("os_pwrite", "os.pwrite 8 B from Python", True,
                 lambda: pw(CHUNK, os.pwrite, fd, DATA8) / CHUNK,
                 "the same compiled loop calling os.pwrite on a memfd (releases and re-takes "
                 "the GIL per call)"),
                ("loop", "loop overhead (empty statement)", False,
                 lambda: empty(CHUNK) / CHUNK, "the Python loop alone: the floor of every row "
                 "timed from Python"),
            ]
            if c_loops is not None:
                c_pwrite, c_identity_pwrite = c_loops
                timed[0:0] = [
                    ("c_pwrite", "C loop of pwrite() 8 B (no Python)", True,
                     lambda: c_pwrite(fd, CHUNK),
                     "pwrite(fd, data, 8, 0) in a C loop on a memfd, compiled at run time with "
                     "cc -O2"),
                    ("c_statx_pwrite", "C loop of statx() + pwrite() 8 B (no Python)", True,
                     lambda: c_identity_pwrite(fd, CHUNK, 1),
                     "the same with the descriptor identity check prmem makes before every "
                     "rare write (statx() for the inode, and a comparison): the floor of a "
                     "write that cannot land in another file"),
                    ("c_fstat_pwrite", "C loop of fstat() + pwrite() 8 B (no Python)", True,
                     lambda: c_identity_pwrite(fd, CHUNK, 0),
                     "the same check with fstat(), which also reads the change time: on "
                     "kernels with multigrain timestamps (6.13+, tmpfs and memfds among them) "
                     "that makes the next write take a fine-grained one, which is why prmem "
                     "asks statx() for the inode alone"),
                ]
            samples: Dict[str, List[float]] = {t[0]: [] for t in timed}
            with gc_paused():
                for _key, _l, _p, fn, _n in timed:
                    fn()  # warm-up
                budget = Budget(seconds, 20, 100_000)
                taken = 0
                while budget.more(taken):
                    for key, _l, _p, fn, _n in timed:
                        v = fn()
                        if v < 0:
                            raise RuntimeError("the C pwrite loop failed")
                        samples[key].append(v)
                    taken += 1
            if bytes(memoryview(a)[0:8]) != DATA8 or os.pread(fd, 8, 0) != DATA8:
                raise RuntimeError("the data written did not read back")
            for key, label, is_peer, _fn, note in timed:
                rows.append(_row("floor", "8 B write", key, label, samples[key], is_peer, note))
            info["floor"] = {"compiler": _c_compiler(), "have_c_floor": c_loops is not None,
                             "calls_per_sample": CHUNK}
    finally:
        del a
        pool.destroy()
        fmap.close()
        os.close(fd)


# --------------------------------------------------------------------- run

SECTIONS = [("fork", _section_fork), ("destroy", _section_destroy), ("gil", _section_gil),
            ("threads", _section_threads), ("protect_read", _section_protect_read),
            ("floor", _section_floor)]


def run(ctx: RunContext) -> Dict[str, Any]:
    rows: List[Dict[str, Any]] = []
    info: Dict[str, Any] = {}
    section_errors: Dict[str, str] = {}
    loads: Dict[str, Optional[float]] = {}
    for name, fn in SECTIONS:
        probe = CpuLoadProbe()
        try:
            fn(ctx, rows, info)
        except Exception:
            tb = traceback.format_exc()
            section_errors[name] = tb
            print(f"[{NAME}] section {name} failed:\n{tb}", file=sys.stderr, flush=True)
        loads[name] = probe.other_load()
        gc.collect()
    info["other_cpu_load"] = loads
    busy = {k: v for k, v in loads.items() if v is not None and v > NOISY_LOAD}
    if busy:
        ctx.log(f"[{NAME}] warning: other processes used "
                + ", ".join(f"{v:.0%} ({k})" for k, v in busy.items())
                + " of the CPU time: expect noisy ratios (the GIL and thread rows need both "
                "CPUs)")
    _add_ratios(rows)
    thp_dir = "/sys/kernel/mm/transparent_hugepage"
    thp = {"shmem_enabled": _bracketed(f"{thp_dir}/shmem_enabled"),
           "enabled": _bracketed(f"{thp_dir}/enabled")}
    result = {"rows": rows, "info": info, "thp": thp, "section_errors": section_errors}
    result["targets"], result["ratios"] = _targets_and_ratios(rows, info)
    result["notes"] = _notes(rows, info, thp, section_errors)
    return result


def _targets_and_ratios(rows: List[Dict[str, Any]], info: Dict[str, Any]
                        ) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    def m(section: str, group: str, impl: str) -> Optional[float]:
        return _median(rows, section, group, impl)

    fork_size = _size(info.get("fork", {}).get("size_bytes", 0))
    destroy_size = _size(info.get("destroy", {}).get("size_bytes", 0))
    fork_ratio = ratio(m("fork", "fork+exit", "pool_wr"), m("fork", "fork+exit", "bytearray"))
    destroy_ratio = ratio(m("destroy", "destroy", "prmem_writable"),
                          m("destroy", "destroy", "mmap_shared"))
    destroy_private = ratio(m("destroy", "destroy", "prmem_writable"),
                            m("destroy", "destroy", "mmap_private"))
    released = info.get("gil", {}).get("released", {})
    big = [released.get(_size(s)) for s in GIL_SIZES if s >= 64 * KiB]
    gil_yes: Optional[bool] = None if any(v is None for v in big) or not big else all(big)
    thr = info.get("threads", {}).get("two_over_one", {})
    thr_cmp = ratio(thr.get("prmem"), thr.get("os_pwrite"))
    floor_ratio = ratio(m("floor", "8 B write", "prmem"), m("floor", "8 B write", "c_pwrite"))
    checked_ratio = ratio(m("floor", "8 B write", "prmem"),
                          m("floor", "8 B write", "c_statx_pwrite"))
    targets = [
        _target(f"fork+exit, {fork_size} WR pool / {fork_size} bytearray", fork_ratio, "≤ 3×",
                None if fork_ratio is None else fork_ratio <= 3.0,
                "median fork()+_exit+waitpid in the parent, protected WR pool vs written "
                "bytearray"),
        _target(f"destroy() {destroy_size} / munmap (mmap.mmap(-1, n).close())", destroy_ratio,
                "≤ 2×", None if destroy_ratio is None else destroy_ratio <= 2.0,
                "written unsealed (never protected) WR pool vs Python's default anonymous "
                "mmap (MAP_SHARED, shmem-backed like a pool), as the issue names it"),
        _target(f"destroy() {destroy_size} / munmap (MAP_PRIVATE anonymous)", destroy_private,
                "≤ 2×", None if destroy_private is None else destroy_private <= 2.0,
                "the same pool vs ordinary anonymous private memory (what malloc'ed memory "
                "is), the stricter reading of 'munmap (anonymous)'"),
        _target("GIL released for ≥ 64 KiB rare writes", gil_yes, "yes", gil_yes,
                "at 64 KiB and 1 MiB the ticker spends ≤ ¼ of the time the GIL-holding "
                "control makes it spend waiting for forced switches, in most slices where "
                "os.pwrite passes the same test (see the GIL table); '—' = inconclusive",
                unit="yesno"),
        _target("2 threads / 1 thread writes/s: prmem ratio / os.pwrite ratio", thr_cmp,
                "≥ 0.8× (not clearly worse)", None if thr_cmp is None else thr_cmp >= 0.8,
                f"prmem 2/1 = {fmt_ratio(thr.get('prmem'))}, os.pwrite pair 2/1 = "
                f"{fmt_ratio(thr.get('os_pwrite'))} (8 B writes, one pool or memfd per thread)"),
        _target("rare_write 8 B / C pwrite loop", floor_ratio, "≤ 1.3×",
                None if floor_ratio is None else floor_ratio <= 1.3,
                "ns per call, prmem from a compiled Python loop vs pwrite() in a C loop; "
                "since issue 14 every rare write first checks its descriptor (one statx()), "
                "which the bare pwrite() loop does not pay: see the next row"),
        _target("rare_write 8 B / C statx + pwrite loop", checked_ratio, "≤ 1.3×",
                None if checked_ratio is None else checked_ratio <= 1.3,
                "the same against a C loop that makes the same descriptor check before each "
                "pwrite(): the floor of a checked write"),
    ]
    pr_size = _size(info.get("protect_read", {}).get("size_bytes", 0))
    ratios = [
        {"name": f"fork+exit {fork_size}: writable pool / bytearray",
         "value": ratio(m("fork", "fork+exit", "pool_writable"), m("fork", "fork+exit",
                                                                     "bytearray"))},
        {"name": f"fork+exit {fork_size}: sealed RO pool / bytearray",
         "value": ratio(m("fork", "fork+exit", "pool_ro"), m("fork", "fork+exit", "bytearray"))},
        {"name": f"fork+exit {fork_size}: bytearray / nothing",
         "value": ratio(m("fork", "fork+exit", "bytearray"), m("fork", "fork+exit", "nothing"))},
        {"name": f"fork + first change in child {fork_size}: WR pool / bytearray",
         "value": ratio(m("fork", "fork+first change", "pool_wr"),
                        m("fork", "fork+first change", "bytearray"))},
        {"name": f"destroy() {destroy_size}, protected WR pool / mmap.mmap(-1, n).close()",
         "value": ratio(m("destroy", "destroy", "prmem_wr"), m("destroy", "destroy",
                                                                "mmap_shared"))},
        {"name": f"destroy() {destroy_size}, unprotected pool / memfd close + munmap",
         "value": ratio(m("destroy", "destroy", "prmem_writable"), m("destroy", "destroy",
                                                                      "memfd"))},
        {"name": "two threads / one thread writes/s, prmem rare_write 8 B",
         "value": thr.get("prmem")},
        {"name": "two threads / one thread writes/s, os.pwrite 8 B", "value": thr.get("os_pwrite")},
        {"name": f"protect() + first read {pr_size}: prmem RO / mprotect",
         "value": ratio(m("protect_read", "protect + first read", "prmem_ro"),
                        m("protect_read", "protect + first read", "naive"))},
        {"name": f"protect() + first read {pr_size}: prmem WR / mprotect",
         "value": ratio(m("protect_read", "protect + first read", "prmem_wr"),
                        m("protect_read", "protect + first read", "naive"))},
        {"name": f"steady-state read {pr_size}: prmem RO / mprotect'ed mapping",
         "value": ratio(m("protect_read", "steady-state read", "prmem_ro"),
                        m("protect_read", "steady-state read", "naive"))},
        {"name": "rare_write 8 B / os.pwrite 8 B from Python",
         "value": ratio(m("floor", "8 B write", "prmem"), m("floor", "8 B write", "os_pwrite"))},
        {"name": "os.pwrite 8 B from Python / C pwrite loop",
         "value": ratio(m("floor", "8 B write", "os_pwrite"),
                        m("floor", "8 B write", "c_pwrite"))},
    ]
    for size in GIL_SIZES:
        v = released.get(_size(size))
        ratios.append({"name": f"GIL released during a {_size(size)} rare_write",
                       "value": v, "unit": "yesno"})
    return targets, ratios


def _notes(rows: List[Dict[str, Any]], info: Dict[str, Any], thp: Dict[str, Any],
           section_errors: Dict[str, str]) -> List[str]:
    notes = []
    fork = info.get("fork")
    if fork:
        checks = fork.get("checks", {})
        notes.append(
            f"fork: {_size(fork['size_bytes'])} per subject, {fork['rounds']} round(s) × "
            f"{fork['reps_per_round']} forks per row after one untimed fork, in a child "
            "interpreter holding one subject at a time. 'fork() call' = until os.fork() "
            "returned in the parent (prmem's parent waits there until the child has copied "
            "what can still change). 'fork + first change' = from the parent's clock "
            "reading before fork() to the end of the child's first 8-byte change; 'child "
            "part' = from fork() returning in the child to that point. Checks: "
            + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in checks.items()) + ".")
        if fork.get("errors"):
            notes.append("fork errors: " + "; ".join(f"{k}: {v}" for k, v in
                                                     fork["errors"].items()))
    gil = info.get("gil")
    if gil:
        notes.append(
            f"GIL: the ticker records gaps > {STALL_NS / 1000:g} µs between its clock "
            "readings (stalls: it waited for the GIL or was descheduled). With the GIL held "
            "through a write, the ticker waits for a forced switch (switch interval "
            f"{gil['switch_interval_s'] * 1e3:g} ms), so its stalls are about that long; with "
            "the GIL released it gets in during the write and its stalls are the thread "
            "wake-up latency. A write shorter than that latency (64 KiB ≈ a few µs here) "
            "cannot show 'gap much smaller than the write', so the verdict compares with the "
            "GIL-holding control at the same size. The ticker runs in slices of "
            f"{gil['slice_s'] * 1e3:.0f} ms, the three writers one after the other in each "
            "(rotated); in a slice a writer counts as releasing the GIL if the share of time "
            "the ticker spent in stalls ≥ half a switch interval (waits for a forced switch) "
            "is ≤ ¼ of that share with the control (a time share, not the p99, so that one "
            "stray interruption does not decide). From 64 KiB a slice counts only if "
            "os.pwrite, which does release the GIL, passes too (otherwise the ticker had no "
            f"free CPU); at least {gil['min_slices']} slices, more (up to "
            f"{gil['max_slices']}) until {gil['need_valid_slices']} count and there is no tie. "
            "prmem's verdict = released in the majority of the counted slices; '—' if none "
            "counted or a tie. Slices "
            "(taken/counted/prmem released): "
            + ", ".join(f"{k} {v['taken']}/{v['valid']}/{v['prmem_released']}"
                        for k, v in gil["slices"].items()) + ". "
            "'ticker ran' = share of writes during which the ticker advanced. "
            "'write ns' is the write alone (no ticker); 'with ticker' includes waiting to get "
            "the GIL back.")
    thr = info.get("threads")
    if thr:
        notes.append(
            f"threads: {thr['rounds']} rounds of {thr['seconds_per_config'] * 1e3:.0f} ms per "
            "configuration, order rotated per round; the 2/1 ratio is the median of the "
            "per-round ratios. Under the GIL two threads cannot write faster than one; a "
            "ratio below 1 is the cost of handing the GIL (and any shared lock) back and "
            "forth. os.pwrite releases the GIL on every call, so its pair pays a GIL hand-off "
            "per write: the floor prmem is held against.")
    pr = info.get("protect_read")
    if pr:
        notes.append(
            f"protect + first read: {pr['reps']} repetitions, each building every subject "
            "afresh (written with memset), then timing protect() / mprotect() and the first "
            "numpy uint64 sum() as one figure (split in the table); steady state: "
            f"{pr['steady_passes_per_rep']} sums per repetition, round-robin. Every sum is "
            "checked.")
    floor = info.get("floor")
    if floor:
        notes.append(
            f"pwrite floor: per-sample means of {floor['calls_per_sample']} calls, samples "
            "round-robin across rows. The existing rare_write workload has no pwrite peer, so "
            "the C loop is built here at run time (cc -O2, a temporary directory). A Python "
            "call carries the interpreter's per-call overhead ('loop overhead' + the method "
            "call); os.pwrite is the Python-level reference.")
    shmem = thp.get("shmem_enabled")
    hp = [r.get("huge_page_bytes") for r in rows if r["section"] == "protect_read"
          and r["impl"].startswith("prmem") and r.get("huge_page_bytes") is not None]
    got = f"{max(hp) // MiB} MiB" if hp else "not measured"
    if shmem in ("never", "deny"):
        notes.append(
            f"Transparent huge pages for shmem (memfd, prmem's backing): '{shmem}' "
            "(/sys/kernel/mm/transparent_hugepage/shmem_enabled), so prmem pools use 4 KiB "
            f"pages: huge pages are not applicable here (pool memory in huge pages: {got}). "
            f"Anonymous THP: '{thp.get('enabled')}'.")
    else:
        notes.append(
            f"Transparent huge pages for shmem: '{shmem}' "
            "(/sys/kernel/mm/transparent_hugepage/shmem_enabled); prmem does not ask for "
            "them (no MADV_HUGEPAGE), so with 'advise' it gets none. Pool memory in huge "
            f"pages after the first read: {got}. Anonymous THP: '{thp.get('enabled')}'.")
    loads = info.get("other_cpu_load", {})
    busy = {k: v for k, v in loads.items() if v is not None and v > NOISY_LOAD}
    if busy:
        notes.append("Warning: other processes used "
                     + ", ".join(f"{v:.0%} of the CPU time during {k}" for k, v in busy.items())
                     + ": those figures are noisy; the GIL and two-thread figures need both "
                     "CPUs free. Rerun on a quiet machine.")
    for name in section_errors:
        notes.append(f"Section {name} FAILED (traceback in latest.json, section_errors).")
    return notes


# ------------------------------------------------------------------ output

def _r(rows: List[Dict[str, Any]], section: str) -> List[Dict[str, Any]]:
    return [r for r in rows if r["section"] == section]


def markdown(result: Dict[str, Any]) -> str:
    rows = result["rows"]
    out = [f"## {TITLE}", ""]

    fork = _r(rows, "fork")
    if fork:
        size = _size(result["info"]["fork"]["size_bytes"])
        out += [f"### fork with {size} of written memory", ""]
        t = []
        for r in fork:
            if r["group"] == "fork+exit":
                t.append([r["label"], "fork + _exit + waitpid", _ms(r["median_ns"]),
                          _ms(r["min_ns"]), _ms(r["max_ns"]), _ms(r.get("fork_call_median_ns")),
                          "—", fmt_ratio(r.get("ratio_vs_best_peer")), f"{r['n']}",
                          r["error"] or ""])
            else:
                t.append([r["label"], "fork + first 8 B change in child",
                          _ms(r["median_ns"]), _ms(r["min_ns"]), _ms(r["max_ns"]), "—",
                          _ms(r.get("child_median_ns")),
                          fmt_ratio(r.get("ratio_vs_best_peer")), f"{r['n']}",
                          r["error"] or ""])
        out += [md_table(["subject", "what", "median ms", "min ms", "max ms",
                          "fork() call ms", "child part ms", "vs best peer", "n", "error"], t),
                ""]

    destroy = _r(rows, "destroy")
    if destroy:
        size = _size(result["info"]["destroy"]["size_bytes"])
        out += [f"### releasing {size} of written memory", ""]
        out += [md_table(["what", "median ms", "min ms", "max ms", "vs best peer", "n", "error"],
                         [[r["label"], _ms(r["median_ns"]), _ms(r["min_ns"]), _ms(r["max_ns"]),
                           fmt_ratio(r.get("ratio_vs_best_peer")), f"{r['n']}",
                           r["error"] or ""] for r in destroy]), ""]

    gil = _r(rows, "gil")
    if gil:
        out += ["### large rare writes and the GIL (a second thread ticking)", ""]
        out += [md_table(
            ["size", "writer", "write µs (alone)", "write µs (with ticker)", "stalls",
             "stall median µs", "stall p99 µs", "stall max µs", "p99 stall / write",
             "ticker ran during", "time in stalls ≥ ½ switch", "slices passed",
             "GIL released", "error"],
            [[r["group"], r["label"], _us(r["median_ns"]), _us(r.get("with_ticker_median_ns")),
              r.get("stalls"), _us(r.get("stall_median_ns")), _us(r.get("stall_p99_ns")),
              _us(r.get("stall_max_ns")), fmt_ratio(r.get("stall_p99_over_write")),
              "—" if r.get("ticker_ran_share") is None else f"{r['ticker_ran_share']:.1%}",
              "—" if r.get("long_stall_share") is None else f"{r['long_stall_share']:.1%}",
              "" if r.get("slices") is None or r["impl"] == "pydll_pwrite"
              else f"{r['slices_released']}/{r['slices']}",
              ("control" if r["impl"] == "pydll_pwrite" else "—")
              if r.get("gil_released") is None else ("yes" if r["gil_released"] else "no"),
              r["error"] or ""] for r in gil]), ""]

    thr = _r(rows, "threads")
    if thr:
        out += ["### 8-byte writes from one and two threads", ""]
        out += [md_table(["writer", "threads", "writes/s (median)", "min", "max",
                          "ns per write", "2 threads / 1", "error"],
                         [[r["label"], r["threads"], r.get("writes_per_s"),
                           r.get("writes_per_s_min"), r.get("writes_per_s_max"), r["median_ns"],
                           fmt_ratio(r.get("two_over_one")) if r["threads"] == 2 else "",
                           r["error"] or ""] for r in thr]), ""]

    pr = _r(rows, "protect_read")
    if pr:
        size = _size(result["info"]["protect_read"]["size_bytes"])
        out += [f"### protect() + first read of {size}", ""]
        t = []
        for r in pr:
            first = r["group"] == "protect + first read"
            t.append([r["label"], _ms(r["median_ns"]), _ms(r["min_ns"]),
                      _ms(r.get("protect_median_ns")) if first else "",
                      _ms(r.get("first_read_median_ns")) if first else "",
                      r.get("first_read_faults") if first else "",
                      fmt_ratio(r.get("ratio_vs_best_peer")), f"{r['n']}",
                      (_size(r["huge_page_bytes"]) if r.get("huge_page_bytes") else "0")
                      if first and r.get("huge_page_bytes") is not None else "",
                      r["error"] or ""])
        out += [md_table(["what", "median ms", "min ms", "protect ms", "first sum ms",
                          "minor faults", "vs best peer", "n", "in huge pages", "error"], t), ""]

    floor = _r(rows, "floor")
    if floor:
        out += ["### rare_write 8 B against the pwrite floor", ""]
        out += [md_table(["what", "median ns/call", "p99 ns/call", "vs best peer", "samples"],
                         [[r["label"], r["median_ns"], r["p99_ns"],
                           fmt_ratio(r.get("ratio_vs_best_peer")), f"{r['n']}"]
                          for r in floor]), ""]

    out += [targets_table(result["targets"]), ""]
    out += [md_table(["other ratio", "value"],
                     [[x["name"], _fmt_value(x["value"], x.get("unit"))]
                      for x in result["ratios"]]), ""]
    out += ["Notes:", ""] + [f"- {n}" for n in result["notes"]]
    seen = set()
    for r in rows:
        if r.get("note") and (r["label"], r["note"]) not in seen:
            seen.add((r["label"], r["note"]))
            out.append(f"- {r['label']}: {r['note']}")
    return "\n".join(out) + "\n"


def _fmt_value(value: Any, unit: Optional[str]) -> str:
    return fmt_target_value({"value": value, "unit": unit})


def summary(result: Dict[str, Any]) -> List[List[str]]:
    out = []
    rows = result["rows"]
    for r in _r(rows, "fork"):
        if r["group"] == "fork+exit":
            out.append([f"lifecycle fork+exit {r['impl']}", f"{fmt_num(_ms(r['median_ns']))} ms"
                        if r["n"] else (r["error"] or "no samples")])
    for r in _r(rows, "destroy"):
        out.append([f"lifecycle release {r['impl']}", f"{fmt_num(_ms(r['median_ns']))} ms"
                    if r["n"] else (r["error"] or "no samples")])
    for x in result["ratios"]:
        if "protect() + first read" in x["name"] and "RO" in x["name"]:
            out.append([f"lifecycle {x['name']}", fmt_ratio(x["value"])])
    for t in result["targets"]:
        met = "—" if t["met"] is None else ("met" if t["met"] else "NOT met")
        out.append([f"lifecycle {t['name']}",
                    f"{_fmt_value(t['value'], t.get('unit'))} (target {t['target']}: {met})"])
    return out


def plot(result: Dict[str, Any], out_dir: str, plt: Any) -> List[str]:
    rows = result["rows"]
    panels = [("fork", "fork+exit", "fork + _exit + waitpid (ms, log)"),
              ("destroy", "destroy", "release (ms)")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, (section, group, xlabel) in zip(axes, panels):
        pts = [r for r in rows if r["section"] == section and r["group"] == group
               and r["median_ns"] is not None]
        ax.barh(range(len(pts)), [r["median_ns"] / 1e6 for r in pts],
                color=["tab:blue" if r["impl"].startswith(("pool", "prmem")) else "tab:gray"
                       for r in pts])
        ax.set_yticks(range(len(pts)))
        ax.set_yticklabels([r["label"] for r in pts], fontsize="small")
        ax.invert_yaxis()
        if "log" in xlabel:  # fork spans three decades; the releases do not
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
    axes[0].set_title("fork with written memory")
    axes[1].set_title("destroy() vs munmap")
    return [save_figure(plt, fig, out_dir, "lifecycle")]
