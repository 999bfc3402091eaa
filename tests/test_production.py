"""Production features: the PRMEM_ENFORCE switch, secret / dontdump / lock
pools, ``prmem inspect`` and the new PoolStats flags.

Everything is checked against the real kernel: forbidden writes are done for
real in child interpreters (which must die by SIGSEGV, or must survive when
enforcement is off), mapping permissions and VmFlags are read from
/proc/PID/maps and /proc/PID/smaps, /proc/self/mem is really read and
written, and memlock failures are provoked by running a child without
CAP_IPC_LOCK under a lowered RLIMIT_MEMLOCK.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

import prmem
from prmem import Mode, State
from prmem import cli

from conftest import CHILD_PRELUDE, perms_at

# The directory that holds the prmem package the tests import, so children
# import the very same build whatever the caller's PYTHONPATH.
SRC_DIR = os.path.dirname(os.path.dirname(os.path.abspath(prmem.__file__)))

HAS_SECRET = "memfd_secret" in prmem.features
needs_secret = pytest.mark.skipif(not HAS_SECRET,
                                  reason="kernel lacks memfd_secret (not in prmem.features)")
needs_enforcement = pytest.mark.skipif(
    not prmem.enforced, reason="this test run has PRMEM_ENFORCE=0: nothing is protected")
needs_mseal = pytest.mark.skipif("mseal" not in prmem.features, reason="kernel lacks mseal")

SETPRIV = shutil.which("setpriv")
needs_setpriv = pytest.mark.skipif(SETPRIV is None,
                                   reason="setpriv (util-linux) is needed to drop CAP_IPC_LOCK")

MEMLOCK_LIMIT_KB = 64
CAP_IPC_LOCK = 14

# Helpers every child of this module gets on top of conftest's prelude.
CHILD_HELPERS = r'''
import errno, json, re

def has_cap(bit):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    return False
'''


# ----------------------------------------------------------------- helpers

def child_env(**overrides):
    """The environment for a child: ours, importing the same prmem, with no
    PRMEM_ENFORCE unless given (None removes a variable)."""
    env = dict(os.environ)
    env.pop("PYTHONFAULTHANDLER", None)  # keep deliberate SIGSEGVs quiet
    env.pop("PRMEM_ENFORCE", None)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = SRC_DIR + (os.pathsep + old if old else "")
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_py(code, *, env=None, prefix=(), timeout=60.0):
    """Run ``code`` (dedented, after the preludes) in a fresh interpreter."""
    source = CHILD_PRELUDE + CHILD_HELPERS + textwrap.dedent(code)
    return subprocess.run([*prefix, sys.executable, "-c", source], capture_output=True,
                          text=True, timeout=timeout,
                          env=child_env() if env is None else env)


def run_cli(*args, env=None, timeout=120.0):
    return subprocess.run([sys.executable, "-m", "prmem", *args], capture_output=True,
                          text=True, timeout=timeout,
                          env=child_env() if env is None else env)


def run_memlock_limited(code):
    """Run ``code`` without CAP_IPC_LOCK (root otherwise bypasses the limit)
    and with a soft RLIMIT_MEMLOCK of 64 KiB; the hard limit is kept, so the
    child may raise its soft limit back to prove a pool recovers."""
    prefix = (SETPRIV, "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock",
              "sh", "-c", f'ulimit -S -l {MEMLOCK_LIMIT_KB} && exec "$0" "$@"')
    proc = run_py("if has_cap(%d):\n    print('HAS_IPC_LOCK', flush=True)\n    sys.exit(0)\n"
                  % CAP_IPC_LOCK + textwrap.dedent(code), prefix=prefix)
    if "HAS_IPC_LOCK" in proc.stdout:
        pytest.skip("could not drop CAP_IPC_LOCK in the child")
    return proc


def results(proc):
    """The ``RESULT {json}`` line a child printed, decoded."""
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(f"child printed no RESULT (exit {proc.returncode})\n"
                         f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")


def smaps(pid="self"):
    """Every mapping of a process: dicts with start, end, perms, inode, path
    and vmflags (a set of two-letter flags)."""
    entries = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
                fields = line.split(maxsplit=5)
                start, end = (int(x, 16) for x in fields[0].split("-"))
                entries.append({"start": start, "end": end, "perms": fields[1],
                                "inode": fields[4],
                                "path": fields[5].strip() if len(fields) > 5 else "",
                                "vmflags": set()})
            elif line.startswith("VmFlags:"):
                entries[-1]["vmflags"] = set(line.split()[1:])
    return entries


def mapping_at(address, pid="self"):
    for entry in smaps(pid):
        if entry["start"] <= address < entry["end"]:
            return entry
    raise LookupError(hex(address))


def pool_mappings(name):
    """smaps entries of the memfd-backed pool ``name`` in this process."""
    return [e for e in smaps()
            if e["path"] in (f"/memfd:prmem:{name}", f"/memfd:prmem:{name} (deleted)")]


def assert_killed_by_sigsegv(proc):
    assert "ARMED" in proc.stdout, (proc.stdout, proc.stderr)
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stdout, proc.stderr)
    assert "WRITTEN" not in proc.stdout


# ====================================================== 1. PRMEM_ENFORCE

@pytest.mark.parametrize("value, expected", [
    (None, True),
    ("0", False), ("false", False), ("no", False), ("off", False),
    ("1", True), ("yes", True), ("true", True), ("on", True), ("", True),
    ("00", True), ("enforce", True),
])
def test_enforce_switch_values(value, expected):
    proc = run_py("print('RESULT', json.dumps(prmem.enforced))",
                  env=child_env(PRMEM_ENFORCE=value))
    assert proc.returncode == 0, proc.stderr
    assert results(proc) is expected


def test_enforced_is_a_bool_attribute():
    assert prmem.enforced in (True, False)
    assert isinstance(prmem.enforced, bool)
    assert "enforced" in prmem.__all__


# The same API session, recorded; it must come out identical with the switch
# on and off: same states, same exceptions, same counters.
API_TRANSCRIPT = r'''
log = {}
def rec(label, fn):
    try:
        value = fn()
    except Exception as e:
        value = "raised " + type(e).__name__
    log[label] = value if isinstance(value, (str, int, bool, type(None))) else repr(value)

def counters(pool):
    s = pool.stats()
    return {"areas": s.areas, "chunks": s.chunks, "sealed": s.sealed_chunks,
            "lost": s.bytes_lost_to_protection, "free": s.bytes_free,
            "allocations": s.allocations,
            "by_state": {str(k): v for k, v in s.areas_by_state.items()}}

ro = Pool(Mode.RO, name="api_ro", refill=4096)
a = ro.strdup(b"hello")
rec("ro.write.before", lambda: a.write(b"H"))
rec("ro.state.before", lambda: str(a.state))
rec("ro.protect", ro.protect)
rec("ro.state.after", lambda: str(a.state))
rec("ro.write.after", lambda: a.write(b"X"))
rec("ro.setitem.after", lambda: a.__setitem__(1, 0x58))
rec("ro.rare_write", lambda: prmem.rare_write(a, b"X"))
rec("ro.rare_memset", lambda: prmem.rare_memset(a, 0))
rec("ro.pool.rare_write", lambda: ro.rare_write(a, b"X"))
rec("ro.view.readonly", lambda: memoryview(a).readonly)
rec("ro.content", lambda: bytes(a[:5]).decode())
rec("ro.new_alloc.state", lambda: str(ro.alloc(8).state))
log["ro.counters"] = json.dumps(counters(ro), sort_keys=True)

wr = Pool(Mode.WR, name="api_wr", refill=4096)
b = wr.strdup(b"world")
rec("wr.protect", wr.protect)
rec("wr.state.after", lambda: str(b.state))
rec("wr.write.after", lambda: b.write(b"X"))
rec("wr.rare_write", lambda: prmem.rare_write(b, b"W"))
rec("wr.rare_memset", lambda: prmem.rare_memset(b, ord("r"), 1, 1))
def session():
    with wr.rare_write_session() as w:
        w.write(b, b"L", 3)
rec("wr.session", session)
rec("wr.content.rare", lambda: bytes(b[:5]).decode())
rec("wr.make_ro", wr.make_ro)
rec("wr.state.make_ro", lambda: str(b.state))
rec("wr.rare_write.after_make_ro", lambda: prmem.rare_write(b, b"Z"))
rec("wr.rare_memset.after_make_ro", lambda: prmem.rare_memset(b, 0))
rec("wr.write.after_make_ro", lambda: b.write(b"Z"))
rec("wr.content.final", lambda: bytes(b[:5]).decode())
log["wr.counters"] = json.dumps(counters(wr), sort_keys=True)

auto = Pool(Mode.AUTO_RO, name="api_auto", refill=4096)
c = auto.alloc(4096)
c.write(b"first")
d = auto.alloc(16)
rec("auto.old.state", lambda: str(c.state))
rec("auto.old.write", lambda: c.write(b"X"))
rec("auto.new.write", lambda: d.write(b"new"))
rec("auto.protect", auto.protect)
rec("auto.new.state", lambda: str(d.state))
log["auto.counters"] = json.dumps(counters(auto), sort_keys=True)

sw = Pool(Mode.START_WR, name="api_sw", refill=4096)
e = sw.alloc(16)
rec("sw.state", lambda: str(e.state))
rec("sw.write", lambda: e.write(b"X"))
rec("sw.rare_write", lambda: prmem.rare_write(e, b"S"))
rec("sw.content", lambda: bytes(e[:1]).decode())

sealed = Pool(Mode.RO, name="api_seal", refill=4096, seal=True)
f = sealed.strdup(b"sealed")
rec("seal.protect", sealed.protect)
rec("seal.state", lambda: str(f.state))
rec("seal.write", lambda: f.write(b"X"))
log["seal.counters"] = json.dumps(counters(sealed), sort_keys=True)

for p in (ro, wr, auto, sw):
    rec("destroy." + p.name, p.destroy)
print("RESULT", json.dumps(log))
'''


def test_enforce_off_api_behaves_identically():
    on = run_py(API_TRANSCRIPT, env=child_env(PRMEM_ENFORCE="1"))
    off = run_py(API_TRANSCRIPT, env=child_env(PRMEM_ENFORCE="0"))
    assert on.returncode == 0, on.stderr
    assert off.returncode == 0, off.stderr
    log_on, log_off = results(on), results(off)
    assert log_off == log_on
    # ... and identical to what the API promises, not merely to each other.
    pe = "raised ProtectionError"
    expected = {
        "ro.write.before": None, "ro.state.before": "WRITABLE", "ro.protect": None,
        "ro.state.after": "READ_ONLY", "ro.write.after": pe, "ro.setitem.after": pe,
        "ro.rare_write": pe, "ro.rare_memset": pe, "ro.pool.rare_write": pe,
        "ro.view.readonly": True, "ro.content": "Hello", "ro.new_alloc.state": "WRITABLE",
        "wr.protect": None, "wr.state.after": "WRITE_RARE", "wr.write.after": pe,
        "wr.rare_write": None, "wr.rare_memset": None, "wr.session": None,
        "wr.content.rare": "WrrLd", "wr.make_ro": None, "wr.state.make_ro": "READ_ONLY",
        "wr.rare_write.after_make_ro": pe, "wr.rare_memset.after_make_ro": pe,
        "wr.write.after_make_ro": pe, "wr.content.final": "WrrLd",
        "auto.old.state": "READ_ONLY", "auto.old.write": pe, "auto.new.write": None,
        "auto.protect": None, "auto.new.state": "READ_ONLY",
        "sw.state": "WRITE_RARE", "sw.write": pe, "sw.rare_write": None, "sw.content": "S",
        "seal.protect": None, "seal.state": "READ_ONLY", "seal.write": pe,
    }
    for key, value in expected.items():
        assert log_off[key] == value, key
    assert json.loads(log_off["ro.counters"])["sealed"] == 1
    assert json.loads(log_off["wr.counters"])["by_state"] == {
        "WRITABLE": 0, "WRITE_RARE": 0, "READ_ONLY": 1}


NATIVE_SETUPS = {
    "RO after protect()": (
        "pool = Pool(Mode.RO, name='nw')\na = pool.strdup(b'original')\npool.protect()",
        "READ_ONLY"),
    "WR after protect()": (
        "pool = Pool(Mode.WR, name='nw')\na = pool.strdup(b'original')\npool.protect()",
        "WRITE_RARE"),
    "WR after make_ro()": (
        "pool = Pool(Mode.WR, name='nw')\na = pool.strdup(b'original')\npool.protect()\n"
        "pool.make_ro()", "READ_ONLY"),
    "START_WR fresh allocation": (
        "pool = Pool(Mode.START_WR, name='nw')\na = pool.alloc(16)", "WRITE_RARE"),
    "AUTO_RO area left behind": (
        "pool = Pool(Mode.AUTO_RO, name='nw', refill=4096)\na = pool.alloc(4096)\n"
        "a.write(b'original')\nkeep = pool.alloc(16)", "READ_ONLY"),
    "seal=True RO after protect()": (
        "pool = Pool(Mode.RO, name='nw', seal=True)\na = pool.strdup(b'original')\n"
        "pool.protect()", "READ_ONLY"),
}

NATIVE_ATTACK = '''
print("STATE", a.state, flush=True)
print("PERMS", perms_at(a.address, "unmapped"), flush=True)
print("ARMED", flush=True)
native_write(a, b"NATIVE")
print("WRITTEN", bytes(a[:6]).decode(), flush=True)
'''


@pytest.mark.parametrize("enforce", ["0", "1"], ids=["enforce_off", "enforce_on"])
@pytest.mark.parametrize("setup", list(NATIVE_SETUPS))
def test_native_write_to_protected_memory(setup, enforce):
    code, state = NATIVE_SETUPS[setup]
    proc = run_py(code + NATIVE_ATTACK, env=child_env(PRMEM_ENFORCE=enforce))
    assert f"STATE {state}\n" in proc.stdout, (proc.stdout, proc.stderr)
    if enforce == "0":
        # Same state as with enforcement, but the page is really writable.
        assert proc.returncode == 0, (proc.returncode, proc.stderr)
        assert "PERMS rw-s\n" in proc.stdout
        assert "WRITTEN NATIVE\n" in proc.stdout
    else:
        assert "PERMS r--s\n" in proc.stdout
        assert_killed_by_sigsegv(proc)


def test_enforce_off_maps_stay_writable_for_every_pool():
    proc = run_py('''
        out = {}
        for mode in (Mode.RO, Mode.WR, Mode.AUTO_RO, Mode.AUTO_WR):
            pool = Pool(mode, name="m_" + mode.name)
            a = pool.strdup(b"data")
            pool.protect()
            out[mode.name] = [str(a.state), perms_at(a.address, "unmapped")]
        wr = Pool(Mode.WR, name="m_make_ro")
        b = wr.strdup(b"data")
        wr.protect()
        wr.make_ro()
        out["make_ro"] = [str(b.state), perms_at(b.address, "unmapped")]
        print("RESULT", json.dumps(out))
    ''', env=child_env(PRMEM_ENFORCE="off"))
    assert proc.returncode == 0, proc.stderr
    assert results(proc) == {
        "RO": ["READ_ONLY", "rw-s"], "WR": ["WRITE_RARE", "rw-s"],
        "AUTO_RO": ["READ_ONLY", "rw-s"], "AUTO_WR": ["WRITE_RARE", "rw-s"],
        "make_ro": ["READ_ONLY", "rw-s"],
    }


def test_info_reports_enforcement_off():
    proc = run_cli("info", env=child_env(PRMEM_ENFORCE="0"))
    assert proc.returncode == 0, proc.stderr
    assert "enforced: NO" in proc.stdout
    assert "enforced: yes" not in proc.stdout


def test_info_reports_enforcement_on():
    proc = run_cli("info", env=child_env(PRMEM_ENFORCE=None))
    assert proc.returncode == 0, proc.stderr
    assert "enforced: yes" in proc.stdout
    assert "enforced: NO" not in proc.stdout


def test_selftest_fails_loudly_when_enforcement_is_off():
    proc = run_cli("selftest", env=child_env(PRMEM_ENFORCE="no"))
    assert "ENFORCEMENT IS OFF" in proc.stdout
    assert proc.returncode != 0, proc.stdout
    assert "did NOT hold" in proc.stdout
    # the protections that are only about the API still hold
    assert re.search(r"RO pool after protect\(\): Python write\s+ProtectionError\s+"
                     r"ProtectionError\s+ok", proc.stdout)
    assert re.search(r"RO pool after protect\(\): native write\s+SIGSEGV\s+written\s+FAIL",
                     proc.stdout)


# ========================================================= 2. secret pools

@needs_secret
def test_secret_pool_stats_and_mapping(pool_factory):
    pool = pool_factory(Mode.RO, name="secret_stats", secret=True)
    a = pool.alloc(64)
    a.write(b"top secret")
    assert bytes(a[:10]) == b"top secret"
    stats = pool.stats()
    assert (stats.secret, stats.locked, stats.dontdump, stats.seal) == (True, True, True, False)
    entry = mapping_at(a.address)
    assert entry["path"].startswith("/secretmem"), entry
    assert "memfd:prmem" not in entry["path"]
    assert entry["perms"] == "rw-s"
    assert {"lo", "dd"} <= entry["vmflags"], entry["vmflags"]
    # a secret pool is not visible as a named memfd
    assert pool_mappings("secret_stats") == []


@needs_secret
@pytest.mark.parametrize("phase", ["writable", "protected"])
def test_secret_pool_unreachable_through_proc_self_mem(pool_factory, phase):
    pool = pool_factory(Mode.RO, name="secret_mem", secret=True)
    a = pool.alloc(64)
    a.write(b"SECRET")
    if phase == "protected":
        pool.protect()
    fd = os.open("/proc/self/mem", os.O_RDWR)
    try:
        with pytest.raises(OSError) as read_err:
            os.pread(fd, 6, a.address)
        assert read_err.value.errno == errno.EIO
        with pytest.raises(OSError) as write_err:
            os.pwrite(fd, b"leaked", a.address)
        assert write_err.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert bytes(a[:6]) == b"SECRET"


def test_proc_self_mem_control_ordinary_pool_is_readable(pool_factory):
    # Control for the test above: an ordinary pool can be read this way, so
    # the EIO really comes from memfd_secret.
    pool = pool_factory(Mode.RO, name="plain_mem")
    a = pool.strdup(b"PLAIN")
    fd = os.open("/proc/self/mem", os.O_RDONLY)
    try:
        assert os.pread(fd, 5, a.address) == b"PLAIN"
    finally:
        os.close(fd)


@needs_secret
@needs_enforcement
def test_secret_ro_pool_protect(pool_factory):
    pool = pool_factory(Mode.RO, name="secret_ro", secret=True)
    a = pool.strdup(b"classified")
    pool.protect()
    assert a.state is State.READ_ONLY
    assert pool.stats().areas_by_state[State.READ_ONLY] == 1
    with pytest.raises(prmem.ProtectionError):
        a.write(b"X")
    with pytest.raises(prmem.ProtectionError):
        prmem.rare_write(a, b"X")
    assert bytes(a[:10]) == b"classified"
    entry = mapping_at(a.address)
    assert entry["path"].startswith("/secretmem")
    assert entry["perms"] == "r--s"
    assert {"lo", "dd"} <= entry["vmflags"]


@needs_secret
@pytest.mark.parametrize("seal", [False, True], ids=["plain", "seal"])
def test_secret_ro_pool_native_write_faults(seal):
    if seal and "mseal" not in prmem.features:
        pytest.skip("kernel lacks mseal")
    proc = run_py(f'''
        pool = Pool(Mode.RO, name="secret_native", secret=True, seal={seal})
        a = pool.strdup(b"classified")
        native_write(a, b"ok")           # writable before protect()
        assert bytes(a[:2]) == b"ok"
        pool.protect()
        assert a.state is State.READ_ONLY
        print("ARMED", flush=True)
        native_write(a, b"NATIVE")
        print("WRITTEN", flush=True)
    ''', env=child_env(PRMEM_ENFORCE="1"))
    assert_killed_by_sigsegv(proc)


def _inode_mappings(inode):
    return [e for e in smaps() if e["inode"] == inode]


@needs_secret
@needs_enforcement
def test_secret_wr_pool_rare_write(pool_factory):
    page = prmem.page_size
    pool = pool_factory(Mode.WR, name="secret_wr", secret=True)
    a = pool.zalloc(3 * page)
    a.write(b"initial")
    pool.protect()
    assert a.state is State.WRITE_RARE
    entry = mapping_at(a.address)
    assert entry["path"].startswith("/secretmem")
    inode = entry["inode"]

    def only_read_only_mappings():
        maps = _inode_mappings(inode)
        assert maps, "the pool's mapping disappeared"
        assert all(m["perms"] == "r--s" for m in maps), maps

    only_read_only_mappings()
    prmem.rare_write(a, b"changed")
    assert bytes(a[:7]) == b"changed"
    only_read_only_mappings()
    # across a page boundary: both pages change, nothing else does
    prmem.rare_write(a, b"ACROSS-PAGES", page - 6)
    assert bytes(a[page - 6:page + 6]) == b"ACROSS-PAGES"
    assert bytes(a[page - 7:page - 6]) == b"\0" and bytes(a[page + 6:page + 7]) == b"\0"
    only_read_only_mappings()
    prmem.rare_memset(a, 0xAB, 2 * page, page)
    assert bytes(a[2 * page:]) == b"\xab" * page
    with pool.rare_write_session() as w:
        w.write(a, b"session", 100)
        only_read_only_mappings()
        w.memset(a, ord("z"), 200, 3)
    assert bytes(a[100:107]) == b"session" and bytes(a[200:203]) == b"zzz"
    only_read_only_mappings()
    with pytest.raises(prmem.ProtectionError):
        a.write(b"X")
    assert a.state is State.WRITE_RARE
    assert bytes(a[:7]) == b"changed"


@needs_secret
def test_secret_wr_pool_native_write_faults_after_rare_write():
    proc = run_py('''
        pool = Pool(Mode.WR, name="secret_wr_native", secret=True)
        a = pool.strdup(b"initial")
        pool.protect()
        prmem.rare_write(a, b"CHANGED")
        assert bytes(a[:7]) == b"CHANGED"
        assert perms_at(a.address, "unmapped") == "r--s", perms_at(a.address, "unmapped")
        print("ARMED", flush=True)
        native_write(a, b"NATIVE")
        print("WRITTEN", flush=True)
    ''', env=child_env(PRMEM_ENFORCE="1"))
    assert_killed_by_sigsegv(proc)


@needs_secret
@needs_enforcement
def test_secret_wr_pool_make_ro(pool_factory):
    pool = pool_factory(Mode.WR, name="secret_make_ro", secret=True)
    a = pool.strdup(b"settled")
    pool.protect()
    prmem.rare_write(a, b"SETTLED")
    pool.make_ro()
    assert a.state is State.READ_ONLY
    with pytest.raises(prmem.ProtectionError):
        prmem.rare_write(a, b"X")
    with pytest.raises(prmem.ProtectionError):
        pool.rare_write(a, b"X")
    with pytest.raises(prmem.ProtectionError):
        prmem.rare_memset(a, 0)
    with pytest.raises(prmem.ProtectionError):
        a.write(b"X")
    assert bytes(a[:7]) == b"SETTLED"
    assert perms_at(a.address) == "r--s"
    assert {"lo", "dd"} <= mapping_at(a.address)["vmflags"]


@needs_secret
@needs_setpriv
@pytest.mark.parametrize("finish", ["RO.protect", "WR.make_ro"])
def test_secret_pool_within_memlock_limit_can_be_protected(finish):
    """A secret pool of 48 KiB under a 64 KiB RLIMIT_MEMLOCK is within the
    limit, so finishing it (protect() / make_ro()) must work, and must never
    leave the pool's memory unmapped behind the API's back."""
    mode, step = finish.split(".")
    proc = run_memlock_limited(f'''
        out = {{}}
        pool = Pool(Mode.{mode}, name="secret_fit", secret=True, refill=48 * 1024)
        a = pool.strdup(b"fits in the limit")
        if "{step}" == "make_ro":
            pool.protect()
        try:
            pool.{step}()
            out["finish"] = "ok"
        except Exception as e:
            out["finish"] = type(e).__name__ + ": " + str(e)
        out["state"] = str(a.state)
        out["perms"] = perms_at(a.address, "unmapped")
        print("PARTIAL", json.dumps(out), flush=True)
        out["content"] = bytes(a[:17]).decode()   # must not crash the process
        print("RESULT", json.dumps(out))
    ''')
    assert proc.returncode == 0, (
        f"child died with {proc.returncode}: the pool's memory is no longer mapped\n"
        + proc.stdout + proc.stderr)
    out = results(proc)
    assert out == {"finish": "ok", "state": "READ_ONLY", "perms": "r--s",
                   "content": "fits in the limit"}


# =============================================== 3. dontdump and lock pools

FINISHES = {
    "RO.protect": (Mode.RO, ("protect",)),
    "WR.protect": (Mode.WR, ("protect",)),
    "WR.make_ro": (Mode.WR, ("protect", "make_ro")),
    "AUTO_RO.protect": (Mode.AUTO_RO, ("protect",)),
}


# option -> (the VmFlags it sets, the PoolStats field that reports it)
FLAG_OPTIONS = {"dontdump": ("dd", "dontdump"), "lock": ("lo", "locked")}


@pytest.mark.parametrize("option", list(FLAG_OPTIONS))
@pytest.mark.parametrize("finish", list(FINISHES))
def test_flag_option_vmflags_survive_protection(pool_factory, option, finish):
    # dontdump=True -> MADV_DONTDUMP ("dd"), lock=True -> mlock ("lo"), on the
    # pool's memory before and after protect()/make_ro() (which may re-map
    # it) and on memory handed out afterwards.
    flag, field = FLAG_OPTIONS[option]
    mode, steps = FINISHES[finish]
    name = flag + "_" + finish.replace(".", "_")
    pool = pool_factory(mode, name=name, **{option: True})
    a = pool.strdup(b"flagged memory")
    stats = pool.stats()
    flags = {f: getattr(stats, f) for f in ("dontdump", "locked", "secret", "seal")}
    assert flags == {f: f == field for f in flags}
    def flagged_part(mappings):
        # MADV_DONTDUMP covers the whole reservation; mlock only the areas
        return [m for m in mappings if option == "dontdump" or m["perms"] != "---s"]

    before = flagged_part(pool_mappings(name))
    assert before and all(flag in m["vmflags"] for m in before), before
    for step in steps:
        getattr(pool, step)()
    after = flagged_part(pool_mappings(name))
    assert after and all(flag in m["vmflags"] for m in after), after
    entry = mapping_at(a.address)
    assert flag in entry["vmflags"], entry
    if prmem.enforced:
        assert entry["perms"] == "r--s"
    assert bytes(a[:14]) == b"flagged memory"
    assert getattr(pool.stats(), field) is True
    b = pool.alloc(8)
    assert flag in mapping_at(b.address)["vmflags"]


def test_lock_and_dontdump_together(pool_factory):
    pool = pool_factory(Mode.RO, name="lo_dd", lock=True, dontdump=True)
    a = pool.strdup(b"both")
    pool.protect()
    assert {"lo", "dd"} <= mapping_at(a.address)["vmflags"]
    stats = pool.stats()
    assert (stats.locked, stats.dontdump) == (True, True)


def test_default_pool_is_neither_locked_nor_dontdump(pool_factory):
    # Control: the flags above come from the options, not from prmem itself.
    pool = pool_factory(Mode.RO, name="plain_flags")
    a = pool.strdup(b"plain")
    assert not {"lo", "dd"} & mapping_at(a.address)["vmflags"]
    pool.protect()
    assert not {"lo", "dd"} & mapping_at(a.address)["vmflags"]
    assert all(not {"lo", "dd"} & m["vmflags"] for m in pool_mappings("plain_flags"))


@needs_setpriv
@pytest.mark.parametrize("option", [
    pytest.param("secret", marks=needs_secret),
    "lock",
])
def test_locked_pool_over_memlock_limit_raises_memory_error(option):
    # secret=True (memfd_secret locks its pages) and lock=True (mlock) both
    # count against RLIMIT_MEMLOCK: over it, a clear MemoryError and a pool
    # that keeps working.
    proc = run_memlock_limited('''
        import resource
        option = {"%s": True}
        out = {}
        pool = Pool(Mode.WR, name="locked_big", refill=1 << 20, **option)
        try:
            pool.alloc(16)
            out["error"] = None
        except MemoryError as e:
            out["error"] = str(e)
        s = pool.stats()
        out["after"] = [s.areas, s.allocations, s.bytes_mapped, s.locked]
        pool.protect()
        out["protect_after_failure"] = "ok"
        # a small pool fits in the limit and works end to end
        small = Pool(Mode.WR, name="locked_small", refill=4096, **option)
        b = small.strdup(b"fits")
        small.protect()
        small.rare_write(b, b"FITS")
        out["small"] = [bytes(b[:4]).decode(), str(b.state), perms_at(b.address, "unmapped")]
        # with the limit raised, the pool that failed allocates normally
        soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        if hard == resource.RLIM_INFINITY or hard >= 4 << 20:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
            c = pool.strdup(b"late")
            pool.protect()
            pool.rare_write(c, b"LATE")
            with open("/proc/self/smaps") as f:
                text = f.read()
            flags = []
            for block in re.split(r"\\n(?=[0-9a-f]+-[0-9a-f]+ )", text):
                first = block.split(None, 1)[0]
                start, end = (int(x, 16) for x in first.split("-"))
                if start <= c.address < end:
                    flags = re.search(r"VmFlags:(.*)", block).group(1).split()
            out["retry"] = [bytes(c[:4]).decode(), pool.stats().areas, "lo" in flags]
        print("RESULT", json.dumps(out))
    ''' % option)
    out = results(proc)
    assert proc.returncode == 0, proc.stderr
    message = out["error"]
    assert message is not None, f"{option}=True over RLIMIT_MEMLOCK did not fail"
    assert "RLIMIT_MEMLOCK" in message and "ulimit -l" in message, message
    assert out["after"] == [0, 0, 0, True]
    assert out["protect_after_failure"] == "ok"
    assert out["small"] == ["FITS", "WRITE_RARE", "r--s"]
    if "retry" in out:
        assert out["retry"] == ["LATE", 1, True]


@needs_setpriv
@pytest.mark.parametrize("option", [
    pytest.param("secret", marks=needs_secret),
    "lock",
])
def test_memlock_error_names_refill(option):
    # a new user's pool with the default refill (64 KiB) already fills a
    # 64 KiB RLIMIT_MEMLOCK: the error must point at refill= too
    proc = run_memlock_limited('''
        pool = Pool(Mode.WR, name="locked_refill", refill=1 << 20, %s=True)
        try:
            pool.alloc(16)
            print("RESULT", json.dumps({"error": None}))
        except MemoryError as e:
            print("RESULT", json.dumps({"error": str(e)}))
    ''' % option)
    message = results(proc)["error"]
    assert message is not None and "RLIMIT_MEMLOCK" in message, message
    assert "refill=" in message and str(1 << 20) in message, message


# ======================================================= 4. prmem inspect

INSPECT_CHILD = '''
pools = {}
def keep(name, pool, alloc):
    pools[name] = (pool, alloc)

w = Pool(Mode.RO, name="insp_writable")
keep("insp_writable", w, w.strdup(b"writable"))
wr = Pool(Mode.WR, name="insp_wr")
keep("insp_wr", wr, wr.strdup(b"write rare"))
wr.protect()
ro = Pool(Mode.RO, name="insp_ro")
keep("insp_ro", ro, ro.strdup(b"read only"))
ro.protect()
sealed = Pool(Mode.RO, name="insp_sealed", seal=SEAL)
keep("insp_sealed", sealed, sealed.strdup(b"sealed"))
sealed.protect()
if SECRET:
    se = Pool(Mode.RO, name="insp_secret", secret=True)
    keep("insp_secret", se, se.strdup(b"secret"))
    # READ_ONLY protected by the MMU only (memfd_secret cannot be sealed)
    sro = Pool(Mode.RO, name="insp_secret_ro", secret=True)
    keep("insp_secret_ro", sro, sro.strdup(b"secret ro"))
    sro.protect()
    swr = Pool(Mode.WR, name="insp_secret_wr", secret=True)
    keep("insp_secret_wr", swr, swr.strdup(b"secret wr"))
    swr.protect()
addresses = {name: alloc.address for name, (pool, alloc) in pools.items()}
print("RESULT", json.dumps({"pid": os.getpid(), "addresses": addresses}), flush=True)
print("READY", flush=True)
sys.stdin.read()
'''


@pytest.fixture(scope="module")
def inspected():
    """A child process holding pools in every state; yields (pid, addresses)."""
    if not prmem.enforced:
        pytest.skip("this test run has PRMEM_ENFORCE=0: nothing is protected")
    has_mseal = "mseal" in prmem.features
    source = (CHILD_PRELUDE + CHILD_HELPERS
              + f"SEAL = {has_mseal}\nSECRET = {HAS_SECRET}\n" + INSPECT_CHILD)
    child = subprocess.Popen([sys.executable, "-c", source], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=child_env(PRMEM_ENFORCE="1"))
    try:
        lines = []
        while True:
            line = child.stdout.readline()
            if not line or line.strip() == "READY":
                break
            lines.append(line)
        if not line:
            raise AssertionError("inspect child died: " + child.stderr.read())
        info = json.loads("".join(lines).split("RESULT ", 1)[1])
        yield info["pid"], info["addresses"]
    finally:
        child.stdin.close()  # the child finishes sys.stdin.read() and exits
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()


def _containing(entries, address):
    found = [e for e in entries if int(e["start"], 16) <= address < int(e["end"], 16)]
    assert len(found) == 1, (hex(address), entries)
    return found[0]


EXPECTED_INSPECT = {
    "insp_writable": ("insp_writable", "rw-s", "WRITABLE"),
    "insp_wr": ("insp_wr", "r--s", "WRITE_RARE"),
    "insp_ro": ("insp_ro", "r--s", "READ_ONLY, sealed"),
    "insp_sealed": ("insp_sealed", "r--s", "READ_ONLY, sealed"),
    "insp_secret": ("(secret pool)", "rw-s", "WRITABLE"),
    "insp_secret_ro": ("(secret pool)", "r--s", "READ_ONLY, MMU only"),
    "insp_secret_wr": ("(secret pool)", "r--s", "WRITE_RARE"),
}


def _check_json_report(report, addresses):
    assert isinstance(report, list)
    for name, address in addresses.items():
        pool, perms, protection = EXPECTED_INSPECT[name]
        entry = _containing(report, address)
        assert entry["pool"] == pool, entry
        assert entry["perms"] == perms, entry
        assert entry["protection"].startswith(protection), entry
        assert entry["size"] == int(entry["end"], 16) - int(entry["start"], 16)
        assert entry["size"] % prmem.page_size == 0
    flags = {name: _containing(report, address)["flags"] for name, address in addresses.items()}
    if "mseal" in prmem.features:
        assert "mseal" in flags["insp_sealed"]
    for name in ("insp_writable", "insp_wr", "insp_ro"):
        assert "mseal" not in flags[name], (name, flags[name])
        assert "locked" not in flags[name] and "dontdump" not in flags[name]
    for name in ("insp_secret", "insp_secret_ro", "insp_secret_wr"):
        if name in addresses:
            assert {"locked", "dontdump"} <= set(flags[name])
            assert "mseal" not in flags[name]
    names = {e["pool"] for e in report}
    assert {EXPECTED_INSPECT[n][0] for n in addresses} <= names
    for entry in report:  # everything listed is prmem's
        assert entry["pool"].startswith("insp_") or entry["pool"] == "(secret pool)", entry


def test_inspect_json_via_python_m(inspected):
    pid, addresses = inspected
    proc = run_cli("inspect", str(pid), "--json")
    assert proc.returncode == 0, proc.stderr
    _check_json_report(json.loads(proc.stdout), addresses)


def test_inspect_text_report(inspected):
    pid, addresses = inspected
    proc = run_cli("inspect", str(pid))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith(f"process {pid}: ")
    rows = {}
    for line in out.splitlines():
        m = re.match(r"(.+?)\s+([0-9a-f]+)-([0-9a-f]+)\s+(\d+)\s+(\S{4})\s+(.*)$", line)
        if m:
            rows[(int(m.group(2), 16), int(m.group(3), 16))] = (
                m.group(1).strip(), m.group(5), m.group(6))
    assert rows, out
    for name, address in addresses.items():
        pool, perms, protection = EXPECTED_INSPECT[name]
        found = [v for (s, e), v in rows.items() if s <= address < e]
        assert len(found) == 1, (name, out)
        row_pool, row_perms, row_protection = found[0]
        assert (row_pool, row_perms) == (pool, perms), found[0]
        assert row_protection.startswith(protection), found[0]
        if name == "insp_sealed" and "mseal" in prmem.features:
            assert "mseal" in row_protection
        if name == "insp_ro":
            assert "mseal" not in row_protection
        if name.startswith("insp_secret"):
            assert "locked" in row_protection and "dontdump" in row_protection
    for pool, _, _ in EXPECTED_INSPECT.values():
        if pool != "(secret pool)" or "insp_secret" in addresses:
            assert pool in out


def test_inspect_entry_point_matches_json(inspected, capsys):
    # The `prmem` console script calls prmem.cli.main.
    pid, addresses = inspected
    assert cli.main(["inspect", str(pid), "--json"]) == 0
    captured = capsys.readouterr()
    _check_json_report(json.loads(captured.out), addresses)
    assert cli.main(["inspect", str(pid)]) == 0
    text = capsys.readouterr().out
    assert "insp_wr" in text and "WRITE_RARE" in text
    # each label that occurs is explained under the table
    from prmem.inspect import MEANINGS
    labels = ["WRITABLE", "WRITE_RARE", "READ_ONLY, sealed"]
    if HAS_SECRET:
        labels.append("READ_ONLY, MMU only")
    for label in labels:
        assert f"\n{label}: {MEANINGS[label]}" in text, label
    assert "read-only, not sealed:" not in text


def test_inspect_tells_write_rare_from_mmu_only_and_sealed_read_only(inspected):
    # from outside the process: sealed memory has no "may write" flag (or is
    # mseal()ed); of the rest, prmem still holds the memory file of what it
    # may rare-write, and no descriptor of READ_ONLY memory
    from prmem.inspect import mappings
    pid, addresses = inspected
    maps = mappings(pid)
    by_name = {}
    for name, address in addresses.items():
        found = [m for m in maps if m.start <= address < m.end]
        assert len(found) == 1, name
        by_name[name] = found[0]
    assert by_name["insp_wr"].protection == "WRITE_RARE"
    assert by_name["insp_wr"].file_held is True
    assert by_name["insp_ro"].protection == "READ_ONLY, sealed"
    assert by_name["insp_ro"].file_held is False
    if HAS_SECRET:
        assert by_name["insp_secret_wr"].protection == "WRITE_RARE"
        assert by_name["insp_secret_ro"].protection == "READ_ONLY, MMU only"
        assert "mw" in by_name["insp_secret_ro"].vmflags   # mprotect() could undo it
        assert by_name["insp_secret_ro"].file_held is False


def test_inspect_labels_from_flags_and_descriptors():
    from prmem.inspect import MEANINGS, Mapping
    def label(perms, flags, held):
        return Mapping("p", 0, 4096, perms, flags.split(), file_held=held).protection
    assert label("rw-s", "rd wr sh mr mw", True) == "WRITABLE"
    assert label("r--s", "rd mr", False) == "READ_ONLY, sealed"            # file seals
    assert label("r--s", "rd sh mr mw sl", True) == "READ_ONLY, sealed"    # mseal
    assert label("r--s", "rd sh mr mw", True) == "WRITE_RARE"
    assert label("r--s", "rd sh mr mw", False) == "READ_ONLY, MMU only"
    # /proc/PID/fd unreadable: say what it may be rather than guess
    assert label("r--s", "rd sh mr mw", None) == "read-only, not sealed"
    assert label("---s", "sh mr mw", None) == "reserved (no access)"
    assert label("---s", "sh mr mw dd", True) == "no access"
    assert "/proc/PID/fd" in MEANINGS["read-only, not sealed"]


def test_inspect_agrees_with_the_kernel(inspected):
    pid, addresses = inspected
    proc = run_cli("inspect", str(pid), "--json")
    report = json.loads(proc.stdout)
    kernel = smaps(pid)
    for name, address in addresses.items():
        entry = _containing(report, address)
        truth = [m for m in kernel if m["start"] <= address < m["end"]][0]
        assert (int(entry["start"], 16), int(entry["end"], 16)) == (truth["start"], truth["end"])
        assert entry["perms"] == truth["perms"]


@pytest.fixture
def idle_child():
    """A Python process without any prmem memory."""
    child = subprocess.Popen([sys.executable, "-c",
                              "import sys; print('READY', flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env=child_env())
    try:
        assert child.stdout.readline().strip() == "READY"
        yield child.pid
    finally:
        child.stdin.close()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        child.stdout.close()


def test_inspect_process_without_pools(idle_child):
    proc = run_cli("inspect", str(idle_child))
    assert proc.returncode == 0, proc.stderr
    assert "no prmem memory" in proc.stdout
    assert str(idle_child) in proc.stdout
    proc = run_cli("inspect", str(idle_child), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_inspect_nonexistent_pid():
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read()) + 1  # no process can have it
    proc = run_cli("inspect", str(pid))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.strip(), "no message on stderr"
    assert str(pid) in proc.stderr
    proc = run_cli("inspect", str(pid), "--json")
    assert proc.returncode == 1
    assert proc.stdout == "" and proc.stderr.strip()


# ===================================================== 5. PoolStats flags

@pytest.mark.parametrize("mode", list(Mode))
def test_stats_flags_default_false(pool_factory, mode):
    pool = pool_factory(mode, name="flags_default")
    for phase in ("empty", "allocated", "protected"):
        if phase == "allocated":
            pool.alloc(32)
        elif phase == "protected":
            pool.protect()
        stats = pool.stats()
        flags = (stats.secret, stats.dontdump, stats.locked, stats.seal)
        assert flags == (False, False, False, False), (phase, flags)
        assert all(type(f) is bool for f in flags)


def test_stats_flag_fields_exist():
    names = {f.name for f in prmem.PoolStats.__dataclass_fields__.values()}
    assert {"secret", "dontdump", "locked", "seal"} <= names


@pytest.mark.parametrize("options, expected", [
    ({"dontdump": True}, (False, True, False, False)),
    ({"lock": True}, (False, False, True, False)),
    ({"dontdump": True, "lock": True}, (False, True, True, False)),
    pytest.param({"secret": True}, (True, True, True, False), marks=needs_secret),
    pytest.param({"secret": True, "lock": True, "dontdump": True}, (True, True, True, False),
                 marks=needs_secret),
])
def test_stats_flags_reflect_options(pool_factory, options, expected):
    pool = pool_factory(Mode.WR, name="flags_set", **options)
    for phase in ("empty", "allocated", "protected"):
        if phase == "allocated":
            pool.alloc(32)
        elif phase == "protected":
            pool.protect()
        stats = pool.stats()
        assert (stats.secret, stats.dontdump, stats.locked, stats.seal) == expected, phase


def test_stats_seal_flag():
    # seal=True memory can never be unmapped: keep it out of the test process.
    proc = run_py('''
        pool = Pool(Mode.RO, name="flags_seal", seal=True)
        before = pool.stats()
        pool.strdup(b"x")
        pool.protect()
        after = pool.stats()
        print("RESULT", json.dumps([[s.secret, s.dontdump, s.locked, s.seal]
                                    for s in (before, after)]))
    ''')
    assert proc.returncode == 0, proc.stderr
    assert results(proc) == [[False, False, False, True]] * 2


def test_section_stats_flags():
    for section in (prmem.ro_after_init, prmem.wr_after_init):
        stats = section.stats()
        assert (stats.secret, stats.dontdump, stats.locked, stats.seal) == (
            False, False, False, False)
