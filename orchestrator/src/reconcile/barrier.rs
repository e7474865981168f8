//! The participant cross-check: what the log says a participant did, step by step, against the
//! rows of that participant's barrier table (`sagas_barrier`).
//!
//! Only terminal instances are compared (of a `resolved` one, only operations it never sent):
//! an open instance may have dispatched an operation
//! the participant has not run yet (or run one whose reply is still in flight), so a
//! difference there is not yet an inconsistency. Terminal instances never send again.

use std::collections::{HashMap, HashSet};

use sqlx::PgPool;
use uuid::Uuid;

use super::{Finding, FindingKind};
use crate::definition::Mode;
use crate::machine::{Instance, Status, StepStatus};
use sagas_participant::protocol::Operation;

/// One barrier row, as read from the participant's database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BarrierRow {
    /// Transaction id.
    pub transaction_id: Uuid,
    /// Step name.
    pub step: String,
    /// Operation (wire name).
    pub operation: String,
    /// `handler`, `null_compensation` or `guard`.
    pub origin: String,
    /// The stored reply's status (`succeeded`, `failed`), if any.
    pub reply: Option<String>,
}

impl BarrierRow {
    /// What the row says the participant did with its operation, in a few words.
    pub fn effect(&self) -> String {
        match (self.origin.as_str(), self.reply.as_deref()) {
            ("handler", Some("succeeded")) => "applied".to_owned(),
            ("handler", Some(status)) => format!("not applied (answered {status})"),
            ("handler", None) => "received, no answer stored".to_owned(),
            ("null_compensation", _) => "nothing to undo (its forward never ran)".to_owned(),
            ("guard", _) => "refused (its undo came first)".to_owned(),
            (origin, _) => format!("recorded with origin {origin}"),
        }
    }

    fn applied(&self) -> bool {
        self.origin == "handler" && self.reply.as_deref() == Some("succeeded")
    }

    /// Rows that say the participant acted on a command (guards are written by an undo).
    fn received(&self) -> bool {
        self.origin == "handler" || self.origin == "null_compensation"
    }
}

/// The barrier rows of the transactions `ids` in a participant's database.
pub async fn rows(pool: &PgPool, ids: &[Uuid]) -> Result<Vec<BarrierRow>, sqlx::Error> {
    let rows: Vec<(Uuid, String, String, String, Option<String>)> = sqlx::query_as(
        "SELECT transaction_id, step, operation, origin, reply->>'status' FROM sagas_barrier
         WHERE transaction_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(transaction_id, step, operation, origin, reply)| BarrierRow {
                transaction_id,
                step,
                operation,
                origin,
                reply,
            },
        )
        .collect())
}

/// Compares the steps of `instance` served by `participant` with its barrier rows.
///
/// `dispatched` holds the `(step, operation)` pairs the log dispatched; `rows` may hold rows of
/// other transactions (they are ignored).
pub fn cross_check(
    participant: &str,
    instance: &Instance,
    dispatched: &HashSet<(usize, Operation)>,
    rows: &[BarrierRow],
) -> Vec<Finding> {
    let mut findings = Vec::new();
    if !instance.status.is_terminal() {
        return findings;
    }
    let mode = instance.plan.mode;
    let (forward, undo) = match mode {
        Mode::Saga => (Operation::Action, Operation::Compensate),
        Mode::Tcc => (Operation::Try, Operation::Cancel),
    };
    let mut by_step: HashMap<&str, HashMap<&str, &BarrierRow>> = HashMap::new();
    for r in rows.iter().filter(|r| r.transaction_id == instance.id) {
        by_step
            .entry(r.step.as_str())
            .or_default()
            .insert(r.operation.as_str(), r);
    }
    for (i, plan) in instance.plan.steps.iter().enumerate() {
        if plan.participant != participant {
            continue;
        }
        let mut say = |detail: String| {
            findings.push(Finding {
                kind: FindingKind::BarrierMismatch,
                instance: Some(instance.id),
                definition: Some(instance.plan.name.clone()),
                step: Some(plan.name.clone()),
                detail,
            })
        };
        let empty = HashMap::new();
        let rows = by_step.get(plan.name.as_str()).unwrap_or(&empty);
        let row = |op: Operation| rows.get(op.as_str()).copied();
        let mut ops: Vec<&&BarrierRow> = rows.values().collect();
        ops.sort_by_key(|r| r.operation.as_str());
        for r in ops {
            if !r.received() {
                continue;
            }
            let logged =
                Operation::parse(&r.operation).is_some_and(|op| dispatched.contains(&(i, op)));
            if !logged && r.operation == "confirm" && instance.status == Status::Compensated {
                say(format!(
                    "{participant} confirmed a try of a transaction the orchestrator cancelled"
                ));
            } else if !logged {
                say(format!(
                    "{participant} recorded {} ({}, {}) that the orchestrator never dispatched",
                    r.operation,
                    r.origin,
                    r.reply.as_deref().unwrap_or("no reply")
                ));
            }
        }
        if instance.status == Status::Resolved {
            // An operator settled the steps by hand: only unsent operations are evidence.
            continue;
        }
        let applied = row(forward).is_some_and(BarrierRow::applied);
        let undone = row(undo).is_some_and(|r| r.origin == "handler");
        let step = instance.steps[i].status;
        match step {
            StepStatus::Succeeded | StepStatus::Confirmed if !applied => {
                let what = match row(forward) {
                    None => "has no record of it".to_owned(),
                    Some(r) => format!(
                        "recorded it as {} ({})",
                        r.reply.as_deref().unwrap_or("no reply"),
                        r.origin
                    ),
                };
                say(format!(
                    "the log says {forward} succeeded, {participant} {what}"
                ));
            }
            StepStatus::Failed | StepStatus::Pending if applied => {
                say(format!(
                    "the log says {forward} did not take effect ({}), {participant} applied it",
                    step.as_str()
                ));
            }
            StepStatus::Compensated | StepStatus::Cancelled if applied && !undone => {
                say(format!(
                    "the log says {undo} succeeded, {participant} applied {forward} and has no {undo} that undid it"
                ));
            }
            _ => {}
        }
        if step == StepStatus::Confirmed && row(Operation::Confirm).is_none_or(|r| !r.applied()) {
            say(format!(
                "the log says confirm succeeded, {participant} has no applied confirm"
            ));
        }
    }
    findings
}
