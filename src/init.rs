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

pub async fn run(config: &Config) -> Result<()> {
    let sessions = check(config).await?;
    for region in config.regions() {
        let topic = config.region_topic(&region);
        kafka::ensure_topic(&config.kafka, &topic, config.kafka.partitions).await?;
        println!("topic {topic}: ready ({} partitions)", config.kafka.partitions);
    }
    for topic in [
        format!("{}.conflicts", config.cluster.name),
        format!("{}.dlq", config.cluster.name),
    ] {
        kafka::ensure_topic(&config.kafka, &topic, 1).await?;
        println!("topic {topic}: ready");
    }
    for (node, sql) in config.nodes.iter().zip(&sessions) {
        install(config, node, sql)
            .await
            .with_context(|| format!("node {}", node.name))?;
        println!("node {} ({}): ready", node.name, sql.endpoint);
    }
    Ok(())
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

async fn install(config: &Config, node: &NodeConfig, sql: &PgSession) -> Result<()> {
    // pgferry's own DDL (its tables, triggers) is set up on every node by init: not replicated.
    sql.client
        .batch_execute("SET pgferry.local_ddl = on")
        .await
        .map_err(sql.err("marking the session's DDL local"))?;
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
    for (schema, table) in replicated.iter().cloned() {
        // Deletes leave tombstones (DESIGN.md, "Conflicts"); the trigger needs the key columns.
        let key = postgres::table_columns(sql, &schema, &table)
            .await?
            .map(|t| t.key)
            .unwrap_or_default();
        let qualified = format!("{}.{}", quote_ident(&schema), quote_ident(&table));
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
            continue;
        }
        sql.client
            .batch_execute(&pgferry_apply::tombstone_trigger_sql(&qualified, &key))
            .await
            .map_err(sql.err(format!("installing the tombstone trigger on {schema}.{table}")))?;
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
    let stmt = if exists {
        format!("ALTER PUBLICATION {} SET {objects}", quote_ident(publication))
    } else {
        format!("CREATE PUBLICATION {} FOR {objects}", quote_ident(publication))
    };
    sql.client
        .batch_execute(&stmt)
        .await
        .map_err(sql.err("creating the publication"))?;
    let slot = pgferry_capture::slot_name(&node.name);
    sql.client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')
             WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&slot],
        )
        .await
        .map_err(sql.err(format!("creating replication slot {slot}")))?;
    for other in config.nodes.iter().filter(|n| n.name != node.name) {
        let origin = pgferry_apply::origin_name(&other.name);
        sql.client
            .execute(
                "SELECT pg_replication_origin_create($1)
                 WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1)",
                &[&origin],
            )
            .await
            .map_err(sql.err(format!("creating replication origin {origin}")))?;
    }
    Ok(())
}
