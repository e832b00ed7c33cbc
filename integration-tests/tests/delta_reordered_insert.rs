//! Issue 16, scenario 4: delta columns on a reordered insert and update. n1 inserts an account
//! with balance 100; n3 applies it and adds 10 (100 → 110); n2 reads n3's partition before n1's,
//! so it gets the update first — `update_missing`, which re-creates the row — and n1's insert
//! second — `insert_exists`, which loses under last-update-wins but still adds its delta. On the
//! old code n2 ended with 210 (the re-created row held the update's whole after image, 110, which
//! already counts the insert's 100, and the insert added 100 again) while n1 and n3 held 110.
//! Rule: an update that finds no row and no tombstone re-creates it with its delta columns set to
//! its own change (`new − old`), the insert's delta arriving later adds the rest, so every node
//! sums the same changes.
//!
//! The order is built with replay: n2's apply is not running; n1's and n3's are. Once n3's
//! update is published, n2 replays n3's partition, then n1's.

use std::time::Duration;

use pgferry_integration_tests::{wait_until, Cluster};

const SETUP: &str = "
CREATE TABLE acct (id int PRIMARY KEY, balance numeric NOT NULL, note text);
ALTER TABLE acct REPLICA IDENTITY FULL;";

async fn acct(cluster: &Cluster, i: usize) -> anyhow::Result<Vec<(i32, String, Option<String>)>> {
    Ok(cluster
        .sql(i)
        .await?
        .query("SELECT id, balance::text, note FROM acct ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_reordered_insert_update_sums_exactly() -> anyhow::Result<()> {
    let mut cluster = Cluster::create("deltareorder", &["r1", "r1", "r1"], SETUP, &["public.acct"]).await?;
    cluster.replication_toml = "[replication.table.\"public.acct\"]\ndelta_columns = [\"balance\"]".into();
    cluster.write_config()?;
    cluster.init()?;
    let (n1, n3) = (cluster.sql(0).await?, cluster.sql(2).await?);
    let _captures: Vec<_> = (0..3).map(|i| cluster.spawn("capture", i)).collect::<Result<_, _>>()?;
    // n2 (index 1) applies nothing until the order is built.
    let _applies = (cluster.spawn("apply", 0)?, cluster.spawn("apply", 2)?);

    n1.batch_execute("INSERT INTO acct VALUES (1, 100, 'opened on n1')").await?;
    wait_until("n1's insert on n3", Duration::from_secs(60), || async {
        Ok(n3.query_opt("SELECT 1 FROM acct WHERE id = 1", &[]).await?.is_some())
    })
    .await?;
    n3.batch_execute("UPDATE acct SET balance = balance + 10, note = 'credited on n3' WHERE id = 1")
        .await?;
    wait_until("n3's update on n1", Duration::from_secs(60), || async {
        Ok(n1.query_opt("SELECT 1 FROM acct WHERE note = 'credited on n3'", &[]).await?.is_some())
    })
    .await?;

    // n2 reads n3's update before n1's insert.
    cluster.apply_origins_in_order(1, &[2, 0]).await?;
    let n2 = cluster.sql(1).await?;
    let seen: Vec<(String, String, String)> = n2
        .query(
            "SELECT conflict_type, resolution, remote_origin FROM pgferry.conflicts WHERE tbl = 'public.acct' ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let (name1, name3) = (cluster.nodes[0].name.clone(), cluster.nodes[2].name.clone());
    assert_eq!(
        seen,
        vec![
            ("update_missing".to_string(), "apply_remote".to_string(), name3),
            ("insert_exists".to_string(), "keep_local".to_string(), name1),
        ],
        "n2 really got the update first, then the insert"
    );
    let want = vec![(1, "110".to_string(), Some("credited on n3".to_string()))];
    assert_eq!(acct(&cluster, 1).await?, want, "n2: the balance counts each change once");

    let _apply2 = cluster.spawn("apply", 1)?;
    cluster.wait_converged("acct", Duration::from_secs(60)).await?;
    for i in 0..3 {
        assert_eq!(acct(&cluster, i).await?, want, "node {}", i + 1);
    }
    drop((_captures, _applies, _apply2));
    cluster.cleanup().await
}
