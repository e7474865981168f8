//! Transactional starts: a service starts a transaction in its own database transaction.
//!
//! A service that commits a change (an order row) and then asks the orchestrator to start a
//! saga can crash in between: the order exists, the saga never starts. [`start_in`] instead
//! writes the request to an outbox table in the service's own database (`sagas_start_outbox`,
//! created by [`install`]), inside the caller's transaction: the change and the request
//! commit together or not at all. A [`StartRelay`] then delivers every committed request to
//! the orchestrator as a start command on `{p}.starts`, with the row's idempotency key, and
//! learns the outcome from the orchestrator's answer on the relay's own durable queue: it
//! deletes the rows the orchestrator accepted and marks those it refused `failed`, with the
//! reason. A row whose answer does not come within [`StartRelay::answer_timeout`] is
//! published again; the orchestrator's idempotency answers a repeated start with the
//! transaction the first one started, so a crash anywhere starts the saga exactly once.
//!
//! docs/protocol.md, "Transactional starts", describes the table, the messages and the
//! relay's rules, for services written in other languages.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::future::join_all;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::PgListener;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::amqp::{
    self, Backoff, Confirmed, QueueOptions, confirm_channel, declare_start_answers, declare_starts,
    publish_to_queue, start_properties,
};
use crate::protocol::{PROTOCOL_VERSION, StartAnswer, StartCommand, StartOutcome, Topology};

/// The start outbox's schema; idempotent, run by [`install`].
pub const SCHEMA: &str = include_str!("../migrations/0003_start_outbox.sql");

/// The PostgreSQL channel every insert into the outbox notifies (by a trigger) on commit.
pub const NOTIFY_CHANNEL: &str = "sagas_start_outbox";

/// Default time between two looks at the outbox without a notification.
pub const DEFAULT_POLL: Duration = Duration::from_secs(1);

/// Default time after which a published request without an answer is published again.
pub const DEFAULT_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The most rows one look at the outbox claims and publishes at once.
pub const RELAY_BATCH: i64 = 100;
/// How long the broker may take to answer one step of a session (declaring, consuming, a batch
/// of publishes confirmed, closing): past it the connection counts as lost and the relay
/// connects again. A connection cut at the wrong moment can leave such a step waiting forever.
pub const BROKER_STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of [`start_in`] and of the [`StartRelay`].
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The request can never be accepted (the sentence says why); nothing was written.
    #[error("invalid start request: {0}")]
    Invalid(String),
    /// The service's database failed.
    #[error("start outbox database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The broker failed.
    #[error("start relay AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker ended the consumer of the relay's answers (the queue was deleted).
    #[error("the broker ended the consumer of {0}")]
    ConsumerEnded(String),
    /// The broker did not answer within [`BROKER_STEP_TIMEOUT`].
    #[error("the broker did not answer within {limit} s: {0}", limit = BROKER_STEP_TIMEOUT.as_secs())]
    BrokerSilent(&'static str),
    /// The AMQP URL cannot be parsed, or the TLS files it names cannot be read.
    #[error("invalid AMQP URL: {0}")]
    InvalidUrl(String),
}

/// Creates the start outbox (table, index, notify trigger) if need be; safe to call
/// concurrently at every start-up. Like [`crate::barrier::install`], it keeps out of sqlx's
/// migration table: the database is the service's.
pub async fn install(pool: &PgPool) -> Result<(), StartError> {
    Ok(crate::barrier::install_schema(pool, "sagas_start_outbox", SCHEMA).await?)
}

/// Whether `name` can be a definition's name: 1 to 100 of `A-Za-z0-9_.-`.
pub fn definition_name(name: &str) -> bool {
    (1..=100).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Whether `key` can be an idempotency key: 1 to 200 visible ASCII characters.
pub fn idempotency_key_shape(key: &str) -> bool {
    (1..=200).contains(&key.len()) && key.chars().all(|c| c.is_ascii_graphic())
}

/// Asks for a transaction of the newest version of `definition` with `input`, in the
/// caller's database transaction (pass `&mut *tx`): the request is delivered once the
/// transaction commits, and never if it rolls back. Returns the request's id (the outbox
/// row's).
///
/// `key` is the start's idempotency key (1 to 200 visible ASCII characters, e.g. the
/// service's own order id); without one, the row id is the key. As with an HTTP start, a
/// second request with the same key and the same input answers the first transaction; with
/// another input it is refused (the row is then marked `failed`).
///
/// ```no_run
/// # async fn order(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// let mut tx = pool.begin().await?;
/// sqlx::query("INSERT INTO orders (id, sku) VALUES ('o-1', 'sku-42')").execute(&mut *tx).await?;
/// let input = serde_json::json!({ "order": "o-1", "sku": "sku-42" });
/// sagas_participant::start_in(&mut tx, "order_saga", &input, Some("o-1")).await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
pub async fn start_in(
    conn: &mut PgConnection,
    definition: &str,
    input: &impl Serialize,
    key: Option<&str>,
) -> Result<Uuid, StartError> {
    start_version_in(conn, definition, None, input, key).await
}

/// [`start_in`] for a given version of the definition (`None`: its newest when the
/// orchestrator takes the request).
pub async fn start_version_in(
    conn: &mut PgConnection,
    definition: &str,
    version: Option<u32>,
    input: &impl Serialize,
    key: Option<&str>,
) -> Result<Uuid, StartError> {
    if !definition_name(definition) {
        return Err(StartError::Invalid(format!(
            "{definition:?} is not a definition name (1 to 100 of A-Za-z0-9_.-)"
        )));
    }
    if let Some(k) = key
        && !idempotency_key_shape(k)
    {
        return Err(StartError::Invalid(
            "the idempotency key must be 1 to 200 visible ASCII characters".to_owned(),
        ));
    }
    let input = serde_json::to_value(input)
        .map_err(|e| StartError::Invalid(format!("the input cannot be encoded: {e}")))?;
    let version = version
        .map(|v| i32::try_from(v).map_err(|_| StartError::Invalid(format!("version {v}"))))
        .transpose()?;
    let id = Uuid::now_v7();
    let key = key.map_or_else(|| id.to_string(), str::to_owned);
    sqlx::query(
        "INSERT INTO sagas_start_outbox (id, definition, version, input, idempotency_key) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(definition)
    .bind(version)
    .bind(Json(&input))
    .bind(&key)
    .execute(&mut *conn)
    .await?;
    Ok(id)
}

/// One row of the start outbox, for inspection and tests.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct OutboxRow {
    /// The request's id.
    pub id: Uuid,
    /// The definition to start.
    pub definition: String,
    /// Its version, if one was asked for.
    pub version: Option<i32>,
    /// The input.
    pub input: Json<Value>,
    /// The start's idempotency key.
    pub idempotency_key: String,
    /// When the request was written.
    pub created_at: DateTime<Utc>,
    /// `pending` (not yet accepted) or `failed` (refused: never published again).
    pub state: String,
    /// How many times it was published.
    pub attempts: i32,
    /// When it was last published.
    pub published_at: Option<DateTime<Utc>>,
    /// Why the orchestrator refused it.
    pub last_error: Option<String>,
    /// When it was marked failed.
    pub failed_at: Option<DateTime<Utc>>,
}

/// Every row of the start outbox (requests not yet accepted, and refused ones), oldest first.
pub async fn outbox_rows(pool: &PgPool) -> Result<Vec<OutboxRow>, StartError> {
    Ok(sqlx::query_as(
        "SELECT id, definition, version, input, idempotency_key, created_at, state, attempts, \
         published_at, last_error, failed_at FROM sagas_start_outbox ORDER BY created_at, id",
    )
    .fetch_all(pool)
    .await?)
}

/// Claims the pending rows due for publishing (never published, or published longer than
/// `$1` seconds ago without an answer), oldest first, and marks them published: concurrent
/// relays skip each other's rows.
const CLAIM: &str = "UPDATE sagas_start_outbox o SET published_at = now(), attempts = o.attempts + 1 \
     FROM (SELECT id FROM sagas_start_outbox \
           WHERE state = 'pending' \
             AND (published_at IS NULL OR published_at < now() - make_interval(secs => $1)) \
           ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED) due \
     WHERE o.id = due.id \
     RETURNING o.id, o.definition, o.version, o.input, o.idempotency_key";

/// Delivers the committed requests of a service's start outbox to the orchestrator, and
/// settles them by its answers (see the [module](self)).
///
/// Run it alone ([`StartRelay::run_forever`]) or inside the participant runtime
/// ([`crate::Participant::relay_starts`]). Any number of relays may serve one database: each
/// claims rows with `FOR UPDATE SKIP LOCKED`, and they share the answers queue.
#[derive(Debug, Clone)]
pub struct StartRelay {
    service: String,
    topology: Topology,
    pool: PgPool,
    queue_options: QueueOptions,
    poll: Duration,
    answer_timeout: Duration,
    backoff: Backoff,
}

/// A row as the relay publishes it.
#[derive(sqlx::FromRow)]
struct Claimed {
    id: Uuid,
    definition: String,
    version: Option<i32>,
    input: Json<Value>,
    idempotency_key: String,
}

impl StartRelay {
    /// The relay of `service` (it names the relay's answers queue,
    /// `{p}.start-answers.{service}`) over the outbox in `pool`, with default settings.
    pub fn new(service: impl Into<String>, topology: Topology, pool: PgPool) -> StartRelay {
        StartRelay {
            service: service.into(),
            topology,
            pool,
            queue_options: QueueOptions::default(),
            poll: DEFAULT_POLL,
            answer_timeout: DEFAULT_ANSWER_TIMEOUT,
            backoff: Backoff::default(),
        }
    }

    /// Sets the queue declaration options; must match the orchestrator's.
    pub fn queue_options(mut self, options: QueueOptions) -> StartRelay {
        self.queue_options = options;
        self
    }

    /// How often the outbox is looked at without a notification (default 1 s, at least 10 ms):
    /// notifications make new rows go at once; the poll finds rows whose answer is overdue.
    pub fn poll(mut self, every: Duration) -> StartRelay {
        self.poll = every.max(Duration::from_millis(10));
        self
    }

    /// How long a published request waits for its answer before it is published again
    /// (default 10 s, at least 10 ms).
    pub fn answer_timeout(mut self, timeout: Duration) -> StartRelay {
        self.answer_timeout = timeout.max(Duration::from_millis(10));
        self
    }

    /// The reconnection delays of [`StartRelay::run_forever`] (defaults 100 ms to 5 s).
    pub fn reconnect_backoff(mut self, initial: Duration, max: Duration) -> StartRelay {
        self.backoff = Backoff::new(initial, max);
        self
    }

    /// Relays until `shutdown` completes, connecting to `amqp_url` and reconnecting (to the
    /// broker and the database) after every failure, with backoff. The outbox is created
    /// first if need be. Returns an error only for a URL that cannot be used.
    ///
    /// The relay runs on a task of its own on the Tokio runtime, not in the caller's future
    /// (as [`crate::Participant::run_forever`] does); dropping the returned future stops it.
    pub async fn run_forever(
        &self,
        amqp_url: &str,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), StartError> {
        let (relay, url) = (self.clone(), amqp_url.to_owned());
        let serve = move |stopped| async move { relay.serve_forever(&url, stopped).await };
        amqp::connection::on_a_task(serve, shutdown)
            .await
            .unwrap_or(Ok(()))
    }

    /// [`StartRelay::run_forever`], in the caller's future.
    pub(crate) async fn serve_forever(
        &self,
        amqp_url: &str,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), StartError> {
        amqp::check_url(amqp_url).map_err(StartError::InvalidUrl)?;
        let mut sessions = RelaySessions {
            relay: self,
            amqp_url,
            installed: false,
        };
        let shutdown = std::pin::pin!(shutdown);
        let name = format!("start relay of {}", self.service);
        amqp::keep_serving(&name, self.backoff, shutdown, &mut sessions).await;
        Ok(())
    }

    /// One session on `conn`: declares the queues, consumes the answers, and publishes due
    /// rows at every notification and poll until `shutdown` (`Ok`) or a failure.
    async fn session<S: Future<Output = ()>>(
        &self,
        conn: &Connection,
        mut shutdown: Pin<&mut S>,
    ) -> Result<(), StartError> {
        let answers_queue = self.topology.start_answers_queue(&self.service);
        let (publisher, mut answers) = bounded("opening the session", async {
            let publisher = confirm_channel(conn).await?;
            declare_starts(&publisher, &self.topology, &self.queue_options).await?;
            declare_start_answers(
                &publisher,
                &self.topology,
                &self.service,
                &self.queue_options,
            )
            .await?;
            let consumer = conn.create_channel().await?;
            consumer
                .basic_qos(RELAY_BATCH as u16, BasicQosOptions::default())
                .await?;
            let answers = consumer
                .basic_consume(
                    answers_queue.as_str().into(),
                    "sagas-start-relay".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, StartError>((publisher, answers))
        })
        .await??;
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(NOTIFY_CHANNEL).await?;
        let mut poll = tokio::time::interval(self.poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = shutdown.as_mut() => return Ok(()),
                delivery = answers.next() => match delivery {
                    Some(delivery) => self.on_answer(delivery?).await?,
                    None => return Err(StartError::ConsumerEnded(answers_queue)),
                },
                notified = listener.recv() => {
                    notified?;
                    self.publish_due(&publisher, &answers_queue).await?;
                }
                _ = poll.tick() => self.publish_due(&publisher, &answers_queue).await?,
            }
        }
    }

    /// Publishes every due row, [`RELAY_BATCH`] at a time (each batch's publishes pipelined),
    /// until none is left.
    async fn publish_due(&self, ch: &Channel, reply_to: &str) -> Result<(), StartError> {
        let queue = self.topology.starts_queue();
        loop {
            let claimed: Vec<Claimed> = sqlx::query_as(CLAIM)
                .bind(self.answer_timeout.as_secs_f64())
                .bind(RELAY_BATCH)
                .fetch_all(&self.pool)
                .await?;
            let publishing = join_all(claimed.iter().map(|row| {
                let command = StartCommand {
                    protocol: PROTOCOL_VERSION,
                    request_id: row.id,
                    definition: row.definition.clone(),
                    version: row.version.and_then(|v| u32::try_from(v).ok()),
                    input: row.input.0.clone(),
                    idempotency_key: Some(row.idempotency_key.clone()),
                    traceparent: None,
                };
                let properties = start_properties(&command, reply_to);
                let queue = queue.as_str();
                async move {
                    // Serializing a Value cannot fail.
                    let body = serde_json::to_vec(&command).unwrap_or_default();
                    let confirmed = publish_to_queue(ch, queue, &body, properties).await;
                    (command.request_id, confirmed.map_err(StartError::from))
                }
            }));
            // Unanswered: every row of the batch counts as not published.
            let published = match tokio::time::timeout(BROKER_STEP_TIMEOUT, publishing).await {
                Ok(published) => published,
                Err(_) => claimed
                    .iter()
                    .map(|row| (row.id, Err(StartError::BrokerSilent("publishing"))))
                    .collect(),
            };
            let mut failure = None;
            for (id, result) in published {
                let why = match result {
                    Ok(Confirmed::Taken) => continue,
                    Ok(Confirmed::Returned) => format!("no queue {queue} took it"),
                    Ok(Confirmed::Nacked) => "the broker nacked it".to_owned(),
                    Err(e) => e.to_string(),
                };
                // Not taken: published again as soon as the relay can.
                sqlx::query("UPDATE sagas_start_outbox SET published_at = NULL WHERE id = $1")
                    .bind(id)
                    .execute(&self.pool)
                    .await?;
                failure.get_or_insert(format!("start command {id} was not published: {why}"));
            }
            if let Some(why) = failure {
                // Reconnect and declare again.
                return Err(StartError::Amqp(lapin::Error::from(std::io::Error::other(
                    why,
                ))));
            }
            if (claimed.len() as i64) < RELAY_BATCH {
                return Ok(());
            }
        }
    }

    /// Settles the row an answer names: deleted when accepted (whatever its state: a later
    /// delivery of the same request may have been accepted after an earlier one was refused),
    /// marked failed with the reason when refused and still pending. Then the answer is acked;
    /// one that is not an answer is rejected (to `{p}.dead` by the queue's dead-letter
    /// exchange).
    async fn on_answer(&self, delivery: lapin::message::Delivery) -> Result<(), StartError> {
        let answer: StartAnswer = match serde_json::from_slice(&delivery.data) {
            Ok(answer) => answer,
            Err(error) => {
                tracing::warn!(service = %self.service, %error, "a message on the start answers queue is not a start answer; rejecting it");
                delivery
                    .acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await?;
                return Ok(());
            }
        };
        match &answer.outcome {
            StartOutcome::Accepted { transaction_id, .. } => {
                let deleted = sqlx::query("DELETE FROM sagas_start_outbox WHERE id = $1")
                    .bind(answer.request_id)
                    .execute(&self.pool)
                    .await?;
                if deleted.rows_affected() > 0 {
                    tracing::debug!(request = %answer.request_id, transaction = %transaction_id, "start accepted");
                }
            }
            StartOutcome::Refused { reason } => {
                let marked = sqlx::query(
                    "UPDATE sagas_start_outbox SET state = 'failed', last_error = $2, failed_at = now() \
                     WHERE id = $1 AND state = 'pending'",
                )
                .bind(answer.request_id)
                .bind(reason)
                .execute(&self.pool)
                .await?;
                if marked.rows_affected() > 0 {
                    tracing::warn!(
                        service = %self.service,
                        request = %answer.request_id,
                        %reason,
                        "the orchestrator refused a start request; its outbox row is marked failed"
                    );
                }
            }
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }
}

/// `step` of a session, or [`StartError::BrokerSilent`] past [`BROKER_STEP_TIMEOUT`].
async fn bounded<T>(step: &'static str, work: impl Future<Output = T>) -> Result<T, StartError> {
    tokio::time::timeout(BROKER_STEP_TIMEOUT, work)
        .await
        .map_err(|_| StartError::BrokerSilent(step))
}

/// The sessions of [`StartRelay::run_forever`], each on a connection of its own.
struct RelaySessions<'a> {
    relay: &'a StartRelay,
    amqp_url: &'a str,
    /// Whether the outbox table is there.
    installed: bool,
}

impl<S: Future<Output = ()>> amqp::Sessions<S> for RelaySessions<'_> {
    type Connection = Connection;
    type Error = StartError;

    async fn connect(&mut self) -> Result<Connection, StartError> {
        if !self.installed {
            install(&self.relay.pool).await?;
            self.installed = true;
        }
        Ok(amqp::connect(self.amqp_url).await?)
    }

    async fn serve(&mut self, conn: Connection, shutdown: Pin<&mut S>) -> Result<(), StartError> {
        let result = self.relay.session(&conn, shutdown).await;
        if conn.status().connected() {
            let _ = bounded("closing", conn.close(200, "OK".into())).await;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definition_names_and_keys_are_checked_as_the_orchestrator_checks_them() {
        assert!(definition_name("order_saga.v-2"));
        assert!(!definition_name(""));
        assert!(!definition_name("order saga"));
        assert!(!definition_name(&"a".repeat(101)));
        assert!(idempotency_key_shape("order-1"));
        assert!(!idempotency_key_shape(""));
        assert!(!idempotency_key_shape("order 1"));
        assert!(!idempotency_key_shape(&"k".repeat(201)));
    }
}
