//! The replication systems under comparison, each set up by the benchmark on fresh databases
//! of the benchmark's PostgreSQL servers: pgferry (capture → Kafka → apply), PostgreSQL's
//! native logical replication (publication/subscription) and pglogical 2. A [`Replication`]
//! can be stopped (changes wait in the origin's slot) and started again, and names the
//! processes whose cost is measured.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pgferry_integration_tests::{Cluster, Service};
use tokio_postgres::Client;

use crate::cost::Watch;

/// A replication system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// pgferry: capture on the origin, apply on the others, through Kafka.
    Pgferry,
    /// PostgreSQL 15 publication/subscription.
    Native,
    /// pglogical 2 (Debian's postgresql-15-pglogical).
    Pglogical,
}

impl System {
    /// Every system, in table order.
    pub const ALL: [System; 3] = [System::Pgferry, System::Native, System::Pglogical];

    /// Name in the tables.
    pub fn label(self) -> &'static str {
        match self {
            System::Pgferry => "pgferry",
            System::Native => "PG15 native",
            System::Pglogical => "pglogical 2",
        }
    }

    /// Name on the command line and in the results file.
    pub fn key(self) -> &'static str {
        match self {
            System::Pgferry => "pgferry",
            System::Native => "native",
            System::Pglogical => "pglogical",
        }
    }

    /// Parses [`System::key`].
    pub fn parse(s: &str) -> Result<System, String> {
        System::ALL
            .into_iter()
            .find(|x| x.key() == s)
            .ok_or_else(|| format!("unknown system {s:?} (pgferry, native, pglogical)"))
    }
}

/// Role of pgferry apply's own PostgreSQL sessions on the subscriber in the cost figures.
pub const APPLY_SESSIONS: &str = "apply's sessions (n2)";

/// Role of the Kafka broker in pgferry's cost figures (its CPU during the drain only).
pub const KAFKA_BROKER: &str = "Kafka broker (during the drain)";

/// How long set-up steps (a subscription replicating, a worker stopping) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// Replication among the nodes of a [`Cluster`] (node i on benchmark server i): every node's
/// changes to every other node, or with [`Replication::pair`] node 1 → node 2 only.
pub struct Replication {
    /// The system.
    pub system: System,
    /// The databases (and pgferry's config).
    pub cluster: Cluster,
    /// `(subscriber, provider)` node indexes of the links.
    links: Vec<(usize, usize)>,
    /// pgferry's running services (capture and apply per node for a pair, `run` per node for
    /// a mesh).
    services: Vec<(&'static str, Service)>,
    /// `ip:port` of the running pgferry apply's `/metrics` (a pair's; a fresh port each start).
    apply_metrics: Option<String>,
    /// Native: when a subscription was last enabled or disabled (see [`Replication::ready_to_start`]).
    toggled: Option<Instant>,
    running: bool,
}

impl Replication {
    /// Node 1 → node 2 on fresh databases made with `setup_sql`, replicating `tables`;
    /// replication is stopped.
    pub async fn pair(system: System, setup_sql: &str, tables: &[&str]) -> Result<Replication> {
        Replication::create(system, "cmp", 2, setup_sql, tables, vec![(1, 0)]).await
    }

    /// Every node → every other node (`nodes` of them); replication is stopped.
    pub async fn mesh(system: System, nodes: usize, setup_sql: &str, tables: &[&str]) -> Result<Replication> {
        let links = (0..nodes)
            .flat_map(|s| (0..nodes).filter(move |&p| p != s).map(move |p| (s, p)))
            .collect();
        Replication::create(system, "mesh", nodes, setup_sql, tables, links).await
    }

    async fn create(
        system: System,
        test: &str,
        nodes: usize,
        setup_sql: &str,
        tables: &[&str],
        links: Vec<(usize, usize)>,
    ) -> Result<Replication> {
        let regions = vec!["r1"; nodes];
        let cluster = Cluster::create(&format!("{test}_{}", system.key()), &regions, setup_sql, tables).await?;
        let mut r = Replication {
            system,
            cluster,
            links,
            services: Vec::new(),
            apply_metrics: None,
            toggled: None,
            running: false,
        };
        if let Err(e) = r.set_up(tables).await {
            // Leave no slot behind (it would pin WAL on the benchmark servers).
            let _ = r.finish().await;
            return Err(e);
        }
        Ok(r)
    }

    async fn set_up(&mut self, tables: &[&str]) -> Result<()> {
        match self.system {
            System::Pgferry => {
                self.cluster.init()?;
                self.rows_as_replicated().await
            }
            System::Native => {
                let list = tables.join(", ");
                for p in self.providers() {
                    self.sql(p)
                        .await?
                        .batch_execute(&format!("CREATE PUBLICATION bench_pub FOR TABLE {list}"))
                        .await
                        .context("creating the publication")?;
                }
                for (s, p) in self.links.clone() {
                    let sql = format!(
                        "CREATE SUBSCRIPTION {} CONNECTION '{}' PUBLICATION bench_pub \
                         WITH (copy_data = false, enabled = false)",
                        self.subscription(s, p),
                        self.cluster.nodes[p].dsn
                    );
                    // The error would quote the statement, which holds the password: name it only.
                    self.sql(s).await?.batch_execute(&sql).await.map_err(|e| {
                        anyhow::anyhow!("creating the subscription n{} <- n{}: {}", s + 1, p + 1, db_error(&e))
                    })?;
                }
                Ok(())
            }
            System::Pglogical => {
                for i in 0..self.cluster.nodes.len() {
                    let c = self.sql(i).await?;
                    c.batch_execute("CREATE EXTENSION pglogical")
                        .await
                        .context("CREATE EXTENSION pglogical (is it in shared_preload_libraries?)")?;
                    c.execute(
                        "SELECT pglogical.create_node(node_name := $1, dsn := $2)",
                        &[&self.cluster.nodes[i].name, &conninfo(&self.cluster.nodes[i].dsn)?],
                    )
                    .await
                    .map_err(|e| anyhow::anyhow!("pglogical.create_node on n{}: {}", i + 1, db_error(&e)))?;
                    c.batch_execute("SELECT pglogical.replication_set_add_all_tables('default', ARRAY['public'])")
                        .await
                        .context("adding the tables to pglogical's default replication set")?;
                }
                for (s, p) in self.links.clone() {
                    // forward_origins '{}': only the provider's own changes (no loops in a mesh).
                    self.sql(s)
                        .await?
                        .execute(
                            "SELECT pglogical.create_subscription(subscription_name := $1, provider_dsn := $2,
                                 synchronize_structure := false, synchronize_data := false, forward_origins := '{}')",
                            &[&self.subscription(s, p), &conninfo(&self.cluster.nodes[p].dsn)?],
                        )
                        .await
                        .map_err(|e| {
                            anyhow::anyhow!("pglogical.create_subscription n{} <- n{}: {}", s + 1, p + 1, db_error(&e))
                        })?;
                }
                // The slots are made when the subscriptions first connect: wait for that, then stop.
                for (s, p) in self.links.clone() {
                    let c = self.sql(s).await?;
                    let name = self.subscription(s, p);
                    poll(&format!("pglogical subscription {name} replicating"), || async {
                        let row = c
                            .query_one("SELECT status FROM pglogical.show_subscription_status($1)", &[&name])
                            .await?;
                        Ok(row.get::<_, String>(0) == "replicating")
                    })
                    .await?;
                }
                self.running = true;
                self.stop().await
            }
        }
    }

    /// pgferry only: makes each subscriber's pgbench rows look replicated from the node that
    /// writes them (the provider of a pair; in a mesh, node `i` for branch `i + 1`, which is
    /// the branch it writes): rewritten under that node's replication origin, then compacted
    /// (`VACUUM FULL` keeps each version's xmin, so its commit time and origin). That is how a
    /// running cluster has them — copied by `node add` or written through replication — and
    /// without it every first remote update of a row would be an `update_origin_differs`
    /// conflict (recorded and published by pgferry; native and pglogical do not detect it),
    /// an artifact of loading every node separately. The conflict-heavy drain measures
    /// conflicts on purpose.
    async fn rows_as_replicated(&self) -> Result<()> {
        const LOADED: [&str; 3] = ["pgbench_branches", "pgbench_tellers", "pgbench_accounts"];
        let pair = self.links.len() == 1;
        for s in 0..self.cluster.nodes.len() {
            let c = self.sql(s).await?;
            let exists: bool = c
                .query_one("SELECT to_regclass('pgbench_accounts') IS NOT NULL", &[])
                .await
                .context("looking for the pgbench tables")?
                .get(0);
            let providers: Vec<usize> = self.links.iter().filter(|&&(sub, _)| sub == s).map(|&(_, p)| p).collect();
            if !exists || providers.is_empty() {
                continue;
            }
            for p in providers {
                let origin = self.cluster.origin_on(s, &self.cluster.nodes[p].name);
                let filter = if pair { "true".to_string() } else { format!("bid = {}", p + 1) };
                c.execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
                    .await
                    .with_context(|| format!("setting up replication origin {origin} on n{}", s + 1))?;
                let updates: Vec<String> = LOADED
                    .iter()
                    .map(|t| format!("UPDATE {t} SET bid = bid WHERE {filter};"))
                    .collect();
                let rewritten = c.batch_execute(&format!("BEGIN; {} COMMIT;", updates.join(" "))).await;
                c.batch_execute("SELECT pg_replication_origin_session_reset()")
                    .await
                    .context("resetting the replication origin")?;
                rewritten.with_context(|| format!("rewriting n{}'s rows under {origin}", s + 1))?;
            }
            // Two statements: VACUUM cannot run in the implicit transaction of a batch.
            for stmt in ["VACUUM FULL", "ANALYZE"] {
                c.batch_execute(&format!("{stmt} {}", LOADED.join(", ")))
                    .await
                    .with_context(|| format!("{stmt} of n{}'s pgbench tables", s + 1))?;
            }
        }
        Ok(())
    }

    /// Node indexes that send changes.
    fn providers(&self) -> Vec<usize> {
        let mut p: Vec<usize> = self.links.iter().map(|&(_, p)| p).collect();
        p.sort_unstable();
        p.dedup();
        p
    }

    /// Subscription name of a link (unique on the server: it also names the slot).
    fn subscription(&self, subscriber: usize, provider: usize) -> String {
        format!("s_{}_{}_{}", self.cluster.name, subscriber + 1, provider + 1)
    }

    /// A session to node `i`'s database.
    pub async fn sql(&self, i: usize) -> Result<Client> {
        self.cluster.sql(i).await
    }

    /// Starts replication (from where each link stopped).
    pub async fn start(&mut self) -> Result<()> {
        match self.system {
            System::Pgferry => {
                if self.links.len() == 1 {
                    self.start_capture()?;
                    self.start_apply()?;
                } else {
                    for i in 0..self.cluster.nodes.len() {
                        self.services.push(("run", self.cluster.spawn("run", i)?));
                    }
                }
            }
            System::Native | System::Pglogical => {
                self.each_subscription(
                    "ALTER SUBSCRIPTION {sub} ENABLE",
                    "SELECT pglogical.alter_subscription_enable($1, true)",
                    "enabling subscription",
                )
                .await?;
                self.toggled = Some(Instant::now());
            }
        }
        self.running = true;
        Ok(())
    }

    /// Waits until starting replication starts it at once. PostgreSQL 15's logical
    /// replication launcher looks for subscriptions without a worker at most once every
    /// `wal_retrieve_retry_interval` (5 s by default), and it looks when a subscription is
    /// enabled or disabled: enabling a native subscription sooner than that after the last
    /// toggle starts its worker only when the interval is over, which a timed drain would
    /// count. Nothing to wait for with the other systems.
    pub async fn ready_to_start(&self) -> Result<()> {
        let (System::Native, Some(at)) = (self.system, self.toggled) else {
            return Ok(());
        };
        let c = self.sql(self.links[0].0).await?;
        let ms: i32 = c
            .query_one(
                "SELECT setting::int FROM pg_settings WHERE name = 'wal_retrieve_retry_interval'",
                &[],
            )
            .await
            .context("reading wal_retrieve_retry_interval")?
            .get(0);
        // A little more: the launcher looks just after the toggle commits.
        let until = at + Duration::from_millis(u64::try_from(ms).unwrap_or(0) + 250);
        tokio::time::sleep_until(until.into()).await;
        Ok(())
    }

    /// pgferry's pair only: starts capture on the provider (apply stays as it is).
    pub fn start_capture(&mut self) -> Result<()> {
        let (_, p) = self.pgferry_pair()?;
        self.services.push(("capture", self.cluster.spawn("capture", p)?));
        self.running = true;
        Ok(())
    }

    /// pgferry's pair only: waits until the provider's partition holds a committed change at or
    /// after `marker` (an LSN read inside the last transaction before it committed): capture
    /// has published everything up to that transaction ([`measure::wait_captured`]). Unlike the
    /// slot's confirmed position, which passes the WAL written after the last transaction only
    /// at capture's next heartbeat (every 5 s), this is seen as soon as capture commits it.
    pub async fn wait_published(&mut self, marker: u64, timeout: Duration) -> Result<()> {
        let (_, p) = self.pgferry_pair()?;
        // A pair's two nodes share a region, so the provider's index is its partition.
        let probe = tokio::task::block_in_place(|| {
            crate::partition::PartitionProbe::new(&self.cluster.endpoints.kafka, &self.cluster.topic_of(p), p as i32)
        })?;
        let Some((_, capture)) = self.services.iter_mut().find(|(name, _)| *name == "capture") else {
            anyhow::bail!("waiting for capture to publish, but capture is not running");
        };
        crate::measure::wait_captured(&self.cluster, capture, &probe, marker, timeout).await?;
        Ok(())
    }

    /// pgferry's pair only: starts apply on the subscriber, with its `/metrics` on a free
    /// loopback port (see [`Replication::apply_metrics`]).
    pub fn start_apply(&mut self) -> Result<()> {
        let (s, _) = self.pgferry_pair()?;
        let addr = pgferry_integration_tests::free_local_addr()?;
        self.services
            .push(("apply", self.cluster.spawn_with("apply", s, &["--metrics-listen", &addr])?));
        self.apply_metrics = Some(addr);
        self.running = true;
        Ok(())
    }

    /// The `(subscriber, provider)` link of a pgferry pair; an error for anything else.
    fn pgferry_pair(&self) -> Result<(usize, usize)> {
        match (self.system, self.links.as_slice()) {
            (System::Pgferry, [link]) => Ok(*link),
            _ => bail!("{}: capture and apply start separately only in pgferry's pair", self.system.label()),
        }
    }

    /// `ip:port` of the running pgferry apply's `/metrics`, if one runs.
    pub fn apply_metrics(&self) -> Option<&str> {
        self.services
            .iter()
            .any(|(name, _)| *name == "apply")
            .then_some(self.apply_metrics.as_deref())
            .flatten()
    }

    /// Waits until every slot of `provider`'s database has confirmed `lsn` (pgferry: capture
    /// has published everything before it; the others: the subscriber has it), failing if a
    /// pgferry service exits or after `timeout`.
    pub async fn wait_confirmed(&mut self, provider: usize, lsn: u64, timeout: Duration) -> Result<()> {
        let c = self.sql(provider).await?;
        let lsn_text = crate::measure::lsn_text(lsn);
        let deadline = Instant::now() + timeout;
        loop {
            let row = c
                .query_one(
                    "SELECT coalesce(bool_and(confirmed_flush_lsn >= $1::text::pg_lsn), false)
                     FROM pg_replication_slots WHERE database = current_database()",
                    &[&lsn_text],
                )
                .await
                .context("reading the slots' confirmed positions")?;
            if row.get::<_, bool>(0) {
                return Ok(());
            }
            self.check_services()?;
            if Instant::now() > deadline {
                bail!(
                    "{}: the slots on n{} did not confirm {lsn_text} within {timeout:?}",
                    self.system.label(),
                    provider + 1
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts replication and waits until every provider's slots have confirmed the WAL
    /// written so far (also other databases' WAL, which a slot's decoding has to read past:
    /// the other systems' backlogs written while this one was stopped). Untimed preparation
    /// of a measurement, so that it measures this system's own changes only. Leaves
    /// replication running.
    pub async fn catch_up(&mut self, timeout: Duration) -> Result<()> {
        let mut positions = Vec::new();
        for p in self.providers() {
            let c = self.sql(p).await?;
            positions.push((p, crate::measure::lsn(&c, "pg_current_wal_lsn()").await?));
        }
        if !self.running {
            self.start().await?;
        }
        for (p, lsn) in positions {
            self.wait_confirmed(p, lsn, timeout).await?;
        }
        Ok(())
    }

    /// Stops replication and waits until no link's slot is in use any more.
    pub async fn stop(&mut self) -> Result<()> {
        if !self.running {
            return Ok(());
        }
        for (_, mut service) in self.services.drain(..) {
            service.kill();
        }
        self.apply_metrics = None;
        self.each_subscription(
            "ALTER SUBSCRIPTION {sub} DISABLE",
            "SELECT pglogical.alter_subscription_disable($1, true)",
            "disabling subscription",
        )
        .await?;
        if self.system == System::Native {
            self.toggled = Some(Instant::now());
        }
        for p in self.providers() {
            let c = self.sql(p).await?;
            poll(&format!("the slots on n{} to be released", p + 1), || async {
                let row = c
                    .query_one(
                        "SELECT count(*) FROM pg_replication_slots WHERE database = current_database() AND active",
                        &[],
                    )
                    .await?;
                Ok(row.get::<_, i64>(0) == 0)
            })
            .await?;
        }
        self.running = false;
        Ok(())
    }

    /// Runs a statement on every link's subscription: `native` (with `{sub}` replaced by the
    /// subscription's name) on native subscriptions, `pglogical` (the name as `$1`) on
    /// pglogical's. Nothing for pgferry.
    async fn each_subscription(&self, native: &str, pglogical: &str, what: &str) -> Result<()> {
        if self.system == System::Pgferry {
            return Ok(());
        }
        for (s, p) in self.links.clone() {
            let c = self.sql(s).await?;
            let name = self.subscription(s, p);
            if self.system == System::Native {
                c.batch_execute(&native.replace("{sub}", &name)).await.map(|_| ())
            } else {
                c.execute(pglogical, &[&name]).await.map(|_| ())
            }
            .with_context(|| format!("{what} {name} on n{}", s + 1))?;
        }
        Ok(())
    }

    /// The pgferry services, if any has exited (with its log), as an error.
    pub fn check_services(&mut self) -> Result<()> {
        for (name, service) in &mut self.services {
            if let Some(status) = service.try_wait()? {
                bail!("pgferry {name} exited ({status})\n{}", self.cluster.logs());
            }
        }
        Ok(())
    }

    /// The processes whose CPU and memory the cost figures are made of: on the origin the
    /// walsender decoding the slot (and pgferry capture), on the replica the apply worker
    /// (pgferry apply and its own PostgreSQL sessions, `application_name` `pgferry-apply-…`).
    /// Call after [`Replication::start`] of a pair (or [`Replication::start_apply`] alone).
    pub fn cost_watches(&self) -> Vec<Watch> {
        let (s, p) = self.links[0];
        let mut w: Vec<Watch> = self
            .services
            .iter()
            .map(|(name, service)| Watch::process(format!("pgferry {name}"), service.pid()))
            .collect();
        // pgferry's apply-only drain runs without capture, so without a walsender.
        let capture = self.system != System::Pgferry || self.services.iter().any(|(name, _)| *name == "capture");
        w.extend(capture.then(|| Watch::query(
            "walsender (n1)",
            &self.cluster.nodes[p].dsn,
            "SELECT active_pid FROM pg_replication_slots WHERE database = current_database() AND active_pid IS NOT NULL LIMIT 1",
        )));
        // The broker pgferry's events go through (`PGFERRY_BENCH_KAFKA_PID`, set by
        // deploy/local/bench.sh): it shares the cores with everything else in a drain.
        if self.system == System::Pgferry {
            if let Some(pid) = std::env::var("PGFERRY_BENCH_KAFKA_PID").ok().and_then(|p| p.trim().parse().ok()) {
                w.push(Watch::process_from_now(KAFKA_BROKER, pid));
            }
        }
        let subscriber = &self.cluster.nodes[s].dsn;
        match self.system {
            System::Pgferry => w.push(Watch::sessions(
                APPLY_SESSIONS,
                subscriber,
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'pgferry-apply-%'",
            )),
            System::Native => w.push(Watch::query(
                "apply worker (n2)",
                subscriber,
                "SELECT pid FROM pg_stat_subscription WHERE relid IS NULL AND pid IS NOT NULL LIMIT 1",
            )),
            System::Pglogical => w.push(Watch::query(
                "apply worker (n2)",
                subscriber,
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND backend_type LIKE 'pglogical apply%' LIMIT 1",
            )),
        }
        w
    }

    /// Stops replication and drops its subscriptions and slots (no WAL is held for it any
    /// more); returns the cluster, whose databases and topics [`crate::measure::remove`] drops once
    /// the whole comparison is over (DROP DATABASE ends pglogical's supervisor on PostgreSQL 15,
    /// see there).
    pub async fn finish(mut self) -> Result<Cluster> {
        let stopped = self.stop().await;
        // Dropping a subscription also drops its slot on the provider.
        self.each_subscription(
            "DROP SUBSCRIPTION IF EXISTS {sub}",
            "SELECT pglogical.drop_subscription($1, true)",
            "dropping subscription",
        )
        .await?;
        for i in 0..self.cluster.nodes.len() {
            self.sql(i)
                .await?
                .batch_execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                     WHERE database = current_database() AND NOT active",
                )
                .await
                .context("dropping the benchmark's slots")?;
        }
        stopped?;
        Ok(self.cluster)
    }
}

/// A libpq key/value connection string from a URL DSN (pglogical appends options to it).
fn conninfo(dsn: &str) -> Result<String> {
    let config: tokio_postgres::Config = dsn.parse().context("parsing a node's DSN")?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => bail!("a node's DSN has no TCP host"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let password = config.get_password().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default();
    Ok(format!(
        "host={host} port={port} dbname={} user={} password={password}",
        config.get_dbname().unwrap_or("postgres"),
        config.get_user().unwrap_or("postgres")
    ))
}

/// The server's message of a PostgreSQL error (never the statement, which may hold a password).
fn db_error(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string())
}

/// Polls `check` every 100 ms until true, failing after [`STEP_TIMEOUT`].
async fn poll<F, Fut>(what: &str, check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    pgferry_integration_tests::wait_until(what, STEP_TIMEOUT, check).await
}

/// Waits until `client` sees the marker row `key` of `workload`; returns when it did.
pub async fn wait_marker(
    replication: &mut Replication,
    node: usize,
    workload: crate::workload::Workload,
    key: i64,
    timeout: Duration,
) -> Result<Instant> {
    let c = replication.sql(node).await?;
    let deadline = Instant::now() + timeout;
    loop {
        if crate::workload::has_marker(&c, workload, key).await? {
            return Ok(Instant::now());
        }
        replication.check_services()?;
        if Instant::now() > deadline {
            bail!(
                "{}: n{} did not get the marker row within {timeout:?}",
                replication.system.label(),
                node + 1
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
