//! Issue 16, scenario 9: primary-key changes. A (n1) moves rows to new keys while B (n2), not
//! having seen that, writes the old or the new key; C (n3) reads A's partition before B's. Under
//! last-update-wins every node must end with the same rows:
//!
//! - key 1 → 2 by A (later), B updated 1 (earlier): where A's change landed first, the old code
//!   found no row 1 for B's update (`update_missing`) and re-inserted it; B itself ended with
//!   row 2 only. A key change now leaves a tombstone for the old key (dated by the change), which
//!   the older update loses against.
//! - key 3 → 4 by A (earlier), B updated 3 (later): B's update wins key 3 everywhere; A's change
//!   still creates row 4 (on B, where its old key lost, the old code dropped it whole).
//! - key 5 → 6 by A (earlier), B inserted 6 (later), and 7 → 8 by A (later), B inserted 8
//!   (earlier): on B the change collides with B's row at the new key; the old code failed on the
//!   unique violation and stopped A's stream on B. It is now an `update_exists` conflict at the
//!   new key, settled by the resolver like `insert_exists`, while the old key goes as a delete.
//!
//! Rule: a key change is the delete of the old key and the insert of the new one, each settled
//! as such (the old key's row or tombstone, the new key's row or tombstone), dated by the change.

use std::collections::BTreeSet;
use std::time::Duration;

use pgferry_integration_tests::{wait_until, Cluster};

const SETUP: &str = "CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL); CREATE TABLE marker (id int PRIMARY KEY);";

async fn rows(cluster: &Cluster, i: usize) -> anyhow::Result<Vec<(i32, String)>> {
    Ok(cluster
        .sql(i)
        .await?
        .query("SELECT id, v FROM t ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

fn set(items: &[(&str, &str, &str, &str)]) -> BTreeSet<(String, String, String, String)> {
    items
        .iter()
        .map(|(k, t, r, o)| (k.to_string(), t.to_string(), r.to_string(), o.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_key_change_converges_in_every_arrival_order() -> anyhow::Result<()> {
    let cluster = Cluster::start("pkchange", &["r1", "r1", "r1"], SETUP, &["public.t", "public.marker"]).await?;
    let (a, b) = (cluster.sql(0).await?, cluster.sql(1).await?);
    let _captures: Vec<_> = (0..3).map(|i| cluster.spawn("capture", i)).collect::<Result<_, _>>()?;
    {
        let _applies: Vec<_> = (0..3).map(|i| cluster.spawn("apply", i)).collect::<Result<_, _>>()?;
        a.batch_execute("INSERT INTO t VALUES (1, 'base'), (3, 'base'), (5, 'base'), (7, 'base')").await?;
        cluster.wait_converged("t", Duration::from_secs(60)).await?;
    }
    // No apply runs: A and B write without seeing each other, in this order of commit time.
    b.batch_execute("UPDATE t SET v = 'B old' WHERE id = 1").await?;
    b.batch_execute("INSERT INTO t VALUES (8, 'B old')").await?;
    a.batch_execute("UPDATE t SET id = 2, v = 'A' WHERE id = 1").await?;
    a.batch_execute("UPDATE t SET id = 4, v = 'A' WHERE id = 3").await?;
    a.batch_execute("UPDATE t SET id = 6, v = 'A' WHERE id = 5").await?;
    a.batch_execute("UPDATE t SET id = 8, v = 'A' WHERE id = 7").await?;
    b.batch_execute("UPDATE t SET v = 'B new' WHERE id = 3").await?;
    b.batch_execute("INSERT INTO t VALUES (6, 'B new')").await?;
    a.batch_execute("INSERT INTO marker VALUES (1)").await?;
    b.batch_execute("INSERT INTO marker VALUES (2)").await?;

    let want = vec![
        (2, "A".to_string()),
        (3, "B new".to_string()),
        (4, "A".to_string()),
        (6, "B new".to_string()),
        (8, "A".to_string()),
    ];
    // C: A's changes land first.
    cluster.apply_origins_in_order(2, &[0, 1]).await?;
    assert_eq!(rows(&cluster, 2).await?, want, "C (A's partition first)");
    let (an, bn) = (cluster.nodes[0].name.as_str(), cluster.nodes[1].name.as_str());
    // B's changes met A's moves: the older update of 1 loses to 1's tombstone, the newer one of
    // 3 wins over it; B's inserts meet A's rows at 6 and 8.
    let after_a = set(&[
        ("[1]", "update_deleted", "keep_local", bn),
        ("[3]", "update_deleted", "apply_remote", bn),
        ("[6]", "insert_exists", "apply_remote", bn),
        ("[8]", "insert_exists", "keep_local", bn),
    ]);
    assert_eq!(cluster.conflicts_on(2, "public.t").await?, after_a, "C's conflicts");

    // A and B get each other's changes.
    let _applies: Vec<_> = (0..3).map(|i| cluster.spawn("apply", i)).collect::<Result<_, _>>()?;
    for i in [0, 1] {
        let c = cluster.sql(i).await?;
        wait_until(&format!("both markers on node {}", i + 1), Duration::from_secs(60), || async {
            Ok(c.query_one("SELECT count(*) FROM marker", &[]).await?.get::<_, i64>(0) == 2)
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;
    }
    for i in 0..3 {
        assert_eq!(rows(&cluster, i).await?, want, "node {}", i + 1);
    }
    assert_eq!(cluster.conflicts_on(0, "public.t").await?, after_a, "A's conflicts (its own moves first, as on C)");
    // B: A's changes landed on B's own versions.
    assert_eq!(
        cluster.conflicts_on(1, "public.t").await?,
        set(&[
            ("[1]", "update_origin_differs", "apply_remote", an),
            ("[3]", "update_origin_differs", "keep_local", an),
            ("[6]", "update_exists", "keep_local", an),
            ("[8]", "update_exists", "apply_remote", an),
        ]),
        "B's conflicts"
    );
    cluster.wait_converged("t", Duration::from_secs(30)).await?;
    drop(_applies);
    drop(_captures);
    cluster.cleanup().await
}
