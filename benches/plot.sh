#!/usr/bin/env bash
# Heartbeat round trip against load: scenario (a) of benches/scenarios.sh at
# several sizes (sessions heartbeating every second), gateway and baseline,
# drawn as benches/latency.svg (p50 and p99, log scale).
#
#   benches/plot.sh                       # SIZES="1000 2500 5000 10000 15000", RUNS=1
#   SIZES="1000 5000" RUNS=3 benches/plot.sh
#
# Environment: SIZES, RUNS, DURATION (default 10 s per run), OUT (the runs'
# reports), SVG (default benches/latency.svg), SKIP_BUILD, PLOT_ONLY=1 (draw
# from the reports already in OUT). Needs jq.
set -euo pipefail
cd "$(dirname "$0")/.."

sizes=${SIZES:-1000 2500 5000 10000 15000}
runs=${RUNS:-1}
out=${OUT:-target/loadgen/$(date -u +%Y%m%dT%H%M%SZ)-sweep}
svg=${SVG:-benches/latency.svg}
[ -n "${SKIP_BUILD:-}" ] || cargo build --release -q
mkdir -p "$out"

for n in $sizes; do
    [ -n "${PLOT_ONLY:-}" ] && break
    echo "sweep: $n sessions" >&2
    SKIP_BUILD=1 RUNS=$runs SESSIONS=$n DURATION=${DURATION:-10} OUT="$out/$n" \
        benches/scenarios.sh a >"$out/$n.txt" 2>>"$out/log"
done

median='def median: map(select(. != null)) | sort | if length == 0 then 0
  elif length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end;'
rows="$out/rows.tsv"
: >"$rows"
for n in $sizes; do
    row=$n
    for target in gateway baseline; do
        for q in p50_us p99_us; do
            row+=" $(jq -s "$median [.[] | .commands[\"runtime.heartbeat\"].$q] | median" "$out/$n/$target"-*.json)"
        done
    done
    echo "$row" >>"$rows"
done

awk -v date="$(date -u +%Y-%m-%d)" -v runs="$runs" '
function x(n) { return ml + (n - xmin) / (xmax - xmin) * pw }
function y(us,   lv) { lv = log(us / 1000) / log(10); return mt + ph - (lv - ymin) / (ymax - ymin) * ph }
function line(col, color, dash,   i, pts) {
    pts = ""
    for (i = 1; i <= rows; i++) pts = pts sprintf("%.1f,%.1f ", x(n[i]), y(v[i, col]))
    printf "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\" %s points=\"%s\"/>\n", color, dash, pts
    for (i = 1; i <= rows; i++) printf "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" fill=\"%s\"/>\n", x(n[i]), y(v[i, col]), color
}
{ rows++; n[rows] = $1; for (c = 2; c <= 5; c++) { v[rows, c] = ($c > 0 ? $c : 1) } }
END {
    W = 760; H = 440; ml = 70; mr = 190; mt = 40; mb = 60; pw = W - ml - mr; ph = H - mt - mb
    xmin = 0; xmax = n[rows]
    lo = 1e18; hi = 0
    for (i = 1; i <= rows; i++) for (c = 2; c <= 5; c++) { if (v[i, c] < lo) lo = v[i, c]; if (v[i, c] > hi) hi = v[i, c] }
    ymin = int(log(lo / 1000) / log(10) + 100) - 100; ymax = int(log(hi / 1000) / log(10) + 100) - 99
    if (ymax <= ymin) ymax = ymin + 1
    printf "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" font-size=\"12\">\n", W, H
    printf "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
    printf "<text x=\"%d\" y=\"22\" font-size=\"14\">Heartbeat round trip against load (sessions heartbeating every 1 s), %s, median of %s run(s)</text>\n", ml, date, runs
    for (d = ymin; d <= ymax; d++) {
        yy = mt + ph - (d - ymin) / (ymax - ymin) * ph
        printf "<line x1=\"%d\" x2=\"%d\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n", ml, ml + pw, yy, yy
        printf "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%g ms</text>\n", ml - 6, yy + 4, 10 ^ d
    }
    for (i = 1; i <= rows; i++) {
        printf "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%d\" y2=\"%d\" stroke=\"#ddd\"/>\n", x(n[i]), x(n[i]), mt, mt + ph
        printf "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%d</text>\n", x(n[i]), mt + ph + 18, n[i]
    }
    printf "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">sessions (= heartbeats per second)</text>\n", ml + pw / 2, H - 15
    printf "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"none\" stroke=\"#888\"/>\n", ml, mt, pw, ph
    line(3, "#c0392b", ""); line(2, "#c0392b", "stroke-dasharray=\"6 4\"")
    line(5, "#2471a3", ""); line(4, "#2471a3", "stroke-dasharray=\"6 4\"")
    lx = ml + pw + 15
    split("gateway p99|gateway p50|baseline p99|baseline p50", names, "|")
    split("#c0392b|#c0392b|#2471a3|#2471a3", colors, "|")
    for (k = 1; k <= 4; k++) {
        ly = mt + 10 + k * 20
        printf "<line x1=\"%d\" x2=\"%d\" y1=\"%d\" y2=\"%d\" stroke=\"%s\" stroke-width=\"2\" %s/>\n", lx, lx + 30, ly, ly, colors[k], (k % 2 == 0 ? "stroke-dasharray=\"6 4\"" : "")
        printf "<text x=\"%d\" y=\"%d\">%s</text>\n", lx + 38, ly + 4, names[k]
    }
    printf "</svg>\n"
}' "$rows" >"$svg"
echo "sessions gw_p50_us gw_p99_us bl_p50_us bl_p99_us" >&2
cat "$rows" >&2
echo "wrote $svg" >&2
