#!/usr/bin/env bash
# Start all local services: N PostgreSQL nodes (default 3), Kafka, Apicurio Registry.
# Runs install.sh first (fast when everything is installed/cached; PGFERRY_SKIP_INSTALL=1 skips it),
# then starts the three services in parallel and waits for all of them. Idempotent.
#   up.sh [N]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PGFERRY_LOG_TAG=up

n="${1:-3}"
[[ "$n" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$n'"

if [[ "${PGFERRY_SKIP_INSTALL:-0}" != 1 ]]; then
    "$PGFERRY_DEPLOY/install.sh"
fi

t_all=$SECONDS
declare -A pids
run_bg() {
    local name="$1"
    shift
    (
        t0=$SECONDS
        if "$@"; then
            echo "[$name] start took $((SECONDS - t0))s"
        else
            rc=$?
            echo "[$name] START FAILED (exit $rc) after $((SECONDS - t0))s"
            exit "$rc"
        fi
    ) >"$PGFERRY_LOGS/up-$name.out" 2>&1 &
    pids[$name]=$!
}
run_bg pg "$PGFERRY_DEPLOY/pg.sh" start "$n"
run_bg kafka "$PGFERRY_DEPLOY/kafka.sh" start
run_bg registry "$PGFERRY_DEPLOY/registry.sh" start

failed=()
for name in pg kafka registry; do
    if ! wait "${pids[$name]}"; then
        failed+=("$name")
    fi
    cat "$PGFERRY_LOGS/up-$name.out" >&2
done
if ((${#failed[@]})); then
    die "failed to start: ${failed[*]} (outputs above; logs in $PGFERRY_LOGS)"
fi
log "all services up in $((SECONDS - t_all))s"

cat <<EOF
PostgreSQL: $(for ((i = 1; i <= n; i++)); do printf '\n  n%d  %s' "$i" "$(pg_dsn "$i")"; done)
Kafka:      $(kafka_bootstrap)
Registry:   $(registry_ccompat)
Logs:       $PGFERRY_LOGS
Env:        eval "\$(deploy/local/env.sh)"
Stop:       deploy/local/down.sh
EOF
