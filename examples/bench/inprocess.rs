//! `--topology in-process`: the engine, the HTTP API and the participants in this process, N
//! sagas driven with C in flight, completion seen by counting the open instances.

use sagas::participant::config::{database_options, pool_options};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use hdrhistogram::Histogram;
use lapin::{Connection, ConnectionProperties};
use sagas::orchestrator::clock::SystemClock;
use sagas::orchestrator::store::PgStore;
use sagas::orchestrator::transport::{AmqpConfig, AmqpTransport};
use sagas::orchestrator::{Engine, EngineConfig};
use sagas::participant::Participant;
use serde_json::Value;
use sqlx::{Connection as _, PgConnection};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::participants::{self, BenchInput, Effects};
use crate::prefill;
use crate::run::{self, Baseline, Counted, Driven, Measured, Memory, Place, Starter, StateCache};
use crate::sys::{self, CpuSnapshot};
use crate::{Args, Via, Workload};

struct RunningParticipant {
    conn: Arc<Connection>,
    pool: sqlx::PgPool,
    stats: sagas::participant::Stats,
    task: tokio::task::JoinHandle<Result<(), sagas::participant::RuntimeError>>,
}

/// Runs one workload in this process and stops everything it started.
pub async fn run(args: &Args, place: &Place<'_>, workload: Workload) -> Result<Measured> {
    let (urls, orch, part, topology) = (place.urls, place.orch, place.part, place.topology);
    let n = args.sagas;
    let c = args.concurrency;
    let steps = args.steps;
    let names = participants::names(workload, steps);
    let definition = participants::definition_name(workload, steps);
    let queues = run::queue_options();
    run::prepare(place, &names).await?;

    // The orchestrator, built like `server::engine`.
    let orch_pool = pool_options(args.db_pool)
        .connect_with(database_options(&orch.url)?)
        .await?;
    let transport = Arc::new(AmqpTransport::new(AmqpConfig {
        uri: urls.amqp.clone(),
        topology: topology.clone(),
        queues: queues.clone(),
        command_batch: args.command_batch(),
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
        let pool = pool_options(args.participant_pool)
            .connect_with(database_options(&part.url)?)
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
    let baseline = Baseline::take(place).await?;
    sys::reset_peak_rss("self");
    let idle_rss = sys::rss_mib("self");
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
                        rss_at_max_open
                            .store((sys::rss_mib("self") * 1024.0) as u64, Ordering::Relaxed);
                    }
                    // Conservative: an instance committed but not yet returned counts as open.
                    let _ = term_tx.send(r.saturating_sub(open.max(0) as u64));
                }
            }
            let _ = conn.close().await;
        })
    };

    let progress = run::progress_bar(args, workload);

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
            Err(e) => start_errors.push(run::start_failed(i, &e)),
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
    let peak_rss = sys::peak_rss_mib("self");
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
    let participant_count = |count: fn(&sagas::participant::Stats) -> u64| {
        running.iter().map(|r| count(&r.stats)).sum()
    };
    let mut counted = Counted {
        timers_fired: stats.timers.load(Ordering::Relaxed),
        relayed: stats.relayed.load(Ordering::Relaxed),
        dead_lettered: stats.dead_lettered.load(Ordering::Relaxed),
        pruned: stats.pruned.load(Ordering::Relaxed) - pruned_0,
        participant_batches: participant_count(sagas::participant::Stats::batches),
        participant_batch_reruns: participant_count(sagas::participant::Stats::batch_reruns),
        participant_batch_fallbacks: participant_count(sagas::participant::Stats::batch_fallbacks),
        state_cache: {
            let cache = store.state_cache();
            vec![StateCache {
                hits: cache.hits,
                stale: cache.stale,
                skipped: cache.skipped,
            }]
        },
        ..Counted::default()
    };
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
    counted.wire_commands = transport.wire().published.load(Ordering::Relaxed);
    counted.wire_replies = transport.wire().received.load(Ordering::Relaxed);
    transport.close().await;
    orch_pool.close().await;
    let polls = polls.load(Ordering::Relaxed);
    counted.completion_polls = polls;
    counted.completion_poll_ms =
        poll_micros.load(Ordering::Relaxed) as f64 / 1000.0 / polls.max(1) as f64;
    counted.completion_poll_server_ms = explained_micros.load(Ordering::Relaxed) as f64
        / 1000.0
        / explained.load(Ordering::Relaxed).max(1) as f64;

    Ok(Measured {
        baseline,
        boundary,
        prefill,
        driven: Driven {
            ids,
            issued,
            start_errors,
            wrong_answers: Vec::new(),
            start_hist,
            client_latency: None,
            seconds: elapsed,
            drive_secs,
            max_in_flight: max_open.load(Ordering::Relaxed),
            rss_at_max_in_flight_mib: Some(rss_at_max_open.load(Ordering::Relaxed) as f64 / 1024.0),
        },
        counted,
        memory: Memory {
            peak_rss_mib: peak_rss,
            idle_rss_mib: idle_rss,
            ..Memory::default()
        },
        cpu_0,
        cpu_1,
        orchestrators: 1,
    })
}
