//! Issue 16, scenario 14, second part: a source transaction whose produce takes longer than the
//! Kafka transaction timeout. Before, capture produced a source transaction inside one Kafka
//! transaction, so the broker aborted it and capture tried again, forever (and the timeout was
//! fixed at 10 minutes). Now capture commits a Kafka transaction every quarter of
//! `transaction.timeout.ms` even in the middle of a source transaction (apply only commits at
//! the event marked `txn_last`, so the source transaction stays atomic where it is applied), and
//! after a restart resumes a transaction that is in Kafka in part after its last committed event.
//!
//! The link from n1's capture to a broker of the test's own is throttled to 100 KB/s; the
//! producer's `transaction.timeout.ms` is 4 s and the source transaction about 1.5 MB (about 9 s
//! to send compressed). n1's capture is killed once after the first cut and started again. n2
//! ends with every row; n1's partition holds each event exactly once.

use std::time::Duration;

use anyhow::Result;
use pgferry_integration_tests::own_services::{KafkaOptions, OwnKafka};
use pgferry_integration_tests::{free_local_addr, http_get, metric, read_topic, wait_until, Cluster, Endpoints};

const TABLE: &str = "CREATE TABLE wide (id int PRIMARY KEY, body text)";

/// One source transaction of 1500 rows of about 1 KB of hex text each.
const BIG_TXN: &str =
    "INSERT INTO wide SELECT g, (SELECT string_agg(md5(random()::text || g || h), '') FROM generate_series(1, 32) h)
                       FROM generate_series(1, 1500) g";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_transaction_longer_than_the_kafka_timeout_goes_through_split() -> Result<()> {
    let kafka = OwnKafka::start(
        "txntimeout",
        KafkaOptions {
            proxied: true,
            // The coordinator looks for expired transactions every second (default 10 s), so an
            // over-long one is aborted promptly.
            extra_properties: vec!["transaction.abort.timed.out.transaction.cleanup.interval.ms=1000".into()],
            ..Default::default()
        },
    )
    .await?;
    let proxy = kafka.proxy.as_ref().ok_or_else(|| anyhow::anyhow!("no proxy"))?;
    let mut endpoints = Endpoints::from_env();
    endpoints.kafka = kafka.bootstrap();
    let mut cluster = Cluster::create_on(endpoints, "txntimeout", &["r1", "r1"], TABLE, &["public.wide"]).await?;
    // A short timeout, and little held in librdkafka's queue, so what is queued is delivered
    // well within it over the slow link.
    cluster.kafka_toml =
        "[kafka.properties]\n\"transaction.timeout.ms\" = \"4000\"\n\"queue.buffering.max.messages\" = \"100\"".into();
    cluster.write_config()?;
    cluster.init()?;
    // n1's capture reaches the broker through the throttled proxy; n2's apply directly.
    let mut via_proxy = cluster.clone();
    via_proxy.config_path = cluster.dir.join("pgferry-n1-via-proxy.toml");
    via_proxy.endpoints.kafka = proxy.addr().to_string();
    via_proxy.write_config()?;
    proxy.throttle(100_000);
    let metrics = free_local_addr()?;
    let mut capture = via_proxy.spawn_with("capture", 0, &["--metrics-listen", &metrics])?;
    let apply = cluster.spawn("apply", 1)?;

    let n1 = cluster.sql(0).await?;
    n1.batch_execute("INSERT INTO wide VALUES (0, 'before')").await?;
    n1.batch_execute(BIG_TXN).await?;
    n1.batch_execute("INSERT INTO wide VALUES (100000, 'after')").await?;

    // The first cut committed part of the big transaction: kill capture there, start it again.
    let node = cluster.nodes[0].name.clone();
    wait_until(
        "a Kafka transaction committed inside the source transaction",
        Duration::from_secs(120),
        || async {
            let (_, text) = http_get(&metrics, "/metrics").await?;
            Ok(metric(&text, "pgferry_capture_transaction_splits_total", &[("node", &node)]).unwrap_or(0.0) >= 1.0)
        },
    )
    .await?;
    capture.kill();
    assert!(proxy.accepted() > 0, "n1's capture reaches Kafka through the proxy");
    let n2 = cluster.sql(1).await?;
    let partial: i64 = n2.query_one("SELECT count(*) FROM wide", &[]).await?.get(0);
    assert!(
        partial <= 1,
        "n2 sees none of the big transaction before its end ({partial} rows)"
    );
    let metrics = free_local_addr()?;
    let capture = via_proxy.spawn_with("capture", 0, &["--metrics-listen", &metrics])?;

    let (_, rows) = cluster.wait_converged("wide", Duration::from_secs(240)).await?;
    assert_eq!(rows, 1502, "every row arrives");
    let (_, text) = http_get(&metrics, "/metrics").await?;
    let splits = metric(&text, "pgferry_capture_transaction_splits_total", &[("node", &node)]).unwrap_or(0.0);
    eprintln!("Kafka transactions cut inside the source transaction after the restart: {splits}");
    assert!(splits >= 1.0, "the resumed transaction was cut again: {splits}");

    // Exactly once in Kafka: one change event per row, the cut transaction's positions
    // (`pgferry-txn-seq`) each once and in order.
    let messages = read_topic(&kafka.bootstrap(), &cluster.topic_of(0))?;
    let changes: Vec<_> = messages
        .iter()
        .filter(|m| m.header("pgferry-origin") == Some(node.as_str()) && m.header("pgferry-kind") == Some("change"))
        .collect();
    assert_eq!(changes.len(), 1502, "each event in Kafka once");
    let seqs: Vec<u64> = changes
        .iter()
        .filter_map(|m| m.header("pgferry-txn-seq")?.parse().ok())
        .collect();
    assert!(!seqs.is_empty(), "the cut transaction's events carry their position");
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "positions once each, in order"
    );
    assert_eq!(seqs.last().copied(), Some(1499), "up to the transaction's last event");
    let log = std::fs::read_to_string(&capture.log)?;
    assert!(
        log.contains("resuming a source transaction"),
        "the restart resumed the cut transaction:\n{log}"
    );
    drop((capture, apply));
    cluster.cleanup().await?;
    drop(kafka);
    Ok(())
}
