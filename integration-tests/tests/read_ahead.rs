//! Reading groups ahead (`[apply] read_ahead`, DESIGN.md "Apply"; issue 14): while a group is
//! written and committed, apply reads the next group's keys on a second session, before the
//! first group's versions are visible. The outcome must be what applying the transactions one by
//! one gives.
//!
//! n2 first writes the four rows of `w` itself. Then n1 writes a backlog in which every
//! transaction updates one of those rows (so each group updates rows the group before it
//! updated, and its read ahead sees their versions from before that group), inserts a new row of
//! `t`, and deletes the row of `t` 100 transactions older, and every 200th transaction also the
//! one three transactions older (a group that deletes a row the group before it inserted must
//! not use its read ahead, which cannot see that row). n2 then applies the backlog in groups of
//! 40 transactions. Expected, as one by one:
//! - every row equal to n1's;
//! - exactly one conflict per row of `w` (n1's first update of it against n2's own version);
//!   a group that decided against the version read ahead instead of the one the group before it
//!   wrote would record `update_origin_differs` again;
//! - each row of `w` stamped with the commit time of n1's transaction that wrote it last;
//! - and groups were in fact written from reads made ahead (the metric).

use std::time::Duration;

use pgferry_integration_tests::{free_local_addr, http_get, metric, wait_until, Cluster};

/// The tables of both tests: `w`'s four rows are inserted on each node (so n1's first update of
/// each is a conflict on n2).
macro_rules! tables {
    () => {
        "
CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL);
CREATE TABLE w (id int PRIMARY KEY, last int NOT NULL);
INSERT INTO w SELECT g, 0 FROM generate_series(0, 3) g;"
    };
}

/// Two nodes with `setup`, whose apply takes groups of 40 transactions and reads them ahead,
/// in a window of 2 × 200 messages that a backlog fills (groups are read ahead only under a
/// backlog).
async fn two_nodes(name: &str, setup: &str) -> anyhow::Result<Cluster> {
    let mut cluster = Cluster::create(name, &["r1", "r1"], setup, &["public.t", "public.w"]).await?;
    cluster.apply_toml = "max_group_txns = 40\nmax_group_rows = 200\nread_ahead = true\n".into();
    cluster.write_config()?;
    cluster.init()?;
    Ok(cluster)
}

/// The rows of `t` and of `w` are the same on both nodes.
async fn assert_same_rows(n1: &tokio_postgres::Client, n2: &tokio_postgres::Client) -> anyhow::Result<()> {
    for (table, sql) in [
        ("t", "SELECT format('%s %s', id, v) FROM t ORDER BY id"),
        ("w", "SELECT format('%s %s', id, last) FROM w ORDER BY id"),
    ] {
        let a: Vec<String> = n1.query(sql, &[]).await?.iter().map(|r| r.get(0)).collect();
        let b: Vec<String> = n2.query(sql, &[]).await?.iter().map(|r| r.get(0)).collect();
        assert_eq!(a, b, "rows of {table} on n1 and n2");
    }
    Ok(())
}

/// The conflicts recorded on `n2`: exactly n1's first update of each row of `w` against n2's
/// own version. A group that decided against a version read ahead instead of the one the group
/// before it wrote would record `update_origin_differs` again.
async fn assert_only_first_updates_of_w_conflict(n2: &tokio_postgres::Client) -> anyhow::Result<()> {
    let conflicts: Vec<(String, String, String)> = n2
        .query("SELECT tbl, key::text, conflict_type FROM pgferry.conflicts ORDER BY tbl, key::text", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let expected: Vec<(String, String, String)> =
        (0..4).map(|k| ("public.w".to_string(), format!("[{k}]"), "update_origin_differs".to_string())).collect();
    assert_eq!(conflicts, expected, "conflicts on n2");
    Ok(())
}

const SETUP: &str = concat!(
    tables!(),
    "
CREATE PROCEDURE gen(count int) LANGUAGE plpgsql AS $$
BEGIN
  FOR i IN 1..count LOOP
    INSERT INTO t VALUES (i, md5(i::text));
    UPDATE w SET last = i WHERE id = i % 4;
    DELETE FROM t WHERE id = i - 100 OR (i % 200 = 0 AND id = i - 3);
    COMMIT;
  END LOOP;
END $$;"
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_read_ahead_decide_as_one_by_one() -> anyhow::Result<()> {
    const TXNS: i32 = 2_000;
    let cluster = two_nodes("readahead", SETUP).await?;
    let (n1, n2) = (cluster.sql(0).await?, cluster.sql(1).await?);
    // n2's own versions of `w`, older than every change of n1's backlog.
    n2.batch_execute("UPDATE w SET last = -1").await?;

    let capture = cluster.spawn("capture", 0)?;
    n1.batch_execute("SET synchronous_commit = off").await?;
    n1.batch_execute(&format!("CALL gen({TXNS})")).await?;
    cluster.wait_published(0, Duration::from_secs(60)).await?;
    // While apply runs, a session on n2 keeps locking the rows of `w` (without changing them)
    // for 50 ms at a time: a group's update of them waits, and the next group is read ahead
    // in the meantime, before the versions that group writes are visible.
    let locker = cluster.sql(1).await?;
    let locking = tokio::spawn(async move {
        loop {
            let held = locker.batch_execute("BEGIN; SELECT * FROM w FOR UPDATE; SELECT pg_sleep(0.05); COMMIT").await;
            if held.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let addr = free_local_addr()?;
    let apply = cluster.spawn_with("apply", 1, &["--metrics-listen", &addr])?;
    // Done when n1's last transaction is there: it set `w` row TXNS % 4 to TXNS.
    wait_until("n2 to apply n1's backlog", Duration::from_secs(120), || async {
        let last: i32 = n2.query_one("SELECT max(last) FROM w", &[]).await?.get(0);
        Ok(last == TXNS)
    })
    .await?;
    locking.abort();

    assert_same_rows(&n1, &n2).await?;
    assert_only_first_updates_of_w_conflict(&n2).await?;

    // Each row of `w` carries the stamp of n1's transaction that wrote it last: its commit time
    // on n1, which n2 holds as the version's origin commit time or as a group's stamp override.
    let n1_stamps: Vec<i64> = n1
        .query(
            "SELECT (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1000000)::int8 FROM w ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let n2_stamps: Vec<i64> = n2
        .query(
            "SELECT coalesce(
                 (SELECT (s.stamps -> 'public.w' ->> jsonb_build_array(w.id)::text)::int8
                  FROM pgferry.xact_stamps s WHERE s.xid = w.xmin::text::int8
                    AND s.stamps -> 'public.w' ? jsonb_build_array(w.id)::text),
                 (extract(epoch FROM (pg_xact_commit_timestamp_origin(w.xmin)).timestamp) * 1000000)::int8)
             FROM w ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(n1_stamps, n2_stamps, "stamps of w's rows (commit times of their last writers on n1)");

    let (_, text) = http_get(&addr, "/metrics").await?;
    let node = cluster.nodes[1].name.clone();
    let ahead = metric(&text, "pgferry_apply_groups_read_ahead_total", &[("node", node.as_str())]).unwrap_or(0.0);
    let fallbacks = metric(&text, "pgferry_apply_group_fallbacks_total", &[("node", node.as_str())]).unwrap_or(0.0);
    assert!(ahead >= 10.0, "only {ahead} groups were written from a read made ahead\n{}", cluster.logs());
    assert_eq!(fallbacks, 0.0, "groups fell back to one by one");

    drop((apply, capture));
    cluster.cleanup().await
}

/// A key inserted and deleted by turns, so that every group inserts and deletes it: a group's
/// read made ahead is never usable (the group before it inserted or deleted that key), so each
/// group reads again and takes the key's lock again. The next group's read, sent before the
/// group in hand is decided, may hold that lock by then: it is rolled back before the group
/// reads again (`WhileWriting::begun` in `apply/src/group/mod.rs`); were it not, it would hold
/// the lock while it waits for the group to answer, which the group cannot while it waits for
/// the lock — apply would stall, and this would fail. Expected: n2 applies the whole backlog,
/// with n1's rows, and no conflict but n1's first update of each row of `w`.
const CHURN: &str = concat!(
    tables!(),
    "
CREATE PROCEDURE churn(count int) LANGUAGE plpgsql AS $$
BEGIN
  FOR i IN 1..count LOOP
    IF i % 2 = 1 THEN
      INSERT INTO t VALUES (0, md5(i::text));
    ELSE
      DELETE FROM t WHERE id = 0;
    END IF;
    UPDATE w SET last = i WHERE id = i % 4;
    COMMIT;
  END LOOP;
END $$;"
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_every_group_inserts_and_deletes_does_not_stall_the_read_ahead() -> anyhow::Result<()> {
    // Odd: the last transaction inserts the key, so it is there at the end.
    const TXNS: i32 = 1_001;
    let cluster = two_nodes("readchurn", CHURN).await?;
    let (n1, n2) = (cluster.sql(0).await?, cluster.sql(1).await?);
    let capture = cluster.spawn("capture", 0)?;
    n1.batch_execute("SET synchronous_commit = off").await?;
    n1.batch_execute(&format!("CALL churn({TXNS})")).await?;
    cluster.wait_published(0, Duration::from_secs(60)).await?;
    let apply = cluster.spawn("apply", 1)?;
    wait_until("n2 to apply n1's backlog", Duration::from_secs(120), || async {
        let last: i32 = n2.query_one("SELECT max(last) FROM w", &[]).await?.get(0);
        Ok(last == TXNS)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;

    assert_same_rows(&n1, &n2).await?;
    assert_only_first_updates_of_w_conflict(&n2).await?;

    drop((apply, capture));
    cluster.cleanup().await
}
