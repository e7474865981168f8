//! Start commands: transactions started from `{p}.starts` (docs/protocol.md, "Transactional
//! starts"), as the HTTP API starts them, each answered to its relay.
//!
//! A start command goes through the checks and the idempotency of an HTTP start (the same
//! code: [`Engine::require_definition`] and [`Engine::start_with`]), with the request id as
//! the idempotency key unless it names one. It is acked only
//! once the start is committed and its answer confirmed by the broker, so a crash before
//! means a redelivery, which the idempotency answers with the same transaction. A command
//! that can never start one (malformed, an unknown definition, an input that does not fit, a
//! key used for another request) is answered `refused` and dead-lettered with the reason; a
//! transient failure (the database or the broker) requeues it after [`REQUEUE_DELAY`].

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::metric::START_COMMANDS;
use super::{Engine, EngineError, StartOptions};
use crate::transport::Incoming;
use sagas_participant::protocol::{
    PROTOCOL_VERSION, StartAnswer, StartCommand, StartOutcome, TraceParent,
};
use sagas_participant::start::idempotency_key_shape;

/// How long a start command that failed for a transient reason waits before it is requeued
/// (so that a database outage is not a busy loop).
pub const REQUEUE_DELAY: Duration = Duration::from_secs(1);

/// Why a start command cannot be taken as it is: the request it names (when that can be
/// read) and the reason.
#[derive(Debug)]
struct Refusal {
    request_id: Option<Uuid>,
    reason: String,
}

/// Reads a start command: a JSON object of protocol 1 with the fields of [`StartCommand`].
fn read(body: &[u8]) -> Result<StartCommand, Refusal> {
    let value: Value = serde_json::from_slice(body).map_err(|e| Refusal {
        request_id: None,
        reason: format!("malformed start command: {e}"),
    })?;
    let request_id = value
        .get("request_id")
        .and_then(Value::as_str)
        .and_then(|id| Uuid::parse_str(id).ok());
    let refuse = |reason: String| Refusal { request_id, reason };
    match value.get("protocol").and_then(Value::as_u64) {
        Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
        Some(v) => {
            return Err(refuse(format!(
                "unsupported protocol version {v} (expected {PROTOCOL_VERSION})"
            )));
        }
        None => return Err(refuse("malformed start command: no protocol".to_owned())),
    }
    let command: StartCommand = serde_json::from_value(value)
        .map_err(|e| refuse(format!("malformed start command: {e}")))?;
    if let Some(key) = &command.idempotency_key
        && !idempotency_key_shape(key)
    {
        return Err(refuse(
            "the idempotency key must be 1 to 200 visible ASCII characters".to_owned(),
        ));
    }
    Ok(command)
}

/// The trace a transaction continues: `candidate` when it is a valid W3C `traceparent`, else
/// a new trace.
pub fn trace_or_new(candidate: Option<&str>) -> String {
    candidate
        .and_then(TraceParent::parse)
        .map(|t| t.to_string())
        .unwrap_or_else(|| {
            let span = Uuid::new_v4().as_u128() as u64;
            format!("00-{}-{span:016x}-01", Uuid::new_v4().simple())
        })
}

impl Engine {
    /// Handles start commands, as many at once as the prefetch, until `shutdown`.
    pub(super) async fn consume_starts(
        self: Arc<Self>,
        mut starts: mpsc::Receiver<Incoming>,
        shutdown: CancellationToken,
    ) {
        let limit = usize::from(self.config.prefetch.max(1));
        let mut in_flight = tokio::task::JoinSet::new();
        loop {
            while in_flight.try_join_next().is_some() {}
            if in_flight.len() >= limit {
                in_flight.join_next().await;
                continue;
            }
            let incoming = tokio::select! {
                _ = shutdown.cancelled() => break,
                m = starts.recv() => match m { Some(m) => m, None => break },
            };
            let engine = self.clone();
            // Several at once, so that the start batcher can store their starts together.
            in_flight.spawn(async move { engine.handle_start_command(incoming).await });
        }
        // Let the starts in flight finish so that their answers and acks go out.
        while in_flight.join_next().await.is_some() {}
    }

    /// Handles one start command: starts it (or finds it started), answers its `reply_to`,
    /// and settles it (see the [module](self)).
    pub async fn handle_start_command(&self, incoming: Incoming) {
        let Incoming {
            body,
            reply_to,
            ack,
        } = incoming;
        let refusal = match read(&body) {
            Err(refusal) => refusal,
            Ok(command) => match self.start_command(&command).await {
                Ok(started) => {
                    let outcome = StartOutcome::Accepted {
                        transaction_id: started.instance.id,
                        created: started.created,
                    };
                    if started.created {
                        tracing::info!(id = %started.instance.id, definition = command.definition, request = %command.request_id, "transaction started by a start command");
                    }
                    if self
                        .answer(reply_to.as_deref(), command.request_id, outcome)
                        .await
                    {
                        settle("ack", ack.ack().await);
                        metrics::counter!(START_COMMANDS, "outcome" => "accepted").increment(1);
                    } else {
                        requeue_later(ack).await;
                    }
                    return;
                }
                Err(
                    e @ (EngineError::UnknownDefinition(_)
                    | EngineError::InvalidInput(..)
                    | EngineError::Conflict(_)),
                ) => Refusal {
                    request_id: Some(command.request_id),
                    reason: e.to_string(),
                },
                Err(error) => {
                    tracing::warn!(%error, request = %command.request_id, "a start command failed; it is requeued");
                    requeue_later(ack).await;
                    return;
                }
            },
        };
        let Refusal { request_id, reason } = refusal;
        let request = request_id.map_or_else(|| "unknown".to_owned(), |id| id.to_string());
        tracing::warn!(%request, %reason, "start command refused: answered refused and dead-lettered");
        if let Some(id) = request_id {
            let outcome = StartOutcome::Refused {
                reason: reason.clone(),
            };
            if !self.answer(reply_to.as_deref(), id, outcome).await {
                requeue_later(ack).await;
                return;
            }
        }
        settle("dead-letter", ack.reject(&body, &reason).await);
        metrics::counter!(START_COMMANDS, "outcome" => "refused").increment(1);
    }

    /// Starts what `command` asks for, as an HTTP start does.
    async fn start_command(&self, command: &StartCommand) -> Result<super::Started, EngineError> {
        self.require_definition(&command.definition, command.version)
            .await?;
        let options = StartOptions {
            deadline: None,
            idempotency_key: Some(command.key()),
            traceparent: Some(trace_or_new(command.traceparent.as_deref())),
            version: command.version,
        };
        self.start_with(&command.definition, command.input.clone(), options)
            .await
    }

    /// Publishes the answer to `reply_to` (nothing without one); false when it must be tried
    /// again (the broker failed or refused it). An answer that finds no queue is lost, which
    /// is fine: its relay is gone, and a relay publishes a request again when its answer does
    /// not come.
    async fn answer(
        &self,
        reply_to: Option<&str>,
        request_id: Uuid,
        outcome: StartOutcome,
    ) -> bool {
        let Some(reply_to) = reply_to else {
            return true;
        };
        let answer = StartAnswer {
            protocol: PROTOCOL_VERSION,
            request_id,
            outcome,
        };
        match self.transport.answer_start(reply_to, &answer).await {
            Ok(true) => true,
            Ok(false) => {
                tracing::debug!(%request_id, reply_to, "no queue took a start answer");
                true
            }
            Err(error) => {
                tracing::warn!(%error, %request_id, "cannot answer a start command; it is requeued");
                false
            }
        }
    }
}

/// Requeues a start command after [`REQUEUE_DELAY`].
async fn requeue_later(ack: Box<dyn crate::transport::Ack>) {
    tokio::time::sleep(REQUEUE_DELAY).await;
    settle("requeue", ack.requeue().await);
}

/// Logs a settlement that failed: the broker redelivers the message (its channel is gone).
fn settle(what: &str, result: Result<(), crate::transport::TransportError>) {
    if let Err(error) = result {
        tracing::warn!(%error, what, "cannot settle a start command; the broker delivers it again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_command_is_read_only_when_it_is_protocol_1_with_every_field_and_a_usable_key() {
        let id = Uuid::now_v7();
        let ok = serde_json::json!({
            "protocol": 1, "request_id": id, "definition": "d", "input": {"a": 1}
        });
        let command = read(ok.to_string().as_bytes()).expect("a start command");
        assert_eq!(command.key(), id.to_string(), "the request id is the key");
        let refused = |body: &str| read(body.as_bytes()).expect_err("refused");
        assert_eq!(refused("not json").request_id, None);
        let v2 = refused(&format!(
            r#"{{"protocol":2,"request_id":"{id}","definition":"d","input":1}}"#
        ));
        assert_eq!(v2.request_id, Some(id));
        assert!(
            v2.reason.contains("unsupported protocol version 2"),
            "{}",
            v2.reason
        );
        let no_input = refused(&format!(
            r#"{{"protocol":1,"request_id":"{id}","definition":"d"}}"#
        ));
        assert!(
            no_input.reason.contains("missing field `input`"),
            "{}",
            no_input.reason
        );
        let bad_key = refused(&format!(
            r#"{{"protocol":1,"request_id":"{id}","definition":"d","input":1,"idempotency_key":"a b"}}"#
        ));
        assert!(
            bad_key.reason.contains("idempotency key"),
            "{}",
            bad_key.reason
        );
    }

    #[test]
    fn a_valid_traceparent_is_continued_and_anything_else_starts_a_new_trace() {
        let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_or_new(Some(given)), given);
        let new = trace_or_new(Some("garbage"));
        assert!(TraceParent::parse(&new).is_some(), "{new}");
        assert_ne!(trace_or_new(None), new);
    }
}
