"""Command line: ``prmem selftest`` and ``prmem info``."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``prmem`` script and ``python -m prmem``."""
    parser = argparse.ArgumentParser(prog="prmem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="kernel, page size and detected features")
    ins = sub.add_parser("inspect", help="list the prmem memory of a running process")
    ins.add_argument("pid", type=int)
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    st = sub.add_parser("selftest", help="prove each protection on this kernel")
    st.add_argument("-v", "--verbose", action="store_true", help="show child output on failure")
    args = parser.parse_args(argv)
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
