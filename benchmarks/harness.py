"""Timing loops, statistics, /proc probes and the reader thread.

Everything the workloads share lives here, so that every implementation of
a workload is measured with the same loop shape and the same clock.

Timing loops are compiled from a statement, as ``timeit`` does: names the
statement uses are passed in as arguments and become fast locals, so the
loop around the statement costs the same whatever is being measured.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import subprocess
import textwrap
import threading
import time
from array import array
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

perf_ns = time.perf_counter_ns

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# ----------------------------------------------------------------- loops


def _indent(stmt: str, spaces: int) -> str:
    return textwrap.indent(textwrap.dedent(stmt).strip("\n"), " " * spaces)


def _compile(src: str, label: str) -> Callable[..., Any]:
    namespace: Dict[str, Any] = {}
    code = compile(src, f"<benchmarks loop: {label}>", "exec")
    exec(code, {"_pc": perf_ns, "_range": range}, namespace)  # noqa: S102 - our own template
    return namespace["_loop"]


def batch_loop(stmt: str, names: Sequence[str] = (), label: str = "batch") -> Callable[..., int]:
    """Return ``loop(n, *values) -> ns``: the time ``stmt`` takes run n times.

    ``names`` are the names ``stmt`` uses; pass their values after ``n``.
    The loop index is available to ``stmt`` as ``_i``.
    """
    params = "".join(f", {name}" for name in names)
    src = (f"def _loop(_n{params}, _pc=_pc, _range=_range):\n"
           f"    _t0 = _pc()\n"
           f"    for _i in _range(_n):\n"
           f"{_indent(stmt, 8)}\n"
           f"    return _pc() - _t0\n")
    return _compile(src, label)


def per_call_loop(stmt: str, names: Sequence[str] = (),
                  label: str = "per-call") -> Callable[..., None]:
    """Return ``loop(n, out, *values)``: runs ``stmt`` n times and stores the
    duration of each run, in ns, in ``out[0:n]`` (an ``array('q')``).

    Each stored duration includes the cost of one clock read (see
    :func:`timer_overhead_ns`).
    """
    params = "".join(f", {name}" for name in names)
    src = (f"def _loop(_n, _out{params}, _pc=_pc, _range=_range):\n"
           f"    for _i in _range(_n):\n"
           f"        _t0 = _pc()\n"
           f"{_indent(stmt, 8)}\n"
           f"        _out[_i] = _pc() - _t0\n")
    return _compile(src, label)


def new_samples(n: int) -> array:
    """A zeroed ``array('q')`` of n slots for :func:`per_call_loop`."""
    return array("q", bytes(8 * n))


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Collect once, then keep the cyclic GC out of the timed region."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class Budget:
    """Decides how many samples to take: at least ``min_samples``, then more
    while ``seconds`` have not passed, never more than ``max_samples``."""

    def __init__(self, seconds: float, min_samples: int, max_samples: int) -> None:
        self.seconds = seconds
        self.min_samples = min_samples
        self.max_samples = max_samples
        self._start = time.perf_counter()

    def more(self, taken: int) -> bool:
        if taken < self.min_samples:
            return True
        if taken >= self.max_samples:
            return False
        return time.perf_counter() - self._start < self.seconds


def timer_overhead_ns(samples: int = 200_000) -> float:
    """Median ns of an empty statement timed with :func:`per_call_loop`:
    what every per-call sample carries on top of the work it measures."""
    loop = per_call_loop("pass", label="timer overhead")
    out = new_samples(samples)
    with gc_paused():
        loop(1000, out)
        loop(samples, out)
    return summarize(out)["median"]


# ------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def summarize(values: Iterable[float]) -> Dict[str, float]:
    """median, p99, min, max, mean and count of a sample."""
    data = sorted(values)
    n = len(data)
    if n == 0:
        return {"n": 0, "median": math.nan, "p99": math.nan, "min": math.nan,
                "max": math.nan, "mean": math.nan}
    mid = n // 2
    median = float(data[mid]) if n % 2 else (data[mid - 1] + data[mid]) / 2.0
    return {
        "n": n,
        "median": median,
        "p99": percentile(data, 99.0),
        "min": float(data[0]),
        "max": float(data[-1]),
        "mean": float(sum(data)) / n,
    }


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    """numerator / denominator, or None when either is missing or zero."""
    if numerator is None or denominator is None:
        return None
    if isinstance(numerator, float) and math.isnan(numerator):
        return None
    if isinstance(denominator, float) and math.isnan(denominator):
        return None
    if denominator == 0:
        return None
    return numerator / denominator


# -------------------------------------------------------------- /proc probes


def rss_bytes() -> int:
    """Resident set size of this process (anonymous + file + shmem pages)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def vma_count() -> int:
    """Number of memory mappings (VMAs) of this process: the lines of
    /proc/self/maps, the quantity vm.max_map_count limits."""
    count = 0
    # Small reads: near the map-count limit a multi-megabyte buffer may
    # itself need a new mapping, which the kernel would refuse.
    with open("/proc/self/maps", "rb", buffering=0) as f:
        while True:
            chunk = f.read(32768)
            if not chunk:
                return count
            count += chunk.count(b"\n")


def mapped_bytes() -> int:
    """Total size of all memory mappings of this process (sum of the VMA
    sizes in /proc/self/maps, PROT_NONE guard pages and reservations
    included): address space, not memory."""
    total = 0
    with open("/proc/self/maps", "rb", buffering=0) as f:
        tail = b""
        while True:
            chunk = f.read(32768)
            if not chunk:
                break
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            for line in lines:
                lo, hi = line.split(b" ", 1)[0].split(b"-")
                total += int(hi, 16) - int(lo, 16)
    return total


def smaps_range(start: int, length: int = 1) -> Optional[Dict[str, Any]]:
    """What /proc/self/smaps says about the mappings overlapping
    [start, start + length): their number ("vmas"), their permissions
    ("perms", of the one holding ``start``) and their numeric fields summed
    (in bytes; whole mappings, also the parts outside the range), or None if
    nothing is mapped at ``start``."""
    end = start + max(length, 1)
    found: Optional[Dict[str, Any]] = None
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo < end and hi > start
                if inside:
                    if found is None:
                        if not lo <= start < hi:
                            return None
                        found = {"start": lo, "perms": line.split()[1], "vmas": 0}
                    found["vmas"] += 1
                    found["end"] = hi
                elif found is not None and lo >= end:
                    break
            elif inside and head.endswith(":"):
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "kB":
                    key = head[:-1]
                    found[key] = found.get(key, 0) + int(parts[1]) * 1024
    return found


def vma_at(addr: int) -> Optional[Dict[str, Any]]:
    """The mapping of this process that contains ``addr`` (see
    :func:`smaps_range`), or None."""
    return smaps_range(addr, 1)


def minor_faults() -> int:
    """Minor page faults of this process so far (getrusage)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def child_env() -> Dict[str, str]:
    """Environment for a child Python running benchmark code: it imports
    the same prmem and the same benchmarks package as this process,
    whether prmem is installed or comes from PYTHONPATH."""
    import prmem

    paths = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    prmem_parent = os.path.dirname(os.path.dirname(os.path.abspath(prmem.__file__)))
    if os.path.basename(prmem_parent) not in ("site-packages", "dist-packages"):
        paths.insert(0, prmem_parent)  # an installed prmem is found without help
    env = dict(os.environ)
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def read_sysctl(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def usable_cpus() -> List[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - Linux has it
        return list(range(os.cpu_count() or 1))


@contextlib.contextmanager
def pinned_to(cpu: Optional[int]) -> Iterator[None]:
    """Pin the calling thread to ``cpu`` (None: leave it alone) and restore
    its previous affinity afterwards."""
    if cpu is None:
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


# --------------------------------------------------------------- machine


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git_commit(repo: str) -> Optional[str]:
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        # "-dirty": the code under test differs from the commit.  A previous
        # run's results and the page made from them are not code under test.
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no",
                                "--", ".", ":!benchmarks/results", ":!docs/performance.md"],
                               capture_output=True, text=True, timeout=10)
        suffix = "-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else ""
        return head.stdout.strip() + suffix
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> Dict[str, Any]:
    """Facts about the machine and the software under test."""
    import prmem

    try:
        import numpy
        numpy_version: Optional[str] = numpy.__version__
    except ImportError:
        numpy_version = None
    uname = os.uname()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {
        "kernel": f"{uname.sysname} {uname.release}",
        "kernel_version": uname.version,
        "machine": uname.machine,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_build": " ".join(platform.python_build()),
        "numpy": numpy_version,
        "prmem": getattr(prmem, "__version__", None),
        "prmem_features": sorted(getattr(prmem, "features", ())),
        "prmem_commit": _git_commit(repo),
        "page_size": PAGE_SIZE,
        "vm_max_map_count": _int_or_none(read_sysctl("/proc/sys/vm/max_map_count")),
        "clocksource": read_sysctl(
            "/sys/devices/system/clocksource/clocksource0/current_clocksource"),
        "timer_overhead_ns": timer_overhead_ns(),
        "loadavg_at_start": _loadavg(),
        "thp_enabled": _bracketed("/sys/kernel/mm/transparent_hugepage/enabled"),
        "thp_shmem_enabled": _bracketed("/sys/kernel/mm/transparent_hugepage/shmem_enabled"),
    }


def _bracketed(path: str) -> Optional[str]:
    """The selected word of a sysfs choice file ("always madvise [never]")."""
    text = read_sysctl(path)
    if text is None:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return text


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class CpuLoadProbe:
    """How much CPU *other* processes used while we ran: busy time of all
    CPUs (/proc/stat) minus this process's own CPU time, as a fraction of
    the machine's capacity over the wall time.  0.0 is a quiet machine."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> Optional[tuple]:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        # user nice system idle iowait irq softirq steal ...
        busy = sum(fields[i] for i in (0, 1, 2, 5, 6) if i < len(fields)) / hz
        own = sum(os.times()[:4])
        return (busy, own, time.monotonic())

    def other_load(self) -> Optional[float]:
        end = self._read()
        if self._start is None or end is None:
            return None
        busy = end[0] - self._start[0]
        own = end[1] - self._start[1]
        wall = end[2] - self._start[2]
        cpus = len(usable_cpus()) or 1
        if wall <= 0:
            return None
        return max(0.0, (busy - own) / (wall * cpus))


def busy_processes(min_cpu_percent: float = 20.0) -> List[str]:
    """Other processes with a high %CPU in ps (CPU time over their lifetime)
    when the run ended, so a reader of the report can tell whether the
    machine was quiet."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,comm", "--no-headers"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    busy = []
    for line in out.stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0] != str(os.getpid()):
            try:
                if float(parts[1]) >= min_cpu_percent:
                    busy.append(f"{parts[2]} (pid {parts[0]}, {parts[1]}% CPU)")
            except ValueError:
                continue
    return busy


def _int_or_none(text: Optional[str]) -> Optional[int]:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


# ----------------------------------------------------------------- reader


class BufferReader(threading.Thread):
    """A thread that keeps reading one buffer, with the GIL released.

    It wraps the buffer in a numpy uint64 array and builds a stride-0 view
    that repeats it ``repeat`` times (``as_strided``, no copy), so one
    ``view.sum()`` reads the *same* memory ``repeat`` times in a single C
    call, during which numpy releases the GIL.  ``repeat`` is calibrated so
    that one pass takes about ``pass_ms``; the thread only needs the GIL for
    the few bytecodes between passes.  Pinned to ``cpu`` when given, it
    keeps the buffer's page in that CPU's TLB, so any change of the page's
    protection has to be shot down there.
    """

    def __init__(self, buf: Any, *, cpu: Optional[int], pass_ms: float) -> None:
        super().__init__(name="benchmarks-reader", daemon=True)
        import numpy as np
        from numpy.lib.stride_tricks import as_strided

        base = np.frombuffer(buf, dtype=np.uint64)
        self._base = base
        self._as_strided = as_strided
        self.cpu = cpu
        self.bytes_per_row = base.nbytes
        # Calibrate on this thread (no contention yet).
        probe_rows = 2000
        probe = as_strided(base, shape=(probe_rows, base.size), strides=(0, base.itemsize))
        probe.sum()
        best = min(self._time_once(probe) for _ in range(3))
        per_row_ns = max(best / probe_rows, 0.01)
        self.repeat = max(1, int(pass_ms * 1e6 / per_row_ns))
        self._view = as_strided(base, shape=(self.repeat, base.size), strides=(0, base.itemsize))
        self.solo_pass_ns = 0  # measured by the thread itself, see run()
        self.bytes_per_pass = self.repeat * self.bytes_per_row
        self.passes = 0
        self._stop_event = threading.Event()
        self._running = threading.Event()
        self.error: Optional[BaseException] = None

    @staticmethod
    def _time_once(view: Any) -> int:
        t0 = perf_ns()
        view.sum()
        return perf_ns() - t0

    def run(self) -> None:
        try:
            if self.cpu is not None:
                os.sched_setaffinity(0, {self.cpu})
            view = self._view
            stop = self._stop_event
            # Solo pass time, on this thread's CPU, while the caller waits
            # for _running (nothing else of ours runs yet).
            self.solo_pass_ns = min(self._time_once(view) for _ in range(2))
            self._running.set()
            while not stop.is_set():
                view.sum()
                self.passes += 1
        except BaseException as exc:  # pragma: no cover - reported by the caller
            self.error = exc
            self._running.set()

    def start_and_wait(self) -> None:
        self.start()
        self._running.wait(timeout=60)
        try:
            self._cpu_clock: Optional[int] = time.pthread_getcpuclockid(self.ident)
        except (AttributeError, OSError):  # pragma: no cover - Linux has it
            self._cpu_clock = None

    def snapshot(self) -> tuple:
        """(passes, wall ns, reader CPU ns or None), for :meth:`throughput`."""
        cpu = None
        if self._cpu_clock is not None:
            try:
                cpu = time.clock_gettime_ns(self._cpu_clock)
            except OSError:
                cpu = None
        return (self.passes, perf_ns(), cpu)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)
        self._view = None
        self._base = None

    def throughput(self, first: tuple, last: tuple) -> Dict[str, Optional[float]]:
        """What the reader did between two snapshots.

        ``on_cpu``: the reader thread's CPU time / wall time, i.e. how much
        of the window it was running (not waiting for the GIL or a CPU); a
        running reader is what makes mprotect() interrupt its CPU.
        ``speed``: passes made × their solo duration (calibrated before the
        run) / wall time, i.e. its read rate relative to running alone.
        """
        passes = last[0] - first[0]
        elapsed = max(last[1] - first[1], 1)
        on_cpu = None
        if first[2] is not None and last[2] is not None:
            on_cpu = (last[2] - first[2]) / elapsed
        return {
            "passes": passes,
            "read_GBps": passes * self.bytes_per_pass / elapsed,
            "speed": passes * self.solo_pass_ns / elapsed,
            "on_cpu": on_cpu,
            "pass_ms_solo": self.solo_pass_ns / 1e6,
        }


# ---------------------------------------------------------------- context


class RunContext:
    """What a workload gets: the mode, a logger and a place to note skips."""

    def __init__(self, quick: bool, out_dir: str, verbose: bool = True) -> None:
        self.quick = quick
        self.out_dir = out_dir
        self.verbose = verbose
        self.skipped: List[str] = []

    def log(self, message: str) -> None:
        if self.verbose:
            print(message, flush=True)

    def skip(self, workload: str, what: str, why: str) -> str:
        """Record and print that ``what`` was skipped in ``workload``."""
        message = f"[{workload}] skipping {what}: {why}"
        self.skipped.append(message)
        print(message, flush=True)
        return message

    def pick(self, quick: Any, full: Any) -> Any:
        """The quick-mode or the full-mode value of a parameter."""
        return quick if self.quick else full
