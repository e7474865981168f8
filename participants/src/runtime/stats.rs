//! The live counters of a running participant.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) processed: AtomicU64,
    pub(super) rejected: AtomicU64,
    pub(super) publish_failures: AtomicU64,
    pub(super) unroutable_replies: AtomicU64,
    pub(super) timed_out: AtomicU64,
    pub(super) reconnects: AtomicU64,
    pub(super) batches: AtomicU64,
    pub(super) command_batches: AtomicU64,
    pub(super) batch_fallbacks: AtomicU64,
    pub(super) batch_reruns: AtomicU64,
    pub(super) database_waits: AtomicU64,
}

/// Live counters of a running participant; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Stats(pub(super) Arc<Counters>);

impl Stats {
    /// Commands answered and acked (each element of a command batch counts).
    pub fn processed(&self) -> u64 {
        self.0.processed.load(Ordering::Relaxed)
    }

    /// Messages dead-lettered (malformed, wrong version, no `reply_to`, not a batch), each
    /// malformed element of a command batch counting as one.
    pub fn rejected(&self) -> u64 {
        self.0.rejected.load(Ordering::Relaxed)
    }

    /// Replies that could not be published (their commands were requeued).
    pub fn publish_failures(&self) -> u64 {
        self.0.publish_failures.load(Ordering::Relaxed)
    }

    /// Replies the broker could not route to their `reply_to` queue (dropped; the orchestrator
    /// times out and resends, and the barrier answers again).
    pub fn unroutable_replies(&self) -> u64 {
        self.0.unroutable_replies.load(Ordering::Relaxed)
    }

    /// Commands answered `retry` because they exceeded [`Participant::handler_timeout`](super::Participant::handler_timeout).
    pub fn timed_out(&self) -> u64 {
        self.0.timed_out.load(Ordering::Relaxed)
    }

    /// Transactions that committed several commands at once (see [`Participant::batch_size`](super::Participant::batch_size)).
    pub fn batches(&self) -> u64 {
        self.0.batches.load(Ordering::Relaxed)
    }

    /// Command batches received: messages of several commands (docs/protocol.md, "Batches"),
    /// each counting once however many commands it carries, malformed ones included.
    pub fn command_batches(&self) -> u64 {
        self.0.command_batches.load(Ordering::Relaxed)
    }

    /// Batches rolled back whose commands then ran one by one (a lost connection, a deadlock,
    /// a failed commit, a handler that panicked or exceeded its time limit); a lone command
    /// run without its savepoint counts as a batch of one, but for a handler over its time
    /// limit, which is answered at once.
    pub fn batch_fallbacks(&self) -> u64 {
        self.0.batch_fallbacks.load(Ordering::Relaxed)
    }

    /// Batches that ran without savepoints, met a handler that did not succeed, and ran again
    /// with them (see [`barrier::Batch::begin_unguarded`](crate::barrier::Batch::begin_unguarded));
    /// lone commands, which also go without their savepoint while few commands fail, count as
    /// batches of one.
    pub fn batch_reruns(&self) -> u64 {
        self.0.batch_reruns.load(Ordering::Relaxed)
    }

    /// Times a command found the database unreachable (or lost its connection) and waited to
    /// run again, unanswered (see [`Participant::run_forever`](super::Participant::run_forever)).
    pub fn database_waits(&self) -> u64 {
        self.0.database_waits.load(Ordering::Relaxed)
    }

    /// Sessions [`Participant::run_forever`](super::Participant::run_forever) started after the first (reconnections).
    pub fn reconnects(&self) -> u64 {
        self.0.reconnects.load(Ordering::Relaxed)
    }

    pub(super) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
