//! Issue 16, scenario 11, second part: tombstone collection on nodes running since before a
//! node was added. Apply drops a tombstone once every other node's stream is applied here past
//! it (plus `tombstone_margin_ms`); "every other node" was the config loaded at start, so a node
//! added since — whose partition this apply does not read until it restarts — did not count,
//! and a tombstone its changes still needed could go.
//!
//! The arrival order: n1 and n2 run, with `tombstone_margin_ms = 1000`; n3 is added to the
//! config and `node add n3 --copy-from n1` copies row 1; n3 runs. n3 updates row 1, then n1
//! deletes it (later). n1's and n2's apply keep running with the config they started with, so
//! they do not read n3's update; n2's heartbeats carry n1's position for n2 well past the
//! delete. Then n1 and n2 restart (as `node add` says to) and read n3's partition: n3's update,
//! older than the delete, arrives.
//!
//! Required: the delete's tombstone is still on n1 and n2 when n3's update arrives, so row 1
//! stays deleted on every node and n1 records n3's update as `update_deleted` / `keep_local`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context};
use pgferry_integration_tests::{free_local_addr, http_get, metric, wait_until, Cluster};

const MARGIN_MS: i64 = 1000;

/// How many tombstones of `t` node `i` holds.
async fn tombstones(cluster: &Cluster, i: usize) -> anyhow::Result<i64> {
    let c = cluster.sql(i).await?;
    Ok(c.query_one("SELECT count(*) FROM pgferry.tombstones WHERE tbl = 'public.t'", &[]).await?.get(0))
}

/// Row 1 of `t` on node `i`, if there.
async fn row1(cluster: &Cluster, i: usize) -> anyhow::Result<Option<String>> {
    let c = cluster.sql(i).await?;
    Ok(c.query_opt("SELECT v FROM t WHERE id = 1", &[]).await?.map(|r| r.get(0)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_wait_for_a_node_added_since_start() -> anyhow::Result<()> {
    let mut cluster = Cluster::create("gcadded", &["r1", "r1", "r1"], "CREATE TABLE t (id int PRIMARY KEY, v text);", &["public.t"]).await?;
    cluster.replication_toml = format!("tombstone_margin_ms = {MARGIN_MS}");
    let addr = free_local_addr()?;
    cluster.nodes[0].extra_toml = format!("metrics_listen = \"{addr}\"");
    let n3 = cluster.nodes.pop().context("three nodes")?;
    cluster.write_config()?;
    cluster.init()?;
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).chain([n3.name.clone()]).collect();
    let mut services: Vec<_> = (0..2).map(|i| cluster.spawn("run", i)).collect::<Result<_, _>>()?;
    cluster.sql(0).await?.batch_execute("INSERT INTO t VALUES (1, 'n1'), (2, 'n1')").await?;
    cluster.wait_converged("t", Duration::from_secs(60)).await?;

    // n3 joins; n1's and n2's apply keep running as they started (the file now lists n3).
    let mut cluster3 = cluster.clone();
    cluster3.nodes.push(n3);
    cluster3.write_config()?;
    let out = cluster3.pgferry(&["node", "add", &names[2], "--copy-from", &names[0]])?;
    ensure!(
        out.status.success(),
        "node add failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _n3_run = cluster3.spawn("run", 2)?;

    // n3 updates row 1; n1, not reading n3 yet, deletes it later.
    cluster3.sql(2).await?.batch_execute("UPDATE t SET v = 'n3' WHERE id = 1").await?;
    cluster3.wait_published(2, Duration::from_secs(60)).await?;
    let n1 = cluster3.sql(0).await?;
    n1.batch_execute("DELETE FROM t WHERE id = 1").await?;
    let delete_us: i64 = n1
        .query_one(
            "SELECT (extract(epoch FROM pg_xact_commit_timestamp((xid % 4294967296)::text::xid)) * 1000000)::int8
             FROM pgferry.tombstones WHERE tbl = 'public.t' AND key = '[1]'",
            &[],
        )
        .await?
        .get(0);
    wait_until("the delete on n2", Duration::from_secs(60), || async { Ok(row1(&cluster3, 1).await?.is_none()) }).await?;
    wait_until("the delete on n3", Duration::from_secs(60), || async { Ok(row1(&cluster3, 2).await?.is_none()) }).await?;

    // n1's apply applies n2's stream (heartbeats) well past the delete and the margin: long
    // enough for several collection rounds (every 5 s) after a watermark from n2 alone passed
    // the tombstone.
    let n2_name = names[1].clone();
    wait_until("n1 applied n2's stream 20 s past the delete", Duration::from_secs(90), || async {
        let (_, body) = http_get(&addr, "/metrics").await?;
        let lag = metric(&body, "pgferry_apply_lag_seconds", &[("origin", n2_name.as_str())]).context("no lag for n2")?;
        let now_us = SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros() as i64;
        Ok(now_us - (lag * 1e6) as i64 > delete_us + MARGIN_MS * 1000 + 20_000_000)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster3.logs()))?;
    let kept = (tombstones(&cluster3, 0).await?, tombstones(&cluster3, 1).await?);
    eprintln!("tombstones of row 1 before n1 and n2 read n3: n1 {}, n2 {}", kept.0, kept.1);

    // n1 and n2 restart with the file that lists n3 and read its partition: n3's older update.
    services.clear();
    cluster3.wait_apply_gone(0).await?;
    cluster3.wait_apply_gone(1).await?;
    let _services: Vec<_> = (0..2).map(|i| cluster3.spawn("run", i)).collect::<Result<_, _>>()?;
    let n3_name = names[2].clone();
    for i in 0..2 {
        let c = cluster3.sql(i).await?;
        wait_until(&format!("n3's update settled on {}", names[i]), Duration::from_secs(90), || async {
            let n: i64 = c
                .query_one("SELECT count(*) FROM pgferry.conflicts WHERE tbl = 'public.t' AND remote_origin = $1", &[&n3_name])
                .await?
                .get(0);
            Ok(n > 0)
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster3.logs()))?;
    }
    let rows = [row1(&cluster3, 0).await?, row1(&cluster3, 1).await?, row1(&cluster3, 2).await?];
    let n1_conflicts = cluster3.conflicts_on(0, "public.t").await?;
    eprintln!("row 1 at the end: n1 {:?}, n2 {:?}, n3 {:?}; n1's conflicts {n1_conflicts:?}", rows[0], rows[1], rows[2]);
    assert_eq!(kept, (1, 1), "the delete's tombstone is kept on n1 and n2 until they have read n3");
    assert_eq!(rows, [None, None, None], "row 1 stays deleted on every node");
    assert!(
        n1_conflicts.contains(&("[1]".into(), "update_deleted".into(), "keep_local".into(), n3_name.clone())),
        "n1 settles n3's older update against the tombstone: {n1_conflicts:?}"
    );
    let (_, count) = cluster3.wait_converged("t", Duration::from_secs(60)).await?;
    assert_eq!(count, 1, "row 2 only");
    drop(_services);
    drop(_n3_run);
    cluster3.cleanup().await
}
