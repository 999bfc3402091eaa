"""Protected Python data: frozen maps and lists, and arrays, in pool memory.

``pool.freeze(obj)`` copies a Mapping or a list/tuple, with everything nested
in it, into one allocation of the pool, in a layout that C reads directly
(docs/frozen-layout.md); the returned :class:`FrozenMap` / :class:`FrozenList`
is only a handle.  Once the pool is protected, nothing that decides a
lookup's answer is in ordinary writable memory: keys, values, the hash index
and every nested container are in the protected pages, and every access
builds fresh Python objects from them.

``pool.array(...)`` does the same for numpy arrays: the data lives in the
pool, and the returned ndarray is a read-only view of it.
"""
from __future__ import annotations

import struct
from collections.abc import ItemsView, Iterator, Mapping, Sequence, ValuesView
from typing import TYPE_CHECKING, Any, Optional, Tuple, Union

from . import _core
from .errors import ProtectionError

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, DTypeLike, NDArray

    from .pool import Pool

__all__ = ["FrozenKey", "FrozenList", "FrozenMap"]

#: The keys a FrozenMap holds (and iterates over): a bool key is stored as
#: the int it equals, as in a dict.
FrozenKey = Union[str, bytes, int]

# Value tags of the layout (enum prmem_fz_tag in csrc/prmem.h) that rare_set
# can replace in place: one 16-byte slot, no blob.
_NONE, _FALSE, _TRUE, _INT, _FLOAT = range(5)
_IN_PLACE = frozenset((_NONE, _FALSE, _TRUE, _INT, _FLOAT))
_TAG_NAMES = {5: "a big int", 6: "a str", 7: "bytes", 8: "a list", 9: "a mapping"}
_SLOT_INT = struct.Struct("<IIq")
_SLOT_FLOAT = struct.Struct("<IId")
_INT64 = range(-(2 ** 63), 2 ** 63)

_REBUILD = ("build a new version in a new pool and swap it in with "
            "prmem.replace_pool_with()")


def _slot_for(value: Any) -> bytes:
    """The 16-byte slot that stores ``value`` in place, or TypeError."""
    if value is None:
        return _SLOT_INT.pack(_NONE, 0, 0)
    if value is True or value is False:
        return _SLOT_INT.pack(_TRUE if value else _FALSE, 0, 0)
    if isinstance(value, int):
        if value not in _INT64:
            raise TypeError(f"rare_set(): {value} does not fit in a 64-bit slot; {_REBUILD}")
        return _SLOT_INT.pack(_INT, 0, int(value))
    if isinstance(value, float):
        return _SLOT_FLOAT.pack(_FLOAT, 0, float(value))
    raise TypeError(f"rare_set() changes None, bool, int or float values in place, not "
                    f"{type(value).__name__}; {_REBUILD}")


def _rare_set(handle: Union[FrozenMap, FrozenList], where: Any,
              value: Union[None, bool, int, float]) -> None:
    slot = _slot_for(value)
    offset, tag = handle._value_slot(where)
    if tag not in _IN_PLACE:
        raise TypeError(f"rare_set(): the value at {where!r} is "
                        f"{_TAG_NAMES.get(tag, 'not a number')}, which cannot change in "
                        f"place; {_REBUILD}")
    # prmem's write-rare path: never a writable mapping; ProtectionError on
    # READ_ONLY memory and in RO/AUTO_RO pools
    _core.rare_write(handle._allocation, slot, offset)


class _FrozenItems(ItemsView[FrozenKey, Any]):
    __slots__ = ()
    _mapping: FrozenMap

    def __iter__(self) -> Iterator[Tuple[FrozenKey, Any]]:
        return self._mapping._iter_items()


class _FrozenValues(ValuesView[Any]):
    __slots__ = ()
    _mapping: FrozenMap

    def __iter__(self) -> Iterator[Any]:
        return self._mapping._iter_values()


class FrozenMap(_core.FrozenMap, Mapping[FrozenKey, Any]):
    """A read-only mapping whose keys, values and index live in pool memory.

    Made by :meth:`Pool.freeze`.  Behaves as a ``dict`` for reading: ``m[k]``
    (``KeyError`` if missing; ``True`` and ``1.0`` find ``1``), ``get``,
    ``in``, ``len``, iteration in insertion order, ``keys()``, ``values()``,
    ``items()``, ``==`` with any Mapping of equal content.  Values come back
    as new objects at each access; nested mappings and lists as new
    :class:`FrozenMap` / :class:`FrozenList` handles.  Assignment and
    deletion raise ``TypeError``; :meth:`rare_set` changes a number in place
    in write-rare pools.  ``thaw()`` returns a plain ``dict``.
    """

    __slots__ = ()

    def items(self) -> ItemsView[FrozenKey, Any]:
        """A view of the (key, value) pairs, in insertion order."""
        return _FrozenItems(self)

    def values(self) -> ValuesView[Any]:
        """A view of the values, in insertion order."""
        return _FrozenValues(self)

    def rare_set(self, key: FrozenKey, value: Union[None, bool, int, float]) -> None:
        """Replace the None/bool/int/float value of ``key`` with ``value``
        through prmem's rare-write path (write-rare pools; ``ProtectionError``
        on READ_ONLY memory).  Other kinds of value cannot change in place:
        ``TypeError`` (build a new version with ``replace_pool``)."""
        _rare_set(self, key, value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        if len(self) != len(other):
            return False
        # one bounded walk of the protected structure (thaw() refuses
        # corrupt data that would make a recursive comparison explode)
        return bool(self.thaw() == _plain(other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return _repr(self, "FrozenMap")


class FrozenList(_core.FrozenList, Sequence[Any]):
    """A read-only sequence whose items live in pool memory.

    Made by :meth:`Pool.freeze` from a list or tuple.  Indexing (negative
    too), slicing (returns a plain list), ``len``, iteration, ``in``,
    ``index``, ``count``, ``==`` with a list or tuple of equal items.
    ``thaw()`` returns a plain ``list``; :meth:`rare_set` changes a number in
    place in write-rare pools.
    """

    __slots__ = ()

    def rare_set(self, index: int, value: Union[None, bool, int, float]) -> None:
        """Replace the None/bool/int/float item at ``index`` with ``value``
        (see :meth:`FrozenMap.rare_set`)."""
        _rare_set(self, index, value)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple, FrozenList)):
            return len(self) == len(other) and self.thaw() == _plain(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return _repr(self, "FrozenList")


def _repr(handle: Union[FrozenMap, FrozenList], kind: str) -> str:
    """The contents, or, outside access() of a no-access pool, where they
    cannot be read, a placeholder: repr() is what loggers and debuggers
    call, and it should not raise."""
    try:
        return f"prmem.{kind}({handle.thaw()!r})"
    except ProtectionError:
        return (f"<prmem.{kind} in no-access pool {handle.pool.name!r}: "
                "readable only inside pool.access()>")


def _plain(obj: Any) -> Any:
    """obj as thaw() would give it: dicts and lists all the way down, so a
    FrozenList compares equal to a tuple and a FrozenMap to any Mapping."""
    if isinstance(obj, (FrozenMap, FrozenList)):
        return obj.thaw()
    if isinstance(obj, Mapping):
        return {key: _plain(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(item) for item in obj]
    return obj


_core._set_frozen_types(FrozenMap, FrozenList)


def freeze(pool: Pool, obj: object) -> Union[FrozenMap, FrozenList]:
    """Copy ``obj`` into ``pool`` and return a handle (see Pool.freeze)."""
    data = _core.freeze_encode(obj)  # TypeError/ValueError before any allocation
    allocation = pool._alloc_init(data, 3)
    with pool.access():  # a no-access pool's header is checked now
        return _core.open_frozen(allocation)


def array(pool: Pool, data: Optional[ArrayLike] = None, dtype: Optional[DTypeLike] = None, *,
          shape: Optional[Union[int, Tuple[int, ...]]] = None,
          fill: Any = 0) -> NDArray[Any]:
    """Copy a numpy array-like into ``pool`` (see Pool.array)."""
    try:
        import numpy
    except ImportError:
        raise ImportError("Pool.array() needs numpy: pip install 'prmem[numpy]'") from None
    if data is None:
        if shape is None:
            raise TypeError("Pool.array() needs data, or shape= (and dtype=, fill=)")
        source = numpy.full(shape, fill, dtype=dtype)
    elif shape is not None:
        raise TypeError("Pool.array() takes data or shape=, not both")
    else:
        source = numpy.ascontiguousarray(data, dtype=dtype)
    if pool.noaccess:
        raise ProtectionError(
            f"Pool.array() cannot be used on the no-access pool {pool.name!r}: numpy reads "
            "an array's memory without asking prmem, so a kept array would keep the pool "
            "readable.  Store the bytes (pool.alloc/Allocation.write), then inside "
            "`with pool.access():` use numpy.frombuffer(memoryview(allocation), dtype)")
    raw = source.tobytes()
    if not raw:
        raise ValueError("Pool.array(): an empty array has no memory to protect")
    # 64-byte alignment: what numpy and SIMD loops like
    allocation = pool._alloc_init(raw, 6)
    # (numpy's stubs list concrete buffer types, not the buffer protocol)
    view: NDArray[Any] = numpy.frombuffer(
        _core.ReadOnlyBuffer(allocation), dtype=source.dtype)  # type: ignore[call-overload]
    from .sharing import register_arrays
    register_arrays(numpy)
    return view.reshape(source.shape)
