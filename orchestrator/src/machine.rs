//! The saga/TCC state machine: a pure function `(instance, input) -> (events, effects)`.
//!
//! No I/O, no clock, no randomness: the current time comes with every call, jitter is derived
//! from the instance id, and the only code it runs is the definition's command functions for
//! forward steps (through [`Commands`]). Every change of state is an [`Event`]; the new state
//! is the fold of [`apply`] over the events, so replaying the log rebuilds the same state.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::definition::{Definition, Mode, Outputs, Plan, RetryPolicy};
use sagas_participant::protocol::{Command, Operation, Outcome, PROTOCOL_VERSION, Reply};

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
    fn needs_undo(self) -> bool {
        matches!(
            self,
            StepStatus::Running | StepStatus::Succeeded | StepStatus::Unknown
        )
    }
}

/// What a step is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "for", rename_all = "snake_case")]
pub enum Waiting {
    /// Nothing.
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
}

/// State of one step of an instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepState {
    /// Status.
    pub status: StepStatus,
    /// Attempts made of the current operation.
    pub attempt: u32,
    /// Attempts that an operator retry has written off (the budget counts from here).
    #[serde(default)]
    pub budget_from: u32,
    /// What the step waits for.
    pub waiting: Waiting,
    /// The forward command, logged before its first dispatch.
    pub payload: Option<Value>,
    /// The forward output.
    pub output: Option<Value>,
    /// The last error or failure reason.
    pub last_error: Option<String>,
    /// True when the step's compensate/confirm/cancel needs an operator.
    #[serde(default)]
    pub stuck: bool,
    /// True when the participant answered the current attempt `in_progress`.
    #[serde(default)]
    pub in_progress: bool,
}

impl StepState {
    fn new() -> StepState {
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

/// A timer the machine asks the engine to keep: a reply deadline or a retry backoff.
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

fn timer_key(step: usize) -> String {
    format!("step:{step}")
}

/// The two kinds of timers.
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

/// An input to an existing instance.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A participant's reply.
    Reply(Reply),
    /// A timer came due.
    Timer(Timer),
    /// An operator asks to compensate a running instance now.
    Abort {
        /// Who asked.
        actor: String,
        /// Why.
        reason: String,
    },
    /// An operator asks to retry stuck or backing-off operations now.
    Retry {
        /// Who asked.
        actor: String,
        /// Why.
        reason: String,
    },
    /// An operator has handled a stuck instance by hand; it ends `resolved`.
    Resolve {
        /// Who.
        actor: String,
        /// What was done, and why.
        reason: String,
    },
}

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
    /// A forward operation exhausted its attempts without a definite answer: it may have run.
    GaveUp {
        /// Step index.
        step: usize,
        /// Operation.
        operation: Operation,
        /// Why.
        reason: String,
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
        /// `abort` or `retry`.
        action: String,
        /// Who.
        actor: String,
        /// Why.
        reason: String,
    },
    /// The instance reached a terminal status.
    Finished {
        /// `completed` or `compensated`.
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
            Event::GaveUp { .. } => "gave_up",
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
            | Event::GaveUp { step, .. }
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
            | Event::RetryScheduled { attempt, .. } => Some(*attempt),
            _ => None,
        }
    }
}

/// Something the engine must do after committing a transition.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Publish a command to a participant (through the outbox).
    Send {
        /// The participant (routing key).
        participant: String,
        /// The command.
        command: Command,
    },
    /// Create or replace the timer with this key.
    SetTimer {
        /// When it comes due.
        at: Time,
        /// What it carries back.
        timer: Timer,
    },
    /// Delete the timer with this key.
    CancelTimer {
        /// Timer key ([`Timer::key`]).
        key: String,
    },
}

/// The result of handling one input: the events to append and the effects to carry out.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The instance after the events.
    pub instance: Instance,
    /// New events, in order (the first has sequence number `instance.seq - events.len() + 1`).
    pub events: Vec<Event>,
    /// Effects, in order.
    pub effects: Vec<Effect>,
}

impl Transition {
    /// The commands it sends, in order, with their participant.
    pub fn sends(&self) -> impl Iterator<Item = (&String, &Command)> {
        self.effects.iter().filter_map(|e| match e {
            Effect::Send {
                participant,
                command,
            } => Some((participant, command)),
            _ => None,
        })
    }
}

/// Why an operator input does not fit the instance.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub String);

/// Computes forward commands; implemented by [`Definition`], faked in tests.
pub trait Commands {
    /// The command payload of step `step`.
    fn command(&self, step: usize, input: &Value, outputs: &Outputs<'_>) -> Result<Value, String>;
}

impl Commands for Definition {
    fn command(&self, step: usize, input: &Value, outputs: &Outputs<'_>) -> Result<Value, String> {
        Definition::command(self, step, input, outputs)
    }
}

/// Commands when the instance's definition is not registered in this process (say, a version
/// no longer deployed): it computes nothing and remembers that it was asked, so the engine can
/// leave the input to a process that has the definition instead of failing the step.
#[derive(Debug, Default)]
pub struct MissingDefinition {
    asked: std::cell::Cell<bool>,
}

impl MissingDefinition {
    /// True when the transition needed a forward command.
    pub fn was_asked(&self) -> bool {
        self.asked.get()
    }
}

impl Commands for MissingDefinition {
    fn command(&self, _: usize, _: &Value, _: &Outputs<'_>) -> Result<Value, String> {
        self.asked.set(true);
        Err("the definition is not registered in this process".to_owned())
    }
}

/// Creates an instance and dispatches its first step(s).
pub fn start(id: Uuid, plan: Plan, input: Value, now: Time, commands: &dyn Commands) -> Transition {
    start_with(id, plan, input, Begin::default(), now, commands)
}

/// Options of [`start_with`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Begin {
    /// If the forward phase has not finished by then, the instance is compensated.
    pub deadline: Option<Time>,
    /// The W3C trace context to pass on to participants.
    pub traceparent: Option<String>,
}

/// Like [`start`], with a deadline and a trace context.
pub fn start_with(
    id: Uuid,
    plan: Plan,
    input: Value,
    begin: Begin,
    now: Time,
    commands: &dyn Commands,
) -> Transition {
    let Begin {
        deadline,
        traceparent,
    } = begin;
    let forward = match plan.mode {
        Mode::Saga => Operation::Action,
        Mode::Tcc => Operation::Try,
    };
    let started = Event::Started {
        id,
        plan,
        input,
        deadline,
        traceparent,
    };
    let instance = replay([&started]).expect("a log that begins with started");
    let mut t = Step {
        inst: instance,
        now,
        commands,
        events: vec![started],
        effects: Vec::new(),
    };
    if let Some(at) = deadline {
        t.effects.push(Effect::SetTimer {
            at,
            timer: Timer {
                step: 0,
                kind: TimerKind::Expiry,
                operation: forward,
                attempt: 0,
            },
        });
    }
    t.advance();
    t.finish()
}

/// Handles one input; `Err` only for operator inputs that do not fit the instance's state.
pub fn handle(
    instance: &Instance,
    input: Input,
    now: Time,
    commands: &dyn Commands,
) -> Result<Transition, Rejected> {
    let mut t = Step {
        inst: instance.clone(),
        now,
        commands,
        events: Vec::new(),
        effects: Vec::new(),
    };
    match input {
        Input::Reply(reply) => t.on_reply(reply),
        Input::Timer(timer) => t.on_timer(timer),
        Input::Abort { actor, reason } => t.on_abort(actor, reason)?,
        Input::Retry { actor, reason } => t.on_retry(actor, reason)?,
        Input::Resolve { actor, reason } => t.on_resolve(actor, reason)?,
    }
    t.advance();
    Ok(t.finish())
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
            if let Some(s) = inst.steps.get_mut(*step) {
                let previous = s.status.outstanding(mode);
                s.status = match operation {
                    Operation::Action | Operation::Try => StepStatus::Running,
                    Operation::Compensate => StepStatus::Compensating,
                    Operation::Confirm => StepStatus::Confirming,
                    Operation::Cancel => StepStatus::Cancelling,
                };
                if previous != Some(*operation) {
                    s.budget_from = 0;
                }
                s.attempt = *attempt;
                s.waiting = Waiting::Reply {
                    deadline: *deadline,
                };
                s.stuck = false;
                s.in_progress = false;
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
            if action == "retry" {
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
        Event::GaveUp { step, reason, .. } => {
            if let Some(s) = inst.steps.get_mut(*step) {
                s.status = StepStatus::Unknown;
                s.waiting = Waiting::Nothing;
                s.last_error = Some(reason.clone());
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
fn non_null(v: &Value) -> Option<Value> {
    (!v.is_null()).then(|| v.clone())
}

/// The transition under construction: every emitted event is applied at once, so decisions
/// always read the state that the log will rebuild.
struct Step<'a> {
    inst: Instance,
    now: Time,
    commands: &'a dyn Commands,
    events: Vec<Event>,
    effects: Vec<Effect>,
}

impl Step<'_> {
    fn finish(mut self) -> Transition {
        let finished = self
            .events
            .iter()
            .any(|e| matches!(e, Event::Finished { .. }));
        if finished && self.inst.deadline.is_some() {
            self.effects.push(Effect::CancelTimer {
                key: DEADLINE_KEY.to_owned(),
            });
        }
        Transition {
            instance: self.inst,
            events: self.events,
            effects: self.effects,
        }
    }

    fn emit(&mut self, event: Event) {
        apply(&mut self.inst, &event);
        self.events.push(event);
    }

    fn on_reply(&mut self, reply: Reply) {
        let index = self.inst.plan.step_index(&reply.step);
        let ignore = |t: &mut Self, reason: String| {
            t.emit(Event::ReplyIgnored {
                step: index,
                step_name: reply.step.clone(),
                operation: reply.operation,
                attempt: reply.attempt,
                outcome: reply.outcome.status().to_owned(),
                reason,
            })
        };
        let Some(i) = index else {
            return ignore(self, format!("the plan has no step {}", reply.step));
        };
        let s = &self.inst.steps[i];
        let outstanding = s.status.outstanding(self.inst.plan.mode);
        if outstanding != Some(reply.operation) {
            let why = format!(
                "no {} of step {} is outstanding (the step is {})",
                reply.operation,
                reply.step,
                s.status.as_str()
            );
            return ignore(self, why);
        }
        if reply.attempt == 0 || reply.attempt > s.attempt {
            let why = format!("attempt {} was never sent", reply.attempt);
            return ignore(self, why);
        }
        let current_attempt = reply.attempt == s.attempt;
        let awaiting_reply = matches!(s.waiting, Waiting::Reply { .. });
        if let Outcome::InProgress { .. } = &reply.outcome {
            if !(current_attempt && awaiting_reply) || s.in_progress {
                return ignore(
                    self,
                    "the attempt is not awaiting a first answer".to_owned(),
                );
            }
            let until = self.inst.plan.steps[i].in_progress_timeout_ms;
            let deadline = self.now + Duration::milliseconds(until as i64);
            let (op, attempt) = (reply.operation, reply.attempt);
            self.emit(Event::Replied {
                step: i,
                operation: op,
                attempt,
                outcome: reply.outcome,
            });
            self.emit(Event::Extended {
                step: i,
                operation: op,
                attempt,
                deadline,
            });
            self.effects.push(Effect::SetTimer {
                at: deadline,
                timer: Timer {
                    step: i,
                    kind: TimerKind::Deadline,
                    operation: op,
                    attempt,
                },
            });
            return;
        }
        if let Outcome::Retry {
            reason,
            retry_after_ms,
        } = &reply.outcome
        {
            // A transient error of an older attempt says nothing about the newer one.
            if !(current_attempt && awaiting_reply) {
                return ignore(self, "a newer attempt is under way".to_owned());
            }
            let (reason, hint) = (reason.clone(), *retry_after_ms);
            self.emit(Event::Replied {
                step: i,
                operation: reply.operation,
                attempt: reply.attempt,
                outcome: reply.outcome,
            });
            self.retry_or_give_up(i, reply.operation, reason, hint.unwrap_or(0));
            return;
        }
        // A definite answer (succeeded/failed) to any attempt holds for all of them: the
        // participant's barrier gives every attempt the same outcome.
        let failed_reason = match &reply.outcome {
            Outcome::Failed { reason } => Some(reason.clone()),
            _ => None,
        };
        self.emit(Event::Replied {
            step: i,
            operation: reply.operation,
            attempt: reply.attempt,
            outcome: reply.outcome,
        });
        self.effects.push(Effect::CancelTimer { key: timer_key(i) });
        if let Some(reason) = failed_reason
            && !reply.operation.is_forward()
        {
            self.emit(Event::Stuck {
                step: i,
                operation: reply.operation,
                reason: format!(
                    "{} answered failed ({reason}); {} must not fail, an operator must resolve it",
                    reply.operation, reply.operation
                ),
            });
        }
    }

    fn on_timer(&mut self, timer: Timer) {
        if timer.kind == TimerKind::Expiry {
            // Past its deadline, a transaction still moving forward is compensated; one already
            // confirming or compensating goes on (its forward phase did finish).
            if self.inst.phase == Phase::Forward
                && let Some(deadline) = self.inst.deadline
            {
                self.emit(Event::UndoStarted {
                    reason: format!("deadline {} passed", deadline.to_rfc3339()),
                });
            }
            return;
        }
        let Some(s) = self.inst.steps.get(timer.step) else {
            return;
        };
        if s.status.outstanding(self.inst.plan.mode) != Some(timer.operation) {
            return;
        }
        match (timer.kind, s.waiting) {
            (TimerKind::Deadline, Waiting::Reply { .. }) if timer.attempt == s.attempt => {
                let in_progress = s.in_progress;
                self.emit(Event::TimedOut {
                    step: timer.step,
                    operation: timer.operation,
                    attempt: timer.attempt,
                });
                let plan = &self.inst.plan.steps[timer.step];
                let reason = if in_progress {
                    format!(
                        "in progress for longer than {} ms",
                        plan.in_progress_timeout_ms
                    )
                } else {
                    format!("no reply within {} ms", plan.timeout_ms)
                };
                self.retry_or_give_up(timer.step, timer.operation, reason, 0);
            }
            (TimerKind::Backoff, Waiting::Backoff { .. }) if timer.attempt == s.attempt + 1 => {
                self.dispatch(timer.step, timer.operation, timer.attempt);
            }
            _ => {} // stale: superseded by a reply or a newer attempt
        }
    }

    fn on_abort(&mut self, actor: String, reason: String) -> Result<(), Rejected> {
        if self.inst.phase != Phase::Forward {
            return Err(Rejected(format!(
                "only a running instance in its forward phase can be aborted; this one is {} ({:?})",
                self.inst.status.as_str(),
                self.inst.phase
            )));
        }
        let why = format!("aborted by {actor}: {reason}");
        self.emit(Event::OperatorAction {
            action: "abort".to_owned(),
            actor,
            reason,
        });
        self.emit(Event::UndoStarted { reason: why });
        Ok(())
    }

    fn on_retry(&mut self, actor: String, reason: String) -> Result<(), Rejected> {
        let mode = self.inst.plan.mode;
        let targets: Vec<(usize, Operation, u32)> = self
            .inst
            .steps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.stuck || matches!(s.waiting, Waiting::Backoff { .. }))
            .filter_map(|(i, s)| Some((i, s.status.outstanding(mode)?, s.attempt)))
            .collect();
        if targets.is_empty() {
            return Err(Rejected(format!(
                "nothing to retry: no step is stuck or waiting to retry (the instance is {})",
                self.inst.status.as_str()
            )));
        }
        self.emit(Event::OperatorAction {
            action: "retry".to_owned(),
            actor,
            reason,
        });
        for (i, op, attempt) in targets {
            self.dispatch(i, op, attempt + 1);
        }
        Ok(())
    }

    fn on_resolve(&mut self, actor: String, reason: String) -> Result<(), Rejected> {
        if self.inst.status != Status::Stuck {
            return Err(Rejected(format!(
                "only a stuck instance can be resolved by hand; this one is {}",
                self.inst.status.as_str()
            )));
        }
        self.emit(Event::OperatorAction {
            action: "resolve".to_owned(),
            actor,
            reason,
        });
        self.emit(Event::Finished {
            status: Status::Resolved,
        });
        for i in 0..self.inst.steps.len() {
            self.effects.push(Effect::CancelTimer { key: timer_key(i) });
        }
        Ok(())
    }

    fn retry_or_give_up(&mut self, i: usize, op: Operation, reason: String, hint_ms: u64) {
        let plan = &self.inst.plan.steps[i];
        let policy: RetryPolicy = if op.is_forward() {
            plan.retry
        } else {
            plan.finish_retry
        };
        let s = &self.inst.steps[i];
        let used = s.attempt.saturating_sub(s.budget_from);
        if used < policy.max_attempts {
            let unit = jitter_unit(self.inst.id, i, op, s.attempt);
            let delay = policy.delay_ms(used, unit).max(hint_ms);
            let at = self.now + Duration::milliseconds(delay as i64);
            let attempt = s.attempt + 1;
            self.emit(Event::RetryScheduled {
                step: i,
                operation: op,
                attempt,
                at,
            });
            self.effects.push(Effect::SetTimer {
                at,
                timer: Timer {
                    step: i,
                    kind: TimerKind::Backoff,
                    operation: op,
                    attempt,
                },
            });
        } else if op.is_forward() {
            let reason = format!("{used} attempt(s) without a definite reply; last: {reason}");
            self.emit(Event::GaveUp {
                step: i,
                operation: op,
                reason,
            });
            self.effects.push(Effect::CancelTimer { key: timer_key(i) });
        } else {
            let reason = format!("{op} exhausted {used} attempt(s); last: {reason}");
            self.emit(Event::Stuck {
                step: i,
                operation: op,
                reason,
            });
            self.effects.push(Effect::CancelTimer { key: timer_key(i) });
        }
    }

    fn dispatch(&mut self, i: usize, op: Operation, attempt: u32) {
        let plan = &self.inst.plan.steps[i];
        let deadline = self.now + Duration::milliseconds(plan.timeout_ms as i64);
        let participant = plan.participant.clone();
        let step_name = plan.name.clone();
        self.emit(Event::Dispatched {
            step: i,
            operation: op,
            attempt,
            deadline,
        });
        let s = &self.inst.steps[i];
        let command = Command {
            protocol: PROTOCOL_VERSION,
            transaction_id: self.inst.id,
            definition: self.inst.plan.name.clone(),
            step: step_name,
            operation: op,
            attempt,
            payload: s.payload.clone().unwrap_or(Value::Null),
            output: if op.is_forward() {
                None
            } else {
                s.output.clone()
            },
            deadline: Some(deadline),
            traceparent: self.inst.traceparent.clone(),
        };
        self.effects.push(Effect::Send {
            participant,
            command,
        });
        self.effects.push(Effect::SetTimer {
            at: deadline,
            timer: Timer {
                step: i,
                kind: TimerKind::Deadline,
                operation: op,
                attempt,
            },
        });
    }

    /// Computes and logs the forward command of step `i`; false if it could not be computed.
    fn prepare(&mut self, i: usize) -> bool {
        let outputs: Vec<Option<Value>> =
            self.inst.steps.iter().map(|s| s.output.clone()).collect();
        let result = self.commands.command(
            i,
            &self.inst.input,
            &Outputs::new(&self.inst.plan.steps, &outputs),
        );
        match result {
            Ok(payload) => {
                self.emit(Event::CommandPrepared { step: i, payload });
                true
            }
            Err(error) => {
                self.emit(Event::PreparationFailed { step: i, error });
                false
            }
        }
    }

    fn failure_reason(&self) -> Option<String> {
        self.inst.steps.iter().enumerate().find_map(|(i, s)| {
            let name = &self.inst.plan.steps[i].name;
            let err = s.last_error.as_deref().unwrap_or("no reason given");
            match s.status {
                StepStatus::Failed => Some(format!("step {name} failed: {err}")),
                StepStatus::Unknown => Some(format!("step {name} gave up: {err}")),
                _ => None,
            }
        })
    }

    /// Moves the instance on as far as it can go without new input.
    fn advance(&mut self) {
        loop {
            match self.inst.phase {
                Phase::Done => return,
                Phase::Forward => {
                    if let Some(reason) = self.failure_reason() {
                        self.emit(Event::UndoStarted { reason });
                        continue;
                    }
                    let steps = &self.inst.steps;
                    let pending: Vec<usize> = (0..steps.len())
                        .filter(|&i| steps[i].status == StepStatus::Pending)
                        .collect();
                    let running = steps.iter().any(|s| s.status == StepStatus::Running);
                    match self.inst.plan.mode {
                        Mode::Saga => {
                            let plan = &self.inst.plan;
                            let ready: Vec<usize> = pending
                                .iter()
                                .copied()
                                .filter(|&i| {
                                    plan.deps(i)
                                        .iter()
                                        .all(|&d| steps[d].status == StepStatus::Succeeded)
                                })
                                .collect();
                            if ready.is_empty() {
                                if !running && pending.is_empty() {
                                    self.emit(Event::Finished {
                                        status: Status::Completed,
                                    });
                                }
                                return;
                            }
                            // Prepare every ready step before sending any, so that a command
                            // that cannot be computed sends nothing that needs undoing.
                            let mut all = true;
                            for &i in &ready {
                                all &= self.prepare(i);
                            }
                            if !all {
                                continue;
                            }
                            for i in ready {
                                self.dispatch(i, Operation::Action, 1);
                            }
                            return;
                        }
                        Mode::Tcc => {
                            if !pending.is_empty() {
                                let mut all = true;
                                for i in pending {
                                    all &= self.prepare(i);
                                }
                                if !all {
                                    continue; // compensate: nothing was sent yet
                                }
                                for i in 0..self.inst.steps.len() {
                                    self.dispatch(i, Operation::Try, 1);
                                }
                                return;
                            }
                            if running {
                                return;
                            }
                            self.emit(Event::ConfirmStarted);
                        }
                    }
                }
                Phase::Confirming => {
                    let to_confirm: Vec<usize> = (0..self.inst.steps.len())
                        .filter(|&i| self.inst.steps[i].status == StepStatus::Succeeded)
                        .collect();
                    for i in to_confirm {
                        self.dispatch(i, Operation::Confirm, 1);
                    }
                    if self
                        .inst
                        .steps
                        .iter()
                        .all(|s| s.status == StepStatus::Confirmed)
                    {
                        self.emit(Event::Finished {
                            status: Status::Completed,
                        });
                    }
                    return;
                }
                Phase::Undoing => {
                    let needs: Vec<usize> = (0..self.inst.steps.len())
                        .filter(|&i| self.inst.steps[i].status.needs_undo())
                        .collect();
                    let (undo_op, undoing) = match self.inst.plan.mode {
                        Mode::Saga => (Operation::Compensate, StepStatus::Compensating),
                        Mode::Tcc => (Operation::Cancel, StepStatus::Cancelling),
                    };
                    let in_flight = self.inst.steps.iter().any(|s| s.status == undoing);
                    match self.inst.plan.mode {
                        // A step is compensated once every step that ran after it is undone
                        // (or never ran): the reverse of the dependency order.
                        Mode::Saga => {
                            let steps = &self.inst.steps;
                            let plan = &self.inst.plan;
                            let ready: Vec<usize> = needs
                                .iter()
                                .copied()
                                .filter(|&i| {
                                    plan.dependents(i).iter().all(|&j| {
                                        matches!(
                                            steps[j].status,
                                            StepStatus::Pending
                                                | StepStatus::Failed
                                                | StepStatus::Compensated
                                        )
                                    })
                                })
                                .collect();
                            for &i in &ready {
                                self.dispatch(i, undo_op, 1);
                            }
                            if in_flight || !needs.is_empty() {
                                return;
                            }
                        }
                        // Cancels go out together.
                        Mode::Tcc => {
                            for &i in &needs {
                                self.dispatch(i, undo_op, 1);
                            }
                            if in_flight || !needs.is_empty() {
                                return;
                            }
                        }
                    }
                    self.emit(Event::Finished {
                        status: Status::Compensated,
                    });
                    return;
                }
            }
        }
    }
}

/// A number in `[0, 1)` fixed by the instance, step, operation and attempt (splitmix64), so that
/// retry jitter spreads instances apart yet replays identically.
fn jitter_unit(id: Uuid, step: usize, op: Operation, attempt: u32) -> f64 {
    let v = id.as_u128();
    let mut x = (v as u64)
        ^ ((v >> 64) as u64)
        ^ ((step as u64) << 40)
        ^ ((op as u64) << 32)
        ^ u64::from(attempt);
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests;
