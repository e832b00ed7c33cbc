//! Server-wide names (replication slots and origins) carry the cluster and the node, so
//! clusters share PostgreSQL servers without meeting (issue 15):
//!
//! - two clusters whose nodes have the same names (`n1`, `n2`, `n3`), in two databases on each
//!   of the same three servers, replicate at once and each converge on its own rows, written
//!   under its own origins; removing a node of one leaves every slot and origin of the other,
//!   which keeps replicating;
//! - `init` refuses a slot of the node's name that it does not own (another database — a
//!   second cluster of the same name — or another plugin), naming the slot and what holds it,
//!   and installs nothing;
//! - a node set up by an earlier pgferry (slot `pgferry_<node>`, origins `pgferry_<origin>`)
//!   is moved by `init`: nothing its old slot held is lost, and rows written under an old
//!   origin still count as that origin's.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgferry_integration_tests::{connect, naming, wait_until, with_db, Cluster, Service};

const SETUP: &str = "CREATE TABLE items (id bigint PRIMARY KEY, writer text NOT NULL, v bigint NOT NULL);";
const TABLES: &[&str] = &["public.items"];

/// Runs `pgferry init`; its stdout, stderr and whether it succeeded.
fn init(cluster: &Cluster) -> Result<(String, String, bool)> {
    let out = cluster.pgferry(&["init"])?;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
    eprintln!("pgferry init ({}):\n{stdout}{stderr}", cluster.name);
    Ok((stdout, stderr, out.status.success()))
}

/// The line `init` printed for node `i`.
fn node_line<'a>(cluster: &Cluster, stdout: &'a str, i: usize) -> &'a str {
    let prefix = format!("node {} (", cluster.nodes[i].name);
    stdout.lines().find(|l| l.starts_with(&prefix)).unwrap_or_default()
}

/// `txns` transactions on node `i`: each inserts a row of its own and bumps the shared row 0.
async fn write(cluster: &Cluster, i: usize, txns: i64) -> Result<()> {
    let c = cluster.sql(i).await?;
    let writer = format!("{}:{}", cluster.name, cluster.nodes[i].name);
    for k in 0..txns {
        c.batch_execute(&format!(
            "BEGIN;
             INSERT INTO items VALUES ({}, '{writer}', {k});
             UPDATE items SET writer = '{writer}', v = v + 1 WHERE id = 0;
             COMMIT;",
            (i as i64 + 1) * 1_000_000 + k
        ))
        .await?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// On every node: how many rows were last written by a replication origin that is not one
/// of `cluster`'s, and how many by one of its own.
async fn rows_by_origin(cluster: &Cluster) -> Result<Vec<(i64, i64)>> {
    let mut out = Vec::new();
    for i in 0..cluster.nodes.len() {
        let row = cluster
            .sql(i)
            .await?
            .query_one(
                "SELECT count(*) FILTER (WHERE o.roname IS NULL OR NOT o.roname = ANY($1::text[])),
                        count(*) FILTER (WHERE o.roname = ANY($1::text[]))
                 FROM items t
                 CROSS JOIN LATERAL pg_xact_commit_timestamp_origin(t.xmin) x
                 LEFT JOIN pg_replication_origin o ON o.roident = x.roident
                 WHERE x.roident <> 0",
                &[&cluster.origins()],
            )
            .await?;
        out.push((row.get(0), row.get(1)));
    }
    Ok(out)
}

/// The database of node `i`'s slot; `None` when there is no such slot.
async fn slot_database(cluster: &Cluster, i: usize) -> Result<Option<String>> {
    Ok(cluster
        .sql(i)
        .await?
        .query_opt("SELECT database::text FROM pg_replication_slots WHERE slot_name = $1", &[&cluster.slot_of(i)])
        .await?
        .map(|r| r.get(0)))
}

/// How many of `names` exist as replication origins on node `i`'s server.
async fn origins_present(cluster: &Cluster, i: usize, names: &[String]) -> Result<i64> {
    Ok(cluster
        .sql(i)
        .await?
        .query_one("SELECT count(*) FROM pg_replication_origin WHERE roname = ANY($1)", &[&names])
        .await?
        .get(0))
}

/// The origins node `i` applies under: one per other node.
fn own_origins(cluster: &Cluster, i: usize) -> Vec<String> {
    cluster
        .nodes
        .iter()
        .filter(|o| o.name != cluster.nodes[i].name)
        .map(|o| cluster.origin_on(i, &o.name))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_with_the_same_node_names_share_three_servers() -> Result<()> {
    let mut a = Cluster::create("names_a", &["r1", "r1", "r1"], SETUP, TABLES).await?;
    let mut b = Cluster::create("names_b", &["r1", "r1", "r1"], SETUP, TABLES).await?;
    // The same node names in both, as two copies of one example config would have.
    for c in [&mut a, &mut b] {
        for (i, n) in c.nodes.iter_mut().enumerate() {
            n.name = format!("n{}", i + 1);
        }
        c.write_config()?;
        for i in 0..3 {
            c.sql(i).await?.batch_execute("INSERT INTO items VALUES (0, 'nobody', 0)").await?;
        }
    }
    for c in [&a, &b] {
        let (stdout, stderr, ok) = init(c)?;
        ensure!(ok, "init of {} failed: {stderr}", c.name);
        for i in 0..3 {
            // `created …; found …`: the node's slot and origins are among what init created.
            let line = node_line(c, &stdout, i);
            let created = line.split(';').next().unwrap_or_default();
            let origins = own_origins(c, i);
            for want in [format!("slot {},", c.slot_of(i)), format!("origins {} and {}", origins[0], origins[1])] {
                ensure!(created.contains(": created ") && created.contains(&want), "{}: {want:?} not created: {line}", c.name);
            }
        }
    }
    for i in 0..3 {
        ensure!(a.slot_of(i) != b.slot_of(i), "the two clusters' slots are named alike");
        assert_eq!(slot_database(&a, i).await?, Some(a.nodes[i].db.clone()), "a's slot on server {i}");
        assert_eq!(slot_database(&b, i).await?, Some(b.nodes[i].db.clone()), "b's slot on server {i}");
    }

    let mut services: Vec<Service> = Vec::new();
    for c in [&a, &b] {
        for i in 0..3 {
            services.push(c.spawn("run", i)?);
        }
    }
    let writers = (0..3).flat_map(|i| [write(&a, i, 30), write(&b, i, 30)]);
    futures::future::try_join_all(writers).await?;
    let (_, rows_a) = a.wait_converged("items", Duration::from_secs(120)).await?;
    let (_, rows_b) = b.wait_converged("items", Duration::from_secs(120)).await?;
    assert_eq!((rows_a, rows_b), (91, 91), "each cluster: 3 × 30 rows and the shared one");
    for c in [&a, &b] {
        let foreign: i64 = c
            .sql(0)
            .await?
            .query_one("SELECT count(*) FROM items WHERE id <> 0 AND writer NOT LIKE $1 || ':%'", &[&c.name])
            .await?
            .get(0);
        assert_eq!(foreign, 0, "{}: rows of the other cluster arrived", c.name);
        // Every row a node applied was written under one of its own cluster's origins.
        for (i, (other, own)) in rows_by_origin(c).await?.into_iter().enumerate() {
            assert_eq!(other, 0, "{} node {i}: rows written under another cluster's origin", c.name);
            assert!(own >= 60, "{} node {i}: {own} applied rows under its own origins", c.name);
        }
    }

    // Take n2 out of b, its services stopped: a keeps every slot and origin, and replicates on.
    for s in services.iter_mut().skip(3) {
        s.kill();
    }
    let b2 = b.sql(1).await?;
    wait_until("b's n2 services to be gone", Duration::from_secs(30), || async {
        let left: i64 = b2
            .query_one(
                "SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'pgferry-%')
                      + (SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 AND active)",
                &[&b.slot_of(1)],
            )
            .await?
            .get(0);
        Ok(left == 0)
    })
    .await?;
    drop(b2);
    let out = b.pgferry(&["node", "remove", "n2", "--timeout", "60"])?;
    ensure!(
        out.status.success(),
        "node remove in b failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(slot_database(&b, 1).await?, None, "b's n2 slot is dropped");
    assert_eq!(origins_present(&b, 0, &[b.origin_on(0, "n2")]).await?, 0, "b's n1 origin of n2 is dropped");
    for i in 0..3 {
        assert_eq!(slot_database(&a, i).await?, Some(a.nodes[i].db.clone()), "a's slot on server {i} stays");
        assert_eq!(origins_present(&a, i, &own_origins(&a, i)).await?, 2, "a's origins on server {i} stay");
    }
    a.sql(1).await?.batch_execute("INSERT INTO items VALUES (42, 'after', 0)").await?;
    let (_, rows_a) = a.wait_converged("items", Duration::from_secs(60)).await?;
    assert_eq!(rows_a, 92, "a replicates after b lost a node");

    drop(services);
    b.cleanup().await?;
    a.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_refuses_a_slot_of_its_name_that_is_not_the_nodes() -> Result<()> {
    // A second cluster of the same name, its node of the same name in another database of the
    // same server: the slot's name is taken by the first.
    let first = Cluster::start("names_dup", &["r1"], SETUP, TABLES).await?;
    let mut second = Cluster::create("names_dup2", &["r1"], SETUP, TABLES).await?;
    second.name = first.name.clone();
    second.nodes[0].name = first.nodes[0].name.clone();
    second.write_config()?;
    let (stdout, stderr, ok) = init(&second)?;
    ensure!(!ok, "init of a second cluster of the same name succeeded:\n{stdout}");
    let slot = first.slot_of(0);
    for want in [
        format!("replication slot {slot} already exists"),
        format!("belongs to database {:?}", first.nodes[0].db),
        format!("this node's database {:?}", second.nodes[0].db),
    ] {
        ensure!(stderr.contains(&want), "{want:?} not in init's error: {stderr}");
    }
    ensure!(!stdout.contains("ready") && node_line(&second, &stdout, 0).is_empty(), "init reported the node: {stdout}");
    let installed: bool = second
        .sql(0)
        .await?
        .query_one("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'pgferry')", &[])
        .await?
        .get(0);
    ensure!(!installed, "init installed the pgferry schema before refusing");
    assert_eq!(slot_database(&first, 0).await?, Some(first.nodes[0].db.clone()), "the first cluster's slot stays");

    // A slot of the node's own name in its own database, but of another plugin: not pgferry's.
    let other = Cluster::create("names_plugin", &["r1"], SETUP, TABLES).await?;
    let c = other.sql(0).await?;
    c.execute("SELECT pg_create_logical_replication_slot($1, 'test_decoding')", &[&other.slot_of(0)])
        .await?;
    let (_, stderr, ok) = init(&other)?;
    ensure!(!ok, "init accepted a test_decoding slot");
    let want = format!("replication slot {} already exists and decodes with plugin test_decoding", other.slot_of(0));
    ensure!(stderr.contains(&want), "{want:?} not in init's error: {stderr}");
    // Once the slot is gone, init sets the node up.
    c.execute("SELECT pg_drop_replication_slot($1)", &[&other.slot_of(0)]).await?;
    other.init()?;

    drop(c);
    other.cleanup().await?;
    second.cleanup().await?;
    first.cleanup().await
}

/// Makes `cluster` look set up by a pgferry before names carried the cluster: each node's
/// slot is `pgferry_<node>` and its origins `pgferry_<origin>`.
async fn make_legacy(cluster: &Cluster) -> Result<()> {
    for i in 0..cluster.nodes.len() {
        let c = cluster.sql(i).await?;
        c.execute("SELECT pg_drop_replication_slot($1)", &[&cluster.slot_of(i)]).await?;
        c.execute(
            "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname = ANY($1)",
            &[&own_origins(cluster, i)],
        )
        .await?;
        for o in cluster.nodes.iter().filter(|o| o.name != cluster.nodes[i].name) {
            c.execute("SELECT pg_replication_origin_create($1)", &[&naming::legacy_replication_origin(&o.name)])
                .await?;
        }
    }
    Ok(())
}

/// A child process, SIGKILLed when dropped (also when the test fails).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `pg_recvlogical` streaming from `slot` of node `i` (as an old capture would), until dropped.
fn stream_from(cluster: &Cluster, i: usize, slot: &str) -> Result<KillOnDrop> {
    let bin = match std::env::var_os("PGFERRY_PG_BIN") {
        Some(dir) => std::path::Path::new(&dir).join("pg_recvlogical"),
        None => "pg_recvlogical".into(),
    };
    let log = cluster.dir.join("pg_recvlogical.log");
    Command::new(&bin)
        .args(["-d", &cluster.nodes[i].dsn, "--slot", slot, "--start", "-f", "/dev/null"])
        .args(["-o", "proto_version=1", "-o"])
        .arg(format!("publication_names={}", naming::PUBLICATION))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .map(KillOnDrop)
        .with_context(|| format!("starting {}", bin.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_moves_a_node_set_up_by_an_earlier_version() -> Result<()> {
    let c = Cluster::start("names_legacy", &["r1", "r1", "r1"], SETUP, TABLES).await?;
    let names: Vec<String> = c.nodes.iter().map(|n| n.name.clone()).collect();
    make_legacy(&c).await?;
    // Row 1 was written on n1 and applied on n2 and n3 before the upgrade, under the old
    // origin of n1 (its commit time is n1's).
    c.sql(0).await?.batch_execute("INSERT INTO items VALUES (1, 'n1', 0)").await?;
    let written: String = c.sql(0).await?.query_one("SELECT now()::text", &[]).await?.get(0);
    for i in [1, 2] {
        let s = c.sql(i).await?;
        s.execute("SELECT pg_replication_origin_session_setup($1)", &[&naming::legacy_replication_origin(&names[0])])
            .await?;
        s.batch_execute(&format!(
            "BEGIN;
             SELECT pg_replication_origin_xact_setup('0/1', '{written}');
             INSERT INTO items VALUES (1, 'n1', 0);
             COMMIT;
             SELECT pg_replication_origin_session_reset();"
        ))
        .await?;
    }
    // The old slots, made after that (it was published); then n1 changes the row and adds one,
    // not yet published when the node is upgraded.
    let legacy: Vec<String> = names.iter().map(|n| naming::legacy_slot_name(n)).collect();
    for (i, slot) in legacy.iter().enumerate() {
        c.sql(i).await?.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[slot]).await?;
    }

    // While an old capture streams from n1's slot, init leaves it alone and says why.
    let old_capture = stream_from(&c, 0, &legacy[0])?;
    let n1 = c.sql(0).await?;
    let active = || async {
        Ok(n1
            .query_one("SELECT coalesce((SELECT active FROM pg_replication_slots WHERE slot_name = $1), false)", &[&legacy[0]])
            .await?
            .get::<_, bool>(0))
    };
    wait_until("pg_recvlogical to stream from n1's old slot", Duration::from_secs(30), active).await?;
    let (_, stderr, ok) = init(&c)?;
    ensure!(!ok, "init moved a slot in use");
    let want = format!("replication slot {} (this node's, from an earlier pgferry) is in use by pid", legacy[0]);
    ensure!(stderr.contains(&want), "{want:?} not in init's error: {stderr}");
    drop(old_capture);
    wait_until("n1's old slot to be free", Duration::from_secs(30), || async { Ok(!active().await?) }).await?;

    n1.batch_execute("UPDATE items SET v = 1 WHERE id = 1; INSERT INTO items VALUES (2, 'n1', 0)").await?;
    let before: String = n1
        .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&legacy[0]])
        .await?
        .get(0);

    let (stdout, stderr, ok) = init(&c)?;
    ensure!(ok, "init of the old cluster failed: {stderr}");
    for i in 0..3 {
        let want = format!("slot {} (moved from {})", c.slot_of(i), legacy[i]);
        ensure!(node_line(&c, &stdout, i).contains(&want), "{want:?} not in init's report:\n{stdout}");
        let s = c.sql(i).await?;
        let row = s
            .query_one(
                "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1),
                        (SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $2 AND database = current_database()),
                        (SELECT count(*) FROM pg_replication_origin WHERE roname = ANY($3))",
                &[&legacy[i], &c.slot_of(i), &names.iter().filter(|n| **n != names[i]).map(|n| naming::legacy_replication_origin(n)).collect::<Vec<_>>()],
            )
            .await?;
        assert_eq!(row.get::<_, i64>(0), 0, "node {i}: the old slot is gone");
        let moved: Option<String> = row.get(1);
        ensure!(moved.is_some(), "node {i}: no new slot in the node's database");
        if i == 0 {
            assert_eq!(moved.as_deref(), Some(before.as_str()), "n1's slot moved with its position");
        }
        assert_eq!(row.get::<_, i64>(2), 2, "node {i}: the old origins stay (rows carry them)");
    }
    // The new origin of n1 on n2 starts where the old one stood.
    let progress: String = c
        .sql(1)
        .await?
        .query_one("SELECT pg_replication_origin_progress($1, false)::text", &[&c.origin_on(1, &names[0])])
        .await?
        .get(0);
    assert_eq!(progress, "0/1", "n2's origin of n1 carries the old origin's progress");

    // Everything n1's old slot held arrives; n1's change of row 1, last written under the old
    // origin of n1 on n2 and n3, is n1's own follow-up there, not a conflict.
    let services: Vec<Service> = (0..3).map(|i| c.spawn("run", i)).collect::<Result<_>>()?;
    let (_, rows) = c.wait_converged("items", Duration::from_secs(90)).await?;
    assert_eq!(rows, 2, "rows 1 and 2 on every node");
    for i in [1, 2] {
        let s = c.sql(i).await?;
        let v: i64 = s.query_one("SELECT v FROM items WHERE id = 1", &[]).await?.get(0);
        assert_eq!(v, 1, "node {i}: n1's update of row 1 applied");
        let conflicts: i64 = s.query_one("SELECT count(*) FROM pgferry.conflicts", &[]).await?.get(0);
        assert_eq!(conflicts, 0, "node {i}: a row written under n1's old origin counted as another writer's\n{}", c.logs());
    }

    drop(services);
    for i in 0..3 {
        let admin = connect(&with_db(&c.nodes[i].dsn, "postgres")).await?;
        let old: Vec<String> = names.iter().map(|n| naming::legacy_replication_origin(n)).collect();
        admin
            .execute("SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname = ANY($1)", &[&old])
            .await?;
    }
    c.cleanup().await
}
