//! `pgferry.toml`: the cluster, its nodes, Kafka, the registry and the replicated tables.
//! Read once at start-up; in string values `${VAR}` is replaced by the environment variable
//! `VAR` and `${file:/path}` by that file's contents (for secrets, see [`crate::interpolate`]);
//! unknown keys and bad values are errors that name the key.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;
use thiserror::Error;

/// What is wrong with a configuration file.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read { path: String, source: std::io::Error },
    /// A `${VAR}` or `${file:PATH}` reference cannot be resolved.
    #[error("config {path}: {source}")]
    Interpolate {
        path: String,
        source: crate::interpolate::InterpolateError,
    },
    /// TOML syntax, an unknown key, a missing key or a wrong type.
    #[error("config {path}: {message}")]
    Parse { path: String, message: String },
    /// A value that parses but cannot work.
    #[error("config {path}: {key}: {message}")]
    Invalid { path: String, key: String, message: String },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The cluster.
    pub cluster: ClusterConfig,
    /// The Kafka cluster.
    pub kafka: KafkaConfig,
    /// The schema registry.
    pub registry: RegistryConfig,
    /// Every node of the cluster.
    pub nodes: Vec<NodeConfig>,
    /// What replicates.
    pub replication: ReplicationConfig,
    /// When the services report unhealthy on `/healthz`.
    #[serde(default)]
    pub health: HealthConfig,
    /// How apply groups source transactions.
    #[serde(default)]
    pub apply: ApplyConfig,
    /// The file it was loaded from ([`Config::load`]), for re-reading it.
    #[serde(skip)]
    pub source: Option<std::path::PathBuf>,
}

/// `[health]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Apply reports unhealthy while any origin lags more than this (ms of origin time behind
    /// now). Default: no limit (unhealthy only when a stream is down).
    pub max_apply_lag_ms: Option<u64>,
}

/// `[apply]`: grouping of source transactions (DESIGN.md, "Apply"). Apply takes the complete
/// source transactions of one origin it has already fetched — never waiting for more — and writes
/// them in one local transaction, up to these bounds.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct ApplyConfig {
    /// Most source transactions in one group (1: no grouping).
    #[serde(default = "default_max_group_txns")]
    pub max_group_txns: usize,
    /// Most row changes in one group; a larger transaction is applied alone, streamed.
    #[serde(default = "default_max_group_rows")]
    pub max_group_rows: usize,
    /// Wait up to this long for more transactions before writing a group (default 0: never
    /// wait). For tests that must see large groups; it adds latency.
    #[serde(default)]
    pub group_wait_ms: u64,
    /// Longest wait (ms) for this node's clock to pass the commit time of a source transaction
    /// dated in its future (clock skew), before applying it: local writes made after an applied
    /// change are then always dated later than it, as last-update-wins needs. A transaction
    /// dated further ahead than this is applied at once, with a warning (0: never wait).
    #[serde(default = "default_max_clock_skew_ms")]
    pub max_clock_skew_ms: u64,
    /// Read the next group's keys on a second session while a group is written and committed
    /// (default true; each apply stream then holds two sessions). Off: one session per
    /// stream, each group read after the one before it committed.
    #[serde(default = "default_read_ahead")]
    pub read_ahead: bool,
}

impl Default for ApplyConfig {
    fn default() -> ApplyConfig {
        ApplyConfig {
            max_group_txns: default_max_group_txns(),
            max_group_rows: default_max_group_rows(),
            group_wait_ms: 0,
            max_clock_skew_ms: default_max_clock_skew_ms(),
            read_ahead: default_read_ahead(),
        }
    }
}

fn default_max_clock_skew_ms() -> u64 {
    5000
}

/// Largest `[apply] max_clock_skew_ms`: a stream waiting longer than this for a clock is
/// stalled, not protected.
pub const MAX_CLOCK_SKEW_LIMIT_MS: u64 = 60_000;

fn default_read_ahead() -> bool {
    true
}

fn default_max_group_txns() -> usize {
    1000
}

fn default_max_group_rows() -> usize {
    4000
}

/// `[cluster]`.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Cluster name: prefix of topics, Avro namespaces and Kafka transactional ids; part of
    /// replication slot and origin names (`pgferry_schemas::naming`).
    pub name: String,
}

/// `[kafka]`.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `host:port[,host:port…]`.
    pub bootstrap_servers: String,
    /// Partitions of each region topic (at least the number of nodes in the region).
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor of created topics.
    #[serde(default = "default_replication_factor")]
    pub replication_factor: i32,
    /// How long the topics keep events (`retention.ms` of the topics `init` creates; -1:
    /// forever): the longest outage after which a node can still catch up from Kafka.
    /// `pgferry check` reports a topic that keeps them for less. Default: the brokers'
    /// `log.retention.*`.
    #[serde(default)]
    pub retention_ms: Option<i64>,
    /// Extra librdkafka properties, applied to every client (they may not repeat a property
    /// that a key below sets).
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, String>,
    /// How clients talk to the brokers (librdkafka `security.protocol`; default `PLAINTEXT`).
    #[serde(default)]
    pub security_protocol: SecurityProtocol,
    /// SASL mechanism (`PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`); required with a `SASL_*`
    /// protocol.
    pub sasl_mechanism: Option<SaslMechanism>,
    /// SASL user name.
    pub sasl_username: Option<String>,
    /// SASL password (a secret: scrubbed from all output; use `${VAR}` or `${file:PATH}`).
    pub sasl_password: Option<String>,
    /// PEM file of the CA certificates that sign the brokers' certificates (default: the
    /// system's). The broker's host name is verified against its certificate.
    pub ssl_ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate, for brokers that require TLS client authentication.
    pub ssl_cert_file: Option<std::path::PathBuf>,
    /// PEM private key of `ssl_cert_file`.
    pub ssl_key_file: Option<std::path::PathBuf>,
    /// Password of an encrypted `ssl_key_file` (a secret).
    pub ssl_key_password: Option<String>,
}

/// `kafka.security_protocol`: librdkafka's `security.protocol`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub enum SecurityProtocol {
    /// No TLS, no authentication.
    #[default]
    #[serde(rename = "PLAINTEXT")]
    Plaintext,
    /// TLS, no SASL.
    #[serde(rename = "SSL")]
    Ssl,
    /// SASL without TLS (the password travels in the clear with `PLAIN`).
    #[serde(rename = "SASL_PLAINTEXT")]
    SaslPlaintext,
    /// SASL over TLS.
    #[serde(rename = "SASL_SSL")]
    SaslSsl,
}

impl SecurityProtocol {
    /// The librdkafka value.
    pub fn name(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "PLAINTEXT",
            SecurityProtocol::Ssl => "SSL",
            SecurityProtocol::SaslPlaintext => "SASL_PLAINTEXT",
            SecurityProtocol::SaslSsl => "SASL_SSL",
        }
    }

    /// Whether the connection uses TLS.
    pub fn tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }

    /// Whether the client authenticates with SASL.
    pub fn sasl(self) -> bool {
        matches!(self, SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl)
    }
}

/// `kafka.sasl_mechanism`: librdkafka's `sasl.mechanisms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub enum SaslMechanism {
    /// User name and password sent as they are (use with TLS).
    #[serde(rename = "PLAIN")]
    Plain,
    /// SCRAM with SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM with SHA-512.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The librdkafka value.
    pub fn name(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

impl KafkaConfig {
    /// The librdkafka properties that the security keys above set, in a fixed order.
    pub fn security_properties(&self) -> Vec<(&'static str, String)> {
        let path = |p: &std::path::Path| p.display().to_string();
        let mut out = vec![("security.protocol", self.security_protocol.name().to_string())];
        if let Some(m) = self.sasl_mechanism {
            out.push(("sasl.mechanisms", m.name().to_string()));
        }
        let optional = [
            ("sasl.username", self.sasl_username.clone()),
            ("sasl.password", self.sasl_password.clone()),
            ("ssl.ca.location", self.ssl_ca_file.as_deref().map(path)),
            ("ssl.certificate.location", self.ssl_cert_file.as_deref().map(path)),
            ("ssl.key.location", self.ssl_key_file.as_deref().map(path)),
            ("ssl.key.password", self.ssl_key_password.clone()),
        ];
        out.extend(optional.into_iter().filter_map(|(k, v)| Some((k, v?))));
        out
    }
}

fn default_partitions() -> i32 {
    8
}
fn default_replication_factor() -> i32 {
    1
}

/// `[registry]`.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Base URL of the Confluent-compatible API (Apicurio: `…/apis/ccompat/v7`).
    pub url: String,
    /// User name for HTTP basic authentication.
    pub username: Option<String>,
    /// Password for HTTP basic authentication (a secret: scrubbed from all output).
    pub password: Option<String>,
    /// PEM file of the CA certificates that sign an `https` registry's certificate, trusted
    /// in addition to the system's.
    pub ca_file: Option<std::path::PathBuf>,
}

/// `[[nodes]]`.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Node name (unique; used in slot, origin and transactional-id names).
    pub name: String,
    /// Numeric id 1–1023 (unique; used by snowflake ids and conflict tie-breaks).
    pub id: u16,
    /// Region: selects the data topic `<cluster>.<region>.changes`.
    pub region: String,
    /// `ip:port` of the node's metrics and health endpoint (`/metrics`, `/healthz`); none if unset.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// PostgreSQL connection string of the node's database.
    pub dsn: String,
    /// Origins whose changes this node applies and also publishes into its own partition
    /// (keeping the original origin), so a hub can feed nodes that do not read those origins'
    /// regions. Default: none.
    #[serde(default)]
    pub forward_origins: Vec<String>,
    /// Regions whose topics this node's apply reads. Default: every region.
    #[serde(default)]
    pub read_regions: Option<Vec<String>>,
    /// Partition of its region's topic that this node's capture writes. Default: the node's
    /// position among its region's nodes in this file. `pgferry node remove` pins it on the
    /// nodes after a removed one, so theirs do not move.
    #[serde(default)]
    pub partition: Option<i32>,
}

impl NodeConfig {
    /// Whether this node's apply reads `region`'s topic.
    pub fn reads_region(&self, region: &str) -> bool {
        self.read_regions.as_ref().is_none_or(|r| r.iter().any(|x| x == region))
    }
}

/// `[replication]`.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Replicated tables as `schema.table` (or `table`, meaning `public.table`).
    #[serde(default)]
    pub tables: Vec<String>,
    /// Schemas replicated whole: every table in them, including tables created later (their
    /// `CREATE TABLE` replicates and they join by themselves).
    #[serde(default)]
    pub schemas: Vec<String>,
    /// Replicate DDL on replicated tables (and `CREATE TABLE` in `schemas`): apply then runs
    /// statement text it reads from the topics, so it is off unless asked for.
    #[serde(default)]
    pub ddl: bool,
    /// How conflicts are resolved unless a table says otherwise.
    #[serde(default)]
    pub resolver: Resolver,
    /// What apply does with a change PostgreSQL rejects, unless a table says otherwise.
    #[serde(default)]
    pub on_error: OnError,
    /// Tombstones are kept this long (ms of origin time) after every origin's progress has
    /// passed them, for commit times that are not quite in commit order.
    #[serde(default = "default_tombstone_margin_ms")]
    pub tombstone_margin_ms: u64,
    /// Per-table settings, keyed by `schema.table` (or `table`).
    #[serde(default)]
    pub table: std::collections::BTreeMap<String, TableOptions>,
}

fn default_tombstone_margin_ms() -> u64 {
    60_000
}

/// `[replication.table."schema.table"]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct TableOptions {
    /// This table's conflict resolver (default: `replication.resolver`).
    pub resolver: Option<Resolver>,
    /// What apply does with a change of this table PostgreSQL rejects (default:
    /// `replication.on_error`).
    pub on_error: Option<OnError>,
    /// Numeric columns (counters, balances) that merge instead of being overwritten: every
    /// node adds each remote change's `new − old`. Needs REPLICA IDENTITY FULL.
    #[serde(default)]
    pub delta_columns: Vec<String>,
    /// Only rows matching this SQL condition replicate (a PostgreSQL publication row filter;
    /// for updates and deletes it may use only replica identity columns).
    pub row_filter: Option<String>,
    /// Only these columns replicate (a publication column list; must include the key).
    pub columns: Option<Vec<String>>,
    /// Region-local (data residency): only the nodes of this region capture and apply the table,
    /// so its rows never reach another region's nodes or topic.
    pub region: Option<String>,
    /// Which operations replicate (default: all four). Capture leaves the others out of the
    /// topics, so e.g. `["insert"]` makes an append-only table whose local updates and deletes
    /// stay local.
    pub operations: Option<Vec<Operation>>,
}

/// A kind of row change, for [`TableOptions::operations`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// `INSERT`.
    Insert,
    /// `UPDATE`.
    Update,
    /// `DELETE`.
    Delete,
    /// `TRUNCATE`.
    Truncate,
}

/// How apply settles a conflict (DESIGN.md, "Conflicts"). Every node must pick the same winner.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(rename_all = "snake_case")]
pub enum Resolver {
    /// The later origin commit wins; equal times: the greater node id.
    #[default]
    LastUpdateWins,
    /// The earlier origin commit wins; equal times: the smaller node id.
    FirstUpdateWins,
    /// The incoming change always wins.
    ApplyRemote,
    /// The local row always stays.
    KeepLocal,
    /// The local row stays and the incoming change is parked in `pgferry.conflicts` for review.
    Manual,
    /// The origin's stream stops at the conflict until an operator acts.
    Error,
}

/// What apply does with a change PostgreSQL rejects (a constraint no resolver covers, a value
/// the local type refuses, a trigger that raises): DESIGN.md, "Errors". Whatever is skipped is
/// kept whole in `pgferry.exceptions` and the dead-letter topic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// The origin's stream stops at the change and retries it with backoff until the cause is
    /// fixed (the default: nothing is skipped without an operator's say-so).
    #[default]
    Stop,
    /// The whole source transaction is skipped (none of its changes are applied here).
    SkipTransaction,
    /// Only the rejected change is skipped; the rest of its transaction is applied.
    SkipChange,
}

impl OnError {
    /// The name used in config.
    pub fn name(self) -> &'static str {
        match self {
            OnError::Stop => "stop",
            OnError::SkipTransaction => "skip_transaction",
            OnError::SkipChange => "skip_change",
        }
    }
}

impl Resolver {
    /// The name used in config and in `pgferry.conflicts`.
    pub fn name(self) -> &'static str {
        match self {
            Resolver::LastUpdateWins => "last_update_wins",
            Resolver::FirstUpdateWins => "first_update_wins",
            Resolver::ApplyRemote => "apply_remote",
            Resolver::KeepLocal => "keep_local",
            Resolver::Manual => "manual",
            Resolver::Error => "error",
        }
    }
}

impl Config {
    /// Reads, interpolates, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: p.clone(),
            source,
        })?;
        let mut config = Config::parse(&text, &p)?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// The config file read again (for the replication sets `pgferry repset` changed while a
    /// service runs); `None` if this config was not loaded from a file or the file no longer
    /// loads (the error is logged).
    pub fn reload(&self) -> Option<Config> {
        let path = self.source.as_ref()?;
        Config::load(path)
            .inspect_err(
                |e| tracing::warn!(error = %e, "re-reading the config failed; keeping the one loaded at start"),
            )
            .ok()
    }

    /// Parses and validates config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let parse_error = |e: toml::de::Error| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string().replace('\n', " ").trim().to_string(),
        };
        // The shape is checked on the text as written, so errors point at the line; the text
        // holds `${…}` references, never the secrets they stand for.
        let _: Config = toml::from_str(text).map_err(parse_error)?;
        let raw: toml::Table = toml::from_str(text).map_err(parse_error)?;
        let value =
            crate::interpolate::interpolate(toml::Value::Table(raw)).map_err(|source| ConfigError::Interpolate {
                path: origin.to_string(),
                source,
            })?;
        let config: Config = value.try_into().map_err(parse_error)?;
        config.validate(origin)?;
        Ok(config)
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            path: origin.to_string(),
            key,
            message,
        };
        let ident_ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !ident_ok(&self.cluster.name) {
            return Err(invalid(
                "cluster.name".into(),
                "must be non-empty letters, digits, '_' or '-'".into(),
            ));
        }
        if self.nodes.is_empty() {
            return Err(invalid("nodes".into(), "at least one [[nodes]] entry is needed".into()));
        }
        for (key, v) in [("apply.max_group_txns", self.apply.max_group_txns), ("apply.max_group_rows", self.apply.max_group_rows)] {
            if v == 0 {
                return Err(invalid(key.into(), "must be at least 1".into()));
            }
        }
        if self.apply.max_clock_skew_ms > MAX_CLOCK_SKEW_LIMIT_MS {
            return Err(invalid(
                "apply.max_clock_skew_ms".into(),
                format!(
                    "{} is more than {MAX_CLOCK_SKEW_LIMIT_MS} (a minute): clocks that far apart need fixing (NTP), not waiting out",
                    self.apply.max_clock_skew_ms
                ),
            ));
        }
        let mut names = HashSet::new();
        let mut ids = HashSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let key = |f: &str| format!("nodes[{i}].{f}");
            if !n
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                || n.name.is_empty()
            {
                return Err(invalid(
                    key("name"),
                    format!(
                        "{:?}: use lowercase letters, digits and '_' (it names slots and origins)",
                        n.name
                    ),
                ));
            }
            if !names.insert(&n.name) {
                return Err(invalid(key("name"), format!("{:?} is used by another node", n.name)));
            }
            if !(1..=1023).contains(&n.id) {
                return Err(invalid(key("id"), format!("{} is outside 1–1023", n.id)));
            }
            if !ids.insert(n.id) {
                return Err(invalid(key("id"), format!("{} is used by another node", n.id)));
            }
            if !ident_ok(&n.region) {
                return Err(invalid(
                    key("region"),
                    "must be non-empty letters, digits, '_' or '-'".into(),
                ));
            }
            if let Some(listen) = &n.metrics_listen {
                parse_listen(listen).map_err(|message| invalid(key("metrics_listen"), message))?;
            }
            if n.dsn.trim().is_empty() {
                return Err(invalid(key("dsn"), "is empty".into()));
            }
            crate::pg_tls::TlsDsn::parse(&n.dsn)
                .and_then(|d| d.tls.check_files())
                .map_err(|message| invalid(key("dsn"), message))?;
        }
        if let Some(ms) = self.kafka.retention_ms {
            if ms != -1 && ms < 1 {
                return Err(invalid(
                    "kafka.retention_ms".into(),
                    format!("{ms}: use a number of milliseconds, or -1 to keep events forever"),
                ));
            }
        }
        self.validate_kafka_security()
            .map_err(|(key, message)| invalid(key, message))?;
        self.validate_registry()
            .map_err(|(key, message)| invalid(key, message))?;
        let regions = self.regions();
        for (i, n) in self.nodes.iter().enumerate() {
            for (j, f) in n.forward_origins.iter().enumerate() {
                if f == &n.name || self.node(f).is_none() {
                    return Err(invalid(
                        format!("nodes[{i}].forward_origins[{j}]"),
                        format!("{f:?} is not another node of the cluster"),
                    ));
                }
            }
            for (j, r) in n.read_regions.iter().flatten().enumerate() {
                if !regions.contains(r) {
                    return Err(invalid(
                        format!("nodes[{i}].read_regions[{j}]"),
                        format!("{r:?} is not the region of any node"),
                    ));
                }
            }
        }
        // Every node must get every other node's changes by exactly one path: none would leave
        // it behind for good, two would apply them twice from two streams.
        for (i, target) in self.nodes.iter().enumerate() {
            for origin in self.nodes.iter().filter(|o| o.name != target.name) {
                let carriers: Vec<&str> = self.carriers(target, &origin.name).iter().map(|c| c.name.as_str()).collect();
                let message = match carriers.as_slice() {
                    [_] => continue,
                    [] => format!(
                        "node {} would never receive {}'s changes: it reads neither {}'s region {:?} nor the region of a node that forwards them",
                        target.name, origin.name, origin.name, origin.region
                    ),
                    many => format!(
                        "node {} would receive {}'s changes more than once, from the partitions of {}; read only one of their regions",
                        target.name,
                        origin.name,
                        many.join(" and ")
                    ),
                };
                return Err(invalid(format!("nodes[{i}].read_regions"), message));
            }
        }
        let mut taken: HashSet<(&str, i32)> = HashSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let p = self.node_partition(n);
            if !(0..self.kafka.partitions).contains(&p) {
                let (key, what) = match n.partition {
                    Some(_) => (format!("nodes[{i}].partition"), format!("{p}")),
                    None => ("kafka.partitions".to_string(), format!("{}", self.kafka.partitions)),
                };
                return Err(invalid(
                    key,
                    format!(
                        "{what}: node {} needs partition {p} of region {:?}'s topic, which has partitions 0–{}",
                        n.name,
                        n.region,
                        self.kafka.partitions - 1
                    ),
                ));
            }
            if !taken.insert((n.region.as_str(), p)) {
                return Err(invalid(
                    format!("nodes[{i}].partition"),
                    format!(
                        "node {} would write partition {p} of region {:?}, which another node of the region writes; set `partition` to a free one",
                        n.name, n.region
                    ),
                ));
            }
        }
        let tables: Vec<(String, String)> = self.replication.tables.iter().map(|t| qualify(t)).collect();
        for (name, options) in &self.replication.table {
            if !tables.contains(&qualify(name)) {
                return Err(invalid(
                    format!("replication.table.{name:?}"),
                    format!("{name:?} is not in replication.tables"),
                ));
            }
            if let Some(r) = &options.region {
                if !self.regions().contains(r) {
                    return Err(invalid(
                        format!("replication.table.{name:?}.region"),
                        format!("{r:?} is not the region of any node"),
                    ));
                }
            }
            if options.columns.as_ref().is_some_and(|c| c.is_empty() || c.iter().any(|c| c.is_empty())) {
                return Err(invalid(
                    format!("replication.table.{name:?}.columns"),
                    "lists no column, or an empty name".into(),
                ));
            }
            if options.operations.as_ref().is_some_and(Vec::is_empty) {
                return Err(invalid(
                    format!("replication.table.{name:?}.operations"),
                    "lists no operation (remove the table from replication.tables instead)".into(),
                ));
            }
            if options.row_filter.as_ref().is_some_and(|f| f.trim().is_empty()) {
                return Err(invalid(format!("replication.table.{name:?}.row_filter"), "is empty".into()));
            }
        }
        if self.replication.tables.is_empty() && self.replication.schemas.is_empty() {
            return Err(invalid(
                "replication.tables".into(),
                "lists no table (and replication.schemas no schema)".into(),
            ));
        }
        if !self.replication.schemas.is_empty() && !self.replication.ddl {
            return Err(invalid(
                "replication.schemas".into(),
                "needs `ddl = true` in [replication]: a table created in such a schema reaches the other nodes as replicated DDL".into(),
            ));
        }
        for (i, s) in self.replication.schemas.iter().enumerate() {
            if s.is_empty() || s.contains('.') {
                return Err(invalid(format!("replication.schemas[{i}]"), format!("{s:?} is not a schema name")));
            }
            if ["pgferry", "pg_catalog", "information_schema"].contains(&s.as_str()) || s.starts_with("pg_") {
                return Err(invalid(
                    format!("replication.schemas[{i}]"),
                    format!("{s:?} is a system or pgferry's own schema; it cannot be replicated"),
                ));
            }
        }
        for (i, t) in self.replication.tables.iter().enumerate() {
            if t.is_empty() || t.split('.').count() > 2 || t.split('.').any(str::is_empty) {
                return Err(invalid(
                    format!("replication.tables[{i}]"),
                    format!("{t:?} is not schema.table"),
                ));
            }
        }
        Ok(())
    }

    /// The nodes whose partitions carry `origin`'s changes to `target`: `origin` itself if
    /// `target` reads its region, and every node that forwards `origin` in a region `target`
    /// reads. A valid config has exactly one for every pair of distinct nodes.
    pub fn carriers(&self, target: &NodeConfig, origin: &str) -> Vec<&NodeConfig> {
        self.nodes
            .iter()
            .filter(|c| c.name != target.name && target.reads_region(&c.region))
            .filter(|c| c.name == origin || c.forward_origins.iter().any(|f| f == origin))
            .collect()
    }

    /// The nodes whose partitions `target`'s apply reads: every other node in a region it reads.
    pub fn sources(&self, target: &NodeConfig) -> Vec<&NodeConfig> {
        self.nodes
            .iter()
            .filter(|c| c.name != target.name && target.reads_region(&c.region))
            .collect()
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The node with id `id`.
    pub fn node_by_id(&self, id: u16) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Distinct regions in order of first appearance.
    pub fn regions(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for n in &self.nodes {
            if !out.contains(&n.region) {
                out.push(n.region.clone());
            }
        }
        out
    }

    /// The data topic of a region.
    pub fn region_topic(&self, region: &str) -> String {
        pgferry_schemas::naming::region_topic(&self.cluster.name, region)
    }

    /// The partition a node writes: its `partition` if set, else its index among its region's
    /// nodes.
    pub fn node_partition(&self, node: &NodeConfig) -> i32 {
        node.partition.unwrap_or_else(|| {
            self.nodes
                .iter()
                .filter(|n| n.region == node.region)
                .position(|n| n.name == node.name)
                .unwrap_or(0) as i32
        })
    }

    /// The node that writes `partition` of `region`'s topic.
    pub fn partition_node(&self, region: &str, partition: i32) -> Option<&NodeConfig> {
        self.nodes
            .iter()
            .find(|n| n.region == region && self.node_partition(n) == partition)
    }

    /// Replicated tables named exactly in `replication.tables`, as `(schema, table)` (patterns
    /// left out: [`Config::table_patterns`]).
    pub fn tables(&self) -> Vec<(String, String)> {
        self.replication.tables.iter().filter(|t| !is_pattern(t)).map(|t| qualify(t)).collect()
    }

    /// The patterns of `replication.tables` (`*` any run of characters, `?` one), as
    /// `(schema, table)` patterns.
    pub fn table_patterns(&self) -> Vec<(String, String)> {
        self.replication.tables.iter().filter(|t| is_pattern(t)).map(|t| qualify(t)).collect()
    }

    /// Whether `schema.table` replicates: named in `replication.tables`, matched by one of its
    /// patterns, or in a schema replicated whole (wherever it is local to).
    pub fn replicates_table(&self, schema: &str, table: &str) -> bool {
        self.replicates_schema(schema)
            || self
                .replication
                .tables
                .iter()
                .map(|t| qualify(t))
                .any(|(s, t)| glob_match(&s, schema) && glob_match(&t, table))
    }

    /// Whether `node` captures and applies `schema.table`: it replicates and is not local to
    /// another region.
    pub fn node_replicates(&self, node: &NodeConfig, schema: &str, table: &str) -> bool {
        self.replicates_table(schema, table) && !self.local_elsewhere(node, schema, table)
    }

    /// The tables named exactly that `node` captures and applies: all but those local to
    /// another region. (Tables matched by patterns or in schemas replicated whole are found in
    /// the node's catalog: `postgres::replicated_tables`.)
    pub fn node_tables(&self, node: &NodeConfig) -> Vec<(String, String)> {
        self.tables()
            .into_iter()
            .filter(|(s, t)| !self.local_elsewhere(node, s, t))
            .collect()
    }

    /// Whether `schema` is replicated whole (`replication.schemas`).
    pub fn replicates_schema(&self, schema: &str) -> bool {
        self.replication.schemas.iter().any(|s| s == schema)
    }

    /// Whether `schema.table` is region-local to a region other than `node`'s.
    pub fn local_elsewhere(&self, node: &NodeConfig, schema: &str, table: &str) -> bool {
        self.table_options(schema, table)
            .and_then(|o| o.region.as_deref())
            .is_some_and(|r| r != node.region)
    }

    /// The publication's entry for `schema.table`: the quoted name, its column list and row
    /// filter (`"s"."t" ("a", "b") WHERE (…)`).
    pub fn publication_entry(&self, schema: &str, table: &str) -> String {
        let q = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
        let mut entry = format!("{}.{}", q(schema), q(table));
        if let Some(o) = self.table_options(schema, table) {
            if let Some(cols) = &o.columns {
                entry += &format!(" ({})", cols.iter().map(|c| q(c)).collect::<Vec<_>>().join(", "));
            }
            if let Some(f) = &o.row_filter {
                entry += &format!(" WHERE ({f})");
            }
        }
        entry
    }

    /// The delta columns of `schema.table`.
    pub fn delta_columns(&self, schema: &str, table: &str) -> Vec<String> {
        self.table_options(schema, table).map(|o| o.delta_columns.clone()).unwrap_or_default()
    }

    /// The options of `schema.table`: its own entry, else that of the first pattern matching it.
    fn table_options(&self, schema: &str, table: &str) -> Option<&TableOptions> {
        let exact = self
            .replication
            .table
            .iter()
            .find(|(name, _)| !is_pattern(name) && qualify(name) == (schema.to_string(), table.to_string()));
        exact
            .or_else(|| {
                self.replication.table.iter().find(|(name, _)| {
                    let (s, t) = qualify(name);
                    is_pattern(name) && glob_match(&s, schema) && glob_match(&t, table)
                })
            })
            .map(|(_, o)| o)
    }

    /// Whether changes of kind `op` to `schema.table` replicate.
    pub fn replicates_operation(&self, schema: &str, table: &str, op: Operation) -> bool {
        self.table_options(schema, table)
            .and_then(|o| o.operations.as_ref())
            .is_none_or(|ops| ops.contains(&op))
    }

    /// The conflict resolver of `schema.table`.
    pub fn resolver(&self, schema: &str, table: &str) -> Resolver {
        self.table_options(schema, table)
            .and_then(|o| o.resolver)
            .unwrap_or(self.replication.resolver)
    }

    /// What apply does with a rejected change of `schema.table`.
    pub fn on_error(&self, schema: &str, table: &str) -> OnError {
        self.table_options(schema, table)
            .and_then(|o| o.on_error)
            .unwrap_or(self.replication.on_error)
    }

    /// Every secret in the configuration, for scrubbing output: DSN passwords,
    /// `kafka.sasl_password`, `kafka.ssl_key_password`, `registry.password`, and
    /// `[kafka.properties]` values whose name says password or secret.
    pub fn secrets(&self) -> Secrets {
        let mut out = Secrets::default();
        for n in &self.nodes {
            if let Some(rest) = n.dsn.split("://").nth(1) {
                if let Some((userinfo, _)) = rest.rsplit_once('@') {
                    if let Some((_, pw)) = userinfo.split_once(':') {
                        out.dsn_passwords.push(pw.to_string());
                    }
                }
            }
            for kv in n.dsn.split_whitespace() {
                if let Some(pw) = kv.strip_prefix("password=") {
                    out.dsn_passwords.push(pw.to_string());
                }
            }
        }
        let k = &self.kafka;
        let named = [&k.sasl_password, &k.ssl_key_password, &self.registry.password];
        out.values.extend(named.into_iter().flatten().cloned());
        out.values.extend(
            k.properties
                .iter()
                .filter(|(name, _)| name.contains("password") || name.contains("secret"))
                .map(|(_, v)| v.clone()),
        );
        out.values.retain(|v| !v.is_empty());
        out
    }

    /// `[kafka]` security keys: each needs the protocol it belongs to, SASL needs its
    /// mechanism and credentials, files must be readable, and `[kafka.properties]` may not set
    /// the same librdkafka property. The offending key and why.
    fn validate_kafka_security(&self) -> Result<(), (String, String)> {
        let k = &self.kafka;
        let p = k.security_protocol;
        let sasl_keys = [
            ("kafka.sasl_mechanism", k.sasl_mechanism.is_some()),
            ("kafka.sasl_username", k.sasl_username.is_some()),
            ("kafka.sasl_password", k.sasl_password.is_some()),
        ];
        let ssl_keys = [
            ("kafka.ssl_ca_file", k.ssl_ca_file.is_some()),
            ("kafka.ssl_cert_file", k.ssl_cert_file.is_some()),
            ("kafka.ssl_key_file", k.ssl_key_file.is_some()),
            ("kafka.ssl_key_password", k.ssl_key_password.is_some()),
        ];
        let wrong_protocol = |key: &str, wants: &str| {
            (
                key.to_string(),
                format!("is set but kafka.security_protocol is {}; it needs {wants}", p.name()),
            )
        };
        if let Some((key, _)) = sasl_keys.iter().find(|(_, set)| *set && !p.sasl()) {
            return Err(wrong_protocol(key, "SASL_SSL or SASL_PLAINTEXT"));
        }
        if let Some((key, _)) = ssl_keys.iter().find(|(_, set)| *set && !p.tls()) {
            return Err(wrong_protocol(key, "SSL or SASL_SSL"));
        }
        if p.sasl() {
            if let Some((key, _)) = sasl_keys.iter().find(|(_, set)| !*set) {
                return Err((
                    key.to_string(),
                    format!("is required with kafka.security_protocol {}", p.name()),
                ));
            }
            if k.sasl_username.as_deref().is_some_and(str::is_empty) {
                return Err(("kafka.sasl_username".into(), "is empty".into()));
            }
        }
        if k.ssl_cert_file.is_some() != k.ssl_key_file.is_some() {
            let key = if k.ssl_cert_file.is_some() {
                "kafka.ssl_key_file"
            } else {
                "kafka.ssl_cert_file"
            };
            return Err((
                key.into(),
                "kafka.ssl_cert_file and kafka.ssl_key_file go together".into(),
            ));
        }
        let files = [
            ("kafka.ssl_ca_file", &k.ssl_ca_file),
            ("kafka.ssl_cert_file", &k.ssl_cert_file),
            ("kafka.ssl_key_file", &k.ssl_key_file),
        ];
        for (key, file) in files {
            if let Some(f) = file {
                readable(f).map_err(|m| (key.to_string(), m))?;
            }
        }
        for (property, _) in k.security_properties() {
            if k.properties.contains_key(property) {
                return Err((
                    format!("kafka.properties.{property:?}"),
                    "is set by pgferry's own [kafka] security keys; use those (e.g. kafka.security_protocol)".into(),
                ));
            }
        }
        for (property, why) in crate::kafka::OWNED_PROPERTIES {
            if k.properties.contains_key(property) {
                return Err((format!("kafka.properties.{property:?}"), format!("is set by pgferry itself ({why}); remove it")));
            }
        }
        Ok(())
    }

    /// `[registry]`: basic auth needs both user name and password; `ca_file` must be readable
    /// and belongs to an `https` URL.
    fn validate_registry(&self) -> Result<(), (String, String)> {
        let r = &self.registry;
        if !(r.url.starts_with("http://") || r.url.starts_with("https://")) {
            return Err((
                "registry.url".into(),
                format!("{:?} is not an http:// or https:// URL", r.url),
            ));
        }
        match (&r.username, &r.password) {
            (Some(_), None) => return Err(("registry.password".into(), "is required with registry.username".into())),
            (None, Some(_)) => return Err(("registry.username".into(), "is required with registry.password".into())),
            _ => {}
        }
        if let Some(f) = &r.ca_file {
            if !r.url.starts_with("https://") {
                return Err((
                    "registry.ca_file".into(),
                    "is set but registry.url is not https://".into(),
                ));
            }
            readable(f).map_err(|m| ("registry.ca_file".to_string(), m))?;
        }
        Ok(())
    }
}

/// The secrets of a configuration ([`Config::secrets`]), for [`Secrets::scrub`].
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    /// Passwords of DSNs: scrubbed where a connection string carries them (`:pw@`,
    /// `password=pw`), so that a short one such as `pgferry` does not blank ordinary words.
    pub dsn_passwords: Vec<String>,
    /// Values of secret keys (SASL, key and registry passwords): scrubbed wherever they occur.
    pub values: Vec<String>,
}

impl Secrets {
    /// `text` with every secret replaced by `***`.
    pub fn scrub(&self, text: &str) -> String {
        let dsn: Vec<&str> = self.dsn_passwords.iter().map(String::as_str).collect();
        let mut out = crate::redact::scrub(text, &dsn);
        for v in self.values.iter().filter(|v| !v.is_empty()) {
            out = out.replace(v.as_str(), "***");
        }
        out
    }

    /// Every secret, for tests and checks.
    pub fn all(&self) -> impl Iterator<Item = &str> {
        self.dsn_passwords.iter().chain(&self.values).map(String::as_str)
    }
}

/// `Ok` if `path` is a readable file; else what is wrong, naming the path.
pub(crate) fn readable(path: &Path) -> Result<(), String> {
    std::fs::File::open(path)
        .map(|_| ())
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Whether a `replication.tables` entry is a pattern.
fn is_pattern(name: &str) -> bool {
    name.contains(['*', '?'])
}

/// Whether `text` matches the glob `pattern` (`*` any run of characters, `?` one character;
/// nothing else is special, so a plain name matches only itself).
fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    // Iterative matching with one backtrack point (the last `*`): linear in practice.
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// `schema.table` or `table` (meaning `public.table`) as `(schema, table)`.
fn qualify(name: &str) -> (String, String) {
    match name.split_once('.') {
        Some((s, n)) => (s.to_string(), n.to_string()),
        None => ("public".to_string(), name.to_string()),
    }
}

impl NodeConfig {
    /// The validated [`NodeConfig::metrics_listen`] address.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listen.as_deref().and_then(|s| parse_listen(s).ok())
    }
}

/// Parses a listen address `ip:port` (`127.0.0.1:9187`, `0.0.0.0:9187`, `[::1]:9187`); the
/// error says what is expected.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    text.trim()
        .parse::<SocketAddr>()
        .map_err(|_| format!("{text:?} is not an ip:port listen address (e.g. \"127.0.0.1:9187\" or \"[::]:9187\")"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[cluster]
name = "demo"
[kafka]
bootstrap_servers = "127.0.0.1:19092"
[registry]
url = "http://127.0.0.1:18081/apis/ccompat/v7"
[[nodes]]
name = "n1"
id = 1
region = "eu"
dsn = "postgres://postgres:${PGFERRY_TEST_PW}@127.0.0.1:55431/demo"
[[nodes]]
name = "n2"
id = 2
region = "eu"
dsn = "postgres://postgres:x@127.0.0.1:55432/demo"
[replication]
tables = ["public.accounts", "items"]
"#;

    #[test]
    fn parses_and_interpolates() {
        std::env::set_var("PGFERRY_TEST_PW", "pw1");
        let c = Config::parse(GOOD, "t.toml").unwrap();
        assert_eq!(c.nodes[0].dsn, "postgres://postgres:pw1@127.0.0.1:55431/demo");
        assert_eq!(c.tables()[1], ("public".to_string(), "items".to_string()));
        assert_eq!(c.node_partition(&c.nodes[1]), 1);
        assert_eq!(c.region_topic("eu"), "demo.eu.changes");
        assert!(c.secrets().dsn_passwords.contains(&"pw1".to_string()));
    }

    #[test]
    fn metrics_listen_is_validated() {
        std::env::set_var("PGFERRY_TEST_PW", "pw1");
        let with = |v: &str| GOOD.replace("id = 2\n", &format!("id = 2\nmetrics_listen = \"{v}\"\n"));
        let c = Config::parse(&with("127.0.0.1:9187"), "t.toml").unwrap();
        assert_eq!(c.nodes[1].metrics_addr(), Some("127.0.0.1:9187".parse().unwrap()));
        assert_eq!(c.nodes[0].metrics_addr(), None);
        assert!(Config::parse(&with("[::]:9187"), "t.toml").is_ok());
        for bad in ["9187", "localhost:9187", "127.0.0.1", "127.0.0.1:99999", ""] {
            let e = Config::parse(&with(bad), "t.toml").unwrap_err().to_string();
            assert!(
                e.contains("t.toml: nodes[1].metrics_listen:") && e.contains("ip:port"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn max_clock_skew_is_bounded() {
        std::env::set_var("PGFERRY_TEST_PW", "pw1");
        assert_eq!(Config::parse(GOOD, "t.toml").unwrap().apply.max_clock_skew_ms, 5000);
        let with = |ms: u64| format!("{GOOD}[apply]\nmax_clock_skew_ms = {ms}\n");
        assert_eq!(Config::parse(&with(0), "t.toml").unwrap().apply.max_clock_skew_ms, 0);
        assert!(Config::parse(&with(60_000), "t.toml").is_ok());
        let e = Config::parse(&with(60_001), "t.toml").unwrap_err().to_string();
        assert!(e.contains("t.toml: apply.max_clock_skew_ms:") && e.contains("60000"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        std::env::set_var("PGFERRY_TEST_PW", "pw1");
        let unknown = GOOD.replace("[cluster]\n", "[cluster]\ncolour = \"red\"\n");
        let e = Config::parse(&unknown, "t.toml").unwrap_err().to_string();
        assert!(e.contains("colour") && e.contains("t.toml"), "{e}");
        let missing = GOOD.replacen("region = \"eu\"\n", "", 1);
        let e = Config::parse(&missing, "t.toml").unwrap_err().to_string();
        assert!(e.contains("region"), "{e}");
        let dup = GOOD.replace("id = 2", "id = 1");
        let e = Config::parse(&dup, "t.toml").unwrap_err().to_string();
        assert!(e.contains("nodes[1].id"), "{e}");
        let e = Config::parse(&GOOD.replace("PGFERRY_TEST_PW", "PGFERRY_NOPE_X"), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("PGFERRY_NOPE_X"), "{e}");
        let resolver = GOOD.replace("[replication]\n", "[replication]\nresolver = \"coin_flip\"\n");
        let e = Config::parse(&resolver, "t.toml").unwrap_err().to_string();
        assert!(e.contains("coin_flip") && e.contains("last_update_wins"), "{e}");
        let stray = format!("{GOOD}[replication.table.\"public.nope\"]\nresolver = \"manual\"\n");
        let e = Config::parse(&stray, "t.toml").unwrap_err().to_string();
        assert!(e.contains("replication.table.\"public.nope\""), "{e}");
    }

    #[test]
    fn table_patterns_match_and_carry_options() {
        std::env::set_var("PGFERRY_TEST_PW", "pw1");
        let text = GOOD.replace("\"items\"]", "\"items\", \"public.log_*\", \"app?.t\"]")
            + "[replication.table.\"public.log_*\"]\noperations = [\"insert\"]\n";
        let c = Config::parse(&text, "t.toml").unwrap();
        assert_eq!(c.tables().len(), 2, "patterns are not exact tables");
        assert!(c.replicates_table("public", "log_2026") && c.replicates_table("public", "log_"));
        assert!(c.replicates_table("app1", "t") && !c.replicates_table("app12", "t"));
        assert!(!c.replicates_table("public", "logs") && !c.replicates_table("public", "other"));
        assert!(!c.replicates_operation("public", "log_a", Operation::Delete));
        assert!(c.replicates_operation("public", "items", Operation::Delete));
        for (p, t, want) in [("a*b*c", "aXbYc", true), ("a*b*c", "abc", true), ("a*c", "ab", false), ("*", "", true), ("a?", "a", false)] {
            assert_eq!(glob_match(p, t), want, "{p} {t}");
        }
    }

    #[test]
    fn partitions_can_be_pinned() {
        std::env::set_var("PGFERRY_TEST_PW", "pw1");
        let pinned = GOOD.replace("id = 2\n", "id = 2\npartition = 5\n");
        let c = Config::parse(&pinned, "t.toml").unwrap();
        assert_eq!(c.node_partition(&c.nodes[1]), 5);
        assert_eq!(c.partition_node("eu", 5).map(|n| n.name.as_str()), Some("n2"));
        assert!(c.partition_node("eu", 1).is_none());
        let clash = GOOD.replace("id = 2\n", "id = 2\npartition = 0\n");
        let e = Config::parse(&clash, "t.toml").unwrap_err().to_string();
        assert!(e.contains("nodes[1].partition") && e.contains("partition 0"), "{e}");
        let outside = GOOD.replace("id = 2\n", "id = 2\npartition = 8\n");
        let e = Config::parse(&outside, "t.toml").unwrap_err().to_string();
        assert!(e.contains("nodes[1].partition") && e.contains("0–7"), "{e}");
        let few = GOOD.replace("[kafka]\n", "[kafka]\npartitions = 1\n");
        let e = Config::parse(&few, "t.toml").unwrap_err().to_string();
        assert!(e.contains("kafka.partitions") && e.contains("n2"), "{e}");
    }

    #[test]
    fn resolvers_per_table() {
        std::env::set_var("PGFERRY_TEST_PW", "pw1");
        let text = format!("{GOOD}[replication.table.items]\nresolver = \"manual\"\n");
        let c = Config::parse(&text, "t.toml").unwrap();
        assert_eq!(c.resolver("public", "items"), Resolver::Manual);
        assert_eq!(c.resolver("public", "accounts"), Resolver::LastUpdateWins);
        assert_eq!(c.on_error("public", "items"), OnError::Stop);
        let text = format!("{GOOD}on_error = \"skip_change\"\n[replication.table.items]\non_error = \"skip_transaction\"\n");
        let c = Config::parse(&text, "t.toml").unwrap();
        assert_eq!(c.on_error("public", "items"), OnError::SkipTransaction);
        assert_eq!(c.on_error("public", "accounts"), OnError::SkipChange);
        let text = format!("{GOOD}[replication.table.items]\noperations = [\"insert\", \"update\"]\n");
        let c = Config::parse(&text, "t.toml").unwrap();
        assert!(c.replicates_operation("public", "items", Operation::Update));
        assert!(!c.replicates_operation("public", "items", Operation::Delete));
        assert!(c.replicates_operation("public", "accounts", Operation::Delete));
        let e = Config::parse(&text.replace("\"update\"]", "\"upsert\"]"), "t.toml").unwrap_err().to_string();
        assert!(e.contains("upsert") && e.contains("truncate"), "{e}");
    }

    #[test]
    fn replicated_schemas_are_checked() {
        std::env::set_var("PGFERRY_TEST_PW", "pw1");
        let text = GOOD.replace("tables = [\"public.accounts\", \"items\"]", "schemas = [\"app\"]");
        let e = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(e.contains("replication.schemas") && e.contains("ddl = true"), "{e}");
        let text = text.replace("schemas = [\"app\"]", "schemas = [\"app\"]\nddl = true");
        let c = Config::parse(&text, "t.toml").unwrap();
        assert!(c.replicates_schema("app") && !c.replicates_schema("public"));
        let own = GOOD.replace("tables = [\"public.accounts\", \"items\"]", "schemas = [\"pgferry\"]\nddl = true");
        let e = Config::parse(&own, "t.toml").unwrap_err().to_string();
        assert!(e.contains("replication.schemas[0]") && e.contains("pgferry"), "{e}");
        let none = GOOD.replace("tables = [\"public.accounts\", \"items\"]", "");
        let e = Config::parse(&none, "t.toml").unwrap_err().to_string();
        assert!(e.contains("replication.tables"), "{e}");
    }

    #[test]
    fn retention_is_milliseconds_or_forever() {
        std::env::set_var("PGFERRY_TEST_PW", "pw1");
        let with = |v: &str| GOOD.replace("[registry]", &format!("retention_ms = {v}\n[registry]"));
        assert_eq!(Config::parse(&with("604800000"), "t.toml").unwrap().kafka.retention_ms, Some(604_800_000));
        assert_eq!(Config::parse(&with("-1"), "t.toml").unwrap().kafka.retention_ms, Some(-1));
        assert_eq!(Config::parse(GOOD, "t.toml").unwrap().kafka.retention_ms, None);
        let e = Config::parse(&with("0"), "t.toml").unwrap_err().to_string();
        assert_eq!(e, "config t.toml: kafka.retention_ms: 0: use a number of milliseconds, or -1 to keep events forever");
    }

    #[test]
    fn kafka_security_keys_are_checked_and_mapped() {
        std::env::set_var("PGFERRY_TEST_PW", "pw1");
        let bootstrap = "bootstrap_servers = \"127.0.0.1:19092\"\n";
        let with = |extra: &str| GOOD.replace(bootstrap, &format!("{bootstrap}{extra}\n"));
        let sasl = "security_protocol = \"SASL_PLAINTEXT\"\nsasl_mechanism = \"SCRAM-SHA-512\"\nsasl_username = \"u\"\nsasl_password = \"Sasl-Pw-1\"";
        let c = Config::parse(&with(sasl), "t.toml").unwrap();
        let props = c.kafka.security_properties();
        assert!(props.contains(&("security.protocol", "SASL_PLAINTEXT".into())), "{props:?}");
        assert!(props.contains(&("sasl.mechanisms", "SCRAM-SHA-512".into())), "{props:?}");
        assert!(c.secrets().values.contains(&"Sasl-Pw-1".to_string()));
        assert_eq!(c.secrets().scrub("login Sasl-Pw-1 failed"), "login *** failed");
        let props = "[kafka.properties]\n\"sasl.oauthbearer.client.secret\" = \"Prop-Secret-1\"";
        let c = Config::parse(&with(props), "t.toml").unwrap();
        assert_eq!(c.secrets().scrub("x Prop-Secret-1 y, postgres://u:pw1@h"), "x *** y, postgres://u:***@h");
        assert_eq!(c.secrets().scrub("pw1 alone stays"), "pw1 alone stays", "DSN passwords only in DSN forms");
        let cases = [
            ("sasl_username = \"u\"", "kafka.sasl_username", "SASL_SSL"),
            ("security_protocol = \"SASL_SSL\"\nsasl_mechanism = \"PLAIN\"", "kafka.sasl_username", "required"),
            ("ssl_ca_file = \"/x\"", "kafka.ssl_ca_file", "SSL or SASL_SSL"),
            ("security_protocol = \"SSL\"\nssl_ca_file = \"/nonexistent/ca.pem\"", "kafka.ssl_ca_file", "/nonexistent/ca.pem"),
            ("security_protocol = \"SSL\"\nssl_cert_file = \"/x\"", "kafka.ssl_key_file", "together"),
            ("security_protocol = \"TLS\"", "TLS", "SASL_SSL"),
            ("[kafka.properties]\n\"security.protocol\" = \"SSL\"", "kafka.properties.\"security.protocol\"", "security_protocol"),
            ("[kafka.properties]\n\"isolation.level\" = \"read_uncommitted\"", "kafka.properties.\"isolation.level\"", "committed"),
        ];
        for (extra, key, words) in cases {
            let e = Config::parse(&with(extra), "t.toml").unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(words), "{extra}: {e}");
        }
    }

    #[test]
    fn registry_keys_are_checked() {
        std::env::set_var("PGFERRY_TEST_PW", "pw1");
        let with = |extra: &str| GOOD.replace("/apis/ccompat/v7\"\n", &format!("/apis/ccompat/v7\"\n{extra}\n"));
        let c = Config::parse(&with("username = \"u\"\npassword = \"Reg-Pw-1\""), "t.toml").unwrap();
        assert!(c.secrets().values.contains(&"Reg-Pw-1".to_string()));
        let e = Config::parse(&with("username = \"u\""), "t.toml").unwrap_err().to_string();
        assert!(e.contains("registry.password"), "{e}");
        let e = Config::parse(&with("ca_file = \"/x\""), "t.toml").unwrap_err().to_string();
        assert!(e.contains("registry.ca_file") && e.contains("https"), "{e}");
    }

    #[test]
    fn file_secrets_name_key_and_path() {
        std::env::set_var("PGFERRY_TEST_PW", "pw1");
        let text = GOOD.replace("${PGFERRY_TEST_PW}", "${file:/nonexistent/pgferry-pw}");
        let e = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(e.contains("t.toml") && e.contains("nodes[0].dsn") && e.contains("/nonexistent/pgferry-pw"), "{e}");
        let e = Config::parse(&GOOD.replace("/demo\"\n[[nodes]]", "/demo?sslmode=verify-full&sslrootcert=/nonexistent/ca\"\n[[nodes]]"), "t.toml");
        let e = e.unwrap_err().to_string();
        assert!(e.contains("nodes[0].dsn") && e.contains("sslrootcert") && e.contains("/nonexistent/ca"), "{e}");
    }

    /// `deploy/pgferry.example.toml`, the documented example of every key.
    const EXAMPLE: &str = include_str!("../../deploy/pgferry.example.toml");

    /// Tables whose keys are names the user picks (not struct fields): their entries are
    /// compared as one, `*`. A map missing here is compared entry by entry, which is stricter.
    const MAPS: [&str; 2] = ["kafka.properties", "replication.table"];

    /// The example with its switched-off settings (`# key = value`, `# [section]`) switched on.
    fn example_uncommented() -> String {
        EXAMPLE
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest) if is_setting(rest) => rest,
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Whether a line (without its `# `) is a TOML setting or table header rather than prose.
    fn is_setting(line: &str) -> bool {
        line.starts_with('[')
            || line.split_once(" = ").is_some_and(|(key, _)| {
                !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || "_.-\"".contains(c))
            })
    }

    /// Every key path of a TOML or JSON document: `a.b`, array elements as `a[]`, the entries
    /// of [`MAPS`] as `*`.
    fn key_paths(value: &serde_json::Value, path: &str, out: &mut std::collections::BTreeSet<String>) {
        match value {
            serde_json::Value::Object(entries) => {
                for (key, v) in entries {
                    let key = if MAPS.contains(&path) { "*" } else { key.as_str() };
                    let p = if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
                    out.insert(p.clone());
                    key_paths(v, &p, out);
                }
            }
            serde_json::Value::Array(items) => {
                for v in items {
                    key_paths(v, &format!("{path}[]"), out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn example_config_loads_and_validates() {
        std::env::set_var("PGFERRY_PASSWORD", "example-pw");
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/pgferry.example.toml");
        let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.nodes.len(), 3);
        assert_eq!(c.regions(), ["eu", "us"]);
        assert!(c.secrets().dsn_passwords.contains(&"example-pw".to_string()));
    }

    /// Every key the config structs accept is in the example, set or switched off (`# key =`):
    /// the example's settings all switched on are parsed into a [`Config`] (an unknown key
    /// fails), which is serialized back with every field, defaults and `None`s included; each
    /// of its key paths must be one the example writes. So a field added to a struct fails
    /// here until the example documents it. (`Serialize` is derived for this test only.)
    #[test]
    fn example_config_has_every_key() {
        let text = example_uncommented();
        let full: Config = toml::from_str(&text).unwrap_or_else(|e| panic!("the example with every setting on: {e}"));
        let written: toml::Value = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
        let written = serde_json::to_value(written).unwrap_or_else(|e| panic!("{e}"));
        let known = serde_json::to_value(&full).unwrap_or_else(|e| panic!("{e}"));
        let (mut have, mut need) = (Default::default(), Default::default());
        key_paths(&written, "", &mut have);
        key_paths(&known, "", &mut need);
        let missing: Vec<&String> = need.difference(&have).collect();
        assert!(missing.is_empty(), "keys missing from deploy/pgferry.example.toml: {missing:?}");
        assert!(need.contains("replication.table.*.delta_columns") && need.contains("nodes[].partition"), "{need:?}");
    }

    /// Every setting of the example, on or off, has a comment: on its line, or on the line
    /// before (a comment block explains the key after it).
    #[test]
    fn example_config_comments_every_key() {
        let mut previous_is_comment = false;
        for line in EXAMPLE.lines() {
            let setting = line.strip_prefix("# ").unwrap_or(line);
            if is_setting(setting) && !setting.starts_with('[') {
                let commented = setting.contains(" # ") || previous_is_comment;
                assert!(commented, "no comment explains {line:?}");
            }
            // A table header leaves it as it was: the comment before `# [kafka.properties]`
            // explains the property under it.
            if !setting.starts_with('[') {
                previous_is_comment = line.starts_with('#') && !is_setting(setting);
            }
        }
    }

    /// n1 (region a) → hub n2 (forwards n1) → n3 (reads only the hub).
    fn cascade(n3_reads: &str) -> String {
        format!(
            r#"
[cluster]
name = "demo"
[kafka]
bootstrap_servers = "127.0.0.1:19092"
[registry]
url = "http://127.0.0.1:18081/apis/ccompat/v7"
[[nodes]]
name = "n1"
id = 1
region = "a"
dsn = "postgres://127.0.0.1:55431/demo"
[[nodes]]
name = "n2"
id = 2
region = "hub"
dsn = "postgres://127.0.0.1:55432/demo"
forward_origins = ["n1"]
[[nodes]]
name = "n3"
id = 3
region = "b"
dsn = "postgres://127.0.0.1:55433/demo"
read_regions = {n3_reads}
[replication]
tables = ["t"]
"#
        )
    }

    #[test]
    fn forwarding_paths_are_checked() {
        let c = Config::parse(&cascade(r#"["hub"]"#), "t.toml").unwrap();
        let n3 = &c.nodes[2];
        assert_eq!(c.carriers(n3, "n1")[0].name, "n2");
        assert_eq!(c.sources(n3).len(), 1);
        // n1 reads every region: n2 directly and n3 directly; its own forwarded changes come back
        // in n2's partition and are ignored there.
        assert_eq!(c.sources(&c.nodes[0]).len(), 2);
        let e = Config::parse(&cascade(r#"["hub", "a"]"#), "t.toml").unwrap_err().to_string();
        assert!(e.contains("nodes[2].read_regions") && e.contains("more than once"), "{e}");
        let e = Config::parse(&cascade(r#"["b"]"#), "t.toml").unwrap_err().to_string();
        assert!(e.contains("never receive"), "{e}");
        let e = Config::parse(&cascade(r#"["moon"]"#), "t.toml").unwrap_err().to_string();
        assert!(e.contains("nodes[2].read_regions[0]"), "{e}");
        let bad = cascade(r#"["hub"]"#).replace(r#"["n1"]"#, r#"["n9"]"#);
        let e = Config::parse(&bad, "t.toml").unwrap_err().to_string();
        assert!(e.contains("nodes[1].forward_origins[0]"), "{e}");
    }
}
