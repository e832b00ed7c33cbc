//! SIGKILL in the middle of a transaction stream: apply twice in 20k transactions, capture five
//! times at random moments in a load of at least 100k that lasts until the last kill. The
//! target ends equal to the source, every source transaction is applied exactly once (no row met
//! again, every row stamped with its own source transaction's commit time, grouped or not) and is
//! in the topic exactly once, in commit order.

use std::collections::BTreeMap;
use std::time::Duration;

use pgferry_integration_tests::{read_topic, wait_until, Cluster};

const SETUP: &str = "
CREATE TABLE log (id bigint PRIMARY KEY, payload text);
CREATE TABLE counter (id int PRIMARY KEY, n bigint NOT NULL);
INSERT INTO counter VALUES (1, 0);
CREATE PROCEDURE gen(first bigint, count int) LANGUAGE plpgsql AS $$
BEGIN
  FOR i IN first..first + count - 1 LOOP
    INSERT INTO log VALUES (i, md5(i::text));
    UPDATE counter SET n = n + 1 WHERE id = 1;
    COMMIT;
  END LOOP;
END $$;";

const TXNS: i64 = 20_000;
/// The capture test's load: at least this many transactions, and on until the last kill.
const CAPTURE_TXNS: i64 = 100_000;

/// Starts a load of `txns` transactions on n1 in the background.
async fn start_load(cluster: &Cluster, txns: i64) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let n1 = cluster.sql(0).await?;
    Ok(tokio::spawn(async move {
        // Separate statements: a multi-statement query is one transaction, where COMMIT is not allowed.
        n1.batch_execute("SET synchronous_commit = off").await?;
        n1.batch_execute(&format!("CALL gen(1, {txns})")).await?;
        Ok(())
    }))
}

/// Starts a load on n1 in chunks of 5,000 transactions that goes on until `stop` is set and at
/// least `min` are committed; the task returns how many it committed.
async fn start_endless_load(
    cluster: &Cluster,
    min: i64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<i64>>> {
    let n1 = cluster.sql(0).await?;
    Ok(tokio::spawn(async move {
        n1.batch_execute("SET synchronous_commit = off").await?;
        let mut done = 0i64;
        while done < min || !stop.load(std::sync::atomic::Ordering::SeqCst) {
            n1.batch_execute(&format!("CALL gen({}, 5000)", done + 1)).await?;
            done += 5000;
        }
        Ok(done)
    }))
}

/// The confirmed flush LSN of node 0's slot.
async fn confirmed_lsn(cluster: &Cluster) -> anyhow::Result<u64> {
    let slot = cluster.slot_of(0);
    let lsn: String = cluster
        .sql(0)
        .await?
        .query_one(
            "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .get(0);
    Ok(lsn.parse()?)
}


/// `id → stamp` as `sql` returns them.
async fn stamps(c: &tokio_postgres::Client, sql: &str) -> anyhow::Result<BTreeMap<i64, i64>> {
    Ok(c.query(sql, &[]).await?.iter().map(|r| (r.get(0), r.get(1))).collect())
}

async fn count_log(cluster: &Cluster, node: usize) -> anyhow::Result<i64> {
    Ok(cluster
        .sql(node)
        .await?
        .query_one("SELECT count(*) FROM log", &[])
        .await?
        .get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_killed_mid_stream_resumes_exactly() -> anyhow::Result<()> {
    let cluster = Cluster::start("killapply", &["r1", "r1"], SETUP, &["public.log", "public.counter"]).await?;
    let _capture = cluster.spawn("capture", 0)?;
    let mut apply = cluster.spawn("apply", 1)?;
    let load = start_load(&cluster, TXNS).await?;
    for threshold in [2_000, 8_000] {
        wait_until("n2 to be part-way", Duration::from_secs(120), || async {
            Ok(count_log(&cluster, 1).await? >= threshold)
        })
        .await?;
        apply.kill();
        apply = cluster.spawn("apply", 1)?;
    }
    load.await??;
    cluster.wait_converged("log", Duration::from_secs(180)).await?;
    let (_, rows) = cluster.wait_converged("counter", Duration::from_secs(60)).await?;
    assert_eq!(rows, 1);
    let n2 = cluster.sql(1).await?;
    let n: i64 = n2.query_one("SELECT n FROM counter", &[]).await?.get(0);
    assert_eq!(n, TXNS);
    // Never repeated: a transaction applied twice would meet its own log row (insert_exists).
    // (The counter row, which both nodes created, meets one update_origin_differs.)
    let conflicts: i64 = n2
        .query_one("SELECT count(*) FROM pgferry.conflicts WHERE tbl = 'public.log'", &[])
        .await?
        .get(0);
    assert_eq!(conflicts, 0, "a source transaction was applied more than once");
    // Never merged into another's stamp: each row carries its own source transaction's commit
    // time, whether it was applied alone or in a group (then the group's record for its version).
    let source = stamps(
        &cluster.sql(0).await?,
        "SELECT id, (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1000000)::int8 FROM log",
    )
    .await?;
    let applied = stamps(
        &n2,
        "SELECT t.id, coalesce(s.ts_us, pgferry.group_stamp('public.log', jsonb_build_array(t.id), t.xmin),
                              (extract(epoch FROM pg_xact_commit_timestamp(t.xmin)) * 1000000)::int8)
         FROM log t LEFT JOIN pgferry.row_stamps s
           ON s.tbl = 'public.log' AND s.key = jsonb_build_array(t.id) AND s.xid % 4294967296 = t.xmin::text::int8",
    )
    .await?;
    assert_eq!(source.len() as i64, TXNS);
    let differing = source.iter().filter(|(id, ts)| applied.get(id) != Some(ts)).count();
    assert_eq!(differing, 0, "rows on n2 whose stamp is not their source transaction's commit time");
    drop((apply, _capture));
    cluster.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_killed_at_random_moments_produces_each_transaction_once() -> anyhow::Result<()> {
    let cluster = Cluster::start("killcapture", &["r1", "r1"], SETUP, &["public.log", "public.counter"]).await?;
    let seed = std::env::var("PGFERRY_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1);
    eprintln!("capture kill schedule: PGFERRY_KILL_SEED={seed}");
    let mut schedule = pgferry_integration_tests::XorShift(seed);
    let mut capture = cluster.spawn("capture", 0)?;
    let _apply = cluster.spawn("apply", 1)?;
    // The load lasts until the last kill, so that every kill lands while capture has work left
    // (a load of a fixed size could end before the kills on a busy machine).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = start_endless_load(&cluster, CAPTURE_TXNS, stop.clone()).await?;
    let mut killed_at = Vec::new();
    for _ in 0..5 {
        // Each kill lands while capture is working: after its restart has confirmed something
        // new, at a random point up to 1.5 s later (this sleep is the fault schedule, not a
        // wait for a state).
        let before = confirmed_lsn(&cluster).await?;
        wait_until("capture to confirm progress after its restart", Duration::from_secs(120), || async {
            Ok(confirmed_lsn(&cluster).await? > before)
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(schedule.below(1500))).await;
        capture.kill();
        killed_at.push(confirmed_lsn(&cluster).await?);
        capture = cluster.spawn("capture", 0)?;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let total = load.await??;
    cluster.wait_converged("log", Duration::from_secs(600)).await?;
    cluster.wait_converged("counter", Duration::from_secs(60)).await?;
    let n: i64 = cluster.sql(1).await?.query_one("SELECT n FROM counter", &[]).await?.get(0);
    assert_eq!(n, total);
    drop(capture);

    // Exactly once in Kafka: every transaction of the load, 2 events each, in commit-LSN order.
    let messages = read_topic(&cluster.endpoints.kafka, &cluster.topic_of(0))?;
    let mut txns: BTreeMap<u64, (u32, u32)> = BTreeMap::new();
    let mut previous = 0u64;
    for m in messages
        .iter()
        .filter(|m| m.partition == 0 && m.header("pgferry-kind") == Some("change"))
    {
        let lsn: u64 = m.header("pgferry-commit-lsn").expect("commit lsn").parse()?;
        assert!(lsn >= previous, "commit LSNs out of order at offset {}", m.offset);
        previous = lsn;
        let t = txns.entry(lsn).or_default();
        t.0 += 1;
        if m.header("pgferry-txn-last") == Some("1") {
            t.1 += 1;
        }
    }
    assert_eq!(txns.len() as i64, total, "source transactions in the topic");
    for (lsn, (events, lasts)) in &txns {
        assert_eq!((*events, *lasts), (2, 1), "transaction {lsn}");
    }
    // Every kill interrupted a capture with work left: its confirmed position was before the
    // last transaction's commit.
    assert!(killed_at.iter().all(|k| *k < previous), "kills at {killed_at:?}, last commit {previous}");
    cluster.cleanup().await
}
