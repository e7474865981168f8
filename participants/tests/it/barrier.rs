//! The barrier against a real PostgreSQL: duplicates, null compensation, anti-hanging, races,
//! failures and cleanup.

use std::time::{Duration, Instant};

use sagas_participant::barrier::{self, BarrierError, Origin};
use sagas_participant::protocol::{Operation, Outcome};
use sagas_participant::runtime::process;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{TestDb, again, bank, command};

fn null_compensation() -> Outcome {
    Outcome::succeeded(json!({ "null_compensation": true }))
}

fn is_refusal(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Failed { reason } if reason.contains("anti-hanging"))
}

#[tokio::test]
async fn a_duplicate_delivery_of_each_operation_returns_the_stored_reply_and_applies_the_change_once()
 {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let router = bank();
    let pay = json!({ "account": "a", "amount": 10 });

    // TCC: try + confirm, each delivered twice.
    let t1 = Uuid::new_v4();
    for (op, expected) in [(Operation::Try, (90, 10)), (Operation::Confirm, (90, 0))] {
        let cmd = command(t1, "reserve", op, pay.clone());
        let first = barrier::execute(&db.pool, &cmd, &router).await.unwrap();
        assert_eq!(first.status(), "succeeded", "{op}: {first:?}");
        let second = barrier::execute(&db.pool, &again(&cmd), &router)
            .await
            .unwrap();
        assert_eq!(first, second, "{op}");
        assert_eq!(db.account("a").await, expected, "{op}");
    }

    // TCC: try + cancel, the cancel delivered twice.
    let t2 = Uuid::new_v4();
    let tried = barrier::execute(
        &db.pool,
        &command(t2, "reserve", Operation::Try, pay.clone()),
        &router,
    )
    .await
    .unwrap();
    assert_eq!(tried.status(), "succeeded");
    assert_eq!(db.account("a").await, (80, 10));
    let cancel = command(t2, "reserve", Operation::Cancel, pay.clone());
    let first = barrier::execute(&db.pool, &cancel, &router).await.unwrap();
    let second = barrier::execute(&db.pool, &again(&cancel), &router)
        .await
        .unwrap();
    assert_eq!(first, Outcome::succeeded(json!({ "released": 10 })));
    assert_eq!(first, second);
    assert_eq!(db.account("a").await, (90, 0));

    // Saga: action + compensate, each delivered twice.
    let t3 = Uuid::new_v4();
    for (op, expected) in [
        (Operation::Action, (100, 0)),
        (Operation::Compensate, (90, 0)),
    ] {
        let cmd = command(t3, "credit", op, pay.clone());
        let first = barrier::execute(&db.pool, &cmd, &router).await.unwrap();
        assert_eq!(first.status(), "succeeded", "{op}: {first:?}");
        let second = barrier::execute(&db.pool, &again(&cmd), &router)
            .await
            .unwrap();
        assert_eq!(first, second, "{op}");
        assert_eq!(db.account("a").await, expected, "{op}");
    }
}

#[tokio::test]
async fn a_concurrent_duplicate_waits_for_the_first_delivery_and_returns_its_reply() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let router = bank();
    let cmd = command(
        Uuid::new_v4(),
        "reserve",
        Operation::Try,
        json!({ "account": "a", "amount": 10, "sleep_ms": 200 }),
    );
    let duplicate = again(&cmd);
    let (first, second) = tokio::join!(barrier::execute(&db.pool, &cmd, &router), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        barrier::execute(&db.pool, &duplicate, &router).await
    });
    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!(first.status(), "succeeded");
    assert_eq!(first, second);
    assert_eq!(db.account("a").await, (90, 10));
}

#[tokio::test]
async fn cancel_before_try_records_a_null_compensation_and_refuses_the_late_try() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let router = bank();
    let id = Uuid::new_v4();
    let pay = json!({ "account": "a", "amount": 10 });

    let cancel = command(id, "reserve", Operation::Cancel, pay.clone());
    assert_eq!(
        barrier::execute(&db.pool, &cancel, &router).await.unwrap(),
        null_compensation()
    );
    let late_try = command(id, "reserve", Operation::Try, pay.clone());
    let refused = barrier::execute(&db.pool, &late_try, &router)
        .await
        .unwrap();
    assert!(is_refusal(&refused), "{refused:?}");
    assert_eq!(
        barrier::execute(&db.pool, &again(&late_try), &router)
            .await
            .unwrap(),
        refused
    );
    assert_eq!(db.account("a").await, (100, 0), "no business change");

    let records = barrier::records(&db.pool, id).await.unwrap();
    let origins: Vec<_> = records
        .iter()
        .map(|r| (r.operation.as_str(), r.origin))
        .collect();
    assert_eq!(
        origins,
        [
            ("cancel", Some(Origin::NullCompensation)),
            ("try", Some(Origin::Guard))
        ]
    );
}

#[tokio::test]
async fn compensate_before_action_records_a_null_compensation_and_refuses_the_late_action() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let router = bank();
    let id = Uuid::new_v4();
    let pay = json!({ "account": "a", "amount": 10 });

    let compensate = command(id, "credit", Operation::Compensate, pay.clone());
    assert_eq!(
        barrier::execute(&db.pool, &compensate, &router)
            .await
            .unwrap(),
        null_compensation()
    );
    let refused = barrier::execute(
        &db.pool,
        &command(id, "credit", Operation::Action, pay),
        &router,
    )
    .await
    .unwrap();
    assert!(is_refusal(&refused), "{refused:?}");
    assert_eq!(db.account("a").await, (100, 0), "no business change");
}

/// Asserts that one try/cancel pair ended consistently; true if the try took effect first.
async fn assert_consistent(db: &TestDb, tried: &Outcome, cancelled: &Outcome) -> bool {
    assert_eq!(
        db.account("a").await,
        (100, 0),
        "try {tried:?}, cancel {cancelled:?}"
    );
    match tried {
        Outcome::Succeeded { .. } => {
            assert_eq!(cancelled, &Outcome::succeeded(json!({ "released": 10 })));
            true
        }
        refused if is_refusal(refused) => {
            assert_eq!(cancelled, &null_compensation());
            false
        }
        other => panic!("unexpected try outcome {other:?}"),
    }
}

#[tokio::test]
async fn try_and_cancel_racing_end_cancelled_when_the_try_holds_the_key_first() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let router = bank();
    let id = Uuid::new_v4();
    let slow_try = command(
        id,
        "reserve",
        Operation::Try,
        json!({ "account": "a", "amount": 10, "sleep_ms": 300 }),
    );
    let cancel = command(
        id,
        "reserve",
        Operation::Cancel,
        json!({ "account": "a", "amount": 10 }),
    );
    let (tried, cancelled) = tokio::join!(barrier::execute(&db.pool, &slow_try, &router), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        barrier::execute(&db.pool, &cancel, &router).await
    });
    let (tried, cancelled) = (tried.unwrap(), cancelled.unwrap());
    assert!(assert_consistent(&db, &tried, &cancelled).await);
}

#[tokio::test]
async fn try_and_cancel_racing_end_in_a_null_compensation_when_the_cancel_holds_the_key_first() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    // Keeps the cancel's transaction open for a while right after it wrote the guard row, so
    // that the try really waits on the primary key.
    sqlx::raw_sql(
        "CREATE FUNCTION slow_guard() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.origin = 'guard' THEN PERFORM pg_sleep(0.3); END IF; RETURN NEW; END $$; \
         CREATE TRIGGER slow_guard AFTER INSERT ON sagas_barrier \
         FOR EACH ROW EXECUTE FUNCTION slow_guard();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let router = bank();
    let id = Uuid::new_v4();
    let pay = json!({ "account": "a", "amount": 10 });
    let try_ = command(id, "reserve", Operation::Try, pay.clone());
    let cancel = command(id, "reserve", Operation::Cancel, pay);
    let (cancelled, (tried, waited)) =
        tokio::join!(barrier::execute(&db.pool, &cancel, &router), async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let started = Instant::now();
            let tried = barrier::execute(&db.pool, &try_, &router).await;
            (tried, started.elapsed())
        });
    let (tried, cancelled) = (tried.unwrap(), cancelled.unwrap());
    assert!(!assert_consistent(&db, &tried, &cancelled).await);
    assert!(
        waited >= Duration::from_millis(100),
        "the try waited {waited:?}"
    );
}

#[tokio::test]
async fn try_and_cancel_racing_with_random_timing_always_end_consistent() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let router = bank();
    let pay = json!({ "account": "a", "amount": 10 });
    let (mut try_first, mut cancel_first) = (0, 0);
    for _ in 0..60 {
        let id = Uuid::new_v4();
        let jitter = id.as_bytes();
        let (try_delay, cancel_delay) = (
            Duration::from_micros(u64::from(jitter[0]) * 12),
            Duration::from_micros(u64::from(jitter[1]) * 12),
        );
        let try_ = command(id, "reserve", Operation::Try, pay.clone());
        let cancel = command(id, "reserve", Operation::Cancel, pay.clone());
        let (tried, cancelled) = tokio::join!(
            async {
                tokio::time::sleep(try_delay).await;
                barrier::execute(&db.pool, &try_, &router).await
            },
            async {
                tokio::time::sleep(cancel_delay).await;
                barrier::execute(&db.pool, &cancel, &router).await
            }
        );
        let (tried, cancelled) = (tried.unwrap(), cancelled.unwrap());
        if assert_consistent(&db, &tried, &cancelled).await {
            try_first += 1;
        } else {
            cancel_first += 1;
        }
        // Whatever happened, a redelivered try now gets the same answer.
        assert_eq!(
            barrier::execute(&db.pool, &again(&try_), &router)
                .await
                .unwrap(),
            tried
        );
    }
    eprintln!("try first: {try_first}, cancel first: {cancel_first}");
}

#[tokio::test]
async fn a_business_failure_rolls_back_the_handler_writes_but_keeps_the_failed_reply() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let router = bank();
    let id = Uuid::new_v4();
    let failing = command(
        id,
        "reserve",
        Operation::Try,
        json!({ "account": "a", "amount": 10, "fail": "business_after_write" }),
    );
    let failed = barrier::execute(&db.pool, &failing, &router).await.unwrap();
    assert_eq!(failed, Outcome::failed("injected business failure"));
    assert_eq!(
        db.account("a").await,
        (100, 0),
        "the handler's write was rolled back"
    );

    // A redelivery gets the stored failure even if the handler would now succeed.
    let mut redelivery = again(&failing);
    redelivery.payload = json!({ "account": "a", "amount": 10 });
    assert_eq!(
        barrier::execute(&db.pool, &redelivery, &router)
            .await
            .unwrap(),
        failed
    );
    assert_eq!(db.account("a").await, (100, 0));

    // Cancelling a try that failed is a null compensation: its effect never happened.
    let cancel = command(
        id,
        "reserve",
        Operation::Cancel,
        json!({ "account": "a", "amount": 10 }),
    );
    assert_eq!(
        barrier::execute(&db.pool, &cancel, &router).await.unwrap(),
        null_compensation()
    );
    assert_eq!(db.account("a").await, (100, 0));
}

#[tokio::test]
async fn a_transient_error_leaves_no_barrier_row_and_a_redelivery_runs_the_handler() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let router = bank();
    let id = Uuid::new_v4();
    let flaky = command(
        id,
        "reserve",
        Operation::Try,
        json!({ "account": "a", "amount": 10, "fail": "transient" }),
    );
    let outcome = barrier::execute(&db.pool, &flaky, &router).await.unwrap();
    assert_eq!(outcome.status(), "retry", "{outcome:?}");
    assert!(barrier::records(&db.pool, id).await.unwrap().is_empty());
    assert_eq!(db.account("a").await, (100, 0));

    let mut redelivery = again(&flaky);
    redelivery.payload = json!({ "account": "a", "amount": 10 });
    let outcome = barrier::execute(&db.pool, &redelivery, &router)
        .await
        .unwrap();
    assert_eq!(outcome.status(), "succeeded");
    assert_eq!(db.account("a").await, (90, 10));
}

#[tokio::test]
async fn a_business_failure_of_a_cancel_is_not_stored_so_a_retry_runs_it_again() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let router = bank();
    let id = Uuid::new_v4();
    let pay = json!({ "account": "a", "amount": 10 });
    barrier::execute(
        &db.pool,
        &command(id, "reserve", Operation::Try, pay.clone()),
        &router,
    )
    .await
    .unwrap();
    let broken = command(
        id,
        "reserve",
        Operation::Cancel,
        json!({ "account": "a", "amount": 10, "fail_undo": "business" }),
    );
    let outcome = barrier::execute(&db.pool, &broken, &router).await.unwrap();
    assert_eq!(outcome.status(), "failed");
    assert_eq!(
        db.account("a").await,
        (90, 10),
        "the cancel's writes were rolled back"
    );

    let mut fixed = again(&broken);
    fixed.payload = pay;
    let outcome = barrier::execute(&db.pool, &fixed, &router).await.unwrap();
    assert_eq!(outcome, Outcome::succeeded(json!({ "released": 10 })));
    assert_eq!(db.account("a").await, (100, 0));
}

#[tokio::test]
async fn an_unknown_step_is_a_stored_business_failure() {
    let db = TestDb::new().await;
    let id = Uuid::new_v4();
    let cmd = command(id, "teleport", Operation::Action, json!({}));
    let outcome = barrier::execute(&db.pool, &cmd, &bank()).await.unwrap();
    assert!(
        matches!(&outcome, Outcome::Failed { reason } if reason.contains("no handler")),
        "{outcome:?}"
    );
    assert_eq!(barrier::records(&db.pool, id).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_panicking_handler_yields_retry_and_leaves_the_pool_usable() {
    let db = TestDb::with_connections(1).await;
    db.open("a", 100).await;
    let router = bank();
    let id = Uuid::new_v4();
    let panicky = command(
        id,
        "reserve",
        Operation::Try,
        json!({ "account": "a", "amount": 10, "fail": "panic" }),
    );
    let outcome = process(&db.pool, &router, &panicky).await;
    assert!(
        matches!(&outcome, Outcome::Retry { reason, .. } if reason.contains("panicked")),
        "{outcome:?}"
    );
    assert!(barrier::records(&db.pool, id).await.unwrap().is_empty());
    assert_eq!(db.account("a").await, (100, 0));

    let mut redelivery = again(&panicky);
    redelivery.payload = json!({ "account": "a", "amount": 10 });
    assert_eq!(
        process(&db.pool, &router, &redelivery).await.status(),
        "succeeded"
    );
    assert_eq!(db.account("a").await, (90, 10));
}

#[tokio::test]
async fn cleanup_removes_old_rows_of_finished_transactions_only() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let router = bank();
    let pay = json!({ "account": "a", "amount": 10 });
    let (old, mixed, fresh) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    for id in [old, mixed, fresh] {
        for op in [Operation::Try, Operation::Confirm] {
            barrier::execute(&db.pool, &command(id, "reserve", op, pay.clone()), &router)
                .await
                .unwrap();
        }
    }
    // `old`: every row is two days old; `mixed`: only its try is.
    sqlx::query(
        "UPDATE sagas_barrier SET created_at = now() - interval '2 days' \
         WHERE transaction_id = $1 OR (transaction_id = $2 AND operation = 'try')",
    )
    .bind(old)
    .bind(mixed)
    .execute(&db.pool)
    .await
    .unwrap();

    let deleted = barrier::cleanup(&db.pool, chrono::Duration::days(1))
        .await
        .unwrap();
    assert_eq!(deleted, 2);
    assert!(barrier::records(&db.pool, old).await.unwrap().is_empty());
    assert_eq!(barrier::records(&db.pool, mixed).await.unwrap().len(), 2);
    assert_eq!(barrier::records(&db.pool, fresh).await.unwrap().len(), 2);
    assert!(matches!(
        barrier::cleanup(&db.pool, chrono::Duration::days(-1)).await,
        Err(BarrierError::NegativeRetention)
    ));
}

#[tokio::test]
async fn cleanup_goes_through_a_backlog_in_batches_and_records_its_horizon() {
    let db = TestDb::new().await;
    // 2,500 old transactions, more than two batches of rows, with 50 kept ones (a newer row)
    // among them, and no horizon yet.
    sqlx::query(
        "INSERT INTO sagas_barrier (transaction_id, step, operation, origin, reply, created_at)
         SELECT t.id, 'reserve', op, 'handler', '{\"status\": \"succeeded\"}',
                now() - interval '10 days' + t.n * interval '1 second'
         FROM (SELECT n, gen_random_uuid() AS id FROM generate_series(1, 2500) AS n) AS t,
              unnest(ARRAY['action', 'compensate']) AS op",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO sagas_barrier (transaction_id, step, operation, origin, created_at)
         SELECT transaction_id, 'notify', 'action', 'handler', now() FROM sagas_barrier
         WHERE operation = 'action' ORDER BY created_at LIMIT 50 OFFSET 1000",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let horizon = || async {
        sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>(
            "SELECT pruned_before FROM sagas_barrier_retention",
        )
        .fetch_optional(&db.pool)
        .await
        .unwrap()
    };
    assert_eq!(horizon().await, None);

    let before = chrono::Utc::now() - chrono::Duration::days(1);
    let deleted = barrier::cleanup(&db.pool, chrono::Duration::days(1))
        .await
        .unwrap();
    assert_eq!(deleted, 2 * 2450);
    let (left,): (i64,) =
        sqlx::query_as("SELECT count(DISTINCT transaction_id) FROM sagas_barrier")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(left, 50, "the transactions with a newer row are kept whole");
    let recorded = horizon().await.expect("a horizon once rows were deleted");
    assert!(
        (recorded - before).num_seconds().abs() < 60,
        "{recorded} is the cutoff, now minus the retention"
    );
    // Nothing more to delete: the horizon stays.
    let deleted = barrier::cleanup(&db.pool, chrono::Duration::days(3))
        .await
        .unwrap();
    assert_eq!(deleted, 0);
    assert_eq!(horizon().await, Some(recorded));
}

#[tokio::test]
async fn cleanup_keeps_a_tcc_try_awaiting_its_confirm_or_cancel_however_old() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let router = bank();
    let pay = json!({ "account": "a", "amount": 10 });
    let (open, refused, finished) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    // `open`: tried, never confirmed nor cancelled (the transaction is stuck or slow).
    barrier::execute(
        &db.pool,
        &command(open, "reserve", Operation::Try, pay.clone()),
        &router,
    )
    .await
    .unwrap();
    // `refused`: a try that failed needs no confirm or cancel.
    let failing = json!({ "account": "a", "amount": 10, "fail": "business" });
    barrier::execute(
        &db.pool,
        &command(refused, "reserve", Operation::Try, failing),
        &router,
    )
    .await
    .unwrap();
    // `finished`: tried and cancelled.
    for op in [Operation::Try, Operation::Cancel] {
        barrier::execute(
            &db.pool,
            &command(finished, "reserve", op, pay.clone()),
            &router,
        )
        .await
        .unwrap();
    }
    sqlx::query("UPDATE sagas_barrier SET created_at = now() - interval '30 days'")
        .execute(&db.pool)
        .await
        .unwrap();

    let deleted = barrier::cleanup(&db.pool, chrono::Duration::days(7))
        .await
        .unwrap();
    assert_eq!(deleted, 3);
    assert_eq!(barrier::records(&db.pool, open).await.unwrap().len(), 1);
    assert!(
        barrier::records(&db.pool, refused)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        barrier::records(&db.pool, finished)
            .await
            .unwrap()
            .is_empty()
    );
    // A redelivered try of the open transaction still gets its stored answer: no second effect.
    let again = barrier::execute(
        &db.pool,
        &command(open, "reserve", Operation::Try, pay),
        &router,
    )
    .await
    .unwrap();
    assert_eq!(again.status(), "succeeded");
    assert_eq!(db.account("a").await, (90, 10));
}

#[tokio::test]
async fn installing_the_barrier_concurrently_and_repeatedly_is_harmless() {
    let db = TestDb::new().await;
    let (a, b, c) = tokio::join!(
        barrier::install(&db.pool),
        barrier::install(&db.pool),
        barrier::install(&db.pool)
    );
    a.unwrap();
    b.unwrap();
    c.unwrap();
}
