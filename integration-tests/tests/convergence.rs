//! Convergence under frequent conflicts: three nodes, a writer on every node doing random
//! inserts, updates and deletes on a small shared key space for 60 s, plus transfers and
//! deposits on a table whose `balance` is a delta column, while n3's apply is paused (SIGSTOP)
//! and resumed a few times. After quiescing every node holds exactly the same tables, the sum
//! of balances equals the initial sum plus every committed deposit, and the conflicts each node
//! settled are recorded in its `pgferry.conflicts`. Tombstones are collected with a 2 s margin
//! throughout, so collection must never drop one a late change still needed.

use std::time::{Duration, Instant};

use pgferry_integration_tests::Cluster;

const SETUP: &str = "
CREATE TABLE kv (id int PRIMARY KEY, v text NOT NULL, writes int NOT NULL DEFAULT 0);
CREATE TABLE accounts (id int PRIMARY KEY, balance numeric(20,2) NOT NULL, last_writer text);
ALTER TABLE accounts REPLICA IDENTITY FULL;";
const ACCOUNTS: u64 = 10;
const KEYS: u64 = 20;
const RUN: Duration = Duration::from_secs(60);

// Seeded per writer (the seed is printed, so a failure can be replayed).
use pgferry_integration_tests::XorShift as Rng;

/// Random writes on node `i` until `until`; returns how many statements committed and the sum
/// of the deposits (in cents) that committed.
async fn writer(cluster: &Cluster, i: usize, seed: u64, until: Instant) -> anyhow::Result<(u64, i64)> {
    let mut c = cluster.sql(i).await?;
    let mut rng = Rng(seed);
    let (mut done, mut deposited) = (0, 0i64);
    let me = format!("n{}", i + 1);
    while Instant::now() < until {
        let id = rng.below(KEYS) as i32 + 1;
        let v = format!("n{}-{}", i + 1, rng.below(1_000_000));
        let (a, b) = (rng.below(ACCOUNTS) as i32 + 1, rng.below(ACCOUNTS) as i32 + 1);
        let cents = rng.below(10_000) as i64 + 1;
        let amount = format!("{}.{:02}", cents / 100, cents % 100);
        let r = match rng.below(14) {
            10 | 11 => {
                // A transfer: two delta updates in one transaction (the sum does not change).
                let t = c.transaction().await?;
                let r = async {
                    t.execute("UPDATE accounts SET balance = balance - $2::text::numeric, last_writer = $3 WHERE id = $1", &[&a, &amount, &me]).await?;
                    t.execute("UPDATE accounts SET balance = balance + $2::text::numeric, last_writer = $3 WHERE id = $1", &[&b, &amount, &me]).await?;
                    t.commit().await
                }
                .await;
                r.map(|_| 0)
            }
            12 | 13 => {
                let r = c
                    .execute("UPDATE accounts SET balance = balance + $2::text::numeric, last_writer = $3 WHERE id = $1", &[&a, &amount, &me])
                    .await;
                if r.is_ok() {
                    deposited += cents;
                }
                r
            }
            0..=3 => {
                c.execute(
                    "INSERT INTO kv (id, v) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v, writes = kv.writes + 1",
                    &[&id, &v],
                )
                .await
            }
            4..=7 => c.execute("UPDATE kv SET v = $2, writes = writes + 1 WHERE id = $1", &[&id, &v]).await,
            _ => c.execute("DELETE FROM kv WHERE id = $1", &[&id]).await,
        };
        match r {
            Ok(_) => done += 1,
            // A lock conflict with apply's transaction is the client's to retry; not counted.
            Err(e) if e.code().is_some() => {}
            Err(e) => return Err(e.into()),
        }
        tokio::time::sleep(Duration::from_millis(5 + rng.below(15))).await;
    }
    Ok((done, deposited))
}

fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill").args([sig, &pid.to_string()]).status()?;
    anyhow::ensure!(status.success(), "kill {sig} {pid} failed");
    Ok(())
}

/// (This test once diverged about one run in four: a transfer committed on one node never
/// reached its topic. Capture skipped a transaction whose commit record directly followed a
/// heartbeat; `idle.rs` now builds that case on purpose.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_writers_with_delta_columns_converge() -> anyhow::Result<()> {
    converge().await
}

async fn converge() -> anyhow::Result<()> {
    let mut cluster = Cluster::create("converge", &["r1", "r1", "r2"], SETUP, &["public.kv", "public.accounts"]).await?;
    // Tombstones are collected 2 s after every origin passed them: collection runs all along.
    cluster.replication_toml =
        "tombstone_margin_ms = 2000\n[replication.table.\"public.accounts\"]\ndelta_columns = [\"balance\"]".into();
    cluster.write_config()?;
    cluster.init()?;
    let _services: Vec<_> = (0..2).map(|i| cluster.spawn("run", i)).collect::<Result<_, _>>()?;
    let _capture3 = cluster.spawn("capture", 2)?;
    let apply3 = cluster.spawn("apply", 2)?;

    cluster
        .sql(0)
        .await?
        .batch_execute(&format!("INSERT INTO accounts SELECT g, 1000, 'n1' FROM generate_series(1, {ACCOUNTS}) g"))
        .await?;
    cluster.wait_converged("accounts", Duration::from_secs(60)).await?;
    let base = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64 | 1;
    eprintln!("writer seeds: {base}, {}, {}", base + 2, base + 4);
    let until = Instant::now() + RUN;
    let writers = futures::future::try_join3(
        writer(&cluster, 0, base, until),
        writer(&cluster, 1, base + 2, until),
        writer(&cluster, 2, base + 4, until),
    );
    // n3's apply stops for a few seconds, three times, while everyone writes.
    let pauses = async {
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(8)).await;
            signal(apply3.pid(), "-STOP")?;
            tokio::time::sleep(Duration::from_secs(6)).await;
            signal(apply3.pid(), "-CONT")?;
        }
        anyhow::Ok(())
    };
    let ((w1, w2, w3), ()) = tokio::try_join!(writers, pauses)?;
    eprintln!("committed writes: n1 {}, n2 {}, n3 {}", w1.0, w2.0, w3.0);
    assert!(w1.0 > 100 && w2.0 > 100 && w3.0 > 100, "the writers ran");

    for table in ["kv", "accounts"] {
        if let Err(e) = cluster.wait_converged(table, Duration::from_secs(240)).await {
            // Small tables: show every node's rows so a divergence can be read off.
            for i in 0..3 {
                let rows = cluster.sql(i).await?.query(&format!("SELECT t::text FROM {table} t ORDER BY 1"), &[]).await?;
                let rows: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                eprintln!("{table} on node {i}: {rows:?}");
            }
            return Err(e);
        }
    }
    let deposits = w1.1 + w2.1 + w3.1;
    let want = format!("{}.{:02}", (ACCOUNTS as i64 * 100_000 + deposits) / 100, deposits % 100);
    for i in 0..3 {
        let sum: String = cluster.sql(i).await?.query_one("SELECT sum(balance)::text FROM accounts", &[]).await?.get(0);
        assert_eq!(sum, want, "node {i}: the sum of balances is the initial sum plus every committed deposit");
    }
    let mut total = 0;
    for i in 0..3 {
        let c = cluster.sql(i).await?;
        let rows = c
            .query(
                "SELECT conflict_type, resolution, resolver, remote_origin, remote_commit_lsn::text, key::text
                 FROM pgferry.conflicts",
                &[],
            )
            .await?;
        for r in &rows {
            let (t, res, resolver): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            assert!(
                [
                    "insert_exists",
                    "update_origin_differs",
                    "update_missing",
                    "update_deleted",
                    "delete_origin_differs",
                    "delete_missing"
                ]
                .contains(&t.as_str()),
                "{t}"
            );
            assert!(res == "apply_remote" || res == "keep_local", "{res}");
            assert_eq!(resolver, "last_update_wins");
            let origin: String = r.get(3);
            assert!(cluster.nodes.iter().any(|n| n.name == origin) && origin != cluster.nodes[i].name);
        }
        total += rows.len();
    }
    eprintln!("conflicts recorded: {total}");
    assert!(total > 50, "the key space was small enough for frequent conflicts ({total})");
    drop(apply3);
    drop(_services);
    drop(_capture3);
    cluster.cleanup().await
}
