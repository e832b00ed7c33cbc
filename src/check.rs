//! `pgferry check [--json] [-q]`: a preflight of everything pgferry needs, before `init` and in
//! monitoring. The config as start-up validates it; then on every node its settings
//! (`wal_level`, `track_commit_timestamp`), room for its slot, origins, WAL sender and sessions,
//! the server version, the replicated tables (present, primary key, `REPLICA IDENTITY FULL`
//! for delta columns), the role's privileges, and init's refusals of slots and origins held
//! elsewhere; Kafka (reachable, transactions, the cluster's topics: partitions, cleanup policy,
//! retention, `min.insync.replicas` against the replication factor); the registry (reachable,
//! compatibility level). One line per finding, naming where, the object and the fix.
//!
//! Exit status as `diff`: 0 every check passed (warnings allowed), 1 some prerequisite is
//! missing, 2 something could not be checked (a node, Kafka or the registry unreachable or
//! refusing the login, a read that failed, a config file that cannot be read).
//!
//! The judging is in [`rules`] (pure, unit-tested); [`node_facts`] and the functions below read.

mod node_facts;
pub mod rules;

use std::collections::BTreeMap;
use std::path::Path;

use clap::Args;
use pgferry_connectors::config::{Config, ConfigError};
use pgferry_connectors::kafka;
use pgferry_connectors::registry::Registry;
use serde_json::json;

use rules::{Finding, KafkaNeeds, Place, RegistryFacts, Severity, TopicNeed};

#[derive(Args)]
pub struct CheckArgs {
    /// Print the findings as one JSON object instead of lines.
    #[arg(long)]
    pub json: bool,
    /// Print only warnings, problems and what could not be checked (and the summary).
    #[arg(long, short)]
    pub quiet: bool,
}

/// Runs every check against the config at `path`, prints the findings; the exit status.
pub async fn run(path: &Path, args: &CheckArgs) -> i32 {
    let findings = gather(path).await;
    let status = rules::exit_status(&findings);
    if args.json {
        let count = |s: Severity| findings.iter().filter(|f| f.severity == s).count();
        let report = json!({
            "exit_status": status,
            "ok": count(Severity::Ok),
            "warnings": count(Severity::Warning),
            "problems": count(Severity::Problem),
            "unchecked": count(Severity::Unchecked),
            "findings": findings.iter().map(Finding::json).collect::<Vec<_>>(),
        });
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("error: cannot write the report as JSON: {e}");
                return 2;
            }
        }
    } else {
        for f in findings.iter().filter(|f| !args.quiet || f.severity != Severity::Ok) {
            println!("{}", f.line());
        }
        println!("{}", summary(&findings, status));
    }
    status
}

/// `check: 2 problems, 1 warning, 0 unchecked (exit status 1)`.
fn summary(findings: &[Finding], status: i32) -> String {
    let count = |s: Severity| findings.iter().filter(|f| f.severity == s).count();
    let n = |k: usize, one: &str, many: &str| format!("{k} {}", if k == 1 { one } else { many });
    format!(
        "check: {} passed, {}, {}, {} (exit status {status})",
        count(Severity::Ok),
        n(count(Severity::Problem), "problem", "problems"),
        n(count(Severity::Warning), "warning", "warnings"),
        n(
            count(Severity::Unchecked),
            "check could not run",
            "checks could not run"
        ),
    )
}

/// Every finding, config first, then the nodes in config order, Kafka and the registry. Their
/// messages carry no secret: they name endpoints, and are scrubbed of the config's secrets.
async fn gather(path: &Path) -> Vec<Finding> {
    let place = Place::Config {
        path: path.display().to_string(),
    };
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e @ ConfigError::Read { .. }) => {
            return vec![
                Finding::unchecked(&place, "config", path.display().to_string(), e.to_string())
                    .fix("give the config file with --config or PGFERRY_CONFIG"),
            ]
        }
        Err(e) => {
            // Its message starts `config <path>: `, which the report puts first anyway.
            let text = e.to_string();
            let prefix = format!("config {}: ", path.display());
            let text = text.strip_prefix(&prefix).unwrap_or(&text).to_string();
            return vec![Finding::problem(&place, "config", path.display().to_string(), text)
                .fix("correct the key it names (deploy/pgferry.example.toml describes every key); nothing else was checked")];
        }
    };
    let secrets = config.secrets();
    crate::scrubbed_output::protect(secrets.clone());
    let mut findings = vec![Finding::ok(
        &place,
        "config",
        path.display().to_string(),
        format!(
            "config is valid: cluster {}, {} in {}",
            config.cluster.name,
            count(config.nodes.len(), "node", "nodes"),
            count(config.regions().len(), "region", "regions")
        ),
    )];
    let nodes = async {
        let mut out = Vec::new();
        for node in &config.nodes {
            out.extend(node_facts::findings(&config, node).await);
        }
        out
    };
    let (nodes, kafka, registry) = tokio::join!(nodes, kafka_findings(&config), registry_findings(&config));
    findings.extend(nodes);
    findings.extend(kafka);
    findings.extend(registry);
    for f in &mut findings {
        f.message = secrets.scrub(&f.message);
        f.fix = f.fix.as_deref().map(|x| secrets.scrub(x));
    }
    findings
}

fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The cluster's topics and the partitions each needs.
fn topic_needs(config: &Config) -> Vec<TopicNeed> {
    let cluster = &config.cluster.name;
    let mut out: Vec<TopicNeed> = config
        .regions()
        .iter()
        .map(|region| TopicNeed {
            name: config.region_topic(region),
            partitions: config.kafka.partitions,
            why: format!("kafka.partitions; each node of region {region} writes its own partition"),
        })
        .collect();
    for (topic, what) in [("conflicts", "conflict reports"), ("dlq", "dead letters")] {
        out.push(TopicNeed {
            name: format!("{cluster}.{topic}"),
            partitions: 1,
            why: format!("pgferry's topic of {what}"),
        });
    }
    out
}

async fn kafka_findings(config: &Config) -> Vec<Finding> {
    let place = Place::Kafka {
        bootstrap: config.kafka.bootstrap_servers.clone(),
    };
    let unchecked =
        |check: &'static str, what: &str, e: String| vec![Finding::unchecked(&place, check, what.to_string(), e)];
    let cfg = config.kafka.clone();
    let reachable =
        tokio::task::spawn_blocking(move || kafka::check_reachable(&cfg, std::time::Duration::from_secs(10))).await;
    match reachable {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let text = match e {
                kafka::KafkaError::Unreachable { message, .. } => format!("the brokers do not answer: {message}"),
                other => kafka_text(&config.kafka.bootstrap_servers, &other),
            };
            let mut f = unchecked("kafka_connection", "kafka.bootstrap_servers", text);
            f[0].fix = Some("check that the brokers run and are reachable from here, and the [kafka] address, security and login keys".into());
            return f;
        }
        Err(e) => return unchecked("kafka_connection", "kafka.bootstrap_servers", e.to_string()),
    }
    let needs = KafkaNeeds {
        bootstrap: config.kafka.bootstrap_servers.clone(),
        topics: topic_needs(config),
        replication_factor: config.kafka.replication_factor,
        retention_ms: config.kafka.retention_ms,
        message_max_bytes: kafka::producer_message_max_bytes(&config.kafka),
    };
    let names: Vec<String> = needs.topics.iter().map(|t| t.name.clone()).collect();
    let described = match kafka::describe(&config.kafka, &names).await {
        Ok(d) => d,
        Err(e) => {
            return unchecked(
                "topic_partitions",
                "topics",
                kafka_text(&config.kafka.bootstrap_servers, &e),
            )
        }
    };
    let mut out = vec![Finding::ok(
        &place,
        "kafka_connection",
        "kafka.bootstrap_servers",
        format!("Kafka answers: {}", count(described.brokers.len(), "broker", "brokers")),
    )];
    let probe = if rules::transactions_impossible(&place, &described).is_some() {
        None
    } else {
        // An id of its own (`.` never appears in a cluster or node name): initializing it
        // fences nothing of capture's.
        let (cfg, id) = (config.kafka.clone(), format!("pgferry-{}.check", config.cluster.name));
        Some(
            match tokio::task::spawn_blocking(move || kafka::probe_transactions(&cfg, &id)).await {
                Ok(r) => r.map_err(|e| kafka_text(&config.kafka.bootstrap_servers, &e)),
                Err(e) => Err(e.to_string()),
            },
        )
    };
    out.push(rules::transactions(&place, &described, probe.as_ref()));
    out.extend(rules::topics(&place, &needs, &described));
    out
}

/// A Kafka error without its leading `Kafka at <bootstrap>: `, which the report puts first.
fn kafka_text(bootstrap: &str, e: &kafka::KafkaError) -> String {
    let text = e.to_string();
    text.strip_prefix(&format!("Kafka at {bootstrap}: "))
        .unwrap_or(&text)
        .to_string()
}

async fn registry_findings(config: &Config) -> Vec<Finding> {
    let url = config.registry.url.trim_end_matches('/').to_string();
    let place = Place::Registry { url: url.clone() };
    // Registry errors start `schema registry <url>: `, which the report puts first.
    let text = |e: pgferry_connectors::registry::RegistryError| {
        let t = e.to_string();
        t.strip_prefix(&format!("schema registry {url}: "))
            .unwrap_or(&t)
            .to_string()
    };
    let unreachable = |e: String| {
        vec![Finding::unchecked(&place, "registry_connection", "registry.url", e)
            .fix("check that the registry runs and is reachable from here, and registry.url, username, password and ca_file")]
    };
    let registry = match Registry::new(&config.registry) {
        Ok(r) => r,
        Err(e) => return unreachable(text(e)),
    };
    let global = match registry.compatibility(None).await {
        Ok(level) => level,
        Err(e) => return unreachable(text(e)),
    };
    let mut out = vec![Finding::ok(
        &place,
        "registry_connection",
        "registry.url",
        "the registry answers",
    )];
    // This cluster's subjects: `<topic>-<record>` of its topics.
    let prefixes: Vec<String> = topic_needs(config).iter().map(|t| format!("{}-", t.name)).collect();
    let subjects = match registry.subjects().await {
        Ok(all) => all
            .into_iter()
            .filter(|s| prefixes.iter().any(|p| s.starts_with(p)))
            .collect::<Vec<_>>(),
        Err(e) => {
            out.push(Finding::unchecked(&place, "compatibility", "subjects", text(e)));
            return out;
        }
    };
    let mut levels = BTreeMap::new();
    for subject in subjects {
        match registry.compatibility(Some(&subject)).await {
            Ok(level) => {
                levels.insert(subject, level);
            }
            Err(e) => {
                out.push(Finding::unchecked(&place, "compatibility", subject, text(e)));
                return out;
            }
        }
    }
    out.extend(rules::compatibility(
        &place,
        &RegistryFacts {
            global,
            subjects: levels,
        },
    ));
    out
}
