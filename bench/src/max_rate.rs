//! The highest TPC-B rate a system keeps up with at p99 ≤ 100 ms: latency runs
//! ([`crate::latency`]) at rising rates, node 1 → node 2, replication running; a step passes
//! when the probes' p99 is at most [`P99_LIMIT_MS`] and pgbench reached at least
//! [`KEPT_UP`] of the asked rate (pgbench's `-R` schedule draws arrivals at random, so a
//! system that keeps up still lands a little off the rate). Stepping stops at the first step
//! that does not pass; the figure is the last rate that passed.

use crate::latency::{self, Latency};
use crate::replication::Replication;
use crate::report::Outcome;
use crate::workload::{Pgbench, Workload};

/// A step's p99 limit, milliseconds (issue 14).
pub const P99_LIMIT_MS: f64 = 100.0;

/// A step's pgbench rate must be at least this share of the asked rate.
pub const KEPT_UP: f64 = 0.9;

/// One step: the rate asked, and what its latency run measured.
#[derive(Debug, Clone)]
pub struct Step {
    /// Rate asked of pgbench (tps).
    pub rate: u64,
    /// The latency run at that rate.
    pub outcome: Outcome<Latency>,
}

impl Step {
    /// Whether the step passed: p99 within the limit and pgbench kept up with the rate.
    pub fn passed(&self) -> bool {
        self.outcome
            .get()
            .is_some_and(|l| l.p99_ms <= P99_LIMIT_MS && l.pgbench.tps >= KEPT_UP * self.rate as f64)
    }
}

/// The steps one system ran, in order; all but the last passed, unless every step passed.
#[derive(Debug, Clone, Default)]
pub struct MaxRate {
    /// The steps run.
    pub steps: Vec<Step>,
}

impl MaxRate {
    /// The highest rate that passed (every step before it passed too).
    pub fn highest(&self) -> Option<u64> {
        self.steps.iter().take_while(|s| s.passed()).map(|s| s.rate).last()
    }

    /// Whether stepping stopped at a step that did not pass (else the ladder ran out).
    pub fn stopped(&self) -> bool {
        self.steps.last().is_some_and(|s| !s.passed())
    }
}

/// Runs a `seconds`-long TPC-B latency run at each rate of `rates` (ascending) on
/// `replication` (running and caught up), stopping after the first step that does not pass.
/// A step that cannot be measured is a step that did not pass, its error in its outcome.
pub async fn measure(replication: &mut Replication, pgbench: &Pgbench, rates: &[u64], seconds: u64) -> MaxRate {
    let label = replication.system.label();
    let mut out = MaxRate::default();
    for &rate in rates {
        let step = Step {
            rate,
            outcome: latency::run(replication, pgbench, Workload::TpcB, rate, seconds).await,
        };
        let passed = step.passed();
        eprintln!(
            "[bench] {label}: max-rate step at {rate} tps {}",
            if passed {
                "passed"
            } else {
                "did not pass; stepping stops"
            }
        );
        out.steps.push(step);
        if !passed {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::PgbenchRun;

    fn step(rate: u64, tps: f64, p99_ms: f64) -> Step {
        Step {
            rate,
            outcome: Outcome::Measured(Latency {
                pgbench: PgbenchRun { transactions: 0, tps },
                probes: 200,
                p50_ms: 1.0,
                p99_ms,
                max_ms: p99_ms,
            }),
        }
    }

    #[test]
    fn highest_is_the_last_step_before_the_first_that_did_not_pass() {
        let run = MaxRate {
            steps: vec![
                step(500, 499.0, 20.0),
                step(1000, 990.0, 99.0),
                step(2000, 1500.0, 40.0),
            ],
        };
        assert_eq!(run.highest(), Some(1000));
        assert!(run.stopped());
        let slow = MaxRate {
            steps: vec![step(500, 500.0, 150.0)],
        };
        assert_eq!(slow.highest(), None);
        let all = MaxRate {
            steps: vec![step(500, 500.0, 10.0)],
        };
        assert_eq!(all.highest(), Some(500));
        assert!(!all.stopped());
        let failed = Step {
            rate: 100,
            outcome: Outcome::Failed("pgferry run exited".into()),
        };
        assert!(!failed.passed());
    }
}
