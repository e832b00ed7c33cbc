//! The ledger workload and its checker: what the fault tests run while they break things.
//!
//! Clients on every node commit transfers, each one transaction: insert a row into the
//! insert-only `transfers(id = '<node>:<client>:<seq>', src, dst, amount)` and move `amount`
//! from account `src` to `dst` in `accounts(id, balance)`, where `balance` is a delta column
//! (apply merges `local + (new − old)`). Each client records every acknowledged commit, every
//! attempt that definitely failed, and every attempt whose outcome is unknown (the connection
//! broke during COMMIT). Clients reconnect and go on when their node is down.
//!
//! The [`check`] then verifies on every node: every acknowledged transfer is present (exactly
//! once: the key is the transfer id), nothing appears that was not attempted or that definitely
//! failed, unknown ones are present on every node or on none, and every balance equals the
//! initial balance plus what the node's `transfers` table moved in and out, with the total
//! unchanged — so a delta applied twice or lost shows as a balance off.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio_postgres::NoTls;

use crate::Cluster;

/// Accounts every node starts with.
pub const ACCOUNTS: i32 = 8;
/// Each account's initial balance.
pub const INITIAL: i64 = 1_000_000;
/// The replicated tables.
pub const TABLES: &[&str] = &["public.accounts", "public.transfers"];
/// `[replication]` lines: `balance` is a delta column.
pub const REPLICATION_TOML: &str = "[replication.table.\"public.accounts\"]\ndelta_columns = [\"balance\"]";

/// Setup SQL of every node: the tables, and the same accounts on every node before `init`
/// (so they never replicate and every node starts equal).
pub fn setup_sql() -> String {
    format!(
        "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
         ALTER TABLE accounts REPLICA IDENTITY FULL;
         CREATE TABLE transfers (id text PRIMARY KEY, src int NOT NULL, dst int NOT NULL, amount bigint NOT NULL);
         INSERT INTO accounts SELECT g, {INITIAL} FROM generate_series(1, {ACCOUNTS}) g;"
    )
}

/// One transfer attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    /// Debited account.
    pub src: i32,
    /// Credited account.
    pub dst: i32,
    /// Amount moved.
    pub amount: i64,
}

/// What the clients saw, by transfer id.
#[derive(Debug, Default, Clone)]
pub struct Record {
    /// Commits PostgreSQL acknowledged.
    pub acked: HashMap<String, Transfer>,
    /// Attempts that definitely did not commit (an error before COMMIT, or one COMMIT
    /// reported as an abort).
    pub failed: HashSet<String>,
    /// Attempts whose COMMIT was sent but whose answer never came.
    pub unknown: HashMap<String, Transfer>,
}

/// A running ledger workload: `clients` tasks per node.
pub struct Ledger {
    nodes: usize,
    stop: Arc<AtomicBool>,
    record: Arc<Mutex<Record>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Ledger {
    /// Starts `clients` clients on each node of `cluster`, each pausing `pace` between transfers.
    pub fn start(cluster: &Cluster, clients: usize, pace: Duration) -> Ledger {
        let stop = Arc::new(AtomicBool::new(false));
        let record = Arc::new(Mutex::new(Record::default()));
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        eprintln!("ledger seed {seed}");
        let mut tasks = Vec::new();
        for (i, node) in cluster.nodes.iter().enumerate() {
            for c in 0..clients {
                let client = Client {
                    dsn: format!("{} connect_timeout=2", key_value_dsn(&node.dsn)),
                    prefix: format!("n{}:{c}", i + 1),
                    stop: stop.clone(),
                    record: record.clone(),
                    rng: Rng(seed.wrapping_add((i * 64 + c) as u64 * 0x9E37_79B9)),
                    pace,
                };
                tasks.push(tokio::spawn(client.run()));
            }
        }
        Ledger {
            nodes: cluster.nodes.len(),
            stop,
            record,
            tasks,
        }
    }

    /// Acknowledged transfers so far.
    pub fn acked(&self) -> usize {
        self.record.lock().unwrap_or_else(|p| p.into_inner()).acked.len()
    }

    /// Acknowledged transfers so far whose id starts with `n<node + 1>:`.
    pub fn acked_on(&self, node: usize) -> usize {
        let prefix = format!("n{}:", node + 1);
        let r = self.record.lock().unwrap_or_else(|p| p.into_inner());
        r.acked.keys().filter(|k| k.starts_with(&prefix)).count()
    }

    /// Waits until every node acknowledged `more` transfers beyond what it had: the workload
    /// makes progress everywhere (after a fault healed, say).
    pub async fn wait_progress(&self, more: usize, timeout: Duration) -> Result<()> {
        let nodes = self.nodes;
        let start: Vec<usize> = (0..nodes).map(|n| self.acked_on(n)).collect();
        crate::wait_until(
            &format!("{more} more acknowledged transfers on every node"),
            timeout,
            || async { Ok((0..nodes).all(|n| self.acked_on(n) >= start[n] + more)) },
        )
        .await
    }

    /// The ids of the transfers acknowledged so far.
    pub fn acked_ids(&self) -> Vec<String> {
        let r = self.record.lock().unwrap_or_else(|p| p.into_inner());
        r.acked.keys().cloned().collect()
    }

    /// Stops the clients and returns what they saw.
    pub async fn stop(self) -> Record {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let r = self.record.lock().unwrap_or_else(|p| p.into_inner());
        r.clone()
    }
}

/// A URL DSN as key=value pairs (so options can be appended); others unchanged.
fn key_value_dsn(dsn: &str) -> String {
    let Some(rest) = dsn.strip_prefix("postgres://") else {
        return dsn.to_string();
    };
    let (userinfo, hostdb) = rest.rsplit_once('@').unwrap_or(("", rest));
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let (hostport, db) = hostdb.split_once('/').unwrap_or((hostdb, "postgres"));
    let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "5432"));
    format!("host={host} port={port} user={user} password={password} dbname={db}")
}

use crate::XorShift as Rng;

enum Outcome {
    Acked,
    Failed,
    Unknown,
}

struct Client {
    dsn: String,
    prefix: String,
    stop: Arc<AtomicBool>,
    record: Arc<Mutex<Record>>,
    rng: Rng,
    pace: Duration,
}

impl Client {
    async fn run(mut self) {
        let mut conn: Option<tokio_postgres::Client> = None;
        let mut seq = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            if conn.as_ref().is_none_or(|c| c.is_closed()) {
                conn = match tokio_postgres::connect(&self.dsn, NoTls).await {
                    Ok((c, connection)) => {
                        tokio::spawn(connection);
                        // A transfer waits at most this long for a row apply holds.
                        match c.batch_execute("SET lock_timeout = '5s'").await {
                            Ok(()) => Some(c),
                            Err(_) => None,
                        }
                    }
                    Err(_) => None,
                };
                if conn.is_none() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
            let Some(c) = conn.as_ref() else { continue };
            seq += 1;
            let id = format!("{}:{seq}", self.prefix);
            let src = self.rng.below(ACCOUNTS as u64) as i32 + 1;
            let dst = (src + self.rng.below(ACCOUNTS as u64 - 1) as i32) % ACCOUNTS + 1;
            let t = Transfer {
                src,
                dst,
                amount: self.rng.below(1000) as i64 + 1,
            };
            let outcome = transfer(c, &id, t).await;
            {
                let mut r = self.record.lock().unwrap_or_else(|p| p.into_inner());
                match outcome {
                    Outcome::Acked => {
                        r.acked.insert(id, t);
                    }
                    Outcome::Failed => {
                        r.failed.insert(id);
                    }
                    Outcome::Unknown => {
                        r.unknown.insert(id, t);
                    }
                }
            }
            tokio::time::sleep(self.pace).await;
        }
    }
}

/// One transfer transaction. The two account updates go in id order, so two transfers on one
/// node never deadlock each other.
async fn transfer(c: &tokio_postgres::Client, id: &str, t: Transfer) -> Outcome {
    let body = async {
        c.batch_execute("BEGIN").await?;
        c.execute(
            "INSERT INTO transfers (id, src, dst, amount) VALUES ($1, $2, $3, $4)",
            &[&id, &t.src, &t.dst, &t.amount],
        )
        .await?;
        let mut moves = [(t.src, -t.amount), (t.dst, t.amount)];
        moves.sort();
        for (account, delta) in moves {
            c.execute(
                "UPDATE accounts SET balance = balance + $2 WHERE id = $1",
                &[&account, &delta],
            )
            .await?;
        }
        Ok::<_, tokio_postgres::Error>(())
    };
    if body.await.is_err() {
        let _ = c.batch_execute("ROLLBACK").await;
        return Outcome::Failed;
    }
    match c.batch_execute("COMMIT").await {
        Ok(()) => Outcome::Acked,
        // The server answered that it rolled back (deadlock, serialization, constraint).
        Err(e)
            if e.code()
                .is_some_and(|s| s.code().starts_with("40") || s.code().starts_with("23")) =>
        {
            Outcome::Failed
        }
        // No answer, or the session ended (shutdown, crash): it may or may not have committed.
        Err(_) => Outcome::Unknown,
    }
}

/// Waits until every node of `cluster` holds every transfer in `ids` (replication caught up
/// with them), checking `alive` between polls; returns how long it took.
pub async fn wait_replicated(
    cluster: &Cluster,
    ids: &[String],
    timeout: Duration,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<Duration> {
    let began = Instant::now();
    let want = ids.len() as i64;
    let mut sessions = Vec::new();
    loop {
        alive()?;
        if sessions.len() < cluster.nodes.len() {
            sessions.clear();
            for i in 0..cluster.nodes.len() {
                match cluster.sql(i).await {
                    Ok(c) => sessions.push(c),
                    Err(_) => break,
                }
            }
        }
        let mut done = sessions.len() == cluster.nodes.len();
        for c in &sessions {
            match c
                .query_one("SELECT count(*) FROM transfers WHERE id = ANY($1)", &[&ids])
                .await
            {
                Ok(r) => done &= r.get::<_, i64>(0) == want,
                Err(_) => {
                    done = false;
                    sessions.clear();
                    break;
                }
            }
        }
        if done {
            return Ok(began.elapsed());
        }
        if began.elapsed() > timeout {
            anyhow::bail!(
                "{} acknowledged transfers not on every node after {timeout:?}",
                ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the checker found (counts summed over nodes, except `converge_ms`).
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Acknowledged transfers.
    pub acked: usize,
    /// Attempts of unknown outcome, and how many of them committed.
    pub unknown: usize,
    /// Unknown-outcome transfers that turned out committed (on every node).
    pub unknown_committed: usize,
    /// Acknowledged transfers missing on some node (summed over nodes).
    pub lost: usize,
    /// Transfer rows beyond one per id, plus rows of attempts never made or that failed.
    pub duplicated: usize,
    /// Unknown-outcome transfers present on some nodes but not all.
    pub inconsistent: usize,
    /// Sum over nodes and accounts of |balance − (initial + in − out)|: a delta applied twice
    /// or lost.
    pub balance_off: i64,
    /// Milliseconds from the start of the check until every node agreed.
    pub converge_ms: u128,
    /// Human-readable problems (empty when the ledger is right).
    pub problems: Vec<String>,
}

impl Report {
    /// True when nothing is wrong.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// The machine-readable line the fault suite prints.
    pub fn fault_line(&self, kind: &str, injected: usize) -> String {
        format!(
            "FAULT kind={kind} injected={injected} acked={} unknown={} unknown_committed={} lost={} dup={} inconsistent={} balance_off={} converge_ms={}",
            self.acked, self.unknown, self.unknown_committed, self.lost, self.duplicated, self.inconsistent, self.balance_off, self.converge_ms
        )
    }
}

/// One node's ledger state.
struct NodeState {
    transfers: HashMap<String, (Transfer, i64)>,
    fingerprint: (String, String),
    balances: Vec<(i32, i64, i64)>,
}

async fn node_state(cluster: &Cluster, i: usize) -> Result<NodeState> {
    let c = cluster.sql(i).await?;
    let rows = c
        .query(
            "SELECT id, src, dst, amount, count(*) OVER (PARTITION BY id) FROM transfers",
            &[],
        )
        .await?;
    let transfers = rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                (
                    Transfer {
                        src: r.get(1),
                        dst: r.get(2),
                        amount: r.get(3),
                    },
                    r.get::<_, i64>(4),
                ),
            )
        })
        .collect();
    let fingerprint = (
        cluster.fingerprint(i, "transfers").await?.0,
        cluster.fingerprint(i, "accounts").await?.0,
    );
    let balances = c
        .query(
            "SELECT a.id, a.balance,
                    $1::bigint + coalesce((SELECT sum(amount) FROM transfers WHERE dst = a.id), 0)::bigint
                               - coalesce((SELECT sum(amount) FROM transfers WHERE src = a.id), 0)::bigint
             FROM accounts a ORDER BY a.id",
            &[&INITIAL],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    Ok(NodeState {
        transfers,
        fingerprint,
        balances,
    })
}

/// Waits (up to `timeout`) until every node holds every acknowledged transfer and all nodes'
/// tables are identical, then checks the ledger on every node.
pub async fn check(cluster: &Cluster, record: &Record, timeout: Duration) -> Result<Report> {
    let began = Instant::now();
    let nodes = cluster.nodes.len();
    let mut states;
    loop {
        states = Vec::new();
        for i in 0..nodes {
            states.push(node_state(cluster, i).await);
        }
        let settled = states.iter().all(|s| s.is_ok()) && {
            let ok: Vec<&NodeState> = states.iter().flatten().collect();
            ok.windows(2).all(|w| w[0].fingerprint == w[1].fingerprint)
                && ok
                    .iter()
                    .all(|s| record.acked.keys().all(|k| s.transfers.contains_key(k)))
        };
        if settled || began.elapsed() > timeout {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut report = Report {
        acked: record.acked.len(),
        unknown: record.unknown.len(),
        converge_ms: began.elapsed().as_millis(),
        ..Report::default()
    };
    let mut states_ok = Vec::new();
    for (i, s) in states.into_iter().enumerate() {
        match s {
            Ok(s) => states_ok.push(s),
            Err(e) => {
                report
                    .problems
                    .push(format!("node {}: cannot read the ledger: {e}", i + 1));
                return Ok(report);
            }
        }
    }
    for (i, s) in states_ok.iter().enumerate() {
        let node = i + 1;
        let lost: Vec<&String> = record.acked.keys().filter(|k| !s.transfers.contains_key(*k)).collect();
        report.lost += lost.len();
        if !lost.is_empty() {
            report.problems.push(format!(
                "node {node}: {} acknowledged transfers missing, e.g. {:?}",
                lost.len(),
                lost.iter().take(5).collect::<Vec<_>>()
            ));
        }
        for (id, (t, copies)) in &s.transfers {
            if *copies > 1 {
                report.duplicated += (*copies - 1) as usize;
                report
                    .problems
                    .push(format!("node {node}: transfer {id} present {copies} times"));
            }
            let known = record.acked.get(id).or_else(|| record.unknown.get(id));
            match known {
                Some(k) if k == t => {}
                Some(k) => report
                    .problems
                    .push(format!("node {node}: transfer {id} is {t:?}, the client sent {k:?}")),
                None => {
                    report.duplicated += 1;
                    let why = if record.failed.contains(id) {
                        "failed"
                    } else {
                        "was never attempted"
                    };
                    report
                        .problems
                        .push(format!("node {node}: transfer {id} is present but {why}"));
                }
            }
        }
        let mut total = 0;
        for (account, balance, expected) in &s.balances {
            total += balance;
            if balance != expected {
                report.balance_off += (balance - expected).abs();
                report.problems.push(format!(
                    "node {node}: account {account} holds {balance}, its transfers make {expected}"
                ));
            }
        }
        if total != INITIAL * ACCOUNTS as i64 {
            report.problems.push(format!(
                "node {node}: balances sum to {total}, not {}",
                INITIAL * ACCOUNTS as i64
            ));
        }
    }
    for id in record.unknown.keys() {
        let present = states_ok.iter().filter(|s| s.transfers.contains_key(id)).count();
        if present == states_ok.len() {
            report.unknown_committed += 1;
        } else if present > 0 {
            report.inconsistent += 1;
            report.problems.push(format!(
                "unknown-outcome transfer {id} is on {present} of {} nodes",
                states_ok.len()
            ));
        }
    }
    if states_ok.windows(2).any(|w| w[0].fingerprint != w[1].fingerprint) {
        report
            .problems
            .push("the nodes' transfers or accounts tables differ".into());
    }
    report.problems.truncate(40);
    Ok(report)
}
