//! Per-request observability: an `X-Request-Id`, a `tracing` span, and request metrics.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

/// The request id header, taken from the request when it carries a usable one.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest request id taken over from a client.
const MAX_REQUEST_ID: usize = 128;

/// Counter, labels `method`, `route`, `status`: HTTP requests answered.
pub const HTTP_REQUESTS: &str = "sagas_http_requests_total";
/// Histogram, labels `method`, `route`: seconds to answer.
pub const HTTP_DURATION: &str = "sagas_http_request_duration_seconds";

/// The request id of a request: the client's `X-Request-Id` when it is 1 to 128 visible ASCII
/// characters, otherwise a new UUID.
pub fn request_id(request: &Request) -> HeaderValue {
    request
        .headers()
        .get(&REQUEST_ID)
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty() && b.len() <= MAX_REQUEST_ID && b.iter().all(|c| c.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&uuid::Uuid::now_v7().to_string())
                .expect("a UUID is a valid header value")
        })
}

/// Middleware: assigns the request id (echoed in the answer), runs the request in a span with
/// method, route, id, status and latency, logs its end, and counts it.
pub async fn observe(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request_id(&request);
    request.headers_mut().insert(REQUEST_ID.clone(), id.clone());
    let method = request.method().clone();
    // The route template, not the path: ids would make every series unique.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let span = tracing::info_span!(
        "http",
        method = %method,
        route = %route,
        request_id = id.to_str().unwrap_or_default(),
        caller = tracing::field::Empty,
        status = tracing::field::Empty,
        latency_ms = tracing::field::Empty,
    );
    #[cfg(feature = "otel")]
    if let Some(trace) = request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(sagas_participant::protocol::TraceParent::parse)
    {
        sagas_participant::telemetry::continue_trace(&span, &trace);
    }
    let mut response = next.run(request).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let status = response.status();
    span.record("status", status.as_u16());
    span.record("latency_ms", elapsed.as_secs_f64() * 1e3);
    span.in_scope(|| {
        // Probes and scrapes would drown the rest.
        if matches!(route.as_str(), "/healthz" | "/readyz" | "/metrics") && status.is_success() {
            tracing::debug!("request done");
        } else if status.is_server_error() {
            tracing::warn!("request done");
        } else {
            tracing::info!("request done");
        }
    });
    response.headers_mut().insert(REQUEST_ID.clone(), id);
    // Clients choose methods; unusual ones share a series so they cannot multiply them.
    let method: &'static str = match method.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    };
    metrics::counter!(HTTP_REQUESTS, "method" => method, "route" => route.clone(),
        "status" => status.as_u16().to_string())
    .increment(1);
    metrics::histogram!(HTTP_DURATION, "method" => method, "route" => route)
        .record(elapsed.as_secs_f64());
    response
}
