//! Carrying commands to participants and replies back.
//!
//! One small trait with an AMQP implementation; publishing counts only once the broker has
//! confirmed it, and an incoming reply is acknowledged only after its effect is committed.

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::store::OutboxMessage;
use sagas_participant::protocol::StartAnswer;

pub mod amqp;
pub mod batches;
pub mod dead_letters;
pub mod memory;

pub use amqp::{AmqpConfig, AmqpTransport};
pub use batches::CommandBatch;
pub use dead_letters::{DeadLetter, DeadLetterAction};
pub use memory::MemoryTransport;

/// Errors of a transport; all of them are retryable but the last two, which only operator
/// requests on dead letters meet.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The broker connection failed or was refused.
    #[error("broker error: {0}")]
    Broker(String),
    /// The broker did not confirm (nacked or returned) a message.
    #[error("message {0} was not confirmed by the broker: {1}")]
    NotConfirmed(String, String),
    /// This transport cannot do what was asked (it names what).
    #[error("this transport cannot {0}")]
    Unsupported(&'static str),
    /// The request cannot be carried out on this message (the sentence says why).
    #[error("{0}")]
    Refused(String),
}

/// What to do with a received message once it has been handled.
#[async_trait]
pub trait Ack: Send + Sync {
    /// The message's effect is committed: remove it from the queue.
    async fn ack(&self) -> Result<(), TransportError>;
    /// The message can never be handled: dead-letter it with `reason` (the body is the
    /// message's, so that the dead letter carries it).
    async fn reject(&self, body: &[u8], reason: &str) -> Result<(), TransportError>;
    /// Handling failed for a transient reason: deliver it again later.
    async fn requeue(&self) -> Result<(), TransportError>;
}

/// A received reply (or start command), not yet decoded.
pub struct Incoming {
    /// The message body.
    pub body: Vec<u8>,
    /// Where to answer it: the `reply_to` of a start command (none for replies).
    pub reply_to: Option<String>,
    /// Settles the message.
    pub ack: Box<dyn Ack>,
}

/// Publishes commands and receives replies.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Declares what the orchestrator needs (queues of the given participants, replies queue).
    async fn declare(&self, participants: &[String]) -> Result<(), TransportError>;

    /// Publishes commands; returns once the broker has confirmed every one of them.
    async fn publish(&self, messages: &[OutboxMessage]) -> Result<(), TransportError>;

    /// Starts receiving replies; the receiver ends when the transport is shut down. Delivery
    /// survives broker restarts (the transport reconnects).
    async fn subscribe(&self, prefetch: u16) -> Result<mpsc::Receiver<Incoming>, TransportError>;

    /// Succeeds if the broker can be reached now (connecting if need be).
    async fn ping(&self) -> Result<(), TransportError>;

    /// Starts receiving start commands (docs/protocol.md, "Transactional starts"), as
    /// [`Transport::subscribe`] receives replies. [`TransportError::Unsupported`] (the
    /// default) when this transport carries none.
    async fn subscribe_starts(
        &self,
        prefetch: u16,
    ) -> Result<mpsc::Receiver<Incoming>, TransportError> {
        let _ = prefetch;
        Err(TransportError::Unsupported("receive start commands"))
    }

    /// Publishes the answer to a start command to its `reply_to` queue; returns once the
    /// broker confirmed it, `Ok(false)` when no such queue exists (the answer is lost, and the
    /// relay publishes its request again).
    async fn answer_start(
        &self,
        reply_to: &str,
        answer: &StartAnswer,
    ) -> Result<bool, TransportError> {
        let _ = (reply_to, answer);
        Err(TransportError::Unsupported("answer start commands"))
    }

    /// Messages waiting in the dead-letter queue the orchestrator's rejected replies go to;
    /// `None` (the default) when this transport cannot tell.
    async fn dead_letters(&self) -> Result<Option<u64>, TransportError> {
        Ok(None)
    }

    /// The first `limit` messages of that dead-letter queue, oldest first, left where they are
    /// (each [`DeadLetter`] has its stable id). [`TransportError::Unsupported`] (the default)
    /// when this transport cannot show them.
    async fn list_dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, TransportError> {
        let _ = limit;
        Err(TransportError::Unsupported("list dead letters"))
    }

    /// Finds the dead letter `id` (among the first [`dead_letters::MAX_SCAN`]) and requeues or
    /// drops it; `None` when there is none with that id. A requeued message is published again
    /// to the queue it came from, without the dead-letter headers, and removed from the
    /// dead-letter queue once the broker confirmed it; [`TransportError::Refused`] when its
    /// origin is unknown. [`TransportError::Unsupported`] (the default) when this transport
    /// cannot.
    async fn settle_dead_letter(
        &self,
        id: &str,
        action: DeadLetterAction,
    ) -> Result<Option<DeadLetter>, TransportError> {
        let _ = (id, action);
        Err(TransportError::Unsupported("requeue or drop dead letters"))
    }
}
