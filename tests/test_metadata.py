"""prmem's own metadata (issue 14): pool records live in prmem's write-rare
metadata range, read-only to the MMU, changed only through pwrite().

``Pool._metadata_address()`` is a test-only accessor: the address of the
pool's record.
"""
from __future__ import annotations

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import prmem
from prmem import Mode, Pool

from conftest import assert_native_store_dies, run_child

RESERVE = 1 << 30


def metadata_mappings():
    """(start, end, perms) of the mappings of prmem's metadata file."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            if "prmem-metadata" in line:
                addrs, perms = line.split()[:2]
                start, end = (int(x, 16) for x in addrs.split("-"))
                out.append((start, end, perms))
    return out


def test_metadata_is_one_read_only_shared_range():
    pool = Pool(Mode.WR, name="meta-range")
    addr = pool._metadata_address()
    maps = metadata_mappings()
    assert maps, "no metadata mapping"
    assert all(perms == "r--s" for _, _, perms in maps), maps
    assert sum(end - start for start, end, _ in maps) == RESERVE
    assert any(start <= addr < end for start, end, _ in maps)
    pool.destroy()


STATES = {
    "new": "",
    "writable": "a = pool.alloc(64)\na.write(b'x')",
    "write_rare": "a = pool.alloc(64)\npool.protect()",
    "read_only": "a = pool.alloc(64)\npool.protect()\npool.make_ro()",
    "destroyed": "a = pool.alloc(64)\ndel a\npool.destroy()",
}


@pytest.mark.parametrize("state", sorted(STATES))
def test_native_write_to_metadata_dies(state):
    assert_native_store_dies(
        "pool = Pool(Mode.WR, name='meta-%s')\n%s" % (state, STATES[state]),
        "pool._metadata_address() + 8")


def test_native_write_to_the_metadata_header_dies():
    # page 0 of the range is the metadata allocator's header, which also
    # holds the descriptor every metadata write goes through (and the spare
    # file's): read-only like the rest
    assert_native_store_dies(
        "pool = Pool(Mode.WR, name='meta-header')\n"
        "with open('/proc/self/maps') as f:\n"
        "    base = min(int(l.split('-')[0], 16) for l in f if 'prmem-metadata' in l)",
        "base + 256")


def test_a_pointer_outside_the_metadata_is_not_followed():
    # The PoolObject's pointer to its record is ordinary memory: overwrite it
    # (found by its value after the object header) and the pool refuses.
    proc = run_child(
        """
import ctypes, struct
pool = Pool(Mode.WR, name='meta-ptr')
a = pool.alloc(16)
addr = pool._metadata_address()
base = id(pool)
slot = None
for off in range(16, 256, 8):
    if struct.unpack('P', ctypes.string_at(base + off, 8))[0] == addr:
        slot = off
        break
assert slot is not None
ctypes.memmove(base + slot, struct.pack('P', addr + 256), 8)  # another record slot
from prmem import _core
for call in (lambda: pool.alloc(8), lambda: pool.protect(), lambda: pool.stats(),
             lambda: pool.rare_write(a, b'x'), lambda: pool.mode, lambda: pool.destroyed,
             lambda: pool.seal, lambda: _core.is_attached(pool),
             lambda: pool._access_leave()):
    try:
        call()
        raise SystemExit('followed')
    except prmem.ProtectionError as e:
        assert 'meta-ptr' in str(e) and 'metadata' in str(e), e
assert 'does not check out' in repr(a), repr(a)
ctypes.memmove(base + slot, struct.pack('P', addr), 8)  # put it back
pool.alloc(8)
print('OK')
"""
    )
    assert "OK" in proc.stdout, proc.stdout + proc.stderr


def test_fork_gives_the_child_its_own_metadata():
    proc = run_child(
        """
import ctypes
pool = Pool(Mode.WR, name='meta-fork')
a = pool.alloc(64)
addr = pool._metadata_address()
before = ctypes.string_at(addr, 256)
r, w = os.pipe()
r2, w2 = os.pipe()
pid = os.fork()
if pid == 0:
    pool.protect(); pool.make_ro()          # the child's record changes
    os.write(w, b'x')
    os.read(r2, 1)
    # the parent destroyed its pool meanwhile: not in the child's record
    ok = pool.stats().areas >= 1 and bytes(a[:1]) == b'\\0'
    os._exit(0 if ok else 3)
os.read(r, 1)
assert ctypes.string_at(addr, 256) == before    # nothing of the child's shows
del a
pool.destroy()
os.write(w2, b'x')
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
print('OK')
"""
    )
    assert "OK" in proc.stdout, proc.stdout + proc.stderr


class MetadataMachine(RuleBasedStateMachine):
    """create/alloc/protect/rare_write/destroy; after each step every
    metadata mapping is read-only and the pools are what the model says."""

    def __init__(self):
        super().__init__()
        # [pool, allocations, protected, destroyed, how many allocations
        #  were made before the last protect()]
        self.pools = []

    @rule(mode=st.sampled_from([Mode.WR, Mode.RO, Mode.START_WR]))
    def create(self, mode):
        if len(self.pools) < 6:
            self.pools.append([Pool(mode, name="meta-sm"), [], False, False, 0])

    @precondition(lambda self: self.pools)
    @rule(i=st.integers(0, 5), size=st.integers(1, 5000))
    def alloc(self, i, size):
        entry = self.pools[i % len(self.pools)]
        if entry[3]:
            with pytest.raises(prmem.PoolDestroyedError):
                entry[0].alloc(size)
            return
        entry[1].append(entry[0].alloc(size))

    @precondition(lambda self: self.pools)
    @rule(i=st.integers(0, 5))
    def protect(self, i):
        entry = self.pools[i % len(self.pools)]
        if not entry[3]:
            entry[0].protect()
            entry[2] = True
            entry[4] = len(entry[1])

    @precondition(lambda self: self.pools)
    @rule(i=st.integers(0, 5), data=st.binary(min_size=1, max_size=8))
    def rare_write(self, i, data):
        pool, allocs, _, destroyed, _ = self.pools[i % len(self.pools)]
        if destroyed or not allocs or pool.mode == Mode.RO:
            return
        a = allocs[-1]
        n = min(len(data), a.size)
        if a.state == prmem.State.WRITABLE:
            a.write(data[:n])
        else:
            pool.rare_write(a, data[:n])
        assert bytes(a[:n]) == data[:n]

    @precondition(lambda self: self.pools)
    @rule(i=st.integers(0, 5))
    def destroy(self, i):
        entry = self.pools[i % len(self.pools)]
        if not entry[3]:
            entry[1].clear()
            entry[0].destroy()
            entry[3] = True

    @invariant()
    def metadata_read_only(self):
        maps = metadata_mappings()
        assert maps and all(p == "r--s" for _, _, p in maps), maps
        protected_state = {Mode.WR: prmem.State.WRITE_RARE, Mode.START_WR: prmem.State.WRITE_RARE,
                           Mode.RO: prmem.State.READ_ONLY}
        for pool, allocs, protected, destroyed, protected_upto in self.pools:
            addr = pool._metadata_address()
            assert any(s <= addr < e for s, e, _ in maps)
            chunks, areas = pool._metadata_tables()
            for t in (chunks, areas):  # the tables are metadata too
                assert t == 0 or any(s <= t < e for s, e, _ in maps)
            if not destroyed:
                assert pool.stats().allocations == len(allocs)
                assert (chunks != 0) == (pool.stats().areas > 0)
                for k, a in enumerate(allocs):  # protected tables and model agree
                    writable = k >= protected_upto and pool.mode != Mode.START_WR
                    assert a.state == (prmem.State.WRITABLE if writable
                                       else protected_state[pool.mode])

    def teardown(self):
        for pool, allocs, _, destroyed, _ in self.pools:
            allocs.clear()
            if not destroyed:
                pool.destroy()


TestMetadataMachine = MetadataMachine.TestCase
TestMetadataMachine.settings = settings(max_examples=30, stateful_step_count=20, deadline=None)


def test_the_root_is_read_only_after_import():
    # prmem's root (the metadata range's address, the page size, the
    # features, enforcement) is set by the first module init and then
    # read-only, and sealed where the kernel has mseal: a native store dies,
    # and once sealed mprotect() cannot make it writable again
    from prmem import _core
    addr, state = _core._root()
    assert state == ("sealed" if "mseal" in prmem.features else "read-only")
    assert addr % 4096 == 0
    assert_native_store_dies("from prmem import _core", "_core._root()[0]")
    if "mseal" in prmem.features:
        proc = run_child(
            "import ctypes, errno\n"
            "from prmem import _core\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)\n"
            "rc = libc.mprotect(_core._root()[0], 4096, 3)\n"
            "print('mprotect', rc, errno.errorcode.get(ctypes.get_errno()), flush=True)\n"
        )
        assert "mprotect -1 EPERM" in proc.stdout, proc.stdout + proc.stderr


def test_a_second_module_init_leaves_the_root_alone():
    # a re-import runs the module's init again: it must not write the
    # (read-only) root, and prmem keeps working
    proc = run_child(
        "import importlib, sys\n"
        "first = sys.modules.pop('prmem._core')\n"
        "again = importlib.import_module('prmem._core')\n"
        "assert again is not first and again._root() == first._root()\n"
        "pool = Pool(Mode.WR, name='after-reimport')\n"
        "a = pool.alloc(8)\n"
        "pool.protect()\n"
        "pool.rare_write(a, b'ok')\n"
        "print('OK', bytes(a[:2]), flush=True)\n"
    )
    assert "OK b'ok'" in proc.stdout, proc.stdout + proc.stderr
