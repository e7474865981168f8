//! The log: the events an instance is made of, and the fold that rebuilds it from them.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::state::{Instance, Phase, Status, StepState, StepStatus, Time, Waiting};
use crate::definition::{Mode, Plan};
use sagas_participant::protocol::{Operation, Outcome};

/// A fact in an instance's log. The instance state is the fold of [`apply`] over its events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// The instance was created.
    Started {
        /// The instance id.
        id: Uuid,
        /// The plan it runs.
        plan: Plan,
        /// The input.
        input: Value,
        /// When the forward phase must have finished, if ever.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deadline: Option<Time>,
        /// The trace context of the request that started it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        traceparent: Option<String>,
    },
    /// A forward command was computed and logged; every attempt sends this payload.
    CommandPrepared {
        /// Step index.
        step: usize,
        /// The command payload.
        payload: Value,
    },
    /// A forward command could not be computed: the step fails without being dispatched.
    PreparationFailed {
        /// Step index.
        step: usize,
        /// Why.
        error: String,
    },
    /// An attempt of an operation was sent (written to the outbox).
    Dispatched {
        /// Step index.
        step: usize,
        /// Operation.
        operation: Operation,
        /// Attempt number, from 1.
        attempt: u32,
        /// When this attempt times out.
        deadline: Time,
    },
    /// A reply was accepted.
    Replied {
        /// Step index.
        step: usize,
        /// Operation.
        operation: Operation,
        /// The attempt the reply answers.
        attempt: u32,
        /// The outcome.
        outcome: Outcome,
    },
    /// A reply matched nothing outstanding (a duplicate, a late or a stray reply).
    ReplyIgnored {
        /// The step named in the reply, if the plan has it.
        step: Option<usize>,
        /// The step name as given.
        step_name: String,
        /// Operation.
        operation: Operation,
        /// Attempt.
        attempt: u32,
        /// The outcome's status.
        outcome: String,
        /// Why it was ignored.
        reason: String,
    },
    /// The participant answered `in_progress`: the attempt now waits until `deadline`.
    Extended {
        /// Step index.
        step: usize,
        /// Operation.
        operation: Operation,
        /// Attempt.
        attempt: u32,
        /// The new deadline.
        deadline: Time,
    },
    /// An attempt got no reply before its deadline.
    TimedOut {
        /// Step index.
        step: usize,
        /// Operation.
        operation: Operation,
        /// Attempt.
        attempt: u32,
    },
    /// The next attempt will be sent at `at`.
    RetryScheduled {
        /// Step index.
        step: usize,
        /// Operation.
        operation: Operation,
        /// The attempt that will be sent.
        attempt: u32,
        /// When.
        at: Time,
    },
    /// The participant's circuit breaker was open when attempt `attempt` was due: it is not
    /// sent, and the step waits until `until` to try it again (the attempt keeps its number and
    /// is not counted against the budget). `forgiven`: the attempt before it ended (timed out
    /// or answered `retry`) while the breaker was open, and is not counted either.
    Postponed {
        /// Step index.
        step: usize,
        /// Operation.
        operation: Operation,
        /// The attempt that will be sent.
        attempt: u32,
        /// When it is due again.
        until: Time,
        /// The attempt before it is written off the budget.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        forgiven: bool,
    },
    /// A forward operation exhausted its attempts without a definite answer: it may have run.
    GaveUp {
        /// Step index.
        step: usize,
        /// Operation.
        operation: Operation,
        /// Why.
        reason: String,
    },
    /// A wait step began waiting for its signal, until `until`.
    AwaitingSignal {
        /// Step index.
        step: usize,
        /// The signal's name.
        signal: String,
        /// When the wait times out.
        until: Time,
    },
    /// A wait step received its signal; `data` is its output.
    Signalled {
        /// Step index.
        step: usize,
        /// The signal's name.
        signal: String,
        /// The sender's id of this signal (a repeat with the same id changes nothing).
        signal_id: String,
        /// The signal's data.
        data: Value,
    },
    /// A wait step's signal did not come before its timeout: the step failed.
    SignalTimedOut {
        /// Step index.
        step: usize,
        /// The signal's name.
        signal: String,
    },
    /// A wait step was undone: it changed nothing outside, so nothing is sent; a wait still
    /// open ends (a later signal is refused).
    WaitUndone {
        /// Step index.
        step: usize,
    },
    /// Compensation (saga) or cancellation (TCC) began.
    UndoStarted {
        /// Why.
        reason: String,
    },
    /// Every try succeeded; confirms begin.
    ConfirmStarted,
    /// A compensate/confirm/cancel needs an operator.
    Stuck {
        /// Step index.
        step: usize,
        /// Operation.
        operation: Operation,
        /// Why.
        reason: String,
    },
    /// An operator acted on the instance.
    OperatorAction {
        /// What the operator did.
        action: OperatorAction,
        /// Who.
        actor: String,
        /// Why.
        reason: String,
    },
    /// The instance reached a terminal status.
    Finished {
        /// `completed`, `compensated` or `resolved`.
        status: Status,
    },
}

impl Event {
    /// The event kind as stored in the log's `kind` column.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Started { .. } => "started",
            Event::CommandPrepared { .. } => "command_prepared",
            Event::PreparationFailed { .. } => "preparation_failed",
            Event::Dispatched { .. } => "dispatched",
            Event::Replied { .. } => "replied",
            Event::ReplyIgnored { .. } => "reply_ignored",
            Event::Extended { .. } => "extended",
            Event::TimedOut { .. } => "timed_out",
            Event::RetryScheduled { .. } => "retry_scheduled",
            Event::Postponed { .. } => "postponed",
            Event::GaveUp { .. } => "gave_up",
            Event::AwaitingSignal { .. } => "awaiting_signal",
            Event::Signalled { .. } => "signalled",
            Event::SignalTimedOut { .. } => "signal_timed_out",
            Event::WaitUndone { .. } => "wait_undone",
            Event::UndoStarted { .. } => "undo_started",
            Event::ConfirmStarted => "confirm_started",
            Event::Stuck { .. } => "stuck",
            Event::OperatorAction { .. } => "operator_action",
            Event::Finished { .. } => "finished",
        }
    }

    /// The step the event is about, if any.
    pub fn step(&self) -> Option<usize> {
        match self {
            Event::CommandPrepared { step, .. }
            | Event::PreparationFailed { step, .. }
            | Event::Dispatched { step, .. }
            | Event::Replied { step, .. }
            | Event::TimedOut { step, .. }
            | Event::Extended { step, .. }
            | Event::RetryScheduled { step, .. }
            | Event::Postponed { step, .. }
            | Event::GaveUp { step, .. }
            | Event::AwaitingSignal { step, .. }
            | Event::Signalled { step, .. }
            | Event::SignalTimedOut { step, .. }
            | Event::WaitUndone { step }
            | Event::Stuck { step, .. } => Some(*step),
            Event::ReplyIgnored { step, .. } => *step,
            _ => None,
        }
    }

    /// The operation the event is about, if any.
    pub fn operation(&self) -> Option<Operation> {
        match self {
            Event::Dispatched { operation, .. }
            | Event::Replied { operation, .. }
            | Event::ReplyIgnored { operation, .. }
            | Event::TimedOut { operation, .. }
            | Event::Extended { operation, .. }
            | Event::RetryScheduled { operation, .. }
            | Event::Postponed { operation, .. }
            | Event::GaveUp { operation, .. }
            | Event::Stuck { operation, .. } => Some(*operation),
            _ => None,
        }
    }

    /// The attempt the event is about, if any.
    pub fn attempt(&self) -> Option<u32> {
        match self {
            Event::Dispatched { attempt, .. }
            | Event::Replied { attempt, .. }
            | Event::ReplyIgnored { attempt, .. }
            | Event::TimedOut { attempt, .. }
            | Event::Extended { attempt, .. }
            | Event::RetryScheduled { attempt, .. }
            | Event::Postponed { attempt, .. } => Some(*attempt),
            _ => None,
        }
    }
}

/// What an operator did, as `operator_action` logs it and the metric
/// `sagas_operator_actions_total` labels it: `abort`, `retry` or `resolve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperatorAction {
    /// Compensate (or cancel) an instance still in its forward phase ([`super::Input::Abort`]).
    Abort,
    /// Send stuck or backing-off operations again now, stuck ones with a fresh budget
    /// ([`super::Input::Retry`]).
    Retry,
    /// A stuck instance was put right by hand; it ends `resolved` ([`super::Input::Resolve`]).
    Resolve,
}

impl OperatorAction {
    /// Every action, in a stable order.
    pub const ALL: [OperatorAction; 3] = [
        OperatorAction::Abort,
        OperatorAction::Retry,
        OperatorAction::Resolve,
    ];

    /// The input that asks for this action.
    pub fn input(self, actor: String, reason: String) -> super::Input {
        match self {
            OperatorAction::Abort => super::Input::Abort { actor, reason },
            OperatorAction::Retry => super::Input::Retry { actor, reason },
            OperatorAction::Resolve => super::Input::Resolve { actor, reason },
        }
    }

    /// The name in the log, the metric label and the HTTP route.
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorAction::Abort => "abort",
            OperatorAction::Retry => "retry",
            OperatorAction::Resolve => "resolve",
        }
    }
}

/// Rebuilds an instance from its log; `None` if the log does not begin with `started`.
pub fn replay<'a>(events: impl IntoIterator<Item = &'a Event>) -> Option<Instance> {
    let mut events = events.into_iter();
    let first = events.next()?;
    let Event::Started { id, .. } = first else {
        return None;
    };
    let mut instance = Instance {
        id: *id,
        plan: Plan {
            name: String::new(),
            version: 0,
            mode: Mode::Saga,
            steps: Vec::new(),
        },
        input: Value::Null,
        status: Status::Running,
        phase: Phase::Forward,
        steps: Vec::new(),
        failure: None,
        seq: 0,
        deadline: None,
        traceparent: None,
    };
    apply(&mut instance, first);
    for e in events {
        apply(&mut instance, e);
    }
    Some(instance)
}

/// Applies one event to the state. Total: an event that refers to a missing step changes nothing
/// but the sequence number.
pub fn apply(inst: &mut Instance, event: &Event) {
    inst.seq += 1;
    let mode = inst.plan.mode;
    match event {
        Event::Started {
            id,
            plan,
            input,
            deadline,
            traceparent,
        } => {
            inst.id = *id;
            inst.deadline = *deadline;
            inst.traceparent = traceparent.clone();
            inst.plan = plan.clone();
            inst.input = input.clone();
            inst.steps = plan.steps.iter().map(|_| StepState::new()).collect();
            inst.phase = Phase::Forward;
            inst.failure = None;
        }
        Event::CommandPrepared { step, payload } => {
            if let Some(s) = inst.steps.get_mut(*step) {
                s.payload = non_null(payload);
            }
        }
        Event::PreparationFailed { step, error } => {
            if let Some(s) = inst.steps.get_mut(*step) {
                s.status = StepStatus::Failed;
                s.last_error = Some(error.clone());
            }
        }
        Event::Dispatched {
            step,
            operation,
            attempt,
            deadline,
        } => {
            let timeout = inst.plan.steps.get(*step).map(|p| p.timeout_ms);
            if let Some(s) = inst.steps.get_mut(*step) {
                s.begin(mode, *operation);
                s.attempt = *attempt;
                s.waiting = Waiting::Reply {
                    deadline: *deadline,
                };
                // The dispatch set the deadline this long after it was sent.
                s.sent_at = timeout.map(|ms| *deadline - chrono::Duration::milliseconds(ms as i64));
            }
        }
        Event::Extended { step, deadline, .. } => {
            if let Some(s) = inst.steps.get_mut(*step) {
                s.waiting = Waiting::Reply {
                    deadline: *deadline,
                };
                s.in_progress = true;
            }
        }
        Event::Replied {
            step,
            operation,
            outcome,
            ..
        } => {
            if let Some(s) = inst.steps.get_mut(*step) {
                match outcome {
                    Outcome::Succeeded { output } => {
                        s.waiting = Waiting::Nothing;
                        s.stuck = false;
                        s.status = match operation {
                            Operation::Action | Operation::Try => {
                                s.output = non_null(output);
                                StepStatus::Succeeded
                            }
                            Operation::Compensate => StepStatus::Compensated,
                            Operation::Confirm => StepStatus::Confirmed,
                            Operation::Cancel => StepStatus::Cancelled,
                        };
                    }
                    Outcome::Failed { reason } => {
                        s.waiting = Waiting::Nothing;
                        s.last_error = Some(reason.clone());
                        if operation.is_forward() {
                            s.status = StepStatus::Failed;
                        }
                    }
                    Outcome::Retry { reason, .. } => {
                        s.waiting = Waiting::Nothing;
                        s.last_error = Some(reason.clone());
                    }
                    // The wait is extended by the `extended` event that follows.
                    Outcome::InProgress { .. } => {}
                }
            }
        }
        Event::ReplyIgnored { .. } => {}
        Event::OperatorAction { action, .. } => {
            if *action == OperatorAction::Retry {
                // The operator grants stuck steps a fresh retry budget.
                for s in inst.steps.iter_mut().filter(|s| s.stuck) {
                    s.budget_from = s.attempt;
                }
            }
        }
        Event::TimedOut {
            step, operation, ..
        } => {
            if let Some(s) = inst.steps.get_mut(*step) {
                s.waiting = Waiting::Nothing;
                s.last_error = Some(format!("{operation} timed out"));
            }
        }
        Event::RetryScheduled { step, at, .. } => {
            if let Some(s) = inst.steps.get_mut(*step) {
                s.waiting = Waiting::Backoff { until: *at };
            }
        }
        Event::Postponed {
            step,
            operation,
            attempt,
            until,
            forgiven,
        } => {
            if let Some(s) = inst.steps.get_mut(*step) {
                if *forgiven {
                    s.budget_from = (s.budget_from + 1).min(s.attempt);
                }
                s.begin(mode, *operation);
                s.attempt = attempt.saturating_sub(1);
                s.waiting = Waiting::Backoff { until: *until };
            }
        }
        Event::GaveUp { step, reason, .. } => {
            if let Some(s) = inst.steps.get_mut(*step) {
                s.status = StepStatus::Unknown;
                s.waiting = Waiting::Nothing;
                s.last_error = Some(reason.clone());
            }
        }
        Event::AwaitingSignal { step, until, .. } => {
            if let Some(s) = inst.steps.get_mut(*step) {
                s.status = StepStatus::Running;
                s.attempt = 1;
                s.waiting = Waiting::Signal { until: *until };
            }
        }
        Event::Signalled {
            step,
            signal_id,
            data,
            ..
        } => {
            if let Some(s) = inst.steps.get_mut(*step) {
                s.status = StepStatus::Succeeded;
                s.waiting = Waiting::Nothing;
                s.output = non_null(data);
                s.signal_id = Some(signal_id.clone());
            }
        }
        Event::SignalTimedOut { step, signal } => {
            let timeout = inst.plan.steps.get(*step).map_or(0, |p| p.timeout_ms);
            if let Some(s) = inst.steps.get_mut(*step) {
                s.status = StepStatus::Failed;
                s.waiting = Waiting::Nothing;
                s.last_error = Some(format!("no signal {signal} within {timeout} ms"));
            }
        }
        Event::WaitUndone { step } => {
            if let Some(s) = inst.steps.get_mut(*step) {
                s.status = StepStatus::Compensated;
                s.waiting = Waiting::Nothing;
            }
        }
        Event::UndoStarted { reason } => {
            inst.phase = Phase::Undoing;
            inst.failure = Some(reason.clone());
        }
        Event::ConfirmStarted => inst.phase = Phase::Confirming,
        Event::Stuck { step, reason, .. } => {
            if let Some(s) = inst.steps.get_mut(*step) {
                s.stuck = true;
                s.waiting = Waiting::Nothing;
                s.last_error = Some(reason.clone());
            }
        }
        Event::Finished { status } => {
            inst.phase = Phase::Done;
            inst.status = *status;
            // Only a resolve finishes an instance `resolved` (after its `operator_action`).
            if *status == Status::Resolved {
                inst.mark_resolved_by_hand();
            }
        }
    }
    if inst.phase != Phase::Done {
        inst.status = if inst.steps.iter().any(|s| s.stuck) {
            Status::Stuck
        } else if inst.phase == Phase::Undoing {
            Status::Compensating
        } else {
            Status::Running
        };
    }
}

/// `null` is kept as `None`: the projection is stored as JSON, where `Some(null)` and `None`
/// are both `null`, and the state must read back exactly as the log replays it.
pub(super) fn non_null(v: &Value) -> Option<Value> {
    (!v.is_null()).then(|| v.clone())
}
