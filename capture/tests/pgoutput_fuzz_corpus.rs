//! The `pgoutput_decoder` fuzz corpus (fuzz/corpus/pgoutput_decoder), replayed on the stable
//! toolchain the way the fuzz target feeds it: messages split by a 2-byte little-endian length,
//! into one parser in order. No input may panic.

use pg_walstream::LogicalReplicationParser;

#[test]
fn pgoutput_fuzz_corpus_replays_without_panics() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/pgoutput_decoder");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let Ok(data) = std::fs::read(entry.path()) else { continue };
        let mut parser = LogicalReplicationParser::with_protocol_version(2);
        let mut rest = data.as_slice();
        while rest.len() >= 2 {
            let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
            let (msg, tail) = rest[2..].split_at(len.min(rest.len() - 2));
            let _ = parser.parse_wal_message(msg);
            rest = tail;
        }
        n += 1;
    }
    eprintln!("replayed {n} inputs from {}", dir.display());
}
