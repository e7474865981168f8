//! `sagad`: an orchestrator process that runs definition documents: those of `--definitions
//! DIR`, and those registered through the API (by any process sharing its database). It also
//! drives replies, timers and the outbox of instances started elsewhere. Applications embed the
//! orchestrator with definitions in Rust through `sagas_orchestrator::server::serve`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sagas_orchestrator::config::{Config, parse_duration};
use sagas_orchestrator::definition::Registry;
use sagas_orchestrator::document;
use sagas_orchestrator::server;
use sagas_participant::config::database_options;
use sqlx::Connection as _;
use sqlx::postgres::PgConnection;

// The process allocates and frees many small buffers per message (JSON, SQL rows, AMQP
// frames); with mimalloc the benchmark spends about a tenth less CPU in this process than with
// the system allocator (docs/performance.md, round 5).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ENVIRONMENT: &str = "\
Environment (docs/operations.md, \"Configuration\", has every variable, its default and form):
  DATABASE_URL                 PostgreSQL URL [postgres://postgres@127.0.0.1:5432/postgres]
  AMQP_URL                     RabbitMQ URL [amqp://guest:guest@127.0.0.1:5672/%2f]
  SAGAS_BIND                   HTTP listen address [127.0.0.1:8080]
  SAGAS_API_TOKENS             API tokens, role:token or role:name:token, comma-separated
  SAGAS_API_TOKENS_FILE        a file of such tokens, one per line (instead of the above)
  SAGAS_AMQP_PREFIX            prefix of exchange and queue names [sagas]
  SAGAS_QUORUM_QUEUES          quorum queues, yes/no [no]
  SAGAS_QUEUE_EXPIRES_MS       queue expiry, tests and demos only [unset]
  SAGAS_DB_POOL                database connections, 1 to 1000 [16]
  SAGAS_AMQP_COMMAND_BATCH     commands per AMQP message: unset, up to 16 to participants
                               that announce batches; 1, never; 2 to 256, forced [unset]
  SAGAS_BATCH_LINGER           after a batch of several, how long the next batch of replies
                               or starts waits for more, up to 100ms; 0 = never [5ms]
  SAGAS_BODY_LIMIT             largest request body in bytes [1048576]
  SAGAS_RETENTION              delete finished transactions after, e.g. 30d; 0 = never [0]
  SAGAS_WAIT_NOTIFY            wake ?wait across processes (NOTIFY/LISTEN), yes/no [yes]
  SAGAS_DEFINITIONS            definition documents to register at start-up (--definitions)
  SAGAS_HTTP_HEADER_TIMEOUT_MS, SAGAS_HTTP_BODY_TIMEOUT_MS, SAGAS_HTTP_MAX_CONNECTIONS
  SAGAS_BREAKER                circuit breakers per participant, yes/no [no]; with
                               SAGAS_BREAKER_WINDOW [10s], SAGAS_BREAKER_MIN_VOLUME [20],
                               SAGAS_BREAKER_FAILURE_PERCENT [50], SAGAS_BREAKER_PROBE [5s],
                               SAGAS_BREAKER_PROBE_MAX [60s]
  SAGAS_RATE_LIMITS            commands per second per participant, e.g. payments=5,mail=20
  SAGAS_LOG_FORMAT             log lines as text or json [text]
  RUST_LOG                     log filter [info]

A malformed variable stops sagad with exit code 2 and a message naming each one.";

/// The saga/TCC orchestrator server.
#[derive(Parser)]
#[command(name = "sagad", version, after_help = ENVIRONMENT)]
struct Cli {
    /// What to do (default: serve).
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Registers every definition document (*.yaml, *.yml, *.json) of DIR at start-up
    /// (docs/definitions.md); one that does not compile, or differs from the one registered
    /// under its name and version, stops sagad.
    #[arg(long, value_name = "DIR", env = "SAGAS_DEFINITIONS", global = true)]
    definitions: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the engine and the HTTP API until SIGTERM or Ctrl-C (the default).
    Serve,
    /// Validates the environment, then connects to PostgreSQL and RabbitMQ; prints one line
    /// per check and exits 0 only if all pass (2: a malformed variable; 1: a service is
    /// unreachable).
    CheckConfig {
        /// How long each connection may take.
        #[arg(long, default_value = "5s", value_parser = parse_timeout)]
        timeout: Duration,
    },
}

fn parse_timeout(raw: &str) -> Result<Duration, String> {
    parse_duration(raw)?
        .to_std()
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{raw:?} is not a positive duration"))
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let config = Config::from_env().unwrap_or_else(|e| e.exit());
    match cli.command.unwrap_or(Cmd::Serve) {
        Cmd::Serve => {
            server::init_tracing_as(config.log_format);
            let registry = match &cli.definitions {
                Some(dir) => documents(dir)?,
                None => Registry::new(),
            };
            let served = server::serve(config, registry, None).await;
            server::shutdown_tracing();
            served?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::CheckConfig { timeout } => Ok(check_config(&config, timeout).await),
    }
}

/// The definitions of the documents in `dir`, compiled.
fn documents(dir: &Path) -> anyhow::Result<Registry> {
    let mut registry = Registry::new();
    for (file, doc) in document::read_path(dir)? {
        let doc = doc.with_context(|| format!("refusing to start: {}", file.display()))?;
        let def = document::compile(&doc)
            .with_context(|| format!("refusing to start: {}", file.display()))?;
        tracing::info!(file = %file.display(), definition = def.name(), version = def.version(), "definition document");
        registry
            .register(def)
            .with_context(|| format!("refusing to start: {}", file.display()))?;
    }
    Ok(registry)
}

/// Connects to both services, each within `timeout`, and says how it went.
async fn check_config(config: &Config, timeout: Duration) -> ExitCode {
    println!("environment: ok");
    let postgres = within(timeout, async {
        let options = database_options(&config.database_url)?;
        let mut conn = PgConnection::connect_with(&options).await?;
        sqlx::query("SELECT 1").execute(&mut conn).await?;
        conn.close().await?;
        anyhow::Ok(())
    })
    .await;
    report("postgresql (DATABASE_URL)", &postgres);
    let rabbitmq = within(timeout, async {
        let conn = sagas_participant::amqp::connect(&config.amqp_url).await?;
        conn.close(200, "check-config".into()).await?;
        anyhow::Ok(())
    })
    .await;
    report("rabbitmq (AMQP_URL)", &rabbitmq);
    if postgres.is_ok() && rabbitmq.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn within(
    timeout: Duration,
    check: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    tokio::time::timeout(timeout, check)
        .await
        .map_err(|_| anyhow::anyhow!("no connection within {timeout:?}"))?
}

fn report(what: &str, result: &anyhow::Result<()>) {
    match result {
        Ok(()) => println!("{what}: ok"),
        Err(e) => println!("{what}: error: {e}"),
    }
}
