//! The harness of the end-to-end tests: a database pair and an AMQP prefix of its own per test
//! (from `sagas-test-support`, shared with the participant SDK's tests), an in-process
//! orchestrator and participants, a raw AMQP peer and participant that speak the wire
//! protocol, bounded waits, and the binaries the tests run.

use std::net::SocketAddr;
use std::path::PathBuf;
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
use sagas::orchestrator::api::ApiOptions;
use sagas::orchestrator::clock::SystemClock;
use sagas::orchestrator::config::HttpLimits;
use sagas::orchestrator::machine::Instance;
use sagas::orchestrator::store::{PgStore, SagaStore};
use sagas::orchestrator::transport::{AmqpConfig, AmqpTransport, CommandBatch};
use sagas::orchestrator::{Engine, EngineConfig, Registry};
use sagas::participant::{Command, Handler, Participant, Reply, Topology};
use sagas_test_support::{TestDatabase, delete_amqp, topology, unique_tag};
pub use sagas_test_support::{amqp_url, close_broker, connect_broker, queue_options};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Two fresh databases (orchestrator, accounts) and a unique AMQP prefix.
pub struct TestEnv {
    pub orch_url: String,
    pub orch: PgPool,
    pub bank_url: String,
    pub bank: PgPool,
    pub topology: Topology,
    dbs: Vec<TestDatabase>,
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
        let tag = unique_tag();
        let orch = TestDatabase::create(&format!("sagas_t_{tag}_o"), 8).await?;
        let bank = TestDatabase::create(&format!("sagas_t_{tag}_b"), 8).await?;
        PgStore::new(orch.pool.clone()).migrate().await?;
        Ok(TestEnv {
            orch_url: orch.url.clone(),
            orch: orch.pool.clone(),
            bank_url: bank.url.clone(),
            bank: bank.pool.clone(),
            topology: topology(&tag),
            dbs: vec![orch, bank],
        })
    }

    /// Drops the databases and the AMQP topology.
    pub async fn cleanup(self) {
        for db in self.dbs {
            db.remove().await;
        }
        delete_amqp(
            &self.topology,
            &["accounts", "silent", "orders", "inventory", "payment"],
            &[format!("{}.test-replies", self.topology.prefix())],
        )
        .await;
    }

    pub fn amqp_config(&self) -> AmqpConfig {
        AmqpConfig {
            uri: amqp_url(),
            topology: self.topology.clone(),
            queues: queue_options(),
            command_batch: CommandBatch::default(),
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

/// An orchestrator on the test's database and AMQP prefix, serving its HTTP API on a port of
/// its own.
pub async fn spawn_app(env: &TestEnv, registry: Registry) -> Result<App> {
    spawn_app_with(env, registry, env.amqp_config()).await
}

/// [`spawn_app`] with transport settings of its own (e.g. command batches).
pub async fn spawn_app_with(env: &TestEnv, registry: Registry, amqp: AmqpConfig) -> Result<App> {
    spawn_app_with_engine(env, registry, amqp, engine_config()).await
}

/// [`spawn_app_with`] with engine settings of its own.
pub async fn spawn_app_with_engine(
    env: &TestEnv,
    registry: Registry,
    amqp: AmqpConfig,
    engine: EngineConfig,
) -> Result<App> {
    spawn(
        env,
        registry,
        amqp,
        engine,
        ApiOptions::default(),
        HttpLimits::default(),
    )
    .await
}

/// [`spawn_app`] with HTTP API options of its own (tokens, body limit).
pub async fn spawn_app_with_api(
    env: &TestEnv,
    registry: Registry,
    options: ApiOptions,
) -> Result<App> {
    spawn(
        env,
        registry,
        env.amqp_config(),
        engine_config(),
        options,
        HttpLimits::default(),
    )
    .await
}

/// [`spawn_app_with_api`] served within HTTP limits of its own (timeouts, connection cap), the
/// body timeout of `limits` replacing that of `options`, as `server::serve` does.
pub async fn spawn_app_with_limits(
    env: &TestEnv,
    registry: Registry,
    options: ApiOptions,
    limits: HttpLimits,
) -> Result<App> {
    let options = ApiOptions {
        body_timeout: limits.body_timeout,
        ..options
    };
    spawn(
        env,
        registry,
        env.amqp_config(),
        engine_config(),
        options,
        limits,
    )
    .await
}

async fn spawn(
    env: &TestEnv,
    registry: Registry,
    amqp: AmqpConfig,
    engine: EngineConfig,
    options: ApiOptions,
    limits: HttpLimits,
) -> Result<App> {
    let engine = Engine::new(
        Arc::new(env.store()),
        Arc::new(AmqpTransport::new(amqp)),
        registry,
        Arc::new(SystemClock),
        engine,
    );
    engine.register_definitions().await?;
    engine.declare().await?;
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = sagas::orchestrator::api::router_with(engine.clone(), options);
    // Served as `sagad` serves it, limits included.
    let http = tokio::spawn(sagas::orchestrator::server::serve_http(
        listener,
        app,
        limits,
        shutdown.clone(),
    ));
    let runner = {
        let engine = engine.clone();
        let s = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = engine.run(s).await {
                panic!("engine failed: {e}");
            }
        })
    };
    // Ready, as a load balancer would wait for `/readyz`: replies and starts are consumed.
    tokio::time::timeout(Duration::from_secs(60), engine.until_running())
        .await
        .context("the engine did not run within 60 s")?;
    Ok(App {
        engine,
        addr,
        shutdown,
        tasks: vec![http, runner],
    })
}

/// A participant running in this process.
pub struct Running {
    pub stats: sagas::participant::runtime::Stats,
    /// What its replies announce (for replies sent on its behalf, as `runtime::complete` does).
    pub announcement: sagas::participant::amqp::Announcement,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
    conn: Arc<Connection>,
}

impl Running {
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
        close_broker(&self.conn).await;
    }
}

pub async fn spawn_participant(
    env: &TestEnv,
    name: &str,
    handler: Arc<dyn Handler>,
) -> Result<Running> {
    spawn_participant_with(env, name, handler, |p| p).await
}

/// [`spawn_participant`] with settings of its own (`configure` gets it with the defaults).
pub async fn spawn_participant_with(
    env: &TestEnv,
    name: &str,
    handler: Arc<dyn Handler>,
    configure: impl FnOnce(Participant) -> Participant,
) -> Result<Running> {
    let conn = Arc::new(connect_broker().await?);
    // Declared before returning, so that nothing published from now on is unroutable.
    let ch = conn.create_channel().await?;
    sagas::participant::amqp::declare_participant(&ch, &env.topology, name, &queue_options())
        .await?;
    let _ = ch.close(200, "declared".into()).await;
    let shutdown = CancellationToken::new();
    let participant = configure(
        Participant::new(name, env.topology.clone(), env.bank.clone(), handler)
            .queue_options(queue_options()),
    );
    let stats = participant.stats();
    let announcement = participant.announcement();
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
        stats,
        announcement,
        shutdown,
        task,
        conn,
    })
}

/// A participant `name` on the raw protocol whose answers are scripted: each command is
/// decoded, `answer` decides its outcome (`None`: no reply at all), the reply is published to
/// the command's `reply_to` with a confirm, and the command is acked.
pub async fn scripted_participant(
    env: &TestEnv,
    name: &str,
    answer: impl Fn(&Command) -> Option<sagas::participant::Outcome> + Send + 'static,
) -> Result<(Connection, JoinHandle<()>)> {
    let conn = connect_broker().await?;
    let ch = conn.create_channel().await?;
    sagas::participant::amqp::declare_participant(&ch, &env.topology, name, &queue_options())
        .await?;
    let mut consumer = ch
        .basic_consume(
            env.topology.participant_queue(name).into(),
            format!("scripted-{name}").into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let task = tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let cmd: Command = serde_json::from_slice(&d.data).unwrap();
            if let Some(outcome) = answer(&cmd) {
                let reply = cmd.reply(outcome);
                let reply_to = d.properties.reply_to().clone().unwrap();
                ch.basic_publish(
                    "".into(),
                    reply_to,
                    BasicPublishOptions::default(),
                    &serde_json::to_vec(&reply).unwrap(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            }
            d.acker.ack(BasicAckOptions::default()).await.unwrap();
        }
    });
    Ok((conn, task))
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
        let conn = connect_broker().await?;
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
        close_broker(&self.conn).await;
    }
}

// --- Conformance helpers (tests/conformance.rs) -------------------------------------------------

/// A command as a raw participant received it: the JSON body, the AMQP properties, and when.
#[derive(Debug, Clone)]
pub struct Received {
    pub body: serde_json::Value,
    pub properties: BasicProperties,
    pub at: tokio::time::Instant,
}

impl Received {
    /// A body field as a string (panics when absent: the protocol requires it).
    pub fn field(&self, name: &str) -> &str {
        self.body[name]
            .as_str()
            .unwrap_or_else(|| panic!("command field {name:?} is not a string: {}", self.body))
    }

    /// `(step, operation, attempt)` from the body.
    pub fn key(&self) -> (String, String, u64) {
        (
            self.field("step").to_owned(),
            self.field("operation").to_owned(),
            self.body["attempt"].as_u64().expect("numeric attempt"),
        )
    }
}

/// A participant written against the wire protocol with nothing but lapin and JSON literals:
/// it declares its queue with the documented arguments, hands every command to the test and
/// publishes whatever reply body the test writes.
pub struct RawParticipant {
    conn: Connection,
    ch: lapin::Channel,
    queue: String,
    commands: tokio::sync::mpsc::UnboundedReceiver<Received>,
    task: JoinHandle<()>,
}

impl RawParticipant {
    /// Declares (exactly as docs/protocol.md says, with the test queue expiry) and consumes the
    /// queue of participant `name`.
    pub async fn start(env: &TestEnv, name: &str) -> Result<RawParticipant> {
        use lapin::ExchangeKind;
        use lapin::options::{ExchangeDeclareOptions, QueueBindOptions};
        use lapin::types::{AMQPValue, LongString};

        let p = env.topology.prefix();
        let expires = i64::try_from(queue_options().expires.expect("tests expire").as_millis())?;
        let conn = connect_broker().await?;
        let ch = conn.create_channel().await?;
        let exchange = ExchangeDeclareOptions {
            durable: true,
            auto_delete: true, // because queue expiry is configured
            ..Default::default()
        };
        let queue = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let with_expiry = |dlx: Option<String>| {
            let mut args = FieldTable::default();
            if let Some(dlx) = dlx {
                args.insert(
                    "x-dead-letter-exchange".into(),
                    AMQPValue::LongString(LongString::from(dlx)),
                );
            }
            args.insert("x-expires".into(), AMQPValue::LongLongInt(expires));
            args
        };
        let (dlx, dead) = (format!("{p}.dlx"), format!("{p}.dead"));
        ch.exchange_declare(
            dlx.as_str().into(),
            ExchangeKind::Fanout,
            exchange,
            FieldTable::default(),
        )
        .await?;
        ch.queue_declare(dead.as_str().into(), queue, with_expiry(None))
            .await?;
        ch.queue_bind(
            dead.as_str().into(),
            dlx.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let (commands, own) = (format!("{p}.commands"), format!("{p}.participant.{name}"));
        ch.exchange_declare(
            commands.as_str().into(),
            ExchangeKind::Direct,
            exchange,
            FieldTable::default(),
        )
        .await?;
        ch.queue_declare(own.as_str().into(), queue, with_expiry(Some(dlx)))
            .await?;
        ch.queue_bind(
            own.as_str().into(),
            commands.as_str().into(),
            name.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;

        let consume = conn.create_channel().await?;
        let mut consumer = consume
            .basic_consume(
                own.as_str().into(),
                "raw-participant".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let (tx, commands_rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let _channel = consume;
            while let Some(Ok(d)) = consumer.next().await {
                let body = serde_json::from_slice(&d.data).unwrap_or_else(|e| {
                    serde_json::Value::String(format!("undecodable command: {e}"))
                });
                let received = Received {
                    body,
                    properties: d.properties.clone(),
                    at: tokio::time::Instant::now(),
                };
                let _ = d.acker.ack(BasicAckOptions::default()).await;
                if tx.send(received).is_err() {
                    return;
                }
            }
        });
        Ok(RawParticipant {
            conn,
            ch,
            queue: own,
            commands: commands_rx,
            task,
        })
    }

    /// The next command (bounded wait: 30 s).
    pub async fn next(&mut self) -> Result<Received> {
        tokio::time::timeout(Duration::from_secs(30), self.commands.recv())
            .await
            .context("no command within 30 s")?
            .context("the raw participant's consumer ended")
    }

    /// The next command, which must be `(step, operation, attempt)`.
    pub async fn expect(&mut self, step: &str, operation: &str, attempt: u64) -> Result<Received> {
        let received = self.next().await?;
        anyhow::ensure!(
            received.key() == (step.to_owned(), operation.to_owned(), attempt),
            "expected {step}/{operation}/{attempt}, got {}",
            received.body
        );
        Ok(received)
    }

    /// Asserts that no command arrives for `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) -> Result<()> {
        match tokio::time::timeout(wait, self.commands.recv()).await {
            Err(_) => Ok(()),
            Ok(Some(r)) => anyhow::bail!("unexpected command: {}", r.body),
            Ok(None) => anyhow::bail!("the raw participant's consumer ended"),
        }
    }

    /// The reply body for `to` with `outcome` (a JSON object with `status`), built by hand.
    pub fn reply_body(to: &Received, outcome: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "protocol": 1,
            "transaction_id": to.body["transaction_id"],
            "step": to.body["step"],
            "operation": to.body["operation"],
            "attempt": to.body["attempt"],
            "outcome": outcome,
        })
    }

    /// Publishes `reply_body(to, outcome)` to the command's `reply_to`.
    pub async fn reply(&self, to: &Received, outcome: serde_json::Value) -> Result<()> {
        let body = serde_json::to_vec(&Self::reply_body(to, outcome))?;
        self.reply_raw(to, &body).await
    }

    /// Publishes any bytes to the command's `reply_to`, as the documented reply properties say.
    pub async fn reply_raw(&self, to: &Received, body: &[u8]) -> Result<()> {
        let reply_to = to
            .properties
            .reply_to()
            .clone()
            .context("command without reply_to")?;
        let confirm = self
            .ch
            .basic_publish(
                "".into(),
                reply_to,
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2),
            )
            .await?
            .await?;
        anyhow::ensure!(confirm.is_ack(), "reply not confirmed");
        anyhow::ensure!(confirm.take_message().is_none(), "reply unroutable");
        Ok(())
    }

    /// Deletes the participant's queue and closes the connection.
    pub async fn close(self) {
        self.task.abort();
        let _ = self
            .ch
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        close_broker(&self.conn).await;
    }
}

/// Waits (bounded: 30 s) until the instance has `status`, and returns it.
pub async fn wait_status(
    env: &TestEnv,
    id: Uuid,
    status: sagas::orchestrator::Status,
) -> Result<Instance> {
    let store = env.store();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let current = store.get(id).await?.map(|s| s.instance);
        if let Some(instance) = &current
            && instance.status == status
        {
            return Ok(current.unwrap());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("instance {id} not {status:?} after 30 s: {current:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (bounded: 30 s) until the instance's log has an event for which `pred` holds, and
/// returns it.
pub async fn wait_event(
    app: &App,
    id: Uuid,
    pred: impl Fn(&sagas::orchestrator::store::LoggedEvent) -> bool,
) -> Result<sagas::orchestrator::store::LoggedEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let events = app.engine.events(id).await?;
        if let Some(e) = events.iter().find(|e| pred(e)) {
            return Ok(e.clone());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("no such event after 30 s; log: {events:#?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET path` of `app`, which must answer 200 with JSON.
pub async fn get(http: &reqwest::Client, app: &App, path: &str) -> Result<serde_json::Value> {
    let res = http.get(app.url(path)).send().await?;
    anyhow::ensure!(res.status() == 200, "GET {path} answered {}", res.status());
    Ok(res.json().await?)
}

/// Polls `GET path` (bounded: 30 s) until `done` holds for the answer, and returns it.
pub async fn poll(
    http: &reqwest::Client,
    app: &App,
    path: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let answer = get(http, app, path).await?;
        if done(&answer) {
            return Ok(answer);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "GET {path} still answers {answer:#} after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Runs the built `sagactl` with `args` and none of its environment variables (every test
/// names its database and server on the command line), and waits for it.
pub fn run_sagactl(args: &[&str]) -> Result<std::process::Output> {
    Ok(std::process::Command::new(built_binary("sagactl")?)
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("SAGAS_URL")
        .env_remove("SAGAS_TOKEN")
        .output()?)
}

/// Kills a child process (SIGKILL) and reaps it, if there is one.
pub fn kill_child(slot: &mut Option<std::process::Child>) {
    if let Some(mut child) = slot.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The bank's books after its transfers settled: money conserved, nothing frozen or pending,
/// every account `acct-N` holding exactly `expected[N]` (an effect applied twice, or lost,
/// shows here), the example's `audit` passing, and `sagactl reconcile` consistent with the
/// accounts participant's barrier table cross-checked.
pub async fn check_bank_books(env: &TestEnv, expected: &[i64]) -> Result<()> {
    use crate::examples::bank;

    let audit = bank::audit(&env.bank).await?;
    anyhow::ensure!(audit.holds(), "{audit:?}");
    anyhow::ensure!((audit.frozen, audit.pending) == (0, 0), "{audit:?}");
    let balances: Vec<(String, i64, i64, i64)> =
        sqlx::query_as("SELECT id, available, frozen, pending FROM bank_accounts")
            .fetch_all(&env.bank)
            .await?;
    for (account, available, frozen, pending) in balances {
        let i: usize = account["acct-".len()..].parse()?;
        let want = (expected.get(i).copied(), 0, 0);
        anyhow::ensure!(
            (Some(available), frozen, pending) == want,
            "{account}: (available, frozen, pending) = ({available}, {frozen}, {pending}), \
             expected {want:?}"
        );
    }
    let out = std::process::Command::new(built_binary("examples/bank_transfer")?)
        .arg("audit")
        .env("ACCOUNTS_DATABASE_URL", &env.bank_url)
        .output()?;
    anyhow::ensure!(out.status.success(), "bank_transfer audit: {out:?}");

    // The log against itself and against the participant's barrier table.
    let report = reconcile_bank(env)?;
    anyhow::ensure!(report["consistent"] == true, "{report}");
    Ok(())
}

/// `sagactl reconcile --format json` over the test's orchestrator database, with the bank
/// participant's barrier table cross-checked: the report, once the command exited 0.
pub fn reconcile_bank(env: &TestEnv) -> Result<serde_json::Value> {
    let participant = format!("{}={}", crate::examples::bank::PARTICIPANT, env.bank_url);
    let out = run_sagactl(&[
        "reconcile",
        "--database-url",
        &env.orch_url,
        "--participant",
        &participant,
        "--format",
        "json",
    ])?;
    let report = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.code() == Some(0),
        "sagactl reconcile: {report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_str(&report)?)
}

/// A binary of this workspace built next to this test binary: `target/debug/<name>` (`sagactl`)
/// or `target/debug/examples/<name>`; `cargo build --all-targets` builds them all, as
/// `scripts/test` does before the tests.
pub fn built_binary(path: &str) -> Result<PathBuf> {
    // target/debug/deps/e2e-<hash> -> target/debug
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .context("target dir")?;
    let bin = dir.join(format!("{path}{}", std::env::consts::EXE_SUFFIX));
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: build every target first (`cargo build --workspace --all-targets`, as \
         scripts/test does)",
        bin.display()
    );
    Ok(bin)
}

/// The Prometheus text at `url`, checked to be answered 200 as `text/plain`.
pub async fn scrape(http: &reqwest::Client, url: &str) -> Result<String> {
    let res = http.get(url).send().await?;
    anyhow::ensure!(res.status() == 200, "{url}: {}", res.status());
    let kind = res.headers()["content-type"].to_str()?.to_owned();
    anyhow::ensure!(kind.starts_with("text/plain"), "{url}: {kind}");
    Ok(res.text().await?)
}
