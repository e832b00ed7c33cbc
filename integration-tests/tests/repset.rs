//! `pgferry repset` while the cluster runs: a table added with `add-table` replicates without
//! restarting any service (with the operations it was given); `list` shows it published on
//! every node; a table without a primary key is refused with the config left alone; after
//! `remove-table` the table's changes stay on their node.

use std::time::Duration;

use pgferry_integration_tests::{wait_until, Cluster};

const SETUP: &str = "
CREATE TABLE base (id int PRIMARY KEY, v text);
CREATE TABLE later (id int PRIMARY KEY, v text);
CREATE TABLE nokey (id int, v text);";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_join_and_leave_while_running() -> anyhow::Result<()> {
    let cluster = Cluster::start("repset", &["r1", "r1"], SETUP, &["public.base"]).await?;
    let _services: Vec<_> = (0..2).map(|i| cluster.spawn("run", i)).collect::<Result<_, _>>()?;
    let (n1, n2) = (cluster.sql(0).await?, cluster.sql(1).await?);
    n1.batch_execute("INSERT INTO base VALUES (1, 'before')").await?;
    cluster.wait_converged("base", Duration::from_secs(60)).await?;

    // A table without a primary key: refused, naming it; the config is unchanged.
    let before = std::fs::read_to_string(&cluster.config_path)?;
    let out = cluster.pgferry(&["repset", "add-table", "nokey"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a table without a primary key is refused");
    assert!(stderr.contains("public.nokey") && stderr.contains("primary key"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&cluster.config_path)?, before, "the config is left alone");

    // Added while the services run: inserts and updates replicate, deletes do not.
    let out = cluster.pgferry(&["repset", "add-table", "public.later", "--operations", "insert,update"])?;
    assert!(out.status.success(), "add-table failed: {}", String::from_utf8_lossy(&out.stderr));
    n1.batch_execute(
        "INSERT INTO later VALUES (1, 'one'), (2, 'two');
         UPDATE later SET v = 'one, updated' WHERE id = 1;
         DELETE FROM later WHERE id = 2;",
    )
    .await?;
    n1.batch_execute("INSERT INTO base VALUES (2, 'marker')").await?;
    cluster.wait_converged("base", Duration::from_secs(60)).await?;
    wait_until("later's rows on n2", Duration::from_secs(60), || async {
        let rows = n2.query("SELECT id, v FROM later ORDER BY id", &[]).await?;
        let got: Vec<(i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        Ok(got == vec![(1, "one, updated".to_string()), (2, "two".to_string())])
    })
    .await?;

    let out = cluster.pgferry(&["repset", "list", "--json"])?;
    assert!(out.status.success(), "list failed: {}", String::from_utf8_lossy(&out.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let later = rows
        .as_array()
        .and_then(|r| r.iter().find(|t| t["table"] == "public.later"))
        .ok_or_else(|| anyhow::anyhow!("later not listed: {rows}"))?;
    assert_eq!(later["operations"], serde_json::json!(["insert", "update"]), "{later}");
    for n in &cluster.nodes {
        assert_eq!(later["published_on"][&n.name], true, "published on {}: {later}", n.name);
    }

    // Removed: n1's later changes stay on n1.
    let out = cluster.pgferry(&["repset", "remove-table", "later"])?;
    assert!(out.status.success(), "remove-table failed: {}", String::from_utf8_lossy(&out.stderr));
    n1.batch_execute("INSERT INTO later VALUES (3, 'stays on n1')").await?;
    n1.batch_execute("INSERT INTO base VALUES (3, 'marker')").await?;
    cluster.wait_converged("base", Duration::from_secs(60)).await?;
    let n: i64 = n2.query_one("SELECT count(*) FROM later WHERE id = 3", &[]).await?.get(0);
    assert_eq!(n, 0, "a removed table's change reached n2");
    let out = cluster.pgferry(&["repset", "list"])?;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("public.base") && !table.contains("public.later"), "{table}");
    drop(_services);
    cluster.cleanup().await
}

/// A pattern in `replication.tables` takes every matching table (with the pattern's options),
/// and a matching table created later joins at the next `pgferry init`, without restarting the
/// services; a table the pattern does not match stays local.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patterns_take_matching_tables() -> anyhow::Result<()> {
    let setup = "CREATE TABLE log_a (id int PRIMARY KEY, v text); CREATE TABLE log_b (id int PRIMARY KEY, v text);
                 CREATE TABLE other (id int PRIMARY KEY, v text); CREATE TABLE marker (id int PRIMARY KEY);";
    let mut cluster = Cluster::create("repsetpat", &["r1", "r1"], setup, &["public.marker", "public.log_*"]).await?;
    cluster.replication_toml = "[replication.table.\"public.log_*\"]\noperations = [\"insert\"]".into();
    cluster.write_config()?;
    cluster.init()?;
    let _services: Vec<_> = (0..2).map(|i| cluster.spawn("run", i)).collect::<Result<_, _>>()?;
    let (n1, n2) = (cluster.sql(0).await?, cluster.sql(1).await?);
    n1.batch_execute(
        "INSERT INTO log_a VALUES (1, 'a'); INSERT INTO log_b VALUES (1, 'b'); INSERT INTO other VALUES (1, 'stays');
         DELETE FROM log_a WHERE id = 1;
         INSERT INTO marker VALUES (1);",
    )
    .await?;
    cluster.wait_converged("marker", Duration::from_secs(60)).await?;
    let count = |table: &'static str| {
        let n2 = &n2;
        async move { anyhow::Ok(n2.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await?.get::<_, i64>(0)) }
    };
    assert_eq!(count("log_a").await?, 1, "log_a's insert arrived and, inserts only, its delete did not");
    assert_eq!(count("log_b").await?, 1, "log_b matched the pattern");
    assert_eq!(count("other").await?, 0, "other does not match the pattern");

    // A matching table created later (on both nodes, DDL replication being off) joins at init.
    for c in [&n1, &n2] {
        c.batch_execute("CREATE TABLE log_c (id int PRIMARY KEY, v text)").await?;
    }
    cluster.init()?;
    n1.batch_execute("INSERT INTO log_c VALUES (1, 'c'); INSERT INTO marker VALUES (2);").await?;
    cluster.wait_converged("marker", Duration::from_secs(60)).await?;
    wait_until("log_c's row on n2", Duration::from_secs(30), || async { Ok(count("log_c").await? == 1) }).await?;
    let out = cluster.pgferry(&["repset", "list", "--json"])?;
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let sources: Vec<(String, String)> = rows
        .as_array()
        .map(|r| r.iter().map(|t| (t["table"].as_str().unwrap_or_default().to_string(), t["source"].as_str().unwrap_or_default().to_string())).collect())
        .unwrap_or_default();
    for t in ["public.log_a", "public.log_b", "public.log_c"] {
        assert!(sources.contains(&(t.to_string(), "pattern".to_string())), "{t} listed as taken by the pattern: {sources:?}");
    }
    drop(_services);
    cluster.cleanup().await
}
