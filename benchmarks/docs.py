"""``python -m benchmarks.docs``: put one benchmark run into docs/performance.md.

Every figure in docs/performance.md comes from one run: the committed
``benchmarks/results/latest.json``.  The page holds generated blocks,

    <!-- generated: KEY -->
    ...
    <!-- end generated -->

and this module fills each from that JSON with the same code that writes
``latest.md``: KEY is ``run`` (when, how long, which commit), ``machine``,
``targets`` (every workload's targets, noisy workloads flagged) or
``workload:NAME`` (that workload's section, its noise line included).  The
prose around the blocks carries no figures of its own.

    python -m benchmarks.docs            # rewrite the blocks in place
    python -m benchmarks.docs --check    # exit 1 if a block differs

``tests/test_performance_doc.py`` runs ``--check``, so the page cannot
drift from the committed run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Dict, Optional, Sequence

from .report import all_targets_markdown, machine_markdown, workload_markdown
from .workloads import WORKLOADS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_JSON = os.path.join(REPO, "benchmarks", "results", "latest.json")
DEFAULT_DOC = os.path.join(REPO, "docs", "performance.md")
BLOCK = re.compile(r"(<!-- generated: (?P<key>[\w:]+) -->\n)(?P<body>.*?)(<!-- end generated -->)",
                   re.S)


def _demote(markdown: str) -> str:
    """Headings one level down: a workload's '## ' section sits under the
    page's own '## ' headings."""
    return re.sub(r"^(#{2,5}) ", lambda m: "#" + m.group(1) + " ", markdown, flags=re.M)


def _escape(markdown: str) -> str:
    """Brackets as text: "m[a][b]" in a row label would read as a Markdown
    reference link (and fail the strict docs build)."""
    return markdown.replace("[", "\\[").replace("]", "\\]")


def render(document: Dict[str, Any], key: str) -> str:
    """The Markdown of block ``key`` for run ``document``."""
    run = document["run"]
    machine = document["machine"]
    if key == "run":
        load = machine.get("other_cpu_load_during_run")
        load_text = "unknown" if load is None else f"{load:.0%}"
        return (f"Run of {run['started']} ({run['mode']} mode, {run['duration_s']:.0f} s, "
                f"`python -m benchmarks{run['argv']}`) on prmem commit "
                f"`{machine.get('prmem_commit')}`; other processes used {load_text} of the "
                f"machine's CPU time over the whole run.\n")
    if key == "machine":
        return machine_markdown(machine) + "\n"
    results = document["workloads"]
    if key == "targets":
        return _escape(all_targets_markdown(results).split("\n", 2)[2])
    if key.startswith("workload:"):
        name = key.split(":", 1)[1]
        result = results.get(name)
        if result is None or "rows" not in result:
            return f"_The run has no results for `{name}`._\n"
        return _escape(_demote(workload_markdown(WORKLOADS[name], result)))
    raise KeyError(f"unknown generated block {key!r}")


def update(text: str, document: Dict[str, Any]) -> str:
    """``text`` with every generated block filled from ``document``."""
    return BLOCK.sub(lambda m: m.group(1) + render(document, m.group("key")) + m.group(4), text)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.docs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=DEFAULT_JSON, help="the run (default: %(default)s)")
    parser.add_argument("--doc", default=DEFAULT_DOC, help="the page (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a block is not what the run gives")
    args = parser.parse_args(argv)
    with open(args.json, encoding="utf-8") as f:
        document = json.load(f)
    with open(args.doc, encoding="utf-8") as f:
        text = f.read()
    if not BLOCK.search(text):
        print(f"{args.doc}: no generated blocks", file=sys.stderr)
        return 1
    new = update(text, document)
    if args.check:
        if new != text:
            stale = [m.group("key") for m, n in zip(BLOCK.finditer(text), BLOCK.finditer(new))
                     if m.group("body") != n.group("body")]
            print(f"{args.doc} does not match {args.json} in block(s): {', '.join(stale)}; "
                  "run `python -m benchmarks.docs`", file=sys.stderr)
            return 1
        return 0
    if new != text:
        with open(args.doc, "w", encoding="utf-8") as f:
            f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
