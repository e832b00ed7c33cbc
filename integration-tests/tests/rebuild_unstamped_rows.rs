//! Issue 16, scenario 11, first part: rows without a commit time copied by `node add` /
//! `node rebuild`. A row a node holds with no commit time (written while
//! `track_commit_timestamp` was off, or too old to have one) is weighed as unstamped: any
//! change wins over it, and it is no conflict. The copy used to give such rows the copying
//! transaction's stamp (the snapshot's time, no node), so on the new node they beat every
//! change dated before the snapshot that was still on its way, while the peer they came from
//! took those changes.
//!
//! The arrival order: n1's rows 1 and 2 of `t` and `u` were written while its server did not
//! track commit times (the test's own PostgreSQL server, restarted with
//! `track_commit_timestamp = off` and on again). n1's apply is not running; n2 updates row 1 of
//! each table (one transaction each). Then `node add n3 --copy-from n1`: the snapshot is later
//! than n2's updates, which n1 has not applied. n1 and n3 then read n2's stream. `t` is
//! groupable (grouped apply), `u` is not (a secondary unique key: one by one), so both paths
//! meet the copied rows.
//!
//! Required: every node ends with n2's row 1, and the new node keeps the stamps n1 had (rows
//! without a commit time stay without one there), so n1 and n3 record the same conflicts (none).

use std::time::Duration;

use anyhow::{ensure, Context};
use pgferry_integration_tests::own_services::free_port;
use pgferry_integration_tests::{connect, wait_until, Cluster, Endpoints, OwnServers};

const SETUP: &str = "
CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL);
CREATE TABLE u (id int PRIMARY KEY, v text NOT NULL, w int UNIQUE);
INSERT INTO t VALUES (1, 'old'), (2, 'old');
INSERT INTO u VALUES (1, 'old', 1), (2, 'old', 2);";

const TABLES: [&str; 2] = ["t", "u"];

/// Restarts server 1 of `servers` with `track_commit_timestamp` as `setting` says (`ALTER
/// SYSTEM` wins over the file pg.sh writes; `RESET` goes back to it, which is `on`).
async fn track_commit_timestamps(servers: &OwnServers, setting: &str) -> anyhow::Result<()> {
    let admin = connect(&servers.endpoints.pg[0]).await?;
    admin.batch_execute(&format!("ALTER SYSTEM {setting}")).await?;
    drop(admin);
    servers.pg_sh(&["stop-node", "1"])?;
    servers.pg_sh(&["start-node", "1"])?;
    Ok(())
}

/// Each row of `table` on node `i` with the stamp conflict checks read for it: its commit time
/// (µs; None: it has none), or the override `pgferry.row_stamps` keeps for the row version.
async fn rows_and_stamps(cluster: &Cluster, i: usize, table: &str) -> anyhow::Result<Vec<(i32, String, Option<i64>)>> {
    let c = cluster.sql(i).await?;
    Ok(c.query(
        &format!(
            "SELECT t.id, t.v,
                    CASE WHEN s.xid IS NOT NULL THEN s.ts_us
                         ELSE (extract(epoch FROM pg_xact_commit_timestamp(t.xmin)) * 1000000)::int8 END
             FROM {table} t
             LEFT JOIN pgferry.row_stamps s
                    ON s.tbl = 'public.{table}' AND s.key = jsonb_build_array(t.id)
                   AND s.xid % 4294967296 = t.xmin::text::int8
             ORDER BY t.id"
        ),
        &[],
    )
    .await?
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_keeps_rows_without_commit_time_unstamped() -> anyhow::Result<()> {
    // n1 on a server of the test's own, whose commit times it can switch off for the setup.
    let servers = OwnServers::start("unstamped", 1, free_port()? - 1)?;
    track_commit_timestamps(&servers, "SET track_commit_timestamp = off").await?;
    let shared = Endpoints::from_env();
    let endpoints = Endpoints {
        pg: vec![servers.endpoints.pg[0].clone(), shared.pg[1].clone(), shared.pg[2].clone()],
        ..shared
    };
    let mut cluster = Cluster::create_on(endpoints, "unstamped", &["r1", "r1", "r1"], SETUP, &["public.t", "public.u"]).await?;
    track_commit_timestamps(&servers, "RESET track_commit_timestamp").await?;
    let n3 = cluster.nodes.pop().context("three nodes")?;
    cluster.write_config()?;
    cluster.init()?;
    for table in TABLES {
        let rows = rows_and_stamps(&cluster, 0, table).await?;
        ensure!(
            rows.iter().all(|(_, _, ts)| ts.is_none()),
            "n1's rows of {table} must have no commit time for this test: {rows:?}"
        );
    }

    // n2 updates row 1 of each table; n1's apply does not run, so n1 has not applied them when
    // its snapshot is taken.
    let captures = [cluster.spawn("capture", 0)?, cluster.spawn("capture", 1)?];
    let n2 = cluster.sql(1).await?;
    n2.batch_execute("UPDATE t SET v = 'n2' WHERE id = 1").await?;
    n2.batch_execute("UPDATE u SET v = 'n2' WHERE id = 1").await?;
    cluster.wait_published(1, Duration::from_secs(60)).await?;

    let mut cluster3 = cluster.clone();
    cluster3.nodes.push(n3);
    cluster3.write_config()?;
    let out = cluster3.pgferry(&["node", "add", &cluster3.nodes[2].name, "--copy-from", &cluster3.nodes[0].name])?;
    ensure!(
        out.status.success(),
        "node add failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The copy keeps n1's stamps: the rows without a commit time have none on n3 either.
    for table in TABLES {
        let (on_n1, on_n3) = (rows_and_stamps(&cluster3, 0, table).await?, rows_and_stamps(&cluster3, 2, table).await?);
        eprintln!("{table} right after the copy: n1 {on_n1:?}, n3 {on_n3:?}");
    }

    drop(captures);
    let _services: Vec<_> = (0..3).map(|i| cluster3.spawn("run", i)).collect::<Result<_, _>>()?;
    for table in TABLES {
        // n1 applies n2's update over its unstamped row.
        let n1 = cluster3.sql(0).await?;
        wait_until(&format!("n2's update of {table} on n1"), Duration::from_secs(90), || async {
            Ok(n1.query_one(&format!("SELECT v = 'n2' FROM {table} WHERE id = 1"), &[]).await?.get::<_, bool>(0))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster3.logs()))?;
    }
    // n1 has applied both of n2's transactions: its progress for n2 is n2's last commit.
    let n2_name = cluster3.nodes[1].name.clone();
    let n2_lsn: String = cluster3
        .sql(0)
        .await?
        .query_one("SELECT max(commit_lsn)::text FROM pgferry.apply_progress WHERE origin = $1", &[&n2_name])
        .await?
        .get(0);
    let n3 = cluster3.sql(2).await?;
    wait_until("n3's apply past n2's updates", Duration::from_secs(90), || async {
        let row = n3
            .query_one(
                "SELECT coalesce(max(commit_lsn) >= $2::text::pg_lsn, false) FROM pgferry.apply_progress WHERE origin = $1",
                &[&n2_name, &n2_lsn],
            )
            .await?;
        Ok(row.get::<_, bool>(0))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster3.logs()))?;

    // Both tables' outcomes first (each path's), then the checks.
    let mut outcomes = Vec::new();
    for table in TABLES {
        let all: Vec<_> = [
            rows_and_stamps(&cluster3, 0, table).await?,
            rows_and_stamps(&cluster3, 1, table).await?,
            rows_and_stamps(&cluster3, 2, table).await?,
        ]
        .into();
        eprintln!("{table} at the end: n1 {:?}, n2 {:?}, n3 {:?}", all[0], all[1], all[2]);
        let conflicts = (
            cluster3.conflicts_on(0, &format!("public.{table}")).await?,
            cluster3.conflicts_on(2, &format!("public.{table}")).await?,
        );
        eprintln!("{table} conflicts: n1 {:?}, n3 {:?}", conflicts.0, conflicts.1);
        outcomes.push((table, all, conflicts));
    }
    for (table, all, conflicts) in outcomes {
        // n2's own commit of its update (n2's server tracks commit times).
        let n2_ts = all[1].first().and_then(|r| r.2);
        assert!(n2_ts.is_some(), "{table}: n2's update has a commit time on n2");
        for (i, rows) in all.iter().enumerate() {
            let values: Vec<(i32, &str)> = rows.iter().map(|(id, v, _)| (*id, v.as_str())).collect();
            assert_eq!(values, vec![(1, "n2"), (2, "old")], "{table} on node {}: n2's row 1 everywhere", i + 1);
            assert_eq!(rows[0].2, n2_ts, "{table} on node {}: row 1 stamped by n2's commit", i + 1);
        }
        assert_eq!(all[2], all[0], "{table}: the new node holds n1's rows with n1's stamps (row 2: none)");
        assert_eq!(conflicts.0, conflicts.1, "{table}: n1 and n3 settled n2's update alike");
    }
    drop(_services);
    cluster3.cleanup().await?;
    drop(servers);
    Ok(())
}
