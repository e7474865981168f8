//! The checks of one instance: pure functions of its stored row, its log and the time.

use std::collections::HashSet;

use chrono::Duration;
use uuid::Uuid;

use super::{Finding, FindingKind, Options};
use crate::definition::Mode;
use crate::machine::{Event, Instance, Phase, Status, StepStatus, Time, Waiting, replay};
use sagas_participant::protocol::Operation;

/// An instance row as stored, with its projection decoded (or why it did not decode).
#[derive(Debug, Clone)]
pub struct StoredRow {
    /// Id.
    pub id: Uuid,
    /// The `definition` column.
    pub definition: String,
    /// The `status` column.
    pub status: String,
    /// The `seq` column.
    pub seq: i64,
    /// The `state` column, decoded.
    pub state: Result<Instance, String>,
    /// `created_at`.
    pub created_at: Time,
    /// `updated_at`.
    pub updated_at: Time,
}

/// One row of the log: its sequence number and the event (or why it did not decode).
pub type LogRow = (i64, Result<Event, String>);

/// The result of checking one instance.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The instance as the log replays it, or else as projected; `None` if neither decodes.
    pub truth: Option<Instance>,
    /// True when `truth` is the replay of a sound log.
    pub replayed: bool,
    /// `(step, operation)` pairs the log says were dispatched.
    pub dispatched: HashSet<(usize, Operation)>,
    /// Findings.
    pub findings: Vec<Finding>,
}

/// The thresholds the checks need.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Now.
    pub now: Time,
    /// See [`Options::stale_after`].
    pub stale_after: Duration,
    /// See [`Options::overdue_grace`].
    pub overdue_grace: Duration,
}

impl From<&Options> for Limits {
    fn from(o: &Options) -> Limits {
        Limits {
            now: o.now,
            stale_after: o.stale_after,
            overdue_grace: o.overdue_grace,
        }
    }
}

/// Checks one instance: its log, its projection, and what both say about its steps.
pub fn check_instance(row: &StoredRow, log: &[LogRow], limits: Limits) -> Checked {
    let mut findings = Vec::new();
    let definition = Some(row.definition.clone());
    let finding = |kind, step: Option<&str>, detail: String| Finding {
        kind,
        instance: Some(row.id),
        definition: definition.clone(),
        step: step.map(str::to_owned),
        detail,
    };

    // 1. The log: gapless from 1, every event decodes, begins with `started`.
    let mut events = Vec::with_capacity(log.len());
    let mut log_problem = None;
    if log.is_empty() {
        log_problem = Some("the instance has no events in the log".to_owned());
    }
    for (i, (seq, event)) in log.iter().enumerate() {
        let expected = i as i64 + 1;
        if *seq != expected {
            log_problem = Some(format!("the log has a gap: event {expected} is missing"));
            break;
        }
        match event {
            Ok(e) => events.push(e),
            Err(why) => {
                log_problem = Some(format!("event {seq} does not decode: {why}"));
                break;
            }
        }
    }
    let replay_result = if log_problem.is_none() {
        let r = replay(events.iter().copied());
        if r.is_none() {
            log_problem = Some("the log does not begin with a started event".to_owned());
        }
        r
    } else {
        None
    };
    if let Some(p) = &log_problem {
        findings.push(finding(FindingKind::LogCorrupt, None, p.clone()));
    }

    // 2. The projection against the replay.
    match (&row.state, &replay_result) {
        (Err(why), _) => findings.push(finding(
            FindingKind::ProjectionMismatch,
            None,
            format!("the stored projection does not decode: {why}"),
        )),
        (Ok(projected), Some(replayed)) => {
            if let Some(diff) = describe_difference(replayed, &marked(projected)) {
                findings.push(finding(FindingKind::ProjectionMismatch, None, diff));
            }
        }
        (Ok(_), None) => {}
    }
    let truth_ref = replay_result.as_ref().or(row.state.as_ref().ok());
    if let Some(t) = truth_ref {
        let mut columns = Vec::new();
        if row.status != t.status.as_str() {
            columns.push(format!(
                "status column says {}, {} says {}",
                row.status,
                source(replay_result.is_some()),
                t.status.as_str()
            ));
        }
        if replay_result.is_some() && row.seq != events.len() as i64 {
            columns.push(format!(
                "seq column says {}, the log has {} events",
                row.seq,
                events.len()
            ));
        }
        if row.definition != t.plan.name {
            columns.push(format!(
                "definition column says {}, {} says {}",
                row.definition,
                source(replay_result.is_some()),
                t.plan.name
            ));
        }
        if !columns.is_empty() {
            findings.push(finding(
                FindingKind::ProjectionMismatch,
                None,
                columns.join("; "),
            ));
        }
    }

    // 3. Replies that answer nothing that was sent, and what was dispatched.
    let mut dispatched = HashSet::new();
    let mut attempts: HashSet<(usize, Operation, u32)> = HashSet::new();
    let step_name = |i: usize| -> String {
        truth_ref
            .and_then(|t| t.plan.steps.get(i))
            .map(|s| s.name.clone())
            .unwrap_or_else(|| format!("#{i}"))
    };
    for e in &events {
        match e {
            Event::Dispatched {
                step,
                operation,
                attempt,
                ..
            } => {
                dispatched.insert((*step, *operation));
                attempts.insert((*step, *operation, *attempt));
            }
            Event::ReplyIgnored {
                step: None,
                step_name,
                operation,
                attempt,
                outcome,
                ..
            } => findings.push(finding(
                FindingKind::UnmatchedReply,
                Some(step_name),
                format!(
                    "a {outcome} reply to {operation} attempt {attempt} names a step the plan does not have"
                ),
            )),
            Event::ReplyIgnored {
                step: Some(i),
                operation,
                attempt,
                ..
            }
            | Event::Replied {
                step: i,
                operation,
                attempt,
                ..
            } if !attempts.contains(&(*i, *operation, *attempt)) => {
                let status = match e {
                    Event::ReplyIgnored { outcome, .. } => outcome.as_str(),
                    Event::Replied { outcome, .. } => outcome.status(),
                    _ => "",
                };
                findings.push(finding(
                    FindingKind::UnmatchedReply,
                    Some(&step_name(*i)),
                    format!(
                        "a {status} reply to {operation} attempt {attempt}, which was never dispatched"
                    ),
                ));
            }
            _ => {}
        }
    }

    let Some(truth) = truth_ref.cloned() else {
        return Checked {
            truth: None,
            replayed: false,
            dispatched,
            findings,
        };
    };

    // 4. Open instances: stale, stuck, overdue timers.
    let mode = truth.plan.mode;
    if !truth.status.is_terminal() {
        if let Some(deadline) = truth.deadline
            && truth.phase == Phase::Forward
            && deadline < limits.now - limits.overdue_grace
        {
            findings.push(finding(
                FindingKind::Stale,
                None,
                format!(
                    "still in its forward phase {} after its deadline {}",
                    human(limits.now - deadline),
                    deadline.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ),
            ));
        } else if truth.status != Status::Stuck
            && row.updated_at < limits.now - limits.stale_after
            && !waits_for_a_signal(&truth, limits.now - limits.overdue_grace)
        {
            findings.push(finding(
                FindingKind::Stale,
                None,
                format!(
                    "{} and unchanged for {} (it has no deadline; reported past --stale-after {})",
                    truth.status.as_str(),
                    human(limits.now - row.updated_at),
                    human(limits.stale_after)
                ),
            ));
        }
        for (i, s) in truth.steps.iter().enumerate() {
            let name = step_name(i);
            let op = s.status.outstanding(mode);
            let op_name = op.map_or("operation", Operation::as_str);
            if s.stuck {
                let plan = &truth.plan.steps[i];
                let used = s.attempt.saturating_sub(s.budget_from);
                let reason = s.last_error.as_deref().unwrap_or("no reason logged");
                let refused = reason.contains("answered failed");
                let kind = if !refused && used >= plan.finish_retry.max_attempts {
                    FindingKind::BudgetExhausted
                } else {
                    FindingKind::Stuck
                };
                findings.push(finding(
                    kind,
                    Some(&name),
                    format!("{op_name} needs an operator: {reason}"),
                ));
                continue;
            }
            match s.waiting {
                Waiting::Reply { deadline } if deadline < limits.now - limits.overdue_grace => {
                    findings.push(finding(
                        FindingKind::ReplyOverdue,
                        Some(&name),
                        format!(
                            "{op_name} attempt {} got no reply and no timeout was logged, {} after its deadline",
                            s.attempt,
                            human(limits.now - deadline)
                        ),
                    ));
                }
                Waiting::Signal { until } if until < limits.now - limits.overdue_grace => {
                    let signal = truth.plan.steps[i].signal.as_deref().unwrap_or_default();
                    findings.push(finding(
                        FindingKind::ReplyOverdue,
                        Some(&name),
                        format!(
                            "the wait for signal {signal} ended {} ago and no timeout was logged",
                            human(limits.now - until)
                        ),
                    ));
                }
                Waiting::Backoff { until } if until < limits.now - limits.overdue_grace => {
                    findings.push(finding(
                        FindingKind::RetryOverdue,
                        Some(&name),
                        format!(
                            "{op_name} attempt {} was due {} ago and was not sent",
                            s.attempt + 1,
                            human(limits.now - until)
                        ),
                    ));
                }
                _ => {}
            }
        }
    }

    // 5. Terminal instances: every step that may have run is confirmed or undone.
    if truth.phase == Phase::Done || truth.status.is_terminal() {
        for (i, s) in truth.steps.iter().enumerate() {
            if let Some(why) = unresolved(mode, truth.status, s.status) {
                findings.push(finding(
                    FindingKind::UnresolvedStep,
                    Some(&step_name(i)),
                    why,
                ));
            }
        }
    }

    Checked {
        truth: Some(truth),
        replayed: replay_result.is_some(),
        dispatched,
        findings,
    }
}

/// The projection of a resolved instance with its steps settled by hand marked: one stored
/// before steps carried the mark lacks them, and the replay has them.
fn marked(projected: &Instance) -> std::borrow::Cow<'_, Instance> {
    if projected.status != Status::Resolved {
        return std::borrow::Cow::Borrowed(projected);
    }
    let mut p = projected.clone();
    p.mark_resolved_by_hand();
    std::borrow::Cow::Owned(p)
}

/// True when a step waits for a signal whose wait has not ended by `by`: the instance has a
/// reason to be unchanged until then.
fn waits_for_a_signal(instance: &Instance, by: Time) -> bool {
    instance
        .steps
        .iter()
        .any(|s| matches!(s.waiting, Waiting::Signal { until } if until >= by))
}

fn source(replayed: bool) -> &'static str {
    if replayed {
        "the log"
    } else {
        "the projection"
    }
}

/// Why a step of a terminal instance is not settled, if it is not.
fn unresolved(mode: Mode, status: Status, step: StepStatus) -> Option<String> {
    use StepStatus as S;
    let settled = match (mode, status) {
        // An operator settled it by hand, with a reason in the log.
        (_, Status::Resolved) => true,
        (Mode::Saga, Status::Completed) => step == S::Succeeded,
        (Mode::Tcc, Status::Completed) => step == S::Confirmed,
        (Mode::Saga, _) => matches!(step, S::Pending | S::Failed | S::Compensated),
        (Mode::Tcc, _) => matches!(step, S::Pending | S::Failed | S::Cancelled),
    };
    if settled {
        return None;
    }
    let may_have_run = !matches!(step, S::Pending | S::Failed);
    Some(format!(
        "the instance is {} but the step is {}{}",
        status.as_str(),
        step.as_str(),
        if may_have_run {
            ": it may have run and was neither confirmed nor undone"
        } else {
            ""
        }
    ))
}

/// A duration as people read it: `3h12m`, `45s`, `2d4h`.
pub fn human(d: Duration) -> String {
    let s = d.num_seconds().max(0);
    let (days, hours, mins, secs) = (s / 86_400, s / 3_600 % 24, s / 60 % 60, s % 60);
    match (days, hours, mins) {
        (0, 0, 0) => format!("{secs}s"),
        (0, 0, _) if secs == 0 => format!("{mins}m"),
        (0, 0, _) => format!("{mins}m{secs}s"),
        (0, _, 0) => format!("{hours}h"),
        (0, _, _) => format!("{hours}h{mins}m"),
        (_, 0, _) => format!("{days}d"),
        _ => format!("{days}d{hours}h"),
    }
}

/// The differences between the replayed and the stored instance, in one line; `None` if equal.
pub fn describe_difference(replayed: &Instance, projected: &Instance) -> Option<String> {
    if replayed == projected {
        return None;
    }
    let mut diffs = Vec::new();
    let mut field = |name: &str, log: String, stored: String| {
        if log != stored {
            diffs.push(format!(
                "{name} is {log} in the log, {stored} in the projection"
            ));
        }
    };
    field("id", replayed.id.to_string(), projected.id.to_string());
    field(
        "status",
        replayed.status.as_str().to_owned(),
        projected.status.as_str().to_owned(),
    );
    field(
        "phase",
        format!("{:?}", replayed.phase).to_lowercase(),
        format!("{:?}", projected.phase).to_lowercase(),
    );
    field("seq", replayed.seq.to_string(), projected.seq.to_string());
    field(
        "failure",
        format!("{:?}", replayed.failure),
        format!("{:?}", projected.failure),
    );
    if replayed.plan != projected.plan {
        diffs.push("the plan differs".to_owned());
    }
    if replayed.input != projected.input {
        diffs.push("the input differs".to_owned());
    }
    if replayed.steps.len() != projected.steps.len() {
        diffs.push(format!(
            "{} steps in the log, {} in the projection",
            replayed.steps.len(),
            projected.steps.len()
        ));
    }
    for (i, (r, p)) in replayed.steps.iter().zip(&projected.steps).enumerate() {
        if r == p {
            continue;
        }
        let name = replayed
            .plan
            .steps
            .get(i)
            .map_or_else(|| format!("#{i}"), |s| s.name.clone());
        if r.status != p.status {
            diffs.push(format!(
                "step {name} is {} in the log, {} in the projection",
                r.status.as_str(),
                p.status.as_str()
            ));
        } else {
            let fields: Vec<&str> = [
                ("attempt", r.attempt != p.attempt),
                ("budget", r.budget_from != p.budget_from),
                ("waiting", r.waiting != p.waiting),
                ("payload", r.payload != p.payload),
                ("output", r.output != p.output),
                ("last error", r.last_error != p.last_error),
                ("stuck flag", r.stuck != p.stuck),
                ("in-progress flag", r.in_progress != p.in_progress),
                ("signal id", r.signal_id != p.signal_id),
                (
                    "resolved-by-hand flag",
                    r.resolved_by_hand != p.resolved_by_hand,
                ),
            ]
            .into_iter()
            .filter_map(|(field, differs)| differs.then_some(field))
            .collect();
            diffs.push(format!("step {name}: {} differ", fields.join(", ")));
        }
    }
    if diffs.is_empty() {
        diffs.push("the states differ".to_owned());
    }
    Some(diffs.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_waiting_for_its_signal_is_not_stale_before_its_timeout_but_overdue_after_it() {
        use crate::definition::Definition;
        use serde_json::{Value, json};
        let def = Definition::saga::<Value>("pay", 1)
            .wait("authorize", "3ds", |s| {
                s.timeout(std::time::Duration::from_secs(24 * 3600))
            })
            .build()
            .unwrap();
        let t0 = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let plan = (**def.plan()).clone();
        let t = crate::machine::start(Uuid::from_u128(1), plan, json!({}), t0, &def);
        let log: Vec<LogRow> = (t.events.iter().enumerate())
            .map(|(i, e)| (i as i64 + 1, Ok(e.clone())))
            .collect();
        let row = StoredRow {
            id: t.instance.id,
            definition: "pay".into(),
            status: "running".into(),
            seq: t.instance.seq as i64,
            state: Ok(t.instance.clone()),
            created_at: t0,
            updated_at: t0,
        };
        let at = |now: Time| Limits {
            now,
            stale_after: Duration::hours(1),
            overdue_grace: Duration::seconds(60),
        };
        let kinds = |now| -> Vec<FindingKind> {
            let checked = check_instance(&row, &log, at(now));
            checked.findings.iter().map(|f| f.kind).collect()
        };
        assert_eq!(kinds(t0 + Duration::hours(23)), vec![]);
        assert_eq!(
            kinds(t0 + Duration::hours(25)),
            vec![FindingKind::Stale, FindingKind::ReplyOverdue]
        );
    }

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(human(Duration::seconds(45)), "45s");
        assert_eq!(human(Duration::seconds(90)), "1m30s");
        assert_eq!(human(Duration::minutes(60)), "1h");
        assert_eq!(human(Duration::minutes(192)), "3h12m");
        assert_eq!(human(Duration::hours(52)), "2d4h");
        assert_eq!(human(Duration::hours(48)), "2d");
    }

    #[test]
    fn a_terminal_step_is_settled_only_when_confirmed_or_undone_or_never_run() {
        use StepStatus as S;
        assert!(unresolved(Mode::Saga, Status::Completed, S::Succeeded).is_none());
        assert!(unresolved(Mode::Saga, Status::Compensated, S::Failed).is_none());
        assert!(unresolved(Mode::Tcc, Status::Compensated, S::Cancelled).is_none());
        assert!(
            unresolved(Mode::Tcc, Status::Compensated, S::Succeeded)
                .unwrap()
                .contains("may have run")
        );
        assert!(unresolved(Mode::Tcc, Status::Completed, S::Succeeded).is_some());
        assert!(unresolved(Mode::Saga, Status::Compensated, S::Unknown).is_some());
    }
}
