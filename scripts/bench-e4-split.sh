#!/usr/bin/env bash
# Where E4's commit → client latency goes (docs/benchmarks.md, "Fan-out,
# round 3"): one `walcast load --clients 10000 --dealerships 1000 --writers 4
# --batch 10` run per offered rate, with the relay's /metrics scraped every
# 2 s (from 127.0.0.222: the load clients use up 127.0.0.1's per-address
# budget; the last scrape of the run is kept). One line per run:
#   commit→receive and commit→socket (the load report; socket = the kernel's
#   receive timestamp), and the relay's histograms: walsender (commit → the
#   walsender sent the Begin), intake (sent → the change stage decoded it),
#   queued (commit → the transaction's last frame queued).
#
#   scripts/bench-e4-split.sh BIN RATE [RATE ...]      (env DURATION, default 20)
set -euo pipefail
BIN=${1:?a walcast binary}
shift
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
for rate in "$@"; do
    "$BIN" load --clients 10000 --dealerships 1000 --rate "$rate" --writers 4 --batch 10 \
        --duration "${DURATION:-20}" --json-out "$OUT/run.json" >"$OUT/log" 2>&1 &
    load=$!
    addr=""
    while [ -z "$addr" ] && kill -0 "$load" 2>/dev/null; do
        addr=$(ss -ltnp | grep '"walcast"' | grep -o '127.0.0.1:[0-9]*' | head -1 || true)
        sleep 1
    done
    rm -f "$OUT/metrics"
    while kill -0 "$load" 2>/dev/null; do
        if curl -s --max-time 1 --interface 127.0.0.222 "http://$addr/metrics" >"$OUT/scrape" \
            && grep -q walcast_intake_latency_seconds_count "$OUT/scrape"; then
            cp "$OUT/scrape" "$OUT/metrics"
        fi
        sleep 2
    done
    wait "$load" || true
    python3 - "$rate" "$OUT/run.json" "$OUT/metrics" <<'PY'
import json, re, sys
rate, run, metrics = sys.argv[1:]
try:
    d = json.load(open(run))
    m = open(metrics).read()
except Exception as e:
    print(f"rate {rate}: no result ({e})"); sys.exit()
r = d["results"]
def hist(name):
    b = {le: int(v) for le, v in re.findall(name + r'_bucket\{le="([^"]+)"\} (\d+)', m)}
    total = float(re.search(name + r"_sum ([\d.e+-]+)", m).group(1))
    n = max(int(re.search(name + r"_count (\d+)", m).group(1)), 1)
    return f"mean {1000 * total / n:.1f} ms (≤10 ms {100 * b['0.01'] / n:.1f} %, ≤50 ms {100 * b['0.05'] / n:.1f} %)"
c, k = r["commit_to_receive"], r.get("commit_to_socket", {})
print(f"rate {rate}: writes/s {r['writes']['rate_per_sec']:.0f}, busy {r['cpu_breakdown']['machine_busy_pct']:.0f} %, "
      f"relay {r['relay_cpu']['cpu_secs_per_million_deliveries']:.2f} CPU-s/1M | "
      f"commit→receive p50 {c['p50_ms']:.1f} p99 {c['p99_ms']:.1f} | commit→socket p50 {k.get('p50_ms', 0):.1f} p99 {k.get('p99_ms', 0):.1f} | "
      f"walsender {hist('walcast_walsender_latency_seconds')} | intake {hist('walcast_intake_latency_seconds')} | "
      f"queued {hist('walcast_delivery_latency_seconds')} | {'PASS' if d.get('passed') else 'FAIL'}")
PY
done
