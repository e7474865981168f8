//! The timer loop: due timers claimed with a lease and fed to their instances.

use std::sync::Arc;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::Engine;
use crate::machine::Input;

impl Engine {
    /// Claims due timers and feeds each to its instance, until `shutdown`.
    pub(super) async fn timer_loop(self: Arc<Self>, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            let full = self.fire_due_timers().await;
            if !full {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(self.config.timer_poll) => {}
                }
            }
        }
    }

    /// One round of the timer loop: claims the timers due now and feeds each to its instance.
    /// True when the claim was full (more may be due). Public for the deterministic
    /// simulation, which runs the engine's rounds itself instead of its loops.
    #[doc(hidden)]
    pub async fn fire_due_timers(&self) -> bool {
        let lease = chrono::Duration::from_std(self.config.timer_lease)
            .unwrap_or(chrono::Duration::seconds(30));
        let due = self
            .store
            .claim_due_timers(self.clock.now(), self.config.timer_batch, lease)
            .await;
        match due {
            Ok(due) => {
                let n = due.len();
                futures_util::stream::iter(due)
                    .for_each_concurrent(self.config.timer_concurrency, |(id, timer)| async move {
                        self.stats.count_timer();
                        if let Err(e) = self.deliver(id, Input::Timer(timer), Some(timer)).await {
                            tracing::warn!(%id, error = %e, "timer not handled; it fires again after its lease");
                        }
                    })
                    .await;
                n as i64 >= self.config.timer_batch
            }
            Err(e) => {
                tracing::warn!(error = %e, "claiming due timers failed");
                false
            }
        }
    }
}
