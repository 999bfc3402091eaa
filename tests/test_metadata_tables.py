"""Issue 14, second step: the chunk and area tables live in prmem's
write-rare metadata; what prmem reads from them is re-validated before it
writes (the area table for every write, the descriptor's st_dev/st_ino where
an fstat() is cheap next to the operation); a fork()ed child that cannot get
a metadata file of its own freezes metadata instead of mapping it writable.

``Pool._metadata_tables()`` is a test-only accessor: the tables' addresses.
"""
from __future__ import annotations

import signal

import pytest

from conftest import run_child
from test_metadata import STATES

TABLE_STATES = {k: v for k, v in STATES.items() if k != "new"}


@pytest.mark.parametrize("table", ["chunks", "areas"])
@pytest.mark.parametrize("state", sorted(TABLE_STATES))
def test_native_write_to_the_chunk_and_area_tables_dies(state, table):
    # destroy() frees the tables back to the metadata allocator: the page
    # stays read-only all the same
    proc = run_child(
        "pool = Pool(Mode.WR, name='meta-tab-%s')\n" % state
        + "a0 = pool.alloc(64)\nchunks, areas = pool._metadata_tables()\ndel a0\n"
        + TABLE_STATES[state] + "\n"
        "import ctypes\n"
        "print('before', flush=True)\n"
        "ctypes.memset(%s, 0x41, 8)\n" % table
        + "print('survived', flush=True)\n"
    )
    assert "before" in proc.stdout, proc.stderr
    assert "survived" not in proc.stdout
    assert proc.returncode == -signal.SIGSEGV, proc.stderr


POOL_FD = """
def pool_fd(name):
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink("/proc/self/fd/" + fd).startswith("/memfd:prmem:" + name + " "):
                return int(fd)
        except OSError:
            pass
    raise SystemExit("no descriptor for " + name)
"""


def test_a_replaced_descriptor_is_refused_and_never_written():
    # dup2() another file over the pool's descriptor (what a stray
    # close/dup2 elsewhere in the process could do): protect() and rare
    # writes of 4 KiB or more compare st_dev/st_ino with the recorded ones
    # and refuse; the other file is unchanged
    proc = run_child(POOL_FD + """
import tempfile
other = tempfile.TemporaryFile()
other.write(b"O" * 65536); other.flush()
for step in ("protect", "rare_write", "rare_memset"):
    name = "meta-dup-" + step
    pool = Pool(Mode.WR, name=name)
    a = pool.alloc(8192)
    if step != "protect":
        pool.protect()
    fd = pool_fd(name)
    saved = os.dup(fd)
    os.dup2(other.fileno(), fd)
    try:
        if step == "protect":
            pool.protect()
        elif step == "rare_write":
            pool.rare_write(a, b"X" * 4096)
        else:
            pool.rare_memset(a, 0x58)
        raise SystemExit("not refused: " + step)
    except prmem.ProtectionError as e:
        assert name in str(e) and "descriptor" in str(e), e
    other.seek(0)
    assert other.read() == b"O" * 65536, step
    os.dup2(saved, fd)
    os.close(saved)
    if step != "protect":
        pool.rare_write(a, b"Y" * 4096)  # the right file again: accepted
        assert bytes(a[:4096]) == b"Y" * 4096
    del a
    pool.destroy()
print("OK")
""")
    assert "OK" in proc.stdout, proc.stdout + proc.stderr


def test_destroy_neither_zeroes_nor_closes_a_replaced_descriptor():
    proc = run_child(POOL_FD + """
import tempfile
other = tempfile.TemporaryFile()
other.write(b"O" * 65536); other.flush()
pool = Pool(Mode.WR, name="meta-dup-destroy")
a = pool.alloc(8192)
a.write(b"A" * 8192)
fd = pool_fd("meta-dup-destroy")
os.dup2(other.fileno(), fd)
del a
pool.destroy()
os.fstat(fd)  # still open: not prmem's to close
other.seek(0)
assert other.read() == b"O" * 65536
print("OK")
""")
    assert "OK" in proc.stdout, proc.stdout + proc.stderr


def test_an_allocation_moved_outside_its_pool_is_refused():
    # small rare writes do no fstat(); the target is still checked against
    # the protected area table, so an Allocation whose address (ordinary
    # memory in the object) was moved into another pool is refused
    proc = run_child("""
import ctypes, struct
pool = Pool(Mode.WR, name="meta-small")
a = pool.alloc(64)
pool.protect()
other = Pool(Mode.WR, name="meta-other")
b = other.alloc(64)
b.write(b"B" * 64)
real = None
base = id(a)
want = [a.address]
for off in range(16, 96, 8):
    if struct.unpack("P", ctypes.string_at(base + off, 8))[0] == want[0]:
        real = off
        break
assert real is not None
ctypes.memmove(base + real, struct.pack("P", b.address), 8)
for call in (lambda: pool.rare_write(a, b"x"), lambda: bytes(a[:1])):
    try:
        call()
        raise SystemExit("followed")
    except prmem.ProtectionError as e:
        assert "meta-small" in str(e), e
assert bytes(b[:64]) == b"B" * 64
ctypes.memmove(base + real, struct.pack("P", want[0]), 8)
pool.rare_write(a, b"y")
assert bytes(a[:1]) == b"y"
print("OK")
""")
    assert "OK" in proc.stdout, proc.stdout + proc.stderr


def test_a_child_without_a_metadata_file_refuses_changes():
    # prmem keeps a spare metadata file for a fork() out of descriptors;
    # close it behind prmem's back (prmem notices: its inode is checked
    # before use) and run out of descriptors: the child gets no metadata
    # file and its metadata is frozen (never mapped writable): changes and
    # new pools are refused with PrmemError, reads work; the parent is
    # unaffected
    proc = run_child("""
pool = Pool(Mode.WR, name="meta-frozen")
a = pool.alloc(64)
a.write(b"abc")
with open("/proc/self/maps") as f:
    meta_ino = {int(l.split()[4]) for l in f if "prmem-metadata" in l}
spare = [int(fd) for fd in os.listdir("/proc/self/fd")
         if os.path.exists("/proc/self/fd/" + fd)
         and os.readlink("/proc/self/fd/" + fd).startswith("/memfd:prmem-metadata")
         and os.fstat(int(fd)).st_ino not in meta_ino]
assert len(spare) == 1, spare
os.close(spare[0])
held = []
try:
    while True:
        held.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
pid = os.fork()
if pid == 0:
    for fd in held[:16]:
        os.close(fd)
    errs = []
    for call in (lambda: pool.alloc(8), lambda: pool.protect(),
                 lambda: Pool(Mode.WR, name="meta-new")):
        try:
            call()
            errs.append("allowed")
        except prmem.PrmemError as e:
            errs.append("frozen" if "metadata" in str(e) else str(e))
    rec = pool._metadata_address()
    with open("/proc/self/maps") as f:
        around = [l.split()[1] for l in f
                  if int(l.split("-")[0], 16) <= rec < int(l.split()[0].split("-")[1], 16)]
    ok = errs == ["frozen"] * 3 and bytes(a[:3]) == b"abc" and around == ["r--p"]
    if not ok:
        print(errs, flush=True)
    os._exit(0 if ok else 3)
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
for fd in held:
    os.close(fd)
a.write(b"def")
assert bytes(a[:3]) == b"def"
pool.protect()
print("OK")
""")
    assert "OK" in proc.stdout, proc.stdout + proc.stderr
