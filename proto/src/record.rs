//! The small records the leader keeps under `status` and `history`.

use crate::Lsn;
use serde::{Deserialize, Serialize};

/// The value of `status`: the leader's last published WAL position.
///
/// Replicas judge their own lag against it when the leader is gone
/// (`maximum_lag_on_failover`), and a restarted cluster uses `leader` to
/// prefer the former leader among equally advanced members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderStatus {
    /// The member that wrote it.
    pub leader: String,
    /// Its timeline then.
    pub timeline: u32,
    /// Its `pg_current_wal_lsn()` then.
    pub optime: Lsn,
    /// The leader stopped cleanly at `optime` to hand over (a switchover):
    /// every write it acknowledged is at or before `optime` and its data is
    /// intact, so no member short of `optime` may take over unless forced.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clean_stop: bool,
}

/// One entry of `history`: a promotion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The timeline the cluster left.
    pub timeline: u32,
    /// Where it left it.
    pub lsn: Lsn,
    /// Why: "failover from <member>", "restart of the former leader", …
    pub reason: String,
    /// When, as seconds since the Unix epoch.
    pub time_unix: u64,
    /// The member that became leader.
    pub new_leader: String,
}

/// The value of `sync`: the standbys the leader's commits wait for.
///
/// The leader writes a standby here *before* it lists it in
/// `synchronous_standby_names`, and unlists it there *before* it removes it
/// here (docs/architecture.md, "Safety invariants", §3.3), so every standby
/// that ever acknowledged a commit is in this key. In synchronous mode only
/// these members (or `leader`) may be promoted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    /// The leader that wrote it.
    pub leader: String,
    /// Its synchronous standbys.
    pub members: Vec<String>,
}

impl SyncState {
    /// `name` holds every commit the leader acknowledged: a listed standby,
    /// or the leader itself.
    pub fn has_every_commit(&self, name: &str) -> bool {
        self.leader == name || self.members.iter().any(|member| member == name)
    }
}

/// The value of `switchover`: an operator's request to hand leadership over.
///
/// Written by an agent's control API after checking it, carried out by the
/// leader it names in `from` (a planned switchover), or — with no leader —
/// by the member named in `to` (a manual failover). The new leader deletes it
/// once it leads, so it can never fire twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchoverIntent {
    /// The leader that must hand over; `None` for a failover without a leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The member to take over; `None`: the best eligible replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Not before this instant (seconds since the Unix epoch); `None`: at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_at_unix: Option<u64>,
    /// When the request was recorded, for operators.
    pub requested_at_unix: u64,
    /// The target may be behind the last known leader position (a forced
    /// failover). Never skips the checks that keep one writer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

impl SwitchoverIntent {
    /// In words, for logs and `jaictl`: "from pg1 to pg2 at 2026-…Z".
    pub fn describe(&self) -> String {
        let from = self.from.as_deref().unwrap_or("(no leader)");
        let to = self.to.as_deref().unwrap_or("the best replica");
        match self.scheduled_at_unix {
            Some(at) => format!("from {from} to {to} at {}", format_unix(at)),
            None => format!("from {from} to {to}"),
        }
    }

    /// The intent is due at `now_unix` (wall-clock seconds).
    pub fn is_due(&self, now_unix: u64) -> bool {
        self.scheduled_at_unix.is_none_or(|at| at <= now_unix)
    }
}

/// Seconds since the Unix epoch as RFC 3339 UTC, e.g. `2026-11-27T05:00:00Z`.
pub fn format_unix(seconds: u64) -> String {
    let at = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(seconds);
    humantime_serde::re::humantime::format_rfc3339_seconds(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scheduled_intent_is_due_only_from_its_time() {
        let intent = SwitchoverIntent {
            from: Some("pg1".into()),
            to: None,
            scheduled_at_unix: Some(100),
            requested_at_unix: 50,
            force: false,
        };
        assert!(!intent.is_due(99));
        assert!(intent.is_due(100));
        let now = SwitchoverIntent {
            scheduled_at_unix: None,
            ..intent
        };
        assert!(now.is_due(0));
    }

    #[test]
    fn intents_read_as_operators_say_them() {
        let intent = SwitchoverIntent {
            from: Some("pg1".into()),
            to: None,
            scheduled_at_unix: Some(0),
            requested_at_unix: 0,
            force: false,
        };
        assert_eq!(
            intent.describe(),
            "from pg1 to the best replica at 1970-01-01T00:00:00Z"
        );
    }
}

/// The value of `restore`: the whole cluster goes back to a point in time
/// (`jaictl restore --time T`).
///
/// While it exists no member elects, starts or promotes on its own: every
/// member but `restorer` stops PostgreSQL and gives the leader key up; the
/// restorer takes the key once every other member reports stopped, restores
/// the backup repository to `target` and lets PostgreSQL promote itself at
/// the target on a new timeline; then (phase `rejoining`) the others re-clone
/// from it, and the restorer removes the intent once they all stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreIntent {
    /// Unique per request.
    pub id: String,
    /// The recovery target as pgBackRest and PostgreSQL take it
    /// (`2026-12-03 14:02:00+00`).
    pub target: String,
    /// The same instant, as Unix seconds (checked against the repository).
    pub target_unix: u64,
    /// The member that restores and leads afterwards.
    pub restorer: String,
    /// When it was requested (Unix seconds).
    pub requested_at: u64,
    /// How far it got.
    pub phase: RestorePhase,
}

/// The phases of a [`RestoreIntent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestorePhase {
    /// Every member stops; the restorer then restores and promotes.
    Stopping,
    /// The restorer leads on the restored data; the others re-clone.
    Rejoining,
}

impl RestoreIntent {
    /// The intent in words, for status lines and logs.
    pub fn describe(&self) -> String {
        let phase = match self.phase {
            RestorePhase::Stopping => "stopping every member, then restoring",
            RestorePhase::Rejoining => "restored; the other members re-clone",
        };
        format!("restore to {} on {}: {phase}", self.target, self.restorer)
    }
}
