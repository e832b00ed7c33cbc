//! `pgferry status`: with n1 → n2 replicating, every node is up, n1's slot streams, the n1 → n2
//! cell has nothing behind and takes its lag from n2's apply metrics; with n2's apply stopped
//! and more writes on n1, the cell counts the messages n2 has not applied and a retention
//! headroom below the topic's retention, n2's health says why, and the exit status is 1.

use std::time::Duration;

use pgferry_integration_tests::{free_local_addr, lag_cell, wait_until, Cluster};


#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_state_lag_and_backlog() -> anyhow::Result<()> {
    let mut cluster = Cluster::create("status", &["r1", "r1"], "CREATE TABLE t (id int PRIMARY KEY);", &["public.t"]).await?;
    let (m1, m2) = (free_local_addr()?, free_local_addr()?);
    cluster.nodes[0].extra_toml = format!("metrics_listen = \"{m1}\"");
    cluster.nodes[1].extra_toml = format!("metrics_listen = \"{m2}\"");
    cluster.write_config()?;
    cluster.init()?;
    let (n1_name, n2_name) = (cluster.nodes[0].name.clone(), cluster.nodes[1].name.clone());
    let _run1 = cluster.spawn("run", 0)?;
    let run2 = cluster.spawn("run", 1)?;
    let n1 = cluster.sql(0).await?;
    n1.batch_execute("INSERT INTO t SELECT generate_series(1, 100)").await?;
    cluster.wait_converged("t", Duration::from_secs(60)).await?;
    wait_until("a healthy status with nothing behind", Duration::from_secs(60), || async {
        let (code, s) = cluster.status_json()?;
        let c = lag_cell(&s, &n1_name, &n2_name)?;
        Ok(code == 0 && c["messages_behind"] == 0 && c["lag_source"] == "metrics")
    })
    .await?;
    let (_, s) = cluster.status_json()?;
    for n in s["nodes"].as_array().into_iter().flatten() {
        assert!(n["down"].is_null(), "{n}");
        assert_eq!(n["capture_slot_active"], true, "{n}");
        assert_eq!(n["health"], "ok", "{n}");
        assert!(n["apply_sessions"].as_i64() >= Some(1), "{n}");
    }

    // n2's node process stops: n1's writes pile up for it.
    drop(run2);
    n1.batch_execute("INSERT INTO t SELECT generate_series(101, 150)").await?;
    n1.batch_execute("INSERT INTO t SELECT generate_series(151, 160)").await?;
    wait_until("the backlog in the status", Duration::from_secs(60), || async {
        let (code, s) = cluster.status_json()?;
        let c = lag_cell(&s, &n1_name, &n2_name)?;
        Ok(code == 1 && c["messages_behind"].as_i64() >= Some(60))
    })
    .await?;
    let (_, s) = cluster.status_json()?;
    let c = lag_cell(&s, &n1_name, &n2_name)?;
    let headroom = c["retention_headroom_ms"].as_i64().unwrap_or(i64::MAX);
    assert!(headroom < 7 * 86_400_000, "headroom counts the age of the oldest unapplied message: {c}");
    let n2 = s["nodes"].as_array().and_then(|a| a.iter().find(|n| n["name"] == n2_name.as_str())).cloned();
    let health = n2.as_ref().and_then(|n| n["health"].as_str()).unwrap_or_default().to_string();
    assert!(health.starts_with("not reached"), "n2's services are down: {health}");
    let text = cluster.pgferry(&["status"])?;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("lag (origin → target)") && text.contains(&n1_name), "{text}");
    drop(_run1);
    cluster.cleanup().await
}
