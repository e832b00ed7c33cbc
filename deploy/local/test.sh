#!/usr/bin/env bash
# The test command: install what is missing, start the local services (3 PostgreSQL nodes,
# Kafka, Apicurio Registry), build pgferry and run every test of the workspace (unit tests
# and the end-to-end tests against the real services). Services stay up afterwards so a
# second run is fast; stop them with deploy/local/down.sh.
#   deploy/local/test.sh [cargo test args...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PGFERRY_LOG_TAG=test
cd "$PGFERRY_REPO"

"$PGFERRY_DEPLOY/up.sh" 3 >&2
eval "$("$PGFERRY_DEPLOY/env.sh" 3)"
command -v cargo >/dev/null 2>&1 || { [[ -f "$HOME/.cargo/env" ]] && source "$HOME/.cargo/env"; }
command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (rustup) first"
log "building pgferry"
cargo build --locked --bin pgferry
log "running tests"
# Test binaries run one after another; tests inside one binary share the machine's 2 cores.
cargo test --locked --workspace -- --test-threads=2 "$@"
