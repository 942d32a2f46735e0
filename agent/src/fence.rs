//! Self-fencing: a primary whose lease is not confirmed beyond the demotion
//! margin is stopped, whatever else the agent is doing.
//!
//! Three guards share one [`FenceTarget`] (the postmaster running as primary):
//!
//! - the watchdog task ([`run_watchdog`]) compares the lease deadline with
//!   the clock every `FENCE_CHECK_EVERY`, independently of the decision
//!   loop, which may be blocked on a slow etcd request or a long action;
//! - the fence keeper ([`crate::keeper`]), a process of its own, told of
//!   every change of the target and of the lease: it fences at the same
//!   point when the agent is frozen or dead, which stops the two guards
//!   inside it;
//! - the panic hook ([`install_panic_hook`]): a panic anywhere in the agent
//!   (the core's safety assertions panic by design) stops the primary before
//!   the agent dies, then aborts the whole process, so no task keeps running
//!   half-alive. The postmaster lives in a process group of its own and would
//!   otherwise outlive the agent, guarded only by the keeper until the
//!   lease's fencing point.
//!
//! All send SIGINT, PostgreSQL's fast shutdown: every session ends at once,
//! so no write is acknowledged after it.

use crate::dcs::LeaseTracker;
use crate::ha::lease;
use crate::keeper::{self, Guard, KeeperLink};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The primary the guards must stop.
#[derive(Default)]
pub struct FenceTarget {
    /// PID of a postmaster running (or about to run) as primary; 0 when
    /// there is none. `Postgres::start` stores a new primary's PID here at
    /// spawn ([`FenceTarget::guard_new_primary`]), so it is guarded from its
    /// first moment.
    primary_pid: AtomicI32,
    /// Demotion margin in milliseconds.
    margin_ms: AtomicU64,
    /// The driver armed the target at least once: until then the keeper is
    /// told nothing (a keeper replacing a previous agent's waits for it).
    armed: AtomicBool,
    /// The keeper, and the lease whose fencing point it is told.
    keeper: OnceLock<(Arc<LeaseTracker>, Mutex<KeeperLink>)>,
}

impl std::fmt::Debug for FenceTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FenceTarget")
            .field("primary_pid", &self.primary_pid())
            .field("margin", &self.margin())
            .finish_non_exhaustive()
    }
}

impl FenceTarget {
    /// Hands the target to `keeper` too, with `lease`, whose every change
    /// reaches the keeper at once.
    pub fn attach_keeper(self: &Arc<Self>, lease: Arc<LeaseTracker>, keeper: KeeperLink) {
        let target = Arc::downgrade(self);
        lease.on_change(move || {
            if let Some(target) = target.upgrade() {
                target.sync_keeper();
            }
        });
        let _ = self.keeper.set((lease, Mutex::new(keeper)));
    }

    /// Guards `pid` (0: nothing) with `margin`.
    pub fn arm(&self, pid: i32, margin: Duration) {
        self.primary_pid.store(pid, Ordering::SeqCst);
        self.margin_ms
            .store(margin.as_millis() as u64, Ordering::SeqCst);
        self.armed.store(true, Ordering::SeqCst);
        self.sync_keeper();
    }

    /// Guards a postmaster just spawned as primary, before it can take a
    /// write, with the margin last armed.
    pub fn guard_new_primary(&self, pid: i32) {
        self.primary_pid.store(pid, Ordering::SeqCst);
        self.armed.store(true, Ordering::SeqCst);
        self.sync_keeper();
    }

    /// The guarded postmaster's PID; 0: none.
    pub fn primary_pid(&self) -> i32 {
        self.primary_pid.load(Ordering::SeqCst)
    }

    fn margin(&self) -> Duration {
        Duration::from_millis(self.margin_ms.load(Ordering::SeqCst))
    }

    /// Tells the keeper what it guards now and the lease's fencing point
    /// (deadline − margin), unless it knows already; starts a new keeper if
    /// it is gone. Called on every change, and by the watchdog every tick.
    pub fn sync_keeper(&self) {
        let Some((lease, link)) = self.keeper.get() else {
            return;
        };
        if !self.armed.load(Ordering::SeqCst) {
            return;
        }
        let mut link = link.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Read under the lock: the last writer sends the latest state.
        let pid = self.primary_pid();
        let guard = if pid <= 0 {
            Guard::NONE
        } else {
            let fence_at = lease
                .valid_until()
                .and_then(|until| until.checked_sub(self.margin()));
            Guard {
                pid,
                fence_at_ns: fence_at.map_or(0, keeper::monotonic_ns_at),
            }
        };
        link.send(guard);
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
        let guarded = target.primary_pid() > 0;
        if guarded && !lease.is_valid_beyond(target.margin()) {
            if let Some(pid) = target.fence() {
                tracing::error!(
                    pid,
                    "fencing: leader lease not confirmed by etcd; stopping PostgreSQL before the lease can expire"
                );
            }
            wake.notify_one();
        }
        // Also resends what a full pipe held back, and replaces a dead keeper.
        target.sync_keeper();
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
