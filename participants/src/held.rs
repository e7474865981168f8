//! Connections kept for a hot path instead of going back to the pool after every transaction.
//!
//! sqlx checks a connection with a round trip to the server every time one goes back to the
//! pool, and has no switch for it: one round trip (a wake-up of a PostgreSQL backend and of a
//! worker here) after every transaction. A path that takes a connection per transaction — the
//! orchestrator's start and reply batches, a participant's barrier transactions — takes it
//! from a [`Held`] instead: up to its `max` connections are kept between transactions and
//! handed out again without that check. A held connection idle for [`IDLE_CHECK_AFTER`] or
//! longer is checked before it is used, as the pool's own are; one whose transaction did not
//! end cleanly is not kept ([`HeldConnection`] dropped instead of given back). Takers beyond
//! `max` at once use the pool as before.
//!
//! How the kept connections relate to the pool is the holder's choice ([`Keep`]): taken out of
//! it (the orchestrator's two, beside a pool sized for its reads), or still counted against its
//! size (a participant's, one per handler slot, so that a participant never opens more
//! connections than its pool allows).

use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::Notify;

use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgConnection, PgPool, Postgres};

use crate::config::IDLE_CHECK_AFTER;

/// How a [`Held`] keeps its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Taken out of the pool ([`PoolConnection::detach`]): they do not count against its size,
    /// closing the pool does not wait for them, and one that is not given back is closed.
    Detached,
    /// Still the pool's: they count against its size; one that is not given back goes back to
    /// the pool through its check (which also sends a rollback still queued on it), and all go
    /// back when the [`Held`] is dropped.
    Counted,
}

/// Connections kept between transactions: those idle, with when each was given back, and how
/// many exist (idle or in use). A connection is taken from the pool to be kept only while fewer
/// than `max` exist, so that a kept one coming back always has its place.
#[derive(Debug)]
pub struct Held {
    slots: Mutex<Slots>,
    /// Told when a kept connection is given back, to a taker waiting for the pool meanwhile.
    returned: Notify,
    max: usize,
    keep: Keep,
    /// Run once on every connection as it is taken to be kept.
    setup: Option<&'static str>,
}

#[derive(Debug, Default)]
struct Slots {
    idle: Vec<(Kept, Instant)>,
    owned: usize,
}

#[derive(Debug)]
enum Kept {
    Detached(PgConnection),
    Counted(PoolConnection<Postgres>),
}

impl Kept {
    fn conn(&mut self) -> &mut PgConnection {
        match self {
            Kept::Detached(conn) => conn,
            Kept::Counted(conn) => conn,
        }
    }
}

/// A connection for one transaction: a kept one, or one of the pool's. Give it back with
/// [`HeldConnection::give_back`] once its transaction ended cleanly (committed, or rolled back
/// and answered); dropped instead, a kept one is no longer kept (closed when [`Keep::Detached`],
/// back to the pool through its check when [`Keep::Counted`]) and a pooled one goes back
/// through the pool's check.
pub struct HeldConnection<'h> {
    conn: Option<Conn>,
    held: &'h Held,
}

enum Conn {
    Kept(Kept),
    Pooled(PoolConnection<Postgres>),
}

impl std::fmt::Debug for HeldConnection<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kept = matches!(self.conn, Some(Conn::Kept(_)));
        f.debug_struct("HeldConnection")
            .field("kept", &kept)
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for HeldConnection<'_> {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        match self.conn.as_ref().expect("a connection until given back") {
            Conn::Kept(Kept::Detached(conn)) => conn,
            Conn::Kept(Kept::Counted(conn)) | Conn::Pooled(conn) => conn,
        }
    }
}

impl std::ops::DerefMut for HeldConnection<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match self.conn.as_mut().expect("a connection until given back") {
            Conn::Kept(kept) => kept.conn(),
            Conn::Pooled(conn) => conn,
        }
    }
}

impl Drop for HeldConnection<'_> {
    fn drop(&mut self) {
        if let Some(Conn::Kept(_)) = self.conn {
            // Its transaction did not end cleanly: it is no longer kept.
            self.held.lock().owned -= 1;
        }
    }
}

impl HeldConnection<'_> {
    /// Gives back a connection whose transaction ended cleanly: a kept one is kept, a pooled
    /// one goes back to the pool.
    pub fn give_back(mut self) {
        if let Some(Conn::Kept(kept)) = self.conn.take() {
            self.held.lock().idle.push((kept, Instant::now()));
            self.held.returned.notify_waiters();
        }
    }

    /// Whether this is a kept connection (not one of the pool's handed out beyond `max`).
    pub fn is_kept(&self) -> bool {
        matches!(self.conn, Some(Conn::Kept(_)))
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
    /// Keeps up to `max` connections as `keep` says, each set up with `setup` (one statement,
    /// run once) as it is taken to be kept. With `max` 0 every connection is the pool's.
    pub fn new(max: usize, keep: Keep, setup: Option<&'static str>) -> Held {
        Held {
            slots: Mutex::default(),
            returned: Notify::new(),
            max,
            keep,
            setup,
        }
    }

    /// A kept connection (checked first if it sat idle); else, while fewer than `max` exist, a
    /// new one taken from `pool` to be kept; else one of `pool`'s. A taker waiting for the pool
    /// takes a kept connection given back meanwhile instead, so that none waits for the pool
    /// while a kept one sits idle. Cancel-safe: a kept connection dropped on the way is
    /// uncounted.
    pub async fn take(&self, pool: &PgPool) -> Result<HeldConnection<'_>, sqlx::Error> {
        loop {
            // Listening before looking, so that a connection given back after the look wakes it.
            let returned = self.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            let (idle, room) = {
                let mut slots = self.lock();
                let idle = slots.idle.pop();
                let room = idle.is_none() && slots.owned < self.max;
                if room {
                    slots.owned += 1;
                }
                (idle, room)
            };
            // Made only with room (its drop uncounts), after the lock is released.
            let room = room.then(|| Counted(self));
            if let Some((kept, since)) = idle {
                let mut conn = self.connection(Conn::Kept(kept));
                if since.elapsed() < IDLE_CHECK_AFTER || conn.ping().await.is_ok() {
                    return Ok(conn);
                }
                // Dead (the server restarted, say): dropped and uncounted as `conn` drops, and
                // the next one tried.
                continue;
            }
            let pooled = tokio::select! {
                pooled = pool.acquire() => pooled?,
                () = &mut returned => continue,
            };
            return match room {
                Some(counted) => self.hold(pooled, counted).await,
                None => Ok(self.connection(Conn::Pooled(pooled))),
            };
        }
    }

    /// Keeps `pooled` in the place `counted`, set up; uncounted if that fails or is cancelled.
    async fn hold(
        &self,
        pooled: PoolConnection<Postgres>,
        counted: Counted<'_>,
    ) -> Result<HeldConnection<'_>, sqlx::Error> {
        std::mem::forget(counted);
        let kept = match self.keep {
            Keep::Detached => Kept::Detached(pooled.detach()),
            Keep::Counted => Kept::Counted(pooled),
        };
        // From here the guard uncounts it when it drops without being given back.
        let mut conn = self.connection(Conn::Kept(kept));
        if let Some(setup) = self.setup {
            sqlx::Executor::execute(&mut *conn, setup).await?;
        }
        Ok(conn)
    }

    fn connection(&self, conn: Conn) -> HeldConnection<'_> {
        HeldConnection {
            conn: Some(conn),
            held: self,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}
