//! `pgferry diff` and `pgferry repair` on three running nodes with a 50,000-row table (loaded
//! identically on every node before init) and a writer changing other rows on n1 all along:
//! diff finds exactly the differences planted on n2 (a changed value, a value set to NULL, a
//! missing row, an extra row — written under an origin capture does not publish, so they stay
//! on n2), with each node's value, and exit status 1; a dry run prints exactly those changes
//! and writes nothing; repair fixes them without publishing anything from n2; diff then
//! reports agreement (exit status 0). A composite-key table is compared too.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgferry_integration_tests::{read_topic, Cluster};
use serde_json::Value;

const ROWS: i64 = 50_000;

fn setup() -> String {
    format!(
        "CREATE TABLE items (id bigint PRIMARY KEY, grp int NOT NULL, v text, n numeric);
         INSERT INTO items SELECT g, g % 7, md5(g::text), g * 1.5 FROM generate_series(1, {ROWS}) g;
         CREATE TABLE pairs (a int, b text, v text, PRIMARY KEY (a, b));
         INSERT INTO pairs SELECT g % 50, 'k' || (g / 50), md5(g::text) FROM generate_series(1, 3000) g;"
    )
}

/// Updates rows 20001.. and inserts rows 100001.. on n1, each key once, until stopped.
async fn writer(client: tokio_postgres::Client, stop: Arc<AtomicBool>) -> anyhow::Result<u64> {
    let mut k = 0;
    while !stop.load(Ordering::Relaxed) {
        k += 1;
        client
            .batch_execute(&format!(
                "BEGIN; UPDATE items SET v = v || '+' WHERE id = {}; INSERT INTO items VALUES ({}, 0, 'live', 0); COMMIT;",
                20_000 + k,
                100_000 + k
            ))
            .await?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(k)
}

fn diff_json(cluster: &Cluster, table: &str) -> anyhow::Result<(i32, Value)> {
    let out = cluster.pgferry(&["diff", "--table", table, "--json", "--settle-timeout", "60"])?;
    let status = out.status.code().unwrap_or(-1);
    eprintln!("diff {table}: exit {status}\n{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.trim()).map_err(|e| {
        anyhow::anyhow!("diff printed no JSON ({e}): {stdout}\n{}", String::from_utf8_lossy(&out.stderr))
    })?;
    Ok((status, report))
}

fn differing_ids(report: &Value) -> BTreeSet<i64> {
    report["differences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["key"]["id"].as_str()?.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_finds_planted_differences_and_repair_fixes_them() -> anyhow::Result<()> {
    let cluster = Cluster::start("diffrep", &["r1", "r1", "r2"], &setup(), &["public.items", "public.pairs"]).await?;
    let services: Vec<_> = (0..3).map(|i| cluster.spawn("run", i)).collect::<Result<_, _>>()?;
    let (n1, n2, n3) = (&cluster.nodes[0].name, &cluster.nodes[1].name, &cluster.nodes[2].name);

    // Planted on n2 only.
    cluster
        .write_unpublished(
            1,
            "plant",
            "UPDATE items SET v = 'planted' WHERE id = 12345;
             UPDATE items SET n = NULL WHERE id = 40000;
             DELETE FROM items WHERE id = 777;
             INSERT INTO items VALUES (60001, 1, 'extra', 0);
             UPDATE pairs SET v = 'planted' WHERE a = 7 AND b = 'k20'",
        )
        .await?;
    let planted: BTreeSet<i64> = [777, 12345, 40000, 60001].into();

    let stop = Arc::new(AtomicBool::new(false));
    let live = tokio::spawn(writer(cluster.sql(0).await?, stop.clone()));
    // Let the writer's changes start flowing before and during the comparison.
    pgferry_integration_tests::wait_until("the live writer to start", Duration::from_secs(30), || async {
        let c = cluster.sql(2).await?;
        let n: i64 = c.query_one("SELECT count(*) FROM items WHERE id > 100000", &[]).await?.get(0);
        Ok(n >= 10)
    })
    .await?;

    let (status, report) = diff_json(&cluster, "items")?;
    assert_eq!(status, 1, "diff exits 1 when rows differ: {report}");
    assert_eq!(differing_ids(&report), planted, "exactly the planted keys: {report}");
    assert_eq!(report["agree"], Value::Bool(false));
    let by_id = |id: i64| {
        report["differences"]
            .as_array()
            .and_then(|a| a.iter().find(|d| d["key"]["id"] == Value::String(id.to_string())))
            .cloned()
            .unwrap_or(Value::Null)
    };
    let d = by_id(12345);
    assert_eq!(d["values"][n2]["v"], "planted");
    assert_eq!(d["values"][n1]["v"], d["values"][n3]["v"]);
    assert_eq!(d["values"][n1]["id"], 12345);
    assert_eq!(by_id(40000)["values"][n2]["n"], Value::Null);
    assert_eq!(by_id(40000)["values"][n1]["n"], 60000.0);
    assert_eq!(by_id(777)["values"][n2], Value::Null, "missing on n2");
    assert_eq!(by_id(777)["values"][n3]["v"], by_id(777)["values"][n1]["v"]);
    assert_eq!(by_id(60001)["values"][n1], Value::Null, "extra on n2");
    assert_eq!(by_id(60001)["values"][n2]["v"], "extra");

    let (status, pairs) = diff_json(&cluster, "pairs")?;
    assert_eq!(status, 1);
    let keys: Vec<&Value> = pairs["differences"].as_array().into_iter().flatten().map(|d| &d["key"]).collect();
    assert_eq!(keys, vec![&serde_json::json!({"a": "7", "b": "k20"})], "{pairs}");

    // Dry run: exactly the planted changes, nothing written.
    // (Rows the live writer does not touch: below 20000 and the planted ones.)
    let untouched = "SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM items t WHERE id < 20000 OR id IN (12345, 40000, 60001)";
    let n2_sql = cluster.sql(1).await?;
    let before: String = n2_sql.query_one(untouched, &[]).await?.get(0);
    let out = cluster.pgferry(&["repair", "--table", "items", "--source-of-truth", n1, "--nodes", n2, "--dry-run", "-q"])?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "dry run failed: {}", String::from_utf8_lossy(&out.stderr));
    let would: Vec<&str> = text.lines().filter(|l| l.contains(": would ") && !l.contains("would change")).collect();
    assert_eq!(would.len(), 4, "{text}");
    assert!(text.contains(&format!("{n2}: would update {{\"id\":\"12345\"}}: v: \"planted\" → ")), "{text}");
    assert!(text.contains(&format!("{n2}: would update {{\"id\":\"40000\"}}: n: null → 60000.0")), "{text}");
    assert!(text.contains(&format!("{n2}: would insert {{\"id\":\"777\"}}: ")), "{text}");
    assert!(text.contains(&format!("{n2}: would delete {{\"id\":\"60001\"}}: ")), "{text}");
    assert!(text.contains("nothing written"), "{text}");
    let after: String = n2_sql.query_one(untouched, &[]).await?.get(0);
    assert_eq!(after, before, "the dry run changed nothing");

    // Repair n2 (and n3, which matches) from n1; none of it is published by n2's capture.
    let out = cluster.pgferry(&["repair", "--table", "items", "--source-of-truth", n1, "-q"])?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "repair failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("{n2}: 4 rows changed")), "{text}");
    assert!(text.contains(&format!("{n3}: matches {n1}")), "{text}");
    let out = cluster.pgferry(&["repair", "--table", "pairs", "--source-of-truth", n1, "-q"])?;
    assert!(out.status.success(), "repair of pairs failed: {}", String::from_utf8_lossy(&out.stderr));

    stop.store(true, Ordering::Relaxed);
    let live_txns = live.await??;
    assert!(live_txns > 0);
    let (status, report) = diff_json(&cluster, "items")?;
    assert_eq!((status, &report["agree"]), (0, &Value::Bool(true)), "after repair: {report}");
    let (status, report) = diff_json(&cluster, "pairs")?;
    assert_eq!(status, 0, "after repair: {report}");
    cluster.wait_converged("items", Duration::from_secs(60)).await?;

    // n2 never wrote anything of its own: its capture published no change.
    cluster.wait_published(1, Duration::from_secs(60)).await?;
    let from_n2 = read_topic(&cluster.endpoints.kafka, &cluster.topic_of(1))?
        .into_iter()
        .filter(|m| m.header("pgferry-origin") == Some(n2.as_str()) && m.header("pgferry-kind") != Some("heartbeat"))
        .count();
    assert_eq!(from_n2, 0, "n2's capture published planted or repair writes");

    drop(services);
    cluster.cleanup().await
}
