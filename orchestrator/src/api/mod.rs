//! The HTTP API (JSON under `/v1`). `router` builds the app so tests can call it in-process.
//!
//! Routes are registered through utoipa-axum's `OpenApiRouter`, so the OpenAPI document
//! (`GET /openapi.json`) is generated from the same handlers the router serves.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Extension};
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::{Router, middleware};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::{ApiToken, Config, DEFAULT_BODY_LIMIT, DEFAULT_HTTP_BODY_TIMEOUT, Role};
use crate::engine::Engine;

pub mod auth;
pub mod body;
pub mod dead_letters;
pub mod definitions;
pub mod error;
pub mod health;
pub mod metrics;
pub mod observe;
pub mod participants;
pub mod sagas;
pub mod signals;
pub mod stuck;

pub use auth::{Auth, Caller};
pub use error::{ApiError, ErrorBody};

/// Default largest accepted request body (`SAGAS_BODY_LIMIT` changes it).
pub const BODY_LIMIT: usize = DEFAULT_BODY_LIMIT;

/// How the HTTP API is served.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// Accepted bearer tokens; empty: no authentication (loopback only, see
    /// [`Config::check`]).
    pub tokens: Vec<ApiToken>,
    /// Largest accepted request body in bytes.
    pub body_limit: usize,
    /// Time to send a whole request body once a handler reads it (408 after).
    pub body_timeout: Duration,
}

impl Default for ApiOptions {
    fn default() -> Self {
        ApiOptions {
            tokens: Vec::new(),
            body_limit: BODY_LIMIT,
            body_timeout: DEFAULT_HTTP_BODY_TIMEOUT,
        }
    }
}

impl ApiOptions {
    /// The options a process configuration asks for (the body timeout is an
    /// [`crate::config::HttpLimits`] setting: the default here).
    pub fn from_config(config: &Config) -> ApiOptions {
        ApiOptions {
            tokens: config.api_tokens.clone(),
            body_limit: config.body_limit,
            ..ApiOptions::default()
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sagas orchestrator",
        description = "Start, wait for, inspect, list and operate saga/TCC transactions. \
            Errors are always {\"error\": \"<code>\", \"message\": \"<sentence>\"}.",
    ),
    modifiers(&BearerScheme),
    tags(
        (name = "sagas", description = "Start and inspect transactions"),
        (name = "operator", description = "Operator actions, recorded in the log with actor and reason, and the dead letters"),
        (name = "definitions", description = "What this orchestrator can run, and definition documents registered at run time"),
        (name = "health", description = "Probes and metrics; no token needed"),
    ),
)]
struct ApiDoc;

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token from SAGAS_API_TOKENS: `read` for GETs, `operate` to start, \
                         for operator actions and for signals",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document a server serves, as JSON text.
#[derive(Debug, Clone)]
struct Served(Arc<str>);

/// `GET /openapi.json`: this API's OpenAPI document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "health",
    operation_id = "openapi",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object)),
)]
async fn openapi_json(Extension(Served(json)): Extension<Served>) -> impl IntoResponse {
    ([(CONTENT_TYPE, "application/json")], json.to_string())
}

/// Every route with its OpenAPI description, the guarded ones behind their role.
fn routes(auth: Arc<Auth>) -> OpenApiRouter<Arc<Engine>> {
    let guard = |needs: Role| {
        middleware::from_fn_with_state(
            auth::Guard {
                auth: auth.clone(),
                needs,
            },
            auth::guard,
        )
    };
    let read = OpenApiRouter::new()
        .routes(routes!(sagas::list))
        .routes(routes!(sagas::get))
        .routes(routes!(sagas::events))
        .routes(routes!(definitions::list))
        .routes(routes!(definitions::get))
        .routes(routes!(dead_letters::list))
        .routes(routes!(stuck::stuck))
        .routes(routes!(participants::participants))
        .route_layer(guard(Role::Read));
    let operate = OpenApiRouter::new()
        .routes(routes!(sagas::start))
        .routes(routes!(sagas::abort))
        .routes(routes!(sagas::retry))
        .routes(routes!(sagas::resolve))
        .routes(routes!(signals::signal))
        .routes(routes!(dead_letters::requeue))
        .routes(routes!(dead_letters::drop))
        .routes(routes!(definitions::register))
        .route_layer(guard(Role::Operate));
    let open = OpenApiRouter::new()
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(metrics::metrics))
        .routes(routes!(openapi_json));
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(read)
        .merge(operate)
        .merge(open)
}

/// The OpenAPI document of the API, generated from the handlers (as served with tokens).
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes(Arc::new(Auth::default())).into_openapi()
}

/// The OpenAPI document a server with `options` serves. Without tokens no operation asks for
/// one, and none answers 401 or 403.
pub fn openapi_for(options: &ApiOptions) -> serde_json::Value {
    let mut doc = serde_json::to_value(openapi()).expect("the OpenAPI document serializes");
    if options.tokens.is_empty() {
        let operations = doc["paths"]
            .as_object_mut()
            .into_iter()
            .flat_map(|paths| paths.values_mut())
            .filter_map(|item| item.as_object_mut())
            .flat_map(|item| item.values_mut())
            .filter_map(|operation| operation.as_object_mut());
        for operation in operations {
            operation.remove("security");
            if let Some(responses) = operation
                .get_mut("responses")
                .and_then(|r| r.as_object_mut())
            {
                responses.remove("401");
                responses.remove("403");
            }
        }
        if let Some(components) = doc["components"].as_object_mut() {
            components.remove("securitySchemes");
        }
    }
    doc
}

/// The HTTP application over `engine`, unauthenticated, with the default body limit (for
/// tests and embedding on loopback; servers use [`router_with`]).
pub fn router(engine: Arc<Engine>) -> Router {
    router_with(engine, ApiOptions::default())
}

/// The HTTP application over `engine` with `options`.
pub fn router_with(engine: Arc<Engine>, options: ApiOptions) -> Router {
    // Installs the process's recorder before anything is counted.
    let _ = metrics::handle();
    let served = serde_json::to_string_pretty(&openapi_for(&options))
        .expect("the OpenAPI document serializes");
    let limits = body::BodyLimits {
        limit: options.body_limit,
        timeout: options.body_timeout,
    };
    let auth = Arc::new(Auth::new(options.tokens));
    let (router, _) = routes(auth.clone()).split_for_parts();
    // The web console: same port, same tokens (none of its pages is in the OpenAPI document).
    #[cfg(feature = "console")]
    let router = router.merge(crate::console::router(auth));
    #[cfg(not(feature = "console"))]
    drop(auth);
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(Extension(Served(served.into())))
        .layer(DefaultBodyLimit::max(options.body_limit))
        .layer(middleware::from_fn_with_state(limits, body::limit_body))
        .layer(middleware::from_fn(observe::observe))
        .with_state(engine)
}

async fn not_found() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        "unknown_route",
        "no such route; GET /openapi.json lists them",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}
