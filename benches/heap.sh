#!/usr/bin/env bash
# Heap profile of idle attached sessions, by owner (BENCHMARKS.md, "Idle
# sessions: where each KiB goes"):
#
#   benches/heap.sh            # 19,000 sessions (SESSIONS=N to change)
#
# Starts the release gateway under heaptrack (fresh data dir, port 0), attaches
# SESSIONS idle sessions with `rungate-loadgen run` the way `scenarios.sh b`
# does, stops the gateway, and prints heaptrack's heap at its peak (all
# sessions attached) per session, attributed to owners by benches/heap_owners.py.
# Needs heaptrack, heaptrack_print, c++filt, jq, python3. OUT (default
# target/heap/DATE) keeps the profile, the loadgen report and the table.
set -euo pipefail
cd "$(dirname "$0")/.."
sessions=${SESSIONS:-19000}
bin=${BIN:-target/release/rungate}
loadgen=${LOADGEN_BIN:-target/release/rungate-loadgen}
out=${OUT:-target/heap/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
heaptrack -o "$out/heaptrack" "$bin" serve --listen 127.0.0.1:0 --data-dir "$out/data" >"$out/stdout" 2>"$out/log" &
hpid=$!
trap 'kill "$hpid" 2>/dev/null || true' EXIT
# shellcheck source=benches/lib.sh
. benches/lib.sh
# heaptrack starts the gateway slowly: up to 40 s.
addr=$(wait_addr "$out/stdout" "$out/log" 40)
gpid=$(pgrep -f -- "--data-dir $out/data" | grep -v "^$hpid\$" | tail -1)
"$loadgen" run --url "ws://$addr" --auth-key-file "$out/data/auth.key" --json --gateway-pid "$gpid" \
    --sessions "$sessions" --sessions-per-socket 1 --duration 5 --settle 3 >"$out/loadgen.json" 2>"$out/loadgen.log"
kill -TERM "$gpid"
wait "$hpid" || true
heaptrack_print -f "$out"/heaptrack*.zst -p 0 -a 0 -T 0 --flamegraph-cost-type peak -F "$out/peak.stacks" >/dev/null
echo "RSS per session (loadgen): $(jq '.gateway.rss_per_session_bytes' "$out/loadgen.json") B; sessions attached: $(jq '.connections.sessions_attached' "$out/loadgen.json")"
python3 benches/heap_owners.py "$out/peak.stacks" "$sessions" | tee "$out/owners.md"
