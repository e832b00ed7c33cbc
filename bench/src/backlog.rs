//! Backlog drain: with replication stopped, node 1 runs N transactions; replication starts;
//! the time until node 2 has the marker row written after them (and then every row) is the
//! drain time. The processes doing the replication are sampled meanwhile for the cost figures.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::cost::{CostSampler, ProcessCost};
use crate::replication::{self, Replication};
use crate::workload::{self, Pace, Pgbench, Workload};

/// What one drain measured.
#[derive(Debug, Clone)]
pub struct Drain {
    /// Transactions in the backlog (pgbench's and the marker).
    pub transactions: u64,
    /// Row changes in them.
    pub rows: u64,
    /// Seconds from starting replication until node 2 had the marker.
    pub seconds: f64,
    /// The replication processes' CPU and memory over the drain.
    pub cost: Vec<ProcessCost>,
}

impl Drain {
    /// Transactions per second.
    pub fn txn_per_s(&self) -> f64 {
        self.transactions as f64 / self.seconds
    }

    /// Row changes per second.
    pub fn rows_per_s(&self) -> f64 {
        self.rows as f64 / self.seconds
    }
}

/// Stops `replication`, writes `transactions` of `workload` on node 1 with `clients`
/// connections, starts replication and times the drain.
pub async fn measure(
    replication: &mut Replication,
    pgbench: &Pgbench,
    workload: Workload,
    transactions: u64,
    clients: u64,
    timeout: Duration,
) -> Result<Drain> {
    replication.stop().await?;
    let n1 = replication.sql(0).await?;
    let n2 = replication.sql(1).await?;
    let per_client = (transactions / clients).max(1);
    let system = replication.system.label();
    eprintln!(
        "[bench] {system}: backlog of {} {} transactions on n1, replication stopped",
        per_client * clients,
        workload.label()
    );
    let dsn = replication.cluster.nodes[0].dsn.clone();
    let ran = pgbench.run(&dsn, workload, Pace::Count { clients, per_client }).await?;
    let marker = workload::insert_marker(&n1, workload).await?;
    let transactions = ran.transactions + 1;
    let rows = ran.transactions * workload.rows_per_txn() + 1;

    let started = Instant::now();
    replication.start().await?;
    let sampler = CostSampler::start(replication.cost_watches());
    let done = replication::wait_marker(replication, 1, workload, marker, timeout).await;
    let cost = sampler.stop().await;
    let seconds = done?.duration_since(started).as_secs_f64();
    let (on_n1, on_n2) = (
        workload::inserted_rows(&n1, workload).await?,
        workload::inserted_rows(&n2, workload).await?,
    );
    if on_n1 != on_n2 {
        bail!("{system}: after the drain n2 has {on_n2} rows in the workload's table, n1 {on_n1}");
    }
    eprintln!(
        "[bench] {system}: drained in {seconds:.2} s ({:.0} txn/s)",
        transactions as f64 / seconds
    );
    Ok(Drain {
        transactions,
        rows,
        seconds,
        cost,
    })
}
