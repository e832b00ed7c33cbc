//! /metrics and /healthz of capture and apply: the counters equal what was written, the lag
//! gauges are there and finite, both services report healthy; a bad `metrics_listen` stops
//! start-up with an error naming the key.

use std::time::Duration;

use pgferry_integration_tests::{free_local_addr, http_get, metric, wait_until, Cluster};

const SETUP: &str = "
CREATE TABLE t (id int PRIMARY KEY, v text);
CREATE TABLE b (id int PRIMARY KEY);";

/// Source transactions written on n1 and what they hold.
const TXNS: u64 = 14;
const CHANGES: u64 = 10 * 3 + 5 + 2 + 2;
const TRUNCATES: u64 = 1;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_written() -> anyhow::Result<()> {
    let cluster = Cluster::start("metrics", &["r1", "r1"], SETUP, &["public.t", "public.b"]).await?;
    let (n1, n2) = (cluster.nodes[0].clone(), cluster.nodes[1].clone());
    // Apply's address comes from the config, capture's from the command line.
    let capture_addr = free_local_addr()?;
    let apply_addr = free_local_addr()?;
    let config = std::fs::read_to_string(&cluster.config_path)?;
    let config = config.replace(
        &format!("name = \"{}\"\n", n2.name),
        &format!("name = \"{}\"\nmetrics_listen = \"{apply_addr}\"\n", n2.name),
    );
    std::fs::write(&cluster.config_path, config)?;
    let _capture = cluster.spawn_with("capture", 0, &["--metrics-listen", &capture_addr])?;
    let _apply = cluster.spawn("apply", 1)?;

    let sql = cluster.sql(0).await?;
    for i in 0..10 {
        let base = i * 3;
        sql.batch_execute(&format!(
            "INSERT INTO t VALUES ({}, 'a'), ({}, 'b'), ({}, 'c')",
            base + 1,
            base + 2,
            base + 3
        ))
        .await?;
    }
    sql.batch_execute("UPDATE t SET v = 'u' WHERE id <= 5").await?;
    sql.batch_execute("DELETE FROM t WHERE id > 28").await?;
    sql.batch_execute("INSERT INTO b VALUES (1), (2)").await?;
    sql.batch_execute("TRUNCATE b").await?;
    let (_, rows) = cluster.wait_converged("t", Duration::from_secs(90)).await?;
    assert_eq!(rows, 28);
    cluster.wait_converged("b", Duration::from_secs(30)).await?;

    let origin = [("node", n2.name.as_str()), ("origin", n1.name.as_str())];
    let node1 = [("node", n1.name.as_str())];
    // Metrics are updated just after each commit: wait for the last one to show.
    wait_until("apply to count every transaction", Duration::from_secs(30), || async {
        let (_, text) = http_get(&apply_addr, "/metrics").await?;
        Ok(metric(&text, "pgferry_apply_transactions_total", &origin) == Some(TXNS as f64))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;
    // The slot poller runs every 5 s.
    wait_until("the slot's retained WAL", Duration::from_secs(30), || async {
        let (_, text) = http_get(&capture_addr, "/metrics").await?;
        Ok(metric(&text, "pgferry_capture_slot_retained_wal_bytes", &node1).is_some())
    })
    .await?;

    let (status, capture) = http_get(&capture_addr, "/metrics").await?;
    assert_eq!(status, 200);
    let c = |name: &str, labels: &[(&str, &str)]| metric(&capture, name, labels);
    assert_eq!(
        c("pgferry_capture_source_transactions_total", &node1),
        Some(TXNS as f64),
        "{capture}"
    );
    let kind = |k: &'static str| [("node", n1.name.as_str()), ("kind", k)];
    assert_eq!(
        c("pgferry_capture_events_total", &kind("change")),
        Some(CHANGES as f64),
        "{capture}"
    );
    assert_eq!(
        c("pgferry_capture_events_total", &kind("truncate")),
        Some(TRUNCATES as f64),
        "{capture}"
    );
    let kafka_txns = c("pgferry_capture_kafka_transactions_total", &node1).unwrap_or(0.0);
    assert!(kafka_txns >= 1.0, "{capture}");
    assert_eq!(
        c("pgferry_capture_kafka_commit_latency_seconds_count", &node1),
        Some(kafka_txns),
        "{capture}"
    );
    let produced = c("pgferry_capture_kafka_produce_latency_seconds_count", &node1).unwrap_or(0.0);
    assert!(produced >= (CHANGES + TRUNCATES) as f64, "{capture}");
    assert!(
        c("pgferry_capture_bytes_total", &node1).unwrap_or(0.0) > 0.0,
        "{capture}"
    );
    let lag = c("pgferry_capture_lag_seconds", &node1).expect("capture lag");
    assert!(lag.is_finite() && lag >= 0.0, "{capture}");
    let retained = c("pgferry_capture_slot_retained_wal_bytes", &node1).expect("retained WAL");
    assert!(retained.is_finite() && retained >= 0.0, "{capture}");
    assert_eq!(c("pgferry_healthy", &[("service", "capture")]), Some(1.0), "{capture}");

    let (status, apply) = http_get(&apply_addr, "/metrics").await?;
    assert_eq!(status, 200);
    let a = |name: &str| metric(&apply, name, &origin);
    assert_eq!(a("pgferry_apply_transactions_total"), Some(TXNS as f64), "{apply}");
    assert_eq!(a("pgferry_apply_rows_total"), Some(CHANGES as f64), "{apply}");
    assert_eq!(a("pgferry_apply_truncates_total"), Some(TRUNCATES as f64), "{apply}");
    let lag = a("pgferry_apply_lag_seconds").expect("apply lag");
    assert!(lag.is_finite() && lag >= 0.0, "{apply}");

    for addr in [&capture_addr, &apply_addr] {
        let (status, body) = http_get(addr, "/healthz").await?;
        assert_eq!((status, body.as_str()), (200, "ok\n"), "{addr}");
    }

    // A bad address is a start-up error naming the key.
    let bad = std::fs::read_to_string(&cluster.config_path)?.replace(&apply_addr, "localhost:9187");
    let bad_path = cluster.dir.join("bad.toml");
    std::fs::write(&bad_path, bad)?;
    let out = std::process::Command::new(pgferry_integration_tests::pgferry_bin())
        .arg("--config")
        .arg(&bad_path)
        .args(["apply", "--node", &n2.name])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("nodes[1].metrics_listen"),
        "{stderr}"
    );

    drop((_capture, _apply));
    cluster.cleanup().await
}

/// While apply cannot reach its database it answers 503 with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_reports_a_failing_service() -> anyhow::Result<()> {
    let cluster = Cluster::start("metrics503", &["r1", "r1"], SETUP, &["public.t"]).await?;
    // Point n2's DSN at a port nobody listens on, after init.
    let dead = free_local_addr()?;
    let config = std::fs::read_to_string(&cluster.config_path)?;
    let n2_dsn = cluster.nodes[1].dsn.clone();
    let host_port = n2_dsn
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default()
        .to_string();
    std::fs::write(
        &cluster.config_path,
        config.replace(&n2_dsn, &n2_dsn.replace(&host_port, &dead)),
    )?;
    let addr = free_local_addr()?;
    let _apply = cluster.spawn_with("apply", 1, &["--metrics-listen", &addr])?;
    wait_until("/healthz to say why apply is down", Duration::from_secs(30), || async {
        let (status, body) = http_get(&addr, "/healthz").await?;
        Ok(status == 503 && body.contains("apply") && body.contains(&dead))
    })
    .await?;
    let (_, body) = http_get(&addr, "/healthz").await?;
    assert!(!body.contains(pgferry_integration_tests::PG_PASSWORD), "{body}");
    drop(_apply);
    cluster.cleanup().await
}
