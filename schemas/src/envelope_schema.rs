//! The Avro schemas of a table's events: `<ns>.Key` and the Debezium-compatible `<ns>.Envelope`.

use apache_avro::Schema;
use serde_json::{json, Value as Json};

use crate::codec::CodecError;
use crate::event::TableDef;
use crate::naming::table_namespace;
use crate::pg_types::Kind;

/// pgferry's version string in `source.version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The Key and Envelope schemas of one table version, as registered and as parsed.
#[derive(Debug, Clone)]
pub struct TableSchemas {
    /// The table these schemas describe.
    pub table: TableDef,
    /// `<cluster>.<schema>.<table>`, Avro-safe.
    pub namespace: String,
    /// Avro mapping of each column, index-aligned with `table.columns`.
    pub kinds: Vec<Kind>,
    /// Avro-safe field name of each column, index-aligned with `table.columns`.
    pub field_names: Vec<String>,
    /// JSON text of the Key schema (what is registered).
    pub key_json: String,
    /// JSON text of the Envelope schema (what is registered).
    pub envelope_json: String,
    /// Parsed Key schema.
    pub key: Schema,
    /// Parsed Envelope schema.
    pub envelope: Schema,
}

/// The `source` record shared by every envelope.
fn source_schema() -> Json {
    let nullable = |t: &str| json!(["null", t]);
    json!({
        "type": "record", "name": "Source", "namespace": "pgferry",
        "fields": [
            {"name": "version", "type": "string"},
            {"name": "connector", "type": "string"},
            {"name": "name", "type": "string"},
            {"name": "ts_ms", "type": "long"},
            {"name": "ts_us", "type": "long"},
            {"name": "snapshot", "type": "string", "default": "false"},
            {"name": "db", "type": "string"},
            {"name": "schema", "type": "string"},
            {"name": "table", "type": "string"},
            {"name": "txId", "type": "long"},
            {"name": "lsn", "type": "long"},
            {"name": "origin", "type": "string"},
            {"name": "origin_lsn", "type": nullable("long"), "default": null},
            {"name": "node_id", "type": "int"},
            {"name": "region", "type": "string"},
            {"name": "commit_lsn", "type": "long"},
            {"name": "txn_seq", "type": "long"},
            {"name": "txn_last", "type": "boolean"},
            {"name": "unchanged_toast", "type": {"type": "array", "items": "string"}, "default": []}
        ]
    })
}

impl TableSchemas {
    /// Builds the schemas of `table` in `cluster`. Fails when two columns map to the same
    /// Avro field name or the table has no key column.
    pub fn new(cluster: &str, table: TableDef) -> Result<TableSchemas, CodecError> {
        let namespace = table_namespace(cluster, &table.schema, &table.name);
        let kinds: Vec<Kind> = table
            .columns
            .iter()
            .map(|c| Kind::for_type_name(&c.type_name))
            .collect();
        let field_names: Vec<String> = table
            .columns
            .iter()
            .map(|c| crate::naming::avro_safe(&c.name))
            .collect();
        let mut seen = std::collections::HashSet::new();
        for (name, col) in field_names.iter().zip(&table.columns) {
            if !seen.insert(name) {
                return Err(CodecError::Schema(format!(
                    "table {}.{}: column {:?} collides with another column as Avro field {name:?}",
                    table.schema, table.name, col.name
                )));
            }
        }
        if table.key_columns().next().is_none() {
            return Err(CodecError::Schema(format!(
                "table {}.{} has no primary key (replica identity) columns",
                table.schema, table.name
            )));
        }
        let field = |i: usize, nullable: bool| {
            let col = &table.columns[i];
            let ty = match kinds[i] {
                Kind::Text => crate::pg_types::text_logical_type(col),
                k => k.avro_type(),
            };
            let mut f = json!({
                "name": field_names[i],
                "type": if nullable { json!(["null", ty]) } else { ty },
                "pgferry.kind": kinds[i].name(),
                "pgferry.type": col.sql_type,
            });
            if nullable {
                f["default"] = Json::Null;
            }
            if field_names[i] != col.name {
                f["pgferry.column"] = json!(col.name);
            }
            f
        };
        let key = json!({
            "type": "record", "name": "Key", "namespace": namespace,
            "fields": table.key_columns().map(|(i, _)| field(i, false)).collect::<Vec<_>>(),
            "connect.name": format!("{namespace}.Key"),
        });
        let value = json!({
            "type": "record", "name": "Value", "namespace": namespace,
            "fields": (0..table.columns.len()).map(|i| field(i, true)).collect::<Vec<_>>(),
            "connect.name": format!("{namespace}.Value"),
        });
        let envelope = json!({
            "type": "record", "name": "Envelope", "namespace": namespace,
            "fields": [
                {"name": "before", "type": ["null", value], "default": null},
                {"name": "after", "type": ["null", "Value"], "default": null},
                {"name": "source", "type": source_schema()},
                {"name": "op", "type": "string"},
                {"name": "ts_ms", "type": ["null", "long"], "default": null},
                {"name": "transaction", "type": ["null", {
                    "type": "record", "name": "block", "namespace": "event",
                    "fields": [
                        {"name": "id", "type": "string"},
                        {"name": "total_order", "type": "long"},
                        {"name": "data_collection_order", "type": "long"}
                    ],
                    "connect.name": "event.block"
                }], "default": null}
            ],
            "connect.name": format!("{namespace}.Envelope"),
        });
        let key_json = key.to_string();
        let envelope_json = envelope.to_string();
        let parse = |s: &str| Schema::parse_str(s).map_err(|e| CodecError::Schema(format!("{namespace}: {e}")));
        Ok(TableSchemas {
            key: parse(&key_json)?,
            envelope: parse(&envelope_json)?,
            table,
            namespace,
            kinds,
            field_names,
            key_json,
            envelope_json,
        })
    }

    /// Full name of the Key record.
    pub fn key_name(&self) -> String {
        format!("{}.Key", self.namespace)
    }

    /// Full name of the Envelope record.
    pub fn envelope_name(&self) -> String {
        format!("{}.Envelope", self.namespace)
    }
}
