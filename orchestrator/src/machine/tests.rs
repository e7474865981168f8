//! Unit tests of each transition. Every transition is also replayed from its log and compared.

use super::retry::jitter_unit;
use super::*;
use crate::definition::{RetryPolicy, StepPlan};
use chrono::{TimeZone, Utc};
use sagas_participant::protocol::Outcome;
use serde_json::json;

pub(crate) fn plan(mode: Mode, steps: usize) -> Plan {
    Plan {
        name: "test".into(),
        version: 1,
        mode,
        steps: (0..steps)
            .map(|i| StepPlan {
                name: format!("s{i}"),
                participant: format!("p{i}"),
                retry: RetryPolicy::exponential(
                    3,
                    std::time::Duration::from_millis(100),
                    std::time::Duration::from_millis(1000),
                ),
                finish_retry: RetryPolicy::exponential(
                    2,
                    std::time::Duration::from_millis(100),
                    std::time::Duration::from_millis(1000),
                ),
                timeout_ms: 1000,
                in_progress_timeout_ms: 60_000,
                after: None,
                signal: None,
            })
            .collect(),
    }
}

/// Commands that echo the step index and the outputs so far.
pub(crate) struct Echo;

impl Commands for Echo {
    fn command(&self, step: usize, input: &Value, outputs: &Outputs<'_>) -> Result<Value, String> {
        let prev = if step == 0 {
            Value::Null
        } else {
            outputs
                .get(&format!("s{}", step - 1))
                .cloned()
                .unwrap_or(Value::Null)
        };
        if input.get("fail_prepare") == Some(&json!(step)) {
            return Err("cannot compute".into());
        }
        Ok(json!({"step": step, "prev": prev}))
    }
}

fn t0() -> Time {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
}

/// A running instance plus its whole log, checking replay after every transition.
struct Run {
    inst: Instance,
    log: Vec<Event>,
    now: Time,
    last: Vec<Effect>,
}

impl Run {
    fn start(mode: Mode, steps: usize) -> Run {
        Run::start_with(mode, steps, json!({}))
    }

    fn start_with(mode: Mode, steps: usize, input: Value) -> Run {
        Run::from_start(start(
            Uuid::from_u128(7),
            plan(mode, steps),
            input,
            t0(),
            &Echo,
        ))
    }

    /// A run from the transition that started the instance at `t0`.
    fn from_start(t: Transition) -> Run {
        let mut run = Run {
            inst: t.instance.clone(),
            log: Vec::new(),
            now: t0(),
            last: Vec::new(),
        };
        run.absorb(t);
        run
    }

    fn absorb(&mut self, t: Transition) {
        self.log.extend(t.events.iter().cloned());
        self.inst = t.instance;
        self.last = t.effects;
        assert_eq!(self.inst.seq, self.log.len() as u64);
        assert_eq!(
            replay(&self.log).as_ref(),
            Some(&self.inst),
            "replay differs"
        );
    }

    fn input(&mut self, input: Input) -> Result<(), Rejected> {
        self.input_with(input, &Closed)
    }

    /// [`Run::input`] with what the participants' breakers say.
    fn input_with(&mut self, input: Input, breakers: &dyn Breakers) -> Result<(), Rejected> {
        let t = handle_with(&self.inst, input, self.now, &Echo, breakers)?;
        self.absorb(t);
        Ok(())
    }

    fn reply(&mut self, step: usize, op: Operation, attempt: u32, outcome: Outcome) {
        self.reply_with(step, op, attempt, outcome, &Closed);
    }

    /// [`Run::reply`] with what the participants' breakers say.
    fn reply_with(
        &mut self,
        step: usize,
        op: Operation,
        attempt: u32,
        outcome: Outcome,
        breakers: &dyn Breakers,
    ) {
        let reply = Reply {
            protocol: PROTOCOL_VERSION,
            transaction_id: self.inst.id,
            step: format!("s{step}"),
            operation: op,
            attempt,
            outcome,
        };
        self.input_with(Input::Reply(reply), breakers).unwrap();
    }

    fn ok(&mut self, step: usize, op: Operation) {
        let attempt = self.inst.steps[step].attempt;
        self.reply(step, op, attempt, Outcome::succeeded(json!({"out": step})));
    }

    /// Fires the timer of `step` that the last transition set, advancing the clock to it.
    fn fire(&mut self, step: usize) {
        self.fire_with(step, &Closed);
    }

    /// [`Run::fire`] with what the participants' breakers say.
    fn fire_with(&mut self, step: usize, breakers: &dyn Breakers) {
        let (at, timer) = self
            .last
            .iter()
            .find_map(|e| match e {
                Effect::SetTimer { at, timer } if timer.step == step => Some((*at, *timer)),
                _ => None,
            })
            .expect("a timer for the step");
        self.now = at;
        self.input_with(Input::Timer(timer), breakers).unwrap();
    }

    fn sent(&self) -> Vec<(usize, Operation, u32)> {
        self.last
            .iter()
            .filter_map(|e| match e {
                Effect::Send { command, .. } => Some((
                    self.inst.plan.step_index(&command.step).unwrap(),
                    command.operation,
                    command.attempt,
                )),
                _ => None,
            })
            .collect()
    }

    fn statuses(&self) -> Vec<StepStatus> {
        self.inst.steps.iter().map(|s| s.status).collect()
    }
}

use Operation::*;
use StepStatus as S;

#[test]
fn a_saga_runs_its_steps_in_order_and_completes_when_all_succeed() {
    let mut r = Run::start(Mode::Saga, 3);
    assert_eq!(r.sent(), vec![(0, Action, 1)]);
    r.ok(0, Action);
    assert_eq!(r.sent(), vec![(1, Action, 1)]);
    // step 1's command was computed from step 0's output
    assert_eq!(
        r.inst.steps[1].payload,
        Some(json!({"step": 1, "prev": {"out": 0}}))
    );
    r.ok(1, Action);
    r.ok(2, Action);
    assert_eq!(r.inst.status, Status::Completed);
    assert_eq!(r.statuses(), vec![S::Succeeded; 3]);
    assert!(r.sent().is_empty());
}

#[test]
fn a_business_failure_compensates_the_earlier_steps_in_reverse_order() {
    let mut r = Run::start(Mode::Saga, 3);
    r.ok(0, Action);
    r.ok(1, Action);
    r.reply(2, Action, 1, Outcome::failed("out of stock"));
    assert_eq!(r.inst.status, Status::Compensating);
    assert_eq!(
        r.inst.failure.as_deref(),
        Some("step s2 failed: out of stock")
    );
    assert_eq!(r.sent(), vec![(1, Compensate, 1)]);
    r.ok(1, Compensate);
    assert_eq!(r.sent(), vec![(0, Compensate, 1)]);
    r.ok(0, Compensate);
    assert_eq!(r.inst.status, Status::Compensated);
    assert_eq!(
        r.statuses(),
        vec![S::Compensated, S::Compensated, S::Failed]
    );
}

#[test]
fn a_failed_first_step_ends_compensated_with_nothing_to_undo() {
    let mut r = Run::start(Mode::Saga, 2);
    r.reply(0, Action, 1, Outcome::failed("closed"));
    assert_eq!(r.inst.status, Status::Compensated);
    assert!(r.sent().is_empty());
    assert_eq!(r.statuses(), vec![S::Failed, S::Pending]);
}

#[test]
fn compensation_carries_the_logged_payload_and_the_forward_output() {
    let mut r = Run::start(Mode::Saga, 2);
    r.ok(0, Action);
    r.reply(1, Action, 1, Outcome::failed("no"));
    let cmd = r
        .last
        .iter()
        .find_map(|e| match e {
            Effect::Send { command, .. } => Some(command.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(cmd.operation, Compensate);
    assert_eq!(cmd.payload, json!({"step": 0, "prev": null}));
    assert_eq!(cmd.output, Some(json!({"out": 0})));
}

#[test]
fn a_silent_participant_is_retried_with_backoff_then_compensated_as_unknown() {
    let mut r = Run::start(Mode::Saga, 2);
    r.ok(0, Action);
    r.fire(1); // deadline of attempt 1
    assert_eq!(
        r.inst.steps[1].waiting,
        Waiting::Backoff {
            until: r.now
                + Duration::milliseconds(
                    r.inst.plan.steps[1]
                        .retry
                        .delay_ms(1, jitter_unit(r.inst.id, 1, Action, 1))
                        as i64
                )
        }
    );
    r.fire(1); // backoff
    assert_eq!(r.sent(), vec![(1, Action, 2)]);
    r.fire(1);
    r.fire(1);
    assert_eq!(r.sent(), vec![(1, Action, 3)]);
    r.fire(1); // third deadline: attempts exhausted
    assert_eq!(r.inst.steps[1].status, S::Compensating);
    assert_eq!(r.sent(), vec![(1, Compensate, 1)]);
    assert!(r.inst.failure.as_deref().unwrap().contains("gave up"));
    r.ok(1, Compensate);
    r.ok(0, Compensate);
    assert_eq!(r.inst.status, Status::Compensated);
}

#[test]
fn a_late_definite_reply_to_an_earlier_attempt_is_accepted() {
    let mut r = Run::start(Mode::Saga, 1);
    r.fire(0); // timeout of attempt 1 -> backoff
    r.reply(0, Action, 1, Outcome::succeeded(json!(1)));
    assert_eq!(r.inst.status, Status::Completed);
    assert!(r.last.contains(&Effect::CancelTimer {
        key: "step:0".into()
    }));
}

#[test]
fn a_retry_reply_uses_the_hint_when_it_is_longer_than_the_backoff() {
    let mut r = Run::start(Mode::Saga, 1);
    r.reply(
        0,
        Action,
        1,
        Outcome::Retry {
            reason: "busy".into(),
            retry_after_ms: Some(60_000),
        },
    );
    assert_eq!(
        r.inst.steps[0].waiting,
        Waiting::Backoff {
            until: t0() + Duration::milliseconds(60_000)
        }
    );
    // a second transient error for the same attempt is stale now
    r.reply(0, Action, 1, Outcome::retry("again"));
    assert_eq!(r.log.last().unwrap().kind(), "reply_ignored");
}

#[test]
fn duplicate_stray_and_future_replies_are_logged_and_ignored() {
    let mut r = Run::start(Mode::Saga, 2);
    r.ok(0, Action);
    let before = r.inst.clone();
    r.reply(0, Action, 1, Outcome::succeeded(json!("again")));
    r.reply(1, Action, 7, Outcome::succeeded(json!("future")));
    r.reply(1, Compensate, 1, Outcome::succeeded(json!("stray")));
    let reply = Reply {
        protocol: PROTOCOL_VERSION,
        transaction_id: r.inst.id,
        step: "nope".into(),
        operation: Action,
        attempt: 1,
        outcome: Outcome::succeeded(json!(null)),
    };
    r.input(Input::Reply(reply)).unwrap();
    assert_eq!(
        r.log
            .iter()
            .rev()
            .take(4)
            .filter(|e| e.kind() == "reply_ignored")
            .count(),
        4
    );
    assert_eq!(r.inst.steps, before.steps);
    assert_eq!(r.inst.steps[0].output, Some(json!({"out": 0})));
}

#[test]
fn a_compensation_past_its_budget_leaves_the_instance_stuck_until_an_operator_retries() {
    let mut r = Run::start(Mode::Saga, 2);
    r.ok(0, Action);
    r.reply(1, Action, 1, Outcome::failed("no"));
    r.fire(0); // compensate attempt 1 times out
    r.fire(0); // backoff -> attempt 2
    r.fire(0); // attempt 2 times out: budget of 2 exhausted
    assert_eq!(r.inst.status, Status::Stuck);
    assert!(r.inst.steps[0].stuck);
    assert!(
        r.inst.steps[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("exhausted")
    );
    let err = r.input(Input::Abort {
        actor: "ops".into(),
        reason: "x".into(),
    });
    assert!(err.is_err());
    r.input(Input::Retry {
        actor: "ops".into(),
        reason: "participant fixed".into(),
    })
    .unwrap();
    assert_eq!(r.inst.status, Status::Compensating);
    assert_eq!(r.sent(), vec![(0, Compensate, 3)]);
    // a fresh budget: one timeout no longer makes it stuck
    r.fire(0);
    assert_eq!(r.inst.status, Status::Compensating);
    r.fire(0);
    r.ok(0, Compensate);
    assert_eq!(r.inst.status, Status::Compensated);
}

#[test]
fn a_compensation_that_answers_failed_makes_the_instance_stuck_at_once() {
    let mut r = Run::start(Mode::Saga, 2);
    r.ok(0, Action);
    r.reply(1, Action, 1, Outcome::failed("no"));
    r.reply(0, Compensate, 1, Outcome::failed("account closed"));
    assert_eq!(r.inst.status, Status::Stuck);
    // a late success still finishes it
    r.reply(0, Compensate, 1, Outcome::succeeded(json!(null)));
    assert_eq!(r.inst.status, Status::Compensated);
}

#[test]
fn a_stuck_step_that_hears_another_failure_is_logged_stuck_once() {
    let mut r = Run::start(Mode::Saga, 2);
    r.ok(0, Action);
    r.reply(1, Action, 1, Outcome::failed("no"));
    r.reply(0, Compensate, 1, Outcome::failed("account closed"));
    // The broker redelivers the failure, and the participant answers it again.
    r.reply(0, Compensate, 1, Outcome::failed("account closed"));
    r.reply(0, Compensate, 1, Outcome::failed("account closed"));
    assert_eq!(r.inst.status, Status::Stuck);
    let kinds: Vec<&str> = r.log.iter().map(Event::kind).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "stuck").count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "replied").count(),
        5,
        "{kinds:?}"
    );
    // Still settled by a success, or by an operator.
    r.reply(0, Compensate, 1, Outcome::succeeded(json!(null)));
    assert_eq!(r.inst.status, Status::Compensated);
}

#[test]
fn tcc_tries_every_branch_at_once_then_confirms_them_all() {
    let mut r = Run::start(Mode::Tcc, 3);
    assert_eq!(r.sent(), vec![(0, Try, 1), (1, Try, 1), (2, Try, 1)]);
    r.ok(1, Try);
    r.ok(0, Try);
    assert!(r.sent().is_empty());
    r.ok(2, Try);
    assert_eq!(
        r.sent(),
        vec![(0, Confirm, 1), (1, Confirm, 1), (2, Confirm, 1)]
    );
    assert_eq!(r.inst.status, Status::Running);
    r.ok(0, Confirm);
    r.ok(2, Confirm);
    r.ok(1, Confirm);
    assert_eq!(r.inst.status, Status::Completed);
    assert_eq!(r.statuses(), vec![S::Confirmed; 3]);
}

#[test]
fn tcc_cancels_every_branch_that_was_or_may_have_been_tried_when_one_try_fails() {
    let mut r = Run::start(Mode::Tcc, 3);
    r.ok(0, Try);
    r.reply(1, Try, 1, Outcome::failed("overdrawn"));
    // branch 2 is still in flight: it may have been tried, so it is cancelled too
    assert_eq!(r.sent(), vec![(0, Cancel, 1), (2, Cancel, 1)]);
    assert_eq!(r.inst.status, Status::Compensating);
    // the late try reply of branch 2 is ignored
    r.reply(2, Try, 1, Outcome::succeeded(json!(1)));
    assert_eq!(r.log.last().unwrap().kind(), "reply_ignored");
    r.ok(0, Cancel);
    r.ok(2, Cancel);
    assert_eq!(r.inst.status, Status::Compensated);
    assert_eq!(r.statuses(), vec![S::Cancelled, S::Failed, S::Cancelled]);
}

#[test]
fn an_operator_abort_compensates_the_step_in_flight_too() {
    let mut r = Run::start(Mode::Saga, 3);
    r.ok(0, Action);
    r.input(Input::Abort {
        actor: "alice".into(),
        reason: "customer cancelled".into(),
    })
    .unwrap();
    assert_eq!(r.sent(), vec![(1, Compensate, 1)]);
    assert_eq!(
        r.inst.failure.as_deref(),
        Some("aborted by alice: customer cancelled")
    );
    r.ok(1, Compensate);
    r.ok(0, Compensate);
    assert_eq!(r.inst.status, Status::Compensated);
    assert_eq!(
        r.statuses(),
        vec![S::Compensated, S::Compensated, S::Pending]
    );
}

#[test]
fn a_command_that_cannot_be_computed_fails_its_step_and_compensates_the_rest() {
    let mut r = Run::start_with(Mode::Saga, 3, json!({"fail_prepare": 1}));
    r.ok(0, Action);
    assert_eq!(r.sent(), vec![(0, Compensate, 1)]);
    assert_eq!(r.inst.steps[1].status, S::Failed);
    assert!(
        r.inst
            .failure
            .as_deref()
            .unwrap()
            .contains("cannot compute")
    );
}

#[test]
fn terminal_instances_ignore_every_further_input() {
    let mut r = Run::start(Mode::Saga, 1);
    r.ok(0, Action);
    let done = r.inst.clone();
    r.reply(0, Action, 1, Outcome::failed("late"));
    r.input(Input::Timer(Timer {
        step: 0,
        kind: TimerKind::Deadline,
        operation: Action,
        attempt: 1,
    }))
    .unwrap();
    assert!(
        r.input(Input::Retry {
            actor: "a".into(),
            reason: "b".into()
        })
        .is_err()
    );
    assert!(
        r.input(Input::Abort {
            actor: "a".into(),
            reason: "b".into()
        })
        .is_err()
    );
    assert_eq!(r.inst.status, done.status);
    assert_eq!(r.inst.steps, done.steps);
    assert!(r.sent().is_empty());
}

#[test]
fn stale_timers_change_nothing() {
    let mut r = Run::start(Mode::Saga, 1);
    let before = r.inst.clone();
    r.input(Input::Timer(Timer {
        step: 0,
        kind: TimerKind::Backoff,
        operation: Action,
        attempt: 2,
    }))
    .unwrap();
    r.input(Input::Timer(Timer {
        step: 5,
        kind: TimerKind::Deadline,
        operation: Action,
        attempt: 1,
    }))
    .unwrap();
    assert_eq!(r.inst, before);
}

#[test]
fn an_in_progress_answer_stops_resending_until_the_in_progress_timeout() {
    let mut r = Run::start(Mode::Saga, 1);
    r.reply(0, Action, 1, Outcome::in_progress());
    let deadline = t0() + Duration::milliseconds(60_000);
    assert_eq!(r.inst.steps[0].waiting, Waiting::Reply { deadline });
    assert!(r.inst.steps[0].in_progress);
    assert!(
        r.last
            .iter()
            .any(|e| matches!(e, Effect::SetTimer { at, .. } if *at == deadline))
    );
    assert!(r.sent().is_empty());
    // a second in_progress does not extend the wait again
    r.reply(0, Action, 1, Outcome::in_progress());
    assert_eq!(r.log.last().unwrap().kind(), "reply_ignored");
    // the final answer arrives later
    r.reply(0, Action, 1, Outcome::succeeded(json!("done")));
    assert_eq!(r.inst.status, Status::Completed);
}

#[test]
fn an_in_progress_attempt_that_outlives_its_timeout_is_retried() {
    let mut r = Run::start(Mode::Saga, 1);
    r.reply(0, Action, 1, Outcome::in_progress());
    r.fire(0);
    assert_eq!(r.log.last().unwrap().kind(), "retry_scheduled");
    assert!(matches!(r.inst.steps[0].waiting, Waiting::Backoff { .. }));
    r.fire(0);
    assert_eq!(r.sent(), vec![(0, Action, 2)]);
    assert!(!r.inst.steps[0].in_progress);
}

/// create -> (reserve || charge) -> confirm
fn diamond() -> Run {
    let mut p = plan(Mode::Saga, 4);
    p.steps[2].after = Some(vec![0]);
    p.steps[3].after = Some(vec![1, 2]);
    let t = start(Uuid::from_u128(9), p, json!({}), t0(), &Echo);
    Run::from_start(t)
}

#[test]
fn parallel_steps_run_together_and_a_join_waits_for_all_of_them() {
    let mut r = diamond();
    assert_eq!(r.sent(), vec![(0, Action, 1)]);
    r.ok(0, Action);
    assert_eq!(r.sent(), vec![(1, Action, 1), (2, Action, 1)]);
    r.ok(2, Action);
    assert!(r.sent().is_empty());
    r.ok(1, Action);
    assert_eq!(r.sent(), vec![(3, Action, 1)]);
    r.ok(3, Action);
    assert_eq!(r.inst.status, Status::Completed);
}

#[test]
fn a_failed_branch_compensates_its_sibling_before_the_step_both_ran_after() {
    let mut r = diamond();
    r.ok(0, Action);
    r.reply(2, Action, 1, Outcome::failed("card declined"));
    // the sibling is still running: its outcome is unknown, so it is compensated at once
    assert_eq!(r.sent(), vec![(1, Compensate, 1)]);
    r.ok(1, Compensate);
    assert_eq!(r.sent(), vec![(0, Compensate, 1)]);
    r.ok(0, Compensate);
    assert_eq!(r.inst.status, Status::Compensated);
    assert_eq!(
        r.statuses(),
        vec![S::Compensated, S::Compensated, S::Failed, S::Pending]
    );
}

#[test]
fn a_failed_join_compensates_both_branches_in_parallel_then_the_root() {
    let mut r = diamond();
    r.ok(0, Action);
    r.ok(1, Action);
    r.ok(2, Action);
    r.reply(3, Action, 1, Outcome::failed("no"));
    assert_eq!(r.sent(), vec![(1, Compensate, 1), (2, Compensate, 1)]);
    r.ok(2, Compensate);
    assert!(r.sent().is_empty());
    r.ok(1, Compensate);
    assert_eq!(r.sent(), vec![(0, Compensate, 1)]);
    r.ok(0, Compensate);
    assert_eq!(r.inst.status, Status::Compensated);
}

#[test]
fn a_stuck_instance_resolved_by_an_operator_ends_resolved_and_nothing_else_can() {
    let mut r = Run::start(Mode::Saga, 2);
    let resolve = |r: &mut Run| {
        r.input(Input::Resolve {
            actor: "ops".into(),
            reason: "refunded by hand, ticket 42".into(),
        })
    };
    assert!(
        resolve(&mut r).is_err(),
        "a running instance cannot be resolved"
    );
    r.ok(0, Action);
    r.reply(1, Action, 1, Outcome::failed("no"));
    r.reply(0, Compensate, 1, Outcome::failed("account closed"));
    assert_eq!(r.inst.status, Status::Stuck);
    resolve(&mut r).unwrap();
    assert_eq!(r.inst.status, Status::Resolved);
    assert!(r.inst.status.is_terminal());
    assert!(r.last.contains(&Effect::CancelTimer {
        key: "step:0".into()
    }));
    assert!(resolve(&mut r).is_err());
    // a late compensation reply changes nothing any more
    r.reply(0, Compensate, 1, Outcome::succeeded(json!(null)));
    assert_eq!(r.inst.status, Status::Resolved);
}

#[test]
fn resolving_marks_the_stuck_steps_and_those_with_an_operation_outstanding_settled_by_hand() {
    let mut r = Run::start(Mode::Saga, 3);
    r.ok(0, Action);
    r.ok(1, Action);
    r.reply(2, Action, 1, Outcome::failed("no"));
    assert_eq!(r.sent(), vec![(1, Compensate, 1)]);
    r.reply(1, Compensate, 1, Outcome::failed("account renamed"));
    assert_eq!(r.inst.status, Status::Stuck);
    assert!(r.inst.steps.iter().all(|s| !s.resolved_by_hand));
    r.input(Input::Resolve {
        actor: "ops".into(),
        reason: "refund booked by hand".into(),
    })
    .unwrap();
    let marks: Vec<bool> = r.inst.steps.iter().map(|s| s.resolved_by_hand).collect();
    // s1 was stuck; s0 still needed undoing but had nothing outstanding; s2 failed.
    assert_eq!(marks, vec![false, true, false]);
    assert_eq!(r.inst.steps[1].status, StepStatus::Compensating);
    assert!(
        r.inst.steps[1]
            .last_error
            .as_deref()
            .unwrap()
            .contains("account renamed")
    );
    // A late answer to the settled step leaves the mark: the step was settled by hand.
    r.reply(1, Compensate, 1, Outcome::succeeded(json!(null)));
    assert!(r.inst.steps[1].resolved_by_hand);
}

#[test]
fn a_step_with_a_retry_pending_when_the_instance_is_resolved_is_marked_too() {
    let mut r = Run::start(Mode::Tcc, 2);
    r.ok(0, Try);
    r.ok(1, Try);
    assert_eq!(r.sent(), vec![(0, Confirm, 1), (1, Confirm, 1)]);
    r.reply(0, Confirm, 1, Outcome::failed("ledger closed"));
    r.reply(1, Confirm, 1, Outcome::retry("busy"));
    assert_eq!(r.inst.status, Status::Stuck);
    assert!(matches!(r.inst.steps[1].waiting, Waiting::Backoff { .. }));
    r.input(Input::Resolve {
        actor: "ops".into(),
        reason: "confirmed both by hand".into(),
    })
    .unwrap();
    assert!(r.inst.steps.iter().all(|s| s.resolved_by_hand));
    // A projection stored before steps carried the mark gets the same marks.
    let mut old = r.inst.clone();
    for s in &mut old.steps {
        s.resolved_by_hand = false;
    }
    old.mark_resolved_by_hand();
    assert_eq!(old, r.inst);
}

const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[test]
fn every_command_carries_the_trace_context_the_instance_started_with() {
    let mut r = with_deadline(Mode::Saga, 2);
    r.ok(0, Action);
    r.reply(1, Action, 1, Outcome::failed("no"));
    let commands: Vec<&Command> = r
        .last
        .iter()
        .filter_map(|e| match e {
            Effect::Send { command, .. } => Some(command),
            _ => None,
        })
        .collect();
    assert!(!commands.is_empty());
    for c in &commands {
        let step = r.inst.plan.step_index(&c.step).unwrap();
        let expected =
            attempt_traceparent(Some(TRACE), c.transaction_id, step, c.operation, c.attempt);
        assert_eq!(c.traceparent, expected);
        // The instance's trace, with the attempt's own span as parent.
        let trace = TraceParent::parse(c.traceparent.as_deref().unwrap()).unwrap();
        assert_eq!(trace.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(trace.parent_id, "00f067aa0ba902b7");
    }
    assert_eq!(replay(&r.log).unwrap().traceparent.as_deref(), Some(TRACE));
}

#[test]
fn each_attempt_has_a_span_id_of_its_own_that_every_process_derives_alike() {
    let id = Uuid::from_u128(7);
    let a = attempt_span_id(id, 0, Action, 1);
    assert_eq!(a, attempt_span_id(id, 0, Action, 1));
    let others = [
        attempt_span_id(id, 0, Action, 2),
        attempt_span_id(id, 1, Action, 1),
        attempt_span_id(id, 0, Compensate, 1),
        attempt_span_id(Uuid::from_u128(8), 0, Action, 1),
    ];
    assert!(others.iter().all(|o| *o != a && *o != 0));
    assert_eq!(attempt_traceparent(Some("junk"), id, 0, Action, 1), None);
    assert_eq!(attempt_traceparent(None, id, 0, Action, 1), None);
}

fn with_deadline(mode: Mode, steps: usize) -> Run {
    let deadline = t0() + Duration::milliseconds(30_000);
    let options = StartOptions {
        deadline: Some(deadline),
        traceparent: Some(TRACE.to_owned()),
    };
    let t = start_with(
        Uuid::from_u128(11),
        plan(mode, steps),
        json!({}),
        options,
        t0(),
        &Echo,
        &Closed,
    );
    Run::from_start(t)
}

#[test]
fn a_saga_past_its_deadline_is_compensated() {
    let mut r = with_deadline(Mode::Saga, 2);
    let expiry = r
        .last
        .iter()
        .find_map(|e| match e {
            Effect::SetTimer { timer, .. } if timer.kind == TimerKind::Expiry => Some(*timer),
            _ => None,
        })
        .expect("a deadline timer");
    assert_eq!(expiry.key(), DEADLINE_KEY);
    r.ok(0, Action);
    r.now = t0() + Duration::milliseconds(30_000);
    r.input(Input::Timer(expiry)).unwrap();
    assert_eq!(r.inst.status, Status::Compensating);
    assert!(r.inst.failure.as_deref().unwrap().contains("deadline"));
    assert_eq!(r.sent(), vec![(1, Compensate, 1)]);
    r.ok(1, Compensate);
    r.ok(0, Compensate);
    assert_eq!(r.inst.status, Status::Compensated);
    assert!(r.last.contains(&Effect::CancelTimer {
        key: DEADLINE_KEY.into()
    }));
}

#[test]
fn a_deadline_does_not_interrupt_confirmation_and_is_cancelled_at_the_end() {
    let mut r = with_deadline(Mode::Tcc, 2);
    r.ok(0, Try);
    r.ok(1, Try);
    let expiry = Timer {
        step: 0,
        kind: TimerKind::Expiry,
        operation: Try,
        attempt: 0,
    };
    r.input(Input::Timer(expiry)).unwrap();
    assert_eq!(r.inst.status, Status::Running);
    r.ok(0, Confirm);
    r.ok(1, Confirm);
    assert_eq!(r.inst.status, Status::Completed);
    assert!(r.last.contains(&Effect::CancelTimer {
        key: DEADLINE_KEY.into()
    }));
}

#[test]
fn a_null_output_reads_back_from_stored_json_as_it_replays() {
    let mut r = Run::start(Mode::Saga, 2);
    r.reply(0, Action, 1, Outcome::succeeded(Value::Null));
    let stored: Instance = serde_json::from_value(serde_json::to_value(&r.inst).unwrap()).unwrap();
    assert_eq!(stored, r.inst);
    assert_eq!(replay(&r.log), Some(stored));
}

#[test]
fn jitter_is_deterministic_and_in_the_unit_interval() {
    let id = Uuid::from_u128(42);
    let a = jitter_unit(id, 1, Action, 2);
    assert_eq!(a, jitter_unit(id, 1, Action, 2));
    assert!((0.0..1.0).contains(&a));
    assert_ne!(a, jitter_unit(id, 1, Action, 3));
}
/// An instance whose compensation of step 0 is stuck, with its log.
fn stuck() -> Run {
    let mut r = Run::start(Mode::Saga, 2);
    r.ok(0, Action);
    r.reply(1, Action, 1, Outcome::failed("no"));
    r.fire(0);
    r.fire(0);
    r.fire(0);
    assert_eq!(r.inst.status, Status::Stuck);
    r
}

#[test]
fn an_operator_retry_logged_before_the_action_enum_still_reads_and_replays() {
    let mut r = stuck();
    // The body as the store holds it: the log kept the action as a plain string.
    let logged = r#"{"kind": "operator_action", "action": "retry", "actor": "ops", "reason": "participant fixed"}"#;
    let event: Event = serde_json::from_str(logged).unwrap();
    assert_eq!(
        event,
        Event::OperatorAction {
            action: OperatorAction::Retry,
            actor: "ops".into(),
            reason: "participant fixed".into(),
        }
    );
    // The whole log read back from JSON, with that body in it, rebuilds what the machine
    // decides for the same retry: a fresh budget for the stuck step.
    let mut log: Vec<Value> = r
        .log
        .iter()
        .map(|e| serde_json::to_value(e).unwrap())
        .collect();
    log.push(serde_json::from_str(logged).unwrap());
    let log: Vec<Event> = log
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
    let replayed = replay(&log).unwrap();
    assert_eq!(replayed.steps[0].budget_from, replayed.steps[0].attempt);
    r.input(Input::Retry {
        actor: "ops".into(),
        reason: "participant fixed".into(),
    })
    .unwrap();
    let decided = r
        .log
        .iter()
        .find(|e| e.kind() == "operator_action")
        .unwrap();
    assert_eq!(decided, &event);
    assert_eq!(replay(&r.log[..log.len()]).unwrap().steps, replayed.steps);
}

#[test]
fn operator_actions_are_logged_with_the_same_json_as_before() {
    for (action, name) in [
        (OperatorAction::Abort, "abort"),
        (OperatorAction::Retry, "retry"),
        (OperatorAction::Resolve, "resolve"),
    ] {
        let event = Event::OperatorAction {
            action,
            actor: "ops".into(),
            reason: "why".into(),
        };
        assert_eq!(
            serde_json::to_value(&event).unwrap(),
            json!({"kind": "operator_action", "action": name, "actor": "ops", "reason": "why"})
        );
        assert_eq!(action.as_str(), name);
        assert_eq!(serde_json::to_value(action).unwrap(), json!(name));
    }
    assert_eq!(
        OperatorAction::ALL.map(OperatorAction::as_str),
        ["abort", "retry", "resolve"]
    );
    assert!(serde_json::from_value::<OperatorAction>(json!("undo")).is_err());
}

mod breakers;
mod properties;
mod signals;
