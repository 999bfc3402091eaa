"""``prmem selftest``: prove each protection on the running kernel.

Every scenario runs in a fresh child interpreter and does the real thing: a
native write through ctypes that the MMU must stop (the child dies by
SIGSEGV), a write through prmem's API that must raise, or a syscall the
kernel must refuse (mprotect, pwrite on the pool's memfd, /proc/self/mem).
Nothing is mocked and no flag is merely read back.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
from typing import FrozenSet, List, Tuple

# Code shared by every child.  `outcome(x)` reports a non-fatal result;
# `armed()` is printed just before a write that must kill the child, so a
# child that dies earlier (e.g. at import) is not mistaken for a success.
CHILD_PRELUDE = r'''
import ctypes, errno, os, sys, threading
import prmem
from prmem import Mode, Pool
from prmem._probes import mapping_at, writable_alias, writable_fds

libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
PROT_READ, PROT_WRITE = 1, 2

def outcome(text):
    print("OUTCOME:" + text, flush=True)

def armed():
    print("ARMED", flush=True)

def native_write(alloc, data=b"!"):
    ctypes.memmove(alloc.address, data, len(data))

def errno_name(e):
    return errno.errorcode.get(e, str(e))

def try_python_write(alloc):
    try:
        alloc.write(b"!")
    except prmem.ProtectionError:
        return "ProtectionError"
    return "written" if alloc[0] == ord("!") else "not written"

def try_mprotect_write(alloc):
    page = alloc.address & ~(prmem.page_size - 1)
    if libc.mprotect(page, prmem.page_size, PROT_READ | PROT_WRITE) == 0:
        return "allowed"
    return errno_name(ctypes.get_errno())

def try_fd_pwrite(alloc):
    fds = writable_fds(alloc.address)
    if not fds:
        return "no descriptor"
    results = set()
    for fd in fds:
        try:
            os.pwrite(fd, b"!", 0)
            results.add("written")
        except OSError as e:
            results.add(errno_name(e.errno))
        finally:
            os.close(fd)
    return "written" if "written" in results else "/".join(sorted(results))

def try_proc_mem_write(alloc):
    fd = os.open("/proc/self/mem", os.O_RDWR)
    try:
        os.pwrite(fd, b"!", alloc.address)
    except OSError as e:
        return errno_name(e.errno)
    finally:
        os.close(fd)
    return "written"

def filled(mode, name="selftest", protect=True):
    pool = Pool(mode, name=name)
    a = pool.alloc(64)
    if pool.mode is not Mode.START_WR:
        a.write(b"original")
    if protect:
        pool.protect()
    return pool, a
'''


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One protection claim: what the child does, and what must happen."""

    name: str
    expected: str
    code: str
    #: kernel features (prmem.features names) the claim depends on
    requires: FrozenSet[str] = frozenset()
    #: text the child's stderr must contain for the outcome to count
    stderr_must: Tuple[str, ...] = ()
    #: other outcomes that show the claim holds just as well (e.g. no
    #: descriptor of sealed memory can be had at all without privileges)
    also_ok: Tuple[str, ...] = ()


def _native(mode: str, setup: str = "pool, a = filled(Mode.{mode})") -> str:
    return setup.format(mode=mode) + "\narmed()\nnative_write(a)\noutcome('written')\n"


_SEALED = frozenset({"memfd", "memfd_seal_future_write"})

_AUTO_PREVIOUS = """
pool = Pool(Mode.{mode}, name="selftest", refill=4096)
a = pool.alloc(4096)
a.write(b"original")
pool.alloc(16)  # does not fit: opens a new area, auto-protecting a's
"""

SCENARIOS: List[Scenario] = [
    # --- writable memory is writable (the control cases)
    Scenario("RO pool: native write before protect()", "written",
             _native("RO", "pool, a = filled(Mode.RO, protect=False)")),
    Scenario("WR pool: Python write before protect()", "written",
             "pool, a = filled(Mode.WR, protect=False)\noutcome(try_python_write(a))"),
    Scenario("RO pool: new allocation after protect() is writable", "written",
             "pool, a = filled(Mode.RO)\nb = pool.alloc(8)\n"
             "native_write(b)\noutcome('written' if b[0] == ord('!') else 'lost')"),
    # --- READ_ONLY (sealed) memory
    Scenario("RO pool after protect(): native write", "SIGSEGV", _native("RO")),
    Scenario("RO pool after protect(): Python write", "ProtectionError",
             "pool, a = filled(Mode.RO)\noutcome(try_python_write(a))"),
    Scenario("RO pool after protect(): mprotect(PROT_WRITE)", "EACCES",
             "pool, a = filled(Mode.RO)\noutcome(try_mprotect_write(a))",
             requires=_SEALED),
    Scenario("RO pool after protect(): pwrite on a descriptor of it", "EPERM",
             "pool, a = filled(Mode.RO)\noutcome(try_fd_pwrite(a))",
             requires=_SEALED, also_ok=("no descriptor",)),
    Scenario("RO pool: protect() with a writable alias mapped before", "ProtectionError", """
pool, a = filled(Mode.RO, protect=False)
alias = writable_alias(a.address)
try:
    pool.protect()
    outcome("protected")
except prmem.ProtectionError:
    outcome("ProtectionError" if a.state is prmem.State.WRITABLE else "half-protected")
""", requires=_SEALED),
    Scenario("RO pool after protect(): write via /proc/self/mem", "EIO",
             "pool, a = filled(Mode.RO)\noutcome(try_proc_mem_write(a))"),
    Scenario("AUTO_RO pool: native write to the auto-protected area", "SIGSEGV",
             _native("AUTO_RO", _AUTO_PREVIOUS)),
    Scenario("AUTO_RO pool after protect(): native write", "SIGSEGV", _native("AUTO_RO")),
    # --- WRITE_RARE memory
    Scenario("WR pool after protect(): native write", "SIGSEGV", _native("WR")),
    Scenario("WR pool after protect(): Python write", "ProtectionError",
             "pool, a = filled(Mode.WR)\noutcome(try_python_write(a))"),
    Scenario("WR pool after protect(): rare_write", "written",
             "pool, a = filled(Mode.WR)\nprmem.rare_write(a, b'!')\n"
             "outcome('written' if a[0] == ord('!') else 'lost')"),
    Scenario("WR pool after protect(): write via /proc/self/mem", "EIO",
             "pool, a = filled(Mode.WR)\noutcome(try_proc_mem_write(a))"),
    Scenario("AUTO_WR pool: native write to the auto-protected area", "SIGSEGV",
             _native("AUTO_WR", _AUTO_PREVIOUS)),
    Scenario("START_WR pool: native write right after alloc", "SIGSEGV",
             _native("START_WR", "pool, a = filled(Mode.START_WR, protect=False)")),
    Scenario("START_WR pool: Python write right after alloc", "ProtectionError",
             "pool, a = filled(Mode.START_WR, protect=False)\noutcome(try_python_write(a))"),
    Scenario("rare_write from one thread, native write from another", "SIGSEGV", """
pool, a = filled(Mode.WR)
stop = False
def writer():
    while not stop:
        pool.rare_write(a, b"rare")
t = threading.Thread(target=writer, daemon=True)
t.start()
armed()
for _ in range(1000):
    native_write(a)
stop = True
outcome("written")
"""),
    # --- make_ro(): write-rare becomes sealed read-only
    Scenario("WR pool after make_ro(): native write", "SIGSEGV",
             _native("WR", "pool, a = filled(Mode.WR)\npool.make_ro()")),
    Scenario("WR pool after make_ro(): rare_write", "ProtectionError", """
pool, a = filled(Mode.WR)
pool.make_ro()
try:
    prmem.rare_write(a, b"!")
    outcome("written")
except prmem.ProtectionError:
    outcome("ProtectionError")
"""),
    Scenario("WR pool after make_ro(): mprotect(PROT_WRITE)", "EACCES",
             "pool, a = filled(Mode.WR)\npool.make_ro()\noutcome(try_mprotect_write(a))",
             requires=_SEALED),
    Scenario("WR pool after make_ro(): pwrite on a descriptor of it", "EPERM",
             "pool, a = filled(Mode.WR)\npool.make_ro()\noutcome(try_fd_pwrite(a))",
             requires=_SEALED, also_ok=("no descriptor",)),
    # --- misuse through the API is refused, never a crash
    Scenario("protect() while a writable memoryview is alive", "BufferError", """
pool, a = filled(Mode.RO, protect=False)
view = memoryview(a)
try:
    pool.protect()
    outcome("protected")
except BufferError:
    outcome("BufferError")
"""),
    # --- after-init sections
    Scenario("ro_after_init after mark_init_done(): native write", "SIGSEGV", """
a = prmem.ro_after_init.alloc(64)
a.write(b"original")
prmem.mark_init_done()
armed()
native_write(a)
outcome("written")
"""),
    Scenario("ro_after_init after mark_init_done(): new alloc", "ProtectionError", """
prmem.mark_init_done()
try:
    prmem.ro_after_init.alloc(8)
    outcome("allocated")
except prmem.ProtectionError:
    outcome("ProtectionError")
"""),
    Scenario("wr_after_init after mark_init_done(): rare_write", "written", """
a = prmem.wr_after_init.alloc(8)
prmem.mark_init_done()
prmem.rare_write(a, b"!")
outcome("written" if a[0] == ord("!") else "lost")
"""),
]

_SECRET = frozenset({"memfd_secret"})

SCENARIOS += [
    # --- production features
    Scenario("fault report names the pool, its state and the writer", "SIGSEGV", """
pool, a = filled(Mode.RO, name="selftest-policy")
def stray_writer():
    native_write(a)
armed()
stray_writer()
outcome("written")
""", stderr_must=("pool: 'selftest-policy'", "area state: READ_ONLY", "in stray_writer")),
    Scenario("secret pool: read via /proc/self/mem", "EIO", """
pool = Pool(Mode.RO, name="selftest", secret=True)
a = pool.alloc(32)
a.write(b"key material")
fd = os.open("/proc/self/mem", os.O_RDONLY)
try:
    os.pread(fd, 8, a.address)
    outcome("read")
except OSError as e:
    outcome(errno_name(e.errno))
""", requires=_SECRET),
    Scenario("secret pool after protect(): native write", "SIGSEGV",
             _native("RO", "pool = Pool(Mode.RO, name='selftest', secret=True)\n"
                           "a = pool.alloc(32)\npool.protect()"), requires=_SECRET),
    Scenario("secret WR pool: rare_write, mapping never writable", "written", """
pool = Pool(Mode.WR, name="selftest", secret=True)
a = pool.alloc(32)
pool.protect()
prmem.rare_write(a, b"!")
page = a.address & ~(prmem.page_size - 1)
perms = [l.split()[1] for l in open("/proc/self/maps")
         if int(l.split("-")[0], 16) <= page < int(l.split()[0].split("-")[1], 16)]
outcome("written" if a[0] == ord("!") and perms == ["r--s"] else "wrong: %r" % perms)
""", requires=_SECRET),
    Scenario("no-access pool: native read outside access()", "SIGSEGV", """
pool = Pool(Mode.WR, name="selftest-keys", noaccess=True)
a = pool.alloc(32)
a.write(b"key material")
pool.protect()
armed()
ctypes.string_at(a.address, 1)
outcome("read")
""", stderr_must=("fatal read of no-access memory", "pool: 'selftest-keys'")),
    Scenario("no-access pool: native read inside access()", "read", """
pool = Pool(Mode.WR, name="selftest", noaccess=True)
a = pool.alloc(32)
a.write(b"key material")
pool.protect()
with pool.access():
    outcome("read" if ctypes.string_at(a.address, 3) == b"key" else "wrong")
"""),
    Scenario("prmem's metadata: native write to a pool's record", "SIGSEGV", """
pool, a = filled(Mode.WR)
record = pool._metadata_address()
armed()
ctypes.memset(record + 8, 0x41, 8)
outcome("written")
"""),
    Scenario("prmem's root after import: native write", "SIGSEGV", """
from prmem import _core
root = _core._root()[0]
armed()
ctypes.memset(root, 0x41, 8)
outcome("written")
"""),
    Scenario("WR pool: rare_write after dup2() over the pool's descriptor", "ProtectionError",
             """
import tempfile
pool, a = filled(Mode.WR)
other = tempfile.TemporaryFile()
other.write(b"O" * 4096)
other.flush()
inode = mapping_at(a.address)[2]  # the pool's memory file
replaced = 0
for fd in os.listdir("/proc/self/fd"):
    try:
        if int(fd) != other.fileno() and os.fstat(int(fd)).st_ino == inode:
            os.dup2(other.fileno(), int(fd))
            replaced += 1
    except OSError:
        pass
assert replaced, "no descriptor of the pool's memory file"
try:
    prmem.rare_write(a, b"!")
    result = "written"
except prmem.ProtectionError:
    result = "ProtectionError"
other.seek(0)
outcome(result if other.read() == b"O" * 4096 else "written into another file")
"""),
    Scenario("fork: a child's view of shared write-rare memory: mprotect(PROT_WRITE)",
             "EACCES", """
pool, a = filled(Mode.WR)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(w, try_mprotect_write(a).encode())
    os._exit(0)
os.waitpid(pid, 0)
outcome(os.read(r, 64).decode())
"""),
    Scenario("fork: each process sees only its own writes", "isolated", """
pool, a = filled(Mode.WR)
plain = pool.alloc(8)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    prmem.rare_write(a, b"child")
    plain.write(b"child")
    os.write(w, b".")
    os._exit(0)
os.read(r, 1)
os.waitpid(pid, 0)
prmem.rare_write(a, b"paren")
outcome("isolated" if bytes(a[:8]) == b"parennal" and bytes(plain[:5]) == bytes(5)
        else "shared: %r %r" % (bytes(a[:8]), bytes(plain[:5])))
"""),
]


def _mseal_scenario() -> Scenario:
    return Scenario("seal=True pool after protect(): munmap", "EPERM", requires=frozenset({"mseal"}), code="""
pool = Pool(Mode.RO, name="selftest", seal=True)
a = pool.alloc(64)
pool.protect()
if libc.munmap(a.address & ~(prmem.page_size - 1), prmem.page_size) == 0:
    outcome("unmapped")
else:
    outcome(errno_name(ctypes.get_errno()))
""")


@dataclasses.dataclass
class Result:
    """What a scenario's child actually did."""

    scenario: Scenario
    observed: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return (self.observed == self.scenario.expected
                or self.observed in self.scenario.also_ok)


def _classify(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stdout.splitlines()
    outcomes = [ln.split(":", 1)[1] for ln in lines if ln.startswith("OUTCOME:")]
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        # A fault only counts if the child got as far as the forbidden write.
        return sig if "ARMED" in lines else f"{sig} before the test write"
    if outcomes:
        return outcomes[-1]
    return f"exit {proc.returncode}"


def run_scenario(scenario: Scenario, timeout: float = 60.0) -> Result:
    """Run one scenario in a fresh child interpreter and classify the result."""
    source = CHILD_PRELUDE + textwrap.dedent(scenario.code)
    env = dict(os.environ)
    env.pop("PYTHONFAULTHANDLER", None)  # keep the child's death quiet
    try:
        proc = subprocess.run([sys.executable, "-c", source], capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return Result(scenario, "timeout")
    observed = _classify(proc)
    missing = [text for text in scenario.stderr_must if text not in proc.stderr]
    if missing:
        observed += f" (stderr lacks {missing[0]!r})"
    return Result(scenario, observed, proc.stderr.strip())


def all_scenarios() -> List[Scenario]:
    """Every scenario, including those needing features this kernel lacks."""
    return list(SCENARIOS) + [_mseal_scenario()]


def run_selftest(verbose: bool = False) -> int:
    """Run every scenario, print a table, return 0 only if all held."""
    import prmem
    from .info import kernel_release

    scenarios = all_scenarios()
    runnable = [s for s in scenarios if s.requires <= prmem.features]
    skipped = [s for s in scenarios if not s.requires <= prmem.features]
    print(f"prmem {prmem.__version__} selftest on Linux {kernel_release()}, "
          f"page size {prmem.page_size}, features: {', '.join(sorted(prmem.features)) or 'none'}")
    if not prmem.enforced:
        print("!" * 72)
        print("! ENFORCEMENT IS OFF: PRMEM_ENFORCE=0 is set. Pools behave the same through")
        print("! the API, but no page is write-protected: the protections below do NOT hold.")
        print("!" * 72)
    for s in skipped:
        print(f"WARNING: not provable here, this kernel lacks "
              f"{', '.join(sorted(s.requires - prmem.features))}: {s.name}")
    workers = max(2, os.cpu_count() or 2)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as ex:
        results = list(ex.map(run_scenario, runnable))
    width = max(len(s.name) for s in scenarios)
    print()
    print(f"{'scenario':<{width}}  {'expected':<16} {'observed':<16} result")
    print(f"{'-' * width}  {'-' * 16} {'-' * 16} ------")
    for r in results:
        print(f"{r.scenario.name:<{width}}  {r.scenario.expected:<16} {r.observed:<16} "
              f"{'ok' if r.ok else 'FAIL'}")
        if verbose and not r.ok and r.detail:
            print(textwrap.indent(r.detail, "    | "))
    for s in skipped:
        print(f"{s.name:<{width}}  {s.expected:<16} {'-':<16} SKIPPED (kernel lacks "
              f"{', '.join(sorted(s.requires - prmem.features))})")
    failed = [r for r in results if not r.ok]
    print()
    if failed:
        print(f"{len(failed)} of {len(results)} protections did NOT hold on this machine")
        return 1
    print(f"all {len(results)} protections hold on this machine"
          + (f" ({len(skipped)} not available on this kernel, see the warnings)"
             if skipped else ""))
    return 0
