//! `GET /metrics`: the process's metrics in the Prometheus text format.

use std::sync::OnceLock;
use std::time::Duration;

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::observe;
use crate::engine::metric;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Buckets of the request latency histogram, in seconds (up to the longest `?wait`).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The process's Prometheus recorder, installed by the first call. A recorder is global to the
/// process: every app built in it (tests build several) shares this one, so counters add up
/// across them. If another recorder was installed first, the handle renders nothing of ours.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(observe::HTTP_DURATION.to_owned()),
                LATENCY_BUCKETS,
            )
            .expect("non-empty buckets")
            .set_buckets_for_metric(
                Matcher::Full(metric::STEP_DURATION.to_owned()),
                LATENCY_BUCKETS,
            )
            .expect("non-empty buckets")
            .set_buckets_for_metric(
                Matcher::Full(metric::REPLY_BATCH.to_owned()),
                &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0],
            )
            .expect("non-empty buckets");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was installed already; /metrics will not show the orchestrator's metrics");
        }
        metric::describe();
        metrics::describe_counter!(observe::HTTP_REQUESTS, "HTTP requests answered.");
        metrics::describe_histogram!(
            observe::HTTP_DURATION,
            metrics::Unit::Seconds,
            "Time to answer HTTP requests."
        );
        // Drains histogram samples even when nobody scrapes; a thread so that it does not
        // depend on the runtime that happened to call first.
        let upkeep = handle.clone();
        let _ = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            });
        handle
    })
}

/// `GET /metrics`: counters of instances, replies, timers, the outbox and HTTP requests, and gauges of what is open and queued now.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    responses((status = 200, description = "Prometheus text exposition format", body = String,
        content_type = "text/plain; version=0.0.4")),
)]
pub async fn metrics() -> impl IntoResponse {
    let h = handle();
    h.run_upkeep();
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        h.render(),
    )
}
