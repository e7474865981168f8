//! Database outages as the runtime sees them: commands wait for the database to come back,
//! and the outage is logged once, when it starts, and once more when it ends.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::process::{Attempt, attempt};
use super::session::Context;
use super::stats::Stats;
use crate::barrier::BarrierError;
use crate::protocol::{Command, Outcome};

/// Whether the participant's database is known to be unreachable, since when; shared by the
/// sessions of a participant.
#[derive(Debug, Default)]
pub(super) struct DatabaseOutage(Mutex<Option<Instant>>);

impl DatabaseOutage {
    /// A command found the database unreachable: warns if that starts an outage.
    fn lost(&self, participant: &str, error: &BarrierError) {
        let mut since = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if since.is_none() {
            *since = Some(Instant::now());
            tracing::warn!(
                %participant,
                %error,
                "database unreachable; commands wait for it, unanswered and unacked"
            );
        }
    }

    /// A command reached the database: ends the outage, if there was one.
    fn reached(&self, participant: &str) {
        let since = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(since) = since {
            let down_ms = since.elapsed().as_millis() as u64;
            tracing::info!(%participant, down_ms, "database reachable again");
        }
    }
}

/// The outcome of `cmd` run alone, once the database can be reached: while it cannot (or the
/// connection is lost on the way), the command waits and runs again, with the delays of the
/// participant's backoff, for as long as it takes; it is never answered `retry` for that. At
/// shutdown it is abandoned like any handler still running (its command, unacked, returns to
/// the queue).
pub(super) async fn run_alone(ctx: &Context, cmd: &Command) -> Outcome {
    let mut delays = ctx.backoff.delays();
    loop {
        match attempt(&ctx.pool, &*ctx.handler, cmd, ctx.handler_timeout).await {
            Attempt::Answered { outcome, timed_out } => {
                if timed_out {
                    Stats::bump(&ctx.stats.0.timed_out);
                } else {
                    ctx.database.reached(&ctx.participant);
                }
                return outcome;
            }
            Attempt::Unavailable(error) => {
                Stats::bump(&ctx.stats.0.database_waits);
                ctx.database.lost(&ctx.participant, &error);
                let wait = delays.next().unwrap_or(Duration::from_secs(5));
                tracing::debug!(%error, retry_in_ms = wait.as_millis() as u64, "database unreachable");
                tokio::time::sleep(wait).await;
            }
        }
    }
}
