//! `/v1/definitions`: the definitions this orchestrator runs.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::definition::{Definition, RetryPolicy};
use crate::engine::Engine;

/// One step of a definition as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StepDefinitionView {
    /// Step name.
    pub name: String,
    /// The participant that executes it.
    pub participant: String,
    /// How long one attempt waits for its reply.
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
    /// Steps in order.
    pub steps: Vec<StepDefinitionView>,
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
        DefinitionView {
            name: plan.name.clone(),
            version: plan.version,
            mode: plan.mode.as_str().to_owned(),
            latest,
            steps: plan
                .steps
                .iter()
                .map(|s| StepDefinitionView {
                    name: s.name.clone(),
                    participant: s.participant.clone(),
                    timeout_ms: s.timeout_ms,
                    in_progress_timeout_ms: s.in_progress_timeout_ms,
                    retry: s.retry,
                    finish_retry: s.finish_retry,
                })
                .collect(),
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
    ),
    security(("bearer" = [])),
)]
pub async fn list(State(engine): State<Arc<Engine>>) -> Json<Definitions> {
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
    Json(Definitions { items })
}
