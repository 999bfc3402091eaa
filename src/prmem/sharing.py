"""Share sealed pools with other processes: zero-copy, immutable for everyone.

A READ_ONLY chunk is a sealed memory file: no process can ever write it
again, so its descriptor can be handed to other processes, which map the
same physical pages read-only.  Two ways to hand it over:

- ``multiprocessing`` (fork, spawn, forkserver): pass a sealed
  ``Pool(..., share=True)``, or a FrozenMap, FrozenList or Allocation in one,
  wherever multiprocessing pickles (Process args, Pool/ProcessPoolExecutor
  initializer and task args, Queue, Pipe).  The descriptor travels by
  multiprocessing's own descriptor passing.
- Any two processes connected by an AF_UNIX socket: ``prmem.send(sock, obj)``
  and ``obj = prmem.recv(sock)`` (SCM_RIGHTS).

The receiving side checks before it trusts (csrc/share.c): a memfd sealed
against writing, resizing and new seals, of the size the sender claims,
reopened read-only and mapped PROT_READ; a structure read from it is
bounds-checked like any other.  Pickling to bytes (``pickle.dumps``) raises
TypeError: protected memory travels only between live processes.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import threading
import weakref
from multiprocessing import context, reduction, util
from typing import Any, Callable, Dict, List, Tuple

from . import _core
from .errors import ProtectionError
from .frozen import FrozenList, FrozenMap
from .pool import Allocation, Pool

__all__ = ["recv", "send"]

_MAP, _LIST = 9, 8  # frozen layout tags (csrc/prmem.h)

# (st_dev, st_ino) of a received chunk -> (attached pool, chunk index), so a
# chunk received twice is mapped once.
_attached: Dict[Tuple[int, int], Tuple["weakref.ref[Pool]", int]] = {}
_attached_lock = threading.Lock()


def _attach(name: str, chunks: List[Tuple[int, int, int]], sender: int,
            seal: bool = False) -> Tuple[Pool, List[int]]:
    """Map received chunks [(fd, file_size, used)] (taking the descriptors);
    returns the pool and each chunk's index in it.  A chunk already attached
    here is reused, its new descriptor closed."""
    with _attached_lock:
        for key in [k for k, (ref, _i) in _attached.items()
                    if ref() is None or ref().destroyed]:  # type: ignore[union-attr]
            del _attached[key]
        keys = []
        try:
            for fd, _size, _used in chunks:
                st = os.fstat(fd)
                keys.append((st.st_dev, st.st_ino))
        except OSError:
            for fd, _size, _used in chunks:
                os.close(fd)
            raise
        known = [_attached.get(k) for k in keys]
        pools = [(ref(), index) for ref, index in (k for k in known if k is not None)]
        if (len(pools) == len(chunks) and all(p is not None for p, _ in pools)
                and len({id(p) for p, _ in pools}) == 1
                and (pools[0][0].seal or not seal)):  # type: ignore[union-attr]
            for fd, _size, _used in chunks:
                os.close(fd)
            return pools[0][0], [index for _, index in pools]  # type: ignore[return-value]
        pool = Pool.__new__(Pool)
        _core.attach(pool, name, list(chunks), seal, sender)  # closes every fd
        for index, key in enumerate(keys):
            _attached[key] = (weakref.ref(pool), index)
        return pool, list(range(len(chunks)))


def _describe(obj: Any) -> Tuple[str, Dict[str, Any], List[Tuple[int, int, int]]]:
    """(kind, metadata, [(fd, file_size, used)]) for a shareable object; the
    descriptors are new, the caller closes them."""
    if isinstance(obj, (FrozenMap, FrozenList)):
        fd, size, used, offset, nbytes = _core.export_allocation(obj._allocation)
        meta = {"pool": obj.pool.name, "offset": offset, "size": nbytes, "node": obj._node,
                "tag": _MAP if isinstance(obj, FrozenMap) else _LIST}
        return "frozen", meta, [(fd, size, used)]
    if isinstance(obj, Allocation):
        fd, size, used, offset, nbytes = _core.export_allocation(obj)
        return "allocation", {"pool": obj.pool.name, "offset": offset, "size": nbytes}, \
            [(fd, size, used)]
    if isinstance(obj, _core.Pool):
        return "pool", {"pool": obj.name, "seal": bool(obj.seal)}, _core.export_pool(obj)
    raise TypeError(f"prmem can share sealed Pools, FrozenMaps, FrozenLists and "
                    f"Allocations, not {type(obj).__name__}")


def _rebuild(kind: str, meta: Dict[str, Any], chunks: List[Tuple[int, int, int]],
             sender: int, seal: bool = False) -> Any:
    """The receiving side: attach the chunks and rebuild the object.  Takes
    the descriptors: they are closed whatever happens."""
    try:
        name = meta["pool"]
        if not isinstance(name, str):
            raise TypeError("pool name")
        want_seal = bool(seal or meta.get("seal", False))
    except (KeyError, TypeError, AttributeError) as e:
        for fd, _size, _used in chunks:
            os.close(fd)
        raise ProtectionError(f"malformed description of shared memory ({e}); refused") \
            from None
    pool, indexes = _attach(name, chunks, sender, want_seal)  # owns the fds from here
    if kind == "pool":
        return pool
    try:
        alloc = _core.attached_allocation(pool, indexes[0], int(meta["offset"]),
                                          int(meta["size"]))
        if kind == "allocation":
            return alloc
        return _core.open_frozen(alloc, int(meta["node"]), int(meta["tag"]))
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        if isinstance(e, _core.CorruptionError):
            raise ProtectionError(f"the frozen structure received from process {sender} is "
                                  f"not valid ({e}); refused") from e
        raise ProtectionError(f"malformed description of shared memory ({e}); refused") \
            from None


# ------------------------------------------------------ multiprocessing

def _mp_rebuild(kind: str, meta: Dict[str, Any], dupfds: List[Any],
                sizes: List[Tuple[int, int]], sender: int) -> Any:
    chunks = [(d.detach(), size, used) for d, (size, used) in zip(dupfds, sizes)]
    return _rebuild(kind, meta, chunks, sender)


def _mp_reduce(obj: Any) -> Tuple[Callable[..., Any], Tuple[Any, ...]]:
    kind, meta, chunks = _describe(obj)
    # While a child is being started (spawn, forkserver) the descriptor goes
    # with the start, as it is: keep it open until that Popen object goes.
    # Otherwise multiprocessing's resource sharer takes a copy of it.
    popen = context.get_spawning_popen()
    try:
        dupfds = [reduction.DupFd(fd) for fd, _size, _used in chunks]
    except BaseException:
        for fd, _size, _used in chunks:
            if popen is not None:  # some may already be handed to the child
                util.Finalize(popen, os.close, (fd,))
            else:
                os.close(fd)
        raise
    for fd, _size, _used in chunks:
        if popen is not None:
            util.Finalize(popen, os.close, (fd,))
        else:
            os.close(fd)
    sizes = [(size, used) for _fd, size, used in chunks]
    return _mp_rebuild, (kind, meta, dupfds, sizes, os.getpid())


for _type in (FrozenMap, FrozenList, Allocation, Pool):
    reduction.ForkingPickler.register(_type, _mp_reduce)


# numpy views made by Pool.array(): registered when the first is made, and
# any other ndarray is pickled as numpy does it.

def _array_source(arr: Any) -> Any:
    """The ReadOnlyBuffer behind a Pool.array() view, or None."""
    base = arr
    while base is not None and not isinstance(base, _core.ReadOnlyBuffer):
        # ndarray.base chains end in the memoryview numpy made of the buffer
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return base


def _rebuild_array(alloc: Any, dtype: Any, shape: Any, strides: Any, offset: int) -> Any:
    import numpy
    # (numpy's stubs list concrete buffer types, not the buffer protocol)
    flat = numpy.frombuffer(_core.ReadOnlyBuffer(alloc),  # type: ignore[call-overload]
                            dtype=numpy.uint8)
    return numpy.lib.stride_tricks.as_strided(flat[offset:].view(dtype), shape, strides,
                                              writeable=False)


def _reduce_array(arr: Any) -> Any:
    source = _array_source(arr)
    if source is None:
        return arr.__reduce__()
    alloc = source.allocation
    offset = arr.__array_interface__["data"][0] - alloc.address
    return _rebuild_array, (alloc, arr.dtype, arr.shape, arr.strides, offset)


_arrays_registered = False


def register_arrays(numpy: Any) -> None:
    """Let multiprocessing pass Pool.array() views as shared memory."""
    global _arrays_registered
    if not _arrays_registered:
        reduction.ForkingPickler.register(numpy.ndarray, _reduce_array)
        _arrays_registered = True


# ------------------------------------------------------------ sockets

_HEADER = struct.Struct("<I")
_MAX_FDS = 64


def send(sock: socket.socket, obj: Any) -> None:
    """Send a sealed Pool, FrozenMap, FrozenList or Allocation over an
    AF_UNIX socket (its descriptors go as SCM_RIGHTS); the other side calls
    :func:`recv`.  ProtectionError if the memory is not sealed READ_ONLY
    (see Pool(share=True), protect(), make_ro())."""
    kind, meta, chunks = _describe(obj)
    try:
        payload = json.dumps({"kind": kind, "meta": meta, "pid": os.getpid(),
                              "sizes": [[size, used] for _fd, size, used in chunks]}).encode()
        message = _HEADER.pack(len(payload)) + payload
        sent = socket.send_fds(sock, [message], [fd for fd, _s, _u in chunks])
        if sent < len(message):
            sock.sendall(message[sent:])
    finally:
        for fd, _size, _used in chunks:
            os.close(fd)


def recv(sock: socket.socket, *, seal: bool = False) -> Any:
    """Receive what :func:`send` sent: a Pool, FrozenMap, FrozenList or
    Allocation backed by the sender's sealed memory, mapped read-only here
    (and ``mseal``ed with ``seal=True``).  A descriptor that is not a sealed
    memory file of the announced size, or a structure that does not hold
    together, raises ProtectionError and nothing stays mapped."""
    message, fds, _flags, _addr = socket.recv_fds(sock, 65536, _MAX_FDS,
                                                  getattr(socket, "MSG_CMSG_CLOEXEC", 0))
    try:
        if len(message) < _HEADER.size:
            raise ProtectionError("prmem.recv(): the peer closed or sent no prmem message")
        (length,) = _HEADER.unpack_from(message)
        if length > 1 << 20:
            raise ProtectionError("prmem.recv(): message too large; refused")
        body = message[_HEADER.size:]
        while len(body) < length:
            more = sock.recv(length - len(body))
            if not more:
                raise ProtectionError("prmem.recv(): the peer closed mid-message")
            body += more
        try:
            desc = json.loads(body[:length])
            kind, meta, sizes, sender = desc["kind"], desc["meta"], desc["sizes"], desc["pid"]
            if kind not in ("pool", "frozen", "allocation") or len(sizes) != len(fds):
                raise ValueError("descriptor count or kind")
            if not isinstance(meta, dict) or not isinstance(meta.get("pool"), str):
                raise ValueError("description")
            sender = int(sender)
            chunks = [(fd, int(size), int(used)) for fd, (size, used) in zip(fds, sizes)]
        except (ValueError, KeyError, TypeError) as e:
            raise ProtectionError(f"prmem.recv(): malformed message ({e}); refused") from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return _rebuild(kind, meta, chunks, sender, seal)
