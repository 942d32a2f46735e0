//! Connection pools through HAProxy, and retry with backoff through a failover.
//!
//! The write pool goes to HAProxy's write port. During a switchover or a
//! failover the primary goes away for a few seconds: connections break, a
//! demoted node answers `read_only_sql_transaction`, a stopping one
//! `admin_shutdown`. Such errors are transient: the operation is retried with
//! exponential backoff until `retry_timeout` has passed, so a voter sees a
//! slower answer rather than an error. Operations retried this way must be
//! idempotent (a vote carries its idempotency key).

use crate::config::DatabaseConfig;
use crate::pipelined::{Pipelined, Shared};
use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

/// A database failure, after retries where they apply.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// Transient failures went on past the retry budget: no primary now.
    #[error("database unavailable for {waited:?}: {last}")]
    Unavailable {
        /// How long the operation was retried.
        waited: Duration,
        /// The last error seen.
        last: String,
    },
    /// An error that retrying cannot fix.
    #[error("database error: {0}")]
    Permanent(String),
}

/// The pools of one app node.
#[derive(Clone)]
pub struct Database {
    /// Through HAProxy's write port (the primary).
    pub write: Pool,
    /// Through the read port (replicas), when configured.
    pub read: Option<Pool>,
    /// Shared write connections on which votes are pipelined.
    pub votes: Arc<Pipelined>,
    retry_timeout: Duration,
}

/// How an operation went: its value and how many attempts it took.
#[derive(Debug)]
pub struct Attempted<T> {
    /// The result.
    pub value: T,
    /// 1 when the first attempt succeeded.
    pub attempts: u32,
}

impl Database {
    /// Builds the pools (connections are opened lazily).
    pub fn new(config: &DatabaseConfig, password: Option<&str>) -> anyhow::Result<Self> {
        let write = pool(&config.write, password, config)?;
        let read = match &config.read {
            Some(read) => Some(pool(read, password, config)?),
            None => None,
        };
        let votes = Pipelined::new(
            pg_config(&config.write, password, config)?,
            config.vote_connections,
            crate::store::VOTE_SQL,
        );
        Ok(Self {
            write,
            read,
            votes: Arc::new(votes),
            retry_timeout: config.retry_timeout,
        })
    }

    /// Every pool's use, as `(pool, state, value)` for the pool gauge:
    /// `write` and `read` report `size`, `available` and `waiting`; `votes`
    /// (the shared connections) `size`, `open` and `in_flight`.
    pub fn usage(&self) -> Vec<(&'static str, &'static str, usize)> {
        let mut gauges = Vec::new();
        let pools = std::iter::once(("write", &self.write))
            .chain(self.read.as_ref().map(|read| ("read", read)));
        for (pool, handle) in pools {
            let status = handle.status();
            gauges.extend([
                (pool, "size", status.size),
                (pool, "available", status.available),
                (pool, "waiting", status.waiting),
            ]);
        }
        let votes = self.votes.usage();
        gauges.extend([
            ("votes", "size", votes.size),
            ("votes", "open", votes.open),
            ("votes", "in_flight", votes.in_flight),
        ]);
        gauges
    }

    /// The pool reads should use: the read port if configured.
    pub fn reader(&self) -> &Pool {
        self.read.as_ref().unwrap_or(&self.write)
    }

    /// Runs `operation` on a write connection, retrying transient failures
    /// with backoff for up to the retry timeout.
    pub async fn write_with_retry<T, F, Fut>(
        &self,
        mut operation: F,
    ) -> Result<Attempted<T>, DbError>
    where
        F: FnMut(Object) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let mut retries = Retries::new(self.retry_timeout);
        loop {
            match attempt(&self.write, &mut operation).await {
                Ok(value) => return Ok(retries.done(value)),
                Err(failure) => retries.back_off(failure).await?,
            }
        }
    }

    /// Runs `operation` on a shared write connection (see
    /// [`crate::pipelined`]), retrying transient failures like
    /// [`Self::write_with_retry`]. A connection whose error says it reaches
    /// no primary ([`needs_new_connection`]) is dropped, so that the retry
    /// reaches whatever HAProxy routes to now.
    pub async fn vote_with_retry<T, F, Fut>(
        &self,
        mut operation: F,
    ) -> Result<Attempted<T>, DbError>
    where
        F: FnMut(Arc<Shared>) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let _in_flight = self.votes.enter();
        let mut retries = Retries::new(self.retry_timeout);
        loop {
            // Every wait is bounded by what is left of the budget: a shared
            // connection that hangs (no answer, no reset) must not hold the
            // votes on it past the time a voter was promised an answer.
            let failure = match tokio::time::timeout(retries.left(), self.votes.get()).await {
                Err(_) => Failure::Transient("no write connection within the retry budget".into()),
                Ok(Err(error)) => classify(&error),
                Ok(Ok(shared)) => {
                    match tokio::time::timeout(retries.left(), operation(shared.clone())).await {
                        Ok(Ok(value)) => return Ok(retries.done(value)),
                        Ok(Err(error)) => {
                            if needs_new_connection(&error) {
                                self.votes.discard(&shared);
                            }
                            classify(&error)
                        }
                        Err(_) => {
                            self.votes.discard(&shared);
                            Failure::Transient(
                                "no answer within the retry budget: connection dropped".into(),
                            )
                        }
                    }
                }
            };
            retries.back_off(failure).await?;
        }
    }

    /// Runs `operation` once on a read connection; on a transient failure of
    /// the read port, once more on the write port (replicas may all be down).
    pub async fn read_once<T, F, Fut>(&self, mut operation: F) -> Result<T, DbError>
    where
        F: FnMut(Object) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let mut pools = vec![self.reader()];
        if self.read.is_some() {
            pools.push(&self.write);
        }
        let mut last = String::new();
        for pool in pools {
            match attempt(pool, &mut operation).await {
                Ok(value) => return Ok(value),
                Err(Failure::Transient(message)) => last = message,
                Err(Failure::Permanent(message)) => return Err(DbError::Permanent(message)),
            }
        }
        Err(DbError::Unavailable {
            waited: Duration::ZERO,
            last,
        })
    }
}

/// The connection settings of `conninfo` with the password and timeouts.
fn pg_config(
    conninfo: &str,
    password: Option<&str>,
    config: &DatabaseConfig,
) -> anyhow::Result<tokio_postgres::Config> {
    let mut pg: tokio_postgres::Config = conninfo.parse()?;
    if let Some(password) = password {
        pg.password(password);
    }
    pg.connect_timeout(config.connect_timeout);
    pg.application_name("jai-app");
    Ok(pg)
}

fn pool(conninfo: &str, password: Option<&str>, config: &DatabaseConfig) -> anyhow::Result<Pool> {
    let pg = pg_config(conninfo, password, config)?;
    let manager = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(config.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(config.connect_timeout))
        .create_timeout(Some(config.connect_timeout))
        .build()?)
}

enum Failure {
    Transient(String),
    Permanent(String),
}

async fn attempt<T, F, Fut>(pool: &Pool, operation: &mut F) -> Result<T, Failure>
where
    F: FnMut(Object) -> Fut,
    Fut: Future<Output = Result<T, tokio_postgres::Error>>,
{
    let client = pool.get().await.map_err(|error| match &error {
        PoolError::Backend(inner) if !is_transient(inner) => Failure::Permanent(describe(inner)),
        PoolError::Backend(inner) => Failure::Transient(describe(inner)),
        _ => Failure::Transient(error.to_string()),
    })?;
    operation(client).await.map_err(|error| classify(&error))
}

fn classify(error: &tokio_postgres::Error) -> Failure {
    if is_transient(error) {
        Failure::Transient(describe(error))
    } else {
        Failure::Permanent(describe(error))
    }
}

/// The retry budget of one operation: how many attempts it took and when
/// to give up.
struct Retries {
    start: Instant,
    budget: Duration,
    attempts: u32,
}

impl Retries {
    fn new(budget: Duration) -> Self {
        Self {
            start: Instant::now(),
            budget,
            attempts: 1,
        }
    }

    /// What is left of the budget (zero once spent).
    fn left(&self) -> Duration {
        self.budget.saturating_sub(self.start.elapsed())
    }

    fn done<T>(&self, value: T) -> Attempted<T> {
        Attempted {
            value,
            attempts: self.attempts,
        }
    }

    /// After a failed attempt: an error if it was permanent or the budget
    /// is spent, else a [`backoff`] pause before the next attempt.
    async fn back_off(&mut self, failure: Failure) -> Result<(), DbError> {
        let last = match failure {
            Failure::Permanent(message) => return Err(DbError::Permanent(message)),
            Failure::Transient(last) => last,
        };
        let waited = self.start.elapsed();
        let Some(pause) = backoff(self.attempts, self.left()) else {
            return Err(DbError::Unavailable { waited, last });
        };
        tracing::debug!(
            attempts = self.attempts,
            ?pause,
            "transient database error, retrying: {last}"
        );
        tokio::time::sleep(pause).await;
        self.attempts += 1;
        Ok(())
    }
}

/// The pause before attempt `attempts + 1`: 50 ms doubling up to 1 s, with
/// jitter so that app nodes do not retry in step; `None` once `left` is spent.
pub fn backoff(attempts: u32, left: Duration) -> Option<Duration> {
    if left.is_zero() {
        return None;
    }
    let base = Duration::from_millis(50).saturating_mul(1 << attempts.min(6).saturating_sub(1));
    let base = base.min(Duration::from_secs(1));
    let jitter = rand::random_range(0.5..1.0);
    Some(base.mul_f64(jitter).min(left))
}

/// True for errors a failover causes: broken or refused connections, a
/// demoted or stopping server, a serialization conflict.
pub fn is_transient(error: &tokio_postgres::Error) -> bool {
    needs_new_connection(error)
        || error.code().is_some_and(|code| {
            code == &SqlState::T_R_SERIALIZATION_FAILURE || code == &SqlState::T_R_DEADLOCK_DETECTED
        })
}

/// True when the connection is useless for writes: it failed, closed or
/// timed out, or its server is not (or is no longer) the primary. A new
/// connection through HAProxy's write port may reach the right server.
pub fn needs_new_connection(error: &tokio_postgres::Error) -> bool {
    if let Some(db) = error.as_db_error() {
        let code = db.code();
        return code == &SqlState::READ_ONLY_SQL_TRANSACTION
            || code == &SqlState::ADMIN_SHUTDOWN
            || code == &SqlState::CRASH_SHUTDOWN
            || code == &SqlState::CANNOT_CONNECT_NOW
            || code.code().starts_with("08");
    }
    // No server error: the connection failed, closed or timed out.
    error.is_closed()
        || std::error::Error::source(error).is_some_and(|source| source.is::<std::io::Error>())
        || error.to_string().contains("timeout")
}

/// The error with its server detail (tokio-postgres prints only "db error").
pub fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => format!("{error:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_vote_on_a_silent_server_gives_up_within_the_retry_budget() {
        // It holds each connection far longer than the vote's budget, and
        // never answers: a hung primary, or a network that stopped delivering.
        let (port, _) = crate::pipelined::tests::hanging_up_server(Duration::from_secs(120)).await;
        let config = DatabaseConfig {
            write: format!("host=127.0.0.1 port={port} user=jai dbname=jai"),
            read: None,
            password_file: None,
            pool_size: 2,
            vote_connections: 1,
            retry_timeout: Duration::from_millis(300),
            connect_timeout: Duration::from_secs(5),
        };
        let db = Database::new(&config, None).unwrap();
        let outcome = tokio::time::timeout(
            Duration::from_secs(20),
            db.vote_with_retry(|shared| async move {
                shared.client.query_one(&shared.statement, &[]).await
            }),
        )
        .await
        .expect("the vote must not wait on a silent server past its budget");
        assert!(
            matches!(outcome, Err(DbError::Unavailable { .. })),
            "{outcome:?}"
        );
        assert_eq!(db.votes.usage().in_flight, 0);
    }

    #[test]
    fn backoff_grows_is_capped_and_respects_the_budget() {
        let long = Duration::from_secs(60);
        let first = backoff(1, long).unwrap();
        assert!(first >= Duration::from_millis(25) && first <= Duration::from_millis(50));
        let late = backoff(30, long).unwrap();
        assert!(late >= Duration::from_millis(500) && late <= Duration::from_secs(1));
        assert_eq!(
            backoff(30, Duration::from_millis(3)),
            Some(Duration::from_millis(3))
        );
        assert_eq!(backoff(1, Duration::ZERO), None);
    }
}
