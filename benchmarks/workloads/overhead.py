"""overhead: memory used per byte requested, for many small allocations.

n allocations (10^5; quick mode 10^4) of 16, 32, 100 and 1000 bytes, kept
alive:

* prmem: ``Pool(Mode.RO)`` at the default refill; ``stats().bytes_mapped /
  bytes_requested`` (the pool's memory), then separately the RSS growth
  after writing every byte and the Python objects: ``sys.getsizeof`` of an
  Allocation and what tracemalloc counts per allocation;
* libsodium ``sodium_malloc``: growth of the mapped address space
  (/proc/self/maps) per byte requested, RSS growth and new VMAs; its ~4 VMAs
  per block meet ``vm.max_map_count`` long before 10^5, so it is measured at
  the largest count that stays clear of the limit (and says so);
* OpenSSL ``CRYPTO_secure_malloc``: the secure heap is one fixed arena that
  has to be sized (a power of two) for the peak at ``CRYPTO_secure_malloc_init``
  and can be set up once per process, so each size runs in a child process
  with the smallest power-of-two arena that holds the n allocations;
  arena / requested, plus ``CRYPTO_secure_used`` / requested (the buddy
  allocator's rounding);
* bytearray: ``sys.getsizeof(bytearray(size)) / size`` and tracemalloc's
  bytes per object.

Each implementation and size is measured in a fresh child process (same
interpreter, same prmem), so that RSS and VMA counts start from a clean
process rather than from whatever earlier workloads left behind.  The list
(or array) holding the n objects exists before each baseline and is not
counted for anyone.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
import tracemalloc
from array import array
from typing import Any, Dict, List, Optional

import prmem

from .. import peers
from ..harness import (PAGE_SIZE, RunContext, child_env, gc_paused, mapped_bytes, ratio,
                       read_sysctl, rss_bytes, vma_count)
from ..report import fmt_num, fmt_ratio, md_table, save_figure, targets_table

NAME = "overhead"
TITLE = "overhead — memory per byte requested, many small allocations"
SIZES = [16, 32, 100, 1000]
OPENSSL_MIN_BLOCK = 16
#: VMAs left free below vm.max_map_count when sizing the libsodium run.
MAP_COUNT_MARGIN = 2000


def _trim() -> None:
    from .alloc import _trim as trim

    trim()


def _baseline() -> tuple:
    gc.collect()
    _trim()
    return rss_bytes(), mapped_bytes(), vma_count()


# ------------------------------------------------------------------ prmem


def _prmem(n: int, size: int) -> Dict[str, Any]:
    keep: List[Any] = [None] * n
    data = b"\xa5" * size
    rss0, mapped0, vmas0 = _baseline()
    pool = prmem.Pool(prmem.Mode.RO, name="bench-overhead")
    try:
        with gc_paused():
            alloc = pool.alloc
            for i in range(n):
                keep[i] = alloc(size)
            for a in keep:
                a.write(data)
        rss1, mapped1, vmas1 = rss_bytes(), mapped_bytes(), vma_count()
        st = pool.stats()
        object_size = sys.getsizeof(keep[0])
    finally:
        keep = [None] * n
        pool.destroy()
    requested = n * size
    # Python objects alone, in a second pool, counted by tracemalloc.
    pool = prmem.Pool(prmem.Mode.RO, name="bench-overhead-objects")
    try:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        alloc = pool.alloc
        for i in range(n):
            keep[i] = alloc(size)
        traced = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        keep = None  # type: ignore[assignment]
        pool.destroy()
    return {
        "impl": "prmem", "label": "prmem Pool(RO).alloc", "is_peer": False, "n": n,
        "size": size, "requested": requested, "stats_bytes_requested": st.bytes_requested,
        "primary": st.bytes_mapped / st.bytes_requested,
        "primary_what": "stats().bytes_mapped / bytes_requested",
        "bytes_mapped": st.bytes_mapped, "bytes_reserved": st.bytes_reserved,
        "areas": st.areas, "chunks": st.chunks,
        "mapped_delta": mapped1 - mapped0, "vmas_delta": vmas1 - vmas0,
        "rss_delta": rss1 - rss0, "rss_per_byte": (rss1 - rss0) / requested,
        "pyobj_sizeof": object_size, "pyobj_traced_per_alloc": traced / n,
        "total_per_byte": (st.bytes_mapped + traced) / requested,
    }


# -------------------------------------------------------------- bytearray


def _bytearray(n: int, size: int) -> Dict[str, Any]:
    keep: List[Any] = [None] * n
    rss0, _, _ = _baseline()
    with gc_paused():
        for i in range(n):
            keep[i] = bytearray(size)
    rss1 = rss_bytes()
    sizeof = sys.getsizeof(keep[0])
    keep = [None] * n
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            keep[i] = bytearray(size)
        traced = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    keep = None  # type: ignore[assignment]
    requested = n * size
    return {
        "impl": "bytearray", "label": "bytearray(size)", "is_peer": True, "n": n, "size": size,
        "requested": requested, "primary": sizeof / size,
        "primary_what": "sys.getsizeof(bytearray(size)) / size",
        "rss_delta": rss1 - rss0, "rss_per_byte": (rss1 - rss0) / requested,
        "pyobj_sizeof": sizeof, "pyobj_traced_per_alloc": traced / n,
        "total_per_byte": traced / requested,
    }


# --------------------------------------------------------------- libsodium


def _sodium(n: int, size: int, sodium: Any) -> Dict[str, Any]:
    max_map = int(read_sysctl("/proc/sys/vm/max_map_count") or 65530)
    cap = max(0, (max_map - vma_count() - MAP_COUNT_MARGIN) // 4)
    count = min(n, cap)
    keep = array("Q", bytes(8 * count))
    rss0, mapped0, vmas0 = _baseline()
    done = 0
    failure = None
    try:
        malloc = sodium.malloc
        for i in range(count):
            p = malloc(size)
            if not p:
                failure = (f"sodium_malloc returned NULL after {i:,} blocks "
                           f"(errno {ctypes.get_errno()})")
                break
            keep[i] = p
            done = i + 1
        rss1, mapped1, vmas1 = rss_bytes(), mapped_bytes(), vma_count()
    finally:
        for i in range(done):
            sodium.free(keep[i])
    requested = done * size
    row: Dict[str, Any] = {
        "impl": "sodium", "label": "libsodium sodium_malloc", "is_peer": True, "n": done,
        "n_wanted": n, "size": size, "requested": requested,
        "primary_what": "growth of mapped address space (/proc/self/maps) / requested",
        "failure": failure,
    }
    if done:
        row.update({
            "primary": (mapped1 - mapped0) / requested, "mapped_delta": mapped1 - mapped0,
            "vmas_delta": vmas1 - vmas0, "vmas_per_alloc": (vmas1 - vmas0) / done,
            "rss_delta": rss1 - rss0, "rss_per_byte": (rss1 - rss0) / requested,
            "total_per_byte": (mapped1 - mapped0) / requested,
        })
    if done < n:
        row["limited"] = (f"measured at {done:,} blocks, not {n:,}: {done:,} × ~4 VMAs is "
                          f"as close to vm.max_map_count = {max_map:,} as is safe "
                          f"({MAP_COUNT_MARGIN:,} VMAs kept free)")
    return row


# ----------------------------------------------------------------- OpenSSL


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def child_main(argv: List[str]) -> int:
    """In a fresh child process: measure one implementation at one size and
    print the row as JSON.  ``prmem|bytearray|sodium N SIZE`` or
    ``openssl ARENA N SIZE``."""
    kind = argv[0]
    if kind == "openssl":
        return _openssl_child(argv[1:])
    n, size = int(argv[1]), int(argv[2])
    if kind == "prmem":
        row = _prmem(n, size)
    elif kind == "bytearray":
        row = _bytearray(n, size)
    elif kind == "sodium":
        try:
            sodium = peers.get("sodium")
        except peers.PeerUnavailable as exc:
            print(json.dumps({"unavailable": str(exc)}))
            return 0
        row = _sodium(n, size, sodium)
    else:
        raise SystemExit(f"unknown implementation {kind!r}")
    print(json.dumps(row))
    return 0


def _run_child(args: List[str]) -> Dict[str, Any]:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "-c",
           "import sys\nfrom benchmarks.workloads.overhead import child_main\n"
           "sys.exit(child_main(sys.argv[1:]))"] + args
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=repo,
                          env=child_env())
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed: {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _openssl_child(argv: List[str]) -> int:
    from ..harness import mapped_bytes as mapped, rss_bytes as rss

    arena, n, size = (int(x) for x in argv)
    peers.versions()  # load libcrypto first: its code pages are not the heap's cost
    rss0, mapped0 = rss(), mapped()
    try:
        heap = peers.get("openssl", arena_bytes=arena)
    except peers.PeerUnavailable as exc:
        print(json.dumps({"unavailable": str(exc)}))
        return 0
    rss1, mapped1 = rss(), mapped()
    used0 = heap.used()
    keep = array("Q", bytes(8 * n))
    done = 0
    for i in range(n):
        p = heap.malloc(size, None, 0)
        if not p:
            break
        ctypes.memset(p, 0xA5, size)
        keep[i] = p
        done = i + 1
    out = {"arena": arena, "done": done, "used": heap.used() - used0, "init": heap.init_result,
           "version": heap.version, "rss_init": rss1 - rss0, "rss_allocs": rss() - rss1,
           "mapped_init": mapped1 - mapped0}
    for i in range(done):
        heap.free(keep[i], None, 0)
    print(json.dumps(out))
    return 0


def _openssl(ctx: RunContext, n: int, size: int) -> Optional[Dict[str, Any]]:
    block = max(OPENSSL_MIN_BLOCK, _next_pow2(size))
    arena = _next_pow2(n * block)
    for _ in range(3):
        got = _run_child(["openssl", str(arena), str(n), str(size)])
        if "unavailable" in got:
            ctx.skip(NAME, "OpenSSL secure heap", got["unavailable"])
            return None
        if got["done"] == n:
            break
        arena *= 2  # fragmentation: try the next power of two
    requested = got["done"] * size
    return {
        "impl": "openssl", "label": "OpenSSL CRYPTO_secure_malloc", "is_peer": True,
        "n": got["done"], "n_wanted": n, "size": size, "requested": requested,
        "primary": got["arena"] / requested if requested else None,
        "primary_what": "secure-heap arena (smallest power of two that holds them) / requested",
        "arena": got["arena"], "used_per_byte": got["used"] / requested if requested else None,
        "mapped_delta": got["mapped_init"],
        "rss_delta": got["rss_init"] + got["rss_allocs"],
        "rss_per_byte": (got["rss_init"] + got["rss_allocs"]) / requested if requested else None,
        "total_per_byte": got["arena"] / requested if requested else None,
        "init_result": got["init"], "version": got["version"],
        "failure": None if got["done"] == n else f"only {got['done']:,} allocations fit",
    }


# -------------------------------------------------------------------- run


def run(ctx: RunContext) -> Dict[str, Any]:
    n = ctx.pick(10_000, 100_000)
    ctx.log(f"[{NAME}] {n:,} allocations of {', '.join(map(str, SIZES))} B ...")
    rows: List[Dict[str, Any]] = []
    dead: Dict[str, str] = {}
    openssl_ok = True
    for size in SIZES:
        for kind in ("prmem", "bytearray", "sodium"):
            if kind in dead:
                continue
            try:
                row = _run_child([kind, str(n), str(size)])
            except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
                if kind == "prmem":
                    raise
                dead[kind] = f"{type(exc).__name__}: {exc}"
                ctx.skip(NAME, kind, dead[kind])
                continue
            if "unavailable" in row:
                dead[kind] = row["unavailable"]
                ctx.skip(NAME, kind, dead[kind])
                continue
            rows.append(row)
        if openssl_ok:
            try:
                row = _openssl(ctx, n, size)
            except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
                ctx.skip(NAME, "OpenSSL secure heap", f"{type(exc).__name__}: {exc}")
                row = None
            if row is None:
                openssl_ok = False
            else:
                rows.append(row)
    for size in SIZES:
        here = [r for r in rows if r["size"] == size]
        best = min((r["primary"] for r in here if r["is_peer"] and r.get("primary")), default=None)
        best_total = min((r["total_per_byte"] for r in here
                          if r["is_peer"] and r.get("total_per_byte")), default=None)
        for r in here:
            r["ratio_vs_best_peer"] = ratio(r.get("primary"), best)
            r["total_ratio_vs_best_peer"] = ratio(r.get("total_per_byte"), best_total)

    def prmem_at(size: int, key: str) -> Optional[float]:
        return next((r.get(key) for r in rows if r["impl"] == "prmem" and r["size"] == size),
                    None)
    v32 = prmem_at(32, "primary")
    targets = [{"name": "prmem bytes mapped / requested, 32 B", "value": v32, "target": "≤ 1.2×",
                "met": None if v32 is None else v32 <= 1.2,
                "description": f"pool.stats() after {n:,} × alloc(32)"}]
    obj = prmem_at(32, "pyobj_sizeof")
    notes = [
        "'memory / requested' is each implementation's own measure (column 'measured as'); "
        "'vs best peer' compares it with the lowest peer value at the same size.",
        f"prmem's pool memory excludes the Python objects: each Allocation is a {obj}-byte "
        "object ('Python B/alloc': sys.getsizeof and tracemalloc), which for small sizes "
        "costs more than the data itself; 'incl. Python objects' adds them (for the C peers, "
        "whose pointers are kept in an array('Q'), it equals their own measure).",
        "Each implementation and size is measured in a fresh child process (the same "
        "interpreter and prmem), so that RSS and VMA counts start from a clean process. "
        "RSS Δ / requested: RSS growth after allocating (prmem: and writing every byte); "
        "it includes the Python objects.",
        "prmem rounds each allocation up to the pool's alignment (8 B by default: 100 B takes "
        "104 B) and pages out areas of at least refill = 64 KiB; bytes_reserved (address space "
        "held for later areas, PROT_NONE) is in latest.json, not in the ratio.",
        "libsodium: each block is its own mapping of guard page + header page + data pages + "
        "guard page (so ~4 VMAs and ≥ 16 KiB of address space per block, of which 2 pages are "
        "touched and mlock()ed); measured at the largest count that stays below "
        "vm.max_map_count.",
        "OpenSSL: the arena is mmap()ed (plus 2 guard pages) and mlock()ed at init, so all of "
        "it is resident; its buddy allocator rounds each request up to a power of two "
        f"(minimum block {OPENSSL_MIN_BLOCK} B here: 'used / requested'); its bit tables are "
        "malloc()ed outside the arena and not counted. One process can only set the secure "
        "heap up once, hence a child process per size.",
        "bytearray: sys.getsizeof = 56-byte object header + size + 1 (the trailing NUL); "
        "tracemalloc counts the object and its buffer as allocated (pymalloc's rounding to "
        "16 B is not included).",
    ]
    notes += sorted({r["limited"] for r in rows if r.get("limited")})
    return {"rows": rows, "targets": targets, "n": n, "sizes": SIZES, "notes": notes,
            "page_size": PAGE_SIZE}


# ----------------------------------------------------------------- output


def _x(value: Optional[float]) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _bytes(value: int) -> str:
    if value >= 1 << 20:
        return f"{value / 1048576:,.1f} MiB"
    return f"{value / 1024:,.0f} KiB"


def markdown(result: Dict[str, Any]) -> str:
    out = [f"## {TITLE}", "",
           f"{result['n']:,} allocations per size (fewer where a row says so).", ""]
    rows = []
    for r in result["rows"]:
        pyobj = ("—" if r.get("pyobj_sizeof") is None else
                 f"{r['pyobj_sizeof']} / {r['pyobj_traced_per_alloc']:.1f}")
        rows.append([r["label"], f"{r['size']:,}", f"{r['n']:,}", _x(r.get("primary")),
                     fmt_ratio(r.get("ratio_vs_best_peer")), _x(r.get("total_per_byte")),
                     fmt_ratio(r.get("total_ratio_vs_best_peer")), _x(r.get("rss_per_byte")),
                     pyobj, "—" if r.get("vmas_delta") is None else fmt_num(r["vmas_delta"]),
                     r["primary_what"], r.get("failure") or (
                         f"capped at {r['n']:,} by vm.max_map_count" if r.get("limited")
                         else "")])
    out.append(md_table(["implementation", "size B", "n", "memory / requested", "vs best peer",
                         "incl. Python objects", "vs best peer (incl.)", "RSS Δ / requested",
                         "Python B/alloc (sizeof / traced)", "VMAs Δ", "measured as",
                         "failure / limit"], rows))
    extra = []
    for r in result["rows"]:
        if r["impl"] == "openssl":
            extra.append([f"OpenSSL, {r['size']} B", f"arena {_bytes(r['arena'])} "
                          f"(init returned {r.get('init_result')}), "
                          f"used / requested {_x(r.get('used_per_byte'))}"])
        elif r["impl"] == "prmem":
            extra.append([f"prmem, {r['size']} B",
                          f"{r['areas']:,} areas in {r['chunks']} chunk(s), "
                          f"{_bytes(r['bytes_mapped'])} mapped, "
                          f"{_bytes(r['bytes_reserved'])} reserved, "
                          f"RSS Δ {_bytes(max(r['rss_delta'], 0))}"])
    if extra:
        out += ["", md_table(["", "details"], extra)]
    out += ["", targets_table(result["targets"]), "", "Notes:", ""]
    out += [f"- {n}" for n in result["notes"]]
    return "\n".join(out) + "\n"


def summary(result: Dict[str, Any]) -> List[List[str]]:
    rows = []
    for r in result["rows"]:
        if r["size"] != 32:
            continue
        rows.append([f"overhead {r['impl']} 32 B",
                     f"{_x(r.get('primary'))} per byte ({fmt_ratio(r.get('ratio_vs_best_peer'))} "
                     f"of best peer), incl. Python objects {_x(r.get('total_per_byte'))}"])
    for t in result["targets"]:
        rows.append([t["name"], f"{fmt_ratio(t['value'])} (target {t['target']}: "
                     f"{'—' if t['met'] is None else ('met' if t['met'] else 'NOT met')})"])
    return rows


def plot(result: Dict[str, Any], out_dir: str, plt: Any) -> List[str]:
    impls: List[str] = []
    labels: Dict[str, str] = {}
    for r in result["rows"]:
        if r["impl"] not in impls:
            impls.append(r["impl"])
            labels[r["impl"]] = r["label"]
    sizes = result["sizes"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    width = 0.8 / max(len(impls), 1)
    for ax, key, title in [(axes[0], "primary", "memory / byte requested (own measure)"),
                           (axes[1], "total_per_byte", "including Python objects")]:
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for i, size in enumerate(sizes):
                r = next((r for r in result["rows"] if r["impl"] == impl and r["size"] == size),
                         None)
                if r and r.get(key):
                    xs.append(i + (j - (len(impls) - 1) / 2) * width)
                    ys.append(r[key])
            ax.bar(xs, ys, width=width, label=labels[impl])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(sizes)))
        ax.set_xticklabels([f"{s} B" for s in sizes])
        ax.set_xlabel("allocation size")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0].set_ylabel("bytes per byte requested (log)")
    axes[0].legend(fontsize="small")
    path = save_figure(plt, fig, out_dir, "overhead")
    return [path]
