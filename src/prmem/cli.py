"""Command line of prmem: ``prmem selftest``, ``prmem info``, ``prmem inspect PID``.

The ``prmem`` script enters through ``_prmem_cli`` (which turns a failed
``import prmem`` into a one-line error); ``python -m prmem`` through
``prmem.__main__``.  Both run :func:`main`.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Optional, Sequence

DESCRIPTION = ("prmem: protectable memory for Python on Linux. Prove what this kernel "
               "protects, show what it offers, or check a running process's prmem memory.")


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="prmem", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"prmem {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, title="commands",
                                metavar="COMMAND")
    # one short line each: `prmem --help` lists them one per line
    st = sub.add_parser("selftest", help="prove each protection on this kernel",
                        description="Run each protection scenario for real in a child "
                                    "process and print scenario, expected, observed; exit "
                                    "0 only if every protection held.")
    st.add_argument("-v", "--verbose", action="store_true", help="show child output on failure")
    sub.add_parser("info", help="kernel, page size, features and caveats",
                   description="Print the kernel, page size, the detected features "
                               "(prmem.features), whether protection is enforced, and the "
                               "caveats that apply here.")
    ins = sub.add_parser("inspect", help="list a process's prmem memory and its protection",
                         description="List the prmem memory of a running process from "
                                     "/proc/PID/smaps and how the kernel protects it.")
    ins.add_argument("pid", type=int, help="the process to inspect")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _run(argv: Optional[Sequence[str]]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "info":
        from .info import print_info
        return print_info()
    if args.command == "inspect":
        from .inspect import report
        try:
            print(report(args.pid, as_json=args.json))
        except OSError as e:
            print(f"prmem inspect: cannot read process {args.pid}: {e}", file=sys.stderr)
            return 1
        return 0
    from .selftest import run_selftest
    return run_selftest(verbose=args.verbose)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``prmem`` script and ``python -m prmem``; returns
    the exit status."""
    try:
        status = _run(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return status
    except BrokenPipeError:
        # The reader went away (`prmem selftest | head`): stop quietly, as
        # if SIGPIPE had ended us, like other command line tools.  Point
        # stdout at /dev/null so the flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE
