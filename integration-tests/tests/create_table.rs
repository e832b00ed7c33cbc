//! A schema replicated whole (`replication.schemas`): a table created on n3 after start-up
//! replicates its rows without any manual step — the `CREATE TABLE` reaches n1 and n2 in order
//! with its first rows, every node sets up the table's tombstone trigger, deletes replicate, and
//! the registry holds the new table's schema.

use std::time::Duration;

use pgferry_integration_tests::{wait_until, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_table_in_a_replicated_schema_replicates_by_itself() -> anyhow::Result<()> {
    let mut cluster = Cluster::create(
        "newtable",
        &["r1", "r1", "r2"],
        "CREATE SCHEMA app; CREATE TABLE app.existing (id int PRIMARY KEY, v text);",
        &[],
    )
    .await?;
    cluster.replication_toml = "schemas = [\"app\"]\nddl = true".into();
    cluster.write_config()?;
    cluster.init()?;
    let _services: Vec<_> = (0..3).map(|i| cluster.spawn("run", i)).collect::<Result<_, _>>()?;
    let n3 = cluster.sql(2).await?;
    n3.batch_execute("INSERT INTO app.existing VALUES (1, 'before')").await?;
    cluster.wait_converged("app.existing", Duration::from_secs(60)).await?;

    n3.batch_execute("CREATE TABLE app.fresh (id int PRIMARY KEY, v text NOT NULL)").await?;
    n3.batch_execute("INSERT INTO app.fresh SELECT g, 'row ' || g FROM generate_series(1, 50) g").await?;
    n3.batch_execute("DELETE FROM app.fresh WHERE id > 40").await?;
    for i in 0..2 {
        let c = cluster.sql(i).await?;
        wait_until(&format!("app.fresh with 40 rows on node {}", i + 1), Duration::from_secs(60), || async {
            let exists: bool = c.query_one("SELECT to_regclass('app.fresh') IS NOT NULL", &[]).await?.get(0);
            Ok(exists && c.query_one("SELECT count(*) FROM app.fresh", &[]).await?.get::<_, i64>(0) == 40)
        })
        .await?;
    }
    let (_, rows) = cluster.wait_converged("app.fresh", Duration::from_secs(60)).await?;
    assert_eq!(rows, 40);
    // Every node set up the new table's tombstone trigger (deletes there leave tombstones).
    for i in 0..3 {
        let c = cluster.sql(i).await?;
        let triggers: i64 = c
            .query_one("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'app.fresh'::regclass AND tgname = 'pgferry_tombstone'", &[])
            .await?
            .get(0);
        assert_eq!(triggers, 1, "node {}: tombstone trigger on the new table", i + 1);
    }
    let subjects: Vec<String> = reqwest::get(format!("{}/subjects", cluster.endpoints.registry)).await?.json().await?;
    assert!(
        subjects.iter().any(|s| s.starts_with(&cluster.name) && s.contains(".fresh.")),
        "the new table's schema is registered: {subjects:?}"
    );
    // And it replicates the other way too: n1 writes, n3 gets it.
    cluster.sql(0).await?.batch_execute("UPDATE app.fresh SET v = 'from n1' WHERE id = 1").await?;
    wait_until("n1's update on n3", Duration::from_secs(60), || async {
        Ok(n3.query_one("SELECT v FROM app.fresh WHERE id = 1", &[]).await?.get::<_, String>(0) == "from n1")
    })
    .await?;
    drop(_services);
    cluster.cleanup().await
}
