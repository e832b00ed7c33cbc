//! The logical replication stream of one slot (pgoutput protocol 1, `messages` on), through
//! `pg_walstream`. We take its raw XLogData frames and decode them with its pgoutput parser
//! ourselves, so relation messages (column types) and unchanged-TOAST markers reach capture,
//! and nothing is acknowledged until capture says so ([`Confirmer::confirm`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use pg_walstream::{
    CancellationToken, LogicalReplicationParser, LogicalReplicationStream, ReplicationStreamConfig, RetryConfig,
    SharedLsnFeedback, StreamingMode,
};
pub use pg_walstream::{ColumnData, LogicalReplicationMessage, TupleData};
use thiserror::Error;

use crate::redact::dsn_endpoint;

/// A replication-stream failure, naming the endpoint and slot.
#[derive(Debug, Error)]
#[error("replication stream of slot {slot} at {endpoint}: {message}")]
pub struct ReplicationError {
    /// `host:port/db`.
    pub endpoint: String,
    /// Slot name.
    pub slot: String,
    /// What went wrong.
    pub message: String,
}

/// One decoded pgoutput message and where it sits in the WAL.
#[derive(Debug)]
pub struct WalMessage {
    /// WAL position of the message.
    pub wal_start: u64,
    /// WAL position just after it.
    pub wal_end: u64,
    /// The message.
    pub message: LogicalReplicationMessage,
}

/// An open replication stream.
pub struct WalStream {
    stream: LogicalReplicationStream,
    parser: LogicalReplicationParser,
    cancel: CancellationToken,
    endpoint: String,
    slot: String,
}

/// Adds `replication=database` and pgferry's session settings (UTC, ISO dates) to a DSN.
fn replication_dsn(dsn: &str) -> String {
    const OPTIONS: &str = "-c TimeZone=UTC -c DateStyle=ISO,YMD -c IntervalStyle=iso_8601 -c extra_float_digits=1";
    if dsn.starts_with("postgres://") || dsn.starts_with("postgresql://") {
        let sep = if dsn.contains('?') { '&' } else { '?' };
        let enc = OPTIONS.replace(' ', "%20").replace('=', "%3D").replace(',', "%2C");
        format!("{dsn}{sep}replication=database&options={enc}")
    } else {
        format!("{dsn} replication=database options='{OPTIONS}'")
    }
}

impl WalStream {
    /// Starts streaming `slot` with `publication` from the slot's confirmed position.
    /// The slot must exist (`pgferry init` makes it).
    pub async fn start(dsn: &str, slot: &str, publication: &str) -> Result<WalStream, ReplicationError> {
        let endpoint = dsn_endpoint(dsn);
        let err = |e: pg_walstream::ReplicationError| ReplicationError {
            endpoint: endpoint.clone(),
            slot: slot.to_string(),
            message: e.to_string(),
        };
        let config = ReplicationStreamConfig::builder(slot, publication)
            .with_protocol_version(1)
            .with_streaming_mode(StreamingMode::Off)
            .with_messages(true)
            .with_feedback_interval(Duration::from_secs(1))
            .with_connection_timeout(Duration::from_secs(10))
            .with_retry_config(RetryConfig {
                max_attempts: 1,
                max_duration: Duration::from_secs(10),
                ..RetryConfig::default()
            });
        let mut stream = LogicalReplicationStream::new(&replication_dsn(dsn), config)
            .await
            .map_err(err)?;
        stream.start(None).await.map_err(err)?;
        Ok(WalStream {
            stream,
            parser: LogicalReplicationParser::with_protocol_version(1),
            cancel: CancellationToken::new(),
            endpoint,
            slot: slot.to_string(),
        })
    }

    fn err(&self, message: String) -> ReplicationError {
        ReplicationError {
            endpoint: self.endpoint.clone(),
            slot: self.slot.clone(),
            message,
        }
    }

    /// The next pgoutput message (keepalives are answered inside).
    pub async fn next(&mut self) -> Result<WalMessage, ReplicationError> {
        loop {
            let raw = self
                .stream
                .next_raw_event(&self.cancel)
                .await
                .map_err(|e| self.err(e.to_string()))?;
            if raw.data.is_empty() {
                continue;
            }
            let parsed = self
                .parser
                .parse_wal_message_bytes(raw.data)
                .map_err(|e| self.err(format!("undecodable pgoutput message: {e}")))?;
            return Ok(WalMessage {
                wal_start: raw.wal_start.value(),
                wal_end: raw.wal_end.value(),
                message: parsed.message,
            });
        }
    }

    /// Moves the stream into its own task that reads ahead up to `capacity` messages into a
    /// channel (whose receive is cancel-safe, unlike a socket read), and returns the receiving
    /// end plus the handle that confirms positions. The task ends after the first error, which
    /// it passes on, or when the receiver is dropped.
    pub fn into_channel(
        mut self,
        capacity: usize,
    ) -> (mpsc::Receiver<Result<WalMessage, ReplicationError>>, Confirmer) {
        let (tx, rx) = mpsc::channel(capacity);
        let confirmer = Confirmer(self.stream.shared_lsn_feedback.clone());
        tokio::spawn(async move {
            loop {
                let item = self.next().await;
                // pg_walstream checks for due feedback only every 128 frames; on a quiet stream
                // (heartbeats only) that would hold confirmed positions back for minutes.
                self.stream.maybe_send_feedback().await;
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    break;
                }
            }
            let _ = self.stream.stop().await;
        });
        (rx, confirmer)
    }
}

/// Confirms stream positions to PostgreSQL (sent with the next status update).
#[derive(Clone)]
pub struct Confirmer(Arc<SharedLsnFeedback>);

impl Confirmer {
    /// Everything up to `lsn` is safely stored (in Kafka); the slot may release it.
    pub fn confirm(&self, lsn: u64) {
        self.0.update_flushed_lsn(lsn);
        self.0.update_applied_lsn(lsn);
    }
}
