//! What a store writes for a batch of transitions: one value, built in one place.
//!
//! Every store turns decided transitions into the same four kinds of rows: the events appended
//! to the log, the last projection of every instance that changed, the final state of every
//! timer key touched, and the commands for the outbox. [`WriteSet`] computes them once, so a
//! new [`Effect`] or a new column is added here and in the statement that writes it, not in
//! every path that writes.

use std::collections::{BTreeMap, HashMap};

use uuid::Uuid;

use super::{Decide, StoreError};
use crate::machine::{Effect, Event, Instance, Time, Timer, Transition};
use sagas_participant::protocol::Command;

/// An event to append, at its position in its instance's log.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EventWrite<'t> {
    pub instance: Uuid,
    /// Its position in the log, from 1.
    pub seq: i64,
    pub event: &'t Event,
}

/// The projection of an instance after the batch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StateWrite<'t> {
    /// The state after the instance's last transition in the batch.
    pub instance: &'t Instance,
    /// The `seq` its first transition in the batch was decided on (0 for a new instance): a
    /// guarded write checks that the stored row is still there.
    pub decided_on: u64,
}

/// The final state of one timer key.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TimerWrite {
    pub instance: Uuid,
    pub key: String,
    /// Set to (due, timer); `None` deletes it.
    pub set: Option<(Time, Timer)>,
}

/// A command for the outbox.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SendWrite<'t> {
    pub instance: Uuid,
    pub participant: &'t str,
    pub command: &'t Command,
}

/// Everything a batch of transitions writes, borrowed from the transitions.
#[derive(Debug, Default)]
pub(crate) struct WriteSet<'t> {
    /// Events, in the order of the transitions.
    pub events: Vec<EventWrite<'t>>,
    /// One per instance whose transitions appended events, in order of first appearance.
    pub states: Vec<StateWrite<'t>>,
    /// The final state of every timer key touched, by instance and key.
    pub timers: Vec<TimerWrite>,
    /// Timers that fired, to delete if the stored row is still the one that fired. Only for
    /// keys the transitions did not touch themselves (a statement must not touch a row twice).
    pub fired: Vec<(Uuid, Timer)>,
    /// Commands for the outbox, in the order of the transitions.
    pub sends: Vec<SendWrite<'t>>,
}

impl<'t> WriteSet<'t> {
    /// The write set of `transitions`, in order; several for one instance apply in order, each
    /// on the state the previous one left (only the last state, and the last effect on each
    /// timer key, are written).
    pub fn of(transitions: impl IntoIterator<Item = &'t Transition>) -> WriteSet<'t> {
        let mut set = WriteSet::default();
        let mut latest: HashMap<Uuid, usize> = HashMap::new();
        let mut timers: BTreeMap<(Uuid, String), Option<(Time, Timer)>> = BTreeMap::new();
        for t in transitions {
            let id = t.instance.id;
            let first = t.instance.seq as i64 - t.events.len() as i64 + 1;
            set.events
                .extend(t.events.iter().enumerate().map(|(n, event)| EventWrite {
                    instance: id,
                    seq: first + n as i64,
                    event,
                }));
            if !t.events.is_empty() {
                match latest.get(&id) {
                    Some(&at) => set.states[at].instance = &t.instance,
                    None => {
                        latest.insert(id, set.states.len());
                        set.states.push(StateWrite {
                            instance: &t.instance,
                            decided_on: t.instance.seq - t.events.len() as u64,
                        });
                    }
                }
            }
            // Only the last effect on each timer key counts.
            for effect in &t.effects {
                match effect {
                    Effect::Send {
                        participant,
                        command,
                    } => set.sends.push(SendWrite {
                        instance: id,
                        participant,
                        command,
                    }),
                    Effect::SetTimer { at, timer } => {
                        timers.insert((id, timer.key()), Some((*at, *timer)));
                    }
                    Effect::CancelTimer { key } => {
                        timers.insert((id, key.clone()), None);
                    }
                    // For the engine's trace spans, after the commit.
                    Effect::AttemptEnded { .. } => {}
                }
            }
        }
        set.timers = timers
            .into_iter()
            .map(|((instance, key), set)| TimerWrite { instance, key, set })
            .collect();
        set
    }

    /// Adds the delete of a timer of `instance` that fired, unless the transitions set or
    /// delete its key themselves.
    pub fn fired(&mut self, instance: Uuid, timer: Timer) {
        let key = timer.key();
        if !self
            .timers
            .iter()
            .any(|t| t.instance == instance && t.key == key)
        {
            self.fired.push((instance, timer));
        }
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.timers.is_empty()
            && self.fired.is_empty()
            && self.sends.is_empty()
    }
}

/// Decides `items` in order on the `stored` states: each decision sees the state the previous
/// decisions for its instance left. An instance not in `stored` is [`StoreError::NotFound`];
/// a failed decision is that item's error and leaves the state as it was.
pub(crate) fn decide_in_order<'d>(
    stored: &HashMap<Uuid, Instance>,
    items: impl IntoIterator<Item = (Uuid, &'d Decide<'d>)>,
) -> Vec<Result<Transition, StoreError>> {
    let mut results: Vec<Result<Transition, StoreError>> = Vec::new();
    // Where in `results` each instance's latest transition is.
    let mut latest: HashMap<Uuid, usize> = HashMap::new();
    for (id, decide) in items {
        let current = match latest.get(&id) {
            Some(&at) => results[at].as_ref().ok().map(|t| &t.instance),
            None => stored.get(&id),
        };
        let result = match current {
            Some(current) => decide(current),
            None => Err(StoreError::NotFound(id)),
        };
        if result.is_ok() {
            latest.insert(id, results.len());
        }
        results.push(result);
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Definition;
    use crate::machine::{self, Input, TimerKind};
    use chrono::Utc;
    use sagas_participant::protocol::{Operation, Outcome, Reply};
    use serde_json::json;

    fn definition() -> Definition {
        Definition::saga::<serde_json::Value>("d", 1)
            .step("a", "p", |s| s.command(|_, _| json!({"n": 1})))
            .step("b", "q", |s| s.command(|_, _| json!({"n": 2})))
            .build()
            .unwrap()
    }

    fn started(def: &Definition) -> Transition {
        let plan = (**def.plan()).clone();
        machine::start(Uuid::now_v7(), plan, json!({}), Utc::now(), def)
    }

    fn succeeded(instance: &Instance, step: &str) -> Input {
        Input::Reply(Reply {
            protocol: 1,
            transaction_id: instance.id,
            step: step.into(),
            operation: Operation::Action,
            attempt: 1,
            outcome: Outcome::succeeded(json!(null)),
        })
    }

    fn decide(def: &Definition, instance: &Instance, input: Input) -> Transition {
        machine::handle(instance, input, Utc::now(), def).unwrap()
    }

    #[test]
    fn a_start_writes_its_events_from_one_its_state_its_command_and_its_timer() {
        let def = definition();
        let start = started(&def);
        let set = WriteSet::of([&start]);
        let seqs: Vec<i64> = set.events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=start.events.len() as i64).collect::<Vec<_>>());
        assert_eq!(set.states.len(), 1);
        assert_eq!(set.states[0].decided_on, 0);
        assert_eq!(set.states[0].instance.seq, start.instance.seq);
        assert_eq!(set.sends.len(), 1);
        assert_eq!(set.sends[0].participant, "p");
        assert_eq!(set.timers.len(), 1);
        assert!(set.timers[0].set.is_some());
        assert!(!set.is_empty());
    }

    #[test]
    fn two_transitions_of_one_instance_write_its_last_state_and_the_last_effect_on_each_key() {
        let def = definition();
        let start = started(&def);
        let first = decide(&def, &start.instance, succeeded(&start.instance, "a"));
        let second = decide(&def, &first.instance, succeeded(&first.instance, "b"));
        let set = WriteSet::of([&first, &second]);
        assert_eq!(set.states.len(), 1, "one projection per instance");
        assert_eq!(set.states[0].instance.seq, second.instance.seq);
        assert_eq!(set.states[0].decided_on, start.instance.seq);
        let seqs: Vec<i64> = set.events.iter().map(|e| e.seq).collect();
        let expected: Vec<i64> =
            (start.instance.seq as i64 + 1..=second.instance.seq as i64).collect();
        assert_eq!(seqs, expected, "gapless, in order");
        // Step b's deadline was set by the first and cancelled by the second: only the cancel
        // is written, and each key once.
        let key = |step: usize| {
            Timer {
                step,
                kind: TimerKind::Deadline,
                operation: Operation::Action,
                attempt: 1,
            }
            .key()
        };
        let written: Vec<(&str, bool)> = set
            .timers
            .iter()
            .map(|t| (t.key.as_str(), t.set.is_some()))
            .collect();
        assert_eq!(
            written,
            [(key(0).as_str(), false), (key(1).as_str(), false)]
        );
    }

    #[test]
    fn a_fired_timer_is_deleted_only_when_the_transitions_leave_its_key_alone() {
        let def = definition();
        let start = started(&def);
        let deadline = |step: usize| Timer {
            step,
            kind: TimerKind::Deadline,
            operation: Operation::Action,
            attempt: 1,
        };
        let mut set = WriteSet::of([&start]);
        set.fired(start.instance.id, deadline(0));
        assert!(set.fired.is_empty(), "the start sets step a's timer itself");
        set.fired(start.instance.id, deadline(1));
        assert_eq!(set.fired, [(start.instance.id, deadline(1))]);
    }

    #[test]
    fn a_transition_without_events_writes_no_projection() {
        let def = definition();
        let start = started(&def);
        let nothing = Transition {
            instance: start.instance.clone(),
            events: Vec::new(),
            effects: Vec::new(),
        };
        let set = WriteSet::of([&nothing]);
        assert!(set.states.is_empty());
        assert!(set.is_empty());
    }

    #[test]
    fn decisions_in_order_see_the_previous_ones_and_a_failed_one_changes_nothing() {
        let def = definition();
        let start = started(&def);
        let id = start.instance.id;
        let stored = HashMap::from([(id, start.instance.clone())]);
        let seen = std::sync::Mutex::new(Vec::new());
        let record: Decide<'_> = Box::new(|i: &Instance| {
            seen.lock().unwrap().push(i.seq);
            let t = machine::handle(i, succeeded(i, "a"), Utc::now(), &def)?;
            Ok(t)
        });
        let refuse: Decide<'_> = Box::new(|i: &Instance| {
            seen.lock().unwrap().push(i.seq);
            Err(StoreError::Corrupt("refused".into()))
        });
        let unknown = Uuid::now_v7();
        let results = decide_in_order(
            &stored,
            [
                (id, &record),
                (id, &refuse),
                (id, &record),
                (unknown, &record),
            ],
        );
        assert!(results[0].is_ok());
        assert!(matches!(results[1], Err(StoreError::Corrupt(_))));
        assert!(results[2].is_ok());
        assert!(matches!(results[3], Err(StoreError::NotFound(u)) if u == unknown));
        let after_first = results[0].as_ref().unwrap().instance.seq;
        assert_eq!(
            *seen.lock().unwrap(),
            [start.instance.seq, after_first, after_first],
            "the refused decision left the state of the first"
        );
    }
}
