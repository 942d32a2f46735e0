//! The operator's backup requests, as the control API receives them:
//! checked here, then recorded in etcd for the leader to assign.

use super::{store, Local};
use crate::clock::unix_now;
use crate::dcs::Dcs;
use crate::ha::ClusterView;
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use jai_proto::{BackupJob, BackupSettings, JobKind, JobOrigin, RestoreIntent, RestorePhase};
use std::time::{Duration, Instant, SystemTime};
use tonic::Status;

/// Parses the `kind` of a request.
pub fn parse_kind(kind: &str) -> Result<JobKind, Status> {
    match kind {
        "full" => Ok(JobKind::Full),
        "diff" => Ok(JobKind::Diff),
        "incr" => Ok(JobKind::Incr),
        "verify" => Ok(JobKind::Verify),
        other => Err(Status::invalid_argument(format!(
            "kind: {other:?} is not one of full, diff, incr, verify"
        ))),
    }
}

/// The cluster's `backup` section, or the refusal an operator reads.
pub fn settings(config: &jai_proto::DynamicConfig) -> Result<&BackupSettings, Status> {
    config.backup.as_ref().ok_or_else(|| {
        Status::failed_precondition(
            "the cluster config has no `backup` section: nothing is archived or backed up \
             (docs/backups.md; jaictl config set backup.stanza=…)",
        )
    })
}

/// Records an operator's job unless one exists; returns it.
pub async fn request(dcs: &Dcs, kind: JobKind, now: u64) -> Result<BackupJob, Status> {
    let keys = store::read(dcs)
        .await
        .map_err(|error| Status::unavailable(format!("etcd: {error:#}")))?;
    if let Some((job, _)) = keys.job {
        return Err(Status::failed_precondition(format!(
            "backup job {} ({}) is {} on {}; wait for it (jaictl backup list)",
            job.id,
            job.kind,
            if job.started_at.is_some() {
                "running"
            } else {
                "waiting"
            },
            job.member
                .as_deref()
                .unwrap_or("a member the leader has not chosen yet"),
        )));
    }
    let job = BackupJob {
        id: format!("{kind}-{now}-operator"),
        kind,
        origin: JobOrigin::Operator,
        member: None,
        requested_at: now,
        started_at: None,
    };
    match store::put_job_if(dcs, &job, 0).await {
        Ok(Some(_)) => Ok(job),
        Ok(None) => Err(Status::failed_precondition(
            "another backup job was recorded meanwhile; wait for it (jaictl backup list)",
        )),
        Err(error) => Err(Status::unavailable(format!("etcd: {error:#}"))),
    }
}

/// `pgbackrest info` of the cluster's stanza, as JSON.
pub async fn list(local: &Local, settings: &BackupSettings) -> Result<String, Status> {
    // The worker keeps the file current; write one only if it has not yet.
    if !local.conf_path().exists() {
        local
            .write_conf(settings, None)
            .map_err(|error| Status::internal(format!("writing pgbackrest.conf: {error:#}")))?;
    }
    let info = local
        .pgbackrest(settings)
        .info()
        .await
        .map_err(|error| Status::failed_precondition(format!("{error:#}")))?;
    serde_json::to_string(&info).map_err(|error| Status::internal(error.to_string()))
}

/// How long a restore request waits for the archive to cover its target
/// after asking the primary to switch WAL segments.
const ARCHIVE_CATCH_UP: Duration = Duration::from_secs(30);

/// Checks a restore to `target_unix` against the repository and records the
/// intent; returns it. `me` restores when no member leads.
pub async fn restore(
    dcs: &Dcs,
    local: &Local,
    view: &ClusterView,
    me: &str,
    target_unix: u64,
    now: u64,
) -> Result<RestoreIntent, Status> {
    let settings = settings(&view.config)?;
    if let Some(intent) = &view.restore {
        return Err(Status::failed_precondition(format!(
            "a restore is under way ({}); wait for it or `jaictl restore --abort`",
            intent.describe()
        )));
    }
    if view.switchover.is_some() {
        return Err(Status::failed_precondition(
            "a switchover is pending: cancel it first (jaictl switchover --cancel)",
        ));
    }
    let target = pg_time(target_unix);
    if target_unix > now {
        return Err(Status::invalid_argument(format!(
            "{target} is in the future (now is {})",
            pg_time(now)
        )));
    }
    let info: super::pgbackrest::StanzaInfo =
        serde_json::from_str(&list(local, settings).await?)
            .map_err(|error| Status::internal(error.to_string()))?;
    let Some(earliest) = info.backup.iter().map(|backup| backup.timestamp.stop).min() else {
        return Err(Status::failed_precondition(
            "the repository holds no backup: nothing to restore from (jaictl backup create --type full)",
        ));
    };
    if target_unix < earliest {
        return Err(Status::failed_precondition(format!(
            "{target} is before the end of the oldest backup ({}): the repository cannot go back that far",
            pg_time(earliest)
        )));
    }
    ensure_archive_covers(local, settings, view, target_unix).await?;
    let intent = RestoreIntent {
        id: format!("restore-{now}"),
        target,
        target_unix,
        restorer: view
            .leader
            .as_ref()
            .map_or_else(|| me.to_owned(), |leader| leader.name.clone()),
        requested_at: now,
        phase: RestorePhase::Stopping,
    };
    let keys = dcs.keys();
    let txn = Txn::new()
        .when([
            Compare::create_revision(keys.restore(), CompareOp::Equal, 0),
            Compare::create_revision(keys.switchover(), CompareOp::Equal, 0),
        ])
        .and_then([TxnOp::put(
            keys.restore(),
            serde_json::to_string(&intent).map_err(|error| Status::internal(error.to_string()))?,
            None,
        )]);
    let mut client = dcs.client();
    let written = dcs
        .bounded("record restore", client.txn(txn))
        .await
        .map_err(|error| Status::unavailable(format!("etcd: {error}")))?
        .succeeded();
    if !written {
        return Err(Status::failed_precondition(
            "a restore or a switchover was recorded meanwhile: look at jaictl status",
        ));
    }
    Ok(intent)
}

/// The archive must hold WAL written after the target, or recovery would
/// end before it: the primary is asked to close its segment, and the
/// request waits a little for the archiver.
async fn ensure_archive_covers(
    local: &Local,
    settings: &BackupSettings,
    view: &ClusterView,
    target_unix: u64,
) -> Result<(), Status> {
    let archive = settings.repo_path.join("archive").join(&settings.stanza);
    let newest = || {
        super::drill::newest_archived_wal_age(&archive)
            .map(|age| unix_now().saturating_sub(age.ceil() as u64))
    };
    if newest().is_some_and(|at| at > target_unix) {
        return Ok(());
    }
    let primary = view
        .leader
        .as_ref()
        .and_then(|leader| view.member(&leader.name))
        .map(|status| status.pg_address.clone());
    if let Some(address) = &primary {
        if let Err(error) = local.switch_wal_at(address).await {
            tracing::warn!("restore: pg_switch_wal on {address}: {error:#}");
        }
    }
    let deadline = Instant::now() + ARCHIVE_CATCH_UP;
    while Instant::now() < deadline {
        if newest().is_some_and(|at| at > target_unix) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(Status::failed_precondition(format!(
        "the WAL archive ends at {}, before {}: a restore would stop short of the target \
         (is archiving failing? see docs/runbook.md, \"The archive is failing\")",
        newest().map_or_else(|| "nothing".to_owned(), pg_time),
        pg_time(target_unix)
    )))
}

/// Removes a restore intent that has not restored yet.
pub async fn abort(dcs: &Dcs, view: &ClusterView) -> Result<String, Status> {
    let Some(intent) = &view.restore else {
        return Err(Status::failed_precondition("no restore is under way"));
    };
    if intent.phase == RestorePhase::Rejoining {
        return Err(Status::failed_precondition(format!(
            "the restore to {} is done; the other members are re-cloning: it cannot be undone",
            intent.target
        )));
    }
    let keys = dcs.keys();
    let txn = Txn::new()
        .when([Compare::value(
            keys.restore(),
            CompareOp::Equal,
            serde_json::to_string(intent).map_err(|error| Status::internal(error.to_string()))?,
        )])
        .and_then([TxnOp::delete(keys.restore(), None)]);
    let mut client = dcs.client();
    let removed = dcs
        .bounded("abort restore", client.txn(txn))
        .await
        .map_err(|error| Status::unavailable(format!("etcd: {error}")))?
        .succeeded();
    if !removed {
        return Err(Status::failed_precondition(
            "the restore moved on meanwhile: look at jaictl status",
        ));
    }
    Ok(format!(
        "restore to {} aborted; if {} had begun restoring, `jaictl reinit {}` it",
        intent.target, intent.restorer, intent.restorer
    ))
}

/// Unix seconds as PostgreSQL and pgBackRest take a recovery target:
/// `2026-12-03 14:02:00+00`.
pub fn pg_time(unix: u64) -> String {
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(unix);
    humantime::format_rfc3339_seconds(at)
        .to_string()
        .replace('T', " ")
        .replace('Z', "+00")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_written_as_postgresql_reads_them() {
        assert_eq!(pg_time(1_796_306_520), "2026-12-03 14:02:00+00");
    }
}
