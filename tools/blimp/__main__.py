"""`python3 -m blimp ...` (with tools/ on PYTHONPATH): the host tool's command line."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
