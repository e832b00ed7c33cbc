#!/usr/bin/env bash
# For .ci/run: install what is missing, start the local services (PostgreSQL x N, Kafka,
# Apicurio Registry), smoke-test them, and print the export lines on stdout:
#     eval "$(bash .ci/start-services.sh [N])"
# Progress and failures (with log tails) go to stderr; exit status non-zero if anything failed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
n="${1:-3}"
deploy/local/up.sh "$n" >&2
deploy/local/smoke.sh "$n" >&2
deploy/local/env.sh "$n"
