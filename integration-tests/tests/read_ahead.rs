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

const SETUP: &str = "
CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL);
CREATE TABLE w (id int PRIMARY KEY, last int NOT NULL);
INSERT INTO w SELECT g, 0 FROM generate_series(0, 3) g;
CREATE PROCEDURE gen(count int) LANGUAGE plpgsql AS $$
BEGIN
  FOR i IN 1..count LOOP
    INSERT INTO t VALUES (i, md5(i::text));
    UPDATE w SET last = i WHERE id = i % 4;
    DELETE FROM t WHERE id = i - 100 OR (i % 200 = 0 AND id = i - 3);
    COMMIT;
  END LOOP;
END $$;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_read_ahead_decide_as_one_by_one() -> anyhow::Result<()> {
    const TXNS: i32 = 2_000;
    let mut cluster = Cluster::create("readahead", &["r1", "r1"], SETUP, &["public.t", "public.w"]).await?;
    // Groups of 40 transactions, and a window of 2 × 200 messages that the backlog fills (groups
    // are read ahead only under a backlog).
    cluster.apply_toml = "max_group_txns = 40\nmax_group_rows = 200\nread_ahead = true\n".into();
    cluster.write_config()?;
    cluster.init()?;
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

    let rows = |sql: &'static str| {
        let (n1, n2) = (&n1, &n2);
        async move {
            let a: Vec<String> = n1.query(sql, &[]).await?.iter().map(|r| r.get(0)).collect();
            let b: Vec<String> = n2.query(sql, &[]).await?.iter().map(|r| r.get(0)).collect();
            anyhow::Ok((a, b))
        }
    };
    let (a, b) = rows("SELECT format('%s %s', id, v) FROM t ORDER BY id").await?;
    assert_eq!(a, b, "rows of t on n1 and n2");
    let (a, b) = rows("SELECT format('%s %s', id, last) FROM w ORDER BY id").await?;
    assert_eq!(a, b, "rows of w on n1 and n2");

    let conflicts: Vec<(String, String, String)> = n2
        .query("SELECT tbl, key::text, conflict_type FROM pgferry.conflicts ORDER BY key::text", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let expected: Vec<(String, String, String)> =
        (0..4).map(|k| ("public.w".to_string(), format!("[{k}]"), "update_origin_differs".to_string())).collect();
    assert_eq!(conflicts, expected, "conflicts on n2");

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
