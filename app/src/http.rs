//! Small HTTP helpers both listeners use: HTML responses with their cache
//! policy, the security headers of every answer, cookies and form bodies.

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Request};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use maud::Markup;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::LazyLock;

/// A form body as name → value (the last of repeated names wins).
pub type Fields = HashMap<String, String>;

/// How a response may be cached (Cloudflare and browsers).
#[derive(Debug, Clone, Copy)]
pub enum Caching {
    /// Same for everyone: cacheable for this many seconds.
    Public(u64),
    /// Per visitor (carries a CSRF token or counts a view): browser only, revalidated.
    Private,
    /// Never stored: votes, errors, admin pages.
    NoStore,
}

impl Caching {
    fn header(self) -> HeaderValue {
        match self {
            Caching::Public(seconds) => {
                HeaderValue::from_str(&format!("public, max-age={seconds}, s-maxage={seconds}"))
                    .expect("ASCII header")
            }
            Caching::Private => HeaderValue::from_static("private, no-cache"),
            Caching::NoStore => HeaderValue::from_static("no-store"),
        }
    }
}

/// An HTML page (the security headers are added by [`security_headers`]).
pub fn html(status: StatusCode, caching: Caching, body: Markup) -> Response {
    let mut response = (status, axum::response::Html(body.into_string())).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, caching.header());
    response
}

/// `'sha256-…'`: the CSP source that allows one inline element's text.
fn csp_hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// The Content-Security-Policy of every answer: nothing may load but this
/// origin's images; the one inline script (the results page's reload) and
/// the one inline style run only by their hashes, so markup injected
/// despite the escaping could run no script; forms post only here; no
/// framing, no `<base>`.
pub static CONTENT_SECURITY_POLICY: LazyLock<HeaderValue> = LazyLock::new(|| {
    let policy = format!(
        "default-src 'none'; script-src {script}; style-src {style}; img-src 'self'; \
         form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        script = csp_hash(crate::pages::RELOAD_SCRIPT),
        style = csp_hash(crate::pages::STYLE),
    );
    HeaderValue::from_str(&policy).expect("ASCII policy")
});

/// Middleware, outermost on both listeners: every answer, whatever made it
/// (a handler, a refused extractor, axum's own 404 / 405 / 413), gets the
/// security headers, and every error answer (and one that set no caching)
/// `Cache-Control: no-store`.
pub async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let status = response.status();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        CONTENT_SECURITY_POLICY.clone(),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if status.is_client_error()
        || status.is_server_error()
        || !headers.contains_key(header::CACHE_CONTROL)
    {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// A 303 redirect (after a successful form post).
pub fn see_other(location: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::LOCATION,
        HeaderValue::from_str(location).expect("locations are built from ids"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Adds a `Set-Cookie` header with the attributes every jai cookie has
/// (`Path=/`, `HttpOnly`, the given `SameSite`, `Secure` when configured).
pub fn set_cookie(
    response: &mut Response,
    name: &str,
    value: &str,
    max_age_secs: u64,
    secure: bool,
    same_site: &str,
) {
    let cookie = format!(
        "{name}={value}; Path=/; Max-Age={max_age_secs}; HttpOnly; SameSite={same_site}{}",
        if secure { "; Secure" } else { "" }
    );
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
}

/// The value of cookie `name` in the request.
pub fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// Why a form body was refused, as a status and a sentence.
pub fn form_fields(
    form: Result<Form<Fields>, FormRejection>,
) -> Result<Fields, (StatusCode, String)> {
    match form {
        Ok(Form(fields)) => Ok(fields),
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            "This request is too large.".into(),
        )),
        Err(FormRejection::InvalidFormContentType(_)) => Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Forms must be sent as application/x-www-form-urlencoded.".into(),
        )),
        Err(_) => Err((
            StatusCode::BAD_REQUEST,
            "This form could not be read. Reload the page and try again.".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; jai_voter=x.y; b=2"),
        );
        assert_eq!(cookie_value(&headers, "jai_voter"), Some("x.y"));
        assert_eq!(cookie_value(&headers, "jai"), None);
    }

    #[test]
    fn the_policy_allows_exactly_the_inline_script_and_style_the_pages_carry() {
        use crate::store::{Poll, PollOption, Results};
        let option = PollOption {
            id: 1,
            label: "Tea".into(),
            removed: false,
        };
        let poll = Poll {
            id: 1,
            title: "Tea?".into(),
            description: String::new(),
            is_open: true,
            allow_revote: true,
            options: vec![option.clone()],
        };
        let results = Results {
            poll,
            counts: vec![(option, 1)],
            total: 1,
        };
        let page =
            crate::pages::layout("t", false, crate::pages::results(&results, None)).into_string();
        let policy = CONTENT_SECURITY_POLICY.to_str().unwrap();
        for (element, text) in [
            ("script", crate::pages::RELOAD_SCRIPT),
            ("style", crate::pages::STYLE),
        ] {
            assert!(
                page.contains(&format!("<{element}>{text}</{element}>")),
                "the page's {element} is not the hashed text"
            );
            assert!(policy.contains(&csp_hash(text)), "{policy}");
            assert_eq!(page.matches(&format!("<{element}")).count(), 1, "{element}");
        }
        assert!(policy.starts_with("default-src 'none'; "), "{policy}");
        assert!(!policy.contains("unsafe"), "{policy}");
    }

    #[tokio::test]
    async fn every_answer_has_the_security_headers_and_errors_are_not_stored() {
        use crate::testing::{self, loopback, request, Side};
        let app = testing::app("limits: {body_bytes: 1024}\n");
        let (public, _stop_public) = testing::serve(&app, Side::Public).await;
        let (admin, _stop_admin) = testing::serve(&app, Side::Admin).await;
        let big = format!("pad={}", "x".repeat(4096));
        let cases = [
            (public, "GET", "/no/such/page", "", 404),
            (public, "GET", "/polls/1/vote", "", 405),
            (public, "DELETE", "/", "", 405),
            (public, "POST", "/polls/1/vote", big.as_str(), 413),
            (public, "GET", "/", "", 503),
            (public, "GET", "/healthz", "", 200),
            (admin, "GET", "/no/such/page", "", 404),
            (admin, "GET", "/logout", "", 405),
            (admin, "GET", "/login", "", 200),
            (admin, "GET", "/metrics", "", 200),
        ];
        for (to, method, path, body, status) in cases {
            let answer = request(to, loopback(1), method, path, &[], body).await;
            let what = format!("{method} {path}");
            assert_eq!(answer.status, status, "{what}: {}", answer.body);
            assert_eq!(
                answer.header("content-security-policy"),
                CONTENT_SECURITY_POLICY.to_str().ok(),
                "{what}"
            );
            assert_eq!(
                answer.header("referrer-policy"),
                Some("same-origin"),
                "{what}"
            );
            assert_eq!(
                answer.header("x-content-type-options"),
                Some("nosniff"),
                "{what}"
            );
            assert_eq!(answer.header("x-frame-options"), Some("DENY"), "{what}");
            assert_eq!(answer.header("cache-control"), Some("no-store"), "{what}");
            if status == 404 || status == 405 {
                assert!(answer.body.contains("<h1>Not"), "{what}: {}", answer.body);
            }
            if status == 405 {
                assert!(answer.header("allow").is_some(), "{what}: no Allow");
            }
        }
    }
}
