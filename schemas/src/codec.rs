//! Confluent wire format and the Avro encoding/decoding of change events.

use apache_avro::types::Value;
use apache_avro::Schema;
use thiserror::Error;

use crate::envelope_schema::{TableSchemas, VERSION};
use crate::event::{ChangeEvent, Op, Row};
use crate::pg_types::{Kind, TypeError};

/// Why an event could not be encoded or decoded.
#[derive(Debug, Error)]
pub enum CodecError {
    /// Not Confluent wire format (too short or wrong magic byte).
    #[error("not a Confluent-framed message: {0}")]
    Frame(String),
    /// A schema that cannot be built or is not a pgferry envelope.
    #[error("schema: {0}")]
    Schema(String),
    /// The Avro datum did not encode or decode.
    #[error("avro: {0}")]
    Avro(String),
    /// A column value does not fit its mapping.
    #[error(transparent)]
    Type(#[from] TypeError),
}

/// Prefixes an Avro datum with the magic byte 0 and the big-endian schema id.
pub fn encode_frame(schema_id: u32, datum: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + datum.len());
    out.push(0);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(datum);
    out
}

/// Splits a Confluent-framed message into schema id and Avro datum.
pub fn decode_frame(bytes: &[u8]) -> Result<(u32, &[u8]), CodecError> {
    match bytes {
        [0, a, b, c, d, rest @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), rest)),
        [] => Err(CodecError::Frame("empty message".into())),
        [m, ..] if *m != 0 => Err(CodecError::Frame(format!("magic byte is {m}, expected 0"))),
        _ => Err(CodecError::Frame(format!(
            "{} bytes, shorter than the 5-byte header",
            bytes.len()
        ))),
    }
}

#[cfg(test)]
fn nullable(v: Option<Value>) -> Value {
    match v {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(v) => Value::Union(1, Box::new(v)),
    }
}

fn avro_err(e: apache_avro::Error) -> CodecError {
    CodecError::Avro(e.to_string())
}

/// Encodes `value` as an Avro datum of `schema` (validated).
pub fn avro_datum(schema: &Schema, value: Value) -> Result<Vec<u8>, CodecError> {
    apache_avro::writer::datum::GenericDatumWriter::builder(schema)
        .build()
        .and_then(|w| w.write_value_to_vec(value))
        .map_err(avro_err)
}

/// The fields of a decoded fixed record (truncate, logical message), read by name with the
/// type checked; a missing or mistyped field is an error naming `record.field`.
pub struct RecordFields {
    record: &'static str,
    fields: Vec<(String, Value)>,
}

impl RecordFields {
    /// Decodes `datum` (written with `writer`) as the record `record`.
    pub fn read(record: &'static str, writer: &Schema, mut datum: &[u8]) -> Result<RecordFields, CodecError> {
        let value = apache_avro::reader::datum::GenericDatumReader::builder(writer)
            .build()
            .and_then(|r| r.read_value(&mut datum))
            .map_err(avro_err)?;
        match value {
            Value::Record(fields) => Ok(RecordFields { record, fields }),
            _ => Err(CodecError::Avro(format!("{record} is not a record"))),
        }
    }

    fn get(&self, name: &str) -> Option<&Value> {
        self.fields.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    fn missing(&self, name: &str) -> CodecError {
        CodecError::Avro(format!("{}.{name} missing or of the wrong type", self.record))
    }

    /// A `string` field.
    pub fn string(&self, name: &str) -> Result<String, CodecError> {
        match self.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(self.missing(name)),
        }
    }

    /// A `bytes` field.
    pub fn bytes(&self, name: &str) -> Result<Vec<u8>, CodecError> {
        match self.get(name) {
            Some(Value::Bytes(b)) => Ok(b.clone()),
            _ => Err(self.missing(name)),
        }
    }

    /// A `long` field.
    pub fn long(&self, name: &str) -> Result<i64, CodecError> {
        match self.get(name) {
            Some(Value::Long(l)) => Ok(*l),
            _ => Err(self.missing(name)),
        }
    }

    /// A `boolean` field.
    pub fn boolean(&self, name: &str) -> Result<bool, CodecError> {
        match self.get(name) {
            Some(Value::Boolean(b)) => Ok(*b),
            _ => Err(self.missing(name)),
        }
    }

    /// A `["null", "string"]` field.
    pub fn opt_string(&self, name: &str) -> Result<Option<String>, CodecError> {
        match self.get(name) {
            Some(Value::Union(_, v)) => match v.as_ref() {
                Value::Null => Ok(None),
                Value::String(s) => Ok(Some(s.clone())),
                _ => Err(self.missing(name)),
            },
            _ => Err(self.missing(name)),
        }
    }

    /// A `["null", "long"]` field.
    pub fn opt_long(&self, name: &str) -> Result<Option<i64>, CodecError> {
        match self.get(name) {
            Some(Value::Union(_, v)) => match v.as_ref() {
                Value::Null => Ok(None),
                Value::Long(l) => Ok(Some(*l)),
                _ => Err(self.missing(name)),
            },
            _ => Err(self.missing(name)),
        }
    }

    /// The `node_id` field (an `int` in 0–65535).
    pub fn node_id(&self) -> Result<u16, CodecError> {
        match self.get("node_id") {
            Some(Value::Int(i)) => u16::try_from(*i).map_err(|_| self.missing("node_id")),
            _ => Err(self.missing("node_id")),
        }
    }
}

/// Encodes an event's key and value as Avro datums (without framing).
pub fn encode_event(schemas: &TableSchemas, ev: &ChangeEvent) -> Result<(Vec<u8>, Vec<u8>), CodecError> {
    let mut key = Vec::with_capacity(32);
    let mut value = Vec::with_capacity(512);
    write_event(schemas, ev, &mut key, &mut value)?;
    Ok((key, value))
}

/// Encodes an event's key and value as Confluent-framed messages (magic byte, schema id,
/// datum), written straight into their buffers.
pub fn encode_event_framed(
    schemas: &TableSchemas,
    key_id: u32,
    value_id: u32,
    ev: &ChangeEvent,
) -> Result<(Vec<u8>, Vec<u8>), CodecError> {
    let mut key = Vec::with_capacity(48);
    let mut value = Vec::with_capacity(512);
    key.push(0);
    key.extend_from_slice(&key_id.to_be_bytes());
    value.push(0);
    value.extend_from_slice(&value_id.to_be_bytes());
    write_event(schemas, ev, &mut key, &mut value)?;
    Ok((key, value))
}

// Avro binary encoding written directly, field by field in the schemas' order
// (envelope_schema.rs). Capture used to build an `apache_avro::types::Value` tree per event
// and write it with `GenericDatumWriter`, which resolves the schema's names, validates the
// value and builds a field-name HashMap per record on every call: `perf record` of
// `pgferry-bench capture-throughput` (50,000 pgbench transactions) put 35% of all capture
// CPU samples under `encode_event` (Value building, `resolve_names`, `validate_internal`,
// SipHash, malloc). The bytes are identical: `direct_encoding_matches_apache_avro` checks
// them against apache-avro's writer.

/// Zig-zag varint (Avro `int` and `long` have the same encoding).
fn put_long(buf: &mut Vec<u8>, n: i64) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        buf.push((z as u8) | 0x80);
        z >>= 7;
    }
    buf.push(z as u8);
}

fn put_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    put_long(buf, b.len() as i64);
    buf.extend_from_slice(b);
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    put_bytes(buf, s.as_bytes());
}

/// [`ChangeEvent::transaction_id`] (`<origin>:<commit_lsn>`) as an Avro string, written in
/// place: a `format!` per event was ~2% of capture's CPU in a TPC-B drain.
fn put_transaction_id(buf: &mut Vec<u8>, origin: &str, commit_lsn: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = commit_lsn;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    put_long(buf, (origin.len() + 1 + digits.len() - at) as i64);
    buf.extend_from_slice(origin.as_bytes());
    buf.push(b':');
    buf.extend_from_slice(&digits[at..]);
}

/// A column value in its Avro form (the primitives `Kind::to_avro` yields).
fn put_value(buf: &mut Vec<u8>, v: &Value) -> Result<(), CodecError> {
    match v {
        Value::Boolean(b) => buf.push(u8::from(*b)),
        Value::Int(i) => put_long(buf, i64::from(*i)),
        Value::Long(l) => put_long(buf, *l),
        Value::Float(f) => buf.extend_from_slice(&f.to_le_bytes()),
        Value::Double(d) => buf.extend_from_slice(&d.to_le_bytes()),
        Value::String(s) => put_str(buf, s),
        Value::Bytes(b) => put_bytes(buf, b),
        other => return Err(CodecError::Avro(format!("unexpected column value {other:?}"))),
    }
    Ok(())
}

/// One column's text value in the Avro form of `kind`; string kinds skip the `Value`.
fn put_column(buf: &mut Vec<u8>, kind: Kind, column: &str, text: &str) -> Result<(), CodecError> {
    match kind {
        Kind::Uuid | Kind::Json | Kind::Interval | Kind::Text => put_str(buf, text),
        k => put_value(buf, &k.to_avro(column, text)?)?,
    }
    Ok(())
}

/// A nullable `Value` record (union index 1) or null (index 0).
fn put_row(buf: &mut Vec<u8>, schemas: &TableSchemas, row: Option<&Row>) -> Result<(), CodecError> {
    let Some(row) = row else {
        put_long(buf, 0);
        return Ok(());
    };
    put_long(buf, 1);
    for (i, cell) in row.iter().enumerate() {
        match cell {
            None => put_long(buf, 0),
            Some(text) => {
                put_long(buf, 1);
                put_column(buf, schemas.kinds[i], &schemas.table.columns[i].name, text)?;
            }
        }
    }
    Ok(())
}

fn write_event(schemas: &TableSchemas, ev: &ChangeEvent, key: &mut Vec<u8>, value: &mut Vec<u8>) -> Result<(), CodecError> {
    if ev
        .before
        .as_ref()
        .or(ev.after.as_ref())
        .is_some_and(|r| r.len() != schemas.table.columns.len())
        || ev.before.as_ref().zip(ev.after.as_ref()).is_some_and(|(b, a)| b.len() != a.len())
    {
        return Err(CodecError::Schema(format!(
            "{}: row has a different column count than the schema",
            schemas.namespace
        )));
    }
    let key_row = ev.after.as_ref().or(ev.before.as_ref());
    for (i, col) in schemas.table.key_columns() {
        let text = key_row.and_then(|r| r[i].as_deref()).ok_or_else(|| {
            CodecError::Schema(format!(
                "{}: key column {} is NULL or missing",
                schemas.namespace, col.name
            ))
        })?;
        put_column(key, schemas.kinds[i], &col.name, text)?;
    }

    put_row(value, schemas, ev.before.as_ref())?;
    put_row(value, schemas, ev.after.as_ref())?;
    // source (pgferry.Source)
    let s = &ev.source;
    put_str(value, VERSION);
    put_str(value, "pgferry");
    put_str(value, &s.cluster);
    put_long(value, s.commit_ts_us.div_euclid(1000));
    put_long(value, s.commit_ts_us);
    put_str(value, if ev.op == Op::Read { "true" } else { "false" });
    put_str(value, &s.db);
    put_str(value, &schemas.table.schema);
    put_str(value, &schemas.table.name);
    put_long(value, s.tx_id as i64);
    put_long(value, s.lsn as i64);
    put_str(value, &s.origin);
    match s.origin_lsn {
        None => put_long(value, 0),
        Some(l) => {
            put_long(value, 1);
            put_long(value, l as i64);
        }
    }
    put_long(value, i64::from(s.node_id));
    put_str(value, &s.region);
    put_long(value, s.commit_lsn as i64);
    put_long(value, s.txn_seq as i64);
    value.push(u8::from(s.txn_last));
    if !s.unchanged_toast.is_empty() {
        put_long(value, s.unchanged_toast.len() as i64);
        for c in &s.unchanged_toast {
            put_str(value, c);
        }
    }
    put_long(value, 0);
    // op, ts_ms
    put_str(value, ev.op.code());
    put_long(value, 1);
    put_long(value, ev.ts_ms);
    // transaction (event.block)
    put_long(value, 1);
    put_transaction_id(value, &ev.source.origin, ev.source.commit_lsn);
    put_long(value, s.txn_seq as i64 + 1);
    put_long(value, s.data_collection_order as i64);
    Ok(())
}

/// A decoded change event, with column values back in PostgreSQL text form.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedEvent {
    /// What happened.
    pub op: Op,
    /// Schema of the table on the origin.
    pub schema: String,
    /// Table name on the origin.
    pub table: String,
    /// Column name → text value (None = NULL), for update and delete.
    pub before: Option<Vec<(String, Option<String>)>>,
    /// Column name → text value (None = NULL), for insert and update.
    pub after: Option<Vec<(String, Option<String>)>>,
    /// Origin node name.
    pub origin: String,
    /// Origin commit LSN.
    pub commit_lsn: u64,
    /// Origin commit time, µs since the Unix epoch.
    pub commit_ts_us: i64,
    /// 0-based position in the transaction.
    pub txn_seq: u64,
    /// Last event of its transaction.
    pub txn_last: bool,
    /// Columns not sent (unchanged TOAST).
    pub unchanged_toast: Vec<String>,
}

/// Decodes envelopes written with one writer schema (cache one per schema id).
#[derive(Debug)]
pub struct EnvelopeReader {
    schema: Schema,
    /// (column name, kind) of each field of the Value record, in field order.
    columns: Vec<(String, Kind)>,
    /// The direct reader of this schema's datums, when it has the shape pgferry writes.
    plan: Option<crate::envelope_read::Plan>,
}

impl EnvelopeReader {
    /// Parses a writer schema; fails unless it is a pgferry change envelope.
    pub fn new(schema_json: &str) -> Result<EnvelopeReader, CodecError> {
        let schema = Schema::parse_str(schema_json).map_err(|e| CodecError::Schema(e.to_string()))?;
        let not_ours = |why: &str| CodecError::Schema(format!("not a pgferry change envelope: {why}"));
        let Schema::Record(env) = &schema else {
            return Err(not_ours("not a record"));
        };
        let before = env
            .fields
            .iter()
            .find(|f| f.name == "before")
            .ok_or_else(|| not_ours("no before field"))?;
        let Schema::Union(u) = &before.schema else {
            return Err(not_ours("before is not a union"));
        };
        let Some(Schema::Record(value)) = u.variants().get(1) else {
            return Err(not_ours("before has no Value record"));
        };
        let mut columns = Vec::with_capacity(value.fields.len());
        for f in &value.fields {
            let kind = f
                .custom_attributes
                .get("pgferry.kind")
                .and_then(|k| k.as_str())
                .and_then(Kind::from_name)
                .ok_or_else(|| not_ours(&format!("field {} has no pgferry.kind", f.name)))?;
            let name = f
                .custom_attributes
                .get("pgferry.column")
                .and_then(|c| c.as_str())
                .unwrap_or(&f.name)
                .to_string();
            columns.push((name, kind));
        }
        let plan = crate::envelope_read::Plan::new(&schema, &columns);
        Ok(EnvelopeReader { schema, columns, plan })
    }

    /// Decodes one Avro datum (without the Confluent header).
    pub fn decode(&self, datum: &[u8]) -> Result<DecodedEvent, CodecError> {
        match &self.plan {
            Some(plan) => plan.read(datum),
            None => self.decode_generic(datum),
        }
    }

    /// Whether datums are read directly (`envelope_read`) rather than through apache-avro.
    pub fn reads_directly(&self) -> bool {
        self.plan.is_some()
    }

    /// Decodes one Avro datum with apache-avro's generic reader.
    pub fn decode_generic(&self, mut datum: &[u8]) -> Result<DecodedEvent, CodecError> {
        let value = apache_avro::reader::datum::GenericDatumReader::builder(&self.schema)
            .build()
            .and_then(|r| r.read_value(&mut datum))
            .map_err(avro_err)?;
        let Value::Record(fields) = value else {
            return Err(CodecError::Avro("envelope is not a record".into()));
        };
        let mut before = None;
        let mut after = None;
        let mut op = None;
        let mut source = None;
        for (name, v) in fields {
            match name.as_str() {
                "before" => before = self.row(v)?,
                "after" => after = self.row(v)?,
                "op" => op = Some(v),
                "source" => source = Some(v),
                _ => {}
            }
        }
        let op = match op {
            Some(Value::String(s)) => Op::from_code(&s).ok_or_else(|| CodecError::Avro(format!("unknown op {s:?}")))?,
            _ => return Err(CodecError::Avro("missing op".into())),
        };
        let Some(Value::Record(source)) = source else {
            return Err(CodecError::Avro("missing source".into()));
        };
        let get = |n: &str| source.iter().find(|(k, _)| k == n).map(|(_, v)| v);
        let string = |n: &str| match get(n) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(CodecError::Avro(format!("source.{n} missing or not a string"))),
        };
        let long = |n: &str| match get(n) {
            Some(Value::Long(l)) => Ok(*l),
            _ => Err(CodecError::Avro(format!("source.{n} missing or not a long"))),
        };
        Ok(DecodedEvent {
            op,
            schema: string("schema")?,
            table: string("table")?,
            before,
            after,
            origin: string("origin")?,
            commit_lsn: long("commit_lsn")? as u64,
            commit_ts_us: long("ts_us")?,
            txn_seq: long("txn_seq")? as u64,
            txn_last: matches!(get("txn_last"), Some(Value::Boolean(true))),
            unchanged_toast: match get("unchanged_toast") {
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(|v| {
                        if let Value::String(s) = v {
                            Some(s.clone())
                        } else {
                            None
                        }
                    })
                    .collect(),
                _ => Vec::new(),
            },
        })
    }

    fn row(&self, v: Value) -> Result<Option<Vec<(String, Option<String>)>>, CodecError> {
        let v = match v {
            Value::Union(_, inner) => *inner,
            other => other,
        };
        let Value::Record(fields) = v else { return Ok(None) };
        if fields.len() != self.columns.len() {
            return Err(CodecError::Avro(
                "row has a different field count than its schema".into(),
            ));
        }
        let mut row = Vec::with_capacity(fields.len());
        for ((_, v), (col, kind)) in fields.into_iter().zip(&self.columns) {
            let v = match v {
                Value::Union(_, inner) => *inner,
                other => other,
            };
            let text = match v {
                Value::Null => None,
                v => Some(kind.to_text(col, &v)?),
            };
            row.push((col.clone(), text));
        }
        Ok(Some(row))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ColumnDef, SourceInfo, TableDef};

    fn table() -> TableDef {
        let col = |name: &str, ty: &str, key| ColumnDef {
            name: name.into(),
            type_name: ty.into(),
            sql_type: ty.into(),
            key,
            enum_labels: None,
        };
        TableDef {
            schema: "public".into(),
            name: "t-1".into(),
            columns: vec![
                col("id", "int8", true),
                col("note", "text", false),
                col("at", "timestamptz", false),
            ],
        }
    }

    fn event() -> ChangeEvent {
        ChangeEvent {
            op: Op::Update,
            before: Some(vec![Some("7".into()), None, None]),
            after: Some(vec![
                Some("7".into()),
                Some("hi".into()),
                Some("2024-01-01 00:00:00.5+00".into()),
            ]),
            source: SourceInfo {
                cluster: "c".into(),
                db: "db".into(),
                origin: "n1".into(),
                node_id: 1,
                region: "eu".into(),
                commit_ts_us: 1_700_000_000_123_456,
                tx_id: 42,
                lsn: 100,
                commit_lsn: 200,
                origin_lsn: None,
                txn_seq: 0,
                data_collection_order: 1,
                txn_last: true,
                unchanged_toast: vec![],
            },
            ts_ms: 1,
        }
    }

    // The former encoder (apache-avro Value tree + GenericDatumWriter), kept as the reference
    // the direct encoding must match byte for byte.
    fn row_value(schemas: &TableSchemas, row: &Row) -> Result<Value, CodecError> {
        let mut fields = Vec::with_capacity(row.len());
        for (i, cell) in row.iter().enumerate() {
            let name = &schemas.field_names[i];
            let col = &schemas.table.columns[i].name;
            let v = match cell {
                None => None,
                Some(text) => Some(schemas.kinds[i].to_avro(col, text)?),
            };
            fields.push((name.clone(), nullable(v)));
        }
        Ok(Value::Record(fields))
    }
    fn reference_encode_event(schemas: &TableSchemas, ev: &ChangeEvent) -> (Vec<u8>, Vec<u8>) {
        let key_row = ev.after.as_ref().or(ev.before.as_ref()).unwrap();
        let key_fields = schemas
            .table
            .key_columns()
            .map(|(i, col)| {
                (
                    schemas.field_names[i].clone(),
                    schemas.kinds[i].to_avro(&col.name, key_row[i].as_deref().unwrap()).unwrap(),
                )
            })
            .collect();
        let key = avro_datum(&schemas.key, Value::Record(key_fields)).unwrap();
        let s = &ev.source;
        let source = Value::Record(vec![
            ("version".into(), Value::String(VERSION.into())),
            ("connector".into(), Value::String("pgferry".into())),
            ("name".into(), Value::String(s.cluster.to_string())),
            ("ts_ms".into(), Value::Long(s.commit_ts_us.div_euclid(1000))),
            ("ts_us".into(), Value::Long(s.commit_ts_us)),
            (
                "snapshot".into(),
                Value::String(if ev.op == Op::Read { "true" } else { "false" }.into()),
            ),
            ("db".into(), Value::String(s.db.to_string())),
            ("schema".into(), Value::String(schemas.table.schema.clone())),
            ("table".into(), Value::String(schemas.table.name.clone())),
            ("txId".into(), Value::Long(s.tx_id as i64)),
            ("lsn".into(), Value::Long(s.lsn as i64)),
            ("origin".into(), Value::String(s.origin.to_string())),
            ("origin_lsn".into(), nullable(s.origin_lsn.map(|l| Value::Long(l as i64)))),
            ("node_id".into(), Value::Int(s.node_id as i32)),
            ("region".into(), Value::String(s.region.to_string())),
            ("commit_lsn".into(), Value::Long(s.commit_lsn as i64)),
            ("txn_seq".into(), Value::Long(s.txn_seq as i64)),
            ("txn_last".into(), Value::Boolean(s.txn_last)),
            (
                "unchanged_toast".into(),
                Value::Array(s.unchanged_toast.iter().map(|c| Value::String(c.clone())).collect()),
            ),
        ]);
        let row = |r: &Option<Row>| nullable(r.as_ref().map(|r| row_value(schemas, r).unwrap()));
        let transaction = Value::Record(vec![
            ("id".into(), Value::String(ev.transaction_id())),
            ("total_order".into(), Value::Long(s.txn_seq as i64 + 1)),
            ("data_collection_order".into(), Value::Long(s.data_collection_order as i64)),
        ]);
        let envelope = Value::Record(vec![
            ("before".into(), row(&ev.before)),
            ("after".into(), row(&ev.after)),
            ("source".into(), source),
            ("op".into(), Value::String(ev.op.code().into())),
            ("ts_ms".into(), nullable(Some(Value::Long(ev.ts_ms)))),
            ("transaction".into(), nullable(Some(transaction))),
        ]);
        (key, avro_datum(&schemas.envelope, envelope).unwrap())
    }

    #[test]
    fn transaction_id_in_place_is_the_formatted_one() {
        for lsn in [0u64, 7, 10, 123_456_789, u64::MAX] {
            let mut buf = Vec::new();
            put_transaction_id(&mut buf, "n1", lsn);
            let mut want = Vec::new();
            put_str(&mut want, &format!("n1:{lsn}"));
            assert_eq!(buf, want, "lsn {lsn}");
        }
    }

    #[test]
    fn direct_encoding_matches_apache_avro() {
        let types = [
            "int8", "int4", "bool", "int2", "float4", "float8", "date", "timestamp", "timestamptz", "time",
            "interval", "bytea", "uuid", "json", "text", "numeric",
        ];
        let texts = [
            "-9223372036854775808", "-2147483648", "t", "-32768", "-1.5e-7", "NaN", "2024-02-29",
            "1999-12-31 23:59:59.999999", "2024-01-01 00:00:00.5+00", "23:59:59.999999", "P1Y2M3DT4H5M6.5S",
            "\\x00ff10", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "{\"a\": [1, \"é\"]}",
            "ünïcode text, long enough to need a two-byte length varint: ................................................................",
            "-12345678901234567890.000000001",
        ];
        let table = TableDef {
            schema: "public".into(),
            name: "all types".into(),
            columns: types
                .iter()
                .enumerate()
                .map(|(i, ty)| ColumnDef {
                    name: format!("c{i}"),
                    type_name: ty.to_string(),
                    sql_type: ty.to_string(),
                    key: i < 2,
                    enum_labels: None,
                })
                .collect(),
        };
        let schemas = TableSchemas::new("c", table).unwrap();
        let full: Row = texts.iter().map(|t| Some(t.to_string())).collect();
        let mut sparse = full.clone();
        for (i, cell) in sparse.iter_mut().enumerate() {
            if i >= 2 && i % 2 == 0 {
                *cell = None;
            }
        }
        let mut ev = event();
        for (op, before, after, origin_lsn, toast) in [
            (Op::Create, None, Some(full.clone()), None, vec![]),
            (Op::Update, Some(sparse.clone()), Some(full.clone()), Some(u64::MAX >> 1), vec!["c3".to_string()]),
            (Op::Delete, Some(full.clone()), None, None, vec![]),
            (Op::Read, None, Some(sparse.clone()), Some(0), vec!["c4".into(), "c5".into()]),
        ] {
            ev.op = op;
            ev.before = before;
            ev.after = after;
            ev.source.origin_lsn = origin_lsn;
            ev.source.unchanged_toast = toast;
            ev.source.tx_id = u32::MAX;
            ev.source.commit_ts_us = -1_234_567;
            ev.source.txn_seq = 300;
            ev.ts_ms = i64::MAX;
            assert_eq!(encode_event(&schemas, &ev).unwrap(), reference_encode_event(&schemas, &ev), "{op:?}");
            let (k, v) = encode_event_framed(&schemas, 3, 258, &ev).unwrap();
            let (ref_k, ref_v) = reference_encode_event(&schemas, &ev);
            assert_eq!((k, v), (encode_frame(3, &ref_k), encode_frame(258, &ref_v)));
        }
    }

    #[test]
    fn event_round_trips_through_avro_and_framing() {
        let schemas = TableSchemas::new("c", table()).unwrap();
        assert_eq!(schemas.envelope_name(), "c.public.t_1.Envelope");
        let (_key, value) = encode_event(&schemas, &event()).unwrap();
        let framed = encode_frame(9, &value);
        let (id, datum) = decode_frame(&framed).unwrap();
        assert_eq!(id, 9);
        let decoded = EnvelopeReader::new(&schemas.envelope_json)
            .unwrap()
            .decode(datum)
            .unwrap();
        assert_eq!(decoded.op, Op::Update);
        assert_eq!(decoded.table, "t-1");
        assert_eq!(decoded.commit_lsn, 200);
        assert!(decoded.txn_last);
        let after = decoded.after.unwrap();
        assert_eq!(after[1], ("note".to_string(), Some("hi".to_string())));
        assert_eq!(after[2].1.as_deref(), Some("2024-01-01 00:00:00.5+00"));
        assert_eq!(decoded.before.unwrap()[1], ("note".to_string(), None));
    }

    #[test]
    fn direct_reading_equals_apache_avros() {
        let types = [
            ("int8", "9007199254740993"),
            ("int2", "-7"),
            ("int4", "123456"),
            ("numeric", "-1.50"),
            ("text", "naïve\ttext"),
            ("bytea", "\\x00ff10"),
            ("bool", "t"),
            ("float4", "1.5"),
            ("float8", "-Infinity"),
            ("date", "2024-02-29"),
            ("timestamp", "2024-01-02 03:04:05.000006"),
            ("timestamptz", "2024-01-02 03:04:05.5+00"),
            ("time", "23:59:59.999999"),
            ("interval", "1 day 02:03:04"),
            ("uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            ("jsonb", "{\"a\": [1, 2]}"),
            ("_int4", "{1,NULL,3}"),
        ];
        let col = |i: usize, ty: &str| ColumnDef {
            name: format!("c{i}"),
            type_name: ty.into(),
            sql_type: ty.into(),
            key: i == 0,
            enum_labels: None,
        };
        let table = TableDef {
            schema: "public".into(),
            name: "all".into(),
            columns: types.iter().enumerate().map(|(i, (ty, _))| col(i, ty)).collect(),
        };
        let schemas = TableSchemas::new("c", table).unwrap();
        let reader = EnvelopeReader::new(&schemas.envelope_json).unwrap();
        assert!(reader.reads_directly(), "pgferry's own envelopes are read directly");
        let values: Vec<Option<String>> = types.iter().map(|(_, v)| Some(v.to_string())).collect();
        let nulls: Vec<Option<String>> = types.iter().enumerate().map(|(i, (_, v))| (i == 0).then(|| v.to_string())).collect();
        for (op, before, after, toast) in [
            (Op::Create, None, Some(values.clone()), vec![]),
            (Op::Update, Some(nulls.clone()), Some(values.clone()), vec!["c4".to_string()]),
            (Op::Delete, Some(values.clone()), None, vec![]),
            (Op::Update, None, Some(nulls.clone()), vec![]),
        ] {
            let mut ev = event();
            ev.op = op;
            ev.before = before;
            ev.after = after;
            ev.source.unchanged_toast = toast;
            ev.source.txn_last = op == Op::Delete;
            let (_, datum) = encode_event(&schemas, &ev).unwrap();
            let direct = reader.decode(&datum).unwrap();
            assert_eq!(direct, reader.decode_generic(&datum).unwrap(), "{op:?}");
            assert_eq!(direct.commit_ts_us, ev.source.commit_ts_us);
            // Cut short anywhere: an error, never a panic (apache-avro's reader lets some
            // truncated datums through; this one does not).
            for n in 0..datum.len() {
                assert!(reader.decode(&datum[..n]).is_err(), "{op:?} cut at {n} of {}", datum.len());
            }
        }
    }

    #[test]
    fn malformed_input_is_an_error() {
        assert!(decode_frame(&[]).is_err());
        assert!(decode_frame(&[1, 0, 0, 0, 1, 2]).is_err());
        assert!(decode_frame(&[0, 0, 0]).is_err());
        let schemas = TableSchemas::new("c", table()).unwrap();
        let reader = EnvelopeReader::new(&schemas.envelope_json).unwrap();
        assert!(reader.decode(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(reader.decode(&[]).is_err());
        assert!(EnvelopeReader::new("\"string\"").is_err());
        let mut no_key = table();
        no_key.columns[0].key = false;
        assert!(TableSchemas::new("c", no_key).is_err());
    }
}

#[cfg(test)]
mod kind_attribute_tests {
    use super::*;
    use crate::event::{ColumnDef, TableDef};

    #[test]
    fn every_mapped_type_is_readable_back() {
        let col = |name: &str, ty: &str, key| ColumnDef {
            name: name.into(),
            type_name: ty.into(),
            sql_type: ty.into(),
            key,
            enum_labels: None,
        };
        let table = TableDef {
            schema: "public".into(),
            name: "w".into(),
            columns: [
                "int4",
                "bool",
                "int2",
                "int8",
                "float4",
                "float8",
                "date",
                "timestamp",
                "timestamptz",
                "time",
                "interval",
                "bytea",
                "uuid",
                "json",
                "jsonb",
                "numeric",
                "point",
            ]
            .iter()
            .enumerate()
            .map(|(i, ty)| col(&format!("c{i}"), ty, i == 0))
            .collect(),
        };
        let schemas = TableSchemas::new("c", table).unwrap();
        EnvelopeReader::new(&schemas.envelope_json).unwrap();
    }
}
