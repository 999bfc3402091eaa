"""Helpers shared by the frozen-container tests (issue 10).

``plain(obj)`` is what ``freeze(obj).thaw()`` must return: Mappings become
dicts (bool keys stored as the int), lists and tuples become lists.
``assert_same(actual, expected)`` compares exactly: the same types (a bool
is not an int, a tuple is not a list), the same key order, floats bit for bit
apart from NaN payloads (-0.0 is not 0.0 here).
"""
from __future__ import annotations

import math
from collections.abc import Mapping


def norm_key(key):
    """How a key is stored: bool keys as the int."""
    if isinstance(key, bool):
        return int(key)
    return key


def plain(obj):
    """The plain Python value freeze(obj).thaw() must give back."""
    if isinstance(obj, Mapping):
        return {norm_key(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(x) for x in obj]
    return obj


def same_scalar(actual, expected) -> bool:
    if type(actual) is not type(expected):
        return False
    if isinstance(expected, float):
        if math.isnan(expected):
            return math.isnan(actual)
        return actual == expected and math.copysign(1.0, actual) == math.copysign(1.0, expected)
    return actual == expected


def assert_scalar(actual, expected, path="value"):
    assert same_scalar(actual, expected), (
        f"{path}: got {actual!r} ({type(actual).__name__}), "
        f"expected {expected!r} ({type(expected).__name__})")


def assert_same(actual, expected, path="value"):
    """actual is exactly the plain value expected (see module docstring).
    Iterative, so it also works on structures nested thousands deep."""
    stack = [(actual, expected, path)]
    while stack:
        a, e, p = stack.pop()
        if isinstance(e, dict):
            assert type(a) is dict, f"{p}: {type(a).__name__} instead of dict"
            assert len(a) == len(e), f"{p}: {len(a)} keys instead of {len(e)}"
            for i, (ak, ek) in enumerate(zip(a, e)):
                assert_scalar(ak, ek, f"{p} key #{i}")
                stack.append((a[ak], e[ek], f"{p}[{ek!r}]"))
        elif isinstance(e, list):
            assert type(a) is list, f"{p}: {type(a).__name__} instead of list"
            assert len(a) == len(e), f"{p}: {len(a)} items instead of {len(e)}"
            for i, (x, y) in enumerate(zip(a, e)):
                stack.append((x, y, f"{p}[{i}]"))
        else:
            assert_scalar(a, e, p)


def has_nan(obj) -> bool:
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, float) and math.isnan(x):
            return True
        if isinstance(x, Mapping):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return False
