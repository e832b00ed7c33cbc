//! Issue 16, scenario 14, first part: one event over Kafka's size limit. Before, capture failed
//! with an opaque librdkafka error (or a failed commit) and retried forever. Now the error names
//! the node, the table, the key, the LSNs, the size and the limit with the setting to change;
//! `/healthz` says capture is stuck and why; `pgferry_capture_events_too_large_total` counts it;
//! nothing after the event is published and the slot stays before it, so once the operator
//! raises the limit every row arrives, in order, once. Two limits: the capture producer's
//! `message.max.bytes` (checked by librdkafka before sending) and the topic's
//! `max.message.bytes` (checked by the broker; set here as a topic config on the shared broker).

use std::time::Duration;

use anyhow::{Context, Result};
use pgferry_integration_tests::{free_local_addr, http_get, metric, naming, wait_until, Cluster, Service};
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

const TABLE: &str = "CREATE TABLE big (id int PRIMARY KEY, body text)";

/// About 640 KB of hex text: over 200,000 bytes even compressed with lz4, under 1 MiB whole.
const BIG_ROW: &str =
    "INSERT INTO big SELECT 2, string_agg(md5(random()::text || g), '') FROM generate_series(1, 20000) g";

/// The slot's confirmed position on node `i`, as a number.
async fn confirmed(cluster: &Cluster, i: usize) -> Result<u64> {
    let v: String = cluster
        .sql(i)
        .await?
        .query_one(
            "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&naming::slot_name(&cluster.name, &cluster.nodes[i].name)],
        )
        .await?
        .get(0);
    Ok(v.parse()?)
}

/// Writes rows 1 (small), 2 (big) and 3 (small) on n1, each in its own transaction, row 2 once
/// row 1 is on n2; returns the WAL position after row 2's commit.
async fn write_rows(cluster: &Cluster) -> Result<u64> {
    let n1 = cluster.sql(0).await?;
    n1.batch_execute("INSERT INTO big VALUES (1, 'small')").await?;
    // Row 1 goes through first (sharing a Kafka transaction with the big row, it would wait
    // with it: capture commits a batch whole).
    let n2 = cluster.sql(1).await?;
    wait_until("row 1 on n2", Duration::from_secs(60), || async {
        Ok(n2.query_one("SELECT count(*) FROM big", &[]).await?.get::<_, i64>(0) == 1)
    })
    .await?;
    n1.batch_execute(BIG_ROW).await?;
    let after: String = n1
        .query_one("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::text", &[])
        .await?
        .get(0);
    n1.batch_execute("INSERT INTO big VALUES (3, 'small after the big one')")
        .await?;
    Ok(after.parse()?)
}

/// Starts capture (with `/metrics`) and apply, writes the rows, and checks what the operator
/// sees while capture is stuck on row 2: the log line naming the node and `needles`, `/healthz`
/// and the counter, nothing published after it, and capture still running (retrying). Returns
/// capture, apply and capture's metrics address.
async fn run_until_stuck(cluster: &Cluster, needles: &[&str]) -> Result<(Service, Service, String)> {
    let metrics = free_local_addr()?;
    let mut capture = cluster.spawn_with("capture", 0, &["--metrics-listen", &metrics])?;
    let apply = cluster.spawn("apply", 1)?;
    let after_big = write_rows(cluster).await?;
    let log = capture.log.clone();
    let node = cluster.nodes[0].name.as_str();
    wait_until(
        "capture to name the event that is too large",
        Duration::from_secs(180),
        || async { Ok(std::fs::read_to_string(&log)?.contains("cannot be produced to")) },
    )
    .await?;
    let text = std::fs::read_to_string(&log)?;
    let line = text
        .lines()
        .find(|l| l.contains("cannot be produced to"))
        .unwrap_or_default()
        .to_string();
    eprintln!("capture says: {line}");
    for needle in std::iter::once(&node).chain(needles) {
        assert!(line.contains(needle), "the error does not name {needle:?}: {line}");
    }
    assert!(!text.contains("panicked"), "capture panicked:\n{text}");
    wait_until("/healthz to say capture is stuck", Duration::from_secs(30), || async {
        let (status, body) = http_get(&metrics, "/healthz").await?;
        Ok(status == 503 && body.contains("stuck") && body.contains("over"))
    })
    .await?;
    let (_, body) = http_get(&metrics, "/healthz").await?;
    eprintln!("/healthz: {body}");
    let (_, text) = http_get(&metrics, "/metrics").await?;
    let count = metric(&text, "pgferry_capture_events_too_large_total", &[("node", node)]).unwrap_or(0.0);
    assert!(count >= 1.0, "the counter counts it: {count}");
    // Nothing after it: n2 has row 1 only, and the slot is still before row 2's commit.
    let ids: Vec<i32> = cluster
        .sql(1)
        .await?
        .query("SELECT id FROM big ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec![1], "the stream holds at the big row, in order");
    let slot = confirmed(cluster, 0).await?;
    assert!(
        slot < after_big,
        "the slot stays before the big row ({slot} < {after_big})"
    );
    assert!(capture.try_wait()?.is_none(), "capture keeps running (retrying)");
    Ok((capture, apply, metrics))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_the_producers_limit_is_named_and_nothing_is_lost() -> Result<()> {
    let mut cluster = Cluster::create("toolargep", &["r1", "r1"], TABLE, &["public.big"]).await?;
    cluster.kafka_toml = "[kafka.properties]\n\"message.max.bytes\" = \"200000\"".into();
    cluster.write_config()?;
    cluster.init()?;
    let (mut capture, apply, _) = run_until_stuck(
        &cluster,
        &[
            "public.big",
            "(id)=(2)",
            "message.max.bytes",
            "200000",
            "[kafka.properties]",
            "LSN",
        ],
    )
    .await?;

    // The operator raises the limit (back to pgferry's default) and restarts capture; init made
    // the topic with the producer's limit then, so its max.message.bytes goes up too, as the
    // error says.
    capture.kill();
    cluster.kafka_toml = String::new();
    cluster.write_config()?;
    let topic = cluster.topic_of(0);
    let have = topic_limit(&cluster.endpoints.kafka, &topic).await?;
    assert_eq!(
        have.as_deref(),
        Some("200000"),
        "init gave the topic the producer's limit"
    );
    set_topic_limit(&cluster.endpoints.kafka, &topic, 16_777_216).await?;
    let metrics = free_local_addr()?;
    let capture = cluster.spawn_with("capture", 0, &["--metrics-listen", &metrics])?;
    let (_, rows) = cluster.wait_converged("big", Duration::from_secs(90)).await?;
    assert_eq!(rows, 3, "every row arrives once");
    wait_until("/healthz healthy again", Duration::from_secs(30), || async {
        Ok(http_get(&metrics, "/healthz").await?.0 == 200)
    })
    .await?;
    drop((capture, apply));
    cluster.cleanup().await
}

/// `max.message.bytes` of `topic` on the shared broker.
async fn topic_limit(bootstrap: &str, topic: &str) -> Result<Option<String>> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
    let results = admin
        .describe_configs(
            [&ResourceSpecifier::Topic(topic)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(30))),
        )
        .await?;
    let mut value = None;
    for r in results {
        let r = r.map_err(|code| anyhow::anyhow!("describing {topic}: {code}"))?;
        value = r.get("max.message.bytes").and_then(|e| e.value.clone());
    }
    Ok(value)
}

/// Sets `max.message.bytes` of `topic` on the shared broker.
async fn set_topic_limit(bootstrap: &str, topic: &str, bytes: u64) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
    let value = bytes.to_string();
    let change = AlterConfig::new(ResourceSpecifier::Topic(topic)).set("max.message.bytes", &value);
    let results = admin
        .alter_configs(
            [&change],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .context("altering the topic's config")?;
    for r in results {
        r.map_err(|(what, code)| anyhow::anyhow!("altering {what:?}: {code}"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_topic_refuses_is_named_and_goes_through_once_raised() -> Result<()> {
    let cluster = Cluster::start("toolarget", &["r1", "r1"], TABLE, &["public.big"]).await?;
    let topic = cluster.topic_of(0);
    set_topic_limit(&cluster.endpoints.kafka, &topic, 100_000).await?;
    let (mut capture, apply, metrics) = run_until_stuck(
        &cluster,
        &[
            "public.big",
            "max.message.bytes",
            "100000",
            &topic,
            "kafka-configs.sh",
        ],
    )
    .await?;

    // The operator raises the topic's limit; capture, still running, gets past on its own.
    set_topic_limit(&cluster.endpoints.kafka, &topic, 2_000_000).await?;
    let (_, rows) = cluster.wait_converged("big", Duration::from_secs(120)).await?;
    assert_eq!(rows, 3, "every row arrives once");
    wait_until("/healthz healthy again", Duration::from_secs(30), || async {
        Ok(http_get(&metrics, "/healthz").await?.0 == 200)
    })
    .await?;
    capture.kill();
    drop(apply);
    cluster.cleanup().await
}
