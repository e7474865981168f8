//! One store suite, run against both backends: every test below runs once on PostgreSQL
//! (`postgres::…`, its own database) and once on SQLite (`sqlite::…`, its own file). It covers
//! the whole `SagaStore` trait: creation and its conflicts, the log, updates with their outbox
//! rows and timers, claims under concurrency, keyset listing, and a restart that reopens the
//! same database and carries on.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use chrono::Duration;
use sagas::orchestrator::breaker::{BreakerPolicy, Change, Outcomes};
use sagas::orchestrator::clock::{Clock, SystemClock};
use sagas::orchestrator::machine::{self, Input, Instance, Time, Timer, TimerKind, Transition};
use sagas::orchestrator::store::{
    Created, Decide, Idempotency, ListFilter, MemoryStore, NewInstance, Pending, PgStore, Position,
    Pruned, SagaStore, SqliteStore, StateCacheStats, StoreError,
};
use sagas::orchestrator::{Definition, Status};
use sagas::participant::{Operation, Outcome, Reply};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers;

/// Where a test's store lives.
enum Backend {
    Postgres(helpers::TestEnv),
    Sqlite(PathBuf),
}

impl Backend {
    async fn postgres() -> Result<Backend> {
        Ok(Backend::Postgres(helpers::TestEnv::new().await?))
    }

    async fn sqlite() -> Result<Backend> {
        let dir = std::env::temp_dir().join(format!("sagas-store-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        Ok(Backend::Sqlite(dir))
    }

    /// A store on the test's database; a second call opens it again, as a new process would.
    async fn open(&self) -> Result<Arc<dyn SagaStore>> {
        Ok(match self {
            Backend::Postgres(env) => {
                let pool = PgPool::connect(&env.orch_url).await?;
                Arc::new(PgStore::new(pool))
            }
            Backend::Sqlite(dir) => Arc::new(
                SqliteStore::open(dir.join("sagas.db"))
                    .await
                    .context("opening the SQLite store")?,
            ),
        })
    }

    async fn cleanup(self) {
        match self {
            Backend::Postgres(env) => env.cleanup().await,
            Backend::Sqlite(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

/// Runs each named suite function against both backends, as `postgres::name` and `sqlite::name`.
macro_rules! store_suite {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    let backend = super::Backend::postgres().await?;
                    super::$name(&backend).await?;
                    backend.cleanup().await;
                    Ok(())
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    let backend = super::Backend::sqlite().await?;
                    super::$name(&backend).await?;
                    backend.cleanup().await;
                    Ok(())
                }
            )*
        }
    };
}

store_suite!(
    a_created_instance_reads_back_with_its_log_outbox_row_and_deadline,
    creating_an_instance_twice_is_refused_and_changes_nothing,
    an_idempotency_key_names_the_first_instance_and_tells_a_different_request_apart,
    unknown_instances_are_not_found,
    an_update_appends_events_writes_the_outbox_and_moves_the_timer,
    a_fired_timer_is_deleted_only_while_it_is_the_stored_one,
    a_refused_decision_commits_nothing,
    concurrent_updates_of_one_instance_serialize_into_a_gapless_log,
    due_timers_and_outbox_rows_are_claimed_by_one_claimer_each,
    outbox_rows_wait_for_their_grace_and_deleted_ids_are_never_reused,
    listing_pages_newest_first_and_filters_by_status_and_definition,
    a_reopened_store_continues_a_transition_where_it_stopped,
    ping_answers,
    a_batch_commits_every_good_input_and_answers_each_item_on_its_own,
    a_batch_of_starts_stores_each_new_instance_and_refuses_an_existing_one,
    a_batch_of_keyed_starts_stores_one_instance_per_key_and_names_it_to_the_others,
    concurrent_batches_over_the_same_instances_lose_nothing_and_do_not_deadlock,
    finished_instances_older_than_the_horizon_are_pruned_with_their_log_and_open_ones_stay,
    a_prune_deletes_at_most_its_batch_oldest_finished_first,
    the_gauges_count_open_instances_by_status_the_outbox_and_the_timers_due,
    in_flight_reads_an_instances_outbox_rows_and_timers_and_stuck_steps_name_their_cause,
    activity_counts_instances_by_minute_with_latency_percentiles_and_the_oldest_open_first,
    listing_by_idempotency_key_finds_the_instance_started_with_it,
    breakers_are_shared_and_exactly_one_report_makes_each_change,
);

#[tokio::test]
async fn the_memory_store_keeps_breakers_as_the_databases_do() -> Result<()> {
    let store = MemoryStore::new();
    shared_breakers(&store, &store).await
}

/// Two processes on one database report to the breakers at once.
async fn breakers_are_shared_and_exactly_one_report_makes_each_change(b: &Backend) -> Result<()> {
    let (one, two) = (b.open().await?, b.open().await?);
    shared_breakers(&*one, &*two).await
}

/// Each of `one` and `two` alone reports fewer failures than open a breaker; together they open
/// it, and only one of them says it did. The other sees it open; an answer that one reports
/// closes it for both, and a participant nobody reported about stays unknown.
async fn shared_breakers(one: &dyn SagaStore, two: &dyn SagaStore) -> Result<()> {
    let policy = BreakerPolicy {
        min_volume: 10,
        ..BreakerPolicy::default()
    };
    let report = |participant: &str, failures, answers| {
        vec![Outcomes {
            participant: participant.into(),
            failures,
            answers,
        }]
    };
    let t0 = now();
    let six = report("payment", 6, 0);
    let (a, b) = tokio::join!(
        one.sync_breakers(t0, &six, &policy),
        two.sync_breakers(t0, &six, &policy)
    );
    let (a, b) = (a?, b?);
    let opened = [&a, &b]
        .iter()
        .filter(|r| r[0].change == Some(Change::Opened))
        .count();
    assert_eq!(opened, 1, "{a:?} {b:?}");
    let seen = two.sync_breakers(t0, &[], &policy).await?;
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].participant, "payment");
    assert!(seen[0].state.open && seen[0].change.is_none(), "{seen:?}");
    assert!(seen[0].state.next_probe.is_some_and(|at| at > t0));
    let closed = one
        .sync_breakers(t0 + Duration::seconds(1), &report("payment", 0, 1), &policy)
        .await?;
    assert_eq!(closed[0].change, Some(Change::Closed));
    let after = two
        .sync_breakers(t0 + Duration::seconds(1), &report("mail", 1, 0), &policy)
        .await?;
    let states: Vec<(&str, bool, u64)> = after
        .iter()
        .map(|s| (s.participant.as_str(), s.state.open, s.state.failures))
        .collect();
    assert_eq!(states, vec![("mail", false, 1), ("payment", false, 0)]);
    Ok(())
}

#[tokio::test]
async fn the_memory_store_reads_what_is_in_flight_and_the_stuck_steps_as_the_databases_do()
-> Result<()> {
    in_flight_and_stuck_steps(&MemoryStore::new()).await
}

fn definition(name: &str) -> Definition {
    Definition::saga::<serde_json::Value>(name, 1)
        .step("a", "p", |s| s.command(|_, _| json!({"op": "a"})))
        .step("b", "p", |s| s.command(|_, _| json!({"op": "b"})))
        .build()
        .unwrap()
}

fn now() -> Time {
    // Microseconds, as both databases store them.
    SystemClock.now()
}

fn start(def: &Definition, at: Time) -> Transition {
    machine::start(Uuid::now_v7(), (**def.plan()).clone(), json!({}), at, def)
}

/// `starts` as a batch of starts without idempotency keys.
fn keyless(starts: &[Transition]) -> Vec<NewInstance<'_>> {
    starts.iter().map(|t| (t, None)).collect()
}

async fn create(store: &dyn SagaStore, def: &Definition, at: Time) -> Result<Uuid> {
    let t = start(def, at);
    store.create(&t, at).await?;
    Ok(t.instance.id)
}

fn reply(id: Uuid, step: &str, attempt: u32, outcome: Outcome) -> Reply {
    Reply {
        protocol: 1,
        transaction_id: id,
        step: step.into(),
        operation: Operation::Action,
        attempt,
        outcome,
    }
}

/// Feeds `input` to the instance through the machine, as the engine does.
async fn feed(
    store: &dyn SagaStore,
    def: &Definition,
    id: Uuid,
    input: Input,
    fired: Option<Timer>,
    at: Time,
) -> Result<sagas::orchestrator::store::Updated, StoreError> {
    let def = def.clone();
    store
        .update(
            id,
            fired,
            at,
            Box::new(move |inst| Ok(machine::handle(inst, input.clone(), at, &def)?)),
        )
        .await
}

fn deadline(step: usize, attempt: u32) -> Timer {
    Timer {
        step,
        kind: TimerKind::Deadline,
        operation: Operation::Action,
        attempt,
    }
}

/// Every instance, newest first (up to 100).
fn list_all() -> ListFilter {
    ListFilter {
        status: None,
        definition: None,
        after: None,
        created_after: None,
        created_before: None,
        idempotency_key: None,
        limit: 100,
    }
}

/// Every timer due before `at`, claimed (and so leased for a day).
async fn due_timers(store: &dyn SagaStore, at: Time) -> Result<Vec<(Uuid, Timer)>> {
    Ok(store.claim_due_timers(at, 1_000, Duration::days(1)).await?)
}

/// The stored log replays to the stored projection.
async fn assert_replays(store: &dyn SagaStore, id: Uuid) -> Result<Instance> {
    let events = store.events(id).await?;
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as i64).collect::<Vec<_>>());
    let stored = store.get(id).await?.context("instance missing")?.instance;
    assert_eq!(stored.seq, events.len() as u64);
    let log: Vec<_> = events.into_iter().map(|e| e.event).collect();
    assert_eq!(machine::replay(&log).as_ref(), Some(&stored));
    Ok(stored)
}

async fn a_created_instance_reads_back_with_its_log_outbox_row_and_deadline(
    b: &Backend,
) -> Result<()> {
    let store = b.open().await?;
    let def = definition("d");
    let at = now();
    let t = start(&def, at);
    let id = t.instance.id;
    let outbox = store.create(&t, at).await?;

    let stored = store.get(id).await?.context("instance missing")?;
    assert_eq!(stored.instance, t.instance);
    assert_eq!((stored.created_at, stored.updated_at), (at, at));
    let events = store.events(id).await?;
    assert_eq!(
        events.iter().map(|e| e.event.clone()).collect::<Vec<_>>(),
        t.events
    );
    assert!(events.iter().all(|e| e.at == at));
    assert_replays(&*store, id).await?;

    // The first command is in the outbox, exactly as the transition's effect says.
    let sent: Vec<_> = t.sends().collect();
    assert_eq!(sent.len(), 1);
    assert_eq!(outbox.len(), 1);
    assert_eq!((&outbox[0].participant, &outbox[0].command), sent[0]);
    assert_eq!(outbox[0].command.payload, json!({"op": "a"}));

    // Its reply deadline is a timer, due at the deadline and not before.
    let due_at = outbox[0]
        .command
        .deadline
        .context("command without deadline")?;
    assert!(
        store
            .claim_due_timers(
                due_at - Duration::milliseconds(1),
                10,
                Duration::seconds(10)
            )
            .await?
            .is_empty()
    );
    assert_eq!(
        due_timers(&*store, due_at).await?,
        vec![(id, deadline(0, 1))]
    );
    Ok(())
}

async fn creating_an_instance_twice_is_refused_and_changes_nothing(b: &Backend) -> Result<()> {
    let store = b.open().await?;
    let def = definition("d");
    let at = now();
    let t = start(&def, at);
    let first = store.create(&t, at).await?;
    let later = at + Duration::seconds(1);
    match store.create(&t, later).await {
        Err(StoreError::Exists(id)) => assert_eq!(id, t.instance.id),
        other => panic!("expected Exists, got {other:?}"),
    }
    assert_eq!(store.events(t.instance.id).await?.len(), t.events.len());
    assert_eq!(store.get(t.instance.id).await?.unwrap().updated_at, at);
    // Only the first creation's outbox row exists.
    let rows = store
        .claim_outbox(later + Duration::hours(1), 100, Duration::seconds(10))
        .await?;
    assert_eq!(
        rows.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![first[0].id]
    );
    Ok(())
}

async fn an_idempotency_key_names_the_first_instance_and_tells_a_different_request_apart(
    b: &Backend,
) -> Result<()> {
    use sagas::orchestrator::store::{Created, Idempotency};
    let store = b.open().await?;
    let def = definition("d");
    let at = now();
    let key = |request: serde_json::Value| Idempotency {
        key: "order-42".into(),
        request,
    };
    let first = start(&def, at);
    let created = store
        .create_idempotent(&first, at, &key(json!({"input": 1})))
        .await?;
    assert!(matches!(created, Created::New(ref rows) if rows.len() == 1));
    let again = start(&def, at);
    assert_eq!(
        store
            .create_idempotent(&again, at, &key(json!({"input": 1})))
            .await?,
        Created::Existing {
            id: first.instance.id,
            same_request: true
        }
    );
    assert!(
        store.get(again.instance.id).await?.is_none(),
        "nothing stored"
    );
    assert_eq!(
        store
            .create_idempotent(&again, at, &key(json!({"input": 2})))
            .await?,
        Created::Existing {
            id: first.instance.id,
            same_request: false
        }
    );
    // The key is scoped to its definition.
    let other = start(&definition("e"), at);
    assert!(matches!(
        store
            .create_idempotent(&other, at, &key(json!({"input": 1})))
            .await?,
        Created::New(_)
    ));
    Ok(())
}

async fn unknown_instances_are_not_found(b: &Backend) -> Result<()> {
    let store = b.open().await?;
    let def = definition("d");
    let id = Uuid::now_v7();
    assert!(store.get(id).await?.is_none());
    assert!(store.events(id).await?.is_empty());
    let input = Input::Reply(reply(id, "a", 1, Outcome::succeeded(json!(1))));
    match feed(&*store, &def, id, input, None, now()).await {
        Err(StoreError::NotFound(missing)) => assert_eq!(missing, id),
        other => panic!("expected NotFound, got {other:?}"),
    }
    Ok(())
}

async fn an_update_appends_events_writes_the_outbox_and_moves_the_timer(b: &Backend) -> Result<()> {
    let store = b.open().await?;
    let def = definition("d");
    let at = now();
    let id = create(&*store, &def, at).await?;
    let before = store.events(id).await?.len();

    let later = at + Duration::milliseconds(300);
    let input = Input::Reply(reply(id, "a", 1, Outcome::succeeded(json!({"got": "a"}))));
    let updated = feed(&*store, &def, id, input, None, later).await?;

    // The step's output is kept and the next step is dispatched through the outbox.
    assert_eq!(updated.outbox.len(), 1);
    let next = &updated.outbox[0];
    assert_eq!(
        (next.participant.as_str(), next.command.step.as_str()),
        ("p", "b")
    );
    assert_eq!(next.command.payload, json!({"op": "b"}));
    let events = store.events(id).await?;
    assert_eq!(events.len(), before + updated.transition.events.len());
    assert!(events[before..].iter().all(|e| e.at == later));
    let stored = store.get(id).await?.unwrap();
    assert_eq!(stored.instance, updated.transition.instance);
    assert_eq!((stored.created_at, stored.updated_at), (at, later));
    assert_eq!(stored.instance.steps[0].output, Some(json!({"got": "a"})));
    assert_replays(&*store, id).await?;

    // Step a's deadline is gone; step b's is set.
    let timers = due_timers(&*store, later + Duration::days(1)).await?;
    assert_eq!(timers, vec![(id, deadline(1, 1))]);

    // Completing the last step finishes the instance and leaves no timer.
    let input = Input::Reply(reply(id, "b", 1, Outcome::succeeded(json!("done"))));
    let done = feed(&*store, &def, id, input, None, later).await?;
    assert!(done.outbox.is_empty());
    assert_eq!(
        store.get(id).await?.unwrap().instance.status,
        Status::Completed
    );
    assert!(
        due_timers(&*store, later + Duration::days(3))
            .await?
            .is_empty()
    );
    assert_replays(&*store, id).await?;
    Ok(())
}

async fn a_fired_timer_is_deleted_only_while_it_is_the_stored_one(b: &Backend) -> Result<()> {
    let store = b.open().await?;
    let def = definition("d");
    let at = now();
    let id = create(&*store, &def, at).await?;
    let unchanged: machine::Timer = deadline(0, 1);
    // A decision that changes nothing, so only the timer deletion is observed.
    let nothing = |store: Arc<dyn SagaStore>, fired: Timer| async move {
        store
            .update(
                id,
                Some(fired),
                now(),
                Box::new(|inst| {
                    Ok(Transition {
                        instance: inst.clone(),
                        events: vec![],
                        effects: vec![],
                    })
                }),
            )
            .await
    };
    // A stale timer (an older attempt) leaves the stored one alone.
    nothing(store.clone(), deadline(0, 7)).await?;
    let later = at + Duration::days(1);
    assert_eq!(
        store.claim_due_timers(later, 10, Duration::zero()).await?,
        vec![(id, unchanged)]
    );
    // The stored one is deleted.
    nothing(store.clone(), unchanged).await?;
    assert!(due_timers(&*store, later).await?.is_empty());
    // Nothing else changed.
    assert_eq!(store.events(id).await?.len(), start(&def, at).events.len());
    Ok(())
}

async fn a_refused_decision_commits_nothing(b: &Backend) -> Result<()> {
    let store = b.open().await?;
    let def = definition("d");
    let at = now();
    let id = create(&*store, &def, at).await?;
    let events = store.events(id).await?.len();
    let result = store
        .update(
            id,
            Some(deadline(0, 1)),
            now(),
            Box::new(|_| Err(StoreError::MissingDefinition("not here".into()))),
        )
        .await;
    assert!(
        matches!(result, Err(StoreError::MissingDefinition(_))),
        "{result:?}"
    );
    // The timer deletion was rolled back with the rest.
    assert_eq!(
        due_timers(&*store, at + Duration::days(1)).await?,
        vec![(id, deadline(0, 1))]
    );
    assert_eq!(store.events(id).await?.len(), events);
    // An operator action that does not fit is refused the same way.
    let abort = Input::Retry {
        actor: "test".into(),
        reason: "nothing is stuck".into(),
    };
    let refused = feed(&*store, &def, id, abort, None, now()).await;
    assert!(
        matches!(refused, Err(StoreError::Rejected(_))),
        "{refused:?}"
    );
    assert_eq!(store.events(id).await?.len(), events);
    Ok(())
}

async fn concurrent_updates_of_one_instance_serialize_into_a_gapless_log(
    b: &Backend,
) -> Result<()> {
    // Two stores on one database, as two processes would have.
    let stores = [b.open().await?, b.open().await?];
    let store = stores[0].clone();
    let def = definition("d");
    let id = create(&*store, &def, now()).await?;
    let before = store.events(id).await?.len();
    let mut tasks = Vec::new();
    for i in 0..20u32 {
        let (store, def) = (stores[i as usize % 2].clone(), def.clone());
        tasks.push(tokio::spawn(async move {
            // A stray reply: each update appends exactly one `reply_ignored` event.
            let stray = Input::Reply(reply(id, "b", i + 1, Outcome::succeeded(json!(i))));
            feed(&*store, &def, id, stray, None, now()).await
        }));
    }
    for t in tasks {
        t.await??;
    }
    assert_eq!(store.events(id).await?.len(), before + 20);
    assert_replays(&*store, id).await?;
    Ok(())
}

async fn due_timers_and_outbox_rows_are_claimed_by_one_claimer_each(b: &Backend) -> Result<()> {
    let store = b.open().await?;
    let other = b.open().await?;
    let def = definition("d");
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(create(&*store, &def, now()).await?);
    }
    // Every instance has its first command in the outbox and a reply deadline timer.
    let later = now() + Duration::hours(1);
    let lease = Duration::minutes(5);
    let claim_timers =
        |s: Arc<dyn SagaStore>| async move { s.claim_due_timers(later, 7, lease).await };
    let claim_outbox = |s: Arc<dyn SagaStore>| async move { s.claim_outbox(later, 7, lease).await };
    let mut timers = Vec::new();
    let mut rows = Vec::new();
    loop {
        // One claimer in each of two "processes" and a second one in the first.
        let (a, b, x) = tokio::join!(
            claim_timers(store.clone()),
            claim_timers(other.clone()),
            claim_timers(store.clone())
        );
        let (c, d, y) = tokio::join!(
            claim_outbox(store.clone()),
            claim_outbox(other.clone()),
            claim_outbox(other.clone())
        );
        let claimed_timers: Vec<_> = [a?, b?, x?].into_iter().flatten().collect();
        let claimed_rows: Vec<_> = [c?, d?, y?].into_iter().flatten().collect();
        if claimed_timers.is_empty() && claimed_rows.is_empty() {
            break;
        }
        timers.extend(claimed_timers);
        rows.extend(claimed_rows.into_iter().map(|m| m.id));
    }
    let mut timer_ids: Vec<Uuid> = timers.iter().map(|(id, _)| *id).collect();
    timer_ids.sort();
    ids.sort();
    assert_eq!(timer_ids, ids, "each timer claimed exactly once");
    assert!(timers.iter().all(|(_, t)| *t == deadline(0, 1)));
    rows.sort();
    rows.dedup();
    assert_eq!(rows.len(), 40, "each outbox row claimed exactly once");
    // Leased rows are not claimed again before the lease ends, and are after it.
    assert!(store.claim_outbox(later, 100, lease).await?.is_empty());
    assert!(store.claim_due_timers(later, 100, lease).await?.is_empty());
    let after_lease = later + lease;
    assert_eq!(
        store.claim_due_timers(after_lease, 100, lease).await?.len(),
        40
    );
    assert_eq!(store.claim_outbox(after_lease, 100, lease).await?.len(), 40);
    store.delete_outbox(&rows).await?;
    assert!(
        store
            .claim_outbox(after_lease + Duration::hours(1), 100, lease)
            .await?
            .is_empty()
    );
    Ok(())
}

async fn outbox_rows_wait_for_their_grace_and_deleted_ids_are_never_reused(
    b: &Backend,
) -> Result<()> {
    let store = b.open().await?;
    let def = definition("d");
    let at = now();
    let first = store.create(&start(&def, at), at).await?;
    let second = store.create(&start(&def, at), at).await?;
    let lease = Duration::seconds(30);
    // The writer publishes at once; the relay may only after the grace (5 s).
    assert!(
        store
            .claim_outbox(at + Duration::seconds(4), 10, lease)
            .await?
            .is_empty()
    );
    let claimed = store
        .claim_outbox(at + Duration::seconds(5), 10, lease)
        .await?;
    assert_eq!(
        claimed.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![first[0].id, second[0].id],
        "claimed in id order"
    );
    assert_eq!(claimed[0], first[0]);
    // Deleting one row leaves the other; the next row gets a new id.
    store.delete_outbox(&[second[0].id]).await?;
    store.delete_outbox(&[]).await?;
    let third = store.create(&start(&def, at), at).await?;
    assert!(third[0].id > second[0].id);
    let left = store
        .claim_outbox(at + Duration::hours(1), 10, lease)
        .await?;
    assert_eq!(
        left.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![first[0].id, third[0].id]
    );
    Ok(())
}

async fn listing_pages_newest_first_and_filters_by_status_and_definition(
    b: &Backend,
) -> Result<()> {
    let store = b.open().await?;
    let (d, other) = (definition("d"), definition("other"));
    let base = now();
    let mut created = Vec::new();
    for i in 0..5 {
        let at = base + Duration::milliseconds(i);
        created.push((at, create(&*store, &d, at).await?));
    }
    // Two started in the same microsecond: the id breaks the tie.
    let tie = base + Duration::milliseconds(10);
    for _ in 0..2 {
        created.push((tie, create(&*store, &other, tie).await?));
    }
    let mut expected = created.clone();
    expected.sort_by(|a, b| b.cmp(a));
    let expected: Vec<Uuid> = expected.into_iter().map(|(_, id)| id).collect();

    let all = list_all();
    let ids = |page: &[sagas::orchestrator::store::StoredInstance]| {
        page.iter().map(|s| s.instance.id).collect::<Vec<_>>()
    };
    assert_eq!(ids(&store.list(&all).await?), expected);

    // Pages of 3 walk the same order without gaps or repeats, even when new instances start.
    let mut paged = Vec::new();
    let mut after: Option<Position> = None;
    loop {
        let page = store
            .list(&ListFilter {
                after,
                limit: 3,
                ..all.clone()
            })
            .await?;
        if paged.is_empty() {
            create(&*store, &d, base + Duration::hours(1)).await?;
        }
        let Some(last) = page.last() else { break };
        after = Some(Position::of(last));
        paged.extend(ids(&page));
    }
    assert_eq!(paged, expected);

    let by_definition = store
        .list(&ListFilter {
            definition: Some("other".into()),
            ..all.clone()
        })
        .await?;
    assert_eq!(ids(&by_definition), expected[..2].to_vec());

    // Complete one instance; filter on its status.
    let done = created[1].1;
    for step in ["a", "b"] {
        let input = Input::Reply(reply(done, step, 1, Outcome::succeeded(json!("done"))));
        feed(&*store, &d, done, input, None, now()).await?;
    }
    let completed = store
        .list(&ListFilter {
            status: Some(Status::Completed),
            ..all.clone()
        })
        .await?;
    assert_eq!(ids(&completed), vec![done]);
    let running_other = store
        .list(&ListFilter {
            status: Some(Status::Running),
            definition: Some("d".into()),
            limit: 2,
            ..all.clone()
        })
        .await?;
    assert_eq!(running_other.len(), 2);
    assert!(
        running_other
            .iter()
            .all(|s| s.instance.plan.name == "d" && s.instance.status == Status::Running)
    );
    // A creation window: from the second instance (inclusive) to the tie (exclusive).
    let window = store
        .list(&ListFilter {
            created_after: Some(base + Duration::milliseconds(1)),
            created_before: Some(tie),
            ..all.clone()
        })
        .await?;
    let mut in_window: Vec<Uuid> = created[1..5].iter().map(|(_, id)| *id).collect();
    in_window.reverse();
    assert_eq!(ids(&window), in_window);
    Ok(())
}

async fn a_reopened_store_continues_a_transition_where_it_stopped(b: &Backend) -> Result<()> {
    let def = definition("d");
    let at = now();
    let (id, outbox) = {
        let store = b.open().await?;
        let t = start(&def, at);
        let outbox = store.create(&t, at).await?;
        feed(
            &*store,
            &def,
            t.instance.id,
            Input::Reply(reply(t.instance.id, "a", 1, Outcome::succeeded(json!("a")))),
            None,
            at,
        )
        .await?;
        (t.instance.id, outbox)
        // The store is dropped here, as by a process that stops.
    };
    let store = b.open().await?;
    let stored = assert_replays(&*store, id).await?;
    assert_eq!(stored.status, Status::Running);
    assert_eq!(stored.steps[0].output, Some(json!("a")));
    // What the first process left behind is there: both outbox rows and step b's deadline.
    let rows = store
        .claim_outbox(at + Duration::hours(1), 10, Duration::seconds(30))
        .await?;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0], outbox[0]);
    let timers = due_timers(&*store, at + Duration::days(1)).await?;
    assert_eq!(timers, vec![(id, deadline(1, 1))]);
    // The deadline fires in the new process: step b is retried, then completes.
    let retried = feed(
        &*store,
        &def,
        id,
        Input::Timer(timers[0].1),
        Some(timers[0].1),
        at + Duration::days(1),
    )
    .await?;
    assert!(
        retried
            .transition
            .events
            .iter()
            .any(|e| e.kind() == "timed_out")
    );
    let input = Input::Reply(reply(id, "b", 1, Outcome::succeeded(json!("b"))));
    feed(&*store, &def, id, input, None, at + Duration::days(1)).await?;
    let done = assert_replays(&*store, id).await?;
    assert_eq!(done.status, Status::Completed);
    Ok(())
}

/// The machine's decision on `input`, as the engine makes it inside the store's transaction.
fn decide(def: &Definition, input: Input, at: Time) -> Decide<'static> {
    let def = def.clone();
    Box::new(move |inst| Ok(machine::handle(inst, input.clone(), at, &def)?))
}

async fn a_batch_commits_every_good_input_and_answers_each_item_on_its_own(
    b: &Backend,
) -> Result<()> {
    let store = b.open().await?;
    let def = definition("d");
    let at = now();
    let (one, two) = (
        create(&*store, &def, at).await?,
        create(&*store, &def, at).await?,
    );
    let unknown = Uuid::now_v7();
    let later = at + Duration::milliseconds(40);
    let ok = |id, step| Input::Reply(reply(id, step, 1, Outcome::succeeded(json!(step))));
    let items: Vec<(Uuid, Decide<'static>)> = vec![
        (one, decide(&def, ok(one, "a"), later)),
        (two, decide(&def, ok(two, "a"), later)),
        (unknown, decide(&def, ok(unknown, "a"), later)),
        // A second input for `one` sees the state the first left: step b is running.
        (one, decide(&def, ok(one, "b"), later)),
        (
            two,
            Box::new(|_| Err(StoreError::MissingDefinition("not here".into()))),
        ),
    ];
    let results = store.update_batch(later, items).await?;
    assert_eq!(results.len(), 5);
    let first = results[0].as_ref().expect("one, step a");
    let second = results[1].as_ref().expect("two, step a");
    assert!(matches!(results[2], Err(StoreError::NotFound(id)) if id == unknown));
    let third = results[3].as_ref().expect("one, step b");
    assert!(matches!(results[4], Err(StoreError::MissingDefinition(_))));

    // Each item's outbox rows are its own, with the ids the relay would see.
    assert_eq!(first.outbox.len(), 1);
    assert_eq!(first.outbox[0].command.transaction_id, one);
    assert_eq!(first.outbox[0].command.step, "b");
    assert_eq!(second.outbox.len(), 1);
    assert_eq!(second.outbox[0].command.transaction_id, two);
    assert!(third.outbox.is_empty());
    let rows = store
        .claim_outbox(later + Duration::hours(1), 10, Duration::seconds(30))
        .await?;
    let mut expected = vec![first.outbox[0].clone(), second.outbox[0].clone()];
    expected.extend(rows.iter().filter(|r| r.command.step == "a").cloned());
    expected.sort_by_key(|m| m.id);
    assert_eq!(rows, expected);

    // `one` completed through both inputs; `two` runs step b with its deadline.
    let one_state = assert_replays(&*store, one).await?;
    assert_eq!(one_state.status, Status::Completed);
    assert_eq!(one_state, third.transition.instance);
    let two_state = assert_replays(&*store, two).await?;
    assert_eq!(two_state, second.transition.instance);
    assert_eq!(store.get(two).await?.unwrap().updated_at, later);
    assert_eq!(
        due_timers(&*store, later + Duration::days(1)).await?,
        vec![(two, deadline(1, 1))]
    );
    assert!(store.get(unknown).await?.is_none());
    Ok(())
}

async fn a_batch_of_starts_stores_each_new_instance_and_refuses_an_existing_one(
    b: &Backend,
) -> Result<()> {
    let store = b.open().await?;
    let def = definition("d");
    let at = now();
    let existing = start(&def, at);
    store.create(&existing, at).await?;
    let starts = vec![start(&def, at), existing.clone(), start(&def, at)];
    let results = store.create_batch(&keyless(&starts), at).await?;
    assert_eq!(results.len(), 3);
    assert!(matches!(results[1], Err(StoreError::Exists(id)) if id == existing.instance.id));
    for i in [0, 2] {
        let Ok(Created::New(outbox)) = &results[i] else {
            panic!("a new instance is stored: {:?}", results[i]);
        };
        let t = &starts[i];
        let sent: Vec<_> = t.sends().collect();
        assert_eq!(outbox.len(), 1);
        assert_eq!((&outbox[0].participant, &outbox[0].command), sent[0]);
        let stored = store.get(t.instance.id).await?.context("stored")?;
        assert_eq!(stored.instance, t.instance);
        assert_eq!((stored.created_at, stored.updated_at), (at, at));
        assert_replays(&*store, t.instance.id).await?;
    }
    // The existing instance is untouched: one start's log and outbox row, not two.
    assert_eq!(
        store.events(existing.instance.id).await?.len(),
        existing.events.len()
    );
    let rows = store
        .claim_outbox(at + Duration::hours(1), 10, Duration::seconds(30))
        .await?;
    assert_eq!(rows.len(), 3);
    Ok(())
}

/// Runs `rounds` batches at once, round `r` on `stores[r % len]`, each naming every one of `ids`
/// in an order of its own with a stray reply (each appends exactly one `reply_ignored` event),
/// and checks that every item committed.
async fn stray_batches(
    stores: &[Arc<dyn SagaStore>],
    ids: &[Uuid],
    def: &Definition,
    rounds: u32,
) -> Result<()> {
    let mut tasks = Vec::new();
    for round in 0..rounds {
        let (store, def) = (stores[round as usize % stores.len()].clone(), def.clone());
        let mut order = ids.to_vec();
        order.rotate_left(round as usize % ids.len());
        if round % 2 == 1 {
            order.reverse();
        }
        tasks.push(tokio::spawn(async move {
            let items: Vec<(Uuid, Decide<'static>)> = order
                .iter()
                .map(|&id| {
                    let stray = reply(id, "b", round + 1, Outcome::succeeded(json!(round)));
                    (id, decide(&def, Input::Reply(stray), now()))
                })
                .collect();
            store.update_batch(now(), items).await
        }));
    }
    for t in tasks {
        for result in t.await?? {
            result?;
        }
    }
    Ok(())
}

async fn a_batch_of_keyed_starts_stores_one_instance_per_key_and_names_it_to_the_others(
    b: &Backend,
) -> Result<()> {
    let store = b.open().await?;
    let def = definition("d");
    let at = now();
    let key = |key: &str, input: i64| Idempotency {
        key: key.into(),
        request: json!({ "input": input }),
    };
    let earlier = start(&def, at);
    let stored = key("stored-before", 1);
    store.create_idempotent(&earlier, at, &stored).await?;
    let starts: Vec<Transition> = (0..6).map(|_| start(&def, at)).collect();
    let (fresh, again, other) = (key("fresh", 1), key("fresh", 1), key("fresh", 2));
    let (same, different) = (key("stored-before", 1), key("stored-before", 2));
    let batch: Vec<NewInstance<'_>> = vec![
        (&starts[0], Some(&fresh)),
        (&starts[1], None),
        (&starts[2], Some(&again)),
        (&starts[3], Some(&other)),
        (&starts[4], Some(&same)),
        (&starts[5], Some(&different)),
    ];
    let results = store.create_batch(&batch, at).await?;
    let answers: Vec<String> = results
        .iter()
        .map(|r| match r {
            Ok(Created::New(rows)) => format!("new, {} command(s)", rows.len()),
            Ok(Created::Existing { id, same_request }) => {
                let whose = if *id == starts[0].instance.id {
                    "the batch's first"
                } else if *id == earlier.instance.id {
                    "the earlier one"
                } else {
                    "another"
                };
                format!("existing: {whose}, same request {same_request}")
            }
            Err(e) => format!("error: {e}"),
        })
        .collect();
    assert_eq!(
        answers,
        [
            "new, 1 command(s)",
            "new, 1 command(s)",
            "existing: the batch's first, same request true",
            "existing: the batch's first, same request false",
            "existing: the earlier one, same request true",
            "existing: the earlier one, same request false",
        ]
    );
    for (i, t) in starts.iter().enumerate() {
        let found = store.get(t.instance.id).await?;
        assert_eq!(found.is_some(), i < 2, "start {i} stored only if new");
    }
    // Only the new instances' commands wait in the outbox.
    let rows = store
        .claim_outbox(at + Duration::hours(1), 100, Duration::seconds(10))
        .await?;
    let mut owners: Vec<Uuid> = rows.iter().map(|m| m.command.transaction_id).collect();
    owners.sort();
    let mut expected = vec![
        earlier.instance.id,
        starts[0].instance.id,
        starts[1].instance.id,
    ];
    expected.sort();
    assert_eq!(owners, expected);
    Ok(())
}

async fn concurrent_batches_over_the_same_instances_lose_nothing_and_do_not_deadlock(
    b: &Backend,
) -> Result<()> {
    // Two stores on one database, as two processes would have.
    let stores = [b.open().await?, b.open().await?];
    let def = definition("d");
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(create(&*stores[0], &def, now()).await?);
    }
    let before = stores[0].events(ids[0]).await?.len();
    stray_batches(&stores, &ids, &def, 8).await?;
    for id in ids {
        assert_eq!(stores[0].events(id).await?.len(), before + 8);
        assert_replays(&*stores[0], id).await?;
    }
    Ok(())
}

/// Runs an instance of `def` to `completed` (both steps answered), finishing at `at`.
async fn complete(
    store: &dyn SagaStore,
    def: &Definition,
    started: Time,
    at: Time,
) -> Result<Uuid> {
    let id = create(store, def, started).await?;
    for step in ["a", "b"] {
        let input = Input::Reply(reply(id, step, 1, Outcome::succeeded(json!(step))));
        feed(store, def, id, input, None, at).await?;
    }
    assert_eq!(
        store.get(id).await?.context("instance")?.instance.status,
        Status::Completed
    );
    Ok(id)
}

async fn finished_instances_older_than_the_horizon_are_pruned_with_their_log_and_open_ones_stay(
    b: &Backend,
) -> Result<()> {
    let store = b.open().await?;
    let def = definition("d");
    let t0 = now();
    let old = complete(&*store, &def, t0, t0 + Duration::seconds(1)).await?;
    let recent = complete(&*store, &def, t0, t0 + Duration::seconds(10)).await?;
    // Open since long ago: never pruned, whatever its age; its timer and outbox row stay.
    let open = create(&*store, &def, t0).await?;
    let horizon = t0 + Duration::seconds(5);

    assert_eq!(store.prune(horizon, 100).await?, Pruned::Deleted(1));
    assert!(store.get(old).await?.is_none());
    assert!(store.events(old).await?.is_empty(), "the log goes with it");
    assert_replays(&*store, recent).await?;
    assert_replays(&*store, open).await?;
    let timers = due_timers(&*store, t0 + Duration::days(1)).await?;
    assert_eq!(timers, vec![(open, deadline(0, 1))]);
    assert_eq!(
        store.prune(horizon, 100).await?,
        Pruned::Deleted(0),
        "nothing more is due"
    );
    let listed: Vec<Uuid> = store
        .list(&list_all())
        .await?
        .iter()
        .map(|s| s.instance.id)
        .collect();
    assert!(!listed.contains(&old) && listed.contains(&recent) && listed.contains(&open));
    Ok(())
}

async fn a_prune_deletes_at_most_its_batch_oldest_finished_first(b: &Backend) -> Result<()> {
    let store = b.open().await?;
    let def = definition("d");
    let t0 = now();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(complete(&*store, &def, t0, t0 + Duration::seconds(i)).await?);
    }
    let horizon = t0 + Duration::minutes(1);
    assert_eq!(store.prune(horizon, 2).await?, Pruned::Deleted(2));
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(store.get(*id).await?.is_some(), i >= 2, "instance {i}");
    }
    assert_eq!(store.prune(horizon, 2).await?, Pruned::Deleted(2));
    assert_eq!(store.prune(horizon, 2).await?, Pruned::Deleted(1));
    assert!(store.list(&list_all()).await?.is_empty());
    Ok(())
}

/// Runs an instance of `def` started at `at` until step `b` fails: it is compensating `a`.
async fn fail_second_step(store: &dyn SagaStore, def: &Definition, at: Time) -> Result<Uuid> {
    let id = create(store, def, at).await?;
    let a = reply(id, "a", 1, Outcome::succeeded(json!("a")));
    feed(store, def, id, Input::Reply(a), None, at).await?;
    let b = reply(id, "b", 1, Outcome::failed("no"));
    feed(store, def, id, Input::Reply(b), None, at).await?;
    Ok(id)
}

async fn the_gauges_count_open_instances_by_status_the_outbox_and_the_timers_due(
    b: &Backend,
) -> Result<()> {
    let store = b.open().await?;
    let def = definition("d");
    let t0 = now();
    assert_eq!(
        store.gauges(t0).await?,
        Default::default(),
        "an empty store"
    );

    let running_start = start(&def, t0);
    let running = running_start.instance.id;
    let outbox = store.create(&running_start, t0).await?;
    let running_due = outbox[0]
        .command
        .deadline
        .context("command without deadline")?;
    let second = t0 + Duration::seconds(1);
    let compensating = fail_second_step(&*store, &def, second).await?;
    // Its compensation refused: stuck.
    let stuck = fail_second_step(&*store, &def, second).await?;
    let refused = Reply {
        operation: Operation::Compensate,
        ..reply(stuck, "a", 1, Outcome::failed("cannot undo"))
    };
    feed(&*store, &def, stuck, Input::Reply(refused), None, second).await?;
    complete(&*store, &def, second, second).await?;
    for (id, status) in [
        (running, Status::Running),
        (compensating, Status::Compensating),
        (stuck, Status::Stuck),
    ] {
        assert_eq!(
            store.get(id).await?.context("instance")?.instance.status,
            status
        );
    }

    // Nothing due yet.
    let gauges = store.gauges(second).await?;
    let mut open = gauges.open.clone();
    open.sort_by_key(|(s, _)| s.as_str());
    assert_eq!(
        open,
        vec![
            (Status::Compensating, 1),
            (Status::Running, 1),
            (Status::Stuck, 1)
        ],
        "finished instances are not open"
    );
    assert_eq!(gauges.oldest_open, Some(t0));
    assert_eq!(gauges.oldest_outbox, Some(t0));
    assert_eq!((gauges.timers_due, gauges.oldest_due_timer), (0, None));

    // Once the running instance's deadline has passed, its timer is due (and the earliest).
    let gauges = store.gauges(running_due).await?;
    assert!(gauges.timers_due >= 1, "{gauges:?}");
    assert_eq!(gauges.oldest_due_timer, Some(running_due));

    // Every timer due a day later; claiming takes them all, and leases them out of the count.
    let later = t0 + Duration::days(1);
    let due = store.gauges(later).await?.timers_due;
    assert_eq!(due, due_timers(&*store, later).await?.len() as u64);
    assert_eq!(store.gauges(later).await?.timers_due, 0);

    // The outbox counts every row written and not yet deleted, claimed or not.
    let rows = store.claim_outbox(later, 1_000, Duration::days(1)).await?;
    assert_eq!(store.gauges(later).await?.outbox_rows, rows.len() as u64);
    let ids: Vec<i64> = rows.iter().map(|m| m.id).collect();
    store.delete_outbox(&ids).await?;
    let gauges = store.gauges(later).await?;
    assert_eq!((gauges.outbox_rows, gauges.oldest_outbox), (0, None));
    Ok(())
}

async fn in_flight_reads_an_instances_outbox_rows_and_timers_and_stuck_steps_name_their_cause(
    b: &Backend,
) -> Result<()> {
    in_flight_and_stuck_steps(&*b.open().await?).await
}

/// Makes an instance whose compensation of step a is refused at `at`: stuck.
async fn refuse_compensation(store: &dyn SagaStore, def: &Definition, at: Time) -> Result<Uuid> {
    let id = fail_second_step(store, def, at).await?;
    let refused = Reply {
        operation: Operation::Compensate,
        ..reply(id, "a", 1, Outcome::failed("cannot undo"))
    };
    feed(store, def, id, Input::Reply(refused), None, at).await?;
    Ok(id)
}

async fn in_flight_and_stuck_steps(store: &dyn SagaStore) -> Result<()> {
    let def = definition("d");
    let t0 = now();
    assert_eq!(store.in_flight(Uuid::now_v7()).await?, Pending::default());
    assert!(store.stuck_steps().await?.is_empty());

    let running = start(&def, t0);
    let outbox = store.create(&running, t0).await?;
    let pending = store.in_flight(running.instance.id).await?;
    assert_eq!(pending.outbox_rows, 1);
    assert_eq!(pending.timers.len(), 1, "{pending:?}");
    assert_eq!(pending.timers[0].timer, deadline(0, 1));
    assert_eq!(Some(pending.timers[0].due_at), outbox[0].command.deadline);

    let (first, second) = (t0 + Duration::seconds(1), t0 + Duration::seconds(2));
    let later = refuse_compensation(store, &def, second).await?;
    let earlier = refuse_compensation(store, &def, first).await?;
    let pending = store.in_flight(earlier).await?;
    assert!(
        pending.timers.is_empty(),
        "a refused compensation awaits nothing"
    );
    assert_eq!(
        pending.outbox_rows, 3,
        "a, b and a's compensation, not published"
    );

    let stuck = store.stuck_steps().await?;
    let ids: Vec<Uuid> = stuck.iter().map(|s| s.id).collect();
    assert_eq!(
        ids,
        vec![earlier, later],
        "oldest change first, running ones left out"
    );
    let s = &stuck[0];
    assert_eq!((s.definition.as_str(), s.step.as_str()), ("d", "a"));
    assert_eq!((s.participant.as_str(), s.updated_at), ("p", first));
    let why = s.last_error.as_deref().context("a stuck step says why")?;
    assert!(why.contains("cannot undo"), "{why}");
    Ok(())
}

async fn ping_answers(b: &Backend) -> Result<()> {
    let store = b.open().await?;
    store.ping().await?;
    Ok(())
}

/// PostgreSQL keeps plans apart from the projection (`sagas_plans`, migration 0004): rows
/// name their plan, and rows written before keep it inside their state.
mod plans {
    use super::*;

    /// Runs each named test on its own database, with a store and a pool for looking at the
    /// rows.
    macro_rules! plans_suite {
        ($($name:ident),* $(,)?) => {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> Result<()> {
                    let env = helpers::TestEnv::new().await?;
                    let pool = PgPool::connect(&env.orch_url).await?;
                    tests::$name(&PgStore::new(pool.clone()), &pool).await?;
                    env.cleanup().await;
                    Ok(())
                }
            )*
        };
    }

    plans_suite!(
        instances_of_one_plan_share_one_plan_row_and_read_back_whole,
        an_instance_stored_with_its_plan_inside_advances_and_loses_the_copy,
        a_row_whose_plan_is_missing_is_reported_corrupt,
    );

    mod tests {
        use super::*;

        async fn row(pool: &PgPool, id: Uuid) -> Result<(Option<Uuid>, bool)> {
            Ok(
                sqlx::query_as("SELECT plan_id, state ? 'plan' FROM sagas_instances WHERE id = $1")
                    .bind(id)
                    .fetch_one(pool)
                    .await?,
            )
        }

        pub(super) async fn instances_of_one_plan_share_one_plan_row_and_read_back_whole(
            store: &PgStore,
            pool: &PgPool,
        ) -> Result<()> {
            let one = definition("one");
            let at = now();
            let starts: Vec<Transition> = (0..3).map(|_| start(&one, at)).collect();
            store.create_batch(&keyless(&starts), at).await?;
            create(store, &one, at).await?;
            let other = create(store, &definition("other"), at).await?;
            let plans: i64 = sqlx::query_scalar("SELECT count(*) FROM sagas_plans")
                .fetch_one(pool)
                .await?;
            assert_eq!(plans, 2);
            let (plan_id, inline) = row(pool, starts[0].instance.id).await?;
            assert!(plan_id.is_some());
            assert!(!inline, "the state does not repeat the plan");
            assert_eq!(row(pool, starts[2].instance.id).await?.0, plan_id);
            assert_ne!(row(pool, other).await?.0, plan_id);
            // The started events name the plan rather than carry it.
            let (named, carried): (i64, i64) = sqlx::query_as(
                "SELECT count(*) FILTER (WHERE plan_id IS NOT NULL), count(*) FILTER (WHERE body ? 'plan')
                 FROM sagas_events WHERE kind = 'started'",
            )
            .fetch_one(pool)
            .await?;
            assert_eq!((named, carried), (5, 0));
            assert_replays(store, starts[0].instance.id).await?;
            let stored = store.get(starts[1].instance.id).await?.context("missing")?;
            assert_eq!(stored.instance, starts[1].instance);
            let listed = store.list(&list_all()).await?;
            assert_eq!(listed.len(), 5);
            assert!(listed.iter().all(|s| !s.instance.plan.steps.is_empty()));
            Ok(())
        }

        pub(super) async fn an_instance_stored_with_its_plan_inside_advances_and_loses_the_copy(
            store: &PgStore,
            pool: &PgPool,
        ) -> Result<()> {
            let def = definition("old");
            let at = now();
            let t = start(&def, at);
            let id = t.instance.id;
            // A row as written before migration 0004: the whole instance as state, no plan_id.
            sqlx::query(
                "INSERT INTO sagas_instances
                   (id, definition, version, mode, status, seq, state, failure, created_at, updated_at)
                 VALUES ($1, 'old', 1, 'saga', $2, $3, $4, NULL, $5, $5)",
            )
            .bind(id)
            .bind(t.instance.status.as_str())
            .bind(t.instance.seq as i64)
            .bind(sqlx::types::Json(&t.instance))
            .bind(at)
            .execute(pool)
            .await?;
            for (n, event) in t.events.iter().enumerate() {
                sqlx::query(
                    "INSERT INTO sagas_events (instance_id, seq, kind, body, at) VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(id)
                .bind(n as i64 + 1)
                .bind(event.kind())
                .bind(sqlx::types::Json(event))
                .bind(at)
                .execute(pool)
                .await?;
            }
            assert_eq!(row(pool, id).await?, (None, true));
            assert_eq!(
                store.get(id).await?.context("missing")?.instance,
                t.instance
            );

            let input = Input::Reply(reply(id, "a", 1, Outcome::succeeded(json!("a"))));
            let updated = feed(store, &def, id, input, None, at).await?;
            let (plan_id, inline) = row(pool, id).await?;
            assert!(plan_id.is_some() && !inline, "rewritten in the new shape");
            let stored = assert_replays(store, id).await?;
            assert_eq!(stored, updated.transition.instance);
            assert_eq!(stored.plan, t.instance.plan);
            Ok(())
        }

        pub(super) async fn a_row_whose_plan_is_missing_is_reported_corrupt(
            store: &PgStore,
            pool: &PgPool,
        ) -> Result<()> {
            let def = definition("lost");
            let at = now();
            let id = create(store, &def, at).await?;
            let logged = store.events(id).await?.len() as i64;
            sqlx::query("DELETE FROM sagas_plans").execute(pool).await?;
            // A store that has not met the plan must read it, and cannot.
            let fresh = PgStore::new(pool.clone());
            let input = Input::Reply(reply(id, "a", 1, Outcome::succeeded(json!("a"))));
            let err = feed(&fresh, &def, id, input, None, at)
                .await
                .expect_err("the plan is gone");
            assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
            // (The log cannot be read whole through the store either: its started event names
            // the missing plan.)
            let count: i64 =
                sqlx::query_scalar("SELECT count(*) FROM sagas_events WHERE instance_id = $1")
                    .bind(id)
                    .fetch_one(pool)
                    .await?;
            assert_eq!(count, logged, "nothing written");
            assert!(store.events(id).await.is_err());
            Ok(())
        }
    }
}

/// PostgreSQL decides a batch of replies on the states it last committed and writes it with one
/// statement, guarded by each row's `seq`; a state moved on since is decided again on the
/// stored one.
mod state_cache {
    use super::*;

    /// Runs each named test on its own database, with a pool for more stores on it.
    macro_rules! cache_suite {
        ($($name:ident),* $(,)?) => {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> Result<()> {
                    let env = helpers::TestEnv::new().await?;
                    let pool = PgPool::connect(&env.orch_url).await?;
                    tests::$name(&pool).await?;
                    env.cleanup().await;
                    Ok(())
                }
            )*
        };
    }

    cache_suite!(
        replies_to_instances_this_store_wrote_are_decided_on_its_cached_states,
        a_state_another_store_moved_on_is_decided_again_on_the_stored_one,
        a_store_whose_guesses_keep_finding_states_moved_on_stops_guessing_for_a_while,
        a_decision_refused_on_a_cached_state_is_made_again_under_the_lock,
        concurrent_batches_on_cached_states_lock_in_one_order_and_lose_nothing,
    );

    mod tests {
        use super::*;

        fn ok(id: Uuid, step: &str) -> Input {
            Input::Reply(reply(id, step, 1, Outcome::succeeded(json!(step))))
        }

        fn stats(hits: u64, stale: u64, cached: usize) -> StateCacheStats {
            StateCacheStats {
                hits,
                stale,
                failed: 0,
                skipped: 0,
                cached,
            }
        }

        pub(super) async fn replies_to_instances_this_store_wrote_are_decided_on_its_cached_states(
            pool: &PgPool,
        ) -> Result<()> {
            let store = PgStore::new(pool.clone());
            let def = definition("d");
            let at = now();
            let starts: Vec<Transition> = (0..3).map(|_| start(&def, at)).collect();
            store.create_batch(&keyless(&starts), at).await?;
            let [one, two, three] = [0, 1, 2].map(|i| starts[i].instance.id);
            assert_eq!(store.state_cache(), stats(0, 0, 3));

            let later = at + Duration::milliseconds(40);
            let items: Vec<(Uuid, Decide<'static>)> = vec![
                (two, decide(&def, ok(two, "a"), later)),
                (one, decide(&def, ok(one, "a"), later)),
                (three, decide(&def, ok(three, "a"), later)),
                // A second input for `one` is decided on the state the first left.
                (one, decide(&def, ok(one, "b"), later)),
            ];
            let results = store.update_batch(later, items).await?;
            assert_eq!(results.len(), 4);
            // Four decisions on cached states; `one` is finished and no longer cached.
            assert_eq!(store.state_cache(), stats(4, 0, 2));
            let updated: Vec<_> = results
                .into_iter()
                .collect::<Result<_, _>>()
                .context("every item commits")?;
            for (u, id) in updated.iter().zip([two, one, three]) {
                assert_eq!(u.transition.instance.id, id);
                assert_eq!(u.outbox.len(), 1, "each sends step b");
                assert_eq!(u.outbox[0].command.transaction_id, id);
                assert_eq!(u.outbox[0].command.step, "b");
            }
            assert!(updated[3].outbox.is_empty());
            assert_eq!(updated[3].transition.instance.status, Status::Completed);

            // What was written is what the locking path writes: the log, the projection, the
            // outbox rows and the timers.
            assert_eq!(
                assert_replays(&store, one).await?,
                updated[3].transition.instance
            );
            assert_eq!(
                assert_replays(&store, two).await?,
                updated[0].transition.instance
            );
            assert_eq!(
                assert_replays(&store, three).await?,
                updated[2].transition.instance
            );
            assert_eq!(store.get(two).await?.context("stored")?.updated_at, later);
            let mut due = due_timers(&store, later + Duration::days(1)).await?;
            due.sort_by_key(|(id, _)| *id);
            let mut expected = vec![(two, deadline(1, 1)), (three, deadline(1, 1))];
            expected.sort_by_key(|(id, _)| *id);
            assert_eq!(due, expected);
            let rows = store
                .claim_outbox(later + Duration::hours(1), 10, Duration::seconds(30))
                .await?;
            let mut sent: Vec<_> = updated.iter().flat_map(|u| u.outbox.clone()).collect();
            sent.extend(rows.iter().filter(|r| r.command.step == "a").cloned());
            sent.sort_by_key(|m| m.id);
            assert_eq!(rows, sent);
            Ok(())
        }

        pub(super) async fn a_store_whose_guesses_keep_finding_states_moved_on_stops_guessing_for_a_while(
            pool: &PgPool,
        ) -> Result<()> {
            // As with two orchestrator processes taking turns: each instance is started by
            // `store`, its first reply is decided by `other`, and its second reaches `store`,
            // whose cached state is then stale.
            let (store, other) = (PgStore::new(pool.clone()), PgStore::new(pool.clone()));
            let def = definition("d");
            let at = now();
            let later = at + Duration::milliseconds(40);
            // 32 stale statements make a window found stale; the next ones skip guessing.
            let (judged, paused) = (32, 8);
            let mut ids = Vec::new();
            for _ in 0..judged + paused {
                let id = create(&store, &def, at).await?;
                feed(&other, &def, id, ok(id, "a"), None, at).await?;
                let results = store
                    .update_batch(later, vec![(id, decide(&def, ok(id, "b"), later))])
                    .await?;
                let done = results.into_iter().next().context("one answer")??;
                assert_eq!(done.transition.instance.status, Status::Completed);
                ids.push(id);
            }
            let cache = store.state_cache();
            assert_eq!(
                (cache.hits, cache.stale, cache.skipped),
                (0, judged, paused),
                "{cache:?}"
            );
            for id in ids {
                assert_eq!(assert_replays(&store, id).await?.status, Status::Completed);
            }
            Ok(())
        }

        pub(super) async fn a_state_another_store_moved_on_is_decided_again_on_the_stored_one(
            pool: &PgPool,
        ) -> Result<()> {
            let store = PgStore::new(pool.clone());
            let def = definition("d");
            let at = now();
            let (moved, kept) = (
                create(&store, &def, at).await?,
                create(&store, &def, at).await?,
            );
            // Another process takes `moved` on to step b; this store's cached state still
            // runs step a.
            let other = PgStore::new(pool.clone());
            feed(&other, &def, moved, ok(moved, "a"), None, at).await?;

            let later = at + Duration::milliseconds(40);
            let items: Vec<(Uuid, Decide<'static>)> = vec![
                // On the cached state this reply is a stray; on the stored one it finishes.
                (moved, decide(&def, ok(moved, "b"), later)),
                (kept, decide(&def, ok(kept, "a"), later)),
            ];
            let results = store.update_batch(later, items).await?;
            assert_eq!(store.state_cache(), stats(1, 1, 1));
            let finished = results[0].as_ref().expect("decided on the stored state");
            assert_eq!(finished.transition.instance.status, Status::Completed);
            let next = results[1].as_ref().expect("decided on the cached state");
            assert_eq!(next.outbox[0].command.step, "b");

            // Nothing of the stale decision was written: no stray reply in a gapless log.
            let done = assert_replays(&store, moved).await?;
            assert_eq!(done, finished.transition.instance);
            let kinds: Vec<_> = store
                .events(moved)
                .await?
                .iter()
                .map(|e| e.event.kind())
                .collect();
            assert!(!kinds.contains(&"reply_ignored"), "{kinds:?}");
            assert_eq!(
                assert_replays(&store, kept).await?,
                next.transition.instance
            );

            // The other store still holds `moved` at step b: a late duplicate of its reply is
            // decided there as the finishing one, and again on the stored, finished state.
            let late = decide(&def, ok(moved, "b"), later);
            let results = other.update_batch(later, vec![(moved, late)]).await?;
            let again = results.into_iter().next().context("one answer")??;
            assert_eq!(other.state_cache(), stats(0, 1, 0));
            let kinds: Vec<_> = again.transition.events.iter().map(|e| e.kind()).collect();
            assert_eq!(kinds, ["reply_ignored"]);
            assert!(again.outbox.is_empty());
            assert_eq!(
                assert_replays(&store, moved).await?.status,
                Status::Completed
            );
            Ok(())
        }

        pub(super) async fn concurrent_batches_on_cached_states_lock_in_one_order_and_lose_nothing(
            pool: &PgPool,
        ) -> Result<()> {
            let store = Arc::new(PgStore::new(pool.clone()));
            let def = definition("d");
            let at = now();
            let starts: Vec<Transition> = (0..12).map(|_| start(&def, at)).collect();
            store.create_batch(&keyless(&starts), at).await?;
            let ids: Vec<Uuid> = starts.iter().map(|t| t.instance.id).collect();
            let before = store.events(ids[0]).await?.len();
            let rounds = 24u32;
            let shared: Arc<dyn SagaStore> = store.clone();
            stray_batches(&[shared], &ids, &def, rounds).await?;
            let cache = store.state_cache();
            assert_eq!(
                cache.failed, 0,
                "no statement failed (a deadlock would): {cache:?}"
            );
            assert!(cache.hits > 0, "{cache:?}");
            for id in ids {
                assert_eq!(store.events(id).await?.len(), before + rounds as usize);
                assert_replays(&*store, id).await?;
            }
            Ok(())
        }

        pub(super) async fn a_decision_refused_on_a_cached_state_is_made_again_under_the_lock(
            pool: &PgPool,
        ) -> Result<()> {
            let store = PgStore::new(pool.clone());
            let def = definition("d");
            let at = now();
            let id = create(&store, &def, at).await?;
            let logged = store.events(id).await?.len();
            let items: Vec<(Uuid, Decide<'static>)> = vec![(
                id,
                Box::new(|_| Err(StoreError::MissingDefinition("not here".into()))),
            )];
            let results = store.update_batch(at, items).await?;
            assert!(matches!(results[0], Err(StoreError::MissingDefinition(_))));
            assert_eq!(store.state_cache(), stats(0, 0, 1));
            assert_eq!(store.events(id).await?.len(), logged);
            Ok(())
        }
    }
}

/// Retention on PostgreSQL beyond the common suite: one process prunes at a time, the horizon
/// it records, and the export of what it deletes.
mod retention {
    use super::*;
    use sagas::orchestrator::store::postgres::PRUNE_LOCK_KEY;

    async fn store() -> Result<(helpers::TestEnv, PgStore)> {
        let env = helpers::TestEnv::new().await?;
        let store = PgStore::new(PgPool::connect(&env.orch_url).await?);
        Ok((env, store))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_prune_while_another_process_prunes_deletes_nothing_and_says_so() -> Result<()> {
        let (env, store) = store().await?;
        let def = definition("d");
        let t0 = now();
        let id = complete(&store, &def, t0, t0).await?;
        // Another process in the middle of a prune holds the lock.
        let mut other = env.orch.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(PRUNE_LOCK_KEY)
            .execute(&mut *other)
            .await?;
        let horizon = t0 + Duration::minutes(1);
        assert_eq!(store.prune(horizon, 10).await?, Pruned::Busy);
        assert!(store.get(id).await?.is_some());
        other.rollback().await?;
        assert_eq!(store.prune(horizon, 10).await?, Pruned::Deleted(1));
        env.cleanup().await;
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_prune_records_its_horizon_and_keeps_the_newest() -> Result<()> {
        let (env, store) = store().await?;
        let def = definition("d");
        let t0 = now();
        let horizon = || async {
            let row: Option<(Time,)> = sqlx::query_as("SELECT pruned_before FROM sagas_retention")
                .fetch_optional(&env.orch)
                .await?;
            Ok::<_, anyhow::Error>(row.map(|(t,)| t))
        };
        assert_eq!(store.prune(t0, 10).await?, Pruned::Deleted(0));
        assert_eq!(horizon().await?, None, "nothing deleted, no horizon");
        complete(&store, &def, t0, t0).await?;
        complete(&store, &def, t0, t0 + Duration::hours(1)).await?;
        let late = t0 + Duration::hours(2);
        assert_eq!(store.prune(late, 10).await?, Pruned::Deleted(2));
        assert_eq!(horizon().await?, Some(late));
        complete(&store, &def, t0, t0).await?;
        assert_eq!(
            store.prune(t0 + Duration::hours(1), 10).await?,
            Pruned::Deleted(1)
        );
        assert_eq!(
            horizon().await?,
            Some(late),
            "an earlier horizon does not replace it"
        );
        env.cleanup().await;
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_exported_prune_hands_over_each_instance_with_its_log_before_deleting_it()
    -> Result<()> {
        let (env, store) = store().await?;
        let def = definition("d");
        let t0 = now();
        let first = complete(&store, &def, t0, t0).await?;
        let second = complete(&store, &def, t0, t0 + Duration::seconds(1)).await?;
        let logs = [store.events(first).await?, store.events(second).await?];
        let mut lines: Vec<String> = Vec::new();
        let mut export = |batch: &[String]| {
            lines.extend_from_slice(batch);
            Ok(())
        };
        let horizon = t0 + Duration::minutes(1);
        let pruned = store
            .prune_exporting(horizon, 10, Some(&mut export))
            .await?;
        assert_eq!(pruned, Pruned::Deleted(2));
        assert_eq!(lines.len(), 2);
        for ((line, id), log) in lines.iter().zip([first, second]).zip(&logs) {
            let doc: serde_json::Value = serde_json::from_str(line)?;
            assert_eq!(doc["id"], json!(id), "oldest finished first");
            assert_eq!(doc["status"], "completed");
            assert_eq!(doc["definition"], "d");
            let state: Instance = serde_json::from_value(doc["state"].clone())?;
            assert_eq!(state.id, id);
            let events = doc["events"].as_array().context("events")?;
            assert_eq!(events.len(), log.len());
            for (e, logged) in events.iter().zip(log) {
                assert_eq!(e["seq"], json!(logged.seq));
                let event: machine::Event = serde_json::from_value(e.clone())?;
                assert_eq!(event, logged.event);
            }
        }

        // An export that fails deletes nothing.
        let kept = complete(&store, &def, t0, t0).await?;
        let mut failing = |_: &[String]| Err(std::io::Error::other("disk full"));
        let err = store
            .prune_exporting(horizon, 10, Some(&mut failing))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Export(_)), "{err}");
        assert!(store.get(kept).await?.is_some());
        env.cleanup().await;
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_engine_prunes_what_finished_longer_ago_than_its_retention_and_keeps_the_rest()
    -> Result<()> {
        use sagas::orchestrator::clock::SystemClock;
        use sagas::orchestrator::transport::AmqpTransport;
        use sagas::orchestrator::{Engine, EngineConfig, Registry};
        use std::sync::atomic::Ordering;
        use tokio_util::sync::CancellationToken;

        let env = helpers::TestEnv::new().await?;
        let store = env.store();
        let def = definition("d");
        let t0 = now();
        let mut finished = Vec::new();
        for _ in 0..5 {
            finished.push(complete(&store, &def, t0, t0).await?);
        }
        let open = create(&store, &def, t0).await?;
        let engine = Engine::new(
            Arc::new(env.store()),
            Arc::new(AmqpTransport::new(env.amqp_config())),
            Registry::new().with(def)?,
            Arc::new(SystemClock),
            EngineConfig {
                retention: Some(std::time::Duration::from_millis(1)),
                // Two per batch: the backlog takes several batches.
                retention_batch: 2,
                retention_poll: std::time::Duration::from_millis(50),
                retention_pause: std::time::Duration::from_millis(10),
                ..helpers::engine_config()
            },
        );
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(engine.clone().run(shutdown.clone()));
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while engine.stats().pruned.load(Ordering::Relaxed) < 5 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "pruned only {} of 5 in 30 s",
                engine.stats().pruned.load(Ordering::Relaxed)
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        running.await??;
        for id in finished {
            assert!(store.get(id).await?.is_none());
        }
        assert!(
            store.get(open).await?.is_some(),
            "an open instance is never pruned"
        );
        assert_eq!(engine.stats().pruned.load(Ordering::Relaxed), 5);
        env.cleanup().await;
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sagactl_prune_counts_on_a_dry_run_and_exports_what_it_deletes() -> Result<()> {
        let (env, store) = store().await?;
        let def = definition("d");
        let t0 = now();
        let mut finished = Vec::new();
        for _ in 0..3 {
            finished.push(complete(&store, &def, t0, t0).await?);
        }
        let open = create(&store, &def, t0).await?;
        let dir = std::env::temp_dir().join(format!("sagas-prune-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let export = dir.join("pruned.jsonl");
        let export_arg = export.to_str().context("a UTF-8 path")?;

        let out = helpers::run_sagactl(&[
            "prune",
            "--database-url",
            &env.orch_url,
            "--older-than",
            "0s",
            "--dry-run",
        ])?;
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.starts_with("3 finished transaction(s)"), "{said}");
        assert!(
            store.get(finished[0]).await?.is_some(),
            "a dry run deletes nothing"
        );

        // Two per batch: the export is appended batch by batch.
        let out = helpers::run_sagactl(&[
            "prune",
            "--database-url",
            &env.orch_url,
            "--older-than",
            "0s",
            "--batch",
            "2",
            "--export",
            export_arg,
            "--no-progress",
        ])?;
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.starts_with("deleted 3 transaction(s)"), "{said}");
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&export)?
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        let exported: Vec<Uuid> = lines
            .iter()
            .map(|l| serde_json::from_value(l["id"].clone()))
            .collect::<Result<_, _>>()?;
        assert_eq!(exported.len(), 3);
        for id in &finished {
            assert!(exported.contains(id));
            assert!(store.get(*id).await?.is_none());
        }
        assert!(
            lines
                .iter()
                .all(|l| l["events"].as_array().is_some_and(|e| !e.is_empty()))
        );
        assert!(store.get(open).await?.is_some());

        // --dry-run and --export together are refused before anything is read.
        let out = helpers::run_sagactl(&[
            "prune",
            "--database-url",
            &env.orch_url,
            "--older-than",
            "0s",
            "--dry-run",
            "--export",
            export_arg,
        ])?;
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let _ = std::fs::remove_dir_all(&dir);
        env.cleanup().await;
        Ok(())
    }
}

async fn activity_counts_instances_by_minute_with_latency_percentiles_and_the_oldest_open_first(
    b: &Backend,
) -> Result<()> {
    let store = b.open().await?;
    let def = definition("d");
    // Ten whole minutes ago, so that every time below falls in a known minute.
    let t0 =
        Time::from_timestamp(now().timestamp().div_euclid(60) * 60 - 600, 0).context("a time")?;
    let minute = |m: i64| t0 + Duration::minutes(m);
    let empty = store.activity(t0).await?;
    assert_eq!(
        (empty.minutes.len(), empty.latency),
        (0, None),
        "an empty store"
    );

    // Before the window: neither counted nor open.
    complete(
        &*store,
        &def,
        t0 - Duration::hours(2),
        t0 - Duration::hours(2),
    )
    .await?;
    let running = create(&*store, &def, minute(0)).await?;
    complete(&*store, &def, minute(0), minute(0) + Duration::seconds(30)).await?;
    complete(&*store, &def, minute(1), minute(1) + Duration::seconds(90)).await?;
    let compensated = fail_second_step(&*store, &def, minute(3)).await?;
    let undone = Reply {
        operation: Operation::Compensate,
        ..reply(compensated, "a", 1, Outcome::succeeded(json!(null)))
    };
    feed(
        &*store,
        &def,
        compensated,
        Input::Reply(undone),
        None,
        minute(4),
    )
    .await?;
    let stuck = fail_second_step(&*store, &def, minute(5)).await?;
    let refused = Reply {
        operation: Operation::Compensate,
        ..reply(stuck, "a", 1, Outcome::failed("cannot undo"))
    };
    feed(&*store, &def, stuck, Input::Reply(refused), None, minute(5)).await?;
    assert_eq!(
        store
            .get(compensated)
            .await?
            .context("instance")?
            .instance
            .status,
        Status::Compensated
    );

    let activity = store.activity(t0).await?;
    let counts: Vec<(i64, [u64; 4])> = activity
        .minutes
        .iter()
        .map(|m| {
            let n = (m.at - t0).num_minutes();
            (n, [m.started, m.finished, m.compensated, m.stuck])
        })
        .collect();
    assert_eq!(
        counts,
        vec![
            (0, [2, 1, 0, 0]),
            (1, [1, 0, 0, 0]),
            (2, [0, 1, 0, 0]),
            (3, [1, 0, 0, 0]),
            (4, [0, 0, 1, 0]),
            (5, [1, 0, 0, 1]),
        ]
    );
    let latency = activity.latency.context("instances finished")?;
    // 30 s, 60 s and 90 s: the median is the second, p90 and p99 the third.
    assert_eq!(
        (latency.count, latency.p50, latency.p90, latency.p99),
        (
            3,
            Duration::seconds(60),
            Duration::seconds(90),
            Duration::seconds(90)
        )
    );
    let open: Vec<Uuid> = activity.oldest_open.iter().map(|s| s.instance.id).collect();
    assert_eq!(open, vec![running, stuck]);
    Ok(())
}

async fn listing_by_idempotency_key_finds_the_instance_started_with_it(b: &Backend) -> Result<()> {
    use sagas::orchestrator::store::Idempotency;
    let store = b.open().await?;
    let def = definition("d");
    let at = now();
    let keyed = start(&def, at);
    let key = Idempotency {
        key: "order-7".into(),
        request: json!({"input": 1}),
    };
    store.create_idempotent(&keyed, at, &key).await?;
    create(&*store, &def, at).await?;
    let by_key = |k: &str| ListFilter {
        idempotency_key: Some(k.into()),
        ..list_all()
    };
    let found = store.list(&by_key("order-7")).await?;
    assert_eq!(
        found.iter().map(|s| s.instance.id).collect::<Vec<_>>(),
        vec![keyed.instance.id]
    );
    assert!(store.list(&by_key("order-8")).await?.is_empty());
    Ok(())
}

/// What PostgreSQL counted on `sagas_instances` in the database at `url`.
struct TableStats {
    updated: i64,
    hot: i64,
    seq_scans: i64,
}

/// [`TableStats`] once at least `updates` updates are counted (waiting up to 30 s): a backend
/// reports its counts as it ends, so end the connections that did the work first.
async fn instance_table_stats(url: &str, updates: i64) -> Result<TableStats> {
    let reader = PgPool::connect(url).await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let stats = loop {
        let (updated, hot, seq_scans): (i64, i64, i64) = sqlx::query_as(
            "SELECT n_tup_upd, n_tup_hot_upd, seq_scan FROM pg_stat_user_tables
             WHERE relname = 'sagas_instances'",
        )
        .fetch_one(&reader)
        .await?;
        if updated >= updates {
            break TableStats {
                updated,
                hot,
                seq_scans,
            };
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "PostgreSQL reported {updated} of the {updates} updates within 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    reader.close().await;
    Ok(stats)
}

/// The projection's row on PostgreSQL beyond the common suite.
mod projection {
    use super::*;

    /// A running instance's transitions change no indexed column of its row, so PostgreSQL
    /// writes each new version on the same page without an entry in any index (a HOT update).
    /// An index on a column that every transition changes (as `updated_at` was indexed for the
    /// retention loop) makes every update insert into every index of the table.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_transitions_of_a_running_instance_update_its_row_in_place() -> Result<()> {
        let env = helpers::TestEnv::new().await?;
        let pool = PgPool::connect(&env.orch_url).await?;
        let store = PgStore::new(pool.clone());
        let def = Definition::saga::<serde_json::Value>("hot", 1)
            .step("a", "p", |s| s.command(|_, _| json!({"op": "a"})))
            .step("b", "p", |s| s.command(|_, _| json!({"op": "b"})))
            .step("c", "p", |s| s.command(|_, _| json!({"op": "c"})))
            .build()?;
        let t0 = now();
        let id = create(&store, &def, t0).await?;
        for (i, step) in ["a", "b"].into_iter().enumerate() {
            let at = t0 + Duration::seconds(i as i64 + 1);
            let input = Input::Reply(reply(id, step, 1, Outcome::succeeded(json!(step))));
            feed(&store, &def, id, input, None, at).await?;
        }
        let stored = store.get(id).await?.context("instance")?;
        assert_eq!(stored.instance.status, Status::Running);
        assert_eq!(stored.updated_at, t0 + Duration::seconds(2));

        // The store's connections end (its held ones with it), and with them PostgreSQL
        // reports their statistics.
        drop(store);
        pool.close().await;
        let stats = instance_table_stats(&env.orch_url, 2).await?;
        assert_eq!(
            (stats.updated, stats.hot),
            (2, 2),
            "(updates, of which HOT)"
        );
        env.cleanup().await;
        Ok(())
    }
}

/// The write path's connections, held out of the pool (`store::postgres::HELD`).
mod held_connections {
    use super::*;
    use sagas::orchestrator::store::postgres::HELD;
    use sagas::participant::config::{IDLE_CHECK_AFTER, database_options, pool_options};
    use std::time::Duration as StdDuration;

    /// Terminates every backend of the database at `url` but this one, and waits (up to 10 s)
    /// until they are gone.
    async fn terminate_all(url: &str) -> Result<()> {
        let mut admin = sagas_test_support::admin().await?;
        let db = url.rsplit('/').next().unwrap_or_default();
        let db = db.split('?').next().unwrap_or_default().to_owned();
        let live =
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()";
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
            .bind(&db)
            .execute(&mut admin)
            .await?;
        for _ in 0..500 {
            let (n,): (i64,) = sqlx::query_as(live).bind(&db).fetch_one(&mut admin).await?;
            if n == 0 {
                return Ok(());
            }
            tokio::time::sleep(StdDuration::from_millis(20)).await;
        }
        anyhow::bail!("backends of {db} still there after 10 s")
    }

    /// A migrated store on a new database, on a pool of `max` connections with the options
    /// `sagad` uses, and a saga `name` whose `steps` all go to participant `p`.
    async fn store_on_pool(
        max: u32,
        name: &str,
        steps: &[&'static str],
    ) -> Result<(helpers::TestEnv, PgPool, PgStore, Definition)> {
        let env = helpers::TestEnv::new().await?;
        let pool = pool_options(max)
            .connect_with(database_options(&env.orch_url)?)
            .await?;
        let store = PgStore::new(pool.clone());
        store.migrate().await?;
        let mut def = Definition::saga::<serde_json::Value>(name, 1);
        for &step in steps {
            def = def.step(step, "p", move |s| {
                s.command(move |_, _| json!({"op": step}))
            });
        }
        Ok((env, pool, store, def.build()?))
    }

    /// Starts and replies are written on connections kept out of the pool: closing the pool
    /// does not wait for them, and one that died while idle is checked and replaced before the
    /// next write, as the pool's own are.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_write_path_holds_its_connections_and_replaces_one_that_died_while_idle()
    -> Result<()> {
        let (env, pool, store, def) = store_on_pool(4, "held", &["a", "b"]).await?;
        let t0 = now();
        let id = create(&store, &def, t0).await?;
        let first = Input::Reply(reply(id, "a", 1, Outcome::succeeded(json!("a"))));
        feed(&store, &def, id, first, None, t0 + Duration::seconds(1)).await?;

        // Every connection dies while idle; once they have been idle long enough to be
        // checked, the next write goes through on a fresh one.
        terminate_all(&env.orch_url).await?;
        let died = tokio::time::Instant::now();
        tokio::time::sleep_until(died + IDLE_CHECK_AFTER).await;
        let second = Input::Reply(reply(id, "b", 1, Outcome::succeeded(json!("b"))));
        feed(&store, &def, id, second, None, t0 + Duration::seconds(2)).await?;
        let stored = store.get(id).await?.context("instance")?;
        assert_eq!(stored.instance.status, Status::Completed);

        // The store still holds its connections; the pool closes without them.
        tokio::time::timeout(StdDuration::from_secs(10), pool.close())
            .await
            .context("closing the pool waited for the held connections")?;
        drop(store);
        env.cleanup().await;
        Ok(())
    }

    /// A write cancelled while it waits for a connection to hold (the pool exhausted) gives up
    /// its place: once the pool has a connection again, the next write takes it out of the
    /// pool and holds it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_cancelled_while_waiting_for_a_connection_leaves_its_place_to_the_next()
    -> Result<()> {
        let (env, pool, store, def) = store_on_pool(1, "cancelled", &["a"]).await?;
        let t0 = now();
        let only = pool.acquire().await?;
        for _ in 0..HELD {
            let waiting =
                tokio::time::timeout(StdDuration::from_millis(100), create(&store, &def, t0));
            assert!(
                waiting.await.is_err(),
                "a write went through without a connection"
            );
        }
        drop(only);
        create(&store, &def, t0).await?;
        assert_eq!(
            pool.size(),
            0,
            "the write held the pool's one connection (taken out of the pool)"
        );
        drop(store);
        env.cleanup().await;
        Ok(())
    }

    /// PostgreSQL keeps one generic plan per prepared statement and connection, costed with
    /// the tables' sizes of when it was made. A new database's first transitions make the
    /// write path's plans while `sagas_instances` is small: they must still reach the
    /// instances by key, not read the whole table on every transition as it grows.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transitions_find_their_instances_by_key_with_plans_made_while_the_table_was_small()
    -> Result<()> {
        let (env, pool, store, def) = store_on_pool(4, "plans", &["a", "b"]).await?;
        let t0 = now();
        let at = t0 + Duration::seconds(1);
        let advance = |id| {
            let input = Input::Reply(reply(id, "a", 1, Outcome::succeeded(json!("a"))));
            store.update_batch(at, vec![(id, decide(&def, input, at))])
        };
        // One saga at a time on the new tables, as a first deployment's first minutes: past
        // its fifth run, a statement may keep a generic plan.
        const ONE_BY_ONE: usize = 12;
        for _ in 0..ONE_BY_ONE {
            let id = create(&store, &def, t0).await?;
            advance(id).await?.pop().context("one answer")??;
        }
        // The table grows; the same plans serve.
        let mut later = Vec::new();
        for _ in 0..300 {
            later.push(create(&store, &def, t0).await?);
        }
        for &id in &later[..ONE_BY_ONE] {
            advance(id).await?.pop().context("one answer")??;
        }

        drop(store);
        pool.close().await;
        let stats = instance_table_stats(&env.orch_url, 2 * ONE_BY_ONE as i64).await?;
        assert_eq!(stats.updated, 2 * ONE_BY_ONE as i64);
        assert_eq!(
            stats.seq_scans,
            0,
            "sequential scans of sagas_instances by {} transitions",
            2 * ONE_BY_ONE
        );
        env.cleanup().await;
        Ok(())
    }
}

/// PostgreSQL's writes carry the deletes of published outbox rows (`OutboxDeletes`): whichever
/// way an instance is written, the statement also deletes the rows left for it, of any
/// instance, so that those deletes cost no transaction of their own.
mod outbox_deletes {
    use super::*;
    use sagas::orchestrator::store::CARRIED_PER_WRITE;

    /// The ids of the outbox rows, in order.
    async fn outbox_ids(pool: &PgPool) -> Result<Vec<i64>> {
        Ok(
            sqlx::query_scalar("SELECT id FROM sagas_outbox ORDER BY id")
                .fetch_all(pool)
                .await?,
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn published_outbox_rows_go_with_the_next_creation_or_update_of_any_instance()
    -> Result<()> {
        let env = helpers::TestEnv::new().await?;
        let pool = PgPool::connect(&env.orch_url).await?;
        let store = PgStore::new(pool.clone());
        let deletes = store
            .outbox_deletes()
            .context("PostgreSQL's writes carry outbox deletes")?;
        let def = definition("d");
        let at = now();
        let (one, two) = (start(&def, at), start(&def, at));
        let one_row = store.create(&one, at).await?[0].id;
        let two_row = store.create(&two, at).await?[0].id;

        // A creation carries the rows left for it.
        deletes.add(&[one_row]);
        let three = start(&def, at);
        let three_row = store.create(&three, at).await?[0].id;
        assert!(deletes.is_empty());
        assert_eq!(outbox_ids(&pool).await?, [two_row, three_row]);

        // So does an update under the rows' locks (`update` takes that path)...
        deletes.add(&[two_row]);
        let later = at + Duration::milliseconds(10);
        let ok = |id, step| Input::Reply(reply(id, step, 1, Outcome::succeeded(json!(step))));
        let updated = feed(
            &store,
            &def,
            one.instance.id,
            ok(one.instance.id, "a"),
            None,
            later,
        )
        .await?;
        let b_row = updated.outbox[0].id;
        assert!(deletes.is_empty());
        assert_eq!(outbox_ids(&pool).await?, [three_row, b_row]);

        // ...and a batch decided on the states this store cached.
        deletes.add(&[three_row]);
        let hits = store.state_cache().hits;
        let item = (
            two.instance.id,
            decide(&def, ok(two.instance.id, "a"), later),
        );
        let results = store.update_batch(later, vec![item]).await?;
        assert_eq!(
            store.state_cache().hits,
            hits + 1,
            "decided on the cached state"
        );
        let two_b_row = results[0].as_ref().expect("two, step a").outbox[0].id;
        assert!(deletes.is_empty());
        assert_eq!(outbox_ids(&pool).await?, [b_row, two_b_row]);

        // A write takes its share at most, the oldest first; the rest waits for the next.
        let gone: Vec<i64> = (1..=CARRIED_PER_WRITE as i64).map(|i| -i).collect();
        deletes.add(&gone);
        deletes.add(&[b_row]);
        store.create(&start(&def, at), at).await?;
        assert_eq!(deletes.take_all(), [b_row]);
        assert!(outbox_ids(&pool).await?.contains(&b_row));

        // The write path's statements are the ones the log and the projection replay from.
        assert_replays(&store, one.instance.id).await?;
        assert_replays(&store, two.instance.id).await?;
        env.cleanup().await;
        Ok(())
    }
}
