#!/usr/bin/env bash
# Fuzz the decoders that read outside bytes (cargo fuzz, libFuzzer, nightly toolchain):
#   event_decoder     apply's Confluent-frame + Avro decoding of change events and fixed records
#   pgoutput_decoder  capture's pgoutput parser (pg_walstream), message sequences
# Each runs for --seconds (default 600) and grows its corpus in fuzz/corpus/<target>, which the
# repository keeps; the unit tests replay that corpus on the stable toolchain.
#   deploy/local/fuzz.sh [--seconds N] [target...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PGFERRY_LOG_TAG=fuzz
cd "$PGFERRY_REPO"

seconds=600
targets=()
while (($#)); do
    case "$1" in
    --seconds) seconds="${2:?--seconds needs a number}"; shift 2 ;;
    -*) die "unknown option '$1' (usage: fuzz.sh [--seconds N] [target...])" ;;
    *) targets+=("$1"); shift ;;
    esac
done
[[ "$seconds" =~ ^[1-9][0-9]*$ ]] || die "--seconds must be a positive integer"
((${#targets[@]})) || targets=(event_decoder pgoutput_decoder)

command -v cargo >/dev/null 2>&1 || { [[ -f "$HOME/.cargo/env" ]] && source "$HOME/.cargo/env"; }
rustup toolchain list | grep -q '^nightly' || die "cargo fuzz needs the nightly toolchain (rustup toolchain install nightly)"
cargo fuzz --version >/dev/null 2>&1 || { log "installing cargo-fuzz"; cargo install cargo-fuzz --locked; }

for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    log "$t: fuzzing for ${seconds}s (corpus fuzz/corpus/$t)"
    # -timeout: an input taking over 10 s is a hang; -rss_limit_mb: memory blow-ups are bugs too.
    cargo +nightly fuzz run "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=4096 -print_final_stats=1 \
        2>&1 | tee "$PGFERRY_LOGS/fuzz-$t.log" | grep -E '^(#[0-9]+ +(DONE|INITED)|stat::|==[0-9]+==|SUMMARY|artifact_prefix|Test unit written)' || true
    if ls "fuzz/artifacts/$t"/crash-* "fuzz/artifacts/$t"/timeout-* "fuzz/artifacts/$t"/oom-* >/dev/null 2>&1; then
        die "$t: failing inputs in fuzz/artifacts/$t (log: $PGFERRY_LOGS/fuzz-$t.log)"
    fi
    log "$t: no crash in ${seconds}s; corpus: $(ls "fuzz/corpus/$t" | wc -l) inputs"
done
