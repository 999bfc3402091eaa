"""``python -m prmem``: the same command line as the ``prmem`` script."""
from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":  # not when a documentation tool imports it
    sys.exit(main())
