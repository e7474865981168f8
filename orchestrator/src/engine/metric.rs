//! What the engine counts: the names of its metrics (Prometheus names once exported), and
//! [`Stats`], through which it counts each event once for both the metric and its own
//! counters.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::machine::{Effect, Event, Status, Time, Transition};
use crate::store::Gauges;

/// Counter, label `definition`: instances started.
pub const STARTED: &str = "sagas_instances_started_total";
/// Counter, labels `definition`, `status` (`completed`, `compensated`, `resolved`):
/// instances that reached a terminal status.
pub const FINISHED: &str = "sagas_instances_finished_total";
/// Counter, label `definition`: instances that became stuck (need an operator).
pub const STUCK: &str = "sagas_instances_stuck_total";
/// Counter, labels `definition`, `signal`, `result` (`received`, `timed_out`): signals wait
/// steps received, and waits that timed out without theirs.
pub const SIGNALS: &str = "sagas_signals_total";
/// Counter, label `action`: operator actions committed.
pub const OPERATOR_ACTIONS: &str = "sagas_operator_actions_total";
/// Counter: participant replies committed.
pub const REPLIES: &str = "sagas_replies_total";
/// Counter: replies dead-lettered (malformed, unknown protocol or transaction).
pub const DEAD_LETTERED: &str = "sagas_replies_dead_lettered_total";
/// Counter, label `outcome` (`accepted`, `refused`): start commands received over AMQP
/// (docs/protocol.md, "Transactional starts") and settled: accepted (started now, or found
/// started by an earlier delivery), or refused and dead-lettered.
pub const START_COMMANDS: &str = "sagas_start_commands_total";
/// Histogram: replies committed per store transaction.
pub const REPLY_BATCH: &str = "sagas_reply_batch_size";
/// Counter: timers fired.
pub const TIMERS: &str = "sagas_timers_fired_total";
/// Counter: outbox rows republished by the relay.
pub const RELAYED: &str = "sagas_outbox_relayed_total";
/// Counter: publishes that failed (rows left for the relay).
pub const PUBLISH_FAILURES: &str = "sagas_publish_failures_total";
/// Counter: finished instances deleted by the retention loop.
pub const PRUNED: &str = "sagas_instances_pruned_total";
/// Counter: reads of an instance by a waiting request (`?wait`).
pub const WAIT_READS: &str = "sagas_wait_reads_total";
/// Counter: waiting requests answered with the instance a transition of this process handed
/// them, without a read.
pub const WAIT_HANDED: &str = "sagas_wait_handed_total";
/// Counter: ids of settled instances announced to the other processes.
pub const ANNOUNCED: &str = "sagas_wait_announced_total";
/// Counter: connections of the listener for instances other processes settled.
pub const LISTENER_CONNECTS: &str = "sagas_wait_listener_connects_total";
/// Counter, label `result` (`hit`, `stale`): replies decided on a state this process had
/// cached, and written with one statement (`hit`), or found moved on by another process or a
/// concurrent batch and decided again under the lock (`stale`). Counted by the PostgreSQL store.
pub const STATE_CACHE: &str = "sagas_state_cache_total";
/// Counter, label `kind` (`command`, `reply`): AMQP messages through the broker, command
/// messages published and confirmed, reply messages received; a batch counts once. Counted by
/// the AMQP transport.
pub const AMQP_MESSAGES: &str = "sagas_amqp_messages_total";

/// Counter, labels `definition`, `step`, `participant`, `operation`, `outcome` (`succeeded`,
/// `failed`, `retry`, `in_progress`, `timed_out`): step attempts that ended, by how. Failures,
/// retries asked for and timeouts of each step are its outcomes.
pub const STEP_ATTEMPTS: &str = "sagas_step_attempts_total";
/// Histogram, labels `definition`, `step`, `participant`, `operation`: seconds from an
/// attempt's dispatch to its end (reply or timeout).
pub const STEP_DURATION: &str = "sagas_step_attempt_duration_seconds";

/// Gauge, label `status` (each status that is not terminal: `running`, `compensating`,
/// `stuck`): open instances now.
pub const OPEN: &str = "sagas_instances";
/// Gauge: age in seconds of the oldest open instance (by its creation), 0 if none.
pub const OLDEST_OPEN: &str = "sagas_oldest_open_seconds";
/// Gauge: outbox rows, commands committed but not yet confirmed by the broker.
pub const OUTBOX_ROWS: &str = "sagas_outbox_rows";
/// Gauge: age in seconds of the oldest outbox row, 0 if none.
pub const OUTBOX_OLDEST: &str = "sagas_outbox_oldest_seconds";
/// Gauge: timers whose due time has passed.
pub const TIMERS_DUE: &str = "sagas_timers_due";
/// Gauge: how late in seconds the most overdue timer is, 0 if none.
pub const TIMER_LAG: &str = "sagas_timer_lag_seconds";
/// Gauge: messages in the dead-letter queue of the orchestrator's replies (not set when the
/// transport cannot tell).
pub const DEAD_LETTERS: &str = "sagas_dead_letters";
/// Gauge, label `participant`: 1 while the participant's circuit breaker is open, else 0 (set
/// only with breakers on).
pub const BREAKER_OPEN: &str = "sagas_participant_breaker_open";
/// Counter, label `participant`: attempts postponed because the participant's breaker was
/// open.
pub const POSTPONED: &str = "sagas_attempts_postponed_total";
/// Gauge, label `version`: 1, naming the orchestrator's version.
pub const BUILD_INFO: &str = "sagas_build_info";

/// Every metric name above, counters, histograms and gauges: what the engine exports (the
/// HTTP API adds its own, [`crate::api::observe::HTTP_REQUESTS`] and
/// [`crate::api::observe::HTTP_DURATION`]). Alert rules and dashboards may name these only.
pub const ALL: &[&str] = &[
    STARTED,
    STEP_ATTEMPTS,
    STEP_DURATION,
    FINISHED,
    STUCK,
    SIGNALS,
    OPERATOR_ACTIONS,
    REPLIES,
    DEAD_LETTERED,
    START_COMMANDS,
    REPLY_BATCH,
    TIMERS,
    RELAYED,
    PUBLISH_FAILURES,
    PRUNED,
    WAIT_READS,
    WAIT_HANDED,
    ANNOUNCED,
    LISTENER_CONNECTS,
    STATE_CACHE,
    AMQP_MESSAGES,
    POSTPONED,
    OPEN,
    OLDEST_OPEN,
    OUTBOX_ROWS,
    OUTBOX_OLDEST,
    TIMERS_DUE,
    TIMER_LAG,
    DEAD_LETTERS,
    BREAKER_OPEN,
    BUILD_INFO,
];

/// Registers the descriptions of the engine's metrics with the installed recorder.
pub fn describe() {
    use metrics::describe_counter;
    describe_counter!(STARTED, "Instances started, by definition.");
    describe_counter!(
        FINISHED,
        "Instances that reached a terminal status, by definition and status."
    );
    describe_counter!(STUCK, "Instances that became stuck and need an operator.");
    describe_counter!(
        SIGNALS,
        "Signals received by wait steps, and waits that timed out without theirs, by definition, signal and result."
    );
    describe_counter!(OPERATOR_ACTIONS, "Operator actions committed, by action.");
    describe_counter!(REPLIES, "Participant replies committed.");
    describe_counter!(DEAD_LETTERED, "Replies dead-lettered.");
    describe_counter!(
        START_COMMANDS,
        "Start commands received over AMQP, by outcome (accepted, refused)."
    );
    describe_counter!(
        STEP_ATTEMPTS,
        "Step attempts that ended, by definition, step, participant, operation and outcome."
    );
    metrics::describe_histogram!(
        STEP_DURATION,
        metrics::Unit::Seconds,
        "Seconds from a step attempt's dispatch to its reply or timeout."
    );
    metrics::describe_histogram!(
        REPLY_BATCH,
        metrics::Unit::Count,
        "Replies committed per store transaction."
    );
    describe_counter!(TIMERS, "Timers fired.");
    describe_counter!(
        POSTPONED,
        "Attempts postponed because the participant's breaker was open, by participant."
    );
    describe_counter!(RELAYED, "Outbox rows republished by the relay.");
    describe_counter!(
        PUBLISH_FAILURES,
        "Publishes that failed; the relay retries them."
    );
    describe_counter!(PRUNED, "Finished instances deleted by the retention loop.");
    describe_counter!(
        WAIT_READS,
        "Reads of an instance by waiting requests: one as a wait begins (unless it started the instance), one per wake-up that did not hand the instance over."
    );
    describe_counter!(
        WAIT_HANDED,
        "Waiting requests answered with the instance a transition of this process committed, without a read."
    );
    describe_counter!(
        ANNOUNCED,
        "Settled transactions announced to other orchestrator processes (none while no other listens)."
    );
    describe_counter!(
        LISTENER_CONNECTS,
        "Connections of the listener for transactions settled by other processes."
    );
    describe_counter!(
        STATE_CACHE,
        "Replies decided on a cached state (hit) or found it stale (stale)."
    );
    describe_counter!(
        AMQP_MESSAGES,
        "AMQP messages through the broker: commands published, replies received (a batch counts once)."
    );
    use metrics::{Unit, describe_gauge};
    describe_gauge!(OPEN, "Open (not terminal) instances now, by status.");
    describe_gauge!(
        OLDEST_OPEN,
        Unit::Seconds,
        "Age of the oldest open instance (0 if none)."
    );
    describe_gauge!(
        OUTBOX_ROWS,
        "Outbox rows: commands committed but not yet confirmed by the broker."
    );
    describe_gauge!(
        OUTBOX_OLDEST,
        Unit::Seconds,
        "Age of the oldest outbox row (0 if none)."
    );
    describe_gauge!(TIMERS_DUE, "Timers whose due time has passed.");
    describe_gauge!(
        TIMER_LAG,
        Unit::Seconds,
        "How late the most overdue timer is (0 if none)."
    );
    describe_gauge!(
        DEAD_LETTERS,
        "Messages in the dead-letter queue of the orchestrator's replies."
    );
    describe_gauge!(
        BREAKER_OPEN,
        "1 while the participant's circuit breaker is open, else 0."
    );
    describe_gauge!(BUILD_INFO, "1, labelled with the orchestrator's version.");
}

/// Sets the gauges of what the store holds ([`OPEN`] for every status that is not terminal,
/// the ages as seen at `now`). Every engine of the process sets the same gauges: the last one
/// to look wins, and engines on one database see the same.
pub(super) fn record_gauges(gauges: &Gauges, now: Time) {
    let age = |since: Option<Time>| {
        since.map_or(0.0, |t| {
            ((now - t).num_milliseconds() as f64 / 1000.0).max(0.0)
        })
    };
    for status in Status::ALL.into_iter().filter(|s| !s.is_terminal()) {
        metrics::gauge!(OPEN, "status" => status.as_str()).set(gauges.open(status) as f64);
    }
    metrics::gauge!(OLDEST_OPEN).set(age(gauges.oldest_open));
    metrics::gauge!(OUTBOX_ROWS).set(gauges.outbox_rows as f64);
    metrics::gauge!(OUTBOX_OLDEST).set(age(gauges.oldest_outbox));
    metrics::gauge!(TIMERS_DUE).set(gauges.timers_due as f64);
    metrics::gauge!(TIMER_LAG).set(age(gauges.oldest_due_timer));
}

/// Sets [`DEAD_LETTERS`].
pub(super) fn record_dead_letters(messages: u64) {
    metrics::gauge!(DEAD_LETTERS).set(messages as f64);
}

/// Sets [`BUILD_INFO`].
pub(super) fn record_build_info() {
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// What this engine counted. Each method counts one kind of event: it records the metric
/// (in the process's recorder, which every engine of the process shares) and, for the events
/// that have a field here, adds to that field, which counts this engine's events alone (tests
/// and benchmarks read them).
#[derive(Debug, Default)]
pub struct Stats {
    /// Instances started ([`STARTED`]).
    pub started: AtomicU64,
    /// Replies committed ([`REPLIES`]).
    pub replies: AtomicU64,
    /// Replies dead-lettered: malformed, wrong protocol, unknown transaction
    /// ([`DEAD_LETTERED`]).
    pub dead_lettered: AtomicU64,
    /// Timers fired ([`TIMERS`]).
    pub timers: AtomicU64,
    /// Outbox rows republished by the relay ([`RELAYED`]).
    pub relayed: AtomicU64,
    /// Finished instances deleted by the retention loop ([`PRUNED`]).
    pub pruned: AtomicU64,
    /// Reads of an instance by waiting requests ([`WAIT_READS`]).
    pub wait_reads: AtomicU64,
    /// Waits answered with a handed instance ([`WAIT_HANDED`]).
    pub wait_handed: AtomicU64,
    /// Settled instances announced to other processes ([`ANNOUNCED`]).
    pub announced: AtomicU64,
    /// Connections of the listener for instances other processes settled
    /// ([`LISTENER_CONNECTS`]).
    pub listener_connects: AtomicU64,
}

impl Stats {
    /// An instance of `definition` was started.
    pub(super) fn count_start(&self, definition: &str) {
        self.started.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(STARTED, "definition" => definition.to_owned()).increment(1);
    }

    /// A reply was committed.
    pub(super) fn count_reply(&self) {
        self.replies.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(REPLIES).increment(1);
    }

    /// A store transaction committed `replies` replies.
    pub(super) fn count_reply_batch(&self, replies: usize) {
        metrics::histogram!(REPLY_BATCH).record(replies as f64);
    }

    /// A reply was dead-lettered.
    pub(super) fn count_dead_letter(&self) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(DEAD_LETTERED).increment(1);
    }

    /// A timer fired.
    pub(super) fn count_timer(&self) {
        self.timers.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(TIMERS).increment(1);
    }

    /// The relay republished `rows` outbox rows.
    pub(super) fn count_relayed(&self, rows: u64) {
        self.relayed.fetch_add(rows, Ordering::Relaxed);
        metrics::counter!(RELAYED).increment(rows);
    }

    /// The retention loop deleted `instances` finished instances.
    pub(super) fn count_pruned(&self, instances: u64) {
        self.pruned.fetch_add(instances, Ordering::Relaxed);
        metrics::counter!(PRUNED).increment(instances);
    }

    /// A waiting request read its instance.
    pub(super) fn count_wait_read(&self) {
        self.wait_reads.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(WAIT_READS).increment(1);
    }

    /// A waiting request was answered with the instance handed to it.
    pub(super) fn count_wait_handed(&self) {
        self.wait_handed.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(WAIT_HANDED).increment(1);
    }

    /// Settled instances were announced to the other processes.
    pub(super) fn count_announced(&self, ids: usize) {
        self.announced.fetch_add(ids as u64, Ordering::Relaxed);
        metrics::counter!(ANNOUNCED).increment(ids as u64);
    }

    /// The listener for instances other processes settled (re)connected.
    pub(super) fn count_listener_connect(&self) {
        self.listener_connects.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(LISTENER_CONNECTS).increment(1);
    }

    /// A publish failed; its rows are left for the relay.
    pub(super) fn count_publish_failure(&self) {
        metrics::counter!(PUBLISH_FAILURES).increment(1);
    }

    /// Counts the attempts `t` ended, and how long each took up to `now` (when its dispatch
    /// time is known).
    pub(super) fn count_attempts(&self, t: &Transition, now: Time) {
        let plan = &t.instance.plan;
        for effect in &t.effects {
            let Effect::AttemptEnded {
                step,
                operation,
                sent_at,
                outcome,
                ..
            } = effect
            else {
                continue;
            };
            let Some(p) = plan.steps.get(*step) else {
                continue;
            };
            let labels = [
                ("definition", plan.name.clone()),
                ("step", p.name.clone()),
                ("participant", p.participant.clone()),
                ("operation", operation.as_str().to_owned()),
            ];
            if let Some(sent) = sent_at {
                let seconds = (now - *sent).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6;
                metrics::histogram!(STEP_DURATION, &labels).record(seconds);
            }
            let mut labels = labels.to_vec();
            labels.push(("outcome", (*outcome).to_owned()));
            metrics::counter!(STEP_ATTEMPTS, &labels).increment(1);
        }
    }

    /// The events of a committed transition of an instance of `definition`: instances
    /// finished or stuck, signals received or waited for in vain, operator actions.
    pub(super) fn count_events(&self, definition: &str, events: &[Event]) {
        for event in events {
            match event {
                Event::Finished { status } => {
                    metrics::counter!(FINISHED,
                        "definition" => definition.to_owned(), "status" => status.as_str())
                    .increment(1);
                }
                Event::Stuck { .. } => {
                    metrics::counter!(STUCK, "definition" => definition.to_owned()).increment(1);
                }
                Event::Signalled { signal, .. } => count_signal(definition, signal, "received"),
                Event::SignalTimedOut { signal, .. } => {
                    count_signal(definition, signal, "timed_out");
                }
                Event::OperatorAction { action, .. } => {
                    metrics::counter!(OPERATOR_ACTIONS, "action" => action.as_str()).increment(1);
                }
                _ => {}
            }
        }
    }
}

/// Counts [`SIGNALS`].
fn count_signal(definition: &str, signal: &str, result: &'static str) {
    metrics::counter!(SIGNALS, "definition" => definition.to_owned(),
        "signal" => signal.to_owned(), "result" => result)
    .increment(1);
}
