//! Grouped apply under failure (DESIGN.md, "Apply", "Grouping"; issue 14): a backlog on n1 is
//! drained into n2 in large groups (many source transactions in one local transaction), and
//!
//! - apply is SIGKILLed twice in the middle of the drain: afterwards every source transaction is
//!   applied exactly once, in order, and the origin's progress is at the last one;
//! - one transaction in the middle of a group is refused by n2 (a CHECK constraint only n2 has):
//!   the group is rolled back and its transactions applied one by one, so the table's `on_error`
//!   decides exactly as without groups — `skip_transaction` skips that transaction alone (it is in
//!   `pgferry.exceptions`, whole) and applies every other one; `stop` (the default) holds the stream
//!   at it, with everything before it applied and nothing after, until the operator fixes the cause.
//!
//! Each source transaction inserts one uniquely numbered row into `t` and sets one of four
//! "last writer" rows of `w`, so a lost, repeated or reordered transaction shows in the rows.

use std::time::Duration;

use pgferry_integration_tests::{
    free_local_addr, http_get, metric, read_topic, wait_until, wait_until_every, Cluster, Service,
};
use tokio_postgres::Client;

const SETUP: &str = "
CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL);
CREATE TABLE w (id int PRIMARY KEY, last int NOT NULL);
CREATE PROCEDURE gen(count int, bad int) LANGUAGE plpgsql AS $$
BEGIN
  FOR i IN 1..count LOOP
    INSERT INTO t VALUES (i, CASE WHEN i = bad THEN 'bad' ELSE md5(i::text) END);
    INSERT INTO w VALUES (i % 4, i) ON CONFLICT (id) DO UPDATE SET last = EXCLUDED.last;
    COMMIT;
  END LOOP;
END $$;";

const TABLES: [&str; 2] = ["public.t", "public.w"];

/// Writes `txns` source transactions on n1 (transaction i writes row i; row `bad` has
/// v = 'bad'), and waits until capture has published them all.
async fn write_backlog(cluster: &Cluster, txns: i32, bad: i32) -> anyhow::Result<()> {
    let n1 = cluster.sql(0).await?;
    // Separate statements: a multi-statement query is one transaction, where COMMIT is not allowed.
    n1.batch_execute("SET synchronous_commit = off").await?;
    n1.batch_execute(&format!("CALL gen({txns}, {bad})")).await?;
    cluster.wait_published(0, Duration::from_secs(60)).await
}

/// n1's source transactions in the topic, in order: each one's commit LSN and message offsets.
fn source_txns(cluster: &Cluster) -> anyhow::Result<Vec<(u64, Vec<i64>)>> {
    let mut txns: Vec<(u64, Vec<i64>)> = Vec::new();
    let mut messages = read_topic(&cluster.endpoints.kafka, &cluster.topic_of(0))?;
    messages.sort_by_key(|m| (m.partition, m.offset));
    for m in messages.iter().filter(|m| {
        m.header("pgferry-kind") == Some("change") && m.header("pgferry-origin") == Some(cluster.nodes[0].name.as_str())
    }) {
        let lsn: u64 = m.header("pgferry-commit-lsn").expect("commit lsn header").parse()?;
        match txns.last_mut() {
            Some((last, offsets)) if *last == lsn => offsets.push(m.offset),
            _ => txns.push((lsn, vec![m.offset])),
        }
    }
    Ok(txns)
}

/// The commit LSN of n1's last transaction applied on n2, by `pgferry.apply_progress`
/// (0: none).
async fn progress_lsn(cluster: &Cluster, n2: &Client) -> anyhow::Result<u64> {
    let lsn: String = n2
        .query_one(
            "SELECT coalesce(max(commit_lsn - '0/0'::pg_lsn), 0)::text FROM pgferry.apply_progress WHERE origin = $1",
            &[&cluster.nodes[0].name],
        )
        .await?
        .get(0);
    Ok(lsn.parse()?)
}

/// Waits until n2's progress for n1 is at `lsn`.
async fn wait_applied_to(cluster: &Cluster, lsn: u64, timeout: Duration) -> anyhow::Result<()> {
    let n2 = cluster.sql(1).await?;
    wait_until("n2's progress to reach n1's last transaction", timeout, || async {
        Ok(progress_lsn(cluster, &n2).await? >= lsn)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))
}

async fn ids(c: &Client) -> anyhow::Result<Vec<i32>> {
    Ok(c.query("SELECT id FROM t ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

async fn count(c: &Client, sql: &str) -> anyhow::Result<i64> {
    Ok(c.query_one(sql, &[]).await?.get(0))
}

/// Rows of `w`: each "last writer" row holds the last transaction (1..=txns, but `skipped`)
/// that wrote it — it does if every transaction was applied once, in source order.
fn expected_w(txns: i32, skipped: Option<i32>) -> Vec<(i32, i32)> {
    (0..4)
        .filter_map(|r| Some((r, (1..=txns).filter(|i| i % 4 == r && Some(*i) != skipped).max()?)))
        .collect()
}

async fn w_rows(c: &Client) -> anyhow::Result<Vec<(i32, i32)>> {
    Ok(c.query("SELECT id, last FROM w ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// The count of `name{node=…}` on `addr`'s /metrics (0 if absent), or of one of its histogram
/// buckets (`le`).
async fn scrape(addr: &str, name: &str, node: &str, le: Option<&str>) -> anyhow::Result<f64> {
    let (_, text) = http_get(addr, "/metrics").await?;
    let mut labels = vec![("node", node)];
    if let Some(le) = le {
        labels.push(("le", le));
    }
    Ok(metric(&text, name, &labels).unwrap_or(0.0))
}

/// Groups of more than `size` source transactions committed by the apply serving `addr`.
async fn groups_larger_than(addr: &str, node: &str, size: u32) -> anyhow::Result<f64> {
    let all = scrape(addr, "pgferry_apply_group_transactions_count", node, None).await?;
    let small = scrape(
        addr,
        "pgferry_apply_group_transactions_bucket",
        node,
        Some(&size.to_string()),
    )
    .await?;
    Ok(all - small)
}

/// Both nodes hold the same rows (of `t` without row `except`, and of `w`).
/// Every one of `txns` source transactions on n2, each once: every row of `t`, each "last writer" row at its
/// last writer, no conflict (a transaction applied again would meet its own rows:
/// insert_exists), no exception.
async fn assert_each_applied_once(n2: &Client, txns: i32) -> anyhow::Result<()> {
    assert_eq!(ids(n2).await?, (1..=txns).collect::<Vec<_>>(), "rows of t on n2");
    assert_eq!(w_rows(n2).await?, expected_w(txns, None), "last writers on n2");
    assert_eq!(count(n2, "SELECT count(*) FROM pgferry.conflicts").await?, 0, "conflicts on n2");
    assert_eq!(count(n2, "SELECT count(*) FROM pgferry.exceptions").await?, 0, "exceptions on n2");
    Ok(())
}

async fn assert_same_on_both(cluster: &Cluster, except: i32) -> anyhow::Result<()> {
    let mut prints = Vec::new();
    for i in 0..2 {
        let c = cluster.sql(i).await?;
        let row = c
            .query_one(
                "SELECT (SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM t WHERE id <> $1),
                        (SELECT md5(string_agg(w::text, ',' ORDER BY id)) FROM w)",
                &[&except],
            )
            .await?;
        prints.push((row.get::<_, String>(0), row.get::<_, String>(1)));
    }
    assert_eq!(prints[0], prints[1], "n1 and n2 differ");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_killed_in_the_middle_of_large_groups_applies_each_transaction_once() -> anyhow::Result<()> {
    const TXNS: i32 = 6_000;
    let cluster = Cluster::start("grpkill", &["r1", "r1"], SETUP, &TABLES).await?;
    let node = cluster.nodes[1].name.clone();
    let _capture = cluster.spawn("capture", 0)?;
    // A backlog: n2's apply is not running while n1 writes.
    write_backlog(&cluster, TXNS, 0).await?;
    let last_lsn = source_txns(&cluster)?.last().expect("transactions in the topic").0;

    let n2 = cluster.sql(1).await?;
    let addr = free_local_addr()?;
    let mut apply = cluster.spawn_with("apply", 1, &["--metrics-listen", &addr])?;
    // Kill twice during the drain, each time in the middle of a group: once the running apply
    // has committed something, as soon as its next local transaction is open (it holds the key
    // locks from its first round trip on). Polled often: a group's transaction lasts tens of ms.
    let session = format!("pgferry-apply-{}-from-{}", node, cluster.nodes[0].name);
    let mut killed_backends: Vec<i32> = Vec::new();
    let mut killed_at = vec![0i64];
    for _ in 0..2 {
        let committed = *killed_at.last().expect("a count");
        let writing = std::cell::Cell::new(None);
        wait_until_every(
            "apply to be in the middle of a group",
            Duration::from_secs(60),
            Duration::from_millis(5),
            || async {
                let pid = n2
                    .query_opt(
                        "SELECT pid FROM pg_stat_activity
                     WHERE application_name = left($1, 63) AND xact_start IS NOT NULL AND pid <> ALL($2)
                       AND (SELECT count(*) FROM t) > $3
                     LIMIT 1",
                        &[&session, &killed_backends, &committed],
                    )
                    .await?
                    .map(|r| r.get::<_, i32>(0));
                writing.set(pid);
                Ok(pid.is_some())
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;
        apply.kill();
        killed_backends.extend(writing.get());
        killed_at.push(count(&n2, "SELECT count(*) FROM t").await?);
        apply = cluster.spawn_with("apply", 1, &["--metrics-listen", &addr])?;
    }
    killed_at.remove(0);
    eprintln!("apply killed mid-group with {killed_at:?} of {TXNS} transactions applied");
    assert!(
        killed_at.iter().all(|k| *k < TXNS as i64),
        "each kill must land mid-drain: {killed_at:?} of {TXNS} applied"
    );

    wait_applied_to(&cluster, last_lsn, Duration::from_secs(60)).await?;
    // Exactly once, in order: every row, no other; each "last writer" row at the last writer;
    // no conflict (a transaction applied again would meet its own rows: insert_exists); no
    // exception; the origin's progress at n1's last commit, in apply_progress and in
    // PostgreSQL's replication origin alike.
    assert_each_applied_once(&n2, TXNS).await?;
    let origin_lsn: String = n2
        .query_one(
            "SELECT (pg_replication_origin_progress($1, true) - '0/0'::pg_lsn)::text",
            &[&cluster.origin_on(1, &cluster.nodes[0].name)],
        )
        .await?
        .get(0);
    assert_eq!(
        origin_lsn.parse::<u64>()?,
        last_lsn,
        "the replication origin's progress"
    );
    assert_eq!(progress_lsn(&cluster, &n2).await?, last_lsn, "pgferry.apply_progress");
    assert_same_on_both(&cluster, 0).await?;

    // The drain really went in groups: the last apply committed groups of more than 100
    // transactions, and n2 holds far fewer local transactions than source ones.
    let large = groups_larger_than(&addr, &node, 100).await?;
    assert!(
        large > 0.0,
        "no group of more than 100 transactions\n{}",
        cluster.logs()
    );
    let local_txns = count(&n2, "SELECT count(DISTINCT xmin::text) FROM t").await?;
    assert!(
        local_txns < TXNS as i64 / 10,
        "{local_txns} local transactions for {TXNS} source ones"
    );

    drop((apply, _capture));
    cluster.cleanup().await
}

/// A cluster whose n2 refuses `t` rows with v = 'bad', with `t`'s `on_error` set by
/// `table_toml` and large groups forced; apply's /metrics address.
async fn refusing_cluster(test: &str, table_toml: &str) -> anyhow::Result<(Cluster, String)> {
    let mut cluster = Cluster::create(test, &["r1", "r1"], SETUP, &TABLES).await?;
    cluster.replication_toml = table_toml.into();
    // A large wait, so groups are large even if the backlog arrives in pieces.
    cluster.apply_toml = "group_wait_ms = 500".into();
    cluster.write_config()?;
    cluster.init()?;
    cluster
        .sql(1)
        .await?
        .batch_execute("ALTER TABLE t ADD CONSTRAINT not_bad CHECK (v <> 'bad')")
        .await?;
    Ok((cluster, free_local_addr()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_refused_inside_a_group_is_skipped_alone_under_skip_transaction() -> anyhow::Result<()> {
    const TXNS: i32 = 3_000;
    const BAD: i32 = 1_501;
    let (cluster, addr) = refusing_cluster(
        "grpskip",
        "[replication.table.\"public.t\"]\non_error = \"skip_transaction\"\n",
    )
    .await?;
    let node = cluster.nodes[1].name.clone();
    let _capture = cluster.spawn("capture", 0)?;
    write_backlog(&cluster, TXNS, BAD).await?;
    let txns = source_txns(&cluster)?;
    assert_eq!(txns.len(), TXNS as usize, "source transactions in the topic");
    let last_lsn = txns.last().expect("transactions").0;

    let apply = cluster.spawn_with("apply", 1, &["--metrics-listen", &addr])?;
    wait_applied_to(&cluster, last_lsn, Duration::from_secs(60)).await?;
    let n2 = cluster.sql(1).await?;

    // Only the refused transaction is missing: its row and its "last writer" update.
    let expected: Vec<i32> = (1..=TXNS).filter(|i| *i != BAD).collect();
    assert_eq!(ids(&n2).await?, expected, "rows of t on n2");
    assert_eq!(w_rows(&n2).await?, expected_w(TXNS, Some(BAD)), "last writers on n2");
    assert_same_on_both(&cluster, BAD).await?;
    assert_eq!(
        count(&n2, "SELECT count(*) FROM pgferry.conflicts").await?,
        0,
        "conflicts on n2"
    );
    // It is in pgferry.exceptions whole (its two messages), and nothing else is.
    let exceptions = n2
        .query(
            "SELECT kafka_offset, reason FROM pgferry.exceptions ORDER BY kafka_offset",
            &[],
        )
        .await?;
    let offsets: Vec<i64> = exceptions.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        offsets,
        txns[BAD as usize - 1].1,
        "pgferry.exceptions holds the refused transaction's messages"
    );
    for r in &exceptions {
        let reason: String = r.get(1);
        assert!(
            reason.contains("skipped with its whole transaction") && reason.contains("not_bad"),
            "{reason}"
        );
    }

    // The refused transaction was inside a group: a group failed and went one by one; and the
    // rest of the backlog went in groups.
    let fallbacks = scrape(&addr, "pgferry_apply_group_fallbacks_total", &node, None).await?;
    assert!(fallbacks >= 1.0, "no group fell back to one by one\n{}", cluster.logs());
    assert!(
        groups_larger_than(&addr, &node, 100).await? > 0.0,
        "no group of more than 100 transactions"
    );
    assert_failed_group_was_large(&apply)?;

    drop((apply, _capture));
    cluster.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_refused_inside_a_group_holds_the_stream_under_stop() -> anyhow::Result<()> {
    const TXNS: i32 = 3_000;
    const BAD: i32 = 1_501;
    // `t`'s on_error is the default, stop.
    let (cluster, addr) = refusing_cluster("grpstop", "").await?;
    let node = cluster.nodes[1].name.clone();
    let _capture = cluster.spawn("capture", 0)?;
    write_backlog(&cluster, TXNS, BAD).await?;
    let txns = source_txns(&cluster)?;
    let last_lsn = txns.last().expect("transactions").0;
    let n2 = cluster.sql(1).await?;

    let mut apply = cluster.spawn_with("apply", 1, &["--metrics-listen", &addr])?;
    wait_until(
        "apply to report the rejected change",
        Duration::from_secs(60),
        || async { Ok(std::fs::read_to_string(&apply.log)?.contains("change rejected (on_error = stop)")) },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;
    // Held exactly where one by one holds: everything before the refused transaction is
    // applied, it and nothing after it is.
    assert_eq!(
        ids(&n2).await?,
        (1..BAD).collect::<Vec<_>>(),
        "rows of t on n2 while held"
    );
    assert_eq!(
        w_rows(&n2).await?,
        expected_w(BAD - 1, None),
        "last writers on n2 while held"
    );
    assert_eq!(
        progress_lsn(&cluster, &n2).await?,
        txns[BAD as usize - 2].0,
        "progress while held"
    );
    assert!(
        apply.try_wait()?.is_none(),
        "apply keeps running (retrying) while stopped"
    );
    let fallbacks = scrape(&addr, "pgferry_apply_group_fallbacks_total", &node, None).await?;
    assert!(fallbacks >= 1.0, "no group fell back to one by one\n{}", cluster.logs());
    assert_failed_group_was_large(&apply)?;

    // The operator fixes the cause; the stream goes on by itself, nothing lost or repeated.
    n2.batch_execute("ALTER TABLE t DROP CONSTRAINT not_bad").await?;
    wait_applied_to(&cluster, last_lsn, Duration::from_secs(60)).await?;
    assert_each_applied_once(&n2, TXNS).await?;
    assert_same_on_both(&cluster, 0).await?;
    assert!(
        groups_larger_than(&addr, &node, 100).await? > 0.0,
        "no group of more than 100 transactions"
    );

    drop((apply, _capture));
    cluster.cleanup().await
}

/// Apply's log says a group of more than one transaction failed and went one by one.
fn assert_failed_group_was_large(apply: &Service) -> anyhow::Result<()> {
    let log = without_colours(&std::fs::read_to_string(&apply.log)?);
    let sizes: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("a group failed"))
        .filter_map(|l| {
            l.split_once("transactions=")?
                .1
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect();
    anyhow::ensure!(
        sizes.iter().any(|n| *n > 1),
        "no failed group of more than one transaction in {}: {sizes:?}",
        apply.log.display()
    );
    Ok(())
}

/// `text` without its ANSI colour sequences (ESC [ … m).
fn without_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A group reads its rows without locking them (docs/decisions.md, "Grouped apply"), so a
/// local transaction can change a row between a group's read and its write. Here one does: n2
/// updates a "last writer" row of `w` in a transaction it holds open while n2's apply starts on
/// a backlog of n1's updates of that row; the group's update waits on the row, then finds
/// another version than it read, so the group fails and is tried again with the rows locked
/// (then one by one if need be), which weighs each remote update against n2's newer local
/// version. n2's write, the latest, must end on both nodes: a group that overwrote it would
/// leave n2 with n1's older value and n1 with n2's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_written_locally_between_a_groups_read_and_write_fails_the_group() -> anyhow::Result<()> {
    const TXNS: i32 = 400;
    let cluster = Cluster::start("grplocal", &["r1", "r1"], SETUP, &TABLES).await?;
    let node = cluster.nodes[1].name.clone();
    let (n1, n2) = (cluster.sql(0).await?, cluster.sql(1).await?);
    let captures = (cluster.spawn("capture", 0)?, cluster.spawn("capture", 1)?);
    let apply_n1 = cluster.spawn("apply", 0)?;
    // The rows exist on both nodes first.
    n1.batch_execute("INSERT INTO w SELECT g, 0 FROM generate_series(0, 3) g").await?;
    let addr = free_local_addr()?;
    let apply = cluster.spawn_with("apply", 1, &["--metrics-listen", &addr])?;
    wait_until("w's rows on n2", Duration::from_secs(60), || async {
        Ok(count(&n2, "SELECT count(*) FROM w").await? == 4)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;
    drop(apply);

    // A backlog of n1's updates of every row of `w` while n2's apply is stopped.
    write_backlog(&cluster, TXNS, 0).await?;
    let last_lsn = source_txns(&cluster)?.last().expect("transactions in the topic").0;

    // n2 changes row 2 in a transaction it holds open, then apply starts.
    let local = cluster.sql(1).await?;
    local.batch_execute("BEGIN; UPDATE w SET last = -1 WHERE id = 2").await?;
    let apply = cluster.spawn_with("apply", 1, &["--metrics-listen", &addr])?;
    let session = format!("pgferry-apply-{}-from-{}", node, cluster.nodes[0].name);
    wait_until("n2's apply to wait for the locally updated row", Duration::from_secs(60), || async {
        Ok(n2
            .query_opt(
                // (application_name is cut to 63 bytes)
                "SELECT 1 FROM pg_stat_activity WHERE application_name = left($1, 63) AND wait_event_type = 'Lock'",
                &[&session],
            )
            .await?
            .is_some())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;
    local.batch_execute("COMMIT").await?;

    wait_applied_to(&cluster, last_lsn, Duration::from_secs(60)).await?;
    wait_until("n2's local write of row 2 on n1", Duration::from_secs(60), || async {
        Ok(count(&n1, "SELECT last::int8 FROM w WHERE id = 2").await? == -1)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;
    let mut want = expected_w(TXNS, None);
    want[2].1 = -1;
    assert_eq!(w_rows(&n2).await?, want, "last writers on n2");
    assert_eq!(w_rows(&n1).await?, want, "last writers on n1");
    assert_same_on_both(&cluster, 0).await?;
    // The remote updates that met n2's newer version are recorded as conflicts n2's row won.
    assert!(
        count(&n2, "SELECT count(*) FROM pgferry.conflicts WHERE tbl = 'public.w' AND key = '[2]'").await? > 0,
        "no conflict recorded for row 2 on n2"
    );
    drop((apply, apply_n1, captures));
    cluster.cleanup().await
}
