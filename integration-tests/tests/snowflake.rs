//! Snowflake ids: three nodes insert 100,000 rows concurrently into a replicated table whose key
//! defaults to `pgferry.snowflake_nextval(seq)`. Every node ends with all 100,000 rows (no id was
//! issued twice, or a primary-key collision would have lost a row as a conflict), and each id
//! decodes to the id of the node that wrote it, at about the time it was written.

use std::time::Duration;

use pgferry_integration_tests::Cluster;

const PER_NODE: i64 = 33_334;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_nodes_never_issue_the_same_id() -> anyhow::Result<()> {
    // The table's default needs the function: create the table after init installed it.
    let cluster = Cluster::start("snow", &["r1", "r1", "r2"], "CREATE TABLE t (id bigint PRIMARY KEY, writer int NOT NULL);", &["public.t"]).await?;
    for i in 0..3 {
        cluster
            .sql(i)
            .await?
            .batch_execute(
                // On each node by hand, so kept local (not replicated as DDL).
                "SET pgferry.local_ddl = on;
                 CREATE SEQUENCE t_seq; ALTER TABLE t ALTER COLUMN id SET DEFAULT pgferry.snowflake_nextval('t_seq');
                 RESET pgferry.local_ddl;",
            )
            .await?;
    }
    let _services: Vec<_> = (0..3).map(|i| cluster.spawn("run", i)).collect::<Result<_, _>>()?;
    let write = |i: usize| {
        let cluster = &cluster;
        async move {
            let c = cluster.sql(i).await?;
            let id = cluster.nodes[i].id as i32;
            // Many small transactions, all three nodes at once.
            for _ in 0..(PER_NODE / 1000 + 1) {
                c.execute("INSERT INTO t (writer) SELECT $1 FROM generate_series(1, 1000)", &[&id]).await?;
            }
            anyhow::Ok(())
        }
    };
    futures::future::try_join3(write(0), write(1), write(2)).await?;
    let total = 3 * (PER_NODE / 1000 + 1) * 1000;
    let (_, rows) = cluster.wait_converged("t", Duration::from_secs(180)).await?;
    assert_eq!(rows, total, "every row on every node: no id issued twice");
    for i in 0..3 {
        let c = cluster.sql(i).await?;
        let bad: i64 = c
            .query_one(
                "SELECT count(*) FROM t WHERE pgferry.snowflake_node(id) <> writer
                    OR pgferry.snowflake_time(id) NOT BETWEEN now() - interval '10 minutes' AND now() + interval '1 minute'",
                &[],
            )
            .await?
            .get(0);
        assert_eq!(bad, 0, "node {i}: every id decodes to its writer's node id and its time");
        let conflicts: i64 = c.query_one("SELECT count(*) FROM pgferry.conflicts", &[]).await?.get(0);
        assert_eq!(conflicts, 0, "node {i}: no key collided");
    }
    drop(_services);
    cluster.cleanup().await
}
