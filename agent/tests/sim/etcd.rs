//! A simulated etcd: one linearizable key-value store with revisions, leases
//! and the transactions `jai_agent::dcs` issues (keys, values and answers are
//! the agent's own types, `jai_agent::ha::store`), with etcd's timing quirks:
//!
//! - a lease expires `ttl` after the keepalive *arrived* (etcd's clock), and its
//!   keys are deleted only by the next expiry sweep (every 500 ms);
//! - a keepalive on an expired lease answers TTL 0;
//! - while etcd elects a new leader it answers nothing, and the new leader
//!   extends every lease to its full TTL (and a little more).

use jai_proto::{DynamicConfig, SwitchoverIntent};
use std::collections::BTreeMap;

use jai_agent::ha::store::Request as AgentRequest;
pub use jai_agent::ha::store::{Key, Kv, LeaseId, Reply, StoreError, Value};

/// How often etcd's lessor revokes expired leases.
pub const SWEEP_EVERY_MS: u64 = 500;

/// A request: one of the agent's own (`jai_agent::ha::store::Request`,
/// what its round and keepalive task send), or one of the operator's calls
/// as the control API makes them.
#[derive(Debug, Clone)]
pub enum Request {
    /// What an agent sends.
    Agent(AgentRequest),
    /// `record_switchover` (the control API): txn `create_revision(switchover) == 0
    /// && create_revision(leader) == term` (0: no leader), put.
    RecordSwitchover {
        /// The intent.
        intent: Box<SwitchoverIntent>,
        /// The leader term the caller checked, `None` for no leader.
        leader_term: Option<i64>,
    },
    /// `cancel_switchover`: a plain delete; answers whether a key was deleted.
    CancelSwitchover,
    /// `update_config`: txn `mod_revision(config) == revision` (0: absent), put.
    SwapConfig {
        /// The `config` key's mod revision the caller read.
        revision: i64,
        /// The new config.
        config: Box<DynamicConfig>,
    },
}

/// One change, for the watchers.
#[derive(Debug, Clone)]
pub struct Change {
    /// The key.
    pub key: Key,
    /// Deleted (else put).
    pub deleted: bool,
    /// The put created the key (`create_revision == mod_revision`).
    pub created: bool,
}

#[derive(Debug, Clone)]
struct Lease {
    ttl_secs: i64,
    /// Real simulated time at which the lease expires.
    expires_at: u64,
}

/// The store.
#[derive(Debug)]
pub struct Etcd {
    revision: i64,
    kvs: BTreeMap<Key, Kv>,
    leases: BTreeMap<LeaseId, Lease>,
    next_lease: LeaseId,
    /// etcd's own clock drift, parts per million (a fast etcd clock expires leases early).
    clock_ppm: i64,
    /// While electing a leader (after a leader change), etcd answers nothing.
    pub unavailable_until: u64,
}

impl Etcd {
    /// An empty etcd whose clock drifts by `clock_ppm`.
    pub fn new(clock_ppm: i64) -> Self {
        Self {
            revision: 1,
            kvs: BTreeMap::new(),
            leases: BTreeMap::new(),
            next_lease: 0x7E57_0000,
            clock_ppm,
            unavailable_until: 0,
        }
    }

    /// Whether etcd answers at real time `now`.
    pub fn available(&self, now: u64) -> bool {
        now >= self.unavailable_until
    }

    /// A key's current value (ground truth, for the invariant checks).
    pub fn get(&self, key: &Key) -> Option<&Kv> {
        self.kvs.get(key)
    }

    /// `ttl_secs` of etcd's clock, in real milliseconds.
    fn ttl_real(&self, ttl_secs: i64) -> u64 {
        let ms = ttl_secs as u64 * 1000;
        ms * 1_000_000 / (1_000_000 + self.clock_ppm) as u64
    }

    /// Applies one request at real time `now`.
    pub fn apply(
        &mut self,
        now: u64,
        request: Request,
    ) -> (Result<Reply, StoreError>, Vec<Change>) {
        let mut changes = Vec::new();
        let reply = match request {
            Request::Agent(AgentRequest::ReadCluster) => Ok(Reply::Kvs(
                self.kvs
                    .iter()
                    .map(|(key, kv)| (key.clone(), kv.clone()))
                    .collect(),
            )),
            Request::Agent(AgentRequest::GetLeader) => {
                Ok(Reply::Leader(self.kvs.get(&Key::Leader).cloned()))
            }
            Request::Agent(AgentRequest::KeepAliveOnce(id)) => Ok(Reply::KeepAlive {
                ttl_secs: self.keep_alive(id, now),
            }),
            Request::Agent(AgentRequest::Grant { ttl_secs }) => {
                self.next_lease += 1;
                let id = self.next_lease;
                let expires_at = now + self.ttl_real(ttl_secs);
                self.leases.insert(
                    id,
                    Lease {
                        ttl_secs,
                        expires_at,
                    },
                );
                Ok(Reply::Granted { id, ttl_secs })
            }
            Request::Agent(AgentRequest::PutMember { status, lease }) => self
                .put(
                    Key::Member(status.name.clone()),
                    Value::Member(status),
                    Some(lease),
                    &mut changes,
                )
                .map(|()| Reply::Done),
            Request::Agent(AgentRequest::CreateIfAbsent { key, value, lease }) => {
                if self.kvs.contains_key(&key) {
                    Ok(Reply::Txn(false))
                } else {
                    self.put(key, value, lease, &mut changes)
                        .map(|()| Reply::Txn(true))
                }
            }
            Request::Agent(AgentRequest::PublishSystemId { lease, system_id }) => {
                let ok = self.kvs.get(&Key::Initialize).is_some_and(|kv| {
                    kv.value == Value::Text(String::new()) && kv.lease == Some(lease)
                });
                if ok {
                    self.put(Key::Initialize, Value::Text(system_id), None, &mut changes)
                        .map(|()| Reply::Txn(true))
                } else {
                    Ok(Reply::Txn(false))
                }
            }
            Request::Agent(AgentRequest::ReleaseLeader { term, name }) => {
                let ok = self.kvs.get(&Key::Leader).is_some_and(|kv| {
                    kv.create_revision == term && kv.value == Value::Text(name.clone())
                });
                if ok {
                    self.revision += 1;
                    self.delete(&Key::Leader, &mut changes);
                }
                Ok(Reply::Txn(ok))
            }
            Request::Agent(AgentRequest::PutAsLeader { term, key, value }) => {
                if self.term() == Some(term) {
                    self.put(key, value, None, &mut changes)
                        .map(|()| Reply::Txn(true))
                } else {
                    Ok(Reply::Txn(false))
                }
            }
            Request::Agent(AgentRequest::AppendHistory { term, entry }) => {
                if self.term() == Some(term) {
                    let mut history = match self.kvs.get(&Key::History) {
                        Some(Kv {
                            value: Value::History(history),
                            ..
                        }) => history.clone(),
                        _ => Vec::new(),
                    };
                    history.push(entry);
                    self.put(Key::History, Value::History(history), None, &mut changes)
                        .map(|()| Reply::Txn(true))
                } else {
                    Ok(Reply::Txn(false))
                }
            }
            Request::Agent(AgentRequest::DeleteAsLeader { term, key }) => {
                let ok = self.term() == Some(term);
                if ok && self.kvs.contains_key(&key) {
                    self.revision += 1;
                    self.delete(&key, &mut changes);
                }
                Ok(Reply::Txn(ok))
            }
            Request::RecordSwitchover {
                intent,
                leader_term,
            } => {
                let ok = !self.kvs.contains_key(&Key::Switchover) && self.term() == leader_term;
                if ok {
                    self.put(
                        Key::Switchover,
                        Value::Switchover(intent),
                        None,
                        &mut changes,
                    )
                    .map(|()| Reply::Txn(true))
                } else {
                    Ok(Reply::Txn(false))
                }
            }
            Request::CancelSwitchover => {
                let present = self.kvs.contains_key(&Key::Switchover);
                if present {
                    self.revision += 1;
                    self.delete(&Key::Switchover, &mut changes);
                }
                Ok(Reply::Txn(present))
            }
            Request::SwapConfig { revision, config } => {
                let current = self.kvs.get(&Key::Config).map_or(0, |kv| kv.mod_revision);
                if current == revision {
                    self.put(Key::Config, Value::Config(Ok(config)), None, &mut changes)
                        .map(|()| Reply::Txn(true))
                } else {
                    Ok(Reply::Txn(false))
                }
            }
        };
        (reply, changes)
    }

    /// The current leader key's create revision.
    fn term(&self) -> Option<i64> {
        self.kvs.get(&Key::Leader).map(|kv| kv.create_revision)
    }

    fn keep_alive(&mut self, id: LeaseId, now: u64) -> i64 {
        let ttl_real = |ttl_secs| self.ttl_real(ttl_secs);
        match self.leases.get(&id) {
            Some(lease) if lease.expires_at > now => {
                let ttl_secs = lease.ttl_secs;
                let expires_at = now + ttl_real(ttl_secs);
                let lease = self.leases.get_mut(&id).expect("checked above");
                lease.expires_at = lease.expires_at.max(expires_at);
                ttl_secs
            }
            _ => 0,
        }
    }

    fn put(
        &mut self,
        key: Key,
        value: Value,
        lease: Option<LeaseId>,
        changes: &mut Vec<Change>,
    ) -> Result<(), StoreError> {
        if let Some(id) = lease {
            if !self.leases.contains_key(&id) {
                return Err(StoreError::LeaseGone(format!(
                    "etcdserver: requested lease not found ({id:x})"
                )));
            }
        }
        self.revision += 1;
        let revision = self.revision;
        let create_revision = self.kvs.get(&key).map_or(revision, |kv| kv.create_revision);
        changes.push(Change {
            key: key.clone(),
            deleted: false,
            created: create_revision == revision,
        });
        self.kvs.insert(
            key,
            Kv {
                value,
                create_revision,
                mod_revision: revision,
                lease,
            },
        );
        Ok(())
    }

    fn delete(&mut self, key: &Key, changes: &mut Vec<Change>) {
        if self.kvs.remove(key).is_some() {
            changes.push(Change {
                key: key.clone(),
                deleted: true,
                created: false,
            });
        }
    }

    /// The lessor's periodic sweep: revokes expired leases and deletes their keys.
    /// Returns the revoked lease ids.
    pub fn sweep(&mut self, now: u64, changes: &mut Vec<Change>) -> Vec<LeaseId> {
        if !self.available(now) {
            return Vec::new();
        }
        let expired: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, lease)| lease.expires_at <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in &expired {
            self.leases.remove(id);
            let keys: Vec<Key> = self
                .kvs
                .iter()
                .filter(|(_, kv)| kv.lease == Some(*id))
                .map(|(key, _)| key.clone())
                .collect();
            if !keys.is_empty() {
                self.revision += 1;
            }
            for key in keys {
                self.delete(&key, changes);
            }
        }
        expired
    }

    /// A new etcd leader took over at `now`: every lease gets its full TTL
    /// again, plus `extra_ms` (etcd adds the election timeout).
    pub fn extend_all_leases(&mut self, now: u64, extra_ms: u64) {
        let ttls: Vec<(LeaseId, u64)> = self
            .leases
            .iter()
            .map(|(id, lease)| (*id, self.ttl_real(lease.ttl_secs)))
            .collect();
        for (id, ttl_real) in ttls {
            let lease = self.leases.get_mut(&id).expect("listed above");
            lease.expires_at = lease.expires_at.max(now + ttl_real + extra_ms);
        }
    }
}
