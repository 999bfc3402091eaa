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
    st = sub.add_parser("selftest", help="prove each protection on this kernel")
    st.add_argument("-v", "--verbose", action="store_true", help="show child output on failure")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import print_info
        return print_info()
    from .selftest import run_selftest
    return run_selftest(verbose=args.verbose)
