//! The listeners' defence against clients that hold connections open
//! (slowloris: headers sent a byte at a time, or never; a body that never
//! ends; answers never read).
//!
//! Every connection is in one phase, and each phase but the handler's has a
//! deadline (`connections` in the configuration):
//!
//! | phase | from | deadline |
//! | --- | --- | --- |
//! | idle | accept, or the end of the previous answer | `idle_timeout` |
//! | headers | the request's first byte | `header_read_timeout` |
//! | body | the end of the headers | `body_read_timeout` (answered 408) |
//! | handler | the end of the body | none: the handler's own bounds |
//!
//! The idle and header deadlines are kept by [`Guarded`], the connection's
//! socket: once one has passed, its next read or write fails and hyper drops
//! the connection. The body is read (up to the body limit) by the
//! [`read_request`] middleware under its deadline before the handler runs.
//!
//! **The cap**: a listener holds at most `max_connections`. A connection
//! beyond it closes the one that has waited longest on its client (idle,
//! headers or body phase): a legitimate client sends its request within
//! milliseconds, so that is almost always an attacker's, and HAProxy's
//! health checks and real visitors still get in while the cap is full of
//! slow connections. When every connection has a request in a handler, the
//! new one waits in the kernel's accept queue until one ends.

use crate::metrics::Metrics;
use axum::body::{Body, HttpBody};
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::{IncomingStream, Listener};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

use crate::config::ConnectionsConfig;

/// What a connection is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The first byte of a request.
    Idle,
    /// The rest of the headers.
    Headers,
    /// The body.
    Body,
    /// A handler's answer.
    Handler,
}

/// Why a connection was closed early, as the metric's `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Nothing received for `idle_timeout`, or an answer not read for as long.
    IdleTimeout,
    /// The headers took longer than `header_read_timeout`.
    HeaderTimeout,
    /// The body took longer than `body_read_timeout`.
    BodyTimeout,
    /// Closed at the cap to make room for a new connection.
    Evicted,
}

impl Closed {
    /// The label.
    pub fn label(self) -> &'static str {
        match self {
            Closed::IdleTimeout => "idle_timeout",
            Closed::HeaderTimeout => "header_timeout",
            Closed::BodyTimeout => "body_timeout",
            Closed::Evicted => "evicted",
        }
    }
}

#[derive(Debug)]
struct ConnState {
    phase: Phase,
    since: Instant,
    evicted: bool,
    /// Set once the closing was counted.
    closed: bool,
    /// The connection task, woken to notice an eviction.
    waker: Option<Waker>,
}

/// One connection's phase, shared by its socket and its requests.
#[derive(Debug)]
pub struct Conn {
    id: u64,
    limits: ConnectionsConfig,
    shared: Arc<Shared>,
    state: Mutex<ConnState>,
}

impl Conn {
    fn state(&self) -> std::sync::MutexGuard<'_, ConnState> {
        self.state.lock().expect("connection state lock")
    }

    /// Enters `phase`. Entering the idle phase wakes the connection task,
    /// so that a read it left pending in the handler phase (which has no
    /// deadline) is polled again and waits for the idle deadline.
    fn set(&self, phase: Phase) {
        let waker = {
            let mut state = self.state();
            state.phase = phase;
            state.since = Instant::now();
            if phase == Phase::Idle {
                state.waker.clone()
            } else {
                None
            }
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Bytes arrived: an idle connection starts a request.
    fn received(&self) {
        let mut state = self.state();
        if state.phase == Phase::Idle {
            state.phase = Phase::Headers;
            state.since = Instant::now();
        }
    }

    fn deadline(&self, state: &ConnState) -> Option<(Instant, Closed)> {
        match state.phase {
            Phase::Idle => Some((state.since + self.limits.idle_timeout, Closed::IdleTimeout)),
            Phase::Headers => Some((
                state.since + self.limits.header_read_timeout,
                Closed::HeaderTimeout,
            )),
            // The body's deadline is read_request's (it answers 408).
            Phase::Body | Phase::Handler => None,
        }
    }

    /// Why the connection must close now, if it must; counted once.
    fn expired(&self) -> Option<Closed> {
        let mut state = self.state();
        let reason = if state.evicted {
            Some(Closed::Evicted)
        } else {
            self.deadline(&state)
                .filter(|(deadline, _)| Instant::now() >= *deadline)
                .map(|(_, reason)| reason)
        }?;
        if !state.closed {
            state.closed = true;
            drop(state);
            self.shared.count_closed(reason);
        }
        Some(reason)
    }

    /// Remembers the task to wake on eviction; returns the current deadline.
    fn arm(&self, waker: &Waker) -> Option<Instant> {
        let mut state = self.state();
        if !state
            .waker
            .as_ref()
            .is_some_and(|known| known.will_wake(waker))
        {
            state.waker = Some(waker.clone());
        }
        self.deadline(&state).map(|(deadline, _)| deadline)
    }

    /// Waiting on the client (not in a handler): since when, if so.
    fn waiting_since(&self) -> Option<Instant> {
        let state = self.state();
        (state.phase != Phase::Handler && !state.evicted).then_some(state.since)
    }

    fn evict(&self) {
        let waker = {
            let mut state = self.state();
            state.evicted = true;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// What a listener's connections share: the registry the cap evicts from.
#[derive(Debug)]
struct Shared {
    listener: &'static str,
    metrics: Arc<Metrics>,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Shared {
    fn count_closed(&self, reason: Closed) {
        self.metrics.connection_closed(self.listener, reason);
    }

    /// Closes the connection that has waited longest on its client; false
    /// when every connection has a request in a handler.
    fn evict_longest_waiting(&self) -> bool {
        let victim = {
            let mut conns = self.conns.lock().expect("connection registry lock");
            let oldest = conns
                .values()
                .filter_map(|conn| Some((conn.waiting_since()?, conn.id)))
                .min()
                .map(|(_, id)| id);
            oldest.and_then(|id| conns.remove(&id))
        };
        match victim {
            Some(conn) => {
                conn.evict();
                true
            }
            None => false,
        }
    }
}

/// A TCP listener with the cap; its connections are [`Guarded`].
#[derive(Debug)]
pub struct CappedListener {
    listener: TcpListener,
    limits: ConnectionsConfig,
    slots: Arc<Semaphore>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    /// When the cap was last reported in the log (at most every 10 s).
    last_warned: Option<Instant>,
    refused_since_warning: u64,
}

impl CappedListener {
    /// Wraps `listener`; `name` labels metrics and log lines.
    pub fn new(
        listener: TcpListener,
        limits: ConnectionsConfig,
        name: &'static str,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            listener,
            limits,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            shared: Arc::new(Shared {
                listener: name,
                metrics,
                conns: Mutex::new(HashMap::new()),
            }),
            next_id: AtomicU64::new(0),
            last_warned: None,
            refused_since_warning: 0,
        }
    }

    /// A slot for a new connection: a free one, else one freed by evicting
    /// the connection waiting longest on its client, else the next to end.
    async fn slot(&mut self) -> OwnedSemaphorePermit {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return permit;
        }
        let evicted = self.shared.evict_longest_waiting();
        self.refused_since_warning += 1;
        if self
            .last_warned
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(10))
        {
            tracing::warn!(
                listener = self.shared.listener,
                max_connections = self.limits.max_connections,
                at_cap = self.refused_since_warning,
                "connection cap reached: {}",
                if evicted {
                    "closing the connections that waited longest on their clients"
                } else {
                    "every connection is in a handler; new ones wait"
                }
            );
            self.last_warned = Some(Instant::now());
            self.refused_since_warning = 0;
        }
        self.slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }
}

impl Listener for CappedListener {
    type Io = Guarded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Guarded, SocketAddr) {
        let (stream, peer) = loop {
            match self.listener.accept().await {
                Ok(accepted) => break accepted,
                Err(error) if is_connection_error(&error) => continue,
                Err(error) => {
                    // Out of file descriptors, most likely: wait, do not spin.
                    tracing::error!(listener = self.shared.listener, "accept failed: {error}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        let permit = self.slot().await;
        let conn = Arc::new(Conn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            limits: self.limits,
            shared: self.shared.clone(),
            state: Mutex::new(ConnState {
                phase: Phase::Idle,
                since: Instant::now(),
                evicted: false,
                closed: false,
                waker: None,
            }),
        });
        self.shared
            .conns
            .lock()
            .expect("connection registry lock")
            .insert(conn.id, conn.clone());
        self.shared.metrics.connection_opened(self.shared.listener);
        let guarded = Guarded {
            stream,
            conn,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            _permit: permit,
        };
        (guarded, peer)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// An accepted connection: the socket, its phase and its slot under the cap.
#[derive(Debug)]
pub struct Guarded {
    stream: TcpStream,
    conn: Arc<Conn>,
    sleep: Pin<Box<Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let shared = &self.conn.shared;
        shared
            .conns
            .lock()
            .expect("connection registry lock")
            .remove(&self.conn.id);
        shared.metrics.connection_ended(shared.listener);
    }
}

impl Guarded {
    fn closing(reason: Closed) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connection closed: {}", reason.label()),
        )
    }

    /// An operation is pending: wake the task at the deadline (or when
    /// evicted), or fail now if the deadline has passed meanwhile.
    fn wait(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        let deadline = self.conn.arm(cx.waker())?;
        self.sleep.as_mut().reset(deadline.into());
        if self.sleep.as_mut().poll(cx).is_ready() {
            return self.conn.expired().map(Self::closing);
        }
        None
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(reason) = this.conn.expired() {
            return Poll::Ready(Err(Self::closing(reason)));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.conn.received();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => match this.wait(cx) {
                Some(error) => Poll::Ready(Err(error)),
                None => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(reason) = this.conn.expired() {
            return Poll::Ready(Err(Self::closing(reason)));
        }
        match Pin::new(&mut this.stream).poll_write(cx, buf) {
            Poll::Pending => match this.wait(cx) {
                Some(error) => Poll::Ready(Err(error)),
                None => Poll::Pending,
            },
            done => done,
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(reason) = this.conn.expired() {
            return Poll::Ready(Err(Self::closing(reason)));
        }
        match Pin::new(&mut this.stream).poll_write_vectored(cx, bufs) {
            Poll::Pending => match this.wait(cx) {
                Some(error) => Poll::Ready(Err(error)),
                None => Poll::Pending,
            },
            done => done,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The connection a request came on: its peer and its phase.
#[derive(Debug, Clone)]
pub struct Client {
    /// The TCP peer.
    pub peer: SocketAddr,
    conn: Arc<Conn>,
}

impl Connected<IncomingStream<'_, CappedListener>> for Client {
    fn connect_info(stream: IncomingStream<'_, CappedListener>) -> Self {
        Client {
            peer: *stream.remote_addr(),
            conn: stream.io().conn.clone(),
        }
    }
}

/// What [`read_request`] needs.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    /// `limits.body_bytes`: more is not read (the handler answers 413).
    pub body_bytes: usize,
    /// `connections.body_read_timeout`.
    pub body_read_timeout: Duration,
}

/// Middleware, innermost: tracks the connection's phase, reads the body
/// under its deadline (408 when late), and hands handlers the peer as
/// `ConnectInfo<SocketAddr>`.
pub async fn read_request(
    State(reading): State<Reading>,
    request: Request,
    next: Next,
) -> Response {
    let (mut parts, body) = request.into_parts();
    let conn = parts
        .extensions
        .get::<ConnectInfo<Client>>()
        .map(|ConnectInfo(client)| client.clone());
    if let Some(client) = &conn {
        parts.extensions.insert(ConnectInfo(client.peer));
    }
    let conn = conn.map(|client| client.conn);
    let set = |phase| {
        if let Some(conn) = &conn {
            conn.set(phase);
        }
    };
    let body = if body.is_end_stream() {
        body
    } else {
        set(Phase::Body);
        match tokio::time::timeout(
            reading.body_read_timeout,
            read_body(body, reading.body_bytes + 1),
        )
        .await
        {
            Ok(Ok(bytes)) => Body::from(bytes),
            // A broken body (bad chunked encoding, the client went away).
            Ok(Err(_)) => return unreadable(),
            Err(_) => {
                if let Some(conn) = &conn {
                    conn.shared.count_closed(Closed::BodyTimeout);
                }
                return request_timeout();
            }
        }
    };
    set(Phase::Handler);
    let response = next.run(Request::from_parts(parts, body)).await;
    set(Phase::Idle);
    response
}

/// Reads `body` until its end or `limit` bytes.
async fn read_body(mut body: Body, limit: usize) -> Result<Vec<u8>, axum::Error> {
    let mut bytes = Vec::new();
    while bytes.len() < limit {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        match frame {
            None => break,
            Some(Err(error)) => return Err(error),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    bytes.extend_from_slice(&data);
                }
            }
        }
    }
    Ok(bytes)
}

fn unreadable() -> Response {
    closing(StatusCode::BAD_REQUEST, "This request could not be read.\n")
}

fn request_timeout() -> Response {
    closing(
        StatusCode::REQUEST_TIMEOUT,
        "The request was not received in time.\n",
    )
}

/// A short plain answer after which the connection closes (its body was
/// not read to the end, so the next request's start is unknown).
fn closing(status: StatusCode, text: &'static str) -> Response {
    let mut response = (status, text).into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use axum::Router;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::sync::CancellationToken;

    /// Serves a small router under `limits`; the `/slow` route answers once
    /// a permit of `release` is added.
    async fn serve(
        limits: ConnectionsConfig,
        release: Arc<Semaphore>,
    ) -> (SocketAddr, CancellationToken) {
        let router = Router::new()
            .route("/", get(|| async { "ok" }))
            .route("/echo", post(|body: String| async move { body }))
            .route(
                "/slow",
                get(move || {
                    let release = release.clone();
                    async move {
                        release.acquire().await.expect("open").forget();
                        "slow"
                    }
                }),
            )
            .layer(axum::middleware::from_fn_with_state(
                Reading {
                    body_bytes: 1024,
                    body_read_timeout: limits.body_read_timeout,
                },
                read_request,
            ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let listener = CappedListener::new(listener, limits, "public", Arc::default());
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<Client>(),
            )
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        });
        (address, shutdown)
    }

    fn limits(header: u64, body: u64, idle: u64, max_connections: usize) -> ConnectionsConfig {
        ConnectionsConfig {
            header_read_timeout: Duration::from_millis(header),
            body_read_timeout: Duration::from_millis(body),
            idle_timeout: Duration::from_millis(idle),
            max_connections,
        }
    }

    /// Reads until the server closes the connection (or `within` passes);
    /// returns what was read and when the connection closed.
    async fn read_until_closed(
        stream: &mut TcpStream,
        within: Duration,
    ) -> (String, Option<Duration>) {
        let start = Instant::now();
        let mut text = Vec::new();
        let mut buffer = [0u8; 4096];
        while start.elapsed() < within {
            let left = within.saturating_sub(start.elapsed());
            match tokio::time::timeout(left, stream.read(&mut buffer)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    return (String::from_utf8_lossy(&text).into(), Some(start.elapsed()))
                }
                Ok(Ok(read)) => text.extend_from_slice(&buffer[..read]),
                Err(_) => break,
            }
        }
        (String::from_utf8_lossy(&text).into(), None)
    }

    /// `GET path` on a new connection; the answer's status line, or None
    /// when none came within `within`.
    async fn get_status(address: SocketAddr, path: &str, within: Duration) -> Option<String> {
        let mut stream = TcpStream::connect(address).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let (text, _) = read_until_closed(&mut stream, within).await;
        text.lines()
            .next()
            .map(str::to_owned)
            .filter(|line| !line.is_empty())
    }

    #[tokio::test]
    async fn headers_sent_a_byte_at_a_time_are_cut_at_the_header_timeout() {
        let (address, _stop) =
            serve(limits(400, 5000, 5000, 10), Arc::new(Semaphore::new(0))).await;
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let start = Instant::now();
        let mut closed = None;
        // One header line every 100 ms, never the blank line that ends them.
        for line in 0..50 {
            if stream
                .write_all(format!("X-{line}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                closed = Some(start.elapsed());
                break;
            }
            if let (_, Some(_)) = read_until_closed(&mut stream, Duration::from_millis(100)).await {
                closed = Some(start.elapsed());
                break;
            }
        }
        let closed = closed.expect("the slow headers were never cut");
        assert!(
            closed >= Duration::from_millis(300) && closed < Duration::from_millis(1500),
            "closed after {closed:?}, the header timeout is 400 ms"
        );
    }

    #[tokio::test]
    async fn silent_and_kept_alive_connections_close_at_the_idle_timeout() {
        let (address, _stop) =
            serve(limits(5000, 5000, 400, 10), Arc::new(Semaphore::new(0))).await;
        let mut silent = TcpStream::connect(address).await.unwrap();
        let (_, closed) = read_until_closed(&mut silent, Duration::from_secs(3)).await;
        let closed = closed.expect("a connection that sends nothing stayed open");
        assert!(closed >= Duration::from_millis(300), "{closed:?}");
        let mut kept = TcpStream::connect(address).await.unwrap();
        kept.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (text, closed) = read_until_closed(&mut kept, Duration::from_secs(3)).await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(closed.is_some(), "a kept-alive connection stayed open");
    }

    #[tokio::test]
    async fn a_body_that_does_not_arrive_is_answered_408() {
        let (address, _stop) =
            serve(limits(5000, 400, 5000, 10), Arc::new(Semaphore::new(0))).await;
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream
            .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly ten b")
            .await
            .unwrap();
        let (text, closed) = read_until_closed(&mut stream, Duration::from_secs(3)).await;
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(closed.is_some(), "the connection stayed open after 408");
        // A whole body is read and handed over.
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream
            .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
            .await
            .unwrap();
        let (text, _) = read_until_closed(&mut stream, Duration::from_secs(3)).await;
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with("hello"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn at_the_cap_a_new_connection_closes_the_longest_waiting_one() {
        // Timeouts far away: only the cap can free a slot.
        let (address, _stop) = serve(
            limits(60_000, 60_000, 60_000, 4),
            Arc::new(Semaphore::new(0)),
        )
        .await;
        let mut slow = Vec::new();
        for _ in 0..4 {
            let mut stream = TcpStream::connect(address).await.unwrap();
            stream
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
            slow.push(stream);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // New clients that keep their connection after an answer: each is
        // served at once, and each takes the slot of the slowest.
        let mut kept = Vec::new();
        for _ in 0..4 {
            let mut stream = TcpStream::connect(address).await.unwrap();
            stream
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut buffer = [0u8; 256];
            let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buffer))
                .await
                .expect("a new client was not served at the cap")
                .unwrap();
            let text = String::from_utf8_lossy(&buffer[..read]);
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
            kept.push(stream);
        }
        for (index, stream) in slow.iter_mut().enumerate() {
            let (_, closed) = read_until_closed(stream, Duration::from_millis(500)).await;
            assert!(closed.is_some(), "slow connection {index} still open");
        }
        // The kept connections were younger: none was closed.
        for stream in &mut kept {
            let (_, closed) = read_until_closed(stream, Duration::from_millis(50)).await;
            assert!(closed.is_none(), "a served client's connection was closed");
        }
    }

    #[tokio::test]
    async fn at_the_cap_with_every_connection_in_a_handler_new_ones_wait() {
        let release = Arc::new(Semaphore::new(0));
        let (address, _stop) = serve(limits(60_000, 60_000, 60_000, 2), release.clone()).await;
        let busy: Vec<_> = (0..2)
            .map(|_| tokio::spawn(get_status(address, "/slow", Duration::from_secs(10))))
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let waiting = tokio::spawn(get_status(address, "/", Duration::from_secs(10)));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!waiting.is_finished(), "served beyond the cap");
        release.add_permits(1);
        let status = tokio::time::timeout(Duration::from_secs(3), waiting)
            .await
            .expect("the waiting connection was not served once a slot freed")
            .unwrap();
        assert_eq!(status.as_deref(), Some("HTTP/1.1 200 OK"));
        release.add_permits(1);
        for request in busy {
            assert_eq!(request.await.unwrap().as_deref(), Some("HTTP/1.1 200 OK"));
        }
    }
}
