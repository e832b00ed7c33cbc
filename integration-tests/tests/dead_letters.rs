//! Garbage in the topic — random bytes, a frame naming a schema id the registry does not have,
//! an event for a table that does not exist on the target, an event claiming an origin that is
//! not in the cluster: apply keeps running, each lands in the dead-letter topic with a reason
//! (and in `pgferry.exceptions`), and the valid events around them are applied.

use std::time::Duration;

use pgferry_integration_tests::{produce, read_topic, wait_until, Cluster};

const SETUP: &str = "
CREATE TABLE t (id int PRIMARY KEY, v text);
CREATE TABLE gone (id int PRIMARY KEY);";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_goes_to_the_dlq_and_the_rest_is_applied() -> anyhow::Result<()> {
    let cluster = Cluster::start("dlq", &["r1", "r1"], SETUP, &["public.t", "public.gone"]).await?;
    let n1 = cluster.sql(0).await?;
    let n2 = cluster.sql(1).await?;
    // The table exists where it was initialized, then disappears from the target.
    n2.batch_execute("DROP TABLE gone").await?;
    let _capture = cluster.spawn("capture", 0)?;
    let _apply = cluster.spawn("apply", 1)?;
    n1.batch_execute("INSERT INTO t VALUES (1, 'first')").await?;
    wait_until("the first row on n2", Duration::from_secs(60), || async {
        Ok(n2.query_one("SELECT count(*) FROM t", &[]).await?.get::<_, i64>(0) == 1)
    })
    .await?;

    let (kafka, topic) = (&cluster.endpoints.kafka, cluster.topic_of(0));
    let valid = read_topic(kafka, &topic)?
        .into_iter()
        .find(|m| m.header("pgferry-kind") == Some("change"))
        .ok_or_else(|| anyhow::anyhow!("no change event"))?;
    let n1_name = cluster.nodes[0].name.as_str();
    // Random bytes, no headers.
    produce(kafka, &topic, 0, None, &[0x13, 0x37, 0xde, 0xad, 0xbe, 0xef, 0x00, 0xff], &[])?;
    // A well-formed frame naming a schema id nobody registered.
    let mut unknown_id = vec![0u8, 0x7f, 0xff, 0xff, 0xf0];
    unknown_id.extend_from_slice(&valid.value[5..]);
    produce(kafka, &topic, 0, Some(&valid.key), &unknown_id, &[
        ("pgferry-origin", n1_name),
        ("pgferry-commit-lsn", "18446744073709551000"),
        ("pgferry-kind", "change"),
        ("pgferry-txn-last", "1"),
    ])?;
    // A valid event that claims to come from a node the cluster does not have.
    produce(kafka, &topic, 0, Some(&valid.key), &valid.value, &[
        ("pgferry-origin", "intruder"),
        ("pgferry-commit-lsn", "18446744073709551000"),
        ("pgferry-kind", "change"),
        ("pgferry-txn-last", "1"),
    ])?;
    // A transaction whose middle change is for the table the target no longer has.
    n1.batch_execute(
        "BEGIN; INSERT INTO t VALUES (2, 'before'); INSERT INTO gone VALUES (1); INSERT INTO t VALUES (3, 'after'); COMMIT;",
    )
    .await?;
    n1.batch_execute("INSERT INTO t VALUES (4, 'later')").await?;
    let (_, rows) = cluster.wait_converged("t", Duration::from_secs(60)).await?;
    assert_eq!(rows, 4, "the valid events around the garbage are applied");

    let dlq = read_topic(kafka, &format!("{}.dlq", cluster.name))?;
    let reasons: Vec<&str> = dlq.iter().filter_map(|m| m.header("pgferry-dlq-reason")).collect();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    for (needle, what) in [
        ("pgferry-origin header", "random bytes"),
        ("fetching schema id", "unknown schema id"),
        ("\"intruder\" is not a node", "unknown origin"),
        ("gone: table does not exist", "missing table"),
    ] {
        assert!(reasons.iter().any(|r| r.contains(needle)), "{what}: no reason containing {needle:?} in {reasons:?}");
    }
    // Kept whole: the dead-lettered messages carry their original bytes and where they came from.
    assert!(dlq.iter().any(|m| m.value == unknown_id));
    assert!(dlq.iter().all(|m| m.header("pgferry-dlq-source").is_some_and(|s| s.starts_with(&topic))));
    let exceptions: i64 = n2.query_one("SELECT count(*) FROM pgferry.exceptions", &[]).await?.get(0);
    assert_eq!(exceptions, 4);
    drop((_capture, _apply));
    cluster.cleanup().await
}
