//! A participant run with [`Participant::run_forever`] through a TCP proxy in front of RabbitMQ,
//! or of PostgreSQL, that cuts every connection and refuses new ones on command: it outlives
//! both, answers every command once with its outcome, and applies each once. The real servers
//! are never touched.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sagas_participant::barrier;
use sagas_participant::config::pool_options;
use sagas_participant::protocol::{Command, Operation, Outcome};
use sagas_participant::runtime::Participant;
use sagas_test_support::proxy::Proxy;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use uuid::Uuid;

use crate::helpers::{
    BANK, Running, TestBroker, TestDb, amqp_url, bank, bank_participant, command, eventually,
    start_forever,
};

/// A `try` of 10 on account `a`.
fn reserve() -> Command {
    let payload = json!({ "account": "a", "amount": 10 });
    command(Uuid::new_v4(), "reserve", Operation::Try, payload)
}

/// Short delays, so that the test does not wait for the default ones.
fn quick(participant: Participant) -> Participant {
    participant.reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
}

/// A pool on `db` through `proxy`, made as a participant process makes it
/// (`ParticipantConfig::pool`): lazily, so that it can start while the database is down, with
/// the runtime's pool options.
fn pool_through(proxy: &Proxy, db: &TestDb) -> PgPool {
    let url = proxy
        .url(db.url())
        .expect("the database URL through the proxy");
    let options = PgConnectOptions::from_str(&url).expect("parse the database URL");
    pool_options(4).connect_lazy_with(options)
}

/// Reads replies until each of `sent` has one, and checks that each has exactly one, that it
/// succeeded, and (once the runtime counts `processed` commands in all) that no other reply
/// follows.
async fn each_answered_once(
    broker: &TestBroker,
    running: &Running,
    sent: &[Command],
    processed: u64,
) {
    let mut answered: HashMap<Uuid, u32> = HashMap::new();
    while sent
        .iter()
        .any(|c| !answered.contains_key(&c.transaction_id))
    {
        let (reply, _) = broker.next_reply().await;
        assert_eq!(
            reply.outcome,
            Outcome::succeeded(json!({ "reserved": 10 })),
            "{reply:?}"
        );
        *answered.entry(reply.transaction_id).or_default() += 1;
    }
    let stats = running.stats.clone();
    // Counted once their replies are confirmed, which can be after they were delivered.
    eventually("every reply confirmed", || stats.processed() >= processed).await;
    assert_eq!(stats.processed(), processed);
    assert_eq!(
        broker
            .ready_messages(&broker.topology.replies_queue())
            .await,
        0
    );
    for cmd in sent {
        assert_eq!(answered[&cmd.transaction_id], 1, "{cmd:?}");
    }
}

/// Waits (bounded) until the broker counts no message of `queue` delivered and unacknowledged
/// (`rabbitmqctl list_queues`: the AMQP client sees only the ready ones).
async fn acknowledged(queue: &str) {
    let unacknowledged = |queue: String| {
        let out = std::process::Command::new("rabbitmqctl")
            .args(["-q", "list_queues", "name", "messages_unacknowledged"])
            .output()
            .expect("rabbitmqctl list_queues");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|line| {
                let (name, n) = line.split_once('\t')?;
                (name == queue).then(|| n.trim().parse::<u64>().ok())?
            })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let q = queue.to_owned();
        let n = tokio::task::spawn_blocking(move || unacknowledged(q))
            .await
            .expect("rabbitmqctl");
        if n == Some(0) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{queue}: {n:?} unacknowledged after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Each command's barrier row holds its success, once.
async fn applied_once(db: &TestDb, sent: &[Command]) {
    for cmd in sent {
        let rows = barrier::records(&db.pool, cmd.transaction_id)
            .await
            .unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(
            rows[0].reply.as_ref().map(Outcome::status),
            Some("succeeded")
        );
    }
}

#[tokio::test]
async fn run_forever_outlives_broker_connections_cut_at_any_point_and_refused_for_a_while() {
    let db = TestDb::new().await;
    db.open("a", 1_000).await;
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let proxy = Proxy::in_front_of(&amqp_url(), 5672).await.unwrap();
    let running = start_forever(
        quick(bank_participant(&db, &broker)),
        proxy.url(&amqp_url()).unwrap(),
    );
    let queue = broker.topology.participant_queue(BANK);
    broker.wait_consumer(&queue).await;
    // What the broker sends from the connection to consuming: the handshake, the channels,
    // the declarations.
    let start_bytes = proxy.last_server_bytes();
    assert!(start_bytes > 100, "{start_bytes}");
    let first = reserve();
    broker.send(BANK, &first).await;
    each_answered_once(&broker, &running, std::slice::from_ref(&first), 1).await;
    // Its reply is confirmed; its ack may still be on the way. Cut before the broker has it and
    // the command comes back after the outage, answered again from its barrier row: right, but
    // not what this test counts.
    acknowledged(&queue).await;

    // Every session start cut short, at eight points from the first byte to the last
    // declaration; the first cut ends the running session.
    proxy.cut();
    for k in 0..8 {
        let before = proxy.cut_short();
        proxy.cut_after(Some(start_bytes * k / 8));
        eventually(&format!("a session start cut after {k}/8"), || {
            proxy.cut_short() > before
        })
        .await;
    }
    proxy.cut_after(None);

    // The broker unreachable for a while, with commands sent meanwhile.
    proxy.refuse();
    proxy.cut();
    let sent: Vec<Command> = (0..5).map(|_| reserve()).collect();
    for cmd in &sent {
        broker.send(BANK, cmd).await;
    }
    eventually("reconnections refused", || proxy.refused() >= 3).await;
    assert!(
        !running.task.is_finished(),
        "the participant is still running"
    );
    proxy.accept();
    each_answered_once(&broker, &running, &sent, 6).await;

    assert!(
        !running.task.is_finished(),
        "the participant is still running"
    );
    // Sessions count from a connection made; a handshake cut short is a connection attempt.
    assert!(
        running.stats.reconnects() >= 2,
        "{}",
        running.stats.reconnects()
    );
    assert!(proxy.accepted() >= 10, "{}", proxy.accepted());
    applied_once(&db, &sent).await;
    assert_eq!(db.account("a").await, (940, 60), "each applied once");
    running.shutdown().await;
    broker.teardown(&[BANK]).await;
}

#[tokio::test]
async fn commands_sent_while_the_database_is_unreachable_wait_for_it_and_are_answered_once_it_is_back()
 {
    let db = TestDb::new().await;
    db.open("a", 1_000).await;
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let proxy = Proxy::in_front_of(db.url(), 5432).await.unwrap();
    let participant = Participant::new(
        BANK,
        broker.topology.clone(),
        pool_through(&proxy, &db),
        Arc::new(bank()),
    )
    .queue_options(broker.options.clone());
    let running = start_forever(quick(participant), amqp_url());
    let first = reserve();
    broker.send(BANK, &first).await;
    each_answered_once(&broker, &running, std::slice::from_ref(&first), 1).await;

    // One command is in its handler, its transaction open, when the database goes away.
    let mut in_flight = reserve();
    in_flight.payload["sleep_ms"] = json!(300);
    broker.send(BANK, &in_flight).await;
    db.wait_handler_in_transaction().await;
    proxy.refuse();
    proxy.cut();
    let mut sent: Vec<Command> = (0..4).map(|_| reserve()).collect();
    for cmd in &sent {
        broker.send(BANK, cmd).await;
    }
    let stats = running.stats.clone();
    eventually("every command waiting, and trying again", || {
        stats.database_waits() >= 10 && proxy.refused() >= 10
    })
    .await;
    // Neither answered (`retry`) nor dead-lettered: waiting, unacked.
    assert_eq!(
        broker
            .ready_messages(&broker.topology.replies_queue())
            .await,
        0
    );
    assert_eq!(
        broker
            .ready_messages(&broker.topology.dead_letter_queue())
            .await,
        0
    );
    assert!(
        !running.task.is_finished(),
        "the participant is still running"
    );

    proxy.accept();
    sent.push(in_flight);
    each_answered_once(&broker, &running, &sent, 6).await;
    assert!(
        !running.task.is_finished(),
        "the participant is still running"
    );
    assert_eq!(running.stats.rejected(), 0);
    applied_once(&db, &sent).await;
    assert_eq!(db.account("a").await, (940, 60), "each applied once");

    // And again, with the connections cut while idle and the database back at once.
    proxy.cut();
    let after = reserve();
    broker.send(BANK, &after).await;
    each_answered_once(&broker, &running, std::slice::from_ref(&after), 7).await;
    assert_eq!(db.account("a").await, (930, 70));
    running.shutdown().await;
    broker.teardown(&[BANK]).await;
}

#[tokio::test]
async fn a_participant_started_while_its_database_is_unreachable_installs_its_barrier_once_it_is_back()
 {
    let db = TestDb::new().await;
    db.open("a", 1_000).await;
    sqlx::raw_sql("DROP TABLE sagas_barrier, sagas_barrier_retention")
        .execute(&db.pool)
        .await
        .unwrap();
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let proxy = Proxy::in_front_of(db.url(), 5432).await.unwrap();
    proxy.refuse();
    let participant = Participant::new(
        BANK,
        broker.topology.clone(),
        pool_through(&proxy, &db),
        Arc::new(bank()),
    )
    .queue_options(broker.options.clone());
    let running = start_forever(quick(participant), amqp_url());
    let cmd = reserve();
    broker.send(BANK, &cmd).await;
    eventually("the barrier tried again", || proxy.refused() >= 5).await;
    assert!(
        !running.task.is_finished(),
        "the participant is still running"
    );

    proxy.accept();
    each_answered_once(&broker, &running, std::slice::from_ref(&cmd), 1).await;
    applied_once(&db, std::slice::from_ref(&cmd)).await;
    running.shutdown().await;
    broker.teardown(&[BANK]).await;
}
