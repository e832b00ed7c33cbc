//! Removing a node: three nodes of one region write; n2 (the middle one, so n3's partition
//! would move) stops; a transaction n2 committed but never published makes `node remove`
//! refuse; once n2's capture has published it, `pgferry node remove n2` drops n2's slot,
//! publication and origins everywhere and takes n2 out of the config (pinning n3's partition),
//! waiting while n1's and n3's apply still hold n2's origin until they are restarted. n1 and n3
//! then keep replicating, and every transaction of every node is on both exactly once (each
//! bumps its writer's counter, a delta column).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgferry_integration_tests::{naming, wait_until, Cluster};

const SETUP: &str = "
CREATE TABLE t (id bigint PRIMARY KEY, node text NOT NULL);
CREATE TABLE counters (node text PRIMARY KEY, n bigint NOT NULL);
ALTER TABLE counters REPLICA IDENTITY FULL;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_remove_leaves_the_rest_replicating() -> anyhow::Result<()> {
    let mut cluster = Cluster::create("noderm", &["r1", "r1", "r1"], SETUP, &["public.t", "public.counters"]).await?;
    cluster.replication_toml = "[replication.table.\"public.counters\"]\ndelta_columns = [\"n\"]".into();
    cluster.write_config()?;
    cluster.init()?;
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    cluster
        .sql(0)
        .await?
        .batch_execute(&format!(
            "INSERT INTO counters VALUES ('{}', 0), ('{}', 0), ('{}', 0)",
            names[0], names[1], names[2]
        ))
        .await?;
    let mut services: Vec<_> = (0..3)
        .map(|i| cluster.spawn("run", i).map(Some))
        .collect::<Result<_, _>>()?;
    cluster.wait_converged("counters", Duration::from_secs(60)).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = |i: usize, stop: Arc<AtomicBool>, first: i64| {
        let (cluster, me) = (&cluster, names[i].clone());
        async move {
            let mut c = cluster.sql(i).await?;
            let mut k = first;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                let t = c.transaction().await?;
                t.execute(
                    "INSERT INTO t VALUES ($1, $2)",
                    &[&((i as i64 + 1) * 1_000_000 + k), &me],
                )
                .await?;
                t.execute("UPDATE counters SET n = n + 1 WHERE node = $1", &[&me])
                    .await?;
                t.commit().await?;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            anyhow::Ok(k)
        }
    };
    let (w1, w2, w3) = tokio::try_join!(
        writer(0, stop.clone(), 0),
        writer(1, stop.clone(), 0),
        writer(2, stop.clone(), 0),
        async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            stop.store(true, Ordering::Relaxed);
            anyhow::Ok(())
        }
    )
    .map(|(a, b, c, ())| (a, b, c))?;
    eprintln!("transactions: n1 {w1}, n2 {w2}, n3 {w3}");

    // n2 stops; then one more transaction on n2 that no capture published.
    services[1] = None;
    let n2 = cluster.sql(1).await?;
    n2.batch_execute(&format!(
        "BEGIN; INSERT INTO t VALUES (2999999, '{0}'); UPDATE counters SET n = n + 1 WHERE node = '{0}'; COMMIT",
        names[1]
    ))
    .await?;
    let w2 = w2 + 1;
    let out = cluster.pgferry(&["node", "remove", &names[1], "--timeout", "30"])?;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "node remove must refuse while n2 holds an unpublished transaction"
    );
    assert!(
        stderr.contains(&names[1]) && stderr.contains("not yet published"),
        "the refusal names the node and the reason: {stderr}"
    );
    let config_text = std::fs::read_to_string(&cluster.config_path)?;
    assert!(
        config_text.contains(&names[1]),
        "a refused removal leaves the config alone"
    );

    // n2's capture publishes it and stops again.
    let mut capture = cluster.spawn("capture", 1)?;
    wait_until(
        "n2's last transaction on n1 and n3",
        Duration::from_secs(60),
        || async {
            for i in [0, 2] {
                let n: i64 = cluster
                    .sql(i)
                    .await?
                    .query_one("SELECT n FROM counters WHERE node = $1", &[&names[1]])
                    .await?
                    .get(0);
                if n != w2 {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .await?;
    capture.kill();

    // The removal, off the test's threads; meanwhile n1 and n3 keep writing, and once the
    // config no longer lists n2 their services restart with it.
    let removing = {
        let (c, n) = (cluster.clone(), names[1].clone());
        tokio::task::spawn_blocking(move || c.pgferry(&["node", "remove", &n, "--timeout", "120"]))
    };
    let stop = Arc::new(AtomicBool::new(false));
    let restart = async {
        wait_until("the config without n2", Duration::from_secs(120), || async {
            Ok(removing.is_finished()
                || !std::fs::read_to_string(&cluster.config_path)?.contains(&format!("\"{}\"", names[1])))
        })
        .await?;
        if removing.is_finished() {
            let out = removing.await??;
            anyhow::bail!("node remove ended early: {}", String::from_utf8_lossy(&out.stderr));
        }
        for i in [0, 2] {
            services[i] = None;
            services[i] = Some(cluster.spawn("run", i)?);
        }
        let out = removing.await??;
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, Ordering::Relaxed);
        anyhow::Ok(out)
    };
    let (w1b, w3b, out) = tokio::try_join!(writer(0, stop.clone(), w1), writer(2, stop.clone(), w3), restart)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert!(out.status.success(), "node remove failed: {stderr}");

    // The config: n2 gone, n3 keeps partition 2 (else it would become 1).
    let config_text = std::fs::read_to_string(&cluster.config_path)?;
    assert!(
        !config_text.contains(&format!("\"{}\"", names[1])),
        "n2 left the config:\n{config_text}"
    );
    let n3_entry = config_text
        .split("[[nodes]]")
        .find(|e| e.contains(&format!("\"{}\"", names[2])))
        .unwrap_or_default();
    assert!(
        n3_entry.contains("partition = 2"),
        "n3's partition pinned:\n{config_text}"
    );
    // n2: no slot, no publication, no origins of the cluster.
    let slot = cluster.slot_of(1);
    let left: i64 = n2
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1)
                  + (SELECT count(*) FROM pg_publication WHERE pubname = $3)
                  + (SELECT count(*) FROM pg_replication_origin WHERE roname = ANY($2))",
            &[
                &slot,
                &vec![cluster.origin_on(1, &names[0]), cluster.origin_on(1, &names[2])],
                &naming::publication_name(),
            ],
        )
        .await?
        .get(0);
    assert_eq!(left, 0, "n2's slot, publication and origins are dropped");
    for i in [0, 2] {
        let origins: i64 = cluster
            .sql(i)
            .await?
            .query_one("SELECT count(*) FROM pg_replication_origin WHERE roname = $1", &[&cluster.origin_on(i, &names[1])])
            .await?
            .get(0);
        assert_eq!(origins, 0, "n2's origin is dropped on {}", names[i]);
    }

    // n1 and n3 go on replicating: everything on both, each transaction exactly once.
    let mut rest = cluster.clone();
    rest.nodes.remove(1);
    let (_, rows) = rest.wait_converged("t", Duration::from_secs(120)).await?;
    assert_eq!(rows, w1b + w2 + w3b, "every transaction's row on n1 and n3");
    rest.wait_converged("counters", Duration::from_secs(60)).await?;
    let c3 = rest.sql(1).await?;
    for (name, want) in [(&names[0], w1b), (&names[1], w2), (&names[2], w3b)] {
        let n: i64 = c3
            .query_one("SELECT n FROM counters WHERE node = $1", &[name])
            .await?
            .get(0);
        assert_eq!(n, want, "{name}'s counter: no transaction lost or applied twice");
    }
    drop(services);
    drop(n2);
    cluster.cleanup().await
}
