//! Every PostgreSQL node dies: the site stays up read-only with its banner
//! and the last cached pages; a vote is retried for the retry budget and then
//! refused with "try again shortly", never acknowledged and lost.

use super::http::Voter;
use anyhow::{anyhow, ensure, Result};
use jai_lab::lab_app::AppClient;
use jai_lab::{wait, Lab, StopSignal};
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(30);

pub async fn run(lab: &mut Lab) -> Result<()> {
    let app = lab
        .desc
        .app
        .clone()
        .ok_or_else(|| anyhow!("lab without app"))?;
    let mut admin = super::admin(&app).await?;
    let poll = admin
        .create_poll(&app.admin_url, "Outage poll", &["Yes", "No"], true)
        .await?;
    let mut voter = Voter::open(&app, poll).await?;
    let csrf = voter.field("csrf");
    // Every instance has the poll and its results in its cache.
    for instance in &app.instances {
        let client = AppClient::new()?;
        for path in ["", "/results"] {
            client
                .clone()
                .get_ok(&format!("{}/polls/{poll}{path}", instance.url), WITHIN)
                .await?;
        }
    }
    let nodes = lab.node_names();
    let names: Vec<&str> = nodes.iter().map(String::as_str).collect();
    lab.stop_nodes(&names, StopSignal::Kill)?;

    for instance in &app.instances {
        let url = format!("{}/healthz", instance.url);
        wait::until(&format!("{} to notice", instance.name), WITHIN, || {
            let url = url.clone();
            async move { Ok((AppClient::new()?.get(&url).await?.body == "degraded\n").then_some(())) }
        })
        .await?;
        let results = AppClient::new()?
            .get(&format!("{}/polls/{poll}/results", instance.url))
            .await?;
        ensure!(
            results.status == 200
                && results.body.contains("Outage poll")
                && results.body.contains("id=\"degraded\""),
            "{}: results without a primary answered {}",
            instance.name,
            results.status
        );
    }
    let page = voter
        .post(
            &app,
            poll,
            &[
                ("csrf", &csrf),
                ("key", "vote-without-a-primary"),
                ("option", &voter.options()[0]),
            ],
        )
        .await?;
    ensure!(
        page.status == 503 && page.body.contains("Nothing was counted"),
        "a vote without a primary answered {}",
        page.status
    );
    Ok(())
}
