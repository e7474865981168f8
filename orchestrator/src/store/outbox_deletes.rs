//! Published outbox rows waiting to be deleted by the next write.
//!
//! A command's outbox row is deleted once the broker confirmed its publish. On its own that
//! delete is a transaction of its own, and at low load one per command: at one saga at a time
//! it was about one in six of the orchestrator's transactions. A store whose writes are single
//! statements lets them carry the delete instead ([`SagaStore::outbox_deletes`]): the confirmed
//! ids wait here, the next write takes them into its statement, and the outbox deleter deletes
//! them only once an interval passed without a write.
//!
//! [`SagaStore::outbox_deletes`]: super::SagaStore::outbox_deletes

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// At most this many ids ride with one write, so that a write on a saga's path never carries
/// a long delete; the rest wait for the next write or for the deleter.
pub const CARRIED_PER_WRITE: usize = 64;

/// Ids of published outbox rows, waiting for a write (or the deleter) to delete them.
#[derive(Debug, Default)]
pub struct OutboxDeletes {
    ids: Mutex<Vec<i64>>,
    /// How many writes looked for ids to carry.
    writes: AtomicU64,
}

impl OutboxDeletes {
    /// Leaves `ids` for the next write.
    pub fn add(&self, ids: &[i64]) {
        self.lock().extend_from_slice(ids);
    }

    /// Every id waiting (the deleter's take).
    pub fn take_all(&self) -> Vec<i64> {
        std::mem::take(&mut *self.lock())
    }

    /// Up to [`CARRIED_PER_WRITE`] ids, the oldest first, for a write to delete in its
    /// statement; they come back here unless the write says it committed.
    pub fn carry(&self) -> Carried<'_> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let ids = {
            let mut waiting = self.lock();
            let n = waiting.len().min(CARRIED_PER_WRITE);
            waiting.drain(..n).collect()
        };
        Carried { from: self, ids }
    }

    /// How many writes have looked for ids to carry (whether they found any): while the count
    /// moves, writes come and take what waits.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// How many ids are waiting.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no id is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<i64>> {
        // A panic while holding the lock cannot leave the vector half-written.
        self.ids
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Ids a write took to delete in its statement: put back where they came from when dropped
/// before [`Carried::committed`] (the write failed, or its future was dropped). A write whose
/// commit succeeded but whose answer was lost puts back ids already deleted: deleting them
/// again deletes nothing.
#[derive(Debug)]
pub struct Carried<'a> {
    from: &'a OutboxDeletes,
    ids: Vec<i64>,
}

impl Carried<'_> {
    /// The ids to delete.
    pub fn ids(&self) -> &[i64] {
        &self.ids
    }

    /// The write that deleted them committed.
    pub fn committed(mut self) {
        self.ids.clear();
    }
}

impl Drop for Carried<'_> {
    fn drop(&mut self) {
        if !self.ids.is_empty() {
            self.from.add(&self.ids);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_carries_the_oldest_ids_up_to_its_share_and_leaves_the_rest() {
        let deletes = OutboxDeletes::default();
        let ids: Vec<i64> = (1..=100).collect();
        deletes.add(&ids);
        let carried = deletes.carry();
        assert_eq!(carried.ids(), &ids[..CARRIED_PER_WRITE]);
        assert_eq!(deletes.writes(), 1);
        carried.committed();
        assert_eq!(deletes.take_all(), &ids[CARRIED_PER_WRITE..]);
        assert!(deletes.is_empty());
    }

    #[test]
    fn ids_of_a_write_that_did_not_commit_wait_again() {
        let deletes = OutboxDeletes::default();
        deletes.add(&[7, 8]);
        let carried = deletes.carry();
        assert!(deletes.is_empty());
        deletes.add(&[9]);
        drop(carried);
        let mut left = deletes.take_all();
        left.sort_unstable();
        assert_eq!(left, [7, 8, 9]);
    }

    #[test]
    fn nothing_waiting_carries_nothing() {
        let deletes = OutboxDeletes::default();
        let carried = deletes.carry();
        assert!(carried.ids().is_empty());
        drop(carried);
        assert_eq!(deletes.len(), 0);
    }
}
