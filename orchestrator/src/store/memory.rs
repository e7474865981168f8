//! A [`SagaStore`] in memory: the same contract as the PostgreSQL store, for tests and the
//! deterministic simulation (orchestrator/tests/sim.rs).
//!
//! One mutex is the database: each call is one transaction that either writes all of its
//! [`WriteSet`] or nothing. The write set is the one every store computes
//! ([`WriteSet::of`]); this store only says where its rows go. Outbox rows get the same grace
//! period as in the SQL stores before the relay may take them, and claims lease rows until
//! `now + lease`. Nothing survives the process.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::Duration;
use uuid::Uuid;

use super::write_set::{WriteSet, decide_in_order};
use super::{
    Activity, Created, Decide, Gauges, Idempotency, Latency, ListFilter, LoggedEvent, Minute,
    OLDEST_OPEN, OutboxMessage, Pending, PendingTimer, Position, Pruned, Registration, SagaStore,
    StoreError, StoredDefinition, StoredInstance, StuckStep, Updated,
};
use crate::machine::{Instance, Status, Time, Timer, Transition};

/// How long a new outbox row is left to the process that wrote it before the relay may publish
/// it (as in the SQL stores).
pub const OUTBOX_GRACE: Duration = Duration::seconds(5);

#[derive(Debug, Clone)]
struct Row {
    stored: StoredInstance,
    idempotency: Option<Idempotency>,
}

#[derive(Debug, Default)]
struct Tables {
    instances: BTreeMap<Uuid, Row>,
    events: BTreeMap<Uuid, Vec<LoggedEvent>>,
    /// By (instance, key): (due, timer).
    timers: BTreeMap<(Uuid, String), (Time, Timer)>,
    /// By row id: (available at, written at, row).
    outbox: BTreeMap<i64, (Time, Time, OutboxMessage)>,
    last_outbox_id: i64,
    /// By (name, version).
    definitions: BTreeMap<(String, u32), StoredDefinition>,
    /// By participant.
    breakers: BTreeMap<String, crate::breaker::BreakerState>,
}

impl Tables {
    /// Writes `set` (decided at `now`); the caller has checked it applies. Returns the outbox
    /// rows written.
    fn write(&mut self, set: &WriteSet<'_>, now: Time) -> Result<Vec<OutboxMessage>, StoreError> {
        for s in &set.states {
            let id = s.instance.id;
            let stored_seq = self.instances.get(&id).map_or(0, |r| r.stored.instance.seq);
            if stored_seq != s.decided_on {
                return Err(StoreError::Corrupt(format!(
                    "instance {id} is at seq {stored_seq}, the transition was decided on {}",
                    s.decided_on
                )));
            }
        }
        for e in &set.events {
            let log = self.events.entry(e.instance).or_default();
            if e.seq != log.len() as i64 + 1 {
                return Err(StoreError::Corrupt(format!(
                    "event {} of instance {} after {} events",
                    e.seq,
                    e.instance,
                    log.len()
                )));
            }
            log.push(LoggedEvent {
                seq: e.seq,
                at: now,
                event: e.event.clone(),
            });
        }
        for s in &set.states {
            let row = self.instances.entry(s.instance.id).or_insert_with(|| Row {
                stored: StoredInstance {
                    instance: s.instance.clone(),
                    created_at: now,
                    updated_at: now,
                },
                idempotency: None,
            });
            row.stored.instance = s.instance.clone();
            row.stored.updated_at = now;
        }
        for t in &set.timers {
            let key = (t.instance, t.key.clone());
            match t.set {
                Some(due) => {
                    self.timers.insert(key, due);
                }
                None => {
                    self.timers.remove(&key);
                }
            }
        }
        for (instance, timer) in &set.fired {
            let key = (*instance, timer.key());
            if self.timers.get(&key).is_some_and(|(_, t)| t == timer) {
                self.timers.remove(&key);
            }
        }
        let mut outbox = Vec::with_capacity(set.sends.len());
        for send in &set.sends {
            self.last_outbox_id += 1;
            let row = OutboxMessage {
                id: self.last_outbox_id,
                participant: send.participant.to_owned(),
                command: send.command.clone(),
            };
            self.outbox
                .insert(row.id, (now + OUTBOX_GRACE, now, row.clone()));
            outbox.push(row);
        }
        Ok(outbox)
    }

    fn insert(
        &mut self,
        start: &Transition,
        now: Time,
        idempotency: Option<&Idempotency>,
    ) -> Result<Created, StoreError> {
        let name = &start.instance.plan.name;
        if let Some(idem) = idempotency
            && let Some(existing) = self.instances.values().find(|r| {
                r.stored.instance.plan.name == *name
                    && r.idempotency.as_ref().is_some_and(|i| i.key == idem.key)
            })
        {
            return Ok(Created::Existing {
                id: existing.stored.instance.id,
                same_request: existing
                    .idempotency
                    .as_ref()
                    .is_some_and(|i| i.request == idem.request),
            });
        }
        if self.instances.contains_key(&start.instance.id) {
            return Err(StoreError::Exists(start.instance.id));
        }
        let outbox = self.write(&WriteSet::of([start]), now)?;
        if let Some(row) = self.instances.get_mut(&start.instance.id) {
            row.idempotency = idempotency.cloned();
        }
        Ok(Created::New(outbox))
    }
}

/// A [`SagaStore`] in memory (see the module documentation).
#[derive(Debug, Default)]
pub struct MemoryStore {
    tables: Mutex<Tables>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every instance, in id order.
    pub fn instances(&self) -> Vec<StoredInstance> {
        self.lock()
            .instances
            .values()
            .map(|r| r.stored.clone())
            .collect()
    }

    /// The timers, as (instance, due, timer), in key order.
    pub fn timers(&self) -> Vec<(Uuid, Time, Timer)> {
        self.lock()
            .timers
            .iter()
            .map(|((id, _), (due, t))| (*id, *due, *t))
            .collect()
    }

    /// The outbox rows not deleted yet, in id order.
    pub fn outbox(&self) -> Vec<OutboxMessage> {
        self.lock()
            .outbox
            .values()
            .map(|(_, _, m)| m.clone())
            .collect()
    }
}

/// Whether an instance has finished for good (what retention may delete).
fn finished(status: Status) -> bool {
    matches!(
        status,
        Status::Completed | Status::Compensated | Status::Resolved
    )
}

#[async_trait]
impl SagaStore for MemoryStore {
    async fn create(
        &self,
        start: &Transition,
        now: Time,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        self.lock().insert(start, now, None)?.into_new()
    }

    async fn create_idempotent(
        &self,
        start: &Transition,
        now: Time,
        idempotency: &Idempotency,
    ) -> Result<Created, StoreError> {
        self.lock().insert(start, now, Some(idempotency))
    }

    async fn update(
        &self,
        id: Uuid,
        fired: Option<Timer>,
        now: Time,
        decide: Decide<'_>,
    ) -> Result<Updated, StoreError> {
        let mut tables = self.lock();
        let current: HashMap<Uuid, Instance> = tables
            .instances
            .get(&id)
            .map(|r| (id, r.stored.instance.clone()))
            .into_iter()
            .collect();
        let transition = decide_in_order(&current, [(id, &decide)])
            .pop()
            .unwrap_or(Err(StoreError::NotFound(id)))?;
        let mut set = WriteSet::of([&transition]);
        if let Some(timer) = fired {
            set.fired(id, timer);
        }
        let outbox = tables.write(&set, now)?;
        Ok(Updated { transition, outbox })
    }

    async fn get(&self, id: Uuid) -> Result<Option<StoredInstance>, StoreError> {
        Ok(self.lock().instances.get(&id).map(|r| r.stored.clone()))
    }

    async fn events(&self, id: Uuid) -> Result<Vec<LoggedEvent>, StoreError> {
        Ok(self.lock().events.get(&id).cloned().unwrap_or_default())
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<StoredInstance>, StoreError> {
        let tables = self.lock();
        let mut found: Vec<StoredInstance> = tables
            .instances
            .values()
            .filter(|r| {
                filter
                    .idempotency_key
                    .as_ref()
                    .is_none_or(|k| r.idempotency.as_ref().is_some_and(|i| i.key == *k))
            })
            .map(|r| &r.stored)
            .filter(|s| filter.status.is_none_or(|st| s.instance.status == st))
            .filter(|s| {
                filter
                    .definition
                    .as_ref()
                    .is_none_or(|d| s.instance.plan.name == *d)
            })
            .filter(|s| {
                filter.after.is_none_or(|a| {
                    let p = Position::of(s);
                    (p.created_at, p.id) < (a.created_at, a.id)
                })
            })
            .filter(|s| filter.created_after.is_none_or(|t| s.created_at >= t))
            .filter(|s| filter.created_before.is_none_or(|t| s.created_at < t))
            .cloned()
            .collect();
        found.sort_by_key(|s| std::cmp::Reverse((s.created_at, s.instance.id)));
        found.truncate(filter.limit as usize);
        Ok(found)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn claim_due_timers(
        &self,
        now: Time,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<(Uuid, Timer)>, StoreError> {
        let mut tables = self.lock();
        let mut due: Vec<(Time, (Uuid, String))> = tables
            .timers
            .iter()
            .filter(|(_, (at, _))| *at <= now)
            .map(|(k, (at, _))| (*at, k.clone()))
            .collect();
        due.sort();
        due.truncate(limit.max(0) as usize);
        let mut claimed = Vec::with_capacity(due.len());
        for (_, key) in due {
            if let Some(entry) = tables.timers.get_mut(&key) {
                entry.0 = now + lease;
                claimed.push((key.0, entry.1));
            }
        }
        Ok(claimed)
    }

    async fn claim_outbox(
        &self,
        now: Time,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        let mut tables = self.lock();
        let mut claimed = Vec::new();
        for (available, _, row) in tables.outbox.values_mut() {
            if claimed.len() >= limit.max(0) as usize {
                break;
            }
            if *available <= now {
                *available = now + lease;
                claimed.push(row.clone());
            }
        }
        Ok(claimed)
    }

    async fn register_definition(
        &self,
        definition: &StoredDefinition,
    ) -> Result<Registration, StoreError> {
        let key = (definition.plan.name.clone(), definition.plan.version);
        let mut tables = self.lock();
        let inserted = !tables.definitions.contains_key(&key);
        let stored = tables
            .definitions
            .entry(key)
            .or_insert_with(|| definition.clone())
            .clone();
        Ok(Registration { stored, inserted })
    }

    async fn definitions(&self, name: Option<&str>) -> Result<Vec<StoredDefinition>, StoreError> {
        Ok(self
            .lock()
            .definitions
            .values()
            .filter(|d| name.is_none_or(|n| d.plan.name == n))
            .cloned()
            .collect())
    }

    async fn newest_document_version(&self, name: &str) -> Result<Option<u32>, StoreError> {
        Ok(self
            .lock()
            .definitions
            .values()
            .filter(|d| d.plan.name == name && d.document.is_some())
            .map(|d| d.plan.version)
            .max())
    }

    async fn document_count(&self) -> Result<u64, StoreError> {
        let tables = self.lock();
        Ok(tables
            .definitions
            .values()
            .filter(|d| d.document.is_some())
            .count() as u64)
    }

    async fn sync_breakers(
        &self,
        now: Time,
        outcomes: &[crate::breaker::Outcomes],
        policy: &crate::breaker::BreakerPolicy,
    ) -> Result<Vec<crate::breaker::Synced>, StoreError> {
        let mut tables = self.lock();
        Ok(crate::breaker::sync(
            &mut tables.breakers,
            outcomes,
            now,
            policy,
        ))
    }

    async fn delete_outbox(&self, ids: &[i64]) -> Result<(), StoreError> {
        let mut tables = self.lock();
        for id in ids {
            tables.outbox.remove(id);
        }
        Ok(())
    }

    async fn prune(&self, finished_before: Time, limit: u32) -> Result<Pruned, StoreError> {
        let mut tables = self.lock();
        let mut doomed: Vec<(Time, Uuid)> = tables
            .instances
            .values()
            .filter(|r| finished(r.stored.instance.status) && r.stored.updated_at < finished_before)
            .map(|r| (r.stored.updated_at, r.stored.instance.id))
            .collect();
        doomed.sort();
        doomed.truncate(limit as usize);
        for (_, id) in &doomed {
            tables.instances.remove(id);
            tables.events.remove(id);
            tables.timers.retain(|(i, _), _| i != id);
            tables
                .outbox
                .retain(|_, (_, _, m)| m.command.transaction_id != *id);
        }
        Ok(Pruned::Deleted(doomed.len() as u64))
    }

    async fn activity(&self, since: Time) -> Result<Activity, StoreError> {
        let tables = self.lock();
        let stored = tables.instances.values().map(|r| &r.stored);
        let minute = |t: Time| t.timestamp().div_euclid(60);
        let mut rows = Vec::new();
        let mut took = Vec::new();
        for s in stored.clone() {
            if s.created_at >= since {
                rows.push((minute(s.created_at), "started".to_owned(), 1));
            }
            let status = s.instance.status;
            if s.updated_at >= since && (status.is_terminal() || status == Status::Stuck) {
                rows.push((minute(s.updated_at), status.as_str().to_owned(), 1));
                if status.is_terminal() {
                    took.push(s.updated_at - s.created_at);
                }
            }
        }
        let mut open: Vec<StoredInstance> = stored
            .filter(|s| !s.instance.status.is_terminal())
            .cloned()
            .collect();
        open.sort_by_key(|s| (s.created_at, s.instance.id));
        open.truncate(OLDEST_OPEN as usize);
        Ok(Activity {
            minutes: Minute::fold(rows)?,
            latency: Latency::of(took),
            oldest_open: open,
        })
    }

    async fn gauges(&self, now: Time) -> Result<Gauges, StoreError> {
        let tables = self.lock();
        let mut gauges = Gauges::default();
        let open = (tables.instances.values())
            .map(|r| &r.stored)
            .filter(|s| !s.instance.status.is_terminal());
        for stored in open.clone() {
            let status = stored.instance.status;
            match gauges.open.iter_mut().find(|(s, _)| *s == status) {
                Some((_, n)) => *n += 1,
                None => gauges.open.push((status, 1)),
            }
        }
        gauges.oldest_open = open.map(|s| s.created_at).min();
        gauges.outbox_rows = tables.outbox.len() as u64;
        gauges.oldest_outbox = tables.outbox.values().map(|(_, written, _)| *written).min();
        let due = tables
            .timers
            .values()
            .map(|(at, _)| *at)
            .filter(|at| *at <= now);
        gauges.timers_due = due.clone().count() as u64;
        gauges.oldest_due_timer = due.min();
        Ok(gauges)
    }

    async fn in_flight(&self, id: Uuid) -> Result<Pending, StoreError> {
        let tables = self.lock();
        let mut timers: Vec<PendingTimer> = (tables.timers.iter())
            .filter(|((i, _), _)| *i == id)
            .map(|(_, (due_at, timer))| PendingTimer {
                due_at: *due_at,
                timer: *timer,
            })
            .collect();
        timers.sort_by_key(|t| t.due_at);
        let outbox_rows = (tables.outbox.values())
            .filter(|(_, _, m)| m.command.transaction_id == id)
            .count() as u64;
        Ok(Pending {
            outbox_rows,
            timers,
        })
    }

    async fn stuck_steps(&self) -> Result<Vec<StuckStep>, StoreError> {
        let tables = self.lock();
        let mut stuck: Vec<&StoredInstance> = (tables.instances.values())
            .map(|r| &r.stored)
            .filter(|s| s.instance.status == Status::Stuck)
            .collect();
        stuck.sort_by_key(|s| (s.updated_at, s.instance.id));
        Ok(stuck.into_iter().flat_map(StuckStep::of).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Definition;
    use crate::machine::{self, Input};
    use chrono::{TimeZone, Utc};
    use sagas_participant::protocol::{Operation, Outcome, Reply};
    use serde_json::json;

    #[tokio::test]
    async fn a_definition_is_stored_once_and_the_first_one_stays() {
        let store = MemoryStore::new();
        let first = StoredDefinition {
            plan: (**definition().plan()).clone(),
            document: None,
        };
        let registered = store.register_definition(&first).await.unwrap();
        assert_eq!(
            (registered.stored, registered.inserted),
            (first.clone(), true)
        );
        let mut second = first.clone();
        second.plan.steps[0].timeout_ms += 1;
        let registered = store.register_definition(&second).await.unwrap();
        assert_eq!(
            (registered.stored, registered.inserted),
            (first.clone(), false)
        );
        assert_eq!(store.definitions(Some("d")).await.unwrap(), vec![first]);
        assert!(store.definitions(Some("e")).await.unwrap().is_empty());
    }

    fn definition() -> Definition {
        Definition::saga::<serde_json::Value>("d", 1)
            .step("a", "p", |s| s.command(|_, _| json!({})))
            .step("b", "q", |s| s.command(|_, _| json!({})))
            .build()
            .unwrap()
    }

    fn at(seconds: i64) -> Time {
        Utc.timestamp_opt(1_800_000_000 + seconds, 0).unwrap()
    }

    fn decide(def: &Definition, input: Input, now: Time) -> Decide<'_> {
        Box::new(move |i: &Instance| Ok(machine::handle(i, input.clone(), now, def)?))
    }

    fn succeeded(id: Uuid, step: &str) -> Input {
        Input::Reply(Reply {
            protocol: 1,
            transaction_id: id,
            step: step.into(),
            operation: Operation::Action,
            attempt: 1,
            outcome: Outcome::succeeded(json!(null)),
        })
    }

    #[tokio::test]
    async fn the_gauges_count_open_instances_outbox_rows_and_due_timers_and_not_finished_ones() {
        let (store, def) = (MemoryStore::new(), definition());
        assert_eq!(store.gauges(at(0)).await.unwrap(), Gauges::default());
        let (open, done) = (Uuid::now_v7(), Uuid::now_v7());
        for (id, t) in [(open, at(0)), (done, at(1))] {
            let start = machine::start(id, (**def.plan()).clone(), json!({}), t, &def);
            store.create(&start, t).await.unwrap();
        }
        for step in ["a", "b"] {
            let input = succeeded(done, step);
            store
                .update(done, None, at(2), decide(&def, input, at(2)))
                .await
                .unwrap();
        }
        let (_, due, _) = store.timers()[0];
        let gauges = store.gauges(due).await.unwrap();
        assert_eq!(gauges.open, vec![(Status::Running, 1)]);
        assert_eq!(gauges.oldest_open, Some(at(0)));
        assert_eq!((gauges.outbox_rows, gauges.oldest_outbox), (3, Some(at(0))));
        assert_eq!((gauges.timers_due, gauges.oldest_due_timer), (1, Some(due)));
        let early = store.gauges(at(0)).await.unwrap();
        assert_eq!((early.timers_due, early.oldest_due_timer), (0, None));
    }

    #[tokio::test]
    async fn activity_counts_starts_and_finishes_by_minute_since_a_time_and_the_oldest_open() {
        let (store, def) = (MemoryStore::new(), definition());
        let (open, done) = (Uuid::now_v7(), Uuid::now_v7());
        for (id, t) in [(open, at(0)), (done, at(61))] {
            let start = machine::start(id, (**def.plan()).clone(), json!({}), t, &def);
            store.create(&start, t).await.unwrap();
        }
        for step in ["a", "b"] {
            let input = succeeded(done, step);
            store
                .update(done, None, at(125), decide(&def, input, at(125)))
                .await
                .unwrap();
        }
        let counts = |a: &Activity| -> Vec<(i64, u64, u64)> {
            a.minutes
                .iter()
                .map(|m| ((m.at - at(0)).num_minutes(), m.started, m.finished))
                .collect()
        };
        let all = store.activity(at(0)).await.unwrap();
        assert_eq!(counts(&all), vec![(0, 1, 0), (1, 1, 0), (2, 0, 1)]);
        let latency = all.latency.unwrap();
        assert_eq!((latency.count, latency.p99), (1, Duration::seconds(64)));
        assert_eq!(
            all.oldest_open
                .iter()
                .map(|s| s.instance.id)
                .collect::<Vec<_>>(),
            vec![open]
        );
        let late = store.activity(at(100)).await.unwrap();
        assert_eq!(counts(&late), vec![(2, 0, 1)]);
    }

    #[tokio::test]
    async fn a_start_and_an_update_write_log_projection_timers_and_outbox_together() {
        let (store, def) = (MemoryStore::new(), definition());
        let id = Uuid::now_v7();
        let start = machine::start(id, (**def.plan()).clone(), json!({}), at(0), &def);
        let outbox = store.create(&start, at(0)).await.unwrap();
        assert_eq!(outbox.len(), 1);
        assert!(matches!(
            store.create(&start, at(0)).await,
            Err(StoreError::Exists(e)) if e == id
        ));
        let updated = store
            .update(id, None, at(1), decide(&def, succeeded(id, "a"), at(1)))
            .await
            .unwrap();
        assert_eq!(updated.outbox[0].participant, "q");
        let stored = store.get(id).await.unwrap().unwrap();
        assert_eq!(stored.instance, updated.transition.instance);
        assert_eq!((stored.created_at, stored.updated_at), (at(0), at(1)));
        let events = store.events(id).await.unwrap();
        let replayed = machine::replay(events.iter().map(|e| &e.event));
        assert_eq!(replayed.as_ref(), Some(&stored.instance));
        assert_eq!(
            store.timers().len(),
            1,
            "step a's deadline went, step b's came"
        );
        assert_eq!(store.outbox().len(), 2);
    }

    #[tokio::test]
    async fn claims_lease_what_is_due_and_outbox_rows_wait_their_grace_period() {
        let (store, def) = (MemoryStore::new(), definition());
        let id = Uuid::now_v7();
        let start = machine::start(id, (**def.plan()).clone(), json!({}), at(0), &def);
        store.create(&start, at(0)).await.unwrap();
        let lease = Duration::seconds(30);
        assert!(
            store
                .claim_outbox(at(1), 10, lease)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.claim_outbox(at(5), 10, lease).await.unwrap().len(), 1);
        assert!(
            store
                .claim_outbox(at(6), 10, lease)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            store
                .claim_due_timers(at(1), 10, lease)
                .await
                .unwrap()
                .is_empty()
        );
        let due = store.claim_due_timers(at(10), 10, lease).await.unwrap();
        assert_eq!(due.len(), 1);
        assert!(
            store
                .claim_due_timers(at(11), 10, lease)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            store.claim_due_timers(at(40), 10, lease).await.unwrap(),
            due
        );
        let ids: Vec<i64> = store.outbox().iter().map(|m| m.id).collect();
        store.delete_outbox(&ids).await.unwrap();
        assert!(store.outbox().is_empty());
    }

    #[tokio::test]
    async fn an_idempotency_key_names_the_first_instance_and_whether_the_request_matches() {
        let (store, def) = (MemoryStore::new(), definition());
        let key = |request| Idempotency {
            key: "k".into(),
            request,
        };
        let first = machine::start(
            Uuid::now_v7(),
            (**def.plan()).clone(),
            json!({}),
            at(0),
            &def,
        );
        let second = machine::start(
            Uuid::now_v7(),
            (**def.plan()).clone(),
            json!({}),
            at(0),
            &def,
        );
        let created = store
            .create_idempotent(&first, at(0), &key(json!(1)))
            .await
            .unwrap();
        assert!(matches!(created, Created::New(_)));
        let again = store
            .create_idempotent(&second, at(1), &key(json!(1)))
            .await
            .unwrap();
        assert_eq!(
            again,
            Created::Existing {
                id: first.instance.id,
                same_request: true
            }
        );
        let other = store
            .create_idempotent(&second, at(1), &key(json!(2)))
            .await
            .unwrap();
        assert!(matches!(
            other,
            Created::Existing {
                same_request: false,
                ..
            }
        ));
        assert_eq!(store.instances().len(), 1);
    }
}
