"""protect: what write-protecting memory full of written data costs.

Each implementation gets ``size`` bytes (1 MiB, 64 MiB, 1 GiB; quick mode
1 MiB and 64 MiB), writes every byte of it (so every page is really
present and mapped writable), then is timed making all of it read-only:

* prmem, ``Pool(Mode.RO)``: ``pool.protect()`` seals each chunk's memfd and
  re-maps the used part read-only (after an ``mprotect(PROT_READ)``, see
  docs/design.md);
* prmem, ``Pool(Mode.WR)``: ``pool.protect()`` is one ``mprotect(PROT_READ)``
  per run of adjacent writable areas;
* naive: one ``mprotect(PROT_READ)`` of an mmap()ed anonymous region of the
  same size, in one call (libc through ctypes);
* libsodium: ``sodium_mprotect_readonly()`` of one ``sodium_malloc(size)``
  block;
* doing nothing: a call of a no-op function, timed the same way, because
  leaving the memory writable costs nothing; protect() does cost something
  and the table says how much, also relative to writing the data.

prmem pools hold allocations of 64 KiB (one area each at the default
refill).  Each measurement creates, writes, protects and destroys its own
pool or mapping; one ``perf_counter_ns`` reading either side of the call.
Syscalls per protect are counted in a child process run under ``strace -f``
(marker syscalls around the protect call), if strace is installed.
"""
from __future__ import annotations

import ctypes
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional

import prmem

from .. import peers
from ..harness import (RunContext, child_env, gc_paused, new_samples, per_call_loop, perf_ns,
                       ratio, rss_bytes, summarize, vma_at, vma_count)
from ..report import fmt_num, fmt_ratio, md_table, save_figure

NAME = "protect"
TITLE = "protect — write-protecting 1 MiB … 1 GiB of written data"
MiB = 1 << 20
ALLOC_SIZE = 65536
FILL = 0xA5
MARKER = "/prmem-benchmarks-marker"


class Subject:
    """One way of making ``size`` written bytes read-only."""

    key = ""
    label = ""
    how = ""
    is_peer = True

    def setup(self, size: int) -> None:
        raise NotImplementedError

    def address(self) -> int:
        raise NotImplementedError

    def fill(self) -> None:
        raise NotImplementedError

    def protect(self) -> None:
        raise NotImplementedError

    def check(self) -> Optional[str]:
        """After protect(): a problem, or None if all is as expected."""
        return None

    def extra(self) -> Dict[str, Any]:
        return {}

    def teardown(self) -> None:
        raise NotImplementedError


class PrmemSubject(Subject):
    is_peer = False

    def __init__(self, mode: prmem.Mode) -> None:
        self.mode = mode
        self.key = f"prmem_{mode.name.lower()}"
        if mode == prmem.Mode.RO:
            self.label = "prmem Pool(RO).protect()"
            self.how = "seal the memfd + mprotect + MAP_FIXED read-only re-map, per chunk"
            self.state = prmem.State.READ_ONLY
        else:
            self.label = "prmem Pool(WR).protect()"
            self.how = "mprotect(PROT_READ) per run of adjacent writable areas"
            self.state = prmem.State.WRITE_RARE
        self.pool: Any = None
        self.allocs: Any = None

    def setup(self, size: int) -> None:
        self.pool = prmem.Pool(self.mode, name=f"bench-protect-{self.mode.name}")
        alloc = self.pool.alloc
        self.allocs = [alloc(ALLOC_SIZE) for _ in range(size // ALLOC_SIZE)]

    def address(self) -> int:
        return self.allocs[0].address

    def fill(self) -> None:
        memset = ctypes.memset
        for a in self.allocs:
            memset(a.address, FILL, ALLOC_SIZE)

    def protect(self) -> None:
        self.pool.protect()

    def check(self) -> Optional[str]:
        st = self.pool.stats()
        if st.areas_by_state[self.state] != st.areas:
            return f"only {st.areas_by_state[self.state]} of {st.areas} areas are {self.state}"
        return None

    def extra(self) -> Dict[str, Any]:
        st = self.pool.stats()
        return {"areas": st.areas, "chunks": st.chunks, "sealed_chunks": st.sealed_chunks}

    def teardown(self) -> None:
        self.allocs = None
        if self.pool is not None:
            self.pool.destroy()
        self.pool = None


class NaiveSubject(Subject):
    key = "naive"
    label = "naive mprotect(PROT_READ), one call"
    how = "one mprotect() of an anonymous MAP_PRIVATE mapping (libc via ctypes)"

    def __init__(self) -> None:
        self.libc = peers.get("libc")
        self.addr = 0
        self.size = 0

    def setup(self, size: int) -> None:
        self.addr = self.libc.map_page(size)
        self.size = size

    def address(self) -> int:
        return self.addr

    def fill(self) -> None:
        ctypes.memset(self.addr, FILL, self.size)

    def protect(self) -> None:
        if self.libc.mprotect(self.addr, self.size, peers.PROT_READ) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mprotect: {os.strerror(err)}")

    def teardown(self) -> None:
        if self.addr:
            self.libc.munmap(self.addr, self.size)
        self.addr = 0


class SodiumSubject(Subject):
    key = "sodium"
    label = "libsodium sodium_mprotect_readonly()"
    how = "one sodium_malloc(size) block (guard pages, mlock), one mprotect() of it"

    def __init__(self) -> None:
        self.sodium = peers.get("sodium")
        self.ptr = 0
        self.size = 0

    def setup(self, size: int) -> None:
        ptr = self.sodium.malloc(size)
        if not ptr:
            err = ctypes.get_errno()
            raise OSError(err, f"sodium_malloc({size}) returned NULL")
        self.ptr = ptr
        self.size = size

    def address(self) -> int:
        return self.ptr

    def fill(self) -> None:
        ctypes.memset(self.ptr, FILL, self.size)

    def protect(self) -> None:
        if self.sodium.mprotect_readonly(self.ptr) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"sodium_mprotect_readonly: {os.strerror(err)}")

    def teardown(self) -> None:
        if self.ptr:
            self.sodium.free(self.ptr)  # makes it writable, zeroes it, unmaps
        self.ptr = 0


def _subjects(ctx: Optional[RunContext]) -> List[Subject]:
    out: List[Subject] = [PrmemSubject(prmem.Mode.RO), PrmemSubject(prmem.Mode.WR)]
    try:
        out.append(NaiveSubject())
    except peers.PeerUnavailable as exc:
        if ctx:
            ctx.skip(NAME, "naive mprotect", str(exc))
    try:
        out.append(SodiumSubject())
    except peers.PeerUnavailable as exc:
        if ctx:
            ctx.skip(NAME, "libsodium", str(exc))
    return out


# ------------------------------------------------------------ measurement


def _one(subject: Subject, size: int) -> Dict[str, Any]:
    """Set up and write (timed together), protect (timed), inspect and tear
    down (timed) once; the cyclic GC stays out of it."""
    sample: Dict[str, Any] = {}
    with gc_paused():
        t0 = perf_ns()
        subject.setup(size)
        try:
            subject.fill()
            sample["fill_ns"] = perf_ns() - t0
            rss0, vmas0 = rss_bytes(), vma_count()
            t0 = perf_ns()
            subject.protect()
            sample["protect_ns"] = perf_ns() - t0
            sample["rss_drop_bytes"] = rss0 - rss_bytes()
            sample["vmas_delta"] = vma_count() - vmas0
            vma = vma_at(subject.address())
            sample["perms"] = vma["perms"] if vma else None
            problem = subject.check()
            if sample["perms"] is None or "w" in sample["perms"]:
                problem = f"mapping is {sample['perms']} after protect"
            elif ctypes.string_at(subject.address(), 1) != bytes([FILL]):
                problem = "data changed by protect"
            sample["problem"] = problem
            sample.update(subject.extra())
        finally:
            t0 = perf_ns()
            subject.teardown()
            sample["teardown_ns"] = perf_ns() - t0
    return sample


def _nothing_ns(samples: int) -> float:
    """Median ns of calling a no-op function, timed like protect() is."""
    def noop() -> None:
        return None
    loop = per_call_loop("f()", ["f"], label="protect nothing")
    out = new_samples(samples)
    with gc_paused():
        loop(200, out, noop)
        loop(samples, out, noop)
    return summarize(out)["median"]


# ----------------------------------------------------------------- strace

_SYSCALL = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?([a-z_0-9]+)\(")


def child_main(argv: List[str]) -> int:
    """Run in a child under strace: for each ``key:size`` argument set up,
    write, then protect between two marker syscalls (stat of a path that
    does not exist), then tear down."""
    gc.disable()
    subjects = {s.key: s for s in _subjects(None)}
    for arg in argv:
        key, size_text = arg.split(":")
        subject = subjects[key]
        size = int(size_text)
        subject.setup(size)
        subject.fill()
        for phase in ("begin", None, "end"):
            if phase is None:
                subject.protect()
                continue
            try:
                os.stat(f"{MARKER}/{phase}/{key}/{size}")
            except OSError:
                pass
        subject.teardown()
    return 0


def _strace_counts(ctx: RunContext, jobs: List[str]) -> Dict[str, Any]:
    """{"key:size": {syscall: count}} from one strace'd child, or a reason."""
    strace = shutil.which("strace")
    if strace is None:
        ctx.skip(NAME, "syscall counts", "strace is not installed (reported as n/a)")
        return {"error": "strace not installed"}
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with tempfile.TemporaryDirectory(prefix="prmem-bench-") as tmp:
        log = os.path.join(tmp, "strace.txt")
        cmd = [strace, "-f", "-qq", "-o", log, sys.executable, "-c",
               "import sys\nfrom benchmarks.workloads.protect import child_main\n"
               "sys.exit(child_main(sys.argv[1:]))"] + jobs
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=repo,
                                  env=child_env())
        except (OSError, subprocess.SubprocessError) as exc:
            ctx.skip(NAME, "syscall counts", f"strace failed: {exc}")
            return {"error": f"strace failed: {exc}"}
        if proc.returncode != 0:
            why = (proc.stderr.strip().splitlines() or ["?"])[-1]
            ctx.skip(NAME, "syscall counts", f"the strace'd child failed: {why}")
            return {"error": f"strace'd child failed: {why}"}
        counts: Dict[str, Any] = {}
        current: Optional[str] = None
        with open(log, errors="replace") as f:
            for line in f:
                if MARKER in line:
                    parts = line.split(MARKER, 1)[1].split('"', 1)[0].strip("/").split("/")
                    current = f"{parts[1]}:{parts[2]}" if parts[0] == "begin" else None
                    if current:
                        counts[current] = {}
                    continue
                if current is None:
                    continue
                m = _SYSCALL.match(line)
                if m:
                    name = m.group(1)
                    counts[current][name] = counts[current].get(name, 0) + 1
    return counts


def _fmt_syscalls(calls: Optional[Dict[str, int]]) -> str:
    if calls is None:
        return "n/a"
    total = sum(calls.values())
    detail = ", ".join(f"{k} {v}" for k, v in sorted(calls.items(), key=lambda kv: -kv[1]))
    return f"{total} ({detail})" if detail else "0"


# -------------------------------------------------------------------- run


def run(ctx: RunContext) -> Dict[str, Any]:
    sizes = ctx.pick([1 * MiB, 64 * MiB], [1 * MiB, 64 * MiB, 1024 * MiB])
    reps = {1 * MiB: ctx.pick(5, 20), 64 * MiB: ctx.pick(3, 7), 1024 * MiB: ctx.pick(1, 3)}
    subjects = _subjects(ctx)
    ctx.log(f"[{NAME}] protect {', '.join(f'{s // MiB} MiB' for s in sizes)} of written data: "
            f"{', '.join(s.key for s in subjects)} ...")
    raw: Dict[tuple, List[Dict[str, Any]]] = {}
    errors: Dict[str, str] = {}
    for rep in range(max(reps[s] for s in sizes)):
        for size in sizes:
            if rep >= reps[size]:
                continue
            for subject in subjects:
                if subject.key in errors:
                    continue
                try:
                    raw.setdefault((subject.key, size), []).append(_one(subject, size))
                except Exception as exc:  # a peer (or prmem) failing: report, go on
                    errors[subject.key] = f"{type(exc).__name__}: {exc}"
                    ctx.log(f"[{NAME}] {subject.key} failed at {size // MiB} MiB: "
                            f"{errors[subject.key]}")
    nothing = _nothing_ns(ctx.pick(2000, 20000))
    ctx.log(f"[{NAME}] counting syscalls per protect (strace) ...")
    jobs = [f"{s.key}:{size}" for size in sizes for s in subjects if s.key not in errors]
    syscalls = _strace_counts(ctx, jobs)

    rows: List[Dict[str, Any]] = []
    for size in sizes:
        for subject in subjects:
            samples = raw.get((subject.key, size), [])
            prot = summarize(s["protect_ns"] for s in samples)
            fill = summarize(s["fill_ns"] for s in samples)
            row: Dict[str, Any] = {
                "impl": subject.key, "label": subject.label, "how": subject.how,
                "is_peer": subject.is_peer, "size_bytes": size, "reps": prot["n"],
                "protect_ms": prot["median"] / 1e6 if prot["n"] else None,
                "protect_min_ms": prot["min"] / 1e6 if prot["n"] else None,
                "protect_max_ms": prot["max"] / 1e6 if prot["n"] else None,
                "fill_ms": fill["median"] / 1e6 if fill["n"] else None,
                "teardown_ms": (summarize(s["teardown_ns"] for s in samples)["median"] / 1e6
                                if samples else None),
                "rss_drop_bytes": (int(summarize(s["rss_drop_bytes"] for s in samples)["median"])
                                   if samples else None),
                "vmas_delta": (int(summarize(s["vmas_delta"] for s in samples)["median"])
                               if samples else None),
                "perms_after": samples[-1]["perms"] if samples else None,
                "error": errors.get(subject.key) or next(
                    (s["problem"] for s in samples if s.get("problem")), None),
            }
            for k in ("areas", "chunks", "sealed_chunks"):
                if samples and k in samples[-1]:
                    row[k] = samples[-1][k]
            calls = syscalls.get(f"{subject.key}:{size}") if "error" not in syscalls else None
            row["syscalls"] = calls
            row["syscalls_total"] = sum(calls.values()) if calls is not None else None
            row["protect_over_fill"] = ratio(row["protect_ms"], row["fill_ms"])
            row["ratio_vs_nothing"] = ratio(prot["median"] if prot["n"] else None, nothing)
            rows.append(row)
        peer_ms = [r["protect_ms"] for r in rows
                   if r["size_bytes"] == size and r["is_peer"] and r["protect_ms"] is not None]
        best = min(peer_ms) if peer_ms else None
        for r in rows:
            if r["size_bytes"] == size:
                r["ratio_vs_best_peer"] = ratio(r["protect_ms"], best)

    def ms(key: str, size: int) -> Optional[float]:
        for r in rows:
            if r["impl"] == key and r["size_bytes"] == size:
                return r["protect_ms"]
        return None

    largest = sizes[-1]
    extra = {
        f"ro_over_wr_{largest // MiB}MiB": ratio(ms("prmem_ro", largest), ms("prmem_wr", largest)),
        f"ro_over_naive_{largest // MiB}MiB": ratio(ms("prmem_ro", largest), ms("naive", largest)),
        f"wr_over_naive_{largest // MiB}MiB": ratio(ms("prmem_wr", largest), ms("naive", largest)),
    }
    notes = [
        f"Each measurement: a fresh pool (allocations of {ALLOC_SIZE // 1024} KiB) or mapping, "
        "every byte written with memset (so all pages are present and mapped writable), then "
        "one perf_counter_ns reading either side of the protect call; median (min–max) over "
        "the repetitions; the pool or mapping is destroyed after each measurement "
        "('teardown ms').",
        f"'doing nothing' = calling a no-op Python function, timed the same way: "
        f"{nothing:.0f} ns (mostly the clock read). Leaving memory writable is free; "
        "'vs nothing' says what protection costs on top.",
        "'alloc + write ms' = the time it took to get the data in place: creating the pool "
        "and its allocations (or mmap(), or sodium_malloc(), which also fills its block and "
        "mlock()s it) and writing every byte; 'protect / write' = protect time / that time.",
        "prmem RO: protect() mprotect()s each chunk read-only, seals its memfd, then re-maps it "
        "read-only with MAP_FIXED: the old page-table entries are dropped, so the pages leave "
        "RSS ('RSS drop') although they stay in memory (shmem); the first read after protect() "
        "faults them back in (see the read workload). prmem WR and the peers only change "
        "page-table entries.",
        "Syscalls per protect: counted with strace -f in a child process running the same "
        "steps, between two marker syscalls around the protect call ('n/a' without strace). "
        "prmem's rt_sigaction is the check (and, the first time, the installation) of its "
        "SIGSEGV handler for fault reports.",
        "The naive and libsodium peers are anonymous private memory; prmem's is a shared memfd "
        "mapping (4 KiB pages in both cases: transparent huge pages are "
        f"'{_thp_mode('enabled')}' for anonymous and '{_thp_mode('shmem_enabled')}' for shmem "
        "memory on this machine).",
        "prmem's teardown (destroy()) of an unsealed WR pool zeroes the data before releasing "
        "it (pwrite of zeros), so it costs more than sealed RO pools or munmap.",
    ]
    return {"rows": rows, "targets": [], "extra_ratios": extra, "nothing_ns": nothing,
            "sizes": sizes, "alloc_size": ALLOC_SIZE, "syscalls_error": syscalls.get("error"),
            "notes": notes}


def _thp_mode(name: str) -> str:
    try:
        with open(f"/sys/kernel/mm/transparent_hugepage/{name}") as f:
            text = f.read()
        m = re.search(r"\[(\w[\w+]*)\]", text)
        return m.group(1) if m else text.strip()
    except OSError:
        return "unknown"


# ----------------------------------------------------------------- output


def _size(size: int) -> str:
    return f"{size // (1 << 30)} GiB" if size >= 1 << 30 else f"{size // MiB} MiB"


def markdown(result: Dict[str, Any]) -> str:
    out = [f"## {TITLE}", ""]
    rows = []
    for r in result["rows"]:
        rng = ("—" if r["protect_ms"] is None else
               f"{fmt_num(r['protect_min_ms'])}–{fmt_num(r['protect_max_ms'])}")
        rows.append([r["label"], _size(r["size_bytes"]), r["protect_ms"], rng, r["reps"],
                     fmt_ratio(r.get("ratio_vs_best_peer")), fmt_ratio(r.get("ratio_vs_nothing")),
                     r["fill_ms"], fmt_ratio(r.get("protect_over_fill")), r["error"] or ""])
    out.append(md_table(["implementation", "size", "protect ms (median)", "min–max ms", "reps",
                         "vs best peer", "vs nothing", "alloc + write ms", "protect / write",
                         "error"],
                        rows))
    out += ["", f"Doing nothing (no protection): {fmt_num(result['nothing_ns'])} ns per call.",
            "", "What each protect did:", ""]
    drows = []
    for r in result["rows"]:
        pool = (f"{r['areas']:,} areas, {r['chunks']} chunks"
                + (f", {r['sealed_chunks']} sealed" if r.get("sealed_chunks") else "")
                if "areas" in r else "—")
        drows.append([r["label"], _size(r["size_bytes"]), _fmt_syscalls(r.get("syscalls")),
                      "—" if r["rss_drop_bytes"] is None else f"{r['rss_drop_bytes'] / MiB:,.1f}",
                      r["vmas_delta"], r["perms_after"] or "—", pool, r["teardown_ms"]])
    out.append(md_table(["implementation", "size", "syscalls per protect", "RSS drop MiB",
                         "VMAs Δ", "perms after", "pool", "teardown ms"], drows))
    if result.get("syscalls_error"):
        out += ["", f"Syscall counts n/a: {result['syscalls_error']}."]
    out += ["", "Notes:", ""] + [f"- {n}" for n in result["notes"]]
    seen = set()
    for r in result["rows"]:
        if r["label"] not in seen:
            seen.add(r["label"])
            out.append(f"- {r['label']}: {r['how']}")
    return "\n".join(out) + "\n"


def summary(result: Dict[str, Any]) -> List[List[str]]:
    rows = []
    for r in result["rows"]:
        calls = "n/a" if r["syscalls_total"] is None else r["syscalls_total"]
        value = (f"{fmt_num(r['protect_ms'])} ms ({fmt_ratio(r.get('ratio_vs_best_peer'))} of "
                 f"best peer), syscalls {calls}"
                 if r["protect_ms"] is not None else (r["error"] or "no samples"))
        rows.append([f"protect {r['impl']} {_size(r['size_bytes'])}", value])
    return rows


def plot(result: Dict[str, Any], out_dir: str, plt: Any) -> List[str]:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    keys: List[str] = []
    for r in result["rows"]:
        if r["impl"] not in keys:
            keys.append(r["impl"])
    for key in keys:
        pts = [r for r in result["rows"] if r["impl"] == key and r["protect_ms"] is not None]
        if not pts:
            continue
        xs = [r["size_bytes"] / MiB for r in pts]
        style = "-" if key.startswith("prmem") else "--"
        axes[0].plot(xs, [r["protect_ms"] for r in pts], style, marker="o", label=pts[0]["label"])
        axes[1].plot(xs, [100 * (r["protect_over_fill"] or float("nan")) for r in pts], style,
                     marker="o", label=pts[0]["label"])
    axes[0].axhline(result["nothing_ns"] / 1e6, color="tab:gray", linestyle=":",
                    label="doing nothing (no-op call)")
    axes[0].set_ylabel("protect() ms (median, log)")
    axes[0].set_title("time to write-protect written memory")
    axes[1].set_ylabel("% of the time it took to write the data")
    axes[1].set_title("protect cost relative to writing the data")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("MiB protected (log)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize="small")
    path = save_figure(plt, fig, out_dir, "protect")
    return [path]
