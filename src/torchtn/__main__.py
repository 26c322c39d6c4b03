"""``python -m torchtn`` is the ``torchtn`` command (so ``torchrun … -m torchtn train …`` works too)."""
import sys

from .cli import main

sys.exit(main())
