# shellcheck shell=bash disable=SC2034
# Sourced by the deploy/local/*.sh scripts: locations, ports, versions and small helpers.
# Every value below can be overridden from the environment.

PGFERRY_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PGFERRY_DEPLOY="$PGFERRY_REPO/deploy/local"

# --- locations ---------------------------------------------------------------
# State (data dirs, pid files, logs). Logs go to $PGFERRY_LOCAL/logs/.
: "${PGFERRY_LOCAL:=$PGFERRY_REPO/.local}"
# Downloads (Kafka jars, Apicurio app) kept across runs so a second start is fast.
: "${PGFERRY_CACHE:=${HOME:-/root}/.cache/pgferry}"
PGFERRY_LOGS="$PGFERRY_LOCAL/logs"
# Python venv with confluent-kafka for the analytics-tap test (install.sh builds it).
: "${PGFERRY_PYTHON_VENV:=$PGFERRY_LOCAL/python-venv}"
# Python venv with matplotlib for the benchmark chart (install.sh with PGFERRY_INSTALL_BENCH=1).
: "${PGFERRY_BENCH_VENV:=$PGFERRY_LOCAL/bench-venv}"

# --- versions ----------------------------------------------------------------
: "${PGFERRY_PG_VERSION:=15}"
: "${PGFERRY_PG_BIN:=/usr/lib/postgresql/$PGFERRY_PG_VERSION/bin}"
# Kafka broker + tools from Maven Central (org.apache.kafka:kafka_2.13 etc.).
: "${PGFERRY_KAFKA_VERSION:=4.1.1}"
# Apicurio Registry runnable app (io.apicurio:apicurio-registry-app:<v>:zip:all).
# 3.0.9 is the newest 3.x whose "all" zip Maven Central serves (3.3.2/3.3.3 have no zip).
: "${PGFERRY_APICURIO_VERSION:=3.0.9}"

# Kafka Connect plugins for the Debezium JDBC sink test (runs in Kafka's own libs, which hold
# Connect): io.debezium:debezium-connector-jdbc and Apicurio's Avro converter
# (io.apicurio:apicurio-registry-utils-converter), both from Maven Central.
: "${PGFERRY_DEBEZIUM_JDBC_VERSION:=3.5.0.Final}"
: "${PGFERRY_APICURIO_CONVERTER_VERSION:=2.6.13.Final}"

PGFERRY_KAFKA_HOME="$PGFERRY_CACHE/kafka-$PGFERRY_KAFKA_VERSION"
PGFERRY_CONNECT_PLUGINS="$PGFERRY_CACHE/connect-plugins-$PGFERRY_DEBEZIUM_JDBC_VERSION-$PGFERRY_APICURIO_CONVERTER_VERSION"
PGFERRY_APICURIO_HOME="$PGFERRY_CACHE/apicurio-registry-$PGFERRY_APICURIO_VERSION"

# --- ports / endpoints -------------------------------------------------------
# PostgreSQL node i (1-based) listens on 127.0.0.1:$((PGFERRY_PG_BASE_PORT + i)).
: "${PGFERRY_PG_BASE_PORT:=25430}"
: "${PGFERRY_PG_USER:=postgres}"
: "${PGFERRY_PG_PASSWORD:=pgferry}"
# shared_preload_libraries of the nodes pg.sh starts (empty: none).
: "${PGFERRY_PG_PRELOAD:=}"
# The benchmark's own PostgreSQL instances (bench.sh): state under $PGFERRY_LOCAL/bench, node i
# on 127.0.0.1:$((PGFERRY_BENCH_PG_BASE_PORT + i)), pglogical preloaded; the test nodes above
# are left alone.
: "${PGFERRY_BENCH_PG_BASE_PORT:=25530}"
: "${PGFERRY_KAFKA_HOST:=127.0.0.1}"
: "${PGFERRY_KAFKA_PORT:=19092}"
: "${PGFERRY_KAFKA_CONTROLLER_PORT:=19093}"
: "${PGFERRY_REGISTRY_HOST:=127.0.0.1}"
: "${PGFERRY_REGISTRY_PORT:=18081}"

# --- deadlines (seconds) -----------------------------------------------------
: "${PGFERRY_PG_TIMEOUT:=60}"
: "${PGFERRY_KAFKA_TIMEOUT:=180}"
: "${PGFERRY_REGISTRY_TIMEOUT:=240}"

pg_port() { echo $((PGFERRY_PG_BASE_PORT + $1)); }
pg_dsn() { echo "postgres://$PGFERRY_PG_USER:$PGFERRY_PG_PASSWORD@127.0.0.1:$(pg_port "$1")/postgres"; }
kafka_bootstrap() { echo "$PGFERRY_KAFKA_HOST:$PGFERRY_KAFKA_PORT"; }
registry_base() { echo "http://$PGFERRY_REGISTRY_HOST:$PGFERRY_REGISTRY_PORT"; }
registry_ccompat() { echo "$(registry_base)/apis/ccompat/v7"; }

# --- helpers -----------------------------------------------------------------
log() { printf '[%s] %s\n' "${PGFERRY_LOG_TAG:-pgferry}" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "${PGFERRY_LOG_TAG:-pgferry}" "$*" >&2; exit 1; }

# Print the last lines of a log file to stderr (for failure reports).
show_log_tail() {
    local f="$1" n="${2:-40}"
    if [[ -f "$f" ]]; then
        printf '%s\n' "----- last $n lines of $f -----" >&2
        tail -n "$n" "$f" >&2 || true
        printf '%s\n' "----- end of $f -----" >&2
    fi
}

# True if something accepts TCP connections on host:port.
tcp_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# pid_alive PID [CMDLINE-SUBSTRING]: the process exists (and its command line
# contains the substring, which guards against a recycled pid).
pid_alive() {
    local pid="$1" want="${2:-}"
    [[ -n "$pid" && "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    if [[ -n "$want" ]]; then
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$want" || return 1
    fi
}

# Pid from a pid file if that process is alive (and matches), else nothing.
read_live_pid() {
    local file="$1" want="${2:-}" pid
    [[ -f "$file" ]] || return 1
    pid="$(head -n1 "$file" 2>/dev/null || true)"
    pid_alive "$pid" "$want" || return 1
    echo "$pid"
}

# Stop a process started by these scripts: TERM, wait up to $3 s, then KILL.
stop_pid() {
    local pid="$1" what="$2" timeout="${3:-60}" end
    kill -TERM "$pid" 2>/dev/null || return 0
    end=$((SECONDS + timeout))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= end)); then
            log "$what (pid $pid) did not exit within ${timeout}s; sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.5
    done
}

# Java with the JVM from PATH or JAVA_HOME.
java_bin() {
    if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
        echo "$JAVA_HOME/bin/java"
    else
        command -v java || die "java not found (run deploy/local/install.sh)"
    fi
}

mkdir -p "$PGFERRY_LOCAL" "$PGFERRY_LOGS"
# Keep the state dir out of git without touching the repository's .gitignore.
[[ -f "$PGFERRY_LOCAL/.gitignore" ]] || echo '*' >"$PGFERRY_LOCAL/.gitignore"
