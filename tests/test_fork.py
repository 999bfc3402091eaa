"""After fork(), parent and child behave as with ordinary memory.

Pool memory is a shared mapping of a memory file; without care a child and
its parent would see each other's writes.  Each scenario runs in a fresh
interpreter (run_child) that does the real fork.
"""
from __future__ import annotations

import signal

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
