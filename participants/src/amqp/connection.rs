//! Connecting to the broker and staying connected: sessions, with a backoff between them.

use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};

/// Connects to the broker at `uri` (`amqp://user:password@host:port/vhost`).
pub async fn connect(uri: &str) -> Result<Connection, lapin::Error> {
    Connection::connect(uri, ConnectionProperties::default()).await
}

/// Opens a channel in publisher-confirm mode: every publish on it is confirmed (or not) by
/// the broker.
pub async fn confirm_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// The delays between reconnection attempts: from `initial`, doubling up to `max`, without
/// jitter and without end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
}

impl Default for Backoff {
    /// 100 ms doubling up to 5 s.
    fn default() -> Backoff {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

impl Backoff {
    /// Delays from `initial` (at least 1 ms) doubling up to `max` (at least `initial`).
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        let initial = initial.max(Duration::from_millis(1));
        Backoff {
            initial,
            max: max.max(initial),
        }
    }

    /// The first delay.
    pub fn initial(&self) -> Duration {
        self.initial
    }

    /// The longest delay; a session that served longer than this starts the delays over.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The delays, first to last (they never end).
    fn delays(&self) -> ExponentialBackoff {
        ExponentialBuilder::new()
            .with_min_delay(self.initial)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .without_max_times()
            .build()
    }
}

/// The waits of one [`keep_serving`]: the next delay of its backoff after each failure,
/// started over after a session that served longer than the maximum.
struct Waits {
    backoff: Backoff,
    delays: ExponentialBackoff,
}

impl Waits {
    fn new(backoff: Backoff) -> Waits {
        Waits {
            backoff,
            delays: backoff.delays(),
        }
    }

    /// The wait after a failure; `served` is how long the session served (zero when the
    /// connection failed).
    fn after(&mut self, served: Duration) -> Duration {
        if served > self.backoff.max {
            self.delays = self.backoff.delays();
        }
        self.delays.next().unwrap_or(self.backoff.max)
    }
}

/// What [`keep_serving`] runs: sessions, each on a connection of its own.
pub trait Sessions<S> {
    /// What a session serves on.
    type Connection;
    /// Why connecting or a session failed.
    type Error: Display;

    /// Makes a connection.
    fn connect(&mut self) -> impl Future<Output = Result<Self::Connection, Self::Error>>;

    /// Serves on `connection` until `shutdown` completes (`Ok`) or something fails.
    fn serve(
        &mut self,
        connection: Self::Connection,
        shutdown: Pin<&mut S>,
    ) -> impl Future<Output = Result<(), Self::Error>>;
}

/// Runs `sessions` until one ends because `shutdown` completed, reconnecting after every
/// failure, of a connection attempt or of a session.
///
/// After a failure it waits for the next delay of `backoff` and connects again; a session
/// that served longer than [`Backoff::max`] first starts the delays over, so that a broker
/// that fails now and then is reconnected to after the shortest delay, and one that keeps
/// failing is not hammered. `shutdown` also ends a connection attempt or a wait. `name` says whose
/// sessions these are, in the logs.
pub async fn keep_serving<S, T>(
    name: &str,
    backoff: Backoff,
    mut shutdown: Pin<&mut S>,
    sessions: &mut T,
) where
    S: Future<Output = ()>,
    T: Sessions<S>,
{
    let mut waits = Waits::new(backoff);
    loop {
        let connected = tokio::select! {
            biased;
            () = shutdown.as_mut() => return,
            connected = sessions.connect() => connected,
        };
        let (failure, served) = match connected {
            Ok(connection) => {
                let started = tokio::time::Instant::now();
                match sessions.serve(connection, shutdown.as_mut()).await {
                    Ok(()) => return,
                    Err(failure) => (failure, started.elapsed()),
                }
            }
            Err(failure) => (failure, Duration::ZERO),
        };
        let wait = waits.after(served);
        tracing::warn!(
            %name,
            error = %failure,
            retry_in_ms = wait.as_millis() as u64,
            "lost the broker (or could not reach it); reconnecting"
        );
        tokio::select! {
            biased;
            () = shutdown.as_mut() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn millis(delays: impl Iterator<Item = Duration>, n: usize) -> Vec<u128> {
        delays.take(n).map(|d| d.as_millis()).collect()
    }

    #[test]
    fn reconnection_delays_double_from_the_initial_delay_and_stay_at_the_maximum() {
        let backoff = Backoff::default();
        assert_eq!(
            millis(backoff.delays(), 9),
            [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]
        );
        let custom = Backoff::new(Duration::from_millis(50), Duration::from_millis(200));
        assert_eq!(millis(custom.delays(), 5), [50, 100, 200, 200, 200]);
    }

    #[test]
    fn reconnection_delays_never_end() {
        let backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(2));
        assert_eq!(backoff.delays().take(10_000).count(), 10_000);
    }

    #[test]
    fn a_backoff_waits_at_least_a_millisecond_and_its_maximum_is_never_below_its_start() {
        let backoff = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(backoff.initial(), Duration::from_millis(1));
        assert_eq!(backoff.max(), Duration::from_millis(1));
        let inverted = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(millis(inverted.delays(), 3), [2000, 2000, 2000]);
    }

    #[test]
    fn after_a_failure_the_wait_grows_and_only_a_session_longer_than_the_maximum_starts_it_over() {
        let mut waits = Waits::new(Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
        ));
        let mut after = |served_ms| waits.after(Duration::from_millis(served_ms)).as_millis();
        assert_eq!(after(0), 100, "a refused connection");
        assert_eq!(after(0), 200);
        assert_eq!(
            after(1_000),
            400,
            "a session of exactly the maximum is short"
        );
        assert_eq!(after(0), 800);
        assert_eq!(after(0), 1_000);
        assert_eq!(after(1_001), 100, "a long session starts over");
        assert_eq!(after(0), 200);
    }
}
