//! Deadlines and retries: what a fired timer does, the next attempt or giving up when an
//! attempt fails transiently, and the jitter that spreads backoffs apart.

use chrono::Duration;
use uuid::Uuid;

use super::{Draft, Event, Phase, Timer, TimerKind, Waiting};
use crate::definition::RetryPolicy;
use sagas_participant::protocol::Operation;

impl Draft<'_> {
    pub(super) fn on_timer(&mut self, timer: Timer) {
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
                self.attempt_ended(timer.step, timer.operation, timer.attempt, "timed_out");
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
            (TimerKind::Deadline, Waiting::Signal { .. }) if timer.attempt == s.attempt => {
                self.wait_timed_out(timer.step);
            }
            (TimerKind::Backoff, Waiting::Backoff { .. }) if timer.attempt == s.attempt + 1 => {
                self.send(timer.step, timer.operation, timer.attempt);
            }
            _ => {} // stale: superseded by a reply or a newer attempt
        }
    }

    pub(super) fn retry_or_give_up(
        &mut self,
        i: usize,
        op: Operation,
        reason: String,
        hint_ms: u64,
    ) {
        let plan = &self.inst.plan.steps[i];
        let policy: RetryPolicy = if op.is_forward() {
            plan.retry
        } else {
            plan.finish_retry
        };
        let s = &self.inst.steps[i];
        let used = s.attempt.saturating_sub(s.budget_from);
        let unit = jitter_unit(self.inst.id, i, op, s.attempt);
        let delay = policy.delay_ms(used, unit).max(hint_ms);
        let at = self.now + Duration::milliseconds(delay as i64);
        let attempt = s.attempt + 1;
        if self.breakers.is_open(&plan.participant) {
            // The participant is known to be down: this attempt says nothing about the step,
            // so it is not counted, and the next one waits its turn behind the breaker (the
            // timer then asks it again).
            self.postpone(i, op, attempt, at, true);
        } else if used < policy.max_attempts {
            self.emit(Event::RetryScheduled {
                step: i,
                operation: op,
                attempt,
                at,
            });
            self.set_timer(at, TimerKind::Backoff, i, op, attempt);
        } else if op.is_forward() {
            let reason = format!("{used} attempt(s) without a definite reply; last: {reason}");
            self.emit(Event::GaveUp {
                step: i,
                operation: op,
                reason,
            });
            self.cancel_timer(i);
        } else {
            let reason = format!("{op} exhausted {used} attempt(s); last: {reason}");
            self.emit(Event::Stuck {
                step: i,
                operation: op,
                reason,
            });
            self.cancel_timer(i);
        }
    }
}

/// A number in `[0, 1)` fixed by the instance, step, operation and attempt (splitmix64), so that
/// retry jitter spreads instances apart yet replays identically.
pub(super) fn jitter_unit(id: Uuid, step: usize, op: Operation, attempt: u32) -> f64 {
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
