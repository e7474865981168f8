//! The exact JSON of every message kind, snapshotted so that the wire format cannot drift by
//! accident. A failing snapshot here is a protocol change: either revert it, or make it an
//! additive change (docs/protocol.md, "Versioning") and accept the new snapshot on purpose.
//!
//! The snapshots hold the bytes as they go on the wire (`serde_json::to_vec`, compact).

use chrono::{TimeZone, Utc};
use sagas_participant::protocol::{Command, Operation, Outcome, PROTOCOL_VERSION, Reply};
use serde_json::{Value, json};
use uuid::Uuid;

fn transaction_id() -> Uuid {
    "0197a3c4-5e6f-7a8b-9c0d-1e2f3a4b5c6d".parse().unwrap()
}

fn command(definition: &str, step: &str, operation: Operation) -> Command {
    Command {
        protocol: PROTOCOL_VERSION,
        transaction_id: transaction_id(),
        definition: definition.to_owned(),
        step: step.to_owned(),
        operation,
        attempt: 1,
        payload: json!({ "account": "acct-1", "amount": 250 }),
        output: None,
        deadline: Some(deadline()),
        traceparent: None,
    }
}

/// The orchestrator's clock has microseconds; they are part of the wire format.
fn deadline() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 6, 1, 12, 0, 5).unwrap() + chrono::Duration::microseconds(123_456)
}

fn wire<T: serde::Serialize>(message: &T) -> String {
    String::from_utf8(serde_json::to_vec(message).unwrap()).unwrap()
}

/// Encodes, checks that decoding gives the same value back, and returns the wire text.
fn round_trip_command(cmd: &Command) -> String {
    let text = wire(cmd);
    let back: Command = serde_json::from_str(&text).unwrap();
    assert_eq!(&back, cmd);
    text
}

fn round_trip_reply(reply: &Reply) -> String {
    let text = wire(reply);
    let back: Reply = serde_json::from_str(&text).unwrap();
    assert_eq!(&back, reply);
    text
}

fn forward_output() -> Value {
    json!({ "account": "acct-1", "available": 9750 })
}

#[test]
fn an_action_command_has_no_output() {
    let cmd = command("order_saga", "reserve_stock", Operation::Action);
    insta::assert_snapshot!(round_trip_command(&cmd));
}

#[test]
fn a_compensate_command_carries_the_forward_output_and_a_later_attempt() {
    let cmd = Command {
        output: Some(forward_output()),
        attempt: 3,
        ..command("order_saga", "reserve_stock", Operation::Compensate)
    };
    insta::assert_snapshot!(round_trip_command(&cmd));
}

#[test]
fn a_compensate_command_after_an_unknown_outcome_has_no_output() {
    let cmd = command("order_saga", "reserve_stock", Operation::Compensate);
    insta::assert_snapshot!(round_trip_command(&cmd));
}

#[test]
fn a_try_command_has_no_output() {
    let cmd = command("transfer_tcc", "debit", Operation::Try);
    insta::assert_snapshot!(round_trip_command(&cmd));
}

#[test]
fn a_confirm_command_carries_the_try_output() {
    let cmd = Command {
        output: Some(forward_output()),
        ..command("transfer_tcc", "debit", Operation::Confirm)
    };
    insta::assert_snapshot!(round_trip_command(&cmd));
}

#[test]
fn a_cancel_command_carries_the_try_output_when_there_is_one() {
    let cmd = Command {
        output: Some(forward_output()),
        ..command("transfer_tcc", "debit", Operation::Cancel)
    };
    insta::assert_snapshot!(round_trip_command(&cmd));
}

#[test]
fn a_command_without_deadline_omits_the_field() {
    let cmd = Command {
        deadline: None,
        payload: Value::Null,
        ..command("transfer_tcc", "debit", Operation::Try)
    };
    insta::assert_snapshot!(round_trip_command(&cmd));
}

fn reply(outcome: Outcome) -> Reply {
    command("transfer_tcc", "debit", Operation::Try).reply(outcome)
}

#[test]
fn a_succeeded_reply_carries_its_output() {
    insta::assert_snapshot!(round_trip_reply(&reply(Outcome::succeeded(
        forward_output()
    ))));
}

#[test]
fn a_succeeded_reply_without_output_sends_null() {
    insta::assert_snapshot!(round_trip_reply(&reply(Outcome::succeeded(Value::Null))));
}

#[test]
fn a_failed_reply_carries_its_reason() {
    insta::assert_snapshot!(round_trip_reply(&reply(Outcome::failed(
        "acct-1: insufficient funds or no such account"
    ))));
}

#[test]
fn an_in_progress_reply_without_note() {
    insta::assert_snapshot!(round_trip_reply(&reply(Outcome::in_progress())));
}

#[test]
fn an_in_progress_reply_with_a_note() {
    insta::assert_snapshot!(round_trip_reply(&reply(Outcome::InProgress {
        note: Some("job 42 queued".to_owned()),
    })));
}

#[test]
fn a_retry_reply_without_hint() {
    insta::assert_snapshot!(round_trip_reply(&reply(Outcome::retry("database busy"))));
}

#[test]
fn a_retry_reply_with_a_retry_after_hint() {
    insta::assert_snapshot!(round_trip_reply(&reply(Outcome::Retry {
        reason: "rate limited".to_owned(),
        retry_after_ms: Some(2000),
    })));
}

#[test]
fn message_ids_name_transaction_step_operation_and_attempt() {
    let cmd = Command {
        attempt: 2,
        ..command("transfer_tcc", "debit", Operation::Cancel)
    };
    assert_eq!(
        cmd.message_id(),
        "0197a3c4-5e6f-7a8b-9c0d-1e2f3a4b5c6d:debit:cancel:2"
    );
    assert_eq!(
        cmd.reply(Outcome::succeeded(Value::Null)).message_id(),
        "0197a3c4-5e6f-7a8b-9c0d-1e2f3a4b5c6d:debit:cancel:2:reply"
    );
}

#[test]
fn receivers_ignore_unknown_fields_and_default_the_optional_ones() {
    // What a newer sender within version 1 may send (additive changes only).
    let cmd: Command = serde_json::from_value(json!({
        "protocol": 1,
        "transaction_id": transaction_id(),
        "definition": "transfer_tcc",
        "step": "debit",
        "operation": "try",
        "attempt": 1,
        "payload": {},
        "priority": "high",
    }))
    .unwrap();
    assert_eq!((cmd.output, cmd.deadline), (None, None));

    let reply: Reply = serde_json::from_value(json!({
        "protocol": 1,
        "transaction_id": transaction_id(),
        "step": "debit",
        "operation": "try",
        "attempt": 1,
        "outcome": { "status": "succeeded", "elapsed_ms": 12 },
        "participant_version": "2.3.1",
    }))
    .unwrap();
    assert_eq!(reply.outcome, Outcome::succeeded(Value::Null));
    let retry: Outcome =
        serde_json::from_value(json!({ "status": "retry", "reason": "busy" })).unwrap();
    assert_eq!(retry, Outcome::retry("busy"));
}

#[test]
fn unknown_statuses_and_operations_do_not_decode() {
    assert!(serde_json::from_value::<Outcome>(json!({ "status": "maybe" })).is_err());
    assert!(serde_json::from_value::<Outcome>(json!({ "status": "failed" })).is_err());
    assert!(serde_json::from_value::<Operation>(json!("commit")).is_err());
}

#[test]
fn deadlines_decode_from_any_rfc3339_offset() {
    let cmd: Command = serde_json::from_value(json!({
        "protocol": 1,
        "transaction_id": transaction_id(),
        "definition": "d",
        "step": "s",
        "operation": "action",
        "attempt": 1,
        "payload": null,
        "deadline": "2025-06-01T14:00:05+02:00",
    }))
    .unwrap();
    assert_eq!(
        cmd.deadline,
        Some(Utc.with_ymd_and_hms(2025, 6, 1, 12, 0, 5).unwrap())
    );
}

#[test]
fn a_command_with_a_trace_context_carries_it_and_one_without_omits_it() {
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let cmd = Command {
        traceparent: Some(trace.to_owned()),
        ..command("transfer_saga", "debit", Operation::Action)
    };
    let json = serde_json::to_value(&cmd).unwrap();
    assert_eq!(json["traceparent"], trace);
    let plain = serde_json::to_value(command("transfer_saga", "debit", Operation::Action)).unwrap();
    assert!(plain.get("traceparent").is_none());
    let back: Command = serde_json::from_value(json).unwrap();
    assert_eq!(back, cmd);
}
