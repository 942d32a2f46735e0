//! Starts both listeners and the background tasks, and stops them in order.
//!
//! On SIGTERM or SIGINT the listeners stop accepting, requests in flight
//! finish, then the counted views are flushed (bounded by the retry
//! timeout) before the process exits. Both listeners keep the connection
//! timeouts and cap of [`crate::listener`].

use crate::listener::{read_request, CappedListener, Client, Reading};
use crate::metrics::{track, Tracked};
use crate::state::App;
use crate::{admin, public, schema};
use axum::extract::DefaultBodyLimit;
use axum::Router;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How often the primary and the operator switch are probed.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How often old idempotency keys and sessions are pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// The public router with its layers (body limit, metrics).
pub fn public_router(app: Arc<App>) -> Router {
    layered(public::router(app.clone()), &app, "public")
}

/// The admin router with its layers.
pub fn admin_router(app: Arc<App>) -> Router {
    layered(admin::router(app.clone()), &app, "admin")
}

fn layered(router: Router, app: &App, listener: &'static str) -> Router {
    let tracked = Tracked {
        metrics: app.metrics.clone(),
        listener,
    };
    let reading = Reading {
        body_bytes: app.config.limits.body_bytes,
        body_read_timeout: app.config.connections.body_read_timeout,
    };
    router
        .layer(axum::middleware::from_fn_with_state(reading, read_request))
        .layer(axum::middleware::from_fn_with_state(tracked, track))
        .layer(DefaultBodyLimit::max(app.config.limits.body_bytes))
        .layer(axum::middleware::from_fn(crate::http::security_headers))
}

/// Serves `router` on `listener` (named `name` in metrics and logs) with
/// the connection limits, until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    app: &App,
    name: &'static str,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = CappedListener::new(listener, app.config.connections, name, app.metrics.clone());
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<Client>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await
}

/// Runs the app until `shutdown` is cancelled.
pub async fn run(app: Arc<App>, shutdown: CancellationToken) -> anyhow::Result<()> {
    raise_file_limit(&app);
    let applied = schema::migrate(&app.db).await?;
    tracing::info!(applied, "schema up to date");
    let public = TcpListener::bind(app.config.listen).await?;
    let admin = TcpListener::bind(app.config.admin.listen).await?;
    tracing::info!(public = %app.config.listen, admin = %app.config.admin.listen, "listening");
    let tasks = CancellationToken::new();
    let background = [
        tokio::spawn(probe_loop(app.clone(), tasks.clone())),
        tokio::spawn(flush_loop(app.clone(), tasks.clone())),
        tokio::spawn(prune_loop(app.clone(), tasks.clone())),
    ];
    let (public_result, admin_result) = tokio::join!(
        serve(
            public,
            public_router(app.clone()),
            &app,
            "public",
            shutdown.clone()
        ),
        serve(
            admin,
            admin_router(app.clone()),
            &app,
            "admin",
            shutdown.clone()
        ),
    );
    tasks.cancel();
    for task in background {
        let _ = task.await;
    }
    match app.views.flush(&app.db).await {
        Ok(views) => tracing::info!(views, "views flushed on shutdown"),
        Err(error) => tracing::error!("views lost on shutdown: {error}"),
    }
    public_result?;
    admin_result?;
    Ok(())
}

async fn probe_loop(app: Arc<App>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        app.probe().await;
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
    }
}

async fn flush_loop(app: Arc<App>, stop: CancellationToken) {
    let mut interval = tokio::time::interval(app.config.views.flush_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = interval.tick() => {}
        }
        match app.views.flush(&app.db).await {
            Ok(views) => app.metrics.views_flushed(views),
            Err(error) => tracing::warn!("view flush postponed: {error}"),
        }
    }
}

async fn prune_loop(app: Arc<App>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(PRUNE_INTERVAL) => {}
        }
        if let Err(error) = crate::store::prune(&app.db).await {
            tracing::warn!("pruning postponed: {error}");
        }
    }
}

/// Raises the soft limit of open files to the hard one (as Go programs do
/// at start), and warns when even that is short of what the connection caps
/// and the pools may hold: running out of descriptors fails every accept.
fn raise_file_limit(app: &App) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let config = &app.config;
    let needed = 2 * config.connections.max_connections
        + 2 * config.database.pool_size
        + config.database.vote_connections
        + 64;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let mut limit = soft;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        limit = hard;
    }
    if usize::try_from(limit).is_ok_and(|limit| limit < needed) {
        tracing::warn!(
            open_files = limit,
            needed,
            "the open-file limit is below two listeners' connections.max_connections \
             plus the database pools: raise it (LimitNOFILE=) or lower max_connections"
        );
    }
}
