//! The fault suite: the ledger workload (`pgferry_integration_tests::ledger`) on three nodes
//! while one kind of fault is injected `PGFERRY_FAULT_ROUNDS` times (default 3) with real
//! tools — SIGKILL of a node's capture or apply process, a PostgreSQL crash (immediate stop or
//! SIGKILL of the postmaster), SIGKILL of the Kafka broker, a network cut between one node's
//! services and its PostgreSQL or Kafka (a proxy that resets every connection), the broker's
//! disk filling up, the registry down while services restart. The test restarts only what it
//! killed itself; a service that exits on its own fails the test. After each heal every
//! transfer acknowledged so far must reach every node; at the end the ledger checker must pass
//! on every node. Each test prints one `FAULT kind=… injected=… acked=… lost=… dup=…
//! converge_ms=…` line (docs/reliability.md is written from them).
//!
//! Servers that a test breaks are its own (`OwnServers`, `OwnKafka`, `OwnRegistry`); the shared
//! ones are only used where nothing breaks them.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use pgferry_integration_tests::ledger::{self, Ledger};
use pgferry_integration_tests::own_services::{free_port, process_alive, signal, KafkaOptions, OwnKafka, OwnRegistry};
use pgferry_integration_tests::proxy::Proxy;
use pgferry_integration_tests::{http_get, wait_until, Cluster, Endpoints, OwnServers, Service};

const CAPTURE: usize = 0;
const APPLY: usize = 1;
const SERVICES: [&str; 2] = ["capture", "apply"];
/// Ledger clients per node, and their pause between transfers.
const CLIENTS: usize = 2;
const PACE: Duration = Duration::from_millis(100);
/// How long a fault lasts before it is healed (a bounded pause: the workload runs meanwhile).
const OUTAGE: Duration = Duration::from_secs(3);
/// Deadline for replication to catch up after a heal.
const RECOVER: Duration = Duration::from_secs(120);

fn rounds() -> usize {
    std::env::var("PGFERRY_FAULT_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
}

/// Three nodes with separate capture and apply processes, each serving `/healthz`.
struct Rig {
    cluster: Cluster,
    /// The cluster as each node's services see it (its own config file when a node's
    /// PostgreSQL or Kafka is reached through a proxy).
    per_node: Vec<Cluster>,
    services: Vec<[Option<Service>; 2]>,
    metrics: Vec<[String; 2]>,
    /// Longest time from a heal until every transfer acknowledged before it was everywhere.
    recover_max: Duration,
}

impl Rig {
    /// Creates the cluster on `endpoints`, lets `adjust` change node i's view of it (e.g. the
    /// DSN or bootstrap servers of a proxy), runs init and starts every service.
    async fn start(test: &str, endpoints: Endpoints, adjust: impl Fn(usize, &mut Cluster)) -> Result<Rig> {
        let mut cluster = Cluster::create_on(
            endpoints,
            test,
            &["r1", "r1", "r1"],
            &ledger::setup_sql(),
            ledger::TABLES,
        )
        .await?;
        cluster.replication_toml = ledger::REPLICATION_TOML.into();
        cluster.write_config()?;
        cluster.init()?;
        let mut per_node = Vec::new();
        for i in 0..3 {
            let mut view = cluster.clone();
            adjust(i, &mut view);
            if view.config_path == cluster.config_path {
                // Unchanged view: the same file.
            } else {
                view.write_config()?;
            }
            per_node.push(view);
        }
        let metrics = (0..3)
            .map(|_| {
                Ok([
                    format!("127.0.0.1:{}", free_port()?),
                    format!("127.0.0.1:{}", free_port()?),
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        let mut rig = Rig {
            cluster,
            per_node,
            services: (0..3).map(|_| [None, None]).collect(),
            metrics,
            recover_max: Duration::ZERO,
        };
        for n in 0..3 {
            for s in [CAPTURE, APPLY] {
                rig.spawn(n, s)?;
            }
        }
        Ok(rig)
    }

    fn spawn(&mut self, node: usize, service: usize) -> Result<()> {
        let svc = self.per_node[node].spawn_with(
            SERVICES[service],
            node,
            &["--metrics-listen", &self.metrics[node][service]],
        )?;
        self.services[node][service] = Some(svc);
        Ok(())
    }

    /// SIGKILLs a service (the test restarts it with [`Rig::spawn`]).
    fn kill(&mut self, node: usize, service: usize) {
        if let Some(mut s) = self.services[node][service].take() {
            s.kill();
        }
    }

    /// Fails if a service the test did not kill has exited.
    fn alive(&mut self) -> Result<()> {
        for (n, pair) in self.services.iter_mut().enumerate() {
            for (s, svc) in pair.iter_mut().enumerate() {
                if let Some(svc) = svc {
                    if let Some(status) = svc.try_wait()? {
                        let log = std::fs::read_to_string(&svc.log).unwrap_or_default();
                        let tail: Vec<&str> = log.lines().rev().take(20).collect();
                        bail!(
                            "{} of node {} exited by itself ({status}); last log lines:\n{}",
                            SERVICES[s],
                            n + 1,
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// The `/healthz` status of a service (0 when it does not answer).
    async fn health(&self, node: usize, service: usize) -> u16 {
        http_get(&self.metrics[node][service], "/healthz")
            .await
            .map_or(0, |r| r.0)
    }

    /// Waits until a service's `/healthz` answers `status`.
    async fn wait_health(&mut self, node: usize, service: usize, status: u16, timeout: Duration) -> Result<()> {
        let what = format!("{} of node {} to answer /healthz {status}", SERVICES[service], node + 1);
        let deadline = Instant::now() + timeout;
        loop {
            self.alive()?;
            if self.health(node, service).await == status {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {what}\n{}",
                    self.cluster.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// After a heal: every transfer acknowledged until now reaches every node.
    async fn wait_recovered(&mut self, ledger: &Ledger, healed: Instant) -> Result<()> {
        let ids = ledger.acked_ids();
        let cluster = self.cluster.clone();
        let result = ledger::wait_replicated(&cluster, &ids, RECOVER, || self.alive()).await;
        if let Err(e) = result {
            bail!("{e}\n{}", self.cluster.logs());
        }
        let took = healed.elapsed();
        eprintln!(
            "  recovered {} transfers on every node {took:?} after the heal",
            ids.len()
        );
        self.recover_max = self.recover_max.max(took);
        Ok(())
    }

    /// During a fault: both services of `node` answer `/healthz` 503.
    async fn wait_unhealthy(&mut self, node: usize) -> Result<()> {
        self.wait_health(node, APPLY, 503, Duration::from_secs(30)).await?;
        self.wait_health(node, CAPTURE, 503, Duration::from_secs(30)).await
    }

    /// After a heal at `healed`: replication caught up ([`Rig::wait_recovered`]), the
    /// services of `nodes` answer `/healthz` 200, and the workload runs on for a moment.
    async fn wait_healed(&mut self, ledger: &Ledger, healed: Instant, nodes: &[usize]) -> Result<()> {
        self.wait_recovered(ledger, healed).await?;
        for &n in nodes {
            self.wait_health(n, CAPTURE, 200, Duration::from_secs(60)).await?;
            self.wait_health(n, APPLY, 200, Duration::from_secs(60)).await?;
        }
        run_for(Duration::from_secs(1)).await;
        Ok(())
    }

    /// Stops the workload, checks the ledger, prints the FAULT line and fails on any problem;
    /// then stops the services and drops the databases.
    async fn finish(mut self, ledger: Ledger, kind: &str, injected: usize) -> Result<()> {
        let record = ledger.stop().await;
        self.alive()?;
        let report = ledger::check(&self.cluster, &record, Duration::from_secs(180)).await?;
        println!(
            "{} recover_max_ms={}",
            report.fault_line(kind, injected),
            self.recover_max.as_millis()
        );
        if !report.ok() {
            bail!(
                "ledger check failed after {kind}:\n{}\n{}",
                report.problems.join("\n"),
                self.cluster.logs()
            );
        }
        self.alive()?;
        assert!(
            record.acked.len() > 100,
            "the workload ran ({} acknowledged)",
            record.acked.len()
        );
        self.services.clear();
        if let Some(keep) = std::env::var_os("PGFERRY_FAULT_KEEP_LOGS") {
            // The services' logs, for reading what happened during the faults.
            let to = std::path::PathBuf::from(keep).join(kind);
            let _ = std::fs::create_dir_all(&to);
            for e in std::fs::read_dir(&self.cluster.dir)?.flatten() {
                let _ = std::fs::copy(e.path(), to.join(e.file_name()));
            }
        }
        self.cluster.cleanup().await
    }
}

/// Starts the ledger and waits until every node commits transfers.
async fn start_ledger(rig: &Rig) -> Result<Ledger> {
    let ledger = Ledger::start(&rig.cluster, CLIENTS, PACE);
    ledger.wait_progress(20, Duration::from_secs(60)).await?;
    Ok(ledger)
}

/// The workload runs on for a moment (a bounded pause, not a wait for a state).
async fn run_for(d: Duration) {
    tokio::time::sleep(d).await;
}

/// Shared test PostgreSQL servers with the given Kafka and registry.
fn shared_pg(kafka: Option<String>, registry: Option<String>) -> Endpoints {
    let mut e = Endpoints::from_env();
    if let Some(k) = kafka {
        e.kafka = k;
    }
    if let Some(r) = registry {
        e.registry = r;
    }
    e
}

async fn kill_service(kind: &str, service: usize) -> Result<()> {
    let mut rig = Rig::start(kind, shared_pg(None, None), |_, _| {}).await?;
    let ledger = start_ledger(&rig).await?;
    let rounds = rounds();
    for round in 0..rounds {
        let node = round % 3;
        eprintln!(
            "{kind} round {}: SIGKILL {} of node {}",
            round + 1,
            SERVICES[service],
            node + 1
        );
        rig.kill(node, service);
        run_for(OUTAGE / 2).await;
        rig.spawn(node, service)?;
        let healed = Instant::now();
        rig.wait_healed(&ledger, healed, &[node]).await?;
    }
    rig.finish(ledger, kind, rounds).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_sigkill() -> Result<()> {
    kill_service("capture_sigkill", CAPTURE).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_sigkill() -> Result<()> {
    kill_service("apply_sigkill", APPLY).await
}

/// Three consecutive free ports above a base: PostgreSQL servers of the test.
fn free_pg_base() -> Result<u16> {
    for _ in 0..200 {
        let base = free_port()?;
        if (1..=3).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return Ok(base);
        }
    }
    bail!("no three free consecutive ports")
}

/// The postmaster's pid of server `i` (1-based) of `servers`.
fn postmaster_pid(servers: &OwnServers, i: usize) -> Result<u32> {
    let file = servers.data_dir(i).join("postmaster.pid");
    let text = std::fs::read_to_string(&file)?;
    Ok(text.lines().next().unwrap_or_default().trim().parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash() -> Result<()> {
    let kind = "postgres_crash";
    let servers = OwnServers::start(kind, 3, free_pg_base()?)?;
    let mut rig = Rig::start(kind, servers.endpoints.clone(), |_, _| {}).await?;
    let ledger = start_ledger(&rig).await?;
    let rounds = rounds();
    for round in 0..rounds {
        let node = round % 3;
        if round % 2 == 0 {
            eprintln!(
                "{kind} round {}: immediate stop of node {}'s PostgreSQL",
                round + 1,
                node + 1
            );
            servers.pg_sh(&["kill-node", &(node + 1).to_string()])?;
        } else {
            eprintln!("{kind} round {}: SIGKILL of node {}'s postmaster", round + 1, node + 1);
            let pid = postmaster_pid(&servers, node + 1)?;
            signal(pid, "-KILL")?;
            wait_until("the postmaster to end", Duration::from_secs(30), || async {
                Ok(!process_alive(pid))
            })
            .await?;
        }
        // While the server is down both services of the node say so.
        rig.wait_unhealthy(node).await?;
        run_for(OUTAGE).await;
        // After a postmaster SIGKILL its backends notice and exit; start retries until they have.
        let start = Instant::now();
        loop {
            match servers.pg_sh(&["start-node", &(node + 1).to_string()]) {
                Ok(()) => break,
                Err(e) if start.elapsed() > Duration::from_secs(60) => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
        let healed = Instant::now();
        rig.wait_healed(&ledger, healed, &[node]).await?;
    }
    rig.finish(ledger, kind, rounds).await?;
    drop(servers);
    Ok(())
}

/// The DSN `dsn` with its host and port replaced by `addr`.
fn via(dsn: &str, addr: &str) -> String {
    match dsn.rsplit_once('@') {
        Some((user, rest)) => {
            let db = rest.split_once('/').map_or("", |(_, db)| db);
            format!("{user}@{addr}/{db}")
        }
        None => dsn.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_network_cut() -> Result<()> {
    let kind = "postgres_network_cut";
    let endpoints = shared_pg(None, None);
    let target = endpoints.pg[0]
        .rsplit_once('@')
        .and_then(|(_, r)| r.split_once('/'))
        .map(|(h, _)| h.to_string());
    let proxy = Proxy::start("127.0.0.1:0", &target.unwrap_or_default()).await?;
    let addr = proxy.addr().to_string();
    let mut rig = Rig::start(kind, endpoints, |i, view| {
        if i == 0 {
            view.config_path = view.dir.join("pgferry-n1-via-proxy.toml");
            view.nodes[0].dsn = via(&view.nodes[0].dsn, &addr);
        }
    })
    .await?;
    let ledger = start_ledger(&rig).await?;
    anyhow::ensure!(
        proxy.accepted() > 0,
        "node 1's services reach PostgreSQL through the proxy"
    );
    let rounds = rounds();
    for round in 0..rounds {
        eprintln!(
            "{kind} round {}: cutting node 1's services off its PostgreSQL",
            round + 1
        );
        proxy.cut();
        rig.wait_unhealthy(0).await?;
        run_for(OUTAGE).await;
        proxy.heal();
        let healed = Instant::now();
        rig.wait_healed(&ledger, healed, &[0]).await?;
    }
    rig.finish(ledger, kind, rounds).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sigkill() -> Result<()> {
    let kind = "kafka_sigkill";
    let kafka = OwnKafka::start(kind, KafkaOptions::default()).await?;
    let mut rig = Rig::start(kind, shared_pg(Some(kafka.bootstrap()), None), |_, _| {}).await?;
    let ledger = start_ledger(&rig).await?;
    let rounds = rounds();
    for round in 0..rounds {
        eprintln!("{kind} round {}: SIGKILL of the broker", round + 1);
        kafka.kill().await?;
        // Every node's services say Kafka is away (the node written to most recently suffices).
        let node = round % 3;
        rig.wait_unhealthy(node).await?;
        run_for(OUTAGE / 2).await;
        rig.alive()?;
        let t = Instant::now();
        kafka.start_again().await?;
        eprintln!("  broker up again after {:?}", t.elapsed());
        let healed = Instant::now();
        rig.wait_healed(&ledger, healed, &[0, 1, 2]).await?;
    }
    rig.finish(ledger, kind, rounds).await?;
    drop(kafka);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_network_cut() -> Result<()> {
    let kind = "kafka_network_cut";
    let kafka = OwnKafka::start(
        kind,
        KafkaOptions {
            proxied: true,
            ..Default::default()
        },
    )
    .await?;
    let proxy = kafka.proxy.as_ref().ok_or_else(|| anyhow::anyhow!("no proxy"))?;
    let addr = proxy.addr().to_string();
    let mut rig = Rig::start(kind, shared_pg(Some(kafka.bootstrap()), None), |i, view| {
        if i == 0 {
            view.config_path = view.dir.join("pgferry-n1-via-proxy.toml");
            view.endpoints.kafka = addr.clone();
        }
    })
    .await?;
    let ledger = start_ledger(&rig).await?;
    anyhow::ensure!(proxy.accepted() > 0, "node 1's services reach Kafka through the proxy");
    let rounds = rounds();
    for round in 0..rounds {
        eprintln!("{kind} round {}: cutting node 1's services off Kafka", round + 1);
        proxy.cut();
        rig.wait_unhealthy(0).await?;
        run_for(OUTAGE / 2).await;
        rig.alive()?;
        proxy.heal();
        let healed = Instant::now();
        rig.wait_healed(&ledger, healed, &[0]).await?;
    }
    rig.finish(ledger, kind, rounds).await?;
    drop(kafka);
    Ok(())
}

/// Fills the filesystem of `dir` with one file; returns its path.
fn fill(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    use std::io::Write;
    let path = dir.join("fill.bin");
    let mut f = std::fs::File::create(&path)?;
    let chunk = vec![0u8; 1 << 20];
    loop {
        if f.write_all(&chunk).is_err() {
            break;
        }
    }
    let _ = f.flush();
    Ok(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_disk_full() -> Result<()> {
    let kind = "kafka_disk_full";
    let kafka = OwnKafka::start(
        kind,
        KafkaOptions {
            tmpfs_mib: Some(256),
            ..Default::default()
        },
    )
    .await?;
    let mut rig = Rig::start(kind, shared_pg(Some(kafka.bootstrap()), None), |_, _| {}).await?;
    let ledger = start_ledger(&rig).await?;
    let rounds = rounds();
    for round in 0..rounds {
        eprintln!("{kind} round {}: filling the broker's log directory", round + 1);
        let file = fill(&kafka.data_dir())?;
        // The broker fails writes and, with its only log directory failed, stops.
        let filled = Instant::now();
        let stopped = wait_until(
            "the broker to stop on the full disk",
            Duration::from_secs(60),
            || async { Ok(kafka.pid().is_none()) },
        )
        .await;
        eprintln!(
            "  broker stopped: {} ({:?} after the fill)",
            stopped.is_ok(),
            filled.elapsed()
        );
        let node = round % 3;
        rig.wait_unhealthy(node).await?;
        rig.alive()?;
        std::fs::remove_file(&file)?;
        if kafka.pid().is_none() {
            kafka.start_again().await?;
        }
        let healed = Instant::now();
        rig.wait_healed(&ledger, healed, &[0, 1, 2]).await?;
    }
    rig.finish(ledger, kind, rounds).await?;
    drop(kafka);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_outage() -> Result<()> {
    let kind = "registry_outage";
    // On a port with "404" in it: apply once took any fetch error whose text held "404" (the
    // URL) for the registry's "no such schema" and dead-lettered the change.
    let port = [28_404, 29_404, 30_404, 31_404]
        .into_iter()
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok());
    let registry = OwnRegistry::start(kind, port).await?;
    let mut rig = Rig::start(kind, shared_pg(None, Some(registry.url())), |_, _| {}).await?;
    let ledger = start_ledger(&rig).await?;
    let rounds = rounds();
    for round in 0..rounds {
        let node = round % 3;
        eprintln!(
            "{kind} round {}: registry down; restarting node {}'s capture and apply",
            round + 1,
            node + 1
        );
        registry.stop().await?;
        // Restarted services need the registry: capture to register its records, apply to
        // fetch the schemas of the messages it reads.
        for s in [CAPTURE, APPLY] {
            rig.kill(node, s);
            rig.spawn(node, s)?;
        }
        rig.wait_health(node, CAPTURE, 503, Duration::from_secs(30)).await?;
        run_for(OUTAGE).await;
        rig.alive()?;
        registry.start_again().await?;
        let healed = Instant::now();
        rig.wait_healed(&ledger, healed, &[node]).await?;
    }
    rig.finish(ledger, kind, rounds).await?;
    drop(registry);
    Ok(())
}
