//! Word of settled instances between the processes on one database: NOTIFY on one channel,
//! LISTEN on a connection of each process's own.
//!
//! An announcement is a statement of its own, after the transitions it names committed: a
//! NOTIFY in the write transaction would serialize the committers on PostgreSQL's global
//! notification lock. Its payloads are the ids' 32 hex digits each, back to back.
//!
//! Whether another process listens is read from `pg_stat_activity`: the sessions named
//! [`LISTENER_NAME`] in this database other than this process's own listener.

use std::sync::atomic::{AtomicI32, Ordering};

use async_trait::async_trait;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use uuid::Uuid;

use super::sql;
use crate::store::{Announcements, Settlements, StoreError};

/// The channel of the announcements. NOTIFY and LISTEN reach the sessions of one database only,
/// so the processes of one orchestrator database hear each other and no other.
pub const SETTLED_CHANNEL: &str = "sagas_settled";

/// The `application_name` of each process's listening connection (`pg_stat_activity`).
pub const LISTENER_NAME: &str = "sagas-listener";

/// Hex digits of one id in a payload.
const ID_LEN: usize = 32;

/// Ids per notification: a payload must be shorter than 8000 bytes.
const IDS_PER_PAYLOAD: usize = 7999 / ID_LEN;

/// The announcements of a [`super::PgStore`], through its pool; each listener has a connection
/// of its own.
pub(super) struct PgSettlements {
    pub pool: PgPool,
    /// The backend pid of this process's listening connection (0 before the first): the one
    /// listener [`Settlements::others_listening`] does not count.
    pub listener_pid: AtomicI32,
}

/// The payloads that announce `ids`.
fn payloads(ids: &[Uuid]) -> Vec<String> {
    ids.chunks(IDS_PER_PAYLOAD)
        .map(|chunk| chunk.iter().map(|id| id.simple().to_string()).collect())
        .collect()
}

/// The ids of a payload; `None` if it is not one of [`payloads`].
fn ids(payload: &str) -> Option<Vec<Uuid>> {
    if !payload.len().is_multiple_of(ID_LEN) {
        return None;
    }
    (0..payload.len())
        .step_by(ID_LEN)
        .map(|at| Uuid::try_parse(payload.get(at..at + ID_LEN)?).ok())
        .collect()
}

#[async_trait]
impl Settlements for PgSettlements {
    async fn announce(&self, ids: &[Uuid]) -> Result<(), StoreError> {
        sqlx::query(sql::ANNOUNCE)
            .bind(SETTLED_CHANNEL)
            .bind(payloads(ids))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn listen(&self) -> Result<Box<dyn Announcements>, StoreError> {
        // Not one of the pool's connections: a pool of one of its own, named.
        let options = (*self.pool.connect_options())
            .clone()
            .application_name(LISTENER_NAME);
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_lazy_with(options);
        let mut listener = PgListener::connect_with(&pool).await?;
        // A lost connection ends this listener: the engine listens again and knows that it
        // may have missed announcements meanwhile.
        listener.eager_reconnect(false);
        listener.listen(SETTLED_CHANNEL).await?;
        let (pid,): (i32,) = sqlx::query_as(sql::BACKEND_PID)
            .fetch_one(&mut listener)
            .await?;
        self.listener_pid.store(pid, Ordering::Relaxed);
        Ok(Box::new(PgAnnouncements { listener }))
    }

    async fn others_listening(&self) -> Result<bool, StoreError> {
        let (others,): (bool,) = sqlx::query_as(sql::OTHERS_LISTENING)
            .bind(LISTENER_NAME)
            .bind(self.listener_pid.load(Ordering::Relaxed))
            .fetch_one(&self.pool)
            .await?;
        Ok(others)
    }
}

/// One listening connection.
struct PgAnnouncements {
    listener: PgListener,
}

#[async_trait]
impl Announcements for PgAnnouncements {
    async fn next(&mut self) -> Result<Vec<Uuid>, StoreError> {
        loop {
            let Some(notification) = self.listener.try_recv().await? else {
                return Err(StoreError::Database(sqlx::Error::Io(
                    std::io::ErrorKind::ConnectionAborted.into(),
                )));
            };
            match ids(notification.payload()) {
                Some(ids) => return Ok(ids),
                None => tracing::warn!(
                    channel = SETTLED_CHANNEL,
                    payload = notification.payload(),
                    "a notification that does not name transactions; ignored"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_shorter_than_postgresqls_limit_and_name_every_id() {
        let many: Vec<Uuid> = (0..1000).map(|_| Uuid::now_v7()).collect();
        let payloads = payloads(&many);
        assert_eq!(payloads.len(), 1000usize.div_ceil(IDS_PER_PAYLOAD));
        assert!(payloads.iter().all(|p| p.len() < 8000));
        let heard: Vec<Uuid> = payloads.iter().flat_map(|p| ids(p).unwrap()).collect();
        assert_eq!(heard, many);
        assert_eq!(ids(""), Some(vec![]));
        for bad in ["hello", &"g".repeat(ID_LEN), &"0".repeat(ID_LEN + 1)] {
            assert_eq!(ids(bad), None, "{bad}");
        }
    }
}
