//! Benchmarks on a lab: how long writes through HAProxy's write port are
//! unavailable when the primary fails, and whether any acknowledged write is
//! lost (docs/benchmarks.md).
//!
//! The pieces are independent of the fault, so that other faults (a planned
//! switchover) reuse them:
//!
//! - [`Writer`]: a background task that inserts `id = 1, 2, 3, …` through the
//!   write port every 20 ms and records every acknowledged id, when, and which
//!   member acknowledged it.
//! - [`Fault`]: what a run does to the primary at T0, and how it recovers.
//! - [`run_bench`]: the runs (wait healthy and writing, T0, measure, recover),
//!   then the check of every acknowledged id; [`Report::render`] prints it.

use crate::lab::Lab;
use crate::StopSignal;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The benchmark table, created anew at the start of a benchmark.
pub const TABLE: &str = "bench_writes";

/// How often the writer inserts, and how often the measurement polls.
pub const TICK: Duration = Duration::from_millis(20);

/// How long the writer must have been acknowledged without a failure before T0.
pub const SETTLE: Duration = Duration::from_secs(2);

/// How the writer connects and how long it waits.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// `HOST:PORT` to write to (HAProxy's write port).
    pub address: String,
    /// Role.
    pub user: String,
    /// Its password.
    pub password: String,
    /// Database.
    pub database: String,
    /// One insert per interval.
    pub interval: Duration,
    /// The most a connection (TCP, startup, authentication) may take.
    pub connect_timeout: Duration,
    /// The most one insert may take (also the server's `statement_timeout`).
    pub statement_timeout: Duration,
    /// The writer stops by itself after this long, whatever happens.
    pub max_duration: Duration,
}

impl WriterConfig {
    /// Writes through the lab's HAProxy write port as the application role,
    /// every 20 ms, with a 500 ms connect timeout and a 1 s statement timeout.
    pub fn for_lab(lab: &Lab, max_duration: Duration) -> Result<Self> {
        let access = &lab.desc.postgres;
        Ok(Self {
            address: lab.desc.haproxy.write.clone(),
            user: access.user.clone(),
            password: access.password()?,
            database: access.database.clone(),
            interval: TICK,
            connect_timeout: Duration::from_millis(500),
            statement_timeout: Duration::from_secs(1),
            max_duration,
        })
    }
}

/// One acknowledged insert: the COMMIT returned OK.
#[derive(Debug, Clone)]
pub struct Ack {
    /// The id inserted.
    pub id: i64,
    /// When the insert was sent (or the connection began, if it had to).
    pub sent: Instant,
    /// When the acknowledgement arrived.
    pub at: Instant,
    /// The member that acknowledged it (`current_setting('cluster_name')`).
    pub member: String,
    /// The timeline it was written on (0 if unknown): a member's timeline
    /// changes each time it is promoted, so `(member, timeline)` names one
    /// tenure as primary.
    pub timeline: u32,
}

/// What the writer has recorded so far.
#[derive(Debug, Default, Clone)]
pub struct WriterLog {
    /// Every acknowledged insert, in order.
    pub acks: Vec<Ack>,
    /// Inserts attempted (each with a fresh id).
    pub attempts: u64,
    /// Attempts that failed (connect, insert or timeout).
    pub failures: u64,
    /// The last failure, and when.
    pub last_failure: Option<(Instant, String)>,
    /// The first acknowledgement after the last failure.
    pub streak_start: Option<Instant>,
}

/// A background task writing through one address (see [`WriterConfig`]).
pub struct Writer {
    log: Arc<Mutex<WriterLog>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

const INSERT: &str = "INSERT INTO bench_writes (id) VALUES ($1) \
     RETURNING current_setting('cluster_name'), pg_walfile_name(pg_current_wal_lsn())";

impl Writer {
    /// Starts writing at once.
    pub fn start(config: WriterConfig) -> Writer {
        let log = Arc::new(Mutex::new(WriterLog::default()));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(write_loop(config, log.clone(), stopped));
        Writer { log, stop, task }
    }

    fn with_log<T>(&self, read: impl FnOnce(&WriterLog) -> T) -> T {
        read(&self.log.lock().expect("writer log lock"))
    }

    /// How long the writer has been acknowledged without a failure.
    pub fn healthy_for(&self) -> Duration {
        self.with_log(|log| log.streak_start.map_or(Duration::ZERO, |at| at.elapsed()))
    }

    /// The first acknowledgement after `after` by a member other than `not_by`.
    pub fn first_ack_after(&self, after: Instant, not_by: &str) -> Option<Ack> {
        self.with_log(|log| {
            let start = log.acks.partition_point(|ack| ack.at <= after);
            log.acks[start..]
                .iter()
                .find(|ack| ack.member != not_by)
                .cloned()
        })
    }

    /// The last acknowledgement before `before`.
    pub fn last_ack_before(&self, before: Instant) -> Option<Ack> {
        self.with_log(|log| {
            let end = log.acks.partition_point(|ack| ack.at < before);
            end.checked_sub(1).map(|last| log.acks[last].clone())
        })
    }

    /// Acknowledgements by `member` after `after`.
    pub fn acks_by_after(&self, member: &str, after: Instant) -> Vec<Ack> {
        self.with_log(|log| {
            let start = log.acks.partition_point(|ack| ack.at <= after);
            log.acks[start..]
                .iter()
                .filter(|ack| ack.member == member)
                .cloned()
                .collect()
        })
    }

    /// A copy of what has been recorded so far.
    pub fn snapshot(&self) -> WriterLog {
        self.with_log(Clone::clone)
    }

    /// Why the writer is not (yet) healthy, for error messages.
    pub fn describe(&self) -> String {
        self.with_log(|log| {
            let last = match &log.last_failure {
                Some((at, error)) => format!(
                    "; last failure {} ms ago: {error}",
                    at.elapsed().as_millis()
                ),
                None => String::new(),
            };
            format!(
                "{} attempts, {} acknowledged, {} failed{last}",
                log.attempts,
                log.acks.len(),
                log.failures
            )
        })
    }

    /// Stops writing (after the insert in flight, if any) and returns the log.
    pub async fn stop(self) -> WriterLog {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
        let log = self.log.lock().expect("writer log lock");
        log.clone()
    }
}

async fn write_loop(
    config: WriterConfig,
    log: Arc<Mutex<WriterLog>>,
    mut stopped: watch::Receiver<bool>,
) {
    let started = Instant::now();
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client: Option<tokio_postgres::Client> = None;
    let mut next_id: i64 = 1;
    while started.elapsed() < config.max_duration {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stopped.changed() => {}
        }
        if *stopped.borrow() {
            break;
        }
        let id = next_id;
        next_id += 1;
        let sent = Instant::now();
        let result = insert(&mut client, &config, id).await;
        let now = Instant::now();
        let mut log = log.lock().expect("writer log lock");
        log.attempts += 1;
        match result {
            Ok((member, timeline)) => {
                log.streak_start.get_or_insert(now);
                log.acks.push(Ack {
                    id,
                    sent,
                    at: now,
                    member,
                    timeline,
                });
            }
            Err(error) => {
                // Reconnect on the next tick: HAProxy picks the server per connection.
                client = None;
                log.failures += 1;
                log.streak_start = None;
                log.last_failure = Some((now, format!("{error:#}")));
            }
        }
    }
}

/// One insert, connecting first if needed. Returns the acknowledging member
/// and the timeline of its WAL insert position.
async fn insert(
    client: &mut Option<tokio_postgres::Client>,
    config: &WriterConfig,
    id: i64,
) -> Result<(String, u32)> {
    if client
        .as_ref()
        .is_none_or(tokio_postgres::Client::is_closed)
    {
        *client = Some(
            tokio::time::timeout(config.connect_timeout, connect(config))
                .await
                .map_err(|_| anyhow!("connect timed out"))??,
        );
    }
    let connected = client.as_ref().expect("connected above");
    let row = tokio::time::timeout(
        config.statement_timeout,
        connected.query_one(INSERT, &[&id]),
    )
    .await
    .map_err(|_| anyhow!("insert timed out"))??;
    let wal_file: String = row.try_get(1)?;
    Ok((row.try_get(0)?, timeline_of(&wal_file)))
}

/// The timeline of a WAL file name (its first 8 hex digits); 0 if none.
pub fn timeline_of(wal_file: &str) -> u32 {
    wal_file
        .get(..8)
        .and_then(|hex| u32::from_str_radix(hex, 16).ok())
        .unwrap_or(0)
}

async fn connect(config: &WriterConfig) -> Result<tokio_postgres::Client> {
    let (host, port) = config
        .address
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("{:?} is not HOST:PORT", config.address))?;
    let (client, connection) = tokio_postgres::Config::new()
        .host(host)
        .port(port.parse()?)
        .user(&config.user)
        .password(&config.password)
        .dbname(&config.database)
        .application_name("jai-bench")
        .connect_timeout(config.connect_timeout)
        .options(format!(
            "-c statement_timeout={}",
            config.statement_timeout.as_millis()
        ))
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// What a run does to the primary at T0: same writer, same measurement,
/// another trigger and recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL to the primary's agent and postmaster at once (the machine
    /// dies); recovery starts the node again and waits until it streams.
    KillPrimary,
    /// `jaictl switchover --force` to the best replica; the old primary
    /// rejoins by itself. Unavailability is the gap between the old primary's
    /// last acknowledged write and the new one's first (the old primary keeps
    /// taking writes while it checkpoints).
    Switchover,
}

/// What `inject` left running, for `recover` to finish.
pub enum Injected {
    /// Nothing.
    Nothing,
    /// The `jaictl` process, which waits for the new leader.
    Jaictl(std::process::Child),
}

impl Fault {
    /// The benchmark's name, the first word of the machine-readable line.
    pub fn bench_name(self) -> &'static str {
        match self {
            Fault::KillPrimary => "failover",
            Fault::Switchover => "switchover",
        }
    }

    /// Applies the fault to `primary`; called right after T0.
    fn inject(self, lab: &mut Lab, primary: &str) -> Result<Injected> {
        match self {
            Fault::KillPrimary => {
                tokio::task::block_in_place(|| lab.stop_node(primary, StopSignal::Kill))?;
                Ok(Injected::Nothing)
            }
            Fault::Switchover => {
                let child = lab
                    .jaictl(&["switchover", "--force", "--from", primary])?
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .context("starting jaictl")?;
                Ok(Injected::Jaictl(child))
            }
        }
    }

    /// Undoes the fault once the measurement is over.
    fn recover(self, lab: &mut Lab, primary: &str, injected: Injected) -> Result<()> {
        match (self, injected) {
            (Fault::KillPrimary, _) => tokio::task::block_in_place(|| lab.start_node(primary)),
            (Fault::Switchover, Injected::Jaictl(child)) => {
                let output = tokio::task::block_in_place(|| child.wait_with_output())?;
                anyhow::ensure!(
                    output.status.success(),
                    "jaictl switchover failed ({}): {}{}",
                    output.status,
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
                Ok(())
            }
            (Fault::Switchover, Injected::Nothing) => Ok(()),
        }
    }

    /// What happened at T0, for the per-run line.
    fn describe(self, primary: &str) -> String {
        match self {
            Fault::KillPrimary => format!("SIGKILL {primary} (primary)"),
            Fault::Switchover => format!("jaictl switchover --from {primary}"),
        }
    }
}

/// How many runs, and the time budget of each.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Number of runs.
    pub runs: usize,
    /// Deadline of one run: healthy and writing, the fault, recovery.
    pub run_timeout: Duration,
}

/// The measurements of one run; durations are from T0.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// 1-based.
    pub index: usize,
    /// What happened at T0.
    pub fault: String,
    /// The primary at T0.
    pub old_primary: String,
    /// The member named by the leader key afterwards.
    pub new_leader: String,
    /// Writes unavailable: for a kill, T0 → the first write acknowledged by
    /// another member; for a switchover, the gap between the last write
    /// acknowledged before that one and it.
    pub unavailable: Duration,
    /// T0 → the first write acknowledged by another member.
    pub first_ack: Duration,
    /// The member that acknowledged it.
    pub first_ack_by: String,
    /// T0 → the leader key names another member.
    pub leader: Duration,
    /// T0 → the leader key is first seen absent (None: never seen absent).
    pub leader_gone: Option<Duration>,
    /// T0 → the new leader's `/primary` answers 200 (None: not seen before the write).
    pub primary_api: Option<Duration>,
    /// The routing share: the new leader's `/primary` first 200 (it is
    /// promoted and holds the lease) → the first write acknowledged through
    /// HAProxy by it. `None` when the write came before `/primary` was seen.
    pub routing: Option<Duration>,
    /// Writes acknowledged by the old primary after T0.
    pub old_primary_acks: usize,
    /// Failed write attempts between T0 and the first acknowledgement.
    pub failed_attempts: u64,
    /// Writes acknowledged in this run's window.
    pub acked: usize,
    /// Of those, missing from the table at the end.
    pub lost_acked: usize,
    /// Up to ten of the missing writes.
    pub lost_sample: Vec<LostWrite>,
    /// T0.
    pub t0: Instant,
}

/// An acknowledged write missing from the table at the end.
#[derive(Debug, Clone)]
pub struct LostWrite {
    /// Its id.
    pub id: i64,
    /// The member that acknowledged it.
    pub member: String,
    /// When, in milliseconds from its run's T0 (negative: before T0).
    pub ms_from_t0: i128,
}

/// All runs of one benchmark.
#[derive(Debug, Clone)]
pub struct Report {
    /// `failover`, …
    pub name: &'static str,
    /// In order.
    pub runs: Vec<RunResult>,
    /// Acknowledged ids missing from the table, over the whole benchmark.
    pub lost_acked: usize,
    /// Writes acknowledged over the whole benchmark.
    pub acked: usize,
}

/// Runs `fault` `options.runs` times against `lab` under a writer, then checks
/// that every acknowledged write is in the table.
pub async fn run_bench(lab: &mut Lab, fault: Fault, options: &BenchOptions) -> Result<Report> {
    anyhow::ensure!(options.runs >= 1, "--runs must be at least 1");
    let primary = wait_settled(lab, options.run_timeout)
        .await
        .context("the lab is not healthy before the benchmark")?;
    create_table(lab).await?;
    progress(&format!(
        "cluster healthy, primary {primary}; writing every {} ms through {}",
        TICK.as_millis(),
        lab.desc.haproxy.write
    ));

    let max_duration = options.run_timeout * (options.runs as u32 + 1);
    let writer = Writer::start(WriterConfig::for_lab(lab, max_duration)?);
    let mut runs = Vec::new();
    let mut windows = Vec::new();
    for index in 1..=options.runs {
        windows.push(Instant::now());
        match one_run(lab, &writer, fault, index, options).await {
            Ok(run) => {
                progress(&run_line(&run));
                runs.push(run);
            }
            Err(error) => {
                writer.stop().await;
                return Err(error.context(format!(
                    "run {index}; see the agent logs in {}/nodes/*/agent.log",
                    lab.desc.dir.display()
                )));
            }
        }
    }
    let log = writer.stop().await;
    progress(&format!(
        "writer stopped: {} attempts, {} acknowledged, {} failed",
        log.attempts,
        log.acks.len(),
        log.failures
    ));

    let present = stored_ids(lab).await?;
    let mut lost_total = 0;
    for ack in &log.acks {
        // Run i's window starts when run i starts and ends when run i+1 starts;
        // the warm-up belongs to run 1 and the tail to the last run.
        let run = windows.partition_point(|start| *start <= ack.at).max(1) - 1;
        let run = &mut runs[run];
        run.acked += 1;
        if !present.contains(&ack.id) {
            run.lost_acked += 1;
            lost_total += 1;
            if run.lost_sample.len() < 10 {
                let from_t0 = if ack.at >= run.t0 {
                    (ack.at - run.t0).as_millis() as i128
                } else {
                    -((run.t0 - ack.at).as_millis() as i128)
                };
                run.lost_sample.push(LostWrite {
                    id: ack.id,
                    member: ack.member.clone(),
                    ms_from_t0: from_t0,
                });
            }
        }
    }
    Ok(Report {
        name: fault.bench_name(),
        runs,
        lost_acked: lost_total,
        acked: log.acks.len(),
    })
}

async fn one_run(
    lab: &mut Lab,
    writer: &Writer,
    fault: Fault,
    index: usize,
    options: &BenchOptions,
) -> Result<RunResult> {
    let deadline = Instant::now() + options.run_timeout;
    let remaining = || whole_ms(deadline.saturating_duration_since(Instant::now()));

    // Healthy, and the writer acknowledged for SETTLE without a failure.
    let primary = wait_settled(lab, remaining()).await?;
    loop {
        if writer.healthy_for() >= SETTLE {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {} waiting for {} ms of acknowledged writes through {} ({})",
                humantime::format_duration(options.run_timeout),
                SETTLE.as_millis(),
                lab.desc.haproxy.write,
                writer.describe()
            );
        }
        tokio::time::sleep(TICK).await;
    }
    let primary = match lab.healthy_primary().await? {
        Some(now) if now == primary => primary,
        other => bail!("the primary changed before T0: {primary} -> {other:?}"),
    };
    let failures_before = writer.snapshot().failures;

    let mut etcd = lab.etcd().await?;
    let leader_key = jai_proto::ClusterKeys::new(&lab.desc.cluster).leader();

    let t0 = Instant::now();
    let injected = fault.inject(lab, &primary)?;

    let mut leader_gone = None;
    let mut new_leader: Option<(String, Duration)> = None;
    let mut primary_api = None;
    let mut first_ack = None;
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while new_leader.is_none() || first_ack.is_none() {
        ticker.tick().await;
        if Instant::now() >= deadline {
            bail!(
                "timed out {} after T0 ({}): leader key {}, first write on another member {}; writer: {}",
                humantime::format_duration(whole_ms(t0.elapsed())),
                fault.describe(&primary),
                match (&new_leader, leader_gone) {
                    (Some((name, _)), _) => format!("names {name}"),
                    (None, Some(gone)) => format!(
                        "absent since T0+{} ms, taken by no other member",
                        ms(gone)
                    ),
                    (None, None) => format!("still names {primary}"),
                },
                if first_ack.is_some() { "seen" } else { "not seen" },
                writer.describe()
            );
        }
        if new_leader.is_none() {
            let sent = Instant::now();
            // An unanswered poll is simply retried on the next tick.
            if let Ok(Ok(response)) = tokio::time::timeout(
                Duration::from_millis(500),
                etcd.get(leader_key.as_str(), None),
            )
            .await
            {
                match response.kvs().first() {
                    None => {
                        leader_gone.get_or_insert(sent - t0);
                    }
                    Some(kv) => {
                        let name = kv.value_str().unwrap_or_default();
                        if name != primary {
                            new_leader = Some((name.to_owned(), sent - t0));
                        }
                    }
                }
            }
        }
        if let (Some((name, _)), None, None) = (&new_leader, primary_api, &first_ack) {
            let sent = Instant::now();
            if let Ok(node) = lab.node(name) {
                if matches!(lab.api_code(node, "/primary").await, Ok(200)) {
                    primary_api = Some(sent - t0);
                }
            }
        }
        if first_ack.is_none() {
            first_ack = writer.first_ack_after(t0, &primary);
        }
    }
    let (new_leader, leader) = new_leader.expect("loop ends with a new leader");
    let first_ack = first_ack.expect("loop ends with an acknowledgement");
    let old_primary_acks = writer.acks_by_after(&primary, t0).len();
    let failed_attempts = writer.snapshot().failures - failures_before;

    fault.recover(lab, &primary, injected)?;
    wait_settled(lab, remaining()).await.with_context(|| {
        format!(
            "{primary} did not rejoin after the measurement (failed over to {new_leader} {} ms after T0)",
            ms(leader)
        )
    })?;

    Ok(RunResult {
        index,
        fault: fault.describe(&primary),
        old_primary: primary,
        new_leader,
        unavailable: match fault {
            Fault::KillPrimary => first_ack.at - t0,
            Fault::Switchover => {
                first_ack.at
                    - writer
                        .last_ack_before(first_ack.at)
                        .map_or(t0, |ack| ack.at)
            }
        },
        first_ack: first_ack.at - t0,
        routing: primary_api.map(|api| (first_ack.at - t0).saturating_sub(api)),
        first_ack_by: first_ack.member,
        leader,
        leader_gone,
        primary_api,
        old_primary_acks,
        failed_attempts,
        acked: 0,
        lost_acked: 0,
        lost_sample: Vec::new(),
        t0,
    })
}

/// Runs `jaictl status` `runs` times and reports how long each took, end to
/// end (process start to exit), the way an operator experiences it.
pub fn status_bench(lab: &Lab, runs: usize) -> Result<String> {
    anyhow::ensure!(runs >= 1, "--runs must be at least 1");
    let mut took = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let output = lab.jaictl(&["status"])?.output()?;
        took.push(started.elapsed());
        anyhow::ensure!(
            output.status.success(),
            "jaictl status failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let micros = |d: Duration| d.as_micros() as f64 / 1000.0;
    let mut sorted = took.clone();
    sorted.sort_unstable();
    let p90 = sorted[(sorted.len() * 9 / 10).min(sorted.len() - 1)];
    let (min, median, max) = min_median_max(&took);
    Ok(format!(
        "jaictl status, {runs} runs against {} nodes: min {:.1} ms, median {:.1} ms, p90 {:.1} ms, max {:.1} ms\n\
         status_ms median={median} p90={:.1} max={max} min={min} runs={runs}\n",
        lab.desc.nodes.len(),
        micros(sorted[0]),
        micros(sorted[sorted.len() / 2]),
        micros(p90),
        micros(sorted[sorted.len() - 1]),
        micros(p90),
    ))
}

/// How long every replica's WAL sender must have been streaming for the
/// cluster to count as settled.
const STREAMING_FOR: &str = "1 second";

/// Waits until the lab is healthy ([`Lab::healthy_primary`]) and every other
/// running node has streamed from the primary for at least one second, and
/// returns the primary. A standby whose WAL diverged from the primary's
/// connects, is refused and retries every second, so a single look at
/// `pg_stat_replication` may see it streaming; a WAL sender that has lived for
/// a second is a real one.
pub async fn wait_settled(lab: &Lab, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match settled_primary(lab).await {
            Ok(Ok(primary)) => return Ok(primary),
            Ok(Err(why)) => why,
            Err(error) => format!("{error:#}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "timed out after {} waiting for a settled cluster (one primary, every replica \
                 streaming from it for {STREAMING_FOR}); last: {last}",
                humantime::format_duration(whole_ms(timeout))
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One look: `Ok(Ok(primary))` when settled, `Ok(Err(why))` when not yet.
async fn settled_primary(lab: &Lab) -> Result<std::result::Result<String, String>> {
    let Some(primary) = lab.healthy_primary().await? else {
        return Ok(Err(
            "the lab's health check fails (see `jai-lab status`)".into()
        ));
    };
    let client = lab
        .connect_superuser(&lab.node(&primary)?.pg, "postgres")
        .await?;
    let query = format!(
        "SELECT application_name FROM pg_stat_replication \
         WHERE state = 'streaming' AND backend_start <= now() - interval '{STREAMING_FOR}'"
    );
    let rows = tokio::time::timeout(Duration::from_secs(3), client.query(&query, &[]))
        .await
        .map_err(|_| anyhow!("reading pg_stat_replication on {primary} timed out"))??;
    let streaming: HashSet<String> = rows.iter().map(|row| row.get(0)).collect();
    let behind: Vec<&str> = lab
        .running_nodes()
        .into_iter()
        .map(|node| node.name.as_str())
        .filter(|name| *name != primary && !streaming.contains(*name))
        .collect();
    if behind.is_empty() {
        return Ok(Ok(primary));
    }
    Ok(Err(format!(
        "{} not streaming from {primary} for {STREAMING_FOR} (see {}/nodes/<name>/state/postgresql.log)",
        behind.join(", "),
        lab.desc.dir.display()
    )))
}

fn whole_ms(duration: Duration) -> Duration {
    Duration::from_millis(duration.as_millis() as u64)
}

pub(crate) async fn create_table(lab: &Lab) -> Result<()> {
    let client = lab.connect_app(&lab.desc.haproxy.write).await?;
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {TABLE}; \
             CREATE TABLE {TABLE} (id bigint PRIMARY KEY, at timestamptz DEFAULT now())"
        ))
        .await
        .with_context(|| format!("creating {TABLE} through {}", lab.desc.haproxy.write))
}

pub(crate) async fn stored_ids(lab: &Lab) -> Result<HashSet<i64>> {
    crate::wait::until(
        &format!("reading {TABLE} through {}", lab.desc.haproxy.write),
        Duration::from_secs(30),
        || async {
            let client = lab.connect_app(&lab.desc.haproxy.write).await?;
            let rows = tokio::time::timeout(
                Duration::from_secs(10),
                client.query(&format!("SELECT id FROM {TABLE}"), &[]),
            )
            .await
            .map_err(|_| anyhow!("SELECT timed out"))??;
            Ok(Some(rows.iter().map(|row| row.get::<_, i64>(0)).collect()))
        },
    )
    .await
}

fn progress(line: &str) {
    eprintln!("jai-bench: {line}");
}

fn ms(duration: Duration) -> u128 {
    duration.as_millis()
}

fn optional_ms(duration: Option<Duration>) -> String {
    duration.map_or_else(|| "-".into(), |duration| format!("{} ms", ms(duration)))
}

fn run_line(run: &RunResult) -> String {
    format!(
        "run {}: {}; leader key gone +{}, names {} +{} ms, its /primary 200 +{}; \
         first write acked by {} +{} ms (unavailable {} ms); old primary acked {} after T0; {} failed attempts",
        run.index,
        run.fault,
        optional_ms(run.leader_gone),
        run.new_leader,
        ms(run.leader),
        optional_ms(run.primary_api),
        run.first_ack_by,
        ms(run.first_ack),
        ms(run.unavailable),
        run.old_primary_acks,
        run.failed_attempts,
    )
}

/// `(min, median, max)` in whole milliseconds; the median of an even count is
/// the mean of the two middle values.
pub fn min_median_max(values: &[Duration]) -> (u128, u128, u128) {
    let mut values: Vec<u128> = values.iter().map(|value| value.as_millis()).collect();
    values.sort_unstable();
    let count = values.len();
    if count == 0 {
        return (0, 0, 0);
    }
    let median = if count % 2 == 1 {
        values[count / 2]
    } else {
        (values[count / 2 - 1] + values[count / 2]).div_ceil(2)
    };
    (values[0], median, values[count - 1])
}

impl Report {
    /// Per-run lines, min/median/max, and last the machine-readable line:
    /// `<name>_unavailable_ms median=… max=… min=… leader_ms_median=… lost_acked=… runs=…`.
    pub fn render(&self) -> String {
        let mut text = String::new();
        for run in &self.runs {
            let _ = write!(text, "{}", run_line(run));
            let _ = write!(
                text,
                "; {} acked in its window, lost_acked={}",
                run.acked, run.lost_acked
            );
            for (index, lost) in run.lost_sample.iter().enumerate() {
                let _ = write!(
                    text,
                    "{} id {} acked by {} at T0{:+} ms",
                    if index == 0 { ":" } else { "," },
                    lost.id,
                    lost.member,
                    lost.ms_from_t0
                );
            }
            text.push('\n');
        }
        let unavailable: Vec<Duration> = self.runs.iter().map(|run| run.unavailable).collect();
        let leader: Vec<Duration> = self.runs.iter().map(|run| run.leader).collect();
        let (min, median, max) = min_median_max(&unavailable);
        let (leader_min, leader_median, leader_max) = min_median_max(&leader);
        let routing: Vec<Duration> = self.runs.iter().filter_map(|run| run.routing).collect();
        let (_, routing_median, routing_max) = min_median_max(&routing);
        let _ = writeln!(
            text,
            "write unavailability: min {min} ms, median {median} ms, max {max} ms"
        );
        let _ = writeln!(
            text,
            "time to new leader key: min {leader_min} ms, median {leader_median} ms, max {leader_max} ms"
        );
        let _ = writeln!(
            text,
            "routing (new leader's /primary 200 -> first write through HAProxy): median {routing_median} ms, max {routing_max} ms ({} of {} runs measured)",
            routing.len(),
            self.runs.len()
        );
        let _ = writeln!(
            text,
            "acknowledged writes: {}, lost: {}",
            self.acked, self.lost_acked
        );
        let _ = writeln!(
            text,
            "{}_unavailable_ms median={median} max={max} min={min} leader_ms_median={leader_median} routing_ms_median={routing_median} lost_acked={} runs={}",
            self.name,
            self.lost_acked,
            self.runs.len()
        );
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let ms = |values: &[u64]| {
            values
                .iter()
                .map(|value| Duration::from_millis(*value))
                .collect::<Vec<_>>()
        };
        assert_eq!(min_median_max(&ms(&[30, 10, 20])), (10, 20, 30));
        assert_eq!(min_median_max(&ms(&[40, 10, 20, 30])), (10, 25, 40));
        assert_eq!(min_median_max(&[]), (0, 0, 0));
    }

    #[test]
    fn the_last_line_is_machine_readable() {
        let run = |index, unavailable, leader| RunResult {
            index,
            fault: "SIGKILL pg1 (primary)".into(),
            old_primary: "pg1".into(),
            new_leader: "pg2".into(),
            unavailable: Duration::from_millis(unavailable),
            first_ack: Duration::from_millis(unavailable),
            routing: None,
            first_ack_by: "pg2".into(),
            leader: Duration::from_millis(leader),
            leader_gone: None,
            primary_api: None,
            old_primary_acks: 0,
            failed_attempts: 3,
            acked: 100,
            lost_acked: 0,
            lost_sample: Vec::new(),
            t0: Instant::now(),
        };
        let report = Report {
            name: "failover",
            runs: vec![run(1, 6000, 5000), run(2, 7000, 5200), run(3, 6500, 5100)],
            lost_acked: 0,
            acked: 300,
        };
        let text = report.render();
        assert_eq!(
            text.lines().last(),
            Some(
                "failover_unavailable_ms median=6500 max=7000 min=6000 leader_ms_median=5100 routing_ms_median=0 lost_acked=0 runs=3"
            )
        );
        assert_eq!(text.lines().count(), 3 + 5);
    }
}
