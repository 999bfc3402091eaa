"""Write-rare: rare_write / rare_memset, sessions, make_ro, ProtectedRef and
replace_pool.

The contract under test (seed 000: write-rare after init / pmalloc modes;
seed 002: the policy-DB update sequence; seed 003: rare-write without a
writable window):

* rare_write works on WRITE_RARE (and still WRITABLE) memory of WR, AUTO_WR
  and START_WR pools, and nowhere else; refused writes change nothing;
* WRITE_RARE memory is never mapped writable, not even while a rare write is
  in progress, and readers see new bytes at once through their read-only
  mappings;
* a native write to WRITE_RARE memory still faults, also while another
  thread is doing rare writes;
* make_ro() seals write-rare memory read-only for good: the kernel then
  refuses mprotect(PROT_WRITE), pwrite() on the pool's memfd and writes via
  /proc/self/mem.

Anything that must crash (SIGSEGV) or that changes process-wide state runs in
a child interpreter (``conftest.run_child``).
"""
from __future__ import annotations

import array
import ctypes
import errno
import itertools
import mmap
import os
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import prmem
from prmem import Mode, PoolDestroyedError, ProtectionError, State

from conftest import maps_entries, perms_at, pool_fds, run_child

PAGE = prmem.page_size
REPO = Path(__file__).resolve().parent.parent
WR_MODES = [Mode.WR, Mode.AUTO_WR, Mode.START_WR]
RO_MODES = [Mode.RO, Mode.AUTO_RO]

_names = itertools.count()


def unique(prefix: str = "rw") -> str:
    """A pool name no other pool in this process uses (maps/fd lookups)."""
    return "%s-%d-%d" % (prefix, os.getpid(), next(_names))


def write_rare_alloc(pool_factory, mode=Mode.WR, size=64, init=b"", **kw):
    """A pool of ``mode`` with one allocation of ``size`` bytes holding
    ``init``, protected so the allocation is WRITE_RARE."""
    pool = pool_factory(mode, name=kw.pop("name", None) or unique(), **kw)
    a = pool.zalloc(size)
    if init:
        if mode is Mode.START_WR:
            pool.rare_write(a, init)
        else:
            a.write(init)
    pool.protect()
    assert a.state is State.WRITE_RARE
    return pool, a


# ------------------------------------------------------------ raw syscalls

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.restype = ctypes.c_int


def mprotect_errno(address: int, prot: int) -> int:
    """mprotect the page holding ``address``; 0 on success, else errno."""
    page = address & ~(PAGE - 1)
    ctypes.set_errno(0)
    if _libc.mprotect(page, PAGE, prot) == 0:
        return 0
    return ctypes.get_errno()


def chunk_offset(pool, a) -> int:
    """File offset of ``a`` in its memfd: the first area of a pool starts its
    first chunk at file offset 0 (file offset == offset in the reservation)."""
    return a.address - maps_entries(pool.name)[0][0]


# ===================================================== rare_write: success


@pytest.mark.parametrize("mode", WR_MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("api", ["pool", "module"])
def test_rare_write_changes_write_rare_memory(pool_factory, mode, api):
    pool, a = write_rare_alloc(pool_factory, mode, 32, b"0123456789")
    write = pool.rare_write if api == "pool" else prmem.rare_write
    write(a, b"abc")
    assert a[0:10] == b"abc3456789"
    write(a, b"XY", offset=8)
    write(a, data=b"Z", offset=31)
    assert a[0:10] == b"abc34567XY"
    assert a[31] == ord("Z")
    assert a[10:31] == bytes(21)
    # the memory is still write-rare: changed, not unprotected
    assert a.state is State.WRITE_RARE
    with pytest.raises(ProtectionError):
        a.write(b"plain")
    assert a[0:3] == b"abc"


@pytest.mark.parametrize("mode", [Mode.WR, Mode.AUTO_WR], ids=lambda m: m.name)
def test_rare_write_on_still_writable_memory(pool_factory, mode):
    pool = pool_factory(mode, name=unique())
    a = pool.alloc(16)
    assert a.state is State.WRITABLE
    pool.rare_write(a, b"hello")
    prmem.rare_memset(a, ord("!"), offset=5, length=3)
    assert a[0:9] == b"hello!!!\0"
    assert a.state is State.WRITABLE
    pool.protect()
    assert a[0:9] == b"hello!!!\0"
    pool.rare_write(a, b"J")
    assert a[0:9] == b"Jello!!!\0"


@pytest.mark.parametrize("data", [
    b"bytes",
    bytearray(b"bytearray"),
    memoryview(b"--memoryview--")[2:-2],
    array.array("B", b"array"),
], ids=["bytes", "bytearray", "memoryview", "array"])
def test_rare_write_accepts_bytes_like(pool_factory, data):
    _, a = write_rare_alloc(pool_factory, size=20)
    prmem.rare_write(a, data, 3)
    expected = bytes(data)
    assert a[3:3 + len(expected)] == expected
    assert a[0:3] == bytes(3)


def test_rare_write_edges_of_the_allocation(pool_factory):
    _, a = write_rare_alloc(pool_factory, size=24, init=b"x" * 24)
    prmem.rare_write(a, b"")                 # empty: a no-op
    prmem.rare_write(a, b"", offset=24)      # empty at the very end: fine
    assert a[:] == b"x" * 24
    prmem.rare_write(a, b"A" * 24)           # the whole allocation
    assert a[:] == b"A" * 24
    prmem.rare_write(a, b"z", offset=23)     # the last byte
    assert a[:] == b"A" * 23 + b"z"


def test_rare_write_across_pages(pool_factory):
    _, a = write_rare_alloc(pool_factory, size=3 * PAGE + 400)
    data = bytes(range(256)) * ((2 * PAGE + 500) // 256 + 1)
    data = data[:2 * PAGE + 500]
    prmem.rare_write(a, data, offset=PAGE - 250)
    assert a[PAGE - 250:PAGE - 250 + len(data)] == data
    assert a[0:PAGE - 250] == bytes(PAGE - 250)
    assert a[PAGE - 250 + len(data):] == bytes(len(a) - (PAGE - 250 + len(data)))


def test_rare_write_from_a_view_of_itself(pool_factory):
    # overlapping source and destination behave like memmove
    _, a = write_rare_alloc(pool_factory, size=16, init=b"ABCDEFGHIJKLMNOP")
    with memoryview(a) as view:
        prmem.rare_write(a, view[0:8], 2)
    assert a[:] == b"ABABCDEFGHKLMNOP"


def test_rare_write_between_pools(pool_factory):
    _, src = write_rare_alloc(pool_factory, size=8, init=b"source!!")
    _, dst = write_rare_alloc(pool_factory, size=8)
    with memoryview(src) as view:
        prmem.rare_write(dst, view)
    assert dst[:] == b"source!!"


def test_auto_wr_areas_all_rare_writable(pool_factory):
    pool = pool_factory(Mode.AUTO_WR, name=unique(), refill=PAGE)
    allocs = [pool.alloc(PAGE) for _ in range(4)]
    # each allocation fills an area; opening the next one protected the last
    assert [a.state for a in allocs] == [State.WRITE_RARE] * 3 + [State.WRITABLE]
    for i, a in enumerate(allocs):
        pool.rare_write(a, b"area%d" % i, offset=100)
    pool.protect()
    assert {a.state for a in allocs} == {State.WRITE_RARE}
    for i, a in enumerate(allocs):
        pool.rare_memset(a, i + 1, offset=0, length=4)
        assert a[0:4] == bytes([i + 1]) * 4
        assert a[100:105] == b"area%d" % i
    for _, _, perms in maps_entries(pool.name):
        assert "w" not in perms


def test_start_wr_is_rare_writable_from_the_start(pool_factory):
    pool = pool_factory(Mode.START_WR, name=unique())
    a = pool.alloc(32)
    assert a.state is State.WRITE_RARE
    assert perms_at(a.address) == "r--s"
    with pytest.raises(ProtectionError):
        a.write(b"no")
    pool.rare_write(a, b"yes")
    assert a[0:4] == b"yes\0"
    pool.protect()
    assert a.state is State.WRITE_RARE
    pool.rare_write(a, b"still")
    assert a[0:5] == b"still"


# ===================================================== rare_memset


def test_rare_memset_defaults_to_the_end(pool_factory):
    pool, a = write_rare_alloc(pool_factory, size=16, init=b"0123456789abcdef")
    pool.rare_memset(a, 0x2A, 10)
    assert a[:] == b"0123456789" + b"*" * 6
    prmem.rare_memset(a, 0)
    assert a[:] == bytes(16)


def test_rare_memset_offset_and_length(pool_factory):
    _, a = write_rare_alloc(pool_factory, size=16, init=b"0123456789abcdef")
    prmem.rare_memset(a, ord("-"), offset=4, length=3)
    assert a[:] == b"0123---789abcdef"
    prmem.rare_memset(a, ord("#"), 0, 0)          # length 0: nothing
    prmem.rare_memset(a, ord("#"), 16)            # offset at the end: nothing
    prmem.rare_memset(a, ord("#"), length=None)
    assert a[:] == b"#" * 16
    prmem.rare_memset(a, 255, 15, 1)
    assert a[15] == 255


def test_rare_memset_larger_than_a_page(pool_factory):
    # more than the internal fill buffer, crossing page boundaries
    _, a = write_rare_alloc(pool_factory, size=3 * PAGE + 123)
    prmem.rare_memset(a, 0xA5, offset=7, length=3 * PAGE + 100)
    assert a[0:7] == bytes(7)
    assert a[7:7 + 3 * PAGE + 100] == b"\xa5" * (3 * PAGE + 100)
    assert a[7 + 3 * PAGE + 100:] == bytes(16)


@pytest.mark.parametrize("byte", [-1, 256, 2**70, -(2**70)])
def test_rare_memset_byte_out_of_range(pool_factory, byte):
    _, a = write_rare_alloc(pool_factory, size=8, init=b"unchange")
    with pytest.raises(ValueError):
        prmem.rare_memset(a, byte)
    assert a[:] == b"unchange"


@pytest.mark.parametrize("byte", [b"x", "x", 1.0, None])
def test_rare_memset_byte_wrong_type(pool_factory, byte):
    _, a = write_rare_alloc(pool_factory, size=8, init=b"unchange")
    with pytest.raises(TypeError):
        prmem.rare_memset(a, byte)
    assert a[:] == b"unchange"


@pytest.mark.parametrize("offset,length", [
    (-1, None), (9, None), (0, 9), (4, 5), (8, 1), (0, -1), (2**40, None), (1, 2**40),
])
def test_rare_memset_range_outside(pool_factory, offset, length):
    pool, a = write_rare_alloc(pool_factory, size=8, init=b"unchange")
    for memset in (prmem.rare_memset, pool.rare_memset):
        with pytest.raises(ValueError):
            memset(a, 0, offset, length)
    assert a[:] == b"unchange"


# ===================================================== rare_write: refusals


@pytest.mark.parametrize("offset,size", [
    (-1, 1), (0, 9), (8, 1), (9, 0), (4, 5), (7, 2), (2**40, 1), (-(2**70), 1),
])
def test_rare_write_range_outside(pool_factory, offset, size):
    pool, a = write_rare_alloc(pool_factory, size=8, init=b"unchange")
    for write in (prmem.rare_write, pool.rare_write):
        with pytest.raises(ValueError):
            write(a, b"!" * size, offset)
        with pytest.raises(ValueError):
            write(a, b"!" * size, offset=offset)
    with pytest.raises(ValueError):
        with pool.rare_write_session() as w:
            w.write(a, b"!" * size, offset)
    assert a[:] == b"unchange"


def _not_allocations(a):
    return [a.address, bytearray(8), memoryview(bytearray(8)), None, "dst", a.pool,
            ctypes.c_void_p(a.address)]


def test_rare_write_destination_must_be_an_allocation(pool_factory):
    pool, a = write_rare_alloc(pool_factory, size=8, init=b"unchange")
    for bad in _not_allocations(a):
        for write in (prmem.rare_write, pool.rare_write):
            with pytest.raises(TypeError):
                write(bad, b"X")
        for memset in (prmem.rare_memset, pool.rare_memset):
            with pytest.raises(TypeError):
                memset(bad, 0)
    # not even a view of the allocation itself
    with memoryview(a) as view:
        with pytest.raises(TypeError):
            prmem.rare_write(view, b"X")
    assert a[:] == b"unchange"


def test_rare_write_data_must_be_bytes_like(pool_factory):
    _, a = write_rare_alloc(pool_factory, size=8, init=b"unchange")
    for bad in ["text", 42, None, [1, 2]]:
        with pytest.raises(TypeError):
            prmem.rare_write(a, bad)
    with pytest.raises(TypeError):
        prmem.rare_write(a, b"x", "0")
    with pytest.raises(TypeError):
        prmem.rare_write(a)  # missing data
    assert a[:] == b"unchange"


def test_pool_rare_write_refuses_other_pools_memory(pool_factory):
    pool, mine = write_rare_alloc(pool_factory, size=8, init=b"mine....")
    other, theirs = write_rare_alloc(pool_factory, size=8, init=b"theirs..")
    with pytest.raises(ValueError):
        pool.rare_write(theirs, b"hijacked")
    with pytest.raises(ValueError):
        pool.rare_memset(theirs, 0)
    with pytest.raises(ValueError):
        other.rare_write(mine, b"hijacked")
    assert theirs[:] == b"theirs.."
    assert mine[:] == b"mine...."
    # the module-level function writes to whichever pool owns dst
    prmem.rare_write(theirs, b"THEIRS")
    assert theirs[:] == b"THEIRS.."


@pytest.mark.parametrize("mode", RO_MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("protected", [False, True], ids=["writable", "protected"])
def test_rare_write_refused_in_read_only_modes(pool_factory, mode, protected):
    pool = pool_factory(mode, name=unique())
    a = pool.alloc(8)
    a.write(b"unchange")
    if protected:
        pool.protect()
        assert a.state is State.READ_ONLY
    else:
        assert a.state is State.WRITABLE
    for call in (lambda: pool.rare_write(a, b"X"),
                 lambda: prmem.rare_write(a, b"X", 3),
                 lambda: pool.rare_memset(a, 0),
                 lambda: prmem.rare_memset(a, 0, 1, 1)):
        with pytest.raises(ProtectionError):
            call()
    assert a[:] == b"unchange"
    with pytest.raises(ProtectionError):
        with pool.rare_write_session() as w:
            w.write(a, b"X")
    assert a[:] == b"unchange"


def test_protection_error_is_a_permission_error(pool_factory):
    pool = pool_factory(Mode.RO, name=unique())
    a = pool.alloc(8)
    with pytest.raises(PermissionError):
        prmem.rare_write(a, b"X")
    assert issubclass(ProtectionError, prmem.PrmemError)


def test_rare_write_after_destroy(pool_factory):
    pool, a = write_rare_alloc(pool_factory, size=8, init=b"unchange")
    _, other = write_rare_alloc(pool_factory, size=8)
    pool.destroy()
    for call in (lambda: pool.rare_write(a, b"X"),
                 lambda: prmem.rare_write(a, b"X"),
                 lambda: pool.rare_memset(a, 0),
                 lambda: prmem.rare_memset(a, 0)):
        with pytest.raises(PoolDestroyedError):
            call()
    with pytest.raises(PoolDestroyedError):
        with pool.rare_write_session() as w:
            w.write(a, b"X")
    # a destroyed pool does not take over other pools' writes either
    with pytest.raises((PoolDestroyedError, ValueError)):
        pool.rare_write(other, b"X")
    assert other[:] == bytes(8)


# ===================================================== no writable window


def test_mapping_read_only_before_and_after_rare_write(pool_factory):
    pool, a = write_rare_alloc(pool_factory, size=2 * PAGE, init=b"x")
    assert perms_at(a.address) == "r--s"
    prmem.rare_write(a, b"y" * (2 * PAGE))
    prmem.rare_memset(a, 0)
    with pool.rare_write_session() as w:
        w.write(a, b"z")
        assert perms_at(a.address) == "r--s"
        assert perms_at(a.address + PAGE) == "r--s"
    assert perms_at(a.address) == "r--s"
    assert perms_at(a.address + PAGE) == "r--s"
    entries = maps_entries(pool.name)
    assert entries
    assert all("w" not in perms for _, _, perms in entries)


@pytest.mark.parametrize("mode", WR_MODES, ids=lambda m: m.name)
def test_mapping_never_writable_while_rare_writes_run(pool_factory, mode):
    """Sample /proc/self/maps while another thread keeps rare-writing: the
    range must never show up writable (the kernel's per-CPU window, seed 003,
    has no user-space counterpart here: writes go through the memfd)."""
    pool, a = write_rare_alloc(pool_factory, mode, size=16 * PAGE)
    stop = threading.Event()
    first = threading.Event()
    writes = [0]
    errors = []

    def writer():
        try:
            while not stop.is_set():
                prmem.rare_memset(a, writes[0] & 0xFF)
                with pool.rare_write_session() as w:
                    w.write(a, b"session", offset=PAGE - 3)
                writes[0] += 1
                first.set()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
            first.set()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        first.wait()
        seen = set()
        for _ in range(300):
            for _, _, perms in maps_entries(pool.name):
                seen.add(perms)
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert writes[0] > 0
    assert "r--s" in seen
    assert not any("w" in perms for perms in seen), seen


def test_readers_see_rare_writes_at_once(pool_factory):
    pool, a = write_rare_alloc(pool_factory, size=64, init=b"old")
    with memoryview(a) as view:
        assert view.readonly
        raw = (ctypes.c_char * 64).from_address(a.address)
        for i in range(50):
            payload = b"value-%03d" % i
            prmem.rare_write(a, payload, offset=i)
            # the same physical pages: a view taken before the write, a raw
            # pointer and the Allocation all show the new bytes immediately
            assert view[i:i + len(payload)].tobytes() == payload
            assert raw.raw[i:i + len(payload)] == payload
            assert a[i:i + len(payload)] == payload
        with pytest.raises(TypeError):
            view[0] = 1  # the view itself is read-only


def test_write_rare_memory_cannot_be_viewed_writable(pool_factory):
    _, a = write_rare_alloc(pool_factory, size=8, init=b"unchange")
    with pytest.raises((ProtectionError, TypeError)):
        (ctypes.c_char * 8).from_buffer(a)
    with pytest.raises(ProtectionError):
        a[0] = 1
    with pytest.raises(ProtectionError):
        a[0:2] = b"no"
    assert a[:] == b"unchange"


# ===================================================== native writes fault


@pytest.mark.parametrize("mode", WR_MODES, ids=lambda m: m.name)
def test_native_write_to_write_rare_memory_segfaults(mode):
    result = run_child(f"""
        pool = Pool(Mode.{mode.name}, name="native", refill=4096)
        a = pool.alloc(64)
        if pool.mode is Mode.AUTO_WR:
            pool.alloc(4096)        # rolls over: a's area becomes WRITE_RARE
        else:
            pool.protect()
        assert a.state is State.WRITE_RARE, a.state
        prmem.rare_write(a, b"rare-written")
        print("before", bytes(a[0:12]).decode(), flush=True)
        native_write(a, b"native")
        print("survived", bytes(a[0:12]).decode(), flush=True)
    """)
    assert result.returncode == -signal.SIGSEGV, result
    assert "before rare-written" in result.stdout
    assert "survived" not in result.stdout


def test_native_write_in_forked_process_leaves_shared_data_unchanged():
    """The pool's pages are MAP_SHARED: a forked process that could write
    them would change the parent's data.  It cannot: it dies by SIGSEGV and
    the parent still reads its own bytes (and can still rare_write)."""
    result = run_child("""
        pool = Pool(Mode.WR, name="forked")
        a = pool.alloc(16)
        a.write(b"parent-data")
        pool.protect()
        pid = os.fork()
        if pid == 0:
            try:
                native_write(a, b"CHILD")
            finally:
                os._exit(0)        # reached only if the write went through
        _, status = os.waitpid(pid, 0)
        print("signal", os.WTERMSIG(status) if os.WIFSIGNALED(status) else None)
        print("data", bytes(a[0:11]).decode())
        prmem.rare_write(a, b"PARENT")
        print("after", bytes(a[0:11]).decode())
    """)
    assert result.returncode == 0, result.stderr
    assert "signal %d" % signal.SIGSEGV in result.stdout
    assert "data parent-data" in result.stdout
    assert "after PARENT-data" in result.stdout


def test_native_write_faults_while_another_thread_rare_writes():
    result = run_child("""
        import threading
        pool = Pool(Mode.WR, name="race")
        a = pool.alloc(16 * 4096)
        pool.protect()
        busy = threading.Event()
        def writer():
            n = 0
            while True:
                # large writes: the pwrite() is in progress most of the time
                prmem.rare_memset(a, n & 0xFF)
                n += 1
                if n == 20:
                    busy.set()
        threading.Thread(target=writer, daemon=True).start()
        busy.wait()
        print("writing natively", flush=True)
        for i in range(1000):
            native_write(a, b"X", (i * 4099) % (16 * 4096))
        print("survived", flush=True)
    """)
    assert result.returncode == -signal.SIGSEGV, result
    assert "writing natively" in result.stdout
    assert "survived" not in result.stdout


# ===================================================== sessions


def test_session_writes_apply_immediately(pool_factory):
    pool, a = write_rare_alloc(pool_factory, size=16, init=b"0123456789abcdef")
    with pool.rare_write_session() as w:
        assert isinstance(w, prmem.RareWriteSession)
        w.write(a, b"AB")
        assert a[0:4] == b"AB23"
        w.write(a, b"Z", offset=15)
        assert a[15] == ord("Z")
        w.memset(a, ord("."), offset=4, length=4)
        assert a[:] == b"AB23....89abcdeZ"
        w.memset(a, ord("_"), 12)
        assert a[:] == b"AB23....89ab____"
        assert perms_at(a.address) == "r--s"
    assert a[:] == b"AB23....89ab____"


def test_session_write_checks_like_rare_write(pool_factory):
    pool, a = write_rare_alloc(pool_factory, size=8, init=b"unchange")
    _, other = write_rare_alloc(pool_factory, size=8, init=b"other...")
    with pool.rare_write_session() as w:
        with pytest.raises(ValueError):
            w.write(a, b"123456789")
        with pytest.raises(ValueError):
            w.memset(a, 0, 4, 5)
        with pytest.raises(ValueError):
            w.write(other, b"X")      # another pool's memory
        with pytest.raises(TypeError):
            w.write(a.address, b"X")
        w.write(a, b"U")              # the session is still usable
    assert a[:] == b"Unchange"
    assert other[:] == b"other..."


def test_nested_session_on_same_pool_same_thread(pool_factory):
    pool, a = write_rare_alloc(pool_factory, size=8)
    with pool.rare_write_session() as outer:
        with pytest.raises(RuntimeError):
            with pool.rare_write_session():
                pass  # pragma: no cover - must not be reached
        # re-entering the very same session object is nesting too
        with pytest.raises(RuntimeError):
            with outer:
                pass  # pragma: no cover
        outer.write(a, b"outer")      # the outer one is unaffected
    assert a[0:5] == b"outer"
    # after the outer session closed, a new one can be opened
    with pool.rare_write_session() as again:
        again.write(a, b"again")
    assert a[0:5] == b"again"


def test_sessions_on_different_pools_may_nest(pool_factory):
    p1, a1 = write_rare_alloc(pool_factory, size=4)
    p2, a2 = write_rare_alloc(pool_factory, size=4)
    with p1.rare_write_session() as w1, p2.rare_write_session() as w2:
        w1.write(a1, b"one")
        w2.write(a2, b"two")
    assert (a1[0:3], a2[0:3]) == (b"one", b"two")


def test_session_closed_on_exception(pool_factory):
    pool, a = write_rare_alloc(pool_factory, size=8)
    with pytest.raises(KeyError):
        with pool.rare_write_session() as w:
            w.write(a, b"applied")
            raise KeyError("boom")
    assert a[0:7] == b"applied"       # writes are not rolled back
    with pytest.raises(RuntimeError):
        w.write(a, b"late")
    with pool.rare_write_session() as w2:   # not left "open" in this thread
        w2.write(a, b"A")
    assert a[0:7] == b"Applied"


def test_session_unusable_after_exit(pool_factory):
    pool, a = write_rare_alloc(pool_factory, size=8, init=b"unchange")
    session = pool.rare_write_session()
    with pytest.raises(RuntimeError):
        session.write(a, b"X")        # never entered
    with session as w:
        w.write(a, b"U")
    with pytest.raises(RuntimeError):
        w.write(a, b"X")
    with pytest.raises(RuntimeError):
        w.memset(a, 0)
    assert a[:] == b"Unchange"


def test_session_from_another_thread(pool_factory):
    pool, a = write_rare_alloc(pool_factory, size=8, init=b"unchange")
    outcome = {}

    def use(w):
        for name, call in (("write", lambda: w.write(a, b"X")),
                           ("memset", lambda: w.memset(a, 0))):
            try:
                call()
                outcome[name] = None
            except BaseException as exc:
                outcome[name] = exc

    with pool.rare_write_session() as w:
        t = threading.Thread(target=use, args=(w,))
        t.start()
        t.join()
    assert isinstance(outcome["write"], RuntimeError)
    assert isinstance(outcome["memset"], RuntimeError)
    assert a[:] == b"unchange"


def test_sessions_in_two_threads_on_one_pool(pool_factory):
    """Only same-thread nesting is refused: two threads may each hold a
    session on the same pool."""
    pool = pool_factory(Mode.WR, name=unique())
    a, b = pool.zalloc(8), pool.zalloc(8)
    pool.protect()
    inside = threading.Event()
    release = threading.Event()
    errors = []

    def other():
        try:
            with pool.rare_write_session() as w:
                w.write(b, b"thread")
                inside.set()
                release.wait()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
            inside.set()

    t = threading.Thread(target=other)
    t.start()
    try:
        inside.wait()
        with pool.rare_write_session() as w:
            w.write(a, b"main")
    finally:
        release.set()
        t.join()
    assert not errors
    assert (a[0:4], b[0:6]) == (b"main", b"thread")


def test_session_refused_after_make_ro(pool_factory):
    pool, a = write_rare_alloc(pool_factory, size=8, init=b"unchange")
    with pool.rare_write_session() as w:
        w.write(a, b"U")
        pool.make_ro()
        with pytest.raises(ProtectionError):
            w.write(a, b"X")
        with pytest.raises(ProtectionError):
            w.memset(a, 0)
    assert a[:] == b"Unchange"


# ===================================================== make_ro


@pytest.mark.parametrize("mode", WR_MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("protect_first", [False, True], ids=["unprotected", "protected"])
def test_make_ro_makes_every_area_read_only(pool_factory, mode, protect_first):
    pool = pool_factory(mode, name=unique(), refill=PAGE)
    allocs = [pool.zalloc(PAGE // 2) for _ in range(5)]   # several areas
    for i, a in enumerate(allocs):
        pool.rare_write(a, b"alloc-%d" % i)
    if protect_first:
        pool.protect()
    pool.make_ro()
    assert {a.state for a in allocs} == {State.READ_ONLY}
    stats = pool.stats()
    assert stats.areas_by_state[State.READ_ONLY] == stats.areas >= 3
    assert stats.areas_by_state[State.WRITE_RARE] == 0
    assert stats.areas_by_state[State.WRITABLE] == 0
    for i, a in enumerate(allocs):
        assert a[0:7] == b"alloc-%d" % i
        for call in (lambda: pool.rare_write(a, b"X"),
                     lambda: prmem.rare_write(a, b"X", 1),
                     lambda: pool.rare_memset(a, 0),
                     lambda: prmem.rare_memset(a, 0, 0, 1),
                     lambda: a.write(b"X")):
            with pytest.raises(ProtectionError):
                call()
        assert a[0:7] == b"alloc-%d" % i
    for _, _, perms in maps_entries(pool.name):
        assert "w" not in perms
    pool.make_ro()                    # again: nothing to do
    assert {a.state for a in allocs} == {State.READ_ONLY}


SEALERS = [
    pytest.param(Mode.WR, "make_ro", id="WR-make_ro"),
    pytest.param(Mode.AUTO_WR, "make_ro", id="AUTO_WR-make_ro"),
    pytest.param(Mode.START_WR, "make_ro", id="START_WR-make_ro"),
    pytest.param(Mode.WR, "protect+make_ro", id="WR-protect-make_ro"),
    pytest.param(Mode.RO, "protect", id="RO-protect"),
    pytest.param(Mode.AUTO_RO, "protect", id="AUTO_RO-protect"),
]


def _sealed_alloc(pool_factory, mode, how):
    pool = pool_factory(mode, name=unique("sealed"))
    a = pool.zalloc(64)
    if mode.has_write_rare:
        pool.rare_write(a, b"sealed-data")
    else:
        a.write(b"sealed-data")
    if "protect" in how:
        pool.protect()
    if "make_ro" in how:
        pool.make_ro()
    assert a.state is State.READ_ONLY
    return pool, a


@pytest.mark.parametrize("mode,how", SEALERS)
def test_sealed_memory_refuses_mprotect(pool_factory, mode, how):
    pool, a = _sealed_alloc(pool_factory, mode, how)
    err = mprotect_errno(a.address, mmap.PROT_READ | mmap.PROT_WRITE)
    assert err in (errno.EACCES, errno.EPERM), os.strerror(err) if err else "mprotect succeeded"
    assert perms_at(a.address) == "r--s"
    assert a[0:11] == b"sealed-data"


@pytest.mark.parametrize("mode,how", SEALERS)
def test_sealed_memory_refuses_pwrite_on_memfd(pool_factory, mode, how):
    pool, a = _sealed_alloc(pool_factory, mode, how)
    fds = pool_fds(pool.name)
    assert fds, "the pool's memfd should be open"
    offset = chunk_offset(pool, a)
    for fd in fds:
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"EVIL", offset)
        assert info.value.errno == errno.EPERM
        # a fresh descriptor opened through /proc cannot write either
        try:
            fd2 = os.open("/proc/self/fd/%d" % fd, os.O_RDWR)
        except OSError:
            continue
        try:
            with pytest.raises(OSError) as info:
                os.pwrite(fd2, b"EVIL", offset)
            assert info.value.errno == errno.EPERM
        finally:
            os.close(fd2)
    assert a[0:11] == b"sealed-data"


@pytest.mark.parametrize("mode,how", SEALERS)
def test_sealed_memory_refuses_proc_self_mem(pool_factory, mode, how):
    pool, a = _sealed_alloc(pool_factory, mode, how)
    try:
        fd = os.open("/proc/self/mem", os.O_RDWR)
    except OSError as exc:  # pragma: no cover - depends on the sandbox
        pytest.skip("cannot open /proc/self/mem for writing: %s" % exc)
    try:
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"EVIL", a.address)
        assert info.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert a[0:11] == b"sealed-data"


@pytest.mark.parametrize("mode", WR_MODES, ids=lambda m: m.name)
def test_native_write_after_make_ro_segfaults(mode):
    result = run_child(f"""
        pool = Pool(Mode.{mode.name}, name="native_ro")
        a = pool.zalloc(64)
        prmem.rare_write(a, b"read-only")
        pool.make_ro()
        assert a.state is State.READ_ONLY
        print("before", bytes(a[0:9]).decode(), flush=True)
        native_write(a, b"NATIVE")
        print("survived", flush=True)
    """)
    assert result.returncode == -signal.SIGSEGV, result
    assert "before read-only" in result.stdout
    assert "survived" not in result.stdout


@pytest.mark.parametrize("mode", RO_MODES, ids=lambda m: m.name)
def test_make_ro_is_a_no_op_for_read_only_modes(pool_factory, mode):
    pool = pool_factory(mode, name=unique())
    a = pool.alloc(8)
    a.write(b"writable")
    pool.make_ro()
    assert a.state is State.WRITABLE  # nothing changed
    a.write(b"Writable")
    pool.protect()
    pool.make_ro()
    assert a.state is State.READ_ONLY
    assert a[:] == b"Writable"


def test_make_ro_refused_while_writable_views_alive(pool_factory):
    pool = pool_factory(Mode.WR, name=unique())
    a = pool.alloc(8)
    view = memoryview(a)
    assert not view.readonly
    with pytest.raises(BufferError):
        pool.make_ro()
    assert a.state is State.WRITABLE
    view[0:3] = b"abc"
    view.release()
    pool.make_ro()
    assert a.state is State.READ_ONLY
    assert a[0:3] == b"abc"


def test_make_ro_allowed_with_read_only_views(pool_factory):
    pool, a = write_rare_alloc(pool_factory, size=8, init=b"readonly")
    with memoryview(a) as view:
        pool.make_ro()
        assert view.tobytes() == b"readonly"   # the view survives the re-map
    assert a.state is State.READ_ONLY


def test_make_ro_after_destroy(pool_factory):
    pool, _ = write_rare_alloc(pool_factory)
    pool.destroy()
    with pytest.raises(PoolDestroyedError):
        pool.make_ro()


def test_destroy_after_make_ro(pool_factory):
    pool, a = write_rare_alloc(pool_factory, init=b"x")
    name = pool.name
    pool.make_ro()
    pool.destroy()
    assert maps_entries(name) == []
    assert pool_fds(name) == []
    with pytest.raises(PoolDestroyedError):
        prmem.rare_write(a, b"x")


# ===================================================== seal=True (mseal)


@pytest.mark.skipif("mseal" not in prmem.features, reason="kernel has no mseal()")
@pytest.mark.parametrize("mode,how", [
    (Mode.RO, "protect"), (Mode.WR, "make_ro"), (Mode.START_WR, "make_ro"),
], ids=["RO-protect", "WR-make_ro", "START_WR-make_ro"])
def test_mseal_refuses_munmap_mprotect_and_remap(mode, how):
    result = run_child(f"""
        import errno, mmap
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.mmap.restype = ctypes.c_void_p
        MAP_FAILED = ctypes.c_void_p(-1).value
        page = prmem.page_size
        pool = Pool(Mode.{mode.name}, name="sealed_mseal", seal=True)
        assert pool.seal
        a = pool.zalloc(64)
        prmem.rare_write(a, b"msealed") if pool.mode.has_write_rare else a.write(b"msealed")
        pool.{how}()
        assert a.state is State.READ_ONLY
        start = a.address & ~(page - 1)

        def err(rc):
            return "ok" if rc == 0 else errno.errorcode[ctypes.get_errno()]

        print("mprotect_rw", err(libc.mprotect(start, page, mmap.PROT_READ | mmap.PROT_WRITE)))
        print("mprotect_none", err(libc.mprotect(start, page, 0)))
        print("munmap", err(libc.munmap(start, page)))
        p = libc.mmap(start, page, mmap.PROT_READ | mmap.PROT_WRITE,
                      mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x10, -1, 0)  # MAP_FIXED
        print("mmap_fixed", "ok" if p != MAP_FAILED else errno.errorcode[ctypes.get_errno()])
        print("data", bytes(a[0:7]).decode())
        print("stats_sealed", pool.stats().sealed_chunks)
        try:
            pool.destroy()
        except Exception as exc:
            print("destroy", type(exc).__name__, exc)
        print("done")
    """)
    assert result.returncode == 0, result.stderr
    out = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    # PROT_WRITE may be refused for the missing VM_MAYWRITE before mseal is
    # even consulted; PROT_NONE (allowed on merely sealed memory) shows mseal
    assert out["mprotect_rw"] in ("EPERM", "EACCES"), out
    assert out["mprotect_none"] == "EPERM", out
    assert out["munmap"] == "EPERM", out
    assert out["mmap_fixed"] == "EPERM", out
    assert out["data"] == "msealed"
    assert result.stdout.splitlines()[-1] == "done"


# ===================================================== stress


def test_threads_rare_writing_and_reading():
    """4 writer threads rare-write their own 8-byte counters (each tagged with
    the writer's id) into distinct allocations of one protected WR pool while
    2 reader threads read them: 100,000 operations in all.  Readers must
    never see a foreign tag, a torn value or a counter going backwards."""
    n_writers, n_readers = 4, 2
    writes_each, reads_each = 20_000, 10_000   # 80,000 + 20,000 operations
    pool = prmem.Pool(Mode.WR, name=unique("stress"))
    try:
        # distinct allocations, two of them sharing a page, two on their own
        allocs = [pool.zalloc(8), pool.zalloc(8), pool.zalloc(PAGE, align_order=12),
                  pool.zalloc(8, align_order=12)]
        pool.protect()
        assert {a.state for a in allocs} == {State.WRITE_RARE}
        start = threading.Barrier(n_writers + n_readers)
        errors = []

        def value(i, n):
            return ((i + 1) << 48) | n

        def writer(i):
            try:
                a = allocs[i]
                start.wait()
                if i == 3:
                    with pool.rare_write_session() as w:   # one writes via a session
                        for n in range(1, writes_each + 1):
                            w.write(a, struct.pack("<Q", value(i, n)))
                else:
                    write = pool.rare_write if i % 2 == 0 else prmem.rare_write
                    for n in range(1, writes_each + 1):
                        write(a, struct.pack("<Q", value(i, n)))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(("writer", i, exc))

        def reader(r):
            try:
                views = [memoryview(a) for a in allocs]
                last = [0] * n_writers
                start.wait()
                for k in range(reads_each):
                    i = k % n_writers
                    if k % 2:
                        raw = allocs[i][0:8]
                    else:
                        raw = views[i][0:8].tobytes()
                    v = struct.unpack("<Q", raw)[0]
                    tag, n = v >> 48, v & ((1 << 48) - 1)
                    if v != 0 and (tag != i + 1 or not 1 <= n <= writes_each):
                        errors.append(("foreign/torn", r, i, hex(v)))
                    if v < last[i]:
                        errors.append(("backwards", r, i, hex(last[i]), hex(v)))
                    last[i] = v
                for v in views:
                    v.release()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(("reader", r, exc))

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(n_writers)]
        threads += [threading.Thread(target=reader, args=(r,)) for r in range(n_readers)]
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)     # interleave the threads much more finely
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            sys.setswitchinterval(interval)
        assert errors == []
        for i, a in enumerate(allocs):
            assert struct.unpack("<Q", a[0:8])[0] == value(i, writes_each)
            assert a.state is State.WRITE_RARE
        assert allocs[2][8:] == bytes(PAGE - 8)
        for _, _, perms in maps_entries(pool.name):
            assert "w" not in perms
    finally:
        pool.destroy()


def test_make_ro_racing_rare_writes(pool_factory):
    """make_ro() from one thread while another rare-writes: every write either
    lands before the seal or is refused with ProtectionError; afterwards the
    memory holds the last successful write."""
    pool, a = write_rare_alloc(pool_factory, size=8)
    ok = []
    refused = []
    go = threading.Event()

    def writer():
        go.wait()
        for n in range(1, 20_001):
            try:
                pool.rare_write(a, struct.pack("<Q", n))
                ok.append(n)
            except ProtectionError:
                refused.append(n)

    t = threading.Thread(target=writer)
    t.start()
    go.set()
    while not ok and t.is_alive():
        pass
    pool.make_ro()
    t.join()
    assert a.state is State.READ_ONLY
    assert ok and ok == list(range(1, len(ok) + 1))
    assert struct.unpack("<Q", a[0:8])[0] == ok[-1]
    assert refused == list(range(len(ok) + 1, 20_001))


# ===================================================== ProtectedRef


def _slot(ref):
    slot = ref._slot
    assert isinstance(slot, prmem.Allocation)
    return slot


def test_protected_ref_get_and_set():
    ref = prmem.ProtectedRef()
    assert ref.get() is None
    target = {"policy": 1}
    ref.set(target)
    assert ref.get() is target
    other = object()
    ref2 = prmem.ProtectedRef(other)
    assert ref2.get() is other
    ref2.set(target)
    assert ref2.get() is target and ref.get() is target
    ref.set(None)
    assert ref.get() is None


def test_protected_ref_record_is_write_rare():
    target = object()
    ref = prmem.ProtectedRef(target)
    slot = _slot(ref)
    assert slot.state is State.WRITE_RARE
    assert slot.pool.mode.has_write_rare
    assert int.from_bytes(slot[0:8], "little") == id(target)
    assert perms_at(slot.address) == "r--s"
    with pytest.raises(ProtectionError):
        slot.write(b"\0" * 8)
    new = object()
    ref.set(new)
    assert int.from_bytes(slot[0:8], "little") == id(new)
    assert perms_at(slot.address) == "r--s"


def test_protected_ref_detects_tampering():
    good, evil = object(), object()
    ref = prmem.ProtectedRef(good)
    object.__setattr__(ref, "_target", evil)
    with pytest.raises(ProtectionError):
        ref.get()
    with pytest.raises(ProtectionError):
        ref.get()                      # stays detected
    ref.set(good)                      # a legitimate set repairs it
    assert ref.get() is good
    ref._target = evil                 # plain attribute assignment too
    with pytest.raises(ProtectionError):
        ref.get()


def test_protected_ref_detects_tampering_with_recycled_identity():
    """Tampering must be detected even when the attacker's object lands at
    the address (id) of the original target, which CPython readily reuses
    once the original is freed."""

    class Target:
        pass

    original = Target()
    ref = prmem.ProtectedRef(original)
    recorded = id(original)
    del original
    object.__setattr__(ref, "_target", None)    # drops the last reference
    keep = []
    evil = None
    for _ in range(10_000):
        candidate = Target()
        if id(candidate) == recorded:
            evil = candidate
            break
        keep.append(candidate)
    if evil is None:
        evil = Target()
    object.__setattr__(ref, "_target", evil)
    with pytest.raises(ProtectionError):
        ref.get()


def test_protected_ref_threads():
    targets = [object() for _ in range(8)]
    ref = prmem.ProtectedRef(targets[0])
    errors = []

    def setter(k):
        try:
            for n in range(2000):
                ref.set(targets[(k + n) % len(targets)])
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    def getter():
        try:
            for _ in range(4000):
                got = ref.get()   # once: the setters move it on meanwhile
                assert any(got is t for t in targets)
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=setter, args=(k,)) for k in range(2)]
    threads += [threading.Thread(target=getter) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_protected_ref_record_cannot_be_written_natively():
    result = run_child("""
        target = object()
        ref = prmem.ProtectedRef(target)
        print("ok", ref.get() is target, flush=True)
        ctypes.memmove(ref._slot.address, b"\\0" * 8, 8)
        print("survived", flush=True)
    """)
    assert result.returncode == -signal.SIGSEGV, result
    assert "ok True" in result.stdout
    assert "survived" not in result.stdout


# ===================================================== replace_pool


def _fill(rules):
    """A build() for replace_pool that stores ``rules`` and remembers the
    pool and allocations it made."""
    made = {}

    def build(pool):
        made["pool"] = pool
        made["allocs"] = [pool.strdup(rule) for rule in rules]
        return made["allocs"]

    return build, made


def test_replace_pool_swaps_and_destroys_old():
    ref = prmem.ProtectedRef()
    build, made = _fill(["allow a", "deny b"])
    first = prmem.replace_pool(ref, build, name=unique("policy"))
    try:
        assert first is made["pool"]
        assert ref.get() is first
        assert not first.destroyed
        assert first.mode is Mode.RO
        assert [a.state for a in made["allocs"]] == [State.READ_ONLY] * 2
        assert [a[:] for a in made["allocs"]] == [b"allow a\0", b"deny b\0"]
        # the new version is sealed read-only, like any protected RO pool
        err = mprotect_errno(made["allocs"][0].address, mmap.PROT_READ | mmap.PROT_WRITE)
        assert err in (errno.EACCES, errno.EPERM)
        first_allocs = made["allocs"]

        build2, made2 = _fill(["allow c"])
        name2 = unique("policy")
        second = prmem.replace_pool(ref, build2, name=name2)
        assert ref.get() is second is made2["pool"]
        assert second.name == name2
        assert first.destroyed
        with pytest.raises(PoolDestroyedError):
            first_allocs[0][0:1]
        assert made2["allocs"][0][:] == b"allow c\0"
    finally:
        current = ref.get()
        if isinstance(current, prmem.Pool):
            current.destroy()


@pytest.mark.parametrize("mode", WR_MODES, ids=lambda m: m.name)
def test_replace_pool_write_rare_mode(mode):
    old = prmem.Pool(Mode.RO, name=unique("old"))
    ref = prmem.ProtectedRef(old)
    build, made = _fill(["rule"])
    new = prmem.replace_pool(ref, build, mode=mode, name=unique("new"), refill=PAGE)
    try:
        assert old.destroyed
        assert new.mode is mode
        (a,) = made["allocs"]
        assert a.state is State.WRITE_RARE
        prmem.rare_write(a, b"RULE")
        assert a[:] == b"RULE\0"
    finally:
        new.destroy()


def test_replace_pool_failed_build_keeps_old():
    ref = prmem.ProtectedRef()
    build, made = _fill(["allow old"])
    old = prmem.replace_pool(ref, build, name=unique("old"))
    old_alloc = made["allocs"][0]
    attempted = {}

    class BadPolicy(Exception):
        pass

    def bad_build(pool):
        attempted["pool"] = pool
        pool.strdup("half-built")
        raise BadPolicy("syntax error in rule 2")

    try:
        with pytest.raises(BadPolicy):
            prmem.replace_pool(ref, bad_build, name=unique("new"))
        assert ref.get() is old
        assert not old.destroyed
        assert attempted["pool"].destroyed          # the half-built one is gone
        assert attempted["pool"] is not old
        assert old_alloc[:] == b"allow old\0"       # the old one still serves
        assert old_alloc.state is State.READ_ONLY
        extra = old.strdup("still usable")
        assert extra[:] == b"still usable\0"
        # and a later update still works
        build2, made2 = _fill(["allow new"])
        new = prmem.replace_pool(ref, build2, name=unique("newer"))
        assert ref.get() is new and old.destroyed
        assert made2["allocs"][0][:] == b"allow new\0"
    finally:
        current = ref.get()
        if isinstance(current, prmem.Pool):
            current.destroy()


def test_replace_pool_non_pool_target_is_left_alone():
    previous = {"not": "a pool"}
    ref = prmem.ProtectedRef(previous)
    new = prmem.replace_pool(ref, lambda pool: pool.zalloc(8), name=unique())
    try:
        assert ref.get() is new
        assert previous == {"not": "a pool"}
    finally:
        new.destroy()


# ===================================================== the example


def test_policy_update_example_runs():
    script = REPO / "examples" / "policy_update.py"
    assert script.is_file()
    # the same interpreter, so the same prmem the tests import
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "old policy still serving" in result.stdout


@pytest.mark.parametrize("secret", [False, True])
def test_rare_write_from_an_overlapping_view_of_the_same_memory(secret):
    # Found by the state machine: pwrite (and a copy through the secret
    # alias) copies forwards, so an overlapping source must be staged.
    if secret and "memfd_secret" not in prmem.features:
        pytest.skip("no memfd_secret")
    pool = prmem.Pool(Mode.START_WR, name="overlap", secret=secret)
    try:
        a = pool.strdup(b"0123456789")
        with memoryview(a) as view:
            prmem.rare_write(a, view[0:6], 2)
            prmem.rare_write(a, view[4:10], 1)
        expected = bytearray(b"0123456789")
        expected[2:8] = bytes(expected[0:6])
        expected[1:7] = bytes(expected[4:10])
        assert bytes(a) == bytes(expected) + b"\0"
    finally:
        pool.destroy()
