//! What the bank example's processes show an operator from outside: OpenTelemetry traces
//! (docs/operations.md, "Traces"), exported over OTLP/HTTP to a receiver in this test, where the
//! spans of one transaction form one trace (the client's span, the HTTP start under it, a span
//! per step attempt under the start, and the participant's span for each command under its
//! attempt); and the participant's counters at `/metrics`.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::examples::bank;
use sagas::participant::amqp::look_at_queue;

use crate::helpers::{self, TestEnv, amqp_url, close_broker, connect_broker};

/// One span as the receiver got it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, Value>,
}

type Spans = Arc<Mutex<Vec<Received>>>;

/// Takes an OTLP/HTTP JSON export (`ExportTraceServiceRequest`) and keeps its spans.
async fn export(
    State(spans): State<Spans>,
    body: Bytes,
) -> ([(&'static str, &'static str); 1], &'static str) {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut got = Vec::new();
    for rs in request["resourceSpans"].as_array().into_iter().flatten() {
        let service = attribute(&rs["resource"]["attributes"], "service.name")
            .and_then(|v| v["stringValue"].as_str().map(str::to_owned))
            .unwrap_or_default();
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for span in ss["spans"].as_array().into_iter().flatten() {
                let text = |key: &str| span[key].as_str().unwrap_or_default().to_owned();
                let attributes = span["attributes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|kv| {
                        let value = kv["value"].as_object()?.values().next()?.clone();
                        Some((kv["key"].as_str()?.to_owned(), value))
                    })
                    .collect();
                got.push(Received {
                    service: service.clone(),
                    name: text("name"),
                    trace_id: text("traceId"),
                    span_id: text("spanId"),
                    parent_span_id: text("parentSpanId"),
                    attributes,
                });
            }
        }
    }
    spans.lock().unwrap().extend(got);
    ([("content-type", "application/json")], "{}")
}

fn attribute<'a>(attributes: &'a Value, key: &str) -> Option<&'a Value> {
    attributes
        .as_array()?
        .iter()
        .find(|kv| kv["key"] == key)
        .map(|kv| &kv["value"])
}

/// The bank example as two processes on a database and an AMQP prefix of the test's own: the
/// accounts participant (its queue declared before the orchestrator starts, so that no command
/// finds it missing) and an orchestrator, each with `vars` added to its environment.
struct Bank {
    env: TestEnv,
    accounts: Child,
    orchestrator: Child,
    base: String,
    http: reqwest::Client,
}

impl Bank {
    async fn start(
        accounts_vars: &[(&str, String)],
        orchestrator_vars: &[(&str, String)],
    ) -> Result<Bank> {
        let env = TestEnv::new().await?;
        bank::install(&env.bank).await?;
        bank::seed(&env.bank, 2, 1_000).await?;
        let accounts = bank_process(&env, &["accounts"], accounts_vars)?.spawn()?;
        let broker = connect_broker().await?;
        let queue = env.topology.participant_queue(bank::PARTICIPANT);
        let deadline = Instant::now() + Duration::from_secs(30);
        while look_at_queue(&broker, &queue).await.is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{queue} not declared within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        close_broker(&broker).await;
        let port = free_port()?;
        let orchestrator = bank_process(&env, &["orchestrator"], orchestrator_vars)?
            .env("SAGAS_BIND", format!("127.0.0.1:{port}"))
            .spawn()?;
        let bank = Bank {
            env,
            accounts,
            orchestrator,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !bank
            .http
            .get(format!("{}/readyz", bank.base))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the orchestrator not ready within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(bank)
    }

    /// A TCC transfer of 10 from acct-1 to acct-2, waited for, sent with `traceparent`.
    async fn transfer(&self, traceparent: Option<&str>) -> Result<Value> {
        let mut request = self
            .http
            .post(format!("{}/v1/sagas/transfer_tcc?wait=30", self.base))
            .json(&json!({ "input": { "from": "acct-1", "to": "acct-2", "amount": 10 } }));
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        let answer: Value = tokio::time::timeout(Duration::from_secs(40), request.send())
            .await
            .context("no answer to the start within 40 s")??
            .json()
            .await?;
        anyhow::ensure!(answer["status"] == "completed", "{answer}");
        Ok(answer)
    }

    async fn stop(mut self) {
        for child in [&mut self.orchestrator, &mut self.accounts] {
            child.kill().await.ok();
        }
        self.env.cleanup().await;
    }
}

/// A process of the bank example with the test's database and prefix, and `vars`.
fn bank_process(env: &TestEnv, args: &[&str], vars: &[(&str, String)]) -> Result<Command> {
    let mut cmd = Command::new(helpers::built_binary("examples/bank_transfer")?);
    cmd.args(args)
        .env("AMQP_URL", amqp_url())
        .env("DATABASE_URL", &env.orch_url)
        .env("ACCOUNTS_DATABASE_URL", &env.bank_url)
        .env("SAGAS_AMQP_PREFIX", env.topology.prefix())
        .env("SAGAS_QUEUE_EXPIRES_MS", "600000")
        .env("RUST_LOG", "warn")
        .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    Ok(cmd)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The variables that make a process export to `endpoint` as `service`, promptly.
fn exporting(endpoint: &str, service: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_owned()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ("OTEL_SERVICE_NAME", service.to_owned()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spans_of_a_transaction_from_the_orchestrator_and_a_participant_form_one_trace()
-> Result<()> {
    let spans: Spans = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let app = Router::new()
        .route("/v1/traces", post(export))
        .with_state(spans.clone());
    let receiver = tokio::spawn(async move { axum::serve(listener, app).await });
    let bank = Bank::start(
        &exporting(&endpoint, "bank-accounts"),
        &exporting(&endpoint, "bank-orchestrator"),
    )
    .await?;

    // The client's own span: the transaction's trace continues it.
    let (client_trace, client_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let answer = bank
        .transfer(Some(&format!("00-{client_trace}-{client_span}-01")))
        .await?;
    let id = answer["id"].as_str().context("id")?.to_owned();

    // Two tries and two confirms: an attempt span each in the orchestrator, a command span each
    // in the participant, and the HTTP start.
    let deadline = Instant::now() + Duration::from_secs(30);
    let trace = loop {
        let trace: Vec<Received> = spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == client_trace)
            .cloned()
            .collect();
        let commands = trace
            .iter()
            .filter(|s| s.service == "bank-accounts")
            .count();
        let attempts = trace
            .iter()
            .filter(|s| s.attributes.contains_key("sagas.attempt"))
            .count();
        if commands >= 4 && attempts >= 4 {
            break trace;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not all spans within 30 s: {} of the trace ({commands} commands, {attempts} attempts), \
             {} in all",
            trace.len(),
            spans.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let start = trace
        .iter()
        .find(|s| s.service == "bank-orchestrator" && s.name == "http")
        .with_context(|| format!("no HTTP span in {trace:#?}"))?;
    assert_eq!(
        start.parent_span_id, client_span,
        "the start continues the client's span"
    );
    let attempts: Vec<&Received> = trace
        .iter()
        .filter(|s| s.attributes.contains_key("sagas.attempt"))
        .collect();
    let mut names: Vec<&str> = attempts.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["credit confirm", "credit try", "debit confirm", "debit try"],
        "{attempts:#?}"
    );
    for attempt in &attempts {
        assert_eq!(attempt.service, "bank-orchestrator");
        assert_eq!(attempt.parent_span_id, start.span_id, "{attempt:?}");
        assert_eq!(attempt.attributes["sagas.transaction_id"], json!(id));
        assert_eq!(attempt.attributes["sagas.outcome"], json!("succeeded"));
        let children: Vec<&Received> = trace
            .iter()
            .filter(|s| s.service == "bank-accounts" && s.parent_span_id == attempt.span_id)
            .collect();
        assert_eq!(
            children.len(),
            1,
            "one participant span under {}: {trace:#?}",
            attempt.name
        );
    }

    receiver.abort();
    bank.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_process_serves_its_counters_at_metrics_when_given_an_address() -> Result<()>
{
    let port = free_port()?;
    let bank = Bank::start(
        &[(
            "SAGAS_PARTICIPANT_METRICS_BIND",
            format!("127.0.0.1:{port}"),
        )],
        &[],
    )
    .await?;
    bank.transfer(None).await?;
    // Two tries and two confirms, each answered and acked (the ack may follow the reply).
    let url = format!("http://127.0.0.1:{port}/metrics");
    let line = "sagas_participant_commands_processed_total{participant=\"accounts\"} 4";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = helpers::scrape(&bank.http, &url).await?;
        for name in sagas::participant::runtime::metrics::names() {
            assert!(
                text.contains(&format!("# TYPE {name} counter")),
                "{name}: {text}"
            );
        }
        if text.lines().any(|l| l == line) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "no {line:?} within 30 s: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let missing = bank
        .http
        .get(format!("http://127.0.0.1:{port}/nothing"))
        .send()
        .await?;
    assert_eq!(missing.status(), 404);
    bank.stop().await;
    Ok(())
}
