//! The process's metrics registry and health checks, rendered in the Prometheus text
//! exposition format (version 0.0.4) by [`MetricsRegistry::render`] and served by
//! [`crate::http_endpoint`].
//!
//! Contract: a [`MetricsRegistry`] is cheap to clone and shared by every service of the process.
//! Asking for a series (family name + label set) that exists returns the same series, so a
//! service that restarts keeps counting where it left off; counters never go down. Series are
//! updated with atomics (no lock on the hot path); the registry lock is taken only to create a
//! series and to render. A gauge whose value is NaN is left out of the output (used for "not
//! known yet"). Health: each service registers a check; the process is healthy when every
//! check passes. Nothing here panics or blocks.
//!
//! Hand-written rather than the `prometheus-client` crate: the text format is a few lines of
//! code, and it keeps the dependency tree (and build time on small machines) unchanged.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Default latency buckets in seconds (1 ms … 10 s).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A monotonically increasing count.
#[derive(Clone, Debug, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.inc_by(1);
    }
    /// Adds `n`.
    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The current count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (an `f64`; NaN means "unknown" and is not rendered).
#[derive(Clone, Debug)]
pub struct Gauge(Arc<AtomicU64>);

impl Default for Gauge {
    fn default() -> Self {
        Gauge(Arc::new(AtomicU64::new(f64::NAN.to_bits())))
    }
}

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    /// Marks the value unknown (the series disappears from the output).
    pub fn unset(&self) {
        self.set(f64::NAN);
    }
    /// The current value (NaN when unknown).
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// A gauge computed when scraped; `None` leaves the series out.
pub type GaugeFn = Arc<dyn Fn() -> Option<f64> + Send + Sync>;

/// A distribution of observations in fixed cumulative buckets.
#[derive(Clone, Debug)]
pub struct Histogram(Arc<HistogramInner>);

#[derive(Debug)]
struct HistogramInner {
    bounds: Vec<f64>,
    /// Non-cumulative count per bucket; the last one is `+Inf`.
    buckets: Vec<AtomicU64>,
    sum_bits: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// A histogram with upper bounds `bounds` (ascending) plus `+Inf`.
    pub fn new(bounds: &[f64]) -> Histogram {
        Histogram(Arc::new(HistogramInner {
            bounds: bounds.to_vec(),
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_bits: AtomicU64::new(0f64.to_bits()),
            count: AtomicU64::new(0),
        }))
    }

    /// Records one observation (NaN is ignored).
    pub fn observe(&self, v: f64) {
        if v.is_nan() {
            return;
        }
        let h = &self.0;
        let i = h.bounds.iter().position(|b| v <= *b).unwrap_or(h.bounds.len());
        if let Some(b) = h.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        let mut cur = h.sum_bits.load(Ordering::Relaxed);
        loop {
            let new = (f64::from_bits(cur) + v).to_bits();
            match h
                .sum_bits
                .compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        h.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.0.count.load(Ordering::Relaxed)
    }

    /// Sum of the observations so far.
    pub fn sum(&self) -> f64 {
        f64::from_bits(self.0.sum_bits.load(Ordering::Relaxed))
    }
}

/// A health check: `Ok` when healthy, else the reason.
pub type HealthCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

enum Series {
    Counter(Counter),
    Gauge(Gauge),
    GaugeFn(GaugeFn),
    Histogram(Histogram),
}

type Labels = Vec<(String, String)>;

struct Family {
    help: String,
    kind: Kind,
    series: BTreeMap<Labels, Series>,
}

#[derive(Default)]
struct Inner {
    families: BTreeMap<String, Family>,
    /// (service, node) → check.
    health: BTreeMap<(String, String), HealthCheck>,
}

/// The metrics and health checks of one process.
#[derive(Clone, Default)]
pub struct MetricsRegistry(Arc<Mutex<Inner>>);

impl std::fmt::Debug for MetricsRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsRegistry")
    }
}

fn owned(labels: &[(&str, &str)]) -> Labels {
    labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

impl MetricsRegistry {
    /// An empty registry.
    pub fn new() -> MetricsRegistry {
        MetricsRegistry::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves consistent data (plain inserts).
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Finds or creates the series `name{labels}`; `make` builds a new one, `get` extracts an
    /// existing one of the right type. A name registered with another type yields a detached
    /// series (logged), never a panic.
    fn series<T>(
        &self,
        name: &str,
        help: &str,
        kind: Kind,
        labels: &[(&str, &str)],
        make: impl FnOnce() -> (T, Series),
        get: impl FnOnce(&Series) -> Option<T>,
    ) -> T {
        let mut inner = self.lock();
        let family = inner.families.entry(name.to_string()).or_insert_with(|| Family {
            help: help.to_string(),
            kind,
            series: BTreeMap::new(),
        });
        if family.kind != kind {
            tracing::warn!(
                metric = name,
                "metric registered twice with different types; not exported"
            );
            return make().0;
        }
        let labels = owned(labels);
        if let Some(existing) = family.series.get(&labels).and_then(get) {
            return existing;
        }
        let (handle, series) = make();
        family.series.insert(labels, series);
        handle
    }

    /// The counter `name{labels}`.
    pub fn counter(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Counter {
        self.series(
            name,
            help,
            Kind::Counter,
            labels,
            || {
                let c = Counter::default();
                (c.clone(), Series::Counter(c))
            },
            |s| match s {
                Series::Counter(c) => Some(c.clone()),
                _ => None,
            },
        )
    }

    /// The gauge `name{labels}` (starts unknown: not rendered until set).
    pub fn gauge(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Gauge {
        self.series(
            name,
            help,
            Kind::Gauge,
            labels,
            || {
                let g = Gauge::default();
                (g.clone(), Series::Gauge(g))
            },
            |s| match s {
                Series::Gauge(g) => Some(g.clone()),
                _ => None,
            },
        )
    }

    /// A gauge computed by `f` at every scrape; registering the same series again replaces `f`.
    pub fn gauge_fn(&self, name: &str, help: &str, labels: &[(&str, &str)], f: GaugeFn) {
        let mut inner = self.lock();
        let family = inner.families.entry(name.to_string()).or_insert_with(|| Family {
            help: help.to_string(),
            kind: Kind::Gauge,
            series: BTreeMap::new(),
        });
        if family.kind != Kind::Gauge {
            tracing::warn!(
                metric = name,
                "metric registered twice with different types; not exported"
            );
            return;
        }
        family.series.insert(owned(labels), Series::GaugeFn(f));
    }

    /// The histogram `name{labels}` with `bounds` (used only when the series is created).
    pub fn histogram(&self, name: &str, help: &str, labels: &[(&str, &str)], bounds: &[f64]) -> Histogram {
        self.series(
            name,
            help,
            Kind::Histogram,
            labels,
            || {
                let h = Histogram::new(bounds);
                (h.clone(), Series::Histogram(h))
            },
            |s| match s {
                Series::Histogram(h) => Some(h.clone()),
                _ => None,
            },
        )
    }

    /// Registers (or replaces) the health check of `service` on `node`.
    pub fn register_health(&self, service: &str, node: &str, check: HealthCheck) {
        self.lock()
            .health
            .insert((service.to_string(), node.to_string()), check);
    }

    /// `Ok` when every registered check passes, else every failing check's reason, one per line
    /// as `<service> <node>: <reason>`.
    pub fn health(&self) -> Result<(), String> {
        let checks: Vec<((String, String), HealthCheck)> =
            self.lock().health.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let failures: Vec<String> = checks
            .into_iter()
            .filter_map(|((service, node), check)| check().err().map(|r| format!("{service} {node}: {r}")))
            .collect();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(failures.join("\n"))
        }
    }

    /// Every series in the Prometheus text format, plus `pgferry_healthy{service,node}` (1/0)
    /// for each health check.
    pub fn render(&self) -> String {
        // Gauge functions and checks run outside the lock (they may take their own locks).
        enum Snap {
            Value(f64),
            Fn(GaugeFn),
            Histogram(Histogram),
        }
        /// Name, help, type and series of one family.
        type FamilySnap = (String, String, Kind, Vec<(Labels, Snap)>);
        let mut families: Vec<FamilySnap> = Vec::new();
        let checks: Vec<((String, String), HealthCheck)>;
        {
            let inner = self.lock();
            for (name, f) in &inner.families {
                let series = f
                    .series
                    .iter()
                    .map(|(labels, s)| {
                        let snap = match s {
                            Series::Counter(c) => Snap::Value(c.get() as f64),
                            Series::Gauge(g) => Snap::Value(g.get()),
                            Series::GaugeFn(f) => Snap::Fn(f.clone()),
                            Series::Histogram(h) => Snap::Histogram(h.clone()),
                        };
                        (labels.clone(), snap)
                    })
                    .collect();
                families.push((name.clone(), f.help.clone(), f.kind, series));
            }
            checks = inner.health.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        }
        let mut out = String::new();
        for (name, help, kind, series) in families {
            let _ = writeln!(out, "# HELP {name} {}", escape_help(&help));
            let _ = writeln!(out, "# TYPE {name} {}", kind.name());
            for (labels, snap) in series {
                match snap {
                    Snap::Value(v) => sample(&mut out, &name, &labels, None, v),
                    Snap::Fn(f) => {
                        if let Some(v) = f() {
                            sample(&mut out, &name, &labels, None, v)
                        }
                    }
                    Snap::Histogram(h) => {
                        let bucket = format!("{name}_bucket");
                        let mut cumulative = 0u64;
                        for (i, b) in h.0.buckets.iter().enumerate() {
                            cumulative += b.load(Ordering::Relaxed);
                            let le = h.0.bounds.get(i).map(|b| format_value(*b)).unwrap_or("+Inf".into());
                            sample(&mut out, &bucket, &labels, Some(("le", &le)), cumulative as f64);
                        }
                        sample(&mut out, &format!("{name}_sum"), &labels, None, h.sum());
                        sample(&mut out, &format!("{name}_count"), &labels, None, h.count() as f64);
                    }
                }
            }
        }
        if !checks.is_empty() {
            out.push_str("# HELP pgferry_healthy 1 when the service passes its health check, else 0.\n");
            out.push_str("# TYPE pgferry_healthy gauge\n");
            for ((service, node), check) in checks {
                let labels = vec![("node".to_string(), node), ("service".to_string(), service)];
                let v = if check().is_ok() { 1.0 } else { 0.0 };
                sample(&mut out, "pgferry_healthy", &labels, None, v);
            }
        }
        out
    }
}

fn sample(out: &mut String, name: &str, labels: &Labels, extra: Option<(&str, &str)>, v: f64) {
    if v.is_nan() {
        return;
    }
    out.push_str(name);
    if !labels.is_empty() || extra.is_some() {
        out.push('{');
        let mut first = true;
        for (k, v) in labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).chain(extra) {
            if !first {
                out.push(',');
            }
            first = false;
            let _ = write!(out, "{k}=\"{}\"", escape_label(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {}", format_value(v));
}

fn format_value(v: f64) -> String {
    if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        // Rust's shortest round-trip form: integers without ".0" noise are fine either way.
        format!("{v}")
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Microseconds since the Unix epoch by the local clock (0 if the clock is before 1970).
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format() {
        let r = MetricsRegistry::new();
        let c = r.counter("t_events_total", "Events.", &[("node", "n1"), ("kind", "change")]);
        c.inc_by(3);
        // Same series again: same counter.
        r.counter("t_events_total", "Events.", &[("node", "n1"), ("kind", "change")])
            .inc();
        r.counter("t_events_total", "Events.", &[("node", "n1"), ("kind", "hb\"x")])
            .inc();
        let g = r.gauge("t_gauge", "A gauge.", &[("node", "n1")]);
        let h = r.histogram("t_latency_seconds", "Latency.", &[("node", "n1")], &[0.01, 0.1]);
        h.observe(0.005);
        h.observe(0.05);
        h.observe(5.0);
        r.gauge_fn("t_fn", "Computed.", &[], Arc::new(|| Some(1.5)));
        let text = r.render();
        assert!(text.contains("# TYPE t_events_total counter\n"), "{text}");
        assert!(
            text.contains("t_events_total{node=\"n1\",kind=\"change\"} 4\n"),
            "{text}"
        );
        assert!(text.contains("kind=\"hb\\\"x\"} 1\n"), "{text}");
        assert!(!text.contains("t_gauge{"), "unset gauge is left out: {text}");
        g.set(2.0);
        let text = r.render();
        assert!(text.contains("t_gauge{node=\"n1\"} 2\n"), "{text}");
        assert!(
            text.contains("t_latency_seconds_bucket{node=\"n1\",le=\"0.01\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("t_latency_seconds_bucket{node=\"n1\",le=\"0.1\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("t_latency_seconds_bucket{node=\"n1\",le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("t_latency_seconds_count{node=\"n1\"} 3\n"), "{text}");
        assert!(text.contains("t_latency_seconds_sum{node=\"n1\"} 5.055\n"), "{text}");
        assert!(text.contains("t_fn 1.5\n"), "{text}");
    }

    #[test]
    fn type_clash_does_not_panic() {
        let r = MetricsRegistry::new();
        r.counter("t_x", "x", &[]).inc();
        r.gauge("t_x", "x", &[]).set(5.0);
        assert!(r.render().contains("t_x 1\n"));
    }

    #[test]
    fn health_combines_checks() {
        let r = MetricsRegistry::new();
        assert!(r.health().is_ok());
        r.register_health("capture", "n1", Arc::new(|| Ok(())));
        assert!(r.health().is_ok());
        r.register_health("apply", "n1", Arc::new(|| Err("origin n2 not running".into())));
        assert_eq!(r.health().unwrap_err(), "apply n1: origin n2 not running");
        let text = r.render();
        assert!(
            text.contains("pgferry_healthy{node=\"n1\",service=\"apply\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("pgferry_healthy{node=\"n1\",service=\"capture\"} 1\n"),
            "{text}"
        );
    }
}
