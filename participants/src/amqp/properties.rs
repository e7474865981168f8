//! The AMQP properties of a single command and of a single reply (docs/protocol.md).
//!
//! A batch's are [`super::batch_properties`] (a reply batch adds the sender's
//! [`super::Announcement`]); a dead letter's, [`super::DeadLetters`].

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};

use super::Announcement;
use super::headers::{
    ATTEMPT_HEADER, DEADLINE_HEADER, OPERATION_HEADER, STEP_HEADER, TRACEPARENT_HEADER,
    TRANSACTION_HEADER,
};
use crate::protocol::{CONTENT_TYPE, Command, Reply, StartAnswer, StartCommand, TraceParent};

/// Delivery mode 2: the broker keeps the message on disk (every message of the protocol is).
pub(crate) const PERSISTENT: u8 = 2;

/// A persistent message of `content_type`: the base of every message's properties.
pub(crate) fn persistent(content_type: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type(content_type.into())
        .with_delivery_mode(PERSISTENT)
}

/// A persistent JSON message with `message_id` and `correlation_id`.
fn persistent_json(message_id: String, correlation_id: String) -> BasicProperties {
    persistent(CONTENT_TYPE)
        .with_message_id(message_id.into())
        .with_correlation_id(correlation_id.into())
}

/// The AMQP properties of a command: persistent JSON, its message id, the transaction as
/// correlation id, `reply_to`, and headers that repeat the body's routing fields.
pub fn command_properties(command: &Command, reply_to: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        TRANSACTION_HEADER.into(),
        AMQPValue::LongString(command.transaction_id.to_string().into()),
    );
    headers.insert(
        STEP_HEADER.into(),
        AMQPValue::LongString(command.step.clone().into()),
    );
    headers.insert(
        OPERATION_HEADER.into(),
        AMQPValue::LongString(command.operation.as_str().into()),
    );
    headers.insert(
        ATTEMPT_HEADER.into(),
        AMQPValue::LongLongInt(i64::from(command.attempt)),
    );
    if let Some(trace) = &command.traceparent {
        headers.insert(
            TRACEPARENT_HEADER.into(),
            AMQPValue::LongString(trace.as_str().into()),
        );
    }
    if let Some(deadline) = command.deadline {
        headers.insert(
            DEADLINE_HEADER.into(),
            AMQPValue::LongString(deadline.to_rfc3339().into()),
        );
    }
    persistent_json(command.message_id(), command.transaction_id.to_string())
        .with_reply_to(reply_to.into())
        .with_headers(headers)
}

/// The AMQP properties of a start command: persistent JSON, the request id as message id and
/// correlation id, and the queue of its relay's answers as `reply_to`.
pub fn start_properties(command: &StartCommand, reply_to: &str) -> BasicProperties {
    let id = command.request_id.to_string();
    persistent_json(id.clone(), id).with_reply_to(reply_to.into())
}

/// The AMQP properties of a start answer: persistent JSON, `{request id}:answer` as message id
/// and the request id as correlation id.
pub fn start_answer_properties(answer: &StartAnswer) -> BasicProperties {
    let id = answer.request_id.to_string();
    persistent_json(format!("{id}:answer"), id)
}

/// The AMQP properties of a reply: persistent JSON, its message id, the transaction as
/// correlation id, the sender's announcement, and the command's trace context when it had one
/// (the reply belongs to the same trace; the orchestrator may continue it).
pub fn reply_properties(
    reply: &Reply,
    trace: Option<&TraceParent>,
    from: &Announcement,
) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(trace) = trace {
        headers.insert(
            TRACEPARENT_HEADER.into(),
            AMQPValue::LongString(trace.to_string().into()),
        );
    }
    from.stamp(
        persistent_json(reply.message_id(), reply.transaction_id.to_string()).with_headers(headers),
    )
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use uuid::Uuid;

    use super::*;
    use crate::amqp::headers::{header_i64, header_str};
    use crate::protocol::{Operation, Outcome};

    const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn command() -> Command {
        Command {
            protocol: 1,
            transaction_id: Uuid::from_u128(0x0197_a3c4_5e6f_7a8b_9c0d_1e2f_3a4b_5c6d),
            definition: "transfer_tcc".into(),
            step: "debit".into(),
            operation: Operation::Try,
            attempt: 3,
            payload: serde_json::json!({"amount": 250}),
            output: None,
            deadline: Some(Utc.with_ymd_and_hms(2025, 6, 1, 12, 0, 5).unwrap()),
            traceparent: Some(TRACE.into()),
        }
    }

    #[test]
    fn a_commands_headers_read_back_as_the_fields_they_repeat() {
        let cmd = command();
        let properties = command_properties(&cmd, "sagas.replies");
        let text = |name| header_str(&properties, name);
        assert_eq!(
            text(TRANSACTION_HEADER),
            Some("0197a3c4-5e6f-7a8b-9c0d-1e2f3a4b5c6d")
        );
        assert_eq!(text(STEP_HEADER), Some("debit"));
        assert_eq!(text(OPERATION_HEADER), Some("try"));
        assert_eq!(header_i64(&properties, ATTEMPT_HEADER), Some(3));
        assert_eq!(text(DEADLINE_HEADER), Some("2025-06-01T12:00:05+00:00"));
        assert_eq!(text(TRACEPARENT_HEADER), Some(TRACE));
        assert_eq!(
            properties.headers().as_ref().map(|h| h.inner().len()),
            Some(6)
        );
    }

    #[test]
    fn a_commands_properties_are_persistent_json_with_its_ids_and_reply_to() {
        let cmd = command();
        let properties = command_properties(&cmd, "sagas.replies");
        let short = |value: &Option<lapin::types::ShortString>| {
            value.as_ref().map(|v| v.as_str().to_owned())
        };
        assert_eq!(
            short(properties.content_type()).as_deref(),
            Some(CONTENT_TYPE)
        );
        assert_eq!(properties.delivery_mode(), &Some(2));
        assert_eq!(short(properties.message_id()), Some(cmd.message_id()));
        assert_eq!(
            short(properties.correlation_id()),
            Some(cmd.transaction_id.to_string())
        );
        assert_eq!(
            short(properties.reply_to()).as_deref(),
            Some("sagas.replies")
        );
    }

    #[test]
    fn a_command_without_deadline_or_trace_context_has_neither_header() {
        let cmd = Command {
            deadline: None,
            traceparent: None,
            ..command()
        };
        let properties = command_properties(&cmd, "r");
        assert_eq!(header_str(&properties, DEADLINE_HEADER), None);
        assert_eq!(header_str(&properties, TRACEPARENT_HEADER), None);
        assert_eq!(header_i64(&properties, ATTEMPT_HEADER), Some(3));
    }

    #[test]
    fn a_reply_repeats_its_commands_trace_context_and_always_announces_its_sender() {
        let cmd = command();
        let reply = cmd.reply(Outcome::succeeded(serde_json::Value::Null));
        let trace = TraceParent::parse(TRACE).unwrap();
        let from = Announcement::new("accounts", 256);
        let traced = reply_properties(&reply, Some(&trace), &from);
        assert_eq!(header_str(&traced, TRACEPARENT_HEADER), Some(TRACE));
        assert_eq!(Announcement::read(&traced), Some(from.clone()));
        assert_eq!(
            traced
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned()),
            Some(reply.message_id())
        );
        let untraced = reply_properties(&reply, None, &from);
        assert_eq!(header_str(&untraced, TRACEPARENT_HEADER), None);
        assert_eq!(Announcement::read(&untraced), Some(from));
        assert_eq!(
            untraced.headers().as_ref().map(|h| h.inner().len()),
            Some(2)
        );
        assert_eq!(untraced.delivery_mode(), &Some(2));
    }
}
