//! DDL replication: `ALTER TABLE … ADD COLUMN` and `CREATE INDEX` run on n2 while n1 and n3 write
//! to the table reach every node in order with the rows around them: afterwards the column and
//! the index exist everywhere, rows written after the change carry their values on all nodes,
//! and the registry holds the table's new schema version. DDL sent in one query string with
//! other statements is refused.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgferry_integration_tests::{wait_until, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_column_while_others_write_reaches_every_node() -> anyhow::Result<()> {
    let mut cluster = Cluster::create("ddl", &["r1", "r1", "r2"], "CREATE TABLE t (id int PRIMARY KEY, v text, node text);", &["public.t"]).await?;
    cluster.replication_toml = "ddl = true".into();
    cluster.write_config()?;
    cluster.init()?;
    let _services: Vec<_> = (0..3).map(|i| cluster.spawn("run", i)).collect::<Result<_, _>>()?;
    let stop = Arc::new(AtomicBool::new(false));
    // n1 and n3 write all along; once they see the column they fill it too.
    let writer = |i: usize, base: i32| {
        let (cluster, stop) = (&cluster, stop.clone());
        async move {
            let c = cluster.sql(i).await?;
            let mut k = 0;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                let has_extra: bool = c
                    .query_one("SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 't'::regclass AND attname = 'extra')", &[])
                    .await?
                    .get(0);
                let sql = if has_extra {
                    "INSERT INTO t (id, v, node, extra) VALUES ($1, 'x', $2, 'set-' || $2)"
                } else {
                    "INSERT INTO t (id, v, node) VALUES ($1, 'x', $2)"
                };
                c.execute(sql, &[&(base + k), &format!("n{}", i + 1)]).await?;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok(k)
        }
    };
    let writes = futures::future::try_join(writer(0, 1_000_000), writer(2, 3_000_000));
    let change = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let n2 = cluster.sql(1).await?;
        n2.batch_execute("ALTER TABLE t ADD COLUMN extra text DEFAULT 'default'").await?;
        n2.batch_execute("CREATE INDEX t_extra ON t (extra)").await?;
        n2.batch_execute("INSERT INTO t (id, v, node, extra) VALUES (2000001, 'x', 'n2', 'set-n2')").await?;
        // Every node has the column before the writers stop, so both sides wrote with it.
        for i in [0, 2] {
            let c = cluster.sql(i).await?;
            wait_until("the column on every node", Duration::from_secs(60), || async {
                Ok(c.query_one("SELECT count(*) FROM pg_attribute WHERE attrelid = 't'::regclass AND attname = 'extra'", &[])
                    .await?
                    .get::<_, i64>(0)
                    == 1)
            })
            .await?;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, Ordering::Relaxed);
        anyhow::Ok(())
    };
    let ((w1, w3), ()) = tokio::try_join!(writes, change)?;
    eprintln!("rows written: n1 {w1}, n3 {w3}");
    let (_, rows) = cluster.wait_converged("t", Duration::from_secs(120)).await?;
    assert_eq!(rows, (w1 + w3 + 1) as i64);
    for i in 0..3 {
        let c = cluster.sql(i).await?;
        let set: i64 = c.query_one("SELECT count(*) FROM t WHERE extra LIKE 'set-%'", &[]).await?.get(0);
        let per_node: i64 = c
            .query_one("SELECT count(DISTINCT node) FROM t WHERE extra = 'set-' || node", &[])
            .await?
            .get(0);
        assert!(set > 3 && per_node == 3, "node {i}: rows written after the change carry values from every node ({set}, {per_node})");
        let index: i64 = c.query_one("SELECT count(*) FROM pg_indexes WHERE indexname = 't_extra'", &[]).await?.get(0);
        assert_eq!(index, 1, "node {i}: the index was replicated");
    }
    // DDL in a query string with other statements is refused (they would run again on every
    // node), and nothing of it happens.
    let n2 = cluster.sql(1).await?;
    let err = n2
        .batch_execute("ALTER TABLE t ADD COLUMN bad int; INSERT INTO t (id, v, node) VALUES (9000001, 'x', 'n2')")
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("a multi-statement DDL string was accepted"))?;
    let message = err.as_db_error().map(|e| e.message().to_string()).unwrap_or_default();
    assert!(message.contains("statement of its own"), "{message}");
    let bad: i64 = n2
        .query_one("SELECT count(*) FROM pg_attribute WHERE attrelid = 't'::regclass AND attname = 'bad'", &[])
        .await?
        .get(0);
    assert_eq!(bad, 0);
    // The registry holds a second version of the table's value schema.
    let subjects: Vec<String> = reqwest::get(format!("{}/subjects", cluster.endpoints.registry)).await?.json().await?;
    let subject = subjects
        .iter()
        .find(|s| s.starts_with(&cluster.name) && s.contains(".t.Envelope"))
        .ok_or_else(|| anyhow::anyhow!("no envelope subject of t in {subjects:?}"))?;
    let versions: Vec<i64> = reqwest::get(format!("{}/subjects/{subject}/versions", cluster.endpoints.registry))
        .await?
        .json()
        .await?;
    assert!(versions.len() >= 2, "{subject}: {versions:?}");
    drop(_services);
    cluster.cleanup().await
}

/// `DROP INDEX` of an index on a replicated table and `DROP TABLE` of a replicated table reach
/// the other nodes; dropping an index of a table that does not replicate stays local.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_reach_every_node() -> anyhow::Result<()> {
    let setup = "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE INDEX t_v ON t (v);
                 CREATE TABLE gone (id int PRIMARY KEY); CREATE TABLE marker (id int PRIMARY KEY);
                 CREATE TABLE local_only (id int PRIMARY KEY, v text); CREATE INDEX local_v ON local_only (v);";
    let mut cluster = Cluster::create("ddldrop", &["r1", "r1"], setup, &["public.t", "public.gone", "public.marker"]).await?;
    cluster.replication_toml = "ddl = true".into();
    cluster.write_config()?;
    cluster.init()?;
    let _services: Vec<_> = (0..2).map(|i| cluster.spawn("run", i)).collect::<Result<_, _>>()?;
    let (n1, n2) = (cluster.sql(0).await?, cluster.sql(1).await?);
    n1.batch_execute("INSERT INTO gone VALUES (1)").await?;
    cluster.wait_converged("gone", Duration::from_secs(60)).await?;
    n1.batch_execute("DROP INDEX local_v").await?;
    n1.batch_execute("DROP INDEX t_v").await?;
    n1.batch_execute("DROP TABLE gone").await?;
    n1.batch_execute("INSERT INTO marker VALUES (1)").await?;
    cluster.wait_converged("marker", Duration::from_secs(60)).await?;
    let count = |sql: &'static str| {
        let n2 = &n2;
        async move { anyhow::Ok(n2.query_one(sql, &[]).await?.get::<_, i64>(0)) }
    };
    assert_eq!(count("SELECT count(*) FROM pg_indexes WHERE indexname = 't_v'").await?, 0, "DROP INDEX replicated");
    assert_eq!(count("SELECT count(*) FROM pg_tables WHERE tablename = 'gone'").await?, 0, "DROP TABLE replicated");
    assert_eq!(
        count("SELECT count(*) FROM pg_indexes WHERE indexname = 'local_v'").await?,
        1,
        "the index of a table that does not replicate stayed"
    );
    // The cluster goes on with the rest.
    n2.batch_execute("INSERT INTO t VALUES (1, 'after the drops')").await?;
    cluster.wait_converged("t", Duration::from_secs(60)).await?;
    drop(_services);
    cluster.cleanup().await
}

/// A replicated statement a node refuses follows `on_error`: under `skip_change` it is recorded
/// in `pgferry.exceptions` and the dead-letter topic, never silently dropped, and the stream
/// goes on with the changes after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_ddl_follows_on_error() -> anyhow::Result<()> {
    let mut cluster = Cluster::create("ddlrefused", &["r1", "r1"], "CREATE TABLE t (id int PRIMARY KEY, v text);", &["public.t"]).await?;
    cluster.replication_toml = "ddl = true\non_error = \"skip_change\"".into();
    cluster.write_config()?;
    cluster.init()?;
    let _services: Vec<_> = (0..2).map(|i| cluster.spawn("run", i)).collect::<Result<_, _>>()?;
    let (n1, n2) = (cluster.sql(0).await?, cluster.sql(1).await?);
    // n2 already has the column (added there alone), so n1's ALTER fails on n2.
    n2.batch_execute("SET pgferry.local_ddl = on").await?;
    n2.batch_execute("ALTER TABLE t ADD COLUMN c int").await?;
    n1.batch_execute("ALTER TABLE t ADD COLUMN c int").await?;
    n1.batch_execute("INSERT INTO t VALUES (1, 'after the refused DDL', 7)").await?;
    cluster.wait_converged("t", Duration::from_secs(60)).await?;
    let row = n2
        .query_one(
            "SELECT reason, position(convert_to('ALTER TABLE t ADD COLUMN c int', 'UTF8') IN payload) > 0
             FROM pgferry.exceptions ORDER BY id LIMIT 1",
            &[],
        )
        .await?;
    let (reason, whole): (String, bool) = (row.get(0), row.get(1));
    assert!(reason.contains("already exists"), "the exception names why: {reason}");
    assert!(whole, "the statement is kept whole in the exception");
    let dlq = pgferry_integration_tests::read_topic(&cluster.endpoints.kafka, &format!("{}.dlq", cluster.name))?;
    assert!(
        dlq.iter().any(|m| String::from_utf8_lossy(&m.value).contains("ADD COLUMN c int")),
        "the statement is in the dead-letter topic"
    );
    drop(_services);
    cluster.cleanup().await
}

/// With DDL replication off, a DDL message in the topics (here emitted by hand, as anyone who
/// can write to a node could) is never run: it is dead-lettered and recorded, and the rows of its
/// transaction and after it still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_messages_are_never_run_while_ddl_is_off() -> anyhow::Result<()> {
    let cluster = Cluster::start("ddloff", &["r1", "r1"], "CREATE TABLE t (id int PRIMARY KEY, v text);", &["public.t"]).await?;
    let _services: Vec<_> = (0..2).map(|i| cluster.spawn("run", i)).collect::<Result<_, _>>()?;
    let (n1, n2) = (cluster.sql(0).await?, cluster.sql(1).await?);
    n1.batch_execute(
        "BEGIN;
         INSERT INTO t VALUES (1, 'with the message');
         SELECT pg_logical_emit_message(true, 'pgferry.ddl', '{\"search_path\": \"public\", \"sql\": \"DROP TABLE t\"}');
         COMMIT;",
    )
    .await?;
    n1.batch_execute("INSERT INTO t VALUES (2, 'after it')").await?;
    cluster.wait_converged("t", Duration::from_secs(60)).await?;
    let rows: i64 = n2.query_one("SELECT count(*) FROM t", &[]).await?.get(0);
    assert_eq!(rows, 2, "the table is still there on n2 with both rows");
    let reason: String = n2
        .query_one("SELECT reason FROM pgferry.exceptions ORDER BY id LIMIT 1", &[])
        .await?
        .get(0);
    assert!(reason.contains("DDL replication is off"), "{reason}");
    let dlq = pgferry_integration_tests::read_topic(&cluster.endpoints.kafka, &format!("{}.dlq", cluster.name))?;
    assert!(dlq.iter().any(|m| String::from_utf8_lossy(&m.value).contains("DROP TABLE t")), "the message is in the dead-letter topic");
    drop(_services);
    cluster.cleanup().await
}
