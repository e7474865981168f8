//! `/ui/transactions`: the list, filtered and paged as `GET /v1/sagas` does it.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, Query, State};
use axum::http::StatusCode;
use axum::http::header::LOCATION;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::{Deserialize, Serialize};

use super::{Failure, layout};
use crate::api::sagas::{self, ListQuery, SagaPage};
use crate::api::{ApiError, Caller};
use crate::engine::Engine;
use crate::machine::Status;

/// The filter form, as the browser sends it (empty fields are absent filters).
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
pub struct Filters {
    /// A status.
    #[serde(default)]
    pub status: Option<String>,
    /// A definition name.
    #[serde(default)]
    pub definition: Option<String>,
    /// Created at or after (RFC 3339, or a browser's `datetime-local`, taken as UTC).
    #[serde(default)]
    pub created_after: Option<String>,
    /// Created before (likewise).
    #[serde(default)]
    pub created_before: Option<String>,
    /// A transaction id: its page.
    #[serde(default)]
    pub id: Option<String>,
    /// An idempotency key.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// The next page's cursor.
    #[serde(default)]
    pub cursor: Option<String>,
}

/// A form value, `None` when left empty.
fn given(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// A time as the form gives it, as RFC 3339: a browser's `datetime-local`
/// (`2026-11-24T10:30`, with or without seconds) is taken as UTC; anything else is passed on
/// for the list query to judge.
fn rfc3339(v: String) -> String {
    for format in ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(&v, format) {
            return t.and_utc().to_rfc3339();
        }
    }
    v
}

impl Filters {
    /// The same filters without empty fields.
    fn cleaned(&self) -> Filters {
        Filters {
            status: given(&self.status),
            definition: given(&self.definition),
            created_after: given(&self.created_after),
            created_before: given(&self.created_before),
            id: given(&self.id),
            idempotency_key: given(&self.idempotency_key),
            cursor: given(&self.cursor),
        }
    }

    /// The list query of `GET /v1/sagas` these filters stand for.
    fn query(&self) -> ListQuery {
        ListQuery {
            status: self.status.clone(),
            definition: self.definition.clone(),
            limit: None,
            cursor: self.cursor.clone(),
            created_after: self.created_after.clone().map(rfc3339),
            created_before: self.created_before.clone().map(rfc3339),
            idempotency_key: self.idempotency_key.clone(),
        }
    }

    /// The query string of these filters with another cursor.
    fn with_cursor(&self, cursor: &str) -> String {
        let next = Filters {
            cursor: Some(cursor.to_owned()),
            ..self.clone()
        };
        query_string(&next)
    }
}

/// A form's fields as a query string (absent ones left out).
fn query_string(filters: &Filters) -> String {
    let pairs = [
        ("status", &filters.status),
        ("definition", &filters.definition),
        ("created_after", &filters.created_after),
        ("created_before", &filters.created_before),
        ("idempotency_key", &filters.idempotency_key),
        ("cursor", &filters.cursor),
    ];
    let mut out = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs {
        if let Some(v) = value {
            out.append_pair(name, v);
        }
    }
    out.finish()
}

/// `GET /ui/transactions`: with an id, that transaction's page; otherwise a page of the list.
pub async fn page(
    State(engine): State<Arc<Engine>>,
    Extension(caller): Extension<Caller>,
    filters: Result<Query<Filters>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Failure> {
    let Query(filters) = filters.map_err(ApiError::from)?;
    let filters = filters.cleaned();
    if let Some(id) = &filters.id {
        let id: uuid::Uuid = id.parse().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_id",
                format!("{id:?} is not a transaction id (a UUID)"),
            )
        })?;
        let to = format!("/ui/transactions/{id}");
        return Ok((
            StatusCode::SEE_OTHER,
            [(
                LOCATION,
                to.parse::<axum::http::HeaderValue>().expect("a path"),
            )],
        )
            .into_response());
    }
    let listed = sagas::list(State(engine.clone()), Ok(Query(filters.query()))).await;
    let (status, found) = match listed {
        Ok(Json(page)) => (StatusCode::OK, Ok(page)),
        Err(e) => (e.status(), Err(e)),
    };
    let body = render(&engine, &filters, found.as_ref());
    Ok(super::with_status(
        status,
        layout::page("Transactions", Some(&caller), body),
    ))
}

fn render(engine: &Engine, filters: &Filters, found: Result<&SagaPage, &ApiError>) -> Markup {
    let mut names: Vec<String> = engine
        .registry()
        .iter()
        .map(|d| d.name().to_owned())
        .collect();
    names.dedup();
    let selected = |v: &Option<String>, option: &str| v.as_deref() == Some(option);
    html! {
        form.filters method="get" action="/ui/transactions" {
            label { "Status "
                select name="status" {
                    option value="" { "any" }
                    @for s in Status::ALL {
                        option value=(s.as_str()) selected[selected(&filters.status, s.as_str())] { (s.as_str()) }
                    }
                }
            }
            label { "Definition "
                select name="definition" {
                    option value="" { "any" }
                    @for n in &names {
                        option value=(n) selected[selected(&filters.definition, n)] { (n) }
                    }
                }
            }
            label { "Created from (UTC) " input type="datetime-local" name="created_after" value=[filters.created_after.as_deref()]; }
            label { "until " input type="datetime-local" name="created_before" value=[filters.created_before.as_deref()]; }
            label { "Idempotency key " input type="text" name="idempotency_key" value=[filters.idempotency_key.as_deref()]; }
            label { "Id " input type="text" name="id" placeholder="a transaction id" size="36"; }
            button type="submit" { "Filter" }
            a href="/ui/transactions" { "Clear" }
        }
        @match found {
            Err(e) => { p.alert.error { (e.message()) } }
            Ok(page) if page.items.is_empty() => { p.muted { "No transaction matches." } }
            Ok(page) => {
                table.list {
                    thead { tr { th { "Transaction" } th { "Definition" } th { "Status" } th { "Steps" } th { "Created" } th { "Last change" } } }
                    tbody {
                        @for t in &page.items {
                            tr {
                                td { (layout::transaction_link(t.id)) }
                                td { (t.definition) " v" (t.version) }
                                td { (layout::status(t.status)) }
                                td.steps {
                                    @for s in &t.steps { (layout::badge(&s.status)) " " }
                                }
                                td { (layout::time(t.created_at)) }
                                td { (layout::time(t.updated_at)) }
                            }
                        }
                    }
                }
                @if let Some(cursor) = &page.next_cursor {
                    p { a.next href={ "/ui/transactions?" (filters.with_cursor(cursor)) } { "Older →" } }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_fields_are_no_filter_and_browser_times_are_taken_as_utc() {
        let f = Filters {
            status: Some("".into()),
            definition: Some(" transfer ".into()),
            created_after: Some("2026-11-24T10:30".into()),
            created_before: Some("2026-11-24T11:00:00Z".into()),
            ..Filters::default()
        }
        .cleaned();
        assert_eq!(f.status, None);
        let q = f.query();
        assert_eq!(q.definition.as_deref(), Some("transfer"));
        assert_eq!(
            q.created_after.as_deref(),
            Some("2026-11-24T10:30:00+00:00")
        );
        assert_eq!(q.created_before.as_deref(), Some("2026-11-24T11:00:00Z"));
        assert_eq!(
            f.with_cursor("ab"),
            "definition=transfer&created_after=2026-11-24T10%3A30&created_before=2026-11-24T11%3A00%3A00Z&cursor=ab"
        );
    }
}
