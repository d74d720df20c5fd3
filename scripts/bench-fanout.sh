#!/usr/bin/env bash
# Fan-out CPU and latency (issue 20's E2 and E4), two walcast binaries side by
# side on one machine, alternating (docs/benchmarks.md "Fan-out CPU and
# latency"). Each run is `walcast load --clients 10000 --dealerships 1000`
# with the binary's own relay and load generator; one line per run.
#
#   scripts/bench-fanout.sh [ROUNDS] BIN_A [BIN_B]
#
# env CASES picks the cases (default "e2-batch e2-single e4"); DURATION
# scales them (seconds, default 20 / 10 for e2-batch). writes/s and lag99ms
# (the writers' schedule lag, p99) show whether a run reached the offered
# rate: a load generator short of CPU issues its writes late.
set -euo pipefail
ROUNDS=${1:-2}
A=${2:?a walcast binary}
B=${3:-}
CASES=${CASES:-e2-batch e2-single e4}
OUT=$(mktemp -d)
flags() {
    case "$1" in
    e2-batch) echo "--rate 10000 --writers 4 --batch 100 --duration ${DURATION:-10}" ;;
    e2-single) echo "--rate 1000 --writers 8 --duration ${DURATION:-20}" ;;
    e4) echo "--rate 5000 --writers 4 --batch 10 --duration ${DURATION:-20}" ;;
    e4-single) echo "--rate 5000 --writers 8 --duration ${DURATION:-20}" ;;
    *) echo "unknown case $1" >&2; exit 2 ;;
    esac
}
printf '%-9s %-10s %-5s %8s %8s %10s %8s %8s %8s %8s %9s %9s %10s %6s %s\n' case binary round writes/s lag99ms deliv/s p50ms p95ms p99ms sock99ms relayCPU/M relay_vcs/M loadgen/M busy% result
for round in $(seq 1 "$ROUNDS"); do
    for case in $CASES; do
        bins=("$A")
        [ -n "$B" ] && bins+=("$B")
        # Alternate which binary goes first.
        if [ -n "$B" ] && [ $((round % 2)) -eq 0 ]; then bins=("$B" "$A"); fi
        for bin in "${bins[@]}"; do
            json="$OUT/$case-$(basename "$bin")-$round.json"
            # shellcheck disable=SC2046
            "$bin" load --clients 10000 --dealerships 1000 $(flags "$case") --json-out "$json" >"$OUT/log" 2>&1 || true
            python3 - "$json" "$case" "$(basename "$bin")" "$round" <<'EOF'
import json, sys
path, case, name, rnd = sys.argv[1:]
try:
    d = json.load(open(path))
except Exception as e:
    print(f"{case:<9} {name:<10} {rnd:<5} no result ({e})"); sys.exit()
r = d["results"]
c = r.get("commit_to_receive", {})
k = r.get("commit_to_socket", {})
cpu = r.get("relay_cpu", {})
br = r.get("cpu_breakdown", {})
w = r.get("writes", {})
lag = r.get("schedule_lag", {})
print(f'{case:<9} {name:<10} {rnd:<5} {w.get("rate_per_sec", 0):>8.0f} {lag.get("p99_ms", 0):>8.1f} {r["deliveries"]["per_sec"]:>10.0f} {c.get("p50_ms", 0):>8.1f} {c.get("p95_ms", 0):>8.1f} {c.get("p99_ms", 0):>8.1f} {k.get("p99_ms", 0):>8.1f} '
      f'{cpu.get("cpu_secs_per_million_deliveries", 0):>9.2f} {cpu.get("voluntary_switches_per_million_deliveries", 0):>9.0f} '
      f'{br.get("load_generator_cpu_secs_per_million_deliveries", 0):>10.2f} {br.get("machine_busy_pct", 0):>6.0f} {"PASS" if d.get("passed") else "FAIL"}')
EOF
        done
    done
done
rm -rf "$OUT"
