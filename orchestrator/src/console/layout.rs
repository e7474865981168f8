//! The frame of every page (head, navigation bar) and the small pieces pages share.

use maud::{DOCTYPE, Markup, html};
use serde_json::Value;

use crate::api::Caller;
use crate::machine::{Status, Time};

/// A whole page: `title`, the navigation bar (with who is logged in, when known) and `body`.
pub fn page(title: &str, caller: Option<&Caller>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · sagas console" }
                link rel="stylesheet" href="/ui/console.css";
            }
            body {
                nav {
                    a.brand href="/ui" { "sagas" }
                    a href="/ui" { "Overview" }
                    a href="/ui/transactions" { "Transactions" }
                    a href="/ui/dead-letters" { "Dead letters" }
                    a href="/ui/definitions" { "Definitions" }
                    span.spacer {}
                    @if let Some(caller) = caller {
                        span.who {
                            (caller.name.as_deref().unwrap_or("no token (loopback)"))
                            " · " (caller.role.as_str())
                        }
                        @if caller.name.is_some() {
                            form.logout method="post" action="/ui/logout" {
                                button type="submit" { "Log out" }
                            }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// A status as a coloured badge.
pub fn status(status: Status) -> Markup {
    badge(status.as_str())
}

/// A name as a badge coloured by its CSS class (statuses of instances and steps).
pub fn badge(name: &str) -> Markup {
    html! { span class={ "badge " (name) } { (name) } }
}

/// A time, to the millisecond, in UTC.
pub fn time(t: Time) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
}

/// A duration in the unit that reads best: ms below 10 s, then s, min, h.
pub fn duration(d: chrono::Duration) -> String {
    let ms = d.num_milliseconds();
    if ms < 10_000 {
        format!("{ms} ms")
    } else if ms < 120_000 {
        format!("{:.1} s", ms as f64 / 1e3)
    } else if ms < 7_200_000 {
        format!("{:.1} min", ms as f64 / 60e3)
    } else {
        format!("{:.1} h", ms as f64 / 3.6e6)
    }
}

/// JSON, indented, as text (never as HTML).
pub fn json(value: &Value) -> Markup {
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    html! { pre.json { (text) } }
}

/// A link to a transaction's page.
pub fn transaction_link(id: uuid::Uuid) -> Markup {
    html! { a.id href={ "/ui/transactions/" (id) } { (id) } }
}

/// A link to a transaction's page that shows the first group of the id's digits (the whole
/// id on hover).
pub fn short_transaction_link(id: uuid::Uuid) -> Markup {
    html! { a.id href={ "/ui/transactions/" (id) } title=(id) { (short(id)) } }
}

/// The first group of an id's digits.
pub fn short(id: uuid::Uuid) -> String {
    id.to_string().chars().take(8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_in_the_unit_that_fits() {
        let ms = chrono::Duration::milliseconds;
        assert_eq!(duration(ms(42)), "42 ms");
        assert_eq!(duration(ms(12_345)), "12.3 s");
        assert_eq!(duration(ms(600_000)), "10.0 min");
        assert_eq!(duration(ms(9_000_000)), "2.5 h");
    }

    #[test]
    fn payloads_are_shown_as_text_never_as_markup() {
        let shown = json(&serde_json::json!({"note": "<script>alert(1)</script>"})).into_string();
        assert!(!shown.contains("<script>"), "{shown}");
        assert!(shown.contains("&lt;script&gt;"), "{shown}");
    }
}
