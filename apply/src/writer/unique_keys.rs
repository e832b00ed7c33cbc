//! Secondary unique keys (DESIGN.md, "Conflicts": `update_exists`; issue 16, scenario 8).
//!
//! A change whose new values collide with another local row on a unique key other than the
//! primary key is weighed against the newest colliding row by the table's resolver:
//!
//! - the change wins: the colliding rows are deleted (tombstones dated by the change), whatever
//!   the change's own key then decides. Where the change arrived first, its version held those
//!   values when the colliding rows arrived, and they lost to it; the change being overwritten
//!   at its own key later (a newer version there) does not bring them back.
//! - a colliding row wins: the change is not applied. Under the stamp-weighing resolvers its own
//!   key is decided first: the row it would have replaced there (older than it, written by its
//!   own origin, or its before image) is deleted, because where the winner arrived second the
//!   change had replaced that row and was then deleted as the colliding row. A row there the
//!   change loses to stays (before, it was deleted too: a newer version of the key vanished on
//!   the nodes where the winner was already there when the change arrived).
//!
//! Known limit (docs/decisions.md): the collision is judged on the rows as they are when a
//! change arrives. A version that held a value and was overwritten before the colliding row
//! arrived leaves no trace here, so a row older than that version can survive on the nodes
//! that got it last.
//!
//! Tables with secondary unique keys are never grouped (`LocalTable::groupable`), so this is
//! the one-by-one path only.

use pgferry_connectors::config::Resolver;
use pgferry_connectors::postgres::{quote_ident, PgSession};
use pgferry_schemas::{DecodedEvent, Op};
use tokio_postgres::types::ToSql;

use super::{cast, key_json, key_values, version_columns, where_key, write_err, Settled, Writer};
use crate::conflict::{compare_before_image, decide, own_row_goes, ConflictType, LocalVersion, Resolution, Stamp};
use crate::error::ApplyError;

/// How a change's secondary unique keys were settled.
pub(super) enum UniqueCheck {
    /// No other local row holds its unique values.
    Clear,
    /// The change won over the rows that did; they were deleted.
    Cleared(Settled),
    /// A colliding row won: the change is not applied (and the row it would have replaced went).
    Skipped(Settled),
    /// A colliding row won, but the change loses at its own key too: nothing to do here, its own
    /// key's check settles and records it.
    LostAtOwnKey,
}

impl Writer {
    /// Secondary unique keys (DESIGN.md, "Conflicts"): another local row holding one of the
    /// incoming row's unique values is an `update_exists` conflict (`insert_exists` for an
    /// insert, as PostgreSQL 18 names them), weighed against the newest colliding row. If the
    /// change wins, the colliding rows are deleted (their tombstones are dated by the change)
    /// and it goes on — whether or not it then wins at its own key, as where it arrived first
    /// its version held those values (module doc); otherwise it is not applied, and under
    /// `last_update_wins` / `first_update_wins` the row it would have replaced at its own key
    /// is deleted too ([`own_row_goes`]): the losing row ends absent on every node, whichever
    /// of the two arrived first. Both rows stay in the conflict record.
    /// One more (pipelined) lookup per change, on tables that have such keys only.
    pub(super) async fn settle_unique(&mut self, sql: &PgSession, ev: &DecodedEvent) -> Result<UniqueCheck, ApplyError> {
        self.table(sql, ev).await?;
        let id = (ev.schema.clone(), ev.table.clone());
        let table = &self.tables[&id];
        let (Some(after), false) = (ev.after.as_ref(), table.unique_keys.is_empty()) else {
            return Ok(UniqueCheck::Clear);
        };
        let key = key_values(table, after).map_err(|m| write_err(ev, m))?;
        let mut params: Vec<Option<&str>> = key.iter().map(|k| Some(*k)).collect();
        let mut collides = Vec::new();
        for columns in &table.unique_keys {
            // A NULL never collides; an unchanged TOAST value is not in the event.
            let values: Option<Vec<&str>> = columns
                .iter()
                .map(|c| {
                    after
                        .iter()
                        .find(|(n, _)| n == c && !ev.unchanged_toast.contains(n))
                        .and_then(|(_, v)| v.as_deref())
                })
                .collect();
            let Some(values) = values else { continue };
            let mut conds = Vec::new();
            for (c, v) in columns.iter().zip(values) {
                params.push(Some(v));
                conds.push(format!("{} = ${}::text::{}", quote_ident(c), params.len(), cast(table, c).map_err(|m| write_err(ev, m))?));
            }
            collides.push(format!("({})", conds.join(" AND ")));
        }
        if collides.is_empty() {
            return Ok(UniqueCheck::Clear);
        }
        let name = table.name.clone();
        let mut filter = format!("({}) AND NOT ({})", collides.join(" OR "), where_key(table, 1));
        // An update that changes the key: the row's old version is not a collision either.
        if let Some(old_key) = ev.before.as_ref().and_then(|b| key_values(table, b).ok()).filter(|k| *k != key) {
            filter += &format!(" AND NOT ({})", where_key(table, params.len() + 1));
            params.extend(old_key.into_iter().map(Some));
        }
        let row_key = format!(
            "jsonb_build_array({})",
            table.key.iter().map(|k| format!("t.{}", quote_ident(k))).collect::<Vec<_>>().join(", ")
        );
        params.push(Some(name.as_str()));
        let lock = format!("SELECT 1 FROM {} t WHERE {filter} FOR UPDATE", table.qualified);
        let lookup = format!(
            "SELECT {}, {}::text FROM {} t WHERE {filter}",
            version_columns(params.len(), &row_key),
            key_json(table, 1),
            table.qualified
        );
        let delete = format!("DELETE FROM {} t WHERE {filter}", table.qualified);
        let n = params.len();
        let (lock, lookup) = (
            self.prepared(sql, &lock, n - 1, ev).await?,
            self.prepared(sql, &lookup, n, ev).await?,
        );
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let (_, rows) = futures::try_join!(sql.client.query(&lock, &refs[..n - 1]), sql.client.query(&lookup, &refs))
            .map_err(sql.err(format!("looking up rows colliding on a unique key of {name}")))?;
        let mut newest: Option<LocalVersion> = None;
        for r in &rows {
            let version = self.local_version(sql, r).await?;
            if newest.as_ref().is_none_or(|n| version.stamp > n.stamp) {
                newest = Some(version);
            }
        }
        let (Some(local), Some(first)) = (newest, rows.first()) else {
            return Ok(UniqueCheck::Clear);
        };
        let key_json_text: String = first.get(4);
        let conflict = if ev.op == Op::Update { ConflictType::UpdateExists } else { ConflictType::InsertExists };
        let remote = Stamp {
            ts_us: ev.commit_ts_us,
            node_id: self.config.node(&ev.origin).map_or(0, |n| n.id),
        };
        let resolver = self.tables[&id].resolver;
        let Some(resolution) = decide(resolver, local.stamp, remote) else {
            return Err(ApplyError::ConflictStop {
                origin: ev.origin.clone(),
                table: name,
                message: format!(
                    "{} on key {key_json_text}: another row holds its unique values (resolver error: this origin stops here until an operator resolves it)",
                    conflict.name()
                ),
            });
        };
        if resolution == Resolution::ApplyRemote {
            self.execute(sql, &delete, &params[..n - 1], ev).await?;
        } else if matches!(resolver, Resolver::LastUpdateWins | Resolver::FirstUpdateWins) {
            // The change lost to a colliding row. Where the winner arrived second, the change
            // had replaced the row at its own key and was then deleted as the colliding row: so
            // here too the row at its own key goes — but only the row the change would have
            // replaced. A row there that the change loses to (newer, under last-update-wins)
            // stays, as it does where the winner arrived second (issue 16, scenario 8): the own
            // key is decided first, by the same rule as the change's own check.
            let own = ev.before.as_ref().unwrap_or(after);
            let own_key = key_values(&self.tables[&id], own).map_err(|m| write_err(ev, m))?;
            let state = self.read_key(sql, ev, &own_key, true).await?;
            let Some(own_row) = state.local.as_ref() else {
                // No row at its own key: nothing to remove; the collision is recorded below.
                return self.record_unique(sql, ev, &name, &key_json_text, conflict, resolver, resolution, &local).await;
            };
            let on_top = own_row.origin.as_deref() == Some(ev.origin.as_str())
                || (compare_before_image(resolver, own_row.stamp, remote, ev.before.is_some())
                    && self.before_matches(sql, ev, &own_key).await?);
            if !own_row_goes(resolver, own_row.stamp, remote, on_top) {
                return Ok(UniqueCheck::LostAtOwnKey);
            }
            let table = &self.tables[&id];
            let text = format!("DELETE FROM {} WHERE {}", table.qualified, where_key(table, 1));
            let own_params: Vec<Option<&str>> = own_key.into_iter().map(Some).collect();
            self.execute(sql, &text, &own_params, ev).await?;
        }
        self.record_unique(sql, ev, &name, &key_json_text, conflict, resolver, resolution, &local).await
    }

    /// Records a settled unique-key conflict; what [`Writer::settle_unique`] returns for it.
    #[allow(clippy::too_many_arguments)]
    async fn record_unique(
        &mut self,
        sql: &PgSession,
        ev: &DecodedEvent,
        table: &str,
        key_json: &str,
        conflict: ConflictType,
        resolver: Resolver,
        resolution: Resolution,
        local: &LocalVersion,
    ) -> Result<UniqueCheck, ApplyError> {
        self.record(sql, ev, table, key_json, conflict, resolver, resolution, Some(local)).await?;
        let settled = Settled { conflict, resolution };
        Ok(match resolution {
            Resolution::ApplyRemote => UniqueCheck::Cleared(settled),
            _ => UniqueCheck::Skipped(settled),
        })
    }
}
