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
//! [`Participant::run`] serves on a connection the caller owns and returns when it fails;
//! [`Participant::run_forever`] owns its connection and reconnects (with backoff, redeclaring
//! the queue) after broker restarts and network failures until its shutdown signal.

use std::future::Future;
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    PublisherConfirm,
};
use sqlx::PgPool;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::amqp::{QueueOptions, batch_properties, declare_participant};
use crate::barrier::{self, BarrierError, Batch};
use crate::handler::Handler;
use crate::protocol::{
    BATCH_CONTENT_TYPE, CONTENT_TYPE, Command, MAX_BATCH, Outcome, PROTOCOL_VERSION, Reply,
    Topology, TraceParent, join_batch, split_batch,
};

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

/// AMQP header that carries why a message was dead-lettered.
pub const REASON_HEADER: &str = "x-sagas-reason";

/// AMQP header that names the queue a dead-lettered message was taken from.
pub const QUEUE_HEADER: &str = "x-sagas-queue";

/// AMQP header of the W3C trace context (`00-{trace id}-{parent id}-{flags}`).
pub const TRACEPARENT_HEADER: &str = "traceparent";

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
    /// The AMQP URL given to [`Participant::run_forever`] cannot be parsed.
    #[error("invalid AMQP URL: {0}")]
    InvalidUrl(String),
    /// A reply sent with [`send_reply`] was not confirmed (nacked, or no queue took it).
    #[error("the reply was not confirmed by the broker: {0}")]
    NotConfirmed(String),
}

/// Publishes `reply` to the orchestrator's replies queue with a publisher confirm: the way to
/// answer after the command itself was acknowledged (the final outcome of an `in_progress`
/// operation).
pub async fn send_reply(
    conn: &Connection,
    topology: &Topology,
    reply: &Reply,
) -> Result<(), RuntimeError> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let body = serde_json::to_vec(reply).map_err(|e| RuntimeError::NotConfirmed(e.to_string()))?;
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(CONTENT_TYPE.into())
        .with_message_id(reply.message_id().into())
        .with_correlation_id(reply.transaction_id.to_string().into());
    let confirmation = channel
        .basic_publish(
            "".into(),
            topology.replies_queue().as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &body,
            properties,
        )
        .await?
        .await?;
    let _ = channel.close(200, "reply sent".into()).await;
    match confirmation {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_)) => Err(RuntimeError::NotConfirmed(format!(
            "no queue {} to take it",
            topology.replies_queue()
        ))),
        Confirmation::Nack(_) => Err(RuntimeError::NotConfirmed("nacked".into())),
    }
}

/// Finishes a long-running operation that answered `in_progress`: records `outcome` in the
/// barrier and sends the reply. When the business writes that finish the work must commit with
/// the barrier, use [`barrier::complete_in`] in your transaction and then [`send_reply`].
///
/// Returns [`barrier::Completion::Undone`] (and sends nothing) when the step was compensated
/// or cancelled first: the work must then not take effect.
pub async fn complete(
    pool: &PgPool,
    conn: &Connection,
    topology: &Topology,
    cmd: &Command,
    outcome: Outcome,
) -> Result<barrier::Completion, RuntimeError> {
    let mut tx = pool.begin().await.map_err(BarrierError::from)?;
    let done = barrier::complete_in(&mut tx, cmd, &outcome).await?;
    let reply = match &done {
        barrier::Completion::Undone => {
            tx.rollback().await.map_err(BarrierError::from)?;
            return Ok(done);
        }
        barrier::Completion::Completed => cmd.reply(outcome),
        barrier::Completion::AlreadyFinal(stored) => cmd.reply(stored.clone()),
    };
    tx.commit().await.map_err(BarrierError::from)?;
    send_reply(conn, topology, &reply).await?;
    Ok(done)
}

/// Why a delivery was dead-lettered instead of being processed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// The body is not a JSON object with a `protocol` number.
    #[error("body is not a protocol message: {0}")]
    NotJson(String),
    /// The body declares a protocol version this participant does not speak.
    #[error("unsupported protocol version {0} (expected {PROTOCOL_VERSION})")]
    Version(u64),
    /// The body is not a valid command.
    #[error("invalid command: {0}")]
    Invalid(String),
    /// The message has no `reply_to` property, so the reply would have nowhere to go.
    #[error("missing reply_to property")]
    NoReplyTo,
}

/// Decodes and validates a command body (everything except the AMQP properties).
pub fn decode_command(body: &[u8]) -> Result<Command, Malformed> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| Malformed::NotJson(e.to_string()))?;
    let version = value
        .get("protocol")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| Malformed::NotJson("no numeric \"protocol\" field".to_owned()))?;
    if version != u64::from(PROTOCOL_VERSION) {
        return Err(Malformed::Version(version));
    }
    serde_json::from_value(value).map_err(|e| Malformed::Invalid(e.to_string()))
}

/// Runs `cmd` through the barrier and `handler`, never failing: barrier errors and handler
/// panics become `retry` outcomes (nothing was committed in either case).
pub async fn process(pool: &PgPool, handler: &dyn Handler, cmd: &Command) -> Outcome {
    process_within(pool, handler, cmd, None).await
}

/// [`process`] with a time limit: a handler still running after `limit` is abandoned (its
/// transaction is dropped, which rolls it back) and the outcome is `retry`.
///
/// If the limit strikes while the barrier commits, the commit may still have happened; the
/// orchestrator's next attempt then gets the stored reply, so `retry` stays safe.
pub async fn process_within(
    pool: &PgPool,
    handler: &dyn Handler,
    cmd: &Command,
    limit: Option<Duration>,
) -> Outcome {
    guarded(pool, handler, cmd, limit).await.0
}

/// The outcome, and whether the time limit struck.
async fn guarded(
    pool: &PgPool,
    handler: &dyn Handler,
    cmd: &Command,
    limit: Option<Duration>,
) -> (Outcome, bool) {
    let run = AssertUnwindSafe(barrier::execute(pool, cmd, handler)).catch_unwind();
    let result = match within(limit, run).await {
        Ok(result) => result,
        Err(limit) => {
            let limit_ms = limit.as_millis();
            tracing::warn!(
                limit_ms = limit_ms as u64,
                "handler exceeded its time limit; rolled back, replying retry"
            );
            let reason = format!("handler exceeded its time limit of {limit_ms} ms");
            return (Outcome::retry(reason), true);
        }
    };
    let outcome = match result {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(error)) => {
            tracing::warn!(%error, "barrier failed; replying retry");
            Outcome::retry(error.to_string())
        }
        Err(panic) => {
            let message = panic_message(&*panic);
            tracing::error!(panic = %message, "handler panicked; replying retry");
            Outcome::retry(format!("handler panicked: {message}"))
        }
    };
    (outcome, false)
}

/// Awaits `work`, for at most `limit` if there is one; `Err(limit)` when it strikes (and
/// `work` is dropped, which rolls back a transaction it holds).
async fn within<F: Future>(limit: Option<Duration>, work: F) -> Result<F::Output, Duration> {
    match limit {
        None => Ok(work.await),
        Some(limit) => tokio::time::timeout(limit, work).await.map_err(|_| limit),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

/// Why a batch's transaction was abandoned (and its commands run one by one).
#[derive(Debug, thiserror::Error)]
enum BatchFailure {
    #[error(transparent)]
    Barrier(#[from] BarrierError),
    #[error("a step of the batch exceeded the time limit of {} ms", .0.as_millis())]
    TimedOut(Duration),
    #[error("a handler panicked: {0}")]
    Panicked(String),
}

/// Runs the jobs' commands in one [`Batch`], without a savepoint per handler when `unguarded`
/// ([`Batch::begin_unguarded`]): each command, and the begin and the commit, within the handler
/// time limit. Any failure drops the batch, which rolls it back.
async fn in_one_transaction(
    ctx: &Context,
    jobs: &[Job],
    unguarded: bool,
) -> Result<Vec<Outcome>, BatchFailure> {
    let limit = ctx.handler_timeout;
    let cmds = jobs.iter().map(|job| &job.cmd);
    let begin = async {
        if unguarded {
            Batch::begin_unguarded(&ctx.pool, cmds).await
        } else {
            Batch::begin_for(&ctx.pool, cmds).await
        }
    };
    let mut batch = within(limit, begin)
        .await
        .map_err(BatchFailure::TimedOut)??;
    let mut outcomes = Vec::with_capacity(jobs.len());
    for job in jobs {
        let run = AssertUnwindSafe(batch.execute(&job.cmd, &*ctx.handler)).catch_unwind();
        let (next, outcome) = within(limit, run)
            .instrument(job.span.clone())
            .await
            .map_err(BatchFailure::TimedOut)?
            .map_err(|panic| BatchFailure::Panicked(panic_message(&*panic)))??;
        batch = next;
        outcomes.push(outcome);
    }
    within(limit, batch.commit())
        .await
        .map_err(BatchFailure::TimedOut)??;
    Ok(outcomes)
}

/// The outcomes of the jobs' commands, in order: from one transaction when there are several
/// and it commits; otherwise from each command alone, all at once, as [`process_within`] runs
/// it (a command that timed out, panicked or deadlocked in the batch then gets its own answer,
/// and the others are not held back by it).
///
/// While few recent commands failed, a batch first runs without savepoints; if one of its
/// handlers does not succeed, it runs again with them.
async fn outcomes(ctx: &Context, jobs: &[Job]) -> Vec<Outcome> {
    if jobs.len() > 1 {
        let unguarded = ctx.failures.unguarded(jobs.len());
        let mut result = in_one_transaction(ctx, jobs, unguarded).await;
        if matches!(result, Err(BatchFailure::Barrier(BarrierError::Unguarded))) {
            Stats::bump(&ctx.stats.0.batch_reruns);
            result = in_one_transaction(ctx, jobs, false).await;
        }
        match result {
            Ok(outcomes) => {
                Stats::bump(&ctx.stats.0.batches);
                ctx.failures.observe(&outcomes);
                return outcomes;
            }
            Err(failure) => {
                Stats::bump(&ctx.stats.0.batch_fallbacks);
                tracing::warn!(
                    participant = %ctx.participant,
                    commands = jobs.len(),
                    %failure,
                    "batch rolled back; running its commands one by one"
                );
            }
        }
    }
    let alone = jobs.iter().map(|job| {
        async {
            let (outcome, timed_out) =
                guarded(&ctx.pool, &*ctx.handler, &job.cmd, ctx.handler_timeout).await;
            if timed_out {
                Stats::bump(&ctx.stats.0.timed_out);
            }
            outcome
        }
        .instrument(job.span.clone())
    });
    futures_util::future::join_all(alone).await
}

#[derive(Debug, Default)]
struct Counters {
    processed: AtomicU64,
    rejected: AtomicU64,
    publish_failures: AtomicU64,
    unroutable_replies: AtomicU64,
    timed_out: AtomicU64,
    reconnects: AtomicU64,
    batches: AtomicU64,
    batch_fallbacks: AtomicU64,
    batch_reruns: AtomicU64,
}

/// An estimate of the share of recent batched commands that did not succeed (`failed`,
/// `retry`): it decides whether a batch first runs without savepoints.
///
/// Without them a batch saves one round trip per command, but a command that fails makes the
/// whole batch run again, with them; so a batch goes without while it expects fewer than
/// [`FailureRate::UNGUARDED_BELOW`] failing commands. Batches running at once update it
/// without coordination: it is an estimate.
#[derive(Debug, Default)]
struct FailureRate(AtomicU64);

impl FailureRate {
    /// The weight of each command in the estimate: it follows about the last 64 commands.
    const WEIGHT: f64 = 1.0 / 64.0;
    /// The most failing commands a batch may expect and still run without savepoints.
    const UNGUARDED_BELOW: f64 = 0.25;

    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }

    /// Whether a batch of `commands` should first run without savepoints.
    fn unguarded(&self, commands: usize) -> bool {
        self.get() * (commands as f64) < Self::UNGUARDED_BELOW
    }

    /// Takes the outcomes of a committed batch into the estimate.
    fn observe(&self, outcomes: &[Outcome]) {
        if outcomes.is_empty() {
            return;
        }
        let failed = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Failed { .. } | Outcome::Retry { .. }))
            .count();
        let kept = (1.0 - Self::WEIGHT).powi(outcomes.len() as i32);
        let share = failed as f64 / outcomes.len() as f64;
        let rate = self.get() * kept + share * (1.0 - kept);
        self.0.store(rate.to_bits(), Ordering::Relaxed);
    }
}

/// Live counters of a running participant; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Stats(Arc<Counters>);

impl Stats {
    /// Commands answered and acked (each element of a command batch counts).
    pub fn processed(&self) -> u64 {
        self.0.processed.load(Ordering::Relaxed)
    }

    /// Messages dead-lettered (malformed, wrong version, no `reply_to`, not a batch), each
    /// malformed element of a command batch counting as one.
    pub fn rejected(&self) -> u64 {
        self.0.rejected.load(Ordering::Relaxed)
    }

    /// Replies that could not be published (their commands were requeued).
    pub fn publish_failures(&self) -> u64 {
        self.0.publish_failures.load(Ordering::Relaxed)
    }

    /// Replies the broker could not route to their `reply_to` queue (dropped; the orchestrator
    /// times out and resends, and the barrier answers again).
    pub fn unroutable_replies(&self) -> u64 {
        self.0.unroutable_replies.load(Ordering::Relaxed)
    }

    /// Commands answered `retry` because they exceeded [`Participant::handler_timeout`].
    pub fn timed_out(&self) -> u64 {
        self.0.timed_out.load(Ordering::Relaxed)
    }

    /// Transactions that committed several commands at once (see [`Participant::batch_size`]).
    pub fn batches(&self) -> u64 {
        self.0.batches.load(Ordering::Relaxed)
    }

    /// Batches rolled back whose commands then ran one by one (a lost connection, a deadlock,
    /// a failed commit, a handler that panicked or exceeded its time limit).
    pub fn batch_fallbacks(&self) -> u64 {
        self.0.batch_fallbacks.load(Ordering::Relaxed)
    }

    /// Batches that ran without savepoints, met a handler that did not succeed, and ran again
    /// with them (see [`barrier::Batch::begin_unguarded`]).
    pub fn batch_reruns(&self) -> u64 {
        self.0.batch_reruns.load(Ordering::Relaxed)
    }

    /// Sessions [`Participant::run_forever`] started after the first (reconnections).
    pub fn reconnects(&self) -> u64 {
        self.0.reconnects.load(Ordering::Relaxed)
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
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
    queue_options: QueueOptions,
    install_barrier: bool,
    handler_timeout: Option<Duration>,
    shutdown_timeout: Duration,
    reconnect_backoff: (Duration, Duration),
    stats: Stats,
}

impl std::fmt::Debug for Participant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Participant")
            .field("name", &self.name)
            .field("topology", &self.topology)
            .field("prefetch", &self.prefetch)
            .field("concurrency", &self.concurrency)
            .field("batch_size", &self.batch_size)
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
            queue_options: QueueOptions::default(),
            install_barrier: true,
            handler_timeout: None,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            reconnect_backoff: (Duration::from_millis(100), Duration::from_secs(5)),
            stats: Stats::default(),
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
    /// handler slots ([`Participant::concurrency`]) are free; nothing waits for more to
    /// arrive. They run through the barrier in one transaction ([`barrier::Batch`]), each in a
    /// savepoint of its own, with the same outcome each would have alone, and commit at once.
    /// If the transaction fails, it is rolled back and the commands run one by one. Commands
    /// of a batch hold their row locks until it commits: for handlers that mostly update the
    /// same few rows, or that take long, prefer small batches.
    pub fn batch_size(mut self, batch_size: usize) -> Participant {
        self.batch_size = batch_size.clamp(1, MAX_BATCH_SIZE);
        self
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

    /// How long handlers in flight may still run after the shutdown signal (default 25 s);
    /// the ones still running then are abandoned (rolled back, and their commands redelivered
    /// by the broker to another process or after the restart).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Participant {
        self.shutdown_timeout = timeout;
        self
    }

    /// The delay before the first reconnection attempt of [`Participant::run_forever`] and
    /// its upper bound (it doubles in between); defaults 100 ms and 5 s.
    pub fn reconnect_backoff(mut self, initial: Duration, max: Duration) -> Participant {
        let initial = initial.max(Duration::from_millis(1));
        self.reconnect_backoff = (initial, max.max(initial));
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
    /// or a channel fails; [`Participant::run_forever`] reconnects instead.
    pub async fn run(
        self,
        conn: &Connection,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), RuntimeError> {
        if self.install_barrier {
            barrier::install(&self.pool).await?;
        }
        let mut shutdown = std::pin::pin!(shutdown);
        let result = self.session(conn, shutdown.as_mut()).await;
        tracing::info!(participant = %self.name, ok = result.is_ok(), "participant stopped");
        result.map(|Ended::Shutdown| ())
    }

    /// Serves the participant's queue until `shutdown` completes, connecting to `amqp_url`
    /// and reconnecting after every failure (broker restart, network loss, a deleted queue)
    /// with exponential backoff, and redeclaring the queue each time.
    ///
    /// Nothing is lost across a reconnection: commands unacked when the connection dropped
    /// are redelivered by the broker, and the barrier answers those that were already
    /// handled with their stored reply. Database outages need no reconnection: commands are
    /// answered `retry` meanwhile, and the pool reconnects on its own (creating the barrier
    /// table at start-up is retried like a connection).
    ///
    /// Returns `Ok(())` once `shutdown` completes, and an error only for a URL that cannot be
    /// parsed; every other failure is logged and retried.
    pub async fn run_forever(
        self,
        amqp_url: &str,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), RuntimeError> {
        amqp_url
            .parse::<lapin::uri::AMQPUri>()
            .map_err(RuntimeError::InvalidUrl)?;
        let mut shutdown = std::pin::pin!(shutdown);
        let (initial, max) = self.reconnect_backoff;
        let mut backoff = initial;
        let mut installed = !self.install_barrier;
        let mut sessions = 0u64;
        loop {
            let attempt = async {
                if !installed {
                    barrier::install(&self.pool).await?;
                    installed = true;
                }
                let conn = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
                Ok::<_, RuntimeError>(conn)
            };
            let conn = tokio::select! {
                biased;
                () = shutdown.as_mut() => break,
                conn = attempt => conn,
            };
            let failure = match conn {
                Ok(conn) => {
                    if sessions > 0 {
                        Stats::bump(&self.stats.0.reconnects);
                    }
                    sessions += 1;
                    let started = tokio::time::Instant::now();
                    let result = self.session(&conn, shutdown.as_mut()).await;
                    if conn.status().connected() {
                        let _ = conn.close(200, "OK".into()).await;
                    }
                    match result {
                        Ok(Ended::Shutdown) => break,
                        Err(error) => {
                            // A session that served for a while resets the backoff.
                            if started.elapsed() > max {
                                backoff = initial;
                            }
                            error
                        }
                    }
                }
                Err(error) => error,
            };
            tracing::warn!(
                participant = %self.name,
                error = %failure,
                retry_in_ms = backoff.as_millis() as u64,
                "participant lost the broker or the database; reconnecting"
            );
            tokio::select! {
                biased;
                () = shutdown.as_mut() => break,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(max);
        }
        tracing::info!(participant = %self.name, "participant stopped");
        Ok(())
    }

    /// One connection's worth of serving: declare, consume, dispatch, drain.
    async fn session(
        &self,
        conn: &Connection,
        mut shutdown: Pin<&mut impl Future<Output = ()>>,
    ) -> Result<Ended, RuntimeError> {
        let consume_channel = conn.create_channel().await?;
        declare_participant(
            &consume_channel,
            &self.topology,
            &self.name,
            &self.queue_options,
        )
        .await?;
        consume_channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        // Replies and dead letters share one confirm-mode channel.
        let reply_channel = conn.create_channel().await?;
        reply_channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;

        let queue = self.topology.participant_queue(&self.name);
        let tag = format!("{}.{}", self.name, uuid::Uuid::new_v4().simple());
        let mut consumer = consume_channel
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!(participant = %self.name, %queue, "participant consuming");

        let ctx = Arc::new(Context {
            participant: self.name.clone(),
            queue: queue.clone(),
            dead_letter_exchange: self.topology.dead_letter_exchange(),
            pool: self.pool.clone(),
            handler: self.handler.clone(),
            handler_timeout: self.handler_timeout,
            batch_size: self.batch_size,
            reply_channel: reply_channel.clone(),
            stats: self.stats.clone(),
            reply_channel_lost: Notify::new(),
            failures: FailureRate::default(),
        });
        let semaphore = Arc::new(Semaphore::new(self.concurrency));
        let mut in_flight = JoinSet::new();

        let result = loop {
            while in_flight.try_join_next().is_some() {}
            // Take a handler slot before taking a delivery: commands beyond the slots stay
            // with the broker (up to the prefetch), which is the backpressure.
            let permit = tokio::select! {
                biased;
                () = shutdown.as_mut() => break Ok(Ended::Shutdown),
                () = ctx.reply_channel_lost.notified() => break Err(RuntimeError::ReplyChannelClosed),
                permit = semaphore.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break Ok(Ended::Shutdown),
                },
            };
            let delivery = tokio::select! {
                biased;
                () = shutdown.as_mut() => break Ok(Ended::Shutdown),
                () = ctx.reply_channel_lost.notified() => break Err(RuntimeError::ReplyChannelClosed),
                delivery = consumer.next() => delivery,
            };
            match delivery {
                Some(Ok(delivery)) => {
                    let (mut taken, mut permits) = (vec![delivery], permit);
                    let ended = take_ready(
                        &mut consumer,
                        &semaphore,
                        (&mut taken, &mut permits),
                        self.batch_size,
                        &queue,
                    );
                    in_flight.spawn(serve(ctx.clone(), taken, permits));
                    if let Some(error) = ended {
                        break Err(error);
                    }
                }
                Some(Err(error)) => break Err(RuntimeError::Amqp(error)),
                None => break Err(RuntimeError::ConsumerEnded(queue.clone())),
            }
        };

        if consume_channel.status().connected()
            && let Err(error) = consume_channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await
        {
            tracing::warn!(%error, "could not cancel the consumer");
        }
        // Handlers in flight finish (and publish and ack) unless they outlast the deadline;
        // abandoned ones roll back and their commands, unacked, return to the queue when the
        // channel closes.
        let drained = tokio::time::timeout(self.shutdown_timeout, async {
            while in_flight.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                participant = %self.name,
                abandoned = in_flight.len(),
                "handlers still running at the shutdown deadline were abandoned; their commands will be redelivered"
            );
            in_flight.shutdown().await;
        }
        for channel in [&consume_channel, &reply_channel] {
            if channel.status().connected() {
                let _ = channel.close(200, "OK".into()).await;
            }
        }
        result
    }
}

/// Adds to `taken` the deliveries already there, without waiting for more, while a handler
/// slot is free (merged into `permits`) and up to `max`; returns the error if the consumer
/// ended meanwhile.
fn take_ready(
    consumer: &mut Consumer,
    semaphore: &Arc<Semaphore>,
    (taken, permits): (&mut Vec<Delivery>, &mut OwnedSemaphorePermit),
    max: usize,
    queue: &str,
) -> Option<RuntimeError> {
    while taken.len() < max {
        let Ok(permit) = semaphore.clone().try_acquire_owned() else {
            return None;
        };
        match consumer.next().now_or_never() {
            None => return None,
            Some(Some(Ok(delivery))) => {
                taken.push(delivery);
                permits.merge(permit);
            }
            Some(Some(Err(error))) => return Some(RuntimeError::Amqp(error)),
            Some(None) => return Some(RuntimeError::ConsumerEnded(queue.to_owned())),
        }
    }
    None
}

struct Context {
    participant: String,
    queue: String,
    dead_letter_exchange: String,
    pool: PgPool,
    handler: Arc<dyn Handler>,
    handler_timeout: Option<Duration>,
    /// The most commands run in one database transaction.
    batch_size: usize,
    reply_channel: Channel,
    stats: Stats,
    reply_channel_lost: Notify,
    /// Recent batched commands' failures: whether the next batch takes savepoints.
    failures: FailureRate,
}

fn header_string(properties: &BasicProperties, name: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// A decoded command on its way to its reply. It does not own its delivery (a command batch
/// brings many commands): the deliveries are [`Taken`], each with the range of its jobs.
struct Job {
    cmd: Command,
    trace: Option<TraceParent>,
    span: tracing::Span,
}

/// A taken delivery and what it needs to be settled.
struct Taken {
    delivery: Delivery,
    /// `None` once the message was dead-lettered whole: it is settled already.
    reply_to: Option<ShortString>,
    /// Whether it is a command batch (answered with one reply batch) or a single command.
    batch: bool,
    /// Its jobs, a range of the jobs of [`serve`] (empty when no command was valid).
    jobs: Range<usize>,
    /// An element of the batch could not be dead-lettered: the message must not be acked,
    /// or that element would be lost.
    lost_dead_letter: bool,
    /// The span of a batch (each command has its own); the command's span for a single one.
    span: tracing::Span,
}

/// The span in which a command is handled, continuing `trace` when there is one.
fn command_span(ctx: &Context, cmd: &Command, trace: Option<&TraceParent>) -> tracing::Span {
    let span = tracing::info_span!(
        "command",
        participant = %ctx.participant,
        transaction_id = %cmd.transaction_id,
        step = %cmd.step,
        operation = %cmd.operation,
        attempt = cmd.attempt,
        trace_id = tracing::field::Empty,
        parent_span_id = tracing::field::Empty,
        traceparent = tracing::field::Empty,
    );
    if let Some(trace) = trace {
        span.record("trace_id", trace.trace_id.as_str());
        span.record("parent_span_id", trace.parent_id.as_str());
        span.record("traceparent", trace.to_string().as_str());
    }
    span
}

fn reply_to(delivery: &Delivery) -> Option<ShortString> {
    delivery
        .properties
        .reply_to()
        .clone()
        .filter(|r| !r.as_str().is_empty())
}

fn is_batch(delivery: &Delivery) -> bool {
    delivery
        .properties
        .content_type()
        .as_ref()
        .is_some_and(|ct| ct.as_str() == BATCH_CONTENT_TYPE)
}

/// Decodes a delivery into jobs (appended to `jobs`), dead-lettering what is
/// malformed: a single command or a batch body that is not a batch whole, a batch element
/// alone.
async fn admit(ctx: &Context, delivery: Delivery, jobs: &mut Vec<Job>) -> Taken {
    let start = jobs.len();
    if is_batch(&delivery) {
        admit_batch(ctx, delivery, jobs).await
    } else {
        let reply_to = reply_to(&delivery);
        let decoded = decode_command(&delivery.data).and_then(|cmd| match &reply_to {
            Some(_) => Ok(cmd),
            None => Err(Malformed::NoReplyTo),
        });
        let (reply_to, span) = match decoded {
            Ok(cmd) => {
                let trace = header_string(&delivery.properties, TRACEPARENT_HEADER)
                    .and_then(|value| TraceParent::parse(&value));
                let span = command_span(ctx, &cmd, trace.as_ref());
                jobs.push(Job {
                    cmd,
                    trace,
                    span: span.clone(),
                });
                (reply_to, span)
            }
            Err(reason) => {
                reject_whole(ctx, &delivery, &reason.to_string()).await;
                (None, tracing::Span::none())
            }
        };
        Taken {
            delivery,
            reply_to,
            batch: false,
            jobs: start..jobs.len(),
            lost_dead_letter: false,
            span,
        }
    }
}

/// [`admit`] for a command batch: every element is judged on its own.
async fn admit_batch(ctx: &Context, delivery: Delivery, jobs: &mut Vec<Job>) -> Taken {
    let start = jobs.len();
    let span = tracing::info_span!(
        "command_batch",
        participant = %ctx.participant,
        message_id = ?delivery.properties.message_id(),
        elements = tracing::field::Empty,
    );
    let reply_to = reply_to(&delivery);
    let elements = split_batch(&delivery.data).and_then(|elements| match &reply_to {
        Some(_) => Ok(elements),
        None => Err(Malformed::NoReplyTo.to_string()),
    });
    let elements = match elements {
        Ok(elements) => elements,
        Err(reason) => {
            reject_whole(ctx, &delivery, &reason)
                .instrument(span.clone())
                .await;
            return Taken {
                delivery,
                reply_to: None,
                batch: true,
                jobs: start..start,
                lost_dead_letter: false,
                span,
            };
        }
    };
    span.record("elements", elements.len());
    let mut lost_dead_letter = false;
    for element in &elements {
        match decode_command(element.get().as_bytes()) {
            Ok(cmd) => {
                // A batch carries no per-command headers: the trace context is in the body.
                let trace = cmd.traceparent.as_deref().and_then(TraceParent::parse);
                let span = command_span(ctx, &cmd, trace.as_ref());
                jobs.push(Job { cmd, trace, span });
            }
            Err(reason) => {
                let reason = reason.to_string();
                tracing::warn!(
                    parent: &span,
                    participant = %ctx.participant,
                    %reason,
                    "dead-lettering a malformed command of a batch"
                );
                Stats::bump(&ctx.stats.0.rejected);
                if !dead_letter_element(ctx, element.get().as_bytes(), &reason).await {
                    lost_dead_letter = true;
                }
            }
        }
    }
    Taken {
        delivery,
        reply_to,
        batch: true,
        jobs: start..jobs.len(),
        lost_dead_letter,
        span,
    }
}

/// Dead-letters a whole delivery, with a warning, and counts it.
async fn reject_whole(ctx: &Context, delivery: &Delivery, reason: &str) {
    tracing::warn!(
        participant = %ctx.participant,
        %reason,
        message_id = ?delivery.properties.message_id(),
        "dead-lettering a malformed command"
    );
    Stats::bump(&ctx.stats.0.rejected);
    dead_letter(ctx, delivery, reason).await;
}

/// Handles deliveries taken together, from decoding to ack; never panics on bad input.
///
/// The valid commands of all the deliveries run through the barrier in transactions of at
/// most `batch_size` commands each, one after the other (a command batch can bring many
/// more). As soon as every command of a delivery has its outcome, it is answered (see
/// [`publish`]: replies to a sender of command batches travel in reply batches, several
/// deliveries' replies in one message); the confirms are awaited only once every reply is
/// published, so that the broker confirms them together, and each delivery is acked after
/// the confirm of the message that answers it.
///
/// The deliveries hold one handler slot each, whatever the number of commands they carry:
/// a command batch runs its commands one transaction at a time, so it needs no more of the
/// database than a delivery of `batch_size` single commands. The slots are freed together
/// once every reply is published (before the confirms): freed one by one, they would be taken
/// again one by one, and the next batches would be single commands.
async fn serve(ctx: Arc<Context>, deliveries: Vec<Delivery>, permits: OwnedSemaphorePermit) {
    let mut jobs = Vec::with_capacity(deliveries.len());
    let mut taken = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        taken.push(admit(&ctx, delivery, &mut jobs).await);
    }
    let mut outcomes = Vec::with_capacity(jobs.len());
    let mut chunks = jobs.chunks(ctx.batch_size);
    let mut published = Vec::with_capacity(taken.len());
    let mut next = 0;
    loop {
        // Jobs are in the order of their deliveries: those whose jobs all have their
        // outcomes (or that have none) can be answered now.
        let ready = next;
        while taken
            .get(next)
            .is_some_and(|t| t.jobs.end <= outcomes.len())
        {
            next += 1;
        }
        if next > ready {
            published.extend(publish(&ctx, &taken, ready..next, &jobs, &mut outcomes).await);
        }
        let Some(chunk) = chunks.next() else { break };
        outcomes.extend(self::outcomes(&ctx, chunk).await.into_iter().map(Some));
    }
    // The handlers are done and every reply is on its way: the slots go (all together) while
    // the confirms come, so that the next deliveries run meanwhile. The deliveries waiting for
    // confirms stay bounded by the prefetch.
    drop(permits);
    for (group, pending) in published {
        let span = taken[group[0]].span.clone();
        settle(&ctx, &taken, &group, pending).instrument(span).await;
    }
}

/// A published reply (or reply batch) whose confirm is still to come; `None` when there is
/// nothing to answer (every element of a batch was dead-lettered).
type Pending = Result<Option<(PublisherConfirm, ShortString)>, PublishError>;

/// Publishes what answers the deliveries `ready` of `taken`, whose jobs all have their
/// outcomes (taken from `outcomes`, where each is read once); returns each message published
/// with the deliveries it answers.
///
/// Where a command batch came from a `reply_to`, the sender speaks batches: the replies of
/// every delivery from that `reply_to` (batches and single commands alike) go in reply
/// batches, up to [`MAX_BATCH`] replies each, a delivery's replies never split between two.
/// A single command from a `reply_to` that sent no batch is answered alone, as always.
async fn publish(
    ctx: &Context,
    taken: &[Taken],
    ready: Range<usize>,
    jobs: &[Job],
    outcomes: &mut [Option<Outcome>],
) -> Vec<(Vec<usize>, Pending)> {
    let speaks_batches: Vec<&ShortString> = taken[ready.clone()]
        .iter()
        .filter(|t| t.batch)
        .filter_map(|t| t.reply_to.as_ref())
        .collect();
    let mut out = Vec::new();
    // Reply batches being filled: reply_to, the deliveries answered, the replies.
    let mut filling: Vec<(ShortString, Vec<usize>, Vec<Reply>)> = Vec::new();
    for index in ready {
        let t = &taken[index];
        let Some(reply_to) = &t.reply_to else {
            continue;
        };
        if t.lost_dead_letter {
            // It is requeued; its commands are answered from the barrier when it comes back.
            out.push((vec![index], Err(PublishError::DeadLetter)));
            continue;
        }
        let range = t.jobs.clone();
        let mut replies = Vec::with_capacity(range.len());
        let answered = outcomes[range.clone()].iter_mut().filter_map(Option::take);
        for (job, outcome) in jobs[range.clone()].iter().zip(answered) {
            job.span.in_scope(|| {
                tracing::debug!(status = outcome.status(), "command processed");
            });
            replies.push(job.cmd.reply(outcome));
        }
        if replies.is_empty() {
            out.push((vec![index], Ok(None)));
            continue;
        }
        if !speaks_batches.contains(&reply_to) {
            let job = &jobs[range.start];
            let pending = publish_reply(ctx, reply_to, job, &replies[0])
                .instrument(job.span.clone())
                .await
                .map(|confirm| Some((confirm, reply_to.clone())));
            out.push((vec![index], pending));
            continue;
        }
        let at = match filling.iter().position(|(r, ..)| r == reply_to) {
            Some(at) if filling[at].2.len() + replies.len() <= MAX_BATCH => at,
            found => {
                if let Some(full) = found {
                    let (reply_to, group, replies) = filling.swap_remove(full);
                    out.push(publish_batch(ctx, taken, reply_to, group, &replies).await);
                }
                filling.push((reply_to.clone(), Vec::new(), Vec::new()));
                filling.len() - 1
            }
        };
        filling[at].1.push(index);
        filling[at].2.extend(replies);
    }
    for (reply_to, group, replies) in filling {
        out.push(publish_batch(ctx, taken, reply_to, group, &replies).await);
    }
    out
}

/// Publishes one reply batch answering the deliveries `group`.
async fn publish_batch(
    ctx: &Context,
    taken: &[Taken],
    reply_to: ShortString,
    group: Vec<usize>,
    replies: &[Reply],
) -> (Vec<usize>, Pending) {
    let pending = publish_reply_batch(ctx, &reply_to, replies)
        .instrument(taken[group[0]].span.clone())
        .await
        .map(|confirm| Some((confirm, reply_to)));
    (group, pending)
}

/// Acks the deliveries `group` of `taken` once the message answering them is confirmed, or
/// requeues them.
async fn settle(ctx: &Context, taken: &[Taken], group: &[usize], pending: Pending) {
    let confirmed = match pending {
        Ok(Some((confirm, reply_to))) => match confirm.await {
            Ok(confirmation) => confirmed(ctx, &reply_to, confirmation),
            Err(error) => Err(error.into()),
        },
        Ok(None) => Ok(()),
        Err(error) => Err(error),
    };
    match confirmed {
        Ok(()) => {
            for t in group.iter().map(|&i| &taken[i]) {
                ctx.stats
                    .0
                    .processed
                    .fetch_add(t.jobs.len() as u64, Ordering::Relaxed);
                if let Err(error) = t.delivery.acker.ack(BasicAckOptions::default()).await {
                    // The broker redelivers; the barrier answers with the stored reply.
                    tracing::warn!(%error, "could not ack a command");
                }
            }
        }
        Err(error) => {
            Stats::bump(&ctx.stats.0.publish_failures);
            tracing::warn!(%error, "could not publish a reply; requeueing the command");
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            for t in group.iter().map(|&i| &taken[i]) {
                if let Err(error) = t.delivery.acker.nack(requeue).await {
                    tracing::warn!(%error, "could not nack a command");
                }
            }
            if !ctx.reply_channel.status().connected() {
                ctx.reply_channel_lost.notify_one();
            }
        }
    }
}

/// Republishes a bad delivery to the dead-letter exchange with its reason, then acks it; if
/// that fails, rejects it without requeue so that the queue's own dead-lettering keeps it
/// (without the reason).
async fn dead_letter(ctx: &Context, delivery: &Delivery, reason: &str) {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
    headers.insert(
        QUEUE_HEADER.into(),
        AMQPValue::LongString(ctx.queue.as_str().into()),
    );
    let properties = delivery
        .properties
        .clone()
        .with_delivery_mode(2)
        .with_headers(headers);
    let published = republish(ctx, &delivery.data, properties).await;
    let result = match published {
        Ok(true) => delivery.acker.ack(BasicAckOptions::default()).await,
        Ok(false) | Err(_) => {
            tracing::warn!(
                ?published,
                "could not republish a dead letter; rejecting it"
            );
            delivery
                .acker
                .reject(BasicRejectOptions { requeue: false })
                .await
        }
    };
    if let Err(error) = result {
        tracing::warn!(%error, "could not settle a malformed command");
    }
}

/// Dead-letters one malformed element of a command batch: republishes it alone, as a single
/// message, to the dead-letter exchange with its reason. Returns whether the broker confirmed
/// it (if not, the batch must come back so that the element is not lost).
async fn dead_letter_element(ctx: &Context, element: &[u8], reason: &str) -> bool {
    let mut headers = FieldTable::default();
    headers.insert(REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
    headers.insert(
        QUEUE_HEADER.into(),
        AMQPValue::LongString(ctx.queue.as_str().into()),
    );
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(CONTENT_TYPE.into())
        .with_headers(headers);
    match republish(ctx, element, properties).await {
        Ok(true) => true,
        published => {
            tracing::warn!(
                ?published,
                "could not dead-letter an element of a batch; the batch will be requeued"
            );
            false
        }
    }
}

/// Publishes to the dead-letter exchange and awaits the confirm: whether the broker took it.
async fn republish(
    ctx: &Context,
    body: &[u8],
    properties: BasicProperties,
) -> Result<bool, lapin::Error> {
    let confirmation = ctx
        .reply_channel
        .basic_publish(
            ctx.dead_letter_exchange.as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await?
        .await?;
    Ok(confirmation.is_ack())
}

#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
    #[error("the broker refused (nacked) the reply")]
    Nacked,
    #[error("could not encode the reply: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("a malformed element of the batch could not be dead-lettered")]
    DeadLetter,
}

/// Publishes a job's reply; the confirm is awaited by [`settle`].
async fn publish_reply(
    ctx: &Context,
    reply_to: &ShortString,
    job: &Job,
    reply: &Reply,
) -> Result<PublisherConfirm, PublishError> {
    let payload = serde_json::to_vec(reply)?;
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(CONTENT_TYPE.into())
        .with_message_id(reply.message_id().into())
        .with_correlation_id(job.cmd.transaction_id.to_string().into());
    if let Some(trace) = &job.trace {
        // The reply belongs to the same trace; the orchestrator may continue it.
        let mut headers = FieldTable::default();
        headers.insert(
            TRACEPARENT_HEADER.into(),
            AMQPValue::LongString(trace.to_string().into()),
        );
        properties = properties.with_headers(headers);
    }
    publish_to(ctx, reply_to, &payload, properties).await
}

/// Publishes a reply (or reply batch) to `reply_to` through the default exchange, `mandatory`
/// so that a missing queue is reported; the confirm is awaited by [`settle`].
async fn publish_to(
    ctx: &Context,
    reply_to: &ShortString,
    payload: &[u8],
    properties: BasicProperties,
) -> Result<PublisherConfirm, PublishError> {
    let confirm = ctx
        .reply_channel
        .basic_publish(
            "".into(),
            reply_to.clone(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            payload,
            properties,
        )
        .await?;
    Ok(confirm)
}

/// Publishes replies, in order, as one reply batch; the confirm is awaited by [`settle`].
async fn publish_reply_batch(
    ctx: &Context,
    reply_to: &ShortString,
    replies: &[Reply],
) -> Result<PublisherConfirm, PublishError> {
    let encoded = replies
        .iter()
        .map(serde_json::to_vec)
        .collect::<Result<Vec<_>, _>>()?;
    let payload = join_batch(encoded.iter().map(Vec::as_slice));
    let first = replies.first().map(Reply::message_id).unwrap_or_default();
    publish_to(
        ctx,
        reply_to,
        &payload,
        batch_properties(&first, replies.len()),
    )
    .await
}

/// Whether a confirmation means the reply is delivered (or can never be).
fn confirmed(
    ctx: &Context,
    reply_to: &ShortString,
    confirmation: Confirmation,
) -> Result<(), PublishError> {
    match confirmation {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_returned)) => {
            // Nobody can take the reply now; requeueing would loop. The orchestrator's timeout
            // resends the command and the barrier answers again.
            Stats::bump(&ctx.stats.0.unroutable_replies);
            tracing::warn!(%reply_to, "reply unroutable (no such queue); dropped");
            Ok(())
        }
        Confirmation::Nack(_) => Err(PublishError::Nacked),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn command_json() -> serde_json::Value {
        json!({
            "protocol": 1,
            "transaction_id": uuid::Uuid::nil(),
            "definition": "transfer",
            "step": "debit",
            "operation": "try",
            "attempt": 1,
            "payload": {"amount": 5}
        })
    }

    #[test]
    fn a_valid_command_decodes() {
        let body = serde_json::to_vec(&command_json()).unwrap();
        let cmd = decode_command(&body).unwrap();
        assert_eq!(cmd.step, "debit");
    }

    #[test]
    fn garbage_wrong_versions_and_unknown_operations_are_malformed() {
        assert!(matches!(
            decode_command(b"not json"),
            Err(Malformed::NotJson(_))
        ));
        let mut v2 = command_json();
        v2["protocol"] = json!(2);
        assert_eq!(
            decode_command(&serde_json::to_vec(&v2).unwrap()),
            Err(Malformed::Version(2))
        );
        let mut unknown = command_json();
        unknown["operation"] = json!("commit");
        assert!(matches!(
            decode_command(&serde_json::to_vec(&unknown).unwrap()),
            Err(Malformed::Invalid(_))
        ));
    }

    fn outcomes(failed: usize, succeeded: usize) -> Vec<Outcome> {
        let mut all = vec![Outcome::failed("no"); failed];
        all.extend(vec![Outcome::succeeded(json!(null)); succeeded]);
        all
    }

    #[test]
    fn batches_go_without_savepoints_until_their_commands_fail_often_and_again_once_they_stop() {
        let rate = FailureRate::default();
        assert!(rate.unguarded(32), "nothing failed yet");
        rate.observe(&outcomes(1, 7));
        assert!(
            rate.unguarded(8),
            "one failure now and then keeps batches unguarded"
        );
        for _ in 0..20 {
            rate.observe(&outcomes(2, 6));
        }
        assert!(!rate.unguarded(8), "a quarter failing: savepoints");
        let mut batches = 0;
        while !rate.unguarded(8) {
            rate.observe(&outcomes(0, 8));
            batches += 1;
            assert!(batches < 100, "the estimate follows recent commands");
        }
        assert!(
            batches > 5,
            "one good batch does not undo a long run of failures"
        );
    }

    #[test]
    fn transient_failures_count_as_failures_and_in_progress_does_not() {
        let rate = FailureRate::default();
        for _ in 0..200 {
            rate.observe(&[Outcome::retry("busy"), Outcome::InProgress { note: None }]);
        }
        assert!((rate.get() - 0.5).abs() < 0.05, "{}", rate.get());
        rate.observe(&[]);
        assert!(
            (rate.get() - 0.5).abs() < 0.05,
            "an empty batch changes nothing"
        );
    }
}
