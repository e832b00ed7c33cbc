//! Conflict-heavy drain on three nodes: with replication stopped, every node runs the same hot
//! TPC-B ([`Workload::TpcBHot`]: the first [`HOT_ACCOUNTS`] accounts, 10 tellers, one
//! branch), so all three update the same rows; replication starts, and the drain time runs
//! until every node has every node's marker row (written after its burst). Every remote update
//! then meets a local row another origin wrote last, which is a conflict; last-update-wins
//! must pick the same winner on every node, so afterwards every node must hold identical
//! tables: a digest of each table is compared across the nodes, and a difference is reported
//! with the figures, never hidden.
//!
//! pgferry resolves with its default, `last_update_wins`, and records each conflict in
//! `pgferry.conflicts` (counted per node). pglogical 2 runs with
//! `pglogical.conflict_resolution = 'last_update_wins'` (its default, `apply_remote`, lets the
//! nodes diverge), set on the benchmark's databases before its apply workers start; it only
//! logs its conflicts, so it has no count.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use pgferry_integration_tests::Cluster;

use crate::mesh::{self, Burst, NODES};
use crate::replication::{Replication, System};
use crate::workload::{self, Workload};

/// Accounts every node updates (with tellers 1–10 and branch 1).
pub const HOT_ACCOUNTS: u64 = 1000;

/// pgbench scale of the run's tables (100,000 accounts, all compared).
const SCALE: u64 = 1;

/// What one run measured.
#[derive(Debug, Clone)]
pub struct ConflictRun {
    /// Transactions written on all nodes together (pgbench's and the markers).
    pub transactions: u64,
    /// Row changes in them.
    pub rows: u64,
    /// Seconds the bursts took, replication stopped (untimed preparation).
    pub write_seconds: f64,
    /// Seconds from starting replication until every node had every marker.
    pub seconds: f64,
    /// pgferry: rows of `pgferry.conflicts` on each node after the drain (`None`: the system
    /// keeps no count).
    pub conflicts: Option<Vec<i64>>,
    /// Tables compared across the nodes.
    pub tables: usize,
    /// The tables whose digest differs between the nodes, each with every node's digest and
    /// row count; empty when every node is identical.
    pub differences: Vec<String>,
}

impl ConflictRun {
    /// Aggregate transactions per second of the drain.
    pub fn txn_per_s(&self) -> f64 {
        self.transactions as f64 / self.seconds
    }

    /// Whether every node ended with identical tables.
    pub fn identical(&self) -> bool {
        self.differences.is_empty()
    }
}

/// Sets `system` up on three nodes, checks that every node gets every other node's rows,
/// stops replication, runs `burst` of hot TPC-B on every node at once, starts replication and
/// times the drain, then compares the nodes. Also returns the cluster (for removal at the
/// end), whenever it was made.
pub async fn measure(system: System, burst: Burst<'_>) -> (Result<ConflictRun>, Option<Cluster>) {
    mesh::on_three_nodes(system, SCALE, |mut mesh| async move {
        let run = run(&mut mesh, burst).await;
        (mesh, run)
    })
    .await
}

async fn run(mesh: &mut Replication, burst: Burst<'_>) -> Result<ConflictRun> {
    let label = mesh.system.label();
    if mesh.system == System::Pglogical {
        last_update_wins(mesh).await?;
    }
    mesh::start_checked(mesh, burst.timeout).await?;
    // Everything so far confirmed, so the timed drain decodes the bursts only.
    mesh.catch_up(burst.timeout).await?;
    mesh.stop().await?;

    eprintln!(
        "[bench] {label}: {} TPC-B transactions on the same {HOT_ACCOUNTS} accounts on each of \
         {NODES} nodes at once, replication stopped",
        burst.transactions_per_node()
    );
    let written_at = Instant::now();
    let written = burst.run(mesh, |_| Workload::TpcBHot(HOT_ACCOUNTS)).await?;
    let write_seconds = written_at.elapsed().as_secs_f64();
    let markers = mesh::insert_markers(mesh).await?;

    mesh.ready_to_start().await?;
    let started = Instant::now();
    mesh.start().await?;
    mesh::wait_markers(mesh, &markers, burst.timeout).await?;
    let seconds = started.elapsed().as_secs_f64();
    let transactions = written + NODES as u64;
    eprintln!(
        "[bench] {label}: conflicting bursts drained everywhere in {seconds:.2} s ({:.0} txn/s); \
         comparing the nodes",
        transactions as f64 / seconds
    );

    let differences = differences(&mesh.cluster).await?;
    let conflicts = match mesh.system {
        System::Pgferry => Some(recorded_conflicts(mesh).await?),
        _ => None,
    };
    if differences.is_empty() {
        eprintln!("[bench] {label}: every node identical");
    } else {
        eprintln!("[bench] {label}: the nodes differ: {}", differences.join("; "));
    }
    Ok(ConflictRun {
        transactions,
        rows: written * Workload::TpcBHot(HOT_ACCOUNTS).rows_per_txn() + NODES as u64,
        write_seconds,
        seconds,
        conflicts,
        tables: workload::PGBENCH_TABLES.len(),
        differences,
    })
}

/// Sets `pglogical.conflict_resolution = 'last_update_wins'` on every node's database (apply
/// workers started afterwards run with it) and checks a new session sees it.
async fn last_update_wins(mesh: &Replication) -> Result<()> {
    for i in 0..NODES {
        mesh.sql(i)
            .await?
            .batch_execute(
                "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET pglogical.conflict_resolution = %L',
                                            current_database(), 'last_update_wins'); END $$",
            )
            .await
            .with_context(|| format!("setting pglogical.conflict_resolution on n{}", i + 1))?;
        let seen: String = mesh
            .sql(i)
            .await?
            .query_one("SELECT current_setting('pglogical.conflict_resolution')", &[])
            .await
            .context("reading pglogical.conflict_resolution")?
            .get(0);
        if seen != "last_update_wins" {
            bail!(
                "pglogical.conflict_resolution is {seen:?} on n{} after setting it",
                i + 1
            );
        }
    }
    Ok(())
}

/// Every table whose digest differs between the nodes, with each node's digest (first 8 hex
/// digits) and row count.
async fn differences(cluster: &Cluster) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for table in workload::PGBENCH_TABLES {
        let mut prints = Vec::new();
        for i in 0..NODES {
            let print = cluster
                .fingerprint(i, table)
                .await
                .with_context(|| format!("digest of {table} on n{}", i + 1))?;
            prints.push(print);
        }
        if prints.windows(2).any(|w| w[0] != w[1]) {
            let nodes: Vec<String> = prints
                .iter()
                .enumerate()
                .map(|(i, (digest, rows))| format!("n{} {} ({rows} rows)", i + 1, digest.get(..8).unwrap_or(digest)))
                .collect();
            out.push(format!("{table}: {}", nodes.join(", ")));
        }
    }
    Ok(out)
}

/// Rows of `pgferry.conflicts` on each node.
async fn recorded_conflicts(mesh: &Replication) -> Result<Vec<i64>> {
    let mut counts = Vec::new();
    for i in 0..NODES {
        let row = mesh
            .sql(i)
            .await?
            .query_one("SELECT count(*) FROM pgferry.conflicts", &[])
            .await
            .with_context(|| format!("counting pgferry.conflicts on n{}", i + 1))?;
        counts.push(row.get(0));
    }
    Ok(counts)
}
