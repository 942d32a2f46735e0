//! Test support: an [`App`] with no database behind it (the paths tested
//! here never reach one), served on real loopback listeners, and a raw
//! HTTP/1.1 client that can pick its source address among 127.0.0.0/8 so
//! tests can play several clients.

use crate::config::{AppConfig, Secrets};
use crate::state::App;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

/// The admin password of [`app`].
pub const ADMIN_PASSWORD: &str = "the-right-password";

/// Its hash, made once (argon2 is slow on purpose).
fn admin_hash() -> String {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| crate::auth::hash_password(ADMIN_PASSWORD).expect("hash"))
        .clone()
}

/// An app whose configuration is a minimal file plus `extra` (YAML lines),
/// pointing at a database port where nothing listens.
pub fn app(extra: &str) -> Arc<App> {
    let text = format!(
        "listen: 127.0.0.1:1\n\
         admin: {{listen: 127.0.0.1:2}}\n\
         database: {{write: 'host=127.0.0.1 port=1 user=jai dbname=jai', \
         retry_timeout: 200ms, connect_timeout: 100ms}}\n\
         cookies: {{}}\n{extra}"
    );
    let config = AppConfig::parse(Path::new("test.yaml"), &text).expect("test config");
    let secrets = Secrets {
        cookie_key: vec![7; 32],
        admin_hash: admin_hash(),
        db_password: None,
        metrics_token: None,
    };
    Arc::new(App::new(config, secrets).expect("app"))
}

/// Which of the two listeners.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    /// The public site.
    Public,
    /// The admin interface.
    Admin,
}

/// Serves one of `app`'s routers on a fresh loopback port until the token
/// is dropped or cancelled.
pub async fn serve(app: &Arc<App>, side: Side) -> (SocketAddr, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let (router, name) = match side {
        Side::Public => (crate::server::public_router(app.clone()), "public"),
        Side::Admin => (crate::server::admin_router(app.clone()), "admin"),
    };
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let app = app.clone();
    tokio::spawn(async move { crate::server::serve(listener, router, &app, name, stop).await });
    (address, shutdown)
}

/// An answer, read whole.
#[derive(Debug)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Header names (lower case) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl Answer {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Sends `method path` with `headers` and `body` to `to`, from the source
/// address `from` (any 127.0.0.0/8 address works on Linux).
pub async fn request(
    to: SocketAddr,
    from: IpAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(from, 0)).expect("bind source");
    let mut stream = socket.connect(to).await.expect("connect");
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        text.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    text.push_str("\r\n");
    text.push_str(body);
    stream.write_all(text.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("an answer within 10 s")
        .expect("read");
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// `127.0.0.N`.
pub fn loopback(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}
