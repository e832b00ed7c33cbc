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
            System::Pgferry => self.cluster.init(),
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
                    let (s, p) = self.links[0];
                    self.services.push(("capture", self.cluster.spawn("capture", p)?));
                    self.services.push(("apply", self.cluster.spawn("apply", s)?));
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
                .await?
            }
        }
        self.running = true;
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
        self.each_subscription(
            "ALTER SUBSCRIPTION {sub} DISABLE",
            "SELECT pglogical.alter_subscription_disable($1, true)",
            "disabling subscription",
        )
        .await?;
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
    /// (pgferry apply). Call after [`Replication::start`] of a pair.
    pub fn cost_watches(&self) -> Vec<Watch> {
        let (s, p) = self.links[0];
        let mut w: Vec<Watch> = self
            .services
            .iter()
            .map(|(name, service)| Watch::process(format!("pgferry {name}"), service.pid()))
            .collect();
        w.push(Watch::query(
            "walsender (n1)",
            &self.cluster.nodes[p].dsn,
            "SELECT active_pid FROM pg_replication_slots WHERE database = current_database() AND active_pid IS NOT NULL LIMIT 1",
        ));
        let subscriber = &self.cluster.nodes[s].dsn;
        match self.system {
            System::Pgferry => {}
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
