"""prmem.testing (assert_protected, assert_write_rare) and the pytest plugin
prmem.pytest_plugin (fixtures prmem_pool, prmem_protected).

The assertions are tested both ways: every kind of protected object passes,
and unprotected memory (a bytearray, a pool not yet protected, an area opened
after protect()) fails with a message naming the byte.  The fixtures are
tested in inner pytest runs (pytester): a leaked view fails the test.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import signal
import socket
import time

import pytest

import prmem
import prmem.pytest_plugin
import prmem.testing
from prmem import Mode
from prmem.testing import assert_protected, assert_write_rare

from conftest import run_child

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is optional
    np = None

needs_numpy = pytest.mark.skipif(np is None, reason="numpy is not installed")
enforced = pytest.mark.skipif(not prmem.enforced, reason="PRMEM_ENFORCE=0: nothing is protected")

DATA = {"alice": {"role": "admin", "nets": ["10.0.0.0/8", "192.168.0.0/16"]},
        "bob": {"role": "user", "quota": 2}, "blob": b"x" * 3000}


# ------------------------------------------------------------ positive cases

@enforced
def test_allocation(prmem_pool):
    a = prmem_pool.alloc(10000)
    a.write(b"secret" * 100)
    prmem_pool.protect()
    assert_protected(a)


@enforced
def test_frozen_map_and_list(prmem_pool):
    m = prmem_pool.freeze(DATA)
    prmem_pool.protect()
    assert_protected(m)
    assert_protected(m["alice"]["nets"])   # a nested handle: the whole structure
    assert m == DATA
    del m


@enforced
@needs_numpy
def test_array_and_strided_view(prmem_pool):
    arr = prmem_pool.array(np.arange(5000, dtype=np.int64).reshape(50, 100))
    prmem_pool.protect()
    assert_protected(arr)
    assert_protected(arr[::-3, 1::7])       # only the bytes the view spans
    assert int(arr.sum()) == sum(range(5000))
    del arr


@enforced
def test_whole_pool_of_several_areas_and_chunks(prmem_pool):
    for size in (100, 5000, 70000):
        prmem_pool.alloc(size)
    prmem_pool.protect()
    prmem_pool.alloc(10)                   # a new area ...
    prmem_pool.protect()                   # ... protected too
    assert prmem_pool.stats().areas >= 3
    assert_protected(prmem_pool, samples=16)


@enforced
@pytest.mark.parametrize("mode", [Mode.WR, Mode.AUTO_WR, Mode.START_WR])
def test_write_rare_objects(prmem_protected, mode):
    alloc = prmem_protected(bytes(range(256)) * 40, mode=mode)
    assert_write_rare(alloc, samples=8)
    assert bytes(alloc) == bytes(range(256)) * 40  # restored
    frozen = prmem_protected(DATA, mode=mode)
    assert_write_rare(frozen, samples=8)
    assert frozen == DATA


@enforced
@needs_numpy
def test_write_rare_array(prmem_protected):
    arr = prmem_protected(np.linspace(0, 1, 3000), mode=Mode.WR)
    assert_write_rare(arr[10:20], samples=4)
    assert_write_rare(arr, samples=4)
    assert (arr == np.linspace(0, 1, 3000)).all()
    del arr


@enforced
def test_seed_makes_probes_reproducible():
    # the same seed probes the same bytes: a failure can be replayed
    pool = prmem.Pool(name="replay-me")
    try:
        a = pool.alloc(4096)
        messages = []
        for _ in range(2):
            with pytest.raises(AssertionError) as info:
                assert_protected(a, samples=5, seed=1234)
            messages.append(re.sub(r"0x[0-9a-f]{6,}", "ADDR", str(info.value)))
        assert messages[0] == messages[1] and "probe seed 1234" in messages[0]
    finally:
        del a
        pool.destroy()


# ------------------------------------------------------------ negative cases

def test_bytearray_fails_naming_the_byte():
    data = bytearray(b"plain memory" * 10)
    with pytest.raises(AssertionError) as info:
        assert_protected(data, samples=3)
    message = str(info.value)
    assert message.startswith("assert_protected: 5 of 5 probes of bytearray of 120 bytes")
    assert re.search(r"byte 0 \(0x[0-9a-f]+, mapped rw-p\): the native write went "
                     r"through: the byte was 0x70, the child wrote 0x8f and read back 0x8f",
                     message)
    assert "byte 119 " in message
    assert data == bytearray(b"plain memory" * 10)   # probes ran in children


def test_bytes_and_plain_numpy_fail():
    with pytest.raises(AssertionError, match="probes of bytes of 4 bytes"):
        assert_protected(b"abcd")
    if np is not None:
        with pytest.raises(AssertionError, match=r"array of 80 bytes \(not in a prmem pool\)"):
            assert_protected(np.zeros(10), samples=2)


def test_unprotected_pool_fails(prmem_pool):
    a = prmem_pool.alloc(64)
    with pytest.raises(AssertionError, match="its state is WRITABLE") as info:
        assert_protected(a, samples=4)
    assert "byte 0 " in str(info.value) and "byte 63 " in str(info.value)
    with pytest.raises(AssertionError, match=f"probes of pool {prmem_pool.name!r}"):
        assert_protected(prmem_pool, samples=4)


@enforced
def test_area_opened_after_protect_fails_for_the_pool(prmem_pool):
    prmem_pool.alloc(100)
    prmem_pool.protect()
    late = prmem_pool.alloc(100)           # a new, WRITABLE area
    with pytest.raises(AssertionError) as info:
        assert_protected(prmem_pool, samples=200)
    # the protected area's bytes passed, the new area's did not
    message = str(info.value)
    assert "mapped rw-s" in message and "mapped r--s" not in message
    failed, probed = map(int, re.match(r"assert_protected: (\d+) of (\d+) probes", message).groups())
    assert 0 < failed < probed
    del late


@enforced
def test_write_rare_refused_on_read_only(prmem_protected):
    frozen = prmem_protected({"a": 1}, mode=Mode.RO)
    with pytest.raises(AssertionError, match=r"rare_write\(\) to byte 0 of FrozenMap "
                                             r"structure of \d+ bytes .* was refused"):
        assert_write_rare(frozen, samples=2)


@pytest.mark.prmem_pool(Mode.WR)
def test_write_rare_writable_fails_on_the_native_write(prmem_pool):
    a = prmem_pool.alloc(16)
    with pytest.raises(AssertionError, match="native write went through"):
        assert_write_rare(a, samples=1)


def test_what_cannot_be_checked(prmem_pool):
    with pytest.raises(ValueError, match="no memory to check"):
        assert_protected(prmem_pool)
    with pytest.raises(TypeError, match="not int"):
        assert_protected(42)
    with pytest.raises(ValueError, match="empty"):
        assert_protected(bytearray())
    with pytest.raises(ValueError, match="samples"):
        assert_protected(bytearray(1), samples=-1)
    with pytest.raises(TypeError, match="for a pool, check its allocations"):
        assert_write_rare(prmem_pool)


def test_pool_with_a_name_shared_by_another_pool_is_refused(prmem_pool):
    twin = prmem.Pool(name=prmem_pool.name)
    try:
        twin.alloc(10)
        prmem_pool.alloc(10)
        with pytest.raises(ValueError, match="give the pool a unique name"):
            assert_protected(prmem_pool)
    finally:
        twin.destroy()


def test_another_signal_is_not_protection(monkeypatch):
    # a probe that dies of SIGBUS (say, past the end of a truncated file)
    # proves nothing about write protection
    def bus(address, kind, readable):
        os.kill(os.getpid(), signal.SIGBUS)
    monkeypatch.setattr(prmem.testing, "_probe", bus)
    with pytest.raises(AssertionError, match="killed the child with SIGBUS, not SIGSEGV"):
        assert_protected(bytearray(4), samples=0)


def test_a_hung_probe_is_killed_and_fails(monkeypatch):
    monkeypatch.setattr(prmem.testing, "_probe", lambda *args: time.sleep(60))
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"did not finish within 0.5 s \(0 of 2 done\)"):
        assert_protected(bytearray(2), timeout=0.5)
    assert time.monotonic() - started < 10


@enforced
@pytest.mark.skipif(not {"memfd", "memfd_seal_future_write"} <= prmem.features,
                    reason="sharing needs sealed memfd memory")
def test_pool_received_from_a_process_and_its_original():
    pool = prmem.Pool(name="shared-orig", share=True)
    try:
        table = pool.freeze({"a": list(range(100))})
        pool.protect()
        left, right = socket.socketpair()
        with left, right:
            prmem.send(left, pool)
            received = prmem.recv(right)
        assert received.attached and received.name == pool.name
        # same name, both mapped here: each is told apart all the same
        assert_protected(received, samples=8)
        assert_protected(pool, samples=8)
        received.destroy()
    finally:
        del table
        pool.destroy()


@enforced
@pytest.mark.skipif("memfd_secret" not in prmem.features, reason="kernel lacks memfd_secret")
def test_secret_pool():
    # in a fresh interpreter: a secret pool is checked whole only while it
    # is the only one mapped, and other tests leave theirs behind
    proc = run_child("""
        from prmem.testing import assert_protected, assert_write_rare
        pool = Pool(Mode.WR, secret=True, name="secret-one")
        a = pool.alloc(100)
        pool.protect()
        assert_write_rare(a, samples=8)
        assert_protected(pool, samples=8)
        other = Pool(secret=True, name="secret-two")
        other.alloc(1)      # secret pools' files carry no name: now ambiguous
        try:
            assert_protected(pool)
        except ValueError as e:
            print(e)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "the memory files of secret pools carry no name" in proc.stdout


# ------------------------------------------------------------ no-access pools

@enforced
@pytest.mark.parametrize("mode", [Mode.RO, Mode.WR])
def test_noaccess_pool_reads_are_probed_too(mode):
    pool = prmem.Pool(mode, noaccess=True, name=f"noaccess-{mode.name}")
    try:
        a = pool.alloc(5000)
        a.write(b"k" * 5000)
        pool.protect()
        pool.alloc(10)                     # a second area, protected too
        pool.protect()
        assert_protected(a)                # reads and writes die
        assert_protected(pool, samples=16)
        if mode is Mode.WR:
            assert_write_rare(a, samples=4)
        with pool.access():                # readable here: not no-access now
            with pytest.raises(AssertionError, match="the native read went through"):
                assert_protected(a, samples=2)
            assert bytes(a) == b"k" * 5000
    finally:
        del a
        pool.destroy()


class NoAccessWithoutAccess(prmem.Pool):
    """A no-access pool that offers no way to read its memory here: the
    bytes are not compared, and a pool's probes cover its reservation."""
    noaccess = True
    access = None


@enforced
def test_noaccess_without_access_is_probed_blind():
    pool = NoAccessWithoutAccess(name="noaccess-blind", refill=4096)
    try:
        a = pool.alloc(100)
        pool.protect()
        # its memory is readable, so the read probes go through
        with pytest.raises(AssertionError, match="the native read went through"):
            assert_protected(a, samples=2)
        with pytest.raises(AssertionError) as info:
            assert_protected(pool, samples=2)
        assert re.search(r"of \d+ probes of pool 'noaccess-blind'", str(info.value))
    finally:
        del a
        pool.destroy()


# ------------------------------------------------------------ the pytest plugin

def test_plugin_is_registered_once_by_its_entry_point(request):
    manager = request.config.pluginmanager
    assert manager.get_plugin("prmem.pytest_plugin") is prmem.pytest_plugin
    assert manager.get_name(prmem.pytest_plugin) == "prmem.pytest_plugin"
    entry_points = importlib.metadata.entry_points()
    group = (entry_points.select(group="pytest11") if hasattr(entry_points, "select")
             else entry_points.get("pytest11", []))
    assert {(ep.name, ep.value) for ep in group if ep.value.startswith("prmem")} == \
        {("prmem.pytest_plugin", "prmem.pytest_plugin")}


LEAKY = """
import prmem
kept = []

def test_leaks_a_view(prmem_pool):
    kept.append(memoryview(prmem_pool.alloc(8)))

def test_leaks_a_handle(prmem_protected):
    kept.append(prmem_protected({"a": 1}))

def test_clean(prmem_pool, prmem_protected):
    a = prmem_pool.alloc(8)
    with memoryview(a) as m:
        m[0] = 1
    frozen = prmem_protected([1, 2])
    assert prmem_pool.mode == prmem.Mode.RO and frozen.pool.stats().areas_by_state[
        prmem.State.READ_ONLY] == 1

def test_fails_and_leaks(prmem_pool):
    kept.append(memoryview(prmem_pool.alloc(8)))
    assert False, "the real failure"
"""


def test_fixtures_fail_a_test_that_leaks_a_view(pytester):
    pytester.makepyfile(LEAKY)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=1, errors=2)
    out = result.stdout.str()
    assert re.search(r"ERROR at teardown of test_leaks_a_view .*\n(.*\n)*.*a view of a "
                     r"prmem pool leaked out of the test: cannot destroy pool "
                     r"'test_leaks_a_view-\d+': 1 buffer view", out)
    assert re.search(r"cannot destroy pool 'test_leaks_a_handle-\d+': 0 buffer view\(s\) "
                     r"or array\(s\) and 1 frozen container", out)
    assert "ERROR at teardown of test_fails_and_leaks" not in out
    assert "the real failure" in out


def test_prmem_pool_takes_arguments_from_marker_and_param(pytester):
    pytester.makepyfile("""
        import pytest, prmem

        @pytest.mark.prmem_pool(prmem.Mode.WR, name="custom", refill=8192)
        def test_marker(prmem_pool):
            assert (prmem_pool.mode, prmem_pool.name) == (prmem.Mode.WR, "custom")

        @pytest.mark.parametrize("prmem_pool", [{"mode": prmem.Mode.AUTO_RO}],
                                 indirect=True)
        def test_param(prmem_pool):
            assert prmem_pool.mode == prmem.Mode.AUTO_RO
            assert prmem_pool.name.startswith("test_param-prmem_pool0-")
    """)
    result = pytester.runpytest("-p", "no:cacheprovider", "--strict-markers")
    result.assert_outcomes(passed=2)


@pytest.mark.parametrize("how", ["conftest", "-p"])
def test_plugin_named_again_is_not_registered_twice(pytester, how):
    if how == "conftest":
        pytester.makeconftest('pytest_plugins = ["prmem.pytest_plugin"]')
        args = []
    else:
        args = ["-p", "prmem.pytest_plugin"]
    pytester.makepyfile("""
        def test_uses_it(prmem_pool):
            prmem_pool.alloc(1)
    """)
    result = pytester.runpytest("-p", "no:cacheprovider", *args)
    result.assert_outcomes(passed=1)


def test_plugin_can_be_disabled(pytester):
    pytester.makepyfile("""
        def test_uses_it(prmem_pool):
            pass
    """)
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:prmem.pytest_plugin")
    result.assert_outcomes(errors=1)
    assert "fixture 'prmem_pool' not found" in result.stdout.str()
