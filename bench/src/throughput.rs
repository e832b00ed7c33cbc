//! Capture throughput: a backlog of pgbench TPC-B transactions is written on node 1 while
//! capture is not running, then decoded twice from the same WAL: by `pg_recvlogical`
//! (pgoutput to /dev/null, the floor of what logical decoding costs) and by pgferry capture
//! (decode, encode to Avro, produce in Kafka transactions).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pgferry_integration_tests::Cluster;

use crate::measure::{self, lsn_text, thousands};
use crate::partition::PartitionProbe;
use crate::workload;

/// Options of `capture-throughput`.
#[derive(Debug, Clone, clap::Args)]
pub struct ThroughputArgs {
    /// pgbench transactions in the backlog (rounded down to a multiple of --clients).
    #[arg(long, default_value_t = 50_000)]
    pub transactions: u64,
    /// pgbench clients writing the backlog.
    #[arg(long, default_value_t = 4)]
    pub clients: u64,
    /// pgbench scale (100,000 accounts, 10 tellers, 1 branch per unit).
    #[arg(long, default_value_t = 1)]
    pub scale: u64,
    /// Give up waiting for either system after this many seconds.
    #[arg(long, default_value_t = 1800)]
    pub timeout_secs: u64,
    /// Keep the databases, slots and topics afterwards.
    #[arg(long)]
    pub keep: bool,
}

/// pgbench's tables (the comparison's set-up; only these are replicated).
const TABLES: &[&str] = workload::PGBENCH_TABLES;

/// Row events per pgbench TPC-B transaction: 3 updates and 1 insert.
const EVENTS_PER_TXN: u64 = 4;

/// One measured run.
struct Run {
    seconds: f64,
}

/// Runs the benchmark and returns its markdown section.
pub async fn run(args: &ThroughputArgs, pg_bin: &std::path::Path) -> Result<String> {
    let clients = args.clients.max(1);
    let per_client = args.transactions / clients;
    if per_client == 0 {
        bail!("--transactions must be at least --clients ({clients})");
    }
    let timeout = Duration::from_secs(args.timeout_secs);
    eprintln!("[bench] setting up node 1 (pgbench scale {})", args.scale);
    let cluster = Cluster::start("bench_tp", &["r1"], &workload::setup_sql(args.scale), TABLES).await?;
    let node = cluster.nodes[0].clone();
    let n1 = cluster.sql(0).await?;
    let capture_slot = cluster.slot_of(0);
    let recv_slot = format!("bench_recv_{}", node.name);
    // A second slot, made before the backlog like capture's: both decode the identical WAL.
    n1.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&recv_slot],
    )
    .await
    .context("creating the pg_recvlogical slot")?;

    eprintln!(
        "[bench] writing the backlog: {} TPC-B transactions ({clients} pgbench clients), capture not running",
        thousands(per_client * clients)
    );
    let began = Instant::now();
    let out = Command::new(pg_bin.join("pgbench"))
        .args([
            "-n",
            "-b",
            "tpcb-like",
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-t",
            &per_client.to_string(),
        ])
        .arg(&node.dsn)
        // Only for writing the backlog faster; the WAL decoded is the same.
        .env("PGOPTIONS", "-c synchronous_commit=off")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", pg_bin.join("pgbench").display()))?;
    if !out.status.success() {
        bail!("pgbench failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let backlog_secs = began.elapsed().as_secs_f64();
    // The last transaction of the backlog: one more history row, and an LSN read inside it
    // (below its commit LSN, above every earlier commit) that marks "everything is captured".
    n1.simple_query("BEGIN").await.context("BEGIN")?;
    n1.execute(
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 0, now())",
        &[],
    )
    .await?;
    let marker = measure::lsn(&n1, "pg_current_wal_insert_lsn()").await?;
    n1.simple_query("COMMIT").await.context("COMMIT")?;
    let end_lsn = measure::lsn(&n1, "pg_current_wal_lsn()").await?;
    let txns: i64 = n1.query_one("SELECT count(*) FROM pgbench_history", &[]).await?.get(0);
    let txns = txns as u64;
    // pgbench transactions have 4 row events each, the closing one has 1.
    let events = (txns - 1) * EVENTS_PER_TXN + 1;
    let wal_bytes = end_lsn.saturating_sub(
        measure::lsn(
            &n1,
            &format!("(SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{capture_slot}')"),
        )
        .await?,
    );
    eprintln!(
        "[bench] backlog: {} transactions, {} row events, {:.1} MB of WAL, written in {backlog_secs:.1} s; end LSN {}",
        thousands(txns),
        thousands(events),
        wal_bytes as f64 / 1e6,
        lsn_text(end_lsn)
    );

    // (a) pg_recvlogical from its slot to the end LSN.
    eprintln!("[bench] pg_recvlogical: decoding the backlog to /dev/null");
    let recv = tokio::task::block_in_place(|| recvlogical(pg_bin, &node.dsn, &recv_slot, end_lsn, timeout))?;
    eprintln!("[bench] pg_recvlogical: {:.2} s", recv.seconds);

    // (b) pgferry capture from process start until the closing transaction is in Kafka.
    eprintln!("[bench] pgferry capture: decoding the backlog into Kafka");
    let probe = tokio::task::block_in_place(|| PartitionProbe::new(&cluster.endpoints.kafka, &cluster.topic_of(0), 0))?;
    let started = Instant::now();
    let mut capture = cluster.spawn("capture", 0)?;
    let done = measure::wait_captured(&cluster, &mut capture, &probe, marker, timeout).await?;
    let ferry = Run {
        seconds: done.duration_since(started).as_secs_f64(),
    };
    capture.kill();
    eprintln!("[bench] pgferry capture: {:.2} s", ferry.seconds);
    let produced = tokio::task::block_in_place(|| probe.count_changes(Duration::from_secs(600)))?;
    if produced != events {
        bail!(
            "pgferry produced {produced} change events, the backlog has {events}\n{}",
            cluster.logs()
        );
    }

    if args.keep {
        eprintln!("[bench] kept cluster {} (databases, slots, topics)", cluster.name);
    } else {
        measure::remove(cluster).await?;
    }

    let recv_rate = events as f64 / recv.seconds;
    let ferry_rate = events as f64 / ferry.seconds;
    let ratio = 100.0 * ferry_rate / recv_rate;
    let mut md = String::new();
    md += "### Capture throughput\n\n";
    md += &format!(
        "Backlog of {} pgbench TPC-B transactions (scale {}, {clients} clients; pgbench_history with a \
         primary key), {:.1} MB of WAL, written while capture was stopped, then decoded from two slots \
         made at the same LSN. Times run from process start until the end of the backlog: \
         `pg_recvlogical` reaching the end LSN, pgferry's partition holding the last transaction \
         (committed, `read_committed`). Every row event was counted back from the topic.\n\n",
        thousands(txns),
        args.scale,
        wal_bytes as f64 / 1e6
    );
    md += "| system | transactions | row events | seconds | events/s | pgferry / pg_recvlogical | target |\n";
    md += "| --- | ---: | ---: | ---: | ---: | ---: | --- |\n";
    md += &format!(
        "| pg_recvlogical (pgoutput, to /dev/null) | {} | {} | {:.2} | {} | | |\n",
        thousands(txns),
        thousands(events),
        recv.seconds,
        thousands(recv_rate.round() as u64)
    );
    md += &format!(
        "| pgferry capture (release) → Kafka | {} | {} | {:.2} | {} | {ratio:.0}% | ≥ 70% ({}) |\n",
        thousands(txns),
        thousands(events),
        ferry.seconds,
        thousands(ferry_rate.round() as u64),
        if ratio >= 70.0 { "met" } else { "missed" }
    );
    Ok(md)
}

/// Runs `pg_recvlogical` on `slot` from its position to `end_lsn`, output to /dev/null.
fn recvlogical(pg_bin: &std::path::Path, dsn: &str, slot: &str, end_lsn: u64, timeout: Duration) -> Result<Run> {
    let bin: PathBuf = pg_bin.join("pg_recvlogical");
    let started = Instant::now();
    let mut child = Command::new(&bin)
        .args(["-d", dsn, "--slot", slot, "--start", "--no-loop", "-f", "/dev/null"])
        .args(["--endpos", &lsn_text(end_lsn)])
        .args(["-o", "proto_version=1", "-o"])
        .arg(format!("publication_names={}", pgferry_integration_tests::naming::publication_name()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let deadline = started + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            let seconds = started.elapsed().as_secs_f64();
            if !status.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                bail!("pg_recvlogical failed ({status}): {err}");
            }
            return Ok(Run { seconds });
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("pg_recvlogical did not reach {} within {timeout:?}", lsn_text(end_lsn));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
