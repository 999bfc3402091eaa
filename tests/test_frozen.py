"""Frozen containers (issue 10): ``Pool.freeze()``, ``FrozenMap``,
``FrozenList``, ``rare_set`` and ``Pool.array()``.

The contract under test:

* ``pool.freeze(obj)`` copies a Mapping (→ FrozenMap) or a list/tuple
  (→ FrozenList) of None/bool/int/float/str/bytes and nested containers into
  one contiguous range of pool memory; anything else raises TypeError naming
  the path, a cycle ValueError, and a failure leaves nothing allocated;
* the handles read it back with dict/list semantics (lookups of True/1.0
  find 1, unhashable keys raise TypeError, other hashable keys KeyError),
  ``thaw()`` gives plain dicts and lists, values are fresh objects;
* they are immutable except for ``rare_set`` of fixed-size scalars in
  write-rare pools, which goes through the rare-write path (the mapping
  stays read-only) and is refused like rare_write elsewhere;
* handles pin their pool (destroy() → BufferError while any is alive), the
  data lives in protected memory (a native write faults with a report), and
  the layout is position- and process-independent;
* ``pool.array()`` puts numpy arrays in the pool.

Crashes and process-wide effects are tested in child interpreters
(``conftest.run_child``), or with ``prmem.testing.assert_protected`` (native
writes in forked children) and the ``prmem_pool``/``prmem_protected``
fixtures of prmem's pytest plugin, which also fail a test that leaks a view.  Corruption robustness is in test_frozen_fuzz.py.
"""
from __future__ import annotations

import collections
import ctypes
import enum
import gc
import itertools
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import types
import weakref
from collections import OrderedDict
from collections.abc import Mapping, MutableMapping, MutableSequence, Sequence
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prmem
from prmem import FrozenList, FrozenMap, Mode, ProtectionError
from prmem.testing import assert_protected, assert_write_rare

from conftest import CHILD_PRELUDE, maps_entries, perms_at, run_child
from frozen_support import assert_same, assert_scalar, norm_key, plain

PAGE = prmem.page_size
WR_MODES = [Mode.WR, Mode.AUTO_WR, Mode.START_WR]
RO_MODES = [Mode.RO, Mode.AUTO_RO]
_names = itertools.count()


def unique(prefix="frozen"):
    """A pool name no other pool in this process uses (maps lookups)."""
    return "%s-%d-%d" % (prefix, os.getpid(), next(_names))


POLICY = {
    "alice": {"role": "admin", "quota": 10, "nets": ["10.0.0.0/8"]},
    "bob": {"role": "user", "quota": 2, "nets": ["192.168.0.0/16", "10.1.0.0/16"],
            "active": True, "ratio": 0.25, "note": None, "key": b"\x00\x01\xff"},
}


class PlainMapping(Mapping):
    """A Mapping that is not a dict."""

    def __init__(self, *args, **kwargs):
        self._d = dict(*args, **kwargs)

    def __getitem__(self, key):
        return self._d[key]

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)


# ================================================================ checking


def check_value(got, orig, deep=True):
    """got (read through a handle) stands for orig: a handle of the right
    kind for containers (checked fully if deep, by == otherwise), an exact
    equal for scalars."""
    if isinstance(orig, Mapping):
        assert type(got) is FrozenMap, type(got)
        if deep:
            check_map(got, orig)
        else:
            assert got == orig
    elif isinstance(orig, (list, tuple)):
        assert type(got) is FrozenList, type(got)
        if deep:
            check_list(got, orig)
        else:
            assert got == orig
    else:
        assert_scalar(got, orig)


def outcome(fn):
    """("ok", value) or ("raise", exception type) — to compare with dict."""
    try:
        return ("ok", fn())
    except Exception as e:  # noqa: BLE001 - the type is the result
        return ("raise", type(e))


ABSENT_KEYS = ["\x00absent", b"\x00absent", -987654321987654321987654321, 31337]
OTHER_TYPE_KEYS = [None, 1.5, (1,), (), frozenset(), float("nan"), float("inf"), 3j]
UNHASHABLE_KEYS = [[], [1], {}, set(), bytearray(b"a")]


def check_map(h, orig):
    pairs = [(norm_key(k), v) for k, v in orig.items()]
    ref = dict(pairs)
    assert type(h) is FrozenMap
    assert isinstance(h, Mapping) and not isinstance(h, MutableMapping)
    assert len(h) == len(pairs)
    # iteration in insertion order, keys of the stored types
    for what, got in (("iter", list(h)), ("keys", list(h.keys()))):
        assert len(got) == len(pairs), what
        for g, (k, _) in zip(got, pairs):
            assert_scalar(g, k, what)
    values = list(h.values())
    items = list(h.items())
    assert len(values) == len(items) == len(pairs)
    sentinel = object()
    for (k, v), value, (ik, iv) in zip(pairs, values, items):
        check_value(h[k], v, deep=True)
        check_value(value, v, deep=False)
        assert_scalar(ik, k, "items() key")
        check_value(iv, v, deep=False)
        check_value(h.get(k), v, deep=False)
        check_value(h.get(k, sentinel), v, deep=False)
        assert k in h
        # keys equal to k as a dict sees it: True/False, floats
        if type(k) is int:
            alternatives = []
            if k in (0, 1):
                alternatives.append(bool(k))
            try:
                if float(k) == k:
                    alternatives.append(float(k))
            except OverflowError:
                pass
            for alt in alternatives:
                assert alt in h, alt
                check_value(h[alt], v, deep=False)
    for key in ABSENT_KEYS + OTHER_TYPE_KEYS:
        if key in ref:
            continue
        with pytest.raises(KeyError):
            h[key]
        assert h.get(key) is None
        assert h.get(key, sentinel) is sentinel
        assert key not in h
    for key in UNHASHABLE_KEYS:
        with pytest.raises(TypeError):
            h[key]
        with pytest.raises(TypeError):
            key in h  # noqa: B015 - dict semantics: raises
        with pytest.raises(TypeError):
            h.get(key)
    # equality both ways, with the original and with plain dicts
    assert h == orig and orig == h and not (h != orig)
    assert h == ref and ref == h
    assert h == h
    extra = dict(ref)
    extra["\x00extra"] = None
    assert h != extra and extra != h and not (h == extra)
    if pairs:
        fewer = dict(ref)
        del fewer[pairs[-1][0]]
        assert h != fewer and fewer != h
        changed = dict(ref)
        changed[pairs[0][0]] = object()
        assert h != changed and changed != h
    assert h != list(ref)
    assert isinstance(repr(h), str)


SLICES = [slice(None), slice(1, None), slice(None, -1), slice(None, None, -1),
          slice(1, None, 2), slice(-2, None), slice(None, None, 3),
          slice(-100, 100), slice(5, 2), slice(2, 100, -1), slice(None, None, -2)]


def check_list(h, orig):
    exp = list(orig)
    n = len(exp)
    assert type(h) is FrozenList
    assert isinstance(h, Sequence) and not isinstance(h, MutableSequence)
    assert len(h) == n
    for i, e in enumerate(exp):
        check_value(h[i], e, deep=True)
        check_value(h[i - n], e, deep=False)
    for bad in (n, n + 7, -n - 1, -n - 7, 2**70, -(2**70)):
        with pytest.raises(IndexError):
            h[bad]
    items = list(h)
    assert len(items) == n
    for g, e in zip(items, exp):
        check_value(g, e, deep=False)
    for s in SLICES:
        got = h[s]
        want = exp[s]
        assert type(got) is list, (s, type(got))
        assert len(got) == len(want), s
        for g, e in zip(got, want):
            check_value(g, e, deep=False)
    # equality sees tuples and lists alike (FrozenList == both): compare
    # with the plain form, where tuples are lists already
    flat = plain(exp)
    for e in exp:
        assert e in h
        assert h.index(e) == flat.index(plain(e))
        assert h.count(e) == flat.count(plain(e))
    stranger = object()
    assert stranger not in h
    assert h.count(stranger) == 0
    with pytest.raises(ValueError):
        h.index(stranger)
    assert h == orig and orig == h and not (h != orig)
    assert h == exp and h == tuple(exp) and tuple(exp) == h
    assert h == h
    assert h != exp + [None] and exp + [None] != h
    if n:
        assert h != exp[:-1]
        assert h != [object()] + exp[1:]
    assert h != {i: x for i, x in enumerate(exp)}
    assert isinstance(repr(h), str)


def check_frozen(h, orig):
    assert_same(h.thaw(), plain(orig), "thaw()")
    if isinstance(orig, Mapping):
        check_map(h, orig)
    else:
        check_list(h, orig)


# ========================================================= hypothesis data

EDGE_INTS = [0, 1, -1, 255, 2**31, 2**32, 2**53 + 1, 2**61, 2**63 - 1, -(2**63),
             2**63, -(2**63) - 1, 2**64 - 1, 2**64, -(2**64), 2**200, -(2**1000)]
ints = st.integers() | st.integers(-(2**140), 2**140) | st.sampled_from(EDGE_INTS)
floats = st.floats(allow_nan=False)  # with ±inf and -0.0; NaN is tested apart
scalars = (st.none() | st.booleans() | ints | floats
           | st.text(max_size=12) | st.binary(max_size=12))
keys = st.text(max_size=8) | st.binary(max_size=8) | ints


def _containers(children):
    return (st.lists(children, max_size=5)
            | st.lists(children, max_size=5).map(tuple)
            | st.dictionaries(keys, children, max_size=5))


values = st.recursive(scalars, _containers, max_leaves=24)
top_maps = st.dictionaries(keys, values, max_size=8)
top_any = st.one_of(
    top_maps,
    top_maps.map(OrderedDict),
    top_maps.map(PlainMapping),
    st.lists(values, max_size=8),
    st.lists(values, max_size=8).map(tuple),
)

PROPERTY_SETTINGS = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@PROPERTY_SETTINGS
@given(data=top_any, mode=st.sampled_from([Mode.RO, Mode.WR, Mode.START_WR]),
       protect=st.booleans())
def test_freeze_round_trips(data, mode, protect):
    pool = prmem.Pool(mode, name="frozen-prop", refill=4096)
    h = pool.freeze(data)
    if protect:
        pool.protect()
    check_frozen(h, data)
    del h
    pool.destroy()  # nothing the checks made still pins the pool


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=top_maps, probes=st.lists(keys, max_size=10))
def test_lookups_agree_with_dict(data, probes):
    pool = prmem.Pool(Mode.RO, name="frozen-keys", refill=4096)
    h = pool.freeze(data)
    pool.protect()
    for key in probes + list(data):
        assert outcome(lambda: h[key])[0] == outcome(lambda: data[key])[0]
        assert (key in h) == (key in data)
        if key in data:
            check_value(h[key], data[key], deep=False)
            check_value(h.get(key), data[key], deep=False)
        else:
            assert h.get(key, "d") == "d"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.lists(values, max_size=12),
       slices=st.lists(st.tuples(st.none() | st.integers(-15, 15),
                                 st.none() | st.integers(-15, 15),
                                 st.none() | st.integers(-4, 4).filter(bool)),
                       max_size=6),
       as_tuple=st.booleans())
def test_frozen_list_agrees_with_list(items, slices, as_tuple):
    orig = tuple(items) if as_tuple else items
    pool = prmem.Pool(Mode.RO, name="frozen-list", refill=4096)
    h = pool.freeze(orig)
    pool.protect()
    check_list(h, orig)
    for start, stop, step in slices:
        got = h[start:stop:step]
        want = items[start:stop:step]
        assert type(got) is list and len(got) == len(want)
        for g, w in zip(got, want):
            check_value(g, w, deep=False)
    for i in range(-len(items) - 2, len(items) + 2):
        if -len(items) <= i < len(items):
            check_value(h[i], items[i], deep=False)
        else:
            with pytest.raises(IndexError):
                h[i]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=top_any)
def test_refreezing_thawed_data_copies_it(data):
    pool = prmem.Pool(Mode.RO, name="frozen-a", refill=4096)
    other = prmem.Pool(Mode.RO, name="frozen-b", refill=4096)
    h = pool.freeze(data)
    pool.protect()
    copy_ = other.freeze(h.thaw())
    assert copy_ == h and h == copy_
    assert_same(copy_.thaw(), plain(data))
    assert copy_.address != h.address


def test_a_frozen_map_is_a_mapping_freeze_accepts(pool_factory):
    # Lists inside come back as FrozenList, which is not a list or tuple;
    # without them a FrozenMap (a Mapping) can be frozen again elsewhere.
    pool = pool_factory(Mode.RO, name=unique())
    other = pool_factory(Mode.RO, name=unique())
    data = {"a": {"b": 1, b"c": None}, 2: "x"}
    m = pool.freeze(data)
    pool.protect()
    again = other.freeze(m)
    nested = other.freeze({"inner": m["a"]})
    assert again == data and again.address != m.address
    assert_same(nested.thaw(), {"inner": {"b": 1, b"c": None}})


# =========================================================== what freezes


@pytest.mark.parametrize("make", [dict, OrderedDict, PlainMapping,
                                  lambda d: types.MappingProxyType(dict(d))],
                         ids=["dict", "OrderedDict", "Mapping", "mappingproxy"])
def test_any_mapping_freezes_to_frozen_map(pool_factory, make):
    pool = pool_factory(Mode.RO, name=unique())
    data = make({"a": make({"x": 1}), "b": [make({}), (1, 2)]})
    m = pool.freeze(data)
    assert type(m) is FrozenMap
    assert isinstance(m, Mapping)
    assert type(m["a"]) is FrozenMap and type(m["b"][0]) is FrozenMap
    assert type(m["b"]) is FrozenList and type(m["b"][1]) is FrozenList
    assert_same(m.thaw(), {"a": {"x": 1}, "b": [{}, [1, 2]]})


@pytest.mark.parametrize("data", [[1, "a"], (1, "a"), collections.namedtuple("P", "x y")(1, "a")],
                         ids=["list", "tuple", "namedtuple"])
def test_lists_and_tuples_freeze_to_frozen_list(pool_factory, data):
    pool = pool_factory(Mode.RO, name=unique())
    lst = pool.freeze(data)
    assert type(lst) is FrozenList
    assert isinstance(lst, Sequence)
    assert lst == [1, "a"] and lst == (1, "a")
    assert_same(lst.thaw(), [1, "a"])


@pytest.mark.parametrize("data", [None, True, 0, 2**80, 1.5, "text", b"bytes", bytearray(b"x"),
                                  {1, 2}, frozenset(), object(), range(3), iter([1]),
                                  memoryview(b"ab"), Decimal(1), 1j],
                         ids=repr)
def test_top_level_must_be_a_container(pool_factory, data):
    pool = pool_factory(Mode.RO, name=unique())
    before = pool.stats().allocations
    with pytest.raises(TypeError):
        pool.freeze(data)
    assert pool.stats().allocations == before


def test_freeze_requires_an_argument(pool_factory):
    pool = pool_factory(Mode.RO, name=unique())
    with pytest.raises(TypeError):
        pool.freeze()


SCALARS = [
    None, True, False, 0, 1, -1, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 2**64,
    2**10000 + 12345, -(2**4000), 0.0, -0.0, 1.5, -2.25e-308, 5e-324, 1.7976931348623157e308,
    float("inf"), float("-inf"), "", "a", "\x00", "a\x00b", "é漢字🎉\U0010ffff", "x" * 10000,
    b"", b"\x00", b"\x00\xff\x80", bytes(range(256)) * 40,
]


@pytest.mark.parametrize("mode", [Mode.RO, Mode.WR, Mode.START_WR], ids=str)
def test_scalars_round_trip_exactly(pool_factory, mode):
    pool = pool_factory(mode, name=unique())
    data = {"v%d" % i: v for i, v in enumerate(SCALARS)}
    m = pool.freeze(data)
    lst = pool.freeze(SCALARS)
    pool.protect()
    for i, v in enumerate(SCALARS):
        assert_scalar(m["v%d" % i], v, "map value #%d" % i)
        assert_scalar(lst[i], v, "list item #%d" % i)
    assert_same(m.thaw(), data)
    assert_same(lst.thaw(), SCALARS)
    assert m == data and lst == SCALARS


def test_nan_round_trips(pool_factory):
    pool = pool_factory(Mode.RO, name=unique())
    nan = float("nan")
    m = pool.freeze({"nan": nan, "l": [nan, -nan]})
    pool.protect()
    assert isinstance(m["nan"], float) and math.isnan(m["nan"])
    assert all(isinstance(x, float) and math.isnan(x) for x in m["l"])
    assert math.isnan(m.thaw()["nan"])


def test_lone_surrogate_str_round_trips(pool_factory):
    # A lone surrogate is a valid Python str (os.fsdecode makes them).
    pool = pool_factory(Mode.RO, name=unique())
    data = {"\udcff": "a\ud800b", "k": ["\udfff"]}
    m = pool.freeze(data)
    pool.protect()
    assert_same(m.thaw(), data)
    assert m["\udcff"] == "a\ud800b"


def test_large_values_and_many_items(pool_factory):
    pool = pool_factory(Mode.RO, name=unique(), refill=4096)
    big = bytes(range(256)) * (3 * PAGE // 256) + b"tail"
    data = {"big": big, "text": "€" * (2 * PAGE), "n": list(range(20000)),
            "d": {"k%05d" % i: i for i in range(5000)}}
    m = pool.freeze(data)
    pool.protect()
    assert m.nbytes >= len(big) + 2 * PAGE
    assert m["big"] == big and m["text"] == data["text"]
    assert m["n"][19999] == 19999 and m["n"][-20000] == 0 and len(m["n"]) == 20000
    assert m["d"]["k04999"] == 4999 and "k05000" not in m["d"]
    assert list(m["d"]) == list(data["d"])
    assert m == data


def test_empty_containers(pool_factory):
    pool = pool_factory(Mode.RO, name=unique())
    m = pool.freeze({})
    lst = pool.freeze([])
    t = pool.freeze(())
    nested = pool.freeze({"": {}, b"": [], 0: ()})
    pool.protect()
    assert len(m) == 0 and list(m) == [] and m == {} and m.thaw() == {}
    assert len(lst) == 0 and list(lst) == [] and lst == [] and lst == () and lst.thaw() == []
    assert t == [] and t.thaw() == []
    with pytest.raises(KeyError):
        m["x"]
    with pytest.raises(IndexError):
        lst[0]
    assert lst[:] == []
    assert_same(nested.thaw(), {"": {}, b"": [], 0: []})
    assert m.nbytes > 0 and lst.nbytes > 0


def nested(depth):
    data = leaf = []
    for i in range(depth):
        nxt = {"k": i} if i % 2 else []
        if isinstance(leaf, list):
            leaf.append(nxt)
        else:
            leaf["next"] = nxt
        leaf = nxt
    return data


def test_deep_nesting(pool_factory):
    """"Nested to any depth": deeper than Python's recursion limit (freeze and
    thaw walk the structure with explicit stacks)."""
    depth = sys.getrecursionlimit() * 5
    data = nested(depth)
    pool = pool_factory(Mode.RO, name=unique())
    h = pool.freeze(data)
    pool.protect()
    thawed = h.thaw()
    # walk both iteratively
    level, node, orig = 0, h, data
    while True:
        if isinstance(orig, list):
            assert type(node) is FrozenList and len(node) == len(orig)
            if not orig:
                break
            node, orig = node[0], orig[0]
        else:
            assert type(node) is FrozenMap and node["k"] == orig["k"]
            if "next" not in orig:
                assert "next" not in node
                break
            node, orig = node["next"], orig["next"]
        level += 1
    assert level == depth
    assert_same(thawed, data)


def test_shared_references_are_not_cycles(pool_factory):
    pool = pool_factory(Mode.RO, name=unique())
    shared = [1, {"x": "y"}]
    inner = {"s": shared}
    data = {"a": shared, "b": shared, "c": [shared, shared, inner], "d": inner, "e": (shared,)}
    m = pool.freeze(data)
    pool.protect()
    assert_same(m.thaw(), plain(data))
    assert m["a"] == m["b"] == m["c"][1] == m["d"]["s"] == shared


# ============================================================= key semantics


def test_bool_keys_are_stored_as_int(pool_factory):
    pool = pool_factory(Mode.RO, name=unique())
    m = pool.freeze({True: "t", False: "f", 2: "two"})
    pool.protect()
    keys = list(m)
    assert keys == [1, 0, 2] and all(type(k) is int for k in keys)
    assert m[1] == m[True] == m[1.0] == "t"
    assert m[0] == m[False] == m[-0.0] == m[0.0] == "f"
    assert_same(m.thaw(), {1: "t", 0: "f", 2: "two"})


def test_keys_of_different_types_are_distinct(pool_factory):
    pool = pool_factory(Mode.RO, name=unique())
    data = {1: "int", "1": "str", b"1": "bytes", "": "empty str", b"": "empty bytes",
            0: "zero", "\x00": "nul", b"\x00": "nul bytes", "é": "e-acute",
            "é".encode(): "e-acute bytes"}
    m = pool.freeze(data)
    pool.protect()
    for k, v in data.items():
        assert m[k] == v, k
    assert list(m) == list(data)
    assert_same(list(m.keys()), list(data))


def test_int_keys_whose_python_hashes_collide(pool_factory):
    # hash(-1) == hash(-2); hash(2**61) == hash(1) (the modulus is 2**61-1)
    data = {1: "one", 2**61: "2**61", -1: "-1", -2: "-2", 2**61 - 1: "m", 0: "zero",
            -(2**61): "-2**61", 2**64 + 1: "big", 2**122: "2**122", -(2**122): "neg"}
    pool = pool_factory(Mode.RO, name=unique())
    m = pool.freeze(data)
    pool.protect()
    for k, v in data.items():
        assert m[k] == v, k
        assert m.get(k) == v
        if float(k) == k:
            assert m[float(k)] == v, k
    for k in (2, 3, 2**61 + 1, -3, 2**64, 2**123):
        assert k not in m


@pytest.mark.parametrize("kind", ["str", "bytes", "int", "mixed"])
def test_many_keys(pool_factory, kind):
    n = 6000
    make = {
        "str": lambda i: "key-%d" % i,
        "bytes": lambda i: b"k%d" % i,
        "int": lambda i: i * 7919 - 10**6 if i % 3 else i << 70,
        "mixed": lambda i: ("s%d" % i, b"b%d" % i, i)[i % 3],
    }[kind]
    data = {make(i): i for i in range(n)}
    pool = pool_factory(Mode.RO, name=unique())
    m = pool.freeze(data)
    pool.protect()
    assert len(m) == n
    assert list(m) == list(data)
    for k, v in data.items():
        assert m[k] == v
    for i in range(n, n + 500):
        assert make(i) not in m
        assert m.get(make(i), "absent") == "absent"


class Color(enum.IntEnum):
    RED = 1


class Name(str):
    pass


LOOKUP_PROBES = [
    1, True, 1.0, 0, False, 0.0, -0.0, 2**61, float(2**61), 2**70, float(2**70), 2.0**70 + 2**20,
    "1", "a", Name("a"), b"a", Color.RED, 1.5, None, (1,), (), frozenset(), float("nan"),
    float("inf"), 3j, "absent", b"absent", 42, -(2**70),
    [], [1], {}, set(), bytearray(b"a"),
]


@pytest.mark.parametrize("key", LOOKUP_PROBES, ids=repr)
def test_lookups_follow_dict_semantics(pool_factory, key):
    d = {1: "one", 0: "zero", 2**61: "2**61", 2**70: "2**70", "a": "str", b"a": "bytes"}
    pool = pool_factory(Mode.RO, name=unique())
    m = pool.freeze(d)
    pool.protect()
    assert outcome(lambda: m[key]) == outcome(lambda: d[key])
    assert outcome(lambda: m.get(key)) == outcome(lambda: d.get(key))
    assert outcome(lambda: m.get(key, "default")) == outcome(lambda: d.get(key, "default"))
    assert outcome(lambda: key in m) == outcome(lambda: key in d)


def test_missing_key_error_carries_the_key(pool_factory):
    pool = pool_factory(Mode.RO, name=unique())
    m = pool.freeze({"a": 1})
    with pytest.raises(KeyError) as info:
        m["missing"]
    assert info.value.args == ("missing",)


def test_list_index_semantics(pool_factory):
    pool = pool_factory(Mode.RO, name=unique())
    data = ["a", "b", "c", ["d"], "a"]
    lst = pool.freeze(data)
    pool.protect()
    assert lst[True] == "b"  # a bool is an int index, as for list
    for bad in ("0", 1.0, None, [0], 1j):
        with pytest.raises(TypeError):
            lst[bad]
    assert lst.index("a") == 0 and lst.index("a", 1) == 4
    with pytest.raises(ValueError):
        lst.index("a", 1, 4)
    assert lst.count("a") == 2 and lst.count("z") == 0
    assert ["d"] in lst and ("d",) in lst and "d" not in lst
    assert lst[::-1][0] == "a" and lst[-2:][0] == ["d"]
    assert type(lst[-2:][0]) is FrozenList
    assert lst[10**30:] == [] and lst[::10**20] == ["a"]


# =================================================== errors: types and paths


class Weird:
    pass


@pytest.mark.parametrize("bad", [{1, 2}, frozenset([1]), Weird(), 1j, bytearray(b"x"),
                                 Decimal("1.5"), range(3), memoryview(b"x"), print],
                         ids=lambda b: type(b).__name__)
def test_unsupported_value_names_its_path(pool_factory, bad):
    pool = pool_factory(Mode.RO, name=unique())
    data = {"alice": {"role": "admin", "quota": 10, "nets": ["10.0.0.0/8", "x", bad]},
            "bob": {}}
    before = pool.stats()
    with pytest.raises(TypeError) as info:
        pool.freeze(data)
    msg = str(info.value)
    assert "freeze()" in msg, msg
    assert "value at ['alice']['nets'][2]" in msg, msg
    assert type(bad).__name__ in msg, msg
    assert "supported" in msg, msg
    after = pool.stats()
    assert after.allocations == before.allocations
    assert after.bytes_requested == before.bytes_requested


@pytest.mark.parametrize("data, path", [
    ([0, [1, {2}]], "[1][1]"),
    ((0, (1, {2})), "[1][1]"),
    ({b"k": {3: [None, Weird()]}}, "[b'k'][3][1]"),
    ({-5: {"\u00e9": (0, 1, 2, object())}}, "[-5]['\u00e9'][3]"),
    ({"top": {1, 2}}, "['top']"),
    ([{1}], "[0]"),
])
def test_value_paths_for_every_key_kind(pool_factory, data, path):
    pool = pool_factory(Mode.RO, name=unique())
    with pytest.raises(TypeError) as info:
        pool.freeze(data)
    assert "value at " + path in str(info.value), str(info.value)


@pytest.mark.parametrize("bad_key", [1.5, None, (1, 2), frozenset(), Weird(), 2j],
                         ids=lambda k: type(k).__name__)
def test_unsupported_key_names_its_path(pool_factory, bad_key):
    pool = pool_factory(Mode.RO, name=unique())
    before = pool.stats().allocations
    with pytest.raises(TypeError) as info:
        pool.freeze({"alice": {"ok": 1, bad_key: "x"}})
    msg = str(info.value)
    assert "key at ['alice']" in msg, msg
    assert type(bad_key).__name__ in msg, msg
    assert pool.stats().allocations == before
    with pytest.raises(TypeError) as info:
        pool.freeze({bad_key: 1})
    assert "key" in str(info.value) and type(bad_key).__name__ in str(info.value)
    assert pool.stats().allocations == before


def _cycles():
    d = {}
    d["self"] = d
    yield "dict", d
    lst = []
    lst.append(lst)
    yield "list", lst
    a = {"x": [1, 2]}
    a["x"].append({"back": a})
    yield "dict-list-dict", a
    t = ([],)
    t[0].append(t)
    yield "tuple", t
    pm = PlainMapping()
    pm._d["me"] = [pm]
    yield "Mapping", {"outer": pm}
    deep = {}
    node = deep
    for i in range(500):
        node["n"] = {}
        node = node["n"]
    node["loop"] = deep
    yield "long", deep


@pytest.mark.parametrize("name, data", list(_cycles()), ids=[n for n, _ in _cycles()])
def test_cycles_raise_value_error(pool_factory, name, data):
    pool = pool_factory(Mode.RO, name=unique())
    before = pool.stats()
    with pytest.raises(ValueError):
        pool.freeze(data)
    after = pool.stats()
    assert after.allocations == before.allocations
    assert after.bytes_requested == before.bytes_requested
    assert pool.freeze({"still": "usable"}) == {"still": "usable"}


class Exploding(Mapping):
    def __init__(self, n):
        self.n = n

    def __getitem__(self, key):
        if key == self.n - 1:
            raise RuntimeError("boom")
        return key

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self):
        return self.n


@pytest.mark.parametrize("mode", [Mode.RO, Mode.WR, Mode.START_WR, Mode.AUTO_RO], ids=str)
def test_failure_late_in_a_large_structure_leaves_nothing_allocated(pool_factory, mode):
    pool = pool_factory(mode, name=unique(), refill=4096)
    pool.freeze({"earlier": 1})
    before = pool.stats()
    big = {"k%d" % i: ["x" * 50, i] for i in range(5000)}
    big["zzz"] = [1, 2, {"deep": [set()]}]
    with pytest.raises(TypeError) as info:
        pool.freeze(big)
    assert "['zzz'][2]['deep'][0]" in str(info.value)
    with pytest.raises(RuntimeError, match="boom"):
        pool.freeze({"a": [1] * 1000, "b": Exploding(100)})
    after = pool.stats()
    assert after.allocations == before.allocations
    assert after.bytes_requested == before.bytes_requested
    assert pool.freeze([1]) == [1]


MUTATING_DURING_FREEZE = r"""
from collections.abc import Mapping
pool = Pool(Mode.RO, name="mutating")
guard = pool.alloc(64)
guard.write(b"\xa5" * 64)

class Hook(Mapping):
    # runs `action` (user code) at each __getitem__
    def __init__(self, action):
        self.action = action
    def __getitem__(self, key):
        self.action()
        return "v" * 50
    def __iter__(self):
        return iter(["k1", "k2"])
    def __len__(self):
        return 2

cases = {}
outer = []
outer.extend([Hook(outer.clear)] + ["s%d" % i * 40 for i in range(500)])
cases["clears the list being frozen"] = outer
parent = {}
parent["a"] = Hook(lambda: parent.update({"n%d" % i: "x" * 64 for i in range(len(parent), len(parent) + 500)}))
parent["b"] = "y"
cases["grows the dict being frozen"] = parent
shrink = {"k%d" % i: i for i in range(200)}
shrink["hook"] = Hook(shrink.clear)
shrink.update({"z%d" % i: "tail" * 30 for i in range(200)})
cases["empties the dict being frozen"] = shrink
sibling = ["x" * 100 for _ in range(300)]
cases["empties a sibling list"] = {"hook": Hook(sibling.clear), "sibling": sibling}
swap = {"s": "short"}
cases["replaces a sibling str"] = [Hook(lambda: swap.__setitem__("s", "long" * 5000)), swap]
class Liar(Mapping):
    def __getitem__(self, key):
        return key
    def __iter__(self):
        return iter(range(50))
    def __len__(self):
        return 2
cases["len() smaller than iteration"] = {"liar": Liar()}
for name, data in cases.items():
    try:
        m = pool.freeze(data)
    except Exception as e:
        print("raised", type(e).__name__, "|", name)
        continue
    t = m.thaw()
    assert m == t and t == m, name
    assert len(m) == len(t), name
    del m, t
    print("froze |", name)
assert bytes(guard) == b"\xa5" * 64
print("OK")
"""


def test_containers_changed_by_user_code_during_freeze():
    """Mappings run user code (__getitem__, __iter__, __len__) while freeze()
    walks the data; whatever that code changes, freeze() must not crash or
    write outside the pool memory it took: it raises, or freezes a
    structure that is consistent in itself."""
    proc = run_child(MUTATING_DURING_FREEZE)
    assert proc.returncode == 0, (proc.stdout, proc.stderr[-3000:])
    assert proc.stdout.splitlines()[-1] == "OK"


def test_freeze_after_destroy(pool_factory):
    pool = pool_factory(Mode.RO, name=unique())
    pool.destroy()
    with pytest.raises(prmem.PoolDestroyedError):
        pool.freeze({"a": 1})


def test_freeze_after_protect_uses_new_writable_memory(pool_factory):
    pool = pool_factory(Mode.RO, name=unique())
    first = pool.freeze({"a": 1})
    pool.protect()
    second = pool.freeze({"b": 2})
    assert perms_at(first.address) == "r--s"
    assert perms_at(second.address) == "rw-s"
    pool.protect()
    assert perms_at(second.address) == "r--s"
    assert first == {"a": 1} and second == {"b": 2}


def test_corruption_error_class():
    assert issubclass(prmem.CorruptionError, prmem.PrmemError)
    assert issubclass(prmem.CorruptionError, ValueError)


# ================================================================ immutability


def test_mutation_raises_type_error(pool_factory):
    pool = pool_factory(Mode.WR, name=unique())
    m = pool.freeze({"a": 1, "l": [1, 2], "d": {"x": 1}})
    lst = m["l"]
    for target in (m, m["d"]):
        with pytest.raises(TypeError):
            target["a"] = 2
        with pytest.raises(TypeError):
            target["new"] = 2
        with pytest.raises(TypeError):
            del target["a"]
        with pytest.raises(TypeError):
            del target["missing"]
    with pytest.raises(TypeError):
        lst[0] = 5
    with pytest.raises(TypeError):
        del lst[0]
    with pytest.raises(TypeError):
        lst[0:1] = [9]
    with pytest.raises(TypeError):
        lst[5] = 0
    assert m == {"a": 1, "l": [1, 2], "d": {"x": 1}}


def test_values_are_fresh_objects(pool_factory):
    pool = pool_factory(Mode.RO, name=unique())
    m = pool.freeze({"s": "x" * 100, "b": b"y" * 100, "n": 2**100, "l": [1], "d": {}})
    pool.protect()
    for k in ("s", "b", "n", "l", "d"):
        a, b = m[k], m[k]
        assert a == b and a is not b, k
    t1, t2 = m.thaw(), m.thaw()
    assert t1 == t2 and t1 is not t2 and t1["l"] is not t2["l"]
    t1["l"].append(2)
    t1["new"] = 1
    assert m["l"] == [1] and "new" not in m
    lst = m["l"]
    assert lst.thaw() is not lst.thaw()


def test_thaw_of_nested_handles(pool_factory):
    pool = pool_factory(Mode.RO, name=unique())
    m = pool.freeze(POLICY)
    pool.protect()
    assert_same(m["bob"].thaw(), plain(POLICY["bob"]))
    assert_same(m["bob"]["nets"].thaw(), POLICY["bob"]["nets"])
    assert m["alice"]["role"] == "admin"
    assert m == POLICY


def test_equality_is_by_content(pool_factory):
    pool = pool_factory(Mode.RO, name=unique())
    other = pool_factory(Mode.RO, name=unique())
    d = {"a": 1, "b": (1, 2), "c": {"x": None}}
    m = pool.freeze(d)
    m2 = other.freeze({"c": {"x": None}, "b": [1, 2], "a": 1})  # other order
    pool.protect()
    assert m == {"b": [1, 2], "a": 1, "c": {"x": None}}   # order does not matter
    assert m == OrderedDict(d) and m == types.MappingProxyType(d) and m == PlainMapping(d)
    assert m == m2 and m2 == m and not (m != m2)
    assert m != {"a": 1, "b": (1, 2)} and m != {**d, "c": {"x": 0}} and m != {}
    assert m != [("a", 1)] and m != "a" and m != None  # noqa: E711
    lst = m["b"]
    assert lst == [1, 2] and lst == (1, 2) and lst == m2["b"]
    assert lst != [1, 2, 3] and lst != [2, 1] and lst != "12" and lst != {0: 1, 1: 2}
    assert lst != m and m != lst
    assert pool.freeze([]) != pool.freeze({})


# ================================================================= rare_set

SCALAR_DATA = {"none": None, "t": True, "f": False, "i": 7, "neg": -(2**63), "max": 2**63 - 1,
               "x": 2.5, "s": "text", "y": b"by", "big": 2**64, "l": [1, None, 2.5, "s"],
               "m": {"q": 1}}
IN_PLACE_NEW = [None, True, False, 0, -1, 2**63 - 1, -(2**63), 3.25, -0.0, float("inf")]
IN_PLACE_OLD = ["none", "t", "f", "i", "neg", "max", "x"]


def _frozen_in_state(pool_factory, mode, state, data=SCALAR_DATA):
    """A pool of mode with data frozen, moved to state: "writable" (as
    frozen), "protected" (after protect()) or "ro" (after protect and
    make_ro())."""
    pool = pool_factory(mode, name=unique("rareset"), refill=4096)
    m = pool.freeze(data)
    if state in ("protected", "ro"):
        pool.protect()
    if state == "ro":
        pool.make_ro()
    return pool, m


STATES = ["writable", "protected", "ro"]


def _expect_allowed(mode, state):
    return mode.has_write_rare and state != "ro"


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("mode", WR_MODES + RO_MODES, ids=str)
def test_rare_set_matrix_in_place_kinds(pool_factory, mode, state):
    pool, m = _frozen_in_state(pool_factory, mode, state)
    expected = plain(SCALAR_DATA)
    allowed = _expect_allowed(mode, state)
    for i, key in enumerate(IN_PLACE_OLD):
        new = IN_PLACE_NEW[(i * 3 + 1) % len(IN_PLACE_NEW)]
        if allowed:
            assert m.rare_set(key, new) is None
            expected[key] = new
        else:
            with pytest.raises(ProtectionError):
                m.rare_set(key, new)
        assert_scalar(m[key], expected[key], key)
    # a list element, through a nested handle
    lst = m["l"]
    if allowed:
        lst.rare_set(1, 42)
        lst.rare_set(-2, None)
        expected["l"][1] = 42
        expected["l"][-2] = None
    else:
        with pytest.raises(ProtectionError):
            lst.rare_set(1, 42)
    nested = m["m"]
    if allowed:
        nested.rare_set("q", 2.0)
        expected["m"]["q"] = 2.0
    else:
        with pytest.raises(ProtectionError):
            nested.rare_set("q", 2.0)
    # every handle, old or new, sees the current bytes
    assert_same(m.thaw(), expected)
    assert_same(lst.thaw(), expected["l"])
    assert_scalar(m["m"]["q"], expected["m"]["q"])


@pytest.mark.parametrize("state", ["writable", "protected"])
@pytest.mark.parametrize("mode", WR_MODES, ids=str)
@pytest.mark.parametrize("old", IN_PLACE_OLD)
def test_rare_set_every_in_place_transition(pool_factory, mode, state, old):
    pool, m = _frozen_in_state(pool_factory, mode, state)
    for new in IN_PLACE_NEW + [float("nan")]:
        m.rare_set(old, new)
        got = m[old]
        if isinstance(new, float) and math.isnan(new):
            assert isinstance(got, float) and math.isnan(got)
        else:
            assert_scalar(got, new, f"{old} := {new!r}")
    others = {k: v for k, v in plain(SCALAR_DATA).items() if k != old}
    assert all(m[k] == v for k, v in others.items())


@pytest.mark.parametrize("state", ["writable", "protected"])
@pytest.mark.parametrize("mode", WR_MODES, ids=str)
def test_rare_set_kinds_that_cannot_change_in_place(pool_factory, mode, state):
    pool, m = _frozen_in_state(pool_factory, mode, state)
    cases = [(k, 1) for k in ("s", "y", "big", "l", "m")]          # old value not in place
    cases += [("i", new) for new in ("str", b"b", 2**63, -(2**63) - 1, 2**100, [1], (1,), {"a": 1})]
    cases += [("none", "x"), ("x", b""), ("t", [])]
    for key, new in cases:
        with pytest.raises(TypeError) as info:
            m.rare_set(key, new)
        assert "replace_pool" in str(info.value), (key, new, str(info.value))
    for key, new in (("i", {1}), ("i", object()), ("none", 1j)):
        with pytest.raises(TypeError):
            m.rare_set(key, new)
    lst = m["l"]
    with pytest.raises(TypeError) as info:
        lst.rare_set(3, 1)            # "s"
    assert "replace_pool" in str(info.value)
    with pytest.raises(TypeError) as info:
        lst.rare_set(0, "one")
    assert "replace_pool" in str(info.value)
    assert_same(m.thaw(), plain(SCALAR_DATA))


@pytest.mark.parametrize("state", ["writable", "protected"])
def test_rare_set_missing_key_and_index(pool_factory, state):
    pool, m = _frozen_in_state(pool_factory, Mode.WR, state)
    for key in ("missing", b"none", 12, None, 1.5):
        with pytest.raises(KeyError):
            m.rare_set(key, 1)
    with pytest.raises(TypeError):
        m.rare_set([], 1)
    lst = m["l"]
    for index in (4, 5, -5, 2**70, -(2**70)):
        with pytest.raises(IndexError):
            lst.rare_set(index, 1)
    assert_same(m.thaw(), plain(SCALAR_DATA))


def test_rare_set_finds_keys_as_lookups_do(pool_factory):
    pool, m = _frozen_in_state(pool_factory, Mode.WR, "protected",
                               data={1: 0, 2**61: None, "k": 0.5, "l": [1, 2]})
    m.rare_set(True, 10)                 # True == 1, as for m[True]
    m.rare_set(float(2**61), 11)
    m["l"].rare_set(True, 12)            # a bool index is an int index
    assert_same(m.thaw(), {1: 10, 2**61: 11, "k": 0.5, "l": [1, 12]})


@pytest.mark.parametrize("options", [{"seal": True}, {"secret": True},
                                     {"secret": True, "seal": True}], ids=str)
@pytest.mark.parametrize("mode", [Mode.RO, Mode.WR, Mode.START_WR], ids=str)
def test_frozen_in_sealed_and_secret_pools(pool_factory, mode, options):
    if options.get("secret") and "memfd_secret" not in prmem.features:
        pytest.skip("kernel lacks memfd_secret")
    pool = pool_factory(mode, name=unique("opts"), **options)
    data = {"a": 1, "l": [1.5, "x" * 40], "b": b"y" * 100}
    m = pool.freeze(data)
    pool.protect()
    assert m == data
    if mode.has_write_rare:
        m.rare_set("a", 2)
        m["l"].rare_set(0, None)
        assert perms_at(m.address) == "r--s"
        pool.make_ro()
        assert_same(m.thaw(), {"a": 2, "l": [None, "x" * 40], "b": b"y" * 100})
    with pytest.raises(ProtectionError):
        m.rare_set("a", 3)


def test_rare_set_on_read_only_modes_refused_before_protect(pool_factory):
    for mode in RO_MODES:
        pool = pool_factory(mode, name=unique())
        m = pool.freeze({"i": 1, "l": [0]})
        assert perms_at(m.address) == "rw-s"           # still writable memory
        with pytest.raises(ProtectionError):
            m.rare_set("i", 2)
        with pytest.raises(ProtectionError):
            m["l"].rare_set(0, 2)
        assert m == {"i": 1, "l": [0]}


@pytest.mark.parametrize("mode", WR_MODES, ids=str)
def test_rare_set_keeps_the_mapping_read_only(pool_factory, mode):
    name = unique("rs-maps")
    pool = pool_factory(mode, name=name, refill=4096)
    m = pool.freeze({"quota": 10, "on": False, "nested": {"limits": [1, 2, 3]}})
    if mode is Mode.AUTO_WR:
        pool.alloc(2 * PAGE)  # opens a new area: the frozen one becomes WRITE_RARE
    else:
        pool.protect()
    assert perms_at(m.address) == "r--s"
    m.rare_set("quota", 11)
    m.rare_set("on", True)
    m["nested"]["limits"].rare_set(2, 30)
    assert perms_at(m.address) == "r--s"
    assert perms_at(m.address + m.nbytes - 1) == "r--s"
    if mode is not Mode.AUTO_WR:
        assert all("w" not in perms for _, _, perms in maps_entries(name))
    assert m == {"quota": 11, "on": True, "nested": {"limits": [1, 2, 30]}}


def test_rare_set_mapping_never_writable_while_it_runs(pool_factory):
    name = unique("rs-watch")
    pool = pool_factory(Mode.WR, name=name, refill=4096)
    m = pool.freeze({"n": 0, "l": list(range(100))})
    pool.protect()
    stop = threading.Event()
    errors = []
    count = [0]

    def writer():
        try:
            lst = m["l"]
            while not stop.is_set():
                count[0] += 1
                m.rare_set("n", count[0])
                lst.rare_set(count[0] % 100, -count[0])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    seen = set()
    try:
        for _ in range(100):
            for start, end, perms in maps_entries(name):
                if start <= m.address < end:
                    seen.add(perms)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert count[0] > 0
    assert seen == {"r--s"}, seen
    assert m["n"] == count[0]


def test_rare_set_values_read_before_stay(pool_factory):
    pool, m = _frozen_in_state(pool_factory, Mode.WR, "protected")
    before = m["i"]
    thawed = m.thaw()
    m.rare_set("i", 99)
    assert before == 7 and thawed["i"] == 7 and m["i"] == 99


def test_rare_set_is_visible_through_every_handle(pool_factory):
    pool = pool_factory(Mode.START_WR, name=unique())
    m = pool.freeze(POLICY)
    assert perms_at(m.address) == "r--s"  # write-rare from the start
    alice_a, alice_b = m["alice"], m["alice"]
    alice_a.rare_set("quota", 11)
    assert alice_b["quota"] == 11 and m["alice"]["quota"] == 11
    assert m.thaw()["alice"]["quota"] == 11


# ============================================================ extent & memory


def test_address_and_nbytes_cover_the_whole_structure(pool_factory):
    name = unique("extent")
    pool = pool_factory(Mode.RO, name=name)
    m = pool.freeze(POLICY)
    lst = pool.freeze([1, [2, [3]]])
    handles = [m, m["alice"], m["bob"]["nets"], m["alice"]["nets"]]
    for h in handles:
        assert h.address == m.address and h.nbytes == m.nbytes, h
    assert lst[1].address == lst.address == lst[1][1].address
    assert lst[1].nbytes == lst.nbytes
    assert m.nbytes > 0 and lst.nbytes > 0
    # disjoint, and inside the pool's own memory
    a0, a1 = sorted([(m.address, m.nbytes), (lst.address, lst.nbytes)])
    assert a0[0] + a0[1] <= a1[0]
    mapped = [(s, e) for s, e, perms in maps_entries(name) if perms == "rw-s"]
    for address, size in (a0, a1):
        assert any(s <= address and address + size <= e for s, e in mapped)
    snapshot = ctypes.string_at(m.address, m.nbytes)
    pool.protect()
    assert perms_at(m.address) == perms_at(m.address + m.nbytes - 1) == "r--s"
    assert ctypes.string_at(m.address, m.nbytes) == snapshot
    assert m.nbytes >= len(b"192.168.0.0/16") + len(b"10.0.0.0/8")


def test_handles_do_not_block_protect_or_make_ro(pool_factory):
    pool = pool_factory(Mode.WR, name=unique())
    m = pool.freeze(POLICY)
    nested = m["bob"]
    pool.protect()
    pool.make_ro()
    assert perms_at(m.address) == "r--s"
    assert nested["nets"][1] == "10.1.0.0/16"
    with pytest.raises(ProtectionError):
        nested.rare_set("quota", 3)


# ================================================================ lifetime


def test_handles_keep_their_pool_alive():
    name = unique("alive")
    pool = prmem.Pool(Mode.RO, name=name)
    ref = weakref.ref(pool)
    m = pool.freeze(POLICY)
    nested = m["bob"]["nets"]
    pool.protect()
    del pool
    gc.collect()
    assert ref() is not None
    assert m == POLICY
    del m
    gc.collect()
    assert ref() is not None
    assert nested == POLICY["bob"]["nets"]
    del nested
    gc.collect()
    assert ref() is None
    assert maps_entries(name) == []       # its memory went back


def test_destroy_with_live_handles_raises_buffer_error(pool_factory):
    pool = pool_factory(Mode.RO, name=unique())
    m = pool.freeze(POLICY)
    pool.protect()
    with pytest.raises(BufferError):
        pool.destroy()
    assert not pool.destroyed
    assert m == POLICY                       # intact and readable
    nested = m["alice"]["nets"]
    del m
    with pytest.raises(BufferError):
        pool.destroy()                       # the nested handle still pins it
    assert not pool.destroyed
    assert nested == ["10.0.0.0/8"]
    del nested
    pool.destroy()
    assert pool.destroyed


def test_handles_in_slices_and_items_pin_the_pool(pool_factory):
    pool = pool_factory(Mode.RO, name=unique())
    m = pool.freeze({"l": [[1], {"a": 2}], "x": 1})
    from_slice = m["l"][:]
    from_items = list(m.items())
    from_values = list(m.values())
    del m
    with pytest.raises(BufferError):
        pool.destroy()
    assert from_slice[0] == [1] and from_slice[1] == {"a": 2}
    del from_slice
    with pytest.raises(BufferError):
        pool.destroy()
    assert from_items[0][1] == [[1], {"a": 2}]
    del from_items
    with pytest.raises(BufferError):
        pool.destroy()
    assert from_values[0][1] == {"a": 2}
    del from_values
    pool.destroy()


def test_with_block_exit_with_a_live_handle():
    with pytest.raises(BufferError):
        with prmem.Pool(Mode.RO, name=unique()) as pool:
            m = pool.freeze({"a": [1]})
            pool.protect()
    assert m["a"] == [1]
    del m
    pool.destroy()
    assert pool.destroyed


def test_destroy_after_handles_are_gone_without_gc(pool_factory):
    pool = pool_factory(Mode.WR, name=unique())
    m = pool.freeze(POLICY)
    m["alice"]["nets"][0]
    list(m.items())
    m.thaw()
    m.rare_set  # a bound method also holds the handle
    pool.protect()
    del m
    pool.destroy()                 # plain reference counting is enough


def test_iterators_outliving_the_handle(pool_factory):
    # An iterator refers to the structure too: destroy() must refuse while
    # it lives, or the iterator must fail cleanly afterwards.  Either way no
    # crash (run in a child to see one).
    proc = run_child("""
        pool = Pool(Mode.RO, name="iters")
        m = pool.freeze({"a": 1, "b": [1, 2], "c": 3})
        its = [iter(m), iter(m.keys()), iter(m.values()), iter(m.items()), iter(m["b"])]
        next(its[0])
        del m
        try:
            pool.destroy()
            destroyed = True
        except BufferError:
            destroyed = False
        for it in its:
            if destroyed:
                try:
                    list(it)        # may fail, must not crash
                except Exception:
                    pass
            else:
                list(it)            # the pool is still there: works
        print("OK", destroyed)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK")


def test_handle_types_cannot_be_built_into_a_crash():
    proc = run_child("""
        import copy, pickle
        pool = Pool(Mode.RO, name="construct")
        m = pool.freeze({"a": [1, 2]})
        lst = m["a"]
        for cls in (prmem.FrozenMap, prmem.FrozenList):
            for make in (lambda: cls(), lambda: cls({"a": 1}), lambda: cls([1]),
                         lambda: cls.__new__(cls)):
                try:
                    obj = make()
                except Exception:
                    continue
                for op in (len, list, repr, lambda o: o.thaw(), lambda o: o.address,
                           lambda o: o.nbytes, lambda o: o[0], lambda o: o == {}):
                    try:
                        op(obj)
                    except Exception:
                        pass
        for h in (m, lst):
            for op in (copy.copy, copy.deepcopy, pickle.dumps):
                try:
                    result = op(h)
                except Exception:
                    continue
                if op is not pickle.dumps:
                    assert result == h, (op, result)
        print("OK")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK"


# =========================================== native writes fault, with report


@pytest.mark.parametrize("mode, state", [("RO", "READ_ONLY"), ("WR", "WRITE_RARE")])
def test_native_write_into_frozen_map_faults_with_report(mode, state):
    proc = run_child(f"""
        pool = Pool(Mode.{mode}, name="frozen-policy")
        table = pool.freeze({{"alice": {{"role": "admin", "quota": 10, "nets": ["10.0.0.0/8"]}}}})
        pool.protect()
        target = table.address + table.nbytes // 2
        print(hex(target), table["alice"]["role"], flush=True)
        ctypes.memmove(target, b"e", 1)  # one byte: any memmove faults on it
        print("SURVIVED", flush=True)
    """)
    assert proc.returncode == -signal.SIGSEGV, (proc.stdout, proc.stderr)
    address, role = proc.stdout.split()[:2]
    assert role == "admin"
    assert "SURVIVED" not in proc.stdout
    err = proc.stderr
    assert "prmem: fatal write to protected memory" in err
    assert "pool: 'frozen-policy'" in err
    assert f"mode: {mode}  area state: {state}" in err
    assert f"address: {address}" in err


@pytest.mark.prmem_pool(Mode.AUTO_RO, refill=4096)
def test_native_write_into_nested_frozen_list_faults(prmem_pool):
    table = prmem_pool.freeze([[1, 2, 3], {"k": "v" * 100}])
    prmem_pool.protect()
    inner = table[1]
    assert inner.address == table.address
    # native writes anywhere in the structure die, through a nested handle too
    assert_protected(inner)
    assert table == [[1, 2, 3], {"k": "v" * 100}]


def test_native_write_into_nested_frozen_list_reports_the_pool():
    # the fault report names the pool for a write through a nested handle
    proc = run_child("""
        pool = Pool(Mode.AUTO_RO, name="frozen-auto", refill=4096)
        table = pool.freeze([[1, 2, 3], {"k": "v" * 100}])
        pool.protect()
        inner = table[1]
        assert inner.address == table.address
        ctypes.memmove(inner.address, b"\\0" * 8, 8)
        print("SURVIVED")
    """)
    assert proc.returncode == -signal.SIGSEGV
    assert "pool: 'frozen-auto'" in proc.stderr


# ============================================================= cross-process


def test_forked_child_reads_the_sealed_structure():
    proc = run_child("""
        import traceback
        DATA = {"alice": {"role": "admin", "quota": 10, "nets": ["10.0.0.0/8"]},
                "bob": {"role": "user", "quota": 2**70, "ratio": -0.5, "key": b"\\xff\\x00"},
                7: [None, True, "é漢字", (1, 2)], b"raw": {}}
        PLAIN = {"alice": {"role": "admin", "quota": 10, "nets": ["10.0.0.0/8"]},
                 "bob": {"role": "user", "quota": 2**70, "ratio": -0.5, "key": b"\\xff\\x00"},
                 7: [None, True, "é漢字", [1, 2]], b"raw": {}}
        pool = Pool(Mode.RO, name="shared-frozen")
        m = pool.freeze(DATA)
        pool.protect()
        def inode(address):
            with open("/proc/self/maps") as f:
                for line in f:
                    fields = line.split()
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    if start <= address < end:
                        return fields[4]
        parent_inode = inode(m.address)
        pid = os.fork()
        if pid == 0:
            try:
                assert m == DATA
                assert m.thaw() == PLAIN
                assert m["alice"]["nets"][0] == "10.0.0.0/8"
                assert m[7][2] == "é漢字" and m[b"raw"] == {}
                assert list(m) == ["alice", "bob", 7, b"raw"]
                assert "carol" not in m and m.get(8) is None
                assert perms_at(m.address) == "r--s"
                assert inode(m.address) == parent_inode      # shared, not copied
                try:
                    m["alice"].rare_set("quota", 1)
                    raise AssertionError("rare_set allowed")
                except prmem.ProtectionError:
                    pass
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        assert m == DATA
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["child", "0"], proc.stderr


def test_forked_child_rare_set_stays_in_the_child():
    proc = run_child("""
        pool = Pool(Mode.WR, name="fork-rare")
        m = pool.freeze({"quota": 10, "l": [1.5]})
        pool.protect()
        pid = os.fork()
        if pid == 0:
            m.rare_set("quota", 99)
            m["l"].rare_set(0, None)
            os._exit(0 if m == {"quota": 99, "l": [None]} else 1)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), m["quota"], m["l"][0])
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "10", "1.5"]


# Data whose hash-table layout would differ between processes if it
# depended on Python's (randomised) str/bytes hashes.
PORTABLE_DATA_SRC = """
DATA = {("user-%d" % i): {"id": i, "tags": ["t%d" % (i % 7)], b"raw-%d" % i: i * 1.5}
        for i in range(300)}
DATA.update({i * 1000003: str(i) for i in range(-50, 50)})
DATA["nested"] = [{"k%d" % j: [j, None, True]} for j in range(20)]
"""


def _interpreter(code, hashseed):
    env = dict(os.environ, PYTHONHASHSEED=str(hashseed))
    return subprocess.run([sys.executable, "-c", CHILD_PRELUDE + PORTABLE_DATA_SRC
                           + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=60, env=env)


def test_layout_reads_correctly_in_another_process(tmp_path):
    """The bytes frozen in one process (one str hash seed, one address)
    read correctly when put under a handle in another process (another seed,
    another address): no pointers, no per-process hash."""
    payload_file = tmp_path / "frozen.bin"
    first = _interpreter(f"""
        pool = Pool(Mode.RO, name="origin")
        m = pool.freeze(DATA)
        pool.protect()
        with open({str(payload_file)!r}, "wb") as f:
            f.write(ctypes.string_at(m.address, m.nbytes))
        print(hex(m.address))
    """, hashseed=1)
    assert first.returncode == 0, first.stderr
    second = _interpreter(f"""
        with open({str(payload_file)!r}, "rb") as f:
            payload = f.read()
        pool = Pool(Mode.RO, name="elsewhere")
        pool.alloc(24)                 # another offset than in the first process
        m = pool.freeze(DATA)          # same content, this process's layout
        assert m.nbytes == len(payload), (m.nbytes, len(payload))
        ctypes.memmove(m.address, payload, len(payload))
        pool.protect()
        assert m == DATA
        for k, v in DATA.items():
            assert m[k] == v, k
        assert "user-300" not in m and b"raw-1" not in m and 1000003 * 51 not in m
        assert list(m) == list(DATA)
        print(hex(m.address))
    """, hashseed=2)
    assert second.returncode == 0, second.stderr
    assert first.stdout != second.stdout   # really another address


# ================================================================== arrays

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is optional
    np = None
needs_numpy = pytest.mark.skipif(np is None, reason="numpy is not installed")


@needs_numpy
@pytest.mark.parametrize("data, dtype, want_dtype", [
    ([[1, 2, 3], [4, 5, 6]], None, None),
    ([1.5, -2.0, float("inf")], None, None),
    ([1, 2, 3], "f4", "f4"),
    ([True, False], None, None),
    ("arange", None, None),
    ("noncontiguous", None, None),
    ("fortran", None, None),
    ("structured", None, None),
])
def test_array_copies_content_dtype_and_shape(prmem_pool, data, dtype, want_dtype):
    if data == "arange":
        data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    elif data == "noncontiguous":
        data = np.arange(40.0).reshape(8, 5)[::2, 1::2]
    elif data == "fortran":
        data = np.asfortranarray(np.arange(12).reshape(3, 4))
    elif data == "structured":
        data = np.array([(1, 2.5), (3, -1.0)], dtype=[("a", "i4"), ("b", "f8")])
    expected = np.asarray(data, dtype=dtype)
    arr = prmem_pool.array(data, dtype=dtype)
    assert isinstance(arr, np.ndarray)
    assert arr.dtype == (np.dtype(want_dtype) if want_dtype else expected.dtype)
    assert arr.shape == expected.shape
    assert arr.flags.writeable is False
    assert np.array_equal(arr, expected)
    address = arr.__array_interface__["data"][0]
    assert perms_at(address) == "rw-s"          # in the pool's memory
    prmem_pool.protect()
    assert perms_at(address) == "r--s"
    assert np.array_equal(arr, expected)


@needs_numpy
def test_array_from_shape_and_fill(prmem_pool):
    zeros = prmem_pool.array(shape=(3, 4), dtype="f8", fill=0)
    sevens = prmem_pool.array(shape=(2, 5), dtype="i2", fill=7)
    halves = prmem_pool.array(shape=(4,), dtype=np.float32, fill=0.5)
    prmem_pool.protect()
    assert zeros.shape == (3, 4) and zeros.dtype == np.float64 and not zeros.any()
    assert sevens.shape == (2, 5) and sevens.dtype == np.int16 and (sevens == 7).all()
    assert halves.dtype == np.float32 and (halves == 0.5).all()
    for a in (zeros, sevens, halves):
        assert a.flags.writeable is False


@needs_numpy
def test_array_is_read_only_to_numpy(prmem_pool):
    arr = prmem_pool.array(np.arange(6))
    with pytest.raises(ValueError):
        arr[0] = 5
    with pytest.raises(ValueError):
        arr += 1
    prmem_pool.protect()
    with pytest.raises(ValueError):
        np.copyto(arr, 0)
    assert list(arr) == list(range(6))


@needs_numpy
def test_array_does_not_block_protect_but_blocks_destroy(prmem_pool):
    arr = prmem_pool.array(np.arange(10.0))
    prmem_pool.protect()                    # no BufferError
    view = arr[2:5]
    transposed = prmem_pool.array(np.ones((2, 3))).T
    del arr
    with pytest.raises(BufferError):
        prmem_pool.destroy()                # a view of it still pins the pool
    assert list(view) == [2.0, 3.0, 4.0]
    del view
    with pytest.raises(BufferError):
        prmem_pool.destroy()
    del transposed
    prmem_pool.destroy()
    assert prmem_pool.destroyed


@needs_numpy
def test_array_cannot_be_made_writeable(prmem_pool):
    # numpy would otherwise write into pool memory behind prmem's back
    arr = prmem_pool.array(np.arange(6))
    with pytest.raises(ValueError):
        arr.flags.writeable = True
    assert arr.flags.writeable is False


@needs_numpy
@pytest.mark.parametrize("mode", [Mode.RO, Mode.WR])
def test_native_write_into_protected_array_faults(prmem_protected, mode):
    arr = prmem_protected(np.arange(1000, dtype=np.int64), mode=mode)
    address = arr.__array_interface__["data"][0]
    assert perms_at(address) == perms_at(address + arr.nbytes - 1) == "r--s"
    if mode is Mode.RO:
        assert_protected(arr)
        assert_protected(arr[500:501])
    else:
        assert_write_rare(arr)          # rare_write() still changes it
    assert (arr == np.arange(1000)).all()
    del arr


@needs_numpy
@pytest.mark.parametrize("mode", ["RO", "WR"])
def test_native_write_into_protected_array_reports_the_pool(mode):
    # the write dies, the value is unchanged up to it, and the report names
    # the pool
    proc = run_child(f"""
        import numpy as np
        pool = Pool(Mode.{mode}, name="frozen-array")
        arr = pool.array(np.arange(1000, dtype=np.int64))
        pool.protect()
        address = arr.__array_interface__["data"][0] + 8 * 500
        print(int(arr[500]), flush=True)
        ctypes.memmove(address, b"\\xff" * 8, 8)
        print("SURVIVED", int(arr[500]), flush=True)
    """)
    assert proc.returncode == -signal.SIGSEGV, (proc.stdout, proc.stderr)
    assert proc.stdout.split() == ["500"]
    assert "pool: 'frozen-array'" in proc.stderr


# ============================================ replace_pool that returns build()
# The spec asks for "a variant of replace_pool that also returns what
# build(pool) returned"; it is called replace_pool_with.


def test_replace_pool_with_returns_the_new_table():
    old = prmem.Pool(Mode.RO, name=unique("v1"))
    table = old.freeze({"version": 1})
    old.protect()
    ref = prmem.ProtectedRef(old)
    del table
    new, table = prmem.replace_pool_with(ref, lambda p: p.freeze({"version": 2, "l": [1]}),
                                         name=unique("v2"))
    assert ref.get() is table                      # the reference names the new table
    assert table.pool is new
    assert old.destroyed
    assert type(table) is FrozenMap and table == {"version": 2, "l": [1]}
    assert perms_at(table.address) == "r--s"        # protected before the swap
    with pytest.raises(BufferError):
        new.destroy()                                # the returned table pins it
    del table
    ref.set(None)                                    # and so did the reference
    new.destroy()


def test_replace_pool_with_write_rare_table():
    ref = prmem.ProtectedRef(None)
    new, table = prmem.replace_pool_with(ref, lambda p: p.freeze({"limit": 5}), mode=Mode.WR,
                                         name=unique("wr"))
    table.rare_set("limit", 6)
    assert table["limit"] == 6 and perms_at(table.address) == "r--s"
    del table
    ref.set(None)                                   # the reference pinned it too
    new.destroy()


def test_replace_pool_with_failed_build_keeps_the_old_version():
    old = prmem.Pool(Mode.RO, name=unique("v1"))
    table = old.freeze({"version": 1})
    old.protect()
    ref = prmem.ProtectedRef(old)

    def build(pool):
        pool.freeze({"version": 2})
        pool.freeze({"bad": {1, 2}})

    with pytest.raises(TypeError):
        prmem.replace_pool_with(ref, build, name=unique("v2"))
    assert ref.get() is old and not old.destroyed
    assert table == {"version": 1}
    del table
    old.destroy()
