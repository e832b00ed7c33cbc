//! Each partition's stream fails, waits and retries on its own (issue 16, scenario 3).
//!
//! A change that cannot be applied yet — `on_error = stop`, the `error` resolver, a table or
//! column whose DDL has not arrived from another origin yet, PostgreSQL or the registry
//! unreachable — stops the stream of the partition that carries it, and only that one: the
//! stream rolls back, waits (0.5 s doubling to 30 s; a table or column it waits for also ends
//! the wait when another stream of the node commits replicated DDL), moves its partition back to
//! its recorded progress (`pgferry.apply_progress`) and tries again, while the node's other
//! streams go on applying. While it waits, `/healthz` names the origin, the error, since when
//! and when it retries ([`crate::metrics`]). It stops waiting once it has handled a message past
//! the one it failed at, or has run [`HEALTHY_RUN`] without failing; the next failure then
//! starts the backoff from the beginning again.

use std::sync::Arc;
use std::time::Duration;

use pgferry_connectors::kafka::KafkaError;
use pgferry_connectors::postgres::PgSession;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{Consumer, DefaultConsumerContext, StreamConsumer};

use crate::error::ApplyError;
use crate::partition_stream::PartitionStream;
use crate::progress::format_lsn;

/// The first wait after a failure.
pub const FIRST_WAIT: Duration = Duration::from_millis(500);

/// The longest wait between two tries.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// A retried stream that runs this long without failing no longer counts as waiting.
pub const HEALTHY_RUN: Duration = Duration::from_secs(10);

/// How long moving the partition back to the recorded progress may take.
const SEEK_TIMEOUT: Duration = Duration::from_secs(10);

/// The waits between tries: [`FIRST_WAIT`] doubling up to [`MAX_WAIT`].
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { next: FIRST_WAIT }
    }

    /// The wait before the next try; the one after is twice as long.
    fn wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(MAX_WAIT);
        wait
    }
}

/// Opens a new session for a stream whose session broke.
pub type OpenSession = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<PgSession, ApplyError>> + Send>>
        + Send
        + Sync,
>;

/// Runs `stream` on its partition's `queue` for as long as apply runs, retrying it alone after
/// each failure. `consumer` is the node's consumer (it moves the partition back), `open_session`
/// opens a new session when the stream's own is gone. Returns only if the queue ends.
pub async fn run(
    mut stream: PartitionStream,
    queue: StreamPartitionQueue<DefaultConsumerContext>,
    consumer: Arc<StreamConsumer>,
    open_session: OpenSession,
) -> Result<(), ApplyError> {
    let mut backoff = Backoff::new();
    let (metrics, origin, node) = (stream.metrics.clone(), stream.source.clone(), stream.node.clone());
    let secrets = stream.config.secrets();
    loop {
        // A retried stream that runs a while without failing is past its trouble (an idle
        // partition gives it no later message to show that).
        let retried = metrics.is_waiting(&origin);
        let (ran_long, mut error) = {
            let run = stream.run(&queue);
            tokio::pin!(run);
            let timer = tokio::time::sleep(HEALTHY_RUN);
            tokio::pin!(timer);
            let mut ran_long = false;
            let result = loop {
                tokio::select! {
                    r = &mut run => break r,
                    _ = &mut timer, if retried && !ran_long => {
                        ran_long = true;
                        metrics.origin_resumed(&origin);
                        tracing::info!(node = %node, origin = %origin, "origin stream ran {HEALTHY_RUN:?} without failing; no longer waiting");
                    }
                }
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e) => (ran_long, e),
            }
        };
        // Failing again where it failed last time, or anew (the wait starts over).
        let mut again = stream.waiting_at.is_some() && !ran_long;
        if !again {
            backoff = Backoff::new();
        }
        let at = stream.progress.offset.load(std::sync::atomic::Ordering::Relaxed);
        stream.waiting_at = Some(if again {
            stream.waiting_at.unwrap_or(at).max(at)
        } else {
            at
        });
        loop {
            let wait = backoff.wait();
            let reason = secrets.scrub(&error.to_string());
            metrics.origin_waiting(&origin, &reason, wait, again);
            again = true;
            tracing::warn!(node = %node, origin = %origin, topic = %stream.topic, partition = stream.partition,
                lsn = %format_lsn(stream.applied.get(&origin).copied().unwrap_or(0)),
                retry_in_ms = wait.as_millis() as u64, error = %reason,
                "origin stream stopped; retrying it alone while the other origins go on");
            if error.waits_for_ddl() {
                // Retried early when another stream has applied DDL.
                let ddl = stream.schema_changed.clone();
                let notified = ddl.notified();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = notified => {
                        tracing::info!(node = %node, origin = %origin, "replicated DDL applied here; retrying the origin stream now");
                    }
                }
            } else {
                tokio::time::sleep(wait).await;
            }
            match resume(&mut stream, &consumer, &open_session).await {
                Ok(()) => break,
                Err(e) => error = e,
            }
        }
    }
}

/// Readies `stream` to run again and moves its partition back to the recorded progress.
async fn resume(
    stream: &mut PartitionStream,
    consumer: &Arc<StreamConsumer>,
    open_session: &OpenSession,
) -> Result<(), ApplyError> {
    let offset = stream.recover(|| open_session()).await?;
    let (c, topic, partition) = (consumer.clone(), stream.topic.clone(), stream.partition);
    tokio::task::spawn_blocking(move || c.seek(&topic, partition, offset, SEEK_TIMEOUT))
        .await
        .map_err(|e| ApplyError::Setup {
            node: stream.node.clone(),
            message: format!("seek task failed: {e}"),
        })?
        .map_err(|source| {
            ApplyError::Kafka(KafkaError::Topic {
                topic: stream.topic.clone(),
                message: format!(
                    "partition {}: moving back to the recorded progress ({offset:?}): {source}",
                    stream.partition
                ),
            })
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_maximum() {
        let mut b = Backoff::new();
        let waits: Vec<u64> = (0..9).map(|_| b.wait().as_millis() as u64).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
    }
}
