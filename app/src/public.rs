//! The public listener: poll list, poll pages, votes and results.

use crate::db::DbError;
use crate::forwarded::limit_key;
use crate::http::{self, Caching, Fields};
use crate::pages;
use crate::signing::{random_token, Purpose};
use crate::state::App;
use crate::store::{self, VoteOutcome};
use crate::validate;
use axum::extract::rejection::FormRejection;
use axum::extract::{ConnectInfo, Form, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// The voter cookie: a random voter id, signed.
pub const VOTER_COOKIE: &str = "jai_voter";
const VOTER_COOKIE_AGE: u64 = 400 * 24 * 3600;
/// Seconds a refused voter is asked to wait.
const RETRY_AFTER: &str = "15";

/// The public routes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(healthz))
        .route("/polls/{id}", get(poll_page))
        .route("/polls/{id}/vote", post(vote))
        .route("/polls/{id}/results", get(results))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

/// A page with an error message, never cached.
pub fn error_page(
    app: &App,
    status: StatusCode,
    title: &str,
    text: &str,
    back: Option<&str>,
) -> Response {
    http::html(
        status,
        Caching::NoStore,
        pages::layout(title, app.degraded(), pages::message(title, text, back)),
    )
}

fn unavailable(app: &App) -> Response {
    let mut response = error_page(
        app,
        StatusCode::SERVICE_UNAVAILABLE,
        "Try again shortly",
        "We cannot reach the database right now. Please try again in a few seconds.",
        Some("/"),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER));
    response
}

/// The 404 page of an unknown path (both listeners).
pub async fn not_found(State(app): State<Arc<App>>) -> Response {
    error_page(
        &app,
        StatusCode::NOT_FOUND,
        "Not found",
        "There is no such page.",
        Some("/"),
    )
}

/// The 405 page of a known path asked with another method (both
/// listeners; axum adds `Allow`).
pub async fn method_not_allowed(State(app): State<Arc<App>>) -> Response {
    error_page(
        &app,
        StatusCode::METHOD_NOT_ALLOWED,
        "Not allowed",
        "This page cannot be used that way.",
        Some("/"),
    )
}

/// The 404 page of a poll id that does not exist.
pub fn no_such_poll(app: &App) -> Response {
    error_page(
        app,
        StatusCode::NOT_FOUND,
        "No such poll",
        "This poll does not exist.",
        Some("/"),
    )
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    let body = if app.degraded() { "degraded\n" } else { "ok\n" };
    let mut response = Response::new(body.into());
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn public_seconds(app: &App) -> u64 {
    app.config.cache.results_ttl.as_secs().max(1)
}

async fn index(State(app): State<Arc<App>>) -> Response {
    let loaded = app
        .poll_list
        .get_or_load((), || store::open_polls(&app.db))
        .await;
    match loaded {
        Ok(polls) => http::html(
            StatusCode::OK,
            Caching::Public(public_seconds(&app)),
            pages::layout("Open polls", app.degraded(), pages::index(&polls.value)),
        ),
        Err(_) => unavailable(&app),
    }
}

/// The voter id from a valid cookie, if any.
fn voter(app: &App, headers: &HeaderMap) -> Option<String> {
    let sealed = http::cookie_value(headers, VOTER_COOKIE)?;
    app.signer.open(Purpose::Voter, sealed).map(str::to_owned)
}

async fn poll_page(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(id) = validate::id(Some(&id)) else {
        return no_such_poll(&app);
    };
    let poll = match app.polls.get_or_load(id, || store::poll(&app.db, id)).await {
        Ok(cached) => cached.value,
        Err(_) => return unavailable(&app),
    };
    let Some(poll) = poll.as_ref() else {
        return no_such_poll(&app);
    };
    app.views.record(id);
    let (voter_id, new_voter) = match voter(&app, &headers) {
        Some(voter_id) => (voter_id, false),
        None => (random_token(), true),
    };
    let csrf = app.signer.sign(Purpose::VoteCsrf, &voter_id);
    let key = random_token();
    let form = pages::VoteForm {
        csrf: &csrf,
        key: &key,
        paused: app.operator_degraded(),
    };
    let mut response = http::html(
        StatusCode::OK,
        Caching::Private,
        pages::layout(&poll.title, app.degraded(), pages::poll(poll, &form)),
    );
    if new_voter {
        let sealed = app.signer.seal(Purpose::Voter, &voter_id);
        http::set_cookie(
            &mut response,
            VOTER_COOKIE,
            &sealed,
            VOTER_COOKIE_AGE,
            app.config.cookies.secure,
            "Lax",
        );
    }
    response
}

async fn results(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let Some(id) = validate::id(Some(&id)) else {
        return no_such_poll(&app);
    };
    let loaded = match app
        .results
        .get_or_load(id, || store::results(&app.db, id))
        .await
    {
        Ok(cached) => cached.value,
        Err(_) => return unavailable(&app),
    };
    let Some(results) = loaded.as_ref() else {
        return no_such_poll(&app);
    };
    let voted_id = validate::id(query.get("voted").map(String::as_str));
    let voted = results
        .counts
        .iter()
        .find(|(option, _)| Some(option.id) == voted_id)
        .map(|(option, _)| option.label.as_str());
    http::html(
        StatusCode::OK,
        Caching::Public(public_seconds(&app)),
        pages::layout(
            &results.poll.title,
            app.degraded(),
            pages::results(results, voted),
        ),
    )
}

/// A refused vote: its status, title and message, never cached.
struct Refusal {
    status: StatusCode,
    title: &'static str,
    text: String,
}

impl Refusal {
    fn new(status: StatusCode, title: &'static str, text: impl Into<String>) -> Self {
        Self {
            status,
            title,
            text: text.into(),
        }
    }
}

async fn vote(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
    form: Result<Form<Fields>, FormRejection>,
) -> Response {
    let back = validate::id(Some(&id)).map(|id| format!("/polls/{id}"));
    match vote_inner(&app, peer, &id, &headers, form).await {
        Ok((poll, option)) => {
            app.metrics.vote("accepted");
            http::see_other(&format!("/polls/{poll}/results?voted={option}"))
        }
        Err(refusal) => {
            app.metrics.vote("refused");
            let mut response = error_page(
                &app,
                refusal.status,
                refusal.title,
                &refusal.text,
                back.as_deref(),
            );
            if matches!(
                refusal.status,
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
            ) {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER));
            }
            response
        }
    }
}

/// A vote submission that passed every check made before the database.
struct Submission {
    poll: i64,
    voter: String,
    key: String,
    option: i64,
}

/// Checks a vote submission, then records it; returns the poll and option ids.
async fn vote_inner(
    app: &App,
    peer: SocketAddr,
    id: &str,
    headers: &HeaderMap,
    form: Result<Form<Fields>, FormRejection>,
) -> Result<(i64, i64), Refusal> {
    let submission = check_submission(app, peer, id, headers, form)?;
    record(app, &submission).await?;
    Ok((submission.poll, submission.option))
}

fn too_many() -> Refusal {
    Refusal::new(
        StatusCode::TOO_MANY_REQUESTS,
        "Too many votes",
        "You are voting too quickly. Please wait a minute and try again.",
    )
}

fn forged() -> Refusal {
    Refusal::new(
        StatusCode::FORBIDDEN,
        "Vote not accepted",
        "This form has expired or was not sent from this site. Reload the poll page and vote again.",
    )
}

/// The checks in order: body, poll id, address limit, CSRF, voter limit,
/// fields, operator switch. Cheap ones first; nothing here touches the database.
fn check_submission(
    app: &App,
    peer: SocketAddr,
    id: &str,
    headers: &HeaderMap,
    form: Result<Form<Fields>, FormRejection>,
) -> Result<Submission, Refusal> {
    let fields = http::form_fields(form)
        .map_err(|(status, text)| Refusal::new(status, "Vote not accepted", text))?;
    let poll = validate::id(Some(id)).ok_or_else(|| {
        Refusal::new(
            StatusCode::NOT_FOUND,
            "No such poll",
            "This poll does not exist.",
        )
    })?;
    let now = Instant::now();
    let address = app
        .config
        .limits
        .trusted_proxies
        .client_address(headers, peer);
    if !app.ip_limit.allow(&limit_key(address), now) {
        return Err(too_many());
    }
    let voter = voter(app, headers).ok_or_else(forged)?;
    let csrf = fields.get("csrf").map(String::as_str).unwrap_or("");
    if !app.signer.verify(Purpose::VoteCsrf, &voter, csrf) {
        return Err(forged());
    }
    if !app.voter_limit.allow(&voter, now) {
        return Err(too_many());
    }
    let key = validate::idempotency_key(fields.get("key").map(String::as_str))
        .map_err(|text| Refusal::new(StatusCode::BAD_REQUEST, "Vote not accepted", text))?;
    let option = validate::id(fields.get("option").map(String::as_str)).ok_or_else(|| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "Pick an option",
            "Please pick one of the options before voting.",
        )
    })?;
    if app.operator_degraded() {
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Try again shortly",
            "Voting is paused for a moment. Your vote was not recorded: please try again shortly.",
        ));
    }
    Ok(Submission {
        poll,
        key: key.to_owned(),
        voter,
        option,
    })
}

/// Records the vote (retried through a failover) and maps its outcome.
async fn record(app: &App, vote: &Submission) -> Result<(), Refusal> {
    let attempted = match store::vote(&app.db, &vote.voter, &vote.key, vote.poll, vote.option).await
    {
        Ok(attempted) => attempted,
        Err(DbError::Unavailable { waited, last }) => {
            tracing::warn!(?waited, "vote refused, no primary: {last}");
            app.set_primary_reachable(false);
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Try again shortly",
                "We could not record your vote just now. Nothing was counted: please try again shortly.",
            ));
        }
        Err(DbError::Permanent(message)) => {
            tracing::error!("vote failed: {message}");
            return Err(Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Something went wrong",
                "Your vote could not be recorded. Please try again.",
            ));
        }
    };
    if attempted.attempts > 1 {
        app.metrics.vote("retried");
    }
    match attempted.value {
        VoteOutcome::Recorded | VoteOutcome::Moved | VoteOutcome::Unchanged => {
            app.results.invalidate(&vote.poll);
            Ok(())
        }
        VoteOutcome::AlreadyVoted => Err(Refusal::new(
            StatusCode::CONFLICT,
            "Already voted",
            "You have already voted in this poll, and it does not allow changing a vote.",
        )),
        VoteOutcome::Closed => Err(Refusal::new(
            StatusCode::CONFLICT,
            "Poll closed",
            "This poll is closed.",
        )),
        VoteOutcome::UnknownPoll => Err(Refusal::new(
            StatusCode::NOT_FOUND,
            "No such poll",
            "This poll does not exist.",
        )),
        VoteOutcome::KeyReused => Err(Refusal::new(
            StatusCode::CONFLICT,
            "Vote not accepted",
            "This form was already sent with a different choice, so this vote was not counted. \
             Reload the poll page and vote again.",
        )),
        VoteOutcome::UnknownOption => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "Pick an option",
            "That option is not part of this poll. Please pick one of the options shown.",
        )),
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::{self, loopback, request, Side};
    use std::net::{IpAddr, SocketAddr};

    /// A vote without a voter cookie from `from`, claiming to forward for
    /// `forwarded`: 429 when the address is over its limit, else 403.
    async fn vote(to: SocketAddr, from: IpAddr, forwarded: &str) -> u16 {
        let headers = [("x-forwarded-for", forwarded)];
        request(
            to,
            from,
            "POST",
            "/polls/1/vote",
            &headers,
            "csrf=x&key=k&option=2",
        )
        .await
        .status
    }

    #[tokio::test]
    async fn a_direct_client_cannot_pick_its_address_with_forwarded_for() {
        let app = testing::app("limits: {votes_per_ip_per_minute: 2}\n");
        let (public, _stop) = testing::serve(&app, Side::Public).await;
        let client = loopback(31);
        assert_eq!(vote(public, client, "198.51.100.1").await, 403);
        assert_eq!(vote(public, client, "198.51.100.2").await, 403);
        assert_eq!(vote(public, client, "198.51.100.3").await, 429);
    }

    #[tokio::test]
    async fn a_trusted_proxy_forwards_each_clients_address() {
        let app =
            testing::app("limits: {votes_per_ip_per_minute: 2, trusted_proxies: [127.0.0.41]}\n");
        let (public, _stop) = testing::serve(&app, Side::Public).await;
        let proxy = loopback(41);
        for client in 1..=5 {
            let forwarded = format!("198.51.100.{client}");
            assert_eq!(vote(public, proxy, &forwarded).await, 403, "{forwarded}");
        }
        assert_eq!(vote(public, proxy, "198.51.100.1").await, 403);
        assert_eq!(vote(public, proxy, "198.51.100.1").await, 429);
        // Not an address: the proxy's own bucket, the same for every such value.
        assert_eq!(vote(public, proxy, "garbage-1").await, 403);
        assert_eq!(vote(public, proxy, "garbage-2").await, 403);
        assert_eq!(vote(public, proxy, "garbage-3").await, 429);
        // Another peer is no proxy, whatever it sends.
        let direct = loopback(42);
        assert_eq!(vote(public, direct, "198.51.100.9").await, 403);
        assert_eq!(vote(public, direct, "198.51.100.10").await, 403);
        assert_eq!(vote(public, direct, "198.51.100.11").await, 429);
    }
}
