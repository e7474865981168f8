//! Reading the databases: instances in keyset batches, their logs, the outbox, and the
//! participants' barrier tables.

use std::collections::{HashMap, HashSet};

use chrono::Duration;
use futures_util::TryStreamExt;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::barrier::{self, BarrierRow, cross_check};
use super::check::{Limits, LogRow, StoredRow, check_instance, human};
use super::{Finding, FindingKind, Options, Progress, ReconcileError, Report, Summary};
use crate::machine::{Event, Instance, Time};
use sagas_participant::protocol::Operation;

type InstanceRow = (Uuid, String, String, i64, String, Time, Time);

/// Open instances created before the window: they are still owed an outcome.
const OPEN_BEFORE: &str = "SELECT id, definition, status, seq, state::text, created_at, updated_at
     FROM sagas_instance_states
     WHERE status NOT IN ('completed', 'compensated', 'resolved') AND created_at < LEAST($1, $6)
       AND ($2::text IS NULL OR definition = $2)
       AND (created_at, id) > ($3, $4)
     ORDER BY created_at, id LIMIT $5";

/// Instances created in the window.
const IN_WINDOW: &str = "SELECT id, definition, status, seq, state::text, created_at, updated_at
     FROM sagas_instance_states
     WHERE created_at >= $1 AND created_at < $6
       AND ($2::text IS NULL OR definition = $2)
       AND (created_at, id) > ($3, $4)
     ORDER BY created_at, id LIMIT $5";

const COUNT: &str = "SELECT
       (SELECT count(*) FROM sagas_instances
         WHERE status NOT IN ('completed', 'compensated', 'resolved') AND created_at < LEAST($1, $3)
           AND ($2::text IS NULL OR definition = $2))
     + (SELECT count(*) FROM sagas_instances
         WHERE created_at >= $1 AND created_at < $3 AND ($2::text IS NULL OR definition = $2))";

const EVENTS: &str = "SELECT instance_id, seq, body::text FROM sagas_event_bodies
     WHERE instance_id = ANY($1) ORDER BY instance_id, seq";

/// The orchestrator's prune horizon (migration 0007): instances created before it may have
/// been deleted by retention.
const PRUNED_BEFORE: &str = "SELECT pruned_before FROM sagas_retention";

/// A participant's barrier cleanup horizon: transactions created before it may have lost their
/// barrier rows. The table is absent where the participant never cleaned up (or runs another
/// runtime).
const BARRIER_PRUNED_BEFORE: &str = "SELECT pruned_before FROM sagas_barrier_retention";

/// The `pruned_before` time `query` reads from `pool`, if there is one: `None` also when the
/// table does not exist (PostgreSQL's `undefined_table`).
async fn horizon(
    conn: impl sqlx::PgExecutor<'_>,
    query: &'static str,
) -> Result<Option<Time>, sqlx::Error> {
    match sqlx::query_scalar(query).fetch_optional(conn).await {
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Ok(None),
        other => other,
    }
}

/// When a UUIDv7 transaction id was created (`None` for other versions).
fn created(id: Uuid) -> Option<Time> {
    let (secs, nanos) = id.get_timestamp()?.to_unix();
    Time::from_timestamp(i64::try_from(secs).ok()?, nanos)
}

fn db(e: sqlx::Error) -> ReconcileError {
    ReconcileError::Database(e)
}

/// Bounds of an open window, inside PostgreSQL's timestamp range.
fn far_past() -> Time {
    Time::from_timestamp(0, 0).expect("the epoch")
}

fn far_future() -> Time {
    Time::from_timestamp(253_402_300_799, 0).expect("9999-12-31")
}

/// Reconciles the orchestrator database `pool` as `options` say, reporting progress.
pub async fn run(
    pool: &PgPool,
    options: &Options,
    mut progress: impl FnMut(Progress),
) -> Result<Report, ReconcileError> {
    let mut tx = pool.begin().await.map_err(db)?;
    // One snapshot for the whole scan: a transition committed meanwhile is either wholly
    // visible (events and projection) or not at all.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    let (snapshot_at,): (Time,) = sqlx::query_as("SELECT now()")
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;

    let since = options.since.unwrap_or_else(far_past);
    let until = options.until.unwrap_or_else(far_future);
    let definition = options.definition.as_deref();
    let (total,): (i64,) = sqlx::query_as(COUNT)
        .bind(since)
        .bind(definition)
        .bind(until)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
    let mut progress_state = Progress {
        done: 0,
        total: total.max(0) as u64,
    };
    progress(progress_state);

    let mut report = Report {
        summary: Summary {
            now: Some(options.now),
            since: options.since,
            until: options.until,
            definition: options.definition.clone(),
            participants: options
                .participants
                .iter()
                .map(|p| p.name.clone())
                .collect(),
            ..Summary::default()
        },
        findings: Vec::new(),
    };
    let limits = Limits::from(options);
    // What retention may have deleted on either side is not evidence of anything.
    let pruned_before = horizon(&mut *tx, PRUNED_BEFORE).await.map_err(db)?;
    let mut barrier_pruned_before = HashMap::new();
    for p in &options.participants {
        let h = horizon(&p.pool, BARRIER_PRUNED_BEFORE)
            .await
            .map_err(|source| ReconcileError::Participant {
                name: p.name.clone(),
                source,
            })?;
        barrier_pruned_before.insert(p.name.clone(), h);
    }

    let passes: &[&'static str] = if options.since.is_some() {
        &[OPEN_BEFORE, IN_WINDOW]
    } else {
        &[IN_WINDOW]
    };
    for &sql in passes {
        let mut after = (far_past(), Uuid::nil());
        loop {
            let rows: Vec<InstanceRow> = sqlx::query_as(sql)
                .bind(since)
                .bind(definition)
                .bind(after.0)
                .bind(after.1)
                .bind(i64::from(options.batch_size.max(1)))
                .bind(until)
                .fetch_all(&mut *tx)
                .await
                .map_err(db)?;
            let Some(last) = rows.last() else { break };
            after = (last.5, last.0);
            let full = rows.len() as u32 >= options.batch_size.max(1);
            check_batch(
                &mut tx,
                options,
                limits,
                &barrier_pruned_before,
                rows,
                &mut report,
            )
            .await?;
            progress_state.done = report.summary.instances;
            progress(progress_state);
            if !full {
                break;
            }
        }
    }

    check_outbox(&mut tx, options, &mut report).await?;
    if options.definition.is_none() {
        check_orphan_events(&mut tx, options, &mut report).await?;
        for p in &options.participants {
            check_unknown_transactions(
                &mut tx,
                options,
                snapshot_at,
                pruned_before,
                p,
                &mut report,
            )
            .await?;
        }
    }
    tx.rollback().await.map_err(db)?;
    Ok(report.finish())
}

/// A terminal instance to cross-check: its replayed state, the operations its log
/// dispatched, when it was created.
type ToCross = (Instance, HashSet<(usize, Operation)>, Time);

/// Checks a batch of instances; `barrier_pruned_before` gives, per participant, the time before
/// which its barrier cleanup may have deleted rows (instances created before it are not
/// cross-checked against it).
async fn check_batch(
    tx: &mut PgConnection,
    options: &Options,
    limits: Limits,
    barrier_pruned_before: &HashMap<String, Option<Time>>,
    rows: Vec<InstanceRow>,
    report: &mut Report,
) -> Result<(), ReconcileError> {
    let ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let mut logs: HashMap<Uuid, Vec<LogRow>> = HashMap::with_capacity(ids.len());
    {
        let mut stream = sqlx::query_as::<_, (Uuid, i64, String)>(EVENTS)
            .bind(&ids)
            .fetch(&mut *tx);
        while let Some((id, seq, body)) = stream.try_next().await.map_err(db)? {
            let event = serde_json::from_str::<Event>(&body).map_err(|e| e.to_string());
            logs.entry(id).or_default().push((seq, event));
        }
    }
    report.summary.events += logs.values().map(|l| l.len() as u64).sum::<u64>();

    // Terminal instances with steps on a participant under cross-check.
    let mut to_cross: Vec<ToCross> = Vec::new();
    for (id, definition, status, seq, state, created_at, updated_at) in rows {
        let row = StoredRow {
            id,
            definition,
            status,
            seq,
            state: serde_json::from_str::<Instance>(&state).map_err(|e| e.to_string()),
            created_at,
            updated_at,
        };
        let log = logs.remove(&id).unwrap_or_default();
        let checked = check_instance(&row, &log, limits);
        let status = checked
            .truth
            .as_ref()
            .map_or(row.status.as_str(), |t| t.status.as_str());
        report.summary.count(&row.definition, status);
        report.summary.instances += 1;
        report.findings.extend(checked.findings);
        if let Some(truth) = checked.truth
            && truth.status.is_terminal()
            && options
                .participants
                .iter()
                .any(|p| truth.plan.steps.iter().any(|s| s.participant == p.name))
        {
            to_cross.push((truth, checked.dispatched, row.created_at));
        }
    }
    if to_cross.is_empty() {
        return Ok(());
    }
    for p in &options.participants {
        let cleaned_before = barrier_pruned_before.get(&p.name).copied().flatten();
        let checked: Vec<&ToCross> = to_cross
            .iter()
            .filter(|(t, _, _)| t.plan.steps.iter().any(|s| s.participant == p.name))
            .filter(|(_, _, created_at)| cleaned_before.is_none_or(|h| *created_at >= h))
            .collect();
        let ids: Vec<Uuid> = checked.iter().map(|(t, _, _)| t.id).collect();
        if ids.is_empty() {
            continue;
        }
        let rows =
            barrier::rows(&p.pool, &ids)
                .await
                .map_err(|source| ReconcileError::Participant {
                    name: p.name.clone(),
                    source,
                })?;
        let mut by_tx: HashMap<Uuid, Vec<BarrierRow>> = HashMap::new();
        for r in rows {
            by_tx.entry(r.transaction_id).or_default().push(r);
        }
        for (truth, dispatched, _) in checked {
            let rows = by_tx.get(&truth.id).map_or(&[][..], Vec::as_slice);
            report
                .findings
                .extend(cross_check(&p.name, truth, dispatched, rows));
        }
    }
    Ok(())
}

async fn check_outbox(
    tx: &mut PgConnection,
    options: &Options,
    report: &mut Report,
) -> Result<(), ReconcileError> {
    type OutboxRow = (
        Uuid,
        Option<String>,
        String,
        Option<String>,
        Option<String>,
        Option<i32>,
        Time,
    );
    let cutoff = options.now - options.outbox_threshold;
    let mut stream = sqlx::query_as::<_, OutboxRow>(
        "SELECT o.instance_id, i.definition, o.participant, o.body->>'step',
                o.body->>'operation', (o.body->>'attempt')::int, o.created_at
         FROM sagas_outbox o LEFT JOIN sagas_instances i ON i.id = o.instance_id
         WHERE o.created_at < $1 AND ($2::text IS NULL OR i.definition = $2)
         ORDER BY o.created_at, o.id",
    )
    .bind(cutoff)
    .bind(options.definition.as_deref())
    .fetch(&mut *tx);
    while let Some((id, definition, participant, step, operation, attempt, created_at)) =
        stream.try_next().await.map_err(db)?
    {
        report.summary.outbox_rows += 1;
        report.findings.push(Finding {
            kind: FindingKind::OutboxUnpublished,
            instance: Some(id),
            definition,
            step,
            detail: format!(
                "{} attempt {} to {participant} unpublished for {} (threshold {})",
                operation.as_deref().unwrap_or("command"),
                attempt.unwrap_or(0),
                human(options.now - created_at),
                human(options.outbox_threshold)
            ),
        });
    }
    Ok(())
}

async fn check_orphan_events(
    tx: &mut PgConnection,
    options: &Options,
    report: &mut Report,
) -> Result<(), ReconcileError> {
    let rows: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT e.instance_id, count(*) FROM sagas_events e
         WHERE NOT EXISTS (SELECT 1 FROM sagas_instances i WHERE i.id = e.instance_id)
           AND e.at >= $1 AND e.at < $2
         GROUP BY e.instance_id ORDER BY e.instance_id",
    )
    .bind(options.since.unwrap_or_else(far_past))
    .bind(options.until.unwrap_or_else(far_future))
    .fetch_all(&mut *tx)
    .await
    .map_err(db)?;
    for (id, n) in rows {
        report.findings.push(Finding {
            kind: FindingKind::LogCorrupt,
            instance: Some(id),
            definition: None,
            step: None,
            detail: format!("{n} event(s) in the log of an instance that has no projection row"),
        });
    }
    Ok(())
}

/// Barrier rows of transactions the orchestrator has no record of. Only transactions whose
/// newest barrier row is older than the scan's snapshot (minus a minute for clock skew between
/// the two databases) are considered: a newer one may belong to an instance started since.
/// Nor those created (by their UUIDv7 id) before the orchestrator's prune horizon: retention
/// may have deleted them.
async fn check_unknown_transactions(
    tx: &mut PgConnection,
    options: &Options,
    snapshot_at: Time,
    pruned_before: Option<Time>,
    p: &super::ParticipantDb,
    report: &mut Report,
) -> Result<(), ReconcileError> {
    let err = |source| ReconcileError::Participant {
        name: p.name.clone(),
        source,
    };
    let mut stream = sqlx::query_as::<_, (Uuid, String)>(
        "SELECT transaction_id,
                string_agg(step || ' ' || operation || ' (' || origin || ')', ', '
                           ORDER BY step, operation)
         FROM sagas_barrier GROUP BY transaction_id
         HAVING min(created_at) >= $1 AND min(created_at) < $2 AND max(created_at) < $3
         ORDER BY transaction_id",
    )
    .bind(options.since.unwrap_or_else(far_past))
    .bind(options.until.unwrap_or_else(far_future))
    .bind(snapshot_at - Duration::minutes(1))
    .fetch(&p.pool);
    let mut chunk: Vec<(Uuid, String)> = Vec::new();
    loop {
        let next = stream.try_next().await.map_err(err)?;
        let end = next.is_none();
        chunk.extend(next);
        if chunk.len() >= 1_000 || (end && !chunk.is_empty()) {
            let ids: Vec<Uuid> = chunk.iter().map(|(id, _)| *id).collect();
            let known: Vec<(Uuid,)> =
                sqlx::query_as("SELECT id FROM sagas_instances WHERE id = ANY($1)")
                    .bind(&ids)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(db)?;
            let known: HashSet<Uuid> = known.into_iter().map(|(id,)| id).collect();
            let pruned =
                |id: Uuid| pruned_before.is_some_and(|h| created(id).is_some_and(|at| at < h));
            for (id, what) in chunk.drain(..) {
                if !known.contains(&id) && !pruned(id) {
                    report.findings.push(Finding {
                        kind: FindingKind::BarrierMismatch,
                        instance: Some(id),
                        definition: None,
                        step: None,
                        detail: format!(
                            "{} recorded {what} for a transaction the orchestrator has no record of",
                            p.name
                        ),
                    });
                }
            }
        }
        if end {
            break;
        }
    }
    Ok(())
}
