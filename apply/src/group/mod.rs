//! Grouped apply (DESIGN.md, "Apply", "Grouping"): consecutive source transactions of one origin
//! written in one local transaction with a bounded number of round trips, whatever their size:
//!
//! 1. **read** ([`Writer::write_group`], first round trip): `BEGIN`, the key locks of every key an
//!    insert or delete touches (in a fixed order), then the local state of every key — whether
//!    a row exists, its version, stamp, origin, tombstone — one statement per table (plus, for
//!    versions other groups wrote, their exact stamps where not cached: [`stamps`]);
//! 2. **decide** ([`decide::plan`], pure): every change settled as the one-by-one path settles it,
//!    folded per key in source order, the group cut where that could differ; then, only if there
//!    are conflicts, the local rows their records show;
//! 3. **write** (second round trip): per table and statement shape one array statement (`DELETE …
//!    USING unnest`, `INSERT … SELECT unnest`, `UPDATE … FROM unnest`), the group's record of the
//!    exact stamps of row versions whose source transaction is not the group's last (tied to
//!    this transaction's xid), the stamps of such tombstones, the conflict records, then the
//!    replication origin's LSN and time and `pgferry.apply_progress` of the last applied
//!    transaction, and COMMIT. Each write fails on
//!    the server unless it touches the planned number of rows — and updates and deletes touch a
//!    row only while its `xmin` is the one read — so COMMIT never keeps a partial group or
//!    overwrites a version the group did not decide against.
//!
//! Rows are not locked before the read (the lock cost more than the write: it dirtied every page
//! the update then dirtied again). Instead every update and delete, and the read of a conflict
//! record's local row, touch a row only while its `xmin` is the one read: a row that another
//! writer changed in between fails the group. After a failed group, the next
//! [`LOCKED_GROUPS_AFTER_FAILURE`] groups of the stream also lock the rows they update or delete
//! (`FOR UPDATE`, in key order, before the read), so streams that write the same rows at the
//! same time queue on them instead of failing again and again; the stream tries the failed
//! group once more that way before it goes one by one (`partition_stream.rs`).
//!
//! Under a backlog the read of step 1 is made ahead, on the stream's second session, while
//! the group before is decided and written ([`read_ahead`], [`ReadAhead`];
//! [`WhileWriting::begun`]); that group then hands over the versions it updated ([`Carry`]),
//! which the read could not see yet.
//!
//! Any error leaves the transaction to be rolled back, and the caller applies the same
//! transactions one by one.

pub mod decide;
pub(crate) mod stamps;
mod statements;

use std::collections::BTreeMap;

use rustc_hash::{FxHashMap, FxHashSet};

use pgferry_connectors::postgres::PgSession;
use pgferry_schemas::{DecodedEvent, Op};
use tokio_postgres::types::{ToSql, Type};

use crate::conflict::{ConflictType, LocalVersion, Resolution};
use crate::error::ApplyError;
use crate::progress::format_lsn;
use crate::writer::{prepare_cached, row_json, LocalTable, Writer};
use decide::{Action, Before, Change, KeyMap};

/// One source transaction of a group.
#[derive(Debug)]
pub struct SourceTxn {
    /// Its commit LSN on the origin.
    pub commit_lsn: u64,
    /// Its commit time on the origin (µs since the Unix epoch).
    pub commit_ts_us: i64,
    /// Kafka offset of its last message.
    pub last_offset: i64,
    /// Its row changes, in order.
    pub changes: Vec<DecodedEvent>,
}

/// What a group wrote.
#[derive(Debug, Default)]
pub struct GroupOutcome {
    /// How many of the transactions it applied (a prefix of them; 0: the first must go one by
    /// one, and nothing was written).
    pub txns: usize,
    /// Row changes of the applied transactions.
    pub rows: u64,
    /// The conflicts settled (type, resolution).
    pub conflicts: Vec<(ConflictType, Resolution)>,
    /// Why the group was cut, if it was.
    pub cut: Option<decide::CutReason>,
    /// What a read of the next group made before this one committed must take from it
    /// ([`Commit::carry`]).
    pub carry: Option<Carry>,
    /// Whether the group was written with the read made ahead for it.
    pub read_ahead: bool,
}

/// The next group's first round trip made ahead, on another session, while the group before
/// it was decided, written and committed (`partition_stream.rs`): `BEGIN`, the key locks and
/// the key states, its transaction left open for that group to write in. It covers the source
/// transactions at Kafka offsets from `first_offset`, `txns` of them; a group of the same
/// first offset and no more transactions uses it.
pub struct ReadAhead {
    /// Offset of the first message of its first transaction.
    pub first_offset: i64,
    /// How many source transactions it covers.
    pub txns: usize,
    /// Its tables, in lock order.
    pub names: Vec<(String, String)>,
    /// Per table, the keys read (each key's text values, in key order).
    pub keys: Vec<Vec<Vec<String>>>,
    /// Per table, the state rows as [`statements::read_state`] returns them.
    pub rows: Vec<Vec<tokio_postgres::Row>>,
}

/// What a committed group changed that a read made before its commit could not see: the
/// keys it updated (the row exists before and after, its tombstone untouched), whose version
/// is now this group's, and the keys it wrote otherwise (inserted, deleted, tombstoned), which
/// a read ahead must not be used for.
#[derive(Debug, Default)]
pub struct Carry {
    /// The group's xid as `xmin` shows it (32 bits).
    xmin: i64,
    /// The group's origin.
    origin: String,
    /// Table name → key (JSON text) → commit time (µs) of the source transaction whose
    /// version the group wrote.
    updated: FxHashMap<String, FxHashMap<String, i64>>,
    /// Table name → keys (JSON text) the group inserted, deleted or tombstoned.
    other: FxHashMap<String, FxHashSet<String>>,
}

impl Carry {
    fn of(plan: &decide::Plan<'_>, before: &[KeyMap<'_, Before>], table_names: &[String], txns: &[SourceTxn], origin: &str, xmin: i64) -> Carry {
        let mut carry = Carry {
            xmin,
            origin: origin.to_string(),
            ..Carry::default()
        };
        // Per table index first (no table name cloned per write), then by name.
        let mut updated: Vec<FxHashMap<String, i64>> = vec![FxHashMap::default(); table_names.len()];
        let mut other: Vec<FxHashSet<String>> = vec![FxHashSet::default(); table_names.len()];
        for w in &plan.writes {
            let Some(b) = before[w.table].get(&w.key) else { continue };
            match w.action {
                Action::Update(_) => {
                    updated[w.table].insert(b.key_json.clone(), txns[w.txn].commit_ts_us);
                }
                _ => {
                    other[w.table].insert(b.key_json.clone());
                }
            }
        }
        let named = table_names.iter().cloned();
        carry.updated = named.clone().zip(updated).filter(|(_, m)| !m.is_empty()).collect();
        carry.other = named.zip(other).filter(|(_, m)| !m.is_empty()).collect();
        carry
    }
}

/// A read ahead for a group, and what the group before it left ([`Carry`]).
pub struct Ahead<'a> {
    /// The read.
    pub read: &'a ReadAhead,
    /// The previous group's changes.
    pub carry: &'a Carry,
}

/// Work run while a group's writes and COMMIT travel (after they were all sent), and the
/// signal it gets once they have been answered.
pub struct WhileWriting<'a> {
    /// The work.
    pub work: std::pin::Pin<&'a mut (dyn std::future::Future<Output = ()> + Send + 'a)>,
    /// Told when the group's round trip has been answered.
    pub written: &'a tokio::sync::Notify,
    /// Whether the work was begun before the group (it sent the next group's read ahead,
    /// `partition_stream.rs`). If the group then has to read again (its own read made ahead
    /// cannot be used), that read could wait for a key lock the next group's read holds while
    /// that read waits for the group: so the group first sets [`WhileWriting::reread`], tells
    /// [`WhileWriting::written`], and drives the work to its end (which drops what it read).
    pub begun: bool,
    /// Set when the group read again before its writes (see [`WhileWriting::begun`]).
    pub reread: &'a std::sync::atomic::AtomicBool,
}

/// How a group's local transaction ends, sent with its writes (one round trip): the session's
/// prepared `pg_replication_origin_xact_setup(lsn, ts)` and progress upsert (see
/// `partition_stream.rs`), and where the progress goes.
pub struct Commit<'a> {
    /// `pg_replication_origin_xact_setup($1::text::pg_lsn, ts $2)`.
    pub xact_setup: &'a tokio_postgres::Statement,
    /// [`crate::progress::UPSERT`].
    pub progress: &'a tokio_postgres::Statement,
    /// The partition's topic.
    pub topic: &'a str,
    /// The partition.
    pub partition: i32,
    /// Whether to return the group's [`Carry`] (the next group was read ahead).
    pub carry: bool,
}

/// How many tables' answers [`Writer::groupable`] keeps (looked up one by one: a few tables
/// are the common case).
const GROUPABLE_SEEN: usize = 16;

/// How many groups take row locks after a group failed (see the module doc).
const LOCKED_GROUPS_AFTER_FAILURE: u32 = 16;

/// A `text[]` parameter.
type TextArray<'a> = Vec<Option<&'a str>>;

/// A table's keys a group inserts (table index, writes) and the xids of their tombstones as
/// read (text; None: none).
type InsertedKeys<'p, 'e> = (usize, Vec<&'p decide::KeyWrite<'e>>, Vec<Option<String>>);

impl Writer {
    /// Whether a change of `ev`'s table can be part of a group: a replicated table with a
    /// primary key and nothing that needs per-change handling (delta columns, secondary unique
    /// keys, `on_error = skip_change`, foreign keys, user triggers). Tables held only in another
    /// region are groupable (their changes are dropped). Any error: not groupable (the one-by-one
    /// path reports it).
    pub async fn groupable(&mut self, sql: &PgSession, ev: &DecodedEvent) -> bool {
        if matches!(ev.op, Op::Truncate) {
            return false;
        }
        // Asked for every change of a group: the answer per table is kept (`groupable_seen`),
        // which spares the config's table rules and the metadata lookup's key copies.
        if let Some((.., groupable)) = self.groupable_seen.iter().find(|(s, t, _)| *s == ev.schema && *t == ev.table) {
            return *groupable;
        }
        let groupable = if self.local_elsewhere(&ev.schema, &ev.table) {
            true
        } else if self.config.on_error(&ev.schema, &ev.table) == pgferry_connectors::config::OnError::SkipChange {
            false
        } else {
            match self.table(sql, ev).await {
                Ok(t) => t.groupable,
                Err(_) => return false,
            }
        };
        if self.groupable_seen.len() < GROUPABLE_SEEN {
            self.groupable_seen.push((ev.schema.clone(), ev.table.clone(), groupable));
        }
        groupable
    }

    /// Applies a prefix of `txns` — consecutive source transactions of `origin`, all of whose
    /// tables are [`Writer::groupable`] — in one local transaction, committed under the last
    /// applied transaction's commit LSN and time with its progress (`commit`). `Ok` with 0
    /// transactions: nothing was written and the transaction is left open; on `Err` it may be
    /// open too: the caller rolls back either way.
    pub async fn write_group(
        &mut self,
        sql: &PgSession,
        origin: &str,
        txns: &[SourceTxn],
        commit: Commit<'_>,
        ahead: Option<Ahead<'_>>,
        while_writing: WhileWriting<'_>,
    ) -> Result<GroupOutcome, ApplyError> {
        let origin_id = self.config.node(origin).map_or(0, |n| n.id);
        // The group's tables in a fixed order (the lock order), and its changes.
        let names = group_tables(txn_events(txns), |schema, table| self.local_elsewhere(schema, table));
        if let Some(missing) = names.iter().find(|n| !self.tables.contains_key(*n)) {
            return Err(self.group_err(origin, missing, "table metadata not loaded".into()));
        }
        let changes = group_changes(txn_events(txns), &names, |i| &self.tables[&names[i]].key)
            .map_err(|(table, message)| self.group_err(origin, &names[table], message))?;

        let t0 = std::time::Instant::now();
        let table_names: Vec<String> = names.iter().map(|n| self.tables[n].name.clone()).collect();
        // Polled to its end while the writes travel, or before this group reads again
        // (`WhileWriting::begun`); `MaybeDone` keeps its end for the second time.
        let WhileWriting { work, written, begun, reread } = while_writing;
        let mut work = futures::future::maybe_done(work);
        let drop_next_read = async {
            if begun {
                reread.store(true, std::sync::atomic::Ordering::Relaxed);
                written.notify_one();
                (&mut work).await;
            }
        };
        let (before, read_ahead) = self.read_before(sql, &names, &table_names, &changes, ahead, drop_next_read).await?;
        let t_read = t0.elapsed();
        let work = std::pin::Pin::new(&mut work);
        let while_writing = WhileWriting { work, written, begun, reread };

        // 2. Decide.
        let resolvers: Vec<_> = names.iter().map(|n| self.tables[n].resolver).collect();
        let (mut plan, cut) = decide::plan(&changes, &before, &resolvers, origin, origin_id);
        let mut outcome = GroupOutcome {
            txns: plan.txns,
            rows: changes.iter().filter(|c| c.txn < plan.txns).count() as u64,
            conflicts: plan.conflicts.iter().map(|c| (c.conflict, c.resolution)).collect(),
            cut,
            carry: None,
            read_ahead,
        };
        if plan.txns == 0 {
            return Ok(outcome);
        }
        // Rows of tables held elsewhere count as handled, like the one-by-one path's.
        outcome.rows += txns[..plan.txns]
            .iter()
            .flat_map(|t| &t.changes)
            .filter(|ev| self.local_elsewhere(&ev.schema, &ev.table))
            .count() as u64;
        let last = plan.txns - 1;

        // The local rows the conflict records show (a round trip only when there are some).
        self.read_local_rows(sql, &names, &before, &mut plan.conflicts).await?;

        // 3. Write.
        let t_plan = t0.elapsed();
        let want_carry = commit.carry;
        let xid = self.write_plan(sql, origin, &names, &table_names, &before, txns, &plan, last, commit, while_writing).await?;
        if let (true, Some(xmin)) = (want_carry, xid) {
            outcome.carry = Some(Carry::of(&plan, &before, &table_names, txns, origin, xmin));
        }
        tracing::debug!(origin = %origin, txns = plan.txns, rows = outcome.rows, conflicts = plan.conflicts.len(),
            read_us = t_read.as_micros() as u64, decide_us = (t_plan - t_read).as_micros() as u64,
            write_us = (t0.elapsed() - t_plan).as_micros() as u64, "group applied");
        Ok(outcome)
    }

    /// Whether the next group locks the rows it updates or deletes before reading them (for a
    /// while after a group failed).
    pub fn locks_rows(&self) -> bool {
        self.locked_groups > 0
    }

    /// Notes how a group ended: after a failure (possibly a row another writer changed since
    /// the read) the next [`LOCKED_GROUPS_AFTER_FAILURE`] groups lock their rows.
    pub fn group_ended(&mut self, failed: bool) {
        self.locked_groups = if failed {
            LOCKED_GROUPS_AFTER_FAILURE
        } else {
            self.locked_groups.saturating_sub(1)
        };
    }

    /// First round trip of a group: `BEGIN`, the key locks of every key an insert or delete
    /// touches, the row locks of every touched key, then every key's local state (per table, key
    /// → state), pipelined — or, given a read made ahead for this group on this session, that
    /// read with the previous group's versions carried in (a new read when it does not cover the
    /// group, or the previous group inserted, deleted or tombstoned one of its keys).
    async fn read_before<'e>(
        &mut self,
        sql: &PgSession,
        names: &[(String, String)],
        table_names: &[String],
        changes: &[Change<'e>],
        ahead: Option<Ahead<'_>>,
        before_reading_again: impl std::future::Future<Output = ()>,
    ) -> Result<(Vec<KeyMap<'e, Before>>, bool), ApplyError> {
        let (keys, lock, row_lock) = key_sets(changes, names.len(), self.locked_groups > 0);
        if let Some(ahead) = ahead {
            if let Some(before) = self.before_from_ahead(sql, names, table_names, &keys, &ahead).await? {
                return Ok((before, true));
            }
            sql.client.batch_execute("ROLLBACK").await.map_err(sql.err("rolling back a read made ahead"))?;
            before_reading_again.await;
        }
        let t_start = std::time::Instant::now();
        let tables: Vec<&LocalTable> = names.iter().map(|n| &*self.tables[n]).collect();
        let state_rows = issue_read(sql, &mut self.statements, &tables, &keys, &lock, &row_lock).await?;
        let t_server = t_start.elapsed();
        let rows: Vec<&[tokio_postgres::Row]> = state_rows.iter().map(Vec::as_slice).collect();
        let before = self.interpret(sql, table_names, &rows, |i, pos| keys[i].get(pos).copied()).await?;
        tracing::debug!(keys = keys.iter().map(Vec::len).sum::<usize>(), until_read_us = t_server.as_micros() as u64,
            rows_us = (t_start.elapsed() - t_server).as_micros() as u64, "group read");
        Ok((before, false))
    }

    /// The group's key states from a read made ahead (None: it does not serve this group).
    async fn before_from_ahead<'e>(
        &mut self,
        sql: &PgSession,
        names: &[(String, String)],
        table_names: &[String],
        keys: &[Vec<&Vec<&'e str>>],
        ahead: &Ahead<'_>,
    ) -> Result<Option<Vec<KeyMap<'e, Before>>>, ApplyError> {
        let read = ahead.read;
        // Per table of the group: the read's table, whose keys begin with the group's (the read
        // lists the keys of the same transactions, or of more, in order of first appearance, as
        // the group does: checked, and if not so the group reads for itself).
        let mut rows: Vec<&[tokio_postgres::Row]> = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            let Some(j) = read.names.iter().position(|n| n == name) else { return Ok(None) };
            let read_keys = &read.keys[j];
            let same = |k: &Vec<&str>, r: &Vec<String>| k.len() == r.len() && k.iter().zip(r).all(|(a, b)| *a == b);
            if keys[i].len() > read_keys.len() || !keys[i].iter().zip(read_keys).all(|(k, r)| same(k, r)) {
                return Ok(None);
            }
            rows.push(&read.rows[j]);
        }
        let mut before = self.interpret(sql, table_names, &rows, |i, pos| keys[i].get(pos).copied()).await?;
        let carry = ahead.carry;
        for (i, states) in before.iter_mut().enumerate() {
            let name = &table_names[i];
            let (updated, other) = (carry.updated.get(name), carry.other.get(name));
            for b in states.values_mut() {
                if other.is_some_and(|o| o.contains(&b.key_json)) {
                    return Ok(None);
                }
                if let Some(&ts) = updated.and_then(|u| u.get(&b.key_json)) {
                    b.row = Some(LocalVersion {
                        stamp: self.stamp(Some(ts), Some(&carry.origin)),
                        origin: Some(carry.origin.clone()),
                        row_json: String::new(),
                    });
                    b.xmin = Some(carry.xmin);
                }
            }
        }
        Ok(Some(before))
    }

    /// The key states of a group's read: `rows[i]` the state rows of table `i`, `key_at(i, p)`
    /// the group's key at position `p` of that table's read (None: not the group's).
    async fn interpret<'k, 'e: 'k>(
        &mut self,
        sql: &PgSession,
        table_names: &[String],
        state_rows: &[&[tokio_postgres::Row]],
        key_at: impl Fn(usize, usize) -> Option<&'k Vec<&'e str>>,
    ) -> Result<Vec<KeyMap<'e, Before>>, ApplyError> {
        // The stamp buckets of the versions read that groups wrote, where not cached.
        let bucket = |i: usize, r: &tokio_postgres::Row| -> Option<(i64, i32)> {
            let buckets: Option<i32> = r.get(9);
            (r.get::<_, bool>(2) && buckets.is_some()).then(|| {
                let key: &str = r.get(1);
                (r.get::<_, i64>(5), stamps::bucket_of(&table_names[i], key, buckets.unwrap_or(1)))
            })
        };
        let missing: std::collections::BTreeSet<(i64, i32)> = state_rows
            .iter()
            .enumerate()
            .flat_map(|(i, rows)| rows.iter().filter_map(move |r| bucket(i, r)))
            .filter(|(xid, b)| self.group_stamps.get(*xid, *b).is_none())
            .collect();
        if !missing.is_empty() {
            let (xids, numbers): (Vec<i64>, Vec<i32>) = missing.into_iter().unzip();
            let fetch = self.prepared_typed(sql, stamps::FETCH, &[Type::INT8_ARRAY, Type::INT4_ARRAY]).await?;
            for r in sql.client.query(&fetch, &[&xids, &numbers]).await.map_err(sql.err("reading groups' stamps"))? {
                let (xid, b): (i64, i32) = (r.get(0), r.get(1));
                let stamps = stamps::from_json(r.get(2)).map_err(|e| ApplyError::Write {
                    origin: String::new(),
                    table: "pgferry.xact_stamps".into(),
                    message: format!("the stamps of transaction {xid}, bucket {b}, do not parse: {e}"),
                })?;
                self.group_stamps.put(xid, b, std::sync::Arc::new(stamps));
            }
        }
        let mut before: Vec<KeyMap<Before>> = vec![KeyMap::default(); state_rows.len()];
        for (i, rows) in state_rows.iter().enumerate() {
            for r in rows.iter() {
                let pos: i64 = r.get(0);
                let Some(key) = usize::try_from(pos - 1).ok().and_then(|p| key_at(i, p)) else { continue };
                let key_json: String = r.get(1);
                let row = if r.get::<_, bool>(2) {
                    let stamped: Option<String> = r.get(6);
                    let origin_name = match (stamped, r.get::<_, Option<i64>>(4)) {
                        (Some(s), _) => Some(s),
                        (None, Some(id)) => self.origin_of(sql, id).await?,
                        (None, None) => None,
                    };
                    // A version a group wrote for an earlier transaction than its last carries
                    // that transaction's time in the group's record.
                    let mut ts: Option<i64> = r.get(3);
                    if let Some((xid, b)) = bucket(i, r) {
                        if let Some(t) = self.group_stamps.get(xid, b).and_then(|m| m.get(&table_names[i])?.get(&key_json)) {
                            ts = Some(*t);
                        }
                    }
                    Some(LocalVersion {
                        stamp: self.stamp(ts, origin_name.as_deref()),
                        origin: origin_name,
                        // Read only for the keys a conflict record shows (`local_rows`).
                        row_json: String::new(),
                    })
                } else {
                    None
                };
                let tombstone = match r.get::<_, Option<i64>>(8) {
                    Some(id) => {
                        let o = self.origin_of(sql, id).await?;
                        self.stamp(r.get(7), o.as_deref())
                    }
                    None => None,
                };
                // The table's last truncate counts as a tombstone of every key (`writer::truncate`).
                let truncated = match r.get::<_, Option<i64>>(12) {
                    Some(id) => {
                        let o = self.origin_of(sql, id).await?;
                        self.stamp(r.get(11), o.as_deref())
                    }
                    None => None,
                };
                let tombstone = tombstone.max(truncated);
                let xmin = if row.is_some() { r.get::<_, Option<i64>>(5) } else { None };
                before[i].insert(
                    key.clone(),
                    Before {
                        row,
                        tombstone,
                        key_json,
                        xmin,
                        tombstone_xid: r.get(10),
                    },
                );
            }
        }
        Ok(before)
    }

    /// Fills in the local row (`to_jsonb`) of every conflict record that shows one: one
    /// statement per table with such records, pipelined. The rows are locked since the read, so
    /// they are the versions the conflicts were settled against.
    async fn read_local_rows(
        &mut self,
        sql: &PgSession,
        names: &[(String, String)],
        before: &[KeyMap<'_, Before>],
        conflicts: &mut [decide::ConflictRecord<'_>],
    ) -> Result<(), ApplyError> {
        let mut wanted: Vec<Vec<usize>> = vec![Vec::new(); names.len()];
        for (ci, c) in conflicts.iter().enumerate() {
            if c.local.is_some() {
                wanted[c.table].push(ci);
            }
        }
        let tables: Vec<usize> = (0..names.len()).filter(|&t| !wanted[t].is_empty()).collect();
        if tables.is_empty() {
            return Ok(());
        }
        let mut prepared = Vec::new();
        for &t in &tables {
            let table = &self.tables[&names[t]];
            let text = statements::local_rows(table);
            let types = vec![Type::TEXT_ARRAY; table.key.len() + 1];
            prepared.push(self.prepared_typed(sql, &text, &types).await?);
        }
        let xmins: Vec<Vec<Option<String>>> = tables
            .iter()
            .map(|&t| {
                wanted[t]
                    .iter()
                    .map(|&ci| before[t].get(&conflicts[ci].key).and_then(|b| b.xmin).map(|x| x.to_string()))
                    .collect()
            })
            .collect();
        let key_params: Vec<Vec<TextArray>> = tables
            .iter()
            .zip(&xmins)
            .map(|(&t, x)| {
                let keys: Vec<&Vec<&str>> = wanted[t].iter().map(|&ci| &conflicts[ci].key).collect();
                let mut arrays = columns(&keys, self.tables[&names[t]].key.len());
                arrays.push(x.iter().map(|v| v.as_deref()).collect());
                arrays
            })
            .collect();
        let params: Vec<_> = key_params.iter().map(|k| params(k, None)).collect();
        let rows = futures::future::try_join_all(prepared.iter().zip(&params).map(|(s, p)| sql.client.query(s, p)))
            .await
            .map_err(sql.err("reading the local rows of a group's conflicts"))?;
        for (&t, rows) in tables.iter().zip(rows) {
            if rows.len() != wanted[t].len() {
                // A row changed since the read (a writer that takes no key lock): the group's
                // decisions may be stale, so it goes one by one.
                return Err(self.group_err("", &names[t], "a conflicting row changed since the group read it".into()));
            }
            for r in rows {
                let pos: i64 = r.get(0);
                let Some(&ci) = usize::try_from(pos - 1).ok().and_then(|p| wanted[t].get(p)) else { continue };
                if let Some(local) = conflicts[ci].local.as_mut() {
                    local.row_json = r.get(1);
                }
            }
        }
        Ok(())
    }

    /// Runs the plan's writes, pipelined, checking each statement's row count.
    #[allow(clippy::too_many_arguments)]
    async fn write_plan(
        &mut self,
        sql: &PgSession,
        origin: &str,
        names: &[(String, String)],
        table_names: &[String],
        before: &[KeyMap<'_, Before>],
        txns: &[SourceTxn],
        plan: &decide::Plan<'_>,
        last: usize,
        commit: Commit<'_>,
        while_writing: WhileWriting<'_>,
    ) -> Result<Option<i64>, ApplyError> {
        let ts_text: Vec<String> = txns.iter().map(|t| t.commit_ts_us.to_string()).collect();
        // The conflict records' columns (owned: most are made here).
        let mut records: Vec<Vec<Option<String>>> = vec![Vec::with_capacity(plan.conflicts.len()); 13];
        for c in &plan.conflicts {
            let ev = c.ev;
            let remote_row = match ev.op {
                Op::Delete => ev.before.as_ref(),
                _ => ev.after.as_ref(),
            }
            .map(row_json);
            let values = [
                Some(table_names[c.table].clone()),
                Some(c.key_json.clone()),
                Some(c.conflict.name().to_string()),
                Some(c.resolver.name().to_string()),
                Some(c.resolution.name().to_string()),
                c.local.as_ref().map(|l| l.row_json.clone()),
                c.local.as_ref().and_then(|l| l.origin.clone()),
                c.local.as_ref().and_then(|l| l.stamp).map(|s| s.ts_us.to_string()),
                Some(ev.op.code().to_string()),
                remote_row,
                Some(ev.origin.clone()),
                Some(ev.commit_ts_us.to_string()),
                Some(format_lsn(ev.commit_lsn)),
            ];
            for (col, v) in records.iter_mut().zip(values) {
                col.push(v);
            }
        }
        // The xmin each written row had when read (the writes touch only that version).
        let xmins: Vec<FxHashMap<&Vec<&str>, String>> = (0..names.len())
            .map(|ti| {
                plan.writes
                    .iter()
                    .filter(|w| w.table == ti)
                    .filter_map(|w| before[ti].get(&w.key).and_then(|b| b.xmin).map(|x| (&w.key, x.to_string())))
                    .collect()
            })
            .collect();
        let mut writes: Vec<GroupWrite> = Vec::new();
        let mut group_stamps: Vec<(String, String, i64)> = Vec::new();
        for (ti, name) in names.iter().enumerate() {
            let t = &self.tables[name];
            let ws: Vec<&decide::KeyWrite> = plan.writes.iter().filter(|w| w.table == ti).collect();
            let pick = |f: &dyn Fn(&decide::KeyWrite) -> bool| -> Vec<&decide::KeyWrite> { ws.iter().copied().filter(|w| f(w)).collect() };
            let deletes = pick(&|w| matches!(w.action, Action::Delete));
            let tombs = pick(&|w| matches!(w.action, Action::Tombstone));
            let early_rows = pick(&|w| w.txn != last && matches!(w.action, Action::Insert(_) | Action::Update(_)));
            let early_tombs = pick(&|w| w.txn != last && matches!(w.action, Action::Delete | Action::Tombstone));
            let with_ts = |ws: &[&decide::KeyWrite<'_>]| -> Vec<Option<&str>> { ws.iter().map(|w| Some(ts_text[w.txn].as_str())).collect() };
            writes.push(GroupWrite::keyed(t, statements::delete(t), &deletes, Some(xmin_array(&xmins, &deletes)), vec![]));
            writes.push(GroupWrite::keyed(t, statements::tombstones(t), &tombs, None, vec![t.name.clone()]));
            // Inserts and updates, one statement per set of columns.
            let mut shapes: BTreeMap<(bool, Vec<&str>), Vec<(&decide::KeyWrite, Vec<Option<&str>>)>> = BTreeMap::new();
            for w in &ws {
                let (insert, image) = match &w.action {
                    Action::Insert(image) => (true, image),
                    Action::Update(image) => (false, image),
                    _ => continue,
                };
                // Key columns too, as the one-by-one path's update sets them.
                let mut cols: Vec<(&str, Option<&str>)> = image.clone();
                cols.sort_by(|a, b| a.0.cmp(b.0));
                let (shape, values): (Vec<&str>, Vec<Option<&str>>) = cols.into_iter().unzip();
                shapes.entry((insert, shape)).or_default().push((*w, values));
            }
            for ((insert, shape), rows) in shapes {
                let keyed: Vec<&decide::KeyWrite> = rows.iter().map(|(w, _)| *w).collect();
                let mut w = if insert {
                    GroupWrite::keyed(t, statements::insert(t, &shape), &keyed, None, vec![])
                } else {
                    GroupWrite::keyed(t, statements::update(t, &shape), &keyed, Some(xmin_array(&xmins, &keyed)), vec![])
                };
                if insert {
                    // An insert's key is among its columns.
                    w.arrays.clear();
                }
                for c in 0..shape.len() {
                    w.arrays.push(rows.iter().map(|(_, v)| v[c]).collect());
                }
                writes.push(w);
            }
            // The exact stamps of versions written by a transaction other than the last.
            for w in &early_rows {
                let Some(b) = before[ti].get(&w.key) else {
                    return Err(self.group_err(origin, name, "a written key was not read".into()));
                };
                group_stamps.push((table_names[ti].clone(), b.key_json.clone(), txns[w.txn].commit_ts_us));
            }
            writes.push(GroupWrite::keyed(t, statements::tombstone_stamps(t), &early_tombs, Some(with_ts(&early_tombs)), vec![t.name.clone()]));
        }
        if !plan.conflicts.is_empty() {
            writes.push(GroupWrite {
                text: statements::CONFLICTS.into(),
                arrays: records.iter().map(|c| c.iter().map(|v| v.as_deref()).collect()).collect(),
                scalars: vec![],
                expected: plan.conflicts.len() as u64,
            });
        }
        writes.retain(|w| w.expected > 0);
        // After the inserts, each table's inserted keys must still have the tombstone read
        // (`statements::inserts_unraced`).
        let mut inserted: Vec<InsertedKeys> = Vec::new();
        for (ti, read) in before.iter().enumerate() {
            let ws: Vec<&decide::KeyWrite> =
                plan.writes.iter().filter(|w| w.table == ti && matches!(w.action, Action::Insert(_))).collect();
            if !ws.is_empty() {
                let xids = ws.iter().map(|w| read.get(&w.key).and_then(|b| b.tombstone_xid).map(|x| x.to_string())).collect();
                inserted.push((ti, ws, xids));
            }
        }
        let mut checks = Vec::with_capacity(inserted.len());
        for (ti, ..) in &inserted {
            let t = &self.tables[&names[*ti]];
            let mut types = vec![Type::TEXT_ARRAY; t.key.len() + 1];
            types.push(Type::TEXT);
            checks.push(self.prepared_typed(sql, &statements::inserts_unraced(t), &types).await?);
        }
        let check_arrays: Vec<Vec<TextArray>> = inserted
            .iter()
            .map(|(ti, ws, xids)| {
                let mut arrays: Vec<TextArray> = (0..self.tables[&names[*ti]].key.len())
                    .map(|c| ws.iter().map(|w| Some(w.key[c])).collect())
                    .collect();
                arrays.push(xids.iter().map(|x| x.as_deref()).collect());
                arrays
            })
            .collect();
        let check_params: Vec<_> = inserted
            .iter()
            .zip(&check_arrays)
            .map(|((ti, ..), arrays)| params(arrays, Some(&table_names[*ti])))
            .collect();
        let mut stmts = Vec::with_capacity(writes.len());
        for w in &writes {
            let mut types = vec![Type::TEXT_ARRAY; w.arrays.len()];
            types.extend(w.scalars.iter().map(|_| Type::TEXT));
            types.push(Type::INT8);
            stmts.push(self.prepared_typed(sql, &statements::counted(&w.text, types.len()), &types).await?);
        }
        let expected: Vec<i64> = writes.iter().map(|w| w.expected as i64).collect();
        let params: Vec<Vec<&(dyn ToSql + Sync)>> = writes
            .iter()
            .zip(&expected)
            .map(|(w, n)| {
                let mut p: Vec<&(dyn ToSql + Sync)> = w.arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
                p.extend(w.scalars.iter().map(|s| s as &(dyn ToSql + Sync)));
                p.push(n);
                p
            })
            .collect();
        // Writes, progress and COMMIT in one round trip. Each write fails on the server when it
        // touches another number of rows than planned (`statements::counted`), which aborts the
        // transaction, so that COMMIT rolls it back.
        let last_txn = &txns[last];
        let lsn = format_lsn(last_txn.commit_lsn);
        let setup: [&(dyn ToSql + Sync); 2] = [&lsn, &last_txn.commit_ts_us];
        let progress: [&(dyn ToSql + Sync); 6] =
            [&origin, &commit.topic, &commit.partition, &last_txn.last_offset, &lsn, &last_txn.commit_ts_us];
        let written = futures::future::try_join_all(stmts.iter().zip(&params).map(|(s, p)| sql.client.query_one(s, p)));
        let unraced = futures::future::try_join_all(checks.iter().zip(&check_params).map(|(s, p)| sql.client.query_one(s, p)));
        // The group's exact stamps, if any version needs one, in buckets.
        let buckets = stamps::buckets_for(group_stamps.len());
        let split: Vec<(i32, std::sync::Arc<stamps::Stamps>)> = stamps::split(group_stamps, buckets)
            .into_iter()
            .map(|(b, s)| (b, std::sync::Arc::new(s)))
            .collect();
        let numbers: Vec<i32> = split.iter().map(|(b, _)| *b).collect();
        let texts: Vec<String> = split.iter().map(|(_, s)| stamps::to_json(s)).collect();
        let insert_stamps = match split.is_empty() {
            false => Some(self.prepared_typed(sql, stamps::INSERT, &[Type::INT4, Type::INT8, Type::INT4_ARRAY, Type::TEXT_ARRAY]).await?),
            true => None,
        };
        // The group's xid (as `xmin` shows it) comes with its stamps, or alone when the next
        // group's read ahead needs it (`Carry`).
        let xid_alone = match (&insert_stamps, commit.carry) {
            (None, true) => Some(self.prepared_typed(sql, "SELECT (txid_current() % 4294967296)::int8", &[]).await?),
            _ => None,
        };
        let recorded = async {
            match (&insert_stamps, &xid_alone) {
                (Some(st), _) => sql
                    .client
                    .query_one(st, &[&buckets, &last_txn.commit_ts_us, &numbers, &texts])
                    .await
                    .map(|r| Some(r.get::<_, i64>(0))),
                (None, Some(st)) => sql.client.query_one(st, &[]).await.map(|r| Some(r.get::<_, i64>(0))),
                (None, None) => Ok(None),
            }
        };
        let all = async {
            futures::try_join!(
                written,
                unraced,
                recorded,
                sql.client.execute(commit.xact_setup, &setup),
                sql.client.execute(commit.progress, &progress),
                sql.client.batch_execute("COMMIT")
            )
        };
        let mut all = std::pin::pin!(all);
        // The first poll hands every request to the connection task, which sends them while
        // `while_writing` runs here (what follows is decoded and read ahead, or its read sent
        // before is awaited, while the server works). A `yield_now` between the two, to let
        // the connection task send first, was tried and removed: steady-state latency at 1000
        // tps went from ~60 to ~400 ms p50 (A/B runs, comparison-notes.md).
        let first = futures::poll!(all.as_mut());
        let WhileWriting { work, written, .. } = while_writing;
        let done = match first {
            std::task::Poll::Ready(r) => {
                written.notify_one();
                work.await;
                r
            }
            std::task::Poll::Pending => {
                let sent = std::time::Instant::now();
                let answered = async {
                    let r = all.await;
                    written.notify_one();
                    tracing::debug!(answered_us = sent.elapsed().as_micros() as u64, "group writes answered");
                    r
                };
                futures::join!(answered, work).0
            }
        };
        let (_, _, xid, ..) = done.map_err(sql.err("writing and committing a group"))?;
        if let (Some(xid), false) = (xid, split.is_empty()) {
            for (b, s) in split {
                self.group_stamps.put(xid, b, s);
            }
        }
        Ok(xid)
    }

    fn group_err(&self, origin: &str, name: &(String, String), message: String) -> ApplyError {
        ApplyError::Write {
            origin: origin.to_string(),
            table: format!("{}.{}", name.0, name.1),
            message,
        }
    }
}

/// One set-based statement of a group: text, `text[]` parameters, then text parameters.
struct GroupWrite<'a> {
    text: String,
    arrays: Vec<TextArray<'a>>,
    scalars: Vec<String>,
    /// The rows it must touch.
    expected: u64,
}

impl<'a> GroupWrite<'a> {
    /// A statement over the keys of `ws` (one array per key column), then `extra` (one more
    /// array), then `scalars`.
    fn keyed(t: &LocalTable, text: String, ws: &[&decide::KeyWrite<'a>], extra: Option<TextArray<'a>>, scalars: Vec<String>) -> GroupWrite<'a> {
        let mut arrays: Vec<TextArray<'a>> = (0..t.key.len()).map(|c| ws.iter().map(|w| Some(w.key[c])).collect()).collect();
        arrays.extend(extra);
        GroupWrite {
            text,
            arrays,
            scalars,
            expected: ws.len() as u64,
        }
    }
}

/// A group's events with the index of their source transaction.
fn txn_events(txns: &[SourceTxn]) -> impl Iterator<Item = (usize, &DecodedEvent)> + Clone {
    txns.iter().enumerate().flat_map(|(i, t)| t.changes.iter().map(move |ev| (i, ev)))
}

/// The tables of `events` in lock order (sorted), without those held only in another region
/// (`elsewhere`).
pub(crate) fn group_tables<'e>(
    events: impl Iterator<Item = (usize, &'e DecodedEvent)>,
    elsewhere: impl Fn(&str, &str) -> bool,
) -> Vec<(String, String)> {
    events
        .map(|(_, ev)| (ev.schema.as_str(), ev.table.as_str()))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|(schema, table)| !elsewhere(schema, table))
        .map(|(schema, table)| (schema.to_string(), table.to_string()))
        .collect()
}

/// The changes of `events` on the tables `names` (`key_columns(i)`: table `i`'s key), in
/// order; changes of other tables are left out (held only in another region, dropped as one
/// by one). `Err`: (table, why) a change cannot be grouped.
pub(crate) fn group_changes<'e, 'k>(
    events: impl Iterator<Item = (usize, &'e DecodedEvent)>,
    names: &[(String, String)],
    key_columns: impl Fn(usize) -> &'k [String],
) -> Result<Vec<Change<'e>>, (usize, String)> {
    let mut changes = Vec::new();
    for (txn, ev) in events {
        let Ok(table) = names.binary_search_by(|n| (n.0.as_str(), n.1.as_str()).cmp(&(&ev.schema, &ev.table))) else {
            continue;
        };
        let key_columns = key_columns(table);
        let key_row = match ev.op {
            Op::Create | Op::Read => ev.after.as_ref(),
            _ => ev.before.as_ref().or(ev.after.as_ref()),
        };
        let Some(key) = key_row.and_then(|r| key_of(key_columns, r)) else {
            return Err((table, format!("{} without its key", ev.op.code())));
        };
        let key_changed =
            ev.op == Op::Update && ev.before.is_some() && ev.after.as_ref().and_then(|a| key_of(key_columns, a)).as_ref() != Some(&key);
        changes.push(Change {
            txn,
            table,
            key,
            key_changed,
            ev,
        });
    }
    Ok(changes)
}

/// Per table: the keys a group reads, those it takes key locks for (inserted or deleted), and
/// — with `lock_rows` — those whose rows it locks (updated or deleted); each once, in order of
/// first appearance, borrowed from the changes.
type KeySets<'c, 'e> = (Vec<Vec<&'c Vec<&'e str>>>, Vec<Vec<&'c Vec<&'e str>>>, Vec<Vec<&'c Vec<&'e str>>>);

fn key_sets<'c, 'e>(changes: &'c [Change<'e>], tables: usize, lock_rows: bool) -> KeySets<'c, 'e> {
    const READ: u8 = 1;
    const LOCK: u8 = 2;
    const ROW_LOCK: u8 = 4;
    let mut keys: Vec<Vec<&Vec<&str>>> = vec![Vec::new(); tables];
    let mut lock: Vec<Vec<&Vec<&str>>> = vec![Vec::new(); tables];
    let mut row_lock: Vec<Vec<&Vec<&str>>> = vec![Vec::new(); tables];
    // Per table, key → which of the three lists it is in (one hash per change).
    let mut seen: Vec<FxHashMap<&Vec<&str>, u8>> = vec![Default::default(); tables];
    for c in changes {
        let flags = seen[c.table].entry(&c.key).or_insert(0);
        if *flags & READ == 0 {
            *flags |= READ;
            keys[c.table].push(&c.key);
        }
        if matches!(c.ev.op, Op::Create | Op::Read | Op::Delete) && *flags & LOCK == 0 {
            *flags |= LOCK;
            lock[c.table].push(&c.key);
        }
        if lock_rows && matches!(c.ev.op, Op::Update | Op::Delete) && *flags & ROW_LOCK == 0 {
            *flags |= ROW_LOCK;
            row_lock[c.table].push(&c.key);
        }
    }
    (keys, lock, row_lock)
}

/// A group's first round trip on `sql` (statements prepared through `cache`, that session's):
/// `BEGIN`, the key locks of `lock`, the row locks of `row_lock`, then the state rows of
/// every key in `keys` (per table, [`statements::read_state`]), pipelined.
async fn issue_read(
    sql: &PgSession,
    cache: &mut std::collections::HashMap<String, tokio_postgres::Statement>,
    tables: &[&LocalTable],
    keys: &[Vec<&Vec<&str>>],
    lock: &[Vec<&Vec<&str>>],
    row_lock: &[Vec<&Vec<&str>>],
) -> Result<Vec<Vec<tokio_postgres::Row>>, ApplyError> {
    let mut prepared = Vec::new();
    for t in tables {
        let (lk, lr, rs) = (statements::lock_keys(t), statements::lock_rows(t), statements::read_state(t));
        let arrays = vec![Type::TEXT_ARRAY; t.key.len()];
        let mut with_name = arrays.clone();
        with_name.push(Type::TEXT);
        prepared.push((
            prepare_cached(cache, sql, &lk, &with_name).await?,
            prepare_cached(cache, sql, &lr, &arrays).await?,
            prepare_cached(cache, sql, &rs, &with_name).await?,
        ));
    }
    let n = tables.len();
    let key_params: Vec<Vec<TextArray>> = (0..n).map(|i| columns(&keys[i], tables[i].key.len())).collect();
    let lock_params: Vec<Vec<TextArray>> = (0..n).map(|i| columns(&lock[i], tables[i].key.len())).collect();
    let row_lock_params: Vec<Vec<TextArray>> = (0..n).map(|i| columns(&row_lock[i], tables[i].key.len())).collect();
    let lock_p: Vec<_> = (0..n).map(|i| params(&lock_params[i], Some(&tables[i].name))).collect();
    let row_p: Vec<_> = (0..n).map(|i| params(&row_lock_params[i], None)).collect();
    let read_p: Vec<_> = (0..n).map(|i| params(&key_params[i], Some(&tables[i].name))).collect();
    let locks = (0..n)
        .filter(|&i| !lock[i].is_empty())
        .map(|i| sql.client.query_one(&prepared[i].0, &lock_p[i]));
    let row_locks = (0..n)
        .filter(|&i| !row_lock[i].is_empty())
        .map(|i| sql.client.query_one(&prepared[i].1, &row_p[i]));
    let reads = (0..n).map(|i| sql.client.query(&prepared[i].2, &read_p[i]));
    let (_, _, _, state_rows) = futures::try_join!(
        sql.client.batch_execute("BEGIN"),
        futures::future::try_join_all(locks),
        futures::future::try_join_all(row_locks),
        futures::future::try_join_all(reads)
    )
    .map_err(sql.err("locking and reading the local rows of a group"))?;
    Ok(state_rows)
}

/// The next group's first round trip made ahead ([`ReadAhead`]) on `sql` (statements through
/// `cache`): the source transactions `txns` (each: the offset of its first message, its
/// events) as one group, on the tables of `tables` (None if a change's table is not among
/// them, or not groupable: the group then reads for itself). Without row locks: a read ahead
/// is only made when the group before it took none.
pub(crate) async fn read_ahead(
    sql: &PgSession,
    cache: &mut std::collections::HashMap<String, tokio_postgres::Statement>,
    tables: &std::collections::HashMap<(String, String), std::sync::Arc<LocalTable>>,
    txns: &[(i64, Vec<&DecodedEvent>)],
    elsewhere: impl Fn(&str, &str) -> bool,
) -> Result<Option<ReadAhead>, ApplyError> {
    let Some(first_offset) = txns.first().map(|t| t.0) else { return Ok(None) };
    let events = || txns.iter().enumerate().flat_map(|(i, t)| t.1.iter().map(move |ev| (i, *ev)));
    let names = group_tables(events(), &elsewhere);
    let Some(local): Option<Vec<&LocalTable>> = names.iter().map(|n| tables.get(n).map(|t| &**t).filter(|t| t.groupable)).collect() else {
        return Ok(None);
    };
    let Ok(changes) = group_changes(events(), &names, |i| &local[i].key) else { return Ok(None) };
    let (keys, lock, row_lock) = key_sets(&changes, names.len(), false);
    let rows = issue_read(sql, cache, &local, &keys, &lock, &row_lock).await?;
    Ok(Some(ReadAhead {
        first_offset,
        txns: txns.len(),
        names,
        keys: keys.iter().map(|t| t.iter().map(|k| k.iter().map(|v| v.to_string()).collect()).collect()).collect(),
        rows,
    }))
}

/// The xmin read for each of `ws` (NULL for none: the guarded write then fails the group).
fn xmin_array<'x, 'k, 'e>(xmins: &'x [FxHashMap<&'k Vec<&'e str>, String>], ws: &[&decide::KeyWrite<'e>]) -> TextArray<'x> {
    ws.iter().map(|w| xmins[w.table].get(&w.key).map(String::as_str)).collect()
}

/// Key columns `0..n` of `keys` as one `text[]` each.
fn columns<'a>(keys: &[&Vec<&'a str>], n: usize) -> Vec<TextArray<'a>> {
    (0..n).map(|c| keys.iter().map(|k| Some(k[c])).collect()).collect()
}

/// `arrays`, then `name`, as statement parameters.
fn params<'p>(arrays: &'p [TextArray<'_>], name: Option<&'p String>) -> Vec<&'p (dyn ToSql + Sync)> {
    let mut p: Vec<&(dyn ToSql + Sync)> = arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
    if let Some(n) = name {
        p.push(n);
    }
    p
}

/// The key columns' values in `row`, in key order (None if one is missing or NULL).
fn key_of<'e>(key: &[String], row: &'e [(String, Option<String>)]) -> Option<Vec<&'e str>> {
    key.iter()
        .map(|k| row.iter().find(|(c, _)| c == k).and_then(|(_, v)| v.as_deref()))
        .collect()
}
