"""``python -m gatemetrics``: the same as the ``gatemetrics`` console script."""

from __future__ import annotations

import sys

from gatemetrics.cli import main

if __name__ == "__main__":
    sys.exit(main())
