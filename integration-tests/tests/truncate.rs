//! TRUNCATE replicates in order with the row changes around it, inside its transaction.

use std::time::Duration;

use pgferry_integration_tests::{read_topic, Cluster};

const SETUP: &str = "
CREATE TABLE a (id int PRIMARY KEY, v text);
CREATE TABLE b (id int PRIMARY KEY, v text);";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_replicates_in_order() -> anyhow::Result<()> {
    let cluster = Cluster::start("trunc", &["r1", "r1"], SETUP, &["public.a", "public.b"]).await?;
    let _capture = cluster.spawn("capture", 0)?;
    let _apply = cluster.spawn("apply", 1)?;
    let n1 = cluster.sql(0).await?;
    n1.batch_execute(
        "INSERT INTO a SELECT g, 'old' FROM generate_series(1, 100) g;
         INSERT INTO b SELECT g, 'old' FROM generate_series(1, 50) g;",
    )
    .await?;
    cluster.wait_converged("a", Duration::from_secs(60)).await?;
    cluster.wait_converged("b", Duration::from_secs(60)).await?;

    // Rows before and after the TRUNCATE in the same transaction: only the later ones survive.
    n1.batch_execute(
        "BEGIN;
         INSERT INTO a VALUES (1000, 'gone');
         TRUNCATE a, b;
         INSERT INTO a VALUES (1, 'new'), (2, 'new');
         COMMIT;",
    )
    .await?;
    let (_, rows_a) = cluster.wait_converged("a", Duration::from_secs(60)).await?;
    let (_, rows_b) = cluster.wait_converged("b", Duration::from_secs(60)).await?;
    assert_eq!((rows_a, rows_b), (2, 0));
    let n2 = cluster.sql(1).await?;
    let v: String = n2
        .query_one("SELECT string_agg(v, ',' ORDER BY id) FROM a", &[])
        .await?
        .get(0);
    assert_eq!(v, "new,new");

    let truncates = read_topic(&cluster.endpoints.kafka, &cluster.topic_of(0))?
        .into_iter()
        .filter(|m| m.header("pgferry-kind") == Some("truncate"))
        .count();
    assert_eq!(truncates, 2, "one truncate event per table");
    drop((_capture, _apply));
    cluster.cleanup().await
}
