//! Barrier cleanup on a schedule: a running participant deletes its old barrier rows itself.

use std::convert::Infallible;
use std::time::Duration;

use sqlx::PgPool;

use crate::barrier;

/// How long barrier rows are kept by default (see [`Participant::barrier_retention`]): longer
/// than any transaction stays open, and than any orchestrator retention one would choose.
///
/// [`Participant::barrier_retention`]: super::Participant::barrier_retention
pub const DEFAULT_BARRIER_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// How often a running participant cleans its barrier up (the first time one period after it
/// starts, when its barrier table exists).
pub const BARRIER_CLEANUP_EVERY: Duration = Duration::from_secs(3600);

/// Every `every`, deletes the barrier rows of transactions whose rows are all older than
/// `retention` ([`barrier::cleanup`], in bounded batches). Never returns: it ends when the
/// participant stops and drops it; a failure is logged and tried again next period.
pub(super) async fn cleanup_loop(
    participant: &str,
    pool: &PgPool,
    retention: Duration,
    every: Duration,
) -> Infallible {
    let retention = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    loop {
        tokio::time::sleep(every).await;
        match barrier::cleanup(pool, retention).await {
            Ok(0) => {}
            Ok(rows) => tracing::info!(%participant, rows, "old barrier rows deleted"),
            Err(error) => {
                tracing::warn!(%participant, %error, "barrier cleanup failed; trying again later")
            }
        }
    }
}
