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
# The Python consumer test (integration-tests/tests/python_consumer.rs) runs this interpreter.
export PGFERRY_PYTHON="$PGFERRY_PYTHON_VENV/bin/python"
# The Debezium JDBC sink test (integration-tests/tests/jdbc_sink.rs) runs Kafka Connect from these.
export PGFERRY_KAFKA_LIBS="$PGFERRY_KAFKA_HOME/libs" PGFERRY_CONNECT_PLUGINS
# The restore test (integration-tests/tests/replay.rs) runs pg_dump and pg_restore from here.
export PGFERRY_PG_BIN
command -v cargo >/dev/null 2>&1 || { [[ -f "$HOME/.cargo/env" ]] && source "$HOME/.cargo/env"; }
command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (rustup) first"
log "building pgferry"
cargo build --locked --bin pgferry
log "running tests"
# Test binaries run one after another (the end-to-end tests are one binary,
# integration-tests/tests/suite.rs); two tests at a time share the machine's 2 cores.
out="$PGFERRY_LOGS/cargo-test.out"
# A failing end-to-end test prints its error and its services' last warnings and errors
# (integration-tests' FailureReport); anyhow's backtraces of test errors would only bury them.
export RUST_LIB_BACKTRACE=0
set +e
cargo test --locked --no-fail-fast --workspace --lib --bins --tests -- --test-threads=2 "$@" 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
set -e
# One closing line for all test binaries together.
passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$out" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '^test result: .*; ([0-9]+) failed' "$out" | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
echo "tests: $passed passed, $failed failed" | tee "$PGFERRY_LOGS/test-summary.txt"
# Per failing test, its error and the services' last warnings, in a few lines (CI's log shows
# only part of cargo's output): appended to the summary, which .ci/run prints last.
awk '
  /^---- .* stdout ----$/ { name = $2; print "FAILED " name; n = 0; next }
  /^failures:$/ || /^test result:/ { name = "" }
  name == "" || n >= 40 { next }
  after_panic { print "  " substr($0, 1, 300); n++; after_panic = 0; next }
  /panicked at/ { after_panic = 1 }
  /^Error:/ || /panicked at/ || /^--- last warnings/ || /WARN|ERROR/ || /^Caused by:/ || /^    [0-9]+: / {
    print "  " substr($0, 1, 300); n++
  }
' "$out" | tee -a "$PGFERRY_LOGS/test-summary.txt"
exit "$rc"
