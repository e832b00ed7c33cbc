//! Apply's metrics and health check, per origin.
//!
//! Contract: rows and truncates are held back while a local transaction is open and counted when
//! it commits, so the counts equal what the node holds — a transaction rolled back and applied
//! again after a restart is counted once. The lag gauge is `now − origin commit time of the last
//! applied transaction`, or of the last heartbeat when no transaction is open, computed at scrape
//! (an idle origin reads between 0 and its heartbeat interval). Apply is healthy when every
//! origin it reads has a running stream and its consumer has not just reported every broker
//! down (see [`KAFKA_DOWN_FOR`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use pgferry_connectors::metrics::{now_us, Counter, MetricsRegistry};
use pgferry_schemas::codec::decode_frame;
use pgferry_schemas::heartbeat::Heartbeat;
use rdkafka::message::{BorrowedMessage, Message};


#[derive(Default)]
struct State {
    /// Origin → its stream's state.
    origins: BTreeMap<String, OriginState>,
    /// The last error apply stopped with (already scrubbed of secrets).
    last_error: Option<String>,
    /// Whether an origin's partition holds messages not applied yet (None: unknown).
    pending: Option<PendingProbe>,
    /// The consumer's last "all brokers down" error.
    kafka_error: Option<String>,
}

/// The state of one origin's stream.
#[derive(Default)]
struct OriginState {
    /// Whether the stream runs.
    running: bool,
    /// Origin time of the last applied transaction or heartbeat in µs (0: none).
    last_origin_us: Arc<AtomicI64>,
    /// Why the stream stopped and waits to retry, until it gets past where it failed.
    waiting: Option<Waiting>,
}

/// An origin's stream that failed and waits to retry (`crate::origin_retry`).
#[derive(Debug, Clone)]
struct Waiting {
    /// The last error (already scrubbed of secrets), on one line.
    reason: String,
    /// When it first failed at this point.
    since: chrono::DateTime<chrono::Utc>,
    /// Failures in a row at this point.
    failures: u64,
    /// When the stream tries again (it is running the retry once this has passed).
    retry_at: std::time::Instant,
}

/// The `/healthz` line of an origin whose stream waits:
/// `origin <name> waits (since <RFC 3339>, <n> failures, <next try>): <reason>`.
fn waiting_line(origin: &str, w: &Waiting) -> String {
    let next = match w.retry_at.checked_duration_since(std::time::Instant::now()) {
        Some(d) if !d.is_zero() => format!("next try in {:.1} s", d.as_secs_f64()),
        _ => "retrying now".to_string(),
    };
    format!(
        "origin {origin} waits (since {}, {} failure{}, {next}): {}",
        w.since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        w.failures,
        if w.failures == 1 { "" } else { "s" },
        w.reason
    )
}

/// The origins a `/healthz` answer names as waiting, each with its reason (the lines
/// [`ApplyMetrics`] writes there; `pgferry status` shows them in its lag matrix).
pub fn waiting_origins(healthz: &str) -> Vec<(String, String)> {
    healthz
        .lines()
        .filter_map(|line| {
            // The first line of a service carries the registry's `<service> <node>: ` prefix.
            let at = line.find("origin ")?;
            let rest = &line[at + "origin ".len()..];
            let (origin, rest) = rest.split_once(" waits (")?;
            if origin.contains(' ') || (at > 0 && !line[..at].ends_with(": ")) {
                return None;
            }
            let (_, reason) = rest.split_once("): ")?;
            Some((origin.to_string(), reason.to_string()))
        })
        .collect()
}

// Counters exported from the start at 0 (per node, or per origin once its stream is set up), so
// a rule such as `increase(…) > 0` sees their first increment.
const DEAD_LETTERS: &str = "pgferry_apply_dead_letters_total";
const DEAD_LETTERS_HELP: &str = "Messages apply could never use, sent to the dead-letter topic and pgferry.exceptions.";
const GROUP_FALLBACKS: &str = "pgferry_apply_group_fallbacks_total";
const GROUP_FALLBACKS_HELP: &str = "Groups that failed and were applied again one transaction at a time.";
const TOMBSTONES_DROPPED: &str = "pgferry_apply_tombstones_dropped_total";
const TOMBSTONES_DROPPED_HELP: &str = "Tombstones dropped once every origin's progress had passed them.";
const RETRIES: &str = "pgferry_apply_origin_retries_total";
const RETRIES_HELP: &str = "Failures of an origin's stream, each followed by a wait and a retry of that stream alone.";
const SKEW_EXCEEDED: &str = "pgferry_apply_clock_skew_exceeded_total";
const SKEW_EXCEEDED_HELP: &str =
    "Source transactions dated further ahead of this node's clock than [apply] max_clock_skew_ms, applied without waiting, per origin.";

/// Apply is unhealthy for this long after its consumer reported every broker down, unless a
/// message arrives first (librdkafka repeats the error about every 10 s while it lasts).
pub const KAFKA_DOWN_FOR: std::time::Duration = std::time::Duration::from_secs(15);

/// Tells whether `origin`'s partition holds messages this node has not applied yet.
pub type PendingProbe = Arc<dyn Fn(&str) -> Option<bool> + Send + Sync>;

struct Shared {
    registry: MetricsRegistry,
    node: String,
    state: Mutex<State>,
    /// When the consumer last reported every broker down (µs since the epoch); 0: a message
    /// arrived since.
    kafka_down_us: AtomicI64,
}

impl Shared {
    /// A message arrived: the brokers are reachable.
    fn kafka_reached(&self) {
        if self.kafka_down_us.load(Ordering::Relaxed) != 0 {
            self.kafka_down_us.store(0, Ordering::Relaxed);
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The metrics of one node's apply; hands out an [`OriginMetrics`] per origin stream.
#[derive(Clone)]
pub struct ApplyMetrics(Arc<Shared>);

impl std::fmt::Debug for ApplyMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApplyMetrics({})", self.0.node)
    }
}

impl Default for ApplyMetrics {
    /// Metrics into a registry nobody serves.
    fn default() -> Self {
        ApplyMetrics::new(&MetricsRegistry::new(), "")
    }
}

impl ApplyMetrics {
    /// Registers apply's health check for `node` in `registry`: unhealthy while an origin's
    /// stream is not running or, with `max_lag_ms`, while an origin lags more than that.
    pub fn new(registry: &MetricsRegistry, node: &str) -> ApplyMetrics {
        ApplyMetrics::with_max_lag(registry, node, None)
    }

    /// [`ApplyMetrics::new`] with a lag limit for the health check.
    pub fn with_max_lag(registry: &MetricsRegistry, node: &str, max_lag_ms: Option<u64>) -> ApplyMetrics {
        let shared = Arc::new(Shared {
            registry: registry.clone(),
            node: node.to_string(),
            state: Mutex::new(State::default()),
            kafka_down_us: AtomicI64::new(0),
        });
        let s = shared.clone();
        registry.register_health(
            "apply",
            node,
            Arc::new(move || {
                let state = s.lock();
                // A waiting stream is not running either; it is named with its reason instead.
                let waiting: Vec<String> = state
                    .origins
                    .iter()
                    .filter_map(|(o, st)| st.waiting.as_ref().map(|w| waiting_line(o, w)))
                    .collect();
                let idle: Vec<&str> = state
                    .origins
                    .iter()
                    .filter(|(_, st)| !st.running && st.waiting.is_none())
                    .map(|(o, _)| o.as_str())
                    .collect();
                let now = now_us();
                let lagging: Vec<String> = match max_lag_ms {
                    Some(max) => state
                        .origins
                        .iter()
                        .filter_map(|(o, st)| {
                            let t = st.last_origin_us.load(Ordering::Relaxed);
                            let lag_ms = (now - t) / 1000;
                            // An origin that sends nothing (down, or idle without heartbeats)
                            // is not this node lagging: only count it while messages wait.
                            let waiting = state.pending.as_ref().and_then(|p| p(o)) != Some(false);
                            (t != 0 && lag_ms > max as i64 && waiting)
                                .then(|| format!("{o} lags {lag_ms} ms (max_apply_lag_ms = {max})"))
                        })
                        .collect(),
                    None => Vec::new(),
                };
                let down_us = s.kafka_down_us.load(Ordering::Relaxed);
                if down_us != 0 && now - down_us < KAFKA_DOWN_FOR.as_micros() as i64 {
                    let e = state.kafka_error.as_deref().unwrap_or("all brokers down");
                    return Err(format!("Kafka unreachable: {e}"));
                }
                let problem = if state.origins.is_empty() {
                    Some("not started".to_string())
                } else if idle.is_empty() && lagging.is_empty() {
                    None
                } else if idle.is_empty() {
                    Some(lagging.join(", "))
                } else {
                    Some(format!("origin stream not running: {}", idle.join(", ")))
                };
                let problem = problem.map(|p| match &state.last_error {
                    Some(e) => format!("{p} (last error: {e})"),
                    None => p,
                });
                // One line per waiting origin, then the rest.
                let lines: Vec<String> = waiting.into_iter().chain(problem).collect();
                if lines.is_empty() {
                    Ok(())
                } else {
                    Err(lines.join("\n"))
                }
            }),
        );
        let l = [("node", node)];
        registry.counter(DEAD_LETTERS, DEAD_LETTERS_HELP, &l);
        registry.counter(GROUP_FALLBACKS, GROUP_FALLBACKS_HELP, &l);
        registry.counter(TOMBSTONES_DROPPED, TOMBSTONES_DROPPED_HELP, &l);
        ApplyMetrics(shared)
    }

    /// Sets how the health check learns whether an origin has messages waiting (apply's
    /// consumer knows its partitions' watermarks).
    pub fn set_pending_probe(&self, probe: PendingProbe) {
        self.0.lock().pending = Some(probe);
    }

    /// Records why apply stopped (shown by `/healthz` while it is unhealthy).
    pub fn failed(&self, error: &str) {
        self.0.lock().last_error = Some(error.to_string());
    }

    /// `origin`'s stream failed with `error` (already scrubbed of secrets) and tries again in
    /// `retry_in`: apply is unhealthy, and `/healthz` names the origin, why, since when and
    /// when it retries, until [`ApplyMetrics::origin_resumed`]. `again`: it failed before at
    /// the same point (the count goes on and `since` stays).
    pub fn origin_waiting(&self, origin: &str, error: &str, retry_in: std::time::Duration, again: bool) {
        {
            let mut state = self.0.lock();
            let st = state.origins.entry(origin.to_string()).or_default();
            let (since, failures) = match (&st.waiting, again) {
                (Some(w), true) => (w.since, w.failures + 1),
                _ => (chrono::Utc::now(), 1),
            };
            st.waiting = Some(Waiting {
                reason: error.replace(['\n', '\r'], " "),
                since,
                failures,
                retry_at: std::time::Instant::now() + retry_in,
            });
        }
        self.0
            .registry
            .counter(RETRIES, RETRIES_HELP, &[("node", self.0.node.as_str()), ("origin", origin)])
            .inc();
    }

    /// Whether `origin`'s stream waits after a failure.
    pub fn is_waiting(&self, origin: &str) -> bool {
        self.0.lock().origins.get(origin).is_some_and(|st| st.waiting.is_some())
    }

    /// `origin`'s stream got past the point where it failed: it no longer waits.
    pub fn origin_resumed(&self, origin: &str) {
        if let Some(st) = self.0.lock().origins.get_mut(origin) {
            st.waiting = None;
        }
    }

    /// The consumer reported that no broker can be reached: unhealthy until a message arrives
    /// (or [`KAFKA_DOWN_FOR`] passes without the error repeating).
    pub fn kafka_down(&self, error: &str) {
        self.0.lock().kafka_error = Some(error.to_string());
        self.0.kafka_down_us.store(now_us(), Ordering::Relaxed);
    }

    /// Tombstones dropped by garbage collection.
    pub fn tombstones_dropped(&self, n: u64) {
        self.0
            .registry
            .counter(TOMBSTONES_DROPPED, TOMBSTONES_DROPPED_HELP, &[("node", self.0.node.as_str())])
            .inc_by(n);
    }

    /// A group of `txns` source transactions was committed as one local transaction.
    pub fn group(&self, txns: usize) {
        self.0
            .registry
            .histogram(
                "pgferry_apply_group_transactions",
                "Source transactions per local transaction of grouped apply.",
                &[("node", self.0.node.as_str())],
                &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0],
            )
            .observe(txns as f64);
    }

    /// A group was written with its read made ahead, while the group before it was written
    /// (`[apply] read_ahead`).
    pub fn group_read_ahead(&self) {
        self.0
            .registry
            .counter(
                "pgferry_apply_groups_read_ahead_total",
                "Groups whose keys were read on the second session while the group before them was written.",
                &[("node", self.0.node.as_str())],
            )
            .inc();
    }

    /// A group failed and its transactions were applied one by one.
    pub fn group_fallback(&self) {
        self.0
            .registry
            .counter(GROUP_FALLBACKS, GROUP_FALLBACKS_HELP, &[("node", self.0.node.as_str())])
            .inc();
    }

    /// A message went to the dead-letter topic (and `pgferry.exceptions`).
    pub fn dead_letter(&self) {
        self.0
            .registry
            .counter(DEAD_LETTERS, DEAD_LETTERS_HELP, &[("node", self.0.node.as_str())])
            .inc();
    }

    /// The origin commit time (µs) up to which `origin`'s stream is known complete here: of
    /// its last applied transaction or, when idle, its last heartbeat. None before either.
    pub fn caught_up_to(&self, origin: &str) -> Option<i64> {
        let state = self.0.lock();
        let t = state.origins.get(origin)?.last_origin_us.load(Ordering::Relaxed);
        (t != 0).then_some(t)
    }

    /// The metrics of `origin`'s stream; from now on apply is unhealthy unless it runs.
    pub fn origin(&self, origin: &str) -> OriginMetrics {
        let s = &self.0;
        let l = [("node", s.node.as_str()), ("origin", origin)];
        let last_origin_us = s.lock().origins.entry(origin.to_string()).or_default().last_origin_us.clone();
        let (shared, o) = (s.clone(), origin.to_string());
        s.registry.gauge_fn(
            "pgferry_apply_origin_waiting",
            "1 while the origin's stream waits to retry a change it failed at (why: /healthz), else 0.",
            &l,
            Arc::new(move || Some(f64::from(u8::from(shared.lock().origins.get(&o).is_some_and(|st| st.waiting.is_some()))))),
        );
        let t = last_origin_us.clone();
        s.registry.gauge_fn(
            "pgferry_apply_lag_seconds",
            "Now minus the origin commit time of the last applied transaction (or last heartbeat when idle), in seconds.",
            &l,
            Arc::new(move || {
                let t = t.load(Ordering::Relaxed);
                (t != 0).then(|| (now_us() - t).max(0) as f64 / 1e6)
            }),
        );
        // Exported from the start at 0, so the first increment shows as one (alerting rules).
        s.registry.counter(RETRIES, RETRIES_HELP, &l);
        s.registry.counter(SKEW_EXCEEDED, SKEW_EXCEEDED_HELP, &l);
        OriginMetrics {
            shared: s.clone(),
            origin: origin.to_string(),
            txns: s.registry.counter(
                "pgferry_apply_transactions_total",
                "Source transactions applied (committed locally), per origin.",
                &l,
            ),
            rows: s.registry.counter(
                "pgferry_apply_rows_total",
                "Row changes written by committed applied transactions, per origin (changes to missing rows are not counted).",
                &l,
            ),
            truncates: s.registry.counter(
                "pgferry_apply_truncates_total",
                "Tables truncated by committed applied transactions, per origin.",
                &l,
            ),
            last_origin_us,
            pending_rows: 0,
            pending_truncates: 0,
            heartbeat_schema: Heartbeat::schema().ok(),
        }
    }
}

/// The metrics handle of one origin stream (one per run of the stream).
pub struct OriginMetrics {
    shared: Arc<Shared>,
    origin: String,
    txns: Counter,
    rows: Counter,
    truncates: Counter,
    last_origin_us: Arc<AtomicI64>,
    pending_rows: u64,
    pending_truncates: u64,
    heartbeat_schema: Option<apache_avro::Schema>,
}

impl OriginMetrics {
    /// Marks the stream running until the guard is dropped.
    pub fn running(&self) -> RunningGuard {
        self.set_running(true);
        RunningGuard {
            shared: self.shared.clone(),
            origin: self.origin.clone(),
        }
    }

    fn set_running(&self, running: bool) {
        if let Some(o) = self.shared.lock().origins.get_mut(&self.origin) {
            o.running = running;
        }
    }

    /// A row change was applied (written, or settled as a conflict) in the open transaction.
    pub fn row(&mut self) {
        self.pending_rows += 1;
    }

    /// `n` row changes were applied in the open transaction.
    pub fn rows(&mut self, n: u64) {
        self.pending_rows += n;
    }

    /// A conflict of type `conflict` was settled by `resolution` (counted at once: its record
    /// in `pgferry.conflicts` commits with the transaction, and a rolled-back one is detected
    /// again when the transaction is retried).
    pub fn conflict(&self, conflict: &str, resolution: &str) {
        self.shared
            .registry
            .counter(
                "pgferry_apply_conflicts_total",
                "Conflicts detected, by origin, type and resolution.",
                &[
                    ("node", self.shared.node.as_str()),
                    ("origin", self.origin.as_str()),
                    ("type", conflict),
                    ("resolution", resolution),
                ],
            )
            .inc();
    }

    /// Apply waited `waited` for this node's clock to pass the commit time of a source
    /// transaction (or group) of this origin dated in its future (`crate::clock_skew`).
    pub fn clock_skew_wait(&self, waited: std::time::Duration) {
        self.shared
            .registry
            .histogram(
                "pgferry_apply_clock_skew_wait_seconds",
                "Waits for this node's clock to pass the commit time of a source transaction dated in its future, per origin (count and total seconds).",
                &[("node", self.shared.node.as_str()), ("origin", self.origin.as_str())],
                pgferry_connectors::metrics::LATENCY_BUCKETS,
            )
            .observe(waited.as_secs_f64());
    }

    /// A source transaction of this origin was dated further ahead of this node's clock than
    /// `[apply] max_clock_skew_ms` and was applied without waiting.
    pub fn clock_skew_exceeded(&self) {
        self.shared
            .registry
            .counter(
                SKEW_EXCEEDED,
                SKEW_EXCEEDED_HELP,
                &[("node", self.shared.node.as_str()), ("origin", self.origin.as_str())],
            )
            .inc();
    }

    /// A table was truncated in the open transaction.
    pub fn truncate(&mut self) {
        self.pending_truncates += 1;
    }

    /// The open transaction, committed at `commit_ts_us` on the origin, committed locally.
    pub fn txn_applied(&mut self, commit_ts_us: i64) {
        self.shared.kafka_reached();
        self.txns.inc();
        self.rows.inc_by(std::mem::take(&mut self.pending_rows));
        self.truncates.inc_by(std::mem::take(&mut self.pending_truncates));
        self.last_origin_us.fetch_max(commit_ts_us, Ordering::Relaxed);
    }

    /// A heartbeat arrived while no transaction was open: the stream is caught up to its
    /// `ts_us` (the Kafka create time if the record does not decode).
    pub fn heartbeat(&mut self, msg: &BorrowedMessage<'_>) {
        self.shared.kafka_reached();
        let decoded = self.heartbeat_schema.as_ref().and_then(|schema| {
            let (_, datum) = decode_frame(msg.payload()?).ok()?;
            Heartbeat::decode(schema, datum).ok()
        });
        let ts_us = match decoded {
            Some(hb) => hb.ts_us,
            None => match msg.timestamp().to_millis() {
                Some(ms) => ms * 1000,
                None => return,
            },
        };
        self.last_origin_us.fetch_max(ts_us, Ordering::Relaxed);
    }
}

/// Keeps an origin stream marked running; dropping it (the stream ended) marks it stopped.
pub struct RunningGuard {
    shared: Arc<Shared>,
    origin: String,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        if let Some(o) = self.shared.lock().origins.get_mut(&self.origin) {
            o.running = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_committed_transactions_and_tracks_health() {
        let registry = MetricsRegistry::new();
        let apply = ApplyMetrics::new(&registry, "n2");
        assert!(registry.health().unwrap_err().contains("not started"));
        let mut m = apply.origin("n1");
        // Counters of rare events are there from the start, at 0.
        let text = registry.render();
        for series in [
            "pgferry_apply_dead_letters_total{node=\"n2\"} 0\n",
            "pgferry_apply_group_fallbacks_total{node=\"n2\"} 0\n",
            "pgferry_apply_tombstones_dropped_total{node=\"n2\"} 0\n",
            "pgferry_apply_origin_retries_total{node=\"n2\",origin=\"n1\"} 0\n",
            "pgferry_apply_clock_skew_exceeded_total{node=\"n2\",origin=\"n1\"} 0\n",
        ] {
            assert!(text.contains(series), "{series}{text}");
        }
        apply.failed("PostgreSQL at x: down");
        let e = registry.health().unwrap_err();
        assert!(e.contains("not running: n1") && e.contains("down"), "{e}");
        let running = m.running();
        assert!(registry.health().is_ok());

        m.row();
        m.row();
        m.truncate();
        // Rolled back: a new handle (the restarted stream) does not carry the held-back counts.
        drop(running);
        assert!(registry.health().is_err());
        let mut m = apply.origin("n1");
        let _running = m.running();
        m.row();
        m.row();
        m.conflict("insert_exists", "apply_remote");
        m.txn_applied(now_us() - 1_500_000);
        let text = registry.render();
        assert!(
            text.contains("pgferry_apply_transactions_total{node=\"n2\",origin=\"n1\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("pgferry_apply_rows_total{node=\"n2\",origin=\"n1\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("pgferry_apply_truncates_total{node=\"n2\",origin=\"n1\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("pgferry_apply_conflicts_total{node=\"n2\",origin=\"n1\",type=\"insert_exists\",resolution=\"apply_remote\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("pgferry_apply_lag_seconds{node=\"n2\",origin=\"n1\"} 1.5"),
            "{text}"
        );
        assert!(
            text.contains("pgferry_healthy{node=\"n2\",service=\"apply\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn names_a_waiting_origin_and_why_until_it_resumes() {
        let registry = MetricsRegistry::new();
        let apply = ApplyMetrics::new(&registry, "n1");
        let m2 = apply.origin("n2");
        let _running2 = m2.running();
        let m3 = apply.origin("n3");
        let running3 = m3.running();
        assert!(registry.health().is_ok());
        // n3's stream fails twice at the same change; n2's runs on.
        drop(running3);
        let reason = "origin n3: table public.t: change rejected (on_error = stop): new row violates check constraint \"not_bad\"\nsecond line";
        apply.origin_waiting("n3", reason, std::time::Duration::from_secs(4), false);
        apply.origin_waiting("n3", reason, std::time::Duration::from_secs(8), true);
        assert!(apply.is_waiting("n3") && !apply.is_waiting("n2"));
        let e = registry.health().unwrap_err();
        assert!(e.starts_with("apply n1: origin n3 waits (since "), "{e}");
        assert!(e.contains("2 failures, next try in ") && e.contains("not_bad") && e.contains("second line"), "{e}");
        assert!(!e.contains("n2") && !e.contains("not running"), "only the waiting origin is named: {e}");
        let waiting = waiting_origins(&e);
        assert_eq!(waiting.len(), 1, "{waiting:?}");
        assert_eq!(waiting[0].0, "n3");
        assert!(waiting[0].1.starts_with("origin n3: table public.t: change rejected") && waiting[0].1.ends_with("second line"), "{waiting:?}");
        let text = registry.render();
        assert!(text.contains("pgferry_apply_origin_waiting{node=\"n1\",origin=\"n3\"} 1\n"), "{text}");
        assert!(text.contains("pgferry_apply_origin_waiting{node=\"n1\",origin=\"n2\"} 0\n"), "{text}");
        assert!(text.contains("pgferry_apply_origin_retries_total{node=\"n1\",origin=\"n3\"} 2\n"), "{text}");
        // Past the change: healthy again.
        let _running3 = m3.running();
        apply.origin_resumed("n3");
        assert!(registry.health().is_ok());
        assert!(registry.render().contains("pgferry_apply_origin_waiting{node=\"n1\",origin=\"n3\"} 0\n"));
        // A line that is not a waiting origin's is not taken for one.
        assert!(waiting_origins("apply n1: origin stream not running: n2 (last error: x)").is_empty());
    }

    #[test]
    fn counts_clock_skew_waits_and_excesses() {
        let registry = MetricsRegistry::new();
        let apply = ApplyMetrics::new(&registry, "n2");
        let m = apply.origin("n1");
        m.clock_skew_wait(std::time::Duration::from_millis(1500));
        m.clock_skew_wait(std::time::Duration::from_millis(500));
        m.clock_skew_exceeded();
        let text = registry.render();
        let l = "{node=\"n2\",origin=\"n1\"}";
        assert!(text.contains(&format!("pgferry_apply_clock_skew_wait_seconds_count{l} 2\n")), "{text}");
        assert!(text.contains(&format!("pgferry_apply_clock_skew_wait_seconds_sum{l} 2\n")), "{text}");
        assert!(text.contains(&format!("pgferry_apply_clock_skew_exceeded_total{l} 1\n")), "{text}");
    }

    #[test]
    fn unhealthy_while_every_broker_is_down_until_a_message_arrives() {
        let registry = MetricsRegistry::new();
        let apply = ApplyMetrics::new(&registry, "n2");
        let mut m = apply.origin("n1");
        let _running = m.running();
        assert!(registry.health().is_ok());
        apply.kafka_down("AllBrokersDown (Local: All broker connections are down)");
        let e = registry.health().unwrap_err();
        assert!(e.contains("Kafka unreachable: AllBrokersDown"), "{e}");
        m.txn_applied(now_us());
        assert!(registry.health().is_ok());
    }

    #[test]
    fn unhealthy_while_an_origin_lags_past_the_limit() {
        let registry = MetricsRegistry::new();
        let apply = ApplyMetrics::with_max_lag(&registry, "n2", Some(1000));
        let mut m = apply.origin("n1");
        let _running = m.running();
        assert!(registry.health().is_ok(), "no figure yet: not judged");
        m.txn_applied(now_us() - 5_000_000);
        let e = registry.health().unwrap_err();
        assert!(e.contains("n1 lags") && e.contains("max_apply_lag_ms = 1000"), "{e}");
        m.txn_applied(now_us());
        assert!(registry.health().is_ok());
        // Behind, but its stream receives nothing (the origin is down): not this node's lag.
        let mut m3 = apply.origin("n3");
        let _running3 = m3.running();
        m3.txn_applied(now_us() - 5_000_000);
        apply.set_pending_probe(Arc::new(|_| Some(false)));
        assert!(registry.health().is_ok());
        apply.set_pending_probe(Arc::new(|_| Some(true)));
        assert!(registry.health().is_err());
    }
}
