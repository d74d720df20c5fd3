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
    pkill -f -- "--spill-dir $WORK/" 2>/dev/null || true
    "${AS[@]}" "$PG_BINDIR/pg_ctl" -D "$WORK/pg" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# PostgreSQL refuses to run as root: then it runs as the `postgres` user.
AS=()
if [ "$(id -u)" = 0 ]; then
    AS=(runuser -u postgres --)
    mkdir -p "$WORK/pg"
    chown postgres "$WORK" "$WORK/pg"
fi
"${AS[@]}" "$PG_BINDIR/initdb" -D "$WORK/pg" -U postgres --auth=trust >/dev/null
"${AS[@]}" tee -a "$WORK/pg/postgresql.conf" >/dev/null <<EOF
port = $PGPORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
wal_level = logical
max_replication_slots = 20
max_wal_senders = 20
fsync = off
EOF
"${AS[@]}" "$PG_BINDIR/pg_ctl" -D "$WORK/pg" -l "$WORK/pg/server.log" start >/dev/null
DB="postgres://postgres@127.0.0.1:$PGPORT/postgres"
$BIN migrate --database-url "$DB" >/dev/null
"$NATS" -a 127.0.0.1 -p "$NATSPORT" -js -sd "$WORK/nats" >/dev/null 2>&1 &
NATS_PID=$!
PIDS+=("$NATS_PID")
sleep 1

serve() { # port slot extra...
    local port=$1 slot=$2
    shift 2
    $BIN serve --database-url "$DB" --jwt-secret "$SECRET" --host 127.0.0.1 --port "$port" --slot "$slot" \
        --spill-dir "$WORK/spill-$slot-$port" "$@" >"$WORK/serve-$slot-$port.log" 2>&1 &
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
ticks() { # pids… → their CPU clock ticks (user + system)
    local sum=0
    for pid in "$@"; do sum=$((sum + $(awk '{print $14 + $15}' "/proc/$pid/stat"))); done
    echo "$sum"
}
load() { # port label pids…
    local port=$1 label=$2
    shift 2
    echo "== $label (round $round)"
    local before
    before=$(ticks "$@")
    $BIN load --relay-url "ws://127.0.0.1:$port/realtime/v1/websocket" --database-url "$DB" --jwt-secret "$SECRET" \
        --clients "$CLIENTS" --rate "$RATE" --duration "$DURATION" --seed "$round" 2>&1 | grep -v '^{' || true
    echo "  relay processes' CPU during the run: $(( ($(ticks "$@") - before) * 1000 / $(getconf CLK_TCK) )) ms"
}
stop() { # pids…
    kill "$@" 2>/dev/null || true
    for pid in "$@"; do
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    done
}
drop_slot() {
    psql -h 127.0.0.1 -p "$PGPORT" -U postgres -qAt -c \
        "select pg_drop_replication_slot('$1') from pg_replication_slots where slot_name = '$1'" >/dev/null 2>&1 || true
}

metric() { # port name → value (0 when absent)
    curl -fs "http://127.0.0.1:$1/metrics" 2>/dev/null | awk -v n="$2" '$1 == n {print $2; found=1} END {if (!found) print 0}'
}
now_ms() { date +%s%3N; }
psql_() { psql -h 127.0.0.1 -p "$PGPORT" -U postgres -qAt -c "$1"; }
# A backlog of $TXS transactions of $ROWS_PER_TX orders, written while the
# relay is stopped.
TXS=${TXS:-100}
ROWS_PER_TX=${ROWS_PER_TX:-2000}
backlog() {
    local d u
    d=$(psql_ "insert into public.dealerships (name, code) values ('bench $round', 'BENCH$round') returning id")
    u=$(psql_ "insert into auth.users (id, email) values (gen_random_uuid(), 'bench$round@example.com') returning id")
    psql_ "insert into public.profiles (id, email, full_name) values ('$u', 'bench$round@example.com', 'Bench')" >/dev/null
    for _ in $(seq 1 "$TXS"); do
        echo "insert into public.orders (dealership_id, type, customer_info, vehicle_info, created_by)
              select '$d', 'sales', jsonb_build_object('name', 'Ada Lovelace', 'email', 'ada@example.com',
                     'phone', '+1 555 0100', 'address', jsonb_build_object('street', '1 Main St', 'city', 'Springfield')),
                     jsonb_build_object('vin', md5(n::text), 'make', 'Volvo', 'model', 'XC40', 'year', 2024), '$u'
              from generate_series(1, $ROWS_PER_TX) n;"
    done | psql -h 127.0.0.1 -p "$PGPORT" -U postgres -q -v ON_ERROR_STOP=1 >/dev/null
}
drain() { # port metric label pids-to-stop-after…
    local port=$1 name=$2 label=$3 started took
    shift 3
    wait_ready "$port"
    started=$(now_ms)
    until [ "$(metric "$port" "$name" | cut -d. -f1)" -ge "$TXS" ]; do sleep 0.05; done
    took=$(($(now_ms) - started))
    echo "== drain $label (round $round): $((TXS * ROWS_PER_TX)) rows in ${took} ms = $((TXS * ROWS_PER_TX * 1000 / took)) rows/s"
}

for round in $(seq 1 "$ROUNDS"); do
    [ -n "${SKIP_LATENCY:-}" ] && break
    one=$(serve 4100 "one_$round")
    wait_ready 4100
    load 4100 "one node" "$one"
    stop "$one"
    drop_slot "one_$round"

    src=$(serve 4101 "clu_$round" --nats-url "nats://127.0.0.1:$NATSPORT" --node-role source)
    wait_ready 4101
    edge=$(serve 4102 "clu_$round" --nats-url "nats://127.0.0.1:$NATSPORT" --node-role edge)
    wait_ready 4102
    load 4102 "JetStream: source + edge (+ nats-server)" "$src" "$edge" "$NATS_PID"
    stop "$edge" "$src"
    drop_slot "clu_$round"
done

# Connections across edges (P6 across edges): EDGES edges, one idle
# `walcast load` per edge with CONNECTIONS_PER_EDGE subscribed clients, held
# together; each edge's peak RSS.
if [ -n "${CONNECTIONS_PER_EDGE:-}" ]; then
    round=c
    src=$(serve 4101 conn --nats-url "nats://127.0.0.1:$NATSPORT" --node-role source)
    wait_ready 4101
    edges=()
    for e in $(seq 1 "${EDGES:-2}"); do
        edges+=("$(serve $((4200 + e)) conn --nats-url "nats://127.0.0.1:$NATSPORT" --node-role edge \
            --max-connections $((CONNECTIONS_PER_EDGE + 100)))")
        wait_ready $((4200 + e))
    done
    loads=()
    for e in $(seq 1 "${EDGES:-2}"); do
        $BIN load --relay-url "ws://127.0.0.1:$((4200 + e))/realtime/v1/websocket" --database-url "$DB" \
            --jwt-secret "$SECRET" --idle --idle-secs "${IDLE_SECS:-30}" --clients "$CONNECTIONS_PER_EDGE" \
            --users 2000 --dealerships 1000 --seed "$e" >"$WORK/load-$e.log" 2>&1 &
        loads+=($!)
    done
    peak=()
    while kill -0 "${loads[@]}" 2>/dev/null; do
        for i in "${!edges[@]}"; do
            rss=$(awk '/VmRSS/ {print $2}' "/proc/${edges[$i]}/status")
            [ "$rss" -gt "${peak[$i]:-0}" ] && peak[$i]=$rss
        done
        sleep 1
    done
    for e in $(seq 1 "${EDGES:-2}"); do
        echo "== edge $e: $(grep -E 'clients subscribed' "$WORK/load-$e.log" | sed 's/^ *//'); peak RSS $((${peak[$((e - 1))]} / 1024)) MiB"
        grep -E "result:" "$WORK/load-$e.log"
    done
    stop "${edges[@]}" "$src"
    exit 0
fi

# Drain rates: a backlog streamed by one node (hub handled) vs a source into
# JetStream (every chunk acknowledged) and on through an edge.
for round in $(seq 1 "$ROUNDS"); do
    one=$(serve 4100 "d_one_$round"); wait_ready 4100; stop "$one"
    src=$(serve 4101 "d_clu_$round" --nats-url "nats://127.0.0.1:$NATSPORT" --node-role source); wait_ready 4101
    edge=$(serve 4102 "d_clu_$round" --nats-url "nats://127.0.0.1:$NATSPORT" --node-role edge); wait_ready 4102
    stop "$src"
    backlog
    one=$(serve 4100 "d_one_$round")
    drain 4100 walcast_transactions_total "one node"
    stop "$one"; drop_slot "d_one_$round"
    src=$(serve 4101 "d_clu_$round" --nats-url "nats://127.0.0.1:$NATSPORT" --node-role source)
    until [ "$(metric 4101 walcast_source_leader)" = 1 ]; do sleep 0.05; done
    drain 4102 walcast_edge_transactions_total "JetStream source → edge"
    echo "   source published $(metric 4101 walcast_source_bytes_total) payload bytes in $(metric 4101 walcast_source_messages_total) messages"
    stop "$edge" "$src"; drop_slot "d_clu_$round"
done
