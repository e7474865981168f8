//! Unit tests for handlers, without a broker: feed commands to a handler through the real
//! [barrier] against a test database, then inspect the reply and the barrier
//! rows (like apalis' `TestWorker`).
//!
//! The harness runs exactly what the runtime runs for a delivery ([`process_within`]): the
//! barrier's transaction, the handler inside its savepoint, panics and time limits turned into
//! `retry`. Only AMQP is left out. The database is yours: a scratch database per test, e.g.
//! from `#[sqlx::test]`, with your own schema applied.
//!
//! ```no_run
//! use async_trait::async_trait;
//! use sagas_participant::testing::{TestHarness, command};
//! use sagas_participant::{Command, HandlerError, Operation, Outcome, Saga, SagaHandler};
//! use serde_json::{Value, json};
//! use sqlx::PgConnection;
//!
//! struct Stock;
//!
//! #[async_trait]
//! impl SagaHandler for Stock {
//!     async fn action(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
//!         let sku = cmd.payload["sku"].as_str().unwrap_or_default();
//!         let taken = sqlx::query("UPDATE stock SET n = n - 1 WHERE sku = $1 AND n > 0")
//!             .bind(sku)
//!             .execute(&mut *tx)
//!             .await?
//!             .rows_affected();
//!         if taken == 0 {
//!             return Err(HandlerError::business(format!("{sku}: out of stock")));
//!         }
//!         Ok(json!({ "sku": sku }))
//!     }
//!
//!     async fn compensate(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
//!         sqlx::query("UPDATE stock SET n = n + 1 WHERE sku = $1")
//!             .bind(cmd.payload["sku"].as_str().unwrap_or_default())
//!             .execute(&mut *tx)
//!             .await?;
//!         Ok(Value::Null)
//!     }
//! }
//!
//! # async fn example(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! // `pool`: a scratch database with the `stock` table (e.g. from `#[sqlx::test]`).
//! let harness = TestHarness::new(pool, Saga(Stock)).await?;
//! let reserve = command("reserve", Operation::Action).payload(json!({ "sku": "A-1" })).build();
//!
//! let reply = harness.send(&reserve).await;
//! assert_eq!(reply.outcome, Outcome::succeeded(json!({ "sku": "A-1" })));
//! // A redelivery is answered from the barrier; the handler does not run again.
//! assert_eq!(harness.send(&reserve.redelivered()).await.outcome, reply.outcome);
//! assert_eq!(harness.barrier(&reserve).await?.len(), 1);
//! # Ok(())
//! # }
//! ```
//!
//! [`process_within`]: crate::runtime::process_within

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::barrier::{self, BarrierError, BarrierRecord, Origin};
use crate::handler::Handler;
use crate::protocol::{Command, Operation, PROTOCOL_VERSION, Reply};
use crate::runtime::process_within;

/// Runs commands through the barrier and a handler on a test database, without a broker.
pub struct TestHarness {
    pool: PgPool,
    handler: Arc<dyn Handler>,
    handler_timeout: Option<Duration>,
}

impl std::fmt::Debug for TestHarness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestHarness")
            .field("handler_timeout", &self.handler_timeout)
            .finish_non_exhaustive()
    }
}

impl TestHarness {
    /// A harness for `handler` over `pool`; creates the barrier table if it is missing.
    pub async fn new(pool: PgPool, handler: impl Handler) -> Result<TestHarness, BarrierError> {
        barrier::install(&pool).await?;
        Ok(TestHarness {
            pool,
            handler: Arc::new(handler),
            handler_timeout: None,
        })
    }

    /// Applies a time limit as [`Participant::handler_timeout`](crate::Participant::handler_timeout) does.
    pub fn handler_timeout(mut self, limit: Duration) -> TestHarness {
        self.handler_timeout = Some(limit);
        self
    }

    /// The test database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Delivers `cmd` as the runtime would and returns the reply it would publish.
    pub async fn send(&self, cmd: &Command) -> Reply {
        let outcome = process_within(&self.pool, &*self.handler, cmd, self.handler_timeout).await;
        cmd.reply(outcome)
    }

    /// The barrier rows of `cmd`'s transaction and step, ordered by operation.
    pub async fn barrier(&self, cmd: &Command) -> Result<Vec<BarrierRecord>, BarrierError> {
        Ok(barrier::records(&self.pool, cmd.transaction_id)
            .await?
            .into_iter()
            .filter(|r| r.step == cmd.step)
            .collect())
    }

    /// The origin of the barrier row of `cmd`'s transaction, step and `operation`, if any.
    pub async fn origin(
        &self,
        cmd: &Command,
        operation: Operation,
    ) -> Result<Option<Origin>, BarrierError> {
        Ok(self
            .barrier(cmd)
            .await?
            .into_iter()
            .find(|r| r.operation == operation.as_str())
            .and_then(|r| r.origin))
    }
}

/// Starts building a command for `step` and `operation`: a new transaction id, definition
/// `test`, attempt 1, payload `null`.
pub fn command(step: impl Into<String>, operation: Operation) -> CommandBuilder {
    CommandBuilder(Command {
        protocol: PROTOCOL_VERSION,
        transaction_id: Uuid::now_v7(),
        definition: "test".to_owned(),
        step: step.into(),
        operation,
        attempt: 1,
        payload: Value::Null,
        output: None,
        deadline: None,
        traceparent: None,
    })
}

/// Builds a [`Command`] for tests; see [`command`].
#[derive(Debug, Clone)]
pub struct CommandBuilder(Command);

impl CommandBuilder {
    /// Sets the transaction id.
    pub fn transaction(mut self, id: Uuid) -> CommandBuilder {
        self.0.transaction_id = id;
        self
    }

    /// Sets the definition name.
    pub fn definition(mut self, definition: impl Into<String>) -> CommandBuilder {
        self.0.definition = definition.into();
        self
    }

    /// Sets the attempt.
    pub fn attempt(mut self, attempt: u32) -> CommandBuilder {
        self.0.attempt = attempt;
        self
    }

    /// Sets the payload.
    pub fn payload(mut self, payload: Value) -> CommandBuilder {
        self.0.payload = payload;
        self
    }

    /// Sets the forward operation's output (for `compensate`, `confirm`, `cancel`).
    pub fn output(mut self, output: Value) -> CommandBuilder {
        self.0.output = Some(output);
        self
    }

    /// The command.
    pub fn build(self) -> Command {
        self.0
    }
}

impl Command {
    /// The same command delivered again as the next attempt (what a retry after a timeout
    /// sends).
    pub fn redelivered(&self) -> Command {
        Command {
            attempt: self.attempt + 1,
            ..self.clone()
        }
    }

    /// The command of `operation` for the same transaction, step and payload, as the
    /// orchestrator would send it next (attempt 1; `output` set when given).
    pub fn follow_up(&self, operation: Operation, output: Option<Value>) -> Command {
        Command {
            operation,
            attempt: 1,
            output,
            ..self.clone()
        }
    }
}
