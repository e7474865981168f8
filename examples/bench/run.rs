//! One workload: fresh databases and topology, the engine, the HTTP API and the participants
//! in this process, N sagas driven with C in flight, then the checks and the counters.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use lapin::{Connection, ConnectionProperties};
use sagas::orchestrator::clock::SystemClock;
use sagas::orchestrator::store::PgStore;
use sagas::orchestrator::transport::{AmqpConfig, AmqpTransport};
use sagas::orchestrator::{Engine, EngineConfig};
use sagas::participant::amqp::{QueueOptions, declare_participant, delete_topology};
use sagas::participant::{Participant, Topology};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection as _, PgConnection};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::env::{self, Scratch, Urls};
use crate::participants::{self, BenchInput, Effects, Row};
use crate::prefill::{self, PrefillReport};
use crate::sys::{self, CpuSnapshot};
use crate::{Args, Via, Workload};

/// Everything measured for one workload.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadResult {
    pub workload: Workload,
    /// `ok`, or `FAILURE` when a saga was lost, duplicated or left inconsistent, or a start failed.
    pub status: &'static str,
    pub failures: Vec<String>,
    pub via: Via,
    pub sagas: u64,
    pub concurrency: usize,
    pub steps: usize,
    /// Requested start rate (sagas/s), if paced.
    pub rate: Option<f64>,
    /// Starts per second actually issued.
    pub start_rate: f64,
    pub seconds: f64,
    /// Terminal sagas per second, from the first start to the last terminal state seen.
    pub sagas_per_s: Option<f64>,
    /// End-to-end latency (terminal transition's time minus creation time, see docs).
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// Latency of the start call itself as the driver saw it (HTTP or `Engine::start`).
    pub start_p50_ms: f64,
    pub start_p99_ms: f64,
    pub lost: u64,
    pub duplicated: u64,
    pub inconsistent: u64,
    pub start_errors: u64,
    pub completed: u64,
    pub compensated: u64,
    /// Commands dispatched + replies received, from the event log, per saga.
    pub messages_per_saga: f64,
    pub commands_per_saga: f64,
    pub replies_per_saga: f64,
    /// AMQP messages through the broker per saga (command messages published, reply messages
    /// received): below the commands and replies when they travel in batches.
    pub wire_commands_per_saga: f64,
    pub wire_replies_per_saga: f64,
    /// Committed transactions per saga (`pg_stat_database.xact_commit` deltas, minus the
    /// benchmark's own completion polls).
    pub orchestrator_xacts_per_saga: f64,
    pub participant_xacts_per_saga: f64,
    pub db_xacts_per_saga: f64,
    /// WAL per saga, cluster-wide (`pg_stat_wal`).
    pub wal_bytes_per_saga: f64,
    pub wal_records_per_saga: f64,
    pub wal_syncs_per_saga: f64,
    /// Full-page images in the WAL per saga (the first change of a page after a checkpoint).
    pub wal_fpi_per_saga: f64,
    /// CPU seconds per saga: this process (orchestrator + participants + driver), PostgreSQL,
    /// RabbitMQ, and the machine's busy time.
    pub cpu_ms_per_saga_bench: f64,
    pub cpu_ms_per_saga_postgres: f64,
    pub cpu_ms_per_saga_rabbitmq: f64,
    pub cpu_ms_per_saga_machine: f64,
    /// Busy time of everything else on the machine (other users' builds, ...), per saga.
    pub cpu_ms_per_saga_other: f64,
    /// Machine busy time / (cores × wall time) during the run.
    pub machine_utilisation: f64,
    /// Peak resident memory of this process during the workload (MiB): orchestrator,
    /// participants and driver together, so an upper bound of the orchestrator's.
    pub peak_rss_mib: f64,
    /// Resident memory right before the first start, everything set up and idle (MiB).
    pub idle_rss_mib: f64,
    /// Most instances open at once (started, not terminal), as the completion poll counted them.
    pub max_in_flight: u64,
    /// Resident memory when that maximum was first seen (MiB).
    pub rss_at_max_in_flight_mib: f64,
    /// Start calls allowed in flight at once.
    pub start_calls: usize,
    /// Per-attempt step timeout, when not the definition's default (`--step-timeout-secs`).
    pub step_timeout_secs: Option<u64>,
    /// Events of finished sagas in the log before the timed part (`--prefill-events`).
    pub prefill_events: u64,
    /// What the prefill wrote and cost, with the table sizes after it.
    pub prefill: Option<PrefillReport>,
    /// sagas/s × messages per saga / raw AMQP round trips per second.
    pub efficiency: Option<f64>,
    /// sagas/s × transactions per saga / raw PostgreSQL commits per second.
    pub db_efficiency: Option<f64>,
    /// Events in the log per kind.
    pub events: BTreeMap<String, i64>,
    /// Rows written per table per saga: (inserted, updated, deleted).
    pub rows_per_saga: BTreeMap<String, (f64, f64, f64)>,
    pub outbox_left: i64,
    pub timers_fired: u64,
    pub relayed: u64,
    pub dead_lettered: u64,
    /// Finished sagas the retention loop deleted during the timed part (`--retention-secs`).
    pub pruned: u64,
    /// Barrier transactions of the participants that committed several commands at once.
    pub participant_batches: u64,
    /// Of those, batches that went without savepoints, met a failing handler and ran again
    /// with them (`Stats::batch_reruns`).
    pub participant_batch_reruns: u64,
    /// Batches rolled back whose commands then ran one by one (`Stats::batch_fallbacks`).
    pub participant_batch_fallbacks: u64,
    /// Replies decided on a state the orchestrator had cached and written with one statement
    /// (`PgStore::state_cache`).
    pub cached_replies: u64,
    /// Replies whose cached state had moved on, decided again under the lock.
    pub stale_replies: u64,
    pub completion_polls: u64,
    /// Mean round trip of one completion poll as the driver saw it (an upper bound of its
    /// cost in PostgreSQL).
    pub completion_poll_ms: f64,
    /// Mean execution time of the poll query inside PostgreSQL (EXPLAIN ANALYZE of every 50th).
    pub completion_poll_server_ms: f64,
}

/// Starts sagas the way users do.
#[derive(Clone)]
pub enum Starter {
    Engine(Arc<Engine>),
    Http {
        client: reqwest::Client,
        url: String,
    },
}

impl Starter {
    /// Starts one instance of `definition` and returns its id.
    pub async fn start(&self, definition: &str, input: Value) -> Result<Uuid> {
        match self {
            Starter::Engine(engine) => Ok(engine.start(definition, input).await?.id),
            Starter::Http { client, url } => {
                let res = client
                    .post(format!("{url}/v1/sagas/{definition}"))
                    .json(&json!({ "input": input }))
                    .send()
                    .await?;
                let status = res.status();
                if status != reqwest::StatusCode::ACCEPTED {
                    let body = res.text().await.unwrap_or_default();
                    anyhow::bail!("start answered {status}: {body}");
                }
                let body: Value = res.json().await?;
                let id = body["id"].as_str().context("no id in the start answer")?;
                Ok(id.parse()?)
            }
        }
    }
}

struct RunningParticipant {
    conn: Arc<Connection>,
    pool: sqlx::PgPool,
    stats: sagas::participant::Stats,
    task: tokio::task::JoinHandle<Result<(), sagas::participant::RuntimeError>>,
}

/// Runs one workload end to end and returns its measurements.
pub async fn run(
    args: &Args,
    urls: &Urls,
    tag: &str,
    workload: Workload,
    amqp_ceiling: Option<f64>,
    pg_ceiling: Option<f64>,
) -> Result<WorkloadResult> {
    let name = workload.as_str();
    let orch = env::create_db(urls, &format!("sagas_bench_{tag}_{name}_o")).await?;
    let part = match env::create_db(urls, &format!("sagas_bench_{tag}_{name}_p")).await {
        Ok(p) => p,
        Err(e) => {
            env::drop_all(urls, std::slice::from_ref(&orch)).await;
            return Err(e);
        }
    };
    let dbs = [orch.clone(), part.clone()];
    let topology = Topology::new(format!("bench-{tag}-{name}"));
    let result = run_in(
        args,
        urls,
        workload,
        &orch,
        &part,
        &topology,
        amqp_ceiling,
        pg_ceiling,
    )
    .await;
    // Clean up whatever happened.
    let steps = args.steps;
    let names = participants::names(workload, steps);
    if let Ok(conn) = Connection::connect(&urls.amqp, ConnectionProperties::default()).await
        && let Ok(ch) = conn.create_channel().await
    {
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        if let Err(e) = delete_topology(&ch, &topology, &refs).await {
            eprintln!("warning: deleting the AMQP topology: {e}");
        }
        let _ = conn.close(200, "done".into()).await;
    }
    if !args.keep {
        env::drop_all(urls, &dbs).await;
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn run_in(
    args: &Args,
    urls: &Urls,
    workload: Workload,
    orch: &Scratch,
    part: &Scratch,
    topology: &Topology,
    amqp_ceiling: Option<f64>,
    pg_ceiling: Option<f64>,
) -> Result<WorkloadResult> {
    let n = args.sagas;
    let c = args.concurrency;
    let steps = args.steps;
    let names = participants::names(workload, steps);
    let definition = participants::definition_name(workload, steps);
    let queues = QueueOptions {
        quorum: false,
        // Leftovers of a crashed run vanish; a normal run deletes its topology.
        expires: Some(Duration::from_secs(600)),
    };

    // Schemas, through pools that are closed before the baseline is read (a backend reports
    // its transaction counts when it exits).
    {
        let setup = PgPoolOptions::new()
            .max_connections(1)
            .connect(&orch.url)
            .await?;
        PgStore::new(setup.clone()).migrate().await?;
        setup.close().await;
        let setup = PgPoolOptions::new()
            .max_connections(1)
            .connect(&part.url)
            .await?;
        participants::install(&setup).await?;
        setup.close().await;
    }

    // The orchestrator, built like `server::engine`.
    let orch_pool = PgPoolOptions::new()
        .max_connections(args.db_pool)
        .connect(&orch.url)
        .await?;
    let transport = Arc::new(AmqpTransport::new(AmqpConfig {
        uri: urls.amqp.clone(),
        topology: topology.clone(),
        queues: queues.clone(),
        command_batch: usize::from(args.command_batch).into(),
    }));
    let store = Arc::new(PgStore::new(orch_pool.clone()));
    let engine = Engine::new(
        store.clone(),
        transport.clone(),
        participants::registry(
            workload,
            steps,
            args.step_timeout_secs.map(Duration::from_secs),
        )?,
        Arc::new(SystemClock),
        EngineConfig {
            reply_concurrency: args.reply_slots.max(1),
            retention: args.retention_secs.map(Duration::from_secs),
            retention_poll: Duration::from_secs(1),
            ..EngineConfig::default()
        },
    );
    engine.declare().await?;
    let shutdown = CancellationToken::new();
    let engine_task = tokio::spawn(engine.clone().run(shutdown.clone()));
    let starter = match args.via {
        Via::Engine => Starter::Engine(engine.clone()),
        Via::Http => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let app = sagas::orchestrator::api::router(engine.clone());
            let s = shutdown.clone();
            tokio::spawn(async move {
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move { s.cancelled().await })
                    .await;
            });
            Starter::Http {
                client: reqwest::Client::builder()
                    .pool_max_idle_per_host(c)
                    .timeout(Duration::from_secs(30))
                    .build()?,
                url: format!("http://{addr}"),
            }
        }
    };

    // The participants, one per step, each with its own connection and pool.
    let part_shutdown = CancellationToken::new();
    let mut running = Vec::new();
    for p in &names {
        let conn =
            Arc::new(Connection::connect(&urls.amqp, ConnectionProperties::default()).await?);
        let ch = conn.create_channel().await?;
        declare_participant(&ch, topology, p, &queues).await?;
        let _ = ch.close(200, "declared".into()).await;
        let pool = PgPoolOptions::new()
            .max_connections(args.participant_pool)
            .connect(&part.url)
            .await?;
        let participant =
            Participant::new(p.clone(), topology.clone(), pool.clone(), Arc::new(Effects))
                .queue_options(queues.clone())
                .concurrency(args.participant_concurrency)
                .install_barrier(false);
        let stats = participant.stats();
        let s = part_shutdown.clone();
        let c2 = conn.clone();
        let task = tokio::spawn(async move {
            participant
                .run(&c2, async move { s.cancelled().await })
                .await
        });
        running.push(RunningParticipant {
            conn,
            pool,
            stats,
            task,
        });
    }

    // The history, before anything is counted.
    let (prefill, boundary) = if args.prefill_events > 0 {
        let p = prefill::prefill(args, &starter, workload, &definition, orch, part).await?;
        (Some(p.report), p.boundary)
    } else {
        (None, Uuid::nil())
    };
    let writes_0: HashMap<String, (i64, i64, i64)> = table_writes(orch, part).await?;

    let admin = urls.admin_pool().await?;
    let xact_orch_0 = env::xact_commit(&admin, &orch.name).await?;
    let xact_part_0 = env::xact_commit(&admin, &part.name).await?;
    let wal_0 = env::wal(&admin).await?;
    sys::reset_peak_rss();
    let idle_rss = sys::rss_mib();
    let cpu_0 = CpuSnapshot::take();
    let pruned_0 = engine.stats().pruned.load(Ordering::Relaxed);

    // Completion: one connection counts the open instances through the partial index on
    // open statuses; instances never get polled one by one.
    let returned = Arc::new(AtomicU64::new(0));
    let (term_tx, term_rx) = watch::channel(0u64);
    let polls = Arc::new(AtomicU64::new(0));
    let poll_stop = CancellationToken::new();
    let poll_micros = Arc::new(AtomicU64::new(0));
    let explained = Arc::new(AtomicU64::new(0));
    let explained_micros = Arc::new(AtomicU64::new(0));
    // The most instances open at once, and the RSS (KiB) when that count was first reached.
    let max_open = Arc::new(AtomicU64::new(0));
    let rss_at_max_open = Arc::new(AtomicU64::new(0));
    let poller = {
        let mut conn = PgConnection::connect(&orch.url).await?;
        // Through the partial index on open statuses, never a sequential scan of the whole
        // table (the planner has no statistics yet on fresh tables): a plain index scan also
        // marks dead index entries, so a poll costs about C heap fetches.
        for set in ["SET enable_seqscan = off", "SET enable_bitmapscan = off"] {
            sqlx::query(set).execute(&mut conn).await?;
            polls.fetch_add(1, Ordering::Relaxed);
        }
        let returned = returned.clone();
        let polls = polls.clone();
        let poll_micros = poll_micros.clone();
        let explained = explained.clone();
        let explained_micros = explained_micros.clone();
        let max_open = max_open.clone();
        let rss_at_max_open = rss_at_max_open.clone();
        let stop = poll_stop.clone();
        let every = Duration::from_millis(args.poll_ms.max(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            while !stop.is_cancelled() {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let r = returned.load(Ordering::SeqCst);
                let t = Instant::now();
                let open: Result<(i64,), _> = sqlx::query_as(
                    "SELECT count(*) FROM sagas_instances
                     WHERE status NOT IN ('completed', 'compensated')",
                )
                .fetch_one(&mut conn)
                .await;
                polls.fetch_add(1, Ordering::Relaxed);
                poll_micros.fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                // Every 50th poll, also ask the server what the query costs it.
                if polls.load(Ordering::Relaxed).is_multiple_of(50) {
                    let plan: Result<(Value,), _> = sqlx::query_as(
                        "EXPLAIN (ANALYZE, FORMAT JSON) SELECT count(*) FROM sagas_instances
                         WHERE status NOT IN ('completed', 'compensated')",
                    )
                    .fetch_one(&mut conn)
                    .await;
                    polls.fetch_add(1, Ordering::Relaxed);
                    if let Ok((plan,)) = plan
                        && let Some(ms) = plan[0]["Execution Time"].as_f64()
                    {
                        explained.fetch_add(1, Ordering::Relaxed);
                        explained_micros.fetch_add((ms * 1000.0) as u64, Ordering::Relaxed);
                    }
                }
                if let Ok((open,)) = open {
                    if open.max(0) as u64 > max_open.load(Ordering::Relaxed) {
                        max_open.store(open as u64, Ordering::Relaxed);
                        rss_at_max_open.store((sys::rss_mib() * 1024.0) as u64, Ordering::Relaxed);
                    }
                    // Conservative: an instance committed but not yet returned counts as open.
                    let _ = term_tx.send(r.saturating_sub(open.max(0) as u64));
                }
            }
            let _ = conn.close().await;
        })
    };

    let progress = if args.progress {
        let pb = ProgressBar::new(n);
        pb.set_style(
            ProgressStyle::with_template(
                "{prefix:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} done, {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb.set_prefix(workload.as_str());
        Some(pb)
    } else {
        None
    };

    // Drive.
    let timeout = Duration::from_secs(args.timeout_secs);
    let stall = Duration::from_secs(args.stall_secs);
    let start_calls = args.start_calls();
    let t0 = Instant::now();
    let deadline = t0 + timeout;
    let mut set: JoinSet<(u64, Result<Uuid>, Duration)> = JoinSet::new();
    let mut ids: HashMap<Uuid, u64> = HashMap::with_capacity(n as usize);
    let mut start_hist = Histogram::<u64>::new(3)?;
    let mut start_errors = Vec::new();
    let mut issued = 0u64;
    let collect = |res: (u64, Result<Uuid>, Duration),
                   ids: &mut HashMap<Uuid, u64>,
                   start_hist: &mut Histogram<u64>,
                   start_errors: &mut Vec<String>| {
        let (i, r, took) = res;
        let _ = start_hist.record(took.as_micros() as u64);
        match r {
            Ok(id) => {
                ids.insert(id, i);
                returned.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => start_errors.push(format!("saga {i}: {e:#}")),
        }
    };
    let mut rx = term_rx.clone();
    'drive: while issued < n {
        if let Some(rate) = args.rate {
            let at = t0 + Duration::from_secs_f64(issued as f64 / rate);
            tokio::time::sleep_until(at.into()).await;
        }
        // The window: at most C sagas started and not yet seen terminal.
        let mut last_change = Instant::now();
        let mut last_term = *rx.borrow();
        loop {
            while let Some(done) = set.try_join_next() {
                collect(done?, &mut ids, &mut start_hist, &mut start_errors);
            }
            let term = *rx.borrow_and_update() + start_errors.len() as u64;
            if issued.saturating_sub(term) < c as u64 && set.len() < start_calls {
                break;
            }
            if term != last_term {
                last_term = term;
                last_change = Instant::now();
            }
            let now = Instant::now();
            if now >= deadline || now - last_change >= stall {
                break 'drive;
            }
            tokio::select! {
                _ = rx.changed() => {}
                Some(done) = set.join_next(), if !set.is_empty() => {
                    collect(done?, &mut ids, &mut start_hist, &mut start_errors);
                }
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        let i = issued;
        let s = starter.clone();
        let def = definition.clone();
        set.spawn(async move {
            let input = serde_json::to_value(BenchInput {
                n: i,
                fail: participants::fails(workload, i),
            })
            .expect("serializable input");
            let t = Instant::now();
            let r = s.start(&def, input).await;
            (i, r, t.elapsed())
        });
        issued += 1;
        if let Some(pb) = &progress {
            pb.set_position(*rx.borrow());
            pb.set_message(format!("{issued} started"));
        }
    }
    let drive_secs = t0.elapsed().as_secs_f64();
    // Start calls still in flight (bounded by the HTTP timeout and the deadline).
    while let Ok(Some(done)) =
        tokio::time::timeout_at((deadline + Duration::from_secs(35)).into(), set.join_next()).await
    {
        collect(done?, &mut ids, &mut start_hist, &mut start_errors);
    }
    set.abort_all();
    let ok_starts = ids.len() as u64;

    // Wait (bounded) until every started saga is terminal, or nothing moves for `stall`.
    let mut last_term = *rx.borrow();
    let mut last_change = Instant::now();
    let mut t_end = Instant::now();
    loop {
        let term = *rx.borrow_and_update();
        if let Some(pb) = &progress {
            pb.set_position(term);
        }
        if term >= ok_starts {
            t_end = Instant::now();
            break;
        }
        if term != last_term {
            last_term = term;
            last_change = Instant::now();
        }
        let now = Instant::now();
        if now >= deadline || now - last_change >= stall {
            break;
        }
        tokio::select! {
            _ = rx.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    let all_terminal = *rx.borrow() >= ok_starts;
    let cpu_1 = CpuSnapshot::take();
    let peak_rss = sys::peak_rss_mib();
    let elapsed = if all_terminal {
        (t_end - t0).as_secs_f64()
    } else {
        t0.elapsed().as_secs_f64()
    };
    if let Some(pb) = progress {
        pb.finish_and_clear();
    }

    // Stop everything, close every pool, so that every backend reports its counts.
    poll_stop.cancel();
    let _ = poller.await;
    part_shutdown.cancel();
    let stats = engine.stats();
    let timers_fired = stats.timers.load(Ordering::Relaxed);
    let relayed = stats.relayed.load(Ordering::Relaxed);
    let dead_lettered = stats.dead_lettered.load(Ordering::Relaxed);
    let pruned = stats.pruned.load(Ordering::Relaxed) - pruned_0;
    let participant_count = |count: fn(&sagas::participant::Stats) -> u64| {
        running.iter().map(|r| count(&r.stats)).sum()
    };
    let participant_batches: u64 = participant_count(sagas::participant::Stats::batches);
    let participant_batch_reruns: u64 = participant_count(sagas::participant::Stats::batch_reruns);
    let participant_batch_fallbacks: u64 =
        participant_count(sagas::participant::Stats::batch_fallbacks);
    let cache = store.state_cache();
    shutdown.cancel();
    for r in running {
        match tokio::time::timeout(Duration::from_secs(30), r.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("warning: participant stopped with {e}"),
            Ok(Err(e)) => eprintln!("warning: participant task: {e}"),
            Err(_) => eprintln!("warning: participant did not stop within 30 s"),
        }
        r.pool.close().await;
        let _ = r.conn.close(200, "done".into()).await;
    }
    match tokio::time::timeout(Duration::from_secs(30), engine_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => eprintln!("warning: engine stopped with {e}"),
        Ok(Err(e)) => eprintln!("warning: engine task: {e}"),
        Err(_) => eprintln!("warning: engine did not stop within 30 s"),
    }
    let wire_commands = transport.wire().published.load(Ordering::Relaxed);
    let wire_replies = transport.wire().received.load(Ordering::Relaxed);
    transport.close().await;
    orch_pool.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let polls = polls.load(Ordering::Relaxed);
    let xact_orch = env::xact_commit(&admin, &orch.name).await? - xact_orch_0 - polls as i64;
    let xact_part = env::xact_commit(&admin, &part.name).await? - xact_part_0;
    let wal_1 = env::wal(&admin).await?;
    let cpu_2 = CpuSnapshot::take();
    admin.close().await;
    let run_cpu = cpu_0.until(&cpu_1);
    let pg_cpu = cpu_0.until(&cpu_2).postgres;

    // Read back: states, latencies, the log, the business rows.
    let mut check = PgConnection::connect(&orch.url).await?;
    // The run's rows only: every prefilled id sorts before `boundary` (nil without a prefill).
    let instances: Vec<(Uuid, String, i64)> = sqlx::query_as(
        "SELECT id, status,
                (extract(epoch FROM updated_at - created_at) * 1000000)::bigint
         FROM sagas_instances WHERE id >= $1",
    )
    .bind(boundary)
    .fetch_all(&mut check)
    .await?;
    let events: Vec<(String, i64)> = sqlx::query_as(
        "SELECT kind, count(*) FROM sagas_events WHERE instance_id >= $1
         GROUP BY kind ORDER BY kind",
    )
    .bind(boundary)
    .fetch_all(&mut check)
    .await?;
    let (outbox_left,): (i64,) = sqlx::query_as("SELECT count(*) FROM sagas_outbox")
        .fetch_one(&mut check)
        .await?;
    let _ = check.close().await;
    let mut check = PgConnection::connect(&part.url).await?;
    let rows: Vec<(Uuid, i32, i32, i32, i32, i32)> = sqlx::query_as(
        "SELECT saga_id, step, applied, compensated, confirmed, cancelled FROM bench_effects
         WHERE saga_id >= $1",
    )
    .bind(boundary)
    .fetch_all(&mut check)
    .await?;
    let _ = check.close().await;
    let mut rows_per_saga = BTreeMap::new();
    for (table, (ins, upd, del)) in table_writes(orch, part).await? {
        let (ins_0, upd_0, del_0) = writes_0.get(&table).copied().unwrap_or_default();
        let d = ok_starts.max(1) as f64;
        rows_per_saga.insert(
            table,
            (
                (ins - ins_0) as f64 / d,
                (upd - upd_0) as f64 / d,
                (del - del_0) as f64 / d,
            ),
        );
    }

    // Checks.
    let mut failures = Vec::new();
    for e in start_errors.iter().take(5) {
        failures.push(format!("start failed: {e}"));
    }
    if start_errors.len() > 5 {
        failures.push(format!("... {} start failures in all", start_errors.len()));
    }
    if issued < n {
        failures.push(format!(
            "only {issued} of {n} sagas were started before the time limit"
        ));
    }
    let mut latency = Histogram::<u64>::new(3)?;
    let mut lost = 0u64;
    let mut completed = 0u64;
    let mut compensated = 0u64;
    let mut inconsistent = 0u64;
    let mut by_saga: HashMap<Uuid, BTreeMap<i32, Row>> = HashMap::with_capacity(ids.len());
    for (id, step, applied, comp, conf, canc) in rows {
        by_saga.entry(id).or_default().insert(
            step,
            Row {
                applied,
                compensated: comp,
                confirmed: conf,
                cancelled: canc,
            },
        );
    }
    let mut duplicated = 0u64;
    let mut examples = Vec::new();
    let mut seen = 0u64;
    for (id, status, micros) in &instances {
        let Some(&i) = ids.get(id) else {
            inconsistent += 1;
            examples.push(format!("unknown instance {id}"));
            continue;
        };
        seen += 1;
        let fail = participants::fails(workload, i);
        match status.as_str() {
            "completed" | "compensated" => {
                let _ = latency.record((*micros).max(1) as u64);
                let want = if fail { "compensated" } else { "completed" };
                if status == "completed" {
                    completed += 1;
                } else {
                    compensated += 1;
                }
                if status != want {
                    inconsistent += 1;
                    examples.push(format!("saga {i} ({id}) ended {status}, expected {want}"));
                }
            }
            other => {
                lost += 1;
                if examples.len() < 10 {
                    examples.push(format!("saga {i} ({id}) still {other}"));
                }
                continue;
            }
        }
        let got = by_saga.remove(id).unwrap_or_default();
        let mut dup = false;
        let mut bad = false;
        for step in 1..=steps {
            let want = participants::expected(workload, steps, step, fail);
            let have = got.get(&(step as i32)).copied();
            if have != want {
                let h = have.unwrap_or_default();
                if h.applied > 1 || h.compensated > 1 || h.confirmed > 1 || h.cancelled > 1 {
                    dup = true;
                } else {
                    bad = true;
                }
                if examples.len() < 10 {
                    examples.push(format!(
                        "saga {i} ({id}) step {step}: effects {have:?}, expected {want:?}"
                    ));
                }
            }
        }
        if got.keys().any(|s| *s < 1 || *s > steps as i32) {
            bad = true;
        }
        if dup {
            duplicated += 1;
        } else if bad {
            inconsistent += 1;
        }
    }
    // Started (the start call answered) but no instance row at all.
    lost += ok_starts.saturating_sub(seen);
    if !by_saga.is_empty() {
        inconsistent += by_saga.len() as u64;
        examples.push(format!(
            "{} sagas have effects but no instance",
            by_saga.len()
        ));
    }
    if lost > 0 {
        failures.push(format!(
            "{lost} sagas lost (not terminal after the time limit / {} s without progress)",
            args.stall_secs
        ));
    }
    if duplicated > 0 {
        failures.push(format!(
            "{duplicated} sagas with an effect applied more than once"
        ));
    }
    if inconsistent > 0 {
        failures.push(format!("{inconsistent} sagas inconsistent"));
    }
    if !failures.is_empty() {
        failures.extend(examples.into_iter().take(10));
    }

    let per = |x: f64| x / ok_starts.max(1) as f64;
    let ev: BTreeMap<String, i64> = events.into_iter().collect();
    let count = |k: &str| ev.get(k).copied().unwrap_or(0) as f64;
    let commands = count("dispatched");
    let replies = count("replied") + count("reply_ignored");
    let messages_per_saga = per(commands + replies);
    let ok = failures.is_empty();
    let sagas_per_s = ok.then(|| ok_starts as f64 / elapsed);
    let db_xacts = per((xact_orch + xact_part) as f64);
    let q = |p: f64| ok.then(|| latency.value_at_quantile(p) as f64 / 1000.0);
    let start_q = |p: f64| start_hist.value_at_quantile(p) as f64 / 1000.0;
    Ok(WorkloadResult {
        workload,
        status: if ok { "ok" } else { "FAILURE" },
        failures,
        via: args.via,
        sagas: n,
        concurrency: c,
        steps,
        rate: args.rate,
        start_rate: issued as f64 / drive_secs.max(1e-9),
        seconds: elapsed,
        sagas_per_s,
        p50_ms: q(0.50),
        p95_ms: q(0.95),
        p99_ms: q(0.99),
        max_ms: ok.then(|| latency.max() as f64 / 1000.0),
        start_p50_ms: start_q(0.50),
        start_p99_ms: start_q(0.99),
        lost,
        duplicated,
        inconsistent,
        start_errors: start_errors.len() as u64,
        completed,
        compensated,
        messages_per_saga,
        commands_per_saga: per(commands),
        replies_per_saga: per(replies),
        wire_commands_per_saga: per(wire_commands as f64),
        wire_replies_per_saga: per(wire_replies as f64),
        orchestrator_xacts_per_saga: per(xact_orch as f64),
        participant_xacts_per_saga: per(xact_part as f64),
        db_xacts_per_saga: db_xacts,
        wal_bytes_per_saga: per((wal_1.1 - wal_0.1) as f64),
        wal_records_per_saga: per((wal_1.0 - wal_0.0) as f64),
        wal_syncs_per_saga: per((wal_1.2 - wal_0.2) as f64),
        wal_fpi_per_saga: per((wal_1.3 - wal_0.3) as f64),
        cpu_ms_per_saga_bench: per(run_cpu.bench) * 1000.0,
        cpu_ms_per_saga_postgres: per(pg_cpu) * 1000.0,
        cpu_ms_per_saga_rabbitmq: per(run_cpu.rabbitmq) * 1000.0,
        cpu_ms_per_saga_machine: per(run_cpu.machine_busy) * 1000.0,
        cpu_ms_per_saga_other: per((run_cpu.machine_busy
            - run_cpu.bench
            - run_cpu.rabbitmq
            - pg_cpu)
            .max(0.0))
            * 1000.0,
        machine_utilisation: if run_cpu.machine_total > 0.0 {
            run_cpu.machine_busy / run_cpu.machine_total
        } else {
            0.0
        },
        peak_rss_mib: peak_rss,
        idle_rss_mib: idle_rss,
        max_in_flight: max_open.load(Ordering::Relaxed),
        rss_at_max_in_flight_mib: rss_at_max_open.load(Ordering::Relaxed) as f64 / 1024.0,
        start_calls,
        step_timeout_secs: args.step_timeout_secs,
        prefill_events: prefill.as_ref().map_or(0, |p| p.events),
        prefill,
        efficiency: match (sagas_per_s, amqp_ceiling) {
            (Some(s), Some(a)) if a > 0.0 => Some(s * messages_per_saga / a),
            _ => None,
        },
        db_efficiency: match (sagas_per_s, pg_ceiling) {
            (Some(s), Some(p)) if p > 0.0 => Some(s * db_xacts / p),
            _ => None,
        },
        events: ev,
        rows_per_saga,
        outbox_left,
        timers_fired,
        relayed,
        dead_lettered,
        pruned,
        participant_batches,
        participant_batch_reruns,
        participant_batch_fallbacks,
        cached_replies: cache.hits,
        stale_replies: cache.stale,
        completion_polls: polls,
        completion_poll_server_ms: explained_micros.load(Ordering::Relaxed) as f64
            / 1000.0
            / explained.load(Ordering::Relaxed).max(1) as f64,
        completion_poll_ms: poll_micros.load(Ordering::Relaxed) as f64
            / 1000.0
            / polls.max(1) as f64,
    })
}

/// Rows inserted, updated and deleted so far per table of both databases, keyed
/// `orchestrator.<table>` and `participant.<table>`.
async fn table_writes(orch: &Scratch, part: &Scratch) -> Result<HashMap<String, (i64, i64, i64)>> {
    let mut all = HashMap::new();
    for (db, side) in [(orch, "orchestrator"), (part, "participant")] {
        for (table, ins, upd, _hot, del) in env::table_writes(&db.url).await? {
            all.insert(format!("{side}.{table}"), (ins, upd, del));
        }
    }
    Ok(all)
}
