#!/usr/bin/env bash
# Prints the median (and its 95% interval) of every criterion bench whose
# results are under target/criterion, one line each. Run after
# `cargo bench --bench stream`.
set -euo pipefail
cd "$(dirname "$0")/.."
for est in target/criterion/*/*/new/estimates.json; do
  name=${est#target/criterion/}
  name=${name%/new/estimates.json}
  python3 - "$est" "$name" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["median"]
ci = m["confidence_interval"]
print(f"{sys.argv[2]:<52} {m['point_estimate']/1000:10.2f} µs  [{ci['lower_bound']/1000:.2f} – {ci['upper_bound']/1000:.2f}]")
PY
done
