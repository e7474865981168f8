//! The processes `--topology processes` starts: this binary again, with a hidden `--role`.
//!
//! An orchestrator is `sagad` with the benchmark's definition (`server::serve`, its settings
//! from the environment by `Config::from_env`); a participant is one participant of the SDK
//! (`ParticipantConfig::from_env`, `run_forever`) with the benchmark's handler. Each stops as
//! after SIGTERM once its standard input closes: the benchmark closes it to stop them, and a
//! benchmark that dies closes it too, so none outlives the run.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::ValueEnum;
use sagas::orchestrator::config::Config;
use sagas::orchestrator::server;
use sagas::participant::Stats;
use sagas::participant::config::ParticipantConfig;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::Args;
use crate::participants::{self, Effects};

/// What a process started by the benchmark is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// An orchestrator (engine and HTTP API), as `sagad` runs one.
    Orchestrator,
    /// One participant (`--participant NAME`).
    Participant,
}

impl Role {
    /// Its name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Orchestrator => "orchestrator",
            Role::Participant => "participant",
        }
    }
}

/// What a participant process prints (one JSON line on stdout) once it has stopped: the
/// counters of its `Stats` that the report shows.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ParticipantReport {
    pub batches: u64,
    pub batch_reruns: u64,
    pub batch_fallbacks: u64,
}

impl ParticipantReport {
    fn of(stats: &Stats) -> ParticipantReport {
        ParticipantReport {
            batches: stats.batches(),
            batch_reruns: stats.batch_reruns(),
            batch_fallbacks: stats.batch_fallbacks(),
        }
    }
}

/// Runs this process as `role` until its standard input closes.
pub async fn run(role: Role, args: &Args) -> Result<()> {
    match role {
        Role::Orchestrator => orchestrator(args).await,
        Role::Participant => participant(args).await,
    }
}

async fn orchestrator(args: &Args) -> Result<()> {
    let config = Config::from_env().unwrap_or_else(|e| e.exit());
    let [workload] = args.workloads()[..] else {
        anyhow::bail!("--role orchestrator serves one workload, not all");
    };
    let registry = participants::registry(
        workload,
        args.steps,
        args.step_timeout_secs.map(Duration::from_secs),
    )?;
    let stop = CancellationToken::new();
    let on_close = stop.clone();
    tokio::spawn(async move {
        stdin_closed().await;
        on_close.cancel();
    });
    server::serve(config, registry, Some(stop)).await
}

async fn participant(args: &Args) -> Result<()> {
    let name = args
        .participant
        .clone()
        .context("--role participant needs --participant NAME")?;
    let config = ParticipantConfig::from_env(name).unwrap_or_else(|e| e.exit());
    let pool = config.pool()?;
    // `ParticipantConfig::serve`, keeping a handle on the counters.
    let participant = config.participant(pool.clone(), Arc::new(Effects));
    let stats = participant.stats();
    participant
        .run_forever(&config.broker.amqp_url, stdin_closed())
        .await?;
    pool.close().await;
    println!("{}", serde_json::to_string(&ParticipantReport::of(&stats))?);
    Ok(())
}

/// Resolves once standard input reaches its end (or cannot be read).
async fn stdin_closed() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    // A thread of its own rather than the runtime's blocking pool, whose reads would hold the
    // runtime's shutdown up.
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = tx.send(());
    });
    let _ = rx.await;
}
