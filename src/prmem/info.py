"""``prmem info``: what this kernel gives prmem, and what that means."""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
from typing import Dict, List

# What each feature buys; printed by `prmem info`.
FEATURE_NOTES: Dict[str, str] = {
    "memfd": "memfd_create(): pools are backed by sealable memory files",
    "memfd_seal_future_write": "F_SEAL_FUTURE_WRITE: READ_ONLY memory is sealed; "
                               "mprotect(PROT_WRITE) and pwrite() on it fail",
    "mseal": "mseal(): Pool(seal=True) also makes READ_ONLY mappings immune to "
             "munmap/mprotect/mremap",
    "memfd_secret": "memfd_secret(): pages can be removed from the kernel's direct map",
    "pkeys": "memory protection keys (not used by prmem yet)",
}


def kernel_release() -> str:
    """The running kernel's release string (uname -r)."""
    return os.uname().release


def shmem_thp() -> str:
    """The kernel's transparent-huge-page setting for shmem (memfd) memory:
    the bracketed word of /sys/kernel/mm/transparent_hugepage/shmem_enabled,
    or "unknown"."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") as f:
            text = f.read()
    except OSError:
        return "unknown"
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else text.strip() or "unknown"


def describe() -> List[str]:
    """Lines of the `prmem info` report."""
    import prmem

    lines = [
        f"prmem {prmem.__version__}",
        f"kernel: Linux {kernel_release()} ({os.uname().machine})",
        f"page size: {prmem.page_size} bytes",
        "enforced: yes" if prmem.enforced else
        "enforced: NO -- PRMEM_ENFORCE=0 is set: pools behave the same through the API, "
        "but NO PAGE IS WRITE-PROTECTED in this process",
        "features:",
    ]
    for name, note in FEATURE_NOTES.items():
        mark = "yes" if name in prmem.features else "no "
        lines.append(f"  [{mark}] {name:<24} {note}")
    from . import _core
    root_state = _core._root()[1]
    lines.append("prmem's own root (metadata address, page size, features, enforcement): "
                 + {"sealed": "read-only and sealed (mseal) since import",
                    "read-only": "read-only since import (not sealed: no mseal here, so "
                                 "mprotect() could make it writable again)",
                    }.get(root_state, "WRITABLE: it could not be made read-only"))
    lines.append(f"transparent huge pages for shared memory (shmem_enabled): {shmem_thp()}; "
                 "prmem asks for them (MADV_HUGEPAGE) on areas of 2 MiB or more, and the "
                 "kernel uses them for its memory files only if this says advise, "
                 "within_size or always (4 KiB pages otherwise)")
    lines.append("caveats:")
    if "memfd" not in prmem.features:
        lines.append("  ! no memfd_create(): pools are backed by unnamed /dev/shm files, which "
                     "cannot be sealed; READ_ONLY memory is protected by the MMU only")
    if "memfd_seal_future_write" not in prmem.features:
        lines.append("  ! no F_SEAL_FUTURE_WRITE: READ_ONLY memory is write-protected by the "
                     "MMU but code that can call mprotect() can make it writable again")
    if "memfd_secret" in prmem.features:
        lines.append("  - secret pools (memfd_secret): READ_ONLY is enforced by the MMU, not by "
                     "file seals (memfd_secret files cannot be sealed); use seal=True to make "
                     "it permanent; rare writes briefly map the touched pages writable at a "
                     "second, unpublished address")
    lines.append("  - WRITE_RARE memory is read-only to the MMU, but code running in this "
                 "process that calls mprotect() on it or pwrite() on the pool's memfd can "
                 "still change it; sealed READ_ONLY memory it cannot")
    lines.extend("  - " + line for line in probe_proc_mem())
    return lines


def _proc_mem_write(address: int) -> str:
    """Write one byte at address through /proc/self/mem: "written" or the errno name."""
    fd = os.open("/proc/self/mem", os.O_RDWR)
    try:
        os.pwrite(fd, b"!", address)
        return "written"
    except OSError as e:
        code = e.errno if e.errno is not None else 0
        return errno.errorcode.get(code, str(e.errno))
    finally:
        os.close(fd)


def probe_proc_mem() -> List[str]:
    """Measure, on this kernel, whether /proc/PID/mem writes bypass page
    protection: on an ordinary private read-only page, and on protected
    prmem memory."""
    import prmem

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = prmem.page_size
    private = libc.mmap(None, page, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    try:
        bypass = _proc_mem_write(private)
    except OSError as e:
        return [f"/proc/self/mem cannot be opened for writing here ({e.strerror}): "
                "that route is closed for every mapping"]
    finally:
        libc.munmap(private, page)
    with prmem.Pool(prmem.Mode.RO, name="prmem-info-probe") as pool:
        target = pool.alloc(8)
        pool.protect()
        refused = _proc_mem_write(target.address)
    lines = []
    if bypass == "written":
        lines.append("writes through /proc/PID/mem DO bypass page protection of private "
                     "read-only mappings on this kernel (measured now)")
    else:
        lines.append(f"writes through /proc/PID/mem to private read-only mappings are refused "
                     f"on this kernel ({bypass}, measured now)")
    lines.append("prmem's protected (shared, sealed) mappings "
                 + ("refused that write (%s, measured now)" % refused if refused != "written"
                    else "did NOT refuse that write: "
                    + ("enforcement is off (PRMEM_ENFORCE=0)" if not prmem.enforced
                       else "protection is incomplete on this kernel")))
    return lines


def print_info() -> int:
    """Print the report; exit status 0."""
    print("\n".join(describe()))
    return 0
