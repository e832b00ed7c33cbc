//! The decoding that fuzzing exercises, shared by the `event_decoder` fuzz target (`fuzz/`) and
//! the unit test that replays its corpus on the stable toolchain: everything apply does with
//! the bytes of a Kafka message before it trusts them.

use std::sync::OnceLock;

use apache_avro::Schema;

use crate::codec::{decode_frame, EnvelopeReader};
use crate::conflict_report::ConflictReport;
use crate::event::{ColumnDef, TableDef};
use crate::heartbeat::Heartbeat;
use crate::logical_message::LogicalMessage;
use crate::truncate::Truncate;
use crate::TableSchemas;

struct Readers {
    envelope: EnvelopeReader,
    truncate: Schema,
    message: Schema,
    heartbeat: Schema,
    conflict: Schema,
}

/// Column types of the table whose envelope the bytes are decoded as.
const TYPES: [&str; 26] = [
    "int8", "int2", "int4", "numeric", "text", "bytea", "bool", "float4", "float8", "date", "timestamp",
    "timestamptz", "time", "timetz", "interval", "uuid", "json", "jsonb", "varchar", "_int4", "_text", "inet",
    "money", "point", "xml", "ltree",
];

fn readers() -> Option<&'static Readers> {
    static R: OnceLock<Option<Readers>> = OnceLock::new();
    R.get_or_init(|| {
        let columns = TYPES
            .iter()
            .enumerate()
            .map(|(i, ty)| ColumnDef {
                name: format!("c{i}"),
                type_name: ty.to_string(),
                sql_type: ty.to_string(),
                key: i == 0,
                enum_labels: None,
            })
            .collect();
        let table = TableDef {
            schema: "public".into(),
            name: "fuzz".into(),
            columns,
        };
        let schemas = TableSchemas::new("fuzz", table).ok()?;
        Some(Readers {
            envelope: EnvelopeReader::new(&schemas.envelope_json).ok()?,
            truncate: Truncate::schema().ok()?,
            message: LogicalMessage::schema().ok()?,
            heartbeat: Heartbeat::schema().ok()?,
            conflict: ConflictReport::schema().ok()?,
        })
    })
    .as_ref()
}

/// Decodes `data` every way apply may: the Confluent frame (or, if that fails, the bytes as a
/// bare datum) as a change envelope and as each fixed record. Returns how many decodings
/// succeeded; errors are expected, panics are bugs.
pub fn decode_untrusted(data: &[u8]) -> usize {
    let Some(r) = readers() else { return 0 };
    let datum = match decode_frame(data) {
        Ok((_, datum)) => datum,
        Err(_) => data,
    };
    [
        r.envelope.decode(datum).is_ok(),
        Truncate::decode(&r.truncate, datum).is_ok(),
        LogicalMessage::decode(&r.message, datum).is_ok(),
        Heartbeat::decode(&r.heartbeat, datum).is_ok(),
        ConflictReport::decode(&r.conflict, datum).is_ok(),
    ]
    .iter()
    .filter(|ok| **ok)
    .count()
}

#[cfg(test)]
mod tests {
    /// The fuzz corpus (fuzz/corpus/event_decoder), replayed: no input panics.
    #[test]
    fn fuzz_corpus_replays_without_panics() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/event_decoder");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if let Ok(bytes) = std::fs::read(entry.path()) {
                super::decode_untrusted(&bytes);
                // The direct reader and apache-avro's agree on every input they both accept.
                if let (Some(r), Ok((_, datum))) = (super::readers(), super::decode_frame(&bytes)) {
                    if let (Ok(a), Ok(b)) = (r.envelope.decode(datum), r.envelope.decode_generic(datum)) {
                        assert_eq!(a, b, "{}", entry.path().display());
                    }
                }
                n += 1;
            }
        }
        eprintln!("replayed {n} inputs from {}", dir.display());
        assert!(super::readers().is_some(), "the fuzz table's schemas build");
        assert!(super::readers().is_some_and(|r| r.envelope.reads_directly()));
    }
}
