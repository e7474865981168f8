//! Long-running operations through the barrier: a handler answers `in_progress`, the work is
//! completed later, and an undo that comes first makes the completion refuse to apply.

use async_trait::async_trait;
use sagas_participant::barrier::{self, Completion, Origin};
use sagas_participant::handler::{Handler, HandlerError};
use sagas_participant::protocol::{Command, Operation, Outcome};
use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::helpers::{TestDb, again, command};

/// Starts a job (a row) and answers `in_progress`; its undo cancels the job.
struct Jobs;

#[async_trait]
impl Handler for Jobs {
    async fn handle(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        match cmd.operation {
            Operation::Action => {
                sqlx::query("INSERT INTO jobs (id, status) VALUES ($1, 'started')")
                    .bind(cmd.transaction_id)
                    .execute(&mut *tx)
                    .await?;
                Err(HandlerError::in_progress(Some("job queued".into())))
            }
            _ => {
                sqlx::query("UPDATE jobs SET status = 'cancelled' WHERE id = $1")
                    .bind(cmd.transaction_id)
                    .execute(&mut *tx)
                    .await?;
                Ok(json!({"cancelled": true}))
            }
        }
    }
}

async fn job(db: &TestDb, id: Uuid) -> Option<String> {
    sqlx::query_as::<_, (String,)>("SELECT status FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_optional(&db.pool)
        .await
        .unwrap()
        .map(|(s,)| s)
}

async fn setup() -> TestDb {
    let db = TestDb::new().await;
    sqlx::query("CREATE TABLE jobs (id uuid PRIMARY KEY, status text NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    db
}

#[tokio::test]
async fn an_in_progress_answer_keeps_the_handlers_writes_and_is_completed_once() {
    let db = setup().await;
    let id = Uuid::new_v4();
    let cmd = command(id, "job", Operation::Action, json!({}));
    let first = barrier::execute(&db.pool, &cmd, &Jobs).await.unwrap();
    assert_eq!(
        first,
        Outcome::InProgress {
            note: Some("job queued".into())
        }
    );
    assert_eq!(job(&db, id).await.as_deref(), Some("started"));
    // A redelivery while the job runs gets the same answer and starts nothing.
    assert_eq!(
        barrier::execute(&db.pool, &again(&cmd), &Jobs)
            .await
            .unwrap(),
        first
    );

    let done = Outcome::succeeded(json!({"result": 42}));
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("UPDATE jobs SET status = 'done' WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await
        .unwrap();
    assert_eq!(
        barrier::complete_in(&mut tx, &cmd, &done).await.unwrap(),
        Completion::Completed
    );
    tx.commit().await.unwrap();
    assert_eq!(job(&db, id).await.as_deref(), Some("done"));
    // Redeliveries now get the final outcome; a second completion changes nothing.
    assert_eq!(
        barrier::execute(&db.pool, &again(&cmd), &Jobs)
            .await
            .unwrap(),
        done
    );
    let mut tx = db.pool.begin().await.unwrap();
    assert_eq!(
        barrier::complete_in(&mut tx, &cmd, &Outcome::failed("late"))
            .await
            .unwrap(),
        Completion::AlreadyFinal(done)
    );
    // Only succeeded or failed complete an operation.
    assert!(
        barrier::complete_in(&mut tx, &cmd, &Outcome::retry("x"))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn an_undo_of_a_running_job_really_undoes_it_and_the_late_completion_is_refused() {
    let db = setup().await;
    let id = Uuid::new_v4();
    let cmd = command(id, "job", Operation::Action, json!({}));
    barrier::execute(&db.pool, &cmd, &Jobs).await.unwrap();
    // The orchestrator gives up and compensates while the job runs: not a null compensation,
    // because the job's writes are there.
    let undo = command(id, "job", Operation::Compensate, json!({}));
    let undone = barrier::execute(&db.pool, &undo, &Jobs).await.unwrap();
    assert_eq!(undone, Outcome::succeeded(json!({"cancelled": true})));
    assert_eq!(job(&db, id).await.as_deref(), Some("cancelled"));
    let records = barrier::records(&db.pool, id).await.unwrap();
    assert!(records.iter().all(|r| r.origin == Some(Origin::Handler)));
    // The job finishes later: its completion must not apply.
    let mut tx = db.pool.begin().await.unwrap();
    assert_eq!(
        barrier::complete_in(&mut tx, &cmd, &Outcome::succeeded(Value::Null))
            .await
            .unwrap(),
        Completion::Undone
    );
    tx.rollback().await.unwrap();
}
