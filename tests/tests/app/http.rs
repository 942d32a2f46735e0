//! The site over HTTP: the happy path once, then every bad input the issue
//! lists, each answered with a clear status and nothing lost.

use super::admin;
use anyhow::{anyhow, ensure, Result};
use jai_lab::lab_app::{scrape_metrics, AppClient, AppInfo, Page};
use jai_lab::wait;
use jai_lab::Lab;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(20);
const SCRIPT_TITLE: &str = "<script>alert('pwned')</script> Tea or coffee?";

/// A voter who has opened poll `poll`: its cookie, CSRF token and options.
pub struct Voter {
    /// The voter's own client (cookie jar).
    pub client: AppClient,
    /// The poll page as last loaded.
    pub page: Page,
}

impl Voter {
    /// Opens the poll page (the first visit sets the voter cookie).
    pub async fn open(app: &AppInfo, poll: i64) -> Result<Voter> {
        let mut client = AppClient::new()?;
        let page = client
            .get_ok(&format!("{}/polls/{poll}", app.url), WITHIN)
            .await?;
        Ok(Voter { client, page })
    }

    /// The form's hidden field `name`.
    pub fn field(&self, name: &str) -> String {
        self.page.field(name).unwrap_or_default()
    }

    /// The option ids shown.
    pub fn options(&self) -> Vec<String> {
        self.page.radio_values("option")
    }

    /// Posts a vote with explicit fields.
    pub async fn post(
        &mut self,
        app: &AppInfo,
        poll: i64,
        fields: &[(&str, &str)],
    ) -> Result<Page> {
        self.client
            .post(&format!("{}/polls/{poll}/vote", app.url), fields)
            .await
    }

    /// Votes for `option` with this page's CSRF token and key.
    pub async fn vote(&mut self, app: &AppInfo, poll: i64, option: &str) -> Result<Page> {
        let (csrf, key) = (self.field("csrf"), self.field("key"));
        self.post(
            app,
            poll,
            &[("csrf", &csrf), ("key", &key), ("option", option)],
        )
        .await
    }
}

/// Waits until the results page of `poll` shows `expected` votes in total.
pub async fn wait_total(app: &AppInfo, poll: i64, expected: i64) -> Result<Page> {
    let client = AppClient::new()?;
    let url = format!("{}/polls/{poll}/results", app.url);
    wait::until(
        &format!("poll {poll} to show {expected} votes"),
        WITHIN,
        || {
            let (client, url) = (&client, &url);
            async move {
                let page = client.get(url).await?;
                let total = format!("<th id=\"total\">{expected}</th>");
                Ok(page.body.contains(&total).then_some(page))
            }
        },
    )
    .await
}

pub async fn run(lab: &Lab) -> Result<()> {
    let app = lab
        .desc
        .app
        .as_ref()
        .ok_or_else(|| anyhow!("lab without app"))?;
    let mut admin = admin(app).await?;
    let poll = admin
        .create_poll(
            &app.admin_url,
            SCRIPT_TITLE,
            &["Tea", "Coffee <b>bold</b>"],
            true,
        )
        .await?;
    let other_poll = admin
        .create_poll(&app.admin_url, "Cats or dogs?", &["Cats", "Dogs"], false)
        .await?;

    pages_escape_and_cache(app, poll).await?;
    vote_is_counted_once_and_moves(lab, app, poll).await?;
    concurrent_votes_of_one_voter(lab, app, poll).await?;
    reused_key_is_refused(lab, app, poll, other_poll).await?;
    bad_votes_are_refused(app, poll, other_poll).await?;
    rate_limit_is_hit(app, other_poll).await?;
    admin_needs_session_and_csrf(app).await?;
    views_are_counted(app, other_poll, &mut admin).await?;
    degraded_mode_refuses_votes_politely(app, other_poll, &mut admin).await?;
    admin_edits_reach_the_vote(app, &mut admin).await?;
    metrics_are_exposed(app).await?;
    Ok(())
}

async fn pages_escape_and_cache(app: &AppInfo, poll: i64) -> Result<()> {
    let client = AppClient::new()?;
    for url in [
        format!("{}/", app.url),
        format!("{}/polls/{poll}", app.url),
        format!("{}/polls/{poll}/results", app.url),
    ] {
        let page = wait::until(&format!("{url} to list the poll"), WITHIN, || {
            let (client, url) = (&client, &url);
            async move {
                let page = client.get(url).await?;
                Ok(page.body.contains("Tea or coffee?").then_some(page))
            }
        })
        .await?;
        ensure!(page.status == 200, "{url}: {}", page.status);
        ensure!(
            !page.body.contains("<script>alert") && page.body.contains("&lt;script&gt;alert"),
            "{url}: the title is not escaped"
        );
        ensure!(
            !page.body.contains("<b>bold</b>"),
            "{url}: option label not escaped"
        );
        let caching = page.cache_control.unwrap_or_default();
        if url.contains("/polls/") && !url.ends_with("/results") {
            ensure!(
                caching == "private, no-cache",
                "{url}: cache-control {caching}"
            );
        } else {
            ensure!(
                caching.starts_with("public, max-age="),
                "{url}: cache-control {caching}"
            );
        }
    }
    Ok(())
}

async fn vote_is_counted_once_and_moves(lab: &Lab, app: &AppInfo, poll: i64) -> Result<()> {
    let mut voter = Voter::open(app, poll).await?;
    let options = voter.options();
    ensure!(options.len() == 2, "options shown: {options:?}");
    let first = voter.vote(app, poll, &options[0]).await?;
    ensure!(
        first.status == 303,
        "vote answered {}: {}",
        first.status,
        first.body
    );
    ensure!(
        first.cache_control.as_deref() == Some("no-store"),
        "vote response cacheable"
    );
    // The same submission again (a retried request): the same outcome, counted once.
    let again = voter.vote(app, poll, &options[0]).await?;
    ensure!(
        again.status == 303 && again.location == first.location,
        "retry answered differently"
    );
    let results = wait_total(app, poll, 1).await?;
    ensure!(
        results.body.contains("100.0%"),
        "results without the percentage"
    );
    ensure!(results.body.contains("<svg"), "results without the chart");

    // Re-vote from a fresh page: the vote moves, the total stays 1.
    voter.page = voter
        .client
        .get_mut(&format!("{}/polls/{poll}", app.url))
        .await?;
    let moved = voter.vote(app, poll, &options[1]).await?;
    ensure!(moved.status == 303, "re-vote answered {}", moved.status);
    let db = lab.connect_app(&lab.desc.haproxy.write).await?;
    let rows = db
        .query(
            "SELECT option_id::text, (SELECT count(*) FROM vote_requests WHERE poll_id = $1) FROM votes WHERE poll_id = $1",
            &[&poll],
        )
        .await?;
    ensure!(rows.len() == 1, "{} vote rows for one voter", rows.len());
    ensure!(
        rows[0].get::<_, String>(0) == options[1],
        "the vote did not move"
    );
    ensure!(
        rows[0].get::<_, i64>(1) == 2,
        "two submissions expected (the retry is not one)"
    );
    Ok(())
}

/// One voter submitting from several tabs at once: every submission is
/// answered, one vote row results.
async fn concurrent_votes_of_one_voter(lab: &Lab, app: &AppInfo, poll: i64) -> Result<()> {
    let voter = Voter::open(app, poll).await?;
    let options = voter.options();
    let csrf = voter.field("csrf");
    let mut tabs = Vec::new();
    for tab in 0..8 {
        let mut client = voter.client.clone();
        let (url, csrf) = (format!("{}/polls/{poll}/vote", app.url), csrf.clone());
        let option = options[tab % options.len()].clone();
        tabs.push(tokio::spawn(async move {
            let key = format!("concurrent-tab-{tab:02}");
            client
                .post(&url, &[("csrf", &csrf), ("key", &key), ("option", &option)])
                .await
        }));
    }
    for tab in tabs {
        let page = tab.await??;
        ensure!(
            page.status == 303,
            "a concurrent vote answered {}: {}",
            page.status,
            page.body
        );
    }
    let voter_id = voter
        .client
        .cookies
        .get("jai_voter")
        .and_then(|cookie| cookie.rsplit_once('.'))
        .map(|(id, _)| id.to_owned())
        .unwrap_or_default();
    let db = lab.connect_app(&lab.desc.haproxy.write).await?;
    let row = db
        .query_one(
            "SELECT count(*) FROM votes WHERE poll_id = $1 AND voter = $2",
            &[&poll, &voter_id],
        )
        .await?;
    ensure!(
        row.get::<_, i64>(0) == 1,
        "concurrent votes left {} rows",
        row.get::<_, i64>(0)
    );
    Ok(())
}

/// An idempotency key is one submission of one choice: sent again with
/// another option or poll it is refused with 409, and nothing changes
/// (issue #18: it was answered "your vote for X is counted").
async fn reused_key_is_refused(lab: &Lab, app: &AppInfo, poll: i64, other_poll: i64) -> Result<()> {
    let mut voter = Voter::open(app, poll).await?;
    let options = voter.options();
    let (csrf, key) = (voter.field("csrf"), voter.field("key"));
    let first = voter.vote(app, poll, &options[0]).await?;
    ensure!(first.status == 303, "first vote answered {}", first.status);
    let other_option = voter
        .post(
            app,
            poll,
            &[("csrf", &csrf), ("key", &key), ("option", &options[1])],
        )
        .await?;
    let foreign = Voter::open(app, other_poll).await?.options()[0].clone();
    let other_poll_page = voter
        .post(
            app,
            other_poll,
            &[("csrf", &csrf), ("key", &key), ("option", &foreign)],
        )
        .await?;
    for (page, what) in [
        (other_option, "the key reused for another option"),
        (other_poll_page, "the key reused in another poll"),
    ] {
        ensure!(
            page.status == 409,
            "{what} answered {}: {}",
            page.status,
            page.body
        );
        ensure!(
            page.body.contains("already sent with a different choice")
                && !page.body.contains("is counted"),
            "{what}: the page does not say the vote was not counted"
        );
        ensure!(
            page.cache_control.as_deref() == Some("no-store"),
            "{what}: refusal cacheable"
        );
    }
    // The same choice again is still the retry it was: the first outcome.
    let again = voter.vote(app, poll, &options[0]).await?;
    ensure!(
        again.status == 303 && again.location == first.location,
        "the retry of the first choice answered {}",
        again.status
    );
    let voter_id = voter
        .client
        .cookies
        .get("jai_voter")
        .and_then(|cookie| cookie.rsplit_once('.'))
        .map(|(id, _)| id.to_owned())
        .unwrap_or_default();
    let db = lab.connect_app(&lab.desc.haproxy.write).await?;
    let rows = db
        .query(
            "SELECT poll_id, option_id::text FROM votes WHERE voter = $1 ORDER BY poll_id",
            &[&voter_id],
        )
        .await?;
    let stored: Vec<(i64, String)> = rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    ensure!(
        stored == [(poll, options[0].clone())],
        "votes stored for the voter: {stored:?}"
    );
    Ok(())
}

async fn bad_votes_are_refused(app: &AppInfo, poll: i64, other_poll: i64) -> Result<()> {
    let mut voter = Voter::open(app, poll).await?;
    let option = voter.options()[0].clone();
    let (csrf, key) = (voter.field("csrf"), voter.field("key"));
    let expect = |page: Page, status: u16, text: &str, what: &str| -> Result<()> {
        ensure!(
            page.status == status,
            "{what}: {} instead of {status}",
            page.status
        );
        ensure!(
            page.body.contains(text),
            "{what}: the page does not say {text:?}"
        );
        ensure!(
            page.cache_control.as_deref() == Some("no-store"),
            "{what}: refusal cacheable"
        );
        Ok(())
    };
    let big = "x".repeat(64 * 1024);
    let page = voter
        .post(
            app,
            poll,
            &[
                ("csrf", &csrf),
                ("key", &key),
                ("option", &option),
                ("pad", &big),
            ],
        )
        .await?;
    expect(page, 413, "too large", "oversized body")?;
    let page = voter
        .post(app, poll, &[("key", &key), ("option", &option)])
        .await?;
    expect(page, 403, "not sent from this site", "missing CSRF token")?;
    let page = voter
        .post(
            app,
            poll,
            &[("csrf", "forged"), ("key", &key), ("option", &option)],
        )
        .await?;
    expect(page, 403, "not sent from this site", "forged CSRF token")?;
    let other = Voter::open(app, poll).await?;
    let page = voter
        .post(
            app,
            poll,
            &[
                ("csrf", &other.field("csrf")),
                ("key", &key),
                ("option", &option),
            ],
        )
        .await?;
    expect(
        page,
        403,
        "not sent from this site",
        "another voter's CSRF token",
    )?;
    let mut anonymous = AppClient::new()?;
    let page = anonymous
        .post(
            &format!("{}/polls/{poll}/vote", app.url),
            &[("csrf", &csrf), ("key", &key), ("option", &option)],
        )
        .await?;
    expect(page, 403, "not sent from this site", "no voter cookie")?;
    let page = voter
        .post(
            app,
            999_999,
            &[("csrf", &csrf), ("key", &key), ("option", &option)],
        )
        .await?;
    expect(page, 404, "does not exist", "unknown poll")?;
    let page = voter
        .client
        .get(&format!("{}/polls/999999", app.url))
        .await?;
    expect(page, 404, "does not exist", "unknown poll page")?;
    let foreign = Voter::open(app, other_poll).await?.options()[0].clone();
    let page = voter
        .post(
            app,
            poll,
            &[
                ("csrf", &csrf),
                ("key", "key-of-a-foreign-option"),
                ("option", &foreign),
            ],
        )
        .await?;
    expect(page, 400, "not part of this poll", "option of another poll")?;
    let page = voter
        .post(
            app,
            poll,
            &[
                ("csrf", &csrf),
                ("key", "key-of-a-bad-option-1"),
                ("option", "1; DROP TABLE votes"),
            ],
        )
        .await?;
    expect(page, 400, "pick one of the options", "malformed option")?;
    let page = voter
        .post(app, poll, &[("csrf", &csrf), ("option", &option)])
        .await?;
    expect(page, 400, "submission key", "missing idempotency key")?;
    let page = voter
        .client
        .post_raw(&format!("{}/polls/{poll}/vote", app.url), "%%%=%".into())
        .await?;
    ensure!(
        page.status == 400 || page.status == 403,
        "garbled body answered {}",
        page.status
    );
    Ok(())
}

async fn rate_limit_is_hit(app: &AppInfo, poll: i64) -> Result<()> {
    // 30 votes per voter per minute per app node, and HAProxy sends one voter
    // to one node (hash of the voter cookie): the limit bites after the 30th
    // vote (plus what the bucket refills meanwhile, one vote per 2 s), not
    // after twice that as two round-robin nodes would allow.
    let mut voter = Voter::open(app, poll).await?;
    let option = voter.options()[0].clone();
    let csrf = voter.field("csrf");
    for attempt in 1..=200 {
        let key = format!("rate-limit-key-{attempt:04}");
        let page = voter
            .post(
                app,
                poll,
                &[("csrf", &csrf), ("key", &key), ("option", &option)],
            )
            .await?;
        match page.status {
            429 => {
                eprintln!("rate limited at vote {attempt}");
                ensure!(attempt > 30, "rate limited after only {attempt} votes");
                ensure!(
                    attempt <= 45,
                    "rate limited only after {attempt} votes: the voter's votes were spread over nodes"
                );
                ensure!(
                    page.body.contains("too quickly"),
                    "429 without a clear message"
                );
                return Ok(());
            }
            303 | 409 => {}
            other => return Err(anyhow!("vote {attempt} answered {other}: {}", page.body)),
        }
    }
    Err(anyhow!("200 votes in a row were never rate limited"))
}

async fn admin_needs_session_and_csrf(app: &AppInfo) -> Result<()> {
    let mut stranger = AppClient::new()?;
    let page = stranger
        .post(
            &format!("{}/polls", app.admin_url),
            &[("title", "Sneaky"), ("options", "a\nb")],
        )
        .await?;
    ensure!(
        page.status == 303 && page.location.as_deref() == Some("/login"),
        "anonymous poll creation answered {}",
        page.status
    );
    let mut logged_in = super::admin(app).await?;
    let page = logged_in
        .post(
            &format!("{}/polls", app.admin_url),
            &[("csrf", "forged"), ("title", "Sneaky"), ("options", "a\nb")],
        )
        .await?;
    ensure!(
        page.status == 403,
        "forged admin CSRF answered {}",
        page.status
    );
    let form = logged_in
        .get_mut(&format!("{}/polls/new", app.admin_url))
        .await?;
    let csrf = form.field("csrf").unwrap_or_default();
    let page = logged_in
        .post(
            &format!("{}/polls", app.admin_url),
            &[
                ("csrf", &csrf),
                ("title", "One option"),
                ("options", "only"),
            ],
        )
        .await?;
    ensure!(
        page.status == 400
            && page.body.contains("at least two options")
            && page.body.contains("One option"),
        "invalid poll answered {} (the typed title must be kept)",
        page.status
    );
    let page = stranger
        .post(
            &format!("{}/login", app.admin_url),
            &[("username", "admin"), ("password", "x")],
        )
        .await?;
    ensure!(
        page.status == 403,
        "login without CSRF answered {}",
        page.status
    );
    let logout_csrf = logged_in
        .get_mut(&format!("{}/", app.admin_url))
        .await?
        .field("csrf")
        .unwrap_or_default();
    let page = logged_in
        .post(
            &format!("{}/logout", app.admin_url),
            &[("csrf", &logout_csrf)],
        )
        .await?;
    ensure!(page.status == 303, "logout answered {}", page.status);
    let page = logged_in.get_mut(&format!("{}/", app.admin_url)).await?;
    ensure!(
        page.status == 303,
        "dashboard after logout answered {}",
        page.status
    );
    Ok(())
}

async fn views_are_counted(app: &AppInfo, poll: i64, admin: &mut AppClient) -> Result<()> {
    let before = dashboard_views(app, admin, poll).await?;
    let client = AppClient::new()?;
    for _ in 0..25 {
        let page = client.get(&format!("{}/polls/{poll}", app.url)).await?;
        ensure!(page.status == 200, "poll page answered {}", page.status);
    }
    wait::until("25 more views on the dashboard", WITHIN, || {
        let admin = admin.clone();
        async move {
            let mut admin = admin;
            Ok((dashboard_views(app, &mut admin, poll).await? >= before + 25).then_some(()))
        }
    })
    .await
}

/// The views column of `poll` on the admin dashboard.
async fn dashboard_views(app: &AppInfo, admin: &mut AppClient, poll: i64) -> Result<i64> {
    let page = admin.get_mut(&format!("{}/", app.admin_url)).await?;
    let row_start = page
        .body
        .find(&format!("<a href=\"/polls/{poll}\">"))
        .ok_or_else(|| anyhow!("poll {poll} not on the dashboard"))?;
    let row = &page.body[row_start..];
    let row = &row[..row.find("</tr>").unwrap_or(row.len())];
    row.rsplit("<td>")
        .next()
        .and_then(|cell| cell.trim_end_matches("</td>").parse().ok())
        .ok_or_else(|| anyhow!("no views cell in {row}"))
}

async fn set_degraded(app: &AppInfo, admin: &mut AppClient, on: bool) -> Result<()> {
    let csrf = admin
        .get_mut(&format!("{}/", app.admin_url))
        .await?
        .field("csrf")
        .unwrap_or_default();
    let value = if on { "1" } else { "0" };
    let page = admin
        .post(
            &format!("{}/degraded", app.admin_url),
            &[("csrf", &csrf), ("on", value)],
        )
        .await?;
    ensure!(
        page.status == 303,
        "degraded switch answered {}",
        page.status
    );
    Ok(())
}

async fn degraded_mode_refuses_votes_politely(
    app: &AppInfo,
    poll: i64,
    admin: &mut AppClient,
) -> Result<()> {
    // A voter who loaded the form before the switch.
    let mut voter = Voter::open(app, poll).await?;
    let csrf = voter.field("csrf");
    set_degraded(app, admin, true).await?;
    // Every instance reads the switch from PostgreSQL within a second.
    for instance in &app.instances {
        let url = format!("{}/polls/{poll}", instance.url);
        wait::until(
            &format!("{} to show the banner", instance.name),
            WITHIN,
            || {
                let url = url.clone();
                async move {
                    let page = AppClient::new()?.get(&url).await?;
                    Ok(page.body.contains("id=\"degraded\"").then_some(()))
                }
            },
        )
        .await?;
    }
    let paused = voter
        .client
        .get(&format!("{}/polls/{poll}", app.url))
        .await?;
    ensure!(
        paused.body.contains("Voting is paused"),
        "the form is still offered"
    );
    let page = voter
        .post(
            app,
            poll,
            &[
                ("csrf", &csrf),
                ("key", "degraded-mode-vote-1"),
                ("option", "1"),
            ],
        )
        .await?;
    ensure!(
        page.status == 503 && page.body.contains("try again shortly"),
        "degraded vote answered {}",
        page.status
    );
    let results = AppClient::new()?
        .get(&format!("{}/polls/{poll}/results", app.url))
        .await?;
    ensure!(
        results.status == 200,
        "results in degraded mode answered {}",
        results.status
    );
    set_degraded(app, admin, false).await?;
    for instance in &app.instances {
        let url = format!("{}/healthz", instance.url);
        wait::until(
            &format!("{} to leave degraded mode", instance.name),
            WITHIN,
            || {
                let url = url.clone();
                async move { Ok((AppClient::new()?.get(&url).await?.body == "ok\n").then_some(())) }
            },
        )
        .await?;
    }
    Ok(())
}

/// Posts an admin form found on `page_path` (its CSRF token) to `action`.
async fn admin_post(
    app: &AppInfo,
    admin: &mut AppClient,
    page_path: &str,
    action: &str,
    fields: &[(&str, &str)],
) -> Result<Page> {
    let page = admin
        .get_mut(&format!("{}{page_path}", app.admin_url))
        .await?;
    let csrf = page
        .field("csrf")
        .ok_or_else(|| anyhow!("{page_path}: no csrf ({})", page.status))?;
    let mut all = vec![("csrf", csrf.as_str())];
    all.extend_from_slice(fields);
    admin
        .post(&format!("{}{action}", app.admin_url), &all)
        .await
}

/// Closing a poll, removing an option and editing the title take effect on
/// the public site and on votes.
async fn admin_edits_reach_the_vote(app: &AppInfo, admin: &mut AppClient) -> Result<()> {
    let poll = admin
        .create_poll(
            &app.admin_url,
            "Edited poll",
            &["Keep", "Abusive option"],
            true,
        )
        .await?;
    let mut voter = Voter::open(app, poll).await?;
    let options = voter.options();
    let csrf = voter.field("csrf");
    let edit = format!("/polls/{poll}");
    let removed = admin_post(
        app,
        admin,
        &edit,
        &format!("{edit}/options/{}/remove", options[1]),
        &[],
    )
    .await?;
    ensure!(
        removed.status == 303,
        "removing an option answered {}",
        removed.status
    );
    let page = voter
        .post(
            app,
            poll,
            &[
                ("csrf", &csrf),
                ("key", "vote-for-removed-option"),
                ("option", &options[1]),
            ],
        )
        .await?;
    ensure!(
        page.status == 400,
        "a vote for a removed option answered {}",
        page.status
    );
    let closed = admin_post(app, admin, &edit, &format!("{edit}/open"), &[("open", "0")]).await?;
    ensure!(closed.status == 303, "closing answered {}", closed.status);
    let page = voter
        .post(
            app,
            poll,
            &[
                ("csrf", &csrf),
                ("key", "vote-in-a-closed-poll"),
                ("option", &options[0]),
            ],
        )
        .await?;
    ensure!(
        page.status == 409 && page.body.contains("closed"),
        "a vote in a closed poll answered {}",
        page.status
    );
    let renamed = admin_post(
        app,
        admin,
        &edit,
        &edit,
        &[("title", "Renamed poll"), ("description", "")],
    )
    .await?;
    ensure!(
        renamed.status == 303,
        "renaming answered {}",
        renamed.status
    );
    let results = format!("{}/polls/{poll}/results", app.url);
    let client = AppClient::new()?;
    wait::until(
        "the new title and no removed option on the results",
        WITHIN,
        || {
            let (client, results) = (&client, &results);
            async move {
                let page = client.get(results).await?;
                Ok(
                    (page.body.contains("Renamed poll") && !page.body.contains("Abusive option"))
                        .then_some(()),
                )
            }
        },
    )
    .await
}

/// Every instance's `/metrics`: HAProxy spreads the votes over the
/// instances, so one instance alone may not have counted any yet.
async fn metrics_are_exposed(app: &AppInfo) -> Result<()> {
    let anonymous = AppClient::new()?
        .get(&format!("{}/metrics", app.admin_url))
        .await?;
    ensure!(
        anonymous.status == 401 && !anonymous.body.contains("jai_app_"),
        "metrics without the scrape token answered {}",
        anonymous.status
    );
    let wrong = AppClient::new()?
        .get_with_bearer(
            &format!("{}/metrics", app.admin_url),
            "not-the-token-at-all",
        )
        .await?;
    ensure!(
        wrong.status == 401,
        "metrics with a wrong token answered {}",
        wrong.status
    );
    let mut all = String::new();
    for instance in &app.instances {
        let page = scrape_metrics(app, &instance.admin_url).await?;
        ensure!(
            page.status == 200,
            "{} metrics answered {}",
            instance.name,
            page.status
        );
        all.push_str(&page.body);
    }
    for needle in [
        "jai_app_votes_total{result=\"accepted\"}",
        "jai_app_votes_total{result=\"refused\"}",
        "route=\"/polls/{id}/vote\"",
        "jai_app_http_request_duration_seconds_bucket",
        "jai_app_db_pool_connections{pool=\"write\",state=\"size\"}",
        "jai_app_db_pool_connections{pool=\"votes\",state=\"in_flight\"}",
    ] {
        ensure!(all.contains(needle), "metrics lack {needle}");
    }
    // Votes were accepted above, so some node holds a shared vote connection.
    let open_vote_connections: u64 = all
        .lines()
        .filter_map(|line| {
            line.strip_prefix("jai_app_db_pool_connections{pool=\"votes\",state=\"open\"} ")
        })
        .filter_map(|value| value.trim().parse::<u64>().ok())
        .sum();
    ensure!(
        open_vote_connections > 0,
        "no open shared vote connection after accepted votes:\n{all}"
    );
    Ok(())
}
