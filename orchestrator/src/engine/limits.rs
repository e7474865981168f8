//! Rate limits per participant: a token bucket for each limited participant, from which the
//! publisher reserves a slot for every command to it before it publishes. A command whose
//! slot is later waits, committed in the outbox, and so does whoever published it (a reply
//! batch, a start, the relay): backpressure, never a drop.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A token bucket: `rate` commands per second, up to one second's worth (at least one) at once.
#[derive(Debug, Clone)]
struct Bucket {
    rate: f64,
    burst: f64,
    /// Tokens left at `at`; below zero, slots already promised to waiting commands.
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64, now: Instant) -> Bucket {
        let burst = rate.max(1.0);
        Bucket {
            rate,
            burst,
            tokens: burst,
            at: now,
        }
    }

    /// Reserves the slot of one command asked for at `now` unless it would wait longer than
    /// `max_wait`: how long it waits for it, or `None` (nothing reserved).
    fn reserve(&mut self, now: Instant, max_wait: Duration) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = self.at.max(now);
        let left = self.tokens - 1.0;
        let wait = if left >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-left / self.rate)
        };
        (wait <= max_wait).then(|| {
            self.tokens = left;
            wait
        })
    }
}

/// The rate limits of one process, by participant.
#[derive(Debug, Default)]
pub(super) struct RateLimits {
    limits: BTreeMap<String, f64>,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimits {
    pub(super) fn new(limits: BTreeMap<String, f64>) -> RateLimits {
        RateLimits {
            limits,
            buckets: Mutex::default(),
        }
    }

    /// True when no participant is limited.
    pub(super) fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    /// Reserves the slot of one command to `participant` asked for at `now`: how long it
    /// waits (zero for a participant without a limit), or `None` when it would wait longer
    /// than `max_wait` (nothing is reserved: the command stays in the outbox for later).
    pub(super) fn reserve(
        &self,
        participant: &str,
        now: Instant,
        max_wait: Duration,
    ) -> Option<Duration> {
        let Some(&rate) = self.limits.get(participant) else {
            return Some(Duration::ZERO);
        };
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        buckets
            .entry(participant.to_owned())
            .or_insert_with(|| Bucket::new(rate, now))
            .reserve(now, max_wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Limits of `rate` commands per second for participant `p`, reserving without a cap.
    struct Limits(RateLimits);

    impl Limits {
        fn reserve(&self, participant: &str, now: Instant) -> Duration {
            self.0.reserve(participant, now, Duration::MAX).unwrap()
        }
    }

    fn limits(rate: f64) -> Limits {
        Limits(RateLimits::new(
            [("p".to_owned(), rate)].into_iter().collect(),
        ))
    }

    #[test]
    fn commands_past_the_burst_wait_one_interval_each_and_other_participants_never_wait() {
        let l = limits(5.0);
        let t0 = Instant::now();
        let waits: Vec<u128> = (0..12).map(|_| l.reserve("p", t0).as_millis()).collect();
        assert_eq!(
            waits,
            vec![0, 0, 0, 0, 0, 200, 400, 600, 800, 1000, 1200, 1400]
        );
        assert_eq!(l.reserve("q", t0), Duration::ZERO);
        // Two seconds later every slot promised (the last at 1.4 s) has passed, and the
        // bucket has tokens again.
        let t2 = t0 + Duration::from_secs(2);
        assert_eq!(l.reserve("p", t2), Duration::ZERO);
    }

    #[test]
    fn an_idle_bucket_refills_to_one_second_of_commands_and_no_more() {
        let l = limits(2.0);
        let t0 = Instant::now();
        for _ in 0..2 {
            assert_eq!(l.reserve("p", t0), Duration::ZERO);
        }
        let later = t0 + Duration::from_secs(60);
        let waits: Vec<u128> = (0..4).map(|_| l.reserve("p", later).as_millis()).collect();
        assert_eq!(waits, vec![0, 0, 500, 1000]);
        let slow = limits(0.5);
        assert_eq!(
            slow.reserve("p", t0),
            Duration::ZERO,
            "a burst of at least one"
        );
        assert_eq!(slow.reserve("p", t0), Duration::from_secs(2));
    }

    #[test]
    fn a_command_that_would_wait_too_long_reserves_nothing_and_is_left_for_later() {
        let l = limits(1.0);
        let t0 = Instant::now();
        let cap = Duration::from_secs(2);
        let waits: Vec<Option<Duration>> = (0..5).map(|_| l.0.reserve("p", t0, cap)).collect();
        let s = Duration::from_secs;
        assert_eq!(waits, vec![Some(s(0)), Some(s(1)), Some(s(2)), None, None]);
        // Three seconds later the next slot is free: the ones refused took none.
        assert_eq!(l.0.reserve("p", t0 + s(3), cap), Some(s(0)));
    }

    #[test]
    fn n_commands_at_once_take_at_least_n_minus_the_burst_intervals() {
        // The property the publisher relies on: however the reservations interleave in
        // time, the k-th command to a participant is not published before (k - burst) / rate
        // seconds after the first.
        let l = limits(5.0);
        let t0 = Instant::now();
        let mut at = t0;
        for k in 0..50u32 {
            at += Duration::from_millis(u64::from(k % 3) * 70);
            let due = at + l.reserve("p", at);
            let floor = Duration::from_secs_f64((f64::from(k) - 4.0).max(0.0) / 5.0);
            assert!(due >= t0 + floor, "command {k} due {:?}", due - t0);
        }
    }
}
