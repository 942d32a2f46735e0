//! Synchronous replication: which standbys the leader's commits wait for, and
//! who may be promoted because of it (docs/architecture.md, "Synchronous
//! replication"; invariant §3.3 of "Safety invariants").
//!
//! Two places say who is synchronous: the `sync` key in etcd (what failover
//! trusts) and PostgreSQL's `synchronous_standby_names` (what commits wait
//! for). The rule that makes failover lossless is their order: a standby is
//! written to the key *before* it is listed in PostgreSQL, and unlisted in
//! PostgreSQL *before* it leaves the key. So the key always contains every
//! standby that may have acknowledged a commit, and promoting only members of
//! the key (or the leader itself) never loses an acknowledged write.

use super::model::{Action, ClusterView, Identity, Initialize, RunningPostgres, SyncNames};
use jai_proto::{SyncState, SynchronousMode};

/// Whether `name` may become leader under the cluster's synchronous mode:
/// always when it is off or no leader has written the `sync` key yet;
/// otherwise only the standbys in the key and the leader that wrote it.
pub fn allows_promotion(cluster: &ClusterView, name: &str) -> Result<(), String> {
    if !cluster.config.synchronous_mode.is_on() {
        return Ok(());
    }
    match &cluster.sync {
        Some(sync) if !sync.has_every_commit(name) => Err(format!(
            "not a synchronous standby (sync: {}): it may miss acknowledged commits",
            describe(sync)
        )),
        _ => Ok(()),
    }
}

/// The key's members, as operators read them.
pub fn describe(sync: &SyncState) -> String {
    if sync.members.is_empty() {
        format!("none; leader {}", sync.leader)
    } else {
        sync.members.join(", ")
    }
}

/// `synchronous_standby_names` for this member the moment it becomes a
/// primary (start as primary, promotion), before its first round as leader
/// adjusts it: what the key it wrote last says, so that no commit slips
/// through unprotected in between; in strict mode with nobody listed, any
/// standby.
pub fn names_for_new_primary(me: &str, cluster: &ClusterView) -> SyncNames {
    let mode = cluster.config.synchronous_mode;
    // The bootstrap's own commits (the replication role) come before any
    // standby can exist: waiting for one would wait forever.
    let bootstrapped = matches!(cluster.initialize, Some(Initialize::Done { .. }));
    if !mode.is_on() || !bootstrapped {
        return SyncNames::Off;
    }
    let listed: Vec<String> = cluster
        .sync
        .as_ref()
        .filter(|sync| sync.leader == me)
        .map(|sync| sync.members.clone())
        .unwrap_or_default();
    match (listed.is_empty(), mode) {
        (false, _) => SyncNames::First {
            count: cluster.config.synchronous_node_count,
            names: listed,
        },
        (true, SynchronousMode::Strict) => SyncNames::AnyStandby,
        (true, _) => SyncNames::Off,
    }
}

/// The leader's synchronous-replication duty for this round: actions in the
/// order that keeps the key a superset of what PostgreSQL waits for, and a
/// reason when commits are not (or not fully) protected.
pub fn leader_plan(
    identity: &Identity,
    cluster: &ClusterView,
    pg: &RunningPostgres,
) -> (Vec<Action>, Option<String>) {
    let me = identity.name.as_str();
    let mode = cluster.config.synchronous_mode;
    let mine = cluster.sync.as_ref().filter(|sync| sync.leader == me);
    if !mode.is_on() {
        let mut actions = Vec::new();
        if pg.sync_names != SyncNames::Off {
            actions.push(Action::SetSyncNames(SyncNames::Off));
        }
        if cluster.sync.is_some() {
            actions.push(Action::ClearSync);
        }
        return (actions, None);
    }
    let listed: Vec<String> = mine.map(|sync| sync.members.clone()).unwrap_or_default();
    let chosen = choose_standbys(cluster, pg, &listed);
    let count = cluster.config.synchronous_node_count;
    let (names, keep, reason) = if chosen.is_empty() {
        match mode {
            SynchronousMode::Strict if listed.is_empty() => (
                SyncNames::AnyStandby,
                listed.clone(),
                Some(
                    "synchronous_mode strict: no eligible standby; commits wait until one streams"
                        .into(),
                ),
            ),
            SynchronousMode::Strict => (
                SyncNames::First {
                    count,
                    names: listed.clone(),
                },
                listed.clone(),
                Some(format!(
                    "synchronous_mode strict: no eligible standby; commits wait for {}",
                    listed.join(", ")
                )),
            ),
            _ => (
                SyncNames::Off,
                Vec::new(),
                Some(
                    "synchronous_mode on: no eligible standby (streaming, not nosync, within \
                     maximum_lag_on_syncnode): running asynchronously, no automatic failover"
                        .into(),
                ),
            ),
        }
    } else {
        let reason = (chosen.len() < count as usize).then(|| {
            format!(
                "synchronous_mode: {} of synchronous_node_count {count} standbys eligible",
                chosen.len()
            )
        });
        (
            SyncNames::First {
                count: count.min(chosen.len() as u32),
                names: chosen.clone(),
            },
            chosen,
            reason,
        )
    };
    let mut widened = listed.clone();
    for name in &keep {
        if !widened.contains(name) {
            widened.push(name.clone());
        }
    }
    let mut actions = Vec::new();
    if mine.is_none() || widened != listed {
        actions.push(Action::WriteSync(SyncState {
            leader: me.to_owned(),
            members: widened.clone(),
        }));
    }
    if pg.sync_names != names {
        actions.push(Action::SetSyncNames(names));
    }
    if widened != keep {
        actions.push(Action::WriteSync(SyncState {
            leader: me.to_owned(),
            members: keep,
        }));
    }
    (actions, reason)
}

/// The standbys to wait for: streaming from this primary, registered, not
/// tagged `nosync`, not standing down, within `maximum_lag_on_syncnode`.
/// Those already listed come first (no needless churn), then the least
/// behind, then by name; at most `synchronous_node_count`.
fn choose_standbys(cluster: &ClusterView, pg: &RunningPostgres, listed: &[String]) -> Vec<String> {
    let position = pg.wal_position();
    let mut eligible: Vec<(bool, u64, &str)> = pg
        .standbys
        .iter()
        .filter(|link| link.is_streaming())
        .filter_map(|link| {
            let member = cluster.member(&link.name)?;
            if member.tags.nosync || member.standing_down {
                return None;
            }
            let behind = position.bytes_since(link.flush_lsn.unwrap_or_default());
            (behind <= cluster.config.maximum_lag_on_syncnode).then_some((
                !listed.contains(&link.name),
                behind,
                link.name.as_str(),
            ))
        })
        .collect();
    eligible.sort();
    eligible
        .into_iter()
        .take(cluster.config.synchronous_node_count as usize)
        .map(|(_, _, name)| name.to_owned())
        .collect()
}
