//! Test helpers of the participant SDK's tests: a database of its own with the barrier and an
//! `accounts` table, a broker topology of its own, a small bank participant (TCC step
//! `reserve`, saga step `credit`) over `accounts`, and the capture of the SDK's spans. Where the
//! services are, and the unique names, come from `sagas-test-support`, shared with the
//! end-to-end tests.

pub mod traces;

use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::{BasicProperties, Channel, Connection};
use sagas_participant::amqp::{self, QueueOptions};
use sagas_participant::barrier;
use sagas_participant::handler::{HandlerError, Router, Saga, SagaHandler, Tcc, TccHandler};
use sagas_participant::protocol::{Command, Operation, PROTOCOL_VERSION, Reply, Topology};
use sagas_participant::runtime::{Participant, RuntimeError, Stats};
use sagas_test_support::{
    TestDatabase, close_broker, connect_broker, queue_options, unique_tag, unique_topology,
};
pub use sagas_test_support::{amqp_url, eventually};
use serde_json::{Value, json};
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// A database of its own, with the barrier installed and an `accounts` table; dropped on drop.
pub struct TestDb {
    pub pool: PgPool,
    db: TestDatabase,
}

impl TestDb {
    /// Creates the database; `max_connections` bounds the pool.
    pub async fn with_connections(max_connections: u32) -> TestDb {
        // Before any span of the SDK: see `traces`.
        traces::install();
        let db = TestDatabase::create(&format!("sagas_t_{}", unique_tag()), max_connections)
            .await
            .expect("create the test database");
        let pool = db.pool.clone();
        barrier::install(&pool).await.expect("install the barrier");
        sqlx::raw_sql(
            "CREATE TABLE accounts (id text PRIMARY KEY, balance bigint NOT NULL, \
             reserved bigint NOT NULL DEFAULT 0)",
        )
        .execute(&pool)
        .await
        .expect("create accounts");
        TestDb { pool, db }
    }

    /// Creates the database with a pool of 10 connections.
    pub async fn new() -> TestDb {
        TestDb::with_connections(10).await
    }

    /// Its URL.
    pub fn url(&self) -> &str {
        &self.db.url
    }

    /// Opens an account.
    pub async fn open(&self, id: &str, balance: i64) {
        sqlx::query("INSERT INTO accounts (id, balance) VALUES ($1, $2)")
            .bind(id)
            .bind(balance)
            .execute(&self.pool)
            .await
            .expect("open account");
    }

    /// Terminates every server connection to this database (as a PostgreSQL restart would);
    /// returns how many there were.
    pub async fn kill_connections(&self) -> u64 {
        let mut conn = admin().await;
        let killed: Vec<(bool,)> = sqlx::query_as(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&self.db.name)
        .fetch_all(&mut conn)
        .await
        .expect("terminate backends");
        conn.close().await.ok();
        killed.into_iter().filter(|(ok,)| *ok).count() as u64
    }

    /// Waits up to 10 s until a connection to this database is idle inside a transaction: a
    /// handler has written and is now sleeping (the bank's `sleep_ms`).
    pub async fn wait_handler_in_transaction(&self) {
        let mut conn = admin().await;
        for _ in 0..500 {
            // The bank handler's last statement before its sleep; `barrier::install` at
            // start-up is idle in a transaction too, between its statements.
            let (n,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
                 AND state = 'idle in transaction' AND query LIKE 'UPDATE accounts%'",
            )
            .bind(&self.db.name)
            .fetch_one(&mut conn)
            .await
            .expect("read pg_stat_activity");
            if n > 0 {
                conn.close().await.ok();
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no handler in a transaction within 10 s");
    }

    /// `(balance, reserved)` of an account.
    pub async fn account(&self, id: &str) -> (i64, i64) {
        sqlx::query_as("SELECT balance, reserved FROM accounts WHERE id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .expect("read account")
    }
}

async fn admin() -> PgConnection {
    sagas_test_support::admin()
        .await
        .expect("connect to the admin database")
}

/// A command for step `step` of transaction `id`.
pub fn command(id: Uuid, step: &str, operation: Operation, payload: Value) -> Command {
    Command {
        protocol: PROTOCOL_VERSION,
        transaction_id: id,
        definition: "transfer".to_owned(),
        step: step.to_owned(),
        operation,
        attempt: 1,
        payload,
        output: None,
        deadline: None,
        traceparent: None,
    }
}

/// The same command, redelivered as a later attempt.
pub fn again(cmd: &Command) -> Command {
    Command {
        attempt: cmd.attempt + 1,
        ..cmd.clone()
    }
}

/// The name of the bank participant in the tests that run it.
pub const BANK: &str = "bank";

/// The test participant: `reserve` (TCC) and `credit` (saga) over `accounts`.
///
/// Payload: `{"account": id, "amount": n}`, plus optional `"fail"` (`"business"`,
/// `"business_after_write"`, `"transient"`, `"panic"`), `"fail_undo"` (`"business"`) and
/// `"sleep_ms"` (sleeps inside the transaction after writing).
pub fn bank() -> Router {
    Router::new()
        .route("reserve", Tcc(Bank))
        .route("credit", Saga(Bank))
}

pub struct Bank;

fn account(cmd: &Command) -> String {
    cmd.payload["account"].as_str().unwrap_or("a").to_owned()
}

fn amount(cmd: &Command) -> i64 {
    cmd.payload["amount"].as_i64().unwrap_or(10)
}

async fn after_write(cmd: &Command, field: &str) -> Result<(), HandlerError> {
    if let Some(ms) = cmd.payload["sleep_ms"].as_u64() {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    match cmd.payload[field].as_str() {
        Some("business_after_write") | Some("business") => {
            Err(HandlerError::business("injected business failure"))
        }
        Some("transient") => Err(HandlerError::transient("injected transient error")),
        Some("panic") => panic!("injected panic"),
        _ => Ok(()),
    }
}

async fn update(
    tx: &mut PgConnection,
    sql: &'static str,
    cmd: &Command,
) -> Result<u64, HandlerError> {
    Ok(sqlx::query(sql)
        .bind(account(cmd))
        .bind(amount(cmd))
        .execute(tx)
        .await?
        .rows_affected())
}

#[async_trait]
impl TccHandler for Bank {
    async fn try_(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        if cmd.payload["fail"] == "business" {
            return Err(HandlerError::business("injected business failure"));
        }
        let updated = update(
            tx,
            "UPDATE accounts SET balance = balance - $2, reserved = reserved + $2 \
             WHERE id = $1 AND balance >= $2",
            cmd,
        )
        .await?;
        if updated == 0 {
            return Err(HandlerError::business("insufficient funds"));
        }
        after_write(cmd, "fail").await?;
        Ok(json!({ "reserved": amount(cmd) }))
    }

    async fn confirm(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        update(
            tx,
            "UPDATE accounts SET reserved = reserved - $2 WHERE id = $1",
            cmd,
        )
        .await?;
        after_write(cmd, "fail_undo").await?;
        Ok(json!({ "confirmed": amount(cmd) }))
    }

    async fn cancel(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        update(
            tx,
            "UPDATE accounts SET balance = balance + $2, reserved = reserved - $2 WHERE id = $1",
            cmd,
        )
        .await?;
        after_write(cmd, "fail_undo").await?;
        Ok(json!({ "released": amount(cmd) }))
    }
}

#[async_trait]
impl SagaHandler for Bank {
    async fn action(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        update(
            tx,
            "UPDATE accounts SET balance = balance + $2 WHERE id = $1",
            cmd,
        )
        .await?;
        after_write(cmd, "fail").await?;
        Ok(json!({ "credited": amount(cmd) }))
    }

    async fn compensate(
        &self,
        cmd: &Command,
        tx: &mut PgConnection,
    ) -> Result<Value, HandlerError> {
        update(
            tx,
            "UPDATE accounts SET balance = balance - $2 WHERE id = $1",
            cmd,
        )
        .await?;
        after_write(cmd, "fail_undo").await?;
        Ok(json!({ "debited": amount(cmd) }))
    }
}

/// A participant runtime running in this process until [`Running::shutdown`].
pub struct Running {
    pub stats: Stats,
    pub stop: oneshot::Sender<()>,
    pub task: JoinHandle<Result<(), RuntimeError>>,
}

impl Running {
    /// Stops the runtime and checks that it ended well within 10 s.
    pub async fn shutdown(self) {
        self.stop.send(()).ok();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the runtime stops within 10 s")
            .expect("the runtime task does not panic")
            .expect("the runtime returns Ok on shutdown");
    }
}

/// The bank participant ([`BANK`]) on `db`, with `broker`'s topology and queue options.
pub fn bank_participant(db: &TestDb, broker: &TestBroker) -> Participant {
    Participant::new(
        BANK,
        broker.topology.clone(),
        db.pool.clone(),
        std::sync::Arc::new(bank()),
    )
    .queue_options(broker.options.clone())
}

/// Waits up to 10 s until `stats` counts `n` processed commands (or more), for a test that
/// has read every reply: the runtime counts a command once the broker has confirmed its reply,
/// which can be after the reply was delivered. The caller asserts the count.
pub async fn wait_processed(stats: &Stats, n: u64) {
    for _ in 0..500 {
        if stats.processed() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `participant` on a connection of its own.
pub fn start_with(participant: Participant) -> Running {
    let stats = participant.stats();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let conn = amqp::connect(&amqp_url()).await?;
        let result = participant
            .run(&conn, async {
                stopped.await.ok();
            })
            .await;
        close_broker(&conn).await;
        result
    });
    Running { stats, stop, task }
}

/// Runs `participant` with [`Participant::run_forever`] on the broker at `amqp_url`.
pub fn start_forever(participant: Participant, amqp_url: String) -> Running {
    let stats = participant.stats();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        participant
            .run_forever(&amqp_url, async {
                stopped.await.ok();
            })
            .await
    });
    Running { stats, stop, task }
}

/// A long-string header of `properties`.
pub fn text_header(properties: &BasicProperties, name: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(name)? {
        lapin::types::AMQPValue::LongString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// A broker connection and a topology of its own (queues expire if the test dies).
pub struct TestBroker {
    pub conn: Connection,
    pub channel: Channel,
    pub topology: Topology,
    pub options: QueueOptions,
}

impl TestBroker {
    /// Connects, and declares the replies queue and the dead-letter part.
    pub async fn new() -> TestBroker {
        traces::install();
        let conn = connect_broker().await.expect("connect to RabbitMQ");
        let channel = conn.create_channel().await.expect("channel");
        let topology = unique_topology();
        let options = queue_options();
        amqp::declare_replies(&channel, &topology, &options)
            .await
            .expect("declare replies");
        TestBroker {
            conn,
            channel,
            topology,
            options,
        }
    }

    /// Declares a participant's queue as the orchestrator would.
    pub async fn declare_participant(&self, participant: &str) {
        amqp::declare_participant(&self.channel, &self.topology, participant, &self.options)
            .await
            .expect("declare participant");
    }

    /// Publishes a command to a participant through the commands exchange.
    pub async fn send(&self, participant: &str, cmd: &Command) {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(cmd.message_id().into())
            .with_reply_to(self.topology.replies_queue().into());
        self.publish_raw(
            &self.topology.commands_exchange(),
            participant,
            &serde_json::to_vec(cmd).expect("encode"),
            props,
        )
        .await;
    }

    /// Publishes any bytes with any properties.
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) {
        self.channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .expect("publish");
    }

    /// Waits up to 10 s for the next message on `queue`.
    pub async fn next_message(&self, queue: &str) -> lapin::message::BasicGetMessage {
        for _ in 0..500 {
            let message = self
                .channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                .await
                .expect("basic.get");
            if let Some(message) = message {
                return message;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no message on {queue} within 10 s");
    }

    /// Messages ready in `queue` (not counting those delivered and unacked).
    pub async fn ready_messages(&self, queue: &str) -> u32 {
        use lapin::options::QueueDeclareOptions;
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .expect("passive queue.declare")
            .message_count()
    }

    /// Waits up to 10 s until `queue` exists and has a consumer (so it is bound, too).
    pub async fn wait_consumer(&self, queue: &str) {
        self.wait_consumers(queue, true).await;
    }

    /// Waits up to 10 s until `queue` exists and has a consumer (`present`) or none.
    pub async fn wait_consumers(&self, queue: &str, present: bool) {
        use lapin::options::QueueDeclareOptions;
        for _ in 0..500 {
            // A NOT_FOUND closes the channel: use a fresh one each time.
            let channel = self.conn.create_channel().await.expect("channel");
            let declared = channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    lapin::types::FieldTable::default(),
                )
                .await;
            if let Ok(declared) = declared {
                channel.close(200, "OK".into()).await.ok();
                if (declared.consumer_count() > 0) == present {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match present {
            true => panic!("{queue} has no consumer after 10 s"),
            false => panic!("{queue} still has a consumer after 10 s"),
        }
    }

    /// Waits for the next reply.
    pub async fn next_reply(&self) -> (Reply, BasicProperties) {
        let message = self.next_message(&self.topology.replies_queue()).await;
        let reply = serde_json::from_slice(&message.delivery.data).expect("decode reply");
        (reply, message.delivery.properties.clone())
    }

    /// Deletes the topology.
    pub async fn teardown(self, participants: &[&str]) {
        amqp::delete_topology(&self.channel, &self.topology, participants)
            .await
            .expect("delete topology");
        close_broker(&self.conn).await;
    }
}

/// The raw JSON of a command, as an element of a command batch.
pub fn element(cmd: &Command) -> Vec<u8> {
    serde_json::to_vec(cmd).expect("encode")
}

/// The properties of a command batch of `count` elements, as the orchestrator sends it.
pub fn batch_properties(topology: &Topology, count: usize) -> BasicProperties {
    amqp::batch_properties(&Uuid::new_v4().to_string(), count)
        .with_reply_to(topology.replies_queue().into())
}

impl TestBroker {
    /// Publishes a command batch of raw elements (valid or not) to a participant.
    pub async fn send_batch(&self, participant: &str, elements: &[Vec<u8>]) {
        let body = sagas_participant::protocol::join_batch(elements.iter().map(Vec::as_slice));
        self.publish_raw(
            &self.topology.commands_exchange(),
            participant,
            &body,
            batch_properties(&self.topology, elements.len()),
        )
        .await;
    }

    /// Waits for the next message on the replies queue and decodes it as a reply batch.
    pub async fn next_reply_batch(&self) -> (Vec<Reply>, BasicProperties) {
        let message = self.next_message(&self.topology.replies_queue()).await;
        let replies = serde_json::from_slice(&message.delivery.data).expect("decode reply batch");
        (replies, message.delivery.properties.clone())
    }
}
