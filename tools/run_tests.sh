#!/usr/bin/env bash
# The full test suite in one pytest process (the README's test command); extra arguments go to pytest.
cd "$(dirname "$0")/.." && exec python3 -m pytest -q -p no:cacheprovider "$@"
