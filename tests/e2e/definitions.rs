//! Definitions stored under their name and version: a process whose definition differs from
//! the one stored refuses to start.

use std::sync::Arc;

use anyhow::Result;
use sagas::orchestrator::clock::SystemClock;
use sagas::orchestrator::definition::DefinitionError;
use sagas::orchestrator::store::{SagaStore, SqliteStore};
use sagas::orchestrator::transport::AmqpTransport;
use sagas::orchestrator::{Definition, Engine, EngineError, Registry};
use serde_json::{Value, json};

use crate::helpers::{TestEnv, engine_config};

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
