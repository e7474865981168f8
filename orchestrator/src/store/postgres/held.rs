//! Connections held out of the pool for the write path: the statements of the start and reply
//! batches run on a connection kept for them, not on one taken from the pool and given back
//! (which costs a round trip per transaction: [`sagas_participant::held`]).
//!
//! The write path takes one transaction per start batch and per reply batch, each from its
//! single slot, so up to [`HELD`] connections are taken out of the pool ([`Keep::Detached`])
//! once and kept. One whose statement failed is closed, not kept. More writers than [`HELD`]
//! at once use the pool as before. Held connections are not the pool's: they do not count
//! against its size, and closing the pool does not wait for them.
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

use sagas_participant::held::{Held, Keep};

/// Connections held at most: one for the start slot, one for the reply slot.
pub const HELD: usize = 2;

/// Run once on every connection as it is taken out of the pool to be held.
const PLANNER: &str = "SET enable_seqscan = off";

/// The write path's held connections.
pub(super) fn write_path() -> Held {
    Held::new(HELD, Keep::Detached, Some(PLANNER))
}
