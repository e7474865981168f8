//! `/v1/sagas`: start, list, inspect and operate transactions.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};
use utoipa::{IntoParams, IntoResponses, ToSchema};
use uuid::Uuid;

use super::auth::Caller;
use super::body::JsonBody;
use super::{ApiError, ErrorBody};
use crate::engine::{Engine, StartOptions};
use crate::machine::{Input, Instance, Phase, Status, TimerKind, Waiting};
use crate::store::{ListFilter, LoggedEvent, Pending, PendingTimer, Position, StoredInstance};

/// Header naming who asks for an operator action, honoured only while the API is
/// unauthenticated (with tokens, the actor is the token's name).
pub const ACTOR_HEADER: &str = "x-sagas-actor";

/// Header carrying a start request's idempotency key (the body's `idempotency_key` works too).
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// The actor recorded when an unauthenticated request names none.
pub const ANONYMOUS: &str = "anonymous";

/// Longest `?wait`, in seconds.
pub const MAX_WAIT_S: u64 = 60;

/// Longest `deadline_s` of a start request: 30 days.
pub const MAX_DEADLINE_S: i64 = 30 * 24 * 3600;

fn status_schema() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(SchemaType::Type(Type::String))
        .enum_values(Some(Status::ALL.iter().map(|s| s.as_str())))
        .description(Some("Status of a transaction"))
        .into()
}

/// Longest accepted actor name or reason, in characters.
const MAX_TEXT: usize = 1_000;

/// Page size of `GET /v1/sagas` when `limit` is not given.
pub const DEFAULT_LIMIT: u32 = 50;

/// Largest accepted `limit` of `GET /v1/sagas`.
pub const MAX_LIMIT: u32 = 500;

/// Body of `POST /v1/sagas/{definition}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// The transaction's input, checked against the definition's input type.
    #[schema(value_type = Object)]
    pub input: Value,
    /// Seconds from now until which the forward phase may run; a transaction still moving
    /// forward then is compensated (or cancelled). 1 to 2592000 (30 days).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 2592000)]
    pub deadline_s: Option<i64>,
    /// A key of the client's choosing (1 to 200 visible ASCII characters): a retry of the same
    /// request with the same key returns the first transaction (200) instead of starting
    /// another; the key with a different request is a conflict (409). The `Idempotency-Key`
    /// header works too.
    #[serde(default)]
    #[schema(pattern = "^[!-~]{1,200}$")]
    pub idempotency_key: Option<String>,
    /// The definition's version to start; without it, its newest version.
    #[serde(default)]
    pub version: Option<u32>,
}

/// Answer to a start request.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
// Closed, so that a `SagaView` never also matches this branch of `StartAnswer`.
#[serde(deny_unknown_fields)]
pub struct Started {
    /// The new transaction's id.
    pub id: Uuid,
    /// Its status right after starting.
    #[schema(schema_with = status_schema)]
    pub status: Status,
}

/// A 202 answer of a start request: `Started` without `?wait`, `SagaView` with it (both have
/// `id` and `status`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum StartAnswer {
    /// Without `?wait`.
    Started(Started),
    /// With `?wait`, when the wait ended before the transaction finished.
    View(SagaView),
}

/// `?wait=<seconds>` of `POST /v1/sagas/{definition}` and `GET /v1/sagas/{id}`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Hold the answer until the transaction is completed, compensated, resolved or stuck,
    /// at most this many seconds (0 to 60).
    #[param(value_type = Option<u64>, minimum = 0, maximum = 60)]
    pub wait: Option<String>,
}

/// A query value of decimal digits only (no sign, no spaces), as a number.
fn whole_number(raw: &str) -> Option<u64> {
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    raw.parse().ok()
}

impl WaitQuery {
    /// The wait asked for, if any; 400 naming `wait` when it does not fit.
    pub fn duration(&self) -> Result<Option<Duration>, ApiError> {
        match self.wait.as_deref() {
            None => Ok(None),
            Some(w) => match whole_number(w) {
                Some(0) => Ok(None),
                Some(n) if n <= MAX_WAIT_S => Ok(Some(Duration::from_secs(n))),
                _ => Err(ApiError::invalid_query(format!(
                    "wait {w:?} must be a whole number of seconds from 0 to {MAX_WAIT_S}"
                ))),
            },
        }
    }
}

/// One step as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StepView {
    /// Step name.
    pub name: String,
    /// Participant (empty for a wait step).
    pub participant: String,
    /// The signal a wait step waits for; absent for a step a participant executes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// While a wait step waits for its signal: when the wait times out (the step then fails
    /// and the saga compensates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal_deadline: Option<chrono::DateTime<chrono::Utc>>,
    /// Step status (`running` while a wait step waits).
    pub status: String,
    /// Attempts of the current operation.
    pub attempts: u32,
    /// Last error or failure reason.
    pub last_error: Option<String>,
    /// Forward output.
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    /// True when an operator resolved the transaction while this step was stuck or had an
    /// operation outstanding: the step was settled by hand (its status and last error are
    /// what they were then; the log's `operator_action` says who did it and why).
    #[serde(default)]
    pub resolved_by_hand: bool,
}

/// A transaction as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SagaView {
    /// Id.
    pub id: Uuid,
    /// Definition name.
    pub definition: String,
    /// Definition version.
    pub version: u32,
    /// `saga` or `tcc`.
    pub mode: String,
    /// Status.
    #[schema(schema_with = status_schema)]
    pub status: Status,
    /// Input.
    #[schema(value_type = Object)]
    pub input: Value,
    /// Why it compensated, if it did.
    pub failure: Option<String>,
    /// Created.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Last changed.
    pub updated_at: chrono::DateTime<chrono::Utc>,
    /// When a transaction still moving forward is compensated, if it has a deadline.
    #[serde(default)]
    pub deadline: Option<chrono::DateTime<chrono::Utc>>,
    /// Steps in definition order.
    pub steps: Vec<StepView>,
    /// What may still act on the transaction (only `GET /v1/sagas/{id}` answers it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<Box<InFlight>>,
}

/// What may still act on a transaction, and so whether it is safe to fix it by hand now: a
/// command still to be published, a timer that will send another attempt (or move the
/// transaction on), an attempt whose reply is awaited (the participant may still apply it).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct InFlight {
    /// True when nothing is in flight: no outbox row, no timer that can act, no attempt
    /// awaiting a reply. Only then may an operator fix the participant's data by hand.
    pub quiet: bool,
    /// Commands of the transaction committed but not yet published to the broker.
    pub outbox_rows: u64,
    /// The transaction's timers, earliest first.
    pub timers: Vec<TimerView>,
    /// Attempts sent whose reply has not come (nor timed out yet).
    pub awaiting_reply: Vec<AttemptView>,
}

/// A timer of a transaction.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TimerView {
    /// The step it is about; null for the transaction's deadline.
    pub step: Option<String>,
    /// `deadline` (a reply is awaited until then), `backoff` (the next attempt is sent then)
    /// or `expiry` (the transaction's own deadline).
    pub kind: String,
    /// The operation it is about (null for `expiry`).
    pub operation: Option<String>,
    /// The attempt it is about: for `backoff`, the one it sends (null for `expiry`).
    pub attempt: Option<u32>,
    /// When it comes due (while an orchestrator handles it, when its lease ends).
    pub due_at: chrono::DateTime<chrono::Utc>,
    /// False for the transaction's deadline once it is past its forward phase: firing it then
    /// changes nothing.
    pub can_act: bool,
}

/// An attempt awaiting its reply.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AttemptView {
    /// The step.
    pub step: String,
    /// `action`, `try`, `compensate`, `confirm` or `cancel`.
    pub operation: String,
    /// The attempt, from 1.
    pub attempt: u32,
    /// When it times out.
    pub deadline: chrono::DateTime<chrono::Utc>,
    /// True when the participant answered that it is still working on it.
    pub in_progress: bool,
}

impl InFlight {
    /// What may still act on `instance`: its steps awaiting a reply, and what the store
    /// holds for it.
    pub fn of(instance: &Instance, pending: Pending) -> InFlight {
        let plan = &instance.plan;
        let timers: Vec<TimerView> = pending
            .timers
            .into_iter()
            .map(|PendingTimer { due_at, timer }| {
                let of_step = timer.kind != TimerKind::Expiry;
                TimerView {
                    step: (plan.steps.get(timer.step))
                        .filter(|_| of_step)
                        .map(|p| p.name.clone()),
                    kind: timer.kind.as_str().to_owned(),
                    operation: of_step.then(|| timer.operation.as_str().to_owned()),
                    attempt: of_step.then_some(timer.attempt),
                    due_at,
                    can_act: of_step || instance.phase == Phase::Forward,
                }
            })
            .collect();
        let awaiting_reply: Vec<AttemptView> = (plan.steps.iter().zip(&instance.steps))
            .filter_map(|(p, s)| {
                let Waiting::Reply { deadline } = s.waiting else {
                    return None;
                };
                Some(AttemptView {
                    step: p.name.clone(),
                    operation: s.status.outstanding(plan.mode)?.as_str().to_owned(),
                    attempt: s.attempt,
                    deadline,
                    in_progress: s.in_progress,
                })
            })
            .collect();
        InFlight {
            quiet: pending.outbox_rows == 0
                && awaiting_reply.is_empty()
                && !timers.iter().any(|t| t.can_act),
            outbox_rows: pending.outbox_rows,
            timers,
            awaiting_reply,
        }
    }
}

impl SagaView {
    /// The view of a stored instance.
    pub fn of(stored: StoredInstance) -> SagaView {
        let Instance {
            id,
            plan,
            input,
            status,
            steps,
            failure,
            deadline,
            ..
        } = with_hand_marks(stored.instance);
        SagaView {
            id,
            definition: plan.name,
            version: plan.version,
            mode: plan.mode.as_str().to_owned(),
            status,
            input,
            failure,
            created_at: stored.created_at,
            updated_at: stored.updated_at,
            deadline,
            steps: plan
                .steps
                .into_iter()
                .zip(steps)
                .map(|(p, s)| StepView {
                    name: p.name,
                    participant: p.participant,
                    signal: p.signal,
                    signal_deadline: match s.waiting {
                        Waiting::Signal { until } => Some(until),
                        _ => None,
                    },
                    status: s.status.as_str().to_owned(),
                    attempts: s.attempt,
                    last_error: s.last_error,
                    output: s.output,
                    resolved_by_hand: s.resolved_by_hand,
                })
                .collect(),
            in_flight: None,
        }
    }
}

/// `instance` with the steps settled by hand marked: a resolved projection stored before
/// steps carried the mark lacks it.
pub(crate) fn with_hand_marks(mut instance: Instance) -> Instance {
    if instance.status == Status::Resolved {
        instance.mark_resolved_by_hand();
    }
    instance
}

/// The idempotency key from the body or the `Idempotency-Key` header (they must agree).
fn idempotency_key(
    request: &StartRequest,
    headers: &HeaderMap,
) -> Result<Option<String>, ApiError> {
    let header = match headers.get(IDEMPOTENCY_KEY_HEADER) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_header",
                        "header Idempotency-Key must be visible ASCII",
                    )
                })?
                .to_owned(),
        ),
    };
    let key = match (&request.idempotency_key, header) {
        (Some(body), Some(header)) if *body != header => {
            return Err(ApiError::invalid_body(
                "\"idempotency_key\" and the Idempotency-Key header differ",
            ));
        }
        (Some(body), _) => Some(body.clone()),
        (None, header) => header,
    };
    if let Some(k) = &key
        && !idempotency_key_shape(k)
    {
        return Err(ApiError::invalid_body(
            "the idempotency key must be 1 to 200 visible ASCII characters",
        ));
    }
    Ok(key)
}

/// Whether `key` can be an idempotency key: 1 to 200 visible ASCII characters (the SDK's
/// `start_in` checks the same).
pub(super) use sagas_participant::start::idempotency_key_shape;

/// The trace context the transaction continues: when traces are exported, the request's own
/// span (a child of the request's `traceparent` if it had one); else the request's W3C
/// `traceparent` when it has a valid one, else a new trace. The participants' spans for this
/// transaction then share one trace id.
fn trace_context(headers: &HeaderMap) -> String {
    #[cfg(feature = "otel")]
    if let Some(own) = sagas_participant::telemetry::current_traceparent() {
        return own;
    }
    crate::engine::trace_or_new(headers.get("traceparent").and_then(|v| v.to_str().ok()))
}

fn deadline(request: &StartRequest) -> Result<Option<Duration>, ApiError> {
    match request.deadline_s {
        None => Ok(None),
        Some(s) if (1..=MAX_DEADLINE_S).contains(&s) => Ok(Some(Duration::from_secs(s as u64))),
        Some(_) => Err(ApiError::invalid_body(format!(
            "\"deadline_s\" must be a whole number of seconds from 1 to {MAX_DEADLINE_S}"
        ))),
    }
}

/// `POST /v1/sagas/{definition}`: starts a transaction; 202 with its id. With `?wait`, the
/// answer is its view once it is settled (200 when terminal) or when the wait ends (202).
#[utoipa::path(
    post,
    path = "/v1/sagas/{name}",
    tag = "sagas",
    operation_id = "start",
    params(
        ("name" = String, Path, description = "The definition to start (its newest version unless the body names one)"),
        WaitQuery,
    ),
    request_body(content = StartRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "With `wait`: the transaction, terminal; or a repeated start with the same idempotency key and request: the first transaction's id and status (or view, with `wait`)", body = StartAnswer),
        (status = 202, description = "Started: its id and status without `wait`; with `wait`, the transaction as it is when the wait ended (still running, or stuck)", body = StartAnswer),
        (status = 409, description = "`conflict`: the idempotency key was used for another request", body = ErrorBody),
        (status = 400, description = "`invalid_input`, `malformed_body`, `invalid_body` (including text with a NUL character) or `invalid_query`", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "The token's role is `read`", body = ErrorBody),
        (status = 404, description = "`unknown_definition`", body = ErrorBody),
        (status = 408, description = "`request_timeout`: the body did not arrive in time", body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub async fn start(
    State(engine): State<Arc<Engine>>,
    Path(definition): Path<String>,
    query: Result<Query<WaitQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<JsonBody<StartRequest>, ApiError>,
) -> Result<Response, ApiError> {
    // An unknown definition is a 404 whatever the body says (one registered by another
    // process is loaded from the store first).
    engine.require_definition(&definition, None).await?;
    let Query(query) = query?;
    let wait = query.duration()?;
    let JsonBody(request) = body?;
    if request.version.is_some() {
        engine
            .require_definition(&definition, request.version)
            .await?;
    }
    let options = StartOptions {
        deadline: deadline(&request)?,
        idempotency_key: idempotency_key(&request, &headers)?,
        traceparent: Some(trace_context(&headers)),
        version: request.version,
    };
    // With `?wait`, the wait is registered before the start commits.
    let (start, waiting) = match wait {
        None => (
            engine
                .start_with(&definition, request.input, options)
                .await?,
            None,
        ),
        Some(wait) => {
            let (start, waiting) = engine
                .start_waiting(&definition, request.input, options)
                .await?;
            (start, Some((waiting, wait)))
        }
    };
    let instance = start.instance;
    if start.created {
        tracing::info!(id = %instance.id, definition, "transaction started");
    }
    let Some((waiting, wait)) = waiting else {
        let started = Started {
            id: instance.id,
            status: instance.status,
        };
        // A repeated idempotent start answers 200: nothing new was started.
        let status = if start.created {
            StatusCode::ACCEPTED
        } else {
            StatusCode::OK
        };
        return Ok((status, Json(StartAnswer::Started(started))).into_response());
    };
    let stored = waiting
        .settled(wait)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("transaction {} not found", instance.id)))?;
    let view = SagaView::of(stored);
    Ok(if view.status.is_terminal() {
        (StatusCode::OK, Json(view)).into_response()
    } else {
        (StatusCode::ACCEPTED, Json(StartAnswer::View(view))).into_response()
    })
}

pub(crate) fn parse_id(id: Result<Path<String>, PathRejection>) -> Result<Uuid, ApiError> {
    let Path(raw) = id?;
    raw.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_id",
            format!("{raw:?} is not a transaction id (a UUID)"),
        )
    })
}

/// `GET /v1/sagas/{id}`: the transaction with its steps and what is still in flight for it;
/// with `?wait`, once it is settled or the wait ends.
#[utoipa::path(
    get,
    path = "/v1/sagas/{name}",
    tag = "sagas",
    operation_id = "get",
    params(
        ("name" = Uuid, Path, description = "The transaction id (the path is shared with the start request, whose `name` is a definition)"),
        WaitQuery,
    ),
    responses(
        (status = 200, description = "The transaction, with `in_flight`", body = SagaView),
        (status = 400, description = "`malformed_id` or `invalid_query`", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub async fn get(
    State(engine): State<Arc<Engine>>,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Json<SagaView>, ApiError> {
    let id = parse_id(id)?;
    let Query(query) = query?;
    let stored = match query.duration()? {
        None => engine.get(id).await?,
        Some(wait) => engine.wait_terminal(id, wait).await?,
    };
    let stored =
        stored.ok_or_else(|| ApiError::not_found(format!("transaction {id} not found")))?;
    let in_flight = InFlight::of(&stored.instance, engine.in_flight(id).await?);
    Ok(Json(SagaView {
        in_flight: Some(Box::new(in_flight)),
        ..SagaView::of(stored)
    }))
}

/// One event of a transaction's log (the fields beside these depend on `kind`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventView {
    /// Position in the log, from 1.
    pub seq: i64,
    /// When it was appended (a `retry_scheduled` event's own `at` is the time of the next
    /// attempt).
    pub logged_at: chrono::DateTime<chrono::Utc>,
    /// `started`, `command_prepared`, `dispatched`, `replied`, `timed_out`, `retry_scheduled`,
    /// `gave_up`, `undo_started`, `confirm_started`, `stuck`, `operator_action`, `finished`, …
    pub kind: String,
    /// The kind's own fields, inline.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub fields: serde_json::Map<String, Value>,
}

/// `GET /v1/sagas/{id}/events`: the transaction's log in order.
#[utoipa::path(
    get,
    path = "/v1/sagas/{id}/events",
    tag = "sagas",
    operation_id = "events",
    params(("id" = Uuid, Path, description = "The transaction id")),
    responses(
        (status = 200, description = "The log, oldest first", body = Vec<EventView>),
        (status = 400, description = "`malformed_id`", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub async fn events(
    State(engine): State<Arc<Engine>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Vec<LoggedEvent>>, ApiError> {
    let id = parse_id(id)?;
    let events = engine.events(id).await?;
    if events.is_empty() {
        return Err(ApiError::not_found(format!("transaction {id} not found")));
    }
    Ok(Json(events))
}

/// Body of `POST /v1/sagas/{id}/abort`, `/retry` and `/resolve`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    /// Why the operator acts; recorded in the log (without surrounding white space). 1 to
    /// 1000 characters, at least one of them not white space, and no NUL (`\u0000`).
    // An Option, so that a missing reason gets the message below rather than serde's.
    #[schema(
        value_type = String,
        required = true,
        min_length = 1,
        max_length = 1000,
        pattern = "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$"
    )]
    pub reason: Option<String>,
}

/// The actor recorded for an operator action: the token's name; without authentication, the
/// `X-Sagas-Actor` header (or `anonymous`).
pub(crate) fn actor(caller: &Caller, headers: &HeaderMap) -> Result<String, ApiError> {
    if let Some(name) = &caller.name {
        // The verified name only: a header could claim anyone.
        return Ok(name.clone());
    }
    let Some(raw) = headers.get(ACTOR_HEADER) else {
        return Ok(ANONYMOUS.to_owned());
    };
    let invalid = |why: &str| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_header",
            format!("header X-Sagas-Actor {why}"),
        )
    };
    let name = raw
        .to_str()
        .map_err(|_| invalid("must be visible ASCII"))?
        .trim();
    if name.is_empty() || name.chars().count() > MAX_TEXT {
        return Err(invalid(&format!("must have 1 to {MAX_TEXT} characters")));
    }
    Ok(name.to_owned())
}

/// White space as the document's pattern counts it (`\s` of JSON Schema's ECMA-262 regular
/// expressions): Unicode's but U+0085, and U+FEFF.
fn blank(c: char) -> bool {
    (c.is_whitespace() && c != '\u{85}') || c == '\u{feff}'
}

pub(super) fn reason(body: Result<JsonBody<ActionRequest>, ApiError>) -> Result<String, ApiError> {
    let JsonBody(request) = body?;
    reason_text(request.reason)
}

/// An operator action's reason as given (from a JSON body or a form), checked and trimmed.
pub(crate) fn reason_text(reason: Option<String>) -> Result<String, ApiError> {
    let reason = reason.unwrap_or_default();
    if reason.chars().all(blank) {
        return Err(ApiError::invalid_body(
            "\"reason\" is required: say why, it is recorded in the transaction's log",
        ));
    }
    if reason.chars().count() > MAX_TEXT {
        return Err(ApiError::invalid_body(format!(
            "\"reason\" must have at most {MAX_TEXT} characters"
        )));
    }
    Ok(reason.trim_matches(blank).to_owned())
}

/// The answers of `POST /v1/sagas/{id}/abort`, `/retry`, `/resolve` and
/// `/signals/{name}` but their 409, which each describes itself: OpenAPI only, never built. A
/// variant's doc is its description.
#[derive(Debug, IntoResponses)]
pub enum ActionResponses {
    /// Done; the transaction as the action left it (what it sent may have moved it on since)
    #[response(status = 200)]
    Done(SagaView),
    /// `invalid_body` (no reason, or text with a NUL character; for a signal, no valid
    /// `signal_id`), `malformed_body`, `malformed_id`
    #[response(status = 400)]
    Invalid(ErrorBody),
    /// No valid token
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The token's role is `read`
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// `not_found`
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// `request_timeout`: the body did not arrive in time
    #[response(status = 408)]
    Timeout(ErrorBody),
    /// `body_too_large`
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// `unsupported_media_type`: the body is not `application/json`
    #[response(status = 415)]
    UnsupportedMediaType(ErrorBody),
    /// `unavailable`
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// Runs one operator action: the actor from the header, the reason from the body.
async fn act(
    engine: &Engine,
    id: Result<Path<String>, PathRejection>,
    caller: &Caller,
    headers: &HeaderMap,
    body: Result<JsonBody<ActionRequest>, ApiError>,
    input: fn(String, String) -> Input,
) -> Result<Json<SagaView>, ApiError> {
    let id = parse_id(id)?;
    let actor = actor(caller, headers)?;
    let reason = reason(body)?;
    let action = input(actor.clone(), reason.clone());
    let stored = engine.operate(id, action).await?;
    tracing::info!(%id, actor, reason, "operator action");
    Ok(Json(SagaView::of(stored)))
}

/// `POST /v1/sagas/{id}/abort`: compensates (or cancels) a transaction still in its forward
/// phase; 409 once it is past that.
#[utoipa::path(
    post,
    path = "/v1/sagas/{id}/abort",
    tag = "operator",
    operation_id = "abort",
    params(("id" = Uuid, Path, description = "The transaction id")),
    request_body(content = ActionRequest, content_type = "application/json"),
    responses(
        ActionResponses,
        (status = 409, description = "`conflict`: it is past its forward phase", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub async fn abort(
    State(engine): State<Arc<Engine>>,
    id: Result<Path<String>, PathRejection>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<JsonBody<ActionRequest>, ApiError>,
) -> Result<Json<SagaView>, ApiError> {
    act(&engine, id, &caller, &headers, body, |actor, reason| {
        Input::Abort { actor, reason }
    })
    .await
}

/// `POST /v1/sagas/{id}/retry`: sends stuck or backing-off operations again now; 409 when
/// there are none.
#[utoipa::path(
    post,
    path = "/v1/sagas/{id}/retry",
    tag = "operator",
    operation_id = "retry",
    params(("id" = Uuid, Path, description = "The transaction id")),
    request_body(content = ActionRequest, content_type = "application/json"),
    responses(
        ActionResponses,
        (status = 409, description = "`conflict`: nothing is stuck or waiting to retry", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub async fn retry(
    State(engine): State<Arc<Engine>>,
    id: Result<Path<String>, PathRejection>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<JsonBody<ActionRequest>, ApiError>,
) -> Result<Json<SagaView>, ApiError> {
    act(&engine, id, &caller, &headers, body, |actor, reason| {
        Input::Retry { actor, reason }
    })
    .await
}

/// `POST /v1/sagas/{id}/resolve`: an operator has handled a stuck transaction by hand; it ends
/// `resolved`. 409 unless it is stuck.
#[utoipa::path(
    post,
    path = "/v1/sagas/{id}/resolve",
    tag = "operator",
    operation_id = "resolve",
    params(("id" = Uuid, Path, description = "The transaction id")),
    request_body(content = ActionRequest, content_type = "application/json"),
    responses(
        ActionResponses,
        (status = 409, description = "`conflict`: it is not stuck", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub async fn resolve(
    State(engine): State<Arc<Engine>>,
    id: Result<Path<String>, PathRejection>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<JsonBody<ActionRequest>, ApiError>,
) -> Result<Json<SagaView>, ApiError> {
    act(&engine, id, &caller, &headers, body, |actor, reason| {
        Input::Resolve { actor, reason }
    })
    .await
}

/// Query of `GET /v1/sagas`; every value is parsed by hand so that errors name the parameter.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this status.
    #[param(schema_with = status_schema)]
    pub status: Option<String>,
    /// Only this definition (a definition name: 1 to 100 of `A-Za-z0-9_.-`).
    #[param(pattern = "^[A-Za-z0-9_.-]{1,100}$")]
    pub definition: Option<String>,
    /// Page size, 1 to 500 (default 50).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 500)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page (described in its schema, [`cursor_schema`]).
    #[param(schema_with = cursor_schema)]
    pub cursor: Option<String>,
    /// Only transactions created at or after this time (RFC 3339).
    #[param(value_type = Option<String>, format = DateTime)]
    pub created_after: Option<String>,
    /// Only transactions created before this time (RFC 3339).
    #[param(value_type = Option<String>, format = DateTime)]
    pub created_before: Option<String>,
    /// Only the transaction started with this idempotency key (1 to 200 visible ASCII
    /// characters; a key is unique per definition).
    #[param(pattern = "^[!-~]{1,200}$")]
    pub idempotency_key: Option<String>,
}

/// A page of `GET /v1/sagas`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SagaPage {
    /// Transactions, newest first.
    pub items: Vec<SagaView>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// The opaque cursor of a position: lowercase hex of `<created_at µs since 1970>|<id>`.
pub fn encode_cursor(p: Position) -> String {
    format!("{}|{}", p.created_at.timestamp_micros(), p.id)
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every cursor [`decode_cursor`] accepts, as the OpenAPI document states it: the hex of a
/// number of microseconds without leading zeros (at most 16 digits), `|` and a hyphenated
/// lowercase UUID.
pub const CURSOR_PATTERN: &str = "^(30|3[1-9](3[0-9]){0,15})7c(3[0-9]|6[1-6]){8}2d(3[0-9]|6[1-6]){4}2d(3[0-9]|6[1-6]){4}2d(3[0-9]|6[1-6]){4}2d(3[0-9]|6[1-6]){12}$";

fn cursor_schema() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(SchemaType::Type(Type::String))
        .pattern(Some(CURSOR_PATTERN))
        .description(Some(
            "`next_cursor` of the previous page, as it came (opaque)",
        ))
        .into()
}

/// Largest creation time a cursor may carry, in µs since 1970: 16 digits, late in 2286. A
/// cursor names a time at which an instance was created, so it is never before 1970 nor past
/// this, and the store's timestamp types hold every time in between.
const MAX_CURSOR_MICROS: i64 = 9_999_999_999_999_999;

/// The position a cursor from [`encode_cursor`] stands for; `None` for anything that
/// [`encode_cursor`] cannot have written (another spelling of the same position included).
pub fn decode_cursor(cursor: &str) -> Option<Position> {
    if !cursor.len().is_multiple_of(2) || cursor.len() > 200 {
        return None;
    }
    let bytes = (0..cursor.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(cursor.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    let text = String::from_utf8(bytes).ok()?;
    let (micros, id) = text.split_once('|')?;
    let micros: i64 = micros.parse().ok()?;
    if !(0..=MAX_CURSOR_MICROS).contains(&micros) {
        return None;
    }
    let position = Position {
        created_at: chrono::DateTime::from_timestamp_micros(micros)?,
        id: id.parse().ok()?,
    };
    (encode_cursor(position) == cursor).then_some(position)
}

/// Whether `name` can be a definition's name (1 to 100 of `A-Za-z0-9_.-`, as
/// [`crate::definition::Definition`]'s builder requires; the SDK's `start_in` checks the same).
pub(super) use sagas_participant::start::definition_name;

/// The page size a `limit` query parameter asks for: [`DEFAULT_LIMIT`] when not given, 400
/// naming `limit` unless a whole number from 1 to [`MAX_LIMIT`].
pub(super) fn page_limit(raw: Option<&str>) -> Result<u32, ApiError> {
    match raw {
        None => Ok(DEFAULT_LIMIT),
        Some(l) => whole_number(l)
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::invalid_query(format!(
                    "limit {l:?} must be a whole number from 1 to {MAX_LIMIT}"
                ))
            }),
    }
}

fn list_filter(q: ListQuery) -> Result<ListFilter, ApiError> {
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(Status::parse(s).ok_or_else(|| {
            let all: Vec<&str> = Status::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::invalid_query(format!("status {s:?} is not one of {}", all.join(", ")))
        })?),
    };
    let limit = page_limit(q.limit.as_deref())?;
    let after = match q.cursor.as_deref() {
        None => None,
        Some(c) => Some(decode_cursor(c).ok_or_else(|| {
            ApiError::invalid_query(
                "cursor is not one this API returned (pass next_cursor as it came)",
            )
        })?),
    };
    let time = |name: &str, v: Option<&str>| -> Result<Option<crate::machine::Time>, ApiError> {
        match v {
            None => Ok(None),
            Some(t) => chrono::DateTime::parse_from_rfc3339(t)
                .map(|t| Some(t.with_timezone(&chrono::Utc)))
                .map_err(|_| {
                    ApiError::invalid_query(format!(
                        "{name} {t:?} is not an RFC 3339 time such as 2026-11-24T00:00:00Z"
                    ))
                }),
        }
    };
    let definition = match q.definition {
        None => None,
        Some(d) if definition_name(&d) => Some(d),
        Some(d) => {
            return Err(ApiError::invalid_query(format!(
                "definition {d:?} is not a definition name (1 to 100 of A-Za-z0-9_.-)"
            )));
        }
    };
    let idempotency_key = match q.idempotency_key {
        None => None,
        Some(k) if idempotency_key_shape(&k) => Some(k),
        Some(k) => {
            return Err(ApiError::invalid_query(format!(
                "idempotency_key {k:?} is not 1 to 200 visible ASCII characters"
            )));
        }
    };
    Ok(ListFilter {
        status,
        definition,
        after,
        created_after: time("created_after", q.created_after.as_deref())?,
        created_before: time("created_before", q.created_before.as_deref())?,
        idempotency_key,
        limit,
    })
}

/// `GET /v1/sagas?status=&definition=&created_after=&created_before=&idempotency_key=&limit=&cursor=`:
/// transactions newest first, paged by a keyset cursor so that transactions started meanwhile
/// never shift or repeat a page.
#[utoipa::path(
    get,
    path = "/v1/sagas",
    tag = "sagas",
    operation_id = "list",
    params(ListQuery),
    responses(
        (status = 200, description = "A page, newest first", body = SagaPage),
        (status = 400, description = "`invalid_query`, naming the parameter", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub async fn list(
    State(engine): State<Arc<Engine>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<SagaPage>, ApiError> {
    let Query(query) = query?;
    let mut filter = list_filter(query)?;
    let limit = filter.limit as usize;
    // One more than asked tells whether another page follows.
    filter.limit += 1;
    let mut rows = engine.list(&filter).await?;
    let next_cursor = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|last| encode_cursor(Position::of(last)))
    } else {
        None
    };
    Ok(Json(SagaPage {
        items: rows.into_iter().map(SagaView::of).collect(),
        next_cursor,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::{self, Timer};
    use sagas_participant::protocol::{Operation, Outcome, Reply};

    fn at(seconds: i64) -> crate::machine::Time {
        chrono::DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    fn reply(id: Uuid, step: &str, operation: Operation, outcome: Outcome) -> Input {
        Input::Reply(Reply {
            protocol: 1,
            transaction_id: id,
            step: step.into(),
            operation,
            attempt: 1,
            outcome,
        })
    }

    #[test]
    fn in_flight_is_quiet_only_without_outbox_rows_acting_timers_or_attempts_awaiting_replies() {
        let def = crate::Definition::saga::<Value>("d", 1)
            .step("a", "p", |s| s.command(|_, _| serde_json::json!({})))
            .step("b", "q", |s| s.command(|_, _| serde_json::json!({})))
            .build()
            .unwrap();
        let options = machine::StartOptions {
            deadline: Some(at(3600)),
            traceparent: None,
        };
        let (id, plan) = (Uuid::now_v7(), (**def.plan()).clone());
        let started = machine::start_with(
            id,
            plan,
            Value::Null,
            options,
            at(0),
            &def,
            &machine::Closed,
        );
        let timer = |step: usize, kind: TimerKind, operation: Operation, due: i64| PendingTimer {
            due_at: at(due),
            timer: Timer {
                step,
                kind,
                operation,
                attempt: 1,
            },
        };
        let expiry = timer(0, TimerKind::Expiry, Operation::Action, 3600);
        let pending = Pending {
            outbox_rows: 1,
            timers: vec![timer(0, TimerKind::Deadline, Operation::Action, 30), expiry],
        };
        let running = InFlight::of(&started.instance, pending);
        assert!(!running.quiet);
        assert_eq!(running.awaiting_reply.len(), 1);
        let a = &running.awaiting_reply[0];
        assert_eq!(
            (a.step.as_str(), a.operation.as_str(), a.attempt),
            ("a", "action", 1)
        );
        assert_eq!(running.timers[0].step.as_deref(), Some("a"));
        assert_eq!(
            running.timers[1].step, None,
            "the deadline is the transaction's"
        );
        assert!(
            running.timers.iter().all(|t| t.can_act),
            "still moving forward"
        );

        // a succeeds, b fails, a's compensation is refused: stuck, nothing sent any more.
        let mut inst = started.instance;
        for input in [
            reply(id, "a", Operation::Action, Outcome::succeeded(Value::Null)),
            reply(id, "b", Operation::Action, Outcome::failed("no")),
            reply(id, "a", Operation::Compensate, Outcome::failed("renamed")),
        ] {
            inst = machine::handle(&inst, input, at(1), &def).unwrap().instance;
        }
        assert_eq!(inst.status, Status::Stuck);
        let stuck = InFlight::of(
            &inst,
            Pending {
                outbox_rows: 0,
                timers: vec![expiry],
            },
        );
        assert!(
            stuck.quiet,
            "the deadline cannot act past the forward phase"
        );
        assert!(!stuck.timers[0].can_act);
        assert!(stuck.awaiting_reply.is_empty());
        let publishing = Pending {
            outbox_rows: 1,
            timers: Vec::new(),
        };
        assert!(!InFlight::of(&inst, publishing).quiet);
    }

    #[test]
    fn a_cursor_decodes_to_the_position_it_encodes_and_garbage_decodes_to_nothing() {
        let p = Position {
            created_at: chrono::DateTime::from_timestamp_micros(1_790_000_000_123_456).unwrap(),
            id: Uuid::now_v7(),
        };
        assert_eq!(decode_cursor(&encode_cursor(p)), Some(p));
        for bad in ["", "zz", "abc", "7c", "31327c6e6f74", &"00".repeat(101)] {
            assert_eq!(decode_cursor(bad), None, "{bad}");
        }
    }

    /// The hex of `text`, as a cursor spells it.
    fn hex(text: &str) -> String {
        text.bytes().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn a_cursor_out_of_the_stores_time_range_or_spelled_otherwise_is_refused() {
        let id = "00000000-0000-0000-0000-000000000000";
        // From issue 17: 210 thousand years before 1970, past what PostgreSQL stores.
        let forged = "2d3231303930303030303030303030303030307c30303030303030302d303030302d303030302d303030302d303030303030303030303030";
        assert_eq!(decode_cursor(forged), None);
        for text in [
            format!("-1|{id}"),
            format!("{}|{id}", MAX_CURSOR_MICROS + 1),
            format!("{}|{id}", i64::MAX),
            format!("0012|{id}"),
            format!("+12|{id}"),
            format!("12|{}", id.to_uppercase().replace('0', "A")),
            format!("12|{}", id.replace('-', "")),
        ] {
            assert_eq!(decode_cursor(&hex(&text)), None, "{text}");
        }
        assert_eq!(
            decode_cursor(&hex(&text_of(0, id))).map(|p| p.id),
            Some(Uuid::nil())
        );
        let last = decode_cursor(&hex(&text_of(MAX_CURSOR_MICROS, id))).unwrap();
        assert_eq!(last.created_at.timestamp_micros(), MAX_CURSOR_MICROS);
    }

    fn text_of(micros: i64, id: &str) -> String {
        format!("{micros}|{id}")
    }

    #[test]
    fn bad_list_parameters_are_refused_with_a_message_naming_them() {
        let q = |status: Option<&str>, limit: Option<&str>, cursor: Option<&str>| ListQuery {
            status: status.map(Into::into),
            definition: None,
            limit: limit.map(Into::into),
            cursor: cursor.map(Into::into),
            created_after: None,
            created_before: None,
            idempotency_key: None,
        };
        let msg = |r: Result<ListFilter, ApiError>| format!("{:?}", r.unwrap_err());
        assert!(msg(list_filter(q(Some("done"), None, None))).contains("status"));
        assert!(msg(list_filter(q(Some(""), None, None))).contains("status"));
        for limit in ["0", "501", "x", "", "+5", " 5", "99999999999"] {
            assert!(msg(list_filter(q(None, Some(limit), None))).contains("limit"));
        }
        assert!(msg(list_filter(q(None, None, Some("nope")))).contains("cursor"));
        assert!(msg(list_filter(q(None, None, Some("")))).contains("cursor"));
        let ok = list_filter(q(Some("stuck"), None, None)).unwrap();
        assert_eq!((ok.status, ok.limit), (Some(Status::Stuck), DEFAULT_LIMIT));
        let definition = |d: &str| {
            list_filter(ListQuery {
                definition: Some(d.into()),
                ..ListQuery::default()
            })
        };
        assert_eq!(
            definition("transfer_saga").unwrap().definition.as_deref(),
            Some("transfer_saga")
        );
        for bad in ["a\0b", "", "a b", &"x".repeat(101)] {
            assert!(msg(definition(bad)).contains("definition"), "{bad:?}");
        }
    }

    #[test]
    fn a_reason_needs_a_character_that_is_not_white_space_and_is_stored_trimmed() {
        let reason_of = |r: &str| {
            reason(Ok(JsonBody(ActionRequest {
                reason: Some(r.into()),
            })))
        };
        assert_eq!(reason_of("  refunded \n").unwrap(), "refunded");
        // Not white space to ECMA-262, which the document's pattern follows.
        assert_eq!(reason_of("\u{85}").unwrap(), "\u{85}");
        assert_eq!(reason_of("\u{1e}").unwrap(), "\u{1e}");
        for blank in ["", " ", "\t\n", "\u{feff}", "\u{3000}\u{a0}"] {
            assert!(reason_of(blank).is_err(), "{blank:?}");
        }
        assert!(reason_of(&"x".repeat(1001)).is_err());
        assert!(reason_of(&format!(" {}", "x".repeat(999))).is_ok());
    }
}
