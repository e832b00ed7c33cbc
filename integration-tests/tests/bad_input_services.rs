//! Bad input met by running services rather than at start-up: a registry that does not answer,
//! and a value the target's column type refuses. Each time the service says what and where in
//! its log, keeps running (retrying, unhealthy meanwhile), never panics, and loses nothing:
//! once the cause is fixed every row arrives.

use std::time::Duration;

use anyhow::Result;
use pgferry_integration_tests::{free_local_addr, http_get, wait_until, Cluster};

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
