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

use std::sync::Mutex;
use std::time::Instant;

use sagas_participant::config::IDLE_CHECK_AFTER;
use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgConnection, PgPool, Postgres};

/// Connections held at most: one for the start slot, one for the reply slot.
pub const HELD: usize = 2;

/// The held connections: those idle, with when each was given back, and how many exist
/// (idle or in use). A pooled connection is taken out of the pool only while fewer than
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
    /// Gives back a connection whose write succeeded: a held one is kept; a pooled one is
    /// taken out of the pool and kept while fewer than [`HELD`] exist, else returned to it.
    pub(super) fn give_back(mut self) {
        let conn = self.conn.take();
        let mut slots = self.held.lock();
        match conn {
            Some(Conn::Held(conn)) => slots.idle.push((conn, Instant::now())),
            Some(Conn::Pooled(conn)) if slots.owned < HELD => {
                slots.owned += 1;
                slots.idle.push((conn.detach(), Instant::now()));
            }
            // Back to the pool.
            _ => {}
        }
    }
}

impl Held {
    /// A held connection (checked first if it sat idle), else one from `pool`.
    pub(super) async fn take(&self, pool: &PgPool) -> Result<WriteConnection<'_>, sqlx::Error> {
        loop {
            let idle = self.lock().idle.pop();
            let Some((mut conn, since)) = idle else {
                let conn = Conn::Pooled(pool.acquire().await?);
                return Ok(self.write_connection(conn));
            };
            if since.elapsed() < IDLE_CHECK_AFTER || conn.ping().await.is_ok() {
                return Ok(self.write_connection(Conn::Held(conn)));
            }
            // Dead (the server restarted, say): closed, and the next one tried.
            self.lock().owned -= 1;
        }
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
