//! Apply's event decoder on arbitrary bytes (`pgferry_schemas::fuzzing::decode_untrusted`): the
//! Confluent frame, then the datum as a change envelope of a table with many column types and
//! as each fixed record. Errors are fine; a panic, a hang or unbounded memory is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pgferry_schemas::fuzzing::decode_untrusted(data);
});
