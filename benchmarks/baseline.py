"""Before/after: the same timing script against older revisions' builds and this tree.

Issue 14 (metadata protection) asks for "the alloc and rare-write rows
before and after, in one run".  A workload hands :func:`compare` a small
timing script; this module

* builds the extension of each baseline revision with the running
  interpreter (``git archive REV | tar -x`` into a temporary directory,
  then ``setup.py build_ext --inplace -q``), once per commit per run: the
  ``alloc`` and ``rare_write`` workloads share the builds;
* runs the script in a fresh subprocess per side, with ``PYTHONPATH`` set to
  that build's ``src`` -- and to the directory the running ``prmem`` comes
  from for "this tree", which so also runs in a subprocess and pays the same
  start-up, import and memory layout conditions;
* alternates the sides for several rounds (the order rotated every round),
  so drift of the machine's speed hits every side alike.

Each subprocess times ``reps`` repetitions of ``n`` calls after a warm-up
and keeps its best repetition (ns per call); a side's figure is the median
of those per-process bests over the rounds.  The ratio this tree / baseline
is taken of those medians; the spread of the per-round ratios (this tree
and the baseline timed back to back in the same round) is reported with it.

Nothing here fails a workload: without git, without the revision (a
tarball has no history), without a C compiler, or if a baseline's build or
its script fails, the comparison records a skip with the reason
(``ctx.skip``) and its rows and targets carry no value.  ``--quick`` runs
skip it ("quick run"): the builds alone take several seconds.

The builds go to a temporary directory removed when the process exits, not
under the run's output directory: ``--out benchmarks/results`` is a tracked
directory.
"""
from __future__ import annotations

import atexit
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

from .harness import RunContext, _git_commit, ratio, summarize
from .report import fmt_num, fmt_ratio, md_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: main just before issue 14's metadata work started (the merge of
#: testing-docs, parent of the first metadata merge 9823ae9): "before
#: metadata protection".  The target: this tree within 10 % of it.
BEFORE_METADATA = "859e406"
#: main when issue 14 was filed.  The issue gives "alloc ~85 ns, rare write
#: 8 B ~0.8 µs on this machine" as that day's figures and asks for "within
#: 10 % of today's figures"; the rows against it are that literal reading.
ISSUE_14_FILED = "3fe1424"

#: The baselines every comparison runs, in table order: (revision, label).
BASELINES = [
    (BEFORE_METADATA, "before metadata protection"),
    (ISSUE_14_FILED, "when issue 14 was filed"),
]

#: The bound the targets against the baselines use: this tree / baseline.
MAX_RATIO = 1.10

#: Wraps a workload's script.  The script defines ``measure(n) -> int``: the
#: ns that n calls took (its setup outside the clock).  The driver warms up,
#: times ``reps`` repetitions with the cyclic GC off and prints, as JSON,
#: where prmem came from and the ns per call of every repetition.
DRIVER = r'''
import gc, json, sys, time
import prmem
from prmem import Mode, Pool
{script}
def _main():
    n, reps = int(sys.argv[1]), int(sys.argv[2])
    gc.disable()
    measure(max(1, n // 10))
    per_call = [measure(n) / n for _ in range(reps)]
    json.dump({{"prmem_file": prmem.__file__, "ns_per_call": per_call}}, sys.stdout)
_main()
'''


class Unavailable(Exception):
    """A baseline cannot be built or run here; the message says why."""


_builds: Dict[str, Any] = {}  # commit -> (src, seconds) or Unavailable
_tmp_root: List[str] = []


def _tmp() -> str:
    if not _tmp_root:
        path = tempfile.mkdtemp(prefix="prmem-bench-baselines-")
        atexit.register(shutil.rmtree, path, True)
        _tmp_root.append(path)
    return _tmp_root[0]


def _git(*args: str) -> "subprocess.CompletedProcess[bytes]":
    try:
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, timeout=60)
    except FileNotFoundError:
        raise Unavailable("git is not installed") from None
    except (OSError, subprocess.SubprocessError) as exc:
        raise Unavailable(f"git failed: {exc}") from None


def _last_line(text: bytes) -> str:
    lines = [ln.strip() for ln in text.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def resolve(rev: str) -> str:
    """The full commit hash of ``rev`` in this checkout, or Unavailable."""
    if _git("rev-parse", "--git-dir").returncode != 0:
        raise Unavailable(f"{ROOT} is not a git checkout (no history to build baselines from)")
    got = _git("rev-parse", "--verify", "--quiet", rev + "^{commit}")
    if got.returncode != 0:
        raise Unavailable(f"revision {rev} is not in this checkout's history "
                          "(a shallow clone or another repository?)")
    return got.stdout.decode().strip()


def _compiler() -> Optional[str]:
    """The compiler setup.py would use, if it cannot be found; else None."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    words = shlex.split(cc)
    if words and shutil.which(words[0]) is None:
        return words[0]
    return None


def build(rev: str) -> Dict[str, Any]:
    """Build ``rev``'s extension in place in a temporary copy of its tree, once
    per commit per process.  Returns ``{"commit", "src", "build_s"}`` (build_s
    is the time of the build that made it, reused whether an earlier call
    did); raises Unavailable."""
    commit = resolve(rev)
    cached = _builds.get(commit)
    if isinstance(cached, Unavailable):
        raise cached
    if cached is not None:
        return dict(cached, reused=True)
    try:
        missing = _compiler()
        if missing:
            raise Unavailable(f"no C compiler ({missing} not found) to build {rev}")
        dest = os.path.join(_tmp(), commit[:12])
        os.makedirs(dest)
        t0 = time.perf_counter()
        try:
            archive = subprocess.Popen(["git", "-C", ROOT, "archive", commit],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert archive.stdout is not None and archive.stderr is not None
            tar = subprocess.run(["tar", "-x", "-C", dest], stdin=archive.stdout,
                                 capture_output=True, timeout=120)
            archive.stdout.close()
            err = archive.stderr.read()
            archive.stderr.close()
            if archive.wait(timeout=60) != 0:
                raise Unavailable(f"git archive {rev} failed: {_last_line(err)}")
            if tar.returncode != 0:
                raise Unavailable(f"unpacking {rev} failed: {_last_line(tar.stderr)}")
            made = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"],
                                  cwd=dest, capture_output=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as exc:
            raise Unavailable(f"building {rev} failed: {exc}") from None
        if made.returncode != 0:
            raise Unavailable(f"building {rev} failed: "
                              f"{_last_line(made.stderr or made.stdout)}")
        done = {"commit": commit, "src": os.path.join(dest, "src"),
                "build_s": time.perf_counter() - t0, "reused": False}
    except Unavailable as exc:
        _builds[commit] = exc
        raise
    _builds[commit] = done
    return done


def this_tree_src() -> str:
    """The directory the running prmem is imported from (src/ of this tree
    when run as ``PYTHONPATH=src:. python -m benchmarks``)."""
    import prmem

    return os.path.dirname(os.path.dirname(os.path.abspath(prmem.__file__)))


def run_script(src: str, script: str, n: int, reps: int) -> List[float]:
    """ns per call of each repetition of ``script`` (see DRIVER), run in a
    fresh interpreter that imports prmem from ``src``; raises Unavailable."""
    env = dict(os.environ, PYTHONPATH=src)
    try:
        done = subprocess.run([sys.executable, "-c", DRIVER.format(script=script), str(n),
                               str(reps)], env=env, cwd=_tmp(), capture_output=True,
                              text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        raise Unavailable(f"the timing script could not run: {exc}") from None
    if done.returncode != 0:
        raise Unavailable("the timing script failed: "
                          f"{_last_line((done.stderr or done.stdout).encode())}")
    out = json.loads(done.stdout)
    where = os.path.realpath(out["prmem_file"])
    if not where.startswith(os.path.realpath(src) + os.sep):
        raise Unavailable(f"the timing script imported prmem from {where}, not from {src}")
    return [float(x) for x in out["ns_per_call"]]


def _side(key: str, label: str, rev: Optional[str]) -> Dict[str, Any]:
    return {"key": key, "label": label, "rev": rev, "commit": None, "src": None,
            "build_s": None, "process_best_ns": [], "ns_per_call": None, "best_ns": None,
            "worst_ns": None, "error": None}


def compare(ctx: RunContext, workload: str, what: str, statement: str, script: str,
            n: int, reps: Optional[int] = None, rounds: Optional[int] = None,
            baselines: Sequence[Any] = BASELINES) -> Dict[str, Any]:
    """Time ``script`` (defining ``measure(n)``, see DRIVER) against each
    baseline's build and this tree, alternating, and return the result the
    workload stores as ``before_after``: one row per side (baselines first),
    ns per call, this tree / baseline.  ``what`` names the measure in the
    targets ("alloc", "rare_write 8 B"), ``statement`` says what is timed."""
    reps = reps if reps is not None else ctx.pick(3, 7)
    rounds = rounds if rounds is not None else ctx.pick(1, 15)
    sides = [_side(f"baseline:{rev}", label, rev) for rev, label in baselines]
    this = _side("this_tree", "this tree", None)
    this["commit"] = _git_commit(ROOT)
    this["src"] = this_tree_src()
    result: Dict[str, Any] = {
        "what": what, "statement": statement, "n": n, "reps": reps, "rounds": rounds,
        "max_ratio": MAX_RATIO, "skipped": None, "rows": sides + [this],
        "method": (f"each side in its own subprocess (fresh interpreter, PYTHONPATH = its "
                   f"build's src), {rounds} round(s) with the sides in rotated order; per "
                   f"process the best of {reps} repetitions of {n:,} calls after a warm-up, "
                   "GC off; ns per call = median of the per-process bests; ratio = this "
                   "tree / baseline of those medians, range = per-round ratios"),
    }
    if ctx.quick:
        ctx.skip(workload, "the before/after comparison", "quick run")
        result["skipped"] = "quick run"
        for side in sides:
            side["error"] = "skipped: quick run"
        return result
    ctx.log(f"[{workload}] before/after: building "
            f"{', '.join(rev for rev, _ in baselines)} ...")
    for side in sides:
        try:
            built = build(side["rev"])
        except Unavailable as exc:
            ctx.skip(workload, f"the before/after row of {side['rev']} ({side['label']})",
                     str(exc))
            side["error"] = f"skipped: {exc}"
            continue
        side.update(commit=built["commit"][:12], src=built["src"], build_s=built["build_s"],
                    build_reused=built["reused"])
    live = [s for s in sides if s["error"] is None] + [this]
    if len(live) == 1:
        reasons = list(dict.fromkeys(s["error"][len("skipped: "):] for s in sides))
        result["skipped"] = "no baseline could be built: " + "; ".join(reasons)
        return result
    ctx.log(f"[{workload}] before/after: {rounds} round(s) of {what} in subprocesses ...")
    for r in range(rounds):
        for side in live[r % len(live):] + live[:r % len(live)]:
            if side["error"] is not None:
                continue
            try:
                side["process_best_ns"].append(min(run_script(side["src"], script, n, reps)))
            except Unavailable as exc:
                ctx.skip(workload, f"the before/after row of {side['rev'] or 'this tree'}",
                         str(exc))
                side["error"] = f"skipped: {exc}"
    for side in sides + [this]:
        bests = side["process_best_ns"]
        if bests and side["error"] is None:
            side["ns_per_call"] = summarize(bests)["median"]
            side["best_ns"] = min(bests)
            side["worst_ns"] = max(bests)
    for side in sides:
        side["this_over_it"] = ratio(this["ns_per_call"], side["ns_per_call"])
        per_round = [ratio(a, b) for a, b in zip(this["process_best_ns"],
                                                 side["process_best_ns"])]
        per_round_ok = [x for x in per_round if x is not None]
        side["this_over_it_per_round"] = per_round_ok
        side["this_over_it_range"] = ([min(per_round_ok), max(per_round_ok)]
                                      if per_round_ok and side["this_over_it"] is not None
                                      else None)
    return result


def targets(before_after: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One target per baseline, in the workloads' targets format: this tree /
    baseline ≤ 1.10×.  The first baseline is the target proper, the others
    informational (their description says so)."""
    out = []
    what = before_after["what"]
    rows = [r for r in before_after["rows"] if r["key"] != "this_tree"]
    for i, row in enumerate(rows):
        value = row.get("this_over_it")
        bound = before_after["max_ratio"]
        text = (f"median ns per call of `{before_after['statement']}`, this tree and "
                f"{row['rev']} each built with this interpreter and timed alternately in "
                "subprocesses")
        if i:
            text = ("informational, the issue's literal 'within 10 % of today's figures' "
                    "(the day it was filed): " + text)
        if value is None:
            why = before_after.get("skipped")
            text += f" ({'skipped: ' + why if why else row.get('error') or 'not measured'})"
        out.append({"name": f"{what}: this tree / {row['label']} ({row['rev']})",
                    "value": value, "target": f"≤ {bound:.2f}×",
                    "met": None if value is None else value <= bound, "description": text})
    return out


def markdown(before_after: Optional[Dict[str, Any]]) -> List[str]:
    """Lines of the before/after table for a workload's section (none when the
    result has no comparison, as in runs made before it existed)."""
    if not before_after:
        return []
    out = [f"### Before/after: {before_after['what']} against earlier revisions", ""]
    if before_after.get("skipped"):
        return out + [f"_Skipped: {before_after['skipped']}._"]
    rows = []
    for r in before_after["rows"]:
        is_this = r["key"] == "this_tree"
        spread = ("—" if r["ns_per_call"] is None
                  else f"{fmt_num(r['best_ns'])}–{fmt_num(r['worst_ns'])}")
        rng = r.get("this_over_it_range")
        rows.append([r["label"], (r["commit"] if is_this else r["rev"]) or "—",
                     r["ns_per_call"] if r["ns_per_call"] is not None else "—", spread,
                     "" if is_this else fmt_ratio(r.get("this_over_it")),
                     "" if is_this or not rng else f"{fmt_ratio(rng[0])}–{fmt_ratio(rng[1])}",
                     "" if r.get("build_s") is None else f"{r['build_s']:.1f}"
                     + (" (earlier in this run)" if r.get("build_reused") else ""),
                     r["error"] or ""])
    out.append(md_table(["build", "revision", "ns per call", "per-process best, range",
                         "this tree / it", "per round", "build s", "error"], rows))
    out += ["", f"Timed: `{before_after['statement']}`; {before_after['method']}."]
    return out
