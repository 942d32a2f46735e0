//! Shared write connections on which concurrent votes are pipelined.
//!
//! A pooled connection serves one request at a time: a vote holds it for a
//! whole round trip through HAProxy, and the database backend sleeps and
//! wakes once per vote. Here a few connections are shared by every vote in
//! flight, and tokio-postgres pipelines the statements of concurrent callers
//! on each. Every vote is still its own statement and its own implicit
//! transaction (tokio-postgres ends each with a Sync, so one vote's error
//! never touches another's), but the backend, HAProxy and the app read and
//! write several votes per wake-up, and a backend with votes queued does not
//! go idle between them. `make bench-app` measures the difference
//! (docs/benchmarks.md).
//!
//! A connection that broke, or that reached a server which is not (or no
//! longer) the primary, is dropped by the caller ([`Pipelined::discard`]) and
//! opened again on next use through HAProxy's write port, so after a failover
//! it reaches the new primary. Votes already on a dropped connection finish
//! or fail on their own; the client closes when the last of them is done.
//!
//! One attempt at a time opens a slot's connection, and the callers that
//! waited for it share its failure: during a failover, when each attempt may
//! take the whole connect timeout, the votes queued on a slot must not try
//! one after another (their retry budgets would run out in the queue).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls, Statement};

/// One open connection and the statement prepared on it.
pub struct Shared {
    /// The connection, used concurrently by many requests.
    pub client: Client,
    /// The statement the pool was made for, prepared on this connection.
    pub statement: Statement,
    slot: usize,
}

/// The error of a connection attempt; shared by the callers that waited for it.
pub type ConnectError = Arc<tokio_postgres::Error>;

/// One connection slot. `open` is only ever locked for a moment, never
/// across an await: handing out an open connection (the hot path) and
/// reading the gauge never wait for a connection attempt. `connecting` is
/// held while one is opened, and keeps when the last attempt failed.
#[derive(Default)]
struct Slot {
    open: std::sync::Mutex<Option<Arc<Shared>>>,
    connecting: Mutex<Option<(Instant, ConnectError)>>,
}

impl Slot {
    /// The slot's connection, if it is open and not closed.
    fn open(&self) -> Option<Arc<Shared>> {
        let open = self
            .open
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        open.as_ref()
            .filter(|shared| !shared.client.is_closed())
            .cloned()
    }

    fn set_open(&self, shared: Option<Arc<Shared>>) {
        *self
            .open
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = shared;
    }
}

/// A fixed number of connection slots, handed out round robin.
pub struct Pipelined {
    config: tokio_postgres::Config,
    sql: &'static str,
    slots: Vec<Slot>,
    next: AtomicUsize,
    in_flight: AtomicUsize,
}

impl Pipelined {
    /// Slots for `connections` connections that run `sql`; none is opened
    /// before it is first needed.
    pub fn new(config: tokio_postgres::Config, connections: usize, sql: &'static str) -> Self {
        assert!(connections > 0, "a pipelined pool needs at least one slot");
        Self {
            config,
            sql,
            slots: (0..connections).map(|_| Slot::default()).collect(),
            next: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// The next slot's connection, opened (and the statement prepared) if it
    /// is not open. Callers of a slot whose connection is being opened wait
    /// for that attempt; if it fails, they get its error without another try.
    pub async fn get(&self) -> Result<Arc<Shared>, ConnectError> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let slot = &self.slots[index];
        if let Some(shared) = slot.open() {
            return Ok(shared);
        }
        let arrived = Instant::now();
        let mut failed = slot.connecting.lock().await;
        // Another caller may have opened it while this one waited.
        if let Some(shared) = slot.open() {
            return Ok(shared);
        }
        if let Some((ended, error)) = failed.as_ref() {
            if *ended >= arrived {
                return Err(error.clone());
            }
        }
        match self.connect(index).await {
            Ok(shared) => {
                let shared = Arc::new(shared);
                slot.set_open(Some(shared.clone()));
                *failed = None;
                Ok(shared)
            }
            Err(error) => {
                let error = Arc::new(error);
                slot.set_open(None);
                *failed = Some((Instant::now(), error.clone()));
                Err(error)
            }
        }
    }

    async fn connect(&self, slot: usize) -> Result<Shared, tokio_postgres::Error> {
        let (client, connection) = self.config.connect(NoTls).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!("shared write connection ended: {error}");
            }
        });
        let statement = client.prepare(self.sql).await?;
        Ok(Shared {
            client,
            statement,
            slot,
        })
    }

    /// Drops `shared` from its slot, if it is still there, so that the next
    /// use of the slot opens a new connection.
    pub fn discard(&self, shared: &Arc<Shared>) {
        let slot = &self.slots[shared.slot];
        let mut open = slot
            .open
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if open.as_ref().is_some_and(|held| Arc::ptr_eq(held, shared)) {
            *open = None;
        }
    }

    /// Counts a request in flight until the returned guard is dropped.
    pub fn enter(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.in_flight)
    }

    /// What the pool gauge shows: slots, open connections, requests in flight.
    pub fn usage(&self) -> PipelinedUsage {
        let open = self
            .slots
            .iter()
            .filter(|slot| slot.open().is_some())
            .count();
        PipelinedUsage {
            size: self.slots.len(),
            open,
            in_flight: self.in_flight.load(Ordering::Relaxed),
        }
    }
}

/// A snapshot of a [`Pipelined`] pool's use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelinedUsage {
    /// Connection slots.
    pub size: usize,
    /// Connections open now (a slot still being connected does not count).
    pub open: usize,
    /// Requests using the pool now, waiting or running.
    pub in_flight: usize,
}

/// A request in flight on a [`Pipelined`] pool; see [`Pipelined::enter`].
pub struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A server that takes connections, holds each a while, then hangs up
    /// without a word: what a client sees while no primary is routable (a
    /// long `hold`: a hung server). Returns its port and how many
    /// connections it took.
    pub(crate) async fn hanging_up_server(hold: Duration) -> (u16, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buffer = [0u8; 512];
                    let _ = tokio::time::timeout(hold, socket.read(&mut buffer)).await;
                    tokio::time::sleep(hold).await;
                });
            }
        });
        (port, accepted)
    }

    #[tokio::test]
    async fn callers_queued_on_a_failing_slot_share_one_attempt() {
        let (port, accepted) = hanging_up_server(Duration::from_millis(200)).await;
        let config: tokio_postgres::Config =
            format!("host=127.0.0.1 port={port} user=jai dbname=jai connect_timeout=5")
                .parse()
                .unwrap();
        let pool = Arc::new(Pipelined::new(config, 1, "SELECT 1"));
        let callers: Vec<_> = (0..8)
            .map(|_| {
                let pool = pool.clone();
                tokio::spawn(async move { pool.get().await.map(|_| ()) })
            })
            .collect();
        for caller in callers {
            assert!(caller.await.unwrap().is_err(), "no server, no connection");
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "the callers waiting for the slot must share its attempt"
        );
        assert_eq!(pool.usage().open, 0);

        // A caller arriving after the failure tries again.
        assert!(pool.get().await.is_err());
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn slots_are_handed_out_round_robin_and_counted_in_flight() {
        let (port, accepted) = hanging_up_server(Duration::from_millis(1)).await;
        let config: tokio_postgres::Config = format!("host=127.0.0.1 port={port} user=jai")
            .parse()
            .unwrap();
        let pool = Pipelined::new(config, 3, "SELECT 1");
        for _ in 0..3 {
            assert!(pool.get().await.is_err());
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3, "one attempt per slot");
        let first = pool.enter();
        let second = pool.enter();
        assert_eq!(pool.usage().in_flight, 2);
        drop((first, second));
        assert_eq!(
            pool.usage(),
            PipelinedUsage {
                size: 3,
                open: 0,
                in_flight: 0
            }
        );
    }
}
