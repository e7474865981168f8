//! The embedded orchestrator: the production engine on the SQLite store and the in-process
//! transport, with the trip participants in the same process.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use sagas::orchestrator::clock::SystemClock;
use sagas::orchestrator::store::{SqliteStore, StoredInstance};
use sagas::orchestrator::transport::MemoryTransport;
use sagas::orchestrator::transport::memory::{MemoryHandler, MemoryParticipant};
use sagas::orchestrator::{Engine, EngineConfig, Registry};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::trip::{self, Agency};

/// An engine running on an SQLite file, with its transport and participants.
pub struct Embedded {
    /// The engine (serve it with `sagas::orchestrator::api::router`).
    pub engine: Arc<Engine>,
    /// The in-process transport.
    pub transport: MemoryTransport,
    store: SqliteStore,
    participants: Vec<MemoryParticipant>,
    shutdown: CancellationToken,
    runner: JoinHandle<Result<()>>,
}

impl Embedded {
    /// Opens (or creates) the database at `db` and starts the engine's loops (reply consumer,
    /// timers, outbox relay). No participant runs yet: see [`Embedded::participant`].
    pub async fn start(db: &Path, registry: Registry, config: EngineConfig) -> Result<Embedded> {
        let store = SqliteStore::open(db)
            .await
            .with_context(|| format!("opening the SQLite database {}", db.display()))?;
        let transport = MemoryTransport::new();
        let engine = Engine::new(
            Arc::new(store.clone()),
            Arc::new(transport.clone()),
            registry,
            Arc::new(SystemClock),
            config,
        );
        // Queues exist before anything is published, so that nothing waits for the relay.
        engine.declare().await?;
        let shutdown = CancellationToken::new();
        let runner = tokio::spawn(engine.clone().run(shutdown.clone()));
        let runner = tokio::spawn(async move { Ok(runner.await??) });
        Ok(Embedded {
            engine,
            transport,
            store,
            participants: Vec::new(),
            shutdown,
            runner,
        })
    }

    /// Runs a participant in this process.
    pub fn participant(&mut self, name: &str, handler: impl MemoryHandler) -> Result<()> {
        self.participants
            .push(self.transport.participant(name, handler)?);
        Ok(())
    }

    /// Runs the trip's three participants; returns them to look at their bookings.
    pub fn trip_participants(&mut self, delay: Duration, verbose: bool) -> Result<Vec<Agency>> {
        let mut agencies = Vec::new();
        for name in trip::PARTICIPANTS {
            let agency = Agency::new(name, delay, verbose);
            self.participant(name, agency.clone())?;
            agencies.push(agency);
        }
        Ok(agencies)
    }

    /// Waits until the transaction is completed or compensated (or stuck), at most `limit`.
    pub async fn wait_finished(&self, id: Uuid, limit: Duration) -> Result<StoredInstance> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let stored = self
                .engine
                .get(id)
                .await?
                .with_context(|| format!("transaction {id} not found"))?;
            let status = stored.instance.status;
            if status.is_terminal() || status == sagas::orchestrator::Status::Stuck {
                return Ok(stored);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "transaction {id} still {status:?} after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the engine and the participants, and closes the database. Transactions in flight
    /// stay in the file and go on when it is opened again.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        let result = self.runner.await.context("engine task");
        for p in self.participants {
            p.stop().await;
        }
        self.transport.close();
        self.store.close().await;
        result?
    }
}
