"""docs/performance.md shows one benchmark run: the committed
benchmarks/results/latest.json.  Its generated blocks must be exactly what
``python -m benchmarks.docs`` makes of that run, so a figure cannot be
edited by hand or left over from an earlier run."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "performance.md"
RUN = REPO / "benchmarks" / "results" / "latest.json"

pytestmark = pytest.mark.skipif(not (REPO / "benchmarks" / "docs.py").is_file(),
                                reason="benchmarks/ is not part of this checkout")


def test_performance_doc_matches_the_committed_run():
    result = subprocess.run([sys.executable, "-m", "benchmarks.docs", "--check"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_committed_run_is_one_full_run_of_every_workload():
    document = json.loads(RUN.read_text(encoding="utf-8"))
    from importlib import import_module
    sys.path.insert(0, str(REPO))
    try:
        workloads = import_module("benchmarks.workloads").WORKLOADS
    finally:
        sys.path.remove(str(REPO))
    assert document["run"]["mode"] == "full"
    assert document["run"]["failed"] == []
    assert list(document["workloads"]) == list(workloads)
    # every workload has its block on the page
    keys = set(re.findall(r"<!-- generated: workload:(\w+) -->", DOC.read_text()))
    assert keys == set(workloads)


def test_the_machine_is_stated():
    machine = json.loads(RUN.read_text(encoding="utf-8"))["machine"]
    for key in ("cpu_model", "cpu_count", "kernel", "thp_enabled", "thp_shmem_enabled",
                "other_cpu_load_during_run"):
        assert machine.get(key) is not None, key
