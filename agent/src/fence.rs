//! Self-fencing: a primary whose lease is not confirmed beyond the demotion
//! margin is stopped, whatever else the agent is doing.
//!
//! Two guards share one [`FenceTarget`] (the postmaster running as primary):
//!
//! - the watchdog task ([`run_watchdog`]) compares the lease deadline with
//!   the clock every `FENCE_CHECK_EVERY`, independently of the decision
//!   loop, which may be blocked on a slow etcd request or a long action;
//! - the panic hook ([`install_panic_hook`]): a panic anywhere in the agent
//!   (the core's safety assertions panic by design) stops the primary before
//!   the agent dies, then aborts the whole process, so no task keeps running
//!   half-alive. The postmaster lives in a process group of its own and would
//!   otherwise outlive the agent unfenced, taking writes that a new leader
//!   would later discard.
//!
//! Both send SIGINT, PostgreSQL's fast shutdown: every session ends at once,
//! so no write is acknowledged after it.

use crate::dcs::LeaseTracker;
use crate::ha::lease;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The primary the guards must stop.
#[derive(Debug, Default)]
pub struct FenceTarget {
    /// PID of a postmaster running (or about to run) as primary; 0 when
    /// there is none. `Postgres::start` stores a new primary's PID here at
    /// spawn, so it is guarded from its first moment.
    pub primary_pid: AtomicI32,
    /// Demotion margin in milliseconds.
    margin_ms: AtomicU64,
}

impl FenceTarget {
    /// Guards `pid` (0: nothing) with `margin`.
    pub fn arm(&self, pid: i32, margin: Duration) {
        self.primary_pid.store(pid, Ordering::SeqCst);
        self.margin_ms
            .store(margin.as_millis() as u64, Ordering::SeqCst);
    }

    fn margin(&self) -> Duration {
        Duration::from_millis(self.margin_ms.load(Ordering::SeqCst))
    }

    /// Sends the guarded postmaster SIGINT and forgets it. Returns its PID,
    /// or `None` when nothing was guarded.
    pub fn fence(&self) -> Option<i32> {
        let pid = self.primary_pid.swap(0, Ordering::SeqCst);
        if pid <= 0 {
            return None;
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGINT,
        );
        Some(pid)
    }
}

/// Stops the guarded primary once its lease is not confirmed beyond the
/// demotion margin, then wakes the loop.
pub async fn run_watchdog(
    lease: Arc<LeaseTracker>,
    target: Arc<FenceTarget>,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(lease::FENCE_CHECK_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let guarded = target.primary_pid.load(Ordering::SeqCst) > 0;
        if guarded && !lease.is_valid_beyond(target.margin()) {
            if let Some(pid) = target.fence() {
                tracing::error!(
                    pid,
                    "fencing: leader lease not confirmed by etcd; stopping PostgreSQL before the lease can expire"
                );
            }
            wake.notify_one();
        }
    }
}

/// A panic anywhere in the agent fences the guarded primary first, lets
/// the previous hook report the panic, then aborts the process.
pub fn install_panic_hook(target: Arc<FenceTarget>) {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let fenced = target.fence();
        report(info);
        match fenced {
            Some(pid) => eprintln!(
                "jai-agent: panicked: PostgreSQL (pid {pid}) was running as primary and got a fast shutdown (SIGINT) first; aborting"
            ),
            None => eprintln!("jai-agent: panicked; no primary to fence; aborting"),
        }
        std::process::abort();
    }));
}
