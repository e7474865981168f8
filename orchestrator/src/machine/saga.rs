//! Saga rules: steps run forward as their dependencies succeed, and are compensated in the
//! reverse of that order. A wait step waits for its signal instead of sending a command, and
//! has nothing to compensate.

use super::{Draft, Event, Next, Status, StepStatus};
use sagas_participant::protocol::Operation;

impl Draft<'_> {
    /// Sends every pending step whose dependencies have all succeeded, after computing all of
    /// their commands; completes the saga once nothing is pending or running.
    pub(super) fn saga_forward(&mut self) -> Next {
        let steps = &self.inst.steps;
        let plan = &self.inst.plan;
        let pending = |i: &usize| steps[*i].status == StepStatus::Pending;
        let ready: Vec<usize> = (0..steps.len())
            .filter(pending)
            .filter(|&i| {
                plan.deps(i)
                    .iter()
                    .all(|&d| steps[d].status == StepStatus::Succeeded)
            })
            .collect();
        if ready.is_empty() {
            let running = steps.iter().any(|s| s.status == StepStatus::Running);
            if !running && !(0..steps.len()).any(|i| pending(&i)) {
                self.emit(Event::Finished {
                    status: Status::Completed,
                });
            }
            return Next::Wait;
        }
        // Prepare every ready step before sending any, so that a command that cannot be
        // computed sends nothing that needs undoing. A wait step has no command.
        let mut all = true;
        for &i in &ready {
            if !self.inst.plan.steps[i].is_wait() {
                all &= self.prepare(i);
            }
        }
        if !all {
            return Next::Again;
        }
        for i in ready {
            if self.inst.plan.steps[i].is_wait() {
                self.start_wait(i);
            } else {
                self.send(i, Operation::Action, 1);
            }
        }
        Next::Wait
    }

    /// Compensates every step that may have run once every step that runs after it is
    /// compensated, failed or never ran: the reverse of the dependency order (for a plain
    /// list, last first; independent branches in parallel).
    pub(super) fn saga_compensate(&mut self) -> Next {
        let steps = &self.inst.steps;
        let plan = &self.inst.plan;
        let ready: Vec<usize> = (0..steps.len())
            .filter(|&i| steps[i].status.needs_undo())
            .filter(|&i| {
                plan.dependents(i).iter().all(|&j| {
                    matches!(
                        steps[j].status,
                        StepStatus::Pending | StepStatus::Failed | StepStatus::Compensated
                    )
                })
            })
            .collect();
        let mut waits_undone = false;
        for i in ready {
            if self.inst.plan.steps[i].is_wait() {
                self.undo_wait(i);
                waits_undone = true;
            } else {
                self.send(i, Operation::Compensate, 1);
            }
        }
        if waits_undone {
            // The steps the waits ran after may be ready to compensate now.
            return Next::Again;
        }
        self.compensated_when_undone(StepStatus::Compensating)
    }
}
