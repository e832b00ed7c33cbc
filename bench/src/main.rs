//! `pgferry-bench` (run as `pgferry bench`): benchmarks against the real local services
//! (PostgreSQL, Kafka, schema registry; endpoints from `eval "$(deploy/local/env.sh)"`, which
//! deploy/local/bench.sh points at the benchmark's own PostgreSQL servers) and the real
//! `pgferry` binary.
//!
//! Contract: each benchmark sets up its own isolated clusters through the integration-test
//! harness (own databases, slots, topics), measures, removes what it made (unless `--keep`),
//! and prints markdown with its figures and targets on stdout; progress goes to stderr. A
//! missed target is a figure, never a failure. The capture benchmarks exit non-zero when they
//! could not measure (a service down, pgferry exited, a count that does not match); the
//! comparison puts such a failure in the system's cells and goes on with the others.
//! The `pgferry` binary is `PGFERRY_BIN`, else the `pgferry` next to this binary (build both
//! with `cargo build --release -p pgferry -p pgferry-bench`).
//!
//! - no subcommand: the comparison of pgferry, PostgreSQL native logical replication and
//!   pglogical (backlog drains repeated with the systems taking turns, pgferry's apply-only
//!   drain, latency, wide rows, the highest TPC-B rate with p99 ≤ 100 ms by stepping the rate,
//!   three nodes all writing, a conflict-heavy drain of three nodes updating the same rows with
//!   every node checked identical afterwards, cost, apply's group sizes); writes
//!   docs/benchmarks/comparison.{md,json,png}. Its outputs are the files, the table also on stdout.
//! - `capture-throughput`: a pgbench TPC-B backlog decoded by `pg_recvlogical` and by pgferry
//!   capture; events/s of both and their ratio (target ≥ 70%).
//! - `large-txn`: one transaction of 2,000,000 row changes; capture's peak RSS (target
//!   < 256 MB) and time to capture.
//! - `table-diff`: `pgferry diff` of a 1,000,000-row table with planted differences; time and
//!   peak RSS of the diff process, then repair and a second diff.

mod backlog;
mod compare;
mod conflict_drain;
mod cost;
mod cpu;
mod group_sizes;
mod large_txn;
mod latency;
mod max_rate;
mod measure;
mod mesh;
mod partition;
mod replication;
mod report;
mod rss;
mod stats;
mod table_diff;
mod throughput;
mod workload;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// Benchmarks of pgferry. Without a subcommand: pgferry, PostgreSQL native logical replication
/// and pglogical side by side (run it through deploy/local/bench.sh, which starts the servers).
#[derive(Parser)]
#[command(name = "pgferry bench", bin_name = "pgferry bench", version, args_conflicts_with_subcommands = true)]
struct Cli {
    /// Directory of the PostgreSQL client programs (pgbench, pg_recvlogical).
    #[arg(
        long,
        global = true,
        env = "PGFERRY_PG_BIN",
        default_value = "/usr/lib/postgresql/15/bin"
    )]
    pg_bin: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    compare: compare::CompareArgs,
}

#[derive(Subcommand)]
enum Command {
    /// pgbench backlog decoded by pg_recvlogical and by pgferry capture: events/s.
    CaptureThroughput(throughput::ThroughputArgs),
    /// One large transaction through pgferry capture: peak RSS and time.
    LargeTxn(large_txn::LargeTxnArgs),
    /// `pgferry diff` of a large table with planted differences: time and peak RSS.
    TableDiff(table_diff::TableDiffArgs),
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = point_at_pgferry().and_then(|()| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(run(cli))
    }) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    let section = match &cli.command {
        None => compare::run(&cli.compare, &cli.pg_bin).await?,
        Some(Command::CaptureThroughput(args)) => throughput::run(args, &cli.pg_bin).await?,
        Some(Command::LargeTxn(args)) => large_txn::run(args).await?,
        Some(Command::TableDiff(args)) => table_diff::run(args).await?,
    };
    println!("{section}");
    Ok(())
}

/// Sets `PGFERRY_BIN` (which the harness runs) to the `pgferry` next to this binary unless it
/// is set, so a release build of both benchmarks the release `pgferry`.
fn point_at_pgferry() -> Result<()> {
    if std::env::var_os("PGFERRY_BIN").is_none() {
        let me = std::env::current_exe().context("locating pgferry-bench")?;
        let sibling = me.with_file_name("pgferry");
        if !sibling.is_file() {
            anyhow::bail!(
                "no pgferry binary at {}: build it (cargo build --release --bin pgferry) or set PGFERRY_BIN",
                sibling.display()
            );
        }
        // Single-threaded here: no other thread reads the environment yet.
        std::env::set_var("PGFERRY_BIN", &sibling);
    }
    let bin = pgferry_integration_tests::pgferry_bin();
    eprintln!("[bench] pgferry binary: {}", bin.display());
    Ok(())
}
