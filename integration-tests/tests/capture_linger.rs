//! Capture's producer lingers (`linger.ms`, 10 ms by default) so that a Kafka transaction's
//! messages travel in few requests, and before committing a Kafka transaction it sends what
//! lingers at once (docs/decisions.md, "Capture", the producer's `linger.ms`): a linger must
//! never delay a commit. Apply's streams let the broker hold a fetch that finds nothing
//! (`fetch.wait.max.ms`, 500 ms by default), which must never delay a commit's messages either:
//! the broker answers a `read_committed` fetch once a commit moves the partition's stable
//! offset. With both at 30 s (set through `[kafka.properties]`, which must reach both clients),
//! each of several source transactions committed one after another must be applied on n2 well
//! within that (10 s each).

use std::time::Duration;

use anyhow::Result;
use pgferry_integration_tests::{wait_until, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neither_a_long_linger_nor_a_long_fetch_wait_delays_a_change() -> Result<()> {
    let mut cluster = Cluster::create(
        "linger",
        &["r1", "r1"],
        "CREATE TABLE t (id int PRIMARY KEY, v text)",
        &["public.t"],
    )
    .await?;
    cluster.kafka_toml = "[kafka.properties]\n\"linger.ms\" = \"30000\"\n\"fetch.wait.max.ms\" = \"30000\"".into();
    cluster.write_config()?;
    cluster.init()?;
    let capture = cluster.spawn("capture", 0)?;
    let apply = cluster.spawn("apply", 1)?;
    let n1 = cluster.sql(0).await?;
    let n2 = cluster.sql(1).await?;
    let on_n2 = |id: i32| {
        let n2 = &n2;
        async move { Ok(n2.query_opt("SELECT 1 FROM t WHERE id = $1", &[&id]).await?.is_some()) }
    };
    // The services' start-up (schemas registered, the topic subscribed) is not what is timed.
    n1.execute("INSERT INTO t VALUES (0, 'first')", &[]).await?;
    wait_until("the first row on n2", Duration::from_secs(60), || on_n2(0)).await?;
    for id in 1..=5 {
        n1.execute("INSERT INTO t VALUES ($1, 'x')", &[&id]).await?;
        wait_until(
            &format!("row {id} on n2 within 10 s of its commit on n1 (linger.ms and fetch.wait.max.ms are 30 s)"),
            Duration::from_secs(10),
            || on_n2(id),
        )
        .await?;
    }
    drop((capture, apply));
    cluster.cleanup().await
}
