//! The round driver: the agent's decision loop as a state machine.
//!
//! [`Core::decide`] says *what* to do; the driver owns *the order in which a
//! round does it*: observe PostgreSQL, read the cluster, register a lease,
//! ask the peers during an election, decide, persist what must survive a
//! restart, publish the member status, then carry out every action step by
//! step — the lease re-check right before PostgreSQL can take writes, the
//! fencing watchdog armed before `pg_promote`, HAProxy's writes cut before a
//! stop, the final WAL position published before a switchover releases the
//! key — and finally wait for the next round or start it at once.
//!
//! It does no I/O and reads no clock (in the manner of quinn-proto): each
//! call to [`Driver::step`] takes the outcome of the last [`Effect`] and the
//! current [`Context`] (time, lease), and returns the [`Commands`](Command) to
//! apply at once and the next effect to carry out. The agent's shell
//! interprets effects against etcd, PostgreSQL and HAProxy; the simulator
//! interprets the same effects against its simulated world, so the ordering
//! it checks is the agent's own.

use super::lease;
use super::model::{
    Action, ActionKind, ClusterView, DataDir, Decision, Identity, LeaseView, LocalPostgres,
    MemberAddresses, Millis, Observation, PgProcess, PgRole, RewindOutcome, RunningPostgres,
    StartAs, SyncNames,
};
use super::store::{rejected_config, Key, LeaseId, Reply, Request, StoreError, Value};
use super::sync::names_for_new_primary;
use super::Core;
use jai_proto::{DynamicConfig, HistoryEntry, LeaderStatus, Lsn, MemberRole, MemberStatus};
use std::collections::BTreeMap;
use std::time::Duration;

/// Consecutive immediate re-checks allowed before the loop waits anyway, so a
/// rule that keeps asking for action cannot spin the CPU.
pub const MAX_IMMEDIATE_RECHECKS: u32 = 20;

/// How long a peer's API may take to report its WAL position in an election.
pub const PEER_TIMEOUT: Duration = Duration::from_millis(300);

/// What the driver needs to know at every step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    /// Now, on the agent's monotonic clock.
    pub now: Millis,
    /// Wall-clock seconds since the Unix epoch (scheduled switchovers and
    /// history entries only; never lease arithmetic).
    pub wall_clock_unix: u64,
    /// The agent's lease as its keepalive task last confirmed it.
    pub lease: LeaseState,
}

/// The agent's lease, as tracked by the shell (shared with its keepalive
/// task and the health API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseState {
    /// The lease id; `None` without a lease.
    pub id: Option<LeaseId>,
    /// The lease cannot have expired before this instant.
    pub valid_until: Option<Millis>,
}

/// What the last effect produced (or why the driver is called).
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The first call: the agent starts.
    Start,
    /// [`Effect::ObservePostgres`].
    Postgres {
        /// The server process.
        process: PgProcess,
        /// The data directory.
        data_dir: DataDir,
    },
    /// [`Effect::Store`].
    Store(Result<Reply, StoreError>),
    /// [`Effect::AskPeers`]: the statuses that answered in time.
    Peers(Vec<MemberStatus>),
    /// [`Effect::PersistMarker`], [`Effect::Haproxy`] and most
    /// [`Effect::Postgres`] operations.
    Done(Result<(), String>),
    /// [`PgOp::Rewind`]: the last line `pg_rewind` printed, or why it failed.
    Rewound(Result<String, String>),
    /// [`PgOp::FinalPosition`]: the stopped server's timeline and last WAL
    /// position (its shutdown checkpoint).
    FinalPosition(Result<(u32, Lsn), String>),
    /// [`Effect::Wait`] ended: the time passed, or something woke the loop.
    Woken,
}

/// One thing the shell must do and report back on before the round goes on.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Look at the local PostgreSQL: the process and the data directory.
    ObservePostgres,
    /// One etcd request, bounded by `retry_timeout`.
    Store(Request),
    /// Ask these peers' APIs for their status, all at once, [`PEER_TIMEOUT`] each.
    AskPeers(Vec<Peer>),
    /// Record on disk whether this data is a former primary not rewound yet
    /// (synced before the round reports or acts).
    PersistMarker(bool),
    /// Act on the local PostgreSQL.
    Postgres(PgOp),
    /// Tell every configured HAProxy.
    Haproxy(HaproxyOp),
    /// Sleep until the duration passed or something wakes the loop (an etcd
    /// watch event, PostgreSQL exiting, the lease lost, the fence, an
    /// operator's request run meanwhile).
    Wait(Duration),
}

/// A peer to ask for its status during an election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its member name.
    pub name: String,
    /// Base URL of its health API.
    pub api_url: String,
}

/// An operation on the local PostgreSQL.
#[derive(Debug, Clone, PartialEq)]
pub enum PgOp {
    /// `initdb` into the empty data directory.
    InitDb,
    /// Create the replication role on the new primary.
    CreateReplicationRole,
    /// Wipe the data directory and `pg_basebackup` from this address.
    Clone {
        /// `host:port` of the member to copy.
        from: String,
    },
    /// Write the configuration files for a role (not applied until a start
    /// or [`PgOp::Reload`]).
    Configure {
        /// Stream from this member (`None`: from nobody).
        follow: Option<Upstream>,
        /// With `standby.signal`.
        standby: bool,
        /// Set `synchronous_standby_names` to this first (`None`: keep).
        sync_names: Option<SyncNames>,
    },
    /// SIGHUP.
    Reload,
    /// Wait until the server reports this `synchronous_standby_names`.
    ConfirmSyncNames(SyncNames),
    /// Start the server. A primary is guarded by the fencing watchdog from
    /// the postmaster's first moment (the shell arms it at spawn).
    Start {
        /// Without `standby.signal`: it takes writes once up.
        primary: bool,
    },
    /// Fast shutdown, escalated to an immediate one after `grace`.
    Stop {
        /// How long the fast shutdown may take.
        grace: Duration,
        /// The stop hands the leader key to this member (a switchover).
        handover_to: Option<String>,
    },
    /// `pg_promote()`.
    Promote,
    /// `CHECKPOINT` on the server at this address (the leader, before a rewind).
    CheckpointAt {
        /// `host:port`.
        address: String,
    },
    /// `pg_rewind` from the server at this address; answered with
    /// [`Outcome::Rewound`].
    Rewind {
        /// `host:port`.
        address: String,
    },
    /// Create a physical replication slot.
    CreateSlot(String),
    /// Drop a physical replication slot.
    DropSlot(String),
    /// `CHECKPOINT` on the local server.
    Checkpoint,
    /// The stopped server's final position; answered with [`Outcome::FinalPosition`].
    FinalPosition,
    /// `CHECKPOINT` on the local server without waiting for it.
    CheckpointInBackground,
    /// Wipe the stopped data directory and restore the backup repository's
    /// copy at `target` into it, to recover and promote there.
    RestoreToTime {
        /// The recovery target time.
        target: String,
    },
}

/// A member to stream from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Its member name (the slot it streams through is derived from ours).
    pub name: String,
    /// `host:port` of its PostgreSQL.
    pub address: String,
}

/// What to tell the load balancers about this member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HaproxyOp {
    /// No more writes here: this member is about to stop its PostgreSQL.
    StopWritesToMe,
    /// No writes to any other member: this one is about to be promoted.
    CutWritesExceptMe,
    /// Writes here, reads to the replicas within the lag bound.
    RouteWritesHere,
}

/// Something to apply at once, before the next effect: state the shell
/// shares with its other tasks, and what to say.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// A line for the log.
    Log(LogLine),
    /// Track this lease (granted, or adopted from the leader key after a restart).
    AdoptLease {
        /// The lease.
        id: LeaseId,
        /// Confirmed until this instant.
        valid_until: Millis,
    },
    /// etcd says this lease is gone: forget it, so the next round registers anew.
    ForgetLease(LeaseId),
    /// The cluster config changed: use its timings (request bound, renewal
    /// period) from now on, and rewrite and reload PostgreSQL's settings if
    /// its parameters changed and it runs.
    ApplyConfig {
        /// The new config.
        config: Box<DynamicConfig>,
        /// `postgresql.parameters` or the `backup` section changed.
        reload_postgres: bool,
    },
    /// The fencing watchdog guards the running postmaster iff `primary`.
    ArmFence {
        /// PostgreSQL runs (or is about to run) as a primary.
        primary: bool,
    },
    /// What the health API and `/status` answer from now on.
    Publish(Box<Report>),
    /// The core decided (for traces: the shell logs it at debug level).
    Decided {
        /// The decision.
        decision: Decision,
        /// Lease time left at the observation (negative: past).
        lease_left_ms: Option<i64>,
        /// etcd answered this round.
        etcd_reachable: bool,
    },
    /// This member is the writable primary: re-send the routing to every
    /// HAProxy in the background when due.
    ReconcileHaproxy,
}

/// A log line and its level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// How loud.
    pub level: Level,
    /// What to say.
    pub text: String,
}

/// Log levels, as `tracing`'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Repeats of a known problem.
    Debug,
    /// Normal operation.
    Info,
    /// Something changed that an operator may want to know.
    Warn,
    /// Something is wrong.
    Error,
}

/// What the member reports after a decision: its status in etcd and the
/// facts the health API answers from.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The status published under `members/<name>`.
    pub member: MemberStatus,
    /// The leader as etcd last said (kept while etcd does not answer).
    pub leader: Option<String>,
    /// This member held the leader key as etcd last said.
    pub holds_leader_key: bool,
    /// The decision stops PostgreSQL: `/primary` must fail at once.
    pub demoting: bool,
    /// This replica's lag behind the last leader status, in bytes.
    pub lag_bytes: Option<u64>,
    /// etcd answered this round.
    pub dcs_reachable: bool,
    /// Another member holds the key and runs a primary.
    pub leader_runs_primary: bool,
    /// The cluster's demotion margin.
    pub demote_margin: Duration,
    /// How long the report stays fresh for `/liveness` (the TTL).
    pub liveness_window: Duration,
}

/// A kind of failure, logged once per outage and cleared by success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Problem {
    /// Reading the cluster failed.
    EtcdUnreachable,
    /// No lease could be adopted or granted.
    NoLease,
    /// The member status could not be published.
    PublishMember,
    /// The former-primary marker could not be written.
    PersistMarker,
    /// The `config` key holds something that is not a valid config.
    InvalidConfig,
    /// An action of this kind failed.
    Action(ActionKind),
}

impl Problem {
    fn describe(self) -> String {
        match self {
            Self::EtcdUnreachable => "etcd unreachable".into(),
            Self::NoLease => "cannot get a lease from etcd".into(),
            Self::PublishMember => "cannot publish member status".into(),
            Self::PersistMarker => "cannot persist the former-primary marker".into(),
            Self::InvalidConfig => {
                "ignoring the invalid cluster config in etcd, keeping the one in force".into()
            }
            Self::Action(kind) => format!("{kind:?} failed"),
        }
    }
}

/// Ordering bugs a test can plant to show that the simulator catches them.
/// Never set outside tests.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// Promote (or start as primary) without checking the lease again first.
    NoLeaseRecheckBeforeWrites,
    /// In a switchover, release the leader key before publishing the final position.
    FinalPositionAfterRelease,
}

/// The fixed facts a driver is built with.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Who decides.
    pub identity: Identity,
    /// The `bootstrap.dcs` seed: the config until etcd's is read, and what
    /// a bootstrap writes.
    pub bootstrap: DynamicConfig,
    /// Where this member is reached, for its published status.
    pub addresses: MemberAddresses,
    /// The agent's version, for its published status.
    pub version: String,
    /// How long a switchover's clean stop may take (`postgresql.start_timeout`).
    pub handover_stop_grace: Duration,
}

/// What PostgreSQL looked like at the start of the round.
type PgSeen = (PgProcess, DataDir);

/// Where the round is.
#[derive(Debug)]
enum Phase {
    /// Waiting for [`Outcome::Start`].
    NotStarted,
    /// [`Effect::ObservePostgres`].
    ObservingPostgres,
    /// Reading the cluster; `second` after registering a lease.
    Reading { pg: PgSeen, second: bool },
    /// Registering a lease: reading the leader key.
    GettingLeader { pg: PgSeen, view: ClusterView },
    /// Registering a lease: one keepalive of the leader key's lease, to adopt it.
    Adopting {
        pg: PgSeen,
        view: ClusterView,
        lease: LeaseId,
        sent: Millis,
    },
    /// Registering a lease: granting a new one.
    Granting {
        pg: PgSeen,
        view: ClusterView,
        sent: Millis,
    },
    /// Asking the peers for fresh positions (no leader, running standby).
    AskingPeers { pg: PgSeen, view: ClusterView },
    /// Writing the former-primary marker.
    Persisting {
        actions: Vec<Action>,
        wanted: bool,
        /// The status to publish once the marker is on disk.
        member: Option<Box<MemberStatus>>,
    },
    /// Publishing the member status.
    Reporting { actions: Vec<Action> },
    /// Carrying out the actions.
    Executing(Execution),
    /// Between rounds.
    Waiting,
}

#[derive(Debug)]
struct Execution {
    actions: Vec<Action>,
    next: usize,
    stage: u8,
    recheck: bool,
    /// What a stage remembered for a later one.
    scratch: Scratch,
}

#[derive(Debug, Default)]
struct Scratch {
    term: i64,
    before: Option<RunningPostgres>,
    /// A stopped primary's final timeline and position, being published.
    final_position: Option<(u32, Lsn)>,
}

/// Where an action is after a step.
enum Progress {
    /// Waiting for this effect's outcome, which goes to the next stage.
    Wait(Effect),
    /// Waiting for this effect's outcome, which goes to the given stage.
    WaitAt(Effect, u8),
    /// Finished.
    Done(Result<(), String>),
}

/// One agent's decision loop.
#[derive(Debug)]
pub struct Driver {
    core: Core,
    setup: Setup,
    /// The cluster config in force (etcd's once read, the bootstrap seed before).
    dynamic: DynamicConfig,
    /// The last cluster view read, to resolve terms and addresses for actions.
    view: Option<ClusterView>,
    /// The outcome of the last `pg_rewind`, for the core.
    last_rewind: Option<RewindOutcome>,
    /// The decision being carried out hands the leader key over.
    handing_over: Option<String>,
    /// The last decision saw PostgreSQL running as a primary.
    decided_as_primary: bool,
    /// The last reason logged, so a reason is logged once, when it changes.
    last_reason: Option<String>,
    /// The last error logged per kind, so an outage is logged once.
    problems: BTreeMap<Problem, String>,
    /// What the health API said last, kept while etcd does not answer.
    last_report: Option<Report>,
    immediate: u32,
    phase: Phase,
    commands: Vec<Command>,
    planted: Option<PlantedBug>,
}

/// What [`Driver::step`] returns: commands to apply at once, in order, then
/// the effect to carry out.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Apply these first, in order.
    pub commands: Vec<Command>,
    /// Then do this and call [`Driver::step`] with its outcome.
    pub effect: Effect,
}

impl Driver {
    /// A driver for a freshly started agent. `unrewound_marker` is what the
    /// persisted marker said at start: this data is a former primary not
    /// rewound yet.
    pub fn new(setup: Setup, unrewound_marker: bool) -> Self {
        let mut core = Core::new(setup.identity.clone());
        if unrewound_marker {
            core.restore_unrewound_former_primary();
        }
        Self {
            core,
            dynamic: setup.bootstrap.clone(),
            setup,
            view: None,
            last_rewind: None,
            handing_over: None,
            decided_as_primary: false,
            last_reason: None,
            problems: BTreeMap::new(),
            last_report: None,
            immediate: 0,
            phase: Phase::NotStarted,
            commands: Vec::new(),
            planted: None,
        }
    }

    /// What a member reports before its first round: stopped, role
    /// unknown, "starting up", nothing known of the cluster.
    pub fn starting_report(setup: &Setup) -> Report {
        Report {
            member: MemberStatus {
                name: setup.identity.name.clone(),
                role: MemberRole::Unknown,
                state: jai_proto::MemberState::Stopped,
                reason: Some("starting up".into()),
                api_url: setup.addresses.api_url.clone(),
                pg_address: setup.addresses.pg_address.clone(),
                grpc_url: setup.addresses.grpc_url.clone(),
                pg_paths: setup.addresses.pg_paths.clone(),
                system_id: None,
                timeline: None,
                write_lsn: None,
                receive_lsn: None,
                replay_lsn: None,
                tags: setup.identity.tags.clone(),
                standing_down: false,
                streaming: None,
                standbys: Vec::new(),
                version: setup.version.clone(),
            },
            leader: None,
            holds_leader_key: false,
            demoting: false,
            lag_bytes: None,
            dcs_reachable: false,
            leader_runs_primary: false,
            demote_margin: setup.bootstrap.demote_margin(),
            liveness_window: setup.bootstrap.ttl,
        }
    }

    /// Plants an ordering bug (tests only: shows the simulator catches it).
    #[doc(hidden)]
    pub fn plant(&mut self, bug: PlantedBug) {
        self.planted = Some(bug);
    }

    /// What this driver was built with.
    pub fn setup(&self) -> &Setup {
        &self.setup
    }

    /// The cluster config in force.
    pub fn config(&self) -> &DynamicConfig {
        &self.dynamic
    }

    /// The cluster as last read (for HAProxy routing and checkers).
    pub fn view(&self) -> Option<&ClusterView> {
        self.view.as_ref()
    }

    /// The last decision saw PostgreSQL running as a primary.
    pub fn decided_as_primary(&self) -> bool {
        self.decided_as_primary
    }

    /// The core (for checkers).
    pub fn core(&self) -> &Core {
        &self.core
    }

    /// The data directory was wiped (an operator's reinitialisation): any
    /// earlier rewind verdict is moot.
    pub fn data_dir_wiped(&mut self) {
        self.last_rewind = None;
    }

    /// The round is between two rounds (or not started).
    pub fn is_waiting(&self) -> bool {
        matches!(self.phase, Phase::Waiting | Phase::NotStarted)
    }

    /// Advances the loop with the outcome of the last effect.
    ///
    /// # Panics
    /// When `outcome` is not what the last effect produces (an interpreter
    /// bug), and when the core's safety assertions fail.
    pub fn step(&mut self, cx: &Context, outcome: Outcome) -> Step {
        let effect = self.advance(cx, outcome);
        Step {
            commands: std::mem::take(&mut self.commands),
            effect,
        }
    }

    fn advance(&mut self, cx: &Context, outcome: Outcome) -> Effect {
        match (
            std::mem::replace(&mut self.phase, Phase::NotStarted),
            outcome,
        ) {
            (Phase::NotStarted, Outcome::Start) | (Phase::Waiting, Outcome::Woken) => {
                self.begin_round()
            }
            (Phase::ObservingPostgres, Outcome::Postgres { process, data_dir }) => {
                self.read((process, data_dir), false)
            }
            (Phase::Reading { pg, second }, Outcome::Store(result)) => {
                self.on_read(cx, pg, second, result)
            }
            (Phase::GettingLeader { pg, view }, Outcome::Store(result)) => {
                self.on_leader_key(cx, pg, view, result)
            }
            (
                Phase::Adopting {
                    pg,
                    view,
                    lease,
                    sent,
                },
                Outcome::Store(result),
            ) => self.on_adopt(cx, pg, view, lease, sent, result),
            (Phase::Granting { pg, view, sent }, Outcome::Store(result)) => {
                self.on_grant(cx, pg, view, sent, result)
            }
            (Phase::AskingPeers { pg, mut view }, Outcome::Peers(fresh)) => {
                for status in fresh {
                    if let Some(known) = view.members.iter_mut().find(|m| m.name == status.name) {
                        *known = status;
                    }
                }
                self.decide(cx, pg, Some(view))
            }
            (
                Phase::Persisting {
                    actions,
                    wanted,
                    member,
                },
                Outcome::Done(result),
            ) => self.on_persisted(cx, actions, wanted, member, result),
            (Phase::Reporting { actions }, Outcome::Store(result)) => {
                if let Err(error) = result {
                    self.note_store_error(cx, Problem::PublishMember, error);
                }
                self.execute(cx, actions)
            }
            (Phase::Executing(execution), outcome) => self.run_actions(cx, execution, outcome),
            (phase, outcome) => {
                panic!("interpreter bug: outcome {outcome:?} does not answer the round's phase {phase:?}")
            }
        }
    }

    // ---- observe ----------------------------------------------------------

    fn begin_round(&mut self) -> Effect {
        self.phase = Phase::ObservingPostgres;
        Effect::ObservePostgres
    }

    fn read(&mut self, pg: PgSeen, second: bool) -> Effect {
        self.phase = Phase::Reading { pg, second };
        Effect::Store(Request::ReadCluster)
    }

    fn on_read(
        &mut self,
        cx: &Context,
        pg: PgSeen,
        second: bool,
        result: Result<Reply, StoreError>,
    ) -> Effect {
        let view = match result {
            Ok(Reply::Kvs(kvs)) => {
                self.note_success(Problem::EtcdUnreachable);
                match rejected_config(&kvs) {
                    Some(why) => self.note_error(Problem::InvalidConfig, why),
                    None => self.note_success(Problem::InvalidConfig),
                }
                let view = ClusterView::from_kvs(
                    &kvs,
                    cx.lease.id,
                    &self.setup.identity.name,
                    &self.dynamic,
                );
                if view.config != self.dynamic {
                    self.adopt_config(view.config.clone());
                }
                view
            }
            Ok(other) => panic!("interpreter bug: a cluster read answered {other:?}"),
            Err(error) => {
                self.note_store_error(cx, Problem::EtcdUnreachable, error);
                return self.after_read(cx, pg, None);
            }
        };
        if cx.lease.id.is_none() && !second {
            self.phase = Phase::GettingLeader { pg, view };
            return Effect::Store(Request::GetLeader);
        }
        self.after_read(cx, pg, Some(view))
    }

    /// Registering: a leader key that still names this member has its lease
    /// adopted (an agent restart must not cost a failover), else a new
    /// lease is granted.
    fn on_leader_key(
        &mut self,
        cx: &Context,
        pg: PgSeen,
        view: ClusterView,
        result: Result<Reply, StoreError>,
    ) -> Effect {
        match result {
            Ok(Reply::Leader(Some(kv)))
                if kv.value == Value::Text(self.setup.identity.name.clone())
                    && kv.lease.is_some_and(|lease| lease != 0) =>
            {
                let lease = kv.lease.expect("checked");
                self.phase = Phase::Adopting {
                    pg,
                    view,
                    lease,
                    sent: cx.now,
                };
                Effect::Store(Request::KeepAliveOnce(lease))
            }
            Ok(Reply::Leader(_)) => self.grant(cx, pg, view),
            Ok(other) => panic!("interpreter bug: a leader read answered {other:?}"),
            Err(error) => {
                self.note_store_error(cx, Problem::NoLease, error);
                self.after_read(cx, pg, Some(view))
            }
        }
    }

    fn on_adopt(
        &mut self,
        cx: &Context,
        pg: PgSeen,
        view: ClusterView,
        lease: LeaseId,
        sent: Millis,
        result: Result<Reply, StoreError>,
    ) -> Effect {
        match result {
            Ok(Reply::KeepAlive { ttl_secs }) if ttl_secs > 0 => {
                self.commands.push(Command::AdoptLease {
                    id: lease,
                    valid_until: lease::confirmed_until(sent, ttl_secs),
                });
                self.note_success(Problem::NoLease);
                self.log(
                    Level::Info,
                    format!("resumed leadership: adopted the leader key's lease {lease:x}"),
                );
                self.read(pg, true)
            }
            _ => self.grant(cx, pg, view),
        }
    }

    fn grant(&mut self, cx: &Context, pg: PgSeen, view: ClusterView) -> Effect {
        let ttl_secs = lease::grant_ttl_secs(&self.dynamic);
        self.phase = Phase::Granting {
            pg,
            view,
            sent: cx.now,
        };
        Effect::Store(Request::Grant { ttl_secs })
    }

    fn on_grant(
        &mut self,
        cx: &Context,
        pg: PgSeen,
        view: ClusterView,
        sent: Millis,
        result: Result<Reply, StoreError>,
    ) -> Effect {
        match result {
            Ok(Reply::Granted { id, ttl_secs }) => {
                self.commands.push(Command::AdoptLease {
                    id,
                    valid_until: lease::confirmed_until(sent, ttl_secs),
                });
                self.note_success(Problem::NoLease);
                self.log(
                    Level::Info,
                    format!("granted a new lease {id:x} (ttl {ttl_secs} s)"),
                );
                self.read(pg, true)
            }
            Ok(other) => panic!("interpreter bug: a lease grant answered {other:?}"),
            Err(error) => {
                self.note_store_error(cx, Problem::NoLease, error);
                self.after_read(cx, pg, Some(view))
            }
        }
    }

    /// During an election, positions in etcd can be a round old: a running
    /// standby asks every peer directly.
    fn after_read(&mut self, cx: &Context, pg: PgSeen, view: Option<ClusterView>) -> Effect {
        let standby =
            matches!(&pg.0, PgProcess::Running(running) if running.role == PgRole::Replica);
        match view {
            Some(view) if view.leader.is_none() && standby => {
                let peers: Vec<Peer> = view
                    .members
                    .iter()
                    .filter(|member| member.name != self.setup.identity.name)
                    .map(|member| Peer {
                        name: member.name.clone(),
                        api_url: member.api_url.clone(),
                    })
                    .collect();
                self.phase = Phase::AskingPeers { pg, view };
                Effect::AskPeers(peers)
            }
            view => self.decide(cx, pg, view),
        }
    }

    fn adopt_config(&mut self, config: DynamicConfig) {
        if config.pause != self.dynamic.pause {
            let state = if config.pause { "on" } else { "off" };
            self.log(Level::Warn, format!("maintenance mode {state}"));
        }
        // The `backup` section renders archive_command, restore_command and
        // archive_timeout: a change there is a change of PostgreSQL's settings.
        let reload_postgres =
            config.postgresql != self.dynamic.postgresql || config.backup != self.dynamic.backup;
        self.log(
            Level::Info,
            format!(
                "using the cluster config from etcd: ttl {}, loop_wait {}, retry_timeout {}",
                humanize(config.ttl),
                humanize(config.loop_wait),
                humanize(config.retry_timeout)
            ),
        );
        self.commands.push(Command::ApplyConfig {
            config: Box::new(config.clone()),
            reload_postgres,
        });
        self.dynamic = config;
    }

    // ---- decide and report ------------------------------------------------

    fn decide(&mut self, cx: &Context, pg: PgSeen, dcs: Option<ClusterView>) -> Effect {
        self.view = dcs.clone();
        let (process, data_dir) = pg;
        let observation = Observation {
            now: cx.now,
            wall_clock_unix: cx.wall_clock_unix,
            pg: LocalPostgres {
                data_dir,
                process,
                last_rewind: self.last_rewind.clone(),
            },
            dcs,
            lease: LeaseView {
                valid_until: cx.lease.valid_until,
            },
        };
        let primary = running_as_primary(&observation.pg.process);
        self.decided_as_primary = primary;
        self.commands.push(Command::ArmFence { primary });
        let decision = self.core.decide(&observation);
        self.commands.push(Command::Decided {
            decision: decision.clone(),
            lease_left_ms: cx
                .lease
                .valid_until
                .map(|until| until as i64 - cx.now as i64),
            etcd_reachable: observation.dcs.is_some(),
        });
        self.log_reason(&decision);
        let report = self.report(&observation, &decision);
        let publish = observation.dcs.is_some() && cx.lease.id.is_some();
        self.commands
            .push(Command::Publish(Box::new(report.clone())));
        let holds_key = observation
            .dcs
            .as_ref()
            .and_then(|view| view.leader.as_ref())
            .is_some_and(|leader| leader.mine);
        if primary
            && holds_key
            && observation
                .lease
                .is_valid_beyond(cx.now, self.dynamic.demote_margin())
        {
            self.commands.push(Command::ReconcileHaproxy);
        }
        self.last_report = Some(report.clone());
        // What the core must remember across restarts is on disk before
        // anything is reported to etcd or done.
        let wanted = self.core.unrewound_former_primary();
        self.phase = Phase::Persisting {
            actions: decision.actions,
            wanted,
            member: publish.then(|| Box::new(report.member)),
        };
        Effect::PersistMarker(wanted)
    }

    fn on_persisted(
        &mut self,
        cx: &Context,
        actions: Vec<Action>,
        wanted: bool,
        member: Option<Box<MemberStatus>>,
        result: Result<(), String>,
    ) -> Effect {
        match result {
            Ok(()) => self.note_success(Problem::PersistMarker),
            Err(error) => {
                self.note_error(Problem::PersistMarker, error);
                // Acting (e.g. starting as a replica) without the marker on
                // disk could leave a restarted agent following a leader
                // without a rewind: this round does nothing. Failing to clear
                // it only costs a rewind after a restart.
                if wanted {
                    return self.finish_round(false);
                }
            }
        }
        match (member, cx.lease.id) {
            (Some(status), Some(lease)) => {
                self.phase = Phase::Reporting { actions };
                Effect::Store(Request::PutMember { status, lease })
            }
            _ => self.execute(cx, actions),
        }
    }

    fn log_reason(&mut self, decision: &Decision) {
        if decision.reason == self.last_reason {
            return;
        }
        if let Some(reason) = &decision.reason {
            let level = if decision.state == jai_proto::MemberState::Refused {
                Level::Error
            } else {
                Level::Info
            };
            self.log(level, reason.clone());
        }
        self.last_reason = decision.reason.clone();
    }

    fn report(&self, observation: &Observation, decision: &Decision) -> Report {
        let member = self.core.member_status(
            observation,
            decision,
            self.setup.addresses.clone(),
            &self.setup.version,
        );
        let demoting = decision
            .actions
            .iter()
            .any(|action| matches!(action, Action::Stop { .. }));
        let facts = match (&observation.dcs, &self.last_report) {
            (Some(view), _) => Some((
                view.leader.as_ref().map(|leader| leader.name.clone()),
                view.leader.as_ref().is_some_and(|leader| leader.mine),
                view.last_leader
                    .as_ref()
                    .zip(member.wal_position())
                    .filter(|_| member.role == MemberRole::Replica)
                    .map(|(last, position)| last.optime.bytes_since(position)),
                view.leader.as_ref().is_some_and(|leader| {
                    !leader.mine && super::leader_runs_primary(view, &leader.name)
                }),
            )),
            // While etcd does not answer, keep what it last said about the
            // leader and lag: the lease, checked at request time, decides
            // whether this primary may still take writes.
            (None, Some(last)) => Some((
                last.leader.clone(),
                last.holds_leader_key,
                last.lag_bytes,
                last.leader_runs_primary,
            )),
            (None, None) => None,
        };
        let (leader, holds_leader_key, lag_bytes, leader_runs_primary) =
            facts.unwrap_or((None, false, None, false));
        Report {
            member,
            leader,
            holds_leader_key,
            demoting,
            lag_bytes,
            dcs_reachable: observation.dcs.is_some(),
            leader_runs_primary,
            demote_margin: self.dynamic.demote_margin(),
            liveness_window: self.dynamic.ttl,
        }
    }

    // ---- act --------------------------------------------------------------

    fn execute(&mut self, cx: &Context, actions: Vec<Action>) -> Effect {
        self.handing_over = actions.iter().find_map(|action| match action {
            Action::Stop { handover_to, .. } => handover_to.clone(),
            _ => None,
        });
        let execution = Execution {
            actions,
            next: 0,
            stage: 0,
            recheck: false,
            scratch: Scratch::default(),
        };
        self.run_actions(cx, execution, Outcome::Start)
    }

    fn run_actions(
        &mut self,
        cx: &Context,
        mut execution: Execution,
        mut outcome: Outcome,
    ) -> Effect {
        loop {
            let Some(action) = execution.actions.get(execution.next).cloned() else {
                return self.finish_round(execution.recheck);
            };
            let progress = self.step_action(
                cx,
                &action,
                execution.stage,
                outcome,
                &mut execution.scratch,
            );
            outcome = Outcome::Start;
            match progress {
                Progress::Wait(effect) => {
                    execution.stage += 1;
                    self.phase = Phase::Executing(execution);
                    return effect;
                }
                Progress::WaitAt(effect, stage) => {
                    execution.stage = stage;
                    self.phase = Phase::Executing(execution);
                    return effect;
                }
                Progress::Done(Ok(())) => {
                    self.note_success(Problem::Action(action.kind()));
                    execution.recheck |= action.warrants_immediate_recheck();
                }
                // Housekeeping (slots, status) failing must not hold up the rest.
                Progress::Done(Err(error)) if !action.warrants_immediate_recheck() => {
                    self.note_error(Problem::Action(action.kind()), error);
                }
                Progress::Done(Err(error)) => {
                    self.note_error(Problem::Action(action.kind()), error);
                    return self.finish_round(false);
                }
            }
            execution.next += 1;
            execution.stage = 0;
            execution.scratch = Scratch::default();
        }
    }

    fn finish_round(&mut self, recheck: bool) -> Effect {
        if recheck && self.immediate < MAX_IMMEDIATE_RECHECKS {
            self.immediate += 1;
            return self.begin_round();
        }
        self.immediate = 0;
        self.phase = Phase::Waiting;
        Effect::Wait(self.dynamic.loop_wait)
    }

    /// One stage of an action: stage 0 starts it, later stages receive the
    /// outcome of the effect the previous stage asked for.
    fn step_action(
        &mut self,
        cx: &Context,
        action: &Action,
        stage: u8,
        outcome: Outcome,
        scratch: &mut Scratch,
    ) -> Progress {
        use Progress::{Done, Wait};
        match action {
            Action::ClaimInitialize => self.claim_initialize(cx, stage, outcome),
            Action::InitDb => match stage {
                0 => {
                    self.log(Level::Info, "running initdb");
                    Wait(Effect::Postgres(PgOp::InitDb))
                }
                _ => Done(done(outcome)),
            },
            Action::PublishSystemId(system_id) => match stage {
                0 => Wait(Effect::Postgres(PgOp::CreateReplicationRole)),
                1 => {
                    if let Err(error) = done(outcome) {
                        return Done(Err(error));
                    }
                    let Some(lease) = cx.lease.id else {
                        return Done(Err("no lease".into()));
                    };
                    Wait(Effect::Store(Request::PublishSystemId {
                        lease,
                        system_id: system_id.clone(),
                    }))
                }
                _ => Done(txn(outcome).map(|won| {
                    if won {
                        self.log(
                            Level::Info,
                            format!("cluster bootstrapped: system {system_id}"),
                        );
                    }
                })),
            },
            Action::CloneFrom(leader) => match stage {
                0 => match self.address_of(leader) {
                    Some(from) => {
                        self.log(Level::Info, format!("cloning from {leader} ({from})"));
                        Wait(Effect::Postgres(PgOp::Clone { from }))
                    }
                    None => Done(Err(format!("leader {leader} has no registered address"))),
                },
                _ => {
                    let result = done(outcome);
                    if result.is_ok() {
                        // A fresh copy of the leader: any earlier rewind verdict is moot.
                        self.last_rewind = None;
                        self.log(Level::Info, "clone complete");
                    }
                    Done(result)
                }
            },
            Action::Start(start_as) => self.start(cx, start_as, stage, outcome),
            Action::Stop {
                reason,
                handover_to,
            } => match stage {
                0 => {
                    self.log(Level::Warn, format!("stopping PostgreSQL: {reason}"));
                    Wait(Effect::Haproxy(HaproxyOp::StopWritesToMe))
                }
                1 => {
                    // A switchover's stop waits for the WAL senders to hand the
                    // target every byte: escalating to an immediate shutdown
                    // would cut that short (found by the simulator, seed 15768).
                    let grace = if handover_to.is_some() {
                        self.setup.handover_stop_grace
                    } else {
                        self.dynamic.retry_timeout
                    };
                    Wait(Effect::Postgres(PgOp::Stop {
                        grace,
                        handover_to: handover_to.clone(),
                    }))
                }
                _ => Done(done(outcome)),
            },
            Action::Promote { reason } => self.promote(cx, reason, stage, outcome, scratch),
            Action::Rewind(leader) => self.rewind(leader, stage, outcome, scratch),
            Action::Follow(leader) => match stage {
                0 => {
                    let follow = match leader {
                        Some(name) => match self.upstream(name) {
                            Some(upstream) => Some(upstream),
                            None => {
                                return Done(Err(format!(
                                    "leader {name} has not registered its address yet"
                                )))
                            }
                        },
                        None => None,
                    };
                    Wait(Effect::Postgres(PgOp::Configure {
                        follow,
                        standby: true,
                        sync_names: None,
                    }))
                }
                1 => then(outcome, Effect::Postgres(PgOp::Reload)),
                _ => Done(done(outcome).map(|()| {
                    let leader = leader.as_deref().unwrap_or("nobody");
                    self.log(Level::Info, format!("now following {leader}"));
                })),
            },
            Action::AcquireLeader => match stage {
                0 => {
                    let Some(lease) = cx.lease.id else {
                        return Done(Err("no lease".into()));
                    };
                    Wait(Effect::Store(Request::CreateIfAbsent {
                        key: Key::Leader,
                        value: Value::Text(self.setup.identity.name.clone()),
                        lease: Some(lease),
                    }))
                }
                _ => Done(txn(outcome).map(|won| {
                    let what = if won {
                        "acquired the leader key"
                    } else {
                        "another member took the leader key first"
                    };
                    self.log(Level::Info, what);
                })),
            },
            Action::ReleaseLeader => self.release(stage, outcome, scratch),
            Action::CreateSlot(slot) => match stage {
                0 => Wait(Effect::Postgres(PgOp::CreateSlot(slot.clone()))),
                _ => Done(done(outcome).map(|()| {
                    self.log(Level::Info, format!("created replication slot {slot}"));
                })),
            },
            Action::DropSlot(slot) => match stage {
                0 => Wait(Effect::Postgres(PgOp::DropSlot(slot.clone()))),
                _ => Done(done(outcome).map(|()| {
                    self.log(Level::Info, format!("dropped replication slot {slot}"));
                })),
            },
            Action::PublishLeaderStatus(status) => match stage {
                0 => self.as_leader(|term| Request::PutAsLeader {
                    term,
                    key: Key::Status,
                    value: Value::Status(status.clone()),
                }),
                _ => Done(txn(outcome).map(drop)),
            },
            Action::Checkpoint => match stage {
                0 => Wait(Effect::Postgres(PgOp::Checkpoint)),
                _ => Done(done(outcome).map_err(|error| format!("CHECKPOINT: {error}"))),
            },
            Action::ClearSwitchover { reason } => match stage {
                0 => self.as_leader(|term| Request::DeleteAsLeader {
                    term,
                    key: Key::Switchover,
                }),
                _ => Done(txn(outcome).map(|removed| {
                    if removed {
                        self.log(Level::Warn, format!("switchover intent removed: {reason}"));
                    }
                })),
            },
            Action::WriteSync(sync) => match stage {
                0 => self.as_leader(|term| Request::PutAsLeader {
                    term,
                    key: Key::Sync,
                    value: Value::Sync(sync.clone()),
                }),
                _ => Done(txn(outcome).and_then(|written| {
                    if !written {
                        return Err("the leader key changed: sync key not written".into());
                    }
                    let standbys = sync.members.join(", ");
                    self.log(
                        Level::Info,
                        format!("synchronous standbys recorded in etcd: [{standbys}]"),
                    );
                    Ok(())
                })),
            },
            Action::SetSyncNames(names) => match stage {
                0 => Wait(Effect::Postgres(PgOp::Configure {
                    follow: None,
                    standby: false,
                    sync_names: Some(names.clone()),
                })),
                1 => then(outcome, Effect::Postgres(PgOp::Reload)),
                2 => then(
                    outcome,
                    Effect::Postgres(PgOp::ConfirmSyncNames(names.clone())),
                ),
                _ => Done(done(outcome).map(|()| {
                    self.log(
                        Level::Info,
                        format!("synchronous_standby_names = '{}'", names.render()),
                    );
                })),
            },
            Action::RestoreTo(intent) => self.restore_to(cx, intent, stage, outcome),
            Action::RecordRestore { intent, entry } => match stage {
                0 => self.as_leader(|term| Request::AppendHistory {
                    term,
                    entry: entry.clone(),
                }),
                1 => {
                    if let Err(error) = txn(outcome) {
                        self.log(Level::Warn, format!("history not appended: {error}"));
                    }
                    self.as_leader(|term| Request::PutAsLeader {
                        term,
                        key: Key::Restore,
                        value: Value::Restore(Box::new(intent.clone())),
                    })
                }
                _ => Done(txn(outcome).and_then(|written| {
                    if !written {
                        return Err("the leader key changed: the restore is not recorded".into());
                    }
                    self.log(
                        Level::Warn,
                        format!(
                            "restored to {}: now the primary; the other members re-clone",
                            intent.target
                        ),
                    );
                    Ok(())
                })),
            },
            Action::ClearRestore => match stage {
                0 => self.as_leader(|term| Request::DeleteAsLeader {
                    term,
                    key: Key::Restore,
                }),
                _ => Done(txn(outcome).map(|removed| {
                    if removed {
                        self.log(Level::Info, "restore finished: every member streams again");
                    }
                })),
            },
            Action::ClearSync => match stage {
                0 => self.as_leader(|term| Request::DeleteAsLeader {
                    term,
                    key: Key::Sync,
                }),
                _ => Done(txn(outcome).map(|removed| {
                    if removed {
                        self.log(Level::Info, "synchronous mode off: sync key removed");
                    }
                })),
            },
        }
    }

    /// Enters the bootstrap race: an empty `initialize` on this lease, then
    /// the `config` seed, unless someone did first.
    fn claim_initialize(&mut self, cx: &Context, stage: u8, outcome: Outcome) -> Progress {
        use Progress::{Done, Wait};
        match stage {
            0 => {
                let Some(lease) = cx.lease.id else {
                    return Done(Err("no lease".into()));
                };
                Wait(Effect::Store(Request::CreateIfAbsent {
                    key: Key::Initialize,
                    value: Value::Text(String::new()),
                    lease: Some(lease),
                }))
            }
            1 => match txn(outcome) {
                Ok(true) => {
                    self.log(Level::Info, "won the bootstrap race");
                    Wait(Effect::Store(Request::CreateIfAbsent {
                        key: Key::Config,
                        value: Value::Config(Ok(Box::new(self.setup.bootstrap.clone()))),
                        lease: None,
                    }))
                }
                other => Done(other.map(drop)),
            },
            _ => Done(txn(outcome).map(drop)),
        }
    }

    fn start(&mut self, cx: &Context, start_as: &StartAs, stage: u8, outcome: Outcome) -> Progress {
        use Progress::{Done, Wait};
        let primary = matches!(start_as, StartAs::Primary);
        match stage {
            0 => {
                let follow = match start_as {
                    StartAs::Primary => None,
                    StartAs::Replica { follow } => {
                        follow.as_deref().and_then(|name| self.upstream(name))
                    }
                };
                let mut sync_names = None;
                if primary {
                    if self.planted != Some(PlantedBug::NoLeaseRecheckBeforeWrites) {
                        if let Err(error) = self.ensure_lease_allows_writes(cx) {
                            return Done(Err(error));
                        }
                    }
                    sync_names = Some(self.sync_names_as_new_primary());
                }
                Wait(Effect::Postgres(PgOp::Configure {
                    follow,
                    standby: !primary,
                    sync_names,
                }))
            }
            1 => {
                if let Err(error) = done(outcome) {
                    return Done(Err(error));
                }
                let role = if primary { "primary" } else { "replica" };
                self.log(Level::Info, format!("starting PostgreSQL as {role}"));
                Wait(Effect::Postgres(PgOp::Start { primary }))
            }
            _ => Done(done(outcome)),
        }
    }

    /// The restore: the repository's copy at the target replaces the
    /// stopped data directory, then it starts as the primary it will be once
    /// recovered (the watchdog guards it from its first moment).
    fn restore_to(
        &mut self,
        cx: &Context,
        intent: &jai_proto::RestoreIntent,
        stage: u8,
        outcome: Outcome,
    ) -> Progress {
        use Progress::{Done, Wait};
        match stage {
            0 => {
                self.log(
                    Level::Warn,
                    format!("restoring the backup repository to {}", intent.target),
                );
                Wait(Effect::Postgres(PgOp::RestoreToTime {
                    target: intent.target.clone(),
                }))
            }
            1 => {
                if let Err(error) = done(outcome) {
                    return Done(Err(error));
                }
                if let Err(error) = self.ensure_lease_allows_writes(cx) {
                    return Done(Err(error));
                }
                Wait(Effect::Postgres(PgOp::Configure {
                    follow: None,
                    standby: false,
                    sync_names: Some(self.sync_names_as_new_primary()),
                }))
            }
            2 => then(outcome, Effect::Postgres(PgOp::Start { primary: true })),
            _ => Done(done(outcome).map(|()| {
                self.log(
                    Level::Info,
                    format!("restored copy started: recovering to {}", intent.target),
                );
            })),
        }
    }

    /// The promotion: synchronous names first (commits after it wait for
    /// standbys from the first one), every other member cut from writes,
    /// the lease checked again, the watchdog armed, `pg_promote`, history,
    /// routing, and a checkpoint in the background.
    fn promote(
        &mut self,
        cx: &Context,
        reason: &str,
        stage: u8,
        outcome: Outcome,
        scratch: &mut Scratch,
    ) -> Progress {
        use Progress::{Done, Wait};
        match stage {
            0 => match self.leader_term() {
                Ok(term) => {
                    scratch.term = term;
                    Wait(Effect::ObservePostgres)
                }
                Err(error) => Done(Err(error)),
            },
            1 => {
                let Outcome::Postgres { process, .. } = outcome else {
                    panic!("interpreter bug: ObservePostgres answered {outcome:?}");
                };
                let PgProcess::Running(before) = process else {
                    return Done(Err(format!("cannot promote: PostgreSQL is {process:?}")));
                };
                let follow = before
                    .following
                    .as_deref()
                    .and_then(|name| self.upstream(name));
                scratch.before = Some(before);
                let sync_names = self.sync_names_as_new_primary();
                if sync_names == SyncNames::Off {
                    return Progress::WaitAt(Self::cut_writes_effect(), 5);
                }
                Wait(Effect::Postgres(PgOp::Configure {
                    follow,
                    standby: true,
                    sync_names: Some(sync_names),
                }))
            }
            2 => then(outcome, Effect::Postgres(PgOp::Reload)),
            3 => then(
                outcome,
                Effect::Postgres(PgOp::ConfirmSyncNames(self.sync_names_as_new_primary())),
            ),
            4 => then(outcome, Self::cut_writes_effect()),
            5 => {
                // Writes were routed away from every other member before this
                // one can take any (a former primary whose agent hangs keeps
                // running until it is fenced). HAProxy being unreachable is
                // no reason not to promote: logged by the shell.
                let _ = done(outcome);
                if self.planted != Some(PlantedBug::NoLeaseRecheckBeforeWrites) {
                    if let Err(error) = self.ensure_lease_allows_writes(cx) {
                        return Done(Err(error));
                    }
                }
                self.commands.push(Command::ArmFence { primary: true });
                self.log(Level::Warn, format!("promoting: {reason}"));
                Wait(Effect::Postgres(PgOp::Promote))
            }
            6 => {
                if let Err(error) = done(outcome) {
                    return Done(Err(error));
                }
                let before = scratch.before.take().expect("observed at stage 1");
                let entry = HistoryEntry {
                    timeline: before.timeline,
                    lsn: before.wal_position(),
                    reason: reason.to_owned(),
                    time_unix: cx.wall_clock_unix,
                    new_leader: self.setup.identity.name.clone(),
                };
                Wait(Effect::Store(Request::AppendHistory {
                    term: scratch.term,
                    entry,
                }))
            }
            7 => {
                match txn(outcome) {
                    Ok(true) => {}
                    Ok(false) => self.log(
                        Level::Warn,
                        "history not appended: the leader key changed meanwhile",
                    ),
                    Err(error) => self.log(Level::Warn, format!("history not appended: {error}")),
                }
                self.log(Level::Warn, "promoted: now the primary");
                Wait(Effect::Haproxy(HaproxyOp::RouteWritesHere))
            }
            8 => Wait(Effect::Postgres(PgOp::CheckpointInBackground)),
            _ => Done(Ok(())),
        }
    }

    /// Before a promotion: no writes to any other member.
    fn cut_writes_effect() -> Effect {
        Effect::Haproxy(HaproxyOp::CutWritesExceptMe)
    }

    /// `pg_rewind` against the leader: the leader must still hold the key and
    /// be reachable (a `CHECKPOINT` on it, so its control file names its new
    /// timeline); whatever `pg_rewind` then says is recorded for the core,
    /// not an error of the action.
    fn rewind(
        &mut self,
        leader: &str,
        stage: u8,
        outcome: Outcome,
        scratch: &mut Scratch,
    ) -> Progress {
        use Progress::{Done, Wait};
        match stage {
            0 => {
                let term = self
                    .view
                    .as_ref()
                    .and_then(|view| view.leader.as_ref())
                    .filter(|key| key.name == leader)
                    .map(|key| key.term);
                let Some(term) = term else {
                    return Done(Err(format!("{leader} no longer holds the leader key")));
                };
                let Some(address) = self.address_of(leader) else {
                    return Done(Err(format!("leader {leader} has no registered address")));
                };
                scratch.term = term;
                Wait(Effect::Postgres(PgOp::CheckpointAt { address }))
            }
            1 => {
                // Failing to reach the leader is no verdict on the rewind.
                if let Err(error) = done(outcome) {
                    return Done(Err(error));
                }
                let address = self.address_of(leader).unwrap_or_default();
                self.log(
                    Level::Warn,
                    format!("former primary: running pg_rewind from {leader} ({address})"),
                );
                Wait(Effect::Postgres(PgOp::Rewind { address }))
            }
            _ => {
                let Outcome::Rewound(result) = outcome else {
                    panic!("interpreter bug: a rewind answered {outcome:?}");
                };
                let error = match result {
                    Ok(last_line) => {
                        self.log(Level::Info, format!("pg_rewind from {leader}: {last_line}"));
                        None
                    }
                    Err(error) => {
                        self.log(
                            Level::Error,
                            format!("pg_rewind from {leader} failed: {error}"),
                        );
                        Some(error)
                    }
                };
                self.last_rewind = Some(RewindOutcome {
                    leader_term: scratch.term,
                    error,
                });
                Done(Ok(()))
            }
        }
    }

    /// Gives the leader key up. After a switchover's clean stop, the
    /// shutdown checkpoint is published first as the leader's last position,
    /// so the target promotes only once it has received everything (found
    /// by the simulator, seed 10796).
    fn release(&mut self, stage: u8, outcome: Outcome, scratch: &mut Scratch) -> Progress {
        use Progress::{Done, Wait};
        let handing_over = self.handing_over.is_some();
        let planted_late = self.planted == Some(PlantedBug::FinalPositionAfterRelease);
        let release =
            |term: i64, name: String| Wait(Effect::Store(Request::ReleaseLeader { term, name }));
        let name = self.setup.identity.name.clone();
        match (stage, handing_over, planted_late) {
            (0, _, _) => match self.leader_term() {
                Ok(term) => {
                    scratch.term = term;
                    if handing_over && !planted_late {
                        Wait(Effect::Postgres(PgOp::FinalPosition))
                    } else {
                        release(term, name)
                    }
                }
                Err(error) => Done(Err(error)),
            },
            // The order that keeps writes: final position, then release.
            (1, true, false) => match self.final_status(scratch, outcome) {
                Ok(publish) => Wait(publish),
                Err(error) => Done(Err(error)),
            },
            (2, true, false) => match txn(outcome) {
                Ok(true) => {
                    if let Some((timeline, optime)) = scratch.final_position {
                        self.log(
                            Level::Info,
                            format!("switchover: final WAL position {optime} (timeline {timeline}) published"),
                        );
                    }
                    release(scratch.term, name)
                }
                Ok(false) => Done(Err(
                    "the leader key changed before the final position was published".into(),
                )),
                Err(error) => Done(Err(error)),
            },
            // The planted bug: release, then the final position.
            (1, true, true) => match txn(outcome) {
                Ok(_) => Wait(Effect::Postgres(PgOp::FinalPosition)),
                Err(error) => Done(Err(error)),
            },
            (2, true, true) => match self.final_status(scratch, outcome) {
                Ok(publish) => Wait(publish),
                Err(_) => Done(Ok(())),
            },
            (3, true, true) => Done(Ok(())),
            _ => Done(txn(outcome).map(|_| {
                self.log(Level::Warn, "released the leader key");
            })),
        }
    }

    /// The stopped primary's final position (the outcome of
    /// `PgOp::FinalPosition`) as the `status` to publish in its term: a
    /// clean stop, which no member short of it may take over from.
    fn final_status(&self, scratch: &mut Scratch, outcome: Outcome) -> Result<Effect, String> {
        let Outcome::FinalPosition(position) = outcome else {
            panic!("interpreter bug: FinalPosition answered {outcome:?}");
        };
        let (timeline, optime) = position?;
        scratch.final_position = Some((timeline, optime));
        Ok(Effect::Store(Request::PutAsLeader {
            term: scratch.term,
            key: Key::Status,
            value: Value::Status(LeaderStatus {
                leader: self.setup.identity.name.clone(),
                timeline,
                optime,
                clean_stop: true,
            }),
        }))
    }

    // ---- helpers ----------------------------------------------------------

    /// The core decided on a lease it saw; the steps before this one
    /// (publishing the member status, a slow etcd) may have used that time
    /// up. Checked again right before PostgreSQL could start taking writes.
    fn ensure_lease_allows_writes(&self, cx: &Context) -> Result<(), String> {
        let lease = LeaseView {
            valid_until: cx.lease.valid_until,
        };
        if lease.is_valid_beyond(cx.now, self.dynamic.demote_margin()) {
            Ok(())
        } else {
            Err("leader lease no longer confirmed beyond the demotion margin: not becoming writable".into())
        }
    }

    /// A guarded write of this leader's term, or the error that this member
    /// does not lead.
    fn as_leader(&self, request: impl FnOnce(i64) -> Request) -> Progress {
        match self.leader_term() {
            Ok(term) => Progress::Wait(Effect::Store(request(term))),
            Err(error) => Progress::Done(Err(error)),
        }
    }

    fn leader_term(&self) -> Result<i64, String> {
        self.view
            .as_ref()
            .and_then(|view| view.leader.as_ref())
            .filter(|leader| leader.mine)
            .map(|leader| leader.term)
            .ok_or_else(|| "this member does not hold the leader key".to_owned())
    }

    fn address_of(&self, member: &str) -> Option<String> {
        self.view
            .as_ref()
            .and_then(|view| view.member(member))
            .map(|status| status.pg_address.clone())
    }

    fn upstream(&self, member: &str) -> Option<Upstream> {
        self.address_of(member).map(|address| Upstream {
            name: member.to_owned(),
            address,
        })
    }

    /// `synchronous_standby_names` for this member as it becomes a primary.
    fn sync_names_as_new_primary(&self) -> SyncNames {
        self.view
            .as_ref()
            .map(|view| names_for_new_primary(&self.setup.identity.name, view))
            .unwrap_or_default()
    }

    fn log(&mut self, level: Level, text: impl Into<String>) {
        self.commands.push(Command::Log(LogLine {
            level,
            text: text.into(),
        }));
    }

    /// Logs a failure once per outage: repeats go to debug.
    fn note_error(&mut self, problem: Problem, error: String) {
        let what = problem.describe();
        if self.problems.get(&problem) == Some(&error) {
            self.log(Level::Debug, format!("{what}: {error}"));
        } else {
            self.log(Level::Warn, format!("{what}: {error}"));
            self.problems.insert(problem, error);
        }
    }

    /// A store error: a lease etcd says is gone is forgotten at once.
    fn note_store_error(&mut self, cx: &Context, problem: Problem, error: StoreError) {
        if let (StoreError::LeaseGone(_), Some(id)) = (&error, cx.lease.id) {
            self.log(Level::Warn, "etcd says our lease is gone: re-registering");
            self.commands.push(Command::ForgetLease(id));
        }
        self.note_error(problem, error.to_string());
    }

    /// The next success of a failing kind is logged as a recovery.
    fn note_success(&mut self, problem: Problem) {
        if self.problems.remove(&problem).is_some() {
            self.log(Level::Info, format!("{}: recovered", problem.describe()));
        }
    }
}

fn running_as_primary(process: &PgProcess) -> bool {
    matches!(process, PgProcess::Running(pg) if pg.role == PgRole::Primary)
}

/// The result of an effect answered with [`Outcome::Done`].
fn done(outcome: Outcome) -> Result<(), String> {
    match outcome {
        Outcome::Done(result) => result,
        other => panic!("interpreter bug: expected Done, got {other:?}"),
    }
}

/// After a step answered with [`Outcome::Done`]: `next`, or the step's error.
fn then(outcome: Outcome, next: Effect) -> Progress {
    match done(outcome) {
        Ok(()) => Progress::Wait(next),
        Err(error) => Progress::Done(Err(error)),
    }
}

/// The result of a guarded write: whether it happened.
fn txn(outcome: Outcome) -> Result<bool, String> {
    match outcome {
        Outcome::Store(Ok(Reply::Txn(won))) => Ok(won),
        Outcome::Store(Ok(other)) => panic!("interpreter bug: a transaction answered {other:?}"),
        Outcome::Store(Err(error)) => Err(error.to_string()),
        other => panic!("interpreter bug: expected a store answer, got {other:?}"),
    }
}

fn humanize(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis.is_multiple_of(1000) {
        format!("{}s", millis / 1000)
    } else {
        format!("{millis}ms")
    }
}
