//! End-to-end test harness: real PostgreSQL nodes, Kafka and the schema registry, started by
//! `deploy/local/up.sh`, and the real `pgferry` binary.
//!
//! Contract: every [`Cluster`] gets its own databases (one per PostgreSQL server), its own
//! cluster name (so its own topics, registry subjects, and slots and origins, whose names
//! carry the cluster: [`naming`]) and its own node names; tests never share state. Waiting is
//! always [`wait_until`] with a deadline. Endpoints come from the variables
//! `deploy/local/env.sh` prints.
//!
//! Large groups everywhere: apply groups consecutive source transactions of one origin into one
//! local transaction, taking only what has already arrived, so under the light, paced loads of
//! most tests its groups are small. `PGFERRY_TEST_GROUP_WAIT_MS=<ms>` makes every test cluster's
//! config carry `[apply] group_wait_ms = <ms>` (apply then waits up to that long for more
//! transactions before writing a group), so the whole suite can be run with large groups, e.g.
//! `PGFERRY_TEST_GROUP_WAIT_MS=200 deploy/local/test.sh`. A test that sets `group_wait_ms`
//! itself in [`Cluster::apply_toml`] keeps its own value. Configs a test writes by hand (not
//! through [`Cluster::write_config`]) are not affected.
//!
//! Other Kafka client settings: `PGFERRY_TEST_KAFKA_PROPERTIES="linger.ms=1,batch.size=65536"`
//! makes every test cluster's config carry those keys under `[kafka.properties]` (how the
//! benchmark compares client settings without a rebuild), unless the test sets
//! `[kafka.properties]` itself in [`Cluster::kafka_toml`].
//!
//! `PGFERRY_TEST_READ_AHEAD=true|false` sets `[apply] read_ahead` in every test cluster's config
//! (how the benchmark compares apply with and without reading groups ahead), unless the test
//! sets it itself in [`Cluster::apply_toml`].

pub mod arrival_order;
pub mod ledger;
pub mod own_services;
pub mod proxy;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_postgres::Client;

pub mod secure;

/// pgferry's names of slots, origins and publications (tests and benchmarks use these, never
/// their own spelling).
pub use pgferry_schemas::naming;

/// Password of the local test servers (deploy/local/common.sh).
pub const PG_PASSWORD: &str = "pgferry";

/// Where the services are.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// DSN of each PostgreSQL server's `postgres` database.
    pub pg: Vec<String>,
    /// Kafka bootstrap servers.
    pub kafka: String,
    /// Registry base URL (Confluent API).
    pub registry: String,
}

impl Endpoints {
    /// From the environment, defaulting to deploy/local's ports.
    pub fn from_env() -> Endpoints {
        let pg = (1..=3)
            .map(|i| {
                std::env::var(format!("PGFERRY_PG_DSN_{i}"))
                    .unwrap_or_else(|_| format!("postgres://postgres:{PG_PASSWORD}@127.0.0.1:{}/postgres", 25430 + i))
            })
            .collect();
        Endpoints {
            pg,
            kafka: std::env::var("PGFERRY_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into()),
            registry: std::env::var("PGFERRY_REGISTRY")
                .unwrap_or_else(|_| "http://127.0.0.1:18081/apis/ccompat/v7".into()),
        }
    }
}

/// The `pgferry` binary (`PGFERRY_BIN`, else the workspace's debug build).
pub fn pgferry_bin() -> PathBuf {
    std::env::var_os("PGFERRY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/pgferry"))
}

/// `PGFERRY_TEST_GROUP_WAIT_MS` (crate doc), if set: the `[apply] group_wait_ms` every test
/// cluster's config carries.
pub fn group_wait_ms_from_env() -> Result<Option<u64>> {
    setting_from_env("PGFERRY_TEST_GROUP_WAIT_MS", "a number of milliseconds")
}

/// `PGFERRY_TEST_READ_AHEAD` (crate doc): `[apply] read_ahead` for every cluster, if set.
pub fn read_ahead_from_env() -> Result<Option<bool>> {
    setting_from_env("PGFERRY_TEST_READ_AHEAD", "true or false")
}

/// The value of environment variable `name`, if set and not empty; an error saying it must be
/// `what` if it does not parse.
fn setting_from_env<T: std::str::FromStr>(name: &str, what: &str) -> Result<Option<T>> {
    match std::env::var(name) {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => v.trim().parse().map(Some).map_err(|_| anyhow!("{name} must be {what}, not {v:?}")),
        Err(_) => Ok(None),
    }
}

/// `PGFERRY_TEST_KAFKA_PROPERTIES` (crate doc) as `[kafka.properties]` lines (empty if unset).
pub fn kafka_properties_from_env() -> Result<String> {
    let Ok(v) = std::env::var("PGFERRY_TEST_KAFKA_PROPERTIES") else {
        return Ok(String::new());
    };
    let mut lines = String::new();
    for pair in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, val) = pair
            .split_once('=')
            .ok_or_else(|| anyhow!("PGFERRY_TEST_KAFKA_PROPERTIES: {pair:?} is not key=value"))?;
        lines += &format!("{:?} = {:?}\n", k.trim(), val.trim());
    }
    Ok(if lines.is_empty() { lines } else { format!("[kafka.properties]\n{lines}") })
}

/// The `[apply]` lines of a config: `apply_toml`, with `group_wait_ms = <wait_ms>` first
/// unless `apply_toml` sets it itself.
fn apply_lines(apply_toml: &str, wait_ms: Option<u64>) -> String {
    let lines = apply_toml.trim();
    let sets_wait = lines.lines().any(|l| l.trim_start().starts_with("group_wait_ms"));
    match wait_ms {
        Some(ms) if !sets_wait => format!("group_wait_ms = {ms}\n{lines}").trim().to_string(),
        _ => lines.to_string(),
    }
}

/// Polls `check` every 100 ms until it returns true; fails with `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    wait_until_every(what, timeout, Duration::from_millis(100), check).await
}

/// [`wait_until`] polling every `interval` (for a state that lasts only a moment, e.g. a
/// service in the middle of one transaction).
pub async fn wait_until_every<F, Fut>(what: &str, timeout: Duration, interval: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what} (last error: {last_err:?})");
        }
        tokio::time::sleep(interval).await;
    }
}

/// Connects to a DSN (TLS as its libpq `sslmode`/`sslrootcert` say, as pgferry does).
pub async fn connect(dsn: &str) -> Result<Client> {
    let session = pgferry_connectors::postgres::connect_with(dsn, |_| {})
        .await
        .with_context(|| format!("connecting to {}", without_password(dsn)))?;
    Ok(session.client)
}

/// A URL DSN with its password replaced by `***` (for messages: secrets are never printed).
pub fn without_password(dsn: &str) -> String {
    if let Some((scheme, rest)) = dsn.split_once("://") {
        if let Some((userinfo, host)) = rest.rsplit_once('@') {
            if let Some((user, _)) = userinfo.split_once(':') {
                return format!("{scheme}://{user}:***@{host}");
            }
        }
    }
    dsn.to_string()
}

/// A URL DSN with its database replaced (its `?query` kept).
pub fn with_db(dsn: &str, db: &str) -> String {
    let (base, query) = match dsn.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (dsn, None),
    };
    let base = match base.rsplit_once('/') {
        Some((b, _)) => format!("{b}/{db}"),
        None => base.to_string(),
    };
    match query {
        Some(q) => format!("{base}?{q}"),
        None => base,
    }
}

/// A test node: a database on one PostgreSQL server.
#[derive(Clone, Debug)]
pub struct Node {
    /// Node name (unique per test).
    pub name: String,
    /// Node id.
    pub id: u16,
    /// Region.
    pub region: String,
    /// DSN of the node's database.
    pub dsn: String,
    /// Extra TOML lines of the node's `[[nodes]]` entry (e.g. `forward_origins = [...]`);
    /// takes effect at the next [`Cluster::write_config`].
    pub extra_toml: String,
    admin_dsn: String,
    /// The node's database.
    pub db: String,
}

/// A running `pgferry` process, SIGKILLed when dropped.
pub struct Service {
    child: Child,
    /// Its log file.
    pub log: PathBuf,
}

impl Service {
    /// The process id (for reading `/proc/<pid>/status`, e.g. memory use in benchmarks).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has ended.
    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }

    /// SIGKILL, the way a crash ends a process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An isolated pgferry cluster for one test.
#[derive(Clone)]
pub struct Cluster {
    /// Cluster name (also the prefix of its topics).
    pub name: String,
    /// Its nodes.
    pub nodes: Vec<Node>,
    /// Its config file.
    pub config_path: PathBuf,
    /// Directory for config and logs.
    pub dir: PathBuf,
    /// Replicated tables.
    pub tables: Vec<String>,
    /// Extra TOML appended after the `[replication]` tables line (e.g. `resolver = "manual"`);
    /// takes effect at the next [`Cluster::write_config`].
    pub replication_toml: String,
    /// Extra TOML lines of the `[kafka]` section (e.g. `security_protocol = "SASL_SSL"`);
    /// takes effect at the next [`Cluster::write_config`].
    pub kafka_toml: String,
    /// Extra TOML lines of the `[registry]` section (e.g. `username = "…"`); takes effect at
    /// the next [`Cluster::write_config`].
    pub registry_toml: String,
    /// Extra TOML lines of the `[apply]` section (e.g. `max_group_txns = 7`); takes effect at
    /// the next [`Cluster::write_config`]. Never write an `[apply]` header elsewhere (e.g. in
    /// [`Cluster::replication_toml`]): the config would have two.
    pub apply_toml: String,
    /// Endpoints.
    pub endpoints: Endpoints,
    /// Prints the services' last warnings and errors if the cluster goes without
    /// [`Cluster::cleanup`] (a failing test).
    report: Arc<FailureReport>,
}

/// The services' last warnings and errors, printed when the last clone of a cluster is dropped
/// without [`Cluster::cleanup`]: the test failed. libtest shows a test's output only when it
/// fails, so these lines reach CI's log, where the cluster's directory is gone.
struct FailureReport {
    dir: PathBuf,
    passed: std::sync::atomic::AtomicBool,
}

impl Drop for FailureReport {
    fn drop(&mut self) {
        if self.passed.load(Ordering::SeqCst) {
            return;
        }
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return };
        let mut files: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let notable: Vec<&str> = text.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
            if notable.is_empty() {
                continue;
            }
            eprintln!("--- last warnings and errors of {}", f.display());
            for line in &notable[notable.len().saturating_sub(6)..] {
                let cut: String = line.chars().take(400).collect();
                eprintln!("{cut}");
            }
        }
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Cluster {
    /// Creates databases for `regions.len()` nodes (node i on server i, at most 3), runs
    /// `setup_sql` in each, writes the config replicating `tables`, but does not run init.
    pub async fn create(test: &str, regions: &[&str], setup_sql: &str, tables: &[&str]) -> Result<Cluster> {
        Cluster::create_on(Endpoints::from_env(), test, regions, setup_sql, tables).await
    }

    /// [`Cluster::create`] on the given servers.
    pub async fn create_on(
        endpoints: Endpoints,
        test: &str,
        regions: &[&str],
        setup_sql: &str,
        tables: &[&str],
    ) -> Result<Cluster> {
        if regions.len() > endpoints.pg.len() {
            bail!("at most {} nodes", endpoints.pg.len());
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
            % 100_000_000;
        let unique = format!(
            "{test}_{}_{stamp}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let dir = std::env::temp_dir().join(format!("pgferry-it-{unique}"));
        std::fs::create_dir_all(&dir)?;
        let mut nodes = Vec::new();
        for (i, region) in regions.iter().enumerate() {
            let db = format!("pf_{unique}");
            let admin = connect(&endpoints.pg[i]).await?;
            admin
                .batch_execute(&format!("CREATE DATABASE \"{db}\""))
                .await
                .with_context(|| format!("creating {db}"))?;
            let dsn = with_db(&endpoints.pg[i], &db);
            let c = connect(&dsn).await?;
            c.batch_execute(setup_sql)
                .await
                .context("running the test's setup SQL")?;
            nodes.push(Node {
                name: format!("{test}_{stamp}_{}_n{}", COUNTER.load(Ordering::SeqCst), i + 1).to_lowercase(),
                id: (i + 1) as u16,
                region: region.to_string(),
                dsn,
                extra_toml: String::new(),
                admin_dsn: endpoints.pg[i].clone(),
                db,
            });
        }
        let c = Cluster {
            name: format!("t_{unique}"),
            nodes,
            config_path: dir.join("pgferry.toml"),
            tables: tables.iter().map(|t| t.to_string()).collect(),
            replication_toml: String::new(),
            kafka_toml: String::new(),
            registry_toml: String::new(),
            apply_toml: String::new(),
            report: Arc::new(FailureReport {
                dir: dir.clone(),
                passed: std::sync::atomic::AtomicBool::new(false),
            }),
            dir,
            endpoints,
        };
        c.write_config()?;
        Ok(c)
    }

    /// Writes the cluster's `pgferry.toml` from its nodes and tables.
    pub fn write_config(&self) -> Result<()> {
        let mut kafka = self.kafka_toml.clone();
        if !kafka.contains("[kafka.properties]") {
            kafka += &format!("\n{}", kafka_properties_from_env()?);
        }
        let mut toml = format!(
            "[cluster]\nname = \"{}\"\n[kafka]\nbootstrap_servers = \"{}\"\npartitions = 3\n{}\n[registry]\nurl = \"{}\"\n{}\n",
            self.name, self.endpoints.kafka, kafka, self.endpoints.registry, self.registry_toml
        );
        let apply = self.apply_section()?;
        if !apply.is_empty() {
            toml += &format!("[apply]\n{apply}\n");
        }
        for n in &self.nodes {
            toml += &format!(
                "[[nodes]]\nname = \"{}\"\nid = {}\nregion = \"{}\"\ndsn = \"{}\"\n{}\n",
                n.name, n.id, n.region, n.dsn, n.extra_toml
            );
        }
        let list: Vec<String> = self.tables.iter().map(|t| format!("\"{t}\"")).collect();
        toml += &format!("[replication]\ntables = [{}]\n{}\n", list.join(", "), self.replication_toml);
        std::fs::write(&self.config_path, toml)?;
        Ok(())
    }

    /// The lines of the `[apply]` section: [`Cluster::apply_toml`], and `group_wait_ms` from
    /// `PGFERRY_TEST_GROUP_WAIT_MS` (crate doc) unless `apply_toml` sets it.
    fn apply_section(&self) -> Result<String> {
        let mut lines = apply_lines(&self.apply_toml, group_wait_ms_from_env()?);
        if let Some(on) = read_ahead_from_env()? {
            if !lines.lines().any(|l| l.trim_start().starts_with("read_ahead")) {
                lines = format!("read_ahead = {on}\n{lines}").trim().to_string();
            }
        }
        Ok(lines)
    }

    /// Runs `pgferry init`.
    pub fn init(&self) -> Result<()> {
        let out = self.pgferry(&["init"])?;
        if !out.status.success() {
            bail!("pgferry init failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// [`Cluster::create`] then `pgferry init`.
    pub async fn start(test: &str, regions: &[&str], setup_sql: &str, tables: &[&str]) -> Result<Cluster> {
        let c = Cluster::create(test, regions, setup_sql, tables).await?;
        c.init()?;
        Ok(c)
    }

    /// `pgferry status --json`: its exit status and the parsed report.
    pub fn status_json(&self) -> Result<(i32, serde_json::Value)> {
        let out = self.pgferry(&["status", "--json"])?;
        let json = serde_json::from_slice(&out.stdout)
            .map_err(|e| anyhow::anyhow!("{e}: {}", String::from_utf8_lossy(&out.stderr)))?;
        Ok((out.status.code().unwrap_or(-1), json))
    }

    /// Runs `pgferry --config <cfg> ARGS` to completion.
    pub fn pgferry(&self, args: &[&str]) -> Result<std::process::Output> {
        Command::new(pgferry_bin())
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .output()
            .with_context(|| {
                format!(
                    "running {} (build it with `cargo build --bin pgferry`)",
                    pgferry_bin().display()
                )
            })
    }

    /// Starts `pgferry <service> --node <node i>` in the background (`service`: run, capture, apply).
    pub fn spawn(&self, service: &str, node: usize) -> Result<Service> {
        self.spawn_with(service, node, &[])
    }

    /// [`Cluster::spawn`] with extra arguments after `--node <name>`.
    pub fn spawn_with(&self, service: &str, node: usize, extra: &[&str]) -> Result<Service> {
        let n = &self.nodes[node];
        let log = self.dir.join(format!(
            "{}-{service}-{}.log",
            n.name,
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(pgferry_bin())
            .arg("--config")
            .arg(&self.config_path)
            .args([service, "--node", &n.name])
            .args(extra)
            .env("PGFERRY_LOG", service_log_filter())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {}", pgferry_bin().display()))?;
        Ok(Service { child, log })
    }

    /// A SQL session to node `i`.
    pub async fn sql(&self, i: usize) -> Result<Client> {
        connect(&self.nodes[i].dsn).await
    }

    /// Waits until no apply session of node `i` is left (a stopped or killed process's
    /// backends end when they notice the closed connection), so a replay can take its
    /// replication origins.
    pub async fn wait_apply_gone(&self, i: usize) -> Result<()> {
        let c = self.sql(i).await?;
        wait_until("the stopped apply's sessions to end", std::time::Duration::from_secs(30), || async {
            let n: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'pgferry-apply-%'",
                    &[],
                )
                .await?
                .get(0);
            Ok(n == 0)
        })
        .await
    }

    /// The conflicts node `i` recorded on `table` (`schema.table`): (key, type, resolution,
    /// remote origin), as a set.
    pub async fn conflicts_on(&self, i: usize, table: &str) -> Result<std::collections::BTreeSet<(String, String, String, String)>> {
        Ok(self
            .sql(i)
            .await?
            .query(
                "SELECT key::text, conflict_type, resolution, remote_origin FROM pgferry.conflicts WHERE tbl = $1",
                &[&table],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
    }

    /// A digest of a whole table (every column's text form, ordered by the row text) and its row count.
    pub async fn fingerprint(&self, i: usize, table: &str) -> Result<(String, i64)> {
        let c = self.sql(i).await?;
        let row = c
            .query_one(
                &format!(
                    "SELECT coalesce(md5(string_agg(t::text, E'\\n' ORDER BY t::text)), ''), count(*) FROM {table} t"
                ),
                &[],
            )
            .await?;
        Ok((row.get(0), row.get(1)))
    }

    /// Waits until `table` is identical on every node; returns its digest and row count.
    pub async fn wait_converged(&self, table: &str, timeout: Duration) -> Result<(String, i64)> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut prints = Vec::new();
            for i in 0..self.nodes.len() {
                prints.push(self.fingerprint(i, table).await?);
            }
            if prints.windows(2).all(|w| w[0] == w[1]) {
                return Ok(prints.swap_remove(0));
            }
            if Instant::now() > deadline {
                bail!(
                    "{table} not identical on all nodes after {timeout:?}: {prints:?}\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The data topic of node `i`'s region.
    pub fn topic_of(&self, i: usize) -> String {
        format!("{}.{}.changes", self.name, self.nodes[i].region)
    }

    /// The text of every log file of this cluster's services (for failure messages).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                if e.path().extension().is_some_and(|x| x == "log") {
                    let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(15).collect();
                    out += &format!(
                        "--- {}\n{}\n",
                        e.path().display(),
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
            }
        }
        out
    }

    /// The replication slot of node `i` (pgferry's naming rule, `pgferry_schemas::naming`).
    pub fn slot_of(&self, i: usize) -> String {
        pgferry_schemas::naming::slot_name(&self.name, &self.nodes[i].name)
    }

    /// The replication origin under which node `i` applies the changes of node `origin`.
    pub fn origin_on(&self, i: usize, origin: &str) -> String {
        pgferry_schemas::naming::replication_origin(&self.name, &self.nodes[i].name, origin)
    }

    /// Every replication origin this cluster's nodes may have on their servers: each node's
    /// origin of every node (apply's, and a replay's of its own changes), its repair and
    /// rebuild origins.
    pub fn origins(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for o in &self.nodes {
                out.push(self.origin_on(i, &o.name));
            }
            out.push(pgferry_schemas::naming::repair_origin(&self.name, &n.name));
            out.push(pgferry_schemas::naming::rebuild_origin(&self.name, &n.name));
        }
        out
    }

    /// Drops the databases and slots (call at the end of a passing test; services must be stopped).
    pub async fn cleanup(self) -> Result<()> {
        self.report.passed.store(true, Ordering::SeqCst);
        for n in &self.nodes {
            let admin = connect(&n.admin_dsn).await?;
            admin
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1 AND NOT active",
                    &[&n.db],
                )
                .await?;
            admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", n.db))
                .await?;
            // Replication origins are server-wide and hold one of the server's
            // max_replication_slots progress slots until dropped: the cluster's own
            // ([`Cluster::origins`]) and the tests' `pgferry-<purpose>-<node>`.
            let origins = self.origins();
            let names: Vec<String> = self.nodes.iter().map(|o| o.name.clone()).collect();
            admin
                .execute(
                    "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin
                     WHERE roname = ANY($1)
                        OR (roname LIKE 'pgferry-%'
                            AND EXISTS (SELECT 1 FROM unnest($2::text[]) n WHERE right(roname, length(n) + 1) = '-' || n))",
                    &[&origins, &names],
                )
                .await?;
        }
        if std::env::var_os(SERVICE_LOG).is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        Ok(())
    }
}

/// Environment variable: the log filter of the services clusters start (`PGFERRY_LOG` syntax,
/// e.g. `info,pgferry_apply::group=debug` to see every group's read, decide and write times);
/// when set, a cluster's directory (config and service logs) is also kept after it is dropped.
pub const SERVICE_LOG: &str = "PGFERRY_SERVICE_LOG";

fn service_log_filter() -> String {
    std::env::var(SERVICE_LOG).unwrap_or_else(|_| "info,pg_walstream=error,rdkafka=error".into())
}

/// Recovery tests: writes that capture does not publish, and waiting for capture.
impl Cluster {
    /// Runs `sql` on node `i` under the replication origin `pgferry-<purpose>-<node>`, which no
    /// node forwards: capture skips it, so the change stays on that node (how tests plant a
    /// divergence). The harness drops the origin at cleanup.
    pub async fn write_unpublished(&self, i: usize, purpose: &str, sql: &str) -> Result<()> {
        let c = self.sql(i).await?;
        let origin = format!("pgferry-{purpose}-{}", self.nodes[i].name);
        c.execute(
            "SELECT pg_replication_origin_create($1) WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1)",
            &[&origin],
        )
        .await?;
        c.execute("SELECT pg_replication_origin_session_setup($1)", &[&origin]).await?;
        c.batch_execute(&format!("BEGIN; {sql}; COMMIT"))
            .await
            .with_context(|| format!("writing under origin {origin}"))?;
        c.batch_execute("SELECT pg_replication_origin_session_reset()").await?;
        Ok(())
    }

    /// Waits until node `i`'s capture has confirmed everything written on the node so far
    /// (its slot's confirmed flush position passed the current WAL position).
    pub async fn wait_published(&self, i: usize, timeout: Duration) -> Result<()> {
        let c = self.sql(i).await?;
        let slot = self.slot_of(i);
        let wal: String = c.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
        wait_until(&format!("capture of {} to publish up to {wal}", self.nodes[i].name), timeout, || async {
            let row = c
                .query_one(
                    "SELECT coalesce((SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1), false)",
                    &[&slot, &wal],
                )
                .await?;
            Ok(row.get::<_, bool>(0))
        })
        .await
    }
}

/// xorshift64: the tests' small seeded generator (workloads, fault schedules). Tests print
/// their seeds, so a failure can be replayed.
pub struct XorShift(pub u64);

impl XorShift {
    /// The next number, below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A loopback `ip:port` that was free a moment ago (for a service's listen address).
pub fn free_local_addr() -> Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

/// `GET http://<addr><path>`: status and body.
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let resp = reqwest::get(format!("http://{addr}{path}"))
        .await
        .with_context(|| format!("GET http://{addr}{path}"))?;
    let status = resp.status().as_u16();
    Ok((status, resp.text().await?))
}

/// The value of the sample `name{labels…}` in a Prometheus text exposition: the line whose
/// metric name is `name` and whose labels include every `(key, value)` of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric_name, label_text) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        let all = labels
            .iter()
            .all(|(k, v)| label_text.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
        (metric_name == name && all).then(|| value.parse().ok())?
    })
}

/// One message read back from Kafka.
#[derive(Debug, Clone)]
pub struct TopicMessage {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Headers as strings.
    pub headers: Vec<(String, String)>,
    /// Key bytes.
    pub key: Vec<u8>,
    /// Value bytes.
    pub value: Vec<u8>,
}

impl TopicMessage {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Reads every committed message of every partition of `topic` (read_committed).
pub fn read_topic(bootstrap: &str, topic: &str) -> Result<Vec<TopicMessage>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("it-reader-{}", std::process::id()))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = md.topics().first().map(|t| t.partitions().len()).unwrap_or(0) as i32;
    if partitions == 0 {
        bail!("topic {topic} has no partitions");
    }
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut eof = std::collections::HashSet::new();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while (eof.len() as i32) < partitions {
        if Instant::now() > deadline {
            bail!("timed out reading {topic}");
        }
        match consumer.poll(Duration::from_millis(500)) {
            None => {}
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                eof.insert(p);
            }
            Some(Err(e)) => return Err(anyhow!("reading {topic}: {e}")),
            Some(Ok(m)) => {
                eof.remove(&m.partition());
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_string(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(TopicMessage {
                    partition: m.partition(),
                    offset: m.offset(),
                    headers,
                    key: m.key().unwrap_or_default().to_vec(),
                    value: m.payload().unwrap_or_default().to_vec(),
                });
            }
        }
    }
    Ok(out)
}

/// Produces one message (not in a Kafka transaction) to `topic`/`partition`: how tests put
/// foreign or broken messages into a pgferry topic.
pub fn produce(bootstrap: &str, topic: &str, partition: i32, key: Option<&[u8]>, payload: &[u8], headers: &[(&str, &str)]) -> Result<()> {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
    let mut h = OwnedHeaders::new();
    for (k, v) in headers {
        h = h.insert(Header { key: k, value: Some(*v) });
    }
    let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).partition(partition).payload(payload).headers(h);
    if let Some(k) = key {
        record = record.key(k);
    }
    producer.send(record).map_err(|(e, _)| anyhow!("producing to {topic}: {e}"))?;
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}

/// PostgreSQL servers of one test alone (`deploy/local/pg.sh` under their own state directory
/// and ports), for tests that stop and start servers; stopped when dropped.
pub struct OwnServers {
    root: PathBuf,
    base_port: u16,
    env: Vec<(String, String)>,
    /// Their endpoints (Kafka and the registry are the shared ones).
    pub endpoints: Endpoints,
}

impl OwnServers {
    /// Creates (initdb) and starts `n` servers on `base_port + 1 ..= base_port + n`.
    pub fn start(name: &str, n: usize, base_port: u16) -> Result<OwnServers> {
        OwnServers::start_with(name, n, base_port, &[])
    }

    /// [`OwnServers::start`] with extra environment for `pg.sh` (e.g. `PGFERRY_PG_SSL_CERT`).
    pub fn start_with(name: &str, n: usize, base_port: u16, env: &[(&str, &str)]) -> Result<OwnServers> {
        let root = std::env::temp_dir().join(format!("pgferry-servers-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        let servers = OwnServers {
            endpoints: Endpoints {
                pg: (1..=n)
                    .map(|i| format!("postgres://postgres:{PG_PASSWORD}@127.0.0.1:{}/postgres", base_port as usize + i))
                    .collect(),
                ..Endpoints::from_env()
            },
            root,
            base_port,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        servers.pg_sh(&["start", &n.to_string()])?;
        Ok(servers)
    }

    /// The data directory of server `i` (1-based; holds `postmaster.pid` while it runs).
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.root.join(format!("pg/n{i}"))
    }

    /// Runs `deploy/local/pg.sh ARGS` for these servers.
    pub fn pg_sh(&self, args: &[&str]) -> Result<()> {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/pg.sh");
        let out = Command::new("bash")
            .arg(&script)
            .args(args)
            .env("PGFERRY_LOCAL", &self.root)
            .env("PGFERRY_PG_BASE_PORT", self.base_port.to_string())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if !out.status.success() {
            bail!("pg.sh {args:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}

impl Drop for OwnServers {
    fn drop(&mut self) {
        let _ = self.pg_sh(&["stop"]);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_section_carries_the_forced_group_wait() {
        assert_eq!(apply_lines("", None), "");
        assert_eq!(apply_lines("max_group_txns = 7\n", None), "max_group_txns = 7");
        assert_eq!(apply_lines("", Some(200)), "group_wait_ms = 200");
        assert_eq!(apply_lines("max_group_txns = 7", Some(200)), "group_wait_ms = 200\nmax_group_txns = 7");
        // A test's own value wins.
        assert_eq!(apply_lines("group_wait_ms = 500", Some(200)), "group_wait_ms = 500");
    }

    #[test]
    fn hides_the_password() {
        assert_eq!(
            without_password("postgres://postgres:secret@127.0.0.1:5432/db"),
            "postgres://postgres:***@127.0.0.1:5432/db"
        );
        assert_eq!(without_password("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(without_password("host=h dbname=d"), "host=h dbname=d");
    }
}

/// The `origin → target` cell of the lag matrix in a `pgferry status --json` report.
pub fn lag_cell<'a>(report: &'a serde_json::Value, origin: &str, target: &str) -> Result<&'a serde_json::Value> {
    report["lag"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["origin"] == origin && c["target"] == target))
        .ok_or_else(|| anyhow::anyhow!("no {origin} → {target} cell in {report}"))
}
