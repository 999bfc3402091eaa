"""Issue 14, second step: the chunk and area tables live in prmem's
write-rare metadata; what prmem reads from them is re-validated before it
writes (the area table and the descriptor's st_dev/st_ino for every
write); a fork()ed child that cannot get
a metadata file of its own freezes metadata instead of mapping it writable.

``Pool._metadata_tables()`` is a test-only accessor: the tables' addresses.
"""
from __future__ import annotations

import pytest

from conftest import assert_native_store_dies, run_child
from test_metadata import STATES

TABLE_STATES = {k: v for k, v in STATES.items() if k != "new"}


def assert_child_ok(code: str) -> None:
    """Run code in a child; it must print OK and exit with status 0."""
    proc = run_child(code)
    assert "OK" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("table", ["chunks", "areas"])
@pytest.mark.parametrize("state", sorted(TABLE_STATES))
def test_native_write_to_the_chunk_and_area_tables_dies(state, table):
    # destroy() frees the tables back to the metadata allocator: the page
    # stays read-only all the same
    assert_native_store_dies(
        "pool = Pool(Mode.WR, name='meta-tab-%s')\n" % state
        + "a0 = pool.alloc(64)\nchunks, areas = pool._metadata_tables()\ndel a0\n"
        + TABLE_STATES[state], table)


REPLACED_STEPS = ("protect", "rare_write_8", "rare_write_4096", "module_rare_write",
                  "rare_memset", "session", "rare_set", "closed_and_reused")


@pytest.mark.parametrize("step", REPLACED_STEPS)
def test_a_replaced_descriptor_is_refused_and_never_written(step):
    # Another file over the pool's descriptor number (what a stray
    # close/dup2 elsewhere in the process could do): protect() and every
    # rare write, whatever its size, compare st_dev/st_ino with the ones
    # recorded at creation and refuse; the other file is unchanged, and once
    # the pool's file is back the same write is accepted.
    proc = run_child("""
import tempfile
step = %r
other = tempfile.NamedTemporaryFile()
other.write(b"O" * 65536); other.flush()
name = "meta-dup-" + step
pool = Pool(Mode.WR, name=name)
a = pool.alloc(8192)
fm = pool.freeze({"k": 1}) if step == "rare_set" else None
if step != "protect":
    pool.protect()
fd, = pool_fds(name)
saved = os.dup(fd)
if step == "closed_and_reused":
    os.close(fd)  # a stray close; the next open() takes the lowest free number
    reused = os.open(other.name, os.O_RDWR)
    assert reused == fd, (reused, fd)
else:
    os.dup2(other.fileno(), fd)

def change(data):
    if step == "protect":
        pool.protect()
    elif step in ("rare_write_8", "closed_and_reused"):
        pool.rare_write(a, data[:8])
    elif step == "rare_write_4096":
        pool.rare_write(a, data * 512)
    elif step == "module_rare_write":
        prmem.rare_write(a, data[:8])
    elif step == "rare_memset":
        pool.rare_memset(a, data[0])
    elif step == "session":
        with pool.rare_write_session() as w:
            w.write(a, data[:8])
    else:
        fm.rare_set("k", 2)

try:
    change(b"XXXXXXXX")
    raise SystemExit("not refused: " + step)
except prmem.ProtectionError as e:
    assert name in str(e) and "descriptor" in str(e), e
other.seek(0)
assert other.read() == b"O" * 65536, step
os.dup2(saved, fd)
os.close(saved)
change(b"YYYYYYYY")  # the right file again: accepted
if step == "rare_set":
    assert fm["k"] == 2
elif step != "protect":
    assert bytes(a[:8]) == b"YYYYYYYY"
del a, fm
pool.destroy()
print("OK")
""" % step)
    assert "OK" in proc.stdout, proc.stdout + proc.stderr


def test_destroy_neither_zeroes_nor_closes_a_replaced_descriptor():
    proc = run_child("""
import tempfile
other = tempfile.TemporaryFile()
other.write(b"O" * 65536); other.flush()
pool = Pool(Mode.WR, name="meta-dup-destroy")
a = pool.alloc(8192)
a.write(b"A" * 8192)
fd, = pool_fds("meta-dup-destroy")
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
        os._exit(3)
    # and for real: a native store to the frozen metadata dies
    prmem.fault_report(False)
    ctypes.memset(rec, 0x41, 8)
    os._exit(4)
status = os.waitpid(pid, 0)[1]
assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV, status
for fd in held:
    os.close(fd)
a.write(b"def")
assert bytes(a[:3]) == b"def"
pool.protect()
print("OK")
""")
    assert "OK" in proc.stdout, proc.stdout + proc.stderr


META_FD = """
def metadata_fd():
    # the descriptor of the file mapped at prmem's metadata range (the
    # other "prmem-metadata" descriptor is the spare kept for fork())
    with open("/proc/self/maps") as f:
        inos = {int(l.split()[4]) for l in f if "prmem-metadata" in l}
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.fstat(int(fd)).st_ino in inos and \\
                    "prmem-metadata" in os.readlink("/proc/self/fd/" + fd):
                return int(fd)
        except OSError:
            pass
    raise SystemExit("no metadata descriptor")
"""


@pytest.mark.parametrize("first", range(7))
@pytest.mark.parametrize("how", ["dup2", "closed_and_reused"])
def test_a_replaced_metadata_descriptor_freezes_metadata_and_is_never_written(how, first):
    # prmem's metadata file is changed only through its descriptor: if that
    # number stops naming the file, every change that would write metadata
    # is refused with ProtectionError (metadata is frozen, never written
    # into the other file); reads, fork() and exit still work
    assert_child_ok(META_FD + """
import tempfile
other = tempfile.NamedTemporaryFile()
other.write(b"O" * 65536); other.flush()
pool = Pool(Mode.WR, name="meta-fd-" + %r)
a = pool.alloc(64)
a.write(b"abc")
fd = metadata_fd()
if %r == "dup2":
    os.dup2(other.fileno(), fd)
else:
    os.close(fd)
    assert os.open(other.name, os.O_RDWR) == fd

def forked():
    # fork() first: the child gets metadata of its own, still frozen
    seen = bytes(a[:3])
    pid = os.fork()
    if pid == 0:
        os._exit(0 if bytes(a[:3]) == seen else 3)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    raise prmem.ProtectionError("metadata descriptor: the next change is refused")

calls = [lambda: Pool(Mode.WR), lambda: pool.alloc(1 << 20), lambda: pool.protect(),
         lambda: pool.rare_write(a, b"x"), lambda: pool.make_ro(), lambda: pool.destroy(),
         forked]
first = %r
errs = []
for call in calls[first:] + calls[:first]:  # whichever comes first notices
    try:
        call()
        errs.append("allowed")
    except prmem.ProtectionError as e:
        errs.append("refused" if "metadata" in str(e) and "descriptor" in str(e) else str(e))
# a rare write writes no metadata and does not look: allowed if it comes
# first (into the pool's own file, still checked); refused once frozen
assert errs == ["allowed" if first == 3 and i == 0 else "refused" for i in range(7)], errs
assert bytes(a[1:3]) == b"bc"
other.seek(0)
assert other.read() == b"O" * 65536
pid = os.fork()
if pid == 0:
    os._exit(0 if bytes(a[1:3]) == b"bc" else 3)
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
del a, pool
other.seek(0)
assert other.read() == b"O" * 65536
print("OK")
""" % (how, how, first))


LOST = {
    # nothing between losing the descriptor and letting the pool go
    "dealloc": """
del a, pool
""",
    # a deferred destroy that happens when the last view goes
    "deferred_destroy": """
pool2 = Pool(Mode.WR, name="lost-deferred")
b = pool2.alloc(64)
v = memoryview(b)
assert pool2._destroy_when_released() is False
lose()
v.release()
del b, pool2, a, pool
""",
    # a chunk still marked shared after a lazy fork() whose child is gone
    "shared_after_fork": """
pool.protect()
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
lose()
try:
    pool.alloc(1 << 20)
    raise SystemExit("not refused")
except prmem.ProtectionError:
    pass
del a, pool
""",
    # Pool.__new__, then the descriptor goes, then __init__
    "init": """
half = Pool.__new__(Pool)
lose()
try:
    half.__init__(Mode.WR, name="half")
    raise SystemExit("not refused")
except prmem.ProtectionError as e:
    assert "metadata" in str(e), e
del half, a, pool
""",
}


@pytest.mark.parametrize("case", sorted(LOST))
def test_losing_the_metadata_descriptor_never_aborts(case):
    # whichever path first needs metadata after its descriptor was replaced
    # (dealloc, a deferred destroy, release of a chunk a fork() shared,
    # Pool.__init__) freezes it and goes on: exit status 0, the other file
    # untouched
    body = LOST[case]
    setup = "" if "lose()" in body else "lose()\n"
    assert_child_ok(META_FD + """
import tempfile
other = tempfile.NamedTemporaryFile()
other.write(b"O" * 65536); other.flush()
pool = Pool(Mode.WR, name="lost-" + %r)
a = pool.alloc(64)
def lose():
    os.dup2(other.fileno(), metadata_fd())
""" % case + setup + body + """
import gc; gc.collect()
other.seek(0)
assert other.read() == b"O" * 65536
print("OK", flush=True)
""")


def test_fork_never_touches_a_reused_pool_descriptor():
    # the pool's descriptor is closed and an open() reuses the number for a
    # user file; fork(): the child must not chmod, read, map or close the
    # user's file; its pool keeps the data (a private snapshot) and refuses
    # changes; the parent refuses rare writes through the wrong file
    assert_child_ok("""
import stat, tempfile
user = tempfile.NamedTemporaryFile()
user.write(b"VICTIM" * 100); user.flush()
os.chmod(user.name, 0o644)
pool = Pool(Mode.WR, name="fork-reused")
a = pool.alloc(64)
a.write(b"pooldata")
pool.protect()
fd, = pool_fds("fork-reused")
os.close(fd)
assert os.open(user.name, os.O_RDWR) == fd
pid = os.fork()
if pid == 0:
    ok = bytes(a[:8]) == b"pooldata"
    try:
        pool.rare_write(a, b"x")
        ok = False
    except prmem.PrmemError:
        pass
    try:
        os.fstat(fd)  # still open: not the child's to close
    except OSError:
        ok = False
    os._exit(0 if ok else 3)
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
assert stat.S_IMODE(os.stat(user.name).st_mode) == 0o644
with open(user.name, "rb") as f:
    assert f.read() == b"VICTIM" * 100
try:
    pool.rare_write(a, b"x")
    raise SystemExit("not refused")
except prmem.ProtectionError:
    pass
assert bytes(a[:8]) == b"pooldata"
print("OK", flush=True)
""")


def test_more_pools_than_ever_fit_a_fixed_list_go_away_while_frozen():
    # with metadata frozen, destroyed pools are remembered in ordinary
    # memory (a fork() must not follow them); that list grows: releasing
    # 5,000 pools and then forking neither aborts nor follows a freed pool
    assert_child_ok(META_FD + """
import tempfile
pools = [Pool(Mode.WR, name="gone-%d" % i) for i in range(5000)]
other = tempfile.TemporaryFile()
os.dup2(other.fileno(), metadata_fd())
del pools
pid = os.fork()
if pid == 0:
    os._exit(0)
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
print("OK", flush=True)
""")


def test_a_child_of_a_process_that_lost_its_metadata_descriptor_says_so():
    # the child inherits frozen metadata and says why; with Pool() on an
    # exception keeps the user's exception
    assert_child_ok(META_FD + """
import tempfile
other = tempfile.TemporaryFile()
pool = Pool(Mode.WR, name="inherited")
a = pool.alloc(64)
os.dup2(other.fileno(), metadata_fd())
try:
    with Pool(Mode.WR, name="with-lost") as p:
        raise ValueError("mine")
except prmem.ProtectionError:
    pass  # Pool() itself noticed: fine
except ValueError as e:
    assert str(e) == "mine"
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        pool.alloc(1 << 20)
        msg = "allowed"
    except prmem.ProtectionError as e:
        msg = str(e)
    os.write(w, msg.encode()[:4000])
    os._exit(0)
os.close(w)
msg = os.read(r, 4096).decode()
os.waitpid(pid, 0)
assert "already frozen in the parent" in msg, msg
print("OK", flush=True)
""")


def test_leaving_with_pool_on_an_exception_keeps_it_when_metadata_is_frozen():
    assert_child_ok(META_FD + """
import tempfile
other = tempfile.TemporaryFile()
try:
    with Pool(Mode.WR, name="with-frozen") as p:
        a = p.alloc(8)
        os.dup2(other.fileno(), metadata_fd())
        raise ValueError("mine")
except ValueError as e:
    assert str(e) == "mine"
print("OK", flush=True)
""")
