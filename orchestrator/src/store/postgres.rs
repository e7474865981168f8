//! The PostgreSQL store.

use async_trait::async_trait;
use chrono::Duration;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use sqlx::Row;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::types::Json;
use uuid::Uuid;

use super::{
    Created, Decide, Idempotency, ListFilter, LoggedEvent, OutboxMessage, SagaStore, StoreError,
    StoredInstance, Updated,
};
use crate::machine::{Effect, Event, Instance, Time, Timer, Transition};
use sagas_participant::protocol::Command;

mod plans;
mod states;
use plans::{EventBody, PlanRow, Plans, StateRef, StoredState};
use states::{Known, States};

/// The orchestrator's migrations (`migrations/orchestrator`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/orchestrator");

/// How long the writer of an outbox row has to publish it before the relay may.
const OUTBOX_GRACE_MS: i64 = 5_000;

/// A [`SagaStore`] on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// The plans this process has met (`sagas_plans`).
    plans: Arc<Plans>,
    /// The states of open instances as this process last committed them.
    states: Arc<States>,
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
    /// States cached now.
    pub cached: usize,
}

impl PgStore {
    /// Stores new instances with one statement, so in one implicit transaction: each
    /// instance, its first events, its outbox rows and timers. The other writes join `ins`, so
    /// a conflict on an id or on an idempotency key writes nothing for that instance (and
    /// leaves the others). A concurrent start with the same key waits on the unique index
    /// until the first commits; its row is then read and named.
    async fn insert(
        &self,
        starts: &[(&Transition, Option<&Idempotency>)],
        now: Time,
    ) -> Result<Vec<Result<Created, StoreError>>, StoreError> {
        let mut instances = Vec::with_capacity(starts.len());
        let mut events = Vec::new();
        let mut set = Vec::new();
        let mut sends = Vec::new();
        let mut plan_rows = PlanRows::default();
        let mut plan_ids = Vec::with_capacity(starts.len());
        for (start, idempotency) in starts {
            let inst = &start.instance;
            let id = inst.id;
            let plan_id = plan_rows.id_of(&self.plans, &inst.plan);
            plan_ids.push(plan_id);
            instances.push(NewRow {
                i: id,
                definition: &inst.plan.name,
                version: inst.plan.version,
                mode: inst.plan.mode.as_str(),
                status: inst.status.as_str(),
                seq: inst.seq,
                state: StateRef::from(inst),
                plan_id,
                failure: &inst.failure,
                key: idempotency.map(|i| &i.key),
                request: idempotency.map(|i| &i.request),
            });
            for (n, event) in start.events.iter().enumerate() {
                let seq = n as i64 + 1;
                events.push(EventRow::new(id, seq, event, &self.plans, &mut plan_rows));
            }
            let super::PlannedEffects {
                sends: cmds,
                set: timers,
                ..
            } = super::plan_effects(&start.effects);
            for (key, at, t) in timers {
                set.push(SetTimerRow {
                    i: id,
                    k: key,
                    at,
                    t,
                });
            }
            for (participant, command) in cmds {
                sends.push(SendRow {
                    i: id,
                    p: participant,
                    m: command.message_id(),
                    b: command,
                });
            }
        }
        let (created, ids, message_ids): (Vec<Uuid>, Vec<i64>, Vec<String>) = sqlx::query_as(
            "WITH ins AS (
               INSERT INTO sagas_instances
                 (id, definition, version, mode, status, seq, state, plan_id, failure, created_at,
                  updated_at, idempotency_key, request)
               SELECT (r->>'i')::uuid, r->>'definition', (r->>'version')::int, r->>'mode',
                      r->>'status', (r->>'seq')::bigint, r->'state', (r->>'plan_id')::uuid,
                      r->>'failure', $1, $1, r->>'key', nullif(r->'request', 'null'::jsonb)
               FROM jsonb_array_elements($2) AS r
               ON CONFLICT DO NOTHING
               RETURNING id),
             pl AS (
               INSERT INTO sagas_plans (id, plan)
               SELECT (r->>'i')::uuid, r->'plan' FROM jsonb_array_elements($7) AS r
               ON CONFLICT (id) DO NOTHING),
             ev AS (
               INSERT INTO sagas_events
                 (instance_id, seq, kind, step, operation, attempt, body, at, plan_id)
               SELECT ins.id, (e->>'s')::bigint, e->'b'->>'kind', (e->'b'->>'step')::int,
                      e->'b'->>'operation', (e->'b'->>'attempt')::int, e->'b', $1,
                      (e->>'plan_id')::uuid
               FROM jsonb_array_elements($3) AS e JOIN ins ON ins.id = (e->>'i')::uuid),
             tset AS (
               INSERT INTO sagas_timers (instance_id, key, due_at, timer)
               SELECT ins.id, r->>'k', (r->>'at')::timestamptz, r->'t'
               FROM jsonb_array_elements($4) AS r JOIN ins ON ins.id = (r->>'i')::uuid
               ON CONFLICT (instance_id, key) DO UPDATE SET due_at = EXCLUDED.due_at, timer = EXCLUDED.timer),
             ob AS (
               INSERT INTO sagas_outbox (instance_id, participant, message_id, body, created_at, available_at)
               SELECT ins.id, r.r->>'p', r.r->>'m', r.r->'b', $1, $1 + make_interval(secs => $6::float8 / 1000)
               FROM jsonb_array_elements($5) WITH ORDINALITY AS r(r, ord)
               JOIN ins ON ins.id = (r.r->>'i')::uuid
               ORDER BY r.ord
               RETURNING id, message_id)
             SELECT coalesce((SELECT array_agg(id) FROM ins), '{}') AS created,
                    coalesce((SELECT array_agg(id ORDER BY id) FROM ob), '{}') AS ids,
                    coalesce((SELECT array_agg(message_id ORDER BY id) FROM ob), '{}') AS message_ids",
        )
        .bind(now)
        .bind(Json(&instances))
        .bind(Json(&events))
        .bind(Json(&set))
        .bind(Json(&sends))
        .bind(OUTBOX_GRACE_MS as f64)
        .bind(Json(&plan_rows.rows))
        .fetch_one(&self.pool)
        .await?;
        plan_rows.committed(&self.plans);
        let row_ids: HashMap<String, i64> = message_ids.into_iter().zip(ids).collect();
        let mut results = Vec::with_capacity(starts.len());
        for ((start, idempotency), plan_id) in starts.iter().zip(plan_ids) {
            let inst = &start.instance;
            if created.contains(&inst.id) {
                self.states.committed(inst, plan_id);
                results.push(outbox_rows(start, &row_ids).map(Created::New));
                continue;
            }
            let existing = match idempotency {
                Some(idem) => self.existing(&inst.plan.name, idem).await?,
                None => None,
            };
            results.push(existing.ok_or(StoreError::Exists(inst.id)));
        }
        Ok(results)
    }

    /// The instance of `definition` started with the idempotency key, if any.
    async fn existing(
        &self,
        definition: &str,
        idem: &Idempotency,
    ) -> Result<Option<Created>, StoreError> {
        let row: Option<(Uuid, Option<Json<serde_json::Value>>)> = sqlx::query_as(
            "SELECT id, request FROM sagas_instances
             WHERE definition = $1 AND idempotency_key = $2",
        )
        .bind(definition)
        .bind(&idem.key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(id, request)| Created::Existing {
            id,
            same_request: request.map(|Json(r)| r) == Some(idem.request.clone()),
        }))
    }

    /// A store on `pool` (migrations must have run: see [`PgStore::migrate`]).
    pub fn new(pool: PgPool) -> PgStore {
        PgStore {
            pool,
            plans: Arc::default(),
            states: Arc::default(),
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
            cached: self.states.len(),
        }
    }
}

/// The JSON rows the batch statements unpack (`jsonb_array_elements`), serialized straight
/// from the borrowed values: no `serde_json::Value` tree is built for them.
#[derive(serde::Serialize)]
struct EventRow<'a> {
    i: Uuid,
    s: i64,
    b: EventBody<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    plan_id: Option<Uuid>,
}

impl<'a> EventRow<'a> {
    /// The row of `event`, the `seq`th of instance `i`; a `started` event names its plan.
    fn new(i: Uuid, s: i64, event: &'a Event, plans: &Plans, rows: &mut PlanRows) -> Self {
        let (b, plan) = EventBody::of(event);
        let plan_id = plan.map(|plan| rows.id_of(plans, plan));
        EventRow { i, s, b, plan_id }
    }
}

#[derive(serde::Serialize)]
struct SendRow<'a> {
    i: Uuid,
    p: &'a str,
    m: String,
    b: &'a Command,
}

#[derive(serde::Serialize)]
struct SetTimerRow {
    i: Uuid,
    k: String,
    at: Time,
    t: Timer,
}

#[derive(serde::Serialize)]
struct DeleteTimerRow {
    i: Uuid,
    k: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    t: Option<Timer>,
}

#[derive(serde::Serialize)]
struct NewRow<'a> {
    i: Uuid,
    definition: &'a str,
    version: u32,
    mode: &'static str,
    status: &'static str,
    seq: u64,
    state: StateRef<'a>,
    plan_id: Uuid,
    failure: &'a Option<String>,
    key: Option<&'a String>,
    request: Option<&'a serde_json::Value>,
}

#[derive(serde::Serialize)]
struct ProjectionRow<'a> {
    i: Uuid,
    status: &'static str,
    seq: u64,
    /// The `seq` the transition was decided on, when the row is written only if still at it.
    #[serde(skip_serializing_if = "Option::is_none")]
    prev: Option<u64>,
    state: StateRef<'a>,
    plan_id: Uuid,
    failure: &'a Option<String>,
}

/// The plans a statement names and the rows it writes for those not known to be stored.
#[derive(Default)]
struct PlanRows {
    ids: HashSet<Uuid>,
    rows: Vec<PlanRow>,
}

impl PlanRows {
    /// The id of `plan`, its row added if the plan may not be stored yet.
    fn id_of(&mut self, plans: &Plans, plan: &crate::definition::Plan) -> Uuid {
        let (id, row) = plans.id_of(plan);
        if self.ids.insert(id)
            && let Some(row) = row
        {
            self.rows.push(row);
        }
        id
    }

    /// Notes that the statement committed: its plans are stored.
    fn committed(self, plans: &Plans) {
        if !self.rows.is_empty() {
            plans.stored(self.rows.into_iter().map(|r| r.i));
        }
    }
}

/// One input of [`PgStore::transact`].
struct Item<'a> {
    /// The instance.
    id: Uuid,
    /// The timer that fired, deleted if it is still the one stored under its key.
    fired: Option<Timer>,
    /// The decision on the instance's current state.
    decide: Decide<'a>,
}

/// What the transitions of one transaction do to one instance, as they accumulate.
struct Pending {
    /// The state as locked.
    loaded: Instance,
    /// The id of its plan, if its row names it (an instance's plan never changes).
    plan_id: Option<Uuid>,
    /// Where in the results its latest transition is (its state is the current one).
    latest: Option<usize>,
    /// Whether any transition appended events (the projection is then rewritten).
    changed: bool,
    /// The final state of every timer key touched: set to (due, timer) or deleted.
    timers: BTreeMap<String, Option<(Time, Timer)>>,
    /// The timer that fired (only for an instance with one input in the transaction).
    fired: Option<Timer>,
}

impl Pending {
    /// The state after the transitions so far.
    fn current<'a>(&'a self, results: &'a [Result<Transition, StoreError>]) -> &'a Instance {
        self.latest
            .and_then(|i| results[i].as_ref().ok())
            .map_or(&self.loaded, |t| &t.instance)
    }
}

impl PgStore {
    /// The instances of `rows`, each with its plan: its own (rows written before
    /// `sagas_plans`), else the one its `plan_id` names, read from `sagas_plans` if this
    /// process has not met it yet; and the id of that plan, unless the row carried its own.
    async fn with_plans(
        &self,
        conn: &mut sqlx::PgConnection,
        rows: Vec<(Uuid, Json<StoredState>, Option<Uuid>)>,
    ) -> Result<Vec<(Uuid, Instance, Option<Uuid>)>, StoreError> {
        let missing: Vec<Uuid> = rows
            .iter()
            .filter(|(_, Json(state), _)| !state.has_plan())
            .filter_map(|(_, _, plan_id)| *plan_id)
            .filter(|plan_id| self.plans.get(plan_id).is_none())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if !missing.is_empty() {
            let read: Vec<(Uuid, Json<crate::definition::Plan>)> =
                sqlx::query_as("SELECT id, plan FROM sagas_plans WHERE id = ANY($1)")
                    .bind(&missing)
                    .fetch_all(&mut *conn)
                    .await?;
            self.plans
                .loaded(read.into_iter().map(|(id, Json(plan))| (id, plan)));
        }
        rows.into_iter()
            .map(|(id, Json(state), plan_id)| {
                let plan_id = plan_id.filter(|_| !state.has_plan());
                let plan = plan_id.and_then(|p| self.plans.get(&p));
                let instance = state.into_instance(plan.as_deref()).ok_or_else(|| {
                    corrupt(
                        "instance state",
                        format!("{id}: plan {plan_id:?} not found"),
                    )
                })?;
                Ok((id, instance, plan_id))
            })
            .collect()
    }

    /// Runs `items` in one transaction: locks their instances (in id order, so concurrent
    /// transactions cannot deadlock on them), lets each decision see the state the previous
    /// ones left (several inputs for one instance apply in order), and writes every
    /// transition's events, projections, timers and outbox rows with one statement. A decision
    /// that fails (or an unknown instance) is that item's error and writes nothing; the others
    /// commit. `Err` means the transaction failed and nothing was committed.
    async fn transact(
        &self,
        now: Time,
        items: Vec<Item<'_>>,
    ) -> Result<Vec<Result<Updated, StoreError>>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let ids: Vec<Uuid> = items.iter().map(|i| i.id).collect();
        let rows: Vec<(Uuid, Json<StoredState>, Option<Uuid>)> = sqlx::query_as(
            "SELECT id, state, plan_id FROM sagas_instances WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        let rows = self.with_plans(&mut tx, rows).await?;
        let mut pending: HashMap<Uuid, Pending> = rows
            .into_iter()
            .map(|(id, loaded, plan_id)| {
                let p = Pending {
                    loaded,
                    plan_id,
                    latest: None,
                    changed: false,
                    timers: BTreeMap::new(),
                    fired: None,
                };
                (id, p)
            })
            .collect();

        let mut results: Vec<Result<Transition, StoreError>> = Vec::with_capacity(items.len());
        for item in items {
            let Some(p) = pending.get_mut(&item.id) else {
                results.push(Err(StoreError::NotFound(item.id)));
                continue;
            };
            let transition = match (item.decide)(p.current(&results)) {
                Ok(t) => t,
                Err(e) => {
                    results.push(Err(e));
                    continue;
                }
            };
            // A conditional delete of a fired timer is only exact against the stored row, so
            // it is taken for an instance's only input; the batch API never passes one.
            p.fired = if p.latest.is_none() { item.fired } else { None };
            for effect in &transition.effects {
                match effect {
                    Effect::Send { .. } => {}
                    Effect::SetTimer { at, timer } => {
                        p.timers.insert(timer.key(), Some((*at, *timer)));
                    }
                    Effect::CancelTimer { key } => {
                        p.timers.insert(key.clone(), None);
                    }
                }
            }
            p.changed |= !transition.events.is_empty();
            p.latest = Some(results.len());
            results.push(Ok(transition));
        }

        let mut events = Vec::new();
        let mut sends = Vec::new();
        let mut plan_rows = PlanRows::default();
        for transition in results.iter().flatten() {
            self.log_rows(transition, &mut plan_rows, &mut events, &mut sends);
        }
        let mut instances = Vec::new();
        let mut set = Vec::new();
        let mut delete = Vec::new();
        let mut cache = Vec::new();
        for (&id, p) in &pending {
            if p.changed {
                let s = p.current(&results);
                // Known from the row, stored with it; a row that carried its plan names it
                // from now on.
                let plan_id = match p.plan_id {
                    Some(id) => id,
                    None => plan_rows.id_of(&self.plans, &s.plan),
                };
                if let Some(latest) = p.latest {
                    cache.push((latest, plan_id));
                }
                instances.push(ProjectionRow {
                    i: id,
                    status: s.status.as_str(),
                    seq: s.seq,
                    prev: None,
                    state: StateRef::from(s),
                    plan_id,
                    failure: &s.failure,
                });
            }
            for (key, value) in &p.timers {
                match value {
                    Some((at, timer)) => set.push(SetTimerRow {
                        i: id,
                        k: key.clone(),
                        at: *at,
                        t: *timer,
                    }),
                    None => delete.push(DeleteTimerRow {
                        i: id,
                        k: key.clone(),
                        t: None,
                    }),
                }
            }
            // The fired timer is deleted if it is still the one that fired, unless the
            // transitions set or delete its key themselves (one statement must not touch a row
            // twice).
            if let Some(fired) = p.fired.filter(|t| !p.timers.contains_key(&t.key())) {
                delete.push(DeleteTimerRow {
                    i: id,
                    k: fired.key(),
                    t: Some(fired),
                });
            }
        }

        let mut row_ids: HashMap<String, i64> = HashMap::new();
        if !(events.is_empty() && sends.is_empty() && set.is_empty() && delete.is_empty()) {
            // Events, projections, timers and outbox of every instance in one statement
            // (data-modifying CTEs). `= ANY($8)` (the batch's ids) lets the planner reach the
            // rows to update and delete through the primary keys: joined only to the JSON
            // rows, whose count it cannot know, it chose to scan the whole tables.
            let (ids, message_ids): (Vec<i64>, Vec<String>) = sqlx::query_as(
                "WITH ev AS (
                   INSERT INTO sagas_events
                     (instance_id, seq, kind, step, operation, attempt, body, at, plan_id)
                   SELECT (e->>'i')::uuid, (e->>'s')::bigint, e->'b'->>'kind', (e->'b'->>'step')::int,
                          e->'b'->>'operation', (e->'b'->>'attempt')::int, e->'b', $1,
                          (e->>'plan_id')::uuid
                   FROM jsonb_array_elements($2) AS e),
                 inst AS (
                   UPDATE sagas_instances i
                   SET status = r->>'status', seq = (r->>'seq')::bigint, state = r->'state',
                       plan_id = (r->>'plan_id')::uuid, failure = r->>'failure', updated_at = $1
                   FROM jsonb_array_elements($3) AS r
                   WHERE i.id = ANY($8) AND i.id = (r->>'i')::uuid),
                 pl AS (
                   INSERT INTO sagas_plans (id, plan)
                   SELECT (r->>'i')::uuid, r->'plan' FROM jsonb_array_elements($9) AS r
                   ON CONFLICT (id) DO NOTHING),
                 tdel AS (
                   DELETE FROM sagas_timers t
                   USING jsonb_array_elements($4) AS r
                   WHERE t.instance_id = ANY($8)
                     AND t.instance_id = (r->>'i')::uuid AND t.key = r->>'k'
                     AND (NOT r ? 't' OR t.timer = r->'t')),
                 tset AS (
                   INSERT INTO sagas_timers (instance_id, key, due_at, timer)
                   SELECT (r->>'i')::uuid, r->>'k', (r->>'at')::timestamptz, r->'t'
                   FROM jsonb_array_elements($5) AS r
                   ON CONFLICT (instance_id, key) DO UPDATE SET due_at = EXCLUDED.due_at, timer = EXCLUDED.timer),
                 ob AS (
                   INSERT INTO sagas_outbox (instance_id, participant, message_id, body, created_at, available_at)
                   SELECT (r->>'i')::uuid, r->>'p', r->>'m', r->'b', $1, $1 + make_interval(secs => $7::float8 / 1000)
                   FROM jsonb_array_elements($6) WITH ORDINALITY AS r(r, ord)
                   ORDER BY r.ord
                   RETURNING id, message_id)
                 SELECT coalesce((SELECT array_agg(id ORDER BY id) FROM ob), '{}') AS ids,
                        coalesce((SELECT array_agg(message_id ORDER BY id) FROM ob), '{}') AS message_ids",
            )
            .bind(now)
            .bind(Json(&events))
            .bind(Json(&instances))
            .bind(Json(&delete))
            .bind(Json(&set))
            .bind(Json(&sends))
            .bind(OUTBOX_GRACE_MS as f64)
            .bind(&ids)
            .bind(Json(&plan_rows.rows))
            .fetch_one(&mut *tx)
            .await?;
            row_ids.extend(message_ids.into_iter().zip(ids));
        }
        tx.commit().await?;
        plan_rows.committed(&self.plans);
        for (latest, plan_id) in cache {
            if let Ok(t) = &results[latest] {
                self.states.committed(&t.instance, plan_id);
            }
        }

        Ok(results
            .into_iter()
            .map(|result| {
                let transition = result?;
                let outbox = outbox_rows(&transition, &row_ids)?;
                Ok(Updated { transition, outbox })
            })
            .collect())
    }
}

impl PgStore {
    /// Appends the rows of `t`'s events (they end at its state's `seq`) and of its commands.
    fn log_rows<'t>(
        &self,
        t: &'t Transition,
        plan_rows: &mut PlanRows,
        events: &mut Vec<EventRow<'t>>,
        sends: &mut Vec<SendRow<'t>>,
    ) {
        let id = t.instance.id;
        let first = t.instance.seq as i64 - t.events.len() as i64 + 1;
        for (n, event) in t.events.iter().enumerate() {
            let seq = first + n as i64;
            events.push(EventRow::new(id, seq, event, &self.plans, plan_rows));
        }
        for (participant, command) in t.sends() {
            sends.push(SendRow {
                i: id,
                p: participant,
                m: command.message_id(),
                b: command,
            });
        }
    }

    /// Decides `items` on the states this process last committed ([`States`]) and writes
    /// them with one statement, so one implicit transaction: no `BEGIN`, no locking read, no
    /// `COMMIT`. The projection update writes only rows still at the `seq` a decision was made
    /// on, and every other write joins the rows it updated: an item whose stored state moved
    /// on writes nothing. The rows are locked first, in id order as the locking path locks
    /// them (`lk`), and the update only reaches rows `lk` has returned: without it the
    /// update's plan locked in its own order, and two batches sharing instances deadlocked
    /// now and then (a one-second wait for PostgreSQL's deadlock check, seen as a p99 of
    /// 1 s in a `tcc` run).
    ///
    /// Several inputs for one instance apply in order, each decided on the state the previous
    /// left. `None` when the batch must take the locking path as a whole: a state not cached,
    /// or a decision that fails or appends no event on the cached state (that state may be
    /// stale; the stored one has the last word). Otherwise one entry per item, `None` for an
    /// item whose instance's cached state had moved on (it is forgotten).
    async fn transact_known(
        &self,
        now: Time,
        items: &[Item<'_>],
    ) -> Result<Option<Vec<Option<Result<Updated, StoreError>>>>, StoreError> {
        let mut ids: Vec<Uuid> = items.iter().map(|i| i.id).collect();
        ids.sort();
        ids.dedup();
        let Some(known) = self.states.all(&ids) else {
            return Ok(None);
        };
        // Per instance: the cached state, and where in `transitions` its latest one is;
        // several inputs for one instance apply in order, each on the state the previous left.
        let mut latest: HashMap<Uuid, (Known, Option<usize>)> = known
            .into_iter()
            .map(|k| (k.instance.id, (k, None)))
            .collect();
        let mut transitions: Vec<Transition> = Vec::with_capacity(items.len());
        for item in items {
            let Some((k, last)) = latest.get_mut(&item.id) else {
                return Ok(None);
            };
            let current = last.map_or(&k.instance, |i| &transitions[i].instance);
            match (item.decide)(current) {
                Ok(t) if !t.events.is_empty() => {
                    *last = Some(transitions.len());
                    transitions.push(t);
                }
                _ => return Ok(None),
            }
        }

        let mut events = Vec::new();
        let mut sends = Vec::new();
        let mut plan_rows = PlanRows::default();
        // The final state of every timer key an instance's transitions touched.
        let mut timers: BTreeMap<(Uuid, String), Option<(Time, Timer)>> = BTreeMap::new();
        for t in &transitions {
            let id = t.instance.id;
            self.log_rows(t, &mut plan_rows, &mut events, &mut sends);
            // A later transition's effect on a key replaces an earlier one's.
            let planned = super::plan_effects(&t.effects);
            for (key, at, timer) in planned.set {
                timers.insert((id, key), Some((at, timer)));
            }
            for key in planned.cancel {
                timers.insert((id, key), None);
            }
        }
        let mut set = Vec::new();
        let mut delete = Vec::new();
        for ((i, k), value) in timers {
            match value {
                Some((at, t)) => set.push(SetTimerRow { i, k, at, t }),
                None => delete.push(DeleteTimerRow { i, k, t: None }),
            }
        }
        let mut instances = Vec::with_capacity(latest.len());
        for (k, last) in latest.values() {
            let Some(last) = *last else { continue };
            let s = &transitions[last].instance;
            instances.push(ProjectionRow {
                i: s.id,
                status: s.status.as_str(),
                seq: s.seq,
                prev: Some(k.instance.seq),
                state: StateRef::from(s),
                plan_id: k.plan_id,
                failure: &s.failure,
            });
        }

        let (applied, row_ids, message_ids): (Vec<Uuid>, Vec<i64>, Vec<String>) =
            sqlx::query_as(
                "WITH lk AS (
                   SELECT id FROM sagas_instances WHERE id = ANY($8) ORDER BY id FOR UPDATE),
                 inst AS (
                   UPDATE sagas_instances i
                   SET status = r->>'status', seq = (r->>'seq')::bigint, state = r->'state',
                       plan_id = (r->>'plan_id')::uuid, failure = r->>'failure', updated_at = $1
                   FROM jsonb_array_elements($3) AS r, lk
                   WHERE i.id = ANY($8) AND i.id = lk.id AND i.id = (r->>'i')::uuid
                     AND i.seq = (r->>'prev')::bigint
                   RETURNING i.id),
                 ev AS (
                   INSERT INTO sagas_events
                     (instance_id, seq, kind, step, operation, attempt, body, at, plan_id)
                   SELECT inst.id, (e->>'s')::bigint, e->'b'->>'kind', (e->'b'->>'step')::int,
                          e->'b'->>'operation', (e->'b'->>'attempt')::int, e->'b', $1,
                          (e->>'plan_id')::uuid
                   FROM jsonb_array_elements($2) AS e JOIN inst ON inst.id = (e->>'i')::uuid),
                 pl AS (
                   INSERT INTO sagas_plans (id, plan)
                   SELECT (r->>'i')::uuid, r->'plan' FROM jsonb_array_elements($9) AS r
                   ON CONFLICT (id) DO NOTHING),
                 tdel AS (
                   DELETE FROM sagas_timers t
                   USING jsonb_array_elements($4) AS r, inst
                   WHERE t.instance_id = ANY($8) AND t.instance_id = inst.id
                     AND t.instance_id = (r->>'i')::uuid AND t.key = r->>'k'),
                 tset AS (
                   INSERT INTO sagas_timers (instance_id, key, due_at, timer)
                   SELECT inst.id, r->>'k', (r->>'at')::timestamptz, r->'t'
                   FROM jsonb_array_elements($5) AS r JOIN inst ON inst.id = (r->>'i')::uuid
                   ON CONFLICT (instance_id, key) DO UPDATE SET due_at = EXCLUDED.due_at, timer = EXCLUDED.timer),
                 ob AS (
                   INSERT INTO sagas_outbox (instance_id, participant, message_id, body, created_at, available_at)
                   SELECT inst.id, r.r->>'p', r.r->>'m', r.r->'b', $1, $1 + make_interval(secs => $7::float8 / 1000)
                   FROM jsonb_array_elements($6) WITH ORDINALITY AS r(r, ord)
                   JOIN inst ON inst.id = (r.r->>'i')::uuid
                   ORDER BY r.ord
                   RETURNING id, message_id)
                 SELECT coalesce((SELECT array_agg(id) FROM inst), '{}') AS applied,
                        coalesce((SELECT array_agg(id ORDER BY id) FROM ob), '{}') AS ids,
                        coalesce((SELECT array_agg(message_id ORDER BY id) FROM ob), '{}') AS message_ids",
            )
            .bind(now)
            .bind(Json(&events))
            .bind(Json(&instances))
            .bind(Json(&delete))
            .bind(Json(&set))
            .bind(Json(&sends))
            .bind(OUTBOX_GRACE_MS as f64)
            .bind(&ids)
            .bind(Json(&plan_rows.rows))
            .fetch_one(&self.pool)
            .await?;
        plan_rows.committed(&self.plans);
        let row_ids: HashMap<String, i64> = message_ids.into_iter().zip(row_ids).collect();
        let applied: HashSet<Uuid> = applied.into_iter().collect();
        let hits = transitions
            .iter()
            .filter(|t| applied.contains(&t.instance.id))
            .count();
        States::bump(&self.states.hits, hits);
        States::bump(&self.states.stale, transitions.len() - hits);
        for (id, (k, last)) in &latest {
            match last {
                Some(last) if applied.contains(id) => self
                    .states
                    .committed(&transitions[*last].instance, k.plan_id),
                _ => self.states.forget(*id),
            }
        }
        Ok(Some(
            transitions
                .into_iter()
                .map(|t| {
                    if !applied.contains(&t.instance.id) {
                        return None;
                    }
                    let outbox = outbox_rows(&t, &row_ids);
                    Some(outbox.map(|outbox| Updated {
                        transition: t,
                        outbox,
                    }))
                })
                .collect(),
        ))
    }
}

/// The outbox rows of `t`'s commands, by their message ids in what the statement returned.
fn outbox_rows(
    t: &Transition,
    row_ids: &HashMap<String, i64>,
) -> Result<Vec<OutboxMessage>, StoreError> {
    t.sends()
        .map(|(participant, command)| {
            let id = *row_ids
                .get(&command.message_id())
                .ok_or_else(|| corrupt("outbox insert", "a row id is missing"))?;
            Ok(OutboxMessage {
                id,
                participant: participant.clone(),
                command: command.clone(),
            })
        })
        .collect()
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
        let mut results = self.create_batch(std::slice::from_ref(start), now).await?;
        results
            .pop()
            .unwrap_or(Err(StoreError::Exists(start.instance.id)))
    }

    async fn create_batch(
        &self,
        starts: &[Transition],
        now: Time,
    ) -> Result<Vec<Result<Vec<OutboxMessage>, StoreError>>, StoreError> {
        let starts: Vec<_> = starts.iter().map(|t| (t, None)).collect();
        Ok(self
            .insert(&starts, now)
            .await?
            .into_iter()
            .map(|created| created?.into_new())
            .collect())
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
        let item = Item { id, fired, decide };
        self.transact(now, vec![item])
            .await?
            .pop()
            .unwrap_or(Err(StoreError::NotFound(id)))
    }

    async fn update_batch(
        &self,
        now: Time,
        items: Vec<(Uuid, Decide<'_>)>,
    ) -> Result<Vec<Result<Updated, StoreError>>, StoreError> {
        let items: Vec<Item<'_>> = items
            .into_iter()
            .map(|(id, decide)| Item {
                id,
                fired: None,
                decide,
            })
            .collect();
        let known = match self.transact_known(now, &items).await {
            Ok(known) => known,
            Err(e) => {
                // Nothing was written; the locking path gives every item its own answer.
                tracing::debug!(error = %e, "a batch on cached states failed; deciding on the stored states");
                States::bump(&self.states.failed, 1);
                for item in &items {
                    self.states.forget(item.id);
                }
                None
            }
        };
        let Some(known) = known else {
            return self.transact(now, items).await;
        };
        if known.iter().all(Option::is_some) {
            return Ok(known.into_iter().flatten().collect());
        }
        // The items whose cached state had moved on, decided again on the stored state.
        let again: Vec<Item<'_>> = items
            .into_iter()
            .zip(&known)
            .filter(|(_, k)| k.is_none())
            .map(|(item, _)| item)
            .collect();
        let n = again.len();
        let mut redone: Vec<Result<Updated, StoreError>> = match self.transact(now, again).await {
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
        let row: Option<(Json<Instance>, Time, Time)> = sqlx::query_as(
            "SELECT state, created_at, updated_at FROM sagas_instance_states WHERE id = $1",
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
            "SELECT seq, at, body FROM sagas_event_bodies WHERE instance_id = $1 ORDER BY seq",
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
            "SELECT state, created_at, updated_at FROM sagas_instance_states
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
