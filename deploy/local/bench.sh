#!/usr/bin/env bash
# The benchmark command. Installs what is missing (PGFERRY_SKIP_INSTALL=1 skips it), uses the
# local Kafka and registry (starting them if they do not answer), starts the benchmark's own
# three PostgreSQL servers (fresh data directories under $PGFERRY_LOCAL/bench, ports
# $PGFERRY_BENCH_PG_BASE_PORT+1..3, the test nodes' settings plus pglogical preloaded, so every
# system runs on identical servers and the shared test nodes are left alone), builds pgferry and
# pgferry-bench, and runs `pgferry bench` against them. The servers are stopped afterwards.
#
#   deploy/local/bench.sh [--debug] [pgferry bench options…]
#       The comparison of pgferry, PostgreSQL native logical replication and pglogical: prints
#       the tables and writes docs/benchmarks/comparison.{md,json,png} (with --quick, a small
#       and short run, to .local/logs/bench-quick/). `pgferry bench --help` lists the options.
#   deploy/local/bench.sh [--debug] capture [--transactions N] [--rows N]
#       The capture benchmarks (throughput against pg_recvlogical; one large transaction's
#       memory and time): writes docs/benchmarks/capture.md.
#
# --debug uses debug binaries (faster to build, much slower to run: for checking the command,
# as CI does with --quick). PGFERRY_BENCH_PGFERRY=<path> runs that pgferry binary instead of
# the one just built (an A/B of two builds, back to back; stderr names the binary run).
# PGFERRY_PG_SHARED_BUFFERS sets the servers' shared_buffers (deploy/local/pg.sh; default
# 128MB, PostgreSQL's own, which the published runs use; comparison-notes.md has 1GB runs).
# Figures are reported, never judged: a missed target does not fail it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PGFERRY_LOG_TAG=bench
cd "$PGFERRY_REPO"

profile=release
if [[ "${1:-}" == --debug ]]; then
    profile=debug
    shift
fi
mode=compare
transactions=50000
rows=2000000
if [[ "${1:-}" == capture ]]; then
    mode=capture
    shift
    while (($#)); do
        case "$1" in
        --transactions) transactions="${2:?--transactions needs a number}"; shift 2 ;;
        --rows) rows="${2:?--rows needs a number}"; shift 2 ;;
        *) die "unknown argument '$1' (usage: bench.sh [--debug] capture [--transactions N] [--rows N])" ;;
        esac
    done
    [[ "$transactions" =~ ^[1-9][0-9]*$ ]] || die "--transactions must be a positive integer"
    [[ "$rows" =~ ^[1-9][0-9]*$ ]] || die "--rows must be a positive integer"
fi
invocation="deploy/local/bench.sh"
[[ "$profile" == release ]] || invocation+=" --debug"
if [[ "$mode" == capture ]]; then
    invocation+=" capture --transactions $transactions --rows $rows"
elif (($#)); then
    invocation+=" $*"
fi

if [[ "${PGFERRY_SKIP_INSTALL:-0}" != 1 ]]; then
    PGFERRY_INSTALL_BENCH=1 "$PGFERRY_DEPLOY/install.sh"
fi

# Runs a command with every inherited file descriptor above 2 closed. The services started
# here outlive this script: they must not keep what the caller holds open, such as the lock of
# `flock FILE deploy/local/bench.sh` (every child inherits its descriptor, so a Kafka started
# under it would hold the lock, and block the next benchmark, for as long as it runs).
without_inherited_fds() {
    local fd
    for fd in /proc/"$BASHPID"/fd/*; do
        fd="${fd##*/}"
        ((fd > 2)) && eval "exec $fd>&-" 2>/dev/null
    done
    exec "$@"
}

# Kafka and the registry: shared with the tests (every benchmark cluster has its own topics).
# Services already answering (e.g. started from another checkout) are used as they are.
pids=()
tcp_open "$PGFERRY_KAFKA_HOST" "$PGFERRY_KAFKA_PORT" || {
    without_inherited_fds "$PGFERRY_DEPLOY/kafka.sh" start >&2 &
    pids+=($!)
}
tcp_open "$PGFERRY_REGISTRY_HOST" "$PGFERRY_REGISTRY_PORT" || {
    without_inherited_fds "$PGFERRY_DEPLOY/registry.sh" start >&2 &
    pids+=($!)
}

# The benchmark's PostgreSQL servers, fresh each run (pglogical's supervisor does not survive
# the benchmark's DROP DATABASE on PostgreSQL 15; see bench/src/measure.rs).
BENCH_LOCAL="$PGFERRY_LOCAL/bench"
bench_pg() {
    PGFERRY_LOCAL="$BENCH_LOCAL" PGFERRY_PG_BASE_PORT="$PGFERRY_BENCH_PG_BASE_PORT" \
        PGFERRY_PG_PRELOAD=pglogical "$PGFERRY_DEPLOY/pg.sh" "$@"
}
bench_pg stop >&2
rm -rf "$BENCH_LOCAL/pg"
trap 'bench_pg stop >&2 || true' EXIT
bench_pg start 3 >&2
for pid in "${pids[@]}"; do
    wait "$pid" || die "starting Kafka or the registry failed (logs in $PGFERRY_LOGS)"
done
eval "$(PGFERRY_LOCAL="$BENCH_LOCAL" PGFERRY_PG_BASE_PORT="$PGFERRY_BENCH_PG_BASE_PORT" "$PGFERRY_DEPLOY/env.sh" 3)"

command -v cargo >/dev/null 2>&1 || { [[ -f "$HOME/.cargo/env" ]] && source "$HOME/.cargo/env"; }
command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (rustup) first"
log "building pgferry and pgferry-bench ($profile)"
build=(cargo build --locked -p pgferry -p pgferry-bench)
[[ "$profile" == debug ]] || build+=(--release)
"${build[@]}" >&2
# Cargo puts the binaries under CARGO_TARGET_DIR when it is set.
bin="${CARGO_TARGET_DIR:-$PGFERRY_REPO/target}/$profile"
export PGFERRY_BIN="${PGFERRY_BENCH_PGFERRY:-$bin/pgferry}" PGFERRY_PG_BIN PGFERRY_KAFKA_VERSION PGFERRY_APICURIO_VERSION
export PGFERRY_BENCH_PYTHON="$PGFERRY_BENCH_VENV/bin/python"
export PGFERRY_BENCH_COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
export PGFERRY_BENCH_COMMAND="$invocation" PGFERRY_BENCH_PROFILE="$profile"
export PGFERRY_BENCH_RUSTC="$(rustc --version)"
# The broker's pid, for its CPU in the cost figures (none when it was started elsewhere).
PGFERRY_BENCH_KAFKA_PID="$(read_live_pid "$PGFERRY_LOCAL/kafka/kafka.pid" kafka.Kafka || true)"
export PGFERRY_BENCH_KAFKA_PID

if [[ "$mode" == compare ]]; then
    "$bin/pgferry" bench "$@"
    exit 0
fi

out="$PGFERRY_LOGS/bench"
mkdir -p "$out"
log "capture throughput ($transactions pgbench transactions)"
"$bin/pgferry" bench capture-throughput --transactions "$transactions" >"$out/throughput.md"
log "large transaction ($rows rows)"
"$bin/pgferry" bench large-txn --rows "$rows" >"$out/large-txn.md"

# The machine and versions the figures come from.
cores="$(nproc)"
cpu="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
mem_gb="$(awk '/^MemTotal:/ {printf "%.1f", $2 / 1048576}' /proc/meminfo)"
pg_version="$(PGPASSWORD="$PGFERRY_PG_PASSWORD" "$PGFERRY_PG_BIN/psql" "$PGFERRY_PG_DSN_1" -Atc 'SHOW server_version')"
kernel="$(uname -sr)"
doc="$PGFERRY_REPO/docs/benchmarks/capture.md"
mkdir -p "$(dirname "$doc")"
{
    echo "# Capture benchmarks"
    echo
    echo "Written by \`deploy/local/bench.sh capture\` on $(date -u '+%Y-%m-%d %H:%M UTC') (commit $PGFERRY_BENCH_COMMIT)."
    echo
    echo "Command:"
    echo
    echo '```sh'
    echo "$invocation"
    echo "# which runs, against the benchmark's own PostgreSQL servers and the local Kafka and registry:"
    echo "target/$profile/pgferry bench capture-throughput --transactions $transactions"
    echo "target/$profile/pgferry bench large-txn --rows $rows"
    echo '```'
    echo
    echo "Machine: $cores cores ($cpu), $mem_gb GiB memory, $kernel. PostgreSQL $pg_version,"
    echo "Apache Kafka $PGFERRY_KAFKA_VERSION (one KRaft broker), Apicurio Registry $PGFERRY_APICURIO_VERSION,"
    echo "all on loopback on the same machine as pgferry and the benchmark; $PGFERRY_BENCH_RUSTC."
    echo "Load average when the run ended: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine"
    echo "shares the cores and moves the figures)."
    echo
    cat "$out/throughput.md"
    echo
    cat "$out/large-txn.md"
} >"$doc"
cat "$out/throughput.md" "$out/large-txn.md"
log "written to $doc"
