//! Issue 16, scenario 10, "row_stamps keyed by the top-level xid, matched against xmin": under
//! `on_error = skip_change` each change is applied inside a savepoint, so the row version it
//! writes has a subtransaction's xid as its `xmin`. A losing change that still merges its delta
//! columns records the winner's stamp in `pgferry.row_stamps`; keyed by the top-level xid, that
//! stamp was never found again, and the row looked as if the loser had written it.
//!
//! The arrival order: n1 inserts row 1; n2 updates it twice (u1 then u2, both adding to the
//! delta column `balance`); n1, having applied them, updates it (u3, the newest). n3's apply is
//! held back and reads n1's stream first (`pgferry replay --origin n1`), then n2's. On n3, u1
//! loses to u3 (its delta is still merged); u2 must lose too. On the old code n3 took u2's row
//! as written by n2 (the winner's stamp lost), applied it as a same-origin update and kept
//! `note = 'b2'` while n1 and n2 kept `'a'`.
//!
//! Grouped apply never writes inside a savepoint (a `skip_change` table is not groupable, and
//! neither is a delta table), so only the one-by-one path can meet this.

use std::time::Duration;

use pgferry_integration_tests::{wait_until, Cluster};

const SETUP: &str = "
CREATE TABLE acct (id int PRIMARY KEY, balance bigint NOT NULL DEFAULT 0, note text);
ALTER TABLE acct REPLICA IDENTITY FULL;";

async fn row(c: &tokio_postgres::Client) -> anyhow::Result<Option<(i64, String)>> {
    Ok(c.query_opt("SELECT balance, note FROM acct WHERE id = 1", &[])
        .await?
        .map(|r| (r.get(0), r.get(1))))
}

async fn wait_row(cluster: &Cluster, i: usize, want: (i64, &str)) -> anyhow::Result<()> {
    let c = cluster.sql(i).await?;
    wait_until(
        &format!("row 1 = {want:?} on {}", cluster.nodes[i].name),
        Duration::from_secs(60),
        || async { Ok(row(&c).await? == Some((want.0, want.1.to_string()))) },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stamps_under_skip_change_keep_the_winner() -> anyhow::Result<()> {
    let mut cluster = Cluster::create("skipstamps", &["r1", "r1", "r1"], SETUP, &["public.acct"]).await?;
    cluster.replication_toml =
        "[replication.table.\"public.acct\"]\ndelta_columns = [\"balance\"]\non_error = \"skip_change\"".into();
    cluster.write_config()?;
    cluster.init()?;
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    let _captures = [cluster.spawn("capture", 0)?, cluster.spawn("capture", 1)?];
    let _applies = [cluster.spawn("apply", 0)?, cluster.spawn("apply", 1)?];
    let (n1, n2, n3) = (cluster.sql(0).await?, cluster.sql(1).await?, cluster.sql(2).await?);

    n1.batch_execute("INSERT INTO acct VALUES (1, 0, 'init')").await?;
    wait_row(&cluster, 1, (0, "init")).await?;
    n2.batch_execute("UPDATE acct SET balance = balance + 10, note = 'b1' WHERE id = 1")
        .await?;
    n2.batch_execute("UPDATE acct SET balance = balance + 5, note = 'b2' WHERE id = 1")
        .await?;
    wait_row(&cluster, 0, (15, "b2")).await?;
    n1.batch_execute("UPDATE acct SET balance = balance + 1, note = 'a' WHERE id = 1")
        .await?;
    wait_row(&cluster, 1, (16, "a")).await?;
    cluster.wait_published(0, Duration::from_secs(60)).await?;
    cluster.wait_published(1, Duration::from_secs(60)).await?;

    // n3 reads n1's stream first (the insert and u3), then n2's (u1, u2).
    let out = cluster.pgferry(&[
        "replay",
        "--node",
        &names[2],
        "--origin",
        &names[0],
        "--from-offset",
        "0",
        "-q",
    ])?;
    anyhow::ensure!(
        out.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(row(&n3).await?, Some((1, "a".to_string())), "n3 after n1's stream");
    let _apply3 = cluster.spawn("apply", 2)?;
    // Every delta is merged whoever wins: 16 once n2's two updates are applied.
    wait_until("n3 to apply n2's updates", Duration::from_secs(60), || async {
        Ok(row(&n3).await?.is_some_and(|(b, _)| b == 16))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;

    let prints: Vec<_> = futures::future::try_join_all((0..3).map(|i| cluster.fingerprint(i, "acct"))).await?;
    assert!(
        prints.windows(2).all(|w| w[0] == w[1]),
        "acct differs between nodes: n1 {:?}, n2 {:?}, n3 {:?}",
        row(&n1).await?,
        row(&n2).await?,
        row(&n3).await?
    );
    assert_eq!(row(&n3).await?, Some((16, "a".to_string())));
    // On n3 both of n2's updates lost to n1's, and each is recorded so.
    let conflicts: Vec<(String, String, Option<String>)> = n3
        .query(
            "SELECT conflict_type, resolution, local_origin FROM pgferry.conflicts WHERE remote_origin = $1 ORDER BY id",
            &[&names[1]],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let lost = (
        "update_origin_differs".to_string(),
        "keep_local".to_string(),
        Some(names[0].clone()),
    );
    assert_eq!(conflicts, vec![lost.clone(), lost], "n3's conflicts with n2's updates");
    let exceptions: i64 = n3
        .query_one("SELECT count(*) FROM pgferry.exceptions", &[])
        .await?
        .get(0);
    assert_eq!(exceptions, 0);
    drop((_captures, _applies, _apply3));
    cluster.cleanup().await
}
