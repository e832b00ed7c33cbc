//! `pgferry init`: topics in Kafka; on every node the `pgferry` schema, the publication of the
//! replicated tables, the node's slot and one replication origin per other node. Idempotent.
//! Refuses tables without a primary key, naming them, and a slot or origin of pgferry's name
//! that something else holds (another database, another plugin), naming what holds it. Moves a
//! node's slot from its name of earlier versions (`pgferry_<node>`) to the current one.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use pgferry_connectors::config::{Config, NodeConfig};
use pgferry_connectors::kafka;
use pgferry_connectors::postgres::{self, quote_ident, PgSession};
use pgferry_schemas::naming;
use tokio_postgres::error::SqlState;

/// The `pgferry` schema's tables.
const SCHEMA_SQL: &str = "
CREATE SCHEMA IF NOT EXISTS pgferry;
CREATE TABLE IF NOT EXISTS pgferry.apply_progress (
    origin       text        NOT NULL,
    topic        text        NOT NULL,
    partition    int         NOT NULL,
    kafka_offset bigint      NOT NULL,
    commit_lsn   pg_lsn      NOT NULL,
    commit_ts    timestamptz NOT NULL,
    applied_at   timestamptz NOT NULL,
    PRIMARY KEY (origin, topic, partition)
);";

/// Sets up the topics and every node; prints one line per topic and per node saying what it
/// created and what it found.
pub async fn run(config: &Config) -> Result<()> {
    let sessions = check(config).await?;
    let data_topics = config
        .regions()
        .iter()
        .map(|region| (config.region_topic(region), config.kafka.partitions))
        .collect::<Vec<_>>();
    let cluster = &config.cluster.name;
    let side_topics = [(format!("{cluster}.conflicts"), 1), (format!("{cluster}.dlq"), 1)];
    for (topic, partitions) in data_topics.into_iter().chain(side_topics) {
        let created = kafka::ensure_topic(&config.kafka, &topic, partitions).await?;
        let partitions = plural(partitions as usize, "partition");
        println!("topic {topic}: {} ({partitions})", if created { "created" } else { "found" });
    }
    for (node, sql) in config.nodes.iter().zip(&sessions) {
        let report = install(config, node, sql)
            .await
            .with_context(|| format!("node {}", node.name))?;
        println!("node {} ({}): {report}", node.name, sql.endpoint);
    }
    Ok(())
}

/// What `init` did on one node, printed as one line: the objects it created, changed and found.
#[derive(Debug, Default)]
struct NodeReport {
    /// Objects created by this run.
    created: Vec<String>,
    /// Objects that were there and now differ (the publication's tables).
    updated: Vec<String>,
    /// Objects that were there as they should be.
    found: Vec<String>,
    /// Whether the `pgferry` schema was there before (its tables and functions are brought up
    /// to date either way).
    schema_found: bool,
}

impl NodeReport {
    /// Files `what` under created or found.
    fn note(&mut self, created: bool, what: String) {
        if created {
            self.created.push(what);
        } else {
            self.found.push(what);
        }
    }
}

impl std::fmt::Display for NodeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts: Vec<String> = [("created", &self.created), ("updated", &self.updated), ("found", &self.found)]
            .into_iter()
            .filter(|(_, items)| !items.is_empty())
            .map(|(verb, items)| format!("{verb} {}", items.join(", ")))
            .collect();
        if self.schema_found {
            parts.push("schema pgferry up to date".to_string());
        }
        f.write_str(&parts.join("; "))
    }
}

/// `"1 table"`, `"3 tables"`.
fn plural(n: usize, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

/// `"origin a"`, `"origins a and b"`, `"origins a, b and c"`; `None` for no names.
fn named(kind: &str, names: &[String]) -> Option<String> {
    match names {
        [] => None,
        [one] => Some(format!("{kind} {one}")),
        [rest @ .., last] => Some(format!("{kind}s {} and {last}", rest.join(", "))),
    }
}

/// Checks Kafka and every node (settings, replicated tables and their primary keys) before
/// anything is installed; a session to each node.
pub async fn check(config: &Config) -> Result<Vec<PgSession>> {
    // Kafka first: a wrong bootstrap address should fail before any node is touched.
    let kcfg = config.kafka.clone();
    tokio::task::spawn_blocking(move || kafka::check_reachable(&kcfg, Duration::from_secs(10))).await??;
    let mut sessions = Vec::new();
    for node in &config.nodes {
        let sql = postgres::connect(&node.dsn, "pgferry-init")
            .await
            .with_context(|| format!("node {}", node.name))?;
        check_node(config, node, &sql).await?;
        sessions.push(sql);
    }
    Ok(sessions)
}

/// Settings and tables that must be right before anything is installed.
async fn check_node(config: &Config, node: &NodeConfig, sql: &PgSession) -> Result<()> {
    for (setting, want) in [("wal_level", "logical"), ("track_commit_timestamp", "on")] {
        let have: String = sql
            .client
            .query_one("SELECT current_setting($1)", &[&setting])
            .await
            .map_err(sql.err(format!("reading {setting}")))?
            .get(0);
        if have != want {
            bail!(
                "node {} ({}): {setting} is {have:?}; pgferry needs {want:?} (set it in postgresql.conf and restart)",
                node.name,
                sql.endpoint
            );
        }
    }
    for (schema, table) in postgres::replicated_tables(config, node, sql).await? {
        let row = sql
            .client
            .query_opt(
                "SELECT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&schema, &table],
            )
            .await
            .map_err(sql.err(format!("looking up table {schema}.{table}")))?;
        match row {
            None => bail!("node {} ({}): replicated table {schema}.{table} does not exist", node.name, sql.endpoint),
            Some(r) if !r.get::<_, bool>(0) => bail!(
                "node {} ({}): table {schema}.{table} has no primary key; pgferry needs one to find rows on the other nodes (add a primary key or remove it from replication.tables)",
                node.name,
                sql.endpoint
            ),
            Some(_) => {}
        }
    }
    pgferry_capture::check_delta_tables(config, &node.name, sql).await?;
    if let Some(refusal) = check_slot(config, node, sql).await? {
        bail!("{refusal}");
    }
    if let Some(refusal) = check_origins(config, node, sql).await? {
        bail!("{refusal}");
    }
    Ok(())
}

/// A replication slot as `pg_replication_slots` shows it.
struct SlotRow {
    /// `logical` or `physical`.
    kind: String,
    /// Its database (none for a physical slot).
    database: Option<String>,
    plugin: Option<String>,
    temporary: bool,
    /// The process streaming from it, if any.
    active_pid: Option<i32>,
}

/// The slot named `name` on the node's server, if there is one.
async fn slot_row(sql: &PgSession, name: &str) -> Result<Option<SlotRow>> {
    let row = sql
        .client
        .query_opt(
            "SELECT slot_type, database::text, plugin::text, temporary, active_pid
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .map_err(sql.err(format!("looking up replication slot {name}")))?;
    Ok(row.map(|r| SlotRow {
        kind: r.get(0),
        database: r.get(1),
        plugin: r.get(2),
        temporary: r.get(3),
        active_pid: r.get(4),
    }))
}

/// The database of the node's session.
async fn current_database(sql: &PgSession) -> Result<String> {
    Ok(sql
        .client
        .query_one("SELECT current_database()::text", &[])
        .await
        .map_err(sql.err("reading the database name"))?
        .get(0))
}

/// Refuses a slot of the node's slot name that is not this node's (another database, another
/// plugin, physical or temporary), and a legacy slot of the node that a capture still streams
/// from (init would move it): why, naming the slot, what holds it and what to do (`None`: the
/// slot is fine). Also run by `pgferry check`.
pub(crate) async fn check_slot(config: &Config, node: &NodeConfig, sql: &PgSession) -> Result<Option<String>> {
    let slot = naming::slot_name(&config.cluster.name, &node.name);
    let db = current_database(sql).await?;
    let at = format!("node {} ({})", node.name, sql.endpoint);
    if let Some(s) = slot_row(sql, &slot).await? {
        let what = match s.database.as_deref() {
            _ if s.kind != "logical" => Some(format!("is a {} slot", s.kind)),
            Some(d) if d != db => Some(format!(
                "belongs to database {d:?} on this server (another pgferry cluster named {:?}, or another tool), not to this node's database {db:?}",
                config.cluster.name
            )),
            _ if s.plugin.as_deref() != Some("pgoutput") => Some(format!(
                "decodes with plugin {}, not pgoutput: it is not pgferry's",
                s.plugin.as_deref().unwrap_or("(none)")
            )),
            _ if s.temporary => Some(format!(
                "is a temporary slot of the session with pid {}",
                s.active_pid.map_or("(none)".into(), |p| p.to_string())
            )),
            _ => None,
        };
        if let Some(what) = what {
            return Ok(Some(format!(
                "{at}: replication slot {slot} already exists and {what}; pgferry will not reuse it. \
                 Give this cluster another [cluster] name, or drop the slot if nothing uses it \
                 (SELECT pg_drop_replication_slot('{slot}'))"
            )));
        }
    }
    let legacy = naming::legacy_slot_name(&node.name);
    if legacy != slot {
        if let Some(s) = slot_row(sql, &legacy).await? {
            let ours = s.kind == "logical" && s.database.as_deref() == Some(db.as_str()) && s.plugin.as_deref() == Some("pgoutput");
            if let (true, Some(pid)) = (ours, s.active_pid) {
                return Ok(Some(format!(
                    "{at}: replication slot {legacy} (this node's, from an earlier pgferry) is in use by pid {pid}: \
                     stop the node's capture, then run init again to move the slot to {slot}"
                )));
            }
        }
    }
    Ok(None)
}

/// Refuses a replication origin of one of the node's origin names that a session of another
/// database holds: why, naming the origin and its holder (`None`: the origins are fine).
/// Origins are server-wide and record no database; the session that has one set up is all
/// PostgreSQL tells of its user. Also run by `pgferry check`.
pub(crate) async fn check_origins(config: &Config, node: &NodeConfig, sql: &PgSession) -> Result<Option<String>> {
    let at = format!("node {} ({})", node.name, sql.endpoint);
    for other in &config.nodes {
        if other.name == node.name {
            continue;
        }
        let origin = naming::replication_origin(&config.cluster.name, &node.name, &other.name);
        let exists = sql
            .client
            .query_opt("SELECT 1 FROM pg_replication_origin WHERE roname = $1", &[&origin])
            .await
            .map_err(sql.err(format!("looking up replication origin {origin}")))?
            .is_some();
        if !exists {
            continue;
        }
        // Setting it up in this session fails while another session has it.
        let probe = sql
            .client
            .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
            .await;
        match probe {
            Ok(_) => {
                sql.client
                    .batch_execute("SELECT pg_replication_origin_session_reset()")
                    .await
                    .map_err(sql.err("resetting the session's replication origin"))?;
            }
            Err(e) if e.code() == Some(&SqlState::OBJECT_IN_USE) => {
                let message = e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string());
                if let Some(holder) = origin_holder(sql, &message, &node.name, &other.name).await? {
                    return Ok(Some(format!(
                        "{at}: replication origin {origin} is in use by {holder}, not by this node's apply; \
                         pgferry will not share it. Is another pgferry cluster named {:?} running on this server? \
                         Give this cluster another [cluster] name",
                        config.cluster.name
                    )));
                }
            }
            Err(e) => return Err(sql.err(format!("checking replication origin {origin}"))(e).into()),
        }
    }
    Ok(None)
}

/// Who holds a replication origin, from PostgreSQL's "… is already active for PID n": `None`
/// when it is this node's own apply (a session of this database), else the holder's database,
/// application and pid as far as they can be read.
async fn origin_holder(sql: &PgSession, message: &str, node: &str, origin: &str) -> Result<Option<String>> {
    let pid: Option<i32> = message
        .rsplit(|c: char| !c.is_ascii_digit())
        .find(|w| !w.is_empty())
        .and_then(|w| w.parse().ok());
    let row = sql
        .client
        .query_opt(
            "SELECT datname::text, application_name, datname = current_database()
             FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .await
        .map_err(sql.err("looking up the session that holds a replication origin"))?;
    match (pid, row) {
        (_, Some(r)) if r.get::<_, Option<bool>>(2) == Some(true) => Ok(None),
        (Some(pid), Some(r)) => Ok(Some(format!(
            "the session with pid {pid} of database {:?} (application {:?})",
            r.get::<_, Option<String>>(0).unwrap_or_default(),
            r.get::<_, Option<String>>(1).unwrap_or_default()
        ))),
        _ => {
            // The pid could not be read (a translated message): this node's apply of that
            // origin, connected here, is the only holder init accepts (PostgreSQL keeps the
            // first 63 bytes of an application name).
            let own: bool = sql
                .client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                                    WHERE datname = current_database() AND application_name = left($1, 63))",
                    &[&format!("pgferry-apply-{node}-from-{origin}")],
                )
                .await
                .map_err(sql.err("looking up the node's apply sessions"))?
                .get(0);
            Ok((!own).then(|| format!("another session ({message})")))
        }
    }
}

/// Installs pgferry on one node (idempotent); what it created and found.
async fn install(config: &Config, node: &NodeConfig, sql: &PgSession) -> Result<NodeReport> {
    let mut report = NodeReport::default();
    // pgferry's own DDL (its tables, triggers) is set up on every node by init: not replicated.
    sql.client
        .batch_execute("SET pgferry.local_ddl = on")
        .await
        .map_err(sql.err("marking the session's DDL local"))?;
    report.schema_found = sql
        .client
        .query_one("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'pgferry')", &[])
        .await
        .map_err(sql.err("looking up the pgferry schema"))?
        .get(0);
    if !report.schema_found {
        report.created.push("schema pgferry".to_string());
    }
    sql.client
        .batch_execute(SCHEMA_SQL)
        .await
        .map_err(sql.err("installing the pgferry schema"))?;
    sql.client
        .batch_execute(pgferry_apply::CONFLICT_SCHEMA_SQL)
        .await
        .map_err(sql.err("installing pgferry's conflict tables"))?;
    let replicated = postgres::replicated_tables(config, node, sql).await?;
    let ddl_trigger = if config.replication.ddl {
        let named: Vec<(String, String)> =
            replicated.iter().filter(|(s, _)| !config.replicates_schema(s)).cloned().collect();
        pgferry_apply::ddl::trigger_sql(&named, &config.replication.schemas)
    } else {
        pgferry_apply::ddl::DROP_TRIGGERS_SQL.to_string()
    };
    sql.client
        .batch_execute(&ddl_trigger)
        .await
        .map_err(sql.err("setting up the DDL replication event trigger"))?;
    sql.client
        .batch_execute(&crate::snowflake::install_sql(node.id))
        .await
        .map_err(sql.err("installing the snowflake id functions"))?;
    let (mut triggers_created, mut triggers_found) = (0, 0);
    for (schema, table) in replicated.iter() {
        // Deletes leave tombstones (DESIGN.md, "Conflicts"); the trigger needs the key columns.
        let key = postgres::table_columns(sql, schema, table)
            .await?
            .map(|t| t.key)
            .unwrap_or_default();
        let qualified = format!("{}.{}", quote_ident(schema), quote_ident(table));
        // Already there as it should be (init run again, e.g. by `node add` while the nodes
        // take writes): leave it, instead of locking a busy table to re-create it.
        let args: Vec<u8> = key.iter().flat_map(|k| k.bytes().chain([0])).collect();
        let present: bool = sql
            .client
            .query_one(
                "SELECT (SELECT count(*) = 2 FROM pg_trigger
                         WHERE tgrelid = to_regclass($1) AND tgname IN ('pgferry_tombstone', 'pgferry_key_change')
                           AND tgenabled = 'A' AND tgargs = $2)
                        AND EXISTS (SELECT 1 FROM pg_trigger
                                    WHERE tgrelid = to_regclass($1) AND tgname = 'pgferry_truncation' AND tgenabled = 'A')",
                &[&qualified, &args],
            )
            .await
            .map_err(sql.err(format!("looking up the tombstone trigger of {schema}.{table}")))?
            .get(0);
        if present {
            triggers_found += 1;
            continue;
        }
        sql.client
            .batch_execute(&pgferry_apply::tombstone_trigger_sql(&qualified, &key))
            .await
            .map_err(sql.err(format!("installing the tombstone trigger on {schema}.{table}")))?;
        triggers_created += 1;
    }
    // Column lists and row filters go into the publication (PostgreSQL 15 filters them out of
    // the change stream itself); tables local to another region are not published here.
    // Schemas replicated whole are published as such, so tables created in them later are too.
    let tables: Vec<String> = replicated
        .iter()
        .filter(|(s, _)| !config.replicates_schema(s))
        .map(|(s, t)| config.publication_entry(s, t))
        .collect();
    let mut objects = Vec::new();
    if !tables.is_empty() {
        objects.push(format!("TABLE {}", tables.join(", ")));
    }
    if !config.replication.schemas.is_empty() {
        let schemas: Vec<String> = config.replication.schemas.iter().map(|s| quote_ident(s)).collect();
        objects.push(format!("TABLES IN SCHEMA {}", schemas.join(", ")));
    }
    let objects = objects.join(", ");
    let publication = naming::publication_name();
    let exists = sql
        .client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&publication])
        .await
        .map_err(sql.err("looking up the publication"))?
        .is_some();
    let before = publication_tables(sql, publication).await?;
    let stmt = if exists {
        format!("ALTER PUBLICATION {} SET {objects}", quote_ident(publication))
    } else {
        format!("CREATE PUBLICATION {} FOR {objects}", quote_ident(publication))
    };
    sql.client
        .batch_execute(&stmt)
        .await
        .map_err(sql.err("creating the publication"))?;
    let after = publication_tables(sql, publication).await?;
    let what = format!("publication {publication} ({})", plural(after.len(), "table"));
    match (exists, before == after) {
        (false, _) => report.created.push(what),
        (true, false) => report.updated.push(what),
        (true, true) => report.found.push(what),
    }
    let cluster = &config.cluster.name;
    let slot = naming::slot_name(cluster, &node.name);
    // A node set up by an earlier pgferry has its slot under the legacy name, in its own
    // database (check_slot refused it while a capture streams from it): its origins' progress
    // is carried to the new names, then the slot is copied (same position) and the old one
    // dropped, last, so an init cut short finds it again.
    let legacy = naming::legacy_slot_name(&node.name);
    let db = current_database(sql).await?;
    let legacy_here = legacy != slot
        && slot_row(sql, &legacy)
            .await?
            .is_some_and(|s| s.kind == "logical" && s.database.as_deref() == Some(db.as_str()) && s.plugin.as_deref() == Some("pgoutput"));
    let (mut origins_created, mut origins_found) = (Vec::new(), Vec::new());
    for other in config.nodes.iter().filter(|n| n.name != node.name) {
        let origin = naming::replication_origin(cluster, &node.name, &other.name);
        if postgres::create_replication_origin(sql, &origin).await? {
            if legacy_here {
                // Where the legacy origin stood (apply resumes by pgferry.apply_progress; this
                // keeps pg_replication_origin_status telling the same).
                let old = naming::legacy_replication_origin(&other.name);
                let progress: Option<String> = sql
                    .client
                    .query_opt(
                        "SELECT pg_replication_origin_progress(roname, false)::text FROM pg_replication_origin WHERE roname = $1",
                        &[&old],
                    )
                    .await
                    .map_err(sql.err(format!("reading the progress of replication origin {old}")))?
                    .and_then(|r| r.get(0));
                if let Some(lsn) = progress {
                    sql.client
                        .execute("SELECT pg_replication_origin_advance($1, $2::text::pg_lsn)", &[&origin, &lsn])
                        .await
                        .map_err(sql.err(format!("carrying the progress of {old} to {origin}")))?;
                }
            }
            origins_created.push(origin);
        } else {
            origins_found.push(origin);
        }
    }
    let slot_exists = slot_row(sql, &slot).await?.is_some();
    if legacy_here && !slot_exists {
        sql.client
            .execute("SELECT pg_copy_logical_replication_slot($1, $2)", &[&legacy, &slot])
            .await
            .map_err(sql.err(format!("copying replication slot {legacy} to {slot}")))?;
    } else if !slot_exists {
        sql.client
            .execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot])
            .await
            .map_err(sql.err(format!("creating replication slot {slot}")))?;
    }
    if legacy_here {
        sql.client
            .execute("SELECT pg_drop_replication_slot($1)", &[&legacy])
            .await
            .map_err(sql.err(format!("dropping replication slot {legacy} (moved to {slot})")))?;
        report.created.push(format!("slot {slot} (moved from {legacy})"));
    } else {
        report.note(!slot_exists, format!("slot {slot}"));
    }
    for (created, origins) in [(true, origins_created), (false, origins_found)] {
        if let Some(what) = named("origin", &origins) {
            report.note(created, what);
        }
    }
    for (created, count) in [(true, triggers_created), (false, triggers_found)] {
        if count > 0 {
            report.note(created, format!("tombstone triggers on {}", plural(count, "table")));
        }
    }
    Ok(report)
}

/// The rows of `pg_publication_tables` for `publication` (table, columns and row filter), one
/// text per table in a fixed order: compared before and after `init` sets the publication.
async fn publication_tables(sql: &PgSession, publication: &str) -> Result<Vec<String>> {
    let rows = sql
        .client
        .query(
            "SELECT t::text FROM pg_publication_tables t WHERE t.pubname = $1 ORDER BY 1",
            &[&publication],
        )
        .await
        .map_err(sql.err(format!("reading the tables of publication {publication}")))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
