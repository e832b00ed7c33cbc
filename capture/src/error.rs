//! Capture's error type.

use pgferry_connectors::kafka::KafkaError;
use pgferry_connectors::postgres::PgError;
use pgferry_connectors::registry::RegistryError;
use pgferry_connectors::replication::ReplicationError;
use pgferry_schemas::CodecError;
use thiserror::Error;

/// Why capture stopped. Every variant names the system and endpoint involved.
#[derive(Debug, Error)]
pub enum CaptureError {
    /// The node is not in the configuration or not initialized.
    #[error("node {node}: {message}")]
    Setup { node: String, message: String },
    /// PostgreSQL (SQL session).
    #[error(transparent)]
    Pg(#[from] PgError),
    /// The replication stream.
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// Kafka.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// The schema registry.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A change that cannot be encoded (table, column and value named).
    #[error("encoding a change of {table}: {source}")]
    Encode { table: String, source: CodecError },
    /// A pgoutput message that makes no sense where it came.
    #[error("protocol: {0}")]
    Protocol(String),
}
