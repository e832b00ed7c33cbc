//! A TCP proxy that a test can sever and heal: the network cut between one node's services and
//! PostgreSQL or Kafka. While cut, every connection through it is reset and new ones are reset
//! as soon as they are accepted (the client sees its connection refused or dropped). It can
//! also slow the client's side down ([`Proxy::throttle`]): a slow link to the broker.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running proxy from a loopback port to `target`; stops when dropped.
pub struct Proxy {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
    accepted: Arc<AtomicU64>,
    throttle: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on `listen` (`ip:port`) and forwards every connection to `target`.
    pub async fn start(listen: &str, target: &str) -> Result<Proxy> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("proxy: binding {listen}"))?;
        let addr = listener.local_addr()?;
        let (cut, watch) = watch::channel(false);
        let accepted = Arc::new(AtomicU64::new(0));
        let throttle = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(accept_loop(
            listener,
            target.to_string(),
            watch,
            accepted.clone(),
            throttle.clone(),
        ));
        Ok(Proxy {
            addr,
            cut,
            accepted,
            throttle,
            task,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Severs the link: resets every open connection and every new one until [`Proxy::heal`].
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Restores the link: new connections are forwarded again.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }

    /// Limits what clients send through connections accepted from now on to about
    /// `bytes_per_second` (0: no limit). Answers come back at full speed.
    pub fn throttle(&self, bytes_per_second: u64) {
        self.throttle.store(bytes_per_second, Ordering::Relaxed);
    }

    /// Connections accepted so far (cut or not): shows that clients really go through it.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut.send_replace(true);
        self.task.abort();
    }
}

/// Drops a socket with a reset (linger 0) rather than an orderly close.
fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

/// Copies `from` to `to`, sleeping after each chunk so that about `bytes_per_second` pass.
async fn throttled_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    bytes_per_second: u64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 4096];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_secs_f64(n as f64 / bytes_per_second as f64)).await;
    }
    let _ = to.shutdown().await;
}

async fn accept_loop(
    listener: TcpListener,
    target: String,
    cut: watch::Receiver<bool>,
    accepted: Arc<AtomicU64>,
    throttle: Arc<AtomicU64>,
) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            continue;
        };
        accepted.fetch_add(1, Ordering::Relaxed);
        if *cut.borrow() {
            reset(inbound);
            continue;
        }
        let (target, mut cut) = (target.clone(), cut.clone());
        // Read at accept: a connection keeps the limit it started with.
        let bytes_per_second = throttle.load(Ordering::Relaxed);
        tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(&target).await else {
                reset(inbound);
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            if bytes_per_second > 0 {
                // Halves cannot be reset one by one: close with a reset whatever ends them.
                let _ = inbound.set_zero_linger();
                let _ = outbound.set_zero_linger();
                let (in_read, in_write) = inbound.into_split();
                let (out_read, out_write) = outbound.into_split();
                tokio::select! {
                    _ = async {
                        tokio::join!(
                            throttled_copy(in_read, out_write, bytes_per_second),
                            async {
                                let mut out_read = out_read;
                                let mut in_write = in_write;
                                let _ = tokio::io::copy(&mut out_read, &mut in_write).await;
                            }
                        )
                    } => {}
                    _ = cut.wait_for(|c| *c) => {}
                }
                return;
            }
            let mut inbound = inbound;
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = cut.wait_for(|c| *c) => {}
            }
            reset(inbound);
            reset(outbound);
        });
    }
}
