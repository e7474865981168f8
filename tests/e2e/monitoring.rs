//! The monitoring files of docs/monitoring name only metrics the orchestrator exports, and the
//! Grafana dashboard is JSON whose every panel has a title and a query. (`promtool check
//! rules` and `promtool test rules` check the rules themselves, in scripts/test.)

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result};
use sagas::orchestrator::api::observe::{HTTP_DURATION, HTTP_REQUESTS};
use sagas::orchestrator::engine::metric;
use serde_json::Value;

/// Suffixes of the series of a histogram.
const HISTOGRAM_SUFFIXES: &[&str] = &["_bucket", "_sum", "_count"];

fn read(file: &str) -> Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs/monitoring")
        .join(file);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// Every word of `text` that starts with `sagas_` (letters, digits and `_`).
fn metric_names(text: &str) -> BTreeSet<&str> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = text.as_bytes();
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("sagas_") {
        if at > 0 && word(bytes[at - 1]) {
            continue;
        }
        let len = bytes[at..].iter().take_while(|&&b| word(b)).count();
        names.insert(&text[at..at + len]);
    }
    names
}

/// The histograms among the exported metrics.
const HISTOGRAMS: &[&str] = &[metric::REPLY_BATCH, HTTP_DURATION];

/// Whether `name` is a series the orchestrator exports: a metric's name, or a histogram's
/// name with the suffix of one of its series.
fn exported(name: &str) -> bool {
    metric::ALL.contains(&name)
        || [HTTP_REQUESTS, HTTP_DURATION].contains(&name)
        || HISTOGRAM_SUFFIXES.iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|base| HISTOGRAMS.contains(&base))
        })
}

#[test]
fn the_alert_rules_and_the_dashboard_name_only_metrics_the_orchestrator_exports() -> Result<()> {
    for file in [
        "sagas-rules.yml",
        "sagas-rules.test.yml",
        "grafana-dashboard.json",
    ] {
        let text = read(file)?;
        let names = metric_names(&text);
        assert!(names.len() >= 5, "{file} names few metrics: {names:?}");
        let unknown: Vec<_> = names.iter().filter(|n| !exported(n)).collect();
        assert!(
            unknown.is_empty(),
            "{file} names metrics the orchestrator does not export: {unknown:?}"
        );
    }
    Ok(())
}

#[test]
fn the_names_of_a_file_are_found_whole_and_histogram_series_are_known() {
    let names = metric_names(
        "rate(sagas_replies_total[5m]) x_sagas_not (sagas_http_request_duration_seconds_bucket)",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        [
            "sagas_http_request_duration_seconds_bucket",
            "sagas_replies_total"
        ]
    );
    assert!(exported("sagas_reply_batch_size_count"));
    assert!(!exported("sagas_replies_total_bucket"));
    assert!(!exported("sagas_instances_total"));
}

#[test]
fn the_dashboard_parses_and_every_panel_has_a_title_and_a_query() -> Result<()> {
    let dashboard: Value = serde_json::from_str(&read("grafana-dashboard.json")?)?;
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    let variables = dashboard["templating"]["list"]
        .as_array()
        .context("templating")?;
    assert!(
        variables
            .iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "a Prometheus datasource variable"
    );
    let panels = dashboard["panels"].as_array().context("panels")?;
    assert!(!panels.is_empty());
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(!title.trim().is_empty(), "a panel without a title: {panel}");
        let queries: Vec<&str> = panel["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["expr"].as_str())
            .filter(|e| !e.trim().is_empty())
            .collect();
        assert!(!queries.is_empty(), "panel {title:?} has no query");
    }
    Ok(())
}
