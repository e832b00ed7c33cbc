//! `pgferry replay` against running nodes. Every transaction bumps its node's own counter row
//! (`n`, a delta column: apply adds `new − old`, so a transaction applied twice shows as a
//! count one too high) and inserts one log row.
//!
//! - Replaying a range a node already applied, without `--force`, is a no-op: every
//!   transaction is skipped as already applied, the rows stay as they are.
//! - Restore and roll forward: n2 is dumped (pg_dump, with pgferry's schema), all nodes write
//!   more, n2's database is destroyed and restored from the dump, `pgferry init` recreates its
//!   slot, and replay brings it forward — the other origins from the positions in the dump's
//!   `pgferry.apply_progress` (dedup skips whatever the dump already holds), n2's own changes
//!   since the dump with `--force --after-lsn <LSN of the dump>`. Then n2 equals the others and
//!   every counter is exact.
//! - `pgferry node rebuild` of a damaged node from a peer while another node writes (replay is
//!   how the rebuild gets the node's own transactions the peer lacked).

use std::process::Command;
use std::time::Duration;

use pgferry_integration_tests::{wait_until, Cluster};

const SETUP: &str = "
CREATE TABLE counters (id int PRIMARY KEY, n bigint NOT NULL);
ALTER TABLE counters REPLICA IDENTITY FULL;
INSERT INTO counters SELECT g, 0 FROM generate_series(1, 3) g;
CREATE TABLE log (id bigint PRIMARY KEY, node int NOT NULL, note text);";

async fn cluster(test: &str, regions: &[&str]) -> anyhow::Result<Cluster> {
    let mut c = Cluster::create(test, regions, SETUP, &["public.counters", "public.log"]).await?;
    c.replication_toml = "[replication.table.\"public.counters\"]\ndelta_columns = [\"n\"]\n".into();
    c.write_config()?;
    c.init()?;
    Ok(c)
}

/// `count` transactions on node `i`, numbered from `first`: bump its counter, log a row.
async fn bump(cluster: &Cluster, i: usize, first: i64, count: i64) -> anyhow::Result<()> {
    bump_on(cluster.sql(i).await?, i as i64 + 1, first, count, Duration::ZERO).await
}

/// [`bump`] on a session of node number `node` (1-based), pausing `pause` between transactions.
async fn bump_on(c: tokio_postgres::Client, node: i64, first: i64, count: i64, pause: Duration) -> anyhow::Result<()> {
    for k in first..first + count {
        c.batch_execute(&format!(
            "BEGIN; UPDATE counters SET n = n + 1 WHERE id = {node};
             INSERT INTO log VALUES ({}, {node}, 'txn {k}'); COMMIT;",
            node * 1_000_000 + k
        ))
        .await?;
        tokio::time::sleep(pause).await;
    }
    Ok(())
}

async fn counters(cluster: &Cluster, i: usize) -> anyhow::Result<Vec<(i32, i64)>> {
    let c = cluster.sql(i).await?;
    Ok(c.query("SELECT id, n FROM counters ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

fn replay(cluster: &Cluster, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["replay"];
    all.extend_from_slice(args);
    let out = cluster.pgferry(&all)?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("pgferry {}:\n{stdout}{}", all.join(" "), String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(out.status.success(), "pgferry replay failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(stdout)
}

/// A PostgreSQL client program: from `PGFERRY_PG_BIN` (deploy/local's directory of the
/// server's programs, so pg_dump matches the server), else from the PATH.
fn pg_program(name: &str) -> Command {
    match std::env::var_os("PGFERRY_PG_BIN") {
        Some(dir) => Command::new(std::path::Path::new(&dir).join(name)),
        None => Command::new(name),
    }
}

fn run_tool(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_applied_range_without_force_changes_nothing() -> anyhow::Result<()> {
    let cluster = cluster("replaynoop", &["r1", "r1"]).await?;
    let started = now_ms()? - 1_000;
    let mut services: Vec<_> = (0..2).map(|i| cluster.spawn("run", i)).collect::<Result<_, _>>()?;
    bump(&cluster, 0, 1, 20).await?;
    let print = cluster.wait_converged("log", Duration::from_secs(60)).await?;
    cluster.wait_converged("counters", Duration::from_secs(60)).await?;
    assert_eq!(counters(&cluster, 1).await?, vec![(1, 20), (2, 0), (3, 0)]);

    services[1].kill();
    cluster.wait_apply_gone(1).await?;
    let n1 = cluster.nodes[0].name.clone();
    let n2 = cluster.nodes[1].name.clone();
    let out = replay(&cluster, &["--node", &n2, "--from-time", &started.to_string()])?;
    assert!(out.contains(&format!("{n2} <- {n1}: 0 transactions applied, 20 skipped")), "{out}");
    let out = replay(&cluster, &["--node", &n2, "--origin", &n1, "--from-offset", "0", "-q"])?;
    assert!(out.contains("0 transactions applied, 20 skipped"), "{out}");
    assert_eq!(counters(&cluster, 1).await?, vec![(1, 20), (2, 0), (3, 0)], "no transaction applied twice");
    assert_eq!(cluster.fingerprint(1, "log").await?, print);

    // Apply resumes as before.
    services[1] = cluster.spawn("run", 1)?;
    bump(&cluster, 0, 21, 5).await?;
    cluster.wait_converged("log", Duration::from_secs(60)).await?;
    cluster.wait_converged("counters", Duration::from_secs(60)).await?;
    assert_eq!(counters(&cluster, 1).await?, vec![(1, 25), (2, 0), (3, 0)]);
    drop(services);
    cluster.cleanup().await
}

fn now_ms() -> anyhow::Result<i64> {
    Ok(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_from_dump_and_replay_rolls_the_node_forward_exactly() -> anyhow::Result<()> {
    let cluster = cluster("replayrestore", &["r1", "r1", "r2"]).await?;
    let mut services: Vec<_> = (0..3).map(|i| cluster.spawn("run", i)).collect::<Result<_, _>>()?;
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    let (k1, k2) = (25, 25);
    for i in 0..3 {
        bump(&cluster, i, 1, k1).await?;
    }
    cluster.wait_converged("log", Duration::from_secs(90)).await?;
    cluster.wait_converged("counters", Duration::from_secs(60)).await?;

    // The dump of n2 (its apply keeps running; nothing writes on n2 itself meanwhile, so the
    // LSN read just before is where n2's own changes in the dump end).
    let dump_time = now_ms()?;
    let n2 = cluster.sql(1).await?;
    let dump_lsn: String = n2.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
    let dump = cluster.dir.join("n2.dump");
    run_tool(pg_program("pg_dump").arg("-Fc").arg("-f").arg(&dump).arg(&cluster.nodes[1].dsn))?;

    for i in 0..3 {
        bump(&cluster, i, k1 + 1, k2).await?;
    }
    cluster.wait_converged("log", Duration::from_secs(90)).await?;
    let expected = counters(&cluster, 0).await?;
    assert_eq!(expected, vec![(1, k1 + k2), (2, k1 + k2), (3, k1 + k2)]);

    // Destroy n2: stop it, drop its slot and database; restore the dump into a new database.
    services[1].kill();
    drop(n2);
    let admin = pgferry_integration_tests::connect(&cluster.endpoints.pg[1]).await?;
    let db = cluster.nodes[1].dsn.rsplit('/').next().unwrap_or_default().to_string();
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
            &[&db],
        )
        .await?;
    let slot = cluster.slot_of(1);
    wait_until("n2's slot to be free", Duration::from_secs(30), || async {
        let dropped = admin
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
                &[&slot],
            )
            .await?;
        Ok(dropped == 1)
    })
    .await?;
    admin.batch_execute(&format!("DROP DATABASE \"{db}\" WITH (FORCE)")).await?;
    admin.batch_execute(&format!("CREATE DATABASE \"{db}\"")).await?;
    run_tool(pg_program("pg_restore").arg("-d").arg(&cluster.nodes[1].dsn).arg(&dump))?;
    assert_eq!(
        counters(&cluster, 1).await?,
        vec![(1, k1), (2, k1), (3, k1)],
        "the restored n2 is the dump"
    );
    cluster.init()?;

    // Where the dump says each other origin was applied up to.
    let restored = cluster.sql(1).await?;
    let from_n1: i64 = restored
        .query_one("SELECT kafka_offset FROM pgferry.apply_progress WHERE origin = $1", &[&names[0]])
        .await?
        .get(0);
    let from_offset = (from_n1 + 1).to_string();
    replay(&cluster, &["--node", &names[1], "--origin", &names[0], "--from-offset", &from_offset])?;
    // n3 from well before the dump: dedup skips what the dump holds.
    let early = (dump_time - 60_000).to_string();
    let out = replay(&cluster, &["--node", &names[1], "--origin", &names[2], "--from-time", &early])?;
    assert!(out.contains(&format!("{k2} transactions applied, {k1} skipped")), "{out}");
    // n2's own changes after the dump.
    let out = replay(
        &cluster,
        &["--node", &names[1], "--origin", &names[1], "--from-time", &early, "--force", "--after-lsn", &dump_lsn],
    )?;
    assert!(out.contains(&format!("{k2} transactions applied")), "{out}");

    services[1] = cluster.spawn("run", 1)?;
    cluster.wait_converged("log", Duration::from_secs(90)).await?;
    cluster.wait_converged("counters", Duration::from_secs(60)).await?;
    for i in 0..3 {
        assert_eq!(counters(&cluster, i).await?, expected, "node {i}: every transaction exactly once");
    }
    // And replication goes on from the restored n2.
    bump(&cluster, 1, k1 + k2 + 1, 3).await?;
    cluster.wait_converged("counters", Duration::from_secs(60)).await?;
    assert_eq!(counters(&cluster, 2).await?[1], (2, k1 + k2 + 3));
    drop(services);
    cluster.cleanup().await
}

/// `pgferry node rebuild n2 --copy-from n3` while n1 keeps writing: n2 is damaged (rows
/// deleted and changed locally, unpublished), and n3 had not applied n2's last transactions
/// (its pgferry was down), so the rebuild must copy n3's snapshot, resume every origin from
/// it, and replay n2's own transactions that n3 lacked. Afterwards every node has every row
/// and every counter is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_rebuild_from_a_peer_while_others_write() -> anyhow::Result<()> {
    let cluster = cluster("rebuild", &["r1", "r1", "r2"]).await?;
    let mut services: Vec<_> = (0..3).map(|i| cluster.spawn("run", i)).collect::<Result<_, _>>()?;
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    for i in 0..3 {
        bump(&cluster, i, 1, 20).await?;
    }
    cluster.wait_converged("log", Duration::from_secs(90)).await?;

    // n3 stops; n2 writes 5 more (published, not applied on n3); then n2 stops and is damaged.
    services[2].kill();
    bump(&cluster, 1, 21, 5).await?;
    cluster.wait_published(1, Duration::from_secs(60)).await?;
    services[1].kill();
    cluster.wait_apply_gone(1).await?;
    cluster
        .write_unpublished(1, "damage", "DELETE FROM log WHERE id % 3 = 0; UPDATE counters SET n = 999 WHERE id = 1")
        .await?;

    // n1 writes all along; n3 writes too (published once it runs again).
    let writers = {
        let one = bump_on(cluster.sql(0).await?, 1, 21, 40, Duration::from_millis(20));
        let three = bump_on(cluster.sql(2).await?, 3, 21, 20, Duration::ZERO);
        tokio::spawn(async move { tokio::try_join!(one, three).map(|_| ()) })
    };

    let out = cluster.pgferry(&["node", "rebuild", &names[1], "--copy-from", &names[2]])?;
    eprintln!(
        "pgferry node rebuild:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "rebuild failed");
    services[1] = cluster.spawn("run", 1)?;
    services[2] = cluster.spawn("run", 2)?;
    writers.await??;
    cluster.wait_converged("log", Duration::from_secs(120)).await?;
    cluster.wait_converged("counters", Duration::from_secs(60)).await?;
    for i in 0..3 {
        assert_eq!(
            counters(&cluster, i).await?,
            vec![(1, 60), (2, 25), (3, 40)],
            "node {i}: every transaction exactly once"
        );
    }
    let log = cluster.sql(1).await?;
    let rows: i64 = log.query_one("SELECT count(*) FROM log", &[]).await?.get(0);
    assert_eq!(rows, 60 + 25 + 40);
    drop(services);
    cluster.cleanup().await
}
