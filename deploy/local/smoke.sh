#!/usr/bin/env bash
# Check that the running local services really work:
#   - every PostgreSQL node: password login over TCP, wal_level=logical, track_commit_timestamp=on
#   - Kafka: a 3-partition topic, one committed + one aborted transaction, read_committed consumer
#   - Registry: register an Avro schema under a TopicRecordNameStrategy subject, fetch it by id
#   smoke.sh [N]   (N defaults as in env.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PGFERRY_LOG_TAG=smoke

n="${1:-$(cat "$PGFERRY_LOCAL/pg/nodes" 2>/dev/null || echo 3)}"
fail=0

for ((i = 1; i <= n; i++)); do
    out="$(PGPASSWORD="$PGFERRY_PG_PASSWORD" PGCONNECT_TIMEOUT=5 "$PGFERRY_PG_BIN/psql" -h 127.0.0.1 -p "$(pg_port "$i")" \
        -U "$PGFERRY_PG_USER" -d postgres -XAtq \
        -c "select current_setting('wal_level') || ',' || current_setting('track_commit_timestamp')" 2>&1)" || true
    if [[ "$out" == "logical,on" ]]; then
        log "pg n$i ok"
    else
        log "pg n$i FAILED: $out (log: $PGFERRY_LOGS/pg-n$i.log)"
        fail=1
    fi
done

if "$PGFERRY_DEPLOY/kafka.sh" run "$PGFERRY_DEPLOY/smoke/KafkaTxSmoke.java" "$(kafka_bootstrap)" pgferry-smoke >&2; then
    log "kafka ok"
else
    log "kafka FAILED (log: $PGFERRY_LOGS/kafka.log)"
    fail=1
fi

schema='{"type":"record","name":"Value","namespace":"pgferry.smoke","fields":[{"name":"id","type":"long"},{"name":"note","type":["null","string"],"default":null}]}'
subject="pgferry-smoke-pgferry.smoke.Value" # TopicRecordNameStrategy: <topic>-<record full name>
body="$(python3 -c 'import json,sys; print(json.dumps({"schema": sys.argv[1], "schemaType": "AVRO"}))' "$schema")"
reg="$(curl -sS -m 10 -X POST -H 'Content-Type: application/vnd.schemaregistry.v1+json' \
    --data "$body" "$(registry_ccompat)/subjects/$subject/versions" 2>&1)" || true
id="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["id"])' "$reg" 2>/dev/null || true)"
if [[ "$id" =~ ^[0-9]+$ ]]; then
    got="$(curl -sS -m 10 "$(registry_ccompat)/schemas/ids/$id" 2>&1)" || true
    if python3 -c 'import json,sys; sys.exit(0 if json.loads(sys.argv[1])["schema"] == sys.argv[2] else 1)' "$got" "$schema" 2>/dev/null; then
        log "registry ok (subject $subject -> id $id, fetched back by id)"
    else
        log "registry FAILED: GET /schemas/ids/$id returned: $got (log: $PGFERRY_LOGS/registry.log)"
        fail=1
    fi
else
    log "registry FAILED: register returned: $reg (log: $PGFERRY_LOGS/registry.log)"
    fail=1
fi

((fail == 0)) || die "smoke test failed"
log "all services ok"
