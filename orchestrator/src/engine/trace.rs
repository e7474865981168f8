//! The span of every step attempt that a committed transition ended, exported over OTLP when
//! the process exports traces (`sagas_participant::telemetry`): from the attempt's dispatch to
//! its reply or timeout, a child of the transaction's trace, with the id its command named as
//! parent (`machine::attempt_traceparent`).

use std::time::SystemTime;

use opentelemetry::KeyValue;
use sagas_participant::protocol::TraceParent;
use sagas_participant::telemetry::{self, Finished};

use crate::machine::{Effect, Transition, attempt_span_id};

/// Exports the spans of the attempts `t` ended.
pub(super) fn attempts(t: &Transition) {
    // Per committed transition: nothing to parse or build unless this process exports.
    if !telemetry::exporting() {
        return;
    }
    let inst = &t.instance;
    let Some(root) = inst.traceparent.as_deref().and_then(TraceParent::parse) else {
        return;
    };
    let end = SystemTime::now();
    for effect in &t.effects {
        let Effect::AttemptEnded {
            step,
            operation,
            attempt,
            sent_at,
            outcome,
        } = effect
        else {
            continue;
        };
        let Some(plan) = inst.plan.steps.get(*step) else {
            continue;
        };
        let error = match *outcome {
            "failed" | "timed_out" => Some(
                inst.steps[*step]
                    .last_error
                    .clone()
                    .unwrap_or_else(|| outcome.to_string()),
            ),
            _ => None,
        };
        telemetry::export(Finished {
            name: format!("{} {}", plan.name, operation.as_str()),
            parent: &root,
            span_id: attempt_span_id(inst.id, *step, *operation, *attempt),
            start: sent_at.map(SystemTime::from).unwrap_or(end),
            end,
            attributes: vec![
                KeyValue::new("sagas.transaction_id", inst.id.to_string()),
                KeyValue::new("sagas.definition", inst.plan.name.clone()),
                KeyValue::new("sagas.step", plan.name.clone()),
                KeyValue::new("sagas.participant", plan.participant.clone()),
                KeyValue::new("sagas.operation", operation.as_str()),
                KeyValue::new("sagas.attempt", i64::from(*attempt)),
                KeyValue::new("sagas.outcome", *outcome),
            ],
            error,
        });
    }
}
