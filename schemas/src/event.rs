//! The change-event model shared by capture and apply.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The kind of row change, with Debezium's one-letter codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// `c`: a row was inserted.
    Create,
    /// `u`: a row was updated.
    Update,
    /// `d`: a row was deleted.
    Delete,
    /// `r`: a row read by an initial copy.
    Read,
    /// `t`: the table was truncated.
    Truncate,
}

impl Op {
    /// Debezium's code for the operation.
    pub fn code(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
            Op::Truncate => "t",
        }
    }

    /// Parses Debezium's code; `None` for anything else.
    pub fn from_code(code: &str) -> Option<Op> {
        Some(match code {
            "c" => Op::Create,
            "u" => Op::Update,
            "d" => Op::Delete,
            "r" => Op::Read,
            "t" => Op::Truncate,
            _ => return None,
        })
    }
}

/// One column of a replicated table as the origin sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnDef {
    /// Column name.
    pub name: String,
    /// Base type name (`pg_type.typname`, e.g. `int4`, `timestamptz`), which picks the Avro mapping.
    pub type_name: String,
    /// The full SQL type (`format_type(oid, typmod)`, e.g. `numeric(10,2)`), carried in the schema.
    pub sql_type: String,
    /// Part of the replica identity (the primary key).
    pub key: bool,
    /// The labels of an enum type, in sort order (None for other types).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enum_labels: Option<Vec<String>>,
}

/// A replicated table: qualified name and columns in attribute order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableDef {
    /// Schema (namespace) name.
    pub schema: String,
    /// Table name.
    pub name: String,
    /// Columns in attribute order.
    pub columns: Vec<ColumnDef>,
}

impl TableDef {
    /// The key (replica identity) columns, in attribute order.
    pub fn key_columns(&self) -> impl Iterator<Item = (usize, &ColumnDef)> {
        self.columns.iter().enumerate().filter(|(_, c)| c.key)
    }
}

/// A row image: one text-form value per column of the [`TableDef`], `None` for SQL NULL
/// (and for unchanged TOAST values, which [`SourceInfo::unchanged_toast`] lists by name).
pub type Row = Vec<Option<String>>;

/// Where a change comes from: Debezium's `source` block plus pgferry's fields. The names are
/// shared (`Arc<str>`): capture makes one per event, and a `String` copy of each was a
/// measurable share of its allocations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// Cluster name (Debezium's `name`).
    pub cluster: Arc<str>,
    /// Database name on the origin.
    pub db: Arc<str>,
    /// Origin node name.
    pub origin: Arc<str>,
    /// Origin node id (1–1023).
    pub node_id: u16,
    /// Origin node region.
    pub region: Arc<str>,
    /// Origin commit time, microseconds since the Unix epoch.
    pub commit_ts_us: i64,
    /// Origin transaction id.
    pub tx_id: u32,
    /// LSN of this change.
    pub lsn: u64,
    /// Commit LSN of the transaction.
    pub commit_lsn: u64,
    /// LSN on the node this change was first written to, when it was forwarded.
    pub origin_lsn: Option<u64>,
    /// 0-based position of this event within its transaction.
    pub txn_seq: u64,
    /// 1-based position of this event among the transaction's events of the same table.
    pub data_collection_order: u64,
    /// True on the last event of the transaction.
    pub txn_last: bool,
    /// Columns whose value was not sent (unchanged TOAST) and must be left as they are.
    pub unchanged_toast: Vec<String>,
}

/// One row change of a source transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeEvent {
    /// What happened.
    pub op: Op,
    /// The row before (key columns only unless REPLICA IDENTITY FULL); for update and delete.
    pub before: Option<Row>,
    /// The row after; for insert and update.
    pub after: Option<Row>,
    /// Where and when.
    pub source: SourceInfo,
    /// When the event was produced, milliseconds since the Unix epoch.
    pub ts_ms: i64,
}

impl ChangeEvent {
    /// The transaction id carried in `transaction.id`: `<origin>:<commit_lsn>`.
    pub fn transaction_id(&self) -> String {
        format!("{}:{}", self.source.origin, self.source.commit_lsn)
    }
}
