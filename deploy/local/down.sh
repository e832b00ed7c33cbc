#!/usr/bin/env bash
# Stop all local services (registry, Kafka, every PostgreSQL node under $PGFERRY_LOCAL/pg and
# the benchmark's under $PGFERRY_LOCAL/bench/pg).
# Data is kept; remove $PGFERRY_LOCAL to start from scratch. Idempotent.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PGFERRY_LOG_TAG=down

rc=0
"$PGFERRY_DEPLOY/registry.sh" stop || rc=1
"$PGFERRY_DEPLOY/kafka.sh" stop || rc=1
"$PGFERRY_DEPLOY/pg.sh" stop || rc=1
# The benchmark's own PostgreSQL servers (bench.sh stops them itself unless it was killed).
if [[ -d "$PGFERRY_LOCAL/bench/pg" ]]; then
    PGFERRY_LOCAL="$PGFERRY_LOCAL/bench" "$PGFERRY_DEPLOY/pg.sh" stop || rc=1
fi
((rc == 0)) || die "some service did not stop cleanly (see above; logs in $PGFERRY_LOGS)"
log "all services stopped"
