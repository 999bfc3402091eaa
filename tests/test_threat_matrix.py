"""The adversarial matrix: every way code inside the process could try to
change protected memory, tried for real on every kind of protected memory.

Columns are memory states: a pool with one allocation filled with PATTERN,
then protected.  Rows are techniques, each done for real with ctypes, os and
raw syscalls.  Every cell runs in its own forked process (so one attack
cannot disturb the next), and records

* the outcome of the attempt: "allowed", an errno name, a signal name, or
  "no descriptor" when no file descriptor of the pool's memory can be had;
* what a reader of the allocation sees afterwards: "intact", "changed" (the
  attack wrote the data), "substituted" (the address shows other bytes while
  the pool's file still holds the original) or "unmapped" (a read faults).

EXPECTED is the one table of what must happen.  test_docs_table checks that
docs/threat-model.md shows exactly that table between the marker comments;
``python tests/test_threat_matrix.py --write-docs`` rewrites it, and
``--observe`` prints what this kernel and this build really do.

How a cell is run (run_cell): the forked cell process G builds the pool and
then raw-clones a witness W.  The clone bypasses the pthread_atfork handlers,
so W shares every mapping exactly as another thread would (prmem's fork
handler would have given it private copies of write-rare memory).  G makes
the attack; W then reads the allocation through its own, untouched mapping
of the same file: that is the file's content.  Last, G reads through the
original address, where a fault kills G and is recorded as "unmapped".  A
plain store runs in another raw clone, as its SIGSEGV ends the process.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import re
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import NamedTuple, Optional

import pytest

import prmem

DOCS = Path(__file__).resolve().parent.parent / "docs" / "threat-model.md"
BEGIN = "<!-- threat-matrix:begin -->"
END = "<!-- threat-matrix:end -->"

PATTERN = (b"prmem threat matrix: the original bytes " * 8)[:256]
EVIL = (b"EVIL" * 64)[:len(PATTERN)]

ALLOWED = "allowed"
NO_FD = "no descriptor"
INTACT, CHANGED, SUBSTITUTED, UNMAPPED = "intact", "changed", "substituted", "unmapped"

# ------------------------------------------------------------------ the table

# technique key -> row label in the docs
TECHNIQUES = {
    "store": "plain store from native code (`ctypes.memmove`)",
    "mprotect": "`mprotect(PROT_WRITE)` on the range, then a store",
    "pwrite": "`pwrite()` on prmem's descriptor",
    "reopen": "reopen `/proc/self/fd/N` `O_RDWR`, then `write()`",
    "mmap_shared": "writable `MAP_SHARED` mapping of the descriptor, then a store",
    "punch_hole": "`fallocate(PUNCH_HOLE \\| KEEP_SIZE)` on the descriptor",
    "ftruncate": "`ftruncate()` (shrink) on the descriptor",
    "madv_remove": "`madvise(MADV_REMOVE)` on the range",
    "mremap": "`mremap()` of the range (moving it)",
    "munmap": "`munmap()` of the range",
    "map_fixed": "`mmap(MAP_FIXED)` of other memory over the range",
    "proc_mem": "write via `/proc/self/mem`",
    "process_vm_writev": "`process_vm_writev()` to itself",
    "pipe_read": "`read()` from a pipe into the buffer",
}
DESCRIPTOR_ROWS = ("pwrite", "reopen", "mmap_shared", "punch_hole", "ftruncate")


class Column(NamedTuple):
    label: str            # column header in the docs
    mode: str             # prmem.Mode name
    secret: bool
    seal: bool
    needs: tuple          # prmem.features this column needs


COLUMNS = {
    "WRITE_RARE": Column("WRITE_RARE", "WR", False, False, ("memfd",)),
    "READ_ONLY": Column("READ_ONLY", "RO", False, False,
                        ("memfd", "memfd_seal_future_write")),
    "READ_ONLY+seal": Column("READ_ONLY, `seal=True`", "RO", False, True,
                             ("memfd", "memfd_seal_future_write", "mseal")),
    "secret READ_ONLY": Column("secret READ_ONLY", "RO", True, False, ("memfd_secret",)),
    "secret READ_ONLY+seal": Column("secret READ_ONLY, `seal=True`", "RO", True, True,
                                    ("memfd_secret", "mseal")),
}


class Cell(NamedTuple):
    outcome: str                # ALLOWED, NO_FD, an errno name or a signal name
    data: str                   # INTACT, CHANGED, SUBSTITUTED or UNMAPPED
    fd: Optional[str] = None    # descriptor rows: "prmem" (its own) or "map_files"


WR, RO, ROS, SRO, SROS = COLUMNS  # the column keys, in order

#: (technique, column) -> Cell: what must happen.  The docs table is
#: rendered from this.  Descriptor rows name where the descriptor came from:
#: prmem's own, or one opened from /proc/self/map_files (root only).
EXPECTED = {
    # The MMU stops a plain store everywhere.
    ("store", WR): Cell("SIGSEGV", INTACT),
    ("store", RO): Cell("SIGSEGV", INTACT),
    ("store", ROS): Cell("SIGSEGV", INTACT),
    ("store", SRO): Cell("SIGSEGV", INTACT),
    ("store", SROS): Cell("SIGSEGV", INTACT),
    # A write-rare mapping keeps the right to become writable (VM_MAYWRITE);
    # sealed memfd memory is re-mapped after the seal without it, and the
    # kernel checks that right before it looks at an mseal (EACCES, not
    # EPERM).  memfd_secret cannot be sealed: only mseal stops mprotect.
    ("mprotect", WR): Cell(ALLOWED, CHANGED),
    ("mprotect", RO): Cell("EACCES", INTACT),
    ("mprotect", ROS): Cell("EACCES", INTACT),
    ("mprotect", SRO): Cell(ALLOWED, CHANGED),
    ("mprotect", SROS): Cell("EPERM", INTACT),
    # The descriptor: write-rare memory is written through it (rare_write()),
    # so anyone holding it can.  Sealed memfd READ_ONLY memory carries
    # F_SEAL_WRITE, FUTURE_WRITE, SHRINK, GROW and SEAL and prmem closes its
    # descriptor; one reopened through map_files can do nothing with it.
    # prmem closes a memfd_secret descriptor at protect(), and no path
    # reopens such a file (map_files gives ENXIO).
    ("pwrite", WR): Cell(ALLOWED, CHANGED, "prmem"),
    ("pwrite", RO): Cell("EPERM", INTACT, "map_files"),
    ("pwrite", ROS): Cell("EPERM", INTACT, "map_files"),
    ("pwrite", SRO): Cell(NO_FD, INTACT),
    ("pwrite", SROS): Cell(NO_FD, INTACT),
    ("reopen", WR): Cell(ALLOWED, CHANGED, "prmem"),
    ("reopen", RO): Cell("EPERM", INTACT, "map_files"),
    ("reopen", ROS): Cell("EPERM", INTACT, "map_files"),
    ("reopen", SRO): Cell(NO_FD, INTACT),
    ("reopen", SROS): Cell(NO_FD, INTACT),
    ("mmap_shared", WR): Cell(ALLOWED, CHANGED, "prmem"),
    ("mmap_shared", RO): Cell("EPERM", INTACT, "map_files"),
    ("mmap_shared", ROS): Cell("EPERM", INTACT, "map_files"),
    ("mmap_shared", SRO): Cell(NO_FD, INTACT),
    ("mmap_shared", SROS): Cell(NO_FD, INTACT),
    ("punch_hole", WR): Cell(ALLOWED, CHANGED, "prmem"),  # reads back zeros
    ("punch_hole", RO): Cell("EPERM", INTACT, "map_files"),
    ("punch_hole", ROS): Cell("EPERM", INTACT, "map_files"),
    ("punch_hole", SRO): Cell(NO_FD, INTACT),
    ("punch_hole", SROS): Cell(NO_FD, INTACT),
    ("ftruncate", WR): Cell(ALLOWED, UNMAPPED, "prmem"),  # reads get SIGBUS
    ("ftruncate", RO): Cell("EPERM", INTACT, "map_files"),
    ("ftruncate", ROS): Cell("EPERM", INTACT, "map_files"),
    ("ftruncate", SRO): Cell(NO_FD, INTACT),
    ("ftruncate", SROS): Cell(NO_FD, INTACT),
    # MADV_REMOVE punches a hole through the mapping: it needs a shared
    # mapping that may write (EACCES without), and refuses locked mappings
    # (EINVAL): memfd_secret pages are always locked.  mseal does not stop it
    # on file mappings; the missing right does.
    ("madv_remove", WR): Cell(ALLOWED, CHANGED),  # reads back zeros
    ("madv_remove", RO): Cell("EACCES", INTACT),
    ("madv_remove", ROS): Cell("EACCES", INTACT),
    ("madv_remove", SRO): Cell("EINVAL", INTACT),
    ("madv_remove", SROS): Cell("EINVAL", INTACT),
    # The mapping itself: without mseal it can be moved away, removed or
    # covered.  The file keeps the data, but readers of the address fault or,
    # worse, silently see other bytes.
    ("mremap", WR): Cell(ALLOWED, UNMAPPED),
    ("mremap", RO): Cell(ALLOWED, UNMAPPED),
    ("mremap", ROS): Cell("EPERM", INTACT),
    ("mremap", SRO): Cell(ALLOWED, UNMAPPED),
    ("mremap", SROS): Cell("EPERM", INTACT),
    ("munmap", WR): Cell(ALLOWED, UNMAPPED),
    ("munmap", RO): Cell(ALLOWED, UNMAPPED),
    ("munmap", ROS): Cell("EPERM", INTACT),
    ("munmap", SRO): Cell(ALLOWED, UNMAPPED),
    ("munmap", SROS): Cell("EPERM", INTACT),
    ("map_fixed", WR): Cell(ALLOWED, SUBSTITUTED),
    ("map_fixed", RO): Cell(ALLOWED, SUBSTITUTED),
    ("map_fixed", ROS): Cell("EPERM", INTACT),
    ("map_fixed", SRO): Cell(ALLOWED, SUBSTITUTED),
    ("map_fixed", SROS): Cell("EPERM", INTACT),
    # The kernel writing on the process's behalf: forced writes (FOLL_FORCE)
    # into read-only shared mappings fail, and memfd_secret pages cannot be
    # reached that way at all; the others only write through writable
    # mappings.
    ("proc_mem", WR): Cell("EIO", INTACT),
    ("proc_mem", RO): Cell("EIO", INTACT),
    ("proc_mem", ROS): Cell("EIO", INTACT),
    ("proc_mem", SRO): Cell("EIO", INTACT),
    ("proc_mem", SROS): Cell("EIO", INTACT),
    ("process_vm_writev", WR): Cell("EFAULT", INTACT),
    ("process_vm_writev", RO): Cell("EFAULT", INTACT),
    ("process_vm_writev", ROS): Cell("EFAULT", INTACT),
    ("process_vm_writev", SRO): Cell("EFAULT", INTACT),
    ("process_vm_writev", SROS): Cell("EFAULT", INTACT),
    ("pipe_read", WR): Cell("EFAULT", INTACT),
    ("pipe_read", RO): Cell("EFAULT", INTACT),
    ("pipe_read", ROS): Cell("EFAULT", INTACT),
    ("pipe_read", SRO): Cell("EFAULT", INTACT),
    ("pipe_read", SROS): Cell("EFAULT", INTACT),
}


# ------------------------------------------------------------ the docs table

def render_cell(cell: Cell) -> str:
    if cell.outcome == NO_FD:
        return f"no descriptor, {cell.data}"
    outcome = f"*{cell.outcome}*" if cell.outcome == ALLOWED else f"**{cell.outcome}**"
    if cell.fd == "map_files":
        outcome += "†"
    data = f"**{cell.data}**" if cell.data == CHANGED else cell.data
    return f"{outcome}, {data}"


def render_table(expected: dict = EXPECTED) -> str:
    lines = ["| technique | " + " | ".join(c.label for c in COLUMNS.values()) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for technique, label in TECHNIQUES.items():
        cells = [render_cell(expected[technique, column]) for column in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def docs_section(text: str) -> str:
    """What docs/threat-model.md holds between the markers."""
    match = re.search(re.escape(BEGIN) + r"\n(.*?)" + re.escape(END), text, re.S)
    if match is None:
        raise LookupError(f"{DOCS} has no {BEGIN} ... {END} section")
    return match.group(1)


def write_docs() -> bool:
    text = DOCS.read_text()
    docs_section(text)  # the markers must be there
    new = re.sub(re.escape(BEGIN) + r"\n.*?" + re.escape(END),
                 lambda _: f"{BEGIN}\n{render_table()}{END}", text, flags=re.S)
    if new != text:
        DOCS.write_text(new)
    return new != text


# ------------------------------------------------- the attacks (cell process)

PAGE = os.sysconf("SC_PAGE_SIZE")
PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MADV_REMOVE = 9
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
MAP_FAILED = ctypes.c_void_p(-1).value
SYS_CLONE = {"x86_64": 56, "aarch64": 220}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.mremap.restype = ctypes.c_void_p
_libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                         ctypes.c_void_p]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.read.restype = ctypes.c_ssize_t
_libc.read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_libc.process_vm_writev.restype = ctypes.c_ssize_t
_libc.process_vm_writev.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong,
                                    ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
# syscall() through PyDLL keeps the GIL held across the call, so a raw clone
# starts with the interpreter in the same consistent state as its parent.
_pydll = ctypes.PyDLL(None, use_errno=True)
_pydll.syscall.restype = ctypes.c_long


class _iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _check(rc, fail=-1):
    if rc == fail or rc is None:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc


def raw_fork() -> int:
    """fork() without the pthread_atfork handlers: the child shares every
    mapping as another thread of the process would.  It must only make
    syscalls and leave with os._exit()."""
    nr = SYS_CLONE[platform.machine()]
    return _check(_pydll.syscall(ctypes.c_long(nr), ctypes.c_long(signal.SIGCHLD),
                                 ctypes.c_long(0), ctypes.c_long(0), ctypes.c_long(0),
                                 ctypes.c_long(0)))


def status_name(status: int) -> str:
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name
    return f"exit {os.WEXITSTATUS(status)}"


class Target(NamedTuple):
    address: int
    size: int
    page: int           # first page of the allocation
    length: int         # bytes of whole pages it covers
    file_offset: int    # of `address` in the pool's file
    map_files: str      # /proc/self/map_files entry of its mapping
    dev: int
    ino: int

    @classmethod
    def of(cls, alloc) -> "Target":
        address, size = alloc.address, alloc.size
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if start <= address < end:
                    break
            else:
                raise LookupError(hex(address))
        major, minor = (int(x, 16) for x in fields[3].split(":"))
        page = address & ~(PAGE - 1)
        length = -(-(address + size - page) // PAGE) * PAGE
        return cls(address, size, page, length, int(fields[2], 16) + address - start,
                   f"/proc/self/map_files/{start:x}-{end:x}", os.makedev(major, minor),
                   int(fields[4]))


def prmem_descriptor(t: Target) -> Optional[int]:
    """A descriptor prmem holds on the pool's file, found by inode."""
    for entry in os.listdir("/proc/self/fd"):
        try:
            st = os.fstat(int(entry))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (t.dev, t.ino):
            return int(entry)
    return None


def descriptor(t: Target, flags: int):
    """(fd, where it came from): prmem's own, else one opened from
    /proc/self/map_files (root only), else (None, None)."""
    fd = prmem_descriptor(t)
    if fd is not None:
        return fd, "prmem"
    try:
        return os.open(t.map_files, flags | os.O_CLOEXEC), "map_files"
    except OSError:
        return None, None


def _store(address: int) -> None:
    ctypes.memmove(address, EVIL, len(EVIL))


def _written(n: int) -> str:
    return ALLOWED if n == len(EVIL) else f"short write {n}"


def attack_store(t):
    pid = raw_fork()
    if pid == 0:
        _store(t.address)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return ALLOWED if status == 0 else status_name(status)


def attack_mprotect(t):
    _check(_libc.mprotect(t.page, t.length, PROT_READ | PROT_WRITE))
    _store(t.address)
    return ALLOWED


def attack_pwrite(fd, t):
    return _written(os.pwrite(fd, EVIL, t.file_offset))


def attack_reopen(fd, t):
    new = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    os.lseek(new, t.file_offset, os.SEEK_SET)
    return _written(os.write(new, EVIL))


def attack_mmap_shared(fd, t):
    base = _check(_libc.mmap(None, t.length, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                             t.file_offset - (t.address - t.page)), MAP_FAILED)
    _store(base + t.address - t.page)
    _libc.munmap(base, t.length)
    return ALLOWED


def attack_punch_hole(fd, t):
    _check(_libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                           t.file_offset - (t.address - t.page), t.length))
    return ALLOWED


def attack_ftruncate(fd, t):
    os.ftruncate(fd, t.file_offset - (t.address - t.page))
    return ALLOWED


def attack_madv_remove(t):
    _check(_libc.madvise(t.page, t.length, MADV_REMOVE))
    return ALLOWED


def attack_mremap(t):
    dst = _check(_libc.mmap(None, t.length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
                 MAP_FAILED)
    _check(_libc.mremap(t.page, t.length, t.length, MREMAP_MAYMOVE | MREMAP_FIXED, dst),
           MAP_FAILED)
    return ALLOWED


def attack_munmap(t):
    _check(_libc.munmap(t.page, t.length))
    return ALLOWED


def attack_map_fixed(t):
    _check(_libc.mmap(t.page, t.length, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0), MAP_FAILED)
    _store(t.address)
    return ALLOWED


def attack_proc_mem(t):
    fd = os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC)
    return _written(os.pwrite(fd, EVIL, t.address))


def attack_process_vm_writev(t):
    src = ctypes.create_string_buffer(EVIL, len(EVIL))
    local = _iovec(ctypes.addressof(src), len(EVIL))
    remote = _iovec(t.address, len(EVIL))
    return _written(_check(_libc.process_vm_writev(os.getpid(), ctypes.byref(local), 1,
                                                   ctypes.byref(remote), 1, 0)))


def attack_pipe_read(t):
    r, w = os.pipe()
    os.write(w, EVIL)
    return _written(_check(_libc.read(r, t.address, len(EVIL))))


def attack(technique: str, t: Target):
    """Make the attempt: (outcome, descriptor source or None)."""
    fn = globals()["attack_" + technique]
    via = None
    try:
        if technique in DESCRIPTOR_ROWS:
            fd, via = descriptor(t, os.O_RDONLY if technique == "reopen" else os.O_RDWR)
            if fd is None:
                return NO_FD, None
            return fn(fd, t), via
        return fn(t), via
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno)), via


def run_cell(column: str, technique: str, out: int) -> None:
    """The body of a cell process; reports `[key, value]` lines on `out`."""
    def report(key, value):
        os.write(out, (json.dumps([key, value]) + "\n").encode())

    spec = COLUMNS[column]
    pool = prmem.Pool(prmem.Mode[spec.mode], name=f"tm-{technique}",
                      secret=spec.secret, seal=spec.seal)
    alloc = pool.alloc(len(PATTERN))
    alloc.write(PATTERN)
    pool.protect()
    report("state", alloc.state.name)
    t = Target.of(alloc)

    go_r, go_w = os.pipe()
    witness = raw_fork()
    if witness == 0:  # W: reads the file through its own, untouched mapping
        os.close(go_w)
        os.read(go_r, 1)  # the attack is over (or G is gone)
        report("file", ctypes.string_at(t.address, t.size).hex())
        os._exit(0)
    os.close(go_r)
    outcome, via = attack(technique, t)
    report("outcome", outcome)
    report("fd", via)
    os.close(go_w)
    _, status = os.waitpid(witness, 0)
    if status != 0:
        report("file", status_name(status))
    report("reading", True)
    report("address", ctypes.string_at(t.address, t.size).hex())  # may fault
    os._exit(0)


def run_isolated(column: str, technique: str, timeout: float) -> dict:
    """Run one cell in a forked process; its reports and exit status."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setpgid(0, 0)
            run_cell(column, technique, w)
        except BaseException:
            os.write(w, (json.dumps(["error", traceback.format_exc()]) + "\n").encode())
        os._exit(3)
    os.close(w)
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass  # already done by the child, or it is gone
    deadline = time.monotonic() + timeout
    buf = b""
    timed_out = False
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([r], [], [], left)[0]:
            timed_out = True
            break
        chunk = os.read(r, 65536)
        if not chunk:
            break  # G, W and any store attacker are done
        buf += chunk
    if timed_out:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.close(r)
    _, status = os.waitpid(pid, 0)
    record = {"exit": status_name(status) if status else "exit 0", "timeout": timed_out}
    for line in buf.decode().splitlines():
        key, value = json.loads(line)
        record[key] = value
    return record


def column_main(column: str) -> None:
    prmem.fault_report(False)  # deliberate faults need no report
    timeout = float(os.environ.get("PRMEM_MATRIX_CELL_TIMEOUT", "10"))
    results = {technique: run_isolated(column, technique, timeout)
               for technique in TECHNIQUES}
    print(json.dumps(results))


# ------------------------------------------------------ observing (the tests)

def classify(record: dict) -> Cell:
    """The Cell a cell process's record shows."""
    pattern = PATTERN.hex()
    if "outcome" in record:
        outcome = record["outcome"]
    elif "reading" not in record and record.get("exit", "").startswith("SIG"):
        outcome = record["exit"]  # the attack itself killed the process
    else:
        outcome = "?"
    file = record.get("file")
    if "address" in record:
        address = record["address"]
    elif "reading" in record:
        address = UNMAPPED  # the read through the address faulted
    else:
        address = None  # the process died during the attack: only the file is left
    if address == UNMAPPED:
        data = UNMAPPED
    elif address is None:
        data = {pattern: INTACT, None: "?"}.get(file, CHANGED)
        if file is not None and file.startswith("SIG"):
            data = UNMAPPED
    elif address == pattern:
        data = INTACT if file == pattern else f"? (address intact, file {file})"
    elif file == pattern:
        data = SUBSTITUTED
    elif file == address:
        data = CHANGED
    else:
        data = f"? (address {address[:16]}..., file {str(file)[:16]}...)"
    return Cell(outcome, data, record.get("fd"))


def summarize(record: dict) -> dict:
    """The record with the bytes read back named, for messages."""
    names = {PATTERN.hex(): "PATTERN", EVIL.hex(): "EVIL", bytes(len(PATTERN)).hex(): "zeros"}
    return {key: names.get(value, value) if isinstance(value, str) else value
            for key, value in record.items()}


def missing_features(column: str) -> list:
    return [f for f in COLUMNS[column].needs if f not in prmem.features]


def observe(columns=None, timeout: float = 60.0) -> dict:
    """Run the columns (in parallel, one child interpreter each):
    {(technique, column): (Cell, raw record)}."""
    columns = [c for c in (columns or COLUMNS) if not missing_features(c)]
    env = dict(os.environ)
    env.pop("PYTHONFAULTHANDLER", None)  # keep deliberate faults quiet
    src = str(Path(prmem.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    procs = {column: subprocess.Popen([sys.executable, __file__, "--column", column],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env)
             for column in columns}
    observed = {}
    deadline = time.monotonic() + timeout
    for column, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        try:
            records = json.loads(out)
        except ValueError:
            records = {t: {"error": f"column child failed (exit {proc.returncode}):\n{err}"}
                       for t in TECHNIQUES}
        for technique, record in records.items():
            observed[technique, column] = (classify(record), record)
    return observed


CELLS = [
    pytest.param(technique, column, id=f"{technique}-{column.replace(' ', '_')}",
                 marks=[pytest.mark.skipif(bool(missing_features(column)),
                                           reason=f"kernel lacks {missing_features(column)}")]
                 + ([pytest.mark.skipif(os.geteuid() != 0,
                                        reason="/proc/self/map_files needs root")]
                    if EXPECTED[technique, column].fd == "map_files" else []))
    for technique in TECHNIQUES for column in COLUMNS
]


@pytest.fixture(scope="module")
def observed():
    if not prmem.enforced:
        pytest.skip("PRMEM_ENFORCE=0: nothing is protected")
    return observe()


@pytest.mark.parametrize("technique, column", CELLS)
def test_cell(observed, technique, column):
    cell, record = observed[technique, column]
    assert "error" not in record, record["error"]
    assert not record["timeout"], record
    assert record["state"] == ("WRITE_RARE" if COLUMNS[column].mode == "WR" else "READ_ONLY")
    expected = EXPECTED[technique, column]
    assert cell == expected, (f"expected {render_cell(expected)} (fd: {expected.fd}), "
                              f"observed {render_cell(cell)} (fd: {cell.fd}); "
                              f"{summarize(record)}")


def test_every_cell_has_an_expectation():
    assert set(EXPECTED) == {(t, c) for t in TECHNIQUES for c in COLUMNS}
    for cell in EXPECTED.values():
        assert cell.data in (INTACT, CHANGED, SUBSTITUTED, UNMAPPED)
        assert (cell.outcome == ALLOWED) == (cell.data != INTACT), cell


def test_no_read_only_memory_can_be_changed():
    for (technique, column), cell in EXPECTED.items():
        if COLUMNS[column].mode == "RO":
            assert cell.data != CHANGED or (technique, column) == ("mprotect",
                                                                    "secret READ_ONLY")


def test_docs_table():
    section = docs_section(DOCS.read_text())
    assert section == render_table(), (
        "docs/threat-model.md is out of date: run "
        "`python tests/test_threat_matrix.py --write-docs`")


def _print_observed() -> int:
    observed = observe()
    table = {key: cell for key, (cell, _) in observed.items()}
    for key in EXPECTED:
        table.setdefault(key, Cell("(skipped)", "-"))
    print(render_table(table))
    differ = 0
    for key, (cell, record) in observed.items():
        if cell != EXPECTED[key]:
            differ += 1
            print(f"{key}: expected {EXPECTED[key]}, observed {cell}")
    return 1 if differ else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--column"]:
        column_main(sys.argv[2])
    elif sys.argv[1:] == ["--write-docs"]:
        print("rewrote" if write_docs() else "unchanged", DOCS)
    elif sys.argv[1:] == ["--observe"]:
        sys.exit(_print_observed())
    else:
        sys.exit(f"usage: {sys.argv[0]} --write-docs | --observe")
