//! Capture's pgoutput decoder (pg_walstream's parser, protocol version 2) on arbitrary message
//! sequences: the input is split into messages by a 2-byte little-endian length prefix and fed
//! to one parser in order, so streaming state carries from message to message. Errors are fine;
//! a panic, a hang or unbounded memory is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pg_walstream::LogicalReplicationParser;

fuzz_target!(|data: &[u8]| {
    let mut parser = LogicalReplicationParser::with_protocol_version(2);
    let mut rest = data;
    while rest.len() >= 2 {
        let n = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        let (msg, tail) = rest[2..].split_at(n.min(rest.len() - 2));
        let _ = parser.parse_wal_message(msg);
        rest = tail;
    }
});
