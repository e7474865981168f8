//! Circuit breakers and rate limits per participant, end to end: a participant stopped for
//! longer than its steps' retry budgets, then restarted, with the breaker on (every saga
//! completes, and both orchestrators on the database see one breaker open and close) and off
//! (every saga compensates); and commands to a rate-limited participant all arriving. The
//! stores' part of sharing a breaker is in `store.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use lapin::Connection;
use sagas::orchestrator::breaker::BreakerPolicy;
use sagas::orchestrator::{Definition, EngineConfig, Registry, RetryPolicy, Status};
use sagas::participant::Outcome;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::helpers::{self, App, TestEnv, close_broker, spawn_app_with_engine};

/// Sagas started while the participant is down.
const SAGAS: usize = 20;
/// How long the participant is down: longer than a step's whole retry budget (three attempts
/// of 500 ms with backoffs of 200 and 400 ms, about 2.1 s).
const OUTAGE: Duration = Duration::from_secs(6);

#[derive(serde::Deserialize)]
struct Nothing {}

/// One step on `payment`: 500 ms to answer, three attempts.
fn registry() -> Result<Registry> {
    let def = Definition::saga::<Nothing>("pay", 1)
        .step("charge", "payment", |s| {
            s.command(|_, _| json!({}))
                .retry(RetryPolicy::exponential(
                    3,
                    Duration::from_millis(200),
                    Duration::from_millis(400),
                ))
                .timeout(Duration::from_millis(500))
        })
        .build()?;
    Ok(Registry::new().with(def)?)
}

/// Breakers that open after ten attempts in a window, half of them failed, and probe every
/// second (at most every two); reported five times a second.
fn with_breakers() -> EngineConfig {
    EngineConfig {
        breakers: Some(BreakerPolicy {
            window: Duration::from_secs(10),
            min_volume: 10,
            failure_share: 0.5,
            probe_interval: Duration::from_secs(1),
            max_probe_interval: Duration::from_secs(2),
        }),
        breaker_sync: Duration::from_millis(200),
        ..helpers::engine_config()
    }
}

/// `payment`, answering every command `succeeded`, and counting them.
async fn payment(env: &TestEnv, received: Arc<AtomicU64>) -> Result<(Connection, JoinHandle<()>)> {
    helpers::scripted_participant(env, "payment", move |_| {
        received.fetch_add(1, Ordering::Relaxed);
        Some(Outcome::succeeded(Value::Null))
    })
    .await
}

/// A participant process stopped: its consumer ends and its connection closes (commands wait
/// in its queue).
async fn stop((conn, task): (Connection, JoinHandle<()>)) {
    task.abort();
    let _ = task.await;
    close_broker(&conn).await;
}

/// The breaker of `payment` as `GET /v1/participants` shows it.
fn payment_breaker(answer: &Value) -> &str {
    answer["participants"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["participant"] == "payment"))
        .and_then(|p| p["breaker"].as_str())
        .unwrap_or("")
}

/// What an outage did.
#[derive(Debug)]
struct Figures {
    statuses: Vec<Status>,
    /// Attempts sent to `payment` (`dispatched` events), actions and compensations.
    attempts: usize,
    /// Attempts postponed, and of them the ones whose previous attempt was written off.
    postponed: usize,
    forgiven: usize,
    /// From the restart until every saga finished.
    finish: Duration,
}

/// Stops `payment`, starts [`SAGAS`] sagas on two orchestrators sharing one database (`config`
/// for both), waits out [`OUTAGE`] (checking the breaker while the breakers are on), restarts
/// `payment` and waits for every saga to finish.
async fn outage(config: EngineConfig) -> Result<Figures> {
    let env = TestEnv::new().await?;
    let on = config.breakers.is_some();
    let apps: Vec<App> = vec![
        spawn_app_with_engine(&env, registry()?, env.amqp_config(), config.clone()).await?,
        spawn_app_with_engine(&env, registry()?, env.amqp_config(), config).await?,
    ];
    let received = Arc::new(AtomicU64::new(0));
    stop(payment(&env, received.clone()).await?).await;
    let down = tokio::time::Instant::now();
    let mut ids: Vec<Uuid> = Vec::new();
    for i in 0..SAGAS {
        ids.push(apps[i % 2].engine.start("pay", json!({})).await?.id);
    }
    let http = reqwest::Client::new();
    if on {
        // Both orchestrators see the one breaker open: its state is in the database.
        for app in &apps {
            helpers::poll(&http, app, "/v1/participants", |a| {
                payment_breaker(a) == "open"
            })
            .await?;
        }
    }
    // The outage lasts its length whatever happens meanwhile: it is the scenario, not a wait
    // for a condition.
    tokio::time::sleep_until(down + OUTAGE).await;
    let restarted = tokio::time::Instant::now();
    let running = payment(&env, received.clone()).await?;
    let mut statuses = Vec::new();
    for id in &ids {
        statuses.push(env.wait_terminal(*id).await?.status);
    }
    let finish = restarted.elapsed();
    if on {
        for app in &apps {
            helpers::poll(&http, app, "/v1/participants", |a| {
                payment_breaker(a) == "closed"
            })
            .await?;
        }
    }
    let (mut attempts, mut postponed, mut forgiven) = (0, 0, 0);
    for id in &ids {
        for e in apps[0].engine.events(*id).await? {
            match e.event.kind() {
                "dispatched" => attempts += 1,
                "postponed" => {
                    postponed += 1;
                    let body = serde_json::to_value(&e.event)?;
                    forgiven += usize::from(body["forgiven"] == json!(true));
                }
                _ => {}
            }
        }
    }
    stop(running).await;
    for app in apps {
        app.stop().await;
    }
    env.cleanup().await;
    Ok(Figures {
        statuses,
        attempts,
        postponed,
        forgiven,
        finish,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_breaker_every_saga_outlives_an_outage_longer_than_its_retry_budget() -> Result<()>
{
    let f = outage(with_breakers()).await?;
    println!(
        "breaker on: {SAGAS} sagas, outage {OUTAGE:?}: {} attempts sent, {} postponed ({} \
         written off), all finished {:?} after the restart: {:?}",
        f.attempts, f.postponed, f.forgiven, f.finish, f.statuses
    );
    assert!(
        f.statuses.iter().all(|s| *s == Status::Completed),
        "{:?}",
        f.statuses
    );
    assert!(f.forgiven > 0, "timeouts while open were written off");
    // The first attempts, then about one probe a second per orchestrator: far fewer than the
    // sagas' budgets would have sent.
    assert!(f.attempts < SAGAS * 3, "{} attempts", f.attempts);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_breaker_the_same_outage_exhausts_every_budget_and_compensates() -> Result<()> {
    let f = outage(helpers::engine_config()).await?;
    println!(
        "breaker off: {SAGAS} sagas, outage {OUTAGE:?}: {} attempts sent, all finished {:?} \
         after the restart: {:?}",
        f.attempts, f.finish, f.statuses
    );
    assert!(
        f.statuses.iter().all(|s| *s == Status::Compensated),
        "{:?}",
        f.statuses
    );
    assert_eq!(f.postponed, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_to_a_rate_limited_participant_arrives_none_is_dropped() -> Result<()> {
    let env = TestEnv::new().await?;
    let config = EngineConfig {
        rate_limits: [("payment".to_owned(), 10.0)].into_iter().collect(),
        ..helpers::engine_config()
    };
    let app = spawn_app_with_engine(&env, registry()?, env.amqp_config(), config).await?;
    let received = Arc::new(AtomicU64::new(0));
    let running = payment(&env, received.clone()).await?;
    let began = tokio::time::Instant::now();
    let mut ids = Vec::new();
    for _ in 0..SAGAS * 2 {
        ids.push(app.engine.start("pay", json!({})).await?.id);
    }
    for id in &ids {
        assert_eq!(env.wait_terminal(*id).await?.status, Status::Completed);
    }
    println!(
        "rate limit 10/s: {} sagas completed in {:?}, {} commands received",
        ids.len(),
        began.elapsed(),
        received.load(Ordering::Relaxed)
    );
    assert!(received.load(Ordering::Relaxed) >= ids.len() as u64);
    let http = reqwest::Client::new();
    let answer = helpers::get(&http, &app, "/v1/participants").await?;
    let payment = &answer["participants"][0];
    assert_eq!(
        (
            &payment["participant"],
            &payment["rate_limit"],
            &payment["breaker"]
        ),
        (&json!("payment"), &json!(10.0), &json!("off"))
    );
    let out = helpers::run_sagactl(&["participants", "--url", &app.url("")])?;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        table.contains("RATE LIMIT/S") && table.lines().any(|l| l.starts_with("payment ")),
        "{table}"
    );
    stop(running).await;
    app.stop().await;
    env.cleanup().await;
    Ok(())
}
