//! Failover on real etcd, PostgreSQL and HAProxy: crashes, network cuts,
//! frozen agents, and the cases that must *not* fail over.

use anyhow::{bail, Context, Result};
use jai_lab::{wait, Lab, LabSpec, StopSignal};
use jai_proto::{DynamicConfig, Tags};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::{has_row, insert, lab_dir, wait_replicated, WITHIN};

/// The shipped ttl: a dead leader is replaced within a few of these.
const TTL: Duration = Duration::from_secs(4);

fn spec(dir: &tempfile::TempDir, nodes: usize) -> LabSpec {
    common::spec(dir, nodes, 1)
}

/// Waits until exactly one node other than `old` passes `/primary` and HAProxy's
/// write port reaches it; returns its name.
async fn wait_new_primary(lab: &Lab, old: &str) -> Result<String> {
    wait::until(&format!("a primary other than {old}"), WITHIN, || async {
        let primaries = lab.primaries().await;
        let [primary] = primaries.as_slice() else {
            return Ok(None);
        };
        if primary == old {
            return Ok(None);
        }
        let client = lab
            .connect_superuser(&lab.desc.haproxy.write, "postgres")
            .await?;
        let name: String = client
            .query_one("SELECT current_setting('cluster_name')", &[])
            .await?
            .get(0);
        Ok((&name == primary).then(|| name.clone()))
    })
    .await
}

/// Watches for `window` that nothing moves: same leader and term, the same
/// postmaster on the primary. Returns how many `/primary` polls were not 200.
async fn assert_primary_stays(
    lab: &Lab,
    primary: &str,
    before: (String, i64),
    window: Duration,
) -> Result<usize> {
    let node = lab.node(primary)?.clone();
    let postmaster = jai_lab::process::postmaster_pid(&node.data_dir);
    let deadline = Instant::now() + window;
    let mut not_ok = 0;
    while Instant::now() < deadline {
        if lab.api_code(&node, "/primary").await.ok() != Some(200) {
            not_ok += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = wait::until("etcd to answer", WITHIN, || async {
        Ok(Some(lab.leader_key().await?))
    })
    .await?;
    assert_eq!(after, Some(before), "the leader key changed hands");
    assert_eq!(
        jai_lab::process::postmaster_pid(&node.data_dir),
        postmaster,
        "{primary}'s PostgreSQL was restarted or fenced"
    );
    Ok(not_ok)
}

/// Watches for `window` that no leader appears (a failover that must not happen).
async fn assert_no_leader_for(lab: &Lab, window: Duration) -> Result<()> {
    let deadline = Instant::now() + window;
    while Instant::now() < deadline {
        if let Some((leader, _)) = lab.leader_key().await? {
            bail!("{leader} took the leader key");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

async fn reason_of(lab: &Lab, name: &str) -> Result<String> {
    let status = lab.api_status(lab.node(name)?).await?;
    Ok(status["reason"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_primary_fails_over_and_the_old_primary_rejoins() -> Result<()> {
    let dir = lab_dir()?;
    let mut lab = Lab::up(spec(&dir, 3)).await?;
    let old = lab.wait_healthy(WITHIN).await?;
    insert(&lab, "before the crash").await?;
    wait_replicated(&lab, "before the crash").await?;

    lab.stop_node(&old, StopSignal::Kill)?;
    let new = lab.wait_healthy(WITHIN).await?;
    assert_ne!(new, old);
    assert!(has_row(&lab, &lab.desc.haproxy.write, "before the crash").await?);
    insert(&lab, "after the crash").await?;
    let history: Vec<serde_json::Value> =
        serde_json::from_str(&lab.etcd_value("history").await?.context("no history")?)?;
    let last = history.last().context("empty history")?;
    assert_eq!(last["new_leader"], new.as_str());
    assert!(
        last["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("failover"),
        "{last}"
    );

    lab.start_node(&old)?;
    assert_eq!(
        lab.wait_healthy(WITHIN).await?,
        new,
        "the old primary rejoins as a replica"
    );
    wait_replicated(&lab, "after the crash").await?;

    // A second failover, from the new timeline: the replicas must know they
    // are on it (their last restartpoint is still on the old one).
    lab.stop_node(&new, StopSignal::Kill)?;
    let third = lab.wait_healthy(WITHIN).await?;
    assert_ne!(third, new);
    assert!(has_row(&lab, &lab.desc.haproxy.write, "after the crash").await?);
    Ok(())
}

/// Probes every member directly every 40 ms with a write and records which
/// accepted it, so that two writers at one moment cannot go unnoticed. Each
/// write is a numbered row: the acknowledged ones must all survive.
struct OneWriterChecker {
    seen: Arc<Mutex<Seen>>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// What the checker saw.
#[derive(Debug, Default, Clone)]
struct Seen {
    /// One per round: when it started and who accepted its write.
    rounds: Vec<(Instant, Vec<String>)>,
    /// Every acknowledged row: `n`, and the member that acknowledged it.
    acked: Vec<(i64, String)>,
}

impl Seen {
    /// The writers of each round.
    fn writers(&self) -> Vec<Vec<String>> {
        self.rounds
            .iter()
            .map(|(_, writers)| writers.clone())
            .collect()
    }

    /// When the last round that `member` accepted began.
    fn last_accepted_by(&self, member: &str) -> Option<Instant> {
        self.rounds
            .iter()
            .rev()
            .find(|(_, writers)| writers.iter().any(|name| name == member))
            .map(|(at, _)| *at)
    }
}

impl OneWriterChecker {
    async fn start(lab: &Lab) -> Result<Self> {
        let admin = lab
            .connect_superuser(&lab.desc.haproxy.write, "postgres")
            .await?;
        admin
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS one_writer \
                 (n bigint, node text, at timestamptz DEFAULT now())",
            )
            .await?;
        let password = lab.superuser_password()?;
        let user = lab.desc.postgres.superuser.clone();
        let nodes: Vec<(String, String)> = lab
            .desc
            .nodes
            .iter()
            .map(|node| (node.name.clone(), node.pg.clone()))
            .collect();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = tokio_util::sync::CancellationToken::new();
        let (record, halt) = (seen.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut clients: BTreeMap<String, tokio_postgres::Client> = BTreeMap::new();
            let mut n = 0;
            // Bounded: at most 10 minutes of rounds.
            for _ in 0..15_000 {
                if halt.is_cancelled() {
                    return;
                }
                let at = Instant::now();
                let mut writers = Vec::new();
                for (name, address) in &nodes {
                    n += 1;
                    if probe_write(&mut clients, name, address, &user, &password, n).await {
                        writers.push(name.clone());
                        record.lock().unwrap().acked.push((n, name.clone()));
                    }
                }
                record.lock().unwrap().rounds.push((at, writers));
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        });
        Ok(Self { seen, stop, task })
    }

    /// Waits until a round saw `writer` accept a write: on a loaded machine a
    /// probe can time out, so the test waits for evidence instead of
    /// assuming the checker saw what happened.
    async fn wait_seen(&self, writer: &str) -> Result<()> {
        let seen = self.seen.clone();
        wait::until(
            &format!("the checker to see {writer} accept a write"),
            WITHIN,
            || {
                let found = seen.lock().unwrap().last_accepted_by(writer).is_some();
                async move { Ok(found.then_some(())) }
            },
        )
        .await
    }

    /// Stops probing; returns what it saw.
    async fn finish(self) -> Result<Seen> {
        self.stop.cancel();
        self.task.await?;
        let seen = self.seen.lock().unwrap().clone();
        Ok(seen)
    }
}

/// Writes row `n` on `name`'s PostgreSQL directly; whether it was acknowledged.
async fn probe_write(
    clients: &mut BTreeMap<String, tokio_postgres::Client>,
    name: &str,
    address: &str,
    user: &str,
    password: &str,
    n: i64,
) -> bool {
    if clients.get(name).is_none_or(|client| client.is_closed()) {
        let connected = tokio::time::timeout(
            Duration::from_millis(300),
            jai_lab::lab::connect(address, user, password, "postgres"),
        )
        .await;
        match connected {
            Ok(Ok(client)) => {
                let _ = client
                    .batch_execute("SET statement_timeout = '300ms'")
                    .await;
                clients.insert(name.to_owned(), client);
            }
            _ => return false,
        }
    }
    let client = &clients[name];
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&n, &name];
    let write = client.execute("INSERT INTO one_writer (n, node) VALUES ($1, $2)", &params);
    matches!(
        tokio::time::timeout(Duration::from_millis(400), write).await,
        Ok(Ok(1))
    )
}

/// Checks what a one-writer checker saw across a failover from `old` to
/// `new`: never two writers, nothing from `old` once `new` took writes, and
/// every acknowledged row on `new` now (nothing was discarded).
async fn assert_one_writer_and_nothing_lost(
    lab: &Lab,
    seen: &Seen,
    old: &str,
    new: &str,
) -> Result<()> {
    let rounds = seen.writers();
    let two_writers: Vec<_> = rounds.iter().filter(|writers| writers.len() > 1).collect();
    assert!(
        two_writers.is_empty(),
        "two members accepted writes at once: {two_writers:?}"
    );
    let writers: Vec<&str> = rounds
        .iter()
        .filter_map(|w| w.first().map(String::as_str))
        .collect();
    assert!(
        writers.contains(&old) && writers.contains(&new),
        "checker saw no switch"
    );
    let first_new = writers.iter().position(|w| *w == new).unwrap();
    assert!(
        writers[first_new..].iter().all(|w| *w == new),
        "the old primary accepted writes after the new one: {writers:?}"
    );
    let client = lab
        .connect_superuser(&lab.node(new)?.pg, "postgres")
        .await?;
    let kept: std::collections::BTreeSet<i64> = client
        .query("SELECT n FROM one_writer", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let lost: Vec<_> = seen
        .acked
        .iter()
        .filter(|(n, _)| !kept.contains(n))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged rows are not on the new leader {new} (row, acknowledged by): {lost:?}",
        lost.len()
    );
    let gap = rounds.iter().filter(|writers| writers.is_empty()).count();
    println!(
        "one-writer checker: {} rounds, {gap} without any writer, {} rows acknowledged, all on {new}",
        rounds.len(),
        seen.acked.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cut_off_from_etcd_demotes_before_a_replica_promotes() -> Result<()> {
    let dir = lab_dir()?;
    let mut lab = Lab::up(spec(&dir, 3)).await?;
    let old = lab.wait_healthy(WITHIN).await?;
    let checker = OneWriterChecker::start(&lab).await?;
    checker.wait_seen(&old).await?;

    lab.cut_from_etcd(&old)?;
    let new = wait_new_primary(&lab, &old).await?;
    checker.wait_seen(&new).await?;
    lab.heal_etcd(&old)?;
    assert_eq!(
        lab.wait_healthy(WITHIN).await?,
        new,
        "the old primary rejoins as a replica"
    );
    let seen = checker.finish().await?;
    assert_one_writer_and_nothing_lost(&lab, &seen, &old, &new).await
}

/// SIGSTOP of the primary's agent (its process, every thread; not its fence
/// keeper, which runs in a process group of its own): the keeper stops the
/// frozen node's PostgreSQL at the lease's fencing point, so a direct write
/// to it fails within `ttl + 1 s`, before another member is promoted, and
/// after the thaw every write any member acknowledged is on the new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_agent_is_replaced_and_cannot_keep_the_writes() -> Result<()> {
    let dir = lab_dir()?;
    let mut lab = Lab::up(spec(&dir, 3)).await?;
    let old = lab.wait_healthy(WITHIN).await?;
    let old_pg = lab.node(&old)?.pg.clone();
    let checker = OneWriterChecker::start(&lab).await?;
    checker.wait_seen(&old).await?;

    let frozen_at = Instant::now();
    lab.stop_node(&old, StopSignal::Stop)?;
    tokio::time::sleep_until((frozen_at + TTL + Duration::from_secs(1)).into()).await;
    // Directly, not through HAProxy: a refused connection or a failed INSERT.
    let stray = async {
        let client = lab.connect_app(&old_pg).await?;
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS probe (id serial PRIMARY KEY, note text NOT NULL); \
                 INSERT INTO probe (note) VALUES ('written past the lease')",
            )
            .await?;
        anyhow::Ok(())
    };
    let refused = match tokio::time::timeout(Duration::from_secs(3), stray).await {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(format!("{error:#}")),
        Err(_) => Some("no answer within 3 s".to_owned()),
    };
    let agent = lab
        .node(&old)?
        .agent_pid
        .context("the frozen agent's PID")?;
    let state = std::fs::read_to_string(format!("/proc/{agent}/stat"))?;
    assert!(
        state
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('T')),
        "{old}'s agent must still be stopped while its primary is checked: {state}"
    );
    let refused = refused.unwrap_or_else(|| {
        panic!(
            "{old}'s PostgreSQL took a write ttl + 1 s ({:?}) after its agent froze",
            TTL + Duration::from_secs(1)
        )
    });
    println!("{old} ttl + 1 s after the freeze: {refused}");

    let new = wait_new_primary(&lab, &old).await?;
    checker.wait_seen(&new).await?;
    lab.start_node(&old)?;
    assert_eq!(
        lab.wait_healthy(WITHIN).await?,
        new,
        "the thawed agent follows the new leader"
    );
    let seen = checker.finish().await?;
    let log = std::fs::read_to_string(&lab.node(&old)?.log)?;
    assert!(
        log.contains("fence keeper: the agent did not confirm the leader lease in time"),
        "{old}'s fence keeper did not fence it:\n{log}"
    );
    let last_old = seen
        .last_accepted_by(&old)
        .expect("the checker saw the old primary write");
    let fenced_after = last_old.saturating_duration_since(frozen_at);
    println!("{old} took its last write {fenced_after:?} after its agent froze");
    assert!(
        fenced_after <= TTL + Duration::from_secs(1),
        "{old} accepted writes {fenced_after:?} after its agent froze"
    );
    assert_one_writer_and_nothing_lost(&lab, &seen, &old, &new).await
}

/// `reclone_on_rewind_failure: true`, end to end: a former primary whose
/// `pg_rewind` fails is wiped and cloned from the new leader once, then
/// streams; what it wrote alone after losing its lease is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_rewind_re_clones_the_former_primary_once() -> Result<()> {
    let dir = lab_dir()?;
    let mut lab = Lab::up(LabSpec {
        reclone_on_rewind_failure: true,
        ..spec(&dir, 3)
    })
    .await?;
    let old = lab.wait_healthy(WITHIN).await?;
    insert(&lab, "before the freeze").await?;
    wait_replicated(&lab, "before the freeze").await?;

    // A frozen agent whose fence keeper was killed too leaves its primary
    // running: a client connected to it directly writes past the failover,
    // so its WAL diverges from the new leader's and a rewind is needed.
    lab.stop_node(&old, StopSignal::StopUnfenced)?;
    let new = wait_new_primary(&lab, &old).await?;
    let old_pg = lab.node(&old)?.pg.clone();
    insert(&lab, "on the new leader").await?;
    let stray = lab.connect_app(&old_pg).await?;
    stray
        .execute("INSERT INTO probe (note) VALUES ('diverged')", &[])
        .await
        .context("writing to the frozen agent's primary directly")?;
    drop(stray);
    // pg_rewind (running as the postgres user) cannot read this directory
    // of the target, so it fails once it has to compare the data directories.
    let blocker = lab.node(&old)?.data_dir.join("jai_rewind_blocker");
    std::fs::create_dir_all(&blocker)?;
    std::fs::set_permissions(
        &blocker,
        std::os::unix::fs::PermissionsExt::from_mode(0o000),
    )?;

    lab.start_node(&old)?;
    let log = lab.node(&old)?.log.clone();
    wait::until(&format!("{old} streaming from {new}"), WITHIN, || async {
        Ok(has_row(&lab, &old_pg, "on the new leader")
            .await
            .unwrap_or(false)
            .then_some(()))
    })
    .await?;
    let text = std::fs::read_to_string(&log)?;
    let count = |needle: &str| text.lines().filter(|line| line.contains(needle)).count();
    assert!(
        count("pg_rewind from") >= 1 && count("failed") >= 1,
        "{old}'s log shows no failed pg_rewind:\n{text}"
    );
    assert_eq!(
        count("re-cloning"),
        1,
        "{old} re-cloned more than once:\n{text}"
    );
    assert!(
        !blocker.exists(),
        "the re-clone wiped the old data directory"
    );
    assert!(
        !has_row(&lab, &old_pg, "diverged").await?,
        "the write taken alone after the failover is discarded with the old data"
    );
    assert_eq!(lab.wait_healthy(WITHIN).await?, new);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_crash_on_the_primary_is_restarted_in_place() -> Result<()> {
    let dir = lab_dir()?;
    let mut lab = Lab::up(spec(&dir, 2)).await?;
    let primary = lab.wait_healthy(WITHIN).await?;
    let term = lab.leader_key().await?;

    lab.stop_node(&primary, StopSignal::KillPostgres)?;
    assert_eq!(lab.wait_healthy(WITHIN).await?, primary);
    assert_eq!(
        lab.leader_key().await?,
        term,
        "no failover: same leader, same term"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_crash_with_no_start_timeout_fails_over() -> Result<()> {
    let dir = lab_dir()?;
    let dcs = DynamicConfig {
        primary_start_timeout: Duration::ZERO,
        ..DynamicConfig::default()
    };
    let mut lab = Lab::up(LabSpec {
        dcs: Some(dcs),
        ..spec(&dir, 2)
    })
    .await?;
    let old = lab.wait_healthy(WITHIN).await?;
    insert(&lab, "before the crash").await?;
    wait_replicated(&lab, "before the crash").await?;

    lab.stop_node(&old, StopSignal::KillPostgres)?;
    let new = wait_new_primary(&lab, &old).await?;
    assert_eq!(
        lab.wait_healthy(WITHIN).await?,
        new,
        "the old primary rejoins as a replica"
    );
    assert!(has_row(&lab, &lab.desc.haproxy.write, "before the crash").await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_a_healthy_primary_agent_causes_no_failover() -> Result<()> {
    let dir = lab_dir()?;
    let mut lab = Lab::up(spec(&dir, 2)).await?;
    let primary = lab.wait_healthy(WITHIN).await?;
    let term = lab.leader_key().await?;
    let postmaster = jai_lab::process::postmaster_pid(&lab.node(&primary)?.data_dir);

    lab.stop_node(&primary, StopSignal::KillAgent)?;
    lab.start_node(&primary)?;
    assert_eq!(lab.wait_healthy(WITHIN).await?, primary);
    // The killed agent's fence keeper guards the primary until the old
    // lease's fencing point; the new agent's keeper takes over from it.
    tokio::time::sleep(TTL + Duration::from_secs(1)).await;
    assert_eq!(lab.leader_key().await?, term, "same leader, same term");
    assert_eq!(
        jai_lab::process::postmaster_pid(&lab.node(&primary)?.data_dir),
        postmaster,
        "PostgreSQL kept running"
    );
    let log = std::fs::read_to_string(&lab.node(&primary)?.log)?;
    assert!(
        log.contains("took over from the previous agent's keeper"),
        "the new agent's fence keeper did not replace the old one:\n{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nofailover_member_never_promotes() -> Result<()> {
    let dir = lab_dir()?;
    let tags = BTreeMap::from([(
        "pg2".to_owned(),
        Tags {
            nofailover: true,
            ..Tags::default()
        },
    )]);
    let mut lab = Lab::up(LabSpec {
        tags,
        ..spec(&dir, 2)
    })
    .await?;
    assert_eq!(
        lab.wait_healthy(WITHIN).await?,
        "pg1",
        "a nofailover member does not bootstrap"
    );

    lab.stop_node("pg1", StopSignal::Kill)?;
    wait::until("pg1's key to expire", WITHIN, || async {
        Ok(lab.leader_key().await?.is_none().then_some(()))
    })
    .await?;
    assert_no_leader_for(&lab, 3 * TTL).await?;
    assert!(reason_of(&lab, "pg2").await?.contains("nofailover"));

    lab.start_node("pg1")?;
    assert_eq!(lab.wait_healthy(WITHIN).await?, "pg1");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_maximum_lag_on_failover_never_promotes() -> Result<()> {
    let dir = lab_dir()?;
    let mut lab = Lab::up(spec(&dir, 2)).await?;
    let primary = lab.wait_healthy(WITHIN).await?;
    let replica = lab
        .node_names()
        .into_iter()
        .find(|name| *name != primary)
        .context("no replica")?;

    // Cut the replica's replication, then write well past maximum_lag_on_failover (1 MiB).
    let standby = lab
        .connect_superuser(&lab.node(&replica)?.pg, "postgres")
        .await?;
    standby
        .batch_execute("ALTER SYSTEM SET primary_conninfo = ''")
        .await?;
    standby.batch_execute("SELECT pg_reload_conf()").await?;
    let leader = lab
        .connect_superuser(&lab.node(&primary)?.pg, "postgres")
        .await?;
    leader
        .batch_execute(
            "CREATE TABLE filler AS SELECT g, repeat('x', 1000) AS pad FROM generate_series(1, 8000) g",
        )
        .await?;
    let written: String = leader
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let written: jai_proto::Lsn = written.parse()?;
    wait::until("the leader to publish its new position", WITHIN, || async {
        let status: jai_proto::LeaderStatus =
            serde_json::from_str(&lab.etcd_value("status").await?.unwrap_or_default())?;
        Ok((status.optime >= written).then_some(()))
    })
    .await?;

    lab.stop_node(&primary, StopSignal::Kill)?;
    wait::until("the dead leader's key to expire", WITHIN, || async {
        Ok(lab.leader_key().await?.is_none().then_some(()))
    })
    .await?;
    assert_no_leader_for(&lab, 3 * TTL).await?;
    let reason = reason_of(&lab, &replica).await?;
    assert!(reason.contains("maximum_lag_on_failover"), "{reason}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_leader_change_leaves_the_primary_in_place() -> Result<()> {
    let dir = lab_dir()?;
    let lab = Lab::up(LabSpec {
        etcd_members: 3,
        ..spec(&dir, 2)
    })
    .await?;
    let primary = lab.wait_healthy(WITHIN).await?;
    let key = lab.leader_key().await?.context("no leader key")?;

    // Find etcd's leader and kill it: the other two elect a new one.
    let etcd_leader = wait::until("etcd to report its leader", WITHIN, || async {
        for member in &lab.desc.etcd_members {
            let mut client =
                etcd_client::Client::connect([member.client_url.as_str()], None).await?;
            let status = client.status().await?;
            let me = status.header().context("no header")?.member_id();
            if status.leader() == me {
                return Ok(Some(member.clone()));
            }
        }
        Ok(None)
    })
    .await?;
    jai_lab::process::signal(
        etcd_leader.pid.context("no pid")?,
        nix::sys::signal::Signal::SIGKILL,
    );

    let blips = assert_primary_stays(&lab, &primary, key, 3 * TTL).await?;
    assert_eq!(
        blips, 0,
        "/primary must stay 200 through an etcd leader change"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_second_network_hiccup_leaves_the_primary_in_place() -> Result<()> {
    let dir = lab_dir()?;
    let mut lab = Lab::up(spec(&dir, 2)).await?;
    let primary = lab.wait_healthy(WITHIN).await?;
    let key = lab.leader_key().await?.context("no leader key")?;

    lab.cut_from_etcd(&primary)?;
    tokio::time::sleep(Duration::from_secs(1)).await; // the fault itself, not a wait
    lab.heal_etcd(&primary)?;

    let blips = assert_primary_stays(&lab, &primary, key, 3 * TTL).await?;
    assert_eq!(
        blips, 0,
        "/primary must stay 200 through a 1 s cut from etcd"
    );
    Ok(())
}
