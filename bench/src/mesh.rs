//! Three nodes, all writing: every node runs TPC-B on its own branch (so no two nodes write
//! the same row) while replication runs everywhere; aggregate throughput is every node's
//! transactions over the time from the start until every node has every other node's marker.
//! Also the three-node set-up, check and finish that the conflict-heavy drain
//! (`conflict_drain.rs`) shares.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pgferry_integration_tests::Cluster;

use crate::replication::{self, Replication, System};
use crate::workload::{self, Pace, Pgbench, Workload};

/// Why PostgreSQL 15's native logical replication has no three-node figure.
pub const NATIVE_LOOPS: &str = "PostgreSQL 15 subscriptions re-send what they applied (no `origin = none` \
     before PostgreSQL 16), so three nodes subscribing to each other loop";

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

/// What every node writes in a three-node run (at once, as fast as it can), and how long
/// replication may take.
#[derive(Clone, Copy)]
pub struct Burst<'a> {
    /// Runs pgbench.
    pub pgbench: &'a Pgbench,
    /// Transactions per node (rounded down to a multiple of `clients`).
    pub per_node: u64,
    /// pgbench connections per node.
    pub clients: u64,
    /// Give up waiting for replication after this long.
    pub timeout: Duration,
}

impl Burst<'_> {
    /// Transactions each node runs.
    pub fn transactions_per_node(&self) -> u64 {
        self.per_client() * self.clients.max(1)
    }

    fn per_client(&self) -> u64 {
        (self.per_node / self.clients.max(1)).max(1)
    }

    /// Runs the burst on every node of `mesh` at once, node `i` with `workload(i)`; returns the
    /// transactions committed on all nodes together.
    pub async fn run(&self, mesh: &Replication, workload: impl Fn(usize) -> Workload) -> Result<u64> {
        let pace = Pace::Count {
            clients: self.clients.max(1),
            per_client: self.per_client(),
        };
        let runs = futures::future::join_all(
            mesh.cluster
                .nodes
                .iter()
                .enumerate()
                .map(|(i, node)| self.pgbench.run(&node.dsn, workload(i), pace)),
        )
        .await;
        let mut written = 0;
        for r in runs {
            written += r?.transactions;
        }
        Ok(written)
    }
}

/// Sets `system` up on three nodes, checks that a row from each node reaches the others,
/// runs `burst` on every node at once, each on its own branch, and times it until everything
/// is everywhere. Also returns the cluster (for removal at the end), whenever it was made.
pub async fn measure(system: System, burst: Burst<'_>) -> (Result<MeshRun>, Option<Cluster>) {
    on_three_nodes(system, NODES as u64, |mut mesh| async move {
        let run = run(&mut mesh, burst).await;
        (mesh, run)
    })
    .await
}

/// Sets `system` up on three nodes ([`set_up`]), hands them to `run`, then stops replication
/// and drops its subscriptions and slots: `run`'s result (or the failure to set up or stop) and
/// the cluster, for removal at the end, whenever it was made and stopping went well.
pub async fn on_three_nodes<T, F, Fut>(system: System, scale: u64, run: F) -> (Result<T>, Option<Cluster>)
where
    F: FnOnce(Replication) -> Fut,
    Fut: std::future::Future<Output = (Replication, Result<T>)>,
{
    let mesh = match set_up(system, scale).await {
        Ok(m) => m,
        Err(e) => return (Err(e), None),
    };
    let (mesh, result) = run(mesh).await;
    match mesh.finish().await {
        Ok(cluster) => (result, Some(cluster)),
        Err(e) => (result.and(Err(e)), None),
    }
}

/// `system` on [`NODES`] fresh databases with pgbench's tables at `scale` (100,000 accounts
/// per unit), every node replicating to every other; each node's history keys in their own
/// range, as a multi-writer schema would have them. Replication is stopped.
async fn set_up(system: System, scale: u64) -> Result<Replication> {
    let mesh = Replication::mesh(system, NODES, &workload::setup_sql(scale), workload::PGBENCH_TABLES).await?;
    for i in 0..NODES {
        let moved = match mesh.sql(i).await {
            Ok(c) => c
                .execute(
                    "SELECT setval('pgbench_history_hid_seq', $1)",
                    &[&((i as i64 + 1) << 40)],
                )
                .await
                .context("moving a node's history key range"),
            Err(e) => Err(e),
        };
        if let Err(e) = moved {
            // Leave no slot behind.
            let _ = mesh.finish().await;
            return Err(e);
        }
    }
    Ok(mesh)
}

/// Starts replication and checks that every node gets every other node's rows.
pub async fn start_checked(mesh: &mut Replication, timeout: Duration) -> Result<()> {
    mesh.start().await?;
    eprintln!(
        "[bench] {}: three nodes, checking every node gets every other node's rows",
        mesh.system.label()
    );
    wait_everywhere(mesh, timeout).await
}

async fn run(mesh: &mut Replication, burst: Burst<'_>) -> Result<MeshRun> {
    let label = mesh.system.label();
    start_checked(mesh, burst.timeout).await?;
    eprintln!(
        "[bench] {label}: {} TPC-B transactions on each of {NODES} nodes at once",
        burst.transactions_per_node()
    );
    let started = Instant::now();
    let written = burst.run(mesh, |i| Workload::TpcBBranch(i as u64 + 1)).await?;
    let write_seconds = started.elapsed().as_secs_f64();
    wait_everywhere(mesh, burst.timeout).await?;
    let seconds = started.elapsed().as_secs_f64();
    same_history(mesh).await?;
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
pub async fn wait_everywhere(mesh: &mut Replication, timeout: Duration) -> Result<()> {
    let markers = insert_markers(mesh).await?;
    wait_markers(mesh, &markers, timeout).await
}

/// Writes a marker row on every node (one more transaction there); returns their keys.
pub async fn insert_markers(mesh: &Replication) -> Result<Vec<i64>> {
    let mut markers = Vec::new();
    for i in 0..NODES {
        markers.push(workload::insert_marker(&mesh.sql(i).await?, Workload::TpcB).await?);
    }
    Ok(markers)
}

/// Waits until every node has every marker of `markers`: then every node has everything
/// every node wrote before its marker.
pub async fn wait_markers(mesh: &mut Replication, markers: &[i64], timeout: Duration) -> Result<()> {
    for node in 0..NODES {
        for &key in markers {
            replication::wait_marker(mesh, node, Workload::TpcB, key, timeout).await?;
        }
    }
    Ok(())
}

/// Checks that every node has as many history rows (one per transaction) as the others.
pub async fn same_history(mesh: &Replication) -> Result<()> {
    let mut counts = Vec::new();
    for i in 0..NODES {
        counts.push(workload::inserted_rows(&mesh.sql(i).await?, Workload::TpcB).await?);
    }
    if counts.windows(2).any(|w| w[0] != w[1]) {
        bail!(
            "{}: history rows differ across the nodes after the run: {counts:?}",
            mesh.system.label()
        );
    }
    Ok(())
}
