//! The PostgreSQL store.

use async_trait::async_trait;
use chrono::Duration;
use serde_json::Value;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::types::Json;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::{
    Created, Decide, Idempotency, ListFilter, LoggedEvent, OutboxMessage, SagaStore, StoreError,
    StoredInstance, Updated,
};
use crate::machine::{Effect, Event, Instance, Time, Timer, Transition};
use sagas_participant::protocol::Command;

/// The orchestrator's migrations (`migrations/orchestrator`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/orchestrator");

/// How long the writer of an outbox row has to publish it before the relay may.
const OUTBOX_GRACE_MS: i64 = 5_000;

/// A [`SagaStore`] on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    async fn insert(
        &self,
        start: &Transition,
        now: Time,
        idempotency: Option<&Idempotency>,
    ) -> Result<Created, StoreError> {
        let inst = &start.instance;
        let mut tx = self.pool.begin().await?;
        // Conflicts on the id or on the idempotency key; a concurrent start with the same key
        // waits on the unique index until the first commits, then finds its row below.
        let inserted = sqlx::query(
            "INSERT INTO sagas_instances
               (id, definition, version, mode, status, seq, state, failure, created_at, updated_at,
                idempotency_key, request)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10, $11)
             ON CONFLICT DO NOTHING",
        )
        .bind(inst.id)
        .bind(&inst.plan.name)
        .bind(inst.plan.version as i32)
        .bind(inst.plan.mode.as_str())
        .bind(inst.status.as_str())
        .bind(inst.seq as i64)
        .bind(Json(inst))
        .bind(&inst.failure)
        .bind(now)
        .bind(idempotency.map(|i| &i.key))
        .bind(idempotency.map(|i| Json(&i.request)))
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            if let Some(idem) = idempotency {
                let row: Option<(Uuid, Option<Json<serde_json::Value>>)> = sqlx::query_as(
                    "SELECT id, request FROM sagas_instances
                     WHERE definition = $1 AND idempotency_key = $2",
                )
                .bind(&inst.plan.name)
                .bind(&idem.key)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some((id, request)) = row {
                    return Ok(Created::Existing {
                        id,
                        same_request: request.map(|Json(r)| r) == Some(idem.request.clone()),
                    });
                }
            }
            return Err(StoreError::Exists(inst.id));
        }
        append_events(&mut tx, inst.id, 1, &start.events, now).await?;
        let outbox = apply_effects(&mut tx, inst.id, &start.effects, now).await?;
        tx.commit().await?;
        Ok(Created::New(outbox))
    }

    /// A store on `pool` (migrations must have run: see [`PgStore::migrate`]).
    pub fn new(pool: PgPool) -> PgStore {
        PgStore { pool }
    }

    /// Applies the orchestrator's migrations.
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        MIGRATOR.run(&self.pool).await
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

/// Appends `events` (numbered after `first_seq - 1`), in one statement.
async fn append_events(
    conn: &mut PgConnection,
    id: Uuid,
    first_seq: i64,
    events: &[Event],
    now: Time,
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO sagas_events (instance_id, seq, kind, step, operation, attempt, body, at)
         SELECT $1, $2 + e.ord - 1, e.body->>'kind', (e.body->>'step')::int,
                e.body->>'operation', (e.body->>'attempt')::int, e.body, $4
         FROM jsonb_array_elements($3) WITH ORDINALITY AS e(body, ord)",
    )
    .bind(id)
    .bind(first_seq)
    .bind(Json(events))
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Writes the transition's commands to the outbox and applies its timer effects.
async fn apply_effects(
    conn: &mut PgConnection,
    id: Uuid,
    effects: &[Effect],
    now: Time,
) -> Result<Vec<OutboxMessage>, StoreError> {
    let super::PlannedEffects { sends, set, cancel } = super::plan_effects(effects);
    let mut outbox = Vec::with_capacity(sends.len());
    if !sends.is_empty() {
        let rows: Vec<Value> = sends
            .iter()
            .map(|(p, c)| serde_json::json!({"p": p, "m": c.message_id(), "b": c}))
            .collect();
        let ids: Vec<(i64, String)> = sqlx::query_as(
            "INSERT INTO sagas_outbox (instance_id, participant, message_id, body, created_at, available_at)
             SELECT $1, r->>'p', r->>'m', r->'b', $3, $3 + make_interval(secs => $4::float8 / 1000)
             FROM jsonb_array_elements($2) AS r
             RETURNING id, message_id",
        )
        .bind(id)
        .bind(Json(&rows))
        .bind(now)
        .bind(OUTBOX_GRACE_MS as f64)
        .fetch_all(&mut *conn)
        .await?;
        for (p, c) in sends {
            let row_id = ids
                .iter()
                .find(|(_, m)| *m == c.message_id())
                .map(|(i, _)| *i)
                .ok_or_else(|| corrupt("outbox insert", "a row id is missing"))?;
            outbox.push(OutboxMessage {
                id: row_id,
                participant: p.clone(),
                command: c.clone(),
            });
        }
    }
    if !cancel.is_empty() {
        sqlx::query("DELETE FROM sagas_timers WHERE instance_id = $1 AND key = ANY($2)")
            .bind(id)
            .bind(&cancel)
            .execute(&mut *conn)
            .await?;
    }
    let set: Vec<Value> = set
        .iter()
        .map(|(k, at, t)| serde_json::json!({"k": k, "at": at, "t": t}))
        .collect();
    if !set.is_empty() {
        sqlx::query(
            "INSERT INTO sagas_timers (instance_id, key, due_at, timer)
             SELECT $1, r->>'k', (r->>'at')::timestamptz, r->'t'
             FROM jsonb_array_elements($2) AS r
             ON CONFLICT (instance_id, key) DO UPDATE SET due_at = EXCLUDED.due_at, timer = EXCLUDED.timer",
        )
        .bind(id)
        .bind(Json(&set))
        .execute(&mut *conn)
        .await?;
    }
    Ok(outbox)
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
        match self.insert(start, now, None).await? {
            Created::New(outbox) => Ok(outbox),
            Created::Existing { id, .. } => Err(StoreError::Exists(id)),
        }
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
        let mut tx = self.pool.begin().await?;
        let row: Option<(Json<Instance>,)> =
            sqlx::query_as("SELECT state FROM sagas_instances WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((Json(current),)) = row else {
            return Err(StoreError::NotFound(id));
        };
        if let Some(timer) = fired {
            sqlx::query(
                "DELETE FROM sagas_timers WHERE instance_id = $1 AND key = $2 AND timer = $3",
            )
            .bind(id)
            .bind(timer.key())
            .bind(Json(timer))
            .execute(&mut *tx)
            .await?;
        }
        let transition = decide(&current)?;
        let inst = &transition.instance;
        let mut outbox = Vec::new();
        if !transition.events.is_empty() {
            let first_seq = current.seq as i64 + 1;
            append_events(&mut tx, id, first_seq, &transition.events, now).await?;
            sqlx::query(
                "UPDATE sagas_instances SET status = $2, seq = $3, state = $4, failure = $5, updated_at = $6
                 WHERE id = $1",
            )
            .bind(id)
            .bind(inst.status.as_str())
            .bind(inst.seq as i64)
            .bind(Json(inst))
            .bind(&inst.failure)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        if !transition.effects.is_empty() {
            outbox = apply_effects(&mut tx, id, &transition.effects, now).await?;
        }
        tx.commit().await?;
        Ok(Updated { transition, outbox })
    }

    async fn get(&self, id: Uuid) -> Result<Option<StoredInstance>, StoreError> {
        let row: Option<(Json<Instance>, Time, Time)> = sqlx::query_as(
            "SELECT state, created_at, updated_at FROM sagas_instances WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(
            row.map(|(Json(instance), created_at, updated_at)| StoredInstance {
                instance,
                created_at,
                updated_at,
            }),
        )
    }

    async fn events(&self, id: Uuid) -> Result<Vec<LoggedEvent>, StoreError> {
        let rows: Vec<(i64, Time, Json<Event>)> = sqlx::query_as(
            "SELECT seq, at, body FROM sagas_events WHERE instance_id = $1 ORDER BY seq",
        )
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
        // The row comparison walks the (created_at, id) index backwards from the cursor.
        let rows: Vec<(Json<Instance>, Time, Time)> = sqlx::query_as(
            "SELECT state, created_at, updated_at FROM sagas_instances
             WHERE ($1::text IS NULL OR status = $1)
               AND ($2::text IS NULL OR definition = $2)
               AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4))
               AND ($6::timestamptz IS NULL OR created_at >= $6)
               AND ($7::timestamptz IS NULL OR created_at < $7)
             ORDER BY created_at DESC, id DESC
             LIMIT $5",
        )
        .bind(filter.status.map(|s| s.as_str()))
        .bind(filter.definition.as_deref())
        .bind(after_at)
        .bind(after_id)
        .bind(i64::from(filter.limit))
        .bind(filter.created_after)
        .bind(filter.created_before)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(Json(instance), created_at, updated_at)| StoredInstance {
                instance,
                created_at,
                updated_at,
            })
            .collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn claim_due_timers(
        &self,
        now: Time,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<(Uuid, Timer)>, StoreError> {
        let rows: Vec<(Uuid, Json<Timer>)> = sqlx::query_as(
            "UPDATE sagas_timers t SET due_at = $3
             FROM (SELECT instance_id, key FROM sagas_timers
                   WHERE due_at <= $1 ORDER BY due_at LIMIT $2
                   FOR UPDATE SKIP LOCKED) due
             WHERE t.instance_id = due.instance_id AND t.key = due.key
             RETURNING t.instance_id, t.timer",
        )
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
        let rows = sqlx::query(
            "UPDATE sagas_outbox o SET available_at = $3
             FROM (SELECT id FROM sagas_outbox WHERE available_at <= $1
                   ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED) due
             WHERE o.id = due.id
             RETURNING o.id, o.participant, o.body",
        )
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

    async fn delete_outbox(&self, ids: &[i64]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query("DELETE FROM sagas_outbox WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
