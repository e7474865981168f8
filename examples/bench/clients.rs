//! The load of `--topology processes`: C clients, each sending one start request at a time
//! with `?wait` and an `Idempotency-Key`, as users do, taking the orchestrators in turn.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use hdrhistogram::Histogram;
use reqwest::StatusCode;
use sagas::orchestrator::api::sagas::{IDEMPOTENCY_KEY_HEADER, MAX_WAIT_S, SagaView};
use serde_json::json;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::participants::{self, BenchInput};
use crate::run::{self, Driven};
use crate::{Args, Workload};

/// What the clients share.
struct Shared {
    http: reqwest::Client,
    bases: Vec<String>,
    definition: String,
    workload: Workload,
    n: u64,
    rate: Option<f64>,
    t0: Instant,
    /// The next saga to start.
    next: AtomicU64,
    /// Requests sent, answers received (µs since `t0` of the last one), requests awaiting
    /// their answer and the most at once.
    issued: AtomicU64,
    last_issued_us: AtomicU64,
    answered: AtomicU64,
    last_answer_us: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    /// No more starts: the time limit, or nothing answered for `--stall-secs`.
    stop: CancellationToken,
}

impl Shared {
    fn since_t0_us(&self) -> u64 {
        self.t0.elapsed().as_micros() as u64
    }
}

/// An answer to one start request.
enum Answer {
    /// 200: the saga is terminal, with this status.
    Terminal(uuid::Uuid, String),
    /// 202: the wait ran out first.
    Waiting(uuid::Uuid, String),
}

/// One start request: the saga's index, the answer, the time from sending to the answer.
type Outcome = (u64, Result<Answer>, Duration);

/// A client for `c` connections, each request waiting at most `?wait` plus some time to send
/// and answer.
pub fn http_client(c: usize) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(c)
        .timeout(Duration::from_secs(MAX_WAIT_S + 30))
        .build()?)
}

/// Starts `--sagas` sagas of `definition` through `bases` with `--concurrency` clients and
/// checks every terminal answer's status.
pub async fn drive(
    args: &Args,
    workload: Workload,
    definition: &str,
    bases: &[String],
    http: &reqwest::Client,
) -> Result<Driven> {
    let shared = Arc::new(Shared {
        http: http.clone(),
        bases: bases.to_vec(),
        definition: definition.to_owned(),
        workload,
        n: args.sagas,
        rate: args.rate,
        t0: Instant::now(),
        next: AtomicU64::new(0),
        issued: AtomicU64::new(0),
        last_issued_us: AtomicU64::new(0),
        answered: AtomicU64::new(0),
        last_answer_us: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
        max_in_flight: AtomicU64::new(0),
        stop: CancellationToken::new(),
    });
    let progress = run::progress_bar(args, workload);
    let mut clients = JoinSet::new();
    for _ in 0..args.concurrency {
        clients.spawn(client(shared.clone()));
    }
    // Watch: progress, the time limit, and a stall (no answer for `--stall-secs`).
    let deadline = shared.t0 + Duration::from_secs(args.timeout_secs);
    let stall = Duration::from_secs(args.stall_secs);
    let mut outcomes = Vec::with_capacity(args.sagas as usize);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while !clients.is_empty() {
        tokio::select! {
            Some(done) = clients.join_next() => outcomes.extend(done?),
            _ = tick.tick() => {}
        }
        if let Some(pb) = &progress {
            pb.set_position(shared.answered.load(Ordering::Relaxed));
            pb.set_message(format!("{} started", shared.issued.load(Ordering::Relaxed)));
        }
        let last = Duration::from_micros(shared.last_answer_us.load(Ordering::Relaxed));
        let now = Instant::now();
        if now >= deadline || now - (shared.t0 + last) >= stall {
            shared.stop.cancel();
        }
    }
    if let Some(pb) = progress {
        pb.finish_and_clear();
    }

    let mut driven = Driven {
        ids: HashMap::with_capacity(outcomes.len()),
        issued: shared.issued.load(Ordering::Relaxed),
        start_errors: Vec::new(),
        wrong_answers: Vec::new(),
        start_hist: Histogram::new(3)?,
        client_latency: Some(Histogram::new(3)?),
        seconds: Duration::from_micros(shared.last_answer_us.load(Ordering::Relaxed)).as_secs_f64(),
        drive_secs: Duration::from_micros(shared.last_issued_us.load(Ordering::Relaxed))
            .as_secs_f64(),
        max_in_flight: shared.max_in_flight.load(Ordering::Relaxed),
        rss_at_max_in_flight_mib: None,
    };
    outcomes.sort_by_key(|o| o.0);
    for (i, answer, took) in outcomes {
        let micros = took.as_micros() as u64;
        let _ = driven.start_hist.record(micros);
        match answer {
            Ok(Answer::Terminal(id, status)) => {
                driven.ids.insert(id, i);
                if let Some(h) = &mut driven.client_latency {
                    let _ = h.record(micros);
                }
                let want = participants::expected_status(workload, i);
                if status != want {
                    driven.wrong_answers.push(format!(
                        "saga {i} ({id}) answered {status}, expected {want}"
                    ));
                }
            }
            Ok(Answer::Waiting(id, status)) => {
                driven.ids.insert(id, i);
                driven.start_errors.push(format!(
                    "saga {i} ({id}): the wait ran out (202), still {status}"
                ));
            }
            Err(e) => driven.start_errors.push(run::start_failed(i, &e)),
        }
    }
    Ok(driven)
}

/// One client: the next saga, its request, its answer, until all are started or it is told
/// to stop.
async fn client(shared: Arc<Shared>) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    while !shared.stop.is_cancelled() {
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        if i >= shared.n {
            break;
        }
        if let Some(rate) = shared.rate {
            let at = shared.t0 + Duration::from_secs_f64(i as f64 / rate);
            tokio::select! {
                _ = tokio::time::sleep_until(at.into()) => {}
                _ = shared.stop.cancelled() => break,
            }
        }
        shared.issued.fetch_add(1, Ordering::Relaxed);
        shared
            .last_issued_us
            .fetch_max(shared.since_t0_us(), Ordering::Relaxed);
        let open = shared.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        shared.max_in_flight.fetch_max(open, Ordering::Relaxed);
        let t = Instant::now();
        let answer = start(&shared, i).await;
        let took = t.elapsed();
        shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        shared.answered.fetch_add(1, Ordering::Relaxed);
        shared
            .last_answer_us
            .fetch_max(shared.since_t0_us(), Ordering::Relaxed);
        outcomes.push((i, answer, took));
    }
    outcomes
}

/// `POST /v1/sagas/{definition}?wait=…` for saga `i`, on the orchestrators in turn.
async fn start(shared: &Shared, i: u64) -> Result<Answer> {
    let base = &shared.bases[(i % shared.bases.len() as u64) as usize];
    let input = BenchInput {
        n: i,
        fail: participants::fails(shared.workload, i),
    };
    let res = shared
        .http
        .post(run::start_url(base, &shared.definition))
        .query(&[("wait", MAX_WAIT_S)])
        .header(IDEMPOTENCY_KEY_HEADER, format!("saga-{i}"))
        .json(&json!({ "input": input }))
        .send()
        .await?;
    let status = res.status();
    if status != StatusCode::OK && status != StatusCode::ACCEPTED {
        let body = res.text().await.unwrap_or_default();
        anyhow::bail!("answered {status}: {body}");
    }
    let view: SagaView = res.json().await?;
    let state = view.status.as_str().to_owned();
    Ok(if status == StatusCode::OK {
        Answer::Terminal(view.id, state)
    } else {
        Answer::Waiting(view.id, state)
    })
}
