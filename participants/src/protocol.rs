//! The wire protocol between the orchestrator and participants (version 1).
//!
//! Everything here is plain JSON over AMQP so that a participant can be written in any
//! language with a plain AMQP client; docs/protocol.md is the normative description.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// The protocol version carried in every message body.
pub const PROTOCOL_VERSION: u32 = 1;

/// The MIME type of every single-message body.
pub const CONTENT_TYPE: &str = "application/json";

/// The MIME type of a batch: a JSON array of commands (or of replies), each element exactly
/// the body of a single message. See docs/protocol.md, "Batches".
pub const BATCH_CONTENT_TYPE: &str = "application/vnd.sagas.batch+json";

pub use crate::amqp::headers::BATCH_HEADER;

/// The most elements a batch may carry; a receiver dead-letters a larger batch.
pub const MAX_BATCH: usize = 256;

/// Splits a batch body into its elements (each the raw JSON of one message), or says why it
/// is not a batch. The elements are not decoded: each is judged on its own, so that one bad
/// element does not spoil the others.
pub fn split_batch(body: &[u8]) -> Result<Vec<Box<serde_json::value::RawValue>>, String> {
    let elements: Vec<Box<serde_json::value::RawValue>> =
        serde_json::from_slice(body).map_err(|e| format!("batch body is not a JSON array: {e}"))?;
    if elements.is_empty() {
        return Err("batch body is an empty array".into());
    }
    if elements.len() > MAX_BATCH {
        return Err(format!(
            "batch of {} elements exceeds the limit of {MAX_BATCH}",
            elements.len()
        ));
    }
    Ok(elements)
}

/// The body of a batch whose elements are already-encoded messages.
pub fn join_batch<'a>(elements: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut body = Vec::with_capacity(1024);
    body.push(b'[');
    for (n, element) in elements.into_iter().enumerate() {
        if n > 0 {
            body.push(b',');
        }
        body.extend_from_slice(element);
    }
    body.push(b']');
    body
}

/// What a command asks a participant to do with one step of one transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
#[schemars(
    description = "action or compensate (saga); try, confirm or cancel (TCC). A participant answers an operation its step does not have with a failed reply."
)]
pub enum Operation {
    /// Saga forward operation.
    Action,
    /// Saga undo of an action that ran or may have run.
    Compensate,
    /// TCC reservation.
    Try,
    /// TCC commit of a successful try.
    Confirm,
    /// TCC release of a try that ran or may have run.
    Cancel,
}

impl Operation {
    /// Every operation, in a stable order.
    pub const ALL: [Operation; 5] = [
        Operation::Action,
        Operation::Compensate,
        Operation::Try,
        Operation::Confirm,
        Operation::Cancel,
    ];

    /// The wire name (`action`, `compensate`, `try`, `confirm`, `cancel`).
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Action => "action",
            Operation::Compensate => "compensate",
            Operation::Try => "try",
            Operation::Confirm => "confirm",
            Operation::Cancel => "cancel",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Operation> {
        Operation::ALL.into_iter().find(|op| op.as_str() == s)
    }

    /// True for the operations that change business state first (`action`, `try`).
    pub fn is_forward(self) -> bool {
        matches!(self, Operation::Action | Operation::Try)
    }

    /// True for the operations that undo a forward operation (`compensate`, `cancel`).
    pub fn is_undo(self) -> bool {
        matches!(self, Operation::Compensate | Operation::Cancel)
    }

    /// The forward operation that this operation completes or undoes.
    pub fn forward(self) -> Operation {
        match self {
            Operation::Action | Operation::Compensate => Operation::Action,
            Operation::Try | Operation::Confirm | Operation::Cancel => Operation::Try,
        }
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command from the orchestrator to a participant.
///
/// The `schemars` descriptions are those of docs/schemas/command.schema.json, for readers
/// who do not read Rust.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(
    title = "Command",
    description = "The body of a command from the orchestrator to a participant (sagas wire protocol, version 1: docs/protocol.md). Unknown fields are ignored."
)]
pub struct Command {
    /// Protocol version ([`PROTOCOL_VERSION`]).
    #[schemars(
        extend("const" = PROTOCOL_VERSION),
        description = "The protocol version, 1. A participant dead-letters any other version."
    )]
    pub protocol: u32,
    /// The transaction (saga instance) id.
    #[schemars(description = "The transaction (saga instance).")]
    pub transaction_id: Uuid,
    /// The saga definition name.
    #[schemars(description = "The definition name.")]
    pub definition: String,
    /// The step name, unique within the definition.
    #[schemars(description = "The step name, unique within the definition.")]
    pub step: String,
    /// What to do.
    pub operation: Operation,
    /// Delivery attempt of this operation, starting at 1.
    #[schemars(
        range(min = 1, max = u32::MAX),
        description = "Delivery attempt of this operation of this step, from 1."
    )]
    pub attempt: u32,
    /// The step's command, computed once and logged before the first dispatch.
    #[schemars(
        description = "The step's command: any JSON value, null included, but present. The same in every attempt and operation of the step."
    )]
    pub payload: Value,
    /// The output of the forward operation; set for `compensate`, `confirm` and `cancel`
    /// when the forward operation replied `succeeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        description = "Only in compensate, confirm and cancel: the output of the step's forward operation, when it replied succeeded with a non-null output."
    )]
    pub output: Option<Value>,
    /// When the orchestrator stops waiting for this attempt's reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        description = "When the orchestrator stops waiting for this attempt's reply (RFC 3339, UTC). Informational."
    )]
    pub deadline: Option<DateTime<Utc>>,
    /// The W3C trace context of the request that started the transaction, when it had one;
    /// also sent as the `traceparent` AMQP header (added in protocol 1; absent before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        description = "The W3C trace context of the transaction, also sent as the traceparent header. An invalid value is ignored."
    )]
    pub traceparent: Option<String>,
}

impl Command {
    /// The AMQP `message_id` of this command: unique per transaction, step, operation and attempt.
    pub fn message_id(&self) -> String {
        format!(
            "{}:{}:{}:{}",
            self.transaction_id, self.step, self.operation, self.attempt
        )
    }

    /// The reply to this command with the given outcome.
    pub fn reply(&self, outcome: Outcome) -> Reply {
        Reply {
            protocol: PROTOCOL_VERSION,
            transaction_id: self.transaction_id,
            step: self.step.clone(),
            operation: self.operation,
            attempt: self.attempt,
            outcome,
        }
    }
}

/// A participant's reply to a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(
    title = "Reply",
    description = "The body of a participant's reply to a command (sagas wire protocol, version 1: docs/protocol.md). Unknown fields are ignored."
)]
pub struct Reply {
    /// Protocol version ([`PROTOCOL_VERSION`]).
    #[schemars(
        extend("const" = PROTOCOL_VERSION),
        description = "The protocol version of the command answered, 1."
    )]
    pub protocol: u32,
    /// The transaction id from the command.
    #[schemars(description = "The command's transaction_id.")]
    pub transaction_id: Uuid,
    /// The step name from the command.
    #[schemars(description = "The command's step.")]
    pub step: String,
    /// The operation from the command.
    pub operation: Operation,
    /// The attempt from the command.
    #[schemars(
        range(min = 1, max = u32::MAX),
        description = "The command's attempt (the orchestrator ignores a reply with attempt 0)."
    )]
    pub attempt: u32,
    /// What happened.
    pub outcome: Outcome,
}

impl Reply {
    /// The AMQP `message_id` of this reply.
    pub fn message_id(&self) -> String {
        format!(
            "{}:{}:{}:{}:reply",
            self.transaction_id, self.step, self.operation, self.attempt
        )
    }
}

/// The result of one operation as the participant reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
#[schemars(description = "What happened, tagged by status.")]
pub enum Outcome {
    /// The operation took effect; `output` is kept in the log and passed to later steps and
    /// to this step's compensate/confirm/cancel.
    #[schemars(description = "The operation took effect (is committed).")]
    Succeeded {
        /// Any JSON value the participant wants to return.
        #[serde(default)]
        #[schemars(
            description = "Any JSON value; absent means null. Passed to later steps and to this step's compensate, confirm or cancel."
        )]
        output: Value,
    },
    /// A business failure: the operation did not take effect and will not be retried.
    #[schemars(
        description = "A business failure: the operation did not take effect and would not succeed if retried."
    )]
    Failed {
        /// Human-readable reason, logged and shown to operators.
        #[schemars(description = "Why, for the log and operators.")]
        reason: String,
    },
    /// The operation is long-running: the participant will send the final reply later. The
    /// orchestrator stops re-sending and waits up to the step's in-progress timeout.
    #[schemars(
        description = "Accepted and under way: the final reply to the same command follows later."
    )]
    InProgress {
        /// Optional human-readable note (e.g. a ticket or job id).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(description = "Optional note, e.g. a job id.")]
        note: Option<String>,
    },
    /// A transient error: the operation did not take effect; the orchestrator retries it.
    #[schemars(
        description = "A transient error: the operation did not take effect; the orchestrator sends a later attempt."
    )]
    Retry {
        /// Human-readable reason.
        #[schemars(description = "Why, for the log and operators.")]
        reason: String,
        /// Optional hint: wait at least this long before the next attempt.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(
            description = "Optional: wait at least this many milliseconds before the next attempt."
        )]
        retry_after_ms: Option<u64>,
    },
}

impl Outcome {
    /// A `succeeded` outcome.
    pub fn succeeded(output: Value) -> Outcome {
        Outcome::Succeeded { output }
    }

    /// A `failed` (business failure) outcome.
    pub fn failed(reason: impl Into<String>) -> Outcome {
        Outcome::Failed {
            reason: reason.into(),
        }
    }

    /// A `retry` (transient error) outcome.
    pub fn retry(reason: impl Into<String>) -> Outcome {
        Outcome::Retry {
            reason: reason.into(),
            retry_after_ms: None,
        }
    }

    /// An `in_progress` outcome.
    pub fn in_progress() -> Outcome {
        Outcome::InProgress { note: None }
    }

    /// The wire name of the outcome.
    pub fn status(&self) -> &'static str {
        match self {
            Outcome::Succeeded { .. } => "succeeded",
            Outcome::Failed { .. } => "failed",
            Outcome::InProgress { .. } => "in_progress",
            Outcome::Retry { .. } => "retry",
        }
    }
}

/// A request to start a transaction, sent by a service's start relay to the orchestrator's
/// `{p}.starts` queue (docs/protocol.md, "Transactional starts").
///
/// The `schemars` descriptions are those of docs/schemas/start.schema.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(
    title = "Start command",
    description = "The body of a start command from a service to the orchestrator (sagas wire protocol, version 1: docs/protocol.md, \"Transactional starts\"). Unknown fields are ignored."
)]
pub struct StartCommand {
    /// Protocol version ([`PROTOCOL_VERSION`]).
    #[schemars(
        extend("const" = PROTOCOL_VERSION),
        description = "The protocol version, 1. The orchestrator refuses any other version."
    )]
    pub protocol: u32,
    /// The request: the id of the service's outbox row; the answer names it.
    #[schemars(
        description = "The request's id (the service's outbox row), repeated in the answer."
    )]
    pub request_id: Uuid,
    /// The definition to start.
    #[schemars(description = "The definition to start.")]
    pub definition: String,
    /// Its version; absent: the newest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(description = "The definition's version to start; absent: its newest.")]
    pub version: Option<u32>,
    /// The transaction's input, checked against the definition's input type.
    #[schemars(description = "The transaction's input, checked as an HTTP start's is.")]
    pub input: Value,
    /// The idempotency key of the start; absent: `request_id` in its hyphenated form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        description = "The start's idempotency key (1 to 200 visible ASCII characters), as an HTTP start's; absent: the request_id."
    )]
    pub idempotency_key: Option<String>,
    /// The W3C trace context the transaction continues; absent: a new trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        description = "The W3C trace context the transaction continues; absent or invalid: a new trace."
    )]
    pub traceparent: Option<String>,
}

impl StartCommand {
    /// The idempotency key the orchestrator starts with: the given one, or the request id.
    pub fn key(&self) -> String {
        self.idempotency_key
            .clone()
            .unwrap_or_else(|| self.request_id.to_string())
    }
}

/// The orchestrator's answer to a [`StartCommand`], sent to the command's `reply_to`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(
    title = "Start answer",
    description = "The orchestrator's answer to a start command (sagas wire protocol, version 1: docs/protocol.md, \"Transactional starts\"). Unknown fields are ignored."
)]
pub struct StartAnswer {
    /// Protocol version ([`PROTOCOL_VERSION`]).
    #[schemars(extend("const" = PROTOCOL_VERSION), description = "The protocol version, 1.")]
    pub protocol: u32,
    /// The `request_id` of the command answered.
    #[schemars(description = "The request_id of the start command answered.")]
    pub request_id: Uuid,
    /// What the orchestrator did.
    pub outcome: StartOutcome,
}

/// What the orchestrator did with a start command, tagged by `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
#[schemars(description = "What the orchestrator did, tagged by status.")]
pub enum StartOutcome {
    /// The transaction is stored (now, or by an earlier delivery of the same request).
    #[schemars(
        description = "The transaction is stored: started now, or by an earlier start with the same idempotency key and request."
    )]
    Accepted {
        /// The transaction's id.
        #[schemars(description = "The transaction's id.")]
        transaction_id: Uuid,
        /// False when an earlier start with the same key had already started it.
        #[schemars(
            description = "False when an earlier start with the same idempotency key had started it."
        )]
        created: bool,
    },
    /// The request can never start a transaction (unknown definition, invalid input, an
    /// idempotency key used for another request, a malformed body).
    #[schemars(
        description = "The request can never start a transaction; it was dead-lettered with the same reason."
    )]
    Refused {
        /// Why, as text.
        #[schemars(description = "Why, as text.")]
        reason: String,
    },
}

/// Names of the AMQP exchanges and queues, derived from one prefix (default `sagas`).
///
/// Tests use a unique prefix each so that they can run in parallel on one broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
}

impl Default for Topology {
    fn default() -> Self {
        Topology::new("sagas")
    }
}

impl Topology {
    /// A topology whose names all start with `prefix`.
    pub fn new(prefix: impl Into<String>) -> Topology {
        Topology {
            prefix: prefix.into(),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Direct exchange to which the orchestrator publishes commands, routing key = participant.
    pub fn commands_exchange(&self) -> String {
        format!("{}.commands", self.prefix)
    }

    /// The durable queue of one participant.
    pub fn participant_queue(&self, participant: &str) -> String {
        format!("{}.participant.{}", self.prefix, participant)
    }

    /// The durable queue the orchestrator consumes replies from (the commands' `reply_to`).
    pub fn replies_queue(&self) -> String {
        format!("{}.replies", self.prefix)
    }

    /// The durable queue the orchestrator consumes start commands from.
    pub fn starts_queue(&self) -> String {
        format!("{}.starts", self.prefix)
    }

    /// The durable queue of the start answers of one service's relays (their `reply_to`).
    pub fn start_answers_queue(&self, service: &str) -> String {
        format!("{}.start-answers.{}", self.prefix, service)
    }

    /// Fanout exchange that receives rejected (malformed or unknown) messages.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.prefix)
    }

    /// The durable queue bound to the dead-letter exchange.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }
}

/// A W3C trace context, as carried by the optional `traceparent` AMQP header of a command
/// (`{version}-{trace id}-{parent id}-{flags}`, e.g.
/// `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`).
///
/// The runtime records it in the handler's `tracing` span (fields `trace_id`,
/// `parent_span_id`, `traceparent`) and repeats it on the reply, so that logs and traces of
/// the orchestrator and the participant can be joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    /// 32 lowercase hex digits, not all zero.
    pub trace_id: String,
    /// The caller's span id: 16 lowercase hex digits, not all zero.
    pub parent_id: String,
    /// Trace flags; bit 0 is "sampled".
    pub flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` value; `None` if it is invalid (it is then ignored, as the W3C
    /// recommendation says). Versions above `00` are read by their first four fields.
    pub fn parse(value: &str) -> Option<TraceParent> {
        let hex = |s: &str, len: usize| {
            s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        let value = value.trim();
        let mut parts = value.split('-');
        let (version, trace_id, parent_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let rest = parts.next();
        let valid = hex(version, 2)
            && version != "ff"
            && (version != "00" || rest.is_none())
            && hex(trace_id, 32)
            && trace_id.bytes().any(|b| b != b'0')
            && hex(parent_id, 16)
            && parent_id.bytes().any(|b| b != b'0')
            && hex(flags, 2);
        valid.then(|| TraceParent {
            trace_id: trace_id.to_owned(),
            parent_id: parent_id.to_owned(),
            flags: u8::from_str_radix(flags, 16).unwrap_or(0),
        })
    }

    /// Whether the caller sampled the trace.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

impl std::fmt::Display for TraceParent {
    /// The version-00 header value.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_batch_splits_into_the_raw_elements_it_was_joined_from() {
        let elements: [&[u8]; 3] = [br#"{"a":1}"#, b"[1, 2]", b"\"not an object\""];
        let body = join_batch(elements);
        let split = split_batch(&body).unwrap();
        let raw: Vec<&str> = split.iter().map(|e| e.get()).collect();
        assert_eq!(raw, [r#"{"a":1}"#, "[1, 2]", "\"not an object\""]);
    }

    #[test]
    fn bodies_that_are_not_non_empty_arrays_of_bounded_length_are_not_batches() {
        for body in [&b"{}"[..], b"[]", b"not json", b"[1,"] {
            assert!(
                split_batch(body).is_err(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        let too_many = join_batch(std::iter::repeat_n(&b"1"[..], MAX_BATCH + 1));
        assert!(
            split_batch(&too_many)
                .unwrap_err()
                .contains("exceeds the limit")
        );
        let at_limit = join_batch(std::iter::repeat_n(&b"1"[..], MAX_BATCH));
        assert_eq!(split_batch(&at_limit).unwrap().len(), MAX_BATCH);
    }

    #[test]
    fn operations_round_trip_through_their_wire_names() {
        for op in Operation::ALL {
            assert_eq!(Operation::parse(op.as_str()), Some(op));
            let json = serde_json::to_value(op).unwrap();
            assert_eq!(json, json!(op.as_str()));
        }
        assert_eq!(Operation::parse("commit"), None);
    }

    #[test]
    fn undo_operations_point_back_at_their_forward_operation() {
        assert_eq!(Operation::Compensate.forward(), Operation::Action);
        assert_eq!(Operation::Cancel.forward(), Operation::Try);
        assert_eq!(Operation::Confirm.forward(), Operation::Try);
        assert!(Operation::Try.is_forward() && !Operation::Try.is_undo());
        assert!(Operation::Cancel.is_undo() && !Operation::Confirm.is_undo());
    }

    #[test]
    fn outcomes_serialize_with_a_status_tag() {
        let json = serde_json::to_value(Outcome::failed("overdrawn")).unwrap();
        assert_eq!(json, json!({"status": "failed", "reason": "overdrawn"}));
        let back: Outcome = serde_json::from_value(json!({"status": "succeeded"})).unwrap();
        assert_eq!(back, Outcome::succeeded(Value::Null));
    }

    #[test]
    fn traceparents_parse_and_print_back_and_bad_ones_are_ignored() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let trace = TraceParent::parse(value).unwrap();
        assert_eq!(trace.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(trace.parent_id, "00f067aa0ba902b7");
        assert!(trace.sampled());
        assert_eq!(trace.to_string(), value);
        // A future version may append fields.
        let v1 = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra";
        assert!(!TraceParent::parse(v1).unwrap().sampled());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }
}
