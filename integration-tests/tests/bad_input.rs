//! Bad configuration and unreachable services: the CLI exits non-zero with exactly one line on
//! stderr that names what is wrong (and never prints a password).

use std::process::Output;

use anyhow::Result;
use pgferry_integration_tests::{Cluster, PG_PASSWORD};

const TABLE: &str = "CREATE TABLE items (id bigint PRIMARY KEY, name text)";

/// Asserts a failure with a single non-empty stderr line; returns that line.
fn single_error_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "expected failure, got {:?}; stderr:\n{stderr}",
        out.status
    );
    eprintln!("stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one stderr line, got {}:\n{stderr}",
        lines.len()
    );
    assert!(!lines[0].trim().is_empty(), "the stderr line is empty");
    lines[0].to_string()
}

/// Rewrites the cluster's config with `edit`.
fn edit_config(cluster: &Cluster, edit: impl FnOnce(String) -> String) -> Result<()> {
    let text = std::fs::read_to_string(&cluster.config_path)?;
    let new = edit(text.clone());
    assert_ne!(new, text, "the edit changed nothing");
    std::fs::write(&cluster.config_path, new)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_config_key_is_named() -> Result<()> {
    let cluster = Cluster::create("badkey", &["r1"], TABLE, &["public.items"]).await?;
    edit_config(&cluster, |t| {
        t.replacen("[cluster]\n", "[cluster]\ncolour = \"red\"\n", 1)
    })?;
    let line = single_error_line(&cluster.pgferry(&["init"])?);
    assert!(line.contains("colour"), "does not name `colour`: {line}");
    cluster.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_without_region_is_named() -> Result<()> {
    let cluster = Cluster::create("noregion", &["r1", "r1"], TABLE, &["public.items"]).await?;
    // Drop the region line of the second node only.
    edit_config(&cluster, |t| {
        let mut seen = 0;
        t.lines()
            .filter(|l| {
                if l.starts_with("region = ") {
                    seen += 1;
                    seen != 2
                } else {
                    true
                }
            })
            .map(|l| format!("{l}\n"))
            .collect()
    })?;
    let line = single_error_line(&cluster.pgferry(&["init"])?);
    assert!(line.contains("region"), "does not name `region`: {line}");
    cluster.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_postgres_is_named_without_password() -> Result<()> {
    let cluster = Cluster::create("badpg", &["r1", "r1"], TABLE, &["public.items"]).await?;
    let dsn = cluster.nodes[1].dsn.clone();
    let (_, rest) = dsn.rsplit_once('@').expect("DSN has user@host");
    let (hostport, _) = rest.split_once('/').expect("DSN has /db");
    let bad = dsn.replacen(hostport, "127.0.0.1:1", 1);
    assert!(bad.contains(&format!(":{PG_PASSWORD}@127.0.0.1:1/")), "{bad}");
    edit_config(&cluster, |t| t.replacen(&dsn, &bad, 1))?;
    let out = cluster.pgferry(&["init"])?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stderr.contains(&format!(":{PG_PASSWORD}@")),
        "the password leaks into stderr:\n{stderr}"
    );
    let line = single_error_line(&out);
    assert!(line.contains("127.0.0.1:1"), "does not name 127.0.0.1:1: {line}");
    cluster.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_kafka_is_named() -> Result<()> {
    let cluster = Cluster::create("badkafka", &["r1"], TABLE, &["public.items"]).await?;
    let kafka = cluster.endpoints.kafka.clone();
    edit_config(&cluster, |t| {
        t.replacen(
            &format!("bootstrap_servers = \"{kafka}\""),
            "bootstrap_servers = \"127.0.0.1:1\"",
            1,
        )
    })?;
    let started = std::time::Instant::now();
    let line = single_error_line(&cluster.pgferry(&["init"])?);
    eprintln!("unreachable kafka: failed after {:?}", started.elapsed());
    assert!(line.contains("127.0.0.1:1"), "does not name 127.0.0.1:1: {line}");
    cluster.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_without_primary_key_is_named() -> Result<()> {
    let cluster = Cluster::create("nopk", &["r1"], "CREATE TABLE nopk (a int)", &["public.nopk"]).await?;
    let line = single_error_line(&cluster.pgferry(&["init"])?);
    assert!(line.contains("public.nopk"), "does not name public.nopk: {line}");
    assert!(line.contains("primary key"), "does not say `primary key`: {line}");
    cluster.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_columns_without_full_replica_identity_are_refused() -> Result<()> {
    let mut cluster = Cluster::create("deltanofull", &["r1"], "CREATE TABLE acct (id int PRIMARY KEY, balance numeric)", &["public.acct"]).await?;
    cluster.replication_toml = "[replication.table.\"public.acct\"]\ndelta_columns = [\"balance\"]".into();
    cluster.write_config()?;
    let line = single_error_line(&cluster.pgferry(&["init"])?);
    assert!(
        line.contains("public.acct") && line.contains("REPLICA IDENTITY FULL") && line.contains("balance"),
        "does not name the table, the column and the fix: {line}"
    );
    cluster.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_named_without_the_password() -> Result<()> {
    let cluster = Cluster::create("badpw", &["r1", "r1"], TABLE, &["public.items"]).await?;
    let wrong = "Not-The-Password-91";
    edit_config(&cluster, |t| {
        t.replacen(&format!(":{PG_PASSWORD}@"), &format!(":{wrong}@"), 1)
    })?;
    let out = cluster.pgferry(&["init"])?;
    let line = single_error_line(&out);
    assert!(!line.contains(wrong), "the password leaks: {line}");
    assert!(line.contains("password authentication failed"), "does not say why: {line}");
    let (_, rest) = cluster.nodes[0].dsn.rsplit_once('@').expect("DSN has user@host");
    let endpoint = rest.split('?').next().unwrap_or(rest);
    assert!(line.contains(endpoint), "does not name {endpoint}: {line}");
    cluster.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_table_is_named() -> Result<()> {
    let cluster = Cluster::create("notable", &["r1"], TABLE, &["public.items", "public.nowhere"]).await?;
    let line = single_error_line(&cluster.pgferry(&["init"])?);
    assert!(line.contains("public.nowhere"), "does not name public.nowhere: {line}");
    cluster.cleanup().await
}
