//! Security end to end, with servers of the test's own (ports 26092–26094, 26192–26194,
//! 26431–26432, 26441, 26443–26444) and certificates from `deploy/local/certs.sh`:
//!
//! - a two-node cluster whose capture and apply talk to Kafka over SASL_SSL with SCRAM-SHA-512,
//!   to PostgreSQL over TLS (`sslmode=verify-full`, servers that accept only `hostssl` with
//!   SCRAM-SHA-256) and to the registry through HAProxy (TLS + basic auth); secrets come from
//!   `${file:…}` and `${VAR}`; rows written on both nodes arrive on both; a plaintext client of
//!   the SASL_SSL listener is refused;
//! - one test per bad input: a wrong SASL password, an expired PostgreSQL server certificate
//!   under verify-full, a wrong registry password, a `${file:…}` secret whose file is missing.
//!
//! Every error must say what failed and where, nothing may panic, and no password may appear in
//! any log or output.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Result};
use pgferry_integration_tests::secure::{host_port, OwnKafka, RegistryFront, TestCerts};
use pgferry_integration_tests::{wait_until, Cluster, Endpoints, OwnServers, Service};

const SETUP: &str = "CREATE TABLE t (id int PRIMARY KEY, v text);";

/// A fresh directory for a test's certificates and secret files.
fn test_dir(name: &str) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("pgferry-security-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// `[kafka]` lines for SASL_SSL/SCRAM-SHA-512 with the test CA.
fn kafka_sasl_toml(certs: &TestCerts, password: &str) -> String {
    format!(
        "security_protocol = \"SASL_SSL\"\nsasl_mechanism = \"SCRAM-SHA-512\"\nsasl_username = \"pgferry\"\nsasl_password = \"{password}\"\nssl_ca_file = \"{}\"",
        certs.path("ca.pem")
    )
}

/// `[registry]` lines for basic auth with the test CA.
fn registry_auth_toml(certs: &TestCerts, password: &str) -> String {
    format!(
        "username = \"pgferry\"\npassword = \"{password}\"\nca_file = \"{}\"",
        certs.path("ca.pem")
    )
}

/// HAProxy on `127.0.0.1:<port>` with the test certificate and user `pgferry`/`password`, in
/// front of the shared registry.
async fn registry_front(port: u16, certs: &TestCerts, password: &str, dir: &Path) -> Result<RegistryFront> {
    let shared = Endpoints::from_env();
    let (pem, log) = (certs.file("server-bundle.pem"), dir.join(format!("haproxy-{port}.log")));
    RegistryFront::start(port, &pem, "pgferry", password, &host_port(&shared.registry), &log).await
}

/// Stdout and stderr of a finished command, labelled.
fn output_text(args: &[&str], out: &std::process::Output) -> String {
    format!(
        "$ pgferry {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every `.log` file under `dir`.
fn all_logs(dir: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().extension().is_some_and(|x| x == "log") {
            out += &std::fs::read_to_string(e.path()).unwrap_or_default();
        }
    }
    out
}

/// Fails if any of `secrets` occurs in `haystack`, or anything panicked.
fn assert_clean(haystack: &str, secrets: &[&str]) -> Result<()> {
    ensure!(!haystack.contains("panicked"), "something panicked:\n{haystack}");
    for s in secrets {
        ensure!(
            !haystack.contains(s),
            "a secret appears in the output or logs:\n{haystack}"
        );
    }
    Ok(())
}

/// Waits until `service` logs a line containing every one of `words` (within `timeout`), then
/// ends the service; that line.
async fn wait_for_error(mut service: Service, what: &str, timeout: Duration, words: &[&str]) -> Result<String> {
    let matching = |log: &str| {
        log.lines()
            .find(|l| words.iter().all(|w| l.contains(w)))
            .map(str::to_string)
    };
    wait_until(what, timeout, || async {
        Ok(matching(&std::fs::read_to_string(&service.log)?).is_some())
    })
    .await?;
    service.kill();
    let line = matching(&std::fs::read_to_string(&service.log)?).unwrap_or_default();
    eprintln!("{line}");
    Ok(line)
}

/// Runs `pgferry ARGS`, expecting failure; its output.
fn expect_failure(cluster: &Cluster, args: &[&str]) -> Result<String> {
    let out = cluster.pgferry(args)?;
    let text = output_text(args, &out);
    ensure!(!out.status.success(), "pgferry {args:?} succeeded:\n{text}");
    eprintln!("{text}");
    Ok(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_over_tls_sasl_scram_and_registry_basic_auth() -> Result<()> {
    let pid = std::process::id();
    let dir = test_dir("cluster")?;
    let certs = TestCerts::generate(&dir.join("certs"))?;
    let (kafka_pw, registry_pw, pg_pw) = (
        format!("Kafka-Sasl-{pid}-S3cret"),
        format!("Registry-Basic-{pid}-S3cret"),
        format!("Pg-Scram-{pid}-S3cret"),
    );
    let kafka = OwnKafka::start(
        "security",
        26092,
        &certs.file("server-bundle.pem"),
        "pgferry",
        &kafka_pw,
    )?;
    let mut servers = OwnServers::start_with(
        "security",
        2,
        26430,
        &[
            ("PGFERRY_PG_SSL_CERT", &certs.path("server.pem")),
            ("PGFERRY_PG_SSL_KEY", &certs.path("server.key")),
            ("PGFERRY_PG_SSL_ONLY", "1"),
            ("PGFERRY_PG_PASSWORD", &pg_pw),
        ],
    )?;
    servers.endpoints.pg = (1..=2)
        .map(|i| {
            format!(
                "postgres://postgres:{pg_pw}@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
                26430 + i,
                certs.path("ca.pem")
            )
        })
        .collect();
    let front = registry_front(26443, &certs, &registry_pw, &dir).await?;
    let endpoints = Endpoints {
        pg: servers.endpoints.pg.clone(),
        kafka: kafka.sasl_ssl.clone(),
        registry: front.url.clone(),
    };
    let mut cluster = Cluster::create_on(endpoints, "security", &["r1", "r1"], SETUP, &["public.t"]).await?;

    // The secrets: Kafka's and PostgreSQL's from files, the registry's from the environment.
    let (kafka_pw_file, pg_pw_file) = (dir.join("kafka-password"), dir.join("pg-password"));
    std::fs::write(&kafka_pw_file, format!("{kafka_pw}\n"))?;
    std::fs::write(&pg_pw_file, format!("{pg_pw}\n"))?;
    std::env::set_var("PGFERRY_TEST_REGISTRY_PASSWORD", &registry_pw);
    cluster.kafka_toml = kafka_sasl_toml(&certs, &format!("${{file:{}}}", kafka_pw_file.display()));
    cluster.registry_toml = registry_auth_toml(&certs, "${PGFERRY_TEST_REGISTRY_PASSWORD}");
    cluster.write_config()?;
    let text = std::fs::read_to_string(&cluster.config_path)?;
    let text = text.replace(&format!(":{pg_pw}@"), &format!(":${{file:{}}}@", pg_pw_file.display()));
    std::fs::write(&cluster.config_path, &text)?;
    for s in [&kafka_pw, &registry_pw, &pg_pw] {
        ensure!(!text.contains(s.as_str()), "the config itself holds a secret");
    }

    let mut outputs = Vec::new();
    let mut run = |args: &[&str]| -> Result<std::process::Output> {
        let out = cluster.pgferry(args)?;
        outputs.push(output_text(args, &out));
        Ok(out)
    };
    ensure!(run(&["init"])?.status.success(), "init failed: {outputs:?}");
    let services = (cluster.spawn("run", 0)?, cluster.spawn("run", 1)?);
    cluster
        .sql(0)
        .await?
        .batch_execute("INSERT INTO t SELECT g, 'from n1 ' || g FROM generate_series(1, 50) g")
        .await?;
    cluster
        .sql(1)
        .await?
        .batch_execute("INSERT INTO t SELECT g, 'from n2 ' || g FROM generate_series(51, 100) g")
        .await?;
    let (_, rows) = cluster.wait_converged("t", Duration::from_secs(120)).await?;
    ensure!(rows == 100, "expected 100 rows on every node, found {rows}");

    // Every pgferry session, the walsenders included, is TLS; the servers hold SCRAM verifiers.
    for i in 0..2 {
        let c = cluster.sql(i).await?;
        let row = c
            .query_one(
                "SELECT count(*), coalesce(bool_and(s.ssl), false), count(*) FILTER (WHERE a.backend_type = 'walsender')
                 FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
                 WHERE a.application_name LIKE 'pgferry%' OR a.backend_type = 'walsender'",
                &[],
            )
            .await?;
        let (sessions, all_tls, walsenders): (i64, bool, i64) = (row.get(0), row.get(1), row.get(2));
        ensure!(
            sessions > 1 && all_tls && walsenders >= 1,
            "node {i}: {sessions} pgferry sessions, all TLS: {all_tls}, walsenders: {walsenders}"
        );
        let scram: bool = c
            .query_one(
                "SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = 'postgres'",
                &[],
            )
            .await?
            .get(0);
        ensure!(scram, "node {i}: the password is not stored as SCRAM-SHA-256");
    }
    run(&["status"])?;
    run(&["status", "--json"])?;

    // The SASL_SSL listener refuses a plaintext client.
    let plain = text.replace(&cluster.kafka_toml, "security_protocol = \"PLAINTEXT\"");
    std::fs::write(&cluster.config_path, &plain)?;
    let out = expect_failure(&cluster, &["init"])?;
    ensure!(out.contains(&format!("Kafka at {}", kafka.sasl_ssl)), "{out}");
    outputs.push(out);
    std::fs::write(&cluster.config_path, &text)?;
    drop(services);

    let haystack = format!("{}\n{}", outputs.join("\n"), all_logs(&cluster.dir));
    assert_clean(&haystack, &[&kafka_pw, &registry_pw, &pg_pw])?;
    cluster.cleanup().await?;
    drop(front);
    drop(servers);
    drop(kafka);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_kafka_sasl_password_is_refused() -> Result<()> {
    let pid = std::process::id();
    let dir = test_dir("sasl")?;
    let certs = TestCerts::generate(&dir.join("certs"))?;
    let (right, wrong) = (format!("Right-Sasl-{pid}-S3cret"), format!("Wrong-Sasl-{pid}-S3cret"));
    let kafka = OwnKafka::start(
        "security-sasl",
        26192,
        &certs.file("server-bundle.pem"),
        "pgferry",
        &right,
    )?;
    let endpoints = Endpoints {
        kafka: kafka.sasl_ssl.clone(),
        ..Endpoints::from_env()
    };
    let mut cluster = Cluster::create_on(endpoints, "security_sasl", &["r1", "r1"], SETUP, &["public.t"]).await?;
    cluster.kafka_toml = kafka_sasl_toml(&certs, &right);
    cluster.write_config()?;
    cluster.init()?;

    cluster.kafka_toml = kafka_sasl_toml(&certs, &wrong);
    cluster.write_config()?;
    let out = expect_failure(&cluster, &["init"])?;
    let want = format!("Kafka at {}", kafka.sasl_ssl);
    ensure!(out.contains(&want) && out.contains("SASL authentication"), "{out}");
    // Both services fail at start with the brokers' reason (the service is a quoted field,
    // `service="capture"`, with colour codes around the `=`).
    for service in ["\"capture\"", "\"apply\""] {
        let what = format!("{service} to report the refused login");
        let words = [service, want.as_str(), "SASL authentication"];
        wait_for_error(cluster.spawn("run", 0)?, &what, Duration::from_secs(90), &words).await?;
    }
    let haystack = format!("{out}\n{}", all_logs(&cluster.dir));
    assert_clean(&haystack, &[&right, &wrong])?;
    cluster.cleanup().await?;
    drop(kafka);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_postgres_certificate_is_refused_under_verify_full() -> Result<()> {
    let dir = test_dir("expired")?;
    let certs = TestCerts::generate(&dir.join("certs"))?;
    let mut servers = OwnServers::start_with(
        "security-expired",
        1,
        26440,
        &[
            ("PGFERRY_PG_SSL_CERT", &certs.path("expired.pem")),
            ("PGFERRY_PG_SSL_KEY", &certs.path("expired.key")),
        ],
    )?;
    // The harness itself connects without verifying; the node's DSN verifies.
    servers.endpoints.pg[0] += "?sslmode=require";
    let mut cluster = Cluster::create_on(
        servers.endpoints.clone(),
        "security_expired",
        &["r1"],
        SETUP,
        &["public.t"],
    )
    .await?;
    let verify = format!("sslmode=verify-full&sslrootcert={}", certs.path("ca.pem"));
    cluster.nodes[0].dsn = cluster.nodes[0].dsn.replace("sslmode=require", &verify);
    cluster.write_config()?;
    let node = cluster.nodes[0].name.clone();

    let out = expect_failure(&cluster, &["init"])?;
    ensure!(
        out.contains(&format!("node {node}"))
            && out.contains("127.0.0.1:26441")
            && out.contains("certificate")
            && out.contains("expired"),
        "{out}"
    );
    let words = [node.as_str(), "127.0.0.1:26441", "expired"];
    let what = "capture to report the expired certificate";
    wait_for_error(cluster.spawn("capture", 0)?, what, Duration::from_secs(60), &words).await?;
    let haystack = format!("{out}\n{}", all_logs(&cluster.dir));
    assert_clean(&haystack, &[&format!(":{}@", pgferry_integration_tests::PG_PASSWORD)])?;
    cluster.cleanup().await?;
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_registry_password_is_refused() -> Result<()> {
    let pid = std::process::id();
    let dir = test_dir("registry")?;
    let certs = TestCerts::generate(&dir.join("certs"))?;
    let (right, wrong) = (
        format!("Right-Registry-{pid}-S3cret"),
        format!("Wrong-Registry-{pid}-S3cret"),
    );
    let front = registry_front(26444, &certs, &right, &dir).await?;
    let endpoints = Endpoints {
        registry: front.url.clone(),
        ..Endpoints::from_env()
    };
    let mut cluster = Cluster::create_on(endpoints, "security_registry", &["r1", "r1"], SETUP, &["public.t"]).await?;
    cluster.registry_toml = registry_auth_toml(&certs, &wrong);
    cluster.write_config()?;
    cluster.init()?;
    let want = format!("schema registry {}", front.url);
    let what = "capture to report the refused registry login";
    wait_for_error(
        cluster.spawn("capture", 0)?,
        what,
        Duration::from_secs(60),
        &[&want, "401"],
    )
    .await?;
    let out = cluster.pgferry(&["status"])?;
    let haystack = format!("{}\n{}", output_text(&["status"], &out), all_logs(&cluster.dir));
    assert_clean(&haystack, &[&right, &wrong])?;
    cluster.cleanup().await?;
    drop(front);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_secret_file_names_key_and_path() -> Result<()> {
    let dir = test_dir("secret-file")?;
    let certs = TestCerts::generate(&dir.join("certs"))?;
    let missing = dir.join("no-such-secret");
    let mut cluster = Cluster::create("security_file", &["r1"], SETUP, &["public.t"]).await?;
    cluster.kafka_toml = kafka_sasl_toml(&certs, &format!("${{file:{}}}", missing.display()));
    cluster.write_config()?;
    for args in [&["init"][..], &["status"], &["run", "--node", &cluster.nodes[0].name]] {
        let out = expect_failure(&cluster, args)?;
        ensure!(
            out.contains("kafka.sasl_password")
                && out.contains(&missing.display().to_string())
                && out.contains("pgferry.toml"),
            "{out}"
        );
        assert_clean(&out, &[])?;
    }
    cluster.cleanup().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
