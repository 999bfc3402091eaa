"""What ``mypy --strict`` must say about prmem's API: never run, only checked.

tests/test_typing.py runs mypy on this file and compares its output with
the comments: ``# N: Revealed type is "..."`` for each ``reveal_type()``,
``# E: message  [code]`` for each deliberate mistake (other notes, such as
the overload variants mypy lists, are not compared; "builtins." is left out
of revealed types, which mypy versions spell differently).  A line without such
a comment must type-check cleanly.  If the stubs (src/prmem/_core.pyi) or
the annotations in src/prmem drift from what prmem does, this file stops
matching.
"""
from __future__ import annotations

from typing import Optional

import prmem
from prmem import Mode, Pool, State

pool = Pool(Mode.WR, name="typing")
a = pool.alloc(16)
text = pool.strdup("hello")

# ------------------------------------------------------- what is inferred
reveal_type(a)  # N: Revealed type is "prmem._core.Allocation"
reveal_type(a.state)  # N: Revealed type is "prmem.pool.State"
reveal_type(a[0])  # N: Revealed type is "int"
reveal_type(a[0:4])  # N: Revealed type is "bytes"
reveal_type(a.tobytes())  # N: Revealed type is "bytes"
reveal_type(text.decode())  # N: Revealed type is "str"
reveal_type(a == b"x")  # N: Revealed type is "bool"
reveal_type(a.pool)  # N: Revealed type is "prmem.pool.Pool"
reveal_type(pool.mode)  # N: Revealed type is "prmem.pool.Mode"
reveal_type(pool.stats())  # N: Revealed type is "prmem.pool.PoolStats"
reveal_type(pool.stats().areas_by_state)  # N: Revealed type is "dict[prmem.pool.State, int]"
reveal_type(prmem.fault_report())  # N: Revealed type is "bool"
reveal_type(prmem.features)  # N: Revealed type is "frozenset[str]"
reveal_type(prmem.enforced)  # N: Revealed type is "bool"
reveal_type(prmem.page_size)  # N: Revealed type is "int"

table = pool.freeze({"alice": {"nets": ["10.0.0.0/8"]}})
reveal_type(table)  # N: Revealed type is "prmem.frozen.FrozenMap"
reveal_type(pool.freeze([1, 2]))  # N: Revealed type is "prmem.frozen.FrozenList"
reveal_type(pool.freeze((1, 2)))  # N: Revealed type is "prmem.frozen.FrozenList"
reveal_type(table["alice"])  # N: Revealed type is "Any"
reveal_type(list(table))  # N: Revealed type is "list[str | bytes | int]"
reveal_type(table.thaw())  # N: Revealed type is "dict[str | bytes | int, Any]"
nets = pool.freeze(["10.0.0.0/8"])
reveal_type(nets[0:1])  # N: Revealed type is "list[Any]"

ref = prmem.ProtectedRef(table)
reveal_type(ref)  # N: Revealed type is "prmem.pool.ProtectedRef[prmem.frozen.FrozenMap]"
reveal_type(ref.get())  # N: Revealed type is "prmem.frozen.FrozenMap"
current: prmem.ProtectedRef[Optional[prmem.FrozenMap]] = prmem.ProtectedRef()
reveal_type(current.get())  # N: Revealed type is "prmem.frozen.FrozenMap | None"
new_pool, built = prmem.replace_pool_with(current, lambda p: p.freeze({"v": 2}))
reveal_type(built)  # N: Revealed type is "prmem.frozen.FrozenMap"

# ------------------------------------------------------ what is correct
a[0] = 7
a[0:2] = b"ok"
a[0:2] = bytearray(b"ok")
a.write(memoryview(b"abc"), offset=2)
prmem.rare_write(a, b"\x01", 3)
with memoryview(a) as view:
    view.tobytes()
assert a.state is State.WRITABLE
assert "nets" in table["alice"]
current.set(None)
current.set(table)
with pool.rare_write_session() as session:
    session.write(a, b"x")

# ------------------------------------------------------- what is a mistake
pool.alloc(8).state == "READ_ONLY"  # E: Non-overlapping equality check (left operand type: "State", right operand type: "Literal['READ_ONLY']")  [comparison-overlap]
a[0] = b"x"  # E: No overload variant of "__setitem__" of "Allocation" matches argument types "int", "bytes"  [call-overload]
a[0:2] = "ok"  # E: No overload variant of "__setitem__" of "Allocation" matches argument types "slice[int, int, None]", "str"  [call-overload]
a["0"]  # E: No overload variant of "__getitem__" of "Allocation" matches argument type "str"  [call-overload]
a.write("text")  # E: Argument 1 to "write" of "Allocation" has incompatible type "str"; expected "Buffer"  [arg-type]
for byte in a:  # E: "Allocation" has no attribute "__iter__" (not iterable)  [attr-defined]
    pass
pool.alloc("16")  # E: Argument 1 to "alloc" of "Pool" has incompatible type "str"; expected "int"  [arg-type]
pool.freeze({1, 2})  # E: No overload variant of "freeze" of "Pool" matches argument type "set[int]"  [call-overload]
table["alice"] = {}  # E: Unsupported target for indexed assignment ("FrozenMap")  [index]
table[1.5]  # E: Invalid index type "float" for "FrozenMap"; expected type "str | bytes | int"  [index]
prmem.rare_write(table, b"x")  # E: Argument 1 has incompatible type "FrozenMap"; expected "Allocation"  [arg-type]
ref.set(None)  # E: Argument 1 to "set" of "ProtectedRef" has incompatible type "None"; expected "FrozenMap"  [arg-type]
current.get()["alice"]  # E: Value of type "FrozenMap | None" is not indexable  [index]
never_set: prmem.ProtectedRef[prmem.FrozenMap] = prmem.ProtectedRef()  # E: Incompatible types in assignment (expression has type "ProtectedRef[FrozenMap | None]", variable has type "ProtectedRef[FrozenMap]")  [assignment]
prmem.fault_report("on")  # E: Argument 1 to "fault_report" has incompatible type "str"; expected "bool | None"  [arg-type]
pool.stats().bytes_lost = 0  # E: Property "bytes_lost" defined in "PoolStats" is read-only  [misc]
