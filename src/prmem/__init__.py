"""prmem: protectable memory for Python on Linux.

Pools of page-backed memory that the MMU write-protects, after the Linux
kernel's pmalloc design: allocate and initialise, then ``protect()``; data in
write-rare pools can still be changed, but only through ``rare_write()``;
``make_ro()`` seals it read-only for good.  See README.md and docs/.
"""
from __future__ import annotations

import sys

if not sys.platform.startswith("linux"):  # pragma: no cover - Linux only
    raise ImportError(
        "prmem supports Linux only (memfd_create, file seals and mprotect are "
        "Linux kernel features); this platform is %r" % sys.platform
    )

from . import _core
from ._core import fault_report
from .errors import (
    CorruptionError,
    PoolDestroyedError,
    PrmemError,
    ProtectionError,
    UnsupportedError,
)
from .frozen import FrozenList, FrozenMap
from .sharing import recv, send
from .pool import (
    Allocation,
    Mode,
    Pool,
    PoolStats,
    ProtectedRef,
    RareWriteSession,
    State,
    mark_init_done,
    rare_memset,
    rare_write,
    replace_pool,
    replace_pool_with,
    ro_after_init,
    wr_after_init,
)

#: Kernel features detected when prmem was imported, e.g. ``"memfd"``,
#: ``"memfd_seal_future_write"``, ``"mseal"``, ``"memfd_secret"``, ``"pkeys"``.
features: frozenset[str] = frozenset(_core.probe_features())

#: False when PRMEM_ENFORCE=0 was set at import: pools then behave the same
#: through the API, but pages are never write-protected (for debugging).
enforced: bool = _core.enforced

#: The system page size in bytes (the granularity of every protection).
page_size: int = _core.page_size

__version__ = "0.1.0"

__all__ = [
    "Allocation",
    "CorruptionError",
    "FrozenList",
    "FrozenMap",
    "Mode",
    "Pool",
    "PoolStats",
    "PoolDestroyedError",
    "PrmemError",
    "ProtectedRef",
    "ProtectionError",
    "RareWriteSession",
    "State",
    "UnsupportedError",
    "enforced",
    "fault_report",
    "features",
    "mark_init_done",
    "page_size",
    "rare_memset",
    "rare_write",
    "recv",
    "replace_pool",
    "replace_pool_with",
    "ro_after_init",
    "send",
    "wr_after_init",
]
