//! Table diff: `pgferry diff` of an N-row table (default 1,000,000) between two nodes loaded
//! identically, with a few differences planted on node 2 (changed values, missing rows, extra
//! rows, written under an origin capture does not publish). Measures the time and peak
//! resident memory of the `pgferry diff` process, checks it found exactly the planted keys,
//! then times `pgferry repair` and a second diff of the now identical table. No live traffic:
//! diff runs with `--settle-timeout 0` (nothing to wait for).

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pgferry_integration_tests::{pgferry_bin, Cluster};

use crate::measure::{self, thousands};
use crate::rss::RssSampler;

/// Options of `table-diff`.
#[derive(Debug, Clone, clap::Args)]
pub struct TableDiffArgs {
    /// Rows in the table on each node.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: u64,
    /// Keep the databases afterwards.
    #[arg(long)]
    pub keep: bool,
}

/// One run of a `pgferry` command: wall time, peak RSS (KiB), stdout, exit status.
struct Measured {
    secs: f64,
    peak_kb: u64,
    stdout: String,
    status: i32,
}

fn measure_pgferry(cluster: &Cluster, args: &[&str]) -> Result<Measured> {
    let began = Instant::now();
    let child = Command::new(pgferry_bin())
        .arg("--config")
        .arg(&cluster.config_path)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", pgferry_bin().display()))?;
    let sampler = RssSampler::start(child.id(), Duration::from_millis(20));
    let out = child.wait_with_output().context("waiting for pgferry")?;
    let secs = began.elapsed().as_secs_f64();
    let seen = sampler.stop();
    if !matches!(out.status.code(), Some(0 | 1)) {
        bail!("pgferry {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(Measured {
        secs,
        peak_kb: seen.peak_kb(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        status: out.status.code().unwrap_or(-1),
    })
}

fn differing_ids(report: &str) -> Result<BTreeSet<i64>> {
    let v: serde_json::Value = serde_json::from_str(report.trim()).context("diff printed no JSON")?;
    Ok(v["differences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["key"]["id"].as_str()?.parse().ok())
        .collect())
}

/// Runs the benchmark and returns its markdown section.
pub async fn run(args: &TableDiffArgs) -> Result<String> {
    let rows = args.rows as i64;
    eprintln!("[bench] loading {} rows on two nodes", thousands(args.rows));
    let setup = format!(
        "CREATE TABLE bench_diff (id bigint PRIMARY KEY, grp int NOT NULL, v text, amount numeric, at timestamptz);
         INSERT INTO bench_diff SELECT g, g % 1000, md5(g::text), g * 0.01, '2026-01-01'::timestamptz + g * interval '1 s'
         FROM generate_series(1, {rows}) g;"
    );
    let cluster = Cluster::start("bench_diff", &["r1", "r1"], &setup, &["public.bench_diff"]).await?;
    for i in 0..2 {
        cluster.sql(i).await?.batch_execute("VACUUM ANALYZE bench_diff").await?;
    }
    // Planted on node 2: 4 changed values, 3 missing rows, 3 extra rows.
    let at = |f: f64| ((rows as f64 * f) as i64).max(1);
    let (changed, missing) = ([at(0.0), at(0.31), at(0.62), at(0.999)], [at(0.11), at(0.5), at(0.77)]);
    let extra = [rows + 1, rows + 500, rows + 100_000];
    let mut plant = String::new();
    for id in changed {
        plant += &format!("UPDATE bench_diff SET v = 'planted' WHERE id = {id};");
    }
    for id in missing {
        plant += &format!("DELETE FROM bench_diff WHERE id = {id};");
    }
    for id in extra {
        plant += &format!("INSERT INTO bench_diff VALUES ({id}, 0, 'extra', 0, now());");
    }
    cluster.write_unpublished(1, "plant", plant.trim_end_matches(';')).await?;
    let planted: BTreeSet<i64> = changed.into_iter().chain(missing).chain(extra).collect();

    eprintln!("[bench] pgferry diff ({} planted differences)", planted.len());
    let diff_args = ["diff", "--table", "bench_diff", "--json", "--settle-timeout", "0", "-q"];
    let first = measure_pgferry(&cluster, &diff_args)?;
    let found = differing_ids(&first.stdout)?;
    if first.status != 1 || found != planted {
        bail!("diff found {found:?} (exit {}), planted {planted:?}", first.status);
    }
    eprintln!("[bench] pgferry repair");
    let n1 = cluster.nodes[0].name.clone();
    let repair = measure_pgferry(
        &cluster,
        &["repair", "--table", "bench_diff", "--source-of-truth", &n1, "--settle-timeout", "0", "-q"],
    )?;
    // "<table>: repaired N rows from <node>"
    let repaired: u64 = repair
        .stdout
        .lines()
        .find_map(|l| l.split(": repaired ").nth(1)?.split(' ').next()?.parse().ok())
        .with_context(|| format!("repair printed no count: {}", repair.stdout))?;
    eprintln!("[bench] pgferry diff (identical)");
    let second = measure_pgferry(&cluster, &diff_args)?;
    if second.status != 0 {
        bail!("diff after repair still differs: {}", second.stdout);
    }
    if !args.keep {
        measure::remove(cluster).await?;
    }

    let mb = |kb: u64| kb as f64 / 1024.0;
    Ok(format!(
        "## Table diff: {} rows, two nodes\n\n\
         | run | time | peak RSS | result |\n\
         | --- | ---: | ---: | --- |\n\
         | `pgferry diff`, {} planted differences | {:.1} s | {:.1} MB | exactly the {} planted keys, exit 1 |\n\
         | `pgferry repair` from node 1 | {:.1} s | {:.1} MB | {} rows written on node 2 |\n\
         | `pgferry diff` after repair | {:.1} s | {:.1} MB | identical, exit 0 |\n",
        thousands(args.rows),
        planted.len(),
        first.secs,
        mb(first.peak_kb),
        planted.len(),
        repair.secs,
        mb(repair.peak_kb),
        repaired,
        second.secs,
        mb(second.peak_kb),
    ))
}
