//! Tombstones: a delete leaves one on every node, so a change older than the delete does not
//! bring the row back (conflicts.rs covers both time orders of a delete/update race). Once every
//! other node's stream is applied past the delete (transactions or heartbeats), the tombstone
//! is dropped everywhere — here with `tombstone_margin_ms = 5000` — and a later insert of
//! the same key is an ordinary insert again.

use std::time::Duration;

use pgferry_integration_tests::{metric, wait_until, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_are_dropped_once_every_origin_has_passed_them() -> anyhow::Result<()> {
    let mut cluster = Cluster::create("tombs", &["r1", "r1", "r2"], "CREATE TABLE t (id int PRIMARY KEY, v text);", &["public.t"]).await?;
    cluster.replication_toml = "tombstone_margin_ms = 5000".into();
    let addr = pgferry_integration_tests::free_local_addr()?;
    cluster.nodes[1].extra_toml = format!("metrics_listen = \"{addr}\"");
    cluster.write_config()?;
    cluster.init()?;
    let services: Vec<_> = (0..3).map(|i| cluster.spawn("run", i)).collect::<Result<_, _>>()?;
    let n1 = cluster.sql(0).await?;
    n1.batch_execute("INSERT INTO t SELECT g, 'v' FROM generate_series(1, 10) g").await?;
    cluster.wait_converged("t", Duration::from_secs(60)).await?;
    n1.batch_execute("DELETE FROM t WHERE id <= 5").await?;
    let tombstones = |i: usize| {
        let cluster = &cluster;
        async move {
            let c = cluster.sql(i).await?;
            anyhow::Ok(c.query_one("SELECT count(*) FROM pgferry.tombstones WHERE tbl = 'public.t'", &[]).await?.get::<_, i64>(0))
        }
    };
    // Every node holds the deletes' tombstones (n1 its own, the others the applied ones)…
    wait_until("the deletes on every node", Duration::from_secs(60), || async {
        Ok(cluster.wait_converged("t", Duration::from_secs(0)).await.is_ok())
    })
    .await?;
    for i in 0..3 {
        assert_eq!(tombstones(i).await?, 5, "node {i}: a tombstone per deleted row right after the delete");
    }
    // …until every other node's progress here is past them by the margin.
    wait_until("the tombstones dropped on every node", Duration::from_secs(90), || async {
        let mut left = 0;
        for i in 0..3 {
            left += tombstones(i).await?;
        }
        Ok(left == 0)
    })
    .await?;
    let (_, body) = pgferry_integration_tests::http_get(&addr, "/metrics").await?;
    let dropped = metric(&body, "pgferry_apply_tombstones_dropped_total", &[]).unwrap_or(0.0);
    assert_eq!(dropped, 5.0, "n2 counts the tombstones it dropped");
    // A key whose tombstone is gone is inserted again like a new one, on every node.
    cluster.sql(2).await?.batch_execute("INSERT INTO t VALUES (1, 'again')").await?;
    let (_, rows) = cluster.wait_converged("t", Duration::from_secs(60)).await?;
    assert_eq!(rows, 6);
    drop(services);
    cluster.cleanup().await
}
