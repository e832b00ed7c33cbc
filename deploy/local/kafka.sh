#!/usr/bin/env bash
# Local Apache Kafka (KRaft, single node acting as broker + controller, node.id=1).
# Jars come from $PGFERRY_CACHE/kafka-<ver>/libs (deploy/local/install.sh); state in $PGFERRY_LOCAL/kafka.
#
#   kafka.sh start            format storage (once) and start; waits until the broker answers
#   kafka.sh stop             stop the broker (TERM, then KILL after 60s)
#   kafka.sh status           exit 0 if running and answering
#   kafka.sh topics ARGS...   org.apache.kafka.tools.TopicCommand --bootstrap-server <broker> ARGS...
#   kafka.sh run CLASS ARGS...  run any class from the Kafka classpath (e.g. a console producer)
#
# Optional SASL_SSL listener (the security test runs a broker of its own with it): with
# PGFERRY_KAFKA_SASL_SSL_PORT set, the broker also listens on SASL_SSL://$PGFERRY_KAFKA_HOST:<port>
# with SCRAM-SHA-512 (and SCRAM-SHA-256), its certificate and PKCS#8 key from the PEM file
# PGFERRY_KAFKA_SSL_PEM (key + chain in one file). PGFERRY_KAFKA_SCRAM_USERS holds the SCRAM
# credentials created when the storage is formatted, ';'-separated kafka-storage --add-scram
# values, e.g. 'SCRAM-SHA-512=[name=pgferry,password=secret]'. The PLAINTEXT listener stays for
# the controller, inter-broker traffic and the readiness check.
#
# PGFERRY_KAFKA_EXTRA_PROPS: server.properties lines appended after pgferry's (a later line wins),
# for tests that run a broker of their own with a setting of their own (e.g. `pgferry check`'s
# transactions test: transaction.state.log.replication.factor=2 on one broker).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PGFERRY_LOG_TAG=kafka

KAFKA_STATE="$PGFERRY_LOCAL/kafka"
KAFKA_DATA="$KAFKA_STATE/data"
KAFKA_PROPS="$KAFKA_STATE/server.properties"
KAFKA_PID="$KAFKA_STATE/kafka.pid"
KAFKA_LOG="$PGFERRY_LOGS/kafka.log"
KAFKA_LIBS="$PGFERRY_KAFKA_HOME/libs"
: "${PGFERRY_KAFKA_SASL_SSL_PORT:=}"
: "${PGFERRY_KAFKA_SSL_PEM:=}"
: "${PGFERRY_KAFKA_SCRAM_USERS:=}"
: "${PGFERRY_KAFKA_EXTRA_PROPS:=}"
: "${PGFERRY_KAFKA_HEAP:=-Xms512m -Xmx1g}"

require_libs() {
    [[ -f "$PGFERRY_KAFKA_HOME/.complete" ]] ||
        die "Kafka $PGFERRY_KAFKA_VERSION jars not in $KAFKA_LIBS (run deploy/local/install.sh)"
}

write_logging() {
    mkdir -p "$KAFKA_STATE"
    # Broker: INFO to stdout (redirected to $KAFKA_LOG).
    cat >"$KAFKA_STATE/log4j2.properties" <<'EOF'
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.clients.name = org.apache.kafka.clients
logger.clients.level = WARN
EOF
    # Command line tools: only warnings, to stderr.
    cat >"$KAFKA_STATE/log4j2-tools.properties" <<'EOF'
status = warn
appender.err.type = Console
appender.err.name = ERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.err.ref = ERR
EOF
}

# Rewritten on every start so changes here take effect on the next restart.
# A second plaintext listener PROXIED on 127.0.0.1:$PGFERRY_KAFKA_PROXIED_PORT, advertised as
# $PGFERRY_KAFKA_PROXIED_ADVERTISED (host:port), when both are set: clients that bootstrap
# through a proxy in front of it keep going through the proxy (the fault tests' network cut).
write_props() {
    mkdir -p "$KAFKA_DATA"
    local listeners advertised protocols
    listeners="PLAINTEXT://$PGFERRY_KAFKA_HOST:$PGFERRY_KAFKA_PORT"
    protocols="CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
    if [[ -n "$PGFERRY_KAFKA_SASL_SSL_PORT" ]]; then
        [[ -r "$PGFERRY_KAFKA_SSL_PEM" ]] || die "PGFERRY_KAFKA_SSL_PEM (key + certificate PEM) is not a readable file: '$PGFERRY_KAFKA_SSL_PEM'"
        listeners="$listeners,SASL_SSL://$PGFERRY_KAFKA_HOST:$PGFERRY_KAFKA_SASL_SSL_PORT"
        protocols="$protocols,SASL_SSL:SASL_SSL"
    fi
    advertised="$listeners"
    if [[ -n "${PGFERRY_KAFKA_PROXIED_PORT:-}" && -n "${PGFERRY_KAFKA_PROXIED_ADVERTISED:-}" ]]; then
        listeners+=",PROXIED://127.0.0.1:$PGFERRY_KAFKA_PROXIED_PORT"
        advertised+=",PROXIED://$PGFERRY_KAFKA_PROXIED_ADVERTISED"
        protocols+=",PROXIED:PLAINTEXT"
    fi
    cat >"$KAFKA_PROPS" <<EOF
# written by deploy/local/kafka.sh on every start; edits are lost
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$PGFERRY_KAFKA_CONTROLLER_PORT
listeners=$listeners,CONTROLLER://127.0.0.1:$PGFERRY_KAFKA_CONTROLLER_PORT
advertised.listeners=$advertised
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=$protocols
log.dirs=$KAFKA_DATA
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=false
# single broker: internal topics with replication factor 1, so transactions work
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.retention.hours=168
log.segment.bytes=1073741824
EOF
    if [[ -n "$PGFERRY_KAFKA_SASL_SSL_PORT" ]]; then
        cat >>"$KAFKA_PROPS" <<EOF
sasl.enabled.mechanisms=SCRAM-SHA-512,SCRAM-SHA-256
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.ssl.keystore.type=PEM
listener.name.sasl_ssl.ssl.keystore.location=$PGFERRY_KAFKA_SSL_PEM
EOF
    fi
    if [[ -n "$PGFERRY_KAFKA_EXTRA_PROPS" ]]; then
        printf '# PGFERRY_KAFKA_EXTRA_PROPS (later lines win)\n%s\n' "$PGFERRY_KAFKA_EXTRA_PROPS" >>"$KAFKA_PROPS"
    fi
}

kafka_java() {
    # shellcheck disable=SC2086
    "$(java_bin)" -Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$KAFKA_STATE/log4j2-tools.properties" \
        -cp "$KAFKA_LIBS/*" "$@"
}

format_storage() {
    [[ -f "$KAFKA_DATA/meta.properties" ]] && return 0
    local id
    if [[ -s "$KAFKA_STATE/cluster.id" ]]; then
        id="$(cat "$KAFKA_STATE/cluster.id")"
    else
        id="$(kafka_java kafka.tools.StorageTool random-uuid 2>>"$PGFERRY_LOGS/kafka-format.log" | tail -n1)"
        [[ -n "$id" ]] || die "could not generate a cluster id (log: $PGFERRY_LOGS/kafka-format.log)"
        echo "$id" >"$KAFKA_STATE/cluster.id"
    fi
    log "formatting storage in $KAFKA_DATA (cluster id $id)"
    local scram=() users u
    IFS=';' read -r -a users <<<"$PGFERRY_KAFKA_SCRAM_USERS"
    for u in "${users[@]}"; do
        [[ -n "$u" ]] && scram+=(--add-scram "$u")
    done
    if ! kafka_java kafka.tools.StorageTool format -t "$id" -c "$KAFKA_PROPS" "${scram[@]}" >>"$PGFERRY_LOGS/kafka-format.log" 2>&1; then
        show_log_tail "$PGFERRY_LOGS/kafka-format.log"
        die "storage format failed (log: $PGFERRY_LOGS/kafka-format.log)"
    fi
}

running_pid() { read_live_pid "$KAFKA_PID" kafka.Kafka; }

broker_answers() {
    tcp_open "$PGFERRY_KAFKA_HOST" "$PGFERRY_KAFKA_PORT" &&
        timeout 60 "$0" topics --list >/dev/null 2>>"$PGFERRY_LOGS/kafka-wait.log"
}

wait_broker() {
    local pid="$1" end
    end=$((SECONDS + PGFERRY_KAFKA_TIMEOUT))
    : >"$PGFERRY_LOGS/kafka-wait.log"
    while :; do
        if ! pid_alive "$pid"; then
            show_log_tail "$KAFKA_LOG"
            die "broker process $pid exited during startup (log: $KAFKA_LOG)"
        fi
        broker_answers && return 0
        if ((SECONDS >= end)); then
            show_log_tail "$KAFKA_LOG"
            show_log_tail "$PGFERRY_LOGS/kafka-wait.log" 10
            die "broker not answering on $(kafka_bootstrap) after ${PGFERRY_KAFKA_TIMEOUT}s (log: $KAFKA_LOG)"
        fi
        sleep 1
    done
}

start() {
    require_libs
    local pid
    if pid="$(running_pid)"; then
        log "already running (pid $pid)"
        wait_broker "$pid"
        log "up on $(kafka_bootstrap)"
        return 0
    fi
    rm -f "$KAFKA_PID"
    for port in "$PGFERRY_KAFKA_PORT" "$PGFERRY_KAFKA_CONTROLLER_PORT"; do
        tcp_open 127.0.0.1 "$port" && die "port $port is taken by another process"
    done
    write_logging
    write_props
    format_storage
    [[ -f "$KAFKA_LOG" ]] && mv -f "$KAFKA_LOG" "$KAFKA_LOG.1"
    local t0=$SECONDS
    # shellcheck disable=SC2086
    setsid nohup "$(java_bin)" $PGFERRY_KAFKA_HEAP -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
        -Djava.awt.headless=true -Dlog4j2.configurationFile="$KAFKA_STATE/log4j2.properties" \
        -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_PROPS" >"$KAFKA_LOG" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$KAFKA_PID"
    log "started pid $pid, waiting for $(kafka_bootstrap) (log: $KAFKA_LOG)"
    wait_broker "$pid"
    log "up on $(kafka_bootstrap) after $((SECONDS - t0))s"
}

stop() {
    local pid
    if pid="$(running_pid)"; then
        log "stopping pid $pid"
        stop_pid "$pid" kafka 60
        log "stopped"
    else
        log "not running"
    fi
    rm -f "$KAFKA_PID"
}

status() {
    local pid
    if pid="$(running_pid)" && broker_answers; then
        echo "kafka: running  $(kafka_bootstrap)  pid $pid  (log: $KAFKA_LOG)"
    else
        echo "kafka: DOWN     $(kafka_bootstrap)  (log: $KAFKA_LOG)"
        return 1
    fi
}

cmd="${1:-}"
case "$cmd" in
start) start ;;
stop) stop ;;
status) status ;;
topics)
    shift
    require_libs
    [[ -f "$KAFKA_STATE/log4j2-tools.properties" ]] || write_logging
    kafka_java org.apache.kafka.tools.TopicCommand --bootstrap-server "$(kafka_bootstrap)" "$@"
    ;;
run)
    shift
    require_libs
    [[ -f "$KAFKA_STATE/log4j2-tools.properties" ]] || write_logging
    kafka_java "$@"
    ;;
*)
    echo "usage: $0 start | stop | status | topics ARGS... | run CLASS ARGS..." >&2
    exit 2
    ;;
esac
