"""``python -m kerasfrac``: the ``kerasfrac`` command (where the console script is not on PATH)."""

import sys

from kerasfrac.cli import main

sys.exit(main())
