//! An orchestrator's counters, read from its `/metrics` (Prometheus text format).

use std::collections::HashMap;

use anyhow::{Context, Result};

/// One reading of `/metrics`: every sample by its series (`name` or `name{labels}`, as
/// rendered).
#[derive(Debug, Clone, Default)]
pub struct Scrape(HashMap<String, f64>);

impl Scrape {
    /// Reads `{base}/metrics`.
    pub async fn read(http: &reqwest::Client, base: &str) -> Result<Scrape> {
        let res = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .with_context(|| format!("scraping {base}/metrics"))?;
        anyhow::ensure!(
            res.status().is_success(),
            "{base}/metrics answered {}",
            res.status()
        );
        Ok(Scrape::parse(&res.text().await?))
    }

    /// The samples of a text exposition (comments and malformed lines are skipped).
    pub fn parse(text: &str) -> Scrape {
        Scrape(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let (series, value) = l.trim().rsplit_once(' ')?;
                    Some((series.trim().to_owned(), value.parse().ok()?))
                })
                .collect(),
        )
    }

    /// The value of a counter without labels (0 when not rendered: never counted).
    pub fn counter(&self, name: &str) -> u64 {
        self.0.get(name).copied().unwrap_or(0.0) as u64
    }

    /// The value of a counter with one label.
    pub fn labelled(&self, name: &str, label: &str, value: &str) -> u64 {
        self.counter(&format!("{name}{{{label}=\"{value}\"}}"))
    }
}
