//! Apply's error type.

use pgferry_connectors::config::OnError;
use pgferry_connectors::kafka::KafkaError;
use pgferry_connectors::postgres::PgError;
use pgferry_connectors::registry::RegistryError;
use pgferry_schemas::CodecError;
use thiserror::Error;

/// Why apply stopped. Every variant names the system, endpoint, origin or table involved.
#[derive(Debug, Error)]
pub enum ApplyError {
    /// The node is not in the configuration or not initialized.
    #[error("node {node}: {message}")]
    Setup { node: String, message: String },
    /// PostgreSQL.
    #[error(transparent)]
    Pg(#[from] PgError),
    /// Kafka.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// The schema registry.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// An event that does not decode.
    #[error("origin {origin}, {topic}/{partition} offset {offset}: undecodable event: {source}")]
    Decode {
        origin: String,
        topic: String,
        partition: i32,
        offset: i64,
        source: CodecError,
    },
    /// A change that cannot be written.
    #[error("origin {origin}: table {table}: {message}")]
    Write {
        origin: String,
        table: String,
        message: String,
    },
    /// A change names a table or column this node does not have yet while DDL replication is
    /// on: the DDL that creates it may still be on its way in another origin's stream, so the
    /// change's origin waits for it (its stream retries) instead of dead-lettering the change.
    #[error("origin {origin}: table {table}: {message}; waiting for the DDL that creates it (DDL replication is on)")]
    NotYet {
        origin: String,
        table: String,
        message: String,
    },
    /// A message apply can never use (no or unknown origin, unknown kind, an origin routed
    /// through another partition): it goes to the dead-letter topic.
    #[error("{topic}/{partition} (partition of {source_node}) offset {offset}: {message}")]
    Unusable {
        source_node: String,
        topic: String,
        partition: i32,
        offset: i64,
        message: String,
    },
    /// A conflict under the `error` resolver: the stream stops until an operator acts.
    #[error("origin {origin}: table {table}: {message}")]
    ConflictStop {
        origin: String,
        table: String,
        message: String,
    },
    /// PostgreSQL rejected a change for its data; the table's `on_error` says what happens.
    #[error("origin {origin}: table {table}: change rejected (on_error = {}): {source}", .on_error.name())]
    Rejected {
        origin: String,
        table: String,
        on_error: OnError,
        source: PgError,
    },
    /// The stream broke the transaction framing (e.g. a new transaction before the last ended).
    #[error("{topic}/{partition} (partition of {source_node}) offset {offset}: {message}")]
    Stream {
        source_node: String,
        topic: String,
        partition: i32,
        offset: i64,
        message: String,
    },
}

impl ApplyError {
    /// Whether the message that caused this can never be applied as it is, so it belongs in
    /// the dead-letter topic (the stream goes on) rather than stopping the stream (retried).
    pub fn dead_letter(&self) -> bool {
        matches!(self, ApplyError::Decode { .. } | ApplyError::Unusable { .. } | ApplyError::Write { .. })
    }

    /// Whether this waits for DDL from another origin ([`ApplyError::NotYet`]): its stream
    /// retries as soon as another stream of the node has applied DDL, not only after its backoff.
    pub fn waits_for_ddl(&self) -> bool {
        matches!(self, ApplyError::NotYet { .. })
    }
}
