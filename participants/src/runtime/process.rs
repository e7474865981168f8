//! One command through the barrier and its handler, its failures turned into `retry`.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;
use sqlx::PgPool;

use crate::barrier::{self, BarrierError};
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

/// The outcome, and whether the time limit struck; a database that cannot be reached is
/// answered `retry` too.
pub(super) async fn guarded(
    pool: &PgPool,
    handler: &dyn Handler,
    cmd: &Command,
    limit: Option<Duration>,
) -> (Outcome, bool) {
    match attempt(pool, handler, cmd, limit).await {
        Attempt::Answered { outcome, timed_out } => (outcome, timed_out),
        Attempt::Unavailable(error) => {
            tracing::warn!(%error, "database unreachable; replying retry");
            (Outcome::retry(error.to_string()), false)
        }
    }
}

/// What one run of a command through the barrier came to.
pub(super) enum Attempt {
    /// The outcome to answer with; `timed_out` when it is `retry` because the time limit
    /// struck.
    Answered { outcome: Outcome, timed_out: bool },
    /// The database could not be reached, or the connection was lost on the way
    /// ([`BarrierError::is_unavailable`]): nothing is to be answered; run it again later.
    Unavailable(BarrierError),
}

/// Runs `cmd` through the barrier and `handler` once: barrier errors and handler panics become
/// `retry` outcomes (nothing was committed in either case), but for a database that cannot be
/// reached. The time limit starts once a connection is had: waiting for one is waiting for
/// the database, not the handler being slow.
pub(super) async fn attempt(
    pool: &PgPool,
    handler: &dyn Handler,
    cmd: &Command,
    limit: Option<Duration>,
) -> Attempt {
    let mut conn = match pool.acquire().await {
        Ok(conn) => conn,
        Err(error) => {
            let error = BarrierError::from(error);
            if error.is_unavailable() {
                return Attempt::Unavailable(error);
            }
            tracing::warn!(%error, "no database connection; replying retry");
            return Attempt::Answered {
                outcome: Outcome::retry(error.to_string()),
                timed_out: false,
            };
        }
    };
    let run = AssertUnwindSafe(barrier::execute_on(&mut conn, cmd, handler)).catch_unwind();
    let result = match within(limit, run).await {
        Ok(result) => result,
        Err(limit) => {
            return Attempt::Answered {
                outcome: timed_out(limit),
                timed_out: true,
            };
        }
    };
    let outcome = match result {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(error)) if error.is_unavailable() => return Attempt::Unavailable(error),
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
    Attempt::Answered {
        outcome,
        timed_out: false,
    }
}

/// The answer to a command whose handler exceeded its time `limit` (its transaction rolled
/// back): `retry`.
pub(super) fn timed_out(limit: Duration) -> Outcome {
    let limit_ms = limit.as_millis();
    tracing::warn!(
        limit_ms = limit_ms as u64,
        "handler exceeded its time limit; rolled back, replying retry"
    );
    Outcome::retry(format!("handler exceeded its time limit of {limit_ms} ms"))
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
