//! `pgferry replay --node N [--origin O] --from-time T | --from-offset K [--to-time T2]
//! [--force [--after-lsn L]]`: re-reads a range of the topics into node N through apply's own
//! partition stream ([`pgferry_apply::replay`]). Without `--force` what N already applied is
//! skipped (dedup by origin progress), so the replay is a no-op for it; with `--force` the
//! origin's progress on N is set back first and the range is applied again (rolling a node
//! restored from a backup forward). Progress lines go to stderr, one summary line per origin
//! to stdout.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use pgferry_apply::replay::{self, ReplayRequest, ReplayStart};
use pgferry_connectors::config::Config;

#[derive(Args)]
#[command(group = clap::ArgGroup::new("from").required(true).args(["from_time", "from_offset"]))]
pub struct ReplayArgs {
    /// The node to replay into (its apply must be stopped meanwhile).
    #[arg(long)]
    node: String,
    /// The origin whose changes are replayed (default: every node whose changes N receives).
    #[arg(long)]
    origin: Option<String>,
    /// Start at the first message produced at or after this time: RFC 3339
    /// (`2026-11-28T18:00:00Z`), `YYYY-MM-DD HH:MM:SS[.fff]` (UTC), or ms since 1970.
    #[arg(long, value_name = "TIME", value_parser = parse_time_ms)]
    from_time: Option<i64>,
    /// Start at this offset of the partition that carries the origin to N (needs --origin).
    #[arg(long, value_name = "OFFSET", requires = "origin")]
    from_offset: Option<i64>,
    /// Stop before the first message produced at or after this time (default: the end of the
    /// partition when the replay starts).
    #[arg(long, value_name = "TIME", value_parser = parse_time_ms)]
    to_time: Option<i64>,
    /// Set the origin's progress on N back first, so the range is applied again.
    #[arg(long)]
    force: bool,
    /// With --force: the origin's transactions at or below this commit LSN (`X/Y`) stay
    /// skipped (e.g. the LSN a backup of N is consistent at, for N's own changes).
    #[arg(long, value_name = "LSN", requires = "force", value_parser = parse_lsn)]
    after_lsn: Option<u64>,
    /// No progress lines on stderr.
    #[arg(long, short)]
    quiet: bool,
}

/// A time as ms since 1970.
fn parse_time_ms(text: &str) -> Result<i64, String> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp_millis());
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(text, format) {
            return Ok(t.and_utc().timestamp_millis());
        }
    }
    Err(format!(
        "{text:?} is not a time (RFC 3339, `YYYY-MM-DD HH:MM:SS` in UTC, or ms since 1970)"
    ))
}

/// An LSN in PostgreSQL's `X/Y` form.
fn parse_lsn(text: &str) -> Result<u64, String> {
    pgferry_connectors::replication::parse_lsn(text)
        .ok_or_else(|| format!("{text:?} is not an LSN (X/Y in hex, e.g. 0/16B3748)"))
}

pub async fn run(config: Arc<Config>, a: ReplayArgs) -> Result<()> {
    let node = config
        .node(&a.node)
        .with_context(|| format!("node {:?} is not in the config", a.node))?
        .clone();
    let origins: Vec<String> = match &a.origin {
        Some(o) => vec![o.clone()],
        None => config
            .nodes
            .iter()
            .filter(|o| o.name != node.name && config.carriers(&node, &o.name).len() == 1)
            .map(|o| o.name.clone())
            .collect(),
    };
    if origins.is_empty() {
        bail!("node {} receives no other node's changes", node.name);
    }
    let start = match (a.from_offset, a.from_time) {
        (Some(k), _) => ReplayStart::Offset(k),
        (None, Some(t)) => ReplayStart::TimeMs(t),
        (None, None) => bail!("give --from-time or --from-offset"),
    };
    for origin in origins {
        let req = ReplayRequest {
            origin: origin.clone(),
            start,
            to_time_ms: a.to_time,
            force: a.force,
            after_lsn: a.after_lsn,
        };
        let plan = replay::plan(&config, &node.name, &req).await?;
        let label = format!("replay {} <- {}", node.name, origin);
        if !a.quiet {
            eprintln!(
                "{label}: {}/{} offsets {}..{} (applied here up to offset {}){}",
                plan.topic,
                plan.partition,
                plan.start,
                plan.end,
                plan.recorded.map_or("none".to_string(), |o| o.to_string()),
                if a.force { "; resetting the origin's progress first" } else { "" }
            );
        }
        if let (Some((from, to)), false) = (plan.gap(), a.force) {
            eprintln!(
                "warning: {label}: offsets {from}..{to} were not applied here and are not in the replayed range; apply reads from offset {} afterwards",
                plan.end
            );
        }
        let quiet = a.quiet;
        let span = (plan.start, plan.end);
        let report = replay::run(config.clone(), &plan, &req, |s| {
            if !quiet {
                let done = (s.offset + 1 - span.0).clamp(0, span.1 - span.0);
                eprintln!(
                    "{label}: {done}/{} messages, {} transactions applied, {} skipped (already applied)",
                    span.1 - span.0,
                    s.applied,
                    s.skipped
                );
            }
        })
        .await?;
        println!(
            "{} <- {}: {} transactions applied, {} skipped as already applied ({}/{} offsets {}..{})",
            node.name,
            origin,
            report.applied,
            report.skipped,
            plan.topic,
            plan.partition,
            plan.start,
            plan.end
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_times_and_lsns() {
        assert_eq!(parse_time_ms("1000"), Ok(1000));
        assert_eq!(parse_time_ms("1970-01-01T00:00:01Z"), Ok(1000));
        assert_eq!(parse_time_ms("1970-01-01 00:00:01.5"), Ok(1500));
        assert!(parse_time_ms("yesterday").is_err());
        assert_eq!(parse_lsn("0/16B3748"), Ok(0x16B3748));
        assert_eq!(parse_lsn("1/0"), Ok(1 << 32));
        assert!(parse_lsn("16B3748").is_err());
    }
}
