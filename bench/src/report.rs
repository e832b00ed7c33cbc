//! The comparison's outputs: markdown tables (with the targets next to the figures), the
//! document for docs/benchmarks/ (machine, versions, settings, command), the results as JSON,
//! and the PNG chart drawn from that JSON by `chart.py`.
//!
//! The chart is matplotlib's (Python venv from PyPI, made by deploy/local/install.sh for the
//! benchmark) rather than a Rust plotting crate: `plotters` with PNG output and text needs an
//! image encoder and a font stack (freetype/fontconfig or ab_glyph), minutes more of building
//! on two cores for every workspace build; the venv installs in under a minute, once.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::backlog::{Drain, DrainKind};
use crate::compare::{PairResults, Plan};
use crate::conflict_drain::{ConflictRun, HOT_ACCOUNTS};
use crate::cost::ProcessCost;
use crate::group_sizes::GroupSizes;
use crate::max_rate;
use crate::measure::thousands;
use crate::mesh::MeshRun;
use crate::replication::{System, APPLY_SESSIONS};
use crate::stats::{spread, Spread};
use crate::workload::Workload;

/// A figure's two bounds (issue 14): what it must reach, and what it aims for.
#[derive(Debug, Clone, Copy)]
struct Goal {
    required: f64,
    target: f64,
}

/// pgferry's drain rate ÷ native's (medians), by drain; apply only is divided by native's
/// end-to-end TPC-B drain.
fn drain_goal(kind: DrainKind) -> Goal {
    match kind {
        DrainKind::EndToEnd(Workload::Wide) => Goal {
            required: 1.0,
            target: 1.5,
        },
        DrainKind::ApplyOnly => Goal {
            required: 1.5,
            target: 3.0,
        },
        DrainKind::EndToEnd(_) => Goal {
            required: 0.7,
            target: 1.5,
        },
    }
}
/// Latency: p99 (ms) at most, at [`LATENCY_GOAL_RATES`] TPC-B.
const LATENCY_GOAL_MS: Goal = Goal {
    required: 100.0,
    target: 50.0,
};
const LATENCY_GOAL_RATES: [u64; 2] = [1000, 2000];
/// The highest TPC-B rate with p99 ≤ 100 ms: pgferry's ÷ native's, at least.
const MAX_RATE_GOAL: Goal = Goal {
    required: 0.5,
    target: 1.0,
};
/// The conflict-heavy drain: pgferry's txn/s ÷ pglogical's, at least (a target only).
const CONFLICT_DRAIN_TARGET: f64 = 1.0;
/// Peak RSS (MB) of each pgferry service, at most.
const RSS_GOAL_MB: Goal = Goal {
    required: 256.0,
    target: 128.0,
};
/// Apply CPU per TPC-B transaction (pgferry apply and its sessions) ÷ native's apply worker, at most.
const APPLY_CPU_GOAL: Goal = Goal {
    required: 3.0,
    target: 1.0,
};
/// Role of native's and pglogical's apply worker in the cost figures.
const APPLY_WORKER: &str = "apply worker (n2)";
/// Role of pgferry apply's process in the cost figures.
const PGFERRY_APPLY: &str = "pgferry apply";

/// A figure, or why there is none.
#[derive(Debug, Clone)]
pub enum Outcome<T> {
    Measured(T),
    Failed(String),
    NotPossible(String),
}

impl<T> Outcome<T> {
    /// `result` as an outcome: an error becomes [`Outcome::Failed`] with its first line (see
    /// [`failed_text`]).
    pub fn of(result: Result<T>, system: System, what: &str) -> Outcome<T> {
        result.map_or_else(|e| Outcome::Failed(failed_text(system, what, &e)), Outcome::Measured)
    }

    /// The figure, if measured.
    pub fn get(&self) -> Option<&T> {
        match self {
            Outcome::Measured(t) => Some(t),
            _ => None,
        }
    }

    /// The cell text when there is no figure.
    pub fn why(&self) -> String {
        match self {
            Outcome::Measured(_) => String::new(),
            Outcome::Failed(e) => format!("failed: {}", e.replace('|', "/")),
            Outcome::NotPossible(e) => format!("not possible: {e}"),
        }
    }
}

/// Logs `system`'s failure of `what` (the whole error, with the logs it carries) and returns
/// its first line, for a table's cell.
pub fn failed_text(system: System, what: &str, e: &anyhow::Error) -> String {
    eprintln!("[bench] {} {what} failed: {e:#}", system.label());
    format!("{e:#}").lines().next().unwrap_or("failed").to_string()
}

/// Everything one run measured.
#[derive(Debug)]
pub struct Results {
    pub plan: Plan,
    pub pairs: Vec<PairResults>,
    pub meshes: Vec<(System, Outcome<MeshRun>)>,
    /// The conflict-heavy drain by system.
    pub conflicts: Vec<(System, Outcome<ConflictRun>)>,
    pub started: String,
    pub load_before: String,
    pub load_after: String,
    pub machine: Machine,
}

impl Results {
    /// The measured drains of `kind` by `system`, in the order they ran.
    fn drains(&self, system: System, kind: DrainKind) -> Vec<&Drain> {
        self.pairs
            .iter()
            .filter(|p| p.system == system)
            .flat_map(|p| p.drains.iter())
            .filter(|(k, _)| *k == kind)
            .filter_map(|(_, o)| o.get())
            .collect()
    }

    /// The spread of txn/s of the measured drains of `kind` by `system`.
    fn drain_rate(&self, system: System, kind: DrainKind) -> Option<Spread> {
        let rates: Vec<f64> = self.drains(system, kind).iter().map(|d| d.txn_per_s()).collect();
        spread(&rates)
    }
}

/// The machine and the software the figures come from.
#[derive(Debug, Default)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub postgres: String,
    pub pglogical: String,
    /// The benchmark servers' settings that matter here (the same on every server).
    pub settings: Vec<(String, String)>,
}

impl Machine {
    /// From /proc and the first benchmark server.
    pub async fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mut m = Machine {
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            cpu: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, v)| v.trim().to_string()))
                .unwrap_or_default(),
            memory_gib: crate::rss::status_kb(&meminfo, "MemTotal").unwrap_or(0) as f64 / 1_048_576.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            ..Machine::default()
        };
        let endpoints = pgferry_integration_tests::Endpoints::from_env();
        if let Ok(c) = pgferry_integration_tests::connect(&endpoints.pg[0]).await {
            if let Ok(row) = c.query_one("SELECT version()", &[]).await {
                m.postgres = row.get::<_, String>(0).split(" on ").next().unwrap_or_default().to_string();
            }
            if let Ok(Some(row)) = c
                .query_opt("SELECT default_version FROM pg_available_extensions WHERE name = 'pglogical'", &[])
                .await
            {
                m.pglogical = row.get(0);
            }
            let names = [
                "shared_preload_libraries",
                "shared_buffers",
                "wal_level",
                "track_commit_timestamp",
                "fsync",
                "synchronous_commit",
                "max_wal_senders",
                "max_replication_slots",
                "max_worker_processes",
                "max_logical_replication_workers",
                "max_connections",
            ];
            if let Ok(rows) = c
                .query(
                    "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY($1) ORDER BY name",
                    &[&&names[..]],
                )
                .await
            {
                m.settings = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            }
        }
        m
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Now, `YYYY-MM-DD HH:MM UTC`.
pub fn utc_now() -> String {
    chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string()
}

fn n(x: f64) -> String {
    thousands(x.round() as u64)
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "missed"
    }
}

/// `required ≥ 0.7×: met / target ≥ 1.5×: missed` for a figure that should be at least the
/// goal (`at_least`) or at most it, with `unit` after the numbers.
fn judged(x: f64, goal: Goal, at_least: bool, unit: &str) -> String {
    let (sign, ok): (&str, fn(f64, f64) -> bool) = if at_least {
        ("≥", |x, g| x >= g)
    } else {
        ("≤", |x, g| x <= g)
    };
    format!(
        "required {sign} {}{unit}: {} / target {sign} {}{unit}: {}",
        goal.required,
        met(ok(x, goal.required)),
        goal.target,
        met(ok(x, goal.target))
    )
}

/// CPU seconds per 100,000 transactions of a drain.
fn per_100k(cpu_seconds: f64, d: &Drain) -> f64 {
    cpu_seconds * 100_000.0 / d.transactions as f64
}

/// Every watched process's CPU in a drain, summed (`None` if one was not seen).
fn total_cpu(d: &Drain) -> Option<f64> {
    d.cost.iter().map(|c| c.cpu_seconds).sum()
}

/// All the processes of the end-to-end drains together, per system: what replication costs the
/// machine (capture's share included), beside native's walsender and apply worker.
fn total_cpu_table(r: &Results) -> String {
    let mut md = "\n#### Every replication process together, end-to-end drains\n\n".to_string();
    md += "CPU s per 100,000 transactions of all the processes above for one drain, summed (pgferry: \
           capture, its walsender, the Kafka broker when deploy/local/bench.sh found its pid, apply \
           and its sessions), median (min–max).\n\n";
    md += "| workload | system | CPU s / 100k txn | ÷ native |\n| --- | --- | ---: | ---: |\n";
    for kind in [DrainKind::EndToEnd(Workload::TpcB), DrainKind::EndToEnd(Workload::Wide)] {
        let of = |system: System| -> Option<Spread> {
            spread(&r.drains(system, kind).iter().filter_map(|d| Some(per_100k(total_cpu(d)?, d))).collect::<Vec<_>>())
        };
        let native = of(System::Native);
        for pair in &r.pairs {
            let Some(cpu) = of(pair.system) else { continue };
            let ratio = native.as_ref().map(|n| format!("{:.2}×", cpu.median / n.median)).unwrap_or_default();
            md += &format!("| {} | {} | {} | {ratio} |\n", kind.label(), pair.system.label(), spread_text(&cpu, |x| format!("{x:.1}")));
        }
    }
    md
}

/// The CPU of `role` in a drain, if that process was seen.
fn cpu_of(d: &Drain, role: &str) -> Option<f64> {
    d.cost.iter().find(|c| c.role == role)?.cpu_seconds
}

/// pgferry apply's CPU in a drain: its process and its sessions on n2 (both must be seen).
fn pgferry_apply_cpu(d: &Drain) -> Option<f64> {
    Some(cpu_of(d, PGFERRY_APPLY)? + cpu_of(d, APPLY_SESSIONS)?)
}

/// `median (min–max)` of a spread, with `f` formatting each number.
fn spread_text(s: &Spread, f: impl Fn(f64) -> String) -> String {
    if s.n == 1 {
        f(s.median)
    } else {
        format!("{} ({}–{})", f(s.median), f(s.min), f(s.max))
    }
}

/// The markdown tables.
pub fn tables(r: &Results) -> String {
    let mut md = String::new();
    let p = &r.plan;
    md += &drain_tables(r);

    md += "\n### 2 and 3. Steady-state latency, commit on n1 → visible on n2\n\n";
    md += &format!(
        "pgbench at a fixed rate on n1 ({} s per run, 8 connections) while a probe commits a row \
         every 50 ms on n1 and a reader on n2 looks for it every 2 ms. Each system catches up \
         (untimed) before its runs; in each run the probe starts after {} s of load (the system's \
         start-up, not measured), and the run's slowest probes are named on stderr with their time.\n\n",
        p.seconds,
        crate::latency::WARMUP.as_secs()
    );
    md += "| workload | rate asked (tps) | system | pgbench tps | probes | p50 ms | p99 ms | max ms | p99 goal |\n";
    md += "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |\n";
    for w in [Workload::TpcB, Workload::Wide] {
        let mut rates: Vec<u64> = r
            .pairs
            .iter()
            .flat_map(|p| p.latencies.iter().filter(|(x, _, _)| *x == w).map(|(_, rate, _)| *rate))
            .collect();
        rates.sort_unstable();
        rates.dedup();
        for rate in rates {
            for pair in &r.pairs {
                let Some((_, _, outcome)) = pair.latencies.iter().find(|(x, y, _)| *x == w && *y == rate) else {
                    continue;
                };
                let name = pair.system.label();
                match outcome.get() {
                    Some(l) => {
                        let goal = if pair.system == System::Pgferry
                            && w == Workload::TpcB
                            && LATENCY_GOAL_RATES.contains(&rate)
                        {
                            judged(l.p99_ms, LATENCY_GOAL_MS, false, " ms")
                        } else {
                            String::new()
                        };
                        md += &format!(
                            "| {} | {} | {name} | {} | {} | {:.1} | {:.1} | {:.1} | {goal} |\n",
                            w.label(),
                            thousands(rate),
                            n(l.pgbench.tps),
                            l.probes,
                            l.p50_ms,
                            l.p99_ms,
                            l.max_ms
                        );
                    }
                    None => md += &format!("| {} | {} | {name} | {} | | | | | |\n", w.label(), thousands(rate), outcome.why()),
                }
            }
        }
    }

    if !r.meshes.is_empty() {
        md += "\n### 4. Three nodes, all writing\n\n";
        md += "Every node runs TPC-B on its own branch (no two nodes write the same row; 2 connections \
               each) while every node applies the other two; time from the start until every node has \
               every transaction.\n\n";
        md += "| system | transactions (all nodes) | row changes | writes done (s) | everywhere (s) | aggregate txn/s | aggregate row changes/s |\n";
        md += "| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n";
        for (system, outcome) in &r.meshes {
            match outcome.get() {
                Some(m) => {
                    md += &format!(
                        "| {} | {} | {} | {:.2} | {:.2} | {} | {} |\n",
                        system.label(),
                        thousands(m.transactions),
                        thousands(m.rows),
                        m.write_seconds,
                        m.seconds,
                        n(m.txn_per_s()),
                        n(m.rows as f64 / m.seconds)
                    )
                }
                None => md += &format!("| {} | {} | | | | | |\n", system.label(), outcome.why()),
            }
        }
    }

    md += &cost_tables(r);
    md += &group_table(r);
    md += &max_rate_table(r);
    md += &conflict_table(r);
    md
}

/// The goal cell of `system`'s row in a table against native: pgferry's `ratio` (÷ native)
/// judged against `goal` (see [`judged`]), nothing for the other systems.
fn goal_cell(system: System, ratio: Option<f64>, goal: Goal, at_least: bool) -> String {
    match (system, ratio) {
        (System::Pgferry, Some(x)) => judged(x, goal, at_least, "×"),
        (System::Pgferry, None) => "no native figure".into(),
        _ => String::new(),
    }
}

/// `x` against a target only: `target ≥ 1×: met`.
fn judged_target(x: f64, target: f64, unit: &str) -> String {
    format!("target ≥ {target}{unit}: {}", met(x >= target))
}

/// The highest passing rate of `system`'s max-rate steps, if it ran them; `Some(None)` when
/// not even the first step passed.
fn highest_rate(r: &Results, system: System) -> Option<Option<u64>> {
    let pair = r.pairs.iter().find(|p| p.system == system)?;
    Some(pair.max_rate.as_ref()?.get()?.highest())
}

/// One max-rate step as text: `500 → 498 tps, p99 12.3 ms`.
fn step_text(step: &max_rate::Step) -> String {
    let rate = thousands(step.rate);
    match step.outcome.get() {
        Some(l) => format!("{rate} → {} tps, p99 {:.1} ms", n(l.pgbench.tps), l.p99_ms),
        None => format!("{rate} → {}", step.outcome.why()),
    }
}

/// Section 7: the highest TPC-B rate each system keeps at p99 ≤ 100 ms.
fn max_rate_table(r: &Results) -> String {
    let p = &r.plan;
    if p.max_rate_steps.is_empty() || r.pairs.iter().all(|pair| pair.max_rate.is_none()) {
        return String::new();
    }
    let mut md = String::new();
    md += "\n### 7. Highest TPC-B rate with p99 ≤ 100 ms, n1 → n2\n\n";
    md += &format!(
        "pgbench TPC-B on n1 at rising rates ({} tps asked), {} s per step, with the latency probe of \
         sections 2 and 3 (8 connections; n2 has caught up before each step). A step passes when \
         the probes' p99 ≤ {} ms and pgbench reached at least {:.0}% of the rate asked; a system's \
         stepping stops at its first step that does not pass, and its figure is the last rate that \
         passed. Steps: rate asked → pgbench's tps, p99; the last one listed did not pass unless \
         every step passed. pgbench, the servers and the replication share the machine's cores, so \
         near the top a step can also fail because pgbench itself falls short of the rate.\n\n",
        p.max_rate_steps
            .iter()
            .map(|&x| thousands(x))
            .collect::<Vec<_>>()
            .join(", "),
        p.max_rate_seconds,
        max_rate::P99_LIMIT_MS,
        max_rate::KEPT_UP * 100.0
    );
    md += "| system | steps | highest rate passed (tps) | ÷ native | goal (÷ native) |\n";
    md += "| --- | --- | ---: | ---: | --- |\n";
    let native = highest_rate(r, System::Native).flatten();
    for pair in &r.pairs {
        let Some(outcome) = &pair.max_rate else { continue };
        let name = pair.system.label();
        let Some(run) = outcome.get() else {
            md += &format!("| {name} | {} | | | |\n", outcome.why());
            continue;
        };
        let steps: Vec<String> = run.steps.iter().map(step_text).collect();
        let highest = match (run.highest(), run.stopped()) {
            (Some(h), true) => thousands(h),
            (Some(h), false) => format!("≥ {} (every step passed)", thousands(h)),
            (None, _) => format!("none (below {})", thousands(p.max_rate_steps[0])),
        };
        // A system that passed no step counts as 0 against native's figure.
        let ratio = native.map(|nat| run.highest().unwrap_or(0) as f64 / nat as f64);
        let goal = goal_cell(pair.system, ratio, MAX_RATE_GOAL, true);
        md += &format!(
            "| {name} | {} | {highest} | {} | {goal} |\n",
            steps.join("; ").replace('|', "/"),
            ratio.map(|x| format!("{x:.2}×")).unwrap_or_default()
        );
    }
    md
}

/// Section 8: the conflict-heavy drain on three nodes.
fn conflict_table(r: &Results) -> String {
    if r.conflicts.is_empty() {
        return String::new();
    }
    let mut md = String::new();
    md += "\n### 8. Conflict-heavy drain, three nodes updating the same rows\n\n";
    md += &format!(
        "Replication stopped, every node runs {} TPC-B transactions (2 connections) on the same \
         {} accounts, tellers 1–10 and branch 1, so all three update the same rows (each node's \
         history keys in its own range); replication starts, and the drain runs until every node \
         has every node's marker row (aggregate txn/s: all nodes' transactions over that time). \
         Then every table is compared across the nodes (a digest of every row on each node): \
         last-update-wins must pick the same winner everywhere. pgferry resolves with its default \
         `last_update_wins` and records every conflict in `pgferry.conflicts` (rows per node); \
         pglogical runs with `pglogical.conflict_resolution = 'last_update_wins'` (set per database \
         before its apply workers start; its default `apply_remote` lets nodes diverge) and only \
         logs its conflicts.\n\n",
        thousands(r.plan.conflict_transactions),
        thousands(HOT_ACCOUNTS)
    );
    md += "| system | transactions (all nodes) | row changes | bursts written (s) | drained (s) | aggregate txn/s | ÷ pglogical | conflicts recorded (n1 / n2 / n3) | every node identical | goal (÷ pglogical) |\n";
    md += "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |\n";
    let pglogical = r
        .conflicts
        .iter()
        .find(|(s, _)| *s == System::Pglogical)
        .and_then(|(_, o)| o.get());
    for (system, outcome) in &r.conflicts {
        let Some(c) = outcome.get() else {
            md += &format!("| {} | {} | | | | | | | | |\n", system.label(), outcome.why());
            continue;
        };
        let ratio = pglogical.map(|g| c.txn_per_s() / g.txn_per_s());
        let conflicts = match &c.conflicts {
            Some(counts) => counts
                .iter()
                .map(|&k| thousands(k.max(0) as u64))
                .collect::<Vec<_>>()
                .join(" / "),
            None => "not recorded (server log only)".into(),
        };
        let identical = if c.identical() {
            format!("yes ({} tables)", c.tables)
        } else {
            format!("**no, failed**: {}", c.differences.join("; ").replace('|', "/"))
        };
        let goal = match (system, ratio) {
            (System::Pgferry, _) if !c.identical() => "missed: the nodes differ".to_string(),
            (System::Pgferry, Some(x)) => {
                let verdict = judged_target(x, CONFLICT_DRAIN_TARGET, "×");
                match pglogical {
                    Some(g) if !g.identical() => format!("{verdict} (pglogical's nodes differ)"),
                    _ => verdict,
                }
            }
            (System::Pgferry, None) => "no pglogical figure".to_string(),
            _ => String::new(),
        };
        md += &format!(
            "| {} | {} | {} | {:.2} | {:.2} | {} | {} | {conflicts} | {identical} | {goal} |\n",
            system.label(),
            thousands(c.transactions),
            thousands(c.rows),
            c.write_seconds,
            c.seconds,
            n(c.txn_per_s()),
            ratio.map(|x| format!("{x:.2}×")).unwrap_or_default()
        );
    }
    md
}


/// Section 1 and 3: every drain's median, min and max against native's.
fn drain_tables(r: &Results) -> String {
    let p = &r.plan;
    let mut md = String::new();
    md += "### 1 and 3. Backlog drain, n1 → n2\n\n";
    md += &format!(
        "Replication stopped, n1 runs the backlog ({} TPC-B / {} wide-row transactions, {} pgbench \
         connections), replication starts; time until n2 has the last transaction. Each drain runs \
         {} time{}, the systems taking turns within each repetition (pgferry, native, pglogical; \
         before each drain a system catches up untimed, so it decodes only its own backlog, and \
         between its drains it is stopped); txn/s is the median (min–max); ÷ native divides \
         medians. TPC-B (apply only): pgferry's capture first publishes the whole backlog alone \
         (until its partition holds the marker row's transaction), then apply alone drains \
         it from Kafka; divided by native's end-to-end TPC-B drain.\n\n",
        thousands(p.transactions),
        thousands(p.wide_transactions),
        p.clients,
        p.repeats,
        if p.repeats == 1 { "" } else { "s" }
    );
    md += "| workload | system | transactions | row changes | runs | seconds (median) | txn/s | row changes/s (median) | ÷ native | goal (÷ native) |\n";
    md += "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n";
    for kind in DrainKind::ALL {
        let native = r.drain_rate(System::Native, DrainKind::EndToEnd(kind.workload()));
        for pair in &r.pairs {
            let outcomes: Vec<&Outcome<Drain>> =
                pair.drains.iter().filter(|(k, _)| *k == kind).map(|(_, o)| o).collect();
            if outcomes.is_empty() {
                continue;
            }
            let name = pair.system.label();
            let measured: Vec<&Drain> = outcomes.iter().filter_map(|o| o.get()).collect();
            let failures: Vec<String> = outcomes.iter().filter(|o| o.get().is_none()).map(|o| o.why()).collect();
            let Some(rate) = spread(&measured.iter().map(|d| d.txn_per_s()).collect::<Vec<_>>()) else {
                md += &format!("| {} | {name} | {} | | | | | | | |\n", kind.label(), failures.join("; "));
                continue;
            };
            let seconds = spread(&measured.iter().map(|d| d.seconds).collect::<Vec<_>>()).map_or(0.0, |s| s.median);
            let rows = spread(&measured.iter().map(|d| d.rows_per_s()).collect::<Vec<_>>()).map_or(0.0, |s| s.median);
            let ratio = native.map(|nat| rate.median / nat.median);
            let goal = goal_cell(pair.system, ratio, drain_goal(kind), true);
            let runs = if failures.is_empty() {
                rate.n.to_string()
            } else {
                format!("{} ({} failed: {})", rate.n, failures.len(), failures.join("; "))
            };
            md += &format!(
                "| {} | {name} | {} | {} | {runs} | {seconds:.2} | {} | {} | {} | {goal} |\n",
                kind.label(),
                thousands(measured[0].transactions),
                thousands(measured[0].rows),
                spread_text(&rate, n),
                n(rows),
                ratio.map(|x| format!("{x:.2}×")).unwrap_or_default()
            );
        }
    }
    let captured: Vec<f64> = r
        .drains(System::Pgferry, DrainKind::ApplyOnly)
        .iter()
        .filter_map(|d| Some(d.transactions as f64 / d.capture_seconds?))
        .collect();
    if let Some(c) = spread(&captured) {
        md += &format!(
            "\nBefore each apply-only drain, pgferry capture alone published the backlog at {} txn/s \
             ({}; from the process's start until the marker row's transaction was in Kafka; \
             untimed preparation, not in the table).\n",
            spread_text(&c, n),
            if c.n == 1 { "one drain".to_string() } else { format!("median (min–max) of {} drains", c.n) }
        );
    }
    md
}

/// Section 5: CPU and memory of the replication processes, and apply's CPU against native's.
fn cost_tables(r: &Results) -> String {
    let mut md = String::new();
    md += "\n### 5. Cost per 100,000 transactions (during the backlog drains)\n\n";
    md += "CPU seconds (user + system, `/proc/<pid>/stat`) of the processes doing the replication, \
           scaled to 100,000 transactions (median over the repetitions), and their peak resident set \
           (`VmHWM`, the largest over the repetitions). A PostgreSQL process's RSS counts the shared \
           buffers it touched, so only pgferry's services have a memory goal. \"apply's sessions \
           (n2)\": pgferry apply's own PostgreSQL backends on n2 (`application_name` \
           `pgferry-apply-…`), CPU summed, RSS the largest. In the apply-only drain capture and its \
           walsender do not run. \"Kafka broker\": the broker's CPU from the drain's start to its \
           end (the other systems do not use it; its RSS is the JVM's over its whole life).\n\n";
    md += "| workload | system | process | CPU s / 100k txn | peak RSS (MB) | memory goal |\n";
    md += "| --- | --- | --- | ---: | ---: | --- |\n";
    for kind in DrainKind::ALL {
        for pair in &r.pairs {
            let drains = r.drains(pair.system, kind);
            let Some(first) = drains.first() else { continue };
            for role in first.cost.iter().map(|c| c.role.as_str()) {
                let seen: Vec<(&Drain, &ProcessCost)> = drains
                    .iter()
                    .filter_map(|d| Some((*d, d.cost.iter().find(|c| c.role == role)?)))
                    .collect();
                let cpu = spread(
                    &seen
                        .iter()
                        .filter_map(|(d, c)| Some(per_100k(c.cpu_seconds?, d)))
                        .collect::<Vec<_>>(),
                );
                let rss_mb = seen.iter().filter_map(|(_, c)| c.peak_rss_kb).max().map(|k| k as f64 / 1024.0);
                let sessions = seen.iter().map(|(_, c)| c.processes).max().unwrap_or(0);
                let process = if role == APPLY_SESSIONS {
                    format!("{role}, {sessions} session{}", if sessions == 1 { "" } else { "s" })
                } else {
                    role.to_string()
                };
                let goal = match (role.starts_with("pgferry"), rss_mb) {
                    (true, Some(mb)) => judged(mb, RSS_GOAL_MB, false, " MB"),
                    _ => String::new(),
                };
                md += &format!(
                    "| {} | {} | {process} | {} | {} | {goal} |\n",
                    kind.label(),
                    pair.system.label(),
                    cpu.map(|c| spread_text(&c, |x| format!("{x:.1}"))).unwrap_or_else(|| "not seen".into()),
                    rss_mb.map(|mb| format!("{mb:.1}")).unwrap_or_default()
                );
            }
        }
    }

    md += &total_cpu_table(r);

    md += "\n#### Apply CPU per 100,000 TPC-B transactions\n\n";
    md += "pgferry: the apply process plus its PostgreSQL sessions on n2; native and pglogical: \
           their apply worker (its own backend). Median (min–max) over the repetitions; ÷ native \
           divides medians by native's end-to-end figure.\n\n";
    md += "| drain | system | what | CPU s / 100k txn | ÷ native's apply worker | goal |\n";
    md += "| --- | --- | --- | ---: | ---: | --- |\n";
    let apply_cpu = |system: System, kind: DrainKind| -> Option<Spread> {
        let per: Vec<f64> = r
            .drains(system, kind)
            .iter()
            .filter_map(|d| {
                let cpu = match system {
                    System::Pgferry => pgferry_apply_cpu(d)?,
                    _ => cpu_of(d, APPLY_WORKER)?,
                };
                Some(per_100k(cpu, d))
            })
            .collect();
        spread(&per)
    };
    let native = apply_cpu(System::Native, DrainKind::EndToEnd(Workload::TpcB));
    for kind in [DrainKind::EndToEnd(Workload::TpcB), DrainKind::ApplyOnly] {
        for pair in &r.pairs {
            if !kind.runs_on(pair.system) || r.drains(pair.system, kind).is_empty() {
                continue;
            }
            let what = match pair.system {
                System::Pgferry => "apply + its sessions on n2",
                _ => APPLY_WORKER,
            };
            let Some(cpu) = apply_cpu(pair.system, kind) else {
                md += &format!("| {} | {} | {what} | not seen | | |\n", kind.label(), pair.system.label());
                continue;
            };
            let ratio = native.map(|nat| cpu.median / nat.median);
            let goal = goal_cell(pair.system, ratio, APPLY_CPU_GOAL, false);
            md += &format!(
                "| {} | {} | {what} | {} | {} | {goal} |\n",
                kind.label(),
                pair.system.label(),
                spread_text(&cpu, |x| format!("{x:.1}")),
                ratio.map(|x| format!("{x:.2}×")).unwrap_or_default()
            );
        }
    }
    md
}

/// How pgferry apply grouped each of its drains: one column per drain.
fn group_table(r: &Results) -> String {
    let mut columns: Vec<(String, Option<&GroupSizes>)> = Vec::new();
    for pair in r.pairs.iter().filter(|p| p.system == System::Pgferry) {
        for kind in DrainKind::ALL {
            let drains: Vec<&Drain> = pair.drains.iter().filter(|(k, _)| *k == kind).filter_map(|(_, o)| o.get()).collect();
            for (i, d) in drains.iter().enumerate() {
                columns.push((format!("{} #{}", kind.label(), i + 1), d.groups.as_ref()));
            }
        }
    }
    if columns.is_empty() {
        return String::new();
    }
    let mut md = String::new();
    md += "\n### 6. pgferry apply's groups per drain\n\n";
    md += "Source transactions per local transaction of pgferry apply (histogram \
           `pgferry_apply_group_transactions` read from apply's `/metrics` after each drain; apply \
           starts afresh for every drain, so each column is that drain's own): groups by size, \
           then the totals, the mean, and groups that failed and were applied again one by one \
           (`pgferry_apply_group_fallbacks_total`). Size ranges with no group in any drain are left \
           out.\n\n";
    md += "| transactions per group |";
    for (name, _) in &columns {
        md += &format!(" {name} |");
    }
    md += "\n| --- |";
    md += &" ---: |".repeat(columns.len());
    md += "\n";
    let mut ranges: Vec<String> = Vec::new();
    for g in columns.iter().filter_map(|(_, g)| *g) {
        for (name, _) in g.ranges() {
            if !ranges.contains(&name) {
                ranges.push(name);
            }
        }
    }
    let row = |label: &str, cell: &dyn Fn(&GroupSizes) -> String| -> String {
        let mut line = format!("| {label} |");
        for (_, g) in &columns {
            line += &format!(" {} |", g.map(cell).unwrap_or_else(|| "not read".into()));
        }
        line + "\n"
    };
    for range in &ranges {
        let count = |g: &GroupSizes| g.ranges().into_iter().find(|(n, _)| n == range).map_or(0, |(_, c)| c);
        if columns.iter().filter_map(|(_, g)| *g).all(|g| count(g) == 0) {
            continue;
        }
        md += &row(range, &|g| thousands(count(g)));
    }
    md += &row("groups", &|g| thousands(g.count));
    md += &row("source transactions", &|g| thousands(g.sum.round() as u64));
    md += &row("mean per group", &|g| g.mean().map(|m| format!("{m:.1}")).unwrap_or_else(|| "–".into()));
    md += &row("fallbacks", &|g| thousands(g.fallbacks));
    md
}

/// The whole document for docs/benchmarks/ (`notes`: link `<name>-notes.md` beside it).
pub fn document(r: &Results, tables: &str, name: &str, notes: bool) -> String {
    let m = &r.machine;
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| "unknown".into());
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut d = String::new();
    d += "# Replication benchmarks: pgferry, PostgreSQL native logical replication, pglogical\n\n";
    d += &format!(
        "Written by `pgferry bench` on {} (commit {}){}.\n\n",
        r.started,
        env("PGFERRY_BENCH_COMMIT"),
        if r.plan.quick {
            " in `--quick` mode: sizes too small for the figures to mean much, and the targets are \
             for the full run"
        } else {
            ""
        }
    );
    d += "Command:\n\n```sh\n";
    if let Ok(wrapper) = std::env::var("PGFERRY_BENCH_COMMAND") {
        d += &format!("{wrapper}\n# which runs, against the benchmark's own PostgreSQL servers and the local Kafka and registry:\n");
    }
    d += &format!("{}\n```\n\n", format!("pgferry bench {}", argv.join(" ")).trim_end());
    if let Ok(props) = std::env::var("PGFERRY_TEST_KAFKA_PROPERTIES") {
        d += &format!("pgferry's Kafka clients ran with `[kafka.properties]` {props} (`PGFERRY_TEST_KAFKA_PROPERTIES`).\n\n");
    }
    if let Ok(on) = std::env::var("PGFERRY_TEST_READ_AHEAD") {
        d += &format!("pgferry's apply ran with `[apply] read_ahead = {on}` (`PGFERRY_TEST_READ_AHEAD`).\n\n");
    }
    d += &format!(
        "Machine: {} cores ({}), {:.1} GiB memory, Linux {}. {}; pglogical {}; Apache Kafka {} (one \
         KRaft broker) and Apicurio Registry {}; everything on loopback on the same machine; pgferry \
         built {} with {}.\n\n",
        m.cores,
        m.cpu,
        m.memory_gib,
        m.kernel,
        m.postgres,
        m.pglogical,
        env("PGFERRY_KAFKA_VERSION"),
        env("PGFERRY_APICURIO_VERSION"),
        env("PGFERRY_BENCH_PROFILE"),
        env("PGFERRY_BENCH_RUSTC")
    );
    d += &format!(
        "Load average (1, 5, 15 min) at the start: {}; at the end: {}. The machine is shared with \
         other builds and tests, which take cores from every system alike but not at the same \
         moments.\n\n",
        r.load_before, r.load_after
    );
    d += "Every system runs on the same three PostgreSQL servers, started by `deploy/local/bench.sh` \
          for the benchmark alone (fresh data directories each run), with the same settings: ";
    d += &m
        .settings
        .iter()
        .map(|(k, v)| format!("`{k}={v}`"))
        .collect::<Vec<_>>()
        .join(", ");
    d += ". Each system gets fresh databases. pgferry: `pgferry init`, then `pgferry capture` on n1 and \
          `pgferry apply` on n2 (`pgferry run` on each node for three nodes), default settings; after \
          `init` each receiving node's pgbench rows are rewritten under the writing node's replication \
          origin (in three nodes, each branch under the node that writes it), so they look replicated, \
          as `node add` leaves them, and a first remote update is not a conflict the other systems do not \
          detect (the conflict-heavy drain measures conflicts). Native: \
          `CREATE PUBLICATION ... FOR TABLE` on n1, `CREATE SUBSCRIPTION ... WITH (copy_data = false)` \
          on n2, defaults otherwise (one apply worker, `streaming = off`). pglogical: \
          `replication_set_add_all_tables('default', ARRAY['public'])`, `create_subscription(..., \
          synchronize_data := false, forward_origins := '{}')`. pgbench's own commits are \
          asynchronous (`synchronous_commit=off` for the load generator only); the probes commit \
          synchronously. pgbench_history has a bigserial primary key.\n\n";
    if notes {
        d += &format!(
            "What the figures mean, where a target is missed by how much, and what the profile shows \
             as the cause: [{name}-notes.md]({name}-notes.md) (written by hand for the run it names).\n\n"
        );
    }
    d += tables;
    d += &format!("\n![backlog drain, latency and three-node throughput by system]({name}.png)\n");
    d
}

/// The results as JSON (what the chart is drawn from).
pub fn json(r: &Results) -> Value {
    let mut drains = Vec::new();
    let mut latencies = Vec::new();
    for pair in &r.pairs {
        for kind in DrainKind::ALL {
            let measured = pair.drains.iter().filter(|(k, _)| *k == kind).filter_map(|(_, o)| o.get());
            for (i, d) in measured.enumerate() {
                let mut entry = json!({"workload": kind.label(), "system": pair.system.label(),
                    "repetition": i + 1, "txn_per_s": d.txn_per_s(), "rows_per_s": d.rows_per_s(),
                    "seconds": d.seconds, "transactions": d.transactions});
                if let Some(g) = &d.groups {
                    let buckets: Vec<Value> = g
                        .buckets
                        .iter()
                        .map(|&(le, n)| json!([if le.is_finite() { json!(le) } else { json!("+Inf") }, n]))
                        .collect();
                    entry["groups"] = json!({"count": g.count, "transactions": g.sum, "mean": g.mean(),
                        "fallbacks": g.fallbacks, "cumulative_buckets": buckets});
                }
                if let Some(c) = d.capture_seconds {
                    entry["capture_seconds"] = json!(c);
                }
                drains.push(entry);
            }
        }
        for (w, rate, o) in &pair.latencies {
            if let Some(l) = o.get() {
                latencies.push(json!({"workload": w.label(), "rate": rate, "system": pair.system.label(),
                    "p50_ms": l.p50_ms, "p99_ms": l.p99_ms, "max_ms": l.max_ms, "tps": l.pgbench.tps}));
            }
        }
    }
    let mesh: Vec<Value> = r
        .meshes
        .iter()
        .map(|(s, o)| match o.get() {
            Some(m) => json!({"system": s.label(), "txn_per_s": m.txn_per_s()}),
            None => json!({"system": s.label(), "txn_per_s": null, "note": o.why()}),
        })
        .collect();
    let max_rate: Vec<Value> = r
        .pairs
        .iter()
        .filter_map(|p| Some((p.system, p.max_rate.as_ref()?)))
        .map(|(s, o)| match o.get() {
            Some(m) => {
                let steps: Vec<Value> = m
                    .steps
                    .iter()
                    .map(|step| match step.outcome.get() {
                        Some(l) => json!({"rate": step.rate, "tps": l.pgbench.tps, "p50_ms": l.p50_ms,
                            "p99_ms": l.p99_ms, "max_ms": l.max_ms, "passed": step.passed()}),
                        None => json!({"rate": step.rate, "passed": false, "note": step.outcome.why()}),
                    })
                    .collect();
                json!({"system": s.label(), "highest_rate": m.highest(), "steps": steps})
            }
            None => json!({"system": s.label(), "highest_rate": null, "note": o.why()}),
        })
        .collect();
    let conflict_drain: Vec<Value> = r
        .conflicts
        .iter()
        .map(|(s, o)| match o.get() {
            Some(c) => json!({"system": s.label(), "txn_per_s": c.txn_per_s(), "seconds": c.seconds,
                "write_seconds": c.write_seconds, "transactions": c.transactions, "rows": c.rows,
                "conflicts_recorded": c.conflicts, "identical": c.identical(), "differences": c.differences}),
            None => json!({"system": s.label(), "txn_per_s": null, "note": o.why()}),
        })
        .collect();
    json!({
        "title": format!("pgferry bench, {}{}", r.started, if r.plan.quick { " (--quick)" } else { "" }),
        "systems": r.plan.systems.iter().map(|s| s.label()).collect::<Vec<_>>(),
        "repeats": r.plan.repeats,
        "drains": drains,
        "latencies": latencies,
        "mesh": mesh,
        "max_rate": max_rate,
        "conflict_drain": conflict_drain,
    })
}

/// Draws the chart: `python - <results.json> <chart.png>` with chart.py on stdin.
pub fn chart(python: &Path, json: &Path, png: &Path) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new(python)
        .arg("-")
        .arg(json)
        .arg(png)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", python.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(include_str!("chart.py").as_bytes())
            .context("sending chart.py to python")?;
    }
    let out = child.wait_with_output().context("waiting for python")?;
    if !out.status.success() {
        bail!("chart.py failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judges_against_both_bounds() {
        let drain = drain_goal(DrainKind::EndToEnd(Workload::TpcB));
        assert_eq!(judged(1.0, drain, true, "×"), "required ≥ 0.7×: met / target ≥ 1.5×: missed");
        assert_eq!(judged(0.05, drain, true, "×"), "required ≥ 0.7×: missed / target ≥ 1.5×: missed");
        assert_eq!(
            judged(100.0, RSS_GOAL_MB, false, " MB"),
            "required ≤ 256 MB: met / target ≤ 128 MB: met"
        );
        assert_eq!(judged(2.0, APPLY_CPU_GOAL, false, "×"), "required ≤ 3×: met / target ≤ 1×: missed");
        assert_eq!(judged(0.6, MAX_RATE_GOAL, true, "×"), "required ≥ 0.5×: met / target ≥ 1×: missed");
        assert_eq!(judged_target(1.2, CONFLICT_DRAIN_TARGET, "×"), "target ≥ 1×: met");
    }

    #[test]
    fn spreads_read_median_first() {
        let s = spread(&[1000.0, 3000.0, 2000.0]).expect("a spread");
        assert_eq!(spread_text(&s, n), "2,000 (1,000–3,000)");
        let one = spread(&[1234.4]).expect("a spread");
        assert_eq!(spread_text(&one, n), "1,234");
    }
}
