//! Failover through HAProxy (deploy/haproxy/haproxy.cfg, with this test's ports): three nodes on
//! PostgreSQL servers of this test alone, HAProxy in front routing by each node's `/healthz`, and
//! a client writing through it. Stopping the PostgreSQL of the node it writes to: the client's
//! writes continue on another node within a few seconds and for longer than the lag limit,
//! every acknowledged write is on every surviving node, and once the node is back it catches up
//! and equals the others.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgferry_integration_tests::{free_local_addr, wait_until, Cluster, OwnServers, PG_PASSWORD};

/// A free block of 3 ports above `base` for the test's servers.
fn free_base() -> anyhow::Result<u16> {
    for base in (26_100..30_000).step_by(10) {
        if (1..=3).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return Ok(base);
        }
    }
    anyhow::bail!("no free ports for the test's PostgreSQL servers")
}

fn port(addr: &str) -> &str {
    addr.rsplit(':').next().unwrap_or_default()
}

/// What the client saw: (id, server port) of each acknowledged insert, and when each was acked.
type Acks = Arc<Mutex<Vec<(i64, i32, Instant)>>>;

/// Inserts through HAProxy until `stop`, reconnecting after any error; records what was acked.
async fn client(front: String, acks: Acks, stop: Arc<std::sync::atomic::AtomicBool>, db: String) {
    let dsn = format!("host=127.0.0.1 port={} user=postgres password={PG_PASSWORD} dbname={db} connect_timeout=2", port(&front));
    let mut conn: Option<tokio_postgres::Client> = None;
    let mut id = 0i64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if conn.as_ref().is_none_or(|c| c.is_closed()) {
            conn = match tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await {
                Ok((c, connection)) => {
                    tokio::spawn(connection);
                    Some(c)
                }
                Err(_) => None,
            };
        }
        if let Some(c) = &conn {
            id += 1;
            match c
                .query_one("INSERT INTO t (id) VALUES ($1) RETURNING inet_server_port()", &[&id])
                .await
            {
                Ok(r) => acks.lock().unwrap_or_else(|p| p.into_inner()).push((id, r.get(0), Instant::now())),
                Err(_) => conn = None,
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_continue_on_the_other_nodes_and_nothing_acknowledged_is_lost() -> anyhow::Result<()> {
    let servers = OwnServers::start("failover", 3, free_base()?)?;
    let mut cluster = Cluster::create_on(
        servers.endpoints.clone(),
        "failover",
        &["r1", "r1", "r2"],
        "CREATE TABLE t (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp());",
        &["public.t"],
    )
    .await?;
    let metrics: Vec<String> = (0..3).map(|_| free_local_addr()).collect::<Result<_, _>>()?;
    for (n, m) in cluster.nodes.iter_mut().zip(&metrics) {
        n.extra_toml = format!("metrics_listen = \"{m}\"");
    }
    // A node whose apply falls behind leaves the pool; a node that is down does not make the
    // others look behind (their streams from it receive nothing).
    cluster.replication_toml = "[health]\nmax_apply_lag_ms = 5000".into();
    cluster.write_config()?;
    cluster.init()?;
    let _services: Vec<_> = (0..3).map(|i| cluster.spawn("run", i)).collect::<Result<_, _>>()?;

    // HAProxy: the shipped configuration with this test's addresses.
    let front = free_local_addr()?;
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/haproxy/haproxy.cfg"))?;
    let mut cfg = shipped.replace("bind *:5432", &format!("bind {front}"));
    for (i, m) in metrics.iter().enumerate() {
        let pg = servers.endpoints.pg[i].rsplit('@').next().and_then(|h| h.split('/').next()).unwrap_or_default();
        cfg = cfg.replace(&format!("db{}:5432 check port 9187", i + 1), &format!("{pg} check port {}", port(m)));
    }
    let cfg_path = cluster.dir.join("haproxy.cfg");
    std::fs::write(&cfg_path, &cfg)?;
    let log = std::fs::File::create(cluster.dir.join("haproxy.log"))?;
    let mut haproxy = Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(&cfg_path)
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting haproxy (apt package haproxy; deploy/local/install.sh): {e}"))?;

    let acks: Acks = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = tokio::spawn(client(front.clone(), acks.clone(), stop.clone(), cluster.nodes[0].db.clone()));
    let ports: Vec<i32> = servers
        .endpoints
        .pg
        .iter()
        .map(|dsn| port(dsn.rsplit('@').next().and_then(|h| h.split('/').next()).unwrap_or_default()).parse())
        .collect::<Result<_, _>>()?;
    wait_until("the client writing through HAProxy", Duration::from_secs(60), || async {
        Ok(acks.lock().unwrap_or_else(|p| p.into_inner()).len() >= 50)
    })
    .await?;
    // The node the client writes to (HAProxy's first healthy server) goes down: a clean
    // PostgreSQL shutdown, whose walsender hands capture every committed transaction.
    let down_port = acks.lock().unwrap_or_else(|p| p.into_inner()).last().map(|a| a.1).unwrap_or_default();
    let down = ports.iter().position(|p| *p == down_port).ok_or_else(|| anyhow::anyhow!("acked by an unknown port"))?;
    eprintln!("the client writes to node {}; stopping it", down + 1);
    let stopped = Instant::now();
    servers.pg_sh(&["stop-node", &(down + 1).to_string()])?;
    // Writes go on for longer than the lag limit (5 s): the stopped node must not take the others
    // out of the pool as its silence makes their lag for it grow.
    wait_until("writes acknowledged by another node 8 s after the stop", Duration::from_secs(40), || async {
        let late = stopped + Duration::from_secs(8);
        Ok(acks.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|a| a.1 != down_port && a.2 > late))
    })
    .await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await?;
    let acked = acks.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let resumed = acked
        .iter()
        .filter(|a| a.1 != down_port && a.2 > stopped)
        .map(|a| a.2 - stopped)
        .min()
        .unwrap_or_default();
    eprintln!("acknowledged: {} writes; first write on another node {resumed:?} after the node stopped", acked.len());
    assert!(resumed < Duration::from_secs(10), "writes resumed within a few seconds ({resumed:?})");

    // Every acknowledged write is on both surviving nodes.
    let ids: Vec<i64> = acked.iter().map(|a| a.0).collect();
    for i in (0..3).filter(|i| *i != down) {
        let c = cluster.sql(i).await?;
        wait_until(&format!("every acknowledged write on node {}", i + 1), Duration::from_secs(90), || async {
            let n: i64 = c.query_one("SELECT count(*) FROM t WHERE id = ANY($1)", &[&ids]).await?.get(0);
            Ok(n == ids.len() as i64)
        })
        .await?;
    }

    // The node returns, catches up and equals the others.
    servers.pg_sh(&["start-node", &(down + 1).to_string()])?;
    let (_, rows) = cluster.wait_converged("t", Duration::from_secs(180)).await?;
    assert!(rows >= ids.len() as i64);
    let _ = haproxy.kill();
    let _ = haproxy.wait();
    drop(_services);
    cluster.cleanup().await?;
    drop(servers);
    Ok(())
}
