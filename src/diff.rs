//! `pgferry diff --table T [--nodes a,b] [--json]`: compares a table across nodes by hashing
//! primary-key ranges on each server ([`crate::table_compare`]), then re-checks the differing
//! rows once replication has caught up ([`crate::catch_up`]), so a change still on its way is
//! not reported. Exit status: 0 the nodes agree, 1 they differ, 2 the comparison failed.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use pgferry_connectors::config::Config;
use pgferry_connectors::postgres;
use serde_json::{json, Value};

use crate::catch_up;
use crate::row_sql::split_table;
use crate::table_compare::{NodeSession, Progress, RowDiff, TableCompare};

/// Exit status when the nodes differ.
pub const EXIT_DIFFER: i32 = 1;
/// Exit status when diff could not compare.
pub const EXIT_ERROR: i32 = 2;

#[derive(Args)]
pub struct DiffArgs {
    /// The table (`schema.table`, or `table` for `public.table`).
    #[arg(long, value_name = "TABLE")]
    pub table: String,
    /// Nodes to compare, comma-separated (default: every node in the config).
    #[arg(long, value_delimiter = ',', value_name = "NODE,...")]
    pub nodes: Vec<String>,
    /// The report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for replication to catch up before re-checking differing rows (0: re-check
    /// at once).
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub settle_timeout: u64,
    /// No progress lines on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Sessions to `names` (every node when empty), in that order.
pub async fn connect_nodes(config: &Config, names: &[String], purpose: &str) -> Result<Vec<NodeSession>> {
    let names: Vec<String> = if names.is_empty() {
        config.nodes.iter().map(|n| n.name.clone()).collect()
    } else {
        names.to_vec()
    };
    let mut out: Vec<NodeSession> = Vec::new();
    for name in names {
        if out.iter().any(|n| n.name == name) {
            anyhow::bail!("node {name} is named twice");
        }
        let n = config
            .node(&name)
            .with_context(|| format!("node {name:?} is not in the config"))?;
        let sql = postgres::connect(&n.dsn, purpose)
            .await
            .with_context(|| format!("node {name}"))?;
        out.push(NodeSession { name, sql });
    }
    if out.len() < 2 {
        anyhow::bail!("comparing needs at least two nodes");
    }
    Ok(out)
}

/// What a comparison found.
pub struct Findings {
    /// Keys that differ after the re-check.
    pub diffs: Vec<RowDiff>,
    /// Rows compared (the most any node holds).
    pub rows: i64,
    /// Whether replication had caught up before the re-check (false: the wait timed out, and
    /// some differences may still be on their way).
    pub settled: bool,
}

/// Finds the differing rows of `compare`'s table, re-checking them after replication caught
/// up (at most `settle` long).
pub async fn find(config: &Config, nodes: &[NodeSession], compare: &TableCompare<'_>, settle: Duration, progress: &mut Progress) -> Result<Findings> {
    let candidates = compare.differences(progress).await?;
    let rows = progress.total();
    if candidates.is_empty() {
        return Ok(Findings {
            diffs: candidates,
            rows,
            settled: true,
        });
    }
    progress.note(&format!(
        "{} rows differ; waiting up to {}s for replication to catch up, then checking them again",
        candidates.len(),
        settle.as_secs()
    ));
    let settled = if settle.is_zero() {
        false
    } else {
        catch_up::wait(config, nodes, settle).await?
    };
    if !settled {
        progress.note("replication has not caught up; reporting the rows as they are now");
    }
    let keys: Vec<_> = candidates.into_iter().map(|d| d.key).collect();
    let diffs = compare.recheck(&keys).await?;
    Ok(Findings { diffs, rows, settled })
}

/// Runs `pgferry diff`; the exit status.
pub async fn run(config: &Config, a: DiffArgs) -> Result<i32> {
    let (schema, table) = split_table(&a.table);
    let nodes = connect_nodes(config, &a.nodes, "pgferry-diff").await?;
    let compare = TableCompare::new(&nodes, &schema, &table).await?;
    let mut progress = Progress::new(&format!("diff {}", compare.name), !a.quiet);
    let found = find(config, &nodes, &compare, Duration::from_secs(a.settle_timeout), &mut progress).await?;
    let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    if a.json {
        let differences: Vec<Value> = found
            .diffs
            .iter()
            .map(|d| {
                let values: serde_json::Map<String, Value> = names
                    .iter()
                    .zip(&d.rows)
                    .map(|(n, r)| (n.to_string(), r.as_ref().map_or(Value::Null, |r| r.json.clone())))
                    .collect();
                json!({ "key": compare.key_json(&d.key), "values": values })
            })
            .collect();
        let report = json!({
            "table": compare.name,
            "nodes": names,
            "rows": found.rows,
            "agree": found.diffs.is_empty(),
            "settled": found.settled,
            "differences": differences,
        });
        println!("{report}");
    } else {
        let width = names.iter().map(|n| n.len()).max().unwrap_or(0);
        for d in &found.diffs {
            println!("key {}", compare.key_json(&d.key));
            for (n, r) in names.iter().zip(&d.rows) {
                match r {
                    Some(r) => println!("  {n:<width$}  {}", r.json),
                    None => println!("  {n:<width$}  (no row)"),
                }
            }
        }
        let on = names.join(", ");
        if found.diffs.is_empty() {
            println!("{}: identical on {on} ({} rows)", compare.name, found.rows);
        } else {
            println!(
                "{}: {} of {} rows differ between {on}{}",
                compare.name,
                found.diffs.len(),
                found.rows,
                if found.settled { "" } else { " (replication had not caught up: some may still be on their way)" }
            );
        }
    }
    Ok(if found.diffs.is_empty() { 0 } else { EXIT_DIFFER })
}
