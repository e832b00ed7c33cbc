//! The logical message record (`avro/message.avsc`): a transactional
//! `pg_logical_emit_message(true, prefix, content)` in order with its source transaction's row
//! changes. pgferry's own DDL rides on these (prefix `pgferry.ddl`); other prefixes are
//! carried for consumers of the topic and ignored by apply.

use apache_avro::types::Value;
use apache_avro::Schema;

use crate::codec::{avro_datum, CodecError, RecordFields};

/// JSON text of the message schema (what is registered).
pub const MESSAGE_SCHEMA: &str = include_str!("../avro/message.avsc");
/// Full name of the message record.
pub const MESSAGE_NAME: &str = "pgferry.Message";

/// One transactional logical message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    /// Origin node name.
    pub origin: String,
    /// Origin node id.
    pub node_id: u16,
    /// The message's prefix.
    pub prefix: String,
    /// The message's content, as written.
    pub content: Vec<u8>,
    /// WAL position of the message on the capturing node.
    pub lsn: u64,
    /// Commit LSN of the source transaction (on the origin).
    pub commit_lsn: u64,
    /// Origin commit time, µs since the Unix epoch.
    pub ts_us: i64,
    /// 0-based position in the transaction.
    pub txn_seq: u64,
    /// Last event of its transaction.
    pub txn_last: bool,
}

impl LogicalMessage {
    /// The parsed message schema.
    pub fn schema() -> Result<Schema, CodecError> {
        Schema::parse_str(MESSAGE_SCHEMA).map_err(|e| CodecError::Schema(format!("message: {e}")))
    }

    /// Encodes the record as an Avro datum (without framing).
    pub fn encode(&self, schema: &Schema) -> Result<Vec<u8>, CodecError> {
        avro_datum(
            schema,
            Value::Record(vec![
                ("origin".into(), Value::String(self.origin.clone())),
                ("node_id".into(), Value::Int(self.node_id as i32)),
                ("prefix".into(), Value::String(self.prefix.clone())),
                ("content".into(), Value::Bytes(self.content.clone())),
                ("lsn".into(), Value::Long(self.lsn as i64)),
                ("commit_lsn".into(), Value::Long(self.commit_lsn as i64)),
                ("ts_us".into(), Value::Long(self.ts_us)),
                ("txn_seq".into(), Value::Long(self.txn_seq as i64)),
                ("txn_last".into(), Value::Boolean(self.txn_last)),
            ]),
        )
    }

    /// Decodes a datum written with `writer` (a message schema from the registry).
    pub fn decode(writer: &Schema, datum: &[u8]) -> Result<LogicalMessage, CodecError> {
        let f = RecordFields::read("message", writer, datum)?;
        Ok(LogicalMessage {
            origin: f.string("origin")?,
            node_id: f.node_id()?,
            prefix: f.string("prefix")?,
            content: f.bytes("content")?,
            lsn: f.long("lsn")? as u64,
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
    fn message_round_trips() {
        let schema = LogicalMessage::schema().unwrap();
        let m = LogicalMessage {
            origin: "n1".into(),
            node_id: 3,
            prefix: "app.audit".into(),
            content: vec![0, 1, 2, 255],
            lsn: 98,
            commit_lsn: 99,
            ts_us: 123,
            txn_seq: 0,
            txn_last: false,
        };
        let datum = m.encode(&schema).unwrap();
        assert_eq!(LogicalMessage::decode(&schema, &datum).unwrap(), m);
        assert!(LogicalMessage::decode(&schema, &datum[..4]).is_err());
    }
}
