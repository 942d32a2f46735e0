//! Starts both listeners and the background tasks, and stops them in order.
//!
//! On SIGTERM or SIGINT the listeners stop accepting, requests in flight
//! finish, then the counted views are flushed (bounded by the retry
//! timeout) before the process exits.

use crate::metrics::{track, Tracked};
use crate::state::App;
use crate::{admin, public, schema};
use axum::extract::DefaultBodyLimit;
use axum::Router;
use std::net::SocketAddr;
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
    router
        .layer(axum::middleware::from_fn_with_state(tracked, track))
        .layer(DefaultBodyLimit::max(app.config.limits.body_bytes))
}

/// Runs the app until `shutdown` is cancelled.
pub async fn run(app: Arc<App>, shutdown: CancellationToken) -> anyhow::Result<()> {
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
    let serve = |listener: TcpListener, router: Router| {
        let shutdown = shutdown.clone();
        async move {
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        }
    };
    let (public_result, admin_result) = tokio::join!(
        serve(public, public_router(app.clone())),
        serve(admin, admin_router(app.clone())),
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
