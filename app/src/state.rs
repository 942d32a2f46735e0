//! What every handler shares, and the degraded-mode state.
//!
//! Degraded mode has two sources. The operator's switch lives in PostgreSQL
//! (`app_settings`), so every app node agrees on it; each node reads it once a
//! second together with a probe of the primary. When no primary answers, the
//! node shows the read-only banner and serves cached results; votes are still
//! tried (with the retry budget), so a switchover of a few seconds costs
//! voters a slower answer, not a refusal. When the operator switched degraded
//! mode on, votes are refused at once with "try again shortly".

use crate::cache::TtlCache;
use crate::config::{AppConfig, Secrets};
use crate::db::Database;
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::signing::Signer;
use crate::store::{Poll, PollSummary, Results};
use crate::views::ViewCounter;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Shared by all handlers of both listeners.
pub struct App {
    /// The validated configuration.
    pub config: AppConfig,
    /// The admin credential hash.
    pub admin_hash: String,
    /// The bearer token `/metrics` requires, if configured.
    pub metrics_token: Option<String>,
    /// Database pools.
    pub db: Database,
    /// Cookie and CSRF signatures.
    pub signer: Signer,
    /// Open polls for the front page.
    pub poll_list: TtlCache<(), Vec<PollSummary>>,
    /// Polls with options, by id (`None`: no such poll).
    pub polls: TtlCache<i64, Option<Poll>>,
    /// Results, by poll id.
    pub results: TtlCache<i64, Option<Results>>,
    /// Page views not yet written.
    pub views: ViewCounter,
    /// Votes per voter.
    pub voter_limit: RateLimiter,
    /// Votes per client address.
    pub ip_limit: RateLimiter,
    /// Admin login attempts per client address.
    pub login_limit: RateLimiter,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    operator_degraded: AtomicBool,
    primary_reachable: AtomicBool,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("App")
    }
}

/// Admin login attempts allowed per address per minute.
const LOGINS_PER_MINUTE: u32 = 10;
/// Polls (and results) cached per node, existing or not (docs/app.md).
const MAX_CACHED_POLLS: usize = 10_000;

impl App {
    /// Builds the shared state (no connection is opened yet).
    pub fn new(config: AppConfig, secrets: Secrets) -> anyhow::Result<Self> {
        let db = Database::new(&config.database, secrets.db_password.as_deref())?;
        let ttl = config.cache.results_ttl;
        Ok(Self {
            admin_hash: secrets.admin_hash,
            metrics_token: secrets.metrics_token,
            signer: Signer::new(&secrets.cookie_key),
            poll_list: TtlCache::new(ttl, 4),
            polls: TtlCache::new(ttl, MAX_CACHED_POLLS),
            results: TtlCache::new(ttl, MAX_CACHED_POLLS),
            views: ViewCounter::default(),
            voter_limit: RateLimiter::new(config.limits.votes_per_voter_per_minute),
            ip_limit: RateLimiter::new(config.limits.votes_per_ip_per_minute),
            login_limit: RateLimiter::new(LOGINS_PER_MINUTE),
            metrics: Arc::new(Metrics::default()),
            operator_degraded: AtomicBool::new(false),
            primary_reachable: AtomicBool::new(true),
            db,
            config,
        })
    }

    /// True while the site is read-only (banner shown).
    pub fn degraded(&self) -> bool {
        self.operator_degraded() || !self.primary_reachable.load(Ordering::Relaxed)
    }

    /// True while the operator has switched degraded mode on.
    pub fn operator_degraded(&self) -> bool {
        self.operator_degraded.load(Ordering::Relaxed)
    }

    /// Records what the probe or a failed write learnt about the primary.
    pub fn set_primary_reachable(&self, reachable: bool) {
        let was = self.primary_reachable.swap(reachable, Ordering::Relaxed);
        if was != reachable {
            tracing::warn!(reachable, "primary reachability changed");
        }
    }

    /// Records the operator switch as read from the database (or just set).
    pub fn set_operator_degraded(&self, on: bool) {
        let was = self.operator_degraded.swap(on, Ordering::Relaxed);
        if was != on {
            tracing::warn!(on, "operator degraded mode changed");
        }
    }

    /// One probe: is there a writable primary, and what does the switch say?
    pub async fn probe(&self) {
        let probe = async {
            let client = self.db.write.get().await.ok()?;
            let row = client
                .query_one(
                    "SELECT pg_is_in_recovery(),
                            coalesce((SELECT value FROM app_settings WHERE key = 'degraded'), 'off')",
                    &[],
                )
                .await
                .ok()?;
            Some((!row.get::<_, bool>(0), row.get::<_, String>(1) == "on"))
        };
        let timeout = self.config.database.connect_timeout + Duration::from_secs(1);
        match tokio::time::timeout(timeout, probe).await.ok().flatten() {
            Some((writable, switch)) => {
                self.set_primary_reachable(writable);
                self.set_operator_degraded(switch);
            }
            None => self.set_primary_reachable(false),
        }
    }
}
