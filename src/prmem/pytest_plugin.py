"""pytest fixtures for code that keeps data in prmem pools.

Installing prmem registers this module with pytest (entry point
``pytest11``, named ``prmem.pytest_plugin`` like the module, so a
``pytest_plugins = ["prmem.pytest_plugin"]`` or ``-p prmem.pytest_plugin``
on top of it is harmless; ``-p no:prmem.pytest_plugin`` turns it off).

- ``prmem_pool``: a fresh :class:`prmem.Pool` named after the test,
  destroyed at teardown.  Keyword arguments for ``Pool()`` come from a
  ``@pytest.mark.prmem_pool(mode=prmem.Mode.WR, ...)`` marker, or from
  indirect parametrization with a dict.
- ``prmem_protected``: a factory, ``prmem_protected(data, mode=Mode.RO,
  **pool_kwargs)``, that puts ``data`` in a new pool, protects the pool and
  returns the protected object (bytes-like data -> Allocation, Mapping ->
  FrozenMap, list or tuple -> FrozenList, numpy array -> read-only array);
  its pools are destroyed at teardown.

A pool that cannot be destroyed at teardown because a memoryview, numpy
array or frozen handle of it is still alive fails the test (an error in
teardown naming the pool), unless the test failed already.  Use
:func:`prmem.testing.assert_protected` to prove the objects are protected.
"""
from __future__ import annotations

import gc
import itertools
import re
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest

import prmem

_names = itertools.count()
_CALL_FAILED = pytest.StashKey[bool]()


def pytest_configure(config: Any) -> None:
    config.addinivalue_line(
        "markers", "prmem_pool(mode=..., **kwargs): arguments of prmem.Pool() for the "
        "prmem_pool fixture")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item: Any, call: Any) -> None:
    # remember whether the test itself failed: its traceback then keeps
    # views alive, and a leak report would only hide the real failure
    if call.when == "call":
        item.stash[_CALL_FAILED] = call.excinfo is not None


def _name(request: Any) -> str:
    return "%s-%d" % (re.sub(r"[^\w.-]+", "-", request.node.name)[:48], next(_names))


def _release(pools: List[prmem.Pool], request: Any) -> None:
    leaks = []
    for pool in pools:
        try:
            pool.destroy()
            continue
        except BufferError:
            gc.collect()  # views only reachable from reference cycles
        try:
            pool.destroy()
        except BufferError as e:
            pool._destroy_when_released()  # goes with its last view
            leaks.append(str(e))
    if leaks and request.node.stash.get(_CALL_FAILED, None) is False:
        pytest.fail("a view of a prmem pool leaked out of the test: "
                    + "; ".join(leaks), pytrace=False)


@pytest.fixture
def prmem_pool(request: Any) -> Iterator[prmem.Pool]:
    """A fresh prmem.Pool named after the test, destroyed at teardown; the
    test fails if a view of it is still alive then."""
    args: Tuple[Any, ...] = ()
    kwargs: Dict[str, Any] = {}
    marker = request.node.get_closest_marker("prmem_pool")
    if marker is not None:
        args, kwargs = marker.args, dict(marker.kwargs)
    kwargs.update(getattr(request, "param", None) or {})
    kwargs.setdefault("name", _name(request))
    pool = prmem.Pool(*args, **kwargs)
    yield pool
    _release([pool], request)


@pytest.fixture
def prmem_protected(request: Any) -> Iterator[Callable[..., Any]]:
    """``make(data, mode=Mode.RO, **pool_kwargs)``: ``data`` copied into a
    new pool that is then protected; returns the Allocation (bytes-like
    data), FrozenMap (Mapping), FrozenList (list, tuple) or read-only numpy
    array (numpy array).  Pools are destroyed at teardown (a leaked view
    fails the test)."""
    pools: List[prmem.Pool] = []

    def make(data: Any, mode: Any = prmem.Mode.RO, **pool_kwargs: Any) -> Any:
        pool_kwargs.setdefault("name", _name(request))
        pool = prmem.Pool(mode, **pool_kwargs)
        pools.append(pool)
        obj: Any
        if isinstance(data, (Mapping, list, tuple)):
            obj = pool.freeze(data)
        elif hasattr(data, "__array_interface__"):
            obj = pool.array(data)
        elif isinstance(data, str):
            raise TypeError("prmem_protected() takes bytes, not str: encode it first")
        else:
            raw = memoryview(data).cast("B").tobytes()
            if not raw:
                raise ValueError("prmem_protected(): empty data has no memory to protect")
            obj = pool._alloc_init(raw, 3)  # initialised as allocated (START_WR too)
        pool.protect()
        return obj

    yield make
    _release(pools, request)
