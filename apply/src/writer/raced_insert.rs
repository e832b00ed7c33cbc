//! An insert that waited for a local transaction (issue 16, scenario 13; docs/decisions.md
//! "A local delete racing an insert").
//!
//! Apply's insert checks that its key has no tombstone, in the statement's snapshot. If a local
//! transaction holds a row version at that key — it is deleting the row, or it inserted the key
//! and deletes it again —, the insert waits for it; once it commits, its version is dead and the
//! insert goes in, although the delete's tombstone (newer, perhaps, than the insert) was not in
//! the snapshot the check used. Local writers take no key lock, so the key lock between apply's
//! streams cannot prevent this. So every insert is followed, in the same pipeline, by a read of
//! the key's tombstone in a fresh snapshot: if it is another one than the insert was decided
//! against, the insert raced a delete that committed meanwhile; the insert is undone (the row
//! deleted and the tombstone given back to that delete) and the change settled again, now
//! against that tombstone.

use pgferry_connectors::postgres::PgSession;
use pgferry_schemas::DecodedEvent;
use tokio_postgres::types::ToSql;

use super::{key_json, where_key, LocalTable, Writer};
use crate::error::ApplyError;

/// The xid of the key's tombstone (NULL: none): parameters `$1..$n` the key, `$n+1` the table.
pub(super) fn tombstone_xid(table: &LocalTable) -> String {
    format!(
        "SELECT (SELECT tb.xid FROM pgferry.tombstones tb WHERE tb.tbl = ${} AND tb.key = {})",
        table.key.len() + 1,
        key_json(table, 1)
    )
}

impl Writer {
    /// Runs an insert (`text`, `params`) and reads the key's tombstone after it, pipelined;
    /// `seen` is the tombstone's xid the insert was decided against (None: none). Returns
    /// whether the row went in and stands: false when the key exists by now (nothing inserted)
    /// or when the insert raced a delete (undone: settle the change again).
    pub(super) async fn insert_unraced(
        &mut self,
        sql: &PgSession,
        ev: &DecodedEvent,
        key: &[&str],
        (text, params): (&str, &[Option<&str>]),
        seen: Option<i64>,
    ) -> Result<bool, ApplyError> {
        let id = (ev.schema.clone(), ev.table.clone());
        let check = tombstone_xid(&self.tables[&id]);
        let name = self.tables[&id].name.clone();
        let (stmt, check) = (
            self.prepared(sql, text, params.len(), ev).await?,
            self.prepared(sql, &check, key.len() + 1, ev).await?,
        );
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let mut check_params: Vec<&(dyn ToSql + Sync)> = key.iter().map(|k| k as &(dyn ToSql + Sync)).collect();
        check_params.push(&name);
        let (written, after) = futures::try_join!(
            sql.client.execute(&stmt, &refs),
            sql.client.query_one(&check, &check_params)
        )
        .map_err(sql.err(format!("{} on {}.{}", ev.op.code(), ev.schema, ev.table)))?;
        self.settle_raced(sql, ev, key, written, seen, after.get(0)).await
    }

    /// After an insert that wrote `written` rows, decided against the tombstone `seen`, with the
    /// key's tombstone `now` read after it: whether the row stands (see [`Writer::insert_unraced`]).
    pub(super) async fn settle_raced(
        &mut self,
        sql: &PgSession,
        ev: &DecodedEvent,
        key: &[&str],
        written: u64,
        seen: Option<i64>,
        now: Option<i64>,
    ) -> Result<bool, ApplyError> {
        let (true, Some(theirs)) = (written > 0, now.filter(|n| Some(*n) != seen)) else {
            return Ok(written > 0);
        };
        let id = (ev.schema.clone(), ev.table.clone());
        let table = &self.tables[&id];
        let name = table.name.clone();
        tracing::debug!(origin = %ev.origin, table = %name, "an insert raced a local delete; settling it again");
        // Deleting the row records a tombstone of this transaction (the trigger); the delete that
        // committed meanwhile keeps its own.
        let delete = format!("DELETE FROM {} WHERE {}", table.qualified, where_key(table, 1));
        let restore = format!(
            "UPDATE pgferry.tombstones SET xid = ${}::text::int8 WHERE tbl = ${} AND key = {}",
            key.len() + 2,
            key.len() + 1,
            key_json(table, 1)
        );
        let mut params: Vec<Option<&str>> = key.iter().map(|k| Some(*k)).collect();
        if self.execute(sql, &delete, &params, ev).await? != 1 {
            return Err(ApplyError::ConflictStop {
                origin: ev.origin.clone(),
                table: name,
                message: "the row an insert wrote was gone before it could be undone; retrying the transaction".into(),
            });
        }
        let theirs = theirs.to_string();
        params.push(Some(name.as_str()));
        params.push(Some(theirs.as_str()));
        self.execute(sql, &restore, &params, ev).await?;
        Ok(false)
    }
}
