//! A transaction's steps as a timeline of attempts, built from its log (pure: events in,
//! rows out).

use serde_json::Value;

use crate::machine::{Event, OperatorAction, Time};
use crate::store::LoggedEvent;
use sagas_participant::protocol::{Operation, Outcome};

/// One line of a step's timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// When it was logged.
    pub at: Time,
    /// The operation and attempt it belongs to, if any (`compensate #2`).
    pub attempt: Option<(Operation, u32)>,
    /// What happened: `dispatched`, `replied: failed`, `timed out`, `compensated`, …
    pub what: String,
    /// The sentence that goes with it (a reason, an error, a time).
    pub note: Option<String>,
    /// The JSON that goes with it (a payload, an output).
    pub data: Option<Value>,
    /// A CSS class for how it went: `ok`, `bad`, `wait` or none.
    pub tone: &'static str,
}

/// An operator action as the log records it.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    /// When.
    pub at: Time,
    /// What.
    pub action: OperatorAction,
    /// Who.
    pub actor: String,
    /// Why.
    pub reason: String,
}

/// Every step's timeline (`steps` of them, in step order) from the log.
pub fn steps(events: &[LoggedEvent], steps: usize) -> Vec<Vec<Entry>> {
    let mut out = vec![Vec::new(); steps];
    for e in events {
        let Some(step) = e.event.step() else { continue };
        let Some(entry) = entry(e) else { continue };
        if let Some(line) = out.get_mut(step) {
            line.push(entry);
        }
    }
    out
}

/// The operator actions in the log, oldest first.
pub fn actions(events: &[LoggedEvent]) -> Vec<Action> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Event::OperatorAction {
                action,
                actor,
                reason,
            } => Some(Action {
                at: e.at,
                action: *action,
                actor: actor.clone(),
                reason: reason.clone(),
            }),
            _ => None,
        })
        .collect()
}

/// What a successful reply to `operation` made of the step.
fn done(operation: Operation) -> &'static str {
    match operation {
        Operation::Action | Operation::Try => "succeeded",
        Operation::Compensate => "compensated",
        Operation::Confirm => "confirmed",
        Operation::Cancel => "cancelled",
    }
}

fn entry(e: &LoggedEvent) -> Option<Entry> {
    let attempt = e.event.operation().zip(e.event.attempt());
    let mut entry = Entry {
        at: e.at,
        attempt,
        what: String::new(),
        note: None,
        data: None,
        tone: "",
    };
    match &e.event {
        Event::CommandPrepared { payload, .. } => {
            entry.what = "command prepared".into();
            entry.data = Some(payload.clone());
        }
        Event::PreparationFailed { error, .. } => {
            entry.what = "preparation failed".into();
            entry.note = Some(error.clone());
            entry.tone = "bad";
        }
        Event::Dispatched { deadline, .. } => {
            entry.what = "dispatched".into();
            entry.note = Some(format!("reply due by {}", super::layout::time(*deadline)));
        }
        Event::Replied {
            operation, outcome, ..
        } => match outcome {
            Outcome::Succeeded { output } => {
                entry.what = done(*operation).into();
                entry.data = Some(output.clone()).filter(|o| !o.is_null());
                entry.tone = "ok";
            }
            Outcome::Failed { reason } => {
                entry.what = "replied failed".into();
                entry.note = Some(reason.clone());
                entry.tone = "bad";
            }
            Outcome::InProgress { note } => {
                entry.what = "in progress".into();
                entry.note = note.clone();
                entry.tone = "wait";
            }
            Outcome::Retry { reason, .. } => {
                entry.what = "replied retry".into();
                entry.note = Some(reason.clone());
                entry.tone = "wait";
            }
        },
        Event::ReplyIgnored {
            reason, outcome, ..
        } => {
            entry.what = format!("reply ignored ({outcome})");
            entry.note = Some(reason.clone());
        }
        Event::Extended { deadline, .. } => {
            entry.what = "in progress".into();
            entry.note = Some(format!("waits until {}", super::layout::time(*deadline)));
            entry.tone = "wait";
        }
        Event::TimedOut { .. } => {
            entry.what = "timed out".into();
            entry.tone = "bad";
        }
        Event::RetryScheduled { at, .. } => {
            entry.what = "retry scheduled".into();
            entry.note = Some(format!("next attempt at {}", super::layout::time(*at)));
            entry.tone = "wait";
        }
        Event::Postponed {
            until, forgiven, ..
        } => {
            entry.what = "postponed: the participant's breaker is open".into();
            let written_off = if *forgiven {
                "; the last attempt is not counted"
            } else {
                ""
            };
            entry.note = Some(format!(
                "next try at {}{written_off}",
                super::layout::time(*until)
            ));
            entry.tone = "wait";
        }
        Event::GaveUp { reason, .. } => {
            entry.what = "gave up".into();
            entry.note = Some(reason.clone());
            entry.tone = "bad";
        }
        Event::Stuck { reason, .. } => {
            entry.what = "stuck".into();
            entry.note = Some(reason.clone());
            entry.tone = "bad";
        }
        Event::AwaitingSignal { signal, until, .. } => {
            entry.what = format!("waits for signal {signal}");
            entry.note = Some(format!("until {}", super::layout::time(*until)));
            entry.tone = "wait";
        }
        Event::Signalled {
            signal,
            signal_id,
            data,
            ..
        } => {
            entry.what = format!("signal {signal} received");
            entry.note = Some(format!("signal id {signal_id}"));
            entry.data = Some(data.clone()).filter(|d| !d.is_null());
            entry.tone = "ok";
        }
        Event::SignalTimedOut { signal, .. } => {
            entry.what = format!("no signal {signal} in time");
            entry.tone = "bad";
        }
        Event::WaitUndone { .. } => {
            entry.what = "undone (a wait has nothing to compensate)".into();
            entry.tone = "ok";
        }
        _ => return None,
    }
    Some(entry)
}

/// The layers of a plan's step graph: a step sits one layer after the deepest step it runs
/// after, so each layer's steps may run together.
pub fn layers(deps: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let mut depth = vec![0usize; deps.len()];
    // Dependencies always name earlier steps (the definition's builder checks it).
    for i in 0..deps.len() {
        depth[i] = deps[i]
            .iter()
            .filter(|&&d| d < i)
            .map(|&d| depth[d] + 1)
            .max()
            .unwrap_or(0);
    }
    let mut out: Vec<Vec<usize>> = Vec::new();
    for (i, d) in depth.into_iter().enumerate() {
        if out.len() <= d {
            out.resize(d + 1, Vec::new());
        }
        out[d].push(i);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    fn at(s: i64) -> Time {
        chrono::Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap()
    }

    fn logged(seq: i64, event: Event) -> LoggedEvent {
        LoggedEvent {
            seq,
            at: at(seq),
            event,
        }
    }

    #[test]
    fn a_wait_step_shows_its_signal_its_deadline_and_what_became_of_it() {
        let events = vec![
            logged(
                1,
                Event::AwaitingSignal {
                    step: 0,
                    signal: "3ds".into(),
                    until: at(600),
                },
            ),
            logged(
                2,
                Event::Signalled {
                    step: 0,
                    signal: "3ds".into(),
                    signal_id: "s-1".into(),
                    data: json!({"ok": true}),
                },
            ),
            logged(3, Event::WaitUndone { step: 0 }),
        ];
        let lines = steps(&events, 1);
        let what: Vec<(&str, &str)> = lines[0].iter().map(|e| (e.what.as_str(), e.tone)).collect();
        assert_eq!(
            what,
            [
                ("waits for signal 3ds", "wait"),
                ("signal 3ds received", "ok"),
                ("undone (a wait has nothing to compensate)", "ok"),
            ]
        );
        assert_eq!(lines[0][1].data, Some(json!({"ok": true})));
        assert!(lines[0][0].note.as_deref().unwrap().starts_with("until "));
        assert_eq!(lines[0][0].attempt, None);
    }

    #[test]
    fn every_attempt_of_a_step_shows_in_order_with_its_payload_outcome_and_errors() {
        let a = Operation::Action;
        let events = vec![
            logged(1, Event::ConfirmStarted),
            logged(
                2,
                Event::CommandPrepared {
                    step: 1,
                    payload: json!({"amount": 5}),
                },
            ),
            logged(
                3,
                Event::Dispatched {
                    step: 1,
                    operation: a,
                    attempt: 1,
                    deadline: at(60),
                },
            ),
            logged(
                4,
                Event::TimedOut {
                    step: 1,
                    operation: a,
                    attempt: 1,
                },
            ),
            logged(
                5,
                Event::RetryScheduled {
                    step: 1,
                    operation: a,
                    attempt: 2,
                    at: at(9),
                },
            ),
            logged(
                6,
                Event::Dispatched {
                    step: 1,
                    operation: a,
                    attempt: 2,
                    deadline: at(70),
                },
            ),
            logged(
                7,
                Event::Replied {
                    step: 1,
                    operation: a,
                    attempt: 2,
                    outcome: Outcome::succeeded(json!({"id": 7})),
                },
            ),
            logged(
                8,
                Event::Dispatched {
                    step: 1,
                    operation: Operation::Compensate,
                    attempt: 1,
                    deadline: at(80),
                },
            ),
            logged(
                9,
                Event::Replied {
                    step: 1,
                    operation: Operation::Compensate,
                    attempt: 1,
                    outcome: Outcome::failed("closed"),
                },
            ),
            logged(
                10,
                Event::Stuck {
                    step: 1,
                    operation: Operation::Compensate,
                    reason: "refused".into(),
                },
            ),
            logged(
                11,
                Event::OperatorAction {
                    action: OperatorAction::Resolve,
                    actor: "oncall".into(),
                    reason: "by hand".into(),
                },
            ),
        ];
        let steps = steps(&events, 2);
        assert!(steps[0].is_empty());
        let what: Vec<&str> = steps[1].iter().map(|e| e.what.as_str()).collect();
        assert_eq!(
            what,
            [
                "command prepared",
                "dispatched",
                "timed out",
                "retry scheduled",
                "dispatched",
                "succeeded",
                "dispatched",
                "replied failed",
                "stuck"
            ]
        );
        assert_eq!(steps[1][0].data, Some(json!({"amount": 5})));
        assert_eq!(steps[1][4].attempt, Some((a, 2)));
        assert_eq!(steps[1][5].data, Some(json!({"id": 7})));
        assert_eq!(steps[1][7].note.as_deref(), Some("closed"));
        assert_eq!(steps[1][8].attempt, None);
        let actions = actions(&events);
        assert_eq!(actions.len(), 1);
        assert_eq!(
            (actions[0].actor.as_str(), actions[0].reason.as_str()),
            ("oncall", "by hand")
        );
    }

    #[test]
    fn a_step_graph_is_layered_by_its_longest_chain_of_dependencies() {
        // create; then reserve and charge together; ship after both; notify after create.
        let deps = vec![vec![], vec![0], vec![0], vec![1, 2], vec![0]];
        assert_eq!(layers(&deps), vec![vec![0], vec![1, 2, 4], vec![3]]);
        assert_eq!(
            layers(&[vec![], vec![0], vec![1]]),
            vec![vec![0], vec![1], vec![2]]
        );
        assert!(layers(&[]).is_empty());
    }
}
