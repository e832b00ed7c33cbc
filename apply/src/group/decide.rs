//! Deciding a group (pure: no I/O): given the changes of consecutive source transactions of one
//! origin and the local state of every key they touch as it was before the group, what the group
//! writes, which conflicts it records, and where the group must be cut so that the outcome equals
//! applying the transactions one by one (DESIGN.md, "Apply", "Grouping").
//!
//! Every change is settled exactly as the one-by-one path settles it (`writer.rs`): the same
//! classification, the same [`decide`] call, the same record. Changes of one key are folded in
//! source order. The group is cut before the first transaction whose outcome would depend on
//! something only the one-by-one path decides:
//! - a conflict against a row version or tombstone the group itself wrote (its record would need
//!   that in-group version as the server would have shown it);
//! - a conflict the resolver parks or stops on (`manual`, `error`);
//! - an update or delete of another origin's row whose before image may equal the local row
//!   and decide it ([`compare_before_image`]: the group does not read the rows themselves);
//! - an update whose row is absent and whose key is not locked by the group (the key lock that
//!   makes the row's absence stable is taken only for inserts and deletes);
//! - a primary-key change; a delete then insert, or an insert then delete, of one key.

use std::collections::HashMap;

use rustc_hash::{FxBuildHasher, FxHashSet};

/// Per table, key → what the group holds for it. Fx-hashed: SipHash of the keys showed in apply's
/// profile, and a group is bounded (`[apply] max_group_rows`), which bounds what colliding keys
/// could cost.
pub type KeyMap<'e, V> = HashMap<Vec<&'e str>, V, FxBuildHasher>;

use pgferry_connectors::config::Resolver;
use pgferry_schemas::{DecodedEvent, Op};

use crate::conflict::{compare_before_image, decide, ConflictType, LocalVersion, Resolution, Stamp};

/// One change of the group as the plan sees it.
#[derive(Debug)]
pub struct Change<'e> {
    /// Index of its source transaction in the group (0-based, in source order).
    pub txn: usize,
    /// Index of its table in the group's tables.
    pub table: usize,
    /// Its key's text values, in key order (the before image's for updates and deletes).
    pub key: Vec<&'e str>,
    /// Whether it is an update whose after image has another key.
    pub key_changed: bool,
    /// The decoded event.
    pub ev: &'e DecodedEvent,
}

/// A key's local state before the group (read after the key locks; see the module doc of
/// `group` for the row locks).
#[derive(Debug, Clone, Default)]
pub struct Before {
    /// The row, if one exists.
    pub row: Option<LocalVersion>,
    /// The key's tombstone, if any.
    pub tombstone: Option<Stamp>,
    /// The key as the tombstone trigger writes it (JSON array text).
    pub key_json: String,
    /// The row version's `xmin` (32-bit, as `int8`): the group's writes touch only that
    /// version, so a row changed since the read fails the group instead of being overwritten.
    pub xmin: Option<i64>,
    /// The xid of the key's tombstone, if any: an inserted key's tombstone must still be that
    /// one after the insert (`statements::inserts_unraced`; issue 16, scenario 13).
    pub tombstone_xid: Option<i64>,
}

/// What the group does to a key, folded over all its changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<'e> {
    /// Insert a row with these columns.
    Insert(Vec<(&'e str, Option<&'e str>)>),
    /// Update the existing row: set these columns.
    Update(Vec<(&'e str, Option<&'e str>)>),
    /// Delete the existing row (its tombstone is written by the trigger).
    Delete,
    /// Write a tombstone for a key without a row (a delete that found none and won).
    Tombstone,
}

/// The final write of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyWrite<'e> {
    /// Table index.
    pub table: usize,
    /// The key's text values.
    pub key: Vec<&'e str>,
    /// What is written.
    pub action: Action<'e>,
    /// The source transaction whose stamp the written version (or tombstone) must carry.
    pub txn: usize,
}

/// One conflict to record in `pgferry.conflicts`.
#[derive(Debug, Clone)]
pub struct ConflictRecord<'e> {
    /// Table index.
    pub table: usize,
    /// The key's values, in key order.
    pub key: Vec<&'e str>,
    /// The key as JSON text.
    pub key_json: String,
    /// Its type.
    pub conflict: ConflictType,
    /// The table's resolver.
    pub resolver: Resolver,
    /// What was done.
    pub resolution: Resolution,
    /// The local version weighed (none for a missing row).
    pub local: Option<LocalVersion>,
    /// The remote change.
    pub ev: &'e DecodedEvent,
}

/// What a group does.
#[derive(Debug, Default)]
pub struct Plan<'e> {
    /// How many of the group's transactions it applies (the rest start the next group); 0: the
    /// first transaction must go through the one-by-one path.
    pub txns: usize,
    /// Per key, its final write, in order of first appearance.
    pub writes: Vec<KeyWrite<'e>>,
    /// Conflicts, in source order.
    pub conflicts: Vec<ConflictRecord<'e>>,
}

/// The current state of a key while folding.
#[derive(Debug, Clone)]
struct State<'e> {
    /// Whether a row exists now.
    exists: bool,
    /// Whether the group has written the row or its tombstone.
    touched: bool,
    /// Whether the row existed before the group.
    existed: bool,
    /// The key's tombstone now.
    tombstone: Option<Stamp>,
    /// Set by an insert or update that the group applies (column → value).
    image: Vec<(&'e str, Option<&'e str>)>,
    /// Whether the group inserted the row.
    inserted: bool,
    /// Whether the group deleted the pre-existing row.
    deleted: bool,
    /// Whether the group wrote a tombstone for a key without a row.
    tombstoned: bool,
    /// The transaction of the last write.
    txn: usize,
    /// Whether an insert or delete of this key is in the group (the group holds its key lock).
    locked: bool,
}

/// Why a transaction cannot be part of the group (for tests and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutReason {
    /// A conflict against a version the group wrote.
    InGroupConflict,
    /// The resolver parks or stops.
    ResolverNeedsOneByOne,
    /// Whether the change was made on top of the local row needs its before image compared with
    /// the row (issue 16, scenario 12).
    BeforeImage,
    /// An update of an absent, unlocked key.
    UnlockedMissingRow,
    /// A primary-key change.
    KeyChange,
    /// Delete then insert, or insert then delete, of one key.
    Recreated,
    /// A change without the image it needs.
    NoImage,
}

/// Settles the changes of a group (sorted by transaction, in source order) against `before`
/// (per table, key → state before the group). `resolvers` per table; `origin` and its node id
/// are the group's.
pub fn plan<'e>(
    changes: &[Change<'e>],
    before: &[KeyMap<'e, Before>],
    resolvers: &[Resolver],
    origin: &str,
    origin_id: u16,
) -> (Plan<'e>, Option<CutReason>) {
    let mut states: Vec<KeyMap<'e, State<'e>>> = vec![KeyMap::default(); before.len()];
    let mut order: Vec<(usize, Vec<&'e str>)> = Vec::new();
    // Every key an insert or delete touches is locked by the group (see the module doc).
    let mut locked: Vec<FxHashSet<&Vec<&'e str>>> = vec![Default::default(); before.len()];
    for c in changes {
        if matches!(c.ev.op, Op::Create | Op::Read | Op::Delete) {
            locked[c.table].insert(&c.key);
        }
    }
    let mut conflicts = Vec::new();
    let mut cut: Option<(usize, CutReason)> = None;
    // Conflicts of the transaction being folded, kept until it is known not to be cut.
    let mut txn_conflicts: Vec<ConflictRecord<'e>> = Vec::new();
    let mut txn_states: Vec<((usize, Vec<&'e str>), State<'e>)> = Vec::new();
    let mut current_txn = usize::MAX;
    let empty = Before::default();
    let mut i = 0;
    while i <= changes.len() {
        let c = changes.get(i);
        if c.is_none_or(|c| c.txn != current_txn) {
            // The previous transaction is complete and not cut: keep what it did.
            for (id, s) in txn_states.drain(..) {
                if !states[id.0].contains_key(&id.1) {
                    order.push(id.clone());
                }
                states[id.0].insert(id.1, s);
            }
            conflicts.append(&mut txn_conflicts);
            let Some(c) = c else { break };
            current_txn = c.txn;
        }
        let c = c.expect("checked above");
        let pre = before[c.table].get(&c.key).unwrap_or(&empty);
        let id = (c.table, c.key.clone());
        let mut state = match txn_states.iter().find(|(k, _)| *k == id) {
            Some((_, s)) => s.clone(),
            None => states[c.table].get(&c.key).cloned().unwrap_or_else(|| State {
                exists: pre.row.is_some(),
                touched: false,
                existed: pre.row.is_some(),
                tombstone: pre.tombstone,
                image: Vec::new(),
                inserted: false,
                deleted: false,
                tombstoned: false,
                txn: c.txn,
                locked: locked[c.table].contains(&c.key),
            }),
        };
        let remote = Stamp {
            ts_us: c.ev.commit_ts_us,
            node_id: origin_id,
        };
        match settle(c, pre, &mut state, resolvers[c.table], origin, remote) {
            Ok(record) => {
                if let Some(r) = record {
                    txn_conflicts.push(r);
                }
                match txn_states.iter_mut().find(|(k, _)| *k == id) {
                    Some((_, s)) => *s = state,
                    None => txn_states.push((id, state)),
                }
            }
            Err(reason) => {
                cut = Some((c.txn, reason));
                break;
            }
        }
        i += 1;
    }
    let txns = match cut {
        Some((t, _)) => t,
        None => changes.last().map_or(0, |c| c.txn + 1),
    };
    let mut writes = Vec::new();
    for (table, key) in order {
        let s = &states[table][&key];
        let action = match (s.existed, s.exists) {
            (true, true) if !s.image.is_empty() => Action::Update(s.image.clone()),
            (false, true) if s.inserted => Action::Insert(s.image.clone()),
            (true, false) if s.deleted => Action::Delete,
            (false, false) if s.tombstoned => Action::Tombstone,
            _ => continue,
        };
        writes.push(KeyWrite {
            table,
            key,
            action,
            txn: s.txn,
        });
    }
    (
        Plan {
            txns,
            writes,
            conflicts,
        },
        cut.map(|(_, r)| r),
    )
}

/// Settles one change against the key's current state, as `Writer::apply_row` does, updating
/// the state; the conflict to record, if any. `Err`: the transaction must go one by one.
fn settle<'e>(
    c: &Change<'e>,
    pre: &Before,
    s: &mut State<'e>,
    resolver: Resolver,
    origin: &str,
    remote: Stamp,
) -> Result<Option<ConflictRecord<'e>>, CutReason> {
    let ev = c.ev;
    if c.key_changed {
        return Err(CutReason::KeyChange);
    }
    // The local version this change is weighed against, if it conflicts: (type, stamp, local
    // version to record).
    let local_version = || if s.touched { None } else { pre.row.clone() };
    let conflict: Option<(ConflictType, Option<Stamp>)> = match ev.op {
        Op::Create | Op::Read => {
            if s.exists {
                Some((ConflictType::InsertExists, pre.row.as_ref().and_then(|r| r.stamp)))
            } else {
                match s.tombstone {
                    Some(t) if t > remote => Some((ConflictType::UpdateDeleted, Some(t))),
                    _ => None,
                }
            }
        }
        Op::Update | Op::Delete => {
            if s.exists {
                let same_origin = s.touched || {
                    let row = pre.row.as_ref();
                    row.is_none_or(|r| r.stamp.is_none() || r.origin.as_deref() == Some(origin))
                };
                if same_origin {
                    None
                } else {
                    let t = if ev.op == Op::Update {
                        ConflictType::UpdateOriginDiffers
                    } else {
                        ConflictType::DeleteOriginDiffers
                    };
                    Some((t, pre.row.as_ref().and_then(|r| r.stamp)))
                }
            } else if ev.op == Op::Update {
                if !s.locked {
                    return Err(CutReason::UnlockedMissingRow);
                }
                match s.tombstone {
                    Some(t) => Some((ConflictType::UpdateDeleted, Some(t))),
                    None => Some((ConflictType::UpdateMissing, None)),
                }
            } else {
                Some((ConflictType::DeleteMissing, s.tombstone))
            }
        }
        Op::Truncate => return Err(CutReason::NoImage),
    };
    let Some((conflict, against)) = conflict else {
        // No conflict: the change is written as it is.
        apply(c, s, remote)?;
        return Ok(None);
    };
    if s.touched {
        return Err(CutReason::InGroupConflict);
    }
    if matches!(conflict, ConflictType::UpdateOriginDiffers | ConflictType::DeleteOriginDiffers)
        && compare_before_image(resolver, against, remote, ev.before.is_some())
    {
        return Err(CutReason::BeforeImage);
    }
    let mut resolution = match decide(resolver, against, remote) {
        Some(Resolution::Parked) | None => return Err(CutReason::ResolverNeedsOneByOne),
        Some(r) => r,
    };
    let local = match conflict {
        ConflictType::InsertExists | ConflictType::UpdateOriginDiffers | ConflictType::DeleteOriginDiffers => local_version(),
        _ => None,
    };
    if resolution == Resolution::ApplyRemote {
        match conflict {
            ConflictType::UpdateMissing | ConflictType::UpdateDeleted if ev.op == Op::Update => {
                if ev.unchanged_toast.is_empty() {
                    apply(c, s, remote)?;
                } else {
                    // The event lacks the unchanged large values a full row needs.
                    resolution = Resolution::KeepLocal;
                }
            }
            ConflictType::DeleteMissing => {
                s.tombstone = Some(remote);
                s.tombstoned = true;
                s.touched = true;
                s.txn = c.txn;
            }
            _ => apply(c, s, remote)?,
        }
    }
    Ok(Some(ConflictRecord {
        table: c.table,
        key: c.key.clone(),
        key_json: pre.key_json.clone(),
        conflict,
        resolver,
        resolution,
        local,
        ev,
    }))
}

/// Writes `c` into the key's state: an insert (or an update that re-creates a missing row), an
/// update, or a delete.
fn apply<'e>(c: &Change<'e>, s: &mut State<'e>, remote: Stamp) -> Result<(), CutReason> {
    let ev = c.ev;
    match ev.op {
        Op::Delete => {
            if s.inserted {
                return Err(CutReason::Recreated);
            }
            s.exists = false;
            s.deleted = true;
            s.image.clear();
            s.tombstone = Some(remote);
        }
        Op::Create | Op::Read | Op::Update => {
            let after = ev.after.as_ref().ok_or(CutReason::NoImage)?;
            if !s.exists {
                if s.deleted || s.tombstoned {
                    return Err(CutReason::Recreated);
                }
                s.exists = true;
                s.inserted = true;
            }
            for (col, value) in after.iter().filter(|(col, _)| !ev.unchanged_toast.contains(col)) {
                match s.image.iter_mut().find(|(c, _)| *c == col.as_str()) {
                    Some(slot) => slot.1 = value.as_deref(),
                    None => s.image.push((col.as_str(), value.as_deref())),
                }
            }
        }
        Op::Truncate => return Err(CutReason::NoImage),
    }
    s.touched = true;
    s.txn = c.txn;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: &str = "n1";
    const ORIGIN_ID: u16 = 1;

    fn row(pairs: &[(&str, &str)]) -> Vec<(String, Option<String>)> {
        pairs.iter().map(|(c, v)| (c.to_string(), Some(v.to_string()))).collect()
    }

    fn ev(op: Op, ts: i64, before: Option<&[(&str, &str)]>, after: Option<&[(&str, &str)]>) -> DecodedEvent {
        DecodedEvent {
            op,
            schema: "public".into(),
            table: "t".into(),
            before: before.map(row),
            after: after.map(row),
            origin: ORIGIN.into(),
            commit_lsn: ts as u64,
            commit_ts_us: ts,
            txn_seq: 0,
            txn_last: true,
            unchanged_toast: Vec::new(),
        }
    }

    fn changes<'e>(evs: &'e [(usize, DecodedEvent)]) -> Vec<Change<'e>> {
        evs.iter()
            .map(|(txn, ev)| {
                let img = match ev.op {
                    Op::Create | Op::Read => ev.after.as_ref(),
                    _ => ev.before.as_ref().or(ev.after.as_ref()),
                };
                let key = vec![img.and_then(|r| r.iter().find(|(c, _)| c == "id")).and_then(|(_, v)| v.as_deref()).unwrap_or("?")];
                let after_key = ev.after.as_ref().and_then(|r| r.iter().find(|(c, _)| c == "id")).and_then(|(_, v)| v.as_deref());
                Change {
                    txn: *txn,
                    table: 0,
                    key_changed: ev.op == Op::Update && ev.before.is_some() && after_key != Some(key[0]),
                    key,
                    ev,
                }
            })
            .collect()
    }

    fn local(ts: i64, origin: &str, node_id: u16) -> Before {
        Before {
            row: Some(LocalVersion {
                stamp: Some(Stamp { ts_us: ts, node_id }),
                origin: Some(origin.into()),
                row_json: "{\"id\": 1}".into(),
            }),
            tombstone: None,
            key_json: "[1]".into(),
            xmin: Some(1),
            tombstone_xid: None,
        }
    }

    fn run<'e>(changes: &[Change<'e>], before: &[(&'e str, Before)], resolver: Resolver) -> (Plan<'e>, Option<CutReason>) {
        let map: KeyMap<'_, Before> = before.iter().map(|(k, b)| (vec![*k], b.clone())).collect();
        plan(changes, &[map], &[resolver], ORIGIN, ORIGIN_ID)
    }

    #[test]
    fn updates_of_one_origin_fold_into_one_update_stamped_by_the_last_writer() {
        let evs = vec![
            (0, ev(Op::Update, 10, None, Some(&[("id", "1"), ("v", "a"), ("w", "x")]))),
            (1, ev(Op::Update, 11, None, Some(&[("id", "2"), ("v", "b")]))),
            (2, ev(Op::Update, 12, None, Some(&[("id", "1"), ("v", "c")]))),
        ];
        let c = changes(&evs);
        let (p, cut) = run(&c, &[("1", local(5, ORIGIN, 1)), ("2", local(5, ORIGIN, 1))], Resolver::LastUpdateWins);
        assert_eq!(cut, None);
        assert_eq!(p.txns, 3);
        assert!(p.conflicts.is_empty());
        assert_eq!(
            p.writes,
            vec![
                KeyWrite {
                    table: 0,
                    key: vec!["1"],
                    action: Action::Update(vec![("id", Some("1")), ("v", Some("c")), ("w", Some("x"))]),
                    txn: 2
                },
                KeyWrite {
                    table: 0,
                    key: vec!["2"],
                    action: Action::Update(vec![("id", Some("2")), ("v", Some("b"))]),
                    txn: 1
                },
            ]
        );
    }

    #[test]
    fn a_row_another_node_wrote_is_a_conflict_once_then_the_groups_own() {
        let evs = vec![
            (0, ev(Op::Update, 10, None, Some(&[("id", "1"), ("v", "a")]))),
            (1, ev(Op::Update, 11, None, Some(&[("id", "1"), ("v", "b")]))),
        ];
        let c = changes(&evs);
        // Written locally (node 2) before the remote commits: the remote change wins.
        let (p, cut) = run(&c, &[("1", local(5, "n2", 2))], Resolver::LastUpdateWins);
        assert_eq!(cut, None);
        assert_eq!(p.conflicts.len(), 1);
        assert_eq!(p.conflicts[0].conflict, ConflictType::UpdateOriginDiffers);
        assert_eq!(p.conflicts[0].resolution, Resolution::ApplyRemote);
        assert_eq!(p.conflicts[0].local.as_ref().and_then(|l| l.origin.as_deref()), Some("n2"));
        assert_eq!(p.writes[0].action, Action::Update(vec![("id", Some("1")), ("v", Some("b"))]));
        assert_eq!(p.writes[0].txn, 1);

        // Written locally later than both: both lose, each recorded, nothing written.
        let (p, cut) = run(&c, &[("1", local(50, "n2", 2))], Resolver::LastUpdateWins);
        assert_eq!(cut, None);
        assert_eq!(p.txns, 2);
        assert_eq!(p.conflicts.iter().map(|c| c.resolution).collect::<Vec<_>>(), [Resolution::KeepLocal; 2]);
        assert!(p.writes.is_empty());
    }

    #[test]
    fn inserts_deletes_and_tombstones() {
        let evs = vec![
            (0, ev(Op::Create, 10, None, Some(&[("id", "1"), ("v", "a")]))),
            (0, ev(Op::Update, 10, None, Some(&[("id", "1"), ("v", "b")]))),
            (1, ev(Op::Delete, 11, Some(&[("id", "2")]), None)),
            (2, ev(Op::Delete, 12, Some(&[("id", "3")]), None)),
            (3, ev(Op::Create, 13, None, Some(&[("id", "4"), ("v", "old")]))),
        ];
        let c = changes(&evs);
        let newer_delete = Before {
            tombstone: Some(Stamp { ts_us: 99, node_id: 2 }),
            key_json: "[4]".into(),
            ..Before::default()
        };
        let (p, cut) = run(&c, &[("2", local(5, ORIGIN, 1)), ("4", newer_delete)], Resolver::LastUpdateWins);
        assert_eq!(cut, None);
        let actions: Vec<(&str, &Action, usize)> = p.writes.iter().map(|w| (w.key[0], &w.action, w.txn)).collect();
        assert_eq!(
            actions,
            vec![
                ("1", &Action::Insert(vec![("id", Some("1")), ("v", Some("b"))]), 0),
                ("2", &Action::Delete, 1),
                ("3", &Action::Tombstone, 2),
            ]
        );
        let kinds: Vec<_> = p.conflicts.iter().map(|c| (c.conflict, c.resolution)).collect();
        assert_eq!(
            kinds,
            vec![
                (ConflictType::DeleteMissing, Resolution::ApplyRemote),
                (ConflictType::UpdateDeleted, Resolution::KeepLocal)
            ]
        );
    }

    #[test]
    fn the_group_is_cut_where_only_the_one_by_one_path_can_decide() {
        // A conflict against what the group itself wrote: delete, then update of the same key.
        let evs = vec![
            (0, ev(Op::Delete, 10, Some(&[("id", "1")]), None)),
            (1, ev(Op::Update, 11, None, Some(&[("id", "1"), ("v", "b")]))),
        ];
        let c = changes(&evs);
        let (p, cut) = run(&c, &[("1", local(5, ORIGIN, 1))], Resolver::LastUpdateWins);
        assert_eq!((p.txns, cut), (1, Some(CutReason::InGroupConflict)));
        assert_eq!(p.writes.len(), 1);

        // A parked conflict goes one by one (its record needs a comparison only SQL makes).
        let evs = vec![
            (0, ev(Op::Update, 10, None, Some(&[("id", "2"), ("v", "a")]))),
            (1, ev(Op::Update, 11, None, Some(&[("id", "1"), ("v", "b")]))),
        ];
        let c = changes(&evs);
        let (p, cut) = run(&c, &[("1", local(5, "n2", 2)), ("2", local(5, ORIGIN, 1))], Resolver::Manual);
        assert_eq!((p.txns, cut), (1, Some(CutReason::ResolverNeedsOneByOne)));
        assert_eq!(p.writes.iter().map(|w| w.key[0]).collect::<Vec<_>>(), ["2"], "nothing of the cut transaction is written");

        // A key change; an update of a missing row whose key the group does not lock.
        let evs = vec![(0, ev(Op::Update, 10, Some(&[("id", "1")]), Some(&[("id", "9"), ("v", "a")])))];
        let c = changes(&evs);
        assert_eq!(run(&c, &[("1", local(5, ORIGIN, 1))], Resolver::LastUpdateWins).1, Some(CutReason::KeyChange));
        let evs = vec![(0, ev(Op::Update, 10, None, Some(&[("id", "1"), ("v", "a")])))];
        let c = changes(&evs);
        let (p, cut) = run(&c, &[], Resolver::LastUpdateWins);
        assert_eq!((p.txns, cut), (0, Some(CutReason::UnlockedMissingRow)));
    }

    #[test]
    fn a_change_that_may_be_made_on_top_of_the_local_row_goes_one_by_one() {
        // Another node's later update with a before image: only the row can tell whether it
        // was made on top of the local version (then it is no conflict), so the group is cut
        // under every resolver that would not apply it anyway.
        let evs = vec![
            (0, ev(Op::Update, 10, None, Some(&[("id", "2"), ("v", "a")]))),
            (1, ev(Op::Update, 11, Some(&[("id", "1"), ("v", "old")]), Some(&[("id", "1"), ("v", "b")]))),
        ];
        let c = changes(&evs);
        let before = [("1", local(5, "n2", 2)), ("2", local(5, ORIGIN, 1))];
        for resolver in [Resolver::FirstUpdateWins, Resolver::KeepLocal, Resolver::Manual, Resolver::Error] {
            let (p, cut) = run(&c, &before, resolver);
            assert_eq!((p.txns, cut), (1, Some(CutReason::BeforeImage)), "{resolver:?}");
        }
        // Last update wins applies it whatever the row: no cut.
        let (p, cut) = run(&c, &before, Resolver::LastUpdateWins);
        assert_eq!((p.txns, cut), (2, None));
        // Without a before image, or dated before the local row, it is a conflict as before.
        let evs = vec![(0, ev(Op::Update, 11, None, Some(&[("id", "1"), ("v", "b")])))];
        let c = changes(&evs);
        let (p, cut) = run(&c, &before, Resolver::FirstUpdateWins);
        assert_eq!((cut, p.conflicts[0].resolution), (None, Resolution::KeepLocal));
        let evs = vec![(0, ev(Op::Delete, 3, Some(&[("id", "1"), ("v", "old")]), None))];
        let c = changes(&evs);
        let (p, cut) = run(&c, &before, Resolver::KeepLocal);
        assert_eq!((cut, p.conflicts[0].conflict), (None, ConflictType::DeleteOriginDiffers));
    }

    #[test]
    fn unchanged_toast_values_are_left_as_they_are() {
        let mut e = ev(Op::Update, 10, None, Some(&[("id", "1"), ("big", ""), ("v", "a")]));
        e.after.as_mut().expect("after")[1].1 = None;
        e.unchanged_toast = vec!["big".into()];
        let evs = vec![(0, e)];
        let c = changes(&evs);
        let (p, _) = run(&c, &[("1", local(5, ORIGIN, 1))], Resolver::LastUpdateWins);
        assert_eq!(p.writes[0].action, Action::Update(vec![("id", Some("1")), ("v", Some("a"))]));
    }
}
