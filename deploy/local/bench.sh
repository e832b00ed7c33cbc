#!/usr/bin/env bash
# The benchmark command: start the local services (3 PostgreSQL nodes, Kafka, Apicurio
# Registry), build pgferry and pgferry-bench in release mode, run the capture benchmarks
# (throughput against pg_recvlogical; one large transaction's memory and time), print the
# tables and write them, with a description of the machine, to docs/benchmarks/capture.md.
# Figures are reported, never judged: a missed target does not fail the script.
#   deploy/local/bench.sh [--transactions N] [--rows N]
# (--transactions: pgbench transactions in the throughput backlog, default 50000;
#  --rows: row changes in the large transaction, default 2000000.)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PGFERRY_LOG_TAG=bench
cd "$PGFERRY_REPO"

transactions=50000
rows=2000000
while (($#)); do
    case "$1" in
    --transactions) transactions="${2:?--transactions needs a number}"; shift 2 ;;
    --rows) rows="${2:?--rows needs a number}"; shift 2 ;;
    *) die "unknown argument '$1' (usage: bench.sh [--transactions N] [--rows N])" ;;
    esac
done
[[ "$transactions" =~ ^[1-9][0-9]*$ ]] || die "--transactions must be a positive integer"
[[ "$rows" =~ ^[1-9][0-9]*$ ]] || die "--rows must be a positive integer"

# Services already answering on every port (e.g. started from another checkout, whose
# $PGFERRY_LOCAL holds their pid files) are used as they are; otherwise up.sh starts them.
services_answer() {
    local i
    for i in 1 2 3; do tcp_open 127.0.0.1 "$(pg_port "$i")" || return 1; done
    tcp_open "$PGFERRY_KAFKA_HOST" "$PGFERRY_KAFKA_PORT" &&
        tcp_open "$PGFERRY_REGISTRY_HOST" "$PGFERRY_REGISTRY_PORT"
}
if services_answer; then
    log "services already answer on their ports; using them"
else
    "$PGFERRY_DEPLOY/up.sh" 3 >&2
fi
eval "$("$PGFERRY_DEPLOY/env.sh" 3)"
command -v cargo >/dev/null 2>&1 || { [[ -f "$HOME/.cargo/env" ]] && source "$HOME/.cargo/env"; }
command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (rustup) first"
log "building pgferry and pgferry-bench (release)"
cargo build --release --locked -p pgferry -p pgferry-bench
export PGFERRY_BIN="$PGFERRY_REPO/target/release/pgferry"
export PGFERRY_PG_BIN
bench="$PGFERRY_REPO/target/release/pgferry-bench"

out="$PGFERRY_LOGS/bench"
mkdir -p "$out"
log "capture throughput ($transactions pgbench transactions)"
"$bench" capture-throughput --transactions "$transactions" >"$out/throughput.md"
log "large transaction ($rows rows)"
"$bench" large-txn --rows "$rows" >"$out/large-txn.md"

# The machine and versions the figures come from.
cores="$(nproc)"
cpu="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
mem_gb="$(awk '/^MemTotal:/ {printf "%.1f", $2 / 1048576}' /proc/meminfo)"
pg_version="$(PGPASSWORD="$PGFERRY_PG_PASSWORD" "$PGFERRY_PG_BIN/psql" "$PGFERRY_PG_DSN_1" -Atc 'SHOW server_version')"
kernel="$(uname -sr)"
rustc_version="$(rustc --version)"
doc="$PGFERRY_REPO/docs/benchmarks/capture.md"
mkdir -p "$(dirname "$doc")"
{
    echo "# Capture benchmarks"
    echo
    echo "Written by \`deploy/local/bench.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC') (commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))."
    echo
    echo "Command:"
    echo
    echo '```sh'
    echo "deploy/local/bench.sh --transactions $transactions --rows $rows"
    echo "# which runs, against the local services:"
    echo "target/release/pgferry-bench capture-throughput --transactions $transactions"
    echo "target/release/pgferry-bench large-txn --rows $rows"
    echo '```'
    echo
    echo "Machine: $cores cores ($cpu), $mem_gb GiB memory, $kernel. PostgreSQL $pg_version,"
    echo "Apache Kafka $PGFERRY_KAFKA_VERSION (one KRaft broker), Apicurio Registry $PGFERRY_APICURIO_VERSION,"
    echo "all on loopback on the same machine as pgferry and the benchmark; $rustc_version."
    echo "Load average when the run ended: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine"
    echo "shares the cores and moves the figures)."
    echo
    cat "$out/throughput.md"
    echo
    cat "$out/large-txn.md"
} >"$doc"
cat "$out/throughput.md" "$out/large-txn.md"
log "written to $doc"
