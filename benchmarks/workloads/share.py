"""share: one read-only table, several worker processes.

The same table reaches W worker processes (8; quick mode 2), which each read
all of it; measured per worker:

* *extra memory*: the growth of the worker's private memory outside shared
  mappings (Private_Clean + Private_Dirty of the non-shared mappings in
  /proc/self/smaps: what it holds for itself, unpickled objects and pages
  copied on write alike) from just before it receives the table to just
  after it has read every value.  Pages of a shared mapping (the sealed
  memfd, shared_memory) are not "extra": they exist once, whoever reads them;
* *ready time*: receiving the table, attaching or unpickling it, and the
  first lookup.

Two tables: a map of N entries (10^6; quick 2·10^4) str -> int, and a
numpy array (256 MiB; quick 8 MiB).  Ways of handing them over, side by side:

* prmem: a FrozenMap / Pool.array() view in a sealed ``Pool(share=True)``,
  sent over a multiprocessing Pipe (the descriptor travels, the worker maps
  the same pages read-only);
* dict / numpy array pickled over the same Pipe to a spawn worker;
* dict / array inherited by a fork worker, which then reads it (reading a
  dict touches the reference counts of its objects, so the pages holding
  them are copied into the worker);
* multiprocessing.shared_memory (array only: it shares bytes, not objects,
  and any process can write them).

Every worker checks its sum of the values.
"""
from __future__ import annotations

import gc
import multiprocessing
import select
import socket
import time
from multiprocessing import shared_memory
from typing import Any, Dict, List

import prmem

from ..harness import RunContext, ratio
from ..report import fmt_num, fmt_ratio, md_table, save_figure, targets_table

NAME = "share"
TITLE = "share — one sealed table read by worker processes"
MiB = 1 << 20

_inherited: Dict[str, Any] = {}  # what fork workers read without receiving it


def _uss() -> int:
    """Private memory of this process outside shared mappings, in bytes:
    what it holds for itself (objects it built, pages it copied on write).
    Shared mappings (a sealed memfd, shared_memory) are left out: their
    pages exist once, whoever maps them, though smaps calls a page
    "private" while only one process happens to map it."""
    total, shared = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):
                shared = line.split()[1][3] == "s"
            elif not shared and first in ("Private_Clean:", "Private_Dirty:"):
                total += int(line.split()[1]) * 1024
    return total


def _read_all(obj: Any) -> float:
    if hasattr(obj, "sum") and hasattr(obj, "dtype"):
        return float(obj.sum())
    return float(sum(obj.values()))


def _first(obj: Any) -> Any:
    if hasattr(obj, "dtype"):
        return obj[0]
    return obj["k0"]


def _worker(conn: Any, how: str, sock: Any = None) -> None:
    """Receive (or find) the table, read it, report, wait to be let go."""
    # modules first: importing them is not part of receiving a table
    import prmem.sharing  # noqa: F401
    try:
        import numpy
    except ImportError:
        numpy = None
    gc.collect()
    base = _uss()
    conn.send("ready")
    if how == "socket":  # prmem.send()/recv() over an AF_UNIX socket
        select.select([sock], [], [])  # the clock starts once the sender has sent
        t0 = time.perf_counter()
        message = prmem.recv(sock)
    else:
        conn.poll(None)  # the clock starts once the sender has sent
        t0 = time.perf_counter()
        message = conn.recv()
    if how == "inherited":
        obj = _inherited["table"]
    elif how == "shm":
        name, shape, dtype = message
        shm = shared_memory.SharedMemory(name=name)
        obj = numpy.ndarray(shape, dtype=dtype, buffer=shm.buf)
    else:
        obj = message
    _first(obj)
    ready = time.perf_counter() - t0
    total = _read_all(obj)
    extra = _uss() - base
    conn.send((ready, extra, total))
    conn.recv()  # stay alive (and mapped) until every worker has reported
    del obj
    if how == "shm":
        shm.close()


def _run_workers(method: str, how: str, payload: Any, workers: int) -> List[tuple]:
    ctx = multiprocessing.get_context(method)
    pipes, procs, socks = [], [], []
    for _ in range(workers):
        parent, child = ctx.Pipe()
        args: tuple = (child, how)
        if how == "socket":
            mine, theirs = socket.socketpair()
            args += (theirs,)
            socks.append(mine)
        proc = ctx.Process(target=_worker, args=args)
        proc.start()
        child.close()
        if how == "socket":
            theirs.close()
        pipes.append(parent)
        procs.append(proc)
    try:
        # one worker at a time: each one's ready time is its own, not a wait
        # for the sender to serve the others
        results = []
        for i, conn in enumerate(pipes):
            assert conn.recv() == "ready"
            if how == "socket":
                prmem.send(socks[i], payload)
            else:
                conn.send(payload)
            results.append(conn.recv())
        for conn in pipes:
            conn.send("done")
    finally:
        for proc in procs:
            proc.join(120)
        for conn in pipes + socks:
            conn.close()
    return results


def _case(label: str, key: str, table: str, method: str, how: str, payload: Any,
          workers: int, expected: float, is_prmem: bool) -> Dict[str, Any]:
    started = time.perf_counter()
    results = _run_workers(method, how, payload, workers)
    wall = time.perf_counter() - started
    readies = sorted(r[0] for r in results)
    extras = sorted(r[1] for r in results)
    ok = all(abs(r[2] - expected) <= 1e-6 * max(1.0, abs(expected)) for r in results)
    return {"impl": key, "label": label, "table": table, "how": f"{method}, {how}",
            "is_prmem": is_prmem, "workers": workers,
            "extra_mib_median": extras[len(extras) // 2] / MiB,
            "extra_mib_max": extras[-1] / MiB,
            "ready_ms_median": readies[len(readies) // 2] * 1e3,
            "ready_ms_max": readies[-1] * 1e3, "wall_s": wall, "sums_ok": ok}


def run(ctx: RunContext) -> Dict[str, Any]:
    workers = ctx.pick(2, 8)
    n = ctx.pick(20_000, 1_000_000)
    rows: List[Dict[str, Any]] = []
    notes: List[str] = []

    table = {f"k{i}": i for i in range(n)}
    expected = float(sum(table.values()))
    pool = prmem.Pool(prmem.Mode.RO, name="bench-share", share=True)
    frozen = pool.freeze(table)
    pool.protect()
    ctx.log(f"[share] map of {n:,} entries: {frozen.nbytes / MiB:,.1f} MiB frozen")
    rows.append(_case("prmem FrozenMap, sent", "prmem_map", "map", "spawn", "received",
                      frozen, workers, expected, True))
    rows.append(_case("prmem FrozenMap, prmem.send()", "prmem_map_socket", "map", "spawn",
                      "socket", frozen, workers, expected, True))
    rows.append(_case("dict, pickled to spawn workers", "dict_spawn", "map", "spawn",
                      "received", table, workers, expected, False))
    _inherited["table"] = table
    rows.append(_case("dict, inherited by fork workers", "dict_fork", "map", "fork",
                      "inherited", None, workers, expected, False))
    _inherited.clear()
    del frozen
    gc.collect()
    pool._destroy_when_released()

    try:
        import numpy
    except ImportError:
        notes.append(ctx.skip(NAME, "the array table", "numpy is not installed"))
        numpy = None
    if numpy is not None:
        size = ctx.pick(8 * MiB, 256 * MiB)
        data = numpy.arange(size // 8, dtype="int64")
        expected = float(data.sum())
        apool = prmem.Pool(prmem.Mode.RO, name="bench-share-array", share=True)
        arr = apool.array(data)
        apool.protect()
        rows.append(_case("prmem Pool.array(), sent", "prmem_array", "array", "spawn",
                          "received", arr, workers, expected, True))
        rows.append(_case("numpy array, pickled to spawn workers", "numpy_spawn", "array",
                          "spawn", "received", data, workers, expected, False))
        shm = shared_memory.SharedMemory(create=True, size=data.nbytes)
        try:
            numpy.ndarray(data.shape, data.dtype, buffer=shm.buf)[:] = data
            rows.append(_case("multiprocessing.shared_memory", "shm", "array", "spawn", "shm",
                              (shm.name, data.shape, str(data.dtype)), workers, expected,
                              False))
        finally:
            shm.close()
            shm.unlink()
        del arr
        gc.collect()
        apool._destroy_when_released()
        notes.append(f"Array: {size // MiB} MiB of int64.")

    by = {r["impl"]: r for r in rows}
    targets = []
    for key, what in (("prmem_map", "FrozenMap"), ("prmem_map_socket", "FrozenMap, send()"),
                      ("prmem_array", "array")):
        r = by.get(key)
        if r is None:
            continue
        targets.append({"name": f"extra memory per worker, prmem {what}",
                        "value": r["extra_mib_max"], "unit": "MiB", "target": "≤ 2 MiB",
                        "met": r["extra_mib_max"] <= 2.0,
                        "description": "largest growth of a worker's private memory"})
        targets.append({"name": f"ready time, prmem {what}", "value": r["ready_ms_max"],
                        "unit": "ms", "target": "≤ 1 ms", "met": r["ready_ms_max"] <= 1.0,
                        "description": "receive + attach + first lookup, slowest worker"})
    for key, peer in (("prmem_map", "dict_spawn"), ("prmem_map", "dict_fork"),
                      ("prmem_array", "numpy_spawn")):
        if key in by and peer in by:
            targets.append({
                "name": f"extra memory, {by[key]['label']} / {by[peer]['label']}",
                "value": ratio(by[key]["extra_mib_max"] + 1e-9,
                               by[peer]["extra_mib_max"] + 1e-9),
                "target": "—", "met": None,
                "description": "largest per-worker growth of private memory"})
    notes += [
        f"{workers} workers per case, all alive at once (each waits until every worker has "
        "reported). 'extra' is the growth of a worker's private memory from just before "
        "it receives the table to just after it has read every value; "
        "'ready' is receive + attach/unpickle + the first lookup, timed in the worker from "
        "the moment the sender's message is there (workers are served one at a time).",
        f"Map: {n:,} entries str -> int. A spawn worker's private memory holds everything it "
        "builds itself (the unpickled dict); a fork worker's, the pages of the inherited "
        "dict it copied by touching reference counts.",
        "Over a multiprocessing Pipe the descriptor is fetched from multiprocessing's resource "
        "sharer (a thread in the sender, reached over an authenticated Unix-socket "
        "connection per descriptor), which is most of prmem's ready time there; "
        "prmem.send()/recv() sends it with the message (SCM_RIGHTS).",
        "prmem: the worker maps the sealed memfd read-only; its pages are shared with the "
        "parent and every other worker, and nobody can write them. shared_memory shares the "
        "bytes too, but any process holding it can write them.",
    ]
    return {"rows": rows, "targets": targets, "notes": notes, "workers": workers,
            "map_entries": n}


def markdown(result: Dict[str, Any]) -> str:
    out = [f"## {TITLE}", ""]
    rows = [[r["label"], r["table"], r["how"], r["extra_mib_median"], r["extra_mib_max"],
             r["ready_ms_median"], r["ready_ms_max"], r["wall_s"],
             "yes" if r["sums_ok"] else "NO"] for r in result["rows"]]
    out.append(md_table(["implementation", "table", "workers", "extra MiB (median)",
                         "extra MiB (max)", "ready ms (median)", "ready ms (max)",
                         "wall s", "sums checked"], rows))
    out += ["", _targets(result["targets"]), "", "Notes:", ""]
    out += [f"- {n}" for n in result["notes"]]
    return "\n".join(out) + "\n"


def _targets(targets: List[Dict[str, Any]]) -> str:
    plain = [t for t in targets if t.get("unit") not in ("MiB", "ms")]
    rows = [[t["name"], f"{fmt_num(t['value'])} {t['unit']}", t["target"],
             "yes" if t["met"] else "NO", t["description"]]
            for t in targets if t.get("unit") in ("MiB", "ms")]
    parts = [md_table(["measure", "measured", "target", "met", "what"], rows)]
    if plain:
        parts.append(targets_table(plain))
    return "\n\n".join(parts)


def summary(result: Dict[str, Any]) -> List[List[str]]:
    rows = [[f"share {r['impl']}",
             f"extra {fmt_num(r['extra_mib_max'])} MiB/worker, ready "
             f"{fmt_num(r['ready_ms_max'])} ms"] for r in result["rows"]]
    for t in result["targets"]:
        if t.get("met") is not None:
            value = (f"{fmt_num(t['value'])} {t['unit']}" if t.get("unit")
                     else fmt_ratio(t["value"]))
            rows.append([t["name"], f"{value} (target {t['target']}: "
                                    f"{'met' if t['met'] else 'NOT met'})"])
    return rows


def plot(result: Dict[str, Any], out_dir: str, plt: Any) -> List[str]:
    rows = result["rows"]
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(9, 4))
    ys = list(range(len(rows)))
    ax.barh(ys, [max(r["extra_mib_max"], 0.01) for r in rows], color=[
        "tab:green" if r["is_prmem"] else "tab:gray" for r in rows])
    ax.set_yticks(ys)
    ax.set_yticklabels([r["label"] for r in rows])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("extra private memory per worker, MiB (largest; log scale)")
    ax.set_title(f"share: one table, {result['workers']} worker processes")
    return [save_figure(plt, fig, out_dir, "share")]
