//! The AMQP consumer that serves one participant's queue.
//!
//! For each command: decode and validate it, run it through the [barrier](crate::barrier) and
//! the handler, publish the reply (with a publisher confirm) to the command's `reply_to`, and
//! only then ack the command. A crash anywhere before the ack means a redelivery, which the
//! barrier answers from its stored reply. Bad messages are rejected without requeue, so that
//! the queue's dead-letter exchange keeps them, and are counted.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use sqlx::PgPool;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::amqp::{QueueOptions, declare_participant};
use crate::barrier::{self, BarrierError};
use crate::handler::Handler;
use crate::protocol::{CONTENT_TYPE, Command, Outcome, PROTOCOL_VERSION, Reply, Topology};

/// Default number of unacknowledged commands the broker may push to one participant process.
pub const DEFAULT_PREFETCH: u16 = 32;

/// Default number of handlers running at once in one participant process.
pub const DEFAULT_CONCURRENCY: usize = 16;

/// Why [`Participant::run`] stopped other than by its shutdown signal.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Declaring, consuming or the connection failed.
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
    /// Installing the barrier table failed.
    #[error(transparent)]
    Barrier(#[from] BarrierError),
    /// The broker cancelled the consumer (for example, the queue was deleted).
    #[error("the broker ended the consumer of queue {0}")]
    ConsumerEnded(String),
    /// The channel used to publish replies closed; the caller should reconnect and run again.
    #[error("the reply channel closed")]
    ReplyChannelClosed,
}

/// Why a delivery was rejected to the dead-letter exchange instead of being processed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// The body is not a JSON object with a `protocol` number.
    #[error("body is not a protocol message: {0}")]
    NotJson(String),
    /// The body declares a protocol version this participant does not speak.
    #[error("unsupported protocol version {0} (expected {PROTOCOL_VERSION})")]
    Version(u64),
    /// The body is not a valid command.
    #[error("invalid command: {0}")]
    Invalid(String),
    /// The message has no `reply_to` property, so the reply would have nowhere to go.
    #[error("missing reply_to property")]
    NoReplyTo,
}

/// Decodes and validates a command body (everything except the AMQP properties).
pub fn decode_command(body: &[u8]) -> Result<Command, Malformed> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| Malformed::NotJson(e.to_string()))?;
    let version = value
        .get("protocol")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| Malformed::NotJson("no numeric \"protocol\" field".to_owned()))?;
    if version != u64::from(PROTOCOL_VERSION) {
        return Err(Malformed::Version(version));
    }
    serde_json::from_value(value).map_err(|e| Malformed::Invalid(e.to_string()))
}

/// Runs `cmd` through the barrier and `handler`, never failing: barrier errors and handler
/// panics become `retry` outcomes (nothing was committed in either case).
pub async fn process(pool: &PgPool, handler: &dyn Handler, cmd: &Command) -> Outcome {
    match AssertUnwindSafe(barrier::execute(pool, cmd, handler))
        .catch_unwind()
        .await
    {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(error)) => {
            tracing::warn!(%error, "barrier failed; replying retry");
            Outcome::retry(error.to_string())
        }
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_owned());
            tracing::error!(panic = %message, "handler panicked; replying retry");
            Outcome::retry(format!("handler panicked: {message}"))
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    processed: AtomicU64,
    rejected: AtomicU64,
    publish_failures: AtomicU64,
    unroutable_replies: AtomicU64,
}

/// Live counters of a running participant; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Stats(Arc<Counters>);

impl Stats {
    /// Commands answered and acked.
    pub fn processed(&self) -> u64 {
        self.0.processed.load(Ordering::Relaxed)
    }

    /// Messages rejected to the dead-letter exchange (malformed, wrong version, no `reply_to`).
    pub fn rejected(&self) -> u64 {
        self.0.rejected.load(Ordering::Relaxed)
    }

    /// Replies that could not be published (their commands were requeued).
    pub fn publish_failures(&self) -> u64 {
        self.0.publish_failures.load(Ordering::Relaxed)
    }

    /// Replies the broker could not route to their `reply_to` queue (dropped; the orchestrator
    /// times out and resends, and the barrier answers again).
    pub fn unroutable_replies(&self) -> u64 {
        self.0.unroutable_replies.load(Ordering::Relaxed)
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// One participant process: consumes its queue and answers commands through the barrier.
pub struct Participant {
    name: String,
    topology: Topology,
    pool: PgPool,
    handler: Arc<dyn Handler>,
    prefetch: u16,
    concurrency: usize,
    queue_options: QueueOptions,
    install_barrier: bool,
    stats: Stats,
}

impl std::fmt::Debug for Participant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Participant")
            .field("name", &self.name)
            .field("topology", &self.topology)
            .field("prefetch", &self.prefetch)
            .field("concurrency", &self.concurrency)
            .field("queue_options", &self.queue_options)
            .finish_non_exhaustive()
    }
}

impl Participant {
    /// A participant named `name` (its routing key and queue suffix) with default settings.
    pub fn new(
        name: impl Into<String>,
        topology: Topology,
        pool: PgPool,
        handler: Arc<dyn Handler>,
    ) -> Participant {
        Participant {
            name: name.into(),
            topology,
            pool,
            handler,
            prefetch: DEFAULT_PREFETCH,
            concurrency: DEFAULT_CONCURRENCY,
            queue_options: QueueOptions::default(),
            install_barrier: true,
            stats: Stats::default(),
        }
    }

    /// Sets the AMQP prefetch (unacked commands buffered by the broker for this process).
    pub fn prefetch(mut self, prefetch: u16) -> Participant {
        self.prefetch = prefetch.max(1);
        self
    }

    /// Sets how many handlers may run at once (at least 1).
    pub fn concurrency(mut self, concurrency: usize) -> Participant {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Sets the queue declaration options; must match the orchestrator's.
    pub fn queue_options(mut self, options: QueueOptions) -> Participant {
        self.queue_options = options;
        self
    }

    /// Whether [`Participant::run`] creates the barrier table first (default: yes).
    pub fn install_barrier(mut self, install: bool) -> Participant {
        self.install_barrier = install;
        self
    }

    /// The participant's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A handle on the live counters; take it before calling [`Participant::run`].
    pub fn stats(&self) -> Stats {
        self.stats.clone()
    }

    /// Serves the participant's queue until `shutdown` completes, then stops consuming, waits
    /// for the commands in flight, and returns.
    ///
    /// It first creates the barrier table (unless [`Participant::install_barrier`] is off) and
    /// declares its queue. Commands delivered but not yet started when shutting down are
    /// requeued by the broker when the channel closes.
    pub async fn run(
        self,
        conn: &Connection,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), RuntimeError> {
        if self.install_barrier {
            barrier::install(&self.pool).await?;
        }
        let consume_channel = conn.create_channel().await?;
        declare_participant(
            &consume_channel,
            &self.topology,
            &self.name,
            &self.queue_options,
        )
        .await?;
        consume_channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        let reply_channel = conn.create_channel().await?;
        reply_channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;

        let queue = self.topology.participant_queue(&self.name);
        let tag = format!("{}.{}", self.name, uuid::Uuid::new_v4().simple());
        let mut consumer = consume_channel
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!(participant = %self.name, %queue, "participant consuming");

        let ctx = Arc::new(Context {
            participant: self.name.clone(),
            pool: self.pool.clone(),
            handler: self.handler.clone(),
            reply_channel: reply_channel.clone(),
            stats: self.stats.clone(),
            reply_channel_lost: Notify::new(),
        });
        let semaphore = Arc::new(Semaphore::new(self.concurrency));
        let mut in_flight = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);

        let result = loop {
            while in_flight.try_join_next().is_some() {}
            // Take a handler slot before taking a delivery: commands beyond the slots stay
            // with the broker (up to the prefetch), which is the backpressure.
            let permit = tokio::select! {
                biased;
                () = &mut shutdown => break Ok(()),
                () = ctx.reply_channel_lost.notified() => break Err(RuntimeError::ReplyChannelClosed),
                permit = semaphore.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break Ok(()),
                },
            };
            let delivery = tokio::select! {
                biased;
                () = &mut shutdown => break Ok(()),
                () = ctx.reply_channel_lost.notified() => break Err(RuntimeError::ReplyChannelClosed),
                delivery = consumer.next() => delivery,
            };
            match delivery {
                Some(Ok(delivery)) => {
                    in_flight.spawn(serve(ctx.clone(), delivery, permit));
                }
                Some(Err(error)) => break Err(RuntimeError::Amqp(error)),
                None => break Err(RuntimeError::ConsumerEnded(queue.clone())),
            }
        };

        if consume_channel.status().connected()
            && let Err(error) = consume_channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await
        {
            tracing::warn!(%error, "could not cancel the consumer");
        }
        while in_flight.join_next().await.is_some() {}
        for channel in [&consume_channel, &reply_channel] {
            if channel.status().connected() {
                let _ = channel.close(200, "OK".into()).await;
            }
        }
        tracing::info!(participant = %self.name, ok = result.is_ok(), "participant stopped");
        result
    }
}

struct Context {
    participant: String,
    pool: PgPool,
    handler: Arc<dyn Handler>,
    reply_channel: Channel,
    stats: Stats,
    reply_channel_lost: Notify,
}

/// Handles one delivery from decoding to ack; never panics on bad input.
async fn serve(ctx: Arc<Context>, delivery: Delivery, _permit: OwnedSemaphorePermit) {
    let reply_to = delivery
        .properties
        .reply_to()
        .clone()
        .filter(|r| !r.as_str().is_empty());
    let decoded = decode_command(&delivery.data).and_then(|cmd| match reply_to {
        Some(reply_to) => Ok((cmd, reply_to)),
        None => Err(Malformed::NoReplyTo),
    });
    let (cmd, reply_to) = match decoded {
        Ok(decoded) => decoded,
        Err(reason) => {
            tracing::warn!(
                participant = %ctx.participant,
                %reason,
                message_id = ?delivery.properties.message_id(),
                "rejecting command to the dead-letter exchange"
            );
            Stats::bump(&ctx.stats.0.rejected);
            if let Err(error) = delivery
                .acker
                .reject(BasicRejectOptions { requeue: false })
                .await
            {
                tracing::warn!(%error, "could not reject a malformed command");
            }
            return;
        }
    };

    let span = tracing::info_span!(
        "command",
        participant = %ctx.participant,
        transaction_id = %cmd.transaction_id,
        step = %cmd.step,
        operation = %cmd.operation,
        attempt = cmd.attempt,
    );
    async move {
        let outcome = process(&ctx.pool, &*ctx.handler, &cmd).await;
        tracing::debug!(status = outcome.status(), "command processed");
        let reply = cmd.reply(outcome);
        match publish_reply(&ctx, &cmd, &reply, reply_to).await {
            Ok(()) => {
                Stats::bump(&ctx.stats.0.processed);
                if let Err(error) = delivery.acker.ack(BasicAckOptions::default()).await {
                    // The broker redelivers; the barrier answers with the stored reply.
                    tracing::warn!(%error, "could not ack a command");
                }
            }
            Err(error) => {
                Stats::bump(&ctx.stats.0.publish_failures);
                tracing::warn!(%error, "could not publish a reply; requeueing the command");
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                };
                if let Err(error) = delivery.acker.nack(requeue).await {
                    tracing::warn!(%error, "could not nack a command");
                }
                if !ctx.reply_channel.status().connected() {
                    ctx.reply_channel_lost.notify_one();
                }
            }
        }
    }
    .instrument(span)
    .await;
}

#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
    #[error("the broker refused (nacked) the reply")]
    Nacked,
    #[error("could not encode the reply: {0}")]
    Encode(#[from] serde_json::Error),
}

async fn publish_reply(
    ctx: &Context,
    cmd: &Command,
    reply: &Reply,
    reply_to: ShortString,
) -> Result<(), PublishError> {
    let payload = serde_json::to_vec(reply)?;
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(CONTENT_TYPE.into())
        .with_message_id(reply.message_id().into())
        .with_correlation_id(cmd.transaction_id.to_string().into());
    let confirmation = ctx
        .reply_channel
        .basic_publish(
            "".into(),
            reply_to.clone(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &payload,
            properties,
        )
        .await?
        .await?;
    match confirmation {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_returned)) => {
            // Nobody can take the reply now; requeueing would loop. The orchestrator's timeout
            // resends the command and the barrier answers again.
            Stats::bump(&ctx.stats.0.unroutable_replies);
            tracing::warn!(%reply_to, "reply unroutable (no such queue); dropped");
            Ok(())
        }
        Confirmation::Nack(_) => Err(PublishError::Nacked),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn command_json() -> serde_json::Value {
        json!({
            "protocol": 1,
            "transaction_id": uuid::Uuid::nil(),
            "definition": "transfer",
            "step": "debit",
            "operation": "try",
            "attempt": 1,
            "payload": {"amount": 5}
        })
    }

    #[test]
    fn a_valid_command_decodes() {
        let body = serde_json::to_vec(&command_json()).unwrap();
        let cmd = decode_command(&body).unwrap();
        assert_eq!(cmd.step, "debit");
    }

    #[test]
    fn garbage_wrong_versions_and_unknown_operations_are_malformed() {
        assert!(matches!(
            decode_command(b"not json"),
            Err(Malformed::NotJson(_))
        ));
        let mut v2 = command_json();
        v2["protocol"] = json!(2);
        assert_eq!(
            decode_command(&serde_json::to_vec(&v2).unwrap()),
            Err(Malformed::Version(2))
        );
        let mut unknown = command_json();
        unknown["operation"] = json!("commit");
        assert!(matches!(
            decode_command(&serde_json::to_vec(&unknown).unwrap()),
            Err(Malformed::Invalid(_))
        ));
    }
}
