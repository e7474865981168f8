//! Publishing one message to a queue through the default exchange, `mandatory`, on a
//! confirm-mode channel, and learning what the broker did with it.

use lapin::Confirmation;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel};

/// What the broker did with a message published by [`publish_to_queue`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmed {
    /// A queue took it, and the broker confirmed it.
    Taken,
    /// No queue of that name exists: the broker returned it (and then acked the return).
    Returned,
    /// The broker refused it (nack): whether it is kept is unknown; publish it again.
    Nacked,
}

/// Publishes `body` to `queue` through the default exchange with `mandatory`, on `channel`
/// (which must be in confirm mode, see [`super::confirm_channel`]), and waits for the broker's
/// confirm.
pub async fn publish_to_queue(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<Confirmed, lapin::Error> {
    let confirmation = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            body,
            properties,
        )
        .await?
        .await?;
    Ok(match confirmation {
        // A returned message is still acked by the broker: the return says what happened.
        Confirmation::Ack(Some(_)) => Confirmed::Returned,
        Confirmation::Ack(None) | Confirmation::NotRequested => Confirmed::Taken,
        Confirmation::Nack(_) => Confirmed::Nacked,
    })
}
