//! `pgferry.apply_progress` and replication origins: where each origin's stream was applied to.

use pgferry_connectors::postgres::PgSession;

use crate::error::ApplyError;

/// Where a partition's stream resumes: the Kafka offset after the last message applied from
/// it (whatever the origin), and each origin's commit LSN (the highest recorded for that
/// origin on any partition: the dedup key).
#[derive(Debug, Clone, Default)]
pub struct Resume {
    /// Kafka offset of the last message of the last transaction applied from this partition.
    pub kafka_offset: Option<i64>,
    /// Origin → commit LSN of its last applied transaction.
    pub origins: std::collections::HashMap<String, u64>,
}

/// Reads where `topic`/`partition` resumes.
pub async fn read(sql: &PgSession, topic: &str, partition: i32) -> Result<Resume, ApplyError> {
    let offset: Option<i64> = sql
        .client
        .query_one(
            "SELECT max(kafka_offset) FROM pgferry.apply_progress WHERE topic = $1 AND partition = $2",
            &[&topic, &partition],
        )
        .await
        .map_err(sql.err("reading pgferry.apply_progress (was `pgferry init` run?)"))?
        .get(0);
    let rows = sql
        .client
        .query(
            "SELECT origin, max(commit_lsn - '0/0'::pg_lsn)::text FROM pgferry.apply_progress GROUP BY origin",
            &[],
        )
        .await
        .map_err(sql.err("reading pgferry.apply_progress"))?;
    let mut origins = std::collections::HashMap::new();
    for r in rows {
        let lsn: String = r.get(1);
        origins.insert(r.get::<_, String>(0), lsn.parse().unwrap_or(0));
    }
    Ok(Resume {
        kafka_offset: offset,
        origins,
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

pub use pgferry_connectors::postgres::format_lsn;
