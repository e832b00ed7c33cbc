//! Primary-key changes (issue 16, scenario 9). An update whose after image has another key than
//! its before image does two things: its old key loses its row, its new key gets the after
//! image. Each is settled on its own, as a delete of the old key and an insert of the new one
//! would be, against that key's row or tombstone, by the table's resolver, dated by the change:
//!
//! - old key: a row made by the same origin, written earlier in this transaction, or equal to
//!   the change's before image (`compare_before_image`) goes; another origin's row is
//!   `update_origin_differs` (the row goes if the change wins); no row is `update_missing` /
//!   `update_deleted`, and a winning change leaves a tombstone there;
//! - new key: free (or an older tombstone) takes the after image; a row there is `update_exists`
//!   (PostgreSQL 18's name for an update that collides on a unique key, here the primary key:
//!   PGD's `update_pkey_exists`), overwritten if the change wins; a newer tombstone is
//!   `update_deleted`.
//!
//! A moved or deleted row leaves a tombstone for its old key (the `pgferry_key_change` trigger
//! records moves, local or applied, like deletes), so a change of the old key dated before the
//! move and arriving after it loses, as it does where it arrived first and the move overtook it.
//! Before, the old key kept no tombstone (an older update re-inserted it), a move whose old key
//! lost was dropped whole (its new key never appeared there), and a new key held by another row
//! failed on the unique violation and stopped the origin.
//!
//! Groups never hold a key change (`group::decide` cuts before it), so this is the only path.

use pgferry_connectors::config::Resolver;
use pgferry_schemas::{DecodedEvent, Op};

use super::{key_values, update_by_key, where_key, write_err, Delta, KeyState, LocalTable, Settled, Writer};
use crate::conflict::{compare_before_image, decide, ConflictType, Resolution, Stamp};
use crate::error::ApplyError;

/// The new key of `ev` when it is an update that changes its table's primary key (`old`, from
/// its before image).
pub(super) fn new_key<'e>(table: &LocalTable, ev: &'e DecodedEvent, old: &[&str]) -> Result<Option<Vec<&'e str>>, String> {
    let (Op::Update, Some(_), Some(after)) = (ev.op, ev.before.as_ref(), ev.after.as_ref()) else {
        return Ok(None);
    };
    let new = key_values(table, after)?;
    Ok((new != old).then_some(new))
}

/// What a key change does to its old key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OldKey {
    /// Its row goes (moved to the new key, or deleted).
    Remove,
    /// Its row stays.
    Keep,
    /// There is no row: a tombstone dated by the change is written.
    Tombstone,
    /// There is no row, and nothing is written.
    Nothing,
}

/// What a key change does to its new key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NewKey {
    /// The after image is inserted.
    Insert,
    /// The row there is overwritten with the after image.
    Overwrite,
    /// Whatever is there stays.
    Keep,
}

/// A key's state as a key change sees it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Side {
    /// Whether a row holds the key.
    pub(crate) row: bool,
    /// That row's stamp (None: no commit time, written earlier in this transaction).
    pub(crate) stamp: Option<Stamp>,
    /// The key's tombstone.
    pub(crate) tombstone: Option<Stamp>,
}

/// One conflict a key change meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Part {
    /// At the new key (else the old one).
    pub(crate) at_new_key: bool,
    /// Its type.
    pub(crate) conflict: ConflictType,
    /// What was done.
    pub(crate) resolution: Resolution,
}

/// How a key change is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyChangePlan {
    /// At the old key.
    pub(crate) old: OldKey,
    /// At the new key.
    pub(crate) new: NewKey,
    /// The conflicts to record, old key first.
    pub(crate) conflicts: Vec<Part>,
}

/// Settles a key change dated `remote` against its old key (`old_on_top`: the old key's row is
/// the version the change was made on — same origin, no commit time, or equal to its before
/// image) and its new key. None: the resolver is `error` (the origin stops). A change the
/// resolver parks at either key is parked whole: nothing of it is written.
pub(crate) fn plan(resolver: Resolver, remote: Stamp, old: Side, old_on_top: bool, new: Side) -> Option<KeyChangePlan> {
    let mut conflicts = Vec::new();
    let mut weigh = |at_new_key: bool, conflict: ConflictType, against: Option<Stamp>| -> Option<bool> {
        let resolution = decide(resolver, against, remote)?;
        conflicts.push(Part {
            at_new_key,
            conflict,
            resolution,
        });
        Some(resolution == Resolution::ApplyRemote)
    };
    let old_part = match (old.row, old_on_top) {
        (true, true) => OldKey::Remove,
        (true, false) => match weigh(false, ConflictType::UpdateOriginDiffers, old.stamp)? {
            true => OldKey::Remove,
            false => OldKey::Keep,
        },
        (false, _) => {
            let conflict = if old.tombstone.is_some() { ConflictType::UpdateDeleted } else { ConflictType::UpdateMissing };
            match weigh(false, conflict, old.tombstone)? {
                true => OldKey::Tombstone,
                false => OldKey::Nothing,
            }
        }
    };
    let new_part = match (new.row, new.stamp, new.tombstone) {
        (true, None, _) => NewKey::Overwrite,
        (true, stamp, _) => match weigh(true, ConflictType::UpdateExists, stamp)? {
            true => NewKey::Overwrite,
            false => NewKey::Keep,
        },
        (false, _, Some(t)) if t > remote => match weigh(true, ConflictType::UpdateDeleted, Some(t))? {
            true => NewKey::Insert,
            false => NewKey::Keep,
        },
        (false, _, _) => NewKey::Insert,
    };
    if conflicts.iter().any(|c| c.resolution == Resolution::Parked) {
        for c in &mut conflicts {
            c.resolution = Resolution::Parked;
        }
        let old = if old.row { OldKey::Keep } else { OldKey::Nothing };
        return Some(KeyChangePlan {
            old,
            new: NewKey::Keep,
            conflicts,
        });
    }
    Some(KeyChangePlan {
        old: old_part,
        new: new_part,
        conflicts,
    })
}

impl Side {
    fn of(state: &KeyState) -> Side {
        Side {
            row: state.local.is_some(),
            stamp: state.local.as_ref().and_then(|l| l.stamp),
            tombstone: state.tombstone,
        }
    }
}

impl Writer {
    /// Applies a primary-key change from `old_key` to `new_key` inside the caller's
    /// transaction (module doc). `None`: settle it again (a local writer took the new key
    /// meanwhile).
    pub(super) async fn apply_key_change<'e>(
        &mut self,
        sql: &pgferry_connectors::postgres::PgSession,
        ev: &'e DecodedEvent,
        old_key: &[&'e str],
        new_key: &[&'e str],
    ) -> Result<Option<Option<Settled>>, ApplyError> {
        let id = (ev.schema.clone(), ev.table.clone());
        // Both keys' locks, in one order whichever way the key moves.
        let (old, new) = if old_key <= new_key {
            let old = self.read_key(sql, ev, old_key, true).await?;
            (old, self.read_key(sql, ev, new_key, true).await?)
        } else {
            let new = self.read_key(sql, ev, new_key, true).await?;
            (self.read_key(sql, ev, old_key, true).await?, new)
        };
        let remote = Stamp {
            ts_us: ev.commit_ts_us,
            node_id: self.config.node(&ev.origin).map_or(0, |n| n.id),
        };
        let resolver = self.tables[&id].resolver;
        let old_on_top = match &old.local {
            Some(l) => {
                l.stamp.is_none()
                    || l.origin.as_deref() == Some(ev.origin.as_str())
                    || (compare_before_image(resolver, l.stamp, remote, true) && self.before_matches(sql, ev, old_key).await?)
            }
            None => false,
        };
        let name = self.tables[&id].name.clone();
        let Some(plan) = plan(resolver, remote, Side::of(&old), old_on_top, Side::of(&new)) else {
            let part = if old_on_top || old.local.is_none() { &new } else { &old };
            return Err(ApplyError::ConflictStop {
                origin: ev.origin.clone(),
                table: name,
                message: format!(
                    "primary-key change from {} to {} conflicts at {} (resolver error: this origin stops here until an operator resolves it)",
                    old.key_json, new.key_json, part.key_json
                ),
            });
        };

        // The old key first: a secondary unique value the row keeps is free again for the new.
        let table = &self.tables[&id];
        match (plan.old, plan.new) {
            (OldKey::Remove, NewKey::Insert) => {
                // The row moves; the key-change trigger leaves the old key's tombstone.
                let (text, params) = update_by_key(table, ev, old_key, false).map_err(|m| write_err(ev, m))?;
                self.execute(sql, &text, &params, ev).await?;
            }
            (old_part, new_part) => {
                match old_part {
                    OldKey::Remove => {
                        let text = format!("DELETE FROM {} WHERE {}", table.qualified, where_key(table, 1));
                        let params: Vec<Option<&str>> = old_key.iter().map(|k| Some(*k)).collect();
                        self.execute(sql, &text, &params, ev).await?;
                    }
                    OldKey::Tombstone => self.write_tombstone(sql, ev, &name, &old.key_json).await?,
                    OldKey::Keep | OldKey::Nothing => {}
                }
                match new_part {
                    NewKey::Insert if ev.unchanged_toast.is_empty() => {
                        if !self.insert(sql, ev, new_key, new.tombstone_xid, Delta::Insert).await? {
                            return Ok(None);
                        }
                    }
                    NewKey::Insert => {
                        // The event lacks the unchanged large values a whole row needs.
                        tracing::warn!(origin = %ev.origin, table = %name, key = %new.key_json,
                            "a primary-key change whose old row stays here lacks unchanged TOAST values: its new key is not created");
                    }
                    NewKey::Overwrite => {
                        let table = &self.tables[&id];
                        let (text, params) = update_by_key(table, ev, new_key, false).map_err(|m| write_err(ev, m))?;
                        self.execute(sql, &text, &params, ev).await?;
                    }
                    NewKey::Keep => {}
                }
            }
        }
        for part in &plan.conflicts {
            let side = if part.at_new_key { &new } else { &old };
            self.record(sql, ev, &name, &side.key_json, part.conflict, resolver, part.resolution, side.local.as_ref())
                .await?;
            tracing::debug!(origin = %ev.origin, table = %name, key = %side.key_json, conflict = part.conflict.name(),
                resolution = part.resolution.name(), "conflict (primary-key change)");
        }
        Ok(Some(plan.conflicts.first().map(|p| Settled {
            conflict: p.conflict,
            resolution: p.resolution,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(ts_us: i64, node_id: u16) -> Stamp {
        Stamp { ts_us, node_id }
    }

    fn row(ts: i64) -> Side {
        Side {
            row: true,
            stamp: Some(s(ts, 2)),
            tombstone: None,
        }
    }

    fn tomb(ts: i64) -> Side {
        Side {
            tombstone: Some(s(ts, 2)),
            ..Side::default()
        }
    }

    const LUW: Resolver = Resolver::LastUpdateWins;

    fn part(at_new_key: bool, conflict: ConflictType, resolution: Resolution) -> Part {
        Part {
            at_new_key,
            conflict,
            resolution,
        }
    }

    #[test]
    fn a_free_new_key_takes_the_row_whatever_happens_at_the_old_one() {
        let remote = s(20, 1);
        let p = plan(LUW, remote, row(10), true, Side::default()).expect("settled");
        assert_eq!((p.old, p.new, p.conflicts), (OldKey::Remove, NewKey::Insert, vec![]));
        // A newer local version of the old key stays; the new key is created anyway.
        let p = plan(LUW, remote, row(25), false, Side::default()).expect("settled");
        assert_eq!((p.old, p.new), (OldKey::Keep, NewKey::Insert));
        assert_eq!(p.conflicts, vec![part(false, ConflictType::UpdateOriginDiffers, Resolution::KeepLocal)]);
        // An older one goes.
        let p = plan(LUW, remote, row(15), false, Side::default()).expect("settled");
        assert_eq!((p.old, p.new), (OldKey::Remove, NewKey::Insert));
        // No row at the old key: a tombstone, unless a newer one is there.
        let p = plan(LUW, remote, Side::default(), false, Side::default()).expect("settled");
        assert_eq!((p.old, p.new), (OldKey::Tombstone, NewKey::Insert));
        assert_eq!(p.conflicts, vec![part(false, ConflictType::UpdateMissing, Resolution::ApplyRemote)]);
        let p = plan(LUW, remote, tomb(30), false, tomb(5)).expect("settled");
        assert_eq!((p.old, p.new), (OldKey::Nothing, NewKey::Insert));
    }

    #[test]
    fn a_taken_new_key_is_update_exists_and_a_newer_tombstone_keeps_it_free() {
        let remote = s(20, 1);
        let p = plan(LUW, remote, row(10), true, row(25)).expect("settled");
        assert_eq!((p.old, p.new), (OldKey::Remove, NewKey::Keep));
        assert_eq!(p.conflicts, vec![part(true, ConflictType::UpdateExists, Resolution::KeepLocal)]);
        let p = plan(LUW, remote, row(10), true, row(15)).expect("settled");
        assert_eq!((p.old, p.new), (OldKey::Remove, NewKey::Overwrite));
        let p = plan(LUW, remote, row(10), true, tomb(30)).expect("settled");
        assert_eq!((p.old, p.new), (OldKey::Remove, NewKey::Keep));
        assert_eq!(p.conflicts, vec![part(true, ConflictType::UpdateDeleted, Resolution::KeepLocal)]);
        // Written earlier in this transaction: no conflict.
        let mine = Side {
            row: true,
            ..Side::default()
        };
        let p = plan(LUW, remote, row(10), true, mine).expect("settled");
        assert_eq!((p.old, p.new, p.conflicts), (OldKey::Remove, NewKey::Overwrite, vec![]));
    }

    #[test]
    fn parked_anywhere_parks_the_whole_change_and_error_stops() {
        let remote = s(20, 1);
        let p = plan(Resolver::Manual, remote, row(10), true, row(15)).expect("settled");
        assert_eq!((p.old, p.new), (OldKey::Keep, NewKey::Keep));
        assert_eq!(p.conflicts, vec![part(true, ConflictType::UpdateExists, Resolution::Parked)]);
        assert_eq!(plan(Resolver::Error, remote, row(10), true, row(15)), None);
        assert!(plan(Resolver::Error, remote, row(10), true, Side::default()).is_some());
    }
}
