//! `pgferry bench`: pgferry, PostgreSQL 15's native logical replication and pglogical 2 side by
//! side on the same PostgreSQL servers (the benchmark's own, with identical settings): backlog
//! drain and steady-state latency for TPC-B and wide rows (node 1 → node 2), the highest
//! TPC-B rate each keeps at p99 ≤ 100 ms (stepping the rate), pgferry's apply alone draining a
//! TPC-B backlog already in Kafka, three nodes all writing, a conflict-heavy drain (three nodes
//! updating the same rows, checked identical afterwards), and what capture and apply cost.
//! Every drain runs `--repeats` times, the systems taking turns within each repetition (the
//! machine is shared and noisy; the tables print median, min and max). Every
//! figure is reported, none is judged fatal: a system that fails a scenario gets the failure in
//! its cell and the run goes on.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::backlog::{self, Drain, DrainKind};
use crate::conflict_drain;
use crate::latency::{self, Latency};
use crate::max_rate::{self, MaxRate};
use crate::mesh::{self, Burst};
use crate::replication::{Replication, System};
use crate::report::{self, failed_text, Outcome, Results};
use crate::workload::{self, Pgbench, Workload};

/// Options of the comparison (`pgferry bench`).
#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// Small and short (checks the command, as CI does; the figures mean little): 1,000-transaction
    /// backlogs drained once, 3 s latency runs at 50 and 100 tps, one 2 s max-rate step at 100
    /// tps, 300 transactions per node on three nodes, 100 per node in the conflict-heavy drain;
    /// writes to .local/logs/bench-quick unless --out.
    #[arg(long)]
    pub quick: bool,
    /// Times each backlog drain runs, the systems taking turns [default: 3; --quick 1].
    #[arg(long)]
    pub repeats: Option<u64>,
    /// TPC-B transactions in the backlog [default: 50000; --quick 1000].
    #[arg(long)]
    pub transactions: Option<u64>,
    /// Wide-row transactions in the backlog [default: 10000; --quick 300].
    #[arg(long)]
    pub wide_transactions: Option<u64>,
    /// Fixed rates (tps) of the TPC-B latency runs [default: 1000,2000; --quick 50,100].
    #[arg(long, value_delimiter = ',')]
    pub rates: Option<Vec<u64>>,
    /// Fixed rate (tps) of the wide-row latency run [default: 1000; --quick 50].
    #[arg(long)]
    pub wide_rate: Option<u64>,
    /// Length of each latency run in seconds [default: 30; --quick 3].
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Rates (tps, ascending) of the steps finding the highest TPC-B rate with p99 ≤ 100 ms;
    /// a system's stepping stops at its first step that does not pass [default:
    /// 100,250,500,750,1000,1500,2000,3000,4000,6000; --quick 100].
    #[arg(long, value_delimiter = ',')]
    pub max_rate_steps: Option<Vec<u64>>,
    /// Length of each max-rate step in seconds [default: 10; --quick 2].
    #[arg(long)]
    pub max_rate_seconds: Option<u64>,
    /// Skip the max-rate steps.
    #[arg(long)]
    pub no_max_rate: bool,
    /// TPC-B transactions per node in the three-node run [default: 10000; --quick 300].
    #[arg(long)]
    pub mesh_transactions: Option<u64>,
    /// Hot TPC-B transactions per node in the conflict-heavy drain (all nodes update the same
    /// 1,000 accounts) [default: 5000; --quick 100].
    #[arg(long)]
    pub conflict_transactions: Option<u64>,
    /// Skip the conflict-heavy drain.
    #[arg(long)]
    pub no_conflicts: bool,
    /// pgbench scale of the two-node runs (100,000 accounts per unit) [default: 10; --quick 1].
    #[arg(long)]
    pub scale: Option<u64>,
    /// pgbench connections writing.
    #[arg(long, default_value_t = 4)]
    pub clients: u64,
    /// Systems to measure.
    #[arg(long, value_delimiter = ',', value_parser = System::parse, default_value = "pgferry,native,pglogical")]
    pub systems: Vec<System>,
    /// Skip the three-node run.
    #[arg(long)]
    pub no_mesh: bool,
    /// Skip the two-node runs (backlog drain, latency, max rate, cost).
    #[arg(long)]
    pub no_pair: bool,
    /// Keep the benchmark databases and topics (replication stopped, slots dropped) to look at
    /// (bench.sh stops its servers at the end; their data stays in .local/bench until its next
    /// run: `PGFERRY_LOCAL=.local/bench PGFERRY_PG_BASE_PORT=25530 PGFERRY_PG_PRELOAD=pglogical
    /// deploy/local/pg.sh start 3`).
    #[arg(long)]
    pub keep: bool,
    /// Directory the table (<name>.md), results (<name>.json) and chart (<name>.png) go to
    /// [default: docs/benchmarks; --quick .local/logs/bench-quick].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// File name of the outputs, without extension.
    #[arg(long, default_value = "comparison")]
    pub name: String,
    /// Python with matplotlib, which draws the chart (no chart without it).
    #[arg(long, env = "PGFERRY_BENCH_PYTHON")]
    pub python: Option<PathBuf>,
    /// Give up waiting for a drain or a catch-up after this many seconds.
    #[arg(long, default_value_t = 1800)]
    pub timeout_secs: u64,
}

/// The resolved sizes of a run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    pub repeats: u64,
    pub transactions: u64,
    pub wide_transactions: u64,
    pub rates: Vec<u64>,
    pub wide_rate: u64,
    pub seconds: u64,
    /// Rates of the max-rate steps (empty: skipped).
    pub max_rate_steps: Vec<u64>,
    pub max_rate_seconds: u64,
    pub mesh_transactions: u64,
    pub conflict_transactions: u64,
    pub scale: u64,
    pub clients: u64,
    pub systems: Vec<System>,
    pub pair: bool,
    pub mesh: bool,
    pub conflicts: bool,
}

impl CompareArgs {
    fn plan(&self) -> Plan {
        let q = self.quick;
        let pick = |v: Option<u64>, full: u64, quick: u64| v.unwrap_or(if q { quick } else { full });
        Plan {
            quick: q,
            repeats: pick(self.repeats, 3, 1).max(1),
            transactions: pick(self.transactions, 50_000, 1_000),
            wide_transactions: pick(self.wide_transactions, 20_000, 500),
            rates: self
                .rates
                .clone()
                .unwrap_or_else(|| if q { vec![50, 100] } else { vec![1000, 2000] }),
            wide_rate: pick(self.wide_rate, 1000, 50),
            seconds: pick(self.seconds, 30, 3),
            max_rate_steps: match (self.no_max_rate, &self.max_rate_steps) {
                (true, _) => Vec::new(),
                (false, Some(steps)) => {
                    let mut steps: Vec<u64> = steps.iter().copied().filter(|&x| x > 0).collect();
                    steps.sort_unstable();
                    steps.dedup();
                    steps
                }
                (false, None) if q => vec![100],
                (false, None) => vec![100, 250, 500, 750, 1000, 1500, 2000, 3000, 4000, 6000],
            },
            max_rate_seconds: pick(self.max_rate_seconds, 10, 2).max(1),
            mesh_transactions: pick(self.mesh_transactions, 10_000, 300),
            conflict_transactions: pick(self.conflict_transactions, 5_000, 100),
            scale: pick(self.scale, 10, 1),
            clients: self.clients.max(1),
            systems: self.systems.clone(),
            pair: !self.no_pair,
            mesh: !self.no_mesh,
            conflicts: !self.no_conflicts,
        }
    }

    fn out_dir(&self) -> PathBuf {
        match (&self.out, self.quick) {
            (Some(dir), _) => dir.clone(),
            (None, false) => PathBuf::from("docs/benchmarks"),
            (None, true) => PathBuf::from(".local/logs/bench-quick"),
        }
    }
}

/// What one system measured on the two-node pair.
#[derive(Debug)]
pub struct PairResults {
    pub system: System,
    /// Backlog drains, one per repetition, in the order they ran.
    pub drains: Vec<(DrainKind, Outcome<Drain>)>,
    /// Latency runs by workload.
    pub latencies: Vec<(Workload, u64, Outcome<Latency>)>,
    /// The max-rate steps (`None`: not run).
    pub max_rate: Option<Outcome<MaxRate>>,
}

/// Runs the comparison, writes the outputs and returns the markdown table.
pub async fn run(args: &CompareArgs, pg_bin: &std::path::Path) -> Result<String> {
    let plan = args.plan();
    let started = report::utc_now();
    let load_before = report::load_average();
    let scripts = std::env::temp_dir().join(format!("pgferry-bench-{}", std::process::id()));
    let pgbench = Pgbench::new(pg_bin, &scripts)?;
    let timeout = Duration::from_secs(args.timeout_secs);
    let mut clusters = Vec::new();
    let mut pairs = Vec::new();
    if plan.pair {
        pairs = pair_runs(&plan, &pgbench, timeout, &mut clusters).await;
    }
    // Every three-node run writes with 2 connections per node.
    let burst = |per_node| Burst {
        pgbench: &pgbench,
        per_node,
        clients: 2,
        timeout,
    };
    let mut meshes = Vec::new();
    if plan.mesh {
        let burst = burst(plan.mesh_transactions);
        meshes = three_node_runs(&plan, "three nodes", &mut clusters, |system| mesh::measure(system, burst)).await;
    }
    let mut conflicts = Vec::new();
    if plan.conflicts {
        let burst = burst(plan.conflict_transactions);
        conflicts = three_node_runs(&plan, "conflict-heavy drain", &mut clusters, |system| {
            conflict_drain::measure(system, burst)
        })
        .await;
    }
    if args.keep {
        for cluster in &clusters {
            let dbs: Vec<String> = cluster.nodes.iter().map(|n| pgferry_integration_tests::without_password(&n.dsn)).collect();
            eprintln!("[bench] kept cluster {}: {}", cluster.name, dbs.join(" "));
        }
    } else {
        eprintln!("[bench] dropping the benchmark databases and topics");
        for cluster in clusters {
            if let Err(e) = crate::measure::remove(cluster).await {
                eprintln!("[bench] warning: removing a benchmark cluster: {e:#}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scripts);

    let results = Results {
        plan,
        pairs,
        meshes,
        conflicts,
        started,
        load_before,
        load_after: report::load_average(),
        machine: report::Machine::read().await,
    };
    let out = args.out_dir();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let table = report::tables(&results);
    let notes = out.join(format!("{}-notes.md", args.name)).is_file();
    let doc = report::document(&results, &table, &args.name, notes);
    let md = out.join(format!("{}.md", args.name));
    std::fs::write(&md, doc).with_context(|| format!("writing {}", md.display()))?;
    let json = out.join(format!("{}.json", args.name));
    std::fs::write(&json, report::json(&results).to_string()).with_context(|| format!("writing {}", json.display()))?;
    let png = out.join(format!("{}.png", args.name));
    match &args.python {
        Some(python) => match report::chart(python, &json, &png) {
            Ok(()) => eprintln!("[bench] chart: {}", png.display()),
            Err(e) => eprintln!("[bench] no chart: {e:#}"),
        },
        None => eprintln!("[bench] no chart: give --python (or PGFERRY_BENCH_PYTHON) a Python with matplotlib"),
    }
    eprintln!("[bench] written: {}", md.display());
    Ok(table)
}

/// Node 1 → node 2 with every system: set up all pairs, then `plan.repeats` repetitions of
/// every drain (within one, each drain runs on every system in turn), then each system's
/// latency runs and max-rate steps. Returns what was measured; the clusters go to `clusters`
/// for removal at the end.
async fn pair_runs(
    plan: &Plan,
    pgbench: &Pgbench,
    timeout: Duration,
    clusters: &mut Vec<pgferry_integration_tests::Cluster>,
) -> Vec<PairResults> {
    let mut pairs: Vec<(PairResults, Option<Replication>)> = Vec::new();
    for &system in &plan.systems {
        let mut results = PairResults {
            system,
            drains: Vec::new(),
            latencies: Vec::new(),
            max_rate: None,
        };
        eprintln!("[bench] {}: setting up n1 -> n2 (pgbench scale {})", system.label(), plan.scale);
        let replication = match Replication::pair(system, &workload::setup_sql(plan.scale), workload::TABLES).await {
            Ok(r) => Some(r),
            Err(e) => {
                let why = failed_text(system, "set-up", &e);
                for kind in DrainKind::ALL.into_iter().filter(|k| k.runs_on(system)) {
                    results.drains.push((kind, Outcome::Failed(why.clone())));
                }
                None
            }
        };
        pairs.push((results, replication));
    }

    for repetition in 1..=plan.repeats {
        for kind in DrainKind::ALL {
            let transactions = match kind.workload() {
                Workload::Wide => plan.wide_transactions,
                _ => plan.transactions,
            };
            for (results, replication) in &mut pairs {
                let system = results.system;
                let Some(replication) = replication.as_mut().filter(|_| kind.runs_on(system)) else {
                    continue;
                };
                // A drain that failed once is not tried again (it would likely wait out the timeout).
                if results.drains.iter().any(|(k, o)| *k == kind && matches!(o, Outcome::Failed(_))) {
                    continue;
                }
                eprintln!(
                    "[bench] repetition {repetition} of {}: {} drain, {}",
                    plan.repeats,
                    kind.label(),
                    system.label()
                );
                let drain = backlog::measure(replication, pgbench, kind, transactions, plan.clients, timeout).await;
                results.drains.push((kind, Outcome::of(drain, system, "backlog")));
            }
        }
    }

    let runs: Vec<(Workload, Vec<u64>)> = vec![
        (Workload::TpcB, plan.rates.clone()),
        (Workload::Wide, vec![plan.wide_rate]),
    ];
    let mut out = Vec::new();
    for (mut results, replication) in pairs {
        let system = results.system;
        let Some(mut replication) = replication else {
            out.push(results);
            continue;
        };
        eprintln!("[bench] {}: catching up before the latency runs", system.label());
        let ready = replication.catch_up(timeout).await;
        let ready = ready.map_err(|e| failed_text(system, "catching up", &e));
        for (workload, rates) in &runs {
            for &rate in rates {
                let outcome = match &ready {
                    Ok(()) => latency::run(&mut replication, pgbench, *workload, rate, plan.seconds).await,
                    Err(why) => Outcome::Failed(format!("catching up failed: {why}")),
                };
                results.latencies.push((*workload, rate, outcome));
            }
        }
        if !plan.max_rate_steps.is_empty() {
            results.max_rate = Some(match &ready {
                Ok(()) => Outcome::Measured(
                    max_rate::measure(&mut replication, pgbench, &plan.max_rate_steps, plan.max_rate_seconds).await,
                ),
                Err(why) => Outcome::Failed(format!("catching up failed: {why}")),
            });
        }
        match replication.finish().await {
            Ok(c) => clusters.push(c),
            Err(e) => eprintln!("[bench] warning: {}: stopping: {e:#}", system.label()),
        }
        out.push(results);
    }
    out
}

/// Runs a three-node scenario (`run`, which returns its result and the cluster it made) on
/// every system of the plan but PostgreSQL 15's native replication, which cannot have three
/// writing nodes; the clusters go to `clusters` for removal at the end.
async fn three_node_runs<T, F, Fut>(
    plan: &Plan,
    what: &str,
    clusters: &mut Vec<pgferry_integration_tests::Cluster>,
    mut run: F,
) -> Vec<(System, Outcome<T>)>
where
    F: FnMut(System) -> Fut,
    Fut: std::future::Future<Output = (Result<T>, Option<pgferry_integration_tests::Cluster>)>,
{
    let mut out = Vec::new();
    for &system in &plan.systems {
        let outcome = match system {
            System::Native => Outcome::NotPossible(mesh::NATIVE_LOOPS.into()),
            _ => {
                let (result, cluster) = run(system).await;
                clusters.extend(cluster);
                Outcome::of(result, system, what)
            }
        };
        out.push((system, outcome));
    }
    out
}
