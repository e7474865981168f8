//! The benchmark's definitions and participants.
//!
//! Every step is served by its own participant (`s1`..`sK` for sagas, `t1`..`tK` for TCC),
//! each with its own AMQP connection and database pool, as separate services would be; they
//! share one participant database. Every handler runs inside the barrier's transaction and
//! makes one real write to `bench_effects`, a row per (saga, step) whose counters record how
//! many times each operation took effect, so the run can check exactly-once afterwards.

use std::time::Duration;

use async_trait::async_trait;
use sagas::orchestrator::{Definition, Registry};
use sagas::participant::{Command, Handler, HandlerError, Operation};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};

use crate::Workload;

/// The input of every benchmark definition.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchInput {
    /// The saga's index in the run.
    pub n: u64,
    /// Whether the last step fails (business failure).
    pub fail: bool,
}

/// The business table of every participant.
pub const SCHEMA: &str = "CREATE TABLE bench_effects (
    saga_id     uuid    NOT NULL,
    step        integer NOT NULL,
    applied     integer NOT NULL DEFAULT 0,
    compensated integer NOT NULL DEFAULT 0,
    confirmed   integer NOT NULL DEFAULT 0,
    cancelled   integer NOT NULL DEFAULT 0,
    PRIMARY KEY (saga_id, step)
)";

/// The participant names of a workload with `steps` steps.
pub fn names(workload: Workload, steps: usize) -> Vec<String> {
    let letter = if workload == Workload::Tcc { 't' } else { 's' };
    (1..=steps).map(|i| format!("{letter}{i}")).collect()
}

/// The definition's name.
pub fn definition_name(workload: Workload, steps: usize) -> String {
    match workload {
        Workload::Tcc => format!("bench_tcc_{steps}"),
        _ => format!("bench_saga_{steps}"),
    }
}

/// The registry with the workload's one definition (default retry policies and timeouts, as a
/// user would start with; `timeout` replaces the 10 s per-attempt timeout of every step).
pub fn registry(
    workload: Workload,
    steps: usize,
    timeout: Option<Duration>,
) -> anyhow::Result<Registry> {
    let name = definition_name(workload, steps);
    let mut builder = if workload == Workload::Tcc {
        Definition::tcc::<BenchInput>(name, 1)
    } else {
        Definition::saga::<BenchInput>(name, 1)
    };
    for (i, participant) in names(workload, steps).into_iter().enumerate() {
        let last = i + 1 == steps;
        builder = builder.step(participant.clone(), participant, move |s| {
            let s = s.command(
                move |input: &BenchInput, _| json!({ "step": i + 1, "fail": last && input.fail }),
            );
            match timeout {
                Some(t) => s.timeout(t),
                None => s,
            }
        });
    }
    Ok(Registry::new().with(builder.build()?)?)
}

/// A participant's handler: one write per operation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Effects;

#[derive(Deserialize)]
struct Payload {
    step: i32,
    fail: bool,
}

const APPLY: &str = "INSERT INTO bench_effects (saga_id, step, applied) VALUES ($1, $2, 1)
                     ON CONFLICT (saga_id, step) DO UPDATE SET applied = bench_effects.applied + 1";
const COMPENSATE: &str = "UPDATE bench_effects SET compensated = compensated + 1
                          WHERE saga_id = $1 AND step = $2";
const CONFIRM: &str = "UPDATE bench_effects SET confirmed = confirmed + 1
                       WHERE saga_id = $1 AND step = $2";
const CANCEL: &str = "UPDATE bench_effects SET cancelled = cancelled + 1
                      WHERE saga_id = $1 AND step = $2";

#[async_trait]
impl Handler for Effects {
    async fn handle(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        let p: Payload = serde_json::from_value(cmd.payload.clone())
            .map_err(|e| HandlerError::business(format!("bad payload: {e}")))?;
        let sql = match cmd.operation {
            Operation::Action | Operation::Try => APPLY,
            Operation::Compensate => COMPENSATE,
            Operation::Confirm => CONFIRM,
            Operation::Cancel => CANCEL,
        };
        sqlx::query(sql)
            .bind(cmd.transaction_id)
            .bind(p.step)
            .execute(&mut *tx)
            .await?;
        if p.fail && cmd.operation.is_forward() {
            // After the write, so that the barrier's savepoint rollback is exercised too:
            // the row must not exist afterwards.
            return Err(HandlerError::business("the benchmark fails this step"));
        }
        Ok(json!({ "ok": true }))
    }
}

/// Creates the participant schema: the business table and the barrier.
pub async fn install(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query(SCHEMA).execute(pool).await?;
    sagas::participant::barrier::install(pool).await?;
    Ok(())
}

/// The effect counters of one saga's step, as read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Row {
    pub applied: i32,
    pub compensated: i32,
    pub confirmed: i32,
    pub cancelled: i32,
}

/// What a correct run leaves for one saga's step (`None`: no row).
pub fn expected(workload: Workload, steps: usize, step: usize, fail: bool) -> Option<Row> {
    match workload {
        Workload::Tcc => Some(Row {
            applied: 1,
            confirmed: 1,
            ..Row::default()
        }),
        _ if fail && step == steps => None,
        _ if fail => Some(Row {
            applied: 1,
            compensated: 1,
            ..Row::default()
        }),
        _ => Some(Row {
            applied: 1,
            ..Row::default()
        }),
    }
}

/// The terminal status saga `n` of the workload must reach.
pub fn expected_status(workload: Workload, n: u64) -> &'static str {
    if fails(workload, n) {
        "compensated"
    } else {
        "completed"
    }
}

/// Whether saga `n` of the workload fails (every 5th saga of `compensate`).
pub fn fails(workload: Workload, n: u64) -> bool {
    workload == Workload::Compensate && n % 5 == 4
}
