//! Who uses the console: a token, entered once on `/ui/login`, kept in a cookie, and checked on
//! every request as the API checks a bearer token ([`Auth::caller_of`]); and requests that
//! change something accepted only from the console's own pages.

use std::sync::Arc;

use axum::Form;
use axum::extract::{Extension, Query, Request, State};
use axum::http::header::{COOKIE, HOST, LOCATION, ORIGIN, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::Deserialize;

use super::{Failure, layout};
use crate::api::{ApiError, Auth, Caller};
use crate::config::Role;

/// The cookie that carries the token (hex-encoded: a token may hold characters a cookie
/// value may not).
pub const COOKIE_NAME: &str = "sagas_console";

/// The token a request presents: the console's cookie, else an `Authorization: Bearer`
/// header (for scripts that read pages).
fn presented(auth: &Auth, headers: &HeaderMap) -> Option<Caller> {
    if !auth.enabled() {
        return auth.caller(headers).ok();
    }
    match cookie(headers, COOKIE_NAME).and_then(|v| unhex(&v)) {
        Some(token) => auth.caller_of(&token),
        None => auth.caller(headers).ok(),
    }
}

/// The value of the cookie `name` in the request's `Cookie` headers.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.to_owned())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Whether a request that changes something comes from a page of this origin: the browser's
/// `Sec-Fetch-Site` says `same-origin`, or, from a browser that does not send it, `Origin`
/// names the host the request was sent to. A request with neither is refused: scripts use the
/// API.
pub fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        return site.as_bytes() == b"same-origin";
    }
    let (Some(origin), Some(host)) = (headers.get(ORIGIN), headers.get(HOST)) else {
        return false;
    };
    let (Ok(origin), Ok(host)) = (origin.to_str(), host.to_str()) else {
        return false;
    };
    origin.split_once("://").is_some_and(|(scheme, rest)| {
        matches!(scheme, "http" | "https") && rest.eq_ignore_ascii_case(host)
    })
}

/// Whether the browser reached the console over TLS, as far as the server can know: the page's
/// `Origin` is `https`, or the proxy in front says so (`X-Forwarded-Proto: https`).
fn over_tls(headers: &HeaderMap) -> bool {
    let origin_tls = headers
        .get(ORIGIN)
        .is_some_and(|o| o.as_bytes().starts_with(b"https://"));
    let forwarded_tls = headers
        .get("x-forwarded-proto")
        .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"https"));
    origin_tls || forwarded_tls
}

/// The `Set-Cookie` value that keeps `token` (`None`: that forgets it).
fn set_cookie(token: Option<&[u8]>, secure: bool) -> HeaderValue {
    let value = match token {
        Some(t) => format!("{COOKIE_NAME}={}", hex(t)),
        None => format!("{COOKIE_NAME}=; Max-Age=0"),
    };
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{value}; Path={}; HttpOnly; SameSite=Strict{secure}",
        super::BASE
    ))
    .expect("hex digits and attributes make a valid header value")
}

fn see_other(to: &str) -> Response {
    let location = HeaderValue::from_str(to).unwrap_or(HeaderValue::from_static(super::BASE));
    (StatusCode::SEE_OTHER, [(LOCATION, location)]).into_response()
}

/// Middleware of the console's pages: without a valid token, a page sends the browser to the
/// login page (a form post is refused); a post from another origin is refused; otherwise the
/// request goes on with its [`Caller`].
pub async fn guard(State(auth): State<Arc<Auth>>, mut request: Request, next: Next) -> Response {
    let posted = request.method() == Method::POST;
    if posted && !same_origin(request.headers()) {
        return cross_origin();
    }
    let Some(caller) = presented(&auth, request.headers()) else {
        if posted {
            return Failure(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "log in first: this session has no valid token",
            ))
            .into_response();
        }
        let back = request
            .uri()
            .path_and_query()
            .map_or(super::BASE, |p| p.as_str());
        let to = format!("/ui/login?next={}", encode_component(back));
        return see_other(&to);
    };
    request.extensions_mut().insert(caller);
    next.run(request).await
}

fn cross_origin() -> Response {
    Failure(ApiError::new(
        StatusCode::FORBIDDEN,
        "cross_origin",
        "this form was not sent from a console page (Origin and Sec-Fetch-Site must be this \
         origin's)",
    ))
    .into_response()
}

/// `next` as a query value: everything but unreserved characters percent-encoded.
fn encode_component(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Where to go after logging in: a console path only (never another site).
fn next_page(next: Option<&str>) -> &str {
    match next {
        Some(n)
            if (n == super::BASE || n.starts_with("/ui/") || n.starts_with("/ui?"))
                && !n.contains("//")
                && !n.contains('\\') =>
        {
            n
        }
        _ => super::BASE,
    }
}

/// Query of the login page.
#[derive(Debug, Default, Deserialize)]
pub struct LoginQuery {
    /// The page to show after logging in.
    pub next: Option<String>,
}

/// The login form.
#[derive(Debug, Deserialize)]
pub struct LoginForm {
    /// The token.
    pub token: String,
    /// The page to show after logging in.
    #[serde(default)]
    pub next: Option<String>,
}

fn login_page(auth: &Auth, next: &str, error: Option<&str>) -> Markup {
    let body = html! {
        @if let Some(e) = error { p.alert.error { (e) } }
        @if auth.enabled() {
            form.login method="post" action="/ui/login" {
                input type="hidden" name="next" value=(next);
                label for="token" { "API token" }
                input #token type="password" name="token" required autocomplete="current-password" autofocus;
                p.hint {
                    "A token from SAGAS_API_TOKENS. It is kept in a cookie of this console \
                     only (HttpOnly, SameSite=Strict) until you log out or close the browser. "
                    "A read token can look; operator actions need an operate token."
                }
                button type="submit" { "Log in" }
            }
        } @else {
            p {
                "No tokens are configured (SAGAS_API_TOKENS is empty): the console, like the \
                 API, is served on loopback only and needs no login. "
                a href=(next) { "Open the console" }
            }
        }
    };
    layout::page("Log in", None, body)
}

/// `GET /ui/login`.
pub async fn login_form(
    Extension(auth): Extension<Arc<Auth>>,
    Query(query): Query<LoginQuery>,
) -> Markup {
    login_page(&auth, next_page(query.next.as_deref()), None)
}

/// `POST /ui/login`: a valid token is kept in the cookie and the browser sent on; another one
/// shows the form again (401).
pub async fn login(
    Extension(auth): Extension<Arc<Auth>>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    if !same_origin(&headers) {
        return cross_origin();
    }
    let next = next_page(form.next.as_deref());
    let token = form.token.trim().as_bytes();
    if auth.enabled() && auth.caller_of(token).is_none() {
        let page = login_page(&auth, next, Some("That token is not valid."));
        return super::with_status(StatusCode::UNAUTHORIZED, page);
    }
    let mut response = see_other(next);
    if auth.enabled() {
        response
            .headers_mut()
            .insert(SET_COOKIE, set_cookie(Some(token), over_tls(&headers)));
    }
    response
}

/// `POST /ui/logout`: forgets the token.
pub async fn logout(headers: HeaderMap) -> Response {
    let mut response = see_other("/ui/login");
    response
        .headers_mut()
        .insert(SET_COOKIE, set_cookie(None, over_tls(&headers)));
    response
}

/// Whether `caller` may use the operator actions.
pub fn may_operate(caller: &Caller) -> bool {
    caller.role.allows(Role::Operate)
}

/// The refusal of an operator action to `caller`, who may not ([`may_operate`]).
pub fn forbidden(caller: &Caller) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!(
            "operator actions need a token with the operate role; this one has {}",
            caller.role.as_str()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_str(value).unwrap());
        }
        h
    }

    #[test]
    fn a_post_is_same_origin_when_the_browser_says_so_or_its_origin_is_the_host() {
        assert!(same_origin(&headers(&[("sec-fetch-site", "same-origin")])));
        for site in ["cross-site", "same-site", "none"] {
            let h = headers(&[
                ("sec-fetch-site", site),
                ("origin", "http://a:1"),
                ("host", "a:1"),
            ]);
            assert!(!same_origin(&h), "{site}");
        }
        assert!(same_origin(&headers(&[
            ("origin", "http://127.0.0.1:8080"),
            ("host", "127.0.0.1:8080")
        ])));
        assert!(same_origin(&headers(&[
            ("origin", "https://Sagas.example"),
            ("host", "sagas.example")
        ])));
        for (origin, host) in [
            ("http://evil.example", "sagas.example"),
            ("http://sagas.example:81", "sagas.example"),
            ("null", "sagas.example"),
            ("ftp://sagas.example", "sagas.example"),
        ] {
            assert!(
                !same_origin(&headers(&[("origin", origin), ("host", host)])),
                "{origin}"
            );
        }
        assert!(!same_origin(&headers(&[("host", "sagas.example")])));
    }

    #[test]
    fn the_cookie_keeps_any_token_and_is_http_only_strict_and_secure_over_tls() {
        let token = b"tok;en=\"with\\odd,chars";
        let value = set_cookie(Some(token), false);
        let value = value.to_str().unwrap();
        assert!(
            value.ends_with("; Path=/ui; HttpOnly; SameSite=Strict"),
            "{value}"
        );
        let sent = value.split(';').next().unwrap();
        let h = headers(&[("cookie", &format!("other=1; {sent}"))]);
        assert_eq!(
            cookie(&h, COOKIE_NAME).and_then(|v| unhex(&v)).unwrap(),
            token
        );
        assert!(
            set_cookie(Some(token), true)
                .to_str()
                .unwrap()
                .ends_with("; Secure")
        );
        assert!(
            set_cookie(None, false)
                .to_str()
                .unwrap()
                .contains("Max-Age=0")
        );
        assert!(over_tls(&headers(&[("origin", "https://sagas.example")])));
        assert!(over_tls(&headers(&[("x-forwarded-proto", "HTTPS")])));
        assert!(!over_tls(&headers(&[("origin", "http://sagas.example")])));
    }

    #[test]
    fn after_login_the_browser_goes_to_a_console_page_only() {
        assert_eq!(
            next_page(Some("/ui/transactions?status=stuck")),
            "/ui/transactions?status=stuck"
        );
        assert_eq!(next_page(Some("/ui")), "/ui");
        for bad in [
            "https://evil.example",
            "//evil.example",
            "/uix",
            "/ui//evil",
            "/v1/sagas",
            "/ui/\\x",
        ] {
            assert_eq!(next_page(Some(bad)), "/ui", "{bad}");
        }
        assert_eq!(next_page(None), "/ui");
        assert_eq!(encode_component("/ui?a=b&c"), "/ui%3Fa%3Db%26c");
    }
}
