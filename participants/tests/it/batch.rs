//! Several commands in one barrier transaction (`barrier::Batch`) against a real PostgreSQL:
//! the same outcomes and rows as the commands one after the other, failures of one command
//! confined to it, and failures of the transaction reported so that the caller runs the
//! commands alone.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sagas_participant::barrier::{self, BarrierError};
use sagas_participant::handler::{Handler, HandlerError, Router};
use sagas_participant::protocol::{Command, Operation, Outcome};
use serde_json::{Value, json};
use sqlx::types::Json;
use sqlx::{Connection as _, PgConnection, Row};
use uuid::Uuid;

use crate::helpers::{TestDb, again, bank, command};

/// Barrier rows (without their insertion time) and accounts: what a run leaves behind.
type Rows = (
    Vec<(Uuid, String, String, String, Option<Json<Value>>)>,
    Vec<(String, i64, i64)>,
);

async fn rows(db: &TestDb) -> Rows {
    let barrier = sqlx::query_as(
        "SELECT transaction_id, step, operation, origin, reply FROM sagas_barrier \
         ORDER BY transaction_id, step, operation",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let accounts = sqlx::query_as("SELECT id, balance, reserved FROM accounts ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    (barrier, accounts)
}

/// Runs `cmds` in one batch on a fresh database and one after the other on another; asserts
/// that both give the same outcomes and leave the same rows, and returns them.
async fn batch_equals_sequential(
    handler: &dyn Handler,
    accounts: &[(&str, i64)],
    cmds: &[Command],
) -> (Vec<Outcome>, Rows) {
    let (batched, sequential) = (TestDb::new().await, TestDb::new().await);
    for (id, balance) in accounts {
        batched.open(id, *balance).await;
        sequential.open(id, *balance).await;
    }
    let outcomes = barrier::execute_batch(&batched.pool, cmds, handler)
        .await
        .expect("the batch commits");
    let mut one_by_one = Vec::new();
    for cmd in cmds {
        one_by_one.push(
            barrier::execute(&sequential.pool, cmd, handler)
                .await
                .unwrap(),
        );
    }
    assert_eq!(outcomes, one_by_one);
    let left = rows(&batched).await;
    assert_eq!(left, rows(&sequential).await);
    (outcomes, left)
}

fn pay(amount: i64) -> Value {
    json!({ "account": "a", "amount": amount })
}

#[tokio::test]
async fn a_batch_gives_the_same_outcomes_and_rows_as_its_commands_one_after_the_other() {
    let t: Vec<Uuid> = (0..8).map(|_| Uuid::new_v4()).collect();
    let fresh = command(t[0], "credit", Operation::Action, pay(10));
    let failing = json!({ "account": "a", "amount": 10, "fail": "business_after_write" });
    let flaky = json!({ "account": "a", "amount": 10, "fail": "transient" });
    let broken_undo = json!({ "account": "a", "amount": 10, "fail_undo": "business" });
    let cmds = [
        fresh.clone(),
        // A duplicate delivery in the same batch: the stored reply, no second effect.
        again(&fresh),
        // A compensate overtaking its action: null compensation, then the action is refused.
        command(t[1], "credit", Operation::Compensate, pay(10)),
        command(t[1], "credit", Operation::Action, pay(10)),
        // A business failure in the middle: stored, its write rolled back.
        command(t[2], "reserve", Operation::Try, failing),
        // A transient failure in the middle: nothing stored.
        command(t[3], "reserve", Operation::Try, flaky),
        // TCC try + confirm, and try + cancel, each pair in the same batch.
        command(t[4], "reserve", Operation::Try, pay(10)),
        command(t[4], "reserve", Operation::Confirm, pay(10)),
        command(t[5], "reserve", Operation::Try, pay(10)),
        command(t[5], "reserve", Operation::Cancel, pay(10)),
        // A cancel failing for business reasons: not stored, its writes rolled back.
        command(t[6], "reserve", Operation::Try, pay(10)),
        command(t[6], "reserve", Operation::Cancel, broken_undo),
        // And the batch goes on after all of them.
        command(t[7], "credit", Operation::Action, pay(10)),
    ];
    let (outcomes, (barrier_rows, accounts)) =
        batch_equals_sequential(&bank(), &[("a", 100)], &cmds).await;

    let statuses: Vec<_> = outcomes.iter().map(Outcome::status).collect();
    assert_eq!(
        statuses,
        [
            "succeeded",
            "succeeded",
            "succeeded",
            "failed",
            "failed",
            "retry",
            "succeeded",
            "succeeded",
            "succeeded",
            "succeeded",
            "succeeded",
            "failed",
            "succeeded"
        ]
    );
    assert_eq!(outcomes[0], outcomes[1]);
    assert_eq!(
        outcomes[2],
        Outcome::succeeded(json!({ "null_compensation": true }))
    );
    assert!(
        matches!(&outcomes[3], Outcome::Failed { reason } if reason.contains("anti-hanging")),
        "{:?}",
        outcomes[3]
    );
    assert_eq!(outcomes[9], Outcome::succeeded(json!({ "released": 10 })));
    // +10 (t0) +10 (t7); t4 tried and confirmed, t5 tried and cancelled; t6 tried only.
    assert_eq!(accounts, [("a".to_owned(), 100, 10)]);
    let stored = |id: Uuid| barrier_rows.iter().filter(|r| r.0 == id).count();
    let per_transaction: Vec<_> = t.iter().map(|id| stored(*id)).collect();
    assert_eq!(per_transaction, [1, 2, 1, 0, 2, 2, 1, 1]);
}

/// The saga step `broken`: writes, then runs a statement that fails (and aborts the
/// transaction, or the savepoint it is in).
struct Broken;

#[async_trait]
impl Handler for Broken {
    async fn handle(&self, _cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        sqlx::query("UPDATE accounts SET balance = balance + 1000 WHERE id = 'a'")
            .execute(&mut *tx)
            .await?;
        sqlx::query("SELECT 1 / 0").execute(&mut *tx).await?;
        Ok(Value::Null)
    }
}

#[tokio::test]
async fn a_handler_statement_error_in_a_batch_rolls_back_only_its_own_command() {
    let router = bank().route("broken", Broken);
    let (broken, after) = (Uuid::new_v4(), Uuid::new_v4());
    let cmds = [
        command(Uuid::new_v4(), "credit", Operation::Action, pay(10)),
        command(broken, "broken", Operation::Action, json!({})),
        command(after, "credit", Operation::Action, pay(10)),
        // The broken command's transaction id again, on another step: unaffected.
        command(broken, "credit", Operation::Action, pay(10)),
    ];
    let (outcomes, (barrier_rows, accounts)) =
        batch_equals_sequential(&router, &[("a", 100)], &cmds).await;
    assert!(
        matches!(&outcomes[1], Outcome::Retry { reason, .. } if reason.contains("division by zero")),
        "{:?}",
        outcomes[1]
    );
    for i in [0, 2, 3] {
        assert_eq!(outcomes[i].status(), "succeeded", "{i}: {:?}", outcomes[i]);
    }
    assert_eq!(
        accounts,
        [("a".to_owned(), 130, 0)],
        "the +1000 is rolled back"
    );
    assert_eq!(barrier_rows.len(), 3);
    assert!(!barrier_rows.iter().any(|r| r.1 == "broken"));
}

#[tokio::test]
async fn a_batch_whose_connection_is_lost_commits_nothing_and_its_commands_then_run_alone() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let router = bank();
    let cmds: Vec<Command> = [0, 1_000, 0]
        .into_iter()
        .map(|sleep_ms| {
            let payload = json!({ "account": "a", "amount": 10, "sleep_ms": sleep_ms });
            command(Uuid::new_v4(), "reserve", Operation::Try, payload)
        })
        .collect();
    let (result, killed) = tokio::join!(barrier::execute_batch(&db.pool, &cmds, &router), async {
        db.wait_handler_in_transaction().await;
        db.kill_connections().await
    });
    assert!(killed >= 1);
    assert!(
        matches!(result, Err(BarrierError::Database(_))),
        "{result:?}"
    );
    for cmd in &cmds {
        assert!(
            barrier::records(&db.pool, cmd.transaction_id)
                .await
                .unwrap()
                .is_empty()
        );
    }
    assert_eq!(
        db.account("a").await,
        (100, 0),
        "nothing of the batch committed"
    );

    for cmd in &cmds {
        let outcome = barrier::execute(&db.pool, cmd, &router).await.unwrap();
        assert_eq!(outcome.status(), "succeeded", "{outcome:?}");
    }
    assert_eq!(db.account("a").await, (70, 30));
}

#[tokio::test]
async fn a_batch_whose_commit_fails_commits_nothing_and_its_commands_alone_answer_as_usual() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    db.open("b", 5).await;
    // Checked at commit only: an overdrawn account fails the commit, not the statement.
    sqlx::raw_sql(
        "CREATE FUNCTION no_overdraft() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.balance < 0 THEN RAISE EXCEPTION 'overdrawn at commit'; END IF; \
         RETURN NEW; END $$; \
         CREATE CONSTRAINT TRIGGER no_overdraft AFTER UPDATE ON accounts \
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION no_overdraft();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let router = bank();
    let credit = |account: &str, amount: i64| {
        let payload = json!({ "account": account, "amount": amount });
        command(Uuid::new_v4(), "credit", Operation::Action, payload)
    };
    let cmds = [credit("a", 10), credit("b", -50), credit("a", 10)];
    let result = barrier::execute_batch(&db.pool, &cmds, &router).await;
    assert!(
        matches!(&result, Err(BarrierError::Database(e)) if e.to_string().contains("overdrawn")),
        "{result:?}"
    );
    assert_eq!(db.account("a").await, (100, 0));
    assert_eq!(db.account("b").await, (5, 0));

    let alone: Vec<_> = [
        barrier::execute(&db.pool, &cmds[0], &router).await,
        barrier::execute(&db.pool, &cmds[1], &router).await,
        barrier::execute(&db.pool, &cmds[2], &router).await,
    ]
    .into_iter()
    .map(|r| r.map(|outcome| outcome.status()).map_err(|e| e.to_string()))
    .collect();
    assert_eq!(alone[0], Ok("succeeded"));
    assert!(
        matches!(&alone[1], Err(e) if e.contains("overdrawn")),
        "{alone:?}"
    );
    assert_eq!(alone[2], Ok("succeeded"));
    assert_eq!(db.account("a").await, (120, 0));
    assert_eq!(db.account("b").await, (5, 0));
    assert!(
        barrier::records(&db.pool, cmds[1].transaction_id)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn two_batches_that_deadlock_end_with_one_committed_and_the_other_reported() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    db.open("b", 100).await;
    let router = bank();
    // Each batch locks one account, waits, then wants the other's.
    let try_ = |account: &str, sleep_ms: u64| {
        let payload = json!({ "account": account, "amount": 10, "sleep_ms": sleep_ms });
        command(Uuid::new_v4(), "reserve", Operation::Try, payload)
    };
    let first = [try_("a", 300), try_("b", 0)];
    let second = [try_("b", 300), try_("a", 0)];
    let (one, other) = tokio::join!(
        barrier::execute_batch(&db.pool, &first, &router),
        barrier::execute_batch(&db.pool, &second, &router)
    );
    let is_deadlock = |result: &Result<Vec<Outcome>, BarrierError>| {
        matches!(result, Err(BarrierError::Database(sqlx::Error::Database(e)))
            if e.code().as_deref() == Some("40P01"))
    };
    let (committed, failed) = match (is_deadlock(&one), is_deadlock(&other)) {
        (false, true) => (one.as_ref().unwrap(), &second),
        (true, false) => (other.as_ref().unwrap(), &first),
        _ => panic!("expected one deadlock victim: {one:?} / {other:?}"),
    };
    assert!(committed.iter().all(|o| o.status() == "succeeded"));
    assert_eq!(db.account("a").await, (90, 10));
    assert_eq!(db.account("b").await, (90, 10));

    // The victim's commands, alone, now go through.
    for cmd in failed {
        let outcome = barrier::execute(&db.pool, cmd, &router).await.unwrap();
        assert_eq!(outcome.status(), "succeeded");
    }
    assert_eq!(db.account("a").await, (80, 20));
    assert_eq!(db.account("b").await, (80, 20));
}

#[tokio::test]
async fn a_batch_waits_for_a_concurrent_duplicate_and_returns_its_reply() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let router = bank();
    let slow = command(
        Uuid::new_v4(),
        "reserve",
        Operation::Try,
        json!({ "account": "a", "amount": 10, "sleep_ms": 200 }),
    );
    let other = command(Uuid::new_v4(), "credit", Operation::Action, pay(10));
    let (alone, batched) = tokio::join!(barrier::execute(&db.pool, &slow, &router), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        barrier::execute_batch(&db.pool, &[other.clone(), again(&slow)], &router).await
    });
    let (alone, batched) = (alone.unwrap(), batched.unwrap());
    assert_eq!(alone.status(), "succeeded");
    assert_eq!(batched[1], alone);
    assert_eq!(db.account("a").await, (100, 10));
}

/// A handler for every operation that credits `a`, and then runs a failing statement when the
/// payload has `"break": true`.
struct BreaksOnDemand;

#[async_trait]
impl Handler for BreaksOnDemand {
    async fn handle(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        sqlx::query("UPDATE accounts SET balance = balance + 1 WHERE id = 'a'")
            .execute(&mut *tx)
            .await?;
        if cmd.payload["break"] == true {
            sqlx::query("SELECT 1 / 0").execute(&mut *tx).await?;
        }
        Ok(json!({ "op": cmd.operation.as_str() }))
    }
}

#[tokio::test]
async fn a_transient_failure_of_an_undo_in_a_batch_leaves_no_row_of_its_own_and_the_forward_row_unchanged()
 {
    let (t1, t2) = (Uuid::new_v4(), Uuid::new_v4());
    let flaky = json!({ "account": "a", "amount": 10, "fail_undo": "transient" });
    let cmds = [
        command(t1, "credit", Operation::Action, pay(10)),
        command(t1, "credit", Operation::Compensate, flaky.clone()),
        command(t2, "reserve", Operation::Try, pay(10)),
        command(t2, "reserve", Operation::Cancel, flaky),
    ];
    let (outcomes, (barrier_rows, accounts)) =
        batch_equals_sequential(&bank(), &[("a", 100)], &cmds).await;
    let statuses: Vec<_> = outcomes.iter().map(Outcome::status).collect();
    assert_eq!(statuses, ["succeeded", "retry", "succeeded", "retry"]);
    assert_eq!(accounts, [("a".to_owned(), 100, 10)]);
    let left: Vec<_> = barrier_rows
        .iter()
        .map(|r| (r.0, r.2.as_str(), r.3.as_str()))
        .collect();
    let mut expected = vec![(t1, "action", "handler"), (t2, "try", "handler")];
    expected.sort();
    let mut left = left;
    left.sort();
    assert_eq!(
        left, expected,
        "no undo row, and no guard over the forward rows"
    );
}

#[tokio::test]
async fn a_command_discarded_in_a_batch_runs_again_when_redelivered_later_in_the_same_batch() {
    let (t1, t2, t3) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let flaky = json!({ "account": "a", "amount": 10, "fail": "transient" });
    let flaky_undo = json!({ "account": "a", "amount": 10, "fail_undo": "transient" });
    let cmds = [
        // A forward operation discarded, then delivered again and run.
        command(t1, "credit", Operation::Action, flaky),
        command(t1, "credit", Operation::Action, pay(10)),
        // An undo discarded, then delivered again and run.
        command(t2, "reserve", Operation::Try, pay(10)),
        command(t2, "reserve", Operation::Cancel, flaky_undo),
        command(t2, "reserve", Operation::Cancel, pay(10)),
        // A forward operation discarded, then its undo: nothing took effect.
        command(
            t3,
            "reserve",
            Operation::Try,
            json!({ "account": "a", "amount": 10, "fail": "transient" }),
        ),
        command(t3, "reserve", Operation::Cancel, pay(10)),
    ];
    let (outcomes, (barrier_rows, accounts)) =
        batch_equals_sequential(&bank(), &[("a", 100)], &cmds).await;
    let statuses: Vec<_> = outcomes.iter().map(Outcome::status).collect();
    assert_eq!(
        statuses,
        [
            "retry",
            "succeeded",
            "succeeded",
            "retry",
            "succeeded",
            "retry",
            "succeeded"
        ]
    );
    assert_eq!(
        outcomes[6],
        Outcome::succeeded(json!({ "null_compensation": true }))
    );
    assert_eq!(accounts, [("a".to_owned(), 110, 0)]);
    let origins = |id: Uuid| -> Vec<(String, String)> {
        let mut v: Vec<_> = barrier_rows
            .iter()
            .filter(|r| r.0 == id)
            .map(|r| (r.2.clone(), r.3.clone()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(origins(t1), [("action".to_owned(), "handler".to_owned())]);
    assert_eq!(
        origins(t3),
        [
            ("cancel".to_owned(), "null_compensation".to_owned()),
            ("try".to_owned(), "guard".to_owned())
        ]
    );
}

#[tokio::test]
async fn a_statement_error_of_a_handler_in_a_batch_is_undone_and_the_later_commands_run_as_alone() {
    let router = Router::new().route("step", BreaksOnDemand);
    let (t1, t2) = (Uuid::new_v4(), Uuid::new_v4());
    let broken = json!({ "break": true });
    let cmds = [
        // An undo's handler hits a statement error; the undo delivered again then runs.
        command(t1, "step", Operation::Action, json!({})),
        command(t1, "step", Operation::Compensate, broken.clone()),
        command(t1, "step", Operation::Compensate, json!({})),
        // A forward operation hits a statement error; its undo is then a null compensation,
        // and the forward operation delivered again is refused.
        command(t2, "step", Operation::Action, broken),
        command(t2, "step", Operation::Compensate, json!({})),
        command(t2, "step", Operation::Action, json!({})),
    ];
    let (outcomes, (barrier_rows, accounts)) =
        batch_equals_sequential(&router, &[("a", 100)], &cmds).await;
    let statuses: Vec<_> = outcomes.iter().map(Outcome::status).collect();
    assert_eq!(
        statuses,
        [
            "succeeded",
            "retry",
            "succeeded",
            "retry",
            "succeeded",
            "failed"
        ]
    );
    assert!(
        matches!(&outcomes[1], Outcome::Retry { reason, .. } if reason.contains("division by zero")),
        "{:?}",
        outcomes[1]
    );
    assert_eq!(accounts, [("a".to_owned(), 102, 0)], "two handlers ran");
    assert_eq!(barrier_rows.len(), 4);
}

/// A long-running operation: the forward operation writes and is accepted (`in_progress`),
/// the undo writes and succeeds.
struct Accepting;

#[async_trait]
impl Handler for Accepting {
    async fn handle(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        let delta: i64 = if cmd.operation.is_forward() { 1 } else { -1 };
        sqlx::query("UPDATE accounts SET balance = balance + $1 WHERE id = 'a'")
            .bind(delta)
            .execute(&mut *tx)
            .await?;
        if cmd.operation.is_forward() {
            return Err(HandlerError::in_progress(Some("queued".to_owned())));
        }
        Ok(json!({ "undone": true }))
    }
}

#[tokio::test]
async fn a_duplicate_later_in_a_batch_gets_the_reply_of_the_earlier_command() {
    let router = bank().route("slow", Accepting);
    let t: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    let tried = command(t[0], "reserve", Operation::Try, pay(10));
    let refused = command(
        t[1],
        "credit",
        Operation::Action,
        json!({ "account": "a", "amount": 10, "fail": "business_after_write" }),
    );
    let accepted = command(t[2], "slow", Operation::Action, json!({}));
    let cancelled = command(t[3], "reserve", Operation::Cancel, pay(10));
    let cmds = [
        tried.clone(),
        refused.clone(),
        accepted.clone(),
        cancelled.clone(),
        command(Uuid::new_v4(), "credit", Operation::Action, pay(1)),
        again(&tried),
        again(&refused),
        again(&accepted),
        again(&cancelled),
        // The try cancelled after its duplicates; the accepted action compensated.
        command(t[0], "reserve", Operation::Cancel, pay(10)),
        command(t[2], "slow", Operation::Compensate, json!({})),
        again(&accepted),
        // The refused action's compensation: nothing took effect.
        command(t[1], "credit", Operation::Compensate, pay(10)),
    ];
    let (outcomes, (_, accounts)) = batch_equals_sequential(&router, &[("a", 100)], &cmds).await;
    for (first, duplicate) in [(0, 5), (1, 6), (2, 7), (3, 8), (2, 11)] {
        assert_eq!(
            outcomes[first], outcomes[duplicate],
            "{first} / {duplicate}"
        );
    }
    let statuses: Vec<_> = outcomes.iter().map(Outcome::status).collect();
    assert_eq!(
        statuses,
        [
            "succeeded",
            "failed",
            "in_progress",
            "succeeded",
            "succeeded",
            "succeeded",
            "failed",
            "in_progress",
            "succeeded",
            "succeeded",
            "succeeded",
            "in_progress",
            "succeeded"
        ]
    );
    assert_eq!(
        outcomes[12],
        Outcome::succeeded(json!({ "null_compensation": true }))
    );
    assert_eq!(
        outcomes[10],
        Outcome::succeeded(json!({ "undone": true })),
        "the accepted action took effect: its compensation runs"
    );
    // +1 (credit) +1 -1 (slow): the try was cancelled, the refused credit rolled back.
    assert_eq!(accounts, [("a".to_owned(), 101, 0)]);
}

#[tokio::test]
async fn a_barrier_error_before_the_handler_runs_ends_the_batch_and_commits_nothing() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let router = bank();
    let unusable = command(Uuid::new_v4(), "credit", Operation::Action, pay(10));
    // A row without a reply, as if edited by hand.
    sqlx::query(
        "INSERT INTO sagas_barrier (transaction_id, step, operation, origin) \
         VALUES ($1, 'credit', 'action', 'handler')",
    )
    .bind(unusable.transaction_id)
    .execute(&db.pool)
    .await
    .unwrap();
    let fine = command(Uuid::new_v4(), "credit", Operation::Action, pay(10));
    let result = barrier::execute_batch(&db.pool, &[fine.clone(), unusable.clone()], &router).await;
    assert!(
        matches!(result, Err(BarrierError::Inconsistent { .. })),
        "{result:?}"
    );
    assert!(
        barrier::records(&db.pool, fine.transaction_id)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(db.account("a").await, (100, 0));
    let alone = barrier::execute(&db.pool, &unusable, &router).await;
    assert!(
        matches!(alone, Err(BarrierError::Inconsistent { .. })),
        "{alone:?}"
    );
}

#[tokio::test]
async fn a_batch_of_different_transactions_claims_its_rows_together_and_answers_as_one_by_one() {
    let t: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
    // Already answered before the batch: a try (its duplicate and its confirm come in the
    // batch) and an action whose redelivery comes in the batch.
    let tried = command(t[0], "reserve", Operation::Try, pay(10));
    let credited = command(t[1], "credit", Operation::Action, pay(5));
    let before = [tried.clone(), credited.clone()];
    let cmds = [
        command(t[0], "reserve", Operation::Confirm, pay(10)),
        again(&credited),
        command(t[2], "credit", Operation::Action, pay(1)),
        // A transient failure: its claimed row is given back.
        command(
            t[3],
            "credit",
            Operation::Action,
            json!({ "account": "a", "amount": 10, "fail": "transient" }),
        ),
        // A business failure after a write: stored, the write rolled back.
        command(
            t[4],
            "reserve",
            Operation::Try,
            json!({ "account": "a", "amount": 10, "fail": "business_after_write" }),
        ),
        command(t[5], "reserve", Operation::Try, pay(20)),
    ];
    let router = bank();
    let (batched, sequential) = (TestDb::new().await, TestDb::new().await);
    for db in [&batched, &sequential] {
        db.open("a", 100).await;
        for cmd in &before {
            barrier::execute(&db.pool, cmd, &router).await.unwrap();
        }
    }
    let outcomes = barrier::execute_batch(&batched.pool, &cmds, &router)
        .await
        .expect("the batch commits");
    let mut one_by_one = Vec::new();
    for cmd in &cmds {
        one_by_one.push(
            barrier::execute(&sequential.pool, cmd, &router)
                .await
                .unwrap(),
        );
    }
    assert_eq!(outcomes, one_by_one);
    let left = rows(&batched).await;
    assert_eq!(left, rows(&sequential).await);
    let statuses: Vec<_> = outcomes.iter().map(Outcome::status).collect();
    assert_eq!(
        statuses,
        [
            "succeeded",
            "succeeded",
            "succeeded",
            "retry",
            "failed",
            "succeeded"
        ]
    );
    // 100 - 10 (tried, then confirmed) + 5 (the redelivered credit counted once) + 1 - 20
    // (tried, reserved).
    assert_eq!(batched.account("a").await, (76, 20));
    assert!(
        left.0.iter().all(|r| r.0 != t[3]),
        "no row for the transient failure"
    );
    // The transient failure runs when delivered again, in a batch of its own kind.
    let retried = command(t[3], "credit", Operation::Action, pay(10));
    let other = command(Uuid::new_v4(), "credit", Operation::Action, pay(1));
    let outcomes = barrier::execute_batch(&batched.pool, &[retried, other], &router)
        .await
        .unwrap();
    assert_eq!(outcomes[0].status(), "succeeded");
    assert_eq!(batched.account("a").await, (87, 20));
}

/// A handler that counts how often it runs, around the test participant.
struct Counting {
    inner: Router,
    calls: AtomicUsize,
}

impl Counting {
    fn bank() -> Counting {
        Counting {
            inner: bank(),
            calls: AtomicUsize::new(0),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Handler for Counting {
    async fn handle(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.handle(cmd, tx).await
    }
}

/// A command of a new transaction whose handler writes 10 and then fails for business reasons.
fn fails_after_write(step: &str, operation: Operation) -> Command {
    let payload = json!({ "account": "a", "amount": 10, "fail": "business_after_write" });
    command(Uuid::new_v4(), step, operation, payload)
}

#[tokio::test]
async fn a_batch_without_savepoints_stops_at_the_first_handler_that_fails_and_leaves_nothing() {
    let db = TestDb::new().await;
    db.open("a", 100).await;
    let cmds = [
        command(Uuid::new_v4(), "credit", Operation::Action, pay(10)),
        fails_after_write("credit", Operation::Action),
        command(Uuid::new_v4(), "credit", Operation::Action, pay(10)),
    ];
    let handler = Counting::bank();
    let batch = barrier::Batch::begin_unguarded(&db.pool, &cmds)
        .await
        .unwrap();
    let (batch, first) = batch.execute(&cmds[0], &handler).await.unwrap();
    assert_eq!(first, Outcome::succeeded(json!({ "credited": 10 })));
    let failed = batch.execute(&cmds[1], &handler).await;
    assert!(matches!(failed, Err(BarrierError::Unguarded)), "{failed:?}");
    drop(failed);
    assert_eq!(handler.calls(), 2, "the batch ends at the failure");
    assert_eq!(
        rows(&db).await,
        (Vec::new(), vec![("a".to_owned(), 100, 0)])
    );
}

#[tokio::test]
async fn a_batch_whose_handler_fails_without_savepoints_runs_again_with_them_and_ends_as_one_by_one()
 {
    let cmds = [
        command(Uuid::new_v4(), "credit", Operation::Action, pay(10)),
        command(Uuid::new_v4(), "reserve", Operation::Try, pay(20)),
        fails_after_write("reserve", Operation::Try),
        command(Uuid::new_v4(), "credit", Operation::Action, pay(5)),
    ];
    let handler = Counting::bank();
    let (outcomes, (_, accounts)) = batch_equals_sequential(&handler, &[("a", 100)], &cmds).await;
    let statuses: Vec<_> = outcomes.iter().map(Outcome::status).collect();
    assert_eq!(statuses, ["succeeded", "succeeded", "failed", "succeeded"]);
    assert_eq!(accounts, [("a".to_owned(), 95, 20)]);
    // 3 runs without savepoints up to the failure, 4 with them, then 4 one by one.
    assert_eq!(handler.calls(), 3 + 4 + 4);
}

#[tokio::test]
async fn a_batch_whose_handlers_all_succeed_runs_each_once_without_savepoints() {
    let fresh = command(Uuid::new_v4(), "credit", Operation::Action, pay(10));
    let cmds = [
        fresh.clone(),
        command(Uuid::new_v4(), "reserve", Operation::Try, pay(20)),
        again(&fresh),
        command(Uuid::new_v4(), "credit", Operation::Action, pay(5)),
    ];
    let handler = Counting::bank();
    let (outcomes, (barrier_rows, accounts)) =
        batch_equals_sequential(&handler, &[("a", 100)], &cmds).await;
    assert!(outcomes.iter().all(|o| o.status() == "succeeded"));
    assert_eq!(
        outcomes[0], outcomes[2],
        "the duplicate gets the stored reply"
    );
    assert_eq!(accounts, [("a".to_owned(), 95, 20)]);
    assert_eq!(barrier_rows.len(), 3);
    // 3 in the batch (the duplicate runs no handler), then 3 one by one.
    assert_eq!(handler.calls(), 3 + 3);
}

/// Writes nothing and answers with text that needs escaping, its step's name in it.
struct Awkward;

#[async_trait]
impl Handler for Awkward {
    async fn handle(&self, cmd: &Command, _tx: &mut PgConnection) -> Result<Value, HandlerError> {
        Ok(json!({ "note": r#"it's \ "quoted" E'\x41' $$ ünï 🚀"#, "step": cmd.step }))
    }
}

#[tokio::test]
async fn claims_sent_with_the_begin_keep_any_step_name_and_leave_the_connection_clean() {
    // One connection: every batch below, and the checks after them, take the same one.
    let db = TestDb::with_connections(1).await;
    let step = r"credit 'it''s' \ E'\x41' $$ ; --";
    let cmd = || command(Uuid::new_v4(), step, Operation::Action, json!({}));
    let (lone, first, second, after) = (cmd(), cmd(), cmd(), cmd());
    let stored = async |cmd: &Command| -> Outcome {
        let (reply,): (Json<Outcome>,) = sqlx::query_as(
            "SELECT reply FROM sagas_barrier \
             WHERE transaction_id = $1 AND step = $2 AND operation = 'action'",
        )
        .bind(cmd.transaction_id)
        .bind(&cmd.step)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        reply.0
    };

    // A batch of one and a batch of two: rows claimed with the `BEGIN`; names and replies
    // stored as given.
    for cmds in [vec![lone.clone()], vec![first, second]] {
        let outcomes = barrier::execute_batch(&db.pool, &cmds, &Awkward).await;
        for (cmd, outcome) in cmds.iter().zip(outcomes.unwrap()) {
            let Outcome::Succeeded { output } = &outcome else {
                panic!("{outcome:?}")
            };
            assert_eq!(output["step"], step);
            assert_eq!(stored(cmd).await, outcome);
        }
        assert!(
            outside_a_transaction(&db).await,
            "the pool's connection was left in a transaction"
        );
    }

    // A redelivery in a batch: the claim with the `BEGIN` fails on its row, and the claim
    // after a plain `BEGIN` tells it from the new one.
    let first_reply = stored(&lone).await;
    let outcomes = barrier::execute_batch(&db.pool, &[again(&lone), after.clone()], &Awkward)
        .await
        .unwrap();
    assert_eq!(outcomes[0], first_reply, "the stored reply");
    assert_eq!(stored(&after).await, outcomes[1]);
    assert!(
        outside_a_transaction(&db).await,
        "the pool's connection was left in a transaction"
    );
}

/// Whether a statement on the pool's connection runs in a transaction of its own (in a
/// simple query, whose statement and implicit transaction start at the same moment).
async fn outside_a_transaction(db: &TestDb) -> bool {
    let row = sqlx::raw_sql("SELECT now() = statement_timestamp()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    row.get(0)
}

#[tokio::test]
async fn a_claim_dropped_while_its_row_is_held_leaves_no_transaction_and_no_row_behind() {
    // One connection: the check after the dropped claim takes the one it used.
    let db = TestDb::with_connections(1).await;
    let cmd = command(Uuid::new_v4(), "credit", Operation::Action, pay(1));
    // Another delivery's transaction holds the command's row, not yet committed.
    let mut holder = PgConnection::connect(db.url()).await.unwrap();
    let mut held = holder.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO sagas_barrier (transaction_id, step, operation, origin) \
         VALUES ($1, $2, 'action', 'handler')",
    )
    .bind(cmd.transaction_id)
    .bind(&cmd.step)
    .execute(&mut *held)
    .await
    .unwrap();

    // The claim (with its `BEGIN`) waits for that row until its time limit drops it.
    let begun = tokio::time::timeout(
        Duration::from_millis(300),
        barrier::Batch::begin_for(&db.pool, [&cmd]),
    )
    .await;
    assert!(begun.is_err(), "the claim cannot end while the row is held");
    held.rollback().await.unwrap();

    // The claim went on once the row was free, and the rollback queued as it was dropped
    // ended it: the connection is back outside any transaction, and no row is left.
    assert!(
        outside_a_transaction(&db).await,
        "the pool's connection was left in a transaction"
    );
    let (rows,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM sagas_barrier WHERE transaction_id = $1")
            .bind(cmd.transaction_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(rows, 0);
}
