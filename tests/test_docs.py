"""The documentation is tested like code.

- Every ```python block of README.md and docs/*.md runs: each file's blocks
  in order, in one namespace, in a fresh interpreter (examples may call
  process-wide things such as ``prmem.mark_init_done()``).  A traceback
  names the Markdown file and line.
- A block preceded by ``<!-- docs-test: pytest -->`` is a test module: the
  file's such blocks are run by pytest instead, each as its own test file.
- A block that cannot run says so: ``<!-- docs-test: skip: <reason> -->``.
- Every code fence names its language (``text``, ``sh``, ...), so no Python
  example hides in an unlabelled fence.
- ``mkdocs build --strict`` (mkdocs.yml: these pages and the API reference
  generated from the docstrings) succeeds.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List, NamedTuple, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))

_FENCE = re.compile(r"^( *)(```+|~~~+)\s*([^\s`]*)(.*)$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*docs-test:\s*(.*?)\s*-->\s*$")


class Block(NamedTuple):
    path: str          # relative to the repository root
    line: int          # line of the first line of code (1-based)
    lang: str
    code: str
    directive: Optional[str]


def blocks(page: Path) -> List[Block]:
    """The fenced code blocks of a Markdown page (indented fences too, as in
    list items), with the ``docs-test`` directive just above each."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3)
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        d = _DIRECTIVE.match(lines[j]) if j >= 0 else None
        end = i + 1
        while end < len(lines) and not (lines[end].startswith(indent + fence[0] * len(fence))
                                        and not lines[end].strip().strip(fence[0])):
            end += 1
        body = [line[len(indent):] if line.startswith(indent) else line.lstrip()
                for line in lines[i + 1:end]]
        found.append(Block(str(page.relative_to(ROOT)), i + 2, lang, "\n".join(body) + "\n",
                           d.group(1) if d else None))
        i = end + 1
    return found


ALL = [b for page in PAGES for b in blocks(page)]
RUN = "run"


def kind(block: Block) -> str:
    """run, pytest or skip for a python block."""
    if block.directive is None:
        return RUN
    if block.directive == "pytest":
        return "pytest"
    if re.match(r"skip:\s*\S", block.directive):
        return "skip"
    raise ValueError(f"{block.path}:{block.line}: unknown docs-test directive "
                     f"{block.directive!r} (use 'pytest' or 'skip: <reason>')")


def python_pages(wanted: str) -> List[str]:
    return sorted({b.path for b in ALL if b.lang == "python" and kind(b) == wanted})


def test_every_fence_names_its_language_and_directives_are_known():
    unlabelled = [f"{b.path}:{b.line - 1}" for b in ALL if not b.lang]
    assert not unlabelled, f"code fences without a language: {unlabelled}"
    misplaced = [f"{b.path}:{b.line}" for b in ALL if b.directive and b.lang != "python"]
    assert not misplaced, f"docs-test directives above non-python blocks: {misplaced}"
    for b in ALL:
        if b.lang == "python":
            kind(b)  # raises on an unknown directive


def test_the_pages_have_examples():
    # the collector finds what it should: a parser that found nothing would
    # pass every test below
    runnable = {b.path for b in ALL if b.lang == "python" and kind(b) == RUN}
    assert {"README.md", "docs/usage.md", "docs/testing.md"} <= runnable
    assert "docs/testing.md" in python_pages("pytest")


RUNNER = textwrap.dedent("""
    import json, sys
    namespace = {"__name__": "__main__"}
    for block in json.load(sys.stdin):
        # line numbers of the Markdown file: tracebacks point into it
        source = "\\n" * (block["line"] - 1) + block["code"]
        print("docs-test: running %s:%d" % (block["path"], block["line"]), flush=True)
        exec(compile(source, block["path"], "exec"), namespace)
    print("docs-test: all blocks ran", flush=True)
""")


@pytest.mark.parametrize("page", python_pages(RUN))
def test_python_blocks_run(page):
    todo = [b._asdict() for b in ALL if b.path == page and b.lang == "python"
            and kind(b) == RUN]
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(todo),
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.rstrip().endswith("docs-test: all blocks ran")


@pytest.mark.parametrize("page", python_pages("pytest"))
def test_pytest_blocks_pass(page, tmp_path):
    todo = [b for b in ALL if b.path == page and b.lang == "python" and kind(b) == "pytest"]
    for b in todo:
        name = "test_%s_line%d.py" % (re.sub(r"\W", "_", Path(b.path).stem), b.line)
        (tmp_path / name).write_text(b.code)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-W", "error", str(tmp_path)],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert re.search(r"^\d+ passed", proc.stdout.splitlines()[-1]), proc.stdout


def test_usage_states_the_real_pool_signature_and_stats_fields():
    # prose the code blocks do not run: the signature and the list of
    # PoolStats fields in docs/usage.md
    import dataclasses
    import inspect

    import prmem

    text = (ROOT / "docs" / "usage.md").read_text(encoding="utf-8")
    documented = re.search(r"`prmem\.Pool\((.*?)\)`", text, re.S).group(1)
    parameters = inspect.signature(prmem.Pool).parameters
    names = []
    for name, p in parameters.items():
        if p.kind is inspect.Parameter.KEYWORD_ONLY and "*" not in names:
            names.append("*")
        names.append(name)
    assert [p.strip().split("=")[0] for p in documented.split(",")] == names
    defaults = eval("dict(%s)" % documented.replace("*,", ""), {"Mode": prmem.Mode})
    assert defaults == {name: p.default for name, p in parameters.items()}
    listed = re.search(r"a `PoolStats` with (.*?)Like\s+every\s+other\s+method", text, re.S).group(1)
    assert set(re.findall(r"`(\w+)`", listed)) == \
        {f.name for f in dataclasses.fields(prmem.PoolStats)}


@pytest.mark.no_sanitizer("builds HTML with mkdocs: nothing of prmem's C code to check")
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install '.[docs]')")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                           "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    reference = (tmp_path / "site" / "reference" / "index.html").read_text()
    for name in ("prmem.Pool.alloc", "prmem.rare_write", "prmem.FrozenMap",
                 "prmem.testing.assert_protected", "prmem.pytest_plugin.prmem_pool"):
        assert f'id="{name}"' in reference, name
    home = (tmp_path / "site" / "index.html").read_text()
    assert "Threat model in a paragraph" in home   # README.md is the home page
