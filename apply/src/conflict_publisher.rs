//! Publishing each conflict recorded in `pgferry.conflicts` to `<cluster>.conflicts` as a
//! `pgferry.ConflictReport` (DESIGN.md, "Conflicts").
//!
//! An outbox read by snapshot, not by marking rows: apply records a conflict in the transaction
//! that settles it (the row's `writer_xid` is that transaction), and each round of this task
//! takes a snapshot, publishes the rows whose writer is visible in it and was not in the
//! snapshot the previous round published up to (`pgferry.conflicts_outbox`), then stores the
//! new snapshot. So publishing writes one row per round, not one per conflict, and a transaction
//! that commits late, whatever its conflicts' ids, is published in the round that first sees it.
//! A crash between publishing and storing the snapshot publishes those rows again (at least once;
//! node + id identify a report). Failures (Kafka or the registry away) are logged and retried;
//! they never hold up applying changes.
//!
//! Until a node's first round has stored a snapshot (a node initialized before the outbox
//! existed), that round publishes the rows whose `published_at` is NULL, the earlier outbox's mark.

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
        let published = publish_round(&sql, node, &producer, &topic, &schema, schema_id).await?;
        if published == 0 {
            tokio::time::sleep(POLL).await;
        } else {
            tracing::debug!(node = %node, count = published, topic = %topic, "conflicts published");
        }
    }
}

/// One round: every conflict committed between the stored snapshot and a snapshot taken now,
/// published in pages, then the new snapshot stored. Returns how many were published.
///
/// No transaction spans the round: which rows it publishes is fixed by the two snapshots (rows
/// whose writer is visible in the new one and not in the stored one, all committed when the
/// round began), so each page is a query of its own, and a long round (a backlog of conflicts)
/// never holds back the server's cleanup of dead rows the way an open snapshot would.
async fn publish_round(
    sql: &PgSession,
    node: &str,
    producer: &FutureProducer,
    topic: &str,
    schema: &apache_avro::Schema,
    schema_id: u32,
) -> Result<usize, ApplyError> {
    let snapshots = sql
        .client
        .query_one(
            "SELECT (SELECT published_upto::text FROM pgferry.conflicts_outbox WHERE id = 1), pg_current_snapshot()::text",
            &[],
        )
        .await
        .map_err(sql.err("reading the conflicts outbox"))?;
    let (since, now): (Option<String>, String) = (snapshots.get(0), snapshots.get(1));
    let mut after = Page::Start;
    let mut published = 0;
    loop {
        let reports = page(sql, node, since.as_deref(), &now, &after).await?;
        let Some(last) = reports.last() else { break };
        after = Page::After {
            writer_xid: last.1.clone(),
            id: last.0.id,
        };
        let mut sends = Vec::with_capacity(reports.len());
        for (r, _) in &reports {
            let datum = r.encode(schema).map_err(|source| ApplyError::Setup {
                node: node.into(),
                message: format!("encoding conflict {}: {source}", r.id),
            })?;
            sends.push(send(producer, topic, format!("{node}/{}", r.id), encode_frame(schema_id, &datum)));
        }
        futures::future::try_join_all(sends).await?;
        published += reports.len();
    }
    // Nothing new since `since`: the rows visible now and not then are none, so `since` stays.
    if published > 0 || since.is_none() {
        sql.client
            .execute(
                "INSERT INTO pgferry.conflicts_outbox (id, published_upto) VALUES (1, $1::text::pg_snapshot)
                 ON CONFLICT (id) DO UPDATE SET published_upto = EXCLUDED.published_upto",
                &[&now],
            )
            .await
            .map_err(sql.err("storing the snapshot conflicts are published up to"))?;
    }
    Ok(published)
}

/// Where a page of [`page`] starts.
enum Page {
    Start,
    /// After the row with this `writer_xid` (text; NULL for the first round's rows) and id.
    After { writer_xid: Option<String>, id: i64 },
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

/// The next page of conflicts to publish in the round up to snapshot `upto`, with each row's
/// `writer_xid`: those whose writer is visible in `upto` and not in the stored snapshot `since`,
/// in `(writer_xid, id)` order; without a stored snapshot (the node's first round), those whose
/// `published_at` is NULL (and whose writer, if recorded, is visible in `upto`), by id.
async fn page(sql: &PgSession, node: &str, since: Option<&str>, upto: &str, after: &Page) -> Result<Vec<(ConflictReport, Option<String>)>, ApplyError> {
    let us = |col: &str| format!("(extract(epoch FROM {col}) * 1000000)::int8");
    let columns = format!(
        "id, {}, tbl, key::text, conflict_type, resolver, resolution, local_row::text, local_origin,
         {}, remote_op, remote_row::text, remote_origin, {}, remote_commit_lsn::text, writer_xid::text",
        us("detected_at"),
        us("local_commit_ts"),
        us("remote_commit_ts")
    );
    let (after_xid, after_id) = match after {
        Page::Start => (Some("0".to_string()), 0),
        Page::After { writer_xid, id } => (writer_xid.clone(), *id),
    };
    let rows = match since {
        Some(since) => {
            sql.client
                .query(
                    &format!(
                        // `c.writer_xid` in ORDER BY: a bare `writer_xid` would name the
                        // output column (its text), and pages would follow text order. The
                        // lower bound is one row comparison (writers below the stored
                        // snapshot's xmin were all visible to it), so the index scan starts
                        // there instead of filtering from the index's start.
                        "SELECT {columns} FROM pgferry.conflicts c
                         WHERE writer_xid < pg_snapshot_xmax($4::text::pg_snapshot)
                           AND NOT pg_visible_in_snapshot(writer_xid, $1::text::pg_snapshot)
                           AND pg_visible_in_snapshot(writer_xid, $4::text::pg_snapshot)
                           AND (writer_xid, id) > (greatest($2::text::xid8, pg_snapshot_xmin($1::text::pg_snapshot)), $3)
                         ORDER BY c.writer_xid, c.id LIMIT {BATCH}"
                    ),
                    &[&since, &after_xid, &after_id, &upto],
                )
                .await
        }
        None => {
            sql.client
                .query(
                    &format!(
                        "SELECT {columns} FROM pgferry.conflicts
                         WHERE published_at IS NULL AND id > $1
                           AND (writer_xid IS NULL OR pg_visible_in_snapshot(writer_xid, $2::text::pg_snapshot))
                         ORDER BY id LIMIT {BATCH}"
                    ),
                    &[&after_id, &upto],
                )
                .await
        }
    }
    .map_err(sql.err("reading conflicts to publish"))?;
    Ok(rows
        .iter()
        .map(|r| {
            let report = ConflictReport {
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
            };
            (report, r.get(15))
        })
        .collect())
}
