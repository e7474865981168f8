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
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::clock::Clock;
use crate::definition::Registry;
use crate::machine::{self, Input, Instance, MissingDefinition, Timer};
use crate::store::{ListFilter, LoggedEvent, OutboxMessage, SagaStore, StoreError, StoredInstance};
use crate::transport::{Incoming, Transport, TransportError};
use sagas_participant::protocol::{PROTOCOL_VERSION, Reply};

/// Tuning of the engine's loops.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Replies handled at the same time.
    pub reply_concurrency: usize,
    /// Unacknowledged replies the broker may send ahead.
    pub prefetch: u16,
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
            reply_concurrency: 32,
            prefetch: 64,
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
        Arc::new(Engine {
            store,
            transport,
            registry: Arc::new(registry),
            clock,
            config,
            stats: Stats::default(),
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

    /// Starts an instance of the newest version of `definition`.
    pub async fn start(&self, definition: &str, input: Value) -> Result<Instance, EngineError> {
        let def = self
            .registry
            .latest(definition)
            .ok_or_else(|| EngineError::UnknownDefinition(definition.to_owned()))?;
        def.validate_input(&input)
            .map_err(|e| EngineError::InvalidInput(definition.to_owned(), e))?;
        let now = self.clock.now();
        let id = Uuid::now_v7();
        let t = machine::start(id, (**def.plan()).clone(), input, now, def);
        let outbox = self.store.create(&t, now).await?;
        self.stats.started.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%id, definition, "started");
        self.publish(outbox).await;
        Ok(t.instance)
    }

    /// Feeds one input to an instance and carries out the result.
    pub async fn deliver(
        &self,
        id: Uuid,
        input: Input,
        fired: Option<Timer>,
    ) -> Result<Instance, EngineError> {
        let now = self.clock.now();
        let registry = self.registry.clone();
        let updated = self
            .store
            .update(
                id,
                fired,
                now,
                Box::new(move |inst| {
                    if let Some(def) = registry.get(&inst.plan.name, inst.plan.version) {
                        return Ok(machine::handle(inst, input, now, def)?);
                    }
                    // Without the code, only transitions that compute no command may commit;
                    // the others are left to a process that has the definition.
                    let probe = MissingDefinition::default();
                    let t = machine::handle(inst, input, now, &probe)?;
                    if probe.was_asked() {
                        return Err(StoreError::MissingDefinition(format!(
                            "definition {} version {} is not registered in this process",
                            inst.plan.name, inst.plan.version
                        )));
                    }
                    Ok(t)
                }),
            )
            .await?;
        self.publish(updated.outbox).await;
        Ok(updated.transition.instance)
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

    /// Publishes committed outbox rows and deletes them once confirmed. A failure leaves them
    /// for the relay, so it is logged, not returned.
    async fn publish(&self, outbox: Vec<OutboxMessage>) {
        if outbox.is_empty() {
            return;
        }
        match self.transport.publish(&outbox).await {
            Ok(()) => {
                let ids: Vec<i64> = outbox.iter().map(|m| m.id).collect();
                if let Err(e) = self.store.delete_outbox(&ids).await {
                    tracing::warn!(error = %e, "published outbox rows not deleted; the relay will publish them again");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, rows = outbox.len(), "publish failed; the outbox relay will retry");
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
        for task in [consumer, timers, relay] {
            let _ = task.await;
        }
        Ok(())
    }

    async fn consume(
        self: Arc<Self>,
        mut replies: tokio::sync::mpsc::Receiver<Incoming>,
        shutdown: CancellationToken,
    ) {
        let permits = Arc::new(Semaphore::new(self.config.reply_concurrency));
        loop {
            let incoming = tokio::select! {
                _ = shutdown.cancelled() => break,
                m = replies.recv() => match m { Some(m) => m, None => break },
            };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let engine = self.clone();
            tokio::spawn(async move {
                engine.on_incoming(incoming).await;
                drop(permit);
            });
        }
        // Let handlers in flight finish so their acks go out.
        let _ = permits
            .acquire_many(self.config.reply_concurrency as u32)
            .await;
    }

    async fn on_incoming(&self, incoming: Incoming) {
        let reply: Reply = match serde_json::from_slice(&incoming.body) {
            Ok(r) => r,
            Err(e) => {
                let reason = format!("malformed reply: {e}");
                return self.dead_letter(incoming, &reason).await;
            }
        };
        if reply.protocol != PROTOCOL_VERSION {
            let reason = format!("unknown protocol version {}", reply.protocol);
            return self.dead_letter(incoming, &reason).await;
        }
        let id = reply.transaction_id;
        match self.deliver(id, Input::Reply(reply), None).await {
            Ok(_) => {
                self.stats.replies.fetch_add(1, Ordering::Relaxed);
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
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = incoming.ack.requeue().await;
            }
            Err(e) => {
                tracing::warn!(%id, error = %e, "reply not committed; it will be redelivered");
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = incoming.ack.requeue().await;
            }
        }
    }

    async fn dead_letter(&self, incoming: Incoming, reason: &str) {
        tracing::warn!(reason, "reply dead-lettered");
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
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
                        .for_each_concurrent(self.config.reply_concurrency, |(id, timer)| {
                            let engine = &self;
                            async move {
                                engine.stats.timers.fetch_add(1, Ordering::Relaxed);
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
                    self.publish(rows).await;
                    self.stats.relayed.fetch_add(n, Ordering::Relaxed);
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
