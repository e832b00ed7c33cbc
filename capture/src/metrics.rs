//! Capture's metrics and health check.
//!
//! Contract: counts (events by kind, bytes, source transactions) are held back while a Kafka
//! transaction is open and added when it commits, so they equal what a `read_committed` consumer
//! can read — an aborted batch that is produced again after a restart is counted once. The lag
//! gauge is `now − origin time of the last committed source transaction or heartbeat`, computed
//! at scrape (so an idle node reads between 0 and the heartbeat interval). Capture is healthy
//! while its replication stream is connected and a Kafka transaction committed (or the stream
//! connected) within [`COMMIT_STALE_AFTER`] and no commit has been waiting longer than
//! [`COMMIT_STUCK_AFTER`]; heartbeats make a commit every few seconds.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgferry_connectors::metrics::{now_us, Counter, Gauge, Histogram, MetricsRegistry, LATENCY_BUCKETS};
use pgferry_connectors::postgres;

/// Capture is unhealthy when nothing committed to Kafka for this long while connected.
pub const COMMIT_STALE_AFTER: Duration = Duration::from_secs(30);

/// Capture is unhealthy while one Kafka transaction commit (with the deliveries it waits for)
/// has been waiting this long: the broker is away (commits take milliseconds otherwise).
pub const COMMIT_STUCK_AFTER: Duration = Duration::from_secs(5);

/// State shared by every handle of one node's capture (and its health check).
struct Shared {
    registry: MetricsRegistry,
    node: String,
    bytes: Counter,
    source_txns: Counter,
    kafka_txns: Counter,
    produce_latency: Histogram,
    commit_latency: Histogram,
    slot_retained: Gauge,
    too_large: Counter,
    splits: Counter,
    /// Set while capture cannot get past an event Kafka refuses as too large: the commit LSN of
    /// its source transaction and the error. Cleared by a commit past that LSN.
    stuck: std::sync::Mutex<Option<(u64, String)>>,
    /// Origin time (µs since the epoch) of the last committed transaction or heartbeat; 0: none.
    last_origin_us: AtomicI64,
    connected: AtomicBool,
    /// The last error capture stopped with (already scrubbed of secrets).
    last_error: std::sync::Mutex<Option<String>>,
    /// Last successful commit or stream connection, as µs since `started`.
    last_ok_us: AtomicI64,
    /// When the commit in progress began, as µs since `started` (plus one); 0: none.
    committing_since_us: AtomicI64,
    started: Instant,
}

impl Shared {
    fn mark_ok(&self) {
        self.last_ok_us
            .store(self.started.elapsed().as_micros() as i64, Ordering::Relaxed);
    }
}

/// Counts of the open Kafka transaction.
#[derive(Clone, Default)]
struct Pending {
    events: Vec<(String, u64)>,
    bytes: u64,
    source_txns: u64,
    last_origin_us: i64,
}

/// The metrics handle capture updates. Cloning shares the series; each clone holds back its
/// own open-transaction counts.
#[derive(Clone)]
pub struct CaptureMetrics {
    shared: Arc<Shared>,
    pending: Pending,
}

impl std::fmt::Debug for CaptureMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CaptureMetrics({})", self.shared.node)
    }
}

impl Default for CaptureMetrics {
    /// Metrics into a registry nobody serves.
    fn default() -> Self {
        CaptureMetrics::new(&MetricsRegistry::new(), "")
    }
}

impl CaptureMetrics {
    /// Registers capture's series and health check for `node` in `registry`.
    pub fn new(registry: &MetricsRegistry, node: &str) -> CaptureMetrics {
        let l = [("node", node)];
        let shared = Arc::new(Shared {
            registry: registry.clone(),
            node: node.to_string(),
            bytes: registry.counter(
                "pgferry_capture_bytes_total",
                "Bytes (key + value) of the events capture committed to Kafka.",
                &l,
            ),
            source_txns: registry.counter(
                "pgferry_capture_source_transactions_total",
                "Source transactions capture committed to Kafka.",
                &l,
            ),
            kafka_txns: registry.counter(
                "pgferry_capture_kafka_transactions_total",
                "Kafka transactions capture committed.",
                &l,
            ),
            produce_latency: registry.histogram(
                "pgferry_capture_kafka_produce_latency_seconds",
                "Time from producing a message to its delivery report.",
                &l,
                LATENCY_BUCKETS,
            ),
            commit_latency: registry.histogram(
                "pgferry_capture_kafka_commit_latency_seconds",
                "Duration of Kafka commit_transaction calls that succeeded.",
                &l,
                LATENCY_BUCKETS,
            ),
            slot_retained: registry.gauge(
                "pgferry_capture_slot_retained_wal_bytes",
                "WAL the node keeps for capture's slot: pg_current_wal_lsn() - restart_lsn.",
                &l,
            ),
            too_large: registry.counter(
                "pgferry_capture_events_too_large_total",
                "Times capture stopped on an event over Kafka's size limits (producer message.max.bytes, topic max.message.bytes).",
                &l,
            ),
            splits: registry.counter(
                "pgferry_capture_transaction_splits_total",
                "Kafka transactions capture committed in the middle of a source transaction, to stay within transaction.timeout.ms.",
                &l,
            ),
            stuck: Default::default(),
            last_origin_us: AtomicI64::new(0),
            connected: AtomicBool::new(false),
            last_error: Default::default(),
            last_ok_us: AtomicI64::new(0),
            committing_since_us: AtomicI64::new(0),
            started: Instant::now(),
        });
        let s = shared.clone();
        registry.gauge_fn(
            "pgferry_capture_lag_seconds",
            "Now minus the origin commit time of the last source transaction (or heartbeat) committed to Kafka.",
            &l,
            Arc::new(move || {
                let t = s.last_origin_us.load(Ordering::Relaxed);
                (t != 0).then(|| (now_us() - t).max(0) as f64 / 1e6)
            }),
        );
        let s = shared.clone();
        registry.register_health(
            "capture",
            node,
            Arc::new(move || {
                if let Some((_, why)) = s.stuck.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                    return Err(format!("capture is stuck: {why}"));
                }
                if !s.connected.load(Ordering::Relaxed) {
                    let last = s.last_error.lock().unwrap_or_else(|p| p.into_inner());
                    return Err(match last.as_deref() {
                        Some(e) => format!("replication stream not connected (last error: {e})"),
                        None => "replication stream not connected".into(),
                    });
                }
                let now = s.started.elapsed().as_micros() as i64;
                let committing = s.committing_since_us.load(Ordering::Relaxed);
                if committing != 0 && now - committing > COMMIT_STUCK_AFTER.as_micros() as i64 {
                    return Err(format!(
                        "a Kafka transaction commit has been waiting for {} s (Kafka unreachable?)",
                        (now - committing) / 1_000_000
                    ));
                }
                let since_ok = now - s.last_ok_us.load(Ordering::Relaxed);
                if since_ok > COMMIT_STALE_AFTER.as_micros() as i64 {
                    return Err(format!("no Kafka transaction committed for {} s", since_ok / 1_000_000));
                }
                Ok(())
            }),
        );
        CaptureMetrics {
            shared,
            pending: Pending::default(),
        }
    }

    /// Records why capture stopped (shown by `/healthz` while it is unhealthy).
    pub fn failed(&self, error: &str) {
        *self.shared.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
    }

    /// Capture stopped on an event Kafka refuses as too large, in the source transaction
    /// committed at `commit_lsn`: counted, and `/healthz` says `why` until a Kafka transaction
    /// commits past that transaction ([`CaptureMetrics::produced_up_to`]).
    pub fn event_too_large(&self, commit_lsn: u64, why: &str) {
        self.shared.too_large.inc();
        *self.shared.stuck.lock().unwrap_or_else(|p| p.into_inner()) = Some((commit_lsn, why.to_string()));
    }

    /// A Kafka transaction committed with every source transaction up to commit LSN `lsn`.
    pub fn produced_up_to(&self, lsn: u64) {
        let mut stuck = self.shared.stuck.lock().unwrap_or_else(|p| p.into_inner());
        if stuck.as_ref().is_some_and(|(at, _)| *at <= lsn) {
            *stuck = None;
        }
    }

    /// A Kafka transaction was committed in the middle of a source transaction.
    pub fn transaction_split(&self) {
        self.shared.splits.inc();
    }

    /// The produce-latency histogram, for the producer's delivery reports.
    pub fn produce_latency(&self) -> Histogram {
        self.shared.produce_latency.clone()
    }

    /// Marks the replication stream connected until the guard is dropped.
    pub fn connected(&self) -> ConnectedGuard {
        self.shared.mark_ok();
        self.shared.connected.store(true, Ordering::Relaxed);
        ConnectedGuard(self.shared.clone())
    }

    /// One event of `kind` (`change`, `truncate`, `heartbeat`, …) was produced into the open
    /// Kafka transaction.
    pub fn produced(&mut self, kind: &str, key: Option<&[u8]>, value: &[u8]) {
        self.pending.bytes += (key.map_or(0, <[u8]>::len) + value.len()) as u64;
        match self.pending.events.iter_mut().find(|(k, _)| k == kind) {
            Some((_, n)) => *n += 1,
            None => self.pending.events.push((kind.to_string(), 1)),
        }
    }

    /// A source transaction that committed at `commit_ts_us` (µs since the epoch) was produced.
    pub fn source_txn(&mut self, commit_ts_us: i64) {
        self.pending.source_txns += 1;
        self.pending.last_origin_us = self.pending.last_origin_us.max(commit_ts_us);
    }

    /// A heartbeat stamped `ts_us` was produced.
    pub fn heartbeat(&mut self, ts_us: i64) {
        self.pending.last_origin_us = self.pending.last_origin_us.max(ts_us);
    }

    /// Runs `commit` (Kafka's commit_transaction); on success records its latency and adds the
    /// held-back counts.
    pub fn commit<T, E>(&mut self, commit: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let started = Instant::now();
        let since = self.shared.started.elapsed().as_micros() as i64 + 1;
        self.shared.committing_since_us.store(since, Ordering::Relaxed);
        let result = commit();
        self.shared.committing_since_us.store(0, Ordering::Relaxed);
        if result.is_ok() {
            let s = &self.shared;
            s.commit_latency.observe(started.elapsed().as_secs_f64());
            s.kafka_txns.inc();
            s.mark_ok();
            let p = std::mem::take(&mut self.pending);
            for (kind, n) in p.events {
                s.registry
                    .counter(
                        "pgferry_capture_events_total",
                        "Events capture committed to Kafka, by kind (change, truncate, heartbeat).",
                        &[("node", &s.node), ("kind", &kind)],
                    )
                    .inc_by(n);
            }
            s.bytes.inc_by(p.bytes);
            s.source_txns.inc_by(p.source_txns);
            if p.last_origin_us != 0 {
                s.last_origin_us.fetch_max(p.last_origin_us, Ordering::Relaxed);
            }
        }
        result
    }

    /// Sets the slot's retained WAL (None: unknown, e.g. the slot is gone).
    fn set_slot_retained(&self, bytes: Option<f64>) {
        match bytes {
            Some(b) => self.shared.slot_retained.set(b),
            None => self.shared.slot_retained.unset(),
        }
    }
}

/// Keeps the replication stream marked connected; dropping it marks it disconnected.
pub struct ConnectedGuard(Arc<Shared>);

impl Drop for ConnectedGuard {
    fn drop(&mut self) {
        self.0.connected.store(false, Ordering::Relaxed);
    }
}

/// Polls `pg_current_wal_lsn() - restart_lsn` of `slot` every `every` on its own session and
/// publishes it as `pgferry_capture_slot_retained_wal_bytes`. Runs until aborted; failures are
/// logged and retried on the next tick (the gauge is cleared meanwhile).
pub async fn poll_slot_retained_wal(metrics: CaptureMetrics, dsn: String, slot: String, every: Duration) {
    let node = metrics.shared.node.clone();
    let mut session = None;
    let mut warned = false;
    loop {
        if session.is_none() {
            match postgres::connect(&dsn, &format!("pgferry-metrics-{node}")).await {
                Ok(s) => session = Some(s),
                Err(e) => {
                    if !warned {
                        tracing::warn!(%node, error = %e, "slot metrics: cannot connect");
                        warned = true;
                    }
                    metrics.set_slot_retained(None);
                }
            }
        }
        if let Some(s) = &session {
            let row = s
                .client
                .query_opt(
                    "SELECT (pg_current_wal_lsn() - restart_lsn)::float8 FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await;
            match row {
                Ok(row) => {
                    warned = false;
                    metrics.set_slot_retained(row.and_then(|r| r.get::<_, Option<f64>>(0)));
                }
                Err(e) => {
                    tracing::warn!(%node, %slot, error = %e, "slot metrics: query failed");
                    metrics.set_slot_retained(None);
                    session = None;
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_committed_batches() {
        let registry = MetricsRegistry::new();
        let mut m = CaptureMetrics::new(&registry, "n1");
        m.produced("change", None, &[0; 100]);
        m.produced("change", Some(&[0; 10]), &[0; 40]);
        m.source_txn(now_us());
        let _ = m.commit(|| Err::<(), ()>(()));
        // A failed commit keeps the counts held back; a new handle (after restart) starts empty.
        let mut m = CaptureMetrics::new(&registry, "n1");
        assert!(!registry.render().contains("pgferry_capture_events_total{"));
        m.produced("change", Some(&[0; 4]), &[0; 6]);
        m.produced("heartbeat", None, &[0; 5]);
        m.source_txn(now_us() - 2_000_000);
        m.commit(|| Ok::<(), ()>(())).unwrap();
        let text = registry.render();
        assert!(
            text.contains("pgferry_capture_events_total{node=\"n1\",kind=\"change\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("pgferry_capture_events_total{node=\"n1\",kind=\"heartbeat\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("pgferry_capture_bytes_total{node=\"n1\"} 15\n"), "{text}");
        assert!(
            text.contains("pgferry_capture_source_transactions_total{node=\"n1\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("pgferry_capture_kafka_transactions_total{node=\"n1\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("pgferry_capture_lag_seconds{node=\"n1\"} 2."), "{text}");
    }

    #[test]
    fn healthy_while_connected() {
        let registry = MetricsRegistry::new();
        let m = CaptureMetrics::new(&registry, "n1");
        assert!(registry.health().unwrap_err().contains("not connected"));
        m.failed("Kafka at k:9092: down");
        assert!(registry
            .health()
            .unwrap_err()
            .contains("(last error: Kafka at k:9092: down)"));
        let guard = m.connected();
        assert!(registry.health().is_ok());
        drop(guard);
        assert!(registry.health().is_err());
    }
    #[test]
    fn stuck_on_a_too_large_event_until_produced_past_it() {
        let registry = MetricsRegistry::new();
        let m = CaptureMetrics::new(&registry, "n1");
        let _guard = m.connected();
        assert!(registry
            .render()
            .contains("pgferry_capture_events_too_large_total{node=\"n1\"} 0"));
        m.event_too_large(100, "node n1: a change of public.big … over …");
        let why = registry.health().unwrap_err();
        assert!(
            why.contains("capture is stuck: node n1: a change of public.big"),
            "{why}"
        );
        assert!(registry
            .render()
            .contains("pgferry_capture_events_too_large_total{node=\"n1\"} 1"));
        m.produced_up_to(99);
        assert!(registry.health().is_err(), "still before the transaction");
        m.produced_up_to(100);
        assert!(registry.health().is_ok());
    }
}
