//! Batches that share rows, against a real PostgreSQL and RabbitMQ: run in the order of their
//! lock keys, concurrent batches take those rows in one order and never deadlock.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sagas_participant::handler::{Handler, HandlerError};
use sagas_participant::protocol::{Command, Operation, Outcome};
use sagas_participant::runtime::{Participant, Stats};
use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::helpers::{TestBroker, TestDb, command, element, start_with};

const PARTICIPANT: &str = "rows";

/// The shared rows.
const ROWS: [&str; 4] = ["r0", "r1", "r2", "r3"];

/// Adds `delta` to the row its command names, then holds the lock a little (so that batches
/// overlap); its lock key is that row.
struct Shift;

#[async_trait]
impl Handler for Shift {
    async fn handle(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        let updated = sqlx::query("UPDATE shared_rows SET n = n + $2 WHERE id = $1")
            .bind(cmd.payload["row"].as_str())
            .bind(cmd.payload["delta"].as_i64())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if updated != 1 {
            return Err(HandlerError::business("no such row"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok(json!({ "shifted": cmd.payload["delta"] }))
    }

    fn lock_key(&self, cmd: &Command) -> Option<String> {
        cmd.payload["row"].as_str().map(str::to_owned)
    }
}

/// The rows of message `m`, in the order its commands name them: every rotation of the rows,
/// forwards and backwards, each row twice, so that in the order they arrive two messages run
/// together take the rows in opposite orders.
fn rows_of(m: usize) -> Vec<&'static str> {
    let mut rows = ROWS.to_vec();
    rows.rotate_left(m % ROWS.len());
    if (m / ROWS.len()) % 2 == 1 {
        rows.reverse();
    }
    rows.iter().chain(rows.iter()).copied().collect()
}

async fn deadlocks(db: &TestDb) -> i64 {
    let (n,): (i64,) =
        sqlx::query_as("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
            .fetch_one(&db.pool)
            .await
            .expect("read pg_stat_database");
    n
}

#[tokio::test]
async fn concurrent_batches_over_shared_rows_never_deadlock_and_answer_every_command_once() {
    let db = TestDb::with_connections(12).await;
    sqlx::raw_sql(
        "CREATE TABLE shared_rows (id text PRIMARY KEY, n bigint NOT NULL); \
         INSERT INTO shared_rows VALUES ('r0', 1000), ('r1', 1000), ('r2', 1000), ('r3', 1000)",
    )
    .execute(&db.pool)
    .await
    .expect("create the shared rows");
    let deadlocks_before = deadlocks(&db).await;
    let broker = TestBroker::new().await;
    broker.declare_participant(PARTICIPANT).await;

    // Command batches of 8 commands, queued before the participants start; +1 and -1 in turn,
    // so that each message leaves the total as it was.
    let (messages, per_message) = (24, 8);
    let mut expected: HashMap<&str, i64> = ROWS.iter().map(|r| (*r, 1000)).collect();
    let mut sent: HashMap<Uuid, i64> = HashMap::new();
    for m in 0..messages {
        let elements: Vec<Vec<u8>> = rows_of(m)
            .into_iter()
            .enumerate()
            .map(|(i, row)| {
                let delta = if i % 2 == 0 { 1 } else { -1 };
                *expected.get_mut(row).unwrap() += delta;
                let cmd = command(
                    Uuid::new_v4(),
                    "shift",
                    Operation::Action,
                    json!({ "row": row, "delta": delta }),
                );
                sent.insert(cmd.transaction_id, delta);
                element(&cmd)
            })
            .collect();
        assert_eq!(elements.len(), per_message);
        broker.send_batch(PARTICIPANT, &elements).await;
    }

    // Three processes, each running a batch of up to 8 commands at a time.
    let running: Vec<_> = (0..3)
        .map(|_| {
            start_with(
                Participant::new(
                    PARTICIPANT,
                    broker.topology.clone(),
                    db.pool.clone(),
                    Arc::new(Shift),
                )
                .queue_options(broker.options.clone())
                .prefetch(2)
                .concurrency(2)
                .batch_size(per_message),
            )
        })
        .collect();

    let mut answered: HashMap<Uuid, u32> = HashMap::new();
    while answered.values().sum::<u32>() < sent.len() as u32 {
        let (replies, _) = broker.next_reply_batch().await;
        for reply in replies {
            let delta = sent[&reply.transaction_id];
            assert_eq!(
                reply.outcome,
                Outcome::succeeded(json!({ "shifted": delta })),
                "{reply:?}"
            );
            *answered.entry(reply.transaction_id).or_default() += 1;
        }
    }
    assert_eq!(answered.len(), sent.len());
    assert!(answered.values().all(|&n| n == 1), "each answered once");

    // Counted once their replies are confirmed, which can be after they were delivered.
    let stats: Vec<Stats> = running.iter().map(|r| r.stats.clone()).collect();
    let total = sent.len() as u64;
    for _ in 0..500 {
        if stats.iter().map(Stats::processed).sum::<u64>() >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stats.iter().map(Stats::processed).sum::<u64>(), total);
    assert_eq!(
        broker
            .ready_messages(&broker.topology.replies_queue())
            .await,
        0,
        "no second reply"
    );
    let fallbacks: u64 = stats.iter().map(Stats::batch_fallbacks).sum();
    let batches: u64 = stats.iter().map(Stats::batches).sum();
    assert!(batches >= 3, "batches formed: {batches}");
    assert_eq!(fallbacks, 0, "batches rolled back (deadlocks)");
    assert_eq!(deadlocks(&db).await, deadlocks_before, "deadlocks detected");

    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT id, n FROM shared_rows ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    for (id, n) in &rows {
        assert_eq!(*n, expected[id.as_str()], "row {id}");
    }
    assert_eq!(rows.iter().map(|(_, n)| n).sum::<i64>(), 4_000, "conserved");
    let (barrier_rows,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM sagas_barrier WHERE reply->>'status' = 'succeeded'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(barrier_rows, total as i64, "each applied once");

    for running in running {
        running.shutdown().await;
    }
    broker.teardown(&[PARTICIPANT]).await;
}
