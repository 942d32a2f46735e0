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

use crate::clock::Clock;
use crate::ha::lease;
use crate::ha::store::{Key, Kv, Reply, Request, StoreError, Value};
use crate::ha::{ClusterView, Millis};
use anyhow::{Context, Result};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use jai_proto::{ClusterKeys, DynamicConfig, HistoryEntry, SwitchoverIntent};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// This agent's lease as last confirmed by etcd. Shared by the keepalive task
/// (which writes it), the decision loop and the health API (which read it).
#[derive(Default)]
pub struct LeaseTracker {
    inner: Mutex<LeaseState>,
    /// Called after every change (the fence keeper's update).
    listener: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for LeaseTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseTracker")
            .field("state", &*self.lock())
            .finish_non_exhaustive()
    }
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

    /// Calls `listener` after every change of the lease or its deadline
    /// (once set, for good).
    pub fn on_change(&self, listener: impl Fn() + Send + Sync + 'static) {
        let _ = self.listener.set(Box::new(listener));
    }

    fn changed(&self) {
        if let Some(listener) = self.listener.get() {
            listener();
        }
    }

    /// Tracks a lease granted or adopted by the decision loop.
    pub fn adopt(&self, id: i64, valid_until: Instant) {
        *self.lock() = LeaseState {
            id: Some(id),
            valid_until: Some(valid_until),
        };
        self.changed();
    }

    fn confirm(&self, id: i64, valid_until: Instant) {
        {
            let mut state = self.lock();
            if state.id != Some(id) {
                return;
            }
            // Never move the deadline backwards: answers may arrive out of order.
            state.valid_until = state.valid_until.max(Some(valid_until));
        }
        self.changed();
    }

    /// Forgets `id` (if it is still the one tracked): etcd says it is gone.
    pub fn forget(&self, id: i64) {
        {
            let mut state = self.lock();
            if state.id != Some(id) {
                return;
            }
            *state = LeaseState::default();
        }
        self.changed();
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
    /// One client per etcd member, for the keepalive task: it moves to the
    /// next member after a failed renewal, instead of letting the balanced
    /// client pick a dead member again and again while the lease runs out.
    keepalive_clients: Arc<Vec<Client>>,
    keys: ClusterKeys,
    name: String,
    lease: Arc<LeaseTracker>,
    timing: Arc<Timing>,
    /// The last unreadable value seen, so it is reported once.
    bad_value: Arc<Mutex<Option<String>>>,
}

/// Timings shared by every clone of a [`Dcs`] (the loop, the keepalive and
/// watch tasks), so a change of the cluster config reaches all of them.
#[derive(Debug)]
struct Timing {
    request_timeout_ms: AtomicU64,
    keepalive_every_ms: AtomicU64,
    keepalive_attempt_ms: AtomicU64,
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
        let client = Client::connect(endpoints, Some(options.clone()))
            .await
            .with_context(|| format!("connecting to etcd at {}", endpoints.join(",")))?;
        let mut keepalive_clients = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            keepalive_clients.push(
                Client::connect([endpoint.as_str()], Some(options.clone()))
                    .await
                    .with_context(|| format!("connecting to etcd at {endpoint}"))?,
            );
        }
        Ok(Self {
            client,
            keepalive_clients: Arc::new(keepalive_clients),
            keys: ClusterKeys::new(cluster),
            name: name.to_owned(),
            lease: Arc::new(LeaseTracker::default()),
            timing: Arc::new(Timing {
                request_timeout_ms: AtomicU64::new(timeout.as_millis() as u64),
                keepalive_every_ms: AtomicU64::new(1000),
                keepalive_attempt_ms: AtomicU64::new(lease::KEEPALIVE_ATTEMPT.as_millis() as u64),
            }),
            bad_value: Arc::default(),
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
        let store = |atomic: &AtomicU64, value: Duration| {
            atomic.store(value.as_millis() as u64, Ordering::Relaxed)
        };
        store(&self.timing.request_timeout_ms, config.retry_timeout);
        store(&self.timing.keepalive_every_ms, lease::renew_every(config));
        store(
            &self.timing.keepalive_attempt_ms,
            lease::attempt_timeout(config),
        );
    }

    fn attempt_timeout(&self) -> Duration {
        Duration::from_millis(self.timing.keepalive_attempt_ms.load(Ordering::Relaxed))
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timing.request_timeout_ms.load(Ordering::Relaxed))
    }

    fn keepalive_every(&self) -> Duration {
        Duration::from_millis(self.timing.keepalive_every_ms.load(Ordering::Relaxed))
    }

    /// A client of the cluster's etcd, for the modules that keep their own
    /// keys (backups).
    pub(crate) fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs one etcd request bounded by `retry_timeout`, its failure typed.
    pub(crate) async fn bounded<T>(
        &self,
        what: &str,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        let timeout = self.timeout();
        match tokio::time::timeout(timeout, request).await {
            Ok(result) => result.map_err(|error| classify(what, &error)),
            Err(_) => Err(StoreError::Unavailable(format!(
                "etcd {what}: no answer within {}",
                humantime::format_duration(timeout)
            ))),
        }
    }

    /// Carries out one request of a round (see [`crate::ha::driver`]).
    pub async fn execute(&self, request: Request) -> Result<Reply, StoreError> {
        match request {
            Request::ReadCluster => self.read_kvs().await.map(Reply::Kvs),
            Request::GetLeader => {
                let mut client = self.client.clone();
                let response = self
                    .bounded("get leader", client.get(self.keys.leader(), None))
                    .await?;
                Ok(Reply::Leader(response.kvs().first().map(|kv| Kv {
                    value: Value::Text(kv.value_str().unwrap_or_default().to_owned()),
                    create_revision: kv.create_revision(),
                    mod_revision: kv.mod_revision(),
                    lease: (kv.lease() != 0).then_some(kv.lease()),
                })))
            }
            Request::KeepAliveOnce(id) => self
                .keep_alive_once(id)
                .await
                .map(|ttl_secs| Reply::KeepAlive { ttl_secs }),
            Request::Grant { ttl_secs } => {
                let mut client = self.client.clone();
                let granted = self
                    .bounded("lease grant", client.lease_grant(ttl_secs, None))
                    .await?;
                Ok(Reply::Granted {
                    id: granted.id(),
                    ttl_secs: granted.ttl(),
                })
            }
            Request::PutMember { status, lease } => {
                let mut client = self.client.clone();
                let json = encode(&*status)?;
                self.bounded(
                    "put member",
                    client.put(
                        self.keys.member(&self.name),
                        json,
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                )
                .await?;
                Ok(Reply::Done)
            }
            Request::CreateIfAbsent { key, value, lease } => {
                let key = self.key(&key);
                let options = lease.map(|lease| PutOptions::new().with_lease(lease));
                let txn = Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key, encode_value(&value)?, options)]);
                self.txn("create key", txn).await
            }
            Request::PublishSystemId { lease, system_id } => {
                let key = self.keys.initialize();
                let txn = Txn::new()
                    .when([
                        Compare::value(key.clone(), CompareOp::Equal, ""),
                        Compare::lease(key.clone(), CompareOp::Equal, lease),
                    ])
                    .and_then([TxnOp::put(key, system_id, None)]);
                self.txn("publish system id", txn).await
            }
            Request::ReleaseLeader { term, name } => {
                let key = self.keys.leader();
                let txn = Txn::new()
                    .when([
                        Compare::create_revision(key.clone(), CompareOp::Equal, term),
                        Compare::value(key.clone(), CompareOp::Equal, name),
                    ])
                    .and_then([TxnOp::delete(key, None)]);
                self.txn("release leader", txn).await
            }
            Request::PutAsLeader { term, key, value } => {
                let txn = Txn::new()
                    .when([self.holds_term(term)])
                    .and_then([TxnOp::put(self.key(&key), encode_value(&value)?, None)]);
                self.txn("leader write", txn).await
            }
            Request::DeleteAsLeader { term, key } => {
                let txn = Txn::new()
                    .when([self.holds_term(term)])
                    .and_then([TxnOp::delete(self.key(&key), None)]);
                self.txn("leader delete", txn).await
            }
            Request::AppendHistory { term, entry } => self.append_history(entry, term).await,
        }
    }

    /// The comparison "the leader key is still the one of term `term`".
    fn holds_term(&self, term: i64) -> Compare {
        Compare::create_revision(self.keys.leader(), CompareOp::Equal, term)
    }

    async fn txn(&self, what: &str, txn: Txn) -> Result<Reply, StoreError> {
        let mut client = self.client.clone();
        let response = self.bounded(what, client.txn(txn)).await?;
        Ok(Reply::Txn(response.succeeded()))
    }

    /// The etcd key of `key` in this cluster's layout.
    fn key(&self, key: &Key) -> String {
        match key {
            Key::Config => self.keys.config(),
            Key::History => self.keys.history(),
            Key::Initialize => self.keys.initialize(),
            Key::Leader => self.keys.leader(),
            Key::Member(name) => self.keys.member(name),
            Key::Status => self.keys.status(),
            Key::Switchover => self.keys.switchover(),
            Key::Sync => self.keys.sync(),
            Key::Restore => self.keys.restore(),
        }
    }

    /// The typed key of an etcd key of this cluster, `None` for others.
    fn typed_key(&self, key: &str) -> Option<Key> {
        let keys = &self.keys;
        Some(if key == keys.config() {
            Key::Config
        } else if key == keys.history() {
            Key::History
        } else if key == keys.initialize() {
            Key::Initialize
        } else if key == keys.leader() {
            Key::Leader
        } else if key == keys.status() {
            Key::Status
        } else if key == keys.switchover() {
            Key::Switchover
        } else if key == keys.sync() {
            Key::Sync
        } else if key == keys.restore() {
            Key::Restore
        } else {
            Key::Member(keys.member_name_of(key)?.to_owned())
        })
    }

    /// One keepalive of lease `id`: its remaining TTL in seconds (0: gone).
    async fn keep_alive_once(&self, id: i64) -> Result<i64, StoreError> {
        let mut client = self.client.clone();
        let (mut keeper, mut stream) = self
            .bounded("lease keepalive", client.lease_keep_alive(id))
            .await?;
        self.bounded("lease keepalive", keeper.keep_alive()).await?;
        let answer = self
            .bounded("lease keepalive", stream.message())
            .await?
            .ok_or_else(|| StoreError::Unavailable("etcd closed the keepalive stream".into()))?;
        Ok(answer.ttl())
    }

    /// Renews the lease every [`lease::renew_every`] until `stop`; wakes `lost`
    /// when etcd says the lease is gone. Failures only delay the deadline: the
    /// decision loop and the health API act on the deadline, not on errors.
    pub async fn run_keepalive(self, clock: Clock, lost: Arc<Notify>, stop: CancellationToken) {
        let mut stream_for: Option<(
            i64,
            etcd_client::LeaseKeeper,
            etcd_client::LeaseKeepAliveStream,
        )> = None;
        // The member renewals go to; the next one after a failure.
        let members = self.keepalive_clients.len().max(1);
        let mut member = 0;
        loop {
            let mut next_in = self.keepalive_every();
            if let Some(id) = self.lease.id() {
                if stream_for.as_ref().map(|(stream_id, ..)| *stream_id) != Some(id) {
                    let mut client = self
                        .keepalive_clients
                        .get(member)
                        .unwrap_or(&self.client)
                        .clone();
                    stream_for = match self
                        .bounded("lease keepalive", client.lease_keep_alive(id))
                        .await
                    {
                        Ok((keeper, stream)) => Some((id, keeper, stream)),
                        Err(error) => {
                            tracing::debug!("{error}");
                            next_in = lease::KEEPALIVE_RETRY;
                            member = (member + 1) % members;
                            None
                        }
                    };
                }
                if let Some((_, keeper, stream)) = stream_for.as_mut() {
                    let sent = clock.now();
                    let renewed = async {
                        keeper.keep_alive().await?;
                        stream.message().await
                    };
                    match tokio::time::timeout(self.attempt_timeout(), renewed).await {
                        Ok(Ok(Some(answer))) if answer.ttl() > 0 => {
                            let until = lease::confirmed_until(sent, answer.ttl());
                            self.lease.confirm(id, clock.instant_at(until));
                        }
                        Ok(Ok(Some(_))) => {
                            self.forget_lost_lease(id);
                            stream_for = None;
                            lost.notify_one();
                        }
                        Ok(Err(error))
                            if matches!(classify("", &error), StoreError::LeaseGone(_)) =>
                        {
                            self.forget_lost_lease(id);
                            stream_for = None;
                            lost.notify_one();
                        }
                        Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                            next_in = lease::KEEPALIVE_RETRY;
                            member = (member + 1) % members;
                            tracing::debug!(
                                lease = id,
                                member,
                                "lease keepalive failed; retrying on the next etcd member"
                            );
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

    /// etcd expired our lease (we were cut off longer than the TTL): forget it
    /// so the next round registers with a new one.
    fn forget_lost_lease(&self, id: i64) {
        tracing::warn!(lease = id, "etcd says our lease is gone: re-registering");
        self.lease.forget(id);
    }

    /// Every key of the cluster in one range request, decoded. A value that
    /// does not decode is logged (once per distinct problem) and left out,
    /// except `config`, whose problem the caller reports.
    pub async fn read_kvs(&self) -> Result<Vec<(Key, Kv)>, StoreError> {
        let mut client = self.client.clone();
        let response = self
            .bounded(
                "read cluster",
                client.get(self.keys.prefix(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let mut kvs = Vec::with_capacity(response.kvs().len());
        for kv in response.kvs() {
            let key_text = kv.key_str().unwrap_or_default();
            let Some(key) = self.typed_key(key_text) else {
                continue;
            };
            let text = kv.value_str().unwrap_or_default();
            let value = match decode_value(&key, text) {
                Ok(value) => value,
                Err(error) => {
                    self.note_unreadable(key_text, &error);
                    continue;
                }
            };
            kvs.push((
                key,
                Kv {
                    value,
                    create_revision: kv.create_revision(),
                    mod_revision: kv.mod_revision(),
                    lease: (kv.lease() != 0).then_some(kv.lease()),
                },
            ));
        }
        Ok(kvs)
    }

    fn note_unreadable(&self, key: &str, error: &str) {
        let text = format!("ignoring unreadable {key}: {error}");
        let mut last = lock(&self.bad_value);
        if last.as_deref() != Some(text.as_str()) {
            tracing::warn!("{text}");
            *last = Some(text);
        }
    }

    /// The whole cluster as member `name` sees it (operator paths: the
    /// control API).
    pub async fn read_cluster(&self, fallback_config: &DynamicConfig) -> Result<ClusterView> {
        let kvs = self.read_kvs().await?;
        Ok(ClusterView::from_kvs(
            &kvs,
            self.lease.id(),
            &self.name,
            fallback_config,
        ))
    }

    /// Deletes the leader key if it is still ours in term `term` (shutdown).
    pub async fn release_leader(&self, term: i64) -> Result<bool, StoreError> {
        match self
            .execute(Request::ReleaseLeader {
                term,
                name: self.name.clone(),
            })
            .await?
        {
            Reply::Txn(won) => Ok(won),
            other => Err(StoreError::Invalid(format!("release answered {other:?}"))),
        }
    }

    /// Appends to `history`, only while we lead in term `term`.
    async fn append_history(&self, entry: HistoryEntry, term: i64) -> Result<Reply, StoreError> {
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
                self.holds_term(term),
                Compare::mod_revision(key.clone(), CompareOp::Equal, revision),
            ])
            .and_then([TxnOp::put(key, encode(&history)?, None)]);
        self.txn("append history", txn).await
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

/// Types an etcd failure: etcd answers `NotFound` only for a lease it does
/// not know (puts and keepalives on an expired or revoked lease).
fn classify(what: &str, error: &etcd_client::Error) -> StoreError {
    match error {
        etcd_client::Error::GRpcStatus(status) => {
            let text = format!("etcd {what}: {} ({:?})", status.message(), status.code());
            if status.code() == tonic::Code::NotFound {
                StoreError::LeaseGone(text)
            } else {
                StoreError::Unavailable(text)
            }
        }
        other => StoreError::Unavailable(format!("etcd {what}: {other}")),
    }
}

fn encode<T: serde::Serialize + ?Sized>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|error| StoreError::Invalid(error.to_string()))
}

/// A typed value as stored: JSON, or plain text for `initialize` and `leader`.
fn encode_value(value: &Value) -> Result<String, StoreError> {
    match value {
        Value::Text(text) => Ok(text.clone()),
        Value::Member(status) => encode(&**status),
        Value::Config(Ok(config)) => encode(&**config),
        Value::Config(Err(error)) => Err(StoreError::Invalid(format!(
            "refusing to store an invalid config: {error}"
        ))),
        Value::Status(status) => encode(status),
        Value::History(history) => encode(history),
        Value::Switchover(intent) => encode(&**intent),
        Value::Sync(sync) => encode(sync),
        Value::Restore(intent) => encode(&**intent),
    }
}

/// The typed value of `key` stored as `text`. `config` always decodes (its
/// problem travels in the value, for the round to report).
fn decode_value(key: &Key, text: &str) -> Result<Value, String> {
    let error = |error: serde_json::Error| error.to_string();
    Ok(match key {
        Key::Initialize | Key::Leader => Value::Text(text.to_owned()),
        Key::Config => Value::Config(
            serde_json::from_str::<DynamicConfig>(text)
                .map(Box::new)
                .map_err(error),
        ),
        Key::History => Value::History(serde_json::from_str(text).map_err(error)?),
        Key::Member(_) => Value::Member(serde_json::from_str(text).map_err(error)?),
        Key::Status => Value::Status(serde_json::from_str(text).map_err(error)?),
        Key::Switchover => Value::Switchover(serde_json::from_str(text).map_err(error)?),
        Key::Sync => Value::Sync(serde_json::from_str(text).map_err(error)?),
        Key::Restore => Value::Restore(serde_json::from_str(text).map_err(error)?),
    })
}

/// The lease deadline on the agent's clock.
pub fn lease_deadline_millis(tracker: &LeaseTracker, clock: &Clock) -> Option<Millis> {
    tracker.valid_until().map(|until| clock.millis_at(until))
}
