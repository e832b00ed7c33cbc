//! `pgferry conflicts list|show|resolve` on two nodes under the `manual` resolver.
//!
//! n1 inserts keys 1 and 2 with v = 'n1', n2 the same keys with v = 'n2', and n1 deletes key 3
//! while n2 updates it, all while apply is stopped; then apply runs: each node keeps its own
//! rows and parks the other's changes (`insert_exists` on keys 1 and 2; key 3: n1
//! `update_deleted`, n2 `delete_origin_differs`). The test lists the parked conflicts on both
//! nodes, shows one, resolves key 1 on n1 taking the remote row ('n2'), key 2 on n2 with given
//! values and key 3 on n2 taking the remote delete, and checks that
//! the table ends identical on both nodes with no parked conflict left and none recorded anew
//! (the resolution writes replicate, and apply does not park a change equal to the local row).
//! Resolving again, or an unknown id, fails naming the node and the id.

use std::time::Duration;

use pgferry_integration_tests::{wait_until, Cluster};
use serde_json::Value;

const SETUP: &str = "CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL);
                     CREATE TABLE marker (node text PRIMARY KEY);";

fn ok(out: &std::process::Output, what: &str) -> anyhow::Result<String> {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        anyhow::bail!("{what} failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(stdout)
}

fn fails(out: &std::process::Output, what: &str) -> String {
    assert!(
        !out.status.success(),
        "{what} should fail: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_show_and_resolve_parked_conflicts() -> anyhow::Result<()> {
    let mut cluster = Cluster::create("cfcli", &["r1", "r1"], SETUP, &["public.t", "public.marker"]).await?;
    cluster.replication_toml = "resolver = \"manual\"".into();
    cluster.write_config()?;
    cluster.init()?;
    let (name1, name2) = (cluster.nodes[0].name.clone(), cluster.nodes[1].name.clone());
    let n1 = cluster.sql(0).await?;
    let n2 = cluster.sql(1).await?;
    let _captures = (cluster.spawn("capture", 0)?, cluster.spawn("capture", 1)?);
    let applies = (cluster.spawn("apply", 0)?, cluster.spawn("apply", 1)?);
    n1.batch_execute("INSERT INTO t VALUES (3, 'base'); INSERT INTO marker VALUES ('start')")
        .await?;
    cluster.wait_converged("marker", Duration::from_secs(60)).await?;
    cluster.wait_converged("t", Duration::from_secs(60)).await?;
    drop(applies);

    // Concurrent inserts of the same keys, then apply on both.
    n1.batch_execute(
        "INSERT INTO t VALUES (1, 'n1'), (2, 'n1'); DELETE FROM t WHERE id = 3; INSERT INTO marker VALUES ('n1');",
    )
    .await?;
    n2.batch_execute(
        "INSERT INTO t VALUES (1, 'n2'), (2, 'n2'); UPDATE t SET v = 'n2' WHERE id = 3;
         INSERT INTO marker VALUES ('n2');",
    )
    .await?;
    let _applies = (cluster.spawn("apply", 0)?, cluster.spawn("apply", 1)?);
    let markers = |want: i64| {
        let (n1, n2) = (&n1, &n2);
        async move {
            wait_until(
                &format!("{want} markers on both nodes"),
                Duration::from_secs(60),
                || async move {
                    let a: i64 = n1.query_one("SELECT count(*) FROM marker", &[]).await?.get(0);
                    let b: i64 = n2.query_one("SELECT count(*) FROM marker", &[]).await?.get(0);
                    Ok(a == want && b == want)
                },
            )
            .await
        }
    };
    markers(3)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;

    // list --parked --json: both keys parked on both nodes, each the other node's insert.
    let listed = json_lines(&ok(
        &cluster.pgferry(&["conflicts", "list", "--parked", "--json"])?,
        "list",
    )?);
    assert_eq!(listed.len(), 6, "{listed:?}");
    let id_of = |node: &str, key: i64| -> i64 {
        let c = listed
            .iter()
            .find(|c| c["node"] == node && c["key"] == serde_json::json!([key]))
            .unwrap_or_else(|| panic!("no parked conflict on {node} for key {key}: {listed:?}"));
        assert_eq!(c["table"], "public.t");
        let want = match (key, node == name1) {
            (3, true) => "update_deleted",
            (3, false) => "delete_origin_differs",
            _ => "insert_exists",
        };
        assert_eq!(c["type"], want);
        assert_eq!(c["resolution"], "parked");
        assert_eq!(c["resolved_at"], Value::Null);
        let other = if node == name1 { &name2 } else { &name1 };
        assert_eq!(c["remote_origin"], other.as_str());
        c["id"].as_i64().expect("numeric id")
    };
    let (k1_on_n1, k2_on_n2) = (id_of(&name1, 1), id_of(&name2, 2));
    id_of(&name2, 1);
    id_of(&name1, 2);
    let (k3_on_n2, _) = (id_of(&name2, 3), id_of(&name1, 3));
    // --node and --table filter; the readable form has a header.
    let one = json_lines(&ok(
        &cluster.pgferry(&["conflicts", "list", "--node", &name1, "--table", "t", "--json"])?,
        "list",
    )?);
    assert_eq!(one.len(), 3, "{one:?}");
    let table = ok(&cluster.pgferry(&["conflicts", "list", "--limit", "1"])?, "list")?;
    assert!(table.starts_with("ID") && table.lines().count() == 3, "{table}");
    // --summary: per node, the count by table, type and resolution.
    let counts = json_lines(&ok(&cluster.pgferry(&["conflicts", "list", "--summary", "--json"])?, "list --summary")?);
    let count = |node: &str, ty: &str| -> i64 {
        counts
            .iter()
            .filter(|c| c["node"] == node && c["type"] == ty && c["resolution"] == "parked" && c["table"] == "public.t")
            .map(|c| c["count"].as_i64().expect("numeric count"))
            .sum()
    };
    assert_eq!((count(&name1, "insert_exists"), count(&name1, "update_deleted")), (2, 1), "{counts:?}");
    assert_eq!((count(&name2, "insert_exists"), count(&name2, "delete_origin_differs")), (2, 1), "{counts:?}");
    let summary = ok(&cluster.pgferry(&["conflicts", "list", "--summary"])?, "list --summary")?;
    assert!(summary.starts_with("NODE") && summary.contains("insert_exists") && summary.contains("parked"), "{summary}");

    // show: both rows, origins and the commit LSN.
    let shown = ok(
        &cluster.pgferry(&["conflicts", "show", "--node", &name1, &k1_on_n1.to_string()])?,
        "show",
    )?;
    assert!(shown.contains("insert_exists") && shown.contains("parked"), "{shown}");
    assert!(shown.contains(&format!("local row (origin {name1}")), "{shown}");
    assert!(
        shown.contains(&format!("remote insert (origin {name2}")) && shown.contains("commit LSN"),
        "{shown}"
    );
    assert!(
        shown.contains("\"n1\"") && shown.contains("\"n2\""),
        "both rows: {shown}"
    );
    let shown: Value = serde_json::from_str(&ok(
        &cluster.pgferry(&["conflicts", "show", "--node", &name1, &k1_on_n1.to_string(), "--json"])?,
        "show --json",
    )?)?;
    assert_eq!(shown["local_row"]["v"], "n1");
    assert_eq!(shown["remote_row"]["v"], "n2");
    assert_eq!(shown["remote_op"], "c");

    // resolve: key 1 on n1 takes the remote row; key 2 on n2 takes given values.
    let out = ok(
        &cluster.pgferry(&[
            "conflicts",
            "resolve",
            "--node",
            &name1,
            &k1_on_n1.to_string(),
            "--take",
            "remote",
        ])?,
        "resolve --take remote",
    )?;
    assert!(
        out.contains(&format!("node {name2}: conflicts")),
        "the peer's conflict is resolved too: {out}"
    );
    ok(
        &cluster.pgferry(&[
            "conflicts",
            "resolve",
            "--node",
            &name2,
            &k2_on_n2.to_string(),
            "--take",
            "values",
            "--values",
            r#"{"v": "it's merged"}"#,
        ])?,
        "resolve --take values",
    )?;
    let out = ok(
        &cluster.pgferry(&[
            "conflicts",
            "resolve",
            "--node",
            &name2,
            &k3_on_n2.to_string(),
            "--take",
            "remote",
        ])?,
        "resolve --take remote (a delete)",
    )?;
    assert!(out.contains("row deleted"), "{out}");
    // Each resolution write replicated (markers written after them have arrived).
    n1.batch_execute("INSERT INTO marker VALUES ('n1 after')").await?;
    n2.batch_execute("INSERT INTO marker VALUES ('n2 after')").await?;
    markers(5)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;
    cluster.wait_converged("t", Duration::from_secs(30)).await?;
    for (node, c) in [(&name1, &n1), (&name2, &n2)] {
        let rows: Vec<(i32, String)> = c
            .query("SELECT id, v FROM t ORDER BY id", &[])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert_eq!(
            rows,
            vec![(1, "n2".to_string()), (2, "it's merged".to_string())],
            "rows on {node}"
        );
        let (all, open): (i64, i64) = c
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE resolution = 'parked' AND resolved_at IS NULL) FROM pgferry.conflicts",
                &[],
            )
            .await
            .map(|r| (r.get(0), r.get(1)))?;
        assert_eq!((all, open), (3, 0), "conflicts on {node}: none new, none parked");
    }
    let by: String = n1
        .query_one("SELECT resolved_by FROM pgferry.conflicts WHERE id = $1", &[&k1_on_n1])
        .await?
        .get(0);
    assert_eq!(by, "remote");
    let left = ok(&cluster.pgferry(&["conflicts", "list", "--parked", "--json"])?, "list")?;
    assert!(left.trim().is_empty(), "nothing parked: {left}");

    // Errors name the node and the id.
    let again = fails(
        &cluster.pgferry(&[
            "conflicts",
            "resolve",
            "--node",
            &name1,
            &k1_on_n1.to_string(),
            "--take",
            "local",
        ])?,
        "resolving twice",
    );
    assert!(
        again.contains(&format!("conflict {k1_on_n1} on node {name1} was already resolved")),
        "{again}"
    );
    let unknown = fails(
        &cluster.pgferry(&["conflicts", "resolve", "--node", &name2, "999999", "--take", "remote"])?,
        "resolving an unknown id",
    );
    assert!(
        unknown.contains(&format!("node {name2} has no conflict with id 999999")),
        "{unknown}"
    );
    let kept: i64 = n1
        .query_one(
            "INSERT INTO pgferry.conflicts (tbl, key, conflict_type, resolver, resolution, remote_op, remote_origin,
                 remote_commit_ts, remote_commit_lsn)
             VALUES ('public.t', '[1]', 'insert_exists', 'keep_local', 'keep_local', 'c', $1, now(), '0/0')
             RETURNING id",
            &[&name2],
        )
        .await?
        .get(0);
    let not_parked = fails(
        &cluster.pgferry(&[
            "conflicts",
            "resolve",
            "--node",
            &name1,
            &kept.to_string(),
            "--take",
            "remote",
        ])?,
        "resolving a conflict that is not parked",
    );
    assert!(
        not_parked.contains(&format!(
            "conflict {kept} on node {name1} is not parked (its resolution is keep_local)"
        )),
        "{not_parked}"
    );

    drop(_applies);
    drop(_captures);
    cluster.cleanup().await
}
