"""The pool-lock rule: no Python code runs while a prmem pool lock is held.

A pool's lock is a pthread mutex taken by a thread that holds the GIL.  If
Python code runs while it is held, two deadlocks follow:

* the same thread calls into the same pool again (a ``__repr__``, a
  ``__del__`` run by the cyclic GC, a signal handler): the mutex is not
  recursive, so the thread waits for itself forever;
* that Python code releases the GIL (``time.sleep``, I/O, the switch
  interval) and another thread takes the GIL and then waits for the pool
  lock without releasing the GIL: neither can go on.

Python code can sneak in under the lock in three ways: formatting the
pool's name into an error message (a ``str`` subclass with its own
``__repr__``); ``%R`` itself, even of an exact str, because
``PyObject_Repr()`` first runs pending signal handlers
(``PyErr_CheckSignals()``, every CPython version); and allocating the
exception object, which may start a cyclic GC collection that runs
``__del__`` methods.  The second needs CPython <= 3.11, which
collects inside the allocation that crosses the threshold, and an exception
being handled (3.11 then instantiates the new exception inside
``PyErr_Format()`` to chain it); 3.12+ defers collections to the next
bytecode boundary, so there the GC scenarios pass whatever the lock does.

Every scenario below runs in a child interpreter.  A child that does not
finish within ``HANG_AFTER`` seconds dumps the stack of every thread
(faulthandler) and exits, and the test fails with "HUNG" and those stacks;
the parent kills anything still there at ``KILL_AFTER``.  All children of
this module start at once (they block without using the CPU when they
deadlock), so a broken lock rule costs one timeout, not one per test.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from conftest import CHILD_PRELUDE

#: A child that has not finished after this many seconds is deadlocked
#: (every scenario takes well under 2 s, under the sanitizers too).
HANG_AFTER = 25
#: The parent's backstop, should the child's watchdog itself not fire.
KILL_AFTER = 35

NAME = "lockrule"
SETPRIV = shutil.which("setpriv")
MEMLOCK_LIMIT_KB = 64

# ------------------------------------------------------------ error paths

# label -> (setup, action, exception).  `setup` makes a pool named NAME (the
# variable) and whatever `action` needs; `action` is one expression that must
# raise exactly `exception` from an error path whose message names the pool.
# Most of these messages are built while the pool lock is held.
ERROR_PATHS = {
    "write to READ_ONLY": (
        "pool = Pool(Mode.RO, name=NAME); a = pool.alloc(8); pool.protect()",
        "a.write(b'x')", "ProtectionError"),
    "item assignment to WRITE_RARE": (
        "pool = Pool(Mode.WR, name=NAME); a = pool.alloc(8); pool.protect()",
        "a.__setitem__(0, 1)", "ProtectionError"),
    "writable buffer of READ_ONLY": (   # readv() asks for a PyBUF_WRITABLE buffer
        "pool = Pool(Mode.RO, name=NAME); a = pool.alloc(8); pool.protect(); "
        "zero = os.open('/dev/zero', os.O_RDONLY)",
        "os.readv(zero, [a])", "ProtectionError"),
    "rare_write in an RO pool": (
        "pool = Pool(Mode.RO, name=NAME); a = pool.alloc(8)",
        "pool.rare_write(a, b'x')", "ProtectionError"),
    "rare_write to sealed memory": (
        "pool = Pool(Mode.WR, name=NAME); a = pool.alloc(8); pool.make_ro()",
        "prmem.rare_write(a, b'x')", "ProtectionError"),
    "protect with a writable view": (
        "pool = Pool(Mode.RO, name=NAME); a = pool.alloc(8); view = memoryview(a)",
        "pool.protect()", "BufferError"),
    "make_ro with a writable view": (
        "pool = Pool(Mode.WR, name=NAME); a = pool.alloc(8); view = memoryview(a)",
        "pool.make_ro()", "BufferError"),
    "destroy with a live view": (
        "pool = Pool(Mode.RO, name=NAME); a = pool.alloc(8); pool.protect(); "
        "view = memoryview(a)",
        "pool.destroy()", "BufferError"),
    "AUTO rollover under a writable view": (
        "pool = Pool(Mode.AUTO_RO, name=NAME, refill=4096); a = pool.alloc(8); "
        "view = memoryview(a)",
        "pool.alloc(8192)", "BufferError"),
    "write after destroy": (
        "pool = Pool(Mode.RO, name=NAME); a = pool.alloc(8); pool.destroy()",
        "a.write(b'x')", "PoolDestroyedError"),
    "alloc after destroy": (
        "pool = Pool(Mode.WR, name=NAME); pool.destroy()",
        "pool.alloc(1)", "PoolDestroyedError"),
    "rare_write through another pool": (
        "pool = Pool(Mode.WR, name=NAME); other = Pool(Mode.WR, name='other'); "
        "a = other.alloc(8)",
        "pool.rare_write(a, b'x')", "ValueError"),
    "alloc over RLIMIT_MEMLOCK": (
        "pool = Pool(Mode.WR, name=NAME, refill=1 << 20, lock=True)",
        "pool.alloc(16)", "MemoryError"),
}
# Paths that need the child to run without CAP_IPC_LOCK under a small
# RLIMIT_MEMLOCK (root would otherwise lock any amount).  (CPython takes
# MemoryError instances from a free list: building one starts no GC.)
MEMLOCK_PATHS = {"alloc over RLIMIT_MEMLOCK"}
# Out-of-bounds errors are raised before the lock is taken: controls for
# the GC storm (they must stay fine whatever the lock does).
CONTROL_PATHS = {
    "write out of bounds": (
        "pool = Pool(Mode.RO, name=NAME); a = pool.alloc(8)",
        "a.write(b'xy', 7)", "ValueError"),
    "index out of range": (
        "pool = Pool(Mode.RO, name=NAME); a = pool.alloc(8)",
        "a.__setitem__(8, 1)", "IndexError"),
}

# ------------------------------------------------------- child templates

CHILD_HEAD = f"""
import faulthandler
faulthandler.dump_traceback_later({HANG_AFTER}, exit=True)
import gc, json, threading, time
from prmem import PoolDestroyedError, ProtectionError

def memlock_check():
    # has CAP_IPC_LOCK: the limit would not apply, the path would not fail
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:") and int(line.split()[1], 16) >> 14 & 1:
                print("HAS_IPC_LOCK", flush=True)
                sys.exit(0)
"""

# (a) A name whose formatting calls back into its own pool.
REENTRANT_NAME = """
class ReentrantName(str):
    \"\"\"A pool name whose repr(), str() and format() call its pool.\"\"\"
    pool = None

    def _reenter(self):
        if self.pool is not None:
            try:
                self.pool.stats()
            except PoolDestroyedError:
                pass

    def __repr__(self):
        self._reenter()
        return str.__repr__(self)

    def __str__(self):
        self._reenter()
        return str.__str__(self)

    def __format__(self, spec):
        self._reenter()
        return str.__format__(self, spec)

NAME = ReentrantName(%r)
""" % NAME

NAME_ERROR_CHILD = REENTRANT_NAME + """
{setup}
NAME.pool = pool
errors = []
for _ in range(3):
    try:
        {action}
    except Exception as e:
        errors.append([type(e).__name__, str(e)])
    else:
        errors.append(["no error", ""])
# the pool is intact: it still answers (unless it was meant to be destroyed)
if not pool.destroyed:
    pool.stats()
print("RESULT", json.dumps(errors))
"""

# (c) Cyclic garbage whose __del__ calls the pool, collected all the time,
# while an error path of the pool raises thousands of times.
GC_STORM_CHILD = """
NAME = %r
{setup}
counts = {{"dels": 0, "raised": 0, "wrong": [], "bad_del": []}}

class Garbage:
    def __init__(self):
        self.cycle = self          # only the cyclic GC frees it

    def __del__(self):
        counts["dels"] += 1
        try:
            pool.stats()
            pool.alloc(1)
        except (PoolDestroyedError, BufferError, MemoryError):
            pass
        except BaseException as e:
            counts["bad_del"].append(repr(e))

def storm(n):
    for _ in range(n):
        Garbage()
        try:
            {action}
        except Exception as e:
            if type(e).__name__ == {exception!r}:
                counts["raised"] += 1
            else:
                counts["wrong"].append(repr(e))

gc.set_threshold(1, 1, 1)
storm({n})
try:
    raise RuntimeError("an exception being handled")
except RuntimeError:
    # CPython 3.11 builds the new exception (a GC-tracked object) inside
    # PyErr_Format() here, to chain it: a collection can start right there.
    storm({n})
gc.set_threshold(700, 10, 10)
print("RESULT", json.dumps(counts))
""" % NAME
STORM_ROUNDS = 2000   # per storm() call; two calls per child

# (d) A signal handler that calls the pool, firing every millisecond while an
# error path of the pool raises.
SIGNAL_STORM_CHILD = """
NAME = %r
{setup}
counts = {{"handled": 0, "raised": 0, "wrong": [], "bad_handler": []}}

def on_alarm(signum, frame):
    counts["handled"] += 1
    try:
        pool.stats()
        pool.alloc(1)
    except (PoolDestroyedError, BufferError, MemoryError):
        pass
    except BaseException as e:
        counts["bad_handler"].append(repr(e))

signal.signal(signal.SIGALRM, on_alarm)
signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
for _ in range({n}):
    try:
        {action}
    except Exception as e:
        if type(e).__name__ == {exception!r}:
            counts["raised"] += 1
        else:
            counts["wrong"].append(repr(e))
signal.setitimer(signal.ITIMER_REAL, 0, 0)
print("RESULT", json.dumps(counts))
""" % NAME
SIGNAL_ROUNDS = 20000

# (b) Python code under the lock that sleeps, with a second thread reading.
READER = """
done = threading.Event()
reads = [0, 0]

def reader():
    while not done.is_set():
        if bytes(a) == b"content\\0":
            reads[0] += 1
        else:
            reads[1] += 1

thread = threading.Thread(target=reader, daemon=True)
thread.start()
"""

SLEEPY_NAME_CHILD = """
class SleepyName(str):
    \"\"\"A pool name whose repr(), str() and format() sleep (GIL released).\"\"\"
    def __repr__(self):
        time.sleep(0.05)
        return str.__repr__(self)

    def __str__(self):
        time.sleep(0.05)
        return str.__str__(self)

    def __format__(self, spec):
        time.sleep(0.05)
        return str.__format__(self, spec)

pool = Pool(Mode.RO, name=SleepyName(%r))
a = pool.strdup(b"content")
pool.protect()
""" % NAME + READER + """
refused = 0
for _ in range(20):
    try:
        a.write(b"x")
    except ProtectionError:
        refused += 1
    time.sleep(0.002)
done.set()
thread.join()
print("RESULT", json.dumps({"refused": refused, "reads": reads,
                            "reader_alive": thread.is_alive()}))
"""

SLEEPY_DEL_CHILD = """
pool = Pool(Mode.RO, name=%r)
a = pool.strdup(b"content")
pool.protect()

class Garbage:
    def __init__(self):
        self.cycle = self

    def __del__(self):
        time.sleep(0.001)

""" % NAME + READER + """
refused = 0
gc.set_threshold(1, 1, 1)
try:
    raise RuntimeError("an exception being handled")
except RuntimeError:
    for _ in range(300):
        Garbage()
        try:
            a.write(b"x")
        except ProtectionError:
            refused += 1
gc.set_threshold(700, 10, 10)
done.set()
thread.join()
print("RESULT", json.dumps({"refused": refused, "reads": reads,
                            "reader_alive": thread.is_alive()}))
"""

REPRS_CHILD = REENTRANT_NAME + """
pool = Pool(Mode.WR, name=NAME)
NAME.pool = pool
a = pool.alloc(8)
out = {"name_type": type(pool.name).__name__, "name": pool.name,
       "stats_name_type": type(pool.stats().name).__name__,
       "pool": repr(pool), "alloc": repr(a)}
pool.destroy()
out["destroyed_pool"] = repr(pool)
out["destroyed_alloc"] = repr(a)
print("RESULT", json.dumps(out))
"""


# ------------------------------------------------------------ the children

SCENARIOS = {}   # key -> (source, needs the memlock limit)


def _add(key, body, memlock=False):
    SCENARIOS[key] = (CHILD_PRELUDE + CHILD_HEAD + ("memlock_check()\n" if memlock else "")
                      + textwrap.dedent(body), memlock)


for _label, (_setup, _action, _exc) in ERROR_PATHS.items():
    _memlock = _label in MEMLOCK_PATHS
    _add(("name", _label), NAME_ERROR_CHILD.format(setup=_setup, action=_action), _memlock)
    _add(("gc", _label), GC_STORM_CHILD.format(setup=_setup, action=_action, exception=_exc,
                                               n=STORM_ROUNDS), _memlock)
    _add(("signal", _label), SIGNAL_STORM_CHILD.format(
        setup=_setup, action=_action, exception=_exc, n=SIGNAL_ROUNDS), _memlock)
for _label, (_setup, _action, _exc) in CONTROL_PATHS.items():
    _add(("gc", _label), GC_STORM_CHILD.format(setup=_setup, action=_action, exception=_exc,
                                               n=STORM_ROUNDS))
    _add(("signal", _label), SIGNAL_STORM_CHILD.format(
        setup=_setup, action=_action, exception=_exc, n=SIGNAL_ROUNDS))
_add("reprs", REPRS_CHILD)
_add("sleepy name", SLEEPY_NAME_CHILD)
_add("sleepy del", SLEEPY_DEL_CHILD)

TIMEOUT_LINE = re.compile(r"^Timeout \(\d+:\d\d:\d\d(\.\d+)?\)!$", re.M)


class Child:
    """One scenario running in its own interpreter."""

    def __init__(self, key, source, memlock):
        self.key = key
        self.out = tempfile.TemporaryFile(mode="w+")
        self.err = tempfile.TemporaryFile(mode="w+")
        prefix = ()
        if memlock and SETPRIV:
            prefix = (SETPRIV, "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock", "sh",
                      "-c", f'ulimit -S -l {MEMLOCK_LIMIT_KB} && exec "$0" "$@"')
        self.skip = "setpriv (util-linux) is needed to drop CAP_IPC_LOCK" if (
            memlock and not SETPRIV) else None
        self.started = time.monotonic()
        self.proc = None if self.skip else subprocess.Popen(
            [*prefix, sys.executable, "-c", source], stdin=subprocess.DEVNULL,
            stdout=self.out, stderr=self.err)

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self):
        self.kill()
        self.out.close()
        self.err.close()

    def result(self):
        """The child's RESULT (decoded JSON) once it exited 0; fails the test
        with the stacks if it hung, with its output if it failed."""
        if self.skip:
            pytest.skip(self.skip)
        killed = False
        try:
            self.proc.wait(timeout=max(KILL_AFTER - (time.monotonic() - self.started), 0.1))
        except subprocess.TimeoutExpired:
            self.kill()
            killed = True
        self.out.seek(0)
        self.err.seek(0)
        out, err = self.out.read(), self.err.read()
        if killed or TIMEOUT_LINE.search(err):
            pytest.fail(f"HUNG: scenario {self.key!r} did not finish within "
                        f"{HANG_AFTER} s: a deadlock on the pool lock.  Stacks of its "
                        f"threads (faulthandler):\n{err[-8000:]}", pytrace=False)
        if "HAS_IPC_LOCK" in out:
            pytest.skip("could not drop CAP_IPC_LOCK in the child")
        assert self.proc.returncode == 0, (
            f"scenario {self.key!r} exited with {self.proc.returncode}\n"
            f"stdout:\n{out[-4000:]}\nstderr:\n{err[-8000:]}")
        for line in out.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        raise AssertionError(f"scenario {self.key!r} printed no RESULT\n{out}\n{err}")


@pytest.fixture(scope="module")
def children():
    """Every scenario of this module, started together."""
    started = {key: Child(key, source, memlock)
               for key, (source, memlock) in SCENARIOS.items()}
    yield started
    for child in started.values():
        child.close()


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("label", ERROR_PATHS)
def test_error_message_with_reentrant_name(children, label):
    """(a) A pool named by a str subclass whose __repr__/__str__/__format__
    call pool.stats(): each error path that names the pool raises its
    exception (three times in a row), and the pool still works."""
    errors = children[("name", label)].result()
    exception = ERROR_PATHS[label][2]
    assert [e[0] for e in errors] == [exception] * 3, errors
    for _, message in errors:
        assert NAME in message, message


def test_name_is_an_exact_str_copy(children):
    """(a) The pool keeps an exact str copy of its name: reprs of the pool and
    of its allocations, alive or destroyed, use the name and never hang."""
    out = children["reprs"].result()
    assert out["name_type"] == out["stats_name_type"] == "str"
    assert out["name"] == NAME
    for key in ("pool", "alloc", "destroyed_pool", "destroyed_alloc"):
        assert repr(NAME) in out[key], (key, out[key])


def test_sleeping_name_repr_with_a_reader_thread(children):
    """(b) The name's __repr__ sleeps (releasing the GIL) while a second
    thread loops on bytes(a): both threads finish, every write is refused
    and every read sees the contents."""
    out = children["sleepy name"].result()
    assert out["refused"] == 20
    assert out["reads"][0] > 0 and out["reads"][1] == 0, out["reads"]
    assert not out["reader_alive"]


def test_sleeping_gc_finalizer_with_a_reader_thread(children):
    """(b) The same with the GIL released by a __del__ that the cyclic GC
    runs while a ProtectionError is being built: the reader thread must not
    wait for the pool lock while holding the GIL (or the lock must not be
    held while the finalizer runs)."""
    out = children["sleepy del"].result()
    assert out["refused"] == 300
    assert out["reads"][0] > 0 and out["reads"][1] == 0, out["reads"]
    assert not out["reader_alive"]


@pytest.mark.parametrize("label", [*ERROR_PATHS, *CONTROL_PATHS])
def test_gc_finalizers_calling_the_pool_during_error_storm(children, label):
    """(c) gc.set_threshold(1, 1, 1) and cyclic garbage whose __del__ calls
    pool.stats() and pool.alloc(1), made in a loop while an error path of
    the same pool raises 4000 times: no hang, the exact exception every
    time, and the finalizers really ran during the storm."""
    counts = children[("gc", label)].result()
    assert counts["wrong"] == [] and counts["bad_del"] == [], counts
    assert counts["raised"] == 2 * STORM_ROUNDS, counts
    assert counts["dels"] >= STORM_ROUNDS, counts


@pytest.mark.parametrize("label", [*ERROR_PATHS, *CONTROL_PATHS])
def test_signal_handler_calling_the_pool_during_error_storm(children, label):
    """(d) A SIGALRM handler that calls pool.stats() and pool.alloc(1),
    fired every millisecond while an error path of the same pool raises
    20,000 times: no hang (the handler must not run while the error is
    built under the lock), the exact exception every time, and the
    handler ran."""
    counts = children[("signal", label)].result()
    assert counts["wrong"] == [] and counts["bad_handler"] == [], counts
    assert counts["raised"] == SIGNAL_ROUNDS, counts
    assert counts["handled"] > 0, counts
