//! Process configuration from the environment.

use sagas_participant::amqp::QueueOptions;
use sagas_participant::protocol::Topology;

/// What a `sagad`-style process needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// PostgreSQL URL of the orchestrator's database (`DATABASE_URL`).
    pub database_url: String,
    /// Broker URL (`AMQP_URL`).
    pub amqp_url: String,
    /// HTTP listen address (`SAGAS_BIND`, default `127.0.0.1:8080`).
    pub bind: String,
    /// Prefix of every exchange and queue name (`SAGAS_AMQP_PREFIX`, default `sagas`).
    pub amqp_prefix: String,
    /// Declare quorum queues (`SAGAS_QUORUM_QUEUES=1`), for RabbitMQ clusters.
    pub quorum_queues: bool,
    /// Database connections (`SAGAS_DB_POOL`, default 16).
    pub db_pool: u32,
    /// Queues vanish after this long unused (`SAGAS_QUEUE_EXPIRES_MS`); for tests and demos only.
    pub queue_expires_ms: Option<u64>,
}

/// The default database URL (local PostgreSQL, trust auth).
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// The default broker URL (local RabbitMQ).
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

impl Config {
    /// Reads the configuration from the environment, with loopback defaults.
    pub fn from_env() -> Config {
        let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
        Config {
            database_url: var("DATABASE_URL", DEFAULT_DATABASE_URL),
            amqp_url: var("AMQP_URL", DEFAULT_AMQP_URL),
            bind: var("SAGAS_BIND", "127.0.0.1:8080"),
            amqp_prefix: var("SAGAS_AMQP_PREFIX", "sagas"),
            quorum_queues: matches!(var("SAGAS_QUORUM_QUEUES", "0").as_str(), "1" | "true"),
            db_pool: var("SAGAS_DB_POOL", "16").parse().unwrap_or(16),
            queue_expires_ms: std::env::var("SAGAS_QUEUE_EXPIRES_MS")
                .ok()
                .and_then(|v| v.parse().ok()),
        }
    }

    /// The AMQP topology.
    pub fn topology(&self) -> Topology {
        Topology::new(self.amqp_prefix.clone())
    }

    /// Queue declaration options.
    pub fn queue_options(&self) -> QueueOptions {
        QueueOptions {
            quorum: self.quorum_queues,
            expires: self.queue_expires_ms.map(std::time::Duration::from_millis),
        }
    }
}
