"""The real peer libraries, loaded with ctypes.

Each loader returns a small wrapper or raises :class:`PeerUnavailable` with a
message saying what is missing; the workloads print that message and skip
the peer.  Nothing here emulates a library.

The functions that get timed are loaded through ``ctypes.PyDLL``, which
calls them *without* releasing the GIL (``CDLL`` would release and re-take
it around every call).  prmem's own extension never releases the GIL in the
paths measured here, so this keeps the per-call overhead of the peers as low
as ctypes allows and keeps GIL hand-offs out of their numbers.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
from typing import Dict, List, Optional

c_void_p = ctypes.c_void_p
c_size_t = ctypes.c_size_t
c_int = ctypes.c_int

PROT_NONE = 0
PROT_READ = mmap.PROT_READ
PROT_WRITE = mmap.PROT_WRITE
MAP_PRIVATE = mmap.MAP_PRIVATE
MAP_ANONYMOUS = mmap.MAP_ANONYMOUS
MAP_FAILED = ctypes.c_void_p(-1).value  # (void *)-1 as ctypes returns it


class PeerUnavailable(Exception):
    """A peer library (or a symbol in it) is not available on this machine."""


def _load(candidates: List[Optional[str]], what: str) -> ctypes.PyDLL:
    errors = []
    for name in candidates:
        if not name:
            continue
        try:
            return ctypes.PyDLL(name, use_errno=True)
        except OSError as exc:
            errors.append(f"{name}: {exc}")
    raise PeerUnavailable(f"{what} not found ({'; '.join(errors) or 'no candidate names'})")


def _fn(lib: ctypes.PyDLL, name: str, restype, argtypes, what: str):
    try:
        fn = getattr(lib, name)
    except AttributeError:
        raise PeerUnavailable(f"{what} has no symbol {name}") from None
    fn.restype = restype
    fn.argtypes = argtypes
    return fn


class Libc:
    """mmap/mprotect/munmap/memcpy/pwrite from the C library."""

    def __init__(self) -> None:
        lib = _load(["libc.so.6", ctypes.util.find_library("c")], "the C library")
        self.mmap = _fn(lib, "mmap", c_void_p,
                        [c_void_p, c_size_t, c_int, c_int, c_int, ctypes.c_long], "libc")
        self.mprotect = _fn(lib, "mprotect", c_int, [c_void_p, c_size_t, c_int], "libc")
        self.munmap = _fn(lib, "munmap", c_int, [c_void_p, c_size_t], "libc")
        self.memcpy = _fn(lib, "memcpy", c_void_p, [c_void_p, ctypes.c_char_p, c_size_t], "libc")
        self.labs = _fn(lib, "labs", ctypes.c_long, [ctypes.c_long], "libc")
        self.pwrite = _fn(lib, "pwrite", ctypes.c_ssize_t,
                          [c_int, ctypes.c_char_p, c_size_t, ctypes.c_long], "libc")
        try:
            self.malloc_trim = _fn(lib, "malloc_trim", c_int, [c_size_t], "libc")
        except PeerUnavailable:  # not glibc
            self.malloc_trim = None

    def map_page(self, size: int) -> int:
        addr = self.mmap(None, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if addr is None or addr == MAP_FAILED:
            raise OSError(ctypes.get_errno(), "mmap failed")
        return addr


class Sodium:
    """libsodium's guarded heap: sodium_malloc and sodium_mprotect_*."""

    def __init__(self) -> None:
        lib = _load(["libsodium.so.23", ctypes.util.find_library("sodium"), "libsodium.so"],
                    "libsodium")
        what = "libsodium"
        init = _fn(lib, "sodium_init", c_int, [], what)
        if init() < 0:
            raise PeerUnavailable("libsodium: sodium_init() failed")
        version = _fn(lib, "sodium_version_string", ctypes.c_char_p, [], what)
        self.version = version().decode()
        self.malloc = _fn(lib, "sodium_malloc", c_void_p, [c_size_t], what)
        self.free = _fn(lib, "sodium_free", None, [c_void_p], what)
        self.mprotect_readonly = _fn(lib, "sodium_mprotect_readonly", c_int, [c_void_p], what)
        self.mprotect_readwrite = _fn(lib, "sodium_mprotect_readwrite", c_int, [c_void_p], what)
        self.mprotect_noaccess = _fn(lib, "sodium_mprotect_noaccess", c_int, [c_void_p], what)


class OpenSSLSecureHeap:
    """OpenSSL's secure heap: CRYPTO_secure_malloc after CRYPTO_secure_malloc_init.

    The secure heap is one fixed-size, mlock()ed arena with guard pages
    around it, carved by a buddy allocator; it protects against swapping
    and overruns out of the arena, not against writes to the objects.  It
    can only be set up once per process, so the arena size is chosen once.
    """

    def __init__(self, arena_bytes: int, min_block: int = 16) -> None:
        lib = _load(["libcrypto.so.3", ctypes.util.find_library("crypto")], "OpenSSL libcrypto")
        what = "OpenSSL libcrypto"
        version = _fn(lib, "OpenSSL_version", ctypes.c_char_p, [c_int], what)
        self.version = version(0).decode()
        init = _fn(lib, "CRYPTO_secure_malloc_init", c_int, [c_size_t, c_size_t], what)
        initialized = _fn(lib, "CRYPTO_secure_malloc_initialized", c_int, [], what)
        self.used = _fn(lib, "CRYPTO_secure_used", c_size_t, [], what)
        self.malloc = _fn(lib, "CRYPTO_secure_malloc", c_void_p,
                          [c_size_t, ctypes.c_char_p, c_int], what)
        self.free = _fn(lib, "CRYPTO_secure_free", None, [c_void_p, ctypes.c_char_p, c_int], what)
        if initialized():
            self.init_result = None  # someone in this process set it up already
        else:
            rc = init(arena_bytes, min_block)
            if rc == 0:
                raise PeerUnavailable(
                    f"OpenSSL: CRYPTO_secure_malloc_init({arena_bytes}, {min_block}) failed")
            # 1: arena mlock()ed; 2: works, but mlock() failed (RLIMIT_MEMLOCK)
            self.init_result = rc
        self.arena_bytes = arena_bytes
        if not initialized():
            raise PeerUnavailable("OpenSSL: the secure heap is not initialised")


def ctypes_call_ns() -> Optional[float]:
    """Median ns of one ctypes.PyDLL call to libc's labs(): the floor every
    foreign call of a peer pays from Python, before the C work."""
    from .harness import batch_loop, gc_paused, summarize

    try:
        libc = get("libc")
    except PeerUnavailable:
        return None
    loop = batch_loop("f(1)", ["f"], label="ctypes floor")
    with gc_paused():
        loop(10_000, libc.labs)
        samples = [loop(10_000, libc.labs) / 10_000 for _ in range(30)]
    return summarize(samples)["median"]


_cache: Dict[str, object] = {}


def get(name: str, **kwargs):
    """The loaded peer ``name`` ('libc', 'sodium', 'openssl'), loaded once.

    Raises PeerUnavailable (again, on every call) if it cannot be loaded.
    """
    if name in _cache:
        value = _cache[name]
        if isinstance(value, PeerUnavailable):
            raise value
        return value
    factories = {"libc": Libc, "sodium": Sodium, "openssl": OpenSSLSecureHeap}
    try:
        value = factories[name](**kwargs)
    except PeerUnavailable as exc:
        _cache[name] = exc
        raise
    _cache[name] = value
    return value


def versions() -> Dict[str, Optional[str]]:
    """Versions of the peer libraries, for the report (None if not loadable).

    Loads libsodium (sodium_init only) and asks libcrypto for its version
    without setting up the secure heap.
    """
    out: Dict[str, Optional[str]] = {"libsodium": None, "openssl": None}
    try:
        out["libsodium"] = get("sodium").version
    except PeerUnavailable:
        pass
    try:
        lib = _load(["libcrypto.so.3", ctypes.util.find_library("crypto")], "OpenSSL libcrypto")
        out["openssl"] = _fn(lib, "OpenSSL_version", ctypes.c_char_p, [c_int],
                             "OpenSSL libcrypto")(0).decode()
    except PeerUnavailable:
        pass
    return out
