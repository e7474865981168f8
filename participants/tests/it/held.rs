//! Connections kept between transactions (`held`): handed out again without the pool's check
//! on the way back, counted against the pool when kept as its own, and given back to it with
//! their transaction rolled back when they did not end cleanly; and the participant runtime's
//! handler slots taking theirs from there.

use std::sync::Arc;
use std::time::Duration;

use sagas_participant::config::{database_options, pool_options};
use sagas_participant::held::{Held, Keep};
use sagas_participant::protocol::Operation;
use serde_json::json;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

use crate::helpers::{TestBroker, TestDb, bank_participant, command, start_with, wait_processed};

async fn backend_pid(conn: &mut PgConnection) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(conn)
        .await
        .expect("pg_backend_pid")
}

/// Waits (up to 10 s) until `pool` holds `idle` idle connections, and returns whether it did.
async fn idle_in(pool: &PgPool, idle: usize) -> bool {
    for _ in 0..500 {
        if pool.num_idle() == idle {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

async fn pool_of(db: &TestDb, size: u32) -> PgPool {
    let options = database_options(db.url()).expect("database URL");
    pool_options(size)
        .connect_with(options)
        .await
        .expect("pool")
}

#[tokio::test]
async fn a_kept_connection_is_handed_out_again_and_stays_counted_against_the_pool() {
    let db = TestDb::new().await;
    let pool = pool_of(&db, 2).await;
    let held = Held::new(1, Keep::Counted, None);

    let mut first = held.take(&pool).await.expect("a connection");
    assert!(first.is_kept(), "the first taker's connection is kept");
    let pid = backend_pid(&mut first).await;
    first.give_back();
    assert_eq!(pool.size(), 1, "one connection opened");
    assert_eq!(pool.num_idle(), 0, "the kept one is not back in the pool");

    let mut again = held.take(&pool).await.expect("the kept connection");
    assert_eq!(backend_pid(&mut again).await, pid, "the same backend");
    // A second taker while the kept one is out: one of the pool's, which goes back to it.
    let mut other = held.take(&pool).await.expect("a pooled connection");
    assert!(!other.is_kept(), "only one is kept");
    assert_ne!(backend_pid(&mut other).await, pid);
    other.give_back();
    assert!(
        idle_in(&pool, 1).await,
        "the pooled one went back to the pool"
    );
    again.give_back();
    assert_eq!(pool.num_idle(), 1, "the kept one still is not");

    drop(held);
    assert!(
        idle_in(&pool, 2).await,
        "dropping the holder gives its kept connections back to the pool"
    );
}

#[tokio::test]
async fn a_kept_connection_not_given_back_returns_to_the_pool_with_its_transaction_rolled_back() {
    let db = TestDb::new().await;
    db.open("alice", 100).await;
    let pool = pool_of(&db, 1).await;
    let held = Held::new(1, Keep::Counted, None);

    let mut conn = held.take(&pool).await.expect("a connection");
    let mut tx = conn.begin().await.expect("begin");
    sqlx::query("UPDATE accounts SET balance = 0 WHERE id = 'alice'")
        .execute(&mut *tx)
        .await
        .expect("update");
    // Neither committed nor given back: the transaction was abandoned (a batch that failed).
    drop(tx);
    drop(conn);

    assert!(
        idle_in(&pool, 1).await,
        "the connection went back to the pool"
    );
    // Its rollback went with it: the row is neither changed nor locked.
    let mut other = PgConnection::connect(db.url()).await.expect("connect");
    let balance: i64 =
        sqlx::query_scalar("SELECT balance FROM accounts WHERE id = 'alice' FOR UPDATE NOWAIT")
            .fetch_one(&mut other)
            .await
            .expect("the row is not locked");
    assert_eq!(balance, 100);

    // The next taker keeps a connection again.
    let next = held.take(&pool).await.expect("a connection");
    assert!(next.is_kept());
}

#[tokio::test]
async fn a_taker_waiting_for_the_pool_takes_a_kept_connection_given_back_meanwhile() {
    let db = TestDb::new().await;
    let pool = pool_of(&db, 1).await;
    // The pool's one connection is kept: a second taker can only wait for it.
    let held = Arc::new(Held::new(1, Keep::Counted, None));
    let mut first = held.take(&pool).await.expect("a connection");
    let pid = backend_pid(&mut first).await;

    let waiting = {
        let (held, pool) = (held.clone(), pool.clone());
        tokio::spawn(async move {
            let mut conn = held.take(&pool).await.expect("a connection");
            let pid = backend_pid(&mut conn).await;
            conn.give_back();
            pid
        })
    };
    // A moment for it to start waiting for the pool (had it not, it finds the connection
    // given back at once, and the test passes without showing anything).
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiting.is_finished(), "the second taker waits");
    first.give_back();
    let taken = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting taker has the kept connection within 10 s")
        .expect("no panic");
    assert_eq!(taken, pid);
}

#[tokio::test]
async fn a_participant_serving_commands_one_by_one_keeps_its_connection_out_of_the_pool_until_it_stops()
 {
    let db = TestDb::new().await;
    db.open("alice", 100).await;
    let broker = TestBroker::new().await;
    let running = start_with(bank_participant(&db, &broker));
    broker
        .wait_consumer(&broker.topology.participant_queue("bank"))
        .await;
    let idle_before = db.pool.num_idle();

    for n in 0..5u64 {
        let cmd = command(
            Uuid::new_v4(),
            "credit",
            Operation::Action,
            json!({"account": "alice", "amount": 1}),
        );
        broker.send("bank", &cmd).await;
        let (reply, _) = broker.next_reply().await;
        assert_eq!(reply.transaction_id, cmd.transaction_id);
        wait_processed(&running.stats, n + 1).await;
    }
    assert_eq!(
        db.account("alice").await.0,
        105,
        "every command applied once"
    );
    // One connection served the five, one after another; it stays out of the pool. (The
    // test's own read goes back to the pool after sqlx's check: waited for.)
    let mut out = 0;
    for _ in 0..500 {
        out = db.pool.size() as usize - db.pool.num_idle();
        if out == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        out,
        1,
        "one kept connection (pool of {}, {idle_before} idle before)",
        db.pool.size()
    );

    running.shutdown().await;
    let size = db.pool.size() as usize;
    assert!(
        idle_in(&db.pool, size).await,
        "a stopped participant gives its kept connection back to the pool"
    );
    broker.teardown(&["bank"]).await;
}
