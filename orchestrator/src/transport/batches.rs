//! Which commands travel together: command batches (docs/protocol.md, "Batches"), sized per
//! participant from what its replies announce.
//!
//! Pure: the transport hands in the time, the replies' announcements and the commands it is
//! about to publish. The outbox still holds one row per command; only the grouping on the wire
//! changes.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sagas_participant::amqp::Announcement;
use sagas_participant::protocol::MAX_BATCH;

use crate::store::OutboxMessage;

/// The most commands in one message in automatic mode: measured against 8 and 32 with the
/// benchmark, 16 carried about as many commands per message as 32 at less broker CPU, with
/// throughput within the noise (docs/performance.md, round 5, "Command batch size").
pub const DEFAULT_COMMAND_BATCH: usize = 16;

/// How long a reply without the announcement keeps its participant on single commands: far
/// longer than one of several replicas behind a queue goes without replying while the queue is
/// busy enough to batch (seconds: the broker hands each consumer its share in turn), and short
/// enough that batches come back soon after the last replica that does not announce them is
/// gone (docs/protocol.md, "Batches").
pub const QUIET: Duration = Duration::from_secs(10 * 60);

/// Whether the commands for one participant share messages (`SAGAS_AMQP_COMMAND_BATCH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandBatch {
    /// Batches of up to this many commands, only to participants whose replies announce that
    /// they accept batches, and never more than they announced (see [`Announcements`]); the
    /// default, with [`DEFAULT_COMMAND_BATCH`].
    Auto(usize),
    /// Every command alone.
    Off,
    /// Batches of up to this many commands to every participant, announced or not: for
    /// participants known to accept batches that do not announce it.
    Forced(usize),
}

impl Default for CommandBatch {
    fn default() -> CommandBatch {
        CommandBatch::Auto(DEFAULT_COMMAND_BATCH)
    }
}

impl std::fmt::Display for CommandBatch {
    /// `auto (up to N, where announced)`, `off`, or `forced (up to N)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommandBatch::Auto(n) => write!(f, "auto (up to {n}, where announced)"),
            CommandBatch::Off => f.write_str("off"),
            CommandBatch::Forced(n) => write!(f, "forced (up to {n})"),
        }
    }
}

impl From<usize> for CommandBatch {
    /// A number, as `SAGAS_AMQP_COMMAND_BATCH` sets one: 1 (or 0) sends every command alone,
    /// more forces batches of up to that many (at most [`MAX_BATCH`]).
    fn from(n: usize) -> CommandBatch {
        match n {
            0 | 1 => CommandBatch::Off,
            n => CommandBatch::Forced(n.min(MAX_BATCH)),
        }
    }
}

/// What one participant's replies said.
#[derive(Debug, Default)]
struct Heard {
    /// The smallest limit announced within [`QUIET`] of the time kept with it (or the latest
    /// one, when none came since).
    limit: Option<(usize, Instant)>,
    /// When a reply naming it last announced no batches.
    refused: Option<Instant>,
    /// The steps of the commands sent to it (to tell who sent a reply that names nobody).
    steps: HashSet<String>,
}

/// What the replies one transport received announced, and the command batches that allows.
///
/// The rule (docs/protocol.md, "Batches"): a participant gets command batches only once a
/// reply from it has announced them, and not while any reply from it without the announcement
/// was received within the last [`QUIET`]; a batch holds at most the smallest limit it
/// announced within that time (or its latest) and at most the transport's own limit. A reply
/// is from the participant its `x-saga-participant` header names; one without that header is
/// from every participant this transport sent commands of the reply's step to, before or after.
#[derive(Debug, Default)]
pub struct Announcements {
    participants: HashMap<String, Heard>,
    /// Steps of replies that named no participant, and when last heard.
    anonymous: HashMap<String, Instant>,
}

/// Past this many steps of anonymous replies, those older than [`QUIET`] are forgotten.
const ANONYMOUS_KEPT: usize = 1024;

impl Announcements {
    /// Takes in a reply received at `now` that carried the announcement `from`.
    pub fn announced(&mut self, now: Instant, from: Announcement) {
        let Announcement {
            participant,
            accepts_batch,
        } = from;
        // Runs for every reply: the name is copied only the first time.
        let heard = match self.participants.get_mut(&participant) {
            Some(heard) => heard,
            None => self.participants.entry(participant.clone()).or_default(),
        };
        if accepts_batch == 0 {
            heard.refused = Some(now);
            return;
        }
        if heard.limit.is_none() {
            tracing::info!(%participant, accepts_batch, "participant announces command batches");
        }
        let smaller_lately = heard.limit.is_some_and(|(limit, since)| {
            limit < accepts_batch && now.saturating_duration_since(since) < QUIET
        });
        if !smaller_lately {
            heard.limit = Some((accepts_batch, now));
        }
    }

    /// Takes in a reply received at `now` for `step` that named no participant: it announced
    /// nothing.
    pub fn anonymous(&mut self, now: Instant, step: &str) {
        if self.anonymous.len() >= ANONYMOUS_KEPT {
            self.anonymous
                .retain(|_, at| now.saturating_duration_since(*at) < QUIET);
        }
        match self.anonymous.get_mut(step) {
            Some(at) => *at = now,
            None => {
                self.anonymous.insert(step.to_owned(), now);
            }
        }
    }

    /// Takes in that commands of `step` go to `participant`.
    pub fn sends(&mut self, participant: &str, step: &str) {
        // Runs for every command: names are copied only the first time.
        let heard = match self.participants.get_mut(participant) {
            Some(heard) => heard,
            None => self.participants.entry(participant.to_owned()).or_default(),
        };
        if !heard.steps.contains(step) {
            heard.steps.insert(step.to_owned());
        }
    }

    /// The most commands `participant` may get in one message at `now`, with the transport's
    /// own limit `max` (1: each alone).
    pub fn limit(&self, now: Instant, participant: &str, max: usize) -> usize {
        let Some(heard) = self.participants.get(participant) else {
            return 1;
        };
        let Some((announced, _)) = heard.limit else {
            return 1;
        };
        let anonymous = heard.steps.iter().filter_map(|s| self.anonymous.get(s));
        let recent = |at: &Instant| now.saturating_duration_since(*at) < QUIET;
        if heard.refused.iter().chain(anonymous).any(recent) {
            return 1;
        }
        announced.min(max).max(1)
    }
}

/// A transport's command batches: its setting and, in automatic mode, what it heard.
#[derive(Debug)]
pub(super) struct Batching {
    setting: CommandBatch,
    heard: Mutex<Announcements>,
}

impl Batching {
    pub(super) fn new(setting: CommandBatch) -> Batching {
        Batching {
            setting,
            heard: Mutex::default(),
        }
    }

    fn heard(&self) -> MutexGuard<'_, Announcements> {
        // A panic while holding this short lock leaves the data consistent.
        self.heard.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Splits `messages` into what goes in one AMQP message each, as the setting and, in
    /// automatic mode, the announcements heard so far allow.
    pub(super) fn group<'a>(&self, messages: &'a [OutboxMessage]) -> Vec<Vec<&'a OutboxMessage>> {
        match self.setting {
            CommandBatch::Off => group_by_participant(messages, |_| 1),
            CommandBatch::Forced(max) => group_by_participant(messages, |_| max),
            CommandBatch::Auto(max) => {
                let now = Instant::now();
                let mut heard = self.heard();
                for m in messages {
                    heard.sends(&m.participant, &m.command.step);
                }
                group_by_participant(messages, |p| heard.limit(now, p, max))
            }
        }
    }

    /// Takes in a message of replies received now, with the announcement it carried and its
    /// reply bodies (read, for their step, only when it names no participant). Only automatic
    /// mode listens.
    pub(super) fn received<'b>(
        &self,
        from: Option<Announcement>,
        bodies: impl IntoIterator<Item = &'b [u8]>,
    ) {
        if !matches!(self.setting, CommandBatch::Auto(_)) {
            return;
        }
        let now = Instant::now();
        match from {
            Some(from) => self.heard().announced(now, from),
            None => {
                let steps: Vec<String> = bodies.into_iter().filter_map(step_of).collect();
                let mut heard = self.heard();
                for step in &steps {
                    heard.anonymous(now, step);
                }
            }
        }
    }
}

/// The `step` of a reply body, when it has one.
fn step_of(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Step {
        step: String,
    }
    serde_json::from_slice::<Step>(body).ok().map(|s| s.step)
}

/// Splits `messages` into what goes in one AMQP message each: the commands for one participant,
/// in their order, at most `max(participant)` together (≤ 1: each alone). Groups come in the
/// order of their participants' first commands.
pub fn group_by_participant(
    messages: &[OutboxMessage],
    mut max: impl FnMut(&str) -> usize,
) -> Vec<Vec<&OutboxMessage>> {
    let mut groups: Vec<Vec<&OutboxMessage>> = Vec::new();
    // Each participant's limit, and the group being filled for it (index into `groups`).
    let mut open: Vec<(&str, usize, usize)> = Vec::new();
    for m in messages {
        match open.iter_mut().find(|(p, ..)| *p == m.participant) {
            Some((_, limit, at)) if groups[*at].len() < *limit => groups[*at].push(m),
            Some((_, _, at)) => {
                *at = groups.len();
                groups.push(vec![m]);
            }
            None => {
                open.push((&m.participant, max(&m.participant), groups.len()));
                groups.push(vec![m]);
            }
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use sagas_participant::protocol::{Command, Operation};
    use uuid::Uuid;

    fn message(id: i64, participant: &str) -> OutboxMessage {
        OutboxMessage {
            id,
            participant: participant.into(),
            command: Command {
                protocol: 1,
                transaction_id: Uuid::nil(),
                definition: "d".into(),
                step: format!("s{id}"),
                operation: Operation::Action,
                attempt: 1,
                payload: serde_json::Value::Null,
                output: None,
                deadline: None,
                traceparent: None,
            },
        }
    }

    fn ids(groups: &[Vec<&OutboxMessage>]) -> Vec<Vec<i64>> {
        groups
            .iter()
            .map(|g| g.iter().map(|m| m.id).collect())
            .collect()
    }

    #[test]
    fn without_batches_every_command_travels_alone_in_order() {
        let messages = [message(1, "a"), message(2, "b"), message(3, "a")];
        for max in [0, 1] {
            assert_eq!(
                ids(&group_by_participant(&messages, |_| max)),
                [vec![1], vec![2], vec![3]]
            );
        }
        assert!(group_by_participant(&[], |_| 16).is_empty());
    }

    #[test]
    fn commands_group_by_participant_in_order_and_a_full_group_starts_another() {
        let messages = [
            message(1, "a"),
            message(2, "b"),
            message(3, "a"),
            message(4, "a"),
            message(5, "b"),
            message(6, "a"),
            message(7, "c"),
        ];
        assert_eq!(
            ids(&group_by_participant(&messages, |_| 2)),
            [vec![1, 3], vec![2, 5], vec![4, 6], vec![7]]
        );
        assert_eq!(
            ids(&group_by_participant(&messages, |_| 16)),
            [vec![1, 3, 4, 6], vec![2, 5], vec![7]]
        );
        let limits = |p: &str| if p == "a" { 3 } else { 1 };
        assert_eq!(
            ids(&group_by_participant(&messages, limits)),
            [vec![1, 3, 4], vec![2], vec![5], vec![6], vec![7]]
        );
    }

    #[test]
    fn the_setting_as_a_number_is_off_at_one_and_forced_above() {
        assert_eq!(CommandBatch::from(1), CommandBatch::Off);
        assert_eq!(CommandBatch::from(0), CommandBatch::Off);
        assert_eq!(CommandBatch::from(8), CommandBatch::Forced(8));
        assert_eq!(
            CommandBatch::from(MAX_BATCH + 1),
            CommandBatch::Forced(MAX_BATCH)
        );
        assert_eq!(
            CommandBatch::default(),
            CommandBatch::Auto(DEFAULT_COMMAND_BATCH)
        );
    }

    const MINUTE: Duration = Duration::from_secs(60);

    fn accepts(participant: &str, n: usize) -> Announcement {
        Announcement::new(participant, n)
    }

    #[test]
    fn a_participant_gets_batches_once_it_announced_them_and_no_larger_than_either_limit() {
        let t0 = Instant::now();
        let mut heard = Announcements::default();
        heard.sends("a", "debit");
        assert_eq!(heard.limit(t0, "a", 16), 1, "nothing heard yet");
        assert_eq!(heard.limit(t0, "unknown", 16), 1);
        heard.announced(t0, accepts("a", 256));
        assert_eq!(heard.limit(t0, "a", 16), 16, "the orchestrator's limit");
        heard.announced(t0, accepts("b", 4));
        assert_eq!(heard.limit(t0, "b", 16), 4, "the participant's limit");
        assert_eq!(heard.limit(t0 + 60 * MINUTE, "a", 16), 16, "it lasts");
    }

    #[test]
    fn a_reply_that_announces_no_batches_stops_them_until_it_is_quiet_for_ten_minutes() {
        let t0 = Instant::now();
        let mut heard = Announcements::default();
        heard.announced(t0, accepts("a", 256));
        heard.announced(t0 + MINUTE, accepts("a", 0));
        assert_eq!(heard.limit(t0 + MINUTE, "a", 16), 1);
        heard.announced(t0 + 2 * MINUTE, accepts("a", 256));
        assert_eq!(
            heard.limit(t0 + 2 * MINUTE, "a", 16),
            1,
            "another replica announcing does not lift it"
        );
        assert_eq!(heard.limit(t0 + 10 * MINUTE, "a", 16), 1);
        assert_eq!(heard.limit(t0 + 11 * MINUTE, "a", 16), 16);
    }

    #[test]
    fn a_reply_naming_nobody_stops_batches_to_every_participant_that_serves_its_step() {
        let t0 = Instant::now();
        let mut heard = Announcements::default();
        for p in ["a", "b", "c"] {
            heard.announced(t0, accepts(p, 32));
        }
        heard.sends("a", "debit");
        heard.sends("b", "debit");
        heard.sends("c", "ship");
        // An old replica of `a` (or `b`: both take `debit` commands) answers without headers.
        heard.anonymous(t0 + MINUTE, "debit");
        assert_eq!(heard.limit(t0 + MINUTE, "a", 16), 1);
        assert_eq!(heard.limit(t0 + MINUTE, "b", 16), 1);
        assert_eq!(heard.limit(t0 + MINUTE, "c", 16), 16);
        // Learnt after the reply: a participant that takes the step now is stopped too.
        heard.sends("c", "debit");
        assert_eq!(heard.limit(t0 + MINUTE, "c", 16), 1);
        assert_eq!(heard.limit(t0 + 11 * MINUTE, "a", 16), 16);
        // Announcing does not lift it: the anonymous replies may come from another replica.
        heard.anonymous(t0 + 12 * MINUTE, "ship");
        heard.announced(t0 + 12 * MINUTE, accepts("c", 32));
        assert_eq!(heard.limit(t0 + 12 * MINUTE, "c", 16), 1);
    }

    #[test]
    fn replicas_announcing_different_limits_get_the_smallest_of_the_last_ten_minutes() {
        let t0 = Instant::now();
        let mut heard = Announcements::default();
        heard.announced(t0, accepts("a", 4));
        heard.announced(t0 + MINUTE, accepts("a", 64));
        assert_eq!(heard.limit(t0 + MINUTE, "a", 16), 4);
        heard.announced(t0 + 5 * MINUTE, accepts("a", 4));
        heard.announced(t0 + 14 * MINUTE, accepts("a", 64));
        assert_eq!(
            heard.limit(t0 + 14 * MINUTE, "a", 16),
            4,
            "4 was heard since"
        );
        heard.announced(t0 + 16 * MINUTE, accepts("a", 64));
        assert_eq!(heard.limit(t0 + 16 * MINUTE, "a", 16), 16);
    }

    #[test]
    fn anonymous_steps_are_forgotten_once_quiet_when_there_are_many() {
        let t0 = Instant::now();
        let mut heard = Announcements::default();
        for n in 0..ANONYMOUS_KEPT {
            heard.anonymous(t0, &format!("s{n}"));
        }
        heard.anonymous(t0 + 11 * MINUTE, "late");
        assert_eq!(heard.anonymous.len(), 1);
        heard.anonymous(t0 + 11 * MINUTE, "late");
        assert_eq!(heard.anonymous.len(), 1);
    }
}
