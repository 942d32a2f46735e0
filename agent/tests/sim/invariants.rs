//! The safety invariants (docs/architecture.md, "Safety invariants"), checked by the world after every
//! event (one writer) or by the shell before an irreversible action (the key),
//! and the healthy-leader test of the liveness check.

use super::agent::Agent;
use super::env::Env;
use super::etcd::{self, Key, Kv, Value};
use super::postgres::Wal;
use super::ViolationKind;
use jai_agent::ha::ClusterView;

impl Env {
    /// §3.2: `Promote` / `Start(Primary)` only while holding the leader key in
    /// etcd, or (for a start) while bootstrapping on the member's own lease.
    pub fn check_may_run_primary(
        &mut self,
        member: usize,
        name: &str,
        lease: Option<etcd::LeaseId>,
        start: bool,
    ) {
        let own = |kv: &etcd::Kv, value: &str| {
            lease.is_some() && kv.lease == lease && kv.value == Value::Text(value.to_owned())
        };
        let holds_key = self.etcd.get(&Key::Leader).is_some_and(|kv| own(kv, name));
        let bootstrapping = start
            && self
                .etcd
                .get(&Key::Initialize)
                .is_some_and(|kv| own(kv, ""));
        if !holds_key && !bootstrapping {
            let holder = match self.etcd.get(&Key::Leader) {
                Some(kv) => format!("{:?} on lease {:x?}", kv.value, kv.lease),
                None => "nobody".into(),
            };
            let what = if start { "Start(Primary)" } else { "Promote" };
            self.violate(
                ViolationKind::PrimaryWithoutKey,
                format!(
                    "{} executes {what} on lease {lease:x?}, but the leader key is held by {holder}",
                    self.names[member]
                ),
            );
        }
    }

    /// §3.1: at most one server accepts writes.
    pub(super) fn check_one_writer(&mut self) {
        let writers: Vec<usize> = (0..self.pgs.len())
            .filter(|index| self.pgs[*index].accepts_writes())
            .collect();
        if writers.len() > 1 {
            let who: Vec<String> = writers
                .iter()
                .map(|index| {
                    let wal = self.pgs[*index]
                        .files()
                        .map(|files| files.wal.describe())
                        .unwrap_or_default();
                    format!("{} {wal}", self.names[*index])
                })
                .collect();
            let holder = match self.etcd.get(&Key::Leader) {
                Some(kv) => format!("{:?}", kv.value),
                None => "nobody".into(),
            };
            self.violate(
                ViolationKind::TwoWriters,
                format!(
                    "{} accept writes at once (leader key: {holder})",
                    who.join(" and ")
                ),
            );
        }
    }

    /// A healthy leader: holds the key on its agent's lease and its server
    /// accepts writes.
    pub(super) fn healthy_leader(&self, agents: &[Option<Agent>]) -> Option<usize> {
        let kv = self.etcd.get(&Key::Leader)?;
        let Value::Text(name) = &kv.value else {
            return None;
        };
        let member = self.member_index(name)?;
        let agent = agents[member].as_ref()?;
        (agent.lease_id.is_some()
            && agent.lease_id == kv.lease
            && self.pgs[member].accepts_writes())
        .then_some(member)
    }
}

/// A switchover under way: its leader's clean stop, and what it left.
#[derive(Debug, Clone)]
pub(crate) struct Handover {
    pub(super) from: usize,
    target: Option<usize>,
    /// The target streamed from the leader when its stop began.
    target_streaming: bool,
    /// When the operator wrote the intent it carries out.
    asked_at: u64,
    /// The intent was forced: the operator accepted a target that lags
    /// (`jaictl switchover --force`), so losing what it missed is allowed.
    forced: bool,
    /// Set when the stop ends.
    end: Option<HandoverEnd>,
    /// When the old leader's release of the key applied in etcd, while no
    /// member took the key since.
    released_at: Option<u64>,
}

/// How a postmaster went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopKind {
    /// A fast shutdown that ended by itself, its walsenders done.
    Clean,
    /// A fast shutdown escalated to an immediate one.
    Immediate,
    /// PostgreSQL (or the node) died.
    Crash,
}

#[derive(Debug, Clone)]
struct HandoverEnd {
    /// The old primary's WAL at its stop: every write it acknowledged.
    wal: Wal,
    /// How it stopped.
    how: StopKind,
    /// The standbys streaming from it at the end.
    streaming: Vec<usize>,
}

impl Env {
    /// A leader begins the stop of a switchover to `target`: remembered for
    /// the lost-write check. The intent it carries out must not have made
    /// another member leader already (it would fire twice).
    pub fn begin_handover(&mut self, member: usize, target: &str) {
        self.stats.handovers += 1;
        let forced = matches!(
            self.etcd.get(&Key::Switchover),
            Some(Kv { value: Value::Switchover(intent), .. }) if intent.force
        );
        if let Some(kv) = self.etcd.get(&Key::Switchover) {
            let revision = kv.create_revision;
            if self.intents_fired.contains(&revision) {
                self.violate(
                    ViolationKind::IntentTwice,
                    format!(
                        "{} hands over again for the switchover intent of revision {revision}, \
                         after another member already took the leader key for it",
                        self.names[member]
                    ),
                );
            }
        }
        let target = self.member_index(target);
        let target_streaming = target.is_some_and(|target| {
            self.standby_links(member)
                .iter()
                .any(|link| link.name == self.names[target] && link.is_streaming())
        });
        self.log(format!(
            "{}: switchover stop begins (target {target:?} streaming: {target_streaming})",
            self.names[member]
        ));
        self.maybe_crash_handover_target(target);
        self.handover = Some(Handover {
            from: member,
            target,
            target_streaming,
            asked_at: self.intent_written_at,
            forced,
            end: None,
            released_at: None,
        });
    }

    /// The postmaster of `member` goes away: the end of a switchover's stop.
    pub(super) fn note_stop(&mut self, member: usize, how: StopKind) {
        let clean = how == StopKind::Clean;
        let streaming = self.walsenders(member);
        let Some(wal) = self.pgs[member].files().map(|files| files.wal.clone()) else {
            return;
        };
        if let Some(handover) = self
            .handover
            .as_mut()
            .filter(|handover| handover.from == member && handover.end.is_none())
        {
            if clean {
                self.stats.clean_handovers += 1;
            }
            let names: Vec<&str> = streaming.iter().map(|i| self.names[*i].as_str()).collect();
            let text = format!(
                "{}: switchover stop ends {} at {}, streaming: {names:?}",
                self.names[member],
                format!("{how:?}").to_lowercase(),
                wal.describe()
            );
            handover.end = Some(HandoverEnd {
                wal,
                how,
                streaming,
            });
            self.log(text);
        }
    }

    /// The first promotion after a switchover's stop keeps every write the
    /// old primary acknowledged if it streamed from it to the end of a clean
    /// stop. The target that streamed when the stop began but missed its end
    /// is counted (fatal with `strict_switchover`, unless the old primary
    /// crashed). `wal` is the promoting standby's WAL before the promotion.
    pub(super) fn check_switchover_kept_writes(&mut self, member: usize, wal: &Wal) {
        let Some(handover) = self.handover.take() else {
            return;
        };
        let Some(end) = handover.end.filter(|_| handover.from != member) else {
            return;
        };
        let streamed_to_the_end = end.how == StopKind::Clean && end.streaming.contains(&member);
        let streamed_at_start = handover.target == Some(member) && handover.target_streaming;
        let kept = !wal.diverges_from(&end.wal) && wal.lsn >= end.wal.lsn;
        if kept || !(streamed_to_the_end || streamed_at_start) {
            return;
        }
        let how = match (streamed_to_the_end, end.how) {
            (true, _) => "although it streamed to the end of a clean stop",
            (false, StopKind::Clean) => "it disconnected during the old primary's clean stop",
            (false, StopKind::Immediate) => {
                "the old primary's fast shutdown was escalated to an immediate one after retry_timeout"
            }
            (false, StopKind::Crash) => "the old primary crashed during its stop",
        };
        let message = format!(
                "switchover from {} to {}: {} promotes at {} without the old primary's acknowledged writes up to {} ({how})",
                self.names[handover.from],
                handover.target.map_or("any", |target| self.names[target].as_str()),
                self.names[member],
                wal.describe(),
                end.wal.describe()
            );
        // The old primary crashing is a failover: asynchronous replication
        // loses what the standbys had not received. A forced intent accepted
        // a target that lags.
        let strict = self.strict_switchover && end.how != StopKind::Crash && !handover.forced;
        if streamed_to_the_end || strict {
            self.violate(ViolationKind::LostWrites, message);
        } else {
            self.stats.switchover_losses += 1;
            self.log(format!("LOST WRITES {message}"));
        }
    }

    /// `member` took the leader key: a switchover intent away from another
    /// member has fired.
    pub(super) fn on_leader_acquired(&mut self, member: usize) {
        if let Some(handover) = &mut self.handover {
            handover.released_at = None;
        }
        if let Some(kv) = self.etcd.get(&Key::Switchover) {
            let from = match &kv.value {
                Value::Switchover(intent) => intent.from.as_deref(),
                _ => None,
            };
            if from.is_some_and(|from| from != self.names[member]) {
                self.intents_fired.insert(kv.create_revision);
            }
        }
    }

    /// `member` tries to take the leader key having read `view` (and seen
    /// its PostgreSQL run as a `primary` or not): in maintenance mode only
    /// the target of an operator's intent (any member for an intent without
    /// a target) may, besides a primary reclaiming it (seen running: it may
    /// be stopping by now). (A member that read the cluster just before the pause
    /// may still take the key: the acquisition is not guarded by `config`.)
    pub fn check_paused_takeover(&mut self, member: usize, view: &ClusterView, primary: bool) {
        if !view.config.pause || primary {
            return;
        }
        let name = &self.names[member];
        let targeted = view
            .switchover
            .as_ref()
            .is_some_and(|intent| intent.to.as_ref().is_none_or(|to| to == name));
        if !targeted {
            self.violate(
                ViolationKind::PausedTakeover,
                format!("{name} takes the leader key in maintenance mode without an intent for it"),
            );
        }
    }

    /// `member` released the leader key.
    pub(super) fn on_leader_released(&mut self, member: usize) {
        let now = self.now;
        if let Some(handover) = self.handover.as_mut().filter(|h| h.from == member) {
            handover.released_at = Some(now);
        }
    }

    /// When maintenance mode ends: a switchover whose leader released the
    /// key during it, with no fault since the intent was written, must have a new
    /// leader within `2 * ttl` of the release (an operator's intent is
    /// carried out even in maintenance mode).
    pub(super) fn check_switchover_completed(&mut self, ttl_ms: u64) {
        let Some(handover) = &self.handover else {
            return;
        };
        let Some(released_at) = handover.released_at else {
            return;
        };
        if handover.asked_at > self.last_fault_at && self.now >= released_at + 2 * ttl_ms {
            let message = format!(
                "{} released the leader key for a switchover {}ms before maintenance mode ended, \
                 with no fault since the intent was written, and no member took it",
                self.names[handover.from],
                self.now - released_at
            );
            self.violate(ViolationKind::StalledSwitchover, message);
        }
    }

    /// At the end of a history with a leader: no intent is left over.
    pub(super) fn leftover_intent(&self) -> Option<String> {
        match self.etcd.get(&Key::Switchover).map(|kv| &kv.value) {
            Some(Value::Switchover(intent)) => Some(format!("{intent:?}")),
            _ => None,
        }
    }
}
