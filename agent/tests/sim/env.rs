//! The world's plumbing: the event queue, the network between members and
//! etcd, and the glue that turns etcd changes into watch wake-ups.

use super::agent::{AgentEvent, Keeper, TimerKind};
use super::etcd::{self, Change, Etcd, Key, Request, StoreError};
use super::faults::{Fault, LinkMode, MAX_BASE_LATENCY_MS};
use super::postgres::PgSim;
use super::rng::Rng;
use super::trace::Trace;
use super::{RunStats, SimConfig, Violation, ViolationKind};
use jai_agent::ha::store::Request as AgentRequest;
use jai_proto::MemberStatus;
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};

/// Real time 0 on the wall clocks (ms since the Unix epoch).
const WALL_CLOCK_EPOCH_MS: i64 = 1_800_000_000_000;

/// Everything that happens, at its real simulated time.
#[derive(Debug)]
pub(super) enum Event {
    /// Local to the agent process (timers, PostgreSQL operations).
    Agent {
        member: usize,
        incarnation: u32,
        event: AgentEvent,
    },
    /// From etcd to the agent: crosses the member's link.
    Net {
        member: usize,
        incarnation: u32,
        event: AgentEvent,
    },
    /// A request reaching etcd.
    EtcdArrive {
        member: usize,
        incarnation: u32,
        id: u64,
        request: Request,
    },
    EtcdSweep,
    EtcdRecovered,
    WalTick,
    PgComplete {
        member: usize,
        op: u64,
    },
    /// A postmaster signalled to stop (by the fencing watchdog) exits.
    PgExit {
        member: usize,
        generation: u64,
    },
    /// `Postgres::stop`'s grace for a fast shutdown ran out.
    PgEscalate {
        member: usize,
        op: u64,
    },
    /// An operator's call to the control API (or its write to etcd).
    Operator(Box<super::operator::Call>),
    Fault(Fault),
    Restart {
        member: usize,
    },
    /// The member's fence keeper reaches the fencing point it was told.
    KeeperFence {
        member: usize,
        token: u64,
    },
    Resume {
        member: usize,
    },
}

#[derive(Debug)]
pub(super) struct Scheduled {
    pub(super) at: u64,
    pub(super) seq: u64,
    pub(super) event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// The network between one member and etcd. Faults set a state with an end
/// time; nothing needs to heal them explicitly.
#[derive(Debug, Default, Clone)]
pub(super) struct Link {
    pub(super) cut: Option<(u64, LinkMode)>,
    pub(super) slow: Option<(u64, u64)>,
    pub(super) flaky: Option<(u64, u64)>,
}

impl Link {
    /// How the link is cut at `now`, if it is.
    pub(super) fn cut(&self, now: u64) -> Option<LinkMode> {
        self.cut
            .filter(|(until, _)| *until > now)
            .map(|(_, mode)| mode)
    }

    /// Whether one message crossing now gets through.
    pub(super) fn passes(&self, now: u64, rng: &mut Rng) -> bool {
        if self.cut(now).is_some() {
            return false;
        }
        match self.flaky {
            Some((until, loss)) if until > now => !rng.chance(loss),
            _ => true,
        }
    }

    /// One-way latency of a message sent now.
    pub(super) fn latency(&self, now: u64, rng: &mut Rng) -> u64 {
        let mut latency = rng.range(1, 4);
        if rng.chance(10) {
            latency += rng.range(20, MAX_BASE_LATENCY_MS - 4);
        }
        if let Some((until, max_extra)) = self.slow {
            if until > now {
                latency += rng.range(0, max_extra);
            }
        }
        latency
    }
}

/// The world the agents act on: everything but the agents themselves, so an
/// agent can hold `&mut Env` while it runs.
pub struct Env {
    /// Real simulated time, ms.
    pub now: u64,
    /// The PostgreSQL of each member.
    pub pgs: Vec<PgSim>,
    pub(super) names: Vec<String>,
    pub(super) queue: BinaryHeap<Reverse<Scheduled>>,
    pub(super) seq: u64,
    pub(super) next_id: u64,
    pub(super) next_branch: u32,
    pub(super) next_system: u64,
    pub(super) rng: Rng,
    pub(super) etcd: Etcd,
    pub(super) links: Vec<Link>,
    pub(super) incarnations: Vec<u32>,
    /// The marker each agent keeps in its state directory: its data is a
    /// former primary not rewound yet (`Core::unrewound_former_primary`).
    /// On the member's disk: it survives crashes and restarts.
    pub(super) unrewound_markers: Vec<bool>,
    /// What each agent's API would answer on `/status` (None: agent down).
    pub(super) snapshots: Vec<Option<MemberStatus>>,
    /// The agent is stopped (SIGSTOP): its API does not answer either.
    pub(super) paused: Vec<bool>,
    /// Each member's fence keeper: not stopped with its agent.
    pub(super) keepers: Vec<Keeper>,
    pub(super) trace: Trace,
    pub(super) violation: Option<Violation>,
    pub(super) strict_divergence: bool,
    pub(super) strict_switchover: bool,
    /// `FaultProfile::targeted_cut`.
    pub(super) targeted_cut: bool,
    /// `FaultProfile::handover_crash`.
    pub(super) handover_crash: bool,
    /// When the last fault so far ends (scheduled ones, and the cuts of the
    /// `targeted-cut` nemesis): the liveness bound counts from here.
    pub(super) faults_end: u64,
    pub(super) diverged_seen: BTreeSet<(usize, usize, u32, u32)>,
    pub(super) stats: RunStats,
    /// Each member's wall clock, ms ahead of (or behind) real simulated time.
    pub(super) wall_offset_ms: Vec<i64>,
    /// The switchover under way (invariant: no acknowledged write lost).
    pub(super) handover: Option<super::invariants::Handover>,
    /// Create revisions of the intents a leader handed over for.
    pub(super) intents_fired: BTreeSet<i64>,
    /// When the last fault (not an operator's call) struck.
    pub(super) last_fault_at: u64,
    /// When the operator last wrote an intent.
    pub(super) intent_written_at: u64,
}

impl Env {
    /// The world of `names`, before anything happened.
    pub(super) fn new(names: Vec<String>, etcd_ppm: i64, rng: Rng, config: &SimConfig) -> Self {
        let members = names.len();
        Self {
            now: 0,
            pgs: vec![PgSim::new(); members],
            names,
            queue: BinaryHeap::new(),
            seq: 0,
            next_id: 0,
            next_branch: 0,
            next_system: 7_000,
            rng,
            etcd: Etcd::new(etcd_ppm),
            links: vec![Link::default(); members],
            incarnations: vec![0; members],
            unrewound_markers: vec![false; members],
            snapshots: vec![None; members],
            paused: vec![false; members],
            keepers: vec![Keeper::default(); members],
            trace: Trace::new(config.trace_lines, config.echo),
            violation: None,
            strict_divergence: config.strict_divergence,
            strict_switchover: config.strict_switchover,
            targeted_cut: config.faults.targeted_cut,
            handover_crash: config.faults.handover_crash,
            faults_end: 0,
            diverged_seen: BTreeSet::new(),
            stats: RunStats::default(),
            wall_offset_ms: vec![0; members],
            handover: None,
            intents_fired: BTreeSet::new(),
            last_fault_at: 0,
            intent_written_at: 0,
        }
    }

    /// The wall clock of `member` (`None`: the operator's, etcd's), in
    /// seconds since the Unix epoch.
    pub fn wall_clock_unix(&self, member: Option<usize>) -> u64 {
        let offset = member.map_or(0, |member| self.wall_offset_ms[member]);
        (WALL_CLOCK_EPOCH_MS + self.now as i64 + offset) as u64 / 1000
    }

    /// Queues `event` at real time `at` (ties keep their queueing order).
    pub(super) fn schedule(&mut self, at: u64, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            event,
        }));
    }

    /// A fresh id for a request, an operation or a timer.
    pub(super) fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Adds a line to the trace.
    pub fn log(&mut self, text: String) {
        self.trace.log(self.now, text);
    }

    /// Records a broken invariant; the history stops after the current event.
    pub fn violate(&mut self, kind: ViolationKind, message: String) {
        self.log(format!("VIOLATION {kind:?}: {message}"));
        if self.violation.is_none() {
            self.violation = Some(Violation {
                kind,
                message,
                at_ms: self.now,
            });
        }
    }

    /// The index of the member called `name`.
    pub fn member_index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|known| known == name)
    }

    /// Sends `request` from `member` to etcd. The answer (or the error) comes
    /// back as [`AgentEvent::Reply`]; after `timeout` ms a timeout error does.
    pub fn send(&mut self, member: usize, incarnation: u32, request: Request, timeout: u64) -> u64 {
        let id = self.id();
        let timed_out = AgentEvent::Reply {
            id,
            result: Err(StoreError::Unavailable(format!(
                "no answer within {timeout}ms"
            ))),
        };
        self.schedule(
            self.now + timeout,
            Event::Agent {
                member,
                incarnation,
                event: timed_out,
            },
        );
        match self.links[member].cut(self.now) {
            Some(LinkMode::Reject) => {
                let refused = AgentEvent::Reply {
                    id,
                    result: Err(StoreError::Unavailable("connection refused".into())),
                };
                self.schedule(
                    self.now + 1,
                    Event::Agent {
                        member,
                        incarnation,
                        event: refused,
                    },
                );
            }
            Some(LinkMode::Blackhole) => {}
            None => {
                let latency = self.links[member].latency(self.now, &mut self.rng);
                self.schedule(
                    self.now + latency,
                    Event::EtcdArrive {
                        member,
                        incarnation,
                        id,
                        request,
                    },
                );
            }
        }
        id
    }

    /// A timer for the agent, firing at real time `at`.
    pub fn timer(&mut self, member: usize, incarnation: u32, at: u64, kind: TimerKind) -> u64 {
        let token = self.id();
        let event = AgentEvent::Timer(kind, token);
        self.schedule(
            at,
            Event::Agent {
                member,
                incarnation,
                event,
            },
        );
        token
    }

    /// Delivers a local event to the member's current agent, at once (after
    /// the current event, in order).
    pub(super) fn notify_agent(&mut self, member: usize, event: AgentEvent) {
        let incarnation = self.incarnations[member];
        self.schedule(
            self.now,
            Event::Agent {
                member,
                incarnation,
                event,
            },
        );
    }

    /// The agent's line to its fence keeper (`KeeperLink::send`): guard the
    /// postmaster of this generation until this real time, or nothing.
    /// Unchanged news is not sent again.
    pub fn tell_keeper(&mut self, member: usize, guard: Option<(u64, u64)>) {
        let keeper = &mut self.keepers[member];
        if keeper.told == guard {
            return;
        }
        keeper.told = guard;
        keeper.guard = guard;
        if let Some((_, at)) = guard {
            let token = self.id();
            self.keepers[member].token = token;
            let at = at.max(self.now);
            self.schedule(at, Event::KeeperFence { member, token });
        }
    }

    /// The keeper's fencing point passed without newer news: SIGINT.
    pub(super) fn keeper_fence(&mut self, member: usize, token: u64) {
        let keeper = self.keepers[member];
        let Some((generation, _)) = keeper.guard.filter(|_| keeper.token == token) else {
            return;
        };
        self.keepers[member].guard = None;
        let pg = &self.pgs[member];
        if pg.generation != generation || !pg.has_postmaster() || pg.shutting_down {
            return;
        }
        let agent = if self.paused[member] {
            "its agent is stopped"
        } else {
            "its agent did not confirm the lease in time"
        };
        self.log(format!(
            "{}: fence keeper: {agent}: SIGINT to PostgreSQL",
            self.names[member]
        ));
        self.signal_stop(member, generation);
    }

    /// Records what the agent's API answers now.
    pub fn publish_snapshot(&mut self, member: usize, status: MemberStatus) {
        self.snapshots[member] = Some(status);
    }

    /// A peer's `/status`, if its agent runs and answers.
    pub fn peer_status(&self, member: usize) -> Option<MemberStatus> {
        self.snapshots[member]
            .clone()
            .filter(|_| !self.paused[member])
    }

    /// How long asking `peers` takes: a stopped agent makes the query wait for
    /// the full timeout; a dead one refuses at once.
    pub fn peer_query_delay(&mut self, peers: &[usize]) -> u64 {
        if peers.iter().any(|peer| self.paused[*peer]) {
            jai_agent::ha::driver::PEER_TIMEOUT.as_millis() as u64
        } else {
            self.rng.range(1, 8)
        }
    }

    /// Wakes the watchers of the cluster prefix: `run_watch` ignores the
    /// leader's `status` key and a member refreshing its own status, and
    /// wakes on anything else.
    pub(super) fn publish(&mut self, changes: Vec<Change>) {
        let relevant = changes.iter().any(|change| match change.key {
            Key::Status => false,
            Key::Member(_) => change.deleted || change.created,
            _ => true,
        });
        for change in &changes {
            if change.key == Key::Leader && change.created {
                self.maybe_cut_new_leader();
            }
            if change.key == Key::Leader {
                let text = match (change.deleted, self.etcd.get(&Key::Leader)) {
                    (false, Some(kv)) => format!(
                        "etcd: leader key = {:?} (term {}, lease {:x?})",
                        kv.value, kv.create_revision, kv.lease
                    ),
                    _ => "etcd: leader key deleted".into(),
                };
                self.log(text);
            }
        }
        if !relevant {
            return;
        }
        for member in 0..self.names.len() {
            if self.links[member].passes(self.now, &mut self.rng) {
                let latency = self.links[member].latency(self.now, &mut self.rng);
                let incarnation = self.incarnations[member];
                self.schedule(
                    self.now + latency,
                    Event::Net {
                        member,
                        incarnation,
                        event: AgentEvent::Wake,
                    },
                );
            }
        }
    }

    /// The `targeted-cut` nemesis: the new key holder loses etcd (black hole)
    /// within 200 ms, half the time. Like the scheduled faults it strikes
    /// only until `FAULTS_UNTIL_MS`, and the liveness bound counts from the
    /// end of its last cut.
    fn maybe_cut_new_leader(&mut self) {
        if !self.targeted_cut || self.now >= super::FAULTS_UNTIL_MS {
            return;
        }
        let holder = match self.etcd.get(&Key::Leader).map(|kv| &kv.value) {
            Some(etcd::Value::Text(name)) => self.member_index(name),
            _ => None,
        };
        let Some(member) = holder.filter(|_| self.rng.chance(500)) else {
            return;
        };
        let fault = Fault::Partition {
            member,
            ms: self.rng.range(1_000, 8_000),
            mode: LinkMode::Blackhole,
        };
        let at = self.now + self.rng.range(0, 200);
        self.faults_end = self.faults_end.max(at + fault.duration());
        self.schedule(at, Event::Fault(fault));
    }

    /// The `handover-crash` nemesis: the target of a switchover whose stop
    /// just began loses its PostgreSQL within 100 ms, half the time.
    pub(super) fn maybe_crash_handover_target(&mut self, target: Option<usize>) {
        if !self.handover_crash || self.now >= super::FAULTS_UNTIL_MS {
            return;
        }
        let Some(member) = target.filter(|_| self.rng.chance(500)) else {
            return;
        };
        let at = self.now + self.rng.range(0, 100);
        self.faults_end = self.faults_end.max(at);
        self.schedule(at, Event::Fault(Fault::PgCrash { member }));
    }

    /// A request reaches etcd: applied (or held while etcd elects a leader),
    /// then answered over the same link.
    pub(super) fn etcd_arrive(
        &mut self,
        member: usize,
        incarnation: u32,
        id: u64,
        request: Request,
    ) {
        if !self.links[member].passes(self.now, &mut self.rng) {
            return;
        }
        if !self.etcd.available(self.now) {
            let at = self.etcd.unavailable_until + self.rng.range(1, 20);
            let event = Event::EtcdArrive {
                member,
                incarnation,
                id,
                request,
            };
            return self.schedule(at, event);
        }
        let acquires = matches!(
            &request,
            Request::Agent(AgentRequest::CreateIfAbsent {
                key: Key::Leader,
                ..
            })
        );
        let releases = matches!(&request, Request::Agent(AgentRequest::ReleaseLeader { .. }));
        let (result, changes) = self.etcd.apply(self.now, request);
        if matches!(result, Ok(etcd::Reply::Txn(true))) {
            if acquires {
                self.on_leader_acquired(member);
            }
            if releases {
                self.on_leader_released(member);
            }
        }
        self.publish(changes);
        let latency = self.links[member].latency(self.now, &mut self.rng);
        self.schedule(
            self.now + latency,
            Event::Net {
                member,
                incarnation,
                event: AgentEvent::Reply { id, result },
            },
        );
    }

    /// etcd's lessor revokes expired leases (every 500 ms).
    pub(super) fn etcd_sweep(&mut self) {
        let mut changes = Vec::new();
        let revoked = self.etcd.sweep(self.now, &mut changes);
        for lease in revoked {
            self.log(format!("etcd: lease {lease:x} expired"));
        }
        self.publish(changes);
        self.schedule(self.now + etcd::SWEEP_EVERY_MS, Event::EtcdSweep);
    }
}
