//! `pgferry conflicts list|show|resolve`: the rows of `pgferry.conflicts` on the nodes, and
//! settling a parked conflict.
//!
//! Resolving settles the key cluster-wide (docs/decisions.md, "Conflicts"): the chosen row is
//! written on every node that has a parked, unresolved conflict for the same table and key —
//! the named node and its peers — in one local transaction per node that also marks those
//! conflicts resolved. All nodes write (holding the row lock) before any commits, so each
//! node's write reaches the others only after they hold the same row; apply then finds the
//! incoming row equal to the local one, and a change that leaves the row as it is is never
//! parked again. Every value is bound as a text parameter cast to the column's type.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use pgferry_connectors::config::Config;
use pgferry_connectors::postgres::{self, PgSession};
use serde_json::{json, Map, Value};

use crate::row_sql::{current_row, exec, qualified_name, table_meta, write_row, Row};

#[derive(Subcommand)]
pub enum ConflictsCommand {
    /// Recorded conflicts of the chosen node(s), newest last.
    List(ListArgs),
    /// One conflict in full: local and remote rows, origins, commit times, commit LSN.
    Show(ShowArgs),
    /// Settle a parked conflict: write the chosen row (it replicates like any local write).
    Resolve(ResolveArgs),
}

#[derive(Args)]
pub struct ListArgs {
    /// Only this node (default: every node in the config).
    #[arg(long)]
    node: Option<String>,
    /// Only parked conflicts that are not resolved yet.
    #[arg(long)]
    parked: bool,
    /// Only this table (`schema.table`, or `table` for `public.table`).
    #[arg(long, value_name = "TABLE")]
    table: Option<String>,
    /// At most this many conflicts per node (the newest).
    #[arg(long, value_name = "K")]
    limit: Option<i64>,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    /// Counts per node, table, type and resolution instead of one line per conflict.
    #[arg(long, conflicts_with = "limit")]
    summary: bool,
}

#[derive(Args)]
pub struct ShowArgs {
    /// The node that recorded the conflict.
    #[arg(long)]
    node: String,
    /// The conflict's id on that node.
    id: i64,
    /// As one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ResolveArgs {
    /// The node that recorded the conflict.
    #[arg(long)]
    node: String,
    /// The conflict's id on that node.
    id: i64,
    /// Which row wins: the node's current row, the parked remote change, or given values.
    #[arg(long, value_enum)]
    take: Take,
    /// With `--take values`: a JSON object of column → text form (or null), merged over the
    /// node's current row.
    #[arg(long, value_name = "JSON", required_if_eq("take", "values"))]
    values: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Take {
    Local,
    Remote,
    Values,
}

impl Take {
    fn name(self) -> &'static str {
        match self {
            Take::Local => "local",
            Take::Remote => "remote",
            Take::Values => "values",
        }
    }
}

pub async fn run(config: &Config, command: ConflictsCommand) -> Result<()> {
    match command {
        ConflictsCommand::List(a) => list(config, a).await,
        ConflictsCommand::Show(a) => show(config, a).await,
        ConflictsCommand::Resolve(a) => resolve(config, a).await,
    }
}

async fn connect(config: &Config, node: &str) -> Result<PgSession> {
    let n = config
        .node(node)
        .with_context(|| format!("node {node:?} is not in the config"))?;
    Ok(postgres::connect(&n.dsn, "pgferry-conflicts").await?)
}


/// `conflicts list --summary`: per node, the count of conflicts by table, type and resolution.
async fn summary(config: &Config, nodes: &[String], table: Option<&str>, parked: bool, json: bool) -> Result<()> {
    let mut rows: Vec<[String; 5]> = Vec::new();
    for node in nodes {
        let sql = connect(config, node).await?;
        let found = sql
            .client
            .query(
                "SELECT tbl, conflict_type, resolution, count(*)::text FROM pgferry.conflicts
                 WHERE ($1::text IS NULL OR tbl = $1::text)
                   AND (NOT $2::bool OR (resolution = 'parked' AND resolved_at IS NULL))
                 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
                &[&table, &parked],
            )
            .await
            .map_err(sql.err("counting pgferry.conflicts (has `pgferry init` run?)"))
            .with_context(|| format!("node {node}"))?;
        for r in found {
            rows.push([node.clone(), r.get(0), r.get(1), r.get(2), r.get(3)]);
        }
    }
    if json {
        for r in &rows {
            let line = json!({
                "node": r[0],
                "table": r[1],
                "type": r[2],
                "resolution": r[3],
                "count": r[4].parse::<i64>().unwrap_or_default(),
            });
            println!("{line}");
        }
        return Ok(());
    }
    print_table(&["NODE", "TABLE", "TYPE", "RESOLUTION", "COUNT"], &rows);
    Ok(())
}

/// Prints `rows` under `header`, in columns; `(no conflicts)` when there are none.
fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    if rows.is_empty() {
        println!("(no conflicts)");
    }
}

async fn list(config: &Config, a: ListArgs) -> Result<()> {
    let nodes: Vec<String> = match &a.node {
        Some(n) => {
            config
                .node(n)
                .with_context(|| format!("node {n:?} is not in the config"))?;
            vec![n.clone()]
        }
        None => config.nodes.iter().map(|n| n.name.clone()).collect(),
    };
    let table = a.table.as_deref().map(qualified_name);
    if a.summary {
        return summary(config, &nodes, table.as_deref(), a.parked, a.json).await;
    }
    let mut rows: Vec<[String; 10]> = Vec::new();
    for node in &nodes {
        let sql = connect(config, node).await?;
        let found = sql
            .client
            .query(
                "SELECT id::text, detected_at::text, tbl, key::text, conflict_type, resolution, remote_origin,
                        coalesce(resolved_at::text, ''), coalesce(resolved_by, '')
                 FROM (SELECT * FROM pgferry.conflicts
                       WHERE ($1::text IS NULL OR tbl = $1::text)
                         AND (NOT $2::bool OR (resolution = 'parked' AND resolved_at IS NULL))
                       ORDER BY id DESC LIMIT $3::int8) c
                 ORDER BY id",
                &[&table, &a.parked, &a.limit],
            )
            .await
            .map_err(sql.err("reading pgferry.conflicts (has `pgferry init` run?)"))
            .with_context(|| format!("node {node}"))?;
        for r in found {
            rows.push([
                r.get(0),
                node.clone(),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
                r.get(7),
                r.get(8),
            ]);
        }
    }
    if a.json {
        for r in &rows {
            let line = json!({
                "id": r[0].parse::<i64>().unwrap_or_default(),
                "node": r[1],
                "detected_at": r[2],
                "table": r[3],
                "key": serde_json::from_str::<Value>(&r[4]).unwrap_or(Value::String(r[4].clone())),
                "type": r[5],
                "resolution": r[6],
                "remote_origin": r[7],
                "resolved_at": if r[8].is_empty() { Value::Null } else { Value::String(r[8].clone()) },
                "resolved_by": if r[9].is_empty() { Value::Null } else { Value::String(r[9].clone()) },
            });
            println!("{line}");
        }
        return Ok(());
    }
    print_table(
        &[
            "ID",
            "NODE",
            "DETECTED_AT",
            "TABLE",
            "KEY",
            "TYPE",
            "RESOLUTION",
            "REMOTE_ORIGIN",
            "RESOLVED_AT",
            "RESOLVED_BY",
        ],
        &rows,
    );
    Ok(())
}

/// One row of `pgferry.conflicts`, every column as text (JSON columns as JSON text).
struct Conflict {
    id: i64,
    detected_at: String,
    table: String,
    key: String,
    /// The key's values in key order, as text.
    key_values: Vec<Option<String>>,
    conflict_type: String,
    resolver: String,
    resolution: String,
    local_row: Option<String>,
    local_origin: Option<String>,
    local_commit_ts: Option<String>,
    remote_op: String,
    remote_row: Option<String>,
    remote_origin: String,
    remote_commit_ts: String,
    remote_commit_lsn: String,
    resolved_at: Option<String>,
    resolved_by: Option<String>,
}

/// Conflict `id` on `node` (locked `FOR UPDATE` when `lock`), or a clear error.
async fn fetch(sql: &PgSession, node: &str, id: i64, lock: bool) -> Result<Conflict> {
    let text = format!(
        "SELECT id, detected_at::text, tbl, key::text,
                ARRAY(SELECT e FROM jsonb_array_elements_text(key) WITH ORDINALITY AS x(e, n) ORDER BY n),
                conflict_type, resolver, resolution, local_row::text, local_origin, local_commit_ts::text,
                remote_op, remote_row::text, remote_origin, remote_commit_ts::text, remote_commit_lsn::text,
                resolved_at::text, resolved_by
         FROM pgferry.conflicts WHERE id = $1{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    let row = sql
        .client
        .query_opt(&text, &[&id])
        .await
        .map_err(sql.err("reading pgferry.conflicts (has `pgferry init` run?)"))
        .with_context(|| format!("node {node}"))?;
    let Some(r) = row else {
        bail!("node {node} has no conflict with id {id}");
    };
    Ok(Conflict {
        id: r.get(0),
        detected_at: r.get(1),
        table: r.get(2),
        key: r.get(3),
        key_values: r.get(4),
        conflict_type: r.get(5),
        resolver: r.get(6),
        resolution: r.get(7),
        local_row: r.get(8),
        local_origin: r.get(9),
        local_commit_ts: r.get(10),
        remote_op: r.get(11),
        remote_row: r.get(12),
        remote_origin: r.get(13),
        remote_commit_ts: r.get(14),
        remote_commit_lsn: r.get(15),
        resolved_at: r.get(16),
        resolved_by: r.get(17),
    })
}

fn json_or_null(text: &Option<String>) -> Value {
    text.as_deref()
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or(Value::Null)
}

fn op_name(op: &str) -> &str {
    match op {
        "c" => "insert",
        "r" => "insert (snapshot)",
        "u" => "update",
        "d" => "delete",
        other => other,
    }
}

async fn show(config: &Config, a: ShowArgs) -> Result<()> {
    let sql = connect(config, &a.node).await?;
    let c = fetch(&sql, &a.node, a.id, false).await?;
    if a.json {
        let v = json!({
            "id": c.id,
            "node": a.node,
            "detected_at": c.detected_at,
            "table": c.table,
            "key": serde_json::from_str::<Value>(&c.key).unwrap_or(Value::Null),
            "type": c.conflict_type,
            "resolver": c.resolver,
            "resolution": c.resolution,
            "local_row": json_or_null(&c.local_row),
            "local_origin": c.local_origin,
            "local_commit_ts": c.local_commit_ts,
            "remote_op": c.remote_op,
            "remote_row": json_or_null(&c.remote_row),
            "remote_origin": c.remote_origin,
            "remote_commit_ts": c.remote_commit_ts,
            "remote_commit_lsn": c.remote_commit_lsn,
            "resolved_at": c.resolved_at,
            "resolved_by": c.resolved_by,
        });
        println!("{v}");
        return Ok(());
    }
    println!("conflict {} on node {}", c.id, a.node);
    println!("  table        {}", c.table);
    println!("  key          {}", c.key);
    println!("  type         {}", c.conflict_type);
    println!("  resolver     {}", c.resolver);
    println!("  resolution   {}", c.resolution);
    println!("  detected at  {}", c.detected_at);
    match (&c.resolved_at, &c.resolved_by) {
        (Some(at), by) => println!("  resolved     {at} (take {})", by.as_deref().unwrap_or("?")),
        (None, _) if c.resolution == "parked" => println!("  resolved     no (waiting: pgferry conflicts resolve)"),
        (None, _) => {}
    }
    println!(
        "local row (origin {}, committed {}):",
        c.local_origin.as_deref().unwrap_or("-"),
        c.local_commit_ts.as_deref().unwrap_or("-")
    );
    print_row(&c.local_row);
    println!(
        "remote {} (origin {}, committed {}, commit LSN {}):",
        op_name(&c.remote_op),
        c.remote_origin,
        c.remote_commit_ts,
        c.remote_commit_lsn
    );
    print_row(&c.remote_row);
    Ok(())
}

fn print_row(row: &Option<String>) {
    match json_or_null(row) {
        Value::Object(m) => {
            let width = m.keys().map(|k| k.chars().count()).max().unwrap_or(0);
            for (k, v) in m {
                let text = match v {
                    Value::Null => "NULL".to_string(),
                    Value::String(s) => format!("{s:?}"),
                    other => other.to_string(),
                };
                println!("  {k:<width$}  {text}");
            }
        }
        _ => println!("  (no row)"),
    }
}

/// Marks every parked, unresolved conflict of `table`/`key` on this node resolved `by`; their ids.
async fn resolve_parked(sql: &PgSession, node: &str, by: &str, table: &str, key: &str) -> Result<Vec<i64>> {
    Ok(exec(
        sql,
        node,
        "marking conflicts resolved",
        "UPDATE pgferry.conflicts SET resolved_at = now(), resolved_by = $1
         WHERE tbl = $2 AND key = $3::jsonb AND resolution = 'parked' AND resolved_at IS NULL
         RETURNING id::text",
        &[Some(by), Some(table), Some(key)],
    )
    .await?
    .iter()
    .filter_map(|r| r.get::<_, String>(0).parse().ok())
    .collect())
}

/// A JSON value as the text form bound for a column (strings as they are, null as NULL,
/// anything else — numbers, booleans, JSON for json/jsonb columns — as its JSON text).
fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

async fn resolve(config: &Config, a: ResolveArgs) -> Result<()> {
    if a.take != Take::Values && a.values.is_some() {
        bail!("--values goes with --take values");
    }
    let values: Option<Map<String, Value>> = match &a.values {
        None => None,
        Some(text) => match serde_json::from_str::<Value>(text).context("--values is not valid JSON")? {
            Value::Object(m) => Some(m),
            _ => bail!("--values must be a JSON object of column → text form"),
        },
    };
    let node = a.node.as_str();
    let id = a.id;
    let sql = connect(config, node).await?;
    sql.client
        .batch_execute("BEGIN; SET LOCAL lock_timeout = '10s'")
        .await
        .map_err(sql.err("starting a transaction"))?;
    let c = fetch(&sql, node, id, true).await?;
    if c.resolution != "parked" {
        bail!(
            "conflict {id} on node {node} is not parked (its resolution is {}): only parked conflicts can be resolved",
            c.resolution
        );
    }
    if let Some(at) = &c.resolved_at {
        bail!(
            "conflict {id} on node {node} was already resolved at {at} (take {})",
            c.resolved_by.as_deref().unwrap_or("?")
        );
    }
    let (schema, table) = c
        .table
        .split_once('.')
        .map(|(s, t)| (s.to_string(), t.to_string()))
        .filter(|(s, t)| config.replicates_table(s, t))
        .with_context(|| {
            format!(
                "conflict {id} on node {node}: table {} is not replicated by the config",
                c.table
            )
        })?;
    let meta = table_meta(&sql, node, &schema, &table).await?;
    if c.key_values.len() != meta.key.len() {
        bail!(
            "conflict {id} on node {node}: key {} does not match the primary key ({}) of {}",
            c.key,
            meta.key.join(", "),
            c.table
        );
    }
    let key: Vec<Option<&str>> = c.key_values.iter().map(|k| k.as_deref()).collect();
    let local = current_row(&sql, node, &meta, &key, true).await?;

    // The chosen row (None: no row).
    let chosen: Option<Row> = match a.take {
        Take::Local => local,
        Take::Remote if c.remote_op == "d" => None,
        Take::Remote => match json_or_null(&c.remote_row) {
            Value::Object(m) => Some(m.iter().map(|(k, v)| (k.clone(), text_of(v))).collect()),
            _ => bail!("conflict {id} on node {node}: the remote change has no row to take"),
        },
        Take::Values => {
            // Over the current row, or over just the key when the node has no row.
            let mut row: Row = local.unwrap_or_else(|| {
                meta.key
                    .iter()
                    .zip(&c.key_values)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            });
            for (col, v) in values.iter().flatten() {
                if meta.type_of(col).is_none() {
                    bail!("--values: column {col:?} does not exist in {}", c.table);
                }
                if meta.key.contains(col) {
                    bail!("--values: {col:?} is a key column; a resolution cannot move the row to another key");
                }
                match row.iter_mut().find(|(c, _)| c == col) {
                    Some(slot) => slot.1 = text_of(v),
                    None => row.push((col.clone(), text_of(v))),
                }
            }
            Some(row)
        }
    };

    // Peers: every other node with a parked, unresolved conflict on the same table and key.
    // Each writes the chosen row and marks those conflicts resolved, in its own transaction;
    // nothing commits until every node has written (and holds the row).
    let via = format!("{} ({node} #{id})", a.take.name());
    let mut peers: Vec<(String, PgSession, Vec<i64>)> = Vec::new();
    for peer in config.nodes.iter().filter(|n| n.name != node) {
        let psql = postgres::connect(&peer.dsn, "pgferry-conflicts")
            .await
            .with_context(|| {
                format!(
                    "node {}: resolving needs every node with the same conflict reachable",
                    peer.name
                )
            })?;
        psql.client
            .batch_execute("BEGIN; SET LOCAL lock_timeout = '10s'")
            .await
            .map_err(psql.err("starting a transaction"))?;
        let ids = resolve_parked(&psql, &peer.name, &via, &c.table, &c.key).await?;
        if ids.is_empty() {
            // Nothing parked there: leave the node alone (the written row reaches it by replication).
            psql.client
                .batch_execute("ROLLBACK")
                .await
                .map_err(psql.err("rolling back"))?;
            continue;
        }
        let pmeta = table_meta(&psql, &peer.name, &schema, &table).await?;
        write_row(&psql, &peer.name, &pmeta, &key, &chosen).await?;
        peers.push((peer.name.clone(), psql, ids));
    }

    write_row(&sql, node, &meta, &key, &chosen).await?;
    exec(
        &sql,
        node,
        "marking the conflict resolved",
        "UPDATE pgferry.conflicts SET resolved_at = now(), resolved_by = $1 WHERE id = $2::text::int8",
        &[Some(a.take.name()), Some(id.to_string().as_str())],
    )
    .await?;
    let also = resolve_parked(&sql, node, &via, &c.table, &c.key).await?;

    // Peers first: if the named node's commit then failed, rerunning resolve finishes the job.
    for (peer, psql, _) in &peers {
        psql.client
            .batch_execute("COMMIT")
            .await
            .map_err(psql.err("committing the resolution"))
            .with_context(|| format!("node {peer}"))?;
    }
    sql.client
        .batch_execute("COMMIT")
        .await
        .map_err(sql.err("committing the resolution"))
        .with_context(|| format!("node {node}"))?;

    let what = match &chosen {
        None => "row deleted".to_string(),
        Some(_) => "row written".to_string(),
    };
    let mut extra = String::new();
    if !also.is_empty() {
        extra = format!(", also resolved {:?}", also);
    }
    println!(
        "node {node}: conflict {id} resolved (take {}; {what}{extra})",
        a.take.name()
    );
    for (peer, _, ids) in &peers {
        println!("node {peer}: conflicts {ids:?} on the same key resolved ({what})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_forms_of_json_values() {
        assert_eq!(text_of(&json!("a'b")), Some("a'b".into()));
        assert_eq!(text_of(&Value::Null), None);
        assert_eq!(text_of(&json!(12)), Some("12".into()));
        assert_eq!(text_of(&json!({"a": [1]})), Some("{\"a\":[1]}".into()));
        assert_eq!(qualified_name("t"), "public.t");
        assert_eq!(qualified_name("s.t"), "s.t");
    }
}
