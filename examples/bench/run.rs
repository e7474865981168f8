//! One workload: fresh databases and AMQP names, the run in the chosen topology
//! (`inprocess` or `processes`), then, once everything the run started is stopped, the checks
//! and the counters, the same for both.

use sagas::participant::config::database_options;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use lapin::{Connection, ConnectionProperties};
use sagas::orchestrator::Engine;
use sagas::orchestrator::store::PgStore;
use sagas::participant::Topology;
use sagas::participant::amqp::{
    QueueOptions, declare_participant, declare_replies, delete_topology,
};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection as _, PgConnection, PgPool};
use uuid::Uuid;

use crate::ceilings::{BareStatements, Ceilings};
use crate::env::{self, Scratch, Urls};
use crate::participants::{self, Row};
use crate::prefill::PrefillReport;
use crate::sys::CpuSnapshot;
use crate::{Args, Layout, Via, Workload};

/// Everything measured for one workload.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadResult {
    pub workload: Workload,
    /// `ok`, or `FAILURE` when a saga was lost, duplicated or left inconsistent, or a start failed.
    pub status: &'static str,
    pub failures: Vec<String>,
    /// Where the parts ran (`--topology`).
    pub topology: Layout,
    /// Orchestrator processes (1 in process).
    pub orchestrators: usize,
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
    /// What `p50_ms`..`max_ms` measure: `created_to_terminal` (in process: the instance row's
    /// terminal transition time minus its creation time, see docs) or `client` (processes:
    /// from sending the start request with `?wait` to its terminal answer, at the client).
    pub latency_from: &'static str,
    /// End-to-end latency.
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// With processes: the created → terminal latency from the instance rows, as in process.
    pub created_to_terminal_p50_ms: Option<f64>,
    pub created_to_terminal_p99_ms: Option<f64>,
    /// Latency of the start call itself as the driver saw it (HTTP or `Engine::start`; with
    /// processes, the whole call with its wait).
    pub start_p50_ms: f64,
    pub start_p99_ms: f64,
    pub lost: u64,
    pub duplicated: u64,
    pub inconsistent: u64,
    /// Start calls that failed (with processes, also the answers 202: the wait ran out).
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
    /// CPU milliseconds per saga: this process (in process: orchestrator + participants +
    /// driver; with processes: the clients), PostgreSQL, RabbitMQ, and the machine's busy time.
    pub cpu_ms_per_saga_bench: f64,
    pub cpu_ms_per_saga_postgres: f64,
    pub cpu_ms_per_saga_rabbitmq: f64,
    pub cpu_ms_per_saga_machine: f64,
    /// With processes: the orchestrator processes and the participant processes (sums).
    pub cpu_ms_per_saga_orchestrators: Option<f64>,
    pub cpu_ms_per_saga_participants: Option<f64>,
    /// Every group above together (this process, its children, PostgreSQL, RabbitMQ).
    pub cpu_ms_per_saga_all: f64,
    /// Busy time of everything else on the machine (other users' builds, ...), per saga.
    pub cpu_ms_per_saga_other: f64,
    /// Machine busy time / (cores × wall time) during the run.
    pub machine_utilisation: f64,
    /// Context switches per saga (`sys.rs`): this process, PostgreSQL (the backends alive at
    /// the end), RabbitMQ, the machine; with processes, the orchestrators' and participants'.
    pub switches_per_saga_bench: f64,
    pub switches_per_saga_postgres: f64,
    pub switches_per_saga_rabbitmq: f64,
    pub switches_per_saga_machine: f64,
    pub switches_per_saga_orchestrators: Option<f64>,
    pub switches_per_saga_participants: Option<f64>,
    /// Peak resident memory of this process during the workload (MiB): in process, the
    /// orchestrator, participants and driver together, so an upper bound of the
    /// orchestrator's; with processes, the clients.
    pub peak_rss_mib: f64,
    /// Resident memory of this process right before the first start, everything set up and
    /// idle (MiB).
    pub idle_rss_mib: f64,
    /// With processes: peak resident memory of each orchestrator and each participant process
    /// during the workload (MiB).
    pub peak_rss_mib_orchestrators: Vec<f64>,
    pub peak_rss_mib_participants: Vec<f64>,
    /// Most sagas open at once: in process, instances started and not terminal as the
    /// completion poll counted them; with processes, requests awaiting their answer.
    pub max_in_flight: u64,
    /// In process: resident memory when that maximum was first seen (MiB).
    pub rss_at_max_in_flight_mib: Option<f64>,
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
    /// At concurrency 1 only: the saga's commits and messages one after the other, each at the
    /// speed of the ceilings measured in the same run ([`serial_floor_ms`]), in ms.
    pub serial_floor_ms: Option<f64>,
    /// At concurrency 1: the p50 latency over [`WorkloadResult::serial_floor_ms`].
    pub p50_over_floor: Option<f64>,
    /// At concurrency 1: the p99 latency over [`WorkloadResult::serial_floor_ms`].
    pub p99_over_floor: Option<f64>,
    /// At concurrency 1 only: the saga's chain of statements and messages, each at one bare
    /// client's speed measured in the same run ([`chain_floor_ms`]), in ms.
    pub chain_floor_ms: Option<f64>,
    /// At concurrency 1: the p50 latency over [`WorkloadResult::chain_floor_ms`].
    pub p50_over_chain: Option<f64>,
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
    /// (`PgStore::state_cache`; with processes, `sagas_state_cache_total{result="hit"}`).
    pub cached_replies: u64,
    /// Replies whose cached state had moved on, decided again under the lock.
    pub stale_replies: u64,
    /// Replies decided on stored states, with their states cached, while guessing paused.
    pub skipped_replies: u64,
    /// `stale / (cached + stale)`, when there was any.
    pub stale_share: Option<f64>,
    /// The same per orchestrator process.
    pub state_cache_by_orchestrator: Vec<StateCache>,
    pub completion_polls: u64,
    /// Mean round trip of one completion poll as the driver saw it (an upper bound of its
    /// cost in PostgreSQL).
    pub completion_poll_ms: f64,
    /// Mean execution time of the poll query inside PostgreSQL (EXPLAIN ANALYZE of every 50th).
    pub completion_poll_server_ms: f64,
}

/// How one orchestrator's state cache fared during the timed part.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StateCache {
    /// Replies decided on a cached state and written with one statement.
    pub hits: u64,
    /// Replies whose cached state had moved on.
    pub stale: u64,
    /// Replies decided on stored states because guessing had paused (too many stale).
    pub skipped: u64,
}

impl StateCache {
    /// `stale / (hits + stale)`, if there was any.
    pub fn stale_share(&self) -> Option<f64> {
        let all = self.hits + self.stale;
        (all > 0).then(|| self.stale as f64 / all as f64)
    }
}

/// The URL that starts an instance of `definition` on the API at `base`.
pub fn start_url(base: &str, definition: &str) -> String {
    format!("{base}/v1/sagas/{definition}")
}

/// The line that reports a failed start of saga `i`.
pub fn start_failed(i: u64, e: &anyhow::Error) -> String {
    format!("start failed: saga {i}: {e:#}")
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
                    .post(start_url(url, definition))
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

/// Where a workload runs: its databases and AMQP names.
pub struct Place<'a> {
    pub urls: &'a Urls,
    pub orch: &'a Scratch,
    pub part: &'a Scratch,
    pub topology: &'a Topology,
}

/// Runs one workload end to end and returns its measurements.
pub async fn run(
    args: &Args,
    urls: &Urls,
    tag: &str,
    workload: Workload,
    ceilings: Option<&Ceilings>,
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
    let place = Place {
        urls,
        orch: &orch,
        part: &part,
        topology: &topology,
    };
    let result = async {
        let measured = match args.topology {
            Layout::InProcess => crate::inprocess::run(args, &place, workload).await?,
            Layout::Processes => crate::processes::run(args, &place, workload).await?,
        };
        finish(args, &place, workload, measured, ceilings).await
    }
    .await;
    // Clean up whatever happened.
    let names = participants::names(workload, args.steps);
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

/// How every queue of a run is declared: leftovers of a crashed run vanish after 10 minutes
/// (a normal run deletes its topology).
pub fn queue_options() -> QueueOptions {
    QueueOptions {
        quorum: false,
        expires: Some(Duration::from_secs(600)),
    }
}

/// Creates both schemas, through pools that are closed before the baseline is read (a backend
/// reports its transaction counts when it exits), and declares the participants' queues and
/// the replies queue, so that commands and replies published from the first start on are
/// routed.
pub async fn prepare(place: &Place<'_>, names: &[String]) -> Result<()> {
    let setup = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(database_options(&place.orch.url)?)
        .await?;
    PgStore::new(setup.clone()).migrate().await?;
    setup.close().await;
    let setup = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(database_options(&place.part.url)?)
        .await?;
    participants::install(&setup).await?;
    setup.close().await;
    let conn = Connection::connect(&place.urls.amqp, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    for p in names {
        declare_participant(&ch, place.topology, p, &queue_options()).await?;
    }
    declare_replies(&ch, place.topology, &queue_options()).await?;
    let _ = conn.close(200, "declared".into()).await;
    Ok(())
}

/// A progress bar on stderr, when it is a terminal.
pub fn progress_bar(args: &Args, workload: Workload) -> Option<ProgressBar> {
    if !args.progress {
        return None;
    }
    let pb = ProgressBar::new(args.sagas);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} done, {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_prefix(workload.as_str());
    Some(pb)
}

/// The database counters before the timed part.
pub struct Baseline {
    admin: PgPool,
    writes: HashMap<String, (i64, i64, i64)>,
    xact_orch: i64,
    xact_part: i64,
    wal: (i64, i64, i64, i64),
}

impl Baseline {
    /// Reads them now.
    pub async fn take(place: &Place<'_>) -> Result<Baseline> {
        let writes = table_writes(place.orch, place.part).await?;
        let admin = place.urls.admin_pool().await?;
        Ok(Baseline {
            xact_orch: env::xact_commit(&admin, &place.orch.name).await?,
            xact_part: env::xact_commit(&admin, &place.part.name).await?,
            wal: env::wal(&admin).await?,
            writes,
            admin,
        })
    }
}

/// What the driver saw.
pub struct Driven {
    /// Every instance started (the start call gave its id), with the saga's index.
    pub ids: HashMap<Uuid, u64>,
    /// Start calls made.
    pub issued: u64,
    /// Start calls that failed (with processes, also answers 202), one line each.
    pub start_errors: Vec<String>,
    /// Answers whose terminal status was not the expected one (processes), one line each.
    pub wrong_answers: Vec<String>,
    /// Time of each start call (µs).
    pub start_hist: Histogram<u64>,
    /// With processes: request sent → terminal answer (µs), the latency reported.
    pub client_latency: Option<Histogram<u64>>,
    /// Wall time from the first start to the last terminal saga seen (or to giving up).
    pub seconds: f64,
    /// Wall time spent issuing the starts.
    pub drive_secs: f64,
    pub max_in_flight: u64,
    pub rss_at_max_in_flight_mib: Option<f64>,
}

/// What the orchestrator(s) and the participants counted during the timed part.
#[derive(Debug, Default)]
pub struct Counted {
    pub timers_fired: u64,
    pub relayed: u64,
    pub dead_lettered: u64,
    pub pruned: u64,
    pub wire_commands: u64,
    pub wire_replies: u64,
    pub participant_batches: u64,
    pub participant_batch_reruns: u64,
    pub participant_batch_fallbacks: u64,
    /// Per orchestrator.
    pub state_cache: Vec<StateCache>,
    /// Statements of the completion poll (subtracted from the orchestrator's transactions).
    pub completion_polls: u64,
    pub completion_poll_ms: f64,
    pub completion_poll_server_ms: f64,
}

/// Resident memory (MiB).
#[derive(Debug, Default)]
pub struct Memory {
    /// This process: peak during the timed part, and before it.
    pub peak_rss_mib: f64,
    pub idle_rss_mib: f64,
    /// Peak of each orchestrator and participant process (processes).
    pub orchestrators: Vec<f64>,
    pub participants: Vec<f64>,
}

/// What a run hands to [`finish`] once everything it started is stopped.
pub struct Measured {
    pub baseline: Baseline,
    /// Every prefilled id sorts before it (nil without a prefill).
    pub boundary: Uuid,
    pub prefill: Option<PrefillReport>,
    pub driven: Driven,
    pub counted: Counted,
    pub memory: Memory,
    /// CPU at the first start and when the last saga was seen terminal (PostgreSQL's is read
    /// again once the pools are closed: exited backends count then).
    pub cpu_0: CpuSnapshot,
    pub cpu_1: CpuSnapshot,
    pub orchestrators: usize,
}

/// Reads the counters back once every pool is closed, checks every saga's end state and
/// effects, and assembles the result.
async fn finish(
    args: &Args,
    place: &Place<'_>,
    workload: Workload,
    m: Measured,
    ceilings: Option<&Ceilings>,
) -> Result<WorkloadResult> {
    let amqp_ceiling = ceilings.map(|c| c.amqp_round_trips_per_s);
    let pg_ceiling = ceilings.map(|c| c.pg_commits_per_s);
    let (orch, part) = (place.orch, place.part);
    let n = args.sagas;
    let steps = args.steps;
    let Measured {
        baseline,
        boundary,
        prefill,
        driven,
        counted,
        memory,
        cpu_0,
        cpu_1,
        orchestrators,
    } = m;
    // Backends report their counts when they exit.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let admin = &baseline.admin;
    let polls = counted.completion_polls;
    let xact_orch = env::xact_commit(admin, &orch.name).await? - baseline.xact_orch - polls as i64;
    let xact_part = env::xact_commit(admin, &part.name).await? - baseline.xact_part;
    let wal_1 = env::wal(admin).await?;
    let wal_0 = baseline.wal;
    let cpu_2 = CpuSnapshot::take();
    baseline.admin.close().await;
    let run_cpu = cpu_0.until(&cpu_1);
    let pg_cpu = cpu_0.until(&cpu_2).cpu.postgres;

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
    let ids = &driven.ids;
    let ok_starts = ids.len() as u64;
    let mut rows_per_saga = BTreeMap::new();
    for (table, (ins, upd, del)) in table_writes(orch, part).await? {
        let (ins_0, upd_0, del_0) = baseline.writes.get(&table).copied().unwrap_or_default();
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
    for (what, list) in [
        ("start failures", &driven.start_errors),
        ("unexpected answers", &driven.wrong_answers),
    ] {
        for e in list.iter().take(5) {
            failures.push(e.clone());
        }
        if list.len() > 5 {
            failures.push(format!("... {} {what} in all", list.len()));
        }
    }
    let issued = driven.issued;
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
                let want = participants::expected_status(workload, i);
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
    let ms_per = |secs: f64| per(secs) * 1000.0;
    let ev: BTreeMap<String, i64> = events.into_iter().collect();
    let count = |k: &str| ev.get(k).copied().unwrap_or(0) as f64;
    let commands = count("dispatched");
    let replies = count("replied") + count("reply_ignored");
    let messages_per_saga = per(commands + replies);
    let ok = failures.is_empty();
    let sagas_per_s = ok.then(|| ok_starts as f64 / driven.seconds);
    let db_xacts = per((xact_orch + xact_part) as f64);
    let ms = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p) as f64 / 1000.0;
    let floor = match (amqp_ceiling, pg_ceiling) {
        (Some(amqp), Some(pg)) if args.concurrency == 1 => {
            serial_floor_ms(messages_per_saga, pg, amqp)
        }
        _ => None,
    };
    let chain = match (amqp_ceiling, ceilings.and_then(|c| c.bare)) {
        (Some(amqp), Some(bare)) if args.concurrency == 1 => {
            chain_floor_ms(messages_per_saga, per(commands), bare, amqp)
        }
        _ => None,
    };
    // The latency reported: the client's with processes, the instance rows' in process.
    let reported = driven.client_latency.as_ref().unwrap_or(&latency);
    let q = |p: f64| ok.then(|| ms(reported, p));
    let (p50, p99) = (q(0.50), q(0.99));
    let created_q = |p: f64| (ok && driven.client_latency.is_some()).then(|| ms(&latency, p));
    let all_cpu = run_cpu.cpu.ours() - run_cpu.cpu.postgres + pg_cpu;
    let has_children = args.topology == Layout::Processes;
    let cache = counted
        .state_cache
        .iter()
        .fold(StateCache::default(), |a, c| StateCache {
            hits: a.hits + c.hits,
            stale: a.stale + c.stale,
            skipped: a.skipped + c.skipped,
        });
    Ok(WorkloadResult {
        workload,
        status: if ok { "ok" } else { "FAILURE" },
        failures,
        topology: args.topology,
        orchestrators,
        via: args.via,
        sagas: n,
        concurrency: args.concurrency,
        steps,
        rate: args.rate,
        start_rate: issued as f64 / driven.drive_secs.max(1e-9),
        seconds: driven.seconds,
        sagas_per_s,
        latency_from: if driven.client_latency.is_some() {
            "client"
        } else {
            "created_to_terminal"
        },
        p50_ms: p50,
        p95_ms: q(0.95),
        p99_ms: p99,
        max_ms: ok.then(|| reported.max() as f64 / 1000.0),
        created_to_terminal_p50_ms: created_q(0.50),
        created_to_terminal_p99_ms: created_q(0.99),
        start_p50_ms: ms(&driven.start_hist, 0.50),
        start_p99_ms: ms(&driven.start_hist, 0.99),
        lost,
        duplicated,
        inconsistent,
        start_errors: driven.start_errors.len() as u64,
        completed,
        compensated,
        messages_per_saga,
        commands_per_saga: per(commands),
        replies_per_saga: per(replies),
        wire_commands_per_saga: per(counted.wire_commands as f64),
        wire_replies_per_saga: per(counted.wire_replies as f64),
        orchestrator_xacts_per_saga: per(xact_orch as f64),
        participant_xacts_per_saga: per(xact_part as f64),
        db_xacts_per_saga: db_xacts,
        wal_bytes_per_saga: per((wal_1.1 - wal_0.1) as f64),
        wal_records_per_saga: per((wal_1.0 - wal_0.0) as f64),
        wal_syncs_per_saga: per((wal_1.2 - wal_0.2) as f64),
        wal_fpi_per_saga: per((wal_1.3 - wal_0.3) as f64),
        cpu_ms_per_saga_bench: ms_per(run_cpu.cpu.bench),
        cpu_ms_per_saga_postgres: ms_per(pg_cpu),
        cpu_ms_per_saga_rabbitmq: ms_per(run_cpu.cpu.rabbitmq),
        cpu_ms_per_saga_machine: ms_per(run_cpu.cpu.machine),
        cpu_ms_per_saga_orchestrators: has_children.then(|| ms_per(run_cpu.cpu.orchestrators)),
        cpu_ms_per_saga_participants: has_children.then(|| ms_per(run_cpu.cpu.participants)),
        cpu_ms_per_saga_all: ms_per(all_cpu),
        cpu_ms_per_saga_other: ms_per((run_cpu.cpu.machine - all_cpu).max(0.0)),
        machine_utilisation: if run_cpu.machine_total > 0.0 {
            run_cpu.cpu.machine / run_cpu.machine_total
        } else {
            0.0
        },
        switches_per_saga_bench: per(run_cpu.switches.bench),
        switches_per_saga_postgres: per(run_cpu.switches.postgres),
        switches_per_saga_rabbitmq: per(run_cpu.switches.rabbitmq),
        switches_per_saga_machine: per(run_cpu.switches.machine),
        switches_per_saga_orchestrators: has_children.then(|| per(run_cpu.switches.orchestrators)),
        switches_per_saga_participants: has_children.then(|| per(run_cpu.switches.participants)),
        peak_rss_mib: memory.peak_rss_mib,
        idle_rss_mib: memory.idle_rss_mib,
        peak_rss_mib_orchestrators: memory.orchestrators,
        peak_rss_mib_participants: memory.participants,
        max_in_flight: driven.max_in_flight,
        rss_at_max_in_flight_mib: driven.rss_at_max_in_flight_mib,
        start_calls: args.start_calls(),
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
        serial_floor_ms: floor,
        p50_over_floor: floor.zip(p50).map(|(f, p)| p / f),
        p99_over_floor: floor.zip(p99).map(|(f, p)| p / f),
        chain_floor_ms: chain,
        p50_over_chain: chain.zip(p50).map(|(f, p)| p / f),
        events: ev,
        rows_per_saga,
        outbox_left,
        timers_fired: counted.timers_fired,
        relayed: counted.relayed,
        dead_lettered: counted.dead_lettered,
        pruned: counted.pruned,
        participant_batches: counted.participant_batches,
        participant_batch_reruns: counted.participant_batch_reruns,
        participant_batch_fallbacks: counted.participant_batch_fallbacks,
        cached_replies: cache.hits,
        stale_replies: cache.stale,
        skipped_replies: cache.skipped,
        stale_share: cache.stale_share(),
        state_cache_by_orchestrator: counted.state_cache,
        completion_polls: polls,
        completion_poll_ms: counted.completion_poll_ms,
        completion_poll_server_ms: counted.completion_poll_server_ms,
    })
}

/// The least time a saga of `messages` AMQP messages (commands and replies) can take at
/// concurrency 1 on this machine, in ms: its commits and messages one after the other, each
/// at the speed of the ceilings measured at concurrency 1 (`pg_commits_per_s` single-row
/// commits, `amqp_round_trips_per_s` publish-to-consume round trips). The commits are the
/// start's and one per message: every command is committed by its participant's barrier
/// before it is answered, every reply by the transition it causes before its next command
/// goes out. `None` without both ceilings.
pub fn serial_floor_ms(
    messages: f64,
    pg_commits_per_s: f64,
    amqp_round_trips_per_s: f64,
) -> Option<f64> {
    (pg_commits_per_s > 0.0 && amqp_round_trips_per_s > 0.0)
        .then(|| 1000.0 * ((1.0 + messages) / pg_commits_per_s + messages / amqp_round_trips_per_s))
}

/// Statements a participant's transaction runs for a lone command besides its `COMMIT`: the
/// barrier's claim (sent with the `BEGIN`), the bench handler's one statement, and the reply.
pub const PARTICIPANT_STATEMENTS_PER_COMMAND: f64 = 3.0;

/// The chain a saga of `messages` AMQP messages, `commands` of them commands, runs at
/// concurrency 1, in ms: every step of it waits for the one before, so nothing in it
/// overlaps. Its commits as in [`serial_floor_ms`] and each of
/// [`PARTICIPANT_STATEMENTS_PER_COMMAND`] at `bare`'s speed (one client on a connection outside
/// any pool: PostgreSQL's own time per statement), and its messages at the AMQP ceiling's.
/// Left out, so that the chain stays below what the saga can take: the HTTP request, and all
/// work of the orchestrator and the participants other than waiting for those.
pub fn chain_floor_ms(
    messages: f64,
    commands: f64,
    bare: BareStatements,
    amqp_round_trips_per_s: f64,
) -> Option<f64> {
    (amqp_round_trips_per_s > 0.0).then(|| {
        (1.0 + messages) * bare.commit_ms
            + commands * PARTICIPANT_STATEMENTS_PER_COMMAND * bare.statement_ms
            + 1000.0 * messages / amqp_round_trips_per_s
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

#[cfg(test)]
mod tests {
    use super::{chain_floor_ms, serial_floor_ms};
    use crate::ceilings::BareStatements;

    #[test]
    fn the_chain_of_a_three_step_saga_is_seven_commits_nine_statements_and_six_messages() {
        let bare = BareStatements {
            commit_ms: 0.3,
            statement_ms: 0.1,
        };
        // 1,000 round trips/s: 1 ms a message.
        let chain = chain_floor_ms(6.0, 3.0, bare, 1000.0).expect("an AMQP ceiling");
        assert!(
            (chain - (7.0 * 0.3 + 9.0 * 0.1 + 6.0)).abs() < 1e-9,
            "{chain}"
        );
        assert_eq!(chain_floor_ms(6.0, 3.0, bare, 0.0), None);
    }

    #[test]
    fn the_serial_floor_of_a_three_step_saga_is_seven_commits_and_six_messages() {
        // 2,000 commits/s (0.5 ms each) and 1,000 round trips/s (1 ms each).
        let floor = serial_floor_ms(6.0, 2000.0, 1000.0).expect("both ceilings");
        assert!((floor - (7.0 * 0.5 + 6.0 * 1.0)).abs() < 1e-9, "{floor}");
    }

    #[test]
    fn there_is_no_serial_floor_without_both_ceilings() {
        assert_eq!(serial_floor_ms(6.0, 0.0, 1000.0), None);
        assert_eq!(serial_floor_ms(6.0, 2000.0, 0.0), None);
    }
}
