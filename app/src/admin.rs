//! The admin listener: login, poll editing, statistics, the degraded-mode
//! switch and `/metrics`.
//!
//! Sessions live in PostgreSQL (only a hash of the cookie's token), so any
//! app node serving the admin port accepts them and logout ends them
//! everywhere. Every mutating request needs the session and the session's
//! CSRF token; the login form has its own token bound to a login cookie.

use crate::admin_pages::{self, PollDraft};
use crate::admin_store;
use crate::db::DbError;
use crate::forwarded::limit_key;
use crate::http::{self, Caching, Fields};
use crate::public::{error_page, method_not_allowed, no_such_poll, not_found};
use crate::signing::{random_token, Purpose};
use crate::state::App;
use crate::store;
use crate::validate;
use axum::extract::rejection::FormRejection;
use axum::extract::{ConnectInfo, Form, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use maud::Markup;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// The admin session cookie.
pub const SESSION_COOKIE: &str = "jai_admin";
/// The login form's cookie (binds its CSRF token).
pub const LOGIN_COOKIE: &str = "jai_login";

/// The admin routes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/metrics", get(metrics))
        .route("/degraded", post(degraded))
        .route("/polls/new", get(new_poll_page))
        .route("/polls", post(create_poll))
        .route("/polls/{id}", get(edit_page).post(update_poll))
        .route("/polls/{id}/open", post(open_poll))
        .route("/polls/{id}/options/{option}/remove", post(remove_option))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

/// A logged-in admin.
struct Session {
    csrf: String,
}

fn page(app: &App, status: StatusCode, title: &str, csrf: &str, body: Markup) -> Response {
    http::html(
        status,
        Caching::NoStore,
        admin_pages::frame(title, app.degraded(), csrf, body),
    )
}

fn db_failure(app: &App, error: &DbError) -> Response {
    tracing::warn!("admin request failed: {error}");
    error_page(
        app,
        StatusCode::SERVICE_UNAVAILABLE,
        "Database unavailable",
        "The database cannot be reached right now; nothing was changed. Try again shortly.",
        Some("/"),
    )
}

/// The session of this request, or the response to send instead.
async fn session(app: &App, headers: &HeaderMap) -> Result<Session, Response> {
    let Some(token) = http::cookie_value(headers, SESSION_COOKIE) else {
        return Err(http::see_other("/login"));
    };
    match admin_store::session_valid(&app.db, token).await {
        Ok(true) => Ok(Session {
            csrf: app.signer.sign(Purpose::AdminCsrf, token),
        }),
        Ok(false) => Err(http::see_other("/login")),
        Err(error) => Err(db_failure(app, &error)),
    }
}

/// A mutating request: readable form, live session, matching CSRF token.
async fn authorized(
    app: &App,
    headers: &HeaderMap,
    form: Result<Form<Fields>, FormRejection>,
) -> Result<(Session, Fields), Response> {
    let fields = http::form_fields(form)
        .map_err(|(status, text)| error_page(app, status, "Request refused", &text, Some("/")))?;
    let session = session(app, headers).await?;
    if fields.get("csrf") != Some(&session.csrf) {
        return Err(error_page(
            app,
            StatusCode::FORBIDDEN,
            "Request refused",
            "This form has expired or was not sent from this site. Reload the page and try again.",
            Some("/"),
        ));
    }
    Ok((session, fields))
}

/// A mutating request on poll `id`: as [`authorized`], and the poll id.
async fn authorized_poll(
    app: &App,
    headers: &HeaderMap,
    form: Result<Form<Fields>, FormRejection>,
    id: &str,
) -> Result<(Session, Fields, i64), Response> {
    let (session, fields) = authorized(app, headers, form).await?;
    let poll = validate::id(Some(id)).ok_or_else(|| no_such_poll(app))?;
    Ok((session, fields, poll))
}

fn forget_poll(app: &App, id: i64) {
    app.polls.invalidate(&id);
    app.results.invalidate(&id);
    app.poll_list.invalidate(&());
}

/// `/metrics`, for Prometheus. With a token configured, only a request
/// carrying it (`Authorization: Bearer …`, compared in constant time) gets
/// the numbers: they show traffic and pool use to whoever reads them.
async fn metrics(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Some(token) = &app.metrics_token {
        if !bearer_matches(&headers, token) {
            let mut refused = (
                StatusCode::UNAUTHORIZED,
                "/metrics needs the scrape token: Authorization: Bearer <admin.metrics_token_file>\n",
            )
                .into_response();
            refused.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"jai-app metrics\""),
            );
            return refused;
        }
    }
    let text = app.metrics.render(&app.db.usage(), app.degraded());
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

/// True when `headers` carry `Authorization: Bearer TOKEN` for this token.
fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .is_some_and(|presented| bool::from(presented.as_bytes().ct_eq(token.as_bytes())))
}

async fn login_page(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    render_login(&app, &headers, StatusCode::OK, None)
}

fn render_login(
    app: &App,
    headers: &HeaderMap,
    status: StatusCode,
    error: Option<&str>,
) -> Response {
    let existing = http::cookie_value(headers, LOGIN_COOKIE).map(str::to_owned);
    let nonce = existing.clone().unwrap_or_else(random_token);
    let csrf = app.signer.sign(Purpose::LoginCsrf, &nonce);
    let mut response = http::html(
        status,
        Caching::NoStore,
        crate::pages::layout(
            "Admin login",
            app.degraded(),
            admin_pages::login(&csrf, error),
        ),
    );
    if existing.is_none() {
        http::set_cookie(
            &mut response,
            LOGIN_COOKIE,
            &nonce,
            3600,
            app.config.cookies.secure,
            "Strict",
        );
    }
    response
}

async fn login(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    form: Result<Form<Fields>, FormRejection>,
) -> Response {
    let fields = match http::form_fields(form) {
        Ok(fields) => fields,
        Err((status, text)) => return render_login(&app, &headers, status, Some(&text)),
    };
    let nonce = http::cookie_value(&headers, LOGIN_COOKIE).unwrap_or("");
    let csrf = fields.get("csrf").map(String::as_str).unwrap_or("");
    if nonce.is_empty() || !app.signer.verify(Purpose::LoginCsrf, nonce, csrf) {
        let text = "This form has expired. Please log in again.";
        return render_login(&app, &headers, StatusCode::FORBIDDEN, Some(text));
    }
    // The peer itself: the admin listener is not behind the proxy, so an
    // X-Forwarded-For here is whatever the client chose to write.
    let address = peer.ip().to_canonical();
    if !app.login_limit.allow(&limit_key(address), Instant::now()) {
        let text = "Too many login attempts. Wait a minute and try again.";
        return render_login(&app, &headers, StatusCode::TOO_MANY_REQUESTS, Some(text));
    }
    let username = fields.get("username").cloned().unwrap_or_default();
    let attempted_user = username.clone();
    let password = fields.get("password").cloned().unwrap_or_default();
    let hash = app.admin_hash.clone();
    let expected_user = app.config.admin.username.clone();
    // argon2 is deliberately slow: keep it off the async workers.
    let valid = tokio::task::spawn_blocking(move || {
        let password_ok = crate::auth::verify_password(&hash, &password);
        password_ok && username == expected_user
    })
    .await
    .unwrap_or(false);
    if !valid {
        // Who tried, from where, as whom (never the password). One line per
        // attempt is bounded by the login limit above.
        let attempted: String = attempted_user.chars().take(64).collect();
        tracing::warn!(client = %address, username = ?attempted, "admin login failed");
        return render_login(
            &app,
            &headers,
            StatusCode::UNAUTHORIZED,
            Some("Wrong user name or password."),
        );
    }
    let token = random_token() + &random_token();
    if let Err(error) =
        admin_store::create_session(&app.db, &token, app.config.admin.session_ttl).await
    {
        return db_failure(&app, &error);
    }
    let mut response = http::see_other("/");
    http::set_cookie(
        &mut response,
        SESSION_COOKIE,
        &token,
        app.config.admin.session_ttl.as_secs(),
        app.config.cookies.secure,
        "Strict",
    );
    response
}

async fn logout(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    form: Result<Form<Fields>, FormRejection>,
) -> Response {
    if let Err(response) = authorized(&app, &headers, form).await {
        return response;
    }
    let token = http::cookie_value(&headers, SESSION_COOKIE).unwrap_or("");
    if let Err(error) = admin_store::delete_session(&app.db, token).await {
        return db_failure(&app, &error);
    }
    let mut response = http::see_other("/login");
    http::set_cookie(
        &mut response,
        SESSION_COOKIE,
        "",
        0,
        app.config.cookies.secure,
        "Strict",
    );
    response
}

async fn dashboard(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let session = match session(&app, &headers).await {
        Ok(session) => session,
        Err(response) => return response,
    };
    match admin_store::poll_stats(&app.db).await {
        Ok(stats) => page(
            &app,
            StatusCode::OK,
            "Dashboard",
            &session.csrf,
            admin_pages::dashboard(&stats, app.operator_degraded(), &session.csrf),
        ),
        Err(error) => db_failure(&app, &error),
    }
}

async fn degraded(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    form: Result<Form<Fields>, FormRejection>,
) -> Response {
    let (_, fields) = match authorized(&app, &headers, form).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    let on = fields.get("on").map(String::as_str) == Some("1");
    if let Err(error) = admin_store::set_degraded(&app.db, on).await {
        return db_failure(&app, &error);
    }
    app.set_operator_degraded(on);
    http::see_other("/")
}

async fn new_poll_page(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let session = match session(&app, &headers).await {
        Ok(session) => session,
        Err(response) => return response,
    };
    let draft = PollDraft {
        allow_revote: true,
        ..PollDraft::default()
    };
    page(
        &app,
        StatusCode::OK,
        "New poll",
        &session.csrf,
        admin_pages::new_poll(&draft, None, &session.csrf),
    )
}

async fn create_poll(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    form: Result<Form<Fields>, FormRejection>,
) -> Response {
    let (session, fields) = match authorized(&app, &headers, form).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    let field = |name: &str| fields.get(name).map(String::as_str);
    let allow_revote = field("allow_revote") == Some("1");
    let poll = match validate::new_poll(
        field("title"),
        field("description"),
        field("options"),
        allow_revote,
    ) {
        Ok(poll) => poll,
        Err(error) => {
            let draft = PollDraft {
                title: field("title").unwrap_or(""),
                description: field("description").unwrap_or(""),
                options: field("options").unwrap_or(""),
                allow_revote,
            };
            let body = admin_pages::new_poll(&draft, Some(&error), &session.csrf);
            return page(
                &app,
                StatusCode::BAD_REQUEST,
                "New poll",
                &session.csrf,
                body,
            );
        }
    };
    match admin_store::create_poll(&app.db, &poll).await {
        Ok(id) => {
            forget_poll(&app, id);
            http::see_other(&format!("/polls/{id}"))
        }
        Err(error) => db_failure(&app, &error),
    }
}

async fn edit_page(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let session = match session(&app, &headers).await {
        Ok(session) => session,
        Err(response) => return response,
    };
    render_edit(&app, &id, &session, StatusCode::OK, None).await
}

async fn render_edit(
    app: &App,
    id: &str,
    session: &Session,
    status: StatusCode,
    error: Option<&str>,
) -> Response {
    let Some(id) = validate::id(Some(id)) else {
        return no_such_poll(app);
    };
    match store::poll_on_primary(&app.db, id).await {
        Ok(Some(poll)) => page(
            app,
            status,
            &poll.title,
            &session.csrf,
            admin_pages::edit_poll(&poll, error, &session.csrf),
        ),
        Ok(None) => no_such_poll(app),
        Err(error) => db_failure(app, &error),
    }
}

/// The outcome of an edit: back to the poll's page, or why not.
async fn after_edit(app: &App, id: i64, result: Result<bool, DbError>) -> Response {
    match result {
        Ok(true) => {
            forget_poll(app, id);
            http::see_other(&format!("/polls/{id}"))
        }
        Ok(false) => error_page(
            app,
            StatusCode::NOT_FOUND,
            "Not found",
            "There is no such poll or option.",
            Some("/"),
        ),
        Err(error) => db_failure(app, &error),
    }
}

async fn update_poll(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    form: Result<Form<Fields>, FormRejection>,
) -> Response {
    let (session, fields, poll) = match authorized_poll(&app, &headers, form, &id).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    let field = |name: &str| fields.get(name).map(String::as_str);
    let checked = validate::text("The question", field("title"), 1, 200).and_then(|title| {
        Ok((
            title,
            validate::text("The description", field("description"), 0, 2000)?,
        ))
    });
    let (title, description) = match checked {
        Ok(texts) => texts,
        Err(error) => {
            return render_edit(&app, &id, &session, StatusCode::BAD_REQUEST, Some(&error)).await
        }
    };
    let allow_revote = field("allow_revote") == Some("1");
    let result = admin_store::update_poll(&app.db, poll, &title, &description, allow_revote).await;
    after_edit(&app, poll, result).await
}

async fn open_poll(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    form: Result<Form<Fields>, FormRejection>,
) -> Response {
    let (_, fields, poll) = match authorized_poll(&app, &headers, form, &id).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    let open = fields.get("open").map(String::as_str) == Some("1");
    let result = admin_store::set_open(&app.db, poll, open).await;
    after_edit(&app, poll, result).await
}

async fn remove_option(
    State(app): State<Arc<App>>,
    Path((id, option)): Path<(String, String)>,
    headers: HeaderMap,
    form: Result<Form<Fields>, FormRejection>,
) -> Response {
    if let Err(response) = authorized(&app, &headers, form).await {
        return response;
    }
    let (Some(poll), Some(option)) = (validate::id(Some(&id)), validate::id(Some(&option))) else {
        return error_page(
            &app,
            StatusCode::NOT_FOUND,
            "Not found",
            "There is no such poll or option.",
            Some("/"),
        );
    };
    let result = admin_store::remove_option(&app.db, poll, option).await;
    after_edit(&app, poll, result).await
}

#[cfg(test)]
mod tests {
    use crate::signing::Purpose;
    use crate::state::App;
    use crate::testing::{self, loopback, request, Side, ADMIN_PASSWORD};
    use std::net::{IpAddr, SocketAddr};

    /// A login attempt as `admin` from `from` claiming to forward for `forwarded`.
    async fn login(
        app: &App,
        to: SocketAddr,
        from: IpAddr,
        forwarded: &str,
        password: &str,
    ) -> u16 {
        login_as(app, to, from, forwarded, "admin", password).await
    }

    /// A login attempt; `user` and `password` are form-encoded already.
    async fn login_as(
        app: &App,
        to: SocketAddr,
        from: IpAddr,
        forwarded: &str,
        user: &str,
        password: &str,
    ) -> u16 {
        let nonce = "a-login-cookie-nonce";
        let csrf = app.signer.sign(Purpose::LoginCsrf, nonce);
        let cookie = format!("jai_login={nonce}");
        let body = format!("csrf={csrf}&username={user}&password={password}");
        let headers = [("cookie", cookie.as_str()), ("x-forwarded-for", forwarded)];
        request(to, from, "POST", "/login", &headers, &body)
            .await
            .status
    }

    // Even with every loopback address a "trusted proxy": the admin
    // listener is not behind the proxy and never reads X-Forwarded-For.
    const TRUSTING: &str = "limits: {trusted_proxies: [127.0.0.0/8]}\n";

    #[tokio::test]
    async fn a_rotating_forwarded_for_does_not_reset_the_login_limit() {
        let _serial = LOGINS.lock().await;
        let app = testing::app(TRUSTING);
        let (admin, _stop) = testing::serve(&app, Side::Admin).await;
        let attacker = loopback(21);
        for attempt in 1..=10 {
            let forwarded = format!("203.0.113.{attempt}");
            assert_eq!(login(&app, admin, attacker, &forwarded, "guess").await, 401);
        }
        let status = login(&app, admin, attacker, "203.0.113.99", ADMIN_PASSWORD).await;
        assert_eq!(status, 429, "the 11th attempt of one address got through");
    }

    /// Held by each test that logs in: tracing caches whether a log line's
    /// call site is wanted, and a test hitting the failed-login line on
    /// another thread while the capturing test installs its subscriber can
    /// cache "not wanted" and hide the line from it.
    static LOGINS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// Everything logged on this thread while `run` runs.
    async fn logged<F: std::future::Future<Output = ()>>(run: F) -> String {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        run.await;
        let text = String::from_utf8_lossy(&buffer.0.lock().unwrap()).into_owned();
        text
    }

    #[tokio::test]
    async fn a_failed_login_is_logged_with_address_and_user_never_the_password() {
        let _serial = LOGINS.lock().await;
        let app = testing::app("");
        let (admin, _stop) = testing::serve(&app, Side::Admin).await;
        let log = logged(async {
            let user = "mallory%0AFAKE+entry";
            let status = login_as(&app, admin, loopback(51), "", user, "s3cret-guess").await;
            assert_eq!(status, 401);
        })
        .await;
        let line = log
            .lines()
            .find(|line| line.contains("admin login failed"))
            .unwrap_or_else(|| panic!("no failed-login line in:\n{log}"));
        assert!(line.contains("client=127.0.0.51"), "{line}");
        assert!(line.contains(r#"username="mallory\nFAKE entry""#), "{line}");
        assert!(
            !log.contains("s3cret-guess"),
            "the password was logged:\n{log}"
        );
        assert!(
            !log.lines().any(|line| line.starts_with("FAKE")),
            "a user name forged a log line:\n{log}"
        );
    }

    #[tokio::test]
    async fn a_spoofed_forwarded_for_does_not_lock_the_admin_out() {
        let _serial = LOGINS.lock().await;
        let app = testing::app(TRUSTING);
        let (admin, _stop) = testing::serve(&app, Side::Admin).await;
        let (attacker, real_admin) = (loopback(22), loopback(1));
        for _ in 0..12 {
            login(&app, admin, attacker, "127.0.0.1", "guess").await;
        }
        assert_eq!(
            login(&app, admin, attacker, "127.0.0.1", "guess").await,
            429
        );
        // The admin's own address was not charged: a wrong password is
        // answered as such, not with "too many attempts".
        assert_eq!(login(&app, admin, real_admin, "", "typo").await, 401);
    }
}
