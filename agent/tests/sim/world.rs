//! The world: the agents of a history, the faults that strike them, and the
//! dispatch of every event to the part of the world it concerns.

use super::agent::{Agent, AgentEvent, Clock};
use super::env::{Env, Event};
use super::faults::Fault;
use super::invariants::StopKind;
use super::operator::Call;
use super::postgres::Process;
use super::{Plant, Violation, WAL_TICK_MS};
use jai_agent::ha::Identity;
use jai_proto::{DynamicConfig, Tags};
use std::cmp::Reverse;

/// One history: the world plus the agents.
pub(super) struct World {
    pub(super) env: Env,
    pub(super) agents: Vec<Option<Agent>>,
    /// Events held while an agent is stopped (SIGSTOP).
    pub(super) paused: Vec<Option<Vec<AgentEvent>>>,
    pub(super) clock_ppm: Vec<i64>,
    pub(super) tags: Vec<Tags>,
    pub(super) reclone: Vec<bool>,
    pub(super) bootstrap: DynamicConfig,
    pub(super) plant: Option<Plant>,
}

impl World {
    /// Hands `event` to the member's agent, unless it belongs to a dead
    /// incarnation; a stopped agent gets it when it continues.
    pub(super) fn deliver(&mut self, member: usize, incarnation: u32, event: AgentEvent) {
        if self.env.incarnations[member] != incarnation || self.agents[member].is_none() {
            return;
        }
        if let Some(held) = &mut self.paused[member] {
            held.push(event);
            return;
        }
        let mut agent = self.agents[member].take().expect("checked above");
        agent.on_event(&mut self.env, event);
        self.agents[member] = Some(agent);
    }

    /// A new agent process starts on `member` (first start or restart).
    pub(super) fn start_agent(&mut self, member: usize) {
        let clock = Clock {
            boot: self.env.now,
            ppm: self.clock_ppm[member],
        };
        let identity = Identity {
            name: self.env.names[member].clone(),
            cluster: "sim".into(),
            tags: self.tags[member].clone(),
            fallback_demote_margin: self.bootstrap.demote_margin(),
            reclone_on_rewind_failure: self.reclone[member],
        };
        let mut agent = Agent::new(
            member,
            self.env.incarnations[member],
            identity,
            clock,
            self.bootstrap.clone(),
            self.env.unrewound_markers[member],
            self.plant,
        );
        self.env
            .log(format!("{}: agent starts", self.env.names[member]));
        self.env.snapshots[member] = Some(agent.initial_status());
        agent.start(&mut self.env);
        self.agents[member] = Some(agent);
    }

    /// Routes one event, then checks one-writer.
    pub(super) fn dispatch(&mut self, event: Event) {
        match event {
            Event::Agent {
                member,
                incarnation,
                event,
            } => self.deliver(member, incarnation, event),
            Event::Net {
                member,
                incarnation,
                event,
            } => {
                if self.env.links[member].passes(self.env.now, &mut self.env.rng) {
                    self.deliver(member, incarnation, event);
                }
            }
            Event::EtcdArrive {
                member,
                incarnation,
                id,
                request,
            } => self.env.etcd_arrive(member, incarnation, id, request),
            Event::EtcdSweep => self.env.etcd_sweep(),
            Event::EtcdRecovered => {
                if self.env.etcd.available(self.env.now) {
                    let extra = self.env.rng.range(0, 1_000);
                    self.env.etcd.extend_all_leases(self.env.now, extra);
                    self.env
                        .log("etcd: new raft leader, every lease extended to its full TTL".into());
                }
            }
            Event::WalTick => {
                self.env.wal_tick();
                let next = self.env.now + WAL_TICK_MS - 10 + self.env.rng.range(0, 20);
                self.env.schedule(next, Event::WalTick);
            }
            Event::PgComplete { member, op } => self.env.complete_op(member, op),
            Event::PgExit { member, generation } => self.env.pg_exit(member, generation),
            Event::PgEscalate { member, op } => self.env.escalate_stop(member, op),
            Event::Operator(call) => {
                if !matches!(*call, Call::Write { .. }) {
                    self.env.stats.operator_calls += 1;
                }
                self.env.operator(*call)
            }
            Event::Fault(fault) => self.inject(fault),
            Event::Restart { member } => self.start_agent(member),
            Event::KeeperFence { member, token } => self.env.keeper_fence(member, token),
            Event::Resume { member } => self.resume(member),
        }
        self.env.check_one_writer();
    }

    /// Makes `fault` happen now; links and PostgreSQL heal by themselves when
    /// its duration ends, crashed and stopped agents through a scheduled event.
    pub(super) fn inject(&mut self, fault: Fault) {
        if fault.is_operator() {
            return self.operate(fault);
        }
        self.env.stats.faults += 1;
        self.env.last_fault_at = self.env.now;
        let now = self.env.now;
        let text = fault.describe(&self.env.names);
        self.env.log(format!("FAULT {text}"));
        match fault {
            Fault::Crash { member, down_ms } => self.crash(member, down_ms),
            Fault::PgCrash { member } => self.env.crash_pg(member),
            Fault::PgBroken { member, ms } => {
                self.env.pgs[member].broken_until = now + ms;
                self.env.crash_pg(member);
            }
            Fault::Pause { member, ms } => {
                if self.agents[member].is_some() && self.paused[member].is_none() {
                    self.paused[member] = Some(Vec::new());
                    self.env.paused[member] = true;
                    self.env.schedule(now + ms, Event::Resume { member });
                }
            }
            Fault::Partition { member, ms, mode } => {
                self.env.links[member].cut = Some((now + ms, mode));
            }
            Fault::SlowLink {
                member,
                ms,
                max_extra_ms,
            } => self.env.links[member].slow = Some((now + ms, max_extra_ms)),
            Fault::FlakyLink {
                member,
                ms,
                loss_per_mille,
            } => self.env.links[member].flaky = Some((now + ms, loss_per_mille)),
            Fault::EtcdLeaderChange { outage_ms } => {
                let until = now + outage_ms;
                self.env.etcd.unavailable_until = self.env.etcd.unavailable_until.max(until);
                self.env.schedule(until, Event::EtcdRecovered);
            }
            Fault::Switchover { .. } | Fault::Failover { .. } | Fault::Maintenance { .. } => {
                unreachable!("operator calls are not faults")
            }
        }
    }

    /// An operator's call now, and the follow-up it planned (a cancel, the
    /// end of maintenance mode).
    fn operate(&mut self, fault: Fault) {
        let now = self.env.now;
        self.env
            .log(format!("OPERATOR {}", fault.describe(&self.env.names)));
        let (call, later) = match fault {
            Fault::Switchover {
                to,
                in_secs,
                force,
                cancel_after_ms,
            } => (
                Call::Switchover { to, in_secs, force },
                cancel_after_ms.map(|ms| (ms, Call::Cancel)),
            ),
            Fault::Failover { to, force } => (Call::Failover { to, force }, None),
            Fault::Maintenance { ms } => (Call::SetPause(true), Some((ms, Call::SetPause(false)))),
            other => unreachable!("{other:?} is no operator call"),
        };
        self.env.schedule(now, Event::Operator(Box::new(call)));
        if let Some((after, call)) = later {
            self.env
                .schedule(now + after, Event::Operator(Box::new(call)));
        }
    }

    /// The node dies: agent and PostgreSQL. In-flight requests still reach
    /// etcd; answers go nowhere. A half-written data directory stays so.
    pub(super) fn crash(&mut self, member: usize, down_ms: u64) {
        if self.agents[member].is_none() {
            return;
        }
        self.agents[member] = None;
        self.paused[member] = None;
        self.env.paused[member] = false;
        // The fence keeper dies with the node.
        self.env.keepers[member] = Default::default();
        self.env.snapshots[member] = None;
        self.env.incarnations[member] += 1;
        if self.env.pgs[member].has_postmaster() {
            self.env.note_stop(member, StopKind::Crash);
        }
        let pg = &mut self.env.pgs[member];
        pg.process = Process::Stopped;
        pg.op = None;
        self.env
            .schedule(self.env.now + down_ms, Event::Restart { member });
    }

    /// SIGCONT: the held events are delivered in the order they came.
    pub(super) fn resume(&mut self, member: usize) {
        let Some(held) = self.paused[member].take() else {
            return;
        };
        self.env.paused[member] = false;
        self.env
            .log(format!("{}: agent continues", self.env.names[member]));
        let incarnation = self.env.incarnations[member];
        for event in held {
            self.env.schedule(
                self.env.now,
                Event::Agent {
                    member,
                    incarnation,
                    event,
                },
            );
        }
    }

    /// Runs events until `bound` after the end of the last fault
    /// (`Env::faults_end`, which the `targeted-cut` nemesis may push back),
    /// checking one-writer after each. Returns the end of the last fault and
    /// when a healthy leader was first seen after it, or the violation.
    pub(super) fn run_until(&mut self, bound: u64) -> Result<(u64, Option<u64>), Violation> {
        let mut recovered_at = None;
        let mut quiet_from = self.env.faults_end;
        while let Some(Reverse(next)) = self.env.queue.pop() {
            if next.at > self.env.faults_end + bound {
                break;
            }
            self.env.now = next.at;
            self.env.stats.events += 1;
            self.dispatch(next.event);
            if let Some(violation) = self.env.violation.take() {
                return Err(violation);
            }
            if self.env.faults_end != quiet_from {
                quiet_from = self.env.faults_end;
                recovered_at = None;
            }
            if self.env.now >= quiet_from
                && recovered_at.is_none()
                && self.env.healthy_leader(&self.agents).is_some()
            {
                recovered_at = Some(self.env.now);
            }
        }
        self.env.now = quiet_from + bound;
        Ok((quiet_from, recovered_at))
    }
}
