//! The web console at `/ui`: server-rendered pages over the same engine, port and tokens as
//! the HTTP API. Pages are [`maud`] templates (escaped by construction); the only asset is a
//! style sheet compiled into the binary; there is no script.
//!
//! - `/ui`: the overview (open instances now, the last hour minute by minute, latencies, the
//!   stuck transactions grouped by cause and listed, the oldest open ones);
//! - `/ui/transactions`: the list with its filters, keyset-paged as `GET /v1/sagas`;
//! - `/ui/transactions/{id}`: one transaction, its steps' attempts, its log, and the operator
//!   actions (forms for an `operate` token) beside what is still in flight;
//! - `/ui/dead-letters`: the dead-letter queue, with a requeue and a drop form per message;
//! - `/ui/definitions`: what this orchestrator runs;
//! - `/ui/login`, `/ui/logout`: a token kept in a cookie ([`session`]).

use std::sync::Arc;

use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, middleware};
use maud::html;

use crate::api::{ApiError, Auth};
use crate::engine::{Engine, EngineError};

mod dead_letters;
mod definitions;
mod layout;
mod overview;
pub mod session;
mod timeline;
mod transaction;
mod transactions;

/// Where the console is served.
pub const BASE: &str = "/ui";

/// The style sheet, compiled in.
const CSS: &str = include_str!("console.css");

/// The console's routes, `/ui` and below, behind [`session::guard`] but for the login page
/// and the style sheet.
pub fn router(auth: Arc<Auth>) -> Router<Arc<Engine>> {
    let guarded = Router::new()
        .route("/ui", get(overview::page))
        .route("/ui/transactions", get(transactions::page))
        .route("/ui/transactions/{id}", get(transaction::page))
        .route("/ui/transactions/{id}/{action}", post(transaction::act))
        .route("/ui/dead-letters", get(dead_letters::page))
        .route("/ui/dead-letters/{id}/{action}", post(dead_letters::act))
        .route("/ui/definitions", get(definitions::page))
        .route("/ui/logout", post(session::logout))
        .route("/ui/{*rest}", get(not_found))
        .route_layer(middleware::from_fn_with_state(auth.clone(), session::guard));
    let open = Router::new()
        .route("/ui/login", get(session::login_form).post(session::login))
        .route("/ui/console.css", get(css))
        .layer(axum::Extension(auth));
    guarded.merge(open).layer(middleware::map_response(harden))
}

/// Headers on every console answer: not cached (pages show live state and are per caller),
/// not framed, and nothing loaded or submitted but from the console itself.
async fn harden(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        HeaderName::from_static("referrer-policy"),
        HeaderValue::from_static("same-origin"),
    );
    response
}

async fn css() -> Response {
    ([(CONTENT_TYPE, "text/css; charset=utf-8")], CSS).into_response()
}

async fn not_found() -> Failure {
    Failure(ApiError::not_found("no such page"))
}

/// A page that could not be shown: the API's error (status and sentence) as an HTML page.
#[derive(Debug)]
pub struct Failure(pub ApiError);

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Failure {
        Failure(e)
    }
}

impl From<EngineError> for Failure {
    fn from(e: EngineError) -> Failure {
        Failure(e.into())
    }
}

impl From<crate::store::StoreError> for Failure {
    fn from(e: crate::store::StoreError) -> Failure {
        Failure(EngineError::from(e).into())
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = self.0.status();
        let title = status.canonical_reason().unwrap_or("Error");
        let body = html! { p.alert.error { (self.0.message()) } };
        (status, layout::page(title, None, body)).into_response()
    }
}

/// A page answered with a status of its own.
pub(crate) fn with_status(status: StatusCode, page: maud::Markup) -> Response {
    (status, page).into_response()
}
