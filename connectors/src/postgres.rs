//! SQL sessions to PostgreSQL nodes (tokio-postgres), with errors that name the endpoint.
//! TLS follows the DSN's libpq parameters (`sslmode`, `sslrootcert`, …; see [`crate::pg_tls`]).

use std::str::FromStr;
use std::time::Duration;

use thiserror::Error;
use tokio_postgres::error::{DbError, Severity};
use tokio_postgres::{AsyncMessage, Client};

use crate::pg_tls::TlsDsn;
use crate::redact::dsn_endpoint;

/// A PostgreSQL failure, naming the node's endpoint (never its password).
#[derive(Debug, Error)]
pub enum PgError {
    /// The DSN is not a valid connection string.
    #[error("invalid PostgreSQL DSN for {endpoint}: {message}")]
    Dsn { endpoint: String, message: String },
    /// The DSN's TLS parameters cannot be used (an unreadable certificate file, say).
    #[error("PostgreSQL at {endpoint}: TLS: {message}")]
    Tls { endpoint: String, message: String },
    /// The server did not answer or refused the session.
    #[error("cannot connect to PostgreSQL at {endpoint}: {}", detail(.source))]
    Connect {
        endpoint: String,
        source: tokio_postgres::Error,
    },
    /// A statement failed.
    #[error("PostgreSQL at {endpoint}: {what}: {}", detail(.source))]
    Query {
        endpoint: String,
        what: String,
        source: tokio_postgres::Error,
    },
}

impl PgError {
    /// The server's SQLSTATE, when the server refused a statement.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            PgError::Query { source, .. } | PgError::Connect { source, .. } => {
                source.as_db_error().map(|d| d.code().code())
            }
            PgError::Dsn { .. } | PgError::Tls { .. } => None,
        }
    }

    /// Whether the server refused the statement because of the data it carried (a constraint,
    /// a value the type refuses, a trigger that raised, a column or type missing), as opposed
    /// to a transient or environmental failure (connection, deadlock, lock timeout, disk full,
    /// shutdown, permissions) that a retry can get past.
    pub fn rejects_data(&self) -> bool {
        match self.sqlstate() {
            Some("42501") => false,
            Some(s) => ["22", "23", "42", "44", "P0"].iter().any(|class| s.starts_with(class)),
            None => false,
        }
    }
}

/// A tokio-postgres error with the server's message and SQLSTATE when there is one (its own
/// `Display` says only "db error").
pub fn detail(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

impl PgError {
    /// The SQLSTATE of the server error, if the failure came from the server.
    pub fn code(&self) -> Option<&tokio_postgres::error::SqlState> {
        match self {
            PgError::Connect { source, .. } | PgError::Query { source, .. } => source.code(),
            PgError::Dsn { .. } | PgError::Tls { .. } => None,
        }
    }
}

/// An open session plus the endpoint used in error messages.
pub struct PgSession {
    /// The tokio-postgres client.
    pub client: Client,
    /// `host:port/db`.
    pub endpoint: String,
}

impl PgSession {
    /// Wraps a failed statement with the endpoint and what was being done.
    pub fn err(&self, what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> PgError + '_ {
        let what = what.into();
        move |source| PgError::Query {
            endpoint: self.endpoint.clone(),
            what,
            source,
        }
    }
}

/// Opens a session (10 s connect timeout unless the DSN sets one) with `application_name`.
/// The session runs with `TimeZone=UTC` and ISO `DateStyle`, the forms pgferry reads and writes.
pub async fn connect(dsn: &str, application_name: &str) -> Result<PgSession, PgError> {
    connect_with(dsn, |config| {
        config.application_name(application_name);
        config.options("-c TimeZone=UTC -c DateStyle=ISO,YMD -c IntervalStyle=postgres -c extra_float_digits=1");
    })
    .await
}

/// Opens a session (10 s connect timeout unless the DSN sets one) after `tweak` has adjusted
/// the parsed DSN; TLS as the DSN's `sslmode` and friends say.
pub async fn connect_with(dsn: &str, tweak: impl FnOnce(&mut tokio_postgres::Config)) -> Result<PgSession, PgError> {
    let endpoint = dsn_endpoint(dsn);
    let dsn_error = |message: String| PgError::Dsn {
        endpoint: endpoint.clone(),
        message,
    };
    let split = TlsDsn::parse(dsn).map_err(dsn_error)?;
    let mut config = tokio_postgres::Config::from_str(&split.dsn).map_err(|e| dsn_error(e.to_string()))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    config.ssl_mode(split.tls.postgres_mode());
    tweak(&mut config);
    let tls = split.tls.connector().map_err(|message| PgError::Tls {
        endpoint: endpoint.clone(),
        message,
    })?;
    let (client, mut connection) = config.connect(tls).await.map_err(|source| PgError::Connect {
        endpoint: endpoint.clone(),
        source,
    })?;
    let ep = endpoint.clone();
    // Polled by hand rather than awaited: awaiting the connection logs every server notice at
    // INFO (`event trigger … does not exist, skipping` and the like).
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notice(notice))) => log_notice(&ep, &notice),
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(endpoint = %ep, error = %e, "PostgreSQL session ended");
                    break;
                }
                None => break,
            }
        }
    });
    Ok(PgSession { client, endpoint })
}

/// Logs a server notice: a `WARNING` as a warning, anything else (`NOTICE`, `INFO`, `LOG`,
/// `DEBUG`) at debug level, seen with `PGFERRY_LOG=debug`.
fn log_notice(endpoint: &str, notice: &DbError) {
    if notice.parsed_severity() == Some(Severity::Warning) || notice.severity() == "WARNING" {
        tracing::warn!(endpoint, "PostgreSQL {}: {}", notice.severity(), notice.message());
    } else {
        tracing::debug!(endpoint, "PostgreSQL {}: {}", notice.severity(), notice.message());
    }
}

/// Quotes an identifier for SQL (`"a""b"`).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal for SQL (`'it''s'`), for utility statements that take no parameters.
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// A table's columns as the server describes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableColumns {
    /// `(name, SQL type as format_type gives it)` in attribute order.
    pub columns: Vec<(String, String)>,
    /// Primary-key columns in key order (empty: no primary key).
    pub key: Vec<String>,
    /// The columns of each other unique constraint or index that can collide (immediate, on
    /// plain columns, not partial), in index order.
    pub unique_keys: Vec<Vec<String>>,
}

/// The columns and primary key of `schema.table`; `None` when the table does not exist.
pub async fn table_columns(sql: &PgSession, schema: &str, table: &str) -> Result<Option<TableColumns>, PgError> {
    let rows = sql
        .client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                    array_position(i.indkey::int2[], a.attnum)
             FROM pg_attribute a
             JOIN pg_class c ON c.oid = a.attrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
            &[&schema, &table],
        )
        .await
        .map_err(sql.err(format!("reading columns of {schema}.{table}")))?;
    if rows.is_empty() {
        return Ok(None);
    }
    let mut key: Vec<(i32, String)> = Vec::new();
    let mut columns = Vec::with_capacity(rows.len());
    for r in rows {
        let name: String = r.get(0);
        if let Some(pos) = r.get::<_, Option<i32>>(2) {
            key.push((pos, name.clone()));
        }
        columns.push((name, r.get::<_, String>(1)));
    }
    key.sort();
    let unique_keys = sql
        .client
        .query(
            "SELECT array_agg(a.attname::text ORDER BY k.ord)
             FROM pg_index i
             JOIN pg_class c ON c.oid = i.indrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
             WHERE n.nspname = $1 AND c.relname = $2 AND i.indisunique AND NOT i.indisprimary
               AND i.indimmediate AND i.indexprs IS NULL AND i.indpred IS NULL AND k.ord <= i.indnkeyatts
             GROUP BY i.indexrelid ORDER BY i.indexrelid",
            &[&schema, &table],
        )
        .await
        .map_err(sql.err(format!("reading unique indexes of {schema}.{table}")))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(Some(TableColumns {
        columns,
        key: key.into_iter().map(|(_, n)| n).collect(),
        unique_keys,
    }))
}

/// Creates the replication origin `name` unless it exists (origins are server-wide); whether
/// it created it (`false`: it was there).
pub async fn create_replication_origin(sql: &PgSession, name: &str) -> Result<bool, PgError> {
    let created = sql
        .client
        .execute(
            "SELECT pg_replication_origin_create($1) WHERE NOT EXISTS
               (SELECT 1 FROM pg_replication_origin WHERE roname = $1)",
            &[&name],
        )
        .await
        .map_err(sql.err(format!("creating replication origin {name}")))?;
    Ok(created == 1)
}

/// The tables `node` replicates now: those `replication.tables` names, and those of its
/// database that one of its patterns matches or that lie in a schema replicated whole (none
/// local to another region), in that order.
pub async fn replicated_tables(
    config: &crate::config::Config,
    node: &crate::config::NodeConfig,
    sql: &PgSession,
) -> Result<Vec<(String, String)>, PgError> {
    let mut tables = config.node_tables(node);
    if config.table_patterns().is_empty() && config.replication.schemas.is_empty() {
        return Ok(tables);
    }
    let rows = sql
        .client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_tables
             WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'pgferry') ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(sql.err("listing the tables that replication.tables patterns and replication.schemas take"))?;
    for r in rows {
        let (schema, table): (String, String) = (r.get(0), r.get(1));
        if config.node_replicates(node, &schema, &table) && !tables.iter().any(|(s, t)| *s == schema && *t == table) {
            tables.push((schema, table));
        }
    }
    Ok(tables)
}

/// PostgreSQL's `X/Y` text form of an LSN.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}
