//! Replay: re-reading a range of one origin's stream into a node, through the same
//! [`PartitionStream`] and writer as the apply service, so a replayed transaction is applied
//! (or skipped as a duplicate) exactly as apply would.
//!
//! Contract: the range is one partition's offsets `[start, end)`, where `end` is the partition's
//! end when the replay starts (or the first offset at `--to-time`); the transaction that is
//! open at `end` is finished. Without `force`, dedup by the origin's recorded progress makes
//! already-applied transactions a no-op. With `force`, the origin's progress on the node is
//! first set back to `after_lsn` (default: nothing applied) and the partition's resume offset
//! to `start − 1`, so everything in the range above `after_lsn` is applied again — the
//! roll-forward of a node restored from a backup. Replaying a node's own origin into it (its
//! changes since the backup) is allowed only with `force` and `after_lsn` (the LSN the backup
//! is consistent at); it writes under that node's own replication origin, which its capture
//! does not publish.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pgferry_connectors::config::Config;
use pgferry_connectors::kafka::{self, KafkaError, QuietEof};
use pgferry_connectors::postgres::{self, PgSession};
use pgferry_connectors::registry::Registry;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::dead_letter::DeadLetters;
use crate::error::ApplyError;
use crate::metrics::ApplyMetrics;
use crate::partition_stream::{PartitionStream, StreamProgress, Until};
use crate::progress::{self, format_lsn};

/// Where a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayStart {
    /// At this offset of the origin's partition.
    Offset(i64),
    /// At the first message produced at or after this time (ms since 1970).
    TimeMs(i64),
}

/// What to replay into a node.
#[derive(Debug, Clone)]
pub struct ReplayRequest {
    /// The origin whose transactions are replayed.
    pub origin: String,
    /// Where to start.
    pub start: ReplayStart,
    /// Stop before the first message produced at or after this time (ms since 1970).
    pub to_time_ms: Option<i64>,
    /// Set the origin's progress back first (to `after_lsn`, or to nothing applied).
    pub force: bool,
    /// With `force`: the origin's transactions at or below this commit LSN stay skipped.
    pub after_lsn: Option<u64>,
}

/// The offsets a replay covers, resolved from the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayPlan {
    /// The node replayed into.
    pub node: String,
    /// The origin replayed.
    pub origin: String,
    /// The node whose partition carries the origin to the node (the origin itself, or the
    /// node that forwards it).
    pub source: String,
    /// The region topic and partition that carry the origin to the node.
    pub topic: String,
    /// See `topic`.
    pub partition: i32,
    /// First offset read.
    pub start: i64,
    /// Offset the replay stops at (exclusive; the transaction open there is finished).
    pub end: i64,
    /// Offset of the last message the node had applied from this partition before the replay.
    pub recorded: Option<i64>,
}

impl ReplayPlan {
    /// Offsets between what the node applied and `start` that this replay does not read (a
    /// replay that starts after a gap leaves those transactions out).
    pub fn gap(&self) -> Option<(i64, i64)> {
        let next = self.recorded.map_or(0, |r| r + 1);
        (self.start > next && self.end > self.start).then_some((next, self.start - 1))
    }
}

/// What a replay did.
#[derive(Debug, Clone)]
pub struct ReplayReport {
    /// The range.
    pub plan: ReplayPlan,
    /// Transactions applied.
    pub applied: u64,
    /// Transactions skipped as already applied.
    pub skipped: u64,
}

/// Progress of a running replay, passed to the caller about once a second.
#[derive(Debug, Clone, Copy)]
pub struct ReplayStatus {
    /// Offset of the last message read (-1: none yet).
    pub offset: i64,
    /// Transactions applied so far.
    pub applied: u64,
    /// Transactions skipped so far.
    pub skipped: u64,
}

fn setup_err(node: &str, message: String) -> ApplyError {
    ApplyError::Setup {
        node: node.to_string(),
        message,
    }
}

/// Resolves `req` for `node`: which partition carries the origin, and the offsets to read.
pub async fn plan(config: &Config, node_name: &str, req: &ReplayRequest) -> Result<ReplayPlan, ApplyError> {
    let node = config
        .node(node_name)
        .ok_or_else(|| setup_err(node_name, "not in the config's [[nodes]]".into()))?;
    let carrier = if req.origin == node.name {
        if !(req.force && req.after_lsn.is_some()) {
            return Err(setup_err(
                node_name,
                format!(
                    "replaying {0}'s own changes into {0} needs --force and --after-lsn (the LSN its backup is consistent at: its transactions at or below it are in the backup)",
                    node.name
                ),
            ));
        }
        node
    } else {
        if config.node(&req.origin).is_none() {
            return Err(setup_err(node_name, format!("origin {:?} is not a node of the cluster", req.origin)));
        }
        match config.carriers(node, &req.origin).as_slice() {
            [one] => *one,
            _ => {
                return Err(setup_err(
                    node_name,
                    format!("no single partition carries {}'s changes to {}", req.origin, node.name),
                ))
            }
        }
    };
    let topic = config.region_topic(&carrier.region);
    let partition = config.node_partition(carrier);
    let (low, high) = blocking({
        let (k, t) = (config.kafka.clone(), topic.clone());
        move || kafka::watermarks(&k, &t, partition)
    })
    .await?;
    let start = match req.start {
        ReplayStart::Offset(k) if k < low => {
            return Err(setup_err(
                node_name,
                format!("offset {k} of {topic}/{partition} is no longer in Kafka (the earliest is {low}: retention)"),
            ))
        }
        ReplayStart::Offset(k) => k.min(high),
        ReplayStart::TimeMs(t) => offset_at(config, &topic, partition, t).await?.unwrap_or(high),
    };
    let end = match req.to_time_ms {
        Some(t) => offset_at(config, &topic, partition, t).await?.unwrap_or(high).min(high),
        None => high,
    };
    let sql = postgres::connect(&node.dsn, "pgferry-replay").await?;
    let recorded = progress::read(&sql, &topic, partition).await?.kafka_offset;
    Ok(ReplayPlan {
        node: node.name.clone(),
        origin: req.origin.clone(),
        source: carrier.name.clone(),
        topic,
        partition,
        start,
        end,
        recorded,
    })
}

async fn offset_at(config: &Config, topic: &str, partition: i32, time_ms: i64) -> Result<Option<i64>, ApplyError> {
    let (k, t) = (config.kafka.clone(), topic.to_string());
    blocking(move || kafka::offset_for_time(&k, &t, partition, time_ms)).await
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, ApplyError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        ApplyError::Kafka(KafkaError::Unreachable {
            bootstrap: String::new(),
            message: format!("Kafka lookup task failed: {e}"),
        })
    })?
    .map_err(ApplyError::from)
}

/// Runs the replay `plan` (from [`plan`]) of `req` into its node; `on_progress` is called
/// about once a second. The node's apply must not be applying the origin meanwhile
/// (PostgreSQL lets one session at a time use a replication origin; the replay fails naming it).
pub async fn run(
    config: Arc<Config>,
    plan: &ReplayPlan,
    req: &ReplayRequest,
    on_progress: impl Fn(ReplayStatus),
) -> Result<ReplayReport, ApplyError> {
    let node = plan.node.as_str();
    let dsn = &config
        .node(node)
        .ok_or_else(|| setup_err(node, "not in the config's [[nodes]]".into()))?
        .dsn;
    let mut report = ReplayReport {
        plan: plan.clone(),
        applied: 0,
        skipped: 0,
    };
    if plan.start >= plan.end {
        return Ok(report);
    }
    let sql = postgres::connect(dsn, "pgferry-replay").await?;
    // Written as apply writes: as a replica (`crate::replica_role`).
    crate::replica_role::set(&sql).await?;
    crate::conflict::upgrade_schema(&sql).await?;
    if req.force {
        reset_progress(&sql, &config.cluster.name, plan, req.after_lsn.unwrap_or(0)).await?;
    }
    let resume = progress::read(&sql, &plan.topic, plan.partition).await?;
    let applied: HashMap<String, u64> = resume.origins;

    let group = format!("pgferry-{}-{}-replay", config.cluster.name, node);
    let consumer: StreamConsumer<QuietEof> = kafka::read_committed_config(&config.kafka, &group)
        .set("enable.partition.eof", "true")
        .create_with_context(QuietEof)
        .map_err(|source| KafkaError::Client {
            bootstrap: config.kafka.bootstrap_servers.clone(),
            what: "creating consumer".into(),
            source,
        })?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&plan.topic, plan.partition, Offset::Offset(plan.start))
        .and_then(|()| consumer.assign(&tpl))
        .map_err(|source| KafkaError::Client {
            bootstrap: config.kafka.bootstrap_servers.clone(),
            what: format!("assigning {}/{}", plan.topic, plan.partition),
            source,
        })?;
    let mut stream = PartitionStream::new(
        config.clone(),
        node,
        &plan.source,
        plan.topic.clone(),
        plan.partition,
        sql,
        applied,
        ApplyMetrics::default(),
        Arc::new(DeadLetters::new(&config, node)?),
        Registry::new(&config.registry)?,
    );
    stream.only_origin = Some(plan.origin.clone());
    stream.apply_own = plan.origin == node;
    if config.apply.read_ahead {
        // A second session to read groups ahead on, opened as this one.
        let dsn = dsn.to_string();
        stream.open_spare = Some(Arc::new(move || {
            let dsn = dsn.clone();
            Box::pin(async move {
                let sql = postgres::connect(&dsn, "pgferry-replay").await?;
                crate::replica_role::set(&sql).await?;
                Ok(sql)
            })
        }));
    }
    let counts: Arc<StreamProgress> = stream.progress.clone();
    let status = || ReplayStatus {
        offset: counts.offset.load(Ordering::Relaxed),
        applied: counts.applied.load(Ordering::Relaxed),
        skipped: counts.skipped.load(Ordering::Relaxed),
    };
    {
        let run = stream.run_stream(consumer.stream(), Until::Offset(plan.end));
        let mut run = std::pin::pin!(run);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                r = &mut run => { r?; break; }
                _ = tick.tick() => on_progress(status()),
            }
        }
    }
    on_progress(status());
    report.applied = counts.applied.load(Ordering::Relaxed);
    report.skipped = counts.skipped.load(Ordering::Relaxed);
    Ok(report)
}

/// Sets `plan.origin`'s progress on the node back to `lsn` (its replication origin and
/// `pgferry.apply_progress`), and the partition's resume offset for it to `plan.start − 1`.
async fn reset_progress(sql: &PgSession, cluster: &str, plan: &ReplayPlan, lsn: u64) -> Result<(), ApplyError> {
    let name = pgferry_schemas::naming::replication_origin(cluster, &plan.node, &plan.origin);
    let lsn_text = format_lsn(lsn);
    postgres::create_replication_origin(sql, &name).await?;
    sql.client
        .execute(
            "SELECT pg_replication_origin_advance($1, $2::text::pg_lsn)",
            &[&name, &lsn_text],
        )
        .await
        .map_err(sql.err(format!(
            "resetting replication origin {name} (is apply of {} running? stop it during the replay)",
            plan.node
        )))?;
    let before = plan.start - 1;
    sql.client
        .batch_execute("BEGIN")
        .await
        .map_err(sql.err("starting a transaction"))?;
    sql.client
        .execute(
            "UPDATE pgferry.apply_progress SET commit_lsn = $2::text::pg_lsn
             WHERE origin = $1 AND commit_lsn > $2::text::pg_lsn",
            &[&plan.origin, &lsn_text],
        )
        .await
        .map_err(sql.err("resetting pgferry.apply_progress"))?;
    sql.client
        .execute(
            "INSERT INTO pgferry.apply_progress (origin, topic, partition, kafka_offset, commit_lsn, commit_ts, applied_at)
             VALUES ($1, $2, $3, $4, $5::text::pg_lsn, 'epoch', clock_timestamp())
             ON CONFLICT (origin, topic, partition) DO UPDATE
               SET kafka_offset = EXCLUDED.kafka_offset, commit_lsn = EXCLUDED.commit_lsn",
            &[&plan.origin, &plan.topic, &plan.partition, &before, &lsn_text],
        )
        .await
        .map_err(sql.err("resetting pgferry.apply_progress"))?;
    sql.client
        .batch_execute("COMMIT")
        .await
        .map_err(sql.err("resetting pgferry.apply_progress"))?;
    tracing::info!(node = %plan.node, origin = %plan.origin, lsn = %lsn_text, offset = before,
        "origin progress reset for the replay");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gap_between_recorded_and_start() {
        let mut p = ReplayPlan {
            node: "n2".into(),
            origin: "n1".into(),
            source: "n1".into(),
            topic: "c.eu.changes".into(),
            partition: 0,
            start: 10,
            end: 20,
            recorded: Some(9),
        };
        assert_eq!(p.gap(), None);
        p.recorded = Some(4);
        assert_eq!(p.gap(), Some((5, 9)));
        p.recorded = None;
        assert_eq!(p.gap(), Some((0, 9)));
        p.start = 0;
        assert_eq!(p.gap(), None);
    }
}
