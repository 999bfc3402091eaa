"""prmem.features against independent probes, and the command line."""
from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys

import pytest

import prmem
from prmem.selftest import all_scenarios, run_scenario

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

SYS_MEMFD_SECRET = 447
SYS_MSEAL = 462
SYS_PKEY_ALLOC, SYS_PKEY_FREE = 330, 331
F_ADD_SEALS = 1033
F_SEAL_FUTURE_WRITE = 0x10


def _probe_memfd_secret() -> bool:
    fd = libc.syscall(ctypes.c_long(SYS_MEMFD_SECRET), ctypes.c_ulong(0))
    if fd < 0:
        return False
    os.close(fd)
    return True


def _probe_mseal() -> bool:
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    addr = libc.mmap(None, mmap.PAGESIZE, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value)
    try:
        # len 0 seals nothing: it only tells whether the syscall exists.
        return libc.syscall(ctypes.c_long(SYS_MSEAL), ctypes.c_void_p(addr),
                            ctypes.c_size_t(0), ctypes.c_ulong(0)) == 0
    finally:
        libc.munmap(addr, mmap.PAGESIZE)


def _probe_pkeys() -> bool:
    key = libc.syscall(ctypes.c_long(SYS_PKEY_ALLOC), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if key < 0:
        return False
    libc.syscall(ctypes.c_long(SYS_PKEY_FREE), ctypes.c_long(key))
    return True


def _probe_seal_future_write() -> bool:
    fd = os.memfd_create("probe", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        import fcntl
        fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_FUTURE_WRITE)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall numbers are x86_64")
@pytest.mark.parametrize("name, probe", [
    ("memfd_secret", _probe_memfd_secret),
    ("mseal", _probe_mseal),
    ("pkeys", _probe_pkeys),
    ("memfd_seal_future_write", _probe_seal_future_write),
])
def test_feature_matches_independent_probe(name, probe):
    assert (name in prmem.features) == probe()


def test_features_shape():
    assert isinstance(prmem.features, frozenset)
    assert "memfd" in prmem.features  # prmem cannot create pools without it
    assert prmem.page_size == mmap.PAGESIZE


def test_this_machine_has_what_the_guide_says():
    # Linux 6.18 VM of the project: mseal, memfd_secret, future-write seals.
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    if (major, minor) < (6, 10):
        pytest.skip("older kernel than the project machine")
    assert {"mseal", "memfd_secret", "memfd_seal_future_write"} <= prmem.features


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "prmem", *args], capture_output=True,
                          text=True, timeout=120)


def test_selftest_command_passes():
    proc = _cli("selftest")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all" in proc.stdout and "protections hold" in proc.stdout
    assert "FAIL" not in proc.stdout


def test_info_command():
    proc = _cli("info")
    assert proc.returncode == 0
    assert os.uname().release in proc.stdout
    assert f"page size: {prmem.page_size}" in proc.stdout
    for feature in prmem.features:
        assert f"[yes] {feature}" in proc.stdout


def test_info_measures_the_proc_mem_caveat():
    # prmem info does the /proc/self/mem write itself rather than assert it
    from prmem.info import probe_proc_mem
    lines = probe_proc_mem()
    assert any("private read-only mappings" in line and "measured now" in line
               for line in lines)
    assert any("prmem's protected" in line and "refused that write (EIO" in line
               for line in lines), lines


def test_console_script_installed():
    script = os.path.join(os.path.dirname(sys.executable), "prmem")
    if not os.path.exists(script):
        pytest.skip("prmem not installed as a console script in this environment")
    proc = subprocess.run([script, "info"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0


def test_selftest_detects_a_protection_that_does_not_hold():
    # The selftest must report failure when the observed outcome differs:
    # a scenario claiming a writable write faults must come out as FAIL.
    from prmem.selftest import Scenario
    bogus = Scenario("bogus", "SIGSEGV", "pool, a = filled(Mode.RO, protect=False)\n"
                     "armed()\nnative_write(a)\noutcome('written')\n")
    result = run_scenario(bogus)
    assert result.observed == "written" and not result.ok


def test_every_scenario_has_a_distinct_name():
    names = [s.name for s in all_scenarios()]
    assert all(s.requires <= {'memfd', 'memfd_seal_future_write', 'mseal', 'memfd_secret'}
               for s in all_scenarios())
    assert len(names) == len(set(names))


# ------------------------------------------------ what a new user runs first

def _script(*args, env=None):
    """Run the installed `prmem` console script (skip where there is none)."""
    script = os.path.join(os.path.dirname(sys.executable), "prmem")
    if not os.path.exists(script):
        pytest.skip("prmem not installed as a console script in this environment")
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=120,
                          env=env)


def test_version():
    for proc in (_cli("--version"), _script("--version")):
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"prmem {prmem.__version__}"


def test_version_matches_the_package_metadata():
    from importlib.metadata import version
    assert version("prmem") == prmem.__version__


def test_help_lists_every_command_on_one_line_each():
    proc = _cli("--help")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for command in ("selftest", "info", "inspect"):
        # the command, then its one-line description, on the same line
        rows = [ln for ln in lines if ln.split()[:1] == [command]]
        assert len(rows) == 1, (command, proc.stdout)
        assert len(rows[0].split()) > 2, rows[0]
    assert "--version" in proc.stdout
    assert "``" not in proc.stdout and "`" not in proc.stdout   # plain text, no markup


def test_a_closed_pipe_ends_the_output_quietly():
    # `prmem selftest | head -1`: no BrokenPipeError traceback, exit as if
    # SIGPIPE had ended it
    proc = subprocess.run(f"{sys.executable} -m prmem selftest | head -1; "
                          "echo \"status ${PIPESTATUS[0]}\"",
                          shell=True, executable="/bin/bash", capture_output=True, text=True,
                          timeout=300)
    assert proc.stdout.startswith("prmem "), proc.stdout
    assert proc.stdout.strip().endswith(f"status {128 + 13}"), proc.stdout
    assert proc.stderr == "", proc.stderr


def test_info_into_a_closed_pipe_is_quiet():
    proc = subprocess.run(f"{sys.executable} -m prmem info | head -c 10 >/dev/null",
                          shell=True, executable="/bin/bash", capture_output=True, text=True,
                          timeout=120)
    assert proc.stderr == "", proc.stderr


def test_a_failing_import_is_a_one_line_error():
    env = dict(os.environ, PRMEM_DISABLE_FEATURES="typo")
    proc = _script("info", env=env)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("prmem: cannot start: PRMEM_DISABLE_FEATURES names an "
                                  "unknown feature typo (known: memfd"), proc.stderr


def test_the_launcher_runs_the_commands():
    # the console script's module, without the script
    proc = subprocess.run([sys.executable, "-c",
                           "import sys, _prmem_cli; sys.exit(_prmem_cli.main(['--version']))"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"prmem {prmem.__version__}"
    env = dict(os.environ, PRMEM_DISABLE_FEATURES="typo")
    proc = subprocess.run([sys.executable, "-m", "_prmem_cli", "info"], capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "unknown feature typo" in proc.stderr
