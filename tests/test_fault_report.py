"""The report printed when native code writes to protected prmem memory."""
from __future__ import annotations

import signal

import pytest

import prmem
from conftest import run_child

WRITER = """
pool = Pool(Mode.{mode}, name="policy")
a = pool.alloc(64)
b = pool.alloc(16)
b.write(b"original")
pool.protect()
{before}
def stray_writer():
    native_write(b, b"evil")  # the offending line
stray_writer()
print("SURVIVED")
"""


def _line_of(source: str, marker: str) -> int:
    from conftest import CHILD_PRELUDE
    full = (CHILD_PRELUDE + source).splitlines()
    return next(i for i, line in enumerate(full, 1) if marker in line)


@pytest.mark.no_sanitizer("asserts that ctypes.memmove() faults on its first byte; ASan's "
                          "memmove() interceptor copies backwards when the destination lies "
                          "above the source, so the report (rightly) names the last byte")
@pytest.mark.parametrize("mode, state", [("RO", "READ_ONLY"), ("WR", "WRITE_RARE")])
def test_report_names_pool_state_address_and_python_line(mode, state):
    code = WRITER.format(mode=mode, before="print(hex(b.address), flush=True)")
    proc = run_child(code)
    assert proc.returncode == -signal.SIGSEGV
    assert "SURVIVED" not in proc.stdout
    err = proc.stderr
    assert "prmem: fatal write to protected memory" in err
    assert "pool: 'policy'" in err
    assert f"mode: {mode}" in err
    assert f"area state: {state}" in err
    address = proc.stdout.split()[0]
    assert f"address: {address}" in err
    assert "offset in pool: 0x40" in err  # b sits right after the 64-byte a
    line = _line_of(code, "# the offending line")
    assert f'File "<string>", line {line} in stray_writer' in err


@pytest.mark.parametrize("before", [
    # faulthandler first, then prmem protects: prmem goes on top
    "",
    # faulthandler enabled after the handler went in: fault_report(True)
    # puts the report back in front
    "import faulthandler; faulthandler.enable(); prmem.fault_report(True)",
])
def test_report_chains_to_faulthandler(before):
    code = WRITER.format(mode="RO", before=before)
    if not before:
        code = "import faulthandler; faulthandler.enable()\n" + code
    proc = run_child(code)
    assert proc.returncode == -signal.SIGSEGV
    assert "pool: 'policy'" in proc.stderr
    assert "Fatal Python error: Segmentation fault" in proc.stderr
    assert "in stray_writer" in proc.stderr
    # the report comes before faulthandler's traceback, once
    assert proc.stderr.count("fatal write to protected memory") == 1
    assert proc.stderr.index("pool: 'policy'") < proc.stderr.index("Fatal Python error")


def test_faults_outside_prmem_pass_through_unchanged():
    proc = run_child("""
pool = Pool(Mode.RO, name="policy")
pool.alloc(8)
pool.protect()
ctypes.memmove(8, b"x", 1)   # NULL-page write: not prmem memory
""")
    assert proc.returncode == -signal.SIGSEGV
    assert "prmem" not in proc.stderr


def test_report_can_be_switched_off():
    proc = run_child(WRITER.format(mode="RO", before="assert prmem.fault_report(False) is True"))
    assert proc.returncode == -signal.SIGSEGV
    assert "prmem" not in proc.stderr


def test_report_is_off_until_something_is_protected():
    # No protected area yet: the process's SIGSEGV disposition is untouched.
    proc = run_child("""
pool = Pool(Mode.RO, name="policy")
a = pool.alloc(8)
import signal as s
print(s.getsignal(s.SIGSEGV) == s.SIG_DFL)
""")
    assert proc.stdout.split() == ["True"]


def test_fault_report_query_and_toggle():
    previous = prmem.fault_report()
    try:
        assert prmem.fault_report(False) == previous
        assert prmem.fault_report() is False
        assert prmem.fault_report(True) is False
        assert prmem.fault_report() is True
    finally:
        prmem.fault_report(previous)


needs_mseal = pytest.mark.skipif("mseal" not in prmem.features, reason="kernel lacks mseal")


def test_report_past_ten_thousand_ranges():
    # 5000 live pools and 5000 destroyed seal=True pools (their mseal()ed
    # chunks stay mapped, and registered, for good) come before the pool
    # that is hit: the registry has no cap.  Without mseal the sealed
    # pools' ranges are released instead; the test holds either way.
    proc = run_child("""
import resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one memfd per live pool
live = []
for i in range(5000):
    pool = Pool(Mode.RO, name="live-%d" % i, refill=4096)
    pool.alloc(8)
    if i % 2:
        pool.protect()
    live.append(pool)
for i in range(5000):
    pool = Pool(Mode.RO, name="sealed-%d" % i, refill=4096, seal=True)
    pool.alloc(8)
    pool.protect()
    pool.destroy()
last = Pool(Mode.RO, name="after-10000", refill=4096)
a = last.alloc(8)
last.protect()
native_write(a)
print("SURVIVED")
""", timeout=60)  # the whole child takes well under a second
    assert proc.returncode == -signal.SIGSEGV, proc.stderr[-2000:]
    assert "SURVIVED" not in proc.stdout
    assert "prmem: fatal write to protected memory" in proc.stderr
    assert "pool: 'after-10000'  mode: RO  area state: READ_ONLY" in proc.stderr


@needs_mseal
def test_report_names_destroyed_sealed_pool():
    # A destroyed seal=True pool's memory stays mapped read-only for good:
    # a stray write there still says whose it was.
    proc = run_child("""
pool = Pool(Mode.RO, name="retired", seal=True)
a = pool.alloc(64)
a.write(b"kept")
pool.protect()
address = a.address
pool.destroy()
other = Pool(Mode.RO, name="other")  # a live pool too
other.alloc(8)
other.protect()
ctypes.memmove(address + 8, b"e", 1)  # one byte: any memmove faults on it
print("SURVIVED")
""")
    assert proc.returncode == -signal.SIGSEGV
    assert "SURVIVED" not in proc.stdout
    assert "prmem: fatal write to protected memory" in proc.stderr
    assert "pool: 'retired' (destroyed)  mode: RO  area state: READ_ONLY" in proc.stderr
    assert "offset in chunk: 0x8" in proc.stderr


def test_report_survives_many_pools_coming_and_going():
    # Ranges of destroyed (unmapped) pools are taken out: after thousands
    # of pools came and went, a pool created before them is still found.
    proc = run_child("""
first = Pool(Mode.RO, name="first")
fa = first.alloc(8)
first.protect()
for i in range(6000):
    p = Pool(Mode.WR, name="churn-%d" % i, refill=4096)
    p.alloc(8)
    p.protect()
    p.destroy()
last = Pool(Mode.RO, name="last")
last.alloc(8)
last.protect()
native_write(fa)
""")
    assert proc.returncode == -signal.SIGSEGV
    assert "pool: 'first'  mode: RO  area state: READ_ONLY" in proc.stderr


def test_report_truncates_long_names_on_a_character_boundary():
    name = "é" * 40  # 80 bytes of UTF-8: cut to at most 63, whole characters
    proc = run_child(f"""
pool = Pool(Mode.RO, name={name!r})
a = pool.alloc(8)
pool.protect()
native_write(a)
""")
    assert proc.returncode == -signal.SIGSEGV
    assert "pool: '" + "é" * 31 + "'  mode: RO" in proc.stderr
