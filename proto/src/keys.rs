//! The etcd key layout of one cluster (docs/architecture.md, "etcd layout as
//! built").
//!
//! Every key of cluster `c` lives under `/jai/c/`, so one prefix watch sees the
//! whole cluster and two clusters can share one etcd.

/// Builds the etcd keys of one cluster. Cheap to clone; holds only the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterKeys {
    prefix: String,
}

impl ClusterKeys {
    /// Keys of the cluster `cluster` under the default namespace `/jai`.
    pub fn new(cluster: &str) -> Self {
        Self {
            prefix: format!("/jai/{cluster}/"),
        }
    }

    /// The prefix every key of this cluster starts with (ends with `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `leader`: the current leader's member name, on the leader's lease.
    /// Its create revision is the leader's term.
    pub fn leader(&self) -> String {
        format!("{}leader", self.prefix)
    }

    /// `members/`: the prefix of every member's status key.
    pub fn members_prefix(&self) -> String {
        format!("{}members/", self.prefix)
    }

    /// `members/<name>`: one member's [`crate::MemberStatus`], on that member's lease.
    pub fn member(&self, name: &str) -> String {
        format!("{}members/{name}", self.prefix)
    }

    /// `initialize`: the cluster's system identifier once bootstrapped; while a
    /// bootstrap runs it is empty and on the bootstrapping member's lease, so a
    /// bootstrap that dies frees the race by itself.
    pub fn initialize(&self) -> String {
        format!("{}initialize", self.prefix)
    }

    /// `config`: the [`crate::DynamicConfig`] as JSON.
    pub fn config(&self) -> String {
        format!("{}config", self.prefix)
    }

    /// `status`: the leader's last known WAL position ([`crate::LeaderStatus`]).
    pub fn status(&self) -> String {
        format!("{}status", self.prefix)
    }

    /// `history`: the list of [`crate::HistoryEntry`], one per promotion.
    pub fn history(&self) -> String {
        format!("{}history", self.prefix)
    }

    /// `switchover`: a pending switchover intent.
    pub fn switchover(&self) -> String {
        format!("{}switchover", self.prefix)
    }

    /// `sync`: the leader and its synchronous standbys.
    pub fn sync(&self) -> String {
        format!("{}sync", self.prefix)
    }

    /// `restore`: a pending [`crate::RestoreIntent`].
    pub fn restore(&self) -> String {
        format!("{}restore", self.prefix)
    }

    /// `backup/job`: the one [`crate::BackupJob`] requested or running.
    pub fn backup_job(&self) -> String {
        format!("{}backup/job", self.prefix)
    }

    /// `backup/last`: the [`crate::JobResult`] of the last backup job.
    pub fn backup_last(&self) -> String {
        format!("{}backup/last", self.prefix)
    }

    /// `backup/archive`: the leader's [`crate::ArchiveStatus`].
    pub fn backup_archive(&self) -> String {
        format!("{}backup/archive", self.prefix)
    }

    /// `backup/last_verify`: the [`crate::JobResult`] of the last restore drill.
    pub fn backup_last_verify(&self) -> String {
        format!("{}backup/last_verify", self.prefix)
    }

    /// The member name of a `members/<name>` key, or `None` for any other key.
    pub fn member_name_of<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(&self.prefix)?
            .strip_prefix("members/")
            .filter(|name| !name.is_empty() && !name.contains('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_live_under_the_cluster_prefix() {
        let keys = ClusterKeys::new("votes");
        assert_eq!(keys.leader(), "/jai/votes/leader");
        assert_eq!(keys.member("pg1"), "/jai/votes/members/pg1");
        assert_eq!(keys.initialize(), "/jai/votes/initialize");
        assert!(keys.history().starts_with(keys.prefix()));
    }

    #[test]
    fn member_names_are_recovered_from_keys() {
        let keys = ClusterKeys::new("votes");
        assert_eq!(keys.member_name_of("/jai/votes/members/pg1"), Some("pg1"));
        assert_eq!(keys.member_name_of("/jai/votes/members/"), None);
        assert_eq!(keys.member_name_of("/jai/other/members/pg1"), None);
        assert_eq!(keys.member_name_of("/jai/votes/leader"), None);
    }
}
