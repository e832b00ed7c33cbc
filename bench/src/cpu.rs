//! CPU time of a process from `/proc/<pid>/stat` (user + system, all threads).

/// Clock ticks per second of `utime`/`stime`: Linux's `USER_HZ`, 100 on every architecture
/// the kernel exports to user space (what `getconf CLK_TCK` prints).
const TICKS_PER_SECOND: f64 = 100.0;

/// User + system CPU seconds of a `/proc/<pid>/stat` line.
pub fn stat_cpu_seconds(stat: &str) -> Option<f64> {
    // The command name (field 2) is in parentheses and may hold spaces or parentheses itself:
    // the fields after the last ')' start with field 3 (state); utime is 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_SECOND)
}

/// CPU seconds `pid` has used so far (`None` once the process is gone).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    stat_cpu_seconds(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_utime_and_stime() {
        let stat = "4242 (postgres: a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 130 0 0 20 0 1 0 99 1 2";
        assert_eq!(stat_cpu_seconds(stat), Some(3.8));
        assert_eq!(stat_cpu_seconds("4242 (x) S 1"), None);
    }

    #[test]
    fn reads_this_process() {
        assert!(cpu_seconds(std::process::id()).is_some());
    }
}
