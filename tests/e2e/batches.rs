//! Batches on the wire (docs/protocol.md, "Batches"), on the orchestrator's side, against a real
//! RabbitMQ: commands for one participant published as one message (by default only to
//! participants whose replies announce batches), reply batches handed to the engine reply by
//! reply and settled as one message.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use sagas::orchestrator::store::OutboxMessage;
use sagas::orchestrator::transport::{AmqpTransport, CommandBatch, Incoming, Transport};
use sagas::orchestrator::{Definition, Registry, Status};
use sagas::participant::protocol::{BATCH_CONTENT_TYPE, BATCH_HEADER, join_batch};
use sagas::participant::{Command, Handler, HandlerError, Operation};
use serde_json::{Value, json};
use sqlx::PgConnection;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{
    self, RawParticipant, Received, TestEnv, close_broker, connect_broker, spawn_app,
    spawn_participant, spawn_participant_with,
};

fn command(step: &str) -> Command {
    Command {
        protocol: 1,
        transaction_id: Uuid::now_v7(),
        definition: "batches".into(),
        step: step.into(),
        operation: Operation::Action,
        attempt: 1,
        payload: json!({ "step": step }),
        output: None,
        deadline: None,
        traceparent: None,
    }
}

fn outbox(id: i64, participant: &str, step: &str) -> OutboxMessage {
    OutboxMessage {
        id,
        participant: participant.into(),
        command: command(step),
    }
}

fn reply_json(step: &str) -> serde_json::Value {
    json!({
        "protocol": 1,
        "transaction_id": Uuid::now_v7(),
        "step": step,
        "operation": "action",
        "attempt": 1,
        "outcome": { "status": "succeeded", "output": null }
    })
}

/// Reads `n` messages from `queue` (acking them), with their bodies and properties.
async fn drain(
    ch: &lapin::Channel,
    queue: &str,
    n: usize,
) -> Result<Vec<(Vec<u8>, BasicProperties)>> {
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            format!("drain-{}", Uuid::new_v4().simple()).as_str().into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let mut got = Vec::new();
    while got.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .with_context(|| format!("only {} of {n} messages in {queue}", got.len()))?
            .context("consumer closed")??;
        got.push((d.data, d.properties));
    }
    Ok(got)
}

fn header(p: &BasicProperties, name: &str) -> Option<AMQPValue> {
    p.headers().as_ref()?.inner().get(name).cloned()
}

fn content_type(p: &BasicProperties) -> String {
    p.content_type()
        .as_ref()
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Publishes a raw message to the replies queue, as a participant would.
async fn publish_reply(env: &TestEnv, body: &[u8], batch: bool) -> Result<()> {
    publish_reply_with(env, body, batch, FieldTable::default()).await
}

/// [`publish_reply`] with `headers`.
async fn publish_reply_with(
    env: &TestEnv,
    body: &[u8],
    batch: bool,
    headers: FieldTable,
) -> Result<()> {
    let conn = connect_broker().await?;
    let ch = conn.create_channel().await?;
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    let properties = if batch {
        properties.with_content_type(BATCH_CONTENT_TYPE.into())
    } else {
        properties.with_content_type("application/json".into())
    };
    ch.basic_publish(
        "".into(),
        env.topology.replies_queue().as_str().into(),
        BasicPublishOptions::default(),
        body,
        properties,
    )
    .await?
    .await?;
    close_broker(&conn).await;
    Ok(())
}

async fn next(rx: &mut mpsc::Receiver<Incoming>) -> Result<Incoming> {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .context("no reply within 30 s")?
        .context("reply stream ended")
}

/// Ready messages in `queue` (unacked ones are not counted).
async fn ready(ch: &lapin::Channel, queue: &str) -> Result<u32> {
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(q.message_count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_for_one_participant_travel_together_up_to_the_batch_limit() -> Result<()> {
    let env = TestEnv::new().await?;
    let transport = AmqpTransport::new(sagas::orchestrator::transport::AmqpConfig {
        command_batch: CommandBatch::Forced(2),
        ..env.amqp_config()
    });
    transport
        .declare(&["accounts".into(), "orders".into()])
        .await?;
    let messages = [
        outbox(1, "accounts", "a1"),
        outbox(2, "orders", "o1"),
        outbox(3, "accounts", "a2"),
        outbox(4, "accounts", "a3"),
        outbox(5, "orders", "o2"),
    ];
    transport.publish(&messages).await?;

    let conn = connect_broker().await?;
    let ch = conn.create_channel().await?;
    let accounts = drain(&ch, &env.topology.participant_queue("accounts"), 2).await?;
    let orders = drain(&ch, &env.topology.participant_queue("orders"), 1).await?;

    let elements = |body: &[u8]| -> Vec<Command> { serde_json::from_slice(body).unwrap() };
    let (body, p) = &accounts[0];
    assert_eq!(content_type(p), BATCH_CONTENT_TYPE);
    assert_eq!(header(p, BATCH_HEADER), Some(AMQPValue::LongLongInt(2)));
    assert_eq!(
        p.message_id().as_ref().map(|m| m.to_string()),
        Some(format!("batch:{}:2", messages[0].command.message_id()))
    );
    assert_eq!(
        p.reply_to().as_ref().map(|r| r.to_string()),
        Some(env.topology.replies_queue())
    );
    assert_eq!(p.delivery_mode(), &Some(2));
    assert_eq!(
        elements(body),
        [messages[0].command.clone(), messages[2].command.clone()]
    );
    // The third command for the same participant goes alone, as a plain command.
    let (body, p) = &accounts[1];
    assert_eq!(content_type(p), "application/json");
    assert_eq!(
        serde_json::from_slice::<Command>(body)?,
        messages[3].command
    );
    assert!(header(p, "x-saga-transaction").is_some());
    let (body, p) = &orders[0];
    assert_eq!(content_type(p), BATCH_CONTENT_TYPE);
    assert_eq!(
        elements(body),
        [messages[1].command.clone(), messages[4].command.clone()]
    );

    close_broker(&conn).await;
    transport.close().await;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_batch_reaches_the_engine_reply_by_reply_and_is_acked_once_all_are_settled()
-> Result<()> {
    let env = TestEnv::new().await?;
    let transport = AmqpTransport::new(env.amqp_config());
    transport.declare(&[]).await?;
    let mut rx = transport.subscribe(16).await?;
    let (first, third) = (reply_json("one"), reply_json("three"));
    let first_bytes = serde_json::to_vec(&first)?;
    let third_bytes = serde_json::to_vec(&third)?;
    let body = join_batch([&first_bytes[..], b"\"garbage\"", &third_bytes[..]]);
    publish_reply(&env, &body, true).await?;

    let (a, b, c) = (
        next(&mut rx).await?,
        next(&mut rx).await?,
        next(&mut rx).await?,
    );
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&a.body)?, first);
    assert_eq!(b.body, b"\"garbage\"");
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&c.body)?, third);
    a.ack.ack().await?;
    b.ack.reject(&b.body, "malformed reply: garbage").await?;
    c.ack.ack().await?;

    let conn = connect_broker().await?;
    let ch = conn.create_channel().await?;
    let dead = drain(&ch, &env.topology.dead_letter_queue(), 1).await?;
    assert_eq!(
        dead[0].0, b"\"garbage\"",
        "only the bad element is dead-lettered"
    );
    assert_eq!(
        header(&dead[0].1, "x-sagas-reason"),
        Some(AMQPValue::LongString("malformed reply: garbage".into()))
    );
    // Once the consumer is gone an unacked message would be ready again: it was acked.
    transport.close().await;
    drop(rx);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(ready(&ch, &env.topology.replies_queue()).await?, 0);

    close_broker(&conn).await;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_batch_with_one_reply_to_retry_comes_back_whole() -> Result<()> {
    let env = TestEnv::new().await?;
    let transport = AmqpTransport::new(env.amqp_config());
    transport.declare(&[]).await?;
    let mut rx = transport.subscribe(16).await?;
    let (first, second) = (reply_json("one"), reply_json("two"));
    let body = join_batch([
        &serde_json::to_vec(&first)?[..],
        &serde_json::to_vec(&second)?[..],
    ]);
    publish_reply(&env, &body, true).await?;

    let (a, b) = (next(&mut rx).await?, next(&mut rx).await?);
    // The requeue is settled first: the delivery is requeued only when the last part settles.
    b.ack.requeue().await?;
    a.ack.ack().await?;
    let (a, b) = (next(&mut rx).await?, next(&mut rx).await?);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&a.body)?, first);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&b.body)?,
        second
    );
    a.ack.ack().await?;
    b.ack.ack().await?;

    transport.close().await;
    drop(rx);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let conn = connect_broker().await?;
    let ch = conn.create_channel().await?;
    assert_eq!(ready(&ch, &env.topology.replies_queue()).await?, 0);
    close_broker(&conn).await;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_declared_a_batch_that_is_not_one_is_dead_lettered_whole() -> Result<()> {
    let env = TestEnv::new().await?;
    let transport = AmqpTransport::new(env.amqp_config());
    transport.declare(&[]).await?;
    let mut rx = transport.subscribe(16).await?;
    let body = serde_json::to_vec(&reply_json("one"))?;
    publish_reply(&env, &body, true).await?;
    // A well-formed single reply published after it still arrives.
    let plain = reply_json("two");
    publish_reply(&env, &serde_json::to_vec(&plain)?, false).await?;

    let conn = connect_broker().await?;
    let ch = conn.create_channel().await?;
    let dead = drain(&ch, &env.topology.dead_letter_queue(), 1).await?;
    assert_eq!(dead[0].0, body);
    match header(&dead[0].1, "x-sagas-reason") {
        Some(AMQPValue::LongString(reason)) => assert!(
            reason.to_string().starts_with("malformed reply batch: "),
            "{reason}"
        ),
        other => panic!("reason: {other:?}"),
    }
    let only = next(&mut rx).await?;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&only.body)?,
        plain
    );
    only.ack.ack().await?;

    close_broker(&conn).await;
    transport.close().await;
    env.cleanup().await;
    Ok(())
}

/// The headers of a participant's announcement, written as a participant in another language
/// would.
fn announcing(participant: &str, accepts: i64) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-saga-participant".into(),
        AMQPValue::LongString(participant.into()),
    );
    headers.insert(
        "x-saga-accepts-batch".into(),
        AMQPValue::LongLongInt(accepts),
    );
    headers
}

/// Reads `n` messages from `queue` and says, for each, whether it was a batch and of how many.
async fn shapes(ch: &lapin::Channel, queue: &str, n: usize) -> Result<Vec<usize>> {
    Ok(drain(ch, queue, n)
        .await?
        .iter()
        .map(|(body, p)| {
            if content_type(p) == BATCH_CONTENT_TYPE {
                serde_json::from_slice::<Vec<Value>>(body).map_or(0, |v| v.len())
            } else {
                1
            }
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_participant_gets_batches_once_a_reply_announced_them_and_not_after_one_that_did_not()
-> Result<()> {
    let env = TestEnv::new().await?;
    let transport = AmqpTransport::new(env.amqp_config());
    transport.declare(&["accounts".into()]).await?;
    let mut rx = transport.subscribe(16).await?;
    let conn = connect_broker().await?;
    let ch = conn.create_channel().await?;
    let queue = env.topology.participant_queue("accounts");
    let three = |from: i64| {
        [
            outbox(from, "accounts", "debit"),
            outbox(from + 1, "accounts", "debit"),
            outbox(from + 2, "accounts", "debit"),
        ]
    };

    // Nothing heard yet: every command alone.
    transport.publish(&three(1)).await?;
    assert_eq!(shapes(&ch, &queue, 3).await?, [1, 1, 1]);

    // A reply announces batches of up to 2: that participant's commands now share messages.
    let reply = serde_json::to_vec(&reply_json("debit"))?;
    publish_reply_with(&env, &reply, false, announcing("accounts", 2)).await?;
    next(&mut rx).await?.ack.ack().await?;
    transport.publish(&three(4)).await?;
    assert_eq!(shapes(&ch, &queue, 2).await?, [2, 1]);

    // A reply for one of its steps without the announcement (another replica, an older version):
    // every command alone again, although the other replica still announces.
    publish_reply(&env, &reply, false).await?;
    next(&mut rx).await?.ack.ack().await?;
    publish_reply_with(&env, &reply, false, announcing("accounts", 2)).await?;
    next(&mut rx).await?.ack.ack().await?;
    transport.publish(&three(7)).await?;
    assert_eq!(shapes(&ch, &queue, 3).await?, [1, 1, 1]);

    close_broker(&conn).await;
    transport.close().await;
    env.cleanup().await;
    Ok(())
}

/// Answers every command at once with its step's name.
struct Echo;

#[async_trait]
impl Handler for Echo {
    async fn handle(&self, cmd: &Command, _: &mut PgConnection) -> Result<Value, HandlerError> {
        Ok(json!({ "step": cmd.step }))
    }
}

/// Two steps: `reserve` on `accounts` (the reference runtime, announcing batches), then
/// `notify` on `second`.
fn two_participants(second: &str) -> Result<Registry> {
    let def = Definition::saga::<Value>("announced", 1)
        .step("reserve", "accounts", |s| s.command(|_, _| json!({})))
        .step("notify", second, |s| s.command(|_, _| json!({})))
        .build()?;
    Ok(Registry::new().with(def)?)
}

/// Runs one saga to its end (so that the orchestrator has heard every participant), then `n`
/// started at once, many of whose commands leave together; waits until all are completed.
async fn run_sagas(env: &TestEnv, app: &helpers::App, n: usize) -> Result<()> {
    let first = app.engine.start("announced", json!({})).await?.id;
    assert_eq!(env.wait_terminal(first).await?.status, Status::Completed);
    let started = futures_util::future::try_join_all(
        (0..n).map(|_| app.engine.start("announced", json!({}))),
    )
    .await?;
    for instance in started {
        let done = env.wait_terminal(instance.id).await?;
        assert_eq!(done.status, Status::Completed, "{}", done.id);
    }
    Ok(())
}

/// No message dead-lettered anywhere: none in the dead-letter queue, no reply by the engine.
async fn nothing_dead_lettered(env: &TestEnv, app: &helpers::App) -> Result<()> {
    let conn = connect_broker().await?;
    let ch = conn.create_channel().await?;
    assert_eq!(ready(&ch, &env.topology.dead_letter_queue()).await?, 0);
    close_broker(&conn).await;
    assert_eq!(app.engine.stats().dead_lettered.load(Ordering::Relaxed), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_participant_that_does_not_announce_batches_gets_every_command_alone_while_one_that_does_gets_batches()
-> Result<()> {
    const RAW: &str = "raw";
    let env = TestEnv::new().await?;
    let mut raw = RawParticipant::start(&env, RAW).await?;
    let app = spawn_app(&env, two_participants(RAW)?).await?;
    let accounts = spawn_participant(&env, "accounts", Arc::new(Echo)).await?;
    // The participant written from the protocol alone answers every command it gets, and
    // keeps the ones that were not a single command.
    let stop = CancellationToken::new();
    let answering = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut not_single: Vec<Received> = Vec::new();
            loop {
                let command = tokio::select! {
                    () = stop.cancelled() => break,
                    command = raw.next() => command?,
                };
                if content_type(&command.properties) != "application/json"
                    || !command.body.is_object()
                {
                    not_single.push(command);
                    continue;
                }
                raw.reply(&command, json!({"status": "succeeded"})).await?;
            }
            anyhow::Ok((raw, not_single))
        })
    };

    run_sagas(&env, &app, 200).await?;
    stop.cancel();
    let (raw, not_single) = answering.await??;
    assert!(
        not_single.is_empty(),
        "{} messages that are not single commands, the first: {:?}",
        not_single.len(),
        not_single.first()
    );
    assert!(
        accounts.stats.command_batches() > 0,
        "the participant that announces batches gets some"
    );
    assert_eq!(accounts.stats.rejected(), 0);
    nothing_dead_lettered(&env, &app).await?;

    raw.close().await;
    accounts.stop().await;
    app.stop().await;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_participant_that_announces_no_batches_gets_every_command_alone() -> Result<()>
{
    let env = TestEnv::new().await?;
    let app = spawn_app(&env, two_participants("inventory")?).await?;
    let accounts = spawn_participant(&env, "accounts", Arc::new(Echo)).await?;
    let inventory = spawn_participant_with(&env, "inventory", Arc::new(Echo), |p| {
        p.accept_command_batches(0)
    })
    .await?;

    run_sagas(&env, &app, 200).await?;
    assert_eq!(inventory.stats.command_batches(), 0);
    assert!(
        accounts.stats.command_batches() > 0,
        "the participant that announces batches gets some"
    );
    assert_eq!(inventory.stats.rejected() + accounts.stats.rejected(), 0);
    nothing_dead_lettered(&env, &app).await?;

    inventory.stop().await;
    accounts.stop().await;
    app.stop().await;
    env.cleanup().await;
    Ok(())
}
