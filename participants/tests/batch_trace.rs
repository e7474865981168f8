//! Trace context of command batches: each element's span continues the `traceparent` of its
//! own body (a batch carries no per-command headers).
//!
//! A test binary of its own, like `trace.rs`: `tracing` caches per call site whether anyone
//! is interested, and other tests creating the same spans on other threads with no subscriber
//! could race with the thread-local subscriber installed here.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::{TestBroker, TestDb, bank, command, element, start_with};
use sagas_participant::protocol::{Command, Operation};
use sagas_participant::runtime::Participant;
use serde_json::json;
use uuid::Uuid;

const BANK: &str = "bank";

mod span_capture {
    //! A `tracing` layer that keeps the fields of every `command` span, span by span.
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing_subscriber::layer::{Context, Layer};

    pub type Fields = HashMap<String, String>;

    /// The fields of every `command` span in order of creation, and the index there of each
    /// live span's fields (span ids are reused once a span closes).
    pub type Spans = (Vec<Fields>, HashMap<u64, usize>);

    #[derive(Clone, Default)]
    pub struct Captured(pub Arc<Mutex<Spans>>);

    struct Visitor<'a>(&'a mut Fields);

    impl Visit for Visitor<'_> {
        fn record_str(&mut self, field: &Field, value: &str) {
            self.0.insert(field.name().to_owned(), value.to_owned());
        }
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0.insert(field.name().to_owned(), format!("{value:?}"));
        }
    }

    impl<S: tracing::Subscriber> Layer<S> for Captured {
        fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
            let mut captured = self.0.lock().unwrap();
            let (spans, live) = &mut *captured;
            if attrs.metadata().name() == "command" {
                let mut fields = Fields::new();
                attrs.record(&mut Visitor(&mut fields));
                live.insert(id.into_u64(), spans.len());
                spans.push(fields);
            } else {
                live.remove(&id.into_u64());
            }
        }
        fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
            let mut captured = self.0.lock().unwrap();
            let (spans, live) = &mut *captured;
            if let Some(&index) = live.get(&id.into_u64()) {
                values.record(&mut Visitor(&mut spans[index]));
            }
        }
        fn on_close(&self, id: Id, _: Context<'_, S>) {
            self.0.lock().unwrap().1.remove(&id.into_u64());
        }
    }
}

#[tokio::test]
async fn each_command_of_a_batch_is_traced_in_its_own_span_with_the_traceparent_of_its_body() {
    use tracing_subscriber::layer::SubscriberExt;

    let captured = span_capture::Captured::default();
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

    let traced = |traceparent: Option<&str>| Command {
        traceparent: traceparent.map(str::to_owned),
        ..command(
            Uuid::new_v4(),
            "reserve",
            Operation::Try,
            json!({ "account": "a", "amount": 1 }),
        )
    };
    let first = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let second = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    let cmds = [traced(Some(first)), traced(None), traced(Some(second))];
    broker
        .send_batch(BANK, &cmds.iter().map(element).collect::<Vec<_>>())
        .await;
    let (replies, props) = broker.next_reply_batch().await;
    assert_eq!(replies.len(), 3);
    assert!(
        props
            .headers()
            .as_ref()
            .is_none_or(|h| !h.inner().contains_key("traceparent")),
        "a reply batch carries no per-command headers"
    );

    let spans: HashMap<String, span_capture::Fields> = captured
        .0
        .lock()
        .unwrap()
        .0
        .iter()
        .map(|fields| (fields["transaction_id"].clone(), fields.clone()))
        .collect();
    assert_eq!(spans.len(), 3, "{spans:?}");
    let span = |cmd: &Command| &spans[&cmd.transaction_id.to_string()];
    assert_eq!(
        span(&cmds[0]).get("traceparent").map(String::as_str),
        Some(first)
    );
    assert_eq!(
        span(&cmds[0]).get("trace_id").map(String::as_str),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );
    assert_eq!(span(&cmds[1]).get("traceparent"), None);
    assert_eq!(
        span(&cmds[2]).get("traceparent").map(String::as_str),
        Some(second)
    );
    assert_eq!(
        span(&cmds[2]).get("parent_span_id").map(String::as_str),
        Some("b7ad6b7169203331")
    );

    running.shutdown().await;
    broker.teardown(&[BANK]).await;
}
