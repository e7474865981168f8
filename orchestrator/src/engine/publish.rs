//! Publishing committed outbox rows, and deleting them in batches once the broker confirmed
//! them.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::limits::RateLimits;
use super::{Engine, Stats};
use crate::store::{OutboxDeletes, OutboxMessage, SagaStore};
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
///
/// Where the store's writes carry deletes ([`SagaStore::outbox_deletes`]), the ids wait there
/// instead, and the loop deletes them only once a whole interval passed without a write (or
/// [`OUTBOX_DELETE_BATCH`] of them wait): while writes come, they take the ids, and the
/// deletes cost no transaction.
async fn delete_loop(
    store: &dyn SagaStore,
    carried: Option<&OutboxDeletes>,
    mut rx: mpsc::UnboundedReceiver<Deletion>,
) {
    let mut due = Due::default();
    let mut last = tokio::time::Instant::now()
        .checked_sub(OUTBOX_DELETE_INTERVAL)
        .unwrap_or_else(tokio::time::Instant::now);
    let mut open = true;
    while open {
        // Wait for work.
        open = due.take(carried, rx.recv().await);
        loop {
            let writes = carried.map(OutboxDeletes::writes);
            // Collect until the interval is over (since the last delete, or from now where
            // writes carry deletes), the batch is full, or a flush is asked for.
            let from = if carried.is_some() {
                tokio::time::Instant::now()
            } else {
                last
            };
            let until = from + OUTBOX_DELETE_INTERVAL;
            while !due.must_delete(open, carried) {
                tokio::select! {
                    m = rx.recv() => open = due.take(carried, m),
                    _ = tokio::time::sleep_until(until) => break,
                }
            }
            // Whatever else is already queued goes with it.
            while let Ok(m) = rx.try_recv() {
                due.take(carried, Some(m));
            }
            // Writes came in the interval and ids wait: the next writes take them.
            let writes_carry = carried
                .zip(writes)
                .is_some_and(|(carried, before)| !carried.is_empty() && carried.writes() != before);
            if !writes_carry || due.must_delete(open, carried) {
                break;
            }
        }
        let mut ids = std::mem::take(&mut due.ids);
        if let Some(carried) = carried {
            ids.extend(carried.take_all());
        }
        if !ids.is_empty() {
            if let Err(e) = store.delete_outbox(&ids).await {
                tracing::warn!(error = %e, rows = ids.len(), "published outbox rows not deleted; the relay will publish them again");
            }
            last = tokio::time::Instant::now();
        }
        for done in due.waiting.drain(..) {
            let _ = done.send(());
        }
    }
}

/// What the outbox deleter has received since its last delete.
#[derive(Default)]
struct Due {
    /// Ids to delete (where the store's writes do not carry them).
    ids: Vec<i64>,
    /// Flushes to answer.
    waiting: Vec<oneshot::Sender<()>>,
}

impl Due {
    /// Takes `m`; `false` when the channel is closed.
    fn take(&mut self, carried: Option<&OutboxDeletes>, m: Option<Deletion>) -> bool {
        match m {
            Some(Deletion::Ids(ids)) => match carried {
                Some(carried) => carried.add(&ids),
                None => self.ids.extend(ids),
            },
            Some(Deletion::Flush(done)) => self.waiting.push(done),
            None => return false,
        }
        true
    }

    /// Whether to delete now, without waiting further: the channel closed, a flush is asked
    /// for, or a whole batch waits.
    fn must_delete(&self, open: bool, carried: Option<&OutboxDeletes>) -> bool {
        let waiting = match carried {
            Some(carried) => carried.len(),
            None => self.ids.len(),
        };
        !open || !self.waiting.is_empty() || waiting >= OUTBOX_DELETE_BATCH
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
            let store = store.clone();
            runtime.spawn(async move { delete_loop(&*store, store.outbox_deletes(), rx).await });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::Definition;
    use crate::machine;
    use crate::store::MemoryStore;
    use serde_json::json;
    use uuid::Uuid;

    /// A store holding `n` outbox rows, and their ids.
    async fn store_with_rows(n: usize) -> (Arc<MemoryStore>, Vec<i64>) {
        let store = Arc::new(MemoryStore::new());
        let def = Definition::saga::<serde_json::Value>("d", 1)
            .step("a", "p", |s| s.command(|_, _| json!({})))
            .build()
            .unwrap();
        let now = chrono::Utc::now();
        for _ in 0..n {
            let t = machine::start(Uuid::now_v7(), (**def.plan()).clone(), json!({}), now, &def);
            store.create(&t, now).await.unwrap();
        }
        let ids = left(&store);
        (store, ids)
    }

    /// The outbox rows not deleted.
    fn left(store: &MemoryStore) -> Vec<i64> {
        store.outbox().iter().map(|m| m.id).collect()
    }

    /// Lets the deleter run whatever is ready; the paused clock does not move.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    /// A deleter on `store`, its writes carrying deletes through `carried` if given.
    fn deleter(
        store: &Arc<MemoryStore>,
        carried: Option<Arc<OutboxDeletes>>,
    ) -> mpsc::UnboundedSender<Deletion> {
        let (tx, rx) = mpsc::unbounded_channel();
        let store = store.clone();
        tokio::spawn(async move { delete_loop(&*store, carried.as_deref(), rx).await });
        tx
    }

    async fn advance(ms: u64) {
        tokio::time::advance(Duration::from_millis(ms)).await;
        settle().await;
    }

    #[tokio::test(start_paused = true)]
    async fn without_writes_that_carry_them_the_first_ids_after_a_quiet_period_go_at_once() {
        let (store, ids) = store_with_rows(3).await;
        let tx = deleter(&store, None);
        tx.send(Deletion::Ids(vec![ids[0]])).unwrap();
        settle().await;
        assert_eq!(left(&store), &ids[1..]);
        // The next ones wait out the interval since that delete, and go together.
        tx.send(Deletion::Ids(vec![ids[1]])).unwrap();
        advance(10).await;
        tx.send(Deletion::Ids(vec![ids[2]])).unwrap();
        settle().await;
        assert_eq!(left(&store), &ids[1..]);
        advance(10).await;
        assert!(left(&store).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn carried_ids_are_left_to_the_writes_while_they_come_and_deleted_once_none_came_for_an_interval()
     {
        let (store, ids) = store_with_rows(2).await;
        let carried = Arc::new(OutboxDeletes::default());
        let tx = deleter(&store, Some(carried.clone()));
        tx.send(Deletion::Ids(vec![ids[0]])).unwrap();
        settle().await;
        assert_eq!(carried.len(), 1, "left for a write");
        // A write takes it (its statement deletes the row; here it stays, to show who deleted
        // what).
        advance(10).await;
        carried.carry().committed();
        tx.send(Deletion::Ids(vec![ids[1]])).unwrap();
        // The interval ends with a write in it: another one for the id that waits.
        advance(15).await;
        assert_eq!(carried.len(), 1);
        assert_eq!(left(&store), ids);
        // No write in that one: the deleter deletes it.
        advance(20).await;
        assert!(carried.is_empty());
        assert_eq!(left(&store), &ids[..1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flush_or_a_whole_batch_waiting_deletes_the_carried_ids_at_once() {
        let (store, ids) = store_with_rows(1).await;
        let carried = Arc::new(OutboxDeletes::default());
        let tx = deleter(&store, Some(carried.clone()));
        tx.send(Deletion::Ids(ids.clone())).unwrap();
        let (done, flushed) = oneshot::channel();
        tx.send(Deletion::Flush(done)).unwrap();
        flushed.await.unwrap();
        assert!(left(&store).is_empty());
        assert!(carried.is_empty());
        let batch: Vec<i64> = (1..=OUTBOX_DELETE_BATCH as i64).map(|i| -i).collect();
        tx.send(Deletion::Ids(batch)).unwrap();
        settle().await;
        assert!(carried.is_empty(), "deleted without waiting");
    }
}
