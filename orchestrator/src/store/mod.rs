//! Durable storage of instances: the event log, the projection, the outbox and the timers.
//!
//! One call of [`SagaStore::create`] or [`SagaStore::update`] is one database transaction that
//! appends the transition's events, updates the projection, writes the outgoing commands to the
//! outbox and sets or cancels timers, so a crash leaves either all of it or none.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::Duration;
use serde::Serialize;
use uuid::Uuid;

use crate::breaker::{BreakerPolicy, BreakerState, Outcomes, Synced};
use crate::definition::Plan;
use crate::machine::{Event, Instance, Rejected, Status, Time, Timer, Transition};
use sagas_participant::protocol::Command;

pub mod memory;
mod outbox_deletes;
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;
pub(crate) mod write_set;

pub use memory::MemoryStore;
pub use outbox_deletes::{CARRIED_PER_WRITE, Carried, OutboxDeletes};
pub use postgres::{LISTENER_NAME, PgStore, SETTLED_CHANNEL, StateCacheStats};
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;

/// A client's idempotency key for a start request, with the request it came with.
#[derive(Debug, Clone, PartialEq)]
pub struct Idempotency {
    /// The key, unique per definition.
    pub key: String,
    /// What identifies the request (input and options): a retry must send the same.
    pub request: serde_json::Value,
}

/// A start to store: the transition that starts the instance, with the client's idempotency
/// key when it gave one ([`SagaStore::create_batch`]).
pub type NewInstance<'a> = (&'a Transition, Option<&'a Idempotency>);

/// The result of [`SagaStore::create_idempotent`] (and of each start of
/// [`SagaStore::create_batch`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Created {
    /// The instance was stored; publish these outbox rows.
    New(Vec<OutboxMessage>),
    /// An instance with the same key exists already (nothing was stored).
    Existing {
        /// Its id.
        id: Uuid,
        /// Whether it was started with the same request.
        same_request: bool,
    },
}

impl Created {
    /// The outbox rows of a new instance; an existing one is [`StoreError::Exists`].
    pub fn into_new(self) -> Result<Vec<OutboxMessage>, StoreError> {
        match self {
            Created::New(outbox) => Ok(outbox),
            Created::Existing { id, .. } => Err(StoreError::Exists(id)),
        }
    }
}

/// A command waiting in the outbox to be published.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMessage {
    /// Outbox row id.
    pub id: i64,
    /// Destination participant (routing key).
    pub participant: String,
    /// The command.
    pub command: Command,
}

/// One event of an instance's log with its sequence number and time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoggedEvent {
    /// Position in the instance's log, from 1.
    pub seq: i64,
    /// When it was appended (serialized as `logged_at`: a `retry_scheduled` event has an `at`
    /// of its own, the time of the next attempt).
    #[serde(rename = "logged_at")]
    pub at: Time,
    /// The event.
    #[serde(flatten)]
    pub event: Event,
}

/// An instance's projection with its timestamps.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredInstance {
    /// The state.
    pub instance: Instance,
    /// When it started.
    pub created_at: Time,
    /// When it last changed.
    pub updated_at: Time,
}

/// Where an instance sits in the newest-first order of [`SagaStore::list`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// When the instance started.
    pub created_at: Time,
    /// Its id (breaks ties between instances started in the same microsecond).
    pub id: Uuid,
}

impl Position {
    /// The position of a stored instance.
    pub fn of(stored: &StoredInstance) -> Position {
        Position {
            created_at: stored.created_at,
            id: stored.instance.id,
        }
    }
}

/// Which instances [`SagaStore::list`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListFilter {
    /// Only instances with this status.
    pub status: Option<Status>,
    /// Only instances of this definition (any version).
    pub definition: Option<String>,
    /// Only instances strictly after this position (older, or as old with a smaller id).
    pub after: Option<Position>,
    /// Only instances created at or after this time.
    pub created_after: Option<Time>,
    /// Only instances created before this time.
    pub created_before: Option<Time>,
    /// Only the instance started with this idempotency key (one per definition).
    pub idempotency_key: Option<String>,
    /// At most this many.
    pub limit: u32,
}

/// The result of [`SagaStore::update`].
#[derive(Debug, Clone, PartialEq)]
pub struct Updated {
    /// The committed transition.
    pub transition: Transition,
    /// The outbox rows it wrote, to publish now.
    pub outbox: Vec<OutboxMessage>,
}

/// Decides a transition from the current state, inside the store's transaction. A pure
/// function of the state: a store may call it more than once (the PostgreSQL store decides
/// on the state it last committed and, if that turns out stale, again on the stored one), and
/// commits only the transition of its last call.
pub type Decide<'a> = Box<dyn Fn(&Instance) -> Result<Transition, StoreError> + Send + Sync + 'a>;

/// Errors of a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No instance with that id.
    #[error("instance {0} not found")]
    NotFound(Uuid),
    /// An instance with that id exists already.
    #[error("instance {0} exists already")]
    Exists(Uuid),
    /// The decision refused the input (an operator action that does not fit).
    #[error(transparent)]
    Rejected(#[from] Rejected),
    /// The instance needs its definition's code, which this process does not have.
    #[error("{0}")]
    MissingDefinition(String),
    /// Stored data could not be decoded.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// The database failed; retryable.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The transaction that carried this input failed, after others of its batch committed
    /// in their own: nothing of this one was (it may be tried again).
    #[error("not committed: {0}")]
    Uncommitted(String),
    /// Writing what a prune deletes failed: nothing was deleted.
    #[error("export failed: {0}")]
    Export(String),
}

/// What one [`SagaStore::prune`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pruned {
    /// Another process is pruning now: this one deleted nothing and may try later.
    Busy,
    /// This many instances were deleted (fewer than the limit: none more was due).
    Deleted(u64),
}

/// What the store holds now that an operator watches: open instances, the outbox, due timers
/// ([`SagaStore::gauges`]; the engine exports it as gauges).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Gauges {
    /// Open (not terminal) instances by status; a status without any is left out.
    pub open: Vec<(Status, u64)>,
    /// When the oldest open instance was created.
    pub oldest_open: Option<Time>,
    /// Outbox rows: commands committed but not yet confirmed by the broker.
    pub outbox_rows: u64,
    /// When the oldest outbox row was written.
    pub oldest_outbox: Option<Time>,
    /// Timers due (at or before the time asked about), not claimed.
    pub timers_due: u64,
    /// When the most overdue of them was due.
    pub oldest_due_timer: Option<Time>,
}

impl Gauges {
    /// Open instances with `status`.
    pub fn open(&self, status: Status) -> u64 {
        self.open
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, n)| *n)
    }

    /// [`Gauges::open`] from a SQL store's rows: status names with their counts.
    fn open_by_name(
        rows: impl IntoIterator<Item = (String, i64)>,
    ) -> Result<Vec<(Status, u64)>, StoreError> {
        rows.into_iter()
            .map(|(name, n)| {
                let status = Status::parse(&name)
                    .ok_or_else(|| StoreError::Corrupt(format!("unknown status {name}")))?;
                Ok((status, u64::try_from(n).unwrap_or(0)))
            })
            .collect()
    }
}

/// What the store still holds for one instance that may act on it ([`SagaStore::in_flight`]):
/// commands not yet confirmed by the broker and timers not yet fired.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pending {
    /// Outbox rows of the instance: commands committed but not yet published.
    pub outbox_rows: u64,
    /// The instance's timers, earliest first.
    pub timers: Vec<PendingTimer>,
}

/// A timer of an instance, with when it comes due (or, while a process holds it, when its
/// lease ends).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct PendingTimer {
    /// When it comes due.
    pub due_at: Time,
    /// The timer.
    pub timer: Timer,
}

/// One stuck step of a stuck instance ([`SagaStore::stuck_steps`]).
#[derive(Debug, Clone, PartialEq)]
pub struct StuckStep {
    /// The instance.
    pub id: Uuid,
    /// Its definition.
    pub definition: String,
    /// The step's name.
    pub step: String,
    /// The step's participant.
    pub participant: String,
    /// Why it is stuck (the step's last error).
    pub last_error: Option<String>,
    /// When the instance last changed.
    pub updated_at: Time,
}

impl StuckStep {
    /// The stuck steps of a stored instance (none unless it is stuck), in plan order.
    pub fn of(stored: &StoredInstance) -> Vec<StuckStep> {
        let instance = &stored.instance;
        if instance.status != Status::Stuck {
            return Vec::new();
        }
        (instance.plan.steps.iter().zip(&instance.steps))
            .filter(|(_, s)| s.stuck)
            .map(|(plan, s)| StuckStep {
                id: instance.id,
                definition: instance.plan.name.clone(),
                step: plan.name.clone(),
                participant: plan.participant.clone(),
                last_error: s.last_error.clone(),
                updated_at: stored.updated_at,
            })
            .collect()
    }
}

/// Instances minute by minute since a time, how long the finished ones took, and the oldest
/// open ones ([`SagaStore::activity`]; the console's overview).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Activity {
    /// The minutes in which something happened, oldest first.
    pub minutes: Vec<Minute>,
    /// How long the instances that finished since then took, if any did.
    pub latency: Option<Latency>,
    /// The oldest open (running, compensating or stuck) instances, oldest first.
    pub oldest_open: Vec<StoredInstance>,
}

/// What happened in one minute ([`Activity::minutes`]): instances are counted by their
/// creation (`started`) or by their last change, for the status they have now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Minute {
    /// The minute's start.
    pub at: Time,
    /// Instances created.
    pub started: u64,
    /// Instances that ended `completed` or `resolved`.
    pub finished: u64,
    /// Instances that ended `compensated`.
    pub compensated: u64,
    /// Instances that became `stuck` and still are.
    pub stuck: u64,
}

impl Minute {
    /// Minutes from a SQL store's rows: the minute (since 1970), `started` or a status name,
    /// and a count; statuses that are not counted are left out.
    fn fold(rows: impl IntoIterator<Item = (i64, String, i64)>) -> Result<Vec<Minute>, StoreError> {
        let mut minutes: Vec<Minute> = Vec::new();
        for (minute, kind, n) in rows {
            let at = Time::from_timestamp(minute.saturating_mul(60), 0)
                .ok_or_else(|| StoreError::Corrupt(format!("minute {minute} out of range")))?;
            let n = u64::try_from(n).unwrap_or(0);
            let i = match minutes.binary_search_by_key(&at, |m| m.at) {
                Ok(i) => i,
                Err(i) => {
                    minutes.insert(i, Minute::empty(at));
                    i
                }
            };
            let m = &mut minutes[i];
            match kind.as_str() {
                "started" => m.started += n,
                "completed" | "resolved" => m.finished += n,
                "compensated" => m.compensated += n,
                "stuck" => m.stuck += n,
                _ => {}
            }
        }
        Ok(minutes)
    }

    fn empty(at: Time) -> Minute {
        Minute {
            at,
            started: 0,
            finished: 0,
            compensated: 0,
            stuck: 0,
        }
    }
}

/// Percentiles of the time from creation to the last change of finished instances, by nearest
/// rank (the smallest value at or above that share of them, as PostgreSQL's
/// `percentile_disc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latency {
    /// How many instances finished.
    pub count: u64,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
}

impl Latency {
    /// The percentiles of these durations; `None` without any.
    pub fn of(mut durations: Vec<Duration>) -> Option<Latency> {
        durations.sort();
        let rank = |percent: usize| durations[(durations.len() * percent).div_ceil(100) - 1];
        (!durations.is_empty()).then(|| Latency {
            count: durations.len() as u64,
            p50: rank(50),
            p90: rank(90),
            p99: rank(99),
        })
    }

    /// From a SQL store's row: the count and the three percentiles in microseconds.
    fn of_micros(
        count: i64,
        p50: Option<i64>,
        p90: Option<i64>,
        p99: Option<i64>,
    ) -> Option<Latency> {
        Some(Latency {
            count: u64::try_from(count).ok().filter(|n| *n > 0)?,
            p50: Duration::microseconds(p50?),
            p90: Duration::microseconds(p90?),
            p99: Duration::microseconds(p99?),
        })
    }
}

/// A definition as a store keeps it (`sagas_definitions`): the plan registered under its name
/// and version, and the document when it was registered as one.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDefinition {
    /// The plan (its name and version are the row's).
    pub plan: Plan,
    /// The document, as JSON; `None` for a definition in code.
    pub document: Option<serde_json::Value>,
}

/// What [`SagaStore::register_definition`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// The definition stored under the name and version now.
    pub stored: StoredDefinition,
    /// Whether this call stored it (`false`: it was stored before).
    pub inserted: bool,
}

/// How many open instances [`SagaStore::activity`] returns, oldest first.
pub const OLDEST_OPEN: u32 = 10;

/// Durable storage of instances.
#[async_trait]
pub trait SagaStore: Send + Sync + 'static {
    /// Stores a new instance with the transition that started it.
    async fn create(&self, start: &Transition, now: Time)
    -> Result<Vec<OutboxMessage>, StoreError>;

    /// Like [`SagaStore::create`], unless an instance of the same definition was started with
    /// the same idempotency key: then nothing is stored and that instance is named.
    async fn create_idempotent(
        &self,
        start: &Transition,
        now: Time,
        idempotency: &Idempotency,
    ) -> Result<Created, StoreError>;

    /// Several starts in one transaction, all stamped `now`: each as
    /// [`SagaStore::create_idempotent`] stores it when it comes with a key, else as
    /// [`SagaStore::create`]. The results are in the order of `starts`; an instance that exists
    /// already, or a key that names one (also one stored earlier in the same batch), is that
    /// item's answer and the others are stored. `Err` means that nothing was stored. Stores
    /// without a cheaper way create them one by one.
    async fn create_batch(
        &self,
        starts: &[NewInstance<'_>],
        now: Time,
    ) -> Result<Vec<Result<Created, StoreError>>, StoreError> {
        let mut results = Vec::with_capacity(starts.len());
        for &(start, idempotency) in starts {
            results.push(match idempotency {
                Some(idempotency) => self.create_idempotent(start, now, idempotency).await,
                None => self.create(start, now).await.map(Created::New),
            });
        }
        Ok(results)
    }

    /// Locks the instance, deletes `fired` if it is still the timer stored under its key, lets
    /// `decide` compute the transition from the current state, and commits it.
    async fn update(
        &self,
        id: Uuid,
        fired: Option<Timer>,
        now: Time,
        decide: Decide<'_>,
    ) -> Result<Updated, StoreError>;

    /// Several inputs in one transaction: like [`SagaStore::update`] (without a fired timer)
    /// for each `(id, decide)` in order, each decision seeing the state the previous ones left.
    /// The results are in the order of `items`; an item's error (an unknown instance, a
    /// refused decision) writes nothing for it and leaves the others to commit. `Err` means
    /// that nothing was committed. Stores without a cheaper way run the items one by one.
    async fn update_batch(
        &self,
        now: Time,
        items: Vec<(Uuid, Decide<'_>)>,
    ) -> Result<Vec<Result<Updated, StoreError>>, StoreError> {
        let mut results = Vec::with_capacity(items.len());
        for (id, decide) in items {
            results.push(self.update(id, None, now, decide).await);
        }
        Ok(results)
    }

    /// The instance's current projection.
    async fn get(&self, id: Uuid) -> Result<Option<StoredInstance>, StoreError>;

    /// The instance's log, in order.
    async fn events(&self, id: Uuid) -> Result<Vec<LoggedEvent>, StoreError>;

    /// Instances matching `filter`, newest first by `(created_at, id)`. Paging continues from
    /// the last one's [`Position`] (a keyset, so instances started meanwhile never shift pages).
    async fn list(&self, filter: &ListFilter) -> Result<Vec<StoredInstance>, StoreError>;

    /// Answers if the database does.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Claims up to `limit` timers due at `now`: they are leased for `lease` (so another
    /// process takes them over if this one dies) and returned.
    async fn claim_due_timers(
        &self,
        now: Time,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<(Uuid, Timer)>, StoreError>;

    /// Claims up to `limit` outbox rows available at `now`, leasing them for `lease`.
    async fn claim_outbox(
        &self,
        now: Time,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<OutboxMessage>, StoreError>;

    /// Deletes published outbox rows.
    async fn delete_outbox(&self, ids: &[i64]) -> Result<(), StoreError>;

    /// Where this store's writes (creations and updates) pick up ids of published outbox rows
    /// to delete in their own statements, so that the deletes need no transaction of their
    /// own; `None` (the default) for a store whose writes do not: then the outbox deleter
    /// deletes every row with [`SagaStore::delete_outbox`].
    fn outbox_deletes(&self) -> Option<&OutboxDeletes> {
        None
    }

    /// Deletes, in one transaction, up to `limit` instances that finished (completed,
    /// compensated or resolved) before `finished_before`, oldest first, with their events,
    /// timers and outbox rows. One process prunes at a time: the others get [`Pruned::Busy`].
    async fn prune(&self, finished_before: Time, limit: u32) -> Result<Pruned, StoreError>;

    /// Open instances by status, the outbox and the timers due at `now`, read in one go (one
    /// round trip where the database allows) for the engine's gauges.
    async fn gauges(&self, now: Time) -> Result<Gauges, StoreError>;

    /// The instance's outbox rows and timers, read in one query: what may still send a
    /// command or move the instance on without new input.
    async fn in_flight(&self, id: Uuid) -> Result<Pending, StoreError>;

    /// Every stuck step of every stuck instance, read in one query, oldest change first.
    async fn stuck_steps(&self) -> Result<Vec<StuckStep>, StoreError>;
    /// Instances started, finished, compensated and stuck minute by minute since `since`, the
    /// latency percentiles of those that finished since then, and the [`OLDEST_OPEN`] oldest
    /// open instances.
    async fn activity(&self, since: Time) -> Result<Activity, StoreError>;

    /// Stores `definition` unless a definition of its name and version is stored already, and
    /// returns the one stored under them now: `definition` itself, or the earlier one (never
    /// replaced: the caller compares), and whether this call stored it (of two processes
    /// registering the same definition at once, one).
    async fn register_definition(
        &self,
        definition: &StoredDefinition,
    ) -> Result<Registration, StoreError>;

    /// The stored definitions (of the definition `name` only, if given), by name then version.
    async fn definitions(&self, name: Option<&str>) -> Result<Vec<StoredDefinition>, StoreError>;

    /// The newest version of the definition `name` stored as a document, if any (one cheap
    /// look before a start, so that a version another process registered is started at once).
    async fn newest_document_version(&self, name: &str) -> Result<Option<u32>, StoreError>;

    /// How many definitions are stored as documents: rows are never updated nor deleted, so
    /// a count that has not changed means no document was registered since (a cheap look
    /// before reading them all).
    async fn document_count(&self) -> Result<u64, StoreError>;

    /// Adds the attempt outcomes one process counted to the participants' breakers and
    /// advances every breaker at `now` by `policy` ([`crate::breaker::sync`]), in one
    /// transaction that holds the breakers' locks: of several processes, one makes each change
    /// (its result says so) and the others see it. Every breaker, in participant order.
    async fn sync_breakers(
        &self,
        now: Time,
        outcomes: &[Outcomes],
        policy: &BreakerPolicy,
    ) -> Result<Vec<Synced>, StoreError>;

    /// Word of settled instances between the processes that share this store; `None` (the
    /// default) for a store that one process uses alone.
    fn settlements(&self) -> Option<Arc<dyn Settlements>> {
        None
    }
}

/// The breakers [`crate::breaker::sync`] changed in `states` since `before`: what a store
/// writes back.
fn changed_breakers<'a>(
    before: &std::collections::BTreeMap<String, BreakerState>,
    synced: &'a [Synced],
) -> impl Iterator<Item = &'a Synced> {
    synced
        .iter()
        .filter(|s| before.get(&s.participant) != Some(&s.state))
}

/// Word between the processes that share a store of the instances that settled (became
/// terminal or stuck), so that a request waiting in one process is woken by a transition
/// committed in another. Best effort: an announcement may be lost, and a wait still reads its
/// instance again now and then.
#[async_trait]
pub trait Settlements: Send + Sync + 'static {
    /// Tells every process listening (this one too) that these instances settled; called once
    /// their transitions committed.
    async fn announce(&self, ids: &[Uuid]) -> Result<(), StoreError>;

    /// A connection of its own that hears every announcement from now on.
    async fn listen(&self) -> Result<Box<dyn Announcements>, StoreError>;

    /// Whether a process other than this one listens now; announcements are for them alone.
    async fn others_listening(&self) -> Result<bool, StoreError>;
}

/// What one listening connection hears ([`Settlements::listen`]).
#[async_trait]
pub trait Announcements: Send {
    /// The instances of the next announcement; an error once the connection is lost (what is
    /// announced until another one listens is not heard).
    async fn next(&mut self) -> Result<Vec<Uuid>, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_percentiles_are_the_nearest_ranks_and_nothing_without_instances() {
        assert_eq!(Latency::of(Vec::new()), None);
        let ms = |n: i64| Duration::milliseconds(n);
        let one = Latency::of(vec![ms(7)]).unwrap();
        assert_eq!(
            (one.count, one.p50, one.p90, one.p99),
            (1, ms(7), ms(7), ms(7))
        );
        let hundred = Latency::of((1..=100).rev().map(ms).collect()).unwrap();
        assert_eq!(
            (hundred.count, hundred.p50, hundred.p90, hundred.p99),
            (100, ms(50), ms(90), ms(99))
        );
        let three = Latency::of(vec![ms(3), ms(1), ms(2)]).unwrap();
        assert_eq!((three.p50, three.p90, three.p99), (ms(2), ms(3), ms(3)));
    }

    #[test]
    fn minutes_fold_rows_by_minute_in_order_and_skip_statuses_not_counted() {
        let rows = [
            (29_000_001, "completed".to_owned(), 2),
            (29_000_000, "started".to_owned(), 3),
            (29_000_001, "resolved".to_owned(), 1),
            (29_000_001, "stuck".to_owned(), 1),
            (29_000_000, "compensated".to_owned(), 4),
            (29_000_000, "running".to_owned(), 9),
        ];
        let minutes = Minute::fold(rows).unwrap();
        assert_eq!(minutes.len(), 2);
        assert_eq!(minutes[0].at.timestamp(), 29_000_000 * 60);
        assert_eq!(
            (
                minutes[0].started,
                minutes[0].finished,
                minutes[0].compensated,
                minutes[0].stuck
            ),
            (3, 0, 4, 0)
        );
        assert_eq!(
            (
                minutes[1].started,
                minutes[1].finished,
                minutes[1].compensated,
                minutes[1].stuck
            ),
            (0, 3, 0, 1)
        );
    }
}
