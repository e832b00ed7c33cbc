//! Dropping tombstones nobody needs any more (DESIGN.md, "Conflicts").
//!
//! A tombstone dated `t` matters only to a change older than `t` that has not arrived yet. Once
//! every other node's stream is applied here up to origin time `w` (its last applied
//! transaction or heartbeat: a partition delivers an origin's transactions in commit order),
//! whatever still arrives from it is dated at least about `w`, and would win over a tombstone
//! older than `w` anyway. So tombstones older than `min(w) − margin` go; the margin
//! (`[replication] tombstone_margin_ms`) covers commit times that are not quite in commit
//! order. Until every origin has a `w` (right after start-up) nothing is dropped. Groups'
//! records of exact stamps (`pgferry.xact_stamps`) go by the same rule.

use std::sync::Arc;
use std::time::Duration;

use pgferry_connectors::config::Config;
use pgferry_connectors::postgres;

use crate::error::ApplyError;
use crate::metrics::ApplyMetrics;

/// How often tombstones are collected.
const EVERY: Duration = Duration::from_secs(5);

/// Collects node `node`'s tombstones until the process ends.
pub async fn run(config: Arc<Config>, node: String, dsn: String, metrics: ApplyMetrics) {
    loop {
        if let Err(e) = collect(&config, &node, &dsn, &metrics).await {
            tracing::warn!(node = %node, error = %e, "collecting tombstones; retrying in 5 s");
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }
}

/// The origin time (µs) below which tombstones can go, if every other node has one.
pub fn watermark(config: &Config, node: &str, metrics: &ApplyMetrics, margin_ms: u64) -> Option<i64> {
    let mut min: Option<i64> = None;
    for other in config.nodes.iter().filter(|n| n.name != node) {
        let t = metrics.caught_up_to(&other.name)?;
        min = Some(min.map_or(t, |m| m.min(t)));
    }
    min.map(|m| m - (margin_ms as i64) * 1000)
}

async fn collect(config: &Config, node: &str, dsn: &str, metrics: &ApplyMetrics) -> Result<(), ApplyError> {
    let sql = postgres::connect(dsn, &format!("pgferry-apply-{node}-tombstones")).await?;
    loop {
        tokio::time::sleep(EVERY).await;
        let Some(w) = watermark(config, node, metrics, config.replication.tombstone_margin_ms) else {
            continue;
        };
        let dropped = sql
            .client
            .execute(
                "DELETE FROM pgferry.tombstones tb
                 WHERE coalesce(CASE WHEN tb.stamp_xid = tb.xid THEN tb.ts_us END,
                                (extract(epoch FROM (pg_xact_commit_timestamp_origin((tb.xid % 4294967296)::text::xid)).timestamp)
                                 * 1000000)::int8, 0) < $1",
                &[&w],
            )
            .await
            .map_err(sql.err("dropping old tombstones"))?;
        // Tables' truncations (`writer::truncate`) by the same rule.
        sql.client
            .execute(
                "DELETE FROM pgferry.truncations tr
                 WHERE coalesce((extract(epoch FROM (pg_xact_commit_timestamp_origin((tr.xid % 4294967296)::text::xid)).timestamp)
                                 * 1000000)::int8, 0) < $1",
                &[&w],
            )
            .await
            .map_err(sql.err("dropping old truncations"))?;
        if dropped > 0 {
            metrics.tombstones_dropped(dropped);
            tracing::debug!(node = %node, dropped, watermark_us = w, "tombstones dropped");
        }
        // Groups' exact stamps (`pgferry.xact_stamps`) by the same rule: once every origin is
        // applied past a group's commit time, whatever still arrives is later than every stamp
        // in it and than the group's own commit time, which its rows then show, so the exact
        // times cannot change a decision any more.
        let records = sql
            .client
            .execute(
                "WITH g AS (DELETE FROM pgferry.xact_stamp_groups WHERE ts_us < $1 RETURNING xid)
                 DELETE FROM pgferry.xact_stamps x USING g WHERE x.xid = g.xid",
                &[&w],
            )
            .await
            .map_err(sql.err("dropping old group stamps"))?;
        if records > 0 {
            tracing::debug!(node = %node, buckets = records, watermark_us = w, "group stamp buckets dropped");
        }
    }
}
