//! `/ui/dead-letters`: what waits in the dead-letter queue, and an operator's requeue or drop
//! of one message (as `GET /v1/dead-letters` and `POST /v1/dead-letters/{id}/…`).

use std::sync::Arc;

use axum::Form;
use axum::extract::{Extension, Path, Query, State};
use axum::http::header::LOCATION;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::Deserialize;

use super::transaction::ActionForm;
use super::{Failure, layout, session};
use crate::api::dead_letters::{BodyEncoding, DeadLetterView, letters, settle_letter};
use crate::api::sagas::{actor, reason_text};
use crate::api::{ApiError, Caller};
use crate::engine::Engine;
use crate::transport::DeadLetterAction;

/// How many dead letters the page shows (the API's default page).
const SHOWN: Option<&str> = None;

/// The actions on a dead letter.
const ACTIONS: [DeadLetterAction; 2] = [DeadLetterAction::Requeue, DeadLetterAction::Drop];

/// Query of the page: the action just done, after a form's redirect.
#[derive(Debug, Default, Deserialize)]
pub struct Done {
    /// `requeue` or `drop`.
    pub done: Option<String>,
    /// The message it was done to.
    pub id: Option<String>,
}

/// What the page says above the list: an action's result.
enum Notice {
    Done(DeadLetterAction, String),
    Refused(DeadLetterAction, String, ApiError),
}

fn action_named(name: &str) -> Option<DeadLetterAction> {
    ACTIONS.into_iter().find(|a| a.as_str() == name)
}

/// `GET /ui/dead-letters`: the first dead letters; 501 when the transport cannot list them.
pub async fn page(
    State(engine): State<Arc<Engine>>,
    Extension(caller): Extension<Caller>,
    Query(done): Query<Done>,
) -> Response {
    let notice = done
        .done
        .as_deref()
        .and_then(action_named)
        .zip(done.id)
        .map(|(a, id)| Notice::Done(a, id));
    answer(&engine, &caller, notice).await
}

/// `POST /ui/dead-letters/{id}/{action}` with a `reason`: done, the browser is sent back to
/// the list (303); refused, the list says why with the API's status (400, 403, 404, 409, 501).
pub async fn act(
    State(engine): State<Arc<Engine>>,
    Extension(caller): Extension<Caller>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Result<Response, Failure> {
    let action = action_named(&action)
        .ok_or_else(|| ApiError::not_found(format!("no action {action:?} on a dead letter")))?;
    let outcome = if session::may_operate(&caller) {
        match (reason_text(form.reason), actor(&caller, &headers)) {
            (Ok(reason), Ok(actor)) => settle_letter(&engine, &id, &actor, &reason, action).await,
            (Err(e), _) | (_, Err(e)) => Err(e),
        }
    } else {
        Err(session::forbidden(&caller))
    };
    match outcome {
        Ok(_) => {
            let to = format!("/ui/dead-letters?done={}&id={id}", action.as_str());
            let to = HeaderValue::from_str(&to).expect("a settled id is one of A-Za-z0-9._:~-");
            Ok((StatusCode::SEE_OTHER, [(LOCATION, to)]).into_response())
        }
        Err(refused) => {
            Ok(answer(&engine, &caller, Some(Notice::Refused(action, id, refused))).await)
        }
    }
}

/// The page with the list as the transport gives it now, answered with the notice's status
/// (a refusal's), else the listing's.
async fn answer(engine: &Engine, caller: &Caller, notice: Option<Notice>) -> Response {
    let listed = letters(engine, SHOWN).await;
    let status = match (&notice, &listed) {
        (Some(Notice::Refused(_, _, e)), _) | (_, Err(e)) => e.status(),
        _ => StatusCode::OK,
    };
    super::with_status(status, render(caller, &listed, notice.as_ref()))
}

fn render(
    caller: &Caller,
    listed: &Result<Vec<DeadLetterView>, ApiError>,
    notice: Option<&Notice>,
) -> Markup {
    let allowed = session::may_operate(caller);
    let body = html! {
        @match notice {
            Some(Notice::Done(a, id)) => { p.alert.ok { "Done: " (a.as_str()) " of " code { (id) } "." } }
            Some(Notice::Refused(a, id, e)) => {
                p.alert.error { (a.as_str()) " of " code { (id) } " refused (" (e.status().as_u16()) "): " (e.message()) }
            }
            None => {}
        }
        p.hint {
            "Messages the orchestrator could not use (a malformed or stray reply, an unknown \
             protocol version), oldest first. Listing leaves them in the queue. Requeue \
             publishes one again to the queue it came from; drop removes it for good. Both \
             need a reason, recorded with who in the orchestrator's log."
        }
        @if !allowed {
            p.hint { "Your token has the " (caller.role.as_str()) " role: requeue and drop need an operate token." }
        }
        @match listed {
            Err(e) => { p.alert.error { "The dead letters cannot be shown (" (e.status().as_u16()) "): " (e.message()) } }
            Ok(items) if items.is_empty() => { p.muted { "The dead-letter queue is empty." } }
            Ok(items) => {
                @for d in items { (letter(d, allowed)) }
            }
        }
    };
    layout::page("Dead letters", Some(caller), body)
}

fn letter(d: &DeadLetterView, allowed: bool) -> Markup {
    let unknown = || html! { span.muted { "unknown" } };
    html! {
        section.letter id={ "letter-" (d.id) } {
            dl.facts {
                dt { "Id" } dd.id { (d.id) }
                dt { "Reason" } dd.failure { @match &d.reason { Some(r) => (r), None => (unknown()) } }
                dt { "From queue" } dd { @match &d.queue { Some(q) => code { (q) }, None => (unknown()) } }
                dt { "Content type" } dd { @match &d.content_type { Some(c) => (c), None => (unknown()) } }
                dt { "Redelivered" } dd { @if d.redelivered { "yes" } @else { "no" } }
                dt { "Body" } dd {
                    @if d.body_encoding == BodyEncoding::Base64 { span.muted { "not text; in base64:" } }
                    pre.json { (d.body) }
                }
            }
            div.forms {
                @for a in ACTIONS {
                    form.action method="post" action={ "/ui/dead-letters/" (d.id) "/" (a.as_str()) } {
                        fieldset disabled[!allowed] {
                            legend { (a.as_str()) }
                            label for={ "reason-" (a.as_str()) "-" (d.id) } { "Reason (recorded in the log)" }
                            textarea id={ "reason-" (a.as_str()) "-" (d.id) } name="reason" required maxlength="1000" rows="1" {}
                            button type="submit" { (a.as_str()) }
                        }
                    }
                }
            }
        }
    }
}
