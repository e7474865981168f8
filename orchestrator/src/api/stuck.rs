//! `/v1/stuck`: stuck transactions grouped by cause, so that one broken participant shows as
//! one line with a count rather than as many transactions to read one by one.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::sagas::definition_name;
use super::{ApiError, ErrorBody};
use crate::engine::Engine;
use crate::store::StuckStep;

/// Most ids a group lists.
pub const MAX_IDS: usize = 20;

/// What a stuck step without a logged reason is grouped under.
const NO_REASON: &str = "no reason logged";

/// Query of `GET /v1/stuck`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StuckQuery {
    /// Only this definition (a definition name: 1 to 100 of `A-Za-z0-9_.-`).
    #[param(pattern = "^[A-Za-z0-9_.-]{1,100}$")]
    pub definition: Option<String>,
}

/// Stuck steps that share a definition, step, participant and reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StuckGroup {
    /// The definition.
    pub definition: String,
    /// The stuck step.
    pub step: String,
    /// Its participant.
    pub participant: String,
    /// Why it is stuck: the step's last error, trimmed, with counts of attempts replaced by
    /// `N` so that the same cause reached after more or fewer attempts is one group.
    pub reason: String,
    /// Stuck transactions in the group.
    pub count: u64,
    /// The earliest last change of a transaction in the group.
    pub oldest_updated_at: chrono::DateTime<chrono::Utc>,
    /// The latest last change of a transaction in the group.
    pub newest_updated_at: chrono::DateTime<chrono::Utc>,
    /// Up to 20 of the transactions, oldest change first.
    pub ids: Vec<Uuid>,
}

/// Answer of `GET /v1/stuck`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StuckGroups {
    /// The groups, largest first (then oldest first).
    pub groups: Vec<StuckGroup>,
}

/// A stuck step's reason as groups compare it: trimmed, each number of attempts (`20
/// attempt(s)`, `attempt 3`) replaced by `N`.
pub fn normalise(reason: &str) -> String {
    let words: Vec<&str> = reason.split_whitespace().collect();
    let number = |w: &str| !w.is_empty() && w.bytes().all(|b| b.is_ascii_digit());
    let counts_attempts = |w: &str| w.starts_with("attempt");
    (0..words.len())
        .map(|i| {
            let (w, before, after) = (
                words[i],
                i.checked_sub(1).map(|j| words[j]),
                words.get(i + 1).copied(),
            );
            // "3" in "3 attempt(s)", and "3" or "3," or "3;" in "attempt 3".
            let bare = w.trim_end_matches([',', ';', ':', ')', '.']);
            let of_attempts =
                after.is_some_and(counts_attempts) || before.is_some_and(|b| b == "attempt");
            if number(bare) && of_attempts {
                format!("N{}", &w[bare.len()..])
            } else {
                w.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Groups stuck steps (oldest change first, as the store reads them) by definition, step,
/// participant and normalised reason; largest groups first, then the oldest.
pub fn group(steps: Vec<StuckStep>) -> Vec<StuckGroup> {
    let mut groups: Vec<StuckGroup> = Vec::new();
    let mut index: HashMap<(String, String, String, String), usize> = HashMap::new();
    for s in steps {
        let reason = normalise(s.last_error.as_deref().unwrap_or(NO_REASON));
        let key = (s.definition, s.step, s.participant, reason);
        let at = s.updated_at;
        match index.get(&key) {
            Some(&i) => {
                let g = &mut groups[i];
                g.count += 1;
                g.oldest_updated_at = g.oldest_updated_at.min(at);
                g.newest_updated_at = g.newest_updated_at.max(at);
                if g.ids.len() < MAX_IDS && !g.ids.contains(&s.id) {
                    g.ids.push(s.id);
                }
            }
            None => {
                index.insert(key.clone(), groups.len());
                let (definition, step, participant, reason) = key;
                groups.push(StuckGroup {
                    definition,
                    step,
                    participant,
                    reason,
                    count: 1,
                    oldest_updated_at: at,
                    newest_updated_at: at,
                    ids: vec![s.id],
                });
            }
        }
    }
    groups.sort_by(|a, b| {
        (b.count.cmp(&a.count))
            .then(a.oldest_updated_at.cmp(&b.oldest_updated_at))
            .then_with(|| {
                (&a.definition, &a.step, &a.reason).cmp(&(&b.definition, &b.step, &b.reason))
            })
    });
    groups
}

/// `GET /v1/stuck?definition=`: stuck transactions grouped by definition, step, participant
/// and reason, largest group first.
#[utoipa::path(
    get,
    path = "/v1/stuck",
    tag = "operator",
    operation_id = "stuck",
    params(StuckQuery),
    responses(
        (status = 200, description = "The groups, largest first", body = StuckGroups),
        (status = 400, description = "`invalid_query`, naming the parameter", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub async fn stuck(
    State(engine): State<Arc<Engine>>,
    query: Result<Query<StuckQuery>, QueryRejection>,
) -> Result<Json<StuckGroups>, ApiError> {
    let Query(query) = query?;
    if let Some(d) = query.definition.as_deref()
        && !definition_name(d)
    {
        return Err(ApiError::invalid_query(format!(
            "definition {d:?} is not a definition name (1 to 100 of A-Za-z0-9_.-)"
        )));
    }
    let mut steps = engine.stuck_steps().await?;
    if let Some(d) = &query.definition {
        steps.retain(|s| s.definition == *d);
    }
    Ok(Json(StuckGroups {
        groups: group(steps),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_trimmed_and_their_counts_of_attempts_do_not_tell_causes_apart() {
        assert_eq!(
            normalise("  compensate exhausted 20 attempt(s); last: no reply within 5000 ms \n"),
            "compensate exhausted N attempt(s); last: no reply within 5000 ms"
        );
        assert_eq!(
            normalise("confirm attempt 3, answered failed (account 42 closed)"),
            "confirm attempt N, answered failed (account 42 closed)"
        );
        assert_eq!(normalise("account 42 closed"), "account 42 closed");
    }

    fn step(id: u128, reason: &str, seconds: i64) -> StuckStep {
        StuckStep {
            id: Uuid::from_u128(id),
            definition: "transfer".into(),
            step: "debit".into(),
            participant: "accounts".into(),
            last_error: Some(reason.into()),
            updated_at: chrono::DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap(),
        }
    }

    #[test]
    fn the_same_cause_is_one_group_and_the_largest_group_comes_first() {
        let groups = group(vec![
            step(1, "compensate exhausted 20 attempt(s); last: gone", 0),
            step(2, "compensate answered failed (renamed)", 1),
            step(3, "compensate exhausted 40 attempt(s); last: gone", 2),
        ]);
        assert_eq!(groups.len(), 2);
        let g = &groups[0];
        assert_eq!(g.reason, "compensate exhausted N attempt(s); last: gone");
        assert_eq!(g.count, 2);
        assert_eq!(g.ids, vec![Uuid::from_u128(1), Uuid::from_u128(3)]);
        assert!(g.oldest_updated_at < g.newest_updated_at);
        assert_eq!(groups[1].count, 1);

        let many: Vec<StuckStep> = (0..30).map(|i| step(i, "same", i as i64)).collect();
        let groups = group(many);
        assert_eq!((groups[0].count, groups[0].ids.len()), (30, MAX_IDS));
        assert_eq!(groups[0].ids[0], Uuid::from_u128(0), "oldest first");
    }
}
