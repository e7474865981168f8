//! The AMQP (RabbitMQ) transport, on lapin and the AMQP toolkit of `sagas_participant::amqp`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use async_trait::async_trait;
use futures_util::StreamExt;
use futures_util::future::join_all;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

use super::batches::{Batching, CommandBatch};
use super::dead_letters::{self, DeadLetter, DeadLetterAction};
use super::{Ack, Incoming, Transport, TransportError};
use crate::engine::metric::AMQP_MESSAGES;
use crate::store::OutboxMessage;
pub use sagas_participant::amqp::command_properties;
use sagas_participant::amqp::headers::{DEAD_LETTER_QUEUE_HEADER, DEAD_LETTER_REASON_HEADER};
use sagas_participant::amqp::{
    Announcement, Backoff, Confirmed, DeadLetters, QueueOptions, Sessions, batch_properties,
    confirm_channel, connect, declare_participant, declare_replies, declare_starts, is_batch,
    keep_serving, look_at_queue, publish_to_queue, start_answer_properties,
};
use sagas_participant::protocol::{StartAnswer, Topology, join_batch, split_batch};

/// Settings of the AMQP transport.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// Broker URI, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub uri: String,
    /// Exchange and queue names.
    pub topology: Topology,
    /// Queue arguments (quorum queues, expiry in tests).
    pub queues: QueueOptions,
    /// Whether the commands of one publish for one participant share messages
    /// (docs/protocol.md, "Batches"): by default only for participants that announce it.
    pub command_batch: CommandBatch,
}

struct Link {
    connection: Arc<Connection>,
    publisher: Channel,
}

/// The AMQP transport: one connection per process, a confirm-mode channel for publishing and
/// one channel per consumer.
pub struct AmqpTransport {
    config: AmqpConfig,
    link: Mutex<Option<Arc<Link>>>,
    shutdown: CancellationToken,
    wire: Arc<WireCounts>,
    batching: Arc<Batching>,
}

/// AMQP messages through the broker since the transport was made: with batches, fewer than
/// the commands and replies they carry.
#[derive(Debug, Default)]
pub struct WireCounts {
    /// Command messages published and confirmed (a batch counts once).
    pub published: AtomicU64,
    /// Reply messages delivered (a batch counts once).
    pub received: AtomicU64,
}

impl WireCounts {
    /// A command message was published and confirmed.
    fn count_published(&self) {
        self.published.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(AMQP_MESSAGES, "kind" => "command").increment(1);
    }

    /// A reply message was delivered.
    fn count_received(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(AMQP_MESSAGES, "kind" => "reply").increment(1);
    }
}

fn broker(e: impl std::fmt::Display) -> TransportError {
    TransportError::Broker(e.to_string())
}

impl AmqpTransport {
    /// A transport with `config`; it connects lazily and reconnects after failures.
    pub fn new(config: AmqpConfig) -> AmqpTransport {
        let batching = Arc::new(Batching::new(config.command_batch));
        AmqpTransport {
            config,
            link: Mutex::new(None),
            shutdown: Default::default(),
            wire: Default::default(),
            batching,
        }
    }

    /// Messages through the broker so far.
    pub fn wire(&self) -> &WireCounts {
        &self.wire
    }

    /// The topology.
    pub fn topology(&self) -> &Topology {
        &self.config.topology
    }

    /// Stops reconnecting and closes the connection.
    pub async fn close(&self) {
        self.shutdown.cancel();
        if let Some(link) = self.link.lock().await.take() {
            let _ = link.connection.close(200, "shutdown".into()).await;
        }
    }

    async fn link(&self) -> Result<Arc<Link>, TransportError> {
        let mut guard = self.link.lock().await;
        if let Some(link) = guard.as_ref()
            && link.connection.status().connected()
            && link.publisher.status().connected()
        {
            return Ok(link.clone());
        }
        let connection = connect(&self.config.uri).await.map_err(broker)?;
        let publisher = confirm_channel(&connection).await.map_err(broker)?;
        let link = Arc::new(Link {
            connection: Arc::new(connection),
            publisher,
        });
        *guard = Some(link.clone());
        Ok(link)
    }

    async fn forget(&self, link: &Arc<Link>) {
        let mut guard = self.link.lock().await;
        if guard.as_ref().is_some_and(|l| Arc::ptr_eq(l, link)) {
            *guard = None;
        }
    }
}

#[async_trait]
impl Transport for AmqpTransport {
    async fn declare(&self, participants: &[String]) -> Result<(), TransportError> {
        let link = self.link().await?;
        let ch = link.connection.create_channel().await.map_err(broker)?;
        let t = &self.config.topology;
        declare_replies(&ch, t, &self.config.queues)
            .await
            .map_err(broker)?;
        declare_starts(&ch, t, &self.config.queues)
            .await
            .map_err(broker)?;
        for p in participants {
            declare_participant(&ch, t, p, &self.config.queues)
                .await
                .map_err(broker)?;
        }
        let _ = ch.close(200, "declared".into()).await;
        Ok(())
    }

    async fn publish(&self, messages: &[OutboxMessage]) -> Result<(), TransportError> {
        if messages.is_empty() {
            return Ok(());
        }
        let link = self.link().await?;
        let t = &self.config.topology;
        let exchange = t.commands_exchange();
        let reply_to = t.replies_queue();
        let groups = self.batching.group(messages);
        let mut confirms = Vec::with_capacity(groups.len());
        for group in &groups {
            let (body, properties) = match group.as_slice() {
                [one] => (
                    serde_json::to_vec(&one.command).map_err(broker)?,
                    command_properties(&one.command, &reply_to),
                ),
                many => {
                    let encoded = many
                        .iter()
                        .map(|m| serde_json::to_vec(&m.command))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(broker)?;
                    (
                        join_batch(encoded.iter().map(Vec::as_slice)),
                        batch_properties(&many[0].command.message_id(), many.len())
                            .with_reply_to(reply_to.as_str().into()),
                    )
                }
            };
            let sent = link
                .publisher
                .basic_publish(
                    exchange.as_str().into(),
                    group[0].participant.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &body,
                    properties,
                )
                .await;
            match sent {
                Ok(confirm) => confirms.push((group, confirm)),
                Err(e) => {
                    self.forget(&link).await;
                    return Err(broker(e));
                }
            }
        }
        // Pipelined: every publish is on the wire before the first confirm is awaited.
        let results = join_all(
            confirms
                .into_iter()
                .map(|(group, c)| async move { (group, c.await) }),
        )
        .await;
        for (group, result) in results {
            let confirmation = match result {
                Ok(c) => c,
                Err(e) => {
                    self.forget(&link).await;
                    return Err(broker(e));
                }
            };
            let id = group[0].command.message_id();
            if !confirmation.is_ack() {
                return Err(TransportError::NotConfirmed(id, "nacked".into()));
            }
            if confirmation.take_message().is_some() {
                return Err(TransportError::NotConfirmed(
                    id,
                    format!("no queue is bound for participant {}", group[0].participant),
                ));
            }
            self.wire.count_published();
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), TransportError> {
        // The publishing link is what a start or an operator action needs.
        self.link().await.map(drop)
    }

    async fn dead_letters(&self) -> Result<Option<u64>, TransportError> {
        let link = self.link().await?;
        let queue = look_at_queue(
            &link.connection,
            self.config.topology.dead_letter_queue().as_str(),
        )
        .await
        .map_err(broker)?;
        Ok(Some(u64::from(queue.message_count())))
    }

    async fn list_dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, TransportError> {
        let link = self.link().await?;
        let queue = self.config.topology.dead_letter_queue();
        let ch = link.connection.create_channel().await.map_err(broker)?;
        let mut letters = Vec::new();
        let taken = async {
            while letters.len() < limit {
                match get_unacked(&ch, &queue).await? {
                    Some(delivery) => letters.push(dead_letter_of(&delivery)),
                    None => break,
                }
            }
            Ok(())
        }
        .await;
        // Closing the channel puts every message it took back in its place.
        close(ch, "listed").await;
        taken.map(|()| letters)
    }

    async fn settle_dead_letter(
        &self,
        id: &str,
        action: DeadLetterAction,
    ) -> Result<Option<DeadLetter>, TransportError> {
        let link = self.link().await?;
        let queue = self.config.topology.dead_letter_queue();
        // In confirm mode, for a requeue's publish.
        let ch = confirm_channel(&link.connection).await.map_err(broker)?;
        let settled = async {
            for _ in 0..dead_letters::MAX_SCAN {
                let Some(delivery) = get_unacked(&ch, &queue).await? else {
                    break;
                };
                let letter = dead_letter_of(&delivery);
                if letter.id != id {
                    continue;
                }
                if action == DeadLetterAction::Requeue {
                    republish(&ch, &delivery, &letter).await?;
                }
                delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(broker)?;
                return Ok(Some(letter));
            }
            Ok(None)
        }
        .await;
        // The messages looked through go back in their places.
        close(ch, "settled").await;
        settled
    }

    async fn subscribe(&self, prefetch: u16) -> Result<mpsc::Receiver<Incoming>, TransportError> {
        self.receive(Source::Replies, prefetch).await
    }

    async fn subscribe_starts(
        &self,
        prefetch: u16,
    ) -> Result<mpsc::Receiver<Incoming>, TransportError> {
        self.receive(Source::Starts, prefetch).await
    }

    async fn answer_start(
        &self,
        reply_to: &str,
        answer: &StartAnswer,
    ) -> Result<bool, TransportError> {
        let link = self.link().await?;
        let body = serde_json::to_vec(answer).map_err(broker)?;
        let properties = start_answer_properties(answer);
        match publish_to_queue(&link.publisher, reply_to, &body, properties).await {
            Ok(Confirmed::Taken) => Ok(true),
            Ok(Confirmed::Returned) => Ok(false),
            Ok(Confirmed::Nacked) => Err(TransportError::NotConfirmed(
                format!("{}:answer", answer.request_id),
                "nacked".into(),
            )),
            Err(e) => {
                self.forget(&link).await;
                Err(broker(e))
            }
        }
    }
}

impl AmqpTransport {
    /// Consumes the queue of `source`, handing its messages to the receiver.
    async fn receive(
        &self,
        source: Source,
        prefetch: u16,
    ) -> Result<mpsc::Receiver<Incoming>, TransportError> {
        let (tx, rx) = mpsc::channel(usize::from(prefetch.max(1)));
        // The first connection is made here so that a broken configuration fails loudly.
        let first = consume(&self.config, source, prefetch).await?;
        // Deliveries go on after `close` until the engine drops its receiver.
        let stop = {
            let (shutdown, tx) = (self.shutdown.clone(), tx.clone());
            async move {
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = tx.closed() => {}
                }
            }
        };
        let mut consumer = ReplyConsumer {
            first: Some(first),
            config: self.config.clone(),
            source,
            prefetch,
            tx,
            wire: self.wire.clone(),
            batching: self.batching.clone(),
        };
        tokio::spawn(async move {
            let stop = std::pin::pin!(stop);
            keep_serving(source.name(), Backoff::default(), stop, &mut consumer).await;
        });
        Ok(rx)
    }
}

/// A queue the orchestrator consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// `{p}.replies`: replies (and reply batches) of participants.
    Replies,
    /// `{p}.starts`: start commands of services' relays.
    Starts,
}

impl Source {
    /// Whose sessions these are, in the logs.
    fn name(self) -> &'static str {
        match self {
            Source::Replies => "reply consumer",
            Source::Starts => "start consumer",
        }
    }

    fn queue(self, t: &Topology) -> String {
        match self {
            Source::Replies => t.replies_queue(),
            Source::Starts => t.starts_queue(),
        }
    }
}

/// Takes the next message of `queue` without acknowledging it: it stays the channel's until
/// acked, or until the channel closes, which puts it back.
async fn get_unacked(ch: &Channel, queue: &str) -> Result<Option<Delivery>, TransportError> {
    ch.basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await
        .map(|message| message.map(|m| m.delivery))
        .map_err(broker)
}

async fn close(ch: Channel, why: &str) {
    if ch.status().connected() {
        let _ = ch.close(200, why.into()).await;
    }
}

/// A header value as text, for those that are text, numbers or booleans.
fn header_text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        _ => return None,
    })
}

/// A field of the first `x-death` entry, which RabbitMQ adds when it dead-letters a message
/// itself (when republishing with the reason failed).
fn first_death(properties: &BasicProperties, field: &str) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    header_text(first.inner().get(field)?)
}

/// A delivery from the dead-letter queue as operators see it.
fn dead_letter_of(delivery: &Delivery) -> DeadLetter {
    let properties = &delivery.properties;
    let headers: std::collections::BTreeMap<String, String> = properties
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .filter_map(|(name, value)| Some((name.as_str().to_owned(), header_text(value)?)))
                .collect()
        })
        .unwrap_or_default();
    let message_id = properties.message_id().as_ref().map(|m| m.as_str());
    DeadLetter {
        id: dead_letters::stable_id(message_id, &delivery.data, &headers),
        queue: headers
            .get(DEAD_LETTER_QUEUE_HEADER)
            .cloned()
            .or_else(|| first_death(properties, "queue")),
        reason: headers
            .get(DEAD_LETTER_REASON_HEADER)
            .cloned()
            .or_else(|| first_death(properties, "reason")),
        content_type: properties
            .content_type()
            .as_ref()
            .map(|c| c.as_str().to_owned()),
        body: delivery.data.clone(),
        headers,
        redelivered: delivery.redelivered,
    }
}

/// Publishes a dead letter again to the queue it came from (through the default exchange),
/// with its own properties but the dead-letter headers, and waits for the broker's confirm.
async fn republish(
    ch: &Channel,
    delivery: &Delivery,
    letter: &DeadLetter,
) -> Result<(), TransportError> {
    let Some(queue) = &letter.queue else {
        return Err(TransportError::Refused(format!(
            "dead letter {} does not say which queue it came from; drop it instead",
            letter.id
        )));
    };
    let mut properties = delivery.properties.clone();
    if let Some(headers) = properties.headers().clone() {
        let mut kept = FieldTable::default();
        for (name, value) in headers.inner() {
            let name = name.as_str();
            if ![
                DEAD_LETTER_REASON_HEADER,
                DEAD_LETTER_QUEUE_HEADER,
                "x-death",
            ]
            .contains(&name)
            {
                kept.insert(name.into(), value.clone());
            }
        }
        properties = properties.with_headers(kept);
    }
    let confirmation = ch
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            &delivery.data,
            properties,
        )
        .await
        .map_err(broker)?
        .await
        .map_err(broker)?;
    if !confirmation.is_ack() {
        return Err(TransportError::NotConfirmed(
            letter.id.clone(),
            "nacked".into(),
        ));
    }
    if confirmation.take_message().is_some() {
        return Err(TransportError::Refused(format!(
            "the queue {queue} that dead letter {} came from does not exist",
            letter.id
        )));
    }
    Ok(())
}

/// A consuming connection: the connection, its consumer, and where its dead letters go.
type Consumer = (Connection, lapin::Consumer, Arc<DeadLetters>);

async fn consume(
    config: &AmqpConfig,
    source: Source,
    prefetch: u16,
) -> Result<Consumer, TransportError> {
    let conn = connect(&config.uri).await.map_err(broker)?;
    let ch = conn.create_channel().await.map_err(broker)?;
    match source {
        Source::Replies => declare_replies(&ch, &config.topology, &config.queues).await,
        Source::Starts => declare_starts(&ch, &config.topology, &config.queues).await,
    }
    .map_err(broker)?;
    let queue = source.queue(&config.topology);
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(broker)?;
    // Dead letters are republished with their reason on a confirm-mode channel, then acked.
    let dead = confirm_channel(&conn).await.map_err(broker)?;
    let consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "sagas-orchestrator".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(broker)?;
    let dead = DeadLetters::new(dead, &config.topology, queue);
    Ok((conn, consumer, Arc::new(dead)))
}

/// The sessions of the reply (or start) consumer, each on a connection of its own.
struct ReplyConsumer {
    /// The connection `subscribe` made, for the first session.
    first: Option<Consumer>,
    config: AmqpConfig,
    source: Source,
    prefetch: u16,
    tx: mpsc::Sender<Incoming>,
    wire: Arc<WireCounts>,
    batching: Arc<Batching>,
}

impl<S: Future<Output = ()>> Sessions<S> for ReplyConsumer {
    type Connection = Consumer;
    type Error = TransportError;

    async fn connect(&mut self) -> Result<Consumer, TransportError> {
        match self.first.take() {
            Some(consumer) => Ok(consumer),
            None => consume(&self.config, self.source, self.prefetch).await,
        }
    }

    /// Ends (`Ok`) only when the engine dropped its receiver.
    async fn serve(&mut self, consumer: Consumer, _: Pin<&mut S>) -> Result<(), TransportError> {
        let (conn, mut stream, dead) = consumer;
        let result = match self.source {
            Source::Replies => {
                forward(&mut stream, &dead, &self.tx, &self.wire, &self.batching).await
            }
            Source::Starts => forward_starts(&mut stream, &dead, &self.tx).await,
        };
        let why = if result.is_ok() {
            "shutdown"
        } else {
            "reconnecting"
        };
        let _ = conn.close(200, why.into()).await;
        result
    }
}

/// Hands the replies of `stream` to `tx` until the engine drops its receiver (`Ok`), or the
/// consumer fails or is ended by the broker.
async fn forward(
    stream: &mut lapin::Consumer,
    dead: &Arc<DeadLetters>,
    tx: &mpsc::Sender<Incoming>,
    wire: &WireCounts,
    batching: &Batching,
) -> Result<(), TransportError> {
    while let Some(delivery) = stream.next().await {
        let delivery = delivery.map_err(broker)?;
        wire.count_received();
        for incoming in incoming(delivery, dead, batching).await {
            if tx.send(incoming).await.is_err() {
                return Ok(());
            }
        }
    }
    Err(broker("the broker ended the reply consumer"))
}

/// Hands the start commands of `stream` to `tx`, each with its `reply_to`, until the engine
/// drops its receiver (`Ok`), or the consumer fails or is ended by the broker.
async fn forward_starts(
    stream: &mut lapin::Consumer,
    dead: &Arc<DeadLetters>,
    tx: &mpsc::Sender<Incoming>,
) -> Result<(), TransportError> {
    while let Some(delivery) = stream.next().await {
        let delivery = delivery.map_err(broker)?;
        let incoming = Incoming {
            reply_to: delivery
                .properties
                .reply_to()
                .as_ref()
                .map(|r| r.as_str().to_owned())
                .filter(|r| !r.is_empty()),
            body: delivery.data,
            ack: Box::new(AmqpAck {
                acker: delivery.acker,
                dead: dead.clone(),
                properties: delivery.properties,
            }),
        };
        if tx.send(incoming).await.is_err() {
            return Ok(());
        }
    }
    Err(broker("the broker ended the start consumer"))
}

/// What the engine receives for a delivery: the reply itself, or each reply of a batch (see
/// docs/protocol.md, "Batches"). A body declared a batch that is not one is dead-lettered here.
/// What the replies announce is taken in on the way.
async fn incoming(
    delivery: lapin::message::Delivery,
    dead: &Arc<DeadLetters>,
    batching: &Batching,
) -> Vec<Incoming> {
    let batch = is_batch(&delivery.properties);
    let from = Announcement::read(&delivery.properties);
    let single = AmqpAck {
        acker: delivery.acker,
        dead: dead.clone(),
        properties: delivery.properties,
    };
    if !batch {
        batching.received(from, [delivery.data.as_slice()]);
        return vec![Incoming {
            reply_to: None,
            body: delivery.data,
            ack: Box::new(single),
        }];
    }
    match split_batch(&delivery.data) {
        Ok(elements) => {
            batching.received(from, elements.iter().map(|e| e.get().as_bytes()));
            let shared = Arc::new(BatchAck {
                single,
                remaining: AtomicUsize::new(elements.len()),
                requeue: AtomicBool::new(false),
            });
            elements
                .into_iter()
                .map(|element| Incoming {
                    reply_to: None,
                    body: element.get().as_bytes().to_vec(),
                    ack: Box::new(PartAck(shared.clone())),
                })
                .collect()
        }
        Err(reason) => {
            let reason = format!("malformed reply batch: {reason}");
            tracing::warn!(%reason, "dead-lettering a reply batch");
            if let Err(error) = single.reject(&delivery.data, &reason).await {
                tracing::warn!(%error, "could not dead-letter a reply batch");
            }
            Vec::new()
        }
    }
}

/// One delivery that carried a batch of replies: settled once every reply is, acked if all
/// were acked or dead-lettered, requeued whole if any asked to be requeued.
struct BatchAck {
    single: AmqpAck,
    remaining: AtomicUsize,
    requeue: AtomicBool,
}

impl BatchAck {
    async fn settle(&self, requeue: bool) -> Result<(), TransportError> {
        if requeue {
            self.requeue.store(true, Ordering::SeqCst);
        }
        if self.remaining.fetch_sub(1, Ordering::SeqCst) != 1 {
            return Ok(());
        }
        if self.requeue.load(Ordering::SeqCst) {
            self.single.requeue().await
        } else {
            self.single.ack().await
        }
    }
}

/// The settlement of one reply of a batch.
struct PartAck(Arc<BatchAck>);

#[async_trait]
impl Ack for PartAck {
    async fn ack(&self) -> Result<(), TransportError> {
        self.0.settle(false).await
    }

    async fn reject(&self, body: &[u8], reason: &str) -> Result<(), TransportError> {
        // Dead-lettered alone; if that fails the whole delivery comes back and it is tried
        // again (the delivery cannot be rejected for one reply only).
        match self.0.single.dead.publish_element(body, reason).await {
            Ok(()) => self.0.settle(false).await,
            Err(error) => {
                tracing::warn!(%error, "could not dead-letter one reply of a batch");
                self.0.settle(true).await
            }
        }
    }

    async fn requeue(&self) -> Result<(), TransportError> {
        self.0.settle(true).await
    }
}

/// One delivery: its acker, and what a dead letter of it carries.
struct AmqpAck {
    acker: lapin::Acker,
    dead: Arc<DeadLetters>,
    properties: BasicProperties,
}

#[async_trait]
impl Ack for AmqpAck {
    async fn ack(&self) -> Result<(), TransportError> {
        self.acker
            .ack(BasicAckOptions::default())
            .await
            .map(drop)
            .map_err(broker)
    }

    async fn reject(&self, body: &[u8], reason: &str) -> Result<(), TransportError> {
        let properties = self.properties.clone();
        self.dead
            .reject(&self.acker, body, properties, reason)
            .await
            .map_err(broker)
    }

    async fn requeue(&self) -> Result<(), TransportError> {
        self.acker
            .nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await
            .map(drop)
            .map_err(broker)
    }
}
