"""``prmem inspect PID``: list a running process's prmem memory and how it is
protected, from ``/proc/PID/smaps``.

prmem names its memory files ``prmem:<pool>``, so each mapping shows up as
``/memfd:prmem:<pool> (deleted)``.  The kernel's ``VmFlags`` tell apart what
the permissions alone cannot: a read-only mapping that may become writable
again (``mw``) from a sealed one, and show ``mseal()`` (``sl``), locking
(``lo``) and ``MADV_DONTDUMP`` (``dd``).  Of the read-only mappings that may
become writable again, those whose memory file the process still holds
(``/proc/PID/fd``) are write-rare: prmem keeps the descriptor to rare-write
through it; those whose file it no longer holds are READ_ONLY protected by
the MMU only (a secret pool's memory, which cannot be sealed).

It also reports what ``Pool.verify()`` would find, as far as it can be seen
from outside the process: a pool's file is mapped at file offset == offset
in its reservation, so every mapping of one file must share one base
address (``start - offset``).  A mapping of the file at another base is an
alias (``mremap`` moved it, or someone mapped the file again), and anything
else mapped between two parts of one reservation has replaced pool memory
(``mmap(MAP_FIXED)`` over it).  Inside the process ``Pool.verify()`` knows
every area and is the authoritative check.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Iterator, List, Optional, Set, Tuple

_MEMFD_PREFIX = "/memfd:prmem:"
# A page prmem maps next to memory received from another process, named
# after its origin: prmem-attached:<address>:<inode>:<sender pid>:<pool name>
_ATTACHED_PREFIX = "/memfd:prmem-attached:"
_SECRET = "/secretmem"

# What each protection label of `prmem inspect` means (printed under the
# table for the labels that occur).
MEANINGS: Dict[str, str] = {
    "WRITABLE": "writable by any code in the process (before protect())",
    "WRITE_RARE": "read-only to the MMU; the process holds the memory file, through "
                  "which prmem's rare_write() changes it, and so could code that calls "
                  "mprotect() or writes to that file (an AUTO_RO area left behind looks "
                  "the same until protect() seals its chunk)",
    "READ_ONLY, MMU only": "read-only to the MMU, but neither sealed nor mseal()ed (a "
                           "secret pool: its memory cannot be sealed): code that calls "
                           "mprotect() can make it writable again; Pool(seal=True) "
                           "prevents that",
    "READ_ONLY, sealed": "the kernel refuses every write: file seals, or mseal() "
                         "([mseal]), which also refuses munmap/mremap/mprotect",
    "read-only, not sealed": "WRITE_RARE or MMU-only READ_ONLY: telling them apart needs "
                             "read access to /proc/PID/fd (run as the process's user)",
    "reserved (no access)": "address space the pool keeps for its next areas",
    "no access": "unreadable: a no-access pool's data outside `with pool.access():` "
                 "(its areas are always dontdump), or a dontdump pool's reserved "
                 "address space",
}


@dataclasses.dataclass
class Mapping:
    """One prmem mapping of the inspected process."""

    pool: str
    start: int
    end: int
    perms: str
    vmflags: List[str]
    offset: int = 0
    device: str = ""
    inode: int = 0
    attached: bool = False  # received from another process (prmem.recv, multiprocessing)
    #: whether the process holds a descriptor of this mapping's file (None:
    #: its /proc/PID/fd could not be read)
    file_held: Optional[bool] = None

    @property
    def size(self) -> int:
        """Size of the mapping in bytes."""
        return self.end - self.start

    @property
    def protection(self) -> str:
        """What the kernel enforces on this mapping, in prmem's terms (a key
        of :data:`MEANINGS`)."""
        if self.perms.startswith("rw"):
            return "WRITABLE"
        if self.perms.startswith("r"):
            # mseal()ed ("sl") memory cannot be made writable whatever "mw" says
            if "mw" not in self.vmflags or "sl" in self.vmflags:
                return "READ_ONLY, sealed"
            if self.file_held is None:
                return "read-only, not sealed"
            # prmem keeps the descriptor of memory it may still rare-write,
            # and closes it once the memory is READ_ONLY
            return "WRITE_RARE" if self.file_held else "READ_ONLY, MMU only"
        # no-access areas are always dontdump; a reservation only in a
        # dontdump pool, so without "dd" it cannot be no-access data
        return "no access" if "dd" in self.vmflags else "reserved (no access)"

    @property
    def flags(self) -> List[str]:
        """Kernel flags worth knowing: mseal, locked, dontdump."""
        names = {"sl": "mseal", "lo": "locked", "dd": "dontdump"}
        return [names[f] for f in self.vmflags if f in names]


def _smaps(pid: int) -> Iterator[Tuple[str, List[str]]]:
    header = None
    with open(f"/proc/{pid}/smaps", errors="replace") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):
                header = line
            elif first == "VmFlags:" and header is not None:
                yield header, line.split()[1:]
                header = None


def _fields_and_path(header: str) -> Tuple[List[str], str]:
    """The fields of an smaps header line, and its path without the
    " (deleted)" that unlinked files (every memfd) carry."""
    fields = header.split(maxsplit=5)
    path = fields[5].strip() if len(fields) > 5 else ""
    if path.endswith(" (deleted)"):
        path = path[: -len(" (deleted)")]
    return fields, path


def _held_files(pid: int) -> Optional[Set[Tuple[int, int]]]:
    """(device, inode) of every file process ``pid`` holds a descriptor of,
    or None if its descriptors cannot be read."""
    try:
        entries = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    held = set()
    for entry in entries:
        try:
            st = os.stat(f"/proc/{pid}/fd/{entry}")
        except OSError:  # closed meanwhile
            continue
        held.add((st.st_dev, st.st_ino))
    return held


def _device(field: str) -> int:
    """The device number of an smaps "major:minor" (hex) field."""
    major, minor = field.split(":")
    return os.makedev(int(major, 16), int(minor, 16))


def mappings(pid: int) -> List[Mapping]:
    """prmem mappings of process ``pid`` (needs permission to read its smaps).
    Memory received from another process is named ``<pool> (attached from
    pid N)``."""
    found = []
    entries = list(_smaps(pid))
    held = _held_files(pid)
    origins: Dict[Tuple[int, int], str] = {}  # (start, inode) -> sender pid
    for header, _vmflags in entries:
        fields, path = _fields_and_path(header)
        if path.startswith(_ATTACHED_PREFIX):
            parts = path[len(_ATTACHED_PREFIX):].split(":", 3)
            if len(parts) == 4 and parts[1].isdigit():
                try:
                    origins[(int(parts[0], 16), int(parts[1]))] = parts[2]
                except ValueError:
                    pass
    for header, vmflags in entries:
        fields, path = _fields_and_path(header)
        if path.startswith(_MEMFD_PREFIX):
            pool = path[len(_MEMFD_PREFIX):]
        elif path.startswith(_SECRET):
            pool = "(secret pool)"  # memfd_secret files carry no name
        else:
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        inode = int(fields[4])
        sender = origins.get((start - int(fields[2], 16), inode))
        if sender is not None:
            pool += f" (attached from pid {sender})"
        file_held = None if held is None else (_device(fields[3]), inode) in held
        found.append(Mapping(pool, start, end, fields[1], vmflags, int(fields[2], 16),
                             fields[3], inode, sender is not None, file_held))
    return found


def _all_ranges(pid: int) -> List[Tuple[int, int, str]]:
    """(start, end, description) of every mapping of process ``pid``."""
    ranges = []
    with open(f"/proc/{pid}/maps", errors="replace") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            what = fields[5].strip() if len(fields) > 5 else "anonymous memory"
            ranges.append((start, end, f"{what} ({fields[1]})"))
    return ranges


def anomalies(pid: int, maps: Optional[List[Mapping]] = None) -> List[str]:
    """Signs that pool memory of process ``pid`` was moved, aliased or
    replaced by code outside prmem (see the module docstring)."""
    maps = mappings(pid) if maps is None else maps
    by_file: Dict[Tuple[str, int], List[Mapping]] = {}
    for m in maps:
        # memory received from elsewhere is a legitimate second mapping of a
        # file (of another process, or of this one when it sent to itself)
        if not m.attached:
            by_file.setdefault((m.device, m.inode), []).append(m)
    found = []
    others = None
    for group in by_file.values():
        bases: Dict[int, List[Mapping]] = {}
        for m in group:
            bases.setdefault(m.start - m.offset, []).append(m)
        # the reservation is the base holding most of the file; the rest are aliases
        home = max(bases, key=lambda b: sum(m.size for m in bases[b]))
        for base, parts in bases.items():
            if base != home:
                for m in parts:
                    found.append(f"{m.pool}: its memory file is also mapped at "
                                 f"{m.start:#x}-{m.end:#x} ({m.perms}), outside its "
                                 "reservation: moved with mremap, or mapped again by "
                                 "code outside prmem")
        parts = sorted(bases[home], key=lambda m: m.start)
        for before, after in zip(parts, parts[1:]):
            if after.start == before.end:
                continue
            if others is None:
                others = _all_ranges(pid)
            for start, end, what in others:
                if start < after.start and end > before.end:
                    found.append(f"{before.pool}: {max(start, before.end):#x}-"
                                 f"{min(end, after.start):#x} inside its reservation is "
                                 f"mapped by {what}: pool memory was replaced")
            gap = [r for r in others if r[0] < after.start and r[1] > before.end]
            if not gap:
                found.append(f"{before.pool}: {before.end:#x}-{after.start:#x} inside its "
                             "reservation is not mapped: pool memory was unmapped")
    return found


def report(pid: int, as_json: bool = False) -> str:
    """The text (or JSON) that ``prmem inspect`` prints."""
    maps = mappings(pid)
    problems = anomalies(pid, maps)
    if as_json:
        entries = [
            {"pool": m.pool, "start": hex(m.start), "end": hex(m.end), "size": m.size,
             "perms": m.perms, "protection": m.protection, "flags": m.flags}
            for m in maps
        ]
        entries += [{"anomaly": text} for text in problems]
        return json.dumps(entries, indent=2)
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
            per_pool[m.protection] = per_pool.get(m.protection, 0) + m.size
    lines.append("")
    for pool, per in totals.items():
        summary = ", ".join(f"{size} bytes {state}" for state, size in per.items())
        lines.append(f"{pool}: {summary}")
    lines.append("")
    seen = {m.protection for m in maps}
    lines.extend(f"{label}: {meaning}" for label, meaning in MEANINGS.items()
                 if label in seen)
    if problems:
        lines.append("")
        lines.append(f"WARNING: {len(problems)} sign(s) that prmem memory was changed "
                     "behind prmem's back:")
        lines.extend(f"  ! {text}" for text in problems)
    return "\n".join(lines)
