"""``python -m prmem``: the same command line as the ``prmem`` script."""
from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
