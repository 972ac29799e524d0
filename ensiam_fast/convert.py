"""``python -m ensiam_fast.convert``: kept so that the old command keeps working; the converter is
``ensiam_fast.shards.cli`` (``tools/make_shards.py`` is the documented form)."""

import sys

from ensiam_fast.shards.cli import main

if __name__ == "__main__":
    sys.exit(main())
