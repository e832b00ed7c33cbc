#!/usr/bin/env bash
# The main job: a local 3-node active-active cluster replicating through Kafka.
# Starts PostgreSQL x3, Kafka and the registry; makes database `demo` with tables `accounts`
# and `ledger` on every node; runs `pgferry init` and `pgferry run` for n1, n2, n3; then runs
# two workloads on all three nodes at once (pgbench): inserts and updates of each node's own
# keys in `accounts`, and transfers between the same 100 rows of `ledger` from every node —
# concurrent updates of the same rows, settled by last-update-wins, with `balance` a delta
# column so that every transfer counts. It shows, per node, the row count and a checksum of
# both tables until all three agree, then the conflicts each node detected and how they were
# settled (`pgferry conflicts list --summary`) and the ledger's total, which must be exactly
# what it started with (the script fails otherwise).
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

LEDGER_ROWS=100
LEDGER_START=1000.00

status() { # prints the per-node view; returns 0 when all nodes agree
    printf '\n%-5s %-22s %8s  %-32s  %6s  %-32s  %s\n' node endpoint accounts "checksum (md5 of all rows)" \
        ledger "checksum (md5 of all rows)" "ledger total"
    local sums=()
    for i in 1 2 3; do
        local line
        line=$(psql_node "$i" -d demo -At -F ' ' -c \
            "SELECT (SELECT count(*) FROM accounts), (SELECT coalesce(md5(string_agg(a::text, ',' ORDER BY a::text)), '-') FROM accounts a),
                    (SELECT count(*) FROM ledger), (SELECT coalesce(md5(string_agg(l::text, ',' ORDER BY l::text)), '-') FROM ledger l),
                    (SELECT coalesce(sum(balance), 0) FROM ledger)")
        # shellcheck disable=SC2086 # the line's fields are the columns
        printf '%-5s %-22s %8s  %-32s  %6s  %-32s  %s\n' "n$i" "127.0.0.1:$(pg_port "$i")" ${line}
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
    psql_node "$i" -d demo -c "CREATE TABLE accounts (id bigint PRIMARY KEY, node int NOT NULL, balance numeric(12,2) NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())" \
        -c "CREATE TABLE ledger (id int PRIMARY KEY, balance numeric(14,2) NOT NULL, last_node int NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())" \
        -c "ALTER TABLE ledger REPLICA IDENTITY FULL"
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
tables = ["public.accounts", "public.ledger"]

# Transfers move amounts between ledger rows from every node at once: the balance merges
# (every node adds each remote change's new - old), whoever wins the row.
[replication.table."public.ledger"]
delta_columns = ["balance"]
TOML
export PGFERRY_PG_PASSWORD

"$BIN" --config "$CONFIG" init
for i in 1 2 3; do
    nohup "$BIN" --config "$CONFIG" run --node "n$i" >"$PGFERRY_LOGS/demo-n$i.log" 2>&1 &
    echo $! >"$DEMO_DIR/n$i.pid"
done
log "pgferry running on n1..n3 (logs: $PGFERRY_LOGS/demo-n*.log)"

# The ledger's rows, written once on n1; every node must have them before the transfers start.
psql_node 1 -d demo -c "INSERT INTO ledger (id, balance, last_node) SELECT g, $LEDGER_START, 1 FROM generate_series(1, $LEDGER_ROWS) g"
deadline=$((SECONDS + 60))
for i in 2 3; do
    until [[ "$(psql_node "$i" -d demo -At -c "SELECT count(*) FROM ledger")" == "$LEDGER_ROWS" ]]; do
        ((SECONDS < deadline)) || die "the ledger's rows did not reach n$i in 60s; see $PGFERRY_LOGS/demo-n*.log"
        sleep 0.5
    done
done
total_before=$(psql_node 1 -d demo -At -c "SELECT sum(balance) FROM ledger")

# Workload 1: every node writes its own key range (node * 1e6 + k), inserts then updates.
cat >"$DEMO_DIR/workload.sql" <<'SQL'
\set k random(1, 2000)
INSERT INTO accounts (id, node, balance) VALUES (:node * 1000000 + :k, :node, 100)
  ON CONFLICT (id) DO UPDATE SET balance = accounts.balance + 1, updated_at = now();
SQL
# Workload 2: every node moves amounts between the same ledger rows (conflicts on purpose).
cat >"$DEMO_DIR/transfer.sql" <<SQL
\set a random(1, $LEDGER_ROWS)
\set b random(1, $LEDGER_ROWS)
\set amount random(1, 5000)
BEGIN;
UPDATE ledger SET balance = balance - :amount / 100.0, last_node = :node, updated_at = now() WHERE id = :a;
UPDATE ledger SET balance = balance + :amount / 100.0, last_node = :node, updated_at = now() WHERE id = :b;
END;
SQL
log "workloads: pgbench on all three nodes for ${DEMO_SECONDS}s (own keys, and transfers between shared rows)"
pids=()
for i in 1 2 3; do
    for script in workload transfer; do
        # Transfers at 200 a second per node: delta-column tables are applied one change at a time.
        rate=()
        [[ "$script" == transfer ]] && rate=(-R 200)
        PGPASSWORD="$PGFERRY_PG_PASSWORD" "$PGFERRY_PG_BIN/pgbench" -n -h 127.0.0.1 -p "$(pg_port "$i")" \
            -U "$PGFERRY_PG_USER" -c 2 "${rate[@]}" -T "$DEMO_SECONDS" -D node="$i" -f "$DEMO_DIR/$script.sql" demo \
            >"$DEMO_DIR/pgbench-$script-n$i.out" 2>&1 &
        pids+=($!)
    done
done
for p in "${pids[@]}"; do wait "$p" || die "pgbench failed: see $DEMO_DIR/pgbench-*.out"; done
grep -h "tps" "$DEMO_DIR"/pgbench-*.out | sed 's/^/  /' >&2 || true

log "waiting for all nodes to agree"
deadline=$((SECONDS + 120))
until status; do
    ((SECONDS < deadline)) || die "nodes still differ after 120s; see $PGFERRY_LOGS/demo-n*.log"
    sleep 2
done
pgferry_status
echo
echo "conflicts each node detected, and how they were settled (pgferry conflicts list --summary):"
"$BIN" --config "$CONFIG" conflicts list --summary
echo
for i in 1 2 3; do
    total=$(psql_node "$i" -d demo -At -c "SELECT sum(balance) FROM ledger")
    echo "n$i: ledger total $total (started with $total_before)"
    [[ "$total" == "$total_before" ]] || die "n$i's ledger total $total is not the $total_before it started with"
done
echo
echo "all three nodes hold the same rows, and the ledger's total is what it started with. pgferry keeps running:"
echo "  write on any node:  PGPASSWORD=$PGFERRY_PG_PASSWORD psql -h 127.0.0.1 -p $(pg_port 1) -U postgres demo"
echo "  per-node view:      deploy/local/demo.sh status"
echo "  stop:               deploy/local/demo.sh stop && deploy/local/down.sh"
