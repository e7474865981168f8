//! The in-process transport: tokio channels instead of a broker, and participants that run in
//! the same process.
//!
//! It is the embedded default's transport (the quickstart) and a test double; production uses
//! [`AmqpTransport`](super::AmqpTransport). Semantics follow the AMQP transport where they
//! matter to the engine:
//!
//! - a participant's queue exists once declared ([`Transport::declare`], or when a participant
//!   starts); publishing to an undeclared participant fails like an unroutable message, and the
//!   outbox relay retries it;
//! - commands wait in the queue while no participant consumes it;
//! - replies are JSON bodies, decoded by the engine as from the broker; a requeued reply comes
//!   back, a rejected one is kept in [`MemoryTransport::dead_letters`], where operators can
//!   list, requeue and drop it as in the broker's dead-letter queue (its origin is the queue
//!   [`REPLIES_QUEUE`]).
//!
//! Nothing survives the process: commands and replies in flight are lost with it, as with a
//! broker crash without persistent messages. The engine recovers from that on its own: the
//! store's deadline timers resend every unanswered command.
//!
//! Participants ([`MemoryTransport::participant`]) are plain async handlers of a command. A
//! small in-memory stand-in for the SDK's barrier (which needs PostgreSQL) makes them
//! idempotent per `(transaction, step, operation)`: a duplicate gets the stored outcome without
//! running the handler again, an undo whose forward operation never ran does nothing
//! (null compensation), and a forward operation arriving after its undo is refused
//! (anti-hanging). Its memory is never freed and dies with the process.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::dead_letters::{self, DeadLetterAction};
use super::{Ack, Incoming, Transport, TransportError};
use crate::store::OutboxMessage;
use sagas_participant::amqp::headers::{DEAD_LETTER_QUEUE_HEADER, DEAD_LETTER_REASON_HEADER};
use sagas_participant::protocol::{CONTENT_TYPE, Command, Operation, Outcome};

/// The name the in-memory transport gives its replies queue, the origin of its dead letters.
pub const REPLIES_QUEUE: &str = "replies";

/// A participant's handler on the in-memory transport.
#[async_trait]
pub trait MemoryHandler: Send + Sync + 'static {
    /// Carries out one command and says how it went.
    async fn handle(&self, command: &Command) -> Outcome;
}

#[async_trait]
impl<F, Fut> MemoryHandler for F
where
    F: Fn(Command) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    async fn handle(&self, command: &Command) -> Outcome {
        self(command.clone()).await
    }
}

/// A reply that could not be handled, with the reason the engine gave.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The reply's body.
    pub body: Vec<u8>,
    /// Why it was rejected.
    pub reason: String,
}

impl DeadLetter {
    /// As operators see it: the headers a broker's dead letter would carry, its id hashed from
    /// them and the body.
    fn view(&self) -> dead_letters::DeadLetter {
        let headers = [
            (DEAD_LETTER_REASON_HEADER, self.reason.as_str()),
            (DEAD_LETTER_QUEUE_HEADER, REPLIES_QUEUE),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
        dead_letters::DeadLetter {
            id: dead_letters::stable_id(None, &self.body, &headers),
            queue: Some(REPLIES_QUEUE.to_owned()),
            reason: Some(self.reason.clone()),
            content_type: Some(CONTENT_TYPE.to_owned()),
            body: self.body.clone(),
            headers,
            redelivered: false,
        }
    }
}

struct Queue {
    tx: mpsc::UnboundedSender<Command>,
    /// `None` while a participant consumes the queue.
    rx: Option<mpsc::UnboundedReceiver<Command>>,
}

impl Queue {
    fn new() -> Queue {
        let (tx, rx) = mpsc::unbounded_channel();
        Queue { tx, rx: Some(rx) }
    }
}

struct Inner {
    queues: Mutex<HashMap<String, Queue>>,
    ledgers: Mutex<HashMap<String, Arc<Ledger>>>,
    replies_tx: mpsc::UnboundedSender<Vec<u8>>,
    /// `None` while subscribed.
    replies_rx: Mutex<Option<mpsc::UnboundedReceiver<Vec<u8>>>>,
    dead_letters: Mutex<Vec<DeadLetter>>,
    shutdown: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these short locks leaves the data consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The in-process [`Transport`]. Clones share the same queues.
#[derive(Clone)]
pub struct MemoryTransport {
    inner: Arc<Inner>,
}

impl Default for MemoryTransport {
    fn default() -> Self {
        MemoryTransport::new()
    }
}

impl std::fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let queues: Vec<String> = lock(&self.inner.queues).keys().cloned().collect();
        f.debug_struct("MemoryTransport")
            .field("queues", &queues)
            .finish()
    }
}

impl MemoryTransport {
    /// A transport with no queues yet.
    pub fn new() -> MemoryTransport {
        let (replies_tx, replies_rx) = mpsc::unbounded_channel();
        MemoryTransport {
            inner: Arc::new(Inner {
                queues: Mutex::new(HashMap::new()),
                ledgers: Mutex::new(HashMap::new()),
                replies_tx,
                replies_rx: Mutex::new(Some(replies_rx)),
                dead_letters: Mutex::new(Vec::new()),
                shutdown: CancellationToken::new(),
            }),
        }
    }

    /// Starts a participant named `name` that handles the commands sent to it with `handler`,
    /// each in its own task, through the in-memory barrier. One participant per name at a time;
    /// stopping it leaves the queue (and what the barrier remembers) to the next one.
    pub fn participant(
        &self,
        name: &str,
        handler: impl MemoryHandler,
    ) -> Result<MemoryParticipant, TransportError> {
        let mut commands = {
            let mut queues = lock(&self.inner.queues);
            let queue = queues.entry(name.to_owned()).or_insert_with(Queue::new);
            queue.rx.take().ok_or_else(|| {
                TransportError::Broker(format!("participant {name} is already running"))
            })?
        };
        let ledger = lock(&self.inner.ledgers)
            .entry(name.to_owned())
            .or_default()
            .clone();
        let handler: Arc<dyn MemoryHandler> = Arc::new(handler);
        let stop = self.inner.shutdown.child_token();
        let runs = Arc::new(AtomicU64::new(0));
        let inner = self.inner.clone();
        let (token, counter, queue) = (stop.clone(), runs.clone(), name.to_owned());
        let task = tokio::spawn(async move {
            loop {
                let command = tokio::select! {
                    _ = token.cancelled() => break,
                    c = commands.recv() => match c { Some(c) => c, None => break },
                };
                let (ledger, handler, counter) = (ledger.clone(), handler.clone(), counter.clone());
                let replies = inner.replies_tx.clone();
                tokio::spawn(async move {
                    let outcome = ledger.execute(&command, handler, &counter).await;
                    let reply = command.reply(outcome);
                    if let Ok(body) = serde_json::to_vec(&reply) {
                        let _ = replies.send(body);
                    }
                });
            }
            // Hand the queue back so that a restarted participant finds what is waiting.
            if let Some(q) = lock(&inner.queues).get_mut(&queue) {
                q.rx = Some(commands);
            }
        });
        Ok(MemoryParticipant {
            name: name.to_owned(),
            stop,
            task: Some(task),
            runs,
        })
    }

    /// Replies the engine rejected, oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        lock(&self.inner.dead_letters).clone()
    }

    /// Commands waiting in `participant`'s queue (not yet taken by a participant).
    pub fn queued(&self, participant: &str) -> usize {
        lock(&self.inner.queues)
            .get(participant)
            .and_then(|q| q.rx.as_ref().map(|rx| rx.len()))
            .unwrap_or(0)
    }

    /// Sends a raw reply body as if a participant had (for tests of bad input).
    pub fn send_reply(&self, body: Vec<u8>) {
        let _ = self.inner.replies_tx.send(body);
    }

    /// Stops every participant and ends the reply subscription.
    pub fn close(&self) {
        self.inner.shutdown.cancel();
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    async fn dead_letters(&self) -> Result<Option<u64>, TransportError> {
        Ok(Some(lock(&self.inner.dead_letters).len() as u64))
    }

    async fn list_dead_letters(
        &self,
        limit: usize,
    ) -> Result<Vec<dead_letters::DeadLetter>, TransportError> {
        Ok(lock(&self.inner.dead_letters)
            .iter()
            .take(limit)
            .map(DeadLetter::view)
            .collect())
    }

    async fn settle_dead_letter(
        &self,
        id: &str,
        action: DeadLetterAction,
    ) -> Result<Option<dead_letters::DeadLetter>, TransportError> {
        let mut letters = lock(&self.inner.dead_letters);
        let Some(at) = letters.iter().position(|d| d.view().id == id) else {
            return Ok(None);
        };
        let view = letters[at].view();
        if action == DeadLetterAction::Requeue {
            self.inner
                .replies_tx
                .send(letters[at].body.clone())
                .map_err(|_| TransportError::Broker("the in-memory transport is closed".into()))?;
        }
        letters.remove(at);
        Ok(Some(view))
    }

    async fn declare(&self, participants: &[String]) -> Result<(), TransportError> {
        let mut queues = lock(&self.inner.queues);
        for p in participants {
            queues.entry(p.clone()).or_insert_with(Queue::new);
        }
        Ok(())
    }

    async fn publish(&self, messages: &[OutboxMessage]) -> Result<(), TransportError> {
        let queues = lock(&self.inner.queues);
        for m in messages {
            if !queues.contains_key(&m.participant) {
                return Err(TransportError::NotConfirmed(
                    m.command.message_id(),
                    format!("no queue for participant {}", m.participant),
                ));
            }
        }
        for m in messages {
            // The receiver lives in the map (or with a participant that puts it back).
            let _ = queues[&m.participant].tx.send(m.command.clone());
        }
        Ok(())
    }

    async fn subscribe(&self, prefetch: u16) -> Result<mpsc::Receiver<Incoming>, TransportError> {
        let mut source = lock(&self.inner.replies_rx)
            .take()
            .ok_or_else(|| TransportError::Broker("replies are already consumed".into()))?;
        let (tx, rx) = mpsc::channel(usize::from(prefetch.max(1)));
        let inner = self.inner.clone();
        tokio::spawn(async move {
            loop {
                // Take a slot before a reply, so that no reply is taken without a place to go.
                let permit = tokio::select! {
                    _ = inner.shutdown.cancelled() => break,
                    p = tx.reserve() => match p { Ok(p) => p, Err(_) => break },
                };
                let body = tokio::select! {
                    _ = inner.shutdown.cancelled() => break,
                    _ = tx.closed() => break,
                    b = source.recv() => match b { Some(b) => b, None => break },
                };
                let ack = MemoryAck {
                    inner: inner.clone(),
                    body: body.clone(),
                };
                permit.send(Incoming {
                    reply_to: None,
                    body,
                    ack: Box::new(ack),
                });
            }
            // A later subscriber (an engine started again) gets the replies still waiting.
            *lock(&inner.replies_rx) = Some(source);
        });
        Ok(rx)
    }

    async fn ping(&self) -> Result<(), TransportError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(TransportError::Broker(
                "the in-memory transport is closed".into(),
            ));
        }
        Ok(())
    }
}

struct MemoryAck {
    inner: Arc<Inner>,
    body: Vec<u8>,
}

#[async_trait]
impl Ack for MemoryAck {
    async fn ack(&self) -> Result<(), TransportError> {
        Ok(())
    }

    async fn reject(&self, body: &[u8], reason: &str) -> Result<(), TransportError> {
        lock(&self.inner.dead_letters).push(DeadLetter {
            body: body.to_vec(),
            reason: reason.to_owned(),
        });
        Ok(())
    }

    async fn requeue(&self) -> Result<(), TransportError> {
        self.inner
            .replies_tx
            .send(self.body.clone())
            .map_err(|_| TransportError::Broker("the in-memory transport is closed".into()))
    }
}

/// A running in-process participant; dropping it stops it too.
pub struct MemoryParticipant {
    name: String,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    runs: Arc<AtomicU64>,
}

impl MemoryParticipant {
    /// The participant's name (its queue).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many times the handler ran (duplicates answered from the barrier do not count).
    pub fn handled(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    /// Stops taking commands (those being handled still reply) and gives the queue back.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MemoryParticipant {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type Slot = Arc<tokio::sync::Mutex<Option<Outcome>>>;

/// The in-memory barrier: the outcome of every `(transaction, step, operation)` handled.
#[derive(Default)]
struct Ledger {
    slots: Mutex<HashMap<(Uuid, String, Operation), Slot>>,
}

impl Ledger {
    fn slot(&self, cmd: &Command, op: Operation) -> Slot {
        lock(&self.slots)
            .entry((cmd.transaction_id, cmd.step.clone(), op))
            .or_default()
            .clone()
    }

    /// Runs `cmd` at most once, following the SDK barrier's rules (participants/src/barrier.rs).
    async fn execute(
        &self,
        cmd: &Command,
        handler: Arc<dyn MemoryHandler>,
        runs: &AtomicU64,
    ) -> Outcome {
        let op = cmd.operation;
        // Held until the outcome is stored: a concurrent duplicate waits, then reads it.
        let slot = self.slot(cmd, op);
        let mut mine = slot.lock().await;
        if let Some(stored) = mine.as_ref() {
            return stored.clone();
        }
        if op.is_undo() {
            let forward = op.forward();
            let guard = self.slot(cmd, forward);
            let mut theirs = guard.lock().await;
            let took_effect = match theirs.as_ref() {
                Some(outcome) => matches!(outcome, Outcome::Succeeded { .. }),
                None => {
                    // The forward operation never ran: refuse it if it comes late.
                    *theirs = Some(Outcome::failed(format!(
                        "{forward} refused: it arrived after its {op} (anti-hanging)"
                    )));
                    false
                }
            };
            drop(theirs);
            if !took_effect {
                let outcome = Outcome::succeeded(json!({ "null_compensation": true }));
                *mine = Some(outcome.clone());
                return outcome;
            }
        }
        runs.fetch_add(1, Ordering::Relaxed);
        let command = cmd.clone();
        let outcome = match tokio::spawn(async move { handler.handle(&command).await }).await {
            Ok(outcome) => outcome,
            Err(e) => Outcome::retry(format!("handler panicked: {e}")),
        };
        // As the barrier: successes are final; business failures only for forward operations
        // (an undo or confirm must run again once the participant is fixed); retries never.
        let keep = match &outcome {
            Outcome::Succeeded { .. } => true,
            Outcome::Failed { .. } => op.is_forward(),
            Outcome::Retry { .. } | Outcome::InProgress { .. } => false,
        };
        if keep {
            *mine = Some(outcome.clone());
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::time::Duration;

    fn command(op: Operation, attempt: u32, id: Uuid) -> Command {
        Command {
            protocol: 1,
            transaction_id: id,
            definition: "d".into(),
            step: "s".into(),
            operation: op,
            attempt,
            payload: Value::Null,
            output: None,
            deadline: None,
            traceparent: None,
        }
    }

    async fn run(ledger: &Ledger, cmd: &Command, runs: &AtomicU64) -> Outcome {
        let handler: Arc<dyn MemoryHandler> =
            Arc::new(|c: Command| async move { Outcome::succeeded(json!(c.attempt)) });
        ledger.execute(cmd, handler, runs).await
    }

    #[tokio::test]
    async fn a_duplicate_gets_the_stored_outcome_without_running_again() {
        let (ledger, runs, id) = (Ledger::default(), AtomicU64::new(0), Uuid::now_v7());
        let first = run(&ledger, &command(Operation::Action, 1, id), &runs).await;
        let again = run(&ledger, &command(Operation::Action, 2, id), &runs).await;
        assert_eq!(first, Outcome::succeeded(json!(1)));
        assert_eq!(again, first);
        assert_eq!(runs.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn an_undo_before_its_forward_operation_is_null_and_refuses_the_late_forward() {
        let (ledger, runs, id) = (Ledger::default(), AtomicU64::new(0), Uuid::now_v7());
        let undo = run(&ledger, &command(Operation::Compensate, 1, id), &runs).await;
        assert_eq!(
            undo,
            Outcome::succeeded(json!({ "null_compensation": true }))
        );
        let late = run(&ledger, &command(Operation::Action, 1, id), &runs).await;
        assert!(matches!(late, Outcome::Failed { .. }), "{late:?}");
        assert_eq!(runs.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_retry_and_runs_again_next_time() {
        let (ledger, runs, id) = (Ledger::default(), AtomicU64::new(0), Uuid::now_v7());
        let cmd = command(Operation::Action, 1, id);
        let panics: Arc<dyn MemoryHandler> = Arc::new(|_c: Command| async move {
            panic!("boom");
        });
        let outcome = ledger.execute(&cmd, panics, &runs).await;
        assert!(matches!(outcome, Outcome::Retry { .. }), "{outcome:?}");
        assert_eq!(
            run(&ledger, &cmd, &runs).await,
            Outcome::succeeded(json!(1))
        );
    }

    #[tokio::test]
    async fn commands_wait_in_the_queue_until_a_participant_takes_them() {
        let transport = MemoryTransport::new();
        transport.declare(&["p".into()]).await.unwrap();
        let mut replies = transport.subscribe(4).await.unwrap();
        let cmd = command(Operation::Action, 1, Uuid::now_v7());
        let message = OutboxMessage {
            id: 1,
            participant: "p".into(),
            command: cmd.clone(),
        };
        transport
            .publish(std::slice::from_ref(&message))
            .await
            .unwrap();
        assert_eq!(transport.queued("p"), 1);
        let unroutable = OutboxMessage {
            participant: "nobody".into(),
            ..message
        };
        assert!(transport.publish(&[unroutable]).await.is_err());
        let p = transport
            .participant("p", |c: Command| async move {
                Outcome::succeeded(json!(c.step))
            })
            .unwrap();
        let incoming = tokio::time::timeout(Duration::from_secs(5), replies.recv())
            .await
            .unwrap()
            .unwrap();
        let reply: sagas_participant::protocol::Reply =
            serde_json::from_slice(&incoming.body).unwrap();
        assert_eq!(reply, cmd.reply(Outcome::succeeded(json!("s"))));
        assert_eq!(p.handled(), 1);
        p.stop().await;
        assert!(
            transport
                .participant("p", |_c: Command| async { Outcome::retry("x") })
                .is_ok()
        );
    }

    #[tokio::test]
    async fn a_rejected_reply_is_listed_with_its_reason_and_can_be_requeued_or_dropped() {
        let transport = MemoryTransport::new();
        let mut replies = transport.subscribe(4).await.unwrap();
        let within = Duration::from_secs(5);
        for body in [&b"{not json"[..], b"[]"] {
            transport.send_reply(body.to_vec());
            let incoming = tokio::time::timeout(within, replies.recv())
                .await
                .unwrap()
                .unwrap();
            incoming
                .ack
                .reject(&incoming.body, "malformed reply")
                .await
                .unwrap();
        }
        let listed = transport.list_dead_letters(10).await.unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].body, b"{not json");
        assert_eq!(listed[0].reason.as_deref(), Some("malformed reply"));
        assert_eq!(listed[0].queue.as_deref(), Some(REPLIES_QUEUE));
        assert_ne!(listed[0].id, listed[1].id);
        assert_eq!(transport.list_dead_letters(1).await.unwrap().len(), 1);

        let requeue = DeadLetterAction::Requeue;
        let requeued = transport.settle_dead_letter(&listed[0].id, requeue).await;
        assert_eq!(requeued.unwrap().unwrap().body, b"{not json");
        let again = tokio::time::timeout(within, replies.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.body, b"{not json", "back on the replies queue");
        let drop = DeadLetterAction::Drop;
        assert!(
            transport
                .settle_dead_letter(&listed[1].id, drop)
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            transport
                .settle_dead_letter(&listed[1].id, drop)
                .await
                .unwrap()
                .is_none()
        );
        assert!(transport.list_dead_letters(10).await.unwrap().is_empty());
    }
}
