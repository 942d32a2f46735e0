//! Small HTTP helpers both listeners use: HTML responses with their cache
//! policy, cookies and form bodies.

use axum::extract::rejection::FormRejection;
use axum::extract::Form;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::Markup;
use std::collections::HashMap;

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

/// An HTML page.
pub fn html(status: StatusCode, caching: Caching, body: Markup) -> Response {
    let mut response = (status, axum::response::Html(body.into_string())).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, caching.header());
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
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
}
