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

use crate::backlog::Drain;
use crate::compare::{PairResults, Plan};
use crate::measure::thousands;
use crate::mesh::MeshRun;
use crate::replication::System;
use crate::workload::Workload;

/// Backlog drain target: pgferry's rate at least this times native's.
const DRAIN_TARGET: f64 = 1.0;
/// Latency target: p99 at most this at [`LATENCY_TARGET_RATE`].
const LATENCY_TARGET_MS: f64 = 100.0;
const LATENCY_TARGET_RATE: u64 = 2000;
/// Memory target per pgferry service.
const RSS_TARGET_MB: f64 = 256.0;

/// A figure, or why there is none.
#[derive(Debug, Clone)]
pub enum Outcome<T> {
    Measured(T),
    Failed(String),
    NotPossible(String),
}

impl<T> Outcome<T> {
    fn get(&self) -> Option<&T> {
        match self {
            Outcome::Measured(t) => Some(t),
            _ => None,
        }
    }

    /// The cell text when there is no figure.
    fn why(&self) -> String {
        match self {
            Outcome::Measured(_) => String::new(),
            Outcome::Failed(e) => format!("failed: {}", e.replace('|', "/")),
            Outcome::NotPossible(e) => format!("not possible: {e}"),
        }
    }
}

/// Everything one run measured.
#[derive(Debug)]
pub struct Results {
    pub plan: Plan,
    pub pairs: Vec<PairResults>,
    pub meshes: Vec<(System, Outcome<MeshRun>)>,
    pub started: String,
    pub load_before: String,
    pub load_after: String,
    pub machine: Machine,
}

impl Results {
    fn drain(&self, system: System, workload: Workload) -> Option<&Drain> {
        self.pairs
            .iter()
            .find(|p| p.system == system)?
            .drains
            .iter()
            .find(|(w, _)| *w == workload)?
            .1
            .get()
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

/// The markdown tables.
pub fn tables(r: &Results) -> String {
    let mut md = String::new();
    let p = &r.plan;
    md += "### 1 and 3. Backlog drain, n1 → n2\n\n";
    md += &format!(
        "Replication stopped, n1 runs the backlog ({} TPC-B / {} wide-row transactions, {} pgbench \
         connections), replication starts; time until n2 has the last transaction.\n\n",
        thousands(p.transactions),
        thousands(p.wide_transactions),
        p.clients
    );
    md += "| workload | system | transactions | row changes | seconds | txn/s | row changes/s | ÷ native | target |\n";
    md += "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n";
    for w in [Workload::TpcB, Workload::Wide] {
        let native = r.drain(System::Native, w).map(Drain::txn_per_s);
        for pair in &r.pairs {
            let Some((_, outcome)) = pair.drains.iter().find(|(x, _)| *x == w) else {
                continue;
            };
            let name = pair.system.label();
            match outcome.get() {
                Some(d) => {
                    let ratio = native.map(|nat| d.txn_per_s() / nat);
                    let target = match (pair.system, ratio) {
                        (System::Pgferry, Some(x)) => {
                            format!("≥ {DRAIN_TARGET:.1}× native: {} ({x:.2}×)", met(x >= DRAIN_TARGET))
                        }
                        (System::Pgferry, None) => format!("≥ {DRAIN_TARGET:.1}× native: no native figure"),
                        _ => String::new(),
                    };
                    md += &format!(
                        "| {} | {name} | {} | {} | {:.2} | {} | {} | {} | {target} |\n",
                        w.label(),
                        thousands(d.transactions),
                        thousands(d.rows),
                        d.seconds,
                        n(d.txn_per_s()),
                        n(d.rows_per_s()),
                        ratio.map(|x| format!("{x:.2}×")).unwrap_or_default()
                    );
                }
                None => md += &format!("| {} | {name} | {} | | | | | | |\n", w.label(), outcome.why()),
            }
        }
    }

    md += "\n### 2 and 3. Steady-state latency, commit on n1 → visible on n2\n\n";
    md += &format!(
        "pgbench at a fixed rate on n1 ({} s per run, 8 connections) while a probe commits a row \
         every 50 ms on n1 and a reader on n2 looks for it every 2 ms.\n\n",
        p.seconds
    );
    md += "| workload | rate asked (tps) | system | pgbench tps | probes | p50 ms | p99 ms | max ms | target |\n";
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
                        let target = if pair.system == System::Pgferry && w == Workload::TpcB && rate == LATENCY_TARGET_RATE
                        {
                            format!("p99 ≤ {LATENCY_TARGET_MS:.0} ms: {}", met(l.p99_ms <= LATENCY_TARGET_MS))
                        } else {
                            String::new()
                        };
                        md += &format!(
                            "| {} | {} | {name} | {} | {} | {:.1} | {:.1} | {:.1} | {target} |\n",
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

    md += "\n### 5. Cost per 100,000 transactions (during the backlog drains)\n\n";
    md += "CPU seconds (user + system, `/proc/<pid>/stat`) of the processes doing the replication, \
           scaled to 100,000 transactions, and their peak resident set (`VmHWM`). A PostgreSQL \
           process's RSS counts the shared buffers it touched, so only pgferry's services have a \
           memory target; pgferry apply's own PostgreSQL sessions on n2 are not in the figures.\n\n";
    md += "| workload | system | process | CPU s / 100k txn | peak RSS (MB) | target |\n";
    md += "| --- | --- | --- | ---: | ---: | --- |\n";
    for w in [Workload::TpcB, Workload::Wide] {
        for pair in &r.pairs {
            let Some(d) = r.drain(pair.system, w) else { continue };
            for c in &d.cost {
                let cpu = c
                    .cpu_seconds
                    .map(|s| format!("{:.1}", s * 100_000.0 / d.transactions as f64))
                    .unwrap_or_else(|| "not seen".into());
                let rss_mb = c.peak_rss_kb.map(|k| k as f64 / 1024.0);
                let target = match (c.role.starts_with("pgferry"), rss_mb) {
                    (true, Some(mb)) => format!("≤ {RSS_TARGET_MB:.0} MB: {}", met(mb <= RSS_TARGET_MB)),
                    _ => String::new(),
                };
                md += &format!(
                    "| {} | {} | {} | {cpu} | {} | {target} |\n",
                    w.label(),
                    pair.system.label(),
                    c.role,
                    rss_mb.map(|mb| format!("{mb:.1}")).unwrap_or_default()
                );
            }
        }
    }
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
          `pgferry apply` on n2 (`pgferry run` on each node for three nodes), default settings. Native: \
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
        for (w, o) in &pair.drains {
            if let Some(d) = o.get() {
                drains.push(json!({"workload": w.label(), "system": pair.system.label(),
                    "txn_per_s": d.txn_per_s(), "rows_per_s": d.rows_per_s(), "seconds": d.seconds,
                    "transactions": d.transactions}));
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
    json!({
        "title": format!("pgferry bench, {}{}", r.started, if r.plan.quick { " (--quick)" } else { "" }),
        "systems": r.plan.systems.iter().map(|s| s.label()).collect::<Vec<_>>(),
        "drains": drains,
        "latencies": latencies,
        "mesh": mesh,
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
