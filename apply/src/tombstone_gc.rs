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
//!
//! "Every other node" is the topology as it is now, not as it was at start (issue 16, scenario
//! 11): the nodes of the config this process started with (the streams it reads) and those of
//! the config file read again each round — a node added since (`pgferry node add`) is one whose
//! partition this apply reads only after a restart, so until then it has no `w` here and
//! nothing is dropped: its changes, still unread, may be older than any tombstone.

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

/// The nodes whose streams must be applied here past a tombstone before it can go: every node
/// but `node` of `start` (the config this process started with, whose streams it reads) and of
/// `now` (the config file as it is now: nodes added since start), each once, in that order.
pub fn origins_to_wait_for(start: &Config, now: Option<&Config>, node: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for n in start.nodes.iter().chain(now.into_iter().flat_map(|c| c.nodes.iter())) {
        if n.name != node && !out.contains(&n.name) {
            out.push(n.name.clone());
        }
    }
    out
}

/// The origin time (µs) below which tombstones can go: `margin_ms` before the least of the
/// times up to which each of `origins` is applied here (`caught_up`); None while any of them
/// has none.
pub fn watermark(origins: &[String], caught_up: impl Fn(&str) -> Option<i64>, margin_ms: u64) -> Option<i64> {
    let mut min: Option<i64> = None;
    for origin in origins {
        let t = caught_up(origin)?;
        min = Some(min.map_or(t, |m| m.min(t)));
    }
    min.map(|m| m - (margin_ms as i64) * 1000)
}

/// The nodes to wait for this round ([`origins_to_wait_for`]), with the config file read again;
/// None when it was loaded from a file that no longer loads (`Config::reload` logs why): nothing
/// is dropped until it does.
fn current_origins(config: &Config, node: &str) -> Option<Vec<String>> {
    match &config.source {
        Some(_) => config.reload().map(|now| origins_to_wait_for(config, Some(&now), node)),
        None => Some(origins_to_wait_for(config, None, node)),
    }
}

async fn collect(config: &Config, node: &str, dsn: &str, metrics: &ApplyMetrics) -> Result<(), ApplyError> {
    let sql = postgres::connect(dsn, &format!("pgferry-apply-{node}-tombstones")).await?;
    let mut unread_warned: Vec<String> = Vec::new();
    loop {
        tokio::time::sleep(EVERY).await;
        let Some(origins) = current_origins(config, node) else {
            continue;
        };
        // A node added since start: this process does not read its partition. Say so once.
        for origin in origins.iter().filter(|o| config.node(o).is_none()) {
            if !unread_warned.contains(origin) {
                tracing::warn!(
                    node = %node,
                    origin = %origin,
                    "node {origin} is in the config file but this apply started without it and does not read its \
                     partition: tombstones and group stamps are kept until apply is restarted and has read it"
                );
                unread_warned.push(origin.clone());
            }
        }
        let caught_up = |origin: &str| metrics.caught_up_to(origin);
        let Some(w) = watermark(&origins, caught_up, config.replication.tombstone_margin_ms) else {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(nodes: &[&str]) -> Config {
        let mut text = String::from(
            "[cluster]\nname = \"c\"\n[kafka]\nbootstrap_servers = \"k:9092\"\n[registry]\nurl = \"http://r\"\n",
        );
        for (i, n) in nodes.iter().enumerate() {
            text += &format!("[[nodes]]\nname = \"{n}\"\nid = {}\nregion = \"r1\"\ndsn = \"host=h\"\n", i + 1);
        }
        text += "[replication]\ntables = [\"public.t\"]\n";
        match Config::parse(&text, "test") {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn a_node_added_since_start_is_waited_for() {
        let start = config(&["n1", "n2"]);
        assert_eq!(origins_to_wait_for(&start, None, "n1"), ["n2"]);
        let now = config(&["n1", "n2", "n3"]);
        assert_eq!(origins_to_wait_for(&start, Some(&now), "n1"), ["n2", "n3"]);
        // A node taken out of the file since start: its stream still runs here, still counted.
        let now = config(&["n1", "n3"]);
        assert_eq!(origins_to_wait_for(&start, Some(&now), "n1"), ["n2", "n3"]);
    }

    #[test]
    fn no_watermark_until_every_origin_has_a_position() {
        let origins = vec!["n2".to_string(), "n3".to_string()];
        let only_n2 = |o: &str| (o == "n2").then_some(100_000_000);
        assert_eq!(watermark(&origins, only_n2, 1000), None, "n3 (added since start) not read yet");
        let both = |o: &str| Some(if o == "n2" { 100_000_000 } else { 50_000_000 });
        assert_eq!(watermark(&origins, both, 1000), Some(49_000_000), "the least, less the margin");
        assert_eq!(watermark(&[], both, 1000), None, "no other node: nothing to go by");
    }
}
