//! The fence keeper: a small process beside the agent that stops the primary
//! at its fencing point when the agent does not vouch for the lease in time,
//! whether the agent is frozen (SIGSTOP, a stuck runtime), dead or slow to
//! restart.
//!
//! The agent's own guards (the watchdog task and the panic hook, [`crate::fence`])
//! run inside the agent process: a frozen agent freezes them too, and its
//! postmaster, in a process group of its own, keeps taking writes after the
//! lease expired and another member was promoted. The keeper is the same
//! binary (`jai-agent fence-keeper`, a hidden command), spawned by the agent at
//! start in a process group of its own, so a SIGSTOP of the agent or of its
//! group does not reach it.
//!
//! The agent tells it, over a pipe (the keeper's stdin), one line per change
//! of what the watchdog guards or of the lease: `PID FENCE_AT`, the
//! postmaster running as primary (0: none) and the fencing point (lease
//! deadline − demotion margin) on `CLOCK_MONOTONIC` in nanoseconds, the same
//! clock in every process of the machine (0: at once). The keeper sends that
//! postmaster SIGINT (fast shutdown) the moment the fencing point passes
//! without a newer line: the same point at which the watchdog fences, so a
//! frozen agent's primary stops before its lease can expire in etcd, hence
//! before any other member can be promoted.
//!
//! - End of the pipe (the agent died): the keeper keeps guarding until the
//!   fencing point, or until the postmaster is gone, then exits. A restarted
//!   agent starts its own keeper with `--replaces` the old one (found through
//!   `STATE_DIR/fence-keeper.pid`); the new keeper dismisses the old one
//!   (SIGTERM) once its agent has told it what to guard, so a restart does
//!   not cost the primary it adopted.
//! - The keeper dead (killed, out of memory): the agent starts a new one at
//!   its next write; meanwhile its watchdog still guards.
//! - A PID reused by another process is never signalled: the keeper checks
//!   the process's start time before it signals.

use jai_proto::logging::{LogConfig, LogFormat};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The hidden command of `jai-agent` that runs the keeper.
pub const COMMAND: &str = "fence-keeper";

/// The keeper's PID, in the state directory, for the next agent to replace it.
const PID_FILE: &str = "fence-keeper.pid";

/// After the agent died, how often the keeper checks that the postmaster it
/// guards still runs (it exits once it does not).
const WATCH_EVERY: Duration = Duration::from_millis(100);

/// What the keeper guards, as the agent last said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guard {
    /// The postmaster running as primary; 0: nothing to guard.
    pub pid: i32,
    /// The fencing point on `CLOCK_MONOTONIC`, in nanoseconds; 0: at once.
    pub fence_at_ns: u64,
}

impl Guard {
    /// Nothing to guard.
    pub const NONE: Guard = Guard {
        pid: 0,
        fence_at_ns: 0,
    };

    /// The line the agent writes.
    pub fn line(&self) -> String {
        format!("{} {}\n", self.pid, self.fence_at_ns)
    }

    /// Reads a line the agent wrote.
    pub fn parse(line: &str) -> Option<Guard> {
        let (pid, fence_at) = line.trim().split_once(' ')?;
        Some(Guard {
            pid: pid.parse().ok().filter(|pid| *pid >= 0)?,
            fence_at_ns: fence_at.parse().ok()?,
        })
    }
}

/// `CLOCK_MONOTONIC` now, in nanoseconds: one clock for every process of
/// the machine (it does not count time the machine is suspended, like
/// [`Instant`], which is read from it on Linux).
pub fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always readable");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

/// `instant` on `CLOCK_MONOTONIC`, for the keeper. Anchored once (the raw
/// clock read before the `Instant`), so it never comes out later than the
/// real value, and a given instant always gives the same number.
pub fn monotonic_ns_at(instant: Instant) -> u64 {
    static ANCHOR: OnceLock<(u64, Instant)> = OnceLock::new();
    let (raw, anchor) = *ANCHOR.get_or_init(|| (monotonic_ns(), Instant::now()));
    match instant.checked_duration_since(anchor) {
        Some(after) => raw + after.as_nanos() as u64,
        None => raw.saturating_sub((anchor - instant).as_nanos() as u64),
    }
}

// ---- the agent's side --------------------------------------------------------

/// The agent's end of the pipe to its keeper.
pub struct KeeperLink {
    state_dir: PathBuf,
    log_format: LogFormat,
    child: Option<Child>,
    pipe: Option<ChildStdin>,
    /// What the keeper was last told.
    sent: Option<Guard>,
    /// A failure was logged and no success since.
    failing: bool,
}

impl KeeperLink {
    /// Starts the keeper of the agent whose state directory is `state_dir`.
    /// A keeper left running by a previous agent there is replaced once the
    /// new one has something to guard (or not) from this agent.
    pub fn start(state_dir: &Path, log_format: LogFormat) -> Self {
        let mut link = Self {
            state_dir: state_dir.to_owned(),
            log_format,
            child: None,
            pipe: None,
            sent: None,
            failing: false,
        };
        let orphan = std::fs::read_to_string(link.pid_file())
            .ok()
            .and_then(|text| text.trim().parse::<i32>().ok())
            .filter(|pid| is_keeper(*pid));
        if let Some(pid) = orphan {
            tracing::info!(
                pid,
                "a fence keeper of a previous agent still runs: the new one replaces it"
            );
        }
        link.spawn(orphan);
        link
    }

    fn pid_file(&self) -> PathBuf {
        self.state_dir.join(PID_FILE)
    }

    /// The keeper's PID, while one runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self, replaces: Option<i32>) -> bool {
        // The running binary itself, even if its file was replaced since.
        let mut command = Command::new("/proc/self/exe");
        command
            .arg0("jai-agent")
            .arg(COMMAND)
            .arg("--log-format")
            .arg(self.log_format.name())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .process_group(0);
        if let Some(pid) = replaces {
            command.arg("--replaces").arg(pid.to_string());
        }
        let spawned = command.spawn().and_then(|mut child| {
            let pipe = child.stdin.take().expect("stdin is piped");
            nix::fcntl::fcntl(
                &pipe,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            )?;
            Ok((child, pipe))
        });
        match spawned {
            Ok((child, pipe)) => {
                let pid = child.id();
                if let Err(error) = std::fs::write(self.pid_file(), format!("{pid}\n")) {
                    tracing::warn!(
                        "cannot record the fence keeper's PID in {}: {error} (an agent restarted \
                         later will not replace it; it guards until the lease's fencing point)",
                        self.pid_file().display()
                    );
                }
                tracing::info!(pid, "fence keeper started");
                self.child = Some(child);
                self.pipe = Some(pipe);
                self.sent = None;
                self.failing = false;
                true
            }
            Err(error) => {
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::error!(
                        "cannot start the fence keeper: {error}; retrying (the watchdog inside \
                         the agent still fences)"
                    );
                }
                false
            }
        }
    }

    /// Tells the keeper `guard`, unless it has it already. A keeper found
    /// gone is replaced at once; a full pipe (the keeper is behind) is
    /// retried at the next call.
    pub fn send(&mut self, guard: Guard) {
        if self.sent == Some(guard) {
            return;
        }
        for _attempt in 0..2 {
            if self.pipe.is_none() && !self.spawn(None) {
                return;
            }
            let pipe = self.pipe.as_mut().expect("spawned above");
            // One line is far below PIPE_BUF: it is written whole or not at all.
            match pipe.write(guard.line().as_bytes()) {
                Ok(_) => {
                    self.sent = Some(guard);
                    return;
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(error) => {
                    let pid = self.pid();
                    tracing::error!(
                        ?pid,
                        "the fence keeper is gone ({error}): starting a new one"
                    );
                    self.pipe = None;
                    if let Some(mut child) = self.child.take() {
                        let _ = child.try_wait();
                    }
                }
            }
        }
    }
}

/// Whether `pid` runs `jai-agent fence-keeper`.
fn is_keeper(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
        cmdline
            .split(|byte| *byte == 0)
            .any(|arg| arg == COMMAND.as_bytes())
    })
}

// ---- the keeper's side -------------------------------------------------------

/// The keeper's command line (after `jai-agent fence-keeper`).
#[derive(Debug, clap::Parser)]
#[command(name = "jai-agent fence-keeper")]
pub struct KeeperArgs {
    /// The agent's `log.format`.
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
    /// The keeper of a previous agent, to dismiss once this one is told
    /// what to guard.
    #[arg(long)]
    replaces: Option<i32>,
}

/// A postmaster under guard.
#[derive(Debug, Clone, Copy)]
struct Guarded {
    pid: i32,
    /// Its start time (`/proc/PID/stat`), so a reused PID is never signalled.
    started: u64,
    fence_at_ns: u64,
}

impl Guarded {
    /// What to guard after the agent said `guard`.
    fn after(guard: Guard, before: Option<Guarded>) -> Option<Guarded> {
        if guard.pid == 0 {
            return None;
        }
        let started = match before {
            Some(before) if before.pid == guard.pid => before.started,
            _ => start_time(guard.pid)?,
        };
        Some(Guarded {
            pid: guard.pid,
            started,
            fence_at_ns: guard.fence_at_ns,
        })
    }

    /// The same process still runs (not a zombie).
    fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.started)
    }

    fn fence(&self, agent_alive: bool) {
        if !self.alive() {
            return;
        }
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGINT);
        let agent = if agent_alive {
            "the agent did not confirm the leader lease in time (frozen or stuck)"
        } else {
            "the agent is gone and the leader lease runs out"
        };
        tracing::error!(
            pid = self.pid,
            "fence keeper: {agent}: fast shutdown (SIGINT) of PostgreSQL before the lease can expire"
        );
    }
}

/// The start time of `pid` in clock ticks since boot (field 22 of
/// `/proc/PID/stat`); `None` if it does not run (or is a zombie).
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses: state is field 3.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// Runs the keeper until the agent is gone and nothing is left to guard.
pub fn run(args: KeeperArgs) -> ExitCode {
    jai_proto::logging::init(
        &LogConfig {
            format: args.log_format,
        },
        "info",
    );
    let (lines, from_agent) = mpsc::channel::<Option<String>>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if lines.send(Some(line)).is_err() {
                return;
            }
        }
        let _ = lines.send(None);
    });
    let mut replaces = args.replaces;
    let mut guarded: Option<Guarded> = None;
    let mut agent_alive = true;
    loop {
        let now = monotonic_ns();
        if let Some(guard) = guarded.filter(|guard| now >= guard.fence_at_ns) {
            guard.fence(agent_alive);
            guarded = None;
        }
        if !agent_alive {
            guarded = guarded.filter(Guarded::alive);
            if guarded.is_none() {
                return ExitCode::SUCCESS;
            }
        }
        let mut wait = guarded.map_or(Duration::from_secs(3600), |guard| {
            Duration::from_nanos(guard.fence_at_ns.saturating_sub(now))
        });
        if !agent_alive {
            wait = wait.min(WATCH_EVERY);
        }
        let mut next = from_agent.recv_timeout(wait);
        // Every line queued so far, so a late line never fences early.
        while let Ok(Some(line)) = next {
            match Guard::parse(&line) {
                Some(guard) => {
                    if let Some(old) = replaces.take() {
                        dismiss(old);
                    }
                    guarded = Guarded::after(guard, guarded);
                }
                None => tracing::warn!("fence keeper: ignoring an unreadable line {line:?}"),
            }
            next = from_agent.try_recv().map_err(|error| match error {
                mpsc::TryRecvError::Empty => RecvTimeoutError::Timeout,
                mpsc::TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
            });
        }
        if matches!(next, Ok(None) | Err(RecvTimeoutError::Disconnected)) && agent_alive {
            agent_alive = false;
            // After a graceful shutdown the postmaster is gone already.
            guarded = guarded.filter(Guarded::alive);
            if let Some(guard) = guarded {
                let left = guard.fence_at_ns.saturating_sub(monotonic_ns()) / 1_000_000;
                tracing::warn!(
                    pid = guard.pid,
                    "fence keeper: the agent is gone; PostgreSQL stays guarded until its lease's \
                     fencing point, in {left} ms, unless it stops first"
                );
            }
        }
    }
}

/// SIGTERM to a previous agent's keeper: this one guards from now on.
fn dismiss(pid: i32) {
    if pid as u32 == std::process::id() || !is_keeper(pid) {
        return;
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    tracing::info!(
        pid,
        "fence keeper: took over from the previous agent's keeper"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guard_line_reads_back() {
        let guard = Guard {
            pid: 4242,
            fence_at_ns: 123_456_789_012,
        };
        assert_eq!(guard.line(), "4242 123456789012\n");
        assert_eq!(Guard::parse(&guard.line()), Some(guard));
        assert_eq!(Guard::parse("0 0"), Some(Guard::NONE));
        assert_eq!(Guard::parse("-1 5"), None);
        assert_eq!(Guard::parse("12"), None);
        assert_eq!(Guard::parse("x 5"), None);
    }

    #[test]
    fn instants_map_to_the_monotonic_clock_never_late() {
        let before = monotonic_ns();
        let now = Instant::now();
        let after = monotonic_ns();
        let mapped = monotonic_ns_at(now);
        assert!(mapped <= after, "{mapped} > {after}");
        // The anchor may be older than `before`: allow the read's own spread.
        assert!(mapped + 1_000_000 >= before, "{mapped} ≪ {before}");
        let later = now + Duration::from_millis(1500);
        assert_eq!(monotonic_ns_at(later) - mapped, 1_500_000_000);
        assert_eq!(monotonic_ns_at(now), mapped, "stable for one instant");
    }

    #[test]
    fn the_start_time_of_this_process_is_readable_and_stable() {
        let pid = std::process::id() as i32;
        let started = start_time(pid).expect("our own /proc/PID/stat");
        assert_eq!(start_time(pid), Some(started));
        assert_eq!(start_time(i32::MAX), None);
    }
}
