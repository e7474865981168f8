//! A real RabbitMQ restart under a running participant (`rabbitmqctl stop_app` / `start_app`).
//!
//! Only built with `--features broker-restart-tests`, and run alone (`--test-threads=1`, last
//! stage of scripts/test): stopping the broker breaks every other test using it. The broker
//! is started again even when the test fails (a drop guard).

use std::collections::HashMap;
use std::process::Command as Process;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use sagas_participant::amqp::{self, QueueOptions};
use sagas_participant::protocol::{Command, Operation, Outcome, Reply, Topology};
use sagas_participant::runtime::Participant;
use sagas_test_support::{close_broker, queue_options, unique_topology};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{self, BANK, TestDb, amqp_url, bank, command};

fn rabbitmqctl(args: &[&str]) -> bool {
    let status = Process::new("timeout")
        .arg("120")
        .arg("rabbitmqctl")
        .args(args)
        .status();
    matches!(status, Ok(s) if s.success())
}

/// Stops the broker's application; starts it again on drop, whatever happened.
struct StoppedBroker;

impl StoppedBroker {
    fn stop() -> StoppedBroker {
        assert!(rabbitmqctl(&["stop_app"]), "rabbitmqctl stop_app failed");
        StoppedBroker
    }

    fn start(self) {
        drop(self);
    }
}

impl Drop for StoppedBroker {
    fn drop(&mut self) {
        let started = rabbitmqctl(&["start_app"]) && rabbitmqctl(&["await_startup"]);
        if !started {
            eprintln!("could not restart RabbitMQ: run `rabbitmqctl start_app` by hand");
        }
    }
}

/// The test's own view of the broker: declares, publishes commands and reads replies; it
/// reconnects on demand, since the restart closes its connection too.
struct Peer {
    conn: Connection,
    channel: Channel,
    topology: Topology,
}

impl Peer {
    async fn connect(topology: &Topology, options: &QueueOptions) -> Peer {
        let mut last = None;
        for _ in 0..300 {
            match amqp::connect(&amqp_url()).await {
                Ok(conn) => {
                    let channel = conn.create_channel().await.expect("channel");
                    amqp::declare_replies(&channel, topology, options)
                        .await
                        .expect("declare replies");
                    return Peer {
                        conn,
                        channel,
                        topology: topology.clone(),
                    };
                }
                Err(error) => last = Some(error),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("cannot connect to RabbitMQ within 60 s: {last:?}");
    }

    async fn send(&self, cmd: &Command) {
        self.channel
            .basic_publish(
                self.topology.commands_exchange().into(),
                BANK.into(),
                BasicPublishOptions::default(),
                &serde_json::to_vec(cmd).unwrap(),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_reply_to(self.topology.replies_queue().into()),
            )
            .await
            .expect("publish");
    }

    /// Waits (up to 60 s) until the participant consumes its queue again.
    async fn wait_consumer(&self) {
        for _ in 0..300 {
            let channel = self.conn.create_channel().await.expect("channel");
            let declared = channel
                .queue_declare(
                    self.topology.participant_queue(BANK).as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            if let Ok(declared) = declared {
                channel.close(200, "OK".into()).await.ok();
                if declared.consumer_count() > 0 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("the participant did not consume again within 60 s");
    }

    /// Every reply waiting in the replies queue.
    async fn drain_replies(&self) -> Vec<Reply> {
        let mut replies = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(
                self.topology.replies_queue().as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic.get")
        {
            replies.push(serde_json::from_slice(&message.delivery.data).expect("a reply"));
        }
        replies
    }

    async fn teardown(self) {
        amqp::delete_topology(&self.channel, &self.topology, &[BANK])
            .await
            .ok();
        close_broker(&self.conn).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_survives_a_broker_restart_and_applies_every_command_exactly_once() {
    let db = TestDb::new().await;
    db.open("a", 1_000).await;
    let topology = unique_topology();
    let options = queue_options();
    let peer = Peer::connect(&topology, &options).await;
    amqp::declare_participant(&peer.channel, &topology, BANK, &options)
        .await
        .expect("declare participant");

    let participant = Participant::new(BANK, topology.clone(), db.pool.clone(), Arc::new(bank()))
        .prefetch(8)
        .concurrency(4)
        .queue_options(options.clone())
        .reconnect_backoff(Duration::from_millis(100), Duration::from_secs(1));
    let stats = participant.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn({
        async move {
            participant
                .run_forever(&amqp_url(), async move {
                    stopped.await.ok();
                })
                .await
        }
    });
    peer.wait_consumer().await;

    // Slow commands, so that some are in flight (handled, reply not yet published or command
    // not yet acked) when the broker goes away.
    let commands: Vec<Command> = (0..12)
        .map(|_| {
            command(
                Uuid::new_v4(),
                "reserve",
                Operation::Try,
                json!({ "account": "a", "amount": 10, "sleep_ms": 300 }),
            )
        })
        .collect();
    for cmd in &commands {
        peer.send(cmd).await;
    }
    db.wait_handler_in_transaction().await;

    let broker = StoppedBroker::stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.start();

    let peer = Peer::connect(&topology, &options).await;
    peer.wait_consumer().await;
    assert!(stats.reconnects() >= 1, "the participant reconnected");

    // The orchestrator would resend whatever it has no answer for after its timeout; here,
    // everything, until every transaction has its definite answer.
    let mut answers: HashMap<Uuid, Reply> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut resent = false;
    while answers.len() < commands.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {} answered within 60 s",
            answers.len(),
            commands.len()
        );
        for reply in peer.drain_replies().await {
            if let Outcome::Succeeded { .. } = reply.outcome {
                answers.insert(reply.transaction_id, reply);
            } else {
                assert_eq!(reply.outcome.status(), "retry", "{reply:?}");
            }
        }
        if !resent && answers.len() < commands.len() {
            tokio::time::sleep(Duration::from_secs(2)).await;
            for cmd in &commands {
                if !answers.contains_key(&cmd.transaction_id) {
                    peer.send(&helpers::again(cmd)).await;
                }
            }
            resent = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Exactly once: 12 reservations of 10, whatever was redelivered or resent.
    assert_eq!(db.account("a").await, (880, 120));
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM sagas_barrier")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 12);

    stop.send(()).ok();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the participant stops within 30 s")
        .expect("no panic")
        .expect("run_forever returns Ok");
    peer.teardown().await;
}
