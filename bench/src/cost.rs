//! What replication costs: CPU seconds and peak resident memory of the processes that do it
//! (pgferry's services; PostgreSQL's walsender and apply worker), sampled from `/proc` every
//! 100 ms while a backlog drains. PostgreSQL processes are found by a query, since they start
//! when replication starts.

use std::time::Duration;

use tokio::sync::oneshot;

use crate::{cpu, rss};

/// How a watched process is found.
#[derive(Debug, Clone)]
enum Find {
    /// A known pid.
    Pid(u32),
    /// The first column of a query's first row on a database (`NULL`/no row: not there yet).
    Query { dsn: String, sql: &'static str },
}

/// A process to watch.
#[derive(Debug, Clone)]
pub struct Watch {
    /// What it is (`pgferry capture`, `walsender (n1)`, ...).
    pub role: String,
    find: Find,
}

impl Watch {
    /// The process `pid`.
    pub fn process(role: impl Into<String>, pid: u32) -> Watch {
        Watch {
            role: role.into(),
            find: Find::Pid(pid),
        }
    }

    /// The process whose pid `sql` returns on `dsn`.
    pub fn query(role: impl Into<String>, dsn: &str, sql: &'static str) -> Watch {
        Watch {
            role: role.into(),
            find: Find::Query {
                dsn: dsn.to_string(),
                sql,
            },
        }
    }
}

/// What one process used.
#[derive(Debug, Clone)]
pub struct ProcessCost {
    /// Its role.
    pub role: String,
    /// CPU seconds (user + system) over its life up to the end of the sampling, if it was seen.
    pub cpu_seconds: Option<f64>,
    /// Peak resident set (`VmHWM`) in KiB, if it was seen. For PostgreSQL processes this counts
    /// the shared buffers they touched.
    pub peak_rss_kb: Option<u64>,
}

/// Samples the watched processes until [`CostSampler::stop`].
pub struct CostSampler {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Vec<ProcessCost>>,
}

impl CostSampler {
    /// Starts sampling.
    pub fn start(watches: Vec<Watch>) -> CostSampler {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut pids: Vec<Option<u32>> = watches
                .iter()
                .map(|w| match w.find {
                    Find::Pid(p) => Some(p),
                    Find::Query { .. } => None,
                })
                .collect();
            let mut seen: Vec<ProcessCost> = watches
                .iter()
                .map(|w| ProcessCost {
                    role: w.role.clone(),
                    cpu_seconds: None,
                    peak_rss_kb: None,
                })
                .collect();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut last = false;
            loop {
                for (i, w) in watches.iter().enumerate() {
                    if let (None, Find::Query { dsn, sql }) = (pids[i], &w.find) {
                        pids[i] = find_pid(dsn, sql).await;
                    }
                    if let Some(pid) = pids[i] {
                        if let (Some(cpu), Some((_, hwm))) = (cpu::cpu_seconds(pid), rss::read(pid)) {
                            seen[i].cpu_seconds = Some(cpu);
                            seen[i].peak_rss_kb = Some(hwm);
                        }
                    }
                }
                if last {
                    break;
                }
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = &mut stopped => last = true,
                }
            }
            seen
        });
        CostSampler { stop, task }
    }

    /// Takes a last sample and returns what each process used.
    pub async fn stop(self) -> Vec<ProcessCost> {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

async fn find_pid(dsn: &str, sql: &str) -> Option<u32> {
    let c = pgferry_integration_tests::connect(dsn).await.ok()?;
    let row = c.query_opt(sql, &[]).await.ok()??;
    let pid: Option<i32> = row.get(0);
    u32::try_from(pid?).ok()
}
