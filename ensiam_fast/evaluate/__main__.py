"""``python -m ensiam_fast.evaluate``: the CLI lives in cli.py, so the package can re-export ``main``
without runpy finding this module already imported."""

import sys

from ensiam_fast.evaluate.cli import main

if __name__ == "__main__":
    sys.exit(main())
