//! Applying a TRUNCATE (issue 16, scenario 6; docs/decisions.md "Truncate across origins").
//!
//! The tables one TRUNCATE statement named on the origin arrive as consecutive truncate events
//! of its transaction; they are truncated here in one statement too (one at a time, a table
//! that another of them references by a foreign key refuses it: 0A000).
//!
//! A truncate is a delete of every row of its tables dated by its commit (time, then node id, as
//! last-update-wins compares). Rows whose stamp is newer — written here, locally or by another
//! origin, after the truncate happened on its origin but before it arrived — stay: where they
//! arrived after it they win against it too. So when any table of the statement has such a row,
//! the older rows are deleted instead (each leaves its tombstone, dated by the truncate); else the
//! tables are truncated. Then the table's truncation (`pgferry.truncations`) is dated by the
//! truncate if that is newer than the one recorded, so that changes older than it that arrive
//! later lose against it like against a tombstone of every key.

use pgferry_connectors::postgres::{quote_ident, table_columns, PgSession};
use pgferry_schemas::truncate::Truncate;
use tokio_postgres::types::ToSql;

use super::Writer;
use crate::conflict::{stamp_override_or, Stamp};
use crate::error::ApplyError;

/// A table of a truncate, as it is applied.
struct Truncated {
    /// `schema.table`, unquoted (the name in `pgferry.truncations`).
    name: String,
    /// `"schema"."table"`.
    qualified: String,
    /// The rows' stamps, compared with the truncate's ([`rows_against`]).
    rows: String,
}

/// Every row of `qualified` (`t`), as `row_id` (its ctid) and `newer`: whether its stamp is newer
/// than the truncate's (`$2` commit time, `$3` node id; NULL: a row without a commit time, written
/// by this transaction or too old to have one). The stamp is read as conflict checks read it: the
/// override in `pgferry.row_stamps` (NULL included: `stamp_override_or`) or the writing group's
/// record (`pgferry.group_stamp`) where the version has one, else its commit time; the node id of its origin from `$4`/`$5` (node
/// names and ids) and `$6`/`$7` (replication origin ids and node names). `$1` is the table's name,
/// `key` the row's key in the tombstone trigger's form.
fn rows_against(qualified: &str, key: &str) -> String {
    let ts = stamp_override_or(
        "s",
        "ts_us",
        "coalesce(CASE WHEN EXISTS (SELECT FROM pgferry.xact_stamp_groups g WHERE g.xid = t.xmin::text::int8)
                       THEN pgferry.group_stamp($1::text, k.key, t.xmin) END,
                  (extract(epoch FROM c.timestamp) * 1000000)::int8)",
    );
    format!(
        "SELECT t.ctid AS row_id, (v.ts > $2::int8 OR (v.ts = $2::int8 AND v.node > $3::int4)) AS newer
         FROM {qualified} t
         CROSS JOIN LATERAL (SELECT {key} AS key) k
         LEFT JOIN LATERAL pg_xact_commit_timestamp_origin(t.xmin) c ON true
         LEFT JOIN LATERAL (
              SELECT s.xid, s.ts_us, s.origin FROM pgferry.row_stamps s
              WHERE EXISTS (SELECT FROM pgferry.stamped_xacts x WHERE x.xid = t.xmin::text::int8)
                AND s.tbl = $1::text AND s.key = k.key AND s.xid % 4294967296 = t.xmin::text::int8
              OFFSET 0) s ON true
         CROSS JOIN LATERAL (SELECT
              {ts} AS ts,
              coalesce((SELECT n.id FROM unnest($4::text[], $5::int4[]) AS n(name, id)
                        WHERE n.name = coalesce(s.origin,
                              (SELECT o.name FROM unnest($6::int8[], $7::text[]) AS o(r, name) WHERE o.r = c.roident::int8))),
                       0) AS node) v"
    )
}

/// The parameters of [`rows_against`]: the table's name, then the truncate's commit time and
/// node id, the node names and ids, the replication origin ids and their node names.
type Common = (i64, i32, Vec<String>, Vec<i32>, Vec<i64>, Vec<String>);

fn row_params<'a>(name: &'a String, c: &'a Common) -> [&'a (dyn ToSql + Sync); 7] {
    [name, &c.0, &c.1, &c.2, &c.3, &c.4, &c.5]
}

impl Writer {
    /// Whether a truncate event of `t`'s table is applied here (false: the table is held only
    /// in another region); an error for a table outside this node's replication sets. Checked
    /// as each event arrives, so that an error names its message.
    pub fn truncate_applies(&mut self, t: &Truncate) -> Result<bool, ApplyError> {
        if self.local_elsewhere(&t.schema, &t.table) {
            return Ok(false);
        }
        if !self.in_sets(&t.schema, &t.table) {
            return Err(ApplyError::Write {
                origin: t.origin.clone(),
                table: format!("{}.{}", t.schema, t.table),
                message: "not in this node's replication set".into(),
            });
        }
        Ok(true)
    }

    /// Applies the truncate events of one TRUNCATE statement (`ts`: consecutive events of one
    /// source transaction, with the same options, each accepted by [`Writer::truncate_applies`])
    /// inside the caller's open transaction: see the module doc. Tables the origin truncated by
    /// CASCADE arrive as their own events, so the local statement never cascades: it cannot reach
    /// tables outside the replication set.
    pub async fn truncate(&mut self, sql: &PgSession, ts: &[Truncate]) -> Result<(), ApplyError> {
        let Some(first) = ts.first() else { return Ok(()) };
        let remote = Stamp {
            ts_us: first.ts_us,
            node_id: self.config.node(&first.origin).map_or(0, |n| n.id),
        };
        self.load_origins(sql).await?;
        let (node_names, node_ids): (Vec<String>, Vec<i32>) = self
            .config
            .nodes
            .iter()
            .map(|n| (n.name.clone(), i32::from(n.id)))
            .unzip();
        let (roidents, origin_names): (Vec<i64>, Vec<String>) = self
            .origins
            .iter()
            .map(|(r, n)| (*r, n.clone()))
            .chain([(0, self.local.0.clone())])
            .unzip();
        let remote_node = i32::from(remote.node_id);
        let mut tables = Vec::new();
        for t in ts {
            let name = format!("{}.{}", t.schema, t.table);
            let Some(cols) = table_columns(sql, &t.schema, &t.table).await? else {
                let message = format!("table does not exist at {}", sql.endpoint);
                return Err(if self.config.replication.ddl {
                    ApplyError::NotYet {
                        origin: t.origin.clone(),
                        table: name,
                        message,
                    }
                } else {
                    ApplyError::Write {
                        origin: t.origin.clone(),
                        table: name,
                        message,
                    }
                });
            };
            let key: Vec<String> = cols.key.iter().map(|k| format!("t.{}", quote_ident(k))).collect();
            let qualified = format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.table));
            // A table without a primary key has no stamps to keep apart: all of it goes.
            let key = match key.is_empty() {
                true => "NULL::jsonb".to_string(),
                false => format!("jsonb_build_array({})", key.join(", ")),
            };
            let rows = rows_against(&qualified, &key);
            tables.push(Truncated { name, qualified, rows });
        }
        let common = (first.ts_us, remote_node, node_names, node_ids, roidents, origin_names);
        let params = |name| row_params(name, &common);
        let mut keep_newer = false;
        for t in &tables {
            let newer: bool = sql
                .client
                .query_one(
                    &format!("SELECT EXISTS (SELECT 1 FROM ({}) r WHERE r.newer)", t.rows),
                    &params(&t.name),
                )
                .await
                .map_err(sql.err(format!("reading the rows of {} newer than a truncate", t.name)))?
                .get(0);
            keep_newer |= newer;
        }
        if keep_newer {
            // Rows newer than the truncate stay; the older ones are deleted (foreign keys are
            // not enforced on applied rows: `crate::replica_role`).
            for t in &tables {
                sql.client
                    .execute(
                        &format!(
                            "DELETE FROM {} d WHERE d.ctid IN (SELECT r.row_id FROM ({}) r WHERE r.newer IS NOT TRUE)",
                            t.qualified, t.rows
                        ),
                        &params(&t.name),
                    )
                    .await
                    .map_err(sql.err(format!("deleting the rows of {} older than a truncate", t.name)))?;
            }
            tracing::info!(origin = %first.origin, tables = ?tables.iter().map(|t| &t.name).collect::<Vec<_>>(),
                "truncate applied as a delete of the rows older than it (newer rows were written here since)");
        } else {
            let restart = if first.restart_identity {
                " RESTART IDENTITY"
            } else {
                ""
            };
            let all: Vec<&str> = tables.iter().map(|t| t.qualified.as_str()).collect();
            sql.client
                .batch_execute(&format!("TRUNCATE TABLE {}{restart}", all.join(", ")))
                .await
                .map_err(sql.err(format!(
                    "truncating {}",
                    tables.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ")
                )))?;
        }
        for t in &tables {
            self.date_truncation(sql, &t.name, remote).await?;
        }
        Ok(())
    }

    /// Dates `table`'s truncation by this transaction (whose commit time and origin are the
    /// truncate's, `remote`) unless the one recorded is newer.
    async fn date_truncation(&mut self, sql: &PgSession, table: &str, remote: Stamp) -> Result<(), ApplyError> {
        let recorded = sql
            .client
            .query_opt(
                "SELECT (extract(epoch FROM c.timestamp) * 1000000)::int8, c.roident::int8
                 FROM pgferry.truncations tr, pg_xact_commit_timestamp_origin((tr.xid % 4294967296)::text::xid) c
                 WHERE tr.tbl = $1",
                &[&table],
            )
            .await
            .map_err(sql.err(format!("reading the truncation of {table}")))?;
        let recorded = match recorded
            .as_ref()
            .map(|r| (r.get::<_, Option<i64>>(0), r.get::<_, Option<i64>>(1)))
        {
            Some((ts, Some(roident))) => {
                let origin = self.origin_of(sql, roident).await?;
                self.stamp(ts, origin.as_deref())
            }
            _ => None,
        };
        if recorded.is_none_or(|r| remote > r) {
            sql.client
                .execute(
                    "INSERT INTO pgferry.truncations (tbl, xid) VALUES ($1, txid_current())
                     ON CONFLICT (tbl) DO UPDATE SET xid = EXCLUDED.xid",
                    &[&table],
                )
                .await
                .map_err(sql.err(format!("dating the truncation of {table}")))?;
        }
        Ok(())
    }
}
