//! Wait steps: the signal as an input, its timeout as a timer, and undoing a wait. Every
//! transition is replayed from its log and compared (see `Run`).

use super::*;

/// s0 (a participant) -> s1 (waits for `approval`, 1 s) -> s2 (a participant).
fn waiting_saga() -> Run {
    let mut p = plan(Mode::Saga, 3);
    p.steps[1].signal = Some("approval".into());
    p.steps[1].participant = String::new();
    Run::from_start(start(Uuid::from_u128(11), p, json!({}), t0(), &Echo))
}

fn signal(id: &str, data: Value) -> Input {
    Input::Signal {
        name: "approval".into(),
        signal_id: id.into(),
        data,
    }
}

fn timer_set_for(r: &Run, step: usize) -> Option<Time> {
    r.last.iter().find_map(|e| match e {
        Effect::SetTimer { at, timer } if timer.step == step => Some(*at),
        _ => None,
    })
}

#[test]
fn a_wait_starts_when_its_step_is_ready_and_its_signal_data_reaches_the_next_command() {
    let mut r = waiting_saga();
    r.ok(0, Action);
    assert!(r.sent().is_empty(), "a wait sends no command");
    let until = t0() + Duration::milliseconds(1000);
    assert_eq!(r.inst.steps[1].waiting, Waiting::Signal { until });
    assert_eq!(timer_set_for(&r, 1), Some(until));
    assert_eq!(r.log.last().unwrap().kind(), "awaiting_signal");
    r.input(signal("sig-1", json!({"auth": "ok"}))).unwrap();
    assert_eq!(r.sent(), vec![(2, Action, 1)]);
    assert!(r.last.contains(&Effect::CancelTimer {
        key: "step:1".into()
    }));
    assert_eq!(
        r.inst.steps[2].payload,
        Some(json!({"step": 2, "prev": {"auth": "ok"}}))
    );
    assert_eq!(r.inst.steps[1].output, Some(json!({"auth": "ok"})));
    r.ok(2, Action);
    assert_eq!(r.inst.status, Status::Completed);
}

#[test]
fn a_signal_before_its_wait_starts_is_refused_and_changes_nothing() {
    let mut r = waiting_saga();
    let before = r.inst.clone();
    let err = r.input(signal("early", json!(1))).unwrap_err();
    assert!(err.0.contains("has not started waiting"), "{err}");
    assert_eq!(r.inst, before);
    let err = r
        .input(Input::Signal {
            name: "other".into(),
            signal_id: "x".into(),
            data: json!(1),
        })
        .unwrap_err();
    assert!(
        err.0.contains("no step that waits for signal other"),
        "{err}"
    );
}

#[test]
fn the_same_signal_id_again_changes_nothing_and_anything_else_is_refused() {
    let mut r = waiting_saga();
    r.ok(0, Action);
    r.input(signal("sig-1", json!({"auth": "ok"}))).unwrap();
    let seq = r.inst.seq;
    r.input(signal("sig-1", json!({"auth": "ok"}))).unwrap();
    assert_eq!(r.inst.seq, seq, "a repeat logs nothing");
    assert!(r.last.is_empty());
    let err = r.input(signal("sig-1", json!({"auth": "no"}))).unwrap_err();
    assert!(err.0.contains("different data"), "{err}");
    let err = r.input(signal("sig-2", json!({"auth": "ok"}))).unwrap_err();
    assert!(err.0.contains("already received signal approval"), "{err}");
    // Still true once the transaction has finished.
    r.ok(2, Action);
    r.input(signal("sig-1", json!({"auth": "ok"}))).unwrap();
    assert_eq!(r.inst.status, Status::Completed);
}

#[test]
fn a_wait_past_its_timeout_fails_and_the_saga_compensates_and_refuses_a_late_signal() {
    let mut r = waiting_saga();
    r.ok(0, Action);
    r.fire(1);
    assert_eq!(r.inst.steps[1].status, S::Failed);
    assert_eq!(
        r.inst.failure.as_deref(),
        Some("step s1 failed: no signal approval within 1000 ms")
    );
    assert_eq!(r.sent(), vec![(0, Compensate, 1)]);
    let err = r.input(signal("late", json!(1))).unwrap_err();
    assert!(err.0.contains("no longer waits"), "{err}");
    r.ok(0, Compensate);
    assert_eq!(r.inst.status, Status::Compensated);
    let err = r.input(signal("late", json!(1))).unwrap_err();
    assert!(err.0.contains("the transaction is compensated"), "{err}");
}

#[test]
fn a_received_signal_is_undone_without_a_command_when_a_later_step_fails() {
    let mut r = waiting_saga();
    r.ok(0, Action);
    r.input(signal("sig-1", json!(true))).unwrap();
    r.reply(2, Action, 1, Outcome::failed("declined"));
    assert_eq!(r.sent(), vec![(0, Compensate, 1)], "s1 had nothing to undo");
    assert_eq!(r.inst.steps[1].status, S::Compensated);
    r.ok(0, Compensate);
    assert_eq!(r.inst.status, Status::Compensated);
}

#[test]
fn an_open_wait_in_a_failing_graph_ends_with_its_timer_and_a_stale_timeout_changes_nothing() {
    // s0 and the wait s1 start together; s2 runs after both.
    let mut p = plan(Mode::Saga, 3);
    p.steps[1].signal = Some("approval".into());
    p.steps[1].after = Some(vec![]);
    p.steps[2].after = Some(vec![0, 1]);
    let mut r = Run::from_start(start(Uuid::from_u128(12), p, json!({}), t0(), &Echo));
    assert_eq!(r.sent(), vec![(0, Action, 1)]);
    assert_eq!(r.inst.steps[1].status, S::Running);
    let timeout = r
        .last
        .iter()
        .find_map(|e| match e {
            Effect::SetTimer { timer, .. } if timer.step == 1 => Some(*timer),
            _ => None,
        })
        .unwrap();
    r.reply(0, Action, 1, Outcome::failed("no stock"));
    assert_eq!(r.inst.status, Status::Compensated);
    assert_eq!(r.inst.steps[1].status, S::Compensated);
    assert!(r.last.contains(&Effect::CancelTimer {
        key: "step:1".into()
    }));
    assert!(r.log.iter().any(|e| e.kind() == "wait_undone"));
    let seq = r.inst.seq;
    r.input(Input::Timer(timeout)).unwrap();
    assert_eq!(r.inst.seq, seq);
}

#[test]
fn a_reply_naming_a_wait_step_is_ignored() {
    let mut r = waiting_saga();
    r.ok(0, Action);
    r.reply(1, Action, 1, Outcome::succeeded(json!("forged")));
    assert_eq!(r.log.last().unwrap().kind(), "reply_ignored");
    assert_eq!(r.inst.steps[1].status, S::Running);
    assert_eq!(r.inst.steps[1].output, None);
}
