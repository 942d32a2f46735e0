//! Serving HTTP on a listener an attacker can reach: every connection has a
//! deadline for its request headers and a bounded lifetime, and the number
//! of connections open at once is capped. Without them, clients that never
//! finish their headers hold file descriptors forever, and a health API
//! starved that way fails HAProxy's checks: the load balancer would route
//! around a healthy primary.

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The bounds of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// From a request's first byte (or a kept-alive connection's last answer)
    /// to the end of its headers.
    pub header_read_timeout: Duration,
    /// The longest a connection may stay open, whatever it does.
    pub max_lifetime: Duration,
    /// Connections open at once; further ones are closed at once.
    pub max_connections: usize,
}

impl Limits {
    /// The health API's: HAProxy checks open a connection, send one short
    /// request and close; tools ask `/status`. Nothing legitimate needs more.
    pub const HEALTH_API: Limits = Limits {
        header_read_timeout: Duration::from_secs(5),
        max_lifetime: Duration::from_secs(60),
        max_connections: 256,
    };
}

/// Serves `router` on `listener` with `limits` until `stop`; connections
/// under way then finish within their bounds.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: Limits,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            // Out of file descriptors and the like: wait, never spin.
            Err(error) => {
                tracing::debug!("accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "connection cap reached: closing");
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(TokioIo::new(stream), service);
            // Dropping the connection at the end of its lifetime closes it.
            let _ = tokio::time::timeout(limits.max_lifetime, connection).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(limits: Limits) -> (std::net::SocketAddr, CancellationToken) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let router = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        tokio::spawn(serve(listener, router, limits, stop.clone()));
        (address, stop)
    }

    /// Reads until the server closes the connection; `None` if it did not
    /// within `within`.
    async fn closed_within(
        stream: &mut tokio::net::TcpStream,
        within: Duration,
    ) -> Option<Vec<u8>> {
        let mut received = Vec::new();
        tokio::time::timeout(within, stream.read_to_end(&mut received))
            .await
            .ok()
            .map(|_| received)
    }

    const SHORT: Limits = Limits {
        header_read_timeout: Duration::from_millis(300),
        max_lifetime: Duration::from_secs(30),
        max_connections: 4,
    };

    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_cut_off() {
        let (address, stop) = start(SHORT).await;
        let mut slow = tokio::net::TcpStream::connect(address).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        assert!(
            closed_within(&mut slow, Duration::from_secs(5))
                .await
                .is_some(),
            "a connection stuck in its headers stayed open"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_are_closed_and_requests_still_answered() {
        let (address, stop) = start(Limits {
            header_read_timeout: Duration::from_secs(30),
            ..SHORT
        })
        .await;
        let mut idle = Vec::new();
        for _ in 0..SHORT.max_connections {
            idle.push(tokio::net::TcpStream::connect(address).await.unwrap());
        }
        // Let the server take them all before the next one.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut over = tokio::net::TcpStream::connect(address).await.unwrap();
        let _ = over.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let answer = closed_within(&mut over, Duration::from_secs(5)).await;
        assert_eq!(
            answer,
            Some(Vec::new()),
            "over the cap: closed without an answer"
        );
        // A slot freed: served again.
        drop(idle.pop());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut ok = tokio::net::TcpStream::connect(address).await.unwrap();
        ok.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = closed_within(&mut ok, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
        stop.cancel();
    }
}
