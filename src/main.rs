//! `pgferry`: the command line of pgferry — cluster set-up, the capture/apply services,
//! conflict review, and recovery (diff, repair, replay).

mod catch_up;
mod bench_cmd;
mod check;
mod conflicts_cmd;
mod diff;
mod init;
mod snowflake;
mod status;
mod node_rebuild;
mod node_remove;
mod repair;
mod replay;
mod repset;
mod row_sql;
mod scrubbed_output;
mod supervise;
mod table_compare;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use pgferry_connectors::{http_endpoint, Config, MetricsRegistry};

/// Active-active PostgreSQL replication through Apache Kafka.
#[derive(Parser)]
#[command(name = "pgferry", version, about)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, global = true, default_value = "pgferry.toml", env = "PGFERRY_CONFIG")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check every prerequisite (config, nodes, Kafka, registry), before `init` and in
    /// monitoring; exit status 0 all good, 1 problems found, 2 something could not be checked.
    ///
    /// On every node: server version, wal_level, track_commit_timestamp, room for the slot,
    /// origins, WAL sender and sessions, the replicated tables (primary key, REPLICA IDENTITY
    /// FULL for delta columns) and the role's privileges; Kafka: reachable, transactions, the
    /// topics' partitions, retention and min.insync.replicas; the registry: reachable,
    /// compatibility level. Warnings leave the exit status 0.
    Check(check::CheckArgs),
    /// Create topics, and on every node the `pgferry` schema, publication, slot and origins.
    Init,
    /// Run the capture service of a node (its changes → Kafka).
    Capture(ServiceArgs),
    /// Run the apply service of a node (other nodes' changes → this node).
    Apply(ServiceArgs),
    /// Run capture and apply of a node in one process.
    Run(ServiceArgs),
    /// Every node's capture and apply state, the lag matrix (origin → target), slot WAL,
    /// retention headroom, conflicts and dead letters. Exit status 1 when a node is down or a
    /// service reports unhealthy.
    Status {
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks: pgferry side by side with PostgreSQL native logical replication and pglogical
    /// (`pgferry bench --help`; deploy/local/bench.sh starts what they need and runs them).
    #[command(disable_help_flag = true)]
    Bench {
        /// Arguments of the benchmarks (`pgferry bench --help` lists them).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Recorded conflicts: list them, show one, resolve a parked one.
    Conflicts {
        #[command(subcommand)]
        command: conflicts_cmd::ConflictsCommand,
    },
    /// Compare a table across nodes (hashes of key ranges on each server); exit status 0 when
    /// they agree, 1 when rows differ, 2 when the comparison failed.
    Diff(diff::DiffArgs),
    /// Make the other nodes' rows of a table match a source of truth (writes are not
    /// replicated).
    Repair(repair::RepairArgs),
    /// Re-read a range of the topics into a node (a no-op for what it applied, unless --force).
    Replay(replay::ReplayArgs),
    /// Replication sets: list the replicated tables and where they are published; add or
    /// remove a table while the cluster runs.
    Repset {
        #[command(subcommand)]
        command: repset::RepsetCommand,
    },
    /// Node administration: add or remove a node, rebuild a damaged node from a peer.
    Node {
        #[command(subcommand)]
        command: node_rebuild::NodeCommand,
    },
}

impl Command {
    /// The exit status when the command fails.
    fn error_status(&self) -> i32 {
        match self {
            Command::Diff(_) | Command::Check(_) => diff::EXIT_ERROR,
            _ => 1,
        }
    }
}

/// What every service command takes.
#[derive(Args)]
struct ServiceArgs {
    /// Node name from the config.
    #[arg(long)]
    node: String,
    /// Serve Prometheus /metrics and /healthz on this ip:port (overrides the node's
    /// `metrics_listen` in the config).
    #[arg(long, value_name = "IP:PORT", value_parser = pgferry_connectors::config::parse_listen)]
    metrics_listen: Option<SocketAddr>,
}

/// jemalloc instead of glibc's malloc, for Rust and C code alike. Apply and capture allocate and
/// free many small strings per change (decoded columns, group state freed a group later); in
/// `perf` of an apply-only drain glibc's malloc, free and chunk consolidation were a third of
/// apply's samples. Same benchmark, back to back (docs/benchmarks/comparison-notes.md): apply's
/// CPU per 100k TPC-B transactions −15 to −30%, capture's −13%, the end-to-end drain ~15% and
/// the apply-only drain 20–40% faster. mimalloc was tried before and was not faster (it returned
/// pages to the kernel and faulted them in again).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

// jemalloc also replaces `malloc`/`free` for the C libraries in the process (tikv-jemalloc-sys'
// `override_allocator_on_supported_platforms`: unprefixed symbols, exported, so that libc's own
// calls bind to them too and one heap serves every caller). librdkafka allocates per message
// (each produced message, its header list and each header; each consumed message's op and
// headers): with glibc's malloc that was ~16% of capture's samples and ~11% of apply's. Same
// benchmark, back to back (comparison-notes.md, 2026-12-07 eighth session): capture's CPU per
// 100k TPC-B transactions 2.9–3.0 → 2.0–3.3 s (median 2.3), apply's 2.7–2.9 → 2.2–2.5, the
// end-to-end drain 13.5–13.8k → 14.4–17.0k txn/s; capture's peak RSS 68–73 → 106–137 MB (freed
// pages kept for `dirty_decay_ms`, 10 s; 1 s brought it back to 65 MB but cost capture the CPU
// it had saved, in page faults).
use tikv_jemalloc_sys as _;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PGFERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,pg_walstream=error,rdkafka=warn")),
        )
        .with_writer(scrubbed_output::ScrubbedStderr)
        .init();
    let cli = Cli::parse();
    // The benchmarks need no config or runtime here: they run in their own binary.
    if let Command::Bench { args } = &cli.command {
        if let Err(e) = bench_cmd::exec(args) {
            eprintln!("error: {}", one_line(&e));
        }
        std::process::exit(1);
    }
    let error_status = cli.command.error_status();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(error_status);
        }
    };
    // check reports a config it cannot load as a finding, so it loads the config itself.
    if let Command::Check(args) = &cli.command {
        std::process::exit(runtime.block_on(check::run(&cli.config, args)));
    }
    match runtime.block_on(run(cli)) {
        Ok(0) => {}
        Ok(status) => std::process::exit(status),
        Err(e) => {
            // One line: what failed and where (every error names its key, endpoint or table).
            eprintln!("error: {}", one_line(&e));
            std::process::exit(error_status);
        }
    }
}

/// Runs the command; the exit status.
async fn run(cli: Cli) -> Result<i32> {
    let config = Arc::new(Config::load(&cli.config)?);
    let secrets = config.secrets();
    scrubbed_output::protect(secrets.clone());
    run_command(cli, config).await.map_err(|e| {
        // Errors name endpoints, never passwords; scrub anyway in case a library quotes a DSN.
        anyhow::anyhow!(secrets.scrub(&one_line(&e)))
    })
}

async fn run_command(cli: Cli, config: Arc<Config>) -> Result<i32> {
    let node_of = |name: &str| -> Result<String> {
        config
            .node(name)
            .map(|n| n.name.clone())
            .with_context(|| format!("node {name:?} is not in {}", cli.config.display()))
    };
    match cli.command {
        Command::Diff(args) => return diff::run(&config, args).await,
        Command::Init => init::run(&config).await?,
        Command::Conflicts { command } => conflicts_cmd::run(&config, command).await?,
        Command::Repair(args) => repair::run(&config, args).await?,
        Command::Replay(args) => replay::run(config.clone(), args).await?,
        Command::Repset { command } => repset::run(&config, &cli.config, command).await?,
        Command::Node { command } => node_rebuild::run(config.clone(), &cli.config, command).await?,
        Command::Status { json } => {
            let status = status::gather(&config).await;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status.render());
            }
            return Ok(if status.healthy() { 0 } else { 1 });
        }
        Command::Bench { .. } => anyhow::bail!("pgferry bench is run before the config is read"),
        Command::Check(_) => anyhow::bail!("pgferry check is run before the config is read"),
        Command::Capture(args) => {
            let node = node_of(&args.node)?;
            let registry = serve_metrics(&config, &node, args.metrics_listen, &cli.config).await?;
            supervise::capture(config.clone(), node, registry).await;
        }
        Command::Apply(args) => {
            let node = node_of(&args.node)?;
            let registry = serve_metrics(&config, &node, args.metrics_listen, &cli.config).await?;
            supervise::apply(config.clone(), node, registry).await;
        }
        Command::Run(args) => {
            let node = node_of(&args.node)?;
            let registry = serve_metrics(&config, &node, args.metrics_listen, &cli.config).await?;
            tokio::join!(
                supervise::capture(config.clone(), node.clone(), registry.clone()),
                supervise::apply(config.clone(), node, registry)
            );
        }
    }
    Ok(0)
}

/// The process's metrics registry, served on `--metrics-listen` or else the node's
/// `metrics_listen` (if either is set). A bad or busy address fails start-up, naming its setting.
async fn serve_metrics(
    config: &Config,
    node: &str,
    cli_addr: Option<SocketAddr>,
    config_path: &Path,
) -> Result<MetricsRegistry> {
    let registry = MetricsRegistry::new();
    let from_config = config
        .nodes
        .iter()
        .enumerate()
        .find(|(_, n)| n.name == node)
        .and_then(|(i, n)| {
            Some((
                n.metrics_addr()?,
                format!("{} nodes[{i}].metrics_listen", config_path.display()),
            ))
        });
    let listen = match (cli_addr, from_config) {
        (Some(addr), _) => Some((addr, "--metrics-listen".to_string())),
        (None, from_config) => from_config,
    };
    if let Some((addr, key)) = listen {
        let listener = http_endpoint::bind(addr, &key).await?;
        let local = listener.local_addr().unwrap_or(addr);
        tracing::info!(%node, addr = %local, "serving /metrics and /healthz");
        tokio::spawn(http_endpoint::serve(listener, registry.clone()));
    }
    Ok(registry)
}

/// The error and its causes on one line, leaving out causes whose text is already included
/// (our error types often quote their source in their own message).
fn one_line(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out.replace('\n', " ")
}
