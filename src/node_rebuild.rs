//! `pgferry node rebuild N --copy-from P`: wipes node N's replicated tables and fills them from
//! peer P while the other nodes keep running (N's own pgferry must be stopped).
//!
//! 1. A temporary logical slot on P, created with `EXPORT_SNAPSHOT`, gives a snapshot and its
//!    exact LSN: P's own transactions up to that LSN are in it, later ones are not.
//! 2. In that snapshot (a REPEATABLE READ transaction on P that imports it): P's
//!    `pgferry.apply_progress` (which transaction of every other origin the copied data
//!    holds), every replicated table (streamed COPY, never held in memory), and each row's
//!    stamp — the commit time and origin of its version on P, which last-update-wins compares
//!    with changes still to come.
//! 3. On N, in one transaction under the replication origin `pgferry_<cluster>_<N>_rebuild`
//!    (which capture does not publish): truncate the replicated tables, copy P's rows in,
//!    record the stamps in `pgferry.row_stamps` (apply reads a row's stamp there while the row
//!    is the copied version; a row without a commit time on P gets a NULL one, so it stays
//!    unstamped on N as on P), and set `pgferry.apply_progress`: origin P at the snapshot's LSN
//!    (resuming from P's partition a minute before the snapshot; dedup skips the overlap),
//!    every other origin where P stood in the snapshot. N's session writes as a replica, as
//!    apply does (`pgferry_apply::replica_role`): users' triggers do not fire on the copied
//!    rows, and foreign keys are not checked while the tables fill in any order.
//! 4. N's own transactions that P had not applied yet are replayed into N from N's partition
//!    (`replay --origin N --force --after-lsn <P's progress for N>`).
//!
//! Not carried over: P's tombstones (they name P's transaction ids), so a delete P knew of
//! before the snapshot does not stop an older update still on its way from recreating the row
//! on N.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use futures::{SinkExt, StreamExt};
use pgferry_apply::replay::{self, ReplayRequest, ReplayStart};
use pgferry_apply::stamp_override_or;
use pgferry_connectors::config::Config;
use pgferry_connectors::postgres::{self, quote_ident, quote_literal, PgSession};
use pgferry_connectors::replication;
use pgferry_schemas::naming;

use crate::row_sql::{table_meta, TableMeta};
use crate::table_compare::Progress as CopyProgress;

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Wipe a node's replicated tables and rebuild them from a peer's consistent snapshot
    /// (the node's own pgferry must be stopped; the other nodes keep running).
    Rebuild(RebuildArgs),
    /// Bring a node newly added to the config (its database holds the tables, empty) into the
    /// cluster: set it up like `init` does (its slot and publication, its origin on every node),
    /// then copy a peer's consistent snapshot into it as `rebuild` does. The other nodes keep
    /// taking writes; restart their apply afterwards so they read the new node's partition.
    Add(RebuildArgs),
    /// Take a node out of the cluster: drop its slot, publication and origins everywhere and
    /// remove it from the config file; the others keep replicating (restart their apply when
    /// asked). The node's services must be stopped first.
    Remove(crate::node_remove::RemoveArgs),
}

#[derive(Args)]
pub struct RebuildArgs {
    /// The node to rebuild.
    node: String,
    /// The peer whose data it gets.
    #[arg(long, value_name = "PEER")]
    copy_from: String,
}

pub async fn run(config: Arc<Config>, config_path: &std::path::Path, command: NodeCommand) -> Result<()> {
    match command {
        NodeCommand::Remove(a) => crate::node_remove::run(config, config_path, a).await,
        NodeCommand::Rebuild(a) => rebuild(config, a).await,
        NodeCommand::Add(a) => {
            crate::init::run(&config).await.context("setting up the new node (as `pgferry init`)")?;
            let node = a.node.clone();
            rebuild(config, a).await?;
            eprintln!(
                "node {node} added: start its pgferry, and restart the other nodes' apply so they read its partition"
            );
            Ok(())
        }
    }
}

/// One row of P's `pgferry.apply_progress`.
struct Progress {
    origin: String,
    topic: String,
    partition: i32,
    kafka_offset: i64,
    commit_lsn: String,
}

async fn refuse_if_running(sql: &PgSession, cluster: &str, node: &str) -> Result<()> {
    let row = sql
        .client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                       AND application_name LIKE 'pgferry-apply-%'),
                    (SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 AND active)",
            &[&naming::slot_name(cluster, node)],
        )
        .await
        .map_err(sql.err("checking for running pgferry services"))?;
    let (apply, capture): (i64, i64) = (row.get(0), row.get(1));
    if apply > 0 || capture > 0 {
        bail!("node {node}: its pgferry apply or capture is running; stop it before rebuilding the node");
    }
    Ok(())
}

async fn rebuild(config: Arc<Config>, a: RebuildArgs) -> Result<()> {
    let n = config
        .node(&a.node)
        .with_context(|| format!("node {:?} is not in the config", a.node))?
        .clone();
    let p = config
        .node(&a.copy_from)
        .with_context(|| format!("node {:?} is not in the config", a.copy_from))?
        .clone();
    if n.name == p.name {
        bail!("a node cannot be rebuilt from itself");
    }
    let nsql = postgres::connect(&n.dsn, "pgferry-rebuild").await.context("the node to rebuild")?;
    // The copied rows are written as apply writes them, as a replica: users' triggers do not
    // fire on them (an audit trigger would add rows the copy already holds).
    nsql.client
        .batch_execute(pgferry_apply::replica_role::SET_REPLICA_ROLE)
        .await
        .map_err(nsql.err(pgferry_apply::replica_role::ROLE_NEEDS))?;
    let psql = postgres::connect(&p.dsn, "pgferry-rebuild").await.context("the peer")?;
    let cluster = &config.cluster.name;
    refuse_if_running(&nsql, cluster, &n.name).await?;

    // 1. The snapshot and its LSN.
    let snapshot = replication::export_snapshot(&p.dsn, &naming::rebuild_snapshot_slot(cluster, &n.name)).await?;
    psql.client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT {}",
            quote_literal(&snapshot.name)
        ))
        .await
        .map_err(psql.err("importing the snapshot"))?;
    let snapshot_lsn = snapshot.lsn;
    drop(snapshot);
    let snapshot_ms: i64 = psql
        .client
        .query_one("SELECT (extract(epoch FROM now()) * 1000)::int8", &[])
        .await
        .map_err(psql.err("reading the snapshot's time"))?
        .get(0);
    let progress: Vec<Progress> = psql
        .client
        .query(
            "SELECT origin, topic, partition, kafka_offset, commit_lsn::text FROM pgferry.apply_progress",
            &[],
        )
        .await
        .map_err(psql.err("reading pgferry.apply_progress"))?
        .iter()
        .map(|r| Progress {
            origin: r.get(0),
            topic: r.get(1),
            partition: r.get(2),
            kafka_offset: r.get(3),
            commit_lsn: r.get(4),
        })
        .collect();
    eprintln!(
        "rebuild {} from {}: snapshot at {}",
        n.name,
        p.name,
        pgferry_apply::format_lsn(snapshot_lsn)
    );

    // 2 and 3: the copy, in one transaction on N under the rebuild origin.
    let origin = naming::rebuild_origin(cluster, &n.name);
    postgres::create_replication_origin(&nsql, &origin).await?;
    nsql.client
        .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
        .await
        .map_err(nsql.err(format!("setting up replication origin {origin}")))?;
    // The transaction is dated by the snapshot, by no node (id 0); no copied row keeps that
    // date: each gets the stamp it has on P recorded, none for a row that has none there
    // (`copy_stamps`).
    nsql.client
        .batch_execute(&format!(
            "BEGIN;
             SELECT pg_replication_origin_xact_setup('0/0', 'epoch'::timestamptz + {snapshot_ms} * interval '1 millisecond');
             CREATE TEMP TABLE pgferry_rebuild_stamps (tbl text, key jsonb, ts_us bigint, origin text) ON COMMIT DROP"
        ))
        .await
        .map_err(nsql.err("starting the rebuild transaction"))?;
    // The tables both hold (a region-local table of another region is on neither or one).
    let theirs = postgres::replicated_tables(&config, &p, &psql).await?;
    let tables: Vec<(String, String)> = postgres::replicated_tables(&config, &n, &nsql)
        .await?
        .into_iter()
        .filter(|t| theirs.contains(t))
        .collect();
    let names: Vec<String> = tables.iter().map(|(s, t)| format!("{s}.{t}")).collect();
    // The node's own history of these tables goes with their rows.
    nsql.client
        .execute("DELETE FROM pgferry.tombstones WHERE tbl = ANY($1)", &[&names])
        .await
        .map_err(nsql.err("clearing tombstones"))?;
    // (absent on a node an earlier version initialized and no apply has upgraded yet)
    let truncations: bool = nsql
        .client
        .query_one("SELECT to_regclass('pgferry.truncations') IS NOT NULL", &[])
        .await
        .map_err(nsql.err("looking for pgferry.truncations"))?
        .get(0);
    if truncations {
        nsql.client
            .execute("DELETE FROM pgferry.truncations WHERE tbl = ANY($1)", &[&names])
            .await
            .map_err(nsql.err("clearing truncations"))?;
    }
    nsql.client
        .execute("DELETE FROM pgferry.row_stamps WHERE tbl = ANY($1)", &[&names])
        .await
        .map_err(nsql.err("clearing row stamps"))?;
    let mut metas = Vec::new();
    for (schema, table) in &tables {
        metas.push(table_meta(&psql, &p.name, schema, table).await?);
    }
    let all: Vec<&str> = metas.iter().map(|m| m.qualified.as_str()).collect();
    nsql.client
        .batch_execute(&format!("TRUNCATE {}", all.join(", ")))
        .await
        .map_err(nsql.err("emptying the replicated tables"))?;
    for ((schema, table), meta) in tables.iter().zip(&metas) {
        let rows = copy_table(&psql, &nsql, meta).await?;
        copy_stamps(&psql, &nsql, &config, &p.name, &format!("{schema}.{table}"), meta).await?;
        eprintln!("rebuild {}: {schema}.{table}: {rows} rows copied from {}", n.name, p.name);
    }
    nsql.client
        .batch_execute(
            "INSERT INTO pgferry.row_stamps (tbl, key, xid, ts_us, origin)
             SELECT tbl, key, txid_current(), ts_us, origin FROM pgferry_rebuild_stamps
             ON CONFLICT (tbl, key) DO UPDATE SET xid = EXCLUDED.xid, ts_us = EXCLUDED.ts_us, origin = EXCLUDED.origin;
             DELETE FROM pgferry.apply_progress;",
        )
        .await
        .map_err(nsql.err("recording the copied rows' stamps"))?;
    let own = set_progress(&config, &nsql, &n.name, &p.name, &progress, snapshot_lsn, snapshot_ms).await?;
    nsql.client
        .batch_execute("COMMIT; SELECT pg_replication_origin_session_reset()")
        .await
        .map_err(nsql.err("committing the rebuild"))?;
    psql.client
        .batch_execute("COMMIT")
        .await
        .map_err(psql.err("ending the snapshot"))?;

    // 4. N's own transactions that P had not applied.
    let req = ReplayRequest {
        origin: n.name.clone(),
        start: own.map_or(ReplayStart::TimeMs(0), |(_, offset)| ReplayStart::Offset(offset + 1)),
        to_time_ms: None,
        force: true,
        after_lsn: Some(own.map_or(0, |(lsn, _)| lsn)),
    };
    let plan = replay::plan(&config, &n.name, &req).await?;
    let report = replay::run(config.clone(), &plan, &req, |_| {}).await?;
    eprintln!(
        "rebuild {}: {} of its own transactions {} had not applied replayed",
        n.name, report.applied, p.name
    );
    println!("node {} rebuilt from {} (snapshot at {}); start its pgferry", n.name, p.name, pgferry_apply::format_lsn(snapshot_lsn));
    Ok(())
}

/// Streams `meta`'s rows from the peer's snapshot into the node; the number of rows.
async fn copy_table(psql: &PgSession, nsql: &PgSession, meta: &TableMeta) -> Result<u64> {
    let cols: Vec<String> = meta.columns.iter().map(|(c, _)| quote_ident(c)).collect();
    let cols = cols.join(", ");
    // The bar's total is the planner's estimate (exact counting would read the table twice).
    let estimate: f32 = psql
        .client
        .query_one("SELECT greatest(reltuples, 0)::real FROM pg_class WHERE oid = $1::text::regclass", &[&meta.qualified])
        .await
        .map_err(psql.err(format!("estimating the rows of {}", meta.qualified)))?
        .get(0);
    let mut progress = CopyProgress::copying(&format!("copying {}", meta.qualified), estimate as i64);
    let rows = copy(
        psql,
        &format!("COPY (SELECT {cols} FROM {}) TO STDOUT", meta.qualified),
        nsql,
        &format!("COPY {} ({cols}) FROM STDIN", meta.qualified),
        &format!("copying {}", meta.qualified),
        Some(&mut progress),
    )
    .await?;
    progress.finish();
    Ok(rows)
}

/// Streams each row's stamp on the peer (commit time and origin of its version there, or the
/// peer's own `pgferry.row_stamps` entry for it, or the exact time its group's
/// `pgferry.xact_stamps` record keeps) into the node's staging table, one for every row: a row
/// without a commit time on the peer (too old, or written while `track_commit_timestamp` was
/// off) gets a NULL stamp, which apply reads as no commit time, exactly as on the peer — not the
/// copying transaction's (issue 16, scenario 11; `pgferry_apply::stamp_override_or`). The
/// groups' records are expanded once and joined by hash (looking one key up in SQL reads a
/// whole bucket).
async fn copy_stamps(
    psql: &PgSession,
    nsql: &PgSession,
    config: &Config,
    peer: &str,
    name: &str,
    meta: &TableMeta,
) -> Result<u64> {
    let key: Vec<String> = meta.key.iter().map(|k| format!("r.{}", quote_ident(k))).collect();
    let key = format!("jsonb_build_array({})", key.join(", "));
    // The names of the peer's replication origins (current and legacy) → the node each stands for.
    let origins: Vec<String> = config
        .nodes
        .iter()
        .flat_map(|o| {
            naming::replication_origins_read(&config.cluster.name, peer, &o.name)
                .map(|roname| format!("({}, {})", quote_literal(&roname), quote_literal(&o.name)))
        })
        .collect();
    let text = format!(
        "COPY (WITH g AS MATERIALIZED (
                   SELECT x.xid, e.key, e.value::text::int8 AS ts_us
                   FROM pgferry.xact_stamps x CROSS JOIN LATERAL jsonb_each(x.stamps -> {tbl}) e)
               SELECT {tbl}, k.key, {ts}, {origin}
               FROM {table} r
               CROSS JOIN LATERAL (SELECT {key} AS key) k
               CROSS JOIN LATERAL pg_xact_commit_timestamp_origin(r.xmin) c
               LEFT JOIN pgferry.row_stamps s ON s.tbl = {tbl} AND s.key = k.key AND s.xid % 4294967296 = r.xmin::text::int8
               LEFT JOIN g ON g.xid = r.xmin::text::int8 AND g.key = k.key::text) TO STDOUT",
        ts = stamp_override_or("s", "ts_us", "coalesce(g.ts_us, (extract(epoch FROM c.timestamp) * 1000000)::int8)"),
        origin = stamp_override_or(
            "s",
            "origin",
            &format!(
                "CASE WHEN c.roident = 0 THEN {}
                      ELSE (SELECT m.node FROM pg_replication_origin o
                            JOIN (VALUES {}) m (roname, node) ON m.roname = o.roname
                            WHERE o.roident = c.roident LIMIT 1) END",
                quote_literal(peer),
                origins.join(", ")
            )
        ),
        tbl = quote_literal(name),
        table = meta.qualified,
    );
    copy(psql, &text, nsql, "COPY pgferry_rebuild_stamps FROM STDIN", &format!("copying the row stamps of {name}"), None).await
}

/// Streams the output of `copy_out` on `from` into `copy_in` on `to`, chunk by chunk, counting
/// rows into `progress` (text COPY: one line per row, newlines in values escaped); the rows.
async fn copy(
    from: &PgSession,
    copy_out: &str,
    to: &PgSession,
    copy_in: &str,
    what: &str,
    mut progress: Option<&mut CopyProgress>,
) -> Result<u64> {
    let out = from.client.copy_out(copy_out).await.map_err(from.err(what))?;
    let sink = to.client.copy_in(copy_in).await.map_err(to.err(what))?;
    let mut out = std::pin::pin!(out);
    let mut sink = std::pin::pin!(sink);
    while let Some(chunk) = out.next().await {
        let chunk = chunk.map_err(from.err(what))?;
        if let Some(p) = progress.as_deref_mut() {
            p.copied(chunk.iter().filter(|&&b| b == b'\n').count() as i64);
        }
        sink.send(chunk).await.map_err(to.err(what))?;
    }
    Ok(sink.as_mut().finish().await.map_err(to.err(what))?)
}

/// Writes the node's `pgferry.apply_progress` from the peer's (read in the snapshot): the peer
/// itself at the snapshot's LSN, every other origin where the peer stood. Returns the peer's
/// progress for the node's own origin (commit LSN, offset in the node's own partition, or -1
/// when the peer reads it elsewhere), if it has one.
async fn set_progress(
    config: &Config,
    nsql: &PgSession,
    node: &str,
    peer: &str,
    progress: &[Progress],
    snapshot_lsn: u64,
    snapshot_ms: i64,
) -> Result<Option<(u64, i64)>> {
    let me = config.node(node).context("node not in the config")?;
    let insert = |origin: String, topic: String, partition: i32, offset: i64, lsn: String| async move {
        nsql.client
            .execute(
                "INSERT INTO pgferry.apply_progress AS p (origin, topic, partition, kafka_offset, commit_lsn, commit_ts, applied_at)
                 VALUES ($1, $2, $3, $4, $5::text::pg_lsn, 'epoch', clock_timestamp())
                 ON CONFLICT (origin, topic, partition) DO UPDATE
                   SET commit_lsn = greatest(p.commit_lsn, EXCLUDED.commit_lsn),
                       kafka_offset = least(p.kafka_offset, EXCLUDED.kafka_offset)",
                &[&origin, &topic, &partition, &offset, &lsn],
            )
            .await
            .map_err(nsql.err("setting pgferry.apply_progress"))
    };
    // The peer's own changes, through the partition that carries them to the node, from a
    // minute before the snapshot (Kafka timestamps are produce times, after the commit); dedup
    // skips what the snapshot holds.
    let from_peer = ReplayRequest {
        origin: peer.to_string(),
        start: ReplayStart::TimeMs(snapshot_ms - 60_000),
        to_time_ms: None,
        force: false,
        after_lsn: None,
    };
    let at = replay::plan(config, node, &from_peer).await?;
    insert(peer.to_string(), at.topic, at.partition, at.start - 1, pgferry_apply::format_lsn(snapshot_lsn)).await?;
    let mut own = None;
    for pr in progress {
        if pr.origin == peer {
            continue;
        }
        if pr.origin == node {
            let mine = (config.region_topic(&me.region), config.node_partition(me));
            let offset = if (pr.topic.clone(), pr.partition) == mine { pr.kafka_offset } else { -1 };
            let lsn = replication::parse_lsn(&pr.commit_lsn).unwrap_or(0);
            own = Some(match own {
                Some((l, o)) if l >= lsn => (l, o),
                _ => (lsn, offset),
            });
            continue;
        }
        // Resume where the peer stood if the node reads the origin through the same partition;
        // else from the start of the node's partition for it (dedup skips what is applied).
        let carrier = config.node(&pr.origin).and_then(|_| config.carriers(me, &pr.origin).first().copied());
        let Some(carrier) = carrier else { continue };
        let (topic, partition) = (config.region_topic(&carrier.region), config.node_partition(carrier));
        let offset = if topic == pr.topic && partition == pr.partition { pr.kafka_offset } else { -1 };
        insert(pr.origin.clone(), topic, partition, offset, pr.commit_lsn.clone()).await?;
    }
    Ok(own)
}
