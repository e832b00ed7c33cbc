//! Steady-state latency: pgbench writes on node 1 at a fixed rate while a probe inserts a row
//! into `bench_probe` every 50 ms (its own session, synchronous commit) and a reader on node 2
//! looks for new probe rows every 2 ms. The probe starts after [`WARMUP`] of load: a system's
//! replication has just been started (or resumed) before its runs, and what its first second
//! costs (pgferry: registering and fetching schemas, preparing statements; a native apply
//! worker: filling its caches) is start-up, not the steady state measured here. A probe's
//! latency runs from its COMMIT returning on node 1 to the reader seeing the row on node 2,
//! both on this process's monotonic clock (so a figure is at most ~2 ms plus one query late).

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::replication::{self, Replication};
use crate::report::Outcome;
use crate::workload::{self, Pace, Pgbench, PgbenchRun, Workload};

/// pgbench connections of a latency run.
const CLIENTS: u64 = 8;

/// A probe every this long.
const PROBE_EVERY: Duration = Duration::from_millis(50);
/// The reader looks for new probes every this long.
const READ_EVERY: Duration = Duration::from_millis(2);
/// Load before the first probe (not measured).
pub const WARMUP: Duration = Duration::from_secs(2);
/// How long after the workload ends the last probes may take to arrive.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// Latency figures of one run.
#[derive(Debug, Clone)]
pub struct Latency {
    /// What pgbench reached.
    pub pgbench: PgbenchRun,
    /// Probes written (every one was seen).
    pub probes: usize,
    /// Median, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, milliseconds.
    pub p99_ms: f64,
    /// Maximum, milliseconds.
    pub max_ms: f64,
}

/// One latency run of `workload` at `rate` tps for `seconds`, logged on stderr; a failure is
/// the outcome's.
pub async fn run(
    replication: &mut Replication,
    pgbench: &Pgbench,
    workload: Workload,
    rate: u64,
    seconds: u64,
) -> Outcome<Latency> {
    let system = replication.system;
    eprintln!(
        "[bench] {}: {} at {rate} tps for {seconds} s with the latency probe",
        system.label(),
        workload.label()
    );
    let measured = measure(replication, pgbench, workload, rate, seconds).await;
    if let Ok(l) = &measured {
        eprintln!(
            "[bench] {}: pgbench {:.0} tps, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            system.label(),
            l.pgbench.tps,
            l.p50_ms,
            l.p99_ms,
            l.max_ms
        );
    }
    Outcome::of(measured, system, "latency")
}

/// Runs `workload` at `rate` tps for `seconds` on node 1 of `replication` (running) with
/// the probe, and measures commit-on-n1 → visible-on-n2.
async fn measure(
    replication: &mut Replication,
    pgbench: &Pgbench,
    workload: Workload,
    rate: u64,
    seconds: u64,
) -> Result<Latency> {
    let writer = replication.sql(0).await?;
    let reader = replication.sql(1).await?;
    // Probe ids go on from earlier runs on the same tables.
    let first: i64 = writer
        .query_one("SELECT coalesce(max(id), 0) + 1 FROM bench_probe", &[])
        .await
        .context("reading the last probe id")?
        .get(0);
    // The last probe id the reader waits for; unknown until the probe is done.
    let last = AtomicI64::new(i64::MAX);
    let dsn = replication.cluster.nodes[0].dsn.clone();
    let pace = Pace::Rate {
        clients: CLIENTS,
        tps: rate,
        seconds: seconds + WARMUP.as_secs(),
    };
    let load = pgbench.run(&dsn, workload, pace);
    let probe = async {
        let mut committed: Vec<(Instant, std::time::SystemTime)> = Vec::new();
        tokio::time::sleep(WARMUP).await;
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = Instant::now() + Duration::from_secs(seconds);
        let written = async {
            while Instant::now() < end {
                tick.tick().await;
                let id = first + committed.len() as i64;
                writer
                    .execute("INSERT INTO bench_probe (id) VALUES ($1)", &[&id])
                    .await
                    .context("writing a probe")?;
                committed.push((Instant::now(), std::time::SystemTime::now()));
            }
            anyhow::Ok(())
        }
        .await;
        // Also on failure: the reader must stop.
        last.store(first + committed.len() as i64 - 1, Ordering::SeqCst);
        written.map(|()| committed)
    };
    let read = async {
        let mut seen: Vec<Instant> = Vec::new();
        let mut deadline: Option<Instant> = None;
        loop {
            let rows = reader
                .query("SELECT id FROM bench_probe WHERE id >= $1 ORDER BY id", &[&(first + seen.len() as i64)])
                .await
                .context("reading probes on n2")?;
            let now = Instant::now();
            for r in rows {
                let id: i64 = r.get(0);
                // Probes commit one after another, so they become visible in id order.
                if id == first + seen.len() as i64 {
                    seen.push(now);
                }
            }
            let want = last.load(Ordering::SeqCst);
            if first + seen.len() as i64 > want {
                return anyhow::Ok(seen);
            }
            if want != i64::MAX {
                let deadline = *deadline.get_or_insert(now + DRAIN_TIMEOUT);
                if now > deadline {
                    bail!(
                        "{}: {} of {} probes on n2 {DRAIN_TIMEOUT:?} after the workload",
                        replication.system.label(),
                        seen.len(),
                        want - first + 1
                    );
                }
            }
            replication.check_services()?;
            tokio::time::sleep(READ_EVERY).await;
        }
    };
    let (ran, committed, seen) = tokio::join!(load, probe, read);
    let (ran, committed, seen) = (ran?, committed?, seen?);
    // Let node 2 catch up with the whole workload before anything else is measured.
    let marker = workload::insert_marker(&writer, workload).await?;
    replication::wait_marker(replication, 1, workload, marker, DRAIN_TIMEOUT).await?;
    let mut ms: Vec<f64> = committed
        .iter()
        .zip(&seen)
        .map(|((c, _), s)| s.saturating_duration_since(*c).as_secs_f64() * 1000.0)
        .collect();
    if ms.is_empty() {
        bail!("no probe was written in {seconds} s");
    }
    log_slowest(&committed, &ms);
    ms.sort_by(f64::total_cmp);
    Ok(Latency {
        pgbench: ran,
        probes: ms.len(),
        p50_ms: percentile(&ms, 50.0),
        p99_ms: percentile(&ms, 99.0),
        max_ms: ms[ms.len() - 1],
    })
}

/// How many of the slowest probes [`log_slowest`] names.
const SLOWEST: usize = 5;

/// Names the slowest probes on stderr with the wall-clock time (UTC) of their commit on node
/// 1, to find what the services logged at that moment.
fn log_slowest(committed: &[(Instant, std::time::SystemTime)], ms: &[f64]) {
    let mut order: Vec<usize> = (0..ms.len()).collect();
    order.sort_by(|a, b| ms[*b].total_cmp(&ms[*a]));
    let slowest: Vec<String> = order
        .iter()
        .take(SLOWEST)
        .map(|&i| {
            let at = committed[i].1.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let day_ms = at.as_millis() % 86_400_000;
            format!(
                "{:.1} ms at {:02}:{:02}:{:02}.{:03}",
                ms[i],
                day_ms / 3_600_000,
                day_ms / 60_000 % 60,
                day_ms / 1000 % 60,
                day_ms % 1000
            )
        })
        .collect();
    eprintln!("[bench] slowest probes (committed on n1, UTC): {}", slowest.join(", "));
}

/// The nearest-rank percentile `p` of sorted, non-empty `sorted`.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 0.0), 1.0);
    }
}
