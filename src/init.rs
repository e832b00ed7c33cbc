//! `pgferry init`: topics in Kafka; on every node the `pgferry` schema, the publication of the
//! replicated tables, the node's slot and one replication origin per other node. Idempotent.
//! Refuses tables without a primary key, naming them.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use pgferry_connectors::config::{Config, NodeConfig};
use pgferry_connectors::kafka;
use pgferry_connectors::postgres::{self, quote_ident, PgSession};

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
    Ok(())
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
                "SELECT EXISTS (SELECT 1 FROM pg_trigger
                                WHERE tgrelid = to_regclass($1) AND tgname = 'pgferry_tombstone'
                                  AND tgenabled = 'A' AND tgargs = $2)",
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
    let publication = pgferry_capture::publication_name();
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
    let slot = pgferry_capture::slot_name(&node.name);
    let slot_created = sql
        .client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')
             WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&slot],
        )
        .await
        .map_err(sql.err(format!("creating replication slot {slot}")))?;
    report.note(slot_created == 1, format!("slot {slot}"));
    let (mut origins_created, mut origins_found) = (Vec::new(), Vec::new());
    for other in config.nodes.iter().filter(|n| n.name != node.name) {
        let origin = pgferry_apply::origin_name(&other.name);
        if postgres::create_replication_origin(sql, &origin).await? {
            origins_created.push(origin);
        } else {
            origins_found.push(origin);
        }
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
