//! Applying one origin's partition: Kafka messages in, one local transaction per source
//! transaction out.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use pgferry_connectors::kafka::{header, HEADER_COMMIT_LSN, HEADER_KIND, HEADER_ORIGIN};
use pgferry_connectors::postgres::PgSession;
use pgferry_connectors::registry::Registry;
use pgferry_schemas::codec::{decode_frame, EnvelopeReader};
use pgferry_schemas::truncate::Truncate;
use pgferry_schemas::CodecError;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::DefaultConsumerContext;
use rdkafka::message::{BorrowedMessage, Message};

use crate::error::ApplyError;
use crate::metrics::OriginMetrics;
use crate::progress::{self, format_lsn, Progress};
use crate::writer::{Outcome, Writer};

/// The partition of one origin and everything needed to apply it.
pub struct OriginStream {
    /// Remote node name.
    pub origin: String,
    /// Region topic.
    pub topic: String,
    /// The origin's partition.
    pub partition: i32,
    /// Where this origin stands locally.
    pub progress: Progress,
    /// Session dedicated to this origin (replication origin set up on it).
    pub sql: PgSession,
    /// Writes changes.
    pub writer: Writer,
    /// Registry client.
    pub registry: Registry,
    /// Writer schema id → decoder.
    pub readers: HashMap<u32, Arc<EnvelopeReader>>,
    /// Writer schema id → parsed truncate schema.
    pub truncate_schemas: HashMap<u32, Arc<apache_avro::Schema>>,
    /// Local node name (for logs).
    pub node: String,
    /// Statements prepared by [`OriginStream::prepare`].
    pub statements: Option<SessionStatements>,
    /// What this stream applied (counted at each local commit).
    pub metrics: OriginMetrics,
}

/// Statements every transaction runs, prepared once per session.
pub struct SessionStatements {
    xact_setup: tokio_postgres::Statement,
    progress: tokio_postgres::Statement,
}

/// One decoded message of a source transaction.
enum Item {
    Change(pgferry_schemas::DecodedEvent),
    Truncate(Truncate),
}

/// The source transaction being applied.
struct OpenTxn {
    commit_lsn: u64,
}

impl OriginStream {
    /// Sets up the replication origin on this session.
    pub async fn prepare(&mut self) -> Result<(), ApplyError> {
        let name = progress::origin_name(&self.origin);
        self.sql
            .client
            .execute(
                "SELECT pg_replication_origin_create($1) WHERE NOT EXISTS
                   (SELECT 1 FROM pg_replication_origin WHERE roname = $1)",
                &[&name],
            )
            .await
            .map_err(self.sql.err(format!("creating replication origin {name}")))?;
        self.sql
            .client
            .execute("SELECT pg_replication_origin_session_setup($1)", &[&name])
            .await
            .map_err(self.sql.err(format!("setting up replication origin {name}")))?;
        let xact_setup = self
            .sql
            .client
            .prepare(
                "SELECT pg_replication_origin_xact_setup($1::text::pg_lsn,
                        'epoch'::timestamptz + $2::bigint * interval '1 microsecond')",
            )
            .await
            .map_err(self.sql.err("preparing pg_replication_origin_xact_setup"))?;
        let progress = self
            .sql
            .client
            .prepare(progress::UPSERT)
            .await
            .map_err(self.sql.err("preparing the progress update"))?;
        self.statements = Some(SessionStatements { xact_setup, progress });
        Ok(())
    }

    /// Applies messages until the stream or a write fails.
    pub async fn run(mut self, queue: StreamPartitionQueue<DefaultConsumerContext>) -> Result<(), ApplyError> {
        self.prepare().await?;
        let _running = self.metrics.running();
        tracing::info!(node = %self.node, origin = %self.origin, topic = %self.topic, partition = self.partition,
            commit_lsn = %format_lsn(self.progress.commit_lsn), "applying origin");
        let mut stream = queue.stream();
        let mut open: Option<OpenTxn> = None;
        while let Some(msg) = stream.next().await {
            let msg = msg.map_err(|e| {
                ApplyError::Kafka(pgferry_connectors::kafka::KafkaError::Topic {
                    topic: self.topic.clone(),
                    message: format!("partition {}: {e}", self.partition),
                })
            })?;
            if let Err(e) = self.handle(&msg, &mut open).await {
                if open.take().is_some() {
                    let _ = self.sql.client.batch_execute("ROLLBACK").await;
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn stream_err(&self, offset: i64, message: String) -> ApplyError {
        ApplyError::Stream {
            origin: self.origin.clone(),
            topic: self.topic.clone(),
            partition: self.partition,
            offset,
            message,
        }
    }

    async fn handle(&mut self, msg: &BorrowedMessage<'_>, open: &mut Option<OpenTxn>) -> Result<(), ApplyError> {
        let offset = msg.offset();
        match header(msg, HEADER_ORIGIN) {
            Some(o) if o == self.origin => {}
            other => {
                return Err(self.stream_err(
                    offset,
                    format!("message from origin {other:?} in {}'s partition", self.origin),
                ));
            }
        }
        let kind = header(msg, HEADER_KIND);
        match kind {
            Some("change" | "truncate") => {}
            Some("heartbeat") if open.is_none() => {
                self.metrics.heartbeat(msg);
                return Ok(());
            }
            other => {
                return Err(self.stream_err(offset, format!("unexpected message kind {other:?}")));
            }
        }
        let commit_lsn: u64 = header(msg, HEADER_COMMIT_LSN)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| self.stream_err(offset, "missing or bad pgferry-commit-lsn header".into()))?;
        if open.is_none() && commit_lsn <= self.progress.commit_lsn {
            // Already applied (a replay or a re-read after restart): dedup by origin progress.
            return Ok(());
        }
        if let Some(t) = open.as_ref() {
            if t.commit_lsn != commit_lsn {
                return Err(self.stream_err(
                    offset,
                    format!(
                        "transaction {} ended without its last event; next is {}",
                        format_lsn(t.commit_lsn),
                        format_lsn(commit_lsn)
                    ),
                ));
            }
        }
        let payload = msg.payload().unwrap_or_default();
        let decode_err = |source| ApplyError::Decode {
            origin: self.origin.clone(),
            topic: self.topic.clone(),
            partition: self.partition,
            offset,
            source,
        };
        let (schema_id, datum) = decode_frame(payload).map_err(decode_err)?;
        let writer_schema = self.registry.schema(schema_id).await?;
        let item = if kind == Some("truncate") {
            let schema = match self.truncate_schemas.get(&schema_id) {
                Some(s) => s.clone(),
                None => {
                    let parsed = apache_avro::Schema::parse_str(&writer_schema)
                        .map_err(|e| decode_err(CodecError::Schema(e.to_string())))?;
                    let parsed = Arc::new(parsed);
                    self.truncate_schemas.insert(schema_id, parsed.clone());
                    parsed
                }
            };
            Item::Truncate(Truncate::decode(&schema, datum).map_err(decode_err)?)
        } else {
            let reader = match self.readers.get(&schema_id) {
                Some(r) => r.clone(),
                None => {
                    let r = Arc::new(EnvelopeReader::new(&writer_schema).map_err(decode_err)?);
                    self.readers.insert(schema_id, r.clone());
                    r
                }
            };
            Item::Change(reader.decode(datum).map_err(decode_err)?)
        };
        let (commit_ts_us, txn_last) = match &item {
            Item::Change(ev) => (ev.commit_ts_us, ev.txn_last),
            Item::Truncate(t) => (t.ts_us, t.txn_last),
        };
        if open.is_none() {
            // BEGIN and the origin set-up go out together (tokio-postgres pipelines futures
            // polled together); one round trip instead of two.
            // Prepared statements only: an unprepared one would send its Parse, wait, and let
            // the next request overtake it.
            let lsn = format_lsn(commit_lsn);
            let stmts = self
                .statements
                .as_ref()
                .ok_or_else(|| self.stream_err(offset, "session not prepared".into()))?;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&lsn, &commit_ts_us];
            let setup = self.sql.client.execute(&stmts.xact_setup, &params);
            futures::try_join!(self.sql.client.batch_execute("BEGIN"), setup)
                .map_err(self.sql.err("beginning a transaction under the replication origin"))?;
            *open = Some(OpenTxn { commit_lsn });
        }
        match &item {
            Item::Change(ev) => {
                if self.metrics.row(self.writer.apply(&self.sql, ev).await?) == Outcome::Missing {
                    tracing::warn!(node = %self.node, origin = %self.origin, table = %format!("{}.{}", ev.schema, ev.table),
                        op = ev.op.code(), lsn = %format_lsn(commit_lsn), "row to change is missing locally; change skipped");
                }
            }
            Item::Truncate(t) => {
                self.writer.truncate(&self.sql, t).await?;
                self.metrics.truncate();
            }
        }
        if txn_last {
            // Progress and COMMIT pipelined: if the progress write fails, the transaction is
            // aborted, COMMIT rolls it back, and the write's error is what try_join returns.
            let lsn = format_lsn(commit_lsn);
            let stmts = self
                .statements
                .as_ref()
                .ok_or_else(|| self.stream_err(offset, "session not prepared".into()))?;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
                [&self.origin, &self.topic, &self.partition, &offset, &lsn, &commit_ts_us];
            let record = self.sql.client.execute(&stmts.progress, &params);
            futures::try_join!(record, self.sql.client.batch_execute("COMMIT"))
                .map_err(self.sql.err("recording pgferry.apply_progress and committing"))?;
            *open = None;
            self.metrics.txn_applied(commit_ts_us);
            self.progress = Progress {
                kafka_offset: Some(offset),
                commit_lsn,
            };
        }
        Ok(())
    }
}
