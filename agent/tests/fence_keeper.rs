//! The fence keeper (`jai-agent fence-keeper`, `agent/src/keeper.rs`) as a
//! process: this test plays the agent's end of its pipe, and a `sleep`
//! stands in for the postmaster (SIGINT ends it, as it starts PostgreSQL's
//! fast shutdown).

use jai_agent::keeper::{monotonic_ns, Guard};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// A stand-in postmaster in a process group of its own.
fn postmaster() -> Child {
    Command::new("sleep")
        .arg("600")
        .process_group(0)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawning the stand-in postmaster")
}

fn keeper(replaces: Option<u32>) -> (Child, ChildStdin) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_jai-agent"));
    command
        .arg("fence-keeper")
        .stdin(Stdio::piped())
        .process_group(0);
    if let Some(pid) = replaces {
        command.arg("--replaces").arg(pid.to_string());
    }
    let mut child = command.spawn().expect("spawning the keeper");
    let pipe = child.stdin.take().expect("piped");
    (child, pipe)
}

/// Tells the keeper to guard `pid` until `after` from now.
fn guard(pipe: &mut ChildStdin, pid: u32, after: Duration) {
    let line = Guard {
        pid: pid as i32,
        fence_at_ns: monotonic_ns() + after.as_nanos() as u64,
    }
    .line();
    pipe.write_all(line.as_bytes())
        .expect("writing to the keeper");
}

/// Waits up to `within` for `child` to exit; returns when it did.
fn exited_within(child: &mut Child, within: Duration) -> Option<Instant> {
    let deadline = Instant::now() + within;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return Some(Instant::now());
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn renewals_keep_the_primary_and_their_end_fences_it_at_the_deadline() {
    let mut pg = postmaster();
    let (mut keeper, mut pipe) = keeper(None);
    let lease = Duration::from_millis(400);
    for _ in 0..10 {
        guard(&mut pipe, pg.id(), lease);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        pg.try_wait().unwrap().is_none(),
        "renewed every 100 ms, the stand-in must run"
    );
    // The agent freezes: the pipe stays open, no renewal comes.
    guard(&mut pipe, pg.id(), lease);
    let last = Instant::now();
    let stopped = exited_within(&mut pg, Duration::from_secs(5));
    let keeper_alive = keeper.try_wait().unwrap().is_none();
    kill(&mut keeper);
    let stopped = stopped.expect("the keeper never fenced the stand-in");
    let after = stopped - last;
    assert!(
        after >= lease - Duration::from_millis(5),
        "fenced {after:?} after the last renewal, before the deadline"
    );
    assert!(
        after < lease + Duration::from_millis(500),
        "fenced {after:?} after the last renewal"
    );
    assert!(keeper_alive, "the keeper exits only once its agent is gone");
}

#[test]
fn when_the_agent_dies_the_keeper_guards_until_the_deadline_then_exits() {
    let mut pg = postmaster();
    let (mut keeper, mut pipe) = keeper(None);
    guard(&mut pipe, pg.id(), Duration::from_millis(600));
    let sent = Instant::now();
    drop(pipe);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        pg.try_wait().unwrap().is_none(),
        "fenced long before the deadline"
    );
    let stopped = exited_within(&mut pg, Duration::from_secs(5));
    let keeper_exit = exited_within(&mut keeper, Duration::from_secs(5));
    kill(&mut keeper);
    let stopped = stopped.expect("the stand-in outlived its lease");
    assert!(stopped - sent >= Duration::from_millis(595));
    assert!(keeper_exit.is_some(), "the keeper stays after its work");
}

#[test]
fn a_keeper_with_nothing_to_guard_exits_with_its_agent() {
    let mut pg = postmaster();
    let (mut keeper, mut pipe) = keeper(None);
    guard(&mut pipe, pg.id(), Duration::from_millis(300));
    pipe.write_all(Guard::NONE.line().as_bytes()).unwrap();
    drop(pipe);
    let exited = exited_within(&mut keeper, Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(500));
    let pg_alive = pg.try_wait().unwrap().is_none();
    kill(&mut pg);
    kill(&mut keeper);
    assert!(
        exited.is_some(),
        "the keeper outlived its agent with nothing to guard"
    );
    assert!(pg_alive, "a primary no longer guarded was fenced");
}

#[test]
fn a_restarted_agents_keeper_replaces_the_old_one_and_the_primary_stays() {
    let mut pg = postmaster();
    let (mut old, mut pipe) = keeper(None);
    guard(&mut pipe, pg.id(), Duration::from_millis(800));
    drop(pipe); // the agent died (SIGKILL); its keeper guards on
    let (mut new, mut pipe) = keeper(Some(old.id()));
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        old.try_wait().unwrap().is_none(),
        "dismissed before its successor was told anything"
    );
    guard(&mut pipe, pg.id(), Duration::from_secs(5)); // the new agent's renewed lease
    let dismissed = exited_within(&mut old, Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(1200)); // past the old fencing point
    let pg_alive = pg.try_wait().unwrap().is_none();
    kill(&mut pg);
    kill(&mut new);
    kill(&mut old);
    assert!(dismissed.is_some(), "the old keeper was not dismissed");
    assert!(
        pg_alive,
        "the old keeper fenced a primary its successor guards"
    );
}
