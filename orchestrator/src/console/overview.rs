//! `/ui`: what the store holds now, and the last hour minute by minute.

use std::sync::Arc;

use axum::extract::{Extension, State};
use maud::{Markup, html};

use super::{Failure, layout};
use crate::api::Caller;
use crate::api::stuck::{StuckGroup, group};
use crate::engine::Engine;
use crate::machine::{Status, Time};
use crate::store::{ListFilter, Minute, StoredInstance};

/// Minutes shown.
const MINUTES: usize = 60;

/// How many stuck transactions the overview lists.
const STUCK_SHOWN: u32 = 10;

/// One series of the last hour: a count per minute, oldest first (the last is the current
/// minute).
type Series = [u64; MINUTES];

/// The four series of the last hour: started, finished, compensated, stuck.
fn series(minutes: &[Minute], now: Time) -> [Series; 4] {
    let current = now.timestamp().div_euclid(60);
    let mut out = [[0; MINUTES]; 4];
    for m in minutes {
        let ago = current - m.at.timestamp().div_euclid(60);
        let Ok(ago) = usize::try_from(ago) else {
            continue;
        };
        if ago >= MINUTES {
            continue;
        }
        let i = MINUTES - 1 - ago;
        for (s, n) in out
            .iter_mut()
            .zip([m.started, m.finished, m.compensated, m.stuck])
        {
            s[i] += n;
        }
    }
    out
}

/// A bar per minute as inline SVG, scaled to the largest; each bar tells its count on hover.
fn bars(name: &str, values: &Series) -> Markup {
    let most = values.iter().copied().max().unwrap_or(0);
    let max = most.max(1);
    let total: u64 = values.iter().sum();
    const W: u64 = 10;
    const H: u64 = 60;
    html! {
        figure.chart {
            figcaption { strong { (name) } " " span.muted { (total) " in the last hour, at most " (most) " a minute" } }
            svg class={ "bars " (name) } viewBox={ "0 0 " (W * MINUTES as u64) " " (H) } preserveAspectRatio="none" role="img" aria-label={ (name) " per minute" } {
                @for (i, v) in values.iter().enumerate() {
                    @let h = if *v == 0 { 0 } else { (v * H).div_ceil(max) };
                    rect x=(i as u64 * W + 1) y=(H - h) width=(W - 2) height=(h) {
                        title { (MINUTES - 1 - i) " min ago: " (v) }
                    }
                }
            }
            div.axis { span { "−60 min" } span { "now" } }
        }
    }
}

/// The stuck transactions grouped by cause, as `GET /v1/stuck` groups them.
fn causes(groups: &[StuckGroup], now: Time) -> Markup {
    html! {
        @if !groups.is_empty() {
            table.causes {
                thead { tr {
                    th { "Definition" } th { "Step" } th { "Participant" } th { "Reason" }
                    th { "Count" } th { "Last changes" } th { "Transactions" }
                } }
                tbody {
                    @for g in groups {
                        tr {
                            td { a href={ "/ui/transactions?status=stuck&definition=" (g.definition) } { (g.definition) } }
                            td { (g.step) }
                            td { (g.participant) }
                            td.failure { (g.reason) }
                            td.count { (g.count) }
                            td {
                                (layout::duration(now - g.newest_updated_at)) " to "
                                (layout::duration(now - g.oldest_updated_at)) " ago"
                            }
                            td.ids {
                                @for id in &g.ids { (layout::short_transaction_link(*id)) " " }
                                @if (g.ids.len() as u64) < g.count { span.muted { "and " (g.count - g.ids.len() as u64) " more" } }
                            }
                        }
                    }
                }
            }
            p.hint { "One line per definition, step, participant and reason (counts of attempts                       in reasons read as N): one broken participant is one line." }
        }
    }
}

fn instances(rows: &[StoredInstance], now: Time) -> Markup {
    html! {
        @if rows.is_empty() {
            p.muted { "None." }
        } @else {
            table {
                thead { tr { th { "Transaction" } th { "Definition" } th { "Status" } th { "Created" } th { "Age" } } }
                tbody {
                    @for s in rows {
                        tr {
                            td { (layout::transaction_link(s.instance.id)) }
                            td { (s.instance.plan.name) " v" (s.instance.plan.version) }
                            td { (layout::status(s.instance.status)) }
                            td { (layout::time(s.created_at)) }
                            td { (layout::duration(now - s.created_at)) }
                        }
                    }
                }
            }
        }
    }
}

/// `GET /ui`.
pub async fn page(
    State(engine): State<Arc<Engine>>,
    Extension(caller): Extension<Caller>,
) -> Result<Markup, Failure> {
    let now = engine.now();
    let store = engine.store();
    let gauges = store.gauges(now).await?;
    let activity = store
        .activity(now - chrono::Duration::minutes(MINUTES as i64))
        .await?;
    let stuck = engine
        .list(&ListFilter {
            status: Some(Status::Stuck),
            definition: None,
            after: None,
            created_after: None,
            created_before: None,
            idempotency_key: None,
            limit: STUCK_SHOWN,
        })
        .await?;
    let groups = group(engine.stuck_steps().await?);
    let [started, finished, compensated, stuck_series] = series(&activity.minutes, now);
    let open = [Status::Running, Status::Compensating, Status::Stuck];
    let body = html! {
        section.cards {
            @for s in open {
                a.card href={ "/ui/transactions?status=" (s.as_str()) } {
                    span.count { (gauges.open(s)) }
                    (layout::status(s))
                }
            }
            div.card {
                span.count { (gauges.outbox_rows) }
                span { "outbox rows" }
            }
            div.card {
                span.count { (gauges.timers_due) }
                span { "timers due" }
            }
            @if let Some(oldest) = gauges.oldest_open {
                div.card {
                    span.count { (layout::duration(now - oldest)) }
                    span { "oldest open" }
                }
            }
        }
        h2 { "The last hour" }
        section.charts {
            (bars("started", &started))
            (bars("finished", &finished))
            (bars("compensated", &compensated))
            (bars("stuck", &stuck_series))
        }
        p.hint { "Finished: completed or resolved. Each instance counts in the minute it was \
                  created (started) or last changed (the others, by the status it has now)." }
        h2 { "Latency" }
        @match activity.latency {
            Some(l) => {
                table.latency {
                    thead { tr { th { "Finished in the last hour" } th { "p50" } th { "p90" } th { "p99" } } }
                    tbody { tr {
                        td { (l.count) }
                        td { (layout::duration(l.p50)) }
                        td { (layout::duration(l.p90)) }
                        td { (layout::duration(l.p99)) }
                    } }
                }
                p.hint { "From creation to the last change, of the instances that finished \
                          (completed, compensated or resolved) in the last hour." }
            }
            None => { p.muted { "No transaction finished in the last hour." } }
        }
        h2 { "Stuck" }
        (causes(&groups, now))
        (instances(&stuck, now))
        @if stuck.len() as u32 == STUCK_SHOWN {
            p { a href="/ui/transactions?status=stuck" { "Every stuck transaction" } }
        }
        h2 { "Oldest open" }
        (instances(&activity.oldest_open, now))
    };
    Ok(layout::page("Overview", Some(&caller), body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn minute(minutes_since_1970: i64, started: u64, stuck: u64) -> Minute {
        Minute {
            at: chrono::Utc
                .timestamp_opt(minutes_since_1970 * 60, 0)
                .unwrap(),
            started,
            finished: 0,
            compensated: 0,
            stuck,
        }
    }

    #[test]
    fn the_last_hour_has_one_slot_per_minute_ending_with_the_current_one() {
        let now = chrono::Utc.timestamp_opt(1_000 * 60 + 59, 0).unwrap();
        let minutes = [
            minute(1_000, 3, 1),
            minute(999, 2, 0),
            minute(941, 7, 0),
            minute(940, 100, 0),
            minute(1_001, 100, 0),
        ];
        let [started, finished, _, stuck] = series(&minutes, now);
        assert_eq!(started[MINUTES - 1], 3);
        assert_eq!(started[MINUTES - 2], 2);
        assert_eq!(started[0], 7);
        assert_eq!(started.iter().sum::<u64>(), 12);
        assert_eq!(stuck[MINUTES - 1], 1);
        assert_eq!(finished.iter().sum::<u64>(), 0);
    }

    #[test]
    fn bars_are_scaled_to_the_largest_minute() {
        let mut values = [0; MINUTES];
        values[10] = 4;
        values[20] = 2;
        let svg = bars("started", &values).into_string();
        assert!(svg.contains(r#"height="60""#), "{svg}");
        assert!(svg.contains(r#"height="30""#), "{svg}");
        assert!(svg.contains("6 in the last hour"), "{svg}");
    }
}
