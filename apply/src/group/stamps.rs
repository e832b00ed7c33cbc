//! The exact stamps of the row versions a group wrote (`pgferry.xact_stamp_groups` and
//! `pgferry.xact_stamps`, see `conflict.rs`): per group's local transaction, the source commit
//! time of every row version whose source transaction is not the group's last, in buckets of
//! about [`PER_BUCKET`] keys. A few bucket rows per group replace a `row_stamps` upsert per row
//! (the largest statement cost of a TPC-B drain before them).
//!
//! The group read asks the server only whether a version's writer has stamps and in how many
//! buckets (a probe of a small primary key). The stamps come from this cache: the buckets this
//! writer made, kept as it made them, and the ones it fetched — only the buckets of the keys
//! read — for versions other sessions or earlier processes wrote. Stamps never change once
//! committed (a 32-bit xid is reused only after wraparound, long after its stamps are
//! collected), so the cache needs no invalidation; stamps collected on the server
//! (`tombstone_gc.rs`) may stay cached: they are still exact.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// One bucket's stamps: table name → key (the tombstone trigger's JSON text) → source commit
/// time (µs).
pub type Stamps = rustc_hash::FxHashMap<String, rustc_hash::FxHashMap<String, i64>>;

/// Keys per bucket a group aims at (a bucket's JSON stays under PostgreSQL's TOAST threshold,
/// so reading one key decompresses nothing).
pub const PER_BUCKET: usize = 32;

/// How many buckets the cache keeps (the most recently made or fetched): about 8 large groups.
const KEPT: usize = 1024;

/// The number of buckets for `entries` stamps: a power of two.
pub fn buckets_for(entries: usize) -> i32 {
    let n = entries.div_ceil(PER_BUCKET).max(1).next_power_of_two();
    i32::try_from(n).unwrap_or(1 << 30)
}

/// The bucket of `key` of `table` among `buckets` (FNV-1a over table, a NUL, and key: stable
/// across versions, as stamps outlive the process that wrote them).
pub fn bucket_of(table: &str, key: &str, buckets: i32) -> i32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in table.bytes().chain([0]).chain(key.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(buckets.max(1).unsigned_abs())) as i32
}

/// A group's stamps split into `buckets` buckets (bucket number, stamps).
pub fn split(entries: Vec<(String, String, i64)>, buckets: i32) -> Vec<(i32, Stamps)> {
    let mut out: HashMap<i32, Stamps> = HashMap::new();
    for (table, key, ts) in entries {
        let b = bucket_of(&table, &key, buckets);
        out.entry(b).or_default().entry(table).or_default().insert(key, ts);
    }
    let mut v: Vec<(i32, Stamps)> = out.into_iter().collect();
    v.sort_by_key(|(b, _)| *b);
    v
}

/// Cached buckets by (32-bit xid, bucket).
#[derive(Default)]
pub struct StampCache {
    buckets: HashMap<(i64, i32), Arc<Stamps>>,
    order: VecDeque<(i64, i32)>,
}

impl StampCache {
    /// Bucket `bucket` of the group whose local transaction is `xid`, if cached.
    pub fn get(&self, xid: i64, bucket: i32) -> Option<&Arc<Stamps>> {
        self.buckets.get(&(xid, bucket))
    }

    /// Keeps `stamps` as bucket `bucket` of `xid` (replacing one), dropping the oldest beyond
    /// [`KEPT`].
    pub fn put(&mut self, xid: i64, bucket: i32, stamps: Arc<Stamps>) {
        if self.buckets.insert((xid, bucket), stamps).is_none() {
            self.order.push_back((xid, bucket));
        }
        while self.order.len() > KEPT {
            if let Some(old) = self.order.pop_front() {
                self.buckets.remove(&old);
            }
        }
    }
}

/// A bucket's JSON text (`{table: {key: µs}}`), as written and as read back.
pub fn to_json(stamps: &Stamps) -> String {
    // serde_json writes a map's keys as JSON strings, escaped: keys hold quotes. A map of
    // strings to integers always serializes.
    serde_json::to_string(stamps).unwrap_or_else(|_| "{}".into())
}

/// Reads a bucket's JSON text.
pub fn from_json(text: &str) -> Result<Stamps, serde_json::Error> {
    serde_json::from_str(text)
}

/// Writes a group's stamps under the local transaction's xid, which it returns: `$1` the
/// number of buckets, `$2` the group's (last) commit time, `$3` the bucket numbers (`int[]`),
/// `$4` their JSON texts (`text[]`).
pub const INSERT: &str = "WITH g AS (
        INSERT INTO pgferry.xact_stamp_groups (xid, buckets, ts_us)
        VALUES (txid_current() % 4294967296, $1, $2)
        ON CONFLICT (xid) DO UPDATE SET buckets = EXCLUDED.buckets, ts_us = EXCLUDED.ts_us
        RETURNING xid),
    b AS (
        INSERT INTO pgferry.xact_stamps (xid, bucket, stamps)
        SELECT g.xid, u.b, u.s::jsonb FROM g, unnest($3::int[], $4::text[]) AS u(b, s)
        ON CONFLICT (xid, bucket) DO UPDATE SET stamps = EXCLUDED.stamps
        RETURNING 1)
    SELECT g.xid, (SELECT count(*) FROM b) FROM g";

/// Fetches buckets: `$1` xids (`bigint[]`), `$2` bucket numbers (`int[]`), pairwise; returns
/// xid, bucket, JSON text.
pub const FETCH: &str = "SELECT x.xid, x.bucket, x.stamps::text FROM pgferry.xact_stamps x
    JOIN unnest($1::bigint[], $2::int[]) AS u(xid, bucket) ON x.xid = u.xid AND x.bucket = u.bucket";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_trip_keys_with_quotes() {
        let mut s = Stamps::default();
        s.entry("public.t".into()).or_default().insert("[1, \"a\\\"b\"]".into(), 1_700_000_000_123_456);
        s.entry("public.u".into()).or_default().insert("[2]".into(), 5);
        let back = from_json(&to_json(&s)).expect("parses");
        assert_eq!(back, s);
    }

    #[test]
    fn a_group_is_split_into_small_buckets_every_key_in_its_own() {
        let entries: Vec<(String, String, i64)> = (0..1000).map(|i| ("public.t".to_string(), format!("[{i}]"), i)).collect();
        let n = buckets_for(entries.len());
        assert_eq!(n, 32);
        let split = split(entries.clone(), n);
        let largest = split.iter().map(|(_, s)| s["public.t"].len()).max().unwrap_or(0);
        assert!(largest < 3 * PER_BUCKET, "a bucket of {largest} keys");
        for (table, key, ts) in entries {
            let b = bucket_of(&table, &key, n);
            let (_, s) = split.iter().find(|(x, _)| *x == b).expect("the key's bucket exists");
            assert_eq!(s[&table][&key], ts);
        }
        assert_eq!(buckets_for(1), 1);
        assert_eq!(bucket_of("t", "[1]", 1), 0);
    }

    #[test]
    fn keeps_the_most_recent_buckets() {
        let mut c = StampCache::default();
        for x in 0..(KEPT as i64 + 3) {
            c.put(x, 0, Arc::new(Stamps::default()));
        }
        assert!(c.get(0, 0).is_none() && c.get(2, 0).is_none());
        assert!(c.get(3, 0).is_some() && c.get(KEPT as i64 + 2, 0).is_some());
        c.put(3, 0, Arc::new(Stamps::default()));
        assert_eq!(c.order.len(), KEPT);
    }
}
