//! Names of the metrics the engine records (Prometheus names once exported), and the
//! counters it keeps.

use std::sync::atomic::AtomicU64;

/// Counters the engine keeps (exported as metrics).
#[derive(Debug, Default)]
pub struct Stats {
    /// Instances started.
    pub started: AtomicU64,
    /// Replies committed.
    pub replies: AtomicU64,
    /// Replies dead-lettered (malformed, wrong protocol, unknown transaction).
    pub dead_lettered: AtomicU64,
    /// Timers fired.
    pub timers: AtomicU64,
    /// Outbox rows republished by the relay.
    pub relayed: AtomicU64,
}

/// Counter, label `definition`: instances started.
pub const STARTED: &str = "sagas_instances_started_total";
/// Counter, labels `definition`, `status` (`completed`, `compensated`, `resolved`):
/// instances that reached a terminal status.
pub const FINISHED: &str = "sagas_instances_finished_total";
/// Counter, label `definition`: instances that became stuck (need an operator).
pub const STUCK: &str = "sagas_instances_stuck_total";
/// Counter, label `action`: operator actions committed.
pub const OPERATOR_ACTIONS: &str = "sagas_operator_actions_total";
/// Counter: participant replies committed.
pub const REPLIES: &str = "sagas_replies_total";
/// Counter: replies dead-lettered (malformed, unknown protocol or transaction).
pub const DEAD_LETTERED: &str = "sagas_replies_dead_lettered_total";
/// Histogram: replies committed per store transaction.
pub const REPLY_BATCH: &str = "sagas_reply_batch_size";
/// Counter: timers fired.
pub const TIMERS: &str = "sagas_timers_fired_total";
/// Counter: outbox rows republished by the relay.
pub const RELAYED: &str = "sagas_outbox_relayed_total";
/// Counter: publishes that failed (rows left for the relay).
pub const PUBLISH_FAILURES: &str = "sagas_publish_failures_total";

/// Registers the descriptions of the engine's metrics with the installed recorder.
pub fn describe() {
    use metrics::describe_counter;
    describe_counter!(STARTED, "Instances started, by definition.");
    describe_counter!(
        FINISHED,
        "Instances that reached a terminal status, by definition and status."
    );
    describe_counter!(STUCK, "Instances that became stuck and need an operator.");
    describe_counter!(OPERATOR_ACTIONS, "Operator actions committed, by action.");
    describe_counter!(REPLIES, "Participant replies committed.");
    describe_counter!(DEAD_LETTERED, "Replies dead-lettered.");
    metrics::describe_histogram!(
        REPLY_BATCH,
        metrics::Unit::Count,
        "Replies committed per store transaction."
    );
    describe_counter!(TIMERS, "Timers fired.");
    describe_counter!(RELAYED, "Outbox rows republished by the relay.");
    describe_counter!(
        PUBLISH_FAILURES,
        "Publishes that failed; the relay retries them."
    );
}
