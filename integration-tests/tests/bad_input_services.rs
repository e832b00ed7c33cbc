//! Bad input met by running services rather than at start-up: a registry that does not answer,
//! a value the target's column type refuses, an event for a table outside the node's
//! replication sets. Each time the service says what and where, keeps running (retrying,
//! unhealthy meanwhile), never panics, and loses nothing: once the cause is fixed every row
//! arrives, and what must not be written is kept in the dead-letter topic instead.

use std::time::Duration;

use anyhow::Result;
use pgferry_integration_tests::{free_local_addr, http_get, read_topic, wait_until, Cluster};

const TABLE: &str = "CREATE TABLE items (id bigint PRIMARY KEY, name text)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_registry_is_named_and_nothing_is_lost() -> Result<()> {
    let mut cluster = Cluster::start("noreg", &["r1", "r1"], TABLE, &["public.items"]).await?;
    let n1 = cluster.sql(0).await?;
    // Capture with a registry nobody serves: rows committed meanwhile stay in the slot.
    let good_registry = cluster.endpoints.registry.clone();
    cluster.endpoints.registry = "http://127.0.0.1:1/apis/ccompat/v7".into();
    cluster.write_config()?;
    let metrics = free_local_addr()?;
    let mut capture = cluster.spawn_with("capture", 0, &["--metrics-listen", &metrics])?;
    n1.batch_execute("INSERT INTO items SELECT g, 'written while the registry is away' FROM generate_series(1, 50) g")
        .await?;
    wait_until("capture to name the unreachable registry", Duration::from_secs(60), || async {
        Ok(std::fs::read_to_string(&capture.log)?.contains("127.0.0.1:1"))
    })
    .await?;
    wait_until("capture to report unhealthy", Duration::from_secs(30), || async {
        Ok(http_get(&metrics, "/healthz").await?.0 == 503)
    })
    .await?;
    assert!(capture.try_wait()?.is_none(), "capture keeps running (retrying with backoff)");
    let log = std::fs::read_to_string(&capture.log)?;
    assert!(log.contains("registry"), "the error says it is the registry:\n{log}");
    assert!(!log.contains("panicked"), "capture panicked:\n{log}");

    // The operator fixes the address: everything written meanwhile arrives, once.
    capture.kill();
    cluster.endpoints.registry = good_registry;
    cluster.write_config()?;
    let _capture = cluster.spawn("capture", 0)?;
    let _apply = cluster.spawn("apply", 1)?;
    let (_, rows) = cluster.wait_converged("items", Duration::from_secs(90)).await?;
    assert_eq!(rows, 50);
    drop((_capture, _apply));
    cluster.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_the_targets_type_refuses_holds_the_stream_until_fixed() -> Result<()> {
    // The enum on n2 lacks a label n1 has: the value cannot be written there.
    let setup = "CREATE TYPE mood AS ENUM ('sad', 'ok'); CREATE TABLE feelings (id int PRIMARY KEY, m mood);";
    let cluster = Cluster::start("badtype", &["r1", "r1"], setup, &["public.feelings"]).await?;
    let n1 = cluster.sql(0).await?;
    let n2 = cluster.sql(1).await?;
    n1.batch_execute("ALTER TYPE mood ADD VALUE 'happy'").await?;
    let _capture = cluster.spawn("capture", 0)?;
    let mut apply = cluster.spawn("apply", 1)?;
    n1.batch_execute("INSERT INTO feelings VALUES (1, 'ok')").await?;
    n1.batch_execute("INSERT INTO feelings VALUES (2, 'happy')").await?;
    n1.batch_execute("INSERT INTO feelings VALUES (3, 'sad')").await?;
    wait_until("apply to report the refused value", Duration::from_secs(60), || async {
        Ok(std::fs::read_to_string(&apply.log)?.contains("change rejected (on_error = stop)"))
    })
    .await?;
    let log = std::fs::read_to_string(&apply.log)?;
    let line = log
        .lines()
        .find(|l| l.contains("change rejected (on_error = stop)"))
        .unwrap_or_default();
    for needle in ["public.feelings", "happy", &cluster.nodes[0].name] {
        assert!(line.contains(needle), "the error does not name {needle:?}: {line}");
    }
    assert!(!log.contains("panicked"), "apply panicked:\n{log}");
    assert!(apply.try_wait()?.is_none(), "apply keeps running (retrying)");
    let ids: Vec<i32> = n2
        .query("SELECT id FROM feelings ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec![1], "the stream holds at the refused value, in order");

    // The operator gives n2 the label: the held change and the one behind it arrive.
    n2.batch_execute("ALTER TYPE mood ADD VALUE 'happy'").await?;
    let (_, rows) = cluster.wait_converged("feelings", Duration::from_secs(90)).await?;
    assert_eq!(rows, 3);
    drop((_capture, apply));
    cluster.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_for_a_table_outside_the_sets_is_dead_lettered_not_written() -> Result<()> {
    let setup = "CREATE TABLE open (id int PRIMARY KEY); CREATE TABLE secret (id int PRIMARY KEY);";
    let cluster = Cluster::start("outside", &["r1", "r1"], setup, &["public.open", "public.secret"]).await?;
    // n2's apply runs with a config whose replication set lacks `secret`, as a node would
    // whose operator took the table out while n1 still publishes it.
    let mut narrow = cluster.clone();
    narrow.tables = vec!["public.open".into()];
    narrow.config_path = cluster.dir.join("narrow.toml");
    narrow.write_config()?;
    let n1 = cluster.sql(0).await?;
    let n2 = cluster.sql(1).await?;
    let _capture = cluster.spawn("capture", 0)?;
    let _apply = narrow.spawn("apply", 1)?;
    n1.batch_execute("INSERT INTO secret VALUES (1)").await?;
    n1.batch_execute("INSERT INTO open VALUES (1)").await?;
    cluster.wait_converged("open", Duration::from_secs(60)).await?;
    let dlq = read_topic(&cluster.endpoints.kafka, &format!("{}.dlq", cluster.name))?;
    let reasons: Vec<&str> = dlq.iter().filter_map(|m| m.header("pgferry-dlq-reason")).collect();
    assert!(
        reasons.len() == 1 && reasons[0].contains("public.secret") && reasons[0].contains("replication set"),
        "one dead letter naming the table and why: {reasons:?}"
    );
    let secret: i64 = n2.query_one("SELECT count(*) FROM secret", &[]).await?.get(0);
    assert_eq!(secret, 0, "a table outside the sets is never written");
    let exceptions: i64 = n2.query_one("SELECT count(*) FROM pgferry.exceptions", &[]).await?.get(0);
    assert_eq!(exceptions, 1, "kept whole in pgferry.exceptions too");
    drop((_capture, _apply));
    cluster.cleanup().await
}
