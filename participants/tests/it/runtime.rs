//! The AMQP runtime against a real RabbitMQ and PostgreSQL.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::BasicGetOptions;
use lapin::types::ShortString;
use sagas_participant::amqp::{self, QueueOptions};
use sagas_participant::barrier;
use sagas_participant::protocol::{Command, Operation, Outcome, Reply, Topology};
use sagas_participant::runtime::{Participant, RuntimeError, Stats};
use sagas_test_support::unique_topology;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{
    self, BANK, Running, TestBroker, TestDb, amqp_url, bank, command, eventually, start_forever,
    start_with, text_header, wait_processed,
};

fn participant(db: &TestDb, topology: &Topology, options: &QueueOptions) -> Participant {
    Participant::new(BANK, topology.clone(), db.pool.clone(), Arc::new(bank()))
        .prefetch(8)
        .concurrency(4)
        .queue_options(options.clone())
}

/// Starts the bank participant on a connection of its own.
fn start(db: &TestDb, topology: &Topology, options: &QueueOptions) -> Running {
    start_with(participant(db, topology, options))
}

#[tokio::test]
async fn a_command_published_to_the_participant_queue_gets_its_reply_on_the_reply_queue() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let running = start(&db, &broker.topology, &broker.options);

    let cmd = command(
        Uuid::new_v4(),
        "reserve",
        Operation::Try,
        json!({ "account": "a", "amount": 10 }),
    );
    broker.send(BANK, &cmd).await;
    let (reply, props) = broker.next_reply().await;
    assert_eq!(
        reply,
        cmd.reply(Outcome::succeeded(json!({ "reserved": 10 })))
    );
    assert_eq!(props.delivery_mode(), &Some(2));
    assert_eq!(
        props.content_type(),
        &Some(ShortString::from("application/json"))
    );
    assert_eq!(
        props.message_id(),
        &Some(ShortString::from(reply.message_id()))
    );
    assert_eq!(
        props.correlation_id(),
        &Some(ShortString::from(cmd.transaction_id.to_string()))
    );
    assert_eq!(db.account("a").await, (90, 10));

    // A redelivery (same command, sent again) is answered from the barrier.
    broker.send(BANK, &cmd).await;
    let (again, _) = broker.next_reply().await;
    assert_eq!(again, reply);
    assert_eq!(db.account("a").await, (90, 10));
    wait_processed(&running.stats, 2).await;
    assert_eq!(running.stats.processed(), 2);

    running.shutdown().await;
    broker.teardown(&[BANK]).await;
}

#[tokio::test]
async fn a_malformed_message_is_dead_lettered_and_counted_and_the_runtime_keeps_serving() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let running = start(&db, &broker.topology, &broker.options);
    let queue = broker.topology.participant_queue(BANK);
    let with_reply_to =
        || BasicProperties::default().with_reply_to(broker.topology.replies_queue().into());

    let good = command(
        Uuid::new_v4(),
        "reserve",
        Operation::Try,
        json!({ "account": "a", "amount": 10 }),
    );
    let mut wrong_version = serde_json::to_value(&good).unwrap();
    wrong_version["protocol"] = json!(99);
    broker
        .publish_raw("", &queue, b"{not json", with_reply_to())
        .await;
    broker
        .publish_raw(
            "",
            &queue,
            &serde_json::to_vec(&wrong_version).unwrap(),
            with_reply_to(),
        )
        .await;
    broker
        .publish_raw(
            "",
            &queue,
            &serde_json::to_vec(&good).unwrap(),
            BasicProperties::default(),
        )
        .await;

    let dead_letter_queue = broker.topology.dead_letter_queue();
    let mut dead = Vec::new();
    for _ in 0..3 {
        let message = broker.next_message(&dead_letter_queue).await;
        let reason = text_header(&message.delivery.properties, "x-sagas-reason");
        let from = text_header(&message.delivery.properties, "x-sagas-queue");
        assert_eq!(from.as_deref(), Some(queue.as_str()));
        dead.push((message.delivery.data.clone(), reason.expect("a reason")));
    }
    dead.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(dead[0].0, b"{not json".to_vec());
    assert!(
        dead[0].1.starts_with("body is not a protocol message"),
        "{dead:?}"
    );
    assert_eq!(dead[1].1, "missing reply_to property");
    assert_eq!(dead[2].1, "unsupported protocol version 99 (expected 1)");
    assert_eq!(running.stats.rejected(), 3);
    assert_eq!(db.account("a").await, (100, 0), "nothing was processed");

    broker.send(BANK, &good).await;
    let (reply, _) = broker.next_reply().await;
    assert_eq!(reply.outcome.status(), "succeeded");
    assert_eq!(running.stats.rejected(), 3);

    running.shutdown().await;
    broker.teardown(&[BANK]).await;
}

/// The dead letter docs/protocol.md shows ("Dead letters"): a command of attempt 0, sent with
/// the properties the orchestrator gives a command.
#[tokio::test]
async fn a_command_of_attempt_zero_is_dead_lettered_with_its_properties_and_the_reason_added() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let running = start(&db, &broker.topology, &broker.options);
    let queue = broker.topology.participant_queue(BANK);

    let cmd = Command {
        attempt: 0,
        ..command(
            Uuid::new_v4(),
            "reserve",
            Operation::Try,
            json!({ "account": "a", "amount": 10 }),
        )
    };
    let body = serde_json::to_vec(&cmd).unwrap();
    let properties = amqp::command_properties(&cmd, &broker.topology.replies_queue());
    broker
        .publish_raw(
            &broker.topology.commands_exchange(),
            BANK,
            &body,
            properties.clone(),
        )
        .await;

    let dead = broker
        .next_message(&broker.topology.dead_letter_queue())
        .await
        .delivery;
    assert_eq!(dead.data, body);
    assert_eq!(
        dead.exchange.as_str(),
        broker.topology.dead_letter_exchange()
    );
    assert_eq!(dead.routing_key.as_str(), "");
    let got = &dead.properties;
    assert_eq!(got.content_type(), properties.content_type());
    assert_eq!(got.delivery_mode(), &Some(2));
    assert_eq!(got.message_id(), properties.message_id());
    assert_eq!(got.correlation_id(), properties.correlation_id());
    assert_eq!(got.reply_to(), properties.reply_to());
    let mut headers = properties.headers().clone().unwrap();
    headers.insert(
        "x-sagas-reason".into(),
        lapin::types::AMQPValue::LongString(
            "invalid command: attempt 0 (attempts count from 1)".into(),
        ),
    );
    headers.insert(
        "x-sagas-queue".into(),
        lapin::types::AMQPValue::LongString(queue.as_str().into()),
    );
    assert_eq!(got.headers().as_ref(), Some(&headers));
    assert_eq!(running.stats.rejected(), 1);
    assert_eq!(db.account("a").await, (100, 0), "nothing was processed");
    assert_eq!(
        broker
            .ready_messages(&broker.topology.replies_queue())
            .await,
        0
    );

    running.shutdown().await;
    broker.teardown(&[BANK]).await;
}

#[tokio::test]
async fn a_panicking_handler_yields_a_retry_reply() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let running = start(&db, &broker.topology, &broker.options);

    let id = Uuid::new_v4();
    let cmd = command(
        id,
        "reserve",
        Operation::Try,
        json!({ "account": "a", "amount": 10, "fail": "panic" }),
    );
    broker.send(BANK, &cmd).await;
    let (reply, _) = broker.next_reply().await;
    assert!(
        matches!(&reply.outcome, Outcome::Retry { reason, .. } if reason.contains("panicked")),
        "{reply:?}"
    );
    assert_eq!(db.account("a").await, (100, 0));

    // The runtime is still serving.
    let ok = command(
        id,
        "reserve",
        Operation::Try,
        json!({ "account": "a", "amount": 10 }),
    );
    broker.send(BANK, &ok).await;
    assert_eq!(broker.next_reply().await.0.outcome.status(), "succeeded");

    running.shutdown().await;
    broker.teardown(&[BANK]).await;
}

/// A lone command goes without the savepoint around its handler while few commands fail, as a
/// batch does: one whose handler fails after writing is rolled back whole and runs again with
/// it, and is answered as alone. Once lone commands fail often, they take the savepoint at once.
#[tokio::test]
async fn a_lone_failing_command_runs_again_with_its_savepoint_until_failures_are_frequent() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let running = start(&db, &broker.topology, &broker.options);

    let mut reruns = Vec::new();
    for _ in 0..40 {
        let cmd = command(
            Uuid::new_v4(),
            "credit",
            Operation::Action,
            json!({ "account": "a", "amount": 10, "fail": "business_after_write" }),
        );
        broker.send(BANK, &cmd).await;
        let (reply, _) = broker.next_reply().await;
        assert_eq!(reply.outcome.status(), "failed", "{reply:?}");
        // Stored as alone: the barrier row with the failure, the handler's write undone.
        let records = barrier::records(&db.pool, cmd.transaction_id)
            .await
            .unwrap();
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(
            records[0].reply.as_ref().map(Outcome::status),
            Some("failed")
        );
        assert_eq!(db.account("a").await, (100, 0));
        reruns.push(running.stats.batch_reruns());
    }
    assert_eq!(
        reruns[0], 1,
        "the first ran without its savepoint, then with it"
    );
    assert!(
        reruns[39] < 40 && reruns[29] == reruns[39],
        "with a failure rate this high, lone commands take their savepoint at once: {reruns:?}"
    );
    assert_eq!(
        running.stats.batches(),
        0,
        "no transaction of several commands"
    );

    // A lone command that succeeds commits once.
    let before = running.stats.batch_reruns();
    let ok = command(
        Uuid::new_v4(),
        "credit",
        Operation::Action,
        json!({ "account": "a", "amount": 10 }),
    );
    broker.send(BANK, &ok).await;
    assert_eq!(broker.next_reply().await.0.outcome.status(), "succeeded");
    assert_eq!(db.account("a").await, (110, 0));
    assert_eq!(running.stats.batch_reruns(), before);

    running.shutdown().await;
    broker.teardown(&[BANK]).await;
}

#[tokio::test]
async fn shutdown_waits_for_the_command_in_flight_and_its_reply() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let running = start(&db, &broker.topology, &broker.options);

    let cmd = command(
        Uuid::new_v4(),
        "reserve",
        Operation::Try,
        json!({ "account": "a", "amount": 10, "sleep_ms": 700 }),
    );
    broker.send(BANK, &cmd).await;
    db.wait_handler_in_transaction().await;
    let stats = running.stats.clone();
    running.shutdown().await;

    // Already there when `run` returns: no polling.
    assert_eq!(stats.processed(), 1);
    let message = broker
        .channel
        .basic_get(
            broker.topology.replies_queue().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("the reply was published before run returned");
    let reply: Reply = serde_json::from_slice(&message.delivery.data).unwrap();
    assert_eq!(reply.outcome.status(), "succeeded");
    assert_eq!(db.account("a").await, (90, 10));
    broker.teardown(&[BANK]).await;
}

#[tokio::test]
async fn declarations_from_both_sides_are_identical_and_idempotent() {
    let broker = TestBroker::new().await;
    for options in [
        broker.options.clone(),
        QueueOptions {
            quorum: true,
            expires: Some(Duration::from_secs(60)),
        },
    ] {
        let topology = unique_topology();
        let channel = broker.conn.create_channel().await.unwrap();
        for _ in 0..2 {
            amqp::declare_participant(&channel, &topology, BANK, &options)
                .await
                .unwrap();
            amqp::declare_replies(&channel, &topology, &options)
                .await
                .unwrap();
        }
        amqp::delete_topology(&channel, &topology, &[BANK])
            .await
            .unwrap();
    }
    broker.teardown(&[]).await;
}

#[tokio::test]
async fn a_handler_over_its_time_limit_is_rolled_back_and_answered_retry() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let running = start_with(
        participant(&db, &broker.topology, &broker.options)
            .handler_timeout(Duration::from_millis(300)),
    );

    let slow = command(
        Uuid::new_v4(),
        "reserve",
        Operation::Try,
        json!({ "account": "a", "amount": 10, "sleep_ms": 5_000 }),
    );
    broker.send(BANK, &slow).await;
    let (reply, _) = broker.next_reply().await;
    assert!(
        matches!(&reply.outcome, Outcome::Retry { reason, .. } if reason.contains("time limit of 300 ms")),
        "{reply:?}"
    );
    assert_eq!(running.stats.timed_out(), 1);
    // The abandoned transaction is rolled back: no effect, no barrier row.
    for _ in 0..100 {
        if barrier::records(&db.pool, slow.transaction_id)
            .await
            .unwrap()
            .is_empty()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        barrier::records(&db.pool, slow.transaction_id)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(db.account("a").await, (100, 0));

    // The next attempt, fast this time, runs afresh.
    let mut fast = helpers::again(&slow);
    fast.payload = json!({ "account": "a", "amount": 10 });
    broker.send(BANK, &fast).await;
    assert_eq!(broker.next_reply().await.0.outcome.status(), "succeeded");
    assert_eq!(db.account("a").await, (90, 10));

    running.shutdown().await;
    broker.teardown(&[BANK]).await;
}

/// The time limit is the handler's: a lone command that waits for a database connection longer
/// than the limit (here, the pool's one connection held by a batch of slow commands) is run
/// once it has one, not answered `retry`.
#[tokio::test]
async fn a_lone_command_waiting_for_a_connection_longer_than_the_time_limit_is_not_answered_retry()
{
    let db = TestDb::with_connections(1).await;
    db.open("a", 100).await;
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let slow: Vec<Command> = (0..3)
        .map(|_| {
            let payload = json!({ "account": "a", "amount": 1, "sleep_ms": 300 });
            command(Uuid::new_v4(), "credit", Operation::Action, payload)
        })
        .collect();
    for cmd in &slow {
        broker.send(BANK, cmd).await;
    }
    let running = start_with(
        participant(&db, &broker.topology, &broker.options)
            .handler_timeout(Duration::from_millis(500)),
    );
    db.wait_handler_in_transaction().await;
    let lone = command(
        Uuid::new_v4(),
        "credit",
        Operation::Action,
        json!({ "account": "a", "amount": 1 }),
    );
    broker.send(BANK, &lone).await;

    let mut answered = HashMap::new();
    while answered.len() < 4 {
        let (reply, _) = broker.next_reply().await;
        answered.insert(reply.transaction_id, reply.outcome.status());
    }
    assert_eq!(
        answered.get(&lone.transaction_id),
        Some(&"succeeded"),
        "{answered:?}"
    );
    assert!(answered.values().all(|s| *s == "succeeded"), "{answered:?}");
    assert_eq!(running.stats.timed_out(), 0);
    assert_eq!(db.account("a").await, (104, 0));

    running.shutdown().await;
    broker.teardown(&[BANK]).await;
}

#[tokio::test]
async fn shutdown_abandons_handlers_that_outlast_the_shutdown_timeout_and_their_command_is_redelivered()
 {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let running = start_with(
        participant(&db, &broker.topology, &broker.options)
            .shutdown_timeout(Duration::from_millis(200)),
    );
    let cmd = command(
        Uuid::new_v4(),
        "reserve",
        Operation::Try,
        json!({ "account": "a", "amount": 10, "sleep_ms": 3_000 }),
    );
    broker.send(BANK, &cmd).await;
    let queue = broker.topology.participant_queue(BANK);
    db.wait_handler_in_transaction().await;
    let started = tokio::time::Instant::now();
    running.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // Not lost: the unacked command is back in the queue, and nothing took effect.
    let message = broker.next_message(&queue).await;
    assert_eq!(
        serde_json::from_slice::<sagas_participant::Command>(&message.delivery.data).unwrap(),
        cmd
    );
    for _ in 0..100 {
        if barrier::records(&db.pool, cmd.transaction_id)
            .await
            .unwrap()
            .is_empty()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(db.account("a").await, (100, 0));
    broker.teardown(&[BANK]).await;
}

#[tokio::test]
async fn run_forever_redeclares_its_queue_after_the_broker_cancels_its_consumer() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let running = start_forever(
        participant(&db, &broker.topology, &broker.options)
            .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(200)),
        amqp_url(),
    );
    let first = command(
        Uuid::new_v4(),
        "reserve",
        Operation::Try,
        json!({ "account": "a", "amount": 10 }),
    );
    broker.send(BANK, &first).await;
    assert_eq!(broker.next_reply().await.0.outcome.status(), "succeeded");

    // Someone deletes the queue: the broker cancels the consumer.
    broker
        .channel
        .queue_delete(
            broker.topology.participant_queue(BANK).as_str().into(),
            Default::default(),
        )
        .await
        .unwrap();
    let stats = running.stats.clone();
    eventually("a reconnection", || stats.reconnects() >= 1).await;
    // The queue is back (declared by the participant itself), bound, and served.
    broker
        .wait_consumer(&broker.topology.participant_queue(BANK))
        .await;
    let second = command(
        Uuid::new_v4(),
        "reserve",
        Operation::Try,
        json!({ "account": "a", "amount": 10 }),
    );
    broker.send(BANK, &second).await;
    assert_eq!(broker.next_reply().await.0.outcome.status(), "succeeded");
    assert_eq!(db.account("a").await, (80, 20));

    running.shutdown().await;
    broker.teardown(&[BANK]).await;
}

/// `run_forever` serves on a task of its own on the runtime (not on the thread that awaits
/// it); dropping its future still stops the participant.
#[tokio::test]
async fn a_participant_whose_run_forever_future_is_dropped_stops_consuming() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let queue = broker.topology.participant_queue(BANK);
    let url = amqp_url();
    let serving = participant(&db, &broker.topology, &broker.options)
        .run_forever(&url, std::future::pending());
    tokio::select! {
        ended = serving => panic!("run_forever ended by itself: {ended:?}"),
        () = broker.wait_consumer(&queue) => {}
    }
    // The select dropped the future.
    broker.wait_consumers(&queue, false).await;
    broker.teardown(&[BANK]).await;
}

#[tokio::test]
async fn run_forever_rejects_an_unparsable_url_at_once() {
    let db = TestDb::new().await;
    let topology = unique_topology();
    let result = participant(&db, &topology, &QueueOptions::default())
        .run_forever("not a url", std::future::pending())
        .await;
    assert!(
        matches!(result, Err(RuntimeError::InvalidUrl(_))),
        "{result:?}"
    );
}

/// Database connections killed under a running participant (a stand-in for a PostgreSQL
/// restart, which would disturb every other test on the server): the command in flight is run
/// again on a fresh connection and answered once, with its outcome, not `retry`; later ones
/// succeed too, and nothing applies twice.
#[tokio::test]
async fn killed_database_connections_cost_a_rerun_and_nothing_else() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let running = start(&db, &broker.topology, &broker.options);

    let in_flight = command(
        Uuid::new_v4(),
        "reserve",
        Operation::Try,
        json!({ "account": "a", "amount": 10, "sleep_ms": 1_000 }),
    );
    broker.send(BANK, &in_flight).await;
    db.wait_handler_in_transaction().await;
    let killed = db.kill_connections().await;
    assert!(killed >= 1, "the handler's connection was killed");
    let (reply, _) = broker.next_reply().await;
    assert_eq!(reply.outcome.status(), "succeeded", "{reply:?}");
    assert!(
        running.stats.database_waits() + running.stats.batch_fallbacks() >= 1,
        "the command ran again, at once or after waiting for the database"
    );

    // The orchestrator's next attempt gets the stored reply, also on fresh connections.
    let next = helpers::again(&in_flight);
    broker.send(BANK, &next).await;
    assert_eq!(broker.next_reply().await.0.outcome.status(), "succeeded");
    db.kill_connections().await;
    broker.send(BANK, &next).await;
    assert_eq!(broker.next_reply().await.0.outcome.status(), "succeeded");
    assert_eq!(db.account("a").await, (90, 10), "applied once");
    assert_eq!(
        broker
            .ready_messages(&broker.topology.replies_queue())
            .await,
        0
    );

    running.shutdown().await;
    broker.teardown(&[BANK]).await;
}

/// Two participant processes on one queue, taking commands in batches, with redeliveries of
/// some of them in the queue too, all on one account: every command is answered, its effect
/// applied once.
///
/// A redelivery in one batch waiting for the original in another, which waits for the account
/// row the first holds, is a deadlock: the batch it breaks falls back, a lone command it breaks
/// is answered `retry`, and then sent again here as the orchestrator would.
#[tokio::test]
async fn participants_taking_commands_in_batches_apply_each_exactly_once_under_concurrency() {
    let db = TestDb::with_connections(20).await;
    db.open("a", 1_000).await;
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let cmds: HashMap<Uuid, Command> = (0..60)
        .map(|_| {
            let payload = json!({ "account": "a", "amount": 1 });
            let cmd = command(Uuid::new_v4(), "reserve", Operation::Try, payload);
            (cmd.transaction_id, cmd)
        })
        .collect();
    // Queued before the participants start, so that deliveries arrive together.
    let mut sent = 0;
    for (i, cmd) in cmds.values().enumerate() {
        broker.send(BANK, cmd).await;
        sent += 1;
        if i % 3 == 0 {
            broker.send(BANK, &helpers::again(cmd)).await;
            sent += 1;
        }
    }
    let batching = || {
        participant(&db, &broker.topology, &broker.options)
            .prefetch(16)
            .concurrency(8)
            .batch_size(8)
    };
    let running = [start_with(batching()), start_with(batching())];

    let (mut answered, mut replies, mut retried) = (HashMap::new(), 0, 0);
    while replies < sent {
        let (reply, _) = broker.next_reply().await;
        replies += 1;
        let id = reply.transaction_id;
        match reply.outcome {
            Outcome::Retry { .. } => {
                retried += 1;
                broker.send(BANK, &helpers::again(&cmds[&id])).await;
                sent += 1;
            }
            outcome => {
                assert_eq!(outcome, Outcome::succeeded(json!({ "reserved": 1 })));
                answered.insert(id, outcome);
            }
        }
    }
    assert_eq!(answered.len(), cmds.len());
    assert_eq!(db.account("a").await, (940, 60), "each applied once");
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM sagas_barrier")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 60);

    let stats: Vec<Stats> = running.iter().map(|r| r.stats.clone()).collect();
    eventually("every command counted as processed", || {
        stats.iter().map(Stats::processed).sum::<u64>() == sent
    })
    .await;
    let batches: u64 = stats.iter().map(Stats::batches).sum();
    let fallbacks: u64 = stats.iter().map(Stats::batch_fallbacks).sum();
    assert!(batches >= 1, "no batch formed");
    eprintln!("{sent} commands, {batches} batches, {fallbacks} fallbacks, {retried} retries");
    for running in running {
        running.shutdown().await;
    }
    broker.teardown(&[BANK]).await;
}

#[tokio::test]
async fn a_command_over_the_time_limit_in_a_batch_is_answered_retry_and_the_others_succeed() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    // The slow command's account is its own: the others do not wait for its row lock.
    db.open("b", 100).await;
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let slow = command(
        Uuid::new_v4(),
        "reserve",
        Operation::Try,
        json!({ "account": "b", "amount": 10, "sleep_ms": 3_000 }),
    );
    broker.send(BANK, &slow).await;
    for _ in 0..3 {
        let payload = json!({ "account": "a", "amount": 10 });
        broker
            .send(
                BANK,
                &command(Uuid::new_v4(), "reserve", Operation::Try, payload),
            )
            .await;
    }
    let running = start_with(
        participant(&db, &broker.topology, &broker.options)
            .batch_size(8)
            .handler_timeout(Duration::from_millis(300)),
    );

    let mut statuses = HashMap::new();
    for _ in 0..4 {
        let (reply, _) = broker.next_reply().await;
        statuses.insert(reply.transaction_id, reply.outcome);
    }
    assert!(
        matches!(&statuses[&slow.transaction_id], Outcome::Retry { reason, .. } if reason.contains("time limit of 300 ms")),
        "{statuses:?}"
    );
    assert_eq!(
        statuses
            .values()
            .filter(|o| o.status() == "succeeded")
            .count(),
        3,
        "{statuses:?}"
    );
    assert_eq!(running.stats.timed_out(), 1);
    assert!(running.stats.batch_fallbacks() <= 1);
    assert!(
        barrier::records(&db.pool, slow.transaction_id)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(db.account("a").await, (70, 30));
    assert_eq!(db.account("b").await, (100, 0));

    running.shutdown().await;
    broker.teardown(&[BANK]).await;
}

#[tokio::test]
async fn a_running_participant_deletes_its_old_barrier_rows_on_its_schedule() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    // One old transaction (every row older than the retention), one recent.
    let (old, recent) = (Uuid::new_v4(), Uuid::new_v4());
    sqlx::query(
        "INSERT INTO sagas_barrier (transaction_id, step, operation, origin, reply, created_at)
         VALUES ($1, 'reserve', 'action', 'handler', '{\"status\": \"succeeded\"}',
                 now() - interval '2 days'),
                ($2, 'reserve', 'action', 'handler', '{\"status\": \"succeeded\"}', now())",
    )
    .bind(old)
    .bind(recent)
    .execute(&db.pool)
    .await
    .unwrap();
    let running = start_with(
        helpers::bank_participant(&db, &broker)
            .barrier_retention(Some(Duration::from_secs(24 * 3600)))
            .barrier_cleanup_every(Duration::from_secs(1)),
    );
    let mut gone = false;
    for _ in 0..300 {
        if barrier::records(&db.pool, old).await.unwrap().is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the old transaction's rows are deleted within 15 s");
    assert_eq!(barrier::records(&db.pool, recent).await.unwrap().len(), 1);
    running.shutdown().await;
}
