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

    /// Moves the stream into its own task that reads ahead up to `capacity` messages (boxed)
    /// into a channel (whose receive is cancel-safe, unlike a socket read), and returns the receiving
    /// end plus the handle that confirms positions. The task ends after the first error, which
    /// it passes on, or when the receiver is dropped.
    pub fn into_channel(
        mut self,
        capacity: usize,
    ) -> (mpsc::Receiver<Result<Box<WalMessage>, ReplicationError>>, Confirmer) {
        let (tx, rx) = mpsc::channel(capacity);
        let confirmer = Confirmer(self.stream.shared_lsn_feedback.clone());
        tokio::spawn(async move {
            loop {
                // Capture may stop while the stream is quiet (an error at a Kafka commit after
                // the last message was read): end then too, or the walsender would stay attached
                // to the slot until the next WAL arrives, and the restarted capture would find
                // the slot active — on an idle database, for good (its heartbeats start only
                // once it has the stream).
                // Boxed: a message is ~1.3 kB (pg_walstream keeps up to 16 columns of each
                // tuple inline), and moving it by value through the channel and the receiver's
                // batch copied it four or five times: `perf record` of capture draining a TPC-B
                // backlog put ~23% of its samples in `memmove`, most under the channel's
                // `Block::write`/`read`.
                let item = tokio::select! {
                    item = self.next() => item.map(Box::new),
                    () = tx.closed() => break,
                };
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

/// A snapshot exported by a temporary logical replication slot: every transaction that
/// committed before `lsn` is visible in it and none after. It stays importable (`SET
/// TRANSACTION SNAPSHOT`) until this value is dropped, which closes the replication session
/// and with it the temporary slot.
pub struct ExportedSnapshot {
    /// The snapshot's name.
    pub name: String,
    /// The slot's consistent point.
    pub lsn: u64,
    release: Option<std::sync::mpsc::Sender<()>>,
}

impl Drop for ExportedSnapshot {
    fn drop(&mut self) {
        if let Some(tx) = self.release.take() {
            let _ = tx.send(());
        }
    }
}

/// Exports a snapshot of `dsn`'s database together with its exact LSN, through a temporary
/// logical slot `slot` (pgoutput) created with `EXPORT_SNAPSHOT`. The replication session runs
/// on a thread of its own until the result is dropped.
pub async fn export_snapshot(dsn: &str, slot: &str) -> Result<ExportedSnapshot, ReplicationError> {
    let endpoint = dsn_endpoint(dsn);
    let err = {
        let (endpoint, slot) = (endpoint.clone(), slot.to_string());
        move |message: String| ReplicationError {
            endpoint: endpoint.clone(),
            slot: slot.clone(),
            message,
        }
    };
    let (found_tx, found_rx) = tokio::sync::oneshot::channel::<Result<(String, String), String>>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let (conninfo, slot_name) = (replication_dsn(dsn), slot.to_string());
    std::thread::spawn(move || {
        let created = pg_walstream::PgReplicationConnection::connect(&conninfo).and_then(|mut conn| {
            let options = pg_walstream::ReplicationSlotOptions {
                temporary: true,
                snapshot: Some("export".into()),
                ..Default::default()
            };
            let result = conn.create_replication_slot_with_options(
                &slot_name,
                pg_walstream::SlotType::Logical,
                Some("pgoutput"),
                &options,
            )?;
            Ok((conn, result.get_value(0, 1), result.get_value(0, 2)))
        });
        match created {
            Ok((conn, Some(lsn), Some(name))) => {
                let _ = found_tx.send(Ok((lsn, name)));
                // Held until the snapshot is no longer needed.
                let _ = release_rx.recv();
                drop(conn);
            }
            Ok(_) => {
                let _ = found_tx.send(Err("CREATE_REPLICATION_SLOT returned no snapshot".into()));
            }
            Err(e) => {
                let _ = found_tx.send(Err(e.to_string()));
            }
        }
    });
    let (lsn, name) = found_rx
        .await
        .map_err(|_| err("the replication session ended".into()))?
        .map_err(&err)?;
    let lsn = parse_lsn(&lsn).ok_or_else(|| err(format!("bad consistent point {lsn:?}")))?;
    Ok(ExportedSnapshot {
        name,
        lsn,
        release: Some(release_tx),
    })
}

/// An LSN in PostgreSQL's `X/Y` form (hex).
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some((hi as u64) << 32 | lo as u64)
}
