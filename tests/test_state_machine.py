"""Stateful model test: prmem pools against a small pure-Python reference.

The reference model follows the documented semantics (the pmalloc seeds and
the prmem docstrings), not the C code:

* a pool hands memory out of page-aligned *areas*; an area is
  ``max(roundup(size, page), roundup(refill, page))`` bytes; an allocation
  goes at the current area's first free offset rounded up to its alignment
  (``2**align_order``, default: the pool's), if it fits, else a new area is
  opened; ``protect()`` (and ``make_ro()`` on write-rare pools) ends the
  current area;
* new memory is WRITABLE (WRITE_RARE in START_WR pools) and zero-filled;
* AUTO_RO / AUTO_WR: opening a new area turns the previously current area
  READ_ONLY / WRITE_RARE;
* ``protect()``: RO/AUTO_RO -> everything READ_ONLY; WR/AUTO_WR/START_WR ->
  WRITABLE becomes WRITE_RARE;
* ``make_ro()``: write-rare modes -> everything READ_ONLY; no-op otherwise;
* plain writes need WRITABLE; ``rare_write()`` needs a write-rare mode and a
  state other than READ_ONLY; refused writes raise ProtectionError and change
  nothing; out-of-bounds writes raise ValueError and change nothing; data
  taken from a buffer view of pool memory (even of the destination itself,
  overlapping) lands as if it had been copied first;
* after ``destroy()`` every pool / allocation operation raises
  PoolDestroyedError, and ``destroy()`` again is a no-op;
* writable buffer views block protect() / make_ro() / destroy() (and an AUTO
  rollover of their area) with BufferError; any view blocks destroy().

The model keeps, per pool, its areas (size, start, state) and the bump
pointer, and per allocation its area, offset and expected bytes, so it
predicts the exact address of every allocation inside an existing area and
the exact area count / byte accounting of ``stats()``.
"""
from __future__ import annotations

from typing import List, Optional

import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

import prmem
from prmem import Mode, PoolDestroyedError, ProtectionError, State

PAGE = prmem.page_size
PAGE_SHIFT = PAGE.bit_length() - 1
WRITE_RARE_MODES = frozenset({Mode.WR, Mode.AUTO_WR, Mode.START_WR})
AUTO_ROLLOVER_STATE = {Mode.AUTO_RO: State.READ_ONLY, Mode.AUTO_WR: State.WRITE_RARE}
MAX_SIZE = 5000
MAX_POOLS = 5


def roundup(n: int, m: int) -> int:
    return -(-n // m) * m


# ------------------------------------------------------------------ model


class ModelArea:
    __slots__ = ("start", "size", "state")

    def __init__(self, start: int, size: int, state: State) -> None:
        self.start = start
        self.size = size
        self.state = state


class ModelPool:
    def __init__(self, pool: prmem.Pool, mode: Mode, refill: int, align_order: int) -> None:
        self.pool = pool
        self.mode = mode
        self.refill = roundup(refill, PAGE)
        self.align_order = align_order
        self.destroyed = False
        self.areas: List[ModelArea] = []
        self.current: Optional[ModelArea] = None
        self.cur_off = 0
        self.nallocs = 0
        self.bytes_requested = 0
        self.bytes_lost = 0
        self.allocs: List[ModelAlloc] = []

    @property
    def new_state(self) -> State:
        return State.WRITE_RARE if self.mode == Mode.START_WR else State.WRITABLE

    def plan(self, size: int, align: int) -> Optional[int]:
        """Offset in the current area where ``size`` bytes would go, or None
        if a new area has to be opened."""
        if self.current is None:
            return None
        q = roundup(self.cur_off, align)
        if q + size <= self.current.size:
            return q
        return None

    def area_size_for(self, size: int) -> int:
        return max(roundup(size, PAGE), self.refill)

    def end_current_area(self) -> None:
        if self.current is not None:
            self.bytes_lost += self.current.size - self.cur_off
            self.current = None
            self.cur_off = 0

    def protect(self) -> None:
        if self.mode in WRITE_RARE_MODES:
            for area in self.areas:
                area.state = max(area.state, State.WRITE_RARE)
        else:
            for area in self.areas:
                area.state = State.READ_ONLY
        self.end_current_area()

    def make_ro(self) -> None:
        if self.mode not in WRITE_RARE_MODES:
            return
        for area in self.areas:
            area.state = State.READ_ONLY
        self.end_current_area()


class ModelAlloc:
    def __init__(self, obj: prmem.Allocation, mpool: ModelPool, area: ModelArea,
                 address: int, align: int, contents: bytes) -> None:
        self.obj = obj
        self.mpool = mpool
        self.area = area
        self.address = address
        self.size = len(contents)
        self.align = align
        self.contents = bytearray(contents)

    @property
    def state(self) -> State:
        return self.area.state

    @property
    def destroyed(self) -> bool:
        return self.mpool.destroyed

    def __repr__(self) -> str:  # shown in hypothesis' failure reports
        return (f"<alloc size={self.size} mode={self.mpool.mode.name} "
                f"state={self.state.name}>")


# ------------------------------------------------------------- strategies

sizes = st.one_of(st.integers(1, 64), st.integers(1, MAX_SIZE))
opt_align = st.one_of(st.none(), st.integers(0, PAGE_SHIFT))
no_nul_bytes = st.binary(max_size=300).map(lambda b: b.replace(b"\0", b"\x01"))
no_nul_text = st.text(max_size=100).map(lambda t: t.replace("\0", "\1"))


@st.composite
def alloc_requests(draw):
    """(kind, args, kwargs, size, initial bytes or None, explicit align_order)."""
    kind = draw(st.sampled_from(["alloc", "zalloc", "calloc", "strdup", "strdup_str"]))
    if kind in ("alloc", "zalloc"):
        size = draw(sizes)
        order = draw(opt_align)
        kwargs = {} if order is None else {"align_order": order}
        return kind, (size,), kwargs, size, None, order
    if kind == "calloc":
        n = draw(st.integers(1, 64))
        each = draw(st.integers(1, MAX_SIZE // n))
        order = draw(opt_align)
        kwargs = {} if order is None else {"align_order": order}
        return kind, (n, each), kwargs, n * each, None, order
    if kind == "strdup":
        data = draw(no_nul_bytes)
        return kind, (data,), {}, len(data) + 1, data, None
    text = draw(no_nul_text)
    data = text.encode("utf-8")
    return "strdup", (text,), {}, len(data) + 1, data, None


POOL_ARGS = dict(mode=st.sampled_from(Mode), refill=st.integers(1, 3 * PAGE),
                 align_order=st.integers(0, 6))


# ----------------------------------------------------------- the machine


class PrmemMachine(RuleBasedStateMachine):
    pools = Bundle("pools")
    allocs = Bundle("allocs")

    def __init__(self) -> None:
        super().__init__()
        self.all_pools: List[ModelPool] = []
        self.first: Optional[ModelPool] = None
        self.counter = 0

    def teardown(self) -> None:
        # Destroy every pool even if one of them fails to go.
        errors = []
        for mp in self.all_pools:
            try:
                mp.pool.destroy()
                assert mp.pool.destroyed
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)
        if errors:
            raise errors[0]

    # -------------------------------------------------------------- pools

    # Hypothesis enables a random subset of the rules in each example (swarm
    # testing), so an example may never call allocate(): the initializers
    # give every example a pool with some allocations.  Initializers run in
    # a random order; whichever runs first creates the shared first pool
    # with its arguments (the other's pool arguments are then unused).

    @initialize(target=pools, **POOL_ARGS)
    def first_pool(self, mode, refill, align_order):
        return self._first_pool(mode, refill, align_order)

    @initialize(target=allocs, reqs=st.lists(alloc_requests(), min_size=1, max_size=8),
                **POOL_ARGS)
    def first_allocations(self, reqs, mode, refill, align_order):
        return self._allocate_many(self._first_pool(mode, refill, align_order), reqs)

    def _first_pool(self, mode, refill, align_order):
        if self.first is None:
            self.first = self._new_pool(mode, refill, align_order)
        return self.first

    @precondition(lambda self: sum(not p.destroyed for p in self.all_pools) < MAX_POOLS)
    @rule(target=pools, **POOL_ARGS)
    def create_pool(self, mode, refill, align_order):
        return self._new_pool(mode, refill, align_order)

    def _new_pool(self, mode, refill, align_order):
        self.counter += 1
        pool = prmem.Pool(mode, name=f"sm{self.counter}", refill=refill,
                          align_order=align_order)
        mp = ModelPool(pool, mode, refill, align_order)
        self.all_pools.append(mp)
        assert pool.mode == mode
        assert not pool.destroyed
        stats = pool.stats()
        assert (stats.allocations, stats.areas, stats.bytes_requested) == (0, 0, 0)
        return mp

    @rule(target=allocs, mp=pools, reqs=st.lists(alloc_requests(), min_size=1, max_size=5))
    def allocate(self, mp, reqs):
        return self._allocate_many(mp, reqs)

    def _allocate_many(self, mp, reqs):
        made = [self._allocate_one(mp, req) for req in reqs]
        return multiple(*[ma for ma in made if ma is not None])

    def _allocate_one(self, mp, req):
        kind, args, kwargs, size, init, order = req
        method = getattr(mp.pool, kind)
        if mp.destroyed:
            with pytest.raises(PoolDestroyedError):
                method(*args, **kwargs)
            return None
        self._check_new_allocation_rules(mp)
        # Every allocation, strdup included, uses the pool's default
        # alignment unless it asks for another one.
        align = 1 << (mp.align_order if order is None else order)
        offset = mp.plan(size, align)
        obj = method(*args, **kwargs)
        address = obj.address
        if offset is None:
            # A new area: page-aligned, the previous current area is
            # auto-protected in AUTO modes.
            assert address % PAGE == 0, hex(address)
            prev = mp.current
            event("allocation opened a new area")
            if prev is not None and mp.mode in AUTO_ROLLOVER_STATE:
                event("AUTO rollover")
                prev.state = max(prev.state, AUTO_ROLLOVER_STATE[mp.mode])
            area = ModelArea(address, mp.area_size_for(size), mp.new_state)
            mp.areas.append(area)
            mp.current = area
            offset = 0
        else:
            area = mp.current
            assert address == area.start + offset, (
                f"allocation of {size} bytes (align {align}) expected at area start "
                f"+ {offset:#x}, got area start + {address - area.start:#x}")
        mp.cur_off = offset + size
        mp.nallocs += 1
        mp.bytes_requested += size
        contents = bytes(size) if init is None else init + b"\0"
        ma = ModelAlloc(obj, mp, area, address, align, contents)
        mp.allocs.append(ma)
        assert ma.state == mp.new_state
        assert obj.state == mp.new_state
        assert obj.pool is mp.pool
        assert len(obj) == obj.size == size
        return ma

    def _check_new_allocation_rules(self, mp):
        # The model's own consistency: only the current area can be WRITABLE
        # in AUTO modes, and the current area is always in the "new" state.
        if mp.current is not None:
            assert mp.current.state == mp.new_state
        if mp.mode in AUTO_ROLLOVER_STATE:
            assert all(a.state != State.WRITABLE for a in mp.areas if a is not mp.current)

    @rule(mp=pools)
    def protect(self, mp):
        if mp.destroyed:
            with pytest.raises(PoolDestroyedError):
                mp.pool.protect()
            return
        mp.pool.protect()
        mp.protect()

    @rule(mp=pools)
    def make_ro(self, mp):
        if mp.destroyed:
            with pytest.raises(PoolDestroyedError):
                mp.pool.make_ro()
            return
        mp.pool.make_ro()
        mp.make_ro()

    @rule(mp=pools, really=st.integers(0, 2))
    def destroy(self, mp, really):
        # Destroy only one time in three, so pools live long enough to
        # get interesting; the other draws just cross-check the flag.
        assert mp.pool.destroyed is mp.destroyed
        if really != 2:
            return
        mp.pool.destroy()
        mp.destroyed = True
        assert mp.pool.destroyed
        mp.pool.destroy()  # a second destroy() is a no-op
        assert mp.pool.destroyed
        for method in ("protect", "make_ro", "stats"):
            with pytest.raises(PoolDestroyedError):
                getattr(mp.pool, method)()
        with pytest.raises(PoolDestroyedError):
            mp.pool.alloc(8)

    # -------------------------------------------------------------- writes

    @rule(ma=allocs, data=st.data())
    def write(self, ma, data):
        obj, size = ma.obj, ma.size
        how = data.draw(st.sampled_from(["write", "slice", "index", "step"]), label="how")
        if how == "write":
            offset = data.draw(st.integers(0, size), label="offset")
            payload = data.draw(st.binary(max_size=size - offset), label="payload")
            key = slice(offset, offset + len(payload))
            do = lambda: obj.write(payload, offset)  # noqa: E731
        elif how == "slice":
            start = data.draw(st.integers(0, size), label="start")
            stop = data.draw(st.integers(start, size), label="stop")
            payload = data.draw(st.binary(min_size=stop - start, max_size=stop - start),
                                label="payload")
            key = slice(start, stop)
            do = lambda: obj.__setitem__(key, payload)  # noqa: E731
        elif how == "index":
            index = data.draw(st.integers(-size, size - 1), label="index")
            value = data.draw(st.integers(0, 255), label="value")
            key = index
            payload = value
            do = lambda: obj.__setitem__(index, value)  # noqa: E731
        else:
            start = data.draw(st.integers(-size, size), label="start")
            step = data.draw(st.sampled_from([2, 3, -1, -2]), label="step")
            key = slice(start, None, step)
            count = len(range(size)[key])
            payload = data.draw(st.binary(min_size=count, max_size=count), label="payload")
            do = lambda: obj.__setitem__(key, payload)  # noqa: E731
        if ma.destroyed:
            with pytest.raises(PoolDestroyedError):
                do()
            return
        event(f"write to {ma.state.name}")
        if ma.state == State.WRITABLE:
            do()
            ma.contents[key] = payload
        else:
            with pytest.raises(ProtectionError):
                do()
        assert bytes(obj) == ma.contents

    @rule(ma=allocs, data=st.data())
    def write_out_of_bounds(self, ma, data):
        obj, size = ma.obj, ma.size
        how = data.draw(st.sampled_from(
            ["write", "slice", "index", "rare_write", "rare_memset"]), label="how")
        if how in ("write", "rare_write"):
            offset = data.draw(st.one_of(st.integers(-64, -1), st.integers(0, size + 64)),
                               label="offset")
            if 0 <= offset <= size:
                n = data.draw(st.integers(size - offset + 1, size - offset + 64), label="n")
            else:
                n = data.draw(st.integers(0, 64), label="n")
            payload = b"\xaa" * n
            if how == "write":
                do = lambda: obj.write(payload, offset)  # noqa: E731
            else:
                do = lambda: prmem.rare_write(obj, payload, offset)  # noqa: E731
            expected = ValueError
        elif how == "rare_memset":
            offset = data.draw(st.integers(0, size), label="offset")
            length = data.draw(st.integers(size - offset + 1, size - offset + 64),
                               label="length")
            do = lambda: prmem.rare_memset(obj, 0xAA, offset, length)  # noqa: E731
            expected = ValueError
        elif how == "slice":
            start = data.draw(st.integers(0, size), label="start")
            stop = data.draw(st.integers(start, size), label="stop")
            n = data.draw(st.integers(0, 64).filter(lambda k: k != stop - start), label="n")
            payload = b"\xaa" * n
            do = lambda: obj.__setitem__(slice(start, stop), payload)  # noqa: E731
            expected = ValueError
        else:
            index = data.draw(st.one_of(st.integers(size, size + 64),
                                        st.integers(-size - 64, -size - 1)), label="index")
            do = lambda: obj.__setitem__(index, 0xAA)  # noqa: E731
            expected = IndexError
        if ma.destroyed:
            # Bounds may be checked before liveness; either error is fine,
            # as long as it is an error.
            with pytest.raises((expected, PoolDestroyedError)):
                do()
            return
        with pytest.raises(expected) as info:
            do()
        assert not isinstance(info.value, (PoolDestroyedError, ProtectionError))
        assert bytes(obj) == ma.contents

    def _rare_allowed(self, ma) -> bool:
        return ma.mpool.mode in WRITE_RARE_MODES and ma.state != State.READ_ONLY

    @rule(ma=allocs, data=st.data())
    def rare_write(self, ma, data):
        obj, size, pool = ma.obj, ma.size, ma.mpool.pool
        how = data.draw(st.sampled_from(
            ["func", "pool", "session", "memset", "pool_memset"]), label="how")
        offset = data.draw(st.integers(0, size), label="offset")
        if how in ("memset", "pool_memset"):
            byte = data.draw(st.integers(0, 255), label="byte")
            length = data.draw(st.one_of(st.none(), st.integers(0, size - offset)),
                               label="length")
            n = size - offset if length is None else length
            payload = bytes([byte]) * n
            if how == "memset":
                do = lambda: prmem.rare_memset(obj, byte, offset, length)  # noqa: E731
            else:
                do = lambda: pool.rare_memset(obj, byte, offset, length)  # noqa: E731
        else:
            payload = data.draw(st.binary(max_size=size - offset), label="payload")
            if how == "func":
                do = lambda: prmem.rare_write(obj, payload, offset)  # noqa: E731
            elif how == "pool":
                do = lambda: pool.rare_write(obj, payload, offset)  # noqa: E731
            else:
                def do():
                    with pool.rare_write_session() as session:
                        session.write(obj, payload, offset)
        if ma.destroyed:
            with pytest.raises(PoolDestroyedError):
                do()
            return
        event(f"rare_write to {ma.mpool.mode.name}/{ma.state.name}")
        if self._rare_allowed(ma):
            do()
            ma.contents[offset:offset + len(payload)] = payload
        else:
            with pytest.raises(ProtectionError):
                do()
        assert bytes(obj) == ma.contents

    @rule(ma=allocs, other=pools)
    def rare_write_through_other_pool(self, ma, other):
        if other is ma.mpool:
            return
        with pytest.raises(ValueError):
            other.pool.rare_write(ma.obj, b"\x55", 0)
        if not ma.destroyed:
            assert bytes(ma.obj) == ma.contents

    @rule(dst=allocs, src=allocs, data=st.data())
    def copy_between_allocations(self, dst, src, data):
        """Write with another allocation's memory as the data (a buffer view
        of it, no intermediate copy)."""
        self._copy(dst, src, data)

    @rule(ma=allocs, data=st.data())
    def copy_within_allocation(self, ma, data):
        """The same with source and destination in one allocation, possibly
        overlapping: the result must be as if the data were copied first
        (memmove semantics), whatever path the write takes."""
        self._copy(ma, ma, data)

    def _copy(self, dst, src, data):
        rare = data.draw(st.booleans(), label="rare")
        if src.destroyed:
            with pytest.raises(PoolDestroyedError):
                memoryview(src.obj)
            return
        most = min(src.size, dst.size)
        n = data.draw(st.one_of(st.integers(0, min(16, most)), st.integers(0, most)), label="n")
        src_off = data.draw(st.integers(0, src.size - n), label="src_off")
        if src is dst and data.draw(st.booleans(), label="near"):
            # Overlapping ranges are the interesting case for one allocation.
            shift = data.draw(st.integers(-8, 8), label="shift")
            dst_off = min(max(src_off + shift, 0), dst.size - n)
        else:
            dst_off = data.draw(st.integers(0, dst.size - n), label="dst_off")
        payload = bytes(src.contents[src_off:src_off + n])
        if src is dst:
            event("copy inside one allocation")
        view = memoryview(src.obj)
        piece = view[src_off:src_off + n]
        try:
            if rare:
                do = lambda: prmem.rare_write(dst.obj, piece, dst_off)  # noqa: E731
                allowed = self._rare_allowed(dst)
            else:
                do = lambda: dst.obj.write(piece, dst_off)  # noqa: E731
                allowed = dst.state == State.WRITABLE
            if dst.destroyed:
                with pytest.raises(PoolDestroyedError):
                    do()
                return
            if allowed:
                do()
                dst.contents[dst_off:dst_off + n] = payload
            else:
                with pytest.raises(ProtectionError):
                    do()
        finally:
            piece.release()
            view.release()
        assert bytes(dst.obj) == dst.contents, (
            f"{'rare_write' if rare else 'write'} of {n} bytes from offset {src_off} "
            f"to offset {dst_off} ({'same allocation' if src is dst else 'other allocation'}, "
            f"destination {dst.state.name})")

    # --------------------------------------------------------------- reads

    @rule(ma=allocs, data=st.data())
    def read(self, ma, data):
        obj, size = ma.obj, ma.size
        index = data.draw(st.integers(-size, size - 1), label="index")
        start = data.draw(st.integers(-size - 2, size + 2), label="start")
        stop = data.draw(st.integers(-size - 2, size + 2), label="stop")
        step = data.draw(st.sampled_from([None, 1, 2, -1, -3]), label="step")
        key = slice(start, stop, step)
        assert len(obj) == size
        if ma.destroyed:
            for op in (lambda: obj[index], lambda: obj[key], lambda: bytes(obj),
                       lambda: obj.state, lambda: obj.address, lambda: memoryview(obj)):
                with pytest.raises(PoolDestroyedError):
                    op()
            return
        assert obj[index] == ma.contents[index]
        assert obj[key] == bytes(ma.contents[key])
        assert obj.address == ma.address

    # ------------------------------------------------------- buffer views

    @rule(ma=allocs, data=st.data())
    def buffer_view(self, ma, data):
        obj, mp = ma.obj, ma.mpool
        if ma.destroyed:
            with pytest.raises(PoolDestroyedError):
                memoryview(obj)
            return
        view = memoryview(obj)
        try:
            writable = ma.state == State.WRITABLE
            assert view.readonly is not writable
            assert view.nbytes == ma.size
            assert bytes(view) == ma.contents
            stats = mp.pool.stats()
            assert stats.buffer_views == 1
            assert stats.writable_buffer_views == int(writable)
            with pytest.raises(BufferError):
                mp.pool.destroy()
            if writable:
                self._while_writable_view(ma, view, data)
            else:
                self._while_readonly_view(ma, view, data)
        finally:
            view.release()
        stats = mp.pool.stats()
        assert (stats.buffer_views, stats.writable_buffer_views) == (0, 0)

    def _while_writable_view(self, ma, view, data):
        mp = ma.mpool
        offset = data.draw(st.integers(0, ma.size), label="view offset")
        payload = data.draw(st.binary(max_size=ma.size - offset), label="view payload")
        view[offset:offset + len(payload)] = payload
        ma.contents[offset:offset + len(payload)] = payload
        assert bytes(ma.obj) == ma.contents
        with pytest.raises(BufferError):
            mp.pool.protect()
        if mp.mode in WRITE_RARE_MODES:
            with pytest.raises(BufferError):
                mp.pool.make_ro()
        if mp.mode in AUTO_ROLLOVER_STATE:
            # Only the current area is WRITABLE in AUTO modes, and an
            # allocation that needs a new area would protect it under the view.
            assert ma.area is mp.current
            size = mp.current.size - mp.cur_off + 1
            assert mp.plan(size, 1) is None
            with pytest.raises(BufferError):
                mp.pool.alloc(size, align_order=0)
        # Nothing changed: every state and counter is checked by the
        # invariants after this step.
        assert ma.obj.state == State.WRITABLE

    def _while_readonly_view(self, ma, view, data):
        mp = ma.mpool
        if ma.size:
            with pytest.raises(TypeError):
                view[0] = 1
        if self._rare_allowed(ma):
            # A rare write is seen at once through every read-only mapping.
            offset = data.draw(st.integers(0, ma.size), label="view offset")
            payload = data.draw(st.binary(max_size=ma.size - offset), label="view payload")
            prmem.rare_write(ma.obj, payload, offset)
            ma.contents[offset:offset + len(payload)] = payload
            assert bytes(view) == ma.contents
        if data.draw(st.booleans(), label="protect with read-only view"):
            # Read-only views do not block protection.
            mp.pool.protect()
            mp.protect()
        assert bytes(view) == ma.contents

    # ---------------------------------------------------------- invariants

    @invariant()
    def pools_match_model(self):
        for mp in self.all_pools:
            if mp.destroyed:
                continue
            stats = mp.pool.stats()
            assert stats.mode == mp.mode
            assert stats.allocations == mp.nallocs
            assert stats.bytes_requested == mp.bytes_requested
            assert stats.areas == len(mp.areas)
            assert stats.bytes_mapped == sum(a.size for a in mp.areas)
            assert stats.bytes_lost_to_protection == mp.bytes_lost
            expected_free = 0 if mp.current is None else mp.current.size - mp.cur_off
            assert stats.bytes_free == expected_free
            for state in State:
                assert stats.areas_by_state[state] == sum(a.state == state for a in mp.areas)
            assert (stats.buffer_views, stats.writable_buffer_views) == (0, 0)
            # Chunks are not modelled exactly; each holds at least one area,
            # and sealing trims a reservation to what its areas use.
            assert stats.chunks <= len(mp.areas)
            assert (stats.chunks == 0) == (not mp.areas)
            assert stats.sealed_chunks <= stats.chunks
            assert stats.bytes_reserved >= stats.bytes_mapped
            # Areas are page-aligned and disjoint.
            spans = sorted((a.start, a.start + a.size) for a in mp.areas)
            for (s0, e0), (s1, _) in zip(spans, spans[1:]):
                assert e0 <= s1
            for start, _ in spans:
                assert start % PAGE == 0

    @invariant()
    def allocations_match_model(self):
        for mp in self.all_pools:
            if mp.destroyed:
                continue
            spans = []
            for ma in mp.allocs:
                obj = ma.obj
                assert obj.state == ma.state, (obj.state, ma.state)
                assert bytes(obj) == ma.contents
                address = obj.address
                assert address == ma.address
                assert address % ma.align == 0
                assert ma.area.start <= address
                assert address + ma.size <= ma.area.start + ma.area.size
                spans.append((address, address + ma.size))
            spans.sort()
            for (s0, e0), (s1, _) in zip(spans, spans[1:]):
                assert e0 <= s1, "allocations overlap"


PrmemMachine.TestCase.settings = settings(
    max_examples=500,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    # No explain phase: it replays a failure a hundred times, which makes a
    # failing run take minutes; the shrunk example is the useful part.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)
TestPrmemStateMachine = PrmemMachine.TestCase
