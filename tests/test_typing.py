"""The type hints catch real mistakes, and the stubs cannot drift from the C core.

- ``mypy --strict`` (the configuration in pyproject.toml) is clean on
  src/prmem (and the console script's src/_prmem_cli.py) and examples/;
- on tests/typing/api_checks.py it reports exactly the revealed types and
  errors that file's comments expect (``# N:`` / ``# E:``);
- every name in ``prmem.__all__`` is known to mypy;
- ``mypy.stubtest`` finds src/prmem/_core.pyi in agreement with the built
  ``prmem._core``: every public name of the module is in the stub, with the
  same kind and signature, and nothing is in the stub that the module lacks.

One mypy run covers the first three (about 3 s uncached on this machine,
``--cache-dir=/dev/null``), stubtest about 2 s.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

import prmem

ROOT = Path(__file__).resolve().parent.parent
CHECKS = "tests/typing/api_checks.py"
# __buffer__ exists at run time from Python 3.12 on (PEP 688); the stubs
# declare it so that type checkers know Allocation is a buffer
ALLOWLIST_BEFORE_3_12 = ROOT / "tests" / "typing" / "stubtest_allowlist_before_3_12.txt"

pytestmark = pytest.mark.no_sanitizer(
    "static checks of the sources and the stubs: the sanitized build adds nothing to them")

_LINE = re.compile(r"^(?P<file>[^:\s][^:]*):(?P<line>\d+): (?P<kind>error|note): (?P<msg>.*)$")
_EXPECT = re.compile(r"\S  # (?P<kind>[EN]): (?P<msg>.*)$")  # code, then the comment


def _run(args: List[str]) -> subprocess.CompletedProcess[str]:
    try:
        import mypy  # noqa: F401
    except ImportError:
        pytest.fail("mypy is not installed: pip install '.[test]' (it is in the test extra)")
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def mypy_report(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, List[Tuple[int, str, str]]]:
    """{file: [(line, "error"/"note", message)]} of one strict mypy run."""
    names = tmp_path_factory.mktemp("typing") / "public_names.py"
    names.write_text("import prmem\n\n" + "".join(
        f"print(prmem.{name})\n" for name in prmem.__all__))
    proc = _run(["mypy", "--config-file", "pyproject.toml", "--cache-dir", os.devnull,
                 "--no-pretty", "--no-error-summary", "--hide-error-context",
                 "src/prmem", "src/_prmem_cli.py", "examples", CHECKS, str(names)])
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # 2: mypy itself failed
    report: Dict[str, List[Tuple[int, str, str]]] = {}
    for line in proc.stdout.splitlines():
        m = _LINE.match(line)
        assert m, f"unexpected mypy output: {line!r}\n{proc.stdout}"
        path = os.path.relpath(m["file"], ROOT) if os.path.isabs(m["file"]) else m["file"]
        if path == str(names):
            path = "public_names.py"
        report.setdefault(path, []).append((int(m["line"]), m["kind"], m["msg"]))
    return report


def test_mypy_strict_is_clean_on_the_package_and_examples(mypy_report):
    unexpected = {path: found for path, found in mypy_report.items() if path != CHECKS}
    assert not unexpected, "\n".join(f"{path}:{line}: {kind}: {msg}"
                                     for path, found in unexpected.items()
                                     for line, kind, msg in found)


def _normal(message: str) -> str:
    # mypy 1.x writes "builtins.int" in revealed types, 2.x "int"
    return message.replace("builtins.", "")


def test_mypy_reports_exactly_what_the_typing_checks_expect(mypy_report):
    expected: Set[Tuple[int, str]] = set()
    source = (ROOT / CHECKS).read_text().splitlines()
    for number, text in enumerate(source, start=1):
        m = _EXPECT.search(text)
        if m:
            expected.add((number, f"{m['kind']}: {_normal(m['msg'])}"))
    assert len(expected) > 30, "the typing checks lost their expectations"
    got: Set[Tuple[int, str]] = set()
    for line, kind, msg in mypy_report.get(CHECKS, []):
        if kind == "error":
            got.add((line, f"E: {_normal(msg)}"))
        elif msg.startswith("Revealed type is"):
            got.add((line, f"N: {_normal(msg)}"))
        # other notes (the overload variants mypy lists) are not compared
    missing = sorted(expected - got)
    extra = sorted(got - expected)
    assert not missing and not extra, (
        "mypy disagrees with " + CHECKS + ":\n"
        + "".join(f"  expected, not reported: line {n}: {m}\n" for n, m in missing)
        + "".join(f"  reported, not expected: line {n}: {m}\n" for n, m in extra))


def test_every_public_name_is_known_to_mypy(mypy_report):
    assert "public_names.py" not in mypy_report, mypy_report["public_names.py"]
    assert "fault_report" in prmem.__all__


def test_stubs_match_the_c_core():
    args = ["mypy.stubtest", "prmem._core", "--mypy-config-file", "pyproject.toml"]
    if sys.version_info < (3, 12):
        args += ["--allowlist", str(ALLOWLIST_BEFORE_3_12)]
    proc = _run(args)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_public_name_of_the_c_core_is_in_the_stub():
    # what stubtest checks, said plainly: a name the C core gains must be
    # added to src/prmem/_core.pyi
    stub = (ROOT / "src" / "prmem" / "_core.pyi").read_text()
    declared = {a or b for a, b in re.findall(r"^(?:class|def) (\w+)|^(\w+):", stub, re.M)}
    runtime = {name for name in vars(prmem._core) if not name.startswith("__")}
    assert runtime - declared == set(), "missing from _core.pyi"
