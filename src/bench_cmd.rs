//! `pgferry bench ARGS…`: runs the benchmarks, which live in the `pgferry-bench` binary (crate
//! `bench/`, built next to this one), so the replication binary carries none of the benchmark's
//! dependencies. The process is replaced by `pgferry-bench ARGS…` (`PGFERRY_BENCH_BIN`, else
//! the `pgferry-bench` beside this executable), so its output and exit status are the command's.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Replaces this process with the benchmark binary; returns only on failure.
pub fn exec(args: &[OsString]) -> Result<()> {
    let bin = match std::env::var_os("PGFERRY_BENCH_BIN") {
        Some(b) => PathBuf::from(b),
        None => std::env::current_exe()
            .context("locating the pgferry executable")?
            .with_file_name("pgferry-bench"),
    };
    if !bin.is_file() {
        bail!(
            "the benchmarks are not built: no {} (cargo build --release -p pgferry-bench, or run \
             deploy/local/bench.sh, which builds them and starts the services they need)",
            bin.display()
        );
    }
    let err = Command::new(&bin).args(args).exec();
    Err(err).with_context(|| format!("running {}", bin.display()))
}
