//! Time, injected: the engine reads the clock once per input and hands the time to the pure
//! state machine.

use chrono::{SubsecRound, Utc};

use crate::machine::Time;

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> Time;
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
