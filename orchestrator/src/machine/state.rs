//! The state of an instance and its steps, as the log's events build it, and the timers it keeps.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::definition::{Mode, Plan};
use sagas_participant::protocol::Operation;

/// A point in time (UTC).
pub type Time = DateTime<Utc>;

/// Status of an instance, as the API and `sagactl` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Forward steps (or TCC tries/confirms) are in progress.
    Running,
    /// A failure happened; compensations (or cancels) are in progress.
    Compensating,
    /// Every step succeeded (saga) or was confirmed (TCC).
    Completed,
    /// Every step that may have run was compensated (or cancelled).
    Compensated,
    /// A compensate/confirm/cancel exhausted its retry budget or was refused; needs an operator.
    Stuck,
    /// An operator handled a stuck instance by hand (terminal).
    Resolved,
}

impl Status {
    /// Every status, in a stable order.
    pub const ALL: [Status; 6] = [
        Status::Running,
        Status::Compensating,
        Status::Completed,
        Status::Compensated,
        Status::Stuck,
        Status::Resolved,
    ];

    /// The database/API name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Compensating => "compensating",
            Status::Completed => "completed",
            Status::Compensated => "compensated",
            Status::Stuck => "stuck",
            Status::Resolved => "resolved",
        }
    }

    /// Parses a database/API name.
    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// True when nothing more will happen to the instance.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Completed | Status::Compensated | Status::Resolved
        )
    }
}

/// Where the instance is in its protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Actions (saga) or tries (TCC).
    Forward,
    /// TCC confirms.
    Confirming,
    /// Compensations (saga) or cancels (TCC).
    Undoing,
    /// Terminal.
    Done,
}

/// Status of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not dispatched.
    Pending,
    /// The forward operation is dispatched (awaiting a reply or a retry).
    Running,
    /// The forward operation succeeded.
    Succeeded,
    /// The forward operation failed for good and did not take effect.
    Failed,
    /// The forward operation gave up without a definite answer: it may have run.
    Unknown,
    /// Compensation dispatched.
    Compensating,
    /// Compensated.
    Compensated,
    /// Confirm dispatched.
    Confirming,
    /// Confirmed.
    Confirmed,
    /// Cancel dispatched.
    Cancelling,
    /// Cancelled.
    Cancelled,
}

impl StepStatus {
    /// The database/API name.
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Running => "running",
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
            StepStatus::Unknown => "unknown",
            StepStatus::Compensating => "compensating",
            StepStatus::Compensated => "compensated",
            StepStatus::Confirming => "confirming",
            StepStatus::Confirmed => "confirmed",
            StepStatus::Cancelling => "cancelling",
            StepStatus::Cancelled => "cancelled",
        }
    }

    /// The operation this status waits on, if any.
    pub fn outstanding(self, mode: Mode) -> Option<Operation> {
        match self {
            StepStatus::Running => Some(match mode {
                Mode::Saga => Operation::Action,
                Mode::Tcc => Operation::Try,
            }),
            StepStatus::Compensating => Some(Operation::Compensate),
            StepStatus::Confirming => Some(Operation::Confirm),
            StepStatus::Cancelling => Some(Operation::Cancel),
            _ => None,
        }
    }

    /// True when the forward operation may have taken effect and is not undone or confirmed yet.
    pub(super) fn needs_undo(self) -> bool {
        matches!(
            self,
            StepStatus::Running | StepStatus::Succeeded | StepStatus::Unknown
        )
    }
}

/// What a step is waiting for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "for", rename_all = "snake_case")]
pub enum Waiting {
    /// Nothing.
    #[default]
    Nothing,
    /// The reply to the current attempt, until `deadline`.
    Reply {
        /// When the attempt times out.
        deadline: Time,
    },
    /// The next attempt, at `until`.
    Backoff {
        /// When the next attempt is sent.
        until: Time,
    },
    /// A wait step's signal, until `until`; then the step fails.
    Signal {
        /// When the wait times out.
        until: Time,
    },
}

impl Waiting {
    /// Whether the step waits for nothing (a stored step leaves it out then).
    pub fn is_nothing(&self) -> bool {
        matches!(self, Waiting::Nothing)
    }
}

/// Whether a count is zero (a stored step leaves it out then).
fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// State of one step of an instance.
///
/// Stored as JSON in every transition's projection row, so a field at its default (the value
/// of [`StepState::new`]) is left out and read back as that default: a finished three-step
/// saga's state is about a third smaller, which is less to parse, store and log per transition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepState {
    /// Status.
    pub status: StepStatus,
    /// Attempts made of the current operation.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempt: u32,
    /// Attempts that an operator retry has written off (the budget counts from here).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub budget_from: u32,
    /// What the step waits for.
    #[serde(default, skip_serializing_if = "Waiting::is_nothing")]
    pub waiting: Waiting,
    /// The forward command, logged before its first dispatch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// The forward output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// The last error or failure reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// True when the step's compensate/confirm/cancel needs an operator.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stuck: bool,
    /// True when the participant answered the current attempt `in_progress`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub in_progress: bool,
    /// When the current attempt was sent (for its trace span; absent in states stored before
    /// it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<Time>,
    /// True when an operator resolved the instance while this step was stuck or had an
    /// operation outstanding: the step was settled by hand, and its status and last error are
    /// what they were then. Left out of the stored projection while false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resolved_by_hand: bool,
    /// The id of the signal a wait step received (its data is `output`): the same id again
    /// is answered as before, without a change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal_id: Option<String>,
}

impl StepState {
    /// The step turns to `op` (dispatched or postponed): its status says so, a budget written
    /// off for another operation no longer applies, and nothing is stuck or in progress.
    pub(super) fn begin(&mut self, mode: Mode, op: Operation) {
        let previous = self.status.outstanding(mode);
        self.status = match op {
            Operation::Action | Operation::Try => StepStatus::Running,
            Operation::Compensate => StepStatus::Compensating,
            Operation::Confirm => StepStatus::Confirming,
            Operation::Cancel => StepStatus::Cancelling,
        };
        if previous != Some(op) {
            self.budget_from = 0;
        }
        self.stuck = false;
        self.in_progress = false;
    }

    pub(super) fn new() -> StepState {
        StepState {
            status: StepStatus::Pending,
            attempt: 0,
            budget_from: 0,
            waiting: Waiting::Nothing,
            payload: None,
            output: None,
            last_error: None,
            stuck: false,
            in_progress: false,
            sent_at: None,
            resolved_by_hand: false,
            signal_id: None,
        }
    }
}

/// The state of one transaction: the projection stored next to its log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// Transaction id.
    pub id: Uuid,
    /// The definition's plan as it was when the instance started.
    pub plan: Plan,
    /// The input.
    pub input: Value,
    /// Status.
    pub status: Status,
    /// Phase.
    pub phase: Phase,
    /// One entry per step of the plan.
    pub steps: Vec<StepState>,
    /// Why the instance is compensating or compensated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Events applied so far (the sequence number of the last one).
    pub seq: u64,
    /// When a running instance is compensated if it has not finished its forward phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Time>,
    /// The W3C trace context of the request that started it, passed on in every command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl Instance {
    /// Marks the steps an operator settled by hand: when a resolve finishes the instance,
    /// every step that was stuck or had an operation outstanding. A function of the state
    /// alone that only ever adds marks, so a resolved projection stored before steps carried
    /// the mark gets the same ones, and one that has them is left as it is.
    pub fn mark_resolved_by_hand(&mut self) {
        let mode = self.plan.mode;
        for s in &mut self.steps {
            if s.stuck || s.status.outstanding(mode).is_some() {
                s.resolved_by_hand = true;
            }
        }
    }
}

/// A timer the machine asks the engine to keep: a reply deadline (for a wait step, the end of
/// its wait), a retry backoff or the instance's deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timer {
    /// Step index.
    pub step: usize,
    /// Deadline or backoff.
    pub kind: TimerKind,
    /// The operation it is about.
    pub operation: Operation,
    /// The attempt it is about (for a backoff: the attempt to send).
    pub attempt: u32,
}

impl Timer {
    /// The timer's key within its instance: one timer per step at a time.
    pub fn key(&self) -> String {
        match self.kind {
            TimerKind::Expiry => DEADLINE_KEY.to_owned(),
            _ => timer_key(self.step),
        }
    }
}

/// The key of the instance's deadline timer.
pub const DEADLINE_KEY: &str = "deadline";

/// The key of step `step`'s timer: its reply deadline or its backoff, one at a time.
pub(super) fn timer_key(step: usize) -> String {
    format!("step:{step}")
}

/// The kinds of timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimerKind {
    /// The current attempt has waited long enough for its reply.
    Deadline,
    /// Time to send the next attempt.
    Backoff,
    /// The instance's deadline passed.
    Expiry,
}

impl TimerKind {
    /// The name in the stored timer and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            TimerKind::Deadline => "deadline",
            TimerKind::Backoff => "backoff",
            TimerKind::Expiry => "expiry",
        }
    }
}
