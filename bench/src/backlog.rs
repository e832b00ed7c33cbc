//! Backlog drain: with replication stopped, node 1 runs N transactions; replication starts;
//! the time until node 2 has the marker row written after them (and then every row) is the
//! drain time. The processes doing the replication are sampled meanwhile for the cost figures.
//!
//! pgferry's apply-only drain ([`DrainKind::ApplyOnly`]) times apply alone: once the backlog
//! and the marker are written, capture runs by itself until its partition holds the marker's
//! transaction (everything is in Kafka), capture stops, apply starts, and the time until node 2
//! has the marker is the drain time.
//!
//! Before each drain the system catches up untimed (see [`Replication::catch_up`]) and after
//! it replication is stopped again, so a system decodes only its own backlog while timed and
//! takes no CPU while the others are measured.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cost::{CostSampler, ProcessCost};
use crate::group_sizes::{self, GroupSizes};
use crate::measure;
use crate::replication::{self, Replication, System};
use crate::workload::{self, Pace, Pgbench, Workload};

/// What a drain times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainKind {
    /// The workload's backlog from n1's slot to n2 (pgferry: capture, Kafka and apply).
    EndToEnd(Workload),
    /// pgferry only: apply draining a TPC-B backlog that capture already published.
    ApplyOnly,
}

impl DrainKind {
    /// The drains of a run, in the order they run and are printed.
    pub const ALL: [DrainKind; 3] = [
        DrainKind::EndToEnd(Workload::TpcB),
        DrainKind::ApplyOnly,
        DrainKind::EndToEnd(Workload::Wide),
    ];

    /// The workload written.
    pub fn workload(self) -> Workload {
        match self {
            DrainKind::EndToEnd(w) => w,
            DrainKind::ApplyOnly => Workload::TpcB,
        }
    }

    /// Name in the tables and the results file (the end-to-end drains are named by their
    /// workload alone).
    pub fn label(self) -> &'static str {
        match self {
            DrainKind::EndToEnd(w) => w.label(),
            DrainKind::ApplyOnly => "TPC-B (apply only)",
        }
    }

    /// Whether `system` runs this drain.
    pub fn runs_on(self, system: System) -> bool {
        self != DrainKind::ApplyOnly || system == System::Pgferry
    }
}

/// What one drain measured.
#[derive(Debug, Clone)]
pub struct Drain {
    /// Transactions in the backlog (pgbench's and the marker).
    pub transactions: u64,
    /// Row changes in them.
    pub rows: u64,
    /// Seconds from starting replication (apply only: apply) until node 2 had the marker.
    pub seconds: f64,
    /// The replication processes' CPU and memory over the drain.
    pub cost: Vec<ProcessCost>,
    /// pgferry: how apply grouped the backlog (`None` for the other systems, or when apply's
    /// `/metrics` could not be read).
    pub groups: Option<GroupSizes>,
    /// Apply only: seconds capture alone took to publish the backlog (untimed preparation).
    pub capture_seconds: Option<f64>,
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

/// Catches `replication` up (untimed), stops it, writes `transactions` of the drain's
/// workload on node 1 with `clients` connections, times the drain and stops replication
/// again (also when the drain failed).
pub async fn measure(
    replication: &mut Replication,
    pgbench: &Pgbench,
    kind: DrainKind,
    transactions: u64,
    clients: u64,
    timeout: Duration,
) -> Result<Drain> {
    let drained = drain(replication, pgbench, kind, transactions, clients, timeout).await;
    let stopped = replication.stop().await;
    let drain = drained?;
    stopped?;
    Ok(drain)
}

async fn drain(
    replication: &mut Replication,
    pgbench: &Pgbench,
    kind: DrainKind,
    transactions: u64,
    clients: u64,
    timeout: Duration,
) -> Result<Drain> {
    let workload = kind.workload();
    let system = replication.system.label();
    eprintln!("[bench] {system}: catching up before the {} drain", kind.label());
    replication.catch_up(timeout).await?;
    replication.stop().await?;
    let n1 = replication.sql(0).await?;
    let n2 = replication.sql(1).await?;
    let per_client = (transactions / clients).max(1);
    eprintln!(
        "[bench] {system}: backlog of {} {} transactions on n1, replication stopped",
        per_client * clients,
        workload.label()
    );
    let dsn = replication.cluster.nodes[0].dsn.clone();
    let ran = pgbench.run(&dsn, workload, Pace::Count { clients, per_client }).await?;
    // The marker's transaction also reads its own WAL position before it commits: a change
    // committed at or after that position is the marker's (or later), which is how the
    // apply-only drain knows capture has published the whole backlog.
    n1.batch_execute("BEGIN").await.context("opening the marker's transaction")?;
    let marker = workload::insert_marker(&n1, workload).await?;
    let marker_lsn = measure::lsn(&n1, "pg_current_wal_insert_lsn()").await?;
    n1.batch_execute("COMMIT").await.context("committing the marker")?;
    let transactions = ran.transactions + 1;
    let rows = ran.transactions * workload.rows_per_txn() + 1;

    let mut capture_seconds = None;
    match kind {
        DrainKind::EndToEnd(_) => {}
        DrainKind::ApplyOnly => {
            let capture_started = Instant::now();
            replication.start_capture()?;
            replication.wait_published(marker_lsn, timeout).await?;
            let seconds = capture_started.elapsed().as_secs_f64();
            eprintln!(
                "[bench] {system}: capture alone published the backlog in {seconds:.2} s ({:.0} txn/s); \
                 stopping it and starting apply",
                transactions as f64 / seconds
            );
            capture_seconds = Some(seconds);
            replication.stop().await?;
        }
    }
    replication.ready_to_start().await?;
    let started = Instant::now();
    match kind {
        DrainKind::EndToEnd(_) => replication.start().await?,
        DrainKind::ApplyOnly => replication.start_apply()?,
    }
    let sampler = CostSampler::start(replication.cost_watches());
    let done = replication::wait_marker(replication, 1, workload, marker, timeout).await;
    let cost = sampler.stop().await;
    let seconds = done?.duration_since(started).as_secs_f64();
    let groups = match replication.apply_metrics() {
        Some(addr) => match group_sizes::read(addr).await {
            Ok(g) => Some(g),
            Err(e) => {
                eprintln!("[bench] warning: {system}: reading apply's group sizes: {e:#}");
                None
            }
        },
        None => None,
    };
    let (on_n1, on_n2) = (
        workload::inserted_rows(&n1, workload).await?,
        workload::inserted_rows(&n2, workload).await?,
    );
    if on_n1 != on_n2 {
        bail!("{system}: after the drain n2 has {on_n2} rows in the workload's table, n1 {on_n1}");
    }
    eprintln!(
        "[bench] {system}: {} drained in {seconds:.2} s ({:.0} txn/s){}",
        kind.label(),
        transactions as f64 / seconds,
        groups
            .as_ref()
            .and_then(GroupSizes::mean)
            .map(|m| format!(", {m:.1} transactions per group"))
            .unwrap_or_default()
    );
    Ok(Drain {
        transactions,
        rows,
        seconds,
        cost,
        groups,
        capture_seconds,
    })
}
