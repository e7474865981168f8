//! The outbox relay: republishes rows that no process published (a crash, a broker outage).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::Engine;

impl Engine {
    /// Claims outbox rows past their grace period and publishes them, until `shutdown`.
    pub(super) async fn relay_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let lease = chrono::Duration::seconds(30);
        while !shutdown.is_cancelled() {
            match self.store.claim_outbox(self.clock.now(), 256, lease).await {
                Ok(rows) if !rows.is_empty() => {
                    let n = rows.len() as u64;
                    tracing::info!(rows = n, "relaying unpublished outbox rows");
                    self.publisher.publish_and_delete(rows).await;
                    self.stats.count_relayed(n);
                    if n == 256 {
                        continue;
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "claiming the outbox failed"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(self.config.relay_poll) => {}
            }
        }
    }
}
