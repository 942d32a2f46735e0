//! The local PostgreSQL: its process, its files and its queries.
//!
//! The agent keeps the postmaster as its own child (no `pg_ctl`, no double
//! fork) and waits on it directly, so it learns of a crash at once instead of
//! after PID 1 reaps an orphan. A postmaster left running by a previous agent
//! is adopted through `postmaster.pid` and polled instead.
//!
//! Programs that touch the data directory (`postgres`, `initdb`,
//! `pg_basebackup`) run as the configured unprivileged user; passwords reach
//! them through files readable only by that user, never through arguments.

pub mod control;
pub mod files;

use crate::config::AgentConfig;
use crate::ha::{DataDir, PgProcess, PgRole, RunningPostgres, SyncNames};
use anyhow::{anyhow, bail, Context, Result};
use jai_proto::{BackupSettings, DynamicConfig, Lsn, StandbyLink};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::Command;
use tokio::sync::Notify;

/// The OS account PostgreSQL runs as (`postgresql.run_as`), for every
/// program that touches its files.
#[derive(Debug, Clone, Copy)]
pub struct RunAs {
    uid: nix::unistd::Uid,
    gid: nix::unistd::Gid,
}

impl RunAs {
    /// The configured account, looked up; `None` when the agent runs as
    /// PostgreSQL's own user.
    pub fn from_config(config: &AgentConfig) -> Result<Option<Self>> {
        let Some(user) = &config.postgresql.run_as else {
            return Ok(None);
        };
        let account = nix::unistd::User::from_name(user)
            .with_context(|| format!("looking up postgresql.run_as user {user:?}"))?
            .ok_or_else(|| anyhow!("postgresql.run_as: no such OS user {user:?}"))?;
        Ok(Some(Self {
            uid: account.uid,
            gid: account.gid,
        }))
    }

    /// Makes `command` run as this account.
    pub fn apply(self, command: &mut Command) {
        command.uid(self.uid.as_raw()).gid(self.gid.as_raw());
    }

    /// Gives `path` to this account.
    pub fn chown(self, path: &Path) -> Result<()> {
        nix::unistd::chown(path, Some(self.uid), Some(self.gid))
            .with_context(|| format!("chown {}", path.display()))
    }
}

/// The postmaster the agent knows about.
#[derive(Debug)]
enum Postmaster {
    /// Started by this agent: `exited` flips when `wait()` returns.
    Child { pid: Pid, exited: Arc<AtomicBool> },
    /// Found running at start-up (left by a previous agent): polled by PID.
    Adopted { pid: Pid },
}

impl Postmaster {
    fn pid(&self) -> Pid {
        match self {
            Postmaster::Child { pid, .. } | Postmaster::Adopted { pid } => *pid,
        }
    }

    fn is_alive(&self) -> bool {
        match self {
            Postmaster::Child { exited, .. } => !exited.load(Ordering::SeqCst),
            Postmaster::Adopted { pid } => kill(*pid, None).is_ok(),
        }
    }
}

/// Supervises the local PostgreSQL.
pub struct Postgres {
    member: String,
    bin_dir: PathBuf,
    data_dir: PathBuf,
    state_dir: PathBuf,
    listen: std::net::SocketAddr,
    superuser: String,
    superuser_password: String,
    replication_user: String,
    replication_password: String,
    pg_hba: Vec<String>,
    timeout: Duration,
    run_as: Option<RunAs>,
    postmaster: Option<Postmaster>,
    client: Option<tokio_postgres::Client>,
    /// The member the standby is configured to stream from.
    following: Option<String>,
    /// `synchronous_standby_names` for the next configure.
    sync_names: SyncNames,
    /// Wakes the decision loop when the postmaster exits.
    exited: Arc<Notify>,
    /// How this member calls pgBackRest (archive commands, clones from the
    /// repository).
    backup: crate::backup::Local,
    /// The target of a restore to a point in time, rendered into the next
    /// configuration only (the start right after the restore).
    recovery_target_time: Option<String>,
}

/// Marker file: a clone or initdb into the data directory is under way; if the
/// agent dies meanwhile, the half-written directory is wiped and redone.
const INCOMPLETE_MARKER: &str = "data_dir.incomplete";

/// Marker file: this standby was restored from the backup repository and
/// reads the WAL archive until it streams.
const CATCH_UP_MARKER: &str = "catch-up-from-archive";

impl Postgres {
    /// Prepares supervision from the configuration; starts nothing.
    pub fn new(config: &AgentConfig, exited: Arc<Notify>) -> Result<Self> {
        let pg = &config.postgresql;
        let run_as = RunAs::from_config(config)?;
        Ok(Self {
            member: config.name.clone(),
            bin_dir: pg.bin_dir.clone(),
            data_dir: pg.data_dir.clone(),
            state_dir: config.state_dir.clone(),
            listen: pg.listen,
            superuser: pg.superuser.username.clone(),
            superuser_password: pg.superuser.password()?,
            replication_user: pg.replication.username.clone(),
            replication_password: pg.replication.password()?,
            pg_hba: pg.pg_hba.clone(),
            timeout: pg.start_timeout,
            run_as,
            postmaster: None,
            client: None,
            following: None,
            sync_names: SyncNames::Off,
            exited,
            backup: crate::backup::Local::from_config(config)?,
            recovery_target_time: None,
        })
    }

    fn socket_dir(&self) -> PathBuf {
        self.state_dir.join("run")
    }

    fn passfile(&self) -> PathBuf {
        self.state_dir.join("pgpass")
    }

    fn log_file(&self) -> PathBuf {
        self.state_dir.join("postgresql.log")
    }

    /// Creates the state directory, the socket directory and the passfile, owned
    /// by the PostgreSQL user, and adopts a postmaster left running.
    pub fn prepare(&mut self) -> Result<()> {
        self.make_private_dir(&self.state_dir)?;
        self.make_private_dir(&self.socket_dir())?;
        self.write_passfile()?;
        if let Some(pid) = self.running_postmaster_pid() {
            tracing::info!(
                pid = pid.as_raw(),
                "adopting the PostgreSQL left running by a previous agent"
            );
            self.postmaster = Some(Postmaster::Adopted { pid });
        }
        Ok(())
    }

    fn make_private_dir(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 700 {}", dir.display()))?;
        self.chown(dir)
    }

    fn chown(&self, path: &Path) -> Result<()> {
        match self.run_as {
            Some(run_as) => run_as.chown(path),
            None => Ok(()),
        }
    }

    fn write_private_file(&self, path: &Path, contents: &str) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::remove_file(path);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        file.write_all(contents.as_bytes())?;
        self.chown(path)
    }

    /// The passfile holds the replication and superuser passwords for every host
    /// (`*`): a standby follows any leader, and pg_rewind reads from any leader.
    fn write_passfile(&self) -> Result<()> {
        let mut text = files::passfile_line(
            "*",
            "*",
            "*",
            &self.replication_user,
            &self.replication_password,
        );
        text.push_str(&files::passfile_line(
            "*",
            "*",
            "*",
            &self.superuser,
            &self.superuser_password,
        ));
        self.write_private_file(&self.passfile(), &text)
    }

    fn running_postmaster_pid(&self) -> Option<Pid> {
        let text = std::fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        let pid = Pid::from_raw(text.lines().next()?.trim().parse().ok()?);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let program = cmdline.split(|byte| *byte == 0).next()?;
        (kill(pid, None).is_ok() && String::from_utf8_lossy(program).contains("postgres"))
            .then_some(pid)
    }

    /// Whether a postmaster is running.
    pub fn is_running(&self) -> bool {
        self.postmaster.as_ref().is_some_and(Postmaster::is_alive)
    }

    /// The postmaster's PID, for the lab and the status page.
    pub fn pid(&self) -> Option<i32> {
        self.postmaster
            .as_ref()
            .filter(|postmaster| postmaster.is_alive())
            .map(|postmaster| postmaster.pid().as_raw())
    }

    /// Where this stopped server's WAL ends (its shutdown checkpoint), from
    /// the control file: what a switchover target must have received.
    pub async fn final_position(&self) -> Result<(u32, Lsn)> {
        anyhow::ensure!(!self.is_running(), "PostgreSQL still runs");
        let output = Command::new(self.bin_dir.join("pg_controldata"))
            .arg("-D")
            .arg(&self.data_dir)
            .env("LC_ALL", "C")
            .output()
            .await
            .context("running pg_controldata")?;
        anyhow::ensure!(output.status.success(), "pg_controldata failed");
        control::parse_last_checkpoint(&String::from_utf8_lossy(&output.stdout))
            .ok_or_else(|| anyhow!("pg_controldata printed no latest checkpoint"))
    }

    /// What the data directory holds, without starting anything.
    pub async fn inspect_data_dir(&self) -> DataDir {
        if self.state_dir.join(INCOMPLETE_MARKER).exists() {
            return DataDir::Empty;
        }
        match control::is_empty_dir(&self.data_dir) {
            Ok(true) => return DataDir::Empty,
            Ok(false) => {}
            Err(error) => {
                return DataDir::Unusable {
                    reason: format!("cannot read {}: {error}", self.data_dir.display()),
                }
            }
        }
        if !self.data_dir.join("global/pg_control").exists() {
            return DataDir::Unusable {
                reason: format!(
                    "{} is not empty but holds no PostgreSQL cluster (no global/pg_control)",
                    self.data_dir.display()
                ),
            };
        }
        let output = Command::new(self.bin_dir.join("pg_controldata"))
            .arg("-D")
            .arg(&self.data_dir)
            .env("LC_ALL", "C")
            .output()
            .await;
        match output {
            Ok(output) if output.status.success() => {
                let parsed = control::parse_controldata(&String::from_utf8_lossy(&output.stdout));
                // A base backup (or a rewound directory) carries its source's
                // "in production" state, but it never ran: it is no former primary.
                match parsed {
                    DataDir::Initialized { system_id, .. }
                        if self.data_dir.join("backup_label").exists() =>
                    {
                        DataDir::Initialized {
                            system_id,
                            was_primary: false,
                        }
                    }
                    other => other,
                }
            }
            Ok(output) => DataDir::Unusable {
                reason: format!(
                    "pg_controldata failed: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            },
            Err(error) => DataDir::Unusable {
                reason: format!("cannot run pg_controldata: {error}"),
            },
        }
    }

    /// Observes the process and, when it answers, its role and WAL positions.
    pub async fn observe(&mut self) -> (PgProcess, Option<(String, bool)>) {
        if !self.is_running() {
            self.postmaster = None;
            self.client = None;
            return (PgProcess::Stopped, None);
        }
        match self.query_state().await {
            Ok((running, system_id)) => {
                let was_primary = running.role == PgRole::Primary;
                (PgProcess::Running(running), Some((system_id, was_primary)))
            }
            Err(error) => {
                tracing::debug!("PostgreSQL does not answer: {error:#}");
                self.client = None;
                (PgProcess::Unresponsive, None)
            }
        }
    }

    async fn client(&mut self) -> Result<&tokio_postgres::Client> {
        if self
            .client
            .as_ref()
            .is_some_and(|client| client.is_closed())
        {
            self.client = None;
        }
        if self.client.is_none() {
            let mut config = tokio_postgres::Config::new();
            config
                .host_path(self.socket_dir())
                .port(self.listen.port())
                .user(&self.superuser)
                .password(&self.superuser_password)
                .dbname("postgres")
                .application_name("jai-agent")
                .connect_timeout(Duration::from_secs(2));
            let (client, connection) = tokio::time::timeout(
                Duration::from_secs(3),
                config.connect(tokio_postgres::NoTls),
            )
            .await
            .map_err(|_| anyhow!("connecting to PostgreSQL timed out"))?
            .map_err(describe_pg_error)?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            self.client = Some(client);
        }
        Ok(self.client.as_ref().expect("client set above"))
    }

    async fn query_state(&mut self) -> Result<(RunningPostgres, String)> {
        const STATE: &str = "SELECT pg_is_in_recovery(), \
            CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END, \
            pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text, \
            CASE WHEN pg_is_in_recovery() \
                THEN GREATEST((SELECT received_tli FROM pg_stat_wal_receiver), \
                              (SELECT timeline_id FROM pg_control_checkpoint()), \
                              (SELECT max(('x' || substr(name, 1, 8))::bit(32)::int) FROM pg_ls_waldir() \
                               WHERE name ~ '^[0-9A-F]{8}\\.history$')) \
                ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END, \
            (SELECT system_identifier FROM pg_control_system())::text, \
            ARRAY(SELECT slot_name::text FROM pg_replication_slots WHERE slot_type = 'physical'), \
            current_setting('synchronous_standby_names'), \
            COALESCE((SELECT status = 'streaming' FROM pg_stat_wal_receiver), false)";
        let following = self.following.clone();
        let client = self.client().await?;
        let row = tokio::time::timeout(Duration::from_secs(3), client.query_one(STATE, &[]))
            .await
            .map_err(|_| anyhow!("state query timed out"))?
            .map_err(describe_pg_error)?;
        let lsn = |index: usize| -> Result<Option<Lsn>> {
            row.get::<_, Option<String>>(index)
                .map(|text| text.parse::<Lsn>())
                .transpose()
                .map_err(Into::into)
        };
        let in_recovery: bool = row.get(0);
        let standbys = if in_recovery {
            Vec::new()
        } else {
            query_standbys(client).await?
        };
        let running = RunningPostgres {
            role: if in_recovery {
                PgRole::Replica
            } else {
                PgRole::Primary
            },
            timeline: row.get::<_, Option<i32>>(4).unwrap_or(0) as u32,
            write_lsn: lsn(1)?,
            receive_lsn: lsn(2)?,
            replay_lsn: lsn(3)?,
            following: if in_recovery { following } else { None },
            slots: row.get(6),
            standbys,
            sync_names: SyncNames::parse(row.get::<_, &str>(7)),
            streaming: in_recovery && row.get::<_, bool>(8),
        };
        Ok((running, row.get(5)))
    }

    /// Runs `initdb` (data checksums on, so `pg_rewind` works later) into the
    /// empty data directory.
    pub async fn initdb(&mut self) -> Result<()> {
        self.begin_incomplete()?;
        let pwfile = self.state_dir.join("initdb.pw");
        self.write_private_file(&pwfile, &self.superuser_password)?;
        let result = self
            .run_as_postgres(
                "initdb",
                &[
                    "-D".as_ref(),
                    self.data_dir.as_os_str(),
                    "--username".as_ref(),
                    self.superuser.as_ref(),
                    "--pwfile".as_ref(),
                    pwfile.as_os_str(),
                    "--auth-local=scram-sha-256".as_ref(),
                    "--auth-host=scram-sha-256".as_ref(),
                    "--data-checksums".as_ref(),
                    "--encoding=UTF8".as_ref(),
                    "--no-locale".as_ref(),
                    "--no-instructions".as_ref(),
                ],
            )
            .await;
        let _ = std::fs::remove_file(&pwfile);
        result?;
        std::fs::rename(
            self.data_dir.join("postgresql.conf"),
            self.data_dir.join("postgresql.base.conf"),
        )
        .context("moving initdb's postgresql.conf to postgresql.base.conf")?;
        self.end_incomplete()
    }

    /// Fills the empty data directory for a new replica: from the backup
    /// repository when the cluster has one with a backup in it (the leader
    /// then only streams what came after), else with `pg_basebackup` from
    /// the leader at `host:port`.
    pub async fn clone_from(
        &mut self,
        address: &str,
        leader_timeline: Option<u32>,
        backup: Option<&BackupSettings>,
    ) -> Result<()> {
        if let (Some(settings), Some(timeline)) = (
            backup.filter(|settings| settings.clone_from_backup),
            leader_timeline,
        ) {
            match self.restore_from_repository(settings, timeline).await {
                Ok(label) => {
                    tracing::info!(
                        backup = %label,
                        "replica restored from the backup repository; it catches up from the archive, then streams"
                    );
                    return Ok(());
                }
                Err(error) => tracing::warn!(
                    "cannot restore from the backup repository, cloning with pg_basebackup instead: {error:#}"
                ),
            }
        }
        self.basebackup_from(address).await
    }

    /// Restores the latest backup of the leader's timeline as a standby
    /// (`pgbackrest restore --type=standby`); returns its label.
    async fn restore_from_repository(
        &mut self,
        settings: &BackupSettings,
        timeline: u32,
    ) -> Result<String> {
        self.backup.write_conf(settings, None)?;
        let pgbackrest = self.backup.pgbackrest(settings);
        let info = pgbackrest.info().await?;
        let archive = settings.repo_path.join("archive").join(&settings.stanza);
        let history = info.history_of(&archive, timeline);
        let latest = info
            .latest_for(timeline, &history, |segment| info.has_segment(&archive, segment))
            .map(|backup| backup.label.clone())
            .ok_or_else(|| {
                anyhow!("the repository holds no backup the leader's timeline {timeline} can follow yet")
            })?;
        self.begin_incomplete()?;
        pgbackrest
            .restore(
                &self.data_dir,
                Some(&latest),
                &["--type=standby"],
                Duration::from_secs(24 * 3600),
            )
            .await?;
        self.drop_restore_settings()?;
        std::fs::write(self.state_dir.join(CATCH_UP_MARKER), b"")
            .context("writing the catch-up marker")?;
        self.end_incomplete()?;
        Ok(latest)
    }

    /// Replaces the stopped data directory with the repository's copy at
    /// `target` (`pgbackrest restore --type=time`): the next start recovers
    /// there and promotes on a new timeline.
    pub async fn restore_to_time(&mut self, settings: &BackupSettings, target: &str) -> Result<()> {
        anyhow::ensure!(!self.is_running(), "PostgreSQL still runs");
        self.backup.write_conf(settings, None)?;
        let pgbackrest = self.backup.pgbackrest(settings);
        self.begin_incomplete()?;
        let target_option = format!("--target={target}");
        pgbackrest
            .restore(
                &self.data_dir,
                None,
                &["--type=time", &target_option, "--target-action=promote"],
                Duration::from_secs(24 * 3600),
            )
            .await?;
        self.drop_restore_settings()?;
        let _ = std::fs::remove_file(self.data_dir.join("standby.signal"));
        self.end_incomplete()?;
        self.recovery_target_time = Some(target.to_owned());
        tracing::warn!(
            target,
            "data directory restored from the backup repository; recovery to the target follows"
        );
        Ok(())
    }

    /// A standby restored from the repository reads the archive until it
    /// streams (a marker in the state directory, so an agent restart keeps it).
    fn catching_up_from_archive(&self) -> bool {
        self.state_dir.join(CATCH_UP_MARKER).exists()
    }

    /// The standby streams: it stops reading the archive (see
    /// [`files::ArchiveSettings::restore_command`]); `true` when it was
    /// reading it, so the caller rewrites the settings and reloads.
    pub fn end_catch_up_if_streaming(&self, streaming: bool) -> bool {
        streaming
            && self.catching_up_from_archive()
            && std::fs::remove_file(self.state_dir.join(CATCH_UP_MARKER)).is_ok()
    }

    /// pgBackRest writes its own `restore_command` into
    /// `postgresql.auto.conf`, which would override the agent's (it names
    /// no config file); the agent's `postgresql.conf` sets it instead.
    fn drop_restore_settings(&self) -> Result<()> {
        let path = self.data_dir.join("postgresql.auto.conf");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(());
        };
        let kept: String = text
            .lines()
            .filter(|line| {
                let line = line.trim_start();
                !line.starts_with("restore_command") && !line.starts_with("recovery_target")
            })
            .map(|line| format!("{line}\n"))
            .collect();
        self.write_private_file(&path, &kept)
    }

    /// Clones the data directory from `host:port` with `pg_basebackup`.
    async fn basebackup_from(&mut self, address: &str) -> Result<()> {
        tracing::info!("cloning from {address} with pg_basebackup");
        let _ = std::fs::remove_file(self.state_dir.join(CATCH_UP_MARKER));
        let (host, port) = address
            .rsplit_once(':')
            .ok_or_else(|| anyhow!("leader address {address:?} is not host:port"))?;
        self.begin_incomplete()?;
        self.run_as_postgres(
            "pg_basebackup",
            &[
                "-D".as_ref(),
                self.data_dir.as_os_str(),
                "-h".as_ref(),
                host.as_ref(),
                "-p".as_ref(),
                port.as_ref(),
                "-U".as_ref(),
                self.replication_user.as_ref(),
                "-X".as_ref(),
                "stream".as_ref(),
                "-c".as_ref(),
                "fast".as_ref(),
                "--no-password".as_ref(),
            ],
        )
        .await
        .with_context(|| format!("cloning from {address}"))?;
        self.end_incomplete()
    }

    /// Rewinds the stopped data directory of a former primary to the history of
    /// the leader at `address` (`pg_rewind`; it runs crash recovery first when
    /// the server was not shut down cleanly).
    /// Returns what pg_rewind printed (e.g. "no rewind required" or "Done!").
    pub async fn rewind_from(&mut self, address: &str) -> Result<String> {
        let (host, port) = address
            .rsplit_once(':')
            .ok_or_else(|| anyhow!("leader address {address:?} is not host:port"))?;
        let source = format!(
            "host={} port={} user={} dbname=postgres connect_timeout=3",
            files::conninfo_value(host),
            files::conninfo_value(port),
            files::conninfo_value(&self.superuser),
        );
        self.run_as_postgres(
            "pg_rewind",
            &[
                "-D".as_ref(),
                self.data_dir.as_os_str(),
                "--source-server".as_ref(),
                source.as_ref(),
            ],
        )
        .await
        .with_context(|| format!("pg_rewind against {address}"))
    }

    /// Runs CHECKPOINT on the server at `address`. pg_rewind reads the source's
    /// timeline from its control file, which a just-promoted leader updates
    /// only at its next checkpoint: without one it sees no fork, rewinds nothing.
    pub async fn checkpoint_at(&self, address: &str) -> Result<()> {
        let (host, port) = address
            .rsplit_once(':')
            .ok_or_else(|| anyhow!("address {address:?} is not host:port"))?;
        checkpoint(host, port, &self.superuser, &self.superuser_password).await
    }

    /// Runs CHECKPOINT on this server and waits for it: before a switchover,
    /// so that the shutdown checkpoint has little left to write.
    pub async fn checkpoint(&mut self) -> Result<()> {
        let client = self.client().await?;
        client
            .batch_execute("CHECKPOINT")
            .await
            .map_err(describe_pg_error)
    }

    /// What `synchronous_standby_names` will say at the next configure: set
    /// before a start as primary or a promotion, and by the leader's rounds.
    pub fn set_sync_names(&mut self, names: SyncNames) {
        self.sync_names = names;
    }

    /// Waits until this server's own sessions see `synchronous_standby_names`
    /// as `names` after a reload, so that what follows (a promotion, the next
    /// decision) relies on it.
    pub async fn confirm_sync_names(&mut self, names: &SyncNames) -> Result<()> {
        let expected = names.render();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let client = self.client().await?;
            let row = client
                .query_one("SELECT current_setting('synchronous_standby_names')", &[])
                .await
                .map_err(describe_pg_error)?;
            if row.get::<_, &str>(0) == expected {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "PostgreSQL did not take synchronous_standby_names = '{expected}' within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether a changed setting waits for a restart (`pending_restart`).
    pub async fn restart_pending(&mut self) -> Result<bool> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT count(*) > 0 FROM pg_settings WHERE pending_restart",
                &[],
            )
            .await
            .map_err(describe_pg_error)?;
        Ok(row.get(0))
    }

    /// The member this standby is configured to follow, if any.
    pub fn following(&self) -> Option<&str> {
        self.following.as_deref()
    }

    /// Checkpoints this server in the background over its own connection, so
    /// that a just-promoted primary is routable before the checkpoint ends.
    pub fn spawn_checkpoint(&self) {
        let (host, port) = (self.listen.ip().to_string(), self.listen.port().to_string());
        let (user, password) = (self.superuser.clone(), self.superuser_password.clone());
        tokio::spawn(async move {
            if let Err(error) = checkpoint(&host, &port, &user, &password).await {
                tracing::warn!("checkpoint after promotion failed: {error:#}");
            }
        });
    }

    /// Wipes the data directory for a re-clone (`jaictl reinit`). The
    /// incomplete-marker stays until the clone finishes, so an agent that dies
    /// meanwhile still sees an empty directory, never a half one.
    pub fn wipe_data_dir(&self) -> Result<()> {
        anyhow::ensure!(!self.is_running(), "PostgreSQL still runs");
        self.begin_incomplete()
    }

    /// Marks the data directory as being written, after wiping what an earlier
    /// interrupted attempt left, and makes sure it exists with the right owner.
    fn begin_incomplete(&self) -> Result<()> {
        let marker = self.state_dir.join(INCOMPLETE_MARKER);
        std::fs::write(&marker, b"").context("writing the incomplete-data-dir marker")?;
        if self.data_dir.exists() {
            for entry in std::fs::read_dir(&self.data_dir)? {
                let path = entry?.path();
                if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                }
                .with_context(|| format!("wiping {}", path.display()))?;
            }
        }
        self.make_private_dir(&self.data_dir)
    }

    fn end_incomplete(&self) -> Result<()> {
        std::fs::remove_file(self.state_dir.join(INCOMPLETE_MARKER))
            .context("removing the incomplete-data-dir marker")
    }

    /// Runs a PostgreSQL program as the PostgreSQL user; returns what it printed.
    async fn run_as_postgres(&self, program: &str, args: &[&std::ffi::OsStr]) -> Result<String> {
        let mut command = Command::new(self.bin_dir.join(program));
        command
            .args(args)
            .env("PGPASSFILE", self.passfile())
            .env("LC_ALL", "C")
            .current_dir(&self.state_dir)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(run_as) = self.run_as {
            run_as.apply(&mut command);
        }
        let output = command
            .output()
            .await
            .with_context(|| format!("running {program}"))?;
        if !output.status.success() {
            bail!(
                "{program} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let printed = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        Ok(printed.trim().to_owned())
    }

    /// Writes the configuration files for the given role.
    pub fn configure(
        &mut self,
        dynamic: &DynamicConfig,
        follow: Option<(&str, &str)>,
        standby: bool,
    ) -> Result<()> {
        let primary_conninfo = follow.map(|(_, address)| self.conninfo(address));
        let socket_dir = self.socket_dir().to_string_lossy().into_owned();
        let settings = files::ServerSettings {
            member: &self.member,
            listen_host: self.listen.ip().to_string(),
            port: self.listen.port(),
            socket_dir: &socket_dir,
            primary_conninfo,
            primary_slot: follow.map(|_| crate::ha::slot_name(&self.member)),
            parameters: &dynamic.postgresql.parameters,
            sync_standby_names: self.sync_names.render(),
            archive: dynamic.backup.as_ref().map(|settings| {
                let invocation = self.backup.pgbackrest(settings).invocation;
                let reads_archive =
                    self.recovery_target_time.is_some() || self.catching_up_from_archive();
                files::ArchiveSettings {
                    archive_command: invocation.archive_command(),
                    restore_command: reads_archive.then(|| invocation.restore_command()),
                    archive_timeout: settings.archive_timeout,
                }
            }),
            recovery_target_time: self.recovery_target_time.take(),
        };
        let conf = files::postgresql_conf(&settings);
        self.write_private_file(&self.data_dir.join("postgresql.conf"), &conf)?;
        let hba = files::pg_hba_conf(&self.pg_hba, &self.replication_user);
        self.write_private_file(&self.data_dir.join("pg_hba.conf"), &hba)?;
        let signal = self.data_dir.join("standby.signal");
        if standby {
            self.write_private_file(&signal, "")?;
        } else if signal.exists() {
            std::fs::remove_file(&signal).context("removing standby.signal")?;
        }
        self.following = follow.map(|(name, _)| name.to_owned());
        Ok(())
    }

    fn conninfo(&self, address: &str) -> String {
        let (host, port) = address.rsplit_once(':').unwrap_or((address, "5432"));
        format!(
            "host={} port={} user={} passfile={} application_name={} connect_timeout=2",
            files::conninfo_value(host),
            files::conninfo_value(port),
            files::conninfo_value(&self.replication_user),
            files::conninfo_value(&self.passfile().to_string_lossy()),
            files::conninfo_value(&self.member),
        )
    }

    /// Starts the postmaster as our child and waits until it answers queries
    /// (or `start_timeout` passes: then it is left running, reported unresponsive).
    ///
    /// `fence`, when given, receives the postmaster's PID as soon as it exists,
    /// so the fencing watchdog guards a starting primary at once.
    pub async fn start(&mut self, fence: Option<&crate::fence::FenceTarget>) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file())
            .with_context(|| format!("opening {}", self.log_file().display()))?;
        let mut command = Command::new(self.bin_dir.join("postgres"));
        command
            .arg("-D")
            .arg(&self.data_dir)
            .env("LC_ALL", "C")
            .current_dir(&self.state_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        if let Some(run_as) = self.run_as {
            run_as.apply(&mut command);
        }
        let mut child = command.spawn().context("spawning postgres")?;
        let pid = Pid::from_raw(
            child
                .id()
                .ok_or_else(|| anyhow!("postgres exited at once"))? as i32,
        );
        let exited = Arc::new(AtomicBool::new(false));
        let (flag, notify) = (exited.clone(), self.exited.clone());
        tokio::spawn(async move {
            let status = child.wait().await;
            flag.store(true, Ordering::SeqCst);
            tracing::warn!(pid = pid.as_raw(), "PostgreSQL exited: {status:?}");
            notify.notify_one();
        });
        self.postmaster = Some(Postmaster::Child { pid, exited });
        if let Some(fence) = fence {
            fence.guard_new_primary(pid.as_raw());
        }
        tracing::info!(pid = pid.as_raw(), "started PostgreSQL");
        self.wait_until_ready().await
    }

    async fn wait_until_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if !self.is_running() {
                bail!(
                    "PostgreSQL exited during start-up; see {}",
                    self.log_file().display()
                );
            }
            match self.client().await {
                Ok(client) if client.simple_query("SELECT 1").await.is_ok() => return Ok(()),
                _ => self.client = None,
            }
            if Instant::now() >= deadline {
                bail!(
                    "PostgreSQL not accepting connections after {}; see {}",
                    humantime::format_duration(self.timeout),
                    self.log_file().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops PostgreSQL: fast shutdown, then immediate if it takes longer than
    /// `grace`. Returns once the postmaster has exited.
    pub async fn stop(&mut self, grace: Duration) -> Result<()> {
        let Some(postmaster) = &self.postmaster else {
            return Ok(());
        };
        let pid = postmaster.pid();
        self.client = None;
        let _ = kill(pid, Signal::SIGINT);
        if !self.wait_for_exit(grace).await {
            tracing::warn!(
                pid = pid.as_raw(),
                "fast shutdown too slow: immediate shutdown"
            );
            let _ = kill(pid, Signal::SIGQUIT);
            if !self.wait_for_exit(self.timeout).await {
                let _ = kill(pid, Signal::SIGKILL);
                self.wait_for_exit(Duration::from_secs(5)).await;
            }
        }
        self.postmaster = None;
        tracing::info!(pid = pid.as_raw(), "PostgreSQL stopped");
        Ok(())
    }

    async fn wait_for_exit(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while self.is_running() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Re-reads the configuration files (SIGHUP).
    pub fn reload(&self) -> Result<()> {
        let postmaster = self
            .postmaster
            .as_ref()
            .ok_or_else(|| anyhow!("PostgreSQL is not running"))?;
        kill(postmaster.pid(), Signal::SIGHUP).context("sending SIGHUP to PostgreSQL")
    }

    /// Promotes the local standby and waits for it to accept writes.
    pub async fn promote(&mut self) -> Result<()> {
        let client = self.client().await?;
        let promoted: bool = client
            .query_one("SELECT pg_promote(true, 60)", &[])
            .await
            .map_err(describe_pg_error)?
            .get(0);
        anyhow::ensure!(promoted, "pg_promote did not complete within 60 s");
        self.following = None;
        Ok(())
    }

    /// Creates the replication role once, right after bootstrap.
    pub async fn create_replication_role(&mut self) -> Result<()> {
        let statement = format!(
            "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {user_literal}) THEN \
             CREATE ROLE {user_ident} WITH REPLICATION LOGIN PASSWORD {password}; END IF; END$$",
            user_literal = sql_literal(&self.replication_user),
            user_ident = sql_ident(&self.replication_user),
            password = sql_literal(&self.replication_password),
        );
        let client = self.client().await?;
        client
            .batch_execute(&statement)
            .await
            .map_err(describe_pg_error)?;
        Ok(())
    }

    /// Creates a physical replication slot that reserves WAL at once.
    pub async fn create_slot(&mut self, name: &str) -> Result<()> {
        let client = self.client().await?;
        client
            .execute(
                "SELECT pg_create_physical_replication_slot($1, true)",
                &[&name],
            )
            .await
            .map_err(describe_pg_error)?;
        Ok(())
    }

    /// Drops a physical replication slot unless a standby still streams through it
    /// (its agent may be gone while its PostgreSQL runs on; the slot stays then).
    pub async fn drop_slot(&mut self, name: &str) -> Result<()> {
        let client = self.client().await?;
        client
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = $1 AND NOT active",
                &[&name],
            )
            .await
            .map_err(describe_pg_error)?;
        Ok(())
    }
}

/// tokio-postgres prints only "db error" unless asked for the server's message.
fn describe_pg_error(error: tokio_postgres::Error) -> anyhow::Error {
    match error.as_db_error() {
        Some(db) => anyhow!("PostgreSQL: {} ({})", db.message(), db.code().code()),
        None => anyhow!("PostgreSQL: {error:#}"),
    }
}

fn sql_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn sql_ident(text: &str) -> String {
    format!("\"{}\"", text.replace('"', "\"\""))
}

/// Connects over TCP as `user` and runs CHECKPOINT.
async fn checkpoint(host: &str, port: &str, user: &str, password: &str) -> Result<()> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .port(port.parse().context("port")?)
        .user(user)
        .password(password)
        .dbname("postgres")
        .application_name("jai-agent")
        .connect_timeout(Duration::from_secs(3));
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(describe_pg_error)
        .with_context(|| format!("connecting to {host}:{port}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
        .batch_execute("CHECKPOINT")
        .await
        .map_err(describe_pg_error)
        .with_context(|| format!("CHECKPOINT on {host}:{port}"))
}

/// The standbys connected to this primary, as `pg_stat_replication` shows them.
async fn query_standbys(client: &tokio_postgres::Client) -> Result<Vec<StandbyLink>> {
    const STANDBYS: &str = "SELECT application_name, coalesce(state, ''), flush_lsn::text, \
        (EXTRACT(EPOCH FROM replay_lag) * 1000)::bigint, sync_state IN ('sync', 'quorum') \
        FROM pg_stat_replication WHERE application_name <> ''";
    let rows = tokio::time::timeout(Duration::from_secs(3), client.query(STANDBYS, &[]))
        .await
        .map_err(|_| anyhow!("pg_stat_replication query timed out"))?
        .map_err(describe_pg_error)?;
    rows.iter()
        .map(|row| {
            Ok(StandbyLink {
                name: row.get(0),
                state: row.get(1),
                flush_lsn: row
                    .get::<_, Option<String>>(2)
                    .map(|text| text.parse::<Lsn>())
                    .transpose()?,
                replay_lag_ms: row.get::<_, Option<i64>>(3).map(|ms| ms.max(0) as u64),
                synchronous: row.get(4),
            })
        })
        .collect()
}
