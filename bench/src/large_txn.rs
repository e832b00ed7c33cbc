//! Large transaction: one transaction of N row inserts (default 2,000,000) on node 1 while
//! pgferry capture runs; samples capture's resident memory the whole time and measures how
//! long after the commit the whole transaction is in Kafka.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pgferry_integration_tests::Cluster;

use crate::measure::{self, thousands};
use crate::partition::PartitionProbe;
use crate::rss::{self, RssSampler};

/// Options of `large-txn`.
#[derive(Debug, Clone, clap::Args)]
pub struct LargeTxnArgs {
    /// Row changes (inserts) in the one transaction.
    #[arg(long, default_value_t = 2_000_000)]
    pub rows: u64,
    /// Give up waiting for capture after this many seconds.
    #[arg(long, default_value_t = 1800)]
    pub timeout_secs: u64,
    /// Keep the databases, slots and topics afterwards.
    #[arg(long)]
    pub keep: bool,
}

/// The target: capture's peak resident set stays below this, whatever the transaction size.
const TARGET_MB: f64 = 256.0;

const SETUP: &str = "CREATE TABLE bench_big (id bigint PRIMARY KEY, aid int, delta int,
                                            mtime timestamptz, note text)";

/// Runs the benchmark and returns its markdown section.
pub async fn run(args: &LargeTxnArgs) -> Result<String> {
    let timeout = Duration::from_secs(args.timeout_secs);
    eprintln!("[bench] setting up node 1");
    let cluster = Cluster::start("bench_big", &["r1"], SETUP, &["public.bench_big"]).await?;
    let slot = cluster.slot_of(0);
    let n1 = cluster.sql(0).await?;
    let probe = tokio::task::block_in_place(|| PartitionProbe::new(&cluster.endpoints.kafka, &cluster.topic_of(0), 0))?;

    let mut capture = cluster.spawn("capture", 0)?;
    let sampler = RssSampler::start(capture.pid(), Duration::from_millis(50));
    measure::wait_slot_active(&cluster, &slot, Duration::from_secs(60)).await?;
    let (idle_rss_kb, _) = rss::read(capture.pid()).context("capture exited right after start")?;

    eprintln!("[bench] writing one transaction of {} inserts", thousands(args.rows));
    let began = Instant::now();
    n1.simple_query("BEGIN").await.context("BEGIN")?;
    n1.execute(
        "INSERT INTO bench_big
         SELECT g, (g % 100000)::int, (g % 10001)::int - 5000, now(), md5(g::text)
         FROM generate_series(1, $1::bigint) g",
        &[&(args.rows as i64)],
    )
    .await
    .context("inserting the rows")?;
    // Read inside the transaction: only its commit (or a later one) is at or past this LSN.
    let marker = measure::lsn(&n1, "pg_current_wal_insert_lsn()").await?;
    n1.simple_query("COMMIT").await.context("COMMIT")?;
    let committed = Instant::now();
    let write_secs = committed.duration_since(began).as_secs_f64();
    eprintln!("[bench] committed in {write_secs:.1} s; waiting for capture");

    let done = measure::wait_captured(&cluster, &mut capture, &probe, marker, timeout).await;
    let mem = sampler.stop();
    let done = done?;
    capture.kill();
    let capture_secs = done.duration_since(committed).as_secs_f64();
    eprintln!(
        "[bench] captured {:.1} s after the commit; peak RSS {:.1} MB",
        capture_secs,
        mem.peak_kb() as f64 / 1024.0
    );
    let produced = tokio::task::block_in_place(|| probe.count_changes(Duration::from_secs(900)))?;
    if produced != args.rows {
        bail!(
            "pgferry produced {produced} change events, the transaction has {}\n{}",
            args.rows,
            cluster.logs()
        );
    }
    if args.keep {
        eprintln!("[bench] kept cluster {} (databases, slots, topics)", cluster.name);
    } else {
        measure::remove(cluster).await?;
    }

    let peak_mb = mem.peak_kb() as f64 / 1024.0;
    let mut md = String::new();
    md += "### Large transaction\n\n";
    md += &format!(
        "One transaction of {} inserts (`bench_big`: bigint key, int, int, timestamptz, 32-character \
         text), written on node 1 while pgferry capture (release) ran. Capture's memory is read from \
         `/proc/<pid>/status` every 50 ms; peak is the kernel's `VmHWM` over the process's whole life. \
         Time to capture runs from the commit until the partition holds the whole transaction \
         (committed, `read_committed`); every event was counted back from the topic.\n\n",
        thousands(args.rows)
    );
    md += "| rows | write (s) | capture after commit (s) | events/s | RSS idle (MB) | peak RSS (MB) | target |\n";
    md += "| ---: | ---: | ---: | ---: | ---: | ---: | --- |\n";
    md += &format!(
        "| {} | {write_secs:.1} | {capture_secs:.1} | {} | {:.1} | {peak_mb:.1} | < {TARGET_MB:.0} MB ({}) |\n",
        thousands(args.rows),
        thousands((args.rows as f64 / capture_secs).round() as u64),
        idle_rss_kb as f64 / 1024.0,
        if peak_mb < TARGET_MB { "met" } else { "missed" }
    );
    Ok(md)
}
