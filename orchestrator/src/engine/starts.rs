//! Starting instances: the options of a start, and the batcher that stores concurrent starts
//! with one statement.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{Semaphore, mpsc, oneshot};

use sagas_participant::linger::Linger;

use super::publish::Publisher;
use super::{Engine, EngineError};
use crate::clock::Clock;
use crate::machine::{self, Instance, Time, Transition};
use crate::store::{Created, Idempotency, NewInstance, SagaStore, StoreError};

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
    /// The definition's version to start; `None`: its newest.
    pub version: Option<u32>,
}

/// What [`Engine::start_with`] did: the engine's answer to a start, which the API renders as
/// [`crate::api::sagas::Started`].
#[derive(Debug, Clone)]
pub struct Started {
    /// The instance (just started, or the one the idempotency key already named).
    pub instance: Instance,
    /// False when the idempotency key named an existing instance.
    pub created: bool,
    /// When it was stored.
    pub created_at: Time,
}

/// Starts are stored in batches of at most this many (one statement, one transaction)...
pub const START_BATCH: usize = 64;
/// ...with at most this many batches being stored at once.
///
/// One, as the reply consumer has: while a batch commits, the starts that arrive gather for
/// the next one, so batches grow with the load and a lone start still goes at once. With two,
/// a second batch began while the first committed, and more starts committed in small batches
/// (user path, alternated: with one, 696–708 against 612–646 `happy` sagas/s at C = 64, 0.39
/// against 0.49 orchestrator transactions per saga; the same latency at C = 1).
pub const START_SLOTS: usize = 1;

/// A start decided by [`Engine::prepare_start`], to be stored by [`Engine::commit_start`].
pub(super) struct Prepared<'a> {
    definition: &'a str,
    start: Transition,
    now: Time,
    idempotency: Option<Idempotency>,
}

impl Prepared<'_> {
    /// The new instance's id.
    pub fn id(&self) -> uuid::Uuid {
        self.start.instance.id
    }
}

/// What the batcher answers a start: the start, the time its batch was stored, and the
/// batch's result for it.
type CreationResult<R = Result<Created, StoreError>> = (Transition, Time, R);

/// A start waiting to be stored, and where to send the result.
pub(super) struct Creation {
    start: Transition,
    /// The client's idempotency key, if it gave one.
    idempotency: Option<Idempotency>,
    done: oneshot::Sender<CreationResult>,
}

impl Creation {
    /// The definition and idempotency key of a keyed start (keyless ones sort first).
    fn key(&self) -> Option<(&str, &str)> {
        let key = self.idempotency.as_ref()?;
        Some((&self.start.instance.plan.name, &key.key))
    }
}

/// The batcher of starts, spawned on the current Tokio runtime (none outside one: then each
/// start is stored alone).
pub(super) fn batcher(
    store: Arc<dyn SagaStore>,
    clock: Arc<dyn Clock>,
    publisher: Publisher,
    linger: Duration,
) -> Option<mpsc::UnboundedSender<Creation>> {
    tokio::runtime::Handle::try_current().ok().map(|runtime| {
        let (tx, rx) = mpsc::unbounded_channel();
        runtime.spawn(create_loop(store, clock, publisher, linger, rx));
        tx
    })
}

/// Stores starts in batches: when one of [`START_SLOTS`] is free it takes the starts that are
/// waiting (at most [`START_BATCH`]; after a batch of several, also those that come within
/// the `linger`, [`Linger`]) and stores them with one [`SagaStore::create_batch`], those with
/// an idempotency key too. A lone start is stored at once; under load many share a commit.
/// If the batch fails as a whole, each start is tried alone, so that each gets its own error.
///
/// The keyed starts of a batch are stored in the order of their keys, so that two batches
/// holding the same two keys (a client retrying two requests at once) take their unique-index
/// entries in one order and do not deadlock.
///
/// The commands of the stored starts are then published together (one publish: a
/// participant's first commands can share a message) before each caller is answered, with
/// an empty outbox for it to publish.
async fn create_loop(
    store: Arc<dyn SagaStore>,
    clock: Arc<dyn Clock>,
    publisher: Publisher,
    linger: Duration,
    mut rx: mpsc::UnboundedReceiver<Creation>,
) {
    let slots = Arc::new(Semaphore::new(START_SLOTS));
    let mut linger = Linger::new(linger);
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let Some(first) = rx.recv().await else {
            break;
        };
        let mut batch = vec![first];
        linger.fill(&mut batch, START_BATCH, &mut rx).await;
        let (store, now, publisher) = (store.clone(), clock.now(), publisher.clone());
        tokio::spawn(async move {
            batch.sort_by(|a, b| a.key().cmp(&b.key()));
            let (starts, senders): (Vec<_>, Vec<_>) = batch
                .into_iter()
                .map(|c| ((c.start, c.idempotency), c.done))
                .unzip();
            let new: Vec<NewInstance<'_>> = starts.iter().map(|(t, i)| (t, i.as_ref())).collect();
            let results = match store.create_batch(&new, now).await {
                Ok(results) => results,
                Err(e) => {
                    tracing::debug!(error = %e, starts = new.len(), "batched starts failed; storing them one by one");
                    let mut results = Vec::with_capacity(new.len());
                    for one in &new {
                        let alone = store.create_batch(std::slice::from_ref(one), now).await;
                        results.push(alone.and_then(|mut r| {
                            r.pop()
                                .unwrap_or(Err(StoreError::Exists(one.0.instance.id)))
                        }));
                    }
                    results
                }
            };
            drop(new);
            // The slots bound the store transactions; the next batch may commit while this
            // one publishes.
            drop(slot);
            let mut outbox = Vec::new();
            let results: Vec<Result<Created, StoreError>> = results
                .into_iter()
                .map(|result| {
                    result.map(|created| match created {
                        Created::New(rows) => {
                            outbox.extend(rows);
                            Created::New(Vec::new())
                        }
                        existing => existing,
                    })
                })
                .collect();
            publisher.publish(outbox).await;
            for (((start, _), done), result) in starts.into_iter().zip(senders).zip(results) {
                let _ = done.send((start, now, result));
            }
        });
    }
}

impl Engine {
    /// Starts an instance of the newest version of `definition`: [`Engine::start_with`]
    /// without options, answering the instance.
    pub async fn start(&self, definition: &str, input: Value) -> Result<Instance, EngineError> {
        Ok(self
            .start_with(definition, input, StartOptions::default())
            .await?
            .instance)
    }

    /// Checks that a start from outside (HTTP or AMQP) names a definition, loading it first
    /// if another process registered it: [`EngineError::UnknownDefinition`] otherwise (with
    /// `version`, that version of it).
    pub async fn require_definition(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<(), EngineError> {
        if self.find_definition(name, version).await?.is_some() {
            return Ok(());
        }
        Err(EngineError::UnknownDefinition(match version {
            None => name.to_owned(),
            Some(v) => format!("{name} v{v}"),
        }))
    }

    /// Starts an instance of `definition` (the version `options` names, or its newest) with
    /// `options` (or, when the
    /// idempotency key names one started before, answers that one).
    pub async fn start_with(
        &self,
        definition: &str,
        input: Value,
        options: StartOptions,
    ) -> Result<Started, EngineError> {
        let prepared = self.prepare_start(definition, input, options)?;
        self.commit_start(prepared).await
    }

    /// The first transition of a start, with its new id, decided but not stored.
    pub(super) fn prepare_start<'a>(
        &self,
        definition: &'a str,
        input: Value,
        options: StartOptions,
    ) -> Result<Prepared<'a>, EngineError> {
        let def = self
            .registry
            .find(definition, options.version)
            .ok_or_else(|| match options.version {
                None => EngineError::UnknownDefinition(definition.to_owned()),
                Some(v) => EngineError::UnknownDefinition(format!("{definition} v{v}")),
            })?;
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
        let id = self.clock.new_id();
        let idempotency = options.idempotency_key.map(|key| {
            let mut request = serde_json::json!({
                "input": input,
                "deadline_ms": options.deadline.map(|d| d.as_millis() as u64),
            });
            // Only when named: requests stored before versions could be named stay the same.
            if let Some(version) = options.version {
                request["version"] = version.into();
            }
            Idempotency { key, request }
        });
        let logged = machine::StartOptions {
            deadline,
            traceparent: options.traceparent,
        };
        let plan = (**def.plan()).clone();
        let start = machine::start_with(id, plan, input, logged, now, &def, &*self.breakers);
        Ok(Prepared {
            definition,
            start,
            now,
            idempotency,
        })
    }

    /// Stores a prepared start and publishes its commands (or, when its idempotency key names
    /// an instance started before, answers that one).
    pub(super) async fn commit_start(
        &self,
        prepared: Prepared<'_>,
    ) -> Result<Started, EngineError> {
        let Prepared {
            definition,
            start: t,
            now,
            idempotency,
        } = prepared;
        let id = t.instance.id;
        let key = idempotency.as_ref().map(|i| i.key.clone());
        let (t, created_at, outbox) = match self.create(t, now, idempotency).await? {
            (t, created_at, Created::New(outbox)) => (t, created_at, outbox),
            (
                _,
                _,
                Created::Existing {
                    id,
                    same_request: true,
                },
            ) => {
                let stored = self.store.get(id).await?.ok_or(EngineError::NotFound(id))?;
                return Ok(Started {
                    instance: stored.instance,
                    created: false,
                    created_at: stored.created_at,
                });
            }
            (_, _, Created::Existing { id, .. }) => {
                return Err(EngineError::Conflict(format!(
                    "idempotency key {:?} was used for another request (transaction {id})",
                    key.unwrap_or_default()
                )));
            }
        };
        self.stats.count_start(definition);
        self.committed(&t, created_at);
        tracing::debug!(%id, definition, "started");
        self.publish(outbox).await;
        Ok(Started {
            instance: t.instance,
            created: true,
            created_at,
        })
    }

    /// Stores a start (with the client's idempotency key, if any) through the batcher, or
    /// alone without one, answering the time stored as its `created_at`.
    async fn create(
        &self,
        start: Transition,
        now: Time,
        idempotency: Option<Idempotency>,
    ) -> Result<CreationResult<Created>, StoreError> {
        let (start, idempotency) = match &self.creator {
            Some(creator) => {
                let (done, result) = oneshot::channel();
                let creation = Creation {
                    start,
                    idempotency,
                    done,
                };
                match creator.send(creation) {
                    Ok(()) => {
                        let (start, stored_at, created) = result
                            .await
                            // The batcher is gone (the runtime is shutting down): whether the
                            // start was stored is unknown, as after a lost connection.
                            .map_err(|_| StoreError::Database(sqlx::Error::WorkerCrashed))?;
                        return Ok((start, stored_at, created?));
                    }
                    Err(mpsc::error::SendError(creation)) => (creation.start, creation.idempotency),
                }
            }
            None => (start, idempotency),
        };
        let created = match &idempotency {
            Some(idempotency) => {
                self.store
                    .create_idempotent(&start, now, idempotency)
                    .await?
            }
            None => Created::New(self.store.create(&start, now).await?),
        };
        Ok((start, now, created))
    }
}
