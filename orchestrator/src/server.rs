//! Running an orchestrator process: database, broker, engine and HTTP API together.

use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use sagas_participant::config::{database_options, pool_options};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::clock::SystemClock;
use crate::config::{Config, HttpLimits, LogFormat};
use crate::definition::Registry;
use crate::engine::{Engine, EngineConfig};
use crate::store::PgStore;
use crate::transport::{AmqpConfig, AmqpTransport};

/// Connects to PostgreSQL (applying migrations) and builds an engine on the AMQP transport.
pub async fn engine(config: &Config, registry: Registry) -> anyhow::Result<Arc<Engine>> {
    let pool = pool_options(config.db_pool)
        .connect_with(database_options(&config.database_url)?)
        .await
        .with_context(|| "connecting to the orchestrator database (DATABASE_URL)")
        .map_err(|e| match format!("{e:#}").contains("no encryption") {
            // A loopback URL without an sslmode connects plain; this server wants TLS.
            true => e.context("the server takes TLS connections only: name an sslmode in DATABASE_URL (e.g. ?sslmode=require)"),
            false => e,
        })?;
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
    let engine = Engine::new(
        Arc::new(store),
        Arc::new(transport),
        registry,
        Arc::new(SystemClock),
        engine_config(config),
    );
    // Before the API comes up: a definition changed without a new version stops the process.
    engine
        .register_definitions()
        .await
        .context("refusing to start")?;
    Ok(engine)
}

/// The engine's tuning in a `sagad`-style process: the defaults, with what `config` sets
/// (retention, batch linger, waits' announcements, breakers, rate limits).
pub fn engine_config(config: &Config) -> EngineConfig {
    EngineConfig {
        retention: config.retention,
        batch_linger: config.batch_linger,
        wait_notify: config.wait_notify,
        breakers: config.breakers,
        rate_limits: config.rate_limits.clone(),
        ..EngineConfig::default()
    }
}

/// Runs the engine and the HTTP API on `config.bind`, within `config.http`, until `shutdown`
/// (or SIGTERM/Ctrl-C when `shutdown` is `None`).
pub async fn serve(
    config: Config,
    registry: Registry,
    shutdown: Option<CancellationToken>,
) -> anyhow::Result<()> {
    // Refuse before connecting to anything: a misconfigured API must not come up.
    config
        .check()
        .map_err(|e| anyhow::anyhow!("refusing to start: {e}"))?;
    let limits = config.http;
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
    let options = crate::api::ApiOptions {
        body_timeout: limits.body_timeout,
        ..crate::api::ApiOptions::from_config(&config)
    };
    let app = crate::api::router_with(engine, options);
    serve_http(listener, app, limits, shutdown.clone()).await;
    shutdown.cancel();
    runner.await.context("engine task")??;
    Ok(())
}

/// Serves `app` on `listener` within `limits` until `shutdown`, then stops accepting and
/// returns once the requests in flight are answered.
///
/// HTTP/1.1 by hyper: a connection has `limits.header_timeout` to send each request's headers
/// (and may stay idle that long between requests) before it is closed; at most
/// `limits.max_connections` are served at once, and further ones wait in the listen backlog
/// until one closes. Body timeouts and sizes are the router's ([`crate::api::body`]).
pub async fn serve_http(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    let mut full = false;
    loop {
        // A slot first, so that a connection over the cap is not even accepted.
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                full = false;
                slot
            }
            Err(_) => {
                if !full {
                    full = true;
                    tracing::warn!(
                        max = limits.max_connections,
                        "HTTP connections at their cap (SAGAS_HTTP_MAX_CONNECTIONS); new ones wait"
                    );
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                    _ = shutdown.cancelled() => break,
                }
            }
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            // Reap finished connections while waiting.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            _ = shutdown.cancelled() => break,
        };
        let connection =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let stop = shutdown.clone();
        connections.spawn(async move {
            let _slot = slot;
            let mut connection = std::pin::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                _ = stop.cancelled() => {
                    // Answers the request in flight, if any, then closes.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = served {
                // Timeouts, resets, malformed requests: the client's doing.
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// After a failed `accept`: a connection that failed before it was taken costs nothing, but
/// running out of descriptors would turn the loop into a busy one, so it pauses.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accepting an HTTP connection failed; retrying in 1 s");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
}

/// Resolves on SIGTERM or Ctrl-C (one implementation for both crates: the participant SDK's).
pub use sagas_participant::runtime::shutdown_signal as wait_for_signal;

/// Installs a `tracing` subscriber that reads `RUST_LOG` (default `info`), in the format
/// `SAGAS_LOG_FORMAT` names; a malformed value stops the process with exit code 2, as every
/// malformed variable does.
pub fn init_tracing() {
    let mut env = crate::config::Env::from_process();
    let format = LogFormat::read(&mut env);
    env.finish().unwrap_or_else(|e| e.exit());
    init_tracing_as(format);
}

/// Installs a `tracing` subscriber that reads `RUST_LOG` (default `info`) and writes `format`
/// to standard output, with colour codes only when that is a terminal (never in log files).
/// With the `otel` feature and `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans are also exported over
/// OTLP (docs/operations.md, "Traces"); call [`shutdown_tracing`] before the process exits.
pub fn init_tracing_as(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_ansi(std::io::stdout().is_terminal());
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let registry = tracing_subscriber::registry().with(fmt.with_filter(filter));
    // Spans at `info` and above whatever RUST_LOG says: it chooses what is logged, not the
    // spans a trace is made of.
    #[cfg(feature = "otel")]
    let registry =
        registry.with(otel_layer().with_filter(tracing_subscriber::filter::LevelFilter::INFO));
    let _ = registry.try_init();
}

/// The OTLP export layer when the environment asks for one; a failure to start it is logged
/// on standard error and the process runs without it.
#[cfg(feature = "otel")]
fn otel_layer<S>() -> Option<impl tracing_subscriber::Layer<S>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let service = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "sagas".to_owned());
    match sagas_participant::telemetry::layer(&service) {
        Ok(layer) => layer,
        Err(e) => {
            eprintln!("{e}; running without exporting traces");
            None
        }
    }
}

/// Exports the spans still buffered (with the `otel` feature, when exporting); a no-op
/// otherwise.
pub fn shutdown_tracing() {
    #[cfg(feature = "otel")]
    sagas_participant::telemetry::shutdown();
}
