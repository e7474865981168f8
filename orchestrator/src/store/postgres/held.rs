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

/// The held connections, with when each was last given back.
#[derive(Debug, Default)]
pub(super) struct Held(Mutex<Vec<(PgConnection, Instant)>>);

/// A connection for one write: a held one, or one of the pool's.
pub(super) enum WriteConnection {
    Held(PgConnection),
    Pooled(PoolConnection<Postgres>),
}

impl std::ops::Deref for WriteConnection {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        match self {
            WriteConnection::Held(conn) => conn,
            WriteConnection::Pooled(conn) => conn,
        }
    }
}

impl std::ops::DerefMut for WriteConnection {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match self {
            WriteConnection::Held(conn) => conn,
            WriteConnection::Pooled(conn) => conn,
        }
    }
}

impl Held {
    /// A held connection (checked first if it sat idle), else one from `pool`.
    pub(super) async fn take(&self, pool: &PgPool) -> Result<WriteConnection, sqlx::Error> {
        loop {
            let Some((mut conn, since)) = self.lock().pop() else {
                return Ok(WriteConnection::Pooled(pool.acquire().await?));
            };
            if since.elapsed() < IDLE_CHECK_AFTER || conn.ping().await.is_ok() {
                return Ok(WriteConnection::Held(conn));
            }
            // Dead (the server restarted, say): dropped, and the next one tried.
        }
    }

    /// Gives back a connection whose write succeeded: kept while fewer than [`HELD`] are,
    /// else returned to the pool. (One whose write failed is dropped instead: a held one is
    /// closed, a pooled one goes back through the pool's check.)
    pub(super) fn give_back(&self, conn: WriteConnection) {
        let mut held = self.lock();
        if held.len() >= HELD {
            return;
        }
        let conn = match conn {
            WriteConnection::Held(conn) => conn,
            WriteConnection::Pooled(conn) => conn.detach(),
        };
        held.push((conn, Instant::now()));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(PgConnection, Instant)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
