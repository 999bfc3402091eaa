"""Corrupted frozen structures: every operation either succeeds or raises
CorruptionError (or the ordinary KeyError/IndexError of a lookup) — never
reads outside the extent, never crashes, never hangs.

Each case freezes a random small structure into a WRITABLE pool, scribbles
over its bytes with ctypes (flipped bytes, random runs, header bytes,
plausible offsets and counts, copied 8/16/40-byte blocks), optionally
protects the pool, then runs every operation on the root handle and on the
nested handles it hands out.  The structure is placed so that it ends
within 8 bytes of the end of its area; the pool's reservation behind an area
is PROT_NONE, so a read past the end faults (a crash is a failure).  A guard
allocation in front of it detects writes (rare_set) outside the extent.

The 10^4 random cases run in one child interpreter with an alarm per case
(a hang kills the child and names the case); a shorter run of other seeds
runs in-process for quick feedback and readable tracebacks.  Everything is
seeded: a failure names its seed, and ``run_cases(seed, 1, verbose=True)``
replays it.  PRMEM_FUZZ_CASES and PRMEM_FUZZ_START change the number of
child cases and the first seed.
"""
from __future__ import annotations

import ctypes
import itertools
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import prmem
from prmem import CorruptionError, FrozenList, FrozenMap, Mode, ProtectionError

PAGE = prmem.page_size
HERE = Path(__file__).resolve().parent
CHILD_CASES = int(os.environ.get("PRMEM_FUZZ_CASES", "10000"))
CHILD_START = int(os.environ.get("PRMEM_FUZZ_START", "0"))
CASE_SECONDS = 5          # per-case alarm in the child: longer is a hang

# ---------------------------------------------------------------- random data

EDGE_INTS = [0, 1, -1, 127, 2**31 - 1, 2**32, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 2**64]
STRS = ["", "a", "key", "role", "é", "漢字", "🎉x", "\x00", "a\x00b", "long-" * 6]


def rand_str(rng):
    if rng.random() < 0.5:
        return rng.choice(STRS)
    return "".join(rng.choice("abcé漢🎉\x00z") for _ in range(rng.randint(0, 10)))


def rand_bytes(rng):
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 12)))


def rand_int(rng):
    r = rng.random()
    if r < 0.4:
        return rng.randint(-100, 100)
    if r < 0.7:
        return rng.choice(EDGE_INTS)
    return rng.getrandbits(rng.choice([64, 65, 100, 300])) * rng.choice([1, -1])


def rand_scalar(rng):
    kind = rng.randrange(8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind in (2, 3):
        return rand_int(rng)
    if kind == 4:
        return rng.choice([0.0, -0.0, 1.5, math.inf, -math.inf, math.nan, 5e-324, rng.uniform(-1e9, 1e9)])
    if kind in (5, 6):
        return rand_str(rng)
    return rand_bytes(rng)


def rand_key(rng):
    kind = rng.randrange(3)
    if kind == 0:
        return rand_str(rng)
    if kind == 1:
        return rand_bytes(rng)
    return rand_int(rng)


def rand_value(rng, depth):
    if depth >= 3 or rng.random() < 0.6:
        return rand_scalar(rng)
    return rand_container(rng, depth + 1)


def rand_container(rng, depth=0):
    n = rng.randint(0, 5)
    r = rng.random()
    if r < 0.6:
        return {rand_key(rng): rand_value(rng, depth) for _ in range(n)}
    items = [rand_value(rng, depth) for _ in range(n)]
    return tuple(items) if r < 0.7 else items


def norm_key(key):
    return int(key) if isinstance(key, bool) else key


# ----------------------------------------------------------------- corruption

def corrupt(rng, address, n):
    """Scribble over the n bytes at address; return what was done."""
    raw = bytearray(ctypes.string_at(address, n))
    done = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(7)
        if kind == 0:                                   # flip one byte
            i = rng.randrange(n)
            raw[i] ^= rng.randint(1, 255)
            done.append("flip@%d" % i)
        elif kind == 1:                                 # a run of random bytes
            i = rng.randrange(n)
            run = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 16)))[: n - i]
            raw[i:i + len(run)] = run
            done.append("run@%d+%d" % (i, len(run)))
        elif kind == 2:                                 # header bytes
            i = rng.randrange(min(n, 64))
            raw[i] = rng.getrandbits(8)
            done.append("head@%d" % i)
        elif kind in (3, 4):                            # a plausible-looking word
            width = rng.choice([4, 8])
            i = rng.randrange(0, max(1, n - width + 1), width) if n >= width else 0
            value = rng.choice([0, 1, 2, 7, 8, 9, 16, 0xFF, n, n - 8, n - 16, n + 8, n * 2,
                                2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1,
                                rng.randrange(n) & ~7, rng.getrandbits(width * 8)])
            value &= (1 << (width * 8)) - 1
            if i + width <= n:
                raw[i:i + width] = value.to_bytes(width, "little")
                done.append("word%d@%d=%#x" % (width, i, value))
        elif kind == 5:                                 # copy a block elsewhere
            size = rng.choice([8, 16, 40])
            if n >= 2 * size:
                src = rng.randrange(0, n - size + 1, 8)
                dst = rng.randrange(0, n - size + 1, 8)
                raw[dst:dst + size] = raw[src:src + size]
                done.append("copy%d@%d->%d" % (size, src, dst))
        else:                                           # a run of 0x00 or 0xff
            i = rng.randrange(n)
            length = min(rng.randint(1, 24), n - i)
            raw[i:i + length] = bytes([rng.choice([0, 0xFF])]) * length
            done.append("fill@%d+%d" % (i, length))
    ctypes.memmove(address, bytes(raw), n)
    return done


# ----------------------------------------------------------------- operations

READ_OK = (CorruptionError, KeyError, IndexError)
RARE_OK = READ_OK + (TypeError, ProtectionError)
ABSENT = ["\x00absent", b"\x00absent", 987654321, -(2**70), None, 1.5, ()]
NEW_VALUES = [None, True, False, 3, -(2**63), 2.5, -0.0]
VALID_TYPES = (type(None), bool, int, float, str, bytes, FrozenMap, FrozenList)


def repr_like_dict(h):
    """repr(h), except for the error repr() of a dict raises too: an int of
    more than sys.get_int_max_str_digits() digits (a corrupted big int
    can decode to one)."""
    try:
        return repr(h)
    except ValueError as e:
        if type(e) is ValueError and "integer string conversion" in str(e):
            return None
        raise


class Runner:
    """Runs operations on handles, recording anything not allowed."""

    def __init__(self, seed, failures):
        self.seed = seed
        self.failures = failures
        self.what = ""

    def fail(self, op, message):
        self.failures.append("seed=%d %s op=%s: %s" % (self.seed, self.what, op, message))

    def attempt(self, op, fn, allowed=READ_OK):
        try:
            return True, fn()
        except allowed:
            return False, None
        except Exception as e:  # noqa: BLE001 - anything else is the finding
            self.fail(op, "%s: %s" % (type(e).__name__, str(e)[:200]))
            return False, None

    def check_value(self, op, value):
        if type(value) not in VALID_TYPES:
            self.fail(op, "returned a %s" % type(value).__name__)

    def bounded(self, op, iterable_fn, cap):
        """list(iterable_fn()) but at most cap + 1 items (an iterator that
        does not end is a finding)."""
        def run():
            out = list(itertools.islice(iterable_fn(), cap + 1))
            if len(out) > cap:
                self.fail(op, "iteration goes on past %d items" % cap)
            return out
        return self.attempt(op, run)

    def exercise(self, h, orig, rng, depth=0):
        cap = h.nbytes
        nested = []
        ok, n = self.attempt("len", lambda: len(h))
        if ok and not (isinstance(n, int) and 0 <= n <= cap):
            self.fail("len", "len %r for a %d-byte structure" % (n, cap))
        for op, fn in (("iter", lambda: iter(h)), ("list", lambda: iter(list(h)))):
            ok, items = self.bounded(op, fn, cap)
            if ok:
                for x in items:
                    self.check_value(op, x)
        self.attempt("repr", lambda: repr_like_dict(h))
        ok, t = self.attempt("thaw", h.thaw)
        if ok and type(t) is not (dict if isinstance(h, FrozenMap) else list):
            self.fail("thaw", "returned a %s" % type(t).__name__)
        ok, eq = self.attempt("==", lambda: h == orig)
        if ok and eq is not True and eq is not False:
            self.fail("==", "returned %r" % (eq,))
        self.attempt("!=", lambda: h != orig)
        self.attempt("== self", lambda: h == h)
        if isinstance(h, FrozenMap):
            for op, fn in (("keys", h.keys), ("values", h.values), ("items", h.items)):
                ok, items = self.bounded(op, lambda: iter(fn()), cap)
                if ok and op == "values":
                    nested += [v for v in items if isinstance(v, (FrozenMap, FrozenList))][:2]
            keys = [norm_key(k) for k in orig] if isinstance(orig, dict) else []
            for k in keys[:6] + rng.sample(ABSENT, 3):
                ok, v = self.attempt("[%r]" % (k,), lambda: h[k])
                if ok:
                    self.check_value("[%r]" % (k,), v)
                    if isinstance(v, (FrozenMap, FrozenList)):
                        nested.append(v)
                self.attempt("get(%r)" % (k,), lambda: h.get(k, "default"))
                ok, found = self.attempt("in", lambda: k in h)
                if ok and found is not True and found is not False:
                    self.fail("in", "returned %r" % (found,))
            for k in (keys[:2] + rng.sample(ABSENT, 1)):
                new = rng.choice(NEW_VALUES)
                self.attempt("rare_set(%r, %r)" % (k, new), lambda: h.rare_set(k, new), RARE_OK)
        else:
            items_orig = list(orig) if isinstance(orig, (list, tuple)) else []
            ok, n = self.attempt("len", lambda: len(h))
            n = n if ok else len(items_orig)
            for i in sorted({0, 1, n - 1, n, -1, -n, -n - 1, rng.randint(-n - 2, n + 2)}):
                ok, v = self.attempt("[%d]" % i, lambda: h[i])
                if ok:
                    self.check_value("[%d]" % i, v)
                    if isinstance(v, (FrozenMap, FrozenList)):
                        nested.append(v)
            for s in (slice(None), slice(1, 3), slice(None, None, -1), slice(None, None, 2),
                      slice(-2, None)):
                ok, got = self.attempt("[%s]" % s, lambda: h[s])
                if ok and type(got) is not list:
                    self.fail("[%s]" % s, "returned a %s" % type(got).__name__)
            for x in items_orig[:3] + [object()]:
                self.attempt("index", lambda: h.index(x), READ_OK + (ValueError,))
                self.attempt("count", lambda: h.count(x))
                self.attempt("in", lambda: x in h)
            for i in (0, -1, n, rng.randint(-n - 2, n + 2)):
                new = rng.choice(NEW_VALUES)
                self.attempt("rare_set(%d, %r)" % (i, new), lambda: h.rare_set(i, new), RARE_OK)
        if depth < 3:
            for child in nested[:3]:
                for op in ("address", "nbytes"):
                    if getattr(child, op) != getattr(h, op):
                        self.fail("nested." + op, "differs from the root's")
                self.exercise(child, None, rng, depth + 1)


def _tight_pool(mode, size, name):
    """A pool whose first area ends right after a `size`-byte freeze that
    follows a guard allocation (all 8-byte aligned)."""
    area = -(-(size + 64) // PAGE) * PAGE
    pool = prmem.Pool(mode, name=name, refill=area)
    guard = pool.alloc((area - size) & ~7)
    guard.write(b"\xa5" * guard.size)
    return pool, guard, guard.address + area


def run_cases(start, count, verbose=False, progress=None):
    """Run cases start..start+count-1; return (failures, stats)."""
    failures = []
    stats = {"cases": 0, "tight": 0, "corruption_errors": 0}
    scratch = prmem.Pool(Mode.RO, name="fuzz-scratch")
    for seed in range(start, start + count):
        if progress:
            progress(seed)
        rng = random.Random(seed)
        data = rand_container(rng)
        mode = Mode.WR if rng.random() < 0.6 else Mode.RO
        size = scratch.freeze(data).nbytes
        pool, guard, area_end = _tight_pool(mode, size, "fuzz")
        runner = Runner(seed, failures)
        before = len(failures)
        try:
            h = pool.freeze(data)
            if h.nbytes != size:
                runner.fail("freeze", "nbytes %d, then %d" % (size, h.nbytes))
            if h.address + h.nbytes <= area_end < h.address + h.nbytes + 8:
                stats["tight"] += 1
            runner.what = "mode=%s %s" % (mode.name, ",".join(corrupt(rng, h.address, h.nbytes)))
            if rng.random() < 0.5:
                pool.protect()
                runner.what += " protected"
            runner.exercise(h, data, rng)
            if bytes(guard) != b"\xa5" * guard.size:
                runner.fail("guard", "bytes before the extent changed")
            try:
                h.thaw()
            except CorruptionError:
                stats["corruption_errors"] += 1
            except Exception:  # noqa: BLE001 - reported by exercise()
                pass
            del h
        except Exception as e:  # noqa: BLE001 - the harness itself failed
            runner.fail("harness", "%s: %s" % (type(e).__name__, e))
        try:
            pool.destroy()
        except BufferError:
            runner.fail("destroy", "the pool is still pinned after every handle was dropped")
        if verbose and len(failures) > before:
            print("\n".join(failures[before:]))
        stats["cases"] += 1
        if len(failures) > 200:
            break
    scratch.destroy()
    return failures, stats


# --------------------------------------------------------------------- tests

CHILD = """
import os, signal, sys
sys.path.insert(0, {here!r})
import test_frozen_fuzz as fuzz
signal.signal(signal.SIGALRM, signal.SIG_DFL)   # a hang ends the process

def progress(seed):
    signal.alarm({seconds})
    os.write(1, b"case %d\\n" % seed)

failures, stats = fuzz.run_cases({start}, {count}, progress=progress)
signal.alarm(0)
for line in failures[:50]:
    print("FAIL", line)
print("STATS", stats["cases"], stats["tight"], stats["corruption_errors"], len(failures))
"""


def _run_child_cases(start, count, timeout):
    code = CHILD.format(here=str(HERE), seconds=CASE_SECONDS, start=start, count=count)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout)
    elapsed = time.monotonic() - started
    lines = proc.stdout.splitlines()
    cases = [line for line in lines if line.startswith("case ")]
    last = cases[-1] if cases else "(before the first case)"
    if proc.returncode == -signal.SIGALRM:
        pytest.fail("hang: %s ran over %d s" % (last, CASE_SECONDS))
    if proc.returncode != 0:
        pytest.fail("child died (%d) in %s:\n%s" % (proc.returncode, last, proc.stderr[-3000:]))
    fails = [line for line in lines if line.startswith("FAIL ")]
    stats = next(line for line in lines if line.startswith("STATS")).split()[1:]
    return fails, [int(x) for x in stats], elapsed


def test_corrupted_structures_in_a_child():
    fails, (cases, tight, corruption_errors, nfail), elapsed = _run_child_cases(
        CHILD_START, CHILD_CASES, timeout=max(120, CHILD_CASES // 20))
    assert not fails, "%d failures, first ones:\n%s" % (nfail, "\n".join(fails[:30]))
    assert cases == CHILD_CASES
    # the harness did what it says: structures end at their area's end, and
    # the corruption was detected often
    assert tight >= cases * 0.9, (tight, cases)
    assert corruption_errors >= cases * 0.2, (corruption_errors, cases)


def test_corrupted_structures_in_process():
    failures, stats = run_cases(10**6, 150)
    assert not failures, "\n".join(failures[:30])
    assert stats["cases"] == 150


# ------------------------------------------------- targeted: shared children


SHARED = """
import signal, struct, time
signal.signal(signal.SIGALRM, signal.SIG_DFL)
pool = Pool(Mode.RO, name="shared-children")
x = {empty}
for i in range({depth}):
    x = {build}
m = pool.freeze(x)
raw = bytearray(ctypes.string_at(m.address, m.nbytes))
# Make the second container slot of every node point at the same child as
# the first (slots: u32 tag, u32 0, u64 offset; list items 16 bytes apart,
# map entries 40): a {depth}-level chain of nodes whose two children are one
# node — a small structure that stands for 2**{depth} nodes.
patched = 0
for off in range(0, len(raw) - 32, 8):
    for dist in (16, 40):
        if off + dist + 16 > len(raw):
            continue
        t1, a1, p1 = struct.unpack_from("<IIQ", raw, off)
        t2, a2, p2 = struct.unpack_from("<IIQ", raw, off + dist)
        if t1 == t2 == {tag} and a1 == a2 == 0 and p1 < off and p2 < off and p1 != p2:
            struct.pack_into("<IIQ", raw, off + dist, t2, 0, p1)
            patched += 1
assert patched >= {depth} - 2, patched
ctypes.memmove(m.address, bytes(raw), len(raw))
pool.protect()
for name, op in [("len", len), ("thaw", lambda h: h.thaw()), ("repr", repr),
                 ("==", lambda h: h == h), ("== thawed", lambda h: h == {empty}),
                 ("walk", lambda h: h[{first}][{first}][{first}])]:
    print(name, flush=True)
    signal.alarm(2)   # a correct reader takes milliseconds
    try:
        op(m)
    except prmem.CorruptionError:
        pass
    signal.alarm(0)
print("done", flush=True)
"""


@pytest.mark.parametrize("kind", ["list", "map"])
def test_shared_children_do_not_blow_up(kind):
    """A corrupted structure whose container slots share children stands
    for exponentially many nodes; reading it must still finish quickly (or
    raise CorruptionError), not hang or eat all memory."""
    if kind == "list":
        params = dict(empty="[]", build="[x, []]", tag=8, first=0)
    else:
        params = dict(empty="{}", build='{"a": x, "b": {}}', tag=9, first='"a"')
    proc = subprocess.run(
        [sys.executable, "-c", _child_source(SHARED.format(depth=48, **params))],
        capture_output=True, text=True, timeout=120)
    ops = proc.stdout.split()
    assert proc.returncode == 0 and ops[-1:] == ["done"], (
        "operation %r did not finish (rc %d): %s" % (ops[-1] if ops else None,
                                                    proc.returncode, proc.stderr[-2000:]))


def _child_source(code):
    from conftest import CHILD_PRELUDE
    return CHILD_PRELUDE + textwrap.dedent(code)


# --------------------------------------------------- targeted: every byte once


EXHAUSTIVE = """
sys.path.insert(0, {here!r})
import test_frozen_fuzz as fuzz
data = {data!r}
pool = Pool(Mode.WR, name="every-byte")
m = pool.freeze(data)
pristine = ctypes.string_at(m.address, m.nbytes)
failures = []
for i in range(m.nbytes):
    for value in {{0x00, 0xFF, pristine[i] ^ 0x01, pristine[i] ^ 0x80}}:
        ctypes.memmove(m.address + i, bytes([value]), 1)
        runner = fuzz.Runner(i, failures)
        runner.what = "byte %d := %#x" % (i, value)
        runner.exercise(m, data, fuzz.random.Random(i))
        ctypes.memmove(m.address, pristine, len(pristine))
for line in failures[:30]:
    print("FAIL", line)
print("checked", m.nbytes, len(failures))
"""

EXHAUSTIVE_DATA = [
    {"alice": {"role": "admin", "quota": 10, "nets": ["10.0.0.0/8"]}, b"k": [None, True, 1.5]},
    [[1, [2]], {"x": {"y": {}}}, "é字", 2**70],
]


@pytest.mark.parametrize("data", EXHAUSTIVE_DATA, ids=["map", "list"])
def test_every_byte_changed_alone(data):
    proc = subprocess.run(
        [sys.executable, "-c", _child_source(EXHAUSTIVE.format(here=str(HERE), data=data))],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fails = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert not fails, "\n".join(fails)
    assert proc.stdout.splitlines()[-1].split()[2] == "0"
