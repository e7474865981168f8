//! The `command` spans of the SDK, captured for the whole test binary.
//!
//! `tracing` caches per call site whether any subscriber is interested. A subscriber set for
//! one thread only (`set_default`) is not enough in a binary whose tests run side by side: a
//! call site first reached on another thread while it is the only subscriber is cached as
//! uninteresting for good. So the binary has one global subscriber, installed before any test
//! runs SDK code (the helpers that create a database or a broker topology call [`install`]),
//! and each test reads the spans of its own transactions.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, Once};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use uuid::Uuid;

/// The fields of a span, by name.
pub type Fields = HashMap<String, String>;

/// The fields of every `command` span in order of creation, and the index there of each live
/// span's fields (span ids are reused once a span closes).
#[derive(Default)]
struct Captured {
    spans: Vec<Fields>,
    live: HashMap<u64, usize>,
}

static CAPTURED: LazyLock<Mutex<Captured>> = LazyLock::new(Mutex::default);

/// Installs the global subscriber that captures `command` spans (once per process).
pub fn install() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Capture))
            .expect("no other global subscriber in the participant tests");
    });
}

/// The fields of the `command` spans of transaction `id`, in order of creation.
pub fn command_spans(id: Uuid) -> Vec<Fields> {
    let id = id.to_string();
    CAPTURED
        .lock()
        .unwrap()
        .spans
        .iter()
        .filter(|fields| fields.get("transaction_id") == Some(&id))
        .cloned()
        .collect()
}

struct Capture;

struct Visitor<'a>(&'a mut Fields);

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S: Subscriber> Layer<S> for Capture {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        if metadata.is_span() && metadata.name() == "command" {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        let mut fields = Fields::new();
        attrs.record(&mut Visitor(&mut fields));
        let mut captured = CAPTURED.lock().unwrap();
        let index = captured.spans.len();
        captured.live.insert(id.into_u64(), index);
        captured.spans.push(fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        let mut captured = CAPTURED.lock().unwrap();
        if let Some(&index) = captured.live.get(&id.into_u64()) {
            values.record(&mut Visitor(&mut captured.spans[index]));
        }
    }

    fn on_close(&self, id: Id, _: Context<'_, S>) {
        CAPTURED.lock().unwrap().live.remove(&id.into_u64());
    }
}
