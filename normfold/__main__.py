"""``python -m normfold`` is the ``normfold`` command."""

import sys

from normfold.cli import run

sys.exit(run())
