#!/usr/bin/env bash
# The end-to-end scenarios of BENCHMARKS.md, one command each:
#
#   benches/scenarios.sh a    # 10,000 sessions heartbeating every second: heartbeat round trip
#   benches/scenarios.sh b    # idle attached sessions (as many as descriptors allow): RSS per session
#   benches/scenarios.sh b5   # the same sockets with 5 sessions each (main run + 4 sub-runs)
#   benches/scenarios.sh c    # ingest: 100 runtimes, batches of 100 × 200 B as fast as acknowledged
#   benches/scenarios.sh d    # fan-out: one run, 1,000 viewers: deliveries/s, publish-to-viewer latency
#   benches/scenarios.sh e    # resume: 1,000 viewers replay 10,000 events from offset 0: time to caught up
#
# Each run starts the release gateway (fresh data dir, port 0) and runs
# `rungate loadgen` against it, then does the same against `rungate
# baseline` (the bare tokio-tungstenite echo/broadcast server), RUNS times
# (default 3), alternating; then prints the medians and the ratio
# gateway / baseline. Reports (JSON), server logs and the summary go to
# OUT (default target/loadgen/DATE-SCENARIO).
#
# Environment: RUNS, OUT, BIN (default target/release/rungate; built
# unless SKIP_BUILD=1), SESSIONS / VIEWERS / DURATION override the
# scenario's size, LOADGEN_FLAGS adds loadgen flags, GATEWAY_FLAGS adds
# `rungate serve` flags, MAX_LOAD (e.g. 1.5) waits up to 3 minutes before
# each run for the 1-minute load average to drop below it.
# Needs jq.
set -euo pipefail
cd "$(dirname "$0")/.."

scenario=${1:?usage: benches/scenarios.sh a|b|b5|c|d|e}
runs=${RUNS:-3}
bin=${BIN:-target/release/rungate}
out=${OUT:-target/loadgen/$(date -u +%Y%m%dT%H%M%SZ)-$scenario}
command -v jq >/dev/null || { echo "scenarios.sh needs jq (apt-get install jq)" >&2; exit 1; }
[ -n "${SKIP_BUILD:-}" ] || cargo build --release -q
mkdir -p "$out"

# Per scenario: what it is, server flags, loadgen flags, metrics to
# summarize as "label|jq path" (lower is better unless the label says /s).
gw_flags=() bl_flags=() lg_flags=() metrics=()
case $scenario in
a)
    what="${SESSIONS:-10000} sessions heartbeating every 1 s for ${DURATION:-20} s"
    gw_flags=(--heartbeat-interval-ms 1000)
    bl_flags=(--heartbeat-interval-ms 1000)
    lg_flags=(--sessions "${SESSIONS:-10000}" --duration "${DURATION:-20}")
    metrics=("heartbeat p50 µs|.commands[\"runtime.heartbeat\"].p50_us"
        "heartbeat p99 µs|.commands[\"runtime.heartbeat\"].p99_us"
        "heartbeat p99.9 µs|.commands[\"runtime.heartbeat\"].p999_us"
        "heartbeats answered|.commands[\"runtime.heartbeat\"].count"
        "attach p99 µs|.commands[\"runtime.attach\"].p99_us"
        "attached sessions/s|.connections.sessions_per_sec"
        "server RSS MiB|.gateway.rss_end_kib / 1024"
        "server CPU % (traffic)|.gateway.cpu_percent"
        "errors|[.errors[]] | add // 0")
    ;;
b | b5)
    per=1
    [ "$scenario" = b5 ] && per=5
    sockets=${SESSIONS:-19000}
    what="$((sockets * per)) idle sessions on $sockets sockets ($per per socket)"
    lg_flags=(--sessions "$((sockets * per))" --sessions-per-socket "$per" --duration "${DURATION:-5}" --settle 3)
    metrics=("server RSS per session B|.gateway.rss_per_session_bytes"
        "server RSS attached MiB|.gateway.rss_attached_kib / 1024"
        "server RSS before MiB|.gateway.rss_before_kib / 1024"
        "attached sessions/s|.connections.sessions_per_sec"
        "sessions attached|.connections.sessions_attached"
        "handshake p99 µs|.connections.handshake.p99_us"
        "loadgen RSS MiB|.loadgen.rss_end_kib / 1024"
        "errors|[.errors[]] | add // 0")
    ;;
c)
    what="${SESSIONS:-100} runtimes publishing 100 × 200 B batches as fast as acknowledged for ${DURATION:-10} s"
    lg_flags=(--sessions "${SESSIONS:-100}" --rate max --batch 100 --event-bytes 200 --duration "${DURATION:-10}")
    metrics=("accepted events/s|.events.accepted_per_sec"
        "publish p50 µs|.commands[\"events.publish\"].p50_us"
        "publish p99 µs|.commands[\"events.publish\"].p99_us"
        "server CPU % (traffic)|.gateway.cpu_percent"
        "loadgen CPU % (traffic)|.loadgen.cpu_percent"
        "errors|[.errors[]] | add // 0")
    ;;
d)
    what="one run, ${VIEWERS:-1000} viewers, one publisher of 100 × 200 B batches as fast as acknowledged for ${DURATION:-10} s"
    lg_flags=(--sessions 1 --viewers "${VIEWERS:-1000}" --rate max --window 2 --batch 100 --event-bytes 200 --duration "${DURATION:-10}")
    metrics=("deliveries/s|.events.delivered_per_sec"
        "accepted events/s|.events.accepted_per_sec"
        "publish→viewer p50 µs|.events.publish_to_viewer.p50_us"
        "publish→viewer p99 µs|.events.publish_to_viewer.p99_us"
        "gaps|.events.gaps"
        "events missed|.events.events_missed"
        "server CPU % (traffic)|.gateway.cpu_percent"
        "loadgen CPU % (traffic)|.loadgen.cpu_percent"
        "errors|[.errors[]] | add // 0")
    ;;
e)
    what="${VIEWERS:-1000} viewers each replaying 10,000 events (100 × 200 B batches) from offset 0"
    lg_flags=(--sessions 1 --prefill 10000 --batch 100 --event-bytes 200 --viewers "${VIEWERS:-1000}" --from 0 --duration 300)
    metrics=("all caught up s|.replay.all_caught_up_secs"
        "per viewer p50 µs|.replay.per_viewer.p50_us"
        "per viewer p99 µs|.replay.per_viewer.p99_us"
        "deliveries/s|.events.delivered_per_sec"
        "follows caught up|.replay.follows_caught_up"
        "server CPU % (traffic)|.gateway.cpu_percent"
        "errors|[.errors[]] | add // 0")
    ;;
*)
    echo "unknown scenario $scenario (a, b, b5, c, d, e)" >&2
    exit 2
    ;;
esac
# shellcheck disable=SC2206
gw_flags+=(${GATEWAY_FLAGS:-})
# shellcheck disable=SC2206
lg_flags+=(${LOADGEN_FLAGS:-})

pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; }
trap cleanup EXIT

wait_quiet() {
    [ -n "${MAX_LOAD:-}" ] || return 0
    for _ in $(seq 180); do
        awk -v max="$MAX_LOAD" '{ exit !($1 < max) }' /proc/loadavg && return 0
        sleep 1
    done
}

# start_server gateway|baseline RUN: sets pid, url, auth.
start_server() {
    local target=$1 run=$2 stdout="$out/$1-$2.stdout"
    if [ "$target" = gateway ]; then
        local dir="$out/gateway-$run-data"
        "$bin" serve --listen 127.0.0.1:0 --data-dir "$dir" "${gw_flags[@]}" >"$stdout" 2>"$out/$target-$run.log" &
        auth=(--auth-key-file "$dir/auth.key")
    else
        "$bin" baseline --listen 127.0.0.1:0 "${bl_flags[@]}" >"$stdout" 2>"$out/$target-$run.log" &
        auth=(--token unchecked --viewer-token unchecked)
    fi
    pid=$!
    local addr=
    for _ in $(seq 200); do
        addr=$(sed -n 's/^listening on //p' "$stdout")
        [ -n "$addr" ] && break
        sleep 0.05
    done
    [ -n "$addr" ] || { echo "$target did not start; see $out/$target-$run.log" >&2; exit 1; }
    url="ws://$addr"
}

stop_server() {
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    pid=
}

echo "scenario $scenario: $what; $runs runs each; results in $out" >&2
{
    echo "scenario $scenario: $what"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr), $(rustc --version 2>/dev/null || echo rustc ?)"
    echo "gateway: $bin serve --listen 127.0.0.1:0 --data-dir DIR ${gw_flags[*]}"
    echo "baseline: $bin baseline --listen 127.0.0.1:0 ${bl_flags[*]}"
    echo "loadgen: $bin loadgen --url URL --json --gateway-pid PID ${lg_flags[*]}"
} >"$out/summary.txt"

for run in $(seq "$runs"); do
    for target in gateway baseline; do
        wait_quiet
        load=$(cut -d' ' -f1-3 /proc/loadavg)
        start_server "$target" "$run"
        echo "run $run/$runs $target (load $load)" >&2
        "$bin" loadgen --url "$url" "${auth[@]}" --json --gateway-pid "$pid" --label "$target" \
            "${lg_flags[@]}" >"$out/$target-$run.json"
        stop_server
        echo "run $run $target: load average before $load" >>"$out/summary.txt"
        rm -rf "$out/gateway-$run-data"
    done
done

median='def median: map(select(. != null)) | sort | if length == 0 then null
  elif length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end;'
fmt() { awk -v v="$1" 'BEGIN { if (v == "null" || v == "") print "—"; else if (v == int(v)) printf "%d", v; else printf "%.2f", v }'; }
{
    printf '\n%-28s %14s %14s %8s   (medians of %s runs; each run: gateway / baseline)\n' metric gateway baseline ratio "$runs"
    for m in "${metrics[@]}"; do
        label=${m%%|*} path=${m#*|}
        g=$(jq -s "$median [.[] | ($path)] | median" "$out"/gateway-*.json)
        b=$(jq -s "$median [.[] | ($path)] | median" "$out"/baseline-*.json)
        each=$(for r in $(seq "$runs"); do
            printf '%s/%s ' "$(fmt "$(jq "$path" "$out/gateway-$r.json")")" "$(fmt "$(jq "$path" "$out/baseline-$r.json")")"
        done)
        ratio=$(awk -v g="$g" -v b="$b" 'BEGIN { if (g == "null" || b == "null" || b == 0) print "—"; else printf "%.2f", g / b }')
        printf '%-28s %14s %14s %8s   %s\n' "$label" "$(fmt "$g")" "$(fmt "$b")" "$ratio" "$each"
    done
} | tee -a "$out/summary.txt"
