"""``python -m kneebatch``: the command line (what SLURM scripts call, with the interpreter that submitted them)."""

import sys

from kneebatch.cli import main

sys.exit(main())
