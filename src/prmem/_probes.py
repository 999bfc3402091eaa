"""Ways code inside a process can reach pool memory behind prmem's back.

``prmem selftest`` and the test suite use these to attack pools for real:
descriptors of a pool's memory file got the ways any code in the process
could get them, and writable mappings made through them.  Not public API.
"""
from __future__ import annotations

import mmap
import os
from typing import List, Tuple


def mapping_at(address: int) -> Tuple[str, int, int]:
    """(``start-end`` as in /proc/self/maps, file offset of ``address``,
    inode) of the mapping that contains ``address``."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[0], int(fields[2], 16) + address - start, int(fields[4])
    raise LookupError(hex(address))


def writable_fds(address: int) -> List[int]:
    """Fresh read-write descriptors of the file mapped at ``address``:
    reopening, through ``/proc/self/fd``, any descriptor of it this process
    holds (prmem's own included), and ``/proc/self/map_files`` (needs
    CAP_SYS_ADMIN).  The caller closes them."""
    span, _offset, inode = mapping_at(address)
    fds = []
    for entry in os.listdir("/proc/self/fd"):
        try:
            if os.stat("/proc/self/fd/" + entry).st_ino == inode:
                fds.append(os.open("/proc/self/fd/" + entry, os.O_RDWR))
        except OSError:
            pass
    try:
        fds.append(os.open("/proc/self/map_files/" + span, os.O_RDWR))
    except OSError:
        pass
    return fds


def writable_alias(address: int) -> mmap.mmap:
    """A writable MAP_SHARED mapping of the page holding ``address``, made
    outside prmem through a descriptor of its memory file."""
    fds = writable_fds(address)
    if not fds:
        raise PermissionError("no descriptor of the memory file at %#x can be opened" % address)
    page = address & ~(mmap.PAGESIZE - 1)
    _span, offset, _inode = mapping_at(page)
    try:
        return mmap.mmap(fds[0], mmap.PAGESIZE, mmap.MAP_SHARED,
                         mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
    finally:
        for fd in fds:
            os.close(fd)
