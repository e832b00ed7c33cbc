//! What `pgferry check` reads on a node: its settings and capacity, the role it connects as,
//! the replicated tables; and init's own checks of the node's slot and origins. Reads only
//! (the one write-like statement, `SET LOCAL session_replication_role`, is rolled back).

use pgferry_connectors::config::{Config, NodeConfig};
use pgferry_connectors::postgres::{self, PgError, PgSession};
use pgferry_schemas::naming;

use super::rules::{self, Finding, NodeNeeds, Place, RoleFacts, ServerFacts, TableFacts};

/// Every finding about `node`: a session to it, then each prerequisite. A failed read makes
/// that check (not the node's others) `unchecked`.
pub async fn findings(config: &Config, node: &NodeConfig) -> Vec<Finding> {
    let endpoint = pgferry_connectors::redact::dsn_endpoint(&node.dsn);
    let place = Place::Node {
        name: node.name.clone(),
        endpoint: endpoint.clone(),
    };
    let sql = match postgres::connect(&node.dsn, "pgferry-check").await {
        Ok(s) => s,
        Err(e) => {
            return vec![Finding::unchecked(&place, "connection", endpoint, e.to_string())
                .fix("check that the server runs and takes connections from here, and the DSN's user, password, database and TLS parameters")]
        }
    };
    let mut out = Vec::new();
    match read_server(config, node, &sql).await {
        Ok((server, needs)) => {
            out.push(rules::server_version(&place, &server));
            out.extend(rules::settings(&place, &server));
            out.push(rules::replication_slots(&place, &server, &needs));
            out.push(rules::replication_origins(&place, &server, &needs));
            out.push(rules::wal_senders(&place, &server, &needs));
            out.push(rules::connections(&place, &server, &needs));
        }
        Err(e) => out.push(Finding::unchecked(&place, "server", "settings", e.to_string())),
    }
    let tables = match read_tables(config, node, &sql).await {
        Ok(t) => {
            out.extend(rules::primary_keys(&place, &t));
            out.extend(rules::replica_identity(&place, &t));
            Some(t)
        }
        Err(e) => {
            out.push(Finding::unchecked(
                &place,
                "primary_key",
                "replication.tables",
                e.to_string(),
            ));
            None
        }
    };
    let role = match read_role(&sql).await {
        Ok(role) => {
            let needs_superuser = if config.replication.ddl {
                Some("replication.ddl")
            } else if !config.replication.schemas.is_empty() {
                Some("replication.schemas")
            } else {
                None
            };
            out.extend(rules::privileges(
                &place,
                &role,
                tables.as_deref().unwrap_or_default(),
                needs_superuser,
            ));
            Some(role)
        }
        Err(e) => {
            out.push(Finding::unchecked(&place, "privileges", "role", e.to_string()));
            None
        }
    };
    // init's refusals of a slot or origin of the node's names held by something else. Probing
    // an origin takes the origin functions; without them the privileges finding says enough.
    match crate::init::check_slot(config, node, &sql).await {
        Ok(Some(refusal)) => out.push(Finding::problem(
            &place,
            "slot_owner",
            naming::slot_name(&config.cluster.name, &node.name),
            strip_place(&refusal),
        )),
        Ok(None) => {}
        Err(e) => out.push(Finding::unchecked(&place, "slot_owner", "slot", format!("{e:#}"))),
    }
    let may_probe_origins = role.as_ref().is_some_and(|r| {
        r.superuser
            || r.functions_denied
                .iter()
                .all(|f| !f.starts_with("pg_replication_origin"))
    });
    if may_probe_origins {
        match crate::init::check_origins(config, node, &sql).await {
            Ok(Some(refusal)) => out.push(Finding::problem(
                &place,
                "origin_owner",
                "replication origins",
                strip_place(&refusal),
            )),
            Ok(None) => {}
            Err(e) => out.push(Finding::unchecked(
                &place,
                "origin_owner",
                "replication origins",
                format!("{e:#}"),
            )),
        }
    }
    out
}

/// init's messages start with `node n1 (endpoint): `, which the report puts first anyway.
fn strip_place(message: &str) -> String {
    match message.split_once("): ") {
        Some((head, rest)) if head.starts_with("node ") => rest.to_string(),
        _ => message.to_string(),
    }
}

/// The application names of the sessions `pgferry run --node <node>` opens on the node
/// (capture: its own, the heartbeat's, the slot metrics'; apply: one per node it applies, the
/// conflict publisher's, the tombstone collector's).
pub fn pgferry_sessions(config: &Config, node: &NodeConfig) -> Vec<String> {
    let n = &node.name;
    let mut names = vec![
        format!("pgferry-capture-{n}"),
        format!("pgferry-heartbeat-{n}"),
        format!("pgferry-metrics-{n}"),
        format!("pgferry-apply-{n}-conflicts"),
        format!("pgferry-apply-{n}-tombstones"),
    ];
    // One session per origin stream, two when it reads groups ahead (`[apply] read_ahead`).
    let per_stream = if config.apply.read_ahead { 2 } else { 1 };
    for r in config.sources(node) {
        for _ in 0..per_stream {
            names.push(format!("pgferry-apply-{n}-from-{}", r.name));
        }
    }
    names
}

async fn read_server(config: &Config, node: &NodeConfig, sql: &PgSession) -> Result<(ServerFacts, NodeNeeds), PgError> {
    let r = sql
        .client
        .query_one(
            "SELECT current_setting('server_version_num')::int,
                    current_setting('server_version'),
                    current_setting('wal_level'),
                    current_setting('track_commit_timestamp'),
                    current_setting('max_replication_slots')::bigint,
                    (SELECT count(*) FROM pg_replication_slots),
                    CASE WHEN current_setting('max_active_replication_origins', true) IS NULL
                         THEN 'max_replication_slots' ELSE 'max_active_replication_origins' END,
                    coalesce(current_setting('max_active_replication_origins', true),
                             current_setting('max_replication_slots'))::bigint,
                    current_setting('max_wal_senders')::bigint,
                    (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'),
                    current_setting('max_connections')::bigint,
                    CASE WHEN (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN 0
                         ELSE current_setting('superuser_reserved_connections')::bigint
                              + coalesce(current_setting('reserved_connections', true), '0')::bigint END,
                    (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')",
            &[],
        )
        .await
        .map_err(sql.err("reading the server's settings"))?;
    let slot = naming::slot_name(&config.cluster.name, &node.name);
    let slot_row = sql
        .client
        .query_opt("SELECT active FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .map_err(sql.err(format!("looking up replication slot {slot}")))?;
    let origins: Vec<String> = config
        .nodes
        .iter()
        .filter(|o| o.name != node.name)
        .map(|o| naming::replication_origin(&config.cluster.name, &node.name, &o.name))
        .collect();
    // pg_replication_origin_status is for superusers unless granted: counted when readable.
    let status = sql
        .client
        .query_one(
            "SELECT count(*), coalesce(array_agg(external_id) FILTER (WHERE external_id = ANY($1)), '{}')
             FROM pg_replication_origin_status",
            &[&origins],
        )
        .await;
    let (origins_in_use, with_progress): (Option<i64>, Vec<String>) = match status {
        Ok(row) => (Some(row.get(0)), row.get(1)),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => (None, Vec::new()),
        Err(e) => return Err(sql.err("reading pg_replication_origin_status")(e)),
    };
    let sessions = pgferry_sessions(config, node);
    // PostgreSQL keeps the first 63 bytes of an application name.
    let open: i64 = sql
        .client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = ANY(SELECT left(n, 63) FROM unnest($1::text[]) n)",
            &[&sessions],
        )
        .await
        .map_err(sql.err("counting pgferry's sessions"))?
        .get(0);
    let server = ServerFacts {
        version_num: r.get(0),
        version: r.get(1),
        wal_level: r.get(2),
        track_commit_timestamp: r.get(3),
        max_replication_slots: r.get(4),
        slots_in_use: r.get(5),
        origins_setting: r.get(6),
        max_origins: r.get(7),
        origins_in_use,
        max_wal_senders: r.get(8),
        wal_senders_in_use: r.get(9),
        max_connections: r.get(10),
        reserved_connections: r.get(11),
        connections_in_use: r.get(12),
    };
    let needs = NodeNeeds {
        slot,
        slot_exists: slot_row.is_some(),
        slot_active: slot_row.is_some_and(|r| r.get::<_, bool>(0)),
        origins_without_progress: origins.into_iter().filter(|o| !with_progress.contains(o)).collect(),
        sessions: sessions.len() as i64,
        sessions_open: open,
    };
    Ok((server, needs))
}

async fn read_tables(config: &Config, node: &NodeConfig, sql: &PgSession) -> Result<Vec<TableFacts>, PgError> {
    let mut out = Vec::new();
    for (schema, table) in postgres::replicated_tables(config, node, sql).await? {
        let row = sql
            .client
            .query_opt(
                "SELECT c.relkind::text,
                        EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
                        c.relreplident::text,
                        pg_has_role(c.relowner, 'USAGE'),
                        array_remove(ARRAY[
                            CASE WHEN NOT has_table_privilege(c.oid, 'SELECT') THEN 'SELECT' END,
                            CASE WHEN NOT has_table_privilege(c.oid, 'INSERT') THEN 'INSERT' END,
                            CASE WHEN NOT has_table_privilege(c.oid, 'UPDATE') THEN 'UPDATE' END,
                            CASE WHEN NOT has_table_privilege(c.oid, 'DELETE') THEN 'DELETE' END,
                            CASE WHEN NOT has_table_privilege(c.oid, 'TRUNCATE') THEN 'TRUNCATE' END], NULL),
                        coalesce((SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a
                                  WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                                    AND a.attlen = -1 AND a.attstorage IN ('x', 'e')), '{}')
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&schema, &table],
            )
            .await
            .map_err(sql.err(format!("looking up table {schema}.{table}")))?;
        let delta_columns = config.delta_columns(&schema, &table);
        out.push(match row {
            None => TableFacts {
                schema,
                table,
                kind: None,
                has_primary_key: false,
                replica_identity: String::new(),
                delta_columns,
                toast_columns: Vec::new(),
                owned: false,
                missing_privileges: Vec::new(),
            },
            Some(r) => TableFacts {
                schema,
                table,
                kind: Some(r.get(0)),
                has_primary_key: r.get(1),
                replica_identity: r.get(2),
                delta_columns,
                owned: r.get(3),
                missing_privileges: r.get(4),
                toast_columns: r.get(5),
            },
        });
    }
    Ok(out)
}

async fn read_role(sql: &PgSession) -> Result<RoleFacts, PgError> {
    let r = sql
        .client
        .query_one(
            "SELECT current_user::text, current_database()::text, r.rolsuper, r.rolreplication,
                    has_database_privilege(current_database(), 'CREATE'),
                    coalesce((SELECT array_agg(f) FROM unnest($1::text[]) f
                              WHERE to_regprocedure(f) IS NOT NULL AND NOT has_function_privilege(f, 'EXECUTE')), '{}')
             FROM pg_roles r WHERE r.rolname = current_user",
            &[&rules::FUNCTIONS],
        )
        .await
        .map_err(sql.err("reading the role's attributes and privileges"))?;
    // Whether the role may write as a replica, as apply does: tried, and rolled back.
    sql.client
        .batch_execute("BEGIN")
        .await
        .map_err(sql.err("starting a transaction"))?;
    let probe = sql
        .client
        .batch_execute("SET LOCAL session_replication_role = replica")
        .await;
    sql.client
        .batch_execute("ROLLBACK")
        .await
        .map_err(sql.err("rolling back"))?;
    let replica_role_refused = match probe {
        Ok(()) => None,
        Err(e) if e.as_db_error().is_some() => Some(postgres::detail(&e)),
        Err(e) => return Err(sql.err("setting session_replication_role")(e)),
    };
    Ok(RoleFacts {
        name: r.get(0),
        database: r.get(1),
        superuser: r.get(2),
        replication: r.get(3),
        create_on_database: r.get(4),
        functions_denied: r.get(5),
        replica_role_refused,
    })
}
