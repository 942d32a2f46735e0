//! The backup keys in etcd (`backup/job`, `backup/last`, `backup/last_verify`),
//! read together and changed only by compare-and-swap on the job's revision,
//! so the leader and the runner never overwrite each other's move.

use crate::dcs::Dcs;
use anyhow::{Context, Result};
use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use jai_proto::{BackupJob, JobKind, JobResult};

/// The backup keys, as read at one revision.
#[derive(Debug, Clone, Default)]
pub struct BackupKeys {
    /// The job and its modification revision.
    pub job: Option<(BackupJob, i64)>,
    /// The last backup's result.
    pub last_backup: Option<JobResult>,
    /// The last restore drill's result.
    pub last_verify: Option<JobResult>,
}

/// Reads the three keys in one request; a value that does not decode counts
/// as absent (and is overwritten by the next result).
pub async fn read(dcs: &Dcs) -> Result<BackupKeys> {
    let keys = dcs.keys();
    let prefix = format!("{}backup/", keys.prefix());
    let mut client = dcs.client();
    let response = dcs
        .bounded(
            "read backup keys",
            client.get(prefix, Some(GetOptions::new().with_prefix())),
        )
        .await?;
    let mut found = BackupKeys::default();
    for kv in response.kvs() {
        let key = kv.key_str().unwrap_or_default();
        if key == keys.backup_job() {
            found.job = serde_json::from_slice(kv.value())
                .ok()
                .map(|job| (job, kv.mod_revision()));
        } else if key == keys.backup_last() {
            found.last_backup = serde_json::from_slice(kv.value()).ok();
        } else if key == keys.backup_last_verify() {
            found.last_verify = serde_json::from_slice(kv.value()).ok();
        }
    }
    Ok(found)
}

/// Writes `job` if the job key is still at `revision` (0: absent); returns
/// the job's new revision when it was written.
pub async fn put_job_if(dcs: &Dcs, job: &BackupJob, revision: i64) -> Result<Option<i64>> {
    let key = dcs.keys().backup_job();
    let guard = if revision == 0 {
        Compare::create_revision(key.clone(), CompareOp::Equal, 0)
    } else {
        Compare::mod_revision(key.clone(), CompareOp::Equal, revision)
    };
    let txn =
        Txn::new()
            .when([guard])
            .and_then([TxnOp::put(key, serde_json::to_string(job)?, None)]);
    let mut client = dcs.client();
    let response = dcs.bounded("write backup job", client.txn(txn)).await?;
    Ok(response
        .succeeded()
        .then(|| response.header().map_or(0, |header| header.revision())))
}

/// Records `result` and removes the job if it is still at `revision` (a job
/// the leader abandoned meanwhile is not removed twice; the result is kept:
/// it says what happened).
pub async fn finish(dcs: &Dcs, result: &JobResult, revision: i64) -> Result<()> {
    let keys = dcs.keys();
    let target = match result.kind {
        JobKind::Verify => keys.backup_last_verify(),
        _ => keys.backup_last(),
    };
    let put = TxnOp::put(target, serde_json::to_string(result)?, None);
    let txn = Txn::new()
        .when([Compare::mod_revision(
            keys.backup_job(),
            CompareOp::Equal,
            revision,
        )])
        .and_then([put.clone(), TxnOp::delete(keys.backup_job(), None)])
        .or_else([put]);
    let mut client = dcs.client();
    dcs.bounded("record backup result", client.txn(txn))
        .await
        .context("recording the job's result")?;
    Ok(())
}
