//! Writing decoded changes into local tables, with conflict detection and resolution.
//!
//! Statements are prepared once per text (table, operation, column set); every identifier is
//! quoted and every value bound as a text parameter cast to the local column's type
//! (`$n::text::<type>`), which is lossless for every type.
//!
//! Each change first tries a guarded statement that succeeds only when there is nothing to
//! resolve (an insert whose key is free and not tombstoned; an update or delete of a row last
//! written by the same origin). Only when it touches no row does apply read the local row
//! (`FOR UPDATE`) and its last writer (`pg_xact_commit_timestamp_origin(xmin)`) plus the key's
//! tombstone, classify the conflict, resolve it by the table's resolver and record it in
//! `pgferry.conflicts` — all inside the applying transaction.

use std::collections::{HashMap, HashSet};

use pgferry_connectors::config::{Config, Resolver};
use pgferry_connectors::postgres::{quote_ident, table_columns, PgSession};
use pgferry_schemas::naming::replication_origins_read;
use pgferry_schemas::{DecodedEvent, Op};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Statement;

use crate::conflict::{compare_before_image, decide, stamp_override_or, ConflictType, LocalVersion, Resolution, Stamp};
use crate::error::ApplyError;
use crate::progress::format_lsn;

mod key_change;
mod raced_insert;
mod truncate;
mod unique_keys;

use unique_keys::UniqueCheck;

/// A local table as apply writes it.
pub(crate) struct LocalTable {
    /// `schema.table`, unquoted (the name in tombstones and conflicts).
    pub(crate) name: String,
    /// `"schema"."table"`.
    pub(crate) qualified: String,
    /// Column name → SQL type.
    pub(crate) types: HashMap<String, String>,
    /// Primary-key columns in key order.
    pub(crate) key: Vec<String>,
    pub(crate) resolver: Resolver,
    /// Delta columns: they get `local + (remote_new − remote_old)` whoever wins the row.
    pub(crate) delta: HashSet<String>,
    /// Columns of each secondary unique key.
    pub(crate) unique_keys: Vec<Vec<String>>,
    /// Whether its changes may be applied in groups (`crate::group`): no delta columns, no
    /// secondary unique keys, no foreign key from or to it, no user trigger that fires on apply.
    pub(crate) groupable: bool,
}

/// Whether a table (`$1`, quoted `schema.table`) has a foreign key from or to it, and whether a
/// user trigger fires on it when apply writes (apply writes as a replica, `crate::replica_role`:
/// triggers enabled for replica or always).
const TABLE_LINKS: &str = "SELECT
    EXISTS (SELECT 1 FROM pg_constraint WHERE contype = 'f' AND (conrelid = $1::text::regclass OR confrelid = $1::text::regclass)),
    EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = $1::text::regclass AND NOT tgisinternal
            AND tgname NOT IN ('pgferry_tombstone', 'pgferry_key_change', 'pgferry_truncation') AND tgenabled IN ('R', 'A'))";

/// `text` prepared on `sql` with parameter `types`, from `cache` (the session's prepared
/// statements) or prepared now and kept there.
pub(crate) async fn prepare_cached(
    cache: &mut HashMap<String, Statement>,
    sql: &PgSession,
    text: &str,
    types: &[Type],
) -> Result<Statement, ApplyError> {
    if let Some(s) = cache.get(text) {
        return Ok(s.clone());
    }
    let s = sql
        .client
        .prepare_typed(text, types)
        .await
        .map_err(sql.err("preparing a statement for a group"))?;
    cache.insert(text.to_string(), s.clone());
    Ok(s)
}

/// A row as an event carries it: column name → text value (None = NULL).
type EventRow = Vec<(String, Option<String>)>;

/// Table metadata, prepared statements and origin names of one session.
pub struct Writer {
    pub(crate) config: std::sync::Arc<Config>,
    /// This node's name and id.
    local: (String, u16),
    /// Shared so that a read ahead of the next group (`crate::group::ReadAhead`) can use them
    /// while this writer is busy with the current one.
    pub(crate) tables: HashMap<(String, String), std::sync::Arc<LocalTable>>,
    pub(crate) statements: HashMap<String, Statement>,
    /// Tables whose changes [`Writer::groupable`] answered for, with the answer (emptied when
    /// table metadata or the config changes).
    pub(crate) groupable_seen: Vec<(String, String, bool)>,
    /// `pg_replication_origin.roident` → node name (current and legacy origin names).
    origins: HashMap<i64, String>,
    /// Node name → `roident` of the origin this node's apply writes its changes under now.
    current_origins: HashMap<String, i64>,
    /// When the config file was last re-read for a table outside the replication sets.
    reloaded: Option<std::time::Instant>,
    /// Recent groups' exact stamps (grouped apply).
    pub(crate) group_stamps: crate::group::stamps::StampCache,
    /// Groups still to take row locks before their read (grouped apply, after a failure).
    pub(crate) locked_groups: u32,
}

/// A conflict that was detected and settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Its type.
    pub conflict: ConflictType,
    /// What was done.
    pub resolution: Resolution,
}

/// A key's local state as a change is settled against it ([`Writer::read_key`]).
pub(crate) struct KeyState {
    /// The key as the tombstone trigger writes it (JSON array text).
    pub(crate) key_json: String,
    /// The row at the key, if any.
    pub(crate) local: Option<LocalVersion>,
    /// The key's tombstone, if any, or the table's last truncate where that is newer (a
    /// truncate is a tombstone of every key: `writer::truncate`).
    pub(crate) tombstone: Option<Stamp>,
    /// The xid of the key's own tombstone (`pgferry.tombstones`; not the truncate's), which an
    /// insert is decided against (`raced_insert`).
    pub(crate) tombstone_xid: Option<i64>,
}

impl Writer {
    /// A writer for node `local` that may touch only the config's replicated tables.
    pub fn new(config: std::sync::Arc<Config>, local: &str) -> Writer {
        let local_id = config.node(local).map_or(0, |n| n.id);
        Writer {
            config,
            local: (local.to_string(), local_id),
            tables: HashMap::new(),
            statements: HashMap::new(),
            groupable_seen: Vec::new(),
            origins: HashMap::new(),
            current_origins: HashMap::new(),
            reloaded: None,
            group_stamps: Default::default(),
            locked_groups: 0,
        }
    }

    /// Whether this node applies `schema.table`. A table outside the sets loaded at start may
    /// have been added since (`pgferry repset add-table` edits the config file, then publishes
    /// the table): the file is read again, at most once a second, and its sets taken over.
    fn in_sets(&mut self, schema: &str, table: &str) -> bool {
        if self.config.replicates_table(schema, table) {
            return true;
        }
        if self.reloaded.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(1)) {
            return false;
        }
        self.reloaded = Some(std::time::Instant::now());
        let Some(fresh) = self.config.reload() else {
            return false;
        };
        if fresh.node(&self.local.0).is_none() {
            return false;
        }
        self.config = std::sync::Arc::new(fresh);
        self.groupable_seen.clear();
        tracing::info!(node = %self.local.0, table = %format!("{schema}.{table}"), "replication sets re-read from the config file");
        self.config.replicates_table(schema, table)
    }

    pub(crate) async fn table(&mut self, sql: &PgSession, ev: &DecodedEvent) -> Result<&LocalTable, ApplyError> {
        let id = (ev.schema.clone(), ev.table.clone());
        if !self.tables.contains_key(&id) {
            if !self.in_sets(&ev.schema, &ev.table) {
                return Err(write_err(ev, "not in this node's replication set".into()));
            }
            let Some(cols) = table_columns(sql, &ev.schema, &ev.table).await? else {
                return Err(self.missing(ev, format!("table does not exist at {}", sql.endpoint)));
            };
            if cols.key.is_empty() {
                return Err(write_err(ev, format!("has no primary key at {}", sql.endpoint)));
            }
            let qualified = format!("{}.{}", quote_ident(&ev.schema), quote_ident(&ev.table));
            let delta: HashSet<String> = self.config.delta_columns(&ev.schema, &ev.table).into_iter().collect();
            let linked = sql
                .client
                .query_one(TABLE_LINKS, &[&qualified])
                .await
                .map_err(sql.err(format!("reading the foreign keys and triggers of {}.{}", ev.schema, ev.table)))?;
            let groupable = delta.is_empty() && cols.unique_keys.is_empty() && !linked.get::<_, bool>(0) && !linked.get::<_, bool>(1);
            self.tables.insert(
                id.clone(),
                std::sync::Arc::new(LocalTable {
                    name: format!("{}.{}", ev.schema, ev.table),
                    qualified,
                    types: cols.columns.into_iter().collect(),
                    key: cols.key,
                    unique_keys: cols.unique_keys,
                    resolver: self.config.resolver(&ev.schema, &ev.table),
                    delta,
                    groupable,
                }),
            );
        }
        Ok(&self.tables[&id])
    }

    /// The error for a table or columns a change names that this node does not have: with DDL
    /// replication on, [`ApplyError::NotYet`] — the DDL that creates them can still be on its way
    /// from another origin (a node that applied it writes rows using it, and this node reads that
    /// node's stream first), so the origin waits for it; with DDL replication off nothing the
    /// cluster sends will create them, so the change is dead-lettered ([`ApplyError::Write`]).
    fn missing(&self, ev: &DecodedEvent, message: String) -> ApplyError {
        if self.config.replication.ddl {
            ApplyError::NotYet {
                origin: ev.origin.clone(),
                table: format!("{}.{}", ev.schema, ev.table),
                message,
            }
        } else {
            write_err(ev, message)
        }
    }

    /// Fails unless this node's table has every column `ev` writes (its after image, unchanged
    /// TOAST values aside). Cached columns that lack some are read again once first: another
    /// origin's stream may have applied the DDL that added them.
    async fn require_columns(&mut self, sql: &PgSession, ev: &DecodedEvent) -> Result<(), ApplyError> {
        if missing_columns(self.table(sql, ev).await?, ev).is_empty() {
            return Ok(());
        }
        self.tables.remove(&(ev.schema.clone(), ev.table.clone()));
        let missing = missing_columns(self.table(sql, ev).await?, ev);
        if missing.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = missing.iter().map(|c| format!("{c:?}")).collect();
        let message = match names.len() {
            1 => format!("column {} does not exist locally", names[0]),
            _ => format!("columns {} do not exist locally", names.join(", ")),
        };
        Err(self.missing(ev, message))
    }

    /// Forgets every table's columns and every prepared statement (after DDL changed tables).
    pub fn forget_tables(&mut self) {
        self.tables.clear();
        self.statements.clear();
        self.groupable_seen.clear();
    }

    /// Exchanges the statements prepared on the current session with `other`, those of the
    /// session that becomes current (a stream alternates between two sessions when it reads
    /// groups ahead, `partition_stream.rs`).
    pub(crate) fn swap_statements(&mut self, other: &mut HashMap<String, Statement>) {
        std::mem::swap(&mut self.statements, other);
    }

    /// Whether `schema.table` is local to a region other than this node's.
    pub(crate) fn local_elsewhere(&self, schema: &str, table: &str) -> bool {
        self.config
            .node(&self.local.0)
            .is_some_and(|n| self.config.local_elsewhere(n, schema, table))
    }

    /// A prepared statement for `text` with `n` text parameters.
    async fn prepared(&mut self, sql: &PgSession, text: &str, n: usize, ev: &DecodedEvent) -> Result<Statement, ApplyError> {
        if let Some(s) = self.statements.get(text) {
            return Ok(s.clone());
        }
        let s = sql
            .client
            .prepare_typed(text, &vec![Type::TEXT; n])
            .await
            .map_err(sql.err(format!("preparing a statement for {}.{}", ev.schema, ev.table)))?;
        self.statements.insert(text.to_string(), s.clone());
        Ok(s)
    }

    /// A prepared statement for `text` with parameters of `types`.
    pub(crate) async fn prepared_typed(&mut self, sql: &PgSession, text: &str, types: &[Type]) -> Result<Statement, ApplyError> {
        prepare_cached(&mut self.statements, sql, text, types).await
    }

    /// Runs `text` with `params`; the number of rows it touched.
    async fn execute(&mut self, sql: &PgSession, text: &str, params: &[Option<&str>], ev: &DecodedEvent) -> Result<u64, ApplyError> {
        let stmt = self.prepared(sql, text, params.len(), ev).await?;
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        sql.client
            .execute(&stmt, &refs)
            .await
            .map_err(sql.err(format!("{} on {}.{}", ev.op.code(), ev.schema, ev.table)))
            .map_err(ApplyError::from)
    }

    /// The id of the replication origin this node writes node `origin`'s changes under, if it
    /// exists.
    async fn roident_of(&mut self, sql: &PgSession, origin: &str) -> Result<Option<i64>, ApplyError> {
        if let Some(id) = self.current_origins.get(origin) {
            return Ok(Some(*id));
        }
        self.load_origins(sql).await?;
        Ok(self.current_origins.get(origin).copied())
    }

    /// Reads which replication origin ids stand for which nodes: the names this node's apply
    /// writes under, and the legacy ones rows written before an upgrade carry.
    async fn load_origins(&mut self, sql: &PgSession) -> Result<(), ApplyError> {
        let rows = sql
            .client
            .query("SELECT roident::int8, roname FROM pg_replication_origin", &[])
            .await
            .map_err(sql.err("reading pg_replication_origin"))?;
        let cluster = &self.config.cluster.name;
        for r in rows {
            let name: String = r.get(1);
            for node in &self.config.nodes {
                let [current, legacy] = replication_origins_read(cluster, &self.local.0, &node.name);
                if name == current {
                    self.current_origins.insert(node.name.clone(), r.get(0));
                }
                if name == current || name == legacy {
                    self.origins.insert(r.get(0), node.name.clone());
                }
            }
        }
        Ok(())
    }

    /// The node that wrote a local row version (`roident` 0: this node itself).
    pub(crate) async fn origin_of(&mut self, sql: &PgSession, roident: i64) -> Result<Option<String>, ApplyError> {
        if roident == 0 {
            return Ok(Some(self.local.0.clone()));
        }
        if !self.origins.contains_key(&roident) {
            self.load_origins(sql).await?;
        }
        Ok(self.origins.get(&roident).cloned())
    }

    /// Writes one change inside the caller's open transaction, resolving any conflict.
    /// A change PostgreSQL refuses for its data comes back as [`ApplyError::Rejected`] with the
    /// table's `on_error`.
    pub async fn apply(&mut self, sql: &PgSession, ev: &DecodedEvent) -> Result<Option<Settled>, ApplyError> {
        if self.local_elsewhere(&ev.schema, &ev.table) {
            // Region-local to another region (data residency): never held on this node.
            return Ok(None);
        }
        self.require_columns(sql, ev).await?;
        let result = match self.apply_settling(sql, ev).await {
            // The table may have changed since its columns were read (a column added here to
            // match the origin): read them again once before calling the change unusable.
            Err(ApplyError::Write { .. })
                if self.tables.remove(&(ev.schema.clone(), ev.table.clone())).is_some() =>
            {
                self.apply_settling(sql, ev).await
            }
            other => other,
        };
        result.map_err(|e| match e {
            ApplyError::Pg(source) if source.rejects_data() => ApplyError::Rejected {
                origin: ev.origin.clone(),
                table: format!("{}.{}", ev.schema, ev.table),
                on_error: self.config.on_error(&ev.schema, &ev.table),
                source,
            },
            other => other,
        })
    }

    async fn apply_settling(&mut self, sql: &PgSession, ev: &DecodedEvent) -> Result<Option<Settled>, ApplyError> {
        // A local writer may insert the key between the lookup and apply's insert; the insert
        // then does nothing and the change is settled again against the row it finds.
        for _ in 0..5 {
            if let Some(done) = self.apply_once(sql, ev).await? {
                return Ok(done);
            }
        }
        Err(ApplyError::ConflictStop {
            origin: ev.origin.clone(),
            table: format!("{}.{}", ev.schema, ev.table),
            message: "the row kept changing under local writers; retrying the transaction".into(),
        })
    }

    /// One attempt of [`Writer::apply`]; `None`: settle it again.
    async fn apply_once(&mut self, sql: &PgSession, ev: &DecodedEvent) -> Result<Option<Option<Settled>>, ApplyError> {
        let unique = match ev.op {
            Op::Create | Op::Read | Op::Update => self.settle_unique(sql, ev).await?,
            _ => UniqueCheck::Clear,
        };
        let cleared = match unique {
            UniqueCheck::Skipped(s) => return Ok(Some(Some(s))),
            UniqueCheck::Cleared(s) => Some(s),
            UniqueCheck::Clear | UniqueCheck::LostAtOwnKey => None,
        };
        Ok(self.apply_row(sql, ev).await?.map(|s| s.or(cleared)))
    }

    /// A local row version read with [`version_columns`] (columns 0–3).
    async fn local_version(&mut self, sql: &PgSession, r: &tokio_postgres::Row) -> Result<LocalVersion, ApplyError> {
        let origin = match (r.get::<_, Option<String>>(3), r.get::<_, Option<i64>>(1)) {
            (Some(stamped), _) => Some(stamped),
            (None, Some(id)) => self.origin_of(sql, id).await?,
            (None, None) => None,
        };
        Ok(LocalVersion {
            stamp: self.stamp(r.get(0), origin.as_deref()),
            origin,
            row_json: r.get(2),
        })
    }

    /// Writes one change whose unique keys are settled.
    async fn apply_row(&mut self, sql: &PgSession, ev: &DecodedEvent) -> Result<Option<Option<Settled>>, ApplyError> {
        self.table(sql, ev).await?;
        let id = (ev.schema.clone(), ev.table.clone());
        let remote_roident = match ev.op {
            Op::Update | Op::Delete => self.roident_of(sql, &ev.origin).await?,
            _ => None,
        };
        let table = &self.tables[&id];
        let key_row = match ev.op {
            Op::Create | Op::Read => ev.after.as_ref(),
            Op::Update | Op::Delete => ev.before.as_ref().or(ev.after.as_ref()),
            Op::Truncate => return Ok(Some(None)),
        }
        .ok_or_else(|| write_err(ev, format!("{} without a row image", ev.op.code())))?;
        let key = key_values(table, key_row).map_err(|m| write_err(ev, m))?;
        if let Some(new_key) = key_change::new_key(table, ev, &key).map_err(|m| write_err(ev, m))? {
            // A primary-key change: the old key's delete and the new key's insert, each settled.
            return self.apply_key_change(sql, ev, &key, &new_key).await;
        }
        let name = table.name.clone();
        let key_lock = self.key_lock(sql, ev).await?;
        let table = &self.tables[&id];
        let mut lock_params: Vec<&(dyn ToSql + Sync)> = key.iter().map(|k| k as &(dyn ToSql + Sync)).collect();
        lock_params.push(&name);
        let mut locked = false;

        // The guarded statement: done when there is nothing to resolve.
        let roident_text = remote_roident.map(|r| r.to_string());
        let commit_ts = ev.commit_ts_us.to_string();
        let (text, params) =
            guarded(table, &name, ev, &key, roident_text.as_deref(), &commit_ts).map_err(|m| write_err(ev, m))?;
        if !text.is_empty() {
            let check_text = raced_insert::tombstone_xid(table);
            let stmt = self.prepared(sql, &text, params.len(), ev).await?;
            let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
            let what = || format!("{} on {}.{}", ev.op.code(), ev.schema, ev.table);
            // An insert and a delete take the key lock before their statement: an insert
            // whose key another stream's delete is freeing would otherwise wait on that row,
            // then go in without seeing the delete's tombstone (its check ran in the snapshot
            // taken before the wait). An update keeps a row, so the row's lock suffices.
            // An insert is followed by a read of the key's tombstone in a fresh snapshot: a local
            // delete that committed while the insert waited for it shows there (`raced_insert`).
            let inserting = matches!(ev.op, Op::Create | Op::Read);
            let check = match inserting {
                true => Some(self.prepared(sql, &check_text, key.len() + 1, ev).await?),
                false => None,
            };
            let read_check = async {
                match &check {
                    Some(c) => sql.client.query_one(c, &lock_params).await.map(|r| r.get::<_, Option<i64>>(0)),
                    None => Ok(None),
                }
            };
            let (written, tombstone_after) = if matches!(ev.op, Op::Create | Op::Read | Op::Delete) {
                locked = true;
                futures::try_join!(sql.client.query_one(&key_lock, &lock_params), sql.client.execute(&stmt, &refs), read_check)
                    .map(|(_, n, t)| (n, t))
            } else {
                sql.client.execute(&stmt, &refs).await.map(|n| (n, None))
            }
            .map_err(sql.err(what()))?;
            if inserting && written > 0 {
                return Ok(self.settle_raced(sql, ev, &key, written, None, tombstone_after).await?.then_some(None));
            }
            if written > 0 {
                return Ok(Some(None));
            }
        }

        // Something to resolve: the local row and its last writer, and the key's tombstone.
        let KeyState {
            key_json: key_json_text,
            local,
            tombstone,
            tombstone_xid,
        } = self.read_key(sql, ev, &key, !locked).await?;
        let remote = Stamp {
            ts_us: ev.commit_ts_us,
            node_id: self.config.node(&ev.origin).map_or(0, |n| n.id),
        };
        let resolver = self.tables[&id].resolver;
        // An update or delete made on top of the local version: written earlier in this
        // transaction (no commit time), by the same origin, or — before image equal to the
        // local row — by a node that had this version (`compare_before_image`).
        let on_top = match (ev.op, &local) {
            (Op::Update | Op::Delete, Some(l)) => {
                l.stamp.is_none()
                    || l.origin.as_deref() == Some(ev.origin.as_str())
                    || (compare_before_image(resolver, l.stamp, remote, ev.before.is_some())
                        && self.before_matches(sql, ev, &key).await?)
            }
            _ => false,
        };
        let table = &self.tables[&id];

        // Classify.
        let (conflict, against) = match (ev.op, &local) {
            (Op::Create | Op::Read, Some(l)) => (ConflictType::InsertExists, l.stamp),
            (Op::Create | Op::Read, None) => match tombstone {
                // A delete here that is newer than the insert (arrived out of order).
                Some(t) if t > remote => (ConflictType::UpdateDeleted, Some(t)),
                _ => return Ok(self.insert(sql, ev, &key, tombstone_xid, Delta::Insert).await?.then_some(None)),
            },
            (Op::Update | Op::Delete, Some(l)) => {
                if on_top {
                    // No conflict.
                    let (text, params) = plain(table, ev, &key).map_err(|m| write_err(ev, m))?;
                    self.execute(sql, &text, &params, ev).await?;
                    return Ok(Some(None));
                }
                let t = if ev.op == Op::Update {
                    ConflictType::UpdateOriginDiffers
                } else {
                    ConflictType::DeleteOriginDiffers
                };
                (t, l.stamp)
            }
            (Op::Update, None) => match tombstone {
                Some(t) => (ConflictType::UpdateDeleted, Some(t)),
                None => (ConflictType::UpdateMissing, None),
            },
            (Op::Delete, None) => (ConflictType::DeleteMissing, tombstone),
            (Op::Truncate, _) => return Ok(None),
        };
        let Some(mut resolution) = decide(resolver, against, remote) else {
            return Err(ApplyError::ConflictStop {
                origin: ev.origin.clone(),
                table: name,
                message: format!(
                    "{} on key {key_json_text} (resolver error: this origin stops here until an operator resolves it)",
                    conflict.name()
                ),
            });
        };
        // A change the resolver would park but that leaves the row as it is (a delete of a row
        // deleted here too, or an image equal to the local row — e.g. the row `pgferry conflicts
        // resolve` wrote on every node) has nothing to review: it is applied, not recorded.
        let unchanged = resolution == Resolution::Parked
            && self
                .leaves_row_unchanged(sql, ev, &key, local.is_some(), tombstone.is_some())
                .await?;
        if unchanged {
            resolution = Resolution::ApplyRemote;
        }
        if resolution == Resolution::ApplyRemote {
            let table = &self.tables[&id];
            match (conflict, ev.op) {
                (ConflictType::InsertExists, _) => {
                    let (text, params) = update_by_key(table, ev, &key, false).map_err(|m| write_err(ev, m))?;
                    self.execute(sql, &text, &params, ev).await?;
                }
                (ConflictType::UpdateOriginDiffers | ConflictType::DeleteOriginDiffers, _) => {
                    let (text, params) = plain(table, ev, &key).map_err(|m| write_err(ev, m))?;
                    self.execute(sql, &text, &params, ev).await?;
                }
                (ConflictType::UpdateMissing | ConflictType::UpdateDeleted, _) => {
                    // A row deleted here (a tombstone the update beats) comes back as the
                    // update left it, as on the nodes where the delete lost; a row whose
                    // insert has not arrived counts only the update's own delta.
                    let delta = if conflict == ConflictType::UpdateMissing { Delta::Recreate } else { Delta::Insert };
                    if ev.unchanged_toast.is_empty() {
                        if !self.insert(sql, ev, &key, tombstone_xid, delta).await? {
                            return Ok(None);
                        }
                    } else {
                        // The event lacks the unchanged large values a full row needs.
                        resolution = Resolution::KeepLocal;
                    }
                }
                // Settled before the row's own check (settle_unique).
                (ConflictType::UpdateExists, _) => {}
                (ConflictType::DeleteMissing, _) => {
                    // Remember the delete so an older insert or update arriving later loses.
                    self.write_tombstone(sql, ev, &name, &key_json_text).await?;
                }
            }
        }
        if unchanged {
            return Ok(Some(None));
        }
        if resolution != Resolution::ApplyRemote && local.is_some() {
            // The row stays as it is here, but a counter's change is never lost.
            let table = &self.tables[&id];
            let (text, params) = delta_only(table, ev, &key).map_err(|m| write_err(ev, m))?;
            if let (false, Some(l)) = (text.is_empty(), local.as_ref()) {
                self.execute(sql, &text, &params, ev).await?;
                let ts = l.stamp.map(|s| s.ts_us.to_string());
                let text = row_stamp_override(&self.tables[&id]);
                let mut params = vec![Some(name.as_str()), Some(key_json_text.as_str()), ts.as_deref(), l.origin.as_deref()];
                params.extend(key.iter().map(|k| Some(*k)));
                self.execute(sql, &text, &params, ev).await?;
            }
        }
        self.record(sql, ev, &name, &key_json_text, conflict, resolver, resolution, local.as_ref())
            .await?;
        tracing::debug!(origin = %ev.origin, table = %name, key = %key_json_text, conflict = conflict.name(),
            resolution = resolution.name(), "conflict");
        Ok(Some(Some(Settled { conflict, resolution })))
    }

    /// The statement that takes the key lock of a key of `ev`'s table (held to commit; key
    /// values, then the table's name): it serializes the streams of different origins that touch
    /// a key no row holds (an insert, and a delete or update that records a tombstone), which
    /// row locks cannot. It goes out pipelined with the next statement, which then starts after
    /// it is granted, in a snapshot that sees what the holder wrote.
    async fn key_lock(&mut self, sql: &PgSession, ev: &DecodedEvent) -> Result<Statement, ApplyError> {
        let table = &self.tables[&(ev.schema.clone(), ev.table.clone())];
        let n = table.key.len();
        let text = format!("SELECT pg_advisory_xact_lock({KEY_LOCK_CLASS}, hashtext(${} || {}::text))", n + 1, key_json(table, 1));
        self.prepared(sql, &text, n + 1, ev).await
    }

    /// Reads the local state of `key` in `ev`'s table for settling a change: takes the key lock
    /// (unless `take_key_lock` is false: already held), locks the row, then — pipelined, in a
    /// fresh READ COMMITTED snapshot — reads the row, its stamp, the key's tombstone and the
    /// table's last truncate. Reading in the locking statement itself is wrong: after waiting for
    /// a lock PostgreSQL returns the new row version but evaluates joins and subqueries, such as
    /// the row's stamp, in the older snapshot. A row whose last write only merged a losing change's delta columns keeps
    /// the stamp of the version that won (`pgferry.row_stamps`), not that write's.
    pub(crate) async fn read_key(&mut self, sql: &PgSession, ev: &DecodedEvent, key: &[&str], take_key_lock: bool) -> Result<KeyState, ApplyError> {
        let id = (ev.schema.clone(), ev.table.clone());
        let key_lock = self.key_lock(sql, ev).await?;
        let table = &self.tables[&id];
        let name = table.name.clone();
        let lock = format!("SELECT 1 FROM {} WHERE {} FOR UPDATE", table.qualified, where_key(table, 1));
        let lookup = format!(
            "SELECT {} FROM {} t WHERE {}",
            version_columns(key.len() + 1, &key_json(table, 1)),
            table.qualified,
            where_key(table, 1)
        );
        let tomb = format!(
            "SELECT k.key::text,
                    coalesce(CASE WHEN tb.stamp_xid = tb.xid THEN tb.ts_us END, (extract(epoch FROM c.timestamp) * 1000000)::int8),
                    c.roident::int8, tb.xid,
                    (extract(epoch FROM trc.timestamp) * 1000000)::int8, trc.roident::int8
             FROM (SELECT {} AS key) k
             LEFT JOIN pgferry.tombstones tb ON tb.tbl = ${n} AND tb.key = k.key
             LEFT JOIN LATERAL pg_xact_commit_timestamp_origin((tb.xid % 4294967296)::text::xid) c ON true
             LEFT JOIN pgferry.truncations tr ON tr.tbl = ${n}
             LEFT JOIN LATERAL pg_xact_commit_timestamp_origin((tr.xid % 4294967296)::text::xid) trc ON tr.xid IS NOT NULL",
            key_json(table, 1),
            n = key.len() + 1
        );
        let (lock, lookup, tomb) = (
            self.prepared(sql, &lock, key.len(), ev).await?,
            self.prepared(sql, &lookup, key.len() + 1, ev).await?,
            self.prepared(sql, &tomb, key.len() + 1, ev).await?,
        );
        let key_params: Vec<&(dyn ToSql + Sync)> = key.iter().map(|k| k as &(dyn ToSql + Sync)).collect();
        let mut with_name = key_params.clone();
        with_name.push(&name);
        let take_key_lock = async {
            if !take_key_lock {
                return Ok(None);
            }
            sql.client.query_one(&key_lock, &with_name).await.map(Some)
        };
        let (_, _, local, tomb) = futures::try_join!(
            take_key_lock,
            sql.client.query_opt(&lock, &key_params),
            sql.client.query_opt(&lookup, &with_name),
            sql.client.query_one(&tomb, &with_name)
        )
        .map_err(sql.err(format!("looking up the local row of {name}")))?;
        let local = match local {
            None => None,
            Some(r) => Some(self.local_version(sql, &r).await?),
        };
        let tombstone = match tomb.get::<_, Option<i64>>(2) {
            Some(id) => {
                let origin = self.origin_of(sql, id).await?;
                self.stamp(tomb.get(1), origin.as_deref())
            }
            None => None,
        };
        // The table's last truncate counts as a tombstone of every key (`writer::truncate`).
        let truncated = match tomb.get::<_, Option<i64>>(5) {
            Some(id) => {
                let origin = self.origin_of(sql, id).await?;
                self.stamp(tomb.get(4), origin.as_deref())
            }
            None => None,
        };
        Ok(KeyState {
            key_json: tomb.get(0),
            local,
            tombstone: tombstone.max(truncated),
            tombstone_xid: tomb.get(3),
        })
    }

    /// The stamp of a local version: its commit time (None: written by the open transaction,
    /// or too old to have one) and the node id of its origin.
    pub(crate) fn stamp(&self, ts_us: Option<i64>, origin: Option<&str>) -> Option<Stamp> {
        let node_id = origin.and_then(|o| self.config.node(o)).map_or(0, |n| n.id);
        ts_us.map(|ts_us| Stamp { ts_us, node_id })
    }

    /// Whether `ev` would leave the local row as it is: a delete of a row deleted here too (a
    /// tombstone; a row that never existed here stays worth a review), or an insert or update
    /// whose image equals the local row (compared as text after casting to the column's type,
    /// so every type compares, with or without an equality operator).
    async fn leaves_row_unchanged(
        &mut self,
        sql: &PgSession,
        ev: &DecodedEvent,
        key: &[&str],
        local_exists: bool,
        tombstoned: bool,
    ) -> Result<bool, ApplyError> {
        match (ev.op, local_exists) {
            (Op::Delete, false) => Ok(tombstoned),
            (Op::Create | Op::Read | Op::Update, true) => {
                let table = &self.tables[&(ev.schema.clone(), ev.table.clone())];
                let (text, params) = same_row(table, ev, key).map_err(|m| write_err(ev, m))?;
                let what = format!("comparing the local row of {}.{}", ev.schema, ev.table);
                self.query_flag(sql, &text, &params, ev, what).await
            }
            _ => Ok(false),
        }
    }

    /// Records a tombstone for `key_json` of `table`, dated by the applying transaction (the
    /// change's origin and commit time), for a key without a row.
    async fn write_tombstone(&mut self, sql: &PgSession, ev: &DecodedEvent, table: &str, key_json: &str) -> Result<(), ApplyError> {
        self.execute(
            sql,
            "INSERT INTO pgferry.tombstones (tbl, key, xid) VALUES ($1, $2::text::jsonb, txid_current())
             ON CONFLICT (tbl, key) DO UPDATE SET xid = EXCLUDED.xid",
            &[Some(table), Some(key_json)],
            ev,
        )
        .await?;
        Ok(())
    }

    /// Whether the local row at `key` equals `ev`'s before image (its delta columns aside: they
    /// merge whoever wins; columns this node lacks aside), compared as text after casting to
    /// the column's type, as [`Writer::leaves_row_unchanged`] does.
    pub(crate) async fn before_matches(&mut self, sql: &PgSession, ev: &DecodedEvent, key: &[&str]) -> Result<bool, ApplyError> {
        let table = &self.tables[&(ev.schema.clone(), ev.table.clone())];
        let Some(before) = ev.before.as_ref() else { return Ok(false) };
        let mut params: Vec<Option<&str>> = key.iter().map(|k| Some(*k)).collect();
        let mut same = String::new();
        for (c, v) in before.iter().filter(|(c, _)| !table.delta.contains(c)) {
            let Some(ty) = table.types.get(c) else { continue };
            params.push(v.as_deref());
            same += &format!(" AND t.{}::text IS NOT DISTINCT FROM (${}::text::{ty})::text", quote_ident(c), params.len());
        }
        let text = format!("SELECT EXISTS (SELECT 1 FROM {} t WHERE {}{same})", table.qualified, where_key(table, 1));
        let what = format!("comparing the local row of {}.{} with a before image", ev.schema, ev.table);
        self.query_flag(sql, &text, &params, ev, what).await
    }

    /// Runs the one-row, one-boolean statement `text` (prepared once) with `params`; `what`
    /// names it in the error.
    async fn query_flag<T: ToSql + Sync>(&mut self, sql: &PgSession, text: &str, params: &[T], ev: &DecodedEvent, what: String) -> Result<bool, ApplyError> {
        let stmt = self.prepared(sql, text, params.len(), ev).await?;
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let row = sql.client.query_one(&stmt, &refs).await.map_err(sql.err(what))?;
        Ok(row.get(0))
    }

    /// Inserts the after image (delta columns as `delta` says) unless the key exists by now,
    /// decided against the key's tombstone `seen` (its xid); whether the row went in and stands
    /// (false: settle the change again — the key exists, or a delete committed meanwhile:
    /// `raced_insert`).
    pub(crate) async fn insert(
        &mut self,
        sql: &PgSession,
        ev: &DecodedEvent,
        key: &[&str],
        seen: Option<i64>,
        delta: Delta,
    ) -> Result<bool, ApplyError> {
        let table = &self.tables[&(ev.schema.clone(), ev.table.clone())];
        let (text, params) = insert(table, ev, delta).map_err(|m| write_err(ev, m))?;
        self.insert_unraced(sql, ev, key, (&text, &params), seen).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn record(
        &mut self,
        sql: &PgSession,
        ev: &DecodedEvent,
        table: &str,
        key_json: &str,
        conflict: ConflictType,
        resolver: Resolver,
        resolution: Resolution,
        local: Option<&LocalVersion>,
    ) -> Result<(), ApplyError> {
        let remote_row = match ev.op {
            Op::Delete => ev.before.as_ref(),
            _ => ev.after.as_ref(),
        }
        .map(row_json);
        let local_ts = local.and_then(|l| l.stamp).map(|s| s.ts_us.to_string());
        let lsn = format_lsn(ev.commit_lsn);
        let ts = ev.commit_ts_us.to_string();
        let params: [Option<&str>; 13] = [
            Some(table),
            Some(key_json),
            Some(conflict.name()),
            Some(resolver.name()),
            Some(resolution.name()),
            local.map(|l| l.row_json.as_str()),
            local.and_then(|l| l.origin.as_deref()),
            local_ts.as_deref(),
            Some(ev.op.code()),
            remote_row.as_deref(),
            Some(ev.origin.as_str()),
            Some(ts.as_str()),
            Some(lsn.as_str()),
        ];
        self.execute(
            sql,
            "INSERT INTO pgferry.conflicts (tbl, key, conflict_type, resolver, resolution, local_row, local_origin,
                 local_commit_ts, remote_op, remote_row, remote_origin, remote_commit_ts, remote_commit_lsn)
             VALUES ($1, $2::text::jsonb, $3, $4, $5, $6::text::jsonb, $7,
                 'epoch'::timestamptz + $8::text::int8 * interval '1 microsecond', $9, $10::text::jsonb, $11,
                 'epoch'::timestamptz + $12::text::int8 * interval '1 microsecond', $13::text::pg_lsn)",
            &params,
            ev,
        )
        .await?;
        Ok(())
    }
}

fn write_err(ev: &DecodedEvent, message: String) -> ApplyError {
    ApplyError::Write {
        origin: ev.origin.clone(),
        table: format!("{}.{}", ev.schema, ev.table),
        message,
    }
}

/// A row as a JSON object of text values (for `pgferry.conflicts`).
pub(crate) fn row_json(row: &EventRow) -> String {
    let map: serde_json::Map<String, serde_json::Value> = row
        .iter()
        .map(|(c, v)| (c.clone(), v.as_ref().map_or(serde_json::Value::Null, |t| serde_json::Value::String(t.clone()))))
        .collect();
    serde_json::Value::Object(map).to_string()
}

/// The columns of `ev`'s after image (unchanged TOAST values aside) that `table` lacks.
fn missing_columns<'e>(table: &LocalTable, ev: &'e DecodedEvent) -> Vec<&'e str> {
    let Some(after) = ev.after.as_ref() else { return Vec::new() };
    after
        .iter()
        .map(|(c, _)| c.as_str())
        .filter(|c| !table.types.contains_key(*c) && !ev.unchanged_toast.iter().any(|u| u == c))
        .collect()
}

fn cast<'t>(table: &'t LocalTable, col: &str) -> Result<&'t str, String> {
    table
        .types
        .get(col)
        .map(String::as_str)
        .ok_or_else(|| format!("column {col:?} does not exist locally"))
}

/// The key columns' values in `row`, in key order.
fn key_values<'e>(table: &LocalTable, row: &'e EventRow) -> Result<Vec<&'e str>, String> {
    table
        .key
        .iter()
        .map(|k| {
            row.iter()
                .find(|(c, _)| c == k)
                .and_then(|(_, v)| v.as_deref())
                .ok_or_else(|| format!("event has no value for key column {k:?}"))
        })
        .collect()
}

/// `k1 = $first::text::<type> AND …` for the key columns.
fn where_key(table: &LocalTable, first: usize) -> String {
    table
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let ty = table.types.get(k).map_or("text", String::as_str);
            format!("{} = ${}::text::{ty}", quote_ident(k), first + i)
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// First key of apply's advisory locks on row keys (`pg_advisory_xact_lock(int4, int4)`):
/// `'pgfy'` as an int4, kept apart from other users of the two-key form.
pub(crate) const KEY_LOCK_CLASS: i32 = 0x7067_6679;

/// The key as the tombstone trigger writes it: a JSON array of the typed values.
fn key_json(table: &LocalTable, first: usize) -> String {
    let parts: Vec<String> = table
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let ty = table.types.get(k).map_or("text", String::as_str);
            format!("to_jsonb(${}::text::{ty})", first + i)
        })
        .collect();
    format!("jsonb_build_array({})", parts.join(", "))
}

/// The select list that reads a local row version `t` for conflict checks: its stamp (the
/// override `pgferry.row_stamps` keeps for it where it has one — a NULL there is a row without
/// a commit time (`crate::conflict::stamp_override_or`) —, else the writing group's
/// `pgferry.xact_stamps` record, else its commit time), the replication origin of its last
/// write, the row as JSON, and the origin `row_stamps` keeps (a group's stamps keep the origin
/// its commit records). `$tbl_param` is the table's name, `key` the row's key as the tombstone
/// trigger writes it. The override is read in scalar subqueries, so the caller's unqualified
/// column names meet no other relation.
fn version_columns(tbl_param: usize, key: &str) -> String {
    let row_stamp = format!("o.tbl = ${tbl_param} AND o.key = {key} AND o.xid % 4294967296 = t.xmin::text::int8");
    let ts = stamp_override_or(
        "o",
        "ts_us",
        &format!(
            "coalesce(pgferry.group_stamp(${tbl_param}, {key}, t.xmin),
                      (extract(epoch FROM (pg_xact_commit_timestamp_origin(t.xmin)).timestamp) * 1000000)::int8)"
        ),
    );
    format!(
        "(SELECT {ts} FROM (SELECT) AS one LEFT JOIN pgferry.row_stamps o ON {row_stamp}),
         (pg_xact_commit_timestamp_origin(t.xmin)).roident::int8, to_jsonb(t)::text,
         (SELECT o.origin FROM pgferry.row_stamps o WHERE {row_stamp})"
    )
}

/// Records in `pgferry.row_stamps` the stamp (`$3` commit time, `$4` origin) of the version that
/// won for the row at the key in `$5…` (`$1` table name, `$2` key JSON), whose last write only
/// merged a losing change's delta columns. The override is keyed by that row version's own
/// `xmin`, read back from the row: under `on_error = skip_change` the write runs in a savepoint,
/// so `xmin` is the subtransaction's xid, not `txid_current()` (issue 16, scenario 10). The xid
/// is listed in `pgferry.stamped_xacts` here too: the statement trigger lists only the top-level
/// one.
fn row_stamp_override(table: &LocalTable) -> String {
    format!(
        "WITH v AS (SELECT t.xmin::text::int8 AS x FROM {} t WHERE {}),
              listed AS (INSERT INTO pgferry.stamped_xacts SELECT x FROM v ON CONFLICT DO NOTHING)
         INSERT INTO pgferry.row_stamps (tbl, key, xid, ts_us, origin)
         SELECT $1, $2::text::jsonb, v.x, $3::text::int8, $4 FROM v
         ON CONFLICT (tbl, key) DO UPDATE SET xid = EXCLUDED.xid, ts_us = EXCLUDED.ts_us, origin = EXCLUDED.origin",
        table.qualified,
        where_key(table, 5)
    )
}

/// How delta columns are assigned.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delta {
    /// Inserting a row: the value itself.
    Insert,
    /// Re-creating the row an update found missing (no row, no tombstone: its insert from
    /// another origin has not arrived yet): the update's own change, `remote_new − remote_old`.
    /// The insert, arriving later, adds its value (it loses or wins the row, its delta counts
    /// either way), so every node sums each change once (issue 16, scenario 4).
    Recreate,
    /// Writing over an existing row: `local + (remote_new − remote_old)`, where an insert's
    /// old value is 0 (the row did not exist on its origin).
    Merge,
}

/// (quoted column, value expression) of every column the after image carries (not unchanged
/// TOAST), appending their values to `params`. With `only_delta`, just the delta columns.
fn assignments<'e>(
    table: &LocalTable,
    ev: &'e DecodedEvent,
    params: &mut Vec<Option<&'e str>>,
    delta: Delta,
    only_delta: bool,
) -> Result<Vec<(String, String)>, String> {
    let unchanged: HashSet<&str> = ev.unchanged_toast.iter().map(String::as_str).collect();
    let row = ev
        .after
        .as_ref()
        .ok_or_else(|| format!("{} without an after image", ev.op.code()))?;
    let mut out = Vec::new();
    for (c, v) in row.iter().filter(|(c, _)| !unchanged.contains(c.as_str())) {
        let is_delta = table.delta.contains(c);
        if only_delta && !is_delta {
            continue;
        }
        let ty = cast(table, c)?;
        let q = quote_ident(c);
        params.push(v.as_deref());
        let new = format!("${}::text::{ty}", params.len());
        let expr = if is_delta && delta != Delta::Insert {
            let old = match ev.op {
                Op::Update => ev
                    .before
                    .as_ref()
                    .ok_or("a delta column needs the old row (REPLICA IDENTITY FULL on the origin)")?
                    .iter()
                    .find(|(b, _)| b == c)
                    .and_then(|(_, v)| v.as_deref()),
                _ => None,
            };
            params.push(old);
            let old = format!("${}::text::{ty}", params.len());
            let base = if delta == Delta::Merge { format!("coalesce({q}, 0)") } else { "0".into() };
            format!("{base} + (coalesce({new}, 0) - coalesce({old}, 0))")
        } else {
            new
        };
        out.push((q, expr));
    }
    Ok(out)
}

/// For a remote change that lost: the update that still adds its delta columns' change to the
/// local row (empty text when the table has none, or for deletes).
fn delta_only<'e>(table: &LocalTable, ev: &'e DecodedEvent, key: &[&'e str]) -> Result<Statement_<'e>, String> {
    if table.delta.is_empty() || !matches!(ev.op, Op::Update | Op::Create | Op::Read) {
        return Ok((String::new(), Vec::new()));
    }
    update_by_key(table, ev, key, true)
}

/// `UPDATE` of the row at `key` to the after image (delta columns merged); with `only_delta`,
/// of its delta columns alone. Empty text when there is nothing to set.
fn update_by_key<'e>(table: &LocalTable, ev: &'e DecodedEvent, key: &[&'e str], only_delta: bool) -> Result<Statement_<'e>, String> {
    let mut params: Vec<Option<&str>> = key.iter().map(|k| Some(*k)).collect();
    let sets: Vec<String> = assignments(table, ev, &mut params, Delta::Merge, only_delta)?
        .into_iter()
        .map(|(c, v)| format!("{c} = {v}"))
        .collect();
    if sets.is_empty() {
        return Ok((String::new(), Vec::new()));
    }
    Ok((
        format!("UPDATE {} SET {} WHERE {}", table.qualified, sets.join(", "), where_key(table, 1)),
        params,
    ))
}

/// A statement's text and its text parameters.
type Statement_<'e> = (String, Vec<Option<&'e str>>);

/// `INSERT` of the after image, delta columns assigned as `delta` says.
fn insert<'e>(table: &LocalTable, ev: &'e DecodedEvent, delta: Delta) -> Result<Statement_<'e>, String> {
    let mut params = Vec::new();
    let cols = assignments(table, ev, &mut params, delta, false)?;
    let names: Vec<&str> = cols.iter().map(|(c, _)| c.as_str()).collect();
    let vals: Vec<&str> = cols.iter().map(|(_, v)| v.as_str()).collect();
    Ok((
        format!(
            "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT DO NOTHING",
            table.qualified,
            names.join(", "),
            vals.join(", ")
        ),
        params,
    ))
}

/// The unconditional statement of an update or delete, found by `key`.
fn plain<'e>(table: &LocalTable, ev: &'e DecodedEvent, key: &[&'e str]) -> Result<Statement_<'e>, String> {
    match ev.op {
        Op::Update => update_by_key(table, ev, key, false),
        Op::Delete => Ok((
            format!("DELETE FROM {} WHERE {}", table.qualified, where_key(table, 1)),
            key.iter().map(|k| Some(*k)).collect(),
        )),
        _ => Err(format!("{} is not an update or delete", ev.op.code())),
    }
}

/// `SELECT EXISTS` of the row at `key` whose columns equal the after image's (text forms).
fn same_row<'e>(table: &LocalTable, ev: &'e DecodedEvent, key: &[&'e str]) -> Result<Statement_<'e>, String> {
    let mut params: Vec<Option<&str>> = key.iter().map(|k| Some(*k)).collect();
    let same: Vec<String> = assignments(table, ev, &mut params, Delta::Insert, false)?
        .into_iter()
        .map(|(c, v)| format!(" AND t.{c}::text IS NOT DISTINCT FROM ({v})::text"))
        .collect();
    Ok((
        format!(
            "SELECT EXISTS (SELECT 1 FROM {} t WHERE {}{})",
            table.qualified,
            where_key(table, 1),
            same.concat()
        ),
        params,
    ))
}

/// The statement that applies `ev` only when there is nothing to resolve; touches no row
/// otherwise. Empty text: always resolve (the remote origin has no replication origin here).
fn guarded<'e>(
    table: &LocalTable,
    name: &'e str,
    ev: &'e DecodedEvent,
    key: &[&'e str],
    remote_roident: Option<&'e str>,
    commit_ts: &'e str,
) -> Result<Statement_<'e>, String> {
    match ev.op {
        Op::Create | Op::Read => {
            // Free key and no tombstone at all (a tombstone sends it to the full check).
            let mut params = Vec::new();
            let cols = assignments(table, ev, &mut params, Delta::Insert, false)?;
            let names: Vec<&str> = cols.iter().map(|(c, _)| c.as_str()).collect();
            let vals: Vec<&str> = cols.iter().map(|(_, v)| v.as_str()).collect();
            let first = params.len() + 1;
            params.push(Some(name));
            params.extend(key.iter().map(|k| Some(*k)));
            params.push(Some(commit_ts));
            // Nor a truncate of the table as new as the change (`writer::truncate`).
            Ok((
                format!(
                    "INSERT INTO {} ({}) SELECT {} WHERE NOT EXISTS
                       (SELECT 1 FROM pgferry.tombstones WHERE tbl = ${first} AND key = {})
                     AND NOT EXISTS (SELECT 1 FROM pgferry.truncations tr WHERE tr.tbl = ${first}
                       AND coalesce((extract(epoch FROM pg_xact_commit_timestamp((tr.xid % 4294967296)::text::xid)) * 1000000)::int8, 0)
                           >= ${}::text::int8)
                     ON CONFLICT DO NOTHING",
                    table.qualified,
                    names.join(", "),
                    vals.join(", "),
                    key_json(table, first + 1),
                    params.len()
                ),
                params,
            ))
        }
        Op::Update | Op::Delete => {
            // Tables with delta columns always take the full check: a version that only merged
            // a losing change's deltas carries that loser's origin in its xmin, and its real
            // stamp (pgferry.row_stamps) can only be read safely after the row is locked.
            let (Some(roident), true) = (remote_roident, table.delta.is_empty()) else {
                return Ok((String::new(), Vec::new()));
            };
            let (text, mut params) = plain(table, ev, key)?;
            // Last written by the same origin (a committed version of it).
            params.push(Some(roident));
            let text = format!(
                "{text} AND (pg_xact_commit_timestamp_origin(xmin)).roident = ${}::text::int8::oid",
                params.len()
            );
            Ok((text, params))
        }
        Op::Truncate => Ok((String::new(), Vec::new())),
    }
}
