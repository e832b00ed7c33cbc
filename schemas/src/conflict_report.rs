//! The conflict report record (`avro/conflict_report.avsc`): one row of a node's
//! `pgferry.conflicts`, as published to `<cluster>.conflicts` for monitoring and audit.

use apache_avro::types::Value;
use apache_avro::Schema;

use crate::codec::{avro_datum, CodecError, RecordFields};

/// JSON text of the conflict report schema (what is registered).
pub const CONFLICT_REPORT_SCHEMA: &str = include_str!("../avro/conflict_report.avsc");
/// Full name of the conflict report record.
pub const CONFLICT_REPORT_NAME: &str = "pgferry.ConflictReport";

/// One detected and settled conflict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConflictReport {
    /// The node that detected and settled it.
    pub node: String,
    /// Its id in that node's `pgferry.conflicts`.
    pub id: i64,
    /// When it was detected, µs since the Unix epoch.
    pub detected_at_us: i64,
    /// `schema.table`.
    pub table: String,
    /// Primary key as a JSON array.
    pub key: String,
    /// Conflict type (`insert_exists`, …).
    pub conflict_type: String,
    /// The table's resolver.
    pub resolver: String,
    /// `apply_remote`, `keep_local` or `parked`.
    pub resolution: String,
    /// The local row as JSON, if there was one.
    pub local_row: Option<String>,
    /// The node that last wrote the local row.
    pub local_origin: Option<String>,
    /// Its commit time.
    pub local_commit_ts_us: Option<i64>,
    /// The incoming change's operation (`c`, `u`, `d`).
    pub remote_op: String,
    /// The incoming row as JSON.
    pub remote_row: Option<String>,
    /// The incoming change's origin.
    pub remote_origin: String,
    /// Its origin commit time.
    pub remote_commit_ts_us: i64,
    /// Its origin commit LSN (`X/Y`).
    pub remote_commit_lsn: String,
}

fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> Value) -> Value {
    match v {
        Some(x) => Value::Union(1, Box::new(f(x))),
        None => Value::Union(0, Box::new(Value::Null)),
    }
}

impl ConflictReport {
    /// The parsed conflict report schema.
    pub fn schema() -> Result<Schema, CodecError> {
        Schema::parse_str(CONFLICT_REPORT_SCHEMA).map_err(|e| CodecError::Schema(format!("conflict report: {e}")))
    }

    /// Encodes the record as an Avro datum (without framing).
    pub fn encode(&self, schema: &Schema) -> Result<Vec<u8>, CodecError> {
        let s = |v: &String| Value::String(v.clone());
        avro_datum(
            schema,
            Value::Record(vec![
                ("node".into(), s(&self.node)),
                ("id".into(), Value::Long(self.id)),
                ("detected_at_us".into(), Value::Long(self.detected_at_us)),
                ("table".into(), s(&self.table)),
                ("key".into(), s(&self.key)),
                ("conflict_type".into(), s(&self.conflict_type)),
                ("resolver".into(), s(&self.resolver)),
                ("resolution".into(), s(&self.resolution)),
                ("local_row".into(), opt(self.local_row.clone(), Value::String)),
                ("local_origin".into(), opt(self.local_origin.clone(), Value::String)),
                ("local_commit_ts_us".into(), opt(self.local_commit_ts_us, Value::Long)),
                ("remote_op".into(), s(&self.remote_op)),
                ("remote_row".into(), opt(self.remote_row.clone(), Value::String)),
                ("remote_origin".into(), s(&self.remote_origin)),
                ("remote_commit_ts_us".into(), Value::Long(self.remote_commit_ts_us)),
                ("remote_commit_lsn".into(), s(&self.remote_commit_lsn)),
            ]),
        )
    }

    /// Decodes a datum written with `writer` (a conflict report schema from the registry).
    pub fn decode(writer: &Schema, datum: &[u8]) -> Result<ConflictReport, CodecError> {
        let f = RecordFields::read("conflict report", writer, datum)?;
        Ok(ConflictReport {
            node: f.string("node")?,
            id: f.long("id")?,
            detected_at_us: f.long("detected_at_us")?,
            table: f.string("table")?,
            key: f.string("key")?,
            conflict_type: f.string("conflict_type")?,
            resolver: f.string("resolver")?,
            resolution: f.string("resolution")?,
            local_row: f.opt_string("local_row")?,
            local_origin: f.opt_string("local_origin")?,
            local_commit_ts_us: f.opt_long("local_commit_ts_us")?,
            remote_op: f.string("remote_op")?,
            remote_row: f.opt_string("remote_row")?,
            remote_origin: f.string("remote_origin")?,
            remote_commit_ts_us: f.long("remote_commit_ts_us")?,
            remote_commit_lsn: f.string("remote_commit_lsn")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trips() {
        let schema = ConflictReport::schema().unwrap();
        let mut r = ConflictReport {
            node: "n2".into(),
            id: 7,
            detected_at_us: 1_700_000_000_000_000,
            table: "public.t".into(),
            key: "[1]".into(),
            conflict_type: "update_origin_differs".into(),
            resolver: "last_update_wins".into(),
            resolution: "keep_local".into(),
            local_row: Some(r#"{"id": 1}"#.into()),
            local_origin: Some("n1".into()),
            local_commit_ts_us: Some(5),
            remote_op: "u".into(),
            remote_row: Some(r#"{"id": "1"}"#.into()),
            remote_origin: "n3".into(),
            remote_commit_ts_us: 4,
            remote_commit_lsn: "0/16B3748".into(),
        };
        let datum = r.encode(&schema).unwrap();
        assert_eq!(ConflictReport::decode(&schema, &datum).unwrap(), r);
        (r.local_row, r.local_origin, r.local_commit_ts_us) = (None, None, None);
        let datum = r.encode(&schema).unwrap();
        assert_eq!(ConflictReport::decode(&schema, &datum).unwrap(), r);
        assert!(ConflictReport::decode(&schema, &datum[..3]).is_err());
    }
}
