"""Shared test helpers.

Protection is proven by doing the forbidden thing for real in a child
process: ``run_child(code)`` runs ``code`` in a fresh interpreter (the same
one running the tests, importing the same prmem) and returns the completed
process, so tests can assert ``returncode == -signal.SIGSEGV``.
"""
from __future__ import annotations

import os  # used by HELPERS_SOURCE, executed below
import signal
import subprocess
import sys
import textwrap

import pytest

import prmem

# pytester runs inner pytest sessions (tests/test_testing.py).  prmem's own
# plugin, prmem.pytest_plugin, is not named here: installing prmem registers
# it (entry point pytest11), and the tests use it that way.
pytest_plugins = ["pytester"]

# Helpers that the tests and their child processes share: defined once as
# source, executed here for the tests and prepended to every child script.
HELPERS_SOURCE = r'''
def perms_at(address, default=None):
    """Permissions ("r--s", "rw-s", ...) of the mapping containing address;
    default (or LookupError) if nothing is mapped there."""
    with open("/proc/self/maps") as f:
        for line in f:
            addrs, perms = line.split()[:2]
            start, end = (int(x, 16) for x in addrs.split("-"))
            if start <= address < end:
                return perms
    if default is not None:
        return default
    raise LookupError(hex(address))


def backing_fds(address, name=None):
    """Fresh read-write descriptors of the file mapped at address, got the
    ways code in this process could (prmem._probes.writable_fds); the
    caller closes them.  `name` is accepted for readability only."""
    from prmem._probes import writable_fds
    return writable_fds(address)


def pool_fds(name):
    """File descriptors of this process open on pool `name`'s memory files."""
    wanted = ("/memfd:prmem:" + name, "/memfd:prmem:" + name + " (deleted)")
    fds = []
    for entry in os.listdir("/proc/self/fd"):
        try:
            if os.readlink("/proc/self/fd/" + entry) in wanted:
                fds.append(int(entry))
        except OSError:
            pass
    return fds
'''
exec(HELPERS_SOURCE)

CHILD_PRELUDE = """
import ctypes, os, signal, sys
import prmem
from prmem import Mode, State, Pool

def native_write(alloc, data=b"X", offset=0):
    # A raw write from native code: no prmem check in the way, only the MMU.
    ctypes.memmove(alloc.address + offset, data, len(data))
""" + HELPERS_SOURCE


def run_child(code: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run ``code`` (dedented, after CHILD_PRELUDE) in a new interpreter."""
    source = CHILD_PRELUDE + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", source],
        capture_output=True,
        text=True,
        timeout=timeout,
    )



def assert_native_store_dies(setup: str, address: str) -> None:
    """In a child: run setup, then store 8 bytes natively at the address
    the expression gives; the store must end the child with SIGSEGV."""
    proc = run_child(
        setup + "\nimport ctypes\naddr = " + address + "\n"
        "print('before', flush=True)\n"
        "ctypes.memset(addr, 0x41, 8)\n"
        "print('survived', flush=True)\n"
    )
    assert "before" in proc.stdout, proc.stderr
    assert "survived" not in proc.stdout
    assert proc.returncode == -signal.SIGSEGV, proc.stderr

@pytest.fixture
def pool_factory():
    """Create pools that are destroyed at the end of the test."""
    pools = []

    def make(*args, **kwargs):
        pool = prmem.Pool(*args, **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        try:
            pool.destroy()
        except BufferError:
            pass


def maps_entries(name: str):
    """Lines of /proc/self/maps that belong to prmem pool ``name``:
    (start, end, perms) tuples."""
    entries = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(("/memfd:prmem:%s (deleted)" % name,
                                       "/memfd:prmem:%s" % name)):
                addrs, perms = line.split()[:2]
                start, end = (int(x, 16) for x in addrs.split("-"))
                entries.append((start, end, perms))
    return entries
