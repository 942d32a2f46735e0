//! Prometheus metrics, served at `/metrics` on the admin listener.

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Instant;

/// Labels of an HTTP request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `public` or `admin`.
    pub listener: &'static str,
    /// The route pattern, e.g. `/polls/{id}` (never the raw path: bounded cardinality).
    pub route: String,
    /// HTTP method: one of the standard ones, else `other` (a client may
    /// send any token as a method: bounded cardinality).
    pub method: &'static str,
    /// Status code.
    pub status: String,
}

/// Labels of a latency observation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// `public` or `admin`.
    pub listener: &'static str,
    /// The route pattern.
    pub route: String,
}

/// Labels of a vote counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VoteLabels {
    /// `accepted`, `retried` (needed more than one attempt) or `refused`.
    pub result: &'static str,
}

/// Labels of a pool gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// `write`, `read` or `votes` (the shared vote connections).
    pub pool: &'static str,
    /// `size`, `available` or `waiting`; for `votes`: `size`, `open` or `in_flight`.
    pub state: &'static str,
}

/// Labels of a listener's connection gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `public` or `admin`.
    pub listener: &'static str,
}

/// Labels of connections closed by the listener's limits.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClosedLabels {
    /// `public` or `admin`.
    pub listener: &'static str,
    /// `idle_timeout`, `header_timeout`, `body_timeout` or `evicted`.
    pub reason: &'static str,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// All metrics of one app node.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily,
    votes: Family<VoteLabels, Counter>,
    views_flushed: Counter,
    pools: Family<PoolLabels, Gauge>,
    degraded: Gauge,
    connections: Family<ListenerLabels, Gauge>,
    connections_closed: Family<ClosedLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn latency_histogram() -> Histogram {
    // 0.5 ms … ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("jai_app");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by listener, route, method and status",
            requests.clone(),
        );
        let latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by listener and route",
            latency.clone(),
        );
        let votes = Family::<VoteLabels, Counter>::default();
        registry.register(
            "votes",
            "Vote submissions: accepted, retried through a database failure, refused",
            votes.clone(),
        );
        let views_flushed = Counter::default();
        registry.register(
            "views_flushed",
            "Page views written to the database",
            views_flushed.clone(),
        );
        let pools = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "db_pool_connections",
            "Database pool connections by pool and state",
            pools.clone(),
        );
        let degraded = Gauge::default();
        registry.register(
            "degraded",
            "1 while the site is read-only (no primary or operator switch)",
            degraded.clone(),
        );
        let connections = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "http_connections",
            "Open HTTP connections by listener",
            connections.clone(),
        );
        let connections_closed = Family::<ClosedLabels, Counter>::default();
        registry.register(
            "http_connections_closed",
            "HTTP connections closed by a timeout or at the connection cap, by reason",
            connections_closed.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            votes,
            views_flushed,
            pools,
            degraded,
            connections,
            connections_closed,
        }
    }
}

impl Metrics {
    /// Counts a vote submission result.
    pub fn vote(&self, result: &'static str) {
        self.votes.get_or_create(&VoteLabels { result }).inc();
    }

    /// A listener accepted a connection.
    pub fn connection_opened(&self, listener: &'static str) {
        self.connections
            .get_or_create(&ListenerLabels { listener })
            .inc();
    }

    /// A listener's connection ended.
    pub fn connection_ended(&self, listener: &'static str) {
        self.connections
            .get_or_create(&ListenerLabels { listener })
            .dec();
    }

    /// A listener closed a connection early.
    pub fn connection_closed(&self, listener: &'static str, reason: crate::listener::Closed) {
        self.connections_closed
            .get_or_create(&ClosedLabels {
                listener,
                reason: reason.label(),
            })
            .inc();
    }

    /// Counts views written.
    pub fn views_flushed(&self, views: i64) {
        self.views_flushed.inc_by(views.max(0) as u64);
    }

    /// The text exposition, with pool gauges and degraded state read now.
    /// `pools` holds `(pool, state, value)` triples ([`crate::db::Database::usage`]).
    pub fn render(&self, pools: &[(&'static str, &'static str, usize)], degraded: bool) -> String {
        for &(pool, state, value) in pools {
            self.pools
                .get_or_create(&PoolLabels { pool, state })
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        }
        self.degraded.set(i64::from(degraded));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    fn observe(
        &self,
        listener: &'static str,
        route: String,
        method: &'static str,
        status: u16,
        started: Instant,
    ) {
        self.latency
            .get_or_create(&RouteLabels {
                listener,
                route: route.clone(),
            })
            .observe(started.elapsed().as_secs_f64());
        self.requests
            .get_or_create(&RequestLabels {
                listener,
                route,
                method,
                status: status.to_string(),
            })
            .inc();
    }
}

/// Which listener a tracking middleware serves.
#[derive(Clone)]
pub struct Tracked {
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// `public` or `admin`.
    pub listener: &'static str,
}

/// The metric label of `method`.
fn method_label(method: &axum::http::Method) -> &'static str {
    const KNOWN: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
    ];
    KNOWN
        .into_iter()
        .find(|known| method.as_str() == *known)
        .unwrap_or("other")
}

/// Middleware: counts every request and observes its latency.
pub async fn track(State(tracked): State<Tracked>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = method_label(request.method());
    let response = next.run(request).await;
    tracked.metrics.observe(
        tracked.listener,
        route,
        method,
        response.status().as_u16(),
        started,
    );
    response
}

#[cfg(test)]
mod tests {
    use crate::testing::{self, loopback, request, Side};

    #[tokio::test]
    async fn made_up_methods_share_one_label() {
        // Issue #18: a label per method a client invents is a metric
        // series per request, kept for the life of the process.
        let app = testing::app("");
        let (public, _stop) = testing::serve(&app, Side::Public).await;
        for n in 0..50 {
            let method = format!("BREW{n}");
            let answer = request(public, loopback(1), &method, "/", &[], "").await;
            assert_eq!(answer.status, 405);
        }
        let text = app.metrics.render(&[], false);
        assert!(!text.contains("BREW"), "{text}");
        assert!(text.contains("method=\"other\""), "{text}");
    }
}
