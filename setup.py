"""Build script for the C extension prmem._core (metadata is in pyproject.toml).

PRMEM_SANITIZE=1 builds with AddressSanitizer and UndefinedBehaviorSanitizer;
run the tests with LD_PRELOAD=$(gcc -print-file-name=libasan.so) then.
"""
import os
import sys

from setuptools import Extension, setup

if not sys.platform.startswith("linux"):
    raise SystemExit(
        "prmem supports Linux only: it relies on memfd_create, file seals and "
        "mprotect semantics of the Linux kernel (this is %r)." % sys.platform
    )

extra_compile_args = ["-std=gnu11", "-Wall", "-Wextra", "-fvisibility=hidden"]
extra_link_args = []
if os.environ.get("PRMEM_SANITIZE") == "1":
    sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]
    extra_compile_args += sanitize
    extra_link_args += ["-fsanitize=address,undefined"]

setup(
    ext_modules=[
        Extension(
            "prmem._core",
            sources=[
                "csrc/module.c",
                "csrc/meta.c",
                "csrc/areas.c",
                "csrc/filewrite.c",
                "csrc/unshare.c",
                "csrc/seal.c",
                "csrc/allocator.c",
                "csrc/lifecycle.c",
                "csrc/allocation.c",
                "csrc/access.c",
                "csrc/report.c",
                "csrc/frozen_read.c",
                "csrc/frozen.c",
                "csrc/freeze.c",
                "csrc/share.c",
                "csrc/rare.c",
                "csrc/fault.c",
                "csrc/fork.c",
            ],
            depends=["csrc/prmem.h"],
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    ],
)
