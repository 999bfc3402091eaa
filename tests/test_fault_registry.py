"""The fault report's registry lives in prmem's protected metadata.

``prmem._core._fault_registry_address()`` is a test-only accessor: the
address of the registry's root block (the handler starts there).
"""
from __future__ import annotations

import signal

from conftest import assert_native_store_dies, run_child

def test_native_write_to_registry_root_faults():
    for offset in (0, 40):  # the block header, the published slots
        assert_native_store_dies(
            "import prmem._core as core\n"
            "pool = Pool(Mode.RO, name='registry')\n"
            "a = pool.alloc(64)\n"
            "pool.protect()", "core._fault_registry_address() + %d" % offset)


MANY = """
pools = []
for i in range({n}):
    p = Pool(Mode.RO, name=f"pool-{{i}}")
    x = p.alloc(64)
    x.write(b"data")
    p.protect()
    pools.append((p, x))
# destroy every third one: the registry shrinks and is rebuilt
for i in range(0, {n}, 3):
    pools[i][0].destroy()
target = pools[{pick}][1]
{before}
native_write(target, b"evil")
print("SURVIVED")
"""


def test_report_names_pool_among_hundreds():
    proc = run_child(MANY.format(n=400, pick=250, before=""))
    assert proc.returncode == -signal.SIGSEGV
    assert "SURVIVED" not in proc.stdout
    assert "prmem: fatal write to protected memory" in proc.stderr
    assert "pool: 'pool-250'  mode: RO  area state: READ_ONLY" in proc.stderr


def test_report_works_in_forked_child():
    before = """
import os
pid = os.fork()
if pid:
    _, status = os.waitpid(pid, 0)
    print("child signal", os.WTERMSIG(status) if os.WIFSIGNALED(status) else None, flush=True)
    raise SystemExit(0)
q = Pool(Mode.RO, name="child-pool")
q.alloc(8)
q.protect()
"""
    proc = run_child(MANY.format(n=200, pick=101, before=before))
    assert proc.returncode == 0, proc.stderr
    assert f"child signal {int(signal.SIGSEGV)}" in proc.stdout
    assert "pool: 'pool-101'  mode: RO  area state: READ_ONLY" in proc.stderr
