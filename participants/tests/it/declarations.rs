//! What RabbitMQ takes as the same declaration, for participants written with other AMQP
//! clients (docs/protocol.md, "Topology"): the integer width of `x-expires` does not matter,
//! its value does.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use sagas_participant::amqp::{self, QueueOptions};
use sagas_test_support::{close_broker, connect_broker, unique_topology};

/// The arguments of a participant queue with expiry, `x-expires` given as `expires`.
fn arguments(dead_letter_exchange: &str, expires: AMQPValue) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(dead_letter_exchange)),
    );
    args.insert("x-expires".into(), expires);
    args
}

/// Declares `queue` again on a channel of its own (a refusal closes the channel); the error
/// text when the broker refuses.
async fn redeclare(conn: &lapin::Connection, queue: &str, args: FieldTable) -> Result<(), String> {
    let channel = conn.create_channel().await.expect("channel");
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await;
    if channel.status().connected() {
        channel.close(200, "OK".into()).await.ok();
    }
    declared.map(drop).map_err(|e| e.to_string())
}

#[tokio::test]
async fn an_expiry_of_the_same_value_in_any_integer_width_redeclares_the_queue_and_another_value_is_refused()
 {
    let conn = connect_broker().await.expect("connect to RabbitMQ");
    let channel = conn.create_channel().await.expect("channel");
    let topology = unique_topology();
    let options = QueueOptions {
        quorum: false,
        expires: Some(Duration::from_secs(600)),
    };
    // Declared as the SDK does: `x-expires` a signed 64-bit integer (AMQP type `l`).
    amqp::declare_participant(&channel, &topology, "bank", &options)
        .await
        .expect("declare");
    let queue = topology.participant_queue("bank");
    let dlx = topology.dead_letter_exchange();

    // What other clients send for 600000: Python's pika a signed 32-bit integer (`I`) when
    // the value fits, others an unsigned one.
    for same in [
        AMQPValue::LongInt(600_000),
        AMQPValue::LongUInt(600_000),
        AMQPValue::LongLongInt(600_000),
    ] {
        let width = format!("{same:?}");
        redeclare(&conn, &queue, arguments(&dlx, same))
            .await
            .unwrap_or_else(|e| panic!("{width} refused: {e}"));
    }
    let refused = redeclare(&conn, &queue, arguments(&dlx, AMQPValue::LongInt(600_001)))
        .await
        .expect_err("another value is a different queue");
    assert!(refused.contains("PRECONDITION_FAILED"), "{refused}");
    let as_text = redeclare(
        &conn,
        &queue,
        arguments(&dlx, AMQPValue::LongString("600000".into())),
    )
    .await
    .expect_err("a string is not an integer");
    assert!(as_text.contains("PRECONDITION_FAILED"), "{as_text}");

    amqp::delete_topology(&channel, &topology, &["bank"])
        .await
        .expect("delete topology");
    close_broker(&conn).await;
}
