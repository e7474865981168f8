//! `/v1/definitions`: the definitions this orchestrator runs, and definition documents
//! registered at run time (docs/definitions.md).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::ApiError;
use super::body::JsonBody;
use crate::definition::{Definition, RetryPolicy, Source};
use crate::engine::Engine;

/// One step of a definition as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StepDefinitionView {
    /// Step name.
    pub name: String,
    /// The participant that executes it (empty for a wait step).
    pub participant: String,
    /// The signal a wait step waits for; absent for a step a participant executes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// How long one attempt waits for its reply (a wait step, for its signal).
    pub timeout_ms: u64,
    /// How long a step that answered `in_progress` may take before it counts as timed out.
    pub in_progress_timeout_ms: u64,
    /// Retry policy of the forward operation (`action` / `try`).
    #[schema(value_type = Object)]
    pub retry: RetryPolicy,
    /// Retry policy of `compensate` / `confirm` / `cancel`.
    #[schema(value_type = Object)]
    pub finish_retry: RetryPolicy,
}

/// A registered definition as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DefinitionView {
    /// Name.
    pub name: String,
    /// Version.
    pub version: u32,
    /// `saga` or `tcc`.
    pub mode: String,
    /// Whether `POST /v1/sagas/{name}` starts this version.
    pub latest: bool,
    /// `code` (compiled into an orchestrator) or `document` (registered as data).
    pub kind: String,
    /// The plan's fingerprint: equal for equal plans (steps, participants, mode, policies,
    /// timeouts, dependencies).
    pub fingerprint: String,
    /// A document's content hash (`sha256:` and the hex digest of its canonical JSON); none for
    /// code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_hash: Option<String>,
    /// Steps in order.
    pub steps: Vec<StepDefinitionView>,
    /// The document, as JSON (only in the answer about one definition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub document: Option<Value>,
}

/// Answer of `GET /v1/definitions`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Definitions {
    /// Every registered definition, by name then version.
    pub items: Vec<DefinitionView>,
}

impl DefinitionView {
    /// The view of a definition.
    pub fn of(def: &Definition, latest: bool) -> DefinitionView {
        let plan = def.plan();
        let (kind, content_hash) = match def.source() {
            Source::Code => ("code", None),
            Source::Document { hash, .. } => ("document", Some(hash.clone())),
        };
        DefinitionView {
            name: plan.name.clone(),
            version: plan.version,
            mode: plan.mode.as_str().to_owned(),
            latest,
            kind: kind.to_owned(),
            fingerprint: plan.fingerprint().to_string(),
            content_hash,
            document: None,
            steps: plan
                .steps
                .iter()
                .map(|s| StepDefinitionView {
                    name: s.name.clone(),
                    participant: s.participant.clone(),
                    signal: s.signal.clone(),
                    timeout_ms: s.timeout_ms,
                    in_progress_timeout_ms: s.in_progress_timeout_ms,
                    retry: s.retry,
                    finish_retry: s.finish_retry,
                })
                .collect(),
        }
    }
}

impl DefinitionView {
    /// The view of `def` with its document, in a registry where `latest` is its newest version.
    fn whole(def: &Definition, latest: Option<Definition>) -> DefinitionView {
        let latest = latest.is_some_and(|l| l.version() == def.version());
        let document = match def.source() {
            Source::Code => None,
            Source::Document { document, .. } => Some((**document).clone()),
        };
        DefinitionView {
            document,
            ..DefinitionView::of(def, latest)
        }
    }
}

/// `GET /v1/definitions`: every registered definition and version.
#[utoipa::path(
    get,
    path = "/v1/definitions",
    tag = "definitions",
    operation_id = "definitions",
    responses(
        (status = 200, description = "Every registered definition", body = Definitions),
        (status = 401, description = "No valid token", body = super::ErrorBody),
        (status = 503, description = "`unavailable` (the store, where other processes' documents are read)", body = super::ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub async fn list(State(engine): State<Arc<Engine>>) -> Result<Json<Definitions>, ApiError> {
    // With what other processes registered since the last look.
    engine.load_definitions(None).await?;
    let registry = engine.registry();
    let items = registry
        .iter()
        .map(|d| {
            let latest = registry
                .latest(d.name())
                .is_some_and(|l| l.version() == d.version());
            DefinitionView::of(&d, latest)
        })
        .collect();
    Ok(Json(Definitions { items }))
}

/// `GET /v1/definitions/{name}/versions/{version}`: one definition, with its document.
#[utoipa::path(
    get,
    path = "/v1/definitions/{name}/versions/{version}",
    tag = "definitions",
    operation_id = "definition",
    params(
        ("name" = String, Path, description = "The definition's name"),
        ("version" = u32, Path, description = "Its version"),
    ),
    responses(
        (status = 200, description = "The definition (with its document if it was registered as one)", body = DefinitionView),
        (status = 400, description = "`malformed_path`", body = super::ErrorBody),
        (status = 401, description = "No valid token", body = super::ErrorBody),
        (status = 404, description = "`unknown_definition`", body = super::ErrorBody),
        (status = 503, description = "`unavailable` (the store, where other processes' documents are read)", body = super::ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub async fn get(
    State(engine): State<Arc<Engine>>,
    path: Result<Path<(String, u32)>, axum::extract::rejection::PathRejection>,
) -> Result<Json<DefinitionView>, ApiError> {
    let Path((name, version)) = path?;
    let def = engine
        .find_definition(&name, Some(version))
        .await?
        .ok_or_else(|| {
            crate::engine::EngineError::UnknownDefinition(format!("{name} v{version}"))
        })?;
    Ok(Json(DefinitionView::whole(
        &def,
        engine.registry().latest(&name),
    )))
}

/// `PUT /v1/definitions/{name}/versions/{version}`: registers a definition document (its name
/// and version must be the path's). A name and version is one document for good: the same
/// document again is accepted (200), another one refused (409).
#[utoipa::path(
    put,
    path = "/v1/definitions/{name}/versions/{version}",
    tag = "definitions",
    operation_id = "register_definition",
    params(
        ("name" = String, Path, description = "The definition's name, as the document says"),
        ("version" = u32, Path, description = "Its version, as the document says"),
    ),
    request_body(content = Object, content_type = "application/json", description = "The definition document as JSON (docs/definitions.md); `sagactl definitions apply` converts YAML"),
    responses(
        (status = 201, description = "Registered: the definition", body = DefinitionView),
        (status = 200, description = "The same document was registered before: the definition", body = DefinitionView),
        (status = 400, description = "`invalid_definition` (what is wrong and where in the document), `malformed_body`, `invalid_body` or `malformed_path`", body = super::ErrorBody),
        (status = 401, description = "No valid token", body = super::ErrorBody),
        (status = 403, description = "The token's role is `read`", body = super::ErrorBody),
        (status = 409, description = "`definition_conflict`: another definition is registered under this name and version", body = super::ErrorBody),
        (status = 413, description = "`body_too_large`", body = super::ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = super::ErrorBody),
        (status = 503, description = "`unavailable`", body = super::ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub async fn register(
    State(engine): State<Arc<Engine>>,
    path: Result<Path<(String, u32)>, axum::extract::rejection::PathRejection>,
    body: Result<JsonBody<Value>, ApiError>,
) -> Result<(StatusCode, Json<DefinitionView>), ApiError> {
    let Path((name, version)) = path?;
    let JsonBody(document) = body?;
    let says = (
        document.get("name").and_then(Value::as_str),
        document.get("version").and_then(Value::as_u64),
    );
    if says != (Some(name.as_str()), Some(u64::from(version))) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_definition",
            format!(
                "the path names {name} v{version}, the document {} v{}",
                says.0.unwrap_or("(no name)"),
                says.1.map_or("(none)".to_owned(), |v| v.to_string())
            ),
        ));
    }
    let registered = engine.register_document(&document).await?;
    let status = if registered.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let view = DefinitionView::whole(&registered.definition, engine.registry().latest(&name));
    Ok((status, Json(view)))
}
