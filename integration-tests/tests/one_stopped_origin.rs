//! Issue 16, scenario 3, "One stopped origin stops every origin": a change of n3 that n1
//! refuses (a CHECK constraint only n1 has, `on_error = stop`) must hold only n3's stream on n1.
//! While n3's stream fails, waits and retries, n2's changes keep reaching n1 within a few
//! seconds each; n1's `/healthz`, metrics and `pgferry status` name n3 as the origin that waits
//! and why, and not n2. Once the cause is fixed on n1, n3's held changes are applied, nothing
//! was dead-lettered, and all nodes end identical.
//!
//! On the old code the failure restarted n1's whole apply with a growing backoff (0.5 s doubling
//! to 30 s), so n2's rows waited for the next restart: the per-row deadline below fails there.

use std::time::{Duration, Instant};

use pgferry_integration_tests::{free_local_addr, http_get, lag_cell, metric, wait_until, Cluster};

/// How long each of n2's rows may take to reach n1 while n3's stream waits there.
const N2_DEADLINE: Duration = Duration::from_secs(5);


async fn has_row(c: &tokio_postgres::Client, id: i32) -> anyhow::Result<bool> {
    Ok(c.query_one("SELECT count(*) FROM t WHERE id = $1", &[&id])
        .await?
        .get::<_, i64>(0)
        == 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stopped_origin_stops_only_its_own_stream() -> anyhow::Result<()> {
    let mut cluster = Cluster::create(
        "onestop",
        &["r1", "r1", "r1"],
        "CREATE TABLE t (id int PRIMARY KEY, v text, written_on text);",
        &["public.t"],
    )
    .await?;
    let m1 = free_local_addr()?;
    cluster.nodes[0].extra_toml = format!("metrics_listen = \"{m1}\"");
    cluster.write_config()?;
    cluster.init()?;
    let (n1_name, n2_name, n3_name) = (
        cluster.nodes[0].name.clone(),
        cluster.nodes[1].name.clone(),
        cluster.nodes[2].name.clone(),
    );
    let (n1, n2, n3) = (cluster.sql(0).await?, cluster.sql(1).await?, cluster.sql(2).await?);
    // Only n1 refuses 'bad' (DDL replication is off: the constraint stays on n1).
    n1.batch_execute("ALTER TABLE t ADD CONSTRAINT not_bad CHECK (v <> 'bad')")
        .await?;
    let _services: Vec<_> = (0..3).map(|i| cluster.spawn("run", i)).collect::<Result<_, _>>()?;
    n2.batch_execute("INSERT INTO t VALUES (1, 'ok', 'n2')").await?;
    n3.batch_execute("INSERT INTO t VALUES (2, 'ok', 'n3')").await?;
    cluster.wait_converged("t", Duration::from_secs(60)).await?;

    // n3's change that n1 refuses, and one behind it in n3's stream.
    n3.batch_execute("INSERT INTO t VALUES (3, 'bad', 'n3')").await?;
    n3.batch_execute("INSERT INTO t VALUES (4, 'after the bad one', 'n3')")
        .await?;
    wait_until(
        "n1's /healthz to report the refused change",
        Duration::from_secs(60),
        || async {
            let (code, body) = http_get(&m1, "/healthz").await?;
            Ok(code == 503 && body.contains("not_bad"))
        },
    )
    .await?;

    // n2's changes keep arriving on n1 while n3's stream fails over and over (long enough for a
    // restart backoff to grow past the deadline: 0.5 + 1 + 2 + 4 + 8 s).
    let started = Instant::now();
    let mut id = 100;
    while started.elapsed() < Duration::from_secs(20) {
        id += 1;
        n2.execute("INSERT INTO t VALUES ($1, 'from n2', 'n2')", &[&id]).await?;
        let sent = Instant::now();
        wait_until(
            &format!("n2's row {id} on n1 within {N2_DEADLINE:?} while n3's stream waits"),
            N2_DEADLINE,
            || has_row(&n1, id),
        )
        .await?;
        eprintln!("n2's row {id} reached n1 in {:?}", sent.elapsed());
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(
        !has_row(&n1, 3).await? && !has_row(&n1, 4).await?,
        "n3's refused change and the one behind it wait on n1"
    );
    assert!(has_row(&n2, 4).await?, "n2 took n3's changes");

    // n1 names the waiting origin and why, and only that one.
    let (code, body) = http_get(&m1, "/healthz").await?;
    assert_eq!(code, 503, "{body}");
    let line = body
        .lines()
        .find(|l| l.contains(&format!("origin {n3_name} waits (since ")))
        .ok_or_else(|| anyhow::anyhow!("/healthz does not say that {n3_name} waits: {body}"))?;
    assert!(
        line.contains("not_bad") && line.contains("on_error = stop") && line.contains("failures"),
        "{line}"
    );
    assert!(!body.contains(&n2_name), "n2's stream runs and is not named: {body}");
    let (_, text) = http_get(&m1, "/metrics").await?;
    let waiting = |origin: &str| {
        metric(
            &text,
            "pgferry_apply_origin_waiting",
            &[("node", n1_name.as_str()), ("origin", origin)],
        )
    };
    assert_eq!((waiting(&n3_name), waiting(&n2_name)), (Some(1.0), Some(0.0)), "{text}");
    let retries = metric(
        &text,
        "pgferry_apply_origin_retries_total",
        &[("node", n1_name.as_str()), ("origin", n3_name.as_str())],
    );
    assert!(
        retries >= Some(3.0),
        "n3's stream retried alone again and again: {retries:?}"
    );
    let (code, s) = cluster.status_json()?;
    assert_eq!(code, 1, "an origin waits somewhere: {s}");
    let reason = lag_cell(&s, &n3_name, &n1_name)?["waiting"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("not_bad"), "status says why n3 → n1 waits: {s}");
    assert!(
        lag_cell(&s, &n2_name, &n1_name)?["waiting"].is_null(),
        "n2 → n1 does not wait: {s}"
    );
    let text = cluster.pgferry(&["status"])?;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&format!("{n3_name} → {n1_name} waits: ")), "{text}");

    // The operator fixes the cause on n1: n3's changes follow, in order, and the node is healthy.
    n1.batch_execute("ALTER TABLE t DROP CONSTRAINT not_bad").await?;
    let (_, rows) = cluster.wait_converged("t", Duration::from_secs(90)).await?;
    assert_eq!(rows, 4 + (id - 100) as i64);
    wait_until("n1 healthy again", Duration::from_secs(30), || async {
        Ok(http_get(&m1, "/healthz").await?.0 == 200)
    })
    .await?;
    let exceptions: i64 = n1
        .query_one("SELECT count(*) FROM pgferry.exceptions", &[])
        .await?
        .get(0);
    assert_eq!(exceptions, 0, "nothing was dead-lettered");

    // A stream whose session is gone opens a new one by itself (and takes its replication
    // origin back once the old backend has let go of it). PostgreSQL keeps the first 63 bytes
    // of an application name, and the test's long node names make it longer: cut there, the
    // names of n1's two streams' sessions can be the same, and both are killed then.
    let killed: i64 = n1
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = left($1, 63)",
            &[&format!("pgferry-apply-{n1_name}-from-{n2_name}")],
        )
        .await?
        .get(0);
    assert!(killed >= 1, "n1's session applying n2 killed ({killed} sessions)");
    n2.batch_execute("INSERT INTO t VALUES (1000, 'after the session was killed', 'n2')")
        .await?;
    wait_until(
        "n2's row on n1 after its session was killed",
        Duration::from_secs(60),
        || has_row(&n1, 1000),
    )
    .await?;
    cluster.wait_converged("t", Duration::from_secs(60)).await?;
    drop(_services);
    cluster.cleanup().await
}
