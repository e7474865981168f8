//! `/v1/participants`: each participant's circuit breaker and rate limit, as this process knows
//! them (the breakers as last read from the store, about once a second).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use super::ErrorBody;
use crate::engine::{Engine, ParticipantStatus};

/// Answer of `GET /v1/participants`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Participants {
    /// Every participant of the registered definitions, and every one with a breaker or a
    /// rate limit, by name.
    pub participants: Vec<ParticipantStatus>,
}

/// `GET /v1/participants`: the participants' breakers and rate limits.
#[utoipa::path(
    get,
    path = "/v1/participants",
    tag = "operator",
    operation_id = "participants",
    responses(
        (status = 200, description = "The participants, by name", body = Participants),
        (status = 401, description = "No valid token", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub async fn participants(State(engine): State<Arc<Engine>>) -> Json<Participants> {
    Json(Participants {
        participants: engine.participants(),
    })
}
