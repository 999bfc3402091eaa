"""``prmem inspect PID``: list a running process's prmem memory and how it is
protected, from ``/proc/PID/smaps``.

prmem names its memory files ``prmem:<pool>``, so each mapping shows up as
``/memfd:prmem:<pool> (deleted)``.  The kernel's ``VmFlags`` tell apart what
the permissions alone cannot: a read-only mapping that may become writable
again (``mw``: write-rare memory, or READ_ONLY not yet sealed) from a sealed
one, and show ``mseal()`` (``sl``), locking (``lo``) and ``MADV_DONTDUMP``
(``dd``).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Dict, Iterator, List

_MEMFD_PREFIX = "/memfd:prmem:"
_SECRET = "/secretmem"


@dataclasses.dataclass
class Mapping:
    """One prmem mapping of the inspected process."""

    pool: str
    start: int
    end: int
    perms: str
    vmflags: List[str]

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def protection(self) -> str:
        """What the kernel enforces on this mapping, in prmem's terms."""
        if self.perms.startswith("rw"):
            return "WRITABLE"
        if self.perms.startswith("r"):
            # mseal()ed ("sl") memory cannot be made writable whatever "mw" says
            if "mw" in self.vmflags and "sl" not in self.vmflags:
                return "read-only, not sealed (WRITE_RARE, or READ_ONLY until protect())"
            return "READ_ONLY, sealed"
        return "reserved (no access)"

    @property
    def flags(self) -> List[str]:
        names = {"sl": "mseal", "lo": "locked", "dd": "dontdump"}
        return [names[f] for f in self.vmflags if f in names]


def _smaps(pid: int) -> Iterator[tuple]:
    header = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):
                header = line
            elif first == "VmFlags:" and header is not None:
                yield header, line.split()[1:]
                header = None


def mappings(pid: int) -> List[Mapping]:
    """prmem mappings of process ``pid`` (needs permission to read its smaps)."""
    found = []
    for header, vmflags in _smaps(pid):
        fields = header.split(maxsplit=5)
        path = fields[5].strip() if len(fields) > 5 else ""
        if path.startswith(_MEMFD_PREFIX):
            pool = path[len(_MEMFD_PREFIX):]
            if pool.endswith(" (deleted)"):
                pool = pool[: -len(" (deleted)")]
        elif path.startswith(_SECRET):
            pool = "(secret pool)"  # memfd_secret files carry no name
        else:
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        found.append(Mapping(pool, start, end, fields[1], vmflags))
    return found


def report(pid: int, as_json: bool = False) -> str:
    """The text (or JSON) that ``prmem inspect`` prints."""
    maps = mappings(pid)
    if as_json:
        return json.dumps([
            {"pool": m.pool, "start": hex(m.start), "end": hex(m.end), "size": m.size,
             "perms": m.perms, "protection": m.protection, "flags": m.flags}
            for m in maps
        ], indent=2)
    if not maps:
        return f"process {pid}: no prmem memory"
    lines = [f"process {pid}: {len(maps)} prmem mappings",
             f"{'pool':<20} {'range':<29} {'size':>10}  {'perms':<5} protection"]
    totals: Dict[str, Dict[str, int]] = {}
    for m in maps:
        flags = f" [{', '.join(m.flags)}]" if m.flags else ""
        lines.append(f"{m.pool:<20} {m.start:012x}-{m.end:012x}  {m.size:>10}  "
                     f"{m.perms:<5} {m.protection}{flags}")
        if not m.perms.startswith("-"):
            per_pool = totals.setdefault(m.pool, {})
            key = m.protection.split(",")[0]
            per_pool[key] = per_pool.get(key, 0) + m.size
    lines.append("")
    for pool, per in totals.items():
        summary = ", ".join(f"{size} bytes {state}" for state, size in per.items())
        lines.append(f"{pool}: {summary}")
    return "\n".join(lines)
