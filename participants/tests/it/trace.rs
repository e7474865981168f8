//! Trace context: the W3C `traceparent` of a command is continued in the handler's span (as
//! captured for the whole binary by `helpers::traces`).

use lapin::BasicProperties;
use sagas_participant::protocol::Operation;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{
    BANK, TestBroker, TestDb, bank_participant, command, start_with, text_header, traces,
};

#[tokio::test]
async fn the_trace_context_of_a_command_is_recorded_in_its_span_and_repeated_on_the_reply() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let running = start_with(bank_participant(&db, &broker));

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
    let fields: Vec<(String, String)> = traces::command_spans(cmd.transaction_id)
        .into_iter()
        .flatten()
        .collect();
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
