//! Trace context of command batches: each element's span continues the `traceparent` of its
//! own body (a batch carries no per-command headers), as captured for the whole binary by
//! `helpers::traces`.

use std::collections::HashMap;

use sagas_participant::protocol::{Command, Operation};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{
    BANK, TestBroker, TestDb, bank_participant, command, element, start_with, traces,
};

#[tokio::test]
async fn each_command_of_a_batch_is_traced_in_its_own_span_with_the_traceparent_of_its_body() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let running = start_with(bank_participant(&db, &broker));

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

    let spans: HashMap<String, traces::Fields> = cmds
        .iter()
        .flat_map(|cmd| traces::command_spans(cmd.transaction_id))
        .map(|fields| (fields["transaction_id"].clone(), fields))
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
