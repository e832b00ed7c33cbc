//! The capture loop: pgoutput messages in, Kafka transactions out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgferry_connectors::config::{Config, NodeConfig, Operation};
use pgferry_connectors::kafka::{
    self, RefusedMessage, TxProducer, HEADER_COMMIT_LSN, HEADER_KIND, HEADER_LOCAL_LSN, HEADER_ORIGIN, HEADER_TXN_LAST,
    HEADER_TXN_SEQ, HEADER_VIA,
};
use pgferry_connectors::postgres::{self, format_lsn, PgSession};
use pgferry_connectors::registry::Registry;
use pgferry_connectors::replication::{Confirmer, LogicalReplicationMessage, TupleData, WalMessage, WalStream};
use pgferry_schemas::codec::{encode_event_framed, encode_frame};
use pgferry_schemas::event::Row;
use pgferry_schemas::heartbeat::{Heartbeat, HEARTBEAT_NAME, HEARTBEAT_SCHEMA};
use pgferry_schemas::logical_message::{LogicalMessage, MESSAGE_NAME, MESSAGE_SCHEMA};
use pgferry_schemas::naming::{legacy_slot_name, publication_name, replication_origins_read, slot_name, subject};
use pgferry_schemas::truncate::{Truncate, TRUNCATE_NAME, TRUNCATE_SCHEMA};
use pgferry_schemas::{ChangeEvent, Op, SourceInfo};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::mpsc;

use crate::error::CaptureError;
use crate::metrics::CaptureMetrics;
use crate::relations::Relations;

/// Tuning of the capture loop.
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// Most source transactions per Kafka transaction.
    pub max_batch_txns: usize,
    /// Longest a Kafka transaction stays open while more data keeps arriving.
    pub max_batch_age: Duration,
    /// Messages read ahead from PostgreSQL.
    pub read_ahead: usize,
    /// How often capture writes a heartbeat into the WAL (and so into its partition).
    pub heartbeat_interval: Duration,
    /// Where capture counts what it produces (see [`crate::metrics`]).
    pub metrics: CaptureMetrics,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        CaptureOptions {
            max_batch_txns: 2000,
            max_batch_age: Duration::from_millis(50),
            read_ahead: 4096,
            heartbeat_interval: Duration::from_secs(5),
            metrics: CaptureMetrics::default(),
        }
    }
}

/// Which node a transaction's events name as their origin, and where they go.
#[derive(Clone)]
struct Route {
    /// Origin node name (this node, or the origin of a forwarded transaction).
    origin: Arc<str>,
    /// Origin node id.
    node_id: u16,
    /// Origin region.
    region: Arc<str>,
    /// Commit LSN on the origin: the dedup key apply uses.
    commit_lsn: u64,
    /// For a forwarded transaction, this node's own commit LSN of it (what capture resumes by).
    forwarded_local_lsn: Option<u64>,
}

/// The source transaction being read.
struct SourceTxn {
    xid: u32,
    route: Route,
    commit_ts_us: i64,
    /// Applied by pgferry (carries an origin) or already in Kafka: read but not produced.
    skip: bool,
    /// Events produced so far.
    produced: u64,
    /// Per-table event counters (data_collection_order).
    per_table: std::collections::HashMap<u32, u64>,
    /// The last event, held back until we know whether it ends the transaction.
    pending: Option<Pending>,
    /// Spread over more than one Kafka transaction: its messages carry `pgferry-txn-seq`.
    split: bool,
    /// Resumed after a restart that found it in Kafka up to this `txn_seq`: those events are
    /// read again but not produced.
    resume_after: Option<u64>,
}

/// An event of the open transaction, with its route and `txn_seq`.
struct Pending {
    route: Route,
    seq: u64,
    body: PendingBody,
}

enum PendingBody {
    Change { relation_id: u32, event: ChangeEvent },
    Truncate(Truncate),
    Message(LogicalMessage),
}

/// Runs capture for `node_name` until an error (the caller restarts it with backoff).
pub async fn run(config: Arc<Config>, node_name: &str, options: CaptureOptions) -> Result<(), CaptureError> {
    let node = config.node(node_name).cloned().ok_or_else(|| CaptureError::Setup {
        node: node_name.into(),
        message: "not in the config's [[nodes]]".into(),
    })?;
    let sql = postgres::connect(&node.dsn, &format!("pgferry-capture-{}", node.name)).await?;
    let slot = slot_name(&config.cluster.name, &node.name);
    let legacy = legacy_slot_name(&node.name);
    let row = sql
        .client
        .query_one(
            "SELECT current_database()::text,
                    (SELECT database::text FROM pg_replication_slots WHERE slot_name = $1),
                    EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $2 AND database = current_database())",
            &[&slot, &legacy],
        )
        .await
        .map_err(sql.err("looking up the replication slot"))?;
    let (db, slot_db, legacy_here): (String, Option<String>, bool) = (row.get(0), row.get(1), row.get(2));
    let wrong = match slot_db {
        Some(d) if d == db => None,
        Some(d) => Some(format!(
            "replication slot {slot} at {} belongs to database {d:?}, not this node's {db:?} (another cluster named {:?} on this server?); `pgferry init` says more",
            sql.endpoint, config.cluster.name
        )),
        None if legacy_here => Some(format!(
            "replication slot {slot} does not exist at {}, but {legacy} of an earlier pgferry does: with capture stopped, run `pgferry init` to move it to its new name",
            sql.endpoint
        )),
        None => Some(format!(
            "replication slot {slot} does not exist at {}; run `pgferry init` first",
            sql.endpoint
        )),
    };
    if let Some(message) = wrong {
        return Err(CaptureError::Setup {
            node: node.name.clone(),
            message,
        });
    }
    check_delta_tables(&config, &node.name, &sql).await?;

    let topic = config.region_topic(&node.region);
    let partition = config.node_partition(&node);
    let kcfg = config.kafka.clone();
    let txn_id = format!("pgferry-{}-{}", config.cluster.name, node.name);
    let began = Instant::now();
    // Kafka start-up (fencing, then reading the partition's tail: in that order, so no older
    // instance can commit after the tail is read) runs on a blocking thread while the fixed
    // records are registered, concurrently: the benchmark counts from process start, and
    // capture's start-up was 0.6–1.2 s of a 2.6–4.5 s `capture-throughput` run.
    let kafka_startup = {
        let (kcfg, txn_id, topic, me) = (kcfg.clone(), txn_id.clone(), topic.clone(), node.name.clone());
        let produce_latency = options.metrics.produce_latency();
        let group = format!("pgferry-{}-{}-capture", config.cluster.name, node.name);
        tokio::task::spawn_blocking(
            move || -> Result<(TxProducer, Option<kafka::ProducedPosition>), CaptureError> {
                // A refused login or TLS handshake fails here with the brokers' reason.
                let t = Instant::now();
                kafka::check_reachable(&kcfg, std::time::Duration::from_secs(10))?;
                let reachable_ms = t.elapsed().as_millis() as u64;
                let producer = kafka::transactional_producer(&kcfg, &txn_id, Some(produce_latency))?;
                let fenced_ms = t.elapsed().as_millis() as u64;
                let last = kafka::last_produced_position(&kcfg, &group, &topic, partition, &me)?;
                tracing::debug!(node = %me, reachable_ms, fenced_ms, tail_read_ms = t.elapsed().as_millis() as u64,
                    "capture's Kafka start-up");
                Ok((producer, last))
            },
        )
    };
    let registry = Registry::new(&config.registry)?;
    let (
        (heartbeat_id, heartbeat_schema),
        (truncate_id, truncate_schema),
        (message_id, message_schema),
    ) = tokio::try_join!(
        fixed_record(&registry, &topic, HEARTBEAT_NAME, HEARTBEAT_SCHEMA),
        fixed_record(&registry, &topic, TRUNCATE_NAME, TRUNCATE_SCHEMA),
        fixed_record(&registry, &topic, MESSAGE_NAME, MESSAGE_SCHEMA),
    )?;
    let registered = began.elapsed();
    let (producer, last_pos) = kafka_startup
        .await
        .map_err(|e| CaptureError::Protocol(format!("capture start-up task failed: {e}")))??;
    let last_lsn = last_pos.map(|p| p.complete_up_to());
    let resume = last_pos.and_then(|p| Some((p.commit_lsn, p.partial_seq?)));
    if let Some((lsn, seq)) = resume {
        tracing::info!(node = %node.name, %topic, partition, commit_lsn = %format_lsn(lsn), txn_seq = seq,
            "resuming a source transaction that was committed to Kafka in part");
    }
    tracing::info!(node = %node.name, %topic, partition, last_produced_commit_lsn = ?last_lsn,
        registered_ms = registered.as_millis() as u64, kafka_ready_ms = began.elapsed().as_millis() as u64,
        "capture starting");
    // Replication origin name → the node whose applied transactions this node forwards (its
    // legacy name too: the slot may still hold transactions applied before an upgrade).
    let forward = node
        .forward_origins
        .iter()
        .filter_map(|f| config.node(f))
        .flat_map(|o| {
            let to = (Arc::<str>::from(o.name.as_str()), o.id, Arc::<str>::from(o.region.as_str()));
            replication_origins_read(&config.cluster.name, &node.name, &o.name).map(|name| (name, to.clone()))
        })
        .collect();
    let stream = WalStream::start(&node.dsn, &slot, publication_name()).await?;
    let _connected = options.metrics.connected();
    tracing::debug!(node = %node.name, elapsed_ms = began.elapsed().as_millis() as u64, "replication stream started");
    let (rx, confirmer) = stream.into_channel(options.read_ahead);
    let _heartbeats = AbortOnDrop(tokio::spawn(emit_heartbeats(node.clone(), options.heartbeat_interval)));
    let mut capture = Capture {
        relations: Relations::new(&config.cluster.name, &topic, registry),
        operations: std::collections::HashMap::new(),
        toast_warned: std::collections::HashSet::new(),
        heartbeat_id,
        heartbeat_schema,
        truncate_id,
        truncate_schema,
        message_id,
        message_schema,
        forward,
        own: (Arc::from(node.name.as_str()), Arc::from(node.region.as_str())),
        cluster: Arc::from(config.cluster.name.as_str()),
        config,
        node,
        db: Arc::from(db),
        sql,
        topic,
        partition,
        producer,
        confirmer,
        last_lsn: last_lsn.unwrap_or(0),
        resume,
        split_after: kafka::transaction_timeout(&kcfg) / 4,
        txn_timeout: kafka::transaction_timeout(&kcfg),
        options,
        txn: None,
        kafka_txn_open: false,
        batch_txns: 0,
        batch_started: Instant::now(),
        batch_end_lsn: 0,
    };
    let mut result = capture.run(rx).await;
    if let Err(e) = result {
        // The broker refuses a message (or its batch) as too large only in its delivery report;
        // the commit or a later send fails with a less telling error.
        result = Err(match capture.producer.context().take_too_large() {
            Some(refused) => capture.refused_by_broker(&refused).await,
            None => e,
        });
    }
    if let Err(e @ CaptureError::EventTooLarge { commit_lsn_value, .. }) = &result {
        capture
            .options
            .metrics
            .event_too_large(*commit_lsn_value, &e.to_string());
    }
    if capture.kafka_txn_open {
        let p = &capture.producer;
        let _ = tokio::task::block_in_place(|| p.abort_transaction(Duration::from_secs(10)));
    }
    result
}

/// Checks that every table with delta columns has REPLICA IDENTITY FULL on this node: apply
/// needs each update's old value to compute `new − old`, and only a full replica identity makes
/// PostgreSQL log it.
pub async fn check_delta_tables(config: &Config, node: &str, sql: &PgSession) -> Result<(), CaptureError> {
    let tables = match config.node(node) {
        Some(n) => postgres::replicated_tables(config, n, sql).await?,
        None => Vec::new(),
    };
    for (schema, table) in tables {
        let delta = config.delta_columns(&schema, &table);
        if delta.is_empty() {
            continue;
        }
        let ident: Option<String> = sql
            .client
            .query_opt(
                "SELECT c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&schema, &table],
            )
            .await
            .map_err(sql.err(format!("reading the replica identity of {schema}.{table}")))?
            .map(|r| r.get(0));
        if ident.as_deref() != Some("f") {
            return Err(CaptureError::Setup {
                node: node.to_string(),
                message: format!(
                    "table {schema}.{table} at {} has delta_columns {delta:?} but its REPLICA IDENTITY is not FULL, so updates do not carry the old values the deltas need; run ALTER TABLE {schema}.{table} REPLICA IDENTITY FULL",
                    sql.endpoint
                ),
            });
        }
    }
    Ok(())
}

/// Registers one of the fixed records (heartbeat, truncate) under `topic` and parses it.
async fn fixed_record(
    registry: &Registry,
    topic: &str,
    name: &str,
    schema_json: &str,
) -> Result<(u32, apache_avro::Schema), CaptureError> {
    let id = registry.register(&subject(topic, name), name, schema_json).await?;
    let schema = apache_avro::Schema::parse_str(schema_json).map_err(|e| CaptureError::Encode {
        table: name.into(),
        source: pgferry_schemas::CodecError::Schema(e.to_string()),
    })?;
    Ok((id, schema))
}

/// Prefix of the logical messages capture writes as heartbeats.
const HEARTBEAT_PREFIX: &str = "pgferry.heartbeat";

/// Writes a non-transactional logical message every `interval`, so the slot has something to
/// confirm on an idle database. Failures are logged; the next tick tries again.
async fn emit_heartbeats(node: NodeConfig, interval: Duration) {
    let mut session = None;
    loop {
        tokio::time::sleep(interval).await;
        if session.is_none() {
            match postgres::connect(&node.dsn, &format!("pgferry-heartbeat-{}", node.name)).await {
                Ok(s) => session = Some(s),
                Err(e) => {
                    tracing::warn!(node = %node.name, error = %e, "heartbeat: cannot connect");
                    continue;
                }
            }
        }
        if let Some(s) = &session {
            if let Err(e) = s
                .client
                .execute(
                    // The content is the emission time (µs since the Unix epoch): every
                    // transaction that commits after the message was stamped at about that time
                    // or later, which is what apply's tombstone collection relies on.
                    "SELECT pg_logical_emit_message(false, $1,
                        ((extract(epoch FROM clock_timestamp()) * 1000000)::int8)::text)",
                    &[&HEARTBEAT_PREFIX],
                )
                .await
            {
                tracing::warn!(node = %node.name, error = %e, "heartbeat failed");
                session = None;
            }
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Capture {
    heartbeat_id: u32,
    heartbeat_schema: apache_avro::Schema,
    truncate_id: u32,
    truncate_schema: apache_avro::Schema,
    message_id: u32,
    message_schema: apache_avro::Schema,
    /// Replication origin name → (node name, id, region) of the origins this node forwards.
    forward: std::collections::HashMap<String, (Arc<str>, u16, Arc<str>)>,
    /// This node's name and region, shared by the routes of its own transactions.
    own: (Arc<str>, Arc<str>),
    config: Arc<Config>,
    node: NodeConfig,
    /// The cluster's name and this node's database, shared by every event's `source`.
    cluster: Arc<str>,
    db: Arc<str>,
    sql: PgSession,
    topic: String,
    partition: i32,
    producer: TxProducer,
    confirmer: Confirmer,
    relations: Relations,
    /// Relation id → the operations of `replication.table.<t>.operations` it replicates
    /// (looked up once per relation; forgotten when PostgreSQL describes the relation again).
    operations: std::collections::HashMap<u32, [bool; 4]>,
    /// Tables this process has warned about sending updates without an unchanged TOAST value
    /// (their REPLICA IDENTITY is not FULL; issue 16, scenario 5), so the warning comes once.
    toast_warned: std::collections::HashSet<String>,
    /// Highest commit LSN known to be in Kafka.
    last_lsn: u64,
    /// A source transaction found in Kafka in part at start-up: its commit LSN and the last
    /// `txn_seq` committed.
    resume: Option<(u64, u64)>,
    /// A Kafka transaction open this long is committed in the middle of the source transaction
    /// being produced (a quarter of `transaction.timeout.ms`).
    split_after: Duration,
    /// The producer's `transaction.timeout.ms`.
    txn_timeout: Duration,
    options: CaptureOptions,
    txn: Option<SourceTxn>,
    kafka_txn_open: bool,
    batch_txns: usize,
    batch_started: Instant,
    /// End LSN of the last source transaction in the open Kafka transaction.
    batch_end_lsn: u64,
}

impl Capture {
    async fn run(
        &mut self,
        mut rx: mpsc::Receiver<Result<Box<WalMessage>, pgferry_connectors::replication::ReplicationError>>,
    ) -> Result<(), CaptureError> {
        // Messages are taken from the read-ahead channel up to READ_BATCH at a time. Receiving
        // one by one from a full channel freed one slot per message and woke the parked reader
        // task every time (a futex wake and a context switch per message): `perf record` of
        // `pgferry-bench capture-throughput` put ~12% of capture's CPU samples under
        // `mpsc::Rx::recv` → `Semaphore::add_permits_locked` → `notify_parked_remote`, plus
        // most of the runtime worker's park/unpark time.
        const READ_BATCH: usize = 512;
        let mut batch = std::collections::VecDeque::with_capacity(READ_BATCH);
        let mut received = Vec::with_capacity(READ_BATCH);
        loop {
            if batch.is_empty() {
                let got = if self.kafka_txn_open && self.txn.is_none() {
                    let wait = self.options.max_batch_age.saturating_sub(self.batch_started.elapsed());
                    match tokio::time::timeout(wait, rx.recv_many(&mut received, READ_BATCH)).await {
                        Ok(n) => n,
                        Err(_) => {
                            self.commit_batch()?;
                            continue;
                        }
                    }
                } else {
                    rx.recv_many(&mut received, READ_BATCH).await
                };
                if got == 0 {
                    return Err(CaptureError::Protocol("replication stream ended".into()));
                }
                batch.extend(received.drain(..));
            }
            let Some(msg) = batch.pop_front() else { continue };
            let msg = msg?;
            self.handle(msg).await?;
            // Commit at a transaction boundary when nothing more is waiting, or the batch is big or old.
            if self.kafka_txn_open
                && self.txn.is_none()
                && ((batch.is_empty() && rx.is_empty())
                    || self.batch_txns >= self.options.max_batch_txns
                    || self.batch_started.elapsed() >= self.options.max_batch_age)
            {
                self.commit_batch()?;
            }
        }
    }

    async fn handle(&mut self, msg: Box<WalMessage>) -> Result<(), CaptureError> {
        match msg.message {
            LogicalReplicationMessage::Begin {
                final_lsn,
                timestamp,
                xid,
            } => {
                self.txn = Some(SourceTxn {
                    xid,
                    route: Route {
                        origin: self.own.0.clone(),
                        node_id: self.node.id,
                        region: self.own.1.clone(),
                        commit_lsn: final_lsn,
                        forwarded_local_lsn: None,
                    },
                    commit_ts_us: timestamp + PG_EPOCH_OFFSET_US,
                    skip: final_lsn <= self.last_lsn,
                    produced: 0,
                    per_table: Default::default(),
                    pending: None,
                    split: false,
                    resume_after: None,
                });
                if let (Some((lsn, seq)), Some(t)) = (self.resume, self.txn.as_mut()) {
                    if lsn == final_lsn {
                        (t.split, t.resume_after) = (true, Some(seq));
                    }
                }
            }
            LogicalReplicationMessage::Origin {
                ref origin_name,
                origin_lsn,
            } => {
                // Written by pgferry's apply (or another replication tool): published only if
                // this node forwards that origin, under the origin's name and commit LSN, so
                // nothing loops and the origin's dedup key stays the same on every path.
                if let Some(t) = self.txn.as_mut() {
                    match self.forward.get(origin_name.as_str()) {
                        Some((name, id, region)) => {
                            tracing::trace!(origin = %name, xid = t.xid, "forwarding applied transaction");
                            t.route = Route {
                                origin: name.clone(),
                                node_id: *id,
                                region: region.clone(),
                                commit_lsn: origin_lsn,
                                forwarded_local_lsn: Some(t.route.commit_lsn),
                            };
                        }
                        None => {
                            tracing::trace!(origin = %origin_name, xid = t.xid, "skipping applied transaction");
                            t.skip = true;
                        }
                    }
                }
            }
            LogicalReplicationMessage::Relation { relation_id, .. } => {
                self.operations.remove(&relation_id);
                self.relations.update(&self.sql, &msg.message).await?;
            }
            LogicalReplicationMessage::Insert { relation_id, tuple } => {
                self.change(relation_id, Op::Create, None, Some(tuple), msg.wal_start)?;
            }
            LogicalReplicationMessage::Update {
                relation_id,
                old_tuple,
                new_tuple,
                ..
            } => {
                self.change(relation_id, Op::Update, old_tuple, Some(new_tuple), msg.wal_start)?;
            }
            LogicalReplicationMessage::Delete {
                relation_id, old_tuple, ..
            } => {
                self.change(relation_id, Op::Delete, Some(old_tuple), None, msg.wal_start)?;
            }
            LogicalReplicationMessage::Commit {
                commit_lsn, end_lsn, ..
            } => {
                let Some(mut txn) = self.txn.take() else {
                    return Err(CaptureError::Protocol(format!("Commit at {commit_lsn} without Begin")));
                };
                if let Some(p) = txn.pending.take() {
                    self.produce(p, true, txn.split, txn.resume_after)?;
                }
                if txn.resume_after.is_some() {
                    self.resume = None;
                }
                if txn.produced > 0 {
                    self.options.metrics.source_txn(txn.commit_ts_us);
                    self.batch_txns += 1;
                    self.last_lsn = self.last_lsn.max(commit_lsn);
                }
                if self.kafka_txn_open {
                    self.batch_end_lsn = end_lsn;
                } else {
                    // Nothing of ours is in flight: this position is safe to confirm now.
                    self.confirmer.confirm(end_lsn);
                }
            }
            LogicalReplicationMessage::Message {
                ref prefix,
                lsn,
                ref content,
                ..
            } if prefix == HEARTBEAT_PREFIX && self.txn.is_none() => {
                // Emitted with its emission time; an empty one (an older pgferry) is dated now.
                let emitted_us = std::str::from_utf8(content).ok().and_then(|t| t.parse::<i64>().ok());
                self.heartbeat(lsn, msg.wal_end, emitted_us.unwrap_or_else(|| now_ms() * 1000))?;
            }
            LogicalReplicationMessage::Message {
                flags,
                lsn,
                ref prefix,
                ref content,
            } if flags & 1 == 1 => {
                self.message(prefix, content, lsn)?;
            }
            LogicalReplicationMessage::Message { ref prefix, .. } => {
                // Non-transactional messages of others have no place in a transaction stream.
                tracing::trace!(node = %self.node.name, %prefix, "non-transactional logical message ignored");
            }
            LogicalReplicationMessage::Truncate {
                ref relation_ids,
                flags,
            } => {
                self.truncate(relation_ids, flags)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn change(
        &mut self,
        relation_id: u32,
        op: Op,
        old: Option<TupleData>,
        new: Option<TupleData>,
        lsn: u64,
    ) -> Result<(), CaptureError> {
        let Some(txn) = self.txn.as_mut() else {
            return Err(CaptureError::Protocol(format!(
                "row change at {lsn} outside a transaction"
            )));
        };
        if txn.skip {
            return Ok(());
        }
        let operation = match op {
            Op::Create | Op::Read => Operation::Insert,
            Op::Update => Operation::Update,
            Op::Delete => Operation::Delete,
            Op::Truncate => Operation::Truncate,
        };
        if !self.replicates(relation_id, operation)? {
            return Ok(());
        }
        let Some(txn) = self.txn.as_mut() else {
            return Ok(());
        };
        let rel = self.relations.get(relation_id)?;
        let width = rel.schemas.table.columns.len();
        let before = old.as_ref().map(|t| tuple_row(t, width)).transpose()?;
        let mut unchanged_toast = Vec::new();
        let after = match new.as_ref() {
            None => None,
            Some(t) => {
                let mut row = tuple_row(t, width)?;
                for (i, c) in t.columns.iter().enumerate().take(width) {
                    if c.data_type == b'u' {
                        // REPLICA IDENTITY FULL sends the old value: use it; otherwise list the column.
                        match before.as_ref().and_then(|b| b[i].clone()) {
                            Some(v) => row[i] = Some(v),
                            None => unchanged_toast.push(rel.schemas.table.columns[i].name.clone()),
                        }
                    }
                }
                Some(row)
            }
        };
        if !unchanged_toast.is_empty() && !self.toast_warned.contains(&rel.display) {
            // Apply keeps the local value for such a column, so when this update meets a
            // concurrent change of the row from another node the nodes can keep different
            // values (docs/decisions.md, "Unchanged TOAST values").
            tracing::warn!(
                table = %rel.display,
                columns = ?unchanged_toast,
                "an update of {} does not carry its unchanged large values (TOAST) because the table's REPLICA IDENTITY is not FULL; \
                 if other nodes update the same rows concurrently, nodes can end with different values: run ALTER TABLE {} REPLICA IDENTITY FULL",
                rel.display,
                rel.display
            );
            self.toast_warned.insert(rel.display.clone());
        }
        let order = txn.per_table.entry(relation_id).or_insert(0);
        *order += 1;
        let route = &txn.route;
        let event = ChangeEvent {
            op,
            before,
            after,
            source: SourceInfo {
                cluster: self.cluster.clone(),
                db: self.db.clone(),
                origin: route.origin.clone(),
                node_id: route.node_id,
                region: route.region.clone(),
                commit_ts_us: txn.commit_ts_us,
                tx_id: txn.xid,
                lsn,
                commit_lsn: route.commit_lsn,
                origin_lsn: route.forwarded_local_lsn.map(|_| route.commit_lsn),
                txn_seq: txn.produced,
                data_collection_order: *order,
                txn_last: false,
                unchanged_toast,
            },
            ts_ms: now_ms(),
        };
        self.queue(PendingBody::Change { relation_id, event })
    }

    /// Holds `body` back as the open transaction's latest event and produces the one before it
    /// (which is now known not to be the last).
    fn queue(&mut self, body: PendingBody) -> Result<(), CaptureError> {
        let Some(txn) = self.txn.as_mut() else {
            return Err(CaptureError::Protocol("event outside a transaction".into()));
        };
        let next = Pending {
            route: txn.route.clone(),
            seq: txn.produced,
            body,
        };
        txn.produced += 1;
        // A source transaction that has kept a Kafka transaction open for a quarter of the
        // transaction timeout is cut here: the event before this one ends a Kafka transaction
        // (the slot is not confirmed past the last whole source transaction) and the rest goes
        // on in the next (docs/decisions.md, "Capture liveness").
        let cut = txn.pending.is_some() && self.kafka_txn_open && self.batch_started.elapsed() >= self.split_after;
        txn.split |= cut;
        let (split, resume_after) = (txn.split, txn.resume_after);
        if let Some(prev) = txn.pending.replace(next) {
            let (seq, lsn) = (prev.seq, prev.route.commit_lsn);
            self.produce(prev, false, split, resume_after)?;
            if cut && self.kafka_txn_open {
                self.commit_batch()?;
                self.options.metrics.transaction_split();
                tracing::debug!(node = %self.node.name, commit_lsn = %format_lsn(lsn), txn_seq = seq,
                    "source transaction continues in the next Kafka transaction");
            }
        }
        Ok(())
    }

    /// Queues a transactional logical message in its place in the transaction.
    fn message(&mut self, prefix: &str, content: &[u8], lsn: u64) -> Result<(), CaptureError> {
        let Some(txn) = self.txn.as_ref() else {
            return Err(CaptureError::Protocol(format!(
                "transactional message at {lsn} outside a transaction"
            )));
        };
        if txn.skip {
            return Ok(());
        }
        let m = LogicalMessage {
            origin: txn.route.origin.to_string(),
            node_id: txn.route.node_id,
            prefix: prefix.to_string(),
            content: content.to_vec(),
            lsn,
            commit_lsn: txn.route.commit_lsn,
            ts_us: txn.commit_ts_us,
            txn_seq: txn.produced,
            txn_last: false,
        };
        self.queue(PendingBody::Message(m))
    }

    /// Produces event `p` (`last`: it ends its source transaction; `split`: the transaction
    /// spans Kafka transactions, so the message carries its `txn_seq`), unless a restart found
    /// it in Kafka already (`txn_seq` at or below `resume_after`).
    fn produce(&mut self, p: Pending, last: bool, split: bool, resume_after: Option<u64>) -> Result<(), CaptureError> {
        if resume_after.is_some_and(|k| p.seq <= k) {
            return Ok(());
        }
        let route = &p.route;
        let seq = split.then_some(p.seq);
        match p.body {
            PendingBody::Change { relation_id, mut event } => {
                event.source.txn_last = last;
                let rel = self.relations.get(relation_id)?;
                let (key, value) =
                    encode_event_framed(&rel.schemas, rel.key_id, rel.value_id, &event).map_err(|source| {
                        CaptureError::Encode {
                            table: rel.display.clone(),
                            source,
                        }
                    })?;
                let (table, lsn) = (rel.schemas.clone(), event.source.lsn);
                self.send(Some(&key), &value, "change", route, last, seq).map_err(|e| {
                    e.naming(
                        || {
                            format!(
                                "a change of {}.{} with key {}",
                                table.table.schema,
                                table.table.name,
                                key_text(&table.table, &event)
                            )
                        },
                        Some(lsn),
                    )
                })
            }
            PendingBody::Truncate(mut t) => {
                t.txn_last = last;
                let value = t.encode(&self.truncate_schema).map_err(|source| CaptureError::Encode {
                    table: format!("{}.{}", t.schema, t.table),
                    source,
                })?;
                let value = encode_frame(self.truncate_id, &value);
                let table = format!("{}.{}", t.schema, t.table);
                self.send(None, &value, "truncate", route, last, seq)
                    .map_err(|e| e.naming(|| format!("a truncate of {table}"), None))
            }
            PendingBody::Message(mut m) => {
                m.txn_last = last;
                let value = m.encode(&self.message_schema).map_err(|source| CaptureError::Encode {
                    table: format!("message {}", m.prefix),
                    source,
                })?;
                let value = encode_frame(self.message_id, &value);
                self.send(None, &value, "message", route, last, seq)
                    .map_err(|e| e.naming(|| format!("a logical message with prefix {:?}", m.prefix), Some(m.lsn)))
            }
        }
    }

    /// Queues one truncate event per truncated table (pgoutput lists them in one message).
    /// Whether the table of `relation_id` replicates changes of kind `op`.
    fn replicates(&mut self, relation_id: u32, op: Operation) -> Result<bool, CaptureError> {
        let index = op as usize;
        if let Some(ops) = self.operations.get(&relation_id) {
            return Ok(ops[index]);
        }
        let table = &self.relations.get(relation_id)?.schemas.table;
        let listed = |c: &Config| c.replicates_table(&table.schema, &table.name);
        if !listed(&self.config) {
            // Published but not in the sets loaded at start: added since (`pgferry repset
            // add-table` edits the file before it publishes the table), so its options are there.
            if let Some(fresh) = self.config.reload().filter(|c| listed(c)) {
                tracing::info!(node = %self.node.name, table = %format!("{}.{}", table.schema, table.name),
                    "replication sets re-read from the config file");
                self.config = Arc::new(fresh);
            }
        }
        let ops = [Operation::Insert, Operation::Update, Operation::Delete, Operation::Truncate]
            .map(|o| self.config.replicates_operation(&table.schema, &table.name, o));
        self.operations.insert(relation_id, ops);
        Ok(ops[index])
    }

    fn truncate(&mut self, relation_ids: &[u32], flags: u8) -> Result<(), CaptureError> {
        for &relation_id in relation_ids {
            let Some(txn) = self.txn.as_ref() else {
                return Err(CaptureError::Protocol("TRUNCATE outside a transaction".into()));
            };
            if txn.skip {
                return Ok(());
            }
            if !self.replicates(relation_id, Operation::Truncate)? {
                continue;
            }
            let Some(txn) = self.txn.as_ref() else {
                return Ok(());
            };
            let table = &self.relations.get(relation_id)?.schemas.table;
            let t = Truncate {
                origin: txn.route.origin.to_string(),
                node_id: txn.route.node_id,
                schema: table.schema.clone(),
                table: table.name.clone(),
                cascade: flags & 1 != 0,
                restart_identity: flags & 2 != 0,
                commit_lsn: txn.route.commit_lsn,
                ts_us: txn.commit_ts_us,
                txn_seq: txn.produced,
                txn_last: false,
            };
            self.queue(PendingBody::Truncate(t))?;
        }
        Ok(())
    }

    /// Produces a heartbeat for the non-transactional message at `lsn` (ending at `end_lsn`),
    /// emitted at `ts_us`. Every transaction committed before it has been read, so `lsn` counts
    /// as produced.
    fn heartbeat(&mut self, lsn: u64, end_lsn: u64, ts_us: i64) -> Result<(), CaptureError> {
        let hb = Heartbeat {
            origin: self.node.name.clone(),
            node_id: self.node.id,
            region: self.node.region.clone(),
            ts_us,
            lsn,
        };
        let value = hb
            .encode(&self.heartbeat_schema)
            .map_err(|source| CaptureError::Encode {
                table: HEARTBEAT_NAME.into(),
                source,
            })?;
        let value = encode_frame(self.heartbeat_id, &value);
        // A message's LSN is the END of its WAL record, which is where the next record starts:
        // a transaction whose commit record directly follows the heartbeat has a commit LSN
        // equal to it. "Produced up to" must therefore stop just before it, or that transaction
        // would be skipped as already produced (here and, through the header, after a restart).
        let produced_up_to = lsn.saturating_sub(1);
        let route = Route {
            origin: self.own.0.clone(),
            node_id: self.node.id,
            region: self.own.1.clone(),
            commit_lsn: produced_up_to,
            forwarded_local_lsn: None,
        };
        self.send(None, &value, "heartbeat", &route, false, None)?;
        self.options.metrics.heartbeat(hb.ts_us);
        self.last_lsn = self.last_lsn.max(produced_up_to);
        self.batch_end_lsn = end_lsn;
        Ok(())
    }

    /// Produces one message to the node's partition inside the open Kafka transaction
    /// (beginning one if needed). `seq`: the `pgferry-txn-seq` header, for a source transaction
    /// spread over Kafka transactions. A message over the producer's `message.max.bytes` fails
    /// with [`CaptureError::EventTooLarge`], naming the event by `kind` (callers name it better
    /// with [`CaptureError::naming`]).
    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        key: Option<&[u8]>,
        value: &[u8],
        kind: &str,
        route: &Route,
        last: bool,
        seq: Option<u64>,
    ) -> Result<(), CaptureError> {
        if !self.kafka_txn_open {
            let producer = &self.producer;
            tokio::task::block_in_place(|| producer.begin_transaction())
                .map_err(|e| kafka_err(&self.config, "beginning a transaction", e))?;
            self.kafka_txn_open = true;
            self.batch_txns = 0;
            self.batch_started = Instant::now();
        }
        self.options.metrics.produced(kind, key, value);
        let lsn_text = route.commit_lsn.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(6)
            .insert(Header {
                key: HEADER_ORIGIN,
                value: Some(&*route.origin),
            })
            .insert(Header {
                key: HEADER_COMMIT_LSN,
                value: Some(lsn_text.as_str()),
            })
            .insert(Header {
                key: HEADER_KIND,
                value: Some(kind),
            });
        if let Some(local) = route.forwarded_local_lsn {
            let local = local.to_string();
            headers = headers
                .insert(Header {
                    key: HEADER_VIA,
                    value: Some(self.node.name.as_str()),
                })
                .insert(Header {
                    key: HEADER_LOCAL_LSN,
                    value: Some(local.as_str()),
                });
        }
        if last {
            headers = headers.insert(Header {
                key: HEADER_TXN_LAST,
                value: Some("1"),
            });
        }
        if let Some(seq) = seq {
            let seq = seq.to_string();
            headers = headers.insert(Header {
                key: HEADER_TXN_SEQ,
                value: Some(seq.as_str()),
            });
        }
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&self.topic)
            .partition(self.partition)
            .payload(value)
            .headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((e, r)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    // The local queue is full: wait for deliveries (this bounds memory).
                    record = r;
                    tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(2)));
                }
                Err((e, _)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge) => {
                    let limit = kafka::producer_message_max_bytes(&self.config.kafka);
                    let size = (key.map_or(0, <[u8]>::len) + value.len()) as u64;
                    return Err(CaptureError::EventTooLarge {
                        node: self.node.name.clone(),
                        event: format!("a {kind} event"),
                        lsn: "unknown".into(),
                        commit_lsn: format_lsn(route.forwarded_local_lsn.unwrap_or(route.commit_lsn)),
                        commit_lsn_value: route.forwarded_local_lsn.unwrap_or(route.commit_lsn),
                        topic: format!("{}/{}", self.topic, self.partition),
                        size,
                        limit: format!(
                            "the capture producer's message.max.bytes of {limit} bytes (librdkafka counts headers and record overhead too)"
                        ),
                        fix: format!(
                            "raise message.max.bytes under [kafka.properties] in pgferry.toml above {size} and restart capture; \
                             the topic's max.message.bytes (and the brokers' message.max.bytes, its default) must allow it too"
                        ),
                    });
                }
                Err((e, _)) => return Err(self.timed_out_or(kafka_err(&self.config, "producing", e))),
            }
        }
    }

    /// The error for a message the broker refused as too large (from its delivery report):
    /// which event it was, as far as the message tells (its table by the value's schema id),
    /// and the topic's limit as the broker reports it now.
    async fn refused_by_broker(&self, refused: &RefusedMessage) -> CaptureError {
        let table = refused
            .value_schema_id
            .and_then(|id| self.relations.by_value_id(id))
            .map(|r| r.display.clone());
        let event = match (refused.kind.as_deref(), table) {
            (Some("change"), Some(t)) => format!("a change of {t}"),
            (Some(kind), _) => format!("a {kind} event"),
            (None, _) => "an event".to_string(),
        };
        let topic_limit = match kafka::describe(&self.config.kafka, std::slice::from_ref(&self.topic)).await {
            Ok(d) => d
                .topics
                .get(&self.topic)
                .and_then(|t| t.config.get("max.message.bytes").cloned())
                .unwrap_or_else(|| "unknown".into()),
            Err(e) => format!("unknown ({e})"),
        };
        let commit_lsn = refused.commit_lsn.unwrap_or(0);
        CaptureError::EventTooLarge {
            node: self.node.name.clone(),
            event,
            lsn: "unknown".into(),
            commit_lsn: format_lsn(commit_lsn),
            commit_lsn_value: commit_lsn,
            topic: format!("{}/{}", self.topic, self.partition),
            size: refused.size,
            limit: format!(
                "what the broker accepts: the broker refused it (or its compressed batch) as too large; the topic's max.message.bytes is {topic_limit}"
            ),
            fix: format!(
                "raise the topic's max.message.bytes above {} (kafka-configs.sh --bootstrap-server <broker> --alter --entity-type topics \
                 --entity-name {} --add-config max.message.bytes=<bytes>); capture retries by itself and goes on once the broker accepts it",
                refused.size, self.topic
            ),
        }
    }

    fn commit_batch(&mut self) -> Result<(), CaptureError> {
        let (producer, metrics) = (&self.producer, &mut self.options.metrics);
        tokio::task::block_in_place(|| {
            metrics.commit(|| {
                // Send what lingers and wait for the deliveries first (`flush_now`), so that
                // commit_transaction's own flush (rdkafka's, which waits in 100 ms steps on this
                // producer) finds nothing left to wait for.
                pgferry_connectors::kafka::flush_now(producer, Duration::from_secs(60));
                producer.commit_transaction(Duration::from_secs(60))
            })
        })
        .map_err(|e| self.timed_out_or(kafka_err(&self.config, "committing a transaction", e)))?;
        self.kafka_txn_open = false;
        if self.batch_end_lsn > 0 {
            self.confirmer.confirm(self.batch_end_lsn);
        }
        self.options.metrics.produced_up_to(self.last_lsn);
        tracing::debug!(node = %self.node.name, txns = self.batch_txns, lsn = self.batch_end_lsn, "kafka transaction committed");
        Ok(())
    }
}

impl Capture {
    /// `e`, or [`CaptureError::KafkaTransactionTimedOut`] around it when the open Kafka
    /// transaction has outlived `transaction.timeout.ms` (the broker has aborted it).
    fn timed_out_or(&self, e: CaptureError) -> CaptureError {
        let open = self.batch_started.elapsed();
        if !self.kafka_txn_open || open < self.txn_timeout {
            return e;
        }
        CaptureError::KafkaTransactionTimedOut {
            node: self.node.name.clone(),
            topic: format!("{}/{}", self.topic, self.partition),
            open_ms: open.as_millis() as u64,
            timeout_ms: self.txn_timeout.as_millis() as u64,
            split_ms: self.split_after.as_millis() as u64,
            source: Box::new(e),
        }
    }
}

fn kafka_err(config: &Config, what: &str, source: rdkafka::error::KafkaError) -> CaptureError {
    CaptureError::Kafka(kafka::KafkaError::Client {
        bootstrap: config.kafka.bootstrap_servers.clone(),
        what: what.to_string(),
        source,
    })
}

/// An event's key columns as `(a, b)=(1, x)` for error messages (values cut at 100 characters).
fn key_text(table: &pgferry_schemas::event::TableDef, event: &ChangeEvent) -> String {
    let row = event.after.as_ref().or(event.before.as_ref());
    let (mut names, mut values) = (Vec::new(), Vec::new());
    for (i, c) in table.key_columns() {
        names.push(c.name.clone());
        values.push(match row.and_then(|r| r.get(i)).and_then(|v| v.as_deref()) {
            Some(v) if v.chars().count() > 100 => format!("{}…", v.chars().take(100).collect::<String>()),
            Some(v) => v.to_string(),
            None => "NULL".into(),
        });
    }
    format!("({})=({})", names.join(", "), values.join(", "))
}

/// Microseconds between the Unix and PostgreSQL (2000-01-01) epochs.
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A pgoutput tuple as a text-form row of `width` columns (NULL and unchanged TOAST → None).
/// Reads the bytes directly: `ColumnData::as_str` turns an empty string into `None` (NULL).
fn tuple_row(t: &TupleData, width: usize) -> Result<Row, CaptureError> {
    let mut row: Row = vec![None; width];
    for (i, c) in t.columns.iter().enumerate().take(width) {
        if c.data_type == b't' {
            let text = std::str::from_utf8(c.as_bytes()).map_err(|_| {
                CaptureError::Protocol(format!("column {i} is not UTF-8; pgferry needs UTF8 databases"))
            })?;
            row[i] = Some(text.to_string());
        }
    }
    Ok(row)
}
