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
