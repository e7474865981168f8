//! The benchmark: throughput, latency and cost of sagas against real PostgreSQL and RabbitMQ,
//! next to the machine's ceilings measured in the same run.
//!
//! ```text
//! cargo run --release --example bench -- --workload happy --sagas 10000 --concurrency 64
//! cargo run --release --example bench -- --workload all --json
//! cargo run --release --example bench -- --workload happy --sagas 3000 --prefill-events 1000000
//! ```
//!
//! By default everything runs in this one process: the engine (built like `server::engine`),
//! its HTTP API, one participant per step (the participant SDK with the barrier) and the load
//! driver. With `--topology processes`, as users run it: orchestrator processes built as
//! `sagad` builds its own, one process per participant, and this process as the clients,
//! which wait for every saga's outcome (`?wait`); the processes are this binary again, in a
//! hidden `--role`. Each workload gets fresh scratch databases (`sagas_bench_*`, dropped at the
//! end) and its own AMQP prefix (deleted at the end). See docs/performance.md for the method
//! and numbers.
//!
//! ```text
//! cargo run --release --example bench -- --topology processes --orchestrators 2 --workload happy
//! ```

mod ceilings;
mod clients;
mod env;
mod fleet;
mod inprocess;
mod output;
mod participants;
mod prefill;
mod processes;
mod roles;
mod run;
mod scrape;
mod sys;

use std::collections::BTreeSet;
use std::io::IsTerminal;

use anyhow::Result;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};
use serde::Serialize;

use crate::ceilings::Ceilings;
use crate::env::Urls;
use crate::fleet::Settings;
use crate::roles::Role;
use crate::run::WorkloadResult;
use sagas::orchestrator::transport::CommandBatch;

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

/// Where the parts run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// Engine, HTTP API, participants and load driver in this process.
    InProcess,
    /// Orchestrator processes as `sagad`, one process per participant, this one as the clients.
    Processes,
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

/// The least length of `--half-peak`'s paced run, in seconds: long enough for its p99 to hold
/// a few hundred sagas at any rate this machine reaches.
pub const HALF_PEAK_SECS: f64 = 20.0;

/// Benchmark of the sagas orchestrator against local PostgreSQL and RabbitMQ.
#[derive(Debug, Clone, Parser)]
#[command(name = "bench")]
pub struct Args {
    /// Which workload(s) to run.
    #[arg(long, value_enum, default_value_t = Which::All)]
    workload: Which,
    /// Where the parts run: all in this process, or as users run them (orchestrator processes
    /// built as `sagad`, one process per participant, this process as clients that wait for
    /// each saga's outcome). With `processes`, the settings of the processes are the defaults
    /// (or this environment's `SAGAS_*` variables) except the ones given on the command line.
    #[arg(long, value_enum, default_value_t = Layout::InProcess)]
    pub topology: Layout,
    /// Orchestrator processes (`--topology processes`); the clients take them in turn.
    #[arg(long = "orchestrators", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=8))]
    orchestrators_arg: u16,
    #[arg(skip)]
    pub orchestrators: usize,
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
    /// After each workload's run, run it again paced at half the rate it reached (for at least
    /// 20 s: `--sagas` or more), and report both: the latency at half the peak.
    #[arg(long, conflicts_with = "rate")]
    pub half_peak: bool,
    /// Print one JSON document instead of text.
    #[arg(long)]
    json: bool,
    /// Length of each ceiling measurement, in seconds.
    #[arg(long, default_value_t = 5.0)]
    ceiling_secs: f64,
    /// Do not measure the ceilings (no efficiency ratios then).
    #[arg(long)]
    skip_ceilings: bool,
    /// Orchestrator database pool size (`SAGAS_DB_POOL`; its default).
    #[arg(long, default_value_t = sagas::orchestrator::config::DEFAULT_DB_POOL)]
    pub db_pool: u32,
    /// Database pool size of each participant (it runs up to 16 handlers at once); with
    /// processes, `SAGAS_PARTICIPANT_DB_POOL` when given (its default: the concurrency + 1).
    #[arg(long, default_value_t = 16)]
    pub participant_pool: u32,
    /// Handler slots of each participant (`Participant::concurrency`, with processes
    /// `SAGAS_PARTICIPANT_CONCURRENCY`; a slot holds one message, or the several messages
    /// taken together).
    #[arg(long, default_value_t = sagas::participant::runtime::DEFAULT_CONCURRENCY)]
    pub participant_concurrency: usize,
    /// Reply batches the orchestrator commits at once (`EngineConfig::reply_concurrency`; in
    /// process only: `sagad` has no such setting).
    #[arg(long, default_value_t = sagas::orchestrator::EngineConfig::default().reply_concurrency)]
    pub reply_slots: usize,
    /// Interval of the completion poll (one `count(*)` of open instances), in milliseconds
    /// (in process only: with processes, each answer says its saga finished).
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
    /// finished sagas to delete (with processes, as often as `sagad` looks: every minute):
    /// with --prefill-events, the history older than this is pruned while the workload runs.
    /// Keep it longer than the run, or the run's own sagas go too.
    #[arg(long)]
    pub retention_secs: Option<u64>,
    /// Start calls in flight at most (HTTP requests or `Engine::start` calls); the in-flight
    /// limit still applies [default: the concurrency, at most 512] (in process only: with
    /// processes, each client makes one call at a time).
    #[arg(long = "start-calls")]
    start_calls_arg: Option<usize>,
    /// Per-attempt timeout of every step, in seconds [default: the definition default, 10 s];
    /// raise it when commands queue longer than that (large --concurrency, slow participants).
    #[arg(long)]
    pub step_timeout_secs: Option<u64>,
    /// Most commands per AMQP message (`SAGAS_AMQP_COMMAND_BATCH`): 1 sends each command
    /// alone, more forces batches of up to that many [default: automatic, as in sagad: batches
    /// to participants whose replies announce them, which the bench's do].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub command_batch: Option<u16>,
    /// Keep the scratch databases (for inspection).
    #[arg(long)]
    pub keep: bool,
    #[arg(skip)]
    pub progress: bool,
    /// The role of a process started by `--topology processes`.
    #[arg(long, value_enum, hide = true)]
    role: Option<Role>,
    /// The participant a `--role participant` process serves.
    #[arg(long, hide = true)]
    pub participant: Option<String>,
    /// The arguments given on the command line (by id), as opposed to defaults.
    #[arg(skip)]
    given: BTreeSet<String>,
}

impl Args {
    /// The command batches the orchestrator sends: the flag's, else the default.
    pub fn command_batch(&self) -> CommandBatch {
        self.command_batch
            .map_or_else(CommandBatch::default, |n| usize::from(n).into())
    }

    /// These arguments paced at half of `peak` sagas/s, for at least
    /// [`HALF_PEAK_SECS`] (`--half-peak`'s second run).
    pub fn at_half(&self, peak: f64) -> Args {
        let rate = peak / 2.0;
        Args {
            rate: Some(rate),
            sagas: self.sagas.max((rate * HALF_PEAK_SECS).ceil() as u64),
            half_peak: false,
            ..self.clone()
        }
    }

    /// Start calls allowed in flight at once.
    pub fn start_calls(&self) -> usize {
        match self.topology {
            Layout::InProcess => self
                .start_calls_arg
                .unwrap_or(self.concurrency.min(512))
                .max(1),
            Layout::Processes => self.concurrency,
        }
    }

    /// Whether the argument `id` (a field name) was given on the command line.
    pub fn given(&self, id: &str) -> bool {
        self.given.contains(id)
    }

    /// The workloads to run, in order.
    pub fn workloads(&self) -> Vec<Workload> {
        match self.workload {
            Which::Happy => vec![Workload::Happy],
            Which::Compensate => vec![Workload::Compensate],
            Which::Tcc => vec![Workload::Tcc],
            Which::All => vec![Workload::Happy, Workload::Compensate, Workload::Tcc],
        }
    }

    /// Refuses what does not apply to the topology.
    fn check_topology(&self) -> Result<()> {
        match self.topology {
            Layout::InProcess => anyhow::ensure!(
                self.orchestrators == 1,
                "--orchestrators needs --topology processes (in process there is one engine)"
            ),
            Layout::Processes => {
                anyhow::ensure!(
                    self.via == Via::Http,
                    "--via engine needs --topology in-process: with processes the clients start \
                     sagas over HTTP"
                );
                for (id, flag, why) in [
                    (
                        "start_calls_arg",
                        "--start-calls",
                        "each client makes one call at a time; --concurrency sets the calls",
                    ),
                    (
                        "poll_ms",
                        "--poll-ms",
                        "there is no completion poll: each answer says its saga finished",
                    ),
                    (
                        "reply_slots",
                        "--reply-slots",
                        "the orchestrators run with sagad's engine settings, which have no such variable",
                    ),
                ] {
                    anyhow::ensure!(
                        !self.given(id),
                        "{flag} does not apply to --topology processes: {why}"
                    );
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Serialize)]
struct Report {
    setup: &'static str,
    topology: Layout,
    orchestrators: usize,
    /// With processes: the settings they ran with.
    settings: Option<Settings>,
    cores: usize,
    via: Via,
    command_batch: String,
    ceilings: Option<Ceilings>,
    workloads: Vec<WorkloadResult>,
    ok: bool,
}

impl Layout {
    /// What runs where, for the report.
    fn setup(self) -> &'static str {
        match self {
            Layout::InProcess => {
                "in-process: orchestrator engine + HTTP API + participants + load driver in \
                 one process; PostgreSQL and RabbitMQ local"
            }
            Layout::Processes => {
                "processes: orchestrator process(es) built as sagad, one process per \
                 participant, this process as clients that start each saga with ?wait; \
                 PostgreSQL and RabbitMQ local"
            }
        }
    }
}

#[tokio::main]
async fn main() {
    let matches = Args::command().get_matches();
    let mut args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    args.given = matches
        .ids()
        .filter(|id| matches.value_source(id.as_str()) == Some(ValueSource::CommandLine))
        .map(|id| id.to_string())
        .collect();
    args.steps = usize::from(args.steps_arg);
    args.orchestrators = usize::from(args.orchestrators_arg);
    args.progress = !args.json && std::io::stderr().is_terminal();
    init_tracing();
    if let Some(role) = args.role {
        if let Err(e) = roles::run(role, &args).await {
            eprintln!("bench {}: {e:#}", role.as_str());
            std::process::exit(2);
        }
        return;
    }
    match main_inner(&args).await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            std::process::exit(2);
        }
    }
}

/// Logs to stderr (`RUST_LOG`, default `error`), in every role: a participant's stdout carries
/// its report.
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

async fn main_inner(args: &Args) -> Result<bool> {
    args.check_topology()?;
    anyhow::ensure!(args.sagas > 0, "--sagas must be positive");
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be positive");
    anyhow::ensure!(args.rate.is_none_or(|r| r > 0.0), "--rate must be positive");
    anyhow::ensure!(
        args.skip_ceilings || args.concurrency <= 90,
        "the PostgreSQL ceiling opens --concurrency connections: above 90, pass --skip-ceilings"
    );
    let urls = Urls {
        admin: std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
        amqp: std::env::var("AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
    };
    let settings = match args.topology {
        Layout::InProcess => None,
        Layout::Processes => Some(Settings::effective(args, &urls)?),
    };
    // The pools of every orchestrator and participant, at once.
    let (pool, orchestrator_pools, participant_pool) = match &settings {
        None => ("--db-pool", args.db_pool, args.participant_pool),
        Some(s) => (
            "--orchestrators x --db-pool",
            s.orchestrator.db_pool * args.orchestrators as u32,
            s.participant.db_pool,
        ),
    };
    anyhow::ensure!(
        u64::from(orchestrator_pools) + u64::from(participant_pool) * args.steps as u64 <= 90,
        "{pool} + --steps x --participant-pool ({orchestrator_pools} + {} x {participant_pool}) \
         must stay under PostgreSQL's default 100 connections (at most 90)",
        args.steps
    );
    let command_batch = settings
        .as_ref()
        .map_or(args.command_batch(), |s| s.orchestrator.command_batch)
        .to_string();
    let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    if !args.json {
        println!(
            "sagas bench ({}; {} cores; command batches: {command_batch})",
            args.topology.setup(),
            sys::cores(),
        );
        if let Some(s) = &settings {
            output::print_settings(s);
        }
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
            if let Some(bare) = c.bare {
                println!(
                    "  one client on a bare connection: {:.3} ms a commit, {:.3} ms a statement",
                    bare.commit_ms, bare.statement_ms
                );
            }
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
    for w in args.workloads() {
        let mut runs = vec![args.clone()];
        while let Some(run_args) = runs.pop() {
            let r = run::run(&run_args, &urls, &tag, w, ceilings.as_ref()).await?;
            if !args.json {
                output::print_text(&r);
            }
            if let Some(peak) = r.sagas_per_s.filter(|_| run_args.half_peak) {
                runs.push(run_args.at_half(peak));
            }
            results.push(r);
        }
    }
    let ok = results.iter().all(|r| r.status == "ok");
    if args.json {
        let report = Report {
            setup: args.topology.setup(),
            topology: args.topology,
            orchestrators: args.orchestrators,
            settings,
            cores: sys::cores(),
            via: args.via,
            command_batch,
            ceilings,
            workloads: results,
            ok,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_the_peak_is_paced_at_half_its_rate_for_at_least_twenty_seconds() {
        let args = Args::parse_from(["bench", "--sagas", "3000", "--half-peak"]);
        let slow = args.at_half(200.0);
        assert_eq!(slow.rate, Some(100.0));
        assert_eq!(slow.sagas, 3000, "30 s at 100/s already");
        assert!(!slow.half_peak, "its own run is not halved again");
        let quick = args.at_half(1000.0);
        assert_eq!((quick.rate, quick.sagas), (Some(500.0), 10_000));
    }

    #[test]
    fn half_the_peak_and_a_rate_of_ones_own_are_refused_together() {
        let both = Args::try_parse_from(["bench", "--half-peak", "--rate", "100"]);
        assert!(both.is_err());
    }
}
