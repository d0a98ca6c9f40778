#!/usr/bin/env bash
# Fuzzes the frame decoder and dispatcher (fuzz_targets/dispatch.rs) for a
# bounded time. Not run in CI: it needs libFuzzer's unstable compiler flags
# and a core for minutes.
#
#   fuzz/run.sh [SECONDS]        default 600
#
# Environment: FUZZ_SANITIZER (address by default; `none` if the sanitizer
# runtime is missing), FUZZ_MAX_LEN (bytes per input, default 8192).
#
# The corpus (fuzz/corpus/dispatch, not committed) is seeded from
# fuzz/seeds.txt: each conversation as one input and each of its messages
# alone. Crashes land in fuzz/artifacts/dispatch/ (not committed either);
# replay one with `RUSTC_BOOTSTRAP=1 cargo fuzz run dispatch <file>`.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-600}"
sanitizer="${FUZZ_SANITIZER:-address}"
max_len="${FUZZ_MAX_LEN:-8192}"

command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked

corpus=fuzz/corpus/dispatch
mkdir -p "$corpus"
# Conversations are blank-line separated blocks; 0xFF separates messages
# within one input (see the target's doc comment).
python3 - "$corpus" <<'PY'
import hashlib, pathlib, sys
out = pathlib.Path(sys.argv[1])
lines = [l for l in pathlib.Path("fuzz/seeds.txt").read_text().splitlines() if not l.startswith("#")]
blocks, cur = [], []
for l in lines + [""]:
    if l.strip():
        cur.append(l.encode())
    elif cur:
        blocks.append(cur); cur = []
seeds = [b"\xff".join(b) for b in blocks] + [l for b in blocks for l in b]
for s in seeds:
    (out / ("seed-" + hashlib.sha1(s).hexdigest()[:16])).write_bytes(s)
print(f"{len(seeds)} seeds in {out}")
PY

# Only the stable toolchain is guaranteed here: RUSTC_BOOTSTRAP lets it
# take the -Z flags cargo-fuzz passes (a nightly needs no help).
export RUSTC_BOOTSTRAP=1
start=$(date +%s)
set +e
cargo fuzz run --sanitizer "$sanitizer" dispatch "$corpus" -- \
  -max_total_time="$seconds" \
  -max_len="$max_len" \
  -timeout=10 \
  -rss_limit_mb=2048 \
  -dict=fuzz/dispatch.dict \
  -print_final_stats=1
status=$?
set -e
echo "fuzz/run.sh: ran $(( $(date +%s) - start )) s (including the build), exit status $status"
exit $status
