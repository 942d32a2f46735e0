//! Starting, watching and killing the lab's processes, always by PID.

use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Spawns `command` in its own process group with stdout and stderr appended to
/// `log`, and returns its PID. The child is detached: the lab records the PID
/// and signals it; the zombie is reaped by whoever adopts it.
pub fn spawn_logged(mut command: Command, log: &Path) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    command
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .process_group(0);
    let child = command
        .spawn()
        .with_context(|| format!("starting {:?}", command.get_program()))?;
    let pid = child.id() as i32;
    // Reap the child in the background so a killed process does not linger as
    // a zombie that still looks alive to `kill(pid, 0)`.
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    Ok(pid)
}

/// Whether `pid` names a live process (a zombie counts as dead).
pub fn is_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the command name in parentheses.
            let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
            !matches!(
                state.and_then(|rest| rest.chars().next()),
                Some('Z') | Some('X') | None
            )
        }
        Err(_) => false,
    }
}

/// Sends `signal` to `pid`; a process already gone is not an error.
pub fn signal(pid: i32, signal: Signal) {
    let _ = kill(Pid::from_raw(pid), signal);
}

/// Sends `signal` to the process group led by `pid` (the postmaster leads its
/// own group: signalling it reaches every backend too, as a machine death would).
pub fn signal_group(pid: i32, signal: Signal) {
    let _ = kill(Pid::from_raw(-pid), signal);
}

/// Waits until `pid` is gone, for at most `within`. Returns whether it is gone.
pub fn wait_gone(pid: i32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while is_alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Stops `pid` politely (SIGTERM), then by force (SIGKILL) after `grace`.
pub fn terminate(pid: i32, grace: Duration) {
    if !is_alive(pid) {
        return;
    }
    signal(pid, Signal::SIGTERM);
    if !wait_gone(pid, grace) {
        signal(pid, Signal::SIGCONT);
        signal(pid, Signal::SIGKILL);
        wait_gone(pid, Duration::from_secs(5));
    }
}

/// The PIDs whose parent is `parent` (from `/proc/*/stat`).
pub fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                // After the command name in parentheses: state, then the parent.
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}

/// `roots` and every process descending from them (children, grandchildren, …).
pub fn descendants(roots: &[i32]) -> Vec<i32> {
    let mut found: Vec<i32> = roots.iter().copied().filter(|pid| is_alive(*pid)).collect();
    let mut next = 0;
    while next < found.len() {
        for child in children_of(found[next]) {
            if !found.contains(&child) {
                found.push(child);
            }
        }
        next += 1;
    }
    found
}

/// The fence keeper of the agent whose state directory is `state_dir`, if it
/// runs: from the PID the agent records there (`fence-keeper.pid`), since a
/// keeper outlives a killed agent for up to a lease.
pub fn fence_keeper_pid(state_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(state_dir.join("fence-keeper.pid")).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let keeper = cmdline
        .split(|byte| *byte == 0)
        .any(|arg| arg == b"fence-keeper");
    (keeper && is_alive(pid)).then_some(pid)
}

/// The postmaster PID recorded in a data directory, if that process lives.
pub fn postmaster_pid(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    is_alive(pid).then_some(pid)
}
