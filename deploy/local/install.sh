#!/usr/bin/env bash
# Install everything the local services need on a fresh Debian 12 machine:
#   - apt packages (PostgreSQL 15 server/client, build deps for rdkafka/libpq, tools, Java, Maven,
#     systemd-analyze and promtool for the deploy files' checks)
#   - Apache Kafka broker + tools jars from Maven Central   -> $PGFERRY_CACHE/kafka-<ver>/libs
#   - Apicurio Registry runnable app zip from Maven Central -> $PGFERRY_CACHE/apicurio-registry-<ver>
#   - Kafka Connect plugins (Debezium JDBC sink, Apicurio Avro converter) from Maven Central
#                                                          -> $PGFERRY_CACHE/connect-plugins-<vers>
#   - a Python venv with confluent-kafka (PyPI) for the analytics-tap test -> $PGFERRY_LOCAL/python-venv
#   - with PGFERRY_INSTALL_BENCH=1 (bench.sh): a Python venv with matplotlib (PyPI) for the
#     benchmark chart -> $PGFERRY_LOCAL/bench-venv
# Idempotent: installed packages and cached downloads are skipped.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PGFERRY_LOG_TAG=install

APT_PACKAGES=(
    "postgresql-$PGFERRY_PG_VERSION" "postgresql-client-$PGFERRY_PG_VERSION"
    "postgresql-$PGFERRY_PG_VERSION-pglogical" # the comparison in bench.sh
    libpq-dev libsasl2-dev libssl-dev libzstd-dev cmake pkg-config curl unzip python3 python3-venv
    haproxy # the failover test routes clients by /healthz; the security test's registry front (deploy/haproxy)
    openssl # certs.sh: the security test's CA and server certificates
    libfaketime # pg.sh's PGFERRY_PG_FAKETIME: the convergence test's node with a skewed clock
    # The deploy files' checks (integration-tests/tests/deploy_files.rs): systemd-analyze verifies
    # deploy/systemd, promtool (in Debian's prometheus package) checks and tests
    # deploy/prometheus and lints pgferry's /metrics.
    systemd prometheus
)
# JDK (not only a JRE): smoke.sh runs a Java source file, which needs the compiler module.
command -v javac >/dev/null 2>&1 || APT_PACKAGES+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null 2>&1 || APT_PACKAGES+=(maven)

install_apt() {
    local missing=() p
    for p in "${APT_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$p")
        fi
    done
    if ((${#missing[@]} == 0)); then
        log "apt packages: all present"
        return
    fi
    log "apt packages missing: ${missing[*]}"
    local sudo=()
    ((EUID == 0)) || sudo=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q || die "apt-get update failed"
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" \
        || die "apt-get install failed for: ${missing[*]}"
    # Only promtool is wanted from the prometheus package: on a host run by systemd, its postinst
    # has just enabled and started a Prometheus server (port 9090); stop and disable it.
    if [[ " ${missing[*]} " == *" prometheus "* && -d /run/systemd/system ]]; then
        log "prometheus: installed for promtool; stopping and disabling the prometheus service it started"
        "${sudo[@]}" systemctl disable --now prometheus.service || log "could not disable prometheus.service"
    fi
}

# Kafka: copy kafka_2.13 + kafka-tools + kafka-storage + log4j2 binding with all runtime deps.
install_kafka() {
    local home="$PGFERRY_KAFKA_HOME"
    if [[ -f "$home/.complete" ]]; then
        log "kafka $PGFERRY_KAFKA_VERSION: cached in $home"
        return
    fi
    log "kafka $PGFERRY_KAFKA_VERSION: fetching jars from Maven Central into $home/libs"
    local tmp="$home.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$tmp/libs"
    if ! (cd "$PGFERRY_DEPLOY/maven/kafka" &&
        mvn -B -q dependency:copy-dependencies -DincludeScope=runtime \
            -Dkafka.version="$PGFERRY_KAFKA_VERSION" -DoutputDirectory="$tmp/libs") >"$PGFERRY_LOGS/install-kafka.log" 2>&1; then
        show_log_tail "$PGFERRY_LOGS/install-kafka.log" 30
        rm -rf "$tmp"
        die "fetching Kafka $PGFERRY_KAFKA_VERSION failed (log: $PGFERRY_LOGS/install-kafka.log)"
    fi
    [[ -f "$tmp/libs/kafka_2.13-$PGFERRY_KAFKA_VERSION.jar" ]] || die "kafka_2.13-$PGFERRY_KAFKA_VERSION.jar missing after download"
    echo "$PGFERRY_KAFKA_VERSION" >"$tmp/.complete"
    rm -rf "$home"
    mv "$tmp" "$home"
    log "kafka $PGFERRY_KAFKA_VERSION: $(find "$home/libs" -name "*.jar" | wc -l) jars"
}

# Apicurio Registry: io.apicurio:apicurio-registry-app:<ver>:zip:all is the runnable Quarkus app.
install_apicurio() {
    local home="$PGFERRY_APICURIO_HOME" v="$PGFERRY_APICURIO_VERSION"
    if [[ -f "$home/.complete" ]]; then
        log "apicurio registry $v: cached in $home"
        return
    fi
    local dl="$PGFERRY_CACHE/downloads" zip
    zip="$dl/apicurio-registry-app-$v-all.zip"
    mkdir -p "$dl"
    if [[ ! -s "$zip" ]]; then
        log "apicurio registry $v: fetching io.apicurio:apicurio-registry-app:$v:zip:all from Maven Central"
        if ! (cd "$dl" && mvn -B -q dependency:copy \
            -Dartifact="io.apicurio:apicurio-registry-app:$v:zip:all" \
            -DoutputDirectory="$dl") >"$PGFERRY_LOGS/install-apicurio.log" 2>&1; then
            show_log_tail "$PGFERRY_LOGS/install-apicurio.log" 30
            die "fetching Apicurio Registry $v failed (log: $PGFERRY_LOGS/install-apicurio.log)." \
                "Note: Maven Central has the zip:all for 3.0.9 but not for 3.3.2/3.3.3."
        fi
    fi
    local tmp="$home.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    unzip -q "$zip" -d "$tmp" || { rm -rf "$tmp"; die "unzip of $zip failed"; }
    if ! ls "$tmp"/*-runner.jar >/dev/null 2>&1 && [[ ! -f "$tmp/quarkus-app/quarkus-run.jar" ]]; then
        rm -rf "$tmp"
        die "no *-runner.jar or quarkus-app/quarkus-run.jar in $zip"
    fi
    echo "$v" >"$tmp/.complete"
    rm -rf "$home"
    mv "$tmp" "$home"
    rm -f "$zip" # Maven's local repository keeps a copy
    log "apicurio registry $v: unpacked into $home"
}

# Kafka Connect plugin directories for the Debezium JDBC sink test: one per plugin, each with
# its runtime dependencies minus Kafka's and Jackson's (both come from Kafka's libs), then
# ServiceLoader manifests written by Kafka's own ConnectPluginPath tool, so the worker can use
# plugin.discovery=service_load instead of scanning every jar (minutes on two cores).
install_connect_plugins() {
    local home="$PGFERRY_CONNECT_PLUGINS"
    if [[ -f "$home/.complete" ]]; then
        log "connect plugins: cached in $home"
        return
    fi
    log "connect plugins: fetching debezium-connector-jdbc $PGFERRY_DEBEZIUM_JDBC_VERSION and" \
        "apicurio-registry-utils-converter $PGFERRY_APICURIO_CONVERTER_VERSION from Maven Central"
    local tmp="$home.tmp.$$" logf="$PGFERRY_LOGS/install-connect.log"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    if ! { (cd "$PGFERRY_DEPLOY/maven/connect-jdbc" &&
        mvn -B -q dependency:copy-dependencies -DincludeScope=runtime \
            -Ddebezium.version="$PGFERRY_DEBEZIUM_JDBC_VERSION" -DoutputDirectory="$tmp/debezium-jdbc") &&
        (cd "$PGFERRY_DEPLOY/maven/connect-apicurio" &&
            mvn -B -q dependency:copy-dependencies -DincludeScope=runtime \
                -Dapicurio.version="$PGFERRY_APICURIO_CONVERTER_VERSION" -DoutputDirectory="$tmp/apicurio-converter") &&
        "$PGFERRY_DEPLOY/kafka.sh" run org.apache.kafka.tools.ConnectPluginPath sync-manifests --plugin-path "$tmp"; } \
        >"$logf" 2>&1; then
        show_log_tail "$logf" 30
        rm -rf "$tmp"
        die "fetching the Kafka Connect plugins failed (log: $logf)"
    fi
    [[ -f "$tmp/debezium-jdbc/debezium-connector-jdbc-$PGFERRY_DEBEZIUM_JDBC_VERSION.jar" ]] ||
        die "debezium-connector-jdbc-$PGFERRY_DEBEZIUM_JDBC_VERSION.jar missing after download"
    echo "$PGFERRY_DEBEZIUM_JDBC_VERSION $PGFERRY_APICURIO_CONVERTER_VERSION" >"$tmp/.complete"
    rm -rf "$home"
    mv "$tmp" "$home"
    log "connect plugins: $(find "$home" -name "*.jar" | wc -l) jars in $home"
}

# A Python venv from a requirements file (PyPI), rebuilt when that file changes.
#   install_venv WHAT VENV REQUIREMENTS CHECK-IMPORT
install_venv() {
    local what="$1" venv="$2" req="$3" check="$4" want logf
    want="$(sha256sum "$req" | cut -d' ' -f1)"
    logf="$PGFERRY_LOGS/install-$what.log"
    if [[ -x "$venv/bin/python" && "$(cat "$venv/.complete" 2>/dev/null)" == "$want" ]]; then
        log "$what venv: up to date in $venv"
        return
    fi
    log "$what venv: installing $req into $venv (PyPI)"
    rm -rf "$venv"
    if ! { python3 -m venv "$venv" && "$venv/bin/pip" install -q --disable-pip-version-check -r "$req" &&
        "$venv/bin/python" -c "import $check"; } >"$logf" 2>&1; then
        show_log_tail "$logf" 30
        rm -rf "$venv"
        die "$what venv failed (log: $logf)"
    fi
    echo "$want" >"$venv/.complete"
    log "$what venv: ready in $venv"
}

install_apt
mkdir -p "$PGFERRY_CACHE"
install_kafka
install_apicurio
install_connect_plugins
# Python venv for integration-tests/python (confluent-kafka wheels bundle librdkafka).
install_venv python "$PGFERRY_PYTHON_VENV" "$PGFERRY_REPO/integration-tests/python/requirements.txt" \
    confluent_kafka.schema_registry.avro
# Python venv with matplotlib for the chart of the benchmark comparison.
if [[ "${PGFERRY_INSTALL_BENCH:-0}" == 1 ]]; then
    install_venv bench "$PGFERRY_BENCH_VENV" "$PGFERRY_REPO/bench/requirements.txt" matplotlib.pyplot
fi
[[ -x "$PGFERRY_PG_BIN/initdb" ]] || die "PostgreSQL binaries not found in $PGFERRY_PG_BIN"
log "done"
