#!/usr/bin/env bash
# The one command for a lent GPU machine; what it runs and writes: tools/gpu_suite.py.
#   PYTHONPATH=. bash tools/gpu_suite.sh             # on the device (under 8 minutes)
#   PYTHONPATH=. bash tools/gpu_suite.sh --dry-run   # every step tiny, on the CPU
# PYTHON names the interpreter (default: python3 on PATH); gpu_suite.py runs every step through it
# (sys.executable), so a test or a virtual environment sets PYTHON="$VENV/bin/python" once.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" tools/gpu_suite.py "$@"
