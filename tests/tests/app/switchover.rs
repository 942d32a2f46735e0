//! A switchover (`jaictl switchover`) under a steady vote load: no vote request fails, and every
//! acknowledged vote is in the database exactly once (checked by its
//! idempotency key), with each voter's last acknowledged choice in `votes`.

use super::http::Voter;
use anyhow::{anyhow, ensure, Result};
use jai_lab::lab_app::AppInfo;
use jai_lab::wait;
use jai_lab::Lab;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Concurrent vote loops, each with its own voters (one request per voter at a time).
const WORKERS: usize = 4;
const VOTERS_PER_WORKER: usize = 40;
/// Bounds of the load: it stops at whichever comes first.
const MAX_VOTES: usize = 4000;
const MAX_LOAD_TIME: Duration = Duration::from_secs(90);
/// A vote every this often per worker (under the per-voter rate limit).
const PACE: Duration = Duration::from_millis(50);
const WITHIN: Duration = Duration::from_secs(60);

/// One acknowledged vote.
#[derive(Debug, Clone)]
struct Acked {
    voter_cookie: String,
    key: String,
    option: i64,
}

pub async fn run(lab: &Lab) -> Result<()> {
    let app = lab
        .desc
        .app
        .as_ref()
        .ok_or_else(|| anyhow!("lab without app"))?;
    let mut admin = super::admin(app).await?;
    let poll = admin
        .create_poll(
            &app.admin_url,
            "Switchover poll",
            &["Left", "Right", "Centre"],
            true,
        )
        .await?;
    let (old_leader, _) = lab
        .leader_key()
        .await?
        .ok_or_else(|| anyhow!("no leader"))?;
    let target = lab
        .node_names()
        .into_iter()
        .find(|name| *name != old_leader)
        .ok_or_else(|| anyhow!("no replica to switch over to"))?;

    let stop = tokio_util::sync::CancellationToken::new();
    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let mut voters = Vec::new();
        for _ in 0..VOTERS_PER_WORKER {
            voters.push(Voter::open(app, poll).await?);
        }
        workers.push(tokio::spawn(vote_loop(
            app.clone(),
            poll,
            voters,
            stop.clone(),
            worker,
        )));
    }
    // Let the load run, switch over, and keep it running until the new
    // primary has taken votes for a while.
    let acked_before = wait_acked(app, poll, 100).await?;
    request_switchover(lab, &old_leader, &target).await?;
    wait::until(&format!("{target} to lead"), WITHIN, || async {
        let leader = lab.leader_key().await?.map(|(name, _)| name);
        let routed = lab.healthy_primary().await.ok().flatten();
        Ok((leader.as_deref() == Some(target.as_str())
            && routed.as_deref() == Some(target.as_str()))
        .then_some(()))
    })
    .await?;
    wait_acked(app, poll, acked_before + 200).await?;
    stop.cancel();

    let mut acked = Vec::new();
    let mut failures = Vec::new();
    for worker in workers {
        let (ok, failed) = worker.await??;
        acked.extend(ok);
        failures.extend(failed);
    }
    eprintln!(
        "switchover {old_leader} -> {target} under load: {} votes acknowledged, {} failed",
        acked.len(),
        failures.len()
    );
    for instance in &app.instances {
        let metrics = jai_lab::lab_app::scrape_metrics(app, &instance.admin_url).await?;
        let retried = metrics
            .body
            .lines()
            .find(|line| line.starts_with("jai_app_votes_total{result=\"retried\"}"))
            .unwrap_or("no vote needed a retry");
        eprintln!("{}: {retried}", instance.name);
    }
    ensure!(
        failures.is_empty(),
        "vote requests failed during the switchover: {failures:?}"
    );
    check_exactly_once(lab, poll, &acked).await
}

/// `jaictl switchover --from FROM --to TO --force`, as an operator would run
/// it; jaictl itself waits for the outcome (up to its default 30 s).
async fn request_switchover(lab: &Lab, from: &str, to: &str) -> Result<()> {
    let mut command = lab.jaictl(&["switchover", "--force", "--from", from, "--to", to])?;
    let output = tokio::task::spawn_blocking(move || command.output()).await??;
    ensure!(
        output.status.success(),
        "jaictl switchover failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Waits until the database holds at least `count` submissions for `poll`.
async fn wait_acked(app: &AppInfo, poll: i64, count: i64) -> Result<i64> {
    let admin = super::admin(app).await?;
    wait::until(
        &format!("{count} submissions in poll {poll}"),
        WITHIN,
        || {
            let admin = admin.clone();
            async move {
                let mut admin = admin;
                let page = admin.get_mut(&format!("{}/", app.admin_url)).await?;
                let row = page
                    .body
                    .split("<tr>")
                    .find(|row| row.contains(&format!("<a href=\"/polls/{poll}\">")))
                    .unwrap_or_default()
                    .to_owned();
                let cells: Vec<i64> = row
                    .split("<td>")
                    .filter_map(|cell| {
                        cell.trim_end_matches("</tr>")
                            .trim_end_matches("</td>")
                            .parse()
                            .ok()
                    })
                    .collect();
                // Cells: votes, submissions, views.
                Ok(cells
                    .get(1)
                    .copied()
                    .filter(|submissions| *submissions >= count))
            }
        },
    )
    .await
}

type LoopResult = (Vec<Acked>, Vec<String>);

async fn vote_loop(
    app: AppInfo,
    poll: i64,
    mut voters: Vec<Voter>,
    stop: tokio_util::sync::CancellationToken,
    worker: usize,
) -> Result<LoopResult> {
    let started = Instant::now();
    let mut acked = Vec::new();
    let mut failed = Vec::new();
    let mut pace = tokio::time::interval(PACE);
    let options: Vec<String> = voters[0].options();
    for round in 0..MAX_VOTES / WORKERS {
        if stop.is_cancelled() || started.elapsed() > MAX_LOAD_TIME {
            break;
        }
        pace.tick().await;
        let voter = &mut voters[round % VOTERS_PER_WORKER];
        let option = &options[(round / VOTERS_PER_WORKER + worker) % options.len()];
        let key = format!("switchover-{worker}-{round:06}");
        let csrf = voter.field("csrf");
        match voter
            .post(
                &app,
                poll,
                &[("csrf", &csrf), ("key", &key), ("option", option)],
            )
            .await
        {
            Ok(page) if page.status == 303 => acked.push(Acked {
                voter_cookie: voter
                    .client
                    .cookies
                    .get("jai_voter")
                    .cloned()
                    .unwrap_or_default(),
                key,
                option: option.parse()?,
            }),
            Ok(page) => failed.push(format!("{key}: {} {}", page.status, page.body.len())),
            Err(error) => failed.push(format!("{key}: {error:#}")),
        }
    }
    Ok((acked, failed))
}

async fn check_exactly_once(lab: &Lab, poll: i64, acked: &[Acked]) -> Result<()> {
    let db = lab.connect_app(&lab.desc.haproxy.write).await?;
    let rows = db
        .query(
            "SELECT idempotency_key, option_id, outcome FROM vote_requests WHERE poll_id = $1",
            &[&poll],
        )
        .await?;
    let stored: HashMap<String, (i64, String)> = rows
        .iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect();
    ensure!(
        rows.len() == stored.len(),
        "an idempotency key is stored twice"
    );
    ensure!(
        stored.len() == acked.len(),
        "{} submissions stored, {} acknowledged",
        stored.len(),
        acked.len()
    );
    for vote in acked {
        let (option, outcome) = stored
            .get(&vote.key)
            .ok_or_else(|| anyhow!("acknowledged vote {} is not in the database", vote.key))?;
        ensure!(
            *option == vote.option,
            "vote {} stored for another option",
            vote.key
        );
        ensure!(
            ["recorded", "moved", "unchanged"].contains(&outcome.as_str()),
            "vote {} stored as {outcome}",
            vote.key
        );
    }
    // Each voter's row holds its last acknowledged choice.
    let mut last: HashMap<&str, i64> = HashMap::new();
    for vote in acked {
        last.insert(&vote.voter_cookie, vote.option);
    }
    let (votes, recorded): (i64, i64) = {
        let row = db
            .query_one(
                "SELECT (SELECT count(*) FROM votes WHERE poll_id = $1),
                        (SELECT count(*) FROM vote_requests WHERE poll_id = $1 AND outcome = 'recorded')",
                &[&poll],
            )
            .await?;
        (row.get(0), row.get(1))
    };
    ensure!(
        votes == last.len() as i64,
        "{votes} vote rows for {} voters",
        last.len()
    );
    let rows = db
        .query(
            "SELECT voter, option_id FROM votes WHERE poll_id = $1",
            &[&poll],
        )
        .await?;
    for row in rows {
        let voter: String = row.get(0);
        let cookie = last
            .iter()
            .find(|(cookie, _)| cookie.rsplit_once('.').map(|(id, _)| id) == Some(voter.as_str()));
        let Some((_, option)) = cookie else {
            return Err(anyhow!(
                "a vote row of voter {voter} that no acknowledged vote explains"
            ));
        };
        ensure!(
            row.get::<_, i64>(1) == *option,
            "voter {voter}: the row is not the last acknowledged choice"
        );
    }
    ensure!(
        recorded == votes,
        "{recorded} first votes recorded for {votes} vote rows"
    );
    Ok(())
}
