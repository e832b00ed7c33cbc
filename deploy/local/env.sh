#!/usr/bin/env bash
# Print export lines for the local services:   eval "$(deploy/local/env.sh [N])"
# N (number of PostgreSQL nodes) defaults to the N of the last `pg.sh start N`, else 3.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

n="${1:-}"
if [[ -z "$n" ]]; then
    n="$(cat "$PGFERRY_LOCAL/pg/nodes" 2>/dev/null || echo 3)"
fi
[[ "$n" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$n'"

echo "export PGFERRY_PG_NODES=$n"
for ((i = 1; i <= n; i++)); do
    echo "export PGFERRY_PG_DSN_$i='$(pg_dsn "$i")'"
done
echo "export PGFERRY_KAFKA='$(kafka_bootstrap)'"
echo "export PGFERRY_REGISTRY='$(registry_ccompat)'"
