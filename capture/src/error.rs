//! Capture's error type.

use pgferry_connectors::kafka::KafkaError;
use pgferry_connectors::postgres::PgError;
use pgferry_connectors::registry::RegistryError;
use pgferry_connectors::replication::ReplicationError;
use pgferry_schemas::CodecError;
use thiserror::Error;

/// Why capture stopped. Every variant names the system and endpoint involved.
#[derive(Debug, Error)]
pub enum CaptureError {
    /// The node is not in the configuration or not initialized.
    #[error("node {node}: {message}")]
    Setup { node: String, message: String },
    /// PostgreSQL (SQL session).
    #[error(transparent)]
    Pg(#[from] PgError),
    /// The replication stream.
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// Kafka.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// The schema registry.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A change that cannot be encoded (table, column and value named).
    #[error("encoding a change of {table}: {source}")]
    Encode { table: String, source: CodecError },
    /// An event over Kafka's size limit: capture cannot get past it until the operator raises
    /// the limit `fix` names (nothing after it is produced and the slot stays before it).
    #[error(
        "node {node}: {event} at LSN {lsn} (source transaction committed at {commit_lsn}) cannot be produced to {topic}: \
         it is {size} bytes, over {limit}; {fix}. Capture does not get past it until then: nothing after it is published \
         and the slot keeps it, so nothing is lost"
    )]
    EventTooLarge {
        /// The capturing node.
        node: String,
        /// Which event: `a change of <table> with key <key>`, a truncate, a message.
        event: String,
        /// LSN of the change (`X/Y`), or `unknown`.
        lsn: String,
        /// Commit LSN of its source transaction (`X/Y`).
        commit_lsn: String,
        /// Same, as a number (for the health check).
        commit_lsn_value: u64,
        /// `topic/partition`.
        topic: String,
        /// Bytes of key and value (and headers, when capture measured it).
        size: u64,
        /// The limit and the setting that holds it.
        limit: String,
        /// What the operator must change.
        fix: String,
    },
    /// A Kafka transaction failed after being open longer than `transaction.timeout.ms`: the
    /// broker aborts such a transaction. Capture cuts source transactions so that this does
    /// not happen while the link delivers what librdkafka holds queued in time.
    #[error(
        "node {node}: a Kafka transaction to {topic} failed after it had been open {open_ms} ms, longer than the producer's \
         transaction.timeout.ms ({timeout_ms} ms), so the broker aborted it ({source}). Capture commits every {split_ms} ms \
         within a source transaction, but delivering what librdkafka had queued took longer: raise transaction.timeout.ms \
         under [kafka.properties] (at most the brokers' transaction.max.timeout.ms), or lower queue.buffering.max.kbytes / \
         queue.buffering.max.messages there so less waits for a slow link"
    )]
    KafkaTransactionTimedOut {
        /// The capturing node.
        node: String,
        /// `topic/partition`.
        topic: String,
        /// How long the Kafka transaction had been open.
        open_ms: u64,
        /// The producer's `transaction.timeout.ms`.
        timeout_ms: u64,
        /// How often capture cuts a long source transaction.
        split_ms: u64,
        /// What the broker or librdkafka said.
        source: Box<CaptureError>,
    },
    /// A pgoutput message that makes no sense where it came.
    #[error("protocol: {0}")]
    Protocol(String),
}

impl CaptureError {
    /// An [`CaptureError::EventTooLarge`] with the event described by `event` (and its LSN, when
    /// known); any other error unchanged.
    pub(crate) fn naming(mut self, event: impl FnOnce() -> String, lsn: Option<u64>) -> CaptureError {
        if let CaptureError::EventTooLarge { event: named, lsn: at, .. } = &mut self {
            *named = event();
            if let Some(lsn) = lsn {
                *at = pgferry_connectors::postgres::format_lsn(lsn);
            }
        }
        self
    }
}
