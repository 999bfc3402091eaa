"""Sealed pools shared with other processes (prmem.sharing).

Workers started every way multiprocessing starts them read the same
physical pages; the kernel stops them from writing; the receiving side
refuses descriptors that could change under it.
"""
from __future__ import annotations

import concurrent.futures
import gc
import json
import mmap
import multiprocessing
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import textwrap

import pytest

import prmem
from prmem import Mode

from conftest import CHILD_PRELUDE

pytestmark = pytest.mark.skipif(
    not {"memfd", "memfd_seal_future_write"} <= prmem.features or not prmem.enforced,
    reason="sharing needs sealed memfd memory")

POLICY = {"alice": {"role": "admin", "quota": 10, "nets": ["10.0.0.0/8"]},
          "bob": {"role": "user", "quota": 2}}
METHODS = ["fork", "spawn", "forkserver"]


@pytest.fixture
def table():
    pool = prmem.Pool(Mode.RO, name="shared-policy", share=True)
    frozen = pool.freeze(POLICY)
    pool.protect()
    yield frozen
    del frozen
    gc.collect()
    pool._destroy_when_released()


# workers (module level: spawn and forkserver import them by name)

def read_policy(table):
    return (table["alice"]["role"], table["alice"]["nets"][0], table["bob"]["quota"],
            len(table), table.pool.attached)


_initialized = {}


def init_worker(table):
    _initialized["table"] = table


def lookup(name):
    return _initialized["table"][name]["role"]


def put_result(table, queue):
    queue.put(read_policy(table))


@pytest.mark.parametrize("method", METHODS)
def test_process_reads_the_shared_table(table, method):
    ctx = multiprocessing.get_context(method)
    queue = ctx.Queue()
    proc = ctx.Process(target=put_result, args=(table, queue))
    proc.start()
    try:
        role, net, quota, size, attached = queue.get(timeout=60)
    finally:
        proc.join(60)
    assert (role, net, quota, size) == ("admin", "10.0.0.0/8", 2, 2)
    assert attached == (method != "fork")  # fork inherits the mapping itself
    assert proc.exitcode == 0


@pytest.mark.parametrize("method", METHODS)
def test_pool_initializer_and_task_args(table, method):
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(2, initializer=init_worker, initargs=(table,)) as workers:
        assert workers.map(lookup, ["alice", "bob"]) == ["admin", "user"]
        assert workers.map(read_policy, [table]) == [("admin", "10.0.0.0/8", 2, 2, True)]


@pytest.mark.parametrize("method", METHODS)
def test_process_pool_executor(table, method):
    ctx = multiprocessing.get_context(method)
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as ex:
        assert ex.submit(read_policy, table).result(timeout=60)[:4] == \
            ("admin", "10.0.0.0/8", 2, 2)


def test_nested_containers_and_allocations_travel(table):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as workers:
        assert workers.apply(list, (table["alice"]["nets"],)) == ["10.0.0.0/8"]
        assert workers.apply(dict, (table["bob"],)) == {"role": "user", "quota": 2}
        assert workers.apply(bytes, (table._allocation,))[:8] == b"PRMFRZ1\0"


def test_pickling_to_bytes_is_refused(table):
    for obj in (table, table["alice"], table._allocation, table.pool):
        with pytest.raises(TypeError, match="between live processes"):
            pickle.dumps(obj)


def test_only_sealed_shareable_memory_leaves(pool_factory):
    ctx = multiprocessing.get_context("spawn")
    writable = pool_factory(Mode.RO, name="not-yet", share=True)
    f1 = writable.freeze({"a": 1})
    wr = pool_factory(Mode.WR, name="write-rare", share=True)
    f2 = wr.freeze({"a": 1})
    wr.protect()
    plain = pool_factory(Mode.RO, name="no-share")
    f3 = plain.freeze({"a": 1})
    plain.protect()
    a, b = socket.socketpair()
    with a, b:
        for frozen, says in ((f1, "not sealed"), (f2, "not sealed"), (f3, "share=True")):
            with pytest.raises(prmem.ProtectionError, match=says):
                prmem.send(a, frozen)
            with pytest.raises(prmem.ProtectionError, match=says):
                multiprocessing.reduction.ForkingPickler.dumps(frozen)
    del ctx
    with pytest.raises(ValueError, match="secret"):
        prmem.Pool(Mode.RO, secret=True, share=True)


def test_send_recv_keeps_no_descriptors(table):
    a, b = socket.socketpair()
    with a, b:
        before = sorted(os.listdir("/proc/self/fd"))
        for _ in range(1000):
            prmem.send(a, table)
            received = prmem.recv(b)
            assert received["bob"]["role"] == "user"
            del received
        gc.collect()
        assert sorted(os.listdir("/proc/self/fd")) == before


def test_same_chunk_attached_once(table):
    a, b = socket.socketpair()
    with a, b:
        prmem.send(a, table)
        first = prmem.recv(b)
        prmem.send(a, table["alice"])
        second = prmem.recv(b)
        assert first.pool is second.pool
        assert first.pool.attached and not table.pool.attached
        assert first.address == second.address != table.address
        first.pool.verify()
        assert first.pool.stats().areas_by_state[prmem.State.READ_ONLY] == 1
        with pytest.raises(prmem.ProtectionError):
            first.pool.alloc(8)
        with pytest.raises(prmem.ProtectionError):
            prmem.rare_write(first._allocation, b"x")
        pool = first.pool
        del first, second
        gc.collect()
        pool.destroy()                       # unmaps it here only
        assert table["alice"]["role"] == "admin"


RECEIVER = """
import socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
table = prmem.recv(sock)
print("GOT", table["alice"]["role"], table["bob"]["quota"], flush=True)
page = table.address & ~(mmap_page - 1)
# the kernel refuses every way of writing it
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
print("MPROTECT", libc.mprotect(page, mmap_page, 3), ctypes.get_errno(), flush=True)
fd = [fd for fd in pool_fds("shared-policy")][0]   # what the receiver holds
try:
    os.pwrite(fd, b"EVIL", 0)
except OSError as e:
    print("PWRITE", errno.errorcode[e.errno], flush=True)
rw = os.open("/proc/self/fd/%d" % fd, os.O_RDWR)
try:
    os.pwrite(rw, b"EVIL", 0)
except OSError as e:
    print("PWRITE_RW", errno.errorcode[e.errno], flush=True)
print("ARMED", flush=True)
ctypes.memmove(table.address, b"EVIL", 4)
print("WROTE", flush=True)
"""


def test_send_to_an_unrelated_process_which_cannot_write(table):
    parent, child = socket.socketpair()
    source = (CHILD_PRELUDE + "import errno, mmap\nmmap_page = mmap.PAGESIZE\n"
              + textwrap.dedent(RECEIVER))
    with parent:
        proc = subprocess.Popen([sys.executable, "-c", source, str(child.fileno())],
                                pass_fds=[child.fileno()], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        child.close()
        prmem.send(parent, table)
        out, err = proc.communicate(timeout=60)
    assert "GOT admin 2" in out, (out, err)
    assert "MPROTECT -1 13" in out                 # EACCES
    assert "PWRITE EBADF" in out                   # the received descriptor is read-only
    assert "PWRITE_RW EPERM" in out                # reopened read-write: sealed
    assert "ARMED" in out and "WROTE" not in out
    assert proc.returncode == -signal.SIGSEGV, err
    assert "prmem: fatal write to protected memory" in err
    assert bytes(table._allocation[:8]) == b"PRMFRZ1\0"


# ------------------------------------------ hostile senders are refused

def forged_send(sock, fd, size, used, kind="frozen", meta=None):
    meta = meta or {"pool": "forged", "offset": 0, "size": 4096, "node": 48, "tag": 9}
    payload = json.dumps({"kind": kind, "meta": meta, "pid": os.getpid(),
                          "sizes": [[size, used]]}).encode()
    socket.send_fds(sock, [struct.pack("<I", len(payload)) + payload], [fd])


def memfd(seals, data=b"", size=65536):
    fd = os.memfd_create("prmem:forged", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    os.pwrite(fd, data, 0)
    if seals:
        import fcntl
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def prmem_maps():
    with open("/proc/self/maps") as f:
        return sum("prmem:forged" in line for line in f)


def all_seals():
    import fcntl
    return fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def header(total, root_tag=9, root=48):
    return struct.pack("<QQQQIIQ", 0x00315a52464d5250, total, 1, 0, root_tag, 0, root)


@pytest.mark.parametrize("case", ["unsealed", "no-seal-seal", "wrong-size", "not-memfd",
                                  "forged-header", "outside"])
def test_hostile_descriptors_are_refused(case, tmp_path):
    a, b = socket.socketpair()
    with a, b:
        if case == "unsealed":
            fd, size, used = memfd(0), 65536, 65536
        elif case == "no-seal-seal":
            import fcntl
            fd, size, used = memfd(fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK), 65536, 65536
        elif case == "wrong-size":
            fd, size, used = memfd(all_seals()), 1 << 20, 65536
        elif case == "not-memfd":
            path = tmp_path / "file"
            path.write_bytes(bytes(65536))
            fd, size, used = os.open(path, os.O_RDONLY), 65536, 65536
        elif case == "forged-header":
            fd, size, used = memfd(all_seals(), header(999) + b"\xff" * 64), 65536, 65536
        else:  # the structure the sender describes lies outside what it sent
            fd, size, used = memfd(all_seals()), 65536, 65536
        meta = {"pool": "forged", "offset": 65536 - 16 if case == "outside" else 0,
                "size": 4096, "node": 48, "tag": 9}
        forged_send(a, fd, size, used, meta=meta)
        os.close(fd)
        with pytest.raises(prmem.ProtectionError):
            prmem.recv(b)
        gc.collect()
        assert prmem_maps() == 0        # nothing stayed mapped


def test_malformed_message_is_refused():
    a, b = socket.socketpair()
    with a, b:
        fd = memfd(all_seals())
        socket.send_fds(a, [struct.pack("<I", 5) + b"{nope"], [fd])
        os.close(fd)
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(prmem.ProtectionError, match="malformed"):
            prmem.recv(b)
        assert len(os.listdir("/proc/self/fd")) == before  # the received fd was closed


def test_inspect_names_attached_memory_and_its_origin(table):
    from prmem.inspect import anomalies, mappings

    a, b = socket.socketpair()
    with a, b:
        prmem.send(a, table)
        received = prmem.recv(b)
        found = [m for m in mappings(os.getpid()) if m.pool.startswith("shared-policy")]
        attached = [m for m in found if m.attached]
        assert len(attached) == 1 and f"attached from pid {os.getpid()}" in attached[0].pool
        assert attached[0].start <= received.address < attached[0].end
        assert not [x for x in anomalies(os.getpid()) if "shared-policy" in x]
        pool = received.pool
        del received
        gc.collect()
        pool.destroy()
    assert not [m for m in mappings(os.getpid()) if m.attached and "shared-policy" in m.pool]


def test_shared_workers_example_runs():
    script = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "shared_workers.py")
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def array_facts(arr):
    return float(arr.sum()), arr.shape, arr.flags.writeable, arr.base is not None


def test_pool_arrays_travel_as_shared_memory(pool_factory):
    numpy = pytest.importorskip("numpy")
    pool = pool_factory(Mode.RO, name="shared-array", share=True)
    arr = pool.array(numpy.arange(12, dtype="f8").reshape(3, 4))
    pool.protect()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as workers:
        assert workers.apply(array_facts, (arr,)) == (66.0, (3, 4), False, True)
        assert workers.apply(array_facts, (arr[1:, ::2],)) == (28.0, (2, 2), False, True)
        # any other array still travels as numpy pickles it
        assert workers.apply(array_facts, (numpy.ones(3),)) == (3.0, (3,), True, False)
    del workers, arr


# ---------------------------------- found by the independent C review

def test_future_write_seal_alone_is_refused():
    """F_SEAL_FUTURE_WRITE leaves writable mappings made before it: a sender
    could keep one and change what the receiver reads.  F_SEAL_WRITE is
    required (the kernel refuses it while such a mapping exists)."""
    import fcntl
    fd = os.memfd_create("prmem:forged", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 65536)
    writer = mmap.mmap(fd, 65536, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | 0x10
                | fcntl.F_SEAL_SEAL)
    a, b = socket.socketpair()
    with a, b, writer:
        forged_send(a, fd, 65536, 65536, kind="allocation",
                    meta={"pool": "forged", "offset": 0, "size": 16})
        os.close(fd)
        with pytest.raises(prmem.ProtectionError, match="not sealed"):
            prmem.recv(b)


@pytest.mark.parametrize("meta", [None, [], {"offset": 0}, {"pool": 5}],
                         ids=["null", "list", "no-pool", "pool-not-str"])
def test_malformed_descriptions_leak_no_descriptor(meta):
    a, b = socket.socketpair()
    with a, b:
        fd = memfd(all_seals())
        payload = json.dumps({"kind": "allocation", "meta": meta, "pid": os.getpid(),
                              "sizes": [[65536, 65536]]}).encode()
        socket.send_fds(a, [struct.pack("<I", len(payload)) + payload], [fd])
        os.close(fd)
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(prmem.ProtectionError):
            prmem.recv(b)
        assert len(os.listdir("/proc/self/fd")) == before


def test_reattach_after_destroy_and_with_seal(table):
    a, b = socket.socketpair()
    with a, b:
        prmem.send(a, table)
        first = prmem.recv(b)
        pool = first.pool
        del first
        gc.collect()
        pool.destroy()
        prmem.send(a, table)
        again = prmem.recv(b)              # not the destroyed pool
        assert not again.pool.destroyed and again["bob"]["role"] == "user"
        if "mseal" in prmem.features:
            prmem.send(a, table)
            sealed = prmem.recv(b, seal=True)   # not the earlier unsealed attachment
            assert sealed.pool.seal and sealed.pool is not again.pool


def test_refused_chunk_leaves_no_sealed_mapping_behind(table):
    if "mseal" not in prmem.features:
        pytest.skip("kernel has no mseal()")
    good = prmem.sharing._describe(table.pool)[2][0]
    bad = memfd(0)
    a, b = socket.socketpair()
    with a, b:
        payload = json.dumps({"kind": "pool", "meta": {"pool": "two"}, "pid": os.getpid(),
                              "sizes": [[good[1], good[2]], [65536, 65536]]}).encode()
        socket.send_fds(a, [struct.pack("<I", len(payload)) + payload], [good[0], bad])
        os.close(good[0])
        os.close(bad)
        def policy_maps():
            with open("/proc/self/maps") as f:
                return [m for m in f if "shared-policy" in m]
        before = policy_maps()
        with pytest.raises(prmem.ProtectionError):
            prmem.recv(b, seal=True)
        assert policy_maps() == before
