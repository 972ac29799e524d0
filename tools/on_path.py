"""Importing this puts the project root on ``sys.path``: a script in tools/ then runs from a checkout
that was never installed (``python tools/make_shards.py ...``), or whose editable install points
elsewhere. The checkout the script sits in wins over an installed copy."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
