//! Exactly-once effects in the participant's own PostgreSQL database.
//!
//! Commands arrive at least once, possibly out of order (a cancel can overtake its try) and
//! possibly concurrently (a redelivery while the first delivery is still running). The barrier
//! is a row per `(transaction id, step, operation)` in `sagas_barrier`, inserted in the same
//! database transaction as the business change, before the handler runs:
//!
//! - **Duplicates**: the row already exists, so the stored reply is returned and the handler
//!   does not run again. A concurrent duplicate waits on the primary key until the first one
//!   commits (then it sees the row) or rolls back (then it runs itself).
//! - **Null compensation**: an undo (`compensate`/`cancel`) first inserts the row of its
//!   forward operation (`action`/`try`) on its behalf, origin `guard`. If that insert succeeds,
//!   or the forward operation had replied `failed`, the forward operation never took effect:
//!   the undo changes nothing and replies `succeeded` with `{"null_compensation": true}`.
//! - **Anti-hanging**: a forward operation arriving after its undo finds the `guard` row and
//!   returns its stored reply, a `failed` refusal, without running.
//!
//! Everything runs at READ COMMITTED: each statement after a wait on the key takes a new
//! snapshot and so sees the row that the other transaction committed.
//!
//! Several commands can share one transaction and its commit ([`Batch`]), with the outcomes and
//! rows they would have one after the other.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::handler::{Handler, HandlerError};
use crate::protocol::{Command, Operation, Outcome};

/// The barrier schema (the barrier table and its cleanup horizon); idempotent, run by
/// [`install`].
pub const SCHEMA: &str = concat!(
    include_str!("../migrations/0001_barrier.sql"),
    include_str!("../migrations/0002_barrier_retention.sql"),
);

/// Errors of the barrier itself (not of the handler); the runtime replies `retry` for them.
#[derive(Debug, thiserror::Error)]
pub enum BarrierError {
    /// The participant database failed or is unreachable.
    #[error("barrier database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A barrier row exists but holds no usable reply (edited by hand, or removed by
    /// [`cleanup`] while in use).
    #[error("barrier row {transaction_id}/{step}/{operation} is unusable: {detail}")]
    Inconsistent {
        /// The transaction id.
        transaction_id: Uuid,
        /// The step name.
        step: String,
        /// The operation.
        operation: Operation,
        /// What is wrong with the row.
        detail: String,
    },
    /// [`complete_in`] was given an outcome that is not final (`retry` or `in_progress`).
    #[error("an operation can only be completed as succeeded or failed")]
    NotFinal,
    /// [`cleanup`] was given a negative retention.
    #[error("the barrier retention must not be negative")]
    NegativeRetention,
    /// A handler of a batch begun with [`Batch::begin_unguarded`] did not succeed: without a
    /// savepoint of its own, its writes cannot be undone alone. Drop the batch (which rolls it
    /// back) and run its commands again in a batch begun with [`Batch::begin_for`].
    #[error("a handler did not succeed in a batch without savepoints")]
    Unguarded,
}

impl BarrierError {
    /// Whether the database could not be reached or its connection was lost (the server shut
    /// down or restarted, the network failed, no connection could be had in time): nothing
    /// of the command was committed (or, if the answer to the commit was lost, all of it
    /// was), and running it again once the database is back is the way on. The runtime waits
    /// for the database then, instead of answering `retry`.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, BarrierError::Database(error) if connection_lost(error))
    }
}

/// Whether `error` says that the database is unreachable or the connection was lost.
fn connection_lost(error: &sqlx::Error) -> bool {
    match error {
        // The server shutting down or not ready (57P01-57P03), too many connections (53300),
        // connection exceptions (08…).
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            matches!(&*code, "57P01" | "57P02" | "57P03" | "53300") || code.starts_with("08")
        }),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

/// Why a barrier row exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// The operation's handler ran (succeeded or failed for business reasons).
    Handler,
    /// An undo found that its forward operation never took effect, and did nothing.
    NullCompensation,
    /// A forward-operation row written by its undo so that the late forward operation is refused.
    Guard,
}

impl Origin {
    /// The value stored in the `origin` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Handler => "handler",
            Origin::NullCompensation => "null_compensation",
            Origin::Guard => "guard",
        }
    }

    /// Parses a stored `origin` value.
    pub fn parse(s: &str) -> Option<Origin> {
        [Origin::Handler, Origin::NullCompensation, Origin::Guard]
            .into_iter()
            .find(|o| o.as_str() == s)
    }
}

/// One row of `sagas_barrier`, for inspection and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct BarrierRecord {
    /// The transaction id.
    pub transaction_id: Uuid,
    /// The step name.
    pub step: String,
    /// The operation, as stored (a wire name).
    pub operation: String,
    /// Why the row exists (`None` if the stored value is unknown to this version).
    pub origin: Option<Origin>,
    /// The stored reply.
    pub reply: Option<Outcome>,
    /// When the row was inserted (database clock).
    pub created_at: DateTime<Utc>,
}

/// Creates the barrier table if it does not exist; safe to call concurrently at every start-up.
///
/// It does not use sqlx's migration table on purpose: the participant's database belongs to
/// the participant, which may run its own migrations.
pub async fn install(pool: &PgPool) -> Result<(), BarrierError> {
    Ok(install_schema(pool, "sagas_barrier", SCHEMA).await?)
}

/// Runs the idempotent `schema` in one transaction under the advisory lock named `lock`:
/// concurrent `CREATE TABLE IF NOT EXISTS` can still fail on the catalog's unique index.
pub(crate) async fn install_schema(
    pool: &PgPool,
    lock: &str,
    schema: &'static str,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(lock)
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(schema).execute(&mut *tx).await?;
    tx.commit().await
}

/// Runs `cmd` through the barrier and `handler`, exactly once per `(transaction, step, operation)`.
///
/// Returns the outcome to reply with: the handler's (`failed` for [`HandlerError::Business`],
/// `retry` for transient and database errors), or the stored one for a duplicate, a null
/// compensation or a refused late forward operation. When the database cannot be reached or
/// the connection is lost, also under the handler, it returns the error
/// ([`BarrierError::is_unavailable`]): run the command again once the database is back.
///
/// A business failure of a forward operation is stored (its writes are rolled back through a
/// savepoint) so that redeliveries get the same answer. A business failure of `confirm`,
/// `compensate` or `cancel` is not stored: those must eventually succeed, and once the
/// participant is fixed, the orchestrator's (or an operator's) retry must run the handler again.
pub async fn execute(
    pool: &PgPool,
    cmd: &Command,
    handler: &dyn Handler,
) -> Result<Outcome, BarrierError> {
    execute_on(&mut *pool.acquire().await?, cmd, handler).await
}

/// [`execute`] in a transaction on `conn`.
pub(crate) async fn execute_on(
    conn: &mut PgConnection,
    cmd: &Command,
    handler: &dyn Handler,
) -> Result<Outcome, BarrierError> {
    let mut tx = sqlx::Connection::begin(conn).await?;
    match execute_in(&mut tx, cmd, handler, &[], None, true).await? {
        Executed::Keep { outcome, to_record } => {
            if let Some(origin) = to_record {
                record(&mut tx, cmd, origin, &outcome).await?;
            }
            tx.commit().await?;
            Ok(outcome)
        }
        // The connection is gone: the command was not run, whatever its handler says.
        Executed::Discard(HandlerError::Database(error)) if connection_lost(&error) => {
            Err(error.into())
        }
        Executed::Discard(error) => {
            tx.rollback().await?;
            Ok(error.to_outcome())
        }
    }
}

/// What [`execute_in`] decided for one command.
enum Executed {
    /// Keep everything the command wrote (its barrier rows and the handler's writes); the
    /// outcome is final once the transaction commits.
    Keep {
        /// The command's outcome.
        outcome: Outcome,
        /// The origin to store with the outcome in the command's own row, which holds no reply
        /// yet; `None` when the row already held it (a duplicate).
        to_record: Option<Origin>,
    },
    /// Undo everything the command wrote, its barrier row included, so that a redelivery runs
    /// the handler again; the reply is the error's outcome (`retry`, or `failed` for an undo).
    Discard(HandlerError),
}

/// The barrier and the handler for one command, on a connection inside a transaction.
///
/// `pending` are the replies of the transaction's earlier commands not yet written to their rows
/// (see [`Batch`]); they are read from there instead of from the rows.
///
/// The caller owns the scope of the command: it records the reply that [`Executed::Keep`] asks
/// for (at once, or with the batch's before its commit) and commits what it says to keep;
/// on [`Executed::Discard`] it rolls the transaction back, or, in a batch, undoes the command
/// alone with [`discard`]. An error leaves the transaction in an unknown state (perhaps
/// aborted): the caller must roll it back whole.
///
/// Without `savepoint` the handler runs straight in the transaction, and anything but a
/// success (or `in_progress`) is [`BarrierError::Unguarded`]: its writes could only be undone
/// with everything else.
async fn execute_in(
    conn: &mut PgConnection,
    cmd: &Command,
    handler: &dyn Handler,
    pending: &[PendingReply],
    claimed: Option<bool>,
    savepoint: bool,
) -> Result<Executed, BarrierError> {
    let op = cmd.operation;
    // `claimed`: the batch already inserted the command's row, or found it there
    // (`Batch::begin_for`).
    let inserted = match claimed {
        Some(inserted) => inserted,
        None => insert(conn, cmd, op, Origin::Handler, None).await?,
    };
    if !inserted {
        let outcome = match pending_reply(pending, cmd, op) {
            Some(outcome) => outcome.clone(),
            None => stored_reply(conn, cmd, op).await?,
        };
        return Ok(Executed::Keep {
            outcome,
            to_record: None,
        });
    }

    if op.is_undo() {
        let forward = op.forward();
        let refusal = Outcome::failed(format!(
            "{forward} refused: it arrived after its {op} (anti-hanging)"
        ));
        let took_effect = |reply: &Outcome| {
            matches!(
                reply,
                Outcome::Succeeded { .. } | Outcome::InProgress { .. }
            )
        };
        // The forward row is locked so that a completion of a long-running forward operation
        // (`complete_in`) and this undo happen one after the other. A forward row written by
        // this transaction needs no lock (no other transaction sees it) and may hold no reply
        // yet: its reply is pending.
        let forward_took_effect =
            if insert(conn, cmd, forward, Origin::Guard, Some(&refusal)).await? {
                false
            } else {
                match pending_reply(pending, cmd, forward) {
                    Some(reply) => took_effect(reply),
                    None => took_effect(&locked_reply(conn, cmd, forward).await?),
                }
            };
        if !forward_took_effect {
            return Ok(Executed::Keep {
                outcome: Outcome::succeeded(json!({ "null_compensation": true })),
                to_record: Some(Origin::NullCompensation),
            });
        }
    }

    // The savepoint lets a business failure undo the handler's writes (and recover from a
    // statement error that aborted the transaction) while the barrier row survives. It is
    // never released: committing the transaction commits the savepoint's work too, so the
    // success path saves the RELEASE round trip.
    if savepoint {
        sqlx::raw_sql("SAVEPOINT sagas_barrier_handler")
            .execute(&mut *conn)
            .await?;
    }
    let outcome = match handler.handle(cmd, conn).await {
        Ok(output) => Outcome::succeeded(output),
        // Accepted: the handler's writes stay, and the reply says so until completed.
        Err(HandlerError::InProgress(note)) => Outcome::InProgress { note },
        Err(HandlerError::Database(error)) if !savepoint && ends_the_batch(&error) => {
            return Err(error.into());
        }
        Err(_) if !savepoint => return Err(BarrierError::Unguarded),
        Err(HandlerError::Business(reason)) if op.is_forward() => {
            sqlx::raw_sql("ROLLBACK TO SAVEPOINT sagas_barrier_handler")
                .execute(&mut *conn)
                .await?;
            Outcome::failed(reason)
        }
        Err(error) => return Ok(Executed::Discard(error)),
    };
    Ok(Executed::Keep {
        outcome,
        to_record: Some(Origin::Handler),
    })
}

/// Several commands in one database transaction and one commit, each run through the barrier
/// exactly as [`execute`] would run it alone.
///
/// What [`execute`] would roll back for a command (a transient or database error of its
/// handler, a business failure of an undo) is undone for that command alone: its handler's
/// writes are rolled back to the handler's savepoint and its barrier row is deleted, and the
/// other commands are unaffected. A later command sees what the earlier ones wrote, so a
/// duplicate in the same batch gets the stored reply, and a try followed by its cancel (or a
/// cancel by its try) ends as it would in two transactions one after the other.
///
/// The replies are written to the commands' barrier rows all at once, in one statement just
/// before the commit; until then the batch keeps them in memory, and its later commands (a
/// duplicate, an undo looking at its forward operation) read them from there. The rows end
/// exactly as [`execute`] leaves them; only a handler reading `sagas_barrier` itself would see
/// the rows of the batch's earlier commands without their replies.
///
/// Statements (round trips) for a forward operation whose handler makes one write: alone
/// ([`execute`]), 6 — `BEGIN`, the barrier row's `INSERT`, `SAVEPOINT`, the handler's write,
/// the reply's `UPDATE`, `COMMIT`. In a batch, 3 per command — `INSERT`, `SAVEPOINT`, the
/// handler's write — and 3 per batch: `BEGIN`, the upsert of every reply, `COMMIT`. A batch
/// begun with [`Batch::begin_for`] inserts its commands' rows with one statement, sent with
/// its `BEGIN`: 2 per command and 3 per batch (a batch of one command: 5 in all; 4 begun with
/// [`Batch::begin_unguarded`], the runtime's lone command, against 5 before the claim rode
/// with the `BEGIN`). A batch holding a redelivered command takes 2 more (the claim again,
/// after a `BEGIN` of its own). A
/// discarded command costs 2 more (`ROLLBACK TO SAVEPOINT`, `DELETE` of its row), a duplicate
/// 1 or 2 (`INSERT`, then `SELECT` of the stored reply unless it is the batch's own).
///
/// A batch begun with [`Batch::begin_unguarded`] takes no savepoint per command: 1 statement
/// less per command, for batches whose commands seldom fail. There a handler that does not
/// succeed ends the batch with [`BarrierError::Unguarded`], and the caller runs the commands
/// again in a batch begun with [`Batch::begin_for`] ([`execute_batch`] does).
///
/// Any other error (from [`Batch::execute`] or [`Batch::commit`]) is a failure of the transaction
/// itself: the connection was lost, a statement failed outside a handler, a handler hit a
/// deadlock or a serialization failure, or the commit failed. Nothing of the batch may then be
/// assumed to have committed: drop the batch (which rolls it back), do not reply with its
/// outcomes, and run its commands one by one with [`execute`] instead. If the commit did
/// happen after all (the connection broke while it was acknowledged), those runs find the
/// stored replies.
///
/// Every command holds its row locks until the batch commits, so handlers that update the
/// same rows from many commands make the batches wait for each other. Batches whose commands
/// run in [`lock_order`] (the runtime's, and [`execute_batch`]'s) take those rows in one order
/// and do not deadlock over them; other deadlocks (handlers that lock several shared rows, or
/// rows they give no key for) are resolved by the fallback. A discarded command's barrier row key, and the lock an undo
/// takes on its forward row, are also held until the batch ends. Each command takes one
/// subtransaction (its handler's savepoint), plus those its handler takes; keep batches to at
/// most 32 commands, since past 64 subtransactions in one transaction PostgreSQL's per-backend
/// cache overflows and every snapshot in the database gets slower.
pub struct Batch {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    /// The replies of the commands so far, written to their rows by [`Batch::commit`].
    pending: Vec<PendingReply>,
    /// The rows claimed up front by [`Batch::begin_for`], each with whether this batch
    /// inserted it (false: it was there already); taken by the command's [`Batch::execute`].
    claimed: HashMap<(Uuid, String, Operation), bool>,
    /// Whether each handler runs inside a savepoint of its own (false: [`Batch::begin_unguarded`]).
    savepoints: bool,
}

/// The reply of a command of a [`Batch`], to be written to its row (which holds none yet)
/// before the batch commits.
struct PendingReply {
    transaction_id: Uuid,
    step: String,
    operation: Operation,
    origin: Origin,
    outcome: Outcome,
}

/// The pending reply of `operation` for `cmd`'s transaction and step, if any.
fn pending_reply<'p>(
    pending: &'p [PendingReply],
    cmd: &Command,
    operation: Operation,
) -> Option<&'p Outcome> {
    pending
        .iter()
        .find(|p| {
            p.transaction_id == cmd.transaction_id && p.operation == operation && p.step == cmd.step
        })
        .map(|p| &p.outcome)
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").finish_non_exhaustive()
    }
}

impl Batch {
    /// Begins the batch's transaction on a connection from `pool`.
    pub async fn begin(pool: &PgPool) -> Result<Batch, BarrierError> {
        Ok(Batch::on(pool.begin().await?, HashMap::new()))
    }

    /// A batch in `tx`, whose rows `claimed` are inserted (or found), with savepoints.
    fn on(
        tx: sqlx::Transaction<'static, sqlx::Postgres>,
        claimed: HashMap<(Uuid, String, Operation), bool>,
    ) -> Batch {
        Batch {
            tx,
            pending: Vec::new(),
            claimed,
            savepoints: true,
        }
    }

    /// Begins the batch for `cmds`, the commands it will execute in this order (run them in
    /// [`lock_order`] to keep batches from deadlocking). Their barrier rows are inserted first,
    /// at once, in one statement sent with the `BEGIN` (in key order, so that two batches
    /// claiming the same rows wait for each other before either takes a handler's row),
    /// instead of one `INSERT` per command after it; each command then finds its row
    /// claimed, or there already (a duplicate: then the rows are claimed again after a
    /// `BEGIN` of their own, two round trips more and a connection taken again, see
    /// [`claimed_as_begun`]). That
    /// is what the commands would do one after the other, with one exception kept to the
    /// one-by-one order: the row of a forward operation whose undo is in the batch too (the
    /// undo looks for it, and must not find it claimed but not run). A command not in `cmds`
    /// runs as in a batch from [`Batch::begin`].
    pub async fn begin_for<'c>(
        pool: &PgPool,
        cmds: impl IntoIterator<Item = &'c Command>,
    ) -> Result<Batch, BarrierError> {
        let cmds: Vec<&Command> = cmds.into_iter().collect();
        let keys = claim_keys(&to_claim(&cmds));
        if keys.is_empty() {
            return Batch::begin(pool).await;
        }
        if let Some(tx) = claimed_as_begun(pool, &keys).await? {
            let claimed = keys
                .into_iter()
                .map(|(t, s, o)| ((t, s.to_owned(), o), true));
            return Ok(Batch::on(tx, claimed.collect()));
        }
        let mut batch = Batch::begin(pool).await?;
        batch.claimed = claim_all(&mut batch.tx, keys).await?;
        Ok(batch)
    }

    /// Begins the batch for `cmds` as [`Batch::begin_for`] does, but its handlers run without
    /// a savepoint each: one round trip less per command. The first handler that does not
    /// succeed (a business failure, a transient or a database error) ends the batch with
    /// [`BarrierError::Unguarded`]; drop it and run the commands again in a batch from
    /// [`Batch::begin_for`]. Worth it when failures are rare: every command before the failing
    /// one then runs twice (its writes once).
    pub async fn begin_unguarded<'c>(
        pool: &PgPool,
        cmds: impl IntoIterator<Item = &'c Command>,
    ) -> Result<Batch, BarrierError> {
        let mut batch = Batch::begin_for(pool, cmds).await?;
        batch.savepoints = false;
        Ok(batch)
    }

    /// Runs `cmd` through the barrier and `handler` in the batch; returns the batch, to go on
    /// with, and the command's outcome, final once [`Batch::commit`] succeeds.
    ///
    /// The batch is consumed: after an error (or when the future is dropped, e.g. by a time
    /// limit) it cannot be committed.
    pub async fn execute(
        mut self,
        cmd: &Command,
        handler: &dyn Handler,
    ) -> Result<(Batch, Outcome), BarrierError> {
        let claimed = if self.claimed.is_empty() {
            None
        } else {
            self.claimed
                .remove(&(cmd.transaction_id, cmd.step.clone(), cmd.operation))
        };
        let outcome = match execute_in(
            &mut self.tx,
            cmd,
            handler,
            &self.pending,
            claimed,
            self.savepoints,
        )
        .await?
        {
            Executed::Keep {
                outcome,
                to_record: None,
            } => outcome,
            Executed::Keep {
                outcome,
                to_record: Some(origin),
            } => {
                self.pending.push(PendingReply {
                    transaction_id: cmd.transaction_id,
                    step: cmd.step.clone(),
                    operation: cmd.operation,
                    origin,
                    outcome: outcome.clone(),
                });
                outcome
            }
            Executed::Discard(HandlerError::Database(error)) if ends_the_batch(&error) => {
                return Err(error.into());
            }
            Executed::Discard(error) => {
                discard(&mut self.tx, cmd).await?;
                error.to_outcome()
            }
        };
        Ok((self, outcome))
    }

    /// Commits every command of the batch at once, after writing their replies to their rows.
    pub async fn commit(mut self) -> Result<(), BarrierError> {
        record_all(&mut self.tx, &self.pending).await?;
        self.tx.commit().await?;
        Ok(())
    }
}

/// Runs `cmds` in one [`Batch`], in [`lock_order`], and returns their outcomes in the order of
/// `cmds`; on an error nothing was committed (or, if the commit's answer was lost, everything
/// was): run the commands one by one with [`execute`].
///
/// The batch first runs without savepoints ([`Batch::begin_unguarded`]); if a handler does not
/// succeed, it is rolled back and run again with them.
pub async fn execute_batch(
    pool: &PgPool,
    cmds: &[Command],
    handler: &dyn Handler,
) -> Result<Vec<Outcome>, BarrierError> {
    let order = handler_lock_order(handler, cmds);
    let ordered: Vec<&Command> = order.iter().map(|&i| &cmds[i]).collect();
    let run = |batch| run_batch(batch, &ordered, handler);
    let outcomes = match run(Batch::begin_unguarded(pool, ordered.iter().copied()).await?).await {
        Err(BarrierError::Unguarded) => {
            run(Batch::begin_for(pool, ordered.iter().copied()).await?).await
        }
        done => done,
    }?;
    Ok(in_given_order(&order, outcomes))
}

/// [`lock_order`] for `cmds`, with the keys `handler` gives them.
pub(crate) fn handler_lock_order<'c>(
    handler: &dyn Handler,
    cmds: impl IntoIterator<Item = &'c Command>,
) -> Vec<usize> {
    let cmds: Vec<&Command> = cmds.into_iter().collect();
    let keys: Vec<Option<String>> = cmds.iter().map(|cmd| handler.lock_key(cmd)).collect();
    let keyed: Vec<(Option<&str>, &Command)> =
        keys.iter().map(Option::as_deref).zip(cmds).collect();
    lock_order(&keyed)
}

/// The results of items run in `order` (indexes into the items), back in the items' order.
pub(crate) fn in_given_order<T>(order: &[usize], results: Vec<T>) -> Vec<T> {
    let mut slots: Vec<Option<T>> = std::iter::repeat_with(|| None).take(order.len()).collect();
    for (&i, result) in order.iter().zip(results) {
        slots[i] = Some(result);
    }
    slots.into_iter().flatten().collect()
}

/// Runs `cmds` in `batch` and commits it.
async fn run_batch(
    mut batch: Batch,
    cmds: &[&Command],
    handler: &dyn Handler,
) -> Result<Vec<Outcome>, BarrierError> {
    let mut outcomes = Vec::with_capacity(cmds.len());
    for cmd in cmds {
        let (next, outcome) = batch.execute(cmd, handler).await?;
        batch = next;
        outcomes.push(outcome);
    }
    batch.commit().await?;
    Ok(outcomes)
}

/// Undoes what a command of a batch wrote, for [`Executed::Discard`], leaving the transaction
/// as if the command had never run: what the handler wrote (and a statement error that aborted
/// the transaction) is rolled back to the handler's savepoint, then the command's own barrier
/// row, written before that savepoint, is deleted.
///
/// The own row is the only one to delete: [`execute_in`] discards only after running the
/// handler, and an undo whose guard insert succeeded (the only other row a command inserts) is
/// a null compensation and never runs its handler. The row lock taken on a forward row that was
/// found (`locked_reply`) stays held until the batch ends, and so does the deleted row's key: a
/// concurrent delivery of the same operation waits for the batch instead of for this command.
async fn discard(conn: &mut PgConnection, cmd: &Command) -> Result<(), BarrierError> {
    sqlx::raw_sql("ROLLBACK TO SAVEPOINT sagas_barrier_handler")
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "DELETE FROM sagas_barrier \
         WHERE transaction_id = $1 AND step = $2 AND operation = $3",
    )
    .bind(cmd.transaction_id)
    .bind(&cmd.step)
    .bind(cmd.operation.as_str())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Whether a handler's database error fails the whole batch rather than only its command.
///
/// A statement that failed (a constraint, a bad query, a lock timeout) only aborted the
/// command's savepoint, which the batch rolls back to, as a single command's transaction
/// would roll back. A deadlock or a serialization failure also involves the batch's earlier
/// commands' locks, and the commands alone would most likely pass; a lost connection or a
/// broken protocol leaves nothing to roll back to.
fn ends_the_batch(error: &sqlx::Error) -> bool {
    match error {
        // Deadlock, serialization failure.
        sqlx::Error::Database(db)
            if db.code().is_some_and(|c| matches!(&*c, "40P01" | "40001")) =>
        {
            true
        }
        sqlx::Error::Protocol(_) => true,
        other => connection_lost(other),
    }
}

/// Deletes the barrier rows of transactions whose every row is older than `older_than`, in
/// batches (one statement each, so it never holds many locks for long); returns the number of
/// rows deleted. When it deleted any, it records its cutoff as the cleanup horizon
/// (`sagas_barrier_retention`), which `sagactl reconcile` reads: transactions created before it
/// are not compared with their (possibly deleted) rows.
///
/// The retention must exceed the longest time a transaction can stay open (its steps'
/// timeouts and retries, and the time an operator may take to resolve a stuck instance):
/// deleting the rows of an open transaction would let a redelivered forward operation run
/// again, or a late one run after its undo (hanging). Two rules keep what can be seen to be
/// open whatever the retention: a transaction with any row newer than the retention is kept
/// whole, and so is one with a TCC `try` that succeeded and has neither its `confirm` nor its
/// `cancel` yet (every successful try ends with one of them). A saga action that succeeded
/// looks the same whether its transaction completed or will still be compensated, so for
/// sagas the retention alone protects. See docs/participant.md for a schedule.
pub async fn cleanup(pool: &PgPool, older_than: chrono::Duration) -> Result<u64, BarrierError> {
    if older_than < chrono::Duration::zero() {
        return Err(BarrierError::NegativeRetention);
    }
    let seconds = older_than.num_milliseconds() as f64 / 1000.0;
    let (cutoff,): (DateTime<Utc>,) = sqlx::query_as(CLEANUP_CUTOFF)
        .bind(seconds)
        .fetch_one(pool)
        .await?;
    let mut deleted = 0;
    let mut from = (DateTime::<Utc>::UNIX_EPOCH, Uuid::nil());
    loop {
        let (n, last_at, last_id): (i64, Option<DateTime<Utc>>, Option<Uuid>) =
            sqlx::query_as(CLEANUP_BATCH)
                .bind(cutoff)
                .bind(from.0)
                .bind(from.1)
                .bind(CLEANUP_BATCH_ROWS)
                .fetch_one(pool)
                .await?;
        deleted += u64::try_from(n).unwrap_or(0);
        match (last_at, last_id) {
            (Some(at), Some(id)) => from = (at, id),
            _ => break,
        }
    }
    if deleted > 0 {
        sqlx::query(CLEANUP_HORIZON)
            .bind(cutoff)
            .execute(pool)
            .await?;
    }
    Ok(deleted)
}

/// Rows older than this are candidates: `now()` (the database's clock) minus `$1` seconds.
const CLEANUP_CUTOFF: &str = "SELECT now() - make_interval(secs => $1)";

/// Rows a cleanup batch looks at, oldest first (index `sagas_barrier_created_at`).
const CLEANUP_BATCH_ROWS: i64 = 1_000;

/// One batch of [`cleanup`]: the transactions of the next `$4` rows older than `$1` after the
/// position (`$2`, `$3`), deleted whole unless one of their rows is newer than `$1` or they
/// have a succeeded `try` with neither `confirm` nor `cancel`. Returns how many rows it deleted
/// and the position it reached (none once no row is left to look at). Deletes do not move the
/// keyset: a kept transaction is passed over, not looked at again by the same cleanup.
const CLEANUP_BATCH: &str = "WITH seen AS (
       SELECT transaction_id, created_at FROM sagas_barrier
       WHERE created_at < $1 AND (created_at, transaction_id) > ($2, $3)
       ORDER BY created_at, transaction_id LIMIT $4),
     last AS (
       SELECT created_at, transaction_id FROM seen
       ORDER BY created_at DESC, transaction_id DESC LIMIT 1),
     doomed AS (
       SELECT DISTINCT s.transaction_id FROM seen s
       WHERE NOT EXISTS (SELECT 1 FROM sagas_barrier n
                         WHERE n.transaction_id = s.transaction_id AND n.created_at >= $1)
         AND NOT EXISTS (SELECT 1 FROM sagas_barrier t
                         WHERE t.transaction_id = s.transaction_id AND t.operation = 'try'
                           AND t.reply->>'status' = 'succeeded'
                           AND NOT EXISTS (SELECT 1 FROM sagas_barrier u
                                           WHERE u.transaction_id = t.transaction_id
                                             AND u.step = t.step
                                             AND u.operation IN ('confirm', 'cancel')))),
     del AS (
       DELETE FROM sagas_barrier b USING doomed d
       WHERE b.transaction_id = d.transaction_id RETURNING 1)
     SELECT (SELECT count(*) FROM del), (SELECT created_at FROM last),
            (SELECT transaction_id FROM last)";

/// Records a cleanup's cutoff as the horizon if it is newer (`sagas_barrier_retention`).
const CLEANUP_HORIZON: &str = "INSERT INTO sagas_barrier_retention (pruned_before) VALUES ($1)
     ON CONFLICT (singleton) DO UPDATE
     SET pruned_before = greatest(sagas_barrier_retention.pruned_before, EXCLUDED.pruned_before)";

/// The barrier rows of one transaction, ordered by step and operation.
pub async fn records(
    pool: &PgPool,
    transaction_id: Uuid,
) -> Result<Vec<BarrierRecord>, BarrierError> {
    type Row = (
        Uuid,
        String,
        String,
        String,
        Option<Json<Outcome>>,
        DateTime<Utc>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT transaction_id, step, operation, origin, reply, created_at \
         FROM sagas_barrier WHERE transaction_id = $1 ORDER BY step, operation",
    )
    .bind(transaction_id)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(transaction_id, step, operation, origin, reply, created_at)| BarrierRecord {
                transaction_id,
                step,
                operation,
                origin: Origin::parse(&origin),
                reply: reply.map(|Json(outcome)| outcome),
                created_at,
            },
        )
        .collect())
}

/// Inserts the row of `operation` for `cmd`'s transaction and step; false if it already existed
/// (after waiting for a concurrent inserter to finish).
async fn insert(
    conn: &mut PgConnection,
    cmd: &Command,
    operation: Operation,
    origin: Origin,
    reply: Option<&Outcome>,
) -> Result<bool, BarrierError> {
    let result = sqlx::query(
        "INSERT INTO sagas_barrier (transaction_id, step, operation, origin, reply) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
    )
    .bind(cmd.transaction_id)
    .bind(&cmd.step)
    .bind(operation.as_str())
    .bind(origin.as_str())
    .bind(reply.map(Json))
    .execute(conn)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// The commands of `cmds` whose rows [`Batch::begin_for`] inserts up front: all of them, but
/// the forward operations whose undo is in `cmds` too.
fn to_claim<'c>(cmds: &[&'c Command]) -> Vec<&'c Command> {
    let undone: HashSet<(Uuid, &str)> = cmds
        .iter()
        .filter(|c| c.operation.is_undo())
        .map(|c| (c.transaction_id, c.step.as_str()))
        .collect();
    cmds.iter()
        .filter(|c| {
            !(c.operation.is_forward() && undone.contains(&(c.transaction_id, c.step.as_str())))
        })
        .copied()
        .collect()
}

/// The order in which to run commands taken together in one transaction (indexes into
/// `keyed`, each command with its handler's [`Handler::lock_key`]), so that concurrent batches
/// take their rows in one order and do not deadlock: the commands without a lock key first,
/// in their given order, then the others by lock key and barrier key (transaction id, step),
/// the commands of one transaction's step together, in their given order, and under the key
/// of the first of them (an undo must still follow its forward operation, a late forward
/// operation its undo).
///
/// Batches that run in this order take the rows their handlers lock (one shared row per
/// command, or several in key order with the smallest as the key) in increasing key order,
/// after their barrier rows ([`Batch::begin_for`]); a lone command takes its barrier row, then
/// its handler's rows. Since every transaction then takes its locks in one global order, none
/// waits for another that waits for it.
pub fn lock_order(keyed: &[(Option<&str>, &Command)]) -> Vec<usize> {
    let mut groups: HashMap<(Uuid, &str), Option<&str>> = HashMap::with_capacity(keyed.len());
    for (key, cmd) in keyed {
        groups
            .entry((cmd.transaction_id, cmd.step.as_str()))
            .or_insert(*key);
    }
    let sort_key = |i: usize| {
        let cmd = keyed[i].1;
        let group = (cmd.transaction_id, cmd.step.as_str());
        let key = groups[&group];
        // Without a key, the command locks no shared row: it keeps its place.
        (key, key.map(|_| group), i)
    };
    let mut order: Vec<usize> = (0..keyed.len()).collect();
    order.sort_by_cached_key(|&i| sort_key(i));
    order
}

/// The barrier keys of `cmds`, in key order (the order every claim inserts them in), each once.
fn claim_keys<'c>(cmds: &[&'c Command]) -> Vec<(Uuid, &'c str, Operation)> {
    let mut keys: Vec<(Uuid, &str, Operation)> = cmds
        .iter()
        .map(|c| (c.transaction_id, c.step.as_str(), c.operation))
        .collect();
    keys.sort_by(|a, b| (a.0, a.1, a.2.as_str()).cmp(&(b.0, b.1, b.2.as_str())));
    keys.dedup();
    keys
}

/// A transaction on a connection from `pool` that has inserted the rows of `keys` (as
/// [`claim_all`] would), begun in one round trip with them: `None` when a row was there
/// already (a duplicate, found after waiting for a concurrent inserter to commit), and
/// nothing was inserted, or when a step name holds a NUL character (the claim with
/// parameters then says why).
///
/// A simple query `INSERT …; BEGIN` does it: PostgreSQL runs the statements of one simple
/// query in one implicit transaction, which a `BEGIN` among them turns into an ordinary one
/// that stays open, the insert in it. When the insert fails, the implicit transaction rolls
/// back at the end of the query and the connection is left idle. A simple query takes no
/// parameters, so the keys are written as constants ([`string_constant`]). The cost of a
/// duplicate: PostgreSQL logs the failed insert (`duplicate key value violates unique
/// constraint "sagas_barrier_pkey"`, then a warning that no transaction is in progress, from
/// the rollback sqlx sends after a failed begin, which sqlx logs as a notice too), counts two
/// rollbacks, and the claim is made again as [`claim_all`] makes it, which tells the new rows
/// from the old.
///
/// A begin whose future is dropped (a time limit) leaves nothing behind: sqlx 0.9.1 counts the
/// transaction before the round trip, so the `ROLLBACK` it queues as the future is dropped
/// goes out right behind the claim, and the pool's check as the connection comes back waits
/// for both (a connection whose claim waits on another transaction's row stays out of the
/// pool until that one ends). Older sqlx counted it after, and would have handed the next
/// borrower a connection inside this transaction.
async fn claimed_as_begun(
    pool: &PgPool,
    keys: &[(Uuid, &str, Operation)],
) -> Result<Option<sqlx::Transaction<'static, sqlx::Postgres>>, BarrierError> {
    let mut rows = Vec::with_capacity(keys.len());
    for (transaction_id, step, operation) in keys {
        // A step name PostgreSQL cannot store: the claim with parameters says why.
        let Some(step) = string_constant(step) else {
            return Ok(None);
        };
        rows.push(format!(
            "('{transaction_id}'::uuid, {step}, '{}', '{}')",
            operation.as_str(),
            Origin::Handler.as_str()
        ));
    }
    let claim = format!(
        "INSERT INTO sagas_barrier (transaction_id, step, operation, origin) VALUES {}; BEGIN",
        rows.join(", ")
    );
    match pool.begin_with(sqlx::AssertSqlSafe(claim)).await {
        Ok(tx) => Ok(Some(tx)),
        Err(sqlx::Error::Database(db)) if db.is_unique_violation() => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// `s` as an SQL string constant: an escape string constant (`E'…'`) with every backslash
/// doubled and every quote doubled, which reads the same whatever `standard_conforming_strings`
/// and `backslash_quote` say (a quote is never written `\'`). `None` if `s` holds a NUL
/// character, which no PostgreSQL text can hold. Safe in UTF-8, the client encoding sqlx sets
/// on every connection: there no byte of a multi-byte character is a quote or a backslash.
///
/// Written here rather than taken from a crate: the one that has it (`postgres-protocol`'s
/// `escape_literal`) would be a dependency, with its own, for these few lines.
fn string_constant(s: &str) -> Option<String> {
    if s.contains('\0') {
        return None;
    }
    let mut constant = String::with_capacity(s.len() + 4);
    constant.push_str("E'");
    for c in s.chars() {
        // A backslash escapes itself; a quote is doubled, as in any SQL string.
        if c == '\\' || c == '\'' {
            constant.push(c);
        }
        constant.push(c);
    }
    constant.push('\'');
    Some(constant)
}

/// Inserts the rows of `keys` (from [`claim_keys`]; as their [`insert`]s would, one each) in
/// one statement; for each, whether it was inserted (false: it existed, after waiting for a
/// concurrent inserter to finish).
async fn claim_all(
    conn: &mut PgConnection,
    keys: Vec<(Uuid, &str, Operation)>,
) -> Result<HashMap<(Uuid, String, Operation), bool>, BarrierError> {
    let inserted: Vec<(Uuid, String, String)> = sqlx::query_as(
        "INSERT INTO sagas_barrier (transaction_id, step, operation, origin) \
         SELECT t, s, o, $4 FROM unnest($1::uuid[], $2::text[], $3::text[]) AS r(t, s, o) \
         ON CONFLICT DO NOTHING \
         RETURNING transaction_id, step, operation",
    )
    .bind(keys.iter().map(|k| k.0).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.1).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.2.as_str()).collect::<Vec<_>>())
    .bind(Origin::Handler.as_str())
    .fetch_all(conn)
    .await?;
    let mut claimed: HashMap<(Uuid, String, Operation), bool> = keys
        .into_iter()
        .map(|(t, s, o)| ((t, s.to_owned(), o), false))
        .collect();
    for (t, s, o) in inserted {
        if let Some(new) = Operation::parse(&o).and_then(|o| claimed.get_mut(&(t, s, o))) {
            *new = true;
        }
    }
    Ok(claimed)
}

/// Stores the replies (and origins) of a batch's commands in their rows, in one statement.
///
/// An upsert, although every row exists (the command inserted it earlier in the transaction):
/// `ON CONFLICT` finds each row through the primary key whatever the planner thinks of the
/// table. An `UPDATE … FROM unnest(…)` is a join that the planner may make a sequential scan,
/// and a prepared statement keeps the plan it made while the table was small (a new
/// participant, no ANALYZE since) for the connection's life: that read the whole table for
/// every batch (1,051 scans and 6.5 M rows in a 4,000-saga bench run), and planning it at
/// every execution instead cost 0.18 ms a batch.
async fn record_all(conn: &mut PgConnection, pending: &[PendingReply]) -> Result<(), BarrierError> {
    if pending.is_empty() {
        return Ok(());
    }
    let transaction_ids: Vec<Uuid> = pending.iter().map(|p| p.transaction_id).collect();
    let steps: Vec<&str> = pending.iter().map(|p| p.step.as_str()).collect();
    let operations: Vec<&str> = pending.iter().map(|p| p.operation.as_str()).collect();
    let origins: Vec<&str> = pending.iter().map(|p| p.origin.as_str()).collect();
    let replies: Vec<Json<&Outcome>> = pending.iter().map(|p| Json(&p.outcome)).collect();
    sqlx::query(
        "INSERT INTO sagas_barrier AS b (transaction_id, step, operation, origin, reply) \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[]) \
         ON CONFLICT (transaction_id, step, operation) \
         DO UPDATE SET origin = EXCLUDED.origin, reply = EXCLUDED.reply",
    )
    .bind(transaction_ids)
    .bind(steps)
    .bind(operations)
    .bind(origins)
    .bind(replies)
    .execute(conn)
    .await?;
    Ok(())
}

/// Stores the reply (and origin) of `cmd`'s own row.
async fn record(
    conn: &mut PgConnection,
    cmd: &Command,
    origin: Origin,
    outcome: &Outcome,
) -> Result<(), BarrierError> {
    sqlx::query(
        "UPDATE sagas_barrier SET origin = $4, reply = $5 \
         WHERE transaction_id = $1 AND step = $2 AND operation = $3",
    )
    .bind(cmd.transaction_id)
    .bind(&cmd.step)
    .bind(cmd.operation.as_str())
    .bind(origin.as_str())
    .bind(Json(outcome))
    .execute(conn)
    .await?;
    Ok(())
}

/// What [`complete_in`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Completion {
    /// The stored `in_progress` reply is now the final outcome: publish the reply.
    Completed,
    /// The operation was already final (a completion ran before): nothing changed; this is
    /// its outcome, to publish again if wanted.
    AlreadyFinal(Outcome),
    /// The operation's undo ran first: do not apply the effect (roll back the transaction).
    Undone,
}

/// Records the final outcome of a long-running operation that answered `in_progress`, in the
/// caller's transaction, so that the business writes that finish the work commit with it.
///
/// On [`Completion::Undone`] the caller must roll back: the orchestrator compensated or
/// cancelled the step first (anti-hanging). The forward row is locked, so a concurrent undo
/// waits for this transaction (and then undoes the completed effect) or ran before it.
pub async fn complete_in(
    conn: &mut PgConnection,
    cmd: &Command,
    outcome: &Outcome,
) -> Result<Completion, BarrierError> {
    if !matches!(outcome, Outcome::Succeeded { .. } | Outcome::Failed { .. }) {
        return Err(BarrierError::NotFinal);
    }
    let current = locked_reply(&mut *conn, cmd, cmd.operation).await?;
    if cmd.operation.is_forward() {
        let undo = match cmd.operation {
            Operation::Action => Operation::Compensate,
            _ => Operation::Cancel,
        };
        let undone: Option<(String,)> = sqlx::query_as(
            "SELECT origin FROM sagas_barrier \
             WHERE transaction_id = $1 AND step = $2 AND operation = $3",
        )
        .bind(cmd.transaction_id)
        .bind(&cmd.step)
        .bind(undo.as_str())
        .fetch_optional(&mut *conn)
        .await?;
        if undone.is_some() {
            return Ok(Completion::Undone);
        }
    }
    if !matches!(current, Outcome::InProgress { .. }) {
        return Ok(Completion::AlreadyFinal(current));
    }
    sqlx::query(
        "UPDATE sagas_barrier SET reply = $4 \
         WHERE transaction_id = $1 AND step = $2 AND operation = $3",
    )
    .bind(cmd.transaction_id)
    .bind(&cmd.step)
    .bind(cmd.operation.as_str())
    .bind(Json(outcome))
    .execute(&mut *conn)
    .await?;
    Ok(Completion::Completed)
}

/// The reply stored for `operation` of `cmd`'s transaction and step.
const STORED_REPLY: &str = "SELECT reply FROM sagas_barrier \
     WHERE transaction_id = $1 AND step = $2 AND operation = $3";

/// [`STORED_REPLY`], locking the row until the transaction ends.
const LOCKED_REPLY: &str = "SELECT reply FROM sagas_barrier \
     WHERE transaction_id = $1 AND step = $2 AND operation = $3 FOR UPDATE";

/// Like [`stored_reply`], locking the row until the transaction ends.
async fn locked_reply(
    conn: &mut PgConnection,
    cmd: &Command,
    operation: Operation,
) -> Result<Outcome, BarrierError> {
    reply_by(LOCKED_REPLY, conn, cmd, operation).await
}

/// The committed reply of `operation` for `cmd`'s transaction and step.
async fn stored_reply(
    conn: &mut PgConnection,
    cmd: &Command,
    operation: Operation,
) -> Result<Outcome, BarrierError> {
    reply_by(STORED_REPLY, conn, cmd, operation).await
}

/// The reply `query` ([`STORED_REPLY`] or [`LOCKED_REPLY`]) reads; a row without one, or no
/// row, is inconsistent: the caller knows that a reply was stored.
async fn reply_by(
    query: &'static str,
    conn: &mut PgConnection,
    cmd: &Command,
    operation: Operation,
) -> Result<Outcome, BarrierError> {
    let row: Option<(Option<Json<Outcome>>,)> = sqlx::query_as(query)
        .bind(cmd.transaction_id)
        .bind(&cmd.step)
        .bind(operation.as_str())
        .fetch_optional(conn)
        .await?;
    let inconsistent = |detail: &str| BarrierError::Inconsistent {
        transaction_id: cmd.transaction_id,
        step: cmd.step.clone(),
        operation,
        detail: detail.to_owned(),
    };
    match row {
        Some((Some(Json(outcome)),)) => Ok(outcome),
        Some((None,)) => Err(inconsistent("no stored reply")),
        None => Err(inconsistent("the row disappeared")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_round_trip_through_their_stored_names() {
        for origin in [Origin::Handler, Origin::NullCompensation, Origin::Guard] {
            assert_eq!(Origin::parse(origin.as_str()), Some(origin));
        }
        assert_eq!(Origin::parse("other"), None);
    }

    fn cmd(transaction_id: Uuid, operation: Operation) -> Command {
        Command {
            protocol: 1,
            transaction_id,
            definition: "d".into(),
            step: "s".into(),
            operation,
            attempt: 1,
            payload: serde_json::Value::Null,
            output: None,
            deadline: None,
            traceparent: None,
        }
    }

    fn step(transaction_id: Uuid, step: &str, operation: Operation) -> Command {
        Command {
            step: step.to_owned(),
            ..cmd(transaction_id, operation)
        }
    }

    #[test]
    fn rows_are_claimed_up_front_except_a_forward_operation_whose_undo_is_in_the_batch() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let claimed = |cmds: &[Command]| {
            let all: Vec<&Command> = cmds.iter().collect();
            to_claim(&all)
                .into_iter()
                .map(|c| (c.transaction_id, c.operation))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            claimed(&[cmd(a, Operation::Action), cmd(b, Operation::Try)]),
            [(a, Operation::Action), (b, Operation::Try)]
        );
        assert_eq!(
            claimed(&[cmd(a, Operation::Action)]),
            [(a, Operation::Action)],
            "one command's row rides with the BEGIN too"
        );
        assert_eq!(
            claimed(&[cmd(a, Operation::Try), cmd(a, Operation::Confirm)]),
            [(a, Operation::Try), (a, Operation::Confirm)]
        );
        assert_eq!(
            claimed(&[cmd(a, Operation::Action), cmd(b, Operation::Compensate)]),
            [(a, Operation::Action), (b, Operation::Compensate)],
            "an undo's own row is claimed"
        );
        assert_eq!(
            claimed(&[
                cmd(a, Operation::Cancel),
                cmd(a, Operation::Try),
                cmd(b, Operation::Try)
            ]),
            [(a, Operation::Cancel), (b, Operation::Try)],
            "the try its cancel looks for is not"
        );
        let other_step = [cmd(a, Operation::Cancel), step(a, "t", Operation::Try)];
        assert_eq!(claimed(&other_step).len(), 2, "another step's try is");
    }

    #[test]
    fn batches_run_their_keyless_commands_first_then_the_others_by_lock_key_and_barrier_key() {
        let ids: Vec<Uuid> = {
            let mut ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
            ids.sort();
            ids
        };
        let cmds: Vec<Command> = ids.iter().map(|&id| cmd(id, Operation::Try)).collect();
        let keyed = [
            (Some("b"), &cmds[0]),
            (Some("a"), &cmds[1]),
            (None, &cmds[3]),
            (Some("b"), &cmds[2]),
            (None, &cmds[2]),
        ];
        // `cmds[2]` twice (a duplicate): both under the first one's key, in their order.
        assert_eq!(lock_order(&keyed), [2, 1, 0, 3, 4]);
        let reversed: Vec<_> = keyed[..4].iter().rev().copied().collect();
        let ordered = |keyed: &[(Option<&str>, &Command)]| {
            lock_order(keyed)
                .into_iter()
                .map(|i| keyed[i].1.transaction_id)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ordered(&keyed[..4]),
            ordered(&reversed),
            "the same commands in any order run in one order"
        );
        assert_eq!(
            lock_order(&[(None, &cmds[1]), (None, &cmds[0])]),
            [0, 1],
            "commands without a key keep their order"
        );
        assert!(lock_order(&[]).is_empty());
    }

    #[test]
    fn the_commands_of_one_step_of_a_transaction_keep_their_order_under_the_first_ones_key() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let (cancel, late_try, other) = (
            cmd(a, Operation::Cancel),
            cmd(a, Operation::Try),
            cmd(b, Operation::Try),
        );
        let (debit, credit) = (
            step(a, "debit", Operation::Try),
            step(a, "credit", Operation::Try),
        );
        // A cancel keyed "z" then its late try keyed "a": the try stays after its cancel.
        let keyed = [
            (Some("z"), &cancel),
            (Some("m"), &other),
            (Some("a"), &late_try),
            (Some("x"), &debit),
            (Some("b"), &credit),
        ];
        let order = lock_order(&keyed);
        let position = |i: usize| order.iter().position(|&o| o == i).unwrap();
        assert!(position(0) < position(2), "{order:?}");
        assert_eq!(position(2), position(0) + 1, "together: {order:?}");
        assert_eq!(order, [4, 1, 3, 0, 2], "other steps go by their own keys");
    }

    #[test]
    fn string_constants_escape_every_quote_and_backslash_and_refuse_nul() {
        assert_eq!(string_constant("debit").as_deref(), Some("E'debit'"));
        assert_eq!(
            string_constant(r"it's \ a 'step'\").as_deref(),
            Some(r"E'it''s \\ a ''step''\\'")
        );
        assert_eq!(string_constant("").as_deref(), Some("E''"));
        assert_eq!(string_constant("a\0b"), None);
    }

    #[test]
    fn the_schema_is_idempotent_sql() {
        assert!(SCHEMA.contains("CREATE TABLE IF NOT EXISTS sagas_barrier"));
        assert!(!SCHEMA.contains("CREATE TABLE sagas_barrier"));
    }
}
