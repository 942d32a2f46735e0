//! The simulated shell: one incarnation of `jai-agent` on one member, driving
//! the real [`Core`].
//!
//! It mirrors `agent/src/shell.rs` and `agent/src/dcs.rs` step by step, as an
//! explicit state machine instead of async code, so that every wait (an etcd
//! request, a PostgreSQL operation, `loop_wait`) is a point where simulated time
//! passes and faults can strike:
//!
//! - a cycle observes PostgreSQL, reads the cluster, registers a lease if it
//!   has none (then reads again), asks the peers for their WAL positions when
//!   there is no leader, takes the instant of the observation *after* all that,
//!   arms the fencing watchdog, decides, publishes the member status, executes
//!   the actions in order (stopping at the first error of an action that
//!   warrants a recheck), then rechecks at once or sleeps `loop_wait` unless
//!   woken (a `Notify` permit: watch event, PostgreSQL exit, lease lost, fence);
//! - `Start(Primary)` and `Promote` check the lease again when they run
//!   (`ensure_lease_allows_writes`) and fail if it is no longer valid beyond
//!   the demotion margin; a primary start arms the watchdog with the new
//!   postmaster at once, a promotion arms it right before `pg_promote`;
//! - the keepalive task renews the lease every `min(loop_wait, ttl / 10)`
//!   (100 ms after a failed attempt, each bounded by 500 ms) and
//!   sets `valid_until = send time of the answered keepalive + TTL`, on this
//!   member's own (drifting) clock;
//! - the fencing watchdog checks every 50 ms whether the armed primary's lease
//!   is still valid beyond the demotion margin, and sends it SIGINT if not;
//! - every etcd request is bounded by `retry_timeout`; an answer saying the
//!   lease is gone makes the agent forget it.

use super::etcd::{Key, Kv, LeaseId, Reply, Request, Value};
use super::postgres::OpKind;
use super::{Env, Plant, ViolationKind};
use jai_agent::ha::{
    Action, ClusterView, Core, DataDir, Decision, Identity, Initialize, LeaderKey, LeaseView,
    LocalPostgres, MemberAddresses, Millis, Observation, PgProcess, PgRole, RewindOutcome, StartAs,
};
use jai_proto::{DynamicConfig, HistoryEntry, Lsn, MemberRole, MemberState, MemberStatus, Tags};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// `shell.rs`: consecutive immediate rechecks before the loop waits anyway.
const MAX_IMMEDIATE_RECHECKS: u32 = 20;

/// `shell.rs`: how often the fencing watchdog looks at the lease.
const FENCE_CHECK_EVERY_MS: u64 = 50;

/// `shell.rs`: how long a peer's API may take to report its WAL position.
pub const PEER_TIMEOUT_MS: u64 = 300;

/// `dcs.rs`: the longest one lease renewal attempt may take.
const KEEPALIVE_ATTEMPT_MS: u64 = 500;

/// `dcs.rs`: pause before retrying a failed lease renewal.
const KEEPALIVE_RETRY_MS: u64 = 100;

/// A member's monotonic clock: milliseconds since the agent started, running
/// `ppm` parts per million fast (or slow) against real simulated time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Real time of the agent's start.
    pub boot: u64,
    /// Drift.
    pub ppm: i64,
}

impl Clock {
    /// Local time at real time `real`.
    pub fn local(&self, real: u64) -> Millis {
        let elapsed = real.saturating_sub(self.boot) as i128;
        (elapsed * (1_000_000 + self.ppm as i128) / 1_000_000) as Millis
    }

    /// A local duration in real milliseconds (rounded up).
    pub fn real_duration(&self, local: Millis) -> u64 {
        let rate = (1_000_000 + self.ppm) as u128;
        (local as u128 * 1_000_000).div_ceil(rate) as u64
    }
}

/// Which of the agent's timers fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerKind {
    /// The decision loop's (`loop_wait`, peer queries, a planted delay).
    Loop,
    /// The keepalive task's sleep.
    Keepalive,
    /// The fencing watchdog's tick at which the lease runs out.
    Fence,
}

/// Something that happened to this agent.
#[derive(Debug, Clone)]
pub enum AgentEvent {
    /// A timer fired.
    Timer(TimerKind, u64),
    /// An etcd request was answered, failed, or timed out.
    Reply {
        /// The request.
        id: u64,
        /// The answer.
        result: Result<Reply, String>,
    },
    /// A PostgreSQL operation finished.
    PgDone {
        /// The operation.
        id: u64,
        /// How it went.
        result: Result<(), String>,
    },
    /// `Notify::notify_one` on the loop's wake-up (watch, PostgreSQL exit,
    /// lease lost, fence).
    Wake,
}

/// The PostgreSQL half of an observation, taken at the start of a cycle.
type PgSeen = (PgProcess, DataDir);

/// What the decision loop is waiting for.
#[derive(Debug)]
enum Step {
    /// Not started yet.
    Idle,
    /// `read_cluster`; `second` after registering a lease.
    Read { req: u64, pg: PgSeen, second: bool },
    /// `ensure_lease`: reading the leader key.
    GetLeader {
        req: u64,
        pg: PgSeen,
        view: ClusterView,
    },
    /// `ensure_lease`: keepalive of the leader key's lease, to adopt it.
    AdoptLease {
        req: u64,
        lease: LeaseId,
        sent: Millis,
        pg: PgSeen,
        view: ClusterView,
    },
    /// `ensure_lease`: granting a new lease.
    Grant {
        req: u64,
        sent: Millis,
        pg: PgSeen,
        view: ClusterView,
    },
    /// `refresh_peer_positions`: asking every peer's API.
    Peers {
        token: u64,
        pg: PgSeen,
        view: ClusterView,
        asked: Vec<usize>,
    },
    /// `put_member`, before executing the decision.
    Report { req: u64, actions: Vec<Action> },
    /// Executing the decision's actions.
    Execute(Execution),
    /// Between cycles.
    Sleeping(u64),
}

#[derive(Debug)]
struct Execution {
    actions: Vec<Action>,
    next: usize,
    stage: u8,
    recheck: bool,
    waiting: Waiting,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    Nothing,
    Reply(u64),
    Op(u64),
    Timer(u64),
}

/// What resumed an action.
#[derive(Debug)]
enum Input {
    Start,
    Reply(Result<Reply, String>),
    Op(Result<(), String>),
    Timer,
}

impl Input {
    fn reply(self) -> Result<Reply, String> {
        match self {
            Input::Reply(result) => result,
            other => panic!("simulator bug: expected an etcd reply, got {other:?}"),
        }
    }

    fn op(self) -> Result<(), String> {
        match self {
            Input::Op(result) => result,
            other => panic!("simulator bug: expected an operation result, got {other:?}"),
        }
    }
}

enum Progress {
    Wait(Waiting),
    Done(Result<(), String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keepalive {
    Sleeping(u64),
    InFlight {
        id: u64,
        lease: LeaseId,
        sent: Millis,
    },
}

/// The fencing watchdog's target: a postmaster running as primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fence {
    /// The postmaster (its generation stands in for the PID).
    generation: u64,
    /// Demotion margin.
    margin_ms: u64,
    /// The pending tick at which the lease runs out.
    token: u64,
}

/// One running `jai-agent`.
pub struct Agent {
    /// Index of the member.
    pub member: usize,
    /// Which start of the agent on this member this is.
    pub incarnation: u32,
    name: String,
    tags: Tags,
    clock: Clock,
    core: Core,
    bootstrap: DynamicConfig,
    dynamic: DynamicConfig,
    view: Option<ClusterView>,
    /// The lease this agent holds (`LeaseTracker::id`).
    pub lease_id: Option<LeaseId>,
    /// `LeaseTracker::valid_until`, on the local clock.
    valid_until: Option<Millis>,
    /// `Postgres::following`: what this agent last configured.
    following: Option<String>,
    last_rewind: Option<RewindOutcome>,
    /// The leader term of the rewind under way.
    rewind_term: i64,
    fence: Option<Fence>,
    /// The last decision saw PostgreSQL running as a primary.
    decided_as_primary: bool,
    step: Step,
    wake_permit: bool,
    immediate: u32,
    keepalive: Keepalive,
    last_reason: Option<String>,
    last_errors: BTreeMap<String, String>,
    plant: Option<Plant>,
}

impl Agent {
    /// A fresh agent process, not started.
    pub fn new(
        member: usize,
        incarnation: u32,
        identity: Identity,
        clock: Clock,
        bootstrap: DynamicConfig,
        plant: Option<Plant>,
    ) -> Self {
        let name = identity.name.clone();
        let tags = identity.tags.clone();
        Self {
            member,
            incarnation,
            name,
            tags,
            clock,
            core: Core::new(identity),
            dynamic: bootstrap.clone(),
            bootstrap,
            view: None,
            lease_id: None,
            valid_until: None,
            following: None,
            last_rewind: None,
            rewind_term: 0,
            fence: None,
            decided_as_primary: false,
            step: Step::Idle,
            wake_permit: false,
            immediate: 0,
            keepalive: Keepalive::Sleeping(0),
            last_reason: None,
            last_errors: BTreeMap::new(),
            plant,
        }
    }

    /// What the shell does at start-up when it finds its marker.
    pub fn restore_unrewound_former_primary(&mut self) {
        self.core.restore_unrewound_former_primary();
    }

    /// `initial_snapshot`: what the API reports before the first cycle.
    pub fn initial_status(&self) -> MemberStatus {
        MemberStatus {
            name: self.name.clone(),
            role: MemberRole::Unknown,
            state: MemberState::Stopped,
            reason: Some("starting up".into()),
            api_url: String::new(),
            pg_address: format!("{}:5432", self.name),
            grpc_url: None,
            system_id: None,
            timeline: None,
            write_lsn: None,
            receive_lsn: None,
            replay_lsn: None,
            tags: self.tags.clone(),
            standing_down: false,
            streaming: None,
            standbys: Vec::new(),
            version: "sim".into(),
        }
    }

    /// `run`: spawns the keepalive task (the watch is the world's) and enters the loop.
    pub fn start(&mut self, env: &mut Env) {
        self.schedule_keepalive(env);
        self.begin_cycle(env);
    }

    /// Handles one event.
    pub fn on_event(&mut self, env: &mut Env, event: AgentEvent) {
        match event {
            AgentEvent::Wake => self.on_wake(env),
            AgentEvent::Timer(TimerKind::Loop, token) => self.on_loop_timer(env, token),
            AgentEvent::Timer(TimerKind::Keepalive, token) => {
                if self.keepalive == Keepalive::Sleeping(token) {
                    self.send_keepalive(env);
                }
            }
            AgentEvent::Timer(TimerKind::Fence, token) => self.on_fence_tick(env, token),
            AgentEvent::Reply { id, result } => {
                if let Err(error) = &result {
                    if self.awaits(id) {
                        self.forget_lease_if_gone(env, error);
                    }
                }
                match self.keepalive {
                    Keepalive::InFlight {
                        id: keepalive,
                        lease,
                        sent,
                    } if keepalive == id => self.on_keepalive_reply(env, lease, sent, result),
                    _ => self.on_reply(env, id, result),
                }
            }
            AgentEvent::PgDone { id, result } => {
                if matches!(&self.step, Step::Execute(execution) if execution.waiting == Waiting::Op(id))
                {
                    self.resume(env, Input::Op(result));
                }
            }
        }
    }

    /// Whether request `id` is still awaited (a timed-out request's late
    /// answer goes nowhere, like a dropped future).
    fn awaits(&self, id: u64) -> bool {
        let step = match &self.step {
            Step::Read { req, .. }
            | Step::GetLeader { req, .. }
            | Step::AdoptLease { req, .. }
            | Step::Grant { req, .. }
            | Step::Report { req, .. } => Some(*req),
            Step::Execute(execution) => match execution.waiting {
                Waiting::Reply(req) => Some(req),
                _ => None,
            },
            Step::Idle | Step::Peers { .. } | Step::Sleeping(_) => None,
        };
        let keepalive = match self.keepalive {
            Keepalive::InFlight { id, .. } => Some(id),
            Keepalive::Sleeping(_) => None,
        };
        step == Some(id) || keepalive == Some(id)
    }

    fn now(&self, env: &Env) -> Millis {
        self.clock.local(env.now)
    }

    fn send(&mut self, env: &mut Env, request: Request) -> u64 {
        let timeout = self
            .clock
            .real_duration(self.dynamic.retry_timeout.as_millis() as u64);
        env.send(self.member, self.incarnation, request, timeout)
    }

    fn timer(&mut self, env: &mut Env, kind: TimerKind, after_local: Millis) -> u64 {
        let at = env.now + self.clock.real_duration(after_local);
        env.timer(self.member, self.incarnation, at, kind)
    }

    fn log(&self, env: &mut Env, text: impl AsRef<str>) {
        env.log(format!("{}: {}", self.name, text.as_ref()));
    }

    /// `note_error`: an error is logged once per outage.
    fn note(&mut self, env: &mut Env, what: &str, error: String) {
        if self.last_errors.get(what) != Some(&error) {
            self.log(env, format!("{what}: {error}"));
            self.last_errors.insert(what.to_owned(), error);
        }
    }

    fn note_success(&mut self, what: &str) {
        self.last_errors.remove(what);
    }

    // ---- the lease (dcs.rs `LeaseTracker`, `run_keepalive`, `bounded`) ----

    fn adopt(&mut self, env: &mut Env, lease: LeaseId, valid_until: Millis) {
        self.lease_id = Some(lease);
        self.valid_until = Some(valid_until);
        self.reschedule_fence(env);
    }

    fn forget_lease(&mut self, env: &mut Env) {
        self.lease_id = None;
        self.valid_until = None;
        self.reschedule_fence(env);
    }

    /// `bounded`: etcd saying "lease not found" makes the agent forget its lease.
    fn forget_lease_if_gone(&mut self, env: &mut Env, error: &str) {
        if error.contains("lease not found") && self.lease_id.is_some() {
            self.log(env, "etcd says our lease is gone: re-registering");
            self.forget_lease(env);
        }
    }

    /// `apply_config`: renew ten times per TTL, at least every `loop_wait`.
    fn schedule_keepalive(&mut self, env: &mut Env) {
        let every = self
            .dynamic
            .loop_wait
            .min(self.dynamic.ttl / 10)
            .as_millis() as u64;
        self.schedule_keepalive_in(env, every);
    }

    fn schedule_keepalive_in(&mut self, env: &mut Env, after: Millis) {
        let token = self.timer(env, TimerKind::Keepalive, after);
        self.keepalive = Keepalive::Sleeping(token);
    }

    fn send_keepalive(&mut self, env: &mut Env) {
        let Some(lease) = self.lease_id else {
            return self.schedule_keepalive(env);
        };
        let sent = self.now(env);
        // An attempt stuck on etcd is abandoned early and retried.
        let retry_ms = self.dynamic.retry_timeout.as_millis() as u64;
        let timeout = self
            .clock
            .real_duration(KEEPALIVE_ATTEMPT_MS.min(retry_ms / 2));
        let id = env.send(
            self.member,
            self.incarnation,
            Request::KeepAlive(lease),
            timeout,
        );
        self.keepalive = Keepalive::InFlight { id, lease, sent };
    }

    fn on_keepalive_reply(
        &mut self,
        env: &mut Env,
        lease: LeaseId,
        sent: Millis,
        result: Result<Reply, String>,
    ) {
        match result {
            Ok(Reply::KeepAlive { ttl_secs }) if ttl_secs > 0 => {
                if self.lease_id == Some(lease) {
                    // Never backwards: answers may arrive out of order.
                    let until = sent + ttl_secs as u64 * 1000;
                    self.valid_until = self.valid_until.max(Some(until));
                    self.reschedule_fence(env);
                }
            }
            Ok(Reply::KeepAlive { .. }) => {
                self.log(env, "etcd says our lease expired: re-registering");
                if self.lease_id == Some(lease) {
                    self.forget_lease(env);
                }
                self.on_wake(env);
            }
            Ok(other) => panic!("simulator bug: keepalive answered {other:?}"),
            Err(_) => {
                // After a failed renewal, retry quickly.
                return self.schedule_keepalive_in(env, KEEPALIVE_RETRY_MS);
            }
        }
        self.schedule_keepalive(env);
    }

    // ---- the fencing watchdog (shell.rs `run_fence_watchdog`) ----

    /// `arm_fence`: the watchdog guards the postmaster iff this cycle observed
    /// it running as a primary.
    fn arm_fence(&mut self, env: &mut Env, observation: &Observation) {
        let primary =
            matches!(&observation.pg.process, PgProcess::Running(pg) if pg.role == PgRole::Primary);
        let pg = &env.pgs[self.member];
        self.fence = (primary && pg.has_postmaster()).then(|| Fence {
            generation: pg.generation,
            margin_ms: self.dynamic.demote_margin().as_millis() as u64,
            token: 0,
        });
        self.reschedule_fence(env);
    }

    /// `fence.primary_pid.store(pid)` in an action: the watchdog guards the
    /// current postmaster (one about to become a primary) from now on.
    fn arm_fence_now(&mut self, env: &mut Env) {
        let pg = &env.pgs[self.member];
        self.fence = pg.has_postmaster().then(|| Fence {
            generation: pg.generation,
            margin_ms: self.dynamic.demote_margin().as_millis() as u64,
            token: 0,
        });
        self.reschedule_fence(env);
    }

    /// `ensure_lease_allows_writes`: right before PostgreSQL could start
    /// taking writes, the lease must still be valid beyond the demotion
    /// margin (`is_valid_beyond`, the watchdog's test; `no-margin` ignores
    /// the margin here too).
    fn ensure_lease_allows_writes(&self, env: &Env) -> Result<(), String> {
        let margin = match self.plant {
            Some(Plant::NoMargin) => 0,
            _ => self.dynamic.demote_margin().as_millis() as u64,
        };
        if self
            .valid_until
            .is_some_and(|until| self.now(env) + margin < until)
        {
            Ok(())
        } else {
            Err(
                "leader lease no longer confirmed beyond the demotion margin: not becoming writable"
                    .into(),
            )
        }
    }

    /// Schedules the first watchdog tick (every 50 ms of the local clock) at
    /// which `now + margin < valid_until` no longer holds.
    fn reschedule_fence(&mut self, env: &mut Env) {
        let Some(mut fence) = self.fence else {
            return;
        };
        let now = self.now(env);
        let runs_out = self.fence_from(fence.margin_ms);
        let tick = runs_out.max(now).div_ceil(FENCE_CHECK_EVERY_MS) * FENCE_CHECK_EVERY_MS;
        fence.token = self.timer(env, TimerKind::Fence, tick - now);
        self.fence = Some(fence);
    }

    /// The local instant from which the lease is no longer valid beyond the
    /// margin (`now + margin < valid_until` fails). The planted bugs move it:
    /// `no-margin` to the deadline itself, `late-demote` past it.
    fn fence_from(&self, margin_ms: u64) -> Millis {
        match (self.valid_until, self.plant) {
            (None, _) => 0,
            (Some(until), Some(Plant::LateDemote(late))) => until + late,
            (Some(until), Some(Plant::NoMargin)) => until,
            (Some(until), None) => until.saturating_sub(margin_ms),
        }
    }

    fn on_fence_tick(&mut self, env: &mut Env, token: u64) {
        let Some(fence) = self.fence.filter(|fence| fence.token == token) else {
            return;
        };
        if self.now(env) < self.fence_from(fence.margin_ms) {
            return self.reschedule_fence(env);
        }
        self.log(
            env,
            "fencing: leader lease not confirmed by etcd; stopping PostgreSQL before the lease can expire",
        );
        env.signal_stop(self.member, fence.generation);
        self.fence = None;
        self.on_wake(env);
    }

    // ---- the decision loop (shell.rs `run_loop` and `cycle`) ----

    fn on_wake(&mut self, env: &mut Env) {
        if matches!(self.step, Step::Sleeping(_)) {
            self.begin_cycle(env);
        } else {
            self.wake_permit = true;
        }
    }

    fn on_loop_timer(&mut self, env: &mut Env, token: u64) {
        match std::mem::replace(&mut self.step, Step::Idle) {
            Step::Sleeping(sleeping) if sleeping == token => self.begin_cycle(env),
            Step::Peers {
                token: asked_at,
                pg,
                mut view,
                asked,
            } if asked_at == token => {
                for member in asked {
                    if let Some(fresh) = env.peer_status(member) {
                        if let Some(known) = view.members.iter_mut().find(|m| m.name == fresh.name)
                        {
                            *known = fresh;
                        }
                    }
                }
                self.decide(env, pg, Some(view));
            }
            Step::Execute(execution) if execution.waiting == Waiting::Timer(token) => {
                self.run_actions(env, execution, Input::Timer)
            }
            other => self.step = other,
        }
    }

    fn begin_cycle(&mut self, env: &mut Env) {
        let standbys = env.standby_links(self.member);
        let pg = env.pgs[self.member].observe(self.following.clone(), standbys);
        self.read(env, pg, false);
    }

    fn read(&mut self, env: &mut Env, pg: PgSeen, second: bool) {
        let req = self.send(env, Request::GetAll);
        self.step = Step::Read { req, pg, second };
    }

    fn on_reply(&mut self, env: &mut Env, id: u64, result: Result<Reply, String>) {
        match std::mem::replace(&mut self.step, Step::Idle) {
            Step::Read { req, pg, second } if req == id => {
                let dcs = self.read_result(env, result);
                match dcs {
                    Some(view) if self.lease_id.is_none() && !second => {
                        let req = self.send(env, Request::GetLeader);
                        self.step = Step::GetLeader { req, pg, view };
                    }
                    dcs => self.after_read(env, pg, dcs),
                }
            }
            Step::GetLeader { req, pg, view } if req == id => match result {
                Ok(Reply::Leader(Some(kv))) if self.names_me(&kv) && kv.lease.is_some() => {
                    let lease = kv.lease.expect("checked");
                    let sent = self.now(env);
                    let req = self.send(env, Request::KeepAlive(lease));
                    self.step = Step::AdoptLease {
                        req,
                        lease,
                        sent,
                        pg,
                        view,
                    };
                }
                Ok(_) => self.grant(env, pg, view),
                Err(error) => {
                    self.note(env, "cannot get a lease from etcd", error);
                    self.after_read(env, pg, Some(view));
                }
            },
            Step::AdoptLease {
                req,
                lease,
                sent,
                pg,
                view,
            } if req == id => match result {
                Ok(Reply::KeepAlive { ttl_secs }) if ttl_secs > 0 => {
                    self.adopt(env, lease, sent + ttl_secs as u64 * 1000);
                    self.log(env, "resumed leadership: adopted the leader key's lease");
                    self.read(env, pg, true);
                }
                _ => self.grant(env, pg, view),
            },
            Step::Grant {
                req,
                sent,
                pg,
                view,
            } if req == id => match result {
                Ok(Reply::Granted { id, ttl_secs }) => {
                    self.adopt(env, id, sent + ttl_secs as u64 * 1000);
                    self.note_success("cannot get a lease from etcd");
                    self.log(env, format!("granted a new lease {id:x}"));
                    self.read(env, pg, true);
                }
                Ok(other) => panic!("simulator bug: grant answered {other:?}"),
                Err(error) => {
                    self.note(env, "cannot get a lease from etcd", error);
                    self.after_read(env, pg, Some(view));
                }
            },
            Step::Report { req, actions } if req == id => {
                if let Err(error) = result {
                    self.note(env, "cannot publish member status", error);
                }
                self.execute(env, actions);
            }
            Step::Execute(execution) if execution.waiting == Waiting::Reply(id) => {
                self.run_actions(env, execution, Input::Reply(result));
            }
            other => self.step = other,
        }
    }

    fn grant(&mut self, env: &mut Env, pg: PgSeen, view: ClusterView) {
        let sent = self.now(env);
        let ttl_secs = self.dynamic.ttl.as_secs().max(2) as i64;
        let req = self.send(env, Request::Grant { ttl_secs });
        self.step = Step::Grant {
            req,
            sent,
            pg,
            view,
        };
    }

    /// `read_cluster` of the shell: the view, and the cluster config adopted.
    fn read_result(&mut self, env: &mut Env, result: Result<Reply, String>) -> Option<ClusterView> {
        match result {
            Ok(Reply::Kvs(kvs)) => {
                self.note_success("etcd unreachable");
                let view = self.build_view(&kvs);
                if view.config != self.dynamic {
                    // apply_config: request timeout and keepalive period follow.
                    self.dynamic = view.config.clone();
                }
                Some(view)
            }
            Ok(other) => panic!("simulator bug: read answered {other:?}"),
            Err(error) => {
                self.note(env, "etcd unreachable", error);
                None
            }
        }
    }

    /// Without a leader, a running standby asks its peers for fresh positions.
    fn after_read(&mut self, env: &mut Env, pg: PgSeen, dcs: Option<ClusterView>) {
        let standby =
            matches!(&pg.0, PgProcess::Running(running) if running.role == PgRole::Replica);
        match dcs {
            Some(view) if view.leader.is_none() && standby => {
                let asked: Vec<usize> = view
                    .members
                    .iter()
                    .filter(|member| member.name != self.name)
                    .filter_map(|member| env.member_index(&member.name))
                    .collect();
                let delay = env.peer_query_delay(&asked);
                let token = self.timer(env, TimerKind::Loop, delay);
                self.step = Step::Peers {
                    token,
                    pg,
                    view,
                    asked,
                };
            }
            dcs => self.decide(env, pg, dcs),
        }
    }

    fn names_me(&self, kv: &Kv) -> bool {
        kv.value == Value::Text(self.name.clone())
    }

    /// `Dcs::read_cluster`: the core's view of the keys.
    fn build_view(&self, kvs: &[(Key, Kv)]) -> ClusterView {
        cluster_view(kvs, self.lease_id, &self.name, &self.dynamic)
    }

    fn decide(&mut self, env: &mut Env, pg: PgSeen, dcs: Option<ClusterView>) {
        self.view = dcs.clone();
        let mut valid_until = self.valid_until;
        if self.plant == Some(Plant::NoMargin) {
            let margin = self.dynamic.demote_margin().as_millis() as u64;
            valid_until = valid_until.map(|until| until + margin);
        }
        let (process, data_dir) = pg;
        let observation = Observation {
            now: self.now(env),
            wall_clock_unix: env.wall_clock_unix(Some(self.member)),
            pg: LocalPostgres {
                data_dir,
                process,
                last_rewind: self.last_rewind.clone(),
            },
            dcs,
            lease: LeaseView { valid_until },
        };
        self.arm_fence(env, &observation);
        self.decided_as_primary = matches!(
            &observation.pg.process,
            PgProcess::Running(pg) if pg.role == PgRole::Primary
        );
        let core = &mut self.core;
        let decision = match catch_unwind(AssertUnwindSafe(|| core.decide(&observation))) {
            Ok(decision) => decision,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "non-text panic".into());
                env.violate(
                    ViolationKind::CoreAssertion,
                    format!("{}: Core::decide panicked: {message}", self.name),
                );
                return;
            }
        };
        // The shell persists the marker before it reports or acts.
        env.unrewound_markers[self.member] = self.core.unrewound_former_primary();
        self.log_decision(env, &observation, &decision);
        let status = self.member_status(&observation, &decision);
        env.publish_snapshot(self.member, status.clone());
        if observation.dcs.is_some() && self.lease_id.is_some() {
            let req = self.send(
                env,
                Request::Put {
                    key: Key::Member(self.name.clone()),
                    value: Value::Member(Box::new(status)),
                    lease: self.lease_id,
                },
            );
            self.step = Step::Report {
                req,
                actions: decision.actions,
            };
        } else {
            self.execute(env, decision.actions);
        }
    }

    fn log_decision(&mut self, env: &mut Env, observation: &Observation, decision: &Decision) {
        if decision.actions.is_empty() && decision.reason == self.last_reason {
            return;
        }
        self.last_reason = decision.reason.clone();
        let actions: Vec<String> = decision.actions.iter().map(short).collect();
        let lease = match observation.lease.valid_until {
            Some(until) => format!("lease {:+}ms", until as i64 - observation.now as i64),
            None => "no lease".into(),
        };
        let unreachable = if observation.dcs.is_none() {
            ", etcd unreachable"
        } else {
            ""
        };
        self.log(
            env,
            format!(
                "decide [{}] {} ({lease}{unreachable})",
                actions.join(", "),
                decision.reason.as_deref().unwrap_or(""),
            ),
        );
    }

    /// What the shell publishes: `Core::member_status`.
    fn member_status(&self, observation: &Observation, decision: &Decision) -> MemberStatus {
        let reach = MemberAddresses {
            api_url: String::new(),
            pg_address: format!("{}:5432", self.name),
            grpc_url: None,
        };
        self.core.member_status(observation, decision, reach, "sim")
    }

    fn execute(&mut self, env: &mut Env, actions: Vec<Action>) {
        let execution = Execution {
            actions,
            next: 0,
            stage: 0,
            recheck: false,
            waiting: Waiting::Nothing,
        };
        self.run_actions(env, execution, Input::Start);
    }

    fn resume(&mut self, env: &mut Env, input: Input) {
        if let Step::Execute(execution) = std::mem::replace(&mut self.step, Step::Idle) {
            self.run_actions(env, execution, input);
        }
    }

    fn run_actions(&mut self, env: &mut Env, mut execution: Execution, mut input: Input) {
        loop {
            let Some(action) = execution.actions.get(execution.next).cloned() else {
                return self.finish_cycle(env, execution.recheck);
            };
            let progress = self.step_action(env, &action, execution.stage, input);
            input = Input::Start;
            match progress {
                Progress::Wait(waiting) => {
                    execution.stage += 1;
                    execution.waiting = waiting;
                    self.step = Step::Execute(execution);
                    return;
                }
                Progress::Done(Ok(())) => {
                    execution.recheck |= action.warrants_immediate_recheck();
                }
                // Housekeeping (slots, status) failing must not hold up the rest.
                Progress::Done(Err(error)) if !action.warrants_immediate_recheck() => {
                    self.note(env, &format!("{} failed", short(&action)), error);
                }
                Progress::Done(Err(error)) => {
                    self.note(env, &format!("{} failed", short(&action)), error);
                    return self.finish_cycle(env, false);
                }
            }
            execution.next += 1;
            execution.stage = 0;
        }
    }

    fn finish_cycle(&mut self, env: &mut Env, recheck: bool) {
        if recheck && self.immediate < MAX_IMMEDIATE_RECHECKS {
            self.immediate += 1;
            return self.begin_cycle(env);
        }
        self.immediate = 0;
        if std::mem::take(&mut self.wake_permit) {
            return self.begin_cycle(env);
        }
        let loop_wait = self.dynamic.loop_wait.as_millis() as u64;
        let token = self.timer(env, TimerKind::Loop, loop_wait);
        self.step = Step::Sleeping(token);
    }

    fn leader_term(&self) -> Option<i64> {
        self.view
            .as_ref()
            .and_then(|view| view.leader.as_ref())
            .filter(|leader| leader.mine)
            .map(|leader| leader.term)
    }

    /// `address_of`: the member must be registered for the shell to reach it.
    fn address_of(&self, env: &Env, name: &str) -> Option<usize> {
        self.view.as_ref()?.member(name)?;
        env.member_index(name)
    }

    fn request(&mut self, env: &mut Env, request: Request) -> Progress {
        Progress::Wait(Waiting::Reply(self.send(env, request)))
    }

    fn pg_op(&mut self, env: &mut Env, kind: OpKind) -> Progress {
        match env.begin_op(self.member, kind) {
            Ok(Some(id)) => Progress::Wait(Waiting::Op(id)),
            Ok(None) => Progress::Done(Ok(())),
            Err(error) => Progress::Done(Err(error)),
        }
    }

    /// `Agent::execute` of the shell, one stage at a time: stage 0 starts the
    /// action, later stages receive what the previous stage waited for.
    fn step_action(&mut self, env: &mut Env, action: &Action, stage: u8, input: Input) -> Progress {
        use Progress::Done;
        let no_lease = || Done(Err("no lease".into()));
        let not_leader = || Done(Err("this member does not hold the leader key".into()));
        match (action, stage) {
            (Action::ClaimInitialize, 0) => {
                let Some(lease) = self.lease_id else {
                    return no_lease();
                };
                self.request(
                    env,
                    Request::CreateIfAbsent {
                        key: Key::Initialize,
                        value: Value::Text(String::new()),
                        lease: Some(lease),
                    },
                )
            }
            (Action::ClaimInitialize, 1) => match input.reply() {
                Ok(Reply::Txn(true)) => {
                    self.log(env, "won the bootstrap race");
                    let seed = Value::Config(Box::new(self.bootstrap.clone()));
                    self.request(
                        env,
                        Request::CreateIfAbsent {
                            key: Key::Config,
                            value: seed,
                            lease: None,
                        },
                    )
                }
                Ok(_) => Done(Ok(())),
                Err(error) => Done(Err(error)),
            },
            (Action::ClaimInitialize, _) => Done(input.reply().map(drop)),
            (Action::InitDb, 0) => self.pg_op(env, OpKind::InitDb),
            (Action::InitDb, _) => Done(input.op()),
            (Action::PublishSystemId(system_id), 0) => {
                // create_replication_role: a query on the local server.
                if !env.pgs[self.member].is_running() {
                    return Done(Err("PostgreSQL: connection refused".into()));
                }
                let Some(lease) = self.lease_id else {
                    return no_lease();
                };
                self.request(
                    env,
                    Request::PublishSystemId {
                        lease,
                        system_id: system_id.clone(),
                    },
                )
            }
            (Action::PublishSystemId(system_id), _) => match input.reply() {
                Ok(Reply::Txn(true)) => {
                    self.log(env, format!("cluster bootstrapped: system {system_id}"));
                    Done(Ok(()))
                }
                other => Done(other.map(drop)),
            },
            (Action::CloneFrom(leader), 0) => match self.address_of(env, leader) {
                Some(from) => self.pg_op(env, OpKind::Clone { from }),
                None => Done(Err(format!("leader {leader} has no registered address"))),
            },
            (Action::CloneFrom(_), _) => {
                let result = input.op();
                if result.is_ok() {
                    // A fresh copy of the leader: any earlier rewind verdict is moot.
                    self.last_rewind = None;
                }
                Done(result)
            }
            (Action::Start(start_as), 0) => {
                let follow = match start_as {
                    StartAs::Primary => None,
                    StartAs::Replica { follow } => follow
                        .as_deref()
                        .and_then(|name| Some((name.to_owned(), self.address_of(env, name)?))),
                };
                let standby = !matches!(start_as, StartAs::Primary);
                if !standby {
                    if let Err(error) = self.ensure_lease_allows_writes(env) {
                        return Done(Err(error));
                    }
                }
                env.configure(
                    self.member,
                    follow.as_ref().map(|(_, index)| *index),
                    standby,
                );
                self.following = follow.map(|(name, _)| name);
                if !standby && !env.pgs[self.member].has_postmaster() {
                    env.check_may_run_primary(self.member, &self.name, self.lease_id, true);
                }
                let progress = self.pg_op(env, OpKind::Start);
                // `Postgres::start(Some(&fence.primary_pid))`: a primary is
                // guarded by the watchdog from the postmaster's first moment.
                if !standby && matches!(progress, Progress::Wait(_)) {
                    self.arm_fence_now(env);
                }
                progress
            }
            (Action::Start(_), _) => Done(input.op()),
            (Action::Stop { reason }, 0) => {
                if let Some(wait) = self.planted_late_demote(env) {
                    return wait;
                }
                if let Some(target) = reason.strip_prefix("switchover to ") {
                    env.begin_handover(self.member, target);
                }
                self.stop_pg(env)
            }
            (Action::Stop { .. }, _) => match input {
                Input::Timer => self.stop_pg(env),
                other => Done(other.op()),
            },
            (Action::Promote { .. }, 0) => {
                if self.leader_term().is_none() {
                    return not_leader();
                }
                if !env.pgs[self.member].is_running() {
                    return Done(Err("cannot promote: PostgreSQL is not running".into()));
                }
                if let Err(error) = self.ensure_lease_allows_writes(env) {
                    return Done(Err(error));
                }
                // The watchdog guards the postmaster before pg_promote.
                self.arm_fence_now(env);
                env.check_may_run_primary(self.member, &self.name, self.lease_id, false);
                self.pg_op(env, OpKind::Promote)
            }
            (Action::Promote { reason }, 1) => {
                if let Err(error) = input.op() {
                    return Done(Err(error));
                }
                self.following = None;
                let entry = self.history_entry(env, reason);
                let term = self.leader_term().expect("checked at stage 0");
                self.request(env, Request::AppendHistory { term, entry })
            }
            // The CHECKPOINT after the promotion is instantaneous here.
            (Action::Promote { .. }, _) => Done(input.reply().map(drop)),
            (Action::Rewind(leader), 0) => self.start_rewind(env, leader),
            (Action::Rewind(_), _) => {
                let error = input.op().err();
                self.finish_rewind(env, error)
            }
            (Action::Follow(leader), _) => {
                let follow = match leader {
                    Some(name) => match self.address_of(env, name) {
                        Some(index) => Some((name.clone(), index)),
                        None => {
                            return Done(Err(format!(
                                "leader {name} has not registered its address yet"
                            )))
                        }
                    },
                    None => None,
                };
                env.configure(self.member, follow.as_ref().map(|(_, index)| *index), true);
                self.following = follow.map(|(name, _)| name);
                Done(env.reload(self.member))
            }
            (Action::AcquireLeader, 0) => {
                let Some(lease) = self.lease_id else {
                    return no_lease();
                };
                if let Some(view) = &self.view {
                    env.check_paused_takeover(self.member, view, self.decided_as_primary);
                }
                self.request(
                    env,
                    Request::CreateIfAbsent {
                        key: Key::Leader,
                        value: Value::Text(self.name.clone()),
                        lease: Some(lease),
                    },
                )
            }
            (Action::AcquireLeader, _) => match input.reply() {
                Ok(Reply::Txn(won)) => {
                    let outcome = if won {
                        "acquired the leader key"
                    } else {
                        "another member took the leader key first"
                    };
                    self.log(env, outcome);
                    Done(Ok(()))
                }
                other => Done(other.map(drop)),
            },
            (Action::ReleaseLeader, 0) => {
                let Some(term) = self.leader_term() else {
                    return not_leader();
                };
                let name = self.name.clone();
                self.request(env, Request::ReleaseLeader { term, name })
            }
            (Action::ReleaseLeader, _) => Done(input.reply().map(drop)),
            (Action::CreateSlot(slot), _) => Done(env.create_slot(self.member, slot)),
            (Action::DropSlot(slot), _) => Done(env.drop_slot(self.member, slot)),
            (Action::PublishLeaderStatus(status), 0) => {
                let Some(term) = self.leader_term() else {
                    return not_leader();
                };
                self.request(
                    env,
                    Request::PutAsLeader {
                        term,
                        key: Key::Status,
                        value: Value::Status(status.clone()),
                    },
                )
            }
            (Action::PublishLeaderStatus(_), _) => Done(input.reply().map(drop)),
            (Action::Checkpoint, 0) => self.pg_op(env, OpKind::Checkpoint),
            (Action::Checkpoint, _) => Done(input.op()),
            (Action::ClearSwitchover { .. }, 0) => {
                let Some(term) = self.leader_term() else {
                    return not_leader();
                };
                self.request(env, Request::ClearSwitchover { term })
            }
            (Action::ClearSwitchover { reason }, _) => match input.reply() {
                Ok(Reply::Txn(true)) => {
                    self.log(env, format!("switchover intent removed: {reason}"));
                    Done(Ok(()))
                }
                other => Done(other.map(drop)),
            },
            // Synchronous mode is not simulated yet: the simulated cluster
            // runs with it off and no `sync` key, so the core never asks.
            (Action::WriteSync(_) | Action::SetSyncNames(_) | Action::ClearSync, _) => {
                Done(Err("synchronous replication is not simulated".into()))
            }
        }
    }

    /// `Postgres::stop`: SIGINT (a fast shutdown), escalated to an immediate
    /// shutdown if the server is still up after `retry_timeout`.
    fn stop_pg(&mut self, env: &mut Env) -> Progress {
        let progress = self.pg_op(env, OpKind::Stop);
        if let Progress::Wait(Waiting::Op(op)) = progress {
            let grace = self.dynamic.retry_timeout.as_millis() as u64;
            let at = env.now + self.clock.real_duration(grace);
            env.escalate_stop_at(self.member, op, at);
        }
        progress
    }

    fn history_entry(&self, env: &Env, reason: &str) -> HistoryEntry {
        let (timeline, lsn) = env.pgs[self.member]
            .files()
            .map(|files| {
                let fork = files.wal.segments.last().map_or(0, |segment| segment.start);
                (files.wal.timeline().saturating_sub(1), fork)
            })
            .unwrap_or_default();
        HistoryEntry {
            timeline,
            lsn: Lsn(lsn),
            reason: reason.to_owned(),
            time_unix: env.now / 1000,
            new_leader: self.name.clone(),
        }
    }

    /// `Action::Rewind`: the leader must still hold the key and be registered;
    /// whatever pg_rewind then says is recorded for the core, not an error.
    fn start_rewind(&mut self, env: &mut Env, leader: &str) -> Progress {
        let term = self
            .view
            .as_ref()
            .and_then(|view| view.leader.as_ref())
            .filter(|key| key.name == leader)
            .map(|key| key.term);
        let Some(term) = term else {
            return Progress::Done(Err(format!("{leader} no longer holds the leader key")));
        };
        let Some(from) = self.address_of(env, leader) else {
            return Progress::Done(Err(format!("leader {leader} has no registered address")));
        };
        // checkpoint_at: failing to reach the leader is no verdict on the rewind.
        if !env.pgs[from].is_running() {
            return Progress::Done(Err(format!(
                "connecting to the leader at {leader}: connection refused"
            )));
        }
        self.rewind_term = term;
        match env.begin_op(self.member, OpKind::Rewind { from }) {
            Ok(Some(id)) => Progress::Wait(Waiting::Op(id)),
            Ok(None) => self.finish_rewind(env, None),
            Err(error) => self.finish_rewind(env, Some(error)),
        }
    }

    fn finish_rewind(&mut self, env: &mut Env, error: Option<String>) -> Progress {
        if let Some(error) = &error {
            self.log(env, format!("pg_rewind failed: {error}"));
        }
        self.last_rewind = Some(RewindOutcome {
            leader_term: self.rewind_term,
            error,
        });
        Progress::Done(Ok(()))
    }

    /// The planted bug `late-demote`: a primary's demotion waits until after
    /// its lease deadline.
    fn planted_late_demote(&mut self, env: &mut Env) -> Option<Progress> {
        let Some(Plant::LateDemote(by)) = self.plant else {
            return None;
        };
        if !env.pgs[self.member].accepts_writes() {
            return None;
        }
        let now = self.now(env);
        let ttl = self.dynamic.ttl.as_millis() as u64;
        let late = self.valid_until.unwrap_or(now + ttl) + by;
        (late > now).then(|| {
            let token = self.timer(env, TimerKind::Loop, late - now);
            Progress::Wait(Waiting::Timer(token))
        })
    }
}

/// `Dcs::read_cluster` as seen by `name` holding `lease` (`None` for an
/// operator): the core's view of the keys, `fallback` until `config` exists.
pub fn cluster_view(
    kvs: &[(Key, Kv)],
    lease: Option<LeaseId>,
    name: &str,
    fallback: &DynamicConfig,
) -> ClusterView {
    let mut view = ClusterView {
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
            (Key::Config, Value::Config(config)) if config.validate().is_ok() => {
                view.config = (**config).clone();
            }
            (Key::Status, Value::Status(status)) => view.last_leader = Some(status.clone()),
            (Key::Member(_), Value::Member(member)) => view.members.push((**member).clone()),
            (Key::Switchover, Value::Switchover(intent)) => {
                view.switchover = Some((**intent).clone());
            }
            _ => {}
        }
    }
    view
}

/// A short form of an action, for the trace.
pub fn short(action: &Action) -> String {
    match action {
        Action::Stop { .. } => "Stop".into(),
        Action::Promote { .. } => "Promote".into(),
        Action::Start(StartAs::Primary) => "Start(primary)".into(),
        Action::Start(StartAs::Replica { follow }) => {
            format!("Start(replica of {})", follow.as_deref().unwrap_or("none"))
        }
        Action::Follow(leader) => format!("Follow({})", leader.as_deref().unwrap_or("none")),
        Action::PublishLeaderStatus(status) => {
            format!(
                "PublishLeaderStatus(tl{} {})",
                status.timeline, status.optime
            )
        }
        other => format!("{other:?}"),
    }
}
