//! The apply service of one node.
//!
//! Contract (DESIGN.md, "Apply"): read every other node's partition of every region topic with
//! `read_committed`, one task and one PostgreSQL session per origin (origins apply in parallel).
//! Each source transaction becomes exactly one local transaction run under the replication
//! origin `pgferry_<origin>` with `pg_replication_origin_xact_setup(commit_lsn, commit_ts)`, and
//! writes `pgferry.apply_progress` in the same transaction, so a restart resumes exactly where
//! the last commit left off and anything at or below the recorded commit LSN is a duplicate.
//! [`metrics`] counts what each origin's committed transactions wrote and tracks each origin's
//! lag and whether its stream runs.

mod error;
pub mod metrics;
mod origin_stream;
mod progress;
mod service;
mod writer;

pub use error::ApplyError;
pub use metrics::ApplyMetrics;
pub use progress::origin_name;
pub use service::{run, ApplyOptions};
