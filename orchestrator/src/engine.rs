//! The engine: the imperative shell around the state machine.
//!
//! For every input (a start request, a reply, a due timer, an operator action) it locks the
//! instance, lets the machine decide, commits events + projection + outbox + timers in one
//! transaction, then publishes the outbox with publisher confirms and only then acknowledges
//! what it consumed. A relay republishes outbox rows left behind by a crash.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::{Semaphore, broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::clock::Clock;
use crate::definition::Registry;
use crate::machine::{
    self, Event, Input, Instance, MissingDefinition, Status, Time, Timer, Transition,
};
use crate::store::{
    Created, Decide, Idempotency, ListFilter, LoggedEvent, OutboxMessage, SagaStore, StoreError,
    StoredInstance,
};
use crate::transport::{Incoming, Transport, TransportError};
use sagas_participant::protocol::{PROTOCOL_VERSION, Reply};

/// Tuning of the engine's loops.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Reply batches (store transactions) handled at the same time. One by default: a batch
    /// then always decides on the states the previous one committed (docs/performance.md,
    /// round 6), and the next batch gathers the replies that came meanwhile; publishing and
    /// acknowledging a batch's effects overlap the next batch's commit either way.
    pub reply_concurrency: usize,
    /// At most this many replies are committed in one store transaction. A batch takes the
    /// replies that are waiting when a slot frees up; it never waits for more.
    pub reply_batch: usize,
    /// Unacknowledged replies the broker may send ahead.
    pub prefetch: u16,
    /// Due timers handled at the same time.
    pub timer_concurrency: usize,
    /// How often due timers are looked for when none were due.
    pub timer_poll: Duration,
    /// Timers claimed at once.
    pub timer_batch: i64,
    /// How long a claimed timer is leased before another process may take it.
    pub timer_lease: Duration,
    /// How often the outbox relay looks for rows left unpublished.
    pub relay_poll: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            reply_concurrency: 1,
            reply_batch: 64,
            prefetch: 256,
            timer_concurrency: 32,
            timer_poll: Duration::from_millis(100),
            timer_batch: 128,
            timer_lease: Duration::from_secs(10),
            relay_poll: Duration::from_secs(1),
        }
    }
}

/// Counters the engine keeps (exported as metrics).
#[derive(Debug, Default)]
pub struct Stats {
    /// Instances started.
    pub started: AtomicU64,
    /// Replies committed.
    pub replies: AtomicU64,
    /// Replies dead-lettered (malformed, wrong protocol, unknown transaction).
    pub dead_lettered: AtomicU64,
    /// Timers fired.
    pub timers: AtomicU64,
    /// Outbox rows republished by the relay.
    pub relayed: AtomicU64,
}

/// The options of a start, as a caller asks for them ([`Engine::start_with`]; the API's start
/// request). The engine turns them into the [`machine::StartOptions`] that the `started`
/// event logs: the deadline becomes a time, and the idempotency key stays with the store.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// If the forward phase has not finished this long after the start, the instance is
    /// compensated (or cancelled).
    pub deadline: Option<Duration>,
    /// A client's key: a second start of the same definition with the same key returns the
    /// first instance instead of starting another (a different request with it is a conflict).
    pub idempotency_key: Option<String>,
    /// The W3C trace context to pass on to participants with every command.
    pub traceparent: Option<String>,
}

/// What [`Engine::start_with`] did: the engine's answer to a start, which the API renders as
/// [`crate::api::sagas::Started`].
#[derive(Debug, Clone)]
pub struct Started {
    /// The instance (just started, or the one the idempotency key already named).
    pub instance: Instance,
    /// False when the idempotency key named an existing instance.
    pub created: bool,
}

/// Published outbox rows are deleted in batches: at most this often...
pub const OUTBOX_DELETE_INTERVAL: Duration = Duration::from_millis(20);
/// ...or as soon as this many ids are waiting.
pub const OUTBOX_DELETE_BATCH: usize = 256;

/// What the outbox deleter is told.
enum Deletion {
    /// Ids of rows whose publish the broker confirmed.
    Ids(Vec<i64>),
    /// Delete everything received so far, then answer.
    Flush(oneshot::Sender<()>),
}

/// Deletes confirmed outbox rows in batches, one `DELETE … WHERE id = ANY` per batch, off the
/// path of the start and reply that published them. The first ids after a quiet period are
/// deleted at once; under load the deletes run at most every [`OUTBOX_DELETE_INTERVAL`] (or
/// every [`OUTBOX_DELETE_BATCH`] ids), so one transaction deletes many rows. A row whose
/// delete is lost (crash, failed statement) is republished by the relay after its grace
/// period: a duplicate command, which the participants' barrier absorbs.
async fn delete_loop(store: Arc<dyn SagaStore>, mut rx: mpsc::UnboundedReceiver<Deletion>) {
    let mut batch: Vec<i64> = Vec::new();
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    let mut last = tokio::time::Instant::now()
        .checked_sub(OUTBOX_DELETE_INTERVAL)
        .unwrap_or_else(tokio::time::Instant::now);
    let mut open = true;
    while open {
        // Wait for work.
        match rx.recv().await {
            Some(Deletion::Ids(ids)) => batch.extend(ids),
            Some(Deletion::Flush(done)) => waiting.push(done),
            None => open = false,
        }
        // Collect until the interval since the last delete is over, the batch is full, or a
        // flush is asked for.
        let until = last + OUTBOX_DELETE_INTERVAL;
        while open && waiting.is_empty() && batch.len() < OUTBOX_DELETE_BATCH {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(Deletion::Ids(ids)) => batch.extend(ids),
                    Some(Deletion::Flush(done)) => waiting.push(done),
                    None => open = false,
                },
                _ = tokio::time::sleep_until(until) => break,
            }
        }
        // Whatever else is already queued goes with it.
        while let Ok(m) = rx.try_recv() {
            match m {
                Deletion::Ids(ids) => batch.extend(ids),
                Deletion::Flush(done) => waiting.push(done),
            }
        }
        if !batch.is_empty() {
            if let Err(e) = store.delete_outbox(&batch).await {
                tracing::warn!(error = %e, rows = batch.len(), "published outbox rows not deleted; the relay will publish them again");
            }
            batch.clear();
            last = tokio::time::Instant::now();
        }
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Publishes committed outbox rows and hands the confirmed ones to the deleter.
#[derive(Clone)]
struct Publisher {
    transport: Arc<dyn Transport>,
    store: Arc<dyn SagaStore>,
    /// The background deleter of published outbox rows (none outside a Tokio runtime: then
    /// rows are deleted right after their confirm).
    deleter: Option<mpsc::UnboundedSender<Deletion>>,
}

impl Publisher {
    /// Publishes `outbox` and, once confirmed, deletes the rows: at once when `now` (the
    /// relay), else through the background deleter. A failure leaves them for the relay, so it
    /// is logged, not returned.
    async fn publish(&self, outbox: Vec<OutboxMessage>, now: bool) {
        if outbox.is_empty() {
            return;
        }
        match self.transport.publish(&outbox).await {
            Ok(()) => {
                let ids: Vec<i64> = outbox.iter().map(|m| m.id).collect();
                let ids = match (&self.deleter, now) {
                    (Some(deleter), false) => match deleter.send(Deletion::Ids(ids)) {
                        Ok(()) => return,
                        Err(mpsc::error::SendError(Deletion::Ids(ids))) => ids,
                        Err(_) => return,
                    },
                    _ => ids,
                };
                if let Err(e) = self.store.delete_outbox(&ids).await {
                    tracing::warn!(error = %e, "published outbox rows not deleted; the relay will publish them again");
                }
            }
            Err(e) => {
                metrics::counter!(metric::PUBLISH_FAILURES).increment(1);
                tracing::warn!(error = %e, rows = outbox.len(), "publish failed; the outbox relay will retry");
            }
        }
    }
}

/// Starts are stored in batches of at most this many (one statement, one transaction)...
pub const START_BATCH: usize = 64;
/// ...with at most this many batches being stored at once.
pub const START_SLOTS: usize = 2;

/// A start waiting to be stored, and where to send the result.
struct Creation {
    start: Transition,
    done: oneshot::Sender<(Transition, Result<Vec<OutboxMessage>, StoreError>)>,
}

/// Stores starts in batches: when one of [`START_SLOTS`] is free it takes the starts that are
/// waiting (at most [`START_BATCH`], never waiting for more) and stores them with one
/// [`SagaStore::create_batch`]. A lone start is stored at once; under load many share a
/// commit. If the batch fails as a whole, each start is tried alone, so that each gets its own
/// error.
///
/// The commands of the stored starts are then published together (one publish: a
/// participant's first commands can share a message) before each caller is answered, with
/// an empty outbox for it to publish.
async fn create_loop(
    store: Arc<dyn SagaStore>,
    clock: Arc<dyn Clock>,
    publisher: Publisher,
    mut rx: mpsc::UnboundedReceiver<Creation>,
) {
    let slots = Arc::new(Semaphore::new(START_SLOTS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let Some(first) = rx.recv().await else {
            break;
        };
        let mut batch = vec![first];
        while batch.len() < START_BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let (store, now, publisher) = (store.clone(), clock.now(), publisher.clone());
        tokio::spawn(async move {
            let (starts, senders): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|c| (c.start, c.done)).unzip();
            let results = match store.create_batch(&starts, now).await {
                Ok(results) => results,
                Err(e) => {
                    tracing::debug!(error = %e, starts = starts.len(), "batched starts failed; storing them one by one");
                    let mut results = Vec::with_capacity(starts.len());
                    for start in &starts {
                        results.push(store.create(start, now).await);
                    }
                    results
                }
            };
            // The slots bound the store transactions; the next batch may commit while this
            // one publishes.
            drop(slot);
            let mut outbox = Vec::new();
            let results: Vec<Result<Vec<OutboxMessage>, StoreError>> = results
                .into_iter()
                .map(|result| {
                    result.map(|rows| {
                        outbox.extend(rows);
                        Vec::new()
                    })
                })
                .collect();
            publisher.publish(outbox, false).await;
            for ((start, done), result) in starts.into_iter().zip(senders).zip(results) {
                let _ = done.send((start, result));
            }
        });
    }
}

/// How often [`Engine::wait_terminal`] reads the store while no notification came: another
/// process may finish the instance, and this process hears only of its own transitions.
pub const WAIT_POLL: Duration = Duration::from_secs(1);

/// Names of the metrics the engine records (Prometheus names once exported).
pub mod metric {
    /// Counter, label `definition`: instances started.
    pub const STARTED: &str = "sagas_instances_started_total";
    /// Counter, labels `definition`, `status` (`completed`, `compensated`, `resolved`):
    /// instances that reached a terminal status.
    pub const FINISHED: &str = "sagas_instances_finished_total";
    /// Counter, label `definition`: instances that became stuck (need an operator).
    pub const STUCK: &str = "sagas_instances_stuck_total";
    /// Counter, label `action`: operator actions committed.
    pub const OPERATOR_ACTIONS: &str = "sagas_operator_actions_total";
    /// Counter: participant replies committed.
    pub const REPLIES: &str = "sagas_replies_total";
    /// Counter: replies dead-lettered (malformed, unknown protocol or transaction).
    pub const DEAD_LETTERED: &str = "sagas_replies_dead_lettered_total";
    /// Histogram: replies committed per store transaction.
    pub const REPLY_BATCH: &str = "sagas_reply_batch_size";
    /// Counter: timers fired.
    pub const TIMERS: &str = "sagas_timers_fired_total";
    /// Counter: outbox rows republished by the relay.
    pub const RELAYED: &str = "sagas_outbox_relayed_total";
    /// Counter: publishes that failed (rows left for the relay).
    pub const PUBLISH_FAILURES: &str = "sagas_publish_failures_total";

    /// Registers the descriptions of the engine's metrics with the installed recorder.
    pub fn describe() {
        use metrics::describe_counter;
        describe_counter!(STARTED, "Instances started, by definition.");
        describe_counter!(
            FINISHED,
            "Instances that reached a terminal status, by definition and status."
        );
        describe_counter!(STUCK, "Instances that became stuck and need an operator.");
        describe_counter!(OPERATOR_ACTIONS, "Operator actions committed, by action.");
        describe_counter!(REPLIES, "Participant replies committed.");
        describe_counter!(DEAD_LETTERED, "Replies dead-lettered.");
        metrics::describe_histogram!(
            REPLY_BATCH,
            metrics::Unit::Count,
            "Replies committed per store transaction."
        );
        describe_counter!(TIMERS, "Timers fired.");
        describe_counter!(RELAYED, "Outbox rows republished by the relay.");
        describe_counter!(
            PUBLISH_FAILURES,
            "Publishes that failed; the relay retries them."
        );
    }
}

/// True when nothing more happens to an instance without an operator: a waiting request
/// returns.
fn settled(status: Status) -> bool {
    status.is_terminal() || status == Status::Stuck
}

/// Errors the engine reports to its callers.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No definition registered under that name.
    #[error("no definition named {0} is registered")]
    UnknownDefinition(String),
    /// The input does not fit the definition's input type.
    #[error("input does not match definition {0}: {1}")]
    InvalidInput(String, String),
    /// No instance with that id.
    #[error("instance {0} not found")]
    NotFound(Uuid),
    /// The instance needs a definition this process does not have; another process (or a
    /// later deploy) must handle it.
    #[error("{0}")]
    MissingDefinition(String),
    /// An operator action does not fit the instance's state.
    #[error("{0}")]
    Conflict(String),
    /// Storage failed.
    #[error(transparent)]
    Store(StoreError),
    /// The broker failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(id) => EngineError::NotFound(id),
            StoreError::Rejected(r) => EngineError::Conflict(r.0),
            StoreError::MissingDefinition(m) => EngineError::MissingDefinition(m),
            other => EngineError::Store(other),
        }
    }
}

/// The engine. Cheap to share (`Arc`); any number of engines may share one database and broker.
pub struct Engine {
    store: Arc<dyn SagaStore>,
    transport: Arc<dyn Transport>,
    registry: Arc<Registry>,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
    stats: Stats,
    /// Instances of this process that became terminal or stuck (for waiting requests).
    finished: broadcast::Sender<Uuid>,
    /// Cancelled when `run` is told to stop, so that waiting requests end.
    stopping: CancellationToken,
    /// Publishes outbox rows; holds the background deleter of published rows.
    publisher: Publisher,
    /// The background batcher of starts (none outside a Tokio runtime: then each start is
    /// stored alone).
    creator: Option<mpsc::UnboundedSender<Creation>>,
}

impl Engine {
    /// An engine over the given parts.
    pub fn new(
        store: Arc<dyn SagaStore>,
        transport: Arc<dyn Transport>,
        registry: Registry,
        clock: Arc<dyn Clock>,
        config: EngineConfig,
    ) -> Arc<Engine> {
        let deleter = tokio::runtime::Handle::try_current().ok().map(|runtime| {
            let (tx, rx) = mpsc::unbounded_channel();
            runtime.spawn(delete_loop(store.clone(), rx));
            tx
        });
        let publisher = Publisher {
            transport: transport.clone(),
            store: store.clone(),
            deleter,
        };
        let creator = tokio::runtime::Handle::try_current().ok().map(|runtime| {
            let (tx, rx) = mpsc::unbounded_channel();
            runtime.spawn(create_loop(
                store.clone(),
                clock.clone(),
                publisher.clone(),
                rx,
            ));
            tx
        });
        Arc::new(Engine {
            publisher,
            creator,
            store,
            transport,
            registry: Arc::new(registry),
            clock,
            config,
            stats: Stats::default(),
            finished: broadcast::channel(1024).0,
            stopping: CancellationToken::new(),
        })
    }

    /// The registered definitions.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The engine's counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn SagaStore> {
        &self.store
    }

    /// Starts an instance of the newest version of `definition`: [`Engine::start_with`]
    /// without options, answering the instance.
    pub async fn start(&self, definition: &str, input: Value) -> Result<Instance, EngineError> {
        Ok(self
            .start_with(definition, input, StartOptions::default())
            .await?
            .instance)
    }

    /// Starts an instance of the newest version of `definition` with `options` (or, when the
    /// idempotency key names one started before, answers that one).
    pub async fn start_with(
        &self,
        definition: &str,
        input: Value,
        options: StartOptions,
    ) -> Result<Started, EngineError> {
        let def = self
            .registry
            .latest(definition)
            .ok_or_else(|| EngineError::UnknownDefinition(definition.to_owned()))?;
        def.validate_input(&input)
            .map_err(|e| EngineError::InvalidInput(definition.to_owned(), e))?;
        let now = self.clock.now();
        let deadline = match options.deadline {
            None => None,
            Some(d) => Some(
                chrono::Duration::from_std(d)
                    .ok()
                    .and_then(|d| now.checked_add_signed(d))
                    .ok_or_else(|| {
                        EngineError::InvalidInput(
                            definition.to_owned(),
                            "the deadline is too far away".to_owned(),
                        )
                    })?,
            ),
        };
        let id = Uuid::now_v7();
        let idempotency = options.idempotency_key.map(|key| Idempotency {
            key,
            request: serde_json::json!({
                "input": input,
                "deadline_ms": options.deadline.map(|d| d.as_millis() as u64),
            }),
        });
        let logged = machine::StartOptions {
            deadline,
            traceparent: options.traceparent,
        };
        let t = machine::start_with(id, (**def.plan()).clone(), input, logged, now, def);
        let (t, outbox) = match &idempotency {
            None => self.create(t, now).await?,
            Some(idem) => match self.store.create_idempotent(&t, now, idem).await? {
                Created::New(outbox) => (t, outbox),
                Created::Existing {
                    id,
                    same_request: true,
                } => {
                    let stored = self.store.get(id).await?.ok_or(EngineError::NotFound(id))?;
                    return Ok(Started {
                        instance: stored.instance,
                        created: false,
                    });
                }
                Created::Existing { id, .. } => {
                    return Err(EngineError::Conflict(format!(
                        "idempotency key {:?} was used for another request (transaction {id})",
                        idem.key
                    )));
                }
            },
        };
        self.stats.started.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(metric::STARTED, "definition" => definition.to_owned()).increment(1);
        self.committed(&t);
        tracing::debug!(%id, definition, "started");
        self.publish(outbox, false).await;
        Ok(Started {
            instance: t.instance,
            created: true,
        })
    }

    /// Stores a start through the batcher (or alone without one).
    async fn create(
        &self,
        start: Transition,
        now: Time,
    ) -> Result<(Transition, Vec<OutboxMessage>), StoreError> {
        let start = match &self.creator {
            Some(creator) => {
                let (done, result) = oneshot::channel();
                match creator.send(Creation { start, done }) {
                    Ok(()) => {
                        let (start, outbox) = result
                            .await
                            // The batcher is gone (the runtime is shutting down): whether the
                            // start was stored is unknown, as after a lost connection.
                            .map_err(|_| StoreError::Database(sqlx::Error::WorkerCrashed))?;
                        return Ok((start, outbox?));
                    }
                    Err(mpsc::error::SendError(creation)) => creation.start,
                }
            }
            None => start,
        };
        let outbox = self.store.create(&start, now).await?;
        Ok((start, outbox))
    }

    /// Records what a committed transition changed: metrics, and a notification for requests
    /// waiting for the instance to finish.
    fn committed(&self, t: &Transition) {
        let definition = &t.instance.plan.name;
        for event in &t.events {
            match event {
                Event::Finished { status } => {
                    metrics::counter!(metric::FINISHED,
                        "definition" => definition.clone(), "status" => status.as_str())
                    .increment(1);
                }
                Event::Stuck { .. } => {
                    metrics::counter!(metric::STUCK, "definition" => definition.clone())
                        .increment(1);
                }
                Event::OperatorAction { action, .. } => {
                    metrics::counter!(metric::OPERATOR_ACTIONS, "action" => action.as_str())
                        .increment(1);
                }
                _ => {}
            }
        }
        if settled(t.instance.status) && !t.events.is_empty() {
            // Nobody waiting is the usual case.
            let _ = self.finished.send(t.instance.id);
        }
    }

    /// Waits until the instance is terminal or stuck (nothing more happens to it without an
    /// operator), at most `wait` (less if the engine stops), and returns it as it then is;
    /// `None` if there is no such instance.
    ///
    /// Transitions committed by this process wake the wait at once; those of other processes
    /// are seen by reading the store every [`WAIT_POLL`].
    pub async fn wait_terminal(
        &self,
        id: Uuid,
        wait: Duration,
    ) -> Result<Option<StoredInstance>, EngineError> {
        // Subscribe before reading, so a transition committed in between is not missed.
        let mut finished = self.finished.subscribe();
        let until = tokio::time::Instant::now() + wait;
        loop {
            let stored = self.store.get(id).await?;
            match &stored {
                Some(s) if !settled(s.instance.status) => {}
                _ => return Ok(stored),
            }
            let poll = tokio::time::sleep(WAIT_POLL);
            tokio::pin!(poll);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => return Ok(stored),
                    _ = self.stopping.cancelled() => return Ok(stored),
                    _ = &mut poll => break,
                    n = finished.recv() => match n {
                        Ok(done) if done == id => break,
                        Ok(_) => {}
                        // Missed notifications may include ours: read the store.
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => {
                            (&mut poll).await;
                            break;
                        }
                    },
                }
            }
        }
    }

    /// Feeds one input to an instance and carries out the result.
    pub async fn deliver(
        &self,
        id: Uuid,
        input: Input,
        fired: Option<Timer>,
    ) -> Result<Instance, EngineError> {
        let now = self.clock.now();
        let updated = self
            .store
            .update(id, fired, now, self.decider(input, now))
            .await?;
        self.committed(&updated.transition);
        self.publish(updated.outbox, false).await;
        Ok(updated.transition.instance)
    }

    /// The decision on an instance's current state for `input`, run inside the store's
    /// transaction.
    fn decider(&self, input: Input, now: Time) -> Decide<'static> {
        let registry = self.registry.clone();
        Box::new(move |inst| {
            if let Some(def) = registry.get(&inst.plan.name, inst.plan.version) {
                return Ok(machine::handle(inst, input.clone(), now, def)?);
            }
            // Without the code, only transitions that compute no command may commit;
            // the others are left to a process that has the definition.
            let probe = MissingDefinition::default();
            let t = machine::handle(inst, input.clone(), now, &probe)?;
            if probe.was_asked() {
                return Err(StoreError::MissingDefinition(format!(
                    "definition {} version {} is not registered in this process",
                    inst.plan.name, inst.plan.version
                )));
            }
            Ok(t)
        })
    }

    /// The instance's projection.
    pub async fn get(&self, id: Uuid) -> Result<Option<StoredInstance>, EngineError> {
        Ok(self.store.get(id).await?)
    }

    /// The instance's log.
    pub async fn events(&self, id: Uuid) -> Result<Vec<LoggedEvent>, EngineError> {
        Ok(self.store.events(id).await?)
    }

    /// Carries out an operator action ([`Input::Abort`] or [`Input::Retry`]); an action that
    /// does not fit the instance's state is a [`EngineError::Conflict`].
    pub async fn operate(&self, id: Uuid, action: Input) -> Result<StoredInstance, EngineError> {
        self.deliver(id, action, None).await?;
        self.store.get(id).await?.ok_or(EngineError::NotFound(id))
    }

    /// Instances matching `filter`, newest first.
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<StoredInstance>, EngineError> {
        Ok(self.store.list(filter).await?)
    }

    /// Whether the database answers.
    pub async fn ping_store(&self) -> Result<(), StoreError> {
        self.store.ping().await
    }

    /// Whether the broker can be reached.
    pub async fn ping_transport(&self) -> Result<(), TransportError> {
        self.transport.ping().await
    }

    /// Publishes committed outbox rows and, once confirmed, deletes them (see
    /// [`Publisher::publish`]).
    async fn publish(&self, outbox: Vec<OutboxMessage>, now: bool) {
        self.publisher.publish(outbox, now).await;
    }

    /// Waits until the published outbox rows handed to the background deleter so far are
    /// deleted (or their delete failed). `run` does it when it stops.
    pub async fn flush_outbox_deletes(&self) {
        if let Some(deleter) = &self.publisher.deleter {
            let (done, wait) = oneshot::channel();
            if deleter.send(Deletion::Flush(done)).is_ok() {
                let _ = wait.await;
            }
        }
    }

    /// Declares the broker topology the registered definitions need (idempotent; `run` does it
    /// too). Call it first to know that commands published from now on are routable.
    pub async fn declare(&self) -> Result<(), EngineError> {
        Ok(self
            .transport
            .declare(&self.registry.participants())
            .await?)
    }

    /// Runs the reply consumer, the timer loop and the outbox relay until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), EngineError> {
        self.declare().await?;
        let replies = self.transport.subscribe(self.config.prefetch).await?;
        let consumer = tokio::spawn(self.clone().consume(replies, shutdown.clone()));
        let timers = tokio::spawn(self.clone().timer_loop(shutdown.clone()));
        let relay = tokio::spawn(self.clone().relay_loop(shutdown.clone()));
        shutdown.cancelled().await;
        self.stopping.cancel();
        for task in [consumer, timers, relay] {
            let _ = task.await;
        }
        self.flush_outbox_deletes().await;
        Ok(())
    }

    async fn consume(
        self: Arc<Self>,
        mut replies: tokio::sync::mpsc::Receiver<Incoming>,
        shutdown: CancellationToken,
    ) {
        let permits = Arc::new(Semaphore::new(self.config.reply_concurrency));
        let limit = self.config.reply_batch.max(1);
        let mut in_flight = tokio::task::JoinSet::new();
        loop {
            while in_flight.try_join_next().is_some() {}
            // A slot first: while every slot is busy, replies gather in the channel and the
            // next batch takes them all (up to the limit), so batches grow with the load.
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                m = replies.recv() => match m { Some(m) => m, None => break },
            };
            let mut batch = vec![first];
            while batch.len() < limit {
                match replies.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let engine = self.clone();
            in_flight.spawn(async move {
                engine.on_replies(batch, permit).await;
            });
        }
        // Let batches in flight finish so their acks go out.
        while in_flight.join_next().await.is_some() {}
    }

    /// Handles a batch of replies: one store transaction for all, then the commands they
    /// caused are published (pipelined), then each reply is settled.
    ///
    /// `slot` is held until the transaction ends: the slots bound the store transactions, and
    /// while the batch's commands are published and its replies acked, the next batch commits.
    async fn on_replies(&self, batch: Vec<Incoming>, slot: tokio::sync::OwnedSemaphorePermit) {
        let mut replies = Vec::with_capacity(batch.len());
        for incoming in batch {
            let reply: Reply = match serde_json::from_slice(&incoming.body) {
                Ok(r) => r,
                Err(e) => {
                    let reason = format!("malformed reply: {e}");
                    self.dead_letter(incoming, &reason).await;
                    continue;
                }
            };
            if reply.protocol != PROTOCOL_VERSION {
                let reason = format!("unknown protocol version {}", reply.protocol);
                self.dead_letter(incoming, &reason).await;
                continue;
            }
            replies.push((reply, incoming));
        }
        if replies.is_empty() {
            return;
        }
        let now = self.clock.now();
        let (items, replies): (Vec<_>, Vec<_>) = replies
            .into_iter()
            .map(|(reply, incoming)| {
                let id = reply.transaction_id;
                ((id, self.decider(Input::Reply(reply), now)), (id, incoming))
            })
            .unzip();
        let results = match self.store.update_batch(now, items).await {
            Ok(results) => results,
            Err(e) => {
                tracing::warn!(error = %e, replies = replies.len(), "replies not committed; they will be redelivered");
                // The slot stays taken meanwhile: backpressure while the database fails.
                tokio::time::sleep(Duration::from_millis(200)).await;
                for (_, incoming) in replies {
                    let _ = incoming.ack.requeue().await;
                }
                return;
            }
        };
        drop(slot);
        metrics::histogram!(metric::REPLY_BATCH).record(replies.len() as f64);
        let mut outbox = Vec::new();
        let mut settled = Vec::with_capacity(replies.len());
        for ((id, incoming), result) in replies.into_iter().zip(results) {
            let result = match result {
                Ok(updated) => {
                    self.committed(&updated.transition);
                    outbox.extend(updated.outbox);
                    Ok(())
                }
                Err(e) => Err(EngineError::from(e)),
            };
            settled.push((id, incoming, result));
        }
        self.publish(outbox, false).await;
        for (id, incoming, result) in settled {
            self.settle(id, incoming, result).await;
        }
    }

    /// Acks a committed reply, dead-letters one for an unknown instance, requeues the others.
    async fn settle(&self, id: Uuid, incoming: Incoming, result: Result<(), EngineError>) {
        match result {
            Ok(()) => {
                self.stats.replies.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(metric::REPLIES).increment(1);
                if let Err(e) = incoming.ack.ack().await {
                    // The reply comes again and is then ignored as a duplicate.
                    tracing::warn!(error = %e, "ack of a committed reply failed");
                }
            }
            Err(EngineError::NotFound(_)) => {
                let reason = format!("reply for unknown transaction {id}");
                self.dead_letter(incoming, &reason).await;
            }
            Err(e @ EngineError::MissingDefinition(_)) => {
                tracing::warn!(%id, error = %e, "reply left for a process that has the definition");
                // Later, off this batch's path: the broker keeps the reply meanwhile.
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let _ = incoming.ack.requeue().await;
                });
            }
            Err(e) => {
                tracing::warn!(%id, error = %e, "reply not committed; it will be redelivered");
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let _ = incoming.ack.requeue().await;
                });
            }
        }
    }

    async fn dead_letter(&self, incoming: Incoming, reason: &str) {
        tracing::warn!(reason, "reply dead-lettered");
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(metric::DEAD_LETTERED).increment(1);
        if let Err(e) = incoming.ack.reject(&incoming.body, reason).await {
            tracing::warn!(error = %e, "reject failed");
        }
    }

    async fn timer_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let lease = chrono::Duration::from_std(self.config.timer_lease)
            .unwrap_or(chrono::Duration::seconds(30));
        while !shutdown.is_cancelled() {
            let due = self
                .store
                .claim_due_timers(self.clock.now(), self.config.timer_batch, lease)
                .await;
            let full = match due {
                Ok(due) => {
                    let n = due.len();
                    futures_util::stream::iter(due)
                        .for_each_concurrent(self.config.timer_concurrency, |(id, timer)| {
                            let engine = &self;
                            async move {
                                engine.stats.timers.fetch_add(1, Ordering::Relaxed);
                                metrics::counter!(metric::TIMERS).increment(1);
                                if let Err(e) =
                                    engine.deliver(id, Input::Timer(timer), Some(timer)).await
                                {
                                    tracing::warn!(%id, error = %e, "timer not handled; it fires again after its lease");
                                }
                            }
                        })
                        .await;
                    n as i64 >= self.config.timer_batch
                }
                Err(e) => {
                    tracing::warn!(error = %e, "claiming due timers failed");
                    false
                }
            };
            if !full {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(self.config.timer_poll) => {}
                }
            }
        }
    }

    async fn relay_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let lease = chrono::Duration::seconds(30);
        while !shutdown.is_cancelled() {
            match self.store.claim_outbox(self.clock.now(), 256, lease).await {
                Ok(rows) if !rows.is_empty() => {
                    let n = rows.len() as u64;
                    tracing::info!(rows = n, "relaying unpublished outbox rows");
                    self.publish(rows, true).await;
                    self.stats.relayed.fetch_add(n, Ordering::Relaxed);
                    metrics::counter!(metric::RELAYED).increment(n);
                    if n == 256 {
                        continue;
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "claiming the outbox failed"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(self.config.relay_poll) => {}
            }
        }
    }
}
