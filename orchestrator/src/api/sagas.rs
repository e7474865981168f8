//! `/v1/sagas`: start and inspect transactions.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::ApiError;
use crate::engine::Engine;
use crate::machine::{Instance, Status};
use crate::store::{LoggedEvent, StoredInstance};

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
