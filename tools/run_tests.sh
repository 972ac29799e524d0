#!/usr/bin/env bash
# The test suite, one pytest process per test file.
# Why: run in one process, the multi-process end-to-end tests (tests/test_distributed.py) and a few
# after them fail when they follow some earlier test files, while each file passes on its own; the
# shared in-process state behind that is not found yet. One process per file keeps every assertion
# and every test, and isolates the files from each other. Extra arguments go to each pytest call.
set -uo pipefail
cd "$(dirname "$0")/.."
failed=()
for f in tests/test_*.py; do
  echo "== $f"
  python3 -m pytest -q -p no:cacheprovider "$@" "$f"
  rc=$?
  # 5: no test collected in that file (for example all deselected by -k): not a failure of the file
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then failed+=("$f"); fi
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "test files that failed: ${failed[*]}" >&2
  exit 1
fi
echo "every test file passed"
