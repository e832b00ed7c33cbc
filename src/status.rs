//! `pgferry status`: one view of the whole cluster, read from where the truth is kept.
//!
//! Per node (from its PostgreSQL): whether it answers, its capture slot (active, WAL retained,
//! WAL not yet confirmed), its apply sessions, conflicts (parked) and dead letters
//! (`pgferry.exceptions`), and — when the node has `metrics_listen` — its `/healthz`.
//! Per origin → target: data messages the target has not applied yet (those after the offset in
//! the target's `pgferry.apply_progress`, read and counted, heartbeats left out), the lag in ms (apply's
//! `pgferry_apply_lag_seconds` when the target serves metrics, else the age of the last
//! applied commit), and the retention headroom: how long until Kafka deletes the oldest message
//! the target still needs (the topic's `retention.ms` minus that message's age), and — when the
//! target's stream of that origin stopped at a change and waits to retry — why (its `/healthz`).
//! A node that does not answer is reported as down; status never fails because one part is.

use std::collections::BTreeMap;
use std::time::Duration;

use pgferry_connectors::config::{Config, NodeConfig};
use pgferry_connectors::kafka;
use pgferry_connectors::postgres::{self, PgSession};
use pgferry_connectors::redact;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

const TIMEOUT: Duration = Duration::from_secs(5);

/// The whole report (`--json` prints it as is).
#[derive(Debug, Serialize)]
pub struct Status {
    cluster: String,
    nodes: Vec<NodeStatus>,
    lag: Vec<Lag>,
}

#[derive(Debug, Serialize)]
struct NodeStatus {
    name: String,
    region: String,
    endpoint: String,
    /// None when the node answered; the error otherwise.
    down: Option<String>,
    capture_slot_active: Option<bool>,
    slot_retained_wal_bytes: Option<i64>,
    slot_unconfirmed_wal_bytes: Option<i64>,
    apply_sessions: Option<i64>,
    conflicts: Option<i64>,
    conflicts_parked: Option<i64>,
    dead_letters: Option<i64>,
    /// `/healthz` of the node's services: "ok", the failing checks, or why it was not reached.
    health: Option<String>,
    /// Origins whose stream on this node waits after a failure, with the reason (from `/healthz`).
    #[serde(skip)]
    waiting: Vec<(String, String)>,
}

#[derive(Debug, Serialize)]
struct Lag {
    origin: String,
    target: String,
    /// `topic/partition` the target reads the origin from.
    partition: String,
    messages_behind: Option<i64>,
    lag_ms: Option<f64>,
    /// Where `lag_ms` comes from: `metrics` (apply's gauge) or `last_commit` (age of the last
    /// applied commit; grows while the origin is idle).
    lag_source: Option<&'static str>,
    retention_headroom_ms: Option<i64>,
    /// Why the target's stream of this origin stopped and waits to retry (the change it cannot
    /// apply yet); None while it applies, or when the target serves no `/healthz`.
    waiting: Option<String>,
}

/// Gathers the report.
pub async fn gather(config: &Config) -> Status {
    let mut nodes = Vec::new();
    let mut sessions = BTreeMap::new();
    for node in &config.nodes {
        let (status, session) = node_status(config, node).await;
        nodes.push(status);
        if let Some(s) = session {
            sessions.insert(node.name.clone(), s);
        }
    }
    let waiting: BTreeMap<String, Vec<(String, String)>> = nodes.iter().map(|n| (n.name.clone(), n.waiting.clone())).collect();
    let lag = lag_matrix(config, &sessions, &waiting).await;
    Status {
        cluster: config.cluster.name.clone(),
        nodes,
        lag,
    }
}

async fn node_status(config: &Config, node: &NodeConfig) -> (NodeStatus, Option<PgSession>) {
    let mut s = NodeStatus {
        name: node.name.clone(),
        region: node.region.clone(),
        endpoint: redact::dsn_endpoint(&node.dsn),
        down: None,
        capture_slot_active: None,
        slot_retained_wal_bytes: None,
        slot_unconfirmed_wal_bytes: None,
        apply_sessions: None,
        conflicts: None,
        conflicts_parked: None,
        dead_letters: None,
        health: None,
        waiting: Vec::new(),
    };
    if let Some(addr) = node.metrics_listen.as_deref().and_then(|a| a.parse::<std::net::SocketAddr>().ok()) {
        s.health = Some(match pgferry_connectors::http_endpoint::get(addr, "/healthz", TIMEOUT).await {
            Ok((200, _)) => "ok".into(),
            Ok((code, body)) => {
                s.waiting = pgferry_apply::metrics::waiting_origins(&body);
                format!("{code}: {}", body.trim().replace('\n', "; "))
            }
            Err(e) => format!("not reached: {e}"),
        });
    }
    let sql = match tokio::time::timeout(TIMEOUT, postgres::connect(&node.dsn, "pgferry-status")).await {
        Ok(Ok(sql)) => sql,
        Ok(Err(e)) => {
            s.down = Some(config.secrets().scrub(&e.to_string()));
            return (s, None);
        }
        Err(_) => {
            s.down = Some(format!("no answer from {} within {TIMEOUT:?}", s.endpoint));
            return (s, None);
        }
    };
    let slot = pgferry_schemas::naming::slot_name(&config.cluster.name, &node.name);
    let app = format!("pgferry-apply-{}-%", node.name);
    let row = sql
        .client
        .query_one(
            "SELECT (SELECT active FROM pg_replication_slots WHERE slot_name = $1),
                    (SELECT (pg_current_wal_lsn() - restart_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1),
                    (SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1),
                    (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE $2),
                    (SELECT count(*) FROM pgferry.conflicts),
                    (SELECT count(*) FROM pgferry.conflicts WHERE resolution = 'parked' AND resolved_at IS NULL),
                    (SELECT count(*) FROM pgferry.exceptions)",
            &[&slot, &app],
        )
        .await;
    match row {
        Ok(r) => {
            s.capture_slot_active = r.get(0);
            s.slot_retained_wal_bytes = r.get(1);
            s.slot_unconfirmed_wal_bytes = r.get(2);
            s.apply_sessions = Some(r.get(3));
            s.conflicts = Some(r.get(4));
            s.conflicts_parked = Some(r.get(5));
            s.dead_letters = Some(r.get(6));
        }
        Err(e) => s.down = Some(format!("{}: {} (was `pgferry init` run?)", s.endpoint, postgres::detail(&e))),
    }
    (s, Some(sql))
}

/// Origin → target cells for every target that answered; `waiting`: per target, the streams
/// its `/healthz` names as waiting (by the node whose partition carries them).
async fn lag_matrix(config: &Config, sessions: &BTreeMap<String, PgSession>, waiting: &BTreeMap<String, Vec<(String, String)>>) -> Vec<Lag> {
    let mut cells = Vec::new();
    for target in &config.nodes {
        for origin in config.nodes.iter().filter(|o| o.name != target.name) {
            let carriers = config.carriers(target, &origin.name);
            let Some(carrier) = carriers.first() else { continue };
            let topic = config.region_topic(&carrier.region);
            let partition = config.node_partition(carrier);
            let mut cell = Lag {
                origin: origin.name.clone(),
                target: target.name.clone(),
                partition: format!("{topic}/{partition}"),
                messages_behind: None,
                lag_ms: None,
                lag_source: None,
                retention_headroom_ms: None,
                waiting: waiting
                    .get(&target.name)
                    .and_then(|w| w.iter().find(|(o, _)| *o == carrier.name))
                    .map(|(_, reason)| reason.clone()),
            };
            if let Some(sql) = sessions.get(&target.name) {
                let applied = applied(sql, &topic, partition, &origin.name).await;
                let (offset, last_commit_age_ms) = applied.unwrap_or((None, None));
                let kafka = config.kafka.clone();
                let (t, o) = (topic.clone(), offset);
                let position = tokio::task::spawn_blocking(move || partition_position(&kafka, &t, partition, o))
                    .await
                    .ok()
                    .flatten();
                if let Some((behind, oldest_age_ms, retention_ms)) = position {
                    cell.messages_behind = Some(behind);
                    cell.retention_headroom_ms = retention_ms.map(|r| r - oldest_age_ms.unwrap_or(0));
                }
                cell.lag_ms = last_commit_age_ms;
                cell.lag_source = last_commit_age_ms.map(|_| "last_commit");
            }
            if let Some(addr) = target.metrics_listen.as_deref().and_then(|a| a.parse::<std::net::SocketAddr>().ok()) {
                if let Ok((200, body)) = pgferry_connectors::http_endpoint::get(addr, "/metrics", TIMEOUT).await {
                    if let Some(v) = apply_lag_ms(&body, &origin.name) {
                        cell.lag_ms = Some(v);
                        cell.lag_source = Some("metrics");
                    }
                }
            }
            cells.push(cell);
        }
    }
    cells
}

/// The target's applied offset in `topic/partition` and the age (ms) of the origin's last
/// applied commit.
async fn applied(sql: &PgSession, topic: &str, partition: i32, origin: &str) -> Option<(Option<i64>, Option<f64>)> {
    let r = sql
        .client
        .query_one(
            "SELECT (SELECT max(kafka_offset) FROM pgferry.apply_progress WHERE topic = $1 AND partition = $2),
                    (SELECT extract(epoch FROM clock_timestamp() - max(commit_ts))::float8 * 1000
                     FROM pgferry.apply_progress WHERE origin = $3)",
            &[&topic, &partition, &origin],
        )
        .await
        .ok()?;
    Some((r.get(0), r.get(1)))
}

/// Most messages status reads to count a backlog (beyond that it reports at least this many).
const COUNT_CAP: i64 = 100_000;

/// The data messages (changes, truncates, logical messages; not heartbeats) after `applied` up
/// to the last stable offset, the age (ms) of the first of them, and the topic's
/// `retention.ms`. Reads the messages themselves: offsets alone also count transaction markers
/// and heartbeats, which apply does not record. Blocking.
fn partition_position(
    cfg: &pgferry_connectors::config::KafkaConfig,
    topic: &str,
    partition: i32,
    applied: Option<i64>,
) -> Option<(i64, Option<i64>, Option<i64>)> {
    let consumer: BaseConsumer = kafka::read_committed_config(cfg, "pgferry-status").create().ok()?;
    let (low, high) = consumer.fetch_watermarks(topic, partition, TIMEOUT).ok()?;
    let next = applied.map_or(low, |a| (a + 1).max(low));
    let (mut behind, mut oldest_age_ms) = (0, None);
    if high > next {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(next)).ok()?;
        consumer.assign(&tpl).ok()?;
        let deadline = std::time::Instant::now() + TIMEOUT;
        while behind < COUNT_CAP && std::time::Instant::now() < deadline {
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) else { break };
            if kafka::header(&m, kafka::HEADER_KIND) != Some("heartbeat") {
                behind += 1;
                if oldest_age_ms.is_none() {
                    oldest_age_ms = m
                        .timestamp()
                        .to_millis()
                        .map(|ts| (chrono::Utc::now().timestamp_millis() - ts).max(0));
                }
            }
            if m.offset() + 1 >= high {
                break;
            }
        }
    }
    Some((behind, oldest_age_ms, retention_ms(cfg, topic)))
}

fn retention_ms(cfg: &pgferry_connectors::config::KafkaConfig, topic: &str) -> Option<i64> {
    let admin: AdminClient<DefaultClientContext> = kafka::client_config(cfg).create().ok()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
    let opts = AdminOptions::new().request_timeout(Some(TIMEOUT));
    let results = rt.block_on(admin.describe_configs(&[ResourceSpecifier::Topic(topic)], &opts)).ok()?;
    let resource = results.into_iter().next()?.ok()?;
    let value = resource.get("retention.ms")?.value.clone()?;
    value.parse::<i64>().ok().filter(|v| *v >= 0)
}

/// Apply's lag behind `origin` in ms, from its `/metrics`: `pgferry_apply_lag_seconds`, or
/// `pgferry_apply_lag_milliseconds` as a node of an earlier version still names it.
fn apply_lag_ms(text: &str, origin: &str) -> Option<f64> {
    gauge(text, "pgferry_apply_lag_seconds", origin)
        .map(|s| s * 1000.0)
        .or_else(|| gauge(text, "pgferry_apply_lag_milliseconds", origin))
}

/// The value of `name{…origin="<origin>"…}` in a Prometheus text exposition.
fn gauge(text: &str, name: &str, origin: &str) -> Option<f64> {
    let label = format!("origin=\"{origin}\"");
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{') && l.contains(&label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

fn bytes(v: Option<i64>) -> String {
    match v {
        None => "-".into(),
        Some(b) if b >= 1 << 20 => format!("{:.1} MB", b as f64 / (1 << 20) as f64),
        Some(b) if b >= 1 << 10 => format!("{:.1} kB", b as f64 / 1024.0),
        Some(b) => format!("{b} B"),
    }
}

fn duration_ms(v: Option<i64>) -> String {
    match v {
        None => "-".into(),
        Some(ms) if ms >= 86_400_000 => format!("{:.1} d", ms as f64 / 86_400_000.0),
        Some(ms) if ms >= 3_600_000 => format!("{:.1} h", ms as f64 / 3_600_000.0),
        Some(ms) => format!("{:.0} s", ms as f64 / 1000.0),
    }
}

impl Status {
    /// Whether every node answered and every reachable service reports healthy.
    pub fn healthy(&self) -> bool {
        self.nodes
            .iter()
            .all(|n| n.down.is_none() && n.health.as_deref().is_none_or(|h| h == "ok"))
    }

    /// The human-readable report.
    pub fn render(&self) -> String {
        let mut out = format!("cluster {} — {} nodes\n\n", self.cluster, self.nodes.len());
        out += &format!(
            "{:<12} {:<8} {:<10} {:<16} {:>10} {:>12} {:>8} {:>10} {:>5}  {}\n",
            "node", "region", "postgres", "capture slot", "retained", "unconfirmed", "apply", "conflicts", "dlq", "health"
        );
        for n in &self.nodes {
            let pg = if n.down.is_some() { "DOWN" } else { "up" };
            let slot = match n.capture_slot_active {
                Some(true) => "streaming",
                Some(false) => "idle",
                None if n.down.is_none() => "no slot",
                None => "-",
            };
            let conflicts = match (n.conflicts, n.conflicts_parked) {
                (Some(c), Some(p)) if p > 0 => format!("{c} ({p} parked)"),
                (c, _) => opt(c),
            };
            out += &format!(
                "{:<12} {:<8} {:<10} {:<16} {:>10} {:>12} {:>8} {:>10} {:>5}  {}\n",
                n.name,
                n.region,
                pg,
                slot,
                bytes(n.slot_retained_wal_bytes),
                bytes(n.slot_unconfirmed_wal_bytes),
                n.apply_sessions.map_or("-".into(), |s| format!("{s} sess")),
                conflicts,
                opt(n.dead_letters),
                n.health.as_deref().unwrap_or("(no metrics_listen)")
            );
            if let Some(e) = &n.down {
                out += &format!("{:<12} {e}\n", "");
            }
        }
        out += &format!(
            "\nlag (origin → target)\n{:<12} {:<12} {:>10} {:>12}  {:<12} {:>10}  {}\n",
            "origin", "target", "behind", "lag ms", "(from)", "headroom", "partition"
        );
        for l in &self.lag {
            out += &format!(
                "{:<12} {:<12} {:>10} {:>12}  {:<12} {:>10}  {}\n",
                l.origin,
                l.target,
                opt(l.messages_behind),
                l.lag_ms.map_or("-".into(), |v| format!("{v:.0}")),
                l.lag_source.unwrap_or("-"),
                duration_ms(l.retention_headroom_ms),
                l.partition
            );
            if let Some(reason) = &l.waiting {
                out += &format!("{:<12} {} → {} waits: {reason}\n", "", l.origin, l.target);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_origins_gauge() {
        let text = "# TYPE pgferry_apply_lag_milliseconds gauge\n\
                    pgferry_apply_lag_milliseconds{node=\"n2\",origin=\"n1\"} 12.5\n\
                    pgferry_apply_lag_milliseconds{node=\"n2\",origin=\"n3\"} 40\n";
        assert_eq!(gauge(text, "pgferry_apply_lag_milliseconds", "n3"), Some(40.0));
        assert_eq!(gauge(text, "pgferry_apply_lag_milliseconds", "n4"), None);
        assert_eq!(apply_lag_ms(text, "n1"), Some(12.5), "an earlier version's name");
        let text = "# TYPE pgferry_apply_lag_seconds gauge\n\
                    pgferry_apply_lag_seconds{node=\"n2\",origin=\"n1\"} 0.25\n";
        assert_eq!(apply_lag_ms(text, "n1"), Some(250.0));
        assert_eq!(apply_lag_ms(text, "n3"), None);
    }

    #[test]
    fn human_units() {
        assert_eq!(bytes(Some(3 << 20)), "3.0 MB");
        assert_eq!(duration_ms(Some(7 * 86_400_000)), "7.0 d");
        assert_eq!(duration_ms(None), "-");
    }
}
