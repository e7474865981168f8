//! The quickstart: the whole orchestrator in one process, with no database server and no
//! broker. The production engine runs on an SQLite file and an in-process transport; three
//! participants (flights, hotels, cars) run in the same process; the HTTP API listens on
//! 127.0.0.1.
//!
//! ```text
//! cargo run --example quickstart                 # serve on 127.0.0.1:8080, print curl commands
//! cargo run --example quickstart -- --demo       # run a trip that completes and one that is
//!                                                # compensated, print them, exit
//! cargo run --example quickstart -- --help
//! ```
//!
//! Stop it (Ctrl-C) while a trip is in flight and start it again on the same `--db`: the trip
//! finishes. `--delay-ms 3000` makes the participants slow enough to try that by hand.

mod embedded;
mod trip;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sagas::orchestrator::api::sagas::SagaView;
use sagas::orchestrator::store::ListFilter;
use sagas::orchestrator::{Engine, EngineConfig, Status, server};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use embedded::Embedded;

#[derive(Parser)]
#[command(
    name = "quickstart",
    about = "The sagas orchestrator in one process: SQLite store, in-process participants, HTTP API"
)]
struct Args {
    /// Port of the HTTP API on 127.0.0.1.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The SQLite database file (created if missing; delete it to start afresh).
    #[arg(long, default_value = "./sagas-quickstart.db")]
    db: PathBuf,
    /// Run one trip that completes and one that is compensated, print them and exit.
    #[arg(long)]
    demo: bool,
    /// Participants wait this long before answering (to stop the process mid-trip).
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// How long each attempt of a step waits for its reply, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    timeout_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Warnings only unless RUST_LOG says otherwise: the participants print what they do.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
    let registry = trip::registry(Duration::from_millis(args.timeout_ms.max(1)));
    let mut app = Embedded::start(&args.db, registry, EngineConfig::default()).await?;
    let agencies = app.trip_participants(Duration::from_millis(args.delay_ms), true)?;
    let result = if args.demo {
        demo(&app, &agencies).await
    } else {
        serve(&app, &args).await
    };
    app.stop().await?;
    result
}

fn header(args: &Args) {
    println!("sagas quickstart: one process, no database server, no broker");
    println!("  store         SQLite file {} (WAL)", args.db.display());
    println!("  transport     in-process channels");
    println!("  participants  flights, hotels, cars (in this process, bookings in memory)");
    println!(
        "  saga          trip v1: book_flight (flights) -> book_hotel (hotels) -> rent_car (cars)"
    );
}

/// Runs the two trips, prints their final views, and fails unless they ended as expected.
async fn demo(app: &Embedded, agencies: &[trip::Agency]) -> anyhow::Result<()> {
    println!("sagas quickstart demo: a trip that completes, then one that is compensated");
    println!();
    let mut ok = true;
    for (input, expected) in [
        (trip::completes(), Status::Completed),
        (trip::compensates(), Status::Compensated),
    ] {
        println!("start trip {input}");
        let started = app.engine.start(trip::NAME, input).await?;
        let stored = app
            .wait_finished(started.id, Duration::from_secs(60))
            .await?;
        let events = app.engine.events(started.id).await?;
        let view = SagaView::of(stored);
        println!(
            "trip {} is {}",
            view.id,
            serde_json::to_value(view.status)?.as_str().unwrap_or("?")
        );
        println!("{}", serde_json::to_string_pretty(&view)?);
        let kinds: Vec<&str> = events.iter().map(|e| e.event.kind()).collect();
        println!("log: {}", kinds.join(", "));
        println!();
        ok &= view.status == expected;
    }
    println!("bookings held by the participants (in this process's memory):");
    for agency in agencies {
        for b in agency.bookings() {
            let state = if b.active { "active" } else { "cancelled" };
            println!(
                "  {:<8} {} {:<6} {state}",
                agency.name(),
                b.reference,
                b.traveler
            );
        }
    }
    println!();
    anyhow::ensure!(ok, "a demo trip did not end as expected");
    println!("both trips ended as expected");
    Ok(())
}

/// Serves the HTTP API until Ctrl-C, printing status changes of the trips.
async fn serve(app: &Embedded, args: &Args) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port))
        .await
        .with_context(|| {
            format!(
                "binding 127.0.0.1:{} (choose another with --port)",
                args.port
            )
        })?;
    let url = format!("http://{}", listener.local_addr()?);
    header(args);
    println!("  HTTP API      {url}");
    let unfinished = unfinished(&app.engine).await?;
    if unfinished > 0 {
        println!();
        println!(
            "resuming {unfinished} unfinished trip(s) from {}",
            args.db.display()
        );
    }
    println!();
    println!("A trip that completes:");
    println!("{}", curl(&url, &trip::completes()));
    println!("A trip that is compensated (there are no cars in Venice):");
    println!("{}", curl(&url, &trip::compensates()));
    println!("Then look at it (id from the answer), its log, or all trips:");
    println!("  curl -s {url}/v1/sagas/<id>");
    println!("  curl -s {url}/v1/sagas/<id>/events");
    println!("  curl -s {url}/v1/sagas");
    println!();
    println!("Ctrl-C stops it; started again on the same --db, unfinished trips finish.");
    println!();

    let shutdown = CancellationToken::new();
    let watcher = tokio::spawn(watch(app.engine.clone(), shutdown.clone()));
    let s = shutdown.clone();
    let http = axum::serve(
        listener,
        sagas::orchestrator::api::router(app.engine.clone()),
    )
    .with_graceful_shutdown(async move {
        server::wait_for_signal().await;
        s.cancel();
    });
    let result = http.await.context("HTTP server");
    shutdown.cancel();
    let _ = watcher.await;
    println!("stopped; unfinished trips stay in {}", args.db.display());
    result
}

fn curl(url: &str, input: &serde_json::Value) -> String {
    format!(
        "  curl -s -XPOST {url}/v1/sagas/{} -H 'content-type: application/json' -d '{}'",
        trip::NAME,
        serde_json::json!({ "input": input })
    )
}

async fn unfinished(engine: &Engine) -> anyhow::Result<usize> {
    let mut n = 0;
    for status in [Status::Running, Status::Compensating, Status::Stuck] {
        let filter = ListFilter {
            status: Some(status),
            definition: None,
            after: None,
            created_after: None,
            created_before: None,
            idempotency_key: None,
            limit: 500,
        };
        n += engine.list(&filter).await?.len();
    }
    Ok(n)
}

/// Prints every change of status of the newest trips.
async fn watch(engine: Arc<Engine>, shutdown: CancellationToken) {
    let mut seen: HashMap<Uuid, Status> = HashMap::new();
    let filter = ListFilter {
        status: None,
        definition: None,
        after: None,
        created_after: None,
        created_before: None,
        idempotency_key: None,
        limit: 100,
    };
    let mut first = true;
    while !shutdown.is_cancelled() {
        if let Ok(trips) = engine.list(&filter).await {
            for t in trips.iter().rev() {
                let (id, status) = (t.instance.id, t.instance.status);
                let before = seen.insert(id, status);
                if !first && before != Some(status) {
                    let name = serde_json::to_value(status).unwrap_or_default();
                    let why = match (&t.instance.failure, status) {
                        (Some(f), Status::Compensating | Status::Compensated) => {
                            format!(" ({f})")
                        }
                        _ => String::new(),
                    };
                    println!("trip {id} {}{why}", name.as_str().unwrap_or("?"));
                }
            }
        }
        first = false;
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}
