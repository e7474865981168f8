//! Reconciliation: prove from the event log that every transaction is consistent, and say
//! exactly where it is not.
//!
//! [`run`] streams the instances of a window in keyset batches inside one read-only,
//! repeatable-read transaction (one snapshot, so a transition committed during the scan cannot
//! look like a mismatch), replays each log through [`crate::machine::replay`], and runs the
//! pure checks of [`check`] on the result. Optionally it compares what the log says each
//! participant did with that participant's barrier table ([`barrier`]). Memory stays flat:
//! at most one batch of instances and their events is held at a time, plus the findings.

use std::collections::BTreeMap;

use chrono::Duration;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::machine::{Status, Time};

pub mod barrier;
pub mod check;
mod scan;

pub use scan::run;

/// What kind of inconsistency a finding reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// The log is missing, has gaps, does not decode or does not begin with `started`.
    LogCorrupt,
    /// The stored projection differs from the replay of the log.
    ProjectionMismatch,
    /// A non-terminal instance is past its deadline (still in its forward phase), or, without
    /// a deadline, has not changed for longer than `--stale-after` (stuck ones excepted).
    Stale,
    /// A compensate/confirm/cancel was refused (answered `failed`): an operator must act.
    Stuck,
    /// A compensate/confirm/cancel exhausted its retry budget: an operator must act.
    BudgetExhausted,
    /// An attempt's reply deadline passed (by more than the grace) and no timeout was logged.
    ReplyOverdue,
    /// A retry's backoff ended (by more than the grace) and the next attempt was not sent.
    RetryOverdue,
    /// A command sat in the outbox, unpublished, for longer than `--outbox-threshold`.
    OutboxUnpublished,
    /// A reply in the log answers an operation attempt that was never dispatched.
    UnmatchedReply,
    /// A terminal instance has a step that may have run but was neither confirmed nor undone.
    UnresolvedStep,
    /// The participant's barrier disagrees with what the log says was done.
    BarrierMismatch,
}

impl FindingKind {
    /// Every kind, in report order.
    pub const ALL: [FindingKind; 11] = [
        FindingKind::LogCorrupt,
        FindingKind::ProjectionMismatch,
        FindingKind::Stale,
        FindingKind::Stuck,
        FindingKind::BudgetExhausted,
        FindingKind::ReplyOverdue,
        FindingKind::RetryOverdue,
        FindingKind::OutboxUnpublished,
        FindingKind::UnmatchedReply,
        FindingKind::UnresolvedStep,
        FindingKind::BarrierMismatch,
    ];

    /// The stable name used in every output format.
    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::LogCorrupt => "log_corrupt",
            FindingKind::ProjectionMismatch => "projection_mismatch",
            FindingKind::Stale => "stale",
            FindingKind::Stuck => "stuck",
            FindingKind::BudgetExhausted => "budget_exhausted",
            FindingKind::ReplyOverdue => "reply_overdue",
            FindingKind::RetryOverdue => "retry_overdue",
            FindingKind::OutboxUnpublished => "outbox_unpublished",
            FindingKind::UnmatchedReply => "unmatched_reply",
            FindingKind::UnresolvedStep => "unresolved_step",
            FindingKind::BarrierMismatch => "barrier_mismatch",
        }
    }
}

impl std::fmt::Display for FindingKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One inconsistency: what, where, and a one-line explanation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The kind.
    pub kind: FindingKind,
    /// The transaction, when the finding is about one.
    pub instance: Option<Uuid>,
    /// The definition name, when known.
    pub definition: Option<String>,
    /// The step name, when the finding is about one step.
    pub step: Option<String>,
    /// One line that says what is wrong.
    pub detail: String,
}

/// A participant database whose barrier table is compared with the log.
#[derive(Debug, Clone)]
pub struct ParticipantDb {
    /// The participant's name as the plans use it (its AMQP routing key).
    pub name: String,
    /// Its database (the one holding `sagas_barrier`).
    pub pool: PgPool,
}

/// What to reconcile and how strictly.
#[derive(Debug, Clone)]
pub struct Options {
    /// Instances created at or after this time (open instances created earlier are always
    /// included: a transaction stuck since last week must not fall out of a nightly report).
    pub since: Option<Time>,
    /// Instances created before this time.
    pub until: Option<Time>,
    /// Only instances of this definition (any version).
    pub definition: Option<String>,
    /// The time the report is made at (injected, so tests are deterministic).
    pub now: Time,
    /// Instances have no deadline of their own: a running or compensating instance that has
    /// not changed for this long is reported `stale`.
    pub stale_after: Duration,
    /// Outbox rows older than this are reported.
    pub outbox_threshold: Duration,
    /// How long after a reply deadline or a backoff the missing timer transition is reported.
    pub overdue_grace: Duration,
    /// Participants to cross-check.
    pub participants: Vec<ParticipantDb>,
    /// Instances per batch.
    pub batch_size: u32,
}

impl Options {
    /// Defaults at `now`: whole history, stale after 1 h, outbox and timers 60 s.
    pub fn new(now: Time) -> Options {
        Options {
            since: None,
            until: None,
            definition: None,
            now,
            stale_after: Duration::hours(1),
            outbox_threshold: Duration::seconds(60),
            overdue_grace: Duration::seconds(60),
            participants: Vec::new(),
            batch_size: 1_000,
        }
    }
}

/// Counts over everything scanned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// When the report was made.
    pub now: Option<Time>,
    /// The window's start, if any.
    pub since: Option<Time>,
    /// The window's end, if any.
    pub until: Option<Time>,
    /// The definition filter, if any.
    pub definition: Option<String>,
    /// Instances scanned.
    pub instances: u64,
    /// Events replayed.
    pub events: u64,
    /// Outbox rows older than the threshold.
    pub outbox_rows: u64,
    /// Participants whose barrier was compared.
    pub participants: Vec<String>,
    /// Instances per definition and status (the status as the log replays it when it can).
    pub by_definition: BTreeMap<String, BTreeMap<String, u64>>,
    /// Findings per kind (every kind, zeros included).
    pub findings: BTreeMap<String, u64>,
}

impl Summary {
    /// Counts one instance.
    pub fn count(&mut self, definition: &str, status: &str) {
        *self
            .by_definition
            .entry(definition.to_owned())
            .or_default()
            .entry(status.to_owned())
            .or_default() += 1;
    }

    /// Instances per status over all definitions, every status listed.
    pub fn by_status(&self) -> BTreeMap<String, u64> {
        let mut all: BTreeMap<String, u64> = Status::ALL
            .iter()
            .map(|s| (s.as_str().to_owned(), 0))
            .collect();
        for statuses in self.by_definition.values() {
            for (status, n) in statuses {
                *all.entry(status.clone()).or_default() += n;
            }
        }
        all
    }
}

/// The result of a reconciliation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Counts.
    pub summary: Summary,
    /// Every finding, in scan order (instances oldest first, then outbox, then participants).
    pub findings: Vec<Finding>,
}

impl Report {
    /// True when nothing was found.
    pub fn is_consistent(&self) -> bool {
        self.findings.is_empty()
    }

    fn finish(mut self) -> Report {
        let mut counts: BTreeMap<String, u64> = FindingKind::ALL
            .iter()
            .map(|k| (k.as_str().to_owned(), 0))
            .collect();
        for f in &self.findings {
            *counts.entry(f.kind.as_str().to_owned()).or_default() += 1;
        }
        self.summary.findings = counts;
        self
    }
}

/// Why a reconciliation could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The orchestrator database failed.
    #[error("orchestrator database: {0}")]
    Database(#[source] sqlx::Error),
    /// A participant database failed (or has no barrier table).
    #[error("participant {name} database: {source}")]
    Participant {
        /// The participant.
        name: String,
        /// The error.
        #[source]
        source: sqlx::Error,
    },
}

/// Progress of a scan, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Instances checked so far.
    pub done: u64,
    /// Instances to check.
    pub total: u64,
}
