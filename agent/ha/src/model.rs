//! What the core sees ([`Observation`]) and what it asks for ([`Decision`]).

use jai_proto::{
    DynamicConfig, LeaderStatus, Lsn, MemberState, MemberStatus, RestoreIntent, StandbyLink,
    SwitchoverIntent, SyncState, Tags,
};
use std::time::Duration;

/// Milliseconds on the agent's monotonic clock. The shell owns the clock; the
/// core only compares instants it was given.
pub type Millis = u64;

/// Who the core decides for. Fixed for the life of the agent.
#[derive(Debug, Clone)]
pub struct Identity {
    /// This member's name.
    pub name: String,
    /// The cluster's name, for messages.
    pub cluster: String,
    /// This member's tags.
    pub tags: Tags,
    /// Demotion margin to use while etcd cannot tell us the cluster's config.
    pub fallback_demote_margin: Duration,
    /// When `pg_rewind` fails, wipe the data directory and clone from the leader.
    pub reclone_on_rewind_failure: bool,
}

/// Where a member is reached, as its published status says.
#[derive(Debug, Clone)]
pub struct MemberAddresses {
    /// Base URL of its health API.
    pub api_url: String,
    /// `host:port` of its PostgreSQL.
    pub pg_address: String,
    /// Base URL of its gRPC control API, if it serves one.
    pub grpc_url: Option<String>,
    /// Its PostgreSQL's files on its host.
    pub pg_paths: Option<jai_proto::PgPaths>,
}

/// Everything the shell saw, at one instant.
#[derive(Debug, Clone)]
pub struct Observation {
    /// The instant of the observation.
    pub now: Millis,
    /// Wall-clock seconds since the Unix epoch, only to know when a scheduled
    /// switchover is due; never used for lease arithmetic.
    pub wall_clock_unix: u64,
    /// The local PostgreSQL.
    pub pg: LocalPostgres,
    /// The cluster as etcd showed it; `None` when etcd did not answer in time.
    pub dcs: Option<ClusterView>,
    /// This member's lease.
    pub lease: LeaseView,
}

/// The local PostgreSQL: its data directory and its process.
#[derive(Debug, Clone)]
pub struct LocalPostgres {
    /// What the data directory holds.
    pub data_dir: DataDir,
    /// Whether the server runs and what it reports.
    pub process: PgProcess,
    /// The last `pg_rewind` the shell ran, if any.
    pub last_rewind: Option<RewindOutcome>,
}

/// How the last `pg_rewind` went. The core decides to rewind once per leader
/// term and reads the outcome here, since it cannot see action results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewindOutcome {
    /// The term of the leader it rewound against.
    pub leader_term: i64,
    /// `None` on success (including "no rewind required"), else why it failed.
    pub error: Option<String>,
}

/// What the data directory holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataDir {
    /// Missing or empty: this member needs a bootstrap or a clone.
    Empty,
    /// An initialised cluster.
    Initialized {
        /// `pg_controldata`'s database system identifier.
        system_id: String,
        /// The control file says it last ran as a primary (not in recovery).
        was_primary: bool,
    },
    /// Something the agent must not touch (half-written, unreadable…).
    Unusable {
        /// Why, for the operator.
        reason: String,
    },
}

/// The PostgreSQL server process.
#[derive(Debug, Clone, PartialEq)]
pub enum PgProcess {
    /// No server runs.
    Stopped,
    /// A server runs but does not answer queries yet (starting, recovering).
    Unresponsive,
    /// A server runs and answered.
    Running(RunningPostgres),
}

/// Primary or standby, as `pg_is_in_recovery()` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgRole {
    /// Accepts writes.
    Primary,
    /// In recovery.
    Replica,
}

/// What a running server reported.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningPostgres {
    /// Primary or standby.
    pub role: PgRole,
    /// Current timeline.
    pub timeline: u32,
    /// On a primary, `pg_current_wal_lsn()`.
    pub write_lsn: Option<Lsn>,
    /// On a standby, the last WAL position received.
    pub receive_lsn: Option<Lsn>,
    /// On a standby, the last WAL position replayed.
    pub replay_lsn: Option<Lsn>,
    /// The member a standby is configured to stream from.
    pub following: Option<String>,
    /// Physical replication slots present on this server.
    pub slots: Vec<String>,
    /// On a primary, the standbys connected to it (`pg_stat_replication`).
    pub standbys: Vec<StandbyLink>,
    /// What `synchronous_standby_names` says now.
    pub sync_names: SyncNames,
    /// On a standby: its WAL receiver streams now (`pg_stat_wal_receiver`).
    /// Only the health API reads it (a standby that should stream and does
    /// not leaves `/replica`); no decision depends on it.
    pub streaming: bool,
}

impl RunningPostgres {
    /// The furthest WAL position this server has.
    pub fn wal_position(&self) -> Lsn {
        match self.role {
            PgRole::Primary => self.write_lsn.unwrap_or_default(),
            PgRole::Replica => self.receive_lsn.max(self.replay_lsn).unwrap_or_default(),
        }
    }
}

/// What `synchronous_standby_names` says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SyncNames {
    /// Empty: commits do not wait.
    #[default]
    Off,
    /// `*`: commits wait for any one standby (strict mode with no eligible
    /// standby: writes block until one streams).
    AnyStandby,
    /// `FIRST n ("a","b")`: commits wait for the first `count` of `names`.
    First {
        /// How many acknowledgements a commit waits for.
        count: u32,
        /// The standbys, by member name (their `application_name`).
        names: Vec<String>,
    },
}

impl SyncNames {
    /// The value to write into `postgresql.conf`.
    pub fn render(&self) -> String {
        match self {
            SyncNames::Off => String::new(),
            SyncNames::AnyStandby => "*".into(),
            SyncNames::First { count, names } => {
                let quoted: Vec<String> = names.iter().map(|name| format!("\"{name}\"")).collect();
                format!("FIRST {count} ({})", quoted.join(","))
            }
        }
    }

    /// Reads back what [`SyncNames::render`] wrote (and what
    /// `current_setting('synchronous_standby_names')` returns for it).
    pub fn parse(text: &str) -> SyncNames {
        let text = text.trim();
        if text.is_empty() {
            return SyncNames::Off;
        }
        if text == "*" {
            return SyncNames::AnyStandby;
        }
        let count = text
            .strip_prefix("FIRST ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|count| count.parse().ok())
            .unwrap_or(1);
        let names = text
            .split('"')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        SyncNames::First { count, names }
    }
}

/// The cluster as read from etcd in one request.
#[derive(Debug, Clone)]
pub struct ClusterView {
    /// The `initialize` key.
    pub initialize: Option<Initialize>,
    /// The `leader` key.
    pub leader: Option<LeaderKey>,
    /// Every registered member (including this one once registered).
    pub members: Vec<MemberStatus>,
    /// The cluster-wide config (the bootstrap seed until the key exists).
    pub config: DynamicConfig,
    /// The `status` key: the last leader's WAL position.
    pub last_leader: Option<LeaderStatus>,
    /// The `switchover` key: an operator's pending handover.
    pub switchover: Option<SwitchoverIntent>,
    /// The `sync` key: the standbys the last leader's commits waited for.
    pub sync: Option<SyncState>,
    /// A whole-cluster restore under way (`restore` key).
    pub restore: Option<RestoreIntent>,
}

impl ClusterView {
    /// The registered member called `name`.
    pub fn member(&self, name: &str) -> Option<&MemberStatus> {
        self.members.iter().find(|member| member.name == name)
    }
}

/// The state of the bootstrap race.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Initialize {
    /// A member won the race and is creating the cluster.
    InProgress {
        /// That member is this one.
        mine: bool,
    },
    /// The cluster exists.
    Done {
        /// Its system identifier.
        system_id: String,
    },
}

/// The `leader` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderKey {
    /// The leader's member name.
    pub name: String,
    /// The key's create revision: the leader's term.
    pub term: i64,
    /// The key is on this agent's current lease.
    pub mine: bool,
}

/// This agent's lease as its keepalive task last confirmed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseView {
    /// The lease cannot have expired before this instant: the send time of the
    /// last keepalive etcd answered, plus the TTL. `None` without a live lease.
    pub valid_until: Option<Millis>,
}

impl LeaseView {
    /// The lease is confirmed for at least `margin` beyond `now`.
    pub fn is_valid_beyond(&self, now: Millis, margin: Duration) -> bool {
        self.valid_until
            .is_some_and(|until| now.saturating_add(margin.as_millis() as Millis) < until)
    }
}

/// How to start PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartAs {
    /// Without `standby.signal`: accepts writes once up.
    Primary,
    /// With `standby.signal`, streaming from the given member if any.
    Replica {
        /// Member to stream from.
        follow: Option<String>,
    },
}

/// One thing for the shell to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create `initialize` (empty, on this member's lease) if nobody has.
    ClaimInitialize,
    /// Run `initdb` into the empty data directory.
    InitDb,
    /// Record the new cluster's system identifier in `initialize` for good.
    PublishSystemId(String),
    /// `pg_basebackup` from the named member into the empty data directory.
    CloneFrom(String),
    /// Start PostgreSQL.
    Start(StartAs),
    /// Stop PostgreSQL (fast shutdown): demotion, or before a restart.
    Stop {
        /// Why, for the log.
        reason: String,
        /// The stop hands the leader key to this member (a switchover): it
        /// must be clean however long the WAL senders take, and the final
        /// WAL position is published before the key is released.
        handover_to: Option<String>,
    },
    /// Promote the local standby (`pg_promote`) and record it in `history`.
    Promote {
        /// Why, for `history` and the log.
        reason: String,
    },
    /// Make the stopped former primary's data directory a valid standby of the
    /// named leader (`pg_rewind`), recording the outcome for the next decision.
    Rewind(String),
    /// Point the local standby at another member (or at none) and reload.
    Follow(Option<String>),
    /// Create `leader` on this member's lease if nobody holds it.
    AcquireLeader,
    /// Delete `leader` if it is still this member's.
    ReleaseLeader,
    /// Create the physical replication slot.
    CreateSlot(String),
    /// Drop the physical replication slot.
    DropSlot(String),
    /// Write `status`.
    PublishLeaderStatus(LeaderStatus),
    /// `CHECKPOINT` on the local primary, so the shutdown that follows is short.
    Checkpoint,
    /// Delete the `switchover` intent (done, moot, or impossible), saying why.
    ClearSwitchover {
        /// Why, for the log and the operator waiting on it.
        reason: String,
    },
    /// Write the `sync` key (guarded by this leader's term).
    WriteSync(SyncState),
    /// Set `synchronous_standby_names` on the local primary and reload.
    SetSyncNames(SyncNames),
    /// Delete the `sync` key (synchronous mode turned off), as the leader.
    ClearSync,
    /// Replace the stopped data directory with the backup repository's copy
    /// at the intent's target, and start it: PostgreSQL recovers to the
    /// target and promotes itself on a new timeline.
    RestoreTo(RestoreIntent),
    /// The restore is done: record it in `history`, then move the intent
    /// to its `rejoining` phase.
    RecordRestore {
        /// The intent, in its new phase.
        intent: RestoreIntent,
        /// The history entry.
        entry: jai_proto::HistoryEntry,
    },
    /// Delete the `restore` intent: every member rejoined.
    ClearRestore,
}

/// The kind of an [`Action`], without its payload: what a failure is
/// logged under, so an outage is logged once whatever the payload says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[allow(missing_docs)]
pub enum ActionKind {
    ClaimInitialize,
    InitDb,
    PublishSystemId,
    CloneFrom,
    Start,
    Stop,
    Promote,
    Rewind,
    Follow,
    AcquireLeader,
    ReleaseLeader,
    CreateSlot,
    DropSlot,
    PublishLeaderStatus,
    Checkpoint,
    ClearSwitchover,
    WriteSync,
    SetSyncNames,
    ClearSync,
    RestoreTo,
    RecordRestore,
    ClearRestore,
}

impl Action {
    /// Its kind.
    pub fn kind(&self) -> ActionKind {
        match self {
            Action::ClaimInitialize => ActionKind::ClaimInitialize,
            Action::InitDb => ActionKind::InitDb,
            Action::PublishSystemId(_) => ActionKind::PublishSystemId,
            Action::CloneFrom(_) => ActionKind::CloneFrom,
            Action::Start(_) => ActionKind::Start,
            Action::Stop { .. } => ActionKind::Stop,
            Action::Promote { .. } => ActionKind::Promote,
            Action::Rewind(_) => ActionKind::Rewind,
            Action::Follow(_) => ActionKind::Follow,
            Action::AcquireLeader => ActionKind::AcquireLeader,
            Action::ReleaseLeader => ActionKind::ReleaseLeader,
            Action::CreateSlot(_) => ActionKind::CreateSlot,
            Action::DropSlot(_) => ActionKind::DropSlot,
            Action::PublishLeaderStatus(_) => ActionKind::PublishLeaderStatus,
            Action::Checkpoint => ActionKind::Checkpoint,
            Action::ClearSwitchover { .. } => ActionKind::ClearSwitchover,
            Action::WriteSync(_) => ActionKind::WriteSync,
            Action::SetSyncNames(_) => ActionKind::SetSyncNames,
            Action::ClearSync => ActionKind::ClearSync,
            Action::RestoreTo(_) => ActionKind::RestoreTo,
            Action::RecordRestore { .. } => ActionKind::RecordRestore,
            Action::ClearRestore => ActionKind::ClearRestore,
        }
    }

    /// The action changes roles or processes, so the next decision should be
    /// taken at once instead of after `loop_wait`.
    pub fn warrants_immediate_recheck(&self) -> bool {
        !matches!(
            self,
            Action::CreateSlot(_)
                | Action::DropSlot(_)
                | Action::PublishLeaderStatus(_)
                | Action::ClearSwitchover { .. }
        )
    }
}

/// What the core decided: actions, and the state and reason to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// In order.
    pub actions: Vec<Action>,
    /// The member state to publish.
    pub state: MemberState,
    /// Why, when it needs saying; published in the member status and logged on change.
    pub reason: Option<String>,
}

impl Decision {
    /// Carry out `actions`.
    pub fn act(state: MemberState, reason: impl IntoReason, actions: Vec<Action>) -> Self {
        Self {
            actions,
            state,
            reason: reason.into_reason(),
        }
    }

    /// Nothing to do now, for the given reason.
    pub fn wait(state: MemberState, reason: impl Into<String>) -> Self {
        Self::act(state, Some(reason.into()), vec![])
    }

    /// Refuse to act: unsafe or impossible without an operator.
    pub fn refuse(reason: impl Into<String>) -> Self {
        Self::act(MemberState::Refused, Some(reason.into()), vec![])
    }
}

/// Anything that can serve as a decision's reason: a text, or none.
pub trait IntoReason {
    /// The reason, if any.
    fn into_reason(self) -> Option<String>;
}

impl IntoReason for &str {
    fn into_reason(self) -> Option<String> {
        Some(self.to_owned())
    }
}

impl IntoReason for String {
    fn into_reason(self) -> Option<String> {
        Some(self)
    }
}

impl IntoReason for Option<String> {
    fn into_reason(self) -> Option<String> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_postgresql_text() {
        for names in [
            SyncNames::Off,
            SyncNames::AnyStandby,
            SyncNames::First {
                count: 1,
                names: vec!["pg2".into(), "pg3".into()],
            },
        ] {
            assert_eq!(SyncNames::parse(&names.render()), names);
        }
        assert_eq!(
            SyncNames::First {
                count: 2,
                names: vec!["a".into(), "b".into()]
            }
            .render(),
            "FIRST 2 (\"a\",\"b\")"
        );
    }
}
