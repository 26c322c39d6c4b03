"""``python -m torchtn.cli``: the ``torchtn`` command."""
import sys

from . import main

sys.exit(main())
