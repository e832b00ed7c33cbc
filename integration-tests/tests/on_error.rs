//! A change the target refuses (here: a CHECK constraint that only n2 has) follows its table's
//! `on_error`: `skip_change` skips that change and applies the rest of its transaction;
//! `skip_transaction` skips the whole source transaction; `stop` (the default) holds the
//! stream at the change until the cause is fixed, then goes on with nothing lost. Whatever is
//! skipped is in the dead-letter topic and `pgferry.exceptions`, whole.

use std::time::Duration;

use pgferry_integration_tests::{read_topic, wait_until, Cluster};

const SETUP: &str = "
CREATE TABLE by_change (id int PRIMARY KEY, v text);
CREATE TABLE by_txn (id int PRIMARY KEY, v text);
CREATE TABLE by_stop (id int PRIMARY KEY, v text);";

async fn ids(c: &tokio_postgres::Client, table: &str) -> anyhow::Result<Vec<i32>> {
    let rows = c.query(&format!("SELECT id FROM {table} ORDER BY id"), &[]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_changes_follow_the_tables_on_error() -> anyhow::Result<()> {
    let tables = ["public.by_change", "public.by_txn", "public.by_stop"];
    let mut cluster = Cluster::create("onerr", &["r1", "r1"], SETUP, &tables).await?;
    cluster.replication_toml = "[replication.table.\"public.by_change\"]\non_error = \"skip_change\"\n\
         [replication.table.\"public.by_txn\"]\non_error = \"skip_transaction\"\n"
        .into();
    cluster.write_config()?;
    cluster.init()?;
    let n1 = cluster.sql(0).await?;
    let n2 = cluster.sql(1).await?;
    for t in ["by_change", "by_txn", "by_stop"] {
        n2.batch_execute(&format!("ALTER TABLE {t} ADD CONSTRAINT not_bad CHECK (v <> 'bad')")).await?;
    }
    let _capture = cluster.spawn("capture", 0)?;
    let mut apply = cluster.spawn("apply", 1)?;

    // skip_change: the bad row alone is skipped.
    n1.batch_execute(
        "BEGIN; INSERT INTO by_change VALUES (1, 'ok'), (2, 'bad'), (3, 'ok'); UPDATE by_change SET v = 'fine' WHERE id = 3; COMMIT;",
    )
    .await?;
    // skip_transaction: nothing of the transaction is applied, the next one is.
    n1.batch_execute("BEGIN; INSERT INTO by_txn VALUES (1, 'ok'), (2, 'ok'), (3, 'bad'), (4, 'ok'); COMMIT;").await?;
    n1.batch_execute("INSERT INTO by_txn VALUES (5, 'next')").await?;
    wait_until("the transaction after the skipped one on n2", Duration::from_secs(60), || async {
        Ok(ids(&n2, "by_txn").await? == vec![5])
    })
    .await?;
    assert_eq!(ids(&n2, "by_change").await?, vec![1, 3]);
    let v3: String = n2.query_one("SELECT v FROM by_change WHERE id = 3", &[]).await?.get(0);
    assert_eq!(v3, "fine", "the rest of the skip_change transaction is applied");

    // stop: the stream holds at the bad row; later transactions wait behind it.
    n1.batch_execute("INSERT INTO by_stop VALUES (1, 'bad')").await?;
    n1.batch_execute("INSERT INTO by_stop VALUES (2, 'after')").await?;
    wait_until("apply to report the rejected change", Duration::from_secs(60), || async {
        Ok(cluster.logs().contains("change rejected (on_error = stop)"))
    })
    .await?;
    assert!(ids(&n2, "by_stop").await?.is_empty(), "nothing passes a stopped change");
    assert!(apply.try_wait()?.is_none(), "apply keeps running (retrying) while stopped");
    // The operator fixes the cause; the stream goes on by itself.
    n2.batch_execute("ALTER TABLE by_stop DROP CONSTRAINT not_bad").await?;
    wait_until("the held rows on n2", Duration::from_secs(90), || async {
        Ok(ids(&n2, "by_stop").await? == vec![1, 2])
    })
    .await?;

    // Skipped means kept: each skipped message is in the DLQ and in pgferry.exceptions, with
    // the reason; the skipped transaction is there whole (4 inserts).
    let dlq = read_topic(&cluster.endpoints.kafka, &format!("{}.dlq", cluster.name))?;
    let reasons: Vec<&str> = dlq.iter().filter_map(|m| m.header("pgferry-dlq-reason")).collect();
    let change = reasons.iter().filter(|r| r.contains("skipped change") && r.contains("public.by_change")).count();
    let txn = reasons.iter().filter(|r| r.contains("skipped with its whole transaction")).count();
    assert_eq!((change, txn, reasons.len()), (1, 4, 5), "{reasons:?}");
    assert!(reasons.iter().all(|r| r.contains("not_bad")), "the reason names the constraint: {reasons:?}");
    let exceptions: i64 = n2.query_one("SELECT count(*) FROM pgferry.exceptions", &[]).await?.get(0);
    assert_eq!(exceptions, 5);
    // Nothing skipped is retried: the skipped transaction counts as done in the origin's progress.
    n1.batch_execute("INSERT INTO by_txn VALUES (6, 'last')").await?;
    wait_until("the last row", Duration::from_secs(60), || async { Ok(ids(&n2, "by_txn").await? == vec![5, 6]) }).await?;
    drop((_capture, apply));
    cluster.cleanup().await
}
