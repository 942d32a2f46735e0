//! The etcd requests a round makes, typed: what the [`super::driver`] asks
//! for, what the shell's `dcs` module sends to etcd, and what the simulator's
//! etcd answers.
//!
//! Keys and values are typed here ([`Key`], [`Value`]); the shell encodes
//! them as the real key layout (`jai_proto::ClusterKeys`) and JSON. The
//! decoding of the keys into the core's [`ClusterView`] ([`ClusterView::from_kvs`])
//! is shared, so the simulator checks the view the agent really builds.

use super::model::{ClusterView, Initialize, LeaderKey};
use jai_proto::{
    DynamicConfig, HistoryEntry, LeaderStatus, MemberStatus, RestoreIntent, SwitchoverIntent,
    SyncState,
};

/// An etcd lease id.
pub type LeaseId = i64;

/// A key of one cluster (`/jai/<cluster>/…` in etcd).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    /// `config`
    Config,
    /// `history`
    History,
    /// `initialize`
    Initialize,
    /// `leader`
    Leader,
    /// `members/<name>`
    Member(String),
    /// `status`
    Status,
    /// `switchover`
    Switchover,
    /// `sync`
    Sync,
    /// `restore`
    Restore,
}

/// A stored value, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `initialize` (empty, or a system id) and `leader` (a member name).
    Text(String),
    /// `members/<name>`.
    Member(Box<MemberStatus>),
    /// `config`; `Err` holds why the stored text is not a config.
    Config(Result<Box<DynamicConfig>, String>),
    /// `status`.
    Status(LeaderStatus),
    /// `history`.
    History(Vec<HistoryEntry>),
    /// `switchover`.
    Switchover(Box<SwitchoverIntent>),
    /// `sync`.
    Sync(SyncState),
    /// `restore`.
    Restore(Box<RestoreIntent>),
}

/// A key's value and metadata, as etcd returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct Kv {
    /// The value.
    pub value: Value,
    /// Revision of the put that created the key (the leader's term for `leader`).
    pub create_revision: i64,
    /// Revision of the last put.
    pub mod_revision: i64,
    /// The lease the key is attached to.
    pub lease: Option<LeaseId>,
}

/// One request of a round, as the shell's `dcs` module carries it out.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// The whole cluster prefix in one range request.
    ReadCluster,
    /// `leader` alone: whose it is and on which lease (to adopt that lease
    /// after an agent restart).
    GetLeader,
    /// One keepalive of a lease; answers its remaining TTL (0: gone).
    KeepAliveOnce(LeaseId),
    /// A new lease.
    Grant {
        /// TTL asked for, in seconds.
        ttl_secs: i64,
    },
    /// `members/<name>` on the lease.
    PutMember {
        /// The status.
        status: Box<MemberStatus>,
        /// The lease.
        lease: LeaseId,
    },
    /// Transaction: `create_revision(key) == 0`, then put.
    CreateIfAbsent {
        /// Key.
        key: Key,
        /// Value.
        value: Value,
        /// Lease to attach.
        lease: Option<LeaseId>,
    },
    /// Transaction: `value(initialize) == "" && lease(initialize) == lease`,
    /// then put the system id without a lease.
    PublishSystemId {
        /// The claimer's lease.
        lease: LeaseId,
        /// The new cluster's system identifier.
        system_id: String,
    },
    /// Transaction: `create_revision(leader) == term && value(leader) == name`, delete.
    ReleaseLeader {
        /// The term.
        term: i64,
        /// This member.
        name: String,
    },
    /// Transaction: `create_revision(leader) == term`, put.
    PutAsLeader {
        /// The term.
        term: i64,
        /// Key.
        key: Key,
        /// Value.
        value: Value,
    },
    /// Transaction: `create_revision(leader) == term`, delete.
    DeleteAsLeader {
        /// The term.
        term: i64,
        /// Key.
        key: Key,
    },
    /// Read `history`, then a transaction guarded by the term and the key's
    /// mod revision that appends `entry`.
    AppendHistory {
        /// The term.
        term: i64,
        /// The new entry.
        entry: HistoryEntry,
    },
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The cluster prefix, decoded (keys of other layouts left out).
    Kvs(Vec<(Key, Kv)>),
    /// The `leader` key, if any.
    Leader(Option<Kv>),
    /// A keepalive: the remaining TTL in seconds, 0 when the lease is gone.
    KeepAlive {
        /// Seconds.
        ttl_secs: i64,
    },
    /// A granted lease.
    Granted {
        /// Its id.
        id: LeaseId,
        /// Its TTL in seconds.
        ttl_secs: i64,
    },
    /// A plain put.
    Done,
    /// A transaction: whether its comparison held (the write happened).
    Txn(bool),
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// etcd says the lease is gone (expired or revoked): forget it and
    /// register a new one.
    LeaseGone(String),
    /// No answer within the request bound, or etcd refused: try again later.
    Unavailable(String),
    /// The request could not even be encoded (a bug) or the answer decoded.
    Invalid(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::LeaseGone(text) | Self::Unavailable(text) | Self::Invalid(text) => {
                f.write_str(text)
            }
        }
    }
}

impl std::error::Error for StoreError {}

impl ClusterView {
    /// The core's view of a cluster's keys as seen by member `name` holding
    /// `lease` (`None`: no lease, e.g. an operator). `fallback` is the config
    /// until a valid `config` key exists: an invalid one is ignored (the
    /// caller reports it) so a bad edit never changes the timings in force.
    pub fn from_kvs(
        kvs: &[(Key, Kv)],
        lease: Option<LeaseId>,
        name: &str,
        fallback: &DynamicConfig,
    ) -> Self {
        let mut view = ClusterView {
            restore: None,
            initialize: None,
            leader: None,
            members: Vec::new(),
            config: fallback.clone(),
            last_leader: None,
            switchover: None,
            sync: None,
        };
        for (key, kv) in kvs {
            let mine = lease.is_some() && kv.lease == lease;
            match (key, &kv.value) {
                (Key::Initialize, Value::Text(value)) => {
                    view.initialize = Some(if value.is_empty() {
                        Initialize::InProgress { mine }
                    } else {
                        Initialize::Done {
                            system_id: value.clone(),
                        }
                    });
                }
                (Key::Leader, Value::Text(leader)) => {
                    view.leader = Some(LeaderKey {
                        name: leader.clone(),
                        term: kv.create_revision,
                        mine: mine && leader == name,
                    });
                }
                (Key::Config, Value::Config(Ok(config))) if config.validate().is_ok() => {
                    view.config = (**config).clone();
                }
                (Key::Status, Value::Status(status)) => view.last_leader = Some(status.clone()),
                (Key::Member(_), Value::Member(member)) => view.members.push((**member).clone()),
                (Key::Switchover, Value::Switchover(intent)) => {
                    view.switchover = Some((**intent).clone());
                }
                (Key::Sync, Value::Sync(sync)) => view.sync = Some(sync.clone()),
                (Key::Restore, Value::Restore(intent)) => {
                    view.restore = Some((**intent).clone());
                }
                _ => {}
            }
        }
        view
    }
}

/// Why the `config` key in `kvs` is not used, if it is not: unreadable or
/// invalid. The view keeps the config in force; the caller says why once.
pub fn rejected_config(kvs: &[(Key, Kv)]) -> Option<String> {
    kvs.iter().find_map(|(key, kv)| match (key, &kv.value) {
        (Key::Config, Value::Config(Err(error))) => Some(error.clone()),
        (Key::Config, Value::Config(Ok(config))) => config.validate().err().map(|e| e.to_string()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(value: Value, create_revision: i64, lease: Option<LeaseId>) -> Kv {
        Kv {
            value,
            create_revision,
            mod_revision: create_revision,
            lease,
        }
    }

    #[test]
    fn the_leader_key_is_mine_only_on_my_lease_and_with_my_name() {
        let config = DynamicConfig::default();
        let kvs = vec![(Key::Leader, kv(Value::Text("pg1".into()), 7, Some(3)))];
        let mine = ClusterView::from_kvs(&kvs, Some(3), "pg1", &config);
        assert_eq!(
            mine.leader,
            Some(LeaderKey {
                name: "pg1".into(),
                term: 7,
                mine: true
            })
        );
        let other_lease = ClusterView::from_kvs(&kvs, Some(4), "pg1", &config);
        assert!(!other_lease.leader.unwrap().mine);
        let other_name = ClusterView::from_kvs(&kvs, Some(3), "pg2", &config);
        assert!(!other_name.leader.unwrap().mine);
    }

    #[test]
    fn an_invalid_config_keeps_the_one_in_force_and_says_why() {
        let fallback = DynamicConfig::default();
        let bad = DynamicConfig {
            ttl: std::time::Duration::from_millis(1),
            ..DynamicConfig::default()
        };
        let kvs = vec![(Key::Config, kv(Value::Config(Ok(Box::new(bad))), 2, None))];
        let view = ClusterView::from_kvs(&kvs, None, "pg1", &fallback);
        assert_eq!(view.config, fallback);
        assert!(rejected_config(&kvs).is_some());
        let unreadable = vec![(
            Key::Config,
            kv(Value::Config(Err("not JSON".into())), 2, None),
        )];
        assert_eq!(rejected_config(&unreadable).as_deref(), Some("not JSON"));
    }
}
