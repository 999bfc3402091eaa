"""Every mode x phase cell: what may be written, proven for real.

For each cell the same scenario is built in this process and (where the
write is forbidden) in a child interpreter:

(a) allowed cells: a Python-level write and a native write succeed and read back;
(b) forbidden cells: Python-level writes raise ProtectionError, nothing changes;
(c) forbidden cells: a native write (ctypes.memmove) in a child dies of SIGSEGV;
(d) the mapping's permissions in /proc/self/maps match the state.

Sealed READ_ONLY memory is then attacked from the side: mprotect, /proc/self/mem,
the memfd itself (here and from another process holding the fd).
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import prmem
from prmem import Mode, State

from conftest import backing_fds, maps_entries, perms_at, pool_fds, run_child

PAGE = prmem.page_size
W, WR, RO = State.WRITABLE, State.WRITE_RARE, State.READ_ONLY

# Built identically here and in the children (exec'd in both).
SCENARIO = '''
SEED = b"ORIGINAL-DATA"

def build(mode, phase, name):
    """Return (pool, target, keep): target is the allocation under test in
    `phase`; keep holds other allocations alive."""
    pool = prmem.Pool(mode, name=name, refill=4096)
    keep = []
    if phase == "before":
        # allocated, pool never protected
        target = pool.strdup(SEED)
    elif phase == "rollover":
        # a later allocation opened a new area; protect() never called
        target = pool.strdup(SEED)
        keep.append(pool.alloc(4096))
        assert pool.stats().areas == 2
    elif phase == "after":
        target = pool.strdup(SEED)
        pool.protect()
    elif phase == "after_old":
        # protected, then the pool was used again: protection never goes back
        target = pool.strdup(SEED)
        pool.protect()
        keep.append(pool.strdup(SEED))
    elif phase == "after_new":
        # the new allocation made after protect()
        keep.append(pool.strdup(SEED))
        pool.protect()
        target = pool.strdup(SEED)
    else:
        raise AssertionError(phase)
    return pool, target, keep
'''
exec(SCENARIO)  # defines SEED and build() here too

PHASES = ["before", "rollover", "after", "after_old", "after_new"]

EXPECTED = {
    Mode.RO:       {"before": W, "rollover": W, "after": RO, "after_old": RO, "after_new": W},
    Mode.WR:       {"before": W, "rollover": W, "after": WR, "after_old": WR, "after_new": W},
    Mode.AUTO_RO:  {"before": W, "rollover": RO, "after": RO, "after_old": RO, "after_new": W},
    Mode.AUTO_WR:  {"before": W, "rollover": WR, "after": WR, "after_old": WR, "after_new": W},
    Mode.START_WR: {"before": WR, "rollover": WR, "after": WR, "after_old": WR,
                    "after_new": WR},
}

PERMS = {W: "rw-s", WR: "r--s", RO: "r--s"}

CELLS = [pytest.param(mode, phase, EXPECTED[mode][phase], id=f"{mode.name}-{phase}")
         for mode in Mode for phase in PHASES]
FORBIDDEN = [p for p in CELLS if p.values[2] is not W]
ALLOWED = [p for p in CELLS if p.values[2] is W]

SEEDED = SEED + b"\0"  # strdup adds the NUL


def cell_name(mode: Mode, phase: str) -> str:
    return f"mx-{mode.name}-{phase}"


@pytest.fixture
def cell(request):
    """Build the scenario of a cell in this process; destroy it afterwards."""
    built = []

    def make(mode, phase):
        pool, target, keep = build(mode, phase, cell_name(mode, phase))
        built.append(pool)
        return pool, target, keep

    yield make
    for pool in built:
        pool.destroy()


# ---------------------------------------------------------- states and perms


@pytest.mark.parametrize("mode, phase, state", CELLS)
def test_state_and_maps_perms(cell, mode, phase, state):
    pool, target, keep = cell(mode, phase)
    assert target.state is state
    assert bytes(target) == SEEDED
    perms = perms_at(target.address)
    assert perms == PERMS[state]
    assert perms_at(target.address + target.size - 1) == perms
    if "memfd" in prmem.features:
        # The mapping is the pool's own memfd.
        starts = [(s, e) for s, e, _ in maps_entries(cell_name(mode, phase))]
        assert any(s <= target.address < e for s, e in starts)


# ------------------------------------------------------------ (a) allowed


@pytest.mark.parametrize("mode, phase, state", ALLOWED)
def test_allowed_writes(cell, mode, phase, state):
    pool, a, keep = cell(mode, phase)
    a.write(b"new")
    assert bytes(a) == b"new" + SEEDED[3:]
    a[3] = ord("-")
    a[4:8] = b"DATA"
    assert a[0:8] == b"new-DATA"
    with memoryview(a) as mv:
        assert not mv.readonly
        mv[8:10] = b"mv"
    # A native write goes straight through the MMU: allowed here.
    ctypes.memmove(a.address + 10, b"CT", 2)
    expected = b"new-DATAmvCT" + SEEDED[12:]
    assert bytes(a) == expected
    assert ctypes.string_at(a.address, a.size) == expected
    assert a.state is State.WRITABLE
    assert perms_at(a.address) == "rw-s"


# -------------------------------------------------- (b) Python-level forbidden


@pytest.mark.parametrize("mode, phase, state", FORBIDDEN)
def test_python_write_forbidden(cell, mode, phase, state):
    pool, a, keep = cell(mode, phase)
    attempts = {
        "write": lambda: a.write(b"EVIL"),
        "write@offset": lambda: a.write(b"E", offset=a.size - 1),
        "setitem": lambda: a.__setitem__(0, 0x45),
        "setslice": lambda: a.__setitem__(slice(0, 4), b"EVIL"),
        "setslice-step": lambda: a.__setitem__(slice(None, None, 2), b"E" * 7),
    }
    for what, attempt in attempts.items():
        with pytest.raises(prmem.ProtectionError) as info:
            attempt()
        assert isinstance(info.value, PermissionError), what
        assert bytes(a) == SEEDED, what
    with memoryview(a) as mv:
        assert mv.readonly
        with pytest.raises(TypeError):
            mv[0] = 0x45
    # A writable buffer request is refused too.
    r, w = os.pipe()
    try:
        os.write(w, b"EVIL")
        with pytest.raises(prmem.ProtectionError):
            os.readv(r, [a])
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises((prmem.ProtectionError, TypeError)):
        ctypes.c_char.from_buffer(a)
    assert bytes(a) == SEEDED
    assert ctypes.string_at(a.address, a.size) == SEEDED
    assert a.state is state
    # The way that is allowed for write-rare memory works; none for READ_ONLY.
    if state is State.WRITE_RARE:
        prmem.rare_write(a, b"RARE")
        assert bytes(a) == b"RARE" + SEEDED[4:]
        assert perms_at(a.address) == "r--s"
    else:
        with pytest.raises(prmem.ProtectionError):
            prmem.rare_write(a, b"RARE")
        assert bytes(a) == SEEDED


# -------------------------------------------------------- (c) native forbidden

CHILD_NATIVE = SCENARIO + '''
pool, target, keep = build(Mode[{mode!r}], {phase!r}, {name!r})
assert target.state is State[{state!r}], target.state
assert bytes(target) == SEED + b"\\0"
print("MARK-BEFORE-WRITE", flush=True)
native_write(target, b"EVIL")
print("MARK-AFTER-WRITE", flush=True)
'''


@pytest.mark.parametrize("mode, phase, state", FORBIDDEN)
def test_native_write_forbidden_segfaults(mode, phase, state):
    proc = run_child(CHILD_NATIVE.format(mode=mode.name, phase=phase, state=state.name,
                                         name=cell_name(mode, phase)))
    assert "MARK-BEFORE-WRITE" in proc.stdout, proc.stderr
    assert "MARK-AFTER-WRITE" not in proc.stdout
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stderr)


def test_native_write_allowed_in_child_control():
    # The same child with a WRITABLE target survives: the SIGSEGVs above come
    # from the protection, not from the harness.
    proc = run_child(CHILD_NATIVE.format(mode="RO", phase="before", state="WRITABLE",
                                         name="mx-control"))
    assert proc.returncode == 0, proc.stderr
    assert "MARK-AFTER-WRITE" in proc.stdout


# ----------------------------------------------------- sealed READ_ONLY memory

PROT_READ, PROT_WRITE = 0x1, 0x2


def memfd_backing(name: str, address: int) -> tuple[int, int]:
    """(fd, file offset) of the memfd of pool `name` mapped at `address`: a
    fresh read-write descriptor, as an attacker in the process would get one
    (see backing_fds).  Sealed READ_ONLY chunks keep no prmem descriptor;
    where /proc/self/map_files is not open to us either, no descriptor can
    be had at all, and the descriptor attacks are moot."""
    from prmem._probes import mapping_at

    _span, offset, _inode = mapping_at(address)
    fds = backing_fds(address, name)
    if not fds:
        pytest.skip("no descriptor of the pool's file can be opened here")
    for extra in fds[1:]:
        os.close(extra)
    return fds[0], offset


CHILD_MEMFD = textwrap.dedent("""
    import ctypes, errno, mmap, os, sys
    fd, page_off, in_page = (int(x) for x in sys.argv[1:4])
    for what, attempt in [
        ("pwrite", lambda: os.pwrite(fd, b"EVIL", page_off + in_page)),
        ("ftruncate", lambda: os.ftruncate(fd, 0)),
        ("mmap-rw", lambda: mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE,
                                      offset=page_off)),
    ]:
        try:
            attempt()
            print("ALLOWED", what, flush=True)
        except OSError as e:
            print("REFUSED", what, errno.errorcode[e.errno], flush=True)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    PROT_READ, MAP_SHARED = 1, 1
    base = libc.mmap(None, mmap.PAGESIZE, PROT_READ, MAP_SHARED, fd, page_off)
    assert base not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
    print("READ", ctypes.string_at(base + in_page, 13).decode(), flush=True)
    print("MARK-BEFORE-WRITE", flush=True)
    ctypes.memmove(base + in_page, b"EVIL", 4)
    print("MARK-AFTER-WRITE", flush=True)
""")


SEALED_CASES = [
    pytest.param(Mode.RO, False, "after", id="RO"),
    pytest.param(Mode.RO, False, "after_old", id="RO-reused"),
    pytest.param(Mode.AUTO_RO, False, "rollover", id="AUTO_RO-rollover-then-protect"),
    pytest.param(Mode.RO, True, "after", id="RO-mseal",
                 marks=pytest.mark.skipif("mseal" not in prmem.features,
                                          reason="kernel has no mseal()")),
]


@pytest.mark.skipif("memfd_seal_future_write" not in prmem.features,
                    reason="READ_ONLY memory is sealed only with memfd + F_SEAL_FUTURE_WRITE")
@pytest.mark.parametrize("mode, seal, phase", SEALED_CASES)
def test_sealed_read_only_resists_remap_procmem_and_memfd(mode, seal, phase):
    name = f"mx-sealed-{mode.name}-{phase}-{int(seal)}"
    pool = prmem.Pool(mode, name=name, refill=4096, seal=seal)
    try:
        check_sealed(pool, name, phase)
    finally:
        pool.destroy()
    if not seal:  # mseal()ed memory can never be unmapped; the rest is gone
        assert maps_entries(name) == []


def check_sealed(pool, name, phase):
    a = pool.strdup(SEED)
    keep = []
    if phase == "rollover":
        keep.append(pool.alloc(4096))   # a's area becomes READ_ONLY ...
        assert a.state is State.READ_ONLY
    pool.protect()                      # ... and sealed now
    if phase == "after_old":
        keep.append(pool.strdup(SEED))  # a WRITABLE area in a fresh memfd
    assert a.state is State.READ_ONLY
    assert perms_at(a.address) == "r--s"
    page = a.address & ~(PAGE - 1)

    # 1. mprotect(PROT_READ|PROT_WRITE) is refused by the kernel.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mprotect.restype = ctypes.c_int
    ctypes.set_errno(0)
    rc = libc.mprotect(page, PAGE, PROT_READ | PROT_WRITE)
    err = ctypes.get_errno()
    if rc == 0:  # pragma: no cover - a failure: leave the process sane
        libc.mprotect(page, PAGE, PROT_READ)
    assert rc == -1
    assert err in (errno.EACCES, errno.EPERM)
    assert perms_at(a.address) == "r--s"

    # 2. /proc/self/mem (FOLL_FORCE) cannot write it either.
    fd = os.open("/proc/self/mem", os.O_RDWR)
    try:
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"EVIL", a.address)
        assert info.value.errno == errno.EIO
        assert os.pread(fd, len(SEEDED), a.address) == SEEDED  # reading works
    finally:
        os.close(fd)

    # 3. prmem keeps no descriptor of a sealed chunk, and the backing memfd
    #    is sealed: no writes, no resizing, no writable map.
    inode = os.stat("/proc/self/map_files/%x-%x" % next(
        (s, e) for s, e, _ in maps_entries(name) if s <= a.address < e)).st_ino
    assert not [fd for fd in pool_fds(name) if os.fstat(fd).st_ino == inode]
    mfd, file_off = memfd_backing(name, a.address)
    for where in (0, file_off):
        with pytest.raises(OSError) as info:
            os.pwrite(mfd, b"EVIL", where)
        assert info.value.errno == errno.EPERM
    with pytest.raises(OSError) as info:
        os.ftruncate(mfd, 0)
    assert info.value.errno == errno.EPERM
    with pytest.raises(OSError) as info:
        mmap.mmap(mfd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    assert info.value.errno == errno.EPERM
    assert os.pread(mfd, len(SEEDED), file_off) == SEEDED

    # 4. Another process holding the memfd cannot change it either, and a
    #    native write through its own read-only mapping faults.
    page_off = file_off - file_off % PAGE
    proc = subprocess.run(
        [sys.executable, "-c", CHILD_MEMFD, str(mfd), str(page_off), str(file_off - page_off)],
        pass_fds=[mfd], capture_output=True, text=True, timeout=60)
    out = proc.stdout
    assert "REFUSED pwrite EPERM" in out, (out, proc.stderr)
    assert "REFUSED ftruncate EPERM" in out
    assert "REFUSED mmap-rw EPERM" in out
    assert "ALLOWED" not in out
    assert "READ ORIGINAL-DATA" in out
    assert "MARK-BEFORE-WRITE" in out
    assert "MARK-AFTER-WRITE" not in out
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stderr)

    # The parent's data is unchanged after all of it.
    assert bytes(a) == SEEDED
    assert ctypes.string_at(a.address, a.size) == SEEDED
    assert a.state is State.READ_ONLY
    os.close(mfd)
    keep.clear()


@pytest.mark.skipif("memfd" not in prmem.features, reason="needs memfd-backed pools")
def test_writable_memory_controls():
    """The same attacks on WRITABLE memory succeed, so the refusals above come
    from sealing and not from the environment."""
    name = "mx-controls"
    with prmem.Pool(Mode.RO, name=name, refill=4096) as pool:
        a = pool.strdup(SEED)
        fd = os.open("/proc/self/mem", os.O_RDWR)
        try:
            assert os.pwrite(fd, b"MEM", a.address) == 3
        finally:
            os.close(fd)
        mfd, offset = memfd_backing(name, a.address)
        assert os.pwrite(mfd, b"FD", offset + 3) == 2
        os.close(mfd)
        assert bytes(a) == b"MEMFD" + SEEDED[5:]
