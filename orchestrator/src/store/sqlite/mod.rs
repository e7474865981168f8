//! The SQLite store: the embedded default, one file, no server.
//!
//! Same tables and the same semantics as the PostgreSQL store (`migrations/sqlite`): one
//! database transaction per transition, the outbox with its grace period and leases, durable
//! timers with leases. What differs is how writers are kept apart. SQLite has one writer at a
//! time per file and no `FOR UPDATE SKIP LOCKED`, so:
//!
//! - every write goes through a pool of **one** connection, so writes of this process queue in
//!   the pool (in order, without polling) rather than on the file lock;
//! - every write transaction starts with `BEGIN IMMEDIATE`, which takes the file's write lock
//!   at once. A deferred transaction that reads and then writes cannot wait for the lock (SQLite
//!   answers `SQLITE_BUSY` at once to avoid a deadlock); an immediate one waits up to the busy
//!   timeout. This also keeps a second process on the same file (a `sagactl`, a second
//!   quickstart) correct, if slow;
//! - a claim of due timers or outbox rows is one such transaction: claimers are serialized, so
//!   the rows one claimer leases are invisible to the next as `SKIP LOCKED` makes them in
//!   PostgreSQL.
//!
//! Reads (`get`, `events`, `list`, `ping`) use a separate pool: in WAL mode they see the last
//! committed state and neither block nor are blocked by the writer.
//!
//! Durability: WAL journal with `synchronous = FULL`, so a transition is on disk when its commit
//! returns (NORMAL would be faster but could lose the last commits on power loss; the engine
//! acknowledges replies after commit and relies on them staying committed).
//!
//! Throughput is one writer's: thousands of small transactions per second at most, which is
//! plenty for the embedded use (the quickstart, tests, a single-node tool). Production uses
//! [`PgStore`](super::PgStore).

use std::path::Path;
use std::time::Duration as StdDuration;

use async_trait::async_trait;
use chrono::{DateTime, Duration};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use uuid::Uuid;

use crate::machine::{Instance, Time, Timer, Transition};
use crate::store::write_set::WriteSet;
use crate::store::{
    Activity, Created, Decide, Gauges, Idempotency, Latency, ListFilter, LoggedEvent, Minute,
    OLDEST_OPEN, OutboxMessage, Pending, PendingTimer, Pruned, Registration, SagaStore, StoreError,
    StoredDefinition, StoredInstance, StuckStep, Updated,
};
use sagas_participant::protocol::Command;

/// The SQLite store's migrations (`migrations/sqlite` in this crate).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

mod sql;

/// How long the writer of an outbox row has to publish it before the relay may (as in
/// PostgreSQL).
const OUTBOX_GRACE_MS: i64 = 5_000;

/// How long a write waits for another process's write lock on the file.
const BUSY_TIMEOUT: StdDuration = StdDuration::from_secs(10);

/// Connections of the read pool.
const READERS: u32 = 4;

/// A [`SagaStore`] in one SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
}

impl SqliteStore {
    async fn insert(
        &self,
        start: &Transition,
        now: Time,
        idempotency: Option<&Idempotency>,
    ) -> Result<Created, StoreError> {
        let inst = &start.instance;
        let id = inst.id.to_string();
        let mut tx = self.begin_write().await?;
        let request = match idempotency {
            Some(i) => Some(to_json("idempotent request", &i.request)?),
            None => None,
        };
        let inserted = sqlx::query(sql::INSERT_INSTANCE)
            .bind(&id)
            .bind(&inst.plan.name)
            .bind(i64::from(inst.plan.version))
            .bind(inst.plan.mode.as_str())
            .bind(inst.status.as_str())
            .bind(inst.seq as i64)
            .bind(to_json("instance state", inst)?)
            .bind(&inst.failure)
            .bind(micros(now))
            .bind(micros(now))
            .bind(idempotency.map(|i| &i.key))
            .bind(&request)
            .execute(&mut *tx)
            .await?;
        if inserted.rows_affected() == 0 {
            if let Some(idem) = idempotency {
                let row: Option<(String, Option<String>)> = sqlx::query_as(sql::BY_IDEMPOTENCY_KEY)
                    .bind(&inst.plan.name)
                    .bind(&idem.key)
                    .fetch_optional(&mut *tx)
                    .await?;
                if let Some((existing, stored)) = row {
                    let existing = existing.parse().map_err(|e| {
                        StoreError::Corrupt(format!("instance id {existing:?}: {e}"))
                    })?;
                    let stored: Option<serde_json::Value> =
                        stored.and_then(|s| serde_json::from_str(&s).ok());
                    return Ok(Created::Existing {
                        id: existing,
                        same_request: stored.as_ref() == Some(&idem.request),
                    });
                }
            }
            return Err(StoreError::Exists(inst.id));
        }
        let outbox = write(&mut tx, &WriteSet::of([start]), now).await?;
        tx.commit().await?;
        Ok(Created::New(outbox))
    }

    /// Opens (creating it if missing) the database file at `path` and applies the migrations.
    pub async fn open(path: impl AsRef<Path>) -> Result<SqliteStore, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true);
        SqliteStore::connect(options).await
    }

    /// Opens a database with `options` and applies the migrations. WAL, `synchronous = FULL`
    /// and a busy timeout are set on top of them: the store's guarantees depend on them.
    pub async fn connect(options: SqliteConnectOptions) -> Result<SqliteStore, StoreError> {
        let options = options
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            // Writes wait here for the one connection, behind the writes queued before them.
            .acquire_timeout(StdDuration::from_secs(60))
            .connect_with(options.clone())
            .await?;
        // The first connection has switched the file to WAL; readers connect on demand.
        let reader = SqlitePoolOptions::new()
            .max_connections(READERS)
            .connect_lazy_with(options);
        let store = SqliteStore { writer, reader };
        store.migrate().await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) => StoreError::Database(e),
            other => StoreError::Corrupt(format!("migrations: {other}")),
        })?;
        Ok(store)
    }

    /// Applies the migrations (`open` and `connect` do).
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        MIGRATOR.run(&self.writer).await
    }

    /// Closes both pools, waiting for the connections to finish.
    pub async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// Runs a claim (`claim`: up to `?2` rows available at `?1`, leased until `?3`) in a write
    /// transaction of its own: claimers are serialized by the write lock, as `SKIP LOCKED`
    /// keeps them apart in PostgreSQL.
    async fn claim<R>(
        &self,
        claim: &'static str,
        now: Time,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<R>, StoreError>
    where
        R: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow> + Send + Unpin,
    {
        let mut tx = self.begin_write().await?;
        let rows = sqlx::query_as(claim)
            .bind(micros(now))
            .bind(limit)
            .bind(micros(now + lease))
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(rows)
    }
}

impl SqliteStore {
    /// The stored definitions, of `name` and `version` only if given, read through `pool`.
    async fn stored_definitions(
        pool: &SqlitePool,
        name: Option<&str>,
        version: Option<u32>,
    ) -> Result<Vec<StoredDefinition>, StoreError> {
        let rows: Vec<(String, Option<String>)> = sqlx::query_as(sql::DEFINITIONS)
            .bind(name)
            .bind(version.map(i64::from))
            .fetch_all(pool)
            .await?;
        rows.into_iter()
            .map(|(plan, document)| {
                Ok(StoredDefinition {
                    plan: from_json("definition plan", &plan)?,
                    document: document
                        .map(|d| from_json("definition document", &d))
                        .transpose()?,
                })
            })
            .collect()
    }
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

/// A time as stored: microseconds since the Unix epoch.
fn micros(t: Time) -> i64 {
    t.timestamp_micros()
}

fn time(us: i64) -> Result<Time, StoreError> {
    DateTime::from_timestamp_micros(us).ok_or_else(|| corrupt("time", us))
}

fn uuid(s: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(s).map_err(|e| corrupt("uuid", e))
}

fn to_json(what: &str, value: &impl serde::Serialize) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| corrupt(what, e))
}

fn from_json<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| corrupt(what, e))
}

/// A projection row: `state`, `created_at`, `updated_at`.
type InstanceRow = (String, i64, i64);

/// A timer as [`sql::IN_FLIGHT`] lists it: its due time in microseconds.
#[derive(serde::Deserialize)]
struct TimerRow {
    due_at: i64,
    timer: Timer,
}

fn stored((state, created_at, updated_at): InstanceRow) -> Result<StoredInstance, StoreError> {
    Ok(StoredInstance {
        instance: from_json("instance state", &state)?,
        created_at: time(created_at)?,
        updated_at: time(updated_at)?,
    })
}

/// Writes `set`'s events, timers and outbox rows; the instance's row is the caller's (a new
/// one is inserted, a changed one updated).
async fn write(
    conn: &mut SqliteConnection,
    set: &WriteSet<'_>,
    now: Time,
) -> Result<Vec<OutboxMessage>, StoreError> {
    for e in &set.events {
        let body = serde_json::to_value(e.event).map_err(|e| corrupt("event", e))?;
        // The same columns PostgreSQL extracts from the body, for queries by hand.
        let field = |k: &str| body.get(k).cloned().unwrap_or_default();
        sqlx::query(sql::INSERT_EVENT)
            .bind(e.instance.to_string())
            .bind(e.seq)
            .bind(e.event.kind())
            .bind(field("step").as_i64())
            .bind(field("operation").as_str().map(str::to_owned))
            .bind(field("attempt").as_i64())
            .bind(body.to_string())
            .bind(micros(now))
            .execute(&mut *conn)
            .await?;
    }
    for t in &set.timers {
        let id = t.instance.to_string();
        match t.set {
            Some((at, timer)) => {
                sqlx::query(sql::SET_TIMER)
                    .bind(id)
                    .bind(&t.key)
                    .bind(micros(at))
                    .bind(to_json("timer", &timer)?)
                    .execute(&mut *conn)
                    .await?;
            }
            None => {
                sqlx::query(sql::DELETE_TIMER)
                    .bind(id)
                    .bind(&t.key)
                    .execute(&mut *conn)
                    .await?;
            }
        }
    }
    for (instance, timer) in &set.fired {
        let id = instance.to_string();
        // Compared as values, not as JSON text: only the timer that fired is deleted.
        let stored: Option<(String,)> = sqlx::query_as(sql::TIMER)
            .bind(&id)
            .bind(timer.key())
            .fetch_optional(&mut *conn)
            .await?;
        if let Some((text,)) = stored
            && serde_json::from_str::<Timer>(&text).is_ok_and(|t| t == *timer)
        {
            sqlx::query(sql::DELETE_TIMER)
                .bind(&id)
                .bind(timer.key())
                .execute(&mut *conn)
                .await?;
        }
    }
    let mut outbox = Vec::with_capacity(set.sends.len());
    for send in &set.sends {
        let (row_id,): (i64,) = sqlx::query_as(sql::INSERT_OUTBOX)
            .bind(send.instance.to_string())
            .bind(send.participant)
            .bind(send.command.message_id())
            .bind(to_json("command", send.command)?)
            .bind(micros(now))
            .bind(micros(now) + OUTBOX_GRACE_MS * 1_000)
            .fetch_one(&mut *conn)
            .await?;
        outbox.push(OutboxMessage {
            id: row_id,
            participant: send.participant.to_owned(),
            command: send.command.clone(),
        });
    }
    Ok(outbox)
}

#[async_trait]
impl SagaStore for SqliteStore {
    async fn create(
        &self,
        start: &Transition,
        now: Time,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        self.insert(start, now, None).await?.into_new()
    }

    async fn create_idempotent(
        &self,
        start: &Transition,
        now: Time,
        idempotency: &Idempotency,
    ) -> Result<Created, StoreError> {
        self.insert(start, now, Some(idempotency)).await
    }

    async fn update(
        &self,
        id: Uuid,
        fired: Option<Timer>,
        now: Time,
        decide: Decide<'_>,
    ) -> Result<Updated, StoreError> {
        let key = id.to_string();
        // The write lock, taken at BEGIN, is what `FOR UPDATE` is in PostgreSQL.
        let mut tx = self.begin_write().await?;
        let row: Option<(String,)> = sqlx::query_as(sql::STATE)
            .bind(&key)
            .fetch_optional(&mut *tx)
            .await?;
        let Some((state,)) = row else {
            return Err(StoreError::NotFound(id));
        };
        let current: Instance = from_json("instance state", &state)?;
        let transition = decide(&current)?;
        let mut set = WriteSet::of([&transition]);
        if let Some(timer) = fired {
            set.fired(id, timer);
        }
        if let Some(changed) = set.states.first() {
            let inst = changed.instance;
            sqlx::query(sql::UPDATE_INSTANCE)
                .bind(inst.status.as_str())
                .bind(inst.seq as i64)
                .bind(to_json("instance state", inst)?)
                .bind(&inst.failure)
                .bind(micros(now))
                .bind(&key)
                .execute(&mut *tx)
                .await?;
        }
        let outbox = write(&mut tx, &set, now).await?;
        tx.commit().await?;
        Ok(Updated { transition, outbox })
    }

    async fn get(&self, id: Uuid) -> Result<Option<StoredInstance>, StoreError> {
        let row: Option<InstanceRow> = sqlx::query_as(sql::GET)
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await?;
        row.map(stored).transpose()
    }

    async fn events(&self, id: Uuid) -> Result<Vec<LoggedEvent>, StoreError> {
        let rows: Vec<(i64, i64, String)> = sqlx::query_as(sql::EVENTS)
            .bind(id.to_string())
            .fetch_all(&self.reader)
            .await?;
        rows.into_iter()
            .map(|(seq, at, body)| {
                Ok(LoggedEvent {
                    seq,
                    at: time(at)?,
                    event: from_json("event", &body)?,
                })
            })
            .collect()
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<StoredInstance>, StoreError> {
        let (after_at, after_id) = match filter.after {
            Some(p) => (Some(micros(p.created_at)), Some(p.id.to_string())),
            None => (None, None),
        };
        // Lowercase hyphenated UUIDs sort as their bytes do, so the keyset order is PostgreSQL's.
        let rows: Vec<InstanceRow> = sqlx::query_as(sql::LIST)
            .bind(filter.status.map(|s| s.as_str()))
            .bind(filter.definition.as_deref())
            .bind(after_at)
            .bind(after_id)
            .bind(i64::from(filter.limit))
            .bind(filter.created_after.map(micros))
            .bind(filter.created_before.map(micros))
            .bind(filter.idempotency_key.as_deref())
            .fetch_all(&self.reader)
            .await?;
        rows.into_iter().map(stored).collect()
    }

    async fn activity(&self, since: Time) -> Result<Activity, StoreError> {
        let rows: Vec<(i64, String, i64)> = sqlx::query_as(sql::ACTIVITY)
            .bind(micros(since))
            .fetch_all(&self.reader)
            .await?;
        let (n, p50, p90, p99): (i64, Option<i64>, Option<i64>, Option<i64>) =
            sqlx::query_as(sql::LATENCY)
                .bind(micros(since))
                .fetch_one(&self.reader)
                .await?;
        let oldest: Vec<InstanceRow> = sqlx::query_as(sql::OLDEST_OPEN)
            .bind(i64::from(OLDEST_OPEN))
            .fetch_all(&self.reader)
            .await?;
        Ok(Activity {
            minutes: Minute::fold(rows)?,
            latency: Latency::of_micros(n, p50, p90, p99),
            oldest_open: oldest.into_iter().map(stored).collect::<Result<_, _>>()?,
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query(sql::PING).execute(&self.reader).await?;
        Ok(())
    }

    async fn claim_due_timers(
        &self,
        now: Time,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<(Uuid, Timer)>, StoreError> {
        let rows: Vec<(String, String)> = self.claim(sql::CLAIM_TIMERS, now, limit, lease).await?;
        rows.into_iter()
            .map(|(id, timer)| Ok((uuid(&id)?, from_json("timer", &timer)?)))
            .collect()
    }

    async fn claim_outbox(
        &self,
        now: Time,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        let rows: Vec<(i64, String, String)> =
            self.claim(sql::CLAIM_OUTBOX, now, limit, lease).await?;
        let mut out = rows
            .into_iter()
            .map(|(id, participant, body)| {
                Ok(OutboxMessage {
                    id,
                    participant,
                    command: from_json::<Command>("outbox body", &body)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        out.sort_by_key(|m| m.id);
        Ok(out)
    }

    async fn prune(&self, finished_before: Time, limit: u32) -> Result<Pruned, StoreError> {
        // The write lock is the prune lock: one writer at a time.
        let mut tx = self.begin_write().await?;
        let ids: Vec<(String,)> = sqlx::query_as(sql::DUE_FOR_PRUNING)
            .bind(micros(finished_before))
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
        if ids.is_empty() {
            return Ok(Pruned::Deleted(0));
        }
        let ids: Vec<String> = ids.into_iter().map(|(id,)| id).collect();
        let ids = to_json("instance ids", &ids)?;
        for statement in [sql::PRUNE_EVENTS, sql::PRUNE_TIMERS, sql::PRUNE_OUTBOX] {
            sqlx::query(statement).bind(&ids).execute(&mut *tx).await?;
        }
        let deleted = sqlx::query(sql::PRUNE_INSTANCES)
            .bind(&ids)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(Pruned::Deleted(deleted))
    }

    async fn gauges(&self, now: Time) -> Result<Gauges, StoreError> {
        let open: Vec<(String, i64, i64)> = sqlx::query_as(sql::GAUGES_OPEN)
            .fetch_all(&self.reader)
            .await?;
        let (outbox, oldest_outbox, due, oldest_due): (i64, Option<i64>, i64, Option<i64>) =
            sqlx::query_as(sql::GAUGES_QUEUES)
                .bind(micros(now))
                .fetch_one(&self.reader)
                .await?;
        let oldest_open = open.iter().map(|(_, _, created)| *created).min();
        Ok(Gauges {
            open: Gauges::open_by_name(open.into_iter().map(|(status, n, _)| (status, n)))?,
            oldest_open: oldest_open.map(time).transpose()?,
            outbox_rows: u64::try_from(outbox).unwrap_or(0),
            oldest_outbox: oldest_outbox.map(time).transpose()?,
            timers_due: u64::try_from(due).unwrap_or(0),
            oldest_due_timer: oldest_due.map(time).transpose()?,
        })
    }

    async fn in_flight(&self, id: Uuid) -> Result<Pending, StoreError> {
        let (outbox, timers): (i64, String) = sqlx::query_as(sql::IN_FLIGHT)
            .bind(id.to_string())
            .fetch_one(&self.reader)
            .await?;
        let timers = from_json::<Vec<TimerRow>>("timers", &timers)?
            .into_iter()
            .map(|r| {
                Ok(PendingTimer {
                    due_at: time(r.due_at)?,
                    timer: r.timer,
                })
            })
            .collect::<Result<_, StoreError>>()?;
        Ok(Pending {
            outbox_rows: u64::try_from(outbox).unwrap_or(0),
            timers,
        })
    }

    async fn stuck_steps(&self) -> Result<Vec<StuckStep>, StoreError> {
        let rows: Vec<InstanceRow> = sqlx::query_as(sql::STUCK).fetch_all(&self.reader).await?;
        let stuck = rows
            .into_iter()
            .map(stored)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(stuck.iter().flat_map(StuckStep::of).collect())
    }

    async fn register_definition(
        &self,
        definition: &StoredDefinition,
    ) -> Result<Registration, StoreError> {
        let plan = &definition.plan;
        let document = match &definition.document {
            Some(d) => Some(to_json("definition document", d)?),
            None => None,
        };
        let inserted = sqlx::query(sql::REGISTER_DEFINITION)
            .bind(&plan.name)
            .bind(i64::from(plan.version))
            .bind(to_json("definition plan", plan)?)
            .bind(document)
            .bind(micros(chrono::Utc::now()))
            .execute(&self.writer)
            .await?
            .rows_affected()
            == 1;
        // Read through the writer: the row is committed, and a reader could lag behind it.
        let stored =
            SqliteStore::stored_definitions(&self.writer, Some(&plan.name), Some(plan.version))
                .await?
                .pop()
                .ok_or_else(|| corrupt("definition", "not stored after its insert"))?;
        Ok(Registration { stored, inserted })
    }

    async fn definitions(&self, name: Option<&str>) -> Result<Vec<StoredDefinition>, StoreError> {
        SqliteStore::stored_definitions(&self.reader, name, None).await
    }

    async fn newest_document_version(&self, name: &str) -> Result<Option<u32>, StoreError> {
        let (newest,): (Option<i64>,) = sqlx::query_as(sql::NEWEST_DOCUMENT_VERSION)
            .bind(name)
            .fetch_one(&self.reader)
            .await?;
        Ok(newest.and_then(|v| u32::try_from(v).ok()))
    }

    async fn document_count(&self) -> Result<u64, StoreError> {
        let (count,): (i64,) = sqlx::query_as(sql::DOCUMENT_COUNT)
            .fetch_one(&self.reader)
            .await?;
        Ok(count.unsigned_abs())
    }

    async fn sync_breakers(
        &self,
        now: Time,
        outcomes: &[crate::breaker::Outcomes],
        policy: &crate::breaker::BreakerPolicy,
    ) -> Result<Vec<crate::breaker::Synced>, StoreError> {
        use crate::breaker::BreakerState;
        let corrupt = |e: serde_json::Error| StoreError::Corrupt(format!("breaker state: {e}"));
        let mut tx = self.begin_write().await?;
        let fresh = serde_json::to_string(&BreakerState::new(now)).map_err(corrupt)?;
        for o in outcomes {
            sqlx::query(sql::ADD_BREAKER)
                .bind(&o.participant)
                .bind(&fresh)
                .bind(micros(now))
                .execute(&mut *tx)
                .await?;
        }
        let rows: Vec<(String, String)> = sqlx::query_as(sql::BREAKERS).fetch_all(&mut *tx).await?;
        let before = rows
            .into_iter()
            .map(|(p, s)| Ok((p, serde_json::from_str(&s).map_err(corrupt)?)))
            .collect::<Result<std::collections::BTreeMap<String, BreakerState>, StoreError>>()?;
        let mut states = before.clone();
        let synced = crate::breaker::sync(&mut states, outcomes, now, policy);
        for s in super::changed_breakers(&before, &synced) {
            sqlx::query(sql::WRITE_BREAKER)
                .bind(&s.participant)
                .bind(serde_json::to_string(&s.state).map_err(corrupt)?)
                .bind(micros(now))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(synced)
    }

    async fn delete_outbox(&self, ids: &[i64]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        sqlx::query(sql::DELETE_OUTBOX)
            .bind(to_json("outbox ids", &ids)?)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}
