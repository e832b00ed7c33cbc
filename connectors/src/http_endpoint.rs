//! The metrics and health endpoint: `GET /metrics` (Prometheus text format) and `GET /healthz`
//! (`200 ok` when every service of the process is healthy, `503` with the reasons otherwise).
//!
//! Contract: [`bind`] fails at start-up with an error naming the address and where it came from;
//! [`serve`] answers until the process ends and never panics or stops on a bad request.
//!
//! Why not hyper/axum: two fixed GET routes answered with `Connection: close` need only the
//! request line, so a minimal HTTP/1.1 responder on tokio's `TcpListener` does the job without
//! adding an HTTP stack to the build (this machine class has two cores). Requests are capped at
//! 8 KiB and 5 s, so a slow or hostile client cannot hold memory or a task for long.

use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::metrics::MetricsRegistry;

/// Why the endpoint could not start.
#[derive(Debug, Error)]
#[error("cannot serve metrics on {addr} (from {source_key}): {source}")]
pub struct EndpointError {
    /// The address.
    pub addr: SocketAddr,
    /// Where the address was configured (`--metrics-listen` or `nodes[i].metrics_listen`).
    pub source_key: String,
    /// The socket error.
    pub source: std::io::Error,
}

/// Binds the endpoint's listener; `source_key` names the setting the address came from.
pub async fn bind(addr: SocketAddr, source_key: &str) -> Result<TcpListener, EndpointError> {
    TcpListener::bind(addr).await.map_err(|source| EndpointError {
        addr,
        source_key: source_key.to_string(),
        source,
    })
}

/// `GET http://<addr><path>` with a deadline: the status code and body (for `pgferry status`
/// reading a node's endpoint; the same minimal HTTP/1.0 this module answers).
pub async fn get(addr: SocketAddr, path: &str, deadline: Duration) -> std::io::Result<(u16, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        stream.take(16 << 20).read_to_end(&mut raw).await?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not an HTTP answer from {addr}"));
        let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(bad)?;
        Ok((code, body.to_string()))
    };
    tokio::time::timeout(deadline, exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer from {addr} within {deadline:?}")))?
}

/// Serves `registry` on `listener` forever.
pub async fn serve(listener: TcpListener, registry: MetricsRegistry) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let registry = registry.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, &registry)).await;
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

const MAX_REQUEST: usize = 8 * 1024;

async fn answer(mut stream: TcpStream, registry: &MetricsRegistry) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        if buf.len() > MAX_REQUEST {
            return respond(&mut stream, 431, "text/plain", "request header too large\n", false).await;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let request_line = head.lines().next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = target.split('?').next().unwrap_or_default();
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(&mut stream, 405, "text/plain", "only GET\n", head_only).await;
    }
    match path {
        "/metrics" => {
            let body = registry.render();
            respond(
                &mut stream,
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
                head_only,
            )
            .await
        }
        "/healthz" => match registry.health() {
            Ok(()) => respond(&mut stream, 200, "text/plain", "ok\n", head_only).await,
            Err(reasons) => {
                let body = format!("unhealthy\n{reasons}\n");
                respond(&mut stream, 503, "text/plain", &body, head_only).await
            }
        },
        _ => {
            respond(
                &mut stream,
                404,
                "text/plain",
                "not found: try /metrics or /healthz\n",
                head_only,
            )
            .await
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(body);
    }
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_and_health() {
        let registry = MetricsRegistry::new();
        registry.counter("t_total", "T.", &[("node", "n1")]).inc_by(7);
        let listener = bind("127.0.0.1:0".parse().unwrap(), "test").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, registry.clone()));

        let m = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(m.starts_with("HTTP/1.1 200 OK\r\n"), "{m}");
        assert!(m.contains("t_total{node=\"n1\"} 7\n"), "{m}");
        let h = get(addr, "GET /healthz HTTP/1.1\r\n\r\n").await;
        assert!(h.starts_with("HTTP/1.1 200") && h.ends_with("\r\n\r\nok\n"), "{h}");

        registry.register_health("apply", "n1", Arc::new(|| Err("origin n2 not running".into())));
        let h = get(addr, "GET /healthz HTTP/1.1\r\n\r\n").await;
        assert!(
            h.starts_with("HTTP/1.1 503") && h.contains("apply n1: origin n2 not running"),
            "{h}"
        );
        assert!(get(addr, "GET /nope HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 404"));
        assert!(get(addr, "POST /metrics HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 405"));
    }

    #[tokio::test]
    async fn bind_error_names_the_key() {
        let taken = bind("127.0.0.1:0".parse().unwrap(), "test").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let e = bind(addr, "nodes[0].metrics_listen").await.unwrap_err().to_string();
        assert!(
            e.contains("nodes[0].metrics_listen") && e.contains(&addr.to_string()),
            "{e}"
        );
    }
}
