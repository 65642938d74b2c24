#!/usr/bin/env python3
"""Thin entry: same as the ``data_prep_tool`` console script."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ep_train.data.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
