//! The gauge loop: what the store and the broker hold now (open instances, the outbox, due
//! timers, dead letters), read every `gauge_interval` rather than per scrape, so that scrapes
//! cost the database nothing.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::Engine;
use super::metric;
use super::retention::sleep_or_stop;

impl Engine {
    /// Sets the build info gauge, then refreshes the other gauges every
    /// [`EngineConfig::gauge_interval`](super::EngineConfig::gauge_interval) until `shutdown`.
    pub(super) async fn gauge_loop(self: Arc<Self>, shutdown: CancellationToken) {
        metric::record_build_info();
        while !shutdown.is_cancelled() {
            self.refresh_gauges().await;
            sleep_or_stop(&shutdown, self.config.gauge_interval).await;
        }
    }

    /// Reads the store and the broker once and sets the gauges; a failed read logs a warning
    /// and leaves the gauges it would have set as they were. Public for tests, which call it
    /// to set the gauges from their own engine just before they look.
    #[doc(hidden)]
    pub async fn refresh_gauges(&self) {
        let now = self.clock.now();
        match self.store.gauges(now).await {
            Ok(gauges) => metric::record_gauges(&gauges, now),
            Err(e) => tracing::warn!(error = %e, "reading the gauges from the store failed"),
        }
        match self.transport.dead_letters().await {
            Ok(Some(messages)) => metric::record_dead_letters(messages),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "reading the dead-letter queue's depth failed"),
        }
    }
}
