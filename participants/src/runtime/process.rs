//! One command through the barrier and its handler, its failures turned into `retry`.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;
use sqlx::PgPool;

use crate::barrier;
use crate::handler::Handler;
use crate::protocol::{Command, Outcome};

/// Runs `cmd` through the barrier and `handler`, never failing: barrier errors and handler
/// panics become `retry` outcomes (nothing was committed in either case).
pub async fn process(pool: &PgPool, handler: &dyn Handler, cmd: &Command) -> Outcome {
    process_within(pool, handler, cmd, None).await
}

/// [`process`] with a time limit: a handler still running after `limit` is abandoned (its
/// transaction is dropped, which rolls it back) and the outcome is `retry`.
///
/// If the limit strikes while the barrier commits, the commit may still have happened; the
/// orchestrator's next attempt then gets the stored reply, so `retry` stays safe.
pub async fn process_within(
    pool: &PgPool,
    handler: &dyn Handler,
    cmd: &Command,
    limit: Option<Duration>,
) -> Outcome {
    guarded(pool, handler, cmd, limit).await.0
}

/// The outcome, and whether the time limit struck.
pub(super) async fn guarded(
    pool: &PgPool,
    handler: &dyn Handler,
    cmd: &Command,
    limit: Option<Duration>,
) -> (Outcome, bool) {
    let run = AssertUnwindSafe(barrier::execute(pool, cmd, handler)).catch_unwind();
    let result = match within(limit, run).await {
        Ok(result) => result,
        Err(limit) => {
            let limit_ms = limit.as_millis();
            tracing::warn!(
                limit_ms = limit_ms as u64,
                "handler exceeded its time limit; rolled back, replying retry"
            );
            let reason = format!("handler exceeded its time limit of {limit_ms} ms");
            return (Outcome::retry(reason), true);
        }
    };
    let outcome = match result {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(error)) => {
            tracing::warn!(%error, "barrier failed; replying retry");
            Outcome::retry(error.to_string())
        }
        Err(panic) => {
            let message = panic_message(&*panic);
            tracing::error!(panic = %message, "handler panicked; replying retry");
            Outcome::retry(format!("handler panicked: {message}"))
        }
    };
    (outcome, false)
}

/// Awaits `work`, for at most `limit` if there is one; `Err(limit)` when it strikes (and
/// `work` is dropped, which rolls back a transaction it holds).
pub(super) async fn within<F: Future>(
    limit: Option<Duration>,
    work: F,
) -> Result<F::Output, Duration> {
    match limit {
        None => Ok(work.await),
        Some(limit) => tokio::time::timeout(limit, work).await.map_err(|_| limit),
    }
}

pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}
