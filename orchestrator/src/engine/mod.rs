//! The engine: the imperative shell around the state machine.
//!
//! For every input (a start request, a reply, a due timer, an operator action) it locks the
//! instance, lets the machine decide, commits events + projection + outbox + timers in one
//! transaction, then publishes the outbox with publisher confirms and only then acknowledges
//! what it consumed. A relay republishes outbox rows left behind by a crash.
//!
//! This file holds the engine and what it does for one caller (start, deliver, operate, read);
//! `starts` batches starts, `start_commands` takes starts from AMQP, `replies` consumes
//! replies, `timers` fires timers, `relay` republishes what was left, `publish` publishes and
//! deletes outbox rows (`limits` paces them per participant), `breakers` counts attempts for
//! the participants' circuit breakers, `wait` serves requests waiting for instances to settle,
//! `gauges` reads what is open and queued now, `metric` counts.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::clock::Clock;
use crate::definition::{DefinitionError, Registry};
use crate::machine::{self, Input, Instance, MissingDefinition, Status, Time, Timer, Transition};
use crate::store::{
    Decide, ListFilter, LoggedEvent, Pending, SagaStore, Settlements, StoreError, StoredInstance,
    StuckStep,
};
use crate::transport::{Transport, TransportError};

mod breakers;
mod config;
mod definitions;
mod gauges;
mod limits;
pub mod metric;
mod publish;
mod relay;
mod replies;
mod retention;
mod start_commands;
mod starts;
mod timers;
#[cfg(feature = "otel")]
mod trace;
mod wait;

use breakers::BreakerView;
pub use breakers::ParticipantStatus;
pub use config::EngineConfig;
pub use definitions::{DEFINITIONS_INTERVAL, Registered};
pub use metric::Stats;
use publish::Publisher;
pub use publish::{OUTBOX_DELETE_BATCH, OUTBOX_DELETE_INTERVAL};
pub use start_commands::{REQUEUE_DELAY, trace_or_new};
use starts::Creation;
pub use starts::{START_BATCH, START_SLOTS, StartOptions, Started};
pub use wait::Wait;
use wait::Waiters;

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
    /// A definition is refused: malformed, or different from the one stored under its name
    /// and version.
    #[error(transparent)]
    Definition(#[from] DefinitionError),
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
    stats: Arc<Stats>,
    /// The requests waiting for instances to settle, by instance.
    waiters: Waiters,
    /// Word of settled instances between the processes sharing the store (none for a store of
    /// one process, or with [`EngineConfig::wait_notify`] off).
    settlements: Option<Arc<dyn Settlements>>,
    /// Announces the instances this process settled to the others (through `settlements`).
    announcer: Option<mpsc::UnboundedSender<Uuid>>,
    /// Cancelled when `run` is told to stop, so that waiting requests end.
    stopping: CancellationToken,
    /// True once [`Engine::run`] has declared the topology and consumes replies and starts:
    /// the process can do its work (`/readyz`).
    running: tokio::sync::watch::Sender<bool>,
    /// Publishes outbox rows; holds the background deleter of published rows.
    publisher: Publisher,
    /// The background batcher of starts (none outside a Tokio runtime: then each start is
    /// stored alone).
    creator: Option<mpsc::UnboundedSender<Creation>>,
    /// The participants' breakers as this process knows them, and what it counted since it
    /// last reported to them.
    breakers: Arc<BreakerView>,
    /// How many stored documents the last complete look at them found
    /// ([`Engine::load_definitions`]): while the store counts as many, there is nothing new.
    documents_seen: std::sync::atomic::AtomicU64,
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
        let stats = Arc::new(Stats::default());
        let limits = Arc::new(limits::RateLimits::new(config.rate_limits.clone()));
        let publisher = Publisher::new(transport.clone(), store.clone(), stats.clone(), limits);
        let creator = starts::batcher(
            store.clone(),
            clock.clone(),
            publisher.clone(),
            config.batch_linger,
        );
        let settlements = store.settlements().filter(|_| config.wait_notify);
        let announcer = wait::announcer(settlements.clone(), stats.clone());
        let breakers = Arc::new(BreakerView::new(config.breakers));
        Arc::new(Engine {
            breakers,
            publisher,
            creator,
            waiters: Waiters::default(),
            settlements,
            announcer,
            store,
            transport,
            registry: Arc::new(registry),
            clock,
            config,
            stats,
            stopping: CancellationToken::new(),
            running: tokio::sync::watch::Sender::new(false),
            documents_seen: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The registered definitions.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// What this engine counted (its own events; the metrics count every engine of the
    /// process).
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The time on the engine's clock.
    pub fn now(&self) -> Time {
        self.clock.now()
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn SagaStore> {
        &self.store
    }

    /// The transport (operators reach its dead letters through it).
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// Records what a committed transition changed: metrics, and a wake-up for requests
    /// waiting for the instance to settle.
    /// `now` is the time it stored as the instance's `updated_at`.
    fn committed(&self, t: &Transition, now: Time) {
        self.stats.count_events(&t.instance.plan.name, &t.events);
        self.stats.count_attempts(t, self.clock.now());
        self.breakers.count(t);
        if settled(t.instance.status) && !t.events.is_empty() {
            self.settled_here(&t.instance, now);
        }
        #[cfg(feature = "otel")]
        trace::attempts(t);
    }

    /// Feeds one input to an instance and carries out the result.
    pub async fn deliver(
        &self,
        id: Uuid,
        input: Input,
        fired: Option<Timer>,
    ) -> Result<Instance, EngineError> {
        self.deliver_at(id, input, fired, self.clock.now()).await
    }

    /// [`Engine::deliver`] at `now`, the time the transition stores as `updated_at`.
    async fn deliver_at(
        &self,
        id: Uuid,
        input: Input,
        fired: Option<Timer>,
        now: Time,
    ) -> Result<Instance, EngineError> {
        let updated = self
            .store
            .update(id, fired, now, self.decider(input, now))
            .await?;
        self.committed(&updated.transition, now);
        self.publish(updated.outbox).await;
        Ok(updated.transition.instance)
    }

    /// The decision on an instance's current state for `input`, run inside the store's
    /// transaction.
    fn decider(&self, input: Input, now: Time) -> Decide<'static> {
        let registry = self.registry.clone();
        let breakers = self.breakers.clone();
        Box::new(move |inst| {
            if let Some(def) = registry.get(&inst.plan.name, inst.plan.version) {
                return Ok(machine::handle_with(
                    inst,
                    input.clone(),
                    now,
                    &def,
                    &*breakers,
                )?);
            }
            // Without the code, only transitions that compute no command may commit;
            // the others are left to a process that has the definition.
            let probe = MissingDefinition::default();
            let t = machine::handle_with(inst, input.clone(), now, &probe, &*breakers)?;
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

    /// Carries out an operator action ([`Input::Abort`], [`Input::Retry`] or
    /// [`Input::Resolve`]); an action that does not fit the instance's state is a
    /// [`EngineError::Conflict`].
    ///
    /// The answer is the state the action committed: read back afterwards, the instance may
    /// already have moved on (a compensation the abort sent can have finished by then).
    pub async fn operate(&self, id: Uuid, action: Input) -> Result<StoredInstance, EngineError> {
        let now = self.clock.now();
        let instance = self.deliver_at(id, action, None, now).await?;
        let stored = self.store.get(id).await?.ok_or(EngineError::NotFound(id))?;
        Ok(StoredInstance {
            instance,
            created_at: stored.created_at,
            updated_at: now,
        })
    }

    /// The instance's outbox rows and timers: what may still act on it.
    pub async fn in_flight(&self, id: Uuid) -> Result<Pending, EngineError> {
        Ok(self.store.in_flight(id).await?)
    }

    /// Every stuck step of every stuck instance, oldest change first.
    pub async fn stuck_steps(&self) -> Result<Vec<StuckStep>, EngineError> {
        Ok(self.store.stuck_steps().await?)
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

    /// Declares the broker topology the registered definitions need (idempotent; `run` does it
    /// too). Call it first to know that commands published from now on are routable.
    pub async fn declare(&self) -> Result<(), EngineError> {
        Ok(self
            .transport
            .declare(&self.registry.participants())
            .await?)
    }

    /// Whether [`Engine::run`] has declared the topology and consumes replies and starts.
    pub fn is_running(&self) -> bool {
        *self.running.borrow()
    }

    /// Whether [`Engine::run`] was told to stop.
    pub fn is_stopping(&self) -> bool {
        self.stopping.is_cancelled()
    }

    /// Waits until [`Engine::is_running`].
    pub async fn until_running(&self) {
        let mut running = self.running.subscribe();
        let _ = running.wait_for(|r| *r).await;
    }

    /// Runs the reply consumer, the consumer of start commands (when the transport carries
    /// them), the timer loop, the outbox relay, the retention loop, the gauge loop, the
    /// listener for instances other processes settled, the loader of definitions other
    /// processes registered and the breakers' reports until `shutdown`, after
    /// [`Engine::register_definitions`] and [`Engine::load_definitions`].
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), EngineError> {
        self.register_definitions().await?;
        self.load_definitions(None).await?;
        self.declare().await?;
        let replies = self.transport.subscribe(self.config.prefetch).await?;
        let consumer = tokio::spawn(self.clone().consume(replies, shutdown.clone()));
        let starts = match self.transport.subscribe_starts(self.config.prefetch).await {
            Ok(starts) => Some(tokio::spawn(
                self.clone().consume_starts(starts, shutdown.clone()),
            )),
            Err(TransportError::Unsupported(_)) => None,
            Err(e) => return Err(e.into()),
        };
        self.running.send_replace(true);
        let timers = tokio::spawn(self.clone().timer_loop(shutdown.clone()));
        let relay = tokio::spawn(self.clone().relay_loop(shutdown.clone()));
        let retention = tokio::spawn(self.clone().retention_loop(shutdown.clone()));
        let listener = tokio::spawn(self.clone().listen_loop(shutdown.clone()));
        let gauges = tokio::spawn(self.clone().gauge_loop(shutdown.clone()));
        let definitions = tokio::spawn(self.clone().definitions_loop(shutdown.clone()));
        let breakers = tokio::spawn(self.clone().breaker_loop(shutdown.clone()));
        shutdown.cancelled().await;
        self.stopping.cancel();
        self.running.send_replace(false);
        for task in starts.into_iter().chain([
            consumer,
            timers,
            relay,
            retention,
            listener,
            gauges,
            definitions,
            breakers,
        ]) {
            let _ = task.await;
        }
        self.flush_outbox_deletes().await;
        Ok(())
    }
}
