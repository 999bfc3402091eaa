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
WORKLOADS = ["alloc", "rare_write", "protect", "read", "overhead", "frozen", "share", "access"]


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
