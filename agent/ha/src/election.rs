//! Who may take the leader key when nobody holds it.
//!
//! Every eligible replica judges itself against the others with the same rule,
//! so in a quiet cluster exactly one of them races; the etcd transaction on the
//! key settles any race that stale positions still allow.

use super::model::{ClusterView, Identity, RunningPostgres};
use jai_proto::{Lsn, MemberRole, MemberState, MemberStatus};
use std::cmp::Reverse;

/// Why this member is not the one to take the key.
pub type NotEligible = String;

/// How good a candidate is; the greatest wins. Timeline first (a member on an
/// older timeline misses a promotion), then WAL position, then the former
/// leader (a restarted cluster keeps its primary), then `failover_priority`,
/// then the name, so that a tie always has exactly one winner.
type Rank<'a> = (u32, Lsn, bool, u32, Reverse<&'a str>);

/// `Ok` when this member is eligible and ranks first among the running
/// eligible replicas; otherwise the reason it must not race.
pub fn judge(
    identity: &Identity,
    pg: &RunningPostgres,
    cluster: &ClusterView,
) -> Result<(), NotEligible> {
    check_eligible(identity, pg, cluster, Override::None)?;
    let position = pg.wal_position();
    let former_leader = cluster
        .last_leader
        .as_ref()
        .map(|last| last.leader.as_str());
    let my_rank: Rank = (
        pg.timeline,
        position,
        former_leader == Some(identity.name.as_str()),
        identity.tags.failover_priority,
        Reverse(identity.name.as_str()),
    );
    for other in cluster.members.iter().filter(|m| m.name != identity.name) {
        // A member standing down stops its primary before it releases the key,
        // so its last report of a running primary is already stale.
        let runs_primary = other.role == MemberRole::Primary && other.state == MemberState::Running;
        if runs_primary && !other.standing_down {
            return Err(format!("{} still reports a running primary", other.name));
        }
        if super::sync::allows_promotion(cluster, &other.name).is_err() {
            continue;
        }
        if let Some(rank) = candidate_rank(other, former_leader) {
            if rank > my_rank {
                return Err(format!(
                    "{} is a better candidate (timeline {}, position {})",
                    other.name, rank.0, rank.1
                ));
            }
        }
    }
    Ok(())
}

/// Whether an operator overrode the rules that protect acknowledged writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Override {
    /// All rules apply.
    None,
    /// A forced failover: the operator accepts this member's lag, and that
    /// it may not be a synchronous standby. The rules that keep one writer
    /// (the key, the lease) are never waived.
    Forced,
}

/// The rules every member taking the key must pass, whoever chose it: not
/// tagged `nofailover`, not on a timeline older than the last leader's, and
/// (unless forced) not further behind it than `maximum_lag_on_failover` —
/// not behind it at all when it stopped cleanly to hand over — and, in
/// synchronous mode, listed in the `sync` key.
pub fn check_eligible(
    identity: &Identity,
    pg: &RunningPostgres,
    cluster: &ClusterView,
    waiver: Override,
) -> Result<(), NotEligible> {
    if identity.tags.nofailover {
        return Err("tagged nofailover".into());
    }
    if waiver == Override::None {
        super::sync::allows_promotion(cluster, &identity.name)?;
    }
    let Some(last) = &cluster.last_leader else {
        return Ok(());
    };
    if pg.timeline < last.timeline {
        return Err(format!(
            "on timeline {}, older than the last leader's {}",
            pg.timeline, last.timeline
        ));
    }
    let behind = last.optime.bytes_since(pg.wal_position());
    // After a switchover's clean stop the old primary's data is intact:
    // taking over without its last writes would lose them for nothing.
    if waiver == Override::None && last.clean_stop && pg.timeline == last.timeline && behind > 0 {
        return Err(format!(
            "{behind} bytes short of {}'s final position {} (it stopped cleanly to hand over)",
            last.leader, last.optime
        ));
    }
    if waiver == Override::None
        && pg.timeline == last.timeline
        && behind > cluster.config.maximum_lag_on_failover
    {
        return Err(format!(
            "{behind} bytes behind the last leader's position {}, more than maximum_lag_on_failover ({})",
            last.optime, cluster.config.maximum_lag_on_failover
        ));
    }
    Ok(())
}

/// Whether another member could be promoted now: a running replica that is
/// neither tagged `nofailover` nor standing down.
pub fn is_candidate(member: &MemberStatus) -> bool {
    !member.tags.nofailover
        && !member.standing_down
        && member.role == MemberRole::Replica
        && member.state == MemberState::Running
}

/// The rank of another member, or `None` when it cannot be promoted.
fn candidate_rank<'a>(member: &'a MemberStatus, former_leader: Option<&str>) -> Option<Rank<'a>> {
    if !is_candidate(member) {
        return None;
    }
    Some((
        member.timeline?,
        member.wal_position()?,
        former_leader == Some(member.name.as_str()),
        member.tags.failover_priority,
        Reverse(member.name.as_str()),
    ))
}
