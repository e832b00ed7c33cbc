//! `pgferry check` (issue 15, item 3): one test per prerequisite it checks, each broken on
//! purpose, with the exact line it prints asserted, and its exit status (0 all good, 1 a
//! problem, 2 something could not be checked).
//!
//! What can be broken per database, role, table, topic or subject is broken on the shared
//! services, in the test's own objects. Server settings (`wal_level`, `track_commit_timestamp`,
//! `max_replication_slots`, `max_wal_senders`, `max_connections`) are broken on a PostgreSQL
//! server of the test's own (`OwnServers`, `ALTER SYSTEM` and a restart), which holds node 1;
//! node 2 stays on a shared server. The transaction state topic's replication factor is a
//! broker setting: that test runs a broker of its own. The server version cannot be varied
//! here (one PostgreSQL major is installed): its rule is unit-tested in `src/check/rules.rs`.

use std::process::Output;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgferry_connectors::redact::dsn_endpoint;
use pgferry_integration_tests::own_services::{free_port, KafkaOptions, OwnKafka};
use pgferry_integration_tests::{connect, Cluster, Endpoints, OwnServers};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

// REPLICA IDENTITY FULL: `v` can be stored out of line, which `check` warns about otherwise.
const SETUP: &str = "CREATE TABLE items (id bigint PRIMARY KEY, v text); ALTER TABLE items REPLICA IDENTITY FULL;";
const TABLES: &[&str] = &["public.items"];

/// `pgferry check ARGS`: stdout, stderr, exit status.
fn check(cluster: &Cluster, args: &[&str]) -> Result<(String, i32)> {
    let mut all = vec!["check"];
    all.extend_from_slice(args);
    let out: Output = cluster.pgferry(&all)?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!("pgferry check {args:?} ({}):\n{stdout}{stderr}", cluster.name);
    Ok((stdout, out.status.code().unwrap_or(-1)))
}

/// How the report names node `i`: `node <name> (<host:port/db>)`.
fn node_place(cluster: &Cluster, i: usize) -> String {
    format!(
        "node {} ({})",
        cluster.nodes[i].name,
        dsn_endpoint(&cluster.nodes[i].dsn)
    )
}

/// Fails unless `stdout` has the line `expected`.
fn has_line(stdout: &str, expected: &str) -> Result<()> {
    ensure!(
        stdout.lines().any(|l| l == expected),
        "no line\n  {expected}\nin the report:\n{stdout}"
    );
    Ok(())
}

/// The line of `stdout` that starts with `prefix`.
fn line_starting<'a>(stdout: &'a str, prefix: &str) -> Result<&'a str> {
    stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .with_context(|| format!("no line starting\n  {prefix}\nin the report:\n{stdout}"))
}

/// The summary line's counts: `(problems, warnings, could not run)`.
fn counts(stdout: &str) -> Result<(usize, usize, usize)> {
    let last = stdout.lines().last().unwrap_or_default();
    let number = |word: &str| -> Result<usize> {
        let at = last
            .find(word)
            .with_context(|| format!("no {word:?} in the summary {last:?}"))?;
        let digits: String = last[..at].trim_end().rsplit(' ').next().unwrap_or_default().to_string();
        digits.parse().with_context(|| format!("summary {last:?}"))
    };
    Ok((number(" problem")?, number(" warning")?, number(" check")?))
}

/// A PostgreSQL server of the test's own with `settings` set by `ALTER SYSTEM` (over
/// deploy/local/pg.sh's own) and restarted; stopped and removed when dropped.
async fn broken_server(name: &str, settings: &[(&str, &str)]) -> Result<OwnServers> {
    let port = (0..200)
        .find_map(|_| {
            free_port()
                .ok()
                .filter(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        })
        .context("no free port")?;
    let servers = OwnServers::start(name, 1, port - 1)?;
    let c = connect(&servers.endpoints.pg[0]).await?;
    for (k, v) in settings {
        let statement = format!("ALTER SYSTEM SET {k} = '{v}'");
        c.batch_execute(&statement).await.with_context(|| statement.clone())?;
    }
    drop(c);
    servers.pg_sh(&["stop-node", "1"])?;
    servers.pg_sh(&["start-node", "1"])?;
    Ok(servers)
}

/// A two-node cluster whose node 1 is on `servers`' server and node 2 on shared server 2.
async fn cluster_on(servers: &OwnServers, test: &str) -> Result<Cluster> {
    let shared = Endpoints::from_env();
    let endpoints = Endpoints {
        pg: vec![servers.endpoints.pg[0].clone(), shared.pg[1].clone()],
        ..shared
    };
    Cluster::create_on(endpoints, test, &["r1", "r1"], SETUP, TABLES).await
}

/// Creates `topic` on the shared broker with `partitions` and topic `config` (and the
/// `max.message.bytes` init gives its topics, so only what a test breaks is reported).
async fn create_topic(bootstrap: &str, topic: &str, partitions: i32, config: &[(&str, &str)]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1)).set("max.message.bytes", "16777216");
    for (k, v) in config {
        new = new.set(k, v);
    }
    let results = admin
        .create_topics(
            [&new],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await?;
    for r in results {
        r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_cluster_passes_before_and_after_init() -> Result<()> {
    let c = Cluster::create("ck_ready", &["r1", "r1"], SETUP, TABLES).await?;
    let (out, status) = check(&c, &[])?;
    ensure!(status == 0, "exit status {status}");
    for i in 0..2 {
        let at = node_place(&c, i);
        has_line(&out, &format!("ok        {at}: wal_level is logical"))?;
        has_line(&out, &format!("ok        {at}: track_commit_timestamp is on"))?;
        has_line(
            &out,
            &format!("ok        {at}: 1 replicated table, each with a primary key"),
        )?;
        has_line(&out, &format!("ok        {at}: role postgres is a superuser"))?;
        line_starting(
            &out,
            &format!("ok        {at}: room for slot {} (init creates it); ", c.slot_of(i)),
        )?;
    }
    let kafka = format!("Kafka at {}", c.endpoints.kafka);
    has_line(
        &out,
        &format!("ok        {kafka}: a transactional producer initializes"),
    )?;
    has_line(
        &out,
        &format!(
            "ok        {kafka}: {0}.r1.changes, {0}.conflicts, {0}.dlq: not there yet; init creates them (replication factor 1)",
            c.name
        ),
    )?;
    ensure!(counts(&out)? == (0, 0, 0), "summary: {out}");

    c.init()?;
    let (out, status) = check(&c, &["-q"])?;
    ensure!(status == 0, "exit status {status}");
    ensure!(
        out.lines().count() == 1,
        "-q prints only the summary when all is well: {out}"
    );
    let (out, status) = check(&c, &["--json"])?;
    ensure!(status == 0, "exit status {status}");
    let report: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(
        report["exit_status"] == 0 && report["problems"] == 0 && report["unchecked"] == 0,
        "{report}"
    );
    let findings = report["findings"].as_array().context("findings")?;
    let slot = findings
        .iter()
        .find(|f| f["check"] == "replication_slots" && f["node"] == c.nodes[0].name.as_str())
        .context("no replication_slots finding of node 1")?;
    ensure!(
        slot["severity"] == "ok"
            && slot["system"] == "node"
            && slot["endpoint"] == dsn_endpoint(&c.nodes[0].dsn).as_str()
            && slot["message"]
                .as_str()
                .unwrap_or_default()
                .starts_with(&format!("slot {} exists; ", c.slot_of(0))),
        "{slot}"
    );
    let topic = findings
        .iter()
        .find(|f| f["check"] == "topic_partitions" && f["object"] == format!("{}.r1.changes", c.name).as_str())
        .context("no finding of the region topic")?;
    ensure!(topic["system"] == "kafka" && topic["severity"] == "ok", "{topic}");
    c.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_start_up_refuses_is_a_problem() -> Result<()> {
    let c = Cluster::create("ck_config", &["r1"], SETUP, TABLES).await?;
    let text = std::fs::read_to_string(&c.config_path)?.replace("id = 1\n", "id = 0\n");
    std::fs::write(&c.config_path, text)?;
    let (out, status) = check(&c, &[])?;
    ensure!(status == 1, "exit status {status}");
    let path = c.config_path.display();
    has_line(
        &out,
        &format!(
            "PROBLEM   config {path}: nodes[0].id: 0 is outside 1–1023. Fix: correct the key it names (deploy/pgferry.example.toml describes every key); nothing else was checked"
        ),
    )?;
    // A config that cannot be read at all: nothing could be checked.
    std::fs::remove_file(&c.config_path)?;
    let (out, status) = check(&c, &[])?;
    ensure!(status == 2, "exit status {status}");
    line_starting(&out, &format!("UNCHECKED config {path}: cannot read config {path}: "))?;
    c.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_does_not_answer_cannot_be_checked() -> Result<()> {
    let mut c = Cluster::create("ck_down", &["r1", "r1"], SETUP, TABLES).await?;
    let good_dsn = c.nodes[1].dsn.clone();
    let port = free_port()?;
    let db = c.nodes[1].db.clone();
    c.nodes[1].dsn = format!("postgres://postgres:Unreachable-Secret-7@127.0.0.1:{port}/{db}");
    c.write_config()?;
    let (out, status) = check(&c, &[])?;
    ensure!(status == 2, "exit status {status}");
    ensure!(!out.contains("Unreachable-Secret-7"), "the password was printed: {out}");
    let at = node_place(&c, 1);
    let line = line_starting(
        &out,
        &format!("UNCHECKED {at}: cannot connect to PostgreSQL at 127.0.0.1:{port}/{db}: "),
    )?;
    ensure!(
        line.ends_with(". Fix: check that the server runs and takes connections from here, and the DSN's user, password, database and TLS parameters"),
        "{line}"
    );
    // The other node is checked all the same.
    has_line(&out, &format!("ok        {}: wal_level is logical", node_place(&c, 0)))?;
    c.nodes[1].dsn = good_dsn;
    c.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_must_be_logical() -> Result<()> {
    let servers = broken_server("ck_wal_level", &[("wal_level", "replica")]).await?;
    let c = cluster_on(&servers, "ck_wal_level").await?;
    let (out, status) = check(&c, &[])?;
    ensure!(status == 1, "exit status {status}");
    has_line(
        &out,
        &format!(
            "PROBLEM   {}: wal_level is replica; pgferry needs logical (capture decodes the node's changes from the WAL). Fix: ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL",
            node_place(&c, 0)
        ),
    )?;
    has_line(&out, &format!("ok        {}: wal_level is logical", node_place(&c, 1)))?;
    ensure!(counts(&out)?.0 == 1, "one problem only: {out}");
    c.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_timestamps_must_be_tracked() -> Result<()> {
    let servers = broken_server("ck_commit_ts", &[("track_commit_timestamp", "off")]).await?;
    let c = cluster_on(&servers, "ck_commit_ts").await?;
    let (out, status) = check(&c, &[])?;
    ensure!(status == 1, "exit status {status}");
    has_line(
        &out,
        &format!(
            "PROBLEM   {}: track_commit_timestamp is off; pgferry needs on (conflict resolution compares the commit times PostgreSQL records for each row). Fix: ALTER SYSTEM SET track_commit_timestamp = on; then restart PostgreSQL",
            node_place(&c, 0)
        ),
    )?;
    ensure!(counts(&out)?.0 == 1, "one problem only: {out}");
    c.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_free_replication_slot_is_needed() -> Result<()> {
    let servers = broken_server("ck_slots", &[("max_replication_slots", "1")]).await?;
    let c = cluster_on(&servers, "ck_slots").await?;
    // Another tool's slot takes the only one.
    connect(&servers.endpoints.pg[0])
        .await?
        .batch_execute("SELECT pg_create_logical_replication_slot('other_tool', 'pgoutput')")
        .await?;
    let (out, status) = check(&c, &[])?;
    ensure!(status == 1, "exit status {status}");
    has_line(
        &out,
        &format!(
            "PROBLEM   {}: no free replication slot for the node's slot {}: max_replication_slots is 1 and 1 slot is in use. Fix: ALTER SYSTEM SET max_replication_slots = 3; then restart PostgreSQL, or drop a slot nothing uses (SELECT slot_name, database, active FROM pg_replication_slots)",
            node_place(&c, 0),
            c.slot_of(0)
        ),
    )?;
    ensure!(counts(&out)?.0 == 1, "one problem only: {out}");
    c.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_origins_need_room() -> Result<()> {
    let servers = broken_server("ck_origins", &[("max_replication_slots", "1")]).await?;
    let c = cluster_on(&servers, "ck_origins").await?;
    // Another tool's origin with progress takes the only progress slot.
    connect(&servers.endpoints.pg[0])
        .await?
        .batch_execute("SELECT pg_replication_origin_create('other_tool'); SELECT pg_replication_origin_advance('other_tool', '0/1')")
        .await?;
    let (out, status) = check(&c, &[])?;
    ensure!(status == 1, "exit status {status}");
    has_line(
        &out,
        &format!(
            "PROBLEM   {}: no room for the node's replication origins {}: max_replication_slots is 1 and 1 replication origin is in use, and apply needs 1 more (one per node whose changes it applies). Fix: ALTER SYSTEM SET max_replication_slots = 3; then restart PostgreSQL, or drop origins nothing uses (SELECT pg_replication_origin_drop(external_id) FROM pg_replication_origin_status WHERE …)",
            node_place(&c, 0),
            c.origin_on(0, &c.nodes[1].name)
        ),
    )?;
    ensure!(counts(&out)?.0 == 1, "one problem only: {out}");
    c.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_sender_is_needed() -> Result<()> {
    let servers = broken_server("ck_senders", &[("max_wal_senders", "0")]).await?;
    let c = cluster_on(&servers, "ck_senders").await?;
    let (out, status) = check(&c, &[])?;
    ensure!(status == 1, "exit status {status}");
    has_line(
        &out,
        &format!(
            "PROBLEM   {}: no free WAL sender for capture's replication stream: max_wal_senders is 0 and 0 WAL senders are running. Fix: ALTER SYSTEM SET max_wal_senders = 10; then restart PostgreSQL",
            node_place(&c, 0)
        ),
    )?;
    ensure!(counts(&out)?.0 == 1, "one problem only: {out}");
    c.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_for_every_session_are_needed() -> Result<()> {
    let servers = broken_server(
        "ck_conns",
        &[("max_connections", "4"), ("superuser_reserved_connections", "0")],
    )
    .await?;
    let c = cluster_on(&servers, "ck_conns").await?;
    let (out, status) = check(&c, &[])?;
    ensure!(status == 1, "exit status {status}");
    let line = line_starting(
        &out,
        &format!(
            "PROBLEM   {}: not enough connections for pgferry: `pgferry run` of the node opens 7 (capture 3; apply 2, plus 1 per node it applies, 2 with [apply] read_ahead), max_connections is 4, ",
            node_place(&c, 0)
        ),
    )?;
    ensure!(
        line.contains(" connected. Fix: ALTER SYSTEM SET max_connections = "),
        "{line}"
    );
    ensure!(counts(&out)?.0 == 1, "one problem only: {out}");
    c.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replicated_table_needs_a_primary_key() -> Result<()> {
    let c = Cluster::create(
        "ck_pkey",
        &["r1", "r1"],
        "CREATE TABLE items (id bigint PRIMARY KEY, v text); CREATE TABLE nokey (id bigint, v text);",
        &["public.items", "public.nokey", "public.gone"],
    )
    .await?;
    let (out, status) = check(&c, &[])?;
    ensure!(status == 1, "exit status {status}");
    for i in 0..2 {
        let at = node_place(&c, i);
        has_line(
            &out,
            &format!(
                "PROBLEM   {at}: table public.nokey has no primary key; pgferry needs one to find rows on the other nodes. Fix: ALTER TABLE public.nokey ADD PRIMARY KEY (…), or remove it from replication.tables"
            ),
        )?;
        has_line(
            &out,
            &format!(
                "PROBLEM   {at}: replicated table public.gone does not exist. Fix: create it (with a primary key; empty on a node that has no data yet), or remove it from replication.tables"
            ),
        )?;
    }
    ensure!(counts(&out)?.0 == 4, "four problems: {out}");
    let (out, status) = check(&c, &["--json"])?;
    ensure!(status == 1, "exit status {status}");
    let report: serde_json::Value = serde_json::from_str(&out)?;
    let nokey: Vec<&serde_json::Value> = report["findings"]
        .as_array()
        .context("findings")?
        .iter()
        .filter(|f| f["check"] == "primary_key" && f["severity"] == "problem")
        .collect();
    ensure!(nokey.len() == 2, "{report}");
    ensure!(
        nokey[0]["node"] == c.nodes[0].name.as_str()
            && nokey[0]["object"] == "public.nokey"
            && nokey[0]["fix"] == "ALTER TABLE public.nokey ADD PRIMARY KEY (…), or remove it from replication.tables",
        "{}",
        nokey[0]
    );
    c.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_columns_need_replica_identity_full() -> Result<()> {
    let mut c = Cluster::create(
        "ck_identity",
        &["r1", "r1"],
        "CREATE TABLE accounts (id bigint PRIMARY KEY, balance numeric NOT NULL);",
        &["public.accounts"],
    )
    .await?;
    c.replication_toml = "[replication.table.\"public.accounts\"]\ndelta_columns = [\"balance\"]".into();
    c.write_config()?;
    c.sql(1)
        .await?
        .batch_execute("ALTER TABLE accounts REPLICA IDENTITY FULL")
        .await?;
    let (out, status) = check(&c, &[])?;
    ensure!(status == 1, "exit status {status}");
    has_line(
        &out,
        &format!(
            "PROBLEM   {}: table public.accounts has delta_columns [\"balance\"] but REPLICA IDENTITY DEFAULT, so updates do not carry the old values the deltas need. Fix: ALTER TABLE public.accounts REPLICA IDENTITY FULL",
            node_place(&c, 0)
        ),
    )?;
    has_line(
        &out,
        &format!(
            "ok        {}: 1 table with delta columns, REPLICA IDENTITY FULL",
            node_place(&c, 1)
        ),
    )?;
    ensure!(counts(&out)?.0 == 1, "one problem only: {out}");
    c.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_role_needs_its_privileges() -> Result<()> {
    let mut c = Cluster::create("ck_role", &["r1", "r1"], SETUP, TABLES).await?;
    let role = format!("ck_{}", c.nodes[0].db.trim_start_matches("pf_")).to_lowercase();
    let admin = connect(&c.endpoints.pg[0]).await?;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD 'Role-Secret-1' NOSUPERUSER NOREPLICATION"
        ))
        .await?;
    let superuser_dsn = c.nodes[0].dsn.clone();
    let db = c.nodes[0].db.clone();
    c.nodes[0].dsn = superuser_dsn.replacen("postgres:pgferry@", &format!("{role}:Role-Secret-1@"), 1);
    c.write_config()?;
    let (out, status) = check(&c, &[])?;
    ensure!(status == 1, "exit status {status}");
    ensure!(!out.contains("Role-Secret-1"), "the password was printed: {out}");
    let at = node_place(&c, 0);
    let functions = "pg_replication_origin_create(text), pg_replication_origin_drop(text), pg_replication_origin_session_setup(text), pg_replication_origin_session_reset(), pg_replication_origin_session_is_setup(), pg_replication_origin_xact_setup(pg_lsn, timestamp with time zone), pg_replication_origin_advance(text, pg_lsn), pg_replication_origin_progress(text, boolean)";
    for expected in [
        format!("PROBLEM   {at}: role {role} has neither REPLICATION nor SUPERUSER; capture's replication stream and init's slot need it. Fix: ALTER ROLE {role} REPLICATION"),
        format!("PROBLEM   {at}: role {role} may not set session_replication_role (apply writes as a replica, so users' triggers and foreign-key actions do not fire again on applied rows): permission denied to set parameter \"session_replication_role\" (SQLSTATE 42501). Fix: GRANT SET ON PARAMETER session_replication_role TO {role}"),
        format!("PROBLEM   {at}: role {role} may not execute {functions}, which apply and init call (replication origins). Fix: GRANT EXECUTE ON FUNCTION {functions} TO {role}"),
        format!("PROBLEM   {at}: role {role} has no CREATE privilege on database {db} (init creates schema pgferry and the publication). Fix: GRANT CREATE ON DATABASE \"{db}\" TO {role}"),
        format!("PROBLEM   {at}: role {role} does not own table public.items (publishing a table and enabling its tombstone trigger take its owner). Fix: ALTER TABLE public.items OWNER TO {role}"),
        format!("PROBLEM   {at}: role {role} lacks SELECT, INSERT, UPDATE, DELETE, TRUNCATE on table public.items (apply writes every change, truncates included). Fix: GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON public.items TO {role}"),
        format!("WARNING   {at}: cannot count the replication origins in use (this role may not read pg_replication_origin_status); max_replication_slots is 256 and the node's apply needs room for 1 more. Fix: run pgferry check as a superuser to check it"),
    ] {
        has_line(&out, &expected)?;
    }
    ensure!(counts(&out)?.0 == 6, "six problems: {out}");

    // The fixes it names are enough.
    let owner = connect(&superuser_dsn).await?;
    owner
        .batch_execute(&format!(
            "ALTER ROLE {role} REPLICATION;
             GRANT SET ON PARAMETER session_replication_role TO {role};
             GRANT EXECUTE ON FUNCTION {functions} TO {role};
             GRANT CREATE ON DATABASE \"{db}\" TO {role};
             ALTER TABLE public.items OWNER TO {role};"
        ))
        .await?;
    let (out, status) = check(&c, &[])?;
    ensure!(status == 0, "exit status {status}");
    has_line(
        &out,
        &format!("ok        {at}: role {role} (not a superuser) has every privilege pgferry needs"),
    )?;
    // And init, as that role, sets the node up.
    c.init()?;
    c.nodes[0].dsn = superuser_dsn;
    c.cleanup().await?;
    admin
        .batch_execute(&format!(
            "REVOKE SET ON PARAMETER session_replication_role FROM {role}; DROP ROLE {role}"
        ))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_of_the_node_name_held_elsewhere() -> Result<()> {
    let c = Cluster::create("ck_slotowner", &["r1", "r1"], SETUP, TABLES).await?;
    let slot = c.slot_of(0);
    // Another cluster of the same name in the server's `postgres` database took the name.
    let admin = connect(&c.endpoints.pg[0]).await?;
    admin
        .execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot])
        .await?;
    let (out, status) = check(&c, &[])?;
    ensure!(status == 1, "exit status {status}");
    has_line(
        &out,
        &format!(
            "PROBLEM   {}: replication slot {slot} already exists and belongs to database \"postgres\" on this server (another pgferry cluster named {:?}, or another tool), not to this node's database {:?}; pgferry will not reuse it. Give this cluster another [cluster] name, or drop the slot if nothing uses it (SELECT pg_drop_replication_slot('{slot}'))",
            node_place(&c, 0),
            c.name,
            c.nodes[0].db
        ),
    )?;
    admin.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await?;
    c.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_of_the_node_held_elsewhere() -> Result<()> {
    let c = Cluster::create("ck_originowner", &["r1", "r1"], SETUP, TABLES).await?;
    let origin = c.origin_on(0, &c.nodes[1].name);
    // A session of another database holds the origin of n1's apply of n2.
    let holder = connect(&c.endpoints.pg[0]).await?;
    holder
        .execute("SELECT pg_replication_origin_create($1)", &[&origin])
        .await?;
    holder
        .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
        .await?;
    let pid: i32 = holder.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    let (out, status) = check(&c, &[])?;
    ensure!(status == 1, "exit status {status}");
    has_line(
        &out,
        &format!(
            "PROBLEM   {}: replication origin {origin} is in use by the session with pid {pid} of database \"postgres\" (application \"\"), not by this node's apply; pgferry will not share it. Is another pgferry cluster named {:?} running on this server? Give this cluster another [cluster] name",
            node_place(&c, 0),
            c.name
        ),
    )?;
    holder
        .batch_execute("SELECT pg_replication_origin_session_reset()")
        .await?;
    holder
        .execute("SELECT pg_replication_origin_drop($1)", &[&origin])
        .await?;
    c.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_that_does_not_answer_cannot_be_checked() -> Result<()> {
    let port = free_port()?;
    let endpoints = Endpoints {
        kafka: format!("127.0.0.1:{port}"),
        ..Endpoints::from_env()
    };
    let c = Cluster::create_on(endpoints, "ck_nokafka", &["r1"], SETUP, TABLES).await?;
    let (out, status) = check(&c, &[])?;
    ensure!(status == 2, "exit status {status}");
    let line = line_starting(
        &out,
        &format!("UNCHECKED Kafka at 127.0.0.1:{port}: the brokers do not answer: "),
    )?;
    ensure!(
        line.ends_with(". Fix: check that the brokers run and are reachable from here, and the [kafka] address, security and login keys"),
        "{line}"
    );
    has_line(&out, &format!("ok        {}: wal_level is logical", node_place(&c, 0)))?;
    c.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_must_be_available() -> Result<()> {
    // One broker whose transaction state topic asks for two replicas: it can never be created.
    let kafka = OwnKafka::start(
        "ck_txn",
        KafkaOptions {
            extra_properties: vec!["transaction.state.log.replication.factor=2".into()],
            ..Default::default()
        },
    )
    .await?;
    let endpoints = Endpoints {
        kafka: kafka.bootstrap(),
        ..Endpoints::from_env()
    };
    let c = Cluster::create_on(endpoints, "ck_txn", &["r1"], SETUP, TABLES).await?;
    let (out, status) = check(&c, &[])?;
    ensure!(status == 1, "exit status {status}");
    has_line(
        &out,
        &format!(
            "PROBLEM   Kafka at {}: transactions are not available: the transaction state topic __transaction_state does not exist and cannot be created: the brokers' transaction.state.log.replication.factor is 2 but the cluster has 1 broker. Fix: set transaction.state.log.replication.factor and transaction.state.log.min.isr to at most 1 in the brokers' configuration and restart them, or add brokers",
            kafka.bootstrap()
        ),
    )?;
    ensure!(counts(&out)?.0 == 1, "one problem only: {out}");
    c.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_need_brokers_for_their_replication_factor() -> Result<()> {
    let mut c = Cluster::create("ck_rf", &["r1"], SETUP, TABLES).await?;
    c.kafka_toml = "replication_factor = 3".into();
    c.write_config()?;
    let (out, status) = check(&c, &[])?;
    ensure!(status == 1, "exit status {status}");
    has_line(
        &out,
        &format!(
            "PROBLEM   Kafka at {}: kafka.replication_factor is 3 but the cluster has 1 broker: init cannot create {1}.r1.changes, {1}.conflicts, {1}.dlq. Fix: set kafka.replication_factor to at most 1, or add brokers",
            c.endpoints.kafka, c.name
        ),
    )?;
    c.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_needs_its_partitions() -> Result<()> {
    let c = Cluster::create("ck_parts", &["r1", "r1"], SETUP, TABLES).await?;
    let topic = c.topic_of(0);
    create_topic(&c.endpoints.kafka, &topic, 1, &[]).await?;
    let (out, status) = check(&c, &[])?;
    ensure!(status == 1, "exit status {status}");
    has_line(
        &out,
        &format!(
            "PROBLEM   Kafka at {0}: topic {topic} has 1 partition; the config needs at least 3 (kafka.partitions; each node of region r1 writes its own partition). Fix: kafka-topics.sh --bootstrap-server {0} --alter --topic {topic} --partitions 3",
            c.endpoints.kafka
        ),
    )?;
    ensure!(counts(&out)?.0 == 1, "one problem only: {out}");
    c.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_keep_their_messages_long_enough() -> Result<()> {
    let mut c = Cluster::create("ck_retention", &["r1"], SETUP, TABLES).await?;
    c.kafka_toml = "retention_ms = 604800000".into();
    c.write_config()?;
    let k = c.endpoints.kafka.clone();
    let (topic, conflicts) = (c.topic_of(0), format!("{}.conflicts", c.name));
    create_topic(
        &k,
        &topic,
        3,
        &[("retention.ms", "3600000"), ("retention.bytes", "1048576")],
    )
    .await?;
    create_topic(&k, &conflicts, 1, &[("cleanup.policy", "compact")]).await?;
    let (out, status) = check(&c, &[])?;
    ensure!(status == 1, "exit status {status}");
    let alter = |t: &str, setting: &str| {
        format!("kafka-configs.sh --bootstrap-server {k} --alter --entity-type topics --entity-name {t} --add-config {setting}")
    };
    has_line(
        &out,
        &format!(
            "PROBLEM   Kafka at {k}: topic {topic} keeps messages 1 h (retention.ms=3600000), less than kafka.retention_ms (7 days): a node down longer than that could not catch up. Fix: {}",
            alter(&topic, "retention.ms=604800000")
        ),
    )?;
    has_line(
        &out,
        &format!(
            "WARNING   Kafka at {k}: topic {topic} also deletes by size (retention.bytes=1048576 per partition): a busy spell can delete messages a node has not applied, whatever retention.ms says. Fix: {}",
            alter(&topic, "retention.bytes=-1")
        ),
    )?;
    has_line(
        &out,
        &format!(
            "PROBLEM   Kafka at {k}: topic {conflicts} has cleanup.policy=compact: compaction keeps only the last message of each key, so nodes would miss changes and transactions would lose rows. Fix: {}",
            alter(&conflicts, "cleanup.policy=delete")
        ),
    )?;
    ensure!(counts(&out)? == (2, 1, 0), "two problems, one warning: {out}");
    c.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_insync_replicas_within_the_replication_factor() -> Result<()> {
    let c = Cluster::create("ck_isr", &["r1"], SETUP, TABLES).await?;
    let k = c.endpoints.kafka.clone();
    let dlq = format!("{}.dlq", c.name);
    create_topic(&k, &dlq, 1, &[("min.insync.replicas", "2")]).await?;
    let (out, status) = check(&c, &[])?;
    ensure!(status == 1, "exit status {status}");
    has_line(
        &out,
        &format!(
            "PROBLEM   Kafka at {k}: topic {dlq} has min.insync.replicas=2 but replication factor 1: every write with acks=all (capture's) is refused with NOT_ENOUGH_REPLICAS. Fix: kafka-configs.sh --bootstrap-server {k} --alter --entity-type topics --entity-name {dlq} --add-config min.insync.replicas=1"
        ),
    )?;
    ensure!(counts(&out)?.0 == 1, "one problem only: {out}");
    c.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_does_not_answer_cannot_be_checked() -> Result<()> {
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}/apis/ccompat/v7");
    let endpoints = Endpoints {
        registry: url.clone(),
        ..Endpoints::from_env()
    };
    let c = Cluster::create_on(endpoints, "ck_noregistry", &["r1"], SETUP, TABLES).await?;
    let (out, status) = check(&c, &[])?;
    ensure!(status == 2, "exit status {status}");
    let line = line_starting(&out, &format!("UNCHECKED registry {url}: GET config: "))?;
    ensure!(
        line.ends_with(". Fix: check that the registry runs and is reachable from here, and registry.url, username, password and ca_file"),
        "{line}"
    );
    c.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compatibility_level_other_than_none_is_a_warning() -> Result<()> {
    let c = Cluster::create("ck_compat", &["r1"], SETUP, TABLES).await?;
    // A subject of this cluster's topic with a level of its own (the global level is shared).
    let subject = format!("{}-{}.public.items.Envelope", c.topic_of(0), c.name);
    let http = reqwest::Client::new();
    let registry = &c.endpoints.registry;
    let schema = serde_json::json!({"schema": r#"{"type":"record","name":"Envelope","fields":[]}"#});
    http.post(format!("{registry}/subjects/{subject}/versions"))
        .header("Content-Type", "application/vnd.schemaregistry.v1+json")
        .body(schema.to_string())
        .send()
        .await?
        .error_for_status()?;
    http.put(format!("{registry}/config/{subject}"))
        .header("Content-Type", "application/json")
        .body(r#"{"compatibility": "FULL_TRANSITIVE"}"#)
        .send()
        .await?
        .error_for_status()?;
    let (out, status) = check(&c, &[])?;
    ensure!(status == 0, "a warning leaves the exit status 0, not {status}");
    has_line(
        &out,
        &format!(
            "WARNING   registry {registry}: subject {subject} has compatibility level FULL_TRANSITIVE, not NONE: the registry then refuses the new schema version of a table after some DDL (a NOT NULL column added or dropped, a column type changed), and capture stops at that table's next change. Fix: curl -X PUT -H 'Content-Type: application/json' -d '{{\"compatibility\": \"NONE\"}}' <registry.url>/config/{subject}"
        ),
    )?;
    ensure!(counts(&out)? == (0, 1, 0), "one warning: {out}");
    for url in [
        format!("{registry}/subjects/{subject}"),
        format!("{registry}/subjects/{subject}?permanent=true"),
    ] {
        http.delete(url).send().await?;
    }
    c.cleanup().await
}
