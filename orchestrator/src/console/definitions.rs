//! `/ui/definitions`: every registered definition and version, with its steps.

use std::sync::Arc;

use axum::extract::{Extension, State};
use maud::{Markup, html};

use super::layout;
use crate::api::Caller;
use crate::definition::RetryPolicy;
use crate::engine::Engine;

fn retry(p: &RetryPolicy) -> Markup {
    html! {
        (p.max_attempts) " attempts; "
        (p.initial_backoff_ms) " ms ×" (p.multiplier) " up to " (p.max_backoff_ms) " ms"
        @if p.jitter > 0.0 { ", jitter " (p.jitter) }
    }
}

/// `GET /ui/definitions`.
pub async fn page(
    State(engine): State<Arc<Engine>>,
    Extension(caller): Extension<Caller>,
) -> Markup {
    let registry = engine.registry();
    let body = html! {
        @if registry.iter().next().is_none() {
            p.muted { "No definition is registered in this process." }
        }
        @for d in registry.iter() {
            @let plan = d.plan();
            @let latest = registry.latest(d.name()).is_some_and(|l| l.version() == d.version());
            section.definition id={ (plan.name) "-v" (plan.version) } {
                h2 {
                    (plan.name) " v" (plan.version) " " span.muted { (plan.mode.as_str()) }
                    @if latest { " " span.badge.latest { "latest: new transactions start it" } }
                }
                p { a href={ "/ui/transactions?definition=" (plan.name) } { "Its transactions" } }
                table.definition {
                    thead { tr {
                        th { "#" } th { "Step" } th { "Participant" } th { "After" }
                        th { "Reply timeout" } th { "In progress up to" }
                        th { "Retry (forward)" } th { "Retry (compensate, confirm, cancel)" }
                    } }
                    tbody {
                        @for (i, s) in plan.steps.iter().enumerate() {
                            @let deps = plan.deps(i);
                            tr {
                                td { (i + 1) }
                                td { strong { (s.name) } }
                                td { @match &s.signal { Some(signal) => { span.muted { "waits for signal " } (signal) }, None => (s.participant) } }
                                td {
                                    @if deps.is_empty() { span.muted { "start" } }
                                    @else { (deps.iter().map(|&d| plan.steps[d].name.as_str()).collect::<Vec<_>>().join(", ")) }
                                }
                                td { (s.timeout_ms) " ms" }
                                td { (layout::duration(chrono::Duration::milliseconds(s.in_progress_timeout_ms as i64))) }
                                td { (retry(&s.retry)) }
                                td { (retry(&s.finish_retry)) }
                            }
                        }
                    }
                }
            }
        }
    };
    layout::page("Definitions", Some(&caller), body)
}
