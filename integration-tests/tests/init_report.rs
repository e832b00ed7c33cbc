//! `pgferry init` reports what it did, one line per node (created, updated, found), and
//! leaves PostgreSQL's notices out of its output unless `PGFERRY_LOG` asks for them.

use std::process::{Command, Output};

use anyhow::{ensure, Result};
use pgferry_integration_tests::naming::PUBLICATION;
use pgferry_integration_tests::{pgferry_bin, Cluster, PG_PASSWORD};

const TABLES: &str = "CREATE TABLE items (id bigint PRIMARY KEY, name text);
                      CREATE TABLE extra (id bigint PRIMARY KEY)";

/// Runs `pgferry init` with `PGFERRY_LOG` set to `log` (unset: `None`); asserts success and
/// that no password is printed; returns stdout and stderr.
fn init(cluster: &Cluster, log: Option<&str>) -> Result<(String, String)> {
    let mut cmd = Command::new(pgferry_bin());
    cmd.arg("--config").arg(&cluster.config_path).arg("init");
    match log {
        Some(filter) => cmd.env("PGFERRY_LOG", filter),
        None => cmd.env_remove("PGFERRY_LOG"),
    };
    let Output { status, stdout, stderr } = cmd.output()?;
    let (stdout, stderr) = (String::from_utf8(stdout)?, String::from_utf8(stderr)?);
    ensure!(status.success(), "init failed ({status}):\n{stdout}\n{stderr}");
    let secret = format!(":{PG_PASSWORD}@");
    ensure!(
        !stdout.contains(&secret) && !stderr.contains(&secret),
        "a password is printed:\n{stdout}\n{stderr}"
    );
    Ok((stdout, stderr))
}

/// The line of node `i`, which must be there exactly once.
fn node_line<'a>(cluster: &Cluster, stdout: &'a str, i: usize) -> &'a str {
    let n = &cluster.nodes[i];
    let endpoint = n.dsn.rsplit_once('@').map_or("", |(_, e)| e);
    let prefix = format!("node {} ({endpoint}): ", n.name);
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with(&prefix)).collect();
    assert_eq!(lines.len(), 1, "one line starting {prefix:?} expected:\n{stdout}");
    lines[0]
}

/// Asserts that each node's line ends with `want(slot, origins)`, given the node's slot and
/// its origins as the report lists them (`origins <a's> and <b's>`).
fn expect_node_lines(cluster: &Cluster, stdout: &str, want: impl Fn(&str, &str) -> String) {
    for (i, node) in cluster.nodes.iter().enumerate() {
        let others: Vec<String> = cluster
            .nodes
            .iter()
            .filter(|o| o.name != node.name)
            .map(|o| cluster.origin_on(i, &o.name))
            .collect();
        let want = want(&cluster.slot_of(i), &format!("origins {}", others.join(" and ")));
        let line = node_line(cluster, stdout, i);
        assert!(line.ends_with(&want), "node {i}: want …{want:?}, got {line:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_reports_one_line_per_node_without_notices() -> Result<()> {
    let mut cluster = Cluster::create("initreport", &["r1", "r1", "r1"], TABLES, &["public.items"]).await?;

    // First run: everything is created.
    let (stdout, stderr) = init(&cluster, None)?;
    eprintln!("first init:\n{stdout}{stderr}");
    expect_node_lines(&cluster, &stdout, |slot, origins| {
        format!("created schema pgferry, publication {PUBLICATION} (1 table), slot {slot}, {origins}, tombstone triggers on 1 table")
    });
    assert_eq!(stdout.lines().count(), 3 + 3, "3 topics and 3 nodes, nothing else:\n{stdout}");
    // Init drops event triggers IF EXISTS and creates tables IF NOT EXISTS: the server's
    // notices about those are not logged at the default level.
    for text in ["NOTICE", "skipping", "does not exist"] {
        assert!(!stderr.contains(text) && !stdout.contains(text), "{text:?} in init's output:\n{stdout}{stderr}");
    }

    // Again, with one more table: the publication changes, the rest is found.
    cluster.tables.push("public.extra".into());
    cluster.write_config()?;
    let (stdout, stderr) = init(&cluster, None)?;
    eprintln!("second init:\n{stdout}{stderr}");
    expect_node_lines(&cluster, &stdout, |slot, origins| {
        format!(
            "created tombstone triggers on 1 table; updated publication {PUBLICATION} (2 tables); found slot {slot}, {origins}, tombstone triggers on 1 table; schema pgferry up to date"
        )
    });
    assert!(!stderr.contains("NOTICE"), "notices in init's output:\n{stderr}");

    // A third time nothing changes; asked for, the notices are there, at debug level.
    let (stdout, stderr) = init(&cluster, Some("debug"))?;
    let line = node_line(&cluster, &stdout, 0);
    assert!(
        line.contains(&format!(": found publication {PUBLICATION} (2 tables), slot")) && !line.contains("created"),
        "{line}"
    );
    let notice = stderr
        .lines()
        .find(|l| l.contains("NOTICE") && l.contains("already exists, skipping"))
        .unwrap_or_else(|| panic!("no notice with PGFERRY_LOG=debug:\n{stderr}"));
    assert!(notice.contains("DEBUG"), "{notice}");
    cluster.cleanup().await
}
