//! `/healthz` (the process serves) and `/readyz` (it can do its work: database, broker, and
//! the engine running).

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
    /// `ok` once the engine has declared its queues and consumes replies and start commands,
    /// `starting` before (a start taken then waits for the outbox relay), `stopped` after.
    pub engine: String,
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

/// `GET /readyz`: 200 when the database and the broker answer and the engine runs, else 503
/// naming what is not ready.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    operation_id = "readyz",
    responses(
        (status = 200, description = "Database and broker answer, and the engine runs", body = Readiness),
        (status = 503, description = "One of them does not, or the engine is not running yet", body = Readiness),
    ),
)]
pub async fn readyz(State(engine): State<Arc<Engine>>) -> (StatusCode, Json<Readiness>) {
    let (database, broker) = tokio::join!(
        check("database", engine.ping_store()),
        check("broker", engine.ping_transport()),
    );
    let engine = if engine.is_running() {
        "ok"
    } else if engine.is_stopping() {
        "stopped"
    } else {
        "starting"
    };
    let status = if database == "ok" && broker == "ok" && engine == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let engine = engine.to_owned();
    (
        status,
        Json(Readiness {
            database,
            broker,
            engine,
        }),
    )
}
