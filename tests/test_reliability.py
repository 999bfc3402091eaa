"""Reliability under adversarial use: no writable path to READ_ONLY memory,
verify(), fork without a private file, and limits that do not fail silently.

Each protection claim is proven by doing the forbidden thing for real (a
writable alias, a descriptor, a substituted mapping, an exhausted limit),
mostly in child processes.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import subprocess
import sys
import textwrap

import pytest

import prmem
from prmem import Mode, State, _probes

from conftest import backing_fds, pool_fds, run_child
from test_production import run_memlock_limited

F_SEAL_FUTURE_WRITE = 0x10
PAGE = mmap.PAGESIZE

needs_memfd = pytest.mark.skipif("memfd" not in prmem.features, reason="needs memfd pools")
needs_secret = pytest.mark.skipif("memfd_secret" not in prmem.features,
                                  reason="kernel has no memfd_secret()")
needs_mseal = pytest.mark.skipif("mseal" not in prmem.features, reason="kernel has no mseal()")


def writable_alias(alloc, name):
    """A writable MAP_SHARED mapping of alloc's page, made outside prmem."""
    del name  # the descriptor is found by the file behind the address
    return _probes.writable_alias(alloc.address)


# ---------------------------------------------- writable aliases (item 3)

@needs_memfd
@pytest.mark.parametrize("seal", [False, True], ids=["plain", "seal"])
def test_protect_refuses_while_a_writable_alias_exists(pool_factory, seal):
    pool = pool_factory(Mode.RO, name=f"alias-ro-{seal}", refill=4096, seal=seal)
    a = pool.strdup("policy-v1")
    alias = writable_alias(a, pool.name)
    with pytest.raises(prmem.ProtectionError, match="another writable mapping"):
        pool.protect()
    # the pool is unchanged and usable
    assert a.state is State.WRITABLE
    a.write(b"policy-v2")
    assert alias[a.address % PAGE:a.address % PAGE + 9] == b"policy-v2"
    alias.close()
    pool.protect()
    assert a.state is State.READ_ONLY
    # and no new writable mapping can be made
    with pytest.raises(PermissionError):
        writable_alias(a, pool.name)  # EPERM from mmap, or no descriptor at all
    pool.verify()
    assert bytes(a) == b"policy-v2\0"


@needs_memfd
@pytest.mark.parametrize("mode", [Mode.WR, Mode.AUTO_WR, Mode.START_WR], ids=lambda m: m.name)
def test_make_ro_refuses_while_a_writable_alias_exists(pool_factory, mode):
    pool = pool_factory(mode, name=f"alias-{mode.name}", refill=4096)
    a = pool.zalloc(16)
    pool.protect()
    pool.rare_write(a, b"v1")
    alias = writable_alias(a, pool.name)
    with pytest.raises(prmem.ProtectionError, match="another writable mapping"):
        pool.make_ro()
    assert a.state is State.WRITE_RARE
    pool.rare_write(a, b"v2")
    assert bytes(a[:2]) == b"v2"
    alias.close()
    pool.make_ro()
    assert a.state is State.READ_ONLY
    with pytest.raises(prmem.ProtectionError):
        pool.rare_write(a, b"v3")


ALIAS_HOLDER = """
import mmap, os, sys
fd, offset = int(sys.argv[1]), int(sys.argv[2])
m = mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
              offset=offset)
os.close(fd)
print("mapped", flush=True)
sys.stdin.readline()
m[0:4] = b"EVIL"
print("wrote", flush=True)
"""


@needs_memfd
def test_protect_refuses_while_another_process_maps_it_writable(pool_factory):
    pool = pool_factory(Mode.RO, name="alias-other-process", refill=4096)
    a = pool.strdup("shared?")
    fds = backing_fds(a.address, pool.name)
    offset = 0  # the allocation is the first thing in the pool's first chunk
    with subprocess.Popen([sys.executable, "-c", ALIAS_HOLDER, str(fds[0]), str(offset)],
                          pass_fds=[fds[0]], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as holder:
        for fd in fds:
            os.close(fd)
        try:
            assert holder.stdout.readline().strip() == "mapped"
            with pytest.raises(prmem.ProtectionError, match="another writable mapping"):
                pool.protect()
            assert a.state is State.WRITABLE
        finally:
            holder.kill()
    pool.protect()
    assert a.state is State.READ_ONLY
    assert bytes(a) == b"shared?\0"


# --------------------------------------- secret READ_ONLY memory (item 2)

SECRET_FDS = """
import mmap
pool = Pool(Mode.RO, name="secret-fds", secret=True, seal={seal})
a = pool.alloc(64)
a.write(b"secret-data")
pool.protect()
assert pool.stats().descriptors == 0
for entry in os.listdir("/proc/self/fd"):
    fd = int(entry)
    try:
        target = os.readlink("/proc/self/fd/" + entry)
    except OSError:
        continue
    assert "secretmem" not in target, target
    try:
        m = mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        m[0:4] = b"EVIL"
        m.close()
    except (OSError, ValueError):
        pass
    try:
        os.pwrite(fd, b"EVIL", 0)
    except OSError:
        pass
assert bytes(a[:11]) == b"secret-data", bytes(a[:11])
print("OK")
"""


@needs_secret
@pytest.mark.parametrize("seal", [False, True], ids=["plain", "seal"])
def test_secret_read_only_keeps_no_writable_descriptor(seal):
    result = run_child(SECRET_FDS.format(seal=seal))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK")


SECRET_ALIAS = """
import mmap
pool = Pool(Mode.RO, name="secret-alias", secret=True, seal=True)
a = pool.alloc(64)
a.write(b"secret-data")
fd = next(int(e) for e in os.listdir("/proc/self/fd")
          if "secretmem" in os.readlink("/proc/self/fd/" + e))
{attack}
try:
    pool.protect()
    print("protected")
except prmem.ProtectionError as e:
    print("refused:", e)
assert a.state is State.WRITABLE
{undo}
pool.protect()
assert a.state is State.READ_ONLY
print("OK")
"""


@needs_secret
@pytest.mark.parametrize("attack, undo, says", [
    ("alias = mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, "
     "mmap.PROT_READ | mmap.PROT_WRITE)", "alias.close()", "also mapped"),
    ("extra = os.dup(fd)", "os.close(extra)", "descriptor"),
], ids=["mapping", "descriptor"])
def test_secret_protect_refuses_aliases(attack, undo, says):
    result = run_child(SECRET_ALIAS.format(attack=attack, undo=undo))
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and says in result.stdout, result.stdout
    assert result.stdout.strip().endswith("OK")


# ------------------------------------------------------ verify() (item 4)

VERIFY = """
import mmap
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                        ctypes.c_void_p]
PAGE = mmap.PAGESIZE
pool = Pool(Mode.{mode}, name="verify", refill=4 * PAGE)
a = pool.alloc(PAGE)
a.write(b"genuine")
pool.protect()
pool.verify()
page = a.address
{attack}
try:
    pool.verify()
    print("verified")
except prmem.ProtectionError as e:
    print("refused:", e)
"""

VERIFY_ATTACKS = {
    # readers silently see other bytes: the classic substitution
    "map-fixed-over": ("RO",
                       "fake = libc.mmap(page, PAGE, 3, 0x22 | 0x10, -1, 0)\n"
                       "assert fake == page\n"
                       "ctypes.memmove(page, b'forged!', 7)\n"
                       "assert bytes(a[:7]) == b'forged!'",
                       "mapped by something other"),
    "munmap": ("RO", "assert libc.munmap(page, PAGE) == 0", "not mapped"),
    "mremap-away": ("RO",
                    "elsewhere = libc.mmap(None, PAGE, 0, 0x22, -1, 0)\n"
                    "assert libc.mremap(page, PAGE, PAGE, 3, elsewhere) == elsewhere",
                    "not mapped"),
    "mprotect-write-rare": ("WR", "assert libc.mprotect(page, PAGE, 3) == 0",
                            "writable although protected"),
    "mprotect-none": ("WR", "assert libc.mprotect(page, PAGE, 0) == 0", "not readable"),
}


@pytest.mark.parametrize("attack", VERIFY_ATTACKS)
def test_verify_detects_changed_mappings(attack):
    mode, code, says = VERIFY_ATTACKS[attack]
    result = run_child(VERIFY.format(mode=mode, attack=code))
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout, result.stdout
    assert says in result.stdout, result.stdout


@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.name)
def test_verify_passes_for_untouched_pools(pool_factory, mode):
    pool = pool_factory(mode, name=f"verify-ok-{mode.name}", refill=4096)
    keep = [pool.alloc(100) for _ in range(3)] + [pool.alloc(3 * PAGE)]
    pool.verify()
    pool.protect()
    pool.verify()
    keep.append(pool.alloc(10))
    pool.verify()
    if mode.has_write_rare:
        pool.make_ro()
        pool.verify()


def test_verify_after_destroy_raises(pool_factory):
    pool = pool_factory(Mode.RO, name="verify-destroyed")
    pool.destroy()
    with pytest.raises(prmem.PoolDestroyedError):
        pool.verify()


# ---------------------------------------- fork without a private file (item 5)

FORK_NO_FILES = """
import resource
wr = Pool(Mode.WR, name="fork-nofile-wr", refill=4096)
w = wr.alloc(64)
w.write(b"rare-before-fork")
wr.protect()
ro_view = memoryview(w)
p = wr.alloc(64)                   # a new WRITABLE area of the same chunk
p.write(b"plain-before-fork")
rw_view = memoryview(p)            # writable: p is still WRITABLE
ready_r, ready_w = os.pipe()       # the child says when it has looked
# use up every descriptor, so the child cannot create new memory files
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
hog = []
try:
    while True:
        hog.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
pid = os.fork()
if pid == 0:
    code = 1
    try:
        assert bytes(ro_view[:16]) == b"rare-before-fork"
        assert bytes(rw_view[:17]) == b"plain-before-fork"
        os.write(ready_w, b"x")
        import time; time.sleep(0.3)   # the parent changes its copy meanwhile
        assert bytes(ro_view[:16]) == b"rare-before-fork", bytes(ro_view[:16])
        assert bytes(w[:16]) == b"rare-before-fork"
        rw_view[0:5] = b"CHILD"            # a private copy: allowed, no crash
        for call in (lambda: wr.rare_write(w, b"x"), lambda: wr.alloc(8),
                     lambda: p.write(b"x"), lambda: wr.make_ro(), lambda: wr.protect()):
            try:
                call()
                raise SystemExit("a change went through")
            except prmem.PrmemError as e:
                assert "forked child" in str(e), e
        assert memoryview(p).readonly      # new views do not change it either
        wr.stats()
        code = 0
    finally:
        os._exit(code)
os.read(ready_r, 1)
wr.rare_write(w, b"PARENT")
_, status = os.waitpid(pid, 0)
assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
assert bytes(p[:5]) == b"plain", bytes(p[:5])   # the child's write stayed there
assert bytes(w[:6]) == b"PARENT"
print("OK")
"""


def test_fork_without_descriptors_keeps_views_readable():
    result = run_child(FORK_NO_FILES)
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert result.stdout.strip().endswith("OK")


# -------------------------------------------------- descriptors (item 6)

FD_LIMIT = """
import resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
before = len(os.listdir("/proc/self/fd"))
pools = []
for i in range(2000):
    pool = Pool(Mode.RO, name="ro-%d" % i, refill=4096)
    pool.strdup("table %d" % i)
    pool.protect()
    pools.append(pool)
assert len(os.listdir("/proc/self/fd")) <= before + 1, len(os.listdir("/proc/self/fd"))
wr = []
try:
    for i in range(2000):
        pool = Pool(Mode.WR, name="wr-%d" % i, refill=4096)
        pool.alloc(8)
        wr.append(pool)
    raise SystemExit("no limit hit")
except OSError as e:
    assert e.errno == errno.EMFILE, e
    assert "RLIMIT_NOFILE" in str(e), e
    print("limit:", e)
wr[-1].destroy()
open("/dev/null").close()     # the process can open files again
print("OK", len(pools), len(wr))
"""


def test_read_only_pools_hold_no_descriptors_and_emfile_names_the_limit():
    result = run_child("import errno\n" + FD_LIMIT)
    assert result.returncode == 0, result.stderr
    assert "OK 2000" in result.stdout, result.stdout


@needs_memfd
def test_descriptor_count_in_stats(pool_factory):
    pool = pool_factory(Mode.WR, name="fd-count", refill=4096)
    pool.alloc(8)
    assert pool.stats().descriptors == 1 == len(pool_fds("fd-count"))
    pool.protect()
    assert pool.stats().descriptors == 1
    pool.make_ro()
    assert pool.stats().descriptors == 0 == len(pool_fds("fd-count"))


LOCKED_SEALED = """
def vmlck():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmLck:"):
                return int(line.split()[1])
base = vmlck()
pool = Pool(Mode.RO, name="locked-sealed", lock=True, seal=True, refill=64 * 1024)
a = pool.alloc(64 * 1024)
a.write(b"x" * 65536)
pool.protect()
assert vmlck() >= base + 64, (base, vmlck())
pool.destroy()
assert vmlck() == base, (base, vmlck())
print("OK")
"""


@needs_mseal
def test_locked_sealed_pool_unlocks_on_destroy():
    result = run_child(LOCKED_SEALED)
    assert result.returncode == 0, result.stderr


@needs_secret
def test_secret_zero_length_rare_writes_are_no_ops(pool_factory):
    pool = pool_factory(Mode.WR, name="secret-empty", secret=True, refill=4096)
    a = pool.alloc(16)
    a.write(b"0123456789abcdef")
    pool.protect()
    pool.rare_write(a, b"")
    pool.rare_write(a, b"", 16)
    pool.rare_memset(a, 0, 0, 0)
    pool.rare_memset(a, 0, 16)
    assert bytes(a) == b"0123456789abcdef"


@needs_secret
def test_secret_rare_write_at_memlock_limit_raises_memory_error():
    result = run_memlock_limited("""
        import resource
        pool = Pool(Mode.WR, name="secret-limit", secret=True, refill=4096)
        a = pool.alloc(16)
        pool.protect()
        used = 0
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmLck:"):
                    used = int(line.split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (used, used))
        try:
            pool.rare_write(a, b"over the limit")
            print("written")
        except MemoryError as e:
            assert "RLIMIT_MEMLOCK" in str(e), e
            print("MemoryError")
        pool.stats()
    """)
    assert result.returncode == 0, result.stderr
    assert "MemoryError" in result.stdout, result.stdout


@needs_memfd
def test_foreign_seal_blocks_rare_write_with_protection_error(pool_factory):
    pool = pool_factory(Mode.WR, name="foreign-fw", refill=4096)
    a = pool.zalloc(8)
    pool.protect()
    fcntl.fcntl(pool_fds("foreign-fw")[0], fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE)
    with pytest.raises(prmem.ProtectionError, match="seals"):
        pool.rare_write(a, b"x")
    assert bytes(a) == bytes(8)


@needs_memfd
def test_foreign_seal_seal_makes_protect_raise_protection_error(pool_factory):
    pool = pool_factory(Mode.RO, name="foreign-ss", refill=4096)
    a = pool.strdup("data")
    fcntl.fcntl(pool_fds("foreign-ss")[0], fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL)
    with pytest.raises(prmem.ProtectionError, match="F_SEAL_SEAL"):
        pool.protect()
    assert a.state is State.WRITABLE
    a.write(b"DATA")
    assert bytes(a) == b"DATA\0"


LEFTOVERS = """
import warnings
warnings.simplefilter("always")
for i in range(1001):
    pool = Pool(Mode.RO, name="leftover", seal=True, refill=4096)
    pool.alloc(8)
    pool.protect()
    pool.destroy()
print("OK")
"""


@needs_mseal
def test_sealed_leftovers_warn():
    result = run_child(LEFTOVERS)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("ResourceWarning") == 1, result.stderr
    assert "1000 chunks" in result.stderr


INSPECT_ATTACKED = """
import mmap
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                        ctypes.c_void_p]
PAGE = mmap.PAGESIZE
pool = Pool(Mode.RO, name="inspect-attacked", refill=4 * PAGE)
a = pool.alloc(4 * PAGE)
pool.protect()
{attack}
print("READY", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("attack, says", [
    ("assert libc.mmap(a.address + PAGE, PAGE, 1, 0x32, -1, 0) == a.address + PAGE",
     "was replaced"),
    ("elsewhere = libc.mmap(None, PAGE, 0, 0x22, -1, 0)\n"
     "assert libc.mremap(a.address + 3 * PAGE, PAGE, PAGE, 3, elsewhere) == elsewhere",
     "also mapped at"),
], ids=["map-fixed", "mremap"])
def test_inspect_reports_changed_mappings(attack, says):
    from conftest import CHILD_PRELUDE
    from test_production import run_cli

    source = CHILD_PRELUDE + textwrap.dedent(INSPECT_ATTACKED.format(attack=attack))
    with subprocess.Popen([sys.executable, "-c", source], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout.readline().strip() == "READY"
            proc = run_cli("inspect", str(child.pid))
        finally:
            child.stdin.close()
            child.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" in proc.stdout and says in proc.stdout, proc.stdout


def test_inspect_reports_nothing_for_untouched_pools(pool_factory):
    from prmem.inspect import anomalies

    for mode in Mode:
        pool = pool_factory(mode, name=f"inspect-clean-{mode.name}", refill=4096)
        pool.alloc(10)
        pool.protect()
        pool.alloc(5000)
    assert [a for a in anomalies(os.getpid()) if "inspect-clean" in a] == []


# ------------------------------------------- found by the lock-rule audit

def test_long_non_ascii_name_keeps_typed_errors(pool_factory):
    # error messages cut the name at 200 bytes, maybe inside a character
    pool = pool_factory(Mode.RO, name="€" * 100, refill=4096)
    a = pool.alloc(16)
    pool.destroy()
    with pytest.raises(prmem.PoolDestroyedError):
        a[0] = 1
    from prmem.inspect import mappings
    other = pool_factory(Mode.RO, name="x" + "€" * 100, refill=4096)
    other.alloc(8)
    assert any(m.pool.startswith("x€") for m in mappings(os.getpid()))


def test_strided_store_from_an_overlapping_view(pool_factory):
    pool = pool_factory(Mode.RO, name="strided", refill=4096)
    a = pool.alloc(8)
    a.write(b"12345678")
    reference = bytearray(b"12345678")
    reference[0:8:2] = memoryview(reference)[1:5]
    with memoryview(a) as view:
        a[0:8:2] = view[1:5]
    assert bytes(a) == bytes(reference)


SIGLONGJMP_NEIGHBOUR = r"""
import faulthandler
# a handler that is not prmem's and survives faults by siglongjmp()
import subprocess, tempfile
src = '''
#include <setjmp.h>
#include <signal.h>
#include <string.h>
static sigjmp_buf env;
static void on_segv(int sig) { (void)sig; siglongjmp(env, 1); }
int install(void) {
    struct sigaction sa; memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_segv; sa.sa_flags = SA_NODEFER;
    return sigaction(SIGSEGV, &sa, 0);
}
int probe(volatile char *p) {
    if (sigsetjmp(env, 1)) return 1;
    (void)*p;
    return 0;
}
'''
d = tempfile.mkdtemp()
with open(d + "/probe.c", "w") as f:
    f.write(src)
subprocess.run(["cc", "-shared", "-fPIC", "-o", d + "/probe.so", d + "/probe.c"], check=True)
lib = ctypes.CDLL(d + "/probe.so")
lib.probe.argtypes = [ctypes.c_void_p]
assert lib.install() == 0
pool = Pool(Mode.RO, name="neighbour", refill=4096)   # prmem's handler goes on top
a = pool.alloc(8)
pool.protect()
for _ in range(3):
    assert lib.probe(16) == 1     # a fault outside prmem memory, recovered
print("OK")
"""


def test_fault_handler_survives_a_neighbour_that_longjmps():
    import shutil
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler")
    result = run_child(SIGLONGJMP_NEIGHBOUR)
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert result.stdout.strip().endswith("OK")


FORK_TWICE = FORK_NO_FILES.split("pid = os.fork()")[0] + """
pid = os.fork()
if pid == 0:
    for fd in hog:
        os.close(fd)          # the snapshot child may have descriptors again
    pid2 = os.fork()
    if pid2 == 0:
        os._exit(0 if bytes(w[:16]) == b"rare-before-fork" else 3)
    _, status = os.waitpid(pid2, 0)
    os._exit(os.WEXITSTATUS(status))
_, status = os.waitpid(pid, 0)
assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
print("OK")
"""


def test_grandchild_of_a_snapshot_child_keeps_the_data():
    result = run_child(FORK_TWICE)
    assert result.returncode == 0, (result.returncode, result.stderr)


@needs_memfd
def test_destroy_frees_and_zeroes_the_pages(pool_factory):
    pool = pool_factory(Mode.WR, name="punch-on-destroy", refill=1 << 20)
    a = pool.alloc(1 << 20)
    with memoryview(a) as view:
        view[:] = b"\xab" * (1 << 20)
    pool.protect()
    kept = os.dup(pool_fds("punch-on-destroy")[0])  # as code that kept a descriptor would
    try:
        assert os.fstat(kept).st_blocks > 0
        pool.destroy()
        assert os.fstat(kept).st_blocks == 0        # the pages went back to the kernel
        assert os.pread(kept, 1 << 20, 0) == bytes(1 << 20)
    finally:
        os.close(kept)


def test_info_reports_the_shmem_huge_page_setting():
    from prmem.info import describe, shmem_thp
    try:
        with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") as f:
            text = f.read()
        expected = text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        expected = "unknown"
    assert shmem_thp() == expected
    assert any(f"(shmem_enabled): {expected}" in line for line in describe())


LARGE_RARE_WRITES = """
import threading
pools = [Pool(Mode.WR, name="big-rare-%d" % i, refill=1 << 20) for i in range(2)]
allocs = [p.alloc(256 << 10) for p in pools]
for p in pools:
    p.protect()
errors = []
def writer(k):
    try:
        for i in range(60):
            a = allocs[(k + i) % 2]
            fill = bytes([(k * 60 + i) % 251]) * len(a)
            prmem.rare_write(a, fill)          # 256 KiB: the GIL is released meanwhile
            assert len(set(bytes(a))) >= 1
    except BaseException as e:
        errors.append(e)
threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
for t in threads:
    t.start()
for _ in range(20):                  # fork while writes are in flight: no deadlock
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
for t in threads:
    t.join()
assert not errors, errors
for a in allocs:
    data = bytes(a)
    assert data == data[:1] * len(data)      # each write is whole: one pwrite under the lock
prmem.rare_write(allocs[0], b"\\x07" * (256 << 10))
assert bytes(allocs[0]) == b"\\x07" * (256 << 10)
print("OK")
"""


def test_large_rare_writes_release_the_gil_safely():
    result = run_child(LARGE_RARE_WRITES, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert result.stdout.strip().endswith("OK")


def test_view_released_after_a_deferred_destroy():
    # leaving `with Pool()` on an exception defers destroy() to the last view
    result = run_child("""
        view = None
        try:
            with Pool(Mode.RO, name="deferred", refill=4096) as pool:
                view = memoryview(pool.alloc(64))     # writable: WRITABLE memory
                raise KeyError("original")
        except KeyError:
            pass
        assert not pool.destroyed
        view.release()                                # the pool goes now
        assert pool.destroyed
        print("OK")
    """)
    assert result.returncode == 0, (result.returncode, result.stderr)


def test_thaw_refuses_a_blob_shared_by_many_slots(pool_factory):
    import struct
    size, count = 1 << 20, 256
    blob = struct.pack("<Q", size) + b"A" * size
    node_off = 48 + len(blob)
    node = struct.pack("<Q", count) + struct.pack("<IIQ", 7, 0, 48) * count
    total = node_off + len(node)
    header = struct.pack("<QQQQ", 0x00315a52464d5250, total, 1, 0) + \
        struct.pack("<IIQ", 8, 0, node_off)
    pool = pool_factory(Mode.RO, name="blob-amplifier")
    a = pool.alloc(total)
    a[:] = header + blob + node
    forged = prmem._core.open_frozen(a)
    with pytest.raises(prmem.CorruptionError, match="share"):
        forged.thaw()
    assert len(forged[0]) == size               # one item at a time is fine
