#!/usr/bin/env bash
# Local PostgreSQL test nodes, each its own cluster (initdb once) in $PGFERRY_LOCAL/pg/n<i>,
# listening on 127.0.0.1:$((PGFERRY_PG_BASE_PORT + i)), superuser postgres / pgferry.
# PGFERRY_PG_PRELOAD sets shared_preload_libraries (bench.sh: pglogical on its own instances,
# which it starts with PGFERRY_LOCAL and PGFERRY_PG_BASE_PORT of their own).
# PGFERRY_PG_SHARED_BUFFERS sets shared_buffers (default 128MB, PostgreSQL's own default).
#
#   pg.sh start [N]        create (once) and start nodes 1..N (default 3); waits until each answers
#   pg.sh stop [N]         stop every node found under $PGFERRY_LOCAL/pg (N is ignored)
#   pg.sh status [N]       show nodes 1..N (default: every node found); exit 1 if any is down
#   pg.sh start-node I     start only node I
#   pg.sh stop-node I      stop only node I (fast shutdown)
#   pg.sh kill-node I      stop only node I with an immediate shutdown (crash-like)
#
# TLS (the security test starts servers of its own with it): PGFERRY_PG_SSL_CERT and
# PGFERRY_PG_SSL_KEY (PEM files) turn on `ssl` with that certificate (copied into each data
# directory, readable only by the server); PGFERRY_PG_SSL_ONLY=1 then makes pg_hba.conf accept
# TCP sessions only over TLS (`hostssl`, SCRAM-SHA-256), so a client without TLS is refused.
#
# Clock skew (the convergence test starts a server of its own with it): PGFERRY_PG_FAKETIME, a
# libfaketime offset such as `+0.05` or `-0.05` (seconds), runs the servers under libfaketime
# (Debian package libfaketime, deploy/local/install.sh): their clock — `now()`, commit times — is
# shifted by that much from the host's.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PGFERRY_LOG_TAG=pg

PG_ROOT="$PGFERRY_LOCAL/pg"
: "${PGFERRY_PG_SSL_CERT:=}"
: "${PGFERRY_PG_SSL_KEY:=}"
: "${PGFERRY_PG_SSL_ONLY:=0}"
: "${PGFERRY_PG_FAKETIME:=}"

[[ -x "$PGFERRY_PG_BIN/pg_ctl" ]] || die "PostgreSQL binaries not found in $PGFERRY_PG_BIN (run deploy/local/install.sh)"

# The server refuses to run as root: run its tools as the postgres user.
if ((EUID == 0)); then
    id postgres >/dev/null 2>&1 || die "user 'postgres' does not exist (install postgresql-$PGFERRY_PG_VERSION)"
    as_pg() { runuser -u postgres -- "$@"; }
    PG_OWNER=postgres
else
    as_pg() { "$@"; }
    PG_OWNER="$(id -un)"
fi

# Unix sockets: in the state dir unless the path would be too long for a socket (107 bytes).
if ((${#PG_ROOT} + 25 < 100)); then
    SOCK_DIR="$PG_ROOT/run"
else
    SOCK_DIR="/tmp/pgferry-pg-$(echo "$PG_ROOT" | md5sum | cut -c1-8)"
fi

node_dir() { echo "$PG_ROOT/n$1"; }

# The environment the server runs in: libfaketime preloaded with PGFERRY_PG_FAKETIME.
server_env=()
if [[ -n "$PGFERRY_PG_FAKETIME" ]]; then
    faketime_lib="$(ls /usr/lib/*/faketime/libfaketime.so.1 2>/dev/null | head -1 || true)"
    [[ -n "$faketime_lib" ]] || die "PGFERRY_PG_FAKETIME needs libfaketime (apt-get install libfaketime, or deploy/local/install.sh)"
    server_env=(env "LD_PRELOAD=$faketime_lib" "FAKETIME=$PGFERRY_PG_FAKETIME" FAKETIME_DONT_FAKE_MONOTONIC=1)
fi
node_log() { echo "$PGFERRY_LOGS/pg-n$1.log"; }

# Every directory above $PG_ROOT must be searchable (x) by postgres; add o+x where it is not.
ensure_traversable() {
    ((EUID == 0)) || return 0
    local d dirs=()
    d="$PG_ROOT"
    while [[ "$d" != "/" && -n "$d" ]]; do
        d="$(dirname "$d")"
        dirs=("$d" "${dirs[@]}")
    done
    for d in "${dirs[@]}"; do # from / downwards
        if ! runuser -u postgres -- test -x "$d" 2>/dev/null; then
            log "making $d searchable by postgres (chmod o+x)"
            chmod o+x "$d"
        fi
    done
}

prepare_dirs() {
    mkdir -p "$PG_ROOT" "$SOCK_DIR" "$PGFERRY_LOGS"
    ensure_traversable
    chown "$PG_OWNER" "$PG_ROOT" "$SOCK_DIR"
    chmod 0755 "$PG_ROOT"
    chmod 0775 "$SOCK_DIR"
}

init_node() {
    local i="$1" dir pwfile
    dir="$(node_dir "$i")"
    [[ -f "$dir/PG_VERSION" ]] && return 0
    log "n$i: initdb in $dir"
    rm -rf "$dir"
    mkdir -p "$dir"
    chown "$PG_OWNER" "$dir"
    chmod 0700 "$dir"
    pwfile="$(mktemp)"
    printf '%s\n' "$PGFERRY_PG_PASSWORD" >"$pwfile"
    chown "$PG_OWNER" "$pwfile"
    if ! as_pg "$PGFERRY_PG_BIN/initdb" -D "$dir" -U "$PGFERRY_PG_USER" --pwfile="$pwfile" \
        -E UTF8 --locale=C --auth-local=trust --auth-host=scram-sha-256 \
        >"$PGFERRY_LOGS/initdb-n$i.log" 2>&1; then
        rm -f "$pwfile"
        show_log_tail "$PGFERRY_LOGS/initdb-n$i.log"
        rm -rf "$dir"
        die "n$i: initdb failed (log: $PGFERRY_LOGS/initdb-n$i.log)"
    fi
    rm -f "$pwfile"
    echo "include_if_exists = 'pgferry.conf'" >>"$dir/postgresql.conf"
}

# Settings are rewritten on every start so changes here take effect on the next restart.
write_config() {
    local i="$1" dir
    dir="$(node_dir "$i")"
    cat >"$dir/pgferry.conf" <<EOF
# written by deploy/local/pg.sh on every start; edits are lost
port = $(pg_port "$i")
listen_addresses = '127.0.0.1'
unix_socket_directories = '$SOCK_DIR'
wal_level = logical
track_commit_timestamp = on
max_replication_slots = 256
max_wal_senders = 64
max_worker_processes = 32
max_connections = 300
shared_buffers = ${PGFERRY_PG_SHARED_BUFFERS:-128MB}
fsync = on
password_encryption = 'scram-sha-256'
cluster_name = 'pgferry-n$i'
log_line_prefix = '%m [%p] %q%u@%d '
EOF
    if [[ -n "$PGFERRY_PG_PRELOAD" ]]; then
        echo "shared_preload_libraries = '$PGFERRY_PG_PRELOAD'" >>"$dir/pgferry.conf"
    fi
    local host=host
    if [[ -n "$PGFERRY_PG_SSL_CERT" ]]; then
        [[ -r "$PGFERRY_PG_SSL_CERT" && -r "$PGFERRY_PG_SSL_KEY" ]] ||
            die "n$i: PGFERRY_PG_SSL_CERT / PGFERRY_PG_SSL_KEY are not readable files"
        install -m 0644 -o "$PG_OWNER" "$PGFERRY_PG_SSL_CERT" "$dir/server.crt"
        install -m 0600 -o "$PG_OWNER" "$PGFERRY_PG_SSL_KEY" "$dir/server.key"
        printf '%s\n' "ssl = on" "ssl_cert_file = 'server.crt'" "ssl_key_file = 'server.key'" >>"$dir/pgferry.conf"
        [[ "$PGFERRY_PG_SSL_ONLY" == 1 ]] && host=hostssl
    else
        echo "ssl = off" >>"$dir/pgferry.conf"
    fi
    cat >"$dir/pg_hba.conf" <<EOF
# written by deploy/local/pg.sh on every start; edits are lost
# TYPE  DATABASE     USER  ADDRESS        METHOD
local   all          all                  trust
local   replication  all                  trust
$host    all          all   127.0.0.1/32   scram-sha-256
$host    replication  all   127.0.0.1/32   scram-sha-256
EOF
    chown "$PG_OWNER" "$dir/pgferry.conf" "$dir/pg_hba.conf"
}

node_running() {
    local dir
    dir="$(node_dir "$1")"
    [[ -f "$dir/PG_VERSION" ]] || return 1
    as_pg "$PGFERRY_PG_BIN/pg_ctl" -D "$dir" status >/dev/null 2>&1
}

# Wait until the node accepts a real password login over TCP.
wait_node() {
    local i="$1" port end out=""
    port="$(pg_port "$i")"
    end=$((SECONDS + PGFERRY_PG_TIMEOUT))
    while :; do
        if "$PGFERRY_PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$port" -t 2 >/dev/null 2>&1 &&
            out="$(PGPASSWORD="$PGFERRY_PG_PASSWORD" PGCONNECT_TIMEOUT=3 "$PGFERRY_PG_BIN/psql" \
                -h 127.0.0.1 -p "$port" -U "$PGFERRY_PG_USER" -d postgres -XAtq -c 'select 1' 2>&1)" &&
            [[ "$out" == 1 ]]; then
            return 0
        fi
        if ((SECONDS >= end)); then
            show_log_tail "$(node_log "$i")"
            die "n$i: not answering 'select 1' on 127.0.0.1:$port after ${PGFERRY_PG_TIMEOUT}s (last psql output: ${out:-none}; log: $(node_log "$i"))"
        fi
        sleep 0.3
    done
}

start_node() {
    local i="$1" dir port logf
    dir="$(node_dir "$i")"
    port="$(pg_port "$i")"
    logf="$(node_log "$i")"
    init_node "$i"
    write_config "$i"
    if node_running "$i"; then
        log "n$i: already running on 127.0.0.1:$port"
    else
        if tcp_open 127.0.0.1 "$port"; then
            die "n$i: port 127.0.0.1:$port is taken by another process"
        fi
        touch "$logf"
        chown "$PG_OWNER" "$logf"
        if ! as_pg "${server_env[@]}" "$PGFERRY_PG_BIN/pg_ctl" -D "$dir" -l "$logf" -w -t "$PGFERRY_PG_TIMEOUT" start >/dev/null 2>&1; then
            show_log_tail "$logf"
            die "n$i: pg_ctl start failed (log: $logf)"
        fi
    fi
    wait_node "$i"
    log "n$i: up on 127.0.0.1:$port (data $dir, log $logf)"
}

stop_node() {
    local i="$1" mode="${2:-fast}" dir
    dir="$(node_dir "$i")"
    if ! node_running "$i"; then
        log "n$i: not running"
        return 0
    fi
    if ! as_pg "$PGFERRY_PG_BIN/pg_ctl" -D "$dir" -m "$mode" -w -t 60 stop >/dev/null 2>&1; then
        log "n$i: $mode shutdown did not finish in 60s; trying immediate"
        as_pg "$PGFERRY_PG_BIN/pg_ctl" -D "$dir" -m immediate -w -t 30 stop >/dev/null 2>&1 ||
            die "n$i: could not stop (log: $(node_log "$i"))"
    fi
    log "n$i: stopped ($mode)"
}

found_nodes() {
    local d
    for d in "$PG_ROOT"/n*; do
        [[ -f "$d/PG_VERSION" ]] || continue
        basename "$d" | sed 's/^n//'
    done | sort -n
}

check_n() { [[ "$1" =~ ^[1-9][0-9]*$ ]] || die "node count/index must be a positive integer, got '$1'"; }

cmd="${1:-}"
case "$cmd" in
start)
    n="${2:-3}"
    check_n "$n"
    prepare_dirs
    for ((i = 1; i <= n; i++)); do start_node "$i"; done
    echo "$n" >"$PG_ROOT/nodes" # read by env.sh
    ;;
start-node)
    check_n "${2:-}"
    prepare_dirs
    start_node "$2"
    ;;
stop)
    for i in $(found_nodes); do stop_node "$i" fast; done
    ;;
stop-node)
    check_n "${2:-}"
    stop_node "$2" fast
    ;;
kill-node)
    check_n "${2:-}"
    stop_node "$2" immediate
    ;;
status)
    if [[ -n "${2:-}" ]]; then
        check_n "$2"
        nodes="$(seq 1 "$2")"
    else
        nodes="$(found_nodes)"
    fi
    rc=0
    for i in $nodes; do
        if node_running "$i" && "$PGFERRY_PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$(pg_port "$i")" -t 2; then
            echo "pg n$i: running  127.0.0.1:$(pg_port "$i")  $(pg_dsn "$i")"
        else
            echo "pg n$i: DOWN     127.0.0.1:$(pg_port "$i")  (log: $(node_log "$i"))"
            rc=1
        fi
    done
    [[ -n "$nodes" ]] || { echo "pg: no nodes under $PG_ROOT"; rc=1; }
    exit "$rc"
    ;;
*)
    echo "usage: $0 start [N] | stop | status [N] | start-node I | stop-node I | kill-node I" >&2
    exit 2
    ;;
esac
