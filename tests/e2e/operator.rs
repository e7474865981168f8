//! What an operator sees before and after fixing a stuck transaction by hand, on the bank
//! example: a transfer whose credit fails and whose refund fails too, because the source
//! account was renamed between the debit and the refund.

use std::time::Duration;

use anyhow::{Context, Result};
use sagas::orchestrator::Status;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::examples::bank;
use crate::helpers::{
    App, TestEnv, get, poll, run_sagactl, spawn_app, spawn_participant, wait_status,
};
use crate::reconcile::reconcile_with_accounts;

/// The source account of every transfer here, and its name while it is renamed.
const SOURCE: &str = "acct-1";
const RENAMED: &str = "acct-1-renamed";
const DESTINATION: &str = "acct-2";

/// An HTTP client whose every request is bounded.
fn client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// Starts a saga transfer from [`SOURCE`] whose credit fails (the destination is closed) and
/// whose refund fails (the source is renamed once the debit applied): it ends stuck. The
/// destination's row is held locked until then, so the credit waits for the rename. The
/// accounts are put back afterwards, for the next transfer.
async fn stuck_transfer(env: &TestEnv, app: &App, http: &reqwest::Client) -> Result<Uuid> {
    let mut hold = env.bank.begin().await?;
    sqlx::query("SELECT 1 FROM bank_accounts WHERE id = $1 FOR UPDATE")
        .bind(DESTINATION)
        .execute(&mut *hold)
        .await?;
    let res = http
        .post(app.url("/v1/sagas/transfer_saga"))
        .json(&json!({"input": {"from": SOURCE, "to": DESTINATION, "amount": 100}}))
        .send()
        .await?;
    anyhow::ensure!(res.status() == 202, "start answered {}", res.status());
    let id: Uuid = res.json::<Value>().await?["id"]
        .as_str()
        .context("an id")?
        .parse()?;

    // The debit applied and the credit is sent: its reply is awaited, so a fix by hand now
    // would race with it.
    let view = poll(http, app, &format!("/v1/sagas/{id}"), |v| {
        v["in_flight"]["awaiting_reply"]
            .as_array()
            .is_some_and(|a| a.iter().any(|a| a["step"] == "credit"))
    })
    .await?;
    assert_eq!(view["in_flight"]["quiet"], false, "{view:#}");
    let credit = &view["in_flight"]["awaiting_reply"][0];
    assert_eq!(
        (&credit["operation"], &credit["attempt"]),
        (&json!("action"), &json!(1))
    );
    assert!(
        view["in_flight"]["timers"].as_array().is_some_and(|t| t
            .iter()
            .any(|t| t["step"] == "credit" && t["kind"] == "deadline")),
        "{view:#}"
    );

    sqlx::query("UPDATE bank_accounts SET closed = true WHERE id = $1")
        .bind(DESTINATION)
        .execute(&mut *hold)
        .await?;
    sqlx::query("UPDATE bank_accounts SET id = $2 WHERE id = $1")
        .bind(SOURCE)
        .bind(RENAMED)
        .execute(&mut *hold)
        .await?;
    hold.commit().await?;
    wait_status(env, id, Status::Stuck).await?;
    sqlx::query("UPDATE bank_accounts SET closed = false WHERE id = $1")
        .bind(DESTINATION)
        .execute(&env.bank)
        .await?;
    sqlx::query("UPDATE bank_accounts SET id = $1 WHERE id = $2")
        .bind(SOURCE)
        .bind(RENAMED)
        .execute(&env.bank)
        .await?;
    Ok(id)
}

fn code(out: &std::process::Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

async fn resolve(http: &reqwest::Client, app: &App, id: Uuid) -> Result<Value> {
    let res = http
        .post(app.url(&format!("/v1/sagas/{id}/resolve")))
        .header("x-sagas-actor", "oncall")
        .json(&json!({"reason": "refund booked by hand on the renamed account"}))
        .send()
        .await?;
    anyhow::ensure!(res.status() == 200, "resolve answered {}", res.status());
    Ok(res.json().await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_transfer_shows_what_is_in_flight_what_the_bank_applied_and_its_steps_settled_by_hand()
-> Result<()> {
    let env = TestEnv::new().await?;
    bank::seed(&env.bank, 2, 1_000).await?;
    let app = spawn_app(&env, bank::registry()?).await?;
    let accounts = spawn_participant(
        &env,
        bank::PARTICIPANT,
        bank::shared_handler(Default::default()),
    )
    .await?;
    let http = client()?;
    let url = app.url("");
    let api = ["--url", url.as_str()];

    let first = stuck_transfer(&env, &app, &http).await?;
    // Once the refund is refused, nothing is sent any more: quiet (the outbox empties as the
    // broker confirms).
    let path = format!("/v1/sagas/{first}");
    let view = poll(&http, &app, &path, |v| v["in_flight"]["quiet"] == true).await?;
    let in_flight = &view["in_flight"];
    assert_eq!(in_flight["outbox_rows"], 0, "{in_flight:#}");
    assert_eq!(in_flight["timers"], json!([]), "{in_flight:#}");
    assert_eq!(in_flight["awaiting_reply"], json!([]), "{in_flight:#}");
    assert_eq!(view["steps"][0]["status"], "compensating");
    assert_eq!(view["steps"][0]["resolved_by_hand"], false);

    let out = run_sagactl(&[&["show", &first.to_string()], &api[..]].concat())?;
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    assert!(
        text.contains("nothing in flight: safe to fix by hand"),
        "{text}"
    );

    // What the bank applied, next to the log: the debit and not the refund; the credit was
    // refused.
    let participant = format!("{}={}", bank::PARTICIPANT, env.bank_url);
    let show = |format: &str| {
        let args = ["show", &first.to_string(), "--participant", &participant];
        run_sagactl(&[&args[..], &api[..], &["--format", format]].concat())
    };
    let out = show("json")?;
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout)?;
    let at_bank = &doc["participants"][bank::PARTICIPANT];
    assert_eq!(
        at_bank,
        &json!([
            {"step": "debit", "log": "compensating",
             "participant": {"action": "applied", "compensate": "not applied (no record)"}},
            {"step": "credit", "log": "failed",
             "participant": {"action": "not applied (answered failed)",
                             "compensate": "not applied (no record)"}},
        ]),
        "{doc:#}"
    );
    let out = show("table")?;
    let text = String::from_utf8(out.stdout)?;
    assert!(
        text.contains("At participant accounts") && text.contains("COMPENSATE"),
        "{text}"
    );

    // A second transfer stuck for the same cause joins the first one's group.
    let second = stuck_transfer(&env, &app, &http).await?;
    let groups = get(&http, &app, "/v1/stuck").await?;
    let groups = groups["groups"].as_array().context("groups")?;
    assert_eq!(groups.len(), 1, "{groups:#?}");
    let g = &groups[0];
    assert_eq!(
        (&g["definition"], &g["step"], &g["participant"], &g["count"]),
        (
            &json!("transfer_saga"),
            &json!("debit"),
            &json!("accounts"),
            &json!(2)
        )
    );
    assert_eq!(g["ids"], json!([first, second]), "oldest change first");
    let reason = g["reason"].as_str().context("a reason")?;
    assert!(reason.contains("acct-1: no such account"), "{reason}");
    let out = run_sagactl(&[&["stuck"], &api[..]].concat())?;
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    assert!(
        text.contains("COUNT") && text.contains(&first.to_string()),
        "{text}"
    );
    let res = http.get(app.url("/v1/stuck?junk=1")).send().await?;
    assert_eq!(res.status(), 400, "an unknown parameter is refused");

    // Resolved: the stuck step says it was settled by hand, the failed one does not.
    let view = resolve(&http, &app, first).await?;
    assert_eq!(view["status"], "resolved");
    let settled: Vec<(&Value, &Value)> = (view["steps"].as_array().into_iter().flatten())
        .map(|s| (&s["status"], &s["resolved_by_hand"]))
        .collect();
    assert_eq!(
        settled,
        vec![
            (&json!("compensating"), &json!(true)),
            (&json!("failed"), &json!(false))
        ]
    );
    let out = run_sagactl(&[&["show", &first.to_string()], &api[..]].concat())?;
    let text = String::from_utf8(out.stdout)?;
    assert!(text.contains("compensating, settled by hand"), "{text}");
    let groups = get(&http, &app, "/v1/stuck").await?;
    assert_eq!(groups["groups"][0]["count"], 1, "{groups:#}");
    resolve(&http, &app, second).await?;
    assert_eq!(get(&http, &app, "/v1/stuck").await?, json!({"groups": []}));

    // Steps settled by hand are no finding: the projections are the replays of the logs.
    let report =
        tokio::time::timeout(Duration::from_secs(60), reconcile_with_accounts(&env)).await??;
    assert!(report.is_consistent(), "{report:#?}");

    accounts.stop().await;
    app.stop().await;
    env.cleanup().await;
    Ok(())
}
