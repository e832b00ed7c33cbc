//! Memory use of a process from `/proc/<pid>/status`: a thread samples `VmRSS` and keeps the
//! kernel's own peak, `VmHWM`, until stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// What the sampler saw, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryUse {
    /// Largest `VmRSS` among the samples.
    pub max_sampled_rss_kb: u64,
    /// The last `VmHWM` read: the kernel's peak resident set size of the process.
    pub hwm_kb: u64,
    /// The last `VmRSS` read.
    pub last_rss_kb: u64,
    /// Samples taken.
    pub samples: u64,
}

impl MemoryUse {
    /// The peak: `VmHWM`, or the largest sample if that is larger (it cannot be, but a
    /// sample can be newer than the last `VmHWM` read).
    pub fn peak_kb(&self) -> u64 {
        self.hwm_kb.max(self.max_sampled_rss_kb)
    }
}

/// A kB field (`VmRSS:   1234 kB`) of a `/proc/<pid>/status` text.
pub fn status_kb(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// `VmRSS` and `VmHWM` of `pid` now, in KiB (`None` once the process is gone).
pub fn read(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some((status_kb(&status, "VmRSS")?, status_kb(&status, "VmHWM")?))
}

/// Samples a process's memory every `every` on its own thread.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<MemoryUse>,
}

impl RssSampler {
    /// Starts sampling `pid`.
    pub fn start(pid: u32, every: Duration) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut seen = MemoryUse::default();
            while !flag.load(Ordering::Relaxed) {
                if let Some((rss, hwm)) = read(pid) {
                    seen.max_sampled_rss_kb = seen.max_sampled_rss_kb.max(rss);
                    seen.hwm_kb = hwm;
                    seen.last_rss_kb = rss;
                    seen.samples += 1;
                }
                std::thread::sleep(every);
            }
            seen
        });
        RssSampler { stop, handle }
    }

    /// Stops sampling (call while the process still runs, so the last `VmHWM` is its peak).
    pub fn stop(self) -> MemoryUse {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kb_fields() {
        let status = "Name:\tpgferry\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\nThreads:\t9\n";
        assert_eq!(status_kb(status, "VmRSS"), Some(102_400));
        assert_eq!(status_kb(status, "VmHWM"), Some(204_800));
        assert_eq!(status_kb(status, "VmSwap"), None);
        assert_eq!(status_kb(status, "Vm"), None);
    }

    #[test]
    fn samples_this_process() {
        let sampler = RssSampler::start(std::process::id(), Duration::from_millis(5));
        std::thread::sleep(Duration::from_millis(30));
        let seen = sampler.stop();
        assert!(seen.samples > 0);
        assert!(seen.peak_kb() > 0 && seen.hwm_kb >= seen.last_rss_kb);
    }
}
