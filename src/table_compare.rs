//! Comparing one table across nodes without moving it: each node hashes ranges of the primary
//! key itself (`count(*)` and `sum(hashtextextended(ROW(columns)::text, 0))`, order-free, one
//! index range scan), and only ranges whose hashes differ are split further — into
//! [`FANOUT`] sub-ranges at key boundaries the node holding the most rows in the range reads
//! (every `n`-th key, `row_number()` on the server) — until a range holds at most [`LEAF_ROWS`]
//! rows on every node; then those rows are fetched and compared key by key. Ranges are
//! `[lo, hi)` in primary-key order, compared as rows (`(k1, k2) >= (…)`), so composite keys
//! work and the same bounds mean the same rows on every node. The client holds only the
//! ranges being narrowed and at most [`LEAF_ROWS`] rows per node at a time.
//!
//! Rows compare by the text form of the row (the first node's columns, in its order); the
//! report shows each node's row as JSON (`to_jsonb`). Every value is bound as a text parameter
//! cast to the key column's type.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::future::try_join_all;
use pgferry_connectors::postgres::{quote_ident, PgSession};
use serde_json::Value;

use crate::row_sql::{exec, table_meta, TableMeta};

/// Sub-ranges a differing range is split into.
pub const FANOUT: i64 = 16;
/// A differing range with at most this many rows on every node is compared row by row.
pub const LEAF_ROWS: i64 = 256;

/// A primary key: its columns' text forms, in key order.
pub type Key = Vec<String>;

/// One node being compared.
pub struct NodeSession {
    /// Node name.
    pub name: String,
    /// Its SQL session.
    pub sql: PgSession,
}

/// One node's version of a row.
#[derive(Debug, Clone)]
pub struct NodeRow {
    /// `ROW(columns)::text`: what is compared.
    pub text: String,
    /// The row as JSON (column → value), for the report.
    pub json: Value,
}

/// A key whose row is not the same on every node.
#[derive(Debug, Clone)]
pub struct RowDiff {
    /// The key.
    pub key: Key,
    /// Each node's row (in the order of the nodes; None: no row).
    pub rows: Vec<Option<NodeRow>>,
}

/// `[lo, hi)` in key order; None is unbounded.
#[derive(Debug, Clone, Default)]
struct Range {
    lo: Option<Key>,
    hi: Option<Key>,
}

/// A range's fingerprint on one node.
type Fingerprint = (i64, String);

/// Prints progress lines on stderr at most once a second.
pub struct Progress {
    label: String,
    enabled: bool,
    total: i64,
    done: i64,
    differing: usize,
    last: Option<Instant>,
    finished: bool,
    /// Whether lines show the differing rows (a comparison) or only rows done (a copy).
    counts_differences: bool,
}

impl Progress {
    /// Progress of `label`; silent unless `enabled`.
    pub fn new(label: &str, enabled: bool) -> Progress {
        Progress {
            label: label.to_string(),
            enabled,
            total: 0,
            done: 0,
            differing: 0,
            last: None,
            finished: false,
            counts_differences: true,
        }
    }

    /// Progress of a copy of about `total` rows (an estimate: the bar stops at 100%).
    pub fn copying(label: &str, total: i64) -> Progress {
        Progress {
            total,
            counts_differences: false,
            ..Progress::new(label, true)
        }
    }

    /// `rows` more rows copied.
    pub fn copied(&mut self, rows: i64) {
        self.advance(rows, 0);
    }

    /// The closing line, unless the last one already said 100%.
    pub fn finish(&mut self) {
        if !self.finished {
            self.total = self.done;
            self.finished = true;
            self.print();
        }
    }

    /// A copy's line when its estimate is off (none, or already passed): the rows so far.
    fn print_count(&self) -> bool {
        let unknown = !self.counts_differences && !self.finished && self.done > self.total;
        if unknown && self.enabled {
            eprintln!("{}: {} rows …", self.label, self.done);
        }
        unknown
    }

    /// Rows to compare (the most any node holds), once known.
    pub fn total(&self) -> i64 {
        self.total
    }

    fn advance(&mut self, rows: i64, differing: usize) {
        self.done += rows;
        self.differing += differing;
        let due = self.last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        // A copy's total is an estimate: only `finish` says it is done.
        let finishing = self.done >= self.total && !self.finished && self.counts_differences;
        self.finished |= finishing;
        if due || finishing {
            self.print();
        }
    }

    fn print(&mut self) {
        self.last = Some(Instant::now());
        if !self.enabled || self.print_count() {
            return;
        }
        let done = self.done.min(self.total);
        let pct = if self.total > 0 { done * 100 / self.total } else { 100 };
        let width = 30usize;
        let filled = (pct as usize * width) / 100;
        let differing = if self.counts_differences {
            format!(", {} differing", self.differing)
        } else {
            String::new()
        };
        eprintln!(
            "{}: [{}{}] {pct:>3}% {done}/{} rows{differing}",
            self.label,
            "#".repeat(filled),
            "-".repeat(width - filled),
            self.total,
        );
    }

    /// Prints a line of its own (a phase of the work).
    pub fn note(&self, text: &str) {
        if self.enabled {
            eprintln!("{}: {text}", self.label);
        }
    }
}

/// One table on a set of nodes, ready to compare.
pub struct TableCompare<'a> {
    nodes: &'a [NodeSession],
    meta: TableMeta,
    /// `"schema.table"` for messages.
    pub name: String,
}

impl<'a> TableCompare<'a> {
    /// Looks `schema.table` up on every node; fails unless each has it with the same primary
    /// key and at least the first node's columns.
    pub async fn new(nodes: &'a [NodeSession], schema: &str, table: &str) -> Result<TableCompare<'a>> {
        let Some(first) = nodes.first() else {
            bail!("no nodes to compare");
        };
        let meta = table_meta(&first.sql, &first.name, schema, table).await?;
        for n in &nodes[1..] {
            let other = table_meta(&n.sql, &n.name, schema, table).await?;
            if other.key != meta.key {
                bail!(
                    "table {schema}.{table}: primary key ({}) on {} but ({}) on {}",
                    meta.key.join(", "),
                    first.name,
                    other.key.join(", "),
                    n.name
                );
            }
            for (c, _) in &meta.columns {
                if other.type_of(c).is_none() {
                    bail!("table {schema}.{table}: column {c:?} exists on {} but not on {}", first.name, n.name);
                }
            }
        }
        Ok(TableCompare {
            nodes,
            meta,
            name: format!("{schema}.{table}"),
        })
    }

    /// The table's metadata on the first node.
    pub fn meta(&self) -> &TableMeta {
        &self.meta
    }

    fn key_list(&self, prefix: &str) -> String {
        self.meta
            .key
            .iter()
            .map(|k| format!("{prefix}{}", quote_ident(k)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn row_text(&self) -> String {
        let cols: Vec<String> = self.meta.columns.iter().map(|(c, _)| format!("r.{}", quote_ident(c))).collect();
        format!("ROW({})::text", cols.join(", "))
    }

    fn key_array(&self) -> String {
        let cols: Vec<String> = self.meta.key.iter().map(|k| format!("r.{}::text", quote_ident(k))).collect();
        format!("ARRAY[{}]", cols.join(", "))
    }

    /// `($first::text::t1, …)`: a key bound as parameters.
    fn key_params(&self, first: usize) -> String {
        let vals: Vec<String> = self
            .meta
            .key
            .iter()
            .enumerate()
            .map(|(i, k)| format!("${}::text::{}", first + i, self.meta.type_of(k).unwrap_or("text")))
            .collect();
        format!("({})", vals.join(", "))
    }

    /// The WHERE clause selecting `range` (on alias `r`) and its parameters.
    fn range_where<'r>(&self, range: &'r Range) -> (String, Vec<Option<&'r str>>) {
        let keys = format!("({})", self.key_list("r."));
        let mut conds = vec!["true".to_string()];
        let mut params: Vec<Option<&str>> = Vec::new();
        if let Some(lo) = &range.lo {
            conds.push(format!("{keys} >= {}", self.key_params(params.len() + 1)));
            params.extend(lo.iter().map(|v| Some(v.as_str())));
        }
        if let Some(hi) = &range.hi {
            conds.push(format!("{keys} < {}", self.key_params(params.len() + 1)));
            params.extend(hi.iter().map(|v| Some(v.as_str())));
        }
        (conds.join(" AND "), params)
    }

    async fn fingerprint(&self, node: &NodeSession, range: &Range) -> Result<Fingerprint> {
        let (cond, params) = self.range_where(range);
        let text = format!(
            "SELECT count(*)::text, coalesce(sum(hashtextextended({}, 0)), 0)::text FROM {} r WHERE {cond}",
            self.row_text(),
            self.meta.qualified
        );
        let rows = exec(&node.sql, &node.name, "hashing a key range", &text, &params).await?;
        let row = rows.first().context("hashing a key range returned no row")?;
        let count: String = row.get(0);
        Ok((count.parse().unwrap_or(0), row.get(1)))
    }

    /// Fingerprints of `ranges` on every node: `[range][node]`. Each node's queries are
    /// pipelined on its session; the nodes work at the same time.
    async fn fingerprints(&self, ranges: &[Range]) -> Result<Vec<Vec<Fingerprint>>> {
        let per_node = try_join_all(
            self.nodes
                .iter()
                .map(|n| try_join_all(ranges.iter().map(|r| self.fingerprint(n, r)))),
        )
        .await?;
        Ok((0..ranges.len())
            .map(|i| per_node.iter().map(|n| n[i].clone()).collect())
            .collect())
    }

    /// Every `step`-th key of `range` on `node` after its first: where to split it.
    async fn boundaries(&self, node: &NodeSession, range: &Range, step: i64) -> Result<Vec<Key>> {
        let (cond, params) = self.range_where(range);
        let text = format!(
            "SELECT k FROM (SELECT {}::text[] AS k, row_number() OVER (ORDER BY {}) AS rn FROM {} r WHERE {cond}) s
             WHERE rn % {step} = 1 AND rn > 1 ORDER BY rn",
            self.key_array(),
            self.key_list("r."),
            self.meta.qualified
        );
        let rows = exec(&node.sql, &node.name, "splitting a key range", &text, &params).await?;
        Ok(rows.iter().map(|r| r.get::<_, Vec<String>>(0)).collect())
    }

    fn row_select(&self) -> String {
        format!("SELECT {}, {}, to_jsonb(r.*)::text", self.key_array(), self.row_text())
    }

    fn collect(rows: Vec<tokio_postgres::Row>) -> Vec<(Key, NodeRow)> {
        rows.iter()
            .map(|r| {
                let json: String = r.get(2);
                (
                    r.get::<_, Vec<String>>(0),
                    NodeRow {
                        text: r.get(1),
                        json: serde_json::from_str(&json).unwrap_or(Value::String(json)),
                    },
                )
            })
            .collect()
    }

    /// The rows of `range` on `node`.
    async fn rows(&self, node: &NodeSession, range: &Range) -> Result<Vec<(Key, NodeRow)>> {
        let (cond, params) = self.range_where(range);
        let text = format!(
            "{} FROM {} r WHERE {cond} ORDER BY {}",
            self.row_select(),
            self.meta.qualified,
            self.key_list("r.")
        );
        Ok(Self::collect(exec(&node.sql, &node.name, "reading rows", &text, &params).await?))
    }

    /// The rows of `keys` on `node` (missing keys are left out).
    async fn rows_by_keys(&self, node: &NodeSession, keys: &[Key]) -> Result<Vec<(Key, NodeRow)>> {
        let list = serde_json::to_string(keys).context("encoding keys")?;
        let lhs = format!("({})", self.key_list("r."));
        let rhs: Vec<String> = self
            .meta
            .key
            .iter()
            .enumerate()
            .map(|(i, k)| format!("(e->>{i})::{}", self.meta.type_of(k).unwrap_or("text")))
            .collect();
        let text = format!(
            "{} FROM jsonb_array_elements($1::text::jsonb) e JOIN {} r ON {lhs} = ({})",
            self.row_select(),
            self.meta.qualified,
            rhs.join(", ")
        );
        Ok(Self::collect(exec(&node.sql, &node.name, "reading rows by key", &text, &[Some(&list)]).await?))
    }

    /// Compares rows fetched per node; the keys that differ.
    fn compare(&self, per_node: Vec<Vec<(Key, NodeRow)>>) -> Vec<RowDiff> {
        let mut by_key: BTreeMap<Key, Vec<Option<NodeRow>>> = BTreeMap::new();
        let n = per_node.len();
        for (i, rows) in per_node.into_iter().enumerate() {
            for (k, row) in rows {
                by_key.entry(k).or_insert_with(|| vec![None; n])[i] = Some(row);
            }
        }
        let mut out: Vec<RowDiff> = by_key
            .into_iter()
            .filter(|(_, rows)| {
                let first = rows[0].as_ref().map(|r| &r.text);
                rows.iter().any(|r| r.as_ref().map(|r| &r.text) != first)
            })
            .map(|(key, rows)| RowDiff { key, rows })
            .collect();
        out.sort_by(|a, b| key_order(&a.key, &b.key));
        out
    }

    async fn compare_range(&self, range: &Range) -> Result<Vec<RowDiff>> {
        let per_node = try_join_all(self.nodes.iter().map(|n| self.rows(n, range))).await?;
        Ok(self.compare(per_node))
    }

    /// Every key whose row differs between the nodes, narrowing differing ranges down.
    pub async fn differences(&self, progress: &mut Progress) -> Result<Vec<RowDiff>> {
        let all = Range::default();
        let top = self.fingerprints(std::slice::from_ref(&all)).await?.remove(0);
        progress.total = top.iter().map(|f| f.0).max().unwrap_or(0);
        let mut found = Vec::new();
        let mut pending = vec![(all, top)];
        while let Some((range, prints)) = pending.pop() {
            if prints.windows(2).all(|w| w[0] == w[1]) {
                progress.advance(prints[0].0, 0);
                continue;
            }
            let (reference, most) = prints
                .iter()
                .enumerate()
                .max_by_key(|(_, f)| f.0)
                .map(|(i, f)| (i, f.0))
                .unwrap_or((0, 0));
            let bounds = if most > LEAF_ROWS {
                let step = (most + FANOUT - 1) / FANOUT;
                self.boundaries(&self.nodes[reference], &range, step).await?
            } else {
                Vec::new()
            };
            if bounds.is_empty() {
                let diffs = self.compare_range(&range).await?;
                progress.advance(most, diffs.len());
                found.extend(diffs);
                continue;
            }
            let mut subs = Vec::with_capacity(bounds.len() + 1);
            let mut lo = range.lo.clone();
            for b in bounds {
                subs.push(Range {
                    lo: lo.take(),
                    hi: Some(b.clone()),
                });
                lo = Some(b);
            }
            subs.push(Range { lo, hi: range.hi.clone() });
            let prints = self.fingerprints(&subs).await?;
            // Later ranges first on the stack, so ranges finish in key order.
            for (sub, p) in subs.into_iter().zip(prints).rev() {
                pending.push((sub, p));
            }
        }
        found.sort_by(|a, b| key_order(&a.key, &b.key));
        Ok(found)
    }

    /// The current rows of `keys` on every node; those that still differ.
    pub async fn recheck(&self, keys: &[Key]) -> Result<Vec<RowDiff>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let per_node = try_join_all(self.nodes.iter().map(|n| self.rows_by_keys(n, keys))).await?;
        Ok(self.compare(per_node))
    }

    /// A key as a JSON object (key column → text form).
    pub fn key_json(&self, key: &Key) -> Value {
        Value::Object(
            self.meta
                .key
                .iter()
                .cloned()
                .zip(key.iter().map(|v| Value::String(v.clone())))
                .collect(),
        )
    }
}

/// Key order for reports: numerically where both parts are numbers, else as text.
fn key_order(a: &Key, b: &Key) -> Ordering {
    for (x, y) in a.iter().zip(b) {
        let o = match (x.parse::<f64>(), y.parse::<f64>()) {
            (Ok(p), Ok(q)) => p.partial_cmp(&q).unwrap_or(Ordering::Equal),
            _ => x.cmp(y),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    a.len().cmp(&b.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_keys_numerically_where_it_can() {
        let k = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Key>();
        assert_eq!(key_order(&k(&["2"]), &k(&["10"])), Ordering::Less);
        assert_eq!(key_order(&k(&["b"]), &k(&["a"])), Ordering::Greater);
        assert_eq!(key_order(&k(&["1", "x"]), &k(&["1", "y"])), Ordering::Less);
    }
}
