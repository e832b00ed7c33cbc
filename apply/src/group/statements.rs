//! The set-based statements of grouped apply, per table (pure text building). Every value goes
//! in as a `text[]` parameter, unnested and cast to the local column's type (`k.c1::int`), which
//! is lossless for every type, as the one-by-one path's `$n::text::<type>` is. Keys are compared
//! and turned into the tombstone trigger's JSON form (`jsonb_build_array(to_jsonb(…))`) exactly as
//! the one-by-one path does, so both paths lock, find and stamp the same keys.

use pgferry_connectors::postgres::quote_ident;

use crate::conflict::stamp_override_or;
use crate::writer::{LocalTable, KEY_LOCK_CLASS};

/// `unnest($first::text[], …) AS k(c1, …, cn)` over `n` arrays, with ORDINALITY when asked.
fn unnest(first: usize, n: usize, names: &[String], ordinality: bool) -> String {
    let arrays: Vec<String> = (0..n).map(|i| format!("${}::text[]", first + i)).collect();
    let ord = if ordinality { " WITH ORDINALITY" } else { "" };
    let mut cols = names.to_vec();
    if ordinality {
        cols.push("i".into());
    }
    format!("unnest({}){ord} AS k({})", arrays.join(", "), cols.join(", "))
}

/// `c1`, …, `cn`: the aliases of the key columns in the unnested arrays.
fn key_aliases(table: &LocalTable) -> Vec<String> {
    (1..=table.key.len()).map(|i| format!("c{i}")).collect()
}

/// The type of column `col` (text when unknown: the statement then fails, and the group falls
/// back to the one-by-one path, which names the column).
fn ty<'t>(table: &'t LocalTable, col: &str) -> &'t str {
    table.types.get(col).map_or("text", String::as_str)
}

/// `t.k1 = k.c1::T1 AND …`.
fn key_match(table: &LocalTable) -> String {
    table
        .key
        .iter()
        .enumerate()
        .map(|(i, c)| format!("t.{} = k.c{}::{}", quote_ident(c), i + 1, ty(table, c)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The key in the tombstone trigger's form, from the unnested key columns.
fn key_json(table: &LocalTable) -> String {
    let parts: Vec<String> = table
        .key
        .iter()
        .enumerate()
        .map(|(i, c)| format!("to_jsonb(k.c{}::{})", i + 1, ty(table, c)))
        .collect();
    format!("jsonb_build_array({})", parts.join(", "))
}

/// Takes the key locks (the one-by-one path's `pg_advisory_xact_lock` on the table name and the
/// key's JSON) of the keys in `$1..$n`, in one fixed order (by lock key) so that streams
/// never deadlock on them. Parameters: the key columns, then the table name.
pub fn lock_keys(table: &LocalTable) -> String {
    let n = table.key.len();
    format!(
        "SELECT count(pg_advisory_xact_lock({KEY_LOCK_CLASS}, h)) FROM
           (SELECT DISTINCT hashtext(${} || {}::text) AS h FROM {} ORDER BY h) s",
        n + 1,
        key_json(table),
        unnest(1, n, &key_aliases(table), false)
    )
}

/// Locks the existing rows at the keys in `$1..$n`, in key order. Parameters: the key columns.
pub fn lock_rows(table: &LocalTable) -> String {
    let n = table.key.len();
    let order: Vec<String> = table.key.iter().map(|c| format!("t.{}", quote_ident(c))).collect();
    format!(
        "SELECT count(*) FROM (SELECT 1 FROM {} t JOIN {} ON {} ORDER BY {} FOR UPDATE OF t) s",
        table.qualified,
        unnest(1, n, &key_aliases(table), false),
        key_match(table),
        order.join(", ")
    )
}

/// `AND t.xmin = k.x`: the row is still the version the group read.
fn same_version() -> &'static str {
    " AND t.xmin::text::int8 = k.x::int8"
}

/// Reads the state of every key in `$1..$n` (one row per key, in input order): its position,
/// its JSON form, whether a row exists, the row's stamp (commit time, or the override in
/// `pgferry.row_stamps` tied to the version's xmin, NULL included: `stamp_override_or`) and
/// replication origin, the version's xmin,
/// the override's origin, the key's tombstone stamp (its override, or its deleting
/// transaction's commit time) and origin, and in how many buckets the version's writer, if a
/// group, keeps exact stamps (`pgferry.xact_stamp_groups`; the caller looks them up, see
/// `stamps.rs`).
/// `row_stamps` is probed only if the table has overrides at all and only for versions whose
/// writer is listed in `pgferry.stamped_xacts`, and `tombstones` only if the table has any
/// (one-time filters: the first is computed once per statement, the second per key; `OFFSET 0`
/// keeps each subquery apart so the planner gates the probe instead of joining it; the `ORDER
/// BY … LIMIT 1` form makes the once-per-statement checks use the primary key, which `EXISTS`
/// would not in a generic plan). The table's last truncate is read once per statement. These
/// cut the read of 1,000 keys of a table without tombstones from ~8.2 to ~5.3 ms (TPC-B
/// accounts, warm, `EXPLAIN ANALYZE`; comparison-notes.md), with the same result rows. The row itself is not read: only a conflict record needs it
/// ([`local_rows`]). Parameters: the key columns, then the table name.
pub fn read_state(table: &LocalTable) -> String {
    let n = table.key.len();
    format!(
        "SELECT k.i::int8, kj.key::text, t.ctid IS NOT NULL,
                {},
                c.roident::int8,
                t.xmin::text::int8,
                s.origin,
                coalesce(CASE WHEN tb.stamp_xid = tb.xid THEN tb.ts_us END,
                         (extract(epoch FROM tc.timestamp) * 1000000)::int8),
                tc.roident::int8,
                x.buckets,
                tb.xid,
                (SELECT (extract(epoch FROM trc.timestamp) * 1000000)::int8 FROM pgferry.truncations tr,
                        pg_xact_commit_timestamp_origin((tr.xid % 4294967296)::text::xid) trc WHERE tr.tbl = ${tbl}),
                (SELECT trc.roident::int8 FROM pgferry.truncations tr,
                        pg_xact_commit_timestamp_origin((tr.xid % 4294967296)::text::xid) trc WHERE tr.tbl = ${tbl})
         FROM {}
         CROSS JOIN LATERAL (SELECT {} AS key) kj
         LEFT JOIN {} t ON {}
         LEFT JOIN LATERAL pg_xact_commit_timestamp_origin(t.xmin) c ON t.ctid IS NOT NULL
         LEFT JOIN LATERAL (
              SELECT s.xid, s.ts_us, s.origin FROM pgferry.row_stamps s
              WHERE (SELECT r.tbl FROM pgferry.row_stamps r WHERE r.tbl = ${tbl} ORDER BY r.tbl, r.key LIMIT 1) IS NOT NULL
                AND EXISTS (SELECT FROM pgferry.stamped_xacts x WHERE x.xid = t.xmin::text::int8)
                AND s.tbl = ${tbl} AND s.key = kj.key AND s.xid % 4294967296 = t.xmin::text::int8
              OFFSET 0) s ON true
         LEFT JOIN pgferry.xact_stamp_groups x ON x.xid = t.xmin::text::int8
         LEFT JOIN LATERAL (
              SELECT tb.xid, tb.stamp_xid, tb.ts_us FROM pgferry.tombstones tb
              WHERE (SELECT y.tbl FROM pgferry.tombstones y WHERE y.tbl = ${tbl} ORDER BY y.tbl, y.key LIMIT 1) IS NOT NULL
                AND tb.tbl = ${tbl} AND tb.key = kj.key
              OFFSET 0) tb ON true
         LEFT JOIN LATERAL pg_xact_commit_timestamp_origin((tb.xid % 4294967296)::text::xid) tc
                ON tb.xid IS NOT NULL
         ORDER BY k.i",
        stamp_override_or("s", "ts_us", "(extract(epoch FROM c.timestamp) * 1000000)::int8"),
        unnest(1, n, &key_aliases(table), true),
        key_json(table),
        table.qualified,
        key_match(table),
        tbl = n + 1,
    )
}

/// The rows at the keys in `$1..$n` as JSON (`to_jsonb`), with the key's position, where the
/// row is still the version read (`xmin` in `$n+1`): the local rows a group's conflict records
/// show. Parameters: the key columns, the xmins.
pub fn local_rows(table: &LocalTable) -> String {
    let mut names = key_aliases(table);
    names.push("x".into());
    format!(
        "SELECT k.i::int8, to_jsonb(t)::text FROM {} JOIN {} t ON {}{}",
        unnest(1, table.key.len() + 1, &names, true),
        table.qualified,
        key_match(table),
        same_version()
    )
}

/// Deletes the rows at the keys in `$1..$n` whose `xmin` is still the one read (`$n+1`); the
/// count it returns must be their number.
pub fn delete(table: &LocalTable) -> String {
    let mut names = key_aliases(table);
    names.push("x".into());
    format!(
        "DELETE FROM {} t USING {} WHERE {}{}",
        table.qualified,
        unnest(1, table.key.len() + 1, &names, false),
        key_match(table),
        same_version()
    )
}

/// Inserts rows whose columns are `columns`, one `text[]` parameter per column.
pub fn insert(table: &LocalTable, columns: &[&str]) -> String {
    let names: Vec<String> = (1..=columns.len()).map(|i| format!("v{i}")).collect();
    let values: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("k.v{}::{}", i + 1, ty(table, c)))
        .collect();
    let cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    format!(
        "INSERT INTO {} ({}) SELECT {} FROM {}",
        table.qualified,
        cols.join(", "),
        values.join(", "),
        unnest(1, columns.len(), &names, false)
    )
}

/// Updates the rows at the keys in `$1..$n` whose `xmin` is still the one read (`$n+1`),
/// setting `columns` (`$n+2…`, one per column).
pub fn update(table: &LocalTable, columns: &[&str]) -> String {
    let n = table.key.len() + 1;
    let mut names = key_aliases(table);
    names.push("x".into());
    names.extend((1..=columns.len()).map(|i| format!("v{i}")));
    let sets: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} = k.v{}::{}", quote_ident(c), i + 1, ty(table, c)))
        .collect();
    format!(
        "UPDATE {} t SET {} FROM {} WHERE {}{}",
        table.qualified,
        sets.join(", "),
        unnest(1, n + columns.len(), &names, false),
        key_match(table),
        same_version()
    )
}

/// Records tombstones for the keys in `$1..$n` (deletes of rows that were not there and won),
/// dated by this transaction. Parameters: the key columns, then the table name.
pub fn tombstones(table: &LocalTable) -> String {
    let n = table.key.len();
    format!(
        "INSERT INTO pgferry.tombstones (tbl, key, xid)
         SELECT ${}, {}, txid_current() FROM {}
         ON CONFLICT (tbl, key) DO UPDATE SET xid = EXCLUDED.xid",
        n + 1,
        key_json(table),
        unnest(1, n, &key_aliases(table), false)
    )
}

/// Stamps the tombstones this transaction wrote at the keys in `$1..$n` with the commit time in
/// `$n+1` of the source transaction that deleted them (valid while `stamp_xid = xid`: a later
/// delete of the key writes another xid). Parameters: the key columns, the times, the table name.
pub fn tombstone_stamps(table: &LocalTable) -> String {
    let n = table.key.len();
    let mut names = key_aliases(table);
    names.push("ts".into());
    format!(
        "UPDATE pgferry.tombstones tb SET stamp_xid = tb.xid, ts_us = k.ts::int8
         FROM {} WHERE tb.tbl = ${} AND tb.key = {}",
        unnest(1, n + 1, &names, false),
        n + 2,
        key_json(table)
    )
}

/// Fails (`division by zero`, aborting the transaction) if a key in `$1..$n` that the group
/// inserted now has another tombstone than the one read (its xid in `$n+1`, NULL: none), read
/// in a fresh snapshot after the inserts: a local transaction that held a version of the key
/// (deleting it, or inserting and deleting it) made the insert wait, then committed a delete
/// that the group's read could not see (issue 16, scenario 13). The group then goes again with
/// that tombstone in its read. Parameters: the key columns, the xids, the table name.
pub fn inserts_unraced(table: &LocalTable) -> String {
    let n = table.key.len();
    let mut names = key_aliases(table);
    names.push("x".into());
    format!(
        "SELECT 1 / (count(*) = 0)::int FROM {}
           JOIN pgferry.tombstones tb ON tb.tbl = ${} AND tb.key = {}
         WHERE tb.xid IS DISTINCT FROM k.x::int8",
        unnest(1, n + 1, &names, false),
        n + 2,
        key_json(table)
    )
}

/// `text` (a data-modifying statement with `n - 1` parameters) wrapped so that it fails —
/// `division by zero`, aborting the transaction — unless it touches exactly `$n` rows.
pub fn counted(text: &str, n: usize) -> String {
    format!("WITH w AS ({text} RETURNING 1) SELECT count(*) / (count(*) = ${n})::int FROM w")
}

/// Records conflicts, one per element of 13 `text[]` parameters (the columns of the one-by-one
/// path's record, in the same order), in array order.
pub const CONFLICTS: &str = "INSERT INTO pgferry.conflicts (tbl, key, conflict_type, resolver, resolution, local_row,
        local_origin, local_commit_ts, remote_op, remote_row, remote_origin, remote_commit_ts, remote_commit_lsn)
    SELECT c1, c2::jsonb, c3, c4, c5, c6::jsonb, c7,
           'epoch'::timestamptz + c8::int8 * interval '1 microsecond', c9, c10::jsonb, c11,
           'epoch'::timestamptz + c12::int8 * interval '1 microsecond', c13::pg_lsn
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[]) WITH ORDINALITY
         AS k(c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, i)
    ORDER BY i";

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn table() -> LocalTable {
        LocalTable {
            name: "public.t".into(),
            qualified: "\"public\".\"t\"".into(),
            types: HashMap::from([("id".to_string(), "integer".to_string()), ("v".to_string(), "text".to_string())]),
            key: vec!["id".into()],
            resolver: Default::default(),
            delta: Default::default(),
            unique_keys: Vec::new(),
            groupable: true,
        }
    }

    #[test]
    fn statements_cast_every_value_and_quote_every_identifier() {
        let t = table();
        assert_eq!(
            update(&t, &["v"]),
            "UPDATE \"public\".\"t\" t SET \"v\" = k.v1::text FROM unnest($1::text[], $2::text[], $3::text[]) AS k(c1, x, v1) WHERE t.\"id\" = k.c1::integer AND t.xmin::text::int8 = k.x::int8"
        );
        assert_eq!(
            insert(&t, &["id", "v"]),
            "INSERT INTO \"public\".\"t\" (\"id\", \"v\") SELECT k.v1::integer, k.v2::text FROM unnest($1::text[], $2::text[]) AS k(v1, v2)"
        );
        assert!(read_state(&t).contains("tb.tbl = $2 AND tb.key = kj.key"), "{}", read_state(&t));
        assert!(lock_keys(&t).contains("hashtext($2 || jsonb_build_array(to_jsonb(k.c1::integer))::text)"), "{}", lock_keys(&t));
        assert!(local_rows(&t).contains("JOIN \"public\".\"t\" t ON t.\"id\" = k.c1::integer"), "{}", local_rows(&t));
    }
}
