//! Conflict rules (DESIGN.md, "Conflicts"): which version of a row wins, the tables that record
//! deletes (tombstones) and conflicts, and the names used in `pgferry.conflicts`.
//!
//! A version of a row is stamped with its origin commit time and origin node id
//! ([`Stamp`]); every node compares the same stamps the same way, so every node picks the same
//! winner and the cluster converges.

use pgferry_connectors::config::Resolver;

/// The outbox of `<cluster>.conflicts` (see `conflict_publisher.rs`): each conflict row carries
/// the transaction that wrote it, and the publisher keeps the snapshot up to which it has
/// published. Also an upgrade of nodes initialized before it existed (their conflict rows have
/// no `writer_xid`; the publisher's first round publishes those by `published_at`).
macro_rules! outbox_sql {
    () => {
        "
ALTER TABLE pgferry.conflicts ADD COLUMN IF NOT EXISTS writer_xid xid8;
ALTER TABLE pgferry.conflicts ALTER COLUMN writer_xid SET DEFAULT pg_current_xact_id();
CREATE INDEX IF NOT EXISTS conflicts_writer ON pgferry.conflicts (writer_xid, id);
DROP INDEX IF EXISTS pgferry.conflicts_unpublished;
CREATE TABLE IF NOT EXISTS pgferry.conflicts_outbox (
    id             int         PRIMARY KEY CHECK (id = 1),
    published_upto pg_snapshot NOT NULL
);
"
    };
}

/// Which transactions wrote `pgferry.row_stamps` overrides (their 32-bit xid, as a row
/// version's `xmin` shows it), kept by a statement trigger on `row_stamps` whoever writes it: a
/// read of a row's stamp looks for an override only when the version's `xmin` is listed, so rows
/// written without one (local writes, one-by-one apply) cost no probe of `row_stamps`. A listed
/// xid without overrides (a statement that wrote none, or a wrapped-around xid) only costs a
/// probe. Also the upgrade of nodes initialized before it existed (the last statement lists
/// the writers of the overrides they have).
macro_rules! stamped_xacts_sql {
    () => {
        "
CREATE TABLE IF NOT EXISTS pgferry.stamped_xacts (xid bigint PRIMARY KEY);
CREATE OR REPLACE FUNCTION pgferry.note_stamped_xact() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pgferry.stamped_xacts VALUES (txid_current() % 4294967296) ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER pgferry_stamped_xact AFTER INSERT OR UPDATE ON pgferry.row_stamps
    FOR EACH STATEMENT EXECUTE FUNCTION pgferry.note_stamped_xact();
ALTER TABLE pgferry.row_stamps ENABLE ALWAYS TRIGGER pgferry_stamped_xact;
INSERT INTO pgferry.stamped_xacts SELECT DISTINCT xid % 4294967296 FROM pgferry.row_stamps ON CONFLICT DO NOTHING;
"
    };
}

/// The exact stamps of the rows a group wrote (grouped apply; docs/decisions.md "Grouped
/// apply"), per local transaction that applied a group, keyed by its 32-bit xid (as a row
/// version's `xmin` shows it): `xact_stamp_groups` says that the transaction has stamps, in how
/// many buckets, and the group's (last) commit time; `xact_stamps` holds, per bucket, the source
/// commit time of every row version it wrote whose source transaction is not the group's last,
/// as `{table: {key: µs}}` (keys in the tombstone trigger's JSON text form; the bucket of a key
/// is `group/stamps.rs`'s hash of table and key). A version whose writer has stamps but whose
/// key is not among them carries the group's own commit time, which is exact for it. Small
/// buckets keep a lookup from decompressing a whole group's stamps. Once every origin is applied
/// past a group's commit time (`tombstone_gc.rs`) the exact times cannot decide anything and
/// the group's stamps go. `pgferry.group_stamp` reads one version's stamp. Also the upgrade of
/// nodes initialized before they existed.
macro_rules! xact_stamps_sql {
    () => {
        "
CREATE TABLE IF NOT EXISTS pgferry.xact_stamp_groups (
    xid     bigint PRIMARY KEY,
    buckets int    NOT NULL,
    ts_us   bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS xact_stamp_groups_ts ON pgferry.xact_stamp_groups (ts_us);
CREATE TABLE IF NOT EXISTS pgferry.xact_stamps (
    xid    bigint NOT NULL,
    bucket int    NOT NULL,
    stamps jsonb  NOT NULL,
    PRIMARY KEY (xid, bucket)
);
CREATE OR REPLACE FUNCTION pgferry.group_stamp(tbl text, key jsonb, version xid) RETURNS bigint
    LANGUAGE sql STABLE AS $$
    SELECT ((x.stamps -> tbl) ->> key::text)::bigint FROM pgferry.xact_stamps x
    WHERE x.xid = version::text::bigint AND (x.stamps -> tbl) ? key::text $$;
"
    };
}

/// The truncations of each replicated table (issue 16, scenario 6; docs/decisions.md
/// "Truncate across origins"): a TRUNCATE is a delete of every row dated by its commit, so each
/// table keeps the transaction of its newest truncate (`xid`, whose commit time and origin date
/// it, as a tombstone's do), and every key of the table counts as deleted then. Local truncates
/// are recorded by the statement trigger `pgferry_truncation` on each replicated table; apply
/// records the ones it applies itself (keeping the newest), so the trigger skips sessions with a
/// replication origin. Also the upgrade of nodes initialized before it existed.
macro_rules! truncations_sql {
    () => {
        "
CREATE TABLE IF NOT EXISTS pgferry.truncations (
    tbl text   PRIMARY KEY,
    xid bigint NOT NULL
);
CREATE OR REPLACE FUNCTION pgferry.record_truncation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF pg_replication_origin_session_is_setup() THEN RETURN NULL; END IF;
    INSERT INTO pgferry.truncations (tbl, xid) VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, txid_current())
    ON CONFLICT (tbl) DO UPDATE SET xid = EXCLUDED.xid;
    RETURN NULL;
END $$;
"
    };
}

/// The tables and trigger function apply needs on every node (installed by `pgferry init`):
/// tombstones, conflicts, exceptions.
pub const SCHEMA_SQL: &str = concat!(
    "
CREATE TABLE IF NOT EXISTS pgferry.tombstones (
    tbl text  NOT NULL,
    key jsonb NOT NULL,
    xid bigint NOT NULL,
    PRIMARY KEY (tbl, key)
);
-- The source commit time (ts_us) of a delete applied in a group whose last transaction is
-- another: valid while stamp_xid = xid (any later delete of the key writes another xid).
ALTER TABLE pgferry.tombstones ADD COLUMN IF NOT EXISTS stamp_xid bigint;
ALTER TABLE pgferry.tombstones ADD COLUMN IF NOT EXISTS ts_us bigint;
CREATE TABLE IF NOT EXISTS pgferry.conflicts (
    id                bigserial   PRIMARY KEY,
    detected_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    tbl               text        NOT NULL,
    key               jsonb       NOT NULL,
    conflict_type     text        NOT NULL,
    resolver          text        NOT NULL,
    resolution        text        NOT NULL,
    local_row         jsonb,
    local_origin      text,
    local_commit_ts   timestamptz,
    remote_op         text        NOT NULL,
    remote_row        jsonb,
    remote_origin     text        NOT NULL,
    remote_commit_ts  timestamptz NOT NULL,
    remote_commit_lsn pg_lsn      NOT NULL,
    resolved_at       timestamptz,
    resolved_by       text,
    published_at      timestamptz
);
-- Before published_at existed (an earlier pgferry init); no longer written (see OUTBOX_SQL).
ALTER TABLE pgferry.conflicts ADD COLUMN IF NOT EXISTS published_at timestamptz;
",
    outbox_sql!(),
    "
-- The real last writer of a row whose last write (transaction xid) only merged a losing
-- change's delta columns: conflict checks use this stamp instead of that write's.
CREATE TABLE IF NOT EXISTS pgferry.row_stamps (
    tbl    text   NOT NULL,
    key    jsonb  NOT NULL,
    xid    bigint NOT NULL,
    ts_us  bigint,
    origin text,
    PRIMARY KEY (tbl, key)
);
",
    stamped_xacts_sql!(),
    xact_stamps_sql!(),
    truncations_sql!(),
    "
-- Messages apply could not use, kept whole (they are also in the dead-letter topic).
CREATE TABLE IF NOT EXISTS pgferry.exceptions (
    id           bigserial   PRIMARY KEY,
    recorded_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    origin       text,
    topic        text        NOT NULL,
    partition    int         NOT NULL,
    kafka_offset bigint      NOT NULL,
    reason       text        NOT NULL,
    key          bytea,
    payload      bytea
);
-- A deleted row's key and the deleting transaction, whose commit time and origin
-- (pg_xact_commit_timestamp_origin) date the delete. Fires for local deletes and for deletes
-- apply makes (then the transaction carries the remote origin and commit time).
CREATE OR REPLACE FUNCTION pgferry.record_tombstone() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r jsonb := to_jsonb(OLD);
    k jsonb := '[]'::jsonb;
    c text;
BEGIN
    FOREACH c IN ARRAY TG_ARGV LOOP
        k := k || jsonb_build_array(r -> c);
    END LOOP;
    INSERT INTO pgferry.tombstones (tbl, key, xid)
    VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, k, txid_current())
    ON CONFLICT (tbl, key) DO UPDATE SET xid = EXCLUDED.xid;
    RETURN OLD;
END $$;"
);


/// The columns a pgferry version may lack on a node initialized by an earlier one, each with the
/// statement that adds it: apply adds them at start-up (a no-op once they exist).
const UPGRADES: &[(&str, &str, &str)] = &[
    ("tombstones", "stamp_xid", "ALTER TABLE pgferry.tombstones ADD COLUMN IF NOT EXISTS stamp_xid bigint"),
    ("tombstones", "ts_us", "ALTER TABLE pgferry.tombstones ADD COLUMN IF NOT EXISTS ts_us bigint"),
    ("conflicts_outbox", "published_upto", outbox_sql!()),
    ("stamped_xacts", "xid", stamped_xacts_sql!()),
    ("xact_stamp_groups", "buckets", xact_stamps_sql!()),
    ("truncations", "xid", truncations_sql!()),
];

/// Adds what [`UPGRADES`] lists where it is missing (an ALTER only then: it takes a lock), and
/// makes pgferry's triggers fire on applied rows (`crate::replica_role`).
pub async fn upgrade_schema(sql: &pgferry_connectors::postgres::PgSession) -> Result<(), crate::ApplyError> {
    for (table, column, statement) in UPGRADES {
        let present: bool = sql
            .client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM information_schema.columns
                                WHERE table_schema = 'pgferry' AND table_name = $1 AND column_name = $2)",
                &[table, column],
            )
            .await
            .map_err(sql.err("reading pgferry's catalog (was `pgferry init` run?)"))?
            .get(0);
        if !present {
            sql.client
                .batch_execute(statement)
                .await
                .map_err(sql.err(format!("adding pgferry.{table}.{column}")))?;
        }
    }
    // Apply writes as a replica: pgferry's triggers must be ENABLE ALWAYS (earlier versions
    // made some ENABLE only).
    crate::replica_role::enable_own_triggers_always(sql).await?;
    add_key_change_triggers(sql).await?;
    add_truncation_triggers(sql).await?;
    Ok(())
}

/// Gives every table with a tombstone trigger its truncation trigger where an earlier version
/// left it without one (a no-op once they all have it).
async fn add_truncation_triggers(sql: &pgferry_connectors::postgres::PgSession) -> Result<(), crate::ApplyError> {
    let tables: Vec<String> = sql
        .client
        .query(
            "SELECT tg.tgrelid::regclass::text FROM pg_trigger tg
             WHERE tg.tgname = 'pgferry_tombstone' AND NOT EXISTS
                   (SELECT 1 FROM pg_trigger x WHERE x.tgrelid = tg.tgrelid AND x.tgname = 'pgferry_truncation')",
            &[],
        )
        .await
        .map_err(sql.err("looking up tables without pgferry's truncation trigger"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for table in tables {
        // pgferry's own set-up: not replicated as DDL (see `crate::ddl`).
        sql.client
            .batch_execute(&format!("BEGIN; SET LOCAL pgferry.local_ddl = on; {} COMMIT", truncation_trigger_sql(&table)))
            .await
            .map_err(sql.err(format!("adding pgferry's truncation trigger to {table}")))?;
        tracing::info!(endpoint = %sql.endpoint, table = %table, "pgferry truncation trigger added");
    }
    Ok(())
}

/// The statements that attach the truncation trigger (see `truncations_sql`) to `qualified`
/// (quoted `schema.table`). Idempotent.
fn truncation_trigger_sql(qualified: &str) -> String {
    format!(
        "DROP TRIGGER IF EXISTS pgferry_truncation ON {qualified};
         CREATE TRIGGER pgferry_truncation AFTER TRUNCATE ON {qualified}
           FOR EACH STATEMENT EXECUTE FUNCTION pgferry.record_truncation();
         ALTER TABLE {qualified} ENABLE ALWAYS TRIGGER pgferry_truncation;"
    )
}

/// The statements that attach the tombstone triggers to `qualified` (quoted `schema.table`)
/// whose primary key columns are `key` (in key order): `pgferry_tombstone` for deletes,
/// [`key_change_trigger_sql`]'s for primary-key changes, and the truncation trigger
/// ([`truncation_trigger_sql`]). Idempotent.
pub fn tombstone_trigger_sql(qualified: &str, key: &[String]) -> String {
    let args: Vec<String> = key.iter().map(|k| format!("'{}'", k.replace('\'', "''"))).collect();
    format!(
        "DROP TRIGGER IF EXISTS pgferry_tombstone ON {qualified};
         CREATE TRIGGER pgferry_tombstone AFTER DELETE ON {qualified}
           FOR EACH ROW EXECUTE FUNCTION pgferry.record_tombstone({});
         ALTER TABLE {qualified} ENABLE ALWAYS TRIGGER pgferry_tombstone;
         {}
         {}",
        args.join(", "),
        key_change_trigger_sql(qualified, key),
        truncation_trigger_sql(qualified)
    )
}

/// The statements that attach `pgferry_key_change` to `qualified`: an update that changes the
/// primary key leaves a tombstone for the old key, as a delete does (issue 16, scenario 9), so
/// a change of the old key dated before the move loses when it arrives after it. The `WHEN`
/// clause keeps the many updates that set the key to itself from calling the function.
/// Idempotent.
pub fn key_change_trigger_sql(qualified: &str, key: &[String]) -> String {
    let args: Vec<String> = key.iter().map(|k| format!("'{}'", k.replace('\'', "''"))).collect();
    let columns: Vec<String> = key.iter().map(|k| pgferry_connectors::postgres::quote_ident(k)).collect();
    let changed: Vec<String> = columns.iter().map(|c| format!("OLD.{c} IS DISTINCT FROM NEW.{c}")).collect();
    format!(
        "DROP TRIGGER IF EXISTS pgferry_key_change ON {qualified};
         CREATE TRIGGER pgferry_key_change AFTER UPDATE OF {} ON {qualified}
           FOR EACH ROW WHEN ({}) EXECUTE FUNCTION pgferry.record_tombstone({});
         ALTER TABLE {qualified} ENABLE ALWAYS TRIGGER pgferry_key_change;",
        columns.join(", "),
        changed.join(" OR "),
        args.join(", ")
    )
}

/// Adds `pgferry_key_change` to every table that has pgferry's tombstone trigger but not it (a
/// node set up by an earlier pgferry); its key is the table's primary key. Not replicated as
/// DDL. Returns how many tables it changed.
pub async fn add_key_change_triggers(sql: &pgferry_connectors::postgres::PgSession) -> Result<usize, crate::ApplyError> {
    let tables: Vec<(String, Vec<String>)> = sql
        .client
        .query(
            "SELECT tg.tgrelid::regclass::text, array_agg(a.attname::text ORDER BY k.ord)
             FROM pg_trigger tg
             JOIN pg_index i ON i.indrelid = tg.tgrelid AND i.indisprimary
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE tg.tgname = 'pgferry_tombstone' AND NOT tg.tgisinternal
               AND NOT EXISTS (SELECT 1 FROM pg_trigger o WHERE o.tgrelid = tg.tgrelid AND o.tgname = 'pgferry_key_change')
             GROUP BY tg.tgrelid",
            &[],
        )
        .await
        .map_err(sql.err("looking up tables without pgferry's key-change trigger"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (table, key) in &tables {
        sql.client
            .batch_execute(&format!(
                "BEGIN; SET LOCAL pgferry.local_ddl = on; {} COMMIT",
                key_change_trigger_sql(table, key)
            ))
            .await
            .map_err(sql.err(format!("adding pgferry's key-change trigger to {table}")))?;
        tracing::info!(endpoint = %sql.endpoint, table = %table, "key-change trigger added (primary-key changes leave a tombstone)");
    }
    Ok(tables.len())
}

/// The value of column `column` of a row version's stamp as every reader takes it, given the
/// version's override in `pgferry.row_stamps` joined as `o` (its `xid` is never NULL where it
/// exists): the override's value where the version has one — even a NULL, which is what `node
/// rebuild` records for a row that has no commit time on the peer it copied (too old, or written
/// while `track_commit_timestamp` was off), so the copy stays unstamped there as on the peer and
/// every node weighs changes against it alike (issue 16, scenario 11) — else `otherwise` (the
/// version's own commit time, or its group's record). One rule for the one-by-one path
/// (`writer`), grouped apply's read (`group::statements`), the truncate's scan and `node rebuild`.
pub fn stamp_override_or(o: &str, column: &str, otherwise: &str) -> String {
    format!("CASE WHEN {o}.xid IS NOT NULL THEN {o}.{column} ELSE {otherwise} END")
}

/// Who wrote a version of a row: origin commit time (µs since the Unix epoch), then node id.
/// Ordered the way last-update-wins compares them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp {
    /// Origin commit time.
    pub ts_us: i64,
    /// Origin node id (breaks ties).
    pub node_id: u16,
}

/// The local version of a row, as a conflict check reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LocalVersion {
    /// Its stamp (None: unknown commit time).
    pub(crate) stamp: Option<Stamp>,
    /// The node that wrote it (None: unknown).
    pub(crate) origin: Option<String>,
    /// The row as JSON (`to_jsonb`), for the conflict record.
    pub(crate) row_json: String,
}

/// The conflict types (PostgreSQL 18's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConflictType {
    /// An insert whose key exists locally, or whose values collide with another local row on a
    /// secondary unique key.
    InsertExists,
    /// An update of a row last written by another origin.
    UpdateOriginDiffers,
    /// An update whose new values collide with another local row on a secondary unique key.
    UpdateExists,
    /// An update whose row is gone locally and whose key has no tombstone.
    UpdateMissing,
    /// An insert or update whose row was deleted locally (a tombstone exists).
    UpdateDeleted,
    /// A delete of a row last written by another origin.
    DeleteOriginDiffers,
    /// A delete whose row is not there.
    DeleteMissing,
}

impl ConflictType {
    /// The name recorded in `pgferry.conflicts.conflict_type`.
    pub fn name(self) -> &'static str {
        match self {
            ConflictType::InsertExists => "insert_exists",
            ConflictType::UpdateOriginDiffers => "update_origin_differs",
            ConflictType::UpdateExists => "update_exists",
            ConflictType::UpdateMissing => "update_missing",
            ConflictType::UpdateDeleted => "update_deleted",
            ConflictType::DeleteOriginDiffers => "delete_origin_differs",
            ConflictType::DeleteMissing => "delete_missing",
        }
    }
}

/// What was done about a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// The incoming change was applied.
    ApplyRemote,
    /// The local row was kept; the incoming change was dropped.
    KeepLocal,
    /// The local row was kept; the incoming change waits in `pgferry.conflicts` for review.
    Parked,
}

impl Resolution {
    /// The name recorded in `pgferry.conflicts.resolution`.
    pub fn name(self) -> &'static str {
        match self {
            Resolution::ApplyRemote => "apply_remote",
            Resolution::KeepLocal => "keep_local",
            Resolution::Parked => "parked",
        }
    }
}

/// How `resolver` settles an incoming change stamped `remote` against the local version
/// stamped `local` (`None`: there is no local version to weigh, e.g. the row is missing).
/// `None` for the `error` resolver: the stream must stop.
pub fn decide(resolver: Resolver, local: Option<Stamp>, remote: Stamp) -> Option<Resolution> {
    let remote_if = |wins: bool| if wins { Resolution::ApplyRemote } else { Resolution::KeepLocal };
    Some(match resolver {
        Resolver::LastUpdateWins => remote_if(local.is_none_or(|l| remote > l)),
        Resolver::FirstUpdateWins => remote_if(local.is_none_or(|l| remote < l)),
        Resolver::ApplyRemote => Resolution::ApplyRemote,
        Resolver::KeepLocal => Resolution::KeepLocal,
        Resolver::Manual => Resolution::Parked,
        Resolver::Error => return None,
    })
}

/// Whether an update or delete of a row another origin wrote last must first be compared with
/// the local row (issue 16, scenario 12): a change whose before image equals the local row and
/// that is dated after it was made on top of that very version (n1 inserts, n3 applies it and
/// updates it), so it is not a conflict and is applied as it is. Only where the comparison can
/// change the outcome: the change carries a before image (REPLICA IDENTITY FULL on its origin),
/// the local version has a stamp, the change is later (with apply's clock wait, a change made on
/// top of a version always is), and `resolver` would not apply the change anyway — so never
/// under `last_update_wins` and `apply_remote`, whose outcome and records stay as they are.
pub fn compare_before_image(resolver: Resolver, local: Option<Stamp>, remote: Stamp, has_before: bool) -> bool {
    has_before && local.is_some_and(|l| remote > l) && decide(resolver, local, remote) != Some(Resolution::ApplyRemote)
}

/// Whether a change that lost to another row on a secondary unique key also removes the local
/// row at its own key (issue 16, scenario 8): under the stamp-weighing resolvers
/// (`last_update_wins`, `first_update_wins`), where the winner arrived second the change had
/// replaced that row and was then deleted as the colliding row, so here it goes too — but only
/// a row the change would have replaced: `on_top` (written by the change's origin, or equal to
/// its before image), without a commit time, or one the change beats. A row there that the
/// change loses to stays. Other resolvers never remove it.
pub fn own_row_goes(resolver: Resolver, own: Option<Stamp>, remote: Stamp, on_top: bool) -> bool {
    matches!(resolver, Resolver::LastUpdateWins | Resolver::FirstUpdateWins)
        && (on_top || own.is_none() || decide(resolver, own, remote) == Some(Resolution::ApplyRemote))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(ts_us: i64, node_id: u16) -> Stamp {
        Stamp { ts_us, node_id }
    }

    #[test]
    fn later_commit_wins_and_ties_go_to_the_greater_node() {
        let luw = Resolver::LastUpdateWins;
        assert_eq!(decide(luw, Some(s(10, 1)), s(11, 1)), Some(Resolution::ApplyRemote));
        assert_eq!(decide(luw, Some(s(11, 1)), s(10, 3)), Some(Resolution::KeepLocal));
        assert_eq!(decide(luw, Some(s(10, 1)), s(10, 2)), Some(Resolution::ApplyRemote));
        assert_eq!(decide(luw, Some(s(10, 2)), s(10, 1)), Some(Resolution::KeepLocal));
        assert_eq!(decide(luw, None, s(10, 1)), Some(Resolution::ApplyRemote));
        // Symmetric: of two versions, exactly one wins whichever node compares them.
        for (a, b) in [(s(5, 1), s(5, 2)), (s(4, 9), s(5, 1))] {
            let a_wins_over_b = decide(luw, Some(b), a) == Some(Resolution::ApplyRemote);
            let b_wins_over_a = decide(luw, Some(a), b) == Some(Resolution::ApplyRemote);
            assert_ne!(a_wins_over_b, b_wins_over_a);
        }
    }

    #[test]
    fn other_resolvers() {
        let (l, r) = (Some(s(10, 1)), s(11, 2));
        assert_eq!(decide(Resolver::FirstUpdateWins, l, r), Some(Resolution::KeepLocal));
        assert_eq!(decide(Resolver::FirstUpdateWins, Some(s(12, 1)), r), Some(Resolution::ApplyRemote));
        assert_eq!(decide(Resolver::ApplyRemote, Some(s(99, 9)), r), Some(Resolution::ApplyRemote));
        assert_eq!(decide(Resolver::KeepLocal, None, r), Some(Resolution::KeepLocal));
        assert_eq!(decide(Resolver::Manual, l, r), Some(Resolution::Parked));
        assert_eq!(decide(Resolver::Error, l, r), None);
    }

    #[test]
    fn before_images_are_compared_only_where_they_can_change_the_outcome() {
        let (l, later, earlier) = (Some(s(10, 1)), s(20, 3), s(5, 3));
        for resolver in [Resolver::FirstUpdateWins, Resolver::KeepLocal, Resolver::Manual, Resolver::Error] {
            assert!(compare_before_image(resolver, l, later, true), "{resolver:?}");
            assert!(!compare_before_image(resolver, l, later, false), "{resolver:?}: no before image");
            assert!(!compare_before_image(resolver, l, earlier, true), "{resolver:?}: dated before the local row");
            assert!(!compare_before_image(resolver, None, later, true), "{resolver:?}: no local stamp");
        }
        for resolver in [Resolver::LastUpdateWins, Resolver::ApplyRemote] {
            assert!(!compare_before_image(resolver, l, later, true), "{resolver:?} applies it anyway");
        }
    }

    #[test]
    fn a_change_losing_on_a_unique_key_removes_only_the_row_it_would_replace() {
        let remote = s(20, 1);
        let luw = Resolver::LastUpdateWins;
        assert!(own_row_goes(luw, Some(s(10, 2)), remote, false), "older: replaced, then lost");
        assert!(!own_row_goes(luw, Some(s(30, 2)), remote, false), "newer: it stays");
        assert!(own_row_goes(luw, Some(s(30, 2)), remote, true), "made on top of it");
        assert!(own_row_goes(luw, None, remote, false), "no commit time");
        let fuw = Resolver::FirstUpdateWins;
        assert!(own_row_goes(fuw, Some(s(30, 2)), remote, false), "first update wins: the later row is replaced");
        assert!(!own_row_goes(fuw, Some(s(10, 2)), remote, false));
        for other in [Resolver::ApplyRemote, Resolver::KeepLocal, Resolver::Manual, Resolver::Error] {
            assert!(!own_row_goes(other, Some(s(10, 2)), remote, true), "{other:?}");
        }
    }

    #[test]
    fn trigger_sql_quotes_key_names() {
        let sql = tombstone_trigger_sql("\"public\".\"t\"", &["id".into(), "it's".into()]);
        assert!(sql.contains("record_tombstone('id', 'it''s')"), "{sql}");
        assert!(sql.contains("AFTER UPDATE OF \"id\", \"it's\""), "{sql}");
        assert!(sql.contains("WHEN (OLD.\"id\" IS DISTINCT FROM NEW.\"id\" OR OLD.\"it's\" IS DISTINCT FROM NEW.\"it's\")"), "{sql}");
        assert!(sql.contains("CREATE TRIGGER pgferry_truncation AFTER TRUNCATE ON \"public\".\"t\""), "{sql}");
    }
}
