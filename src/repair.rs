//! `pgferry repair --table T --source-of-truth N [--nodes a,b] [--dry-run]`: makes the other
//! nodes' rows of a table match node N's.
//!
//! The differing keys come from the same comparison as `diff` (range hashes on the servers,
//! re-checked after replication caught up). Each key is then settled in its own transaction
//! on the target: N's current row is read again (so a change N made since the comparison is
//! what gets written), the target's row is locked, and if they still differ the target gets
//! N's row (upsert) or loses its row (N has none).
//!
//! The writes run under the replication origin `pgferry_<cluster>_<target>_repair`, which no node
//! forwards, so the target's capture does not publish them (capture publishes only local
//! transactions and forwarded origins): a repair changes the target only. Each transaction is
//! stamped (`pg_replication_origin_xact_setup`) with the commit time of N's row version — or,
//! for a delete, the time N was read — so a change of that row that N commits later, still
//! on its way, wins over the repair by last-update-wins, and a tie goes to the real origin
//! (the repair origin is no node, id 0). They run as a replica (`session_replication_role =
//! replica`, as apply writes; see `pgferry_apply::replica_role`), so users' triggers do not
//! rewrite the row being copied.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use pgferry_connectors::config::Config;
use pgferry_connectors::postgres::{self, PgSession};
use serde_json::Value;

use crate::diff::{self, connect_nodes};
use crate::row_sql::{current_row, exec, split_table, table_meta, where_key, write_row, Row, TableMeta};
use crate::table_compare::{Key, NodeRow, NodeSession, Progress, TableCompare};

#[derive(Args)]
pub struct RepairArgs {
    /// The table (`schema.table`, or `table` for `public.table`); it must be replicated.
    #[arg(long, value_name = "TABLE")]
    table: String,
    /// The node whose rows are right.
    #[arg(long, value_name = "NODE")]
    source_of_truth: String,
    /// Nodes to repair, comma-separated (default: every other node).
    #[arg(long, value_delimiter = ',', value_name = "NODE,...")]
    nodes: Vec<String>,
    /// Print what would change and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Seconds to wait for replication to catch up before re-checking differing rows.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    settle_timeout: u64,
    /// No progress lines on stderr.
    #[arg(long, short)]
    quiet: bool,
}

/// One row to change on one target.
struct Change {
    key: Key,
    /// The target's row now (None: it has none).
    from: Option<NodeRow>,
    /// The source's row (None: delete).
    to: Option<NodeRow>,
}

impl Change {
    /// What the change does (`done`: in the past tense, else as "would …").
    fn describe(&self, compare: &TableCompare<'_>, done: bool) -> String {
        let key = compare.key_json(&self.key);
        let verb = |v: &str| if done { format!("{v}d") } else { format!("would {v}") };
        match (&self.from, &self.to) {
            (Some(from), None) => format!("{} {key}: {}", verb("delete"), from.json),
            (None, Some(to)) => format!("{} {key}: {}", verb("insert"), to.json),
            (Some(from), Some(to)) => {
                let mut changed = Vec::new();
                if let Value::Object(new) = &to.json {
                    for (col, v) in new {
                        let old = from.json.get(col).unwrap_or(&Value::Null);
                        if old != v {
                            changed.push(format!("{col}: {old} → {v}"));
                        }
                    }
                }
                if changed.is_empty() {
                    changed.push(format!("{} → {}", from.json, to.json));
                }
                format!("{} {key}: {}", verb("update"), changed.join(", "))
            }
            (None, None) => format!("nothing at {key}"),
        }
    }
}

pub async fn run(config: &Config, a: RepairArgs) -> Result<()> {
    let (schema, table) = split_table(&a.table);
    if !config.replicates_table(&schema, &table) {
        bail!("table {schema}.{table} is not replicated by the config (replication.tables, replication.schemas)");
    }
    let source = config
        .node(&a.source_of_truth)
        .with_context(|| format!("node {:?} is not in the config", a.source_of_truth))?
        .name
        .clone();
    let targets: Vec<String> = if a.nodes.is_empty() {
        config.nodes.iter().map(|n| n.name.clone()).filter(|n| *n != source).collect()
    } else {
        a.nodes.clone()
    };
    if targets.contains(&source) {
        bail!("--nodes names the source of truth {source}: it is not repaired");
    }
    let mut names = vec![source.clone()];
    names.extend(targets);
    let nodes = connect_nodes(config, &names, "pgferry-repair").await?;
    let compare = TableCompare::new(&nodes, &schema, &table).await?;
    let mut progress = Progress::new(&format!("repair {} from {source}", compare.name), !a.quiet);
    let found = diff::find(config, &nodes, &compare, Duration::from_secs(a.settle_timeout), &mut progress).await?;
    if !found.settled && !found.diffs.is_empty() {
        eprintln!("warning: replication had not caught up; rows still on their way may be repaired needlessly (the later change still wins)");
    }

    let mut total = 0;
    for (t, target) in nodes.iter().enumerate().skip(1) {
        let changes: Vec<Change> = found
            .diffs
            .iter()
            .filter(|d| d.rows[t].as_ref().map(|r| &r.text) != d.rows[0].as_ref().map(|r| &r.text))
            .map(|d| Change {
                key: d.key.clone(),
                from: d.rows[t].clone(),
                to: d.rows[0].clone(),
            })
            .collect();
        if changes.is_empty() {
            println!("{}: matches {source}", target.name);
            continue;
        }
        if a.dry_run {
            for c in &changes {
                println!("{}: {}", target.name, c.describe(&compare, false));
            }
            println!("{}: would change {} rows (dry run: nothing written)", target.name, changes.len());
            continue;
        }
        let target_meta = table_meta(&target.sql, &target.name, &schema, &table).await?;
        let origin = pgferry_schemas::naming::repair_origin(&config.cluster.name, &target.name);
        let written = repair_target(&nodes[0], compare.meta(), target, &target_meta, &changes, &compare, &origin).await?;
        println!("{}: {written} rows changed to match {source}", target.name);
        total += written;
    }
    if !a.dry_run {
        println!("{}: repaired {total} rows from {source}", compare.name);
    }
    Ok(())
}

/// Settles `changes` on `target`, one transaction each, under the repair replication origin
/// `origin` (which no capture publishes); the number of rows written.
async fn repair_target(
    source: &NodeSession,
    source_meta: &TableMeta,
    target: &NodeSession,
    target_meta: &TableMeta,
    changes: &[Change],
    compare: &TableCompare<'_>,
    origin: &str,
) -> Result<usize> {
    let sql = &target.sql;
    postgres::create_replication_origin(sql, origin)
        .await
        .with_context(|| format!("node {}", target.name))?;
    sql.client
        .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
        .await
        .map_err(sql.err(format!("setting up replication origin {origin}")))
        .with_context(|| format!("node {}", target.name))?;
    let mut written = 0;
    for c in changes {
        let key: Vec<Option<&str>> = c.key.iter().map(|k| Some(k.as_str())).collect();
        let stamp_us = source_stamp(source, source_meta, &key).await?;
        let row = current_row(&source.sql, &source.name, source_meta, &key, false).await?;
        if settle_key(sql, &target.name, target_meta, &key, &row, stamp_us).await? {
            written += 1;
            println!("{}: {}", target.name, c.describe(compare, true));
        }
    }
    sql.client
        .batch_execute("SELECT pg_replication_origin_session_reset()")
        .await
        .map_err(sql.err("resetting the session's replication origin"))?;
    Ok(written)
}

/// The commit time (µs since 1970) of the source's row version at `key`, or the source's
/// clock when it has no row (or the time is unknown).
async fn source_stamp(source: &NodeSession, meta: &TableMeta, key: &[Option<&str>]) -> Result<String> {
    let text = format!(
        "SELECT (extract(epoch FROM coalesce(
            (SELECT pg_xact_commit_timestamp(r.xmin) FROM {} r WHERE {}), clock_timestamp())) * 1000000)::int8::text",
        meta.qualified,
        where_key(meta, 1)
    );
    let rows = exec(&source.sql, &source.name, "reading the row's commit time", &text, key).await?;
    rows.first()
        .map(|r| r.get::<_, String>(0))
        .context("reading the row's commit time returned no row")
}

/// In one transaction on the target: lock its row at `key` and, unless it already equals
/// `row`, write `row` (None: delete). Whether it wrote.
async fn settle_key(
    sql: &PgSession,
    node: &str,
    meta: &TableMeta,
    key: &[Option<&str>],
    row: &Option<Row>,
    stamp_us: String,
) -> Result<bool> {
    // Written as apply writes, as a replica: users' triggers (an `updated_at = now()`) would
    // otherwise change the row the repair copies.
    sql.client
        .batch_execute("BEGIN; SET LOCAL lock_timeout = '10s'; SET LOCAL session_replication_role = replica")
        .await
        .map_err(sql.err(format!("starting a transaction; {}", pgferry_apply::replica_role::ROLE_NEEDS)))?;
    let result = async {
        exec(
            sql,
            node,
            "stamping the repair transaction",
            "SELECT pg_replication_origin_xact_setup('0/0', 'epoch'::timestamptz + $1::text::int8 * interval '1 microsecond')",
            &[Some(stamp_us.as_str())],
        )
        .await?;
        let now = current_row(sql, node, meta, key, true).await?;
        if same_row(&now, row) {
            return Ok(false);
        }
        write_row(sql, node, meta, key, row).await?;
        Ok(true)
    }
    .await;
    let end = if matches!(result, Ok(true)) { "COMMIT" } else { "ROLLBACK" };
    sql.client
        .batch_execute(end)
        .await
        .map_err(sql.err("committing the repair"))
        .with_context(|| format!("node {node}"))?;
    result
}

/// Whether the target's row equals the source's (column by column, as text).
fn same_row(target: &Option<Row>, source: &Option<Row>) -> bool {
    match (target, source) {
        (None, None) => true,
        (Some(t), Some(s)) => s
            .iter()
            .all(|(c, v)| t.iter().find(|(tc, _)| tc == c).is_some_and(|(_, tv)| tv == v)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_rows_by_column() {
        let r = |v: &[(&str, Option<&str>)]| -> Option<Row> {
            Some(v.iter().map(|(c, x)| (c.to_string(), x.map(str::to_string))).collect())
        };
        assert!(same_row(&None, &None));
        assert!(!same_row(&None, &r(&[("id", Some("1"))])));
        assert!(same_row(&r(&[("v", None), ("id", Some("1"))]), &r(&[("id", Some("1")), ("v", None)])));
        assert!(!same_row(&r(&[("id", Some("1")), ("v", Some("a"))]), &r(&[("id", Some("1")), ("v", None)])));
    }
}
