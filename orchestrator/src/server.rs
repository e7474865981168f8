//! Running an orchestrator process: database, broker, engine and HTTP API together.

use std::sync::Arc;

use anyhow::Context;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

use crate::clock::SystemClock;
use crate::config::Config;
use crate::definition::Registry;
use crate::engine::{Engine, EngineConfig};
use crate::store::PgStore;
use crate::transport::{AmqpConfig, AmqpTransport};

/// Connects to PostgreSQL (applying migrations) and builds an engine on the AMQP transport.
pub async fn engine(config: &Config, registry: Registry) -> anyhow::Result<Arc<Engine>> {
    let pool = PgPoolOptions::new()
        .max_connections(config.db_pool)
        .connect(&config.database_url)
        .await
        .with_context(|| "connecting to the orchestrator database (DATABASE_URL)")?;
    let store = PgStore::new(pool);
    store
        .migrate()
        .await
        .context("applying the orchestrator's migrations")?;
    let transport = AmqpTransport::new(AmqpConfig {
        uri: config.amqp_url.clone(),
        topology: config.topology(),
        queues: config.queue_options(),
        command_batch: config.command_batch,
    });
    Ok(Engine::new(
        Arc::new(store),
        Arc::new(transport),
        registry,
        Arc::new(SystemClock),
        EngineConfig {
            retention: config.retention,
            ..EngineConfig::default()
        },
    ))
}

/// Runs the engine and the HTTP API on `config.bind` until `shutdown` (or SIGTERM/Ctrl-C when
/// `shutdown` is `None`).
pub async fn serve(
    config: Config,
    registry: Registry,
    shutdown: Option<CancellationToken>,
) -> anyhow::Result<()> {
    // Refuse before connecting to anything: a misconfigured API must not come up.
    config
        .check()
        .map_err(|e| anyhow::anyhow!("refusing to start: {e}"))?;
    let _ = crate::api::metrics::handle();
    let engine = engine(&config, registry).await?;
    let shutdown = shutdown.unwrap_or_else(|| {
        let token = CancellationToken::new();
        let t = token.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            t.cancel();
        });
        token
    });
    let listener = tokio::net::TcpListener::bind(&config.bind)
        .await
        .with_context(|| format!("binding the HTTP API to {} (SAGAS_BIND)", config.bind))?;
    let addr = listener.local_addr()?;
    if config.api_tokens.is_empty() {
        tracing::warn!(%addr, "HTTP API listening UNAUTHENTICATED on loopback (SAGAS_API_TOKENS is empty): anyone on this host can start and operate transactions");
    } else {
        tracing::info!(%addr, tokens = config.api_tokens.len(), "HTTP API listening");
    }
    let runner = tokio::spawn(engine.clone().run(shutdown.clone()));
    let app = crate::api::router_with(engine, crate::api::ApiOptions::from_config(&config));
    let s = shutdown.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { s.cancelled().await })
        .await
        .context("HTTP server")?;
    shutdown.cancel();
    runner.await.context("engine task")??;
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C (one implementation for both crates: the participant SDK's).
pub use sagas_participant::runtime::shutdown_signal as wait_for_signal;

/// Installs a `tracing` subscriber that reads `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
}
