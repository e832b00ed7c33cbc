//! The apply service of one node.
//!
//! Contract (DESIGN.md, "Apply"): read every other node's partition of every region topic the
//! node reads (`read_regions`) with `read_committed`, one task and one PostgreSQL session per
//! partition (partitions apply in parallel). A partition carries its node's transactions and
//! those it forwards; events of this node's own origin are ignored.
//! Source transactions are applied under the replication origin
//! `pgferry_<cluster>_<node>_from_<origin>` (`pgferry_schemas::naming`) with
//! `pg_replication_origin_xact_setup(commit_lsn, commit_ts)`, writing `pgferry.apply_progress` in
//! the same local transaction, so a restart resumes exactly where the last commit left off and
//! anything at or below the recorded commit LSN is a duplicate. Consecutive transactions of one
//! origin that have already arrived are applied as one group (module `group`: read, decide, write
//! set-based), with the outcome of applying them one by one; everything else goes one by one.
//! [`metrics`] counts what each origin's committed transactions wrote and tracks each origin's
//! lag and whether its stream runs. A stream that fails (a change it cannot apply yet, a lost
//! session) rolls back, waits and retries alone (`origin_retry`) while the others go on.
//! Beside the streams, [`conflict_publisher`] publishes `pgferry.conflicts` to
//! `<cluster>.conflicts` and [`tombstone_gc`] drops tombstones every origin has passed.

mod clock_skew;
mod conflict;
pub mod conflict_publisher;
mod dead_letter;
pub mod ddl;
mod error;
mod group;
pub mod metrics;
mod origin_retry;
mod partition_stream;
mod progress;
pub mod replay;
pub mod replica_role;
mod service;
pub mod tombstone_gc;
mod writer;

pub use conflict::{stamp_override_or, tombstone_trigger_sql, SCHEMA_SQL as CONFLICT_SCHEMA_SQL};
pub use error::ApplyError;
pub use metrics::ApplyMetrics;
pub use progress::format_lsn;
pub use service::{run, ApplyOptions};
