//! The safety invariants of DESIGN.md §3, checked by the world after every
//! event (one writer) or by the shell before an irreversible action (the key),
//! and the healthy-leader test of the liveness check.

use super::agent::Agent;
use super::env::Env;
use super::etcd::{self, Key, Value};
use super::ViolationKind;

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
