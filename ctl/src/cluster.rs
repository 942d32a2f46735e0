//! The cluster as etcd holds it, read in one request.
//!
//! `jaictl` reads state straight from etcd (one round trip, no agent needed,
//! works while agents are down) and changes it only through the agents.

use crate::config::CtlConfig;
use crate::error::CtlError;
use etcd_client::{Client, ConnectOptions, GetOptions};
use jai_proto::{
    ClusterKeys, DynamicConfig, HistoryEntry, LeaderStatus, MemberRole, MemberStatus,
    SwitchoverIntent, SyncState,
};
use serde::Serialize;

/// Everything under `/jai/<cluster>/`.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterState {
    /// The cluster's name.
    pub cluster: String,
    /// The system identifier, once bootstrapped.
    pub system_id: Option<String>,
    /// Who holds the leader key.
    pub leader: Option<String>,
    /// The members, by name.
    pub members: Vec<MemberStatus>,
    /// The cluster config (defaults when the key is missing).
    pub config: DynamicConfig,
    /// A pending switchover or failover.
    pub switchover: Option<SwitchoverIntent>,
    /// The leader's last published position.
    pub last_leader: Option<LeaderStatus>,
    /// Every promotion.
    pub history: Vec<HistoryEntry>,
    /// The standbys the leader's commits wait for (synchronous mode).
    pub sync: Option<SyncState>,
    /// A whole-cluster restore under way (`restore`).
    pub restore: Option<jai_proto::RestoreIntent>,
    /// The backup job requested or running (`backup/job`).
    pub backup_job: Option<jai_proto::BackupJob>,
    /// How the last backup job ended.
    pub last_backup: Option<jai_proto::JobResult>,
    /// How the last restore drill ended.
    pub last_verify: Option<jai_proto::JobResult>,
    /// The leader's WAL archiver.
    pub archive: Option<jai_proto::ArchiveStatus>,
    /// Keys that could not be read, and why: the rest is still shown.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unreadable: Vec<Unreadable>,
}

/// A key whose value does not parse.
#[derive(Debug, Clone, Serialize)]
pub struct Unreadable {
    /// The etcd key.
    pub key: String,
    /// Why it does not parse.
    pub error: String,
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "etcd key {} is unreadable ({}); shown without it",
            self.key, self.error
        )
    }
}

impl ClusterState {
    /// The member called `name`.
    pub fn member(&self, name: &str) -> Option<&MemberStatus> {
        self.members.iter().find(|member| member.name == name)
    }

    /// The leader's member status, when it is registered.
    pub fn leader_member(&self) -> Option<&MemberStatus> {
        self.leader.as_deref().and_then(|name| self.member(name))
    }

    /// The position replicas are measured against: the leader's current
    /// write position when it reports one, else the last published one.
    pub fn leader_position(&self) -> Option<jai_proto::Lsn> {
        self.leader_member()
            .filter(|leader| leader.role == MemberRole::Primary)
            .and_then(|leader| leader.write_lsn)
            .or(self.last_leader.as_ref().map(|status| status.optime))
    }

    /// `name` is a synchronous standby of the current leader.
    pub fn is_sync_standby(&self, name: &str) -> bool {
        self.config.synchronous_mode.is_on()
            && self.sync.as_ref().is_some_and(|sync| {
                Some(sync.leader.as_str()) == self.leader.as_deref()
                    && sync.members.iter().any(|member| member == name)
            })
    }

    /// `member` must exist; the error lists who does.
    pub fn require_member(&self, name: &str) -> Result<&MemberStatus, CtlError> {
        self.member(name).ok_or_else(|| {
            let known: Vec<&str> = self.members.iter().map(|m| m.name.as_str()).collect();
            CtlError::Usage(format!(
                "{name} is not a member of cluster {} (members: {})",
                self.cluster,
                known.join(", ")
            ))
        })
    }
}

/// An etcd client for the config's endpoints.
pub async fn connect(config: &CtlConfig) -> Result<Client, CtlError> {
    let options = ConnectOptions::new()
        .with_connect_timeout(config.timeout)
        .with_timeout(config.timeout);
    Client::connect(&config.etcd.endpoints, Some(options))
        .await
        .map_err(|error| unreachable_etcd(config, &error))
}

/// The error for an etcd that does not answer, naming what to check.
pub fn unreachable_etcd(config: &CtlConfig, error: &etcd_client::Error) -> CtlError {
    CtlError::Unreachable(format!(
        "etcd unreachable at {} ({error}): check that etcd runs and that --etcd / etcd.endpoints is right",
        config.etcd.endpoints.join(",")
    ))
}

/// Reads the whole cluster in one range request.
pub async fn read(client: &mut Client, config: &CtlConfig) -> Result<ClusterState, CtlError> {
    let keys = ClusterKeys::new(&config.cluster);
    let response = client
        .get(keys.prefix(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|error| unreachable_etcd(config, &error))?;
    let mut state = ClusterState {
        cluster: config.cluster.clone(),
        system_id: None,
        leader: None,
        members: Vec::new(),
        config: DynamicConfig::default(),
        switchover: None,
        last_leader: None,
        history: Vec::new(),
        sync: None,
        restore: None,
        backup_job: None,
        last_backup: None,
        last_verify: None,
        archive: None,
        unreadable: Vec::new(),
    };
    // One unreadable key must not hide the rest of the cluster.
    let mut unreadable = Vec::new();
    for kv in response.kvs() {
        let key = kv.key_str().unwrap_or_default();
        let value = kv.value_str().unwrap_or_default();
        if key == keys.initialize() {
            state.system_id = Some(value.to_owned()).filter(|id| !id.is_empty());
        } else if key == keys.leader() {
            state.leader = Some(value.to_owned());
        } else if key == keys.config() {
            if let Some(config) = parse(key, value, &mut unreadable) {
                state.config = config;
            }
        } else if key == keys.switchover() {
            state.switchover = parse(key, value, &mut unreadable);
        } else if key == keys.status() {
            state.last_leader = parse(key, value, &mut unreadable);
        } else if key == keys.sync() {
            state.sync = parse(key, value, &mut unreadable);
        } else if key == keys.history() {
            state.history = parse(key, value, &mut unreadable).unwrap_or_default();
        } else if key == keys.restore() {
            state.restore = parse(key, value, &mut unreadable);
        } else if key == keys.backup_job() {
            state.backup_job = parse(key, value, &mut unreadable);
        } else if key == keys.backup_last() {
            state.last_backup = parse(key, value, &mut unreadable);
        } else if key == keys.backup_archive() {
            state.archive = parse(key, value, &mut unreadable);
        } else if key == keys.backup_last_verify() {
            state.last_verify = parse(key, value, &mut unreadable);
        } else if keys.member_name_of(key).is_some() {
            state.members.extend(parse(key, value, &mut unreadable));
        }
    }
    state.unreadable = unreadable;
    state.members.sort_by(|a, b| a.name.cmp(&b.name));
    if state.system_id.is_none() && state.members.is_empty() {
        return Err(CtlError::Refused(format!(
            "no cluster {:?} in etcd at {}: check the cluster name (--cluster / cluster:)",
            config.cluster,
            config.etcd.endpoints.join(",")
        )));
    }
    Ok(state)
}

/// `value` of `key` parsed, or `None` with the key noted as unreadable.
fn parse<T: serde::de::DeserializeOwned>(
    key: &str,
    value: &str,
    unreadable: &mut Vec<Unreadable>,
) -> Option<T> {
    match serde_json::from_str(value) {
        Ok(parsed) => Some(parsed),
        Err(error) => {
            unreadable.push(Unreadable {
                key: key.to_owned(),
                error: error.to_string(),
            });
            None
        }
    }
}

impl ClusterState {
    /// The cluster config, unless its key is unreadable: changing or showing
    /// a config that could not be read would show or change the defaults.
    pub fn readable_config(&self) -> Result<&DynamicConfig, CtlError> {
        match self.unreadable.iter().find(|key| key.key.ends_with("/config")) {
            Some(bad) => Err(CtlError::Refused(format!(
                "etcd key {} is unreadable ({}): fix or delete it with etcdctl before changing the config",
                bad.key, bad.error
            ))),
            None => Ok(&self.config),
        }
    }
}
