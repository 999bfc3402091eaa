"""Entry point of the ``prmem`` console script (the commands are in prmem.cli).

It lives outside the prmem package on purpose: importing prmem can fail
before any of its code could catch anything (``PRMEM_DISABLE_FEATURES``
naming an unknown feature, a platform other than Linux, an incomplete
build), and a command line tool should then print a one-line error, not a
traceback.  Only code that runs before ``import prmem`` can arrange that.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``prmem`` with ``argv`` (default: the command line); the exit status."""
    try:
        from prmem.cli import main as prmem_main
    except ImportError as e:
        print(f"prmem: cannot start: {e}", file=sys.stderr)
        return 1
    return prmem_main(argv)


if __name__ == "__main__":
    sys.exit(main())
