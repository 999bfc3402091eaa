"""frozen: reading and building frozen maps (``Pool.freeze``) next to dict.

Three data sets of N str keys (10^5; quick mode 10^4), built from a fixed
seed: str -> small int, str -> str, and str -> a small dict (4 fields).  Each
is held by every implementation at once, in this process:

* ``dict`` (the reference every ratio is taken against);
* prmem ``FrozenMap``: ``pool.freeze(d)`` in its own ``Pool(Mode.RO)``,
  ``protect()``ed;
* ``frozendict.frozendict`` and ``immutables.Map`` (nested: their own type
  all the way down);
* ``types.MappingProxyType`` (nested: a proxy of a dict of proxies);
* "packed table + bisect": the way protected lookup tables were written
  before ``freeze()``: the keys' UTF-8 bytes sorted and packed, offset-
  indexed, into one allocation of a protected ``Pool(Mode.RO)``; a lookup
  bisects over them (``bisect.bisect_left`` on a sequence view that slices
  the protected memory) and ``struct``-unpacks the value.  Nested data is
  packed flat under composite keys ``outer\\0inner``: ``t[a]`` bisects to
  the record's rows, ``[b]`` bisects inside them;
* "loop overhead": the same loop fetching the probe, without a lookup.

Lookups.  One probe list (N random keys, drawn with replacement; equal to
the keys but distinct str objects, as keys from input would be) shared by
every implementation; each sample times one compiled loop (harness
``batch_loop``: a function with fast locals) of ``m[p[o + _i]]``
(nested: ``m[p[o + _i]][q[o + _i]]``) over the next chunk of the probe list,
so every implementation walks the same chunks in the same order (each from
its own starting chunk, so that two rows never work on the same probes
one right after the other and find them in the caches).  Samples
are taken in rounds, interleaved sample by sample (each cycle in a
shuffled order) until each implementation has used its time of the round;
reported: median and p99 of the per-sample mean ns per lookup, and the
spread of the per-round medians.  Every implementation's answers are
checked against the dict's for the whole probe list before timing.

Building.  ``pool.freeze(d)`` (a fresh pool each repetition; the handle
dropped and the pool destroyed after the clock stops) against
``pickle.dumps(d)``, plus the encoder alone (``_core.freeze_encode``, the
bytes in ordinary memory) and deep ``frozendict`` / ``immutables.Map``
construction; medians over repetitions, each repetition in a shuffled
order.

Memory.  ``m.nbytes`` (the frozen structure) and the pool's
``stats().bytes_mapped`` against the dict's deep ``sys.getsizeof`` size:
every dict, key and value object reachable from it, each counted once (by
id), so keys shared between inner dicts count once.
"""
from __future__ import annotations

import bisect
import gc
import pickle
import random
import struct
import sys
import types
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import prmem

from ..harness import (CpuLoadProbe, RunContext, batch_loop, gc_paused, perf_ns, ratio,
                       summarize, vma_at)
from ..report import NOISY_LOAD, fmt_num, fmt_ratio, md_table, save_figure, targets_table

NAME = "frozen"
TITLE = "frozen — FrozenMap lookups, freeze() and memory, against dict"

SEED = 20261202
KEY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"
#: (min, max) length of the keys and of the str values
KEY_LEN = (6, 24)
VALUE_LEN = (3, 20)
#: the fields of the nested data set's inner dicts
FIELDS = ("uid", "gid", "name", "home")
#: a row whose per-round medians differ by more than this factor is flagged
NOISY_SPREAD = 1.15

DATASETS = ("int", "str", "nested")
DATASET_LABELS = {
    "int": "str → small int",
    "str": "str → str",
    "nested": "str → small dict, m[a][b]",
}
#: keys of the hot case: the str → small int lookups over this many keys only
HOT_KEYS = 1000
#: the lookup cases: the data sets, plus the hot case on the int data set
CASES = ("int", "int_hot", "str", "nested")
CASE_LABELS = dict(DATASET_LABELS, int_hot=f"str → small int, {HOT_KEYS:,} hot keys")
#: lookup targets: data set -> FrozenMap / dict at most
LOOKUP_TARGETS = {"int": 2.0, "str": 2.5, "nested": 2.5}
FREEZE_TARGET = 3.0
MEMORY_TARGET = 1.0


# ------------------------------------------------------------------ data


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choices(KEY_CHARS, k=rng.randint(lo, hi)))


def _make_data(n: int, rng: random.Random) -> Dict[str, Dict[str, Any]]:
    """The three data sets, sharing the same keys (distinct str objects per
    data set: each holds its own, as data loaded separately would)."""
    keys: List[str] = []
    seen = set()
    while len(keys) < n:
        k = _word(rng, *KEY_LEN)
        if k not in seen:
            seen.add(k)
            keys.append(k)

    def fresh(s: str) -> str:
        return s.encode().decode()

    ints = {fresh(k): rng.randrange(1000) for k in keys}
    strs = {fresh(k): _word(rng, *VALUE_LEN) for k in keys}
    # like json.load: the inner keys are shared objects, every value is its own
    nested = {fresh(k): {"uid": rng.randrange(100_000), "gid": rng.randrange(1000),
                         "name": _word(rng, 3, 12), "home": "/home/" + _word(rng, 3, 12)}
              for k in keys}
    return {"int": ints, "str": strs, "nested": nested}


def deep_sizeof(obj: Any) -> Tuple[int, int]:
    """(bytes, objects): sys.getsizeof of every dict, key and value reachable
    from ``obj`` (dicts, lists and tuples are followed), each object counted
    once."""
    seen = set()
    total = 0
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
    return total, len(seen)


# ------------------------------------------------- the "before": packed table

_Q = struct.Struct("<q")
_VALUE_INT, _VALUE_STR = 0x69, 0x73  # b"i", b"s": tag byte of a packed value


class _PackedKeys:
    """The sorted keys as a sequence for ``bisect``: item i is key i's bytes,
    sliced out of the protected allocation (offset-indexed)."""

    __slots__ = ("_blob", "_offs", "_n")

    def __init__(self, blob: memoryview, offs: memoryview, n: int) -> None:
        self._blob = blob
        self._offs = offs
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> bytes:
        offs = self._offs
        return self._blob[offs[i]:offs[i + 1]].tobytes()


class PackedTable:
    """A sorted, offset-indexed key/value table packed into one allocation
    of a protected pool, searched with ``bisect``.

    Layout (little-endian): u32 n, u32 value kind, then (n + 1) u32 key
    offsets, the key bytes, padding to 8, then either n int64 values (kind
    "int") or (n + 1) u32 value offsets and the value bytes, each value a tag
    byte (``i`` + int64, ``s`` + UTF-8) for kind "tagged".
    """

    __slots__ = ("pool", "allocation", "_views", "_keys", "_n", "_vals", "_voffs", "_kind",
                 "_nested")

    def __init__(self, items: Sequence[Tuple[bytes, Any]], kind: str, nested: bool,
                 name: str) -> None:
        items = sorted(items, key=lambda kv: kv[0])
        n = len(items)
        key_offs = [0]
        for k, _ in items:
            key_offs.append(key_offs[-1] + len(k))
        head = struct.pack(f"<II{n + 1}I", n, 0 if kind == "int" else 1, *key_offs)
        keys = b"".join(k for k, _ in items)
        parts = [head, keys, bytes(-(len(head) + len(keys)) % 8)]
        if kind == "int":
            parts.append(struct.pack(f"<{n}q", *(v for _, v in items)))
        else:
            encoded = [(bytes([_VALUE_INT]) + _Q.pack(v)) if isinstance(v, int)
                       else (bytes([_VALUE_STR]) + v.encode()) for _, v in items]
            val_offs = [0]
            for v in encoded:
                val_offs.append(val_offs[-1] + len(v))
            parts.append(struct.pack(f"<{n + 1}I", *val_offs))
            parts.extend(encoded)
        data = b"".join(parts)
        self.pool = prmem.Pool(prmem.Mode.RO, name=name)
        self.allocation = self.pool.alloc(len(data))
        self.allocation.write(data)
        self.pool.protect()
        mv = memoryview(self.allocation)  # read-only now
        key_start = 8 + 4 * (n + 1)
        vals_start = key_start + len(keys) + (-(len(head) + len(keys)) % 8)
        offs = mv[8:key_start].cast("I")
        blob = mv[key_start:key_start + len(keys)]
        if kind == "int":
            self._vals = mv[vals_start:vals_start + 8 * n]
            self._voffs = None
            views = [mv, offs, blob, self._vals]
        else:
            voffs = mv[vals_start:vals_start + 4 * (n + 1)].cast("I")
            self._vals = mv[vals_start + 4 * (n + 1):]
            self._voffs = voffs
            views = [mv, offs, blob, voffs, self._vals]
        self._views = views
        self._keys = _PackedKeys(blob, offs, n)
        self._n = n
        self._kind = kind
        self._nested = nested

    def _value(self, i: int) -> Any:
        if self._voffs is None:
            return _Q.unpack_from(self._vals, 8 * i)[0]
        voffs = self._voffs
        start, end = voffs[i], voffs[i + 1]
        vals = self._vals
        if vals[start] == _VALUE_INT:
            return _Q.unpack_from(vals, start + 1)[0]
        return str(vals[start + 1:end], "utf-8")

    def __getitem__(self, key: str) -> Any:
        kb = key.encode()
        keys = self._keys
        if self._nested:  # the rows of record `key`: keys "key\0field"
            prefix = kb + b"\0"
            lo = bisect.bisect_left(keys, prefix)
            if lo == self._n or not keys[lo].startswith(prefix):
                raise KeyError(key)
            return _PackedRecord(self, prefix, lo, bisect.bisect_left(keys, kb + b"\1", lo))
        i = bisect.bisect_left(keys, kb)
        if i == self._n or keys[i] != kb:
            raise KeyError(key)
        return self._value(i)

    def close(self) -> None:
        self._keys = None
        for v in reversed(self._views):
            v.release()
        self._views = []
        self._vals = self._voffs = None
        self.allocation = None
        self.pool.destroy()


class _PackedRecord:
    """``table[a]`` of a nested packed table: its rows lo..hi."""

    __slots__ = ("_table", "_prefix", "_lo", "_hi")

    def __init__(self, table: PackedTable, prefix: bytes, lo: int, hi: int) -> None:
        self._table = table
        self._prefix = prefix
        self._lo = lo
        self._hi = hi

    def __getitem__(self, field: str) -> Any:
        kb = self._prefix + field.encode()
        t = self._table
        i = bisect.bisect_left(t._keys, kb, self._lo, self._hi)
        if i == self._hi or t._keys[i] != kb:
            raise KeyError(field)
        return t._value(i)


def _packed(data: Dict[str, Any], dataset: str) -> PackedTable:
    if dataset == "nested":
        items = [(k.encode() + b"\0" + f.encode(), v) for k, rec in data.items()
                 for f, v in rec.items()]
        return PackedTable(items, "tagged", True, "bench-frozen-packed")
    return PackedTable([(k.encode(), v) for k, v in data.items()],
                       "int" if dataset == "int" else "tagged", False, "bench-frozen-packed")


# ------------------------------------------------------- implementations


class Impl:
    """One way of holding a data set for lookups."""

    def __init__(self, key: str, label: str, obj: Any, is_peer: bool = True,
                 floor: bool = False, same_keys: bool = False, note: str = "",
                 teardown: Optional[Callable[[], None]] = None) -> None:
        self.key = key
        self.label = label
        self.obj = obj
        self.is_peer = is_peer
        self.floor = floor  # the loop-overhead row: no lookup
        #: probes with the stored key objects themselves instead of equal copies
        self.same_keys = same_keys
        self.note = note
        self.teardown = teardown
        self.samples: List[float] = []
        self.round_samples: List[List[float]] = []
        self.chunk = 0
        self.error: Optional[str] = None


def _skip_once(ctx: RunContext, what: str, why: str) -> None:
    """ctx.skip(), once per run (the peers are tried for every data set)."""
    if not any(f"skipping {what}:" in s for s in ctx.skipped):
        ctx.skip(NAME, what, why)


def _frozen_perms(address: int) -> Optional[str]:
    vma = vma_at(address)
    return vma["perms"] if vma else None


def _implementations(ctx: RunContext, dataset: str, data: Dict[str, Any],
                     info: Dict[str, Any]) -> List[Impl]:
    nested = dataset == "nested"
    impls = [Impl("dict", "dict", data, note="the reference: ratios are taken against it")]
    if not nested:
        impls.append(Impl(
            "dict_same", "dict, probed with its own key objects", data, is_peer=False,
            same_keys=True,
            note="not the shared probe list: each probe replaced by the identical key object "
                 "stored in the dict, so the lookup matches on identity without reading the "
                 "stored key (a str-keyed dict reads each candidate key object's cached hash "
                 "otherwise); for comparison only, no ratio here is a target"))

    pool = prmem.Pool(prmem.Mode.RO, name=f"bench-frozen-{dataset}")
    fm = pool.freeze(data)
    pool.protect()
    st = pool.stats()
    info.update(nbytes=fm.nbytes, bytes_mapped=st.bytes_mapped, areas=st.areas,
                frozen_perms=_frozen_perms(fm.address),
                read_only_areas=st.areas_by_state[prmem.State.READ_ONLY])

    frozen = Impl("prmem", "prmem FrozenMap (RO pool, protected)", fm, is_peer=False,
                  note="pool.freeze(d) in its own Pool(Mode.RO), then protect()")
    del fm

    def close_frozen() -> None:
        frozen.obj = None  # the last handle: the pool can go
        pool.destroy()
    frozen.teardown = close_frozen
    impls.append(frozen)
    try:
        from frozendict import frozendict
        import frozendict as fd_module
        obj = (frozendict({k: frozendict(v) for k, v in data.items()}) if nested
               else frozendict(data))
        c_ext = getattr(fd_module, "c_ext", None)
        kind = ("" if c_ext is None else
                " (C extension)" if c_ext else " (pure Python, a dict subclass)")
        impls.append(Impl("frozendict", "frozendict.frozendict", obj,
                          note=f"frozendict {getattr(fd_module, '__version__', '?')}{kind}"
                               + ("; nested: frozendict of frozendicts" if nested else "")))
    except ImportError as exc:
        _skip_once(ctx, "frozendict", f"not installed ({exc}); pip install 'prmem[bench]'")
    try:
        import immutables
        obj = (immutables.Map({k: immutables.Map(v) for k, v in data.items()}) if nested
               else immutables.Map(data))
        impls.append(Impl("immutables", "immutables.Map", obj,
                          note=f"immutables {getattr(immutables, '__version__', '?')} (HAMT, C)"
                               + ("; nested: Map of Maps" if nested else "")))
    except ImportError as exc:
        _skip_once(ctx, "immutables.Map", f"not installed ({exc}); pip install 'prmem[bench]'")
    proxy = types.MappingProxyType
    impls.append(Impl("proxy", "types.MappingProxyType",
                      proxy({k: proxy(v) for k, v in data.items()}) if nested else proxy(data),
                      note="a read-only view of a dict (the dict itself stays writable)"
                           + ("; nested: a proxy of a dict of proxies" if nested else "")))
    table = _packed(data, dataset)
    info.update(packed_bytes=table.allocation.size,
                packed_bytes_mapped=table.pool.stats().bytes_mapped)

    packed = Impl("packed", "packed sorted table + bisect (RO pool)", table, is_peer=False,
                  note="the way before freeze(): keys packed offset-indexed, "
                       + ("composite keys 'a\\0b', " if nested else "")
                       + "bisect over a sequence view of the protected allocation, "
                       "struct-unpack of the value")

    def close_packed() -> None:
        packed.obj = None
        table.close()
    packed.teardown = close_packed
    impls.append(packed)
    impls.append(Impl("overhead", "loop overhead (probe fetch, no lookup)", None,
                      is_peer=False, floor=True,
                      note="the same loop without the lookup: the floor every row pays"))
    return impls


def _loops(nested: bool) -> Tuple[Callable[..., int], Callable[..., int]]:
    """(lookup loop, overhead loop): loop(n, m, p, q, o) -> ns."""
    names = ["m", "p", "q", "o"]
    if nested:
        look = batch_loop("m[p[o + _i]][q[o + _i]]", names, label="frozen nested lookup")
        floor = batch_loop("p[o + _i]\nq[o + _i]", names, label="frozen nested overhead")
    else:
        look = batch_loop("m[p[o + _i]]", names, label="frozen lookup")
        floor = batch_loop("p[o + _i]", names, label="frozen overhead")
    return look, floor


def _probe_lists(impl: Impl, data: Dict[str, Any], probes: List[str]) -> List[str]:
    if not impl.same_keys:
        return probes
    stored = {k: k for k in data}
    return [stored[k] for k in probes]


def _check(impls: List[Impl], data: Dict[str, Any], probes: List[str],
           fields: Optional[List[str]]) -> None:
    """Every implementation must answer every probe as the dict does."""
    for impl in impls:
        if impl.floor or impl.error:
            continue
        m = impl.obj
        try:
            for i, k in enumerate(probes):
                want = data[k] if fields is None else data[k][fields[i]]
                got = m[k] if fields is None else m[k][fields[i]]
                if got != want or type(got) is not type(want):
                    impl.error = f"wrong answer for probe {i}: {got!r} != {want!r}"
                    break
        except Exception as exc:
            impl.error = f"{type(exc).__name__}: {exc}"


def _lookups(ctx: RunContext, impls: List[Impl], data: Dict[str, Any], nested: bool,
             probes: List[str], fields: Optional[List[str]], batch: int,
             order: random.Random, seconds: float, warm: bool = False) -> Dict[str, Any]:
    """Sample every implementation on this probe list; fills impl.samples
    and impl.round_samples (cleared first).  ``warm``: time each chunk
    right after an untimed pass over the same chunk (the hot case: what it
    touches is then in the CPU caches, whatever ran before)."""
    look, floor = _loops(nested)
    rounds = ctx.pick(2, 8)
    min_samples = ctx.pick(4, 24)
    max_samples = ctx.pick(200, 4000)
    chunks = max(1, len(probes) // batch)
    lists = {impl.key: _probe_lists(impl, data, probes) for impl in impls}
    q = fields if fields is not None else probes

    def sample(impl: Impl) -> float:
        o = (impl.chunk % chunks) * batch
        impl.chunk += 1
        loop = floor if impl.floor else look
        if warm:
            loop(batch, impl.obj, lists[impl.key], q, o)
        return loop(batch, impl.obj, lists[impl.key], q, o) / batch

    live = [i for i in impls if not i.error]
    # Every row walks the chunks in the same order, but from its own start,
    # evenly spread: interleaved rows are never on the same chunk at the same
    # time, so no row finds its probes (and the key objects it shares with
    # other rows) in the caches because the row before it just used them.
    start = {impl.key: k * chunks // len(live) for k, impl in enumerate(live)}
    for impl in live:
        impl.samples, impl.round_samples, impl.chunk = [], [], start[impl.key]
    per_round = seconds / rounds
    min_r, max_r = max(1, min_samples // rounds), max(1, max_samples // rounds)
    with gc_paused():
        # warm-up: one pass over the whole probe list, interleaved as the
        # measurement is (so that no row starts with the caches to itself)
        for _ in range(chunks):
            order.shuffle(live)
            for impl in live:
                sample(impl)
        for impl in live:
            impl.chunk = start[impl.key]
        for _ in range(rounds):
            # Interleaved sample by sample (each cycle in a shuffled order),
            # so that whatever else the machine does hits every row alike;
            # a row leaves the round when it has used its time (or has its
            # maximum of samples), so the slow packed table stops early.
            got: Dict[str, List[float]] = {impl.key: [] for impl in live}
            spent = {impl.key: 0 for impl in live}
            active = list(live)
            while active:
                order.shuffle(active)
                for impl in active:
                    t0 = perf_ns()
                    got[impl.key].append(sample(impl))
                    spent[impl.key] += perf_ns() - t0
                active = [i for i in active if len(got[i.key]) < min_r or (
                    len(got[i.key]) < max_r and spent[i.key] < per_round * 1e9)]
            for impl in live:
                impl.samples.extend(got[impl.key])
                impl.round_samples.append(got[impl.key])
    return {"rounds": rounds, "probes_per_sample": batch, "chunks": chunks}


def _lookup_rows(case: str, impls: List[Impl], params: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows = []
    for impl in impls:
        s = summarize(impl.samples)
        round_medians = [summarize(r)["median"] for r in impl.round_samples if r]
        spread = (max(round_medians) / min(round_medians)
                  if round_medians and min(round_medians) > 0 else None)
        rows.append({
            "dataset": case, "impl": impl.key, "label": impl.label,
            "is_peer": impl.is_peer, "floor": impl.floor,
            "median_ns": s["median"] if s["n"] else None,
            "p99_ns": s["p99"] if s["n"] else None,
            "min_ns": s["min"] if s["n"] else None,
            "samples": s["n"], "probes_per_sample": params["probes_per_sample"],
            "round_medians_ns": round_medians, "round_spread": spread,
            "noisy": bool(spread is not None and spread > NOISY_SPREAD),
            "error": impl.error, "note": impl.note,
        })
    by = {r["impl"]: r for r in rows}
    dict_row, prmem_row = by["dict"], by["prmem"]
    best_peer = min((r["median_ns"] for r in rows if r["is_peer"] and r["median_ns"]),
                    default=None)
    for r in rows:
        if r["floor"] or r["median_ns"] is None:
            continue
        r["ratio_vs_dict"] = ratio(r["median_ns"], dict_row["median_ns"])
        r["ratio_vs_best_peer"] = ratio(r["median_ns"], best_peer)
        if r["impl"] != "prmem":
            r["ratio_vs_prmem"] = ratio(r["median_ns"], prmem_row["median_ns"])
        # the same ratio round by round: how much it moved during the run
        per_round = [ratio(a, b) for a, b in zip(r["round_medians_ns"],
                                                 dict_row["round_medians_ns"])]
        per_round = [x for x in per_round if x is not None]
        r["ratio_vs_dict_rounds"] = ([min(per_round), max(per_round)] if per_round else None)
    return rows


# ----------------------------------------------------------------- build


def _freeze_rows(ctx: RunContext, datas: Dict[str, Dict[str, Any]],
                 order: random.Random) -> List[Dict[str, Any]]:
    reps = ctx.pick(2, 7)
    try:
        from frozendict import frozendict
    except ImportError:
        frozendict = None  # type: ignore[assignment]
    try:
        import immutables
    except ImportError:
        immutables = None  # type: ignore[assignment]
    from prmem import _core

    rows = []
    for dataset in DATASETS:
        d = datas[dataset]
        nested = dataset == "nested"
        times: Dict[str, List[int]] = {}
        extra: Dict[str, List[float]] = {"protect_ms": [], "destroy_ms": []}
        sizes: Dict[str, int] = {}

        def prmem_freeze() -> int:
            pool = prmem.Pool(prmem.Mode.RO, name="bench-frozen-build")
            t0 = perf_ns()
            m = pool.freeze(d)
            t1 = perf_ns()
            sizes["prmem"] = m.nbytes
            pool.protect()
            t2 = perf_ns()
            del m
            pool.destroy()
            extra["protect_ms"].append((t2 - t1) / 1e6)
            extra["destroy_ms"].append((perf_ns() - t2) / 1e6)
            return t1 - t0

        def timed(fn: Callable[[], Any], key: str) -> Callable[[], int]:
            def run() -> int:
                t0 = perf_ns()
                out = fn()
                ns = perf_ns() - t0
                if isinstance(out, bytes):
                    sizes[key] = len(out)
                del out
                return ns
            return run

        builders: List[Tuple[str, str, Callable[[], int], bool]] = [
            ("prmem", "prmem pool.freeze(d)", prmem_freeze, False),
            ("pickle", f"pickle.dumps(d) (protocol {pickle.DEFAULT_PROTOCOL})",
             timed(lambda: pickle.dumps(d), "pickle"), True),
            ("encode", "prmem encoder alone (_core.freeze_encode, ordinary memory)",
             timed(lambda: _core.freeze_encode(d), "encode"), False),
        ]
        if frozendict is not None:
            fd = ((lambda: frozendict({k: frozendict(v) for k, v in d.items()})) if nested
                  else (lambda: frozendict(d)))
            builders.append(("frozendict", "frozendict(d)" + (" (deep)" if nested else ""),
                             timed(fd, "frozendict"), True))
        if immutables is not None:
            Map = immutables.Map
            im = ((lambda: Map({k: Map(v) for k, v in d.items()})) if nested
                  else (lambda: Map(d)))
            builders.append(("immutables", "immutables.Map(d)" + (" (deep)" if nested else ""),
                             timed(im, "immutables"), True))
        errors: Dict[str, str] = {}
        for b in builders:  # warm-up, not counted
            b[2]()
        for values in extra.values():
            values.clear()
        for _ in range(reps):
            live = list(builders)
            order.shuffle(live)
            gc.collect()
            with gc_paused():
                for key, _label, fn, _peer in live:
                    try:
                        times.setdefault(key, []).append(fn())
                    except Exception as exc:  # report, go on
                        errors[key] = f"{type(exc).__name__}: {exc}"
        pickle_ms = None
        for key, label, _fn, is_peer in builders:
            s = summarize(times.get(key, []))
            row = {"dataset": dataset, "impl": key, "label": label, "is_peer": is_peer,
                   "median_ms": s["median"] / 1e6 if s["n"] else None,
                   "min_ms": s["min"] / 1e6 if s["n"] else None,
                   "max_ms": s["max"] / 1e6 if s["n"] else None,
                   "reps": s["n"], "output_bytes": sizes.get(key), "error": errors.get(key)}
            if key == "prmem":
                row["protect_ms"] = summarize(extra["protect_ms"])["median"]
                row["destroy_ms"] = summarize(extra["destroy_ms"])["median"]
            if key == "pickle":
                pickle_ms = row["median_ms"]
            rows.append(row)
        mine = [r for r in rows if r["dataset"] == dataset]
        best_peer = min((r["median_ms"] for r in mine if r["is_peer"] and r["median_ms"]),
                        default=None)
        for row in mine:
            row["ratio_vs_pickle"] = ratio(row["median_ms"], pickle_ms)
            row["ratio_vs_best_peer"] = ratio(row["median_ms"], best_peer)
    return rows


# -------------------------------------------------------------------- run


def run(ctx: RunContext) -> Dict[str, Any]:
    n = ctx.pick(10_000, 100_000)
    batch = ctx.pick(1000, 2000)
    seconds = ctx.pick(0.12, 1.6)  # per implementation and lookup case
    rng = random.Random(SEED)
    order = random.Random(SEED + 1)
    load = CpuLoadProbe()
    ctx.log(f"[{NAME}] building 3 data sets of {n:,} str keys ...")
    datas = _make_data(n, rng)
    keys = list(datas["int"])
    # the probes: random keys, equal to the stored keys but distinct objects
    picks = [rng.randrange(n) for _ in range(n)]
    probes = [keys[i].encode().decode() for i in picks]
    fields = [rng.choice(FIELDS) for _ in range(n)]
    # the hot case: the same lookups over HOT_KEYS keys only (cache-resident)
    hot = [keys[i].encode().decode() for i in rng.sample(range(n), HOT_KEYS)]
    hot_probes = [rng.choice(hot) for _ in range(n)]
    rows: List[Dict[str, Any]] = []
    memory: List[Dict[str, Any]] = []
    params: Dict[str, Any] = {}
    problems: List[str] = []
    for dataset in DATASETS:
        data = datas[dataset]
        nested = dataset == "nested"
        info: Dict[str, Any] = {"dataset": dataset}
        impls = _implementations(ctx, dataset, data, info)
        cases = [(dataset, probes)] + ([("int_hot", hot_probes)] if dataset == "int" else [])
        try:
            for case, case_probes in cases:
                ctx.log(f"[{NAME}] {CASE_LABELS[case]}: lookups, {batch:,} probes per "
                        "sample ...")
                _check(impls, data, case_probes, fields if nested else None)
                params = _lookups(ctx, impls, data, nested, case_probes,
                                  fields if nested else None, batch, order,
                                  seconds * (0.5 if case == "int_hot" else 1.0),
                                  warm=case == "int_hot")
                rows += _lookup_rows(case, impls, params)
        finally:
            for impl in impls:
                if impl.teardown is not None:
                    try:
                        impl.teardown()
                    except Exception as exc:  # pragma: no cover - reported
                        problems.append(f"{impl.label} ({dataset}): teardown failed: {exc!r}")
                        ctx.log(f"[{NAME}] {problems[-1]}")
            del impls
        dict_bytes, objects = deep_sizeof(data)
        info.update(dict_deep_bytes=dict_bytes, dict_objects=objects,
                    nbytes_vs_dict=ratio(info["nbytes"], dict_bytes),
                    mapped_vs_dict=ratio(info["bytes_mapped"], dict_bytes),
                    packed_vs_dict=ratio(info["packed_bytes"], dict_bytes))
        memory.append(info)
        gc.collect()
    lookup_load = load.other_load()
    ctx.log(f"[{NAME}] freeze() vs pickle.dumps() ...")
    build = _freeze_rows(ctx, datas, order)
    other_load = load.other_load()
    result = _result(rows, build, memory, n, params, other_load, lookup_load, ctx)
    result["notes"] += [f"Error: {p}" for p in problems]
    return result


def _result(rows: List[Dict[str, Any]], build: List[Dict[str, Any]],
            memory: List[Dict[str, Any]], n: int, params: Dict[str, Any],
            other_load: Optional[float], lookup_load: Optional[float],
            ctx: RunContext) -> Dict[str, Any]:
    def row(dataset: str, impl: str, rs: List[Dict[str, Any]] = rows) -> Dict[str, Any]:
        return next((r for r in rs if r["dataset"] == dataset and r["impl"] == impl), {})

    def rounds_text(r: Dict[str, Any]) -> str:
        rr = r.get("ratio_vs_dict_rounds")
        return "" if not rr else f"; per round {fmt_ratio(rr[0])}–{fmt_ratio(rr[1])}"

    targets = []
    for dataset in DATASETS:
        fm = row(dataset, "prmem")
        limit = LOOKUP_TARGETS[dataset]
        value = fm.get("ratio_vs_dict")
        targets.append(_target(
            f"FrozenMap / dict, {DATASET_LABELS[dataset]}", value, f"≤ {limit:g}×",
            None if value is None else value <= limit,
            f"median ns per lookup{rounds_text(fm)}"))
        if dataset == "int":
            for peer, label in (("frozendict", "frozendict"), ("immutables", "immutables.Map")):
                v = row(dataset, peer)
                value = ratio(fm.get("median_ns"), v.get("median_ns"))
                targets.append(_target(
                    f"FrozenMap / {label}, {DATASET_LABELS[dataset]}", value,
                    "< 1× (ideally)", None if value is None else value < 1.0,
                    "median ns per lookup: 'ideally faster than' in the issue"))
    nested_freeze = row("nested", "prmem", build)
    value = nested_freeze.get("ratio_vs_pickle")
    targets.append(_target(
        "pool.freeze(d) / pickle.dumps(d), 10^5 small dicts" if n == 100_000 else
        f"pool.freeze(d) / pickle.dumps(d), {n:,} small dicts", value,
        f"≤ {FREEZE_TARGET:g}×", None if value is None else value <= FREEZE_TARGET,
        "median time over repetitions; freeze = encode + allocate + copy into the pool"))
    for m in memory:
        value = m.get("mapped_vs_dict")
        targets.append(_target(
            f"pool bytes_mapped / dict deep size, {DATASET_LABELS[m['dataset']]}", value,
            f"≤ {MEMORY_TARGET:g}×", None if value is None else value <= MEMORY_TARGET,
            f"m.nbytes / deep size {fmt_ratio(m.get('nbytes_vs_dict'))}"))

    hot = row("int_hot", "prmem")
    extra = {
        "hot_frozen_over_dict": hot.get("ratio_vs_dict"),
        "hot_frozen_over_frozendict": ratio(hot.get("median_ns"),
                                            row("int_hot", "frozendict").get("median_ns")),
        "hot_frozen_over_immutables": ratio(hot.get("median_ns"),
                                            row("int_hot", "immutables").get("median_ns")),
        "frozen_over_dict_same_keys": ratio(row("int", "prmem").get("median_ns"),
                                            row("int", "dict_same").get("median_ns")),
        "hot_frozen_over_dict_same_keys": ratio(hot.get("median_ns"),
                                                row("int_hot", "dict_same").get("median_ns")),
    }
    noisy_rows = [r for r in rows if r.get("noisy")]
    notes = [
        f"Data: {n:,} keys of {KEY_LEN[0]}–{KEY_LEN[1]} random characters of [a-z0-9_] "
        "(uniform length; those of at most 11 bytes are stored inline in their slot by "
        "freeze(), longer ones as separate strings); values: random ints in [0, 1000) "
        f"(str → small int), random words of {VALUE_LEN[0]}–{VALUE_LEN[1]} characters "
        "(str → str), or dicts of 4 fields uid (int < 100,000), gid (int < 1000), name "
        "(3–12 characters), home ('/home/' + 3–12 characters) (nested; the field names are "
        f"shared str objects, as json.load makes them). Seed {SEED}.",
        f"Probes: {n:,} keys drawn at random with replacement, distinct str objects equal "
        "to the stored keys (a dict cannot short-cut on identity; their str hash is cached "
        "after the warm-up pass); nested: plus a random field per probe. Each sample runs "
        f"{params.get('probes_per_sample', 0):,} consecutive probes (the next chunk of the "
        "list; every row walks the chunks in the same order, each from its own starting "
        "chunk, so that no row runs the probes another row has just brought into the "
        f"caches), in {params.get('rounds', 0)} rounds, the rows interleaved sample by sample "
        "in a shuffled order; each implementation first made one "
        "unmeasured pass over the whole list, and its answers were checked against the "
        "dict's for every probe.",
        f"'{CASE_LABELS['int_hot']}': the str → small int structures again, with a probe "
        f"list of {n:,} draws from {HOT_KEYS:,} keys only, each sample timed right after an "
        "untimed pass over the same probes, so that what the lookups touch is in the CPU "
        "caches: the cost of a lookup itself. The other cases probe all "
        f"{n:,} keys at random, each sample once; at 10^5 keys they are bound by cache "
        "misses (each structure is several MiB, and the rows interleave), so the ratios "
        "there say as much about memory layout as about code.",
        "'vs dict' is the ratio of the medians; 'per round' is the lowest and highest ratio "
        "of the per-round medians, i.e. how much it moved in this run. A row is flagged "
        f"noisy when its per-round medians differ by more than {NOISY_SPREAD:.2f}×.",
        "FrozenMap: every lookup hashes the key with the structure's own keyed hash (no "
        "cached str hash), checks every offset it reads, and builds a new value object "
        "(ints outside -5..256, every str, and a new FrozenMap handle for a nested map).",
        "freeze(): the encoder builds the whole layout as a bytes object in ordinary memory, "
        "then one allocation of a fresh Pool(Mode.RO) gets a copy; protect() and destroy() "
        "are timed separately (columns) and not included.",
        "Memory: the dict's deep size counts every dict, key and value object reachable "
        "from it once (sys.getsizeof; the small ints -5..256 are shared interpreter objects "
        "and counted once too); it does not count allocator overhead (pymalloc pools and "
        "arenas) or the probe lists. The FrozenMap's pool holds nothing else, so "
        "bytes_mapped is the whole pool.",
    ]
    if noisy_rows:
        notes.append("Noisy rows (per-round medians more than "
                     f"{NOISY_SPREAD:.2f}× apart): " + ", ".join(
                         f"{r['label']} ({CASE_LABELS[r['dataset']]}, "
                         f"{r['round_spread']:.2f}×)" for r in noisy_rows) + ".")
    if other_load is not None and other_load > NOISY_LOAD:
        message = (f"other processes used {other_load:.0%} of the machine's CPU time during "
                   f"this workload ({0 if lookup_load is None else lookup_load:.0%} during "
                   "the lookups): expect noisier numbers; rerun on a quiet machine")
        notes.append("Warning: " + message + ".")
        ctx.log(f"[{NAME}] warning: {message}")
    return {"rows": rows, "build": build, "memory": memory, "targets": targets,
            "extra_ratios": extra, "notes": notes, "n": n, "params": params,
            "other_cpu_load_lookups": lookup_load,
            "noisy_rows": len(noisy_rows)}


def _target(name: str, value: Optional[float], target: str, met: Optional[bool],
            description: str) -> Dict[str, Any]:
    return {"name": name, "value": value, "target": target, "met": met,
            "description": description}


# ----------------------------------------------------------------- output


def _mib(value: Optional[int]) -> str:
    return "—" if value is None else f"{value / 1048576:,.1f}"


def _rounds(r: Dict[str, Any]) -> str:
    rr = r.get("ratio_vs_dict_rounds")
    return "—" if not rr else f"{fmt_ratio(rr[0])}–{fmt_ratio(rr[1])}"


def markdown(result: Dict[str, Any]) -> str:
    out = [f"## {TITLE}", ""]
    # (the CPU other processes used is the line report.workload_markdown adds)
    out.append(f"{result['n']:,} keys per data set.")
    out += ["", "### Lookups", ""]
    rows = []
    for r in result["rows"]:
        rows.append([CASE_LABELS[r["dataset"]], r["label"], r["median_ns"], r["p99_ns"],
                     "" if r["floor"] else fmt_ratio(r.get("ratio_vs_dict")),
                     "" if r["floor"] or r["impl"] == "dict" else _rounds(r),
                     "" if r["floor"] or r["impl"] == "prmem"
                     else fmt_ratio(r.get("ratio_vs_prmem")),
                     f"{r['samples']:,} × {r['probes_per_sample']:,}",
                     "—" if r["round_spread"] is None else f"{r['round_spread']:.2f}×"
                     + (" noisy" if r["noisy"] else ""),
                     r["error"] or ""])
    out.append(md_table(["data", "implementation", "median ns/lookup", "p99 ns/lookup",
                         "vs dict", "vs dict per round", "vs FrozenMap", "samples × probes",
                         "round spread", "error"], rows))
    out += ["", "### Building: freeze() against pickle.dumps()", ""]
    brows = []
    for r in result["build"]:
        brows.append([DATASET_LABELS[r["dataset"]], r["label"], r["median_ms"],
                      "—" if r["min_ms"] is None else
                      f"{fmt_num(r['min_ms'])}–{fmt_num(r['max_ms'])}",
                      fmt_ratio(r.get("ratio_vs_pickle")), r["reps"],
                      _mib(r.get("output_bytes")),
                      "" if r.get("protect_ms") is None else fmt_num(r["protect_ms"]),
                      "" if r.get("destroy_ms") is None else fmt_num(r["destroy_ms"]),
                      r["error"] or ""])
    out.append(md_table(["data", "what", "median ms", "min–max ms", "vs pickle", "reps",
                         "output MiB", "then protect() ms", "then destroy() ms", "error"],
                        brows))
    out += ["", "### Memory", ""]
    mrows = []
    for m in result["memory"]:
        mrows.append([DATASET_LABELS[m["dataset"]], _mib(m["dict_deep_bytes"]),
                      f"{m['dict_objects']:,}", _mib(m["nbytes"]),
                      fmt_ratio(m.get("nbytes_vs_dict")), _mib(m["bytes_mapped"]),
                      fmt_ratio(m.get("mapped_vs_dict")), _mib(m.get("packed_bytes")),
                      fmt_ratio(m.get("packed_vs_dict")), m.get("frozen_perms") or "—"])
    out.append(md_table(["data", "dict deep MiB", "objects", "FrozenMap nbytes MiB",
                         "nbytes / dict", "pool bytes_mapped MiB", "mapped / dict",
                         "packed table MiB", "packed / dict", "FrozenMap perms"], mrows))
    out += ["", targets_table(result["targets"]), ""]
    x = result.get("extra_ratios", {})
    out += [f"Other ratios (no targets): {CASE_LABELS['int_hot']}: FrozenMap / dict "
            f"{fmt_ratio(x.get('hot_frozen_over_dict'))}, / frozendict "
            f"{fmt_ratio(x.get('hot_frozen_over_frozendict'))}, / immutables.Map "
            f"{fmt_ratio(x.get('hot_frozen_over_immutables'))}; FrozenMap / a dict probed "
            "with its own key objects: "
            f"{fmt_ratio(x.get('frozen_over_dict_same_keys'))} (all keys), "
            f"{fmt_ratio(x.get('hot_frozen_over_dict_same_keys'))} (hot keys).", ""]
    out += ["Notes:", ""] + [f"- {n}" for n in result["notes"]]
    seen = set()
    for r in result["rows"]:
        if r.get("note") and (r["label"], r["note"]) not in seen:
            seen.add((r["label"], r["note"]))
            out.append(f"- {r['label']} ({CASE_LABELS[r['dataset']]}): {r['note']}")
    return "\n".join(out) + "\n"


def summary(result: Dict[str, Any]) -> List[List[str]]:
    out = []
    for r in result["rows"]:
        if r["impl"] in ("prmem", "dict"):
            out.append([f"frozen {r['dataset']} {r['impl']}",
                        f"{fmt_num(r['median_ns'])} ns/lookup" if r["samples"]
                        else (r["error"] or "no samples")])
    x = result.get("extra_ratios", {})
    out.append(["FrozenMap / dict, hot keys (no target)",
                fmt_ratio(x.get("hot_frozen_over_dict"))])
    for t in result["targets"]:
        out.append([t["name"], f"{fmt_ratio(t['value'])} (target {t['target']}: "
                    f"{'—' if t['met'] is None else ('met' if t['met'] else 'NOT met')})"])
    return out


COLORS = {"dict": "tab:gray", "dict_same": "darkgray", "prmem": "tab:green",
          "frozendict": "tab:blue", "immutables": "tab:purple", "proxy": "tab:cyan", "packed": "tab:red",
          "overhead": "lightgray", "pickle": "tab:gray", "encode": "yellowgreen"}


def plot(result: Dict[str, Any], out_dir: str, plt: Any) -> List[str]:
    fig, axes = plt.subplots(1, 3, figsize=(16, 6),
                             gridspec_kw={"width_ratios": [2.2, 1.4, 1]})
    # lookups: grouped bars per data set, log scale (the packed table is far off)
    ax = axes[0]
    impls = [k for k in ("dict", "dict_same", "prmem", "frozendict", "immutables", "proxy",
                         "packed",
                         "overhead") if any(r["impl"] == k for r in result["rows"])]
    width = 0.8 / len(impls)
    for j, key in enumerate(impls):
        xs, ys, label = [], [], key
        for i, dataset in enumerate(CASES):
            r = next((r for r in result["rows"] if r["dataset"] == dataset and r["impl"] == key),
                     None)
            if r and r["median_ns"]:
                xs.append(i + (j - (len(impls) - 1) / 2) * width)
                ys.append(r["median_ns"])
                label = r["label"]
        ax.bar(xs, ys, width=width, color=COLORS.get(key), label=label)
        if key == "prmem":
            for x, y, dataset in zip(xs, ys, CASES):
                rr = next(r for r in result["rows"]
                          if r["dataset"] == dataset and r["impl"] == "prmem")
                ax.annotate(fmt_ratio(rr.get("ratio_vs_dict")), (x, y), ha="center",
                            va="bottom", fontsize="small")
    ax.set_xticks(range(len(CASES)))
    ax.set_xticklabels([CASE_LABELS[d].replace(", ", ",\n") for d in CASES], fontsize="small")
    ax.set_yscale("log")
    ax.set_ylabel("median ns per lookup (log)")
    ax.set_title(f"lookups, {result['n']:,} keys, random probes (label: FrozenMap / dict)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    # building
    ax = axes[1]
    keys = [k for k in ("prmem", "pickle", "encode", "frozendict", "immutables")
            if any(r["impl"] == k for r in result["build"])]
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        pts = [(i, r) for i, dataset in enumerate(DATASETS) for r in result["build"]
               if r["dataset"] == dataset and r["impl"] == key and r["median_ms"]]
        ax.bar([i + (j - (len(keys) - 1) / 2) * width for i, _ in pts],
               [r["median_ms"] for _, r in pts], width=width, color=COLORS.get(key),
               label=pts[0][1]["label"] if pts else key)
    ax.set_xticks(range(len(DATASETS)))
    ax.set_xticklabels(DATASETS)
    ax.set_ylabel("median ms")
    ax.set_title("building a frozen copy / a pickle")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.1))
    # memory
    ax = axes[2]
    mem = result["memory"]
    xs = range(len(mem))
    ax.bar([x - 0.2 for x in xs], [m["dict_deep_bytes"] / 1048576 for m in mem], width=0.4,
           color="tab:gray", label="dict, deep getsizeof")
    ax.bar([x + 0.2 for x in xs], [m["bytes_mapped"] / 1048576 for m in mem], width=0.4,
           color="tab:green", label="FrozenMap pool bytes_mapped")
    for x, m in zip(xs, mem):
        ax.annotate(fmt_ratio(m.get("mapped_vs_dict")), (x + 0.2, m["bytes_mapped"] / 1048576),
                    ha="center", va="bottom", fontsize="small")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([m["dataset"] for m in mem])
    ax.set_ylabel("MiB")
    ax.set_title("memory (label: pool / dict)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.1))
    return [save_figure(plt, fig, out_dir, "frozen")]
