//! The HTTP API end to end over real PostgreSQL and RabbitMQ: abort and retry, listing with
//! a keyset cursor, the registered definitions, readiness, bearer tokens, `?wait`, deadlines,
//! the OpenAPI document, metrics, request ids, body limits, input that cannot be stored, and
//! the HTTP server's limits (read timeouts, the connection cap) seen from raw TCP clients.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use lapin::Connection;
use sagas::orchestrator::EngineConfig;
use sagas::orchestrator::api::ApiOptions;
use sagas::orchestrator::clock::{Clock, SystemClock};
use sagas::orchestrator::config::{ApiToken, Config, HttpLimits, Role};
use sagas::orchestrator::machine::StepStatus;
use sagas::orchestrator::transport::{AmqpConfig, AmqpTransport};
use sagas::orchestrator::{Definition, Engine, Registry, Status};
use sagas::participant::{Operation, Outcome};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::examples::bank;
use crate::helpers::{
    self, TestEnv, amqp_url, close_broker, connect_broker, engine_config, spawn_app,
    spawn_app_with_api, spawn_app_with_limits,
};

/// The participant of the test definitions (cleaned up with the test's topology).
pub(crate) const PARTICIPANT: &str = "silent";

#[derive(serde::Deserialize)]
struct Script {
    answer: bool,
    #[serde(default)]
    busy: bool,
    #[serde(default)]
    stuck: bool,
}

/// A one-step saga on [`PARTICIPANT`]; the step's payload is the input, so the input decides
/// whether the participant answers.
pub(crate) fn one_step(name: &str) -> Result<Definition> {
    Ok(Definition::saga::<Script>(name, 1)
        .step("hold", PARTICIPANT, |s| {
            s.command(|s: &Script, _| json!({"answer": s.answer, "busy": s.busy, "stuck": s.stuck}))
                .timeout(Duration::from_secs(120))
        })
        .build()?)
}

/// A participant on the raw protocol: it answers an action only when its payload says
/// `"answer": true` (otherwise the saga stays running), asks for the first attempt to be
/// retried in ten minutes when it says `"busy": true`, and answers every compensation.
pub(crate) async fn scripted_participant(
    env: &TestEnv,
) -> Result<(Connection, tokio::task::JoinHandle<()>)> {
    helpers::scripted_participant(env, PARTICIPANT, |cmd| {
        let action = cmd.operation == Operation::Action;
        if action && cmd.payload["busy"] == true && cmd.attempt == 1 {
            Some(Outcome::Retry {
                reason: "busy".into(),
                retry_after_ms: Some(600_000),
            })
        } else if !action && cmd.payload["stuck"] == true {
            Some(Outcome::failed("cannot undo this"))
        } else if !action || cmd.payload["answer"] == true {
            Some(Outcome::succeeded(json!({"held": true})))
        } else {
            None
        }
    })
    .await
}

struct Api {
    env: TestEnv,
    app: helpers::App,
    participant: (Connection, tokio::task::JoinHandle<()>),
    http: reqwest::Client,
    /// Sent as `Authorization: Bearer` by `post` and `get`.
    token: Option<&'static str>,
}

/// A read token and an operate token named `oncall` (see [`tokens`]).
pub(crate) const READ_TOKEN: &str = "read-token-0123456789";
pub(crate) const OPERATE_TOKEN: &str = "operate-token-0123456789";

/// Options with [`READ_TOKEN`] (role read, named `dashboard`) and [`OPERATE_TOKEN`] (role
/// operate, named `oncall`).
pub(crate) fn tokens() -> ApiOptions {
    ApiOptions {
        tokens: vec![
            ApiToken {
                role: Role::Read,
                name: "dashboard".into(),
                token: READ_TOKEN.into(),
            },
            ApiToken {
                role: Role::Operate,
                name: "oncall".into(),
                token: OPERATE_TOKEN.into(),
            },
        ],
        ..ApiOptions::default()
    }
}

impl Api {
    /// An orchestrator with the definitions `api_saga` and `api_other`, and their participant.
    async fn start() -> Result<Api> {
        Api::start_with(&["api_saga", "api_other"], ApiOptions::default()).await
    }

    /// An orchestrator with one-step definitions named `names`, served with `options`.
    async fn start_with(names: &[&str], options: ApiOptions) -> Result<Api> {
        let env = TestEnv::new().await?;
        let participant = scripted_participant(&env).await?;
        let mut registry = Registry::new();
        for name in names {
            registry = registry.with(one_step(name)?)?;
        }
        let app = spawn_app_with_api(&env, registry, options).await?;
        Ok(Api {
            env,
            app,
            participant,
            http: reqwest::Client::new(),
            token: None,
        })
    }

    /// Options with the test tokens ([`tokens`]).
    fn with_tokens() -> ApiOptions {
        tokens()
    }

    /// Sends a request with `token` (or none) and returns status, headers and the JSON body.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Result<(u16, reqwest::header::HeaderMap, Value)> {
        let mut req = self.http.request(method, self.app.url(path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req.send().await?;
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let text = res.text().await?;
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, headers, json))
    }

    /// Starts an instance whose participant answers if `answer`.
    async fn begin(&self, definition: &str, answer: bool) -> Result<Uuid> {
        let (status, body) = self
            .post(
                &format!("/v1/sagas/{definition}"),
                None,
                json!({"input": {"answer": answer}}),
            )
            .await?;
        anyhow::ensure!(status == 202, "start answered {status}: {body}");
        Ok(body["id"].as_str().unwrap().parse()?)
    }

    /// Starts an instance and waits until it has completed.
    async fn completed(&self, definition: &str) -> Result<Uuid> {
        let id = self.begin(definition, true).await?;
        assert_eq!(self.env.wait_terminal(id).await?.status, Status::Completed);
        Ok(id)
    }

    /// Waits up to 30 s until the instance's view shows `status`.
    async fn wait_status(&self, id: Uuid, status: &str) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (_, view) = self.get(&format!("/v1/sagas/{id}")).await?;
            if view["status"] == status {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "never {status}: {view}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn post(&self, path: &str, actor: Option<&str>, body: Value) -> Result<(u16, Value)> {
        let mut req = self.http.post(self.app.url(path)).json(&body);
        if let Some(actor) = actor {
            req = req.header("X-Sagas-Actor", actor);
        }
        if let Some(token) = self.token {
            req = req.bearer_auth(token);
        }
        let res = req.send().await?;
        Ok((res.status().as_u16(), res.json().await?))
    }

    async fn get(&self, path: &str) -> Result<(u16, Value)> {
        let mut req = self.http.get(self.app.url(path));
        if let Some(token) = self.token {
            req = req.bearer_auth(token);
        }
        let res = req.send().await?;
        Ok((res.status().as_u16(), res.json().await?))
    }

    async fn stop(self) {
        self.app.stop().await;
        self.participant.1.abort();
        close_broker(&self.participant.0).await;
        self.env.cleanup().await;
    }
}

fn ids(page: &Value) -> Vec<Uuid> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap().parse().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborting_a_running_saga_compensates_it_and_logs_who_asked_and_why() -> Result<()> {
    let api = Api::start().await?;
    let id = api.begin("api_saga", false).await?;
    let (status, view) = api
        .post(
            &format!("/v1/sagas/{id}/abort"),
            Some("alice"),
            json!({"reason": "customer cancelled the order"}),
        )
        .await?;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["id"], id.to_string());
    assert_eq!(view["status"], "compensating");

    let done = api.env.wait_terminal(id).await?;
    assert_eq!(done.status, Status::Compensated);
    // The step's action may have run (no reply came), so it is compensated.
    assert_eq!(done.steps[0].status, StepStatus::Compensated);
    assert_eq!(
        done.failure.as_deref(),
        Some("aborted by alice: customer cancelled the order")
    );
    let (status, events) = api.get(&format!("/v1/sagas/{id}/events")).await?;
    assert_eq!(status, 200);
    let actions: Vec<&Value> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "operator_action")
        .collect();
    assert_eq!(actions.len(), 1, "{events}");
    assert_eq!(actions[0]["action"], "abort");
    assert_eq!(actions[0]["actor"], "alice");
    assert_eq!(actions[0]["reason"], "customer cancelled the order");
    api.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_without_a_header_is_logged_as_anonymous() -> Result<()> {
    let api = Api::start().await?;
    let id = api.begin("api_saga", false).await?;
    let (status, view) = api
        .post(
            &format!("/v1/sagas/{id}/abort"),
            None,
            json!({"reason": "test"}),
        )
        .await?;
    assert_eq!(status, 200, "{view}");
    let events = api.app.engine.events(id).await?;
    let action = events
        .iter()
        .find(|e| e.event.kind() == "operator_action")
        .unwrap();
    assert_eq!(serde_json::to_value(action)?["actor"], "anonymous");
    api.env.wait_terminal(id).await?;
    api.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborting_a_completed_saga_is_a_conflict_that_says_why_and_changes_nothing() -> Result<()> {
    let api = Api::start().await?;
    let id = api.completed("api_saga").await?;
    let seq_before = api.app.engine.events(id).await?.len();
    let (status, body) = api
        .post(
            &format!("/v1/sagas/{id}/abort"),
            Some("alice"),
            json!({"reason": "too late"}),
        )
        .await?;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"], "conflict");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("only a running instance"),
        "{body}"
    );
    assert_eq!(api.app.engine.events(id).await?.len(), seq_before);
    api.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrying_a_saga_with_nothing_to_retry_is_a_conflict() -> Result<()> {
    let api = Api::start().await?;
    // Waiting for a reply is not something to retry; neither is a completed saga.
    let running = api.begin("api_saga", false).await?;
    let completed = api.completed("api_saga").await?;
    for id in [running, completed] {
        let (status, body) = api
            .post(
                &format!("/v1/sagas/{id}/retry"),
                Some("bob"),
                json!({"reason": "try again"}),
            )
            .await?;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["error"], "conflict");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("nothing to retry"),
            "{body}"
        );
    }
    api.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrying_a_step_that_waits_to_retry_sends_it_again_now_and_logs_who_asked() -> Result<()> {
    let api = Api::start().await?;
    let (status, body) = api
        .post(
            "/v1/sagas/api_saga",
            None,
            json!({"input": {"answer": true, "busy": true}}),
        )
        .await?;
    assert_eq!(status, 202, "{body}");
    let id: Uuid = body["id"].as_str().unwrap().parse()?;
    // Wait until the participant's "retry in ten minutes" is in the log.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !api
        .app
        .engine
        .events(id)
        .await?
        .iter()
        .any(|e| e.event.kind() == "retry_scheduled")
    {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no retry scheduled");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (status, view) = api
        .post(
            &format!("/v1/sagas/{id}/retry"),
            Some("bob"),
            json!({"reason": "the participant is back"}),
        )
        .await?;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["steps"][0]["attempts"], 2);
    // Well before the ten minutes are up.
    let done = tokio::time::timeout(Duration::from_secs(30), api.env.wait_terminal(id)).await??;
    assert_eq!(done.status, Status::Completed);
    let events = api.app.engine.events(id).await?;
    let action = events
        .iter()
        .find(|e| e.event.kind() == "operator_action")
        .map(serde_json::to_value)
        .unwrap()?;
    assert_eq!(action["action"], "retry");
    assert_eq!(action["actor"], "bob");
    assert_eq!(action["reason"], "the participant is back");
    api.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_without_a_reason_are_refused_and_unknown_ids_are_not_found() -> Result<()> {
    let api = Api::start().await?;
    let id = api.begin("api_saga", false).await?;
    for action in ["abort", "retry"] {
        let path = format!("/v1/sagas/{id}/{action}");
        for body in [json!({}), json!({"reason": ""}), json!({"reason": "   "})] {
            let (status, answer) = api.post(&path, Some("alice"), body).await?;
            assert_eq!(status, 400, "{answer}");
            assert_eq!(answer["error"], "invalid_body");
            assert!(answer["message"].as_str().unwrap().contains("reason"));
        }
        let (status, answer) = api
            .post(&path, Some("alice"), json!({"reason": "x", "force": true}))
            .await?;
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["error"], "malformed_body");
        let unknown = format!("/v1/sagas/{}/{action}", Uuid::now_v7());
        let (status, answer) = api.post(&unknown, None, json!({"reason": "x"})).await?;
        assert_eq!(status, 404, "{answer}");
        assert_eq!(answer["error"], "not_found");
        let (status, _) = api
            .post(
                &format!("/v1/sagas/nope/{action}"),
                None,
                json!({"reason": "x"}),
            )
            .await?;
        assert_eq!(status, 400);
    }
    // Nothing was recorded and the saga still runs.
    let events = api.app.engine.events(id).await?;
    assert!(events.iter().all(|e| e.event.kind() != "operator_action"));
    assert_eq!(
        api.get(&format!("/v1/sagas/{id}")).await?.1["status"],
        "running"
    );
    api.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_filters_by_status_and_definition_and_pages_newest_first_with_a_stable_cursor()
-> Result<()> {
    let api = Api::start().await?;
    // Seven api_saga instances (four completed, three running) and two api_other ones.
    let mut sagas = Vec::new();
    for i in 0..7 {
        sagas.push(if i % 2 == 0 {
            api.completed("api_saga").await?
        } else {
            api.begin("api_saga", false).await?
        });
    }
    let others = [
        api.completed("api_other").await?,
        api.completed("api_other").await?,
    ];
    let newest_first: Vec<Uuid> = sagas.iter().rev().copied().collect();

    // Pages of three over api_saga; an instance started between pages does not shift them.
    let (status, first) = api.get("/v1/sagas?definition=api_saga&limit=3").await?;
    assert_eq!(status, 200, "{first}");
    assert_eq!(ids(&first), newest_first[0..3]);
    let late = api.begin("api_saga", false).await?;
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    let (_, second) = api
        .get(&format!(
            "/v1/sagas?definition=api_saga&limit=3&cursor={cursor}"
        ))
        .await?;
    assert_eq!(ids(&second), newest_first[3..6]);
    let cursor = second["next_cursor"].as_str().unwrap().to_owned();
    let (_, third) = api
        .get(&format!(
            "/v1/sagas?definition=api_saga&limit=3&cursor={cursor}"
        ))
        .await?;
    assert_eq!(ids(&third), newest_first[6..7]);
    assert!(third["next_cursor"].is_null(), "{third}");
    // The same cursor gives the same page again.
    let (_, again) = api
        .get(&format!(
            "/v1/sagas?definition=api_saga&limit=3&cursor={cursor}"
        ))
        .await?;
    assert_eq!(ids(&again), ids(&third));

    // Status and definition filters, alone and together.
    let (_, running) = api
        .get("/v1/sagas?status=running&definition=api_saga")
        .await?;
    let expected: Vec<Uuid> = [late, sagas[5], sagas[3], sagas[1]].into();
    assert_eq!(ids(&running), expected);
    assert!(
        running["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["status"] == "running" && v["definition"] == "api_saga")
    );
    let (_, other) = api.get("/v1/sagas?definition=api_other").await?;
    assert_eq!(ids(&other), [others[1], others[0]]);
    let (_, completed) = api.get("/v1/sagas?status=completed").await?;
    assert_eq!(
        ids(&completed),
        [others[1], others[0], sagas[6], sagas[4], sagas[2], sagas[0]]
    );
    assert!(completed["next_cursor"].is_null());
    // Everything, with the default limit.
    let (_, all) = api.get("/v1/sagas").await?;
    assert_eq!(ids(&all).len(), 10);
    assert_eq!(all["items"][0]["id"], late.to_string());
    let (_, none) = api.get("/v1/sagas?definition=nope").await?;
    assert_eq!(none, json!({"items": [], "next_cursor": null}));
    api.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_list_parameters_are_answered_400_naming_the_parameter() -> Result<()> {
    let api = Api::start().await?;
    for (query, named) in [
        ("status=finished", "status"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("limit=-1", "limit"),
        ("cursor=not-a-cursor", "cursor"),
        ("cursor=7a7a", "cursor"),
        ("offset=3", "offset"),
        ("created_after=yesterday", "created_after"),
        ("created_before=2026-13-01T00:00:00Z", "created_before"),
    ] {
        let (status, body) = api.get(&format!("/v1/sagas?{query}")).await?;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"], "invalid_query", "{query}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains(named),
            "{query}: {body}"
        );
    }
    let (status, _) = api.get("/v1/sagas?limit=500&status=stuck").await?;
    assert_eq!(status, 200);
    let (status, page) = api
        .get("/v1/sagas?created_after=2000-01-01T00:00:00Z&created_before=2000-01-02T00:00:00%2B01:00")
        .await?;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["items"], json!([]));
    api.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_lists_the_bank_definitions_with_their_steps_and_policies() -> Result<()> {
    let env = TestEnv::new().await?;
    let app = spawn_app(&env, bank::registry()?).await?;
    let res = reqwest::get(app.url("/v1/definitions")).await?;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await?;
    let items = body["items"].as_array().unwrap();
    let names: Vec<(&str, &str)> = items
        .iter()
        .map(|d| (d["name"].as_str().unwrap(), d["mode"].as_str().unwrap()))
        .collect();
    assert_eq!(names, [("transfer_saga", "saga"), ("transfer_tcc", "tcc")]);
    for d in items {
        assert_eq!(d["version"], 1);
        assert_eq!(d["latest"], true);
        let steps: Vec<&str> = d["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(steps, ["debit", "credit"]);
        let debit = &d["steps"][0];
        assert_eq!(debit["participant"], bank::PARTICIPANT);
        assert_eq!(debit["timeout_ms"], 5_000);
        assert!(debit["in_progress_timeout_ms"].is_u64());
        assert!(debit["retry"]["max_attempts"].as_u64().unwrap() >= 1);
        assert!(debit["finish_retry"]["max_backoff_ms"].is_u64());
    }
    app.stop().await;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_ok_when_the_database_and_the_broker_answer() -> Result<()> {
    let env = TestEnv::new().await?;
    let app = spawn_app(&env, Registry::new()).await?;
    let res = reqwest::get(app.url("/readyz")).await?;
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.json::<Value>().await?,
        json!({"database": "ok", "broker": "ok", "engine": "ok"})
    );
    app.stop().await;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_naming_the_broker_when_it_cannot_be_reached() -> Result<()> {
    let env = TestEnv::new().await?;
    // Nothing listens on port 1.
    let transport = AmqpTransport::new(AmqpConfig {
        uri: "amqp://guest:guest@127.0.0.1:1/%2f".into(),
        ..env.amqp_config()
    });
    let engine = Engine::new(
        Arc::new(env.store()),
        Arc::new(transport),
        Registry::new(),
        Arc::new(SystemClock),
        engine_config(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, sagas::orchestrator::api::router(engine)).await;
    });
    let res = reqwest::get(format!("http://{addr}/readyz")).await?;
    assert_eq!(res.status(), 503);
    let body: Value = res.json().await?;
    assert_eq!(body["database"], "ok");
    assert_ne!(body["broker"], "ok");
    assert_eq!(body["engine"], "starting", "never run: {body}");
    server.abort();
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolving_a_stuck_saga_ends_it_resolved_with_who_and_why_in_the_log() -> Result<()> {
    let api = Api::start().await?;
    let (status, body) = api
        .post(
            "/v1/sagas/api_saga",
            None,
            json!({"input": {"answer": false, "stuck": true}}),
        )
        .await?;
    assert_eq!(status, 202, "{body}");
    let id: Uuid = body["id"].as_str().unwrap().parse()?;
    let path = |action: &str| format!("/v1/sagas/{id}/{action}");
    // Not stuck yet: resolve is a conflict.
    let (status, answer) = api
        .post(&path("resolve"), Some("bob"), json!({"reason": "x"}))
        .await?;
    assert_eq!(status, 409, "{answer}");
    // Abort: the compensation answers failed, so the saga is stuck.
    let (status, _) = api
        .post(&path("abort"), Some("bob"), json!({"reason": "stop"}))
        .await?;
    assert_eq!(status, 200);
    api.wait_status(id, "stuck").await?;
    let (status, view) = api
        .post(
            &path("resolve"),
            Some("bob"),
            json!({"reason": "refunded by hand, ticket 7"}),
        )
        .await?;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["status"], "resolved");
    let (status, _) = api
        .post(&path("resolve"), Some("bob"), json!({"reason": "again"}))
        .await?;
    assert_eq!(status, 409);
    let (_, events) = api.get(&format!("/v1/sagas/{id}/events")).await?;
    let last_action = events
        .as_array()
        .unwrap()
        .iter()
        .rfind(|e| e["kind"] == "operator_action")
        .unwrap()
        .clone();
    assert_eq!(last_action["action"], "resolve");
    assert_eq!(last_action["actor"], "bob");
    assert_eq!(last_action["reason"], "refunded by hand, ticket 7");
    api.stop().await;
    Ok(())
}

// --- Bearer tokens -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_answer_401_without_a_valid_token_403_for_a_read_token_on_operations_and_leave_probes_open()
-> Result<()> {
    use reqwest::Method;
    let api = Api::start_with(&["api_saga"], Api::with_tokens()).await?;
    let start = json!({"input": {"answer": false}});

    // No token, a wrong one, a malformed header: 401 with a Bearer challenge, one error shape.
    for token in [None, Some("not-a-token-0123456789"), Some("")] {
        let (status, headers, body) = api.send(Method::GET, "/v1/sagas", token, None).await?;
        assert_eq!(status, 401, "{token:?}: {body}");
        assert_eq!(body["error"], "unauthorized", "{body}");
        assert!(body["message"].is_string());
        let challenge = headers["www-authenticate"].to_str()?;
        assert!(challenge.starts_with("Bearer"), "{challenge}");
    }
    let (status, _, _) = api
        .send(
            Method::POST,
            "/v1/sagas/api_saga",
            None,
            Some(start.clone()),
        )
        .await?;
    assert_eq!(status, 401);

    // A read token reads but may not start or operate.
    let (status, _, body) = api
        .send(Method::GET, "/v1/sagas", Some(READ_TOKEN), None)
        .await?;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = api
        .send(Method::GET, "/v1/definitions", Some(READ_TOKEN), None)
        .await?;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = api
        .send(
            Method::POST,
            "/v1/sagas/api_saga",
            Some(READ_TOKEN),
            Some(start.clone()),
        )
        .await?;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "forbidden");
    assert!(body["message"].as_str().unwrap().contains("operate"));

    // An operate token starts, reads and operates; the actor is the token's name, whatever
    // X-Sagas-Actor claims.
    let (status, _, body) = api
        .send(
            Method::POST,
            "/v1/sagas/api_saga",
            Some(OPERATE_TOKEN),
            Some(start.clone()),
        )
        .await?;
    assert_eq!(status, 202, "{body}");
    let id: Uuid = body["id"].as_str().unwrap().parse()?;
    let (status, _, _) = api
        .send(
            Method::GET,
            &format!("/v1/sagas/{id}"),
            Some(OPERATE_TOKEN),
            None,
        )
        .await?;
    assert_eq!(status, 200);
    let (status, _, body) = api
        .send(
            Method::POST,
            &format!("/v1/sagas/{id}/abort"),
            Some(READ_TOKEN),
            Some(json!({"reason": "x"})),
        )
        .await?;
    assert_eq!(status, 403, "{body}");
    let res = api
        .http
        .post(api.app.url(&format!("/v1/sagas/{id}/abort")))
        .bearer_auth(OPERATE_TOKEN)
        .header("X-Sagas-Actor", "mallory")
        .json(&json!({"reason": "customer asked"}))
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    let events = api.app.engine.events(id).await?;
    let action = events
        .iter()
        .find(|e| e.event.kind() == "operator_action")
        .map(serde_json::to_value)
        .unwrap()?;
    assert_eq!(action["actor"], "oncall");
    assert_eq!(action["reason"], "customer asked");

    // Probes, metrics and the document need no token.
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let (status, _, body) = api.send(Method::GET, path, None, None).await?;
        assert_eq!(status, 200, "{path}: {body}");
    }
    api.env.wait_terminal(id).await?;
    api.stop().await;
    Ok(())
}

#[tokio::test]
async fn serve_refuses_an_unauthenticated_api_on_a_non_loopback_address_before_connecting()
-> Result<()> {
    let config = Config {
        bind: "0.0.0.0:0".into(),
        // Nothing listens there: the check must come first.
        database_url: "postgres://nobody@127.0.0.1:1/none".into(),
        api_tokens: Vec::new(),
        ..Config::default()
    };
    let err = tokio::time::timeout(
        Duration::from_secs(5),
        sagas::orchestrator::server::serve(config, Registry::new(), None),
    )
    .await?
    .unwrap_err();
    assert!(err.to_string().contains("SAGAS_API_TOKENS"), "{err:#}");
    Ok(())
}

// --- ?wait and deadlines -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_with_wait_returns_the_terminal_view_with_200_or_the_running_one_with_202()
-> Result<()> {
    let api = Api::start().await?;
    let started = tokio::time::Instant::now();
    let (status, view) = api
        .post(
            "/v1/sagas/api_saga?wait=30",
            None,
            json!({"input": {"answer": true}}),
        )
        .await?;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["status"], "completed");
    assert_eq!(view["steps"][0]["status"], "succeeded");
    assert_eq!(view["steps"][0]["output"], json!({"held": true}));
    // Woken by the commit, not by the wait running out.
    assert!(started.elapsed() < Duration::from_secs(10));

    let (status, view) = api
        .post(
            "/v1/sagas/api_saga?wait=1",
            None,
            json!({"input": {"answer": false}}),
        )
        .await?;
    assert_eq!(status, 202, "{view}");
    assert_eq!(view["status"], "running");
    assert!(view["definition"] == "api_saga" && view["steps"].is_array());

    // GET waits too: abort the running one while a GET waits for it.
    let id = view["id"].as_str().unwrap().to_owned();
    let waiting = {
        let http = api.http.clone();
        let url = api.app.url(&format!("/v1/sagas/{id}?wait=30"));
        tokio::spawn(async move {
            let res = http.get(url).send().await?;
            anyhow::Ok((res.status().as_u16(), res.json::<Value>().await?))
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _) = api
        .post(
            &format!("/v1/sagas/{id}/abort"),
            Some("alice"),
            json!({"reason": "stop"}),
        )
        .await?;
    assert_eq!(status, 200);
    let (status, view) = tokio::time::timeout(Duration::from_secs(20), waiting).await???;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["status"], "compensated");
    assert_eq!(view["failure"], "aborted by alice: stop");

    for bad in ["61", "-1", "1.5", "soon"] {
        let (status, body) = api
            .post(
                &format!("/v1/sagas/api_saga?wait={bad}"),
                None,
                json!({"input": {"answer": true}}),
            )
            .await?;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"], "invalid_query");
        assert!(body["message"].as_str().unwrap().contains("wait"));
        let (status, _) = api.get(&format!("/v1/sagas/{id}?wait={bad}")).await?;
        assert_eq!(status, 400);
    }
    api.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_still_moving_forward_at_its_deadline_is_compensated() -> Result<()> {
    let api = Api::start().await?;
    let (status, view) = api
        .post(
            "/v1/sagas/api_saga?wait=30",
            None,
            json!({"input": {"answer": false}, "deadline_s": 1}),
        )
        .await?;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["status"], "compensated");
    assert!(
        view["failure"].as_str().unwrap().contains("deadline"),
        "{view}"
    );
    assert!(view["deadline"].is_string(), "{view}");
    assert_eq!(view["steps"][0]["status"], "compensated");

    // A saga that finishes first is not affected.
    let (status, view) = api
        .post(
            "/v1/sagas/api_saga?wait=30",
            None,
            json!({"input": {"answer": true}, "deadline_s": 3600}),
        )
        .await?;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["status"], "completed");

    for bad in [json!(0), json!(-5), json!(2_592_001)] {
        let (status, body) = api
            .post(
                "/v1/sagas/api_saga",
                None,
                json!({"input": {"answer": true}, "deadline_s": bad}),
            )
            .await?;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"], "invalid_body");
        assert!(body["message"].as_str().unwrap().contains("deadline_s"));
    }
    let (status, body) = api
        .post(
            "/v1/sagas/api_saga",
            None,
            json!({"input": {"answer": true}, "deadline_s": "soon"}),
        )
        .await?;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "malformed_body");
    // Nothing was started by the refused requests.
    let (_, page) = api.get("/v1/sagas").await?;
    assert_eq!(ids(&page).len(), 2);
    api.stop().await;
    Ok(())
}

// --- OpenAPI -------------------------------------------------------------------------------------

#[test]
fn the_openapi_document_is_stable() {
    let doc = serde_json::to_value(sagas::orchestrator::api::openapi()).unwrap();
    insta::assert_json_snapshot!("openapi", doc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_of_the_router_is_in_the_openapi_document_and_nothing_else_is_routed()
-> Result<()> {
    use reqwest::Method;

    let env = TestEnv::new().await?;
    let app = spawn_app(&env, Registry::new()).await?;
    let http = reqwest::Client::new();
    let call = |method: Method, path: String| {
        let req = http
            .request(method, app.url(&path))
            .header("content-type", "application/json")
            .body("{}");
        async move {
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            let code = res
                .json::<Value>()
                .await
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned));
            (status, code)
        }
    };
    let doc = serde_json::to_value(sagas::orchestrator::api::openapi())?;
    let paths = doc["paths"].as_object().unwrap();
    let all = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
    ];
    let mut operations = 0;
    for (template, item) in paths {
        // Any value fits every parameter well enough to reach the handler.
        let path = template
            .split('/')
            .map(|seg| {
                if seg.starts_with('{') {
                    Uuid::now_v7().to_string()
                } else {
                    seg.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        for method in &all {
            let documented = item.get(method.as_str().to_lowercase()).is_some();
            let (status, code) = call(method.clone(), path.clone()).await;
            if documented {
                operations += 1;
                assert!(
                    !matches!(
                        code.as_deref(),
                        Some("unknown_route" | "method_not_allowed")
                    ),
                    "{method} {template} is documented but not routed ({status})"
                );
            } else {
                assert_eq!(
                    (status, code.as_deref()),
                    (405, Some("method_not_allowed")),
                    "{method} {template} is routed but not documented"
                );
            }
        }
    }
    assert_eq!(operations, 20, "{paths:?}");
    for path in [
        "/",
        "/v1",
        "/v2/sagas",
        "/v1/sagas/x/y/z",
        "/v1/definitions/x",
    ] {
        assert_eq!(
            call(Method::GET, path.to_owned()).await,
            (404, Some("unknown_route".to_owned())),
            "{path}"
        );
    }
    app.stop().await;
    env.cleanup().await;
    Ok(())
}

// --- Metrics, request ids, body limits -----------------------------------------------------------

fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_started_and_finished_instances_by_definition_and_status() -> Result<()> {
    // A definition of its own: counters are process-wide and other tests run alongside.
    let api = Api::start_with(&["api_metrics"], ApiOptions::default()).await?;
    for answer in [true, true, false] {
        let (status, _) = api
            .post(
                "/v1/sagas/api_metrics?wait=30",
                None,
                json!({"input": {"answer": answer}, "deadline_s": 1}),
            )
            .await?;
        assert_eq!(status, 200);
    }
    let text = helpers::scrape(&api.http, &api.app.url("/metrics")).await?;
    let value = |series: &str| metric_value(&text, series);
    assert_eq!(
        value("sagas_instances_started_total{definition=\"api_metrics\"}"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        value("sagas_instances_finished_total{definition=\"api_metrics\",status=\"completed\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value("sagas_instances_finished_total{definition=\"api_metrics\",status=\"compensated\"}"),
        Some(1.0),
        "{text}"
    );
    // Per step: how each attempt ended, and how long it took.
    let series = |name: &str, label: &str| {
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains("definition=\"api_metrics\""))
            .filter(|l| l.contains(label))
            .count()
    };
    // (The deadline compensated the third: its step's compensation ran.)
    for operation in ["action", "compensate"] {
        let label = format!("operation=\"{operation}\",outcome=\"succeeded\"");
        assert!(
            series("sagas_step_attempts_total{", &label) > 0,
            "{operation}: {text}"
        );
    }
    assert!(
        series("sagas_step_attempt_duration_seconds_bucket{", "le=") > 0,
        "{text}"
    );
    assert_named(
        &text,
        &[
            "sagas_replies_total",
            "sagas_timers_fired_total",
            "sagas_http_requests_total{",
            "sagas_http_request_duration_seconds_bucket{",
            "# HELP sagas_instances_started_total",
        ],
    );
    api.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_replies_decided_on_cached_states_and_the_messages_through_the_broker()
-> Result<()> {
    let api = Api::start_with(&["api_cache_metrics"], ApiOptions::default()).await?;
    // Started and answered by this process: the reply is decided on the state it cached.
    let (status, view) = api
        .post(
            "/v1/sagas/api_cache_metrics?wait=30",
            None,
            json!({"input": {"answer": true}}),
        )
        .await?;
    assert_eq!(status, 200, "{view}");
    let text = api
        .http
        .get(api.app.url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    // Counters are process-wide and other tests run alongside: at least this test's own.
    let value = |series: &str| metric_value(&text, series).unwrap_or(0.0);
    assert!(
        value("sagas_state_cache_total{result=\"hit\"}") >= 1.0,
        "{text}"
    );
    assert!(
        text.contains("sagas_state_cache_total{result=\"stale\"}"),
        "{text}"
    );
    assert!(
        value("sagas_amqp_messages_total{kind=\"command\"}") >= 1.0,
        "{text}"
    );
    assert!(
        value("sagas_amqp_messages_total{kind=\"reply\"}") >= 1.0,
        "{text}"
    );
    assert!(text.contains("# HELP sagas_state_cache_total"), "{text}");
    api.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_and_stuck_instances_show_up_in_the_gauges_at_metrics_after_the_gauge_interval()
-> Result<()> {
    let env = TestEnv::new().await?;
    let participant = scripted_participant(&env).await?;
    let registry = Registry::new().with(one_step("api_gauges")?)?;
    let engine = EngineConfig {
        gauge_interval: Duration::from_millis(100),
        ..engine_config()
    };
    let app = helpers::spawn_app_with_engine(&env, registry, env.amqp_config(), engine).await?;
    let api = Api {
        env,
        app,
        participant,
        http: reqwest::Client::new(),
        token: None,
    };
    // Two that the participant never answers (running), one whose compensation it refuses.
    for _ in 0..2 {
        api.begin("api_gauges", false).await?;
    }
    let (status, body) = api
        .post(
            "/v1/sagas/api_gauges",
            None,
            json!({"input": {"answer": false, "stuck": true}}),
        )
        .await?;
    assert_eq!(status, 202, "{body}");
    let stuck: Uuid = body["id"].as_str().unwrap().parse()?;
    let (status, _) = api
        .post(
            &format!("/v1/sagas/{stuck}/abort"),
            Some("bob"),
            json!({"reason": "stop"}),
        )
        .await?;
    assert_eq!(status, 200);
    api.wait_status(stuck, "stuck").await?;

    // The store's numbers for this test's database alone.
    let gauges = api.app.engine.store().gauges(SystemClock.now()).await?;
    assert_eq!(gauges.open(Status::Running), 2, "{gauges:?}");
    assert_eq!(gauges.open(Status::Stuck), 1, "{gauges:?}");
    assert_eq!(gauges.open(Status::Compensating), 0, "{gauges:?}");
    assert!(gauges.oldest_open.is_some());

    // The gauges are process-wide and other tests' engines set them too (each when it starts
    // and every 15 s); this engine sets them every 100 ms, so its numbers show up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = api
            .http
            .get(api.app.url("/metrics"))
            .send()
            .await?
            .text()
            .await?;
        let value = |series: &str| metric_value(&text, series);
        if value("sagas_instances{status=\"running\"}") == Some(2.0)
            && value("sagas_instances{status=\"stuck\"}") == Some(1.0)
        {
            break text;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the gauges never showed 2 running and 1 stuck:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        text.contains("sagas_instances{status=\"compensating\"}"),
        "{text}"
    );
    let build_info = format!(
        "sagas_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    assert!(text.contains(&build_info), "{build_info} missing:\n{text}");
    assert_named(
        &text,
        &[
            "# HELP sagas_instances ",
            "# TYPE sagas_instances gauge",
            "sagas_oldest_open_seconds ",
            "sagas_outbox_rows ",
            "sagas_outbox_oldest_seconds ",
            "sagas_timers_due ",
            "sagas_timer_lag_seconds ",
            "sagas_dead_letters ",
        ],
    );
    api.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_gauge_is_the_depth_of_the_replies_dead_letter_queue_on_the_broker()
-> Result<()> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use sagas::orchestrator::transport::Transport;

    let env = TestEnv::new().await?;
    let transport = AmqpTransport::new(env.amqp_config());
    // Before the topology is declared there is no queue to ask about.
    assert!(transport.dead_letters().await.is_err());
    transport.declare(&[]).await?;
    assert_eq!(transport.dead_letters().await?, Some(0));

    let conn = connect_broker().await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    for _ in 0..2 {
        ch.basic_publish(
            env.topology.dead_letter_exchange().as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            b"{not json",
            Default::default(),
        )
        .await?
        .await?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while transport.dead_letters().await? != Some(2) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the depth never reached 2"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    close_broker(&conn).await;
    transport.close().await;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_is_echoed_or_assigned() -> Result<()> {
    let env = TestEnv::new().await?;
    let app = spawn_app(&env, Registry::new()).await?;
    let http = reqwest::Client::new();
    let res = http
        .get(app.url("/v1/definitions"))
        .header("X-Request-Id", "req-42.abc")
        .send()
        .await?;
    assert_eq!(res.headers()["x-request-id"], "req-42.abc");
    for req in [
        http.get(app.url("/healthz")),
        // Unusable ids are replaced.
        http.get(app.url("/nowhere"))
            .header("X-Request-Id", "x".repeat(200)),
    ] {
        let res = req.send().await?;
        let id = res.headers()["x-request-id"].to_str()?;
        assert!(id.parse::<Uuid>().is_ok(), "{id}");
    }
    app.stop().await;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_are_413_and_other_content_types_415_in_the_error_shape() -> Result<()>
{
    let options = ApiOptions {
        body_limit: 1024,
        ..ApiOptions::default()
    };
    let api = Api::start_with(&["api_saga"], options).await?;
    let big = json!({"input": {"answer": true, "padding": "x".repeat(2048)}});
    let (status, body) = api.post("/v1/sagas/api_saga", None, big).await?;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"], "body_too_large");
    let (status, _) = api
        .post(
            "/v1/sagas/api_saga",
            None,
            json!({"input": {"answer": true}}),
        )
        .await?;
    assert_eq!(status, 202);
    let res = api
        .http
        .post(api.app.url("/v1/sagas/api_saga"))
        .header("content-type", "text/plain")
        .body(r#"{"input": {"answer": true}}"#)
        .send()
        .await?;
    assert_eq!(res.status(), 415);
    assert_eq!(
        res.json::<Value>().await?["error"],
        "unsupported_media_type"
    );
    let res = api
        .http
        .post(api.app.url("/v1/sagas/api_saga"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await?;
    assert_eq!(res.status(), 400);
    assert_eq!(res.json::<Value>().await?["error"], "malformed_body");
    api.stop().await;
    Ok(())
}

// --- Shutdown ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_a_request_in_flight_and_stops_the_engine() -> Result<()> {
    let env = TestEnv::new().await?;
    let participant = scripted_participant(&env).await?;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let config = Config {
        database_url: env.orch_url.clone(),
        amqp_url: amqp_url(),
        bind: format!("127.0.0.1:{port}"),
        amqp_prefix: env.topology.prefix().to_owned(),
        queue_expires_ms: Some(600_000),
        api_tokens: Vec::new(),
        ..Config::default()
    };
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(sagas::orchestrator::server::serve(
        config,
        Registry::new().with(one_step("api_saga")?)?,
        Some(shutdown.clone()),
    ));
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "server never up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let res = http
        .post(format!("{base}/v1/sagas/api_saga"))
        .json(&json!({"input": {"answer": false}}))
        .send()
        .await?;
    assert_eq!(res.status(), 202);
    let id = res.json::<Value>().await?["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // A request that would wait 60 s is in flight when the shutdown comes.
    let waiting = tokio::spawn({
        let http = http.clone();
        let url = format!("{base}/v1/sagas/{id}?wait=60");
        async move {
            let res = http.get(url).send().await?;
            anyhow::Ok((res.status().as_u16(), res.json::<Value>().await?))
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = tokio::time::Instant::now();
    shutdown.cancel();
    let (status, view) = tokio::time::timeout(Duration::from_secs(10), waiting).await???;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["status"], "running");
    tokio::time::timeout(Duration::from_secs(10), server).await???;
    assert!(stopping.elapsed() < Duration::from_secs(10));
    // No longer accepting.
    assert!(http.get(format!("{base}/healthz")).send().await.is_err());
    participant.1.abort();
    close_broker(&participant.0).await;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_start_with_the_same_idempotency_key_returns_the_first_transaction() -> Result<()>
{
    let api = Api::start().await?;
    let body = json!({"input": {"answer": true}, "idempotency_key": "order-7"});
    let (status, first) = api.post("/v1/sagas/api_saga", None, body.clone()).await?;
    assert_eq!(status, 202, "{first}");
    let (status, again) = api.post("/v1/sagas/api_saga", None, body).await?;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["id"], first["id"]);
    // The header works too, and names the same transaction.
    let res = api
        .http
        .post(api.app.url("/v1/sagas/api_saga"))
        .header("idempotency-key", "order-7")
        .json(&json!({"input": {"answer": true}}))
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await?["id"], first["id"]);
    // The same key with another request is a conflict.
    let (status, answer) = api
        .post(
            "/v1/sagas/api_saga",
            None,
            json!({"input": {"answer": false}, "idempotency_key": "order-7"}),
        )
        .await?;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("another request")
    );
    // Body and header must agree.
    let res = api
        .http
        .post(api.app.url("/v1/sagas/api_saga"))
        .header("idempotency-key", "order-8")
        .json(&json!({"input": {"answer": true}, "idempotency_key": "order-9"}))
        .send()
        .await?;
    assert_eq!(res.status(), 400);
    let (_, page) = api.get("/v1/sagas?definition=api_saga").await?;
    assert_eq!(
        page["items"].as_array().unwrap().len(),
        1,
        "only one transaction started"
    );
    api.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_starts_repeating_idempotency_keys_start_one_transaction_per_key() -> Result<()>
{
    let api = Api::start().await?;
    // Sent all at once, so that starts with the same key share the start batches.
    let requests = (0..48).map(|n| {
        let body =
            json!({"input": {"answer": true}, "idempotency_key": format!("burst-{}", n % 12)});
        let api = &api;
        async move { (n % 12, api.post("/v1/sagas/api_saga", None, body).await) }
    });
    let mut by_key: std::collections::BTreeMap<usize, Vec<(u16, String)>> = Default::default();
    for (key, answer) in futures_util::future::join_all(requests).await {
        let (status, view) = answer?;
        let id = view["id"].as_str().unwrap_or_default().to_owned();
        by_key.entry(key).or_default().push((status, id));
    }
    for (key, answers) in &by_key {
        let created = answers.iter().filter(|(status, _)| *status == 202).count();
        let found = answers.iter().filter(|(status, _)| *status == 200).count();
        assert_eq!((created, found), (1, 3), "key {key}: {answers:?}");
        assert!(
            answers.iter().all(|(_, id)| *id == answers[0].1),
            "key {key} names one transaction: {answers:?}"
        );
    }
    let (_, page) = api.get("/v1/sagas?definition=api_saga&limit=100").await?;
    assert_eq!(
        page["items"].as_array().unwrap().len(),
        12,
        "one transaction per key"
    );
    api.stop().await;
    Ok(())
}

// --- Input that cannot be stored -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_character_anywhere_in_a_body_is_refused_400_naming_where_and_nothing_is_stored()
-> Result<()> {
    let env = TestEnv::new().await?;
    let app = spawn_app(&env, bank::registry()?).await?;
    let http = reqwest::Client::new();
    let post = |path: String, body: Value| {
        let req = http.post(app.url(&path)).json(&body);
        async move {
            let res = req.send().await?;
            anyhow::Ok((res.status().as_u16(), res.json::<Value>().await?))
        }
    };
    // Found by a fuzzer: PostgreSQL cannot store a NUL in text or jsonb, and this was a 503.
    for (body, at) in [
        (
            json!({"input": {"from": "acct-1\u{0}", "to": "acct-2", "amount": 1}}),
            "input.from",
        ),
        (
            json!({"input": {"from": "a", "to": "b", "amount": 1, "memo": {"lines": ["ok", "x\u{0}"]}}}),
            "input.memo.lines[1]",
        ),
        (
            json!({"input": {"fr\u{0}om": "acct-1", "to": "acct-2", "amount": 1}}),
            "input.fr\\u0000om",
        ),
        (
            json!({"input": {"from": "acct-1", "to": "acct-2", "amount": 1}, "idempotency_key": "k\u{0}"}),
            "idempotency_key",
        ),
    ] {
        let (status, answer) = post("/v1/sagas/transfer_saga".into(), body.clone()).await?;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"], "invalid_body", "{answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(
            message.contains("NUL") && message.ends_with(at),
            "{message}"
        );
    }
    // Nor can JSON text carry half of a UTF-16 surrogate pair.
    let res = http
        .post(app.url("/v1/sagas/transfer_saga"))
        .header("content-type", "application/json")
        .body(r#"{"input": {"from": "\ud800", "to": "acct-2", "amount": 1}}"#)
        .send()
        .await?;
    assert_eq!(res.status(), 400);
    assert_eq!(res.json::<Value>().await?["error"], "malformed_body");
    // No participant answers: the transfer stays in its forward phase, so abort would fit.
    let (status, started) = post(
        "/v1/sagas/transfer_saga".into(),
        json!({"input": {"from": "acct-1", "to": "acct-2", "amount": 1}}),
    )
    .await?;
    assert_eq!(status, 202, "{started}");
    let id = started["id"].as_str().unwrap().to_owned();
    for action in ["abort", "retry", "resolve"] {
        let (status, answer) = post(
            format!("/v1/sagas/{id}/{action}"),
            json!({"reason": "customer\u{0} asked"}),
        )
        .await?;
        assert_eq!(status, 400, "{action}: {answer}");
        assert_eq!(answer["error"], "invalid_body");
        assert!(answer["message"].as_str().unwrap().ends_with("reason"));
    }
    let id: Uuid = id.parse()?;
    let events = app.engine.events(id).await?;
    assert!(events.iter().all(|e| e.event.kind() != "operator_action"));
    let page: Value = http.get(app.url("/v1/sagas")).send().await?.json().await?;
    assert_eq!(ids(&page), [id], "only the clean start was stored");
    app.stop().await;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_parameters_the_store_cannot_take_are_refused_400_naming_the_parameter() -> Result<()>
{
    let api = Api::start().await?;
    // Found by a fuzzer, both answered 503: a NUL in a parameter, and a cursor that decodes to
    // 210,900 years before 1970, before PostgreSQL's earliest timestamp.
    let forged = "2d3231303930303030303030303030303030307c30303030303030302d303030302d303030302d303030302d303030303030303030303030";
    for (query, named) in [
        ("definition=a%00b".to_owned(), "definition"),
        ("definition=a%20b".to_owned(), "definition"),
        (format!("cursor={forged}"), "cursor"),
        // A cursor spelled otherwise than the server wrote it: upper-case hex.
        (format!("cursor={}", forged.to_uppercase()), "cursor"),
        ("status=".to_owned(), "status"),
        ("limit=".to_owned(), "limit"),
        ("limit=%2B5".to_owned(), "limit"),
        ("created_after=".to_owned(), "created_after"),
        (
            "created_before=2026-01-01T00:00:00Z%00".to_owned(),
            "created_before",
        ),
    ] {
        let (status, body) = api.get(&format!("/v1/sagas?{query}")).await?;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"], "invalid_query", "{query}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains(named),
            "{query}: {body}"
        );
    }
    let (status, _) = api
        .get("/v1/sagas/00000000-0000-0000-0000-000000000000?wait=")
        .await?;
    assert_eq!(status, 400);
    // A cursor the server wrote still pages.
    api.completed("api_saga").await?;
    api.completed("api_saga").await?;
    let (_, first) = api.get("/v1/sagas?limit=1").await?;
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    let (status, second) = api
        .get(&format!("/v1/sagas?limit=1&cursor={cursor}"))
        .await?;
    assert_eq!(status, 200, "{second}");
    assert_eq!(ids(&second).len(), 1);
    assert_ne!(ids(&second), ids(&first));
    api.stop().await;
    Ok(())
}

// --- The served OpenAPI document -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_document_describes_what_the_server_answers_with_and_without_tokens()
-> Result<()> {
    // Without tokens: no operation asks for one or answers 401/403.
    let api = Api::start_with(&["api_saga"], ApiOptions::default()).await?;
    let doc: Value = api
        .http
        .get(api.app.url("/openapi.json"))
        .send()
        .await?
        .json()
        .await?;
    let operations = || {
        doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|item| item.as_object().unwrap().values())
    };
    assert!(operations().count() >= 12);
    for operation in operations() {
        assert!(operation.get("security").is_none(), "{operation}");
        let responses = operation["responses"].as_object().unwrap();
        assert!(!responses.contains_key("401") && !responses.contains_key("403"));
    }
    let schemas = &doc["components"]["schemas"];
    // Events carry `logged_at`, as the server sends them.
    let id = api.completed("api_saga").await?;
    let (_, events) = api.get(&format!("/v1/sagas/{id}/events")).await?;
    // The fixed fields are one part of an allOf, the kind's own fields the other.
    let required: Vec<&Value> = schemas["EventView"]["allOf"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|part| part["required"].as_array())
        .flatten()
        .collect();
    assert!(required.contains(&&json!("logged_at")), "{required:?}");
    for event in events.as_array().unwrap() {
        for field in &required {
            assert!(
                event.get(field.as_str().unwrap()).is_some(),
                "{field} missing: {event}"
            );
        }
    }
    // A `?wait` answer is a SagaView, which has fields that `Started` does not admit: it
    // matches one branch of StartAnswer only.
    assert_eq!(schemas["Started"]["additionalProperties"], false);
    // `reason` is a required string; abort, retry and resolve document their 415.
    assert!(
        schemas["ActionRequest"]["required"]
            .as_array()
            .unwrap()
            .contains(&json!("reason"))
    );
    assert_eq!(
        schemas["ActionRequest"]["properties"]["reason"]["type"],
        "string"
    );
    for action in ["abort", "retry", "resolve"] {
        let responses = &doc["paths"][format!("/v1/sagas/{{id}}/{action}")]["post"]["responses"];
        for status in ["408", "413", "415"] {
            assert!(responses.get(status).is_some(), "{action} {status}");
        }
        let res = api
            .http
            .post(api.app.url(&format!("/v1/sagas/{id}/{action}")))
            .send()
            .await?;
        assert_eq!(res.status(), 415);
        assert_eq!(
            res.json::<Value>().await?["error"],
            "unsupported_media_type"
        );
    }
    api.stop().await;

    // With tokens: the document as generated, every guarded operation asking for one.
    let api = Api::start_with(&["api_saga"], Api::with_tokens()).await?;
    let doc: Value = api
        .http
        .get(api.app.url("/openapi.json"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        doc,
        serde_json::to_value(sagas::orchestrator::api::openapi())?
    );
    assert!(doc["paths"]["/v1/sagas"]["get"]["security"].is_array());
    api.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_accepted_in_any_case() -> Result<()> {
    let api = Api::start_with(&["api_saga"], Api::with_tokens()).await?;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let res = api
            .http
            .get(api.app.url("/v1/sagas"))
            .header("authorization", format!("{scheme} {READ_TOKEN}"))
            .send()
            .await?;
        assert_eq!(res.status(), 200, "{scheme}");
    }
    let res = api
        .http
        .get(api.app.url("/v1/sagas"))
        .header("authorization", format!("Basic {READ_TOKEN}"))
        .send()
        .await?;
    assert_eq!(res.status(), 401);
    api.stop().await;
    Ok(())
}

// --- HTTP server limits, from raw TCP clients ----------------------------------------------------

/// Limits with short read timeouts, so that a test sees them run out.
fn short_timeouts() -> HttpLimits {
    HttpLimits {
        header_timeout: Duration::from_millis(500),
        body_timeout: Duration::from_millis(500),
        ..HttpLimits::default()
    }
}

/// How long a test waits for the server to close a connection: far beyond any limit it sets.
const GENEROUS: Duration = Duration::from_secs(15);

/// A TCP connection to `app` on which `head` has been written.
async fn raw(app: &helpers::App, head: &str) -> Result<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(app.addr).await?;
    stream.write_all(head.as_bytes()).await?;
    Ok(stream)
}

/// Everything the server sends until it closes the connection (a reset counts as closing),
/// or an error if it is still open after [`GENEROUS`].
async fn until_closed(stream: &mut tokio::net::TcpStream) -> Result<String> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    let closed = tokio::time::timeout(GENEROUS, read).await;
    let got = String::from_utf8_lossy(&got).into_owned();
    closed.map_err(|_| {
        anyhow::anyhow!("the connection was still open after {GENEROUS:?}; read: {got:?}")
    })?;
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_headers_and_idle_kept_alive_connections_are_closed_after_the_header_timeout()
-> Result<()> {
    let env = TestEnv::new().await?;
    let app = spawn_app_with_limits(
        &env,
        Registry::new(),
        ApiOptions::default(),
        short_timeouts(),
    )
    .await?;
    // Headers that never end.
    let mut stream = raw(&app, "GET /healthz HTTP/1.1\r\nHost: sagas\r\nX-Slow: 1").await?;
    assert_eq!(until_closed(&mut stream).await?, "");
    // A request answered, then nothing: the kept-alive connection is closed too.
    let mut stream = raw(&app, "GET /healthz HTTP/1.1\r\nHost: sagas\r\n\r\n").await?;
    let answered = until_closed(&mut stream).await?;
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    app.stop().await;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_shorter_than_its_length_or_too_slow_is_answered_408_and_the_connection_closed()
-> Result<()> {
    use tokio::io::AsyncWriteExt;
    let env = TestEnv::new().await?;
    let app = spawn_app_with_limits(
        &env,
        Registry::new().with(one_step("api_saga")?)?,
        ApiOptions::default(),
        short_timeouts(),
    )
    .await?;
    let post = |path: &str, length: usize| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: sagas\r\nContent-Type: application/json\r\n\
             Content-Length: {length}\r\n\r\n"
        )
    };
    // Ten bytes of a hundred, then silence.
    for path in [
        "/v1/sagas/api_saga",
        &format!("/v1/sagas/{}/abort", Uuid::now_v7()),
    ] {
        let mut stream = raw(&app, &post(path, 100)).await?;
        stream.write_all(br#"{"input": "#).await?;
        let answer = until_closed(&mut stream).await.context(path.to_owned())?;
        assert!(answer.starts_with("HTTP/1.1 408"), "{path}: {answer}");
        assert!(answer.contains("request_timeout"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
    }
    // A byte at a time, never pausing for as long as the timeout: the timeout is for the whole
    // body. The server may close while bytes are still coming (a reset): closed either way.
    let mut stream = raw(&app, &post("/v1/sagas/api_saga", 100_000)).await?;
    let drip = async {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        for _ in 0..100_000 {
            tick.tick().await;
            if stream.write_all(b" ").await.is_err() {
                break;
            }
        }
    };
    tokio::time::timeout(GENEROUS, drip)
        .await
        .map_err(|_| anyhow::anyhow!("the server still read a slow body after {GENEROUS:?}"))?;
    let answer = until_closed(&mut stream).await.context("drip")?;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    let page: Value = reqwest::get(app.url("/v1/sagas")).await?.json().await?;
    assert!(ids(&page).is_empty(), "nothing started: {page}");
    app.stop().await;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_body_over_the_limit_is_refused_413_before_any_of_it_is_sent() -> Result<()> {
    let env = TestEnv::new().await?;
    // The default body timeout (30 s) is longer than the wait: only an answer that does not
    // wait for the body arrives in time.
    let app = spawn_app_with_limits(
        &env,
        Registry::new().with(one_step("api_saga")?)?,
        ApiOptions::default(),
        HttpLimits::default(),
    )
    .await?;
    for path in ["/v1/sagas/api_saga", "/nowhere"] {
        let mut stream = raw(
            &app,
            &format!(
                "POST {path} HTTP/1.1\r\nHost: sagas\r\nContent-Type: application/json\r\n\
                 Content-Length: 5000000000\r\n\r\n"
            ),
        )
        .await?;
        let answer = until_closed(&mut stream).await?;
        assert!(answer.starts_with("HTTP/1.1 413"), "{path}: {answer}");
        assert!(answer.contains("body_too_large"), "{answer}");
    }
    app.stop().await;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_wait_until_one_closes() -> Result<()> {
    use tokio::io::AsyncReadExt;
    let env = TestEnv::new().await?;
    let limits = HttpLimits {
        max_connections: 2,
        header_timeout: Duration::from_secs(60),
        ..HttpLimits::default()
    };
    let app = spawn_app_with_limits(&env, Registry::new(), ApiOptions::default(), limits).await?;
    let request = "GET /healthz HTTP/1.1\r\nHost: sagas\r\n\r\n";
    // Two connections served once each and kept alive: both slots are taken.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = raw(&app, request).await?;
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(GENEROUS, stream.read(&mut buf)).await??;
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(stream);
    }
    // A third is not served while they are held...
    let mut third = raw(&app, request).await?;
    let mut buf = [0u8; 1024];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut buf)).await;
    assert!(early.is_err(), "served over the cap: {early:?}");
    // ...and is once one of them closes.
    drop(held.pop());
    let n = tokio::time::timeout(GENEROUS, third.read(&mut buf)).await??;
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    drop(held);
    app.stop().await;
    env.cleanup().await;
    Ok(())
}

/// Asserts that the `/metrics` text `text` names each of `names` (a metric, or the start of a
/// line of one).
fn assert_named(text: &str, names: &[&str]) {
    for name in names {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
}
