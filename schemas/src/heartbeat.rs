//! The heartbeat record (`avro/heartbeat.avsc`): capture's sign of life in its partition.

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::Schema;

use crate::codec::{avro_datum, CodecError};

/// JSON text of the heartbeat schema (what is registered).
pub const HEARTBEAT_SCHEMA: &str = include_str!("../avro/heartbeat.avsc");
/// Full name of the heartbeat record.
pub const HEARTBEAT_NAME: &str = "pgferry.Heartbeat";

/// One heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// Origin node name.
    pub origin: String,
    /// Origin node id.
    pub node_id: u16,
    /// Origin region.
    pub region: String,
    /// Production time, µs since the Unix epoch.
    pub ts_us: i64,
    /// WAL position of the heartbeat on the origin.
    pub lsn: u64,
}

impl Heartbeat {
    /// The parsed heartbeat schema.
    pub fn schema() -> Result<Schema, CodecError> {
        Schema::parse_str(HEARTBEAT_SCHEMA).map_err(|e| CodecError::Schema(format!("heartbeat: {e}")))
    }

    /// Encodes the heartbeat as an Avro datum (without framing).
    pub fn encode(&self, schema: &Schema) -> Result<Vec<u8>, CodecError> {
        avro_datum(
            schema,
            Value::Record(vec![
                ("origin".into(), Value::String(self.origin.clone())),
                ("node_id".into(), Value::Int(self.node_id as i32)),
                ("region".into(), Value::String(self.region.clone())),
                ("ts_us".into(), Value::Long(self.ts_us)),
                ("lsn".into(), Value::Long(self.lsn as i64)),
            ]),
        )
    }

    /// Decodes a datum written with `writer` (a heartbeat schema from the registry, or
    /// [`Heartbeat::schema`]).
    pub fn decode(writer: &Schema, mut datum: &[u8]) -> Result<Heartbeat, CodecError> {
        let value = GenericDatumReader::builder(writer)
            .build()
            .and_then(|r| r.read_value(&mut datum))
            .map_err(|e| CodecError::Avro(e.to_string()))?;
        let Value::Record(fields) = value else {
            return Err(CodecError::Avro("heartbeat is not a record".into()));
        };
        let get = |n: &str| fields.iter().find(|(k, _)| k == n).map(|(_, v)| v);
        let missing = |n: &str| CodecError::Avro(format!("heartbeat.{n} missing or of the wrong type"));
        let string = |n: &str| match get(n) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(missing(n)),
        };
        let long = |n: &str| match get(n) {
            Some(Value::Long(l)) => Ok(*l),
            _ => Err(missing(n)),
        };
        Ok(Heartbeat {
            origin: string("origin")?,
            node_id: match get("node_id") {
                Some(Value::Int(i)) => u16::try_from(*i).map_err(|_| missing("node_id"))?,
                _ => return Err(missing("node_id")),
            },
            region: string("region")?,
            ts_us: long("ts_us")?,
            lsn: long("lsn")? as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_round_trips() {
        let schema = Heartbeat::schema().unwrap();
        let hb = Heartbeat {
            origin: "n1".into(),
            node_id: 1,
            region: "eu".into(),
            ts_us: 5,
            lsn: 7,
        };
        let datum = hb.encode(&schema).unwrap();
        assert_eq!(Heartbeat::decode(&schema, &datum).unwrap(), hb);
        assert!(Heartbeat::decode(&schema, &datum[..2]).is_err());
    }
}
