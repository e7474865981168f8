//! The participants' circuit breakers as an input: attempts due while a breaker is open are
//! postponed without being counted, one goes as the probe, and replay needs no breaker.

use std::cell::Cell;

use super::*;

/// The breaker of `participant` is open; the first attempt due at or after `probe_at` is its
/// probe (once), every other one waits until `probe_at`.
struct Open {
    participant: &'static str,
    probe_at: Time,
    probed: Cell<bool>,
}

impl Open {
    fn new(participant: &'static str, probe_at: Time) -> Open {
        Open {
            participant,
            probe_at,
            probed: Cell::new(false),
        }
    }
}

impl Breakers for Open {
    fn admit(&self, participant: &str, now: Time) -> Option<Time> {
        if participant != self.participant {
            return None;
        }
        if now >= self.probe_at && !self.probed.replace(true) {
            return None;
        }
        Some(self.probe_at)
    }
    fn is_open(&self, participant: &str) -> bool {
        participant == self.participant
    }
}

fn postponed(r: &Run) -> Vec<(usize, Operation, u32, bool)> {
    r.log
        .iter()
        .filter_map(|e| match e {
            Event::Postponed {
                step,
                operation,
                attempt,
                forgiven,
                ..
            } => Some((*step, *operation, *attempt, *forgiven)),
            _ => None,
        })
        .collect()
}

#[test]
fn timeouts_while_the_breaker_is_open_are_not_counted_so_a_long_outage_never_exhausts_the_budget() {
    let mut r = Run::start(Mode::Saga, 1);
    assert_eq!(r.sent(), vec![(0, Action, 1)]);
    // Ten rounds of: the attempt times out while the breaker is open, the next one waits for
    // the probe time, and goes as the probe. The budget is three attempts.
    for round in 1..=10u32 {
        let breaker = Open::new("p0", r.now + Duration::seconds(5));
        r.fire_with(0, &breaker); // deadline
        assert_eq!(r.sent(), vec![]);
        assert_eq!(r.inst.steps[0].status, S::Running);
        assert_eq!(r.inst.steps[0].budget_from, round, "written off");
        r.fire_with(0, &breaker); // backoff ends before the probe time: postponed again
        assert_eq!(r.sent(), vec![]);
        r.fire_with(0, &breaker); // the probe time: this attempt is the probe
        assert_eq!(r.sent(), vec![(0, Action, round + 1)]);
    }
    assert_eq!(
        postponed(&r).iter().filter(|p| p.3).count(),
        10,
        "every timeout while open was forgiven"
    );
    // The participant is back: the probe's success completes the saga.
    r.ok(0, Action);
    assert_eq!(r.inst.status, Status::Completed);
}

#[test]
fn once_the_breaker_closes_attempts_are_counted_again_from_where_it_left_them() {
    let mut r = Run::start(Mode::Saga, 1);
    let breaker = Open::new("p0", r.now + Duration::seconds(5));
    r.fire_with(0, &breaker); // attempt 1 times out while open: not counted
    r.fire_with(0, &breaker); // postponed to the probe time
    r.fire(0); // closed now: attempt 2 is sent
    assert_eq!(r.sent(), vec![(0, Action, 2)]);
    for attempt in 3..=4 {
        r.fire(0); // deadline: counted
        r.fire(0); // backoff
        assert_eq!(r.sent(), vec![(0, Action, attempt)]);
    }
    r.fire(0); // the third counted attempt times out: the step gives up
    assert_eq!(r.sent(), vec![(0, Compensate, 1)]);
    assert!(r.inst.failure.as_deref().unwrap().contains("3 attempt(s)"));
}

#[test]
fn a_first_dispatch_to_an_open_participant_is_postponed_and_sent_when_its_turn_comes() {
    let mut r = Run::start(Mode::Saga, 2);
    let breaker = Open::new("p1", r.now + Duration::seconds(5));
    r.reply_with(
        0,
        Action,
        1,
        Outcome::succeeded(json!({"out": 0})),
        &breaker,
    );
    assert_eq!(r.sent(), vec![], "step 1 is held back");
    assert_eq!(postponed(&r), vec![(1, Action, 1, false)]);
    assert_eq!(r.inst.steps[1].status, S::Running);
    assert_eq!(r.inst.steps[1].attempt, 0, "nothing was sent");
    assert_eq!(
        r.inst.steps[1].waiting,
        Waiting::Backoff {
            until: breaker.probe_at
        }
    );
    r.fire(1);
    assert_eq!(r.sent(), vec![(1, Action, 1)]);
    r.ok(1, Action);
    assert_eq!(r.inst.status, Status::Completed);
}

#[test]
fn compensations_and_tcc_confirms_wait_behind_an_open_breaker_too() {
    let mut r = Run::start(Mode::Saga, 1);
    let breaker = Open::new("p0", r.now + Duration::seconds(5));
    r.input_with(
        Input::Abort {
            actor: "ops".into(),
            reason: "test".into(),
        },
        &breaker,
    )
    .unwrap();
    assert_eq!(postponed(&r), vec![(0, Compensate, 1, false)]);
    assert_eq!(r.inst.steps[0].status, S::Compensating);
    r.fire(0);
    assert_eq!(r.sent(), vec![(0, Compensate, 1)]);
    r.ok(0, Compensate);
    assert_eq!(r.inst.status, Status::Compensated);

    let mut r = Run::start(Mode::Tcc, 2);
    let breaker = Open::new("p1", r.now + Duration::seconds(5));
    r.ok(0, Try);
    r.reply_with(1, Try, 1, Outcome::succeeded(json!(1)), &breaker);
    assert_eq!(r.sent(), vec![(0, Confirm, 1)]);
    assert_eq!(postponed(&r), vec![(1, Confirm, 1, false)]);
    assert_eq!(r.statuses(), vec![S::Confirming, S::Confirming]);
}

#[test]
fn an_operator_retry_sends_a_postponed_attempt_at_once() {
    let mut r = Run::start(Mode::Saga, 1);
    let breaker = Open::new("p0", r.now + Duration::seconds(5));
    r.fire_with(0, &breaker);
    r.input(Input::Retry {
        actor: "ops".into(),
        reason: "it is back".into(),
    })
    .unwrap();
    assert_eq!(r.sent(), vec![(0, Action, 2)]);
}

#[test]
fn a_start_whose_first_step_goes_to_an_open_participant_is_postponed_from_the_start() {
    let breaker = Open::new("p0", t0() + Duration::seconds(5));
    let t = start_with(
        Uuid::from_u128(7),
        plan(Mode::Saga, 2),
        json!({}),
        StartOptions::default(),
        t0(),
        &Echo,
        &breaker,
    );
    let mut r = Run::from_start(t);
    assert_eq!(
        r.sent(),
        vec![],
        "nothing goes to a participant known to be down"
    );
    assert_eq!(postponed(&r), vec![(0, Action, 1, false)]);
    assert_eq!(r.inst.steps[0].attempt, 0);
    r.fire(0);
    assert_eq!(r.sent(), vec![(0, Action, 1)]);
    r.ok(0, Action);
    r.ok(1, Action);
    assert_eq!(r.inst.status, Status::Completed);
}
