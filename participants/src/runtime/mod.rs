//! The AMQP consumer that serves one participant's queue.
//!
//! For each command: decode and validate it, run it through the [barrier] and
//! the handler, publish the reply (with a publisher confirm) to the command's `reply_to`, and
//! only then ack the command. A crash anywhere before the ack means a redelivery, which the
//! barrier answers from its stored reply. Bad messages are dead-lettered with their reason in
//! the `x-sagas-reason` header, and counted.
//!
//! Commands that are already delivered when one is taken are taken with it (up to
//! [`Participant::batch_size`]) and run in one database transaction, a
//! [`barrier::Batch`]: one commit for all of them. Their replies are published together after
//! the commit, and each command is acked once its own reply is confirmed. A batch whose
//! transaction fails is rolled back and its commands run one by one, as if never batched.
//!
//! A message can also be a command batch (`content_type` [`BATCH_CONTENT_TYPE`], a JSON array
//! of commands; docs/protocol.md, "Batches"). Each element is handled as if it had arrived
//! alone: a malformed element is dead-lettered alone, the others go through the barrier with
//! the other commands taken (in transactions of at most [`Participant::batch_size`]
//! commands), and the message is answered with one reply batch, acked once that is confirmed.
//! A body that is not a batch, or one without `reply_to`, is dead-lettered whole.
//!
//! Every reply (and reply batch) the runtime publishes carries the participant's
//! [`Announcement`](amqp::Announcement): its name and the most elements of a command batch it
//! accepts ([`Participant::accept_command_batches`]). The orchestrator sends command batches
//! only to participants that announce them.
//!
//! [`Participant::run`] serves on a connection the caller owns and returns when it fails;
//! [`Participant::run_forever`] owns its connection and reconnects (with backoff, redeclaring
//! the queue) after broker restarts and network failures until its shutdown signal. With
//! either, a command that cannot reach the database waits for it, unanswered and unacked, and
//! runs again once it is back.
//!
//! [`BATCH_CONTENT_TYPE`]: crate::protocol::BATCH_CONTENT_TYPE

mod admission;
mod batching;
mod completion;
pub mod metrics;
mod outage;
mod process;
mod replies;
mod retention;
mod session;
mod stats;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use lapin::Connection;
use sqlx::PgPool;

use crate::amqp::{self, Backoff, QueueOptions};
use crate::barrier::{self, BarrierError};
use crate::handler::Handler;
use crate::protocol::{MAX_BATCH, Topology};
use crate::start::StartRelay;

pub use admission::{Malformed, decode_command};
pub use completion::{complete, send_reply};
pub use process::{process, process_within};
pub use retention::{BARRIER_CLEANUP_EVERY, DEFAULT_BARRIER_RETENTION};
pub use stats::Stats;

/// Default number of unacknowledged commands the broker may push to one participant process.
pub const DEFAULT_PREFETCH: u16 = 32;

/// Default number of commands in flight at once in one participant process.
pub const DEFAULT_CONCURRENCY: usize = 16;

/// Default number of commands run in one database transaction (see [`Participant::batch_size`]).
pub const DEFAULT_BATCH_SIZE: usize = 16;

/// The largest batch: each command takes up to two subtransactions, and past 64 in one
/// transaction PostgreSQL's per-backend cache of them overflows (which slows down every
/// snapshot in the database).
pub const MAX_BATCH_SIZE: usize = 32;

/// Default time that handlers in flight get to finish after the shutdown signal.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(25);

pub use crate::amqp::headers::{
    DEAD_LETTER_QUEUE_HEADER as QUEUE_HEADER, DEAD_LETTER_REASON_HEADER as REASON_HEADER,
    TRACEPARENT_HEADER,
};

/// Why [`Participant::run`] stopped other than by its shutdown signal.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Declaring, consuming or the connection failed.
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
    /// Installing the barrier table failed.
    #[error(transparent)]
    Barrier(#[from] BarrierError),
    /// The broker cancelled the consumer (for example, the queue was deleted).
    #[error("the broker ended the consumer of queue {0}")]
    ConsumerEnded(String),
    /// The channel used to publish replies closed; the caller should reconnect and run again.
    #[error("the reply channel closed")]
    ReplyChannelClosed,
    /// The AMQP URL given to [`Participant::run_forever`] cannot be parsed, or the TLS files
    /// it names cannot be read.
    #[error("invalid AMQP URL: {0}")]
    InvalidUrl(String),
    /// A reply sent with [`send_reply`] was not confirmed (nacked, or no queue took it).
    #[error("the reply was not confirmed by the broker: {0}")]
    NotConfirmed(String),
    /// The metrics listener (`SAGAS_PARTICIPANT_METRICS_BIND`) could not start.
    #[error("cannot serve the participant's metrics: {0}")]
    Metrics(String),
}

/// Completes on SIGTERM or Ctrl-C (SIGINT): the usual shutdown signal of a participant process.
///
/// ```no_run
/// # async fn serve(participant: sagas_participant::Participant) {
/// participant
///     .run_forever("amqp://guest:guest@127.0.0.1:5672/%2f", sagas_participant::runtime::shutdown_signal())
///     .await
///     .expect("participant");
/// # }
/// ```
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; waiting for Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown signal received");
}

/// One participant process: consumes its queue and answers commands through the barrier.
pub struct Participant {
    name: String,
    topology: Topology,
    pool: PgPool,
    handler: Arc<dyn Handler>,
    prefetch: u16,
    concurrency: usize,
    batch_size: usize,
    batch_linger: Duration,
    accepts_batch: usize,
    queue_options: QueueOptions,
    install_barrier: bool,
    handler_timeout: Option<Duration>,
    shutdown_timeout: Duration,
    barrier_retention: Option<Duration>,
    barrier_cleanup_every: Duration,
    reconnect_backoff: Backoff,
    stats: Stats,
    database: Arc<outage::DatabaseOutage>,
    relay: Option<StartRelay>,
}

impl std::fmt::Debug for Participant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Participant")
            .field("name", &self.name)
            .field("topology", &self.topology)
            .field("prefetch", &self.prefetch)
            .field("concurrency", &self.concurrency)
            .field("batch_size", &self.batch_size)
            .field("batch_linger", &self.batch_linger)
            .field("accepts_batch", &self.accepts_batch)
            .field("queue_options", &self.queue_options)
            .field("handler_timeout", &self.handler_timeout)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .finish_non_exhaustive()
    }
}

/// How a session ended without an error.
enum Ended {
    /// The shutdown signal fired.
    Shutdown,
}

impl Participant {
    /// A participant named `name` (its routing key and queue suffix) with default settings.
    pub fn new(
        name: impl Into<String>,
        topology: Topology,
        pool: PgPool,
        handler: Arc<dyn Handler>,
    ) -> Participant {
        Participant {
            name: name.into(),
            topology,
            pool,
            handler,
            prefetch: DEFAULT_PREFETCH,
            concurrency: DEFAULT_CONCURRENCY,
            batch_size: DEFAULT_BATCH_SIZE,
            batch_linger: crate::linger::DEFAULT_PARTICIPANT_LINGER,
            accepts_batch: MAX_BATCH,
            queue_options: QueueOptions::default(),
            install_barrier: true,
            handler_timeout: None,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            barrier_retention: Some(DEFAULT_BARRIER_RETENTION),
            barrier_cleanup_every: BARRIER_CLEANUP_EVERY,
            reconnect_backoff: Backoff::default(),
            stats: Stats::default(),
            database: Arc::default(),
            relay: None,
        }
    }

    /// Sets the AMQP prefetch (unacked commands buffered by the broker for this process).
    pub fn prefetch(mut self, prefetch: u16) -> Participant {
        self.prefetch = prefetch.max(1);
        self
    }

    /// Sets how many commands may be in flight at once (at least 1), batched or not.
    pub fn concurrency(mut self, concurrency: usize) -> Participant {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Sets how many commands may run in one database transaction (default 16, from 1, which
    /// turns batching off, to [`MAX_BATCH_SIZE`]).
    ///
    /// When a command is taken, the ones already delivered are taken with it, as long as
    /// handler slots ([`Participant::concurrency`]) are free, and, after a take of several,
    /// those that arrive within the linger ([`Participant::batch_linger`]). They run through the barrier in one transaction ([`barrier::Batch`]), each in a
    /// savepoint of its own, with the same outcome each would have alone, and commit at once.
    /// If the transaction fails, it is rolled back and the commands run one by one. Commands
    /// of a batch hold their row locks until it commits: for handlers that mostly update the
    /// same few rows, or that take long, prefer small batches.
    pub fn batch_size(mut self, batch_size: usize) -> Participant {
        self.batch_size = batch_size.clamp(1, MAX_BATCH_SIZE);
        self
    }

    /// Sets how long a take of commands waits for more to arrive, after a take that held
    /// several commands (default none,
    /// [`DEFAULT_PARTICIPANT_LINGER`](crate::linger::DEFAULT_PARTICIPANT_LINGER); at most
    /// [`MAX_LINGER`](crate::linger::MAX_LINGER); zero: only what was delivered already).
    ///
    /// A lone command never waits: the take before it held one. Under load, the wait lets
    /// more commands share a transaction and a reply message ([`crate::linger`]); it pays
    /// where commands come one by one, not where the orchestrator sends them in batches.
    pub fn batch_linger(mut self, linger: Duration) -> Participant {
        self.batch_linger = linger.min(crate::linger::MAX_LINGER);
        self
    }

    /// Sets the most elements of a command batch (one message of many commands; docs/protocol.md,
    /// "Batches") that the participant announces it accepts, on every reply it publishes
    /// (default and most: the protocol's limit, [`MAX_BATCH`]; 0 announces none).
    ///
    /// The orchestrator sends command batches only to participants that announce them, and
    /// none larger than announced. Whatever it announces, the runtime handles every command
    /// batch it receives (up to [`MAX_BATCH`] elements), in transactions of at most
    /// [`Participant::batch_size`] commands, holding one handler slot: a large batch waits for
    /// all of its commands before its replies go, so lower it to bound that wait.
    pub fn accept_command_batches(mut self, max: usize) -> Participant {
        self.accepts_batch = max.min(MAX_BATCH);
        self
    }

    /// What every reply of this participant announces: its name and
    /// [`Participant::accept_command_batches`]. Pass it to [`send_reply`] and [`complete`].
    pub fn announcement(&self) -> amqp::Announcement {
        amqp::Announcement::new(self.name.clone(), self.accepts_batch)
    }

    /// Sets the queue declaration options; must match the orchestrator's.
    pub fn queue_options(mut self, options: QueueOptions) -> Participant {
        self.queue_options = options;
        self
    }

    /// Whether [`Participant::run`] creates the barrier table first (default: yes).
    pub fn install_barrier(mut self, install: bool) -> Participant {
        self.install_barrier = install;
        self
    }

    /// Limits how long one command may take in the barrier and handler (default: no limit).
    ///
    /// A command over the limit is abandoned, its database transaction rolled back, and
    /// answered `retry`. Keep it below the step's timeout in the definition, so that the
    /// orchestrator hears `retry` before it gives up on the attempt.
    ///
    /// In a batch, each command (and the batch's begin and commit) gets the limit for itself;
    /// when it strikes, the whole batch is rolled back and its commands run one by one, each
    /// with the limit again. A command's reply waits for its batch, so a batch of slow
    /// commands can take up to `batch_size` times the limit: keep batches small if handlers
    /// can take a large part of it. The reply batch of a command batch (one message of many
    /// commands) waits for all of its commands, each with the limit.
    pub fn handler_timeout(mut self, limit: Duration) -> Participant {
        self.handler_timeout = Some(limit);
        self
    }

    /// How long barrier rows are kept: the running participant deletes, every hour, the rows
    /// of transactions whose rows are all older than this ([`barrier::cleanup`], which also
    /// records the horizon `sagactl reconcile` reads). Default 30 days; `None` keeps them all
    /// (clean up yourself then). Keep it longer than any transaction stays open, and at least
    /// as long as the orchestrator's `SAGAS_RETENTION`, so that a transaction's log goes before
    /// its barrier rows (docs/operations.md, "Retention").
    pub fn barrier_retention(mut self, retention: Option<Duration>) -> Participant {
        self.barrier_retention = retention;
        self
    }

    /// How often the running participant cleans its barrier up (default hourly; at least a
    /// second), the first time one period after it starts.
    pub fn barrier_cleanup_every(mut self, every: Duration) -> Participant {
        self.barrier_cleanup_every = every.max(Duration::from_secs(1));
        self
    }

    /// Runs `work`, with the barrier cleanup alongside while a retention is set.
    async fn with_barrier_cleanup<T>(&self, work: impl Future<Output = T>) -> T {
        let Some(retention) = self.barrier_retention else {
            return work.await;
        };
        let every = self.barrier_cleanup_every;
        let cleanup = retention::cleanup_loop(&self.name, &self.pool, retention, every);
        tokio::select! {
            biased;
            done = work => done,
            never = cleanup => match never {},
        }
    }

    /// Runs `relay` alongside [`Participant::run_forever`], on connections of its own: the
    /// start relay of a service that starts transactions with [`crate::start_in`] in this
    /// participant's database (e.g. `StartRelay::new(name, topology, pool)`). It stops with
    /// the participant; whatever it had not settled is settled by the next relay.
    pub fn relay_starts(mut self, relay: StartRelay) -> Participant {
        self.relay = Some(relay);
        self
    }

    /// How long handlers in flight may still run after the shutdown signal (default 25 s);
    /// the ones still running then are abandoned (rolled back, and their commands redelivered
    /// by the broker to another process or after the restart).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Participant {
        self.shutdown_timeout = timeout;
        self
    }

    /// The delay before the first reconnection attempt of [`Participant::run_forever`] and
    /// its upper bound (it doubles in between); defaults 100 ms and 5 s. A session that
    /// served longer than `max` starts the delays over. A command that finds the database
    /// unreachable runs again after the same delays.
    pub fn reconnect_backoff(mut self, initial: Duration, max: Duration) -> Participant {
        self.reconnect_backoff = Backoff::new(initial, max);
        self
    }

    /// The participant's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A handle on the live counters; take it before calling [`Participant::run`].
    pub fn stats(&self) -> Stats {
        self.stats.clone()
    }

    /// Serves the participant's queue on `conn` until `shutdown` completes, then stops
    /// consuming, waits for the commands in flight (up to [`Participant::shutdown_timeout`]),
    /// and returns.
    ///
    /// It first creates the barrier table (unless [`Participant::install_barrier`] is off) and
    /// declares its queue. Commands delivered but not yet started when shutting down are
    /// requeued by the broker when the channel closes. It returns an error when the connection
    /// or a channel fails; [`Participant::run_forever`] reconnects instead. It runs in the
    /// caller's future: spawn it on the runtime (`tokio::spawn`) rather than awaiting it in
    /// `#[tokio::main]`'s, which runs on the main thread, outside the worker threads.
    pub async fn run(
        self,
        conn: &Connection,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), RuntimeError> {
        if self.install_barrier {
            barrier::install(&self.pool).await?;
        }
        let mut shutdown = std::pin::pin!(shutdown);
        let result = self
            .with_barrier_cleanup(self.session(conn, shutdown.as_mut()))
            .await;
        tracing::info!(participant = %self.name, ok = result.is_ok(), "participant stopped");
        result.map(|Ended::Shutdown| ())
    }

    /// Serves the participant's queue until `shutdown` completes, connecting to `amqp_url`
    /// and reconnecting after every failure (broker restart, network loss, a deleted queue)
    /// with exponential backoff, and redeclaring the queue each time.
    ///
    /// Nothing is lost across a reconnection: commands unacked when the connection dropped
    /// are redelivered by the broker, and the barrier answers those that were already
    /// handled with their stored reply. While the database cannot be reached (a PostgreSQL
    /// restart, a network cut), commands wait for it, unanswered and unacked, and run again
    /// with the same backoff until it is back (the pool reconnects on its own); a command
    /// whose connection is lost under its handler waits too. They hold their handler slots
    /// meanwhile, so the participant takes no more commands than it holds: the rest stay in
    /// the queue. Creating the barrier table at start-up is retried like a connection.
    ///
    /// Every failure is logged as a warning once when an outage starts (and at debug level
    /// afterwards). Returns `Ok(())` once `shutdown` completes, and an error only for a URL
    /// that cannot be parsed or whose TLS files cannot be read ([`amqp::connect`]).
    ///
    /// The participant is served on a task of its own on the Tokio runtime, not in the
    /// caller's future: awaited in `#[tokio::main]`, that future runs on the main thread,
    /// outside the runtime's worker threads, and every delivery would wake it before a worker
    /// ran the command. Dropping the returned future stops the participant at once, as
    /// before (its commands in flight are redelivered).
    pub async fn run_forever(
        self,
        amqp_url: &str,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), RuntimeError> {
        amqp::check_url(amqp_url).map_err(RuntimeError::InvalidUrl)?;
        let url = amqp_url.to_owned();
        let serve = move |stopped| async move { self.serve_forever(&url, stopped).await };
        amqp::connection::on_a_task(serve, shutdown)
            .await
            .unwrap_or(Ok(()))
    }

    /// [`Participant::run_forever`], in the caller's future.
    async fn serve_forever(
        &self,
        amqp_url: &str,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), RuntimeError> {
        let mut sessions = Forever {
            participant: self,
            amqp_url,
            installed: !self.install_barrier,
            started: 0,
        };
        let shutdown = std::pin::pin!(shutdown);
        let serving = self.with_barrier_cleanup(amqp::keep_serving(
            &self.name,
            self.reconnect_backoff,
            shutdown,
            &mut sessions,
        ));
        match &self.relay {
            None => serving.await,
            // The relay never stops by itself; dropped when serving ends (any request it
            // published and had not settled is published again by the next relay).
            Some(relay) => tokio::select! {
                biased;
                () = serving => {}
                relayed = relay.serve_forever(amqp_url, std::future::pending()) => {
                    if let Err(error) = relayed {
                        return Err(RuntimeError::InvalidUrl(error.to_string()));
                    }
                }
            },
        }
        tracing::info!(participant = %self.name, "participant stopped");
        Ok(())
    }
}

/// The sessions of [`Participant::run_forever`], each on a connection of its own.
struct Forever<'a> {
    participant: &'a Participant,
    amqp_url: &'a str,
    /// Whether the barrier table is there (created, or not ours to create).
    installed: bool,
    /// Sessions started so far.
    started: u64,
}

impl<S: Future<Output = ()>> amqp::Sessions<S> for Forever<'_> {
    type Connection = Connection;
    type Error = RuntimeError;

    async fn connect(&mut self) -> Result<Connection, RuntimeError> {
        if !self.installed {
            barrier::install(&self.participant.pool).await?;
            self.installed = true;
        }
        // A broker that takes the connection and never answers is given up on by connect.
        Ok(amqp::connect(self.amqp_url).await?)
    }

    async fn serve(&mut self, conn: Connection, shutdown: Pin<&mut S>) -> Result<(), RuntimeError> {
        if self.started > 0 {
            Stats::bump(&self.participant.stats.0.reconnects);
        }
        self.started += 1;
        let result = self.participant.session(&conn, shutdown).await;
        if conn.status().connected() {
            let _ = conn.close(200, "OK".into()).await;
        }
        result.map(|Ended::Shutdown| ())
    }
}
