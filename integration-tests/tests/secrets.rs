//! Secrets never show: the nodes connect as a role with a distinctive password (one node's
//! written in the config, the other's read from the environment through `${VAR}`), every
//! command runs — init, the services replicating, status (table and JSON), conflicts, and
//! failures (a wrong password, a server that does not answer) — and then every log file and
//! every captured stdout/stderr is searched for either password. None may contain one.

use std::time::Duration;

use pgferry_integration_tests::{connect, wait_until, Cluster, PG_PASSWORD};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_appear_in_no_log_and_no_output() -> anyhow::Result<()> {
    let pid = std::process::id();
    let (role, in_file, in_env) = (format!("pgferry_secret_{pid}"), format!("Fi1e-Secret-{pid}"), format!("Env-Secret-{pid}"));
    let cluster = Cluster::create("secrets", &["r1", "r1"], "CREATE TABLE t (id int PRIMARY KEY, v text);", &["public.t"]).await?;
    for i in 0..2 {
        let admin = connect(&cluster.endpoints.pg[i]).await?;
        admin
            .batch_execute(&format!(
                "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN SUPERUSER REPLICATION PASSWORD '{}'",
                if i == 0 { &in_file } else { &in_env }
            ))
            .await?;
    }
    let text = std::fs::read_to_string(&cluster.config_path)?;
    let mut nodes_seen = 0;
    let text: String = text
        .split_inclusive('\n')
        .map(|line| {
            if line.starts_with("dsn = ") {
                nodes_seen += 1;
                let secret = if nodes_seen == 1 { in_file.clone() } else { "${PGFERRY_TEST_SECRET}".to_string() };
                line.replacen(&format!("postgres:{PG_PASSWORD}@"), &format!("{role}:{secret}@"), 1)
            } else {
                line.to_string()
            }
        })
        .collect();
    assert_eq!(nodes_seen, 2);
    std::fs::write(&cluster.config_path, &text)?;
    std::env::set_var("PGFERRY_TEST_SECRET", &in_env);

    let mut outputs = Vec::new();
    let mut run = |args: &[&str]| -> anyhow::Result<std::process::Output> {
        let out = cluster.pgferry(args)?;
        outputs.push(format!(
            "$ pgferry {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
        Ok(out)
    };
    anyhow::ensure!(run(&["init"])?.status.success(), "init failed: {outputs:?}");
    let services = (cluster.spawn("run", 0)?, cluster.spawn("run", 1)?);
    let n1 = cluster.sql(0).await?;
    n1.batch_execute("INSERT INTO t VALUES (1, 'a'), (2, 'b')").await?;
    cluster.wait_converged("t", Duration::from_secs(60)).await?;
    run(&["status"])?;
    run(&["status", "--json"])?;
    run(&["conflicts", "list"])?;
    drop(services);

    // Failures: node 2's password wrong, then node 1's server unreachable (its DSN still
    // carries the password).
    std::fs::write(&cluster.config_path, text.replacen("${PGFERRY_TEST_SECRET}", &format!("{in_env}x"), 1))?;
    anyhow::ensure!(!run(&["init"])?.status.success(), "init with a wrong password succeeded");
    run(&["status"])?;
    let (_, rest) = cluster.nodes[0].dsn.rsplit_once('@').unwrap_or_default();
    let hostport = rest.split('/').next().unwrap_or_default();
    std::fs::write(&cluster.config_path, text.replacen(hostport, "127.0.0.1:1", 1))?;
    anyhow::ensure!(!run(&["init"])?.status.success(), "init against a closed port succeeded");
    let mut failing = cluster.spawn("apply", 0)?;
    wait_until("apply to report the unreachable server twice", Duration::from_secs(60), || async {
        Ok(std::fs::read_to_string(&failing.log)?.matches("127.0.0.1:1").count() >= 2)
    })
    .await?;
    failing.kill();

    let mut haystack = outputs.join("\n");
    for entry in std::fs::read_dir(&cluster.dir)?.flatten() {
        if entry.path().extension().is_some_and(|x| x == "log") {
            haystack += &std::fs::read_to_string(entry.path())?;
        }
    }
    assert!(haystack.contains("127.0.0.1:1"), "the failures were captured");
    for secret in [&in_file, &in_env] {
        assert!(!haystack.contains(secret.as_str()), "a password appears in the output or logs:\n{haystack}");
    }
    std::fs::write(&cluster.config_path, &text)?;
    let servers = cluster.endpoints.pg.clone();
    cluster.cleanup().await?;
    for dsn in servers.iter().take(2) {
        // Its objects went with the databases; drop the login too.
        connect(dsn).await?.batch_execute(&format!("DROP ROLE IF EXISTS {role}")).await?;
    }
    Ok(())
}
