//! Waiting for replication to catch up between a set of nodes: every node has applied every
//! replicated transaction the others had committed when the wait began. Used by `diff` and
//! `repair` before they call a row a difference (under live traffic a row may differ only
//! because its change is still on its way).
//!
//! For each node X: read X's current WAL position L; wait until X's slot has confirmed L
//! (capture has put everything X committed before L into Kafka; heartbeats move the slot on
//! an idle node every 5 s); read the commit LSN T of X's last transaction in its partition;
//! then wait until every other node's recorded progress for origin X
//! (`pgferry.apply_progress`) has reached T.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pgferry_connectors::config::Config;
use pgferry_connectors::kafka;

use crate::table_compare::NodeSession;

const POLL: Duration = Duration::from_millis(200);

/// Polls `check` until it is true or `deadline` passes; whether it became true.
async fn poll<F, Fut>(deadline: Instant, mut check: F) -> Result<bool>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    loop {
        if check().await? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn lsn(node: &NodeSession, text: &str, params: &[&(dyn tokio_postgres::types::ToSql + Sync)]) -> Result<Option<u64>> {
    let row = node
        .sql
        .client
        .query_one(text, params)
        .await
        .map_err(node.sql.err("reading a WAL position"))
        .with_context(|| format!("node {}", node.name))?;
    Ok(row.get::<_, Option<String>>(0).and_then(|v| v.parse().ok()))
}

/// Waits (at most `timeout`) until every node of `nodes` has applied what the others had
/// committed when called. Ok(false) when the time ran out (a capture or apply not running, or
/// far behind); the reason is logged.
pub async fn wait(config: &Config, nodes: &[NodeSession], timeout: Duration) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    let mut targets = Vec::new();
    for x in nodes {
        let now = lsn(x, "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::text", &[]).await?;
        targets.push(now.unwrap_or(0));
    }
    for (x, &wal) in nodes.iter().zip(&targets) {
        let receivers: Vec<&NodeSession> = nodes
            .iter()
            .filter(|y| y.name != x.name)
            .filter(|y| config.node(&y.name).is_some_and(|yc| !config.carriers(yc, &x.name).is_empty()))
            .collect();
        if receivers.is_empty() {
            continue;
        }
        let slot = pgferry_schemas::naming::slot_name(&config.cluster.name, &x.name);
        let published = poll(deadline, || async {
            let flushed = lsn(
                x,
                "SELECT ((SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1) - '0/0'::pg_lsn)::text",
                &[&slot],
            )
            .await?;
            Ok(flushed.is_some_and(|f| f >= wal))
        })
        .await?;
        if !published {
            tracing::warn!(node = %x.name, %slot, "capture has not published the node's recent changes in time (is it running?)");
            return Ok(false);
        }
        let Some(xc) = config.node(&x.name) else { continue };
        let (k, topic, partition, origin) = (
            config.kafka.clone(),
            config.region_topic(&xc.region),
            config.node_partition(xc),
            x.name.clone(),
        );
        let group = format!("pgferry-{}-catch-up", config.cluster.name);
        let last = tokio::task::spawn_blocking(move || {
            kafka::last_committed_transaction_lsn(&k, &group, &topic, partition, &origin)
        })
        .await
        .context("reading the tail of a partition")??;
        let Some(last) = last else { continue };
        for y in receivers {
            let applied = poll(deadline, || async {
                let have = lsn(
                    y,
                    "SELECT max(commit_lsn - '0/0'::pg_lsn)::text FROM pgferry.apply_progress WHERE origin = $1",
                    &[&x.name],
                )
                .await?;
                Ok(have.is_some_and(|h| h >= last))
            })
            .await?;
            if !applied {
                tracing::warn!(node = %y.name, origin = %x.name, "apply has not caught up in time (is it running?)");
                return Ok(false);
            }
        }
    }
    Ok(true)
}
