//! The HTTP health API: what HAProxy checks, with Patroni's paths and codes so
//! existing load-balancer configurations work unchanged, plus `/status`.
//!
//! Answers come from the latest [`NodeSnapshot`] the decision loop published,
//! except the lease, which is checked against the clock at request time: a
//! primary whose lease is not confirmed *now* gets 503 on `/primary` even if the
//! loop is stuck (docs/architecture.md, "Safety invariants", §3.4).

use crate::bytes::parse_bytes;
use crate::dcs::LeaseTracker;
use axum::extract::{Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::{Json, Router};
use jai_proto::{MemberRole, MemberState, MemberStatus};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// What the decision loop last knew, for the API to answer from.
#[derive(Debug, Clone)]
pub struct NodeSnapshot {
    /// The member status last published (or about to be).
    pub member: MemberStatus,
    /// Who holds the leader key, as last read.
    pub leader: Option<String>,
    /// The leader key is on this agent's lease.
    pub holds_leader_key: bool,
    /// A stop or demotion is under way: no longer a primary for routing.
    pub demoting: bool,
    /// Bytes this replica is behind the leader's last published position.
    pub lag_bytes: Option<u64>,
    /// etcd answered the last read.
    pub dcs_reachable: bool,
    /// How long before its lease deadline a primary stops counting as one.
    pub demote_margin: Duration,
    /// When the decision loop last completed.
    pub heartbeat: Instant,
    /// The loop counts as alive while its last heartbeat is younger than this.
    pub liveness_window: Duration,
    /// PID of the postmaster, if one runs.
    pub postgres_pid: Option<i32>,
    /// Another member holds the leader key and says it runs a primary, as
    /// last read: a standby should be streaming from it.
    pub leader_runs_primary: bool,
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
        node.member.role == MemberRole::Primary
            && node.member.state == MemberState::Running
            && node.holds_leader_key
            && !node.demoting
            && self.lease.is_valid_beyond(node.demote_margin)
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
    node.member.state == MemberState::Running && !node.demoting
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
    let within_lag = match (max_lag, node.lag_bytes) {
        (Some(max), Some(lag)) => lag <= max,
        (Some(_), None) => false,
        (None, _) => true,
    };
    let streams_if_it_can = node.member.streaming != Some(false) || !node.leader_runs_primary;
    running(node)
        && node.member.role == MemberRole::Replica
        && !node.member.tags.noloadbalance
        && within_lag
        && streams_if_it_can
}

async fn read_only(State(state): State<ApiState>, method: Method) -> Response {
    let node = state.snapshot();
    let healthy = state.is_writable_primary(&node)
        || (running(&node) && node.member.role == MemberRole::Replica);
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
        node.heartbeat.elapsed() < node.liveness_window,
        &node,
    )
}

async fn readiness(State(state): State<ApiState>, method: Method) -> Response {
    let node = state.snapshot();
    let healthy = state.is_writable_primary(&node)
        || (running(&node) && node.member.role == MemberRole::Replica && node.leader.is_some());
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
            member: node.member.clone(),
            leader: node.leader.clone(),
            holds_leader_key: node.holds_leader_key,
            accepts_writes: false,
            lag_bytes: node.lag_bytes,
            dcs_reachable: node.dcs_reachable,
            lease_valid_for_ms: None,
            postgres_pid: node.postgres_pid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standby(streaming: Option<bool>, leader_runs_primary: bool) -> NodeSnapshot {
        NodeSnapshot {
            member: MemberStatus {
                name: "pg2".into(),
                role: MemberRole::Replica,
                state: MemberState::Running,
                reason: None,
                api_url: String::new(),
                pg_address: String::new(),
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
            heartbeat: Instant::now(),
            liveness_window: Duration::from_secs(10),
            postgres_pid: Some(42),
            leader_runs_primary,
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
        lagging.lag_bytes = Some(2048);
        assert!(!replica_healthy(&lagging, Some(1024)));
        assert!(replica_healthy(&lagging, None));
        let mut primary = standby(None, false);
        primary.member.role = MemberRole::Primary;
        assert!(!replica_healthy(&primary, None));
    }
}
