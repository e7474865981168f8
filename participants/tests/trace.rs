//! Trace context: the W3C `traceparent` of a command is continued in the handler's span.
//!
//! A test binary of its own: `tracing` caches per call site whether anyone is interested, and
//! other tests creating the same span on other threads with no subscriber could race with the
//! thread-local subscriber installed here.

mod common;

use std::sync::Arc;

use common::{TestBroker, TestDb, bank, command, start_with, text_header};
use lapin::BasicProperties;
use sagas_participant::protocol::Operation;
use sagas_participant::runtime::Participant;
use serde_json::json;
use uuid::Uuid;

const BANK: &str = "bank";

mod trace_capture {
    //! A `tracing` layer that keeps the `traceparent` field of every `command` span.
    use std::sync::{Arc, Mutex};

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing_subscriber::layer::{Context, Layer};

    #[derive(Clone, Default)]
    pub struct Captured(pub Arc<Mutex<Vec<(String, String)>>>);

    struct Fields<'a>(&'a mut Vec<(String, String)>);

    impl Visit for Fields<'_> {
        fn record_str(&mut self, field: &Field, value: &str) {
            self.0.push((field.name().to_owned(), value.to_owned()));
        }
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0.push((field.name().to_owned(), format!("{value:?}")));
        }
    }

    impl<S: tracing::Subscriber> Layer<S> for Captured {
        fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
            if attrs.metadata().name() == "command" {
                attrs.record(&mut Fields(&mut self.0.lock().unwrap()));
            }
        }
        fn on_record(&self, _: &Id, values: &Record<'_>, _: Context<'_, S>) {
            values.record(&mut Fields(&mut self.0.lock().unwrap()));
        }
    }
}

#[tokio::test]
async fn the_trace_context_of_a_command_is_recorded_in_its_span_and_repeated_on_the_reply() {
    use tracing_subscriber::layer::SubscriberExt;

    let captured = trace_capture::Captured::default();
    // Current-thread runtime: the participant's tasks run on this thread, under this default.
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(captured.clone()));
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let participant = Participant::new(
        BANK,
        broker.topology.clone(),
        db.pool.clone(),
        Arc::new(bank()),
    )
    .queue_options(broker.options.clone());
    let running = start_with(participant);

    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let cmd = command(
        Uuid::new_v4(),
        "reserve",
        Operation::Try,
        json!({ "account": "a", "amount": 10 }),
    );
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "traceparent".into(),
        lapin::types::AMQPValue::LongString(traceparent.into()),
    );
    broker
        .publish_raw(
            &broker.topology.commands_exchange(),
            BANK,
            &serde_json::to_vec(&cmd).unwrap(),
            BasicProperties::default()
                .with_reply_to(broker.topology.replies_queue().into())
                .with_headers(headers),
        )
        .await;
    let (reply, props) = broker.next_reply().await;
    assert_eq!(reply.outcome.status(), "succeeded");
    assert_eq!(
        text_header(&props, "traceparent").as_deref(),
        Some(traceparent)
    );
    let fields = captured.0.lock().unwrap().clone();
    let field = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        field("traceparent").as_deref(),
        Some(traceparent),
        "{fields:?}"
    );
    assert_eq!(
        field("trace_id").as_deref(),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );
    assert_eq!(field("parent_span_id").as_deref(), Some("00f067aa0ba902b7"));

    running.shutdown().await;
    broker.teardown(&[BANK]).await;
}
