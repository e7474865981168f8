//! Protocol conformance: a participant that speaks the wire protocol with raw AMQP and JSON
//! literals (no SDK types, no SDK declarations) against a running orchestrator. Each test
//! checks what docs/protocol.md promises for one kind of reply.

use std::time::Duration;

use anyhow::{Context, Result};
use lapin::types::AMQPValue;
use sagas::orchestrator::machine::{Event, StepStatus, attempt_traceparent};
use sagas::orchestrator::{Definition, Registry, RetryPolicy, Status};
use sagas::participant::Operation;
use serde_json::{Value, json};

use crate::helpers::{
    self, RawParticipant, Received, TestEnv, close_broker, spawn_app, wait_event, wait_status,
};

const RAW: &str = "raw";

/// Fast policies so that timeouts and retries fit in a test.
fn quick() -> RetryPolicy {
    RetryPolicy::exponential(3, Duration::from_millis(50), Duration::from_millis(100))
}

/// A saga of `steps` steps on the raw participant; step `i` sends `{"n": i, "prev": output of i-1}`.
fn saga(steps: &[&'static str], timeout: Duration, in_progress: Duration) -> Definition {
    let mut def = Definition::saga::<Value>("conformance_saga", 1);
    let mut prev: Option<&'static str> = None;
    for (i, name) in steps.iter().enumerate() {
        def = def.step(*name, RAW, move |s| {
            s.command(move |_, out| json!({"n": i, "prev": prev.and_then(|p| out.get(p)).cloned()}))
                .retry(quick())
                .finish_retry(quick())
                .timeout(timeout)
                .in_progress_timeout(in_progress)
        });
        prev = Some(name);
    }
    def.build().expect("valid definition")
}

fn tcc(steps: &[&'static str]) -> Definition {
    let mut def = Definition::tcc::<Value>("conformance_tcc", 1);
    for (i, name) in steps.iter().enumerate() {
        def = def.step(*name, RAW, move |s| {
            s.command(move |_, _| json!({"n": i}))
                .retry(quick())
                .finish_retry(quick())
                .timeout(Duration::from_secs(10))
        });
    }
    def.build().expect("valid definition")
}

struct Setup {
    env: TestEnv,
    app: helpers::App,
    raw: RawParticipant,
}

impl Setup {
    async fn new(def: Definition) -> Result<Setup> {
        let env = TestEnv::new().await?;
        // The participant declares first, exactly as documented; the orchestrator's own
        // declarations must then match (or RabbitMQ refuses them).
        let raw = RawParticipant::start(&env, RAW).await?;
        let app = spawn_app(&env, Registry::new().with(def)?).await?;
        Ok(Setup { env, app, raw })
    }

    async fn start(&self, name: &str) -> Result<uuid::Uuid> {
        Ok(self.app.engine.start(name, json!({})).await?.id)
    }

    async fn events(&self, id: uuid::Uuid) -> Result<Vec<Event>> {
        Ok(self
            .app
            .engine
            .events(id)
            .await?
            .into_iter()
            .map(|e| e.event)
            .collect())
    }

    async fn stop(self) {
        self.raw.close().await;
        self.app.stop().await;
        self.env.cleanup().await;
    }
}

fn header<'a>(r: &'a Received, name: &str) -> Option<&'a AMQPValue> {
    r.properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name))
}

fn long_string(value: Option<&AMQPValue>) -> Option<String> {
    match value {
        Some(AMQPValue::LongString(s)) => Some(s.to_string()),
        _ => None,
    }
}

fn kinds(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(Event::kind).collect()
}

fn ignored_reasons(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::ReplyIgnored { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn succeeded_replies_complete_the_saga_and_commands_carry_the_documented_properties()
-> Result<()> {
    let mut s = Setup::new(saga(
        &["reserve", "charge"],
        Duration::from_secs(10),
        Duration::from_secs(60),
    ))
    .await?;
    let id = s.start("conformance_saga").await?;

    let first = s.raw.expect("reserve", "action", 1).await?;
    // Body.
    assert_eq!(first.body["protocol"], 1);
    assert_eq!(first.body["transaction_id"], id.to_string());
    assert_eq!(first.body["definition"], "conformance_saga");
    assert_eq!(first.body["payload"], json!({"n": 0, "prev": null}));
    assert!(first.body.get("output").is_none(), "{}", first.body);
    let deadline = first.field("deadline");
    chrono::DateTime::parse_from_rfc3339(deadline)?;
    // Properties and headers.
    let p = &first.properties;
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(p.delivery_mode(), &Some(2));
    assert_eq!(
        p.message_id().as_ref().unwrap().as_str(),
        format!("{id}:reserve:action:1")
    );
    assert_eq!(
        p.correlation_id().as_ref().unwrap().as_str(),
        id.to_string()
    );
    assert_eq!(
        p.reply_to().as_ref().unwrap().as_str(),
        s.env.topology.replies_queue()
    );
    assert_eq!(
        long_string(header(&first, "x-saga-transaction")),
        Some(id.to_string())
    );
    assert_eq!(
        long_string(header(&first, "x-saga-step")).as_deref(),
        Some("reserve")
    );
    assert_eq!(
        long_string(header(&first, "x-saga-operation")).as_deref(),
        Some("action")
    );
    assert_eq!(
        header(&first, "x-saga-attempt"),
        Some(&AMQPValue::LongLongInt(1))
    );
    let header_deadline = long_string(header(&first, "x-saga-deadline")).unwrap();
    assert!(header_deadline.ends_with("+00:00"), "{header_deadline}");
    assert_eq!(
        chrono::DateTime::parse_from_rfc3339(&header_deadline)?,
        chrono::DateTime::parse_from_rfc3339(deadline)?
    );

    s.raw
        .reply(
            &first,
            json!({"status": "succeeded", "output": {"hold": "h-1"}}),
        )
        .await?;
    // The output of a step reaches the next step's command.
    let second = s.raw.expect("charge", "action", 1).await?;
    assert_eq!(
        second.body["payload"],
        json!({"n": 1, "prev": {"hold": "h-1"}})
    );
    // `output` may be omitted: it defaults to null.
    s.raw.reply(&second, json!({"status": "succeeded"})).await?;

    let done = s.env.wait_terminal(id).await?;
    assert_eq!(done.status, Status::Completed);
    assert_eq!(done.steps[0].output, Some(json!({"hold": "h-1"})));
    // A null output and no output look the same once stored (see docs/protocol.md).
    assert_eq!(
        done.steps[1].output.clone().unwrap_or_default(),
        Value::Null
    );
    assert_eq!(
        kinds(&s.events(id).await?),
        [
            "started",
            "command_prepared",
            "dispatched",
            "replied",
            "command_prepared",
            "dispatched",
            "replied",
            "finished"
        ]
    );
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_action_compensates_the_earlier_steps_with_their_payload_and_output() -> Result<()>
{
    let mut s = Setup::new(saga(
        &["reserve", "charge"],
        Duration::from_secs(10),
        Duration::from_secs(60),
    ))
    .await?;
    let id = s.start("conformance_saga").await?;
    let reserve = s.raw.expect("reserve", "action", 1).await?;
    s.raw
        .reply(
            &reserve,
            json!({"status": "succeeded", "output": {"hold": "h-1"}}),
        )
        .await?;
    let charge = s.raw.expect("charge", "action", 1).await?;
    s.raw
        .reply(
            &charge,
            json!({"status": "failed", "reason": "card declined"}),
        )
        .await?;

    // Only the step that took effect is compensated; the failed one did not take effect.
    let undo = s.raw.expect("reserve", "compensate", 1).await?;
    assert_eq!(undo.body["payload"], reserve.body["payload"]);
    assert_eq!(undo.body["output"], json!({"hold": "h-1"}));
    s.raw.reply(&undo, json!({"status": "succeeded"})).await?;

    let done = s.env.wait_terminal(id).await?;
    assert_eq!(done.status, Status::Compensated);
    assert_eq!(done.steps[0].status, StepStatus::Compensated);
    assert_eq!(done.steps[1].status, StepStatus::Failed);
    assert!(
        done.failure
            .as_deref()
            .unwrap_or("")
            .contains("card declined"),
        "{done:?}"
    );
    s.raw.expect_silence(Duration::from_millis(300)).await?;
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_reply_sends_the_next_attempt_no_sooner_than_its_retry_after_hint() -> Result<()> {
    let mut s = Setup::new(saga(
        &["reserve"],
        Duration::from_secs(10),
        Duration::from_secs(60),
    ))
    .await?;
    let id = s.start("conformance_saga").await?;
    let first = s.raw.expect("reserve", "action", 1).await?;
    let replied_at = tokio::time::Instant::now();
    s.raw
        .reply(
            &first,
            json!({"status": "retry", "reason": "rate limited", "retry_after_ms": 800}),
        )
        .await?;
    // The step's own backoff is 50 ms; the hint is longer and wins.
    let second = s.raw.expect("reserve", "action", 2).await?;
    let waited = second.at - replied_at;
    assert!(waited >= Duration::from_millis(750), "{waited:?}");
    assert_eq!(second.body["payload"], first.body["payload"]);
    s.raw.reply(&second, json!({"status": "succeeded"})).await?;

    assert_eq!(s.env.wait_terminal(id).await?.status, Status::Completed);
    let events = s.app.engine.events(id).await?;
    let replied = events
        .iter()
        .find(|e| matches!(e.event, Event::Replied { attempt: 1, .. }))
        .expect("the retry reply is logged");
    let scheduled = events
        .iter()
        .find_map(|e| match e.event {
            Event::RetryScheduled { attempt: 2, at, .. } => Some(at),
            _ => None,
        })
        .expect("the next attempt is scheduled");
    assert!(scheduled - replied.at >= chrono::Duration::milliseconds(800));
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_progress_reply_stops_resending_until_the_final_reply_arrives() -> Result<()> {
    // Without `in_progress`, 300 ms of silence would time the attempt out and resend it.
    let mut s = Setup::new(saga(
        &["export"],
        Duration::from_millis(300),
        Duration::from_secs(30),
    ))
    .await?;
    let id = s.start("conformance_saga").await?;
    let first = s.raw.expect("export", "action", 1).await?;
    s.raw
        .reply(&first, json!({"status": "in_progress", "note": "job 42"}))
        .await?;
    wait_event(&s.app, id, |e| e.event.kind() == "extended").await?;
    // A second in_progress for the same attempt is not a first answer: ignored.
    s.raw
        .reply(&first, json!({"status": "in_progress"}))
        .await?;
    s.raw.expect_silence(Duration::from_millis(1_200)).await?;
    s.raw
        .reply(
            &first,
            json!({"status": "succeeded", "output": {"rows": 3}}),
        )
        .await?;

    let done = s.env.wait_terminal(id).await?;
    assert_eq!(done.status, Status::Completed);
    assert_eq!(done.steps[0].output, Some(json!({"rows": 3})));
    let events = s.events(id).await?;
    let k = kinds(&events);
    assert_eq!(
        k.iter().filter(|k| **k == "dispatched").count(),
        1,
        "sent once: {k:?}"
    );
    assert!(!k.contains(&"timed_out"), "{k:?}");
    assert_eq!(ignored_reasons(&events).len(), 1, "{events:#?}");
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_in_progress_longer_than_its_in_progress_timeout_times_out_and_is_resent()
-> Result<()> {
    let mut s = Setup::new(saga(
        &["export"],
        Duration::from_millis(300),
        Duration::from_millis(600),
    ))
    .await?;
    let id = s.start("conformance_saga").await?;
    let first = s.raw.expect("export", "action", 1).await?;
    s.raw
        .reply(&first, json!({"status": "in_progress"}))
        .await?;
    let second = s.raw.expect("export", "action", 2).await?;
    assert!(second.at - first.at >= Duration::from_millis(600));
    s.raw.reply(&second, json!({"status": "succeeded"})).await?;

    assert_eq!(s.env.wait_terminal(id).await?.status, Status::Completed);
    let k = kinds(&s.events(id).await?);
    for kind in ["extended", "timed_out", "retry_scheduled"] {
        assert!(k.contains(&kind), "{kind} missing: {k:?}");
    }
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_replies_are_logged_as_ignored_and_change_nothing() -> Result<()> {
    let mut s = Setup::new(saga(
        &["reserve"],
        Duration::from_secs(10),
        Duration::from_secs(60),
    ))
    .await?;
    let id = s.start("conformance_saga").await?;
    let first = s.raw.expect("reserve", "action", 1).await?;
    s.raw
        .reply(&first, json!({"status": "succeeded", "output": {"v": 1}}))
        .await?;
    s.env.wait_terminal(id).await?;
    // The same reply again, and a contradicting one: both too late to matter.
    s.raw
        .reply(&first, json!({"status": "succeeded", "output": {"v": 1}}))
        .await?;
    s.raw
        .reply(
            &first,
            json!({"status": "failed", "reason": "changed my mind"}),
        )
        .await?;
    let events = loop {
        let events = s.events(id).await?;
        if ignored_reasons(&events).len() == 2 {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let done = s.env.wait_terminal(id).await?;
    assert_eq!(done.status, Status::Completed);
    assert_eq!(done.steps[0].output, Some(json!({"v": 1})));
    assert_eq!(
        kinds(&events).iter().filter(|k| **k == "replied").count(),
        1
    );
    s.raw.expect_silence(Duration::from_millis(300)).await?;
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_attempts_definite_reply_is_accepted_but_its_retry_is_ignored() -> Result<()> {
    let mut s = Setup::new(saga(
        &["reserve"],
        Duration::from_millis(300),
        Duration::from_secs(60),
    ))
    .await?;
    let id = s.start("conformance_saga").await?;
    let first = s.raw.expect("reserve", "action", 1).await?;
    // Silence: the attempt times out and attempt 2 goes out.
    let second = s.raw.expect("reserve", "action", 2).await?;
    // Out of order: attempt 1's transient error says nothing about attempt 2 ...
    s.raw
        .reply(&first, json!({"status": "retry", "reason": "slow disk"}))
        .await?;
    wait_event(&s.app, id, |e| e.event.kind() == "reply_ignored").await?;
    // ... but its definite answer is the answer for every attempt (the barrier's promise).
    s.raw
        .reply(
            &first,
            json!({"status": "succeeded", "output": {"late": true}}),
        )
        .await?;
    let done = s.env.wait_terminal(id).await?;
    assert_eq!(done.status, Status::Completed);
    assert_eq!(done.steps[0].output, Some(json!({"late": true})));
    // Attempt 2's reply, when it comes, is a duplicate.
    s.raw
        .reply(
            &second,
            json!({"status": "succeeded", "output": {"late": true}}),
        )
        .await?;
    wait_event(&s.app, id, |e| {
        matches!(&e.event, Event::ReplyIgnored { attempt: 2, .. })
    })
    .await?;
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_with_an_unknown_protocol_version_is_dead_lettered_with_its_reason() -> Result<()> {
    use futures_util::StreamExt;
    use lapin::options::BasicConsumeOptions;
    use std::sync::atomic::Ordering;

    let mut s = Setup::new(saga(
        &["reserve"],
        Duration::from_secs(10),
        Duration::from_secs(60),
    ))
    .await?;
    let id = s.start("conformance_saga").await?;
    let first = s.raw.expect("reserve", "action", 1).await?;
    let mut future = RawParticipant::reply_body(&first, json!({"status": "succeeded"}));
    future["protocol"] = json!(2);
    let body = serde_json::to_vec(&future)?;
    s.raw.reply_raw(&first, &body).await?;

    let conn = helpers::connect_broker().await?;
    let ch = conn.create_channel().await?;
    let mut dead = ch
        .basic_consume(
            s.env.topology.dead_letter_queue().into(),
            "conformance".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await?;
    let d = tokio::time::timeout(Duration::from_secs(30), dead.next())
        .await?
        .expect("dead-letter consumer open")?;
    assert_eq!(d.data, body, "the dead letter keeps the body");
    let headers = d.properties.headers().clone().unwrap_or_default();
    let get = |name: &str| match headers.inner().get(name) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(get("x-sagas-reason"), "unknown protocol version 2");
    assert_eq!(get("x-sagas-queue"), s.env.topology.replies_queue());
    assert_eq!(
        s.app.engine.stats().dead_lettered.load(Ordering::Relaxed),
        1
    );

    // Nothing was accepted: the step still waits; a version-1 reply then completes it.
    let events = s.events(id).await?;
    assert!(!kinds(&events).contains(&"replied"), "{events:#?}");
    s.raw.reply(&first, json!({"status": "succeeded"})).await?;
    assert_eq!(s.env.wait_terminal(id).await?.status, Status::Completed);
    close_broker(&conn).await;
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_compensation_leaves_the_instance_stuck_for_an_operator() -> Result<()> {
    let mut s = Setup::new(saga(
        &["reserve", "charge"],
        Duration::from_secs(10),
        Duration::from_secs(60),
    ))
    .await?;
    let id = s.start("conformance_saga").await?;
    let reserve = s.raw.expect("reserve", "action", 1).await?;
    s.raw
        .reply(&reserve, json!({"status": "succeeded"}))
        .await?;
    let charge = s.raw.expect("charge", "action", 1).await?;
    s.raw
        .reply(
            &charge,
            json!({"status": "failed", "reason": "card declined"}),
        )
        .await?;
    let undo = s.raw.expect("reserve", "compensate", 1).await?;
    s.raw
        .reply(
            &undo,
            json!({"status": "failed", "reason": "hold already shipped"}),
        )
        .await?;

    let stuck = wait_status(&s.env, id, Status::Stuck).await?;
    assert!(stuck.steps[0].stuck, "{stuck:?}");
    let events = s.events(id).await?;
    assert!(
        events.iter().any(|e| matches!(e,
            Event::Stuck { step: 0, operation: Operation::Compensate, reason }
                if reason.contains("hold already shipped"))),
        "{events:#?}"
    );
    // Not retried automatically: the refusal is deterministic.
    s.raw.expect_silence(Duration::from_millis(500)).await?;
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcc_confirms_carry_the_try_output_and_a_failed_confirm_is_stuck() -> Result<()> {
    let mut s = Setup::new(tcc(&["debit", "credit"])).await?;
    let id = s.start("conformance_tcc").await?;
    let mut tries = [s.raw.next().await?, s.raw.next().await?];
    tries.sort_by_key(|r| r.field("step").to_owned());
    for t in &tries {
        assert_eq!(t.field("operation"), "try");
        let step = t.field("step").to_owned();
        s.raw
            .reply(t, json!({"status": "succeeded", "output": {"hold": step}}))
            .await?;
    }
    let mut confirms = [s.raw.next().await?, s.raw.next().await?];
    confirms.sort_by_key(|r| r.field("step").to_owned());
    for c in &confirms {
        assert_eq!(c.field("operation"), "confirm");
        assert_eq!(c.body["output"], json!({"hold": c.field("step")}));
    }
    // credit confirms; debit refuses. Replies of different steps may be committed in either
    // order (concurrent batches; one decided on a stale cached state is decided again), so
    // credit's is in the log before debit's is sent.
    s.raw
        .reply(&confirms[0], json!({"status": "succeeded"}))
        .await?;
    wait_event(&s.app, id, |e| {
        matches!(
            e.event,
            Event::Replied {
                step: 1,
                operation: Operation::Confirm,
                ..
            }
        )
    })
    .await?;
    s.raw
        .reply(
            &confirms[1],
            json!({"status": "failed", "reason": "ledger closed"}),
        )
        .await?;
    let stuck = wait_status(&s.env, id, Status::Stuck).await?;
    // Steps in definition order: debit, credit.
    assert!(stuck.steps[0].stuck, "{stuck:?}");
    assert_eq!(stuck.steps[1].status, StepStatus::Confirmed, "{stuck:?}");
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_try_cancels_only_the_tries_that_may_have_taken_effect() -> Result<()> {
    let mut s = Setup::new(tcc(&["debit", "credit"])).await?;
    let id = s.start("conformance_tcc").await?;
    let mut tries = [s.raw.next().await?, s.raw.next().await?];
    tries.sort_by_key(|r| r.field("step").to_owned());
    let (credit, debit) = (&tries[0], &tries[1]);
    s.raw
        .reply(
            credit,
            json!({"status": "succeeded", "output": {"pending": 5}}),
        )
        .await?;
    // Had debit's failure come first, credit's try would be cancelled without its output
    // (outcome unknown) and the late succeeded reply ignored.
    wait_event(&s.app, id, |e| e.event.kind() == "replied").await?;
    s.raw
        .reply(
            debit,
            json!({"status": "failed", "reason": "insufficient funds"}),
        )
        .await?;
    let cancel = s.raw.expect("credit", "cancel", 1).await?;
    assert_eq!(cancel.body["output"], json!({"pending": 5}));
    s.raw.reply(&cancel, json!({"status": "succeeded"})).await?;
    let done = s.env.wait_terminal(id).await?;
    assert_eq!(done.status, Status::Compensated);
    assert_eq!(done.steps[0].status, StepStatus::Failed);
    assert_eq!(done.steps[1].status, StepStatus::Cancelled);
    s.raw.expect_silence(Duration::from_millis(300)).await?;
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_context_of_the_starting_request_reaches_every_command() -> Result<()> {
    let mut s = Setup::new(saga(
        &["reserve", "charge"],
        Duration::from_secs(10),
        Duration::from_secs(60),
    ))
    .await?;
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let res = reqwest::Client::new()
        .post(s.app.url("/v1/sagas/conformance_saga"))
        .header("traceparent", trace)
        .json(&json!({"input": {}}))
        .send()
        .await?;
    assert_eq!(res.status(), 202);
    let id: uuid::Uuid = res.json::<serde_json::Value>().await?["id"]
        .as_str()
        .context("id")?
        .parse()?;
    // The request's trace, with each attempt's own span as parent (docs/protocol.md).
    let expected = |step, attempt| {
        attempt_traceparent(Some(trace), id, step, Operation::Action, attempt).unwrap()
    };
    let first = s.raw.expect("reserve", "action", 1).await?;
    assert_eq!(first.field("traceparent"), expected(0, 1));
    assert!(expected(0, 1).starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
    assert_eq!(
        long_string(header(&first, "traceparent")),
        Some(expected(0, 1))
    );
    s.raw
        .reply(&first, json!({"status": "succeeded", "output": 1}))
        .await?;
    let second = s.raw.expect("charge", "action", 1).await?;
    assert_eq!(
        long_string(header(&second, "traceparent")),
        Some(expected(1, 1))
    );
    s.raw
        .reply(&second, json!({"status": "succeeded", "output": 2}))
        .await?;
    s.stop().await;
    Ok(())
}
