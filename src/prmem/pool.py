"""The public pool API: modes, states, pools, write-rare and after-init sections.

The C core (``prmem._core``) does the syscalls and keeps every piece of state
that decides what may be written (modes, per-area states, bounds, buffer
export counts, the pool lock).  This module adds the Pythonic surface:
argument conversion, enums, stats as a dataclass, sessions and references.
"""
from __future__ import annotations

import dataclasses
import enum
import struct
import sys
import threading
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Generic,
    List,
    Mapping,
    Optional,
    Tuple,
    TypeVar,
    Union,
    overload,
)

from . import _core
from .errors import PrmemError, ProtectionError

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, DTypeLike, NDArray
    from typing_extensions import Buffer

    from .frozen import FrozenList, FrozenMap

_T = TypeVar("_T")
_B = TypeVar("_B")

__all__ = [
    "Allocation",
    "Mode",
    "Pool",
    "PoolStats",
    "ProtectedRef",
    "RareWriteSession",
    "Section",
    "State",
    "mark_init_done",
    "rare_memset",
    "rare_write",
    "replace_pool",
    "replace_pool_with",
    "ro_after_init",
    "wr_after_init",
]

#: A range of protectable memory handed out by a pool (``pool.alloc()``...).
Allocation = _core.Allocation


# The C type keeps what must hold the pool lock (bounds, state checks, the
# buffer protocol); these conveniences are plain Python on top of a[:],
# which copies under the lock.  They are set on the C type itself because
# the C core creates every Allocation.

def _allocation_tobytes(self: Allocation) -> bytes:
    """A copy of the whole allocation as ``bytes`` (the same as ``bytes(a)``
    or ``a[:]``); PoolDestroyedError after ``destroy()``."""
    return self[:]


def _allocation_decode(self: Allocation, encoding: str = "utf-8",
                       errors: str = "strict") -> str:
    """The text stored in the allocation, as a C string: the bytes up to the
    first NUL (all of them if there is none), decoded with ``encoding`` and
    ``errors`` as ``bytes.decode`` does.  ``pool.strdup(text).decode()``
    gives ``text`` back.  For encodings whose text contains NUL bytes
    (UTF-16, UTF-32) use ``a.tobytes().decode(...)``."""
    data = self[:]
    end = data.find(b"\0")
    return (data if end < 0 else data[:end]).decode(encoding, errors)


def _allocation_eq(self: Allocation, other: object) -> bool:
    """``a == other``: True if ``other`` is a bytes-like object (bytes,
    bytearray, memoryview, another Allocation, ...) holding the same bytes,
    as ``bytearray`` compares.  Not constant-time: compare secrets with
    ``hmac.compare_digest(a, other)``."""
    # (mypy knows NotImplemented is fine only in methods named __eq__)
    if other is self:
        return True
    if isinstance(other, str):
        return NotImplemented  # type: ignore[no-any-return]
    try:
        view = memoryview(other)  # type: ignore[arg-type]
    except TypeError:
        return NotImplemented  # type: ignore[no-any-return]
    with view:
        return view.nbytes == self.size and view.tobytes() == self[:]


for _name, _method in (("tobytes", _allocation_tobytes), ("decode", _allocation_decode),
                       ("__eq__", _allocation_eq)):
    _method.__name__ = _name
    _method.__qualname__ = "Allocation." + _name
    setattr(Allocation, _name, _method)
# == compares the content, which may change while WRITABLE or WRITE_RARE:
# unhashable, like bytearray (key a dict by a.address or id(a) instead)
setattr(Allocation, "__hash__", None)
del _name, _method


class Mode(enum.IntEnum):
    """How a pool's memory is protected, at allocation time → at protect().

    ``RO``: writable → read-only (sealed).  ``WR``: writable → write-rare.
    ``AUTO_RO``: the current area is writable; opening a new area makes the
    previous one read-only; protect() makes all read-only.  ``AUTO_WR``: the
    same with write-rare.  ``START_WR``: write-rare from the moment memory is
    handed out; protect() keeps it write-rare.
    """

    RO = _core.MODE_RO
    WR = _core.MODE_WR
    AUTO_RO = _core.MODE_AUTO_RO
    AUTO_WR = _core.MODE_AUTO_WR
    START_WR = _core.MODE_START_WR

    def __str__(self) -> str:
        return self.name

    @property
    def has_write_rare(self) -> bool:
        """True if memory of such a pool can be changed with rare_write()."""
        return self in (Mode.WR, Mode.AUTO_WR, Mode.START_WR)


class State(enum.IntEnum):
    """Writability of an area; it only ever increases (never goes back)."""

    WRITABLE = _core.STATE_WRITABLE
    WRITE_RARE = _core.STATE_WRITE_RARE
    READ_ONLY = _core.STATE_READ_ONLY

    def __str__(self) -> str:
        return self.name


_core._set_state_members((State.WRITABLE, State.WRITE_RARE, State.READ_ONLY))

_POINTER_ALIGN_ORDER = 3  # log2(sizeof(void *)) on 64-bit Linux

# Pool._verify() problem codes (enum prmem_verify_problem in csrc/prmem.h).
_VERIFY_PROBLEMS = {
    1: "not mapped",
    2: "mapped by something other than the pool's memory file",
    3: "the pool's file mapped at the wrong offset",
    4: "writable although protected",
    5: "not readable",
    6: "readable outside access() (no-access pool)",
}


def _to_mode(mode: Union[Mode, int, str]) -> Mode:
    if isinstance(mode, bool):
        raise TypeError("mode must be a prmem.Mode, not bool")
    if isinstance(mode, str):
        try:
            return Mode[mode.upper()]
        except KeyError:
            raise ValueError(f"unknown pool mode {mode!r}; expected one of "
                             f"{', '.join(m.name for m in Mode)}") from None
    if isinstance(mode, int):
        try:
            return Mode(mode)
        except ValueError:
            raise ValueError(f"unknown pool mode {mode!r}") from None
    raise TypeError(f"mode must be a prmem.Mode, not {type(mode).__name__}")


def _to_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    return value


@dataclasses.dataclass(frozen=True)
class PoolStats:
    """A snapshot of a pool's counters (``Pool.stats()``).

    ``bytes_mapped`` is the size of all areas; ``bytes_reserved`` the address
    space held for them; ``bytes_lost_to_protection`` the unused tails of
    areas closed by protect()/make_ro(); ``bytes_free`` what is left in the
    current area; ``descriptors`` the file descriptors the pool holds (one
    per chunk that is not sealed READ_ONLY); ``noaccess`` whether it is a
    no-access pool and ``access_holders`` what holds access to it now (open
    ``access()`` blocks, buffer views, frozen-container reads in progress).
    """

    name: str
    mode: Mode
    allocations: int
    areas: int
    chunks: int
    sealed_chunks: int
    bytes_requested: int
    bytes_mapped: int
    bytes_reserved: int
    bytes_lost_to_protection: int
    bytes_free: int
    areas_by_state: Dict[State, int]
    buffer_views: int
    writable_buffer_views: int
    secret: bool
    dontdump: bool
    locked: bool
    seal: bool
    descriptors: int
    noaccess: bool = False
    access_holders: int = 0

    @property
    def bytes_lost(self) -> int:
        """Alias of ``bytes_lost_to_protection``."""
        return self.bytes_lost_to_protection

    def __getitem__(self, key: str) -> Any:
        """``stats["areas"]`` reads the field of that name, as a dict would."""
        if key not in self.__dataclass_fields__ and key != "bytes_lost":
            raise KeyError(key)
        return getattr(self, key)

    def as_dict(self) -> Dict[str, Any]:
        """The counters as a plain dict (states by name)."""
        d = dataclasses.asdict(self)
        d["mode"] = self.mode.name
        d["areas_by_state"] = {state.name: n for state, n in self.areas_by_state.items()}
        return d


class Pool(_core.Pool):
    """A protectable memory pool (the kernel's pmalloc pool).

    ``Pool(mode=Mode.RO, *, name="pool", refill=65536, align_order=None,
    seal=False)``

    Allocations (``alloc``, ``zalloc``, ``calloc``, ``strdup``) are packed into
    page-aligned areas of at least ``refill`` bytes; there is no per-allocation
    free: memory goes back to the system when the pool is destroyed (or with
    ``with Pool(...) as pool:``).  ``protect()`` write-protects every area per
    the mode.  ``align_order`` is log2 of the default alignment (default:
    pointer alignment).  With ``seal=True`` READ_ONLY memory is also
    ``mseal()``ed where the kernel has it: it can then never be unmapped, so
    it is only released when the process exits.

    ``secret=True`` backs the pool with ``memfd_secret()`` (UnsupportedError
    where the kernel lacks it): its pages leave the kernel's direct map, are
    locked in memory, excluded from core dumps, and unreadable through
    ``/proc/PID/mem``.  ``dontdump=True`` excludes a pool from core dumps;
    ``lock=True`` locks its areas in memory.  Locked memory counts against
    RLIMIT_MEMLOCK; exceeding it raises MemoryError naming that limit.
    Each area is at least ``refill`` bytes, so such a pool locks at least
    that much once it allocates: give it a small ``refill`` (a page holds
    a few keys).

    ``share=True`` keeps a read-only descriptor of each sealed chunk, so
    the pool's READ_ONLY memory (and FrozenMaps, FrozenLists, Allocations
    in it) can be passed to other processes: through multiprocessing, or
    ``prmem.send()``/``prmem.recv()``.  Otherwise sealed memory keeps no
    descriptor at all.

    ``noaccess=True`` makes protected memory unreadable too: once an area
    is WRITE_RARE or READ_ONLY its pages are ``PROT_NONE`` except inside
    ``with pool.access():`` (see :meth:`access`).  Meant for keys and
    tokens, with or without ``secret=True``; it cannot be combined with
    ``seal=True`` (access() needs ``mprotect``, which ``mseal`` forbids) or
    ``share=True``.
    """

    __slots__ = ()

    def __init__(
        self,
        mode: Union[Mode, int, str] = Mode.RO,
        *,
        name: str = "pool",
        refill: int = 65536,
        align_order: Optional[int] = None,
        seal: bool = False,
        secret: bool = False,
        dontdump: bool = False,
        lock: bool = False,
        share: bool = False,
        noaccess: bool = False,
    ) -> None:
        mode = _to_mode(mode)
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, not {type(name).__name__}")
        refill = _to_int(refill, "refill")
        if refill <= 0:
            raise ValueError(f"refill must be positive, got {refill}")
        if refill > sys.maxsize - _core.page_size:
            raise MemoryError(f"refill of {refill} bytes is larger than the address space")
        if align_order is None:
            align_order = _POINTER_ALIGN_ORDER
        align_order = _to_int(align_order, "align_order")
        if not 0 <= align_order <= _core.page_shift:
            raise ValueError(f"align_order must be between 0 and {_core.page_shift} "
                             f"(log2 of the page size), got {align_order}")
        super().__init__(int(mode), name, refill, align_order, bool(seal), False,
                         bool(secret), bool(dontdump), bool(lock), bool(share),
                         bool(noaccess))

    @property
    def noaccess(self) -> bool:
        """True for a no-access pool (``Pool(noaccess=True)``)."""
        return bool(self._stats()["noaccess"])

    @property
    def attached(self) -> bool:
        """True if this pool was received from another process (READ_ONLY
        here; destroy() unmaps it in this process only)."""
        return bool(_core.is_attached(self))

    @property
    def mode(self) -> Mode:
        """The pool's :class:`Mode`."""
        return Mode(self._mode)

    def stats(self) -> PoolStats:
        """Return a :class:`PoolStats` snapshot of the pool's counters.

        Like every other method, raises PoolDestroyedError after destroy();
        ``pool.destroyed`` tells whether it was destroyed."""
        raw = self._stats()
        return PoolStats(
            name=self.name,
            mode=Mode(raw["mode"]),
            allocations=raw["allocations"],
            areas=raw["areas"],
            chunks=raw["chunks"],
            sealed_chunks=raw["sealed_chunks"],
            bytes_requested=raw["bytes_requested"],
            bytes_mapped=raw["bytes_mapped"],
            bytes_reserved=raw["bytes_reserved"],
            bytes_lost_to_protection=raw["bytes_lost_to_protection"],
            bytes_free=raw["bytes_free"],
            areas_by_state={
                State.WRITABLE: raw["areas_writable"],
                State.WRITE_RARE: raw["areas_write_rare"],
                State.READ_ONLY: raw["areas_read_only"],
            },
            buffer_views=raw["buffer_views"],
            writable_buffer_views=raw["writable_buffer_views"],
            secret=bool(raw["secret"]),
            dontdump=bool(raw["dontdump"]),
            locked=bool(raw["locked"]),
            seal=bool(raw["seal"]),
            descriptors=raw["descriptors"],
            noaccess=bool(raw["noaccess"]),
            access_holders=raw["access_holders"],
        )

    def verify(self) -> None:
        """Check that the pool's memory is still what prmem made it.

        Raises :class:`ProtectionError` if any area is no longer mapped by
        the pool's own memory file at its own offset (unmapped, replaced with
        ``mmap(MAP_FIXED)``, moved with ``mremap``) or is mapped with weaker
        protection than its state (e.g. ``mprotect(PROT_WRITE)`` on
        WRITE_RARE memory); returns None otherwise.  It reads
        ``/proc/self/maps``, so it sees what the kernel enforces now, not
        what prmem remembers.  READ_ONLY memory without ``seal=True`` can be
        substituted this way by code able to make syscalls; ``seal=True``
        (mseal) prevents it.
        """
        count, findings = self._verify()
        if count == 0:
            return
        details = "; ".join(
            f"{_VERIFY_PROBLEMS.get(problem, 'changed')} at {start:#x}-{end:#x}"
            + (f" ({perms})" if perms else "")
            for _area, start, end, problem, perms in findings)
        more = f" and {count - len(findings)} more" if count > len(findings) else ""
        raise ProtectionError(
            f"prmem pool {self.name!r} is not protected as its state says: {details}{more}. "
            "Code in this process changed its mappings; do not trust data read from it")

    @overload
    def freeze(self, obj: Mapping[Any, Any]) -> FrozenMap: ...
    @overload
    def freeze(self, obj: Union[List[Any], Tuple[Any, ...]]) -> FrozenList: ...

    def freeze(self, obj: Union[Mapping[Any, Any], List[Any], Tuple[Any, ...]]
               ) -> Union[FrozenMap, FrozenList]:
        """Copy a Mapping (-> :class:`prmem.FrozenMap`) or a list or tuple
        (-> :class:`prmem.FrozenList`), with everything nested in it, into
        this pool, and return a read-only handle on the copy.

        Supported values: None, bool, int, float, str, bytes, lists, tuples
        and Mappings of them, nested to any depth; keys: str, bytes, int.
        Anything else raises TypeError naming where it is (``value at
        ['alice']['nets'][2] is a set``), a cycle ValueError; nothing is
        allocated then.  The copy is one allocation, so ``protect()``
        protects all of it.  While a handle is alive the pool cannot be
        destroyed (BufferError).
        """
        from .frozen import freeze
        return freeze(self, obj)

    def array(self, data: Optional[ArrayLike] = None, dtype: Optional[DTypeLike] = None, *,
              shape: Optional[Union[int, Tuple[int, ...]]] = None,
              fill: Any = 0) -> NDArray[Any]:
        """Copy a numpy array-like into this pool and return a read-only
        ``numpy.ndarray`` view of the copy (``writeable`` is False, and it
        does not block ``protect()``); or, with ``shape=`` (and ``dtype=``,
        ``fill=``), allocate one filled with ``fill``.  Needs numpy
        (``pip install 'prmem[numpy]'``).  While the array is alive the pool
        cannot be destroyed (BufferError).
        """
        from .frozen import array
        return array(self, data, dtype, shape=shape, fill=fill)

    def rare_write_session(self) -> RareWriteSession:
        """Return a context manager batching rare writes to this pool.

        ``with pool.rare_write_session() as w: w.write(dst, data)`` — the
        user-space ``rare_write_begin() / __rare_write() / rare_write_end()``.
        """
        return RareWriteSession(self)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.destroy()
        else:
            # leaving because of an exception: never replace it with a
            # BufferError; the pool goes when its last view or handle does
            self._destroy_when_released()

    def __reduce__(self) -> Tuple[Any, ...]:
        raise TypeError("prmem pools cannot be pickled to bytes: protected memory travels "
                        "only between live processes, as a descriptor. Pass a sealed "
                        "Pool(share=True) (or a FrozenMap in one) through multiprocessing, "
                        "or use prmem.send()/prmem.recv()")

    def __repr__(self) -> str:
        if self.destroyed:
            return f"<prmem.Pool {self.name!r} mode={self.mode.name} destroyed>"
        try:
            raw = self._stats()
        except Exception:
            return "<prmem.Pool (uninitialised)>"
        return (f"<prmem.Pool {self.name!r} mode={self.mode.name} "
                f"allocations={raw['allocations']} areas={raw['areas']}>")


# The module-level write-rare functions are the C functions themselves: no
# Python frame on the hot path (their docstrings are in csrc/module.c).
rare_write = _core.rare_write
rare_memset = _core.rare_memset


_open_sessions = threading.local()


class RareWriteSession:
    """A batch of rare writes to one pool (``Pool.rare_write_session()``).

    Opening a second session on the same pool in the same thread raises
    RuntimeError (the kernel's "BUG() if writes are already enabled").  The
    memory is never writable through its mapping, during the session or
    after; each write is applied at once under the pool lock.  A session does
    not make a multi-field update atomic for readers: take your own lock
    around the session if readers must not see a half-done update.
    """

    __slots__ = ("_pool", "_owner")

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._owner: Optional[int] = None

    def __enter__(self) -> RareWriteSession:
        pools = _open_sessions.__dict__.setdefault("pools", set())
        if id(self._pool) in pools:
            raise RuntimeError(f"a rare-write session is already open on pool "
                               f"{self._pool.name!r} in this thread")
        pools.add(id(self._pool))
        self._owner = threading.get_ident()
        return self

    def __exit__(self, *exc_info: object) -> None:
        _open_sessions.__dict__.get("pools", set()).discard(id(self._pool))
        self._owner = None

    def _check(self) -> None:
        if self._owner is None:
            raise RuntimeError("rare-write session is not open")
        if self._owner != threading.get_ident():
            raise RuntimeError("rare-write session belongs to another thread")

    def write(self, dst: Allocation, data: Buffer, offset: int = 0) -> None:
        """Write ``data`` into ``dst`` at ``offset`` (see :func:`rare_write`)."""
        self._check()
        self._pool.rare_write(dst, data, offset)

    def memset(self, dst: Allocation, byte: int, offset: int = 0,
               length: Optional[int] = None) -> None:
        """Fill part of ``dst`` with ``byte`` (see :func:`rare_memset`)."""
        self._check()
        self._pool.rare_memset(dst, byte, offset, length)


class Section(Pool):
    """A process-wide after-init section: ``prmem.ro_after_init`` or
    ``prmem.wr_after_init``.

    Allocate from it freely during init; :func:`mark_init_done` makes
    ro_after_init READ_ONLY (sealed) and wr_after_init WRITE_RARE, once, for
    the life of the process.  Afterwards allocations raise ProtectionError.
    Sections cannot be destroyed, and wr_after_init cannot be made read-only
    (as with the kernel's __wr_after_init).
    """

    __slots__ = ()

    def __init__(self, mode: Mode, name: str) -> None:  # noqa: D107 - internal
        _core.Pool.__init__(self, int(mode), name, 65536, _POINTER_ALIGN_ORDER, False, True)

    def __exit__(self, *exc_info: object) -> None:
        raise ProtectionError(f"{self.name} cannot be used as a context manager: "
                              "sections live as long as the process")

    def __repr__(self) -> str:
        phase = "protected" if self.init_done else "init"
        return f"<prmem section {self.name} ({phase})>"


#: Process-wide section that becomes READ_ONLY at mark_init_done().
ro_after_init = Section(Mode.RO, "ro_after_init")
#: Process-wide section that becomes WRITE_RARE at mark_init_done().
wr_after_init = Section(Mode.WR, "wr_after_init")


def mark_init_done() -> None:
    """End the init phase: protect ``ro_after_init`` (READ_ONLY, sealed) and
    ``wr_after_init`` (WRITE_RARE).  Calling it again is a no-op."""
    ro_after_init._finish_init()
    wr_after_init._finish_init()


# ProtectedRef slots live in one START_WR pool: write-rare from the moment
# they are handed out, so not even their first value is written through a
# writable mapping.
_ref_pool: Optional[Pool] = None
_ref_pool_lock = threading.Lock()


def _ref_slot() -> Allocation:
    global _ref_pool
    with _ref_pool_lock:
        if _ref_pool is None:
            _ref_pool = Pool(Mode.START_WR, name="protected_refs", refill=4096)
        return _ref_pool.zalloc(_RECORD.size)


# What a ProtectedRef records about its target: id() alone can be recycled
# once an object dies, so prmem objects add what no other object can share:
# a pool's serial (never reused), an allocation's address and its pool's
# serial.
_RECORD = struct.Struct("<QQQ")

# slot address -> the target its record names (see ProtectedRef)
_anchors: Dict[int, object] = {}


def _identity(target: object) -> bytes:
    if isinstance(target, _core.Pool):
        return _RECORD.pack(id(target), 1, target.serial)
    if isinstance(target, Allocation):
        return _RECORD.pack(id(target), target.address, target.pool.serial)
    return _RECORD.pack(id(target), 0, id(type(target)))


class ProtectedRef(Generic[_T]):
    """A reference whose authoritative record lives in write-rare memory.

    The seeds' point: protecting data is not enough if the reference to it
    can be redirected to unprotected memory.  A ProtectedRef records the
    identity of its target in a write-rare slot (for prmem pools and
    allocations an identity that is never reused: the pool's serial number,
    the allocation's address) and changes it only with a rare write;
    :meth:`get` checks the Python-side reference against that record and
    raises ProtectionError if they disagree, so a corrupted reference is
    detected instead of followed.  For other objects the record is their
    id() and type; the recorded target is also kept alive by a second,
    internal reference, so its id cannot be recycled for an impostor while
    the record names it.

    It is generic in its target for type checkers: ``ProtectedRef(m)``
    with a FrozenMap ``m`` is a ``ProtectedRef[FrozenMap]``, whose
    ``get()`` returns a FrozenMap and whose ``set()`` takes one.
    ``ProtectedRef()`` starts out pointing at None; declare what it will
    hold: ``current: ProtectedRef[Optional[FrozenMap]] = ProtectedRef()``.
    """

    __slots__ = ("_slot", "_target", "_lock", "__weakref__")

    @overload
    def __init__(self: ProtectedRef[Optional[_B]]) -> None: ...
    @overload
    def __init__(self, target: _T) -> None: ...

    def __init__(self, target: Any = None) -> None:
        self._slot = _ref_slot()
        self._lock = threading.Lock()
        self._target: Any = None
        self.set(target)

    def get(self) -> _T:
        """Return the target, after checking it against the protected record."""
        with self._lock:
            target = self._target
            recorded = bytes(self._slot)
            try:
                actual = _identity(target)
            except PrmemError:  # e.g. an allocation of a destroyed pool
                actual = b""
        if recorded != actual:
            raise ProtectionError("ProtectedRef: the reference does not match its "
                                  "write-rare record; it has been tampered with")
        return target  # type: ignore[no-any-return]

    def set(self, target: _T) -> None:
        """Point the reference at ``target`` (one rare write)."""
        record = _identity(target)
        with self._lock:
            rare_write(self._slot, record)
            self._target = target
            _anchors[self._slot.address] = target

    def __del__(self) -> None:
        slot = getattr(self, "_slot", None)
        if slot is not None:
            _anchors.pop(slot.address, None)

    def __repr__(self) -> str:
        return f"<prmem.ProtectedRef to {type(self._target).__name__}>"


def replace_pool(
    ref: ProtectedRef[Any],
    build: Callable[[Pool], object],
    *,
    mode: Union[Mode, int, str] = Mode.RO,
    name: str = "pool",
    refill: int = 65536,
) -> Pool:
    """The policy-database update sequence (seed 002), in one call, with the
    reference naming the pool: as :func:`replace_pool_with`, except that
    ``ref`` always points at the new pool and only the pool is returned."""
    return _replace(ref, build, False, mode, name, refill)[0]


def replace_pool_with(
    ref: ProtectedRef[Any],
    build: Callable[[Pool], _T],
    *,
    mode: Union[Mode, int, str] = Mode.RO,
    name: str = "pool",
    refill: int = 65536,
) -> Tuple[Pool, _T]:
    """The policy-database update sequence (seed 002), in one call.

    Build a new version in a fresh pool with ``built = build(pool)``, protect
    it, point ``ref`` at it with one rare write, then destroy the pool ``ref``
    pointed into before.  ``ref`` points at ``built`` if that is a
    FrozenMap, FrozenList or Allocation of the new pool (readers then call
    ``ref.get()`` for the current version), otherwise at the new pool.  If
    ``build`` or ``protect()`` fails, the new pool is destroyed and the old
    version keeps serving.  The old pool is destroyed at once if nothing
    refers to its memory any more, or else as soon as the last reader drops
    its handle or view of it.  Returns ``(new pool, built)``.
    """
    return _replace(ref, build, True, mode, name, refill)


def _replace(ref: ProtectedRef[Any], build: Callable[[Pool], _T], point_at_built: bool,
             mode: Union[Mode, int, str], name: str, refill: int) -> Tuple[Pool, _T]:
    old = ref.get()  # a tampered reference is refused before any work
    new = Pool(mode, name=name, refill=refill)
    try:
        built = build(new)
        new.protect()
    except BaseException:
        new._destroy_when_released()
        raise
    old_pool = _pool_of(old)
    ref.set(built if point_at_built and _pool_of(built) is new else new)
    del old
    if old_pool is not None and old_pool is not new:
        old_pool._destroy_when_released()
    return new, built


def _pool_of(target: object) -> Optional[_core.Pool]:
    """The pool a reference target lives in (None for other objects)."""
    if isinstance(target, _core.Pool):
        return target
    if isinstance(target, (Allocation, _core.FrozenMap, _core.FrozenList)):
        return target.pool
    return None
