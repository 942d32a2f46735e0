//! The gRPC control API (`proto/jai.proto`) that `jaictl` drives.
//!
//! Every call that changes the cluster is checked here, then either recorded
//! in etcd for the agents to carry out (switchover and failover intents, the
//! pause flag, config patches), or handed to this agent's decision loop as an
//! [`OperatorRequest`] (restart, reinitialise, reload), which runs it between
//! two decisions so it never races one. Nothing here acts on PostgreSQL itself.
//!
//! Mutating calls need the control token (`authorization: Bearer <token>`),
//! compared in constant time; reads are open, like the health API.

use crate::clock::unix_now;
use crate::dcs::Dcs;
use crate::ha::{self, ClusterView, Initialize, LeaderKey, PgRole, RunningPostgres};
use jai_grpc::control_server::{Control, ControlServer};
use jai_grpc::{
    BackupJobReply, BackupRequest, CancelSwitchoverRequest, ConfigReply, FailoverRequest,
    GetConfigRequest, HistoryReply, HistoryRequest, ListBackupsReply, ListBackupsRequest, Member,
    OperationReply, PatchConfigRequest, ReinitializeRequest, ReloadRequest, RestartRequest,
    RestoreRequest, SetPauseRequest, StatusReply, StatusRequest, SwitchoverRequest,
};
use jai_proto::{DynamicConfig, MemberRole, MemberStatus, SwitchoverIntent};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// Something only this agent's decision loop may do, with where to answer.
#[derive(Debug)]
pub struct OperatorRequest {
    /// What to do.
    pub kind: OperatorRequestKind,
    /// The outcome for the operator: what was done, or why not.
    pub reply: oneshot::Sender<Result<String, String>>,
}

/// The operations the loop runs on an operator's behalf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorRequestKind {
    /// Stop and start PostgreSQL in its current role.
    Restart {
        /// Only when a changed setting waits for a restart.
        only_if_pending: bool,
    },
    /// Wipe the data directory so the member clones again from the leader.
    Reinitialize,
    /// Rewrite PostgreSQL's settings and reload them.
    Reload,
}

/// How long an operator request may wait for the loop (a restart includes a
/// PostgreSQL stop and start).
const OPERATOR_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// How many loops a switchover request waits for a refusal that may clear
/// (a replica not yet published as streaming) before it is refused.
const SWITCHOVER_SETTLE_LOOPS: u32 = 2;

/// Pause between two checks of such a request.
const SWITCHOVER_RECHECK: Duration = Duration::from_millis(200);

/// The control service of one agent.
pub struct ControlService {
    dcs: Dcs,
    cluster: String,
    name: String,
    token: String,
    /// The config to report and patch before etcd holds one.
    seed: DynamicConfig,
    requests: mpsc::Sender<OperatorRequest>,
    /// How this member calls pgBackRest (`ListBackups`).
    backup: crate::backup::Local,
}

impl ControlService {
    /// A service answering for member `name`, authorising with `token`.
    pub fn new(
        dcs: Dcs,
        cluster: &str,
        name: &str,
        token: String,
        seed: DynamicConfig,
        requests: mpsc::Sender<OperatorRequest>,
        backup: crate::backup::Local,
    ) -> Self {
        Self {
            dcs,
            cluster: cluster.to_owned(),
            name: name.to_owned(),
            token,
            seed,
            requests,
            backup,
        }
    }

    /// Refuses a mutating call without the right token.
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or_default();
        if constant_time_eq(presented.as_bytes(), self.token.as_bytes()) {
            Ok(())
        } else {
            tracing::warn!("control API: refused a mutating call without a valid token");
            Err(Status::unauthenticated(
                "this call changes the cluster and needs the control token (jaictl: token_file)",
            ))
        }
    }

    async fn view(&self) -> Result<ClusterView, Status> {
        self.dcs
            .read_cluster(&self.seed)
            .await
            .map_err(|error| Status::unavailable(format!("etcd: {error:#}")))
    }

    async fn run_in_loop(&self, kind: OperatorRequestKind) -> Result<String, Status> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(OperatorRequest { kind, reply })
            .await
            .map_err(|_| Status::unavailable("the agent is shutting down"))?;
        match tokio::time::timeout(OPERATOR_REQUEST_TIMEOUT, answer).await {
            Ok(Ok(Ok(message))) => Ok(message),
            Ok(Ok(Err(refusal))) => Err(Status::failed_precondition(refusal)),
            Ok(Err(_)) => Err(Status::unavailable("the agent is shutting down")),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "{kind:?} not finished within {}s; see the agent's log",
                OPERATOR_REQUEST_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Checks a switchover to `to` (or to the best replica) from the current
    /// leader with the rule the leader itself applies, and records it.
    async fn request_switchover(
        &self,
        from: &str,
        to: Option<String>,
        at_unix: Option<u64>,
        force: bool,
    ) -> Result<OperationReply, Status> {
        refuse_during_restore(&self.view().await?)?;
        // What the leader last published may lag the replicas by a loop (a
        // replica that just started streaming): a refusal that may clear is
        // checked again against fresh state for up to two loops.
        let started = Instant::now();
        let (view, leader, intent, leader_pg, target) = loop {
            let view = self.view().await?;
            let settle = view.config.loop_wait * SWITCHOVER_SETTLE_LOOPS;
            let (leader, intent, leader_pg) = switchover_checks(&view, from, &to, at_unix, force)?;
            match ha::handover_target(&leader.name, &view, &leader_pg, &intent) {
                Ok(target) => break (view, leader, intent, leader_pg, target),
                Err(refusal) if refusal.may_clear_soon && started.elapsed() < settle => {
                    tokio::time::sleep(SWITCHOVER_RECHECK).await;
                }
                Err(refusal) => {
                    return Err(Status::failed_precondition(format!(
                        "switchover refused: {refusal}"
                    )))
                }
            }
        };
        let warnings = target_warnings(&view, &target, &leader_pg);
        let recorded = self
            .dcs
            .record_switchover(&intent, Some(leader.term))
            .await
            .map_err(|error| Status::unavailable(format!("etcd: {error:#}")))?;
        if !recorded {
            return Err(Status::aborted(
                "the leader or a pending switchover changed while checking: run the command again",
            ));
        }
        let when = match at_unix {
            Some(at) => format!("scheduled for {}", jai_proto::record::format_unix(at)),
            None => "now".into(),
        };
        let to_text = to.unwrap_or_else(|| format!("the best replica (now {target})"));
        tracing::warn!(from = %leader.name, to = %to_text, when, "switchover requested");
        Ok(OperationReply {
            message: format!("switchover from {} to {to_text} {when}", leader.name),
            warnings,
        })
    }
}

/// The checks of a switchover request that need no waiting: a leader with a
/// running primary, `from` naming it, no switchover pending. Returns the
/// leader, the intent to record and the leader's PostgreSQL as published.
fn switchover_checks(
    view: &ClusterView,
    from: &str,
    to: &Option<String>,
    at_unix: Option<u64>,
    force: bool,
) -> Result<(LeaderKey, SwitchoverIntent, RunningPostgres), Status> {
    let Some(leader) = view.leader.clone() else {
        return Err(Status::failed_precondition(
            "no member holds the leader key: there is nothing to switch over from; use `jaictl failover --to MEMBER`",
        ));
    };
    if !from.is_empty() && from != leader.name {
        return Err(Status::failed_precondition(format!(
            "{from} is not the leader; {} is",
            leader.name
        )));
    }
    if let Some(pending) = &view.switchover {
        return Err(Status::failed_precondition(format!(
            "a switchover is already pending ({}): cancel it first with `jaictl switchover --cancel`",
            pending.describe()
        )));
    }
    let intent = SwitchoverIntent {
        from: Some(leader.name.clone()),
        to: to.clone(),
        scheduled_at_unix: at_unix,
        requested_at_unix: unix_now(),
        force,
    };
    let leader_pg = view
        .member(&leader.name)
        .and_then(running_primary)
        .ok_or_else(|| {
            Status::failed_precondition(format!(
                "leader {} does not report a running primary: a switchover needs one; use `jaictl failover --to MEMBER`",
                leader.name
            ))
        })?;
    Ok((leader, intent, leader_pg))
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        let view = self.view().await?;
        Ok(Response::new(StatusReply {
            cluster: self.cluster.clone(),
            system_id: match &view.initialize {
                Some(Initialize::Done { system_id }) => system_id.clone(),
                _ => String::new(),
            },
            leader: view
                .leader
                .as_ref()
                .map(|leader| leader.name.clone())
                .unwrap_or_default(),
            paused: view.config.pause,
            switchover_json: view
                .switchover
                .as_ref()
                .and_then(|intent| serde_json::to_string(intent).ok())
                .unwrap_or_default(),
            members: view
                .members
                .iter()
                .map(|member| member_reply(&view, member))
                .collect(),
            answered_by: self.name.clone(),
        }))
    }

    async fn history(
        &self,
        _request: Request<HistoryRequest>,
    ) -> Result<Response<HistoryReply>, Status> {
        let history = self
            .dcs
            .read_history()
            .await
            .map_err(|error| Status::unavailable(format!("etcd: {error:#}")))?;
        Ok(Response::new(HistoryReply {
            entries: history
                .into_iter()
                .map(|entry| jai_grpc::HistoryEntry {
                    timeline: entry.timeline,
                    lsn: entry.lsn.to_string(),
                    reason: entry.reason,
                    time_unix: entry.time_unix,
                    new_leader: entry.new_leader,
                })
                .collect(),
        }))
    }

    async fn get_config(
        &self,
        _request: Request<GetConfigRequest>,
    ) -> Result<Response<ConfigReply>, Status> {
        let view = self.view().await?;
        Ok(Response::new(ConfigReply {
            config_json: to_pretty_json(&view.config),
            diff: String::new(),
        }))
    }

    async fn switchover(
        &self,
        request: Request<SwitchoverRequest>,
    ) -> Result<Response<OperationReply>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        let at = match request.at_unix {
            0 => None,
            at if at + 5 < unix_now() => {
                return Err(Status::invalid_argument(format!(
                    "at: {} is in the past",
                    jai_proto::record::format_unix(at)
                )))
            }
            at => Some(at),
        };
        let to = Some(request.to).filter(|to| !to.is_empty());
        self.request_switchover(&request.from, to, at, request.force)
            .await
            .map(Response::new)
    }

    async fn cancel_switchover(
        &self,
        request: Request<CancelSwitchoverRequest>,
    ) -> Result<Response<OperationReply>, Status> {
        self.authorize(&request)?;
        let view = self.view().await?;
        let Some(pending) = view.switchover else {
            return Err(Status::failed_precondition("no switchover is pending"));
        };
        let cancelled = self
            .dcs
            .cancel_switchover()
            .await
            .map_err(|error| Status::unavailable(format!("etcd: {error:#}")))?;
        if !cancelled {
            return Err(Status::failed_precondition(
                "no switchover is pending any more (it ran or was cancelled meanwhile)",
            ));
        }
        tracing::warn!("switchover cancelled: {}", pending.describe());
        Ok(Response::new(OperationReply {
            message: format!("cancelled: {}", pending.describe()),
            warnings: vec![],
        }))
    }

    async fn failover(
        &self,
        request: Request<FailoverRequest>,
    ) -> Result<Response<OperationReply>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        if request.to.is_empty() {
            return Err(Status::invalid_argument("to: name the member to promote"));
        }
        let view = self.view().await?;
        refuse_during_restore(&view)?;
        let leader_runs = view.leader.as_ref().is_some_and(|leader| {
            view.member(&leader.name)
                .and_then(running_primary)
                .is_some()
        });
        if leader_runs {
            // A healthy leader hands over cleanly: that is a switchover.
            return self
                .request_switchover("", Some(request.to), None, request.force)
                .await
                .map(Response::new);
        }
        if let Some(leader) = &view.leader {
            return Err(Status::failed_precondition(format!(
                "{} holds the leader key but runs no primary; it releases the key after primary_start_timeout ({}), then retry",
                leader.name,
                humantime::format_duration(view.config.primary_start_timeout)
            )));
        }
        let target = view.member(&request.to).ok_or_else(|| {
            Status::failed_precondition(format!("{} is not a registered member", request.to))
        })?;
        if !ha::election::is_candidate(target) {
            return Err(Status::failed_precondition(format!(
                "{} cannot be promoted: it is not a running replica eligible for failover{}",
                target.name,
                if target.tags.nofailover {
                    " (tagged nofailover)"
                } else {
                    ""
                }
            )));
        }
        let mut warnings = Vec::new();
        if let (Some(last), Some(position)) = (&view.last_leader, target.wal_position()) {
            let behind = last.optime.bytes_since(position);
            if behind > 0 {
                let text = format!(
                    "{} is {behind} bytes behind the last leader's known position {}: writes after {position} would be lost",
                    target.name, last.optime
                );
                if behind > view.config.maximum_lag_on_failover && !request.force {
                    return Err(Status::failed_precondition(format!(
                        "{text}; that is more than maximum_lag_on_failover: add --force to accept it"
                    )));
                }
                warnings.push(text);
            }
        }
        match ha::sync::allows_promotion(&view, &target.name) {
            Ok(()) if view.config.synchronous_mode.is_on() => {}
            Ok(()) => warnings.push(format!(
                "{} streams asynchronously: writes the old primary acknowledged but had not sent are lost",
                target.name
            )),
            Err(why) if request.force => warnings.push(format!(
                "{} is {why}: forced, the commits it misses are lost",
                target.name
            )),
            Err(why) => {
                return Err(Status::failed_precondition(format!(
                    "{} is {why}; add --force to accept losing them",
                    target.name
                )))
            }
        }
        let intent = SwitchoverIntent {
            from: None,
            to: Some(request.to.clone()),
            scheduled_at_unix: None,
            requested_at_unix: unix_now(),
            force: request.force,
        };
        let recorded = self
            .dcs
            .record_switchover(&intent, None)
            .await
            .map_err(|error| Status::unavailable(format!("etcd: {error:#}")))?;
        if !recorded {
            return Err(Status::aborted(
                "a leader appeared or another request is pending: run `jaictl status` and retry",
            ));
        }
        tracing::warn!(to = %request.to, "manual failover requested");
        Ok(Response::new(OperationReply {
            message: format!("failover to {} requested", request.to),
            warnings,
        }))
    }

    async fn restart(
        &self,
        request: Request<RestartRequest>,
    ) -> Result<Response<OperationReply>, Status> {
        self.authorize(&request)?;
        let only_if_pending = request.into_inner().only_if_pending;
        let message = self
            .run_in_loop(OperatorRequestKind::Restart { only_if_pending })
            .await?;
        Ok(Response::new(OperationReply {
            message,
            warnings: vec![],
        }))
    }

    async fn reinitialize(
        &self,
        request: Request<ReinitializeRequest>,
    ) -> Result<Response<OperationReply>, Status> {
        self.authorize(&request)?;
        let message = self.run_in_loop(OperatorRequestKind::Reinitialize).await?;
        Ok(Response::new(OperationReply {
            message,
            warnings: vec![],
        }))
    }

    async fn reload(
        &self,
        request: Request<ReloadRequest>,
    ) -> Result<Response<OperationReply>, Status> {
        self.authorize(&request)?;
        let message = self.run_in_loop(OperatorRequestKind::Reload).await?;
        Ok(Response::new(OperationReply {
            message,
            warnings: vec![],
        }))
    }

    async fn set_pause(
        &self,
        request: Request<SetPauseRequest>,
    ) -> Result<Response<OperationReply>, Status> {
        self.authorize(&request)?;
        let pause = request.into_inner().pause;
        let (before, _) = self
            .dcs
            .update_config(&self.seed, |config| {
                Ok::<_, std::convert::Infallible>(DynamicConfig {
                    pause,
                    ..config.clone()
                })
            })
            .await
            .map_err(|error| Status::unavailable(format!("etcd: {error:#}")))?
            .unwrap_or_else(|never| match never {});
        let message = match (before.pause, pause) {
            (true, true) => "maintenance mode was already on",
            (false, false) => "maintenance mode was already off",
            (false, true) => "maintenance mode on: agents take no automatic action",
            (true, false) => "maintenance mode off: automatic failover is back",
        };
        tracing::warn!("{message}");
        Ok(Response::new(OperationReply {
            message: message.into(),
            warnings: vec![],
        }))
    }

    async fn patch_config(
        &self,
        request: Request<PatchConfigRequest>,
    ) -> Result<Response<ConfigReply>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        let patch: serde_json::Value = serde_json::from_str(&request.patch_json)
            .map_err(|error| Status::invalid_argument(format!("patch_json: {error}")))?;
        let invalid = |error: jai_proto::ConfigError| Status::invalid_argument(error.to_string());
        let (before, after) = if request.dry_run {
            let before = self.view().await?.config;
            let after = jai_proto::patch::patched(&before, &patch).map_err(invalid)?;
            (before, after)
        } else {
            self.dcs
                .update_config(&self.seed, |config| {
                    jai_proto::patch::patched(config, &patch)
                })
                .await
                .map_err(|error| Status::unavailable(format!("etcd: {error:#}")))?
                .map_err(invalid)?
        };
        let diff = jai_proto::patch::diff(&before, &after);
        if !request.dry_run && !diff.is_empty() {
            tracing::warn!("cluster config changed:\n{diff}");
        }
        Ok(Response::new(ConfigReply {
            config_json: to_pretty_json(&after),
            diff,
        }))
    }

    async fn request_backup(
        &self,
        request: Request<BackupRequest>,
    ) -> Result<Response<BackupJobReply>, Status> {
        self.authorize(&request)?;
        let kind = crate::backup::requests::parse_kind(&request.into_inner().kind)?;
        crate::backup::requests::settings(&self.view().await?.config)?;
        let job = crate::backup::requests::request(&self.dcs, kind, unix_now()).await?;
        tracing::info!(id = %job.id, %kind, "backup job requested by an operator");
        Ok(Response::new(BackupJobReply {
            message: format!("{kind} job {} recorded; the leader assigns it", job.id),
            job_id: job.id,
        }))
    }

    async fn restore(
        &self,
        request: Request<RestoreRequest>,
    ) -> Result<Response<OperationReply>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        let view = self.view().await?;
        if request.abort {
            let message = crate::backup::requests::abort(&self.dcs, &view).await?;
            tracing::warn!("{message}");
            return Ok(Response::new(OperationReply {
                message,
                warnings: vec![],
            }));
        }
        let intent = crate::backup::requests::restore(
            &self.dcs,
            &self.backup,
            &view,
            &self.name,
            request.target_unix,
            unix_now(),
        )
        .await?;
        tracing::warn!(target = %intent.target, restorer = %intent.restorer, "cluster restore requested");
        Ok(Response::new(OperationReply {
            message: format!(
                "restore to {} recorded: every member stops, {} restores and leads, the others re-clone",
                intent.target, intent.restorer
            ),
            warnings: vec![],
        }))
    }

    async fn list_backups(
        &self,
        _request: Request<ListBackupsRequest>,
    ) -> Result<Response<ListBackupsReply>, Status> {
        let config = self.view().await?.config;
        let settings = crate::backup::requests::settings(&config)?;
        let info_json = crate::backup::requests::list(&self.backup, settings).await?;
        Ok(Response::new(ListBackupsReply { info_json }))
    }
}

/// Switchovers and failovers wait until a whole-cluster restore is over.
fn refuse_during_restore(view: &ClusterView) -> Result<(), Status> {
    match &view.restore {
        Some(intent) => Err(Status::failed_precondition(format!(
            "{}: no switchover or failover until it is done",
            intent.describe()
        ))),
        None => Ok(()),
    }
}

/// Serves the control API on `listener` until `stop` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: ControlService,
    stop: CancellationToken,
) {
    let result = tonic::transport::Server::builder()
        .add_service(ControlServer::new(service))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            stop.cancelled_owned(),
        )
        .await;
    if let Err(error) = result {
        tracing::error!("control API stopped: {error:#}");
    }
}

/// The leader's PostgreSQL as its member status describes it, when it says it
/// runs a primary: enough for the same switchover checks the leader makes.
/// Public so the simulator's operator checks exactly what this API checks.
pub fn running_primary(member: &MemberStatus) -> Option<RunningPostgres> {
    let running = member.role == MemberRole::Primary
        && member.state == jai_proto::MemberState::Running
        && !member.standing_down;
    running.then(|| RunningPostgres {
        role: PgRole::Primary,
        timeline: member.timeline.unwrap_or_default(),
        write_lsn: member.write_lsn,
        receive_lsn: None,
        replay_lsn: None,
        following: None,
        slots: Vec::new(),
        standbys: member.standbys.clone(),
        sync_names: Default::default(),
        streaming: false,
    })
}

/// What the operator should know about the chosen target before it leads.
fn target_warnings(view: &ClusterView, target: &str, leader: &RunningPostgres) -> Vec<String> {
    let link = leader.standbys.iter().find(|link| link.name == target);
    let mut warnings = Vec::new();
    if let Some(lag) = link.and_then(|link| link.replay_lag_ms) {
        if lag >= 1000 {
            warnings.push(format!(
                "{target} replays {lag} ms behind: the switchover waits for it"
            ));
        }
    }
    if view.member(target).is_some_and(|member| member.tags.nosync) {
        warnings.push(format!("{target} is tagged nosync"));
    }
    warnings
}

fn member_reply(view: &ClusterView, member: &MemberStatus) -> Member {
    let lag_bytes = match (&view.last_leader, member.role, member.wal_position()) {
        (Some(last), MemberRole::Replica, Some(position)) => {
            last.optime.bytes_since(position) as i64
        }
        _ => -1,
    };
    let text = |lsn: Option<jai_proto::Lsn>| lsn.map(|lsn| lsn.to_string()).unwrap_or_default();
    Member {
        name: member.name.clone(),
        role: format!("{:?}", member.role).to_lowercase(),
        state: format!("{:?}", member.state).to_lowercase(),
        reason: member.reason.clone().unwrap_or_default(),
        pg_address: member.pg_address.clone(),
        api_url: member.api_url.clone(),
        grpc_url: member.grpc_url.clone().unwrap_or_default(),
        timeline: member.timeline.unwrap_or_default(),
        write_lsn: text(member.write_lsn),
        receive_lsn: text(member.receive_lsn),
        replay_lsn: text(member.replay_lsn),
        lag_bytes,
        nofailover: member.tags.nofailover,
        noloadbalance: member.tags.noloadbalance,
    }
}

fn to_pretty_json(config: &DynamicConfig) -> String {
    serde_json::to_string_pretty(config).expect("the config serializes")
}

/// Compares without an early exit (`subtle`; only a length mismatch returns
/// at once), so the time taken says nothing about how much of a guessed
/// token was right.
fn constant_time_eq(left: &[u8], right: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    bool::from(left.ct_eq(right))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_exactly() {
        assert!(constant_time_eq(b"secret-token-123", b"secret-token-123"));
        assert!(!constant_time_eq(b"secret-token-123", b"secret-token-124"));
        assert!(!constant_time_eq(b"secret", b"secret-token-123"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
