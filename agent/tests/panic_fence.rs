//! A panic in the agent fences a running primary before the agent dies.
//!
//! The test runs itself again as a child process (`JAI_PANIC_FENCE_CHILD`):
//! the child starts a stand-in postmaster in a process group of its own (as
//! `Postgres::start` does), guards it as a primary, installs the agent's
//! panic hook and panics in a worker thread, as a failed safety assertion
//! would. The parent checks that the child aborted and that the stand-in got
//! SIGINT (PostgreSQL's fast shutdown) — and, as a control, that without the
//! hook the stand-in outlives the panicking child.

use jai_agent::fence::{install_panic_hook, FenceTarget};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHILD: &str = "JAI_PANIC_FENCE_CHILD";

/// The child's part: prints the stand-in's PID, then panics.
fn child(with_hook: bool) -> ! {
    let postmaster = Command::new("sleep")
        .arg("600")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning the stand-in postmaster");
    let pid = postmaster.id() as i32;
    println!("\nstand-in postmaster pid={pid}");
    let target = Arc::new(FenceTarget::default());
    target.arm(pid, Duration::from_millis(500));
    if with_hook {
        install_panic_hook(target);
    }
    let worker = std::thread::spawn(|| panic!("assert_safe: a planted safety violation"));
    let _ = worker.join();
    // Without the hook the panic only ends the worker thread: the agent
    // goes on (or exits) and the primary keeps running, unfenced.
    std::process::exit(3);
}

/// Runs the child; returns its exit status and the stand-in's PID.
fn run_child(with_hook: bool) -> (std::process::ExitStatus, i32) {
    let output = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(CHILD, if with_hook { "hook" } else { "none" })
        .stdin(Stdio::null())
        .output()
        .expect("running the child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let pid = stdout
        .lines()
        .find_map(|line| {
            line.split_once("postmaster pid=")?
                .1
                .trim()
                .parse::<i32>()
                .ok()
        })
        .unwrap_or_else(|| {
            panic!(
                "no PID from the child: {stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    (output.status, pid)
}

/// Whether `pid` still runs (a zombie awaiting its reaper counts as dead).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Entry point of the child process; a no-op in a normal test run.
#[test]
fn child_entry() {
    match std::env::var(CHILD).as_deref() {
        Ok("hook") => child(true),
        Ok("none") => child(false),
        _ => {}
    }
}

#[test]
fn a_panic_fences_the_primary_before_the_agent_dies() {
    let (status, pid) = run_child(true);
    assert!(
        !status.success(),
        "the agent must not survive a panic: {status:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let survived = alive(pid);
    kill(pid);
    assert!(
        !survived,
        "the guarded primary (pid {pid}) outlived the panicking agent"
    );

    // Control: without the hook the stand-in survives, so the check above
    // can fail.
    let (_, pid) = run_child(false);
    std::thread::sleep(Duration::from_millis(300));
    let survived = alive(pid);
    kill(pid);
    assert!(
        survived,
        "control: without the hook the stand-in should outlive the child"
    );
}
