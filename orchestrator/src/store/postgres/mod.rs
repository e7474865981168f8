//! The PostgreSQL store: the write path in `write`, every statement in `sql`, plans stored
//! once in `plans`, the states of open instances this process committed in `states`, word of
//! settled instances between processes in `settlements`.

use async_trait::async_trait;
use chrono::Duration;
use std::sync::Arc;

use sqlx::Row;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::types::Json;
use uuid::Uuid;

use super::{
    Activity, Created, Decide, Gauges, Idempotency, Latency, ListFilter, LoggedEvent, Minute,
    NewInstance, OLDEST_OPEN, OutboxDeletes, OutboxMessage, Pending, PendingTimer, Pruned,
    Registration, SagaStore, Settlements, StoreError, StoredDefinition, StoredInstance, StuckStep,
    Updated,
};
use crate::breaker::{BreakerPolicy, BreakerState, Outcomes, Synced};
use crate::definition::Plan;
use crate::machine::{Event, Instance, Time, Timer, Transition};
use sagas_participant::protocol::Command;
use std::collections::BTreeMap;

mod held;
mod plans;
mod retention;
mod settlements;
mod sql;
mod states;
mod write;
pub use held::HELD;
use held::Held;
use plans::Plans;
pub use retention::{Export, PRUNE_LOCK_KEY};
use settlements::PgSettlements;
pub use settlements::{LISTENER_NAME, SETTLED_CHANNEL};
use states::States;

/// The orchestrator's migrations (`migrations/postgres` in this crate).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// A [`SagaStore`] on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// The plans this process has met (`sagas_plans`).
    plans: Arc<Plans>,
    /// The states of open instances as this process last committed them.
    states: Arc<States>,
    /// Connections held out of the pool for the start and reply batches' writes.
    held: Arc<Held>,
    /// Published outbox rows the next write deletes in its statement.
    outbox_deletes: Arc<OutboxDeletes>,
}

/// How often reply batches could skip reading their states (see [`PgStore::state_cache`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StateCacheStats {
    /// Inputs decided on a state this process had committed, written with one statement.
    pub hits: u64,
    /// Inputs whose cached state had moved on (another process or a concurrent batch wrote
    /// it): decided again on the stored state, under its lock.
    pub stale: u64,
    /// Statements on cached states that failed (nothing of them was written; their batches
    /// took the locking path).
    pub failed: u64,
    /// Inputs decided on stored states, with their states cached, because too many recent
    /// statements on cached states had found one stale (several processes share the replies).
    pub skipped: u64,
    /// States cached now.
    pub cached: usize,
}

impl PgStore {
    /// The instance of `definition` started with the idempotency key, if any.
    async fn existing(
        &self,
        definition: &str,
        idem: &Idempotency,
    ) -> Result<Option<Created>, StoreError> {
        let row: Option<(Uuid, Option<Json<serde_json::Value>>)> =
            sqlx::query_as(sql::BY_IDEMPOTENCY_KEY)
                .bind(definition)
                .bind(&idem.key)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(id, request)| Created::Existing {
            id,
            same_request: request.map(|Json(r)| r) == Some(idem.request.clone()),
        }))
    }

    /// The stored definitions, of `name` and `version` only if given.
    async fn stored_definitions(
        &self,
        name: Option<&str>,
        version: Option<u32>,
    ) -> Result<Vec<StoredDefinition>, StoreError> {
        let rows: Vec<(Json<Plan>, Option<Json<serde_json::Value>>)> =
            sqlx::query_as(sql::DEFINITIONS)
                .bind(name)
                .bind(version.map(i64::from))
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(Json(plan), document)| StoredDefinition {
                plan,
                document: document.map(|Json(d)| d),
            })
            .collect())
    }

    /// A store on `pool` (migrations must have run: see [`PgStore::migrate`]).
    pub fn new(pool: PgPool) -> PgStore {
        PgStore {
            pool,
            plans: Arc::default(),
            states: Arc::default(),
            held: Arc::default(),
            outbox_deletes: Arc::default(),
        }
    }

    /// Applies the orchestrator's migrations.
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        MIGRATOR.run(&self.pool).await
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// How often reply batches were written on cached states.
    pub fn state_cache(&self) -> StateCacheStats {
        use std::sync::atomic::Ordering::Relaxed;
        StateCacheStats {
            hits: self.states.hits.load(Relaxed),
            stale: self.states.stale.load(Relaxed),
            failed: self.states.failed.load(Relaxed),
            skipped: self.states.skipped.load(Relaxed),
            cached: self.states.len(),
        }
    }
}

/// An instance's projection from its row: the state, created and updated.
fn stored(
    (Json(instance), created_at, updated_at): (Json<Instance>, Time, Time),
) -> StoredInstance {
    StoredInstance {
        instance,
        created_at,
        updated_at,
    }
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn decode_outbox(row: &PgRow) -> Result<OutboxMessage, StoreError> {
    let Json(command): Json<Command> =
        row.try_get("body").map_err(|e| corrupt("outbox body", e))?;
    Ok(OutboxMessage {
        id: row.try_get("id")?,
        participant: row.try_get("participant")?,
        command,
    })
}

#[async_trait]
impl SagaStore for PgStore {
    async fn create(
        &self,
        start: &Transition,
        now: Time,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        self.insert(&[(start, None)], now)
            .await?
            .pop()
            .unwrap_or(Err(StoreError::Exists(start.instance.id)))?
            .into_new()
    }

    async fn create_batch(
        &self,
        starts: &[NewInstance<'_>],
        now: Time,
    ) -> Result<Vec<Result<Created, StoreError>>, StoreError> {
        self.insert(starts, now).await
    }

    async fn create_idempotent(
        &self,
        start: &Transition,
        now: Time,
        idempotency: &Idempotency,
    ) -> Result<Created, StoreError> {
        self.insert(&[(start, Some(idempotency))], now)
            .await?
            .pop()
            .unwrap_or(Err(StoreError::Exists(start.instance.id)))
    }

    async fn update(
        &self,
        id: Uuid,
        fired: Option<Timer>,
        now: Time,
        decide: Decide<'_>,
    ) -> Result<Updated, StoreError> {
        self.transact(now, &[(id, decide)], fired)
            .await?
            .pop()
            .unwrap_or(Err(StoreError::NotFound(id)))
    }

    async fn update_batch(
        &self,
        now: Time,
        items: Vec<(Uuid, Decide<'_>)>,
    ) -> Result<Vec<Result<Updated, StoreError>>, StoreError> {
        let known = match self.transact_known(now, &items).await {
            Ok(known) => known,
            Err(e) => {
                // Nothing was written; the locking path gives every item its own answer.
                tracing::debug!(error = %e, "a batch on cached states failed; deciding on the stored states");
                States::bump(&self.states.failed, 1);
                for (id, _) in &items {
                    self.states.forget(*id);
                }
                None
            }
        };
        let Some(known) = known else {
            return self.transact(now, &items, None).await;
        };
        if known.iter().all(Option::is_some) {
            return Ok(known.into_iter().flatten().collect());
        }
        // The items whose cached state had moved on, decided again on the stored state.
        let again: Vec<(Uuid, Decide<'_>)> = items
            .into_iter()
            .zip(&known)
            .filter(|(_, k)| k.is_none())
            .map(|(item, _)| item)
            .collect();
        let n = again.len();
        let mut redone: Vec<Result<Updated, StoreError>> =
            match self.transact(now, &again, None).await {
                Ok(redone) => redone,
                // The others committed: each of these gets the failure as its own answer.
                Err(e) => (0..n)
                    .map(|_| Err(StoreError::Uncommitted(e.to_string())))
                    .collect(),
            };
        redone.reverse();
        Ok(known
            .into_iter()
            .map(|k| {
                k.unwrap_or_else(|| {
                    redone
                        .pop()
                        .unwrap_or_else(|| Err(corrupt("batch", "an item has no answer")))
                })
            })
            .collect())
    }

    async fn get(&self, id: Uuid) -> Result<Option<StoredInstance>, StoreError> {
        let row: Option<(Json<Instance>, Time, Time)> = sqlx::query_as(sql::GET)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(stored))
    }

    async fn events(&self, id: Uuid) -> Result<Vec<LoggedEvent>, StoreError> {
        let rows: Vec<(i64, Time, Json<Event>)> = sqlx::query_as(sql::EVENTS)
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(seq, at, Json(event))| LoggedEvent { seq, at, event })
            .collect())
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<StoredInstance>, StoreError> {
        let (after_at, after_id) = match filter.after {
            Some(p) => (Some(p.created_at), Some(p.id)),
            None => (None, None),
        };
        let rows: Vec<(Json<Instance>, Time, Time)> = sqlx::query_as(sql::LIST)
            .bind(filter.status.map(|s| s.as_str()))
            .bind(filter.definition.as_deref())
            .bind(after_at)
            .bind(after_id)
            .bind(i64::from(filter.limit))
            .bind(filter.created_after)
            .bind(filter.created_before)
            .bind(filter.idempotency_key.as_deref())
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(stored).collect())
    }

    async fn activity(&self, since: Time) -> Result<Activity, StoreError> {
        let rows: Vec<(i64, String, i64)> = sqlx::query_as(sql::ACTIVITY)
            .bind(since)
            .fetch_all(&self.pool)
            .await?;
        let (n, p50, p90, p99): (i64, Option<i64>, Option<i64>, Option<i64>) =
            sqlx::query_as(sql::LATENCY)
                .bind(since)
                .fetch_one(&self.pool)
                .await?;
        let oldest: Vec<(Json<Instance>, Time, Time)> = sqlx::query_as(sql::OLDEST_OPEN)
            .bind(i64::from(OLDEST_OPEN))
            .fetch_all(&self.pool)
            .await?;
        Ok(Activity {
            minutes: Minute::fold(rows)?,
            latency: Latency::of_micros(n, p50, p90, p99),
            oldest_open: oldest.into_iter().map(stored).collect(),
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query(sql::PING).execute(&self.pool).await?;
        Ok(())
    }

    async fn claim_due_timers(
        &self,
        now: Time,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<(Uuid, Timer)>, StoreError> {
        let rows: Vec<(Uuid, Json<Timer>)> = sqlx::query_as(sql::CLAIM_TIMERS)
            .bind(now)
            .bind(limit)
            .bind(now + lease)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|(id, Json(t))| (id, t)).collect())
    }

    async fn claim_outbox(
        &self,
        now: Time,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        let rows = sqlx::query(sql::CLAIM_OUTBOX)
            .bind(now)
            .bind(limit)
            .bind(now + lease)
            .fetch_all(&self.pool)
            .await?;
        let mut out: Vec<OutboxMessage> =
            rows.iter().map(decode_outbox).collect::<Result<_, _>>()?;
        out.sort_by_key(|m| m.id);
        Ok(out)
    }

    async fn prune(&self, finished_before: Time, limit: u32) -> Result<Pruned, StoreError> {
        self.prune_exporting(finished_before, limit, None).await
    }

    async fn gauges(&self, now: Time) -> Result<Gauges, StoreError> {
        #[allow(clippy::type_complexity)]
        let row: (
            Option<Vec<String>>,
            Option<Vec<i64>>,
            Option<Time>,
            i64,
            Option<Time>,
            i64,
            Option<Time>,
        ) = sqlx::query_as(sql::GAUGES)
            .bind(now)
            .fetch_one(&self.pool)
            .await?;
        let (statuses, counts, oldest_open, outbox, oldest_outbox, due, oldest_due) = row;
        Ok(Gauges {
            open: Gauges::open_by_name(
                statuses
                    .unwrap_or_default()
                    .into_iter()
                    .zip(counts.unwrap_or_default()),
            )?,
            oldest_open,
            outbox_rows: u64::try_from(outbox).unwrap_or(0),
            oldest_outbox,
            timers_due: u64::try_from(due).unwrap_or(0),
            oldest_due_timer: oldest_due,
        })
    }

    async fn in_flight(&self, id: Uuid) -> Result<Pending, StoreError> {
        let (outbox, Json(timers)): (i64, Json<Vec<PendingTimer>>) = sqlx::query_as(sql::IN_FLIGHT)
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        Ok(Pending {
            outbox_rows: u64::try_from(outbox).unwrap_or(0),
            timers,
        })
    }

    async fn stuck_steps(&self) -> Result<Vec<StuckStep>, StoreError> {
        #[allow(clippy::type_complexity)]
        let rows: Vec<(
            Uuid,
            String,
            Option<String>,
            Option<String>,
            Option<String>,
            Time,
        )> = sqlx::query_as(sql::STUCK_STEPS)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(
                |(id, definition, step, participant, last_error, updated_at)| StuckStep {
                    id,
                    definition,
                    step: step.unwrap_or_default(),
                    participant: participant.unwrap_or_default(),
                    last_error,
                    updated_at,
                },
            )
            .collect())
    }

    async fn delete_outbox(&self, ids: &[i64]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query(sql::DELETE_OUTBOX)
            .bind(ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    fn outbox_deletes(&self) -> Option<&OutboxDeletes> {
        Some(&self.outbox_deletes)
    }

    async fn register_definition(
        &self,
        definition: &StoredDefinition,
    ) -> Result<Registration, StoreError> {
        let plan = &definition.plan;
        let id = plans::plan_id(plan);
        // The rows of the outer INSERT: 0 when the name and version were stored already.
        let inserted = sqlx::query(sql::REGISTER_DEFINITION)
            .bind(&plan.name)
            .bind(i64::from(plan.version))
            .bind(id)
            .bind(Json(plan))
            .bind(definition.document.as_ref().map(Json))
            .execute(&self.pool)
            .await?
            .rows_affected()
            == 1;
        self.plans.stored([id]);
        let stored = self
            .stored_definitions(Some(&plan.name), Some(plan.version))
            .await?
            .pop()
            .ok_or_else(|| corrupt("definition", "not stored after its insert"))?;
        Ok(Registration { stored, inserted })
    }

    async fn definitions(&self, name: Option<&str>) -> Result<Vec<StoredDefinition>, StoreError> {
        self.stored_definitions(name, None).await
    }

    async fn newest_document_version(&self, name: &str) -> Result<Option<u32>, StoreError> {
        let (newest,): (Option<i64>,) = sqlx::query_as(sql::NEWEST_DOCUMENT_VERSION)
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        Ok(newest.and_then(|v| u32::try_from(v).ok()))
    }

    async fn document_count(&self) -> Result<u64, StoreError> {
        let (count,): (i64,) = sqlx::query_as(sql::DOCUMENT_COUNT)
            .fetch_one(&self.pool)
            .await?;
        Ok(count.unsigned_abs())
    }

    async fn sync_breakers(
        &self,
        now: Time,
        outcomes: &[Outcomes],
        policy: &BreakerPolicy,
    ) -> Result<Vec<Synced>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let participants: Vec<&str> = outcomes.iter().map(|o| o.participant.as_str()).collect();
        if !participants.is_empty() {
            sqlx::query(sql::ADD_BREAKERS)
                .bind(&participants)
                .bind(Json(BreakerState::new(now)))
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        let rows: Vec<(String, Json<BreakerState>)> = sqlx::query_as(sql::LOCK_BREAKERS)
            .fetch_all(&mut *tx)
            .await?;
        let before: BTreeMap<String, BreakerState> =
            rows.into_iter().map(|(p, Json(s))| (p, s)).collect();
        let mut states = before.clone();
        let synced = crate::breaker::sync(&mut states, outcomes, now, policy);
        let (names, values): (Vec<&str>, Vec<Json<&BreakerState>>) =
            super::changed_breakers(&before, &synced)
                .map(|s| (s.participant.as_str(), Json(&s.state)))
                .unzip();
        if !names.is_empty() {
            sqlx::query(sql::WRITE_BREAKERS)
                .bind(&names)
                .bind(&values)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(synced)
    }

    /// NOTIFY and LISTEN: any number of processes may share the database.
    fn settlements(&self) -> Option<Arc<dyn Settlements>> {
        Some(Arc::new(PgSettlements {
            pool: self.pool.clone(),
            listener_pid: Default::default(),
        }))
    }
}
