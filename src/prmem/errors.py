"""Exceptions raised by prmem.

They are created by the C core (so it can raise them on its hot paths) and
re-exported here.  Each also inherits the builtin a caller would naturally
catch:

- ``PrmemError``: base of everything below.
- ``ProtectionError(PrmemError, PermissionError)``: a write was refused
  because the memory is not writable that way (a plain write to WRITE_RARE
  memory, any write to READ_ONLY memory, an allocation from a closed
  after-init section).  Nothing was changed.
- ``PoolDestroyedError(PrmemError, ValueError)``: the pool was destroyed.
- ``UnsupportedError(PrmemError, OSError)``: the kernel lacks a feature the
  request needs.
- ``CorruptionError(PrmemError, ValueError)``: a structure read from pool
  memory (a frozen container) is inconsistent; nothing outside it was read.

Misuse that is not about protection raises the plain builtin: ``ValueError``
for bad sizes or out-of-bounds writes, ``TypeError`` for wrong types,
``MemoryError`` when no address space can hold a request, ``BufferError``
when live buffer views block protect()/destroy().
"""
from __future__ import annotations

from ._core import (
    CorruptionError,
    PoolDestroyedError,
    PrmemError,
    ProtectionError,
    UnsupportedError,
)

__all__ = ["PrmemError", "ProtectionError", "PoolDestroyedError", "UnsupportedError",
           "CorruptionError"]
