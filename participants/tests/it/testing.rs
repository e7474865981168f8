//! The handler test harness, used the way a participant team would use it.

use std::time::Duration;

use sagas_participant::barrier::Origin;
use sagas_participant::testing::{TestHarness, command};
use sagas_participant::{Operation, Outcome};
use serde_json::json;

use crate::helpers::{TestDb, bank};

#[tokio::test]
async fn the_harness_runs_a_try_through_the_barrier_and_answers_duplicates_from_it() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let harness = TestHarness::new(db.pool.clone(), bank()).await.unwrap();
    let try_ = command("reserve", Operation::Try)
        .payload(json!({ "account": "a", "amount": 30 }))
        .build();

    let reply = harness.send(&try_).await;
    assert_eq!(reply.outcome, Outcome::succeeded(json!({ "reserved": 30 })));
    assert_eq!(
        (reply.transaction_id, reply.attempt),
        (try_.transaction_id, 1)
    );
    assert_eq!(
        harness.send(&try_.redelivered()).await.outcome,
        reply.outcome
    );
    assert_eq!(db.account("a").await, (70, 30));
    assert_eq!(
        harness.origin(&try_, Operation::Try).await.unwrap(),
        Some(Origin::Handler)
    );

    let confirm = try_.follow_up(Operation::Confirm, Some(json!({ "reserved": 30 })));
    assert_eq!(harness.send(&confirm).await.outcome.status(), "succeeded");
    assert_eq!(db.account("a").await, (70, 0));
    assert_eq!(harness.barrier(&try_).await.unwrap().len(), 2);
}

#[tokio::test]
async fn the_harness_shows_null_compensation_and_the_refused_late_try() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let harness = TestHarness::new(db.pool.clone(), bank()).await.unwrap();
    let try_ = command("reserve", Operation::Try)
        .payload(json!({ "account": "a", "amount": 30 }))
        .build();
    let cancel = try_.follow_up(Operation::Cancel, None);

    let reply = harness.send(&cancel).await;
    assert_eq!(
        reply.outcome,
        Outcome::succeeded(json!({ "null_compensation": true }))
    );
    assert_eq!(harness.send(&try_).await.outcome.status(), "failed");
    assert_eq!(db.account("a").await, (100, 0));
    assert_eq!(
        harness.origin(&try_, Operation::Cancel).await.unwrap(),
        Some(Origin::NullCompensation)
    );
    assert_eq!(
        harness.origin(&try_, Operation::Try).await.unwrap(),
        Some(Origin::Guard)
    );
}

#[tokio::test]
async fn the_harness_applies_the_handler_time_limit() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let harness = TestHarness::new(db.pool.clone(), bank())
        .await
        .unwrap()
        .handler_timeout(Duration::from_millis(100));
    let slow = command("credit", Operation::Action)
        .payload(json!({ "account": "a", "amount": 5, "sleep_ms": 2_000 }))
        .build();
    let reply = harness.send(&slow).await;
    assert_eq!(reply.outcome.status(), "retry", "{reply:?}");
    assert!(harness.barrier(&slow).await.unwrap().is_empty());
}
