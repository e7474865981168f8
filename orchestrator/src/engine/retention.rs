//! The retention loop: deletes finished instances older than the retention, in bounded
//! batches, in every process (one at a time), off the path of replies and starts.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Engine;
use crate::store::Pruned;

impl Engine {
    /// While [`EngineConfig::retention`](super::EngineConfig::retention) is set: every
    /// `retention_poll`, deletes the instances that finished longer ago than the retention,
    /// `retention_batch` at a time with a `retention_pause` between batches (so that pruning a
    /// backlog never holds the database for long), until none is due or `shutdown`.
    pub(super) async fn retention_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(retention) = self.config.retention else {
            return;
        };
        let Ok(retention) = chrono::Duration::from_std(retention) else {
            tracing::warn!(
                ?retention,
                "retention too long to compute with; nothing is pruned"
            );
            return;
        };
        let batch = self.config.retention_batch.max(1);
        while !shutdown.is_cancelled() {
            let wait = match self.clock.now().checked_sub_signed(retention) {
                None => self.config.retention_poll,
                Some(before) => match self.store.prune(before, batch).await {
                    Ok(Pruned::Deleted(n)) => {
                        self.stats.count_pruned(n);
                        if n > 0 {
                            tracing::debug!(deleted = n, %before, "pruned finished instances");
                        }
                        if n >= u64::from(batch) {
                            self.config.retention_pause
                        } else {
                            self.config.retention_poll
                        }
                    }
                    Ok(Pruned::Busy) => self.config.retention_poll,
                    Err(e) => {
                        tracing::warn!(error = %e, "pruning finished instances failed; trying again later");
                        self.config.retention_poll
                    }
                },
            };
            sleep_or_stop(&shutdown, wait).await;
        }
    }
}

/// Sleeps for `wait`, or less if `shutdown` comes first.
pub(super) async fn sleep_or_stop(shutdown: &CancellationToken, wait: Duration) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(wait) => {}
    }
}
