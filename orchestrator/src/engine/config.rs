//! The engine's tuning: batch sizes, concurrency and the periods of its loops.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::breaker::BreakerPolicy;

/// Tuning of the engine's loops.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Reply batches (store transactions) handled at the same time. One by default: a batch
    /// then always decides on the states the previous one committed (docs/performance.md,
    /// round 6), and the next batch gathers the replies that came meanwhile; publishing and
    /// acknowledging a batch's effects overlap the next batch's commit either way.
    pub reply_concurrency: usize,
    /// At most this many replies are committed in one store transaction. A batch takes the
    /// replies that are waiting when a slot frees up, and waits for more only as
    /// [`EngineConfig::batch_linger`] says.
    pub reply_batch: usize,
    /// How long a batch of replies or of starts waits for more after a batch that held
    /// several ([`sagas_participant::linger::Linger`]), while it holds fewer than
    /// [`sagas_participant::linger::ENOUGH`]: a lone saga's batches never wait; under load,
    /// transactions and messages are shared by more sagas. Zero: batches take only what is
    /// waiting.
    pub batch_linger: Duration,
    /// Unacknowledged replies the broker may send ahead.
    pub prefetch: u16,
    /// Due timers handled at the same time.
    pub timer_concurrency: usize,
    /// How often due timers are looked for when none were due.
    pub timer_poll: Duration,
    /// Timers claimed at once.
    pub timer_batch: i64,
    /// How long a claimed timer is leased before another process may take it.
    pub timer_lease: Duration,
    /// How often the outbox relay looks for rows left unpublished.
    pub relay_poll: Duration,
    /// Finished instances (completed, compensated, resolved) are deleted, with their events,
    /// timers and outbox rows, this long after they finished; `None` keeps everything.
    pub retention: Option<Duration>,
    /// Instances deleted per transaction by the retention loop.
    pub retention_batch: u32,
    /// How often the retention loop looks for instances to delete when none were due.
    pub retention_poll: Duration,
    /// The pause between two full batches of the retention loop (a backlog is deleted batch by
    /// batch, never in one long transaction).
    pub retention_pause: Duration,
    /// A waiting request (`?wait`) reads its instance again this often even when nothing woke
    /// it: for settled transitions whose announcement was lost (a crash between commit and
    /// announcement, a listener reconnecting), or never sent ([`EngineConfig::wait_notify`]
    /// off).
    pub wait_recheck: Duration,
    /// Announce the instances this process settles to the other processes on the store, and
    /// hear theirs on a connection of its own (PostgreSQL NOTIFY and LISTEN), so that a wait is
    /// woken at once whichever process settles its instance. Off, waits hear only of this
    /// process's transitions and of the others' at their next re-read; a store that one
    /// process uses alone (SQLite, memory) has nothing to announce either way.
    pub wait_notify: bool,
    /// How often the gauges of open instances, the outbox, due timers and dead letters are
    /// read (one store query and one look at the broker per period, whatever the scrapes).
    pub gauge_interval: Duration,
    /// The participants' circuit breakers: when they open and how often they probe; `None`
    /// (the default) runs without them (docs/architecture.md, "Circuit breakers").
    pub breakers: Option<BreakerPolicy>,
    /// How often this process reports the outcomes it counted to the stored breakers and reads
    /// them back (one store transaction per period).
    pub breaker_sync: Duration,
    /// Commands per second this process publishes to a participant at most, by participant;
    /// the others are not limited. Commands over the limit wait in the outbox.
    pub rate_limits: BTreeMap<String, f64>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            reply_concurrency: 1,
            reply_batch: 64,
            batch_linger: sagas_participant::linger::DEFAULT_LINGER,
            prefetch: 256,
            timer_concurrency: 32,
            timer_poll: Duration::from_millis(100),
            timer_batch: 128,
            timer_lease: Duration::from_secs(10),
            relay_poll: Duration::from_secs(1),
            retention: None,
            retention_batch: 500,
            retention_poll: Duration::from_secs(60),
            retention_pause: Duration::from_millis(100),
            wait_recheck: Duration::from_secs(10),
            wait_notify: true,
            gauge_interval: Duration::from_secs(15),
            breakers: None,
            breaker_sync: Duration::from_secs(1),
            rate_limits: BTreeMap::new(),
        }
    }
}
