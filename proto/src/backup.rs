//! Backups: the `backup` section of the cluster config and the records the
//! agents keep about backups in etcd (`backup/job`, `backup/last`,
//! `backup/last_verify`).
//!
//! The backups themselves live in a pgBackRest repository; etcd holds only
//! what the cluster must agree on: which backup runs now and on which member,
//! and how the last backup and the last restore drill went.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// The `backup` section of [`crate::DynamicConfig`]. Absent: no WAL archive,
/// no scheduled backup (replicas clone with `pg_basebackup`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupSettings {
    /// pgBackRest's stanza: the name of this cluster in the repository.
    pub stanza: String,
    /// The repository's directory, as every member sees it: a directory of
    /// the lab, or on real machines a volume mounted on every PostgreSQL node
    /// (docs/backups.md).
    pub repo_path: PathBuf,
    /// A full backup is taken when the last full one is older than this.
    #[serde(with = "humantime_serde")]
    pub full_every: Duration,
    /// An incremental backup is taken when the last backup of any type is
    /// older than this.
    #[serde(with = "humantime_serde")]
    pub incr_every: Duration,
    /// How many full backups (and the backups and WAL that depend on them)
    /// the repository keeps.
    pub retention_full: u32,
    /// `archive_timeout`: the longest a quiet primary waits before it
    /// switches WAL segments, i.e. the worst RPO of the archive alone.
    #[serde(with = "humantime_serde")]
    pub archive_timeout: Duration,
    /// The restore drill (`jaictl backup verify`) runs on its own this often.
    #[serde(with = "humantime_serde")]
    pub verify_every: Duration,
    /// pgBackRest's `process-max`: parallel copy and compression processes.
    pub process_max: u32,
    /// New replicas restore from the repository before falling back to
    /// `pg_basebackup` from the leader.
    pub clone_from_backup: bool,
}

impl Default for BackupSettings {
    fn default() -> Self {
        Self {
            stanza: "main".into(),
            repo_path: PathBuf::from("/var/lib/pgbackrest"),
            full_every: Duration::from_secs(7 * 24 * 3600),
            incr_every: Duration::from_secs(24 * 3600),
            retention_full: 2,
            archive_timeout: Duration::from_secs(60),
            verify_every: Duration::from_secs(24 * 3600),
            process_max: 2,
            clone_from_backup: true,
        }
    }
}

/// A backup setting that breaks a rule: (field under `backup.`, reason).
pub type BackupSettingError = (&'static str, String);

impl BackupSettings {
    /// Checks every rule; the first broken one is returned.
    pub fn validate(&self) -> Result<(), BackupSettingError> {
        if self.stanza.is_empty()
            || self.stanza.len() > 64
            || !self
                .stanza
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err((
                "stanza",
                format!(
                    "{:?} is not a stanza name (1-64 letters, digits, - and _)",
                    self.stanza
                ),
            ));
        }
        if !self.repo_path.is_absolute() {
            return Err((
                "repo_path",
                format!("{} is not an absolute path", self.repo_path.display()),
            ));
        }
        let text = self.repo_path.to_string_lossy();
        if text.chars().any(|c| c.is_control() || c == '\'') {
            return Err((
                "repo_path",
                "contains a quote or a control character".into(),
            ));
        }
        let hour = Duration::from_secs(3600);
        for (field, value, min) in [
            ("full_every", self.full_every, hour),
            ("incr_every", self.incr_every, Duration::from_secs(60)),
            ("verify_every", self.verify_every, hour),
        ] {
            if value < min {
                return Err((
                    field,
                    format!("{} is below the minimum of {}", show(value), show(min)),
                ));
            }
        }
        if self.incr_every > self.full_every {
            return Err((
                "incr_every",
                format!(
                    "{} is longer than full_every ({}): incremental backups would never run",
                    show(self.incr_every),
                    show(self.full_every)
                ),
            ));
        }
        if !(1..=100).contains(&self.retention_full) {
            return Err(("retention_full", "must be between 1 and 100".into()));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.archive_timeout) {
            return Err((
                "archive_timeout",
                format!("{} is outside 1s..1h", show(self.archive_timeout)),
            ));
        }
        if !(1..=32).contains(&self.process_max) {
            return Err(("process_max", "must be between 1 and 32".into()));
        }
        Ok(())
    }
}

fn show(duration: Duration) -> String {
    humantime_serde::re::humantime::format_duration(duration).to_string()
}

/// What a backup job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// A full backup.
    Full,
    /// Changes since the last full backup.
    Diff,
    /// Changes since the last backup of any type.
    Incr,
    /// `pgbackrest verify` and a restore drill of the latest backup.
    Verify,
}

impl JobKind {
    /// pgBackRest's `--type` of a backup job (`None` for a verify).
    pub fn backup_type(self) -> Option<&'static str> {
        match self {
            JobKind::Full => Some("full"),
            JobKind::Diff => Some("diff"),
            JobKind::Incr => Some("incr"),
            JobKind::Verify => None,
        }
    }
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JobKind::Full => "full",
            JobKind::Diff => "diff",
            JobKind::Incr => "incr",
            JobKind::Verify => "verify",
        })
    }
}

/// Who asked for a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobOrigin {
    /// The leader's schedule.
    Schedule,
    /// An operator (`jaictl backup create` / `verify`).
    Operator,
}

/// The one backup job of the cluster, under `backup/job`: at most one runs at
/// a time, so two members never back up (or drill) at once.
///
/// An operator's request has no `member` yet; the leader assigns one
/// (a streaming replica when it can, so the primary is not loaded). The
/// assigned member runs it and replaces the job with its result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupJob {
    /// Unique per request; the result carries it back to whoever waits.
    pub id: String,
    /// What to do.
    pub kind: JobKind,
    /// Who asked.
    pub origin: JobOrigin,
    /// The member that runs it, once the leader chose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// When it was requested (Unix seconds).
    pub requested_at: u64,
    /// When the member started it (Unix seconds); a job whose member is gone
    /// or that runs past its deadline is dropped by the leader and retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
}

/// How a job ended, under `backup/last` (backups) or `backup/last_verify`
/// (verifications).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    /// The job's id.
    pub id: String,
    /// What ran.
    pub kind: JobKind,
    /// Where it ran.
    pub member: String,
    /// When it started and ended (Unix seconds).
    pub started_at: u64,
    /// When it ended (Unix seconds).
    pub finished_at: u64,
    /// Whether it succeeded.
    pub ok: bool,
    /// What went wrong, in one line, when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// A backup's pgBackRest label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// A backup's size in the repository (bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo_size: Option<u64>,
    /// A restore drill's findings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill: Option<DrillReport>,
}

/// The primary's WAL archiver, as `pg_stat_archiver` says (`backup/archive`,
/// written by the leader when it changes): a failing archive is a growing
/// RPO and a filling `pg_wal`, and must show before a backup fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveStatus {
    /// The member whose archiver this is (the leader).
    pub member: String,
    /// The last push failed after the last success.
    pub failing: bool,
    /// The newest WAL file archived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_archived_wal: Option<String>,
    /// When (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_archived_at: Option<u64>,
    /// The last WAL file whose push failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failed_wal: Option<String>,
    /// When (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failed_at: Option<u64>,
}

/// What a restore drill found in the restored copy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrillReport {
    /// The backup restored.
    pub label: String,
    /// Seconds from the start of the restore to a copy that answers queries.
    pub restore_seconds: f64,
    /// Where the restored WAL ends (`redo done at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_lsn: Option<String>,
    /// The last transaction the copy has, as PostgreSQL logged it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
    /// Seconds between the newest WAL file in the archive and the drill's
    /// start: how much a restore at that moment would have lost at most (the
    /// measured RPO).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo_seconds: Option<f64>,
    /// Rows per user table (`database.schema.table`), counted exactly.
    pub rows: std::collections::BTreeMap<String, u64>,
    /// Relations `pg_amcheck` checked without finding a problem.
    pub amcheck: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        BackupSettings::default().validate().unwrap();
    }

    #[test]
    fn bad_settings_name_their_field() {
        let cases: [(BackupSettings, &str); 5] = [
            (
                BackupSettings {
                    stanza: "a b".into(),
                    ..Default::default()
                },
                "stanza",
            ),
            (
                BackupSettings {
                    repo_path: "repo".into(),
                    ..Default::default()
                },
                "repo_path",
            ),
            (
                BackupSettings {
                    incr_every: Duration::from_secs(30 * 24 * 3600),
                    ..Default::default()
                },
                "incr_every",
            ),
            (
                BackupSettings {
                    retention_full: 0,
                    ..Default::default()
                },
                "retention_full",
            ),
            (
                BackupSettings {
                    archive_timeout: Duration::ZERO,
                    ..Default::default()
                },
                "archive_timeout",
            ),
        ];
        for (settings, field) in cases {
            assert_eq!(settings.validate().unwrap_err().0, field);
        }
    }

    #[test]
    fn a_job_round_trips_without_empty_fields() {
        let job = BackupJob {
            id: "x".into(),
            kind: JobKind::Incr,
            origin: JobOrigin::Operator,
            member: None,
            requested_at: 1,
            started_at: None,
        };
        let text = serde_json::to_string(&job).unwrap();
        assert!(!text.contains("member"), "{text}");
        assert_eq!(serde_json::from_str::<BackupJob>(&text).unwrap(), job);
    }
}
