//! The per-participant circuit breaker's rules, without I/O: how the outcomes of attempts
//! counted by every orchestrator process move a breaker between closed and open.
//!
//! A closed breaker counts, in a tumbling window, the attempts that ended without a definite
//! answer (timed out, or answered `retry`) and those that were answered. Once the window has
//! seen at least [`BreakerPolicy::min_volume`] of them and the failing share reaches
//! [`BreakerPolicy::failure_share`], it opens. An open breaker lets one attempt through per
//! probe interval (the engine picks it), the interval doubling up to
//! [`BreakerPolicy::max_probe_interval`] each time it passes without a reply; the first
//! answered attempt closes it. The stores keep one [`BreakerState`] per participant and apply
//! [`BreakerState::advance`] under a lock, so one process makes (and logs) each change.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::machine::Time;

/// When a breaker opens and how often it probes (`SAGAS_BREAKER_*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerPolicy {
    /// The length of the tumbling window in which outcomes are counted.
    pub window: Duration,
    /// A window with fewer attempts than this never opens the breaker.
    pub min_volume: u64,
    /// The share of attempts without a definite answer (0 to 1) that opens the breaker.
    pub failure_share: f64,
    /// The first interval between two probes of an open breaker.
    pub probe_interval: Duration,
    /// The longest interval between two probes.
    pub max_probe_interval: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            window: Duration::from_secs(10),
            min_volume: 20,
            failure_share: 0.5,
            probe_interval: Duration::from_secs(5),
            max_probe_interval: Duration::from_secs(60),
        }
    }
}

/// How the attempts to one participant ended, as one process counted them since its last
/// report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcomes {
    /// The participant.
    pub participant: String,
    /// Attempts that timed out or were answered `retry`.
    pub failures: u64,
    /// Attempts answered `succeeded`, `failed` or `in_progress`: the participant is there.
    pub answers: u64,
}

/// The state of one participant's breaker, as the stores keep it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BreakerState {
    /// Open: attempts wait for the probe.
    pub open: bool,
    /// When it last opened or closed (or was first seen).
    pub since: Time,
    /// When the current counting window began.
    pub window_start: Time,
    /// Failures counted in the window (while closed).
    pub failures: u64,
    /// Answers counted in the window (while closed).
    pub answers: u64,
    /// While open, when the next probe may go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_probe: Option<Time>,
    /// While open, the interval to the probe after the next, in milliseconds.
    #[serde(default)]
    pub probe_interval_ms: u64,
}

/// What [`BreakerState::advance`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The breaker opened.
    Opened,
    /// The breaker closed.
    Closed,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn after(now: Time, ms: u64) -> Time {
    now + chrono::Duration::milliseconds(i64::try_from(ms).unwrap_or(i64::MAX / 2))
}

impl BreakerState {
    /// A closed breaker first seen at `now`.
    pub fn new(now: Time) -> BreakerState {
        BreakerState {
            open: false,
            since: now,
            window_start: now,
            failures: 0,
            answers: 0,
            next_probe: None,
            probe_interval_ms: 0,
        }
    }

    /// Adds `failures` and `answers` counted up to `now` and applies the rules.
    pub fn advance(
        &mut self,
        failures: u64,
        answers: u64,
        now: Time,
        policy: &BreakerPolicy,
    ) -> Option<Change> {
        if self.open {
            if answers > 0 {
                *self = BreakerState::new(now);
                return Some(Change::Closed);
            }
            // A probe time passed without an answer: the next one comes later.
            if self.next_probe.is_none_or(|at| at <= now) {
                self.next_probe = Some(after(now, self.probe_interval_ms));
                self.probe_interval_ms = self
                    .probe_interval_ms
                    .saturating_mul(2)
                    .min(ms(policy.max_probe_interval))
                    .max(1);
            }
            return None;
        }
        if now >= after(self.window_start, ms(policy.window)) {
            self.window_start = now;
            self.failures = 0;
            self.answers = 0;
        }
        self.failures = self.failures.saturating_add(failures);
        self.answers = self.answers.saturating_add(answers);
        let total = self.failures.saturating_add(self.answers);
        let share = self.failures as f64 / total.max(1) as f64;
        if total >= policy.min_volume.max(1) && share >= policy.failure_share {
            let interval = ms(policy.probe_interval).max(1);
            *self = BreakerState {
                open: true,
                next_probe: Some(after(now, interval)),
                probe_interval_ms: interval
                    .saturating_mul(2)
                    .min(ms(policy.max_probe_interval))
                    .max(1),
                ..BreakerState::new(now)
            };
            return Some(Change::Opened);
        }
        None
    }

    /// The failing share of the current window (0 when it is empty).
    pub fn failure_share(&self) -> f64 {
        let total = self.failures.saturating_add(self.answers);
        if total == 0 {
            0.0
        } else {
            self.failures as f64 / total as f64
        }
    }
}

/// One participant's breaker after a store applied the outcomes: its state, and what this
/// report changed (the process that made a change logs it).
#[derive(Debug, Clone, PartialEq)]
pub struct Synced {
    /// The participant.
    pub participant: String,
    /// Its breaker now.
    pub state: BreakerState,
    /// What this report changed.
    pub change: Option<Change>,
}

/// Applies `outcomes` at `now` to `states` (a store's rows, by participant) and advances every
/// breaker, also those without new outcomes (an open one's probe time passes); the breakers in
/// participant order, and those that changed. Participants new to `states` are added.
pub fn sync(
    states: &mut std::collections::BTreeMap<String, BreakerState>,
    outcomes: &[Outcomes],
    now: Time,
    policy: &BreakerPolicy,
) -> Vec<Synced> {
    let mut counted: std::collections::BTreeMap<&str, (u64, u64)> = Default::default();
    for o in outcomes {
        let c = counted.entry(o.participant.as_str()).or_default();
        c.0 = c.0.saturating_add(o.failures);
        c.1 = c.1.saturating_add(o.answers);
    }
    for participant in counted.keys() {
        if !states.contains_key(*participant) {
            states.insert((*participant).to_owned(), BreakerState::new(now));
        }
    }
    states
        .iter_mut()
        .map(|(participant, state)| {
            let (failures, answers) = counted
                .get(participant.as_str())
                .copied()
                .unwrap_or_default();
            let change = state.advance(failures, answers, now, policy);
            Synced {
                participant: participant.clone(),
                state: state.clone(),
                change,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(secs: i64) -> Time {
        chrono::Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::seconds(secs)
    }

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            window: Duration::from_secs(10),
            min_volume: 10,
            failure_share: 0.5,
            probe_interval: Duration::from_secs(5),
            max_probe_interval: Duration::from_secs(20),
        }
    }

    #[test]
    fn a_breaker_opens_only_past_the_minimum_volume_and_the_failing_share() {
        let p = policy();
        let mut b = BreakerState::new(t(0));
        assert_eq!(b.advance(9, 0, t(1), &p), None, "below the volume");
        assert_eq!(b.advance(0, 11, t(2), &p), None, "9 of 20 failed");
        assert_eq!(b.advance(2, 0, t(3), &p), Some(Change::Opened), "11 of 22");
        assert!(b.open);
        assert_eq!(b.next_probe, Some(t(8)));
    }

    #[test]
    fn outcomes_of_an_ended_window_are_forgotten() {
        let p = policy();
        let mut b = BreakerState::new(t(0));
        assert_eq!(b.advance(9, 0, t(1), &p), None);
        assert_eq!(b.advance(9, 0, t(11), &p), None, "a new window began");
        assert_eq!((b.failures, b.window_start), (9, t(11)));
        assert_eq!(b.advance(1, 0, t(12), &p), Some(Change::Opened));
    }

    #[test]
    fn an_open_breaker_probes_at_doubling_intervals_and_the_first_answer_closes_it() {
        let p = policy();
        let mut b = BreakerState::new(t(0));
        b.advance(10, 0, t(0), &p);
        assert_eq!(
            b.advance(5, 0, t(4), &p),
            None,
            "failures while open change nothing"
        );
        assert_eq!(b.next_probe, Some(t(5)));
        b.advance(0, 0, t(5), &p);
        assert_eq!(b.next_probe, Some(t(15)), "10 s after the first probe");
        b.advance(0, 0, t(15), &p);
        assert_eq!(b.next_probe, Some(t(35)), "20 s, the longest");
        b.advance(0, 0, t(35), &p);
        assert_eq!(b.next_probe, Some(t(55)));
        assert_eq!(b.advance(0, 1, t(40), &p), Some(Change::Closed));
        assert_eq!(b, BreakerState::new(t(40)));
    }

    #[test]
    fn a_sync_adds_new_participants_and_reports_each_change_once() {
        let p = policy();
        let mut states = Default::default();
        let out = |participant: &str, failures, answers| Outcomes {
            participant: participant.into(),
            failures,
            answers,
        };
        let first = sync(
            &mut states,
            &[out("a", 6, 0), out("a", 6, 0), out("b", 0, 3)],
            t(1),
            &p,
        );
        let changes: Vec<_> = first
            .iter()
            .map(|s| (s.participant.as_str(), s.change))
            .collect();
        assert_eq!(changes, vec![("a", Some(Change::Opened)), ("b", None)]);
        let second = sync(&mut states, &[out("a", 3, 0)], t(2), &p);
        assert!(second.iter().all(|s| s.change.is_none()), "already open");
        assert!(second[0].state.open);
    }
}
