//! Keeps the services running: each restarts after an error with exponential backoff
//! (0.5 s doubling to 30 s, back to 0.5 s after a run of 10 s or more), logging the error,
//! until the process is stopped. Each service reports into the process's metrics registry;
//! its last error shows in `/healthz`. Inside apply, a stream of one origin that fails retries
//! on its own with the same steps and does not end the service (issue 16, scenario 3).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgferry_apply::{ApplyMetrics, ApplyOptions};
use pgferry_capture::{CaptureMetrics, CaptureOptions};
use pgferry_connectors::{Config, MetricsRegistry, Secrets};

/// A run at least this long resets the backoff to its start.
const HEALTHY_RUN: Duration = Duration::from_secs(10);

/// How often the slot's retained WAL is measured.
const SLOT_POLL: Duration = Duration::from_secs(5);

async fn supervise<F, Fut, E>(
    service: &'static str,
    node: String,
    secrets: Secrets,
    on_error: impl Fn(&str),
    mut start: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut backoff = Duration::from_millis(500);
    loop {
        let started = Instant::now();
        match start().await {
            Ok(()) => tracing::warn!(%node, service, "stopped; restarting"),
            Err(e) => {
                // Errors name endpoints, never passwords; scrub anyway in case a library quotes a DSN.
                let error = secrets.scrub(&e.to_string());
                on_error(&error);
                tracing::error!(%node, service, %error, retry_in_ms = backoff.as_millis() as u64, "failed; restarting")
            }
        }
        // A run that lasted was a recovery: the next failure is a new fault, retried quickly.
        // (Resetting only after 60 s let the backoff of earlier outages pile up: after three
        // network cuts 20 s apart, a service waited 30 s after the third one healed.)
        if started.elapsed() >= HEALTHY_RUN {
            backoff = Duration::from_millis(500);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Runs capture of `node` forever, with its metrics in `registry`.
pub async fn capture(config: Arc<Config>, node: String, registry: MetricsRegistry) {
    let metrics = CaptureMetrics::new(&registry, &node);
    // The slot is measured whether or not capture is up: a growing backlog while capture is
    // down is exactly what this gauge is for.
    if let Some(n) = config.node(&node) {
        let slot = pgferry_schemas::naming::slot_name(&config.cluster.name, &n.name);
        tokio::spawn(pgferry_capture::metrics::poll_slot_retained_wal(
            metrics.clone(),
            n.dsn.clone(),
            slot,
            SLOT_POLL,
        ));
    }
    let options = CaptureOptions {
        metrics: metrics.clone(),
        ..Default::default()
    };
    let n = node.clone();
    supervise(
        "capture",
        node,
        config.secrets(),
        |e| metrics.failed(e),
        || {
            let (c, n, o) = (config.clone(), n.clone(), options.clone());
            async move { pgferry_capture::run(c, &n, o).await }
        },
    )
    .await
}

/// Runs apply of `node` forever, with its metrics in `registry`.
pub async fn apply(config: Arc<Config>, node: String, registry: MetricsRegistry) {
    let metrics = ApplyMetrics::with_max_lag(&registry, &node, config.health.max_apply_lag_ms);
    let options = ApplyOptions {
        metrics: metrics.clone(),
    };
    let n = node.clone();
    supervise(
        "apply",
        node,
        config.secrets(),
        |e| metrics.failed(e),
        || {
            let (c, n, o) = (config.clone(), n.clone(), options.clone());
            async move { pgferry_apply::run(c, &n, o).await }
        },
    )
    .await
}
