//! The operator's backup requests, as the control API receives them:
//! checked here, then recorded in etcd for the leader to assign.

use super::{store, Local};
use crate::dcs::Dcs;
use jai_proto::{BackupJob, BackupSettings, JobKind, JobOrigin};
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
            if job.started_at.is_some() { "running" } else { "waiting" },
            job.member.as_deref().unwrap_or("a member the leader has not chosen yet"),
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
