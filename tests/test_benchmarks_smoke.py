"""Smoke test of the benchmark suite: ``python -m benchmarks --quick`` runs
every workload to the end and writes its JSON report.

No timing is asserted: benchmarks report numbers, they do not judge them.
The suite runs with the interpreter running the tests, so it measures the
same prmem they import (installed, or from PYTHONPATH); numpy and matplotlib
are optional (without them the reader runs, the read workload and the plots
are skipped with a message).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKLOADS = ["alloc", "rare_write", "protect", "read", "overhead", "frozen", "share",
             "lifecycle", "access"]


@pytest.mark.skipif(not (REPO / "benchmarks" / "__main__.py").is_file(),
                    reason="benchmarks/ is not part of this checkout")
@pytest.mark.no_sanitizer("the alloc workload fills the process up to vm.max_map_count "
                          "(libsodium guard pages) on purpose; ASan's own mmap() then "
                          "fails and it aborts")
def test_quick_benchmark_run_writes_report(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    document = json.loads((out / "latest.json").read_text(encoding="utf-8"))
    assert document["run"]["mode"] == "quick"
    assert document["run"]["failed"] == []
    assert list(document["workloads"]) == WORKLOADS
    for name in WORKLOADS:
        workload = document["workloads"][name]
        assert "error" not in workload, workload.get("error")
        assert "rows" in workload and "notes" in workload
    assert (out / "latest.md").is_file()

    # frozen: every lookup case has its rows, every target a value
    frozen = document["workloads"]["frozen"]
    cases = {r["dataset"] for r in frozen["rows"]}
    assert cases == {"int", "int_hot", "str", "nested"}, cases
    assert all(r["error"] is None for r in frozen["rows"]), [
        (r["label"], r["error"]) for r in frozen["rows"] if r["error"]]
    # frozendict and immutables are optional (prmem[bench]); dict, pickle and
    # the memory measures are always there
    own = [t for t in frozen["targets"]
           if "frozendict" not in t["name"] and "immutables" not in t["name"]]
    assert len(own) == 7 and all(t["value"] is not None for t in own), frozen["targets"]

    # lifecycle: every section ran and produced its rows; no values judged
    life = document["workloads"]["lifecycle"]
    assert life["section_errors"] == {}, life["section_errors"]
    assert all(r["error"] is None for r in life["rows"]), [
        (r["section"], r["label"], r["error"]) for r in life["rows"] if r["error"]]
    sections = {r["section"] for r in life["rows"]}
    assert {"fork", "destroy", "gil", "threads", "protect_read", "floor"} <= sections, sections
    fork_rows = {(r["group"], r["impl"]) for r in life["rows"] if r["section"] == "fork"}
    for impl in ("nothing", "bytearray", "pool_writable", "pool_wr", "pool_ro"):
        assert ("fork+exit", impl) in fork_rows, impl
    for impl in ("bytearray", "pool_writable", "pool_wr"):
        assert ("fork+first change", impl) in fork_rows, impl
    assert all(life["info"]["fork"]["checks"].values()), life["info"]["fork"]["checks"]
    assert life["thp"]["shmem_enabled"] is not None or not Path(
        "/sys/kernel/mm/transparent_hugepage/shmem_enabled").exists()
    by_name = {t["name"]: t for t in life["targets"]}
    assert len(by_name) == 7, list(by_name)
    # the GIL verdict may be inconclusive (None) on a busy machine; the C
    # floor is missing only when the compiler was skipped with a message
    for name, t in by_name.items():
        if name.startswith("GIL"):
            assert t["value"] in (True, False, None)
        elif "C pwrite" in name or "C statx" in name:
            assert t["value"] is not None or any(
                "C pwrite floor" in s for s in document["skipped"]), t
        else:
            assert t["value"] is not None, t

