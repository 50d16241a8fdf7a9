"""`python -m dit360_blender …` — the command line (see `cli.py`)."""

import sys

from .cli import main

sys.exit(main())
