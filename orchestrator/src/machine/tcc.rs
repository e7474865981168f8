//! TCC rules: all tries at once, then all confirms, or else a cancel of every try that may
//! have taken effect.

use super::{Draft, Event, Next, Status, StepStatus};
use sagas_participant::protocol::Operation;

impl Draft<'_> {
    /// Computes every command and sends every try at once (or, if a command cannot be
    /// computed, sends nothing); starts the confirms once every try has succeeded.
    pub(super) fn tcc_forward(&mut self) -> Next {
        let steps = &self.inst.steps;
        let pending: Vec<usize> = (0..steps.len())
            .filter(|&i| steps[i].status == StepStatus::Pending)
            .collect();
        if !pending.is_empty() {
            let mut all = true;
            for i in pending {
                all &= self.prepare(i);
            }
            if !all {
                return Next::Again; // cancelled: nothing was sent yet
            }
            for i in 0..self.inst.steps.len() {
                self.send(i, Operation::Try, 1);
            }
            return Next::Wait;
        }
        if steps.iter().any(|s| s.status == StepStatus::Running) {
            return Next::Wait;
        }
        self.emit(Event::ConfirmStarted);
        Next::Again
    }

    /// Sends every confirm at once; completes once all are confirmed.
    pub(super) fn tcc_confirm(&mut self) -> Next {
        let to_confirm: Vec<usize> = (0..self.inst.steps.len())
            .filter(|&i| self.inst.steps[i].status == StepStatus::Succeeded)
            .collect();
        for i in to_confirm {
            self.send(i, Operation::Confirm, 1);
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
        Next::Wait
    }

    /// Cancels every step that may have taken effect at once, tries still in flight included:
    /// their late replies are ignored, and the participant's barrier refuses a try that comes
    /// after its cancel.
    pub(super) fn tcc_cancel(&mut self) -> Next {
        let needs: Vec<usize> = (0..self.inst.steps.len())
            .filter(|&i| self.inst.steps[i].status.needs_undo())
            .collect();
        for i in needs {
            self.send(i, Operation::Cancel, 1);
        }
        self.compensated_when_undone(StepStatus::Cancelling)
    }
}
