//! A TCP proxy that a test can sever and heal: the network cut between one node's services and
//! PostgreSQL or Kafka. While cut, every connection through it is reset and new ones are reset
//! as soon as they are accepted (the client sees its connection refused or dropped).

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
        let task = tokio::spawn(accept_loop(listener, target.to_string(), watch, accepted.clone()));
        Ok(Proxy {
            addr,
            cut,
            accepted,
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

async fn accept_loop(listener: TcpListener, target: String, cut: watch::Receiver<bool>, accepted: Arc<AtomicU64>) {
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
        tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(&target).await else {
                reset(inbound);
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
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
