//! The outcomes of commands taken together: in one barrier transaction, or each alone.
//!
//! One transaction for all of them when it commits (without savepoints while few fail); each
//! command alone when it does not.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use tracing::Instrument;

use super::admission::Job;
use super::outage::run_alone;
use super::process::{panic_message, timed_out, within};
use super::session::Context;
use super::stats::Stats;
use crate::barrier::{BarrierError, Batch, handler_lock_order, in_given_order};
use crate::protocol::Outcome;

/// Why a batch's transaction was abandoned (and its commands run one by one).
#[derive(Debug, thiserror::Error)]
enum BatchFailure {
    #[error(transparent)]
    Barrier(#[from] BarrierError),
    #[error("a step of the batch exceeded the time limit of {} ms", .0.as_millis())]
    TimedOut(Duration),
    /// The transaction did not begin within the time limit: no connection could be had (the
    /// database may be down), or the barrier rows waited for another transaction's.
    #[error("the batch did not begin within the time limit of {} ms", .0.as_millis())]
    BeginTimedOut(Duration),
    #[error("a handler panicked: {0}")]
    Panicked(String),
}

impl BatchFailure {
    /// Whether the database could not be reached (or the connection was lost).
    fn is_unavailable(&self) -> bool {
        matches!(self, BatchFailure::Barrier(error) if error.is_unavailable())
    }
}

/// Runs the jobs' commands in one [`Batch`], without a savepoint per handler when `unguarded`
/// ([`Batch::begin_unguarded`]): each command, and the begin and the commit, within the handler
/// time limit. Any failure drops the batch, which rolls it back.
async fn in_one_transaction(
    ctx: &Context,
    jobs: &[&Job],
    unguarded: bool,
) -> Result<Vec<Outcome>, BatchFailure> {
    let limit = ctx.handler_timeout;
    let cmds = jobs.iter().map(|job| &job.cmd);
    let begin = async {
        if unguarded {
            Batch::begin_unguarded(&ctx.pool, cmds).await
        } else {
            Batch::begin_for(&ctx.pool, cmds).await
        }
    };
    let mut batch = within(limit, begin)
        .await
        .map_err(BatchFailure::BeginTimedOut)??;
    let mut outcomes = Vec::with_capacity(jobs.len());
    for job in jobs {
        let run = AssertUnwindSafe(batch.execute(&job.cmd, &*ctx.handler)).catch_unwind();
        let (next, outcome) = within(limit, run)
            .instrument(job.span.clone())
            .await
            .map_err(BatchFailure::TimedOut)?
            .map_err(|panic| BatchFailure::Panicked(panic_message(&*panic)))??;
        batch = next;
        outcomes.push(outcome);
    }
    within(limit, batch.commit())
        .await
        .map_err(BatchFailure::TimedOut)??;
    Ok(outcomes)
}

/// The outcomes of the jobs' commands, in order: from one transaction when there are several
/// and it commits (run in [`lock_order`](crate::barrier::lock_order), so that concurrent
/// batches do not deadlock over the rows their handlers share); otherwise from each command
/// alone, all at once, as [`run_alone`] runs it (a command that timed out, panicked or
/// deadlocked in the batch then gets its own answer, and the others are not held back by it;
/// while the database cannot be reached, they wait for it).
///
/// While few recent commands failed, a batch first runs without savepoints; if one of its
/// handlers does not succeed, it runs again with them. So does a lone command
/// ([`lone_unguarded`]).
pub(super) async fn outcomes(ctx: &Context, jobs: &[Job]) -> Vec<Outcome> {
    if let [job] = jobs {
        let outcome = match lone_unguarded(ctx, job).await {
            Some(outcome) => outcome,
            None => run_alone(ctx, &job.cmd).instrument(job.span.clone()).await,
        };
        ctx.failures.observe(std::slice::from_ref(&outcome));
        return vec![outcome];
    }
    if jobs.len() > 1 {
        let order = handler_lock_order(&*ctx.handler, jobs.iter().map(|job| &job.cmd));
        let ordered: Vec<&Job> = order.iter().map(|&i| &jobs[i]).collect();
        let unguarded = ctx.failures.unguarded(jobs.len());
        let mut result = in_one_transaction(ctx, &ordered, unguarded).await;
        if matches!(result, Err(BatchFailure::Barrier(BarrierError::Unguarded))) {
            Stats::bump(&ctx.stats.0.batch_reruns);
            result = in_one_transaction(ctx, &ordered, false).await;
        }
        match result {
            Ok(outcomes) => {
                Stats::bump(&ctx.stats.0.batches);
                ctx.failures.observe(&outcomes);
                // Back in the order of the jobs, whatever the order they ran in.
                return in_given_order(&order, outcomes);
            }
            Err(failure) => {
                Stats::bump(&ctx.stats.0.batch_fallbacks);
                if failure.is_unavailable() {
                    // Logged once per outage, by the commands that wait for the database.
                    tracing::debug!(%failure, "batch rolled back: the database is unreachable");
                } else {
                    tracing::warn!(
                        participant = %ctx.participant,
                        commands = jobs.len(),
                        %failure,
                        "batch rolled back; running its commands one by one"
                    );
                }
            }
        }
    }
    let alone = jobs
        .iter()
        .map(|job| run_alone(ctx, &job.cmd).instrument(job.span.clone()));
    futures_util::future::join_all(alone).await
}

/// The outcome of a lone command run without a savepoint, while few recent commands failed:
/// the transaction of a batch of one, two round trips less than [`run_alone`] (the
/// `SAVEPOINT`, and the `BEGIN`, which carries the barrier row's insert). `None` when it is
/// to run as [`run_alone`] runs it: savepoints are due, or
/// its handler did not succeed (its writes rolled back with the transaction; the run with a
/// savepoint answers it, as a batch runs again), or the transaction failed or did not begin
/// in time (alone, it waits for the database if that is why). A handler (or the commit) that
/// exceeds its time limit is answered `retry` at once, as alone, rather than run again.
async fn lone_unguarded(ctx: &Context, job: &Job) -> Option<Outcome> {
    if !ctx.failures.unguarded(1) {
        return None;
    }
    match in_one_transaction(ctx, &[job], true).await {
        Ok(mut outcomes) => outcomes.pop(),
        Err(BatchFailure::TimedOut(limit)) => {
            Stats::bump(&ctx.stats.0.timed_out);
            Some(timed_out(limit))
        }
        Err(BatchFailure::Barrier(BarrierError::Unguarded)) => {
            Stats::bump(&ctx.stats.0.batch_reruns);
            None
        }
        Err(_) => {
            Stats::bump(&ctx.stats.0.batch_fallbacks);
            None
        }
    }
}

/// An estimate of the share of recent batched commands that did not succeed (`failed`,
/// `retry`): it decides whether a batch first runs without savepoints.
///
/// Without them a batch saves one round trip per command, but a command that fails makes the
/// whole batch run again, with them; so a batch goes without while it expects fewer than
/// [`FailureRate::UNGUARDED_BELOW`] failing commands. Batches running at once update it
/// without coordination: it is an estimate.
#[derive(Debug, Default)]
pub(super) struct FailureRate(AtomicU64);

impl FailureRate {
    /// The weight of each command in the estimate: it follows about the last 64 commands.
    const WEIGHT: f64 = 1.0 / 64.0;
    /// The most failing commands a batch may expect and still run without savepoints.
    const UNGUARDED_BELOW: f64 = 0.25;

    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }

    /// Whether a batch of `commands` should first run without savepoints.
    fn unguarded(&self, commands: usize) -> bool {
        self.get() * (commands as f64) < Self::UNGUARDED_BELOW
    }

    /// Takes the outcomes of a committed batch into the estimate.
    fn observe(&self, outcomes: &[Outcome]) {
        if outcomes.is_empty() {
            return;
        }
        let failed = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Failed { .. } | Outcome::Retry { .. }))
            .count();
        let kept = (1.0 - Self::WEIGHT).powi(outcomes.len() as i32);
        let share = failed as f64 / outcomes.len() as f64;
        let rate = self.get() * kept + share * (1.0 - kept);
        self.0.store(rate.to_bits(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn outcomes(failed: usize, succeeded: usize) -> Vec<Outcome> {
        let mut all = vec![Outcome::failed("no"); failed];
        all.extend(vec![Outcome::succeeded(json!(null)); succeeded]);
        all
    }

    #[test]
    fn batches_go_without_savepoints_until_their_commands_fail_often_and_again_once_they_stop() {
        let rate = FailureRate::default();
        assert!(rate.unguarded(32), "nothing failed yet");
        rate.observe(&outcomes(1, 7));
        assert!(
            rate.unguarded(8),
            "one failure now and then keeps batches unguarded"
        );
        for _ in 0..20 {
            rate.observe(&outcomes(2, 6));
        }
        assert!(!rate.unguarded(8), "a quarter failing: savepoints");
        let mut batches = 0;
        while !rate.unguarded(8) {
            rate.observe(&outcomes(0, 8));
            batches += 1;
            assert!(batches < 100, "the estimate follows recent commands");
        }
        assert!(
            batches > 5,
            "one good batch does not undo a long run of failures"
        );
    }

    #[test]
    fn transient_failures_count_as_failures_and_in_progress_does_not() {
        let rate = FailureRate::default();
        for _ in 0..200 {
            rate.observe(&[Outcome::retry("busy"), Outcome::InProgress { note: None }]);
        }
        assert!((rate.get() - 0.5).abs() < 0.05, "{}", rate.get());
        rate.observe(&[]);
        assert!(
            (rate.get() - 0.5).abs() < 0.05,
            "an empty batch changes nothing"
        );
    }
}
