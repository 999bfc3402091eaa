"""The public pool API: arguments, stats, buffers, alignment, refill, threads.

Protection itself (what the MMU refuses) is proven in
test_protection_matrix.py; this file checks the Python-visible contract.
"""
from __future__ import annotations

import ctypes
import io
import os
import struct
import threading

import pytest

import prmem
from prmem import Mode, State

from conftest import maps_entries

PAGE = prmem.page_size

# Pools show up in /proc/self/maps by name only when backed by memfds.
needs_memfd = pytest.mark.skipif("memfd" not in prmem.features,
                                 reason="no memfd: pool mappings are unnamed")


def roundup(n: int, align: int) -> int:
    return (n + align - 1) // align * align


# --------------------------------------------------------------- module surface


def test_exception_hierarchy():
    assert issubclass(prmem.ProtectionError, prmem.PrmemError)
    assert issubclass(prmem.ProtectionError, PermissionError)
    assert issubclass(prmem.PoolDestroyedError, prmem.PrmemError)
    assert issubclass(prmem.PoolDestroyedError, ValueError)
    assert issubclass(prmem.UnsupportedError, prmem.PrmemError)
    assert issubclass(prmem.PrmemError, Exception)


def test_enums_and_features():
    assert {m.name for m in Mode} == {"RO", "WR", "AUTO_RO", "AUTO_WR", "START_WR"}
    assert {s.name for s in State} == {"WRITABLE", "WRITE_RARE", "READ_ONLY"}
    # Protection only increases: the enum order says so.
    assert State.WRITABLE < State.WRITE_RARE < State.READ_ONLY
    assert isinstance(prmem.features, frozenset)
    assert all(isinstance(f, str) for f in prmem.features)
    assert prmem.features <= {"memfd", "memfd_seal_future_write", "mseal",
                              "memfd_secret", "pkeys"}
    # Sealing needs memfd; without it prmem falls back to unsealed tmpfs files.
    if "memfd_seal_future_write" in prmem.features:
        assert "memfd" in prmem.features
    assert prmem.page_size > 0 and prmem.page_size & (prmem.page_size - 1) == 0


def test_pool_defaults_and_attributes(pool_factory):
    pool = pool_factory(name="api-defaults")
    assert pool.mode is Mode.RO
    assert pool.name == "api-defaults"
    assert pool.destroyed is False
    a = pool.alloc(10)
    assert a.address % 8 == 0  # default align_order is 3
    assert isinstance(a.address, int) and a.address > 0
    assert a.size == 10 and len(a) == 10
    assert a.state is State.WRITABLE
    assert a.pool is pool
    # Default refill: the first area is 65536 bytes.
    assert pool.stats().bytes_mapped == roundup(65536, PAGE)


@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.name)
def test_mode_accepted_as_enum_int_and_name(pool_factory, mode):
    for spelled in (mode, int(mode), mode.name, mode.name.lower()):
        pool = pool_factory(spelled, name="api-mode")
        assert pool.mode is mode


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("mode", [99, -1, len(Mode), "bogus", "", 2**100])
def test_unknown_mode_is_value_error(mode):
    with pytest.raises(ValueError):
        prmem.Pool(mode)


@pytest.mark.parametrize("refill", [0, -1, -4096, -2**70])
def test_nonpositive_refill_is_value_error(refill):
    with pytest.raises(ValueError):
        prmem.Pool(refill=refill)


@pytest.mark.parametrize("refill", [1.5, "4096", 4096.0, None])
def test_non_int_refill_is_type_error(refill):
    with pytest.raises(TypeError):
        prmem.Pool(refill=refill)


@pytest.mark.parametrize("order", [-1, 13, 64, 2**31, 2**100, -2**100])
def test_pool_align_order_out_of_range_is_value_error(order):
    with pytest.raises(ValueError):
        prmem.Pool(align_order=order)


@pytest.mark.parametrize("order", [-1, 13, 64, 2**31, 2**100])
def test_alloc_align_order_out_of_range_is_value_error(pool_factory, order):
    pool = pool_factory(name="api-badalign")
    with pytest.raises(ValueError):
        pool.alloc(8, align_order=order)
    with pytest.raises(ValueError):
        pool.zalloc(8, align_order=order)
    with pytest.raises(ValueError):
        pool.calloc(2, 4, align_order=order)
    assert pool.stats().allocations == 0


@pytest.mark.parametrize("size", [0, -1, -4096, -2**70])
def test_nonpositive_size_is_value_error(pool_factory, size):
    pool = pool_factory(name="api-badsize")
    for method in (pool.alloc, pool.zalloc):
        with pytest.raises(ValueError):
            method(size)
    with pytest.raises(ValueError):
        pool.calloc(size, 8)
    with pytest.raises(ValueError):
        pool.calloc(8, size)
    st = pool.stats()
    assert st.allocations == 0 and st.areas == 0 and st.bytes_requested == 0


@pytest.mark.parametrize("size", [1.0, 8.5, "8", b"8", None, [8]])
def test_non_int_size_is_type_error(pool_factory, size):
    pool = pool_factory(name="api-typesize")
    for method in (pool.alloc, pool.zalloc):
        with pytest.raises(TypeError):
            method(size)
    with pytest.raises(TypeError):
        pool.calloc(size, 8)
    with pytest.raises(TypeError):
        pool.calloc(8, size)
    assert pool.stats().allocations == 0


@pytest.mark.parametrize("n, size", [(2**32, 2**32), (2**62, 4), (2**63 - 1, 2),
                                     (3, 2**62)])
def test_calloc_overflow(pool_factory, n, size):
    pool = pool_factory(name="api-calloc-ovf")
    with pytest.raises(OverflowError):
        pool.calloc(n, size)
    assert pool.stats().allocations == 0
    assert pool.calloc(4, 4).size == 16


@pytest.mark.parametrize("mode", [Mode.RO, Mode.AUTO_RO, Mode.START_WR],
                         ids=lambda m: m.name)
def test_memory_error_leaves_pool_usable(pool_factory, mode):
    pool = pool_factory(mode, name="api-nomem", refill=4096)
    first = pool.strdup(b"before")
    before = pool.stats()
    for huge in (2**62, 2**63 - 1, 2**64, 2**200):
        with pytest.raises(MemoryError):
            pool.alloc(huge)
    with pytest.raises(MemoryError):
        pool.calloc(2**31, 2**31)
    after = pool.stats()
    # Nothing changed: no area, no allocation, no auto-protection.
    assert after == before
    assert first.state is before_state(mode)
    assert bytes(first) == b"before\0"
    # ... and the pool keeps working.
    b = pool.alloc(100)
    assert b.size == 100 and bytes(b) == bytes(100)
    c = pool.alloc(5 * PAGE)
    assert bytes(c) == bytes(5 * PAGE)
    pool.protect()


def before_state(mode: Mode) -> State:
    return State.WRITE_RARE if mode is Mode.START_WR else State.WRITABLE


def test_pool_refill_larger_than_address_space_fails_with_memory_error(pool_factory):
    pool = pool_factory(name="api-hugerefill", refill=2**62)
    with pytest.raises(MemoryError):
        pool.alloc(1)
    assert pool.stats().areas == 0


def test_strdup(pool_factory):
    pool = pool_factory(name="api-strdup")
    a = pool.strdup(b"hello")
    assert a.size == 6 and bytes(a) == b"hello\0"
    u = pool.strdup("h\u00e9llo \u2603")
    assert bytes(u) == "h\u00e9llo \u2603".encode() + b"\0"
    assert bytes(pool.strdup(bytearray(b"ba"))) == b"ba\0"
    assert bytes(pool.strdup(memoryview(b"mv"))) == b"mv\0"
    empty = pool.strdup(b"")
    assert empty.size == 1 and bytes(empty) == b"\0"
    x = pool.strdup(b"abc")
    y = pool.strdup(b"de")
    assert y.address >= x.address + x.size
    assert bytes(x) == b"abc\0" and bytes(y) == b"de\0"


@pytest.mark.parametrize("data", [b"a\0b", "a\0b", b"\0", bytearray(b"xy\0")])
def test_strdup_embedded_nul_is_value_error(pool_factory, data):
    pool = pool_factory(name="api-strdup-nul")
    with pytest.raises(ValueError):
        pool.strdup(data)
    assert pool.stats().allocations == 0


@pytest.mark.parametrize("data", [5, None, 1.5, ["a"]])
def test_strdup_wrong_type_is_type_error(pool_factory, data):
    pool = pool_factory(name="api-strdup-type")
    with pytest.raises(TypeError):
        pool.strdup(data)


def test_out_of_bounds_writes_and_indexes(pool_factory):
    pool = pool_factory(name="api-oob")
    a = pool.alloc(16)
    a.write(b"0123456789abcdef")
    original = bytes(a)
    for data, offset in [(b"xy", 15), (b"x", 16), (b"", 17), (b"x", -1),
                         (bytes(17), 0), (b"x", 2**70), (b"x", -2**70)]:
        with pytest.raises(ValueError):
            a.write(data, offset)
    with pytest.raises(ValueError):
        a.write(b"x" * 17)
    for i in (16, 17, -17, 2**70, -2**70):
        with pytest.raises(IndexError):
            a[i]
        with pytest.raises(IndexError):
            a[i] = 1
    # Slices cannot resize the allocation.
    with pytest.raises(ValueError):
        a[0:4] = b"abc"
    with pytest.raises(ValueError):
        a[14:] = b"abcd"
    # Bytes must be bytes.
    for bad in (256, -1):
        with pytest.raises(ValueError):
            a[0] = bad
    with pytest.raises(TypeError):
        a.write("text")
    with pytest.raises(TypeError):
        a.write(b"x", 1.0)
    with pytest.raises(TypeError):
        del a[0]
    assert bytes(a) == original


def test_indexing_slicing_and_write(pool_factory):
    pool = pool_factory(name="api-index")
    a = pool.alloc(8)
    a.write(b"abcdefgh")
    assert a[0] == ord("a") and a[-1] == ord("h")
    assert a[2:5] == b"cde"
    assert a[::2] == b"aceg"
    assert a[::-1] == b"hgfedcba"
    assert a[5:2] == b""
    a[0] = ord("A")
    a[1:3] = b"BC"
    a[::-1] = b"12345678"[::-1]  # writes "12345678" forwards
    assert bytes(a) == b"12345678"
    a[::2] = b"wxyz"
    assert bytes(a) == b"w2x4y6z8"
    a.write(b"Q", offset=7)
    a.write(b"", offset=8)
    assert bytes(a) == b"w2x4y6zQ"
    assert ctypes.string_at(a.address, 8) == b"w2x4y6zQ"


@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.name)
def test_memory_is_zero_filled(pool_factory, mode):
    # An earlier pool with the same name leaves no trace behind.
    old = prmem.Pool(mode, name="api-zero", refill=4096)
    if mode is not Mode.START_WR:
        old.alloc(3 * PAGE).write(b"\xff" * (3 * PAGE))
    old.destroy()
    pool = pool_factory(mode, name="api-zero", refill=4096)
    for a in (pool.alloc(100), pool.zalloc(5000), pool.calloc(7, 9),
              pool.alloc(3 * PAGE), pool.alloc(1, align_order=12)):
        assert bytes(a) == bytes(a.size)
        assert ctypes.string_at(a.address, a.size) == bytes(a.size)


def test_calloc_size_and_alignment(pool_factory):
    pool = pool_factory(name="api-calloc")
    pool.alloc(1)
    c = pool.calloc(3, 5, align_order=6)
    assert c.size == 15 and c.address % 64 == 0


# -------------------------------------------------------------------- stats


def test_stats_after_known_sequence(pool_factory):
    pool = pool_factory(Mode.RO, name="api-stats", refill=2 * PAGE)
    st = pool.stats()
    assert isinstance(st, prmem.PoolStats)
    assert (st.name, st.mode, pool.destroyed) == ("api-stats", Mode.RO, False)
    assert (st.allocations, st.areas, st.bytes_requested, st.bytes_mapped) == (0, 0, 0, 0)
    assert st.bytes_lost_to_protection == 0

    pool.alloc(100)                 # area 1 (2 pages), used 100
    pool.alloc(PAGE + 904)          # at offset 104, area 1 used 104 + PAGE + 904
    used1 = 104 + PAGE + 904
    pool.alloc(3 * PAGE - 100)      # does not fit: area 2 of 3 pages (> refill)
    st = pool.stats()
    assert st.allocations == 3
    assert st.areas == 2
    assert st.bytes_requested == 100 + PAGE + 904 + 3 * PAGE - 100
    assert st.bytes_mapped == 2 * PAGE + 3 * PAGE
    assert st.bytes_free == 100
    assert st.bytes_lost_to_protection == 0
    assert st.bytes_reserved >= st.bytes_mapped
    assert st.areas_by_state == {State.WRITABLE: 2, State.WRITE_RARE: 0, State.READ_ONLY: 0}
    assert used1 < 2 * PAGE

    pool.protect()
    st = pool.stats()
    # protect() closes the current area: its free rest is lost.
    assert st.bytes_lost_to_protection == 100
    assert st.bytes_free == 0
    assert st.areas_by_state == {State.WRITABLE: 0, State.WRITE_RARE: 0, State.READ_ONLY: 2}
    assert st.sealed_chunks == st.chunks >= 1

    pool.alloc(10)                  # a new WRITABLE area after protect()
    st = pool.stats()
    assert st.allocations == 4 and st.areas == 3
    assert st.bytes_mapped == 7 * PAGE
    assert st.bytes_free == 2 * PAGE - 10
    assert st.areas_by_state == {State.WRITABLE: 1, State.WRITE_RARE: 0, State.READ_ONLY: 2}

    pool.protect()
    st = pool.stats()
    assert st.bytes_lost_to_protection == 100 + 2 * PAGE - 10
    assert st.areas_by_state == {State.WRITABLE: 0, State.WRITE_RARE: 0, State.READ_ONLY: 3}
    # A second protect() with nothing new changes nothing.
    pool.protect()
    assert pool.stats() == st


@pytest.mark.parametrize("mode, rollover, protected", [
    (Mode.WR, State.WRITABLE, State.WRITE_RARE),
    (Mode.AUTO_RO, State.READ_ONLY, State.READ_ONLY),
    (Mode.AUTO_WR, State.WRITE_RARE, State.WRITE_RARE),
    (Mode.START_WR, State.WRITE_RARE, State.WRITE_RARE),
], ids=lambda v: v.name)
def test_stats_areas_by_state_per_mode(pool_factory, mode, rollover, protected):
    pool = pool_factory(mode, name="api-stats-mode", refill=PAGE)
    pool.alloc(PAGE - 8)
    pool.alloc(16)                  # opens area 2
    st = pool.stats()
    current = State.WRITE_RARE if mode is Mode.START_WR else State.WRITABLE
    expected = {s: 0 for s in State}
    expected[rollover] += 1
    expected[current] += 1
    assert st.areas_by_state == expected
    assert st.mode is mode
    pool.protect()
    st = pool.stats()
    assert st.areas_by_state == {s: (2 if s is protected else 0) for s in State}
    assert st.bytes_lost_to_protection == PAGE - 16


def test_stats_counts_buffer_views(pool_factory):
    pool = pool_factory(Mode.WR, name="api-stats-views")
    a = pool.alloc(8)
    with memoryview(a) as mv:
        st = pool.stats()
        assert (st.buffer_views, st.writable_buffer_views) == (1, 1)
        assert not mv.readonly
    assert (pool.stats().buffer_views, pool.stats().writable_buffer_views) == (0, 0)
    pool.protect()
    with memoryview(a) as mv1, memoryview(a) as mv2:
        st = pool.stats()
        assert (st.buffer_views, st.writable_buffer_views) == (2, 0)
        assert mv1.readonly and mv2.readonly
    assert pool.stats().buffer_views == 0


def test_stats_is_frozen_snapshot(pool_factory):
    pool = pool_factory(name="api-stats-frozen")
    st = pool.stats()
    pool.alloc(8)
    assert st.allocations == 0 and pool.stats().allocations == 1
    with pytest.raises(Exception):
        st.allocations = 5  # frozen dataclass


# ----------------------------------------------------------- buffer protocol


def test_memoryview_readonly_follows_state(pool_factory):
    pool = pool_factory(Mode.RO, name="api-buf")
    a = pool.alloc(16)
    with memoryview(a) as mv:
        assert not mv.readonly
        assert mv.nbytes == 16 and mv.format == "B"
        mv[0:5] = b"hello"
    assert bytes(a)[:5] == b"hello"
    pool.protect()
    with memoryview(a) as mv:
        assert mv.readonly
        assert bytes(mv[:5]) == b"hello"
        with pytest.raises(TypeError):
            mv[0] = 0
    assert bytes(a)[:5] == b"hello"


def test_writable_buffer_on_protected_memory_is_protection_error(pool_factory):
    pool = pool_factory(Mode.WR, name="api-buf-ctypes")
    a = pool.alloc(16)
    c = ctypes.c_char.from_buffer(a)  # writable buffer: fine while WRITABLE
    c.value = b"Z"
    del c
    assert a[0] == ord("Z")
    pool.protect()
    # A request for a writable buffer (PyBUF_WRITABLE) gets ProtectionError
    # from prmem; os.readv passes it on unchanged.
    r, w = os.pipe()
    try:
        os.write(w, b"evil")
        with pytest.raises(prmem.ProtectionError):
            os.readv(r, [a])
    finally:
        os.close(r)
        os.close(w)
    # Other consumers replace the error with their own TypeError (argument
    # parsing clears it; ctypes asks for a plain buffer and checks readonly
    # itself): refused all the same.
    for request in (lambda: ctypes.c_char.from_buffer(a),
                    lambda: (ctypes.c_char * 16).from_buffer(a),
                    lambda: struct.pack_into("B", a, 0, 0x41),
                    lambda: io.BytesIO(b"evil").readinto(a)):
        with pytest.raises((prmem.ProtectionError, TypeError)):
            request()
    assert pool.stats().buffer_views == 0
    assert a[0] == ord("Z")
    # A copy is a read: fine.
    assert (ctypes.c_char * 16).from_buffer_copy(a).raw[:1] == b"Z"


@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.name)
def test_writable_view_blocks_protect_and_destroy(pool_factory, mode):
    pool = pool_factory(mode, name="api-buf-block")
    a = pool.alloc(16)
    if mode is Mode.START_WR:
        # Never writable: only read-only views, which do not block protect().
        mv = memoryview(a)
        assert mv.readonly
        pool.protect()
        with pytest.raises(BufferError):
            pool.destroy()
        mv.release()
        pool.destroy()
        return
    mv = memoryview(a)
    with pytest.raises(BufferError):
        pool.protect()
    assert a.state is State.WRITABLE
    with pytest.raises(BufferError):
        pool.destroy()
    assert not pool.destroyed
    mv[0] = 7  # the view still works
    mv.release()
    pool.protect()
    assert a.state is not State.WRITABLE
    assert a[0] == 7
    pool.destroy()
    assert pool.destroyed


def test_ctypes_writable_buffer_blocks_protect(pool_factory):
    pool = pool_factory(Mode.RO, name="api-buf-ctypes-block")
    a = pool.alloc(8)
    c = (ctypes.c_char * 8).from_buffer(a)
    with pytest.raises(BufferError):
        pool.protect()
    del c
    pool.protect()
    assert a.state is State.READ_ONLY


@pytest.mark.parametrize("mode", [Mode.RO, Mode.WR, Mode.AUTO_RO, Mode.AUTO_WR],
                         ids=lambda m: m.name)
def test_readonly_view_survives_protect(pool_factory, mode):
    pool = pool_factory(mode, name="api-buf-survive", refill=PAGE)
    a = pool.alloc(32)
    a.write(b"kept across protect")
    pool.protect()
    mv = memoryview(a)
    assert mv.readonly
    b = pool.alloc(32)       # new WRITABLE area; the view is on the protected one
    b.write(b"second")
    pool.protect()           # read-only views do not block protect()
    assert bytes(mv[:19]) == b"kept across protect"
    assert b.state is not State.WRITABLE
    with pytest.raises(BufferError):
        pool.destroy()
    mv.release()
    pool.destroy()


@pytest.mark.parametrize("mode", [Mode.AUTO_RO, Mode.AUTO_WR], ids=lambda m: m.name)
def test_auto_protect_blocked_by_writable_view(pool_factory, mode):
    pool = pool_factory(mode, name="api-buf-auto", refill=PAGE)
    a = pool.alloc(PAGE - 64)
    mv = memoryview(a)
    before = pool.stats()
    with pytest.raises(BufferError):
        pool.alloc(128)  # would open a new area and auto-protect a's area
    assert pool.stats() == before
    assert a.state is State.WRITABLE
    mv[0:2] = b"ok"
    # An allocation that still fits the current area is fine.
    small = pool.alloc(16)
    assert small.state is State.WRITABLE
    mv.release()
    c = pool.alloc(128)
    assert c.state is State.WRITABLE
    assert a.state is (State.READ_ONLY if mode is Mode.AUTO_RO else State.WRITE_RARE)
    assert a[0:2] == b"ok"


# ----------------------------------------------------------- use after destroy


def test_use_after_destroy(pool_factory):
    pool = pool_factory(Mode.WR, name="api-destroyed")
    a = pool.alloc(16)
    pool.destroy()
    assert pool.destroyed
    pool.destroy()  # twice: no-op
    E = prmem.PoolDestroyedError
    pool_calls = {
        "alloc": lambda: pool.alloc(8),
        "zalloc": lambda: pool.zalloc(8),
        "calloc": lambda: pool.calloc(2, 4),
        "strdup": lambda: pool.strdup(b"x"),
        "protect": pool.protect,
        "make_ro": pool.make_ro,
        "rare_write": lambda: pool.rare_write(a, b"x"),
        "rare_memset": lambda: pool.rare_memset(a, 0),
        "prmem.rare_write": lambda: prmem.rare_write(a, b"x"),
        "prmem.rare_memset": lambda: prmem.rare_memset(a, 1),
        "stats": pool.stats,
    }
    alloc_calls = {
        "write": lambda: a.write(b"x"),
        "address": lambda: a.address,
        "state": lambda: a.state,
        "getitem": lambda: a[0],
        "getslice": lambda: a[0:4],
        "setitem": lambda: a.__setitem__(0, 1),
        "setslice": lambda: a.__setitem__(slice(0, 2), b"xy"),
        "memoryview": lambda: memoryview(a),
        "bytes": lambda: bytes(a),
        "ctypes.from_buffer": lambda: ctypes.c_char.from_buffer(a),
        "ctypes.from_buffer_copy": lambda: ctypes.c_char.from_buffer_copy(a),
    }
    for what, call in {**pool_calls, **alloc_calls}.items():
        with pytest.raises(E):
            call()
            pytest.fail(f"{what} did not raise")
    # Attributes that need no memory stay available.
    assert a.size == 16 and len(a) == 16 and a.pool is pool
    assert "destroyed" in repr(pool) and "destroyed" in repr(a)
    # pool.destroyed is the way to ask a dead pool; stats() raises like the rest.
    with pytest.raises(E):
        with pool.rare_write_session() as w:
            w.write(a, b"x")


@needs_memfd
def test_destroy_unmaps_memory(pool_factory):
    pool = pool_factory(Mode.RO, name="api-destroy-unmap", refill=PAGE)
    pool.alloc(8)
    pool.protect()
    pool.alloc(8)
    assert maps_entries("api-destroy-unmap")
    pool.destroy()
    assert maps_entries("api-destroy-unmap") == []


def test_context_manager_destroys():
    with prmem.Pool(name="api-ctx") as pool:
        assert isinstance(pool, prmem.Pool)
        a = pool.strdup(b"x")
        assert bytes(a) == b"x\0"
    assert pool.destroyed
    with pytest.raises(prmem.PoolDestroyedError):
        bytes(a)
    with pytest.raises(prmem.PoolDestroyedError):
        pool.alloc(1)


def test_context_manager_destroys_on_exception():
    with pytest.raises(KeyError):
        with prmem.Pool(Mode.WR, name="api-ctx-exc") as pool:
            pool.alloc(8)
            pool.protect()
            raise KeyError("boom")
    assert pool.destroyed
    if "memfd" in prmem.features:
        assert maps_entries("api-ctx-exc") == []


# ------------------------------------------------------------------ alignment


@pytest.mark.parametrize("order", range(13))
def test_alignment_every_order(pool_factory, order):
    align = 1 << order
    pool = pool_factory(name=f"api-align-{order}", refill=4 * PAGE)
    pool.alloc(1, align_order=0)  # knock the bump pointer off any alignment
    prev = None
    for size in (1, 3, 17, align + 1, 100):
        areas = pool.stats().areas
        a = pool.alloc(size, align_order=order)
        assert a.address % align == 0
        if prev is not None and pool.stats().areas == areas:
            # same area: packed at the first aligned address after the previous one
            assert a.address == roundup(prev.address + prev.size, align)
        prev = a
    z = pool.zalloc(5, align_order=order)
    c = pool.calloc(3, 3, align_order=order)
    assert z.address % align == 0 and c.address % align == 0
    # Pool-wide default alignment.
    dpool = pool_factory(name=f"api-align-d{order}", align_order=order)
    dpool.alloc(1)
    for _ in range(4):
        assert dpool.alloc(3).address % align == 0


@pytest.mark.parametrize("order", [0, 3, 6, 11, 12])
def test_alignment_across_area_boundaries(pool_factory, order):
    align = 1 << order
    pool = pool_factory(name="api-align-cross", refill=PAGE)
    for i in range(3 * PAGE // 100):
        a = pool.alloc(97 + i % 5, align_order=order)
        assert a.address % align == 0
    assert pool.stats().areas >= 3
    # A request that no longer fits opens a page-aligned area.
    pool2 = pool_factory(name="api-align-cross2", refill=PAGE)
    first = pool2.alloc(PAGE - 5, align_order=0)
    b = pool2.alloc(8, align_order=order)
    assert b.address % align == 0
    assert b.address % PAGE == 0 and b.address != first.address
    assert pool2.stats().areas == 2


# -------------------------------------------------------------------- refill


def test_refill_semantics(pool_factory):
    pool = pool_factory(name="api-refill", refill=2 * PAGE)
    a = pool.alloc(10)
    assert a.address % PAGE == 0
    assert pool.stats().bytes_mapped == 2 * PAGE
    # Larger than refill: an area of its own, rounded up to pages.
    big = pool.alloc(5 * PAGE + 1)
    assert big.address % PAGE == 0
    st = pool.stats()
    assert st.areas == 2 and st.bytes_mapped == 2 * PAGE + 6 * PAGE
    assert st.bytes_free == PAGE - 1
    # What still fits goes into the big area's tail.
    c = pool.alloc(100)
    assert c.address == roundup(big.address + big.size, 8)
    assert pool.stats().areas == 2
    # What does not opens a refill-sized area.
    d = pool.alloc(PAGE)
    st = pool.stats()
    assert st.areas == 3 and st.bytes_mapped == 10 * PAGE
    assert d.address % PAGE == 0


@pytest.mark.parametrize("refill, area", [(1, PAGE), (PAGE, PAGE), (PAGE + 1, 2 * PAGE),
                                          (5000, roundup(5000, PAGE))])
def test_refill_rounded_to_pages(pool_factory, refill, area):
    pool = pool_factory(name="api-refill-round", refill=refill)
    pool.alloc(1)
    assert pool.stats().bytes_mapped == area
    pool.alloc(area - 8)  # fills it exactly (first alloc took 8 bytes with padding)
    assert pool.stats().areas == 1
    pool.alloc(1)
    assert pool.stats().areas == 2 and pool.stats().bytes_mapped == 2 * area


def test_exact_page_request_is_one_page_area(pool_factory):
    pool = pool_factory(name="api-refill-page", refill=1)
    a = pool.alloc(PAGE)
    b = pool.alloc(PAGE)
    assert pool.stats().bytes_mapped == 2 * PAGE
    assert {a.address % PAGE, b.address % PAGE} == {0}


# ------------------------------------------------------------------- threads


def test_concurrent_alloc_from_8_threads(pool_factory):
    pool = pool_factory(name="api-threads", refill=2 * PAGE)
    nthreads, per_thread = 8, 600
    barrier = threading.Barrier(nthreads)
    results: list[list] = [[] for _ in range(nthreads)]
    errors = []

    def worker(t):
        try:
            barrier.wait()
            for i in range(per_thread):
                size = 1 + (i * 37 + t * 11) % 300
                order = (i + t) % 13
                a = pool.alloc(size, align_order=order)
                a.write(bytes([t + 1]) * size)
                results[t].append((a, order))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    spans = []
    for t, allocs in enumerate(results):
        assert len(allocs) == per_thread
        for a, order in allocs:
            assert a.address % (1 << order) == 0
            # Nobody else wrote into it: no overlap with another thread's memory.
            assert bytes(a) == bytes([t + 1]) * a.size
            spans.append((a.address, a.address + a.size))
    spans.sort()
    for (s1, e1), (s2, e2) in zip(spans, spans[1:]):
        assert e1 <= s2, "overlapping allocations"
    st = pool.stats()
    assert st.allocations == nthreads * per_thread
    assert st.bytes_requested == sum(e - s for s, e in spans)


# ---------------------------------------------------------------------- VMAs


@needs_memfd
def test_million_small_allocations_use_few_vmas(pool_factory):
    name = "api-million"
    pool = pool_factory(Mode.RO, name=name)
    alloc = pool.alloc
    for _ in range(1_000_000):
        alloc(32)
    st = pool.stats()
    assert st.allocations == 1_000_000
    assert st.bytes_requested == 32_000_000
    assert st.bytes_mapped >= 32_000_000
    entries = maps_entries(name)
    assert 1 <= len(entries) <= 16, entries
    pool.protect()
    entries = maps_entries(name)
    assert 1 <= len(entries) <= 16, entries
    assert all(perms == "r--s" for _, _, perms in entries)


def test_uninitialised_pool_raises_instead_of_crashing():
    # Pool.__new__ without __init__: every method must refuse cleanly.
    pool = prmem.Pool.__new__(prmem.Pool)
    assert "uninitialised" in repr(pool)
    for call in (lambda: pool.alloc(8), lambda: pool.zalloc(8), lambda: pool.calloc(1, 8),
                 lambda: pool.strdup(b"x"), pool.protect, pool.destroy, pool.make_ro,
                 pool.stats, lambda: pool.rare_write(None, b"x"),
                 lambda: pool.rare_memset(None, 0)):
        with pytest.raises(prmem.PrmemError):
            call()
    # and initialising it afterwards still works
    prmem.Pool.__init__(pool, prmem.Mode.RO, name="late")
    a = pool.alloc(8)
    a.write(b"ok")
    with pytest.raises(RuntimeError):
        prmem.Pool.__init__(pool, prmem.Mode.RO, name="again")
    pool.destroy()


@pytest.mark.parametrize("mode", [Mode.RO, Mode.WR])
def test_destroy_zeroes_pages_that_can_still_be_written(mode):
    # Keep a duplicate of the pool's memory file across destroy(): the file
    # outlives the pool, so what destroy() left in its pages is visible.
    from conftest import pool_fds
    pool = prmem.Pool(mode, name="zero-on-destroy")
    a = pool.alloc(100_000)
    a.write(b"secret" * 10, offset=70_000)
    if mode is Mode.WR:
        pool.protect()
        prmem.rare_write(a, b"rare-secret", offset=90_000)
    fds = pool_fds("zero-on-destroy")
    assert fds
    dup = os.dup(fds[0])
    try:
        assert os.pread(dup, 6, 70_000) == b"secret"
        pool.destroy()
        assert os.pread(dup, 60, 70_000) == bytes(60)
        assert os.pread(dup, 11, 90_000) == bytes(11)
    finally:
        os.close(dup)


def test_stats_read_as_mapping_and_dict(pool_factory):
    pool = pool_factory(Mode.RO, name="api-stats-dict", refill=PAGE)
    pool.alloc(10)
    pool.protect()
    st = pool.stats()
    assert st["areas"] == st.areas == 1
    assert st["bytes_lost"] == st.bytes_lost == st.bytes_lost_to_protection == PAGE - 10
    with pytest.raises(KeyError):
        st["no_such_counter"]
    d = st.as_dict()
    assert d["mode"] == "RO" and d["areas_by_state"] == {"WRITABLE": 0, "WRITE_RARE": 0,
                                                          "READ_ONLY": 1}
