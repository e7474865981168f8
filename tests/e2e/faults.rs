//! Faults end to end: a participant that never answers, and an orchestrator killed mid-flight.

use std::process::{Child, Command as Process, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use lapin::Connection;
use sagas::orchestrator::machine::StepStatus;
use sagas::orchestrator::{Definition, Registry, RetryPolicy, Status};
use sagas::participant::{Command, HandlerError, Operation, Outcome, Router, Saga, SagaHandler};
use serde_json::{Value, json};
use sqlx::PgConnection;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::examples::bank;
use crate::helpers::{
    self, TestEnv, amqp_url, close_broker, connect_broker, spawn_app, spawn_participant,
};

struct Reserve;

#[async_trait]
impl SagaHandler for Reserve {
    async fn action(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        sqlx::query("INSERT INTO reservations (id, active) VALUES ($1, true)")
            .bind(cmd.transaction_id)
            .execute(&mut *tx)
            .await?;
        Ok(json!({"reservation": cmd.transaction_id}))
    }
    async fn compensate(
        &self,
        cmd: &Command,
        tx: &mut PgConnection,
    ) -> Result<Value, HandlerError> {
        sqlx::query("UPDATE reservations SET active = false WHERE id = $1")
            .bind(cmd.transaction_id)
            .execute(&mut *tx)
            .await?;
        Ok(Value::Null)
    }
}

#[derive(serde::Deserialize)]
struct Nothing {}

/// A participant written against the raw protocol: it swallows actions without a reply and
/// answers compensations.
async fn silent_participant(
    env: &TestEnv,
    seen: Arc<std::sync::Mutex<Vec<(Operation, u32)>>>,
) -> Result<(Connection, tokio::task::JoinHandle<()>)> {
    helpers::scripted_participant(env, "silent", move |cmd| {
        seen.lock().unwrap().push((cmd.operation, cmd.attempt));
        (cmd.operation == Operation::Compensate).then(|| Outcome::succeeded(Value::Null))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_that_never_replies_is_retried_per_policy_then_compensated() -> Result<()> {
    let env = TestEnv::new().await?;
    sqlx::query("CREATE TABLE reservations (id uuid PRIMARY KEY, active boolean NOT NULL)")
        .execute(&env.bank)
        .await?;
    let def = Definition::saga::<Nothing>("silent_saga", 1)
        .step("reserve", "accounts", |s| s.command(|_, _| json!({})))
        .step("notify", "silent", |s| {
            s.command(|_, out| json!({"after": out.get("reserve").cloned()}))
                .retry(RetryPolicy::exponential(
                    3,
                    Duration::from_millis(50),
                    Duration::from_millis(100),
                ))
                .timeout(Duration::from_millis(300))
        })
        .build()?;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (silent_conn, silent) = silent_participant(&env, seen.clone()).await?;
    let app = spawn_app(&env, Registry::new().with(def)?).await?;
    let accounts = spawn_participant(
        &env,
        "accounts",
        Arc::new(Router::new().route("reserve", Saga(Reserve))),
    )
    .await?;

    let instance = app.engine.start("silent_saga", json!({})).await?;
    let done = env.wait_terminal(instance.id).await?;

    assert_eq!(done.status, Status::Compensated);
    assert_eq!(done.steps[0].status, StepStatus::Compensated);
    // The silent step's outcome is unknown, so it is compensated too.
    assert_eq!(done.steps[1].status, StepStatus::Compensated);
    assert!(
        done.failure.as_deref().unwrap().contains("gave up"),
        "{done:?}"
    );
    let actions: Vec<u32> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(op, _)| *op == Operation::Action)
        .map(|(_, a)| *a)
        .collect();
    assert_eq!(actions, vec![1, 2, 3]);
    let events = app.engine.events(instance.id).await?;
    let timeouts = events
        .iter()
        .filter(|e| e.event.kind() == "timed_out")
        .count();
    assert_eq!(timeouts, 3);
    let (active,): (bool,) = sqlx::query_as("SELECT active FROM reservations WHERE id = $1")
        .bind(instance.id)
        .fetch_one(&env.bank)
        .await?;
    assert!(!active, "the reservation was released");

    accounts.stop().await;
    app.stop().await;
    silent.abort();
    close_broker(&silent_conn).await;
    env.cleanup().await;
    Ok(())
}

fn spawn_orchestrator(env: &TestEnv, port: u16) -> Result<Child> {
    Ok(
        Process::new(helpers::built_binary("examples/bank_transfer")?)
            .arg("orchestrator")
            .env("DATABASE_URL", &env.orch_url)
            .env("AMQP_URL", amqp_url())
            .env("SAGAS_BIND", format!("127.0.0.1:{port}"))
            .env("SAGAS_AMQP_PREFIX", env.topology.prefix())
            .env("SAGAS_QUEUE_EXPIRES_MS", "600000")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()?,
    )
}

async fn wait_healthy(http: &reqwest::Client, base: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "orchestrator not ready (/readyz) in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn count_open(env: &TestEnv) -> Result<i64> {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM sagas_instances WHERE status NOT IN ('completed', 'compensated')",
    )
    .fetch_one(&env.orch)
    .await?;
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_killed_mid_flight_finishes_every_transfer_after_restart() -> Result<()> {
    let env = TestEnv::new().await?;
    bank::seed(&env.bank, 10, 10_000).await?;
    bank::close(&env.bank, "acct-10").await?;
    let accounts = spawn_participant(
        &env,
        bank::PARTICIPANT,
        bank::shared_handler(bank::Accounts {
            delay: Duration::from_millis(100),
        }),
    )
    .await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let mut child = spawn_orchestrator(&env, port)?;
    wait_healthy(&http, &base).await?;

    let mut ids = Vec::new();
    for i in 0..60u32 {
        let definition = if i % 2 == 0 {
            "transfer_tcc"
        } else {
            "transfer_saga"
        };
        let from = format!("acct-{}", 1 + i % 9);
        let to = format!("acct-{}", 1 + (i * 7 + 3) % 10);
        let to = if to == from { "acct-10".to_owned() } else { to };
        // every 7th overdraws
        let amount = if i % 7 == 0 {
            50_000
        } else {
            100 + i64::from(i) * 13
        };
        let r = http
            .post(format!("{base}/v1/sagas/{definition}"))
            .json(&json!({"input": {"from": from, "to": to, "amount": amount}}))
            .send()
            .await?;
        anyhow::ensure!(r.status() == 202, "start answered {}", r.status());
        let body: Value = r.json().await?;
        ids.push(body["id"].as_str().unwrap().parse::<Uuid>()?);
    }
    child.kill()?; // SIGKILL
    child.wait()?;
    let open_at_crash = count_open(&env).await?;
    assert!(
        open_at_crash > 0,
        "the crash should catch transfers in flight"
    );

    let mut child = spawn_orchestrator(&env, port)?;
    let mut statuses = Vec::new();
    for id in &ids {
        statuses.push(env.wait_terminal(*id).await?.status);
    }
    child.kill()?;
    child.wait()?;

    assert_eq!(count_open(&env).await?, 0);
    assert!(statuses.contains(&Status::Completed) && statuses.contains(&Status::Compensated));
    let audit = bank::audit(&env.bank).await?;
    assert!(audit.holds(), "{audit:?}");
    assert_eq!((audit.frozen, audit.pending), (0, 0));
    // Every instance's projection is what its log replays to.
    let store = env.store();
    for id in &ids {
        use sagas::orchestrator::store::SagaStore;
        let log: Vec<_> = store
            .events(*id)
            .await?
            .into_iter()
            .map(|e| e.event)
            .collect();
        let replayed = sagas::orchestrator::machine::replay(&log).unwrap();
        assert_eq!(Some(replayed), store.get(*id).await?.map(|s| s.instance));
    }
    accounts.stop().await;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_committed_but_never_published_are_relayed_from_the_outbox() -> Result<()> {
    use sagas::orchestrator::store::SagaStore;
    use std::sync::atomic::Ordering;

    let env = TestEnv::new().await?;
    bank::seed(&env.bank, 2, 1_000).await?;
    let registry = bank::registry()?;
    // As if a process committed the start of a transfer and died before publishing: the
    // outbox row is there, nothing was sent.
    let def = registry.latest("transfer_saga").unwrap().clone();
    let id = Uuid::now_v7();
    let long_ago = chrono::Utc::now() - chrono::Duration::seconds(60);
    let input = json!({"from": "acct-1", "to": "acct-2", "amount": 5});
    let t = sagas::orchestrator::machine::start(id, (**def.plan()).clone(), input, long_ago, &def);
    env.store().create(&t, long_ago).await?;

    let accounts = spawn_participant(
        &env,
        bank::PARTICIPANT,
        bank::shared_handler(Default::default()),
    )
    .await?;
    let app = spawn_app(&env, registry).await?;
    let done = env.wait_terminal(id).await?;
    assert_eq!(done.status, Status::Completed);
    assert!(app.engine.stats().relayed.load(Ordering::Relaxed) >= 1);
    // Every row goes once the broker confirms it: with the next write, or with the deleter
    // within its interval.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (left,): (i64,) = sqlx::query_as("SELECT count(*) FROM sagas_outbox")
            .fetch_one(&env.orch)
            .await?;
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} outbox rows left after 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    accounts.stop().await;
    app.stop().await;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_without_the_definition_leaves_the_saga_to_one_that_has_it() -> Result<()> {
    use sagas::orchestrator::store::SagaStore;

    let env = TestEnv::new().await?;
    bank::seed(&env.bank, 2, 1_000).await?;
    let registry = bank::registry()?;
    let def = registry.latest("transfer_saga").unwrap().clone();
    let id = Uuid::now_v7();
    let long_ago = chrono::Utc::now() - chrono::Duration::seconds(60);
    let input = json!({"from": "acct-1", "to": "acct-2", "amount": 5});
    let t = sagas::orchestrator::machine::start(id, (**def.plan()).clone(), input, long_ago, &def);
    env.store().create(&t, long_ago).await?;
    let accounts = spawn_participant(
        &env,
        bank::PARTICIPANT,
        bank::shared_handler(Default::default()),
    )
    .await?;

    // A process with no definitions relays the debit; the reply needs the credit's command,
    // which it cannot compute, so it must not commit anything for it.
    let blind = spawn_app(&env, Registry::new()).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while blind
        .engine
        .stats()
        .relayed
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "nothing relayed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let kinds: Vec<&str> = env
        .store()
        .events(id)
        .await?
        .iter()
        .map(|e| e.event.kind())
        .collect();
    assert!(!kinds.contains(&"preparation_failed"), "{kinds:?}");
    assert!(!kinds.contains(&"undo_started"), "{kinds:?}");
    blind.stop().await;

    let app = spawn_app(&env, registry).await?;
    let done = env.wait_terminal(id).await?;
    assert_eq!(done.status, Status::Completed);
    accounts.stop().await;
    app.stop().await;
    env.cleanup().await;
    Ok(())
}

/// Starts a job and answers `in_progress`, remembering the command for its completion.
struct LongJob(Arc<Mutex<Vec<Command>>>);

#[async_trait]
impl sagas::participant::Handler for LongJob {
    async fn handle(&self, cmd: &Command, _: &mut PgConnection) -> Result<Value, HandlerError> {
        self.0.lock().await.push(cmd.clone());
        Err(HandlerError::in_progress(Some("queued".into())))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_running_step_answered_in_progress_completes_when_the_participant_finishes_it()
-> Result<()> {
    let env = TestEnv::new().await?;
    let def = Definition::saga::<Nothing>("long_saga", 1)
        .step("job", "accounts", |s| {
            s.command(|_, _| json!({}))
                .timeout(Duration::from_secs(2))
                .in_progress_timeout(Duration::from_secs(120))
        })
        .build()?;
    let app = spawn_app(&env, Registry::new().with(def)?).await?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let accounts = spawn_participant(&env, "accounts", Arc::new(LongJob(seen.clone()))).await?;
    let id = app.engine.start("long_saga", json!({})).await?.id;
    helpers::wait_event(&app, id, |e| e.event.kind() == "extended").await?;
    // Longer than the step's 2 s timeout: the in_progress answer holds off any resend.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let cmd = {
        let seen = seen.lock().await;
        assert_eq!(seen.len(), 1, "no second attempt while in progress");
        seen[0].clone()
    };
    let conn = connect_broker().await?;
    let done = sagas::participant::runtime::complete(
        &env.bank,
        &conn,
        &env.topology,
        &accounts.announcement,
        &cmd,
        Outcome::succeeded(json!({"result": "ready"})),
    )
    .await?;
    assert_eq!(done, sagas::participant::barrier::Completion::Completed);
    let finished = env.wait_terminal(id).await?;
    assert_eq!(finished.status, Status::Completed);
    assert_eq!(finished.steps[0].output, Some(json!({"result": "ready"})));
    close_broker(&conn).await;
    accounts.stop().await;
    app.stop().await;
    env.cleanup().await;
    Ok(())
}
