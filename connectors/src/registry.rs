//! Schema registry client (Confluent REST API, e.g. Apicurio's `/apis/ccompat/v7`), with caches
//! so each schema is registered or fetched once per process; HTTP basic authentication and an
//! extra trusted CA for an `https` registry come from `[registry]`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use schema_registry_converter::async_impl::schema_registry::{get_schema_by_id, post_schema, SrSettings};
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};
use thiserror::Error;

use crate::config::RegistryConfig;

/// A registry failure, naming the registry URL and the subject or id.
#[derive(Debug, Error)]
pub enum RegistryError {
    /// The HTTP client could not be set up (an unreadable or invalid `ca_file`).
    #[error("schema registry {url}: {message}")]
    Client { url: String, message: String },
    /// Registering a schema failed.
    #[error("schema registry {url}: registering subject {subject}: {message}")]
    Register {
        url: String,
        subject: String,
        message: String,
    },
    /// A request (`GET <path>`) failed or was refused.
    #[error("schema registry {url}: GET {path}: {message}")]
    Request { url: String, path: String, message: String },
    /// Fetching a schema by id failed.
    #[error("schema registry {url}: fetching schema id {id}: {message}")]
    Fetch { url: String, id: u32, message: String },
}

impl RegistryError {
    /// The registry answered that the schema id does not exist (HTTP 404): no retry helps.
    /// Only the status line counts: the message also quotes the URL, whose port or schema id
    /// may hold "404" while the registry is merely unreachable (found by the registry-outage
    /// fault test, where apply dead-lettered every change it read from a registry on :28404).
    pub fn is_unknown_id(&self) -> bool {
        matches!(self, RegistryError::Fetch { message, .. } if message.contains("failed with status 404"))
    }
}

/// A cached registry client; cheap to clone.
#[derive(Clone)]
pub struct Registry {
    url: String,
    settings: SrSettings,
    /// For the requests the converter crate has no call for (compatibility, subjects).
    http: reqwest::Client,
    basic_auth: Option<(String, Option<String>)>,
    registered: Arc<Mutex<HashMap<(String, String), u32>>>,
    by_id: Arc<Mutex<HashMap<u32, Arc<String>>>>,
}

impl Registry {
    /// A client for the registry `cfg` describes: its URL, basic-auth credentials and CA file.
    pub fn new(cfg: &RegistryConfig) -> Result<Registry, RegistryError> {
        let url = cfg.url.trim_end_matches('/').to_string();
        let client_error = |message: String| RegistryError::Client {
            url: url.clone(),
            message,
        };
        let mut builder = SrSettings::new_builder(url.clone());
        if let Some(user) = &cfg.username {
            builder.set_basic_authorization(user, cfg.password.as_deref());
        }
        let settings = builder
            .build_with(http_builder(cfg, &url)?)
            .map_err(|e| client_error(format!("setting up the HTTP client: {}", describe(&e))))?;
        let http = http_builder(cfg, &url)?
            .timeout(std::time::Duration::from_secs(15))
            .build()
            .map_err(|e| client_error(format!("setting up the HTTP client: {e}")))?;
        Ok(Registry {
            settings,
            url,
            http,
            basic_auth: cfg.username.clone().map(|u| (u, cfg.password.clone())),
            registered: Arc::default(),
            by_id: Arc::default(),
        })
    }

    /// The registry's base URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Registers an Avro schema under `subject` (or finds it there) and returns its id.
    pub async fn register(&self, subject: &str, record_name: &str, schema_json: &str) -> Result<u32, RegistryError> {
        let key = (subject.to_string(), schema_json.to_string());
        if let Some(id) = self.registered.lock().ok().and_then(|m| m.get(&key).copied()) {
            return Ok(id);
        }
        let supplied = SuppliedSchema::new(Some(record_name.to_string()), SchemaType::Avro, schema_json.to_string());
        let registered = post_schema(&self.settings, subject.to_string(), supplied)
            .await
            .map_err(|e| RegistryError::Register {
                url: self.url.clone(),
                subject: subject.to_string(),
                message: describe(&e),
            })?;
        if let Ok(mut m) = self.registered.lock() {
            m.insert(key, registered.id);
        }
        if let Ok(mut m) = self.by_id.lock() {
            m.insert(registered.id, Arc::new(schema_json.to_string()));
        }
        Ok(registered.id)
    }

    /// The schema text with id `id`.
    pub async fn schema(&self, id: u32) -> Result<Arc<String>, RegistryError> {
        if let Some(s) = self.by_id.lock().ok().and_then(|m| m.get(&id).cloned()) {
            return Ok(s);
        }
        let fetched = get_schema_by_id(id, &self.settings)
            .await
            .map_err(|e| RegistryError::Fetch {
                url: self.url.clone(),
                id,
                message: describe(&e),
            })?;
        let s = Arc::new(fetched.schema);
        if let Ok(mut m) = self.by_id.lock() {
            m.insert(id, s.clone());
        }
        Ok(s)
    }
}

/// An HTTP client builder for the registry: the system's CAs plus `ca_file`'s.
fn http_builder(cfg: &RegistryConfig, url: &str) -> Result<reqwest::ClientBuilder, RegistryError> {
    let client_error = |message: String| RegistryError::Client {
        url: url.to_string(),
        message,
    };
    let mut http = reqwest::Client::builder().tls_backend_native();
    if let Some(file) = &cfg.ca_file {
        let pem = std::fs::read(file).map_err(|e| client_error(format!("ca_file {}: {e}", file.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| client_error(format!("ca_file {}: {e}", file.display())))?;
        if certs.is_empty() {
            return Err(client_error(format!(
                "ca_file {}: holds no PEM certificate",
                file.display()
            )));
        }
        for cert in certs {
            http = http.add_root_certificate(cert);
        }
    }
    Ok(http)
}

impl Registry {
    /// `GET <url>/<path>`: the JSON answer. A 404 is `Ok(None)`.
    async fn get_json(&self, path: &str) -> Result<Option<serde_json::Value>, RegistryError> {
        let err = |message: String| RegistryError::Request {
            url: self.url.clone(),
            path: path.to_string(),
            message,
        };
        let mut request = self.http.get(format!("{}/{path}", self.url));
        if let Some((user, password)) = &self.basic_auth {
            request = request.basic_auth(user, password.as_deref());
        }
        let response = request.send().await.map_err(|e| {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(c) = source {
                let t = c.to_string();
                if !text.contains(&t) {
                    text = format!("{text}: {t}");
                }
                source = c.source();
            }
            err(text)
        })?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let body = response.text().await.map_err(|e| err(e.to_string()))?;
        if !status.is_success() {
            let mut message = format!("HTTP {status}: {}", body.chars().take(200).collect::<String>());
            if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
                message += " (check registry.username and registry.password)";
            }
            return Err(err(message));
        }
        serde_json::from_str(&body)
            .map(Some)
            .map_err(|e| err(format!("the answer is not JSON ({e}): {}", body.chars().take(200).collect::<String>())))
    }

    /// The compatibility level (`NONE`, `BACKWARD`, …) of `subject`, or the global one.
    /// A subject without a level of its own has the global one.
    pub async fn compatibility(&self, subject: Option<&str>) -> Result<String, RegistryError> {
        let path = match subject {
            Some(s) => format!("config/{}", encode_path_segment(s)),
            None => "config".to_string(),
        };
        let answer = self.get_json(&path).await?;
        if answer.is_none() && subject.is_some() {
            return Box::pin(self.compatibility(None)).await;
        }
        answer
            .as_ref()
            .and_then(|v| v.get("compatibilityLevel").or_else(|| v.get("compatibility")))
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| RegistryError::Request {
                url: self.url.clone(),
                path,
                message: format!("no compatibilityLevel in the answer {answer:?}"),
            })
    }

    /// Every subject the registry holds.
    pub async fn subjects(&self) -> Result<Vec<String>, RegistryError> {
        let answer = self.get_json("subjects").await?;
        Ok(answer
            .as_ref()
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
            .unwrap_or_default())
    }
}

/// `text` percent-encoded for one URL path segment.
fn encode_path_segment(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A registry client error: what failed, the registry's own message when it sent one, and the
/// cause chain (a refused login says `401 Unauthorized`, a TLS failure names the certificate
/// problem).
fn describe(e: &SRCError) -> String {
    // The client says "couldn't parse schema registry error json" when the answer had no JSON
    // error body (HAProxy's 401 page): nothing to add then.
    let placeholder = |t: &str| t.contains("couldn't parse schema registry error json");
    let mut out = e.error.clone();
    if let Some(cause) = e.cause.as_deref().filter(|c| !placeholder(c)) {
        out = format!("{out}: {cause}");
    }
    let mut source = std::error::Error::source(e);
    while let Some(c) = source {
        let text = c.to_string();
        if !out.contains(&text) && !placeholder(&text) {
            out = format!("{out}: {text}");
        }
        source = c.source();
    }
    if out.contains("status 401") || out.contains("status 403") {
        out += " (check registry.username and registry.password)";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_404_answer_means_an_unknown_id() {
        let fetch = |message: &str| RegistryError::Fetch {
            url: "http://127.0.0.1:28404/apis/ccompat/v7".into(),
            id: 404,
            message: message.into(),
        };
        assert!(fetch("Error: HTTP request to schema registry failed with status 404 Not Found, was cause by …")
            .is_unknown_id());
        assert!(!fetch(
            "Error: http call to schema registry failed, was cause by error sending request for url \
             (http://127.0.0.1:28404/apis/ccompat/v7/schemas/ids/404?deleted=true), it's retriable: true"
        )
        .is_unknown_id());
    }
}
