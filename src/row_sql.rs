//! Reading and writing one row of a replicated table by its primary key, every value bound as
//! a text parameter cast to the column's type (`$n::text::<type>`, types from `format_type`),
//! identifiers quoted. Used by `conflicts resolve` and `repair`.

use anyhow::{bail, Context, Result};
use pgferry_connectors::postgres::{quote_ident, table_columns, PgSession};
use tokio_postgres::types::{ToSql, Type};

/// `schema.table` as pgferry spells it (`table` alone is `public.table`).
pub fn qualified_name(table: &str) -> String {
    if table.contains('.') {
        table.to_string()
    } else {
        format!("public.{table}")
    }
}

/// `table` (`schema.table` or `table`) as `(schema, table)`.
pub fn split_table(table: &str) -> (String, String) {
    let q = qualified_name(table);
    match q.split_once('.') {
        Some((s, t)) => (s.to_string(), t.to_string()),
        None => ("public".to_string(), q),
    }
}

/// A table's columns on one node: name → SQL type, key columns in key order, all in order.
pub struct TableMeta {
    /// `"schema"."table"`, quoted.
    pub qualified: String,
    /// `(name, SQL type)` in attribute order.
    pub columns: Vec<(String, String)>,
    /// Primary-key columns in key order.
    pub key: Vec<String>,
}

impl TableMeta {
    /// The SQL type of column `col`.
    pub fn type_of(&self, col: &str) -> Option<&str> {
        self.columns.iter().find(|(c, _)| c == col).map(|(_, t)| t.as_str())
    }
}

/// The columns and key of `schema.table` on `node`; an error if it is missing or has no key.
pub async fn table_meta(sql: &PgSession, node: &str, schema: &str, table: &str) -> Result<TableMeta> {
    let cols = table_columns(sql, schema, table)
        .await
        .with_context(|| format!("node {node}"))?
        .ok_or_else(|| anyhow::anyhow!("node {node}: table {schema}.{table} does not exist"))?;
    if cols.key.is_empty() {
        bail!("node {node}: table {schema}.{table} has no primary key");
    }
    Ok(TableMeta {
        qualified: format!("{}.{}", quote_ident(schema), quote_ident(table)),
        columns: cols.columns,
        key: cols.key,
    })
}

/// A row as column → text form (None = NULL), in column order.
pub type Row = Vec<(String, Option<String>)>;

/// `k1 = $first::text::<type> AND …`.
pub fn where_key(t: &TableMeta, first: usize) -> String {
    t.key
        .iter()
        .enumerate()
        .map(|(i, k)| {
            format!(
                "{} = ${}::text::{}",
                quote_ident(k),
                first + i,
                t.type_of(k).unwrap_or("text")
            )
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}


/// Runs `text` with text parameters; the rows it returned.
pub async fn exec(
    sql: &PgSession,
    node: &str,
    what: &str,
    text: &str,
    params: &[Option<&str>],
) -> Result<Vec<tokio_postgres::Row>> {
    let stmt = sql
        .client
        .prepare_typed(text, &vec![Type::TEXT; params.len()])
        .await
        .map_err(sql.err(what.to_string()))
        .with_context(|| format!("node {node}"))?;
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
    Ok(sql
        .client
        .query(&stmt, &refs)
        .await
        .map_err(sql.err(what.to_string()))
        .with_context(|| format!("node {node}"))?)
}

/// The node's current row at `key` (locked `FOR UPDATE` when `lock`), every column as text;
/// None if there is none.
pub async fn current_row(
    sql: &PgSession,
    node: &str,
    t: &TableMeta,
    key: &[Option<&str>],
    lock: bool,
) -> Result<Option<Row>> {
    let cols: Vec<String> = t
        .columns
        .iter()
        .map(|(c, _)| format!("{}::text", quote_ident(c)))
        .collect();
    let text = format!(
        "SELECT {} FROM {} WHERE {}{}",
        cols.join(", "),
        t.qualified,
        where_key(t, 1),
        if lock { " FOR UPDATE" } else { "" }
    );
    let rows = exec(sql, node, "reading the current row", &text, key).await?;
    Ok(rows.first().map(|r| {
        t.columns
            .iter()
            .enumerate()
            .map(|(i, (c, _))| (c.clone(), r.get::<_, Option<String>>(i)))
            .collect()
    }))
}

/// Writes `row` (None: deletes the key) on one node inside its open transaction.
pub async fn write_row(sql: &PgSession, node: &str, t: &TableMeta, key: &[Option<&str>], row: &Option<Row>) -> Result<()> {
    match row {
        None => {
            let text = format!("DELETE FROM {} WHERE {}", t.qualified, where_key(t, 1));
            exec(sql, node, "deleting the row", &text, key).await?;
        }
        Some(row) => {
            let mut names = Vec::new();
            let mut values = Vec::new();
            let mut params: Vec<Option<&str>> = Vec::new();
            for (c, v) in row {
                let ty = t
                    .type_of(c)
                    .with_context(|| format!("node {node}: column {c:?} does not exist in {}", t.qualified))?;
                params.push(v.as_deref());
                names.push(quote_ident(c));
                values.push(format!("${}::text::{ty}", params.len()));
            }
            let keys: Vec<String> = t.key.iter().map(|k| quote_ident(k)).collect();
            let sets: Vec<String> = names.iter().map(|c| format!("{c} = EXCLUDED.{c}")).collect();
            let text = format!(
                "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) DO UPDATE SET {}",
                t.qualified,
                names.join(", "),
                values.join(", "),
                keys.join(", "),
                sets.join(", ")
            );
            exec(sql, node, "writing the chosen row", &text, &params).await?;
        }
    }
    Ok(())
}
