//! Reading a change envelope's Avro binary datum straight into a [`DecodedEvent`], without an
//! `apache_avro::types::Value` tree.
//!
//! Why not apache-avro's reader: it resolves the writer schema's names on every call and builds
//! a `Value` per field (a `String` per text column, then copied again into the event): `perf
//! record` of apply draining a TPC-B backlog put `decode_internal`, `resolve_names` and the
//! allocator near a third of apply's own CPU. This reader is planned once per writer schema
//! ([`Plan::new`]), for the envelopes pgferry writes (`envelope_schema.rs`): top-level fields
//! in any order, `before`/`after` as `["null", Value]` whose columns are the kinds' primitive
//! Avro types, optionally nullable. A schema of any other shape gets no plan, and
//! `EnvelopeReader` falls back to apache-avro's generic reader. Every read is bounds-checked:
//! bad bytes are an error, never a panic (the fuzz target `event_decoder` runs both paths).

use apache_avro::schema::{RecordSchema, Schema, UnionSchema};

use crate::codec::{CodecError, DecodedEvent};
use crate::event::Op;
use crate::pg_types::Kind;

/// How one column of the `Value` record is written.
#[derive(Debug, Clone, Copy)]
struct Column {
    kind: Kind,
    /// `Some(i)`: a union whose branch `i` is null (the other branch is the value).
    null_branch: Option<u8>,
}

/// What a top-level envelope field holds.
#[derive(Debug, Clone)]
enum Field {
    Before,
    After,
    Op,
    Source(Vec<(SourceField, Schema)>),
    /// Anything else: skipped by its schema.
    Skip(Schema),
}

/// The source fields apply reads.
#[derive(Debug, Clone, Copy, PartialEq)]
enum SourceField {
    Schema,
    Table,
    Origin,
    CommitLsn,
    TsUs,
    TxnSeq,
    TxnLast,
    UnchangedToast,
    Other,
}

/// How to read one writer schema's envelopes.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    fields: Vec<Field>,
    /// The `Value` record's columns, in field order, with their names.
    columns: Vec<(String, Column)>,
    /// The branch of `before`/`after` that is null.
    row_null_branch: u8,
}

impl Plan {
    /// A plan for `schema` (a pgferry change envelope) whose `Value` columns are `columns`;
    /// `None` when the schema has a shape this reader does not handle.
    pub(crate) fn new(schema: &Schema, columns: &[(String, Kind)]) -> Option<Plan> {
        let Schema::Record(env) = schema else { return None };
        let mut fields = Vec::new();
        let mut value_record: Option<&RecordSchema> = None;
        let mut row_null_branch = None;
        for f in &env.fields {
            let field = match f.name.as_str() {
                "before" | "after" => {
                    let Schema::Union(u) = &f.schema else { return None };
                    let (null, other) = nullable(u)?;
                    row_null_branch = Some(null);
                    match other {
                        Schema::Record(r) if value_record.is_none() => value_record = Some(r),
                        // `after` names the record `before` defined.
                        Schema::Ref { name } if value_record.is_some_and(|v| v.name == *name) => {}
                        _ => return None,
                    }
                    if f.name == "before" {
                        Field::Before
                    } else {
                        Field::After
                    }
                }
                "op" => {
                    if f.schema != Schema::String {
                        return None;
                    }
                    Field::Op
                }
                "source" => {
                    let Schema::Record(r) = &f.schema else { return None };
                    let mut read = Vec::new();
                    for sf in &r.fields {
                        if !skippable(&sf.schema) {
                            return None;
                        }
                        let which = match sf.name.as_str() {
                            "schema" => SourceField::Schema,
                            "table" => SourceField::Table,
                            "origin" => SourceField::Origin,
                            "commit_lsn" => SourceField::CommitLsn,
                            "ts_us" => SourceField::TsUs,
                            "txn_seq" => SourceField::TxnSeq,
                            "txn_last" => SourceField::TxnLast,
                            "unchanged_toast" => SourceField::UnchangedToast,
                            _ => SourceField::Other,
                        };
                        // The fields apply reads must have the types pgferry writes.
                        let expected = match which {
                            SourceField::Schema | SourceField::Table | SourceField::Origin => Some(Schema::String),
                            SourceField::CommitLsn | SourceField::TsUs | SourceField::TxnSeq => Some(Schema::Long),
                            SourceField::TxnLast => Some(Schema::Boolean),
                            SourceField::UnchangedToast => match &sf.schema {
                                Schema::Array(a) if *a.items == Schema::String => None,
                                _ => return None,
                            },
                            SourceField::Other => None,
                        };
                        if expected.is_some_and(|e| e != sf.schema) {
                            return None;
                        }
                        read.push((which, sf.schema.clone()));
                    }
                    Field::Source(read)
                }
                _ => {
                    if !skippable(&f.schema) {
                        return None;
                    }
                    Field::Skip(f.schema.clone())
                }
            };
            fields.push(field);
        }
        let value = value_record?;
        if value.fields.len() != columns.len() {
            return None;
        }
        let mut planned = Vec::with_capacity(columns.len());
        for (f, (name, kind)) in value.fields.iter().zip(columns) {
            let (null_branch, ty) = match &f.schema {
                Schema::Union(u) => {
                    let (null, other) = nullable(u)?;
                    (Some(null), other)
                }
                other => (None, other),
            };
            if *ty != primitive(*kind) {
                return None;
            }
            planned.push((name.clone(), Column { kind: *kind, null_branch }));
        }
        Some(Plan {
            fields,
            columns: planned,
            row_null_branch: row_null_branch?,
        })
    }

    /// Reads one datum (without the Confluent header).
    pub(crate) fn read(&self, mut datum: &[u8]) -> Result<DecodedEvent, CodecError> {
        let buf = &mut datum;
        let mut ev = DecodedEvent {
            op: Op::Read,
            schema: String::new(),
            table: String::new(),
            before: None,
            after: None,
            origin: String::new(),
            commit_lsn: 0,
            commit_ts_us: 0,
            txn_seq: 0,
            txn_last: false,
            unchanged_toast: Vec::new(),
        };
        let mut seen = [false; 8];
        let mut op = None;
        for field in &self.fields {
            match field {
                Field::Before => ev.before = self.row(buf)?,
                Field::After => ev.after = self.row(buf)?,
                Field::Op => {
                    let code = string(buf)?;
                    op = Some(Op::from_code(&code).ok_or_else(|| bad(format!("unknown op {code:?}")))?);
                }
                Field::Source(fields) => {
                    for (which, schema) in fields {
                        let slot = *which as usize;
                        match which {
                            SourceField::Schema => ev.schema = string(buf)?,
                            SourceField::Table => ev.table = string(buf)?,
                            SourceField::Origin => ev.origin = string(buf)?,
                            SourceField::CommitLsn => ev.commit_lsn = long(buf)? as u64,
                            SourceField::TsUs => ev.commit_ts_us = long(buf)?,
                            SourceField::TxnSeq => ev.txn_seq = long(buf)? as u64,
                            SourceField::TxnLast => ev.txn_last = boolean(buf)?,
                            SourceField::UnchangedToast => ev.unchanged_toast = strings(buf)?,
                            SourceField::Other => skip(schema, buf)?,
                        }
                        if slot < seen.len() {
                            seen[slot] = true;
                        }
                    }
                }
                Field::Skip(schema) => skip(schema, buf)?,
            }
        }
        ev.op = op.ok_or_else(|| bad("missing op".into()))?;
        // The fields the generic reader requires (it fails on a missing one too).
        for (i, name) in ["schema", "table", "origin", "commit_lsn", "ts_us", "txn_seq"].iter().enumerate() {
            if !seen[i] {
                return Err(bad(format!("source.{name} missing")));
            }
        }
        Ok(ev)
    }

    /// `before` or `after`: null, or the `Value` record as text values.
    fn row(&self, buf: &mut &[u8]) -> Result<Option<Vec<(String, Option<String>)>>, CodecError> {
        if branch(buf, 2)? == self.row_null_branch {
            return Ok(None);
        }
        let mut row = Vec::with_capacity(self.columns.len());
        for (name, c) in &self.columns {
            let null = match c.null_branch {
                Some(n) => branch(buf, 2)? == n,
                None => false,
            };
            let text = if null { None } else { Some(text(name, c.kind, buf)?) };
            row.push((name.clone(), text));
        }
        Ok(Some(row))
    }
}

/// The primitive Avro schema a kind's values are written as (`Kind::avro_type`).
fn primitive(kind: Kind) -> Schema {
    match kind {
        Kind::Boolean => Schema::Boolean,
        Kind::Int16 | Kind::Int32 | Kind::Date => Schema::Int,
        Kind::Int64 | Kind::Timestamp | Kind::Time => Schema::Long,
        Kind::Float32 => Schema::Float,
        Kind::Float64 => Schema::Double,
        Kind::Bytes => Schema::Bytes,
        Kind::TimestampTz | Kind::Interval | Kind::Uuid | Kind::Json | Kind::Text => Schema::String,
    }
}

/// `(null branch, other schema)` of a two-branch union with a null.
fn nullable(u: &UnionSchema) -> Option<(u8, &Schema)> {
    match u.variants() {
        [Schema::Null, other] => Some((0, other)),
        [other, Schema::Null] => Some((1, other)),
        _ => None,
    }
}

/// Whether [`skip`] can step over a value of `schema`.
fn skippable(schema: &Schema) -> bool {
    match schema {
        Schema::Null | Schema::Boolean | Schema::Int | Schema::Long | Schema::Float | Schema::Double => true,
        Schema::Bytes | Schema::String => true,
        Schema::Array(a) => skippable(&a.items),
        Schema::Union(u) => u.variants().iter().all(skippable),
        Schema::Record(r) => r.fields.iter().all(|f| skippable(&f.schema)),
        _ => false,
    }
}

fn bad(message: String) -> CodecError {
    CodecError::Avro(message)
}

fn truncated() -> CodecError {
    bad("datum ends early".into())
}

/// A zig-zag varint (Avro `int` and `long`), at most 10 bytes.
fn long(buf: &mut &[u8]) -> Result<i64, CodecError> {
    let mut z: u64 = 0;
    for i in 0..10 {
        let (&b, rest) = buf.split_first().ok_or_else(truncated)?;
        *buf = rest;
        z |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(((z >> 1) as i64) ^ -((z & 1) as i64));
        }
    }
    Err(bad("varint longer than 10 bytes".into()))
}

/// An `int`: a varint that fits 32 bits.
fn int(buf: &mut &[u8]) -> Result<i32, CodecError> {
    i32::try_from(long(buf)?).map_err(|_| bad("int out of range".into()))
}

/// A union branch index below `branches`.
fn branch(buf: &mut &[u8], branches: usize) -> Result<u8, CodecError> {
    let i = long(buf)?;
    if i < 0 || i as usize >= branches {
        return Err(bad(format!("union branch {i} of {branches}")));
    }
    Ok(i as u8)
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], CodecError> {
    if buf.len() < n {
        return Err(truncated());
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

fn bytes<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], CodecError> {
    let n = long(buf)?;
    let n = usize::try_from(n).map_err(|_| bad(format!("negative length {n}")))?;
    take(buf, n)
}

fn string(buf: &mut &[u8]) -> Result<String, CodecError> {
    let b = bytes(buf)?;
    String::from_utf8(b.to_vec()).map_err(|_| bad("string is not UTF-8".into()))
}

fn boolean(buf: &mut &[u8]) -> Result<bool, CodecError> {
    match take(buf, 1)? {
        [0] => Ok(false),
        [1] => Ok(true),
        [b] => Err(bad(format!("boolean byte {b}"))),
        _ => Err(truncated()),
    }
}

/// An array of strings (`unchanged_toast`).
fn strings(buf: &mut &[u8]) -> Result<Vec<String>, CodecError> {
    let mut out = Vec::new();
    loop {
        let mut n = long(buf)?;
        if n == 0 {
            return Ok(out);
        }
        if n < 0 {
            n = n.checked_neg().ok_or_else(|| bad("bad block count".into()))?;
            long(buf)?; // the block's size in bytes
        }
        for _ in 0..n {
            out.push(string(buf)?);
        }
    }
}

/// Steps over one value of `schema` ([`skippable`] schemas only).
fn skip(schema: &Schema, buf: &mut &[u8]) -> Result<(), CodecError> {
    match schema {
        Schema::Null => Ok(()),
        Schema::Boolean => boolean(buf).map(drop),
        Schema::Int | Schema::Long => long(buf).map(drop),
        Schema::Float => take(buf, 4).map(drop),
        Schema::Double => take(buf, 8).map(drop),
        Schema::Bytes | Schema::String => bytes(buf).map(drop),
        Schema::Array(a) => loop {
            let n = long(buf)?;
            if n == 0 {
                return Ok(());
            }
            if n < 0 {
                let size = long(buf)?;
                let size = usize::try_from(size).map_err(|_| bad("negative block size".into()))?;
                take(buf, size)?;
                continue;
            }
            for _ in 0..n {
                skip(&a.items, buf)?;
            }
        },
        Schema::Union(u) => {
            let i = branch(buf, u.variants().len())?;
            skip(&u.variants()[i as usize], buf)
        }
        Schema::Record(r) => r.fields.iter().try_for_each(|f| skip(&f.schema, buf)),
        _ => Err(bad("unsupported schema".into())),
    }
}

/// One non-null column value in PostgreSQL text form (the same text `Kind::to_text` gives).
fn text(column: &str, kind: Kind, buf: &mut &[u8]) -> Result<String, CodecError> {
    use apache_avro::types::Value;
    let value = match kind {
        Kind::Text | Kind::Uuid | Kind::Json | Kind::Interval => return string(buf),
        Kind::Boolean => Value::Boolean(boolean(buf)?),
        Kind::Int16 | Kind::Int32 | Kind::Date => Value::Int(int(buf)?),
        Kind::Int64 | Kind::Timestamp | Kind::Time => Value::Long(long(buf)?),
        Kind::Float32 => Value::Float(f32::from_le_bytes(take(buf, 4)?.try_into().map_err(|_| truncated())?)),
        Kind::Float64 => Value::Double(f64::from_le_bytes(take(buf, 8)?.try_into().map_err(|_| truncated())?)),
        Kind::Bytes => Value::Bytes(bytes(buf)?.to_vec()),
        Kind::TimestampTz => Value::String(string(buf)?),
    };
    kind.to_text(column, &value).map_err(CodecError::from)
}
