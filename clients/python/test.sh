#!/usr/bin/env bash
# The Python client's checks, from a clean checkout: a fresh venv, the
# package with its test extras, mypy --strict, then pytest against a real
# gateway binary.
#
#   RUNGATE_BIN=/path/to/rungate clients/python/test.sh [pytest args...]
#
# RUNGATE_BIN defaults to <repo>/target/debug/rungate. PYTHON picks the
# interpreter (default python3, >= 3.10). The venv lives in
# clients/python/.venv (git-ignored) and is reused when it exists.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
export RUNGATE_BIN="${RUNGATE_BIN:-$repo/target/debug/rungate}"
if [[ ! -x "$RUNGATE_BIN" ]]; then
  echo "test.sh: no gateway binary at $RUNGATE_BIN (cargo build --bin rungate, or set RUNGATE_BIN)" >&2
  exit 1
fi
# Absolute, since the tests run from clients/python.
RUNGATE_BIN="$(cd "$(dirname "$RUNGATE_BIN")" && pwd)/$(basename "$RUNGATE_BIN")"
venv="$here/.venv"
if [[ ! -x "$venv/bin/python" ]]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$here[test]"
cd "$here"
"$venv/bin/python" -m mypy --strict src tests tools
exec "$venv/bin/python" -m pytest -q "$@"
