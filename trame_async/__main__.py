"""``python -m trame_async``: the same as ``trame-serve``."""

import sys

from .cli import main

sys.exit(main())
