#!/usr/bin/env bash
# The end-to-end scenarios of BENCHMARKS.md, one command each:
#
#   benches/scenarios.sh a    # 10,000 sessions heartbeating every second: heartbeat round trip
#   benches/scenarios.sh b    # idle attached sessions (as many as descriptors allow): RSS per session
#   benches/scenarios.sh b5   # the same sockets with 5 sessions each (main run + 4 sub-runs)
#   benches/scenarios.sh c    # ingest: 100 runtimes, batches of 100 × 200 B as fast as acknowledged
#                             # (also: the disk's synced-write ceiling, measured before each
#                             # gateway run, and the log's write amplification from /proc/PID/io)
#   benches/scenarios.sh d    # fan-out: one run, 1,000 viewers: deliveries/s, publish-to-viewer latency (RATE=N batches/s paces the publisher;
#                             # WINDOW=N publishes in flight, default 2)
#   benches/scenarios.sh e    # resume: 1,000 viewers replay 10,000 events from offset 0: time to caught up
#
# Each run starts the release gateway (fresh data dir, port 0) and runs
# `rungate-loadgen run` against it, then does the same against
# `rungate-loadgen baseline` (the bare tokio-tungstenite echo/broadcast server), RUNS times
# (default 3), alternating; then prints the medians and the ratio
# gateway / baseline. Reports (JSON), server logs and the summary go to
# OUT (default target/loadgen/DATE-SCENARIO).
#
# Environment: RUNS, OUT, BIN (default target/release/rungate) and LOADGEN_BIN
# (default target/release/rungate-loadgen), both built
# unless SKIP_BUILD=1, SESSIONS / VIEWERS / DURATION override the
# scenario's size, LOADGEN_FLAGS adds loadgen flags, GATEWAY_FLAGS adds
# `rungate serve` flags, MAX_LOAD (e.g. 1.5) waits up to 3 minutes before
# each run for the 1-minute load average to drop below it.
# Needs jq (and python3 for c's disk ceiling).
#
# Scenario c also measures, in every gateway run: the disk's synced-write
# ceiling just before it (python3 appending 2 MiB blocks of random bytes
# to a file under OUT, each followed by fdatasync, for 2 s or 512 MiB),
# given as bytes/s and as events/s of the scenario's event size; and the
# gateway's write_bytes from /proc/PID/io over the loadgen run, divided by
# the event bytes accepted (the log's write amplification; 0 with
# `--store memory`). Both are added to the run's JSON under .disk.
#
# Two gateway nodes over one Redis (c, d and e only):
#
#   NODES=2 STORE=redis benches/scenarios.sh c|d|e
#
# Each gateway run then starts a redis-server of its own (REDIS_SERVER,
# default redis-server; a free loopback port; its files under OUT) and two
# gateways, A and B, with `--store redis://127.0.0.1:PORT/0` and one shared
# `--auth-key-file`. Runtimes attach and publish on A; viewers connect to
# B (`loadgen --viewer-url`), so every delivery crosses Redis. Redis runs
# with no RDB snapshots (`--save ""`) and no AOF rewrite
# (`--auto-aof-rewrite-percentage 0`), so no fork lands in a measurement,
# and with the append-only file fsync'd as REDIS_FSYNC says: everysec
# (default; what a deployment would run), always (fsync before every
# reply), or off (no AOF: nothing on disk). Besides the single-node
# figures the summary gives node B's CPU, Redis's CPU (utime + stime of
# the redis-server process from /proc over the same interval as the
# gateway's: `loadgen --watch-pid`), and Redis CPU per event: ms of Redis
# CPU per 1,000 events accepted (c, d) or delivered (e), which is the same
# number as Redis CPU-milliseconds per second per 1,000 events/s. The
# baseline is still the one bare server (it has no nodes): compare the
# two-node figures with a single-node run of the same scenario as well.
set -euo pipefail
cd "$(dirname "$0")/.."

scenario=${1:?usage: benches/scenarios.sh a|b|b5|c|d|e}
runs=${RUNS:-3}
bin=${BIN:-target/release/rungate}
loadgen=${LOADGEN_BIN:-target/release/rungate-loadgen}
nodes=${NODES:-1}
store=${STORE:-embedded}
case "$nodes/$store" in
1/embedded | 1/redis) ;;
2/redis)
    case $scenario in c | d | e) ;; *)
        echo "NODES=2 runs scenarios c, d and e (runtimes on node A, viewers on node B)" >&2
        exit 2
        ;;
    esac
    ;;
*)
    echo "NODES=$nodes STORE=$store: use NODES=1 (STORE=embedded or redis) or NODES=2 STORE=redis" >&2
    exit 2
    ;;
esac
suffix=
[ "$store" = redis ] && suffix="-${nodes}node-redis"
out=${OUT:-target/loadgen/$(date -u +%Y%m%dT%H%M%SZ)-$scenario$suffix}
command -v jq >/dev/null || { echo "scenarios.sh needs jq (apt-get install jq)" >&2; exit 1; }
redis_server=${REDIS_SERVER:-redis-server}
redis_fsync=${REDIS_FSYNC:-everysec}
redis_flags=(--bind 127.0.0.1 --save "" --auto-aof-rewrite-percentage 0)
case $redis_fsync in
everysec | always) redis_flags+=(--appendonly yes --appendfsync "$redis_fsync") ;;
off) redis_flags+=(--appendonly no) ;;
*)
    echo "REDIS_FSYNC=$redis_fsync: use everysec, always or off" >&2
    exit 2
    ;;
esac
if [ "$store" = redis ]; then
    command -v "$redis_server" >/dev/null || { echo "STORE=redis needs $redis_server (apt-get install redis-server)" >&2; exit 1; }
fi
[ -n "${SKIP_BUILD:-}" ] || cargo build --release -q -p rungate -p rungate-loadgen
mkdir -p "$out"

# Per scenario: what it is, server flags, loadgen flags, metrics to
# summarize as "label|jq path" (lower is better unless the label says /s).
gw_flags=() bl_flags=() lg_flags=() metrics=() measure_disk= event_bytes=
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
    event_bytes=200 measure_disk=1
    metrics=("accepted events/s|.events.accepted_per_sec"
        "publish p50 µs|.commands[\"events.publish\"].p50_us"
        "publish p99 µs|.commands[\"events.publish\"].p99_us"
        "server CPU % (traffic)|.gateway.cpu_percent"
        "loadgen CPU % (traffic)|.loadgen.cpu_percent"
        "disk ceiling MB/s|.disk.ceiling_bytes_per_sec | if . == null then null else . / 1e6 end"
        "disk ceiling events/s|.disk.ceiling_events_per_sec"
        "accepted / disk ceiling|.disk.of_ceiling"
        "write amplification ×|.disk.amplification"
        "errors|[.errors[]] | add // 0")
    ;;
d)
    # RATE (batches/s) paces the publisher: with viewers on another node
    # nothing slows it to what they can take, so "max" only measures gaps.
    pace=${RATE:-max}
    if [ "$pace" = max ]; then pace_text="as fast as acknowledged"; else pace_text="at $pace batches/s"; fi
    what="one run, ${VIEWERS:-1000} viewers, one publisher of 100 × 200 B batches $pace_text for ${DURATION:-10} s"
    lg_flags=(--sessions 1 --viewers "${VIEWERS:-1000}" --rate "$pace" --window "${WINDOW:-2}" --batch 100 --event-bytes 200 --duration "${DURATION:-10}")
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
if [ "$nodes" = 2 ]; then
    what="$what — 2 gateway nodes over one Redis (AOF fsync $redis_fsync): runtimes on A, viewers on B"
    # Deliveries B owes: non-zero when node B did not get every event
    # from A (a replay that "caught up" with an empty stream included).
    [ "$scenario" != c ] && metrics+=("deliveries short (B)|.events.deliveries_expected - .events.events_delivered")
    metrics+=("node B CPU % (traffic)|.watched.gateway_b.cpu_percent"
        "Redis CPU % (traffic)|.watched.redis.cpu_percent")
    if [ "$scenario" = e ]; then
        metrics+=("Redis CPU ms/1k delivered|.watched.redis.cpu_secs as \$c | .events.events_delivered as \$n | if \$c == null or \$n == 0 then null else \$c * 1e6 / \$n end")
    else
        metrics+=("Redis CPU ms/1k events|.watched.redis.cpu_secs as \$c | .events.events_accepted as \$n | if \$c == null or \$n == 0 then null else \$c * 1e6 / \$n end")
    fi
elif [ "$store" = redis ]; then
    what="$what — on Redis (AOF fsync $redis_fsync)"
    metrics+=("Redis CPU % (traffic)|.watched.redis.cpu_percent")
fi

# The processes of the current run: the server (node A), node B, Redis.
pid= pid_b= redis_pid=
cleanup() {
    for p in $pid $pid_b $redis_pid; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

wait_quiet() {
    [ -n "${MAX_LOAD:-}" ] || return 0
    for _ in $(seq 180); do
        awk -v max="$MAX_LOAD" '{ exit !($1 < max) }' /proc/loadavg && return 0
        sleep 1
    done
}

# wait_addr STDOUT LOG: the address a server printed ("listening on ADDR").
# shellcheck source=benches/lib.sh
. benches/lib.sh

# disk_ceiling: bytes/s this disk takes as 2 MiB appends each followed by
# fdatasync (the most a synced log could reach), into a file under OUT.
disk_ceiling() {
    python3 - "$out/disk-ceiling.tmp" <<'PY'
import os, sys, time
path = sys.argv[1]
block = os.urandom(2 << 20)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
n, t0 = 0, time.monotonic()
while time.monotonic() - t0 < 2.0 and n < (512 << 20):
    n += os.write(fd, block)
    os.fdatasync(fd)
dt = time.monotonic() - t0
os.close(fd)
os.unlink(path)
print(int(n / dt))
PY
}

write_bytes() { awk '/^write_bytes/ { print $2 }' "/proc/$1/io"; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_redis RUN: a fresh redis-server on a free port; sets redis_pid, redis_url.
start_redis() {
    local run=$1 dir="$out/redis-$run" port
    mkdir -p "$dir"
    port=$(free_port)
    "$redis_server" --port "$port" --dir "$dir" "${redis_flags[@]}" >"$out/redis-$run.log" 2>&1 &
    redis_pid=$!
    for _ in $(seq 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            redis_url="redis://127.0.0.1:$port/0"
            return 0
        fi
        sleep 0.05
    done
    echo "redis-server did not start; see $out/redis-$run.log" >&2
    exit 1
}

# start_server gateway|baseline RUN: sets pid, url, auth, node_flags (and
# pid_b, redis_pid on Redis).
start_server() {
    local target=$1 run=$2 stdout="$out/$1-$2.stdout"
    node_flags=()
    if [ "$target" = gateway ]; then
        local dir="$out/gateway-$run-data" store_flags=()
        auth=(--auth-key-file "$dir/auth.key")
        if [ "$store" = redis ]; then
            start_redis "$run"
            auth=(--auth-key-file "$out/gateway-$run-auth.key")
            store_flags=(--store "$redis_url" "${auth[@]}")
            node_flags=(--watch-pid "redis=$redis_pid")
        fi
        "$bin" serve --listen 127.0.0.1:0 --data-dir "$dir" "${store_flags[@]}" "${gw_flags[@]}" >"$stdout" 2>"$out/$target-$run.log" &
        pid=$!
        url="ws://$(wait_addr "$stdout" "$out/$target-$run.log")"
        if [ "$nodes" = 2 ]; then
            # Node B starts once A has created the shared key file.
            "$bin" serve --listen 127.0.0.1:0 --data-dir "$out/gateway-$run-data-b" "${store_flags[@]}" "${gw_flags[@]}" \
                >"$out/$target-$run-b.stdout" 2>"$out/$target-$run-b.log" &
            pid_b=$!
            local url_b
            url_b="ws://$(wait_addr "$out/$target-$run-b.stdout" "$out/$target-$run-b.log")"
            node_flags+=(--viewer-url "$url_b" --watch-pid "gateway_b=$pid_b")
        fi
    else
        "$loadgen" baseline --listen 127.0.0.1:0 "${bl_flags[@]}" >"$stdout" 2>"$out/$target-$run.log" &
        pid=$!
        auth=(--token unchecked --viewer-token unchecked)
        url="ws://$(wait_addr "$stdout" "$out/$target-$run.log")"
    fi
}

stop_server() {
    for p in $pid $pid_b; do kill -TERM "$p" 2>/dev/null || true; done
    for p in $pid $pid_b; do wait "$p" 2>/dev/null || true; done
    if [ -n "$redis_pid" ]; then
        kill -TERM "$redis_pid" 2>/dev/null || true
        wait "$redis_pid" 2>/dev/null || true
    fi
    pid= pid_b= redis_pid=
}

echo "scenario $scenario: $what; $runs runs each; results in $out" >&2
{
    echo "scenario $scenario: $what"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr), $(rustc --version 2>/dev/null || echo rustc ?)"
    echo "gateway: $bin serve --listen 127.0.0.1:0 --data-dir DIR ${gw_flags[*]}"
    echo "baseline: $loadgen baseline --listen 127.0.0.1:0 ${bl_flags[*]}"
    echo "loadgen: $loadgen run --url URL --json --gateway-pid PID ${lg_flags[*]}"
    if [ "$store" = redis ]; then
        echo "store: $nodes gateway node(s) with --store redis://127.0.0.1:PORT/0 --auth-key-file (shared)"
        echo "redis: $("$redis_server" --version | head -1)"
        echo "redis: $redis_server --port PORT --dir DIR $(printf '%q ' "${redis_flags[@]}")"
        [ "$nodes" = 2 ] && echo "loadgen (2 nodes): --url ws://A --viewer-url ws://B --watch-pid gateway_b=PID_B --watch-pid redis=PID_REDIS"
        [ "$nodes" = 1 ] && echo "loadgen (Redis): --watch-pid redis=PID_REDIS"
    fi
} >"$out/summary.txt"

for run in $(seq "$runs"); do
    for target in gateway baseline; do
        wait_quiet
        load=$(cut -d' ' -f1-3 /proc/loadavg)
        ceiling=
        [ -n "$measure_disk" ] && [ "$target" = gateway ] && ceiling=$(disk_ceiling)
        start_server "$target" "$run"
        echo "run $run/$runs $target (load $load)" >&2
        [ -n "$measure_disk" ] && written_before=$(write_bytes "$pid")
        "$loadgen" run --url "$url" "${auth[@]}" --json --gateway-pid "$pid" --label "$target" \
            "${node_flags[@]}" "${lg_flags[@]}" >"$out/$target-$run.json"
        if [ -n "$measure_disk" ]; then
            written=$(($(write_bytes "$pid") - written_before))
            jq --argjson w "$written" --argjson c "${ceiling:-null}" --argjson eb "$event_bytes" \
                '.disk = {write_bytes: $w, event_bytes: $eb, ceiling_bytes_per_sec: $c,
                  ceiling_events_per_sec: (if $c == null then null else $c / $eb end),
                  of_ceiling: (if $c == null then null else .events.accepted_per_sec * $eb / $c end),
                  amplification: (if .events.events_accepted == 0 then null else $w / (.events.events_accepted * $eb) end)}' \
                "$out/$target-$run.json" >"$out/$target-$run.json.tmp"
            mv "$out/$target-$run.json.tmp" "$out/$target-$run.json"
        fi
        stop_server
        echo "run $run $target: load average before $load" >>"$out/summary.txt"
        rm -rf "$out/gateway-$run-data" "$out/gateway-$run-data-b" "$out/redis-$run"
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
