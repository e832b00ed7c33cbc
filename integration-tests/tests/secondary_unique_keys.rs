//! Issue 16, scenario 8: secondary unique keys in a three-node ordering. A (n1) and B (n2) write
//! the same unique value into two different rows without seeing each other; C (n3) gets A's
//! write and then writes a newer version of A's row that gives the value up. B reads C's
//! partition before A's:
//!
//! - row 1: A inserts (1, 'a') (t1), B inserts (2, 'a') (t2), C updates row 1 to 'x' (t3). On B,
//!   C's update finds no row 1 (`update_missing`) and re-creates it; then A's insert meets row 2
//!   holding 'a', which is newer, and loses. The old code then deleted "the change's own row"
//!   — row 1, C's version, which is newer than A's insert — so B ended without row 1 while A and
//!   C kept it (on A, B's insert deletes A's row 1 and C's newer update re-creates it).
//! - row 3: the same with an update: A sets row 3's value to 'd' (t1), B sets row 4's to 'd'
//!   (t2), C sets row 3's to 'y' (t3); on B, A's update loses to row 4 and the old code deleted
//!   C's row 3.
//!
//! Rule: the change's own key is decided first. A change that loses on a unique key removes the
//! row at its own key only if it would have replaced it (older than the change, or made by its
//! origin); a row there that is newer than the change stays. Every node ends with rows 1 ('x',
//! C), 2 ('a', B), 3 ('y', C), 4 ('d', B).

use std::collections::BTreeSet;
use std::time::Duration;

use pgferry_integration_tests::{wait_until, Cluster};

const SETUP: &str = "
CREATE TABLE u (id int PRIMARY KEY, code text NOT NULL UNIQUE, v text NOT NULL);
CREATE TABLE marker (id int PRIMARY KEY);";

async fn rows(cluster: &Cluster, i: usize) -> anyhow::Result<Vec<(i32, String, String)>> {
    Ok(cluster
        .sql(i)
        .await?
        .query("SELECT id, code, v FROM u ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secondary_unique_keys_converge_in_three_node_orderings() -> anyhow::Result<()> {
    let cluster = Cluster::start("uniqorder", &["r1", "r1", "r1"], SETUP, &["public.u", "public.marker"]).await?;
    let (a, b, c) = (cluster.sql(0).await?, cluster.sql(1).await?, cluster.sql(2).await?);
    let _captures: Vec<_> = (0..3).map(|i| cluster.spawn("capture", i)).collect::<Result<_, _>>()?;
    {
        let _applies: Vec<_> = (0..3).map(|i| cluster.spawn("apply", i)).collect::<Result<_, _>>()?;
        a.batch_execute("INSERT INTO u VALUES (3, 'c0', 'base'), (4, 'd0', 'base')").await?;
        cluster.wait_converged("u", Duration::from_secs(60)).await?;
    }
    // No apply runs: A and B write without seeing each other (A first).
    a.batch_execute("INSERT INTO u VALUES (1, 'a', 'A')").await?;
    a.batch_execute("UPDATE u SET code = 'd', v = 'A' WHERE id = 3").await?;
    b.batch_execute("INSERT INTO u VALUES (2, 'a', 'B')").await?;
    b.batch_execute("UPDATE u SET code = 'd', v = 'B' WHERE id = 4").await?;
    // C gets A's writes, then writes newer versions of A's rows.
    cluster.apply_origin_now(2, 0).await?;
    c.batch_execute("UPDATE u SET code = 'x', v = 'C' WHERE id = 1").await?;
    c.batch_execute("UPDATE u SET code = 'y', v = 'C' WHERE id = 3").await?;

    let want = vec![
        (1, "x".to_string(), "C".to_string()),
        (2, "a".to_string(), "B".to_string()),
        (3, "y".to_string(), "C".to_string()),
        (4, "d".to_string(), "B".to_string()),
    ];
    // B reads C's partition before A's.
    cluster.apply_origins_in_order(1, &[2, 0]).await?;
    assert_eq!(rows(&cluster, 1).await?, want, "B (C's partition first)");
    let (an, cn) = (cluster.nodes[0].name.clone(), cluster.nodes[2].name.clone());
    let t = |k: &str, ty: &str, r: &str, o: &str| (k.to_string(), ty.to_string(), r.to_string(), o.to_string());
    assert_eq!(
        cluster.conflicts_on(1, "public.u").await?,
        BTreeSet::from([
            // C's updates: row 1 not there yet, row 3 last written by A.
            t("[1]", "update_missing", "apply_remote", &cn),
            t("[3]", "update_origin_differs", "apply_remote", &cn),
            // A's changes lose at their own keys, to C's newer versions.
            t("[1]", "insert_exists", "keep_local", &an),
            t("[3]", "update_origin_differs", "keep_local", &an),
        ]),
        "B's conflicts"
    );

    // Everyone gets everything.
    for (i, node) in [&a, &b, &c].iter().enumerate() {
        node.batch_execute(&format!("INSERT INTO marker VALUES ({})", i + 1)).await?;
    }
    let _applies: Vec<_> = (0..3).map(|i| cluster.spawn("apply", i)).collect::<Result<_, _>>()?;
    for i in 0..3 {
        let node = cluster.sql(i).await?;
        wait_until(&format!("all markers on node {}", i + 1), Duration::from_secs(60), || async {
            Ok(node.query_one("SELECT count(*) FROM marker", &[]).await?.get::<_, i64>(0) == 3)
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;
    }
    for i in 0..3 {
        assert_eq!(rows(&cluster, i).await?, want, "node {}", i + 1);
    }
    cluster.wait_converged("u", Duration::from_secs(30)).await?;
    drop(_applies);
    drop(_captures);
    cluster.cleanup().await
}
