//! What replication costs: CPU seconds and peak resident memory of the processes that do it
//! (pgferry's services; PostgreSQL's walsender and apply worker), sampled from `/proc` every
//! 100 ms while a backlog drains. PostgreSQL processes are found by a query, since they start
//! when replication starts; a watch can also cover every session a query lists (pgferry apply's
//! own backends on the target), whose CPU is summed. A long-running process (the Kafka broker)
//! is counted from the first sample on.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio_postgres::Client;

use crate::{cpu, rss};

/// How a watched process is found.
#[derive(Debug, Clone)]
enum Find {
    /// A known pid.
    Pid(u32),
    /// A known pid, counting only the CPU it uses from the first sample on.
    PidSince(u32),
    /// The first column of a query's first row on a database (`NULL`/no row: not there yet).
    Query { dsn: String, sql: &'static str },
    /// Every pid in the first column of a query's rows, asked again every
    /// [`SESSIONS_EVERY`] samples (sessions come and go).
    Sessions { dsn: String, sql: &'static str },
}

/// A [`Watch::sessions`] query runs again every this many samples.
const SESSIONS_EVERY: u32 = 5;

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

    /// The process `pid`, which ran before the sampling starts: only the CPU it uses while
    /// sampled counts (its peak RSS is still over its whole life).
    pub fn process_from_now(role: impl Into<String>, pid: u32) -> Watch {
        Watch {
            role: role.into(),
            find: Find::PidSince(pid),
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

    /// Every process whose pid `sql` lists on `dsn` (one pid per row), as one figure: CPU
    /// summed, peak RSS the largest.
    pub fn sessions(role: impl Into<String>, dsn: &str, sql: &'static str) -> Watch {
        Watch {
            role: role.into(),
            find: Find::Sessions {
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
    /// Peak resident set (`VmHWM`) in KiB, if it was seen (of a [`Watch::sessions`], the
    /// largest). For PostgreSQL processes this counts the shared buffers they touched.
    pub peak_rss_kb: Option<u64>,
    /// Processes seen (1 for a single process; a [`Watch::sessions`] can see several).
    pub processes: usize,
}

/// What the sampler knows of one watch.
#[derive(Default)]
struct Tracked {
    /// A session to the watch's database, kept for its queries.
    client: Option<Client>,
    /// Samples taken so far.
    samples: u32,
    /// Last CPU seconds and `VmHWM` (KiB) read of each pid seen.
    pids: HashMap<u32, (f64, u64)>,
    /// The single process of a [`Find::Pid`] or [`Find::Query`] watch, once known.
    single: Option<u32>,
    /// A [`Find::PidSince`] process's CPU seconds at the first sample.
    baseline: Option<f64>,
}

impl Tracked {
    /// Finds the watch's processes (as far as due) and reads their CPU and memory.
    async fn sample(&mut self, find: &Find) {
        let listed = match find {
            Find::Pid(p) => vec![*p],
            Find::PidSince(p) => {
                if self.baseline.is_none() {
                    self.baseline = cpu::cpu_seconds(*p);
                }
                vec![*p]
            }
            Find::Query { dsn, sql } => match self.single {
                Some(p) => vec![p],
                None => {
                    let found = self.pids_of(dsn, sql).await.into_iter().next();
                    self.single = found;
                    found.into_iter().collect()
                }
            },
            Find::Sessions { dsn, sql } => {
                if self.samples.is_multiple_of(SESSIONS_EVERY) {
                    for p in self.pids_of(dsn, sql).await {
                        self.pids.entry(p).or_insert((0.0, 0));
                    }
                }
                self.pids.keys().copied().collect()
            }
        };
        self.samples += 1;
        for pid in listed {
            // A process that is gone keeps what was last read of it.
            if let (Some(cpu), Some((_, hwm))) = (cpu::cpu_seconds(pid), rss::read(pid)) {
                self.pids.insert(pid, (cpu, hwm));
            }
        }
    }

    /// The pids `sql` lists on `dsn` (none on any error; the session is opened again next time).
    async fn pids_of(&mut self, dsn: &str, sql: &str) -> Vec<u32> {
        if self.client.is_none() {
            self.client = pgferry_integration_tests::connect(dsn).await.ok();
        }
        let Some(c) = &self.client else { return Vec::new() };
        match c.query(sql, &[]).await {
            Ok(rows) => rows
                .iter()
                .filter_map(|r| r.get::<_, Option<i32>>(0))
                .filter_map(|p| u32::try_from(p).ok())
                .collect(),
            Err(_) => {
                self.client = None;
                Vec::new()
            }
        }
    }

    /// The figure of the watch.
    fn cost(&self, role: &str) -> ProcessCost {
        let seen: Vec<(f64, u64)> = self.pids.values().copied().filter(|&(_, hwm)| hwm > 0).collect();
        ProcessCost {
            role: role.to_string(),
            cpu_seconds: (!seen.is_empty()).then(|| seen.iter().map(|s| s.0).sum::<f64>() - self.baseline.unwrap_or(0.0)),
            peak_rss_kb: seen.iter().map(|s| s.1).max(),
            processes: seen.len(),
        }
    }
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
            let mut tracked: Vec<Tracked> = watches.iter().map(|_| Tracked::default()).collect();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut last = false;
            loop {
                for (w, t) in watches.iter().zip(&mut tracked) {
                    t.sample(&w.find).await;
                }
                if last {
                    break;
                }
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = &mut stopped => last = true,
                }
            }
            watches.iter().zip(&tracked).map(|(w, t)| t.cost(&w.role)).collect()
        });
        CostSampler { stop, task }
    }

    /// Takes a last sample and returns what each process used.
    pub async fn stop(self) -> Vec<ProcessCost> {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}
