//! Three nodes, all writing: every node runs TPC-B on its own branch (so no two nodes write
//! the same row) while replication runs everywhere; aggregate throughput is every node's
//! transactions over the time from the start until every node has every other node's marker.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::replication::{self, Replication, System};
use crate::workload::{self, Pace, Pgbench, Workload};

/// The nodes.
pub const NODES: usize = 3;

/// What one run measured.
#[derive(Debug, Clone)]
pub struct MeshRun {
    /// Transactions written on all nodes together (pgbench's and the markers).
    pub transactions: u64,
    /// Row changes in them.
    pub rows: u64,
    /// Seconds until the nodes wrote everything.
    pub write_seconds: f64,
    /// Seconds until every node had everything.
    pub seconds: f64,
}

impl MeshRun {
    /// Aggregate transactions per second, replicated everywhere.
    pub fn txn_per_s(&self) -> f64 {
        self.transactions as f64 / self.seconds
    }
}

/// Tables of the mesh run: pgbench's at scale [`NODES`] (a branch per node), history keys from
/// a per-node range.
pub fn setup_sql() -> String {
    workload::setup_sql(NODES as u64)
}

/// Sets `system` up on three nodes, checks that a row from each node reaches the others,
/// runs `per_node` transactions on every node at once with `clients` connections each, and
/// times it until everything is everywhere. Also returns the cluster (for removal at the end),
/// whenever it was made.
pub async fn measure(
    system: System,
    pgbench: &Pgbench,
    per_node: u64,
    clients: u64,
    timeout: Duration,
) -> (Result<MeshRun>, Option<pgferry_integration_tests::Cluster>) {
    let tables = workload::PGBENCH_TABLES;
    let mut mesh = match Replication::mesh(system, NODES, &setup_sql(), tables).await {
        Ok(m) => m,
        Err(e) => return (Err(e), None),
    };
    let run = run(&mut mesh, pgbench, per_node, clients, timeout).await;
    match mesh.finish().await {
        Ok(cluster) => (run, Some(cluster)),
        Err(e) => (run.and(Err(e)), None),
    }
}

async fn run(mesh: &mut Replication, pgbench: &Pgbench, per_node: u64, clients: u64, timeout: Duration) -> Result<MeshRun> {
    let label = mesh.system.label();
    for i in 0..NODES {
        // Each node's history keys in their own range, as a multi-writer schema would have them.
        mesh.sql(i)
            .await?
            .execute("SELECT setval('pgbench_history_hid_seq', $1)", &[&((i as i64 + 1) << 40)])
            .await
            .context("moving a node's history key range")?;
    }
    mesh.start().await?;
    eprintln!("[bench] {label}: three nodes, checking every node gets every other node's rows");
    wait_everywhere(mesh, timeout).await?;

    let per_client = (per_node / clients).max(1);
    eprintln!(
        "[bench] {label}: {} TPC-B transactions on each of {NODES} nodes at once",
        per_client * clients
    );
    let started = Instant::now();
    let dsns: Vec<String> = mesh.cluster.nodes.iter().map(|n| n.dsn.clone()).collect();
    let runs = futures::future::join_all(dsns.iter().enumerate().map(|(i, dsn)| {
        pgbench.run(
            dsn,
            Workload::TpcBBranch(i as u64 + 1),
            Pace::Count { clients, per_client },
        )
    }))
    .await;
    let write_seconds = started.elapsed().as_secs_f64();
    let mut written = 0;
    for r in runs {
        written += r?.transactions;
    }
    wait_everywhere(mesh, timeout).await?;
    let seconds = started.elapsed().as_secs_f64();
    let mut counts = Vec::new();
    for i in 0..NODES {
        counts.push(workload::inserted_rows(&mesh.sql(i).await?, Workload::TpcB).await?);
    }
    if counts.windows(2).any(|w| w[0] != w[1]) {
        bail!("{label}: history rows differ across the nodes after the run: {counts:?}");
    }
    eprintln!("[bench] {label}: everything everywhere after {seconds:.2} s");
    let transactions = written + NODES as u64;
    Ok(MeshRun {
        transactions,
        rows: written * Workload::TpcB.rows_per_txn() + NODES as u64,
        write_seconds,
        seconds,
    })
}

/// Writes a marker on every node and waits until every node has all of them.
async fn wait_everywhere(mesh: &mut Replication, timeout: Duration) -> Result<()> {
    let mut markers = Vec::new();
    for i in 0..NODES {
        markers.push(workload::insert_marker(&mesh.sql(i).await?, Workload::TpcB).await?);
    }
    for node in 0..NODES {
        for &key in &markers {
            replication::wait_marker(mesh, node, Workload::TpcB, key, timeout).await?;
        }
    }
    Ok(())
}
