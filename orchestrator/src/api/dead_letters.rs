//! `/v1/dead-letters`: what waits in the dead-letter queue, and an operator's requeue or drop
//! of one message.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, IntoResponses, ToSchema};

use super::auth::Caller;
use super::body::JsonBody;
use super::sagas::{ActionRequest, ActionResponses, actor, page_limit, reason};
use super::{ApiError, ErrorBody};
use crate::engine::{Engine, EngineError};
use crate::transport::dead_letters::usable_id;
use crate::transport::{DeadLetter, DeadLetterAction, TransportError};

/// How a dead letter's body is given: as it is when it is UTF-8 text, otherwise in base64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum BodyEncoding {
    /// The body is the message's, as text.
    #[serde(rename = "utf-8")]
    Utf8,
    /// The body is the message's bytes in standard base64 (with padding).
    #[serde(rename = "base64")]
    Base64,
}

/// A message in the dead-letter queue.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterView {
    /// Its stable id: the message's AMQP `message_id` when it has a usable one, else `h` and
    /// 16 hex digits of a hash of its body and headers.
    pub id: String,
    /// The queue it came from (where a requeue puts it), if known.
    pub queue: Option<String>,
    /// Why it was dead-lettered (`x-sagas-reason`), if known.
    pub reason: Option<String>,
    /// Its content type.
    pub content_type: Option<String>,
    /// Its body, as `body_encoding` says.
    pub body: String,
    /// `utf-8` or `base64`.
    pub body_encoding: BodyEncoding,
    /// Its headers whose values are text, numbers or booleans, as text.
    pub headers: BTreeMap<String, String>,
    /// Whether the broker delivered it before (every listing does).
    pub redelivered: bool,
}

impl DeadLetterView {
    /// The view of a dead letter.
    pub fn of(letter: DeadLetter) -> DeadLetterView {
        let (body, body_encoding) = match String::from_utf8(letter.body) {
            Ok(text) => (text, BodyEncoding::Utf8),
            Err(e) => (
                base64::engine::general_purpose::STANDARD.encode(e.into_bytes()),
                BodyEncoding::Base64,
            ),
        };
        DeadLetterView {
            id: letter.id,
            queue: letter.queue,
            reason: letter.reason,
            content_type: letter.content_type,
            body,
            body_encoding,
            headers: letter.headers,
            redelivered: letter.redelivered,
        }
    }
}

/// The answer of `GET /v1/dead-letters`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterPage {
    /// The first messages of the queue, oldest first.
    pub items: Vec<DeadLetterView>,
}

/// Query of `GET /v1/dead-letters`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeadLetterQuery {
    /// How many to show, 1 to 500 (default 50).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 500)]
    pub limit: Option<String>,
}

/// The answer to a transport error of a dead-letter request.
fn transport_error(e: TransportError) -> ApiError {
    match e {
        TransportError::Unsupported(_) => {
            ApiError::new(StatusCode::NOT_IMPLEMENTED, "not_supported", e.to_string())
        }
        TransportError::Refused(_) => {
            ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
        }
        other => EngineError::Transport(other).into(),
    }
}

/// `GET /v1/dead-letters?limit=`: the first messages of the dead-letter queue, oldest first,
/// with their reason and origin. They stay in the queue.
#[utoipa::path(
    get,
    path = "/v1/dead-letters",
    tag = "operator",
    operation_id = "list_dead_letters",
    params(DeadLetterQuery),
    responses(
        (status = 200, description = "The first dead letters, oldest first", body = DeadLetterPage),
        (status = 400, description = "`invalid_query`, naming the parameter", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 501, description = "`not_supported`: this transport cannot show its dead letters", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub async fn list(
    State(engine): State<Arc<Engine>>,
    query: Result<Query<DeadLetterQuery>, QueryRejection>,
) -> Result<Json<DeadLetterPage>, ApiError> {
    let Query(query) = query?;
    Ok(Json(DeadLetterPage {
        items: letters(&engine, query.limit.as_deref()).await?,
    }))
}

/// The first dead letters, oldest first, at most `limit` (as the query gives it) of them.
pub(crate) async fn letters(
    engine: &Engine,
    limit: Option<&str>,
) -> Result<Vec<DeadLetterView>, ApiError> {
    let limit = page_limit(limit)?;
    let letters = engine
        .transport()
        .list_dead_letters(limit as usize)
        .await
        .map_err(transport_error)?;
    Ok(letters.into_iter().map(DeadLetterView::of).collect())
}

/// The answers of `POST /v1/dead-letters/{id}/requeue` and `/drop` that differ from the
/// operator actions' ([`ActionResponses`]): OpenAPI only, never built. A variant's doc is its
/// description.
#[derive(Debug, IntoResponses)]
pub enum SettleResponses {
    /// Done; the message as it was in the dead-letter queue
    #[response(status = 200)]
    Done(DeadLetterView),
    /// `malformed_id` (not 1 to 200 of `A-Za-z0-9._:~-`), `invalid_body` (no reason, or text
    /// with a NUL character), `malformed_body`
    #[response(status = 400)]
    Invalid(ErrorBody),
    /// `not_found`: no dead letter has this id
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// `not_supported`: this transport cannot requeue or drop dead letters
    #[response(status = 501)]
    NotSupported(ErrorBody),
}

/// Requeues or drops the dead letter `id`: the actor from the caller, the reason from the body.
async fn settle(
    engine: &Engine,
    id: Result<Path<String>, PathRejection>,
    caller: &Caller,
    headers: &HeaderMap,
    body: Result<JsonBody<ActionRequest>, ApiError>,
    action: DeadLetterAction,
) -> Result<Json<DeadLetterView>, ApiError> {
    let Path(id) = id?;
    let actor = actor(caller, headers)?;
    let reason = reason(body)?;
    Ok(Json(
        settle_letter(engine, &id, &actor, &reason, action).await?,
    ))
}

/// Requeues or drops the dead letter `id` for `actor`, who says why, and logs it.
pub(crate) async fn settle_letter(
    engine: &Engine,
    id: &str,
    actor: &str,
    reason: &str,
    action: DeadLetterAction,
) -> Result<DeadLetterView, ApiError> {
    if !usable_id(id) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_id",
            format!("{id:?} is not a dead letter's id (1 to 200 of A-Za-z0-9._:~-)"),
        ));
    }
    let not_found = || ApiError::not_found(format!("no dead letter has the id {id:?}"));
    let settled = engine
        .transport()
        .settle_dead_letter(id, action)
        .await
        .map_err(transport_error)?
        .ok_or_else(not_found)?;
    tracing::info!(
        id,
        action = action.as_str(),
        queue = settled.queue.as_deref().unwrap_or("-"),
        actor,
        reason,
        "operator action on a dead letter"
    );
    Ok(DeadLetterView::of(settled))
}

/// `POST /v1/dead-letters/{id}/requeue`: publishes the dead letter again to the queue it came
/// from (confirmed by the broker), then removes it from the dead-letter queue. 409 when its
/// origin is unknown or gone.
#[utoipa::path(
    post,
    path = "/v1/dead-letters/{id}/requeue",
    tag = "operator",
    operation_id = "requeue_dead_letter",
    params(("id" = String, Path, description = "The dead letter's id, as listed", pattern = "^[A-Za-z0-9._:~-]{1,200}$")),
    request_body(content = ActionRequest, content_type = "application/json"),
    responses(
        ActionResponses,
        SettleResponses,
        (status = 409, description = "`conflict`: the message does not say where it came from, or that queue is gone", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub async fn requeue(
    State(engine): State<Arc<Engine>>,
    id: Result<Path<String>, PathRejection>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<JsonBody<ActionRequest>, ApiError>,
) -> Result<Json<DeadLetterView>, ApiError> {
    settle(
        &engine,
        id,
        &caller,
        &headers,
        body,
        DeadLetterAction::Requeue,
    )
    .await
}

/// `POST /v1/dead-letters/{id}/drop`: removes the dead letter for good.
#[utoipa::path(
    post,
    path = "/v1/dead-letters/{id}/drop",
    tag = "operator",
    operation_id = "drop_dead_letter",
    params(("id" = String, Path, description = "The dead letter's id, as listed", pattern = "^[A-Za-z0-9._:~-]{1,200}$")),
    request_body(content = ActionRequest, content_type = "application/json"),
    responses(
        ActionResponses,
        SettleResponses,
    ),
    security(("bearer" = [])),
)]
pub async fn drop(
    State(engine): State<Arc<Engine>>,
    id: Result<Path<String>, PathRejection>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<JsonBody<ActionRequest>, ApiError>,
) -> Result<Json<DeadLetterView>, ApiError> {
    settle(&engine, id, &caller, &headers, body, DeadLetterAction::Drop).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(body: &[u8]) -> DeadLetter {
        DeadLetter {
            id: "h0".into(),
            queue: Some("sagas.replies".into()),
            reason: Some("malformed reply".into()),
            content_type: None,
            body: body.to_vec(),
            headers: BTreeMap::new(),
            redelivered: true,
        }
    }

    #[test]
    fn a_text_body_is_shown_as_it_is_and_any_other_in_base64() {
        let text = DeadLetterView::of(letter(b"{not json"));
        assert_eq!(
            (text.body.as_str(), text.body_encoding),
            ("{not json", BodyEncoding::Utf8)
        );
        let bytes = DeadLetterView::of(letter(&[0xff, 0x00, 0x41]));
        assert_eq!(
            (bytes.body.as_str(), bytes.body_encoding),
            ("/wBB", BodyEncoding::Base64)
        );
        let json = serde_json::to_value(&bytes).unwrap();
        assert_eq!(json["body_encoding"], "base64");
    }

    #[test]
    fn a_transport_that_cannot_is_501_a_refusal_409_and_a_broker_failure_503() {
        let answers = [
            TransportError::Unsupported("list dead letters"),
            TransportError::Refused("no origin".into()),
            TransportError::Broker("connection refused".into()),
        ]
        .map(|e| {
            let e = transport_error(e);
            (e.status().as_u16(), e.code())
        });
        assert_eq!(
            answers,
            [
                (501, "not_supported"),
                (409, "conflict"),
                (503, "unavailable")
            ]
        );
    }
}
