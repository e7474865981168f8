//! Publishing committed outbox rows, and deleting them in batches once the broker confirmed
//! them.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::limits::RateLimits;
use super::{Engine, Stats};
use crate::store::{OutboxMessage, SagaStore};
use crate::transport::Transport;

/// Published outbox rows are deleted in batches: at most this often...
pub const OUTBOX_DELETE_INTERVAL: Duration = Duration::from_millis(20);
/// ...or as soon as this many ids are waiting.
pub const OUTBOX_DELETE_BATCH: usize = 256;

/// A command to a rate-limited participant is published by whoever committed it only if its
/// slot comes within this long: well within the outbox's grace period (5 s), after which the
/// relay may take the row and publish it a second time.
const PUBLISH_MAX_WAIT: Duration = Duration::from_secs(3);
/// ...and by the relay only within this long: well within the lease of its claim (30 s).
const RELAY_MAX_WAIT: Duration = Duration::from_secs(20);

/// What the outbox deleter is told.
enum Deletion {
    /// Ids of rows whose publish the broker confirmed.
    Ids(Vec<i64>),
    /// Delete everything received so far, then answer.
    Flush(oneshot::Sender<()>),
}

/// Deletes confirmed outbox rows in batches, one `DELETE … WHERE id = ANY` per batch, off the
/// path of the start and reply that published them. The first ids after a quiet period are
/// deleted at once; under load the deletes run at most every [`OUTBOX_DELETE_INTERVAL`] (or
/// every [`OUTBOX_DELETE_BATCH`] ids), so one transaction deletes many rows. A row whose
/// delete is lost (crash, failed statement) is republished by the relay after its grace
/// period: a duplicate command, which the participants' barrier absorbs.
async fn delete_loop(store: Arc<dyn SagaStore>, mut rx: mpsc::UnboundedReceiver<Deletion>) {
    let mut batch: Vec<i64> = Vec::new();
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    let mut last = tokio::time::Instant::now()
        .checked_sub(OUTBOX_DELETE_INTERVAL)
        .unwrap_or_else(tokio::time::Instant::now);
    let mut open = true;
    while open {
        // Wait for work.
        match rx.recv().await {
            Some(Deletion::Ids(ids)) => batch.extend(ids),
            Some(Deletion::Flush(done)) => waiting.push(done),
            None => open = false,
        }
        // Collect until the interval since the last delete is over, the batch is full, or a
        // flush is asked for.
        let until = last + OUTBOX_DELETE_INTERVAL;
        while open && waiting.is_empty() && batch.len() < OUTBOX_DELETE_BATCH {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(Deletion::Ids(ids)) => batch.extend(ids),
                    Some(Deletion::Flush(done)) => waiting.push(done),
                    None => open = false,
                },
                _ = tokio::time::sleep_until(until) => break,
            }
        }
        // Whatever else is already queued goes with it.
        while let Ok(m) = rx.try_recv() {
            match m {
                Deletion::Ids(ids) => batch.extend(ids),
                Deletion::Flush(done) => waiting.push(done),
            }
        }
        if !batch.is_empty() {
            if let Err(e) = store.delete_outbox(&batch).await {
                tracing::warn!(error = %e, rows = batch.len(), "published outbox rows not deleted; the relay will publish them again");
            }
            batch.clear();
            last = tokio::time::Instant::now();
        }
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Publishes committed outbox rows and hands the confirmed ones to the deleter.
#[derive(Clone)]
pub(super) struct Publisher {
    transport: Arc<dyn Transport>,
    store: Arc<dyn SagaStore>,
    /// The background deleter of published outbox rows (none outside a Tokio runtime: then
    /// rows are deleted right after their confirm).
    deleter: Option<mpsc::UnboundedSender<Deletion>>,
    /// The engine's counters (failed publishes).
    stats: Arc<Stats>,
    /// Commands per second to the limited participants.
    limits: Arc<RateLimits>,
}

impl Publisher {
    /// A publisher, with its background deleter when called inside a Tokio runtime.
    pub(super) fn new(
        transport: Arc<dyn Transport>,
        store: Arc<dyn SagaStore>,
        stats: Arc<Stats>,
        limits: Arc<RateLimits>,
    ) -> Publisher {
        let deleter = tokio::runtime::Handle::try_current().ok().map(|runtime| {
            let (tx, rx) = mpsc::unbounded_channel();
            runtime.spawn(delete_loop(store.clone(), rx));
            tx
        });
        Publisher {
            transport,
            store,
            deleter,
            stats,
            limits,
        }
    }

    /// Publishes `outbox` and hands the rows the broker confirmed to the background deleter
    /// (deletes them itself when there is none). A failure leaves them for the relay, so it is
    /// logged, not returned.
    pub(super) async fn publish(&self, outbox: Vec<OutboxMessage>) {
        let Some(ids) = self.send(&outbox, PUBLISH_MAX_WAIT).await else {
            return;
        };
        let ids = match &self.deleter {
            Some(deleter) => match deleter.send(Deletion::Ids(ids)) {
                Ok(()) => return,
                Err(mpsc::error::SendError(Deletion::Ids(ids))) => ids,
                Err(_) => return,
            },
            None => ids,
        };
        self.delete(&ids).await;
    }

    /// Publishes `outbox` and deletes the rows the broker confirmed before it returns, not
    /// through the background deleter (the relay).
    pub(super) async fn publish_and_delete(&self, outbox: Vec<OutboxMessage>) {
        if let Some(ids) = self.send(&outbox, RELAY_MAX_WAIT).await {
            self.delete(&ids).await;
        }
    }

    /// Publishes `outbox`, each command to a rate-limited participant once its slot comes;
    /// a command whose slot is more than `max_wait` away is left in the outbox (the relay
    /// takes it once its grace period or lease ends). The ids of the rows the broker
    /// confirmed, `None` when there was nothing to publish or nothing was confirmed.
    async fn send(&self, outbox: &[OutboxMessage], max_wait: Duration) -> Option<Vec<i64>> {
        if outbox.is_empty() {
            return None;
        }
        if self.limits.is_empty() {
            return self.send_now(outbox).await;
        }
        // Every slot is reserved first, so that concurrent publishers queue in the order
        // they came; rows due at the same time go together, in their order.
        let start = tokio::time::Instant::now();
        let waits: Vec<Option<Duration>> = outbox
            .iter()
            .map(|m| self.limits.reserve(&m.participant, start, max_wait))
            .collect();
        let mut order: Vec<usize> = (0..outbox.len()).filter(|&i| waits[i].is_some()).collect();
        order.sort_by_key(|&i| waits[i]);
        let mut confirmed = Vec::with_capacity(order.len());
        for due in order.chunk_by(|a, b| waits[*a] == waits[*b]) {
            tokio::time::sleep_until(start + waits[due[0]].unwrap_or_default()).await;
            let rows: Vec<OutboxMessage> = due.iter().map(|&i| outbox[i].clone()).collect();
            confirmed.extend(self.send_now(&rows).await.unwrap_or_default());
        }
        (!confirmed.is_empty()).then_some(confirmed)
    }

    /// Publishes `outbox` now; the ids of its rows once the broker confirmed them all, `None`
    /// when the publish failed.
    async fn send_now(&self, outbox: &[OutboxMessage]) -> Option<Vec<i64>> {
        match self.transport.publish(outbox).await {
            Ok(()) => Some(outbox.iter().map(|m| m.id).collect()),
            Err(e) => {
                self.stats.count_publish_failure();
                tracing::warn!(error = %e, rows = outbox.len(), "publish failed; the outbox relay will retry");
                None
            }
        }
    }

    /// Deletes published rows; a failure is only logged: the relay publishes them again.
    async fn delete(&self, ids: &[i64]) {
        if let Err(e) = self.store.delete_outbox(ids).await {
            tracing::warn!(error = %e, "published outbox rows not deleted; the relay will publish them again");
        }
    }
}

impl Engine {
    /// Publishes committed outbox rows; the background deleter deletes the confirmed ones
    /// (see [`Publisher::publish`]).
    pub(super) async fn publish(&self, outbox: Vec<OutboxMessage>) {
        self.publisher.publish(outbox).await;
    }

    /// Waits until the published outbox rows handed to the background deleter so far are
    /// deleted (or their delete failed). `run` does it when it stops.
    pub async fn flush_outbox_deletes(&self) {
        if let Some(deleter) = &self.publisher.deleter {
            let (done, wait) = oneshot::channel();
            if deleter.send(Deletion::Flush(done)).is_ok() {
                let _ = wait.await;
            }
        }
    }
}
