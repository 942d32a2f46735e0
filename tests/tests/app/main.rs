//! The voting app on a real lab: PostgreSQL ×2 behind HAProxy, etcd, two
//! `jai-app` instances behind HAProxy's HTTP frontend. One lab serves every
//! part, in order, to keep `make test` lean:
//!
//! - [`http`]: the site over HTTP, every bad input the issue lists;
//! - [`listeners`]: slow clients are cut at the header timeout, and the
//!   connection cap keeps an instance healthy (and its descriptors few);
//! - [`browser`]: headless Chromium votes, re-votes, meets a CSRF refusal,
//!   logs in to the admin and creates a poll (screenshots as artefacts);
//! - [`switchover`]: a switchover under a steady vote load: no failed vote,
//!   every acknowledged vote counted exactly once;
//! - [`no_primary`] (last: it kills the database): the site stays up
//!   read-only with cached results, votes are refused politely.

#[path = "../common/mod.rs"]
mod common;

mod browser;
mod http;
mod listeners;
mod no_primary;
mod switchover;

use jai_lab::lab_app::{admin_password, AppClient, AppInfo, AppSpec};
use jai_lab::{Lab, LabSpec};
use jai_proto::logging::LogFormat;
use std::time::Duration;

/// An admin client logged in to the lab's admin listener.
pub async fn admin(app: &AppInfo) -> anyhow::Result<AppClient> {
    let mut client = AppClient::new()?;
    client
        .admin_login(&app.admin_url, &app.admin_user, &admin_password(app)?)
        .await?;
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voting_app_end_to_end() -> anyhow::Result<()> {
    let dir = common::lab_dir()?;
    let spec = LabSpec {
        app: Some(AppSpec {
            votes_per_voter_per_minute: 30,
            results_ttl: Duration::from_secs(1),
            log_format: LogFormat::Json,
            header_read_timeout: Some(listeners::HEADER_READ_TIMEOUT),
            max_connections: Some(listeners::MAX_CONNECTIONS),
            ..AppSpec::default()
        }),
        ..common::spec(&dir, 2, 1)
    };
    let mut lab = Lab::up(spec).await?;
    // What `jai-lab up` prints points to the admin password's file only.
    let app = lab.desc.app.as_ref().expect("the lab runs the app");
    assert!(
        !lab.instructions()?.contains(&admin_password(app)?),
        "jai-lab up prints the admin password"
    );
    http::run(&lab).await?;
    listeners::run(&lab).await?;
    browser::run(&lab).await?;
    switchover::run(&lab).await?;
    no_primary::run(&mut lab).await?;
    // `log.format: json`: every line an app instance wrote is a JSON event.
    for instance in &lab
        .desc
        .app
        .as_ref()
        .expect("the lab runs the app")
        .instances
    {
        common::json_log_messages(&instance.log)?;
    }
    Ok(())
}
