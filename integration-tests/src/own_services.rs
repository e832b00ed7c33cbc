//! A Kafka broker and a schema registry of one test alone (`deploy/local/kafka.sh` and
//! `registry.sh` under their own state directory and ports), for tests that kill, cut off or
//! fill up what they run against. Each is SIGKILLed and its state removed when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::proxy::Proxy;
use crate::wait_until;

/// Next candidate port for [`free_port`] (tests of one binary never pick the same one).
static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// A loopback port in 28000–31999 that nothing listens on (bound and released at once).
pub fn free_port() -> Result<u16> {
    for _ in 0..4000 {
        let offset = NEXT_PORT.fetch_add(1, Ordering::SeqCst) % 4000;
        let port = 28_000 + (offset + (std::process::id() as u16 % 200) * 20) % 4000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port in 28000-31999")
}

/// Runs `deploy/local/<script> ARGS` with `env`; fails with its output.
fn deploy_script(script: &str, args: &[&str], env: &[(&str, String)]) -> Result<()> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/local")
        .join(script);
    let mut cmd = Command::new("bash");
    cmd.arg(&path).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().with_context(|| format!("running {}", path.display()))?;
    if !out.status.success() {
        bail!(
            "{script} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The pid in a deploy script's pid file, if that process is alive and its command line holds
/// `marker` (as `read_live_pid` in deploy/local/common.sh checks): pids wrap (`pid_max` is 32768
/// on the test machines and a suite run goes round it), and a stale pid file must not get another
/// test's process killed.
fn live_pid(file: &Path, marker: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(file).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    String::from_utf8_lossy(&cmdline).contains(marker).then_some(pid)
}

/// True while process `pid` exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses: "Z" is a zombie.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Sends `signal` (e.g. `-KILL`) to `pid`.
pub fn signal(pid: u32, signal: &str) -> Result<()> {
    let status = Command::new("kill").args([signal, &pid.to_string()]).status()?;
    if !status.success() {
        bail!("kill {signal} {pid} failed");
    }
    Ok(())
}

/// Options of an [`OwnKafka`].
#[derive(Debug, Clone, Default)]
pub struct KafkaOptions {
    /// Also listen on a second port that is only reached through a [`Proxy`] (advertised as
    /// the proxy's address), for cutting one node's services off the broker.
    pub proxied: bool,
    /// Put the broker's log directory on a tmpfs of this many MiB (to fill it up).
    pub tmpfs_mib: Option<u64>,
    /// `server.properties` lines appended after the script's own (a later line wins), e.g.
    /// `transaction.state.log.replication.factor=2`.
    pub extra_properties: Vec<String>,
}

/// A single-node KRaft broker of one test.
pub struct OwnKafka {
    root: PathBuf,
    env: Vec<(&'static str, String)>,
    port: u16,
    /// The proxy in front of the proxied listener (with [`KafkaOptions::proxied`]).
    pub proxy: Option<Proxy>,
    tmpfs: Option<PathBuf>,
}

impl OwnKafka {
    /// Formats and starts a broker named `name`; waits until it answers.
    pub async fn start(name: &str, options: KafkaOptions) -> Result<OwnKafka> {
        let root = std::env::temp_dir().join(format!("pgferry-kafka-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        let (port, controller) = (free_port()?, free_port()?);
        let mut env = vec![
            ("PGFERRY_LOCAL", root.display().to_string()),
            ("PGFERRY_KAFKA_PORT", port.to_string()),
            ("PGFERRY_KAFKA_CONTROLLER_PORT", controller.to_string()),
            ("PGFERRY_KAFKA_HEAP", "-Xms256m -Xmx512m".to_string()),
        ];
        if !options.extra_properties.is_empty() {
            env.push(("PGFERRY_KAFKA_EXTRA_PROPS", options.extra_properties.join("\n")));
        }
        let mut proxy = None;
        if options.proxied {
            let proxied = free_port()?;
            let p = Proxy::start("127.0.0.1:0", &format!("127.0.0.1:{proxied}")).await?;
            env.push(("PGFERRY_KAFKA_PROXIED_PORT", proxied.to_string()));
            env.push(("PGFERRY_KAFKA_PROXIED_ADVERTISED", p.addr().to_string()));
            proxy = Some(p);
        }
        let mut kafka = OwnKafka {
            root,
            env,
            port,
            proxy,
            tmpfs: None,
        };
        if let Some(mib) = options.tmpfs_mib {
            let data = kafka.root.join("kafka/data");
            std::fs::create_dir_all(&data)?;
            let status = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
                .arg(&data)
                .status()?;
            if !status.success() {
                bail!("mount -t tmpfs on {} failed (needs root)", data.display());
            }
            kafka.tmpfs = Some(data);
        }
        kafka.start_again().await?;
        Ok(kafka)
    }

    /// `127.0.0.1:<port>` of the direct listener.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's log directory (a tmpfs with [`KafkaOptions::tmpfs_mib`]).
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("kafka/data")
    }

    /// The broker's log file.
    pub fn log(&self) -> PathBuf {
        self.root.join("logs/kafka.log")
    }

    /// The broker's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        live_pid(&self.root.join("kafka/kafka.pid"), "kafka.Kafka").filter(|p| process_alive(*p))
    }

    /// Starts the broker (again) and waits until it answers.
    pub async fn start_again(&self) -> Result<()> {
        let env = self.env.clone();
        tokio::task::spawn_blocking(move || deploy_script("kafka.sh", &["start"], &env)).await?
    }

    /// SIGKILL, the way a crash ends it; waits until the process is gone.
    pub async fn kill(&self) -> Result<()> {
        if let Some(pid) = self.pid() {
            signal(pid, "-KILL")?;
            wait_until("the broker process to end", Duration::from_secs(30), || async {
                Ok(!process_alive(pid))
            })
            .await?;
        }
        Ok(())
    }
}

impl Drop for OwnKafka {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = signal(pid, "-KILL");
            for _ in 0..100 {
                if !process_alive(pid) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if let Some(dir) = &self.tmpfs {
            // A process that just died can keep the mount busy for a moment; lazy as a last resort.
            let unmounted = (0..20).any(|_| {
                let ok = Command::new("umount")
                    .arg(dir)
                    .stderr(std::process::Stdio::null())
                    .status();
                ok.is_ok_and(|s| s.success()) || {
                    std::thread::sleep(Duration::from_millis(250));
                    false
                }
            });
            if !unmounted {
                let _ = Command::new("umount").arg("-l").arg(dir).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// An Apicurio registry of one test, with its schemas in an H2 file (kept across restarts).
pub struct OwnRegistry {
    root: PathBuf,
    env: Vec<(&'static str, String)>,
    port: u16,
}

impl OwnRegistry {
    /// Starts a registry named `name` on `port` (None: any free one); waits until it answers.
    pub async fn start(name: &str, port: Option<u16>) -> Result<OwnRegistry> {
        let root = std::env::temp_dir().join(format!("pgferry-registry-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        let port = match port {
            Some(p) => p,
            None => free_port()?,
        };
        let registry = OwnRegistry {
            env: vec![
                ("PGFERRY_LOCAL", root.display().to_string()),
                ("PGFERRY_REGISTRY_PORT", port.to_string()),
                ("PGFERRY_REGISTRY_STORAGE", "file".to_string()),
                ("PGFERRY_REGISTRY_HEAP", "-Xms128m -Xmx384m".to_string()),
            ],
            root,
            port,
        };
        registry.start_again().await?;
        Ok(registry)
    }

    /// Its Confluent-compatible API URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/apis/ccompat/v7", self.port)
    }

    /// Starts it (again) and waits until it answers.
    pub async fn start_again(&self) -> Result<()> {
        let env = self.env.clone();
        tokio::task::spawn_blocking(move || deploy_script("registry.sh", &["start"], &env)).await?
    }

    /// Stops it (TERM, as an operator or an orchestrator would) and waits until it is gone.
    pub async fn stop(&self) -> Result<()> {
        let env = self.env.clone();
        tokio::task::spawn_blocking(move || deploy_script("registry.sh", &["stop"], &env)).await?
    }
}

impl Drop for OwnRegistry {
    fn drop(&mut self) {
        if let Some(pid) = live_pid(&self.root.join("registry/registry.pid"), "-Dpgferry.service=registry") {
            let _ = signal(pid, "-KILL");
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
