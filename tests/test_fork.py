"""After fork(), parent and child behave as with ordinary memory.

Pool memory is a shared mapping of a memory file; without care a child and
its parent would see each other's writes.  Each scenario runs in a fresh
interpreter (run_child) that does the real fork.
"""
from __future__ import annotations

import os
import shutil
import signal

import pytest

from conftest import run_child


def _ok(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_rare_and_plain_writes_stay_in_their_process():
    out = _ok(run_child("""
pool = Pool(Mode.WR, name="forked")
rare = pool.alloc(8)
rare.write(b"original")
pool.protect()
plain = pool.alloc(8)
plain.write(b"original")
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    prmem.rare_write(rare, b"child---")
    plain.write(b"child---")
    os.write(w, b"x")
    import time; time.sleep(0.2)   # let the parent write too
    ok = bytes(rare) == b"child---" and bytes(plain) == b"child---"
    os._exit(0 if ok else 3)
os.read(r, 1)                       # the child has written
assert bytes(rare) == b"original" and bytes(plain) == b"original"
prmem.rare_write(rare, b"parent--")
plain.write(b"parent--")
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
assert bytes(rare) == b"parent--" and bytes(plain) == b"parent--"
print("OK")
"""))
    assert "OK" in out


def test_child_allocates_and_protects_inherited_pools_independently():
    out = _ok(run_child("""
pool = Pool(Mode.RO, name="inherited")
a = pool.alloc(16)
a.write(b"parent data")
pid = os.fork()
if pid == 0:
    b = pool.alloc(4096)
    b.write(b"child only")
    pool.protect()
    ok = a.state == State.READ_ONLY and bytes(a[:11]) == b"parent data"
    try:
        a.write(b"x")
        ok = False
    except prmem.ProtectionError:
        pass
    os._exit(0 if ok and pool.stats().allocations == 2 else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0
# The child's protect() and allocation did not touch the parent's pool.
assert a.state == State.WRITABLE and pool.stats().allocations == 1
a.write(b"still writable")
print("OK", [l.split()[1] for l in open("/proc/self/maps") if "prmem:inherited" in l])
"""))
    assert "OK" in out and "'rw-s'" in out


def test_protection_holds_in_the_child():
    proc = run_child("""
pool = Pool(Mode.WR, name="forked")
a = pool.alloc(8)
pool.protect()
pid = os.fork()
if pid == 0:
    native_write(a)
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("child signal", os.WTERMSIG(status) if os.WIFSIGNALED(status) else None)
""")
    assert proc.returncode == 0, proc.stderr
    assert f"child signal {int(signal.SIGSEGV)}" in proc.stdout


def test_sealed_memory_stays_readable_and_sealed_in_the_child():
    out = _ok(run_child("""
pool = Pool(Mode.RO, name="sealed")
a = pool.strdup("policy v1")
pool.protect()
pid = os.fork()
if pid == 0:
    ok = bytes(a) == b"policy v1\\0"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    ok = ok and libc.mprotect(a.address & ~4095, 4096, 3) != 0
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
print("OK" if os.waitstatus_to_exitcode(status) == 0 else "FAIL")
"""))
    assert "OK" in out


def test_multiprocessing_fork_context():
    out = _ok(run_child("""
import multiprocessing as mp

pool = Pool(Mode.START_WR, name="mp")
counter = pool.zalloc(8)

def work(q):
    prmem.rare_write(counter, (42).to_bytes(8, "little"))
    q.put(int.from_bytes(bytes(counter), "little"))

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=work, args=(q,))
    p.start()
    seen = q.get(timeout=30)
    p.join(30)
    print("child", seen, "parent", int.from_bytes(bytes(counter), "little"), p.exitcode)
"""))
    assert "child 42 parent 0 0" in out


def test_pool_locks_are_usable_in_the_child_while_parent_threads_allocate():
    out = _ok(run_child("""
import threading
pool = Pool(Mode.WR, name="busy")
stop = False
def churn():
    while not stop:
        pool.alloc(64)
threads = [threading.Thread(target=churn) for _ in range(2)]
for t in threads:
    t.start()
codes = []
for _ in range(10):
    pid = os.fork()
    if pid == 0:
        a = pool.alloc(16)       # would hang if a lock were inherited held
        a.write(b"ok")
        pool.protect()
        os._exit(0)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
stop = True
for t in threads:
    t.join()
print("codes", set(codes))
""", timeout=120))
    assert "codes {0}" in out


# --- copy on first change -------------------------------------------------
# A chunk that only prmem can change (WRITE_RARE, MMU-only READ_ONLY) stays
# shared after fork(); each process copies it just before its first change.
# The helpers below read which file backs the pool from /proc/self/maps, so
# the tests see when a copy was made, not only that the data is right.

LAZY_PRELUDE = """
def backing(name):
    # the inode of the memory file mapped at the pool's first readable range
    with open("/proc/self/maps") as f:
        for line in f:
            if "prmem:" + name in line and line.split()[1].startswith("r"):
                return int(line.split()[4])
    return None

def wr_pool(name, size=1 << 20, fill=b"A"):
    pool = Pool(Mode.WR, name=name)
    a = pool.alloc(size)
    a.write(fill * size)
    pool.protect()
    return pool, a
"""


def test_fork_leaves_write_rare_memory_shared_until_the_first_change():
    out = _ok(run_child(LAZY_PRELUDE + """
pool, a = wr_pool("lazy")
before = backing("lazy")
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    same_file = backing("lazy") == before          # nothing copied at fork()
    pool.rare_write(a, b"child", 0)                # the first change: a copy
    copied = backing("lazy") not in (None, before)
    os.write(w, b"x")
    import time; time.sleep(0.3)                   # the parent writes meanwhile
    ok = same_file and copied and bytes(a[:5]) == b"child" and bytes(a[5:8]) == b"AAA"
    os._exit(0 if ok else 3)
os.read(r, 1)
assert bytes(a[:5]) == b"AAAAA"                    # the child's write stayed there
pool.rare_write(a, b"parent", 0)
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
assert bytes(a[:6]) == b"parent"
print("OK")
"""))
    assert "OK" in out


def test_parent_copies_before_changing_memory_a_live_child_shares():
    out = _ok(run_child(LAZY_PRELUDE + """
pool, a = wr_pool("live")
before = backing("live")
go_r, go_w = os.pipe()
pid = os.fork()
if pid == 0:
    os.read(go_r, 1)                                # the parent has written
    ok = bytes(a[:8]) == b"AAAAAAAA" and backing("live") == before
    os._exit(0 if ok else 3)
pool.rare_write(a, b"parent--", 0)
assert backing("live") not in (None, before)                   # the parent made its own copy
assert bytes(a[:8]) == b"parent--" and bytes(a[8:16]) == b"AAAAAAAA"
os.write(go_w, b"x")
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
print("OK")
"""))
    assert "OK" in out


def test_parent_writes_in_place_once_its_children_are_gone():
    out = _ok(run_child(LAZY_PRELUDE + """
import subprocess, sys
pool, a = wr_pool("gone")
before = backing("gone")
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
pool.rare_write(a, b"x", 0)
assert backing("gone") == before, "copied although the child had exited"
# a fork()ed child that exec()s: preexec_fn makes subprocess use fork()
subprocess.run([sys.executable, "-c", "pass"], preexec_fn=lambda: None, check=True)
pool.rare_write(a, b"y", 0)
assert backing("gone") == before, "copied although the child had exec()ed"
assert bytes(a[:2]) == b"yA"
print("OK")
"""))
    assert "OK" in out


def test_a_grandchild_keeps_the_parent_from_writing_in_place():
    out = _ok(run_child(LAZY_PRELUDE + """
pool, a = wr_pool("family")
before = backing("family")
go_r, go_w = os.pipe()
child = os.fork()
if child == 0:
    grandchild = os.fork()
    if grandchild == 0:
        os.read(go_r, 1)                           # the grandparent has written
        os._exit(0 if bytes(a[:4]) == b"AAAA" else 3)
    os._exit(0)                                    # the child leaves, unchanged
os.waitpid(child, 0)
pool.rare_write(a, b"gp", 0)
assert backing("family") not in (None, before)                 # the grandchild still maps it
os.write(go_w, b"x")
assert bytes(a[:4]) == b"gpAA"
print("OK")
"""))
    assert "OK" in out


def test_grandchild_isolation_is_checked_by_its_own_parent():
    out = _ok(run_child(LAZY_PRELUDE + """
pool, a = wr_pool("family2")
go_r, go_w = os.pipe()
child = os.fork()
if child == 0:
    grandchild = os.fork()
    if grandchild == 0:
        os.read(go_r, 1)
        os._exit(0 if bytes(a[:4]) == b"AAAA" else 3)
    pool.rare_write(a, b"ch", 0)                   # the child's copy
    os.write(go_w, b"x")
    code = os.waitstatus_to_exitcode(os.waitpid(grandchild, 0)[1])
    os._exit(code)
code = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
assert code == 0, code
assert bytes(a[:4]) == b"AAAA"
print("OK")
"""))
    assert "OK" in out


def test_sealing_in_one_process_leaves_the_other_free_to_write():
    out = _ok(run_child(LAZY_PRELUDE + """
pool, a = wr_pool("seal")
go_r, go_w = os.pipe()
done_r, done_w = os.pipe()
pid = os.fork()
if pid == 0:
    pool.make_ro()                                 # the child seals its copy
    os.write(done_w, b"x")
    os.read(go_r, 1)
    try:
        pool.rare_write(a, b"no", 0)
        os._exit(4)
    except prmem.ProtectionError:
        pass
    os._exit(0 if bytes(a[:2]) == b"AA" else 3)
os.read(done_r, 1)
pool.rare_write(a, b"ok", 0)                       # the parent's file is not sealed
assert bytes(a[:2]) == b"ok"
os.write(go_w, b"x")
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
# and the other way round: the parent seals while a child shares
pid = os.fork()
if pid == 0:
    os.read(go_r, 1)
    pool.rare_write(a, b"c2", 0)
    os._exit(0 if bytes(a[:2]) == b"c2" else 3)
pool.make_ro()
os.write(go_w, b"x")
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
assert bytes(a[:2]) == b"ok"
print("OK")
"""))
    assert "OK" in out


def test_allocations_after_fork_go_to_memory_of_their_own():
    out = _ok(run_child(LAZY_PRELUDE + """
pool, a = wr_pool("grow", size=4096)
go_r, go_w = os.pipe()
done_r, done_w = os.pipe()
pid = os.fork()
if pid == 0:
    b = pool.alloc(64)
    b.write(b"c" * 64)
    os.write(done_w, b"x")
    os.read(go_r, 1)
    os._exit(0 if bytes(b) == b"c" * 64 else 3)
os.read(done_r, 1)
b = pool.alloc(64)
b.write(b"p" * 64)
os.write(go_w, b"x")
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
assert bytes(b) == b"p" * 64
print("OK")
"""))
    assert "OK" in out


def test_destroy_while_a_child_shares_leaves_the_child_its_data():
    out = _ok(run_child(LAZY_PRELUDE + """
pool, a = wr_pool("bye", size=1 << 16, fill=b"D")
go_r, go_w = os.pipe()
pid = os.fork()
if pid == 0:
    os.read(go_r, 1)                               # the parent has destroyed it
    os._exit(0 if bytes(a[:4]) == b"DDDD" and bytes(a[-4:]) == b"DDDD" else 3)
pool.destroy()
os.write(go_w, b"x")
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
print("OK")
"""))
    assert "OK" in out


def test_a_failed_private_copy_writes_nothing_and_can_be_retried():
    out = _ok(run_child(LAZY_PRELUDE + """
import resource
pool, a = wr_pool("nofile")
pid = os.fork()
if pid == 0:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = []
    try:
        while True:
            held.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    try:
        pool.rare_write(a, b"zz", 0)
        os._exit(4)
    except OSError as e:
        msg = str(e)
    ok = "private copy" in msg and bytes(a[:2]) == b"AA"
    for fd in held:
        os.close(fd)
    pool.rare_write(a, b"zz", 0)
    os._exit(0 if ok and bytes(a[:2]) == b"zz" else 3)
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
assert bytes(a[:2]) == b"AA"
print("OK")
"""))
    assert "OK" in out


def test_readers_in_other_threads_never_fault_while_the_parent_copies():
    out = _ok(run_child(LAZY_PRELUDE + """
import threading
pool, a = wr_pool("readers", size=8 << 20, fill=b"R")
view = memoryview(a)
go_r, go_w = os.pipe()
pid = os.fork()
if pid == 0:
    os.read(go_r, 1)
    os._exit(0)
stop = False
bad = []
def reader():
    while not stop:
        if view[4096 * 7] != ord("R") or view[-1] != ord("R"):
            bad.append(1)
threads = [threading.Thread(target=reader) for _ in range(2)]
for t in threads:
    t.start()
pool.rare_write(a, b"W", 0)                        # copies under the readers
stop = True
for t in threads:
    t.join()
os.write(go_w, b"x")
os.waitpid(pid, 0)
view.release()
print("OK", len(bad))
"""))
    assert "OK 0" in out


NO_WRITABLE_PATH = LAZY_PRELUDE + """
pool, a = wr_pool("nopath")
pid = os.fork()
if pid == 0:
    import errno
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    checks = {}
    checks["mprotect"] = (libc.mprotect(a.address, 4096, 3) != 0
                          and ctypes.get_errno() == errno.EACCES)
    try:
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(a.address)
            mem.write(b"Z")
        checks["proc_mem"] = False
    except OSError:
        checks["proc_mem"] = True
    from prmem._probes import mapping_at
    inode = mapping_at(a.address)[2]
    held_rw, reopened = [], []
    for entry in os.listdir("/proc/self/fd"):
        try:
            if os.stat("/proc/self/fd/" + entry).st_ino != inode:
                continue
        except OSError:
            continue
        with open("/proc/self/fdinfo/" + entry) as f:
            flags = int(f.read().split("flags:")[1].split()[0], 8)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            held_rw.append(entry)
        try:  # and for real: a write through the descriptor it holds fails
            os.pwrite(int(entry), b"Z", 0)
            held_rw.append(entry)
        except OSError:
            pass
        try:
            os.close(os.open("/proc/self/fd/" + entry, os.O_RDWR))
            reopened.append(entry)
        except PermissionError:
            pass
    checks["no_rw_descriptor"] = not held_rw
    checks["no_reopen"] = not reopened or os.geteuid() == 0
    checks["data"] = bytes(a[:2]) == b"AA"
    print(checks, flush=True)
    os._exit(0 if all(checks.values()) else 3)
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
assert bytes(a[:2]) == b"AA"
print("OK")
"""


def test_a_child_has_no_writable_path_to_memory_it_shares_with_its_parent():
    out = _ok(run_child(NO_WRITABLE_PATH))
    assert "OK" in out


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run the check as an unprivileged user")
def test_an_unprivileged_child_cannot_reopen_its_parents_file_for_writing():
    import subprocess
    import sys
    from conftest import CHILD_PRELUDE
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-c", CHILD_PRELUDE + NO_WRITABLE_PATH],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "'no_reopen': True" in proc.stdout and "OK" in proc.stdout


def test_a_native_write_in_the_child_dies_and_leaves_the_parent_intact():
    out = _ok(run_child(LAZY_PRELUDE + """
pool, a = wr_pool("stray")
pid = os.fork()
if pid == 0:
    prmem.fault_report(False)
    native_write(a, b"Z")
    os._exit(0)
_, status = os.waitpid(pid, 0)
assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV, status
assert bytes(a[:2]) == b"AA"
print("OK")
"""))
    assert "OK" in out


def test_large_areas_keep_asking_for_huge_pages_through_every_re_map():
    # MADV_HUGEPAGE is a property of a mapping: protect() (sealing re-maps),
    # the child's read-only re-map at fork() and a copy on first change all
    # make new mappings, which must ask again (whether the kernel then uses
    # huge pages depends on shmem_enabled; prmem info reports it)
    out = _ok(run_child("""
def vmflags(address):
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and ":" not in head[0]:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("VmFlags:"):
                return head[1:]
seen = []
for mode in (Mode.RO, Mode.WR):
    pool = Pool(mode, name="huge")
    a = pool.alloc(4 << 20)
    small = Pool(mode, name="small").alloc(4096)
    a.write(b"h" * (4 << 20))
    seen.append("hg" in vmflags(a.address) and "hg" not in vmflags(small.address))
    pool.protect()
    seen.append("hg" in vmflags(a.address))
    pid = os.fork()
    if pid == 0:
        ok = "hg" in vmflags(a.address)
        if mode == Mode.WR:
            pool.rare_write(a, b"c")          # the child's copy
            ok = ok and "hg" in vmflags(a.address)
        os._exit(0 if ok else 3)
    seen.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0)
print("seen", seen)
"""))
    assert "seen [True, True, True, True, True, True]" in out


def test_fork_finds_every_live_pool_among_many_created_and_freed():
    # the fork handlers find pools by walking their records in prmem's
    # metadata: every live pool's writable memory must be copied, whatever
    # order pools were created and freed in (freed records are reused)
    out = _ok(run_child("""
import random
rng = random.Random(7)
pools = []
for i in range(60):
    pool = Pool(Mode.RO, name=f"p{i}")
    a = pool.alloc(16)
    a.write(b"parent-%02d" % i)
    pools.append((pool, a))
for i in rng.sample(range(60), 30):
    pools[i][0].destroy()
    pools[i] = None
del pool, a
import gc; gc.collect()
for i in range(10):                      # reuse freed records
    pool = Pool(Mode.RO, name=f"q{i}")
    a = pool.alloc(16)
    a.write(b"parent-q%d" % i)
    pools.append((pool, a))
live = [pa for pa in pools if pa is not None]
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    for pool, a in live:
        a.write(b"CHILD!")
    os.write(w, b"x")
    os._exit(0)
os.read(r, 1)
os.waitpid(pid, 0)
print("isolated", all(not bytes(a).startswith(b"CHILD!") for _, a in live), len(live))
"""))
    assert "isolated True 40" in out


def test_beyond_64_sharing_children_a_child_copies_at_fork():
    # prmem tracks at most 64 forks whose children still share memory; a
    # fork beyond that must not share (the child copies at once)
    out = _ok(run_child(LAZY_PRELUDE + """
pool, a = wr_pool("many", size=4096)
before = backing("many")
go_r, go_w = os.pipe()
kids = []
verdicts = []
for i in range(66):
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(res_w, b"S" if backing("many") == before else b"C")
        os.read(go_r, 1)                 # stay alive, sharing, until told
        os._exit(0)
    verdicts.append(os.read(res_r, 1).decode())
    os.close(res_r); os.close(res_w)
    kids.append(pid)
os.write(go_w, b"x" * len(kids))
for pid in kids:
    os.waitpid(pid, 0)
print("verdicts", "".join(verdicts))
"""))
    verdicts = out.split("verdicts ")[1].strip()
    assert verdicts[:64] == "S" * 64 and set(verdicts[64:]) == {"C"}, verdicts
