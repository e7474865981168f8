//! The quickstart, with no database server and no broker: its building blocks in this process
//! on a temporary SQLite file (a trip that completes, one that is compensated, one interrupted
//! by a stop that finishes after a restart), its HTTP API, and the example binary itself.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use sagas::orchestrator::api::sagas::{SagaView, Started};
use sagas::orchestrator::machine::StepStatus;
use sagas::orchestrator::{EngineConfig, Status};
use sagas::participant::{Command, Operation, Outcome};
use serde_json::Value;
use tokio::io::AsyncBufReadExt;
use uuid::Uuid;

use crate::examples::embedded::Embedded;
use crate::examples::trip;
use crate::helpers::built_binary;

/// A directory of its own for each test, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        let dir = std::env::temp_dir().join(format!("sagas-qs-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }

    fn db(&self) -> PathBuf {
        self.0.join("quickstart.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config() -> EngineConfig {
    EngineConfig {
        timer_poll: Duration::from_millis(20),
        relay_poll: Duration::from_millis(200),
        ..EngineConfig::default()
    }
}

async fn start(db: &Path, timeout: Duration) -> Result<Embedded> {
    Embedded::start(db, trip::registry(timeout), config()).await
}

/// `(step, operation)` of every dispatched command, in log order.
async fn dispatches(app: &Embedded, id: Uuid) -> Result<Vec<(usize, Operation)>> {
    Ok(app
        .engine
        .events(id)
        .await?
        .iter()
        .filter(|e| e.event.kind() == "dispatched")
        .filter_map(|e| Some((e.event.step()?, e.event.operation()?)))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trip_completes_with_a_booking_at_every_agency() -> Result<()> {
    let dir = TempDir::new()?;
    let mut app = start(&dir.db(), Duration::from_secs(5)).await?;
    let agencies = app.trip_participants(Duration::ZERO, false)?;
    let started = app.engine.start(trip::NAME, trip::completes()).await?;
    let done = app
        .wait_finished(started.id, Duration::from_secs(30))
        .await?;
    assert_eq!(done.instance.status, Status::Completed);
    for (step, agency) in done.instance.steps.iter().zip(&agencies) {
        assert_eq!(step.status, StepStatus::Succeeded);
        let bookings = agency.bookings();
        assert_eq!(bookings.len(), 1, "{}", agency.name());
        assert!(bookings[0].active && bookings[0].traveler == "ada");
        assert_eq!(
            step.output.as_ref().and_then(|o| o["booking"].as_str()),
            Some(bookings[0].reference.as_str())
        );
    }
    // The car's command carries the flight's booking: outputs feed later commands.
    let car = done.instance.steps[2].payload.clone().unwrap_or_default();
    assert_eq!(
        car["flight"],
        done.instance.steps[0].output.clone().unwrap()["booking"]
    );
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trip_to_venice_is_compensated_hotel_first_then_flight() -> Result<()> {
    let dir = TempDir::new()?;
    let mut app = start(&dir.db(), Duration::from_secs(5)).await?;
    let agencies = app.trip_participants(Duration::ZERO, false)?;
    let started = app.engine.start(trip::NAME, trip::compensates()).await?;
    let done = app
        .wait_finished(started.id, Duration::from_secs(30))
        .await?;
    assert_eq!(done.instance.status, Status::Compensated);
    assert_eq!(
        done.instance.failure.as_deref(),
        Some("step rent_car failed: no cars in Venice")
    );
    let statuses: Vec<StepStatus> = done.instance.steps.iter().map(|s| s.status).collect();
    assert_eq!(
        statuses,
        [
            StepStatus::Compensated,
            StepStatus::Compensated,
            StepStatus::Failed
        ]
    );
    let undo: Vec<usize> = dispatches(&app, started.id)
        .await?
        .into_iter()
        .filter(|(_, op)| *op == Operation::Compensate)
        .map(|(step, _)| step)
        .collect();
    assert_eq!(undo, [1, 0], "compensated in reverse order");
    // Flight and hotel were booked and cancelled; no car was rented.
    let held: Vec<(usize, bool)> = agencies
        .iter()
        .map(|a| {
            let b = a.bookings();
            (b.len(), b.iter().any(|b| b.active))
        })
        .collect();
    assert_eq!(held, [(1, false), (1, false), (0, false)]);
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trip_interrupted_by_a_stop_finishes_after_a_restart_on_the_same_file() -> Result<()> {
    let dir = TempDir::new()?;
    let timeout = Duration::from_millis(500);

    // First process: the car rental never answers.
    let mut first = start(&dir.db(), timeout).await?;
    first.participant(
        "flights",
        trip::Agency::new("flights", Duration::ZERO, false),
    )?;
    first.participant("hotels", trip::Agency::new("hotels", Duration::ZERO, false))?;
    first.participant("cars", |_c: Command| async {
        std::future::pending::<Outcome>().await
    })?;
    let id = first.engine.start(trip::NAME, trip::completes()).await?.id;
    let waited = tokio::time::Instant::now();
    while !dispatches(&first, id)
        .await?
        .contains(&(2, Operation::Action))
    {
        anyhow::ensure!(
            waited.elapsed() < Duration::from_secs(30),
            "rent_car never sent"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.stop().await?;

    // Second process on the same file, with a car rental that answers.
    let mut second = start(&dir.db(), timeout).await?;
    let before = second.engine.get(id).await?.context("trip lost")?;
    assert_eq!(before.instance.status, Status::Running);
    assert_eq!(before.instance.steps[2].status, StepStatus::Running);
    let agencies = second.trip_participants(Duration::ZERO, false)?;
    let done = second.wait_finished(id, Duration::from_secs(30)).await?;
    assert_eq!(done.instance.status, Status::Completed);
    // The deadline of the attempt lost with the first process fired, and a new one was sent.
    let events = second.engine.events(id).await?;
    assert!(
        events
            .iter()
            .any(|e| e.event.kind() == "timed_out" && e.event.step() == Some(2)),
        "no timeout of rent_car in the log"
    );
    assert!(done.instance.steps[2].attempt >= 2);
    // Steps finished before the stop were not sent again.
    assert!(agencies[0].bookings().is_empty() && agencies[1].bookings().is_empty());
    assert_eq!(agencies[2].bookings().len(), 1);
    second.stop().await
}

async fn wait_view(http: &reqwest::Client, base: &str, id: Uuid) -> Result<SagaView> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let view: SagaView = http
            .get(format!("{base}/v1/sagas/{id}"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        if view.status.is_terminal() {
            return Ok(view);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "trip {id} still {:?}",
            view.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn post_trip(http: &reqwest::Client, base: &str, body: &Value) -> Result<Uuid> {
    let response = http
        .post(format!("{base}/v1/sagas/{}", trip::NAME))
        .json(body)
        .send()
        .await?;
    anyhow::ensure!(
        response.status() == reqwest::StatusCode::ACCEPTED,
        "start answered {}: {}",
        response.status(),
        response.text().await?
    );
    Ok(response.json::<Started>().await?.id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_runs_both_quickstart_trips() -> Result<()> {
    let dir = TempDir::new()?;
    let mut app = start(&dir.db(), Duration::from_secs(5)).await?;
    app.trip_participants(Duration::ZERO, false)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let router = sagas::orchestrator::api::router(app.engine.clone());
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    let http = reqwest::Client::new();
    for (input, expected) in [
        (trip::completes(), Status::Completed),
        (trip::compensates(), Status::Compensated),
    ] {
        let id = post_trip(&http, &base, &serde_json::json!({ "input": input })).await?;
        assert_eq!(wait_view(&http, &base, id).await?.status, expected);
    }
    // Bad input is refused before anything is stored.
    let bad = http
        .post(format!("{base}/v1/sagas/{}", trip::NAME))
        .json(&serde_json::json!({"input": {"traveler": "ada", "destination": "Lisbon", "nights": 0}}))
        .send()
        .await?;
    assert!(bad.status().is_client_error(), "{}", bad.status());
    server.abort();
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_demo_runs_both_trips_and_exits_zero() -> Result<()> {
    let dir = TempDir::new()?;
    let output = tokio::process::Command::new(built_binary("examples/quickstart")?)
        .arg("--demo")
        .arg("--db")
        .arg(dir.db())
        .stdin(Stdio::null())
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "booked FL-",
        "failed: no cars in Venice",
        "compensate cancelled HT-",
        "\"status\": \"completed\"",
        "\"status\": \"compensated\"",
        "\"failure\": \"step rent_car failed: no cars in Venice\"",
        "both trips ended as expected",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing in:\n{stdout}"
        );
    }
    Ok(())
}

/// The example binary serving on a free port, with its output collected line by line.
struct Server {
    child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Server {
    async fn spawn(db: &Path, extra: &[&str]) -> Result<Server> {
        let mut child = tokio::process::Command::new(built_binary("examples/quickstart")?)
            .args(["--port", "0", "--timeout-ms", "1000", "--db"])
            .arg(db)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        Ok(Server { child, lines })
    }

    /// Waits for a printed line that contains `needle`; returns it.
    async fn line(&self, needle: &str) -> Result<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return Ok(l.clone());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "no line with {needle:?} in:\n{}",
                self.lines.lock().unwrap().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The `-d '…'` body of the printed curl command for `destination`.
    async fn curl_body(&self, destination: &str) -> Result<Value> {
        let line = self
            .line(&format!("\"destination\":\"{destination}\""))
            .await?;
        let body = line
            .split_once("-d '")
            .and_then(|(_, rest)| rest.strip_suffix('\''))
            .context("no -d '…' in the curl command")?;
        Ok(serde_json::from_str(body)?)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_prints_working_curl_commands_and_finishes_a_trip_after_a_kill() -> Result<()>
{
    let dir = TempDir::new()?;
    let http = reqwest::Client::new();

    // Slow participants, so that the process dies in the middle of the trip.
    let mut server = Server::spawn(&dir.db(), &["--delay-ms", "400"]).await?;
    let base = server.line("HTTP API").await?;
    let base = base.split_whitespace().last().context("url")?.to_owned();
    let completes = server.curl_body("Lisbon").await?;
    let id = post_trip(&http, &base, &completes).await?;
    server.line("booked FL-").await?;
    server.child.kill().await?;

    let server = Server::spawn(&dir.db(), &[]).await?;
    server.line("resuming 1 unfinished trip").await?;
    let base = server.line("HTTP API").await?;
    let base = base.split_whitespace().last().context("url")?.to_owned();
    let view = wait_view(&http, &base, id).await?;
    assert_eq!(view.status, Status::Completed, "{view:?}");

    // The other printed command compensates.
    let compensates = server.curl_body("Venice").await?;
    let other = post_trip(&http, &base, &compensates).await?;
    assert_eq!(
        wait_view(&http, &base, other).await?.status,
        Status::Compensated
    );
    server.line(&format!("trip {other} compensated")).await?;

    // Ctrl-C stops it cleanly.
    let pid = server.child.id().context("pid")?;
    let sent = tokio::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .await?;
    assert!(sent.success());
    let mut server = server;
    let status = tokio::time::timeout(Duration::from_secs(30), server.child.wait()).await??;
    assert!(status.success(), "{status}");
    server.line("stopped; unfinished trips stay in").await?;
    Ok(())
}
