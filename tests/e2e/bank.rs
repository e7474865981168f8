//! End to end over real PostgreSQL and RabbitMQ: the bank transfer definitions through the HTTP
//! API, the orchestrator engine and the accounts participant.

use anyhow::Result;
use sagas::orchestrator::Status;
use sagas::orchestrator::machine::StepStatus;
use sagas::orchestrator::transport::CommandBatch;
use sagas::participant::barrier::{self, Origin};
use sagas::participant::{Command, Operation, Outcome};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::examples::bank;
use crate::helpers::{self, RawPeer, TestEnv, close_broker, spawn_app_with, spawn_participant};

struct Bank {
    env: TestEnv,
    app: helpers::App,
    accounts: helpers::Running,
    http: reqwest::Client,
}

impl Bank {
    async fn start() -> Result<Bank> {
        Bank::start_with(CommandBatch::default()).await
    }

    /// With command batches as `command_batch` says.
    async fn start_with(command_batch: CommandBatch) -> Result<Bank> {
        let env = TestEnv::new().await?;
        bank::seed(&env.bank, 3, 1_000).await?;
        let amqp = sagas::orchestrator::transport::AmqpConfig {
            command_batch,
            ..env.amqp_config()
        };
        let app = spawn_app_with(&env, bank::registry()?, amqp).await?;
        let accounts = spawn_participant(
            &env,
            bank::PARTICIPANT,
            bank::shared_handler(Default::default()),
        )
        .await?;
        Ok(Bank {
            env,
            app,
            accounts,
            http: reqwest::Client::new(),
        })
    }

    async fn transfer(&self, definition: &str, from: &str, to: &str, amount: i64) -> Result<Uuid> {
        let res = self
            .http
            .post(self.app.url(&format!("/v1/sagas/{definition}")))
            .json(&json!({"input": {"from": from, "to": to, "amount": amount}}))
            .send()
            .await?;
        anyhow::ensure!(res.status() == 202, "start answered {}", res.status());
        let body: Value = res.json().await?;
        Ok(body["id"].as_str().unwrap().parse()?)
    }

    async fn view(&self, id: Uuid) -> Result<Value> {
        Ok(self
            .http
            .get(self.app.url(&format!("/v1/sagas/{id}")))
            .send()
            .await?
            .json()
            .await?)
    }

    async fn balance(&self, account: &str) -> Result<(i64, i64, i64)> {
        Ok(
            sqlx::query_as("SELECT available, frozen, pending FROM bank_accounts WHERE id = $1")
                .bind(account)
                .fetch_one(&self.env.bank)
                .await?,
        )
    }

    async fn stop(self) {
        self.accounts.stop().await;
        self.app.stop().await;
        self.env.cleanup().await;
    }
}

fn step_statuses(view: &Value) -> Vec<String> {
    view["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_whose_steps_all_succeed_completes_and_moves_the_money() -> Result<()> {
    let b = Bank::start().await?;
    let id = b.transfer("transfer_saga", "acct-1", "acct-2", 250).await?;
    let done = b.env.wait_terminal(id).await?;
    assert_eq!(done.status, Status::Completed);
    let view = b.view(id).await?;
    assert_eq!(view["status"], "completed");
    assert_eq!(view["definition"], "transfer_saga");
    assert_eq!(step_statuses(&view), ["succeeded", "succeeded"]);
    assert_eq!(b.balance("acct-1").await?, (750, 0, 0));
    assert_eq!(b.balance("acct-2").await?, (1_250, 0, 0));
    assert!(bank::audit(&b.env.bank).await?.holds());
    b.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_whose_commands_travel_in_batches_end_as_they_would_one_by_one() -> Result<()> {
    let b = Bank::start_with(CommandBatch::Forced(8)).await?;
    bank::close(&b.env.bank, "acct-3").await?;
    // Started together so that commands for the participant share messages: sagas and TCC
    // transfers, a third of them towards a closed account (compensated / cancelled).
    let plan: Vec<(usize, &str, &str)> = (0..48)
        .map(|n| {
            let definition = if n % 2 == 0 {
                "transfer_saga"
            } else {
                "transfer_tcc"
            };
            let to = if n % 3 == 0 { "acct-3" } else { "acct-2" };
            (n, definition, to)
        })
        .collect();
    let ids = futures_util::future::try_join_all(
        plan.iter()
            .map(|(_, definition, to)| b.transfer(definition, "acct-1", to, 1)),
    )
    .await?;
    let mut moved = 0;
    for ((n, _, to), id) in plan.into_iter().zip(ids) {
        let done = b.env.wait_terminal(id).await?;
        let expected = if to == "acct-3" {
            Status::Compensated
        } else {
            Status::Completed
        };
        assert_eq!(done.status, expected, "transfer {n} to {to}");
        if expected == Status::Completed {
            moved += 1;
        }
    }
    assert_eq!(b.balance("acct-1").await?, (1_000 - moved, 0, 0));
    assert_eq!(b.balance("acct-2").await?, (1_000 + moved, 0, 0));
    assert_eq!(b.balance("acct-3").await?, (1_000, 0, 0));
    assert!(bank::audit(&b.env.bank).await?.holds());
    let dead = b
        .app
        .engine
        .stats()
        .dead_lettered
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(dead, 0, "no reply was dead-lettered");
    assert_eq!(
        b.accounts.stats.rejected(),
        0,
        "no command was dead-lettered"
    );
    // Retries and even timeouts may happen on the way (every transfer debits acct-1: commands
    // wait for its row lock, and one that loses a deadlock answers `retry`); what matters is
    // that each ended as it would alone, which the statuses and balances above show.
    b.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_whose_second_step_fails_compensates_the_first() -> Result<()> {
    let b = Bank::start().await?;
    bank::close(&b.env.bank, "acct-3").await?;
    let id = b.transfer("transfer_saga", "acct-1", "acct-3", 400).await?;
    let done = b.env.wait_terminal(id).await?;
    assert_eq!(done.status, Status::Compensated);
    assert_eq!(done.steps[0].status, StepStatus::Compensated);
    assert_eq!(done.steps[1].status, StepStatus::Failed);
    let view = b.view(id).await?;
    assert_eq!(view["status"], "compensated");
    assert!(
        view["failure"].as_str().unwrap().contains("account closed"),
        "{view}"
    );
    assert_eq!(b.balance("acct-1").await?, (1_000, 0, 0));
    assert_eq!(b.balance("acct-3").await?, (1_000, 0, 0));
    assert!(bank::audit(&b.env.bank).await?.holds());
    b.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcc_transfer_whose_tries_succeed_confirms_every_branch() -> Result<()> {
    let b = Bank::start().await?;
    let id = b.transfer("transfer_tcc", "acct-2", "acct-1", 300).await?;
    let done = b.env.wait_terminal(id).await?;
    assert_eq!(done.status, Status::Completed);
    assert_eq!(
        step_statuses(&b.view(id).await?),
        ["confirmed", "confirmed"]
    );
    assert_eq!(b.balance("acct-2").await?, (700, 0, 0));
    assert_eq!(b.balance("acct-1").await?, (1_300, 0, 0));
    assert!(bank::audit(&b.env.bank).await?.holds());
    b.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcc_transfer_with_a_failed_try_cancels_every_branch_that_was_tried() -> Result<()> {
    let b = Bank::start().await?;
    // Overdraw: the debit try fails, the credit try succeeds and must be cancelled.
    let id = b
        .transfer("transfer_tcc", "acct-1", "acct-2", 5_000)
        .await?;
    let done = b.env.wait_terminal(id).await?;
    assert_eq!(done.status, Status::Compensated);
    assert_eq!(done.steps[0].status, StepStatus::Failed);
    assert_eq!(done.steps[1].status, StepStatus::Cancelled);
    assert_eq!(b.balance("acct-1").await?, (1_000, 0, 0));
    assert_eq!(b.balance("acct-2").await?, (1_000, 0, 0));
    assert!(bank::audit(&b.env.bank).await?.holds());
    // The log shows the cancel that was sent.
    let events = b.app.engine.events(id).await?;
    assert!(
        events
            .iter()
            .any(|e| e.event.kind() == "dispatched"
                && e.event.operation() == Some(Operation::Cancel))
    );
    b.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_or_unknown_start_requests_get_clear_errors() -> Result<()> {
    let b = Bank::start().await?;
    let post = |path: &str, body: &'static str| {
        b.http
            .post(b.app.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let r = post("/v1/sagas/nope", r#"{"input": {}}"#).await?;
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await?["error"], "unknown_definition");
    let r = post("/v1/sagas/transfer_tcc", "{not json").await?;
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await?["error"], "malformed_body");
    let r = post("/v1/sagas/transfer_tcc", r#"{"input": {"from": "a"}}"#).await?;
    assert_eq!(r.status(), 400);
    let body = r.json::<Value>().await?;
    assert_eq!(body["error"], "invalid_input");
    assert!(
        body["message"].as_str().unwrap().contains("missing field"),
        "{body}"
    );
    let r = b.http.get(b.app.url("/v1/sagas/not-a-uuid")).send().await?;
    assert_eq!(r.status(), 400);
    let r = b
        .http
        .get(b.app.url(&format!("/v1/sagas/{}", Uuid::now_v7())))
        .send()
        .await?;
    assert_eq!(r.status(), 404);
    b.stop().await;
    Ok(())
}

fn command(definition: &str, op: Operation, tx: Uuid, payload: Value) -> Command {
    Command {
        protocol: 1,
        transaction_id: tx,
        definition: definition.into(),
        step: "debit".into(),
        operation: op,
        attempt: 1,
        payload,
        output: None,
        deadline: None,
        traceparent: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_delivered_twice_is_applied_once_and_answered_the_same() -> Result<()> {
    let b = Bank::start().await?;
    let mut peer = RawPeer::new(&b.env, bank::PARTICIPANT).await?;
    let cmd = command(
        "transfer_saga",
        Operation::Action,
        Uuid::now_v7(),
        json!({"account": "acct-1", "amount": 100}),
    );
    peer.send(bank::PARTICIPANT, &cmd).await?;
    let first = peer.next_reply().await?;
    peer.send(bank::PARTICIPANT, &cmd).await?;
    let second = peer.next_reply().await?;
    assert!(
        matches!(first.outcome, Outcome::Succeeded { .. }),
        "{first:?}"
    );
    assert_eq!(first, second);
    assert_eq!(b.balance("acct-1").await?, (900, 0, 0));
    peer.close().await;
    b.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_before_its_try_is_a_null_compensation_and_the_late_try_is_refused() -> Result<()>
{
    let b = Bank::start().await?;
    let mut peer = RawPeer::new(&b.env, bank::PARTICIPANT).await?;
    let tx = Uuid::now_v7();
    let payload = json!({"account": "acct-1", "amount": 100});
    peer.send(
        bank::PARTICIPANT,
        &command("transfer_tcc", Operation::Cancel, tx, payload.clone()),
    )
    .await?;
    let cancel = peer.next_reply().await?;
    assert!(
        matches!(cancel.outcome, Outcome::Succeeded { .. }),
        "{cancel:?}"
    );
    peer.send(
        bank::PARTICIPANT,
        &command("transfer_tcc", Operation::Try, tx, payload),
    )
    .await?;
    let late_try = peer.next_reply().await?;
    assert!(
        matches!(late_try.outcome, Outcome::Failed { .. }),
        "{late_try:?}"
    );
    assert_eq!(b.balance("acct-1").await?, (1_000, 0, 0));
    let records = barrier::records(&b.env.bank, tx).await?;
    let origin = |op: &str| {
        records
            .iter()
            .find(|r| r.operation == op)
            .and_then(|r| r.origin)
    };
    assert_eq!(origin("cancel"), Some(Origin::NullCompensation));
    assert_eq!(origin("try"), Some(Origin::Guard));
    peer.close().await;
    b.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_stray_replies_are_dead_lettered_with_a_reason_and_the_engine_goes_on()
-> Result<()> {
    use futures_util::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
    use lapin::types::{AMQPValue, FieldTable};
    use std::sync::atomic::Ordering;

    let b = Bank::start().await?;
    let conn = helpers::connect_broker().await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let stray = Command {
        protocol: 1,
        transaction_id: Uuid::now_v7(),
        definition: "transfer_saga".into(),
        step: "debit".into(),
        operation: Operation::Action,
        attempt: 1,
        payload: Value::Null,
        output: None,
        deadline: None,
        traceparent: None,
    }
    .reply(Outcome::succeeded(Value::Null));
    let bodies = [b"{not json".to_vec(), serde_json::to_vec(&stray)?];
    for body in &bodies {
        ch.basic_publish(
            "".into(),
            b.env.topology.replies_queue().into(),
            BasicPublishOptions::default(),
            body,
            Default::default(),
        )
        .await?
        .await?;
    }
    let mut dead = ch
        .basic_consume(
            b.env.topology.dead_letter_queue().into(),
            "test".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let mut reasons = Vec::new();
    for _ in 0..2 {
        let d = tokio::time::timeout(std::time::Duration::from_secs(30), dead.next())
            .await?
            .unwrap()?;
        let headers = d.properties.headers().clone().unwrap_or_default();
        let reason = headers
            .inner()
            .get("x-sagas-reason")
            .and_then(|v| match v {
                AMQPValue::LongString(s) => Some(s.to_string()),
                _ => None,
            })
            .unwrap_or_default();
        assert!(bodies.contains(&d.data), "the dead letter keeps the body");
        reasons.push(reason);
    }
    reasons.sort();
    assert!(reasons[0].starts_with("malformed reply"), "{reasons:?}");
    assert!(
        reasons[1].starts_with("reply for unknown transaction"),
        "{reasons:?}"
    );
    assert_eq!(
        b.app.engine.stats().dead_lettered.load(Ordering::Relaxed),
        2
    );
    // The engine goes on.
    let id = b.transfer("transfer_saga", "acct-1", "acct-2", 10).await?;
    assert_eq!(b.env.wait_terminal(id).await?.status, Status::Completed);
    close_broker(&conn).await;
    b.stop().await;
    Ok(())
}
