//! Issue 16, scenario 7, "DDL across origins": n1 (A) adds a column, n2 (B) applies it and
//! writes rows using it, and n3 (C) reads B's rows before A's DDL. With DDL replication on, C
//! must not dead-letter B's rows: B's stream on C waits (retries) until the column exists, then
//! applies them — and the same for a table A creates in a schema replicated whole. Nothing is
//! dead-lettered and C ends identical to A and B.
//!
//! The arrival order is built with a lock: a session on C holds `gate` locked, and A writes a
//! row of `gate` just before its DDL, so A's stream on C stops at that row (waiting for the
//! lock) while B's stream on C goes on with B's rows. On the old code those rows went to the
//! dead-letter topic and the rest of their transactions committed.

use std::time::Duration;

use pgferry_integration_tests::{free_local_addr, http_get, read_topic, wait_until, Cluster};

/// Whether some session on `c` waits for a lock on `gate` (A's stream, held back).
async fn gate_waited_on(c: &tokio_postgres::Client) -> anyhow::Result<bool> {
    Ok(c.query_one(
        "SELECT count(*) FROM pg_locks WHERE relation = 'gate'::regclass AND NOT granted",
        &[],
    )
    .await?
    .get::<_, i64>(0)
        > 0)
}

async fn dead_letters(c: &tokio_postgres::Client) -> anyhow::Result<i64> {
    Ok(c.query_one("SELECT count(*) FROM pgferry.exceptions", &[])
        .await?
        .get(0))
}

/// Waits until C's `/healthz` says that B's stream waits with a reason containing every one of
/// `needles` — or until C dead-letters something (what the old code did), which fails.
async fn wait_for_b_waiting(
    cluster: &Cluster,
    c: &tokio_postgres::Client,
    addr: &str,
    b: &str,
    needles: &[&str],
) -> anyhow::Result<String> {
    let waiting_line = |body: &str| {
        body.lines()
            .find(|l| l.contains(&format!("origin {b} waits (since ")) && needles.iter().all(|n| l.contains(n)))
            .map(String::from)
    };
    wait_until(
        &format!("C's /healthz to say that {b} waits for {needles:?}"),
        Duration::from_secs(60),
        || async {
            let exceptions = dead_letters(c).await?;
            assert_eq!(
                exceptions,
                0,
                "C dead-lettered B's changes instead of waiting for the DDL\n{}",
                cluster.logs()
            );
            Ok(waiting_line(&http_get(addr, "/healthz").await?.1).is_some())
        },
    )
    .await?;
    let (_, body) = http_get(addr, "/healthz").await?;
    waiting_line(&body).ok_or_else(|| anyhow::anyhow!("B no longer waits: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_across_origins_waits_for_the_column_or_table() -> anyhow::Result<()> {
    let mut cluster = Cluster::create(
        "ddlorigins",
        &["r1", "r1", "r1"],
        "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE gate (id int PRIMARY KEY); CREATE SCHEMA app;",
        &["public.t", "public.gate"],
    )
    .await?;
    cluster.replication_toml = "schemas = [\"app\"]\nddl = true".into();
    let m3 = free_local_addr()?;
    cluster.nodes[2].extra_toml = format!("metrics_listen = \"{m3}\"");
    cluster.write_config()?;
    cluster.init()?;
    let (a_name, b_name) = (cluster.nodes[0].name.clone(), cluster.nodes[1].name.clone());
    let (a, b, c) = (cluster.sql(0).await?, cluster.sql(1).await?, cluster.sql(2).await?);
    let _services: Vec<_> = (0..3).map(|i| cluster.spawn("run", i)).collect::<Result<_, _>>()?;
    a.batch_execute("INSERT INTO t VALUES (1, 'first')").await?;
    cluster.wait_converged("t", Duration::from_secs(60)).await?;

    // 1. A column. C holds A's stream back at a row of `gate`, before A's ALTER TABLE.
    let holder = cluster.sql(2).await?;
    holder
        .batch_execute("BEGIN; LOCK TABLE gate IN ACCESS EXCLUSIVE MODE")
        .await?;
    a.batch_execute("INSERT INTO gate VALUES (1)").await?;
    a.batch_execute("ALTER TABLE t ADD COLUMN extra text").await?;
    wait_until("the column on B", Duration::from_secs(60), || async {
        Ok(b.query_one(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 't'::regclass AND attname = 'extra'",
            &[],
        )
        .await?
        .get::<_, i64>(0)
            == 1)
    })
    .await?;
    wait_until("A's stream on C held at the gate", Duration::from_secs(60), || {
        gate_waited_on(&c)
    })
    .await?;
    b.batch_execute("INSERT INTO t (id, v, extra) VALUES (2, 'from B', 'B''s extra')")
        .await?;
    b.batch_execute("UPDATE t SET extra = 'set by B' WHERE id = 1").await?;
    let line = wait_for_b_waiting(
        &cluster,
        &c,
        &m3,
        &b_name,
        &["public.t", "\"extra\" does not exist locally", "waiting for the DDL"],
    )
    .await?;
    eprintln!("C's /healthz: {line}");
    let (code, body) = http_get(&m3, "/healthz").await?;
    assert_eq!(code, 503, "{body}");
    assert!(
        !body.contains(&format!("origin {a_name} waits")),
        "A's stream is held by a lock, not failing: {body}"
    );
    let column_on_c: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 't'::regclass AND attname = 'extra'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(column_on_c, 0, "C really read B's rows before A's DDL");
    holder.batch_execute("COMMIT").await?;
    cluster.wait_converged("t", Duration::from_secs(60)).await?;
    let rows: Vec<(i32, Option<String>)> = c
        .query("SELECT id, extra FROM t ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        rows,
        vec![(1, Some("set by B".to_string())), (2, Some("B's extra".to_string()))]
    );

    // 2. A table, created by A in a schema replicated whole.
    holder
        .batch_execute("BEGIN; LOCK TABLE gate IN ACCESS EXCLUSIVE MODE")
        .await?;
    a.batch_execute("INSERT INTO gate VALUES (2)").await?;
    a.batch_execute("CREATE TABLE app.u (id int PRIMARY KEY, v text)")
        .await?;
    wait_until("the table on B", Duration::from_secs(60), || async {
        Ok(b.query_one("SELECT to_regclass('app.u') IS NOT NULL", &[])
            .await?
            .get::<_, bool>(0))
    })
    .await?;
    wait_until(
        "A's stream on C held at the gate again",
        Duration::from_secs(60),
        || gate_waited_on(&c),
    )
    .await?;
    b.batch_execute("INSERT INTO app.u VALUES (1, 'from B')").await?;
    b.batch_execute("INSERT INTO t (id, v, extra) VALUES (3, 'from B', 'after the table')")
        .await?;
    let line = wait_for_b_waiting(
        &cluster,
        &c,
        &m3,
        &b_name,
        &["app.u", "table does not exist", "waiting for the DDL"],
    )
    .await?;
    eprintln!("C's /healthz: {line}");
    let table_on_c: bool = c
        .query_one("SELECT to_regclass('app.u') IS NOT NULL", &[])
        .await?
        .get(0);
    assert!(!table_on_c, "C really read B's row before A's CREATE TABLE");
    holder.batch_execute("COMMIT").await?;
    for table in ["app.u", "t", "gate"] {
        cluster.wait_converged(table, Duration::from_secs(60)).await?;
    }
    let u: i64 = c.query_one("SELECT count(*) FROM app.u", &[]).await?.get(0);
    assert_eq!(u, 1);

    // Nothing dead-lettered anywhere, and C is healthy again.
    for i in 0..3 {
        assert_eq!(dead_letters(&cluster.sql(i).await?).await?, 0, "node {}", i + 1);
    }
    let dlq = read_topic(&cluster.endpoints.kafka, &format!("{}.dlq", cluster.name)).unwrap_or_default();
    assert!(dlq.is_empty(), "the dead-letter topic is empty: {} messages", dlq.len());
    wait_until("C healthy again", Duration::from_secs(30), || async {
        Ok(http_get(&m3, "/healthz").await?.0 == 200)
    })
    .await?;
    drop(_services);
    cluster.cleanup().await
}
