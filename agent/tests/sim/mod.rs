//! A deterministic, seeded simulator of a jai cluster (docs/architecture.md,
//! "Simulation").
//!
//! N members each run the agent's own round driver
//! ([`jai_agent::ha::driver::Driver`], with the real `Core` inside), on
//! simulated time. [`agent`] interprets the driver's effects as `shell.rs`
//! does, but against a simulated etcd ([`etcd`]), a simulated PostgreSQL per
//! member ([`postgres`], operated by `pg_ops`) and the member's disk. The
//! order of a round's steps is the agent's (docs/architecture.md, "The round
//! driver"): nothing here models it. Faults come from a seeded schedule
//! ([`faults`]).
//!
//! What is modelled, and why it matters for the invariants:
//!
//! - time: milliseconds of real simulated time; each agent has its own
//!   monotonic clock (reset when it restarts) drifting by up to ±1%, and etcd's
//!   clock drifts by up to ±0.1%;
//! - the network between each member and etcd: 1–4 ms each way, 1% spikes,
//!   slow, lossy, fail-fast or black-holed links; a request can apply in etcd
//!   and still time out at the caller; watch events are lost while cut;
//! - etcd: revisions, leases expiring `ttl` after the keepalive *arrived* and
//!   swept every 500 ms, the transactions of a round (`ha::store`'s requests:
//!   `create_revision == 0`, term-guarded writes), the `switchover` intent
//!   recorded and cancelled as the control API's `Dcs` calls do, `config`
//!   swapped on its revision, and leader elections that answer nothing for a
//!   while, then extend every lease;
//! - PostgreSQL: WAL histories as branches (so diverged timelines are seen),
//!   a primary taking writes until a stop signal, standbys streaming through a
//!   slot with lag, promote (10–1,000 ms), start, stop, initdb,
//!   pg_basebackup, pg_rewind, CHECKPOINT, crashes, a postmaster that will
//!   not start, and the watchdog's fast shutdown (SIGINT: no more writes at
//!   once, nor a start or a promotion). A primary reports `pg_stat_replication`: its connected
//!   standbys (running, pointed at it, through their slot, on a history that
//!   contains theirs), `catchup` until they first reached its end, then
//!   `streaming`, with their flush position. A fast shutdown of a primary
//!   ends only once every connected standby has all its WAL (the walsenders
//!   wait for the standbys' flush); a crash does not wait, nor does the
//!   immediate shutdown a stop escalates to after the grace the driver gives
//!   it (`retry_timeout`, or for a switchover `postgresql.start_timeout`: 60 s
//!   here). A shutdown soon after a CHECKPOINT is short;
//! - what `jai-agent` runs beside its round driver: the keepalive task and
//!   the fencing watchdog, with the agent's own lease arithmetic
//!   (`ha::lease`), and the waits and timeouts of each effect (see [`agent`]);
//! - wall clocks: each member's is up to ±1.5 s off, so a scheduled
//!   switchover becomes due at slightly different moments on each;
//! - the operator (`operator`): switchovers (to a member or the best
//!   replica, at once or a few seconds ahead, sometimes cancelled), failovers
//!   (sometimes forced) and maintenance-mode windows, drawn with the faults,
//!   checked against what the operator reads in etcd as `control.rs` checks
//!   them, and written with the control API's guards.
//!
//! Checked after every event (`invariants`; the numbers are those of
//! docs/architecture.md, "Safety invariants"): one writer (invariant 1),
//! promotion only with the key (invariant 2, at the moment the interpreter
//! promotes or starts a primary), no standby pointed at a diverged upstream
//! (invariant 5, counted unless strict), the round driver never panics; for
//! the operator's intents: the first promotion after a switchover's stop
//! keeps every write the old primary acknowledged if the new primary streamed
//! from it to the end of a clean stop (a target that streamed at its start
//! but missed its end is counted, fatal only with `strict_switchover` and
//! unless the intent was forced), nobody but an intent's target takes the
//! key in maintenance mode (a running primary may reclaim its own), a leader
//! never hands over again for an intent that already made another member
//! leader, and a switchover whose leader released the key in maintenance
//! mode gets a new leader within `2 * ttl` unless a fault struck since the
//! intent was written. At the end: a leader within `3 * ttl + 10 s` of the
//! end of the last fault (scheduled, a cut of the `targeted-cut` nemesis, or
//! the end of maintenance mode), and no intent left pending under it. The
//! first broken one ends the history with the seed and the last events.
//!
//! Everything random comes from one seed through [`rng::Rng`], and every
//! collection iterates in a fixed order, so a seed replays the same history.

pub mod agent;
mod env;
pub mod etcd;
pub mod faults;
mod invariants;
mod operator;
mod pg_ops;
pub mod postgres;
pub mod rng;
pub mod trace;
mod world;

use env::{Env, Event};
use faults::FaultProfile;
use jai_agent::ha::driver::PlantedBug;
use jai_proto::{DynamicConfig, Tags};
use rng::Rng;
use world::World;

/// When faults start: usually after the bootstrap, in some histories during it.
const FAULTS_FROM_MS: u64 = 8_000;
/// Share of histories (per mille) whose faults start during the bootstrap.
const EARLY_FAULTS_PER_MILLE: u64 = 200;
/// When the last fault may start.
const FAULTS_UNTIL_MS: u64 = 60_000;
/// How far a member's wall clock may be off real time (NTP-synced machines).
const MAX_WALL_CLOCK_SKEW_MS: u64 = 1_500;
/// How often primaries write and standbys receive.
const WAL_TICK_MS: u64 = 100;

/// A bug planted in the agent, to prove the checks can see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plant {
    /// A bug in the order of a round's steps, planted in the agent's own
    /// round driver.
    Ordering(PlantedBug),
    /// A primary's demotion (Stop, and the watchdog) runs only this many
    /// milliseconds after its lease deadline.
    LateDemote(u64),
    /// The shell ignores the demotion margin: it tells the core its lease
    /// lasts `demote_margin` longer than it does, and its watchdog fences at
    /// the deadline itself.
    NoMargin,
}

impl Plant {
    /// Parses `late-demote[:<ms>]` (1000 ms by default), `no-margin`,
    /// `no-lease-recheck` or `final-position-after-release`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let unknown = || {
            format!(
                "unknown plant {text:?}: late-demote[:<ms>], no-margin, no-lease-recheck or final-position-after-release"
            )
        };
        match text.split_once(':') {
            None if text == "late-demote" => Ok(Plant::LateDemote(1_000)),
            None if text == "no-margin" => Ok(Plant::NoMargin),
            None if text == "no-lease-recheck" => {
                Ok(Plant::Ordering(PlantedBug::NoLeaseRecheckBeforeWrites))
            }
            None if text == "final-position-after-release" => {
                Ok(Plant::Ordering(PlantedBug::FinalPositionAfterRelease))
            }
            Some(("late-demote", ms)) => ms.parse().map(Plant::LateDemote).map_err(|_| unknown()),
            _ => Err(unknown()),
        }
    }
}

/// How to run histories.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Which faults.
    pub faults: FaultProfile,
    /// A planted shell bug.
    pub plant: Option<Plant>,
    /// Fail on a standby pointed at a diverged upstream. PostgreSQL refuses
    /// to stream then (no data mixes), and the core rewinds only former
    /// primaries, so by default this is counted, not fatal.
    pub strict_divergence: bool,
    /// Fail on a switchover target that streamed when the old primary's stop
    /// began but missed its last writes (it disconnected during the stop, or
    /// the stop was escalated to an immediate shutdown). Forced intents are
    /// exempt (they accept a lagging target); otherwise the agent publishes
    /// the stopped primary's final position and the core refuses a target
    /// short of it, so with `handover-crash` this must never fire.
    pub strict_switchover: bool,
    /// Trace lines kept for the failure report.
    pub trace_lines: usize,
    /// Print every trace line as it happens.
    pub echo: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            faults: FaultProfile::default_profile(),
            plant: None,
            strict_divergence: false,
            strict_switchover: false,
            trace_lines: 50,
            echo: false,
        }
    }
}

/// Which invariant broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViolationKind {
    /// §3.1: two PostgreSQL servers accepted writes at the same instant.
    TwoWriters,
    /// §3.2: a promotion (or a primary start) without holding the leader key.
    PrimaryWithoutKey,
    /// §3.5: a standby pointed at an upstream whose history diverged from its own.
    DivergedStream,
    /// `Core::decide` panicked (its own `assert_safe`, or an `unreachable!`).
    CoreAssertion,
    /// Liveness: no leader within the bound after the last fault.
    NoLeader,
    /// A switchover lost writes the old primary acknowledged although the
    /// new leader streamed from it.
    LostWrites,
    /// In maintenance mode, a member took the leader key without an
    /// operator's intent for it.
    PausedTakeover,
    /// A leader handed over a second time for the same intent.
    IntentTwice,
    /// An intent was still pending at the end, under a healthy leader.
    IntentLeftOver,
    /// A switchover's old leader released the key in maintenance mode and
    /// nobody took it, without any fault to explain it.
    StalledSwitchover,
}

/// A broken invariant, with what is needed to reproduce and read it.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The seed.
    pub seed: u64,
    /// Which invariant.
    pub kind: ViolationKind,
    /// What happened.
    pub message: String,
    /// Real simulated time of the violation.
    pub at_ms: u64,
    /// The last events.
    pub trace: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {} broke {:?} at {}.{:03}s: {}",
            self.seed,
            self.kind,
            self.at_ms / 1000,
            self.at_ms % 1000,
            self.message
        )?;
        writeln!(
            f,
            "replay: JAI_SIM_SEED={} (JAI_SIM_TRACE=1 for every event)",
            self.seed
        )?;
        writeln!(f, "last {} events:", self.trace.len())?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

/// What one history did.
#[derive(Debug, Clone, Default)]
pub struct RunStats {
    /// Events processed.
    pub events: u64,
    /// Simulated time.
    pub sim_ms: u64,
    /// Faults injected.
    pub faults: u64,
    /// Promotions executed.
    pub promotions: u64,
    /// Standbys that PostgreSQL refused to stream to (diverged history).
    pub diverged: u64,
    /// Switchover targets promoted without the old primary's last writes,
    /// having missed the end of its stop (fatal with `strict_switchover`).
    pub switchover_losses: u64,
    /// Time from the last fault to a healthy leader.
    pub recovery_ms: u64,
    /// Operator calls made (switchover, failover, cancel, pause).
    pub operator_calls: u64,
    /// Intents the operator recorded (past the checks and the guards).
    pub intents: u64,
    /// Switchover stops begun by a leader.
    pub handovers: u64,
    /// Of those, stops that ended cleanly (not escalated, not crashed).
    pub clean_handovers: u64,
    /// Hash of the whole trace, to compare two runs of a seed.
    pub fingerprint: u64,
}

#[derive(Debug)]
struct Violation {
    kind: ViolationKind,
    message: String,
    at_ms: u64,
}

/// The liveness bound: a leader within `3 * ttl + 10 s` of the last fault.
fn liveness_bound(config: &DynamicConfig) -> u64 {
    3 * config.ttl.as_millis() as u64 + 10_000
}

/// Runs the history of `seed`.
pub fn run(seed: u64, config: &SimConfig) -> Result<RunStats, Failure> {
    let mut world = build_world(seed, config);
    let bound = liveness_bound(&world.bootstrap);
    let fail = |world: &World, violation: Violation| Failure {
        seed,
        kind: violation.kind,
        message: violation.message,
        at_ms: violation.at_ms,
        trace: world.env.trace.lines(),
    };
    let (quiet_from, recovered_at) = match world.run_until(bound) {
        Ok(run) => run,
        Err(violation) => return Err(fail(&world, violation)),
    };
    let end = quiet_from + bound;
    if world.env.healthy_leader(&world.agents).is_none() {
        let violation = Violation {
            kind: ViolationKind::NoLeader,
            message: format!(
                "no member holds the leader key with a primary accepting writes {}s after the last fault",
                bound / 1000
            ),
            at_ms: end,
        };
        return Err(fail(&world, violation));
    }
    if let Some(intent) = world.env.leftover_intent() {
        let violation = Violation {
            kind: ViolationKind::IntentLeftOver,
            message: format!(
                "the intent {intent} is still pending {}s after the last fault, under a healthy leader",
                bound / 1000
            ),
            at_ms: end,
        };
        return Err(fail(&world, violation));
    }
    let mut stats = world.env.stats.clone();
    stats.sim_ms = end;
    stats.recovery_ms = recovered_at.map_or(0, |at| at - quiet_from);
    stats.fingerprint = world.env.trace.fingerprint();
    Ok(stats)
}

/// Draws the cluster of `seed` (size, clocks, tags, start times) and its
/// fault schedule (the end of the last fault goes to `Env::faults_end`).
fn build_world(seed: u64, config: &SimConfig) -> World {
    let mut rng = Rng::new(seed);
    let mut fault_rng = rng.fork();
    let members = [2, 3, 3, 3, 3, 4, 4, 5][rng.range(0, 7) as usize];
    let names: Vec<String> = (1..=members).map(|index| format!("pg{index}")).collect();
    let etcd_ppm = rng.range(0, 2_000) as i64 - 1_000;
    let mut env = Env::new(names, etcd_ppm, rng.fork(), config);
    let clock_ppm = (0..members)
        .map(|_| rng.range(0, 20_000) as i64 - 10_000)
        .collect();
    // At most one member tagged nofailover, and only with three or more.
    let nofailover = (members >= 3 && rng.chance(150)).then(|| rng.range(0, members as u64 - 1));
    let tags = (0..members)
        .map(|member| Tags {
            failover_priority: rng.range(0, 1) as u32,
            nofailover: nofailover == Some(member as u64),
            ..Tags::default()
        })
        .collect();
    let reclone = (0..members).map(|_| rng.chance(800)).collect();
    for member in 0..members {
        let at = rng.range(0, 3_000);
        env.schedule(at, Event::Restart { member });
    }
    let faults_from = if fault_rng.chance(EARLY_FAULTS_PER_MILLE) {
        0
    } else {
        FAULTS_FROM_MS
    };
    let mut faults = config
        .faults
        .schedule(&mut fault_rng, members, faults_from, FAULTS_UNTIL_MS);
    // Drawn from a stream of their own: the other faults of a seed stay.
    let mut operator_rng = fault_rng.fork();
    faults.extend(config.faults.operator_schedule(
        &mut operator_rng,
        members,
        FAULTS_FROM_MS,
        FAULTS_UNTIL_MS,
    ));
    let quiet_from = faults
        .iter()
        .map(|(at, fault)| at + fault.duration())
        .max()
        .unwrap_or(FAULTS_FROM_MS)
        .max(FAULTS_FROM_MS);
    env.faults_end = quiet_from;
    for (at, fault) in faults {
        env.schedule(at, Event::Fault(fault));
    }
    let mut wall_rng = rng.fork();
    env.wall_offset_ms = (0..members)
        .map(|_| {
            wall_rng.range(0, 2 * MAX_WALL_CLOCK_SKEW_MS) as i64 - MAX_WALL_CLOCK_SKEW_MS as i64
        })
        .collect();
    env.schedule(etcd::SWEEP_EVERY_MS, Event::EtcdSweep);
    env.schedule(WAL_TICK_MS, Event::WalTick);
    World {
        env,
        agents: (0..members).map(|_| None).collect(),
        paused: vec![None; members],
        clock_ppm,
        tags,
        reclone,
        bootstrap: DynamicConfig::default(),
        plant: config.plant,
    }
}
