//! Plans stored once (`sagas_plans`), and the instance state as its row stores it: without
//! the plan, which the row's `plan_id` names (migration `0004_plans.sql`).
//!
//! A plan is about half of an instance's state and the same for every instance of a version;
//! written into every projection row it was rewritten, parsed and compressed by PostgreSQL
//! with every transition, and serialized and parsed here.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::definition::Plan;
use crate::machine::{Event, Instance, Phase, Status, StepState, Time};

/// The id of `plan`: its fingerprint, the same for equal plans in every process.
pub(super) fn plan_id(plan: &Plan) -> Uuid {
    plan.fingerprint()
}

/// An instance's state as its row stores it: every field of [`Instance`] but the plan.
#[derive(Serialize)]
pub(super) struct StateRef<'a> {
    id: Uuid,
    input: &'a Value,
    status: &'a Status,
    phase: &'a Phase,
    steps: &'a [StepState],
    #[serde(skip_serializing_if = "Option::is_none")]
    failure: &'a Option<String>,
    seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    deadline: &'a Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: &'a Option<String>,
}

impl<'a> From<&'a Instance> for StateRef<'a> {
    fn from(instance: &'a Instance) -> Self {
        // Destructured field by field: a field added to `Instance` fails to compile here until
        // it is stored too.
        let Instance {
            id,
            plan: _,
            input,
            status,
            phase,
            steps,
            failure,
            seq,
            deadline,
            traceparent,
        } = instance;
        StateRef {
            id: *id,
            input,
            status,
            phase,
            steps,
            failure,
            seq: *seq,
            deadline,
            traceparent,
        }
    }
}

/// An event as its row stores it: a `started` event without its plan (which the row's
/// `plan_id` names), every other event whole.
pub(super) enum EventBody<'a> {
    Started(StartedRef<'a>),
    Other(&'a Event),
}

/// [`Event::Started`] without the plan.
#[derive(Serialize)]
#[serde(tag = "kind", rename = "started")]
pub(super) struct StartedRef<'a> {
    id: &'a Uuid,
    input: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    deadline: &'a Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: &'a Option<String>,
}

impl<'a> EventBody<'a> {
    /// The body of `event`, and the plan it leaves out, if any.
    pub(super) fn of(event: &'a Event) -> (EventBody<'a>, Option<&'a Plan>) {
        match event {
            // Destructured field by field, as in `StateRef`.
            Event::Started {
                id,
                plan,
                input,
                deadline,
                traceparent,
            } => {
                let body = StartedRef {
                    id,
                    input,
                    deadline,
                    traceparent,
                };
                (EventBody::Started(body), Some(plan))
            }
            other => (EventBody::Other(other), None),
        }
    }
}

impl Serialize for EventBody<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            EventBody::Started(started) => started.serialize(serializer),
            EventBody::Other(event) => event.serialize(serializer),
        }
    }
}

/// A row's state as read: with the plan in it (rows written before `sagas_plans`) or without.
#[derive(Deserialize)]
pub(super) struct StoredState {
    id: Uuid,
    #[serde(default)]
    plan: Option<Plan>,
    input: Value,
    status: Status,
    phase: Phase,
    steps: Vec<StepState>,
    #[serde(default)]
    failure: Option<String>,
    seq: u64,
    #[serde(default)]
    deadline: Option<Time>,
    #[serde(default)]
    traceparent: Option<String>,
}

impl StoredState {
    /// Whether the row carries its plan itself.
    pub(super) fn has_plan(&self) -> bool {
        self.plan.is_some()
    }

    /// The instance, with `plan` unless the row carried its own.
    pub(super) fn into_instance(self, plan: Option<&Plan>) -> Option<Instance> {
        let StoredState {
            id,
            plan: own,
            input,
            status,
            phase,
            steps,
            failure,
            seq,
            deadline,
            traceparent,
        } = self;
        let plan = own.or_else(|| plan.cloned())?;
        Some(Instance {
            id,
            plan,
            input,
            status,
            phase,
            steps,
            failure,
            seq,
            deadline,
            traceparent,
        })
    }
}

/// A plan row to write.
#[derive(Serialize)]
pub(super) struct PlanRow {
    pub(super) i: Uuid,
    pub(super) plan: Arc<Plan>,
}

/// The plans this process has met, by id and by name and version, and which of them it knows
/// to be stored (a statement that committed wrote or found their row).
#[derive(Debug, Default)]
pub(super) struct Plans {
    inner: Mutex<Known>,
}

/// Plans (and their ids) by definition name.
type ByName = HashMap<String, Vec<(Arc<Plan>, Uuid)>>;

#[derive(Debug, Default)]
struct Known {
    by_id: HashMap<Uuid, Arc<Plan>>,
    by_name: ByName,
    stored: HashSet<Uuid>,
}

impl Known {
    fn add(&mut self, id: Uuid, plan: Arc<Plan>) {
        if self.by_id.insert(id, plan.clone()).is_none() {
            self.by_name
                .entry(plan.name.clone())
                .or_default()
                .push((plan, id));
        }
    }
}

impl Plans {
    /// The id of `plan`, and its row if it may not be stored yet (the statement that names the
    /// plan then writes it too, `ON CONFLICT DO NOTHING`). Equal plans are found by comparison,
    /// so a plan is serialized and hashed once per process.
    pub(super) fn id_of(&self, plan: &Plan) -> (Uuid, Option<PlanRow>) {
        let mut known = self.inner.lock().expect("plans lock");
        let found = known
            .by_name
            .get(&plan.name)
            .and_then(|plans| plans.iter().find(|(p, _)| **p == *plan))
            .map(|(p, id)| (p.clone(), *id));
        let (plan, id) = match found {
            Some(found) => found,
            None => {
                let id = plan_id(plan);
                let plan = Arc::new(plan.clone());
                known.add(id, plan.clone());
                (plan, id)
            }
        };
        let row = (!known.stored.contains(&id)).then_some(PlanRow { i: id, plan });
        (id, row)
    }

    /// Notes that the plans `ids` are stored (their statement committed).
    pub(super) fn stored(&self, ids: impl IntoIterator<Item = Uuid>) {
        let mut known = self.inner.lock().expect("plans lock");
        known.stored.extend(ids);
    }

    /// The plan `id`, if this process knows it.
    pub(super) fn get(&self, id: &Uuid) -> Option<Arc<Plan>> {
        self.inner
            .lock()
            .expect("plans lock")
            .by_id
            .get(id)
            .cloned()
    }

    /// Adds plans read from `sagas_plans` (so stored).
    pub(super) fn loaded(&self, plans: impl IntoIterator<Item = (Uuid, Plan)>) {
        let mut known = self.inner.lock().expect("plans lock");
        for (id, plan) in plans {
            known.add(id, Arc::new(plan));
            known.stored.insert(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::{Mode, RetryPolicy, StepPlan};

    fn plan(timeout_ms: u64) -> Plan {
        Plan {
            name: "transfer".into(),
            version: 1,
            mode: Mode::Saga,
            steps: vec![StepPlan {
                name: "debit".into(),
                participant: "bank".into(),
                retry: RetryPolicy::FORWARD,
                finish_retry: RetryPolicy::FORWARD,
                timeout_ms,
                in_progress_timeout_ms: 1_000,
                after: None,
                signal: None,
            }],
        }
    }

    #[test]
    fn equal_plans_have_one_id_and_different_plans_another() {
        assert_eq!(plan_id(&plan(10)), plan_id(&plan(10)));
        assert_ne!(plan_id(&plan(10)), plan_id(&plan(11)));
    }

    #[test]
    fn a_plan_row_is_written_until_its_statement_committed() {
        let plans = Plans::default();
        let (id, row) = plans.id_of(&plan(10));
        assert_eq!(id, plan_id(&plan(10)));
        assert_eq!(row.map(|r| r.i), Some(id));
        let (again, row) = plans.id_of(&plan(10));
        assert_eq!(again, id);
        assert!(row.is_some(), "not known to be stored yet");
        plans.stored([id]);
        assert!(plans.id_of(&plan(10)).1.is_none());
        let (other, row) = plans.id_of(&plan(11));
        assert_ne!(other, id);
        assert!(row.is_some());
        assert_eq!(plans.get(&id).as_deref(), Some(&plan(10)));
    }

    #[test]
    fn a_started_event_is_stored_without_its_plan_and_reads_back_with_it() {
        let started = Event::Started {
            id: Uuid::now_v7(),
            plan: plan(10),
            input: serde_json::json!({"amount": 5}),
            deadline: None,
            traceparent: Some("00-abc-def-01".into()),
        };
        let (body, left_out) = EventBody::of(&started);
        assert_eq!(left_out, Some(&plan(10)));
        let mut stored = serde_json::to_value(&body).unwrap();
        assert_eq!(stored["kind"], "started");
        assert!(stored.get("plan").is_none());
        // What the view sagas_event_bodies does: body || {"plan": plan}.
        stored["plan"] = serde_json::to_value(plan(10)).unwrap();
        assert_eq!(serde_json::from_value::<Event>(stored).unwrap(), started);

        let other = Event::Finished {
            status: Status::Completed,
        };
        let (body, left_out) = EventBody::of(&other);
        assert!(left_out.is_none());
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            serde_json::to_value(&other).unwrap()
        );
    }

    #[test]
    fn a_state_is_stored_without_the_fields_at_their_defaults_and_reads_back_whole() {
        let mut instance = crate::machine::replay(&[Event::Started {
            id: Uuid::now_v7(),
            plan: plan(10),
            input: serde_json::json!({"amount": 5}),
            deadline: None,
            traceparent: None,
        }])
        .unwrap();
        instance.steps[0].attempt = 2;
        instance.steps[0].output = Some(serde_json::json!({"ok": true}));
        let stored = serde_json::to_value(StateRef::from(&instance)).unwrap();
        assert!(stored.get("failure").is_none(), "{stored}");
        let step = stored["steps"][0].as_object().unwrap();
        let mut keys: Vec<&str> = step.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["attempt", "output", "status"]);
        let read: StoredState = serde_json::from_value(stored).unwrap();
        assert_eq!(read.into_instance(Some(&plan(10))), Some(instance.clone()));

        // A state stored before the defaults were left out reads back the same.
        let mut full = serde_json::to_value(StateRef::from(&instance)).unwrap();
        full["failure"] = Value::Null;
        full["steps"][0] = serde_json::json!({
            "status": "pending", "attempt": 2, "budget_from": 0, "waiting": {"for": "nothing"},
            "payload": null, "output": {"ok": true}, "last_error": null, "stuck": false,
            "in_progress": false
        });
        let read: StoredState = serde_json::from_value(full).unwrap();
        assert_eq!(read.into_instance(Some(&plan(10))), Some(instance));
    }

    #[test]
    fn plans_read_from_the_table_are_known_to_be_stored() {
        let plans = Plans::default();
        let id = plan_id(&plan(12));
        plans.loaded([(id, plan(12))]);
        let (got, row) = plans.id_of(&plan(12));
        assert_eq!(got, id);
        assert!(row.is_none());
    }
}
