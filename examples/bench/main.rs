//! The benchmark: throughput, latency and cost of sagas against real PostgreSQL and RabbitMQ,
//! next to the machine's ceilings measured in the same run.
//!
//! ```text
//! cargo run --release --example bench -- --workload happy --sagas 10000 --concurrency 64
//! cargo run --release --example bench -- --workload all --json
//! cargo run --release --example bench -- --workload happy --sagas 3000 --prefill-events 1000000
//! ```
//!
//! Everything runs in this one process: the engine (built like `server::engine`), its HTTP
//! API, one participant per step (the participant SDK with the barrier) and the load driver.
//! Each workload gets fresh scratch databases (`sagas_bench_*`, dropped at the end) and its
//! own AMQP prefix (deleted at the end). See docs/performance.md for the method and numbers.

mod ceilings;
mod env;
mod participants;
mod prefill;
mod run;
mod sys;

use std::io::IsTerminal;

use anyhow::Result;
use clap::{Parser, ValueEnum};
use serde::Serialize;

use crate::ceilings::Ceilings;
use crate::env::Urls;
use crate::run::WorkloadResult;

// As `sagad` (docs/performance.md, round 5).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// K-step saga, every step succeeds.
    Happy,
    /// K-step saga; every 5th fails at its last step and the earlier steps are compensated.
    Compensate,
    /// TCC over K participants, every try succeeds and is confirmed.
    Tcc,
}

impl Workload {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Workload::Happy => "happy",
            Workload::Compensate => "compensate",
            Workload::Tcc => "tcc",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    Happy,
    Compensate,
    Tcc,
    All,
}

/// How sagas are started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// `POST /v1/sagas/{name}` on the in-process HTTP API (what users do).
    Http,
    /// `Engine::start` directly (what an embedding application does).
    Engine,
}

/// Benchmark of the sagas orchestrator against local PostgreSQL and RabbitMQ.
#[derive(Debug, Parser)]
#[command(name = "bench")]
pub struct Args {
    /// Which workload(s) to run.
    #[arg(long, value_enum, default_value_t = Which::All)]
    workload: Which,
    /// Sagas per workload.
    #[arg(long, default_value_t = 10_000)]
    pub sagas: u64,
    /// Sagas in flight (started and not yet terminal); also the ceilings' concurrency.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Steps per saga (participants per TCC).
    #[arg(long = "steps", default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=16))]
    steps_arg: u16,
    #[arg(skip)]
    pub steps: usize,
    /// How sagas are started.
    #[arg(long, value_enum, default_value_t = Via::Http)]
    pub via: Via,
    /// Start at most this many sagas per second (paced; the in-flight limit still applies).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Print one JSON document instead of text.
    #[arg(long)]
    json: bool,
    /// Length of each ceiling measurement, in seconds.
    #[arg(long, default_value_t = 5.0)]
    ceiling_secs: f64,
    /// Do not measure the ceilings (no efficiency ratios then).
    #[arg(long)]
    skip_ceilings: bool,
    /// Orchestrator database pool size (`SAGAS_DB_POOL`'s default).
    #[arg(long, default_value_t = 16)]
    pub db_pool: u32,
    /// Database pool size of each participant (it runs up to 16 handlers at once).
    #[arg(long, default_value_t = 16)]
    pub participant_pool: u32,
    /// Handler slots of each participant (`Participant::concurrency`; a slot holds one
    /// message, or the several messages taken together).
    #[arg(long, default_value_t = 16)]
    pub participant_concurrency: usize,
    /// Reply batches the orchestrator commits at once (`EngineConfig::reply_concurrency`).
    #[arg(long, default_value_t = sagas::orchestrator::EngineConfig::default().reply_concurrency)]
    pub reply_slots: usize,
    /// Interval of the completion poll (one `count(*)` of open instances), in milliseconds.
    #[arg(long, default_value_t = 10)]
    pub poll_ms: u64,
    /// Give up on a workload after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
    /// Give up when no saga finished for this many seconds.
    #[arg(long, default_value_t = 30)]
    pub stall_secs: u64,
    /// Before each workload's timed part, fill its fresh databases with about this many events
    /// of finished sagas (clones of real ones), then VACUUM ANALYZE and CHECKPOINT.
    #[arg(long, default_value_t = 0)]
    pub prefill_events: u64,
    /// Run the orchestrator with this retention (`SAGAS_RETENTION`), looking every second for
    /// finished sagas to delete: with --prefill-events, the history older than this is pruned
    /// while the workload runs. Keep it longer than the run, or the run's own sagas go too.
    #[arg(long)]
    pub retention_secs: Option<u64>,
    /// Start calls in flight at most (HTTP requests or `Engine::start` calls); the in-flight
    /// limit still applies [default: the concurrency, at most 512].
    #[arg(long = "start-calls")]
    start_calls_arg: Option<usize>,
    /// Per-attempt timeout of every step, in seconds [default: the definition default, 10 s];
    /// raise it when commands queue longer than that (large --concurrency, slow participants).
    #[arg(long)]
    pub step_timeout_secs: Option<u64>,
    /// Most commands per AMQP message (`SAGAS_AMQP_COMMAND_BATCH`; 1, the default, sends each
    /// command alone; the bench's participants accept batches).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub command_batch: u16,
    /// Keep the scratch databases (for inspection).
    #[arg(long)]
    pub keep: bool,
    #[arg(skip)]
    pub progress: bool,
}

impl Args {
    /// Start calls allowed in flight at once.
    pub fn start_calls(&self) -> usize {
        self.start_calls_arg
            .unwrap_or(self.concurrency.min(512))
            .max(1)
    }
}

#[derive(Debug, Serialize)]
struct Report {
    setup: &'static str,
    cores: usize,
    via: Via,
    command_batch: u16,
    ceilings: Option<Ceilings>,
    workloads: Vec<WorkloadResult>,
    ok: bool,
}

const SETUP: &str = "in-process: orchestrator engine + HTTP API + participants + load driver in \
                     one process; PostgreSQL and RabbitMQ local";

#[tokio::main]
async fn main() {
    let mut args = Args::parse();
    args.steps = usize::from(args.steps_arg);
    args.progress = !args.json && std::io::stderr().is_terminal();
    match main_inner(&args).await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            std::process::exit(2);
        }
    }
}

async fn main_inner(args: &Args) -> Result<bool> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    anyhow::ensure!(args.sagas > 0, "--sagas must be positive");
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be positive");
    anyhow::ensure!(args.rate.is_none_or(|r| r > 0.0), "--rate must be positive");
    anyhow::ensure!(
        args.skip_ceilings || args.concurrency <= 90,
        "the PostgreSQL ceiling opens --concurrency connections: above 90, pass --skip-ceilings"
    );
    anyhow::ensure!(
        u64::from(args.db_pool) + u64::from(args.participant_pool) * args.steps as u64 <= 90,
        "--db-pool + --steps x --participant-pool must stay under PostgreSQL's default 100 connections (at most 90)"
    );
    let urls = Urls {
        admin: std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
        amqp: std::env::var("AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
    };
    let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let workloads = match args.workload {
        Which::Happy => vec![Workload::Happy],
        Which::Compensate => vec![Workload::Compensate],
        Which::Tcc => vec![Workload::Tcc],
        Which::All => vec![Workload::Happy, Workload::Compensate, Workload::Tcc],
    };
    if !args.json {
        println!(
            "sagas bench ({SETUP}; {} cores; at most {} command(s) per AMQP message)",
            sys::cores(),
            args.command_batch
        );
    }

    let ceilings = if args.skip_ceilings {
        None
    } else {
        if args.progress {
            eprintln!(
                "measuring ceilings ({} s each, concurrency {})...",
                args.ceiling_secs, args.concurrency
            );
        }
        let c = ceilings::measure(
            &urls,
            &tag,
            args.concurrency,
            args.ceiling_secs,
            &format!("bench-{tag}"),
        )
        .await?;
        if !args.json {
            println!(
                "ceilings at concurrency {}: PostgreSQL {:.0} single-row commits/s, \
                 AMQP {:.0} persistent publish-confirm-consume-ack round trips/s",
                c.concurrency, c.pg_commits_per_s, c.amqp_round_trips_per_s
            );
            if c.other_cpu_share > 0.1 {
                println!(
                    "  WARNING other processes used {:.0}% of the busy CPU time while measuring the ceilings",
                    c.other_cpu_share * 100.0
                );
            }
        }
        Some(c)
    };

    let mut results = Vec::new();
    for w in workloads {
        let r = run::run(
            args,
            &urls,
            &tag,
            w,
            ceilings.as_ref().map(|c| c.amqp_round_trips_per_s),
            ceilings.as_ref().map(|c| c.pg_commits_per_s),
        )
        .await?;
        if !args.json {
            print_text(&r);
        }
        results.push(r);
    }
    let ok = results.iter().all(|r| r.status == "ok");
    if args.json {
        let report = Report {
            setup: SETUP,
            cores: sys::cores(),
            via: args.via,
            command_batch: args.command_batch,
            ceilings,
            workloads: results,
            ok,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(ok)
}

fn print_text(r: &WorkloadResult) {
    let via = match r.via {
        Via::Http => "HTTP",
        Via::Engine => "Engine::start",
    };
    let rate = r
        .rate
        .map(|x| format!(", paced at {x:.0}/s"))
        .unwrap_or_default();
    println!();
    let mut extra = String::new();
    if r.start_calls < r.concurrency {
        extra += &format!(", at most {} start calls at once", r.start_calls);
    }
    if let Some(t) = r.step_timeout_secs {
        extra += &format!(", step timeout {t} s");
    }
    println!(
        "{} — {} sagas, {} steps, {} in flight, via {via}{rate}{extra}",
        r.workload.as_str(),
        r.sagas,
        r.steps,
        r.concurrency
    );
    if let Some(p) = &r.prefill {
        let mib = |b: i64| b as f64 / (1024.0 * 1024.0);
        println!(
            "  prefill      {} events of {} finished sagas in {:.0} s (seeds {:.0} s, clones {:.0} s, VACUUM ANALYZE {:.0} s, CHECKPOINT {:.0} s); databases {:.0} MiB orchestrator, {:.0} MiB participants",
            p.events,
            p.instances,
            p.total_secs,
            p.seed_secs,
            p.clone_secs,
            p.vacuum_secs,
            p.checkpoint_secs,
            mib(p.orchestrator_db_bytes),
            mib(p.participant_db_bytes)
        );
        for t in &p.tables {
            println!(
                "               {}.{}: ≈ {} rows, {:.0} MiB table + {:.0} MiB indexes",
                t.database,
                t.table,
                t.rows,
                mib(t.table_bytes),
                mib(t.index_bytes)
            );
        }
    }
    if r.status != "ok" {
        println!("  FAILURE");
        for f in &r.failures {
            println!("    {f}");
        }
        println!(
            "  lost {}, duplicated {}, inconsistent {}, start errors {}; at most {} in flight, peak RSS {:.0} MiB",
            r.lost, r.duplicated, r.inconsistent, r.start_errors, r.max_in_flight, r.peak_rss_mib
        );
        return;
    }
    let f = |x: Option<f64>| x.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
    println!(
        "  throughput   {} sagas/s ({} completed, {} compensated in {:.1} s; starts issued at {:.0}/s)",
        f(r.sagas_per_s),
        r.completed,
        r.compensated,
        r.seconds,
        r.start_rate
    );
    println!(
        "  latency      p50 {} ms, p95 {} ms, p99 {} ms, max {} ms (created -> terminal); start call p50 {:.1} ms, p99 {:.1} ms",
        f(r.p50_ms),
        f(r.p95_ms),
        f(r.p99_ms),
        f(r.max_ms),
        r.start_p50_ms,
        r.start_p99_ms
    );
    println!(
        "  per saga     {:.2} AMQP messages ({:.2} commands + {:.2} replies; through the broker {:.2} + {:.2} messages), {:.2} DB transactions ({:.2} orchestrator + {:.2} participants), {:.0} WAL bytes ({:.2} full-page images), {:.2} WAL syncs",
        r.messages_per_saga,
        r.commands_per_saga,
        r.replies_per_saga,
        r.wire_commands_per_saga,
        r.wire_replies_per_saga,
        r.db_xacts_per_saga,
        r.orchestrator_xacts_per_saga,
        r.participant_xacts_per_saga,
        r.wal_bytes_per_saga,
        r.wal_fpi_per_saga,
        r.wal_syncs_per_saga
    );
    println!(
        "  CPU per saga {:.2} ms this process, {:.2} ms PostgreSQL, {:.2} ms RabbitMQ, {:.2} ms other processes; machine busy {:.0}%",
        r.cpu_ms_per_saga_bench,
        r.cpu_ms_per_saga_postgres,
        r.cpu_ms_per_saga_rabbitmq,
        r.cpu_ms_per_saga_other,
        r.machine_utilisation * 100.0
    );
    if r.cpu_ms_per_saga_other > 0.1 * r.cpu_ms_per_saga_machine {
        println!(
            "  WARNING      other processes used {:.0}% of the busy CPU time: the machine was not quiet",
            100.0 * r.cpu_ms_per_saga_other / r.cpu_ms_per_saga_machine.max(1e-9)
        );
    }
    println!(
        "  memory       peak RSS {:.0} MiB (whole process: orchestrator + participants + driver), {:.0} MiB idle before the first start",
        r.peak_rss_mib, r.idle_rss_mib
    );
    println!(
        "  in flight    at most {} instances open at once ({:.0} MiB RSS when first reached)",
        r.max_in_flight, r.rss_at_max_in_flight_mib
    );
    println!(
        "  efficiency   {} of the AMQP ceiling, {} of the PostgreSQL ceiling",
        r.efficiency
            .map(|e| format!("{:.0}%", e * 100.0))
            .unwrap_or_else(|| "-".into()),
        r.db_efficiency
            .map(|e| format!("{:.0}%", e * 100.0))
            .unwrap_or_else(|| "-".into())
    );
    println!(
        "  checks       lost 0, duplicated 0, inconsistent 0; outbox left {}, timers fired {}, relayed {}, dead-lettered {}",
        r.outbox_left, r.timers_fired, r.relayed, r.dead_lettered
    );
    if r.pruned > 0 {
        println!(
            "  retention    {} finished sagas of the history pruned during the timed part",
            r.pruned
        );
    }
    println!(
        "  participants {} barrier batches, {} run again with savepoints, {} fell back to one by one",
        r.participant_batches, r.participant_batch_reruns, r.participant_batch_fallbacks
    );
    println!(
        "  orchestrator {} replies decided on cached states (one statement), {} found them stale",
        r.cached_replies, r.stale_replies
    );
    println!(
        "  driver       {} completion polls, {:.2} ms round trip, {:.3} ms execution in PostgreSQL",
        r.completion_polls, r.completion_poll_ms, r.completion_poll_server_ms
    );
}
