//! The HA core: every decision the agent takes, as a pure function.
//!
//! [`Core::decide`] maps an [`Observation`] (what the shell saw of the local
//! PostgreSQL, of etcd and of its lease, at a monotonic instant the shell passes
//! in) to a [`Decision`] (actions for the shell to carry out, and what to tell
//! operators). Nothing here does I/O, reads a clock or spawns a task, so every
//! rule is unit-tested and the whole core can be driven by a seeded simulator.
//!
//! The core re-derives everything from the observation each time; its only
//! memory is what cannot be observed: how long a crashed primary has been
//! down, when the agent started (the restart grace), whether this data is a
//! former primary not yet rewound, the standing-down window and the term of a
//! leader key it gave up, the last intent it handed over for, and since when
//! a due intent has waited without a leader. That memory lives in the
//! process, except the former-primary fact, which the round driver persists
//! after every decision (an `Effect::PersistMarker` the shell writes to disk)
//! and gives back through [`Core::restore_unrewound_former_primary`] after a
//! restart. Safety rules (docs/architecture.md, "Safety invariants") are
//! asserted on every decision by [`assert_safe`]: a broken rule is a bug in
//! the core and stops the agent.
//!
//! Layout: [`model`] holds the observation and action types, [`election`] ranks
//! candidates for the leader key, [`sync`] plans synchronous replication and
//! says who may be promoted under it, [`lease`] holds the lease arithmetic
//! shared with the shell's tasks (keepalive, fencing watchdog), [`store`] the
//! typed etcd requests and the key→view decoding, [`driver`] is the round
//! driver (the order of a round's steps, sans-IO: effects out, outcomes in),
//! and this module holds the rules.

pub mod driver;
pub mod election;
pub mod lease;
pub mod model;
mod restore;
pub mod store;
pub mod sync;

pub use model::*;

use election::Override;
use jai_proto::{LeaderStatus, MemberRole, MemberState, MemberStatus, SwitchoverIntent};

/// The decision logic of one member, plus the little it must remember.
#[derive(Debug, Clone)]
pub struct Core {
    identity: Identity,
    /// When PostgreSQL was first seen down while this member held the leader key.
    primary_down_since: Option<Millis>,
    /// The first instant this core decided at: the agent's start.
    started_at: Option<Millis>,
    /// This member's data last ran as a primary and has not been rewound
    /// against the current leader since: it must not stream from anyone yet.
    /// Survives a start as a replica without a leader (whole-cluster restart).
    unrewound_former_primary: bool,
    /// Until when this member stands down after giving the leader key up
    /// because its PostgreSQL would not come back: the others take over first.
    standing_down_until: Option<Millis>,
    /// The term of the leader key this member decided to give up. Until etcd
    /// shows that key gone, the member re-releases it and never becomes
    /// writable on it: the release may still be in flight (timed out at the
    /// shell, applied later), however long etcd took.
    released_term: Option<i64>,
    /// The last intent this member handed over for, and in which term.
    handed_over: Option<(SwitchoverIntent, i64)>,
    /// A due switchover or failover intent seen while no member held the key,
    /// and since when: the others leave its target one `ttl` to take the key,
    /// then elect as usual, so a target that cannot take over blocks nobody.
    intent_seen_leaderless: Option<(SwitchoverIntent, Millis)>,
    /// How far this member got in a whole-cluster restore.
    restore: restore::RestoreMemory,
}

impl Core {
    /// A core for the member `identity`, remembering nothing yet.
    pub fn new(identity: Identity) -> Self {
        Self {
            identity,
            primary_down_since: None,
            started_at: None,
            unrewound_former_primary: false,
            standing_down_until: None,
            released_term: None,
            handed_over: None,
            intent_seen_leaderless: None,
            restore: restore::RestoreMemory::default(),
        }
    }

    /// This member gave leadership up and does not run for it until the
    /// others had their chance; published in its member status.
    pub fn is_standing_down(&self, now: Millis) -> bool {
        self.standing_down_until.is_some_and(|until| now < until)
    }

    /// Who this core decides for.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// This member's data last ran as a primary and was not rewound against
    /// the current leader since. The shell persists it after every decision:
    /// once a former primary has run as a replica without a leader, its
    /// control file no longer tells, and an agent restarted then would follow
    /// the next leader without a rewind.
    pub fn unrewound_former_primary(&self) -> bool {
        self.unrewound_former_primary
    }

    /// Restores what an earlier run of this agent persisted (see
    /// [`Self::unrewound_former_primary`]); call before the first decision.
    pub fn restore_unrewound_former_primary(&mut self) {
        self.unrewound_former_primary = true;
    }

    /// The status this member publishes after `decision`: role, timeline and
    /// positions as observed, the decided state (`Running` whenever
    /// PostgreSQL runs, unless the member refused), and where it is reached.
    /// The shell and the simulator both publish exactly this.
    pub fn member_status(
        &self,
        observation: &Observation,
        decision: &Decision,
        reach: MemberAddresses,
        version: &str,
    ) -> MemberStatus {
        let running = match &observation.pg.process {
            PgProcess::Running(pg) => Some(pg),
            _ => None,
        };
        let system_id = match &observation.pg.data_dir {
            DataDir::Initialized { system_id, .. } => Some(system_id.clone()),
            _ => None,
        };
        MemberStatus {
            name: self.identity.name.clone(),
            role: match running.map(|pg| pg.role) {
                Some(PgRole::Primary) => MemberRole::Primary,
                Some(PgRole::Replica) => MemberRole::Replica,
                None => MemberRole::Unknown,
            },
            state: if running.is_some() && decision.state != MemberState::Refused {
                MemberState::Running
            } else {
                decision.state
            },
            reason: decision.reason.clone(),
            api_url: reach.api_url,
            pg_address: reach.pg_address,
            grpc_url: reach.grpc_url,
            pg_paths: reach.pg_paths,
            system_id,
            timeline: running.map(|pg| pg.timeline),
            write_lsn: running.and_then(|pg| pg.write_lsn),
            receive_lsn: running.and_then(|pg| pg.receive_lsn),
            replay_lsn: running.and_then(|pg| pg.replay_lsn),
            tags: self.identity.tags.clone(),
            standing_down: self.is_standing_down(observation.now),
            streaming: running
                .filter(|pg| pg.role == PgRole::Replica)
                .map(|pg| pg.streaming),
            standbys: running.map(|pg| pg.standbys.clone()).unwrap_or_default(),
            version: version.to_owned(),
        }
    }

    /// Decides what to do now. Call it whenever something changed (etcd watch,
    /// PostgreSQL exit, lease event) and at least every `loop_wait`.
    pub fn decide(&mut self, observation: &Observation) -> Decision {
        let decision = self.decide_unchecked(observation);
        assert_safe(&self.identity, observation, &decision);
        decision
    }

    fn decide_unchecked(&mut self, observation: &Observation) -> Decision {
        self.started_at.get_or_insert(observation.now);
        if let Some(fence) = self.fence_if_unsafe_primary(observation) {
            return fence;
        }
        let Some(cluster) = &observation.dcs else {
            return Decision::wait(
                current_state(observation),
                "etcd unreachable: taking no action until it answers",
            );
        };
        if observation.pg.data_dir == DataDir::Empty {
            // Nothing left to rewind: the next data directory is a fresh clone.
            self.unrewound_former_primary = false;
        }
        if observation.lease.valid_until.is_none() {
            return Decision::wait(
                current_state(observation),
                "no lease in etcd yet: registering before taking part",
            );
        }
        if let Some(decision) = self.after_aborted_restore(observation, cluster) {
            return decision;
        }
        if let (Some(intent), Some(Initialize::Done { .. })) =
            (&cluster.restore, &cluster.initialize)
        {
            if let Some(decision) = self.during_restore(observation, cluster, intent) {
                return decision;
            }
        }
        match (&cluster.initialize, &observation.pg.data_dir) {
            (_, DataDir::Unusable { reason }) => {
                Decision::refuse(format!("data directory unusable: {reason}"))
            }
            (None, _) if self.identity.tags.nofailover => Decision::wait(
                MemberState::Waiting,
                "tagged nofailover: waiting for another member to bootstrap the cluster",
            ),
            (None, DataDir::Empty) => Decision::act(
                MemberState::Waiting,
                "no cluster yet: racing to bootstrap it",
                vec![Action::ClaimInitialize],
            ),
            // etcd lost the cluster (wiped, or a new etcd): only a former
            // primary may re-register its system; a replica could be behind.
            (
                None,
                DataDir::Initialized {
                    system_id,
                    was_primary: true,
                },
            ) => Decision::act(
                MemberState::Waiting,
                format!("etcd has no cluster: re-registering this former primary's system {system_id}"),
                vec![Action::ClaimInitialize],
            ),
            (None, DataDir::Initialized { system_id, .. }) => Decision::wait(
                MemberState::Waiting,
                format!(
                    "etcd has no cluster: waiting for a former primary to re-register it \
                     (this replica's data directory is system {system_id})"
                ),
            ),
            (Some(Initialize::InProgress { mine: false }), _) => Decision::wait(
                MemberState::Waiting,
                "another member is bootstrapping the cluster",
            ),
            (Some(Initialize::InProgress { mine: true }), DataDir::Empty) => Decision::act(
                MemberState::Bootstrapping,
                "won the bootstrap race: running initdb",
                vec![Action::InitDb],
            ),
            (Some(Initialize::InProgress { mine: true }), DataDir::Initialized { .. }) => {
                self.finish_bootstrap(observation, cluster)
            }
            (Some(Initialize::Done { .. }), DataDir::Empty) => self.clone_from_leader(cluster),
            (
                Some(Initialize::Done { system_id: cluster_id }),
                DataDir::Initialized { system_id, .. },
            ) if cluster_id != system_id => Decision::refuse(format!(
                "data directory belongs to system {system_id}, but cluster {} is system {cluster_id}: \
                 move the data directory aside to re-clone this member",
                self.identity.cluster
            )),
            (Some(Initialize::Done { .. }), DataDir::Initialized { was_primary, .. }) => {
                self.steady_state(observation, cluster, *was_primary)
            }
        }
    }

    /// Becoming writable (start as primary, promote) needs a lease confirmed
    /// beyond the demotion margin, or the new primary would be fenced at once.
    fn lease_allows_writes(&self, observation: &Observation) -> bool {
        observation
            .lease
            .is_valid_beyond(observation.now, demote_margin(&self.identity, observation))
    }

    /// A primary must stop accepting writes before its lease can expire, and
    /// must never run without the leader key (docs/architecture.md, "Safety
    /// invariants", §3.1 and §3.2).
    fn fence_if_unsafe_primary(&self, observation: &Observation) -> Option<Decision> {
        let PgProcess::Running(pg) = &observation.pg.process else {
            return None;
        };
        if pg.role != PgRole::Primary {
            return None;
        }
        if !self.lease_allows_writes(observation) {
            return Some(Decision::act(
                MemberState::Stopped,
                "demoting: leader lease not confirmed by etcd in time",
                vec![Action::Stop {
                    reason: "leader lease not confirmed".into(),
                    handover_to: None,
                }],
            ));
        }
        let cluster = observation.dcs.as_ref()?;
        match &cluster.leader {
            Some(leader) if leader.mine => None,
            Some(leader) => Some(Decision::act(
                MemberState::Stopped,
                format!("demoting: {} holds the leader key", leader.name),
                vec![Action::Stop {
                    reason: format!("{} holds the leader key", leader.name),
                    handover_to: None,
                }],
            )),
            None if cluster.initialize == Some(Initialize::InProgress { mine: true }) => {
                Some(Decision::act(
                    MemberState::Running,
                    "bootstrap: taking the leader key",
                    vec![Action::AcquireLeader],
                ))
            }
            None if self.may_reclaim_leadership(cluster, pg) => Some(Decision::act(
                MemberState::Running,
                "running primary without the leader key: reclaiming it",
                vec![Action::AcquireLeader],
            )),
            None => Some(Decision::act(
                MemberState::Stopped,
                "demoting: leader key lost and another member led since",
                vec![Action::Stop {
                    reason: "leader key lost".into(),
                    handover_to: None,
                }],
            )),
        }
    }

    /// A running primary whose key vanished may take it back only if nobody
    /// led after it: it was the last leader, on the same timeline.
    fn may_reclaim_leadership(&self, cluster: &ClusterView, pg: &RunningPostgres) -> bool {
        match &cluster.last_leader {
            Some(status) => status.leader == self.identity.name && status.timeline == pg.timeline,
            None => false,
        }
    }

    fn finish_bootstrap(&mut self, observation: &Observation, cluster: &ClusterView) -> Decision {
        let DataDir::Initialized { system_id, .. } = &observation.pg.data_dir else {
            unreachable!("finish_bootstrap needs an initialized data directory");
        };
        match (&observation.pg.process, &cluster.leader) {
            (PgProcess::Stopped, _) if !self.lease_allows_writes(observation) => {
                Decision::wait(MemberState::Stopped, LEASE_NOT_CONFIRMED)
            }
            (PgProcess::Stopped, _) => Decision::act(
                MemberState::Starting,
                "bootstrap: starting the new primary",
                vec![Action::Start(StartAs::Primary)],
            ),
            (PgProcess::Unresponsive, _) => {
                Decision::wait(MemberState::Starting, "bootstrap: waiting for PostgreSQL")
            }
            (PgProcess::Running(pg), Some(leader)) if leader.mine && pg.role == PgRole::Primary => {
                let mut actions = vec![Action::PublishSystemId(system_id.clone())];
                actions.extend(self.leader_duties(observation, cluster, pg));
                Decision::act(
                    MemberState::Running,
                    "bootstrap: publishing the system identifier",
                    actions,
                )
            }
            _ => Decision::refuse(
                "bootstrap interrupted: another member holds the leader key of an uninitialised cluster",
            ),
        }
    }

    fn clone_from_leader(&self, cluster: &ClusterView) -> Decision {
        let Some(leader) = &cluster.leader else {
            return Decision::wait(MemberState::Waiting, "no leader to clone from yet");
        };
        if !leader_runs_primary(cluster, &leader.name) {
            return Decision::wait(
                MemberState::Waiting,
                format!(
                    "waiting for leader {} to report a running primary",
                    leader.name
                ),
            );
        }
        Decision::act(
            MemberState::Cloning,
            format!("cloning from leader {}", leader.name),
            vec![Action::CloneFrom(leader.name.clone())],
        )
    }

    fn steady_state(
        &mut self,
        observation: &Observation,
        cluster: &ClusterView,
        was_primary: bool,
    ) -> Decision {
        let leader_mine = cluster.leader.as_ref().is_some_and(|leader| leader.mine);
        if !leader_mine {
            self.primary_down_since = None;
        }
        if cluster.leader.is_some() && !leader_mine {
            // Another member leads: standing down has served its purpose.
            self.standing_down_until = None;
        }
        let released_key_shown = cluster
            .leader
            .as_ref()
            .is_some_and(|leader| leader.mine && Some(leader.term) == self.released_term);
        if !released_key_shown {
            self.released_term = None;
        }
        self.track_former_primary(observation, cluster, was_primary);
        self.note_intent(observation.now, cluster);
        if cluster.config.pause {
            return self.paused(observation, cluster);
        }
        match &observation.pg.process {
            PgProcess::Stopped if leader_mine => {
                self.restart_primary_in_place(observation, cluster, was_primary)
            }
            PgProcess::Stopped => match &cluster.leader {
                Some(leader) if self.unrewound_former_primary => {
                    self.rejoin_former_primary(observation, cluster, leader)
                }
                // Handed the key over: starting without a leader to follow
                // would only be stopped again for the rewind check.
                None if self.unrewound_former_primary && self.is_standing_down(observation.now) => {
                    Decision::wait(
                        MemberState::Stopped,
                        "gave the leader key up: waiting for the new leader before rejoining",
                    )
                }
                _ => Decision::act(
                    MemberState::Starting,
                    "starting PostgreSQL as a replica",
                    vec![Action::Start(StartAs::Replica {
                        follow: cluster.leader.as_ref().map(|leader| leader.name.clone()),
                    })],
                ),
            },
            PgProcess::Unresponsive => Decision::wait(
                MemberState::Starting,
                "waiting for PostgreSQL to accept connections",
            ),
            PgProcess::Running(pg) => {
                self.primary_down_since = None;
                match (&cluster.leader, pg.role) {
                    (Some(leader), PgRole::Primary) if leader.mine => {
                        self.lead(observation, cluster, pg, None)
                    }
                    (Some(leader), PgRole::Replica) if leader.mine => {
                        self.promote_with_key(observation, cluster)
                    }
                    (Some(leader), PgRole::Replica) if self.unrewound_former_primary => {
                        Decision::act(
                            MemberState::Stopped,
                            format!(
                                "former primary: stopping to rewind against {} before following it",
                                leader.name
                            ),
                            vec![Action::Stop {
                                reason: format!("must rewind against {} first", leader.name),
                                handover_to: None,
                            }],
                        )
                    }
                    (Some(leader), PgRole::Replica) => follow(pg, leader, None),
                    (None, PgRole::Replica) => self.run_for_leader(observation, cluster, pg),
                    (_, PgRole::Primary) => {
                        unreachable!("fence_if_unsafe_primary handles a primary without the key")
                    }
                }
            }
        }
    }

    /// The key holder runs a replica: promote it, once the lease allows writes.
    /// The intent is cleared first: it fired once the key left its `from`,
    /// and a new leader that died before clearing it would otherwise leave it
    /// to fire again when its old leader leads again (found by the
    /// simulator, seed 19648).
    fn promote_with_key(&self, observation: &Observation, cluster: &ClusterView) -> Decision {
        if !self.lease_allows_writes(observation) {
            return Decision::wait(MemberState::Running, LEASE_NOT_CONFIRMED);
        }
        let mut actions: Vec<Action> = self.clear_fired_intent(cluster).into_iter().collect();
        actions.push(Action::Promote {
            reason: promotion_reason(&self.identity.name, cluster),
        });
        Decision::act(
            MemberState::Running,
            "holding the leader key: promoting",
            actions,
        )
    }

    /// Deletes an intent this key holder is not the `from` of: it is done
    /// (this member was its target, or any replica would do) or overtaken.
    fn clear_fired_intent(&self, cluster: &ClusterView) -> Option<Action> {
        let intent = cluster.switchover.as_ref()?;
        let me = self.identity.name.as_str();
        if intent.from.as_deref() == Some(me) {
            return None;
        }
        let outcome = if intent.to.is_none() || intent.to.as_deref() == Some(me) {
            "done"
        } else {
            "overtaken"
        };
        Some(Action::ClearSwitchover {
            reason: format!("{} {outcome}: {me} leads", intent_kind(intent)),
        })
    }

    /// The leader's round: hand over if an operator asked for it and it is
    /// safe, else keep up the leader's duties.
    fn lead(
        &mut self,
        observation: &Observation,
        cluster: &ClusterView,
        pg: &RunningPostgres,
        reason: Option<&str>,
    ) -> Decision {
        if let Some(handover) = self.hand_over_if_asked(observation, cluster, pg) {
            return handover;
        }
        let (sync_actions, sync_reason) = sync::leader_plan(&self.identity, cluster, pg);
        let mut actions = self.leader_duties(observation, cluster, pg);
        actions.extend(sync_actions);
        Decision::act(
            MemberState::Running,
            reason.map(str::to_owned).or(sync_reason),
            actions,
        )
    }

    /// A due switchover from this leader: a CHECKPOINT (so the shutdown
    /// checkpoint is short), a clean stop (PostgreSQL's walsenders wait until
    /// every connected standby flushed all WAL, so the target loses nothing),
    /// and only then the key is released. Refused, and the intent removed,
    /// when no target is streaming and eligible.
    fn hand_over_if_asked(
        &mut self,
        observation: &Observation,
        cluster: &ClusterView,
        pg: &RunningPostgres,
    ) -> Option<Decision> {
        let intent = cluster.switchover.as_ref()?;
        let from_me = intent.from.as_deref() == Some(self.identity.name.as_str());
        if !from_me || !intent.is_due(observation.wall_clock_unix) {
            return None;
        }
        let term = cluster.leader.as_ref().map(|leader| leader.term);
        if let Some((_, handed_over_in)) = self
            .handed_over
            .as_ref()
            .filter(|(done, handed_over_in)| done == intent && Some(*handed_over_in) != term)
        {
            // This member already handed over for it and leads again in a
            // new term: the intent fired; it must not fire twice.
            let mut actions = vec![Action::ClearSwitchover {
                reason: format!(
                    "switchover already carried out: {} handed over in term {handed_over_in}",
                    self.identity.name
                ),
            }];
            actions.extend(self.leader_duties(observation, cluster, pg));
            return Some(Decision::act(MemberState::Running, None, actions));
        }
        Some(
            match handover_target(&self.identity.name, cluster, pg, intent) {
                Ok(target) => {
                    self.standing_down_until =
                        Some(observation.now + cluster.config.ttl.as_millis() as Millis);
                    self.released_term = term;
                    self.handed_over = term.map(|term| (intent.clone(), term));
                    Decision::act(
                    MemberState::Stopped,
                    format!(
                        "switchover to {target}: checkpoint, clean stop, then handing the leader key over"
                    ),
                    vec![
                        Action::Checkpoint,
                        Action::Stop {
                            reason: format!("switchover to {target}"),
                            handover_to: Some(target.clone()),
                        },
                        Action::ReleaseLeader,
                    ],
                )
                }
                Err(why) => {
                    let mut actions = vec![Action::ClearSwitchover {
                        reason: format!("switchover abandoned: {why}"),
                    }];
                    actions.extend(self.leader_duties(observation, cluster, pg));
                    Decision::act(
                        MemberState::Running,
                        format!("switchover abandoned: {why}"),
                        actions,
                    )
                }
            },
        )
    }

    /// Remembers since when a due intent has been waiting without a leader.
    fn note_intent(&mut self, now: Millis, cluster: &ClusterView) {
        match (&cluster.leader, &cluster.switchover) {
            (None, Some(intent)) => {
                let seen = self.intent_seen_leaderless.as_ref();
                if seen.is_none_or(|(seen, _)| seen != intent) {
                    self.intent_seen_leaderless = Some((intent.clone(), now));
                }
            }
            _ => self.intent_seen_leaderless = None,
        }
    }

    /// No leader and a due intent: its target takes the key if it passes the
    /// rules every leader must pass (lag waived only when forced); the others
    /// wait for it one `ttl`. `None`: no intent applies, elect as usual.
    fn follow_intent(
        &self,
        observation: &Observation,
        cluster: &ClusterView,
        pg: &RunningPostgres,
    ) -> Option<Decision> {
        let intent = cluster
            .switchover
            .as_ref()
            .filter(|intent| intent.is_due(observation.wall_clock_unix))?;
        let kind = intent_kind(intent);
        let waiting_since = self
            .intent_seen_leaderless
            .as_ref()
            .map_or(observation.now, |(_, since)| *since);
        let window_open = observation.now.saturating_sub(waiting_since)
            < cluster.config.ttl.as_millis() as Millis;
        let waiver = if intent.force {
            Override::Forced
        } else {
            Override::None
        };
        match intent.to.as_deref() {
            Some(to) if to == self.identity.name => Some(
                match election::check_eligible(&self.identity, pg, cluster, waiver)
                    .and_then(|()| received_the_handover(intent, cluster, pg))
                {
                    Ok(()) => Decision::act(
                        MemberState::Running,
                        format!("{kind}: this member is the target, taking the leader key"),
                        vec![Action::AcquireLeader],
                    ),
                    Err(why) => Decision::wait(
                        MemberState::Running,
                        format!("{kind} targets this member, but it is not eligible: {why}"),
                    ),
                },
            ),
            Some(to) if window_open => Some(Decision::wait(
                MemberState::Running,
                format!("no leader; {kind} to {to} under way: leaving it the leader key"),
            )),
            _ => None,
        }
    }

    /// Maintenance mode: no automatic action. What still happens: fencing
    /// (before this is reached), the leader's duties, a switchover or failover
    /// an operator asked for, and replicas following the leader there is.
    fn paused(&mut self, observation: &Observation, cluster: &ClusterView) -> Decision {
        let PgProcess::Running(pg) = &observation.pg.process else {
            return Decision::wait(current_state(observation), PAUSED);
        };
        match (&cluster.leader, pg.role) {
            (Some(leader), PgRole::Primary) if leader.mine => {
                self.lead(observation, cluster, pg, Some(PAUSED))
            }
            (Some(leader), PgRole::Replica) if leader.mine => {
                self.promote_with_key(observation, cluster)
            }
            (Some(leader), PgRole::Replica) if !self.unrewound_former_primary => {
                follow(pg, leader, Some(PAUSED))
            }
            // A switchover to the best replica names no target: the usual
            // election picks it. Without this, a leader that handed over in
            // maintenance mode left the cluster without one until it ended
            // (found by the simulator, seeds 1444 and 1795).
            (None, PgRole::Replica) if switchover_to_best_is_due(observation, cluster) => {
                self.run_for_leader(observation, cluster, pg)
            }
            (None, PgRole::Replica) => self
                .follow_intent(observation, cluster, pg)
                .unwrap_or_else(|| Decision::wait(MemberState::Running, PAUSED)),
            _ => Decision::wait(MemberState::Running, PAUSED),
        }
    }

    /// Keeps `unrewound_former_primary` true from the moment this member's data
    /// is seen as a stopped former primary under another leader (or none) until
    /// it leads again or a rewind against the current leader succeeded.
    fn track_former_primary(
        &mut self,
        observation: &Observation,
        cluster: &ClusterView,
        was_primary: bool,
    ) {
        let leader = cluster.leader.as_ref();
        if leader.is_some_and(|leader| leader.mine) {
            self.unrewound_former_primary = false;
            return;
        }
        if was_primary && observation.pg.process == PgProcess::Stopped {
            self.unrewound_former_primary = true;
        }
        let rewound = leader.is_some_and(|leader| {
            observation.pg.last_rewind.as_ref().is_some_and(|outcome| {
                outcome.leader_term == leader.term && outcome.error.is_none()
            })
        });
        if rewound {
            self.unrewound_former_primary = false;
        }
    }

    /// A former primary may hold WAL the new leader never had: it follows only
    /// after `pg_rewind` against that leader (docs/architecture.md, "Safety
    /// invariants", §3.5). If the rewind fails it re-clones when allowed, else
    /// stays down and says why.
    fn rejoin_former_primary(
        &mut self,
        observation: &Observation,
        cluster: &ClusterView,
        leader: &LeaderKey,
    ) -> Decision {
        let outcome = observation
            .pg
            .last_rewind
            .as_ref()
            .filter(|outcome| outcome.leader_term == leader.term);
        match outcome {
            Some(RewindOutcome { error: None, .. }) => Decision::act(
                MemberState::Starting,
                format!("rewound against {}: starting as its replica", leader.name),
                vec![Action::Start(StartAs::Replica {
                    follow: Some(leader.name.clone()),
                })],
            ),
            Some(RewindOutcome {
                error: Some(error), ..
            }) => {
                if self.identity.reclone_on_rewind_failure {
                    // The clone replaces the diverged data: nothing to rewind after it.
                    self.unrewound_former_primary = false;
                    Decision::act(
                        MemberState::Cloning,
                        format!(
                            "pg_rewind against {} failed ({error}): re-cloning",
                            leader.name
                        ),
                        vec![Action::CloneFrom(leader.name.clone())],
                    )
                } else {
                    Decision::refuse(format!(
                        "pg_rewind against {} failed: {error}. Set postgresql.reclone_on_rewind_failure: true, \
                         or move the data directory aside to re-clone this member",
                        leader.name
                    ))
                }
            }
            None if leader_runs_primary(cluster, &leader.name) => Decision::act(
                MemberState::Starting,
                format!(
                    "former primary: rewinding against new leader {} before following it",
                    leader.name
                ),
                vec![Action::Rewind(leader.name.clone())],
            ),
            None => Decision::wait(
                MemberState::Stopped,
                format!(
                    "former primary: waiting for leader {} to run before rewinding",
                    leader.name
                ),
            ),
        }
    }

    /// PostgreSQL is down on the leader: restart it in place, but give the key
    /// up once `primary_start_timeout` has passed so a replica can take over.
    fn restart_primary_in_place(
        &mut self,
        observation: &Observation,
        cluster: &ClusterView,
        was_primary: bool,
    ) -> Decision {
        // Once this member decided to give the key up, it treats the key as
        // gone until etcd shows it gone, however long that takes: a read can
        // overtake the release (found by the simulator, seed 9214 with
        // slow-timeout faults), and a release held up by an etcd election can
        // apply long after the shell gave up waiting for it (seed 12305: a
        // switchover's release applied while the old leader, no longer
        // standing down, was starting its primary again).
        if self.is_standing_down(observation.now) || self.released_term.is_some() {
            return Decision::act(
                MemberState::Stopped,
                "gave the leader key up: releasing it again until etcd shows it gone",
                vec![Action::ReleaseLeader],
            );
        }
        let since = *self.primary_down_since.get_or_insert(observation.now);
        let timeout = cluster.config.primary_start_timeout.as_millis() as Millis;
        if observation.now.saturating_sub(since) >= timeout {
            self.primary_down_since = None;
            self.released_term = cluster.leader.as_ref().map(|leader| leader.term);
            self.standing_down_until =
                Some(observation.now + cluster.config.ttl.as_millis() as Millis);
            return Decision::act(
                MemberState::Stopped,
                "PostgreSQL did not come back within primary_start_timeout: releasing the leader key",
                vec![Action::ReleaseLeader],
            );
        }
        let start_as = if was_primary {
            if !self.lease_allows_writes(observation) {
                return Decision::wait(MemberState::Stopped, LEASE_NOT_CONFIRMED);
            }
            StartAs::Primary
        } else {
            StartAs::Replica { follow: None }
        };
        Decision::act(
            MemberState::Starting,
            "PostgreSQL down on the leader: restarting it in place",
            vec![Action::Start(start_as)],
        )
    }

    /// No leader: take part in the election if this member is eligible and the
    /// best candidate; otherwise wait for the winner.
    fn run_for_leader(
        &self,
        observation: &Observation,
        cluster: &ClusterView,
        pg: &RunningPostgres,
    ) -> Decision {
        if let Some(decision) = self.follow_intent(observation, cluster, pg) {
            return decision;
        }
        if let Some(wait) = self.wait_for_former_leader(observation, cluster) {
            return wait;
        }
        if self.is_standing_down(observation.now) {
            return Decision::wait(
                MemberState::Running,
                "no leader; gave the key up after a PostgreSQL crash: letting another member take over first",
            );
        }
        match election::judge(&self.identity, pg, cluster) {
            Ok(()) => Decision::act(
                MemberState::Running,
                "no leader: this member is the best candidate, taking the key",
                vec![Action::AcquireLeader],
            ),
            Err(why_not) => {
                let _ = observation;
                Decision::wait(
                    MemberState::Running,
                    format!("no leader; not racing: {why_not}"),
                )
            }
        }
    }

    /// Right after this agent starts (a whole-cluster restart), give the former
    /// leader one `ttl` to come back before racing it: it has all the WAL, and
    /// keeping it avoids a needless promotion. An agent that was already
    /// running when the leader vanished (a failover) never waits here.
    fn wait_for_former_leader(
        &self,
        observation: &Observation,
        cluster: &ClusterView,
    ) -> Option<Decision> {
        let former = cluster.last_leader.as_ref()?.leader.as_str();
        if former == self.identity.name {
            return None;
        }
        let former_member = cluster.member(former);
        if former_member.is_some_and(|member| member.standing_down) {
            return None;
        }
        let former_is_candidate = former_member.is_some_and(election::is_candidate);
        let grace = cluster.config.ttl.as_millis() as Millis;
        let started_at = self.started_at.unwrap_or(observation.now);
        let within_grace = observation.now.saturating_sub(started_at) < grace;
        (within_grace && !former_is_candidate).then(|| {
            Decision::wait(
                MemberState::Running,
                format!(
                    "no leader; giving former leader {former} until {}s after start-up to return",
                    grace / 1000
                ),
            )
        })
    }

    /// What the leader keeps doing every loop: a replication slot per member,
    /// and its WAL position published for the replicas' lag checks.
    fn leader_duties(
        &self,
        _observation: &Observation,
        cluster: &ClusterView,
        pg: &RunningPostgres,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let wanted: Vec<String> = cluster
            .members
            .iter()
            .filter(|member| member.name != self.identity.name)
            .map(|member| slot_name(&member.name))
            .collect();
        for slot in &wanted {
            if !pg.slots.contains(slot) {
                actions.push(Action::CreateSlot(slot.clone()));
            }
        }
        for slot in &pg.slots {
            if slot.starts_with(SLOT_PREFIX) && !wanted.contains(slot) {
                actions.push(Action::DropSlot(slot.clone()));
            }
        }
        actions.extend(self.clear_fired_intent(cluster));
        if let Some(optime) = pg.write_lsn {
            let status = LeaderStatus {
                leader: self.identity.name.clone(),
                timeline: pg.timeline,
                optime,
                clean_stop: false,
            };
            if cluster.last_leader.as_ref() != Some(&status) {
                actions.push(Action::PublishLeaderStatus(status));
            }
        }
        actions
    }
}

/// A replica with a leader that is not this member: stream from it.
fn follow(pg: &RunningPostgres, leader: &LeaderKey, reason: Option<&str>) -> Decision {
    if pg.following.as_deref() == Some(leader.name.as_str()) {
        return Decision::act(MemberState::Running, reason.map(str::to_owned), vec![]);
    }
    Decision::act(
        MemberState::Running,
        format!("following new leader {}", leader.name),
        vec![Action::Follow(Some(leader.name.clone()))],
    )
}

/// Which replica a switchover from this leader hands over to: the one the
/// intent names, or the most advanced one, provided it is eligible, on this
/// timeline, streaming from this primary right now, and (unless forced)
/// within `maximum_lag_on_failover` of it.
pub fn handover_target(
    me: &str,
    cluster: &ClusterView,
    pg: &RunningPostgres,
    intent: &SwitchoverIntent,
) -> Result<String, HandoverRefusal> {
    let check = |member: &MemberStatus| -> Result<u64, HandoverRefusal> {
        let name = &member.name;
        // Reasons about the replica's link to this primary may clear within a
        // loop or two: a replica that just started streaming (or caught up)
        // shows in what this leader publishes only at its next round.
        let settling = |why: String| HandoverRefusal {
            why,
            may_clear_soon: true,
        };
        if !election::is_candidate(member) {
            let why = if member.tags.nofailover {
                "tagged nofailover".to_owned()
            } else if member.standing_down {
                "standing down after giving leadership up".to_owned()
            } else {
                format!("{:?} {:?}", member.role, member.state).to_lowercase()
            };
            // A replica between two states (starting, restarting) may be
            // one soon; a tag or a stand-down is not going away in seconds.
            return Err(HandoverRefusal {
                why: format!("{name} is not an eligible running replica ({why})"),
                may_clear_soon: !member.tags.nofailover && !member.standing_down,
            });
        }
        if member.timeline != Some(pg.timeline) {
            return Err(settling(format!(
                "{name} is not on timeline {}",
                pg.timeline
            )));
        }
        let link = pg
            .standbys
            .iter()
            .find(|link| &link.name == name)
            .ok_or_else(|| settling(format!("{name} is not connected to this primary")))?;
        if !link.is_streaming() {
            return Err(settling(format!("{name} is {}, not streaming", link.state)));
        }
        if !intent.force {
            sync::allows_promotion(cluster, name).map_err(|why| {
                HandoverRefusal::settled(format!(
                    "{name} is {why}; --force accepts losing what it has not received"
                ))
            })?;
        }
        let behind = pg
            .wal_position()
            .bytes_since(link.flush_lsn.unwrap_or_default());
        if !intent.force && behind > cluster.config.maximum_lag_on_failover {
            return Err(settling(format!(
                "{name} is {behind} bytes behind, more than maximum_lag_on_failover ({})",
                cluster.config.maximum_lag_on_failover
            )));
        }
        Ok(behind)
    };
    match intent.to.as_deref() {
        Some(to) if to == me => Err(HandoverRefusal::settled(format!(
            "{to} is already the leader"
        ))),
        Some(to) => {
            let member = cluster.member(to).ok_or_else(|| {
                HandoverRefusal::settled(format!("{to} is not a registered member"))
            })?;
            check(member).map(|_| to.to_owned())
        }
        None => {
            let mut reasons = Vec::new();
            let mut best: Option<(u64, std::cmp::Reverse<u32>, &str)> = None;
            for member in cluster.members.iter().filter(|member| member.name != me) {
                match check(member) {
                    Ok(behind) => {
                        let rank = (
                            behind,
                            std::cmp::Reverse(member.tags.failover_priority),
                            member.name.as_str(),
                        );
                        if best.is_none_or(|best| rank < best) {
                            best = Some(rank);
                        }
                    }
                    Err(why) => reasons.push(why),
                }
            }
            best.map(|(_, _, name)| name.to_owned()).ok_or_else(|| {
                if reasons.is_empty() {
                    HandoverRefusal::settled("no other member is registered".into())
                } else {
                    HandoverRefusal {
                        may_clear_soon: reasons.iter().any(|reason| reason.may_clear_soon),
                        why: reasons
                            .iter()
                            .map(|reason| reason.why.as_str())
                            .collect::<Vec<_>>()
                            .join("; "),
                    }
                }
            })
        }
    }
}

/// Why no replica can take over in a switchover now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoverRefusal {
    /// For the operator: which member and what stands in the way.
    pub why: String,
    /// True when the reason is about replication that may catch up within a
    /// loop or two (not streaming yet, lagging, another timeline), so a
    /// caller may check again shortly; false when only an operator or a
    /// configuration change can clear it.
    pub may_clear_soon: bool,
}

impl HandoverRefusal {
    fn settled(why: String) -> Self {
        Self {
            why,
            may_clear_soon: false,
        }
    }
}

impl std::fmt::Display for HandoverRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

/// A due switchover from a leader to whichever replica is best is pending.
fn switchover_to_best_is_due(observation: &Observation, cluster: &ClusterView) -> bool {
    cluster.switchover.as_ref().is_some_and(|intent| {
        intent.from.is_some() && intent.to.is_none() && intent.is_due(observation.wall_clock_unix)
    })
}

/// A switchover target takes over only once it has every byte of the old
/// primary's WAL: that leader published its shutdown checkpoint as its last
/// position before releasing the key. Forced intents (and failovers) skip
/// this; the usual lag rule still applies to them.
fn received_the_handover(
    intent: &SwitchoverIntent,
    cluster: &ClusterView,
    pg: &RunningPostgres,
) -> Result<(), election::NotEligible> {
    let (Some(from), Some(last)) = (intent.from.as_deref(), cluster.last_leader.as_ref()) else {
        return Ok(());
    };
    if intent.force || last.leader != from || last.timeline != pg.timeline {
        return Ok(());
    }
    match last.optime.bytes_since(pg.wal_position()) {
        0 => Ok(()),
        missing => Err(election::NotEligible::ShortOfHandover {
            missing,
            from: from.to_owned(),
            final_position: last.optime,
        }),
    }
}

/// "switchover" (a leader hands over) or "failover" (no leader to hand over).
fn intent_kind(intent: &SwitchoverIntent) -> &'static str {
    if intent.from.is_some() {
        "switchover"
    } else {
        "failover"
    }
}

const PAUSED: &str = "maintenance mode: taking no automatic action (`jaictl resume` ends it)";

/// The member says it runs PostgreSQL as a primary.
pub fn leader_runs_primary(cluster: &ClusterView, name: &str) -> bool {
    cluster.member(name).is_some_and(|member| {
        member.role == jai_proto::MemberRole::Primary && member.state == MemberState::Running
    })
}

const LEASE_NOT_CONFIRMED: &str =
    "leader lease not confirmed beyond the demotion margin: not becoming writable";

/// How long before its lease deadline a primary must have stopped writing.
fn demote_margin(identity: &Identity, observation: &Observation) -> std::time::Duration {
    observation
        .dcs
        .as_ref()
        .map(|cluster| cluster.config.demote_margin())
        .unwrap_or(identity.fallback_demote_margin)
}

/// Prefix of the replication slots the leader manages, one per member.
pub const SLOT_PREFIX: &str = "jai_";

/// The replication slot the leader keeps for member `name`.
pub fn slot_name(name: &str) -> String {
    format!("{SLOT_PREFIX}{}", name.replace('-', "_"))
}

fn promotion_reason(me: &str, cluster: &ClusterView) -> String {
    if let Some(intent) = &cluster.switchover {
        match &intent.from {
            Some(from) => return format!("switchover from {from}"),
            None if intent.to.as_deref() == Some(me) => return "manual failover".into(),
            None => {}
        }
    }
    match &cluster.last_leader {
        Some(status) if status.leader == me => "restart of the former leader".into(),
        Some(status) => format!("failover from {}", status.leader),
        None => "first leader".into(),
    }
}

fn current_state(observation: &Observation) -> MemberState {
    match observation.pg.process {
        PgProcess::Running(_) => MemberState::Running,
        PgProcess::Unresponsive => MemberState::Starting,
        PgProcess::Stopped => MemberState::Stopped,
    }
}

/// §3.3: in synchronous mode only a member holding every acknowledged commit
/// is promoted, unless an operator forced this very member.
fn sync_allows(identity: &Identity, observation: &Observation) -> bool {
    let Some(cluster) = &observation.dcs else {
        return false;
    };
    let forced = cluster
        .switchover
        .as_ref()
        .is_some_and(|intent| intent.force && intent.to.as_deref() == Some(identity.name.as_str()));
    forced || sync::allows_promotion(cluster, &identity.name).is_ok()
}

/// Checks the safety rules (docs/architecture.md, "Safety invariants") against
/// one decision. A violation is a bug in the core, so it panics with the
/// observation and the decision.
pub fn assert_safe(identity: &Identity, observation: &Observation, decision: &Decision) {
    let holds_key = observation
        .dcs
        .as_ref()
        .and_then(|cluster| cluster.leader.as_ref())
        .is_some_and(|leader| leader.mine);
    let bootstrapping = observation.dcs.as_ref().is_some_and(|cluster| {
        matches!(
            cluster.initialize,
            Some(Initialize::InProgress { mine: true })
        )
    });
    let lease_ok = observation
        .lease
        .is_valid_beyond(observation.now, demote_margin(identity, observation));
    let runs_primary =
        matches!(&observation.pg.process, PgProcess::Running(pg) if pg.role == PgRole::Primary);
    for (index, action) in decision.actions.iter().enumerate() {
        let stopped_before = decision.actions[..index]
            .iter()
            .any(|earlier| matches!(earlier, Action::Stop { .. }));
        let ok = match action {
            // §3.1: the key goes only once this member cannot take writes.
            Action::ReleaseLeader => !runs_primary || stopped_before,
            // §3.2: promotion only with the key, and a lease that outlives the margin.
            Action::Promote { .. } => holds_key && lease_ok && sync_allows(identity, observation),
            // A primary starts only for its own bootstrap or while holding the key.
            Action::Start(StartAs::Primary) => (holds_key || bootstrapping) && lease_ok,
            // Only the key holder manages slots and speaks for the leader.
            Action::CreateSlot(_) | Action::DropSlot(_) | Action::PublishLeaderStatus(_) => {
                holds_key
            }
            Action::PublishSystemId(_) => holds_key && bootstrapping,
            // A restore replaces a stopped data directory, as the key holder only.
            Action::RestoreTo(_) => {
                holds_key && lease_ok && observation.pg.process == PgProcess::Stopped
            }
            Action::RecordRestore { .. } | Action::ClearRestore => holds_key,
            _ => true,
        };
        assert!(
            ok,
            "HA core safety violation by {}: {action:?} not allowed\nobservation: {observation:#?}\ndecision: {decision:#?}",
            identity.name
        );
    }
}

#[cfg(test)]
mod tests;
