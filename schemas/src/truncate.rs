//! The truncate record (`avro/truncate.avsc`): one TRUNCATE of one table, inside its source
//! transaction's sequence of events.

use apache_avro::types::Value;
use apache_avro::Schema;

use crate::codec::{avro_datum, CodecError, RecordFields};

/// JSON text of the truncate schema (what is registered).
pub const TRUNCATE_SCHEMA: &str = include_str!("../avro/truncate.avsc");
/// Full name of the truncate record.
pub const TRUNCATE_NAME: &str = "pgferry.Truncate";

/// One truncated table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Origin node name.
    pub origin: String,
    /// Origin node id.
    pub node_id: u16,
    /// Schema of the table.
    pub schema: String,
    /// Table name.
    pub table: String,
    /// `TRUNCATE … CASCADE` on the origin.
    pub cascade: bool,
    /// `TRUNCATE … RESTART IDENTITY` on the origin.
    pub restart_identity: bool,
    /// Commit LSN of the source transaction.
    pub commit_lsn: u64,
    /// Origin commit time, µs since the Unix epoch.
    pub ts_us: i64,
    /// 0-based position in the transaction.
    pub txn_seq: u64,
    /// Last event of its transaction.
    pub txn_last: bool,
}

impl Truncate {
    /// The parsed truncate schema.
    pub fn schema() -> Result<Schema, CodecError> {
        Schema::parse_str(TRUNCATE_SCHEMA).map_err(|e| CodecError::Schema(format!("truncate: {e}")))
    }

    /// Encodes the record as an Avro datum (without framing).
    pub fn encode(&self, schema: &Schema) -> Result<Vec<u8>, CodecError> {
        avro_datum(
            schema,
            Value::Record(vec![
                ("origin".into(), Value::String(self.origin.clone())),
                ("node_id".into(), Value::Int(self.node_id as i32)),
                ("schema".into(), Value::String(self.schema.clone())),
                ("table".into(), Value::String(self.table.clone())),
                ("cascade".into(), Value::Boolean(self.cascade)),
                ("restart_identity".into(), Value::Boolean(self.restart_identity)),
                ("commit_lsn".into(), Value::Long(self.commit_lsn as i64)),
                ("ts_us".into(), Value::Long(self.ts_us)),
                ("txn_seq".into(), Value::Long(self.txn_seq as i64)),
                ("txn_last".into(), Value::Boolean(self.txn_last)),
            ]),
        )
    }

    /// Decodes a datum written with `writer` (a truncate schema from the registry).
    pub fn decode(writer: &Schema, datum: &[u8]) -> Result<Truncate, CodecError> {
        let f = RecordFields::read("truncate", writer, datum)?;
        Ok(Truncate {
            origin: f.string("origin")?,
            node_id: f.node_id()?,
            schema: f.string("schema")?,
            table: f.string("table")?,
            cascade: f.boolean("cascade")?,
            restart_identity: f.boolean("restart_identity")?,
            commit_lsn: f.long("commit_lsn")? as u64,
            ts_us: f.long("ts_us")?,
            txn_seq: f.long("txn_seq")? as u64,
            txn_last: f.boolean("txn_last")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_round_trips() {
        let schema = Truncate::schema().unwrap();
        let t = Truncate {
            origin: "n1".into(),
            node_id: 3,
            schema: "public".into(),
            table: "t".into(),
            cascade: false,
            restart_identity: true,
            commit_lsn: 99,
            ts_us: 123,
            txn_seq: 2,
            txn_last: true,
        };
        let datum = t.encode(&schema).unwrap();
        assert_eq!(Truncate::decode(&schema, &datum).unwrap(), t);
        assert!(Truncate::decode(&schema, &datum[..3]).is_err());
    }
}
