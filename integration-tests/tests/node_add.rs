//! Adding a node without downtime: n1 and n2 replicate and take continuous writes; n3 is added
//! to the config and `pgferry node add n3 --copy-from n1` copies n1's consistent snapshot into
//! it (apply positions from the same snapshot) while the writes go on; then the services restart
//! with the new config and n3 starts. After quiescing n3 equals n1 and n2, with nothing missing
//! and nothing applied twice (each transaction inserts a row and bumps its writer's counter,
//! a delta column: a transaction applied twice or lost would show in the counter).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgferry_integration_tests::{wait_until, Cluster};

const SETUP: &str = "
CREATE TABLE t (id bigint PRIMARY KEY, node text NOT NULL);
CREATE TABLE counters (node text PRIMARY KEY, n bigint NOT NULL);
ALTER TABLE counters REPLICA IDENTITY FULL;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_add_under_load() -> anyhow::Result<()> {
    let mut cluster = Cluster::create("nodeadd", &["r1", "r1", "r1"], SETUP, &["public.t", "public.counters"]).await?;
    cluster.replication_toml = "[replication.table.\"public.counters\"]\ndelta_columns = [\"n\"]".into();
    let n3 = cluster.nodes.pop().ok_or_else(|| anyhow::anyhow!("three nodes"))?;
    cluster.write_config()?;
    cluster.init()?;
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).chain([n3.name.clone()]).collect();
    cluster
        .sql(0)
        .await?
        .batch_execute(&format!("INSERT INTO counters VALUES ('{}', 0), ('{}', 0), ('{}', 0)", names[0], names[1], names[2]))
        .await?;
    let mut services: Vec<_> = (0..2).map(|i| cluster.spawn("run", i)).collect::<Result<_, _>>()?;
    cluster.wait_converged("counters", Duration::from_secs(60)).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = |i: usize| {
        let (cluster, stop, me) = (&cluster, stop.clone(), names[i].clone());
        async move {
            let mut c = cluster.sql(i).await?;
            let mut k = 0i64;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                let t = c.transaction().await?;
                t.execute("INSERT INTO t VALUES ($1, $2)", &[&((i as i64 + 1) * 1_000_000 + k), &me]).await?;
                t.execute("UPDATE counters SET n = n + 1 WHERE node = $1", &[&me]).await?;
                t.commit().await?;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            anyhow::Ok(k)
        }
    };
    let adding = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut cluster2 = cluster.clone();
        cluster2.nodes.push(n3.clone());
        cluster2.write_config()?;
        // Off the test's own threads: the writers must keep committing meanwhile (a writer
        // stalled inside its transaction would hold its locks against the set-up).
        let (c2, n3_name, peer) = (cluster2.clone(), n3.name.clone(), names[0].clone());
        let out = tokio::task::spawn_blocking(move || c2.pgferry(&["node", "add", &n3_name, "--copy-from", &peer])).await??;
        anyhow::ensure!(
            out.status.success(),
            "node add failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        anyhow::Ok(cluster2)
    };
    let (w1, w2, cluster2) = tokio::try_join!(writer(0), writer(1), async {
        let c = adding.await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, Ordering::Relaxed);
        c
    })?;
    eprintln!("transactions: n1 {w1}, n2 {w2}");
    // The services restart with the new config; n3 starts.
    services.clear();
    let _services: Vec<_> = (0..3).map(|i| cluster2.spawn("run", i)).collect::<Result<_, _>>()?;
    let (_, rows) = cluster2.wait_converged("t", Duration::from_secs(120)).await?;
    assert_eq!(rows, w1 + w2, "every transaction's row on every node");
    cluster2.wait_converged("counters", Duration::from_secs(60)).await?;
    let c3 = cluster2.sql(2).await?;
    for (name, want) in [(&names[0], w1), (&names[1], w2)] {
        let n: i64 = c3.query_one("SELECT n FROM counters WHERE node = $1", &[name]).await?.get(0);
        assert_eq!(n, want, "{name}'s counter on the added node: no transaction lost or applied twice");
    }
    // n3 takes part like any node: its write reaches the others.
    c3.batch_execute(&format!("INSERT INTO t VALUES (3000001, '{}')", names[2])).await?;
    wait_until("n3's row on n1", Duration::from_secs(60), || async {
        Ok(cluster2.sql(0).await?.query_one("SELECT count(*) FROM t WHERE id = 3000001", &[]).await?.get::<_, i64>(0) == 1)
    })
    .await?;
    drop(_services);
    cluster2.cleanup().await
}
