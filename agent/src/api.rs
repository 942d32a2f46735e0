//! The HTTP health API: what HAProxy checks, with Patroni's paths and codes so
//! existing load-balancer configurations work unchanged, plus `/status`.
//!
//! Answers come from the latest [`NodeSnapshot`] the decision loop published,
//! except the lease, which is checked against the clock at request time: a
//! primary whose lease is not confirmed *now* gets 503 on `/primary` even if the
//! loop is stuck (docs/architecture.md, "Safety invariants", §3.4).

use crate::bytes::parse_bytes;
use crate::dcs::LeaseTracker;
use crate::ha::driver::Report;
use axum::extract::{Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::{Json, Router};
use jai_proto::{MemberRole, MemberState, MemberStatus};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

/// What the decision loop last knew, for the API to answer from: the
/// driver's last [`Report`], plus what only the shell knows.
#[derive(Debug, Clone)]
pub struct NodeSnapshot {
    /// The facts of the last decision (member status, leader, lag, margin…).
    pub report: Report,
    /// When the decision loop last completed.
    pub heartbeat: Instant,
    /// PID of the postmaster, if one runs.
    pub postgres_pid: Option<i32>,
}

#[derive(Clone)]
struct ApiState {
    snapshot: watch::Receiver<NodeSnapshot>,
    lease: Arc<LeaseTracker>,
}

/// The API's routes, ready to serve.
pub fn router(snapshot: watch::Receiver<NodeSnapshot>, lease: Arc<LeaseTracker>) -> Router {
    let state = ApiState { snapshot, lease };
    Router::new()
        .route("/", any(primary))
        .route("/primary", any(primary))
        .route("/master", any(primary))
        .route("/leader", any(primary))
        .route("/read-write", any(primary))
        .route("/replica", any(replica))
        .route("/read-only", any(read_only))
        .route("/health", any(health))
        .route("/liveness", any(liveness))
        .route("/readiness", any(readiness))
        .route("/status", any(status))
        .with_state(state)
}

/// Serves the API on `listener` until `stop`, within the health API's
/// bounds ([`crate::listener::Limits::HEALTH_API`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    crate::listener::serve(listener, router, crate::listener::Limits::HEALTH_API, stop).await
}

impl ApiState {
    fn snapshot(&self) -> NodeSnapshot {
        self.snapshot.borrow().clone()
    }

    /// Invariant §3.4 (docs/architecture.md, "Safety invariants"): primary,
    /// holding the key, lease confirmed beyond the margin now.
    fn is_writable_primary(&self, node: &NodeSnapshot) -> bool {
        node.report.member.role == MemberRole::Primary
            && node.report.member.state == MemberState::Running
            && node.report.holds_leader_key
            && !node.report.demoting
            && self.lease.is_valid_beyond(node.report.demote_margin)
    }
}

impl ApiState {
    /// The JSON body every path answers with.
    fn body(&self, node: &NodeSnapshot) -> StatusBody {
        let mut body = StatusBody::from(node);
        body.accepts_writes = self.is_writable_primary(node);
        body.lease_valid_for_ms = self
            .lease
            .valid_until()
            .map(|until| until.saturating_duration_since(Instant::now()).as_millis() as u64);
        body
    }

    /// A health answer: the code, and the JSON body except for HEAD and OPTIONS.
    fn answer(&self, method: &Method, healthy: bool, node: &NodeSnapshot) -> Response {
        let code = if healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        if method == Method::HEAD || method == Method::OPTIONS {
            return code.into_response();
        }
        (code, Json(self.body(node))).into_response()
    }
}

fn running(node: &NodeSnapshot) -> bool {
    node.report.member.state == MemberState::Running && !node.report.demoting
}

async fn primary(State(state): State<ApiState>, method: Method) -> Response {
    let node = state.snapshot();
    state.answer(&method, state.is_writable_primary(&node), &node)
}

async fn replica(
    State(state): State<ApiState>,
    method: Method,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let node = state.snapshot();
    let max_lag = match query.get("lag").map(|text| parse_bytes(text)).transpose() {
        Ok(max_lag) => max_lag,
        Err(why) => return (StatusCode::BAD_REQUEST, format!("lag={why}")).into_response(),
    };
    state.answer(&method, replica_healthy(&node, max_lag), &node)
}

/// `/replica`: a running standby open for reads, within `max_lag` bytes if
/// asked, and streaming whenever a primary runs to stream from. A standby
/// that should stream and does not (diverged, slot gone, cut off) serves
/// data that grows older with every commit, while its lag — measured
/// against the leader's last published position — may not show it. With no
/// primary running, standbys stay in: stale reads beat none.
pub fn replica_healthy(node: &NodeSnapshot, max_lag: Option<u64>) -> bool {
    let within_lag = match (max_lag, node.report.lag_bytes) {
        (Some(max), Some(lag)) => lag <= max,
        (Some(_), None) => false,
        (None, _) => true,
    };
    let streams_if_it_can =
        node.report.member.streaming != Some(false) || !node.report.leader_runs_primary;
    running(node)
        && node.report.member.role == MemberRole::Replica
        && !node.report.member.tags.noloadbalance
        && within_lag
        && streams_if_it_can
}

async fn read_only(State(state): State<ApiState>, method: Method) -> Response {
    let node = state.snapshot();
    let healthy = state.is_writable_primary(&node)
        || (running(&node) && node.report.member.role == MemberRole::Replica);
    state.answer(&method, healthy, &node)
}

async fn health(State(state): State<ApiState>, method: Method) -> Response {
    let node = state.snapshot();
    state.answer(&method, running(&node), &node)
}

async fn liveness(State(state): State<ApiState>, method: Method) -> Response {
    let node = state.snapshot();
    state.answer(
        &method,
        node.heartbeat.elapsed() < node.report.liveness_window,
        &node,
    )
}

async fn readiness(State(state): State<ApiState>, method: Method) -> Response {
    let node = state.snapshot();
    let healthy = state.is_writable_primary(&node)
        || (running(&node)
            && node.report.member.role == MemberRole::Replica
            && node.report.leader.is_some());
    state.answer(&method, healthy, &node)
}

async fn status(State(state): State<ApiState>, method: Method) -> Response {
    let node = state.snapshot();
    state.answer(&method, true, &node)
}

/// The JSON body of every answer.
#[derive(Debug, Serialize)]
pub struct StatusBody {
    /// The member's published status.
    #[serde(flatten)]
    pub member: MemberStatus,
    /// Who holds the leader key.
    pub leader: Option<String>,
    /// This member holds it.
    pub holds_leader_key: bool,
    /// This member passes `/primary` now.
    pub accepts_writes: bool,
    /// Bytes behind the leader's last position.
    pub lag_bytes: Option<u64>,
    /// etcd answered the last read.
    pub dcs_reachable: bool,
    /// Milliseconds until the lease could expire, if one is held.
    pub lease_valid_for_ms: Option<u64>,
    /// PID of the postmaster.
    pub postgres_pid: Option<i32>,
}

impl From<&NodeSnapshot> for StatusBody {
    fn from(node: &NodeSnapshot) -> Self {
        Self {
            member: node.report.member.clone(),
            leader: node.report.leader.clone(),
            holds_leader_key: node.report.holds_leader_key,
            accepts_writes: false,
            lag_bytes: node.report.lag_bytes,
            dcs_reachable: node.report.dcs_reachable,
            lease_valid_for_ms: None,
            postgres_pid: node.postgres_pid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn standby(streaming: Option<bool>, leader_runs_primary: bool) -> NodeSnapshot {
        NodeSnapshot {
            report: Report {
                member: MemberStatus {
                    name: "pg2".into(),
                    role: MemberRole::Replica,
                    state: MemberState::Running,
                    reason: None,
                    api_url: String::new(),
                    pg_address: String::new(),
                    pg_paths: None,
                    grpc_url: None,
                    system_id: None,
                    timeline: Some(1),
                    write_lsn: None,
                    receive_lsn: None,
                    replay_lsn: None,
                    tags: Default::default(),
                    standing_down: false,
                    streaming,
                    standbys: Vec::new(),
                    version: String::new(),
                },
                leader: Some("pg1".into()),
                holds_leader_key: false,
                demoting: false,
                lag_bytes: Some(0),
                dcs_reachable: true,
                demote_margin: Duration::from_secs(1),
                liveness_window: Duration::from_secs(10),
                leader_runs_primary,
            },
            heartbeat: Instant::now(),
            postgres_pid: Some(42),
        }
    }

    #[test]
    fn a_standby_that_should_stream_and_does_not_leaves_replica() {
        assert!(replica_healthy(&standby(Some(true), true), None));
        assert!(replica_healthy(&standby(Some(true), true), Some(1024)));
        assert!(
            !replica_healthy(&standby(Some(false), true), None),
            "a primary runs and this standby does not stream from it"
        );
        assert!(
            replica_healthy(&standby(Some(false), false), None),
            "no primary to stream from: stale reads beat none"
        );
        let mut lagging = standby(Some(true), true);
        lagging.report.lag_bytes = Some(2048);
        assert!(!replica_healthy(&lagging, Some(1024)));
        assert!(replica_healthy(&lagging, None));
        let mut primary = standby(None, false);
        primary.report.member.role = MemberRole::Primary;
        assert!(!replica_healthy(&primary, None));
    }
}
