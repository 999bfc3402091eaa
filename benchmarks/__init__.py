"""prmem benchmark suite: ``python -m benchmarks`` (see benchmarks/README.md).

One process runs prmem side by side with the real peer libraries (libsodium,
OpenSSL's secure heap, plain mmap/mprotect through libc, Python's bytearray),
loaded with ctypes.  A peer whose library is missing is skipped with a
printed message; nothing is ever estimated or made up.

The suite reports numbers and ratios.  Targets are shown next to the
measured ratios ("met: yes/no"), but nothing here asserts on timings: the
exit status only says whether every workload ran.

This package is deliberately outside pytest's ``testpaths``.
"""

#: Bumped when the layout of latest.json changes incompatibly.
SCHEMA_VERSION = 1
