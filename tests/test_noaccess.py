"""No-access pools: Pool(noaccess=True).

Protected memory of such a pool is PROT_NONE except inside
``with pool.access():``.  Each protection claim is proven by doing the
forbidden read (or write) for real in a child process and seeing the kernel
stop it; the in-process tests check that prmem's own API refuses instead of
crashing.
"""
from __future__ import annotations

import signal
import threading

import pytest

import prmem
from prmem import Mode, Pool, State
from conftest import run_child

SECRET = pytest.param(True, id="secret",
                      marks=pytest.mark.skipif("memfd_secret" not in prmem.features,
                                               reason="kernel lacks memfd_secret"))
PLAIN = pytest.param(False, id="plain")

# Modes and what protect() makes of their memory.
MODES = [(Mode.WR, State.WRITE_RARE), (Mode.RO, State.READ_ONLY),
         (Mode.START_WR, State.WRITE_RARE)]


def make_pool(mode: Mode, secret: bool, data: bytes = b"secret-key-0123456789abcdef"):
    pool = Pool(mode, noaccess=True, secret=secret, name="na")
    if mode == Mode.START_WR:
        a = pool.alloc(len(data))
        pool.rare_write(a, data)
    else:
        a = pool.alloc(len(data))
        a.write(data)
    pool.protect()
    return pool, a


@pytest.mark.parametrize("secret", [PLAIN, SECRET])
@pytest.mark.parametrize("mode,state", MODES, ids=[m.name for m, _ in MODES])
def test_reads_through_the_api_need_access(mode, state, secret):
    pool, a = make_pool(mode, secret)
    try:
        assert a.state == state and pool.noaccess
        for read in (lambda: bytes(a), lambda: a[0], lambda: a[2:6], lambda: memoryview(a)):
            with pytest.raises(prmem.ProtectionError, match="no-access"):
                read()
        with pool.access():
            assert bytes(a) == b"secret-key-0123456789abcdef"
            assert a[0] == ord("s") and a[0:6] == b"secret"
            with memoryview(a) as view:
                assert view[:3] == b"sec"
        with pytest.raises(prmem.ProtectionError):
            bytes(a)
        assert pool.stats().access_holders == 0
    finally:
        pool.destroy()


def test_access_blocks_nest_and_count_across_threads():
    pool, a = make_pool(Mode.WR, False)
    entered, release = threading.Event(), threading.Event()

    def other():
        with pool.access():
            entered.set()
            release.wait(10)

    t = threading.Thread(target=other)
    with pool.access():
        with pool.access():
            assert pool.stats().access_holders == 2
        t.start()
        entered.wait(10)
        assert pool.stats().access_holders == 2
    # this thread left; the other still holds access
    assert bytes(a)[:6] == b"secret"
    release.set()
    t.join()
    with pytest.raises(prmem.ProtectionError):
        bytes(a)
    pool.destroy()


def test_rare_writes_need_no_access():
    for secret in (False, "memfd_secret" in prmem.features):
        pool, a = make_pool(Mode.WR, secret)
        pool.rare_write(a, b"SECRET")
        pool.rare_memset(a, 0x2D, 6, 1)
        with pool.access():
            assert bytes(a)[:8] == b"SECRET-k"
        pool.destroy()


def test_a_view_taken_inside_keeps_access_until_released():
    pool, a = make_pool(Mode.WR, False)
    with pool.access():
        view = memoryview(a)
    assert pool.stats().access_holders == 1
    assert view[:6] == b"secret"              # still readable: the view holds it
    view.release()
    assert pool.stats().access_holders == 0
    with pytest.raises(prmem.ProtectionError):
        bytes(a)
    pool.destroy()


def test_frozen_containers_are_read_only_inside_access():
    pool = Pool(Mode.WR, noaccess=True, name="na-frozen")
    table = pool.freeze({"key": "value", "n": [1, 2, 3], "nested": {"a": b"b"}})
    items = pool.freeze([1, "two", {"three": 3}])
    pool.protect()
    for read in (lambda: table["key"], lambda: len(table), lambda: "key" in table,
                 lambda: table.get("n"), lambda: list(table), lambda: table.thaw(),
                 lambda: items[0], lambda: len(items), lambda: list(items)):
        with pytest.raises(prmem.ProtectionError, match="no-access"):
            read()
    assert repr(table) == ("<prmem.FrozenMap in no-access pool 'na-frozen': "
                           "readable only inside pool.access()>")
    assert "FrozenList in no-access pool" in repr(items)
    with pool.access():
        assert repr(items) == "prmem.FrozenList([1, 'two', {'three': 3}])"
        assert table["key"] == "value" and list(table["n"]) == [1, 2, 3]
        assert table == {"key": "value", "n": [1, 2, 3], "nested": {"a": b"b"}}
        assert items.thaw() == [1, "two", {"three": 3}]
        inner = table["nested"]
    with pytest.raises(prmem.ProtectionError):
        inner["a"]
    assert pool.stats().access_holders == 0
    del table, items, inner
    pool.destroy()


def test_no_access_memory_is_left_out_of_core_dumps():
    # a core dump reads PROT_NONE memory too (FOLL_FORCE): areas are dontdump
    pool, a = make_pool(Mode.WR, False)
    flags = None
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()
            if "-" in head[0] and ":" not in head[0]:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                inside = lo <= a.address < hi
            elif inside and line.startswith("VmFlags:"):
                flags = line.split()[1:]
                break
    assert flags is not None and "dd" in flags
    pool.destroy()


def test_access_on_an_ordinary_pool_does_nothing():
    pool = Pool(Mode.WR)
    a = pool.alloc(4)
    a.write(b"data")
    pool.protect()
    assert not pool.noaccess
    with pool.access():
        assert bytes(a) == b"data"
    assert bytes(a) == b"data"
    pool.destroy()


@pytest.mark.parametrize("kwargs,match", [({"seal": True}, "mseal"),
                                          ({"share": True}, "other processes")])
def test_refused_combinations(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Pool(Mode.RO, noaccess=True, **kwargs)


def test_numpy_arrays_are_refused_with_the_way_out():
    np = pytest.importorskip("numpy")
    pool = Pool(Mode.WR, noaccess=True)
    with pytest.raises(prmem.ProtectionError, match="frombuffer"):
        pool.array(np.arange(4))
    a = pool.alloc(32)
    a.write(bytes(range(32)))
    pool.protect()
    with pool.access():
        arr = np.frombuffer(memoryview(a), np.uint8)
    assert int(arr.sum()) == sum(range(32))    # the array's view holds access
    del arr
    assert pool.stats().access_holders == 0
    pool.destroy()


def test_leaving_more_often_than_entering_is_an_error():
    pool, _a = make_pool(Mode.WR, False)
    with pytest.raises(RuntimeError, match="more often"):
        pool._access_leave()
    pool.destroy()


def test_verify_checks_the_closed_state_too():
    pool, a = make_pool(Mode.WR, False)
    pool.verify()
    with pool.access():
        pool.verify()
    pool.destroy()
    out = run_child("""
pool = Pool(Mode.WR, noaccess=True, name="opened")
a = pool.alloc(16); a.write(b"x" * 16); pool.protect()
libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
assert libc.mprotect(a.address & ~4095, 4096, 1) == 0    # opened behind prmem's back
try:
    pool.verify()
    print("not detected")
except prmem.ProtectionError as e:
    print("detected", "readable outside access()" in str(e))
""")
    assert "detected True" in out.stdout, out.stdout + out.stderr


# --- the kernel's part, proven in a child ------------------------------------

NATIVE_READ = """
pool = Pool(Mode.{mode}, noaccess=True, secret={secret}, name="na-child")
a = pool.alloc(64)
a.write(b"k" * 64)
pool.protect()
{before}
value = ctypes.string_at(a.address + 7, 1)      # a native read
print("read", value, flush=True)
"""


@pytest.mark.parametrize("secret", [PLAIN, SECRET])
@pytest.mark.parametrize("mode", ["WR", "RO"])
def test_a_native_read_outside_access_dies_with_a_fault_report(mode, secret):
    proc = run_child(NATIVE_READ.format(mode=mode, secret=secret, before=""))
    assert proc.returncode == -signal.SIGSEGV, proc.stdout + proc.stderr
    assert "read" not in proc.stdout
    assert "prmem: fatal read of no-access memory" in proc.stderr
    assert "na-child" in proc.stderr


@pytest.mark.parametrize("secret", [PLAIN, SECRET])
def test_a_native_read_inside_access_works_and_a_native_write_still_dies(secret):
    proc = run_child(NATIVE_READ.format(mode="WR", secret=secret, before="""
ctx = pool.access(); ctx.__enter__()
""") + """
native_write(a, b"Z", 7)
print("wrote", flush=True)
""")
    assert "read b'k'" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == -signal.SIGSEGV and "wrote" not in proc.stdout
    assert "prmem: fatal write to protected memory" in proc.stderr


def test_after_the_last_holder_leaves_native_reads_die_again():
    proc = run_child(NATIVE_READ.format(mode="WR", secret=False, before="""
with pool.access():
    view = memoryview(a)
    assert ctypes.string_at(a.address, 1) == b"k"
assert ctypes.string_at(a.address, 1) == b"k"   # the view still holds access
view.release()
print("released", flush=True)
"""))
    assert "released" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == -signal.SIGSEGV and "read" not in proc.stdout


def test_a_forked_child_keeps_the_memory_closed():
    proc = run_child("""
pool = Pool(Mode.WR, noaccess=True, name="na-fork")
a = pool.alloc(64); a.write(b"f" * 64); pool.protect()
pid = os.fork()
if pid == 0:
    with pool.access():
        ok = bytes(a[:2]) == b"ff"
    pool.rare_write(a, b"cc")                    # the child's own copy
    with pool.access():
        ok = ok and bytes(a[:2]) == b"cc"
    prmem.fault_report(False)
    if ok:
        ctypes.string_at(a.address, 1)           # closed again: dies
    os._exit(3)
_, status = os.waitpid(pid, 0)
print("child", os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV)
with pool.access():
    print("parent", bytes(a[:2]))
""")
    assert "child True" in proc.stdout and "parent b'ff'" in proc.stdout, (
        proc.stdout + proc.stderr)


def test_inspect_shows_closed_no_access_data():
    import os
    from prmem.inspect import report
    pool = Pool(Mode.WR, noaccess=True, name="na-inspect")
    a = pool.alloc(4096)
    a.write(b"x" * 4096)
    pool.protect()
    lines = [line for line in report(os.getpid()).splitlines() if "na-inspect" in line]
    assert any(line.rstrip().endswith("no access [dontdump]") for line in lines), lines
    with pool.access():
        lines = [line for line in report(os.getpid()).splitlines() if "na-inspect" in line]
        assert any("WRITE_RARE" in line for line in lines), lines
    pool.destroy()
