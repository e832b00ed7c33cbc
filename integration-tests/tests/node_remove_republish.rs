//! Issue 16, scenario 14, third part: does `node remove`, by dropping the removed node's
//! replication origin on a reader before that reader's capture has read what its apply wrote
//! under it, make that capture publish those transactions again as the reader's own? pgoutput
//! sends a transaction's Origin message (which capture skips applied transactions by) only if it
//! can look the origin's name up when it decodes the transaction.
//!
//! It does not: decoding reads catalogs, `pg_replication_origin` included, in the historic
//! snapshot of the transaction being decoded, where the dropped origin's row is still there; and
//! the reader's slot holds its `catalog_xmin` back, so VACUUM cannot remove that row version
//! before capture has decoded past it. So `node remove` need not wait for the readers' capture.
//!
//! The test builds the worst case: n1's capture is down while its apply writes 20 of n3's
//! transactions; n3 stops and is removed, and n1's origin of n3 is dropped (and
//! `pg_replication_origin` vacuumed) before n1's capture runs again. n1's partition then holds no
//! change of n1's but its own one, n2 records no conflict, and n3's delta counter is exact.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Result;
use pgferry_integration_tests::{pgferry_bin, read_topic, wait_until, Cluster};

const SETUP: &str = "
CREATE TABLE t (id bigint PRIMARY KEY, node text NOT NULL);
CREATE TABLE counters (node text PRIMARY KEY, n bigint NOT NULL);
ALTER TABLE counters REPLICA IDENTITY FULL;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_remove_with_a_readers_capture_behind_republishes_nothing() -> Result<()> {
    let mut cluster = Cluster::create("rmrepub", &["r1", "r1", "r1"], SETUP, &["public.t", "public.counters"]).await?;
    cluster.replication_toml = "[replication.table.\"public.counters\"]\ndelta_columns = [\"n\"]".into();
    cluster.write_config()?;
    cluster.init()?;
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    let n3 = cluster.sql(2).await?;
    n3.batch_execute(&format!("INSERT INTO counters VALUES ('{}', 0)", names[2]))
        .await?;
    // n1: apply only (its capture is down); n2 and n3: both.
    let apply1 = cluster.spawn("apply", 0)?;
    let run2 = cluster.spawn("run", 1)?;
    let run3 = cluster.spawn("run", 2)?;
    cluster.wait_converged("counters", Duration::from_secs(60)).await?;
    const TXNS: i64 = 20;
    for k in 1..=TXNS {
        n3.batch_execute(&format!(
            "BEGIN; INSERT INTO t VALUES ({}, '{1}'); UPDATE counters SET n = n + 1 WHERE node = '{1}'; COMMIT",
            3_000_000 + k,
            names[2]
        ))
        .await?;
    }
    let (_, rows) = cluster.wait_converged("t", Duration::from_secs(90)).await?;
    assert_eq!(rows, TXNS);
    cluster.wait_converged("counters", Duration::from_secs(60)).await?;

    // n3 stops for good and is removed; its output goes to a file we can watch.
    drop(run3);
    let out_path = cluster.dir.join("node-remove.out");
    let mut removing = Command::new(pgferry_bin())
        .arg("--config")
        .arg(&cluster.config_path)
        .args(["node", "remove", &names[2], "--timeout", "180"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&out_path)?)
        .spawn()?;
    wait_until("the config without n3", Duration::from_secs(120), || {
        let ended = removing.try_wait();
        async {
            if let Some(status) = ended? {
                anyhow::bail!(
                    "node remove ended early ({status}): {}",
                    std::fs::read_to_string(&out_path)?
                );
            }
            Ok(!std::fs::read_to_string(&cluster.config_path)?.contains(&format!("\"{}\"", names[2])))
        }
    })
    .await?;
    // The applies restart with the new config, letting go of n3's origin; the command drops it
    // on n1 while n1's capture is still down.
    drop(apply1);
    let apply1 = cluster.spawn("apply", 0)?;
    drop(run2);
    let run2 = cluster.spawn("run", 1)?;
    wait_until("node remove to finish", Duration::from_secs(120), || {
        let ended = removing.try_wait();
        async move { Ok(ended?.is_some()) }
    })
    .await?;
    let output = std::fs::read_to_string(&out_path)?;
    eprintln!("{output}");
    assert!(removing.wait()?.success(), "node remove failed: {output}");
    let n1 = cluster.sql(0).await?;
    for i in [0, 1] {
        let left: i64 = cluster
            .sql(i)
            .await?
            .query_one(
                "SELECT count(*) FROM pg_replication_origin WHERE roname = $1",
                &[&cluster.origin_on(i, &names[2])],
            )
            .await?
            .get(0);
        assert_eq!(left, 0, "n3's origin is dropped on {}", names[i]);
    }
    let behind: bool = n1
        .query_one(
            "SELECT confirmed_flush_lsn < pg_current_wal_insert_lsn() FROM pg_replication_slots WHERE slot_name = $1",
            &[&cluster.slot_of(0)],
        )
        .await?
        .get(0);
    assert!(behind, "n1's capture has not read n3's rows yet");
    n1.batch_execute("VACUUM pg_catalog.pg_replication_origin").await?;

    // n1's capture comes back and reads n3's rows with their origin gone.
    let capture1 = cluster.spawn("capture", 0)?;
    n1.batch_execute("INSERT INTO t VALUES (1000001, 'n1 after the removal')")
        .await?;
    let mut rest = cluster.clone();
    rest.nodes.truncate(2);
    let (_, rows) = rest.wait_converged("t", Duration::from_secs(90)).await?;
    assert_eq!(rows, TXNS + 1);
    // n1's own row came after n3's in its WAL: once it is in Kafka, n3's have been read.
    let messages = read_topic(&cluster.endpoints.kafka, &cluster.topic_of(0))?;
    let n1_changes = messages
        .iter()
        .filter(|m| m.header("pgferry-origin") == Some(names[0].as_str()) && m.header("pgferry-kind") == Some("change"))
        .count();
    let conflicts: i64 = rest
        .sql(1)
        .await?
        .query_one("SELECT count(*) FROM pgferry.conflicts", &[])
        .await?
        .get(0);
    eprintln!("n1's change events in its partition: {n1_changes}; conflicts on n2: {conflicts}");
    assert_eq!(
        n1_changes, 1,
        "n1 published its own row only, none of n3's rows as its own"
    );
    assert_eq!(conflicts, 0, "n2 met no change of n3's again");
    let (_, counters) = rest.wait_converged("counters", Duration::from_secs(60)).await?;
    assert_eq!(counters, 1);
    let n: i64 = rest
        .sql(1)
        .await?
        .query_one("SELECT n FROM counters WHERE node = $1", &[&names[2]])
        .await?
        .get(0);
    assert_eq!(n, TXNS, "n3's counter counted once on n2");
    drop((apply1, run2, capture1));
    cluster.cleanup().await
}
