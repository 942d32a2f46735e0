//! `jaictl backup …`: ask the agents for a backup or a verification, wait for
//! its result in etcd, and list what the repository holds.

use crate::cli::{BackupCommand, Format, RestoreArgs};
use crate::commands::{unix_now, Session};
use crate::error::CtlError;
use crate::render;
use comfy_table::presets::UTF8_BORDERS_ONLY;
use comfy_table::{Cell, ContentArrangement, Table};
use jai_grpc::{BackupRequest, ListBackupsRequest, RestoreRequest};
use jai_proto::JobResult;
use serde::Serialize;
use std::time::{Duration, Instant, SystemTime};

/// How often a waiting command re-reads etcd.
const POLL_EVERY: Duration = Duration::from_millis(250);

/// Runs one `jaictl backup` subcommand.
pub async fn run(session: &mut Session, command: BackupCommand) -> Result<(), CtlError> {
    require_backup_section(session)?;
    match command {
        BackupCommand::Create { kind, wait } => request(session, kind.name(), wait).await,
        BackupCommand::Verify { wait } => request(session, "verify", wait).await,
        BackupCommand::List(args) => list(session, args.output).await,
    }
}

fn require_backup_section(session: &Session) -> Result<(), CtlError> {
    session.state.readable_config()?;
    if session.state.config.backup.is_none() {
        return Err(CtlError::Refused(
            "the cluster config has no `backup` section: nothing is archived or backed up (docs/backups.md)".into(),
        ));
    }
    Ok(())
}

/// Records the job through an agent, then waits for its result.
async fn request(session: &mut Session, kind: &str, wait: Duration) -> Result<(), CtlError> {
    let mut agent = session.any_agent().await?;
    let (client, call) = agent.call(BackupRequest { kind: kind.into() });
    let reply = client
        .request_backup(call)
        .await
        .map_err(|status| agent.refused(status))?
        .into_inner();
    eprintln!("{}", reply.message);
    let result = wait_for_result(session, &reply.job_id, wait).await?;
    print_result(&result);
    if result.ok {
        Ok(())
    } else {
        Err(CtlError::Refused(format!(
            "{} failed on {}: {}",
            result.kind,
            result.member,
            result.problem.as_deref().unwrap_or("unknown")
        )))
    }
}

async fn wait_for_result(
    session: &mut Session,
    id: &str,
    wait: Duration,
) -> Result<JobResult, CtlError> {
    let deadline = Instant::now() + wait;
    let mut announced = None::<String>;
    loop {
        session.refresh().await?;
        let state = &session.state;
        let finished = [&state.last_backup, &state.last_verify]
            .into_iter()
            .flatten()
            .find(|result| result.id == id);
        if let Some(result) = finished {
            return Ok(result.clone());
        }
        if let Some(job) = state.backup_job.as_ref().filter(|job| job.id == id) {
            let now = format!(
                "{} on {}",
                if job.started_at.is_some() {
                    "running"
                } else {
                    "assigned"
                },
                job.member.as_deref().unwrap_or("-")
            );
            if job.member.is_some() && announced.as_deref() != Some(now.as_str()) {
                eprintln!("{now}");
                announced = Some(now);
            }
        }
        if Instant::now() >= deadline {
            return Err(CtlError::Refused(format!(
                "job {id} has no result after {}; it may still run: jaictl status shows it",
                humantime::format_duration(wait)
            )));
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

fn print_result(result: &JobResult) {
    println!("{}", render::describe_result(result));
    if let Some(size) = result.repo_size {
        println!("  stored in the repository: {}", render::bytes(size));
    }
    let Some(drill) = &result.drill else {
        return;
    };
    println!("  repository: pgbackrest verify found no problem");
    println!(
        "  restore drill: {} restored and recovered in {:.1} s",
        drill.label, drill.restore_seconds
    );
    if let Some(lsn) = &drill.end_lsn {
        let last = drill
            .end_time
            .as_ref()
            .map(|time| format!(", last transaction {time}"))
            .unwrap_or_default();
        println!("  recovered to: {lsn}{last}");
    }
    if let Some(rpo) = drill.rpo_seconds {
        println!("  RPO: the newest archived WAL was {rpo:.1} s old");
    }
    println!("  pg_amcheck: {}", drill.amcheck);
    for (table, rows) in &drill.rows {
        println!("  rows: {table} {rows}");
    }
}

/// One row of `jaictl backup list`.
#[derive(Debug, Serialize)]
struct BackupRow {
    label: String,
    #[serde(rename = "type")]
    kind: String,
    start: String,
    stop: String,
    size: u64,
    repo_size: u64,
    wal_start: Option<String>,
    wal_stop: Option<String>,
    verified: bool,
}

/// `pgbackrest info` as an agent reads it, with the drill's verdict.
#[derive(Debug, Serialize)]
struct BackupList {
    stanza: String,
    status: String,
    backups: Vec<BackupRow>,
    last_verify: Option<JobResult>,
}

#[derive(serde::Deserialize)]
struct Info {
    #[serde(default)]
    name: String,
    #[serde(default)]
    backup: Vec<InfoBackup>,
    #[serde(default)]
    status: InfoStatus,
}

#[derive(serde::Deserialize, Default)]
struct InfoStatus {
    #[serde(default)]
    message: String,
}

#[derive(serde::Deserialize)]
struct InfoBackup {
    label: String,
    #[serde(rename = "type")]
    kind: String,
    timestamp: InfoTimes,
    #[serde(default)]
    archive: InfoWal,
    #[serde(default)]
    info: InfoSize,
}

#[derive(serde::Deserialize)]
struct InfoTimes {
    start: u64,
    stop: u64,
}

#[derive(serde::Deserialize, Default)]
struct InfoWal {
    start: Option<String>,
    stop: Option<String>,
}

#[derive(serde::Deserialize, Default)]
struct InfoSize {
    #[serde(default)]
    size: u64,
    #[serde(default)]
    repository: InfoRepoSize,
}

#[derive(serde::Deserialize, Default)]
struct InfoRepoSize {
    #[serde(default)]
    delta: u64,
}

async fn list(session: &mut Session, format: Format) -> Result<(), CtlError> {
    let mut agent = session.any_agent().await?;
    let (client, call) = agent.call(ListBackupsRequest {});
    let reply = client
        .list_backups(call)
        .await
        .map_err(|status| agent.refused(status))?
        .into_inner();
    let info: Info = serde_json::from_str(&reply.info_json).map_err(|error| {
        CtlError::Refused(format!("{}: unreadable backup list: {error}", agent.name))
    })?;
    let verified_label = session
        .state
        .last_verify
        .as_ref()
        .filter(|result| result.ok)
        .and_then(|result| result.label.clone());
    let list = BackupList {
        stanza: info.name,
        status: info.status.message,
        backups: info
            .backup
            .into_iter()
            .map(|backup| BackupRow {
                verified: verified_label.as_deref() == Some(backup.label.as_str()),
                label: backup.label,
                kind: backup.kind,
                start: render::format_unix(backup.timestamp.start),
                stop: render::format_unix(backup.timestamp.stop),
                size: backup.info.size,
                repo_size: backup.info.repository.delta,
                wal_start: backup.archive.start,
                wal_stop: backup.archive.stop,
            })
            .collect(),
        last_verify: session.state.last_verify.clone(),
    };
    if let Some(text) = render::structured(&list, format)? {
        println!("{text}");
        return Ok(());
    }
    println!("Stanza: {} ({})", list.stanza, list.status);
    if list.backups.is_empty() {
        println!("No backup yet: jaictl backup create --type full");
        return Ok(());
    }
    let mut table = Table::new();
    table
        .load_style(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(
            [
                "Label", "Type", "Start", "Stop", "Size", "In repo", "WAL", "Verified",
            ]
            .map(Cell::new),
        );
    for row in &list.backups {
        table.add_row([
            row.label.clone(),
            row.kind.clone(),
            row.start.clone(),
            row.stop.clone(),
            render::bytes(row.size),
            render::bytes(row.repo_size),
            format!(
                "{}..{}",
                row.wal_start.as_deref().unwrap_or("?"),
                row.wal_stop.as_deref().unwrap_or("?")
            ),
            if row.verified { "yes" } else { "" }.into(),
        ]);
    }
    println!("{table}");
    if let Some(result) = &list.last_verify {
        println!("Last verify: {}", render::describe_result(result));
    }
    Ok(())
}

/// `jaictl restore`: checked by an agent against the repository, recorded,
/// then followed until the cluster leads again on the restored data.
pub async fn restore(session: &mut Session, args: RestoreArgs) -> Result<(), CtlError> {
    if args.abort {
        let mut agent = session.any_agent().await?;
        let (client, call) = agent.call(RestoreRequest {
            target_unix: 0,
            abort: true,
        });
        let reply = client
            .restore(call)
            .await
            .map_err(|status| agent.refused(status))?;
        println!("{}", reply.into_inner().message);
        return Ok(());
    }
    require_backup_section(session)?;
    let text = args
        .time
        .as_deref()
        .expect("clap requires --time without --abort");
    let target_unix = parse_target(text, unix_now())?;
    let shown = render::format_unix(target_unix);
    crate::commands::confirm(
        &format!(
            "Restore cluster {} to {shown}? Every member stops, writes fail until it is back, \
             and everything written after {shown} is lost.",
            session.state.cluster
        ),
        args.force,
    )?;
    let mut agent = session.any_agent().await?;
    let (client, call) = agent.call(RestoreRequest {
        target_unix,
        abort: false,
    });
    let reply = client
        .restore(call)
        .await
        .map_err(|status| agent.refused(status))?;
    eprintln!("{}", reply.into_inner().message);
    let started = Instant::now();
    let requested_at = unix_now();
    let deadline = started + args.wait;
    let mut last_line = String::new();
    loop {
        session.refresh().await?;
        let state = &session.state;
        // The restorer records the restore in history before the others
        // rejoin, and removes the intent once they all stream.
        let recorded = state.history.last().is_some_and(|entry| {
            entry.reason.starts_with("restore to ") && entry.time_unix + 1 >= requested_at
        });
        if let Some(intent) = &state.restore {
            let restorer = state.member(&intent.restorer);
            if let Some(status) =
                restorer.filter(|status| status.state == jai_proto::MemberState::Refused)
            {
                return Err(CtlError::Refused(format!(
                    "{}: {}",
                    status.name,
                    status.reason.as_deref().unwrap_or("refused")
                )));
            }
            let line = format!(
                "{} ({})",
                intent.describe(),
                restorer
                    .and_then(|status| status.reason.clone())
                    .unwrap_or_default()
            );
            if line != last_line {
                eprintln!("{line}");
                last_line = line;
            }
        } else if recorded && state.leader_member().is_some() {
            println!(
                "cluster restored to {shown} in {} s; leader {} on timeline {}",
                started.elapsed().as_secs(),
                state.leader.as_deref().unwrap_or("-"),
                state
                    .leader_member()
                    .and_then(|member| member.timeline)
                    .map_or_else(|| "?".into(), |timeline| timeline.to_string())
            );
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(CtlError::Refused(format!(
                "the restore is not finished after {}; it goes on: jaictl status shows it",
                humantime::format_duration(args.wait)
            )));
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// `--time`: RFC 3339 (UTC without an offset) or `-DURATION` ago.
fn parse_target(text: &str, now: u64) -> Result<u64, CtlError> {
    if let Some(ago) = text.strip_prefix('-') {
        let ago = humantime::parse_duration(ago)
            .map_err(|error| CtlError::Usage(format!("--time {text}: {error}")))?;
        return Ok(now.saturating_sub(ago.as_secs()));
    }
    let (local, offset) = split_offset(text);
    let at = humantime::parse_rfc3339_weak(local).map_err(|error| {
        CtlError::Usage(format!(
            "--time {text}: {error} (use 2026-12-03T14:02:00Z, 2026-12-03T15:02:00+01:00 or -10m)"
        ))
    })?;
    let unix = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| CtlError::Usage(format!("--time {text}: before 1970")))?
        .as_secs() as i64
        - offset;
    let unix =
        u64::try_from(unix).map_err(|_| CtlError::Usage(format!("--time {text}: before 1970")))?;
    if unix > now {
        return Err(CtlError::Usage(format!(
            "--time {text}: that is in the future"
        )));
    }
    Ok(unix)
}

/// A trailing `+HH:MM` / `-HH:MM` offset split off (in seconds east of UTC).
fn split_offset(text: &str) -> (&str, i64) {
    let bytes = text.as_bytes();
    if bytes.len() > 6 && bytes[bytes.len() - 3] == b':' {
        let (rest, tail) = text.split_at(text.len() - 6);
        let sign = match tail.as_bytes()[0] {
            b'+' => 1,
            b'-' => -1,
            _ => return (text, 0),
        };
        if let (Ok(hours), Ok(minutes)) = (tail[1..3].parse::<i64>(), tail[4..6].parse::<i64>()) {
            return (rest, sign * (hours * 3600 + minutes * 60));
        }
    }
    (text, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_a_time_or_a_time_ago_never_the_future() {
        let now = 1_796_306_520;
        assert_eq!(parse_target("2026-12-03T14:02:00Z", now).unwrap(), now);
        assert_eq!(parse_target("2026-12-03 14:01:00", now).unwrap(), now - 60);
        assert_eq!(parse_target("-10m", now).unwrap(), now - 600);
        assert_eq!(parse_target("2026-12-03T15:02:00+01:00", now).unwrap(), now);
        assert_eq!(parse_target("2026-12-03T09:02:00-05:00", now).unwrap(), now);
        assert!(matches!(
            parse_target("2026-12-03T14:03:00Z", now),
            Err(CtlError::Usage(_))
        ));
        assert!(matches!(
            parse_target("yesterday", now),
            Err(CtlError::Usage(_))
        ));
    }
}
