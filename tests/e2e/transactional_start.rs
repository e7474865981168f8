//! Transactional starts (docs/protocol.md, "Transactional starts"): a service writes its
//! order row and the start request in one transaction with `start_in`, and a start relay
//! delivers committed requests to the orchestrator over `{p}.starts`. Rolled back: no saga
//! ever; committed: exactly one, also when a relay dies between publishing and deleting and
//! when the broker's connections are cut; refused: the row is marked failed with the reason
//! and the command is dead-lettered with it.

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use anyhow::Result;
use sagas::orchestrator::machine::Status;
use sagas::orchestrator::store::{ListFilter, SagaStore};
use sagas::orchestrator::transport::AmqpConfig;
use sagas::orchestrator::{Definition, Registry};
use sagas::participant::start::{OutboxRow, StartRelay, outbox_rows};
use sagas::participant::{Handler, Outcome, Participant, start_in};
use sagas_test_support::delete_amqp;
use sagas_test_support::proxy::Proxy;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::examples::shop;
use crate::helpers::{
    App, TestEnv, amqp_url, close_broker, connect_broker, queue_options, scripted_participant,
    spawn_app, spawn_app_with,
};

/// The service that starts the sagas (it names its relay's answers queue).
const SERVICE: &str = "shop";
const DEFINITION: &str = "order_start";

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    order: String,
    amount: u64,
}

/// `order_start`: one step at `accounts`, whose scripted participant says yes.
fn registry() -> Result<Registry> {
    let def = Definition::saga::<Order>(DEFINITION, 1)
        .step("charge", "accounts", |s| {
            s.command(|o: &Order, _| json!({ "order": o.order, "amount": o.amount }))
        })
        .build()?;
    Ok(Registry::new().with(def)?)
}

/// The service's own table, in the same database as its start outbox.
async fn create_orders(env: &TestEnv) -> Result<()> {
    sqlx::query("CREATE TABLE orders (id text PRIMARY KEY, amount bigint NOT NULL)")
        .execute(&env.bank)
        .await?;
    sagas::participant::start::install(&env.bank).await?;
    Ok(())
}

/// A test's databases and names, with the shop's table and start outbox.
async fn shop_env() -> Result<TestEnv> {
    let env = TestEnv::new().await?;
    create_orders(&env).await?;
    Ok(env)
}

/// The `accounts` participant, which charges every order; it stops with its connection.
async fn accounts(env: &TestEnv) -> Result<lapin::Connection> {
    let (connection, _task) = scripted_participant(env, "accounts", |_| {
        Some(Outcome::succeeded(json!({ "charged": true })))
    })
    .await?;
    Ok(connection)
}

/// Writes order `id` and asks for its saga in one transaction, committed or rolled back.
async fn order(env: &TestEnv, id: &str, commit: bool) -> Result<uuid::Uuid> {
    let mut tx = env.bank.begin().await?;
    sqlx::query("INSERT INTO orders (id, amount) VALUES ($1, 5)")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    let input = Order {
        order: id.to_owned(),
        amount: 5,
    };
    let request = start_in(&mut tx, DEFINITION, &input, Some(id)).await?;
    if commit {
        tx.commit().await?;
    } else {
        tx.rollback().await?;
    }
    Ok(request)
}

/// A relay running in this process until stopped (or aborted, like a killed process).
struct Relay {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Relay {
    fn spawn(env: &TestEnv, url: String, answer_timeout: Duration) -> Relay {
        let relay = StartRelay::new(SERVICE, env.topology.clone(), env.bank.clone())
            .queue_options(queue_options())
            .poll(Duration::from_millis(50))
            .answer_timeout(answer_timeout)
            .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200));
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            relay
                .run_forever(&url, s.cancelled())
                .await
                .expect("the relay runs");
        });
        Relay { stop, task }
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Waits (bounded: 60 s) until `check` answers `Some`, and returns it.
async fn until<T, F: Future<Output = Result<Option<T>>>>(
    what: &str,
    check: impl Fn() -> F,
) -> Result<T> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(found) = check().await? {
            return Ok(found);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "not within 60 s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the outbox holds no pending row, and returns its rows (the failed ones).
async fn settled(env: &TestEnv) -> Result<Vec<OutboxRow>> {
    until("every start request settled", || async {
        let rows = outbox_rows(&env.bank).await?;
        Ok(rows.iter().all(|r| r.state == "failed").then_some(rows))
    })
    .await
}

/// The instances of `order_start` started with `key` (every one without).
async fn started_with(env: &TestEnv, key: Option<&str>) -> Result<Vec<uuid::Uuid>> {
    instances(env, DEFINITION, key).await
}

/// The instances of `definition` started with `key` (every one without).
async fn instances(env: &TestEnv, definition: &str, key: Option<&str>) -> Result<Vec<uuid::Uuid>> {
    let filter = ListFilter {
        status: None,
        definition: Some(definition.to_owned()),
        after: None,
        created_after: None,
        created_before: None,
        idempotency_key: key.map(str::to_owned),
        limit: 500,
    };
    Ok(env
        .store()
        .list(&filter)
        .await?
        .into_iter()
        .map(|s| s.instance.id)
        .collect())
}

/// The one instance of `definition` started with `key`, once it completed.
async fn one_completed(env: &TestEnv, definition: &str, key: &str) -> Result<uuid::Uuid> {
    let started = instances(env, definition, Some(key)).await?;
    anyhow::ensure!(started.len() == 1, "{key}: {started:?}");
    let status = env.wait_terminal(started[0]).await?.status;
    anyhow::ensure!(status == Status::Completed, "{key}: {status:?}");
    Ok(started[0])
}

/// Ready messages in `queue` now.
async fn ready(queue: &str) -> Result<u32> {
    let conn = connect_broker().await?;
    let found = sagas::participant::amqp::look_at_queue(&conn, queue).await;
    close_broker(&conn).await;
    Ok(found.map(|q| q.message_count()).unwrap_or(0))
}

/// Places order `id` with no orchestrator running: a relay publishes its start command and is
/// killed (its task aborted, as a SIGKILL ends a process) before any answer can come.
async fn published_by_a_relay_that_dies(env: &TestEnv, id: &str) -> Result<uuid::Uuid> {
    let starts = env.topology.starts_queue();
    let relay = Relay::spawn(env, amqp_url(), Duration::from_secs(600));
    let request = order(env, id, true).await?;
    until("the start command published", || async {
        Ok((ready(&starts).await? == 1).then_some(()))
    })
    .await?;
    relay.task.abort();
    let _ = relay.task.await;
    Ok(request)
}

async fn cleanup(env: TestEnv, apps: Vec<App>) {
    for app in apps {
        app.stop().await;
    }
    let answers = env.topology.start_answers_queue(SERVICE);
    delete_amqp(&env.topology, &[], &[answers]).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_rolled_back_with_its_order_never_runs_and_a_committed_one_runs_exactly_once()
-> Result<()> {
    let env = shop_env().await?;
    let participant = accounts(&env).await?;
    let app = spawn_app(&env, registry()?).await?;
    let relay = Relay::spawn(&env, amqp_url(), Duration::from_secs(10));

    order(&env, "o-rolled-back", false).await?;
    order(&env, "o-committed", true).await?;
    let id = until("the committed order's saga", || async {
        Ok(started_with(&env, Some("o-committed"))
            .await?
            .first()
            .copied())
    })
    .await?;
    assert_eq!(env.wait_terminal(id).await?.status, Status::Completed);
    assert_eq!(
        settled(&env).await?,
        Vec::<OutboxRow>::new(),
        "the accepted row is deleted"
    );
    // The rolled-back request was written before the committed one, and the committed one
    // has been delivered, answered and deleted: had the first been visible, it would have
    // gone first.
    assert_eq!(
        started_with(&env, Some("o-rolled-back")).await?,
        Vec::<uuid::Uuid>::new()
    );
    assert_eq!(started_with(&env, None).await?, vec![id]);

    relay.stop().await;
    close_broker(&participant).await;
    cleanup(env, vec![app]).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_between_publishing_and_deleting_leaves_exactly_one_saga_and_no_row()
-> Result<()> {
    let env = shop_env().await?;
    let starts = env.topology.starts_queue();
    let participant = accounts(&env).await?;

    // No orchestrator yet: the first relay publishes, and is killed before any answer.
    let request = published_by_a_relay_that_dies(&env, "o-1").await?;
    let rows = outbox_rows(&env.bank).await?;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0].id, rows[0].attempts), (request, 1));

    // The next relay hears no answer either, and publishes the request again.
    let second = Relay::spawn(&env, amqp_url(), Duration::from_millis(300));
    until("the start command published again", || async {
        Ok((ready(&starts).await? >= 2).then_some(()))
    })
    .await?;

    // The orchestrator takes both deliveries: one saga, and the row is deleted.
    let app = spawn_app(&env, registry()?).await?;
    assert_eq!(settled(&env).await?, Vec::<OutboxRow>::new());
    let started = vec![one_completed(&env, DEFINITION, "o-1").await?];
    until("every start command consumed", || async {
        Ok((ready(&starts).await? == 0).then_some(()))
    })
    .await?;
    assert_eq!(started_with(&env, None).await?, started);

    second.stop().await;
    close_broker(&participant).await;
    cleanup(env, vec![app]).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_comes_while_no_relay_runs_settles_the_row_when_the_next_relay_starts()
-> Result<()> {
    let env = shop_env().await?;
    let starts = env.topology.starts_queue();
    let answers = env.topology.start_answers_queue(SERVICE);
    let participant = accounts(&env).await?;

    // The relay publishes and dies before the orchestrator, started afterwards, answers.
    published_by_a_relay_that_dies(&env, "o-1").await?;
    let app = spawn_app(&env, registry()?).await?;
    until("the answer kept in the relay's queue", || async {
        Ok((ready(&answers).await? == 1).then_some(()))
    })
    .await?;
    let started = started_with(&env, Some("o-1")).await?;
    assert_eq!(started.len(), 1, "{started:?}");
    assert_eq!(outbox_rows(&env.bank).await?.len(), 1, "not settled yet");

    // The next relay takes the answer and deletes the row without publishing it again.
    let second = Relay::spawn(&env, amqp_url(), Duration::from_secs(600));
    assert_eq!(settled(&env).await?, Vec::<OutboxRow>::new());
    assert_eq!(ready(&starts).await?, 0, "published once");
    assert_eq!(started_with(&env, None).await?, started);
    assert_eq!(
        env.wait_terminal(started[0]).await?.status,
        Status::Completed
    );

    second.stop().await;
    close_broker(&participant).await;
    cleanup(env, vec![app]).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_committed_while_the_brokers_connections_are_cut_each_run_exactly_once() -> Result<()>
{
    let env = shop_env().await?;
    let participant = accounts(&env).await?;
    // The orchestrator and the relay reach the broker through a proxy that cuts every
    // connection on command, as a broker restart does; the participant does not.
    let proxy = Proxy::in_front_of(&amqp_url(), 5672).await?;
    let through = proxy.url(&amqp_url())?;
    let amqp = AmqpConfig {
        uri: through.clone(),
        ..env.amqp_config()
    };
    let app = spawn_app_with(&env, registry()?, amqp).await?;
    let relay = Relay::spawn(&env, through, Duration::from_secs(2));

    let orders: Vec<String> = (0..24).map(|i| format!("o-{i}")).collect();
    // Cuts start once everything is up (the orchestrator refuses to start without a broker).
    order(&env, &orders[0], true).await?;
    settled(&env).await?;
    for (i, id) in orders.iter().enumerate().skip(1) {
        order(&env, id, true).await?;
        if i % 6 == 5 {
            proxy.cut();
        }
    }
    assert_eq!(settled(&env).await?, Vec::<OutboxRow>::new());
    let mut seen = HashSet::new();
    for id in &orders {
        seen.insert(one_completed(&env, DEFINITION, id).await?);
    }
    assert_eq!(started_with(&env, None).await?.len(), orders.len());
    assert!(proxy.accepted() > 2, "the connections were made again");

    relay.stop().await;
    close_broker(&participant).await;
    cleanup(env, vec![app]).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_definition_or_an_input_that_does_not_fit_marks_the_row_failed_and_dead_letters_the_command()
-> Result<()> {
    let env = shop_env().await?;
    let app = spawn_app(&env, registry()?).await?;
    let relay = Relay::spawn(&env, amqp_url(), Duration::from_secs(10));

    let mut tx = env.bank.begin().await?;
    let unknown = start_in(&mut tx, "no_such_saga", &json!({}), None).await?;
    let bad = start_in(&mut tx, DEFINITION, &json!({ "order": 5 }), Some("o-bad")).await?;
    tx.commit().await?;

    let rows = until("both rows marked failed", || async {
        let rows = outbox_rows(&env.bank).await?;
        Ok((rows.len() == 2 && rows.iter().all(|r| r.state == "failed")).then_some(rows))
    })
    .await?;
    let reason = |id| {
        rows.iter()
            .find(|r| r.id == id)
            .and_then(|r| r.last_error.clone())
            .unwrap_or_default()
    };
    assert!(
        reason(unknown).contains("no definition named no_such_saga is registered"),
        "{rows:?}"
    );
    assert!(
        reason(bad).contains("input does not match definition order_start"),
        "{rows:?}"
    );
    assert!(
        rows.iter()
            .all(|r| r.failed_at.is_some() && r.attempts == 1)
    );

    let letters = until("both commands dead-lettered", || async {
        let letters = app.engine.transport().list_dead_letters(10).await?;
        Ok((letters.len() == 2).then_some(letters))
    })
    .await?;
    for letter in &letters {
        assert_eq!(
            letter.queue.as_deref(),
            Some(env.topology.starts_queue().as_str())
        );
        let body: serde_json::Value = serde_json::from_slice(&letter.body)?;
        let id: uuid::Uuid = body["request_id"].as_str().unwrap_or_default().parse()?;
        assert_eq!(
            letter.reason.as_deref(),
            Some(reason(id).as_str()),
            "{letter:?}"
        );
    }
    assert_eq!(started_with(&env, None).await?, Vec::<uuid::Uuid>::new());

    relay.stop().await;
    cleanup(env, vec![app]).await;
    Ok(())
}

/// The order example in this process: its orchestrator, and its inventory and payment
/// participants, over a shop with `units` widgets and the start outbox; the orders
/// participant comes with [`Shop::relaying_orders`] or as a child process.
struct Shop {
    env: TestEnv,
    app: App,
    /// The participants running here, each until its token is cancelled.
    served: Vec<(CancellationToken, JoinHandle<()>)>,
}

impl Shop {
    async fn open(units: i32) -> Result<Shop> {
        let env = TestEnv::new().await?;
        shop::seed(&env.bank, "widget", units).await?;
        sagas::participant::start::install(&env.bank).await?;
        let app = spawn_app(&env, shop::registry()?).await?;
        let mut shop = Shop {
            env,
            app,
            served: Vec::new(),
        };
        shop.serve(shop::INVENTORY, Arc::new(shop::inventory()), None);
        shop.serve(shop::PAYMENT, Arc::new(shop::payment()), None);
        Ok(shop)
    }

    /// Runs participant `name` here as a deployed one runs, reconnecting after a broker
    /// outage (within half a second), with `relay` beside it if given.
    fn serve(&mut self, name: &str, handler: Arc<dyn Handler>, relay: Option<StartRelay>) {
        let env = &self.env;
        let participant = Participant::new(name, env.topology.clone(), env.bank.clone(), handler)
            .queue_options(queue_options())
            .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500));
        let participant = match relay {
            Some(relay) => participant.relay_starts(relay.queue_options(queue_options())),
            None => participant,
        };
        let stop = CancellationToken::new();
        let s = stop.clone();
        let running = tokio::spawn(async move {
            participant
                .run_forever(&amqp_url(), s.cancelled())
                .await
                .expect("the participant runs");
        });
        self.served.push((stop, running));
    }

    /// Runs the orders participant here, relaying the starts of its database with `relay`
    /// (as `SAGAS_RELAY_STARTS=1` makes `order_saga orders` do).
    fn relaying_orders(&mut self, relay: StartRelay) {
        self.serve(shop::ORDERS, Arc::new(shop::orders()), Some(relay));
    }

    /// A relay of the orders participant's database.
    fn relay(&self) -> StartRelay {
        StartRelay::new(
            shop::ORDERS,
            self.env.topology.clone(),
            self.env.bank.clone(),
        )
        .poll(Duration::from_millis(50))
    }

    /// Places checkouts `k-{from}` to `k-{to - 1}`, `qty` widgets each.
    async fn place(&self, from: usize, to: usize, qty: i32) -> Result<()> {
        let order = shop::Order {
            customer: "ada".into(),
            sku: "widget".into(),
            qty,
            amount: 500,
            simulate: None,
        };
        for i in from..to {
            shop::place(&self.env.bank, &format!("k-{i}"), &order).await?;
        }
        Ok(())
    }

    /// Every checkout `k-0` to `k-{n - 1}` started one saga, which completed, and there is
    /// no other; no start request is left.
    async fn each_checkout_one_saga(&self, n: usize) -> Result<()> {
        assert_eq!(
            settled(&self.env).await?,
            Vec::<OutboxRow>::new(),
            "no row left or failed"
        );
        for i in 0..n {
            one_completed(&self.env, "order", &format!("k-{i}")).await?;
        }
        assert_eq!(instances(&self.env, "order", None).await?.len(), n);
        Ok(())
    }

    async fn close(self) {
        for (stop, running) in self.served {
            stop.cancel();
            let _ = running.await;
        }
        let answers = self.env.topology.start_answers_queue(shop::ORDERS);
        delete_amqp(&self.env.topology, &[], &[answers]).await;
        cleanup(self.env, vec![self.app]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_of_the_order_example_starts_its_saga_once_through_the_orders_participants_relay()
-> Result<()> {
    let mut shop = Shop::open(5).await?;
    let relay = shop.relay();
    shop.relaying_orders(relay);
    shop.place(0, 1, 2).await?;
    shop.each_checkout_one_saga(1).await?;
    let (checkouts, confirmed): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM shop_checkouts), \
                (SELECT count(*) FROM shop_orders WHERE status = 'confirmed')",
    )
    .fetch_one(&shop.env.bank)
    .await?;
    assert_eq!((checkouts, confirmed), (1, 1));
    shop.close().await;
    Ok(())
}

/// The order example's `orders` participant as a child process relaying the starts of its
/// database (`SAGAS_RELAY_STARTS=1`), as a service deploys it; killed when dropped.
fn orders_process(env: &TestEnv) -> Result<tokio::process::Child> {
    let mut cmd =
        tokio::process::Command::new(crate::helpers::built_binary("examples/order_saga")?);
    cmd.arg("orders")
        .env("AMQP_URL", amqp_url())
        .env("SAGAS_AMQP_PREFIX", env.topology.prefix())
        .env("SAGAS_QUEUE_EXPIRES_MS", "600000")
        .env("ORDERS_DATABASE_URL", &env.bank_url)
        .env("SAGAS_RELAY_STARTS", "1")
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    Ok(cmd.spawn()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkouts_placed_while_the_relaying_process_is_killed_and_restarted_each_start_one_saga()
-> Result<()> {
    const CHECKOUTS: usize = 30;
    let shop = Shop::open(CHECKOUTS as i32).await?;
    let mut orders = orders_process(&shop.env)?;
    // The first checkout settled: the process relays. Then a third placed and the process
    // killed (SIGKILL) right after them, while their requests are being published and
    // answered; a third while none runs; a third after a new one started.
    shop.place(0, 1, 1).await?;
    settled(&shop.env).await?;
    shop.place(1, CHECKOUTS / 3, 1).await?;
    orders.start_kill()?;
    orders.wait().await?;
    let left = outbox_rows(&shop.env.bank).await?.len();
    println!(
        "{left} of {} start requests were still in the outbox at the kill",
        CHECKOUTS / 3 - 1
    );
    shop.place(CHECKOUTS / 3, 2 * CHECKOUTS / 3, 1).await?;
    let mut orders = orders_process(&shop.env)?;
    shop.place(2 * CHECKOUTS / 3, CHECKOUTS, 1).await?;
    shop.each_checkout_one_saga(CHECKOUTS).await?;
    orders.start_kill()?;
    orders.wait().await?;
    shop.close().await;
    Ok(())
}

/// Restarts the local RabbitMQ: only in the serial last stage of scripts/test, with
/// `SAGAS_FAULTS_RESTART_SERVICES=1` (as the fault suite's variant with service restarts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkouts_placed_before_during_and_after_a_broker_restart_each_start_one_saga()
-> Result<()> {
    if std::env::var("SAGAS_FAULTS_RESTART_SERVICES").as_deref() != Ok("1") {
        println!(
            "skipped: restarts RabbitMQ; runs with SAGAS_FAULTS_RESTART_SERVICES=1 (the serial \
             last stage of scripts/test)"
        );
        return Ok(());
    }
    const CHECKOUTS: usize = 30;
    let mut shop = Shop::open(CHECKOUTS as i32).await?;
    let relay = shop
        .relay()
        .answer_timeout(Duration::from_secs(2))
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500));
    shop.relaying_orders(relay);
    // A third before (settled: everything runs), a third while the broker is stopped, and a
    // third right after it is back, while every process is still reconnecting.
    shop.place(0, CHECKOUTS / 3, 1).await?;
    settled(&shop.env).await?;
    let stopped = crate::fault_suite::stop_broker()?;
    shop.place(CHECKOUTS / 3, 2 * CHECKOUTS / 3, 1).await?;
    drop(stopped);
    crate::fault_suite::broker_back().await?;
    shop.place(2 * CHECKOUTS / 3, CHECKOUTS, 1).await?;
    shop.each_checkout_one_saga(CHECKOUTS).await?;
    shop.close().await;
    Ok(())
}
