//! Applying one partition: Kafka messages in, one local transaction per source transaction
//! out. A partition is written by one node; it carries that node's own transactions and, if
//! the node forwards, those of the origins it forwards, each under its own origin's name.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use futures::{FutureExt, Stream, StreamExt};
use pgferry_connectors::config::{Config, OnError};
use pgferry_connectors::kafka::{header, HEADER_COMMIT_LSN, HEADER_KIND, HEADER_ORIGIN, HEADER_TXN_LAST};
use pgferry_connectors::postgres::PgSession;
use pgferry_connectors::registry::Registry;
use pgferry_schemas::codec::{decode_frame, EnvelopeReader};
use pgferry_schemas::logical_message::LogicalMessage;
use pgferry_schemas::truncate::Truncate;
use pgferry_schemas::CodecError;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::DefaultConsumerContext;
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message};

use crate::clock_skew::{ClockSkew, SkewWait};
use crate::error::ApplyError;
use crate::dead_letter::DeadLetters;
use crate::metrics::{ApplyMetrics, OriginMetrics};
use crate::progress::{self, format_lsn};
use crate::group::{Carry, ReadAhead, SourceTxn};
use crate::writer::Writer;

/// One remote node's partition and everything needed to apply it.
pub struct PartitionStream {
    /// The node that writes the partition.
    pub source: String,
    /// Region topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The cluster (which origins this partition may carry to this node).
    pub config: Arc<Config>,
    /// Origin → commit LSN of its last transaction applied here (the dedup key).
    pub applied: HashMap<String, u64>,
    /// Session dedicated to this partition.
    pub sql: PgSession,
    /// The replication origin currently set up on the session.
    pub session_origin: Option<String>,
    /// Writes changes.
    pub writer: Writer,
    /// Registry client.
    pub registry: Registry,
    /// Writer schema id → decoder.
    pub readers: HashMap<u32, Arc<EnvelopeReader>>,
    /// Writer schema id → parsed fixed-record schema (truncate, message).
    pub fixed_schemas: HashMap<u32, Arc<apache_avro::Schema>>,
    /// Local node name (names its replication origins; logs).
    pub node: String,
    /// Statements prepared by [`OriginStream::prepare`].
    pub statements: Option<SessionStatements>,
    /// What this stream applied (counted at each local commit).
    /// Apply's metrics.
    pub metrics: ApplyMetrics,
    /// Where messages that can never be applied go.
    pub dead_letters: Arc<DeadLetters>,
    /// Origin → its metrics handle (made on first use).
    pub origin_metrics: HashMap<String, OriginMetrics>,
    /// A source transaction being skipped (`on_error = skip_transaction`): its remaining
    /// messages go to the dead-letter topic.
    pub skipping: Option<SkippedTxn>,
    /// Apply only this origin's transactions (a replay of one origin); None: every origin.
    pub only_origin: Option<String>,
    /// Apply transactions of this node's own origin too (a replay of a node's own changes
    /// into a restored copy of it); never set by the apply service.
    pub apply_own: bool,
    /// What the stream has done so far (read by replay's progress output).
    pub progress: Arc<StreamProgress>,
    /// Changes decoded ahead (by Kafka offset) while the previous group's writes were on their
    /// way to the server; emptied with each batch.
    pub predecoded: rustc_hash::FxHashMap<i64, pgferry_schemas::DecodedEvent>,
    /// Most transactions the next group attempt may take: after an attempt whose first
    /// transaction had to go one by one it starts small again and doubles with each group, so
    /// a run of such transactions is not read and decided again and again.
    pub group_budget: usize,
    /// Waits for this node's clock to pass the commit time of what it applies.
    pub clock_skew: ClockSkew,
    /// While the stream waits after a failure (`crate::origin_retry`): the offset of the last
    /// message it had handled when it failed; handling a later one means it got past the point
    /// where it failed, and it no longer waits.
    pub waiting_at: Option<i64>,
    /// Told whenever a stream of this node commits a transaction that ran replicated DDL (a
    /// stream waiting for a table or column, [`ApplyError::NotYet`], then retries at once).
    pub schema_changed: Arc<tokio::sync::Notify>,
    /// Whether the open transaction ran replicated DDL.
    ran_ddl: bool,
    /// Truncate events of the open transaction not applied yet: the tables of one TRUNCATE
    /// arrive as consecutive events and are truncated in one statement
    /// (`writer::truncate`), before the transaction's next message or its commit.
    truncating: Vec<Truncate>,
    /// Opens the stream's second session, on which the next group is read while a group's
    /// writes travel (set by the apply service; None: groups are not read ahead, as in a replay).
    pub open_spare: Option<crate::origin_retry::OpenSession>,
    /// The second session while it is not the current one (opened at the first read ahead).
    spare: Option<Spare>,
    /// The next group read ahead on the current session (its transaction open) and what the
    /// group before it changed ([`crate::group::Carry`]).
    ahead: Option<(ReadAhead, Carry)>,
    /// The last group's transactions, freed while the next group is written.
    retired: Vec<SourceTxn>,
    /// Whether the batch being applied filled the window (a backlog): only then are groups
    /// read ahead.
    backlog: bool,
}

/// A stream's second session and what belongs to it; it trades places with the current one
/// ([`PartitionStream::swap_sessions`]) each time a group read ahead on it is written.
struct Spare {
    sql: PgSession,
    statements: Option<SessionStatements>,
    prepared: HashMap<String, tokio_postgres::Statement>,
    origin: Option<String>,
}

/// How long a group read ahead keeps its key locks while the group before it is still being
/// written. A stream of another origin could wait for one of them while holding a row that
/// group writes: a wait that runs through this process, which PostgreSQL's deadlock detection
/// cannot see. After this long the read is rolled back (its locks released) and the next
/// group reads again.
const AHEAD_HOLD: std::time::Duration = std::time::Duration::from_secs(1);

/// Counts of one stream, updated as it goes.
#[derive(Debug, Default)]
pub struct StreamProgress {
    /// Offset of the last message handled (-1: none yet).
    pub offset: AtomicI64,
    /// Source transactions applied (committed locally).
    pub applied: AtomicU64,
    /// Source transactions skipped because they were already applied.
    pub skipped: AtomicU64,
    /// Wall-clock time (ms since the Unix epoch) the last message arrived (0: none yet).
    pub last_received_ms: AtomicI64,
    /// Whether a message is being handled right now.
    pub busy: std::sync::atomic::AtomicBool,
}

impl StreamProgress {
    /// Whether the stream has work: a message in hand, or one arrived within `window_ms`
    /// (a partition whose origin is down, or has nothing to send, receives nothing).
    pub fn working(&self, window_ms: i64) -> bool {
        let last = self.last_received_ms.load(Ordering::Relaxed);
        self.busy.load(Ordering::Relaxed) || (last != 0 && chrono::Utc::now().timestamp_millis() - last < window_ms)
    }
}

/// Where a stream stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// Never (the apply service).
    Forever,
    /// At the first message at or past this offset that begins a new transaction, or at the
    /// end of the partition outside a transaction (a replay).
    Offset(i64),
}

/// A source transaction skipped as a whole, until its last message has gone by.
pub struct SkippedTxn {
    origin: String,
    commit_lsn: u64,
    commit_ts_us: i64,
    reason: String,
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
    Message(LogicalMessage),
}

/// The source transaction being applied.
struct OpenTxn {
    origin: String,
    /// Offset of its first message.
    first_offset: i64,
    commit_lsn: u64,
    commit_ts_us: i64,
}

impl PartitionStream {
    /// A stream of `source`'s partition `topic`/`partition` into `node`, on session `sql`, that
    /// resumes with `applied` (origin → commit LSN of its last applied transaction); `registry`
    /// is shared with the node's other streams (its cache).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<Config>,
        node: &str,
        source: &str,
        topic: String,
        partition: i32,
        sql: PgSession,
        applied: HashMap<String, u64>,
        metrics: ApplyMetrics,
        dead_letters: Arc<DeadLetters>,
        registry: Registry,
    ) -> PartitionStream {
        let clock_skew = ClockSkew::new(config.apply.max_clock_skew_ms);
        PartitionStream {
            metrics,
            dead_letters,
            origin_metrics: Default::default(),
            skipping: None,
            source: source.to_string(),
            topic,
            partition,
            writer: Writer::new(config.clone(), node),
            registry,
            config,
            applied,
            sql,
            session_origin: None,
            readers: Default::default(),
            fixed_schemas: Default::default(),
            node: node.to_string(),
            statements: None,
            only_origin: None,
            apply_own: false,
            group_budget: usize::MAX,
            clock_skew,
            waiting_at: None,
            schema_changed: Arc::new(tokio::sync::Notify::new()),
            ran_ddl: false,
            truncating: Vec::new(),
            open_spare: None,
            spare: None,
            ahead: None,
            retired: Vec::new(),
            backlog: false,
            predecoded: Default::default(),
            progress: Arc::new(StreamProgress {
                offset: AtomicI64::new(-1),
                ..Default::default()
            }),
        }
    }

    /// Makes `origin`'s replication origin the session's (outside any transaction), creating
    /// it if needed. A no-op when it already is.
    async fn use_origin(&mut self, origin: &str) -> Result<(), ApplyError> {
        if self.session_origin.as_deref() == Some(origin) {
            return Ok(());
        }
        let name = pgferry_schemas::naming::replication_origin(&self.config.cluster.name, &self.node, origin);
        self.release_origin().await?;
        pgferry_connectors::postgres::create_replication_origin(&self.sql, &name).await?;
        self.take_origin(origin).await?;
        let lsn: Option<String> = self
            .sql
            .client
            .query_one(
                "SELECT max(commit_lsn - '0/0'::pg_lsn)::text FROM pgferry.apply_progress WHERE origin = $1",
                &[&origin],
            )
            .await
            .map_err(self.sql.err("reading pgferry.apply_progress"))?
            .get(0);
        if let Some(lsn) = lsn.and_then(|l| l.parse::<u64>().ok()) {
            let applied = self.applied.entry(origin.to_string()).or_insert(0);
            *applied = (*applied).max(lsn);
        }
        Ok(())
    }

    /// Prepares the statements every transaction runs.
    pub async fn prepare(&mut self) -> Result<(), ApplyError> {
        self.statements = Some(prepare_statements(&self.sql).await?);
        Ok(())
    }

    /// Applies messages until the stream or a write fails.
    pub async fn run(&mut self, queue: &StreamPartitionQueue<DefaultConsumerContext>) -> Result<(), ApplyError> {
        self.run_stream(queue.stream(), Until::Forever).await
    }

    /// Makes the stream ready to run again after it failed: the open transaction (if any)
    /// rolled back — or, when the session is gone, a new session (`open_session`) whose
    /// replication origin is set up again at the next transaction —, table metadata and prepared
    /// statements read again (the cause may have been fixed by DDL), and the applied positions
    /// replaced by `pgferry.apply_progress`. Returns the offset to resume the partition at.
    pub(crate) async fn recover<F, Fut>(&mut self, open_session: F) -> Result<rdkafka::Offset, ApplyError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<PgSession, ApplyError>>,
    {
        self.skipping = None;
        self.ahead = None;
        // Any read ahead still open there ends with the session.
        self.spare = None;
        self.predecoded.clear();
        self.ran_ddl = false;
        self.truncating.clear();
        self.group_budget = usize::MAX;
        self.writer.forget_tables();
        if !self.session_usable().await {
            self.sql = open_session().await?;
            self.session_origin = None;
            self.statements = None;
        }
        // The recorded progress replaces what this stream remembers applying: apply commits
        // with synchronous_commit = off, so a server crash can lose the last commits it saw
        // succeed, and those transactions must be applied again, not skipped as duplicates.
        let resume = progress::read(&self.sql, &self.topic, self.partition).await?;
        self.applied = resume.origins;
        Ok(match resume.kafka_offset {
            Some(o) => rdkafka::Offset::Offset(o + 1),
            None => rdkafka::Offset::Beginning,
        })
    }

    /// Whether the session answers outside any transaction, rolling back one that a failure
    /// left open (an aborted one, or one whose statements all succeeded before a failure
    /// elsewhere).
    async fn session_usable(&self) -> bool {
        if self.sql.client.is_closed() {
            return false;
        }
        // Inside a transaction block `now()` is the block's start, earlier than the statement's;
        // outside, a simple-protocol statement is its own transaction and both are the same (the
        // extended protocol would stamp Bind and Execute apart).
        let probe = self.sql.client.simple_query("SELECT now() <> statement_timestamp()").await;
        let in_block = probe.as_ref().map(|msgs| {
            msgs.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("t")))
        });
        match in_block {
            Ok(false) => true,
            Ok(true) => self.sql.client.batch_execute("ROLLBACK").await.is_ok(),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION) => {
                self.sql.client.batch_execute("ROLLBACK").await.is_ok()
            }
            Err(_) => false,
        }
    }

    /// Applies the messages of `stream` (this partition's) until `until`, or until the stream
    /// or a write fails. Messages are taken in batches — one awaited, then whatever has already
    /// arrived, up to `[apply] max_group_rows` — and a batch's complete source transactions are
    /// applied in groups where they can be (`crate::group`), the rest one by one.
    pub async fn run_stream<'m, S>(&mut self, stream: S, until: Until) -> Result<(), ApplyError>
    where
        S: Stream<Item = KafkaResult<BorrowedMessage<'m>>>,
    {
        let t = std::time::Instant::now();
        self.prepare().await?;
        tracing::debug!(node = %self.node, source = %self.source, prepared_ms = t.elapsed().as_millis() as u64, "partition prepared");
        let _running = self.metrics.origin(&self.source).running();
        tracing::info!(node = %self.node, source = %self.source, topic = %self.topic, partition = self.partition,
            "applying partition");
        let mut stream = std::pin::pin!(stream);
        let mut open: Option<OpenTxn> = None;
        let max_messages = self.config.apply.max_group_rows.max(1);
        // The messages held: up to two groups' worth, so that while one group's writes travel
        // the next group is decoded (`apply_group`'s `while_writing`).
        let window = 2 * max_messages;
        let wait = std::time::Duration::from_millis(self.config.apply.group_wait_ms);
        let mut batch: Vec<Held<'m>> = Vec::with_capacity(window);
        // Whether the last message read left a source transaction unfinished.
        let mut in_txn = false;
        loop {
            // Collect: wait for one message, then take what has already arrived (never waiting
            // for more transactions, unless `group_wait_ms` asks to), and the rest of a
            // transaction begun, up to the bounds.
            let mut end = false;
            let mut failed = None;
            // `group_wait_ms` counts from the batch's first message.
            let mut deadline = tokio::time::Instant::now() + wait;
            let (collect_start, held_before) = (std::time::Instant::now(), batch.len());
            loop {
                let must_wait = batch.is_empty() || (in_txn && batch.len() < 2 * window);
                let next = if must_wait {
                    stream.next().await
                } else if batch.len() >= window {
                    break;
                } else if !wait.is_zero() {
                    match tokio::time::timeout_at(deadline, stream.next()).await {
                        Ok(next) => next,
                        Err(_) => break,
                    }
                } else {
                    match stream.next().now_or_never() {
                        Some(next) => next,
                        None => break,
                    }
                };
                let msg = match next {
                    None => {
                        end = true;
                        break;
                    }
                    Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {
                        if until != Until::Forever && !in_txn {
                            end = true;
                            break;
                        }
                        if batch.is_empty() || in_txn {
                            continue;
                        }
                        break;
                    }
                    Some(Err(e)) => {
                        failed = Some(ApplyError::Kafka(pgferry_connectors::kafka::KafkaError::Topic {
                            topic: self.topic.clone(),
                            message: format!("partition {}: {e}", self.partition),
                        }));
                        break;
                    }
                    Some(Ok(m)) => m,
                };
                if matches!(until, Until::Offset(last) if msg.offset() >= last) && !in_txn {
                    end = true;
                    break;
                }
                let meta = Meta::of(&msg, &self.source);
                if meta.in_txn_kind {
                    in_txn = !meta.txn_last;
                }
                if batch.is_empty() {
                    deadline = tokio::time::Instant::now() + wait;
                }
                batch.push((msg, meta));
            }
            tracing::debug!(held = batch.len(), taken = batch.len() - held_before,
                collect_us = collect_start.elapsed().as_micros() as u64, "messages taken");
            // A full window applies its first group (or message) and keeps the rest, topped up
            // next round; otherwise everything held is applied.
            let full = batch.len() >= window && !end && failed.is_none();
            let applied = self.apply_batch(&batch, full, &mut open).await;
            match applied {
                Ok(n) => {
                    batch.drain(..n);
                }
                Err(e) => {
                    self.predecoded.clear();
                    return Err(e);
                }
            }
            self.note_resumed();
            if let Some(e) = failed {
                return Err(e);
            }
            if end {
                // A read ahead left over (the messages it covered ended the stream unused).
                return self.drop_ahead().await;
            }
        }
    }

    /// After a batch: a stream that waited after a failure and has now handled a message past
    /// the point where it failed no longer waits.
    fn note_resumed(&mut self) {
        let Some(at) = self.waiting_at else { return };
        if self.progress.offset.load(Ordering::Relaxed) > at {
            self.waiting_at = None;
            self.metrics.origin_resumed(&self.source);
            tracing::info!(node = %self.node, origin = %self.source, topic = %self.topic, partition = self.partition,
                lsn = %format_lsn(self.applied.get(&self.source).copied().unwrap_or(0)),
                "origin stream got past the change it waited at; applying again");
        }
    }

    /// Applies messages at the head of `batch`: complete source transactions in groups where
    /// they can be, everything else one message at a time; all of them, or with `first_only`
    /// only the first group (or message). Returns how many messages it applied.
    async fn apply_batch(&mut self, batch: &[Held<'_>], first_only: bool, open: &mut Option<OpenTxn>) -> Result<usize, ApplyError> {
        self.backlog = first_only;
        let mut i = 0;
        while i < batch.len() && !(first_only && i > 0) {
            if open.is_none() && self.skipping.is_none() {
                let n = self.try_group(&batch[i..], open).await?;
                if n > 0 {
                    i += n;
                    continue;
                }
            }
            self.handle_one(&batch[i].0, open).await?;
            i += 1;
        }
        // Decoded ahead but applied one by one (or not at all): dropped.
        match batch.get(i) {
            Some((next, _)) => self.predecoded.retain(|offset, _| *offset >= next.offset()),
            None => self.predecoded.clear(),
        }
        Ok(i)
    }

    /// Applies one message on the one-by-one path; on an error the open transaction is rolled back.
    async fn handle_one(&mut self, msg: &BorrowedMessage<'_>, open: &mut Option<OpenTxn>) -> Result<(), ApplyError> {
        self.drop_ahead().await?;
        self.progress.last_received_ms.store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
        self.progress.busy.store(true, Ordering::Relaxed);
        let handled = self.handle(msg, open).await;
        self.progress.busy.store(false, Ordering::Relaxed);
        if let Err(e) = handled {
            if open.take().is_some() {
                let _ = self.sql.client.batch_execute("ROLLBACK").await;
            }
            return Err(e);
        }
        self.progress.offset.store(msg.offset(), Ordering::Relaxed);
        Ok(())
    }

    /// Applies the complete source transactions at the start of `msgs` as one group, if they can
    /// be: changes of the partition's own origin, not yet applied, that decode, of groupable
    /// tables, within the bounds. Returns how many messages it consumed (0: none; the first
    /// goes one by one). A group that fails is rolled back and its transactions applied one by one
    /// here, so `on_error`, the dead-letter topic and `pgferry.exceptions` work as without groups.
    async fn try_group(&mut self, msgs: &[Held<'_>], open: &mut Option<OpenTxn>) -> Result<usize, ApplyError> {
        // A group read ahead serves the group that starts where it starts; no other.
        let mut ahead = self.ahead.take();
        if ahead.as_ref().is_some_and(|(read, _)| read.first_offset != msgs[0].0.offset()) {
            self.ahead = ahead.take();
            self.drop_ahead().await?;
        }
        let tried = self.try_group_with(msgs, open, &mut ahead).await;
        if ahead.is_some() {
            self.ahead = ahead;
            self.drop_ahead().await?;
        }
        tried
    }

    /// [`PartitionStream::try_group`], given the read ahead for these messages, if any (taken
    /// when the group is written).
    async fn try_group_with(&mut self, msgs: &[Held<'_>], open: &mut Option<OpenTxn>, ahead: &mut Option<(ReadAhead, Carry)>) -> Result<usize, ApplyError> {
        let formed = std::time::Instant::now();
        let limits = self.config.apply.clone();
        let covered = ahead.as_ref().map_or(usize::MAX, |(read, _)| read.txns);
        let first = &msgs[0].1;
        if !first.from_source || (self.source == self.node && !self.apply_own) {
            return Ok(0);
        }
        let origin = self.source.clone();
        // A node that forwards this origin publishes what it applies (capture reads its WAL):
        // one group would go on as one transaction, dated by its last. So those go one by one.
        let forwards = self.config.node(&self.node).is_some_and(|me| me.forward_origins.contains(&origin));
        if limits.max_group_txns <= 1
            || forwards
            || !first.change
            || self.only_origin.as_deref().is_some_and(|o| o != origin)
            || self.config.node(&origin).is_none()
        {
            return Ok(0);
        }
        self.use_origin(&origin).await?;
        let applied = self.applied.get(&origin).copied().unwrap_or(0);
        let mut txns: Vec<SourceTxn> = Vec::new();
        let mut ends: Vec<usize> = Vec::new();
        let mut current: Option<SourceTxn> = None;
        let mut rows = 0;
        for (j, (m, meta)) in msgs.iter().enumerate() {
            if !meta.from_source || !meta.change {
                break;
            }
            let Some(lsn) = meta.commit_lsn else { break };
            match &current {
                Some(t) if t.commit_lsn != lsn => break,
                None if lsn <= applied || txns.len() >= limits.max_group_txns.min(self.group_budget).min(covered) => break,
                _ => {}
            }
            rows += 1;
            if rows > limits.max_group_rows {
                break;
            }
            let ev = match self.predecoded.remove(&m.offset()) {
                Some(ev) => ev,
                None => match self.decode_item(m, &origin, Some("change")).await {
                    Ok(Item::Change(ev)) => ev,
                    _ => break,
                },
            };
            if !self.writer.groupable(&self.sql, &ev).await {
                break;
            }
            let last = ev.txn_last;
            current
                .get_or_insert_with(|| SourceTxn {
                    commit_lsn: lsn,
                    commit_ts_us: ev.commit_ts_us,
                    last_offset: m.offset(),
                    changes: Vec::new(),
                })
                .changes
                .push(ev);
            if last {
                if let Some(mut t) = current.take() {
                    t.last_offset = m.offset();
                    txns.push(t);
                    ends.push(j + 1);
                }
            }
        }
        if txns.is_empty() {
            return Ok(0);
        }
        self.progress.last_received_ms.store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
        self.progress.busy.store(true, Ordering::Relaxed);
        let next = &msgs[ends[ends.len() - 1]..];
        tracing::debug!(transactions = txns.len(), form_us = formed.elapsed().as_micros() as u64, "group formed");
        let unlocked = !self.writer.locks_rows();
        let mut written = self.apply_group(&origin, &txns, next, ahead.take()).await;
        if written.is_err() && unlocked {
            // The group read its rows without locking them, and a row may have changed before
            // its write (another origin's stream writing the same rows): once more with row
            // locks, which the writer takes after a failure, before going one by one.
            written = self.apply_group(&origin, &txns, next, None).await;
        }
        self.progress.busy.store(false, Ordering::Relaxed);
        match written {
            Ok(0) => {
                self.group_budget = 4;
                Ok(0)
            }
            Ok(n) => {
                self.group_budget = self.group_budget.saturating_mul(2);
                // Freed while the next group is written (`apply_group`), not on the way to it.
                self.retired = txns;
                Ok(ends[n - 1])
            }
            Err(e) => {
                // Applied again one by one, each transaction on its own.
                tracing::info!(node = %self.node, origin = %origin, topic = %self.topic, partition = self.partition,
                    transactions = txns.len(), error = %e, "a group failed; applying its transactions one by one");
                self.metrics.group_fallback();
                let n = ends[ends.len() - 1];
                for (m, _) in &msgs[..n] {
                    self.handle_one(m, open).await?;
                }
                Ok(n)
            }
        }
    }

    /// Writes a group and commits it under its last transaction's commit LSN and time, with the
    /// progress; how many of `txns` it applied (0: none, rolled back). On error the transaction is
    /// rolled back.
    async fn apply_group(&mut self, origin: &str, txns: &[SourceTxn], next: &[Held<'_>], ahead: Option<(ReadAhead, Carry)>) -> Result<usize, ApplyError> {
        // One wait for the whole group: its latest commit time.
        if let (Some(last), Some(latest)) = (txns.last(), txns.iter().map(|t| t.commit_ts_us).max()) {
            self.wait_for_clock(origin, last.commit_lsn, latest).await?;
        }
        // Under a backlog the next group is read ahead on the second session while this one is
        // written, unless this group locks rows (its write could then wait for a row the read
        // locked). Not otherwise: the read would cover only what has arrived so far, and cap
        // the next group at that (smaller groups, more latency at medium rates, measured).
        let read_next = self.backlog && self.open_spare.is_some() && !self.writer.locks_rows() && self.ensure_spare().await;
        let stmts = self
            .statements
            .as_ref()
            .ok_or_else(|| self.stream_err(txns[0].last_offset, "session not prepared".into()))?;
        let commit = crate::group::Commit {
            xact_setup: &stmts.xact_setup,
            progress: &stmts.progress,
            topic: &self.topic,
            partition: self.partition,
            carry: read_next,
        };
        // Under a backlog the next group is decoded, and its read ahead built, before this group
        // is decided. When this group was itself read ahead (its key locks held since), that
        // read is sent at once — one poll sends every statement of it (`group::read_ahead`) —
        // so that the second session reads while apply decides this group and builds its
        // writes; if this group then has to read again, the read is dropped first
        // (`WhileWriting::begun`). Otherwise it is sent once this group's writes are. Not under
        // a backlog what follows is decoded while the writes travel, adding nothing before them.
        let (readers, budget) = (&self.readers, self.config.apply.max_group_rows);
        let started = std::time::Instant::now();
        let (mut decode_us, mut read_ahead_us) = (0, 0);
        let mut next_read: Option<ReadAhead> = None;
        let written_signal = tokio::sync::Notify::new();
        let reread = std::sync::atomic::AtomicBool::new(false);
        let (config, node, tables) = (&self.config, &self.node, self.writer.tables.clone());
        let retired = std::mem::take(&mut self.retired);
        let floor = txns.last().map_or(0, |t| t.commit_lsn);
        let max_txns = self.config.apply.max_group_txns.min(self.group_budget.saturating_mul(2));
        let predecoded = &mut self.predecoded;
        let (decode_later, group) = if read_next {
            predecode(readers, predecoded, next, budget);
            decode_us = started.elapsed().as_micros() as u64;
            let decoded: &rustc_hash::FxHashMap<i64, pgferry_schemas::DecodedEvent> = predecoded;
            (None, next_group(config, node, decoded, next, floor, max_txns, budget))
        } else {
            (Some(predecoded), Vec::new())
        };
        let (spare_sql, spare_prepared, spare_statements) = match self.spare.as_mut().filter(|_| read_next) {
            Some(s) => (Some(&s.sql), Some(&mut s.prepared), Some(&mut s.statements)),
            None => (None, None, None),
        };
        let elsewhere = |schema: &str, table: &str| config.node(node).is_some_and(|n| config.local_elsewhere(n, schema, table));
        let read = async {
            match (spare_sql, spare_prepared) {
                (Some(sql), Some(prepared)) => crate::group::read_ahead(sql, prepared, &tables, &group, elsewhere).await,
                _ => Ok(None),
            }
        };
        let early = read_next && ahead.is_some();
        // Whether the work began (a read ahead may then be open) and whether it ended.
        let (mut work_began, mut work_done) = (false, false);
        let written = {
            let mut read = std::pin::pin!(futures::future::maybe_done(read));
            if early {
                let _ = futures::poll!(read.as_mut());
            }
            let (next_read_slot, signal, reread, decode_slot, read_slot, began, done) = (
                &mut next_read,
                &written_signal,
                &reread,
                &mut decode_us,
                &mut read_ahead_us,
                &mut work_began,
                &mut work_done,
            );
            let mut work = std::pin::pin!(async move {
                *began = true;
                if let Some(predecoded) = decode_later {
                    let t = std::time::Instant::now();
                    predecode(readers, predecoded, next, budget);
                    *decode_slot = t.elapsed().as_micros() as u64;
                }
                drop(retired);
                read.as_mut().await;
                let outcome = read.as_mut().take_output().unwrap_or(Ok(None));
                // From the start of the decode to the read's answer (`read_ahead_us` in the log
                // below; with `answered_us` of `group`, where a group's write phase goes).
                *read_slot = started.elapsed().as_micros() as u64;
                match outcome {
                    Ok(None) => {
                        *done = true;
                        return;
                    }
                    Ok(Some(read)) => {
                        let answered = tokio::time::timeout(AHEAD_HOLD, signal.notified()).await.is_ok();
                        if answered && !reread.load(Ordering::Relaxed) {
                            *next_read_slot = Some(read);
                            *done = true;
                            return;
                        }
                        if answered {
                            tracing::debug!(offset = read.first_offset, "the group before a group read ahead read again; reading it again later");
                        } else {
                            tracing::debug!(offset = read.first_offset, "the group before a group read ahead took too long; reading it again later");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "reading the next group ahead failed; it reads for itself"),
                }
                if let (Some(sql), Some(statements)) = (spare_sql, spare_statements) {
                    if sql.client.batch_execute("ROLLBACK").await.is_err() {
                        // A session that cannot roll back is not used again: `ensure_spare`
                        // opens a new one when it finds no statements.
                        *statements = None;
                    }
                }
                *done = true;
            });
            let while_writing = crate::group::WhileWriting {
                work: work.as_mut(),
                written: &written_signal,
                begun: early,
                reread: &reread,
            };
            let ahead = ahead.as_ref().map(|(read, carry)| crate::group::Ahead { read, carry });
            self.writer.write_group(&self.sql, origin, txns, commit, ahead, while_writing).await
        };
        tracing::debug!(origin = %origin, decode_ahead_us = decode_us, read_ahead_us, read_ahead = next_read.is_some(), "the next group decoded and read ahead");
        // A read sent ahead whose work did not end (the group ended before its writes: failed
        // or cut at its first transaction) is still open on the second session; it may wait for
        // a key lock of this group's transaction, so that one ends first.
        let unended_read = (early || work_began) && !work_done;
        self.writer.group_ended(written.is_err());
        let mut outcome = match written {
            Ok(o) if o.txns > 0 => o,
            other => {
                let _ = self.sql.client.batch_execute("ROLLBACK").await;
                if next_read.is_some() || unended_read {
                    self.drop_spare_read().await;
                }
                return other.map(|_| 0);
            }
        };
        if unended_read {
            self.drop_spare_read().await;
        }
        let last = &txns[outcome.txns - 1];
        self.metrics.group(outcome.txns);
        if outcome.read_ahead {
            self.metrics.group_read_ahead();
        }
        let m = self.origin_metrics(origin);
        m.rows(outcome.rows);
        for (conflict, resolution) in &outcome.conflicts {
            m.conflict(conflict.name(), resolution.name());
        }
        for t in &txns[..outcome.txns] {
            m.txn_applied(t.commit_ts_us);
        }
        if let Some(reason) = outcome.cut {
            tracing::debug!(node = %self.node, origin = %origin, applied = outcome.txns, of = txns.len(), ?reason, "group cut");
        }
        self.applied.insert(origin.to_string(), last.commit_lsn);
        self.progress.applied.fetch_add(outcome.txns as u64, Ordering::Relaxed);
        self.progress.offset.store(last.last_offset, Ordering::Relaxed);
        // The next group, read ahead, is written on the session that read it, which takes
        // over the replication origin; unless this group was cut (the next one then starts
        // elsewhere). Only now, with this group booked as applied: should the hand-over fail,
        // the caller's one-by-one fallback skips these committed transactions as duplicates.
        match (next_read, outcome.carry.take()) {
            (Some(read), Some(carry)) if outcome.txns == txns.len() => {
                self.hand_over(origin).await?;
                self.ahead = Some((read, carry));
            }
            (Some(_), _) => self.drop_spare_read().await,
            _ => {}
        }
        Ok(outcome.txns)
    }

    /// Whether the second session is there (opened, with its statements, if it was not): a
    /// failure to open it is logged and the stream goes on without reading ahead.
    async fn ensure_spare(&mut self) -> bool {
        if self.spare.as_ref().is_some_and(|s| !s.sql.client.is_closed() && s.statements.is_some()) {
            return true;
        }
        self.spare = None;
        let Some(open) = self.open_spare.clone() else { return false };
        let opened = async {
            let sql = open().await?;
            let statements = prepare_statements(&sql).await?;
            Ok::<_, ApplyError>(Spare {
                sql,
                statements: Some(statements),
                prepared: HashMap::new(),
                origin: None,
            })
        };
        match opened.await {
            Ok(spare) => {
                self.spare = Some(spare);
                true
            }
            Err(e) => {
                tracing::warn!(node = %self.node, source = %self.source, error = %e,
                    "cannot open the second session that reads groups ahead; applying without reading ahead");
                false
            }
        }
    }

    /// Rolls back a read ahead left open on the second session (the group before it failed
    /// or was cut); a session that does not answer is dropped (opened again when needed).
    async fn drop_spare_read(&mut self) {
        if let Some(spare) = &self.spare {
            if spare.sql.client.batch_execute("ROLLBACK").await.is_err() {
                self.spare = None;
            }
        }
    }

    /// Rolls back the read ahead open on the current session, unused.
    async fn drop_ahead(&mut self) -> Result<(), ApplyError> {
        if self.ahead.take().is_some() {
            self.exec("ROLLBACK", "rolling back a group read ahead").await?;
        }
        Ok(())
    }

    /// Makes the second session, which read the next group ahead, the current one: the
    /// replication origin `origin` moves to it (a session's origin can be set up on one session
    /// at a time).
    async fn hand_over(&mut self, origin: &str) -> Result<(), ApplyError> {
        self.release_origin().await?;
        self.swap_sessions();
        self.take_origin(origin).await
    }

    /// Resets the session's replication origin, if one is set up.
    async fn release_origin(&mut self) -> Result<(), ApplyError> {
        if self.session_origin.take().is_some() {
            self.exec("SELECT pg_replication_origin_session_reset()", "resetting the session's replication origin").await?;
        }
        Ok(())
    }

    /// Sets up `origin`'s replication origin (which exists) on the session.
    async fn take_origin(&mut self, origin: &str) -> Result<(), ApplyError> {
        let name = pgferry_schemas::naming::replication_origin(&self.config.cluster.name, &self.node, origin);
        self.sql
            .client
            .execute("SELECT pg_replication_origin_session_setup($1)", &[&name])
            .await
            .map_err(self.sql.err(format!("setting up replication origin {name}")))?;
        self.session_origin = Some(origin.to_string());
        Ok(())
    }

    /// Trades the current session, with its statements and replication origin, for the second.
    fn swap_sessions(&mut self) {
        let Some(spare) = self.spare.as_mut() else { return };
        std::mem::swap(&mut self.sql, &mut spare.sql);
        std::mem::swap(&mut self.statements, &mut spare.statements);
        std::mem::swap(&mut self.session_origin, &mut spare.origin);
        self.writer.swap_statements(&mut spare.prepared);
    }

    /// Waits until this node's clock has passed `commit_ts_us`, the commit time of the source
    /// transaction `commit_lsn` of `origin` about to be applied (of a group: its latest), at
    /// most `[apply] max_clock_skew_ms` (`crate::clock_skew`).
    async fn wait_for_clock(&mut self, origin: &str, commit_lsn: u64, commit_ts_us: i64) -> Result<(), ApplyError> {
        match self.clock_skew.wait_past(&self.sql, commit_ts_us).await? {
            SkewWait::None => {}
            SkewWait::Waited(waited) => {
                tracing::debug!(node = %self.node, origin = %origin, lsn = %format_lsn(commit_lsn),
                    waited_ms = waited.as_millis() as u64,
                    "waited for this node's clock to pass the origin commit time (clock skew)");
                self.origin_metrics(origin).clock_skew_wait(waited);
            }
            SkewWait::Exceeded(ahead_us) => {
                self.origin_metrics(origin).clock_skew_exceeded();
                if self.clock_skew.warning_due() {
                    tracing::warn!(node = %self.node, origin = %origin, lsn = %format_lsn(commit_lsn),
                        ahead_ms = ahead_us / 1000, max_clock_skew_ms = self.clock_skew.max_wait_ms() as u64,
                        "origin commit time is further ahead of this node's clock than [apply] max_clock_skew_ms: applied without waiting, so a local write made right after it may lose to it; synchronize the nodes' clocks (NTP) (repeated at most once a minute)");
                }
            }
        }
        Ok(())
    }

    fn origin_metrics(&mut self, origin: &str) -> &mut OriginMetrics {
        let metrics = &self.metrics;
        self.origin_metrics
            .entry(origin.to_string())
            .or_insert_with(|| metrics.origin(origin))
    }

    fn stream_err(&self, offset: i64, message: String) -> ApplyError {
        ApplyError::Stream {
            source_node: self.source.clone(),
            topic: self.topic.clone(),
            partition: self.partition,
            offset,
            message,
        }
    }

    /// A transaction (`what`) whose last event never came: the message at `offset` belongs to
    /// the next one.
    fn unended(&self, offset: i64, what: &str, (origin, lsn): (&str, u64), (next_origin, next_lsn): (&str, u64)) -> ApplyError {
        self.stream_err(
            offset,
            format!(
                "{what} {} of {origin} ended without its last event; next is {} of {next_origin}",
                format_lsn(lsn),
                format_lsn(next_lsn)
            ),
        )
    }

    fn unusable(&self, offset: i64, message: String) -> ApplyError {
        ApplyError::Unusable {
            source_node: self.source.clone(),
            topic: self.topic.clone(),
            partition: self.partition,
            offset,
            message,
        }
    }

    /// Applies one message; one that can never be applied (undecodable, unknown origin or
    /// table, …) goes to the dead-letter topic and `pgferry.exceptions` instead, and the stream
    /// goes on.
    async fn handle(&mut self, msg: &BorrowedMessage<'_>, open: &mut Option<OpenTxn>) -> Result<(), ApplyError> {
        match self.process(msg, open).await {
            Err(e @ ApplyError::Rejected { on_error: OnError::SkipTransaction, .. }) => {
                let Some(t) = open.take() else { return Err(e) };
                self.exec("ROLLBACK", "rolling back a skipped transaction").await?;
                let reason = format!("skipped with its whole transaction: {e}");
                tracing::warn!(node = %self.node, origin = %t.origin, lsn = %format_lsn(t.commit_lsn), topic = %self.topic,
                    partition = self.partition, offset = msg.offset(), error = %e,
                    "source transaction skipped (on_error = skip_transaction); its messages go to the dead-letter topic");
                // The messages already read go to the dead-letter topic as well (read again:
                // a transaction is never held in memory).
                let sent = self
                    .dead_letters
                    .send_range(&self.config.kafka, &self.sql, msg, t.first_offset, &reason)
                    .await?;
                self.dead_letters.send(&self.sql, msg, &reason).await?;
                for _ in 0..=sent {
                    self.metrics.dead_letter();
                }
                let skipped = SkippedTxn {
                    origin: t.origin,
                    commit_lsn: t.commit_lsn,
                    commit_ts_us: t.commit_ts_us,
                    reason,
                };
                if header(msg, HEADER_TXN_LAST) == Some("1") {
                    self.finish_skip(open, skipped, msg.offset()).await
                } else {
                    self.skipping = Some(skipped);
                    Ok(())
                }
            }
            Err(e) if e.dead_letter() => {
                tracing::warn!(node = %self.node, source = %self.source, topic = %self.topic, partition = self.partition,
                    offset = msg.offset(), error = %e, "message sent to the dead-letter topic");
                self.dead_letters.send(&self.sql, msg, &e.to_string()).await?;
                self.metrics.dead_letter();
                // A dead-lettered last event still ends its transaction.
                if header(msg, HEADER_TXN_LAST) == Some("1") {
                    if let Some(t) = open.as_ref() {
                        let (lsn, ts) = (t.commit_lsn, t.commit_ts_us);
                        self.commit(open, msg.offset(), lsn, ts).await?;
                    }
                }
                Ok(())
            }
            other => other,
        }
    }

    async fn process(&mut self, msg: &BorrowedMessage<'_>, open: &mut Option<OpenTxn>) -> Result<(), ApplyError> {
        let offset = msg.offset();
        let Some(origin) = header(msg, HEADER_ORIGIN) else {
            return Err(self.unusable(offset, "message without a pgferry-origin header".into()));
        };
        if origin == self.node && !self.apply_own {
            // This node's own change, forwarded back by a hub: never re-applied.
            return Ok(());
        }
        if self.only_origin.as_deref().is_some_and(|o| o != origin) {
            // A replay of another origin carried by the same partition.
            return Ok(());
        }
        let kind = header(msg, HEADER_KIND);
        match kind {
            Some("change" | "truncate" | "message") => {}
            Some("heartbeat") if open.is_none() => {
                self.origin_metrics(origin).heartbeat(msg);
                return Ok(());
            }
            other => {
                return Err(self.unusable(offset, format!("unexpected message kind {other:?}")));
            }
        }
        if self.config.node(origin).is_none() {
            return Err(self.unusable(offset, format!("origin {origin:?} is not a node of the cluster")));
        }
        if origin != self.source && open.is_none() {
            // A forwarded transaction: only from the one path the config routes it by.
            let ok = match self.config.node(&self.node) {
                Some(me) => {
                    let carriers = self.config.carriers(me, origin);
                    carriers.len() == 1 && carriers[0].name == self.source
                }
                None => false,
            };
            if !ok {
                return Err(self.unusable(
                    offset,
                    format!(
                        "origin {origin:?} in {}'s partition: the config does not route that origin to this node through {}",
                        self.source, self.source
                    ),
                ));
            }
        }
        let commit_lsn: u64 = header(msg, HEADER_COMMIT_LSN)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| self.stream_err(offset, "missing or bad pgferry-commit-lsn header".into()))?;
        if let Some(s) = self.skipping.take() {
            if s.origin != origin || s.commit_lsn != commit_lsn {
                return Err(self.unended(offset, "skipped transaction", (&s.origin, s.commit_lsn), (origin, commit_lsn)));
            }
            self.dead_letters.send(&self.sql, msg, &s.reason).await?;
            self.metrics.dead_letter();
            if header(msg, HEADER_TXN_LAST) == Some("1") {
                return self.finish_skip(open, s, offset).await;
            }
            self.skipping = Some(s);
            return Ok(());
        }
        if open.is_none() {
            // The session owns the origin from here (PostgreSQL lets one session at a time set
            // it up), so the progress it reads is final: a previous apply process that was
            // still committing when this one started has finished by now.
            self.use_origin(origin).await?;
            if commit_lsn <= self.applied.get(origin).copied().unwrap_or(0) {
                // Already applied (a replay or a re-read after restart): dedup by origin progress.
                if header(msg, HEADER_TXN_LAST) == Some("1") {
                    self.progress.skipped.fetch_add(1, Ordering::Relaxed);
                }
                return Ok(());
            }
        }
        if let Some(t) = open.as_ref() {
            if t.commit_lsn != commit_lsn || t.origin != origin {
                return Err(self.unended(offset, "transaction", (&t.origin, t.commit_lsn), (origin, commit_lsn)));
            }
        }
        let item = self.decode_item(msg, origin, kind).await?;
        let (commit_ts_us, txn_last) = match &item {
            Item::Change(ev) => (ev.commit_ts_us, ev.txn_last),
            Item::Truncate(t) => (t.ts_us, t.txn_last),
            Item::Message(m) => (m.ts_us, m.txn_last),
        };
        if open.is_none() {
            self.wait_for_clock(origin, commit_lsn, commit_ts_us).await?;
            self.begin(open, origin, offset, commit_lsn, commit_ts_us).await?;
        }
        if !matches!(item, Item::Truncate(_)) {
            self.flush_truncate().await?;
        }
        match &item {
            Item::Change(ev) => {
                // A table that skips single changes gets a savepoint around each (one more
                // round trip per change there, and none elsewhere).
                let savepoint = self.config.on_error(&ev.schema, &ev.table) == OnError::SkipChange;
                if savepoint {
                    self.exec("SAVEPOINT pgferry_change", "setting a savepoint").await?;
                }
                match self.writer.apply(&self.sql, ev).await {
                    Ok(settled) => {
                        if savepoint {
                            self.exec("RELEASE SAVEPOINT pgferry_change", "releasing a savepoint").await?;
                        }
                        let m = self.origin_metrics(&ev.origin);
                        m.row();
                        if let Some(s) = settled {
                            m.conflict(s.conflict.name(), s.resolution.name());
                        }
                    }
                    Err(e @ ApplyError::Rejected { on_error: OnError::SkipChange, .. }) if savepoint => {
                        self.exec("ROLLBACK TO SAVEPOINT pgferry_change; RELEASE SAVEPOINT pgferry_change", "rolling back to a savepoint").await?;
                        tracing::warn!(node = %self.node, origin = %ev.origin, lsn = %format_lsn(ev.commit_lsn),
                            topic = %self.topic, partition = self.partition, offset, error = %e,
                            "change skipped (on_error = skip_change); it goes to the dead-letter topic");
                        self.dead_letters.send(&self.sql, msg, &format!("skipped change: {e}")).await?;
                        self.metrics.dead_letter();
                    }
                    Err(e) => return Err(e),
                }
            }
            Item::Truncate(t) => {
                if self.writer.truncate_applies(t)? {
                    if self.truncating.first().is_some_and(|p| p.restart_identity != t.restart_identity) {
                        self.flush_truncate().await?;
                    }
                    self.truncating.push(t.clone());
                }
                self.origin_metrics(&t.origin).truncate();
            }
            Item::Message(m) => {
                let ran = match crate::ddl::parse(&m.prefix, &m.content) {
                    Some(_) if !self.config.replication.ddl => {
                        return Err(self.unusable(
                            offset,
                            "a replicated DDL statement, but DDL replication is off here ([replication] ddl = false)".into(),
                        ));
                    }
                    Some(ddl) => {
                        let ddl = ddl.map_err(|message| self.unusable(offset, message))?;
                        self.run_ddl(msg, &ddl).await?
                    }
                    None => true,
                };
                if ran {
                    // Written again in its place, so that a node forwarding this origin passes it
                    // on (this node's capture skips it otherwise: the transaction carries an
                    // origin). A skipped DDL statement is not passed on.
                    self.sql
                        .client
                        .execute("SELECT pg_logical_emit_message(true, $1, $2::bytea)", &[&m.prefix, &m.content])
                        .await
                        .map_err(self.sql.err(format!("re-emitting logical message {}", m.prefix)))?;
                }
            }
        }
        if txn_last {
            self.commit(open, offset, commit_lsn, commit_ts_us).await?;
        }
        Ok(())
    }

    /// Decodes one message of `origin` whose kind header is `kind` (readers and fixed-record
    /// schemas resolved once per writer schema id).
    async fn decode_item(&mut self, msg: &BorrowedMessage<'_>, origin: &str, kind: Option<&str>) -> Result<Item, ApplyError> {
        let offset = msg.offset();
        let payload = msg.payload().unwrap_or_default();
        let decode_err = |source| ApplyError::Decode {
            origin: origin.to_string(),
            topic: self.topic.clone(),
            partition: self.partition,
            offset,
            source,
        };
        let (schema_id, datum) = decode_frame(payload).map_err(decode_err)?;
        let writer_schema = match self.registry.schema(schema_id).await {
            Ok(s) => s,
            Err(e) if e.is_unknown_id() => return Err(decode_err(CodecError::Schema(e.to_string()))),
            Err(e) => return Err(e.into()),
        };
        Ok(if matches!(kind, Some("truncate" | "message")) {
            let schema = match self.fixed_schemas.get(&schema_id) {
                Some(s) => s.clone(),
                None => {
                    let parsed = apache_avro::Schema::parse_str(&writer_schema)
                        .map_err(|e| decode_err(CodecError::Schema(e.to_string())))?;
                    let parsed = Arc::new(parsed);
                    self.fixed_schemas.insert(schema_id, parsed.clone());
                    parsed
                }
            };
            if kind == Some("truncate") {
                Item::Truncate(Truncate::decode(&schema, datum).map_err(decode_err)?)
            } else {
                Item::Message(LogicalMessage::decode(&schema, datum).map_err(decode_err)?)
            }
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
        })
    }

    /// Runs replicated DDL in the open transaction, inside a savepoint so that a statement the
    /// node refuses follows the cluster's `on_error` like a change: `skip_change` skips it
    /// (dead-lettered, and the rest of the transaction is applied), the others stop or skip
    /// the transaction. Returns whether it ran (false: skipped).
    async fn run_ddl(&mut self, msg: &BorrowedMessage<'_>, ddl: &crate::ddl::DdlMessage) -> Result<bool, ApplyError> {
        let on_error = self.config.replication.on_error;
        self.exec("SAVEPOINT pgferry_ddl", "setting a savepoint").await?;
        match crate::ddl::apply(&self.sql, ddl).await {
            Ok(()) => {
                self.exec("RELEASE SAVEPOINT pgferry_ddl", "releasing a savepoint").await?;
                // Tables may have new columns or types: read them again.
                self.writer.forget_tables();
                if let Some(spare) = self.spare.as_mut() {
                    spare.prepared.clear();
                }
                self.ran_ddl = true;
                tracing::info!(node = %self.node, source = %self.source, offset = msg.offset(), sql = %ddl.sql, "replicated DDL applied");
                Ok(true)
            }
            Err(ApplyError::Pg(source)) if source.rejects_data() => {
                let e = ApplyError::Rejected {
                    origin: header(msg, HEADER_ORIGIN).unwrap_or_default().to_string(),
                    table: "(DDL)".into(),
                    on_error,
                    source,
                };
                if on_error != OnError::SkipChange {
                    return Err(e);
                }
                self.exec("ROLLBACK TO SAVEPOINT pgferry_ddl; RELEASE SAVEPOINT pgferry_ddl", "rolling back to a savepoint").await?;
                tracing::warn!(node = %self.node, source = %self.source, offset = msg.offset(), error = %e,
                    "replicated DDL skipped (on_error = skip_change); it goes to the dead-letter topic");
                self.dead_letters.send(&self.sql, msg, &format!("skipped DDL: {e}")).await?;
                self.metrics.dead_letter();
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Applies the truncate events held back (one TRUNCATE statement's tables), if any.
    async fn flush_truncate(&mut self) -> Result<(), ApplyError> {
        if self.truncating.is_empty() {
            return Ok(());
        }
        let tables = std::mem::take(&mut self.truncating);
        self.writer.truncate(&self.sql, &tables).await
    }

    /// Runs `statements` on the session; `what` names them in an error.
    async fn exec(&self, statements: &str, what: &str) -> Result<(), ApplyError> {
        self.sql
            .client
            .batch_execute(statements)
            .await
            .map_err(self.sql.err(what))
            .map_err(ApplyError::from)
    }

    /// Opens the local transaction of a source transaction under the session's origin.
    async fn begin(&mut self, open: &mut Option<OpenTxn>, origin: &str, offset: i64, commit_lsn: u64, commit_ts_us: i64) -> Result<(), ApplyError> {
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
        self.ran_ddl = false;
        self.truncating.clear();
        *open = Some(OpenTxn {
            origin: origin.to_string(),
            first_offset: offset,
            commit_lsn,
            commit_ts_us,
        });
        Ok(())
    }

    /// Ends a skipped transaction (its last message at `offset`): records its progress under
    /// its origin, with no changes, so it counts as done and is never retried.
    async fn finish_skip(&mut self, open: &mut Option<OpenTxn>, s: SkippedTxn, offset: i64) -> Result<(), ApplyError> {
        self.begin(open, &s.origin, offset, s.commit_lsn, s.commit_ts_us).await?;
        self.commit(open, offset, s.commit_lsn, s.commit_ts_us).await
    }

    /// Records progress and commits the open transaction (ended by the message at `offset`).
    async fn commit(&mut self, open: &mut Option<OpenTxn>, offset: i64, commit_lsn: u64, commit_ts_us: i64) -> Result<(), ApplyError> {
        self.flush_truncate().await?;
        {
            // Progress and COMMIT pipelined: if the progress write fails, the transaction is
            // aborted, COMMIT rolls it back, and the write's error is what try_join returns.
            let lsn = format_lsn(commit_lsn);
            let stmts = self
                .statements
                .as_ref()
                .ok_or_else(|| self.stream_err(offset, "session not prepared".into()))?;
            let origin = open.as_ref().map(|t| t.origin.clone()).unwrap_or_default();
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
                [&origin, &self.topic, &self.partition, &offset, &lsn, &commit_ts_us];
            let record = self.sql.client.execute(&stmts.progress, &params);
            futures::try_join!(record, self.sql.client.batch_execute("COMMIT"))
                .map_err(self.sql.err("recording pgferry.apply_progress and committing"))?;
            *open = None;
            if std::mem::take(&mut self.ran_ddl) {
                // Streams waiting for a table or column this DDL may have created retry now.
                self.schema_changed.notify_waiters();
            }
            self.origin_metrics(&origin).txn_applied(commit_ts_us);
            self.applied.insert(origin, commit_lsn);
            self.progress.applied.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Prepares on `sql` the statements every transaction runs.
async fn prepare_statements(sql: &PgSession) -> Result<SessionStatements, ApplyError> {
    let xact_setup = sql
        .client
        .prepare(
            "SELECT pg_replication_origin_xact_setup($1::text::pg_lsn,
                    'epoch'::timestamptz + $2::bigint * interval '1 microsecond')",
        )
        .await
        .map_err(sql.err("preparing pg_replication_origin_xact_setup"))?;
    let progress = sql
        .client
        .prepare(progress::UPSERT)
        .await
        .map_err(sql.err("preparing the progress update"))?;
    Ok(SessionStatements { xact_setup, progress })
}

/// The complete source transactions at the head of `msgs` that could make the next group (as
/// [`PartitionStream::try_group`] takes them: changes of the stream's source, already decoded
/// in `decoded`, committed after `floor`, of tables that may be grouped as far as the config
/// tells, at most `max_txns` transactions and `max_rows` changes): each with the offset of its
/// first message and its events.
fn next_group<'d>(
    config: &Config,
    node: &str,
    decoded: &'d rustc_hash::FxHashMap<i64, pgferry_schemas::DecodedEvent>,
    msgs: &[Held<'_>],
    floor: u64,
    max_txns: usize,
    max_rows: usize,
) -> Vec<(i64, Vec<&'d pgferry_schemas::DecodedEvent>)> {
    let mut txns = Vec::new();
    let mut current: Option<(u64, i64, Vec<&pgferry_schemas::DecodedEvent>)> = None;
    let mut rows = 0;
    for (m, meta) in msgs {
        let (Some(lsn), true, true) = (meta.commit_lsn, meta.from_source, meta.change) else { break };
        match &current {
            Some((l, ..)) if *l != lsn => break,
            None if lsn <= floor || txns.len() >= max_txns => break,
            _ => {}
        }
        rows += 1;
        let Some(ev) = decoded.get(&m.offset()) else { break };
        let skips_changes = config.on_error(&ev.schema, &ev.table) == OnError::SkipChange
            && !config.node(node).is_some_and(|n| config.local_elsewhere(n, &ev.schema, &ev.table));
        if rows > max_rows || skips_changes {
            break;
        }
        current.get_or_insert_with(|| (lsn, m.offset(), Vec::new())).2.push(ev);
        if ev.txn_last {
            if let Some((_, first, events)) = current.take() {
                txns.push((first, events));
            }
        }
    }
    txns
}

/// Decodes up to `budget` change messages at the head of `msgs` whose writer schema already has
/// a reader, into `into` by offset; stops at the first other message.
fn predecode(
    readers: &HashMap<u32, Arc<EnvelopeReader>>,
    into: &mut rustc_hash::FxHashMap<i64, pgferry_schemas::DecodedEvent>,
    msgs: &[Held<'_>],
    budget: usize,
) {
    for (m, meta) in msgs.iter().take(budget) {
        if !meta.change {
            return;
        }
        if into.contains_key(&m.offset()) {
            continue;
        }
        let Ok((schema_id, datum)) = decode_frame(m.payload().unwrap_or_default()) else { return };
        let Some(Ok(ev)) = readers.get(&schema_id).map(|r| r.decode(datum)) else { return };
        into.insert(m.offset(), ev);
    }
}

/// A message held for applying, with what the hot path reads from its headers.
type Held<'m> = (BorrowedMessage<'m>, Meta);

/// What grouping reads from a message's headers, read in one pass when the message arrives
/// (each [`header`] lookup walks librdkafka's header list through FFI: several per message
/// showed as ~10% of apply's CPU in a drain). The first occurrence of a header counts, as
/// with [`header`].
#[derive(Debug, Clone, Copy, Default)]
struct Meta {
    /// `pgferry-kind` is `change`.
    change: bool,
    /// `pgferry-kind` is `change`, `truncate` or `message`: part of a source transaction.
    in_txn_kind: bool,
    /// `pgferry-txn-last` is `1`.
    txn_last: bool,
    /// `pgferry-origin` is the stream's source node.
    from_source: bool,
    /// `pgferry-commit-lsn`, if it parses.
    commit_lsn: Option<u64>,
}

impl Meta {
    fn of(msg: &BorrowedMessage<'_>, source: &str) -> Meta {
        use rdkafka::message::Headers;
        let mut meta = Meta::default();
        let Some(headers) = msg.headers() else { return meta };
        let (mut kind, mut last, mut origin, mut lsn) = (false, false, false, false);
        for h in headers.iter() {
            let value = h.value.and_then(|v| std::str::from_utf8(v).ok());
            match h.key {
                HEADER_KIND if !kind => {
                    kind = true;
                    meta.change = value == Some("change");
                    meta.in_txn_kind = matches!(value, Some("change" | "truncate" | "message"));
                }
                HEADER_TXN_LAST if !last => {
                    last = true;
                    meta.txn_last = value == Some("1");
                }
                HEADER_ORIGIN if !origin => {
                    origin = true;
                    meta.from_source = value == Some(source);
                }
                HEADER_COMMIT_LSN if !lsn => {
                    lsn = true;
                    meta.commit_lsn = value.and_then(|v| v.parse().ok());
                }
                _ => {}
            }
        }
        meta
    }
}
