//! Publishing each conflict recorded in `pgferry.conflicts` to `<cluster>.conflicts` as a
//! `pgferry.ConflictReport` (DESIGN.md, "Conflicts").
//!
//! An outbox: apply records a conflict in the transaction that settles it, and this task
//! publishes committed rows whose `published_at` is still NULL, then marks them. A crash between
//! the two publishes a row again (at least once; node + id identify a report). Failures (Kafka
//! or the registry away) are logged and retried; they never hold up applying changes.

use std::sync::Arc;
use std::time::Duration;

use pgferry_connectors::config::Config;
use pgferry_connectors::kafka::{self, KafkaError};
use pgferry_connectors::postgres::{self, PgSession};
use pgferry_connectors::registry::Registry;
use pgferry_schemas::codec::encode_frame;
use pgferry_schemas::conflict_report::{ConflictReport, CONFLICT_REPORT_NAME, CONFLICT_REPORT_SCHEMA};
use pgferry_schemas::naming::subject;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::error::ApplyError;

/// Rows published per round.
const BATCH: i64 = 500;
/// How often the outbox is read when it was empty.
const POLL: Duration = Duration::from_millis(500);

/// Publishes node `node`'s conflicts until the process ends.
pub async fn run(config: Arc<Config>, node: String, dsn: String) {
    loop {
        if let Err(e) = publish(&config, &node, &dsn).await {
            tracing::warn!(node = %node, error = %e, "publishing conflicts to Kafka; retrying in 5 s");
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }
}

async fn publish(config: &Config, node: &str, dsn: &str) -> Result<(), ApplyError> {
    let topic = format!("{}.conflicts", config.cluster.name);
    let sql = postgres::connect(dsn, &format!("pgferry-apply-{node}-conflicts")).await?;
    let producer = kafka::plain_producer(&config.kafka)?;
    let registry = Registry::new(&config.registry)?;
    let schema = ConflictReport::schema().map_err(|source| ApplyError::Setup {
        node: node.into(),
        message: format!("conflict report schema: {source}"),
    })?;
    let schema_id = registry
        .register(&subject(&topic, CONFLICT_REPORT_NAME), CONFLICT_REPORT_NAME, CONFLICT_REPORT_SCHEMA)
        .await?;
    loop {
        let reports = unpublished(&sql, node).await?;
        if reports.is_empty() {
            tokio::time::sleep(POLL).await;
            continue;
        }
        let mut sends = Vec::with_capacity(reports.len());
        for r in &reports {
            let datum = r.encode(&schema).map_err(|source| ApplyError::Setup {
                node: node.into(),
                message: format!("encoding conflict {}: {source}", r.id),
            })?;
            sends.push(send(&producer, &topic, format!("{node}/{}", r.id), encode_frame(schema_id, &datum)));
        }
        futures::future::try_join_all(sends).await?;
        let ids: Vec<i64> = reports.iter().map(|r| r.id).collect();
        sql.client
            .execute(
                "UPDATE pgferry.conflicts SET published_at = clock_timestamp() WHERE id = ANY($1)",
                &[&ids],
            )
            .await
            .map_err(sql.err("marking conflicts published"))?;
        tracing::debug!(node = %node, count = ids.len(), topic = %topic, "conflicts published");
    }
}

async fn send(producer: &FutureProducer, topic: &str, key: String, payload: Vec<u8>) -> Result<(), ApplyError> {
    producer
        .send(FutureRecord::to(topic).key(&key).payload(&payload), Duration::from_secs(30))
        .await
        .map(|_| ())
        .map_err(|(e, _)| {
            ApplyError::Kafka(KafkaError::Topic {
                topic: topic.to_string(),
                message: format!("publishing conflict {key}: {e}"),
            })
        })
}

/// The oldest committed conflicts not published yet.
async fn unpublished(sql: &PgSession, node: &str) -> Result<Vec<ConflictReport>, ApplyError> {
    let us = |col: &str| format!("(extract(epoch FROM {col}) * 1000000)::int8");
    let rows = sql
        .client
        .query(
            &format!(
                "SELECT id, {}, tbl, key::text, conflict_type, resolver, resolution, local_row::text, local_origin,
                        {}, remote_op, remote_row::text, remote_origin, {}, remote_commit_lsn::text
                 FROM pgferry.conflicts WHERE published_at IS NULL ORDER BY id LIMIT {BATCH}",
                us("detected_at"),
                us("local_commit_ts"),
                us("remote_commit_ts")
            ),
            &[],
        )
        .await
        .map_err(sql.err("reading unpublished conflicts"))?;
    Ok(rows
        .iter()
        .map(|r| ConflictReport {
            node: node.to_string(),
            id: r.get(0),
            detected_at_us: r.get(1),
            table: r.get(2),
            key: r.get(3),
            conflict_type: r.get(4),
            resolver: r.get(5),
            resolution: r.get(6),
            local_row: r.get(7),
            local_origin: r.get(8),
            local_commit_ts_us: r.get(9),
            remote_op: r.get(10),
            remote_row: r.get(11),
            remote_origin: r.get(12),
            remote_commit_ts_us: r.get(13),
            remote_commit_lsn: r.get(14),
        })
        .collect())
}
