//! The states of open instances as this process last committed them.
//!
//! A batch of replies for instances found here is decided on these states and written with one
//! statement, without `BEGIN`, the locking `SELECT` and `COMMIT`: the statement's projection
//! update carries the `seq` each decision was made on and writes only the rows still at it, so
//! a state another process (or a concurrent batch of this one) moved on since is not
//! overwritten. Its items are then decided again on the stored state, under the row lock. The
//! cache is only a guess of what is stored; the guard makes it safe to be wrong.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use uuid::Uuid;

use crate::machine::Instance;

/// At most this many states are kept (about 2–3 kB each); past it, new instances are not
/// cached and take the locking path until cached ones finish.
pub(super) const CAPACITY: usize = 4096;

/// A state as committed, with the id of its plan.
#[derive(Debug, Clone)]
pub(super) struct Known {
    pub instance: Instance,
    pub plan_id: Uuid,
}

#[derive(Debug, Default)]
pub(super) struct States {
    map: Mutex<HashMap<Uuid, Known>>,
    /// Items decided and written on a cached state.
    pub hits: AtomicU64,
    /// Items whose cached state turned out stale (decided again under the lock).
    pub stale: AtomicU64,
}

impl States {
    /// The cached states of `ids` (each named once), if every one is cached.
    pub fn all(&self, ids: &[Uuid]) -> Option<Vec<Known>> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        ids.iter().map(|id| map.get(id).cloned()).collect()
    }

    /// Notes a committed state: kept while the instance is open and newer than the one
    /// cached, dropped once it is terminal.
    pub fn committed(&self, instance: &Instance, plan_id: Uuid) {
        let id = instance.id;
        if instance.status.is_terminal() {
            self.forget(id);
            return;
        }
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let full = map.len() >= CAPACITY;
        match map.entry(id) {
            Entry::Occupied(mut known) => {
                // A batch that committed earlier may report after a later one.
                if known.get().instance.seq < instance.seq {
                    let known = known.get_mut();
                    known.instance.clone_from(instance);
                    known.plan_id = plan_id;
                }
            }
            Entry::Vacant(slot) if !full => {
                slot.insert(Known {
                    instance: instance.clone(),
                    plan_id,
                });
            }
            Entry::Vacant(_) => {}
        }
    }

    /// Drops the cached state of `id`.
    pub fn forget(&self, id: Uuid) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// How many states are cached.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn bump(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}
