//! Operator inputs: abort a transaction in its forward phase, retry what is stuck or backing
//! off, resolve a stuck transaction by hand. Each is logged as `operator_action`.

use sagas_participant::protocol::Operation;

use super::{Draft, Event, OperatorAction, Phase, Rejected, Status, Waiting};

impl Draft<'_> {
    pub(super) fn on_abort(&mut self, actor: String, reason: String) -> Result<(), Rejected> {
        if self.inst.phase != Phase::Forward {
            return Err(Rejected(format!(
                "only a running instance in its forward phase can be aborted; this one is {} ({:?})",
                self.inst.status.as_str(),
                self.inst.phase
            )));
        }
        let why = format!("aborted by {actor}: {reason}");
        self.emit(Event::OperatorAction {
            action: OperatorAction::Abort,
            actor,
            reason,
        });
        self.emit(Event::UndoStarted { reason: why });
        Ok(())
    }

    pub(super) fn on_retry(&mut self, actor: String, reason: String) -> Result<(), Rejected> {
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
            action: OperatorAction::Retry,
            actor,
            reason,
        });
        for (i, op, attempt) in targets {
            self.dispatch(i, op, attempt + 1);
        }
        Ok(())
    }

    pub(super) fn on_resolve(&mut self, actor: String, reason: String) -> Result<(), Rejected> {
        if self.inst.status != Status::Stuck {
            return Err(Rejected(format!(
                "only a stuck instance can be resolved by hand; this one is {}",
                self.inst.status.as_str()
            )));
        }
        self.emit(Event::OperatorAction {
            action: OperatorAction::Resolve,
            actor,
            reason,
        });
        self.emit(Event::Finished {
            status: Status::Resolved,
        });
        for i in 0..self.inst.steps.len() {
            self.cancel_timer(i);
        }
        Ok(())
    }
}
