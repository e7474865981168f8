//! Dead letters: a message that can never be handled, republished with its reason.
//!
//! Both sides dead-letter the same way (docs/protocol.md, "Consuming commands"): the message
//! goes to the topology's dead-letter exchange (and so to its dead-letter queue) with its own
//! body and properties, persistent, plus the headers [`DEAD_LETTER_REASON_HEADER`] and
//! [`DEAD_LETTER_QUEUE_HEADER`], on a confirm-mode channel; the delivery is acked only once the
//! broker confirmed the dead letter. If that fails it is rejected without requeue, and the
//! queue's own dead-letter exchange keeps it (with `x-death`, without the reason). An element
//! of a batch has no properties of its own: it is dead-lettered alone as a JSON message.

use lapin::options::{BasicAckOptions, BasicPublishOptions, BasicRejectOptions};
use lapin::types::AMQPValue;
use lapin::{Acker, BasicProperties, Channel};

use super::headers::{DEAD_LETTER_QUEUE_HEADER, DEAD_LETTER_REASON_HEADER};
use crate::protocol::{CONTENT_TYPE, Topology};

/// Why a dead letter was not taken by the broker.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// Publishing or awaiting the confirm failed (the channel or connection is gone).
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
    /// The broker refused (nacked) the dead letter.
    #[error("the broker refused (nacked) the dead letter")]
    Nacked,
}

/// Where the dead letters of one queue go: the dead-letter exchange, through a channel in
/// publisher-confirm mode (it may be shared with other publishes).
#[derive(Debug, Clone)]
pub struct DeadLetters {
    channel: Channel,
    exchange: String,
    queue: String,
}

impl DeadLetters {
    /// The dead letters of `queue`, published on `channel`, which must be in confirm mode.
    pub fn new(channel: Channel, topology: &Topology, queue: impl Into<String>) -> DeadLetters {
        DeadLetters {
            channel,
            exchange: topology.dead_letter_exchange(),
            queue: queue.into(),
        }
    }

    /// Publishes `body` to the dead-letter exchange with `properties` (persistent, with the
    /// reason and queue headers added to their own) and returns once the broker confirmed it.
    pub async fn publish(
        &self,
        body: &[u8],
        properties: BasicProperties,
        reason: &str,
    ) -> Result<(), DeadLetterError> {
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(
            DEAD_LETTER_REASON_HEADER.into(),
            AMQPValue::LongString(reason.into()),
        );
        headers.insert(
            DEAD_LETTER_QUEUE_HEADER.into(),
            AMQPValue::LongString(self.queue.as_str().into()),
        );
        let properties = properties
            .with_delivery_mode(super::properties::PERSISTENT)
            .with_headers(headers);
        let confirmation = self
            .channel
            .basic_publish(
                self.exchange.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await?
            .await?;
        if confirmation.is_ack() {
            Ok(())
        } else {
            Err(DeadLetterError::Nacked)
        }
    }

    /// Publishes one element of a batch alone, as a JSON message (see [`Self::publish`]).
    pub async fn publish_element(
        &self,
        element: &[u8],
        reason: &str,
    ) -> Result<(), DeadLetterError> {
        let properties = BasicProperties::default().with_content_type(CONTENT_TYPE.into());
        self.publish(element, properties, reason).await
    }

    /// Dead-letters a delivery (its `body` and `properties`) and settles it: acked once the
    /// dead letter is confirmed, otherwise rejected without requeue. The error is the
    /// settlement's.
    pub async fn reject(
        &self,
        acker: &Acker,
        body: &[u8],
        properties: BasicProperties,
        reason: &str,
    ) -> Result<(), lapin::Error> {
        match self.publish(body, properties, reason).await {
            Ok(()) => acker.ack(BasicAckOptions::default()).await.map(drop),
            Err(error) => {
                tracing::warn!(%error, queue = %self.queue, "could not republish a dead letter; rejecting it");
                acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await
                    .map(drop)
            }
        }
    }
}
