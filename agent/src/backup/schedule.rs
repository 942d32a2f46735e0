//! The leader's backup decisions, as a pure function: which job is due, which
//! member runs it, and when a job is abandoned.
//!
//! Only the leader decides, and at most one job exists (`backup/job`), so two
//! members never back up at once and a new leader picks up where the old one
//! left off: everything it needs is in etcd and in the repository.

use jai_proto::{
    BackupJob, BackupSettings, JobKind, JobOrigin, JobResult, MemberRole, MemberState, MemberStatus,
};

/// A job the assigned member has not started after this long is given to another.
pub const START_WITHIN_SECS: u64 = 60;
/// A job running longer than this is presumed dead (its member froze or lost
/// its disk) and abandoned; pgBackRest never records an unfinished backup.
pub const RUN_AT_MOST_SECS: u64 = 12 * 3600;
/// After a failed scheduled job, the next scheduled attempt waits this long.
pub const RETRY_AFTER_SECS: u64 = 300;

/// What the repository says, as far as the schedule cares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepoFacts {
    /// When the newest full backup ended (Unix seconds).
    pub last_full: Option<u64>,
    /// When the newest backup of any type ended.
    pub last_any: Option<u64>,
    /// The timeline of the newest backup.
    pub newest_timeline: Option<u32>,
}

/// Everything the leader decides from.
pub struct Inputs<'a> {
    /// Now (Unix seconds).
    pub now: u64,
    /// The cluster's `backup` section.
    pub settings: &'a BackupSettings,
    /// The leader's own name.
    pub leader: &'a str,
    /// The leader's timeline, once known.
    pub timeline: Option<u32>,
    /// Every member's published status.
    pub members: &'a [MemberStatus],
    /// `backup/job`.
    pub job: Option<&'a BackupJob>,
    /// The repository, once read (`None`: not known yet, schedule nothing).
    pub repo: Option<RepoFacts>,
    /// `backup/last`.
    pub last_backup: Option<&'a JobResult>,
    /// `backup/last_verify`.
    pub last_verify: Option<&'a JobResult>,
}

/// The leader's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to do.
    Nothing,
    /// Write this job (new, or an operator's request now assigned).
    Write(BackupJob),
    /// Abandon the job: record it as failed with this reason.
    Abandon(String),
}

/// Decides what the leader does about backups now.
pub fn decide(inputs: &Inputs) -> Decision {
    match inputs.job {
        Some(job) => about_existing(inputs, job),
        None => match due(inputs) {
            Some(kind) => Decision::Write(BackupJob {
                id: format!("{kind}-{}", inputs.now),
                kind,
                origin: JobOrigin::Schedule,
                member: Some(runner(inputs, kind)),
                requested_at: inputs.now,
                started_at: None,
            }),
            None => Decision::Nothing,
        },
    }
}

fn about_existing(inputs: &Inputs, job: &BackupJob) -> Decision {
    let Some(member) = &job.member else {
        return Decision::Write(BackupJob {
            member: Some(runner(inputs, job.kind)),
            ..job.clone()
        });
    };
    if !inputs.members.iter().any(|status| &status.name == member) {
        return Decision::Abandon(format!("{member} left the cluster before finishing it"));
    }
    match job.started_at {
        None if inputs.now.saturating_sub(job.requested_at) > START_WITHIN_SECS => {
            Decision::Abandon(format!(
                "{member} did not start it within {START_WITHIN_SECS} s"
            ))
        }
        Some(started) if inputs.now.saturating_sub(started) > RUN_AT_MOST_SECS => {
            Decision::Abandon(format!(
                "{member} ran it for more than {} h",
                RUN_AT_MOST_SECS / 3600
            ))
        }
        _ => Decision::Nothing,
    }
}

/// The scheduled job due now, if any: a full backup when none is recent
/// enough, else an incremental one, else a restore drill.
fn due(inputs: &Inputs) -> Option<JobKind> {
    let repo = inputs.repo?;
    let settings = inputs.settings;
    let older_than = |at: Option<u64>, every: std::time::Duration| {
        at.is_none_or(|at| inputs.now.saturating_sub(at) >= every.as_secs())
    };
    let recently_failed = |result: Option<&JobResult>| {
        result.is_some_and(|result| {
            !result.ok && inputs.now.saturating_sub(result.finished_at) < RETRY_AFTER_SECS
        })
    };
    if !recently_failed(inputs.last_backup) {
        if older_than(repo.last_full, settings.full_every) {
            return Some(JobKind::Full);
        }
        if older_than(repo.last_any, settings.incr_every) {
            return Some(JobKind::Incr);
        }
        // After a failover or a restore: new replicas restore only from a
        // backup of the leader's timeline, so one is taken at once.
        if let (Some(newest), Some(current)) = (repo.newest_timeline, inputs.timeline) {
            if newest < current {
                return Some(JobKind::Incr);
            }
        }
    }
    let verified_at = inputs.last_verify.map(|result| result.finished_at);
    (repo.last_any.is_some()
        && !recently_failed(inputs.last_verify)
        && older_than(verified_at, settings.verify_every))
    .then_some(JobKind::Verify)
}

/// Who runs a job: a streaming replica when one can, so the primary is not
/// loaded; the leader otherwise.
///
/// A backup from a standby also needs the primary's files (pgBackRest copies
/// the few unreplicated ones from it), so only a replica on the leader's
/// host qualifies; a restore drill needs only the repository, so any running
/// replica does.
fn runner(inputs: &Inputs, kind: JobKind) -> String {
    let leader = inputs
        .members
        .iter()
        .find(|status| status.name == inputs.leader);
    let leader_host = leader.and_then(|status| host_of(&status.pg_address));
    let leader_paths = leader.is_some_and(|status| status.pg_paths.is_some());
    inputs
        .members
        .iter()
        .filter(|status| {
            status.name != inputs.leader
                && status.role == MemberRole::Replica
                && status.state == MemberState::Running
                && status.streaming == Some(true)
        })
        .filter(|status| {
            kind == JobKind::Verify
                || (leader_paths
                    && status.pg_paths.is_some()
                    && host_of(&status.pg_address).is_some()
                    && host_of(&status.pg_address) == leader_host)
        })
        .max_by_key(|status| (status.replay_lsn, std::cmp::Reverse(status.name.clone())))
        .map(|status| status.name.clone())
        .unwrap_or_else(|| inputs.leader.to_owned())
}

fn host_of(address: &str) -> Option<&str> {
    address.rsplit_once(':').map(|(host, _)| host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jai_proto::{Lsn, PgPaths};

    fn member(name: &str, role: MemberRole, host: &str, replay: u64) -> MemberStatus {
        let mut status: MemberStatus = serde_json::from_value(serde_json::json!({
            "name": name, "role": "replica", "state": "running", "api_url": "",
            "pg_address": format!("{host}:5432"), "version": "t"
        }))
        .unwrap();
        status.role = role;
        status.streaming = (role == MemberRole::Replica).then_some(true);
        status.replay_lsn = Some(Lsn(replay));
        status.pg_paths = Some(PgPaths {
            data_dir: format!("/d/{name}"),
            socket_dir: format!("/s/{name}"),
        });
        status
    }

    fn inputs<'a>(
        settings: &'a BackupSettings,
        members: &'a [MemberStatus],
        job: Option<&'a BackupJob>,
        repo: Option<RepoFacts>,
    ) -> Inputs<'a> {
        Inputs {
            now: 1_000_000,
            settings,
            leader: "pg1",
            timeline: Some(1),
            members,
            job,
            repo,
            last_backup: None,
            last_verify: None,
        }
    }

    #[test]
    fn an_empty_repository_gets_a_full_backup_from_a_replica_on_the_leaders_host() {
        let settings = BackupSettings::default();
        let members = [
            member("pg1", MemberRole::Primary, "10.0.0.1", 0),
            member("pg2", MemberRole::Replica, "10.0.0.1", 5),
            member("pg3", MemberRole::Replica, "10.0.0.1", 9),
        ];
        let decision = decide(&inputs(
            &settings,
            &members,
            None,
            Some(RepoFacts::default()),
        ));
        let Decision::Write(job) = decision else {
            panic!("{decision:?}")
        };
        assert_eq!(job.kind, JobKind::Full);
        assert_eq!(
            job.member.as_deref(),
            Some("pg3"),
            "the most caught-up replica"
        );
    }

    #[test]
    fn replicas_on_other_hosts_leave_the_backup_to_the_leader_but_may_drill() {
        let settings = BackupSettings::default();
        let members = [
            member("pg1", MemberRole::Primary, "10.0.0.1", 0),
            member("pg2", MemberRole::Replica, "10.0.0.2", 5),
        ];
        let mut state = inputs(&settings, &members, None, Some(RepoFacts::default()));
        assert!(
            matches!(decide(&state), Decision::Write(job) if job.member.as_deref() == Some("pg1"))
        );
        state.repo = Some(RepoFacts {
            last_full: Some(state.now - 10),
            last_any: Some(state.now - 10),
            newest_timeline: Some(1),
        });
        assert!(matches!(decide(&state),
            Decision::Write(job) if job.kind == JobKind::Verify && job.member.as_deref() == Some("pg2")));
    }

    #[test]
    fn the_schedule_waits_until_the_repository_is_read_and_backups_are_due() {
        let settings = BackupSettings::default();
        let members = [member("pg1", MemberRole::Primary, "h", 0)];
        assert_eq!(
            decide(&inputs(&settings, &members, None, None)),
            Decision::Nothing
        );
        let now = 1_000_000;
        let mut state = inputs(
            &settings,
            &members,
            None,
            Some(RepoFacts {
                last_full: Some(now - 3600),
                last_any: Some(now - 25 * 3600),
                newest_timeline: Some(1),
            }),
        );
        let verified = JobResult {
            id: "v".into(),
            kind: JobKind::Verify,
            member: "pg1".into(),
            started_at: now - 10,
            finished_at: now - 5,
            ok: true,
            problem: None,
            label: None,
            repo_size: None,
            drill: None,
        };
        state.last_verify = Some(&verified);
        assert!(matches!(decide(&state), Decision::Write(job) if job.kind == JobKind::Incr));
        state.repo = Some(RepoFacts {
            last_full: Some(now - 3600),
            last_any: Some(now - 3600),
            newest_timeline: Some(1),
        });
        assert_eq!(decide(&state), Decision::Nothing);
        state.timeline = Some(2);
        assert!(
            matches!(decide(&state), Decision::Write(job) if job.kind == JobKind::Incr),
            "a new timeline gets its backup at once"
        );
    }

    #[test]
    fn a_failed_backup_is_retried_only_after_a_pause() {
        let settings = BackupSettings::default();
        let members = [member("pg1", MemberRole::Primary, "h", 0)];
        let failed = JobResult {
            id: "f".into(),
            kind: JobKind::Full,
            member: "pg1".into(),
            started_at: 999_000,
            finished_at: 999_990,
            ok: false,
            problem: Some("disk full".into()),
            label: None,
            repo_size: None,
            drill: None,
        };
        let mut state = inputs(&settings, &members, None, Some(RepoFacts::default()));
        state.last_backup = Some(&failed);
        assert_eq!(decide(&state), Decision::Nothing);
        state.now += RETRY_AFTER_SECS;
        assert!(matches!(decide(&state), Decision::Write(_)));
    }

    #[test]
    fn an_operators_request_is_assigned_and_a_dead_runner_is_abandoned() {
        let settings = BackupSettings::default();
        let members = [
            member("pg1", MemberRole::Primary, "h", 0),
            member("pg2", MemberRole::Replica, "h", 1),
        ];
        let request = BackupJob {
            id: "op".into(),
            kind: JobKind::Full,
            origin: JobOrigin::Operator,
            member: None,
            requested_at: 999_999,
            started_at: None,
        };
        let decision = decide(&inputs(&settings, &members, Some(&request), None));
        assert!(
            matches!(&decision, Decision::Write(job) if job.member.as_deref() == Some("pg2") && job.id == "op")
        );
        let running = BackupJob {
            member: Some("pg9".into()),
            started_at: Some(999_000),
            ..request.clone()
        };
        assert!(matches!(
            decide(&inputs(&settings, &members, Some(&running), None)),
            Decision::Abandon(reason) if reason.contains("pg9 left")
        ));
        let stuck = BackupJob {
            member: Some("pg2".into()),
            requested_at: 1_000_000 - START_WITHIN_SECS - 1,
            ..request
        };
        assert!(matches!(
            decide(&inputs(&settings, &members, Some(&stuck), None)),
            Decision::Abandon(_)
        ));
    }
}
