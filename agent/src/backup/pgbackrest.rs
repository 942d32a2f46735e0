//! Runs pgBackRest as PostgreSQL's user and reads what it prints.
//!
//! Every call is bounded in time and killed when it runs over; its error is
//! the last line pgBackRest wrote to stderr (`ERROR: [055]: …`), which names
//! the problem better than anything the agent could add.

use super::conf::Invocation;
use crate::postgres::RunAs;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

/// pgBackRest for one member.
#[derive(Debug, Clone)]
pub struct PgBackRest {
    /// Program, config file and stanza.
    pub invocation: Invocation,
    /// PostgreSQL's account, when the agent runs as root.
    pub run_as: Option<RunAs>,
    /// The passfile with the superuser's password (pgBackRest connects with libpq).
    pub passfile: PathBuf,
    /// Where it runs (the agent's state directory).
    pub work_dir: PathBuf,
}

/// How long a command that only reads or checks may run.
const QUICK: Duration = Duration::from_secs(120);

impl PgBackRest {
    /// Runs `pgbackrest <args>`; returns stdout.
    pub async fn run(&self, args: &[&str], within: Duration) -> Result<String> {
        let mut command = Command::new(&self.invocation.program);
        command
            .arg(format!("--config={}", self.invocation.config.display()))
            .arg(format!("--stanza={}", self.invocation.stanza))
            .args(args)
            .env("PGPASSFILE", &self.passfile)
            .env("LC_ALL", "C")
            .current_dir(&self.work_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(run_as) = self.run_as {
            run_as.apply(&mut command);
        }
        let what = args.first().copied().unwrap_or("pgbackrest");
        let output = tokio::time::timeout(within, command.output())
            .await
            .map_err(|_| {
                anyhow!(
                    "pgbackrest {what} did not finish within {}",
                    humantime::format_duration(within)
                )
            })?
            .with_context(|| format!("running {}", self.invocation.program.display()))?;
        if !output.status.success() {
            bail!(
                "pgbackrest {what} failed: {}",
                last_error(&String::from_utf8_lossy(&output.stderr))
                    .or_else(|| last_error(&String::from_utf8_lossy(&output.stdout)))
                    .unwrap_or_else(|| output.status.to_string())
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Creates the stanza, or checks that the existing one belongs to this
    /// database (pgBackRest refuses a repository of another system).
    pub async fn stanza_create(&self) -> Result<()> {
        self.run(&["stanza-create"], QUICK).await.map(drop)
    }

    /// Takes a backup of `kind` (`full`, `diff`, `incr`); retention is
    /// applied by pgBackRest right after it.
    pub async fn backup(&self, kind: &str, within: Duration) -> Result<()> {
        self.run(&["backup", &format!("--type={kind}")], within)
            .await
            .map(drop)
    }

    /// What the repository holds for the stanza.
    pub async fn info(&self) -> Result<StanzaInfo> {
        let text = self.run(&["info", "--output=json"], QUICK).await?;
        parse_info(&text)
    }

    /// `pgbackrest verify`: every file of the repository against its checksum.
    pub async fn verify(&self, within: Duration) -> Result<()> {
        let printed = self
            .run(&["verify", "--log-level-console=info"], within)
            .await?;
        verify_verdict(&printed)
    }

    /// Restores the backup `set` (or the latest) into the empty `data_dir`,
    /// with `extra` options (`--type=…`, `--target=…`).
    pub async fn restore(
        &self,
        data_dir: &Path,
        set: Option<&str>,
        extra: &[&str],
        within: Duration,
    ) -> Result<()> {
        let path = format!("--pg1-path={}", data_dir.display());
        let set = set.map(|label| format!("--set={label}"));
        let mut args = vec!["restore", path.as_str()];
        args.extend(set.as_deref());
        args.extend(extra);
        self.run(&args, within).await.map(drop)
    }
}

/// One message of pgBackRest's console log: its level (`INFO`, `WARN`,
/// `ERROR`, …) and its text, continuation lines joined with `\n`.
fn log_messages(text: &str) -> Vec<(&str, String)> {
    let mut messages: Vec<(&str, String)> = Vec::new();
    for line in text.lines() {
        // `2026-12-03 20:31:00.011 P01   INFO: invalid checksum '…'`
        let header = line.split_once(": ").and_then(|(head, rest)| {
            let mut words = head.split_whitespace();
            let (_date, _time, process, level) =
                (words.next()?, words.next()?, words.next()?, words.next()?);
            (words.next().is_none()
                && process.starts_with('P')
                && level.chars().all(|c| c.is_ascii_uppercase()))
            .then_some((level, rest))
        });
        match (header, messages.last_mut()) {
            (Some((level, rest)), _) => messages.push((level, rest.trim().to_owned())),
            // A message of several lines (the summary, a retried error).
            (None, Some((_, message))) if !line.trim().is_empty() => {
                message.push('\n');
                message.push_str(line.trim());
            }
            _ => {}
        }
    }
    messages
}

/// Reads what `pgbackrest verify --log-level-console=info` printed.
///
/// pgBackRest 2.45 exits 0 whatever it finds: it logs each bad file at
/// `INFO` (`invalid checksum '<label>/pg_data/…'`, `invalid size …`,
/// `invalid result …`, `file missing …`), unusable info files at `WARN`,
/// and ends with a summary whose status is `error`. Newer versions log the
/// same files at `ERROR`/`WARN` and exit non-zero ([`PgBackRest::run`]
/// reports that). Only pgBackRest's messages are read, never the `command
/// begin` line, which echoes the options (a repository path or stanza may
/// contain any word).
fn verify_verdict(printed: &str) -> Result<()> {
    const BAD_FILE: [&str; 4] = [
        "invalid checksum ",
        "invalid size ",
        "invalid result ",
        "file missing ",
    ];
    let messages = log_messages(printed);
    let mut problems: Vec<String> = messages
        .iter()
        .filter(|(level, message)| {
            matches!(*level, "WARN" | "ERROR")
                || BAD_FILE.iter().any(|start| message.starts_with(start))
        })
        .map(|(_, message)| message.lines().next().unwrap_or_default().to_owned())
        .collect();
    let summary_says_error = messages.iter().any(|(_, message)| {
        message.starts_with("stanza: ")
            && message
                .lines()
                .any(|line| line == "status: error" || line.contains(", status: invalid"))
    });
    if problems.is_empty() && summary_says_error {
        let summary = messages
            .iter()
            .find(|(_, message)| message.starts_with("stanza: "))
            .map(|(_, message)| message.replace('\n', "; "))
            .unwrap_or_default();
        problems.push(summary);
    }
    match problems.as_slice() {
        [] => Ok(()),
        [only] => bail!("pgbackrest verify found a problem: {only}"),
        [first, rest @ ..] => bail!(
            "pgbackrest verify found {} problems: {first} (and {} more: {})",
            problems.len(),
            rest.len(),
            rest.join("; ")
        ),
    }
}

/// The last `ERROR:` line pgBackRest printed, without its timestamp prefix.
fn last_error(text: &str) -> Option<String> {
    text.lines()
        .rev()
        .find_map(|line| line.find("ERROR:").map(|at| line[at..].trim().to_owned()))
}

/// One stanza of `pgbackrest info --output=json`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct StanzaInfo {
    /// The stanza.
    #[serde(default)]
    pub name: String,
    /// Its backups, oldest first.
    #[serde(default)]
    pub backup: Vec<BackupInfo>,
    /// Its WAL archive, per database version.
    #[serde(default)]
    pub archive: Vec<ArchiveInfo>,
    /// pgBackRest's verdict on the stanza.
    #[serde(default)]
    pub status: StatusInfo,
}

/// `status` of a stanza.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct StatusInfo {
    /// 0 is ok.
    #[serde(default)]
    pub code: i64,
    /// What pgBackRest says.
    #[serde(default)]
    pub message: String,
}

/// One backup of a stanza.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct BackupInfo {
    /// Its label, e.g. `20261203-201501F`.
    pub label: String,
    /// `full`, `diff` or `incr`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Start and stop time.
    pub timestamp: Timestamps,
    /// The WAL it needs.
    #[serde(default)]
    pub archive: WalRange,
    /// Sizes.
    #[serde(default)]
    pub info: SizeInfo,
    /// The backup it depends on.
    #[serde(default)]
    pub prior: Option<String>,
    /// pgBackRest found page checksum errors while copying.
    #[serde(default)]
    pub error: Option<bool>,
    /// Where its WAL starts and stops.
    #[serde(default)]
    pub lsn: LsnRange,
}

/// A backup's WAL positions.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct LsnRange {
    /// Start.
    #[serde(default)]
    pub start: Option<jai_proto::Lsn>,
    /// Stop.
    #[serde(default)]
    pub stop: Option<jai_proto::Lsn>,
}

/// A timeline's ancestry, as its `.history` file lists it: each earlier
/// timeline and the position where the next one forked off it.
pub type TimelineHistory = Vec<(u32, jai_proto::Lsn)>;

/// The name of the 16 MiB WAL segment holding `lsn` on `timeline`.
pub fn segment_name(timeline: u32, lsn: jai_proto::Lsn) -> String {
    let segment = lsn.0 / (16 * 1024 * 1024);
    format!("{timeline:08X}{:08X}{:08X}", segment / 256, segment % 256)
}

/// Parses a `.history` file (`1\t0/6002078\treason` per line).
pub fn parse_history(text: &str) -> TimelineHistory {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let timeline = fields.next()?.parse().ok()?;
            let fork = fields.next()?.parse().ok()?;
            Some((timeline, fork))
        })
        .collect()
}

/// Unix seconds.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
pub struct Timestamps {
    /// Start.
    pub start: u64,
    /// Stop.
    pub stop: u64,
}

/// First and last WAL segment.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct WalRange {
    /// First segment.
    #[serde(default)]
    pub start: Option<String>,
    /// Last segment.
    #[serde(default)]
    pub stop: Option<String>,
}

/// Sizes of a backup.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct SizeInfo {
    /// The database's size.
    #[serde(default)]
    pub size: u64,
    /// In the repository (compressed).
    #[serde(default)]
    pub repository: RepoSize,
}

/// Size in the repository.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct RepoSize {
    /// Bytes stored for this backup.
    #[serde(default)]
    pub delta: u64,
}

/// The WAL archive of one database version.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ArchiveInfo {
    /// e.g. `15-1`.
    pub id: String,
    /// Oldest segment.
    #[serde(default)]
    pub min: Option<String>,
    /// Newest segment.
    #[serde(default)]
    pub max: Option<String>,
}

impl BackupInfo {
    /// The timeline the backup started on (from its first WAL segment's name).
    pub fn timeline(&self) -> Option<u32> {
        let first = self.archive.start.as_deref()?;
        u32::from_str_radix(first.get(..8)?, 16).ok()
    }
}

impl StanzaInfo {
    /// The newest backup a standby of a leader on `timeline` can start
    /// from: one of that timeline, or of an ancestor when it stopped before
    /// the fork (`history`: the leader timeline's `.history` in the archive)
    /// and every later timeline's first segment is archived (`archived`,
    /// asked with a segment's file name).
    ///
    /// A backup past the fork holds WAL the leader never had. And while a
    /// timeline's first segment is missing from the archive, recovery takes
    /// the same segment of the timeline before, which the old primary may
    /// have completed with WAL past the fork: the standby would replay it
    /// and never follow. Without the history file nothing earlier qualifies.
    pub fn latest_for(
        &self,
        timeline: u32,
        history: &TimelineHistory,
        archived: impl Fn(&str) -> bool,
    ) -> Option<&BackupInfo> {
        // Each fork, with the timeline that starts there.
        let forks: Vec<(u32, jai_proto::Lsn, u32)> = history
            .iter()
            .enumerate()
            .map(|(index, (parent, fork))| {
                let child = history.get(index + 1).map_or(timeline, |next| next.0);
                (*parent, *fork, child)
            })
            .collect();
        self.backup
            .iter()
            .filter(|backup| match backup.timeline() {
                Some(own) if own == timeline => true,
                Some(own) => {
                    let before_fork = forks.iter().any(|(parent, fork, _)| {
                        *parent == own && backup.lsn.stop.is_some_and(|stop| stop <= *fork)
                    });
                    before_fork
                        && forks
                            .iter()
                            .filter(|(parent, _, _)| *parent >= own)
                            .all(|(_, fork, child)| archived(&segment_name(*child, *fork)))
                }
                None => false,
            })
            .max_by_key(|backup| backup.timestamp.stop)
    }

    /// Whether the WAL segment `name` is in the archive at `archive_dir`.
    pub fn has_segment(&self, archive_dir: &Path, name: &str) -> bool {
        self.archive.iter().any(|archive| {
            let bucket = archive_dir
                .join(&archive.id)
                .join(&name[..16.min(name.len())]);
            std::fs::read_dir(bucket)
                .into_iter()
                .flatten()
                .flatten()
                .any(|file| {
                    file.file_name().to_str().is_some_and(|file| {
                        file.starts_with(name) && file.as_bytes().get(24) == Some(&b'-')
                    })
                })
        })
    }

    /// The `.history` file of `timeline` in the archive at `archive_dir`
    /// (`<repo>/archive/<stanza>`), if it was archived yet.
    pub fn history_of(&self, archive_dir: &Path, timeline: u32) -> TimelineHistory {
        self.archive
            .iter()
            .find_map(|archive| {
                std::fs::read_to_string(
                    archive_dir
                        .join(&archive.id)
                        .join(format!("{timeline:08X}.history")),
                )
                .ok()
            })
            .map(|text| parse_history(&text))
            .unwrap_or_default()
    }

    /// The newest backup.
    pub fn latest(&self) -> Option<&BackupInfo> {
        self.backup
            .iter()
            .max_by_key(|backup| backup.timestamp.stop)
    }

    /// When the newest full backup ended.
    pub fn last_full_stop(&self) -> Option<u64> {
        self.backup
            .iter()
            .filter(|backup| backup.kind == "full")
            .map(|backup| backup.timestamp.stop)
            .max()
    }

    /// When the oldest backup started: no restore can reach earlier.
    pub fn oldest_start(&self) -> Option<u64> {
        self.backup
            .iter()
            .map(|backup| backup.timestamp.start)
            .min()
    }

    /// The newest archived WAL segment.
    pub fn newest_wal(&self) -> Option<&str> {
        self.archive
            .iter()
            .filter_map(|archive| archive.max.as_deref())
            .max()
    }
}

/// Reads `info --output=json` (an array with our one stanza).
pub fn parse_info(text: &str) -> Result<StanzaInfo> {
    let mut stanzas: Vec<StanzaInfo> =
        serde_json::from_str(text).context("pgbackrest info printed no JSON list")?;
    stanzas
        .pop()
        .ok_or_else(|| anyhow!("pgbackrest info listed no stanza"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = r#"[{"archive":[{"database":{"id":1,"repo-key":1},"id":"15-1",
      "max":"000000020000000000000009","min":"000000010000000000000003"}],
      "backup":[
       {"archive":{"start":"000000010000000000000003","stop":"000000010000000000000003"},
        "backrest":{"format":5,"version":"2.45"},"database":{"id":1,"repo-key":1},
        "error":false,"info":{"delta":30000000,"repository":{"delta":4000000,"size":4000000},"size":30000000},
        "label":"20261203-201501F","lsn":{"start":"0/3000028","stop":"0/3000100"},
        "prior":null,"reference":null,"timestamp":{"start":1796328901,"stop":1796328905},"type":"full"},
       {"archive":{"start":"000000020000000000000008","stop":"000000020000000000000008"},
        "info":{"delta":1000,"repository":{"delta":200,"size":200},"size":30000000},
        "label":"20261203-201501F_20261203-202000I","prior":"20261203-201501F",
        "timestamp":{"start":1796329200,"stop":1796329203},"type":"incr"}],
      "cipher":"none","name":"votes","status":{"code":0,"message":"ok"}}]"#;

    #[test]
    fn info_is_read_with_the_facts_the_schedule_needs() {
        let info = parse_info(INFO).unwrap();
        assert_eq!(info.name, "votes");
        assert_eq!(info.latest().unwrap().kind, "incr");
        assert_eq!(info.last_full_stop(), Some(1796328905));
        assert_eq!(info.oldest_start(), Some(1796328901));
        assert_eq!(info.newest_wal(), Some("000000020000000000000009"));
        assert_eq!(info.backup[0].info.repository.delta, 4000000);
        assert_eq!(info.backup[1].timeline(), Some(2));
        let all = |_: &str| true;
        assert_eq!(
            info.latest_for(2, &vec![], all).unwrap().label,
            "20261203-201501F_20261203-202000I"
        );
        assert!(
            info.latest_for(3, &vec![], all).is_none(),
            "no history archived yet"
        );
        let forked_after = parse_history("1\t0/3000100\tno recovery target specified\n");
        assert_eq!(
            info.latest_for(3, &forked_after, all).unwrap().label,
            "20261203-201501F"
        );
        assert!(
            info.latest_for(3, &forked_after, |name| name != "000000030000000000000003")
                .is_none(),
            "the new timeline's first segment is not archived yet"
        );
        let forked_before = parse_history("1\t0/3000050\tbefore the backup ended\n");
        assert!(info.latest_for(3, &forked_before, all).is_none());
        assert_eq!(
            segment_name(2, "1/A9000028".parse().unwrap()),
            "0000000200000001000000A9"
        );
    }

    /// What pgBackRest 2.45 printed in the lab after one byte range of a
    /// backup file was overwritten (it exited 0).
    const VERIFY_ONE_BAD_FILE: &str = "\
2026-12-03 20:30:59.923 P00   INFO: verify command begin 2.45: --config=/tmp/jai-manual/nodes/pg1/state/pgbackrest.conf --exec-id=20268-768749e0 --log-level-console=info --log-level-file=info --log-path=/tmp/jai-manual/nodes/pg1/state/pgbackrest/log --process-max=1 --repo1-path=/tmp/jai-manual/backup/repo --stanza=jai
2026-12-03 20:31:00.011 P01   INFO: invalid checksum '20261203-203020F/pg_data/base/16386/1255.zst'
2026-12-03 20:31:00.177 P00   INFO: stanza: jai
                                    status: error
                                      backup: 20261203-203020F, status: invalid, total files checked: 1263, total valid files: 1262
                                        checksum invalid: 1
2026-12-03 20:31:00.177 P00   INFO: verify command end: completed successfully (256ms)
";

    /// The same with a corrupted WAL file and a deleted backup file too.
    const VERIFY_THREE_BAD_FILES: &str = "\
2026-12-03 20:31:13.587 P00   INFO: verify command begin 2.45: --config=/tmp/jai-manual/nodes/pg1/state/pgbackrest.conf --exec-id=20309-8713e378 --log-level-console=info --log-level-file=info --log-path=/tmp/jai-manual/nodes/pg1/state/pgbackrest/log --process-max=1 --repo1-path=/tmp/jai-manual/backup/repo --stanza=jai
2026-12-03 20:31:28.649 P01   INFO: invalid result 15-1/0000000100000000/000000010000000000000003-e0835b0b6b79d5ecdb541d4582769302cbaff006.zst: [29] raised from local-1 protocol: zst error: [-20] Data corruption detected
                                    [FormatError] on retry after 0ms
                                    [FormatError] on retry after 15000ms
2026-12-03 20:31:28.679 P01   INFO: file missing '20261203-203020F/pg_data/base/1/2838.zst'
2026-12-03 20:31:28.690 P01   INFO: invalid checksum '20261203-203020F/pg_data/base/16386/1255.zst'
2026-12-03 20:31:28.885 P00   INFO: stanza: jai
                                    status: error
                                      archiveId: 15-1, total WAL checked: 4, total valid WAL: 3
                                        other: 1
                                      backup: 20261203-203020F, status: invalid, total files checked: 1263, total valid files: 1261
                                        missing: 1, checksum invalid: 1
2026-12-03 20:31:28.885 P00   INFO: verify command end: completed successfully (15299ms)
";

    /// A good repository: 2.45 prints only the begin and end lines.
    const VERIFY_GOOD: &str = "\
2026-12-03 20:30:53.544 P00   INFO: verify command begin 2.45: --config=/srv/missing-invalid/pgbackrest.conf --exec-id=20247-84f6b52f --log-level-console=info --log-level-file=info --log-path=/srv/ERROR/log --process-max=1 --repo1-path=/srv/missing-invalid/repo --stanza=jai
2026-12-03 20:30:53.813 P00   INFO: verify command end: completed successfully (271ms)
";

    #[test]
    fn verify_names_the_corrupted_backup_file() {
        let error = verify_verdict(VERIFY_ONE_BAD_FILE).unwrap_err().to_string();
        assert_eq!(
            error,
            "pgbackrest verify found a problem: invalid checksum '20261203-203020F/pg_data/base/16386/1255.zst'"
        );
    }

    #[test]
    fn verify_counts_every_bad_file_and_names_the_first() {
        let error = verify_verdict(VERIFY_THREE_BAD_FILES)
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("pgbackrest verify found 3 problems: invalid result 15-1/0000000100000000/000000010000000000000003-"),
            "{error}"
        );
        assert!(
            error.contains("file missing '20261203-203020F/pg_data/base/1/2838.zst'"),
            "{error}"
        );
        assert!(
            error.contains("invalid checksum '20261203-203020F/pg_data/base/16386/1255.zst'"),
            "{error}"
        );
        assert!(!error.contains("P01"), "no log prefixes: {error}");
    }

    #[test]
    fn verify_passes_a_good_repository_whatever_its_paths_are_called() {
        // The begin line echoes the options: words in paths are not findings.
        verify_verdict(VERIFY_GOOD).unwrap();
    }

    #[test]
    fn verify_fails_on_warnings_and_on_an_error_summary_alone() {
        let warned =
            "2026-12-03 20:32:43.056 P00   WARN: backup.info.copy does not match backup.info\n";
        assert!(verify_verdict(warned)
            .unwrap_err()
            .to_string()
            .ends_with("backup.info.copy does not match backup.info"));
        let summary_only = "2026-12-03 20:31:00.177 P00   INFO: stanza: jai\n    status: error\n      backup: 20261203-203020F, status: invalid, total files checked: 3, total valid files: 2\n";
        let error = verify_verdict(summary_only).unwrap_err().to_string();
        assert!(
            error.contains("status: error; backup: 20261203-203020F, status: invalid"),
            "{error}"
        );
    }

    #[test]
    fn the_error_line_is_what_the_operator_sees() {
        let stderr = "2026-12-03 20:00:00.000 P00  ERROR: [055]: unable to load info file '/x/backup.info'\n";
        assert_eq!(
            last_error(stderr).unwrap(),
            "ERROR: [055]: unable to load info file '/x/backup.info'"
        );
    }
}
