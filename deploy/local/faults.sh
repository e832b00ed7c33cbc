#!/usr/bin/env bash
# The fault suite: the ledger workload on three nodes while each kind of fault is injected
# (integration-tests/tests/faults.rs). Starts the shared services like test.sh (the tests break
# only PostgreSQL servers, Kafka brokers and registries of their own, and proxies in front of
# the shared ones), builds pgferry and runs the fault tests one after another. Prints one
# `FAULT kind=...` line per fault kind and writes them to $PGFERRY_LOGS/faults.txt.
#   deploy/local/faults.sh [--rounds N] [test name filter...]
# Needs root (the disk-full test mounts a tmpfs; PostgreSQL runs as the postgres user).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PGFERRY_LOG_TAG=faults
cd "$PGFERRY_REPO"

rounds=3
filters=()
while (($#)); do
    case "$1" in
    --rounds)
        [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || die "--rounds takes a positive integer"
        rounds="$2"
        shift 2
        ;;
    -h | --help)
        sed -n '2,8p' "$0"
        exit 0
        ;;
    *)
        filters+=("faults::$1")
        shift
        ;;
    esac
done

# The shared services: started unless they already answer (then they are left as they are).
shared_up() {
    local i
    for i in 1 2 3; do tcp_open 127.0.0.1 "$(pg_port "$i")" || return 1; done
    tcp_open "$PGFERRY_KAFKA_HOST" "$PGFERRY_KAFKA_PORT" && curl -sf -m 5 -o /dev/null "$(registry_ccompat)/subjects"
}
if shared_up; then
    log "shared services answer; not starting them"
else
    "$PGFERRY_DEPLOY/up.sh" 3 >&2
fi
eval "$("$PGFERRY_DEPLOY/env.sh" 3)"
command -v cargo >/dev/null 2>&1 || { [[ -f "$HOME/.cargo/env" ]] && source "$HOME/.cargo/env"; }
command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (rustup) first"
log "building pgferry"
cargo build --locked --bin pgferry
log "running the fault suite, $rounds rounds per fault kind"
out="$PGFERRY_LOGS/faults.out"
t0=$SECONDS
set +e
# The fault tests are the module `faults` of the suite binary; named kinds narrow it.
((${#filters[@]})) || filters=("faults::")
PGFERRY_FAULT_ROUNDS="$rounds" cargo test --locked -p pgferry-integration-tests --test suite -- \
    --test-threads=1 --nocapture "${filters[@]}" 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
set -e
grep -E '^FAULT ' "$out" >"$PGFERRY_LOGS/faults.txt" || true
log "done in $((SECONDS - t0)) s (exit status $rc); FAULT lines:"
cat "$PGFERRY_LOGS/faults.txt"
exit "$rc"
