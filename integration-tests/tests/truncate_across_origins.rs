//! Issue 16, scenario 6, TRUNCATE across origins.
//!
//! - `TRUNCATE parent, child` (a foreign key between them) on one node is one statement there
//!   and must be one statement on every node: truncated one table at a time, the parent's
//!   TRUNCATE fails (0A000, the child references it) and the origin's stream waits forever.
//! - A truncate is a delete of every row of the table dated by its commit time: changes from
//!   other origins dated before it lose against it wherever they arrive (before or after it),
//!   changes dated after it win. Writes, with every apply stopped: n2 inserts row 10 and
//!   updates row 1, n3 inserts row 15 (all older than the truncate); n1 truncates `t`; n3 then
//!   inserts row 30 and updates row 2 (newer). Arrival orders: n1 gets the others' changes
//!   after its truncate; n2 gets the truncate first, then n3's changes; n3 gets n2's changes
//!   first, then the truncate (with its own newer rows in the table). Every node must end with
//!   rows 2 (n3's version) and 30 only. On the old code the truncate removed n3's newer rows on
//!   n3, and the older changes came back on the nodes that got them after the truncate.
//!
//! Both apply paths: one by one (`max_group_txns = 1`) and grouped (the default; truncates
//! themselves always go one by one).

use std::time::Duration;

use pgferry_integration_tests::{wait_until, Cluster};
use tokio_postgres::Client;

const SETUP: &str = "
CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL);
CREATE TABLE parent (id int PRIMARY KEY);
CREATE TABLE child (id int PRIMARY KEY, parent_id int NOT NULL REFERENCES parent);";

const TABLES: [&str; 3] = ["public.t", "public.parent", "public.child"];

async fn ids(c: &Client, table: &str) -> anyhow::Result<Vec<(i32, String)>> {
    let text = format!(
        "SELECT id, {} FROM {table} ORDER BY id",
        if table == "t" { "v" } else { "''" }
    );
    Ok(c.query(&text, &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Applies `origin`'s whole stream into node `node` (`pgferry replay`), ahead of the others.
fn replay(cluster: &Cluster, node: usize, origin: usize) -> anyhow::Result<()> {
    let (n, o) = (&cluster.nodes[node].name, &cluster.nodes[origin].name);
    let out = cluster.pgferry(&["replay", "--node", n, "--origin", o, "--from-offset", "0", "-q"])?;
    anyhow::ensure!(
        out.status.success(),
        "replay of {o} into {n} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The rows of `t` on every node.
async fn t_everywhere(cluster: &Cluster) -> anyhow::Result<Vec<Vec<(i32, String)>>> {
    let mut out = Vec::new();
    for i in 0..cluster.nodes.len() {
        out.push(ids(&cluster.sql(i).await?, "t").await?);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_of_linked_tables_is_one_statement() -> anyhow::Result<()> {
    let cluster = Cluster::start("trunclinked", &["r1", "r1"], SETUP, &TABLES).await?;
    let _services: Vec<_> = (0..2).map(|i| cluster.spawn("run", i)).collect::<Result<_, _>>()?;
    let n1 = cluster.sql(0).await?;
    n1.batch_execute("INSERT INTO parent VALUES (1), (2); INSERT INTO child VALUES (1, 1), (2, 2);")
        .await?;
    for table in ["parent", "child"] {
        cluster.wait_converged(table, Duration::from_secs(60)).await?;
    }
    n1.batch_execute("TRUNCATE parent, child").await?;
    let n2 = cluster.sql(1).await?;
    wait_until("parent and child truncated on n2", Duration::from_secs(30), || async {
        Ok(ids(&n2, "parent").await?.is_empty() && ids(&n2, "child").await?.is_empty())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;
    // The stream goes on after it.
    n1.batch_execute("INSERT INTO parent VALUES (3); INSERT INTO child VALUES (3, 3);")
        .await?;
    for table in ["parent", "child"] {
        let (_, rows) = cluster.wait_converged(table, Duration::from_secs(30)).await?;
        assert_eq!(rows, 1);
    }
    drop(_services);
    cluster.cleanup().await
}

async fn changes_around_a_truncate(apply_toml: &str, test: &str) -> anyhow::Result<()> {
    let mut cluster = Cluster::create(test, &["r1", "r1", "r1"], SETUP, &TABLES).await?;
    cluster.apply_toml = apply_toml.into();
    cluster.write_config()?;
    cluster.init()?;
    let _captures: Vec<_> = (0..3).map(|i| cluster.spawn("capture", i)).collect::<Result<_, _>>()?;
    let mut applies: Vec<_> = (0..3).map(|i| cluster.spawn("apply", i)).collect::<Result<_, _>>()?;
    let (n1, n2, n3) = (cluster.sql(0).await?, cluster.sql(1).await?, cluster.sql(2).await?);
    n1.batch_execute("INSERT INTO t VALUES (1, 'old'), (2, 'old'), (3, 'old')")
        .await?;
    cluster.wait_converged("t", Duration::from_secs(60)).await?;

    // The writes, with every apply stopped.
    for a in &mut applies {
        a.kill();
    }
    for i in 0..3 {
        cluster.wait_apply_gone(i).await?;
    }
    n2.batch_execute("INSERT INTO t VALUES (10, 'n2, before the truncate')")
        .await?;
    n2.batch_execute("UPDATE t SET v = 'n2, before the truncate' WHERE id = 1")
        .await?;
    n3.batch_execute("INSERT INTO t VALUES (15, 'n3, before the truncate')")
        .await?;
    n1.batch_execute("TRUNCATE t").await?;
    n3.batch_execute("INSERT INTO t VALUES (30, 'n3, after the truncate')")
        .await?;
    n3.batch_execute("UPDATE t SET v = 'n3, after the truncate' WHERE id = 2")
        .await?;
    for i in 0..3 {
        cluster.wait_published(i, Duration::from_secs(60)).await?;
    }
    // n2: the truncate first, then n3's changes. n3: n2's changes first, then the truncate.
    // n1: the others' changes after its own truncate.
    replay(&cluster, 1, 0)?;
    replay(&cluster, 2, 1)?;
    let _applies: Vec<_> = (0..3).map(|i| cluster.spawn("apply", i)).collect::<Result<_, _>>()?;
    let after = "n3, after the truncate".to_string();
    let want = vec![(2, after.clone()), (30, after)];
    let settled = wait_until("t to settle on every node", Duration::from_secs(30), || async {
        Ok(t_everywhere(&cluster).await?.iter().all(|rows| *rows == want))
    })
    .await;
    if let Err(e) = settled {
        panic!(
            "{e}: t on n1, n2, n3 = {:?}, expected {want:?} everywhere\n{}",
            t_everywhere(&cluster).await?,
            cluster.logs()
        );
    }
    // n1 weighed the others' changes against its truncate: the older ones lost, the newer won.
    let conflicts: Vec<(String, String, String, String)> = n1
        .query(
            "SELECT key::text AS k, remote_op, conflict_type, resolution FROM pgferry.conflicts
             WHERE tbl = 'public.t' ORDER BY key",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let c = |k: &str, op: &str, res: &str| {
        (
            k.to_string(),
            op.to_string(),
            "update_deleted".to_string(),
            res.to_string(),
        )
    };
    assert_eq!(
        conflicts,
        vec![
            c("[1]", "u", "keep_local"),
            c("[2]", "u", "apply_remote"),
            c("[10]", "c", "keep_local"),
            c("[15]", "c", "keep_local")
        ],
        "n1's conflicts with the changes around its truncate"
    );
    let exceptions: i64 = n1
        .query_one("SELECT count(*) FROM pgferry.exceptions", &[])
        .await?
        .get(0);
    assert_eq!(exceptions, 0);
    drop(_applies);
    drop(_captures);
    cluster.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_around_a_truncate_one_by_one() -> anyhow::Result<()> {
    changes_around_a_truncate("max_group_txns = 1", "truncaround1").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_around_a_truncate_grouped() -> anyhow::Result<()> {
    changes_around_a_truncate("", "truncaroundg").await
}
