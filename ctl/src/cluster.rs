//! The cluster as etcd holds it, read in one request.
//!
//! `jaictl` reads state straight from etcd (one round trip, no agent needed,
//! works while agents are down) and changes it only through the agents.

use crate::config::CtlConfig;
use crate::error::CtlError;
use etcd_client::{Client, ConnectOptions, GetOptions};
use jai_proto::{
    ClusterKeys, DynamicConfig, HistoryEntry, LeaderStatus, MemberRole, MemberStatus,
    SwitchoverIntent,
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
    };
    for kv in response.kvs() {
        let key = kv.key_str().unwrap_or_default();
        let value = kv.value_str().unwrap_or_default();
        if key == keys.initialize() {
            state.system_id = Some(value.to_owned()).filter(|id| !id.is_empty());
        } else if key == keys.leader() {
            state.leader = Some(value.to_owned());
        } else if key == keys.config() {
            state.config = parse(key, value)?;
        } else if key == keys.switchover() {
            state.switchover = Some(parse(key, value)?);
        } else if key == keys.status() {
            state.last_leader = Some(parse(key, value)?);
        } else if key == keys.history() {
            state.history = parse(key, value)?;
        } else if keys.member_name_of(key).is_some() {
            state.members.push(parse(key, value)?);
        }
    }
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

fn parse<T: serde::de::DeserializeOwned>(key: &str, value: &str) -> Result<T, CtlError> {
    serde_json::from_str(value)
        .map_err(|error| CtlError::Refused(format!("etcd key {key} is unreadable: {error}")))
}
