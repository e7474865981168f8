//! Connections held out of the pool for the write path: the statements of the start and reply
//! batches run on a connection kept for them, not on one taken from the pool and given back.
//!
//! sqlx checks a connection with a round trip to the server every time one goes back to the
//! pool, and has no switch for it: one round trip (a wake-up of a PostgreSQL backend and of a
//! worker here) after every transaction. The write path takes one transaction per start batch
//! and per reply batch, each from its single slot, so up to [`HELD`] connections are taken out
//! of the pool ([`PoolConnection::detach`]) once and kept: no round trip after each batch. A
//! held connection idle for [`IDLE_CHECK_AFTER`] or longer is checked before it is used, as
//! the pool's own are; one whose statement failed is closed, not kept. More writers than
//! [`HELD`] at once use the pool as before. Held connections are not the pool's: they do not
//! count against its size, and closing the pool does not wait for them.
//!
//! A held connection runs with sequential scans switched off ([`PLANNER`]). Every statement of
//! the write path reaches its rows by primary key, but PostgreSQL keeps one generic plan per
//! prepared statement and connection once it finds it as cheap as the custom ones, and costs it
//! with the tables' sizes of that moment: made while `sagas_instances` was small (a new
//! database, before autovacuum's first `ANALYZE`, or for good where autovacuum is off), the
//! transition's plan read the whole table, twice, on every transition after, and a held
//! connection lives long (at one saga at a time, 300 sagas in: 0.36 ms and 527 buffers per
//! transition, against 0.22 ms and 30). The switch only makes the planner take the index
//! wherever there is one; the pool's connections (reads, and writers beyond [`HELD`]) keep
//! PostgreSQL's defaults.

use std::sync::Mutex;
use std::time::Instant;

use sagas_participant::config::IDLE_CHECK_AFTER;
use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgConnection, PgPool, Postgres};

/// Connections held at most: one for the start slot, one for the reply slot.
pub const HELD: usize = 2;

/// Run once on every connection as it is taken out of the pool to be held.
const PLANNER: &str = "SET enable_seqscan = off";

/// The held connections: those idle, with when each was given back, and how many exist
/// (idle or in use). A connection is taken out of the pool to be held only while fewer than
/// [`HELD`] exist, so that a held one coming back always has its place (none is closed for
/// want of room while more writers than [`HELD`] run at once).
#[derive(Debug, Default)]
pub(super) struct Held(Mutex<Slots>);

#[derive(Debug, Default)]
struct Slots {
    idle: Vec<(PgConnection, Instant)>,
    owned: usize,
}

/// A connection for one write: a held one, or one of the pool's. Give it back with
/// [`WriteConnection::give_back`] once the write succeeded; dropped instead (the write
/// failed), a held one is closed and a pooled one goes back through the pool's check.
pub(super) struct WriteConnection<'h> {
    conn: Option<Conn>,
    held: &'h Held,
}

enum Conn {
    Held(PgConnection),
    Pooled(PoolConnection<Postgres>),
}

impl std::ops::Deref for WriteConnection<'_> {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        match self.conn.as_ref().expect("a connection until given back") {
            Conn::Held(conn) => conn,
            Conn::Pooled(conn) => conn,
        }
    }
}

impl std::ops::DerefMut for WriteConnection<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match self.conn.as_mut().expect("a connection until given back") {
            Conn::Held(conn) => conn,
            Conn::Pooled(conn) => conn,
        }
    }
}

impl Drop for WriteConnection<'_> {
    fn drop(&mut self) {
        if let Some(Conn::Held(_)) = self.conn {
            // Its write failed: it is closed, and no longer counts.
            self.held.lock().owned -= 1;
        }
    }
}

impl WriteConnection<'_> {
    /// Gives back a connection whose write succeeded: a held one is kept, a pooled one goes
    /// back to the pool.
    pub(super) fn give_back(mut self) {
        if let Some(Conn::Held(conn)) = self.conn.take() {
            self.held.lock().idle.push((conn, Instant::now()));
        }
    }
}

/// A place counted in [`Slots::owned`] for a connection not there yet: uncounted when dropped.
struct Counted<'h>(&'h Held);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.lock().owned -= 1;
    }
}

impl Held {
    /// A held connection (checked first if it sat idle); else, while fewer than [`HELD`]
    /// exist, a new one taken out of `pool`; else one of `pool`'s. Cancel-safe: a held
    /// connection dropped on the way is uncounted.
    pub(super) async fn take(&self, pool: &PgPool) -> Result<WriteConnection<'_>, sqlx::Error> {
        loop {
            let (idle, room) = {
                let mut slots = self.lock();
                let idle = slots.idle.pop();
                let room = idle.is_none() && slots.owned < HELD;
                if room {
                    slots.owned += 1;
                }
                (idle, room)
            };
            // Made only with room (its drop uncounts), after the lock is released.
            let room = room.then(|| Counted(self));
            let Some((conn, since)) = idle else {
                return match room {
                    Some(counted) => self.hold(pool, counted).await,
                    None => Ok(self.write_connection(Conn::Pooled(pool.acquire().await?))),
                };
            };
            let mut conn = self.write_connection(Conn::Held(conn));
            if since.elapsed() < IDLE_CHECK_AFTER || conn.ping().await.is_ok() {
                return Ok(conn);
            }
            // Dead (the server restarted, say): closed and uncounted as `conn` drops, and the
            // next one tried.
        }
    }

    /// A new held connection, in the place `counted`: taken out of `pool` and set up with
    /// [`PLANNER`]; uncounted if that fails or is cancelled.
    async fn hold(
        &self,
        pool: &PgPool,
        counted: Counted<'_>,
    ) -> Result<WriteConnection<'_>, sqlx::Error> {
        let pooled = pool.acquire().await?;
        std::mem::forget(counted);
        // From here the guard uncounts it when it drops without being given back.
        let mut conn = self.write_connection(Conn::Held(pooled.detach()));
        sqlx::Executor::execute(&mut *conn, PLANNER).await?;
        Ok(conn)
    }

    fn write_connection(&self, conn: Conn) -> WriteConnection<'_> {
        WriteConnection {
            conn: Some(conn),
            held: self,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
