//! Servers for the security tests, each a test's own: test certificates
//! (`deploy/local/certs.sh`), a Kafka broker with a SASL_SSL/SCRAM listener
//! (`deploy/local/kafka.sh` under its own state directory and ports), and HAProxy as a TLS +
//! basic-auth front of the registry (`deploy/haproxy/registry-tls.cfg`). Each stops when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::wait_until;

fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// Certificates written by `deploy/local/certs.sh`: a CA, a server certificate for
/// `localhost`/`127.0.0.1` and an expired one.
pub struct TestCerts {
    /// Directory holding them.
    pub dir: PathBuf,
}

impl TestCerts {
    /// Generates them into `dir`.
    pub fn generate(dir: &Path) -> Result<TestCerts> {
        let out = Command::new("bash")
            .arg(repo_file("deploy/local/certs.sh"))
            .arg(dir)
            .output()
            .context("running deploy/local/certs.sh")?;
        if !out.status.success() {
            bail!("certs.sh failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(TestCerts { dir: dir.to_path_buf() })
    }

    /// A file of the set (`ca.pem`, `server.pem`, `server.key`, `server-bundle.pem`,
    /// `expired.pem`, `expired.key`, …).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `file(name)` as a string (for configs and environment).
    pub fn path(&self, name: &str) -> String {
        self.file(name).display().to_string()
    }
}

/// A Kafka broker of one test with a PLAINTEXT listener on `base_port` (readiness, controller,
/// inter-broker), the controller on `base_port + 1` and SASL_SSL (SCRAM) on `base_port + 2`.
pub struct OwnKafka {
    root: PathBuf,
    env: Vec<(String, String)>,
    /// `127.0.0.1:<SASL_SSL port>`.
    pub sasl_ssl: String,
    /// `127.0.0.1:<PLAINTEXT port>`.
    pub plaintext: String,
}

impl OwnKafka {
    /// Formats and starts the broker (about a minute on a busy machine) with the key and
    /// certificate bundle `pem` and SCRAM-SHA-512 user `user`/`password`.
    pub fn start(name: &str, base_port: u16, pem: &Path, user: &str, password: &str) -> Result<OwnKafka> {
        let root = std::env::temp_dir().join(format!("pgferry-kafka-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        let env = vec![
            ("PGFERRY_LOCAL".to_string(), root.display().to_string()),
            ("PGFERRY_KAFKA_PORT".into(), base_port.to_string()),
            ("PGFERRY_KAFKA_CONTROLLER_PORT".into(), (base_port + 1).to_string()),
            ("PGFERRY_KAFKA_SASL_SSL_PORT".into(), (base_port + 2).to_string()),
            ("PGFERRY_KAFKA_SSL_PEM".into(), pem.display().to_string()),
            (
                "PGFERRY_KAFKA_SCRAM_USERS".into(),
                format!("SCRAM-SHA-512=[name={user},password={password}]"),
            ),
            ("PGFERRY_KAFKA_HEAP".into(), "-Xms256m -Xmx512m".into()),
        ];
        let kafka = OwnKafka {
            root,
            env,
            sasl_ssl: format!("127.0.0.1:{}", base_port + 2),
            plaintext: format!("127.0.0.1:{base_port}"),
        };
        kafka.kafka_sh(&["start"])?;
        Ok(kafka)
    }

    fn kafka_sh(&self, args: &[&str]) -> Result<()> {
        let out = Command::new("bash")
            .arg(repo_file("deploy/local/kafka.sh"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .context("running deploy/local/kafka.sh")?;
        if !out.status.success() {
            bail!(
                "kafka.sh {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for OwnKafka {
    fn drop(&mut self) {
        let _ = self.kafka_sh(&["stop"]);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// HAProxy running `deploy/haproxy/registry-tls.cfg`: TLS on `127.0.0.1:<port>` with the
/// certificate bundle given, basic auth for one user, forwarding to the shared registry.
pub struct RegistryFront {
    child: Child,
    /// `https://127.0.0.1:<port>/apis/ccompat/v7`.
    pub url: String,
    /// HAProxy's output.
    pub log: PathBuf,
}

impl RegistryFront {
    /// Starts HAProxy and waits until it accepts connections. `backend` is the registry's
    /// `host:port`.
    pub async fn start(
        port: u16,
        pem: &Path,
        user: &str,
        password: &str,
        backend: &str,
        log: &Path,
    ) -> Result<RegistryFront> {
        let file = std::fs::File::create(log)?;
        let child = Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(repo_file("deploy/haproxy/registry-tls.cfg"))
            .env("PGFERRY_REGISTRY_TLS_BIND", format!("127.0.0.1:{port}"))
            .env("PGFERRY_REGISTRY_TLS_PEM", pem)
            .env("PGFERRY_REGISTRY_USER", user)
            .env("PGFERRY_REGISTRY_PASSWORD", password)
            .env("PGFERRY_REGISTRY_BACKEND", backend)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .context("starting haproxy (apt-get install haproxy)")?;
        let mut front = RegistryFront {
            child,
            url: format!("https://127.0.0.1:{port}/apis/ccompat/v7"),
            log: log.to_path_buf(),
        };
        let addr = format!("127.0.0.1:{port}");
        let ready = wait_until("HAProxy to listen", Duration::from_secs(20), || {
            let addr = addr.clone();
            async move { Ok(tokio::net::TcpStream::connect(&addr).await.is_ok()) }
        })
        .await;
        if let Err(e) = ready {
            let status = front.child.try_wait()?;
            bail!(
                "{e}; haproxy status {status:?}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        Ok(front)
    }
}

impl Drop for RegistryFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The registry's `host:port` from its URL (`http://127.0.0.1:18081/apis/…` → `127.0.0.1:18081`).
pub fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.split('/').next().unwrap_or(rest).to_string()
}
