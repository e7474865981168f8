//! Time, injected: the engine reads the clock once per input and hands the time to the pure
//! state machine. The clock also mints the ids of new instances (time-ordered UUIDs), the
//! other value a start draws from the world: a simulation that controls both replays exactly.

use chrono::{SubsecRound, Utc};

use uuid::Uuid;

use crate::machine::Time;

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> Time;

    /// The id of a new instance: a UUIDv7 (ordered by creation time) unless a clock says
    /// otherwise.
    fn new_id(&self) -> Uuid {
        Uuid::now_v7()
    }
}

/// The system clock, truncated to microseconds (PostgreSQL's precision) so that times read back
/// from the database compare equal to the ones written.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Time {
        Utc::now().trunc_subsecs(6)
    }
}
