//! Wait steps over HTTP: a saga whose middle step waits for a signal, signalled (the signal's
//! data reaches the next step's command) or not (it compensates after the timeout), and the
//! answers to signals that do not fit.

use std::time::Duration;

use anyhow::{Context, Result};
use sagas::orchestrator::{Definition, Registry, RetryPolicy, Status};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{
    self, App, RawParticipant, TestEnv, poll, run_sagactl, spawn_app, wait_status,
};

const RAW: &str = "raw";

/// hold (raw) -> authorize (waits for `3ds` for `wait`) -> capture (raw, with the signal's
/// data).
fn payment(wait: Duration) -> Result<Registry> {
    let quick = RetryPolicy::exponential(3, Duration::from_millis(50), Duration::from_millis(100));
    let def = Definition::saga::<Value>("payment", 1)
        .step("hold", RAW, |s| {
            s.command(|_, _| json!({"amount": 10})).finish_retry(quick)
        })
        .wait("authorize", "3ds", |s| s.timeout(wait))
        .step("capture", RAW, |s| {
            s.command(|_, out| json!({"auth": out.get("authorize").cloned()}))
        })
        .build()?;
    Ok(Registry::new().with(def)?)
}

struct Setup {
    env: TestEnv,
    app: App,
    raw: RawParticipant,
    http: reqwest::Client,
}

impl Setup {
    async fn new(wait: Duration) -> Result<Setup> {
        let env = TestEnv::new().await?;
        let raw = RawParticipant::start(&env, RAW).await?;
        let app = spawn_app(&env, payment(wait)?).await?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Setup {
            env,
            app,
            raw,
            http,
        })
    }

    async fn start(&self) -> Result<Uuid> {
        let res = (self.http.post(self.app.url("/v1/sagas/payment")))
            .json(&json!({"input": {}}))
            .send()
            .await?;
        anyhow::ensure!(res.status() == 202, "start answered {}", res.status());
        Ok(res.json::<Value>().await?["id"]
            .as_str()
            .context("an id")?
            .parse()?)
    }

    /// `POST /v1/sagas/{id}/signals/{name}` with `body`: the status and the answer.
    async fn signal(&self, id: Uuid, name: &str, body: Value) -> Result<(u16, Value)> {
        let res = (self.http)
            .post(self.app.url(&format!("/v1/sagas/{id}/signals/{name}")))
            .json(&body)
            .send()
            .await?;
        Ok((res.status().as_u16(), res.json().await?))
    }

    /// The console's page of transaction `id`.
    async fn page(&self, id: Uuid) -> Result<String> {
        let url = self.app.url(&format!("/ui/transactions/{id}"));
        Ok(self.http.get(url).send().await?.text().await?)
    }

    async fn stop(self) {
        self.raw.close().await;
        self.app.stop().await;
        self.env.cleanup().await;
    }
}

fn message(answer: &Value) -> &str {
    answer["message"].as_str().unwrap_or_default()
}

// Two workers: the server answers while the test waits for sagactl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signalled_wait_completes_the_saga_with_the_signal_data_in_the_next_command() -> Result<()>
{
    let mut s = Setup::new(Duration::from_secs(600)).await?;
    let id = s.start().await?;
    let hold = s.raw.expect("hold", "action", 1).await?;

    // Before the wait begins, the signal has nothing to go to.
    let early = json!({"signal_id": "early", "data": {}});
    let (status, answer) = s.signal(id, "3ds", early).await?;
    assert_eq!(status, 409, "{answer}");
    assert!(
        message(&answer).contains("has not started waiting"),
        "{answer}"
    );

    let page = s.page(id).await?;
    assert!(page.contains("Not waiting yet."), "{page}");

    s.raw
        .reply(
            &hold,
            json!({"status": "succeeded", "output": {"hold": "h-1"}}),
        )
        .await?;
    let view = poll(&s.http, &s.app, &format!("/v1/sagas/{id}"), |v| {
        !v["steps"][1]["signal_deadline"].is_null()
    })
    .await?;
    assert_eq!(view["steps"][1]["signal"], "3ds");
    assert_eq!(view["steps"][1]["status"], "running");
    assert_eq!(view["steps"][1]["participant"], "");
    let page = s.page(id).await?;
    assert!(page.contains("waits for signal 3ds until"), "{page}");
    assert!(page.contains("without it, the step fails then"), "{page}");
    let url = s.app.url("");
    let show = run_sagactl(&["show", &id.to_string(), "--url", &url])?;
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(show.status.success(), "{text}");
    assert!(text.contains("signal 3ds"), "{text}");
    assert!(text.contains("running, waits until"), "{text}");
    assert!(
        text.contains("step authorize: the wait for its signal ends at"),
        "{text}"
    );

    // sagactl delivers it (the same path any client takes).
    let out = run_sagactl(&[
        "signal",
        &id.to_string(),
        "3ds",
        "--data",
        r#"{"code": "A1"}"#,
        "--id",
        "sig-1",
        "--url",
        &url,
    ])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("signal 3ds (sig-1)"), "{stdout}");

    let capture = s.raw.expect("capture", "action", 1).await?;
    assert_eq!(capture.body["payload"], json!({"auth": {"code": "A1"}}));

    // The same id and data again: 200 and nothing changes; anything else under it: 409.
    let same = json!({"signal_id": "sig-1", "data": {"code": "A1"}});
    let (status, answer) = s.signal(id, "3ds", same.clone()).await?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["steps"][1]["output"], json!({"code": "A1"}));
    let (status, answer) = s
        .signal(
            id,
            "3ds",
            json!({"signal_id": "sig-1", "data": {"code": "B2"}}),
        )
        .await?;
    assert_eq!(status, 409, "{answer}");
    assert!(message(&answer).contains("different data"), "{answer}");
    let (status, answer) = s
        .signal(id, "3ds", json!({"signal_id": "sig-2", "data": {}}))
        .await?;
    assert_eq!(status, 409, "{answer}");
    assert!(message(&answer).contains("already received"), "{answer}");
    let (status, answer) = s
        .signal(id, "pickup", json!({"signal_id": "sig-3"}))
        .await?;
    assert_eq!(status, 409, "{answer}");
    assert!(message(&answer).contains("no step that waits for signal pickup"));

    s.raw
        .reply(&capture, json!({"status": "succeeded", "output": null}))
        .await?;
    wait_status(&s.env, id, Status::Completed).await?;
    let (status, answer) = s.signal(id, "3ds", same).await?;
    assert_eq!(
        status, 200,
        "a repeat is answered the same after the end: {answer}"
    );
    let (status, answer) = s.signal(id, "3ds", json!({"signal_id": "sig-4"})).await?;
    assert_eq!(status, 409, "{answer}");
    assert!(message(&answer).contains("the transaction is completed"));

    let kinds: Vec<&str> = (s.app.engine.events(id).await?.iter())
        .map(|e| e.event.kind())
        .filter(|k| k.contains("signal"))
        .collect();
    assert_eq!(kinds, ["awaiting_signal", "signalled"]);
    let text = helpers::scrape(&s.http, &s.app.url("/metrics")).await?;
    let received = "sagas_signals_total{definition=\"payment\",signal=\"3ds\",result=\"received\"}";
    assert!(
        text.lines().any(|l| l.starts_with(received)),
        "{received} not in {text}"
    );
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_wait_without_its_signal_compensates_after_the_timeout_and_refuses_a_late_one()
-> Result<()> {
    let mut s = Setup::new(Duration::from_millis(300)).await?;
    let id = s.start().await?;
    let hold = s.raw.expect("hold", "action", 1).await?;
    s.raw
        .reply(&hold, json!({"status": "succeeded", "output": null}))
        .await?;
    let refund = s.raw.expect("hold", "compensate", 1).await?;
    s.raw
        .reply(&refund, json!({"status": "succeeded", "output": null}))
        .await?;
    let done = wait_status(&s.env, id, Status::Compensated).await?;
    assert_eq!(
        done.failure.as_deref(),
        Some("step authorize failed: no signal 3ds within 300 ms")
    );
    let late = json!({"signal_id": "late", "data": {}});
    let (status, answer) = s.signal(id, "3ds", late).await?;
    assert_eq!(status, 409, "{answer}");
    assert!(message(&answer).contains("compensated"), "{answer}");

    let (status, answer) = s
        .signal(Uuid::from_u128(42), "3ds", json!({"signal_id": "x"}))
        .await?;
    assert_eq!((status, answer["error"].as_str()), (404, Some("not_found")));
    let (status, answer) = s.signal(id, "3ds", json!({"data": {}})).await?;
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("invalid_body"))
    );
    s.stop().await;
    Ok(())
}
