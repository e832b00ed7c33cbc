//! Issue 16, scenario 13, "a local delete racing apply's guarded insert": apply's insert of a
//! key (with its "no tombstone" check) meets a row that a local, uncommitted transaction is
//! deleting. The insert waits for that transaction; once it commits, the row is gone and the
//! insert goes in — but its tombstone check ran in the snapshot taken before the wait, so the
//! newer local delete is not seen and an older insert resurrects the row on this node alone.
//!
//! Two races on n1, each while n2's apply is stopped (so n2 does not have n1's rows yet):
//! - `k1`: n1 has row 1 (its own insert). A local transaction L1 deletes it and stays open; n2
//!   inserts its own row 1 (older than L1's commit), n1's apply waits for L1; L1 commits.
//! - `k2`: a local transaction L2 inserts row 2 and stays open; n2 inserts its row 2, n1's apply
//!   waits for L2; L2 deletes row 2 and commits (a key created and deleted by one transaction).
//!
//! Then n2's apply runs: it takes n1's deletes (newer than its own inserts), so n2 ends without
//! rows 1 and 2. n1 must end the same, with n2's inserts recorded as `update_deleted`, kept
//! local. Both apply paths: one by one (`max_group_txns = 1`) and grouped (the default).

use std::time::Duration;

use pgferry_integration_tests::{wait_until, Cluster};
use tokio_postgres::Client;

const SETUP: &str = "CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL);";

async fn has(c: &Client, id: i32) -> anyhow::Result<bool> {
    Ok(c.query_one("SELECT count(*) FROM t WHERE id = $1", &[&id])
        .await?
        .get::<_, i64>(0)
        > 0)
}

async fn wait_has(cluster: &Cluster, i: usize, id: i32, want: bool) -> anyhow::Result<()> {
    let c = cluster.sql(i).await?;
    wait_until(
        &format!(
            "row {id} {} on {}",
            if want { "present" } else { "absent" },
            cluster.nodes[i].name
        ),
        Duration::from_secs(60),
        || async { Ok(has(&c, id).await? == want) },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))
}

/// Waits until one of n1's apply sessions waits for a lock (the racing local transaction's).
async fn wait_apply_blocked(cluster: &Cluster, n1: &Client) -> anyhow::Result<()> {
    wait_until(
        "n1's apply to wait for the local transaction",
        Duration::from_secs(60),
        || async {
            Ok(n1
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name LIKE 'pgferry-apply-%'
                   AND wait_event_type = 'Lock'",
                    &[],
                )
                .await?
                .get::<_, i64>(0)
                > 0)
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))
}

async fn race(apply_toml: &str, test: &str) -> anyhow::Result<()> {
    let mut cluster = Cluster::create(test, &["r1", "r1"], SETUP, &["public.t"]).await?;
    cluster.apply_toml = apply_toml.into();
    cluster.write_config()?;
    cluster.init()?;
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    let _captures = [cluster.spawn("capture", 0)?, cluster.spawn("capture", 1)?];
    let _apply1 = cluster.spawn("apply", 0)?;
    let (n1, n2) = (cluster.sql(0).await?, cluster.sql(1).await?);
    let local = cluster.sql(0).await?;

    // k1: a local delete of an existing row, racing n2's older insert of the key.
    n1.batch_execute("INSERT INTO t VALUES (1, 'n1')").await?;
    local.batch_execute("BEGIN; DELETE FROM t WHERE id = 1").await?;
    n2.batch_execute("INSERT INTO t VALUES (1, 'n2')").await?;
    wait_apply_blocked(&cluster, &n1).await?;
    local.batch_execute("COMMIT").await?;
    n2.batch_execute("INSERT INTO t VALUES (101, 'marker 1')").await?;
    wait_has(&cluster, 0, 101, true).await?;

    // k2: a key inserted and deleted by one local transaction, racing n2's older insert.
    local.batch_execute("BEGIN; INSERT INTO t VALUES (2, 'n1')").await?;
    n2.batch_execute("INSERT INTO t VALUES (2, 'n2')").await?;
    wait_apply_blocked(&cluster, &n1).await?;
    local.batch_execute("DELETE FROM t WHERE id = 2; COMMIT").await?;
    n2.batch_execute("INSERT INTO t VALUES (102, 'marker 2')").await?;
    wait_has(&cluster, 0, 102, true).await?;

    // n2 catches up with n1 (the inserts of row 1 and the deletes).
    n1.batch_execute("INSERT INTO t VALUES (201, 'marker of n1')").await?;
    let _apply2 = cluster.spawn("apply", 1)?;
    wait_has(&cluster, 1, 201, true).await?;

    let rows = |c: Client| async move {
        let ids: Vec<i32> = c
            .query("SELECT id FROM t ORDER BY id", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        anyhow::Ok(ids)
    };
    let (on_n1, on_n2) = (rows(cluster.sql(0).await?).await?, rows(cluster.sql(1).await?).await?);
    assert_eq!(on_n2, vec![101, 102, 201], "n2 took n1's newer deletes");
    assert_eq!(on_n1, on_n2, "n1 resurrected a row that its newer local delete removed");
    assert_eq!(cluster.fingerprint(0, "t").await?, cluster.fingerprint(1, "t").await?);
    let conflicts: Vec<(String, String, String)> = n1
        .query(
            "SELECT key::text, conflict_type, resolution FROM pgferry.conflicts WHERE remote_origin = $1 ORDER BY key::text",
            &[&names[1]],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let lost = |k: &str| (k.to_string(), "update_deleted".to_string(), "keep_local".to_string());
    assert_eq!(
        conflicts,
        vec![lost("[1]"), lost("[2]")],
        "n1's conflicts with n2's inserts"
    );
    drop((_captures, _apply1, _apply2));
    cluster.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_delete_racing_insert_one_by_one() -> anyhow::Result<()> {
    race("max_group_txns = 1", "racedel1").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_delete_racing_insert_grouped() -> anyhow::Result<()> {
    race("", "racedelg").await
}
