//! The HTTP API (JSON under `/v1`). `router` builds the app so tests can call it in-process.

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

use crate::engine::Engine;

pub mod error;
pub mod sagas;

pub use error::ApiError;

/// Largest accepted request body.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// The HTTP application over `engine`.
pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/v1/sagas/{name}", post(sagas::start).get(sagas::get))
        .route("/v1/sagas/{id}/events", get(sagas::events))
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(engine)
}
