//! `sagactl reconcile` and the HTTP commands of `sagactl`: logs with planted defects produce
//! each kind of finding, a clean run of the bank produces none, the participant cross-check
//! finds a barrier that disagrees with the log, real runs with injected faults are reported
//! where they happened, and the report's outputs are snapshotted.

use std::collections::BTreeSet;
use std::process::Output;
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, TimeZone, Utc};
use sagas::orchestrator::cli::output;
use sagas::orchestrator::machine::{
    self, Event, Input, Instance, Status, StepStatus, Timer, TimerKind,
};
use sagas::orchestrator::reconcile::{self, FindingKind, Options, ParticipantDb, Report};
use sagas::orchestrator::{Definition, RetryPolicy};
use sagas::participant::{Operation, Outcome, Reply};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::types::Json;
use uuid::Uuid;

use crate::examples::bank;
use crate::helpers::{self, TestEnv, run_sagactl, spawn_app, spawn_participant};

type Time = DateTime<Utc>;

/// The fixed "now" of every hand-crafted report.
fn now() -> Time {
    Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap()
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x0194_0000_0000_7000_8000_0000_0000_0000 | n)
}

fn secs(s: i64) -> chrono::Duration {
    chrono::Duration::seconds(s)
}

#[derive(serde::Deserialize)]
struct Anything {}

/// `order` (saga): reserve@inventory then charge@payments; compensations get 2 attempts.
fn order() -> Definition {
    let finish = RetryPolicy::exponential(2, Duration::from_secs(1), Duration::from_secs(1));
    Definition::saga::<Anything>("order", 1)
        .step("reserve", "inventory", |s| {
            s.command(|_, _| json!({"sku": "A-1", "qty": 2}))
                .timeout(Duration::from_secs(5))
                .finish_retry(finish)
        })
        .step("charge", "payments", |s| {
            s.command(|_, _| json!({"card": "4242", "amount": 1_000}))
                .timeout(Duration::from_secs(5))
                .finish_retry(finish)
        })
        .build()
        .unwrap()
}

/// `transfer` (TCC): debit and credit, both on `inventory` (one barrier table in the tests).
fn transfer() -> Definition {
    Definition::tcc::<Anything>("transfer", 1)
        .step("debit", "inventory", |s| {
            s.command(|_, _| json!({"account": "a", "amount": 5}))
        })
        .step("credit", "inventory", |s| {
            s.command(|_, _| json!({"account": "b", "amount": 5}))
        })
        .build()
        .unwrap()
}

/// `slow` (saga): one step with a one-day timeout.
fn slow() -> Definition {
    Definition::saga::<Anything>("slow", 1)
        .step("ship", "shipping", |s| {
            s.command(|_, _| json!({"parcel": 1}))
                .timeout(Duration::from_secs(86_400))
        })
        .build()
        .unwrap()
}

/// An instance driven through the real state machine, with the time of every event.
struct Run {
    def: Definition,
    inst: Instance,
    log: Vec<(Event, Time)>,
    created: Time,
    updated: Time,
}

impl Run {
    fn start(def: Definition, n: u128, at: Time) -> Run {
        let t = machine::start(id(n), (**def.plan()).clone(), json!({}), at, &def);
        Run {
            inst: t.instance,
            log: t.events.into_iter().map(|e| (e, at)).collect(),
            def,
            created: at,
            updated: at,
        }
    }

    fn feed(&mut self, input: Input, at: Time) -> &mut Run {
        let t = machine::handle(&self.inst, input, at, &self.def).expect("input fits");
        self.log.extend(t.events.into_iter().map(|e| (e, at)));
        self.inst = t.instance;
        self.updated = at;
        self
    }

    fn reply(
        &mut self,
        step: &str,
        op: Operation,
        attempt: u32,
        outcome: Outcome,
        at: Time,
    ) -> &mut Run {
        let reply = Reply {
            protocol: 1,
            transaction_id: self.inst.id,
            step: step.to_owned(),
            operation: op,
            attempt,
            outcome,
        };
        self.feed(Input::Reply(reply), at)
    }

    fn ok(&mut self, step: &str, op: Operation, at: Time) -> &mut Run {
        self.reply(step, op, 1, Outcome::succeeded(json!({"ok": true})), at)
    }

    fn timer(
        &mut self,
        step: usize,
        kind: TimerKind,
        op: Operation,
        attempt: u32,
        at: Time,
    ) -> &mut Run {
        let timer = Timer {
            step,
            kind,
            operation: op,
            attempt,
        };
        self.feed(Input::Timer(timer), at)
    }

    /// Appends an event the machine would not have emitted (a corrupt log).
    fn append(&mut self, event: Event, at: Time) -> &mut Run {
        machine::apply(&mut self.inst, &event);
        self.log.push((event, at));
        self.updated = at;
        self
    }

    async fn insert(&self, pool: &PgPool) -> Result<()> {
        self.insert_as(
            pool,
            &self.inst,
            &(1..=self.log.len() as i64).collect::<Vec<_>>(),
        )
        .await
    }

    /// Stores `projection` as the instance's state and the events numbered `seqs`.
    async fn insert_as(&self, pool: &PgPool, projection: &Instance, seqs: &[i64]) -> Result<()> {
        sqlx::query(
            "INSERT INTO sagas_instances
               (id, definition, version, mode, status, seq, state, failure, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(projection.id)
        .bind(&projection.plan.name)
        .bind(projection.plan.version as i32)
        .bind(projection.plan.mode.as_str())
        .bind(projection.status.as_str())
        .bind(projection.seq as i64)
        .bind(Json(projection))
        .bind(&projection.failure)
        .bind(self.created)
        .bind(self.updated)
        .execute(pool)
        .await?;
        insert_events(
            pool,
            self.inst.id,
            self.log.iter().zip(seqs).map(|((e, at), s)| (*s, e, *at)),
        )
        .await
    }
}

async fn insert_events<'a>(
    pool: &PgPool,
    instance: Uuid,
    events: impl Iterator<Item = (i64, &'a Event, Time)>,
) -> Result<()> {
    for (seq, event, at) in events {
        sqlx::query(
            "INSERT INTO sagas_events (instance_id, seq, kind, step, operation, attempt, body, at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(instance)
        .bind(seq)
        .bind(event.kind())
        .bind(event.step().map(|s| s as i32))
        .bind(event.operation().map(|o| o.as_str()))
        .bind(event.attempt().map(|a| a as i32))
        .bind(Json(event))
        .bind(at)
        .execute(pool)
        .await?;
    }
    Ok(())
}

use Operation::{Action, Cancel, Compensate, Confirm, Try};

fn t(offset_secs: i64) -> Time {
    now() + secs(offset_secs)
}

/// Plants one instance per kind of defect (and a few clean ones) in the orchestrator database.
async fn plant_defects(pool: &PgPool) -> Result<()> {
    let day = -86_400;
    // 1. Clean: a completed order and a compensated one.
    Run::start(order(), 1, t(day))
        .ok("reserve", Action, t(day + 1))
        .ok("charge", Action, t(day + 2))
        .insert(pool)
        .await?;
    Run::start(order(), 2, t(day))
        .reply(
            "reserve",
            Action,
            1,
            Outcome::failed("out of stock"),
            t(day + 1),
        )
        .insert(pool)
        .await?;
    // 2. The projection says charge is still running; the log says it succeeded.
    let mut r = Run::start(order(), 3, t(day));
    r.ok("reserve", Action, t(day + 1))
        .ok("charge", Action, t(day + 2));
    let mut projection = r.inst.clone();
    projection.steps[1].status = StepStatus::Running;
    r.insert_as(
        pool,
        &projection,
        &(1..=r.log.len() as i64).collect::<Vec<_>>(),
    )
    .await?;
    // 3. A gap in the log: event 3 is missing.
    let mut r = Run::start(order(), 4, t(day));
    r.ok("reserve", Action, t(day + 1))
        .ok("charge", Action, t(day + 2));
    let seqs: Vec<i64> = (1..=r.log.len() as i64)
        .map(|s| if s >= 3 { s + 1 } else { s })
        .collect();
    r.insert_as(pool, &r.inst, &seqs).await?;
    // 4. Stale: waiting (within its one-day timeout) for three hours.
    Run::start(slow(), 5, t(-3 * 3_600)).insert(pool).await?;
    // 5. Stuck: the compensation of reserve was refused.
    Run::start(order(), 6, t(-300))
        .ok("reserve", Action, t(-299))
        .reply(
            "charge",
            Action,
            1,
            Outcome::failed("card declined"),
            t(-298),
        )
        .reply(
            "reserve",
            Compensate,
            1,
            Outcome::failed("warehouse closed"),
            t(-297),
        )
        .insert(pool)
        .await?;
    // 6. Budget exhausted: the compensation of reserve timed out twice.
    Run::start(order(), 7, t(-300))
        .ok("reserve", Action, t(-299))
        .reply(
            "charge",
            Action,
            1,
            Outcome::failed("card declined"),
            t(-298),
        )
        .timer(0, TimerKind::Deadline, Compensate, 1, t(-290))
        .timer(0, TimerKind::Backoff, Compensate, 2, t(-289))
        .timer(0, TimerKind::Deadline, Compensate, 2, t(-280))
        .insert(pool)
        .await?;
    // 7. A reply deadline passed ten minutes ago and no timeout was logged; its command is
    //    still in the outbox.
    let r = Run::start(order(), 8, t(-600));
    r.insert(pool).await?;
    let cmd = json!({"transaction_id": r.inst.id, "step": "reserve", "operation": "action", "attempt": 1});
    sqlx::query(
        "INSERT INTO sagas_outbox (instance_id, participant, message_id, body, created_at, available_at)
         VALUES ($1, 'inventory', $2, $3, $4, $4)",
    )
    .bind(r.inst.id)
    .bind(format!("{}:reserve:action:1", r.inst.id))
    .bind(&cmd)
    .bind(t(-600))
    .execute(pool)
    .await?;
    // 8. A retry was due nine minutes ago and was not sent.
    Run::start(order(), 9, t(-600))
        .timer(0, TimerKind::Deadline, Action, 1, t(-595))
        .insert(pool)
        .await?;
    // 9. Replies to an attempt never sent and to a step the plan does not have (and a plain
    //    duplicate, which is fine).
    Run::start(transfer(), 10, t(day))
        .ok("debit", Try, t(day + 1))
        .ok("credit", Try, t(day + 1))
        .ok("debit", Try, t(day + 2))
        .ok("debit", Confirm, t(day + 3))
        .ok("credit", Confirm, t(day + 3))
        .reply("debit", Try, 7, Outcome::succeeded(json!({})), t(day + 4))
        .reply(
            "refund",
            Cancel,
            1,
            Outcome::succeeded(json!({})),
            t(day + 5),
        )
        .insert(pool)
        .await?;
    // 10. Finished `compensated` although reserve succeeded and was never compensated.
    Run::start(order(), 11, t(day))
        .ok("reserve", Action, t(day + 1))
        .append(
            Event::UndoStarted {
                reason: "operator typo".into(),
            },
            t(day + 2),
        )
        .append(
            Event::Finished {
                status: Status::Compensated,
            },
            t(day + 2),
        )
        .insert(pool)
        .await?;
    // 11. Events of an instance that has no projection row.
    let orphan = Run::start(order(), 12, t(day));
    insert_events(
        pool,
        orphan.inst.id,
        orphan
            .log
            .iter()
            .enumerate()
            .map(|(i, (e, at))| (i as i64 + 1, e, *at)),
    )
    .await?;
    Ok(())
}

fn found(report: &Report) -> BTreeSet<(FindingKind, u128, Option<String>)> {
    report
        .findings
        .iter()
        .map(|f| {
            (
                f.kind,
                f.instance.map_or(0, |i| i.as_u128() & 0xffff),
                f.step.clone(),
            )
        })
        .collect()
}

fn step(s: &str) -> Option<String> {
    Some(s.to_owned())
}

#[tokio::test]
async fn hand_crafted_defective_logs_produce_each_kind_of_finding_at_the_right_instance_and_step()
-> Result<()> {
    let env = TestEnv::new().await?;
    plant_defects(&env.orch).await?;
    let report = reconcile::run(&env.orch, &Options::new(now()), |_| {}).await?;
    use FindingKind as K;
    let expected: BTreeSet<_> = [
        (K::ProjectionMismatch, 3, None),
        (K::LogCorrupt, 4, None),
        (K::Stale, 5, None),
        (K::Stuck, 6, step("reserve")),
        (K::BudgetExhausted, 7, step("reserve")),
        (K::ReplyOverdue, 8, step("reserve")),
        (K::OutboxUnpublished, 8, step("reserve")),
        (K::RetryOverdue, 9, step("reserve")),
        (K::UnmatchedReply, 10, step("debit")),
        (K::UnmatchedReply, 10, step("refund")),
        (K::UnresolvedStep, 11, step("reserve")),
        (K::UnresolvedStep, 11, step("charge")),
        (K::LogCorrupt, 12, None),
    ]
    .into_iter()
    .collect();
    assert_eq!(found(&report), expected, "{report:#?}");
    assert_eq!(report.summary.instances, 11);
    assert_eq!(report.summary.by_status()["stuck"], 2);
    assert!(report.findings.iter().any(|f| {
        f.kind == K::ProjectionMismatch
            && f.detail
                .contains("step charge is succeeded in the log, running in the projection")
    }));
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_window_and_a_definition_filter_narrow_the_scan_but_keep_older_open_instances()
-> Result<()> {
    let env = TestEnv::new().await?;
    plant_defects(&env.orch).await?;
    let mut options = Options::new(now());
    options.since = Some(t(-3_600));
    let report = reconcile::run(&env.orch, &options, |_| {}).await?;
    // Instances 6-9 were created in the last hour; 5 is older but still open; the orphan
    // events (12) are older than the window.
    let ids: BTreeSet<u128> = found(&report).into_iter().map(|(_, i, _)| i).collect();
    assert_eq!(ids, [5, 6, 7, 8, 9].into_iter().collect(), "{report:#?}");
    options.since = None;
    options.definition = Some("transfer".into());
    let report = reconcile::run(&env.orch, &options, |_| {}).await?;
    assert_eq!(report.summary.instances, 1);
    assert!(
        report
            .findings
            .iter()
            .all(|f| f.kind == FindingKind::UnmatchedReply)
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn the_report_table_json_and_csv_match_their_snapshots() -> Result<()> {
    let env = TestEnv::new().await?;
    plant_defects(&env.orch).await?;
    let mut options = Options::new(now());
    options.batch_size = 3; // several batches, same report
    let report = reconcile::run(&env.orch, &options, |_| {}).await?;
    insta::assert_snapshot!("report_table", output::report_table(&report));
    insta::assert_snapshot!("report_json", output::report_json(&report));
    insta::assert_snapshot!("report_csv", output::report_csv(&report));
    env.cleanup().await;
    Ok(())
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

#[tokio::test]
async fn sagactl_reconcile_exits_1_with_findings_and_2_with_the_reason_when_it_cannot_run()
-> Result<()> {
    let env = TestEnv::new().await?;
    plant_defects(&env.orch).await?;
    let out = run_sagactl(&[
        "reconcile",
        "--database-url",
        &env.orch_url,
        "--now",
        "2026-01-01T12:00:00Z",
    ])?;
    assert_eq!(code(&out), 1, "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout)?;
    assert_eq!(
        stdout,
        output::report_table(&reconcile::run(&env.orch, &Options::new(now()), |_| {}).await?)
    );
    assert!(out.stderr.is_empty(), "no progress bar on a pipe");
    let out = run_sagactl(&[
        "reconcile",
        "--database-url",
        "postgres://nobody@127.0.0.1:1/none",
    ])?;
    assert_eq!(code(&out), 2);
    assert!(String::from_utf8(out.stderr)?.contains("connecting to the orchestrator database"));
    let out = run_sagactl(&[
        "reconcile",
        "--database-url",
        &env.orch_url,
        "--since",
        "yesterday",
    ])?;
    assert_eq!(code(&out), 2, "clap refuses bad arguments with 2");
    env.cleanup().await;
    Ok(())
}

/// Inserts a barrier row with a fixed time.
async fn barrier(
    pool: &PgPool,
    tx: Uuid,
    step: &str,
    op: &str,
    origin: &str,
    reply: Value,
    at: Time,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO sagas_barrier (transaction_id, step, operation, origin, reply, created_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(tx)
    .bind(step)
    .bind(op)
    .bind(origin)
    .bind(reply)
    .bind(at)
    .execute(pool)
    .await?;
    Ok(())
}

#[tokio::test]
async fn the_participant_cross_check_finds_barriers_that_disagree_with_the_log() -> Result<()> {
    let env = TestEnv::new().await?;
    sagas::participant::barrier::install(&env.bank).await?;
    let (orch, part) = (&env.orch, &env.bank);
    let ok = json!({"status": "succeeded", "output": {}});
    let failed = json!({"status": "failed", "reason": "no"});
    let at = now() - secs(86_400);
    // Completed order, reserve applied at the participant: consistent.
    let r = Run::start(order(), 21, at);
    let mut r = r;
    r.ok("reserve", Action, at)
        .ok("charge", Action, at)
        .insert(orch)
        .await?;
    barrier(part, id(21), "reserve", "action", "handler", ok.clone(), at).await?;
    // Compensated order: the log compensated reserve, the participant has no compensation.
    let mut r = Run::start(order(), 22, at);
    r.ok("reserve", Action, at)
        .reply("charge", Action, 1, Outcome::failed("declined"), at)
        .ok("reserve", Compensate, at)
        .insert(orch)
        .await?;
    barrier(part, id(22), "reserve", "action", "handler", ok.clone(), at).await?;
    // Cancelled transfer: the participant confirmed credit anyway.
    let mut r = Run::start(transfer(), 23, at);
    r.reply("debit", Try, 1, Outcome::failed("insufficient funds"), at)
        .ok("credit", Try, at)
        .ok("credit", Cancel, at)
        .insert(orch)
        .await?;
    assert_eq!(r.inst.status, Status::Compensated);
    barrier(part, id(23), "debit", "try", "handler", failed.clone(), at).await?;
    barrier(part, id(23), "credit", "try", "handler", ok.clone(), at).await?;
    barrier(part, id(23), "credit", "cancel", "handler", ok.clone(), at).await?;
    barrier(part, id(23), "credit", "confirm", "handler", ok.clone(), at).await?;
    // Compensated order where reserve failed: the participant ran a compensate never sent.
    let mut r = Run::start(order(), 24, at);
    r.reply("reserve", Action, 1, Outcome::failed("out of stock"), at)
        .insert(orch)
        .await?;
    barrier(
        part,
        id(24),
        "reserve",
        "action",
        "handler",
        failed.clone(),
        at,
    )
    .await?;
    barrier(
        part,
        id(24),
        "reserve",
        "compensate",
        "handler",
        ok.clone(),
        at,
    )
    .await?;
    // A try for a transaction the orchestrator has no record of.
    barrier(part, id(25), "debit", "try", "handler", ok.clone(), at).await?;

    let mut options = Options::new(now());
    options.participants.push(ParticipantDb {
        name: "inventory".into(),
        pool: part.clone(),
    });
    let report = reconcile::run(orch, &options, |_| {}).await?;
    let kinds: BTreeSet<_> = report.findings.iter().map(|f| f.kind).collect();
    assert_eq!(
        kinds,
        [FindingKind::BarrierMismatch].into_iter().collect(),
        "{report:#?}"
    );
    let details: Vec<(u128, String)> = report
        .findings
        .iter()
        .map(|f| (f.instance.unwrap().as_u128() & 0xffff, f.detail.clone()))
        .collect();
    assert_eq!(details.len(), 4, "{details:#?}");
    let has = |n: u128, text: &str| details.iter().any(|(i, d)| *i == n && d.contains(text));
    assert!(
        has(22, "applied action and has no compensate"),
        "{details:#?}"
    );
    assert!(
        has(
            23,
            "confirmed a try of a transaction the orchestrator cancelled"
        ),
        "{details:#?}"
    );
    assert!(
        has(
            24,
            "recorded compensate (handler, succeeded) that the orchestrator never dispatched"
        ),
        "{details:#?}"
    );
    assert!(has(25, "no record of"), "{details:#?}");
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_run_of_bank_transfers_reports_no_findings_and_sagactl_exits_0() -> Result<()> {
    let env = TestEnv::new().await?;
    bank::seed(&env.bank, 3, 1_000).await?;
    let app = spawn_app(&env, bank::registry()?).await?;
    let accounts = spawn_participant(
        &env,
        bank::PARTICIPANT,
        bank::shared_handler(Default::default()),
    )
    .await?;
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for (definition, amount) in [
        ("transfer_tcc", 100),
        ("transfer_saga", 50),
        ("transfer_tcc", 5_000),  // insufficient funds: cancelled
        ("transfer_saga", 5_000), // insufficient funds: compensated
        ("transfer_tcc", 25),
        ("transfer_saga", 10),
    ] {
        let res = http
            .post(app.url(&format!("/v1/sagas/{definition}")))
            .json(&json!({"input": {"from": "acct-1", "to": "acct-2", "amount": amount}}))
            .send()
            .await?;
        anyhow::ensure!(res.status() == 202, "start answered {}", res.status());
        let body: Value = res.json().await?;
        ids.push(body["id"].as_str().unwrap().parse::<Uuid>()?);
    }
    let mut statuses = BTreeSet::new();
    for id in &ids {
        statuses.insert(env.wait_terminal(*id).await?.status.as_str());
    }
    assert_eq!(statuses, ["completed", "compensated"].into_iter().collect());

    let mut options = Options::new(Utc::now());
    options.participants.push(ParticipantDb {
        name: bank::PARTICIPANT.into(),
        pool: env.bank.clone(),
    });
    let report = reconcile::run(&env.orch, &options, |_| {}).await?;
    assert!(report.is_consistent(), "{report:#?}");
    assert_eq!(report.summary.instances, 6);
    assert!(report.summary.events > 30);

    let doc = crate::helpers::reconcile_bank(&env)?;
    assert_eq!(doc["consistent"], true);
    assert_eq!(doc["summary"]["instances"], 6);
    let out = run_sagactl(&[
        "reconcile",
        "--database-url",
        &env.orch_url,
        "--format",
        "csv",
    ])?;
    assert_eq!(code(&out), 0);
    assert_eq!(
        String::from_utf8(out.stdout)?,
        "kind,instance,definition,step,detail\n"
    );

    accounts.stop().await;
    app.stop().await;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_commands_list_show_abort_and_definitions_go_through_the_api() -> Result<()> {
    let env = TestEnv::new().await?;
    bank::seed(&env.bank, 2, 1_000).await?;
    // No participant runs: the transfer stays in its forward phase, so it can be aborted.
    let app = spawn_app(&env, bank::registry()?).await?;
    let http = reqwest::Client::new();
    let res: Value = http
        .post(app.url("/v1/sagas/transfer_tcc"))
        .json(&json!({"input": {"from": "acct-1", "to": "acct-2", "amount": 10}}))
        .send()
        .await?
        .json()
        .await?;
    let id = res["id"].as_str().unwrap().to_owned();
    let url = app.url("");
    let api = ["--url", url.as_str()];
    let run = |args: &[&str]| run_sagactl(&[args, &api[..]].concat());

    let out = run(&["list", "--format", "json"])?;
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let page: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(page["items"][0]["id"], id.as_str());
    let out = run(&["list", "--status", "running"])?;
    assert!(String::from_utf8(out.stdout)?.contains(&id));
    let out = run(&["list", "--status", "bogus"])?;
    assert_eq!(code(&out), 1, "a refused request exits 1");
    assert!(String::from_utf8(out.stderr)?.contains("status"));

    let out = run(&["definitions"])?;
    assert_eq!(code(&out), 0);
    let text = String::from_utf8(out.stdout)?;
    assert!(
        text.contains("transfer_tcc") && text.contains("debit@accounts -> credit@accounts"),
        "{text}"
    );

    let out = run(&[
        "abort",
        &id,
        "--reason",
        "customer withdrew",
        "--actor",
        "alice",
    ])?;
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8(out.stdout)?.contains("is now compensating"));
    let out = run(&["abort", &id, "--reason", "again"])?;
    assert_eq!(code(&out), 1, "the server refuses a second abort (409)");

    let out = run(&["show", &id])?;
    assert_eq!(code(&out), 0);
    let text = String::from_utf8(out.stdout)?;
    assert!(
        text.contains("operator_action") && text.contains("abort by alice: customer withdrew"),
        "{text}"
    );

    // `resolve` exists in sagactl before the server has it; either way it must not exit 0 here.
    let out = run(&["resolve", &id, "--reason", "fixed by hand"])?;
    assert_ne!(code(&out), 0);
    assert!(!out.stderr.is_empty());

    let out = run_sagactl(&["list", "--url", "http://127.0.0.1:1"])?;
    assert_eq!(code(&out), 2, "an unreachable server exits 2");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("SAGAS_BIND"),
        "the error says where sagactl looks: {stderr}"
    );

    // Without --url or SAGAS_URL, sagactl goes where sagad listens with the same environment.
    let bind = app.addr.to_string();
    let out = std::process::Command::new(helpers::built_binary("sagactl")?)
        .args(["show", &id])
        .env_remove("SAGAS_URL")
        .env_remove("SAGAS_TOKEN")
        .env("SAGAS_BIND", &bind)
        .output()?;
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));

    app.stop().await;
    env.cleanup().await;
    Ok(())
}

#[test]
fn sagactl_prints_help_with_examples_and_shell_completions() -> Result<()> {
    for cmd in [
        "reconcile",
        "list",
        "show",
        "retry",
        "abort",
        "resolve",
        "definitions",
        "migrate",
        "completions",
    ] {
        let out = run_sagactl(&[cmd, "--help"])?;
        assert_eq!(code(&out), 0);
        assert!(
            String::from_utf8(out.stdout)?.contains("Example"),
            "{cmd} --help has an example"
        );
    }
    let out = run_sagactl(&["completions", "bash"])?;
    assert_eq!(code(&out), 0);
    assert!(String::from_utf8(out.stdout)?.contains("_sagactl"));
    Ok(())
}

/// Holds and denies on demand; its compensation is always refused.
struct Fragile {
    deny: bool,
}

#[async_trait::async_trait]
impl sagas::participant::SagaHandler for Fragile {
    async fn action(
        &self,
        _: &sagas::participant::Command,
        _: &mut sqlx::PgConnection,
    ) -> Result<Value, sagas::participant::HandlerError> {
        if self.deny {
            return Err(sagas::participant::HandlerError::business("denied"));
        }
        Ok(json!({"held": true}))
    }
    async fn compensate(
        &self,
        _: &sagas::participant::Command,
        _: &mut sqlx::PgConnection,
    ) -> Result<Value, sagas::participant::HandlerError> {
        Err(sagas::participant::HandlerError::business(
            "the hold cannot be released",
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_runs_with_injected_faults_are_reported_where_they_happened() -> Result<()> {
    let env = TestEnv::new().await?;
    bank::seed(&env.bank, 2, 1_000).await?;
    let fragile = Definition::saga::<Value>("fragile", 1)
        .step("hold", "fragile", |s| s.command(|_, _| json!({})))
        .step("deny", "fragile", |s| s.command(|_, _| json!({})))
        .build()?;
    let mut registry = bank::registry()?;
    registry.register(fragile)?;
    let app = spawn_app(&env, registry).await?;
    let handler = sagas::participant::Router::new()
        .route("hold", sagas::participant::Saga(Fragile { deny: false }))
        .route("deny", sagas::participant::Saga(Fragile { deny: true }));
    let fragile_runtime = spawn_participant(&env, "fragile", std::sync::Arc::new(handler)).await?;

    // Fault 1: a compensation that the participant refuses. The second step is denied, and
    // undoing the first one fails, so the instance is stuck.
    let stuck = app.engine.start("fragile", json!({})).await?.id;
    helpers::wait_status(&env, stuck, Status::Stuck).await?;

    // Fault 2: the accounts participant is down and the orchestrator stops too, so the
    // debit's reply deadline passes with nothing logged.
    let silent = app.engine.start(
        "transfer_saga",
        json!({"from": "acct-1", "to": "acct-2", "amount": 5}),
    );
    let silent = silent.await?.id;
    fragile_runtime.stop().await;
    app.stop().await;

    let mut options = Options::new(Utc::now() + chrono::Duration::minutes(5));
    options.stale_after = chrono::Duration::hours(1);
    let report = reconcile::run(&env.orch, &options, |_| {}).await?;
    let kinds: BTreeSet<(FindingKind, Uuid)> = report
        .findings
        .iter()
        .filter_map(|f| Some((f.kind, f.instance?)))
        .collect();
    assert!(kinds.contains(&(FindingKind::Stuck, stuck)), "{report:#?}");
    assert!(
        kinds.contains(&(FindingKind::ReplyOverdue, silent)),
        "{report:#?}"
    );
    assert!(
        !report.findings.iter().any(|f| matches!(
            f.kind,
            FindingKind::ProjectionMismatch | FindingKind::LogCorrupt
        )),
        "{report:#?}"
    );
    assert!(!report.is_consistent());
    env.cleanup().await;
    Ok(())
}

/// Reconciles the orchestrator and the accounts participant of `env`.
pub(crate) async fn reconcile_with_accounts(env: &TestEnv) -> Result<Report> {
    let mut options = Options::new(Utc::now());
    options.participants.push(ParticipantDb {
        name: bank::PARTICIPANT.into(),
        pool: env.bank.clone(),
    });
    Ok(reconcile::run(&env.orch, &options, |_| {}).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_retention_deleted_on_either_side_is_not_reported_and_what_it_could_not_have_is()
-> Result<()> {
    use sagas::orchestrator::store::{Pruned, SagaStore};

    let env = TestEnv::new().await?;
    bank::seed(&env.bank, 3, 1_000).await?;
    let app = spawn_app(&env, bank::registry()?).await?;
    let accounts = spawn_participant(
        &env,
        bank::PARTICIPANT,
        bank::shared_handler(Default::default()),
    )
    .await?;
    let mut ids = Vec::new();
    for (definition, amount) in [
        ("transfer_tcc", 100),
        ("transfer_saga", 50),
        ("transfer_tcc", 5_000),
        ("transfer_saga", 5_000),
        ("transfer_tcc", 25),
        ("transfer_saga", 10),
    ] {
        let input = json!({"from": "acct-1", "to": "acct-2", "amount": amount});
        ids.push(app.engine.start(definition, input).await?.id);
    }
    for id in &ids {
        env.wait_terminal(*id).await?;
    }
    accounts.stop().await;
    app.stop().await;
    // Barrier rows become evidence of unknown transactions once older than a minute.
    sqlx::query("UPDATE sagas_barrier SET created_at = created_at - interval '1 hour'")
        .execute(&env.bank)
        .await?;

    // The orchestrator prunes three: their barrier rows stay, and are not orphans.
    let store = env.store();
    let horizon = Utc::now();
    assert_eq!(store.prune(horizon, 3).await?, Pruned::Deleted(3));
    let report = reconcile_with_accounts(&env).await?;
    assert!(report.is_consistent(), "{report:#?}");
    assert_eq!(report.summary.instances, 3);

    // A transaction created after the horizon cannot have been pruned: its rows are reported.
    let stray = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO sagas_barrier (transaction_id, step, operation, origin, created_at)
         VALUES ($1, 'debit', 'try', 'handler', now() - interval '1 hour')",
    )
    .bind(stray)
    .execute(&env.bank)
    .await?;
    let report = reconcile_with_accounts(&env).await?;
    let found: Vec<Option<Uuid>> = report.findings.iter().map(|f| f.instance).collect();
    assert_eq!(found, [Some(stray)], "{report:#?}");
    sqlx::query("DELETE FROM sagas_barrier WHERE transaction_id = $1")
        .bind(stray)
        .execute(&env.bank)
        .await?;

    // The participant cleans up everything: the instances it served before its horizon are not
    // compared with rows it no longer has ...
    let deleted = sagas::participant::barrier::cleanup(&env.bank, chrono::Duration::zero()).await?;
    assert!(deleted > 0);
    let report = reconcile_with_accounts(&env).await?;
    assert!(report.is_consistent(), "{report:#?}");
    // ... and without its horizon they would be.
    sqlx::query("DELETE FROM sagas_barrier_retention")
        .execute(&env.bank)
        .await?;
    let report = reconcile_with_accounts(&env).await?;
    assert!(
        report
            .findings
            .iter()
            .any(|f| f.kind == FindingKind::BarrierMismatch),
        "{report:#?}"
    );
    env.cleanup().await;
    Ok(())
}
