//! The chaos suite on real components (docs/benchmarks.md, "Chaos"): a
//! seeded, randomized schedule of faults against a lab under the benchmark's
//! writer, with checkers for the safety invariants.
//!
//! - One step: wait until the cluster is settled and writes go through, pick a
//!   fault and its target (relative to the roles: "the primary", "replica #k"),
//!   inject it, hold it for a bounded random time, heal it, and wait (bounded)
//!   until the cluster has recovered: exactly one leader, every running member
//!   streaming from it, and a write acknowledged by it. A fault that does not
//!   recover in time is a liveness violation.
//! - The writer ([`Writer`]) records every acknowledged id, when, by which
//!   member and on which timeline. **One writer:** a tenure as primary is a
//!   `(member, timeline)`; the tenures seen in acknowledgement order must not
//!   interleave (an acknowledgement by the old primary after the first one by
//!   the new one), nor go back to a lower timeline. At the end every
//!   acknowledged id must be in the table: with asynchronous replication a
//!   lost write is counted as "lost (async)", a violation only in
//!   `synchronous_mode` or after a planned switchover.
//! - A sampler asks every member `SELECT NOT pg_is_in_recovery()` and etcd for
//!   the leader key every 100 ms: leader changes (failovers) and instants with
//!   two writable members (reported; a violation only through the ledger).
//!
//! The same seed gives the same schedule: kinds, role-relative targets, hold
//! times (`JAI_CHAOS_SEED`).

use crate::bench::{self, Ack, Writer, WriterConfig};
use crate::faults::Freeze;
use crate::lab::Lab;
use crate::StopSignal;
use anyhow::{anyhow, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The faults of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// SIGKILL of the primary's agent and PostgreSQL (the machine dies).
    KillPrimary,
    /// The same to a replica.
    KillReplica,
    /// SIGKILL of one agent only; its PostgreSQL keeps running (a primary:
    /// until its fence keeper stops it at the lease's fencing point).
    KillAgent,
    /// SIGSTOP of one agent (a hung agent; not its fence keeper); SIGCONT heals.
    FreezeAgent,
    /// SIGKILL of one postmaster (a PostgreSQL crash); its agent restarts it.
    KillPostgres,
    /// SIGSTOP of one postmaster alone (open sessions go on, new
    /// connections hang); SIGCONT heals.
    FreezePostmaster,
    /// SIGSTOP of one PostgreSQL: the postmaster and every child; SIGCONT heals.
    FreezePostgres,
    /// One member cut off etcd (iptables).
    CutFromEtcd,
    /// The primary and one replica cut apart (replication, API, gRPC).
    CutBetweenMembers,
    /// One member cut apart from every other member (it still reaches etcd).
    IsolateMember,
    /// A majority of etcd members killed; restarted to heal.
    EtcdQuorumLoss,
    /// A replica's data disk filled up; the ballast is removed to heal.
    DiskFull,
    /// `jaictl switchover --force` from the primary (planned).
    Switchover,
    /// HAProxy restarted: it forgets what the agents pushed.
    RestartHaproxy,
}

impl FaultKind {
    /// Every kind, in the order of the bounded test.
    pub const ALL: [FaultKind; 14] = [
        FaultKind::KillPrimary,
        FaultKind::KillReplica,
        FaultKind::KillAgent,
        FaultKind::FreezeAgent,
        FaultKind::KillPostgres,
        FaultKind::FreezePostmaster,
        FaultKind::FreezePostgres,
        FaultKind::CutFromEtcd,
        FaultKind::CutBetweenMembers,
        FaultKind::IsolateMember,
        FaultKind::EtcdQuorumLoss,
        FaultKind::DiskFull,
        FaultKind::Switchover,
        FaultKind::RestartHaproxy,
    ];

    /// The name in the tables.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillPrimary => "kill-primary",
            FaultKind::KillReplica => "kill-replica",
            FaultKind::KillAgent => "kill-agent",
            FaultKind::FreezeAgent => "sigstop-agent",
            FaultKind::KillPostgres => "kill-postgres",
            FaultKind::FreezePostmaster => "sigstop-postmaster",
            FaultKind::FreezePostgres => "sigstop-postgres",
            FaultKind::CutFromEtcd => "cut-from-etcd",
            FaultKind::CutBetweenMembers => "cut-primary-replica",
            FaultKind::IsolateMember => "isolate-member",
            FaultKind::EtcdQuorumLoss => "etcd-quorum-loss",
            FaultKind::DiskFull => "disk-full-replica",
            FaultKind::Switchover => "switchover",
            FaultKind::RestartHaproxy => "restart-haproxy",
        }
    }

    /// The kind called `name` (as in the tables).
    pub fn from_name(name: &str) -> Result<FaultKind> {
        FaultKind::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
            .ok_or_else(|| {
                anyhow!(
                    "no fault {name:?}; the faults: {}",
                    FaultKind::ALL.map(FaultKind::name).join(", ")
                )
            })
    }

    /// Whether the lab can take this fault.
    fn possible(self, lab: &Lab) -> bool {
        let nodes = lab.desc.nodes.len();
        let own_etcd = !lab.desc.etcd_members.is_empty();
        match self {
            FaultKind::KillReplica | FaultKind::Switchover => nodes >= 2,
            FaultKind::CutBetweenMembers | FaultKind::IsolateMember => {
                nodes >= 2 && lab.is_chaos_lab()
            }
            FaultKind::DiskFull => nodes >= 2 && lab.is_chaos_lab(),
            FaultKind::CutFromEtcd | FaultKind::EtcdQuorumLoss => own_etcd,
            _ => true,
        }
    }

    /// Whether holding the fault is pointless (it is one event; the cluster
    /// recovers by itself).
    fn is_instant(self) -> bool {
        matches!(
            self,
            FaultKind::KillPostgres | FaultKind::Switchover | FaultKind::RestartHaproxy
        )
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// No new fault starts after this long.
    pub duration: Duration,
    /// Seed of the schedule.
    pub seed: u64,
    /// A fixed sequence of kinds instead of random ones (targets and holds
    /// still come from the seed); the run ends when it is exhausted.
    pub sequence: Option<Vec<FaultKind>>,
    /// Draw random kinds among these only (default: every kind the lab can take).
    pub only: Option<Vec<FaultKind>>,
    /// Shortest hold of a fault.
    pub hold_min: Duration,
    /// Longest hold of a fault.
    pub hold_max: Duration,
    /// How long the cluster may take to recover after a fault heals.
    pub recovery_timeout: Duration,
    /// Print a line per fault on stderr as it goes.
    pub verbose: bool,
}

impl ChaosOptions {
    /// A random schedule for `duration` with the defaults of `jai-bench chaos`.
    pub fn new(duration: Duration, seed: u64) -> Self {
        Self {
            duration,
            seed,
            sequence: None,
            only: None,
            hold_min: Duration::from_secs(1),
            hold_max: Duration::from_secs(15),
            recovery_timeout: Duration::from_secs(90),
            verbose: true,
        }
    }
}

/// The seed to use: `JAI_CHAOS_SEED` if set, else `given`, else a random one.
pub fn seed_from_env(given: Option<u64>) -> Result<u64> {
    match std::env::var("JAI_CHAOS_SEED") {
        Ok(text) if !text.trim().is_empty() => text
            .trim()
            .parse()
            .with_context(|| format!("JAI_CHAOS_SEED={text:?} is not a number")),
        _ => Ok(given.unwrap_or_else(rand::random)),
    }
}

/// One fault of the schedule, as it went.
#[derive(Debug, Clone)]
pub struct FaultRecord {
    /// 1-based.
    pub index: usize,
    /// What.
    pub kind: FaultKind,
    /// On whom, e.g. `pg2 (primary)`, `etcd1+etcd3`.
    pub target: String,
    /// How long it was held.
    pub hold: Duration,
    /// From the start of the run.
    pub injected_at: Duration,
    /// When it was injected.
    pub injected: Instant,
    /// The same on the wall clock, to find it in the agents' logs.
    pub injected_wall: std::time::SystemTime,
    /// When it was healed.
    pub healed: Instant,
    /// When the cluster was seen recovered (None: not within the bound).
    pub recovered: Option<Instant>,
    /// The primary before, and after recovery.
    pub primary_before: String,
    /// `-` if it did not recover.
    pub primary_after: String,
    /// Leader changes (another member holds the key) seen between injection
    /// and recovery.
    pub leader_changes: usize,
    /// The longest gap between acknowledged writes overlapping the fault.
    pub max_gap: Duration,
    /// Acknowledged writes in this step's window, and of those missing at the end.
    pub acked: usize,
    /// Missing at the end.
    pub lost: usize,
    /// Sampler rounds with two writable members during the step.
    pub two_writable_samples: usize,
    /// Anything the step itself found wrong (a heal or a `jaictl` failure).
    pub notes: Vec<String>,
    /// When the step started (waiting for a settled cluster).
    step_start: Instant,
}

impl FaultRecord {
    fn is_switchover(&self) -> bool {
        self.kind == FaultKind::Switchover
    }

    /// Failovers: leader changes not asked for (a switchover's first change is planned).
    pub fn failovers(&self) -> usize {
        if self.is_switchover() {
            self.leader_changes.saturating_sub(1)
        } else {
            self.leader_changes
        }
    }

    /// 1 if a planned switchover changed the leader.
    pub fn switchovers(&self) -> usize {
        usize::from(self.is_switchover() && self.leader_changes >= 1)
    }
}

/// The whole run.
#[derive(Debug, Clone)]
pub struct ChaosReport {
    /// The seed (replay with `JAI_CHAOS_SEED`).
    pub seed: u64,
    /// How long the schedule ran.
    pub elapsed: Duration,
    /// Every fault, in order.
    pub faults: Vec<FaultRecord>,
    /// Writes acknowledged.
    pub acked: usize,
    /// Acknowledged writes missing at the end.
    pub lost: usize,
    /// Tenures `(member, timeline)` in the ledger.
    pub tenures: usize,
    /// Sampler rounds, and those with two writable members.
    pub samples: usize,
    /// Rounds with two writable members, and the longest such stretch.
    pub two_writable_samples: usize,
    /// The longest stretch with two writable members.
    pub two_writable_longest: Duration,
    /// Whether the cluster ran in `synchronous_mode`.
    pub synchronous_mode: bool,
    /// Every invariant violation, described.
    pub violations: Vec<String>,
}

// ---------------------------------------------------------------- checkers

/// The one-writer check on the ledger: tenures `(member, timeline)` in the
/// order of acknowledgement must not interleave, and the timeline never goes
/// back. Returns one line per violation (at most `limit`).
pub fn one_writer_violations(acks: &[Ack], origin: Instant, limit: usize) -> (Vec<String>, usize) {
    let mut violations = Vec::new();
    let mut current: Option<(&str, u32)> = None;
    let mut closed: HashSet<(&str, u32)> = HashSet::new();
    let mut highest = 0u32;
    let mut tenures = 0;
    let at = |ack: &Ack| ack.at.saturating_duration_since(origin).as_millis();
    let mut previous: Option<&Ack> = None;
    for ack in acks {
        let key = (ack.member.as_str(), ack.timeline);
        if current != Some(key) {
            tenures += 1;
            let mut why = Vec::new();
            if closed.contains(&key) {
                why.push("its tenure had ended: another member acknowledged writes in between");
            }
            if ack.timeline != 0 && ack.timeline < highest {
                why.push("on a lower timeline than an earlier acknowledgement");
            }
            if let Some((member, timeline)) = current {
                if timeline != 0 && timeline == ack.timeline && member != ack.member {
                    why.push("two members acknowledged writes on the same timeline");
                }
                closed.insert((member, timeline));
            }
            if !why.is_empty() && violations.len() < limit {
                let before = previous
                    .map(|p| {
                        format!(
                            " (previous ack: id {} by {} on timeline {} at +{} ms)",
                            p.id,
                            p.member,
                            p.timeline,
                            at(p)
                        )
                    })
                    .unwrap_or_default();
                violations.push(format!(
                    "one writer: id {} acknowledged by {} on timeline {} at +{} ms: {}{before}",
                    ack.id,
                    ack.member,
                    ack.timeline,
                    at(ack),
                    why.join("; ")
                ));
            }
            current = Some(key);
        }
        highest = highest.max(ack.timeline);
        previous = Some(ack);
    }
    (violations, tenures)
}

/// One sampler round.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    /// Members whose PostgreSQL answered "not in recovery" within the round.
    writable: Vec<String>,
    /// The leader key, if etcd answered.
    leader: Option<Option<(String, i64)>>,
}

struct Sampler {
    samples: Arc<Mutex<Vec<Sample>>>,
    /// When each tenure `(member, timeline)` was first seen writable (the
    /// answer's arrival: it was writable before).
    first_writable: Arc<Mutex<BTreeMap<(String, u32), Instant>>>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

const SAMPLE_EVERY: Duration = Duration::from_millis(100);

impl Sampler {
    /// Starts sampling every member and the leader key, for at most `max`.
    fn start(lab: &Lab, max: Duration) -> Result<Sampler> {
        let stop = CancellationToken::new();
        let rounds = (max.as_millis() / SAMPLE_EVERY.as_millis()) as u64 + 1;
        let password = lab.superuser_password()?;
        let user = lab.desc.postgres.superuser.clone();
        let latest: Arc<Mutex<BTreeMap<String, (Instant, bool)>>> = Arc::default();
        let first_writable: Arc<Mutex<BTreeMap<(String, u32), Instant>>> = Arc::default();
        let mut tasks = Vec::new();
        for node in &lab.desc.nodes {
            let (name, address) = (node.name.clone(), node.pg.clone());
            let (user, password, latest, stop) =
                (user.clone(), password.clone(), latest.clone(), stop.clone());
            let first_writable = first_writable.clone();
            tasks.push(tokio::spawn(async move {
                let mut client: Option<tokio_postgres::Client> = None;
                for _ in 0..rounds {
                    if stop.is_cancelled() {
                        return;
                    }
                    if let Some((writable, timeline)) =
                        probe_writable(&mut client, &address, &user, &password).await
                    {
                        let seen = Instant::now();
                        if writable {
                            first_writable
                                .lock()
                                .expect("sampler lock")
                                .entry((name.clone(), timeline))
                                .or_insert(seen);
                        }
                        latest
                            .lock()
                            .expect("sampler lock")
                            .insert(name.clone(), (seen, writable));
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(SAMPLE_EVERY) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }));
        }
        let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
        let (record, halt) = (samples.clone(), stop.clone());
        let etcd_endpoints = lab.desc.etcd.clone();
        let leader_key = jai_proto::ClusterKeys::new(&lab.desc.cluster).leader();
        tasks.push(tokio::spawn(async move {
            let options = etcd_client::ConnectOptions::new()
                .with_connect_timeout(Duration::from_millis(500))
                .with_timeout(Duration::from_millis(500));
            let mut etcd = etcd_client::Client::connect(&etcd_endpoints, Some(options))
                .await
                .ok();
            for _ in 0..rounds {
                if halt.is_cancelled() {
                    return;
                }
                let at = Instant::now();
                let leader = match etcd.as_mut() {
                    Some(client) => tokio::time::timeout(
                        Duration::from_millis(500),
                        client.get(leader_key.as_str(), None),
                    )
                    .await
                    .ok()
                    .and_then(|answer| answer.ok())
                    .map(|answer| {
                        answer.kvs().first().map(|kv| {
                            (
                                kv.value_str().unwrap_or_default().to_owned(),
                                kv.create_revision(),
                            )
                        })
                    }),
                    None => None,
                };
                // Only answers from this round count: a frozen member's last
                // answer must not look current.
                let writable = latest
                    .lock()
                    .expect("sampler lock")
                    .iter()
                    .filter(|(_, (seen, writable))| {
                        *writable && at.saturating_duration_since(*seen) <= 2 * SAMPLE_EVERY
                    })
                    .map(|(name, _)| name.clone())
                    .collect();
                record.lock().expect("sampler lock").push(Sample {
                    at,
                    writable,
                    leader,
                });
                tokio::select! {
                    _ = tokio::time::sleep(SAMPLE_EVERY) => {}
                    _ = halt.cancelled() => return,
                }
            }
        }));
        Ok(Sampler {
            samples,
            first_writable,
            stop,
            tasks,
        })
    }

    fn snapshot(&self) -> Vec<Sample> {
        self.samples.lock().expect("sampler lock").clone()
    }

    async fn finish(self) -> (Vec<Sample>, BTreeMap<(String, u32), Instant>) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        let samples = self.samples.lock().expect("sampler lock").clone();
        let first_writable = self.first_writable.lock().expect("sampler lock").clone();
        (samples, first_writable)
    }
}

/// `Some((true, timeline))` when the member accepts writes, `Some((false, 0))`
/// when it is in recovery, `None` when it did not answer in time.
async fn probe_writable(
    client: &mut Option<tokio_postgres::Client>,
    address: &str,
    user: &str,
    password: &str,
) -> Option<(bool, u32)> {
    if client
        .as_ref()
        .is_none_or(tokio_postgres::Client::is_closed)
    {
        let connected = tokio::time::timeout(
            Duration::from_millis(500),
            crate::lab::connect(address, user, password, "postgres"),
        )
        .await;
        *client = Some(connected.ok()?.ok()?);
    }
    let query = client.as_ref()?.query_one(
        "SELECT NOT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN '' \
         ELSE pg_walfile_name(pg_current_wal_lsn()) END",
        &[],
    );
    match tokio::time::timeout(Duration::from_millis(300), query).await {
        Ok(Ok(row)) => {
            let writable: bool = row.try_get(0).ok()?;
            let wal_file: String = row.try_get(1).ok()?;
            Some((writable, bench::timeline_of(&wal_file)))
        }
        _ => {
            *client = None;
            None
        }
    }
}

/// (acknowledging member, its timeline, newer member, newer timeline).
type TenurePair = (String, u32, String, u32);
/// (count, lost, first id, first sent at ms, newer seen at ms).
type StaleAcks = (usize, usize, i64, u128, u128);

/// The one-writer check across the sampler and the ledger: a write
/// acknowledged by a tenure `(member, timeline)` whose insert was sent after
/// a tenure on a higher timeline had been seen writable. Two members were
/// writable and the older one acknowledged a write inside the newer one's
/// window (such a write is on a timeline the new primary has left behind).
/// One line per pair of tenures; `present` tells which writes survived.
pub fn acks_after_a_newer_primary(
    acks: &[Ack],
    first_writable: &BTreeMap<(String, u32), Instant>,
    present: &HashSet<i64>,
    origin: Instant,
) -> Vec<String> {
    let mut events: Vec<(Instant, u32, &str)> = first_writable
        .iter()
        .map(|((member, timeline), at)| (*at, *timeline, member.as_str()))
        .collect();
    events.sort();
    let mut newest: Option<(u32, &str, Instant)> = None;
    let mut next = 0;
    let mut found: BTreeMap<TenurePair, StaleAcks> = BTreeMap::new();
    for ack in acks {
        while next < events.len() && events[next].0 <= ack.sent {
            let (at, timeline, member) = events[next];
            if newest.is_none_or(|(highest, _, _)| timeline > highest) {
                newest = Some((timeline, member, at));
            }
            next += 1;
        }
        let Some((timeline, member, seen)) = newest else {
            continue;
        };
        if ack.timeline != 0 && timeline > ack.timeline && member != ack.member {
            let entry = found
                .entry((
                    ack.member.clone(),
                    ack.timeline,
                    member.to_owned(),
                    timeline,
                ))
                .or_insert((
                    0,
                    0,
                    ack.id,
                    ack.sent.saturating_duration_since(origin).as_millis(),
                    seen.saturating_duration_since(origin).as_millis(),
                ));
            entry.0 += 1;
            entry.1 += usize::from(!present.contains(&ack.id));
        }
    }
    found
        .into_iter()
        .map(|((old, old_tl, new, new_tl), (count, lost, id, sent, seen))| {
            format!(
                "one writer: {old} (timeline {old_tl}) acknowledged {count} write(s) sent after {new} \
                 was seen writable on timeline {new_tl} at +{seen} ms (first: id {id} sent at +{sent} ms); \
                 {lost} of them lost"
            )
        })
        .collect()
}

/// Leader changes (the key names another member than the last one named)
/// among `samples` in `[from, to]`.
fn leader_changes(samples: &[Sample], from: Instant, to: Instant) -> usize {
    let mut last: Option<String> = None;
    let mut changes = 0;
    for sample in samples {
        let Some(Some((name, _))) = &sample.leader else {
            continue;
        };
        if sample.at < from {
            last = Some(name.clone());
            continue;
        }
        if sample.at > to {
            break;
        }
        if last.as_ref().is_some_and(|last| last != name) {
            changes += 1;
        }
        last = Some(name.clone());
    }
    changes
}

/// The longest stretch without an acknowledged write inside `[from, to]`:
/// gaps that end in the window, and the stretch from the last
/// acknowledgement to `to`. A gap that began before `from` counts whole.
fn max_gap(acks: &[Ack], from: Instant, to: Instant) -> Duration {
    let first = acks.partition_point(|ack| ack.at < from);
    let mut previous = first.checked_sub(1).map_or(from, |index| acks[index].at);
    let mut longest = Duration::ZERO;
    for ack in acks[first..].iter().take_while(|ack| ack.at <= to) {
        longest = longest.max(ack.at.saturating_duration_since(previous));
        previous = ack.at;
    }
    longest.max(to.saturating_duration_since(previous))
}

// ---------------------------------------------------------------- schedule

/// What an injected fault left to heal.
enum Injected {
    Nothing,
    Node(String),
    Postgres(String),
    Etcd(String),
    Members(Vec<(String, String)>),
    Disk(String),
    EtcdMembers,
}

/// The draws of one step, made before looking at the cluster so that a seed
/// always gives the same schedule.
struct Draw {
    kind: FaultKind,
    pick: usize,
    hold: Duration,
}

fn draw(
    rng: &mut StdRng,
    options: &ChaosOptions,
    kinds: &[FaultKind],
    step: usize,
) -> Option<Draw> {
    let random_kind = kinds[rng.random_range(0..kinds.len())];
    let kind = match &options.sequence {
        Some(sequence) => *sequence.get(step)?,
        None => random_kind,
    };
    let pick = rng.random_range(0..1_000_000usize);
    let (low, high) = (
        options.hold_min.as_millis() as u64,
        options.hold_max.as_millis() as u64,
    );
    let hold = Duration::from_millis(rng.random_range(low..=high.max(low)));
    Some(Draw { kind, pick, hold })
}

/// Runs the schedule against `lab` (settled first) and checks everything.
pub async fn run_chaos(lab: &mut Lab, options: &ChaosOptions) -> Result<ChaosReport> {
    let kinds: Vec<FaultKind> = FaultKind::ALL
        .into_iter()
        .filter(|kind| kind.possible(lab))
        .filter(|kind| options.only.as_ref().is_none_or(|only| only.contains(kind)))
        .collect();
    anyhow::ensure!(
        !kinds.is_empty(),
        "no fault this lab can take was asked for"
    );
    anyhow::ensure!(lab.desc.nodes.len() >= 2, "chaos needs at least 2 nodes");
    if let Some(sequence) = &options.sequence {
        if let Some(kind) = sequence.iter().find(|kind| !kind.possible(lab)) {
            anyhow::bail!(
                "this lab cannot take {} (start it with LabSpec::chaos)",
                kind.name()
            );
        }
    }
    let say = |line: &str| {
        if options.verbose {
            eprintln!("jai-bench chaos: {line}");
        }
    };
    bench::wait_settled(lab, options.recovery_timeout)
        .await
        .context("the lab is not healthy before the chaos run")?;
    let synchronous_at_start = synchronous_mode(lab).await;
    bench::create_table(lab).await?;
    // The writer and the sampler stop by themselves after the budget plus
    // the longest a last step may take.
    let max = options.duration
        + options.hold_max
        + 3 * options.recovery_timeout
        + Duration::from_secs(120);
    let writer = Writer::start(WriterConfig::for_lab(lab, max)?);
    let sampler = Sampler::start(lab, max)?;
    let origin = Instant::now();
    say(&format!(
        "seed {} (replay: JAI_CHAOS_SEED={}), budget {}, faults: {}",
        options.seed,
        options.seed,
        humantime::format_duration(options.duration),
        kinds
            .iter()
            .map(|kind| kind.name())
            .collect::<Vec<_>>()
            .join(", ")
    ));

    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut faults: Vec<FaultRecord> = Vec::new();
    let mut violations = Vec::new();
    // Bounded in count and in time.
    for step in 0..10_000 {
        if origin.elapsed() >= options.duration {
            break;
        }
        let Some(draw) = draw(&mut rng, options, &kinds, step) else {
            break;
        };
        let step_start = Instant::now();
        let record = match one_step(lab, &writer, options, draw, step + 1, origin, step_start).await
        {
            Ok(record) => record,
            Err(error) => {
                violations.push(format!("step {}: {error:#}", step + 1));
                say(&format!("step {} aborted: {error:#}", step + 1));
                // Leave the lab whole for the final checks.
                if let Err(error) = repair(lab, options.recovery_timeout).await {
                    say(&format!("the cluster did not come back: {error:#}"));
                }
                break;
            }
        };
        let samples = sampler.snapshot();
        let end = record.recovered.unwrap_or(record.healed);
        let mut record = record;
        record.leader_changes = leader_changes(&samples, record.injected, end);
        record.two_writable_samples = samples
            .iter()
            .filter(|s| s.at >= record.step_start && s.at <= end && s.writable.len() > 1)
            .count();
        say(&fault_line(&record));
        if record.recovered.is_none() {
            violations.push(format!(
                "liveness: #{} {} on {}: not recovered within {} after healing ({})",
                record.index,
                record.kind.name(),
                record.target,
                humantime::format_duration(options.recovery_timeout),
                record.notes.join("; ")
            ));
            faults.push(record);
            // Repair what the lab can and go on only if the cluster comes back.
            if let Err(error) = repair(lab, options.recovery_timeout).await {
                say(&format!(
                    "the cluster did not come back, stopping: {error:#}"
                ));
                break;
            }
            continue;
        }
        faults.push(record);
    }
    let elapsed = origin.elapsed();

    // Let the cluster settle so that the table can be read, then check.
    if let Err(error) = bench::wait_settled(lab, options.recovery_timeout).await {
        violations.push(format!("liveness: not settled at the end: {error:#}"));
    }
    let log = writer.stop().await;
    let (samples, first_writable) = sampler.finish().await;
    let present = bench::stored_ids(lab).await?;
    let synchronous = synchronous_at_start || synchronous_mode(lab).await;

    let (one_writer, tenures) = one_writer_violations(&log.acks, origin, 20);
    violations.extend(one_writer);
    violations.extend(acks_after_a_newer_primary(
        &log.acks,
        &first_writable,
        &present,
        origin,
    ));
    let mut lost = 0;
    for ack in &log.acks {
        let step = faults.partition_point(|fault| fault.step_start <= ack.at);
        let missing = !present.contains(&ack.id);
        lost += usize::from(missing);
        if let Some(fault) = step.checked_sub(1).and_then(|index| faults.get_mut(index)) {
            fault.acked += 1;
            fault.lost += usize::from(missing);
        }
        if missing {
            let context = step
                .checked_sub(1)
                .and_then(|index| faults.get(index))
                .map(|fault| format!("#{} {}", fault.index, fault.kind.name()))
                .unwrap_or_else(|| "before the first fault".into());
            if synchronous {
                violations.push(format!(
                    "lost in synchronous_mode: id {} acknowledged by {} at +{} ms ({context})",
                    ack.id,
                    ack.member,
                    ack.at.saturating_duration_since(origin).as_millis()
                ));
            } else if context.ends_with(FaultKind::Switchover.name()) {
                violations.push(format!(
                    "lost in a planned switchover: id {} acknowledged by {} at +{} ms ({context})",
                    ack.id,
                    ack.member,
                    ack.at.saturating_duration_since(origin).as_millis()
                ));
            }
        }
    }
    for fault in &mut faults {
        let end = fault.recovered.unwrap_or(fault.healed);
        fault.max_gap = max_gap(&log.acks, fault.injected, end);
    }
    let (two_writable_samples, two_writable_longest) = two_writable(&samples);
    Ok(ChaosReport {
        seed: options.seed,
        elapsed,
        faults,
        acked: log.acks.len(),
        lost,
        tenures,
        samples: samples.len(),
        two_writable_samples,
        two_writable_longest,
        synchronous_mode: synchronous,
        violations,
    })
}

/// Undoes every fault the lab knows of, starts (or thaws) every agent that
/// is not running, and waits for a settled cluster.
async fn repair(lab: &mut Lab, timeout: Duration) -> Result<String> {
    tokio::task::block_in_place(|| -> Result<()> {
        lab.heal_everything()?;
        for name in lab.node_names() {
            if !lab.running_nodes().iter().any(|node| node.name == name) {
                lab.start_node(&name)?;
            }
        }
        Ok(())
    })?;
    bench::wait_settled(lab, timeout).await
}

/// Rounds with two writable members, and the longest run of such rounds.
fn two_writable(samples: &[Sample]) -> (usize, Duration) {
    let mut count = 0;
    let mut longest = Duration::ZERO;
    let mut since: Option<Instant> = None;
    for sample in samples {
        if sample.writable.len() > 1 {
            count += 1;
            let start = *since.get_or_insert(sample.at);
            longest = longest.max(sample.at - start + SAMPLE_EVERY);
        } else {
            since = None;
        }
    }
    (count, longest)
}

/// Whether the cluster config turns `synchronous_mode` on (any value but
/// absent, `false` or `"off"`).
async fn synchronous_mode(lab: &Lab) -> bool {
    let Ok(Some(text)) = lab.etcd_value("config").await else {
        return false;
    };
    let Ok(config) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    match config.get("synchronous_mode") {
        None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => false,
        Some(serde_json::Value::String(text)) => !matches!(text.as_str(), "off" | "false" | ""),
        Some(_) => true,
    }
}

/// The replicas of a settled cluster, sorted.
fn replicas_of(lab: &Lab, primary: &str) -> Vec<String> {
    let mut replicas: Vec<String> = lab
        .node_names()
        .into_iter()
        .filter(|name| name != primary)
        .collect();
    replicas.sort();
    replicas
}

async fn one_step(
    lab: &mut Lab,
    writer: &Writer,
    options: &ChaosOptions,
    draw: Draw,
    index: usize,
    origin: Instant,
    step_start: Instant,
) -> Result<FaultRecord> {
    // Settled, and writes going through.
    let primary = bench::wait_settled(lab, options.recovery_timeout).await?;
    crate::wait::until(
        "writes acknowledged again",
        options.recovery_timeout,
        || async { Ok((writer.healthy_for() >= Duration::from_secs(1)).then_some(())) },
    )
    .await
    .with_context(|| writer.describe())?;
    let replicas = replicas_of(lab, &primary);
    let replica = replicas[draw.pick % replicas.len()].clone();
    let all: Vec<String> = std::iter::once(primary.clone())
        .chain(replicas.iter().cloned())
        .collect();
    let anyone = all[draw.pick % all.len()].clone();
    let role = |name: &str| {
        if name == primary {
            "primary"
        } else {
            "replica"
        }
    };
    let mut notes = Vec::new();
    let hold = if draw.kind.is_instant() {
        Duration::ZERO
    } else {
        draw.hold
    };

    let injected_at = origin.elapsed();
    let injected = Instant::now();
    let injected_wall = std::time::SystemTime::now();
    let (target, pending) = tokio::task::block_in_place(|| -> Result<(String, Injected)> {
        Ok(match draw.kind {
            FaultKind::KillPrimary => {
                lab.stop_node(&primary, StopSignal::Kill)?;
                (
                    format!("{primary} (primary)"),
                    Injected::Node(primary.clone()),
                )
            }
            FaultKind::KillReplica => {
                lab.stop_node(&replica, StopSignal::Kill)?;
                (
                    format!("{replica} (replica)"),
                    Injected::Node(replica.clone()),
                )
            }
            FaultKind::KillAgent => {
                lab.stop_node(&anyone, StopSignal::KillAgent)?;
                (
                    format!("{anyone} ({})", role(&anyone)),
                    Injected::Node(anyone.clone()),
                )
            }
            FaultKind::FreezeAgent => {
                lab.stop_node(&anyone, StopSignal::Stop)?;
                (
                    format!("{anyone} ({})", role(&anyone)),
                    Injected::Node(anyone.clone()),
                )
            }
            FaultKind::KillPostgres => {
                lab.stop_node(&anyone, StopSignal::KillPostgres)?;
                (format!("{anyone} ({})", role(&anyone)), Injected::Nothing)
            }
            FaultKind::FreezePostmaster => {
                lab.freeze_postgres(&anyone, Freeze::Postmaster)?;
                (
                    format!("{anyone} ({})", role(&anyone)),
                    Injected::Postgres(anyone.clone()),
                )
            }
            FaultKind::FreezePostgres => {
                lab.freeze_postgres(&anyone, Freeze::Everything)?;
                (
                    format!("{anyone} ({})", role(&anyone)),
                    Injected::Postgres(anyone.clone()),
                )
            }
            FaultKind::CutFromEtcd => {
                lab.cut_from_etcd(&anyone)?;
                (
                    format!("{anyone} ({})", role(&anyone)),
                    Injected::Etcd(anyone.clone()),
                )
            }
            FaultKind::CutBetweenMembers => {
                lab.cut_between(&primary, &replica)?;
                (
                    format!("{primary} (primary) | {replica} (replica)"),
                    Injected::Members(vec![(primary.clone(), replica.clone())]),
                )
            }
            FaultKind::IsolateMember => {
                lab.isolate_member(&anyone)?;
                let pairs = all
                    .iter()
                    .filter(|other| **other != anyone)
                    .map(|other| (anyone.clone(), other.clone()))
                    .collect();
                (
                    format!("{anyone} ({}) | all", role(&anyone)),
                    Injected::Members(pairs),
                )
            }
            FaultKind::EtcdQuorumLoss => {
                let count = lab.desc.etcd_members.len();
                let majority = count / 2 + 1;
                let spared = draw.pick % count;
                let doomed: Vec<usize> = (0..count)
                    .map(|offset| (spared + 1 + offset) % count)
                    .take(majority)
                    .collect();
                let killed = lab.kill_etcd_members(&doomed)?;
                (killed.join("+"), Injected::EtcdMembers)
            }
            FaultKind::DiskFull => {
                let bytes = lab.fill_disk(&replica)?;
                (
                    format!("{replica} (replica, {} MiB ballast)", bytes >> 20),
                    Injected::Disk(replica.clone()),
                )
            }
            FaultKind::Switchover => (format!("{primary} (primary)"), Injected::Nothing),
            FaultKind::RestartHaproxy => {
                lab.restart_haproxy()?;
                ("haproxy".to_owned(), Injected::Nothing)
            }
        })
    })?;

    if draw.kind == FaultKind::Switchover {
        if let Err(error) = switchover(lab, &primary, options.recovery_timeout).await {
            notes.push(format!("{error:#}"));
        }
    } else {
        // The fault itself: a bounded observation window, not a wait.
        tokio::time::sleep(hold).await;
    }

    let healed_result = tokio::task::block_in_place(|| -> Result<()> {
        match &pending {
            Injected::Nothing => Ok(()),
            Injected::Node(name) => lab.start_node(name),
            Injected::Postgres(name) => lab.thaw_postgres(name),
            Injected::Etcd(name) => lab.heal_etcd(name),
            Injected::Members(pairs) => {
                for (a, b) in pairs {
                    lab.heal_between(a, b)?;
                }
                Ok(())
            }
            Injected::Disk(name) => lab.free_disk(name),
            Injected::EtcdMembers => lab.restart_etcd_members().map(|_| ()),
        }
    });
    if let Err(error) = healed_result {
        notes.push(format!("healing failed: {error:#}"));
    }
    let healed = Instant::now();

    // Recovered: settled (one leader, everyone streaming from it, HAProxy
    // reaching it), the leader key names it, and it acknowledged a write.
    let recovery = async {
        let deadline = healed + options.recovery_timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let settled = bench::wait_settled(lab, remaining).await?;
            let key = lab.leader_key().await.ok().flatten();
            let acked = !writer.acks_by_after(&settled, healed).is_empty();
            if key.as_ref().is_some_and(|(name, _)| *name == settled) && acked {
                return Ok::<_, anyhow::Error>((settled, Instant::now()));
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "settled on {settled} but leader key {key:?}, write acknowledged by it since healing: {acked}"
                );
            }
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
    };
    let (primary_after, recovered) = match recovery.await {
        Ok((name, at)) => (name, Some(at)),
        Err(error) => {
            notes.push(format!("{error:#}"));
            ("-".to_owned(), None)
        }
    };
    Ok(FaultRecord {
        index,
        kind: draw.kind,
        target,
        hold: if draw.kind == FaultKind::Switchover {
            healed - injected
        } else {
            hold
        },
        injected_at,
        injected,
        injected_wall,
        healed,
        recovered,
        primary_before: primary,
        primary_after,
        leader_changes: 0,
        max_gap: Duration::ZERO,
        acked: 0,
        lost: 0,
        two_writable_samples: 0,
        notes,
        step_start,
    })
}

/// `jaictl switchover --force --from PRIMARY`, bounded.
async fn switchover(lab: &Lab, primary: &str, bound: Duration) -> Result<()> {
    let mut child = lab
        .jaictl(&["switchover", "--force", "--from", primary])?
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting jaictl")?;
    let deadline = Instant::now() + bound;
    loop {
        if let Some(status) = child.try_wait()? {
            let output = child.wait_with_output()?;
            anyhow::ensure!(
                status.success(),
                "jaictl switchover failed ({status}): {}{}",
                String::from_utf8_lossy(&output.stdout).trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
            return Ok(());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(anyhow!(
                "jaictl switchover did not finish within {}",
                humantime::format_duration(bound)
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------- report

fn ms(duration: Duration) -> u128 {
    duration.as_millis()
}

fn fault_line(record: &FaultRecord) -> String {
    let recovery = match record.recovered {
        Some(at) => format!("recovered {} ms after healing", ms(at - record.healed)),
        None => "NOT RECOVERED".to_owned(),
    };
    let mut line = format!(
        "#{} +{:.1}s ({}) {} on {}, held {} ms; {}; primary {} -> {}, {} leader change(s)",
        record.index,
        record.injected_at.as_secs_f64(),
        humantime::format_rfc3339_millis(record.injected_wall),
        record.kind.name(),
        record.target,
        ms(record.hold),
        recovery,
        record.primary_before,
        record.primary_after,
        record.leader_changes,
    );
    if record.two_writable_samples > 0 {
        let _ = write!(
            line,
            "; {} samples with two writable members",
            record.two_writable_samples
        );
    }
    if !record.notes.is_empty() {
        let _ = write!(line, "; {}", record.notes.join("; "));
    }
    line
}

impl ChaosReport {
    /// Per-fault lines, then the summary table by kind, then the totals.
    pub fn render(&self) -> String {
        let mut text = String::new();
        let _ = writeln!(
            text,
            "chaos run: seed {} (replay: JAI_CHAOS_SEED={}), {} of faults",
            self.seed,
            self.seed,
            humantime::format_duration(Duration::from_secs(self.elapsed.as_secs()))
        );
        for record in &self.faults {
            let _ = writeln!(
                text,
                "{}; max write gap {} ms; {} acked, {} lost",
                fault_line(record),
                ms(record.max_gap),
                record.acked,
                record.lost
            );
        }
        let mut by_kind: BTreeMap<FaultKind, Vec<&FaultRecord>> = BTreeMap::new();
        for record in &self.faults {
            by_kind.entry(record.kind).or_default().push(record);
        }
        let _ = writeln!(text);
        let _ = writeln!(
            text,
            "| fault | injected | failovers | switchovers | max write unavailability | max recovery after heal | writes lost (async) |"
        );
        let _ = writeln!(text, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        let row = |text: &mut String, name: &str, records: &[&FaultRecord]| {
            let recovery = records
                .iter()
                .map(|r| r.recovered.map_or(Duration::MAX, |at| at - r.healed))
                .max()
                .unwrap_or_default();
            let _ = writeln!(
                text,
                "| {name} | {} | {} | {} | {} ms | {} | {} |",
                records.len(),
                records.iter().map(|r| r.failovers()).sum::<usize>(),
                records.iter().map(|r| r.switchovers()).sum::<usize>(),
                records.iter().map(|r| ms(r.max_gap)).max().unwrap_or(0),
                if recovery == Duration::MAX {
                    "not recovered".to_owned()
                } else {
                    format!("{} ms", ms(recovery))
                },
                records.iter().map(|r| r.lost).sum::<usize>(),
            );
        };
        for (kind, records) in &by_kind {
            row(&mut text, kind.name(), records);
        }
        let all: Vec<&FaultRecord> = self.faults.iter().collect();
        row(&mut text, "**all**", &all);
        let _ = writeln!(text);
        let _ = writeln!(text, "faults injected: {}", self.faults.len());
        let _ = writeln!(
            text,
            "failovers: {}, switchovers: {}",
            all.iter().map(|r| r.failovers()).sum::<usize>(),
            all.iter().map(|r| r.switchovers()).sum::<usize>()
        );
        let _ = writeln!(
            text,
            "max write unavailability: {} ms",
            all.iter().map(|r| ms(r.max_gap)).max().unwrap_or(0)
        );
        let _ = writeln!(
            text,
            "writes acknowledged: {}, writes lost (async): {}{}",
            self.acked,
            self.lost,
            if self.synchronous_mode {
                " (synchronous_mode is on: every loss is a violation)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            text,
            "one-writer ledger: {} tenures (member, timeline); sampler: {} rounds, {} with two writable members (longest {} ms; reported, a violation only if both acknowledged writes in overlapping windows)",
            self.tenures,
            self.samples,
            self.two_writable_samples,
            ms(self.two_writable_longest)
        );
        let _ = writeln!(text, "invariant violations: {}", self.violations.len());
        for violation in &self.violations {
            let _ = writeln!(text, "  VIOLATION {violation}");
        }
        let _ = writeln!(
            text,
            "chaos faults={} failovers={} switchovers={} max_unavailable_ms={} acked={} lost_async={} violations={} seed={}",
            self.faults.len(),
            all.iter().map(|r| r.failovers()).sum::<usize>(),
            all.iter().map(|r| r.switchovers()).sum::<usize>(),
            all.iter().map(|r| ms(r.max_gap)).max().unwrap_or(0),
            self.acked,
            self.lost,
            self.violations.len(),
            self.seed
        );
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acks(origin: Instant, list: &[(&str, u32)]) -> Vec<Ack> {
        list.iter()
            .enumerate()
            .map(|(index, (member, timeline))| Ack {
                id: index as i64 + 1,
                sent: origin + Duration::from_millis(20 * index as u64),
                at: origin + Duration::from_millis(20 * index as u64),
                member: (*member).to_owned(),
                timeline: *timeline,
            })
            .collect()
    }

    #[test]
    fn tenures_that_follow_each_other_are_fine() {
        let origin = Instant::now();
        let ledger = acks(
            origin,
            &[
                ("pg1", 1),
                ("pg1", 1),
                ("pg2", 2),
                ("pg2", 2),
                ("pg1", 3),
                ("pg1", 3),
            ],
        );
        let (violations, tenures) = one_writer_violations(&ledger, origin, 10);
        assert!(violations.is_empty(), "{violations:?}");
        assert_eq!(tenures, 3);
    }

    #[test]
    fn an_old_primary_acknowledging_after_the_new_one_is_a_violation() {
        let origin = Instant::now();
        let ledger = acks(origin, &[("pg1", 1), ("pg2", 2), ("pg1", 1), ("pg2", 2)]);
        let (violations, _) = one_writer_violations(&ledger, origin, 10);
        assert_eq!(violations.len(), 2, "{violations:?}");
        assert!(violations[0].contains("id 3"), "{violations:?}");
    }

    #[test]
    fn two_members_on_one_timeline_is_a_violation() {
        let origin = Instant::now();
        let ledger = acks(origin, &[("pg1", 2), ("pg2", 2)]);
        let (violations, _) = one_writer_violations(&ledger, origin, 10);
        assert_eq!(violations.len(), 1, "{violations:?}");
    }

    #[test]
    fn the_longest_gap_overlapping_a_window() {
        let origin = Instant::now();
        let at = |ms: u64| origin + Duration::from_millis(ms);
        let ledger: Vec<Ack> = [0u64, 100, 1100, 1200, 5000]
            .iter()
            .enumerate()
            .map(|(index, ms)| Ack {
                id: index as i64,
                sent: at(*ms),
                at: at(*ms),
                member: "pg1".into(),
                timeline: 1,
            })
            .collect();
        assert_eq!(
            max_gap(&ledger, at(150), at(1300)),
            Duration::from_millis(1000)
        );
        assert_eq!(
            max_gap(&ledger, at(1250), at(2000)),
            Duration::from_millis(800)
        );
        assert_eq!(
            max_gap(&ledger[..4], at(1250), at(2000)),
            Duration::from_millis(800)
        );
    }

    #[test]
    fn an_old_primary_acknowledging_after_a_newer_one_was_writable_is_a_violation() {
        let origin = Instant::now();
        let ledger = acks(origin, &[("pg1", 1), ("pg1", 1), ("pg1", 1), ("pg2", 2)]);
        let ms = |ms: u64| origin + Duration::from_millis(ms);
        // pg2 seen writable on timeline 2 at 30 ms: pg1's ack sent at 40 ms is stale.
        let first_writable = BTreeMap::from([
            (("pg1".to_owned(), 1), ms(0)),
            (("pg2".to_owned(), 2), ms(30)),
        ]);
        let present: HashSet<i64> = [1, 2, 4].into();
        let violations = acks_after_a_newer_primary(&ledger, &first_writable, &present, origin);
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0].contains("1 write(s)") && violations[0].contains("1 of them lost"));
        // Seen writable only after the last ack of pg1: fine.
        let later = BTreeMap::from([(("pg2".to_owned(), 2), ms(50))]);
        assert!(acks_after_a_newer_primary(&ledger, &later, &present, origin).is_empty());
    }

    #[test]
    fn a_seed_gives_the_same_schedule() {
        let options = ChaosOptions::new(Duration::from_secs(60), 42);
        let kinds = FaultKind::ALL.to_vec();
        let schedule = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20)
                .map(|step| {
                    let draw = draw(&mut rng, &options, &kinds, step).unwrap();
                    (draw.kind, draw.pick, draw.hold)
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(schedule(42), schedule(42));
        assert_ne!(schedule(42), schedule(43));
    }
}
