//! Backups with pgBackRest: WAL archive settings, scheduled backups, restore
//! drills, and new replicas restored from the repository.
//!
//! - [`conf`]: pgBackRest's config file and PostgreSQL's archive commands.
//! - [`schedule`]: the leader's pure decision (which job, on which member).
//! - [`store`]: the `backup/…` keys in etcd, changed by compare-and-swap.
//! - [`pgbackrest`]: runs pgBackRest and reads its JSON.
//! - [`drill`]: the restore drill behind `jaictl backup verify`.
//! - [`requests`]: the operator's backup requests from the control API.
//!
//! The [`Worker`] runs beside the HA loop, never inside it: a backup takes
//! minutes to hours and touches no safety rule (it only reads PostgreSQL),
//! so it must never delay a round. It renders the config file, and on the
//! leader decides the schedule; on every member it runs the job assigned to
//! it. Everything it knows is in etcd or in the repository, so a failover or
//! an agent restart loses nothing but the job that was running, which
//! pgBackRest never records half-done.

pub mod conf;
pub mod drill;
pub mod pgbackrest;
pub mod requests;
pub mod schedule;
pub mod store;

use crate::clock::unix_now;
use crate::config::AgentConfig;
use crate::dcs::Dcs;
use crate::ha::ClusterView;
use crate::postgres::RunAs;
use anyhow::Result;
use jai_proto::{BackupJob, BackupSettings, DynamicConfig, JobKind, JobResult, MemberRole};
use pgbackrest::PgBackRest;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How often the worker looks at etcd.
const TICK: Duration = Duration::from_secs(1);
/// How often the leader re-reads the repository for the schedule.
const REPO_READ_EVERY: Duration = Duration::from_secs(60);
/// After a failed `stanza-create`, the next attempt waits this long.
const STANZA_RETRY: Duration = Duration::from_secs(30);

/// What a member needs to call pgBackRest for the cluster.
#[derive(Debug, Clone)]
pub struct Local {
    /// This member's name.
    pub name: String,
    /// The agent's state directory.
    pub state_dir: PathBuf,
    /// The `pgbackrest` program.
    pub program: PathBuf,
    /// PostgreSQL's account.
    pub run_as: Option<RunAs>,
    /// The passfile with the superuser's password.
    pub passfile: PathBuf,
    /// The superuser.
    pub superuser: String,
    /// Its password (for the drill's own connections).
    pub password: String,
    /// PostgreSQL's programs.
    pub bin_dir: PathBuf,
    /// This member's server, as pgBackRest reaches it.
    pub own: conf::Server,
}

impl Local {
    /// From the agent's config.
    pub fn from_config(config: &AgentConfig) -> Result<Self> {
        let pg = &config.postgresql;
        Ok(Self {
            name: config.name.clone(),
            state_dir: config.state_dir.clone(),
            program: pg.pgbackrest.clone(),
            run_as: RunAs::from_config(config)?,
            passfile: config.state_dir.join("pgpass"),
            superuser: pg.superuser.username.clone(),
            password: pg.superuser.password()?,
            bin_dir: pg.bin_dir.clone(),
            own: conf::Server {
                data_dir: pg.data_dir.to_string_lossy().into_owned(),
                port: pg.listen.port(),
                socket_dir: config.socket_dir().to_string_lossy().into_owned(),
            },
        })
    }

    /// pgBackRest for the cluster's `backup` section.
    pub fn pgbackrest(&self, settings: &BackupSettings) -> PgBackRest {
        PgBackRest {
            invocation: conf::Invocation::new(&self.program, &self.state_dir, settings),
            run_as: self.run_as,
            passfile: self.passfile.clone(),
            work_dir: self.state_dir.clone(),
        }
    }

    /// Closes the current WAL segment on this (primary) server, so the
    /// archiver pushes it now.
    pub async fn switch_wal(&self) -> Result<()> {
        let mut config = tokio_postgres::Config::new();
        config.host_path(&self.own.socket_dir).port(self.own.port);
        self.switch_wal_on(config).await
    }

    /// The same on the primary at `host:port` (a restore's request, which
    /// any agent may receive).
    pub async fn switch_wal_at(&self, address: &str) -> Result<()> {
        let (host, port) = address
            .rsplit_once(':')
            .ok_or_else(|| anyhow::anyhow!("{address} is not host:port"))?;
        let mut config = tokio_postgres::Config::new();
        config.host(host).port(port.parse()?);
        self.switch_wal_on(config).await
    }

    async fn switch_wal_on(&self, config: tokio_postgres::Config) -> Result<()> {
        let client = self.connect_as_superuser(config).await?;
        client.batch_execute("SELECT pg_switch_wal()").await?;
        Ok(())
    }

    /// A superuser session on the server `config` points at (its
    /// connection task runs until the client is dropped).
    async fn connect_as_superuser(
        &self,
        mut config: tokio_postgres::Config,
    ) -> Result<tokio_postgres::Client> {
        let (client, connection) = config
            .user(&self.superuser)
            .password(&self.password)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(5))
            .connect(tokio_postgres::NoTls)
            .await?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// `pg_stat_archiver` of this (primary) server.
    pub async fn archiver_status(&self) -> Result<jai_proto::ArchiveStatus> {
        let mut config = tokio_postgres::Config::new();
        config.host_path(&self.own.socket_dir).port(self.own.port);
        let client = self.connect_as_superuser(config).await?;
        let row = client
            .query_one(
                "SELECT last_archived_wal, extract(epoch FROM last_archived_time)::bigint, \
                        last_failed_wal, extract(epoch FROM last_failed_time)::bigint \
                 FROM pg_stat_archiver",
                &[],
            )
            .await?;
        let archived_at: Option<i64> = row.get(1);
        let failed_at: Option<i64> = row.get(3);
        Ok(jai_proto::ArchiveStatus {
            member: self.name.clone(),
            failing: failed_at.is_some_and(|failed| archived_at.is_none_or(|ok| failed > ok)),
            last_archived_wal: row.get(0),
            last_archived_at: archived_at.map(|at| at as u64),
            last_failed_wal: row.get(2),
            last_failed_at: failed_at.map(|at| at as u64),
        })
    }

    /// This member's `pgbackrest.conf`.
    pub fn conf_path(&self) -> PathBuf {
        self.state_dir.join(conf::CONF_FILE)
    }

    /// Writes `pgbackrest.conf` (atomically, readable by PostgreSQL's
    /// account only) when its text changed; `primary` is the leader's
    /// server when this member is a standby on its host.
    pub fn write_conf(
        &self,
        settings: &BackupSettings,
        primary: Option<conf::Server>,
    ) -> Result<bool> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let text = conf::render(&conf::ConfInputs {
            settings,
            state_dir: &self.state_dir,
            superuser: &self.superuser,
            own: self.own.clone(),
            primary,
        });
        let path = self.conf_path();
        if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
            return Ok(false);
        }
        let dir = self.state_dir.join("pgbackrest");
        for sub in [dir.clone(), dir.join("log"), dir.join("lock")] {
            std::fs::create_dir_all(&sub)?;
            if let Some(run_as) = self.run_as {
                run_as.chown(&sub)?;
            }
        }
        let temporary = path.with_extension("conf.new");
        let _ = std::fs::remove_file(&temporary);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        if let Some(run_as) = self.run_as {
            run_as.chown(&temporary)?;
        }
        std::fs::rename(&temporary, &path)?;
        Ok(true)
    }
}

/// The job this agent runs now.
struct Running {
    id: String,
    revision: i64,
    task: JoinHandle<JobResult>,
}

/// Runs beside the HA loop: see the module docs.
pub struct Worker {
    dcs: Dcs,
    local: Local,
    fallback: DynamicConfig,
    running: Option<Running>,
    repo: Option<(Instant, schedule::RepoFacts, Option<String>)>,
    stanza: Option<(String, String)>,
    stanza_failed: Option<Instant>,
    last_warning: Option<String>,
    /// The archiver status last written to etcd.
    archive: Option<jai_proto::ArchiveStatus>,
}

impl Worker {
    /// A worker for this member; `fallback` is the config used until etcd has one.
    pub fn new(dcs: Dcs, local: Local, fallback: DynamicConfig) -> Self {
        Self {
            dcs,
            local,
            fallback,
            running: None,
            repo: None,
            stanza: None,
            stanza_failed: None,
            last_warning: None,
            archive: None,
        }
    }

    /// Ticks until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            if let Err(error) = self.tick().await {
                self.warn_once(format!("backup: {error:#}"));
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(TICK) => {}
            }
        }
    }

    fn warn_once(&mut self, text: String) {
        if self.last_warning.as_deref() != Some(text.as_str()) {
            tracing::warn!("{text}");
            self.last_warning = Some(text);
        }
    }

    async fn tick(&mut self) -> Result<()> {
        let kvs = self.dcs.read_kvs().await?;
        let view = ClusterView::from_kvs(&kvs, None, &self.local.name, &self.fallback);
        let Some(settings) = view.config.backup.clone() else {
            return Ok(());
        };
        let leader = view.leader.as_ref().map(|leader| leader.name.clone());
        let primary = self.primary_on_my_host(&view, leader.as_deref());
        if self.local.write_conf(&settings, primary)? {
            tracing::info!("pgbackrest.conf written for stanza {}", settings.stanza);
        }
        if self.collect_finished().await? {
            // The keys changed: decide on a fresh read at the next tick.
            return Ok(());
        }
        let keys = store::read(&self.dcs).await?;
        self.run_mine(&settings, &keys).await?;
        if leader.as_deref() == Some(self.local.name.as_str()) {
            self.lead(&settings, &view, &keys).await?;
        }
        Ok(())
    }

    /// The leader's server when this member is a replica on the leader's
    /// host (a backup from this standby needs it).
    fn primary_on_my_host(&self, view: &ClusterView, leader: Option<&str>) -> Option<conf::Server> {
        let me = view.member(&self.local.name)?;
        if me.role != MemberRole::Replica {
            return None;
        }
        let primary = view.member(leader?)?;
        let host = |address: &str| address.rsplit_once(':').map(|(host, _)| host.to_owned());
        let paths = primary.pg_paths.as_ref()?;
        let port = primary.pg_address.rsplit_once(':')?.1.parse().ok()?;
        (host(&primary.pg_address) == host(&me.pg_address)
            && std::path::Path::new(&paths.data_dir).exists())
        .then(|| conf::Server {
            data_dir: paths.data_dir.clone(),
            port,
            socket_dir: paths.socket_dir.clone(),
        })
    }

    /// Records the result of a job this agent finished; `true` when it did.
    async fn collect_finished(&mut self) -> Result<bool> {
        let Some(running) = &self.running else {
            return Ok(false);
        };
        if !running.task.is_finished() {
            return Ok(false);
        }
        let running = self.running.take().expect("checked above");
        let result = match running.task.await {
            Ok(result) => result,
            Err(error) => failure(
                &running.id,
                JobKind::Full,
                &self.local.name,
                unix_now(),
                &format!("the job's task failed: {error}"),
            ),
        };
        log_result(&result);
        store::finish(&self.dcs, &result, running.revision).await?;
        self.repo = None;
        Ok(true)
    }

    /// Starts the job assigned to this member; a job marked started by an
    /// earlier run of this agent is recorded as interrupted.
    async fn run_mine(
        &mut self,
        settings: &BackupSettings,
        keys: &store::BackupKeys,
    ) -> Result<()> {
        let Some((job, revision)) = &keys.job else {
            return Ok(());
        };
        if job.member.as_deref() != Some(self.local.name.as_str()) {
            return Ok(());
        }
        if self
            .running
            .as_ref()
            .is_some_and(|running| running.id == job.id)
        {
            return Ok(());
        }
        if let Some(started) = job.started_at {
            let result = failure(
                &job.id,
                job.kind,
                &self.local.name,
                started,
                "interrupted: jai-agent restarted while it ran",
            );
            log_result(&result);
            return store::finish(&self.dcs, &result, *revision).await;
        }
        let started = BackupJob {
            started_at: Some(unix_now()),
            ..job.clone()
        };
        let Some(new_revision) = store::put_job_if(&self.dcs, &started, *revision).await? else {
            return Ok(());
        };
        tracing::info!(id = %job.id, kind = %job.kind, origin = ?job.origin, "backup job started");
        let task = tokio::spawn(execute(self.local.clone(), settings.clone(), started));
        self.running = Some(Running {
            id: job.id.clone(),
            revision: new_revision,
            task,
        });
        Ok(())
    }

    /// The leader's part: the stanza exists, and the schedule is kept.
    async fn lead(
        &mut self,
        settings: &BackupSettings,
        view: &ClusterView,
        keys: &store::BackupKeys,
    ) -> Result<()> {
        let Some(system_id) = view
            .member(&self.local.name)
            .and_then(|me| me.system_id.clone())
        else {
            return Ok(());
        };
        // A new stanza or a new repository needs its own stanza-create.
        let wanted = (
            format!("{} in {}", settings.stanza, settings.repo_path.display()),
            system_id,
        );
        if self.stanza.as_ref() != Some(&wanted)
            && self
                .stanza_failed
                .is_none_or(|at| at.elapsed() >= STANZA_RETRY)
        {
            self.ensure_stanza(settings, wanted).await;
        }
        // Without a usable stanza nothing new is scheduled, but jobs already
        // asked for are still assigned (their runner reports why they fail).
        let stanza_ready = self.stanza.is_some() && self.stanza_failed.is_none();
        if stanza_ready {
            self.refresh_repo_facts(settings, keys).await?;
        }
        self.watch_archiver().await;
        let repo = self
            .repo
            .as_ref()
            .filter(|_| stanza_ready)
            .map(|(_, facts, _)| *facts);
        let decision = schedule::decide(&schedule::Inputs {
            now: unix_now(),
            settings,
            leader: &self.local.name,
            timeline: view.member(&self.local.name).and_then(|me| me.timeline),
            members: &view.members,
            job: keys.job.as_ref().map(|(job, _)| job),
            repo,
            last_backup: keys.last_backup.as_ref(),
            last_verify: keys.last_verify.as_ref(),
        });
        match decision {
            schedule::Decision::Nothing => {}
            schedule::Decision::Write(job) => {
                let revision = keys.job.as_ref().map_or(0, |(_, revision)| *revision);
                if store::put_job_if(&self.dcs, &job, revision)
                    .await?
                    .is_some()
                {
                    tracing::info!(id = %job.id, kind = %job.kind, member = ?job.member, "backup job assigned");
                }
            }
            schedule::Decision::Abandon(reason) => {
                if let Some((job, revision)) = &keys.job {
                    let result = failure(
                        &job.id,
                        job.kind,
                        job.member.as_deref().unwrap_or("-"),
                        job.started_at.unwrap_or(job.requested_at),
                        &format!("abandoned: {reason}"),
                    );
                    log_result(&result);
                    store::finish(&self.dcs, &result, *revision).await?;
                }
            }
        }
        Ok(())
    }
    /// `stanza-create` for this stanza, repository and system (idempotent).
    async fn ensure_stanza(&mut self, settings: &BackupSettings, wanted: (String, String)) {
        match self.local.pgbackrest(settings).stanza_create().await {
            Ok(()) => {
                tracing::info!(stanza = %settings.stanza, "pgBackRest stanza ready; WAL archiving can proceed");
                // PostgreSQL's archiver sleeps a minute after failed pushes;
                // a new segment wakes it now.
                if let Err(error) = self.local.switch_wal().await {
                    tracing::warn!("backup: pg_switch_wal after creating the stanza: {error:#}");
                }
                self.stanza = Some(wanted);
                self.stanza_failed = None;
            }
            Err(error) => {
                self.stanza = None;
                self.stanza_failed = Some(Instant::now());
                self.warn_once(format!(
                    "backup: the stanza is not usable, nothing is archived or backed up: {error:#}"
                ));
            }
        }
    }

    /// The leader's archiver: logged when it starts or stops failing, and
    /// published under `backup/archive` when it changed.
    async fn watch_archiver(&mut self) {
        let status = match self.local.archiver_status().await {
            Ok(status) => status,
            Err(error) => {
                tracing::debug!("backup: pg_stat_archiver: {error:#}");
                return;
            }
        };
        if self.archive.as_ref() == Some(&status) {
            return;
        }
        let was_failing = self.archive.as_ref().is_some_and(|old| old.failing);
        match (was_failing, status.failing) {
            (false, true) => tracing::error!(
                wal = status.last_failed_wal.as_deref().unwrap_or("?"),
                "WAL archiving is failing: the archive falls behind and pg_wal grows \
                 (postgresql.log has pgBackRest's error; docs/runbook.md, \"The archive is failing\")"
            ),
            (true, false) => tracing::info!(
                wal = status.last_archived_wal.as_deref().unwrap_or("?"),
                "WAL archiving works again"
            ),
            _ => {}
        }
        let key = self.dcs.keys().backup_archive();
        let mut client = self.dcs.client();
        let Ok(value) = serde_json::to_string(&status) else {
            return;
        };
        if self
            .dcs
            .bounded("write archive status", client.put(key, value, None))
            .await
            .is_ok()
        {
            self.archive = Some(status);
        }
    }

    /// Re-reads the repository every [`REPO_READ_EVERY`] and after each job.
    async fn refresh_repo_facts(
        &mut self,
        settings: &BackupSettings,
        keys: &store::BackupKeys,
    ) -> Result<()> {
        let label_now = keys.last_backup.as_ref().map(|result| result.id.clone());
        let stale = self.repo.as_ref().is_none_or(|(read_at, _, label)| {
            read_at.elapsed() >= REPO_READ_EVERY || *label != label_now
        });
        if stale {
            let info = self.local.pgbackrest(settings).info().await?;
            let facts = schedule::RepoFacts {
                last_full: info.last_full_stop(),
                last_any: info.latest().map(|backup| backup.timestamp.stop),
                newest_timeline: info.latest().and_then(|backup| backup.timeline()),
            };
            self.repo = Some((Instant::now(), facts, label_now));
        }
        Ok(())
    }
}

/// Runs one job to its result.
async fn execute(local: Local, settings: BackupSettings, job: BackupJob) -> JobResult {
    let started = job.started_at.unwrap_or_else(unix_now);
    let pgbackrest = local.pgbackrest(&settings);
    let outcome: Result<JobResult> = async {
        anyhow::ensure!(
            settings.repo_path.is_dir(),
            "the repository {} does not exist on {} (backup.repo_path)",
            settings.repo_path.display(),
            local.name
        );
        let mut result = failure(&job.id, job.kind, &local.name, started, "");
        result.ok = true;
        result.problem = None;
        match job.kind.backup_type() {
            Some(kind) => {
                pgbackrest
                    .backup(kind, Duration::from_secs(schedule::RUN_AT_MOST_SECS))
                    .await?;
                let info = pgbackrest.info().await?;
                if let Some(latest) = info.latest() {
                    result.label = Some(latest.label.clone());
                    result.repo_size = Some(latest.info.repository.delta);
                }
            }
            None => {
                pgbackrest
                    .verify(Duration::from_secs(schedule::RUN_AT_MOST_SECS))
                    .await?;
                let env = drill::DrillEnv {
                    bin_dir: local.bin_dir.clone(),
                    scratch: local.state_dir.join("restore-drill"),
                    superuser: local.superuser.clone(),
                    password: local.password.clone(),
                    passfile: local.passfile.clone(),
                    run_as: local.run_as,
                    timeout: Duration::from_secs(schedule::RUN_AT_MOST_SECS),
                    archive_dir: settings.repo_path.join("archive").join(&settings.stanza),
                };
                let report = drill::run(&pgbackrest, &env).await?;
                result.label = Some(report.label.clone());
                result.drill = Some(report);
            }
        }
        result.finished_at = unix_now();
        Ok(result)
    }
    .await;
    outcome.unwrap_or_else(|error| {
        failure(
            &job.id,
            job.kind,
            &local.name,
            started,
            &format!("{error:#}"),
        )
    })
}

fn failure(id: &str, kind: JobKind, member: &str, started_at: u64, problem: &str) -> JobResult {
    JobResult {
        id: id.to_owned(),
        kind,
        member: member.to_owned(),
        started_at,
        finished_at: unix_now(),
        ok: false,
        problem: Some(problem.to_owned()),
        label: None,
        repo_size: None,
        drill: None,
    }
}

fn log_result(result: &JobResult) {
    let took = result.finished_at.saturating_sub(result.started_at);
    if result.ok {
        tracing::info!(id = %result.id, kind = %result.kind, label = ?result.label, seconds = took, "backup job succeeded");
    } else {
        tracing::error!(id = %result.id, kind = %result.kind, seconds = took,
            "backup job failed: {}", result.problem.as_deref().unwrap_or("unknown"));
    }
}
