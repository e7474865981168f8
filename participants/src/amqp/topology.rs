//! The exchanges and queues of a topology, declared identically by both sides.
//!
//! RabbitMQ refuses a re-declaration with different arguments (PRECONDITION_FAILED, which also
//! closes the channel), so the orchestrator and the participants declare what they use with
//! these functions. Every declaration is idempotent.

use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ExchangeKind, Queue};

use crate::protocol::Topology;

/// How queues (and, with `expires`, exchanges) are declared; both sides must use the same.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueOptions {
    /// Quorum queues (replicated; for a RabbitMQ cluster) instead of classic durable queues.
    pub quorum: bool,
    /// Queue expiry when unused (`x-expires`), for tests so that leftovers vanish; with it,
    /// exchanges are auto-deleted once their last queue is gone.
    pub expires: Option<Duration>,
}

impl QueueOptions {
    fn arguments(&self, dead_letter_exchange: Option<&str>) -> FieldTable {
        let mut args = FieldTable::default();
        if let Some(dlx) = dead_letter_exchange {
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(LongString::from(dlx)),
            );
        }
        if self.quorum {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(LongString::from("quorum")),
            );
        }
        if let Some(expires) = self.expires {
            // RabbitMQ wants a positive number of milliseconds.
            let millis = i64::try_from(expires.as_millis())
                .unwrap_or(i64::MAX)
                .max(1);
            args.insert("x-expires".into(), AMQPValue::LongLongInt(millis));
        }
        args
    }

    fn queue_declare(&self) -> QueueDeclareOptions {
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        }
    }

    fn exchange_declare(&self) -> ExchangeDeclareOptions {
        ExchangeDeclareOptions {
            durable: true,
            auto_delete: self.expires.is_some(),
            ..ExchangeDeclareOptions::default()
        }
    }
}

/// Declares the fanout dead-letter exchange and the dead-letter queue bound to it.
pub async fn declare_dead_letter(
    ch: &Channel,
    t: &Topology,
    o: &QueueOptions,
) -> Result<(), lapin::Error> {
    let exchange = t.dead_letter_exchange();
    let queue = t.dead_letter_queue();
    ch.exchange_declare(
        exchange.as_str().into(),
        ExchangeKind::Fanout,
        o.exchange_declare(),
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare(queue.as_str().into(), o.queue_declare(), o.arguments(None))
        .await?;
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
}

/// Declares the commands exchange, one participant's queue bound to it with routing key =
/// `participant`, and the dead-letter part.
pub async fn declare_participant(
    ch: &Channel,
    t: &Topology,
    participant: &str,
    o: &QueueOptions,
) -> Result<(), lapin::Error> {
    declare_dead_letter(ch, t, o).await?;
    let exchange = t.commands_exchange();
    let queue = t.participant_queue(participant);
    ch.exchange_declare(
        exchange.as_str().into(),
        ExchangeKind::Direct,
        o.exchange_declare(),
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare(
        queue.as_str().into(),
        o.queue_declare(),
        o.arguments(Some(&t.dead_letter_exchange())),
    )
    .await?;
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        participant.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
}

/// Declares the replies queue (replies go through the default exchange, routing key = its
/// name) and the dead-letter part.
pub async fn declare_replies(
    ch: &Channel,
    t: &Topology,
    o: &QueueOptions,
) -> Result<(), lapin::Error> {
    declare_with_dead_letters(ch, t, &t.replies_queue(), o).await
}

/// Declares `queue` with the arguments of every queue that dead-letters to `{p}.dlx`, and the
/// dead-letter part.
async fn declare_with_dead_letters(
    ch: &Channel,
    t: &Topology,
    queue: &str,
    o: &QueueOptions,
) -> Result<(), lapin::Error> {
    declare_dead_letter(ch, t, o).await?;
    ch.queue_declare(
        queue.into(),
        o.queue_declare(),
        o.arguments(Some(&t.dead_letter_exchange())),
    )
    .await?;
    Ok(())
}

/// Declares the queue of start commands (`{p}.starts`, consumed by the orchestrator; starts
/// go through the default exchange, routing key = its name) and the dead-letter part.
pub async fn declare_starts(
    ch: &Channel,
    t: &Topology,
    o: &QueueOptions,
) -> Result<(), lapin::Error> {
    declare_with_dead_letters(ch, t, &t.starts_queue(), o).await
}

/// Declares the queue of start answers of the relays of `service`
/// ([`Topology::start_answers_queue`]), with the arguments of every other queue.
pub async fn declare_start_answers(
    ch: &Channel,
    t: &Topology,
    service: &str,
    o: &QueueOptions,
) -> Result<(), lapin::Error> {
    declare_with_dead_letters(ch, t, &t.start_answers_queue(service), o).await
}

/// Deletes the queues and exchanges of a topology (for tests' cleanup); missing ones are fine.
pub async fn delete_topology(
    ch: &Channel,
    t: &Topology,
    participants: &[&str],
) -> Result<(), lapin::Error> {
    let mut queues: Vec<String> = participants
        .iter()
        .map(|p| t.participant_queue(p))
        .collect();
    queues.push(t.replies_queue());
    queues.push(t.starts_queue());
    queues.push(t.dead_letter_queue());
    for queue in queues {
        ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    for exchange in [t.commands_exchange(), t.dead_letter_exchange()] {
        ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await?;
    }
    Ok(())
}

/// How `queue` stands now (its ready messages and consumers), by a passive declare on a channel
/// of its own: a passive declare of a missing queue closes its channel, so none is shared.
pub async fn look_at_queue(connection: &Connection, queue: &str) -> Result<Queue, lapin::Error> {
    let ch = connection.create_channel().await?;
    let looked = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    if ch.status().connected() {
        let _ = ch.close(200, "looked".into()).await;
    }
    looked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_queues_are_classic_and_never_expire() {
        let args = QueueOptions::default().arguments(Some("x.dlx"));
        assert_eq!(args.inner().len(), 1);
        assert!(args.contains_key("x-dead-letter-exchange"));
    }

    #[test]
    fn quorum_and_expiry_add_their_arguments() {
        let options = QueueOptions {
            quorum: true,
            expires: Some(Duration::from_secs(60)),
        };
        let args = options.arguments(None);
        assert_eq!(
            args.inner().get("x-expires"),
            Some(&AMQPValue::LongLongInt(60_000))
        );
        assert!(args.contains_key("x-queue-type"));
        assert!(options.exchange_declare().auto_delete);
    }
}
