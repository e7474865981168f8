//! The PostgreSQL store's write path: decide, build the write set, write it with one statement
//! of the family in `sql`, remember what was committed. Each statement also deletes the
//! published outbox rows waiting in [`OutboxDeletes`](crate::store::OutboxDeletes).
//!
//! Three callers, one statement family: new instances ([`PgStore::insert`]), transitions
//! decided under the rows' locks ([`PgStore::transact`]) and transitions decided on the states
//! this process cached ([`PgStore::transact_known`]).

use std::collections::{HashMap, HashSet};

use sqlx::PgExecutor;
use sqlx::types::Json;
use uuid::Uuid;

use super::plans::{EventBody, PlanRow, Plans, StateRef, StoredState};
use super::{PgStore, corrupt, sql};
use crate::definition::Plan;
use crate::machine::{Instance, Time, Timer, Transition};
use crate::store::write_set::{WriteSet, decide_in_order};
use crate::store::{Created, Decide, Idempotency, NewInstance, OutboxMessage, StoreError, Updated};
use sagas_participant::protocol::Command;

/// How long the writer of an outbox row has to publish it before the relay may.
const OUTBOX_GRACE_MS: i64 = 5_000;

/// How a write statement writes the instances' rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Inserted, unless the id or the idempotency key is taken.
    New,
    /// Updated under the locks of the transaction that decided them.
    Locked,
    /// Updated only while still at the `seq` the decision was made on.
    Guarded,
}

impl Target {
    fn statement(self) -> &'static str {
        match self {
            Target::New => sql::WRITE_NEW,
            Target::Locked => sql::WRITE_LOCKED,
            Target::Guarded => sql::WRITE_GUARDED,
        }
    }
}

/// The JSON rows the write statements unpack (`jsonb_array_elements`), serialized straight
/// from the borrowed values: no `serde_json::Value` tree is built for them.
#[derive(serde::Serialize)]
struct EventRow<'a> {
    i: Uuid,
    s: i64,
    b: EventBody<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    plan_id: Option<Uuid>,
}

#[derive(serde::Serialize)]
struct StateRow<'a> {
    #[serde(skip)]
    instance: &'a Instance,
    i: Uuid,
    definition: &'a str,
    version: u32,
    mode: &'static str,
    status: &'static str,
    seq: u64,
    /// The `seq` the decision was made on (a guarded write checks it).
    prev: u64,
    state: StateRef<'a>,
    plan_id: Uuid,
    failure: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request: Option<&'a serde_json::Value>,
}

#[derive(serde::Serialize)]
struct SendRow<'a> {
    i: Uuid,
    p: &'a str,
    m: String,
    b: &'a Command,
}

#[derive(serde::Serialize)]
struct SetTimerRow<'a> {
    i: Uuid,
    k: &'a str,
    at: Time,
    t: Timer,
}

#[derive(serde::Serialize)]
struct DeleteTimerRow {
    i: Uuid,
    k: String,
    /// Deleted only while the stored timer is this one (a timer that fired).
    #[serde(skip_serializing_if = "Option::is_none")]
    t: Option<Timer>,
}

/// The plans a statement names and the rows it writes for those not known to be stored.
#[derive(Default)]
struct PlanRows {
    ids: HashSet<Uuid>,
    rows: Vec<PlanRow>,
}

impl PlanRows {
    /// The id of `plan`, its row added if the plan may not be stored yet.
    fn id_of(&mut self, plans: &Plans, plan: &Plan) -> Uuid {
        let (id, row) = plans.id_of(plan);
        if self.ids.insert(id)
            && let Some(row) = row
        {
            self.rows.push(row);
        }
        id
    }
}

/// The parameters of one write statement.
struct Params<'a> {
    events: Vec<EventRow<'a>>,
    states: Vec<StateRow<'a>>,
    delete: Vec<DeleteTimerRow>,
    set: Vec<SetTimerRow<'a>>,
    sends: Vec<SendRow<'a>>,
    ids: Vec<Uuid>,
    plans: PlanRows,
}

/// What a write statement wrote.
#[derive(Debug, Default)]
struct Written {
    /// The instances whose rows it wrote (for [`Target::Locked`], every instance of the batch).
    instances: HashSet<Uuid>,
    /// The outbox rows' ids, by message id.
    outbox: HashMap<String, i64>,
}

impl<'a> Params<'a> {
    /// The rows of `set` for the instances `ids` (the batch's). An instance row names its plan by the id in
    /// `plan_ids` (read with its state), else by the id of its plan, whose row is written too
    /// unless this process knows it is stored; `keys` are the idempotency keys of new ones.
    fn new(
        set: &'a WriteSet<'a>,
        mut ids: Vec<Uuid>,
        plans: &Plans,
        plan_ids: &HashMap<Uuid, Uuid>,
        keys: &HashMap<Uuid, &'a Idempotency>,
    ) -> Params<'a> {
        // Each once: the statement joins its rows to them.
        ids.sort_unstable();
        ids.dedup();
        let mut plan_rows = PlanRows::default();
        let events = set
            .events
            .iter()
            .map(|e| {
                let (b, plan) = EventBody::of(e.event);
                EventRow {
                    i: e.instance,
                    s: e.seq,
                    b,
                    plan_id: plan.map(|plan| plan_rows.id_of(plans, plan)),
                }
            })
            .collect();
        let states = set
            .states
            .iter()
            .map(|s| {
                let inst = s.instance;
                let plan_id = match plan_ids.get(&inst.id) {
                    Some(&id) => id,
                    None => plan_rows.id_of(plans, &inst.plan),
                };
                let key = keys.get(&inst.id);
                StateRow {
                    instance: inst,
                    i: inst.id,
                    definition: &inst.plan.name,
                    version: inst.plan.version,
                    mode: inst.plan.mode.as_str(),
                    status: inst.status.as_str(),
                    seq: inst.seq,
                    prev: s.decided_on,
                    state: StateRef::from(inst),
                    plan_id,
                    failure: &inst.failure,
                    key: key.map(|k| k.key.as_str()),
                    request: key.map(|k| &k.request),
                }
            })
            .collect();
        let mut delete = Vec::new();
        let mut set_timers = Vec::new();
        for t in &set.timers {
            match t.set {
                Some((at, timer)) => set_timers.push(SetTimerRow {
                    i: t.instance,
                    k: &t.key,
                    at,
                    t: timer,
                }),
                None => delete.push(DeleteTimerRow {
                    i: t.instance,
                    k: t.key.clone(),
                    t: None,
                }),
            }
        }
        delete.extend(set.fired.iter().map(|&(i, timer)| DeleteTimerRow {
            i,
            k: timer.key(),
            t: Some(timer),
        }));
        let sends = set
            .sends
            .iter()
            .map(|s| SendRow {
                i: s.instance,
                p: s.participant,
                m: s.command.message_id(),
                b: s.command,
            })
            .collect();
        Params {
            events,
            states,
            delete,
            set: set_timers,
            sends,
            ids,
            plans: plan_rows,
        }
    }

    /// Runs the statement of `target` with these parameters; it also deletes the published
    /// outbox rows `outbox_deletes`.
    async fn write<'e>(
        &self,
        target: Target,
        now: Time,
        outbox_deletes: &[i64],
        executor: impl PgExecutor<'e>,
    ) -> Result<Written, sqlx::Error> {
        let (instances, ids, message_ids): (Vec<Uuid>, Vec<i64>, Vec<String>) =
            sqlx::query_as(target.statement())
                .bind(now)
                .bind(Json(&self.events))
                .bind(Json(&self.states))
                .bind(Json(&self.delete))
                .bind(Json(&self.set))
                .bind(Json(&self.sends))
                .bind(OUTBOX_GRACE_MS as f64)
                .bind(&self.ids)
                .bind(Json(&self.plans.rows))
                .bind(outbox_deletes)
                .fetch_one(executor)
                .await?;
        Ok(Written {
            instances: instances.into_iter().collect(),
            outbox: message_ids.into_iter().zip(ids).collect(),
        })
    }
}

impl PgStore {
    /// Notes what a committed statement wrote: its plans are stored, the states it wrote are
    /// the instances' current ones, and the states it did not write are not known any more.
    fn remember(&self, params: Params<'_>, written: &Written) {
        if !params.plans.rows.is_empty() {
            self.plans.stored(params.plans.rows.iter().map(|r| r.i));
        }
        for row in &params.states {
            if written.instances.contains(&row.i) {
                self.states.committed(row.instance, row.plan_id);
            } else {
                self.states.forget(row.i);
            }
        }
    }

    /// Stores new instances with one statement, so in one implicit transaction: each
    /// instance, its first events, its outbox rows and timers. A conflict on an id or on an
    /// idempotency key writes nothing for that instance (and leaves the others); an instance
    /// with the key is then read and named.
    pub(super) async fn insert(
        &self,
        starts: &[NewInstance<'_>],
        now: Time,
    ) -> Result<Vec<Result<Created, StoreError>>, StoreError> {
        let set = WriteSet::of(starts.iter().map(|(start, _)| *start));
        let keys: HashMap<Uuid, &Idempotency> = starts
            .iter()
            .filter_map(|(start, key)| Some((start.instance.id, (*key)?)))
            .collect();
        let ids = starts.iter().map(|(start, _)| start.instance.id).collect();
        let params = Params::new(&set, ids, &self.plans, &HashMap::new(), &keys);
        let mut conn = self.held.take(&self.pool).await?;
        let carried = self.outbox_deletes.carry();
        let written = params
            .write(Target::New, now, carried.ids(), &mut *conn)
            .await?;
        carried.committed();
        conn.give_back();
        self.remember(params, &written);
        let mut results = Vec::with_capacity(starts.len());
        for (start, idempotency) in starts {
            let inst = &start.instance;
            if written.instances.contains(&inst.id) {
                results.push(outbox_rows(start, &written.outbox).map(Created::New));
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

    /// Runs `items` in one transaction: locks their instances (in id order, so concurrent
    /// transactions cannot deadlock on them), decides each on the state the previous ones
    /// left (several inputs for one instance apply in order), and writes the transitions with
    /// one statement. A decision that fails (or an unknown instance) is that item's error and
    /// writes nothing; the others commit. `fired` (with one item only) is the timer that fired,
    /// deleted if it is still the one stored under its key. `Err` means the transaction failed
    /// and nothing was committed.
    pub(super) async fn transact(
        &self,
        now: Time,
        items: &[(Uuid, Decide<'_>)],
        fired: Option<Timer>,
    ) -> Result<Vec<Result<Updated, StoreError>>, StoreError> {
        let mut conn = self.held.take(&self.pool).await?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let ids: Vec<Uuid> = items.iter().map(|(id, _)| *id).collect();
        let rows: Vec<(Uuid, Json<StoredState>, Option<Uuid>)> = sqlx::query_as(sql::LOCK_STATES)
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?;
        let mut stored = HashMap::with_capacity(rows.len());
        let mut plan_ids = HashMap::with_capacity(rows.len());
        for (id, instance, plan_id) in self.with_plans(&mut tx, rows).await? {
            stored.insert(id, instance);
            if let Some(plan_id) = plan_id {
                plan_ids.insert(id, plan_id);
            }
        }
        let results = decide_in_order(&stored, items.iter().map(|(id, d)| (*id, d)));
        let mut set = WriteSet::of(results.iter().flatten());
        if let (Some(timer), [(id, _)], [Ok(_)]) = (fired, items, results.as_slice()) {
            set.fired(*id, timer);
        }
        let params = Params::new(&set, ids, &self.plans, &plan_ids, &HashMap::new());
        let carried = (!set.is_empty()).then(|| self.outbox_deletes.carry());
        let written = match &carried {
            None => Written::default(),
            Some(carried) => {
                params
                    .write(Target::Locked, now, carried.ids(), &mut *tx)
                    .await?
            }
        };
        tx.commit().await?;
        if let Some(carried) = carried {
            carried.committed();
        }
        conn.give_back();
        self.remember(params, &written);
        Ok(results
            .into_iter()
            .map(|result| {
                let transition = result?;
                let outbox = outbox_rows(&transition, &written.outbox)?;
                Ok(Updated { transition, outbox })
            })
            .collect())
    }

    /// Decides `items` on the states this process last committed
    /// ([`States`](super::states::States)) and writes them with one statement, so one implicit
    /// transaction: no `BEGIN`, no locking read, no `COMMIT` ([`sql::WRITE_GUARDED`]). An item
    /// whose stored state moved on writes nothing.
    ///
    /// Several inputs for one instance apply in order, each decided on the state the previous
    /// left. `None` when the batch must take the locking path as a whole: a state not cached,
    /// or a decision that fails or appends no event on the cached state (that state may be
    /// stale; the stored one has the last word). Otherwise one entry per item, `None` for an
    /// item whose instance's cached state had moved on (it is forgotten).
    pub(super) async fn transact_known(
        &self,
        now: Time,
        items: &[(Uuid, Decide<'_>)],
    ) -> Result<Option<Vec<Option<Result<Updated, StoreError>>>>, StoreError> {
        let mut ids: Vec<Uuid> = items.iter().map(|(id, _)| *id).collect();
        ids.sort();
        ids.dedup();
        let Some(known) = self.states.all(&ids) else {
            return Ok(None);
        };
        if !self.states.worth_guessing(items.len()) {
            return Ok(None);
        }
        let plan_ids: HashMap<Uuid, Uuid> =
            known.iter().map(|k| (k.instance.id, k.plan_id)).collect();
        let stored: HashMap<Uuid, Instance> = known
            .into_iter()
            .map(|k| (k.instance.id, k.instance))
            .collect();
        let results = decide_in_order(&stored, items.iter().map(|(id, d)| (*id, d)));
        let Some(transitions) = results
            .into_iter()
            .map(|r| r.ok().filter(|t| !t.events.is_empty()))
            .collect::<Option<Vec<Transition>>>()
        else {
            return Ok(None);
        };
        let set = WriteSet::of(&transitions);
        let params = Params::new(&set, ids, &self.plans, &plan_ids, &HashMap::new());
        let mut conn = self.held.take(&self.pool).await?;
        let carried = self.outbox_deletes.carry();
        let written = params
            .write(Target::Guarded, now, carried.ids(), &mut *conn)
            .await?;
        carried.committed();
        conn.give_back();
        self.remember(params, &written);
        let hits = transitions
            .iter()
            .filter(|t| written.instances.contains(&t.instance.id))
            .count();
        self.states.guessed(hits, transitions.len() - hits);
        Ok(Some(
            transitions
                .into_iter()
                .map(|transition| {
                    if !written.instances.contains(&transition.instance.id) {
                        return None;
                    }
                    let outbox = outbox_rows(&transition, &written.outbox);
                    Some(outbox.map(|outbox| Updated { transition, outbox }))
                })
                .collect(),
        ))
    }

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
            let read: Vec<(Uuid, Json<Plan>)> = sqlx::query_as(sql::PLANS)
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
