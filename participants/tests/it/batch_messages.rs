//! Command batches (one message carrying several commands) against a real RabbitMQ and
//! PostgreSQL: one reply batch per command batch, malformed elements dead-lettered alone,
//! bodies that are not batches dead-lettered whole, and the barrier behind every element.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, ShortString};
use sagas_participant::protocol::{
    BATCH_CONTENT_TYPE, Command, Operation, Outcome, Reply, join_batch,
};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{
    self, BANK, Running, TestBroker, TestDb, again, bank_participant, command, element, start_with,
    text_header, wait_processed,
};

fn header(properties: &BasicProperties, name: &str) -> Option<AMQPValue> {
    properties.headers().as_ref()?.inner().get(name).cloned()
}

/// Starts the bank participant on a connection of its own, with transactions of at most
/// `batch_size` commands.
fn start(db: &TestDb, broker: &TestBroker, batch_size: usize) -> Running {
    let participant = bank_participant(db, broker)
        .prefetch(8)
        .concurrency(4)
        .batch_size(batch_size);
    start_with(participant)
}

/// Steps and transactions mixed: successes, business failures, a null compensation and the
/// late try it refuses, a confirm and a compensation after their forward operation, and a
/// retry of a command already in the batch.
fn mixed_commands() -> Vec<Command> {
    let (t1, t2, t3, t4, t5, t6) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    let reserve_a = command(
        t1,
        "reserve",
        Operation::Try,
        json!({ "account": "a", "amount": 30 }),
    );
    vec![
        reserve_a.clone(),
        command(
            t2,
            "reserve",
            Operation::Try,
            json!({ "account": "b", "amount": 1000 }),
        ),
        command(
            t3,
            "credit",
            Operation::Action,
            json!({ "account": "c", "amount": 5 }),
        ),
        command(
            t4,
            "reserve",
            Operation::Cancel,
            json!({ "account": "a", "amount": 10 }),
        ),
        command(
            t4,
            "reserve",
            Operation::Try,
            json!({ "account": "a", "amount": 10 }),
        ),
        command(
            t1,
            "reserve",
            Operation::Confirm,
            json!({ "account": "a", "amount": 30 }),
        ),
        again(&reserve_a),
        command(
            t5,
            "credit",
            Operation::Action,
            json!({ "account": "c", "amount": 7, "fail": "business" }),
        ),
        command(
            t3,
            "credit",
            Operation::Compensate,
            json!({ "account": "c", "amount": 5 }),
        ),
        command(
            t6,
            "reserve",
            Operation::Try,
            json!({ "account": "b", "amount": 20 }),
        ),
    ]
}

async fn open_accounts(db: &TestDb) {
    db.open("a", 100).await;
    db.open("b", 50).await;
    db.open("c", 0).await;
}

async fn accounts(db: &TestDb) -> Vec<(i64, i64)> {
    vec![
        db.account("a").await,
        db.account("b").await,
        db.account("c").await,
    ]
}

#[tokio::test]
async fn a_batch_of_commands_gets_one_reply_batch_with_the_replies_they_get_one_by_one() {
    let cmds = mixed_commands();

    // One by one, each reply awaited before the next command is sent.
    let alone_db = TestDb::new().await;
    open_accounts(&alone_db).await;
    let alone_broker = TestBroker::new().await;
    alone_broker.declare_participant(BANK).await;
    let alone = start(&alone_db, &alone_broker, 4);
    let mut one_by_one = Vec::new();
    for cmd in &cmds {
        alone_broker.send(BANK, cmd).await;
        one_by_one.push(alone_broker.next_reply().await.0);
    }
    alone.shutdown().await;
    alone_broker.teardown(&[BANK]).await;

    // All in one message, run in transactions of at most 4 commands.
    let db = TestDb::new().await;
    open_accounts(&db).await;
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let running = start(&db, &broker, 4);
    let elements: Vec<Vec<u8>> = cmds.iter().map(element).collect();
    broker.send_batch(BANK, &elements).await;
    let (replies, props) = broker.next_reply_batch().await;

    assert_eq!(replies, one_by_one);
    let statuses: Vec<&str> = replies.iter().map(|r| r.outcome.status()).collect();
    assert_eq!(
        statuses,
        [
            "succeeded",
            "failed",
            "succeeded",
            "succeeded",
            "failed",
            "succeeded",
            "succeeded",
            "failed",
            "succeeded",
            "succeeded"
        ]
    );
    assert_eq!(
        replies[3].outcome,
        Outcome::succeeded(json!({ "null_compensation": true }))
    );
    assert_eq!(replies[6].attempt, 2, "the retry is answered as itself");
    assert_eq!(replies[6].outcome, replies[0].outcome);
    assert_eq!(accounts(&db).await, accounts(&alone_db).await);
    assert_eq!(accounts(&db).await, [(70, 0), (30, 20), (0, 0)]);

    assert_eq!(
        props.content_type(),
        &Some(ShortString::from(BATCH_CONTENT_TYPE))
    );
    assert_eq!(props.delivery_mode(), &Some(2));
    assert_eq!(
        props.message_id(),
        &Some(ShortString::from(format!(
            "batch:{}:{}",
            replies[0].message_id(),
            cmds.len()
        )))
    );
    assert_eq!(
        header(&props, "x-saga-batch"),
        Some(AMQPValue::LongLongInt(cmds.len() as i64))
    );
    assert_eq!(
        broker
            .ready_messages(&broker.topology.replies_queue())
            .await,
        0,
        "one message for the whole batch"
    );
    wait_processed(&running.stats, cmds.len() as u64).await;
    assert_eq!(running.stats.processed(), cmds.len() as u64);
    assert_eq!(running.stats.rejected(), 0);
    assert!(running.stats.batches() >= 3, "10 commands in chunks of 4");
    assert!(
        running.stats.batch_reruns() >= 1,
        "the first chunk met a failure without savepoints and ran again with them"
    );

    running.shutdown().await;
    broker.teardown(&[BANK]).await;
}

#[tokio::test]
async fn a_malformed_element_is_dead_lettered_alone_and_the_others_are_answered_a_duplicate_from_the_barrier()
 {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let running = start(&db, &broker, 16);
    let queue = broker.topology.participant_queue(BANK);

    let first = command(
        Uuid::new_v4(),
        "reserve",
        Operation::Try,
        json!({ "account": "a", "amount": 10 }),
    );
    let second = command(
        Uuid::new_v4(),
        "credit",
        Operation::Action,
        json!({ "account": "a", "amount": 1 }),
    );
    let mut wrong_version = serde_json::to_value(&first).unwrap();
    wrong_version["protocol"] = json!(7);
    // Kept byte for byte, odd spacing included.
    let wrong_version = format!(" {} ", serde_json::to_string(&wrong_version).unwrap());
    broker
        .send_batch(
            BANK,
            &[
                element(&first),
                wrong_version.clone().into_bytes(),
                element(&first),
                element(&second),
            ],
        )
        .await;

    let (replies, _) = broker.next_reply_batch().await;
    let succeeded = first.reply(Outcome::succeeded(json!({ "reserved": 10 })));
    assert_eq!(
        replies,
        [
            succeeded.clone(),
            succeeded,
            second.reply(Outcome::succeeded(json!({ "credited": 1 })))
        ]
    );
    assert_eq!(
        db.account("a").await,
        (91, 10),
        "the duplicate took no effect"
    );

    let dead = broker
        .next_message(&broker.topology.dead_letter_queue())
        .await;
    let props = &dead.delivery.properties;
    assert_eq!(
        String::from_utf8(dead.delivery.data.clone()).unwrap(),
        wrong_version.trim()
    );
    assert_eq!(
        text_header(props, "x-sagas-reason").as_deref(),
        Some("unsupported protocol version 7 (expected 1)")
    );
    assert_eq!(
        text_header(props, "x-sagas-queue").as_deref(),
        Some(queue.as_str())
    );
    assert_eq!(
        props.content_type(),
        &Some(ShortString::from("application/json"))
    );
    assert_eq!(props.delivery_mode(), &Some(2));
    assert_eq!(
        broker
            .ready_messages(&broker.topology.dead_letter_queue())
            .await,
        0,
        "only the malformed element is dead-lettered"
    );
    assert_eq!(running.stats.rejected(), 1);
    wait_processed(&running.stats, 3).await;
    assert_eq!(running.stats.processed(), 3);

    running.shutdown().await;
    assert_eq!(
        broker.ready_messages(&queue).await,
        0,
        "the batch was acked"
    );
    broker.teardown(&[BANK]).await;
}

#[tokio::test]
async fn a_batch_whose_elements_are_all_malformed_is_acked_once_they_are_dead_lettered() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let running = start(&db, &broker, 16);
    let queue = broker.topology.participant_queue(BANK);

    let mut unknown_operation = serde_json::to_value(command(
        Uuid::new_v4(),
        "reserve",
        Operation::Try,
        json!({}),
    ))
    .unwrap();
    unknown_operation["operation"] = json!("commit");
    broker
        .send_batch(
            BANK,
            &[
                b"\"not a command\"".to_vec(),
                serde_json::to_vec(&unknown_operation).unwrap(),
            ],
        )
        .await;

    let mut reasons = Vec::new();
    for _ in 0..2 {
        let dead = broker
            .next_message(&broker.topology.dead_letter_queue())
            .await;
        reasons.push((
            text_header(&dead.delivery.properties, "x-sagas-reason").expect("a reason"),
            dead.delivery.data.clone(),
        ));
    }
    reasons.sort();
    assert!(
        reasons[0].0.starts_with("body is not a protocol message"),
        "{reasons:?}"
    );
    assert_eq!(reasons[0].1, b"\"not a command\"");
    assert!(reasons[1].0.starts_with("invalid command: "), "{reasons:?}");
    assert_eq!(running.stats.rejected(), 2);

    running.shutdown().await;
    assert_eq!(
        broker
            .ready_messages(&broker.topology.replies_queue())
            .await,
        0,
        "nothing answers a batch without valid commands"
    );
    assert_eq!(
        broker.ready_messages(&queue).await,
        0,
        "the batch was acked"
    );
    broker.teardown(&[BANK]).await;
}

#[tokio::test]
async fn bodies_that_are_not_batches_and_batches_without_reply_to_are_dead_lettered_whole() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let running = start(&db, &broker, 16);
    let queue = broker.topology.participant_queue(BANK);

    let cmd = command(
        Uuid::new_v4(),
        "reserve",
        Operation::Try,
        json!({ "account": "a", "amount": 10 }),
    );
    let props = || helpers::batch_properties(&broker.topology, 1);
    let not_an_array = serde_json::to_vec(&cmd).unwrap();
    let valid = join_batch([element(&cmd).as_slice()]);
    broker.publish_raw("", &queue, &not_an_array, props()).await;
    broker.publish_raw("", &queue, b"[]", props()).await;
    let no_reply_to = BasicProperties::default().with_content_type(BATCH_CONTENT_TYPE.into());
    broker.publish_raw("", &queue, &valid, no_reply_to).await;

    let mut dead = Vec::new();
    for _ in 0..3 {
        let message = broker
            .next_message(&broker.topology.dead_letter_queue())
            .await;
        let props = &message.delivery.properties;
        assert_eq!(
            text_header(props, "x-sagas-queue").as_deref(),
            Some(queue.as_str())
        );
        assert_eq!(
            props.content_type(),
            &Some(ShortString::from(BATCH_CONTENT_TYPE)),
            "the message is kept as it came"
        );
        dead.push((
            text_header(props, "x-sagas-reason").expect("a reason"),
            message.delivery.data.clone(),
        ));
    }
    dead.sort();
    assert_eq!(dead[0].0, "batch body is an empty array");
    assert_eq!(dead[0].1, b"[]");
    assert!(
        dead[1].0.starts_with("batch body is not a JSON array: "),
        "{dead:?}"
    );
    assert_eq!(dead[1].1, not_an_array);
    assert_eq!(dead[2].0, "missing reply_to property");
    assert_eq!(dead[2].1, valid);
    assert_eq!(running.stats.rejected(), 3);
    assert_eq!(db.account("a").await, (100, 0), "nothing was processed");

    // The runtime goes on serving batches.
    broker.send_batch(BANK, &[element(&cmd)]).await;
    let (replies, _) = broker.next_reply_batch().await;
    assert_eq!(
        replies,
        [cmd.reply(Outcome::succeeded(json!({ "reserved": 10 })))]
    );

    running.shutdown().await;
    broker.teardown(&[BANK]).await;
}

#[tokio::test]
async fn the_same_batch_delivered_twice_gets_the_same_replies_and_takes_effect_once() {
    let db = TestDb::new().await;
    open_accounts(&db).await;
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let running = start(&db, &broker, 3);

    let elements: Vec<Vec<u8>> = mixed_commands().iter().map(element).collect();
    broker.send_batch(BANK, &elements).await;
    let (first, first_props) = broker.next_reply_batch().await;
    let after_first = accounts(&db).await;
    broker.send_batch(BANK, &elements).await;
    let (second, second_props) = broker.next_reply_batch().await;

    assert_eq!(second, first);
    assert_eq!(second_props.message_id(), first_props.message_id());
    assert_eq!(accounts(&db).await, after_first);
    assert_eq!(after_first, [(70, 0), (30, 20), (0, 0)]);
    wait_processed(&running.stats, 2 * elements.len() as u64).await;
    assert_eq!(running.stats.processed(), 2 * elements.len() as u64);

    running.shutdown().await;
    broker.teardown(&[BANK]).await;
}

#[tokio::test]
async fn single_commands_and_a_batch_queued_together_are_each_answered_once() {
    let db = TestDb::new().await;
    db.open("a", 1000).await;
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let queue = broker.topology.participant_queue(BANK);

    // Queued before the participant starts, so that they are taken together.
    let single = command(
        Uuid::new_v4(),
        "reserve",
        Operation::Try,
        json!({ "account": "a", "amount": 1 }),
    );
    let batched: Vec<Command> = (0..5)
        .map(|n| {
            command(
                Uuid::new_v4(),
                "credit",
                Operation::Action,
                json!({ "account": "a", "amount": n }),
            )
        })
        .collect();
    broker.send(BANK, &single).await;
    broker
        .send_batch(BANK, &batched.iter().map(element).collect::<Vec<_>>())
        .await;
    broker.send(BANK, &again(&single)).await;
    let running = start(&db, &broker, 2);

    // The sender speaks batches (it sent one), so replies taken together may share reply
    // batches; each command is answered exactly once, the batch's replies in its order.
    let mut replies = Vec::new();
    while replies.len() < 7 {
        let message = broker.next_message(&broker.topology.replies_queue()).await;
        let props = &message.delivery.properties;
        if props.content_type() == &Some(ShortString::from(BATCH_CONTENT_TYPE)) {
            replies.extend(serde_json::from_slice::<Vec<Reply>>(&message.delivery.data).unwrap());
        } else {
            replies.push(serde_json::from_slice::<Reply>(&message.delivery.data).unwrap());
        }
    }
    let reserved = Outcome::succeeded(json!({ "reserved": 1 }));
    let credited: Vec<Reply> = batched
        .iter()
        .enumerate()
        .map(|(n, cmd)| cmd.reply(Outcome::succeeded(json!({ "credited": n }))))
        .collect();
    let (singles, in_order): (Vec<Reply>, Vec<Reply>) =
        replies.into_iter().partition(|r| r.step == "reserve");
    assert_eq!(in_order, credited);
    let mut singles = singles;
    singles.sort_by_key(|r| r.attempt);
    assert_eq!(
        singles,
        [
            single.reply(reserved.clone()),
            again(&single).reply(reserved)
        ]
    );
    assert_eq!(db.account("a").await, (1000 - 1 + 10, 1));
    wait_processed(&running.stats, 7).await;
    assert_eq!(running.stats.processed(), 7);

    running.shutdown().await;
    assert_eq!(
        broker.ready_messages(&queue).await,
        0,
        "every message was acked"
    );
    broker.teardown(&[BANK]).await;
}

#[tokio::test]
async fn every_reply_and_reply_batch_announces_the_participant_and_the_command_batches_it_accepts()
{
    let db = TestDb::new().await;
    db.open("c", 0).await;
    let broker = TestBroker::new().await;
    broker.declare_participant(BANK).await;
    let credit = || {
        command(
            Uuid::new_v4(),
            "credit",
            Operation::Action,
            json!({ "account": "c", "amount": 1 }),
        )
    };
    // The headers as a participant in another language reads them.
    let announced = |props: &BasicProperties| {
        (
            text_header(props, "x-saga-participant"),
            header(props, "x-saga-accepts-batch"),
        )
    };

    let running = start(&db, &broker, 4);
    broker.send(BANK, &credit()).await;
    let (_, single) = broker.next_reply().await;
    let by_default = (Some(BANK.to_owned()), Some(AMQPValue::LongLongInt(256)));
    assert_eq!(announced(&single), by_default);
    broker
        .send_batch(BANK, &[element(&credit()), element(&credit())])
        .await;
    let (replies, batch) = broker.next_reply_batch().await;
    assert_eq!(replies.len(), 2);
    assert_eq!(announced(&batch), by_default);
    wait_processed(&running.stats, 3).await;
    assert_eq!(running.stats.command_batches(), 1);
    running.shutdown().await;

    // Announcing none, it still takes the batches it is sent.
    let running = start_with(bank_participant(&db, &broker).accept_command_batches(0));
    broker.send(BANK, &credit()).await;
    let (_, single) = broker.next_reply().await;
    let none = (Some(BANK.to_owned()), Some(AMQPValue::LongLongInt(0)));
    assert_eq!(announced(&single), none);
    broker.send_batch(BANK, &[element(&credit())]).await;
    let (replies, batch) = broker.next_reply_batch().await;
    assert_eq!(replies[0].outcome.status(), "succeeded");
    assert_eq!(announced(&batch), none);
    running.shutdown().await;
    assert_eq!(db.account("c").await, (5, 0));
    broker.teardown(&[BANK]).await;
}
