//! The capture service of one node.
//!
//! Contract (DESIGN.md, "Capture"): stream the node's slot (pgoutput), skip transactions that
//! carry a replication origin (pgferry applied them), turn each row change into an Avro
//! envelope and produce it, inside a Kafka transaction, to the node's own partition of its
//! region topic. The slot position is confirmed only after the Kafka transaction holding that
//! commit is committed; after a restart, transactions at or below the last commit LSN found in
//! the partition are skipped, so each source transaction is in Kafka exactly once.
//! TRUNCATE travels as a fixed `pgferry.Truncate` record in transaction order; a heartbeat
//! record every few seconds keeps an idle slot advancing. [`metrics`] counts what is committed
//! to Kafka and says whether capture is healthy.

mod error;
pub mod metrics;
mod relations;
mod service;

pub use error::CaptureError;
pub use metrics::CaptureMetrics;
pub use service::{check_delta_tables, run, CaptureOptions};
