//! The outbox relay: republishes rows that no process published (a crash, a broker outage).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::Engine;

/// Outbox rows the relay claims at once.
const RELAY_BATCH: usize = 256;

impl Engine {
    /// Claims outbox rows past their grace period and publishes them, until `shutdown`.
    pub(super) async fn relay_loop(self: Arc<Self>, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            if self.relay_outbox().await == RELAY_BATCH {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(self.config.relay_poll) => {}
            }
        }
    }

    /// One round of the relay: claims the outbox rows past their grace period and publishes
    /// them; how many it claimed. Public for the deterministic simulation.
    #[doc(hidden)]
    pub async fn relay_outbox(&self) -> usize {
        let lease = chrono::Duration::seconds(30);
        match self
            .store
            .claim_outbox(self.clock.now(), RELAY_BATCH as i64, lease)
            .await
        {
            Ok(rows) if !rows.is_empty() => {
                let n = rows.len();
                tracing::info!(rows = n, "relaying unpublished outbox rows");
                self.publisher.publish_and_delete(rows).await;
                self.stats.count_relayed(n as u64);
                n
            }
            Ok(_) => 0,
            Err(e) => {
                tracing::warn!(error = %e, "claiming the outbox failed");
                0
            }
        }
    }
}
