//! The operator: `jaictl` calls on the control API (`agent/src/control.rs`),
//! made at times the fault schedule draws.
//!
//! Like the control service, the operator reads the cluster from etcd, checks
//! the request against what it read with the same rules, then writes with the
//! same guards a few milliseconds later: an intent only if none is pending and
//! the leader key is still as read (`record_switchover`), a cancel as a plain
//! delete, and the pause flag by compare-and-swap on `config`
//! (`update_config`). A refused or failed call is logged and dropped, except
//! turning maintenance mode off, which the operator retries until it sticks.

use super::env::{Env, Event};
use super::etcd::{Key, Reply, Request, Value};
use jai_agent::control::running_primary;
use jai_agent::ha::store::Request as AgentRequest;
use jai_agent::ha::{self, election, ClusterView};
use jai_proto::{DynamicConfig, SwitchoverIntent};

/// How long after a failed attempt the operator turns maintenance mode off again.
const RETRY_RESUME_MS: u64 = 500;

/// One call.
#[derive(Debug, Clone)]
pub enum Call {
    /// `jaictl switchover [--to MEMBER] [--at TIME] [--force]`.
    Switchover {
        /// The target, or the best replica.
        to: Option<usize>,
        /// Scheduled this many seconds ahead (operator's clock).
        in_secs: Option<u64>,
        /// Accept a lagging target.
        force: bool,
    },
    /// `jaictl failover --to MEMBER [--force]`.
    Failover {
        /// The target.
        to: usize,
        /// Accept a lagging target.
        force: bool,
    },
    /// `jaictl switchover --cancel`.
    Cancel,
    /// `jaictl pause` / `jaictl resume`.
    SetPause(bool),
    /// The guarded write that follows a call's read and checks.
    Write {
        /// The transaction.
        request: Request,
        /// What it does, for the trace.
        what: String,
        /// The pause flag it sets, if that is what it does.
        pause: Option<bool>,
    },
}

impl Env {
    /// Runs one operator call now.
    pub(super) fn operator(&mut self, call: Call) {
        if let Call::Write {
            request,
            what,
            pause,
        } = call
        {
            return self.operator_write(request, what, pause);
        }
        let Some(view) = self.operator_view() else {
            self.log("OPERATOR: etcd does not answer".into());
            return self.retry_resume(&call);
        };
        let checked = match &call {
            Call::Switchover { to, in_secs, force } => {
                let to = to.map(|to| self.names[to].clone());
                let at = in_secs.map(|secs| self.wall_clock_unix(None) + secs);
                self.check_switchover(&view, to, at, *force)
            }
            Call::Failover { to, force } => self.check_failover(&view, *to, *force),
            Call::Cancel => match &view.switchover {
                Some(_) => Ok((Request::CancelSwitchover, "cancel the switchover".into())),
                None => Err("no switchover is pending".into()),
            },
            Call::SetPause(pause) => Ok(self.pause_request(*pause)),
            Call::Write { .. } => unreachable!("handled above"),
        };
        match checked {
            Ok((request, what)) => {
                let pause = match call {
                    Call::SetPause(pause) => Some(pause),
                    _ => None,
                };
                let at = self.now + self.rng.range(2, 20);
                let write = Call::Write {
                    request,
                    what,
                    pause,
                };
                self.schedule(at, Event::Operator(Box::new(write)));
            }
            Err(why) => self.log(format!("OPERATOR: {call:?} refused: {why}")),
        }
    }

    /// `read_cluster` from the operator's side (`None` while etcd elects).
    fn operator_view(&mut self) -> Option<ClusterView> {
        if !self.etcd.available(self.now) {
            return None;
        }
        let (Ok(Reply::Kvs(kvs)), _) = self
            .etcd
            .apply(self.now, Request::Agent(AgentRequest::ReadCluster))
        else {
            unreachable!("a read answers the keys");
        };
        Some(ClusterView::from_kvs(
            &kvs,
            None,
            "",
            &DynamicConfig::default(),
        ))
    }

    /// `request_switchover`: the leader must run a primary, nothing may be
    /// pending, and the leader's own handover rule must find a target.
    fn check_switchover(
        &self,
        view: &ClusterView,
        to: Option<String>,
        at_unix: Option<u64>,
        force: bool,
    ) -> Result<(Request, String), String> {
        let leader = view
            .leader
            .as_ref()
            .ok_or("no member holds the leader key")?;
        if view.switchover.is_some() {
            return Err("a switchover is already pending".into());
        }
        let intent = SwitchoverIntent {
            from: Some(leader.name.clone()),
            to,
            scheduled_at_unix: at_unix,
            requested_at_unix: self.wall_clock_unix(None),
            force,
        };
        let leader_pg = view
            .member(&leader.name)
            .and_then(running_primary)
            .ok_or_else(|| format!("leader {} does not report a running primary", leader.name))?;
        // One check against the view of this instant: the control API checks
        // a refusal that may clear again for up to two loops, each check like
        // this one, so the simulated operator covers each of its attempts.
        let target = ha::handover_target(&leader.name, view, &leader_pg, &intent)
            .map_err(|refusal| refusal.why)?;
        let what = format!("record {intent:?} (now {target})");
        let request = Request::RecordSwitchover {
            intent: Box::new(intent),
            leader_term: Some(leader.term),
        };
        Ok((request, what))
    }

    /// `failover`: a switchover when the leader runs, else an intent for a
    /// registered candidate within the lag limit unless forced.
    fn check_failover(
        &self,
        view: &ClusterView,
        to: usize,
        force: bool,
    ) -> Result<(Request, String), String> {
        let name = self.names[to].clone();
        let leader_runs = view.leader.as_ref().is_some_and(|leader| {
            view.member(&leader.name)
                .and_then(running_primary)
                .is_some()
        });
        if leader_runs {
            return self.check_switchover(view, Some(name), None, force);
        }
        if let Some(leader) = &view.leader {
            return Err(format!(
                "{} holds the leader key but runs no primary",
                leader.name
            ));
        }
        let target = view
            .member(&name)
            .ok_or_else(|| format!("{name} is not a registered member"))?;
        if !election::is_candidate(target) {
            return Err(format!(
                "{name} is not a running replica eligible for failover"
            ));
        }
        if let (Some(last), Some(position)) = (&view.last_leader, target.wal_position()) {
            let behind = last.optime.bytes_since(position);
            if behind > view.config.maximum_lag_on_failover && !force {
                return Err(format!("{name} is {behind} bytes behind: needs --force"));
            }
        }
        let intent = SwitchoverIntent {
            from: None,
            to: Some(name),
            scheduled_at_unix: None,
            requested_at_unix: self.wall_clock_unix(None),
            force,
        };
        let what = format!("record {intent:?}");
        Ok((
            Request::RecordSwitchover {
                intent: Box::new(intent),
                leader_term: None,
            },
            what,
        ))
    }

    /// `set_pause`: the config as it is now with `pause` set, written only
    /// if nobody wrote it meanwhile.
    fn pause_request(&self, pause: bool) -> (Request, String) {
        let (config, revision) = match self.etcd.get(&Key::Config) {
            Some(kv) => match &kv.value {
                Value::Config(Ok(config)) => ((**config).clone(), kv.mod_revision),
                other => unreachable!("config holds {other:?}"),
            },
            None => (DynamicConfig::default(), 0),
        };
        let config = Box::new(DynamicConfig { pause, ..config });
        let what = format!("set pause={pause}");
        (Request::SwapConfig { revision, config }, what)
    }

    fn operator_write(&mut self, request: Request, what: String, pause: Option<bool>) {
        let retry = pause.map(Call::SetPause);
        if !self.etcd.available(self.now) {
            self.log(format!("OPERATOR: {what}: etcd does not answer"));
            return retry.iter().for_each(|call| self.retry_resume(call));
        }
        let records = matches!(request, Request::RecordSwitchover { .. });
        let (result, changes) = self.etcd.apply(self.now, request);
        self.publish(changes);
        let done = matches!(result, Ok(Reply::Txn(true)));
        if records && done {
            self.stats.intents += 1;
            self.intent_written_at = self.now;
        }
        self.log(format!(
            "OPERATOR: {what}: {}",
            if done { "done" } else { "refused by the guard" }
        ));
        if done {
            if pause == Some(false) {
                // Liveness counts from the end of maintenance mode.
                self.faults_end = self.faults_end.max(self.now);
                let ttl = DynamicConfig::default().ttl.as_millis() as u64;
                self.check_switchover_completed(ttl);
            }
        } else {
            retry.iter().for_each(|call| self.retry_resume(call));
        }
    }

    /// Turning maintenance mode off is retried until it works.
    fn retry_resume(&mut self, call: &Call) {
        if let Call::SetPause(false) = call {
            let at = self.now + RETRY_RESUME_MS;
            self.faults_end = self.faults_end.max(at);
            self.schedule(at, Event::Operator(Box::new(Call::SetPause(false))));
        }
    }
}
