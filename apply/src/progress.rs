//! `pgferry.apply_progress` and replication origins: where each origin's stream was applied to.

use pgferry_connectors::postgres::PgSession;

use crate::error::ApplyError;

/// The replication origin that marks rows written from node `origin`.
pub fn origin_name(origin: &str) -> String {
    format!("pgferry_{origin}")
}

/// What has been applied from one origin partition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Kafka offset of the last message of the last applied transaction.
    pub kafka_offset: Option<i64>,
    /// Commit LSN (on the origin) of the last applied transaction.
    pub commit_lsn: u64,
}

/// Reads the progress of `origin` on `topic`/`partition`.
pub async fn read(sql: &PgSession, origin: &str, topic: &str, partition: i32) -> Result<Progress, ApplyError> {
    let row = sql
        .client
        .query_opt(
            "SELECT kafka_offset, (commit_lsn - '0/0'::pg_lsn)::text FROM pgferry.apply_progress
             WHERE origin = $1 AND topic = $2 AND partition = $3",
            &[&origin, &topic, &partition],
        )
        .await
        .map_err(sql.err("reading pgferry.apply_progress (was `pgferry init` run?)"))?;
    Ok(match row {
        None => Progress::default(),
        Some(r) => Progress {
            kafka_offset: Some(r.get(0)),
            commit_lsn: r.get::<_, String>(1).parse().unwrap_or(0),
        },
    })
}

/// The statement that records progress inside the applying transaction.
/// Parameters: origin, topic, partition, kafka_offset, commit_lsn (text `X/Y`), commit_ts_us.
pub const UPSERT: &str = "INSERT INTO pgferry.apply_progress AS p
      (origin, topic, partition, kafka_offset, commit_lsn, commit_ts, applied_at)
    VALUES ($1, $2, $3, $4, $5::text::pg_lsn, 'epoch'::timestamptz + $6::bigint * interval '1 microsecond', clock_timestamp())
    ON CONFLICT (origin, topic, partition) DO UPDATE
      SET kafka_offset = EXCLUDED.kafka_offset, commit_lsn = EXCLUDED.commit_lsn,
          commit_ts = EXCLUDED.commit_ts, applied_at = EXCLUDED.applied_at";

/// PostgreSQL's `X/Y` text form of an LSN.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}
