//! Property tests of the state machine.
//!
//! Each case draws a plan (saga or TCC, 1 to 4 steps, small retry budgets, saga steps in order
//! or in a random dependency graph with parallel branches), then feeds the
//! machine a random sequence of inputs chosen relative to the state it is in: replies (some with
//! a wrong attempt or operation, duplicated, or for an unknown step) to outstanding operations,
//! fires of live or stale timers, operator aborts and retries, and signals (new, repeated with
//! the same or other data, or for no step) to the saga's wait steps. A drain phase then answers
//! every outstanding operation with `succeeded`, signals every open wait, and fires due timers
//! until the instance is
//! terminal, and a last few random inputs hit the finished instance. Time only moves forward:
//! firing a timer advances the clock to its due time. Every property checks the recorded trace.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{Value, json};

use super::{Echo, plan, t0};
use crate::definition::{Mode, Plan};
use crate::machine::{
    Effect, Event, Input, Instance, Phase, Rejected, Status, StepStatus, Time, Timer, TimerKind,
    Transition, Waiting, handle, replay, start,
};
use sagas_participant::protocol::{Operation, Outcome, PROTOCOL_VERSION, Reply};
use uuid::Uuid;

/// Bound on the inputs of the drain phase.
const DRAIN_LIMIT: usize = 200;

// ---------------------------------------------------------------------------------------------
// Generated cases
// ---------------------------------------------------------------------------------------------

/// One generated case: the plan's shape and the abstract inputs, resolved against the state.
#[derive(Debug, Clone)]
struct Case {
    mode: Mode,
    /// Per step: forward attempts, finish (compensate/confirm/cancel) attempts, timeout in ms.
    limits: Vec<(u32, u32, u64)>,
    /// Makes `Echo` refuse to compute this step's command (ignored past the last step).
    fail_prepare: Option<usize>,
    /// Saga only: per step, `None` to run after the previous step, or picks of earlier steps
    /// to run after (a dependency graph with parallel branches).
    deps: Vec<Option<Vec<Index>>>,
    /// Saga only: per step, whether it waits for a signal instead of sending a command.
    waits: Vec<bool>,
    /// Whether the drain asks an operator retry for stuck steps (or just answers them).
    drain_retries: bool,
    /// Inputs before the drain.
    acts: Vec<Act>,
    /// Inputs after the drain.
    after: Vec<Act>,
}

/// An abstract input, made concrete against the instance's current state.
#[derive(Debug, Clone)]
enum Act {
    /// A reply to one of the outstanding operations (any step if none is outstanding).
    Reply {
        pick: Index,
        outcome: Out,
        twist: Twist,
    },
    /// A timer fires: one of the live timers, or any timer ever set (likely stale).
    Fire { pick: Index, stale: bool },
    /// An operator abort.
    Abort,
    /// An operator retry.
    Retry,
    /// A signal: for one of the wait steps (or for no step when there are none), new or a
    /// copy of one delivered before with the same or other data.
    Signal {
        pick: Index,
        repeat: Option<(Index, bool)>,
    },
}

#[derive(Debug, Clone, Copy)]
enum Out {
    Succeeded,
    Failed,
    Retry,
    RetryAfter(u64),
}

/// How a reply departs from the expected one.
#[derive(Debug, Clone, Copy)]
enum Twist {
    /// The current attempt of the outstanding operation.
    None,
    /// An attempt that was sent earlier (or the current one).
    Earlier(Index),
    /// An attempt that was never sent (0 or the next one).
    NeverSent(bool),
    /// Another operation than the outstanding one.
    WrongOp(Index),
    /// A copy of a reply delivered before.
    Duplicate(Index),
    /// A step name the plan does not have.
    UnknownStep,
}

fn out() -> impl Strategy<Value = Out> {
    prop_oneof![
        6 => Just(Out::Succeeded),
        1 => Just(Out::Failed),
        3 => Just(Out::Retry),
        1 => (1..5_000u64).prop_map(Out::RetryAfter),
    ]
}

fn twist() -> impl Strategy<Value = Twist> {
    prop_oneof![
        10 => Just(Twist::None),
        2 => any::<Index>().prop_map(Twist::Earlier),
        1 => any::<bool>().prop_map(Twist::NeverSent),
        1 => any::<Index>().prop_map(Twist::WrongOp),
        2 => any::<Index>().prop_map(Twist::Duplicate),
        1 => Just(Twist::UnknownStep),
    ]
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        12 => (any::<Index>(), out(), twist())
            .prop_map(|(pick, outcome, twist)| Act::Reply { pick, outcome, twist }),
        4 => (any::<Index>(), prop::bool::weighted(0.25))
            .prop_map(|(pick, stale)| Act::Fire { pick, stale }),
        1 => Just(Act::Abort),
        2 => Just(Act::Retry),
        4 => (any::<Index>(), prop::option::weighted(0.3, (any::<Index>(), any::<bool>())))
            .prop_map(|(pick, repeat)| Act::Signal { pick, repeat }),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![Just(Mode::Saga), Just(Mode::Tcc)],
        prop::collection::vec(
            (
                1..=3u32,
                1..=3u32,
                prop::sample::select(vec![100u64, 1_000, 5_000]),
            ),
            1..=4,
        ),
        prop::option::weighted(0.1, 0..4usize),
        prop::collection::vec(
            prop::option::weighted(0.5, prop::collection::vec(any::<Index>(), 0..=2)),
            4,
        ),
        prop::collection::vec(prop::bool::weighted(0.25), 4),
        any::<bool>(),
        prop::collection::vec(act(), 0..=40),
        prop::collection::vec(act(), 0..=8),
    )
        .prop_map(
            |(mode, limits, fail_prepare, deps, waits, drain_retries, acts, after)| Case {
                mode,
                limits,
                fail_prepare,
                deps,
                waits,
                drain_retries,
                acts,
                after,
            },
        )
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Simulation
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Random,
    Drain,
    After,
}

/// One call of `start` (no `before`, no `input`) or `handle`.
#[derive(Debug)]
struct Record {
    stage: Stage,
    before: Option<Instance>,
    input: Option<Input>,
    now: Time,
    result: Result<Transition, Rejected>,
}

/// Everything a case did.
#[derive(Debug)]
struct Trace {
    mode: Mode,
    plan: Plan,
    records: Vec<Record>,
    /// The whole log.
    log: Vec<Event>,
    /// The instance right after the drain.
    drained: Instance,
}

struct Sim {
    inst: Instance,
    log: Vec<Event>,
    now: Time,
    /// The timers the engine would keep, by key.
    timers: BTreeMap<String, (Time, Timer)>,
    /// Every timer ever set, for stale fires.
    ever_set: Vec<(Time, Timer)>,
    /// Every reply delivered, for duplicates.
    replies: Vec<Reply>,
    /// Every signal delivered (name, id, data), for repeats.
    signals: Vec<(String, String, Value)>,
    records: Vec<Record>,
    stage: Stage,
}

fn build_plan(case: &Case) -> Plan {
    let mut p = plan(case.mode, case.limits.len());
    for (step, &(forward, finish, timeout)) in p.steps.iter_mut().zip(&case.limits) {
        step.retry.max_attempts = forward;
        step.finish_retry.max_attempts = finish;
        step.timeout_ms = timeout;
    }
    if case.mode == Mode::Saga {
        for i in 1..p.steps.len() {
            if let Some(Some(picks)) = case.deps.get(i) {
                let mut after: Vec<usize> = picks.iter().map(|x| x.index(i)).collect();
                after.sort_unstable();
                after.dedup();
                p.steps[i].after = Some(after);
            }
        }
        for (i, step) in p.steps.iter_mut().enumerate() {
            if case.waits.get(i) == Some(&true) {
                step.signal = Some(format!("sig{i}"));
                step.participant = String::new();
            }
        }
    }
    p
}

fn forward_op(mode: Mode) -> Operation {
    match mode {
        Mode::Saga => Operation::Action,
        Mode::Tcc => Operation::Try,
    }
}

fn operator(retry: bool) -> Input {
    let (actor, reason) = ("ops".to_owned(), "property test".to_owned());
    if retry {
        Input::Retry { actor, reason }
    } else {
        Input::Abort { actor, reason }
    }
}

impl Sim {
    fn absorb_effects(&mut self, effects: &[Effect]) {
        for e in effects {
            match e {
                Effect::SetTimer { at, timer } => {
                    self.timers.insert(timer.key(), (*at, *timer));
                    self.ever_set.push((*at, *timer));
                }
                Effect::CancelTimer { key } => {
                    self.timers.remove(key);
                }
                Effect::Send { .. } | Effect::AttemptEnded { .. } => {}
            }
        }
    }

    fn feed(&mut self, input: Input) {
        if let Input::Timer(timer) = &input {
            // A timer that fires is consumed, unless a newer one replaced it.
            let key = timer.key();
            if self.timers.get(&key).map(|(_, t)| t) == Some(timer) {
                self.timers.remove(&key);
            }
        }
        if let Input::Reply(reply) = &input {
            self.replies.push(reply.clone());
        }
        if let Input::Signal {
            name,
            signal_id,
            data,
        } = &input
        {
            self.signals
                .push((name.clone(), signal_id.clone(), data.clone()));
        }
        let before = self.inst.clone();
        let result = handle(&self.inst, input.clone(), self.now, &Echo);
        if let Ok(t) = &result {
            self.log.extend(t.events.iter().cloned());
            self.inst = t.instance.clone();
            self.absorb_effects(&t.effects);
        }
        self.records.push(Record {
            stage: self.stage,
            before: Some(before),
            input: Some(input),
            now: self.now,
            result,
        });
    }

    fn reply(&self, step: usize, op: Operation, attempt: u32, outcome: Outcome) -> Reply {
        Reply {
            protocol: PROTOCOL_VERSION,
            transaction_id: self.inst.id,
            step: self.inst.plan.steps[step].name.clone(),
            operation: op,
            attempt,
            outcome,
        }
    }

    fn succeed(&mut self, step: usize) {
        let mode = self.inst.plan.mode;
        let s = &self.inst.steps[step];
        let op = s
            .status
            .outstanding(mode)
            .expect("an outstanding operation");
        let attempt = s.attempt;
        let output = json!({"step": step, "op": op.as_str(), "attempt": attempt});
        let reply = self.reply(step, op, attempt, Outcome::succeeded(output));
        self.feed(Input::Reply(reply));
    }

    fn act(&mut self, act: &Act) {
        match act {
            Act::Reply {
                pick,
                outcome,
                twist,
            } => {
                let reply = self.concrete_reply(pick, *outcome, *twist);
                self.feed(Input::Reply(reply));
            }
            Act::Fire { pick, stale } => {
                let live: Vec<(Time, Timer)> = self.timers.values().copied().collect();
                let pool = if (*stale || live.is_empty()) && !self.ever_set.is_empty() {
                    self.ever_set.clone()
                } else {
                    live
                };
                if pool.is_empty() {
                    return;
                }
                let (at, timer) = pool[pick.index(pool.len())];
                self.now = self.now.max(at);
                self.feed(Input::Timer(timer));
            }
            Act::Abort => self.feed(operator(false)),
            Act::Retry => self.feed(operator(true)),
            Act::Signal { pick, repeat } => {
                let signal = match repeat {
                    Some((k, same)) if !self.signals.is_empty() => {
                        let (name, signal_id, data) =
                            self.signals[k.index(self.signals.len())].clone();
                        let data = if *same { data } else { json!("other") };
                        Input::Signal {
                            name,
                            signal_id,
                            data,
                        }
                    }
                    _ => {
                        let names: Vec<String> = (self.inst.plan.steps.iter())
                            .filter_map(|p| p.signal.clone())
                            .collect();
                        let name = if names.is_empty() {
                            "nope".to_owned()
                        } else {
                            names[pick.index(names.len())].clone()
                        };
                        self.fresh_signal(name)
                    }
                };
                self.feed(signal);
            }
        }
    }

    /// A signal `name` with an id and data not delivered before.
    fn fresh_signal(&self, name: String) -> Input {
        let n = self.signals.len();
        Input::Signal {
            name,
            signal_id: format!("id{n}"),
            data: json!({"n": n}),
        }
    }

    fn concrete_reply(&self, pick: &Index, out: Out, twist: Twist) -> Reply {
        let mode = self.inst.plan.mode;
        let outstanding: Vec<(usize, Operation)> = self
            .inst
            .steps
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, s.status.outstanding(mode)?)))
            .collect();
        let (step, op) = if outstanding.is_empty() {
            (pick.index(self.inst.steps.len()), forward_op(mode))
        } else {
            outstanding[pick.index(outstanding.len())]
        };
        let current = self.inst.steps[step].attempt;
        let mut attempt = current;
        let mut op = op;
        let mut unknown = false;
        match twist {
            Twist::None => {}
            Twist::Earlier(k) => attempt = 1 + k.index(current.max(1) as usize) as u32,
            Twist::NeverSent(zero) => attempt = if zero { 0 } else { current + 1 },
            Twist::WrongOp(k) => {
                let others: Vec<Operation> =
                    Operation::ALL.into_iter().filter(|o| *o != op).collect();
                op = others[k.index(others.len())];
            }
            Twist::Duplicate(k) => {
                if !self.replies.is_empty() {
                    return self.replies[k.index(self.replies.len())].clone();
                }
            }
            Twist::UnknownStep => unknown = true,
        }
        let outcome = match out {
            Out::Succeeded => Outcome::succeeded(json!({
                "step": step, "op": op.as_str(), "attempt": attempt, "n": self.replies.len()
            })),
            Out::Failed => Outcome::failed("no"),
            Out::Retry => Outcome::retry("busy"),
            Out::RetryAfter(ms) => Outcome::Retry {
                reason: "busy".into(),
                retry_after_ms: Some(ms),
            },
        };
        let mut reply = self.reply(step, op, attempt, outcome);
        if unknown {
            reply.step = "nope".into();
        }
        reply
    }

    /// Answers every outstanding operation with `succeeded` and fires due timers, bounded.
    fn drain(&mut self, retries: bool) {
        let mode = self.inst.plan.mode;
        for _ in 0..DRAIN_LIMIT {
            if self.inst.status.is_terminal() {
                return;
            }
            let steps = &self.inst.steps;
            if retries && steps.iter().any(|s| s.stuck) {
                self.feed(operator(true));
                continue;
            }
            let awaiting = steps.iter().position(|s| {
                s.status.outstanding(mode).is_some() && matches!(s.waiting, Waiting::Reply { .. })
            });
            if let Some(i) = awaiting {
                self.succeed(i);
                continue;
            }
            let open_wait = steps.iter().position(|s| {
                s.status == StepStatus::Running && matches!(s.waiting, Waiting::Signal { .. })
            });
            if let Some(i) = open_wait {
                let name = self.inst.plan.steps[i].signal.clone().unwrap_or_default();
                self.feed(self.fresh_signal(name));
                continue;
            }
            let due = self.timers.values().min_by_key(|(at, _)| *at).copied();
            if let Some((at, timer)) = due {
                self.now = self.now.max(at);
                self.feed(Input::Timer(timer));
                continue;
            }
            // Stuck steps (when the drain does not retry them) still accept a late success.
            let any = steps
                .iter()
                .position(|s| s.status.outstanding(mode).is_some() && s.attempt > 0);
            match any {
                Some(i) => self.succeed(i),
                None => return,
            }
        }
    }
}

fn simulate(case: &Case) -> Trace {
    let plan = build_plan(case);
    let input = match case.fail_prepare {
        Some(i) => json!({"fail_prepare": i}),
        None => json!({}),
    };
    let now = t0();
    let t = start(Uuid::from_u128(0x5a6a), plan.clone(), input, now, &Echo);
    let mut sim = Sim {
        inst: t.instance.clone(),
        log: t.events.clone(),
        now,
        timers: BTreeMap::new(),
        ever_set: Vec::new(),
        replies: Vec::new(),
        signals: Vec::new(),
        records: Vec::new(),
        stage: Stage::Random,
    };
    sim.absorb_effects(&t.effects);
    sim.records.push(Record {
        stage: Stage::Random,
        before: None,
        input: None,
        now,
        result: Ok(t),
    });
    for act in &case.acts {
        sim.act(act);
    }
    sim.stage = Stage::Drain;
    sim.drain(case.drain_retries);
    let drained = sim.inst.clone();
    sim.stage = Stage::After;
    for act in &case.after {
        sim.act(act);
    }
    Trace {
        mode: case.mode,
        plan,
        records: sim.records,
        log: sim.log,
        drained,
    }
}

impl Trace {
    /// The successful transitions, with the log length before each.
    fn transitions(&self) -> impl Iterator<Item = (&Record, &Transition, usize)> {
        let mut len = 0;
        self.records.iter().filter_map(move |r| {
            let t = r.result.as_ref().ok()?;
            let before = len;
            len += t.events.len();
            Some((r, t, before))
        })
    }
}

fn sends(t: &Transition) -> Vec<(&String, &sagas_participant::protocol::Command)> {
    t.sends().collect()
}

fn dispatched(t: &Transition) -> Vec<(usize, Operation, u32, Time)> {
    t.events
        .iter()
        .filter_map(|e| match e {
            Event::Dispatched {
                step,
                operation,
                attempt,
                deadline,
            } => Some((*step, *operation, *attempt, *deadline)),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

fn check_replay(trace: &Trace) -> Result<(), TestCaseError> {
    for (_, t, before) in trace.transitions() {
        let len = before + t.events.len();
        prop_assert_eq!(t.instance.seq, len as u64, "seq is not the log length");
        let rebuilt = replay(&trace.log[..len]);
        prop_assert_eq!(rebuilt.as_ref(), Some(&t.instance), "replay differs");
    }
    Ok(())
}

fn check_absorbing(trace: &Trace) -> Result<(), TestCaseError> {
    for r in &trace.records {
        let (Some(before), Some(input)) = (&r.before, &r.input) else {
            continue;
        };
        if !before.status.is_terminal() {
            continue;
        }
        match (input, &r.result) {
            (Input::Abort { .. } | Input::Retry { .. }, result) => {
                prop_assert!(result.is_err(), "operator input accepted when terminal");
            }
            // A signal is refused, or (the repeat of one accepted before) changes nothing.
            (Input::Signal { .. }, Err(_)) => {}
            (_, Err(e)) => prop_assert!(false, "{:?} rejected: {}", input, e),
            (_, Ok(t)) => {
                prop_assert!(
                    sends(t).is_empty(),
                    "terminal instance sent {:?}",
                    t.effects
                );
                prop_assert_eq!(t.instance.status, before.status);
                prop_assert_eq!(t.instance.phase, Phase::Done);
                prop_assert_eq!(&t.instance.steps, &before.steps);
            }
        }
    }
    Ok(())
}

fn check_drained(trace: &Trace) -> Result<(), TestCaseError> {
    let status = trace.drained.status;
    prop_assert!(
        status.is_terminal(),
        "not terminal after the drain: {:?} {:?}",
        status,
        trace
            .drained
            .steps
            .iter()
            .map(|s| (s.status, s.waiting, s.stuck))
            .collect::<Vec<_>>()
    );
    Ok(())
}

fn check_steps_finished_once(trace: &Trace) -> Result<(), TestCaseError> {
    let fin = &trace.drained;
    if !fin.status.is_terminal() {
        return Ok(()); // check_drained reports it
    }
    let fwd = forward_op(trace.mode);
    for (i, s) in fin.steps.iter().enumerate() {
        let ran = trace.log.iter().any(|e| {
            matches!(e, Event::Dispatched { step, operation, .. } if *step == i && *operation == fwd)
                || matches!(e, Event::AwaitingSignal { step, .. } if *step == i)
        });
        let refused = trace.log.iter().any(|e| {
            matches!(e, Event::Replied { step, operation, outcome: Outcome::Failed { .. }, .. }
                if *step == i && *operation == fwd)
                || matches!(e, Event::SignalTimedOut { step, .. } if *step == i)
        });
        let unprepared = trace
            .log
            .iter()
            .any(|e| matches!(e, Event::PreparationFailed { step, .. } if *step == i));
        let expected: &[StepStatus] = if !ran {
            if unprepared {
                &[StepStatus::Failed]
            } else {
                &[StepStatus::Pending]
            }
        } else if refused {
            &[StepStatus::Failed]
        } else {
            match (fin.status, trace.mode) {
                (Status::Completed, Mode::Saga) => &[StepStatus::Succeeded],
                (Status::Completed, Mode::Tcc) => &[StepStatus::Confirmed],
                (_, Mode::Saga) => &[StepStatus::Compensated],
                (_, Mode::Tcc) => &[StepStatus::Cancelled],
            }
        };
        prop_assert!(
            expected.contains(&s.status),
            "step {} ended {:?}, expected {:?} ({:?})",
            i,
            s.status,
            expected,
            fin.status
        );
        let did = |op: Operation| {
            trace.log.iter().any(|e| {
                matches!(e, Event::Dispatched { step, operation, .. } if *step == i && *operation == op)
            })
        };
        prop_assert!(
            !(did(Operation::Confirm) && did(Operation::Cancel)),
            "step {} was both confirmed and cancelled",
            i
        );
    }
    Ok(())
}

fn check_commands(trace: &Trace) -> Result<(), TestCaseError> {
    let n = trace.plan.steps.len();
    let mut forward_sent = vec![false; n];
    let mut try_succeeded = vec![false; n];
    let mut payload: Vec<Option<Value>> = vec![None; n];
    let mut output: Vec<Option<Value>> = vec![None; n];
    let mut last_attempt: HashMap<(usize, Operation), u32> = HashMap::new();
    for (_, t, _) in trace.transitions() {
        for e in &t.events {
            match e {
                Event::CommandPrepared { step, payload: p } => {
                    prop_assert!(payload[*step].is_none(), "step {} prepared twice", step);
                    payload[*step] = Some(p.clone());
                }
                Event::Dispatched {
                    step,
                    operation,
                    attempt,
                    ..
                } => {
                    let i = *step;
                    if operation.is_forward() {
                        prop_assert!(payload[i].is_some(), "step {} sent before prepared", i);
                        forward_sent[i] = true;
                    } else if operation.is_undo() {
                        prop_assert!(forward_sent[i], "step {} undone but never sent", i);
                    } else {
                        prop_assert!(try_succeeded[i], "step {} confirmed without a try", i);
                    }
                    let prev = last_attempt.insert((i, *operation), *attempt).unwrap_or(0);
                    prop_assert_eq!(*attempt, prev + 1, "attempts of step {} skip", i);
                }
                Event::Replied {
                    step,
                    operation,
                    outcome: Outcome::Succeeded { output: o },
                    ..
                } if operation.is_forward() => {
                    prop_assert!(output[*step].is_none(), "step {} succeeded twice", step);
                    output[*step] = Some(o.clone());
                    try_succeeded[*step] = *operation == Operation::Try;
                }
                _ => {}
            }
        }
        let sent = sends(t);
        let events = dispatched(t);
        prop_assert_eq!(sent.len(), events.len(), "sends and dispatches differ");
        for ((participant, cmd), (step, op, attempt, deadline)) in sent.into_iter().zip(events) {
            let sp = &trace.plan.steps[step];
            prop_assert_eq!(participant, &sp.participant);
            prop_assert_eq!(&cmd.step, &sp.name);
            prop_assert_eq!(cmd.protocol, PROTOCOL_VERSION);
            prop_assert_eq!(cmd.transaction_id, t.instance.id);
            prop_assert_eq!(&cmd.definition, &trace.plan.name);
            prop_assert_eq!((cmd.operation, cmd.attempt), (op, attempt));
            prop_assert_eq!(cmd.deadline, Some(deadline));
            prop_assert_eq!(Some(&cmd.payload), payload[step].as_ref(), "payload");
            let expected_output = if op.is_forward() {
                None
            } else {
                output[step].clone()
            };
            prop_assert_eq!(&cmd.output, &expected_output, "output of {} {}", step, op);
        }
    }
    Ok(())
}

fn check_saga_order(trace: &Trace) -> Result<(), TestCaseError> {
    if trace.mode != Mode::Saga {
        return Ok(());
    }
    let Some((_, first, _)) = trace.transitions().next() else {
        return Ok(());
    };
    let plan = first.instance.plan.clone();
    let sequential = plan.steps.iter().all(|s| s.after.is_none());
    for (_, t, _) in trace.transitions() {
        let steps = &t.instance.steps;
        if sequential {
            let in_flight = steps
                .iter()
                .filter(|s| matches!(s.status, StepStatus::Running | StepStatus::Compensating))
                .count();
            prop_assert!(in_flight <= 1, "{} saga steps in flight", in_flight);
        }
        for e in &t.events {
            // A wait starts like an action and is undone like a compensation.
            let (step, operation) = match e {
                Event::Dispatched {
                    step, operation, ..
                } => (step, operation),
                Event::AwaitingSignal { step, .. } => (step, &Operation::Action),
                Event::WaitUndone { step } => (step, &Operation::Compensate),
                _ => continue,
            };
            match operation {
                // A step runs only once every step it runs after has succeeded.
                Operation::Action => {
                    for d in plan.deps(*step) {
                        prop_assert_eq!(
                            steps[d].status,
                            StepStatus::Succeeded,
                            "step {} dispatched before its dependency {}",
                            step,
                            d
                        );
                    }
                }
                // A step is compensated only once every step that ran after it is undone or
                // never ran.
                Operation::Compensate => {
                    for j in plan.dependents(*step) {
                        prop_assert!(
                            matches!(
                                steps[j].status,
                                StepStatus::Pending | StepStatus::Failed | StepStatus::Compensated
                            ),
                            "step {} compensated while its dependent {} is {:?}",
                            step,
                            j,
                            steps[j].status
                        );
                    }
                }
                _ => prop_assert!(false, "{} in a saga", operation),
            }
        }
    }
    let mut first_compensations: Vec<usize> = Vec::new();
    let mut undoing = false;
    for e in &trace.log {
        let step_op = match e {
            Event::Dispatched {
                step, operation, ..
            } => Some((step, operation)),
            Event::AwaitingSignal { step, .. } => Some((step, &Operation::Action)),
            Event::WaitUndone { step } => Some((step, &Operation::Compensate)),
            _ => None,
        };
        if let Some((step, operation)) = step_op {
            match operation {
                Operation::Compensate => {
                    undoing = true;
                    if !first_compensations.contains(step) {
                        first_compensations.push(*step);
                    }
                }
                Operation::Action => prop_assert!(!undoing, "action after compensation"),
                _ => {}
            }
        }
    }
    if sequential {
        prop_assert!(
            first_compensations.windows(2).all(|w| w[0] > w[1]),
            "compensations out of order: {:?}",
            first_compensations
        );
    }
    Ok(())
}

fn check_final_status(trace: &Trace) -> Result<(), TestCaseError> {
    let fin = &trace.drained;
    let statuses: Vec<StepStatus> = fin.steps.iter().map(|s| s.status).collect();
    match fin.status {
        Status::Completed => {
            let want = match trace.mode {
                Mode::Saga => StepStatus::Succeeded,
                Mode::Tcc => StepStatus::Confirmed,
            };
            prop_assert!(statuses.iter().all(|s| *s == want), "{:?}", statuses);
            prop_assert!(fin.failure.is_none());
        }
        Status::Compensated => {
            prop_assert!(fin.failure.is_some(), "compensated without a reason");
            for s in &fin.steps {
                prop_assert!(
                    !matches!(
                        s.status,
                        StepStatus::Running | StepStatus::Succeeded | StepStatus::Unknown
                    ),
                    "compensated with {:?}",
                    statuses
                );
                prop_assert!(s.status.outstanding(trace.mode).is_none());
                prop_assert!(!s.stuck);
            }
            prop_assert!(
                !trace.log.iter().any(|e| matches!(
                    e,
                    Event::Dispatched {
                        operation: Operation::Confirm,
                        ..
                    }
                )),
                "a compensated instance confirmed a step"
            );
        }
        _ => {}
    }
    Ok(())
}

fn check_deadlines(trace: &Trace) -> Result<(), TestCaseError> {
    for (r, t, _) in trace.transitions() {
        for (_, cmd) in sends(t) {
            let step = trace.plan.step_index(&cmd.step).unwrap();
            let timer = Timer {
                step,
                kind: TimerKind::Deadline,
                operation: cmd.operation,
                attempt: cmd.attempt,
            };
            let at = cmd.deadline.unwrap();
            prop_assert!(
                t.effects.contains(&Effect::SetTimer { at, timer }),
                "no deadline timer for {:?}",
                cmd
            );
            prop_assert!(at > r.now, "deadline not in the future");
        }
        for e in &t.effects {
            if let Effect::SetTimer { at, .. } = e {
                prop_assert!(*at >= r.now, "timer in the past");
            }
        }
    }
    Ok(())
}

fn check_rejections(trace: &Trace) -> Result<(), TestCaseError> {
    for r in &trace.records {
        let (Some(before), Some(input)) = (&r.before, &r.input) else {
            continue;
        };
        let mode = before.plan.mode;
        let accepted = match input {
            Input::Reply(_) | Input::Timer(_) => true,
            Input::Abort { .. } => before.phase == Phase::Forward,
            Input::Retry { .. } => before.steps.iter().any(|s| {
                (s.stuck || matches!(s.waiting, Waiting::Backoff { .. }))
                    && s.status.outstanding(mode).is_some()
            }),
            Input::Resolve { .. } => before.status == Status::Stuck,
            Input::Signal {
                name,
                signal_id,
                data,
            } => signal_fits(before, name, signal_id, data),
        };
        prop_assert_eq!(
            r.result.is_ok(),
            accepted,
            "{:?} on {:?}: {:?}",
            input,
            before.status,
            r.result.as_ref().err()
        );
    }
    Ok(())
}

/// A signal is accepted by the step waiting for it, or as the repeat of the one a step
/// accepted with the same id and data.
fn signal_fits(before: &Instance, name: &str, signal_id: &str, data: &Value) -> bool {
    let plan = &before.plan.steps;
    let same_id = (before.steps.iter()).position(|s| s.signal_id.as_deref() == Some(signal_id));
    match same_id {
        Some(i) => {
            plan[i].signal.as_deref() == Some(name)
                && before.steps[i].output.as_ref() == Some(data).filter(|d| !d.is_null())
        }
        None => plan.iter().zip(&before.steps).any(|(p, s)| {
            p.signal.as_deref() == Some(name)
                && s.status == StepStatus::Running
                && matches!(s.waiting, Waiting::Signal { .. })
        }),
    }
}

fn check_budgets(trace: &Trace) -> Result<(), TestCaseError> {
    for (_, t, _) in trace.transitions() {
        let mode = t.instance.plan.mode;
        for (i, s) in t.instance.steps.iter().enumerate() {
            let Some(op) = s.status.outstanding(mode) else {
                continue;
            };
            let sp = &t.instance.plan.steps[i];
            let policy = if op.is_forward() {
                sp.retry
            } else {
                sp.finish_retry
            };
            let used = s.attempt - s.budget_from;
            prop_assert!(
                used <= policy.max_attempts,
                "step {} {} used {} of {} attempts",
                i,
                op,
                used,
                policy.max_attempts
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn replaying_the_log_rebuilds_the_instance_after_every_transition(case in case()) {
        check_replay(&simulate(&case))?;
    }

    #[test]
    fn a_finished_instance_stays_finished_whatever_arrives_later(case in case()) {
        check_absorbing(&simulate(&case))?;
    }

    #[test]
    fn answering_everything_with_success_always_finishes_the_instance(case in case()) {
        check_drained(&simulate(&case))?;
    }

    #[test]
    fn every_step_that_may_have_run_ends_finished_or_undone_exactly_once(case in case()) {
        check_steps_finished_once(&simulate(&case))?;
    }

    #[test]
    fn only_sent_steps_are_undone_only_tried_steps_confirmed_and_with_their_logged_payload(
        case in case()
    ) {
        check_commands(&simulate(&case))?;
    }

    #[test]
    fn saga_steps_run_after_their_dependencies_and_compensate_in_reverse_dependency_order(
        case in case()
    ) {
        check_saga_order(&simulate(&case))?;
    }

    #[test]
    fn the_final_status_agrees_with_every_step(case in case()) {
        check_final_status(&simulate(&case))?;
    }

    #[test]
    fn every_command_sent_has_a_reply_deadline_timer(case in case()) {
        check_deadlines(&simulate(&case))?;
    }

    #[test]
    fn only_operator_inputs_that_do_not_fit_the_state_are_rejected(case in case()) {
        check_rejections(&simulate(&case))?;
    }

    #[test]
    fn no_operation_exceeds_its_retry_budget(case in case()) {
        check_budgets(&simulate(&case))?;
    }
}

/// Not a property: makes sure the generator reaches the interesting states, so that the
/// properties above do not pass vacuously.
#[test]
fn the_generated_cases_reach_every_final_status_and_the_interesting_events() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..256 {
        let case = case().new_tree(&mut runner).unwrap().current();
        let trace = simulate(&case);
        let mode = match trace.mode {
            Mode::Saga => "saga",
            Mode::Tcc => "tcc",
        };
        let random_end = trace
            .records
            .iter()
            .rev()
            .filter(|r| r.stage == Stage::Random)
            .find_map(|r| r.result.as_ref().ok())
            .map(|t| t.instance.status);
        let keys = [
            format!("{mode} {}", trace.drained.status.as_str()),
            format!(
                "after random inputs {}",
                random_end.map_or("?", Status::as_str)
            ),
        ];
        for key in keys {
            *seen.entry(key).or_default() += 1;
        }
        for e in &trace.log {
            *seen.entry(e.kind().to_owned()).or_default() += 1;
        }
        let drain_retried = trace
            .records
            .iter()
            .any(|r| r.stage == Stage::Drain && matches!(r.input, Some(Input::Retry { .. })));
        if drain_retried {
            *seen.entry("drain retried".to_owned()).or_default() += 1;
        }
        if trace.records.iter().any(|r| {
            r.stage == Stage::After && r.before.as_ref().is_some_and(|b| b.status.is_terminal())
        }) {
            *seen.entry("inputs after the end".to_owned()).or_default() += 1;
        }
    }
    for key in [
        "saga completed",
        "saga compensated",
        "tcc completed",
        "tcc compensated",
        "after random inputs running",
        "after random inputs compensating",
        "after random inputs stuck",
        "reply_ignored",
        "timed_out",
        "retry_scheduled",
        "gave_up",
        "stuck",
        "operator_action",
        "preparation_failed",
        "confirm_started",
        "awaiting_signal",
        "signalled",
        "signal_timed_out",
        "wait_undone",
        "drain retried",
        "inputs after the end",
    ] {
        assert!(
            seen.get(key).copied().unwrap_or(0) > 0,
            "never saw {key}: {seen:?}"
        );
    }
}
