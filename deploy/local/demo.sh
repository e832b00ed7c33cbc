#!/usr/bin/env bash
# The main job: a local 3-node active-active cluster replicating through Kafka.
# Starts PostgreSQL x3, Kafka and the registry; makes database `demo` with table `accounts` on
# every node; runs `pgferry init` and `pgferry run` for n1, n2, n3; runs a write workload on
# all three nodes at once (pgbench, disjoint keys per node); then shows, per node, the row
# count and a checksum of the table until all three agree.
#   deploy/local/demo.sh            run it (DEMO_SECONDS=20 sets the workload length)
#   deploy/local/demo.sh status     show the per-node view again
#   deploy/local/demo.sh stop       stop the pgferry processes (deploy/local/down.sh stops the rest)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PGFERRY_LOG_TAG=demo
cd "$PGFERRY_REPO"

DEMO_DIR="$PGFERRY_LOCAL/demo"
CONFIG="$DEMO_DIR/pgferry.toml"
BIN="$PGFERRY_REPO/target/debug/pgferry"
: "${DEMO_SECONDS:=20}"
mkdir -p "$DEMO_DIR"

psql_node() { # psql_node I SQL...
    local i="$1"; shift
    PGPASSWORD="$PGFERRY_PG_PASSWORD" "$PGFERRY_PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 \
        -h 127.0.0.1 -p "$(pg_port "$i")" -U "$PGFERRY_PG_USER" "$@"
}

stop_services() {
    for i in 1 2 3; do
        local pidfile="$DEMO_DIR/n$i.pid"
        if [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            kill "$(cat "$pidfile")" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
}

status() { # prints the per-node view; returns 0 when all nodes agree
    printf '\n%-5s %-22s %10s  %s\n' node endpoint rows "checksum (md5 of all rows)"
    local sums=()
    for i in 1 2 3; do
        local line
        line=$(psql_node "$i" -d demo -At -F ' ' -c \
            "SELECT count(*), coalesce(md5(string_agg(a::text, ',' ORDER BY a::text)), '-') FROM accounts a")
        printf '%-5s %-22s %10s  %s\n' "n$i" "127.0.0.1:$(pg_port "$i")" ${line}
        sums+=("$line")
    done
    [[ "${sums[0]}" == "${sums[1]}" && "${sums[1]}" == "${sums[2]}" ]]
}

pgferry_status() { # pgferry's own view: services, slots, the lag matrix, conflicts, dead letters
    [[ -x "$BIN" && -f "$CONFIG" ]] || return 0
    echo
    PGFERRY_PG_PASSWORD="$PGFERRY_PG_PASSWORD" "$BIN" --config "$CONFIG" status || true
}

case "${1:-run}" in
stop) stop_services; log "pgferry stopped (services: deploy/local/down.sh)"; exit 0 ;;
status)
    status && echo "all nodes agree" || echo "nodes differ (replication in progress?)"
    pgferry_status
    exit 0
    ;;
run) ;;
*) die "usage: demo.sh [run|status|stop]" ;;
esac

"$PGFERRY_DEPLOY/up.sh" 3 >&2
command -v cargo >/dev/null 2>&1 || { [[ -f "$HOME/.cargo/env" ]] && source "$HOME/.cargo/env"; }
log "building pgferry"
cargo build --locked --bin pgferry >&2
stop_services

log "creating database demo on n1..n3 (fresh)"
cluster="demo_$(date +%s)"
for i in 1 2 3; do
    # Drop what an earlier demo left (its slot pins the database).
    psql_node "$i" -d postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = 'demo'" >/dev/null
    psql_node "$i" -d postgres -c "DROP DATABASE IF EXISTS demo WITH (FORCE)" -c "CREATE DATABASE demo"
    psql_node "$i" -d demo -c "CREATE TABLE accounts (id bigint PRIMARY KEY, node int NOT NULL, balance numeric(12,2) NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())"
done

cat >"$CONFIG" <<TOML
# Written by deploy/local/demo.sh. The password comes from the environment (\${PGFERRY_PG_PASSWORD}).
[cluster]
name = "$cluster"

[kafka]
bootstrap_servers = "$(kafka_bootstrap)"
partitions = 3

[registry]
url = "$(registry_ccompat)"

[[nodes]]
name = "n1"
id = 1
region = "local"
dsn = "postgres://$PGFERRY_PG_USER:\${PGFERRY_PG_PASSWORD}@127.0.0.1:$(pg_port 1)/demo"
metrics_listen = "127.0.0.1:$((19180 + 1))"

[[nodes]]
name = "n2"
id = 2
region = "local"
dsn = "postgres://$PGFERRY_PG_USER:\${PGFERRY_PG_PASSWORD}@127.0.0.1:$(pg_port 2)/demo"
metrics_listen = "127.0.0.1:$((19180 + 2))"

[[nodes]]
name = "n3"
id = 3
region = "local"
dsn = "postgres://$PGFERRY_PG_USER:\${PGFERRY_PG_PASSWORD}@127.0.0.1:$(pg_port 3)/demo"
metrics_listen = "127.0.0.1:$((19180 + 3))"

[replication]
tables = ["public.accounts"]
TOML
export PGFERRY_PG_PASSWORD

"$BIN" --config "$CONFIG" init
for i in 1 2 3; do
    nohup "$BIN" --config "$CONFIG" run --node "n$i" >"$PGFERRY_LOGS/demo-n$i.log" 2>&1 &
    echo $! >"$DEMO_DIR/n$i.pid"
done
log "pgferry running on n1..n3 (logs: $PGFERRY_LOGS/demo-n*.log)"

# Workload: every node writes its own key range (node * 1e6 + k), inserts then updates.
cat >"$DEMO_DIR/workload.sql" <<'SQL'
\set k random(1, 2000)
INSERT INTO accounts (id, node, balance) VALUES (:node * 1000000 + :k, :node, 100)
  ON CONFLICT (id) DO UPDATE SET balance = accounts.balance + 1, updated_at = now();
SQL
log "workload: pgbench on all three nodes for ${DEMO_SECONDS}s"
pids=()
for i in 1 2 3; do
    PGPASSWORD="$PGFERRY_PG_PASSWORD" "$PGFERRY_PG_BIN/pgbench" -n -h 127.0.0.1 -p "$(pg_port "$i")" \
        -U "$PGFERRY_PG_USER" -c 2 -T "$DEMO_SECONDS" -D node="$i" -f "$DEMO_DIR/workload.sql" demo \
        >"$DEMO_DIR/pgbench-n$i.out" 2>&1 &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || die "pgbench failed: see $DEMO_DIR/pgbench-n*.out"; done
grep -h "tps" "$DEMO_DIR"/pgbench-n*.out | sed 's/^/  /' >&2 || true

log "waiting for all nodes to agree"
deadline=$((SECONDS + 120))
until status; do
    ((SECONDS < deadline)) || die "nodes still differ after 120s; see $PGFERRY_LOGS/demo-n*.log"
    sleep 2
done
pgferry_status
echo
echo "all three nodes hold the same rows. pgferry keeps running:"
echo "  write on any node:  PGPASSWORD=$PGFERRY_PG_PASSWORD psql -h 127.0.0.1 -p $(pg_port 1) -U postgres demo"
echo "  per-node view:      deploy/local/demo.sh status"
echo "  stop:               deploy/local/demo.sh stop && deploy/local/down.sh"
