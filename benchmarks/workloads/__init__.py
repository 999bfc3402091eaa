"""The workloads, one module each.

A workload module defines:

``NAME``
    what ``--only`` selects it by;
``TITLE``
    a one-line heading;
``run(ctx) -> dict``
    measures and returns a JSON-able result with at least ``rows`` (list of
    dicts), ``targets`` (list of ratio dicts: name, value, target, met,
    description) and ``notes`` (list of str);
``markdown(result) -> str``
    the section of latest.md;
``summary(result) -> list``
    rows ``[label, value]`` for the short stdout table;
``plot(result, out_dir, plt) -> list``
    paths of the PNG files written (only called when matplotlib exists).

To add a workload, write such a module and list it in ``WORKLOADS``.
"""
from __future__ import annotations

from types import ModuleType
from typing import Dict

from . import access, alloc, frozen, lifecycle, overhead, protect, rare_write, read, share

#: name -> module, in the order they run.
WORKLOADS: Dict[str, ModuleType] = {
    mod.NAME: mod for mod in (alloc, rare_write, protect, read, overhead, frozen, share,
                              lifecycle, access)}
