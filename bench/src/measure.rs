//! Shared steps of the benchmarks: LSNs, waiting until capture has a marker transaction in
//! Kafka, formatting, and removing a benchmark cluster (databases, slots, topics).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pgferry_integration_tests::{Cluster, Service};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;
use tokio_postgres::Client;

use crate::partition::PartitionProbe;

/// Reads an LSN expression (`pg_current_wal_lsn()`, a column...) as a number.
pub async fn lsn(client: &Client, expr: &str) -> Result<u64> {
    let row = client
        .query_one(&format!("SELECT ({expr} - '0/0'::pg_lsn)::text"), &[])
        .await
        .with_context(|| format!("reading {expr}"))?;
    let text: String = row.get(0);
    text.parse().with_context(|| format!("{expr} = {text} is not a number"))
}

/// An LSN in PostgreSQL's `X/Y` form.
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Waits until node 0's partition holds a committed change event whose commit LSN is at least
/// `marker` (an LSN read inside the last transaction before it committed, so only that
/// transaction or a later one qualifies; partitions keep commit order, so everything before
/// it is there too). Returns when that was seen. Fails after `timeout`, with the logs.
pub async fn wait_captured(
    cluster: &Cluster,
    service: &mut Service,
    probe: &PartitionProbe,
    marker: u64,
    timeout: Duration,
) -> Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = tokio::task::block_in_place(|| probe.last_change_commit_lsn())?;
        if last.is_some_and(|l| l >= marker) {
            return Ok(Instant::now());
        }
        if let Some(status) = service.try_wait()? {
            bail!(
                "pgferry capture exited ({status}) before capturing everything\n{}",
                cluster.logs()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "pgferry capture did not get to {} within {timeout:?} (last change at {:?})\n{}",
                lsn_text(marker),
                last.map(lsn_text),
                cluster.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until capture's slot is in use (capture connected and streaming).
pub async fn wait_slot_active(cluster: &Cluster, slot: &str, timeout: Duration) -> Result<()> {
    let c = cluster.sql(0).await?;
    let deadline = Instant::now() + timeout;
    loop {
        let active: Option<bool> = c
            .query_opt("SELECT active FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await?
            .map(|r| r.get(0));
        if active == Some(true) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("slot {slot} not in use after {timeout:?}\n{}", cluster.logs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Drops the cluster's databases and slots (harness) and its topics (they can hold gigabytes).
pub async fn remove(cluster: Cluster) -> Result<()> {
    let reaper = tokio::spawn(end_pglogical_supervisors(cluster.endpoints.pg.clone()));
    let removed = remove_cluster(cluster).await;
    reaper.abort();
    removed
}

/// pglogical 2.4.2's supervisor never accepts the signal barrier that DROP DATABASE waits for
/// on PostgreSQL 15 (pglogical issues #399 and #418), so on a server that preloads pglogical
/// (the comparison's) DROP DATABASE hangs while the supervisor runs. This ends it every second
/// while the databases are dropped; the postmaster starts it again, and a supervisor started
/// after the barrier does not hold it up. Nothing to do on servers without pglogical.
async fn end_pglogical_supervisors(servers: Vec<String>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        for dsn in &servers {
            if let Ok(c) = pgferry_integration_tests::connect(dsn).await {
                let _ = c
                    .batch_execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'pglogical supervisor'",
                    )
                    .await;
            }
        }
    }
}

async fn remove_cluster(cluster: Cluster) -> Result<()> {
    let bootstrap = cluster.endpoints.kafka.clone();
    let topics: Vec<String> = ["changes", "conflicts", "dlq"]
        .iter()
        .map(|t| match *t {
            "changes" => cluster.topic_of(0),
            other => format!("{}.{other}", cluster.name),
        })
        .collect();
    cluster.cleanup().await?;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .context("creating a Kafka admin client")?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    // Best effort: a topic that is already gone is fine.
    let _ = admin.delete_topics(&names, &opts).await;
    Ok(())
}

/// `n` with thousands separators (`1,234,567`).
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(2_000_000), "2,000,000");
        assert_eq!(lsn_text(0x1_0000_00A0), "1/A0");
        assert_eq!(lsn_text(0x16B3748), "0/16B3748");
    }
}
