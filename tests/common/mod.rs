//! Test support: a database pair and an AMQP prefix of its own per test, an in-process
//! orchestrator and accounts participant, and a raw AMQP peer that speaks the wire protocol.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use sagas::orchestrator::clock::SystemClock;
use sagas::orchestrator::machine::Instance;
use sagas::orchestrator::store::{PgStore, SagaStore};
use sagas::orchestrator::transport::{AmqpConfig, AmqpTransport};
use sagas::orchestrator::{Engine, EngineConfig, Registry};
use sagas::participant::amqp::{QueueOptions, delete_topology};
use sagas::participant::{Command, Handler, Participant, Reply, Topology};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The admin database URL (`DATABASE_URL`, default: local PostgreSQL).
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The broker URL (`AMQP_URL`, default: local RabbitMQ).
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let (server, _) = base.rsplit_once('/').expect("database URL with a path");
    format!("{server}/{db}{query}")
}

/// Queue options for tests: leftovers of a crashed test expire.
pub fn queue_options() -> QueueOptions {
    QueueOptions {
        quorum: false,
        expires: Some(Duration::from_secs(600)),
    }
}

/// Two fresh databases (orchestrator, accounts) and a unique AMQP prefix.
pub struct TestEnv {
    pub orch_url: String,
    pub orch: PgPool,
    pub bank_url: String,
    pub bank: PgPool,
    pub topology: Topology,
    dbs: Vec<String>,
}

async fn create_db(name: &str) -> Result<(String, PgPool)> {
    let admin = PgPool::connect(&admin_url())
        .await
        .context("connecting to DATABASE_URL")?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&admin)
        .await?;
    admin.close().await;
    let url = with_database(&admin_url(), name);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await?;
    Ok((url, pool))
}

impl TestEnv {
    pub async fn new() -> Result<TestEnv> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let tag = Uuid::new_v4().simple().to_string();
        let orch_db = format!("sagas_t_{tag}_o");
        let bank_db = format!("sagas_t_{tag}_b");
        let (orch_url, orch) = create_db(&orch_db).await?;
        let (bank_url, bank) = create_db(&bank_db).await?;
        PgStore::new(orch.clone()).migrate().await?;
        Ok(TestEnv {
            orch_url,
            orch,
            bank_url,
            bank,
            topology: Topology::new(format!("t-{tag}")),
            dbs: vec![orch_db, bank_db],
        })
    }

    /// Drops the databases and the AMQP topology.
    pub async fn cleanup(self) {
        self.orch.close().await;
        self.bank.close().await;
        if let Ok(admin) = PgPool::connect(&admin_url()).await {
            for db in &self.dbs {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"
                )))
                .execute(&admin)
                .await;
            }
        }
        if let Ok(conn) = Connection::connect(&amqp_url(), Default::default()).await
            && let Ok(ch) = conn.create_channel().await
        {
            let _ = delete_topology(&ch, &self.topology, &["accounts", "silent"]).await;
            let _ = ch
                .queue_delete(
                    format!("{}.test-replies", self.topology.prefix()).into(),
                    QueueDeleteOptions::default(),
                )
                .await;
            let _ = conn.close(200, "done".into()).await;
        }
    }

    pub fn amqp_config(&self) -> AmqpConfig {
        AmqpConfig {
            uri: amqp_url(),
            topology: self.topology.clone(),
            queues: queue_options(),
        }
    }

    pub fn store(&self) -> PgStore {
        PgStore::new(self.orch.clone())
    }

    /// Waits (bounded) until the instance is terminal, and returns it.
    pub async fn wait_terminal(&self, id: Uuid) -> Result<Instance> {
        let store = self.store();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = store.get(id).await? {
                if s.instance.status.is_terminal() {
                    return Ok(s.instance);
                }
                if tokio::time::Instant::now() > deadline {
                    anyhow::bail!("instance {id} still {:?} after 60 s", s.instance);
                }
            } else if tokio::time::Instant::now() > deadline {
                anyhow::bail!("instance {id} not found");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// An orchestrator (engine + HTTP API) running in this process.
pub struct App {
    pub engine: Arc<Engine>,
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl App {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Engine settings for tests: quick timer polling.
pub fn engine_config() -> EngineConfig {
    EngineConfig {
        timer_poll: Duration::from_millis(20),
        relay_poll: Duration::from_millis(200),
        ..EngineConfig::default()
    }
}

pub async fn spawn_app(env: &TestEnv, registry: Registry) -> Result<App> {
    let engine = Engine::new(
        Arc::new(env.store()),
        Arc::new(AmqpTransport::new(env.amqp_config())),
        registry,
        Arc::new(SystemClock),
        engine_config(),
    );
    engine.declare().await?;
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = sagas::orchestrator::api::router(engine.clone());
    let s = shutdown.clone();
    let http = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { s.cancelled().await })
            .await;
    });
    let runner = {
        let engine = engine.clone();
        let s = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = engine.run(s).await {
                panic!("engine failed: {e}");
            }
        })
    };
    Ok(App {
        engine,
        addr,
        shutdown,
        tasks: vec![http, runner],
    })
}

/// A participant running in this process.
pub struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<()>,
    conn: Arc<Connection>,
}

impl Running {
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
        let _ = self.conn.close(200, "done".into()).await;
    }
}

pub async fn spawn_participant(
    env: &TestEnv,
    name: &str,
    handler: Arc<dyn Handler>,
) -> Result<Running> {
    let conn = Arc::new(Connection::connect(&amqp_url(), Default::default()).await?);
    // Declared before returning, so that nothing published from now on is unroutable.
    let ch = conn.create_channel().await?;
    sagas::participant::amqp::declare_participant(&ch, &env.topology, name, &queue_options())
        .await?;
    let _ = ch.close(200, "declared".into()).await;
    let shutdown = CancellationToken::new();
    let participant = Participant::new(name, env.topology.clone(), env.bank.clone(), handler)
        .queue_options(queue_options());
    let s = shutdown.clone();
    let c = conn.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = participant
            .run(&c, async move { s.cancelled().await })
            .await
        {
            panic!("participant failed: {e}");
        }
    });
    Ok(Running {
        shutdown,
        task,
        conn,
    })
}

/// Speaks the wire protocol with plain AMQP: publishes commands to a participant's queue and
/// reads the replies from a queue of its own.
pub struct RawPeer {
    conn: Connection,
    ch: lapin::Channel,
    topology: Topology,
    replies: lapin::Consumer,
    reply_queue: String,
}

impl RawPeer {
    pub async fn new(env: &TestEnv, participant: &str) -> Result<RawPeer> {
        let conn = Connection::connect(&amqp_url(), Default::default()).await?;
        let ch = conn.create_channel().await?;
        sagas::participant::amqp::declare_participant(
            &ch,
            &env.topology,
            participant,
            &queue_options(),
        )
        .await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let reply_queue = format!("{}.test-replies", env.topology.prefix());
        ch.queue_declare(
            reply_queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let replies = ch
            .basic_consume(
                reply_queue.as_str().into(),
                "raw-peer".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(RawPeer {
            conn,
            ch,
            topology: env.topology.clone(),
            replies,
            reply_queue,
        })
    }

    pub async fn send(&self, participant: &str, cmd: &Command) -> Result<()> {
        let body = serde_json::to_vec(cmd)?;
        let confirm = self
            .ch
            .basic_publish(
                self.topology.commands_exchange().into(),
                participant.into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2)
                    .with_message_id(cmd.message_id().into())
                    .with_reply_to(self.reply_queue.as_str().into()),
            )
            .await?
            .await?;
        anyhow::ensure!(confirm.is_ack(), "command not confirmed");
        Ok(())
    }

    pub async fn next_reply(&mut self) -> Result<Reply> {
        let delivery = tokio::time::timeout(Duration::from_secs(30), self.replies.next())
            .await
            .context("no reply within 30 s")?
            .context("reply consumer closed")??;
        delivery.acker.ack(BasicAckOptions::default()).await?;
        Ok(serde_json::from_slice(&delivery.data)?)
    }

    pub async fn close(self) {
        let _ = self.conn.close(200, "done".into()).await;
    }
}
