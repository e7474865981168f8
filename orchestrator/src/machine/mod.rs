//! The saga/TCC state machine: a pure function `(instance, input) -> (events, effects)`.
//!
//! No I/O, no clock, no randomness: the current time comes with every call, jitter is derived
//! from the instance id, and the only code it runs is the definition's command functions for
//! forward steps (through [`Commands`]). Every change of state is an [`Event`]; the new state
//! is the fold of [`apply`] over the events, so replaying the log rebuilds the same state.
//!
//! This file holds the entry points ([`start`], [`handle`]) and the transition they build;
//! the state is in `state`, the log in `event`, and the rules in `reply` (replies), `retry`
//! (deadlines and retries), `saga` and `tcc` (how each mode moves on) and `operator`.

use chrono::Duration;
use serde_json::Value;
use uuid::Uuid;

use crate::definition::{Definition, Mode, Outputs, Plan};
use sagas_participant::protocol::{
    Command, Operation, Outcome, PROTOCOL_VERSION, Reply, TraceParent,
};

mod event;
mod operator;
mod reply;
mod retry;
mod saga;
mod signal;
mod state;
mod tcc;

pub use event::{Event, OperatorAction, apply, replay};
use state::timer_key;
pub use state::{
    DEADLINE_KEY, Instance, Phase, Status, StepState, StepStatus, Time, Timer, TimerKind, Waiting,
};

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
    /// The signal `name` for the wait step that waits for it.
    Signal {
        /// The signal's name.
        name: String,
        /// The sender's id of this signal: the same id again changes nothing.
        signal_id: String,
        /// The signal's data: the wait step's output.
        data: Value,
    },
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
    /// An attempt ended: it was answered (`outcome` is the reply's status) or timed out
    /// (`timed_out`). Nothing to store: the engine exports its trace span (see
    /// [`attempt_traceparent`]).
    AttemptEnded {
        /// Step index.
        step: usize,
        /// Operation.
        operation: Operation,
        /// The attempt.
        attempt: u32,
        /// When it was sent, when the state knows (the current attempt's).
        sent_at: Option<Time>,
        /// `succeeded`, `failed`, `retry`, `in_progress` or `timed_out`.
        outcome: &'static str,
    },
}

/// The W3C trace context a command carries: the instance's trace (`traceparent`, the starting
/// request's) with, as parent, the span of this attempt, whose id is derived from the
/// transaction, step, operation and attempt. Whichever process handles the attempt's end
/// exports that span with this id, so the participant's span for the command is its child.
/// `None` when the instance has no usable trace context.
pub fn attempt_traceparent(
    traceparent: Option<&str>,
    id: Uuid,
    step: usize,
    operation: Operation,
    attempt: u32,
) -> Option<String> {
    let trace = TraceParent::parse(traceparent?)?;
    Some(
        TraceParent {
            parent_id: format!("{:016x}", attempt_span_id(id, step, operation, attempt)),
            ..trace
        }
        .to_string(),
    )
}

/// The span id of an attempt (never 0): FNV-1a over its identity, the same in every process.
pub fn attempt_span_id(id: Uuid, step: usize, operation: Operation, attempt: u32) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = id
        .as_bytes()
        .iter()
        .copied()
        .chain((step as u64).to_be_bytes())
        .chain(operation.as_str().bytes())
        .chain(attempt.to_be_bytes());
    for b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash.max(1)
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

/// Why an operator input or a signal does not fit the instance.
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

/// What the participants' circuit breakers say when the machine decides: an input, like the
/// time. It is asked when an attempt is due or has just failed, never by [`apply`]: what it
/// said is logged (`postponed`), so replay rebuilds the same state without it.
pub trait Breakers {
    /// Whether an attempt to `participant` due at `now` may be sent: `None`, send it (the
    /// breaker is closed, or this attempt is its probe); `Some(until)`, postpone it until then.
    fn admit(&self, participant: &str, now: Time) -> Option<Time>;
    /// Whether the breaker of `participant` is open: an attempt that fails now is not counted
    /// against its step's budget.
    fn is_open(&self, participant: &str) -> bool;
}

/// Breakers that are always closed: every attempt is sent and counted (no breaker).
#[derive(Debug, Clone, Copy, Default)]
pub struct Closed;

impl Breakers for Closed {
    fn admit(&self, _: &str, _: Time) -> Option<Time> {
        None
    }
    fn is_open(&self, _: &str) -> bool {
        false
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

/// Creates an instance and dispatches its first step(s): [`start_with`] without options, every
/// breaker closed.
pub fn start(id: Uuid, plan: Plan, input: Value, now: Time, commands: &dyn Commands) -> Transition {
    start_with(
        id,
        plan,
        input,
        StartOptions::default(),
        now,
        commands,
        &Closed,
    )
}

/// The options of a start, as the `started` event logs them. The engine takes them from a
/// caller as [`crate::engine::StartOptions`]: it turns the deadline, relative there, into a
/// time, and hands the idempotency key to the store instead.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StartOptions {
    /// If the forward phase has not finished by then, the instance is compensated.
    pub deadline: Option<Time>,
    /// The W3C trace context to pass on to participants.
    pub traceparent: Option<String>,
}

/// Creates an instance with `options` and dispatches its first step(s), postponing those whose
/// participant's breaker holds them back (as [`handle_with`] does).
pub fn start_with(
    id: Uuid,
    plan: Plan,
    input: Value,
    options: StartOptions,
    now: Time,
    commands: &dyn Commands,
    breakers: &dyn Breakers,
) -> Transition {
    let StartOptions {
        deadline,
        traceparent,
    } = options;
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
    let mut t = Draft {
        inst: instance,
        now,
        commands,
        breakers,
        events: vec![started],
        effects: Vec::new(),
    };
    if let Some(at) = deadline {
        t.set_timer(at, TimerKind::Expiry, 0, forward, 0);
    }
    t.advance();
    t.finish()
}

/// Handles one input with every breaker closed: [`handle_with`] without breakers.
pub fn handle(
    instance: &Instance,
    input: Input,
    now: Time,
    commands: &dyn Commands,
) -> Result<Transition, Rejected> {
    handle_with(instance, input, now, commands, &Closed)
}

/// Handles one input, postponing the attempts that `breakers` hold back; `Err` only for
/// operator inputs and signals that do not fit the instance's state.
pub fn handle_with(
    instance: &Instance,
    input: Input,
    now: Time,
    commands: &dyn Commands,
    breakers: &dyn Breakers,
) -> Result<Transition, Rejected> {
    let mut t = Draft {
        inst: instance.clone(),
        now,
        commands,
        breakers,
        events: Vec::new(),
        effects: Vec::new(),
    };
    match input {
        Input::Reply(reply) => t.on_reply(reply),
        Input::Timer(timer) => t.on_timer(timer),
        Input::Abort { actor, reason } => t.on_abort(actor, reason)?,
        Input::Retry { actor, reason } => t.on_retry(actor, reason)?,
        Input::Resolve { actor, reason } => t.on_resolve(actor, reason)?,
        Input::Signal {
            name,
            signal_id,
            data,
        } => t.on_signal(name, signal_id, data)?,
    }
    t.advance();
    Ok(t.finish())
}

/// The transition being decided: every emitted event is applied at once, so decisions always
/// read the state that the log will rebuild. The rules add to it in the files beside this one.
struct Draft<'a> {
    inst: Instance,
    now: Time,
    commands: &'a dyn Commands,
    breakers: &'a dyn Breakers,
    events: Vec<Event>,
    effects: Vec<Effect>,
}

/// Whether [`Draft::advance`] looks again (the phase changed) or the instance waits for input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// The phase changed: another rule may apply.
    Again,
    /// Nothing more happens without input.
    Wait,
}

impl Draft<'_> {
    /// The transition decided; a finished instance no longer needs its deadline timer.
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

    /// Logs `event` and applies it at once.
    fn emit(&mut self, event: Event) {
        apply(&mut self.inst, &event);
        self.events.push(event);
    }

    /// Logs the reply to `attempt` of `op` of step `i` and says that the attempt ended.
    fn replied(&mut self, i: usize, op: Operation, attempt: u32, outcome: Outcome) {
        self.attempt_ended(i, op, attempt, outcome.status());
        self.emit(Event::Replied {
            step: i,
            operation: op,
            attempt,
            outcome,
        });
    }

    /// Says that `attempt` of `op` of step `i` ended with `outcome`, before anything is sent
    /// again (its time of sending is known only while it is the step's current attempt).
    fn attempt_ended(&mut self, i: usize, op: Operation, attempt: u32, outcome: &'static str) {
        let s = &self.inst.steps[i];
        let sent_at = s.sent_at.filter(|_| s.attempt == attempt);
        self.effects.push(Effect::AttemptEnded {
            step: i,
            operation: op,
            attempt,
            sent_at,
            outcome,
        });
    }

    /// Sends attempt `attempt` of `op` of step `i`, unless the participant's breaker holds it
    /// back: then it is postponed, uncounted, until the breaker's next probe.
    fn send(&mut self, i: usize, op: Operation, attempt: u32) {
        let participant = &self.inst.plan.steps[i].participant;
        match self.breakers.admit(participant, self.now) {
            None => self.dispatch(i, op, attempt),
            Some(until) => self.postpone(i, op, attempt, until.max(self.now), false),
        }
    }

    /// Logs that attempt `attempt` of `op` of step `i` waits until `until` (`forgiven`: the
    /// attempt before it is written off) and sets the timer that sends it then.
    fn postpone(&mut self, i: usize, op: Operation, attempt: u32, until: Time, forgiven: bool) {
        self.emit(Event::Postponed {
            step: i,
            operation: op,
            attempt,
            until,
            forgiven,
        });
        self.set_timer(until, TimerKind::Backoff, i, op, attempt);
    }

    /// Sends attempt `attempt` of `op` of step `i` and sets its reply deadline.
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
            traceparent: attempt_traceparent(
                self.inst.traceparent.as_deref(),
                self.inst.id,
                i,
                op,
                attempt,
            ),
        };
        self.effects.push(Effect::Send {
            participant,
            command,
        });
        self.set_timer(deadline, TimerKind::Deadline, i, op, attempt);
    }

    /// Sets the timer of step `i` (of the instance, for [`TimerKind::Expiry`]) about `attempt`
    /// of `op`, due `at`.
    fn set_timer(&mut self, at: Time, kind: TimerKind, i: usize, op: Operation, attempt: u32) {
        let timer = Timer {
            step: i,
            kind,
            operation: op,
            attempt,
        };
        self.effects.push(Effect::SetTimer { at, timer });
    }

    /// Deletes the timer of step `i`: nothing is awaited from it any more.
    fn cancel_timer(&mut self, i: usize) {
        self.effects.push(Effect::CancelTimer { key: timer_key(i) });
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

    /// Why the forward phase must end: the first step that failed or gave up.
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
            let next = match self.inst.phase {
                Phase::Done => Next::Wait,
                Phase::Forward => {
                    if let Some(reason) = self.failure_reason() {
                        self.emit(Event::UndoStarted { reason });
                        continue;
                    }
                    match self.inst.plan.mode {
                        Mode::Saga => self.saga_forward(),
                        Mode::Tcc => self.tcc_forward(),
                    }
                }
                Phase::Confirming => self.tcc_confirm(),
                Phase::Undoing => match self.inst.plan.mode {
                    Mode::Saga => self.saga_compensate(),
                    Mode::Tcc => self.tcc_cancel(),
                },
            };
            if next == Next::Wait {
                return;
            }
        }
    }

    /// Ends the undo phase once no step needs undoing or is being undone (`undoing`).
    fn compensated_when_undone(&mut self, undoing: StepStatus) -> Next {
        let busy = self
            .inst
            .steps
            .iter()
            .any(|s| s.status.needs_undo() || s.status == undoing);
        if !busy {
            self.emit(Event::Finished {
                status: Status::Compensated,
            });
        }
        Next::Wait
    }
}

#[cfg(test)]
mod tests;
