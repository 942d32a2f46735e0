//! Who may take the leader key when nobody holds it.
//!
//! Every eligible replica judges itself against the others with the same rule,
//! so in a quiet cluster exactly one of them races; the etcd transaction on the
//! key settles any race that stale positions still allow.

use super::model::{ClusterView, Identity, RunningPostgres};
use jai_proto::{Lsn, MemberRole, MemberState, MemberStatus};
use std::cmp::Reverse;
use std::fmt;

/// Why this member is not the one to take the key: one variant per rule.
/// `Display` gives the sentence operators read in the decision's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotEligible {
    /// Tagged `nofailover`.
    TaggedNoFailover,
    /// In synchronous mode, not in the `sync` key: it may miss acknowledged
    /// commits. Carries [`super::sync::allows_promotion`]'s reason.
    NotSynchronous(String),
    /// On a timeline older than the last leader's: it missed a promotion.
    OlderTimeline {
        /// This member's timeline.
        timeline: u32,
        /// The last leader's.
        last_leader: u32,
    },
    /// The last leader stopped cleanly to hand over and this member has not
    /// received all of it: taking over would lose its last writes for nothing.
    ShortOfCleanStop {
        /// How many bytes it lacks.
        behind: u64,
        /// The leader that stopped.
        leader: String,
        /// Its final position.
        final_position: Lsn,
    },
    /// The target of a switchover has not received all that the leader
    /// handing over to it wrote.
    ShortOfHandover {
        /// How many bytes it lacks.
        missing: u64,
        /// The leader handing over.
        from: String,
        /// Its final position.
        final_position: Lsn,
    },
    /// Further behind the last leader's position than
    /// `maximum_lag_on_failover`.
    TooFarBehind {
        /// How many bytes behind.
        behind: u64,
        /// The last leader's position.
        last_position: Lsn,
        /// `maximum_lag_on_failover`.
        limit: u64,
    },
    /// Another member still reports a running primary.
    PrimaryStillRunning {
        /// That member.
        member: String,
    },
    /// Another running replica ranks higher.
    BetterCandidate {
        /// That member.
        member: String,
        /// Its timeline.
        timeline: u32,
        /// Its WAL position.
        position: Lsn,
    },
}

impl fmt::Display for NotEligible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TaggedNoFailover => f.write_str("tagged nofailover"),
            Self::NotSynchronous(why) => f.write_str(why),
            Self::OlderTimeline {
                timeline,
                last_leader,
            } => write!(
                f,
                "on timeline {timeline}, older than the last leader's {last_leader}"
            ),
            Self::ShortOfCleanStop {
                behind,
                leader,
                final_position,
            } => write!(
                f,
                "{behind} bytes short of {leader}'s final position {final_position} (it stopped cleanly to hand over)"
            ),
            Self::ShortOfHandover {
                missing,
                from,
                final_position,
            } => write!(
                f,
                "{missing} bytes short of {from}'s final position {final_position}"
            ),
            Self::TooFarBehind {
                behind,
                last_position,
                limit,
            } => write!(
                f,
                "{behind} bytes behind the last leader's position {last_position}, more than maximum_lag_on_failover ({limit})"
            ),
            Self::PrimaryStillRunning { member } => {
                write!(f, "{member} still reports a running primary")
            }
            Self::BetterCandidate {
                member,
                timeline,
                position,
            } => write!(
                f,
                "{member} is a better candidate (timeline {timeline}, position {position})"
            ),
        }
    }
}

impl std::error::Error for NotEligible {}

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
            return Err(NotEligible::PrimaryStillRunning {
                member: other.name.clone(),
            });
        }
        if super::sync::allows_promotion(cluster, &other.name).is_err() {
            continue;
        }
        if let Some(rank) = candidate_rank(other, former_leader) {
            if rank > my_rank {
                return Err(NotEligible::BetterCandidate {
                    member: other.name.clone(),
                    timeline: rank.0,
                    position: rank.1,
                });
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
        return Err(NotEligible::TaggedNoFailover);
    }
    if waiver == Override::None {
        super::sync::allows_promotion(cluster, &identity.name)
            .map_err(NotEligible::NotSynchronous)?;
    }
    let Some(last) = &cluster.last_leader else {
        return Ok(());
    };
    if pg.timeline < last.timeline {
        return Err(NotEligible::OlderTimeline {
            timeline: pg.timeline,
            last_leader: last.timeline,
        });
    }
    let behind = last.optime.bytes_since(pg.wal_position());
    // After a switchover's clean stop the old primary's data is intact:
    // taking over without its last writes would lose them for nothing.
    if waiver == Override::None && last.clean_stop && pg.timeline == last.timeline && behind > 0 {
        return Err(NotEligible::ShortOfCleanStop {
            behind,
            leader: last.leader.clone(),
            final_position: last.optime,
        });
    }
    if waiver == Override::None
        && pg.timeline == last.timeline
        && behind > cluster.config.maximum_lag_on_failover
    {
        return Err(NotEligible::TooFarBehind {
            behind,
            last_position: last.optime,
            limit: cluster.config.maximum_lag_on_failover,
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Operators read these sentences in the decision's reason (and the
    /// runbook quotes them): the variants must say exactly what the strings
    /// they replaced said.
    #[test]
    fn each_rule_reads_as_before() {
        let position: Lsn = "0/3000000".parse().unwrap();
        for (why, text) in [
            (NotEligible::TaggedNoFailover, "tagged nofailover"),
            (
                NotEligible::NotSynchronous("not a synchronous standby (sync: pg2)".into()),
                "not a synchronous standby (sync: pg2)",
            ),
            (
                NotEligible::OlderTimeline {
                    timeline: 2,
                    last_leader: 3,
                },
                "on timeline 2, older than the last leader's 3",
            ),
            (
                NotEligible::ShortOfCleanStop {
                    behind: 16,
                    leader: "pg1".into(),
                    final_position: position,
                },
                "16 bytes short of pg1's final position 0/3000000 (it stopped cleanly to hand over)",
            ),
            (
                NotEligible::ShortOfHandover {
                    missing: 16,
                    from: "pg1".into(),
                    final_position: position,
                },
                "16 bytes short of pg1's final position 0/3000000",
            ),
            (
                NotEligible::TooFarBehind {
                    behind: 2048,
                    last_position: position,
                    limit: 1024,
                },
                "2048 bytes behind the last leader's position 0/3000000, more than maximum_lag_on_failover (1024)",
            ),
            (
                NotEligible::PrimaryStillRunning {
                    member: "pg1".into(),
                },
                "pg1 still reports a running primary",
            ),
            (
                NotEligible::BetterCandidate {
                    member: "pg3".into(),
                    timeline: 2,
                    position,
                },
                "pg3 is a better candidate (timeline 2, position 0/3000000)",
            ),
        ] {
            assert_eq!(why.to_string(), text);
        }
    }
}
