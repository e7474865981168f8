//! OpenTelemetry traces over OTLP, for the orchestrator and for participants (feature `otel`).
//!
//! Nothing is exported unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set. The exporter reads the other standard variables
//! itself (`OTEL_EXPORTER_OTLP_PROTOCOL`: `http/protobuf`, the default, or `http/json`; headers,
//! timeout), the batch processor its own (`OTEL_BSP_SCHEDULE_DELAY`, …), and
//! `OTEL_SERVICE_NAME` names the process (else the name the process gives).
//!
//! One transaction is one trace: the orchestrator's HTTP start, a span per step attempt from its
//! dispatch to its reply (or timeout), and each participant's command span as the attempt's
//! child, through the `traceparent` every command carries (docs/protocol.md). The attempt's span
//! is exported by whichever orchestrator process handles its end, with an id every process
//! derives alike from the attempt, which is how the participant's span can name it as parent
//! before it exists.

use std::cell::Cell;
use std::sync::OnceLock;
use std::time::SystemTime;

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracerProvider, Tracer};
use tracing::Subscriber;
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt};
use tracing_subscriber::registry::LookupSpan;

use crate::protocol::TraceParent;

/// Why exporting could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot export traces over OTLP: {0}")]
pub struct TelemetryError(String);

/// The process's exporter, once [`layer`] started it.
static EXPORT: OnceLock<(SdkTracerProvider, Tracer)> = OnceLock::new();

/// True when the environment asks for traces to be exported.
pub fn configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var(name).is_ok_and(|v| !v.trim().is_empty()))
}

/// Starts exporting when [`configured`], and returns the layer that turns this process's
/// `tracing` spans into OpenTelemetry spans; `None` otherwise. `service` names the process unless
/// `OTEL_SERVICE_NAME` does. Once per process; call [`shutdown`] before it exits.
pub fn layer<S>(service: &str) -> Result<Option<OpenTelemetryLayer<S, Tracer>>, TelemetryError>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    if !configured() {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| TelemetryError(e.to_string()))?;
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| service.to_owned());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_id_generator(AttemptIds::default())
        .with_resource(Resource::builder().with_service_name(name).build())
        .build();
    let tracer = provider.tracer("sagas");
    if EXPORT.set((provider, tracer.clone())).is_err() {
        return Err(TelemetryError("already started in this process".into()));
    }
    Ok(Some(tracing_opentelemetry::layer().with_tracer(tracer)))
}

/// True once [`layer`] started exporting in this process.
pub fn exporting() -> bool {
    EXPORT.get().is_some()
}

/// Exports what is buffered and stops exporting. Call it as the process ends.
pub fn shutdown() {
    if let Some((provider, _)) = EXPORT.get() {
        let _ = provider.shutdown();
    }
}

/// Makes `span` a child of the remote span `trace` names (nothing when not exporting).
pub fn continue_trace(span: &tracing::Span, trace: &TraceParent) {
    if !exporting() {
        return;
    }
    if let Some(cx) = remote(trace) {
        let _ = span.set_parent(cx);
    }
}

/// The trace context of the current `tracing` span, as a `traceparent`, when exporting.
pub fn current_traceparent() -> Option<String> {
    EXPORT.get()?;
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| {
        TraceParent {
            trace_id: sc.trace_id().to_string(),
            parent_id: sc.span_id().to_string(),
            flags: sc.trace_flags().to_u8(),
        }
        .to_string()
    })
}

/// A span that already ran, from `start` to `end`: exported (when exporting) as a child of
/// the span `parent` names, with id `span_id`. `error` marks it failed.
pub struct Finished<'a> {
    pub name: String,
    pub parent: &'a TraceParent,
    pub span_id: u64,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<KeyValue>,
    pub error: Option<String>,
}

/// Exports `span` (see [`Finished`]).
pub fn export(span: Finished<'_>) {
    let Some((_, tracer)) = EXPORT.get() else {
        return;
    };
    let Some(parent) = remote(span.parent) else {
        return;
    };
    let builder = tracer
        .span_builder(span.name)
        .with_kind(SpanKind::Client)
        .with_start_time(span.start)
        .with_attributes(span.attributes);
    let mut built = NEXT_SPAN_ID.with(|next| {
        next.set(Some(SpanId::from(span.span_id)));
        let built = tracer.build_with_context(builder, &parent);
        next.set(None);
        built
    });
    if let Some(error) = span.error {
        built.set_status(Status::error(error));
    }
    built.end_with_timestamp(span.end);
}

fn remote(trace: &TraceParent) -> Option<Context> {
    let trace_id = TraceId::from_hex(&trace.trace_id).ok()?;
    let span_id = SpanId::from_hex(&trace.parent_id).ok()?;
    let sc = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(trace.flags),
        true,
        TraceState::default(),
    );
    sc.is_valid()
        .then(|| Context::new().with_remote_span_context(sc))
}

thread_local! {
    /// The id [`export`] gives the span it builds on this thread (the SDK takes span ids only
    /// from its generator).
    static NEXT_SPAN_ID: Cell<Option<SpanId>> = const { Cell::new(None) };
}

/// Random ids, except the span id [`export`] asks for.
#[derive(Debug, Default)]
struct AttemptIds(RandomIdGenerator);

impl IdGenerator for AttemptIds {
    fn new_trace_id(&self) -> TraceId {
        self.0.new_trace_id()
    }

    fn new_span_id(&self) -> SpanId {
        NEXT_SPAN_ID
            .with(|next| next.take())
            .unwrap_or_else(|| self.0.new_span_id())
    }
}
