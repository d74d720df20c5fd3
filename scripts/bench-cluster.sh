#!/usr/bin/env bash
# Commit→client latency and relay CPU, one node vs a JetStream cluster (one
# source + one edge), side by side on one machine, alternating
# (docs/benchmarks.md "Scale-out"). Needs a release build, PostgreSQL server
# binaries (PG_BINDIR or Debian's) and tests/clients/.venv/bin/nats-server
# (scripts/test-deps.sh).
#
#   scripts/bench-cluster.sh [ROUNDS] [RATE] [DURATION] [CLIENTS]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
RATE=${2:-1000}
DURATION=${3:-20}
CLIENTS=${4:-1000}
BIN=target/release/walcast
PG_BINDIR=${PG_BINDIR:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
NATS=tests/clients/.venv/bin/nats-server
WORK=$(mktemp -d)
PGPORT=$((20000 + RANDOM % 10000))
NATSPORT=$((PGPORT + 1))
SECRET=bench-secret-bench-secret-bench-secret
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    "$PG_BINDIR/pg_ctl" -D "$WORK/pg" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

"$PG_BINDIR/initdb" -D "$WORK/pg" -U postgres --auth=trust >/dev/null
cat >>"$WORK/pg/postgresql.conf" <<EOF
port = $PGPORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
wal_level = logical
max_replication_slots = 20
max_wal_senders = 20
fsync = off
EOF
"$PG_BINDIR/pg_ctl" -D "$WORK/pg" -l "$WORK/pg.log" start >/dev/null
DB="postgres://postgres@127.0.0.1:$PGPORT/postgres"
$BIN migrate --database-url "$DB" >/dev/null
"$NATS" -a 127.0.0.1 -p "$NATSPORT" -js -sd "$WORK/nats" >/dev/null 2>&1 &
PIDS+=($!)
sleep 1

serve() { # port slot extra...
    local port=$1 slot=$2
    shift 2
    $BIN serve --database-url "$DB" --jwt-secret "$SECRET" --host 127.0.0.1 --port "$port" --slot "$slot" \
        --spill-dir "$WORK/spill-$slot-$port" "$@" >"$WORK/serve-$slot-$port.log" 2>&1 &
    PIDS+=($!)
    echo $!
}
wait_ready() {
    for _ in $(seq 1 300); do
        curl -fs "http://127.0.0.1:$1/ready" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "port $1 not ready" >&2
    return 1
}
load() { # port label
    echo "== $2 (round $round)"
    $BIN load --relay-url "ws://127.0.0.1:$1/realtime/v1/websocket" --database-url "$DB" --jwt-secret "$SECRET" \
        --clients "$CLIENTS" --rate "$RATE" --duration "$DURATION" --seed "$round" 2>&1 | grep -v '^{' || true
}
drop_slot() {
    psql -h 127.0.0.1 -p "$PGPORT" -U postgres -qAt -c \
        "select pg_drop_replication_slot('$1') from pg_replication_slots where slot_name = '$1'" >/dev/null 2>&1 || true
}

for round in $(seq 1 "$ROUNDS"); do
    one=$(serve 4100 "one_$round")
    wait_ready 4100
    load 4100 "one node"
    kill "$one"; wait "$one" 2>/dev/null || true
    drop_slot "one_$round"

    src=$(serve 4101 "clu_$round" --nats-url "nats://127.0.0.1:$NATSPORT" --node-role source)
    wait_ready 4101
    edge=$(serve 4102 "clu_$round" --nats-url "nats://127.0.0.1:$NATSPORT" --node-role edge)
    wait_ready 4102
    load 4102 "JetStream: source + edge"
    kill "$edge" "$src"; wait "$edge" "$src" 2>/dev/null || true
    drop_slot "clu_$round"
done
