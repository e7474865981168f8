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

use crate::engine::metric;
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

/// Statements on cached states judged together: if more than a quarter of them found a state
/// stale, guessing costs more than it saves, and it pauses.
const WINDOW: u32 = 32;
/// Statements decided on stored states during the first pause; each pause that follows a
/// window found as stale doubles it, up to [`LONGEST_PAUSE`].
const FIRST_PAUSE: u32 = 64;
/// The longest pause, in statements: guessing is tried again at least this often, so that it
/// comes back when the load does (one orchestrator process left, replies reaching the process
/// that wrote their states).
const LONGEST_PAUSE: u32 = 4096;

/// Whether deciding on cached states pays (see [`States::worth_guessing`]).
#[derive(Debug)]
struct Judge {
    /// Statements on cached states in this window, and how many of them found a stale state.
    tried: u32,
    missed: u32,
    /// Statements still to decide on stored states, and the length of the next pause.
    paused: u32,
    next_pause: u32,
}

impl Default for Judge {
    fn default() -> Judge {
        Judge {
            tried: 0,
            missed: 0,
            paused: 0,
            next_pause: FIRST_PAUSE,
        }
    }
}

impl Judge {
    /// Takes in one statement on cached states; true when it starts a pause.
    fn judge(&mut self, stale: bool) -> bool {
        self.tried += 1;
        self.missed += u32::from(stale);
        if self.tried < WINDOW {
            return false;
        }
        let too_stale = self.missed * 4 > self.tried;
        (self.tried, self.missed) = (0, 0);
        if too_stale {
            self.paused = self.next_pause;
            self.next_pause = (self.next_pause * 2).min(LONGEST_PAUSE);
        } else {
            self.next_pause = FIRST_PAUSE;
        }
        too_stale
    }

    /// True when the next statement may be decided on cached states.
    fn may_guess(&mut self) -> bool {
        if self.paused == 0 {
            return true;
        }
        self.paused -= 1;
        false
    }
}

#[derive(Debug, Default)]
pub(super) struct States {
    map: Mutex<HashMap<Uuid, Known>>,
    judge: Mutex<Judge>,
    /// Items decided and written on a cached state.
    pub hits: AtomicU64,
    /// Items whose cached state turned out stale (decided again under the lock).
    pub stale: AtomicU64,
    /// Statements on cached states that failed.
    pub failed: AtomicU64,
    /// Items decided on stored states because guessing was paused.
    pub skipped: AtomicU64,
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

    /// Counts how the guesses of one statement on cached states fared: `hits` written, `stale`
    /// found moved on; in the atomics and in the metric (both series, so that each exists
    /// from the first statement on).
    pub fn guessed(&self, hits: usize, stale: usize) {
        Self::bump(&self.hits, hits);
        Self::bump(&self.stale, stale);
        metrics::counter!(metric::STATE_CACHE, "result" => "hit").increment(hits as u64);
        metrics::counter!(metric::STATE_CACHE, "result" => "stale").increment(stale as u64);
        let paused = self
            .judge
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .judge(stale > 0);
        if paused {
            tracing::debug!(
                "replies often reach states another process moved on: deciding on stored states for a while"
            );
        }
    }

    /// Whether a batch of `items` replies should be decided on cached states: not while
    /// guessing is paused, because too many recent statements found a state stale (several
    /// orchestrator processes share the replies, and each wrote the states the others hold).
    /// A stale guess costs its whole batch a statement more; only a batch whose every guess
    /// holds saves the locking transaction.
    pub fn worth_guessing(&self, items: usize) -> bool {
        let may = self
            .judge
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .may_guess();
        if !may {
            Self::bump(&self.skipped, items);
            metrics::counter!(metric::STATE_CACHE, "result" => "skipped").increment(items as u64);
        }
        may
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Definition;
    use crate::machine::Status;
    use serde_json::json;

    fn instance() -> Instance {
        let def = Definition::saga::<serde_json::Value>("d", 1)
            .step("a", "p", |s| s.command(|_, _| json!({})))
            .build()
            .unwrap();
        let plan = (**def.plan()).clone();
        crate::machine::start(Uuid::now_v7(), plan, json!({}), chrono::Utc::now(), &def).instance
    }

    fn at(instance: &Instance, seq: u64, status: Status) -> Instance {
        let mut i = instance.clone();
        i.seq = seq;
        i.status = status;
        i
    }

    #[test]
    fn guessing_pauses_when_a_quarter_of_a_window_found_states_stale_and_each_pause_grows() {
        let mut judge = Judge::default();
        // A window with a quarter stale exactly: no pause.
        for i in 0..WINDOW {
            assert!(!judge.judge(i % 4 == 0));
        }
        assert!(judge.may_guess());
        // A window with more: a pause of the first length.
        let paused = (0..WINDOW).filter(|i| judge.judge(i % 2 == 0)).count();
        assert_eq!(paused, 1);
        let skipped = (0..10 * FIRST_PAUSE)
            .take_while(|_| !judge.may_guess())
            .count();
        assert_eq!(skipped as u32, FIRST_PAUSE);
        // Stale again: twice as long; then a good window brings the first length back.
        (0..WINDOW).for_each(|_| {
            judge.judge(true);
        });
        let skipped = (0..10 * FIRST_PAUSE)
            .take_while(|_| !judge.may_guess())
            .count();
        assert_eq!(skipped as u32, 2 * FIRST_PAUSE);
        (0..WINDOW).for_each(|_| {
            judge.judge(false);
        });
        (0..WINDOW).for_each(|_| {
            judge.judge(true);
        });
        let skipped = (0..10 * FIRST_PAUSE)
            .take_while(|_| !judge.may_guess())
            .count();
        assert_eq!(skipped as u32, FIRST_PAUSE);
    }

    #[test]
    fn pauses_grow_no_longer_than_the_longest() {
        let mut judge = Judge::default();
        for _ in 0..20 {
            (0..WINDOW).for_each(|_| {
                judge.judge(true);
            });
            while !judge.may_guess() {}
        }
        (0..WINDOW).for_each(|_| {
            judge.judge(true);
        });
        let skipped = (0..2 * LONGEST_PAUSE)
            .take_while(|_| !judge.may_guess())
            .count();
        assert_eq!(skipped as u32, LONGEST_PAUSE);
    }

    #[test]
    fn states_are_given_only_when_every_one_asked_for_is_cached() {
        let states = States::default();
        let (one, two) = (instance(), instance());
        let plan = Uuid::now_v7();
        states.committed(&one, plan);
        assert!(states.all(&[one.id, two.id]).is_none(), "two is not cached");
        states.committed(&two, plan);
        let known = states.all(&[two.id, one.id]).expect("both cached");
        let ids: Vec<Uuid> = known.iter().map(|k| k.instance.id).collect();
        assert_eq!(ids, [two.id, one.id]);
        assert!(known.iter().all(|k| k.plan_id == plan));
        states.forget(one.id);
        assert!(states.all(&[one.id]).is_none());
    }

    #[test]
    fn a_committed_state_replaces_only_an_older_one_and_a_finished_one_is_dropped() {
        let states = States::default();
        let one = instance();
        let plan = Uuid::now_v7();
        states.committed(&at(&one, 5, Status::Running), plan);
        // A batch that committed earlier reports after a later one.
        states.committed(&at(&one, 4, Status::Compensating), plan);
        let kept = &states.all(&[one.id]).unwrap()[0];
        assert_eq!(
            (kept.instance.seq, kept.instance.status),
            (5, Status::Running)
        );
        states.committed(&at(&one, 6, Status::Completed), plan);
        assert_eq!(states.len(), 0);
    }

    #[test]
    fn past_its_capacity_new_instances_are_not_kept_but_kept_ones_advance() {
        let states = States::default();
        let plan = Uuid::now_v7();
        let first = instance();
        states.committed(&first, plan);
        for _ in 1..CAPACITY {
            let mut other = first.clone();
            other.id = Uuid::now_v7();
            states.committed(&other, plan);
        }
        assert_eq!(states.len(), CAPACITY);
        let late = instance();
        states.committed(&late, plan);
        assert!(states.all(&[late.id]).is_none());
        assert_eq!(states.len(), CAPACITY);
        states.committed(&at(&first, first.seq + 1, Status::Running), plan);
        assert_eq!(
            states.all(&[first.id]).unwrap()[0].instance.seq,
            first.seq + 1
        );
    }
}
