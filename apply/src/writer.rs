//! Writing decoded changes into local tables: statements prepared once per (table, operation,
//! column set), every identifier quoted and every value bound as a text parameter cast to the
//! local column's type (`$n::text::<type>`), which is lossless for every type.

use std::collections::{HashMap, HashSet};

use pgferry_connectors::postgres::{quote_ident, PgSession};
use pgferry_schemas::truncate::Truncate;
use pgferry_schemas::{DecodedEvent, Op};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Statement;

use crate::error::ApplyError;

/// A local table as apply writes it.
struct LocalTable {
    qualified: String,
    /// Column name → SQL type.
    types: HashMap<String, String>,
    /// Primary-key columns in key order.
    key: Vec<String>,
}

/// Table metadata and prepared statements of one session.
pub struct Writer {
    allowed: HashSet<(String, String)>,
    tables: HashMap<(String, String), LocalTable>,
    statements: HashMap<String, Statement>,
}

/// What a change did locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The row was written.
    Applied,
    /// The target row was not there (update or delete of a missing row).
    Missing,
}

impl Writer {
    /// A writer allowed to touch only `tables` (schema, name).
    pub fn new(tables: Vec<(String, String)>) -> Writer {
        Writer {
            allowed: tables.into_iter().collect(),
            tables: HashMap::new(),
            statements: HashMap::new(),
        }
    }

    fn write_err(&self, ev: &DecodedEvent, message: String) -> ApplyError {
        write_err(ev, message)
    }

    async fn table(&mut self, sql: &PgSession, ev: &DecodedEvent) -> Result<&LocalTable, ApplyError> {
        let id = (ev.schema.clone(), ev.table.clone());
        if !self.tables.contains_key(&id) {
            if !self.allowed.contains(&id) {
                return Err(self.write_err(ev, "not in this node's replication set".into()));
            }
            let rows = sql
                .client
                .query(
                    "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                            array_position(i.indkey::int2[], a.attnum)
                     FROM pg_attribute a
                     JOIN pg_class c ON c.oid = a.attrelid
                     JOIN pg_namespace n ON n.oid = c.relnamespace
                     LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
                     WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
                     ORDER BY a.attnum",
                    &[&ev.schema, &ev.table],
                )
                .await
                .map_err(sql.err(format!("reading columns of {}.{}", ev.schema, ev.table)))?;
            if rows.is_empty() {
                return Err(self.write_err(ev, format!("table does not exist at {}", sql.endpoint)));
            }
            let mut key: Vec<(i32, String)> = Vec::new();
            let mut types = HashMap::new();
            for r in rows {
                let name: String = r.get(0);
                if let Some(pos) = r.get::<_, Option<i32>>(2) {
                    key.push((pos, name.clone()));
                }
                types.insert(name, r.get::<_, String>(1));
            }
            if key.is_empty() {
                return Err(self.write_err(ev, format!("has no primary key at {}", sql.endpoint)));
            }
            key.sort();
            let qualified = format!("{}.{}", quote_ident(&ev.schema), quote_ident(&ev.table));
            self.tables.insert(
                id.clone(),
                LocalTable {
                    qualified,
                    types,
                    key: key.into_iter().map(|(_, n)| n).collect(),
                },
            );
        }
        Ok(&self.tables[&id])
    }

    /// Truncates a table inside the caller's open transaction. Tables the origin truncated by
    /// CASCADE arrive as their own events, so the local statement never cascades: it cannot
    /// reach tables outside the replication set.
    pub async fn truncate(&mut self, sql: &PgSession, t: &Truncate) -> Result<(), ApplyError> {
        let id = (t.schema.clone(), t.table.clone());
        if !self.allowed.contains(&id) {
            return Err(ApplyError::Write {
                origin: t.origin.clone(),
                table: format!("{}.{}", t.schema, t.table),
                message: "not in this node's replication set".into(),
            });
        }
        let restart = if t.restart_identity { " RESTART IDENTITY" } else { "" };
        let stmt = format!(
            "TRUNCATE TABLE {}.{}{restart}",
            quote_ident(&t.schema),
            quote_ident(&t.table)
        );
        sql.client
            .batch_execute(&stmt)
            .await
            .map_err(sql.err(format!("truncating {}.{}", t.schema, t.table)))?;
        Ok(())
    }

    /// Writes one change inside the caller's open transaction.
    pub async fn apply(&mut self, sql: &PgSession, ev: &DecodedEvent) -> Result<Outcome, ApplyError> {
        let table = self.table(sql, ev).await?;
        let (text, params) = build_statement(table, ev).map_err(|message| write_err(ev, message))?;
        if text.is_empty() {
            return Ok(Outcome::Applied);
        }
        let stmt = match self.statements.get(&text) {
            Some(s) => s.clone(),
            None => {
                let types = vec![Type::TEXT; params.len()];
                let s = sql
                    .client
                    .prepare_typed(&text, &types)
                    .await
                    .map_err(sql.err(format!("preparing a statement for {}.{}", ev.schema, ev.table)))?;
                self.statements.insert(text.clone(), s.clone());
                s
            }
        };
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let n = sql.client.execute(&stmt, &refs).await.map_err(sql.err(format!(
            "{} on {}.{}",
            ev.op.code(),
            ev.schema,
            ev.table
        )))?;
        Ok(if n == 0 { Outcome::Missing } else { Outcome::Applied })
    }
}

fn write_err(ev: &DecodedEvent, message: String) -> ApplyError {
    ApplyError::Write {
        origin: ev.origin.clone(),
        table: format!("{}.{}", ev.schema, ev.table),
        message,
    }
}

/// The statement text and its text parameters for one change (empty text: nothing to do).
fn build_statement<'e>(table: &LocalTable, ev: &'e DecodedEvent) -> Result<(String, Vec<Option<&'e str>>), String> {
    let cast = |col: &str| -> Result<&str, String> {
        table
            .types
            .get(col)
            .map(String::as_str)
            .ok_or_else(|| format!("column {col:?} does not exist locally"))
    };
    let unchanged: HashSet<&str> = ev.unchanged_toast.iter().map(String::as_str).collect();
    let mut params: Vec<Option<&str>> = Vec::new();
    let key_source = match ev.op {
        Op::Create | Op::Read | Op::Truncate => None,
        Op::Update | Op::Delete => ev.before.as_ref().or(ev.after.as_ref()),
    };
    let mut where_clause = String::new();
    if let Some(row) = key_source {
        for (i, k) in table.key.iter().enumerate() {
            let v = row.iter().find(|(c, _)| c == k).and_then(|(_, v)| v.as_deref());
            let v = v.ok_or_else(|| format!("event has no value for key column {k:?}"))?;
            params.push(Some(v));
            if i > 0 {
                where_clause.push_str(" AND ");
            }
            where_clause.push_str(&format!("{} = ${}::text::{}", quote_ident(k), params.len(), cast(k)?));
        }
    }
    // (quoted column, placeholder) of every column the after image carries.
    let assigned = |params: &mut Vec<Option<&'e str>>| -> Result<Vec<(String, String)>, String> {
        let row = ev
            .after
            .as_ref()
            .ok_or_else(|| format!("{} without an after image", ev.op.code()))?;
        let mut out = Vec::new();
        for (c, v) in row.iter().filter(|(c, _)| !unchanged.contains(c.as_str())) {
            params.push(v.as_deref());
            out.push((quote_ident(c), format!("${}::text::{}", params.len(), cast(c)?)));
        }
        Ok(out)
    };
    let text = match ev.op {
        Op::Create | Op::Read => {
            let cols = assigned(&mut params)?;
            let names: Vec<&str> = cols.iter().map(|(c, _)| c.as_str()).collect();
            let vals: Vec<&str> = cols.iter().map(|(_, v)| v.as_str()).collect();
            format!(
                "INSERT INTO {} ({}) VALUES ({})",
                table.qualified,
                names.join(", "),
                vals.join(", ")
            )
        }
        Op::Update => {
            let sets: Vec<String> = assigned(&mut params)?
                .into_iter()
                .map(|(c, v)| format!("{c} = {v}"))
                .collect();
            format!(
                "UPDATE {} SET {} WHERE {where_clause}",
                table.qualified,
                sets.join(", ")
            )
        }
        Op::Delete => format!("DELETE FROM {} WHERE {where_clause}", table.qualified),
        Op::Truncate => String::new(),
    };
    Ok((text, params))
}
