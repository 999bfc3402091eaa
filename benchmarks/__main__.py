"""``python -m benchmarks``: run the prmem benchmark suite.

Runs the selected workloads in this one process, prmem side by side with
its peers, then writes ``<out>/latest.json``, ``<out>/latest.md`` and, if
matplotlib is importable, PNG plots; prints a short summary at the end.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback
from typing import Any, Dict, List, Optional, Sequence

from . import SCHEMA_VERSION, peers
from .harness import CpuLoadProbe, RunContext, busy_processes, machine_info
from .report import (NOISY_LOAD, all_targets_markdown, text_table, try_import_pyplot,
                     workload_markdown, write_json, write_markdown)
from .workloads import WORKLOADS

# Untracked (.gitignore): a run leaves a fresh clone clean.  The copy that
# docs/performance.md cites is benchmarks/results/, updated deliberately with
# --out benchmarks/results.
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "local")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark prmem against libsodium, OpenSSL's secure heap, "
                    "naive mmap/mprotect and bytearray.")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and short budgets (whole run within about a "
                             "minute), for CI smoke runs")
    parser.add_argument("--only", metavar="NAME[,NAME]",
                        help=f"run only these workloads (of: {', '.join(WORKLOADS)})")
    parser.add_argument("--out", metavar="DIR", default=DEFAULT_OUT,
                        help="where latest.json, latest.md and plots go (default: "
                             "benchmarks/results/local, untracked; the committed copy is "
                             "benchmarks/results)")
    parser.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    args = parser.parse_args(argv)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in WORKLOADS]
        if unknown or not names:
            parser.error(f"unknown workload(s) {', '.join(unknown) or '(none given)'}; "
                         f"available: {', '.join(WORKLOADS)}")
        args.selected = [n for n in WORKLOADS if n in names]
    else:
        args.selected = list(WORKLOADS)
    return args


def _loadavg_now() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    ctx = RunContext(quick=args.quick, out_dir=args.out)
    started = datetime.datetime.now(datetime.timezone.utc)
    t_start = time.perf_counter()
    load_probe = CpuLoadProbe()
    mode = "quick" if args.quick else "full"
    ctx.log(f"prmem benchmarks, {mode} mode: {', '.join(args.selected)} -> {args.out}")

    machine = machine_info()
    machine.update(peers.versions())
    machine["ctypes_call_ns"] = peers.ctypes_call_ns()
    if machine.get("libsodium") is None:
        ctx.log("libsodium not found: its rows will be skipped")
    results: Dict[str, Any] = {}
    failed: List[str] = []
    for name in args.selected:
        module = WORKLOADS[name]
        t0 = time.perf_counter()
        workload_probe = CpuLoadProbe()
        try:
            result = module.run(ctx)
        except Exception:
            failed.append(name)
            tb = traceback.format_exc()
            print(f"[{name}] FAILED:\n{tb}", file=sys.stderr, flush=True)
            results[name] = {"title": module.TITLE, "error": tb}
            continue
        result["title"] = module.TITLE
        result["duration_s"] = time.perf_counter() - t0
        result["other_cpu_load"] = workload_probe.other_load()
        result["noisy"] = (result["other_cpu_load"] or 0) > NOISY_LOAD
        results[name] = result
        ctx.log(f"[{name}] done in {result['duration_s']:.1f} s")

    duration = time.perf_counter() - t_start
    machine["loadavg_at_end"] = _loadavg_now()
    machine["busy_processes_at_end"] = busy_processes()
    machine["other_cpu_load_during_run"] = load_probe.other_load()
    if (machine["other_cpu_load_during_run"] or 0) > NOISY_LOAD:
        print(f"note: other processes used {machine['other_cpu_load_during_run']:.0%} of the "
              "machine's CPU time during this run; expect noisier numbers", flush=True)
    argv_text = "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    document = {
        "schema": SCHEMA_VERSION,
        "run": {"mode": mode, "started": started.isoformat(timespec="seconds"),
                "duration_s": duration, "argv": argv_text, "workloads": args.selected,
                "failed": failed},
        "machine": machine,
        "skipped": ctx.skipped,
        "workloads": results,
    }

    sections = [all_targets_markdown(results)]
    for name, result in results.items():
        if "error" in result and "rows" not in result:
            sections.append(f"## {result['title']}\n\nFAILED:\n\n```\n{result['error']}```\n")
        else:
            sections.append(workload_markdown(WORKLOADS[name], result))

    plots: List[str] = []
    if not args.no_plots:
        plt = try_import_pyplot()
        if plt is None:
            print("matplotlib is not installed: skipping the PNG plots "
                  "(pip install matplotlib to get them)", flush=True)
        else:
            for name, result in results.items():
                if "rows" not in result:
                    continue
                try:
                    plots += WORKLOADS[name].plot(result, args.out, plt)
                except Exception:
                    print(f"[{name}] plotting failed:\n{traceback.format_exc()}",
                          file=sys.stderr, flush=True)
    document["plots"] = [os.path.basename(p) for p in plots]
    if plots:
        sections.append("## Plots\n\n" + "\n".join(
            f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots) + "\n")

    json_path = os.path.join(args.out, "latest.json")
    md_path = os.path.join(args.out, "latest.md")
    write_json(json_path, document)
    write_markdown(md_path, document, sections)

    summary_rows: List[List[str]] = []
    for name, result in results.items():
        if "rows" in result:
            summary_rows += WORKLOADS[name].summary(result)
        else:
            summary_rows.append([name, "FAILED (see stderr)"])
    print()
    print(text_table(["measure", "value"], summary_rows))
    print()
    print(f"wrote {json_path} and {md_path}"
          + (f" and {len(plots)} plot(s)" if plots else "")
          + f" in {duration:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
