//! The participants' circuit breakers in the engine: the outcomes of attempts counted in
//! memory as transitions commit, reported to the store about once a second (one transaction
//! per process per period, never a statement per reply), and the breakers' states read back
//! into the view the machine decides with ([`machine::Breakers`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use super::retention::sleep_or_stop;
use super::{Engine, metric};
use crate::breaker::{BreakerPolicy, BreakerState, Change, Outcomes, Synced};
use crate::machine::{self, Effect, Event, Time, Transition};

/// What this process knows of the breakers, and what it counted since its last report.
#[derive(Default)]
pub(super) struct BreakerView {
    /// `None`: no breakers (every attempt is sent and counted).
    policy: Option<BreakerPolicy>,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Per participant: (failures, answers) since the last report.
    counted: HashMap<String, (u64, u64)>,
    /// The breakers as the last report left them, by participant.
    states: BTreeMap<String, Known>,
}

struct Known {
    state: BreakerState,
    /// While open, when this process may send its next probe: the store's next probe, or
    /// later once this process sent one.
    next_probe: Option<Time>,
}

impl BreakerView {
    pub(super) fn new(policy: Option<BreakerPolicy>) -> BreakerView {
        BreakerView {
            policy,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts how the attempts of a committed transition ended, by participant, and the
    /// attempts it postponed (a metric). Nothing without breakers.
    pub(super) fn count(&self, t: &Transition) {
        if self.policy.is_none() {
            return;
        }
        let steps = &t.instance.plan.steps;
        let mut inner = None;
        for e in &t.effects {
            let Effect::AttemptEnded { step, outcome, .. } = e else {
                continue;
            };
            let Some(plan) = steps.get(*step).filter(|p| !p.is_wait()) else {
                continue;
            };
            let inner = inner.get_or_insert_with(|| self.lock());
            let c = inner.counted.entry(plan.participant.clone()).or_default();
            match *outcome {
                "timed_out" | "retry" => c.0 += 1,
                _ => c.1 += 1,
            }
        }
        for e in &t.events {
            if let Event::Postponed { step, .. } = e
                && let Some(plan) = steps.get(*step)
            {
                metrics::counter!(metric::POSTPONED, "participant" => plan.participant.clone())
                    .increment(1);
            }
        }
    }

    /// Takes what was counted since the last report.
    fn take(&self) -> Vec<Outcomes> {
        self.lock()
            .counted
            .drain()
            .map(|(participant, (failures, answers))| Outcomes {
                participant,
                failures,
                answers,
            })
            .collect()
    }

    /// Gives back outcomes a failed report did not store, for the next one.
    fn give_back(&self, outcomes: Vec<Outcomes>) {
        let mut inner = self.lock();
        for o in outcomes {
            let c = inner.counted.entry(o.participant).or_default();
            c.0 += o.failures;
            c.1 += o.answers;
        }
    }

    /// Takes in the breakers a report returned.
    fn refresh(&self, synced: &[Synced]) {
        let mut inner = self.lock();
        for s in synced {
            let mine = inner
                .states
                .get(&s.participant)
                .filter(|k| k.state.open && s.state.open && k.state.since == s.state.since)
                .and_then(|k| k.next_probe);
            let next_probe = match (s.state.next_probe, mine) {
                (Some(theirs), Some(mine)) => Some(theirs.max(mine)),
                (theirs, _) => theirs,
            };
            inner.states.insert(
                s.participant.clone(),
                Known {
                    state: s.state.clone(),
                    next_probe,
                },
            );
        }
    }

    /// The breakers as last reported, by participant.
    fn states(&self) -> BTreeMap<String, BreakerState> {
        self.lock()
            .states
            .iter()
            .map(|(p, k)| (p.clone(), k.state.clone()))
            .collect()
    }
}

impl machine::Breakers for BreakerView {
    fn admit(&self, participant: &str, now: Time) -> Option<Time> {
        let policy = self.policy.as_ref()?;
        let mut inner = self.lock();
        let known = inner.states.get_mut(participant)?;
        if !known.state.open {
            return None;
        }
        match known.next_probe {
            Some(at) if at > now => Some(at),
            // This attempt is the probe; the next one waits at least an interval.
            _ => {
                let interval = chrono::Duration::from_std(policy.probe_interval)
                    .unwrap_or(chrono::Duration::seconds(5));
                known.next_probe = Some(now + interval);
                None
            }
        }
    }

    fn is_open(&self, participant: &str) -> bool {
        self.policy.is_some()
            && self
                .lock()
                .states
                .get(participant)
                .is_some_and(|k| k.state.open)
    }
}

/// A participant as `GET /v1/participants` shows it: its breaker and its rate limit.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ParticipantStatus {
    /// The participant (its queue's routing key).
    pub participant: String,
    /// `closed`, `open`, or `off` when this process runs without breakers.
    pub breaker: String,
    /// When the breaker last opened or closed (absent while off or never counted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// The share of the current window's attempts that timed out or were answered `retry`
    /// (while closed).
    pub failure_share: f64,
    /// Attempts counted in the current window (while closed).
    pub attempts: u64,
    /// While open, when the next probe may go.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_probe: Option<chrono::DateTime<chrono::Utc>>,
    /// Commands per second this process publishes to it at most (absent: no limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<f64>,
}

impl Engine {
    /// Reports the outcomes counted since the last report every
    /// [`EngineConfig::breaker_sync`](super::EngineConfig::breaker_sync), until `shutdown`;
    /// nothing without breakers.
    pub(super) async fn breaker_loop(self: Arc<Self>, shutdown: CancellationToken) {
        if self.breakers.policy.is_none() {
            return;
        }
        while !shutdown.is_cancelled() {
            self.sync_breakers().await;
            sleep_or_stop(&shutdown, self.config.breaker_sync).await;
        }
    }

    /// One report: adds this process's counts to the stored breakers, reads them all back,
    /// logs the changes this process made and sets the gauges. Public for tests.
    #[doc(hidden)]
    pub async fn sync_breakers(&self) {
        let Some(policy) = self.breakers.policy else {
            return;
        };
        let outcomes = self.breakers.take();
        let now = self.clock.now();
        match self.store.sync_breakers(now, &outcomes, &policy).await {
            Ok(synced) => {
                self.breakers.refresh(&synced);
                for s in &synced {
                    let open = if s.state.open { 1.0 } else { 0.0 };
                    metrics::gauge!(metric::BREAKER_OPEN, "participant" => s.participant.clone())
                        .set(open);
                    match s.change {
                        Some(Change::Opened) => tracing::warn!(
                            participant = %s.participant,
                            next_probe = ?s.state.next_probe,
                            "participant breaker opened: attempts to it are postponed, one probe at a time"
                        ),
                        Some(Change::Closed) => tracing::info!(
                            participant = %s.participant,
                            "participant breaker closed: it answered"
                        ),
                        None => {}
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reporting to the participants' breakers failed; the counts go with the next report");
                self.breakers.give_back(outcomes);
            }
        }
    }

    /// Every participant of the registered definitions and every one with a breaker: its
    /// breaker as last reported and its rate limit, by name.
    pub fn participants(&self) -> Vec<ParticipantStatus> {
        let mut states = self.breakers.states();
        let mut names = self.registry.participants();
        names.extend(states.keys().cloned());
        names.extend(self.config.rate_limits.keys().cloned());
        names.sort();
        names.dedup();
        let on = self.breakers.policy.is_some();
        names
            .into_iter()
            .map(|participant| {
                let state = states.remove(&participant);
                let breaker = match &state {
                    _ if !on => "off",
                    Some(s) if s.open => "open",
                    _ => "closed",
                };
                ParticipantStatus {
                    breaker: breaker.to_owned(),
                    since: state.as_ref().map(|s| s.since),
                    failure_share: state.as_ref().map_or(0.0, BreakerState::failure_share),
                    attempts: state.as_ref().map_or(0, |s| s.failures + s.answers),
                    next_probe: state.as_ref().and_then(|s| s.next_probe),
                    rate_limit: self.config.rate_limits.get(&participant).copied(),
                    participant,
                }
            })
            .collect()
    }
}
