//! Avro-safe names and registry subjects (TopicRecordNameStrategy).

/// Makes one name part Avro-safe: `[A-Za-z_][A-Za-z0-9_]*`. Anything else becomes `_`, and a
/// leading digit gets a `_` prefix. Two different tables may map to the same name; callers
/// detect that ([`crate::envelope_schema::TableSchemas`] users keep a map and refuse collisions).
pub fn avro_safe(part: &str) -> String {
    let mut out = String::with_capacity(part.len() + 1);
    for (i, ch) in part.chars().enumerate() {
        if i == 0 && ch.is_ascii_digit() {
            out.push('_');
        }
        if ch.is_ascii_alphanumeric() || ch == '_' {
            out.push(ch);
        } else {
            out.push('_');
        }
    }
    if out.is_empty() {
        out.push('_');
    }
    out
}

/// The Avro namespace of a table: `<cluster>.<schema>.<table>`, each part Avro-safe.
pub fn table_namespace(cluster: &str, schema: &str, table: &str) -> String {
    format!("{}.{}.{}", avro_safe(cluster), avro_safe(schema), avro_safe(table))
}

// PostgreSQL object names. Replication slots and replication origins are server-wide (one
// namespace per PostgreSQL server, whatever the database), so two pgferry clusters on one
// server, or one cluster with nodes in two databases of one server, must never name one alike:
// every server-wide name carries the cluster and the node it belongs to. Publications are per
// database, and a database holds one pgferry node (its `pgferry` schema), so theirs is fixed.
//
// The rule (docs/decisions.md, "Names of slots and origins"): `pgferry_` then the parts joined
// by `_` — e.g. slot `pgferry_prod_n1`, origin `pgferry_prod_n2_from_n1` — when every cluster
// and node name in it is only lowercase ASCII letters and digits and the whole fits in
// PostgreSQL's 63 bytes. Otherwise (a `_` or `-` in a name would make two splits read alike,
// slot names allow only `[a-z0-9_]`, or it is too long) the name is that text made
// `[a-z0-9_]` and cut to fit, then `__` and 12 hex digits of a hash of the kind and the exact
// names: `pgferry_prod_eu_n1__3f2a9c0d81be`. A plain name never holds `__`, so the two forms
// cannot meet, and the hash tells apart names whose readable text is alike.

/// PostgreSQL's longest identifier (NAMEDATALEN − 1 bytes); longer slot names are refused and
/// longer identifiers cut.
pub const PG_NAME_MAX: usize = 63;

/// Hex digits of the hash in a hashed name.
const HASH_DIGITS: usize = 12;

/// The replication slot of node `node` of cluster `cluster` (server-wide).
pub fn slot_name(cluster: &str, node: &str) -> String {
    server_wide("slot", &[Name(cluster), Name(node)])
}

/// The slot name pgferry used before names carried the cluster: `pgferry_<node>`. `init`
/// moves such a slot, found in the node's own database, to [`slot_name`].
pub fn legacy_slot_name(node: &str) -> String {
    format!("pgferry_{node}")
}

/// The publication a node's capture reads (per database, so it needs no cluster).
pub const PUBLICATION: &str = "pgferry_default";

/// [`PUBLICATION`].
pub fn publication_name() -> &'static str {
    PUBLICATION
}

/// The replication origin under which node `node`'s apply writes the changes of node
/// `origin` (server-wide): `pgferry_<cluster>_<node>_from_<origin>`. Rows keep it as their last
/// writer, which is how conflict detection knows who wrote them, and capture recognizes
/// transactions to forward by it.
pub fn replication_origin(cluster: &str, node: &str, origin: &str) -> String {
    server_wide("origin", &[Name(cluster), Name(node), Word("from"), Name(origin)])
}

/// The replication origin name pgferry used before names carried the cluster and the node
/// applying: `pgferry_<origin>`. Rows written before an upgrade carry it; it is still read as
/// `origin`'s (see [`replication_origins_read`]), never written under.
pub fn legacy_replication_origin(origin: &str) -> String {
    format!("pgferry_{origin}")
}

/// Every replication origin name that, in node `node`'s database, marks a transaction applied
/// from `origin`: the current one first, then the legacy one. A row's origin id can only come
/// from a session in the row's own database, so reading the legacy name as `origin`'s is safe
/// even where another database on the server still uses it.
pub fn replication_origins_read(cluster: &str, node: &str, origin: &str) -> [String; 2] {
    [replication_origin(cluster, node, origin), legacy_replication_origin(origin)]
}

/// The replication origin `pgferry repair` writes node `node` under (not published by capture).
pub fn repair_origin(cluster: &str, node: &str) -> String {
    server_wide("repair", &[Name(cluster), Name(node), Word("repair")])
}

/// The replication origin `pgferry node rebuild` writes node `node` under (not published).
pub fn rebuild_origin(cluster: &str, node: &str) -> String {
    server_wide("rebuild", &[Name(cluster), Name(node), Word("rebuild")])
}

/// The temporary slot on the peer whose exported snapshot `node rebuild` copies node `node` from.
pub fn rebuild_snapshot_slot(cluster: &str, node: &str) -> String {
    server_wide("rebuild-slot", &[Name(cluster), Name(node), Word("rebuild")])
}

/// One part of a server-wide name: a cluster or node name, or a fixed word.
#[derive(Clone, Copy)]
enum Part<'a> {
    Name(&'a str),
    Word(&'static str),
}

use Part::{Name, Word};

/// A name by the rule above, of the `parts` joined by `_`. `kind` goes into the hash only.
/// Cut to fit, every name keeps an equal share of the room (a short one all of it), so a long
/// cluster name does not push the node names out.
fn server_wide<'a>(kind: &str, parts: &[Part<'a>]) -> String {
    fn text<'a>(p: &Part<'a>) -> &'a str {
        match *p {
            Name(s) | Word(s) => s,
        }
    }
    let names: Vec<&str> = parts.iter().filter_map(|p| if let Name(s) = *p { Some(s) } else { None }).collect();
    let readable = format!("pgferry_{}", parts.iter().map(text).collect::<Vec<_>>().join("_"));
    let plain = |s: &&str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if names.iter().all(plain) && readable.len() <= PG_NAME_MAX {
        return readable;
    }
    let fixed = "pgferry".len()
        + parts.len()
        + parts.iter().map(|p| if let Word(w) = *p { w.len() } else { 0 }).sum::<usize>()
        + 2
        + HASH_DIGITS;
    let mut room = shares(&names.iter().map(|n| n.len()).collect::<Vec<_>>(), PG_NAME_MAX.saturating_sub(fixed)).into_iter();
    let mut body = String::from("pgferry");
    for p in parts {
        let keep = match p {
            Name(_) => room.next().unwrap_or(0),
            Word(w) => w.len(),
        };
        body.push('_');
        body.extend(
            text(p)
                .chars()
                .take(keep)
                .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }),
        );
    }
    let body = body.trim_end_matches('_');
    let hash = stable_hash(kind, &names);
    format!("{body}__{:0width$x}", hash >> (64 - 4 * HASH_DIGITS), width = HASH_DIGITS)
}

/// How many characters of each of `lengths` to keep so that they add up to at most `room`:
/// shorter ones whole, the longer ones an equal share of what is left.
fn shares(lengths: &[usize], room: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| lengths[i]);
    let mut out = vec![0; lengths.len()];
    let mut left = room;
    for (k, &i) in order.iter().enumerate() {
        let share = left / (lengths.len() - k);
        out[i] = lengths[i].min(share);
        left -= out[i];
    }
    out
}

/// A hash of `kind` and `names` that never changes between builds, platforms or Rust
/// versions (names stored in PostgreSQL depend on it): FNV-1a over each string's length and
/// bytes, then the SplitMix64 finalizer to spread the bits.
fn stable_hash(kind: &str, names: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for s in std::iter::once(&kind).chain(names) {
        for b in (s.len() as u64).to_le_bytes().into_iter().chain(s.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The registry subject of a record under TopicRecordNameStrategy: `<topic>-<full name>`.
pub fn subject(topic: &str, record_full_name: &str) -> String {
    format!("{topic}-{record_full_name}")
}

/// The data topic of a region: `<cluster>.<region>.changes`.
pub fn region_topic(cluster: &str, region: &str) -> String {
    format!("{cluster}.{region}.changes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_names_avro_safe() {
        assert_eq!(avro_safe("orders"), "orders");
        assert_eq!(avro_safe("order-items"), "order_items");
        assert_eq!(avro_safe("1st"), "_1st");
        assert_eq!(avro_safe("Ünï"), "_n_");
        assert_eq!(avro_safe(""), "_");
        assert_eq!(table_namespace("prod", "public", "t x"), "prod.public.t_x");
        assert_eq!(
            subject("c.eu.changes", "c.public.t.Envelope"),
            "c.eu.changes-c.public.t.Envelope"
        );
    }

    /// What PostgreSQL accepts as a slot name: 1–63 bytes of `[a-z0-9_]`.
    fn valid_slot(name: &str) -> bool {
        (1..=PG_NAME_MAX).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    }

    #[test]
    fn plain_names_read_as_cluster_and_node() {
        assert_eq!(slot_name("prod", "n1"), "pgferry_prod_n1");
        assert_eq!(replication_origin("prod", "n2", "n1"), "pgferry_prod_n2_from_n1");
        assert_eq!(repair_origin("prod", "n2"), "pgferry_prod_n2_repair");
        assert_eq!(rebuild_origin("prod", "n2"), "pgferry_prod_n2_rebuild");
        assert_eq!(rebuild_snapshot_slot("prod", "n2"), "pgferry_prod_n2_rebuild");
        assert_eq!(legacy_slot_name("n1"), "pgferry_n1");
        assert_eq!(
            replication_origins_read("prod", "n2", "n1"),
            ["pgferry_prod_n2_from_n1".to_string(), "pgferry_n1".to_string()]
        );
    }

    #[test]
    fn names_that_could_read_alike_are_hashed_apart() {
        // A `_` in a name would make cluster "a_b" node "c" and cluster "a" node "b_c" alike.
        let (x, y) = (slot_name("a_b", "c"), slot_name("a", "b_c"));
        assert_ne!(x, y);
        assert!(x.starts_with("pgferry_a_b_c__") && y.starts_with("pgferry_a_b_c__"), "{x} {y}");
        // Case and '-' in cluster names (slot names allow neither).
        let (p, q, r) = (slot_name("Prod-EU", "n1"), slot_name("prod_eu", "n1"), slot_name("prod-eu", "n1"));
        assert!(p != q && q != r && p != r);
        for name in [&x, &y, &p, &q, &r] {
            assert!(valid_slot(name), "{name}");
            assert!(name.contains("__"), "{name}");
        }
        // Origins: which node applies and which wrote are both in the name.
        assert_ne!(replication_origin("c", "n1", "n2"), replication_origin("c", "n2", "n1"));
        assert_ne!(replication_origin("c", "a_from_b", "d"), replication_origin("c", "a", "b_from_d"));
        // One kind's name never doubles as another's.
        assert_ne!(repair_origin("c_1", "n1"), rebuild_origin("c_1", "n1"));
    }

    #[test]
    fn distinct_clusters_and_nodes_give_distinct_names() {
        let clusters = ["demo", "torture", "prod-eu", "Prod_EU", "a", "a_b"];
        let nodes = ["n1", "n2", "n_1", "eu_west_1", "b_c"];
        let mut slots = std::collections::HashSet::new();
        let mut origins = std::collections::HashSet::new();
        for c in clusters {
            for n in nodes {
                assert!(slots.insert(slot_name(c, n)), "slot of {c}/{n} collides");
                for o in nodes.iter().filter(|o| **o != n) {
                    assert!(origins.insert(replication_origin(c, n, o)), "origin {c}/{n}/{o} collides");
                }
            }
        }
        // Plain names never hold `__`, so no plain name equals a hashed one.
        assert!(slots.iter().filter(|s| !s.contains("__")).all(|s| s.matches('_').count() == 2));
    }

    #[test]
    fn long_names_fit_in_63_bytes_deterministically() {
        let cluster = "a".repeat(100);
        let node = "n".repeat(80);
        for name in [
            slot_name(&cluster, &node),
            replication_origin(&cluster, &node, &node[1..]),
            repair_origin(&cluster, &node),
            rebuild_origin(&cluster, &node),
            rebuild_snapshot_slot(&cluster, &node),
        ] {
            assert_eq!(name.len(), PG_NAME_MAX, "{name}");
            assert!(valid_slot(&name), "{name}");
            assert!(name.starts_with("pgferry_aaaa"), "{name}");
        }
        // A long cluster name leaves room for the node names.
        let origin = replication_origin(&cluster, "n2", "n1");
        assert!(origin.contains("_n2_from_n1__") && origin.len() == PG_NAME_MAX, "{origin}");
        assert!(slot_name(&cluster, "eu_west_1").contains("_eu_west_1__"));
        assert_eq!(shares(&[3, 100, 50], 40), vec![3, 19, 18]);
        assert_eq!(shares(&[3, 4], 40), vec![3, 4]);
        // Exactly at the limit stays plain; one byte more is hashed.
        let fits = "c".repeat(PG_NAME_MAX - "pgferry__n1".len());
        assert_eq!(slot_name(&fits, "n1"), format!("pgferry_{fits}_n1"));
        let over = format!("{fits}c");
        assert_eq!(slot_name(&over, "n1").len(), PG_NAME_MAX);
        assert!(slot_name(&over, "n1").contains("__"));
        // Names that differ only past the cut differ in the hash.
        assert_ne!(slot_name(&format!("{cluster}x"), &node), slot_name(&format!("{cluster}y"), &node));
    }

    #[test]
    fn hashed_names_never_change() {
        // Recorded once: names stored in PostgreSQL must come out the same from every build;
        // if this fails, every hashed slot and origin name of an existing cluster changed.
        assert_eq!(slot_name("prod-eu", "n1"), "pgferry_prod_eu_n1__882cc1fb5975");
    }
}
