//! Wait steps: a step that waits for a named signal from outside (an approval, a payment
//! authorization) instead of a participant's reply. The wait begins when the step is ready,
//! ends with the signal (its data is the step's output) or fails at its timeout, and is undone
//! by nothing at all: it changed nothing outside.

use chrono::Duration;
use serde_json::Value;

use super::event::non_null;
use super::{Draft, Event, Phase, Rejected, StepStatus, TimerKind, Waiting};
use sagas_participant::protocol::Operation;

impl Draft<'_> {
    /// Starts the wait of step `i` and sets the timer that ends it.
    pub(super) fn start_wait(&mut self, i: usize) {
        let plan = &self.inst.plan.steps[i];
        let until = self.now + Duration::milliseconds(plan.timeout_ms as i64);
        let signal = plan.signal.clone().unwrap_or_default();
        self.emit(Event::AwaitingSignal {
            step: i,
            signal,
            until,
        });
        self.set_timer(until, TimerKind::Deadline, i, Operation::Action, 1);
    }

    /// The wait of step `i` timed out: the step fails (and the saga compensates).
    pub(super) fn wait_timed_out(&mut self, i: usize) {
        let signal = self.inst.plan.steps[i].signal.clone().unwrap_or_default();
        self.emit(Event::SignalTimedOut { step: i, signal });
    }

    /// Undoes wait step `i`: nothing to send; an open wait ends.
    pub(super) fn undo_wait(&mut self, i: usize) {
        if matches!(self.inst.steps[i].waiting, Waiting::Signal { .. }) {
            self.cancel_timer(i);
        }
        self.emit(Event::WaitUndone { step: i });
    }

    /// The signal `name` with id `signal_id`: accepted by the step waiting for it; the id
    /// already accepted with the same data changes nothing; anything else is refused with the
    /// reason.
    pub(super) fn on_signal(
        &mut self,
        name: String,
        signal_id: String,
        data: Value,
    ) -> Result<(), Rejected> {
        let steps = &self.inst.plan.steps;
        if let Some(i) = self
            .inst
            .steps
            .iter()
            .position(|s| s.signal_id.as_deref() == Some(&signal_id))
        {
            let got = steps[i].signal.as_deref().unwrap_or_default();
            if got != name {
                return Err(Rejected(format!(
                    "signal id {signal_id} was already used for signal {got}"
                )));
            }
            if self.inst.steps[i].output != non_null(&data) {
                return Err(Rejected(format!(
                    "signal id {signal_id} was already accepted with different data"
                )));
            }
            return Ok(());
        }
        let Some(i) = steps
            .iter()
            .position(|p| p.signal.as_deref() == Some(&name))
        else {
            return Err(Rejected(format!(
                "definition {} has no step that waits for signal {name}",
                self.inst.plan.name
            )));
        };
        let step = &steps[i].name;
        let s = &self.inst.steps[i];
        if s.status == StepStatus::Running && matches!(s.waiting, Waiting::Signal { .. }) {
            self.emit(Event::Signalled {
                step: i,
                signal: name,
                signal_id,
                data,
            });
            self.cancel_timer(i);
            return Ok(());
        }
        let why = match s.status {
            _ if self.inst.phase == Phase::Done => format!(
                "the transaction is {}: nothing waits for signal {name} any more",
                self.inst.status.as_str()
            ),
            StepStatus::Pending if self.inst.phase == Phase::Forward => {
                format!("step {step} has not started waiting for signal {name} yet")
            }
            StepStatus::Succeeded | StepStatus::Compensated if s.signal_id.is_some() => format!(
                "step {step} already received signal {name} (signal id {})",
                s.signal_id.as_deref().unwrap_or_default()
            ),
            StepStatus::Failed => format!(
                "step {step} no longer waits for signal {name}: {}",
                s.last_error.as_deref().unwrap_or("it failed")
            ),
            _ => format!(
                "step {step} does not wait for signal {name}: the transaction is {}",
                self.inst.status.as_str()
            ),
        };
        Err(Rejected(why))
    }
}
