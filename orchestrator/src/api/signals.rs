//! `/v1/sagas/{id}/signals/{name}`: the signal a wait step of a transaction waits for.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, State};
use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::auth::Caller;
use super::body::JsonBody;
use super::sagas::{ActionResponses, SagaView, actor, idempotency_key_shape};
use super::{ApiError, ErrorBody};
use crate::engine::Engine;
use crate::machine::Input;

/// Body of `POST /v1/sagas/{id}/signals/{name}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    /// The sender's id of this signal (1 to 200 visible ASCII characters): the same id with the
    /// same data again answers 200 and changes nothing; with other data, 409.
    // An Option, so that a missing id gets the message below rather than serde's.
    #[schema(value_type = String, required = true, pattern = "^[!-~]{1,200}$")]
    pub signal_id: Option<String>,
    /// The signal's data, any JSON value: the wait step's output, for later steps' commands
    /// (null if left out).
    #[serde(default)]
    pub data: Value,
}

/// `POST /v1/sagas/{id}/signals/{name}`: delivers the signal `name` to the wait step of the
/// transaction that waits for it; its `data` becomes the step's output and the saga moves on.
#[utoipa::path(
    post,
    path = "/v1/sagas/{id}/signals/{name}",
    tag = "operator",
    operation_id = "signal",
    params(
        ("id" = Uuid, Path, description = "The transaction id"),
        ("name" = String, Path, description = "The signal's name, as the wait step names it"),
    ),
    request_body(content = SignalRequest, content_type = "application/json"),
    responses(
        ActionResponses,
        (status = 409, description = "`conflict`, with the reason: no step waits for this signal now (not reached yet, already signalled, timed out, transaction finished, or no step waits for that name), or the signal id was used with other data or for another signal", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub async fn signal(
    State(engine): State<Arc<Engine>>,
    path: Result<Path<(String, String)>, PathRejection>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<JsonBody<SignalRequest>, ApiError>,
) -> Result<Json<SagaView>, ApiError> {
    let Path((id, name)) = path?;
    let id = super::sagas::parse_id(Ok(Path(id)))?;
    let actor = actor(&caller, &headers)?;
    let JsonBody(request) = body?;
    let signal_id = match request.signal_id {
        Some(s) if idempotency_key_shape(&s) => s,
        _ => {
            return Err(ApiError::invalid_body(
                "\"signal_id\" is required: 1 to 200 visible ASCII characters naming this \
                 signal, so that a repeat is recognised",
            ));
        }
    };
    let input = Input::Signal {
        name: name.clone(),
        signal_id: signal_id.clone(),
        data: request.data,
    };
    let stored = engine.operate(id, input).await?;
    tracing::info!(%id, signal = name, signal_id, actor, "signal");
    Ok(Json(SagaView::of(stored)))
}
