//! `pgferry node remove N`: takes node N out of the cluster, leaving the rest replicating.
//!
//! 1. N's services must be stopped (its slot inactive, no pgferry session on it), and N must
//!    have published every local transaction it committed (its slot holds none unpublished):
//!    dropping the slot would lose them.
//! 2. Every node that reads N's partition must have applied N's last transaction in it
//!    (waited for, with progress, up to `--timeout`).
//! 3. On N: the publication, the slot, the DDL event trigger and the replication origins go.
//!    Its tables and the `pgferry` schema stay (the data is the operator's).
//! 4. The config file loses N's `[[nodes]]` entry (comments and layout kept); the nodes after
//!    it in its region get `partition = <theirs>` so their partitions do not move. A partition
//!    a removed node wrote is never reused by default; capture ignores other producers'
//!    messages when it resumes in any case.
//! 5. On every other node, the replication origin of N is dropped once that node's apply has
//!    been restarted with the new config (until then apply holds it: the command waits and
//!    says so). Running the command again with N already gone from the config does only this.
//!
//! `--force` skips the checks of 1 and 2 (for a node that is gone for good) and a node that
//! does not answer.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use pgferry_connectors::config::{Config, NodeConfig};
use pgferry_connectors::kafka;
use pgferry_connectors::postgres::{self, quote_ident, PgSession};
use pgferry_schemas::naming;

#[derive(Args)]
pub struct RemoveArgs {
    /// The node to remove.
    node: String,
    /// Skip the checks that the node published and the others applied everything it wrote,
    /// and carry on when the node does not answer (its slot and publication then stay on it).
    #[arg(long)]
    force: bool,
    /// How long to wait for the other nodes to apply the node's last changes and to release
    /// its replication origin (seconds).
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

pub async fn run(config: Arc<Config>, config_path: &Path, args: RemoveArgs) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let others: Vec<&NodeConfig> = config.nodes.iter().filter(|n| n.name != args.node).collect();
    if let Some(node) = config.node(&args.node) {
        if others.is_empty() {
            bail!(
                "node {} is the only node of the cluster; there is nothing to remove it from",
                node.name
            );
        }
        if let Some(f) = others.iter().find(|o| o.forward_origins.contains(&node.name)) {
            bail!(
                "node {} forwards {}'s changes (nodes[].forward_origins): change the topology first, then remove it",
                f.name,
                node.name
            );
        }
        if !node.forward_origins.is_empty() {
            bail!(
                "node {} forwards other nodes' changes (forward_origins): change the topology first, then remove it",
                node.name
            );
        }
        match postgres::connect(&node.dsn, "pgferry-node-remove").await {
            Ok(sql) => {
                if !args.force {
                    check_stopped_and_published(&config, node, &sql).await?;
                }
                if !args.force {
                    wait_applied(&config, node, deadline).await?;
                }
                drop_on_node(&config, node, &others, &sql).await?;
            }
            Err(e) if args.force => {
                eprintln!("node {}: {e}; its slot and publication stay on it (--force)", node.name);
            }
            Err(e) => {
                return Err(e).context(format!(
                    "node {} does not answer; `--force` removes it from the cluster without touching it",
                    node.name
                ))
            }
        }
        rewrite_config(&config, config_path, &node.name)?;
        eprintln!(
            "{}: node {} removed; restart the apply service of {} with it",
            config_path.display(),
            node.name,
            others.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", ")
        );
    } else {
        eprintln!(
            "node {} is not in {}: dropping what is left of it on the other nodes",
            args.node,
            config_path.display()
        );
    }
    drop_origins(&config.cluster.name, &args.node, &others, deadline).await
}

/// Fails unless `node`'s capture and apply are stopped and its slot holds no local transaction
/// that capture has not published.
async fn check_stopped_and_published(config: &Config, node: &NodeConfig, sql: &PgSession) -> Result<()> {
    let slot = naming::slot_name(&config.cluster.name, &node.name);
    let row = sql
        .client
        .query_opt(
            "SELECT active, active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(sql.err(format!("reading replication slot {slot}")))?;
    if let Some(r) = &row {
        if r.get::<_, bool>(0) {
            bail!(
                "node {}: its capture is running (slot {slot} is active, pid {}): stop its capture and apply first",
                node.name,
                r.get::<_, Option<i32>>(1).unwrap_or_default()
            );
        }
    }
    let sessions: Vec<String> = sql
        .client
        .query(
            "SELECT application_name FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND application_name ~ '^pgferry-(apply|capture|heartbeat|metrics)-'",
            &[],
        )
        .await
        .map_err(sql.err("listing pgferry's sessions"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !sessions.is_empty() {
        bail!(
            "node {}: pgferry services still connected ({}): stop its capture and apply first",
            node.name,
            sessions.join(", ")
        );
    }
    if row.is_none() {
        return Ok(());
    }
    // The slot's confirmed position lags what capture produced (it confirms periodically):
    // what Kafka holds up to the last produced commit LSN is published.
    let published = {
        let (kcfg, topic, me) = (
            config.kafka.clone(),
            config.region_topic(&node.region),
            node.name.clone(),
        );
        let (group, partition) = (
            format!("pgferry-{}-node-remove", config.cluster.name),
            config.node_partition(node),
        );
        tokio::task::spawn_blocking(move || kafka::last_committed_commit_lsn(&kcfg, &group, &topic, partition, &me))
            .await??
            .unwrap_or(0)
    };
    let pending = unpublished_transactions(sql, &slot, published).await?;
    if pending > 0 {
        bail!(
            "node {}: {pending} committed local transaction(s) are still in slot {slot}, not yet published: \
             start its capture until `pgferry status` shows the slot caught up, stop it, and run this again \
             (`--force` drops them)",
            node.name
        );
    }
    Ok(())
}

/// How many transactions the slot still holds that capture would publish: committed after
/// `published` (a commit LSN) with no replication origin (the node's own) and carrying a row
/// change or a transactional message. Read with a peek, which leaves the slot where it is.
async fn unpublished_transactions(sql: &PgSession, slot: &str, published: u64) -> Result<u64> {
    let rows = sql
        .client
        .query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL,
                 'proto_version', '1', 'publication_names', $2, 'messages', 'true')",
            &[&slot, &naming::publication_name()],
        )
        .await
        .map_err(sql.err(format!("reading what slot {slot} holds")))?;
    let (mut pending, mut foreign, mut data) = (0, false, false);
    for r in rows {
        let bytes: Vec<u8> = r.get(0);
        // pgoutput message types: Begin, Origin, Insert/Update/Delete/Truncate, Message, Commit.
        match bytes.first() {
            Some(b'B') => (foreign, data) = (false, false),
            Some(b'O') => foreign = true,
            Some(b'I' | b'U' | b'D' | b'T') => data = true,
            // A transactional message (flags bit 0) belongs to the transaction; heartbeats are not.
            Some(b'M') if bytes.get(1).is_some_and(|f| f & 1 == 1) => data = true,
            // Commit: flags (1 byte), then the commit LSN (8 bytes, big-endian).
            Some(b'C') if data && !foreign => {
                let lsn = bytes
                    .get(2..10)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes);
                if lsn.is_none_or(|l| l > published) {
                    pending += 1;
                }
            }
            _ => {}
        }
    }
    Ok(pending)
}

/// Waits until every node that reads `node`'s partition has applied the last transaction in it.
async fn wait_applied(config: &Config, node: &NodeConfig, deadline: Instant) -> Result<()> {
    let topic = config.region_topic(&node.region);
    let partition = config.node_partition(node);
    let last = {
        let (kcfg, topic, origin) = (config.kafka.clone(), topic.clone(), node.name.clone());
        let group = format!("pgferry-{}-node-remove", config.cluster.name);
        tokio::task::spawn_blocking(move || {
            kafka::last_committed_transaction_lsn(&kcfg, &group, &topic, partition, &origin)
        })
        .await??
    };
    let Some(last) = last else {
        return Ok(());
    };
    let readers: Vec<&NodeConfig> = config
        .nodes
        .iter()
        .filter(|t| t.name != node.name && !config.carriers(t, &node.name).is_empty())
        .collect();
    for reader in readers {
        let origin = naming::replication_origin(&config.cluster.name, &reader.name, &node.name);
        let sql = postgres::connect(&reader.dsn, "pgferry-node-remove").await?;
        let mut said = false;
        loop {
            let applied: Option<String> = sql
                .client
                .query_one(
                    "SELECT max(commit_lsn - '0/0'::pg_lsn)::text FROM pgferry.apply_progress WHERE origin = $1",
                    &[&node.name],
                )
                .await
                .map_err(sql.err("reading pgferry.apply_progress"))?
                .get(0);
            let applied: u64 = applied.and_then(|a| a.parse().ok()).unwrap_or(0);
            if applied >= last {
                eprintln!("node {}: has applied all of {}'s changes", reader.name, node.name);
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} has not applied {}'s last changes (applied up to LSN {applied}, its partition {topic}/{partition} ends at {last}) \
                     in time: is its apply running? (origin {origin}; `--force` skips this check)",
                    reader.name,
                    node.name
                );
            }
            if !said {
                eprintln!(
                    "node {}: waiting until it has applied {}'s last changes …",
                    reader.name, node.name
                );
                said = true;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Ok(())
}

/// Drops on `node` what pgferry set up there for replication. Replication origins are
/// server-wide: only those the node's apply wrote the other nodes' changes under are dropped,
/// so other databases' stay. Legacy origins (`pgferry_<node>`, from before names carried the
/// cluster) stay too: PostgreSQL cannot tell which database uses one (docs/decisions.md,
/// "Names of slots and origins").
async fn drop_on_node(config: &Config, node: &NodeConfig, others: &[&NodeConfig], sql: &PgSession) -> Result<()> {
    let cluster = &config.cluster.name;
    let origins: Vec<String> = others.iter().map(|o| naming::replication_origin(cluster, &node.name, &o.name)).collect();
    let origins = origins
        .iter()
        .map(|o| postgres::quote_literal(o))
        .collect::<Vec<_>>()
        .join(", ");
    let slot = naming::slot_name(cluster, &node.name);
    let steps = [
        (
            pgferry_apply::ddl::DROP_TRIGGERS_SQL.to_string(),
            "the DDL event trigger".to_string(),
        ),
        (
            format!(
                "DROP PUBLICATION IF EXISTS {}",
                quote_ident(naming::publication_name())
            ),
            "the publication".to_string(),
        ),
        (
            format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = {}",
                postgres::quote_literal(&slot)
            ),
            format!("replication slot {slot}"),
        ),
        (
            format!("SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname IN ({origins})"),
            "pgferry's replication origins".to_string(),
        ),
    ];
    for (stmt, what) in steps {
        sql.client
            .batch_execute(&format!(
                "SET pgferry.local_ddl = on; SET client_min_messages = warning; {stmt}"
            ))
            .await
            .map_err(sql.err(format!("dropping {what}")))?;
        eprintln!("node {}: dropped {what}", node.name);
    }
    Ok(())
}

/// Writes the config without `node`'s entry, pinning the partitions of the nodes that would
/// otherwise move. The file's text is edited, so comments and `${VAR}` references stay.
fn rewrite_config(config: &Config, path: &Path, node: &str) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .with_context(|| format!("{}: not valid TOML", path.display()))?;
    let pins: Vec<(String, i32)> = config
        .nodes
        .iter()
        .filter(|n| n.name != node && n.partition.is_none())
        .map(|n| (n.name.clone(), config.node_partition(n)))
        .collect();
    let Some(nodes) = doc.get_mut("nodes").and_then(|n| n.as_array_of_tables_mut()) else {
        bail!("{}: no [[nodes]] array", path.display());
    };
    let name_of = |t: &toml_edit::Table| t.get("name").and_then(|v| v.as_str()).map(str::to_string);
    let Some(index) = nodes.iter().position(|t| name_of(t).as_deref() == Some(node)) else {
        bail!("{}: no [[nodes]] entry named {node:?}", path.display());
    };
    nodes.remove(index);
    let mut rest = config.clone();
    rest.nodes.retain(|n| n.name != node);
    for table in nodes.iter_mut() {
        let Some(name) = name_of(table) else { continue };
        let Some((_, pinned)) = pins.iter().find(|(n, _)| *n == name) else {
            continue;
        };
        let moved = rest.node(&name).is_some_and(|n| rest.node_partition(n) != *pinned);
        if moved {
            table.insert("partition", toml_edit::value(i64::from(*pinned)));
        }
    }
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, doc.to_string()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// Drops `node`'s replication origin on every other node, waiting while an apply that still
/// reads the node's partition holds it (legacy names stay, as in [`drop_on_node`]).
async fn drop_origins(cluster: &str, node: &str, others: &[&NodeConfig], deadline: Instant) -> Result<()> {
    for other in others {
        let sql = postgres::connect(&other.dsn, "pgferry-node-remove").await?;
        let origin = naming::replication_origin(cluster, &other.name, node);
        drop_origin(&sql, other, node, &origin, deadline).await?;
    }
    Ok(())
}

/// Drops replication origin `origin` of `node` on `other`, if there, waiting while it is in use.
async fn drop_origin(sql: &PgSession, other: &NodeConfig, node: &str, origin: &str, deadline: Instant) -> Result<()> {
    let mut said = false;
    loop {
        let result = sql
            .client
            .execute(
                "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname = $1",
                &[&origin],
            )
            .await;
        match result {
            Ok(dropped) => {
                if dropped > 0 {
                    eprintln!("node {}: dropped replication origin {origin}", other.name);
                }
                return Ok(());
            }
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) => {
                if Instant::now() > deadline {
                    bail!(
                        "node {}: replication origin {origin} is still in use by its apply: restart that apply with the new config and run `pgferry node remove {node}` again",
                        other.name
                    );
                }
                if !said {
                    eprintln!(
                        "node {}: its apply still reads {node}'s partition; waiting for it to be restarted with the new config …",
                        other.name
                    );
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(sql.err(format!("dropping replication origin {origin}"))(e).into()),
        }
    }
}
