//! `?wait` across orchestrator processes: a settled transaction wakes only the waits on it, a
//! wait is woken by whichever process settles its transaction (PostgreSQL NOTIFY, heard on a
//! listening connection of each process), also after that connection was lost, and a wait
//! leaves nothing behind. Waits re-read only every 600 s here, so that a wait that ends early
//! was woken, not polled.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;
use sagas::orchestrator::store::{LISTENER_NAME, PgStore, SagaStore};
use sagas::orchestrator::transport::AmqpConfig;
use sagas::orchestrator::{Engine, EngineConfig, Registry, Status};
use sagas_test_support::{delete_amqp, eventually, unique_topology};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::api::{PARTICIPANT, one_step};
use crate::helpers::{
    App, RawParticipant, Received, TestEnv, engine_config, spawn_app, spawn_app_with_engine,
};

const DEFINITION: &str = "waited";

/// Engine settings whose waits re-read their transaction only after 600 s: longer than any
/// wait, so only a wake-up ends one early.
fn patient() -> EngineConfig {
    EngineConfig {
        wait_recheck: Duration::from_secs(600),
        ..engine_config()
    }
}

fn registry() -> Result<Registry> {
    Ok(Registry::new().with(one_step(DEFINITION)?)?)
}

/// Reads of transactions by the engine's waits so far.
fn reads(engine: &Engine) -> u64 {
    engine.stats().wait_reads.load(Ordering::Relaxed)
}

/// Waits (bounded) until the engine's listener has connected `times` times.
async fn listening(engine: &Engine, times: u64) {
    eventually("the listener connected", || {
        engine.stats().listener_connects.load(Ordering::Relaxed) >= times
    })
    .await;
}

/// Starts a transaction through `engine` and returns it with the command its participant got.
async fn begin(engine: &Engine, participant: &mut RawParticipant) -> Result<(Uuid, Received)> {
    let id = engine.start(DEFINITION, json!({"answer": false})).await?.id;
    let command = participant.next().await?;
    anyhow::ensure!(command.field("transaction_id") == id.to_string());
    Ok((id, command))
}

/// `GET /v1/sagas/{id}?wait=60` on `app`, in a task of its own: its status and body.
fn wait_over_http(app: &App, id: Uuid) -> tokio::task::JoinHandle<Result<(u16, Value)>> {
    let url = app.url(&format!("/v1/sagas/{id}?wait=60"));
    tokio::spawn(async move {
        let res = reqwest::get(url).await?;
        Ok((res.status().as_u16(), res.json().await?))
    })
}

/// One process that drives transactions, and one that only waits for them: a topology of its
/// own, so that no reply reaches it and only an announcement can wake its waits.
struct TwoProcesses {
    env: TestEnv,
    participant: RawParticipant,
    driver: App,
    waiter: App,
    waiter_topology: sagas::participant::Topology,
}

impl TwoProcesses {
    /// Both processes, a transaction the driver began (its command at the participant), and a
    /// `GET ?wait=60` on the waiter for it that has read it once.
    async fn waiting() -> Result<(
        TwoProcesses,
        Received,
        tokio::task::JoinHandle<Result<(u16, Value)>>,
    )> {
        let mut p = TwoProcesses::start().await?;
        let (id, command) = begin(&p.driver.engine, &mut p.participant).await?;
        let wait = wait_over_http(&p.waiter, id);
        eventually("the wait read its transaction", || {
            reads(&p.waiter.engine) == 1
        })
        .await;
        Ok((p, command, wait))
    }

    async fn start() -> Result<TwoProcesses> {
        let env = TestEnv::new().await?;
        let participant = RawParticipant::start(&env, PARTICIPANT).await?;
        let driver = spawn_app(&env, registry()?).await?;
        let waiter_topology = unique_topology();
        let amqp = AmqpConfig {
            topology: waiter_topology.clone(),
            ..env.amqp_config()
        };
        let waiter = spawn_app_with_engine(&env, Registry::new(), amqp, patient()).await?;
        listening(&driver.engine, 1).await;
        listening(&waiter.engine, 1).await;
        Ok(TwoProcesses {
            env,
            participant,
            driver,
            waiter,
            waiter_topology,
        })
    }

    async fn stop(self) {
        self.waiter.stop().await;
        self.driver.stop().await;
        self.participant.close().await;
        delete_amqp(&self.waiter_topology, &[], &[]).await;
        self.env.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settled_transaction_wakes_only_the_wait_on_it() -> Result<()> {
    const WAITS: usize = 8;
    let env = TestEnv::new().await?;
    let mut participant = RawParticipant::start(&env, PARTICIPANT).await?;
    let app = spawn_app_with_engine(&env, registry()?, env.amqp_config(), patient()).await?;
    let engine = app.engine.clone();
    // Its first connection wakes every wait: over before the waits begin.
    listening(&engine, 1).await;
    let mut commands = HashMap::new();
    for _ in 0..WAITS {
        let (id, command) = begin(&engine, &mut participant).await?;
        commands.insert(id, command);
    }
    let ids: Vec<Uuid> = commands.keys().copied().collect();
    let mut waits: Vec<_> = ids
        .iter()
        .map(|&id| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.wait_terminal(id, Duration::from_secs(60)).await })
        })
        .collect();
    eventually("every wait read its transaction", || {
        reads(&engine) == WAITS as u64
    })
    .await;
    assert_eq!(engine.waiting(), WAITS);

    participant
        .reply(&commands[&ids[3]], json!({"status": "succeeded"}))
        .await?;
    let done = tokio::time::timeout(Duration::from_secs(30), waits.remove(3)).await???;
    assert_eq!(
        done.as_ref().map(|s| s.instance.status),
        Some(Status::Completed)
    );
    // The transition committed here handed its instance to the wait: no wait read again, and
    // the answer is the instance as stored, timestamps included.
    assert_eq!(reads(&engine), WAITS as u64);
    assert_eq!(engine.stats().wait_handed.load(Ordering::Relaxed), 1);
    assert_eq!(done, engine.get(ids[3]).await?);
    assert_eq!(engine.waiting(), WAITS - 1);
    assert!(waits.iter().all(|w| !w.is_finished()));

    // Waits dropped before they end (a client gone) leave nothing registered.
    for wait in waits {
        wait.abort();
        let _ = wait.await;
    }
    assert_eq!(engine.waiting(), 0);
    // No other process listens: nothing was announced.
    assert_eq!(engine.stats().announced.load(Ordering::Relaxed), 0);
    app.stop().await;
    participant.close().await;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_sees_other_processes_listening_but_not_its_own_listener() -> Result<()> {
    let env = TestEnv::new().await?;
    let (one, two) = (
        PgStore::new(env.orch.clone())
            .settlements()
            .expect("PostgreSQL announces"),
        PgStore::new(env.orch.clone())
            .settlements()
            .expect("PostgreSQL announces"),
    );
    assert!(!one.others_listening().await?, "nobody listens yet");
    let mine = one.listen().await?;
    assert!(
        !one.others_listening().await?,
        "its own listener is not another"
    );
    assert!(two.others_listening().await?);
    let theirs = two.listen().await?;
    assert!(one.others_listening().await?);
    drop(theirs);
    // Its connection closes in the background: bounded, every 20 ms for up to 10 s.
    let mut alone = false;
    for _ in 0..500 {
        if !one.others_listening().await? {
            alone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(alone, "the other listener is gone within 10 s");
    drop(mine);
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_that_runs_out_leaves_nothing_registered() -> Result<()> {
    let env = TestEnv::new().await?;
    let mut participant = RawParticipant::start(&env, PARTICIPANT).await?;
    let app = spawn_app(&env, registry()?).await?;
    let (id, _) = begin(&app.engine, &mut participant).await?;
    let res = reqwest::get(app.url(&format!("/v1/sagas/{id}?wait=1"))).await?;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await?["status"], "running");
    assert_eq!(app.engine.waiting(), 0);
    app.stop().await;
    participant.close().await;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_is_woken_by_the_other_process_that_settles_its_transaction() -> Result<()> {
    let (p, command, wait) = TwoProcesses::waiting().await?;

    p.participant
        .reply(&command, json!({"status": "succeeded"}))
        .await?;
    // Well before the 60 s of the wait and the 600 s of its re-read.
    let (status, view) = tokio::time::timeout(Duration::from_secs(30), wait).await???;
    assert_eq!((status, view["status"].as_str()), (200, Some("completed")));
    // Read when it began and once when the announcement woke it.
    assert_eq!(reads(&p.waiter.engine), 2);
    p.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_are_still_woken_after_the_listening_connection_is_lost() -> Result<()> {
    let (p, command, wait) = TwoProcesses::waiting().await?;

    // Both processes' listening connections (the tests' databases are their own).
    let terminated: Vec<(bool,)> = sqlx::query_as(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = $1",
    )
    .bind(LISTENER_NAME)
    .fetch_all(&p.env.orch)
    .await?;
    assert_eq!(terminated, [(true,), (true,)]);
    listening(&p.waiter.engine, 2).await;
    // Announcements may have been lost meanwhile: the reconnected listener woke every wait.
    eventually("the wait read its transaction again", || {
        reads(&p.waiter.engine) == 2
    })
    .await;

    p.participant
        .reply(&command, json!({"status": "succeeded"}))
        .await?;
    let (status, view) = tokio::time::timeout(Duration::from_secs(30), wait).await???;
    assert_eq!((status, view["status"].as_str()), (200, Some("completed")));
    assert_eq!(reads(&p.waiter.engine), 3);
    p.stop().await;
    Ok(())
}
