"""Prove that your own data is protected: assertions for your test suite.

``assert_protected(obj)`` does what an attacker's stray write would do: in
forked child processes it writes single bytes of ``obj``'s memory with native
code (``ctypes``), the first and the last byte and ``samples`` random bytes
between, one child per byte, and fails unless every child died of SIGSEGV
and the data is unchanged here.  ``assert_write_rare(obj)`` also checks that
``prmem.rare_write()`` can still change the memory (and puts back what was
there).  After Chromium's ``VerifyByteSequenceIsNotWriteable`` death test.

Both take an :class:`prmem.Allocation`, a :class:`prmem.FrozenMap` or
:class:`prmem.FrozenList` (the whole structure it belongs to), a numpy array
made by ``Pool.array()`` (or a view of one), or, for ``assert_protected``, a
whole :class:`prmem.Pool` (every area it has mapped) or any other object
with a contiguous buffer (a ``bytearray`` fails, as it should).

The pytest fixtures ``prmem_pool`` and ``prmem_protected`` are in
:mod:`prmem.pytest_plugin`, which installing prmem registers with pytest.
This module does not need pytest.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import faulthandler
import os
import random
import select
import signal
import time
import warnings
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple

from . import _core
from .errors import ProtectionError

__all__ = ["assert_protected", "assert_write_rare"]

# what a rare-write check flips, at most, at each end of the object
_RARE_SPAN = 4096
_FLIP = bytes(b ^ 0xFF for b in range(256))
# failures listed one by one in an AssertionError before "... and N more"
_LIST_AT_MOST = 10


@dataclasses.dataclass
class _Extent:
    """Where an object's bytes are, and what they belong to."""

    what: str                         # for messages
    ranges: List[Tuple[int, int]]     # (address, length), ascending, disjoint
    pool: Any = None                  # the prmem pool, when there is one
    allocation: Any = None            # the Allocation holding all the bytes
    noaccess: bool = False            # reads must fault too
    # makes the bytes readable here for a moment (None: they cannot be)
    access: Optional[Callable[[], ContextManager[Any]]] = contextlib.nullcontext

    @property
    def length(self) -> int:
        return sum(n for _a, n in self.ranges)

    def address_of(self, offset: int) -> int:
        for start, n in self.ranges:
            if offset < n:
                return start + offset
            offset -= n
        raise IndexError(offset)


def _noaccess(pool: Any) -> bool:
    """True if ``pool``'s memory must not even be read: a pool made with
    ``noaccess=True``.  Then reads are probed as well as writes."""
    return bool(getattr(pool, "noaccess", False))


def _access(pool: Any) -> Optional[Callable[[], ContextManager[Any]]]:
    """What makes ``pool``'s memory readable in this process for a moment:
    nothing for ordinary memory, ``pool.access()`` for a no-access pool;
    None if a no-access pool has no such way (then it is not read here)."""
    if not _noaccess(pool):
        return contextlib.nullcontext
    access = getattr(pool, "access", None)
    return access if callable(access) else None


# -------------------------------------------------------------- extents

class _PyBuffer(ctypes.Structure):
    # Py_buffer, as in CPython's Include/pybuffer.h (stable ABI since 3.11,
    # unchanged since 3.3)
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p),
                ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p),
                ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
                ("internal", ctypes.c_void_p)]


def _buffer_span(obj: Any) -> Tuple[int, int]:
    """(address, length) of a contiguous buffer, read-only ones included."""
    get = ctypes.pythonapi.PyObject_GetBuffer
    get.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
    get.restype = ctypes.c_int
    release = ctypes.pythonapi.PyBuffer_Release
    release.argtypes = [ctypes.POINTER(_PyBuffer)]
    release.restype = None
    view = _PyBuffer()
    get(obj, ctypes.byref(view), 0)  # PyBUF_SIMPLE: contiguous bytes; raises if not
    try:
        return view.buf or 0, view.len
    finally:
        release(ctypes.byref(view))


def _array_span(obj: Any) -> Tuple[int, int]:
    """(address, length) from the lowest to the highest byte an array (numpy's
    ``__array_interface__``) uses, strided views included."""
    iface = obj.__array_interface__
    address = iface["data"][0]
    shape = tuple(iface["shape"])
    itemsize = obj.itemsize if hasattr(obj, "itemsize") else int(iface["typestr"][2:])
    if any(n == 0 for n in shape):
        raise ValueError("an empty array has no memory to check")
    strides = iface.get("strides")
    if strides is None:  # C-contiguous
        count = 1
        for n in shape:
            count *= n
        return address, count * itemsize
    low = sum(min(0, (n - 1) * s) for n, s in zip(shape, strides))
    high = sum(max(0, (n - 1) * s) for n, s in zip(shape, strides))
    return address + low, high - low + itemsize


def _pool_ranges(pool: Any) -> _Extent:
    """Every area a pool has mapped, found in /proc/self/smaps by the name
    of its memory files (the pool's name; "(secret pool)" for secret pools)
    and checked against the pool's own count of mapped bytes."""
    from .inspect import mappings

    stats = pool.stats()
    noaccess = _noaccess(pool)
    access = _access(pool)
    label = "(secret pool)" if stats.secret else pool.name
    attached = bool(getattr(pool, "attached", False))

    def mine() -> List[Any]:
        # memory received from another process is named "<pool> (attached
        # from pid N)" (the sender may be this process: then both are mapped)
        return [m for m in mappings(os.getpid())
                if (m.pool.startswith(label + " (attached from pid ") if attached
                    else m.pool == label)]

    if access is None:
        # areas and the unused rest of each reservation are both mapped
        # without access, and nothing here tells them apart: probe it all
        # (both must fault)
        chosen, expected, what = mine(), stats.bytes_reserved, "reserved"
    else:
        # a no-access pool's areas are readable inside pool.access(), its
        # unused reservation is not
        with access():
            chosen = [m for m in mine() if not m.perms.startswith("---")]
        expected, what = stats.bytes_mapped, "mapped"
    if expected == 0:
        raise ValueError(f"pool {pool.name!r} has no memory to check: allocate first")
    found = sum(m.size for m in chosen)
    if found != expected and stats.secret:
        raise ValueError(
            f"cannot tell the memory of secret pool {pool.name!r} apart: the memory files "
            f"of secret pools carry no name, and /proc/self/maps shows {found} bytes of "
            f"them where this pool has {expected} bytes {what}. Another secret pool is "
            "mapped too: check this pool's allocations one by one")
    if found != expected:
        raise ValueError(
            f"cannot tell the memory of pool {pool.name!r} apart: its memory files are "
            f"mapped as {label!r}, and /proc/self/maps shows {found} bytes of such "
            f"mappings where the pool has {expected} bytes {what}. Another pool of that "
            "name (or a destroyed seal=True one) is mapped too: give the pool a unique "
            "name, or check its allocations one by one")
    ranges: List[Tuple[int, int]] = []
    for m in sorted(chosen, key=lambda m: m.start):
        if ranges and ranges[-1][0] + ranges[-1][1] == m.start:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + m.size)
        else:
            ranges.append((m.start, m.size))
    return _Extent(f"pool {pool.name!r}", ranges, pool, None, noaccess, access)


def _extent(obj: Any) -> _Extent:
    if isinstance(obj, _core.Pool):
        return _pool_ranges(obj)
    if isinstance(obj, _core.Allocation):
        return _Extent(f"allocation of {obj.size} bytes in pool {obj.pool.name!r}",
                       [(obj.address, obj.size)], obj.pool, obj, _noaccess(obj.pool),
                       _access(obj.pool))
    if isinstance(obj, (_core.FrozenMap, _core.FrozenList)):
        kind = "FrozenMap" if isinstance(obj, _core.FrozenMap) else "FrozenList"
        return _Extent(f"{kind} structure of {obj.nbytes} bytes in pool {obj.pool.name!r}",
                       [(obj.address, obj.nbytes)], obj.pool, obj._allocation,
                       _noaccess(obj.pool), _access(obj.pool))
    if hasattr(obj, "__array_interface__"):
        from .sharing import _array_source
        address, length = _array_span(obj)
        source = _array_source(obj)
        if source is None:
            return _Extent(f"array of {length} bytes (not in a prmem pool)",
                           [(address, length)])
        alloc = source.allocation
        return _Extent(f"array of {length} bytes in pool {alloc.pool.name!r}",
                       [(address, length)], alloc.pool, alloc, _noaccess(alloc.pool),
                       _access(alloc.pool))
    try:
        address, length = _buffer_span(obj)
    except (TypeError, BufferError) as e:
        raise TypeError(
            "assert_protected() takes a prmem Allocation, FrozenMap, FrozenList, Pool, "
            f"a Pool.array() view, or an object with a contiguous buffer, not "
            f"{type(obj).__name__} ({e})") from None
    if length == 0:
        raise ValueError(f"this {type(obj).__name__} is empty: no memory to check")
    return _Extent(f"{type(obj).__name__} of {length} bytes", [(address, length)])


def _maps() -> List[Tuple[int, int, str]]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            start, end = (int(x, 16) for x in span.split("-"))
            out.append((start, end, perms))
    return out


def _perms_at(maps: List[Tuple[int, int, str]], address: int) -> str:
    for start, end, perms in maps:
        if start <= address < end:
            return perms
    return "unmapped"


def _check_mapped(extent: _Extent, maps: List[Tuple[int, int, str]]) -> None:
    """Refuse to call unmapped memory protected (every write there faults
    too), and never read it here."""
    for address, length in extent.ranges:
        at, end = address, address + length
        for start, stop, perms in maps:
            if start <= at < stop:
                if not extent.noaccess and not perms.startswith("r"):
                    raise ValueError(f"{extent.what}: memory at {at:#x} is not readable "
                                     f"({perms}); nothing to compare with")
                at = stop
                if at >= end:
                    break
        if at < end:
            raise ValueError(f"{extent.what}: nothing is mapped at {at:#x}: "
                             "the object does not describe live memory")


# -------------------------------------------------------------- probing

def _quiet_death() -> None:
    """In a prober: a fault ends the process with a plain SIGSEGV, no
    fault report or traceback printed for each probe."""
    try:
        _core.fault_report(False)
    except Exception:  # pragma: no cover - best effort
        pass
    faulthandler.disable()
    for sig in (signal.SIGSEGV, signal.SIGBUS):
        signal.signal(sig, signal.SIG_DFL)


def _probe(address: int, kind: str, readable: bool) -> bytes:
    """In a probe child: touch one byte natively.  Returns what to report if
    the touch did not kill the process."""
    if kind == "read":
        value = ctypes.string_at(address, 1)[0]
        return b"read %d" % value
    old = ctypes.string_at(address, 1)[0] if readable else 0x5A
    new = old ^ 0xFF
    ctypes.memset(address, new, 1)           # must die here
    seen = ctypes.string_at(address, 1)[0]
    ctypes.memset(address, old, 1)           # in case the memory is shared
    return b"wrote %d %d" % (old, seen)


def _helper(probes: List[Tuple[int, str]], readable: bool, out: int) -> None:
    """The helper process: one child per probe, forked from here, so the
    process under test forks only once."""
    _quiet_death()
    for address, kind in probes:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                os.write(w, _probe(address, kind, readable))
            finally:
                os._exit(0)
        os.close(w)
        chunks = []
        while True:
            chunk = os.read(r, 256)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        report = b"".join(chunks).replace(b"\n", b" ")
        os.write(out, b"%d %s %d %s\n" % (address, kind.encode(), status, report))


def _run_probes(probes: List[Tuple[int, str]], readable: bool,
                timeout: float) -> Dict[Tuple[int, str], Tuple[int, str]]:
    """(address, kind) -> (wait status, what the child reported)."""
    r, w = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns that fork() in a threaded process may deadlock
        # the child; the probers only make syscalls and exit
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.close(r)
            os.setpgid(0, 0)  # one group with its children: one kill ends all
            _helper(probes, readable, w)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    data = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                _kill_group(pid)
                done = data.count(b"\n")
                raise AssertionError(
                    f"assert_protected: the probes did not finish within {timeout} s "
                    f"({done} of {len(probes)} done): a probe hung")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        done = data.count(b"\n")
        raise RuntimeError(f"the prober process failed (wait status {status:#x}) after "
                           f"{done} of {len(probes)} probes")
    results = {}
    for line in data.decode().splitlines():
        address, kind, child_status, report = (line.split(" ", 3) + [""])[:4]
        results[(int(address), kind)] = (int(child_status), report)
    return results


def _kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):   # the helper's group, else the helper
        try:
            kill(pid, signal.SIGKILL)
        except OSError:
            pass
    os.waitpid(pid, 0)


def _describe(status: int, report: str, kind: str) -> Optional[str]:
    """None if the child died of SIGSEGV, else what happened instead."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGSEGV:
            return None
        return f"the native {kind} killed the child with {signal.Signals(sig).name}, not SIGSEGV"
    fields = report.split()
    if fields[:1] == ["wrote"] and len(fields) == 3:
        old, seen = int(fields[1]), int(fields[2])
        return (f"the native write went through: the byte was {old:#04x}, the child "
                f"wrote {old ^ 0xFF:#04x} and read back {seen:#04x}")
    if fields[:1] == ["read"]:
        return f"the native read went through (read {int(fields[1]):#04x})"
    return (f"the {kind} probe exited with status {os.waitstatus_to_exitcode(status)} "
            f"without faulting ({report.strip() or 'no report'})")


def _fail(extent: _Extent, problems: List[str], total: int, seed: int, obj: Any) -> None:
    head = (f"assert_protected: {len(problems)} of {total} probes of {extent.what} "
            "did not die with SIGSEGV as expected:")
    lines = problems[:_LIST_AT_MOST]
    if len(problems) > _LIST_AT_MOST:
        lines.append(f"... and {len(problems) - _LIST_AT_MOST} more")
    hints = []
    state = getattr(obj, "state", None)
    if state is not None:
        hints.append(f"its state is {state}")
    if not _core.enforced:
        hints.append("PRMEM_ENFORCE=0 is set: prmem protects nothing in this process")
    hints.append(f"probe seed {seed}")
    raise AssertionError("\n  ".join([head] + lines) + "\n(" + "; ".join(hints) + ")")


def _read_bytes(extent: _Extent, addresses: List[int]) -> Dict[int, bytes]:
    """The bytes at ``addresses``, read here (inside ``pool.access()`` for
    a no-access pool); {} if they cannot be read."""
    if extent.access is None:
        return {}
    with extent.access():
        return {a: ctypes.string_at(a, 1) for a in addresses}


def assert_protected(obj: Any, *, samples: int = 64, seed: Optional[int] = None,
                     timeout: float = 60.0) -> None:
    """Fail unless a native write to any byte of ``obj`` dies with SIGSEGV.

    In forked children, each byte probed is written with ``ctypes`` (one
    child per byte; a single helper process forks them): the first and last
    byte of ``obj``'s memory and ``samples`` random bytes between (every byte
    if there are fewer).  Raises AssertionError naming each byte offset that
    a child wrote, or that killed it with another signal, and if the data
    changed in this process.  A child that could write puts the old byte
    back, so probing unprotected memory changes nothing.

    ``obj``: an Allocation, a FrozenMap/FrozenList (the whole structure), a
    ``Pool.array()`` array or view, a Pool (every area it has mapped, found
    by its name in /proc/self/maps: ValueError if another mapped pool has the
    same name), or any object with a contiguous buffer.  In a no-access pool
    (``Pool(noaccess=True)``) reads are probed too and must die; the bytes
    are compared here inside ``pool.access()``, so call it outside one.
    ``seed`` makes the random bytes reproducible (a failure names its seed).
    If the probes take longer than ``timeout`` seconds, they are killed and
    the assertion fails.

    The children write what ``fork()`` gives them: the very same pages for
    sealed READ_ONLY memory and whatever else stays shared across
    ``fork()``, and where prmem gives a child its own copy at ``fork()``,
    that copy, made with the same protections.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValueError(f"samples must be an int >= 0, got {samples!r}")
    extent = _extent(obj)
    maps = _maps()
    _check_mapped(extent, maps)
    if seed is None:
        seed = random.SystemRandom().randrange(2 ** 32)
    length = extent.length
    offsets = {0, length - 1}
    at = 0
    for _start, n in extent.ranges:      # each range's ends, for pools
        offsets.update((at, at + n - 1))
        at += n
    inner = range(1, length - 1)
    offsets.update(random.Random(seed).sample(inner, min(samples, len(inner))))
    kinds = ("write", "read") if extent.noaccess else ("write",)
    probes = [(extent.address_of(off), kind) for off in sorted(offsets) for kind in kinds]
    # the children read a byte before writing it, unless reads must fault
    readable = not extent.noaccess
    before = _read_bytes(extent, [a for a, _k in probes])
    results = _run_probes(probes, readable, timeout)
    after = _read_bytes(extent, [a for a, _k in probes])
    problems = []
    for off in sorted(offsets):
        address = extent.address_of(off)
        for kind in kinds:
            if (address, kind) not in results:
                problems.append(f"byte {off} ({address:#x}): no result from its probe")
                continue
            what = _describe(*results[(address, kind)], kind)
            if what is not None:
                problems.append(f"byte {off} ({address:#x}, mapped "
                                f"{_perms_at(maps, address)}): {what}")
        if before.get(address) != after.get(address):
            problems.append(f"byte {off} ({address:#x}): changed in this process from "
                            f"{before[address][0]:#04x} to {after[address][0]:#04x}")
    if problems:
        _fail(extent, problems, len(probes), seed, obj)


def assert_write_rare(obj: Any, *, samples: int = 64, seed: Optional[int] = None,
                      timeout: float = 60.0) -> None:
    """Fail unless ``obj`` is write-rare: native writes die with SIGSEGV
    (:func:`assert_protected`) and ``prmem.rare_write()`` changes it.

    The rare-write check writes the inverted bytes over (up to 4 KiB at each
    end of) ``obj``'s memory, reads them back through prmem, then rare-writes
    the original bytes back.  Readers in other threads may see the inverted
    bytes meanwhile (a FrozenMap may raise CorruptionError): run it when
    nothing else reads ``obj``.  ``obj``: an Allocation, a FrozenMap or
    FrozenList, or a ``Pool.array()`` array or view.
    """
    extent = None if isinstance(obj, _core.Pool) else _extent(obj)
    alloc = None if extent is None else extent.allocation
    if extent is None or alloc is None:
        raise TypeError(f"assert_write_rare() needs memory that rare_write() can reach: an "
                        f"Allocation, FrozenMap, FrozenList or Pool.array() view, not "
                        f"{type(obj).__name__} (for a pool, check its allocations)")
    assert_protected(obj, samples=samples, seed=seed, timeout=timeout)
    (address, length), = extent.ranges
    base = address - alloc.address
    spans = sorted({(0, min(length, _RARE_SPAN)),
                    (max(0, length - _RARE_SPAN), min(length, _RARE_SPAN))})
    access = extent.access or contextlib.nullcontext
    for off, n in spans:
        lo, hi = base + off, base + off + n
        with access():
            original = bytes(alloc[lo:hi])
        flipped = original.translate(_FLIP)
        try:
            _core.rare_write(alloc, flipped, lo)
        except ProtectionError as e:
            raise AssertionError(f"assert_write_rare: rare_write() to byte {off} of "
                                 f"{extent.what} was refused: {e}") from None
        try:
            with access():
                changed = bytes(alloc[lo:hi])
            if changed != flipped:
                raise AssertionError(f"assert_write_rare: rare_write() to bytes {off}.."
                                     f"{off + n - 1} of {extent.what} returned, but the "
                                     "bytes did not change")
        finally:
            _core.rare_write(alloc, original, lo)
        with access():
            restored = bytes(alloc[lo:hi])
        if restored != original:
            raise AssertionError(f"assert_write_rare: could not restore bytes {off}.."
                                 f"{off + n - 1} of {extent.what}")
