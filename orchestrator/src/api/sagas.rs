//! `/v1/sagas`: start, list, inspect and operate transactions.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::ApiError;
use crate::engine::Engine;
use crate::machine::{Input, Instance, Status};
use crate::store::{ListFilter, LoggedEvent, Position, StoredInstance};

/// Header naming who asks for an operator action.
pub const ACTOR_HEADER: &str = "x-sagas-actor";

/// The actor recorded when a request names none (until requests are authenticated).
pub const ANONYMOUS: &str = "anonymous";

/// Longest accepted actor name or reason, in characters.
const MAX_TEXT: usize = 1_000;

/// Page size of `GET /v1/sagas` when `limit` is not given.
pub const DEFAULT_LIMIT: u32 = 50;

/// Largest accepted `limit` of `GET /v1/sagas`.
pub const MAX_LIMIT: u32 = 500;

/// Body of `POST /v1/sagas/{definition}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// The transaction's input, checked against the definition's input type.
    pub input: Value,
}

/// Answer to a start request.
#[derive(Debug, Serialize, Deserialize)]
pub struct Started {
    /// The new transaction's id.
    pub id: Uuid,
    /// Its status right after starting.
    pub status: Status,
}

/// One step as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct StepView {
    /// Step name.
    pub name: String,
    /// Participant.
    pub participant: String,
    /// Step status.
    pub status: String,
    /// Attempts of the current operation.
    pub attempts: u32,
    /// Last error or failure reason.
    pub last_error: Option<String>,
    /// Forward output.
    pub output: Option<Value>,
}

/// A transaction as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
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
    pub status: Status,
    /// Input.
    pub input: Value,
    /// Why it compensated, if it did.
    pub failure: Option<String>,
    /// Created.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Last changed.
    pub updated_at: chrono::DateTime<chrono::Utc>,
    /// Steps in definition order.
    pub steps: Vec<StepView>,
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
            ..
        } = stored.instance;
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
            steps: plan
                .steps
                .into_iter()
                .zip(steps)
                .map(|(p, s)| StepView {
                    name: p.name,
                    participant: p.participant,
                    status: s.status.as_str().to_owned(),
                    attempts: s.attempt,
                    last_error: s.last_error,
                    output: s.output,
                })
                .collect(),
        }
    }
}

/// `POST /v1/sagas/{definition}`: starts a transaction; 202 with its id.
pub async fn start(
    State(engine): State<Arc<Engine>>,
    Path(definition): Path<String>,
    body: Result<Json<StartRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Started>), ApiError> {
    // An unknown definition is a 404 whatever the body says.
    if engine.registry().latest(&definition).is_none() {
        return Err(crate::engine::EngineError::UnknownDefinition(definition).into());
    }
    let Json(request) = body?;
    let instance = engine.start(&definition, request.input).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Started {
            id: instance.id,
            status: instance.status,
        }),
    ))
}

fn parse_id(id: Result<Path<String>, PathRejection>) -> Result<Uuid, ApiError> {
    let Path(raw) = id?;
    raw.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_id",
            format!("{raw:?} is not a transaction id (a UUID)"),
        )
    })
}

/// `GET /v1/sagas/{id}`: the transaction with its steps.
pub async fn get(
    State(engine): State<Arc<Engine>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<SagaView>, ApiError> {
    let id = parse_id(id)?;
    let stored = engine
        .get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("transaction {id} not found")))?;
    Ok(Json(SagaView::of(stored)))
}

/// `GET /v1/sagas/{id}/events`: the transaction's log in order.
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
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    /// Why the operator acts; recorded in the log. Required and non-empty.
    pub reason: Option<String>,
}

fn actor(headers: &HeaderMap) -> Result<String, ApiError> {
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

fn reason(body: Result<Json<ActionRequest>, JsonRejection>) -> Result<String, ApiError> {
    let Json(request) = body?;
    let reason = request.reason.unwrap_or_default();
    let reason = reason.trim();
    if reason.is_empty() {
        return Err(ApiError::invalid_body(
            "\"reason\" is required: say why, it is recorded in the transaction's log",
        ));
    }
    if reason.chars().count() > MAX_TEXT {
        return Err(ApiError::invalid_body(format!(
            "\"reason\" must have at most {MAX_TEXT} characters"
        )));
    }
    Ok(reason.to_owned())
}

/// Runs one operator action: the actor from the header, the reason from the body.
async fn act(
    engine: &Engine,
    id: Result<Path<String>, PathRejection>,
    headers: &HeaderMap,
    body: Result<Json<ActionRequest>, JsonRejection>,
    input: fn(String, String) -> Input,
) -> Result<Json<SagaView>, ApiError> {
    let id = parse_id(id)?;
    let actor = actor(headers)?;
    let reason = reason(body)?;
    let stored = engine.operate(id, input(actor, reason)).await?;
    Ok(Json(SagaView::of(stored)))
}

/// `POST /v1/sagas/{id}/abort`: compensates (or cancels) a transaction still in its forward
/// phase; 409 once it is past that.
pub async fn abort(
    State(engine): State<Arc<Engine>>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Json<ActionRequest>, JsonRejection>,
) -> Result<Json<SagaView>, ApiError> {
    act(&engine, id, &headers, body, |actor, reason| Input::Abort {
        actor,
        reason,
    })
    .await
}

/// `POST /v1/sagas/{id}/retry`: sends stuck or backing-off operations again now; 409 when
/// there are none.
pub async fn retry(
    State(engine): State<Arc<Engine>>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Json<ActionRequest>, JsonRejection>,
) -> Result<Json<SagaView>, ApiError> {
    act(&engine, id, &headers, body, |actor, reason| Input::Retry {
        actor,
        reason,
    })
    .await
}

/// `POST /v1/sagas/{id}/resolve`: an operator has handled a stuck transaction by hand; it ends
/// `resolved`. 409 unless it is stuck.
pub async fn resolve(
    State(engine): State<Arc<Engine>>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Json<ActionRequest>, JsonRejection>,
) -> Result<Json<SagaView>, ApiError> {
    act(&engine, id, &headers, body, |actor, reason| {
        Input::Resolve { actor, reason }
    })
    .await
}

/// Query of `GET /v1/sagas`; every value is parsed by hand so that errors name the parameter.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only this status.
    pub status: Option<String>,
    /// Only this definition.
    pub definition: Option<String>,
    /// Page size.
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A page of `GET /v1/sagas`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SagaPage {
    /// Transactions, newest first.
    pub items: Vec<SagaView>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// The opaque cursor of a position: hex of `<created_at µs>|<id>`.
pub fn encode_cursor(p: Position) -> String {
    format!("{}|{}", p.created_at.timestamp_micros(), p.id)
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The position a cursor from [`encode_cursor`] stands for.
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
    Some(Position {
        created_at: chrono::DateTime::from_timestamp_micros(micros.parse().ok()?)?,
        id: id.parse().ok()?,
    })
}

fn list_filter(q: ListQuery) -> Result<ListFilter, ApiError> {
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(Status::parse(s).ok_or_else(|| {
            let all: Vec<&str> = Status::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::invalid_query(format!("status {s:?} is not one of {}", all.join(", ")))
        })?),
    };
    let limit = match q.limit.as_deref() {
        None | Some("") => DEFAULT_LIMIT,
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::invalid_query(format!(
                    "limit {l:?} must be a whole number from 1 to {MAX_LIMIT}"
                ))
            })?,
    };
    let after = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(decode_cursor(c).ok_or_else(|| {
            ApiError::invalid_query(
                "cursor is not one this API returned (pass next_cursor as it came)",
            )
        })?),
    };
    Ok(ListFilter {
        status,
        definition: q.definition.filter(|d| !d.is_empty()),
        after,
        limit,
    })
}

/// `GET /v1/sagas?status=&definition=&limit=&cursor=`: transactions newest first, paged by
/// a keyset cursor so that transactions started meanwhile never shift or repeat a page.
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

    #[test]
    fn bad_list_parameters_are_refused_with_a_message_naming_them() {
        let q = |status: &str, limit: &str, cursor: &str| ListQuery {
            status: Some(status.into()),
            definition: None,
            limit: Some(limit.into()),
            cursor: Some(cursor.into()),
        };
        let msg = |r: Result<ListFilter, ApiError>| format!("{:?}", r.unwrap_err());
        assert!(msg(list_filter(q("done", "", ""))).contains("status"));
        assert!(msg(list_filter(q("", "0", ""))).contains("limit"));
        assert!(msg(list_filter(q("", "501", ""))).contains("limit"));
        assert!(msg(list_filter(q("", "x", ""))).contains("limit"));
        assert!(msg(list_filter(q("", "", "nope"))).contains("cursor"));
        let ok = list_filter(q("stuck", "", "")).unwrap();
        assert_eq!((ok.status, ok.limit), (Some(Status::Stuck), DEFAULT_LIMIT));
    }
}
