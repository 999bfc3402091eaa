"""Without memfd_create() prmem falls back to unnamed /dev/shm files.

PRMEM_DISABLE_FEATURES=memfd makes prmem behave as on such a kernel.  Write-rare still
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
    env = dict(os.environ, PRMEM_DISABLE_FEATURES="memfd")
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


def _run_without(features: str, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PRMEM_DISABLE_FEATURES=features)
    return subprocess.run([sys.executable, "-c", CHILD_PRELUDE + code], capture_output=True,
                          text=True, timeout=120, env=env)


def test_secret_pool_without_memfd_secret_raises_unsupported_error():
    proc = _run_without("memfd_secret", """
assert "memfd_secret" not in prmem.features
try:
    Pool(Mode.RO, name="s", secret=True)
    print("created")
except prmem.UnsupportedError as e:
    assert isinstance(e, OSError)
    print("refused:", e)
Pool(Mode.RO, name="plain").alloc(8)   # other pools are unaffected
""")
    assert proc.returncode == 0, proc.stderr
    assert "refused:" in proc.stdout and "memfd_secret" in proc.stdout


def test_seal_true_without_mseal_still_seals_the_file():
    proc = _run_without("mseal", """
pool = Pool(Mode.RO, name="noms", seal=True)
a = pool.alloc(8)
pool.protect()
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
page = a.address & ~(prmem.page_size - 1)
print("mprotect", libc.mprotect(page, prmem.page_size, 3), ctypes.get_errno())
print("sl" in open("/proc/self/smaps").read().split(format(page, "x") + "-", 1)[1]
      .split("VmFlags:", 1)[1].split("\\n", 1)[0].split())
""")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert lines[0].startswith("mprotect -1 ")          # the file seal still holds
    assert lines[1] == "False"                          # but no mseal was made


def test_selftest_skips_what_the_kernel_lacks():
    env = dict(os.environ, PRMEM_DISABLE_FEATURES="mseal,memfd_secret")
    proc = subprocess.run([sys.executable, "-m", "prmem", "selftest"], capture_output=True,
                          text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout
    assert "SKIPPED (kernel lacks mseal)" in proc.stdout
    assert "SKIPPED (kernel lacks memfd_secret)" in proc.stdout


def test_unknown_feature_name_fails_the_import():
    proc = _run_without("memfd,no_such_feature", "")
    assert proc.returncode != 0
    assert "no_such_feature" in proc.stderr
