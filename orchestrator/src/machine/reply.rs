//! Replies: matching a participant's answer to what is outstanding, and what each outcome does.

use chrono::Duration;

use super::{Draft, Event, TimerKind, Waiting};
use sagas_participant::protocol::{Outcome, Reply};

impl Draft<'_> {
    pub(super) fn on_reply(&mut self, reply: Reply) {
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
        if let Some(signal) = &self.inst.plan.steps[i].signal {
            let why = format!(
                "step {} waits for signal {signal}, not for a reply",
                reply.step
            );
            return ignore(self, why);
        }
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
            self.replied(i, op, attempt, reply.outcome);
            self.emit(Event::Extended {
                step: i,
                operation: op,
                attempt,
                deadline,
            });
            self.set_timer(deadline, TimerKind::Deadline, i, op, attempt);
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
            self.replied(i, reply.operation, reply.attempt, reply.outcome);
            self.retry_or_give_up(i, reply.operation, reason, hint.unwrap_or(0));
            return;
        }
        // A definite answer (succeeded/failed) to any attempt holds for all of them: the
        // participant's barrier gives every attempt the same outcome.
        let failed_reason = match &reply.outcome {
            Outcome::Failed { reason } => Some(reason.clone()),
            _ => None,
        };
        self.replied(i, reply.operation, reply.attempt, reply.outcome);
        self.cancel_timer(i);
        // A step already stuck stays stuck: a late failure of another attempt is logged as its
        // reply, not as the instance getting stuck again (which alerts and metrics count).
        if let Some(reason) = failed_reason
            && !reply.operation.is_forward()
            && !self.inst.steps[i].stuck
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
}
