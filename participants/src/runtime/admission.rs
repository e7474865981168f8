//! Admitting deliveries: decoding and validating commands, dead-lettering the malformed.

use std::ops::Range;

use lapin::message::Delivery;
use lapin::types::ShortString;
use tracing::Instrument;

use super::session::Context;
use super::stats::Stats;
use crate::amqp::headers::{TRACEPARENT_HEADER, header_str};
use crate::amqp::is_batch;
use crate::protocol::{Command, PROTOCOL_VERSION, TraceParent, split_batch};

/// Why a delivery was dead-lettered instead of being processed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// The body is not a JSON object with a `protocol` number.
    #[error("body is not a protocol message: {0}")]
    NotJson(String),
    /// The body declares a protocol version this participant does not speak.
    #[error("unsupported protocol version {0} (expected {PROTOCOL_VERSION})")]
    Version(u64),
    /// The body is not a valid command.
    #[error("invalid command: {0}")]
    Invalid(String),
    /// The message has no `reply_to` property, so the reply would have nowhere to go.
    #[error("missing reply_to property")]
    NoReplyTo,
}

/// Decodes and validates a command body (everything except the AMQP properties): a JSON
/// object of protocol version 1 with every required field of the right type
/// (docs/schemas/command.schema.json) and an attempt of at least 1.
pub fn decode_command(body: &[u8]) -> Result<Command, Malformed> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| Malformed::NotJson(e.to_string()))?;
    let version = value
        .get("protocol")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| Malformed::NotJson("no numeric \"protocol\" field".to_owned()))?;
    if version != u64::from(PROTOCOL_VERSION) {
        return Err(Malformed::Version(version));
    }
    let cmd: Command =
        serde_json::from_value(value).map_err(|e| Malformed::Invalid(e.to_string()))?;
    // The orchestrator counts attempts from 1 and ignores a reply to attempt 0: such a
    // command was not sent by it, and running it would apply an effect nobody waits for.
    if cmd.attempt == 0 {
        return Err(Malformed::Invalid(
            "attempt 0 (attempts count from 1)".to_owned(),
        ));
    }
    Ok(cmd)
}

/// A decoded command on its way to its reply. It does not own its delivery (a command batch
/// brings many commands): the deliveries are [`Taken`], each with the range of its jobs.
pub(super) struct Job {
    pub(super) cmd: Command,
    pub(super) trace: Option<TraceParent>,
    pub(super) span: tracing::Span,
}

/// A taken delivery and what it needs to be settled.
pub(super) struct Taken {
    pub(super) delivery: Delivery,
    /// `None` once the message was dead-lettered whole: it is settled already.
    pub(super) reply_to: Option<ShortString>,
    /// Whether it is a command batch (answered with one reply batch) or a single command.
    pub(super) batch: bool,
    /// Its jobs, a range of the jobs of `serve` (empty when no command was valid).
    pub(super) jobs: Range<usize>,
    /// An element of the batch could not be dead-lettered: the message must not be acked,
    /// or that element would be lost.
    pub(super) lost_dead_letter: bool,
    /// The span of a batch (each command has its own); the command's span for a single one.
    pub(super) span: tracing::Span,
}

/// The span in which a command is handled, continuing `trace` when there is one.
fn command_span(ctx: &Context, cmd: &Command, trace: Option<&TraceParent>) -> tracing::Span {
    let span = tracing::info_span!(
        "command",
        participant = %ctx.participant,
        transaction_id = %cmd.transaction_id,
        step = %cmd.step,
        operation = %cmd.operation,
        attempt = cmd.attempt,
        trace_id = tracing::field::Empty,
        parent_span_id = tracing::field::Empty,
        traceparent = tracing::field::Empty,
    );
    if let Some(trace) = trace {
        span.record("trace_id", trace.trace_id.as_str());
        span.record("parent_span_id", trace.parent_id.as_str());
        span.record("traceparent", trace.to_string().as_str());
        #[cfg(feature = "otel")]
        crate::telemetry::continue_trace(&span, trace);
    }
    span
}

fn reply_to(delivery: &Delivery) -> Option<ShortString> {
    delivery
        .properties
        .reply_to()
        .clone()
        .filter(|r| !r.as_str().is_empty())
}

/// Decodes a delivery into jobs (appended to `jobs`), dead-lettering what is
/// malformed: a single command or a batch body that is not a batch whole, a batch element
/// alone.
pub(super) async fn admit(ctx: &Context, delivery: Delivery, jobs: &mut Vec<Job>) -> Taken {
    let start = jobs.len();
    if is_batch(&delivery.properties) {
        Stats::bump(&ctx.stats.0.command_batches);
        admit_batch(ctx, delivery, jobs).await
    } else {
        let reply_to = reply_to(&delivery);
        let decoded = decode_command(&delivery.data).and_then(|cmd| match &reply_to {
            Some(_) => Ok(cmd),
            None => Err(Malformed::NoReplyTo),
        });
        let (reply_to, span) = match decoded {
            Ok(cmd) => {
                let trace = header_str(&delivery.properties, TRACEPARENT_HEADER)
                    .and_then(TraceParent::parse);
                let span = command_span(ctx, &cmd, trace.as_ref());
                jobs.push(Job {
                    cmd,
                    trace,
                    span: span.clone(),
                });
                (reply_to, span)
            }
            Err(reason) => {
                reject_whole(ctx, &delivery, &reason.to_string()).await;
                (None, tracing::Span::none())
            }
        };
        Taken {
            delivery,
            reply_to,
            batch: false,
            jobs: start..jobs.len(),
            lost_dead_letter: false,
            span,
        }
    }
}

/// [`admit`] for a command batch: every element is judged on its own.
async fn admit_batch(ctx: &Context, delivery: Delivery, jobs: &mut Vec<Job>) -> Taken {
    let start = jobs.len();
    let span = tracing::info_span!(
        "command_batch",
        participant = %ctx.participant,
        message_id = ?delivery.properties.message_id(),
        elements = tracing::field::Empty,
    );
    let reply_to = reply_to(&delivery);
    let elements = split_batch(&delivery.data).and_then(|elements| match &reply_to {
        Some(_) => Ok(elements),
        None => Err(Malformed::NoReplyTo.to_string()),
    });
    let elements = match elements {
        Ok(elements) => elements,
        Err(reason) => {
            reject_whole(ctx, &delivery, &reason)
                .instrument(span.clone())
                .await;
            return Taken {
                delivery,
                reply_to: None,
                batch: true,
                jobs: start..start,
                lost_dead_letter: false,
                span,
            };
        }
    };
    span.record("elements", elements.len());
    let mut lost_dead_letter = false;
    for element in &elements {
        match decode_command(element.get().as_bytes()) {
            Ok(cmd) => {
                // A batch carries no per-command headers: the trace context is in the body.
                let trace = cmd.traceparent.as_deref().and_then(TraceParent::parse);
                let span = command_span(ctx, &cmd, trace.as_ref());
                jobs.push(Job { cmd, trace, span });
            }
            Err(reason) => {
                let reason = reason.to_string();
                tracing::warn!(
                    parent: &span,
                    participant = %ctx.participant,
                    %reason,
                    "dead-lettering a malformed command of a batch"
                );
                Stats::bump(&ctx.stats.0.rejected);
                let element = element.get().as_bytes();
                if let Err(error) = ctx.dead_letters.publish_element(element, &reason).await {
                    // The batch must come back, so that the element is not lost.
                    tracing::warn!(
                        %error,
                        "could not dead-letter an element of a batch; the batch will be requeued"
                    );
                    lost_dead_letter = true;
                }
            }
        }
    }
    Taken {
        delivery,
        reply_to,
        batch: true,
        jobs: start..jobs.len(),
        lost_dead_letter,
        span,
    }
}

/// Dead-letters a whole delivery, with a warning, counts it and settles it.
async fn reject_whole(ctx: &Context, delivery: &Delivery, reason: &str) {
    tracing::warn!(
        participant = %ctx.participant,
        %reason,
        message_id = ?delivery.properties.message_id(),
        "dead-lettering a malformed command"
    );
    Stats::bump(&ctx.stats.0.rejected);
    let properties = delivery.properties.clone();
    let settled = ctx
        .dead_letters
        .reject(&delivery.acker, &delivery.data, properties, reason)
        .await;
    if let Err(error) = settled {
        tracing::warn!(%error, "could not settle a malformed command");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn command_json() -> serde_json::Value {
        json!({
            "protocol": 1,
            "transaction_id": uuid::Uuid::nil(),
            "definition": "transfer",
            "step": "debit",
            "operation": "try",
            "attempt": 1,
            "payload": {"amount": 5}
        })
    }

    #[test]
    fn a_valid_command_decodes() {
        let body = serde_json::to_vec(&command_json()).unwrap();
        let cmd = decode_command(&body).unwrap();
        assert_eq!(cmd.step, "debit");
    }

    fn decode(value: &serde_json::Value) -> Result<Command, Malformed> {
        decode_command(&serde_json::to_vec(value).unwrap())
    }

    #[test]
    fn a_null_payload_is_a_payload_but_a_missing_one_is_malformed() {
        let mut null = command_json();
        null["payload"] = serde_json::Value::Null;
        assert_eq!(decode(&null).unwrap().payload, serde_json::Value::Null);
        let mut missing = command_json();
        missing.as_object_mut().unwrap().remove("payload");
        assert_eq!(
            decode(&missing).unwrap_err().to_string(),
            "invalid command: missing field `payload`"
        );
    }

    #[test]
    fn attempts_below_one_and_transaction_ids_that_are_not_uuids_are_malformed() {
        let mut zero = command_json();
        zero["attempt"] = json!(0);
        assert_eq!(
            decode(&zero).unwrap_err().to_string(),
            "invalid command: attempt 0 (attempts count from 1)"
        );
        for attempt in [json!(-1), json!(1.5), json!("1"), json!(4_294_967_296_u64)] {
            let mut bad = command_json();
            bad["attempt"] = attempt.clone();
            assert!(
                matches!(decode(&bad), Err(Malformed::Invalid(_))),
                "{attempt}"
            );
        }
        let mut not_uuid = command_json();
        not_uuid["transaction_id"] = json!("order-42");
        assert!(matches!(decode(&not_uuid), Err(Malformed::Invalid(_))));
    }

    #[test]
    fn garbage_wrong_versions_and_unknown_operations_are_malformed() {
        assert!(matches!(
            decode_command(b"not json"),
            Err(Malformed::NotJson(_))
        ));
        let mut v2 = command_json();
        v2["protocol"] = json!(2);
        assert_eq!(
            decode_command(&serde_json::to_vec(&v2).unwrap()),
            Err(Malformed::Version(2))
        );
        let mut unknown = command_json();
        unknown["operation"] = json!("commit");
        assert!(matches!(
            decode_command(&serde_json::to_vec(&unknown).unwrap()),
            Err(Malformed::Invalid(_))
        ));
    }
}
