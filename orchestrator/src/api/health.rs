//! `/healthz` (the process serves) and `/readyz` (it can do its work: database and broker).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::engine::Engine;

/// How long each readiness check may take before it counts as failed.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Answer of `GET /readyz`: `ok`, or why a dependency is not.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Readiness {
    /// `ok`, `unavailable` or `timeout`: whether PostgreSQL answers `SELECT 1`.
    pub database: String,
    /// `ok`, `unavailable` or `timeout`: whether the broker accepts a connection.
    pub broker: String,
}

/// `GET /healthz`: the process is up.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    operation_id = "healthz",
    responses((status = 200, description = "`ok`: the process serves", body = String, content_type = "text/plain")),
)]
pub async fn healthz() -> &'static str {
    "ok"
}

async fn check<E: std::fmt::Display>(
    what: &str,
    probe: impl Future<Output = Result<(), E>>,
) -> String {
    match tokio::time::timeout(CHECK_TIMEOUT, probe).await {
        Ok(Ok(())) => "ok".to_owned(),
        Ok(Err(e)) => {
            // The detail stays in the log: readiness answers may reach untrusted callers.
            tracing::warn!(error = %e, "{what} is not ready");
            "unavailable".to_owned()
        }
        Err(_) => {
            tracing::warn!("{what} did not answer within {CHECK_TIMEOUT:?}");
            "timeout".to_owned()
        }
    }
}

/// `GET /readyz`: 200 when the database and the broker answer, else 503 naming which did not.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    operation_id = "readyz",
    responses(
        (status = 200, description = "Database and broker answer", body = Readiness),
        (status = 503, description = "One of them does not", body = Readiness),
    ),
)]
pub async fn readyz(State(engine): State<Arc<Engine>>) -> (StatusCode, Json<Readiness>) {
    let (database, broker) = tokio::join!(
        check("database", engine.ping_store()),
        check("broker", engine.ping_transport()),
    );
    let status = if database == "ok" && broker == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(Readiness { database, broker }))
}
