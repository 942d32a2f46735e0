//! What an agent publishes about its node under `members/<name>`.

use crate::Lsn;
use serde::{Deserialize, Serialize};

/// The role PostgreSQL plays on a member, as the member's agent last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberRole {
    /// Running and accepting writes (not in recovery).
    Primary,
    /// Running in recovery: a streaming or catching-up standby.
    Replica,
    /// No PostgreSQL runs on the node, or the agent cannot tell what it is.
    Unknown,
}

/// What the member is doing, for operators and for the election.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// PostgreSQL runs and answers queries.
    Running,
    /// PostgreSQL is being started.
    Starting,
    /// PostgreSQL is stopped.
    Stopped,
    /// `initdb` of a new cluster is under way on this member.
    Bootstrapping,
    /// `pg_basebackup` from the leader is under way.
    Cloning,
    /// Waiting for another member (bootstrap, or a leader to clone from).
    Waiting,
    /// The agent refuses to act; `MemberStatus::reason` says why.
    Refused,
}

/// Per-member tags that steer the election and routing (same meaning as Patroni's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tags {
    /// Never promote this member.
    pub nofailover: bool,
    /// Keep this member out of the read load balancer.
    pub noloadbalance: bool,
    /// Never pick this member as a synchronous standby.
    pub nosync: bool,
    /// Among equally advanced candidates, the higher priority wins.
    pub failover_priority: u32,
}

/// The value of `members/<name>`: everything other members, `jaictl` and the
/// lab need to know about one node without asking it directly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// The member's name (also the last segment of its key).
    pub name: String,
    /// Role of its PostgreSQL.
    pub role: MemberRole,
    /// What the member is doing.
    pub state: MemberState,
    /// Why the member is in its state, when that needs saying (refusals, waits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Base URL of its health API, e.g. `http://127.0.0.1:8008`.
    pub api_url: String,
    /// `host:port` where its PostgreSQL accepts TCP connections.
    pub pg_address: String,
    /// Base URL of its gRPC control API, e.g. `http://127.0.0.1:8010`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_url: Option<String>,
    /// PostgreSQL system identifier of its data directory, once there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_id: Option<String>,
    /// Current timeline, once PostgreSQL runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    /// On a primary: `pg_current_wal_lsn()`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_lsn: Option<Lsn>,
    /// On a standby: `pg_last_wal_receive_lsn()`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receive_lsn: Option<Lsn>,
    /// On a standby: `pg_last_wal_replay_lsn()`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_lsn: Option<Lsn>,
    /// Tags from the member's configuration.
    #[serde(default)]
    pub tags: Tags,
    /// The member gave leadership up (its PostgreSQL would not restart) and
    /// asks the others not to count it as a candidate for a while.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub standing_down: bool,
    /// On a primary: the standbys connected to it (`pg_stat_replication`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub standbys: Vec<StandbyLink>,
    /// On a running standby: its WAL receiver streams now. A standby that
    /// should stream and does not leaves `/replica` and the read backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streaming: Option<bool>,
    /// Where its PostgreSQL keeps its files on its host: a backup taken on
    /// a standby of the same host reads the primary's through them
    /// (pgBackRest's backup from a standby needs both servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pg_paths: Option<PgPaths>,
    /// Version of the agent that wrote this value.
    pub version: String,
}

/// A member's PostgreSQL files on its own host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgPaths {
    /// The data directory.
    pub data_dir: String,
    /// The directory of its Unix socket.
    pub socket_dir: String,
}

/// One standby streaming from a primary, as the primary sees it.
///
/// The primary is the only one that knows whether a standby really streams
/// and how far behind its replay is in time, so it publishes this for
/// `jaictl status` and for the switchover checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandbyLink {
    /// The standby's member name (its `application_name`).
    pub name: String,
    /// `pg_stat_replication.state`: `streaming`, `catchup`, `backup`…
    pub state: String,
    /// What the standby confirmed flushed to disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flush_lsn: Option<Lsn>,
    /// `pg_stat_replication.replay_lag` in milliseconds; `None` when idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_lag_ms: Option<u64>,
    /// `sync_state` is `sync` or `quorum`: commits wait for this standby.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub synchronous: bool,
}

impl StandbyLink {
    /// The standby is connected and streaming WAL as it is written.
    pub fn is_streaming(&self) -> bool {
        self.state == "streaming"
    }
}

impl MemberStatus {
    /// The furthest WAL position this member has: what a promotion would keep.
    pub fn wal_position(&self) -> Option<Lsn> {
        match self.role {
            MemberRole::Primary => self.write_lsn,
            _ => self.receive_lsn.max(self.replay_lsn),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica() -> MemberStatus {
        MemberStatus {
            name: "pg2".into(),
            role: MemberRole::Replica,
            state: MemberState::Running,
            reason: None,
            api_url: "http://127.0.0.1:8009".into(),
            pg_address: "127.0.0.1:5433".into(),
            pg_paths: None,
            grpc_url: None,
            system_id: Some("7310".into()),
            timeline: Some(1),
            write_lsn: None,
            receive_lsn: Some(Lsn(300)),
            replay_lsn: Some(Lsn(200)),
            tags: Tags::default(),
            standing_down: false,
            streaming: None,
            standbys: Vec::new(),
            version: "0.1.0".into(),
        }
    }

    #[test]
    fn a_replica_counts_what_it_received() {
        assert_eq!(replica().wal_position(), Some(Lsn(300)));
    }

    #[test]
    fn round_trips_through_json() {
        let member = replica();
        let json = serde_json::to_string(&member).unwrap();
        assert!(json.contains("\"receive_lsn\":\"0/12C\""), "{json}");
        assert_eq!(serde_json::from_str::<MemberStatus>(&json).unwrap(), member);
    }
}
