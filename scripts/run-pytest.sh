#!/usr/bin/env bash
# Runs the suite and refuses to pass empty: pytest exits 5 when no test ran, which we turn
# into a failure instead of hiding it.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
"$VENV/bin/python" -m pytest "$@"
rc=$?
if [ "$rc" = 5 ]; then
  echo "run-pytest: no test ran; failing" >&2
  exit 1
fi
exit "$rc"
