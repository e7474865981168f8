//! The PostgreSQL store under concurrency: updates of one instance serialize, and due timers
//! and outbox rows are claimed by one process each.

mod common;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use chrono::Utc;
use sagas::orchestrator::machine::{self, Input, Timer, TimerKind};
use sagas::orchestrator::store::{PgStore, SagaStore};
use sagas::orchestrator::{Definition, Registry};
use sagas::participant::{Operation, Outcome, Reply};
use serde_json::json;
use uuid::Uuid;

fn definition() -> Definition {
    Definition::saga::<serde_json::Value>("d", 1)
        .step("a", "p", |s| s.command(|_, _| json!({})))
        .step("b", "p", |s| s.command(|_, _| json!({})))
        .build()
        .unwrap()
}

async fn create(store: &PgStore, def: &Definition) -> Result<Uuid> {
    let id = Uuid::now_v7();
    let t = machine::start(id, (**def.plan()).clone(), json!({}), Utc::now(), def);
    store.create(&t, Utc::now()).await?;
    Ok(id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_of_one_instance_serialize_into_a_gapless_log() -> Result<()> {
    let env = common::TestEnv::new().await?;
    let store = Arc::new(env.store());
    let def = definition();
    let id = create(&store, &def).await?;
    let before = store.events(id).await?.len();
    let mut tasks = Vec::new();
    for i in 0..20u32 {
        let store = store.clone();
        let def = def.clone();
        tasks.push(tokio::spawn(async move {
            // A stray reply: each update appends exactly one `reply_ignored` event.
            let reply = Reply {
                protocol: 1,
                transaction_id: id,
                step: "b".into(),
                operation: Operation::Action,
                attempt: i + 1,
                outcome: Outcome::succeeded(json!(i)),
            };
            store
                .update(
                    id,
                    None,
                    Utc::now(),
                    Box::new(move |inst| {
                        Ok(machine::handle(
                            inst,
                            Input::Reply(reply),
                            Utc::now(),
                            &def,
                        )?)
                    }),
                )
                .await
        }));
    }
    for t in tasks {
        t.await??;
    }
    let events = store.events(id).await?;
    assert_eq!(events.len(), before + 20);
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as i64).collect::<Vec<_>>());
    let stored = store.get(id).await?.unwrap().instance;
    assert_eq!(stored.seq, events.len() as u64);
    let log: Vec<_> = events.into_iter().map(|e| e.event).collect();
    assert_eq!(machine::replay(&log), Some(stored));
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_timers_and_outbox_rows_are_claimed_by_one_claimer_each() -> Result<()> {
    let env = common::TestEnv::new().await?;
    let store = Arc::new(env.store());
    let def = definition();
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(create(&store, &def).await?);
    }
    // Every instance has its first command in the outbox and a reply deadline timer.
    let later = Utc::now() + chrono::Duration::hours(1);
    let lease = chrono::Duration::minutes(5);
    let claim_timers = |s: Arc<PgStore>| async move { s.claim_due_timers(later, 7, lease).await };
    let claim_outbox = |s: Arc<PgStore>| async move { s.claim_outbox(later, 7, lease).await };
    let mut timers = Vec::new();
    let mut rows = Vec::new();
    loop {
        let (a, b) = tokio::join!(claim_timers(store.clone()), claim_timers(store.clone()));
        let (c, d) = tokio::join!(claim_outbox(store.clone()), claim_outbox(store.clone()));
        let (a, b, c, d) = (a?, b?, c?, d?);
        if a.is_empty() && b.is_empty() && c.is_empty() && d.is_empty() {
            break;
        }
        timers.extend(a.into_iter().chain(b));
        rows.extend(c.into_iter().chain(d).map(|m| m.id));
    }
    let mut timer_ids: Vec<Uuid> = timers.iter().map(|(id, _)| *id).collect();
    timer_ids.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(timer_ids, expected, "each timer claimed exactly once");
    assert!(timers.iter().all(|(_, t)| *t
        == Timer {
            step: 0,
            kind: TimerKind::Deadline,
            operation: Operation::Action,
            attempt: 1
        }));
    rows.sort();
    rows.dedup();
    assert_eq!(rows.len(), 40, "each outbox row claimed exactly once");
    // Leased rows are not claimed again before the lease ends.
    assert!(store.claim_outbox(later, 100, lease).await?.is_empty());
    store.delete_outbox(&rows).await?;
    assert!(
        store
            .claim_outbox(later + chrono::Duration::hours(1), 100, lease)
            .await?
            .is_empty()
    );
    let _ = (Registry::new(), Duration::ZERO);
    env.cleanup().await;
    Ok(())
}
