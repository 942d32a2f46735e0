//! One incarnation of `jai-agent` on one member: the agent's own round
//! driver ([`Driver`]) interpreted against the simulated world.
//!
//! The order of a round's steps is not modelled here: it is the driver's,
//! exactly as `jai-agent` runs it. This module only does what `shell.rs`
//! does with each effect — against the simulated etcd (a request bounded by
//! `retry_timeout`, its answer or timeout an event), the simulated
//! PostgreSQL (operations that take time and can fail), the peers' published
//! status and the member's disk — so every wait is a point where simulated
//! time passes and faults strike. Beside the loop it models what `jai-agent`
//! runs as tasks, with the agent's own lease arithmetic (`ha::lease`):
//!
//! - the keepalive task renews the lease every `lease::renew_every` (after a
//!   failed attempt, `KEEPALIVE_RETRY`; each attempt bounded by
//!   `lease::attempt_timeout`), on this member's own (drifting) clock;
//! - the fencing watchdog checks every `FENCE_CHECK_EVERY` whether the armed
//!   primary's lease is still valid beyond the demotion margin, and sends it
//!   SIGINT if not;
//! - the fence keeper, a process of its own ([`Keeper`], kept in the world:
//!   not stopped with the agent), is told every change of what the watchdog
//!   guards and of the lease, and sends SIGINT at the fencing point itself
//!   (`lease::fence_point`), unless told otherwise first.
//!
//! HAProxy is not simulated: its effects succeed at once.

use super::etcd::{Key, LeaseId, Reply, Request as EtcdRequest, StoreError};
use super::postgres::OpKind;
use super::{Env, Plant, ViolationKind};
use jai_agent::ha::driver::{
    Command, Context, Driver, Effect, LeaseState, Level, Outcome, PgOp, Setup, Step,
};
use jai_agent::ha::store::Request;
use jai_agent::ha::{lease, Action, Identity, LeaseView, MemberAddresses, Millis, StartAs};
use jai_proto::{DynamicConfig, Lsn, MemberStatus};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

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

    /// A local duration in real milliseconds, rounded down (never late).
    pub fn real_duration_floor(&self, local: Millis) -> u64 {
        let rate = (1_000_000 + self.ppm) as u128;
        (local as u128 * 1_000_000 / rate) as u64
    }
}

/// A member's fence keeper (`keeper.rs`): what its agent last told it, and
/// what it still guards. It runs on the member's clock, beside the agent
/// process: a stopped agent does not stop it; it dies with the node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Keeper {
    /// The agent's last line: the guarded postmaster (its generation) and
    /// the fencing point in real time.
    pub told: Option<(u64, u64)>,
    /// What it guards: `told` until it fenced.
    pub guard: Option<(u64, u64)>,
    /// The pending fencing event.
    pub token: u64,
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
        result: Result<Reply, StoreError>,
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

/// What the driver's current effect waits for.
#[derive(Debug, Clone, PartialEq)]
enum Waiting {
    /// Nothing: the driver is being stepped (or the agent died of a panic).
    Nothing,
    /// An etcd answer.
    Reply(u64),
    /// A PostgreSQL operation.
    Op(u64),
    /// `pg_rewind`.
    Rewind(u64),
    /// The peers' answers, at this timer.
    Peers { token: u64, asked: Vec<usize> },
    /// `loop_wait`, unless woken.
    Sleeping(u64),
    /// The planted late demotion: the stop starts at this timer.
    DelayedStop { token: u64, grace: Duration },
}

/// An effect carried out: its outcome now, or later.
enum Performed {
    Now(Outcome),
    Later(Waiting),
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
    clock: Clock,
    driver: Driver,
    /// The lease this agent holds (`LeaseTracker::id`).
    pub lease_id: Option<LeaseId>,
    /// `LeaseTracker::valid_until`, on the local clock.
    valid_until: Option<Millis>,
    /// `Postgres::following`: what this agent last configured.
    following: Option<String>,
    fence: Option<Fence>,
    waiting: Waiting,
    wake_permit: bool,
    keepalive: Keepalive,
    plant: Option<Plant>,
}

impl Agent {
    /// A fresh agent process, not started. `unrewound_marker`: what the
    /// member's disk says (the persisted former-primary marker).
    pub fn new(
        member: usize,
        incarnation: u32,
        identity: Identity,
        clock: Clock,
        bootstrap: DynamicConfig,
        unrewound_marker: bool,
        plant: Option<Plant>,
    ) -> Self {
        let name = identity.name.clone();
        let setup = Setup {
            identity,
            addresses: MemberAddresses {
                api_url: String::new(),
                pg_address: pg_address(&name),
                grpc_url: None,
                pg_paths: None,
            },
            version: "sim".into(),
            handover_stop_grace: Duration::from_secs(60),
            bootstrap,
        };
        let mut driver = Driver::new(setup, unrewound_marker);
        if let Some(Plant::Ordering(bug)) = plant {
            driver.plant(bug);
        }
        Self {
            member,
            incarnation,
            name,
            clock,
            driver,
            lease_id: None,
            valid_until: None,
            following: None,
            fence: None,
            waiting: Waiting::Nothing,
            wake_permit: false,
            keepalive: Keepalive::Sleeping(0),
            plant,
        }
    }

    /// What the API reports before the first round (the agent's own).
    pub fn initial_status(&self) -> MemberStatus {
        Driver::starting_report(self.driver.setup()).member
    }

    /// `run`: spawns the keepalive task (the watch is the world's) and enters the loop.
    pub fn start(&mut self, env: &mut Env) {
        self.schedule_keepalive(env);
        self.advance(env, Outcome::Start);
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
            AgentEvent::Reply { id, result } => match self.keepalive {
                Keepalive::InFlight {
                    id: keepalive,
                    lease,
                    sent,
                } if keepalive == id => self.on_keepalive_reply(env, lease, sent, result),
                // A timed-out request's late answer goes nowhere, like a dropped future.
                _ if self.waiting == Waiting::Reply(id) => {
                    self.advance(env, Outcome::Store(result))
                }
                _ => {}
            },
            AgentEvent::PgDone { id, result } => {
                if self.waiting == Waiting::Op(id) {
                    self.advance(env, Outcome::Done(result));
                } else if self.waiting == Waiting::Rewind(id) {
                    let result = result.map(|()| "pg_rewind: Done!".to_owned());
                    self.advance(env, Outcome::Rewound(result));
                }
            }
        }
    }

    // ---- the loop: the driver's steps --------------------------------------

    /// Steps the driver until its effect has to wait for the world.
    fn advance(&mut self, env: &mut Env, mut outcome: Outcome) {
        self.waiting = Waiting::Nothing;
        loop {
            let context = self.context(env);
            let driver = &mut self.driver;
            let step: Step = match catch_unwind(AssertUnwindSafe(|| driver.step(&context, outcome)))
            {
                Ok(step) => step,
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_else(|| "non-text panic".into());
                    env.violate(
                        ViolationKind::CoreAssertion,
                        format!("{}: the round driver panicked: {message}", self.name),
                    );
                    return;
                }
            };
            for command in step.commands {
                self.apply(env, command);
            }
            match self.perform(env, step.effect) {
                Performed::Now(next) => outcome = next,
                Performed::Later(waiting) => {
                    self.waiting = waiting;
                    return;
                }
            }
        }
    }

    /// What the driver needs at each step. The planted `no-margin` bug tells
    /// it the lease lasts `demote_margin` longer than it does.
    fn context(&self, env: &Env) -> Context {
        let mut valid_until = self.valid_until;
        if self.plant == Some(Plant::NoMargin) {
            let margin = self.driver.config().demote_margin().as_millis() as u64;
            valid_until = valid_until.map(|until| until + margin);
        }
        Context {
            now: self.now(env),
            wall_clock_unix: env.wall_clock_unix(Some(self.member)),
            lease: LeaseState {
                id: self.lease_id,
                valid_until,
            },
        }
    }

    fn apply(&mut self, env: &mut Env, command: Command) {
        match command {
            Command::Log(line) if line.level > Level::Debug => self.log(env, line.text),
            Command::Log(_) => {}
            Command::AdoptLease { id, valid_until } => {
                self.lease_id = Some(id);
                self.valid_until = Some(valid_until);
                self.reschedule_fence(env);
            }
            Command::ForgetLease(id) => {
                if self.lease_id == Some(id) {
                    self.forget_lease(env);
                }
            }
            // The request bound and the renewal period are read from the
            // driver's config where they are used.
            Command::ApplyConfig { .. } => {}
            Command::ArmFence { primary } => self.arm_fence(env, primary),
            Command::Publish(report) => env.publish_snapshot(self.member, report.member),
            Command::Decided {
                decision,
                lease_left_ms,
                etcd_reachable,
            } => {
                let actions: Vec<String> = decision.actions.iter().map(short).collect();
                let lease = match lease_left_ms {
                    Some(left) => format!("lease {left:+}ms"),
                    None => "no lease".into(),
                };
                let unreachable = if etcd_reachable {
                    ""
                } else {
                    ", etcd unreachable"
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
            Command::ReconcileHaproxy => {}
        }
    }

    fn perform(&mut self, env: &mut Env, effect: Effect) -> Performed {
        match effect {
            Effect::ObservePostgres => {
                let standbys = env.standby_links(self.member);
                let (process, data_dir) =
                    env.pgs[self.member].observe(self.following.clone(), standbys);
                Performed::Now(Outcome::Postgres { process, data_dir })
            }
            Effect::Store(request) => {
                if matches!(
                    request,
                    Request::CreateIfAbsent {
                        key: Key::Leader,
                        ..
                    }
                ) {
                    if let Some(view) = self.driver.view() {
                        let view = view.clone();
                        env.check_paused_takeover(
                            self.member,
                            &view,
                            self.driver.decided_as_primary(),
                        );
                    }
                }
                Performed::Later(Waiting::Reply(self.send(env, EtcdRequest::Agent(request))))
            }
            Effect::AskPeers(peers) => {
                let asked: Vec<usize> = peers
                    .iter()
                    .filter_map(|peer| env.member_index(&peer.name))
                    .collect();
                let delay = env.peer_query_delay(&asked);
                let token = self.timer(env, TimerKind::Loop, delay);
                Performed::Later(Waiting::Peers { token, asked })
            }
            Effect::PersistMarker(wanted) => {
                env.unrewound_markers[self.member] = wanted;
                Performed::Now(Outcome::Done(Ok(())))
            }
            Effect::Postgres(op) => self.perform_postgres(env, op),
            Effect::Haproxy(_) => Performed::Now(Outcome::Done(Ok(()))),
            Effect::Wait(duration) => {
                if std::mem::take(&mut self.wake_permit) {
                    return Performed::Now(Outcome::Woken);
                }
                let token = self.timer(env, TimerKind::Loop, duration.as_millis() as u64);
                Performed::Later(Waiting::Sleeping(token))
            }
        }
    }

    fn perform_postgres(&mut self, env: &mut Env, op: PgOp) -> Performed {
        let member = self.member;
        let now = |result: Result<(), String>| Performed::Now(Outcome::Done(result));
        match op {
            PgOp::InitDb => self.pg_op(env, OpKind::InitDb),
            PgOp::CreateReplicationRole => {
                // A query on the local server.
                if env.pgs[member].is_running() {
                    now(Ok(()))
                } else {
                    now(Err("PostgreSQL: connection refused".into()))
                }
            }
            PgOp::Clone { from } => match self.member_at(env, &from) {
                Some(from) => self.pg_op(env, OpKind::Clone { from }),
                None => now(Err(format!("pg_basebackup: unknown host {from}"))),
            },
            PgOp::Configure {
                follow, standby, ..
            } => {
                let upstream = follow
                    .as_ref()
                    .and_then(|upstream| self.member_at(env, &upstream.address));
                env.configure(member, upstream, standby);
                self.following = follow.map(|upstream| upstream.name);
                now(Ok(()))
            }
            PgOp::Reload => now(env.reload(member)),
            // The simulated cluster runs with synchronous mode off and no
            // `sync` key, so the driver never waits for standby names.
            PgOp::ConfirmSyncNames(_) => {
                now(Err("synchronous replication is not simulated".into()))
            }
            // The simulated operator never asks for a restore (no backup
            // repository in the model): the restore is tested by the core's
            // unit tests and the lab's integration test.
            PgOp::RestoreToTime { .. } => now(Err("the backup repository is not simulated".into())),
            PgOp::Start { primary } => {
                if primary && !env.pgs[member].has_postmaster() {
                    env.check_may_run_primary(member, &self.name, self.lease_id, true);
                }
                let performed = self.pg_op(env, OpKind::Start);
                // `Postgres::start(Some(&fence.primary_pid))`: a primary is
                // guarded by the watchdog from the postmaster's first moment.
                if primary && matches!(performed, Performed::Later(_)) {
                    self.arm_fence(env, true);
                }
                performed
            }
            PgOp::Stop { grace, handover_to } => {
                if let Some(wait) = self.planted_late_demote(env, grace) {
                    return wait;
                }
                if let Some(target) = &handover_to {
                    env.begin_handover(member, target);
                }
                self.stop_pg(env, grace)
            }
            PgOp::Promote => {
                env.check_may_run_primary(member, &self.name, self.lease_id, false);
                let performed = self.pg_op(env, OpKind::Promote);
                if !matches!(performed, Performed::Now(Outcome::Done(Err(_)))) {
                    self.following = None;
                }
                performed
            }
            PgOp::CheckpointAt { address } => match self.member_at(env, &address) {
                Some(from) if env.pgs[from].is_running() => now(Ok(())),
                _ => now(Err(format!(
                    "connecting to the leader at {address}: connection refused"
                ))),
            },
            PgOp::Rewind { address } => {
                let Some(from) = self.member_at(env, &address) else {
                    return Performed::Now(Outcome::Rewound(Err(format!(
                        "unknown host {address}"
                    ))));
                };
                match env.begin_op(member, OpKind::Rewind { from }) {
                    Ok(Some(id)) => Performed::Later(Waiting::Rewind(id)),
                    Ok(None) => Performed::Now(Outcome::Rewound(Ok("no rewind required".into()))),
                    Err(error) => Performed::Now(Outcome::Rewound(Err(error))),
                }
            }
            PgOp::CreateSlot(slot) => now(env.create_slot(member, &slot)),
            PgOp::DropSlot(slot) => now(env.drop_slot(member, &slot)),
            PgOp::Checkpoint => self.pg_op(env, OpKind::Checkpoint),
            PgOp::FinalPosition => {
                let pg = &env.pgs[member];
                let position = match pg.files() {
                    Some(files) if !pg.has_postmaster() => {
                        Ok((files.wal.timeline(), Lsn(files.wal.lsn)))
                    }
                    Some(_) => Err("pg_controldata: the server is still running".into()),
                    None => Err("pg_controldata: no data directory".into()),
                };
                Performed::Now(Outcome::FinalPosition(position))
            }
            // The CHECKPOINT after a promotion is instantaneous here.
            PgOp::CheckpointInBackground => now(Ok(())),
        }
    }

    fn pg_op(&mut self, env: &mut Env, kind: OpKind) -> Performed {
        match env.begin_op(self.member, kind) {
            Ok(Some(id)) => Performed::Later(Waiting::Op(id)),
            Ok(None) => Performed::Now(Outcome::Done(Ok(()))),
            Err(error) => Performed::Now(Outcome::Done(Err(error))),
        }
    }

    /// `Postgres::stop`: SIGINT (a fast shutdown), escalated to an immediate
    /// shutdown if the server is still up after `grace`.
    fn stop_pg(&mut self, env: &mut Env, grace: Duration) -> Performed {
        let performed = self.pg_op(env, OpKind::Stop);
        if let Performed::Later(Waiting::Op(op)) = performed {
            let at = env.now + self.clock.real_duration(grace.as_millis() as u64);
            env.escalate_stop_at(self.member, op, at);
        }
        performed
    }

    /// The member whose PostgreSQL listens at `address` (`<name>:5432`).
    fn member_at(&self, env: &Env, address: &str) -> Option<usize> {
        env.member_index(address.strip_suffix(":5432")?)
    }

    fn on_wake(&mut self, env: &mut Env) {
        if matches!(self.waiting, Waiting::Sleeping(_)) {
            self.advance(env, Outcome::Woken);
        } else {
            self.wake_permit = true;
        }
    }

    fn on_loop_timer(&mut self, env: &mut Env, token: u64) {
        match self.waiting.clone() {
            Waiting::Sleeping(sleeping) if sleeping == token => self.advance(env, Outcome::Woken),
            Waiting::Peers {
                token: asked_at,
                asked,
            } if asked_at == token => {
                let fresh = asked
                    .into_iter()
                    .filter_map(|member| env.peer_status(member))
                    .collect();
                self.advance(env, Outcome::Peers(fresh));
            }
            Waiting::DelayedStop {
                token: delayed,
                grace,
            } if delayed == token => match self.stop_pg(env, grace) {
                Performed::Now(outcome) => self.advance(env, outcome),
                Performed::Later(waiting) => self.waiting = waiting,
            },
            _ => {}
        }
    }

    // ---- helpers ------------------------------------------------------------

    fn now(&self, env: &Env) -> Millis {
        self.clock.local(env.now)
    }

    fn send(&mut self, env: &mut Env, request: EtcdRequest) -> u64 {
        let timeout = self
            .clock
            .real_duration(self.driver.config().retry_timeout.as_millis() as u64);
        env.send(self.member, self.incarnation, request, timeout)
    }

    fn timer(&mut self, env: &mut Env, kind: TimerKind, after_local: Millis) -> u64 {
        let at = env.now + self.clock.real_duration(after_local);
        env.timer(self.member, self.incarnation, at, kind)
    }

    fn log(&self, env: &mut Env, text: impl AsRef<str>) {
        env.log(format!("{}: {}", self.name, text.as_ref()));
    }

    // ---- the lease (dcs.rs `LeaseTracker`, `run_keepalive`) -----------------

    fn forget_lease(&mut self, env: &mut Env) {
        self.lease_id = None;
        self.valid_until = None;
        self.reschedule_fence(env);
    }

    fn schedule_keepalive(&mut self, env: &mut Env) {
        let every = lease::renew_every(self.driver.config()).as_millis() as u64;
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
        let attempt = lease::attempt_timeout(self.driver.config()).as_millis() as u64;
        let timeout = self.clock.real_duration(attempt);
        let id = env.send(
            self.member,
            self.incarnation,
            EtcdRequest::Agent(Request::KeepAliveOnce(lease)),
            timeout,
        );
        self.keepalive = Keepalive::InFlight { id, lease, sent };
    }

    fn on_keepalive_reply(
        &mut self,
        env: &mut Env,
        lease: LeaseId,
        sent: Millis,
        result: Result<Reply, StoreError>,
    ) {
        match result {
            Ok(Reply::KeepAlive { ttl_secs }) if ttl_secs > 0 => {
                if self.lease_id == Some(lease) {
                    // Never backwards: answers may arrive out of order.
                    let until = lease::confirmed_until(sent, ttl_secs);
                    self.valid_until = self.valid_until.max(Some(until));
                    self.reschedule_fence(env);
                }
            }
            Ok(Reply::KeepAlive { .. }) | Err(StoreError::LeaseGone(_)) => {
                self.log(env, "etcd says our lease is gone: re-registering");
                if self.lease_id == Some(lease) {
                    self.forget_lease(env);
                }
                self.on_wake(env);
            }
            Ok(other) => panic!("simulator bug: keepalive answered {other:?}"),
            Err(_) => {
                let retry = lease::KEEPALIVE_RETRY.as_millis() as u64;
                return self.schedule_keepalive_in(env, retry);
            }
        }
        self.schedule_keepalive(env);
    }

    // ---- the fencing watchdog and keeper (fence.rs, keeper.rs) --------------

    /// `fence.primary_pid.store(..)`: the watchdog guards the current
    /// postmaster iff it is (about to be) a primary.
    fn arm_fence(&mut self, env: &mut Env, primary: bool) {
        let pg = &env.pgs[self.member];
        self.fence = (primary && pg.has_postmaster()).then(|| Fence {
            generation: pg.generation,
            margin_ms: self.driver.config().demote_margin().as_millis() as u64,
            token: 0,
        });
        self.reschedule_fence(env);
    }

    /// Schedules the first watchdog tick at which the lease is no longer
    /// valid beyond the margin (`lease::fence_tick`), and tells the keeper.
    fn reschedule_fence(&mut self, env: &mut Env) {
        self.sync_keeper(env);
        let Some(mut fence) = self.fence else {
            return;
        };
        let now = self.now(env);
        let tick = lease::fence_tick(
            self.fence_deadline(),
            Duration::from_millis(fence.margin_ms),
            now,
        );
        fence.token = self.timer(env, TimerKind::Fence, tick - now);
        self.fence = Some(fence);
    }

    /// The deadline the watchdog compares with. The planted bugs move it:
    /// `no-margin` by the margin (it fences at the deadline itself),
    /// `late-demote` past the deadline.
    fn fence_deadline(&self) -> Option<Millis> {
        let margin = self.fence.map_or(0, |fence| fence.margin_ms);
        match (self.valid_until, self.plant) {
            (Some(until), Some(Plant::LateDemote(late))) => Some(until + late + margin),
            (Some(until), Some(Plant::NoMargin)) => Some(until + margin),
            (until, _) => until,
        }
    }

    fn on_fence_tick(&mut self, env: &mut Env, token: u64) {
        let Some(fence) = self.fence.filter(|fence| fence.token == token) else {
            return;
        };
        let lease = LeaseView {
            valid_until: self.fence_deadline(),
        };
        if lease.is_valid_beyond(self.now(env), Duration::from_millis(fence.margin_ms)) {
            return self.reschedule_fence(env);
        }
        self.log(
            env,
            "fencing: leader lease not confirmed by etcd; stopping PostgreSQL before the lease can expire",
        );
        env.signal_stop(self.member, fence.generation);
        self.fence = None;
        self.sync_keeper(env);
        self.on_wake(env);
    }

    /// `FenceTarget::sync_keeper`: the keeper learns what the watchdog
    /// guards and its fencing point (with the planted bugs' deadline, as the
    /// watchdog's), at once.
    fn sync_keeper(&mut self, env: &mut Env) {
        let guard = self.fence.map(|fence| {
            let point = lease::fence_point(
                self.fence_deadline(),
                Duration::from_millis(fence.margin_ms),
            );
            let now = self.now(env);
            let at = env.now + self.clock.real_duration_floor(point.saturating_sub(now));
            (fence.generation, at)
        });
        env.tell_keeper(self.member, guard);
    }

    /// The planted bug `late-demote`: a writable primary's stop waits until
    /// after its lease deadline.
    fn planted_late_demote(&mut self, env: &mut Env, grace: Duration) -> Option<Performed> {
        let Some(Plant::LateDemote(by)) = self.plant else {
            return None;
        };
        if !env.pgs[self.member].accepts_writes() {
            return None;
        }
        let now = self.now(env);
        let ttl = self.driver.config().ttl.as_millis() as u64;
        let late = self.valid_until.unwrap_or(now + ttl) + by;
        (late > now).then(|| {
            let token = self.timer(env, TimerKind::Loop, late - now);
            Performed::Later(Waiting::DelayedStop { token, grace })
        })
    }
}

/// Where a simulated member's PostgreSQL listens.
fn pg_address(name: &str) -> String {
    format!("{name}:5432")
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
