//! Kafka clients (rdkafka): the transactional producer capture uses, the `read_committed`
//! consumer apply uses, topic creation, and reading a partition's last committed message.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ConfigResource, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError as RdError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::producer::{DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use thiserror::Error;

use crate::config::KafkaConfig;
use crate::metrics::Histogram;

/// Header with the origin node name of every message.
pub const HEADER_ORIGIN: &str = "pgferry-origin";
/// Header with the origin commit LSN (decimal) of every message.
pub const HEADER_COMMIT_LSN: &str = "pgferry-commit-lsn";
/// Header with the kind of message: `change`, `truncate`, `message` or `heartbeat`.
pub const HEADER_KIND: &str = "pgferry-kind";
/// Header on forwarded messages: the node that captured and forwarded them.
pub const HEADER_VIA: &str = "pgferry-via";
/// Header on forwarded messages: the forwarding node's own commit LSN (decimal) of the
/// transaction, which is what that node's capture resumes by.
pub const HEADER_LOCAL_LSN: &str = "pgferry-local-commit-lsn";
/// Header present (`1`) on the last message of a source transaction.
pub const HEADER_TXN_LAST: &str = "pgferry-txn-last";
/// Header with the message's position in its source transaction (`txn_seq`, decimal), on the
/// messages of a source transaction that capture spread over more than one Kafka transaction,
/// from the last message of the first part on: after a restart, capture resumes such a
/// transaction after the last message committed (docs/decisions.md, "Capture liveness").
pub const HEADER_TXN_SEQ: &str = "pgferry-txn-seq";

/// The capture producer's `transaction.timeout.ms` when `[kafka.properties]` does not set it.
pub const DEFAULT_TRANSACTION_TIMEOUT_MS: u64 = 600_000;
/// The capture producer's `message.max.bytes` when `[kafka.properties]` does not set it.
pub const DEFAULT_MESSAGE_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// The capture producer's transaction timeout: `[kafka.properties] transaction.timeout.ms`, or
/// [`DEFAULT_TRANSACTION_TIMEOUT_MS`]. An unreadable value is left for librdkafka to refuse.
pub fn transaction_timeout(cfg: &KafkaConfig) -> Duration {
    let ms = cfg
        .properties
        .get("transaction.timeout.ms")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(DEFAULT_TRANSACTION_TIMEOUT_MS);
    Duration::from_millis(ms)
}

/// The capture producer's `message.max.bytes`: `[kafka.properties]`, or
/// [`DEFAULT_MESSAGE_MAX_BYTES`].
pub fn producer_message_max_bytes(cfg: &KafkaConfig) -> u64 {
    cfg.properties
        .get("message.max.bytes")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES)
}

/// A Kafka failure, naming the bootstrap servers or the topic.
#[derive(Debug, Error)]
pub enum KafkaError {
    /// A client could not be created or used.
    #[error("Kafka at {bootstrap}: {what}: {source}")]
    Client {
        bootstrap: String,
        what: String,
        source: RdError,
    },
    /// The broker did not answer.
    #[error("Kafka at {bootstrap} is unreachable: {message}")]
    Unreachable { bootstrap: String, message: String },
    /// A topic could not be created or has the wrong shape.
    #[error("Kafka topic {topic}: {message}")]
    Topic { topic: String, message: String },
}

/// Base client configuration of every client pgferry makes: bootstrap servers, the security
/// keys of `[kafka]` (protocol, SASL, TLS files) and the extra `[kafka.properties]`.
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.bootstrap_servers);
    c.set("socket.connection.setup.timeout.ms", "10000");
    for (k, v) in cfg.security_properties() {
        c.set(k, v);
    }
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

/// Client context that keeps the errors librdkafka reported for the connection (a refused
/// SASL login or TLS handshake shows up only there, while requests merely time out).
#[derive(Clone, Default)]
pub struct LastError(Arc<Mutex<Vec<String>>>);

impl LastError {
    /// The distinct errors reported so far (at most a few), most telling first: the brokers'
    /// own reasons before librdkafka's summaries such as "1/1 brokers are down".
    pub fn get(&self) -> Vec<String> {
        let mut all = self.0.lock().map(|e| e.clone()).unwrap_or_default();
        all.sort_by_key(|m| m.contains("brokers are down"));
        all
    }

    /// `message` with the reported errors appended.
    fn explain(&self, message: String) -> String {
        let all = self.get();
        if all.is_empty() {
            message
        } else {
            format!("{message} (the brokers' errors: {})", all.join("; "))
        }
    }

    fn add(&self, message: &str) {
        if let Ok(mut all) = self.0.lock() {
            // "… (after 5ms in state AUTH_REQ, 1 identical error(s) suppressed)" repeats the same.
            let gist = |m: &str| m.split(" (after ").next().unwrap_or(m).to_string();
            if all.len() < 4 && !all.iter().any(|m| gist(m) == gist(message)) {
                all.push(message.to_string());
            }
        }
    }
}

impl rdkafka::ClientContext for LastError {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        if matches!(level, L::Emerg | L::Alert | L::Critical | L::Error) {
            // "[thrd:…]: " prefixes say which librdkafka thread; the rest is the reason.
            self.add(message.split_once("]: ").map_or(message, |(_, m)| m));
            tracing::debug!(target: "librdkafka", fac, message, "librdkafka error");
        } else {
            tracing::trace!(target: "librdkafka", fac, message, "librdkafka");
        }
    }

    fn error(&self, error: RdError, reason: &str) {
        tracing::debug!(%error, reason, "librdkafka error");
        self.add(reason);
    }
}

impl rdkafka::consumer::ConsumerContext for LastError {}

fn client_err(cfg: &KafkaConfig, what: &str) -> impl FnOnce(RdError) -> KafkaError {
    let bootstrap = cfg.bootstrap_servers.clone();
    let what = what.to_string();
    move |source| KafkaError::Client {
        bootstrap,
        what,
        source,
    }
}

/// The producer type capture uses.
pub type TxProducer = ThreadedProducer<DeliveryLatency>;

/// Sends what `producer` holds at once (`linger.ms` does not apply while this waits) and waits
/// until every message produced so far is delivered or failed, or `timeout` passed; returns
/// whether none is left in flight.
///
/// Why not rdkafka's `flush`: it calls librdkafka's flush without waiting and then polls the
/// main queue in steps of up to 100 ms, and on a [`ThreadedProducer`] the producer's own thread
/// takes every delivery event, so each step ran its full 100 ms. librdkafka's own flush, asked
/// to wait, waits on a condition variable for the count of undelivered messages (rdkafka takes
/// delivery reports as events, so librdkafka does not poll here) and, for as long as it waits,
/// tells the brokers' threads that their batches' linger has expired.
pub fn flush_now(producer: &TxProducer, timeout: Duration) -> bool {
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `native_ptr` is the producer's live librdkafka handle for as long as `producer`
    // is borrowed, and librdkafka's flush may be called from any thread.
    let err = unsafe { rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), ms) };
    err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
}

/// Producer context that records each delivered message's produce latency (from the
/// message's create time, which librdkafka stamps when it is produced, to its delivery
/// report) in seconds, at millisecond resolution, and the largest message the broker refused
/// as too large ([`DeliveryLatency::take_too_large`]).
pub struct DeliveryLatency(Option<Histogram>, LastError, Arc<Mutex<Option<RefusedMessage>>>);

/// A message whose delivery failed because the broker found it (or its batch) too large:
/// what capture needs to say which event it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedMessage {
    /// Bytes of key and value.
    pub size: u64,
    /// This node's commit LSN of its source transaction: the `pgferry-local-commit-lsn` header
    /// of a forwarded message, else `pgferry-commit-lsn`.
    pub commit_lsn: Option<u64>,
    /// The `pgferry-kind` header.
    pub kind: Option<String>,
    /// The registry id of the value's schema (Confluent framing: bytes 1–4).
    pub value_schema_id: Option<u32>,
}

impl DeliveryLatency {
    /// The largest message the broker refused as too large since the last call, if any.
    pub fn take_too_large(&self) -> Option<RefusedMessage> {
        self.2.lock().ok().and_then(|mut r| r.take())
    }
}

impl rdkafka::ClientContext for DeliveryLatency {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        self.1.log(level, fac, message)
    }

    fn error(&self, error: RdError, reason: &str) {
        self.1.error(error, reason)
    }
}

impl ProducerContext for DeliveryLatency {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(m) => {
                if let (Some(h), Some(created_ms)) = (&self.0, m.timestamp().to_millis()) {
                    let now_ms = crate::metrics::now_us() / 1000;
                    h.observe((now_ms - created_ms).max(0) as f64 / 1000.0);
                }
            }
            Err((e, m)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge) => {
                let refused = RefusedMessage {
                    size: (m.key().map_or(0, <[u8]>::len) + m.payload().map_or(0, <[u8]>::len)) as u64,
                    commit_lsn: header(m, HEADER_LOCAL_LSN)
                        .or_else(|| header(m, HEADER_COMMIT_LSN))
                        .and_then(|v| v.parse().ok()),
                    kind: header(m, HEADER_KIND).map(str::to_string),
                    value_schema_id: m
                        .payload()
                        .and_then(|p| p.get(1..5))
                        .and_then(|b| <[u8; 4]>::try_from(b).ok())
                        .map(u32::from_be_bytes),
                };
                if let Ok(mut slot) = self.2.lock() {
                    if slot.as_ref().is_none_or(|r| r.size < refused.size) {
                        *slot = Some(refused);
                    }
                }
            }
            Err(_) => {}
        }
    }
}

/// Creates an idempotent transactional producer with `transactional.id` = `txn_id` and runs
/// `init_transactions`, which fences any older instance and aborts its open transaction.
/// Delivery latencies go to `produce_latency`. Blocking: call from a blocking context.
pub fn transactional_producer(
    cfg: &KafkaConfig,
    txn_id: &str,
    produce_latency: Option<Histogram>,
) -> Result<TxProducer, KafkaError> {
    let mut c = client_config(cfg);
    c.set("transactional.id", txn_id).set("enable.idempotence", "true");
    // Defaults that `[kafka.properties]` may override. The transaction timeout is one of them:
    // capture splits a source transaction that takes longer than a quarter of it to produce
    // over several Kafka transactions (docs/decisions.md, "Capture liveness"), so a shorter one
    // costs more commits, never correctness.
    let timeout_ms = DEFAULT_TRANSACTION_TIMEOUT_MS.to_string();
    let max_bytes = DEFAULT_MESSAGE_MAX_BYTES.to_string();
    // `linger.ms` 10: a Kafka transaction is invisible to consumers until it commits, and capture
    // sends what is lingering at once before each commit ([`flush_now`]), so batching inside a
    // transaction adds no latency. With 0 (before), the brokers' threads woke and sent a request
    // per message or two at medium rates: half of capture's CPU samples at 2000 tps TPC-B were in
    // librdkafka's broker thread (`poll`, wake-ups), and the broker's request handling grew alike.
    set_defaults(
        &mut c,
        cfg,
        &[
            ("linger.ms", "10"),
            ("compression.type", "lz4"),
            ("message.max.bytes", max_bytes.as_str()),
            ("transaction.timeout.ms", timeout_ms.as_str()),
        ],
    );
    let last = LastError::default();
    let producer: TxProducer = c
        .create_with_context(DeliveryLatency(produce_latency, last.clone(), Default::default()))
        .map_err(client_err(cfg, "creating producer"))?;
    producer
        .init_transactions(Duration::from_secs(30))
        .map_err(|e| unreachable_or(cfg, &last.explain("initializing transactions".into()), e))?;
    Ok(producer)
}

fn unreachable_or(cfg: &KafkaConfig, what: &str, e: RdError) -> KafkaError {
    let timed_out = matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::OperationTimedOut | RDKafkaErrorCode::MessageTimedOut | RDKafkaErrorCode::AllBrokersDown
        )
    );
    if timed_out {
        KafkaError::Unreachable {
            bootstrap: cfg.bootstrap_servers.clone(),
            message: format!("{what}: {e}"),
        }
    } else {
        client_err(cfg, what)(e)
    }
}

/// An idempotent, non-transactional producer (for the dead-letter and conflict topics, where
/// each message is awaited before the stream moves on).
pub fn plain_producer(cfg: &KafkaConfig) -> Result<rdkafka::producer::FutureProducer, KafkaError> {
    client_config(cfg)
        .set("enable.idempotence", "true")
        .set("message.max.bytes", "16777216")
        .create()
        .map_err(client_err(cfg, "creating producer"))
}

/// Headers added to a dead-lettered message: why, where it was read, and which node gave up.
pub const HEADER_DLQ_REASON: &str = "pgferry-dlq-reason";
/// See [`HEADER_DLQ_REASON`].
pub const HEADER_DLQ_SOURCE: &str = "pgferry-dlq-source";
/// See [`HEADER_DLQ_REASON`].
pub const HEADER_DLQ_NODE: &str = "pgferry-dlq-node";

/// A consumer that reads only committed transactions and never commits offsets to Kafka
/// (positions live in PostgreSQL, in `pgferry.apply_progress`), and reads up to the end of a
/// partition: librdkafka sees the end only when a fetch comes back empty, after the broker held
/// it `fetch.wait.max.ms`, so that is 10 ms here whatever `[kafka.properties]` says (it sets the
/// streams' own, [`following_config`]).
pub fn read_committed_config(cfg: &KafkaConfig, group_id: &str) -> ClientConfig {
    let mut c = committed_reader(cfg, group_id);
    c.set("fetch.wait.max.ms", "10");
    c
}

/// Like [`read_committed_config`], for a consumer that follows partitions as they grow (apply's
/// streams): the broker holds a fetch that finds nothing for up to `fetch.wait.max.ms`
/// [`FOLLOWING_FETCH_WAIT_MAX_MS`] unless `[kafka.properties]` sets it. A read-committed fetch
/// is answered as soon as a commit moves a partition's stable offset past it, so the longer
/// hold adds no latency (same p50 and p99 at 100 and 1000 tps TPC-B against 10 ms, measured),
/// while with 10 ms every idle consumer made the broker answer ~100 empty fetches a second
/// (~2% of a core each; comparison-notes.md).
pub fn following_config(cfg: &KafkaConfig, group_id: &str) -> ClientConfig {
    let mut c = committed_reader(cfg, group_id);
    set_defaults(&mut c, cfg, &[("fetch.wait.max.ms", FOLLOWING_FETCH_WAIT_MAX_MS)]);
    c
}

/// What both kinds of reader share: read committed, positions never stored in Kafka, and the
/// fetch sizes as defaults `[kafka.properties]` may override.
fn committed_reader(cfg: &KafkaConfig, group_id: &str) -> ClientConfig {
    let mut c = client_config(cfg);
    c.set("group.id", group_id)
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest");
    set_defaults(&mut c, cfg, &[("fetch.max.bytes", "16777216"), ("max.partition.fetch.bytes", "4194304")]);
    c
}

/// `fetch.wait.max.ms` of [`following_config`] (librdkafka's own default).
pub const FOLLOWING_FETCH_WAIT_MAX_MS: &str = "500";

/// Sets each of `defaults` on `c` unless `[kafka.properties]` sets it.
fn set_defaults(c: &mut ClientConfig, cfg: &KafkaConfig, defaults: &[(&str, &str)]) {
    for (k, v) in defaults {
        if !cfg.properties.contains_key(*k) {
            c.set(*k, *v);
        }
    }
}

/// librdkafka properties that pgferry sets itself because exactly-once depends on them, and
/// `[kafka.properties]` therefore may not set: with why, for the error that names one.
pub const OWNED_PROPERTIES: [(&str, &str); 7] = [
    ("isolation.level", "apply reads committed Kafka transactions only"),
    ("enable.auto.commit", "positions live in PostgreSQL, not in Kafka"),
    ("enable.auto.offset.store", "positions live in PostgreSQL, not in Kafka"),
    ("auto.offset.reset", "a stream with no position starts at the topic's beginning"),
    ("group.id", "each client names its own group"),
    ("transactional.id", "capture's id is derived from the cluster and node names"),
    ("enable.idempotence", "capture's transactions and the other producers need it"),
];

/// Fails with [`KafkaError::Unreachable`] unless the cluster answers a metadata request in
/// `timeout`. Blocking.
/// The message says why when the brokers told (a refused login, a failed TLS handshake).
pub fn check_reachable(cfg: &KafkaConfig, timeout: Duration) -> Result<(), KafkaError> {
    let last = LastError::default();
    let consumer: BaseConsumer<LastError> = client_config(cfg)
        .create_with_context(last.clone())
        .map_err(client_err(cfg, "creating client"))?;
    consumer.fetch_metadata(None, timeout).map(|_| ()).map_err(|e| {
        // librdkafka queues its log lines (where the reason is) until the client is polled.
        for _ in 0..5 {
            let _ = consumer.poll(Duration::from_millis(50));
        }
        KafkaError::Unreachable {
            bootstrap: cfg.bootstrap_servers.clone(),
            message: last.explain(e.to_string()),
        }
    })
}

/// Creates `topic` with `partitions` partitions unless it exists, with `max.message.bytes` equal
/// to the capture producer's `message.max.bytes`; an existing topic with fewer partitions is an
/// error (its size limit is left as it is: `pgferry check` warns when it is lower). Whether it created the topic (`false`: it was there).
pub async fn ensure_topic(cfg: &KafkaConfig, topic: &str, partitions: i32) -> Result<bool, KafkaError> {
    let admin: AdminClient<DefaultClientContext> = client_config(cfg)
        .create()
        .map_err(client_err(cfg, "creating admin client"))?;
    let retention = cfg.retention_ms.map(|ms| ms.to_string());
    // The topic takes what pgferry's producers send: their message.max.bytes (a broker's own
    // default, about 1 MiB, would refuse larger events that the producer lets through).
    let max_message = producer_message_max_bytes(cfg).to_string();
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(cfg.replication_factor))
        .set("cleanup.policy", "delete")
        .set("max.message.bytes", &max_message);
    if let Some(ms) = &retention {
        new = new.set("retention.ms", ms);
    }
    let opts = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(30)))
        .request_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics([&new], &opts)
        .await
        .map_err(|e| unreachable_or(cfg, &format!("creating topic {topic}"), e))?;
    let mut created = false;
    for r in results {
        match r {
            Ok(_) => created = true,
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => {
                return Err(KafkaError::Topic {
                    topic: t,
                    message: format!("cannot create: {code}"),
                })
            }
        }
    }
    // A new topic's partitions appear in metadata a moment after creation: poll until they
    // do. An existing topic that stays short of `partitions` is an error.
    let cfg2 = cfg.clone();
    let topic2 = topic.to_string();
    let have = tokio::task::spawn_blocking(move || -> Result<usize, KafkaError> {
        let consumer: BaseConsumer = client_config(&cfg2)
            .create()
            .map_err(client_err(&cfg2, "creating client"))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let md = consumer
                .fetch_metadata(Some(&topic2), Duration::from_secs(10))
                .map_err(|e| KafkaError::Unreachable {
                    bootstrap: cfg2.bootstrap_servers.clone(),
                    message: e.to_string(),
                })?;
            let have = md.topics().first().map(|t| t.partitions().len()).unwrap_or(0);
            if have as i32 >= partitions || std::time::Instant::now() > deadline {
                return Ok(have);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await
    .map_err(|e| KafkaError::Topic {
        topic: topic.to_string(),
        message: e.to_string(),
    })??;
    if (have as i32) < partitions {
        return Err(KafkaError::Topic {
            topic: topic.to_string(),
            message: format!("has {have} partitions, pgferry needs at least {partitions}"),
        });
    }
    Ok(created)
}

/// What `pgferry check` reads of a Kafka cluster ([`describe`]).
#[derive(Debug, Clone, Default)]
pub struct ClusterDescription {
    /// The brokers' ids.
    pub brokers: Vec<i32>,
    /// The configuration of one broker (the first in the metadata), every entry it reports.
    pub broker_config: BTreeMap<String, String>,
    /// The topics asked about that exist (and `__transaction_state` if it exists), by name.
    pub topics: BTreeMap<String, TopicDescription>,
}

/// One topic as [`describe`] reads it.
#[derive(Debug, Clone, Default)]
pub struct TopicDescription {
    /// Number of partitions.
    pub partitions: usize,
    /// Replicas of its first partition.
    pub replication_factor: usize,
    /// Its configuration (every entry the broker reports, defaults included).
    pub config: BTreeMap<String, String>,
}

/// The name of Kafka's transaction state topic.
pub const TRANSACTION_STATE_TOPIC: &str = "__transaction_state";

/// The brokers, one broker's configuration, and the partitions, replication factor and
/// configuration of each of `topics` that exists (plus [`TRANSACTION_STATE_TOPIC`]).
pub async fn describe(cfg: &KafkaConfig, topics: &[String]) -> Result<ClusterDescription, KafkaError> {
    let cfg2 = cfg.clone();
    let mut wanted: Vec<String> = topics.to_vec();
    wanted.push(TRANSACTION_STATE_TOPIC.to_string());
    let (brokers, shapes) = tokio::task::spawn_blocking(move || -> Result<_, KafkaError> {
        let consumer: BaseConsumer = client_config(&cfg2)
            .create()
            .map_err(client_err(&cfg2, "creating client"))?;
        let md = consumer
            .fetch_metadata(None, Duration::from_secs(15))
            .map_err(|e| unreachable_or(&cfg2, "reading the cluster's metadata", e))?;
        let brokers: Vec<i32> = md.brokers().iter().map(|b| b.id()).collect();
        let shapes: Vec<(String, usize, usize)> = md
            .topics()
            .iter()
            .filter(|t| wanted.iter().any(|w| w == t.name()) && t.error().is_none())
            .map(|t| {
                let rf = t.partitions().first().map_or(0, |p| p.replicas().len());
                (t.name().to_string(), t.partitions().len(), rf)
            })
            .collect();
        Ok((brokers, shapes))
    })
    .await
    .map_err(|e| KafkaError::Unreachable {
        bootstrap: cfg.bootstrap_servers.clone(),
        message: format!("metadata task failed: {e}"),
    })??;
    let admin: AdminClient<DefaultClientContext> = client_config(cfg)
        .create()
        .map_err(client_err(cfg, "creating admin client"))?;
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(15)));
    let mut resources = Vec::new();
    if let Some(first) = brokers.first() {
        resources.push(ResourceSpecifier::Broker(*first));
    }
    resources.extend(shapes.iter().map(|(name, _, _)| ResourceSpecifier::Topic(name)));
    let results = admin
        .describe_configs(&resources, &opts)
        .await
        .map_err(|e| unreachable_or(cfg, "reading configurations", e))?;
    let mut out = ClusterDescription {
        brokers: brokers.clone(),
        ..Default::default()
    };
    let entries = |r: &ConfigResource| -> BTreeMap<String, String> {
        r.entries
            .iter()
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect()
    };
    let mut results = results.into_iter();
    if !brokers.is_empty() {
        match results.next() {
            Some(Ok(r)) => out.broker_config = entries(&r),
            Some(Err(code)) => {
                return Err(KafkaError::Unreachable {
                    bootstrap: cfg.bootstrap_servers.clone(),
                    message: format!("reading the configuration of broker {}: {code}", brokers[0]),
                })
            }
            None => {}
        }
    }
    for ((name, partitions, replication_factor), result) in shapes.into_iter().zip(results) {
        let config = match result {
            Ok(r) => entries(&r),
            Err(code) => {
                return Err(KafkaError::Topic {
                    topic: name,
                    message: format!("reading its configuration: {code}"),
                })
            }
        };
        out.topics.insert(
            name,
            TopicDescription {
                partitions,
                replication_factor,
                config,
            },
        );
    }
    Ok(out)
}

/// Initializes a transactional producer with `transactional.id` = `txn_id` (the one capture
/// makes, with its timeouts), which shows the cluster takes transactions from this client:
/// the transaction coordinator answers, the id is authorized, `transaction.timeout.ms` is
/// allowed. Blocking.
pub fn probe_transactions(cfg: &KafkaConfig, txn_id: &str) -> Result<(), KafkaError> {
    transactional_producer(cfg, txn_id, None).map(|_| ())
}

/// The value of header `name` as UTF-8.
pub fn header<'a>(msg: &'a BorrowedMessage<'_>, name: &str) -> Option<&'a str> {
    msg.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// A client context that does not report reaching the end of a partition as an error
/// (we ask for that signal; librdkafka also passes it to the global error callback).
pub struct QuietEof;

impl rdkafka::ClientContext for QuietEof {
    fn error(&self, error: RdError, reason: &str) {
        let eof = matches!(error, RdError::PartitionEOF(_))
            || matches!(error, RdError::Global(RDKafkaErrorCode::PartitionEOF));
        if !eof {
            tracing::error!(error = %error, reason, "librdkafka");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for QuietEof {}

/// Where a producer's committed messages in a partition end ([`last_produced_position`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducedPosition {
    /// The producer's own commit LSN of the last message (see [`last_committed_commit_lsn`]).
    pub commit_lsn: u64,
    /// `Some(seq)` when that message is not the last of its source transaction: capture spread
    /// the transaction over several Kafka transactions and committed it up to `txn_seq` = seq.
    pub partial_seq: Option<u64>,
}

impl ProducedPosition {
    /// The highest commit LSN whose source transaction is wholly in the partition.
    pub fn complete_up_to(&self) -> u64 {
        match self.partial_seq {
            Some(_) => self.commit_lsn.saturating_sub(1),
            None => self.commit_lsn,
        }
    }
}

/// `producer`'s own commit LSN of the last committed message it wrote to `topic`/`partition`
/// (the local-commit-LSN header of a message it forwarded, else the commit LSN header of its
/// own), and whether its source transaction is there whole, if any. Used by capture after a
/// restart to learn what it already produced. Messages of any other producer are passed over:
/// a partition can hold a removed node's messages (`pgferry node remove`), whose LSNs say
/// nothing about this node's WAL. Blocking.
pub fn last_produced_position(
    cfg: &KafkaConfig,
    group_id: &str,
    topic: &str,
    partition: i32,
    producer: &str,
) -> Result<Option<ProducedPosition>, KafkaError> {
    last_committed_matching(cfg, group_id, topic, partition, |m| {
        let lsn = match header(m, HEADER_VIA) {
            Some(via) if via == producer => header(m, HEADER_LOCAL_LSN),
            None if header(m, HEADER_ORIGIN) == Some(producer) => header(m, HEADER_COMMIT_LSN),
            _ => None,
        };
        let commit_lsn = lsn.and_then(|v| v.parse::<u64>().ok())?;
        // A transaction spread over Kafka transactions carries its position from the first
        // cut on; its last message carries `txn-last`. Heartbeats carry neither and are whole.
        let partial_seq = match (header(m, HEADER_TXN_LAST), header(m, HEADER_TXN_SEQ)) {
            (None, Some(seq)) => seq.parse::<u64>().ok(),
            _ => None,
        };
        Some(ProducedPosition {
            commit_lsn,
            partial_seq,
        })
    })
}

/// The highest of `producer`'s own commit LSNs whose source transaction is wholly in
/// `topic`/`partition` (see [`last_produced_position`]), if any. Blocking.
pub fn last_committed_commit_lsn(
    cfg: &KafkaConfig,
    group_id: &str,
    topic: &str,
    partition: i32,
    producer: &str,
) -> Result<Option<u64>, KafkaError> {
    Ok(last_produced_position(cfg, group_id, topic, partition, producer)?.map(|p| p.complete_up_to()))
}

/// The commit LSN of the last committed transaction of `origin` in `topic`/`partition`
/// (heartbeats left out), if any. Blocking.
pub fn last_committed_transaction_lsn(
    cfg: &KafkaConfig,
    group_id: &str,
    topic: &str,
    partition: i32,
    origin: &str,
) -> Result<Option<u64>, KafkaError> {
    last_committed_matching(cfg, group_id, topic, partition, |m| {
        if header(m, HEADER_ORIGIN) != Some(origin) || header(m, HEADER_KIND) == Some("heartbeat") {
            return None;
        }
        header(m, HEADER_COMMIT_LSN).and_then(|v| v.parse::<u64>().ok())
    })
}

/// `pick` of the last committed message of `topic`/`partition` for which it gives a value:
/// reads the tail in growing windows (256 messages, then ×4) until one matches or the whole
/// partition was read. Blocking.
fn last_committed_matching<T>(
    cfg: &KafkaConfig,
    group_id: &str,
    topic: &str,
    partition: i32,
    pick: impl Fn(&BorrowedMessage<'_>) -> Option<T>,
) -> Result<Option<T>, KafkaError> {
    let consumer: BaseConsumer<QuietEof> = read_committed_config(cfg, group_id)
        .set("enable.partition.eof", "true")
        .create_with_context(QuietEof)
        .map_err(client_err(cfg, "creating consumer"))?;
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(15))
        .map_err(|e| unreachable_or(cfg, &format!("reading watermarks of {topic}/{partition}"), e))?;
    let mut window: i64 = 256;
    loop {
        let start = (high - window).max(low);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(start))
            .map_err(client_err(cfg, "assigning partition"))?;
        consumer.assign(&tpl).map_err(client_err(cfg, "assigning partition"))?;
        let mut last = None;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if std::time::Instant::now() > deadline {
                return Err(KafkaError::Unreachable {
                    bootstrap: cfg.bootstrap_servers.clone(),
                    message: format!("timed out reading the tail of {topic}/{partition}"),
                });
            }
            match consumer.poll(Duration::from_millis(500)) {
                None => {
                    // Nothing within the poll interval: an empty range reports EOF, so this
                    // only happens while the broker is slow; keep polling until the deadline.
                }
                Some(Err(RdError::PartitionEOF(_))) => break,
                Some(Err(e)) => return Err(unreachable_or(cfg, &format!("reading {topic}/{partition}"), e)),
                Some(Ok(m)) => {
                    if let Some(v) = pick(&m) {
                        last = Some(v);
                    }
                }
            }
        }
        if last.is_some() || start == low {
            return Ok(last);
        }
        window *= 4;
    }
}

/// The offsets of `topic`/`partition`: `(low, high)` watermarks. Blocking.
pub fn watermarks(cfg: &KafkaConfig, topic: &str, partition: i32) -> Result<(i64, i64), KafkaError> {
    let consumer: BaseConsumer = client_config(cfg)
        .create()
        .map_err(client_err(cfg, "creating client"))?;
    consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(15))
        .map_err(|e| unreachable_or(cfg, &format!("reading watermarks of {topic}/{partition}"), e))
}

/// The offset of the first message of `topic`/`partition` whose timestamp is at or after
/// `time_ms` (ms since 1970), or None when there is none yet. Blocking.
pub fn offset_for_time(cfg: &KafkaConfig, topic: &str, partition: i32, time_ms: i64) -> Result<Option<i64>, KafkaError> {
    let consumer: BaseConsumer = client_config(cfg)
        .create()
        .map_err(client_err(cfg, "creating client"))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(time_ms))
        .map_err(client_err(cfg, "looking up an offset by time"))?;
    let found = consumer
        .offsets_for_times(tpl, Duration::from_secs(15))
        .map_err(|e| unreachable_or(cfg, &format!("looking up offsets of {topic}/{partition} by time"), e))?;
    let offset = found
        .find_partition(topic, partition)
        .map(|p| p.offset())
        .unwrap_or(Offset::End);
    Ok(match offset {
        Offset::Offset(o) => Some(o),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_override_the_streams_fetch_wait_but_not_what_tail_reads_need() {
        let cfg: KafkaConfig = toml::from_str(
            "bootstrap_servers = \"127.0.0.1:9092\"\n[properties]\n\"fetch.wait.max.ms\" = \"250\"\n",
        )
        .expect("a valid [kafka] table");
        let (tail, following) = (read_committed_config(&cfg, "g"), following_config(&cfg, "g"));
        assert_eq!(following.get("fetch.wait.max.ms"), Some("250"));
        assert_eq!(tail.get("fetch.wait.max.ms"), Some("10"), "reads to a partition's end keep their short wait");
        for c in [tail, following] {
            assert_eq!(c.get("max.partition.fetch.bytes"), Some("4194304"));
            assert_eq!(c.get("isolation.level"), Some("read_committed"));
        }
        let defaults: KafkaConfig = toml::from_str("bootstrap_servers = \"127.0.0.1:9092\"\n").expect("a valid [kafka] table");
        assert_eq!(following_config(&defaults, "g").get("fetch.wait.max.ms"), Some(FOLLOWING_FETCH_WAIT_MAX_MS));
    }
}
