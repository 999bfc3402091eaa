"""Writing the results: latest.json, latest.md, PNG plots, the stdout summary."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence


def fmt_num(value: Any, digits: int = 1) -> str:
    """A number for a table: thousands separators, few decimals, '—' if missing."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.{max(digits, 2)}f}"
    return str(value)


def fmt_ratio(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if value >= 100:
        return f"{value:,.0f}×"
    if value >= 10:
        return f"{value:.1f}×"
    return f"{value:.2f}×"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "| " + " | ".join("---" for _ in headers) + " |"]
    for row in rows:
        cells = [c if isinstance(c, str) else fmt_num(c) for c in row]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(map(str, r)) for r in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(cells)).rstrip()
    out = [line(headers), line(["-" * w for w in widths])]
    out.extend(line(r) for r in rows)
    return "\n".join(out)


def fmt_target_value(target: Dict[str, Any]) -> str:
    """A target's measured value: ns (unit "ns"), yes/no (unit "yesno"), else a ratio."""
    value = target.get("value")
    if target.get("unit") == "ns":
        return fmt_num(value) + " ns"
    if target.get("unit") == "yesno":
        return "—" if value is None else ("yes" if value else "no")
    return fmt_ratio(value)


def targets_table(targets: List[Dict[str, Any]]) -> str:
    return md_table(
        ["ratio", "measured", "target", "met", "what it compares"],
        [[t["name"], fmt_target_value(t),
          t["target"], "—" if t.get("met") is None else ("yes" if t["met"] else "NO"),
          t.get("description", "")] for t in targets])


#: A workload during which other processes used more than this fraction of
#: the machine's CPU time is flagged as noisy in the reports.
NOISY_LOAD = 0.10


def noise_note(result: Dict[str, Any]) -> str:
    """One line on how busy the machine was while a workload ran."""
    load = result.get("other_cpu_load")
    if load is None:
        return "_Other processes' CPU use during this workload: unknown._"
    text = f"Other processes used {load:.0%} of the machine's CPU time during this workload"
    if load > NOISY_LOAD:
        return f"**NOISY: {text.lower()[0]}{text[1:]}; its figures are less reliable.**"
    return f"_{text}._"


def workload_markdown(module: Any, result: Dict[str, Any]) -> str:
    """A workload's section, with the noise line under its heading."""
    text = module.markdown(result)
    head, sep, rest = text.partition("\n")
    return f"{head}\n\n{noise_note(result)}\n{rest}"


def all_targets_markdown(results: Dict[str, Dict[str, Any]]) -> str:
    """Every workload's targets in one table, noisy workloads flagged."""
    rows = []
    for name, result in results.items():
        for t in result.get("targets") or []:
            met = "—" if t.get("met") is None else ("yes" if t["met"] else "NO")
            rows.append([name + (" (noisy)" if result.get("noisy") else ""), t["name"],
                         fmt_target_value(t), t["target"], met])
    return "## Targets\n\n" + md_table(["workload", "ratio", "measured", "target", "met"],
                                         rows) + "\n"


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    return str(obj)


def _clean_floats(obj: Any) -> Any:
    """NaN/inf are not JSON: turn them into null."""
    if isinstance(obj, float):
        return None if (math.isnan(obj) or math.isinf(obj)) else obj
    if isinstance(obj, dict):
        return {k: _clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_floats(v) for v in obj]
    return obj


def write_json(path: str, document: Dict[str, Any]) -> None:
    _write_atomic(path, json.dumps(_clean_floats(document), indent=2, sort_keys=False,
                                   default=_json_default, ensure_ascii=False) + "\n")


def machine_markdown(machine: Dict[str, Any]) -> str:
    keys = [
        ("kernel", "kernel"), ("cpu_model", "CPU"), ("cpu_count", "CPUs"),
        ("python", "Python"), ("numpy", "numpy"), ("prmem", "prmem"),
        ("prmem_commit", "prmem commit"), ("prmem_features", "prmem features"),
        ("libsodium", "libsodium"), ("openssl", "OpenSSL"), ("page_size", "page size"),
        ("vm_max_map_count", "vm.max_map_count"), ("clocksource", "clocksource"),
        ("thp_enabled", "transparent huge pages (anonymous memory)"),
        ("thp_shmem_enabled", "transparent huge pages (shmem: memfd, pools)"),
        ("timer_overhead_ns", "clock read (ns, median)"),
        ("ctypes_call_ns", "one ctypes call (ns, median)"),
        ("loadavg_at_start", "load average at start"),
        ("loadavg_at_end", "load average at end"),
        ("other_cpu_load_during_run", "CPU used by other processes during the run"),
        ("busy_processes_at_end", "busy processes at end (ps lifetime %CPU ≥ 20)"),
    ]
    rows = []
    for key, label in keys:
        value = machine.get(key)
        if isinstance(value, list):
            value = ", ".join(map(str, value)) or "—"
        rows.append([label, fmt_num(value) if not isinstance(value, str) else value])
    return md_table(["", ""], rows)


def write_markdown(path: str, document: Dict[str, Any], sections: List[str]) -> None:
    head = [
        "# prmem benchmarks",
        "",
        f"Run: **{document['run']['mode']}** mode, {document['run']['started']}, "
        f"{document['run']['duration_s']:.1f} s, one process "
        f"(`python -m benchmarks{document['run']['argv']}`).",
        "",
        "Numbers are what this run measured on this machine; nothing is "
        "asserted.  Targets are shown next to the measured ratios.",
        "",
        "## Machine",
        "",
        machine_markdown(document["machine"]),
        "",
    ]
    skipped = document.get("skipped") or []
    if skipped:
        head += ["## Skipped", ""] + [f"- {s}" for s in skipped] + [""]
    _write_atomic(path, "\n".join(head + sections).rstrip() + "\n")


def try_import_pyplot():
    """matplotlib.pyplot with a non-interactive backend, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # ImportError, or a broken installation
        return None
    return plt


def save_figure(plt, fig, out_dir: str, name: str) -> str:
    """Lay out ``fig``, write it as ``<out_dir>/<name>.png`` and close it;
    returns the path.  One place for the resolution every plot uses."""
    fig.tight_layout()
    path = os.path.join(out_dir, name + ".png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
