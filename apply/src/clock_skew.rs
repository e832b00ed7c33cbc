//! Clock skew: before a source transaction is applied, this node's clock must have passed its
//! origin commit time.
//!
//! Last-update-wins compares origin commit times (DESIGN.md, "Conflicts"). If origin A's clock
//! runs ahead of node B's, a change A committed at 100 ms (A's clock) can be applied on B at 95 ms
//! (B's clock); an application that reads it on B and writes the row again at 97 ms makes a
//! version B keeps (it is B's own) and every other node rejects as older than A's: the cluster
//! diverges for good, with only a few ms of skew. So, as PGD does with `bdr.maximum_clock_skew`
//! and action `WAIT`, apply waits before writing until the clock that dates this node's commits —
//! its PostgreSQL server's, not apply's own host's — has passed the commit time; every local
//! commit after the applied one is then dated later. A group (`crate::group`) waits once, for the
//! largest commit time among its transactions.
//!
//! The wait is bounded by `[apply] max_clock_skew_ms` (default 5000): a transaction dated further
//! ahead than that is applied at once, counted (`pgferry_apply_clock_skew_exceeded_total`) and
//! warned about (at most once a minute per stream): clocks that far apart are an operator's
//! problem, and waiting each transaction out would stall the stream. `0` never waits.
//!
//! Cost: the server's clock is read (one short query) only when a commit time is within 1 ms of
//! what the server's clock is known to be at least — estimated from the last reading plus the
//! monotonic time elapsed since, a reading being trusted for a second — so a stream that runs
//! behind the origin by more than a millisecond reads the clock about once a second.

use std::time::{Duration, Instant};

use pgferry_connectors::postgres::PgSession;

use crate::error::ApplyError;

/// A reading of the server's clock is trusted this long (clock rates differ by at most about
/// 500 ppm under NTP: at most 0.5 ms over this time).
const READING_VALID: Duration = Duration::from_secs(1);

/// A commit time this close (µs) to the estimated server time is checked against the server.
const MARGIN_US: i64 = 1_000;

/// The excess warning is repeated at most this often per stream.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// What [`ClockSkew::wait_past`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkewWait {
    /// The commit time was already in the past here.
    None,
    /// It waited this long for the clock to pass it.
    Waited(Duration),
    /// The commit time was this far (µs) ahead, more than the maximum wait: not waited for.
    Exceeded(i64),
}

/// One stream's clock-skew guard (one per PostgreSQL session).
#[derive(Debug)]
pub struct ClockSkew {
    max_wait: Duration,
    /// The server's clock in µs since the epoch, and the instant by which it was at least that.
    reading: Option<(i64, Instant)>,
    last_warning: Option<Instant>,
}

impl ClockSkew {
    /// A guard that waits at most `max_wait_ms` for one transaction.
    pub fn new(max_wait_ms: u64) -> ClockSkew {
        ClockSkew {
            max_wait: Duration::from_millis(max_wait_ms),
            reading: None,
            last_warning: None,
        }
    }

    /// The server's time now (µs), at least, from the last reading; None when stale.
    fn server_now_at_least(&self) -> Option<i64> {
        let (server_us, at) = self.reading?;
        let elapsed = at.elapsed();
        (elapsed < READING_VALID).then(|| server_us + elapsed.as_micros() as i64)
    }

    /// Reads the server's clock (outside any transaction, or inside: `clock_timestamp()` is the
    /// wall clock either way).
    async fn read_server_clock(&mut self, sql: &PgSession) -> Result<i64, ApplyError> {
        let now: i64 = sql
            .client
            .query_one("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8", &[])
            .await
            .map_err(sql.err("reading the server's clock"))?
            .get(0);
        self.reading = Some((now, Instant::now()));
        Ok(now)
    }

    /// Waits until the server's clock is past `commit_ts_us` (µs since the epoch), at most the
    /// maximum; a commit time further ahead than the maximum is not waited for at all.
    pub async fn wait_past(&mut self, sql: &PgSession, commit_ts_us: i64) -> Result<SkewWait, ApplyError> {
        if self
            .server_now_at_least()
            .is_some_and(|now| commit_ts_us.saturating_add(MARGIN_US) < now)
        {
            return Ok(SkewWait::None);
        }
        let started = Instant::now();
        let mut now = self.read_server_clock(sql).await?;
        if commit_ts_us < now {
            return Ok(SkewWait::None);
        }
        let ahead = commit_ts_us.saturating_sub(now);
        if ahead as u128 > self.max_wait.as_micros() {
            return Ok(SkewWait::Exceeded(ahead));
        }
        // Sleep until the server's clock should have passed it, then check with the server (a
        // timer may wake early by a tick, the clocks' rates differ a little).
        let deadline = started + self.max_wait + Duration::from_millis(100);
        while commit_ts_us >= now && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_micros((commit_ts_us - now + 1) as u64)).await;
            now = self.read_server_clock(sql).await?;
        }
        Ok(SkewWait::Waited(started.elapsed()))
    }

    /// Whether an excess warning is due now (at most one per [`WARN_EVERY`]); notes it.
    pub fn warning_due(&mut self) -> bool {
        if self.last_warning.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            return false;
        }
        self.last_warning = Some(Instant::now());
        true
    }

    /// The maximum wait, in ms (for messages).
    pub fn max_wait_ms(&self) -> u128 {
        self.max_wait.as_millis()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_reading_answers_without_the_server_a_stale_one_does_not() {
        let mut c = ClockSkew::new(5000);
        assert_eq!(c.server_now_at_least(), None);
        c.reading = Some((1_000_000, Instant::now()));
        let now = c.server_now_at_least().unwrap_or_default();
        assert!((1_000_000..1_500_000).contains(&now), "{now}");
        let Some(old) = Instant::now().checked_sub(READING_VALID) else {
            return;
        };
        c.reading = Some((1_000_000, old));
        assert_eq!(c.server_now_at_least(), None);
    }

    #[test]
    fn warns_at_most_once_a_minute() {
        let mut c = ClockSkew::new(0);
        assert!(c.warning_due());
        assert!(!c.warning_due());
        let Some(old) = Instant::now().checked_sub(WARN_EVERY) else {
            return;
        };
        c.last_warning = Some(old);
        assert!(c.warning_due());
    }
}
