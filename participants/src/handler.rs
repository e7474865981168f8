//! What participant authors implement: a [`Handler`] per participant, usually built from
//! [`SagaHandler`]/[`TccHandler`] implementations dispatched by a [`Router`].
//!
//! Every handler runs inside the barrier's database transaction and must make its business
//! change through the `&mut PgConnection` it is given: that is what makes the effect
//! exactly-once. Work done elsewhere (HTTP calls, other databases) is not covered.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::PgConnection;

use crate::protocol::{Command, Operation, Outcome};

/// Why a handler did not succeed; decides the reply the orchestrator gets.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// A business failure (`failed` reply): do not retry; the orchestrator compensates or cancels.
    #[error("{0}")]
    Business(String),
    /// A transient error (`retry` reply): nothing took effect; the orchestrator retries later.
    #[error("transient error: {0}")]
    Transient(String),
    /// A database error (`retry` reply): nothing took effect; the orchestrator retries later.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The operation was accepted and goes on after the handler returns (`in_progress` reply):
    /// the handler's writes are committed, and the final answer is given later with
    /// [`crate::barrier::complete_in`] / [`crate::runtime::complete`].
    #[error("in progress")]
    InProgress(Option<String>),
}

impl HandlerError {
    /// A business failure with the given reason.
    pub fn business(reason: impl Into<String>) -> HandlerError {
        HandlerError::Business(reason.into())
    }

    /// A transient error with the given reason.
    pub fn transient(reason: impl Into<String>) -> HandlerError {
        HandlerError::Transient(reason.into())
    }

    /// A long-running operation: answer `in_progress` now, the final outcome later.
    pub fn in_progress(note: Option<String>) -> HandlerError {
        HandlerError::InProgress(note)
    }

    /// True when the orchestrator should retry (transient and database errors).
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            HandlerError::Business(_) | HandlerError::InProgress(_)
        )
    }

    /// The outcome reported for this error: `failed` for business failures, `in_progress` for
    /// accepted long-running operations, `retry` otherwise.
    pub fn to_outcome(&self) -> Outcome {
        match self {
            HandlerError::Business(reason) => Outcome::failed(reason.clone()),
            HandlerError::InProgress(note) => Outcome::InProgress { note: note.clone() },
            other => Outcome::retry(other.to_string()),
        }
    }
}

/// Handles every command addressed to one participant.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Applies `cmd` through `tx` (the barrier's transaction) and returns the step output.
    async fn handle(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError>;

    /// The key of the row that `cmd` locks and that other commands may lock too (an account
    /// id, a SKU), or `None` (the default) when its rows are its own.
    ///
    /// Commands taken together run in one transaction (see
    /// [`Participant::batch_size`](crate::runtime::Participant::batch_size)) and keep their
    /// row locks until it commits. Two batches that lock the same rows in different orders
    /// deadlock: PostgreSQL rolls one back, and its commands run again one by one. So the
    /// runtime runs the commands of a batch in the order of their lock keys (see
    /// [`barrier::lock_order`](crate::barrier::lock_order)), and every batch then takes the rows of its
    /// handlers in the same order. A command that locks several shared rows should lock them
    /// in key order itself and give the smallest key; a deadlock between such commands is
    /// still possible, and resolved as above.
    fn lock_key(&self, _cmd: &Command) -> Option<String> {
        None
    }
}

#[async_trait]
impl<H: Handler + ?Sized> Handler for Arc<H> {
    async fn handle(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        (**self).handle(cmd, tx).await
    }

    fn lock_key(&self, cmd: &Command) -> Option<String> {
        (**self).lock_key(cmd)
    }
}

/// One saga step: a forward `action` and the `compensate` that undoes it.
#[async_trait]
pub trait SagaHandler: Send + Sync + 'static {
    /// Runs the step forward.
    async fn action(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError>;
    /// Undoes a successful `action` (`cmd.output` holds its output).
    async fn compensate(&self, cmd: &Command, tx: &mut PgConnection)
    -> Result<Value, HandlerError>;

    /// The key of the shared row the command locks, if any: see [`Handler::lock_key`].
    fn lock_key(&self, _cmd: &Command) -> Option<String> {
        None
    }
}

/// One TCC step: `try_` reserves, `confirm` commits the reservation, `cancel` releases it.
#[async_trait]
pub trait TccHandler: Send + Sync + 'static {
    /// Reserves resources.
    async fn try_(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError>;
    /// Commits a successful `try_`.
    async fn confirm(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError>;
    /// Releases a successful `try_`.
    async fn cancel(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError>;

    /// The key of the shared row the command locks, if any: see [`Handler::lock_key`].
    fn lock_key(&self, _cmd: &Command) -> Option<String> {
        None
    }
}

/// Adapts a [`SagaHandler`] into a [`Handler`]; TCC operations are business failures.
#[derive(Debug, Clone, Default)]
pub struct Saga<H>(pub H);

#[async_trait]
impl<H: SagaHandler> Handler for Saga<H> {
    async fn handle(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        match cmd.operation {
            Operation::Action => self.0.action(cmd, tx).await,
            Operation::Compensate => self.0.compensate(cmd, tx).await,
            op => Err(unsupported(cmd, op, "a saga")),
        }
    }

    fn lock_key(&self, cmd: &Command) -> Option<String> {
        self.0.lock_key(cmd)
    }
}

/// Adapts a [`TccHandler`] into a [`Handler`]; saga operations are business failures.
#[derive(Debug, Clone, Default)]
pub struct Tcc<H>(pub H);

#[async_trait]
impl<H: TccHandler> Handler for Tcc<H> {
    async fn handle(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        match cmd.operation {
            Operation::Try => self.0.try_(cmd, tx).await,
            Operation::Confirm => self.0.confirm(cmd, tx).await,
            Operation::Cancel => self.0.cancel(cmd, tx).await,
            op => Err(unsupported(cmd, op, "a TCC")),
        }
    }

    fn lock_key(&self, cmd: &Command) -> Option<String> {
        self.0.lock_key(cmd)
    }
}

fn unsupported(cmd: &Command, op: Operation, kind: &str) -> HandlerError {
    HandlerError::business(format!(
        "step {:?} of {:?} is {kind} step and does not support {op}",
        cmd.step, cmd.definition
    ))
}

/// Dispatches commands to handlers by `(definition, step)`, falling back to the step name alone.
#[derive(Clone, Default)]
pub struct Router {
    exact: HashMap<String, HashMap<String, Arc<dyn Handler>>>,
    by_step: HashMap<String, Arc<dyn Handler>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("definitions", &self.exact.keys().collect::<Vec<_>>())
            .field("steps", &self.by_step.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Router {
    /// An empty router; every command is a business failure until routes are added.
    pub fn new() -> Router {
        Router::default()
    }

    /// Routes a step name of any definition to `handler`.
    pub fn route(mut self, step: impl Into<String>, handler: impl Handler) -> Router {
        self.by_step.insert(step.into(), Arc::new(handler));
        self
    }

    /// Routes one step of one definition to `handler`; wins over [`Router::route`].
    pub fn route_in(
        mut self,
        definition: impl Into<String>,
        step: impl Into<String>,
        handler: impl Handler,
    ) -> Router {
        self.exact
            .entry(definition.into())
            .or_default()
            .insert(step.into(), Arc::new(handler));
        self
    }

    /// The handler for a command, if any.
    pub fn find(&self, cmd: &Command) -> Option<&Arc<dyn Handler>> {
        self.exact
            .get(&cmd.definition)
            .and_then(|steps| steps.get(&cmd.step))
            .or_else(|| self.by_step.get(&cmd.step))
    }
}

#[async_trait]
impl Handler for Router {
    async fn handle(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        match self.find(cmd) {
            Some(handler) => handler.handle(cmd, tx).await,
            None => Err(HandlerError::business(format!(
                "no handler for step {:?} of {:?}",
                cmd.step, cmd.definition
            ))),
        }
    }

    fn lock_key(&self, cmd: &Command) -> Option<String> {
        self.find(cmd).and_then(|handler| handler.lock_key(cmd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn business_errors_become_failed_and_the_others_retry() {
        assert_eq!(
            HandlerError::business("overdrawn").to_outcome(),
            Outcome::failed("overdrawn")
        );
        let retry = HandlerError::transient("busy").to_outcome();
        assert_eq!(retry.status(), "retry");
        assert!(HandlerError::Database(sqlx::Error::PoolTimedOut).is_retryable());
        assert!(!HandlerError::business("x").is_retryable());
    }
}
