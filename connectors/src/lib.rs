//! Everything in pgferry that talks to an outside system.
//!
//! Contract: each module wraps one system behind a small typed API and returns errors that say
//! what failed and where (endpoint, key, table) without ever including a secret:
//! [`config`] reads and validates `pgferry.toml` ([`interpolate`] resolves its `${VAR}` and
//! `${file:PATH}` secrets); [`postgres`] opens SQL sessions (TLS by [`pg_tls`]);
//! [`replication`] streams pgoutput from a logical slot; [`kafka`] builds producers, consumers and
//! topics; [`registry`] registers and fetches Avro schemas through the Confluent REST API;
//! [`metrics`] holds the process's counters, gauges, histograms and health checks, which
//! [`http_endpoint`] serves as Prometheus `/metrics` and `/healthz`.

pub mod config;
pub mod http_endpoint;
pub mod interpolate;
pub mod kafka;
pub mod metrics;
pub mod pg_tls;
pub mod postgres;
pub mod redact;
pub mod registry;
pub mod replication;

pub use config::{Config, ConfigError, NodeConfig, Secrets};
pub use metrics::MetricsRegistry;
