//! The HTTP API (JSON under `/v1`). `router` builds the app so tests can call it in-process.

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

use crate::engine::Engine;

pub mod definitions;
pub mod error;
pub mod health;
pub mod sagas;

pub use error::ApiError;

/// Largest accepted request body.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// The HTTP application over `engine`.
pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/v1/sagas", get(sagas::list))
        // POST names a definition, GET an instance.
        .route("/v1/sagas/{name}", post(sagas::start).get(sagas::get))
        .route("/v1/sagas/{id}/events", get(sagas::events))
        .route("/v1/sagas/{id}/abort", post(sagas::abort))
        .route("/v1/sagas/{id}/retry", post(sagas::retry))
        .route("/v1/sagas/{id}/resolve", post(sagas::resolve))
        .route("/v1/definitions", get(definitions::list))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(engine)
}
