//! How pgferry apply grouped a drain: the histogram `pgferry_apply_group_transactions` (source
//! transactions per local transaction) and the counter `pgferry_apply_group_fallbacks_total`,
//! read from apply's `/metrics` after the drain. Apply is started afresh for every drain (the
//! benchmark kills its services when it stops replication), so the figures are the drain's own.

use std::time::Duration;

use anyhow::Result;

/// The histogram's name.
const HISTOGRAM: &str = "pgferry_apply_group_transactions";
/// The fallback counter's name.
const FALLBACKS: &str = "pgferry_apply_group_fallbacks_total";

/// Apply's groups over one drain.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupSizes {
    /// Cumulative buckets as exposed: (upper bound in transactions, groups with at most that
    /// many), ascending, `+Inf` last as infinity. Empty when apply committed no group.
    pub buckets: Vec<(f64, u64)>,
    /// Groups committed.
    pub count: u64,
    /// Source transactions in them.
    pub sum: f64,
    /// Groups that failed and were applied again one transaction at a time.
    pub fallbacks: u64,
}

impl GroupSizes {
    /// From a Prometheus text exposition of one apply process (one node: every series of the
    /// histogram is summed, which is the node's own).
    pub fn parse(text: &str) -> GroupSizes {
        let mut g = GroupSizes::default();
        let bucket = format!("{HISTOGRAM}_bucket");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            if name == bucket {
                let Some(le) = label(labels, "le").and_then(bound) else {
                    continue;
                };
                match g.buckets.iter_mut().find(|(b, _)| *b == le) {
                    Some((_, n)) => *n += value as u64,
                    None => g.buckets.push((le, value as u64)),
                }
            } else if name == format!("{HISTOGRAM}_count") {
                g.count += value as u64;
            } else if name == format!("{HISTOGRAM}_sum") {
                g.sum += value;
            } else if name == FALLBACKS {
                g.fallbacks += value as u64;
            }
        }
        g.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        g
    }

    /// Mean source transactions per group.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// Groups per size range (not cumulative): `("1", n)`, `("3–5", n)`, `("> 2000", n)`...
    pub fn ranges(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let (mut below, mut before) = (0.0_f64, 0u64);
        for &(le, cumulative) in &self.buckets {
            let name = if le.is_infinite() {
                format!("> {below}")
            } else if below + 1.0 >= le {
                format!("{le}")
            } else {
                format!("{}–{le}", below + 1.0)
            };
            out.push((name, cumulative.saturating_sub(before)));
            below = le;
            before = cumulative;
        }
        out
    }
}

/// The value of label `key` in `a="x",b="y"` (values without escaped quotes, as these are).
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let labels = labels.strip_suffix('}').unwrap_or(labels);
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

/// A bucket bound (`5`, `+Inf`).
fn bound(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        t => t.parse().ok(),
    }
}

/// Reads apply's group figures from `/metrics` at `addr`, once they have stopped moving (apply
/// updates its metrics just after each commit, so the last group can show a moment after the
/// marker row is visible).
pub async fn read(addr: &str) -> Result<GroupSizes> {
    let mut last: Option<GroupSizes> = None;
    for _ in 0..20 {
        let (status, text) = pgferry_integration_tests::http_get(addr, "/metrics").await?;
        if status != 200 {
            anyhow::bail!("GET http://{addr}/metrics: status {status}");
        }
        let now = GroupSizes::parse(&text);
        if last.as_ref() == Some(&now) {
            return Ok(now);
        }
        last = Some(now);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(last.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str =
        "# HELP pgferry_apply_group_transactions Source transactions per local transaction of grouped apply.
# TYPE pgferry_apply_group_transactions histogram
pgferry_apply_group_transactions_bucket{node=\"n2\",le=\"1\"} 3
pgferry_apply_group_transactions_bucket{node=\"n2\",le=\"2\"} 3
pgferry_apply_group_transactions_bucket{node=\"n2\",le=\"5\"} 4
pgferry_apply_group_transactions_bucket{node=\"n2\",le=\"1000\"} 9
pgferry_apply_group_transactions_bucket{node=\"n2\",le=\"+Inf\"} 10
pgferry_apply_group_transactions_sum{node=\"n2\"} 5007
pgferry_apply_group_transactions_count{node=\"n2\"} 10
pgferry_apply_transactions_total{node=\"n2\",origin=\"n1\"} 5007
pgferry_apply_group_fallbacks_total{node=\"n2\"} 2
";

    #[test]
    fn reads_the_histogram() {
        let g = GroupSizes::parse(TEXT);
        assert_eq!(
            g.buckets,
            vec![(1.0, 3), (2.0, 3), (5.0, 4), (1000.0, 9), (f64::INFINITY, 10)]
        );
        assert_eq!((g.count, g.sum, g.fallbacks), (10, 5007.0, 2));
        assert_eq!(g.mean(), Some(500.7));
        let ranges = g.ranges();
        let ranges: Vec<(&str, u64)> = ranges.iter().map(|(n, c)| (n.as_str(), *c)).collect();
        assert_eq!(
            ranges,
            vec![("1", 3), ("2", 0), ("3–5", 1), ("6–1000", 5), ("> 1000", 1)]
        );
    }

    #[test]
    fn no_histogram_is_no_groups() {
        let g = GroupSizes::parse("pgferry_apply_transactions_total{node=\"n2\",origin=\"n1\"} 0\n");
        assert_eq!(g, GroupSizes::default());
        assert_eq!(g.mean(), None);
        assert!(g.ranges().is_empty());
    }

    #[test]
    fn finds_labels() {
        assert_eq!(label("node=\"a\",le=\"+Inf\"}", "le"), Some("+Inf"));
        assert_eq!(label("node=\"a\"", "le"), None);
        assert_eq!(bound("+Inf"), Some(f64::INFINITY));
        assert_eq!(bound("20"), Some(20.0));
    }
}
