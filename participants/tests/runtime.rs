//! The AMQP runtime against a real RabbitMQ and PostgreSQL.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{TestBroker, TestDb, amqp_url, bank, command};
use lapin::options::BasicGetOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use sagas_participant::amqp::{self, QueueOptions};
use sagas_participant::protocol::{Operation, Outcome, Reply, Topology};
use sagas_participant::runtime::{Participant, RuntimeError, Stats};
use serde_json::json;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

const BANK: &str = "bank";

struct Running {
    stats: Stats,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), RuntimeError>>,
}

impl Running {
    async fn shutdown(self) {
        self.stop.send(()).ok();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the runtime stops within 10 s")
            .expect("the runtime task does not panic")
            .expect("the runtime returns Ok on shutdown");
    }
}

/// Starts the bank participant on a connection of its own.
fn start(db: &TestDb, topology: &Topology, options: &QueueOptions) -> Running {
    let participant = Participant::new(BANK, topology.clone(), db.pool.clone(), Arc::new(bank()))
        .prefetch(8)
        .concurrency(4)
        .queue_options(options.clone());
    let stats = participant.stats();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
        let result = participant
            .run(&conn, async {
                stopped.await.ok();
            })
            .await;
        conn.close(200, "OK".into()).await.ok();
        result
    });
    Running { stats, stop, task }
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
        dead.push(broker.next_message(&dead_letter_queue).await.delivery.data);
    }
    assert!(dead.contains(&b"{not json".to_vec()));
    assert_eq!(running.stats.rejected(), 3);
    assert_eq!(db.account("a").await, (100, 0), "nothing was processed");

    broker.send(BANK, &good).await;
    let (reply, _) = broker.next_reply().await;
    assert_eq!(reply.outcome.status(), "succeeded");
    assert_eq!(running.stats.rejected(), 3);

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
    tokio::time::sleep(Duration::from_millis(300)).await;
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
        let topology = Topology::new(format!("t-{}", Uuid::new_v4()));
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
