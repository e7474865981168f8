//! Definitions stored under their name and version: a process whose definition differs from
//! the one stored refuses to start; documents registered over HTTP are immutable, listed with
//! their content hash, and run by every process.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use sagas::orchestrator::clock::SystemClock;
use sagas::orchestrator::definition::DefinitionError;
use sagas::orchestrator::document;
use sagas::orchestrator::store::{SagaStore, SqliteStore, StoredDefinition};
use sagas::orchestrator::transport::AmqpTransport;
use sagas::orchestrator::{Definition, Engine, EngineError, Registry};
use serde_json::{Value, json};

use sagas::participant::{Command, Outcome};

use tokio::process::{Child, Command as Process};

use crate::examples::{bank, shop};
use crate::helpers::{
    self, App, TestEnv, amqp_url, close_broker, engine_config, run_sagactl, scripted_participant,
    spawn_app,
};

/// `transfer` at `version`, its `credit` step executed by `credit_by`.
fn transfer(version: u32, credit_by: &str) -> Result<Registry> {
    let def = Definition::saga::<Value>("transfer", version)
        .step("debit", "accounts", |s| s.command(|_, _| json!({})))
        .step("credit", credit_by, |s| s.command(|_, _| json!({})))
        .build()?;
    Ok(Registry::new().with(def)?)
}

fn engine_on(store: Arc<dyn SagaStore>, env: &TestEnv, registry: Registry) -> Arc<Engine> {
    Engine::new(
        store,
        Arc::new(AmqpTransport::new(env.amqp_config())),
        registry,
        Arc::new(SystemClock),
        engine_config(),
    )
}

/// What a second process with `registry` says when it registers, after a first one
/// registered `transfer` v1 on the same store.
async fn second_process(store: Arc<dyn SagaStore>, env: &TestEnv) -> Result<()> {
    engine_on(store.clone(), env, transfer(1, "accounts")?)
        .register_definitions()
        .await?;
    // The same plan again (a restart, a second replica) is accepted.
    engine_on(store.clone(), env, transfer(1, "accounts")?)
        .register_definitions()
        .await?;
    // A changed plan under the same version is refused, naming what changed.
    let err = engine_on(store.clone(), env, transfer(1, "ledger")?)
        .register_definitions()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::Definition(DefinitionError::Changed { name, version: 1, .. }) if name == "transfer"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "definition transfer v1 differs from the one registered: step `credit` participant \
         changed from \"accounts\" to \"ledger\"; bump the version"
    );
    // With a new version it is another definition.
    engine_on(store.clone(), env, transfer(2, "ledger")?)
        .register_definitions()
        .await?;
    let stored = store.definitions(Some("transfer")).await?;
    let versions: Vec<u32> = stored.iter().map(|d| d.plan.version).collect();
    assert_eq!(versions, vec![1, 2]);
    assert_eq!(stored[0].plan.steps[1].participant, "accounts");
    // Only documents are counted (the loader's cheap look for new ones).
    assert_eq!(store.document_count().await?, 0);
    let doc = json!({"name": "transfer", "version": 3,
        "steps": [{"name": "debit", "participant": "accounts", "command": {}}]});
    let plan = (**document::compile(&doc)?.plan()).clone();
    let ours = StoredDefinition {
        plan,
        document: Some(doc),
    };
    // The insert says whether it stored the row: one of two registrations of the same one.
    let first = store.register_definition(&ours).await?;
    let again = store.register_definition(&ours).await?;
    assert_eq!((first.inserted, again.inserted), (true, false));
    assert_eq!((&first.stored, &again.stored), (&ours, &ours));
    assert_eq!(store.document_count().await?, 1);
    Ok(())
}

#[tokio::test]
async fn a_process_whose_plan_differs_from_the_one_stored_under_its_version_refuses_to_start()
-> Result<()> {
    let env = TestEnv::new().await?;
    second_process(Arc::new(env.store()), &env).await?;
    let dir = tempfile::tempdir()?;
    let sqlite = SqliteStore::open(dir.path().join("sagas.db")).await?;
    second_process(Arc::new(sqlite), &env).await?;
    env.cleanup().await;
    Ok(())
}

/// A transfer as a document: `debit` then `credit`, whose command carries the debit's output.
fn transfer_document(version: u32, credit_timeout_ms: u64) -> Value {
    json!({
        "name": "doc_transfer",
        "version": version,
        "mode": "saga",
        "input_schema": {
            "type": "object",
            "required": ["from", "to", "amount"],
            "properties": {
                "from": {"type": "string"},
                "to": {"type": "string"},
                "amount": {"type": "integer", "exclusiveMinimum": 0}
            }
        },
        "steps": [
            {"name": "debit", "participant": "accounts",
             "command": {"account": {"$ref": "/input/from"}, "delta": {"$ref": "/input/amount"}}},
            {"name": "credit", "participant": "accounts", "timeout_ms": credit_timeout_ms,
             "command": {"account": {"$ref": "/input/to"}, "debited": {"$ref": "/outputs/debit/ok"}}}
        ]
    })
}

async fn put(http: &reqwest::Client, app: &App, path: &str, doc: &Value) -> Result<(u16, Value)> {
    let res = http.put(app.url(path)).json(doc).send().await?;
    Ok((res.status().as_u16(), res.json().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_registered_in_one_process_is_immutable_listed_with_its_hash_and_runs_in_another()
-> Result<()> {
    let env = TestEnv::new().await?;
    let commands = Arc::new(Mutex::new(Vec::<Command>::new()));
    let seen = commands.clone();
    let (participant, _task) = scripted_participant(&env, "accounts", move |cmd| {
        seen.lock().unwrap().push(cmd.clone());
        Some(Outcome::succeeded(json!({"ok": cmd.step})))
    })
    .await?;
    let one = spawn_app(&env, Registry::new()).await?;
    let two = spawn_app(&env, Registry::new()).await?;
    let http = reqwest::Client::new();
    let path = "/v1/definitions/doc_transfer/versions/1";
    let doc = transfer_document(1, 5_000);

    let (status, body) = put(&http, &one, path, &doc).await?;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["kind"], "document");
    assert_eq!(body["content_hash"], document::content_hash(&doc));
    // Idempotent: the same document again.
    let (status, body) = put(&http, &one, path, &doc).await?;
    assert_eq!(status, 200, "{body}");
    // Immutable: another document under the same name and version, from either process.
    let (status, body) = put(&http, &two, path, &transfer_document(1, 9_000)).await?;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"], "definition_conflict");
    assert_eq!(
        body["message"],
        "definition doc_transfer v1 differs from the one registered: step `credit` timeout_ms \
         changed from 5000 to 9000; bump the version"
    );
    let (status, body) = put(&http, &one, "/v1/definitions/doc_transfer/versions/2", &doc).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_definition")),
        "{body}"
    );
    let mut broken = transfer_document(3, 5_000);
    broken["steps"][0]["command"]["x"] = json!({"$ref": "/outputs/credit"});
    let (status, body) = put(
        &http,
        &one,
        "/v1/definitions/doc_transfer/versions/3",
        &broken,
    )
    .await?;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains(
            "doc_transfer v3 step debit command selects the output of step credit, which does \
             not succeed before it"
        ),
        "{body}"
    );

    // The other process lists it, and starts it (loaded from the store on the miss).
    let listed: Value = http
        .get(two.url("/v1/definitions"))
        .send()
        .await?
        .json()
        .await?;
    let item = &listed["items"][0];
    assert_eq!(
        (
            item["name"].as_str(),
            item["version"].as_u64(),
            item["latest"].as_bool()
        ),
        (Some("doc_transfer"), Some(1), Some(true)),
        "{listed}"
    );
    assert_eq!(item["content_hash"], document::content_hash(&doc));
    let shown: Value = http.get(two.url(path)).send().await?.json().await?;
    assert_eq!(shown["document"], doc);
    let res = http
        .post(two.url("/v1/sagas/doc_transfer?wait=30"))
        .json(&json!({"input": {"from": "a", "to": "b", "amount": 5}}))
        .send()
        .await?;
    assert_eq!(res.status().as_u16(), 200);
    let done: Value = res.json().await?;
    assert_eq!(done["status"], "completed", "{done}");
    let payloads: Vec<(String, Value)> = commands
        .lock()
        .unwrap()
        .iter()
        .map(|c| (c.step.clone(), c.payload.clone()))
        .collect();
    assert_eq!(
        payloads,
        vec![
            ("debit".to_owned(), json!({"account": "a", "delta": 5})),
            (
                "credit".to_owned(),
                json!({"account": "b", "debited": "debit"})
            ),
        ]
    );
    // An input the schema refuses is a 400 saying every fault and where.
    let res = http
        .post(two.url("/v1/sagas/doc_transfer"))
        .json(&json!({"input": {"from": "a", "amount": -1}}))
        .send()
        .await?;
    assert_eq!(res.status().as_u16(), 400);
    let refused: Value = res.json().await?;
    assert_eq!(refused["error"], "invalid_input");
    let message = refused["message"].as_str().unwrap();
    assert!(
        message.contains("/: \"to\" is a required property"),
        "{message}"
    );
    assert!(message.contains("/amount: "), "{message}");

    // A newer version registered in the first process is the one the second starts, unless the
    // start names a version.
    let (status, body) = put(
        &http,
        &one,
        "/v1/definitions/doc_transfer/versions/2",
        &transfer_document(2, 9_000),
    )
    .await?;
    assert_eq!(status, 201, "{body}");
    let started = |body: Value| {
        http.post(two.url("/v1/sagas/doc_transfer?wait=30"))
            .json(&body)
            .send()
    };
    let input = json!({"from": "a", "to": "b", "amount": 1});
    let newest: Value = started(json!({"input": input})).await?.json().await?;
    assert_eq!(
        (newest["version"].as_u64(), newest["status"].as_str()),
        (Some(2), Some("completed")),
        "{newest}"
    );
    let named: Value = started(json!({"input": input, "version": 1}))
        .await?
        .json()
        .await?;
    assert_eq!(named["version"], 1, "{named}");
    let unknown = started(json!({"input": input, "version": 7})).await?;
    assert_eq!(unknown.status().as_u16(), 404);

    one.stop().await;
    two.stop().await;
    close_broker(&participant).await;
    env.cleanup().await;
    Ok(())
}

/// A port nothing listens on now.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/definitions")
}

/// A child process killed when dropped (a failed assertion leaves none behind).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

fn example_process(env: &TestEnv, program: &str) -> Result<Process> {
    let mut cmd = Process::new(helpers::built_binary(program)?);
    cmd.env("AMQP_URL", amqp_url())
        .env("SAGAS_AMQP_PREFIX", env.topology.prefix())
        .env("SAGAS_QUEUE_EXPIRES_MS", "600000")
        .env("RUST_LOG", "warn")
        .env_remove("SAGAS_DEFINITIONS")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    Ok(cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_documents_are_the_example_definitions_and_sagad_runs_a_transfer_with_them()
-> Result<()> {
    // The documents compile to the plans the Rust definitions of the examples make.
    let rust = bank::registry()?;
    for def in shop::registry()?.iter() {
        rust.insert(def)?;
    }
    let documents = document::read_path(&examples_dir())?;
    assert_eq!(documents.len(), 3);
    for (file, doc) in documents {
        let def = document::compile(&doc?)?;
        let theirs = rust.get(def.name(), def.version()).unwrap();
        assert_eq!(def.plan(), theirs.plan(), "{}", file.display());
    }

    // sagad with the documents, the bank example's accounts participant process.
    let env = TestEnv::new().await?;
    bank::seed(&env.bank, 3, 1_000).await?;
    let bind = format!("127.0.0.1:{}", free_port()?);
    let base = format!("http://{bind}");
    let sagad = Killed(
        example_process(&env, "sagad")?
            .arg("--definitions")
            .arg(examples_dir())
            .env("DATABASE_URL", &env.orch_url)
            .env("SAGAS_BIND", &bind)
            .spawn()?,
    );
    let accounts = Killed(
        example_process(&env, "examples/bank_transfer")?
            .arg("accounts")
            .env("ACCOUNTS_DATABASE_URL", &env.bank_url)
            .spawn()?,
    );
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "sagad not ready in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let start = |input: Value| {
        http.post(format!("{base}/v1/sagas/transfer_saga?wait=30"))
            .json(&json!({ "input": input }))
            .send()
    };
    let done: Value = start(json!({"from": "acct-1", "to": "acct-2", "amount": 250}))
        .await?
        .json()
        .await?;
    assert_eq!(done["status"], "completed", "{done}");
    let balances: Vec<(String, i64)> =
        sqlx::query_as("SELECT id, available FROM bank_accounts ORDER BY id")
            .fetch_all(&env.bank)
            .await?;
    assert_eq!(
        balances,
        vec![
            ("acct-1".to_owned(), 750),
            ("acct-2".to_owned(), 1_250),
            ("acct-3".to_owned(), 1_000)
        ]
    );
    let refused = start(json!({"from": "acct-1", "to": "acct-2", "amount": "ten"})).await?;
    assert_eq!(refused.status().as_u16(), 400);

    // sagactl: applying the same documents changes nothing; a changed one would be refused.
    let applied = run_sagactl(&[
        "definitions",
        "apply",
        "-f",
        examples_dir().to_str().unwrap(),
        "--url",
        &base,
    ])?;
    assert!(applied.status.success(), "{applied:?}");
    let out = String::from_utf8(applied.stdout)?;
    assert_eq!(out.matches(" unchanged\n").count(), 3, "{out}");
    let dir = tempfile::tempdir()?;
    let changed = dir.path().join("transfer_saga.yaml");
    let text = std::fs::read_to_string(examples_dir().join("transfer_saga.yaml"))?;
    std::fs::write(
        &changed,
        text.replacen("timeout_ms: 5000", "timeout_ms: 7000", 1),
    )?;
    let diff = |file: &Path| -> Result<(Option<i32>, String)> {
        let out = run_sagactl(&[
            "definitions",
            "diff",
            "-f",
            file.to_str().unwrap(),
            "--url",
            &base,
        ])?;
        Ok((out.status.code(), String::from_utf8(out.stdout)?))
    };
    let (code, out) = diff(&changed)?;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("transfer_saga v1 would be refused")
            && out.contains("  - step `debit` timeout_ms changed from 5000 to 7000\n"),
        "{out}"
    );
    std::fs::write(
        &changed,
        text.replacen("timeout_ms: 5000", "timeout_ms: 7000", 1)
            .replacen("version: 1", "version: 2", 1),
    )?;
    let (code, out) = diff(&changed)?;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("transfer_saga v2 would be registered (new)\n  against v1:\n"),
        "{out}"
    );
    let shown = run_sagactl(&["definitions", "show", "transfer_saga", "--url", &base])?;
    let out = String::from_utf8(shown.stdout)?;
    assert!(shown.status.success(), "{out}");
    assert!(
        out.contains("Kind         document\n") && out.contains("\nDocument\n"),
        "{out}"
    );

    // A second sagad with another document under transfer_saga v1 refuses to start.
    let other = tempfile::tempdir()?;
    std::fs::write(
        other.path().join("transfer_saga.yaml"),
        text.replacen("timeout_ms: 5000", "timeout_ms: 7000", 1),
    )?;
    let refused = example_process(&env, "sagad")?
        .arg("--definitions")
        .arg(other.path())
        .env("DATABASE_URL", &env.orch_url)
        .env("SAGAS_BIND", format!("127.0.0.1:{}", free_port()?))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let out = tokio::time::timeout(Duration::from_secs(60), refused.wait_with_output()).await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "definition transfer_saga v1 differs from the one registered: step `debit` \
             timeout_ms changed from 5000 to 7000; bump the version"
        ),
        "{stderr}"
    );

    drop(sagad);
    drop(accounts);
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagactl_definitions_apply_reports_every_file_of_a_directory_and_registers_the_good_ones()
-> Result<()> {
    let env = TestEnv::new().await?;
    let app = spawn_app(&env, Registry::new()).await?;
    let dir = tempfile::tempdir()?;
    let good =
        "name: apply_good\nversion: 1\nsteps:\n  - name: a\n    participant: p\n    command: {}\n";
    std::fs::write(dir.path().join("a_broken.yaml"), "name: [")?;
    std::fs::write(
        dir.path().join("b_invalid.json"),
        r#"{"name": "apply_bad", "version": 1, "steps": [], "colour": "red"}"#,
    )?;
    std::fs::write(dir.path().join("c_good.yaml"), good)?;
    std::fs::write(
        dir.path().join("d_conflict.yaml"),
        good.replace("command: {}", "timeout_ms: 7000\n    command: {}"),
    )?;
    let base = app.url("");
    let out = run_sagactl(&[
        "definitions",
        "apply",
        "-f",
        dir.path().to_str().unwrap(),
        "--url",
        &base,
    ])?;
    let (stdout, stderr) = (
        String::from_utf8(out.stdout)?,
        String::from_utf8(out.stderr)?,
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.ends_with("c_good.yaml: apply_good v1 registered\n"),
        "{stdout}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(
        lines[0].contains("a_broken.yaml: invalid definition: not a YAML document: "),
        "{stderr}"
    );
    assert!(
        lines[1].contains("b_invalid.json: invalid definition: document: unknown field `colour`"),
        "{stderr}"
    );
    assert!(
        lines[2]
            .contains("d_conflict.yaml: definition apply_good v1 differs from the one registered"),
        "{stderr}"
    );
    app.stop().await;
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_document_that_postgresql_stores_in_another_form_is_still_the_same_document() -> Result<()>
{
    let env = TestEnv::new().await?;
    let app = spawn_app(&env, Registry::new()).await?;
    let http = reqwest::Client::new();
    // jsonb keeps -0.0 as 0.0 and 1e2 as 100.
    let doc = json!({"name": "zero", "version": 1, "steps": [{
        "name": "a", "participant": "p", "retry": {"jitter": -0.0, "multiplier": 1e2},
        "command": {"n": -0.0}}]});
    let path = "/v1/definitions/zero/versions/1";
    let (status, body) = put(&http, &app, path, &doc).await?;
    assert_eq!(status, 201, "{body}");
    let (status, body) = put(&http, &app, path, &doc).await?;
    assert_eq!(status, 200, "{body}");
    app.stop().await;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_registrations_in_two_processes_register_one_document_and_answer_the_others_200_or_409()
-> Result<()> {
    let env = TestEnv::new().await?;
    let one = spawn_app(&env, Registry::new()).await?;
    let two = spawn_app(&env, Registry::new()).await?;
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    for version in 1..=5u32 {
        let path = format!("/v1/definitions/doc_transfer/versions/{version}");
        let (same, other) = (
            transfer_document(version, 5_000),
            transfer_document(version, 9_000),
        );
        // Each version: the same document twice and another one, at once, through both.
        let (a, b, c) = tokio::join!(
            put(&http, &one, &path, &same),
            put(&http, &two, &path, &same),
            put(&http, &two, &path, &other),
        );
        let mut answers = [a?, b?, c?].map(|(status, body)| {
            let kind = match status {
                201 | 200 if body["content_hash"] == document::content_hash(&same) => "same",
                201 | 200 => "other",
                409 => {
                    assert_eq!(body["error"], "definition_conflict", "{body}");
                    "refused"
                }
                _ => panic!("{status} {body}"),
            };
            (status, kind)
        });
        answers.sort();
        statuses.push(answers);
    }
    for answers in &statuses {
        // Exactly one registration; whichever document won, the others get 200 or 409.
        assert_eq!(
            answers.iter().filter(|(s, _)| *s == 201).count(),
            1,
            "{statuses:?}"
        );
        let winner = answers.iter().find(|(s, _)| *s == 201).unwrap().1;
        let expected: Vec<(u16, &str)> = match winner {
            "same" => vec![(200, "same"), (201, "same"), (409, "refused")],
            _ => vec![(201, "other"), (409, "refused"), (409, "refused")],
        };
        assert_eq!(answers.to_vec(), expected, "{statuses:?}");
    }
    // Both processes run what was stored.
    for app in [&one, &two] {
        let listed: Value = http
            .get(app.url("/v1/definitions"))
            .send()
            .await?
            .json()
            .await?;
        let versions = listed["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["name"] == "doc_transfer")
            .count();
        assert_eq!(versions, 5, "{listed}");
    }
    one.stop().await;
    two.stop().await;
    env.cleanup().await;
    Ok(())
}
