//! Keeps the services running: each restarts after an error with exponential backoff
//! (0.5 s doubling to 30 s), logging the error, until the process is stopped.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgferry_connectors::redact::scrub;
use pgferry_connectors::Config;

async fn supervise<F, Fut, E>(service: &'static str, node: String, secrets: Vec<String>, mut start: F)
where
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
                let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
                let error = scrub(&e.to_string(), &secrets);
                tracing::error!(%node, service, %error, retry_in_ms = backoff.as_millis() as u64, "failed; restarting")
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_millis(500);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Runs capture of `node` forever.
pub async fn capture(config: Arc<Config>, node: String) {
    let n = node.clone();
    supervise("capture", node, config.secrets(), || {
        let (c, n) = (config.clone(), n.clone());
        async move { pgferry_capture::run(c, &n, Default::default()).await }
    })
    .await
}

/// Runs apply of `node` forever.
pub async fn apply(config: Arc<Config>, node: String) {
    let n = node.clone();
    supervise("apply", node, config.secrets(), || {
        let (c, n) = (config.clone(), n.clone());
        async move { pgferry_apply::run(c, &n, Default::default()).await }
    })
    .await
}
