//! `--prefill-events`: an event log of finished sagas before the timed part.
//!
//! A few real sagas of the workload run first, started as the run starts its own and served
//! by the participants, so that their rows are exactly what the code writes. Their instance rows and events (in the
//! orchestrator's database) and their barrier and `bench_effects` rows (in the participants'
//! database) are then cloned in chunks under new ids: UUIDv7s of earlier times, as if the
//! history had been written at 250 sagas/s before the run, with every timestamp shifted by the
//! same amount and the id replaced inside the JSON too. Both databases are then vacuumed and
//! analysed and a checkpoint writes everything out, so that the timed part starts from a
//! settled state.
//!
//! Every prefilled id sorts before [`Prefilled::boundary`], every id the run creates after it
//! (instance ids are UUIDv7, ordered by time), which is how the checks leave the prefill out.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use sqlx::{Connection as _, PgConnection};
use uuid::Uuid;

use crate::env::Scratch;
use crate::participants::{self, BenchInput};
use crate::run::Starter;
use crate::{Args, Workload};

/// Real sagas run first and cloned (20, so that `compensate` has its 1 in 5 failures).
const SEEDS: u64 = 20;
/// Sagas cloned per statement.
const CHUNK: usize = 5_000;
/// Time between two cloned sagas' starts (250 sagas/s).
const SPACING_MS: i64 = 4;

/// What the prefill wrote and what it cost.
#[derive(Debug, Clone, Serialize)]
pub struct PrefillReport {
    /// Events asked for (`--prefill-events`).
    pub requested_events: u64,
    /// Events in the log before the run (whole sagas, so a little more than asked for).
    pub events: u64,
    /// Finished instances before the run (the seeds and their clones).
    pub instances: u64,
    /// Real sagas run first, whose rows were cloned.
    pub seeds: u64,
    /// Seconds spent running the seeds, cloning, in `VACUUM ANALYZE`, in `CHECKPOINT`, and in all.
    pub seed_secs: f64,
    pub clone_secs: f64,
    pub vacuum_secs: f64,
    pub checkpoint_secs: f64,
    pub total_secs: f64,
    /// Database sizes after the vacuum.
    pub orchestrator_db_bytes: i64,
    pub participant_db_bytes: i64,
    /// Size of every table after the vacuum.
    pub tables: Vec<TableSize>,
}

/// One table's size (`pg_table_size`, heap with TOAST and maps, and `pg_indexes_size`).
#[derive(Debug, Clone, Serialize)]
pub struct TableSize {
    /// `orchestrator` or `participant`.
    pub database: &'static str,
    pub table: String,
    /// Rows as of the `ANALYZE` (`reltuples`).
    pub rows: i64,
    pub table_bytes: i64,
    pub index_bytes: i64,
}

/// The prefill's result: its report, and the id below which every prefilled instance sorts.
pub struct Prefilled {
    pub report: PrefillReport,
    pub boundary: Uuid,
}

// One statement per chunk and database. `m` maps each new id to the seed it copies and the
// shift of its timestamps; the seeds' rows are read from temporary copies, so that no chunk
// scans the growing tables.
const CLONE_ORCHESTRATOR: &str = "
WITH m AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[]) AS m (dst, src, shift_us)
), i AS (
    INSERT INTO sagas_instances (id, definition, version, mode, status, seq, state, plan_id,
                                 failure, created_at, updated_at, idempotency_key, request)
    SELECT m.dst, s.definition, s.version, s.mode, s.status, s.seq,
           replace(s.state::text, m.src::text, m.dst::text)::jsonb, s.plan_id, s.failure,
           s.created_at - m.shift_us * interval '1 microsecond',
           s.updated_at - m.shift_us * interval '1 microsecond',
           NULL, s.request
    FROM m JOIN seed_instances s ON s.id = m.src
)
INSERT INTO sagas_events (instance_id, seq, kind, step, operation, attempt, body, at, plan_id)
SELECT m.dst, e.seq, e.kind, e.step, e.operation, e.attempt,
       replace(e.body::text, m.src::text, m.dst::text)::jsonb,
       e.at - m.shift_us * interval '1 microsecond', e.plan_id
FROM m JOIN seed_events e ON e.instance_id = m.src";

const CLONE_PARTICIPANT: &str = "
WITH m AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[]) AS m (dst, src, shift_us)
), b AS (
    INSERT INTO sagas_barrier (transaction_id, step, operation, origin, reply, created_at)
    SELECT m.dst, b.step, b.operation, b.origin,
           replace(b.reply::text, m.src::text, m.dst::text)::jsonb,
           b.created_at - m.shift_us * interval '1 microsecond'
    FROM m JOIN seed_barrier b ON b.transaction_id = m.src
)
INSERT INTO bench_effects (saga_id, step, applied, compensated, confirmed, cancelled)
SELECT m.dst, e.step, e.applied, e.compensated, e.confirmed, e.cancelled
FROM m JOIN seed_effects e ON e.saga_id = m.src";

const SIZES: &str = "
SELECT c.relname::text, c.reltuples::bigint, pg_table_size(c.oid), pg_indexes_size(c.oid)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND n.nspname = 'public' AND c.relname NOT LIKE '\\_sqlx%'
ORDER BY c.relname";

/// Runs the seeds as the run starts its sagas, clones them to about `args.prefill_events` events, then
/// vacuums, analyses and checkpoints.
pub async fn prefill(
    args: &Args,
    starter: &Starter,
    workload: Workload,
    definition: &str,
    orch: &Scratch,
    part: &Scratch,
) -> Result<Prefilled> {
    let t0 = Instant::now();
    let mut oc = PgConnection::connect(&orch.url).await?;
    let mut pc = PgConnection::connect(&part.url).await?;
    // The prefill's commits need not wait for their WAL flush; the checkpoint at the end
    // writes everything out anyway.
    for conn in [&mut oc, &mut pc] {
        sqlx::query("SET synchronous_commit = off")
            .execute(&mut *conn)
            .await?;
    }

    // The seeds: real sagas, as the run's are.
    let mut seeds = Vec::new();
    for n in 0..SEEDS {
        let input = serde_json::to_value(BenchInput {
            n,
            fail: participants::fails(workload, n),
        })?;
        seeds.push(starter.start(definition, input).await?);
    }
    let limit = Duration::from_secs(args.stall_secs.max(30));
    let deadline = Instant::now() + limit;
    loop {
        let (done,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM sagas_instances
             WHERE id = ANY($1) AND status IN ('completed', 'compensated')",
        )
        .bind(&seeds)
        .fetch_one(&mut oc)
        .await?;
        if done as u64 == SEEDS {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {done} of the prefill's {SEEDS} seed sagas finished within {} s",
            limit.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seed_secs = t0.elapsed().as_secs_f64();

    // Temporary copies of the seeds' rows, read by every chunk.
    let copies = [
        ("seed_instances", "sagas_instances", "id"),
        ("seed_events", "sagas_events", "instance_id"),
        ("seed_barrier", "sagas_barrier", "transaction_id"),
        ("seed_effects", "bench_effects", "saga_id"),
    ];
    for (conn, tables) in [(&mut oc, &copies[..2]), (&mut pc, &copies[2..])] {
        copy_seeds(conn, &seeds, tables).await?;
    }

    // The clones: whole sagas, seed after seed, until the events reach the target.
    let per_seed: Vec<(Uuid, DateTime<Utc>, i64)> = sqlx::query_as(
        "SELECT s.id, s.created_at, (SELECT count(*) FROM seed_events e WHERE e.instance_id = s.id)
         FROM seed_instances s ORDER BY s.id",
    )
    .fetch_all(&mut oc)
    .await?;
    let seed_events: i64 = per_seed.iter().map(|s| s.2).sum();
    let mut plan: Vec<usize> = Vec::new();
    let mut planned = seed_events.max(0) as u64;
    while planned < args.prefill_events {
        let s = plan.len() % per_seed.len();
        planned += per_seed[s].2.max(1) as u64;
        plan.push(s);
    }
    let first_seed_ms = per_seed
        .iter()
        .map(|s| s.1.timestamp_millis())
        .min()
        .context("no seed instance")?;
    // The history ends a second before the first seed.
    let end_ms = first_seed_ms - 1_000;
    let clones = plan.len() as i64;

    let bar = progress_bar(args, planned);
    let mut next_line = 0.1;
    let mut written = seed_events.max(0) as u64;
    let t_clone = Instant::now();
    for (c, chunk) in plan.chunks(CHUNK).enumerate() {
        let mut dst = Vec::with_capacity(chunk.len());
        let mut src = Vec::with_capacity(chunk.len());
        let mut shift = Vec::with_capacity(chunk.len());
        for (j, &s) in chunk.iter().enumerate() {
            let k = (c * CHUNK + j) as i64;
            let at_ms = end_ms - (clones - 1 - k) * SPACING_MS;
            let (seed, created, _) = &per_seed[s];
            let mut random = [0u8; 10];
            random.copy_from_slice(&Uuid::new_v4().as_bytes()[6..16]);
            dst.push(uuid::Builder::from_unix_timestamp_millis(at_ms as u64, &random).into_uuid());
            src.push(*seed);
            shift.push(created.timestamp_micros() - at_ms * 1_000);
        }
        let o = sqlx::query(CLONE_ORCHESTRATOR)
            .bind(&dst)
            .bind(&src)
            .bind(&shift)
            .execute(&mut oc);
        let p = sqlx::query(CLONE_PARTICIPANT)
            .bind(&dst)
            .bind(&src)
            .bind(&shift)
            .execute(&mut pc);
        let (o, _) = tokio::try_join!(o, p).context("cloning the prefill's sagas")?;
        written += o.rows_affected();
        if let Some(pb) = &bar {
            pb.set_position(written);
        } else if written as f64 >= next_line * planned as f64 {
            eprintln!(
                "prefill: {written} / {planned} events ({:.0}%) in {:.0} s",
                100.0 * written as f64 / planned.max(1) as f64,
                t_clone.elapsed().as_secs_f64()
            );
            while next_line * planned as f64 <= written as f64 {
                next_line += 0.1;
            }
        }
    }
    let clone_secs = t_clone.elapsed().as_secs_f64();
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    let _ = oc.close().await;
    let _ = pc.close().await;

    // Settle: visibility map, hint bits and statistics, then everything on disk.
    let t_vacuum = Instant::now();
    eprintln!("prefill: {written} events written; VACUUM ANALYZE and CHECKPOINT");
    let (mut oc, mut pc) = tokio::try_join!(
        PgConnection::connect(&orch.url),
        PgConnection::connect(&part.url)
    )?;
    tokio::try_join!(
        sqlx::raw_sql("VACUUM ANALYZE").execute(&mut oc),
        sqlx::raw_sql("VACUUM ANALYZE").execute(&mut pc)
    )
    .context("VACUUM ANALYZE after the prefill")?;
    let vacuum_secs = t_vacuum.elapsed().as_secs_f64();
    let t_checkpoint = Instant::now();
    if let Err(e) = sqlx::raw_sql("CHECKPOINT").execute(&mut oc).await {
        eprintln!("warning: CHECKPOINT after the prefill failed (not a superuser?): {e}");
    }
    let checkpoint_secs = t_checkpoint.elapsed().as_secs_f64();

    let mut tables = Vec::new();
    let mut db_bytes = [0i64; 2];
    for (i, (conn, database)) in [(&mut oc, "orchestrator"), (&mut pc, "participant")]
        .into_iter()
        .enumerate()
    {
        let rows: Vec<(String, i64, i64, i64)> =
            sqlx::query_as(SIZES).fetch_all(&mut *conn).await?;
        tables.extend(rows.into_iter().map(|(table, rows, t, ix)| TableSize {
            database,
            table,
            rows,
            table_bytes: t,
            index_bytes: ix,
        }));
        (db_bytes[i],) = sqlx::query_as("SELECT pg_database_size(current_database())")
            .fetch_one(&mut *conn)
            .await?;
    }
    let _ = oc.close().await;
    let _ = pc.close().await;

    // Every id the run creates is a UUIDv7 of a later millisecond than this one.
    let now_ms = Utc::now().timestamp_millis() as u64;
    let boundary = uuid::Builder::from_unix_timestamp_millis(now_ms, &[0; 10]).into_uuid();
    Ok(Prefilled {
        report: PrefillReport {
            requested_events: args.prefill_events,
            events: written,
            instances: SEEDS + plan.len() as u64,
            seeds: SEEDS,
            seed_secs,
            clone_secs,
            vacuum_secs,
            checkpoint_secs,
            total_secs: t0.elapsed().as_secs_f64(),
            orchestrator_db_bytes: db_bytes[0],
            participant_db_bytes: db_bytes[1],
            tables,
        },
        boundary,
    })
}

/// Copies the seeds' rows of each `(copy, table, id column)` into a temporary table.
async fn copy_seeds(
    conn: &mut PgConnection,
    seeds: &[Uuid],
    tables: &[(&str, &str, &str)],
) -> Result<()> {
    for (copy, table, key) in tables {
        let create = format!("CREATE TEMP TABLE {copy} (LIKE {table})");
        sqlx::query(sqlx::AssertSqlSafe(create))
            .execute(&mut *conn)
            .await?;
        let insert = format!("INSERT INTO {copy} SELECT * FROM {table} WHERE {key} = ANY($1)");
        sqlx::query(sqlx::AssertSqlSafe(insert))
            .bind(seeds)
            .execute(&mut *conn)
            .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE {copy}")))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

fn progress_bar(args: &Args, len: u64) -> Option<ProgressBar> {
    if !args.progress {
        return None;
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} events, eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_prefix("prefill");
    Some(pb)
}
