#!/usr/bin/env bash
# The TypeScript client's whole check from a clean checkout: install exactly
# what package-lock.json says, build with strict tsc, run every test against
# a real gateway binary. RUNGATE_BIN names the binary (default: the repo's
# target/debug/rungate); the browser test needs /usr/bin/chromium
# (RUNGATE_CHROMIUM overrides).
set -euo pipefail
cd "$(dirname "$0")"
: "${RUNGATE_BIN:=$(cd ../.. && pwd)/target/debug/rungate}"
export RUNGATE_BIN
if [ ! -x "$RUNGATE_BIN" ]; then
  echo "test.sh: no gateway binary at $RUNGATE_BIN (cargo build --bin rungate, or set RUNGATE_BIN)" >&2
  exit 1
fi
npm ci --no-audit --no-fund
npm run build
node scripts/gen-types.mjs --check
node --test --test-concurrency=2 --test-force-exit test/*.test.mjs
