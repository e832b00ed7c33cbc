//! The relation cache: pgoutput relation id → table definition, Avro schemas and their
//! registry ids. Column type names are looked up once per (type oid, typmod).

use std::collections::HashMap;
use std::sync::Arc;

use pgferry_connectors::postgres::PgSession;
use pgferry_connectors::registry::Registry;
use pgferry_connectors::replication::LogicalReplicationMessage;
use pgferry_schemas::naming::subject;
use pgferry_schemas::{ColumnDef, TableDef, TableSchemas};

use crate::error::CaptureError;

/// `typname`, `format_type(oid, typmod)`, enum labels.
type TypeNames = (String, String, Option<Vec<String>>);

/// A table as capture encodes it.
pub struct Relation {
    /// Schemas of the current table version.
    pub schemas: Arc<TableSchemas>,
    /// Registry id of the Key schema.
    pub key_id: u32,
    /// Registry id of the Envelope schema.
    pub value_id: u32,
    /// `schema.table`, for messages.
    pub display: String,
}

/// Relation id → [`Relation`].
pub struct Relations {
    cluster: String,
    topic: String,
    registry: Registry,
    types: HashMap<(u32, i32), TypeNames>,
    by_id: HashMap<u32, Relation>,
    /// Avro namespace → `schema.table`, to refuse two tables mapping to one namespace.
    namespaces: HashMap<String, String>,
}

impl Relations {
    /// An empty cache for `cluster`, registering subjects of `topic`.
    pub fn new(cluster: &str, topic: &str, registry: Registry) -> Relations {
        Relations {
            cluster: cluster.to_string(),
            topic: topic.to_string(),
            registry,
            types: HashMap::new(),
            by_id: HashMap::new(),
            namespaces: HashMap::new(),
        }
    }

    /// The relation with pgoutput id `id`.
    pub fn get(&self, id: u32) -> Result<&Relation, CaptureError> {
        self.by_id
            .get(&id)
            .ok_or_else(|| CaptureError::Protocol(format!("change for relation {id} before its Relation message")))
    }

    /// The relation whose current Envelope schema has registry id `id`, if any.
    pub fn by_value_id(&self, id: u32) -> Option<&Relation> {
        self.by_id.values().find(|r| r.value_id == id)
    }

    /// Records a Relation message: resolves column types, builds and registers the schemas.
    pub async fn update(&mut self, sql: &PgSession, msg: &LogicalReplicationMessage) -> Result<(), CaptureError> {
        let LogicalReplicationMessage::Relation {
            relation_id,
            namespace,
            relation_name,
            columns,
            ..
        } = msg
        else {
            return Ok(());
        };
        let mut defs = Vec::with_capacity(columns.len());
        for c in columns {
            let (type_name, sql_type, enum_labels) = self.type_names(sql, c.type_id, c.type_modifier).await?;
            defs.push(ColumnDef {
                name: c.name.to_string(),
                type_name,
                sql_type,
                key: c.flags & 1 == 1,
                enum_labels,
            });
        }
        let display = format!("{namespace}.{relation_name}");
        let table = TableDef {
            schema: namespace.to_string(),
            name: relation_name.to_string(),
            columns: defs,
        };
        let schemas = TableSchemas::new(&self.cluster, table).map_err(|source| CaptureError::Encode {
            table: display.clone(),
            source,
        })?;
        match self.namespaces.get(&schemas.namespace) {
            Some(other) if *other != display => {
                return Err(CaptureError::Setup {
                    node: String::new(),
                    message: format!(
                        "tables {other} and {display} both map to Avro namespace {}; rename one",
                        schemas.namespace
                    ),
                })
            }
            _ => {
                self.namespaces.insert(schemas.namespace.clone(), display.clone());
            }
        }
        let key_name = schemas.key_name();
        let env_name = schemas.envelope_name();
        let key_id = self
            .registry
            .register(&subject(&self.topic, &key_name), &key_name, &schemas.key_json)
            .await?;
        let value_id = self
            .registry
            .register(&subject(&self.topic, &env_name), &env_name, &schemas.envelope_json)
            .await?;
        tracing::debug!(table = %format!("{namespace}.{relation_name}"), key_id, value_id, "relation registered");
        self.by_id.insert(
            *relation_id,
            Relation {
                schemas: Arc::new(schemas),
                key_id,
                value_id,
                display,
            },
        );
        Ok(())
    }

    /// `typname`, `format_type(oid, typmod)` and, for an enum, its labels in sort order.
    async fn type_names(&mut self, sql: &PgSession, oid: u32, typmod: i32) -> Result<TypeNames, CaptureError> {
        if let Some(t) = self.types.get(&(oid, typmod)) {
            return Ok(t.clone());
        }
        let row = sql
            .client
            .query_one(
                "SELECT typname::text, format_type(oid, $2),
                        CASE WHEN typtype = 'e' THEN ARRAY(SELECT enumlabel::text FROM pg_enum
                                                           WHERE enumtypid = t.oid ORDER BY enumsortorder) END
                 FROM pg_type t WHERE oid = $1",
                &[&oid, &typmod],
            )
            .await
            .map_err(sql.err(format!("looking up type oid {oid}")))?;
        let t: TypeNames = (row.get(0), row.get(1), row.get(2));
        if t.2.is_none() {
            // Enums are looked up again at every Relation message: ALTER TYPE … ADD VALUE
            // changes their labels without changing the oid.
            self.types.insert((oid, typmod), t.clone());
        }
        Ok(t)
    }
}
