//! Start-up of apply: find the partitions this node reads, resume each from its recorded
//! progress, and run one task per partition.

use std::sync::Arc;
use std::time::Duration;

use pgferry_connectors::config::Config;
use pgferry_connectors::kafka::{self, KafkaError};
use pgferry_connectors::postgres;
use pgferry_connectors::registry::Registry;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::error::ApplyError;
use crate::dead_letter::DeadLetters;
use crate::metrics::ApplyMetrics;
use crate::partition_stream::PartitionStream;
use crate::progress;

/// Tuning of apply.
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Where apply counts what it applies (see [`crate::metrics`]).
    pub metrics: ApplyMetrics,
}

/// Runs apply for `node_name` until an error that is not one origin's (the caller restarts it
/// with backoff): each origin's stream retries on its own (`crate::origin_retry`).
pub async fn run(config: Arc<Config>, node_name: &str, options: ApplyOptions) -> Result<(), ApplyError> {
    let node = config.node(node_name).cloned().ok_or_else(|| ApplyError::Setup {
        node: node_name.into(),
        message: "not in the config's [[nodes]]".into(),
    })?;
    let began = std::time::Instant::now();
    let registry = Registry::new(&config.registry)?;
    let group = format!("pgferry-{}-{}-apply", config.cluster.name, node.name);
    let consumer: StreamConsumer = kafka::following_config(&config.kafka, &group)
        .create()
        .map_err(|source| KafkaError::Client {
            bootstrap: config.kafka.bootstrap_servers.clone(),
            what: "creating consumer".into(),
            source,
        })?;
    // A refused login or TLS handshake fails here with the brokers' reason (the consumer
    // itself would only wait). Checked while the PostgreSQL sessions are set up, and awaited
    // before the partitions are assigned: start-up is inside every timed benchmark drain
    // (partitions assigned 168–275 ms after start, 220–310 ms with the check first;
    // docs/benchmarks/comparison-notes.md).
    let kcfg = config.kafka.clone();
    let kafka_check =
        tokio::task::spawn_blocking(move || kafka::check_reachable(&kcfg, std::time::Duration::from_secs(10)));
    let consumer = Arc::new(consumer);
    let dead_letters = Arc::new(DeadLetters::new(&config, &node.name)?);
    let dead_letters_ms = began.elapsed().as_millis() as u64;

    // The partition of every node this node reads (DESIGN.md; `read_regions`), resumed after
    // its last applied message.
    let mut streams = Vec::new();
    let mut tpl = TopicPartitionList::new();
    // Shared by the streams: one that commits replicated DDL wakes those waiting for a table
    // or column (`crate::origin_retry`).
    let schema_changed = Arc::new(tokio::sync::Notify::new());
    for remote in config.sources(&node) {
        let topic = config.region_topic(&remote.region);
        let partition = config.node_partition(remote);
        let t = std::time::Instant::now();
        let sql = open_session(&node.dsn, &node.name, &remote.name).await?;
        let session_ms = t.elapsed().as_millis() as u64;
        crate::conflict::upgrade_schema(&sql).await?;
        let upgraded_ms = t.elapsed().as_millis() as u64;
        let resume = progress::read(&sql, &topic, partition).await?;
        tracing::debug!(node = %node.name, source = %remote.name, session_ms, upgraded_ms,
            progress_ms = t.elapsed().as_millis() as u64, "partition's session ready");
        let offset = match resume.kafka_offset {
            Some(o) => Offset::Offset(o + 1),
            None => Offset::Beginning,
        };
        tpl.add_partition_offset(&topic, partition, offset)
            .map_err(|source| KafkaError::Client {
                bootstrap: config.kafka.bootstrap_servers.clone(),
                what: format!("assigning {topic}/{partition}"),
                source,
            })?;
        let mut stream = PartitionStream::new(
            config.clone(),
            &node.name,
            &remote.name,
            topic,
            partition,
            sql,
            resume.origins,
            options.metrics.clone(),
            dead_letters.clone(),
            registry.clone(),
        );
        stream.schema_changed = schema_changed.clone();
        streams.push(stream);
    }
    kafka_check.await.map_err(|e| ApplyError::Setup {
        node: node.name.clone(),
        message: format!("Kafka check task failed: {e}"),
    })??;
    let ready_ms = began.elapsed().as_millis() as u64;
    // Each partition gets its own queue before the assignment starts fetching: a queue split
    // off afterwards can miss the first messages, which librdkafka has by then put on the
    // consumer's main queue (seen as a stream waiting forever after a restart of apply).
    let mut queues = Vec::new();
    for o in &streams {
        queues.push(consumer.split_partition_queue(&o.topic, o.partition).ok_or_else(|| ApplyError::Setup {
            node: node.name.clone(),
            message: format!("cannot read {}/{} separately", o.topic, o.partition),
        })?);
    }
    consumer.assign(&tpl).map_err(|source| KafkaError::Client {
        bootstrap: config.kafka.bootstrap_servers.clone(),
        what: "assigning partitions".into(),
        source,
    })?;
    options.metrics.set_pending_probe(pending_probe(&config, &node, &streams));
    tracing::debug!(node = %node.name, dead_letters_ms, sessions_and_kafka_ms = ready_ms,
        assigned_ms = began.elapsed().as_millis() as u64, "apply's partitions assigned");

    let mut tasks = tokio::task::JoinSet::new();
    // Beside the streams: the conflicts outbox and tombstone collection (they retry on their own
    // and never end, so they never stop apply).
    let (c, n, dsn, m) = (config.clone(), node.name.clone(), node.dsn.clone(), options.metrics.clone());
    tasks.spawn(async move {
        crate::conflict_publisher::run(c, n, dsn).await;
        Ok(())
    });
    let (c, n, dsn) = (config.clone(), node.name.clone(), node.dsn.clone());
    tasks.spawn(async move {
        crate::tombstone_gc::run(c, n, dsn, m).await;
        Ok(())
    });
    // Each stream fails, waits and retries alone (`crate::origin_retry`): one origin that cannot
    // be applied does not hold up the others.
    for (mut o, queue) in streams.into_iter().zip(queues) {
        let (dsn, me, remote) = (node.dsn.clone(), node.name.clone(), o.source.clone());
        let reopen: crate::origin_retry::OpenSession = Arc::new(move || {
            let (dsn, me, remote) = (dsn.clone(), me.clone(), remote.clone());
            Box::pin(async move { open_session(&dsn, &me, &remote).await })
        });
        if config.apply.read_ahead {
            // The stream's second session, on which it reads the next group while one commits.
            o.open_spare = Some(reopen.clone());
        }
        tasks.spawn(crate::origin_retry::run(o, queue, consumer.clone(), reopen));
    }
    // The main queue must be polled for the client to make progress; it carries no messages
    // since every assigned partition has its own queue. Should one arrive there anyway, the
    // stream of its partition has missed it: apply restarts, and every stream resumes from its
    // committed progress, so nothing is skipped.
    // Client-wide errors arrive here too: "all brokers down" makes apply report unhealthy
    // (librdkafka keeps reconnecting by itself; the streams resume when it succeeds).
    let main = consumer.clone();
    let (metrics, me) = (options.metrics.clone(), node.name.clone());
    tasks.spawn(async move {
        loop {
            match main.recv().await {
                Ok(m) => {
                    return Err(ApplyError::Setup {
                        node: me.clone(),
                        message: format!(
                            "a message of {}/{} at offset {} arrived outside its partition's stream; restarting apply to resume from the committed progress",
                            m.topic(),
                            m.partition(),
                            m.offset()
                        ),
                    })
                }
                Err(e) => {
                    if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown) {
                        metrics.kafka_down(&e.to_string());
                    }
                    tracing::warn!(node = %me, error = %e, "Kafka consumer");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });
    match tasks.join_next().await {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(ApplyError::Setup {
            node: node.name.clone(),
            message: format!("apply task failed: {e}"),
        }),
        None => Ok(()),
    }
}

use rdkafka::message::Message;

/// Opens the session a stream of `node` applies `remote`'s partition on.
async fn open_session(dsn: &str, node: &str, remote: &str) -> Result<postgres::PgSession, ApplyError> {
    let sql = postgres::connect(dsn, &format!("pgferry-apply-{node}-from-{remote}")).await?;
    // As PostgreSQL's own subscriptions do: an applied transaction need not wait for its WAL
    // flush. Its rows, its progress and its origin position commit together, so a crash
    // that loses the commit loses all three and the transaction is applied again from Kafka
    // (the benchmark measured 3x the drain rate; the flush was half of the session's CPU).
    sql.client
        .batch_execute("SET synchronous_commit = off")
        .await
        .map_err(sql.err("setting synchronous_commit for apply"))?;
    // As PostgreSQL's own apply: users' ordinary triggers and foreign-key actions do not
    // fire again on applied rows (`crate::replica_role`).
    crate::replica_role::set(&sql).await?;
    Ok(sql)
}

/// For each other node: whether the stream of the partition that carries its changes here has
/// work (a message in hand, or one within the last 10 s). A down or silent origin's stream
/// receives nothing, so its growing lag is not this node falling behind.
fn pending_probe(config: &Config, node: &pgferry_connectors::config::NodeConfig, streams: &[PartitionStream]) -> crate::metrics::PendingProbe {
    let mut by_origin = std::collections::HashMap::new();
    for origin in config.nodes.iter().filter(|o| o.name != node.name) {
        let Some(carrier) = config.carriers(node, &origin.name).first().copied() else { continue };
        let (topic, partition) = (config.region_topic(&carrier.region), config.node_partition(carrier));
        if let Some(s) = streams.iter().find(|s| s.topic == topic && s.partition == partition) {
            by_origin.insert(origin.name.clone(), s.progress.clone());
        }
    }
    Arc::new(move |origin: &str| Some(by_origin.get(origin)?.working(10_000)))
}
