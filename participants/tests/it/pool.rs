//! The pools of the orchestrator and of the participant runtime (`config::pool_options`): a
//! connection is checked before it is handed out only when it sat idle for a while.

use std::time::Duration;

use sagas_participant::config::{IDLE_CHECK_AFTER, database_options, pool_options};
use sqlx::PgPool;
use tokio::time::Instant;

use crate::helpers::TestDb;

async fn backend_pid(pool: &PgPool) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(pool)
        .await
}

/// Terminates backend `pid` and waits (up to 10 s) until it is gone.
async fn terminate(pid: i32) {
    let mut admin = sagas_test_support::admin().await.expect("admin connection");
    let sent: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&mut admin)
        .await
        .expect("terminate");
    assert!(sent, "backend {pid} was there to terminate");
    for _ in 0..500 {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = $1")
            .bind(pid)
            .fetch_one(&mut admin)
            .await
            .expect("pg_stat_activity");
        if left == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("backend {pid} still there after 10 s");
}

/// Waits (up to 10 s) until the pool's one connection is back in it: it goes back after the
/// check sqlx makes as it takes a connection back, off the caller's path.
async fn back_in(pool: &PgPool) {
    for _ in 0..500 {
        if pool.num_idle() == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the connection is not back in the pool after 10 s");
}

#[tokio::test]
async fn a_pooled_connection_is_checked_only_once_it_sat_idle_for_a_second() {
    let db = TestDb::new().await;
    let options = database_options(db.url()).expect("database URL");
    let pool = pool_options(1).connect_with(options).await.expect("pool");

    // Used a moment ago: handed out without a round trip, so a backend terminated meanwhile
    // fails its next use, once; the pool then opens a fresh connection. (Idle since after
    // `used`: unchecked while less than IDLE_CHECK_AFTER has passed since.)
    let used = Instant::now();
    let first = backend_pid(&pool).await.expect("first use");
    back_in(&pool).await;
    terminate(first).await;
    let unchecked = used.elapsed() < IDLE_CHECK_AFTER;
    let next = backend_pid(&pool).await;
    if unchecked {
        assert!(
            next.is_err(),
            "a dead connection used a moment ago is not checked: {next:?}"
        );
    }
    let fresh = backend_pid(&pool).await.expect("a fresh connection");
    assert_ne!(fresh, first);

    // Idle for IDLE_CHECK_AFTER: checked as it is taken, and replaced unnoticed. (Idle since
    // before `released`.)
    back_in(&pool).await;
    let released = Instant::now();
    terminate(fresh).await;
    tokio::time::sleep_until(released + IDLE_CHECK_AFTER).await;
    let replaced = backend_pid(&pool)
        .await
        .expect("a connection that sat idle is checked and replaced before it is handed out");
    assert_ne!(replaced, fresh);

    pool.close().await;
}
