//! The whole-cluster restore (`jaictl restore --time T`): what each member
//! does while a `restore` intent is in etcd.
//!
//! The order is the safety argument. No member may take writes on old data
//! once the restore began, and no two members may ever be primaries:
//!
//! 1. `stopping`: every member but the restorer stops PostgreSQL and gives the
//!    leader key up; none elects, starts or promotes while the intent stands.
//! 2. The restorer waits until every registered member reports stopped and
//!    the leader key is free, takes it (its lease and fencing as for any
//!    leader), then replaces its data directory with the repository's copy at
//!    the target; PostgreSQL recovers to the target and promotes itself on a
//!    new timeline. Until it is a primary the restorer waits; if the recovery
//!    fails it says so and does nothing else (an operator fixes or aborts).
//! 3. Promoted, it records the restore in `history` and moves the intent to
//!    `rejoining`: the others wipe their data (it is ahead of the target, on
//!    the old timeline) and clone from it. Once every member streams on the
//!    new timeline, the restorer removes the intent.
//!
//! An agent that dies on the way resumes from etcd: a restorer that restarts
//! stops whatever runs and restores again; a member that restarts re-clones.

use super::*;
use jai_proto::{HistoryEntry, RestoreIntent, RestorePhase};

/// What the core remembers of a restore (lost with the process, on purpose:
/// redoing a step is always safe).
#[derive(Debug, Clone, Default)]
pub(crate) struct RestoreMemory {
    /// The intent this member (the restorer) restored its data directory for.
    pub restored: Option<String>,
    /// The intent this member re-cloned for.
    pub recloned: Option<String>,
}

impl Core {
    /// A restorer whose intent vanished before it recorded the restore
    /// (`jaictl restore --abort`): its data directory holds a partial
    /// recovery that must never be promoted. It stops, gives the key up,
    /// and waits for an operator's `jaictl reinit`.
    pub(crate) fn after_aborted_restore(
        &mut self,
        observation: &Observation,
        cluster: &ClusterView,
    ) -> Option<Decision> {
        let aborted = self.restore.restored.as_ref()?;
        if cluster
            .restore
            .as_ref()
            .is_some_and(|intent| &intent.id == aborted)
        {
            return None;
        }
        if observation.pg.data_dir == DataDir::Empty {
            // Wiped (`jaictl reinit`): nothing partial is left.
            self.restore.restored = None;
            return None;
        }
        let holds_key = cluster.leader.as_ref().is_some_and(|leader| leader.mine);
        let mut actions = Vec::new();
        if observation.pg.process != PgProcess::Stopped {
            actions.push(Action::Stop {
                reason: "the restore was aborted".into(),
                handover_to: None,
            });
        }
        if holds_key {
            actions.push(Action::ReleaseLeader);
        }
        let reason = "the restore was aborted: this data directory holds a partial recovery;                       `jaictl reinit` this member";
        Some(if actions.is_empty() {
            Decision::refuse(reason)
        } else {
            Decision::act(MemberState::Stopped, reason, actions)
        })
    }

    /// The decision while `intent` stands; `None`: decide as usual (a
    /// member that rejoined, the restorer leading while the others rejoin).
    pub(crate) fn during_restore(
        &mut self,
        observation: &Observation,
        cluster: &ClusterView,
        intent: &RestoreIntent,
    ) -> Option<Decision> {
        if intent.restorer == self.identity.name {
            self.restore_as_restorer(observation, cluster, intent)
        } else {
            self.restore_as_other(observation, cluster, intent)
        }
    }

    fn restore_as_other(
        &mut self,
        observation: &Observation,
        cluster: &ClusterView,
        intent: &RestoreIntent,
    ) -> Option<Decision> {
        let holds_key = cluster.leader.as_ref().is_some_and(|leader| leader.mine);
        let pg_up = observation.pg.process != PgProcess::Stopped;
        let target = &intent.target;
        let stop = || Action::Stop {
            reason: format!("cluster restore to {target}"),
            handover_to: None,
        };
        match intent.phase {
            RestorePhase::Stopping => Some(match (pg_up, holds_key) {
                (true, true) => Decision::act(
                    MemberState::Stopped,
                    format!(
                        "restore to {target}: stopping PostgreSQL and giving the leader key up"
                    ),
                    vec![stop(), Action::ReleaseLeader],
                ),
                (true, false) => Decision::act(
                    MemberState::Stopped,
                    format!("restore to {target}: stopping PostgreSQL"),
                    vec![stop()],
                ),
                (false, true) => Decision::act(
                    MemberState::Stopped,
                    format!("restore to {target}: giving the leader key up"),
                    vec![Action::ReleaseLeader],
                ),
                (false, false) => Decision::wait(
                    MemberState::Stopped,
                    format!("{}: staying stopped until it is done", intent.describe()),
                ),
            }),
            RestorePhase::Rejoining => {
                if self.restore.recloned.as_deref() == Some(intent.id.as_str()) {
                    return None;
                }
                let restorer = &intent.restorer;
                let leads = cluster
                    .leader
                    .as_ref()
                    .is_some_and(|leader| &leader.name == restorer)
                    && leader_runs_primary(cluster, restorer);
                if !leads {
                    return Some(Decision::wait(
                        MemberState::Stopped,
                        format!("restore to {target}: waiting for {restorer} to lead"),
                    ));
                }
                let leader_timeline = cluster.member(restorer).and_then(|status| status.timeline);
                if let PgProcess::Running(pg) = &observation.pg.process {
                    if pg.role == PgRole::Replica && Some(pg.timeline) == leader_timeline {
                        // Already a copy of the restored leader (an agent restart).
                        self.restore.recloned = Some(intent.id.clone());
                        return None;
                    }
                }
                if pg_up {
                    return Some(Decision::act(
                        MemberState::Stopped,
                        format!("restore to {target}: stopping to re-clone from {restorer}"),
                        vec![stop()],
                    ));
                }
                self.restore.recloned = Some(intent.id.clone());
                Some(Decision::act(
                    MemberState::Cloning,
                    format!("restore to {target}: re-cloning from {restorer}"),
                    vec![Action::CloneFrom(restorer.clone())],
                ))
            }
        }
    }

    fn restore_as_restorer(
        &mut self,
        observation: &Observation,
        cluster: &ClusterView,
        intent: &RestoreIntent,
    ) -> Option<Decision> {
        let target = &intent.target;
        if intent.phase == RestorePhase::Rejoining {
            return self.clear_restore_once_rejoined(observation, cluster, intent);
        }
        let holds_key = cluster.leader.as_ref().is_some_and(|leader| leader.mine);
        if self.restore.restored.as_deref() == Some(intent.id.as_str()) {
            return Some(match &observation.pg.process {
                PgProcess::Running(pg) if pg.role == PgRole::Primary && holds_key => {
                    // Done: from here on, a missing intent is the normal end.
                    self.restore.restored = None;
                    let entry = HistoryEntry {
                        timeline: pg.timeline.saturating_sub(1),
                        lsn: pg.write_lsn.unwrap_or_default(),
                        reason: format!("restore to {target}"),
                        time_unix: observation.wall_clock_unix,
                        new_leader: self.identity.name.clone(),
                    };
                    Decision::act(
                        MemberState::Running,
                        format!("restored to {target}: recording it; the others re-clone"),
                        vec![Action::RecordRestore {
                            intent: RestoreIntent {
                                phase: RestorePhase::Rejoining,
                                ..intent.clone()
                            },
                            entry,
                        }],
                    )
                }
                PgProcess::Running(_) | PgProcess::Unresponsive => Decision::wait(
                    MemberState::Starting,
                    format!("restore to {target}: PostgreSQL recovers to the target"),
                ),
                PgProcess::Stopped => Decision::refuse(format!(
                    "restore to {target} failed: PostgreSQL stopped before it reached the target \
                     (see postgresql.log); fix it and restart this agent to retry, or \
                     `jaictl restore --abort`"
                )),
            });
        }
        if observation.pg.process != PgProcess::Stopped {
            return Some(Decision::act(
                MemberState::Stopped,
                format!("restore to {target}: stopping PostgreSQL before restoring"),
                vec![Action::Stop {
                    reason: format!("cluster restore to {target}"),
                    handover_to: None,
                }],
            ));
        }
        let still_up: Vec<&str> = cluster
            .members
            .iter()
            .filter(|status| status.name != self.identity.name)
            .filter(|status| {
                status.state != MemberState::Stopped || status.role == MemberRole::Primary
            })
            .map(|status| status.name.as_str())
            .collect();
        if !still_up.is_empty() {
            return Some(Decision::wait(
                MemberState::Stopped,
                format!(
                    "restore to {target}: waiting for {} to stop",
                    still_up.join(", ")
                ),
            ));
        }
        match &cluster.leader {
            Some(leader) if !leader.mine => {
                return Some(Decision::wait(
                    MemberState::Stopped,
                    format!(
                        "restore to {target}: waiting for {} to give the leader key up",
                        leader.name
                    ),
                ))
            }
            None => {
                return Some(Decision::act(
                    MemberState::Stopped,
                    format!("restore to {target}: taking the leader key"),
                    vec![Action::AcquireLeader],
                ))
            }
            Some(_) => {}
        }
        if !self.lease_allows_writes(observation) {
            return Some(Decision::wait(MemberState::Stopped, LEASE_NOT_CONFIRMED));
        }
        self.restore.restored = Some(intent.id.clone());
        Some(Decision::act(
            MemberState::Starting,
            format!("restoring the backup repository to {target}"),
            vec![Action::RestoreTo(intent.clone())],
        ))
    }

    /// The restorer leads as usual while the others rejoin; once every
    /// registered member streams on its timeline, it removes the intent.
    fn clear_restore_once_rejoined(
        &self,
        observation: &Observation,
        cluster: &ClusterView,
        intent: &RestoreIntent,
    ) -> Option<Decision> {
        let PgProcess::Running(pg) = &observation.pg.process else {
            return None;
        };
        let holds_key = cluster.leader.as_ref().is_some_and(|leader| leader.mine);
        let rejoined = cluster
            .members
            .iter()
            .filter(|status| status.name != self.identity.name)
            .all(|status| {
                status.role == MemberRole::Replica
                    && status.timeline == Some(pg.timeline)
                    && status.streaming == Some(true)
            });
        (holds_key && pg.role == PgRole::Primary && rejoined).then(|| {
            Decision::act(
                MemberState::Running,
                format!(
                    "restore to {}: every member streams again; removing the intent",
                    intent.target
                ),
                vec![Action::ClearRestore],
            )
        })
    }
}
