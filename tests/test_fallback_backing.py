"""Without memfd_create() prmem falls back to unnamed /dev/shm files.

PRMEM_NO_MEMFD=1 makes prmem behave as on such a kernel.  Write-rare still
never maps memory writable and protected pages still fault; only the seals
(and what they add) are missing, and prmem says so.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from conftest import CHILD_PRELUDE


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PRMEM_NO_MEMFD="1")
    argv = [sys.executable, *args] if args else [sys.executable, "-c", CHILD_PRELUDE + code]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)


def test_features_report_the_missing_memfd():
    proc = _run("print(' '.join(sorted(prmem.features)))")
    assert proc.returncode == 0, proc.stderr
    features = proc.stdout.split()
    assert "memfd" not in features and "memfd_seal_future_write" not in features


def test_rare_write_and_make_ro_work_without_a_writable_mapping():
    proc = _run("""
pool = Pool(Mode.WR, name="fallback")
a = pool.alloc(16)
a.write(b"original")
pool.protect()
prmem.rare_write(a, b"changed!")
assert bytes(a[:8]) == b"changed!"
maps = [l for l in open("/proc/self/maps") if "/dev/shm/" in l and " rw" in l]
assert not maps, maps
pool.make_ro()
try:
    prmem.rare_write(a, b"x")
except prmem.ProtectionError:
    print("refused")
""")
    assert proc.returncode == 0, proc.stderr
    assert "refused" in proc.stdout


def test_native_write_to_protected_memory_still_faults():
    proc = _run("""
pool = Pool(Mode.RO, name="fallback")
a = pool.alloc(16)
pool.protect()
print("ARMED", flush=True)
native_write(a)
print("WRITTEN", flush=True)
""")
    assert proc.returncode == -signal.SIGSEGV
    assert "ARMED" in proc.stdout and "WRITTEN" not in proc.stdout


def test_selftest_and_info_say_what_is_missing():
    selftest = _run("", "-m", "prmem", "selftest")
    assert selftest.returncode == 0, selftest.stdout
    assert "SKIPPED (kernel lacks memfd" in selftest.stdout
    assert "WARNING" in selftest.stdout
    info = _run("", "-m", "prmem", "info")
    assert "no memfd_create()" in info.stdout
