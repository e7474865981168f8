//! Retention on PostgreSQL: finished instances deleted in bounded batches, one process at a
//! time, optionally exported first.

use uuid::Uuid;

use super::{PgStore, sql};
use crate::machine::Time;
use crate::store::{Pruned, StoreError};

/// The key of the advisory lock a prune holds for its transaction (`pg_locks.objid` shows its
/// low half), so that one process prunes at a time: the others find it taken and wait for
/// their next turn. Any constant would do: this one is `sagas.re` in ASCII.
pub const PRUNE_LOCK_KEY: i64 = 0x7361_6761_732e_7265;

/// Where [`PgStore::prune_exporting`] hands each batch before deleting it: one JSON document
/// per instance, to be written durably (or an error) before the call returns.
pub type Export<'a> = dyn FnMut(&[String]) -> std::io::Result<()> + Send + 'a;

impl PgStore {
    /// Deletes, in one transaction, up to `limit` instances that finished (completed,
    /// compensated, resolved) before `finished_before`, oldest first, with their events, timers
    /// and outbox rows, and records `finished_before` as the prune horizon (`sagas_retention`)
    /// if it is newer. [`Pruned::Busy`] when another process is pruning (nothing deleted).
    ///
    /// With `export`, the batch is first handed to it, one JSON document per instance (its row
    /// with its whole state, and `events`: its log), oldest finished first; the delete commits
    /// only once `export` has returned `Ok`, so an exported instance may be exported again (the
    /// commit failed) but a deleted one was always exported.
    pub async fn prune_exporting(
        &self,
        finished_before: Time,
        limit: u32,
        mut export: Option<&mut Export<'_>>,
    ) -> Result<Pruned, StoreError> {
        let mut tx = self.pool().begin().await?;
        let (locked,): (bool,) = sqlx::query_as(sql::PRUNE_LOCK)
            .bind(PRUNE_LOCK_KEY)
            .fetch_one(&mut *tx)
            .await?;
        if !locked {
            return Ok(Pruned::Busy);
        }
        let ids: Vec<(Uuid,)> = sqlx::query_as(sql::DUE_FOR_PRUNING)
            .bind(finished_before)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
        let ids: Vec<Uuid> = ids.into_iter().map(|(id,)| id).collect();
        if ids.is_empty() {
            return Ok(Pruned::Deleted(0));
        }
        if let Some(export) = export.as_mut() {
            let documents: Vec<String> = sqlx::query_scalar(sql::EXPORT)
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await?;
            export(&documents).map_err(|e| StoreError::Export(e.to_string()))?;
        }
        let deleted = sqlx::query(sql::PRUNE)
            .bind(&ids)
            .bind(finished_before)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(Pruned::Deleted(deleted))
    }

    /// How many instances finished before `finished_before` (what a prune would delete).
    pub async fn count_prunable(&self, finished_before: Time) -> Result<u64, StoreError> {
        let (n,): (i64,) = sqlx::query_as(sql::COUNT_PRUNABLE)
            .bind(finished_before)
            .fetch_one(self.pool())
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}
