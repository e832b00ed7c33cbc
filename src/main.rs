//! `pgferry`: the command line of pgferry — cluster set-up and the capture/apply services.

mod init;
mod supervise;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use pgferry_connectors::Config;

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
    /// Create topics, and on every node the `pgferry` schema, publication, slot and origins.
    Init,
    /// Run the capture service of a node (its changes → Kafka).
    Capture {
        /// Node name from the config.
        #[arg(long)]
        node: String,
    },
    /// Run the apply service of a node (other nodes' changes → this node).
    Apply {
        /// Node name from the config.
        #[arg(long)]
        node: String,
    },
    /// Run capture and apply of a node in one process.
    Run {
        /// Node name from the config.
        #[arg(long)]
        node: String,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PGFERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,pg_walstream=error,rdkafka=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(cli)) {
        // One line: what failed and where (every error names its key, endpoint or table).
        eprintln!("error: {}", one_line(&e));
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    let config = Arc::new(Config::load(&cli.config)?);
    let secrets = config.secrets();
    run_command(cli, config).await.map_err(|e| {
        // Errors name endpoints, never passwords; scrub anyway in case a library quotes a DSN.
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        anyhow::anyhow!(pgferry_connectors::redact::scrub(&one_line(&e), &secrets))
    })
}

async fn run_command(cli: Cli, config: Arc<Config>) -> Result<()> {
    let node_of = |name: &str| -> Result<String> {
        config
            .node(name)
            .map(|n| n.name.clone())
            .with_context(|| format!("node {name:?} is not in {}", cli.config.display()))
    };
    match cli.command {
        Command::Init => init::run(&config).await,
        Command::Capture { node } => {
            supervise::capture(config.clone(), node_of(&node)?).await;
            Ok(())
        }
        Command::Apply { node } => {
            supervise::apply(config.clone(), node_of(&node)?).await;
            Ok(())
        }
        Command::Run { node } => {
            let node = node_of(&node)?;
            tokio::join!(
                supervise::capture(config.clone(), node.clone()),
                supervise::apply(config.clone(), node)
            );
            Ok(())
        }
    }
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
