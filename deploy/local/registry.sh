#!/usr/bin/env bash
# Local Apicurio Registry 3.x (Quarkus app from $PGFERRY_CACHE, see install.sh), serving the
# Confluent-compatible API at http://127.0.0.1:18081/apis/ccompat/v7.
#
#   registry.sh start    start; waits until GET /apis/ccompat/v7/subjects answers
#   registry.sh stop     stop (TERM, then KILL after 30s)
#   registry.sh status   exit 0 if running and answering
#
# Storage: H2 in a file under $PGFERRY_LOCAL/registry by default, so schema ids stay valid across
# restarts (Kafka keeps its records, and those records carry schema ids). Set
# PGFERRY_REGISTRY_STORAGE=mem for a throw-away in-memory registry.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PGFERRY_LOG_TAG=registry

REG_STATE="$PGFERRY_LOCAL/registry"
REG_PID="$REG_STATE/registry.pid"
REG_LOG="$PGFERRY_LOGS/registry.log"
: "${PGFERRY_REGISTRY_HEAP:=-Xms256m -Xmx512m}"
: "${PGFERRY_REGISTRY_STORAGE:=file}"
: "${PGFERRY_REGISTRY_LEGACY_IDS:=false}"
: "${PGFERRY_REGISTRY_CANONICAL_HASH:=false}"
: "${PGFERRY_REGISTRY_JAVA_OPTS:=}"

runner_jar() {
    local j
    for j in "$PGFERRY_APICURIO_HOME"/*-runner.jar "$PGFERRY_APICURIO_HOME/quarkus-app/quarkus-run.jar"; do
        [[ -f "$j" ]] && { echo "$j"; return 0; }
    done
    return 1
}

running_pid() { read_live_pid "$REG_PID" "-Dpgferry.service=registry"; }

answers() {
    curl -sf -m 5 -o /dev/null "$(registry_ccompat)/subjects"
}

wait_registry() {
    local pid="$1" end
    end=$((SECONDS + PGFERRY_REGISTRY_TIMEOUT))
    while :; do
        if ! pid_alive "$pid"; then
            show_log_tail "$REG_LOG"
            die "registry process $pid exited during startup (log: $REG_LOG)"
        fi
        answers && return 0
        if ((SECONDS >= end)); then
            show_log_tail "$REG_LOG"
            die "registry not answering $(registry_ccompat)/subjects after ${PGFERRY_REGISTRY_TIMEOUT}s (log: $REG_LOG)"
        fi
        sleep 1
    done
}

start() {
    local jar pid
    jar="$(runner_jar)" || die "Apicurio Registry $PGFERRY_APICURIO_VERSION not in $PGFERRY_APICURIO_HOME (run deploy/local/install.sh)"
    if pid="$(running_pid)"; then
        log "already running (pid $pid)"
        wait_registry "$pid"
        log "up on $(registry_ccompat)"
        return 0
    fi
    rm -f "$REG_PID"
    tcp_open "$PGFERRY_REGISTRY_HOST" "$PGFERRY_REGISTRY_PORT" &&
        die "port $PGFERRY_REGISTRY_PORT is taken by another process"
    mkdir -p "$REG_STATE"

    local storage=()
    case "$PGFERRY_REGISTRY_STORAGE" in
    file) storage=(-Dapicurio.datasource.url="jdbc:h2:file:$REG_STATE/h2/registry;DB_CLOSE_ON_EXIT=FALSE") ;;
    mem) ;; # the app's default: jdbc:h2:mem
    *) die "PGFERRY_REGISTRY_STORAGE must be 'file' or 'mem', got '$PGFERRY_REGISTRY_STORAGE'" ;;
    esac

    [[ -f "$REG_LOG" ]] && mv -f "$REG_LOG" "$REG_LOG.1"
    local t0=$SECONDS
    # Settings:
    # - apicurio.ccompat.legacy-id-mode.enabled=false (the default): ids in the Confluent API are
    #   Apicurio *content ids*, which behave like Confluent schema ids (the same schema text under
    #   two subjects gets the same id; GET /schemas/ids/<id> resolves it). With legacy mode on,
    #   ids would be global ids (one per registered version). Either is fetchable; the default
    #   matches Confluent semantics, so it is kept and pinned here explicitly.
    # - apicurio.ccompat.use-canonical-hash=false (the default): re-registering the identical schema
    #   text under a subject returns the existing id; a textually different but equivalent
    #   schema becomes a new version. pgferry generates its schema JSON deterministically.
    # - apicurio.ccompat.max-subjects: raised from 1000 so listing subjects never truncates in tests.
    # shellcheck disable=SC2086
    (cd "$REG_STATE" && exec setsid nohup "$(java_bin)" $PGFERRY_REGISTRY_HEAP -XX:+UseSerialGC \
        -Dpgferry.service=registry \
        -Dquarkus.http.host="$PGFERRY_REGISTRY_HOST" -Dquarkus.http.port="$PGFERRY_REGISTRY_PORT" \
        -Dapicurio.ccompat.legacy-id-mode.enabled="$PGFERRY_REGISTRY_LEGACY_IDS" \
        -Dapicurio.ccompat.use-canonical-hash="$PGFERRY_REGISTRY_CANONICAL_HASH" \
        -Dapicurio.ccompat.max-subjects=100000 \
        "${storage[@]}" $PGFERRY_REGISTRY_JAVA_OPTS \
        -jar "$jar" >"$REG_LOG" 2>&1 </dev/null) &
    pid=$!
    echo "$pid" >"$REG_PID"
    log "started pid $pid (storage: $PGFERRY_REGISTRY_STORAGE), waiting for $(registry_ccompat) (log: $REG_LOG)"
    wait_registry "$pid"
    log "up on $(registry_ccompat) after $((SECONDS - t0))s"
}

stop() {
    local pid
    if pid="$(running_pid)"; then
        log "stopping pid $pid"
        stop_pid "$pid" registry 30
        log "stopped"
    else
        log "not running"
    fi
    rm -f "$REG_PID"
}

status() {
    local pid
    if pid="$(running_pid)" && answers; then
        echo "registry: running  $(registry_ccompat)  pid $pid  (log: $REG_LOG)"
    else
        echo "registry: DOWN     $(registry_ccompat)  (log: $REG_LOG)"
        return 1
    fi
}

case "${1:-}" in
start) start ;;
stop) stop ;;
status) status ;;
*)
    echo "usage: $0 start | stop | status" >&2
    exit 2
    ;;
esac
