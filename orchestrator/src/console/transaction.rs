//! `/ui/transactions/{id}`: one transaction, and the operator actions on it.

use std::sync::Arc;

use axum::Form;
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::header::LOCATION;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::Deserialize;
use uuid::Uuid;

use super::timeline::{self, Entry};
use super::{Failure, layout, session};
use crate::api::sagas::{InFlight, actor, parse_id, reason_text, with_hand_marks};
use crate::api::{ApiError, Caller};
use crate::engine::Engine;
use crate::machine::OperatorAction;
use crate::store::{LoggedEvent, StoredInstance};

/// Query of the page: the action just done, after a form's redirect.
#[derive(Debug, Default, Deserialize)]
pub struct Done {
    /// `abort`, `retry` or `resolve`.
    pub done: Option<String>,
}

/// The form of an operator action.
#[derive(Debug, Deserialize)]
pub struct ActionForm {
    /// Why.
    #[serde(default)]
    pub reason: Option<String>,
}

/// What a page says above the transaction: an action's result.
enum Notice {
    Done(OperatorAction),
    Refused(OperatorAction, ApiError),
}

/// What the page shows of a transaction, read as `GET /v1/sagas/{id}` and `…/events` read it.
struct Shown {
    stored: StoredInstance,
    events: Vec<LoggedEvent>,
    in_flight: InFlight,
}

async fn load(engine: &Engine, id: Uuid) -> Result<Shown, Failure> {
    let mut stored = engine
        .get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("transaction {id} not found")))?;
    stored.instance = with_hand_marks(stored.instance);
    let in_flight = InFlight::of(&stored.instance, engine.in_flight(id).await?);
    let events = engine.events(id).await?;
    Ok(Shown {
        stored,
        events,
        in_flight,
    })
}

/// `GET /ui/transactions/{id}`.
pub async fn page(
    State(engine): State<Arc<Engine>>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    Query(done): Query<Done>,
) -> Result<Markup, Failure> {
    let id = parse_id(id)?;
    let shown = load(&engine, id).await?;
    let notice = done
        .done
        .as_deref()
        .and_then(action_named)
        .map(Notice::Done);
    Ok(render(&caller, &shown, notice))
}

fn action_named(name: &str) -> Option<OperatorAction> {
    OperatorAction::ALL.into_iter().find(|a| a.as_str() == name)
}

/// `POST /ui/transactions/{id}/{action}` with a `reason`: done, the browser is sent back to
/// the page (303); refused, the page says why with the API's status (400, 403, 404, 409).
pub async fn act(
    State(engine): State<Arc<Engine>>,
    Extension(caller): Extension<Caller>,
    Path((raw_id, action)): Path<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Result<Response, Failure> {
    let id = parse_id(Ok(Path(raw_id)))?;
    let action = action_named(&action)
        .ok_or_else(|| ApiError::not_found(format!("no operator action {action:?}")))?;
    if !session::may_operate(&caller) {
        return Err(Failure(session::forbidden(&caller)));
    }
    let outcome = match reason_text(form.reason) {
        Ok(reason) => {
            let actor = actor(&caller, &headers)?;
            let done = engine
                .operate(id, action.input(actor.clone(), reason.clone()))
                .await;
            if done.is_ok() {
                tracing::info!(%id, actor, reason, action = action.as_str(), "operator action");
            }
            done.map_err(ApiError::from)
        }
        Err(e) => Err(e),
    };
    match outcome {
        Ok(_) => {
            let to = format!("/ui/transactions/{id}?done={}", action.as_str());
            let to = HeaderValue::from_str(&to).expect("a UUID and a word make a valid header");
            Ok((StatusCode::SEE_OTHER, [(LOCATION, to)]).into_response())
        }
        Err(refused) => {
            let status = refused.status();
            let shown = load(&engine, id).await?;
            let page = render(&caller, &shown, Some(Notice::Refused(action, refused)));
            Ok(super::with_status(status, page))
        }
    }
}

fn render(caller: &Caller, shown: &Shown, notice: Option<Notice>) -> Markup {
    let Shown {
        stored,
        events,
        in_flight,
    } = shown;
    let inst = &stored.instance;
    let plan = &inst.plan;
    let timelines = timeline::steps(events, plan.steps.len());
    let actions = timeline::actions(events);
    let parallel = plan.steps.iter().any(|s| s.after.is_some());
    let body = html! {
        @match &notice {
            Some(Notice::Done(a)) => { p.alert.ok { "Done: " (a.as_str()) ". The log below records it." } }
            Some(Notice::Refused(a, e)) => {
                p.alert.error { (a.as_str()) " refused (" (e.status().as_u16()) "): " (e.message()) }
            }
            None => {}
        }
        dl.facts {
            dt { "Id" } dd.id { (inst.id) }
            dt { "Status" } dd { (layout::status(inst.status)) }
            dt { "Definition" } dd { a href={ "/ui/definitions#" (plan.name) "-v" (plan.version) } { (plan.name) " v" (plan.version) } " (" (plan.mode.as_str()) ")" }
            dt { "Created" } dd { (layout::time(stored.created_at)) }
            dt { "Last change" } dd { (layout::time(stored.updated_at)) " (" (layout::duration(stored.updated_at - stored.created_at)) " after creation)" }
            dt { "Deadline" } dd { @match inst.deadline { Some(d) => (layout::time(d)), None => span.muted { "none" } } }
            @if let Some(f) = &inst.failure { dt { "Failure" } dd.failure { (f) } }
        }
        h2 { "Operator actions" }
        @if !actions.is_empty() {
            table.actions {
                thead { tr { th { "When" } th { "Action" } th { "Who" } th { "Why" } } }
                tbody {
                    @for a in &actions {
                        tr { td { (layout::time(a.at)) } td { (a.action.as_str()) } td.actor { (a.actor) } td.reason { (a.reason) } }
                    }
                }
            }
        }
        div.operate {
            div { (operator(caller, stored)) }
            (flight(in_flight, inst.status.is_terminal(), inst.id, plan))
        }
        h2 { "Input" }
        (layout::json(&inst.input))
        @if parallel {
            h2 { "Step graph" }
            ol.graph {
                @for layer in timeline::layers(&(0..plan.steps.len()).map(|i| plan.deps(i)).collect::<Vec<_>>()) {
                    li { ol.layer {
                        @for i in layer {
                            li.node {
                                strong { (plan.steps[i].name) } " " (layout::badge(inst.steps[i].status.as_str()))
                                @let deps = plan.deps(i);
                                @if !deps.is_empty() {
                                    br; span.muted { "after " (deps.iter().map(|&d| plan.steps[d].name.as_str()).collect::<Vec<_>>().join(", ")) }
                                }
                            }
                        }
                    } }
                }
            }
        }
        h2 { "Steps" }
        @for ((p, s), entries) in plan.steps.iter().zip(&inst.steps).zip(&timelines) {
            section.step {
                h3 { (p.name) " " span.muted { (step_kind(p, s)) } " " (layout::badge(s.status.as_str()))
                     @if s.stuck { " " (layout::badge("stuck")) }
                     @if s.resolved_by_hand { " " span.badge.hand { "settled by hand" } } }
                @if let Some(e) = &s.last_error { p.failure { (e) } }
                @if let Some(o) = &s.output { details { summary { "Output" } (layout::json(o)) } }
                (attempts(entries, p.signal.is_some()))
            }
        }
        h2 { "Log" }
        table.log {
            thead { tr { th { "#" } th { "Logged" } th { "Kind" } th { "Event" } } }
            tbody {
                @for e in events {
                    tr {
                        td { (e.seq) }
                        td { (layout::time(e.at)) }
                        td { (e.event.kind()) }
                        td { details { summary { (summary(e)) } (layout::json(&serde_json::to_value(&e.event).unwrap_or_default())) } }
                    }
                }
            }
        }
    };
    layout::page(
        &format!("Transaction {}", layout::short(inst.id)),
        Some(caller),
        body,
    )
}

/// Who carries a step out: its participant, or for a wait step the signal it waits for (and
/// until when, while it waits).
fn step_kind(p: &crate::definition::StepPlan, s: &crate::machine::StepState) -> String {
    match (&p.signal, s.waiting) {
        (Some(signal), crate::machine::Waiting::Signal { until }) => {
            format!("waits for signal {signal} until {}", layout::time(until))
        }
        (Some(signal), _) => format!("waits for signal {signal}"),
        (None, _) => format!("on {}", p.participant),
    }
}

/// A log event in a few words.
fn summary(e: &LoggedEvent) -> String {
    use crate::machine::Event;
    match &e.event {
        Event::OperatorAction {
            action,
            actor,
            reason,
        } => {
            format!("{} by {actor}: {reason}", action.as_str())
        }
        Event::Finished { status } => status.as_str().to_owned(),
        Event::UndoStarted { reason }
        | Event::Stuck { reason, .. }
        | Event::GaveUp { reason, .. } => reason.clone(),
        other => match (other.step(), other.operation(), other.attempt()) {
            (Some(step), Some(op), Some(n)) => format!("step {step}, {} #{n}", op.as_str()),
            (Some(step), _, _) => format!("step {step}"),
            _ => String::new(),
        },
    }
}

/// A step's timeline; before anything happened to it, what a wait step (`wait`) or a
/// participant's step has not done yet.
fn attempts(entries: &[Entry], wait: bool) -> Markup {
    html! {
        @if entries.is_empty() {
            p.muted { @if wait { "Not waiting yet." } @else { "Not dispatched." } }
        } @else {
            table.timeline {
                thead { tr { th { "When" } th { "Attempt" } th { "What" } th { "Details" } } }
                tbody {
                    @for e in entries {
                        tr class=(e.tone) {
                            td { (layout::time(e.at)) }
                            td { @if let Some((op, n)) = e.attempt { (op.as_str()) " #" (n) } }
                            td { (e.what) }
                            td {
                                @if let Some(n) = &e.note { span.note { (n) } }
                                @if let Some(d) = &e.data { (layout::json(d)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The forms of the operator actions: for an operate token, each with its reason; for a read
/// token, disabled with a word why; none once the transaction is terminal.
fn operator(caller: &Caller, stored: &StoredInstance) -> Markup {
    let allowed = session::may_operate(caller);
    let id = stored.instance.id;
    let help = |a: OperatorAction| match a {
        OperatorAction::Abort => "Compensate (or cancel) a transaction still in its forward phase.",
        OperatorAction::Retry => {
            "Send stuck or backing-off operations again now, stuck ones with a fresh budget."
        }
        OperatorAction::Resolve => {
            "The effect was put right by hand: end a stuck transaction resolved."
        }
    };
    if stored.instance.status.is_terminal() {
        return html! { p.muted { "None to take: the transaction is " (stored.instance.status.as_str()) "." } };
    }
    html! {
        @if !allowed {
            p.hint { "Your token has the " (caller.role.as_str()) " role: operator actions need an operate token." }
        }
        div.forms {
            @for a in OperatorAction::ALL {
                form.action method="post" action={ "/ui/transactions/" (id) "/" (a.as_str()) } {
                    fieldset disabled[!allowed] {
                        legend { (a.as_str()) }
                        p.hint { (help(a)) }
                        label for={ "reason-" (a.as_str()) } { "Reason (recorded in the log)" }
                        textarea id={ "reason-" (a.as_str()) } name="reason" required maxlength="1000" rows="2" {}
                        button type="submit" name="action" value=(a.as_str()) { (a.as_str()) }
                    }
                }
            }
        }
    }
}

/// What is still in flight, and so whether a fix by hand is safe now (`in_flight` of
/// `GET /v1/sagas/{id}`).
fn flight(f: &InFlight, terminal: bool, id: uuid::Uuid, plan: &crate::definition::Plan) -> Markup {
    let signal_of = |step: Option<&str>| {
        let i = plan.step_index(step?)?;
        plan.steps[i].signal.as_deref()
    };
    let timers: Vec<_> = f.timers.iter().filter(|t| t.can_act).collect();
    let attempt = |step: Option<&str>, op: Option<&str>, n: Option<u32>| {
        format!(
            "step {}: {} #{}",
            step.unwrap_or("-"),
            op.unwrap_or("-"),
            n.map_or_else(|| "-".to_owned(), |n| n.to_string())
        )
    };
    html! {
        aside.flight.quiet[f.quiet] {
            h3 { "In flight" }
            @if f.quiet {
                p { strong { "Nothing in flight: safe to fix by hand." } }
                p.hint {
                    "No command waits in the outbox, no timer will send an attempt, no reply is                      awaited: nothing the orchestrator does will change the participant's data                      while you put it right."
                    @if !terminal { " Then resolve, saying what you did." }
                }
                // The orchestrator holds no participant's database credentials: the operator's
                // own tool reads the barrier tables (docs/operations.md, "Stuck transactions").
                p.hint {
                    "What each participant applied, step by step: "
                    code { "sagactl show " (id) " --participant NAME=DATABASE_URL" }
                    " reads its barrier table."
                }
            } @else {
                p { strong { "Not safe to fix by hand now:" } " what is in flight may still                     change the participant's data or the transaction." }
                ul {
                    @if f.outbox_rows > 0 {
                        li { (f.outbox_rows) " command(s) in the outbox, not yet published: a participant will receive them." }
                    }
                    @for a in &f.awaiting_reply {
                        li {
                            (attempt(Some(&a.step), Some(&a.operation), Some(a.attempt)))
                            " awaits its reply until " (layout::time(a.deadline))
                            @if a.in_progress { " (in progress)" }
                            ": the participant may still apply it."
                        }
                    }
                    @for t in &timers {
                        li {
                            @match t.kind.as_str() {
                                "deadline" if signal_of(t.step.as_deref()).is_some() => {
                                    "step " (t.step.as_deref().unwrap_or("-")) " waits for signal "
                                    (signal_of(t.step.as_deref()).unwrap_or_default()) " until "
                                    (layout::time(t.due_at)) "; without it, the step fails then and the transaction compensates."
                                }
                                "backoff" => { (attempt(t.step.as_deref(), t.operation.as_deref(), t.attempt)) " will be sent at " (layout::time(t.due_at)) "." }
                                "deadline" => { (attempt(t.step.as_deref(), t.operation.as_deref(), t.attempt)) " times out at " (layout::time(t.due_at)) ", and may be sent again." }
                                _ => { "The transaction's deadline at " (layout::time(t.due_at)) " will start compensating it." }
                            }
                        }
                    }
                }
                p.hint { "Wait for these to settle (or retry, or abort) before touching the participant's data." }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::sagas::{AttemptView, TimerView};

    #[test]
    fn the_in_flight_box_says_a_fix_by_hand_is_safe_only_when_nothing_is_in_flight() {
        let at = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let quiet = InFlight {
            quiet: true,
            outbox_rows: 0,
            timers: vec![],
            awaiting_reply: vec![],
        };
        let plan = crate::definition::Plan {
            name: "d".into(),
            version: 1,
            mode: crate::definition::Mode::Saga,
            steps: vec![],
        };
        let shown = flight(&quiet, false, uuid::Uuid::nil(), &plan).into_string();
        assert!(
            shown.contains("Nothing in flight: safe to fix by hand."),
            "{shown}"
        );
        assert!(
            shown.contains(
                "sagactl show 00000000-0000-0000-0000-000000000000 --participant NAME=DATABASE_URL"
            ),
            "{shown}"
        );

        let busy = InFlight {
            quiet: false,
            outbox_rows: 2,
            timers: vec![TimerView {
                step: Some("debit".into()),
                kind: "backoff".into(),
                operation: Some("compensate".into()),
                attempt: Some(3),
                due_at: at,
                can_act: true,
            }],
            awaiting_reply: vec![AttemptView {
                step: "credit".into(),
                operation: "action".into(),
                attempt: 1,
                deadline: at,
                in_progress: true,
            }],
        };
        let shown = flight(&busy, false, uuid::Uuid::nil(), &plan).into_string();
        for text in [
            "Not safe to fix by hand now",
            "2 command(s) in the outbox",
            "step debit: compensate #3 will be sent at 2027-01-15 08:00:00.000",
            "step credit: action #1 awaits its reply until 2027-01-15 08:00:00.000 (in progress)",
        ] {
            assert!(shown.contains(text), "no {text:?} in {shown}");
        }
    }
}
