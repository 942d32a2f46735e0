//! etcd, the distributed configuration store: this agent's lease, the cluster
//! view, and the guarded writes.
//!
//! One lease per agent carries both `members/<name>` and, while this member
//! leads, `leader`. A [`LeaseTracker`] shared with the keepalive task records
//! when etcd last confirmed the lease, measured from the *send* time of the
//! keepalive, so the deadline the core and the health API compute is never
//! later than etcd's own.
//!
//! Every request is bounded by `retry_timeout`; writes a leader makes on behalf
//! of its term are transactions guarded by the leader key's create revision.

use crate::ha::{ClusterView, Initialize, LeaderKey, Millis};
use anyhow::{anyhow, Context, Result};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use jai_proto::{
    ClusterKeys, DynamicConfig, HistoryEntry, LeaderStatus, MemberStatus, SwitchoverIntent,
};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// This agent's lease as last confirmed by etcd. Shared by the keepalive task
/// (which writes it), the decision loop and the health API (which read it).
#[derive(Debug, Default)]
pub struct LeaseTracker {
    inner: Mutex<LeaseState>,
}

#[derive(Debug, Default, Clone, Copy)]
struct LeaseState {
    id: Option<i64>,
    valid_until: Option<Instant>,
}

impl LeaseTracker {
    /// The current lease id, if the agent holds one.
    pub fn id(&self) -> Option<i64> {
        self.lock().id
    }

    /// The lease cannot have expired before this instant.
    pub fn valid_until(&self) -> Option<Instant> {
        self.lock().valid_until
    }

    /// The lease is confirmed for at least `margin` beyond now.
    pub fn is_valid_beyond(&self, margin: Duration) -> bool {
        self.valid_until()
            .is_some_and(|until| Instant::now() + margin < until)
    }

    fn adopt(&self, id: i64, valid_until: Instant) {
        *self.lock() = LeaseState {
            id: Some(id),
            valid_until: Some(valid_until),
        };
    }

    fn confirm(&self, id: i64, valid_until: Instant) {
        let mut state = self.lock();
        if state.id == Some(id) {
            // Never move the deadline backwards: answers may arrive out of order.
            state.valid_until = state.valid_until.max(Some(valid_until));
        }
    }

    fn forget(&self, id: i64) {
        let mut state = self.lock();
        if state.id == Some(id) {
            *state = LeaseState::default();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A connection to etcd for one member of one cluster.
#[derive(Clone)]
pub struct Dcs {
    client: Client,
    keys: ClusterKeys,
    name: String,
    lease: Arc<LeaseTracker>,
    timing: Arc<Timing>,
    /// The last invalid `config` value seen, so it is reported once.
    bad_config: Arc<Mutex<Option<String>>>,
}

/// Timings shared by every clone of a [`Dcs`] (the loop, the keepalive and
/// watch tasks), so a change of the cluster config reaches all of them.
#[derive(Debug)]
struct Timing {
    request_timeout_ms: AtomicU64,
    keepalive_every_ms: AtomicU64,
}

/// The outcome of a guarded write that can lose a race.
pub type Won = bool;

impl Dcs {
    /// Connects lazily: etcd being down now is not an error, the first request fails.
    pub async fn connect(
        endpoints: &[String],
        cluster: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<Self> {
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_keep_alive(Duration::from_secs(1), timeout);
        let client = Client::connect(endpoints, Some(options))
            .await
            .with_context(|| format!("connecting to etcd at {}", endpoints.join(",")))?;
        Ok(Self {
            client,
            keys: ClusterKeys::new(cluster),
            name: name.to_owned(),
            lease: Arc::new(LeaseTracker::default()),
            timing: Arc::new(Timing {
                request_timeout_ms: AtomicU64::new(timeout.as_millis() as u64),
                keepalive_every_ms: AtomicU64::new(1000),
            }),
            bad_config: Arc::default(),
        })
    }

    /// The lease tracker, to share with the health API.
    pub fn lease(&self) -> Arc<LeaseTracker> {
        self.lease.clone()
    }

    /// This cluster's key layout.
    pub fn keys(&self) -> &ClusterKeys {
        &self.keys
    }

    /// Applies the cluster's timings: requests are bounded by `retry_timeout`,
    /// and the lease is renewed ten times per TTL (at least every `loop_wait`),
    /// so a dead leader's lease has little left to run: failover is faster.
    pub fn apply_config(&self, config: &DynamicConfig) {
        let renew_every = config.loop_wait.min(config.ttl / 10);
        self.timing
            .request_timeout_ms
            .store(config.retry_timeout.as_millis() as u64, Ordering::Relaxed);
        self.timing
            .keepalive_every_ms
            .store(renew_every.as_millis() as u64, Ordering::Relaxed);
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timing.request_timeout_ms.load(Ordering::Relaxed))
    }

    fn keepalive_every(&self) -> Duration {
        Duration::from_millis(self.timing.keepalive_every_ms.load(Ordering::Relaxed))
    }

    async fn bounded<T>(
        &self,
        what: &str,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        let timeout = self.timeout();
        match tokio::time::timeout(timeout, request).await {
            Ok(result) => result.map_err(|error| {
                let text = describe(&error);
                if is_lease_gone(&text) {
                    if let Some(id) = self.lease.id() {
                        self.forget_lost_lease(id);
                    }
                }
                anyhow!("etcd {what}: {text}")
            }),
            Err(_) => Err(anyhow!(
                "etcd {what}: no answer within {}",
                humantime::format_duration(timeout)
            )),
        }
    }

    /// etcd expired our lease (we were cut off longer than the TTL): forget it
    /// so the next round registers with a new one.
    fn forget_lost_lease(&self, id: i64) {
        tracing::warn!(lease = id, "etcd says our lease is gone: re-registering");
        self.lease.forget(id);
    }

    /// Makes sure the agent holds a live lease: adopts the lease of a leader key
    /// that still names this member (an agent restart must not cost a failover,
    /// DESIGN.md §3.6), else grants a new one.
    pub async fn ensure_lease(&self, ttl: Duration) -> Result<i64> {
        if let Some(id) = self.lease.id() {
            return Ok(id);
        }
        let mut client = self.client.clone();
        let leader = self
            .bounded("get leader", client.get(self.keys.leader(), None))
            .await?;
        if let Some(kv) = leader.kvs().first() {
            if kv.value() == self.name.as_bytes() && kv.lease() != 0 {
                let sent = Instant::now();
                if let Ok(ttl_left) = self.keep_alive_once(kv.lease()).await {
                    self.lease.adopt(kv.lease(), sent + ttl_left);
                    tracing::info!(
                        lease = kv.lease(),
                        "resumed leadership: adopted the leader key's lease"
                    );
                    return Ok(kv.lease());
                }
            }
        }
        let sent = Instant::now();
        let ttl_secs = ttl.as_secs().max(2) as i64;
        let granted = self
            .bounded("lease grant", client.lease_grant(ttl_secs, None))
            .await?;
        self.lease.adopt(
            granted.id(),
            sent + Duration::from_secs(granted.ttl() as u64),
        );
        tracing::info!(
            lease = granted.id(),
            ttl_secs = granted.ttl(),
            "granted a new lease"
        );
        Ok(granted.id())
    }

    async fn keep_alive_once(&self, id: i64) -> Result<Duration> {
        let mut client = self.client.clone();
        let (mut keeper, mut stream) = self
            .bounded("lease keepalive", client.lease_keep_alive(id))
            .await?;
        self.bounded("lease keepalive", keeper.keep_alive()).await?;
        let answer = self
            .bounded("lease keepalive", stream.message())
            .await?
            .ok_or_else(|| anyhow!("etcd closed the keepalive stream"))?;
        anyhow::ensure!(answer.ttl() > 0, "lease {id} has expired");
        Ok(Duration::from_secs(answer.ttl() as u64))
    }

    /// Renews the lease (every `loop_wait`, see [`Dcs::apply_config`]) until `stop`; wakes `lost` when etcd
    /// says the lease is gone. Failures only delay the deadline: the decision
    /// loop and the health API act on the deadline, not on errors.
    pub async fn run_keepalive(self, lost: Arc<Notify>, stop: CancellationToken) {
        let mut stream_for: Option<(
            i64,
            etcd_client::LeaseKeeper,
            etcd_client::LeaseKeepAliveStream,
        )> = None;
        loop {
            // After a failed renewal, retry quickly: an etcd leader election
            // takes a second or two and the deadline is only ttl away.
            let mut next_in = self.keepalive_every();
            if let Some(id) = self.lease.id() {
                if stream_for.as_ref().map(|(stream_id, ..)| *stream_id) != Some(id) {
                    let mut client = self.client.clone();
                    stream_for = match self
                        .bounded("lease keepalive", client.lease_keep_alive(id))
                        .await
                    {
                        Ok((keeper, stream)) => Some((id, keeper, stream)),
                        Err(error) => {
                            tracing::debug!("{error:#}");
                            next_in = KEEPALIVE_RETRY;
                            None
                        }
                    };
                }
                if let Some((_, keeper, stream)) = stream_for.as_mut() {
                    let sent = Instant::now();
                    let renewed = async {
                        keeper.keep_alive().await?;
                        stream.message().await
                    };
                    // An attempt stuck on an etcd member without a leader is
                    // abandoned early and retried (a healthy etcd answers a
                    // renewal in milliseconds: it does not go through raft).
                    match tokio::time::timeout(KEEPALIVE_ATTEMPT.min(self.timeout() / 2), renewed)
                        .await
                    {
                        Ok(Ok(Some(answer))) if answer.ttl() > 0 => {
                            self.lease
                                .confirm(id, sent + Duration::from_secs(answer.ttl() as u64));
                        }
                        Ok(Ok(Some(_))) => {
                            self.forget_lost_lease(id);
                            stream_for = None;
                            lost.notify_one();
                        }
                        Ok(Err(error)) if is_lease_gone(&describe(&error)) => {
                            self.forget_lost_lease(id);
                            stream_for = None;
                            lost.notify_one();
                        }
                        Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                            next_in = KEEPALIVE_RETRY;
                            tracing::debug!(lease = id, "lease keepalive failed; retrying");
                            stream_for = None;
                        }
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(next_in) => {}
            }
        }
    }

    /// Reads the whole cluster in one request and builds the core's view of it.
    pub async fn read_cluster(&self, fallback_config: &DynamicConfig) -> Result<ClusterView> {
        let mut client = self.client.clone();
        let response = self
            .bounded(
                "read cluster",
                client.get(self.keys.prefix(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let my_lease = self.lease.id();
        let mut view = ClusterView {
            initialize: None,
            leader: None,
            members: Vec::new(),
            config: fallback_config.clone(),
            last_leader: None,
            switchover: None,
        };
        for kv in response.kvs() {
            let key = kv.key_str().unwrap_or_default();
            let value = kv.value_str().unwrap_or_default();
            let mine = my_lease.is_some_and(|lease| kv.lease() == lease);
            if key == self.keys.initialize() {
                view.initialize = Some(if value.is_empty() {
                    Initialize::InProgress { mine }
                } else {
                    Initialize::Done {
                        system_id: value.to_owned(),
                    }
                });
            } else if key == self.keys.leader() {
                view.leader = Some(LeaderKey {
                    name: value.to_owned(),
                    term: kv.create_revision(),
                    mine: mine && value == self.name,
                });
            } else if key == self.keys.config() {
                match serde_json::from_str::<DynamicConfig>(value)
                    .map_err(|error| error.to_string())
                    .and_then(|config| config.validate().map(|_| config).map_err(|e| e.to_string()))
                {
                    Ok(config) => {
                        view.config = config;
                        *lock(&self.bad_config) = None;
                    }
                    Err(error) => {
                        let mut last = lock(&self.bad_config);
                        if last.as_deref() != Some(error.as_str()) {
                            tracing::error!(
                                "ignoring invalid cluster config in etcd ({key}): {error}; keeping the config in force"
                            );
                            *last = Some(error);
                        }
                    }
                }
            } else if key == self.keys.status() {
                view.last_leader = serde_json::from_str(value).ok();
            } else if key == self.keys.switchover() {
                match serde_json::from_str::<SwitchoverIntent>(value) {
                    Ok(intent) => view.switchover = Some(intent),
                    Err(error) => tracing::warn!("ignoring unreadable {key}: {error}"),
                }
            } else if self.keys.member_name_of(key).is_some() {
                match serde_json::from_str::<MemberStatus>(value) {
                    Ok(member) => view.members.push(member),
                    Err(error) => tracing::warn!("ignoring unreadable member key {key}: {error}"),
                }
            }
        }
        Ok(view)
    }

    /// Publishes this member's status on its lease.
    pub async fn put_member(&self, status: &MemberStatus) -> Result<()> {
        let lease = self
            .lease
            .id()
            .ok_or_else(|| anyhow!("no lease to register on"))?;
        let mut client = self.client.clone();
        let json = serde_json::to_string(status)?;
        self.bounded(
            "put member",
            client.put(
                self.keys.member(&self.name),
                json,
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await?;
        Ok(())
    }

    /// Enters the bootstrap race: creates an empty `initialize` on our lease, and
    /// seeds `config`, unless someone did first.
    pub async fn claim_initialize(&self, seed: &DynamicConfig) -> Result<Won> {
        let lease = self.lease.id().ok_or_else(|| anyhow!("no lease"))?;
        let won = self
            .create_if_absent(&self.keys.initialize(), String::new(), Some(lease))
            .await?;
        if won {
            self.create_if_absent(&self.keys.config(), serde_json::to_string(seed)?, None)
                .await?;
        }
        Ok(won)
    }

    async fn create_if_absent(&self, key: &str, value: String, lease: Option<i64>) -> Result<Won> {
        let options = lease.map(|lease| PutOptions::new().with_lease(lease));
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, options)]);
        let mut client = self.client.clone();
        Ok(self
            .bounded("create key", client.txn(txn))
            .await?
            .succeeded())
    }

    /// Ends our bootstrap: writes the system identifier into `initialize`,
    /// detached from any lease, while we still own the empty key.
    pub async fn publish_system_id(&self, system_id: &str) -> Result<Won> {
        let lease = self.lease.id().ok_or_else(|| anyhow!("no lease"))?;
        let key = self.keys.initialize();
        let txn = Txn::new()
            .when([
                Compare::value(key.clone(), CompareOp::Equal, ""),
                Compare::lease(key.clone(), CompareOp::Equal, lease),
            ])
            .and_then([TxnOp::put(key, system_id, None)]);
        let mut client = self.client.clone();
        Ok(self
            .bounded("publish system id", client.txn(txn))
            .await?
            .succeeded())
    }

    /// Takes the leader key if nobody holds it (`create_revision == 0`).
    pub async fn acquire_leader(&self) -> Result<Won> {
        let lease = self.lease.id().ok_or_else(|| anyhow!("no lease"))?;
        self.create_if_absent(&self.keys.leader(), self.name.clone(), Some(lease))
            .await
    }

    /// Deletes the leader key if it is still ours in term `term`.
    pub async fn release_leader(&self, term: i64) -> Result<Won> {
        let key = self.keys.leader();
        let txn = Txn::new()
            .when([
                Compare::create_revision(key.clone(), CompareOp::Equal, term),
                Compare::value(key.clone(), CompareOp::Equal, self.name.clone()),
            ])
            .and_then([TxnOp::delete(key, None)]);
        let mut client = self.client.clone();
        Ok(self
            .bounded("release leader", client.txn(txn))
            .await?
            .succeeded())
    }

    /// Writes `status`, only while we lead in term `term`.
    pub async fn publish_leader_status(&self, status: &LeaderStatus, term: i64) -> Result<Won> {
        let json = serde_json::to_string(status)?;
        self.put_as_leader(term, self.keys.status(), json).await
    }

    /// Appends to `history`, only while we lead in term `term`.
    pub async fn append_history(&self, entry: HistoryEntry, term: i64) -> Result<Won> {
        let key = self.keys.history();
        let mut client = self.client.clone();
        let current = self
            .bounded("read history", client.get(key.clone(), None))
            .await?;
        let (mut history, revision): (Vec<HistoryEntry>, i64) = match current.kvs().first() {
            Some(kv) => (
                serde_json::from_slice(kv.value()).unwrap_or_default(),
                kv.mod_revision(),
            ),
            None => (Vec::new(), 0),
        };
        history.push(entry);
        let txn = Txn::new()
            .when([
                Compare::create_revision(self.keys.leader(), CompareOp::Equal, term),
                Compare::mod_revision(key.clone(), CompareOp::Equal, revision),
            ])
            .and_then([TxnOp::put(key, serde_json::to_string(&history)?, None)]);
        Ok(self
            .bounded("append history", client.txn(txn))
            .await?
            .succeeded())
    }

    async fn put_as_leader(&self, term: i64, key: String, value: String) -> Result<Won> {
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.keys.leader(),
                CompareOp::Equal,
                term,
            )])
            .and_then([TxnOp::put(key, value, None)]);
        let mut client = self.client.clone();
        Ok(self
            .bounded("leader write", client.txn(txn))
            .await?
            .succeeded())
    }

    /// Deletes the `switchover` intent, only while we lead in term `term`.
    pub async fn clear_switchover(&self, term: i64) -> Result<Won> {
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.keys.leader(),
                CompareOp::Equal,
                term,
            )])
            .and_then([TxnOp::delete(self.keys.switchover(), None)]);
        let mut client = self.client.clone();
        Ok(self
            .bounded("clear switchover", client.txn(txn))
            .await?
            .succeeded())
    }

    /// Records a switchover or failover intent unless one is pending, and only
    /// if the leader key is still as the caller checked it: held in term
    /// `leader_term`, or absent for `None`.
    pub async fn record_switchover(
        &self,
        intent: &SwitchoverIntent,
        leader_term: Option<i64>,
    ) -> Result<Won> {
        let txn = Txn::new()
            .when([
                Compare::create_revision(self.keys.switchover(), CompareOp::Equal, 0),
                Compare::create_revision(
                    self.keys.leader(),
                    CompareOp::Equal,
                    leader_term.unwrap_or(0),
                ),
            ])
            .and_then([TxnOp::put(
                self.keys.switchover(),
                serde_json::to_string(intent)?,
                None,
            )]);
        let mut client = self.client.clone();
        Ok(self
            .bounded("record switchover", client.txn(txn))
            .await?
            .succeeded())
    }

    /// Deletes a pending intent; `false` when there was none.
    pub async fn cancel_switchover(&self) -> Result<bool> {
        let mut client = self.client.clone();
        let response = self
            .bounded(
                "cancel switchover",
                client.delete(self.keys.switchover(), None),
            )
            .await?;
        Ok(response.deleted() > 0)
    }

    /// Replaces `config` with `change(current)` if nobody wrote it meanwhile
    /// (compare-and-swap on its revision). Returns the config before and after.
    pub async fn update_config<E>(
        &self,
        fallback: &DynamicConfig,
        change: impl FnOnce(&DynamicConfig) -> std::result::Result<DynamicConfig, E>,
    ) -> Result<std::result::Result<(DynamicConfig, DynamicConfig), E>> {
        let key = self.keys.config();
        let mut client = self.client.clone();
        let current = self
            .bounded("read config", client.get(key.clone(), None))
            .await?;
        let (before, revision) = match current.kvs().first() {
            Some(kv) => (
                serde_json::from_slice::<DynamicConfig>(kv.value())
                    .with_context(|| format!("the config in etcd ({key}) is unreadable"))?,
                kv.mod_revision(),
            ),
            None => (fallback.clone(), 0),
        };
        let after = match change(&before) {
            Ok(after) => after,
            Err(error) => return Ok(Err(error)),
        };
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([TxnOp::put(key, serde_json::to_string(&after)?, None)]);
        let written = self
            .bounded("write config", client.txn(txn))
            .await?
            .succeeded();
        anyhow::ensure!(
            written,
            "the config changed meanwhile: read it again and retry"
        );
        Ok(Ok((before, after)))
    }

    /// The promotion history, oldest first.
    pub async fn read_history(&self) -> Result<Vec<HistoryEntry>> {
        let mut client = self.client.clone();
        let response = self
            .bounded("read history", client.get(self.keys.history(), None))
            .await?;
        Ok(match response.kvs().first() {
            Some(kv) => serde_json::from_slice(kv.value()).context("history is unreadable")?,
            None => Vec::new(),
        })
    }

    /// Leaves the cluster on shutdown: deletes our member key and revokes the lease.
    pub async fn leave(&self) -> Result<()> {
        let mut client = self.client.clone();
        self.bounded(
            "delete member",
            client.delete(self.keys.member(&self.name), None),
        )
        .await?;
        if let Some(id) = self.lease.id() {
            self.bounded("revoke lease", client.lease_revoke(id))
                .await?;
            self.lease.forget(id);
        }
        Ok(())
    }

    /// Watches the cluster prefix and wakes `changed` on every event that can
    /// change a decision: anything but a member refreshing its own status.
    pub async fn run_watch(self, changed: Arc<Notify>, stop: CancellationToken) {
        loop {
            let mut client = self.client.clone();
            let watched = client
                .watch(self.keys.prefix(), Some(WatchOptions::new().with_prefix()))
                .await;
            match watched {
                Ok(mut stream) => loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        message = stream.message() => match message {
                            Ok(Some(response)) => {
                                let relevant = response.events().iter().any(|event| {
                                    let Some(kv) = event.kv() else { return true };
                                    let key = kv.key_str().unwrap_or_default();
                                    // The leader's own `status` refresh would wake
                                    // it again and again under write load.
                                    if key == self.keys.status() {
                                        return false;
                                    }
                                    let is_member = self.keys.member_name_of(key).is_some();
                                    !is_member
                                        || event.event_type() == EventType::Delete
                                        || kv.create_revision() == kv.mod_revision()
                                });
                                if relevant {
                                    changed.notify_one();
                                }
                            }
                            Ok(None) | Err(_) => break,
                        }
                    }
                },
                Err(error) => tracing::debug!("etcd watch: {error:#}"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.keepalive_every()) => {}
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The longest one lease renewal attempt may take before it is retried.
const KEEPALIVE_ATTEMPT: Duration = Duration::from_millis(500);

/// Pause before retrying a failed lease renewal.
const KEEPALIVE_RETRY: Duration = Duration::from_millis(100);

/// etcd's answer when a lease expired or was revoked.
fn is_lease_gone(error: &str) -> bool {
    error.contains("lease not found")
}

/// etcd-client's errors print the whole gRPC status; operators need the gist.
fn describe(error: &etcd_client::Error) -> String {
    match error {
        etcd_client::Error::GRpcStatus(status) => {
            format!("{} ({:?})", status.message(), status.code())
        }
        other => other.to_string(),
    }
}

/// The lease deadline as an instant on the shell's clock.
pub fn lease_deadline_millis(
    tracker: &LeaseTracker,
    clock: &crate::shell::Clock,
) -> Option<Millis> {
    tracker.valid_until().map(|until| clock.millis_at(until))
}
