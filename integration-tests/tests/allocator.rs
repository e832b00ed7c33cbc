//! One heap for every caller in the `pgferry` process (docs/decisions.md, "Allocator"): libc's
//! own allocations (`strdup` inside librdkafka, for one) must come from the jemalloc that Rust
//! and the statically linked C libraries use, or a block allocated by one allocator would be
//! freed by the other. The dynamic linker reports where libc's calls bind (`LD_DEBUG=bindings`):
//! `malloc`, `calloc`, `realloc` and `free` must all bind to the `pgferry` executable. Dropping
//! tikv-jemalloc-sys' `override_allocator_on_supported_platforms` makes this fail.

use std::process::Command;

use anyhow::{ensure, Context, Result};
use pgferry_integration_tests::pgferry_bin;

#[test]
fn libc_allocates_from_the_same_heap_as_pgferry() -> Result<()> {
    let bin = pgferry_bin();
    let out = Command::new(&bin)
        .arg("--version")
        .env("LD_DEBUG", "bindings")
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    ensure!(out.status.success(), "{} --version failed: {}", bin.display(), String::from_utf8_lossy(&out.stderr));
    // The dynamic linker writes its report to stderr.
    let report = String::from_utf8_lossy(&out.stderr);
    let exe = bin.canonicalize().unwrap_or(bin.clone());
    for symbol in ["malloc", "calloc", "realloc", "free"] {
        let bound = report.lines().any(|l| {
            l.contains("binding file ")
                && l.contains("/libc.so")
                && l.contains(&format!("normal symbol `{symbol}'"))
                && l.split(" to ").nth(1).is_some_and(|to| {
                    let target = to.split(" [").next().unwrap_or("");
                    std::path::Path::new(target).canonicalize().is_ok_and(|p| p == exe)
                })
        });
        ensure!(bound, "libc's `{symbol}` does not bind to {}: the C libraries would use another heap\n{}",
            exe.display(),
            report.lines().filter(|l| l.contains(&format!("`{symbol}'"))).collect::<Vec<_>>().join("\n"));
    }
    Ok(())
}
