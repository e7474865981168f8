//! TLS with real handshakes: a PostgreSQL of the test's own with `ssl=on` (TLS connections
//! only), and a TLS-terminating proxy in front of the shared broker, both presenting a
//! certificate of a CA made by the test. The orchestrator and a participant reach both with
//! verification against that CA; another CA, or another name, is refused with a clear error.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;
use sagas::orchestrator::clock::SystemClock;
use sagas::orchestrator::store::PgStore;
use sagas::orchestrator::transport::{AmqpConfig, AmqpTransport, Transport};
use sagas::orchestrator::{Definition, Engine, Registry, Status};
use sagas::participant::{
    Command, HandlerError, Participant, Router, RuntimeError, Saga, SagaHandler, Topology,
};
use sagas_test_support::tls::{TestCa, TlsPostgres, TlsProxy};
use sagas_test_support::{delete_amqp, queue_options, unique_topology};
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::helpers::engine_config;

/// The participant of these tests.
const PARTICIPANT: &str = "vault";

/// The URL of database `db` of `pg` for `who` (`user@host`), verifying the server against `ca`.
fn pg_url(pg: &TlsPostgres, who: &str, db: &str, ca: &Path) -> String {
    format!(
        "postgres://{who}:{}/{db}?sslmode=verify-full&sslrootcert={}",
        pg.port(),
        ca.display()
    )
}

/// Starts a PostgreSQL presenting a certificate of `ca` for `localhost` only (startup blocks
/// this worker thread for about a second).
fn start_postgres(ca: &TestCa) -> Result<TlsPostgres> {
    let server = ca.issue(&["localhost"])?;
    tokio::task::block_in_place(|| TlsPostgres::start(ca, &server))
}

/// Whether the connections of `pool` use TLS, as the server sees them.
async fn server_sees_tls(pool: &PgPool) -> Result<bool> {
    let (ssl,): (bool,) =
        sqlx::query_as("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(pool)
            .await?;
    Ok(ssl)
}

/// Keeps a note of each transaction in the participant's database.
struct Note;

#[async_trait]
impl SagaHandler for Note {
    async fn action(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        sqlx::query("INSERT INTO notes (id) VALUES ($1)")
            .bind(cmd.transaction_id)
            .execute(&mut *tx)
            .await?;
        Ok(json!({"noted": true}))
    }

    async fn compensate(
        &self,
        cmd: &Command,
        tx: &mut PgConnection,
    ) -> Result<Value, HandlerError> {
        sqlx::query("DELETE FROM notes WHERE id = $1")
            .bind(cmd.transaction_id)
            .execute(&mut *tx)
            .await?;
        Ok(Value::Null)
    }
}

/// The orchestrator's transport settings for the broker at `uri`.
fn amqp_config(uri: String, topology: &Topology) -> AmqpConfig {
    AmqpConfig {
        uri,
        topology: topology.clone(),
        queues: queue_options(),
        command_batch: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_runs_end_to_end_with_postgresql_and_rabbitmq_over_verified_tls() -> Result<()> {
    let ca = TestCa::new("sagas test CA")?;
    let pg = start_postgres(&ca)?;
    let proxy = TlsProxy::start(&ca.issue(&["localhost"])?, Some(&ca)).await?;
    let client = ca.issue(&[PARTICIPANT])?;

    // The orchestrator connects as `postgres` with verify-full and the CA; the participant
    // also presents a client certificate whose common name is its role.
    let admin_url = pg_url(&pg, "postgres@localhost", "postgres", &ca.cert_file());
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&admin_url)
        .await
        .context("connecting over TLS as postgres")?;
    for sql in [
        format!("CREATE ROLE {PARTICIPANT} LOGIN"),
        "CREATE DATABASE orchestrator".to_owned(),
        format!("CREATE DATABASE participant OWNER {PARTICIPANT}"),
    ] {
        sqlx::raw_sql(AssertSqlSafe(sql)).execute(&admin).await?;
    }
    admin.close().await;
    let orch_url = pg_url(&pg, "postgres@localhost", "orchestrator", &ca.cert_file());
    let orch = PgPoolOptions::new()
        .max_connections(4)
        .connect(&orch_url)
        .await?;
    let part_url = format!(
        "{}&sslcert={}&sslkey={}",
        pg_url(
            &pg,
            &format!("{PARTICIPANT}@localhost"),
            "participant",
            &ca.cert_file()
        ),
        client.cert.display(),
        client.key.display()
    );
    let part = PgPoolOptions::new()
        .max_connections(4)
        .connect(&part_url)
        .await
        .context("connecting over TLS with a client certificate")?;
    assert!(server_sees_tls(&orch).await? && server_sees_tls(&part).await?);
    sqlx::query("CREATE TABLE notes (id uuid PRIMARY KEY)")
        .execute(&part)
        .await?;

    // Both connect to the broker with amqps://, the CA and a client certificate.
    let topology = unique_topology();
    let tls_query = [
        ("cacertfile", ca.cert_file()),
        ("certfile", client.cert.clone()),
        ("keyfile", client.key.clone()),
    ];
    let store = PgStore::new(orch.clone());
    store.migrate().await?;
    let saga = Definition::saga::<Value>("noted", 1)
        .step("note", PARTICIPANT, |s| s.command(|_, _| json!({})))
        .build()?;
    let engine = Engine::new(
        Arc::new(store.clone()),
        Arc::new(AmqpTransport::new(amqp_config(
            proxy.url(&tls_query)?,
            &topology,
        ))),
        Registry::new().with(saga)?,
        Arc::new(SystemClock),
        engine_config(),
    );
    engine.declare().await?;
    let shutdown = CancellationToken::new();
    let runner = tokio::spawn(engine.clone().run(shutdown.clone()));
    let participant = Participant::new(
        PARTICIPANT,
        topology.clone(),
        part.clone(),
        Arc::new(Router::new().route("note", Saga(Note))),
    )
    .queue_options(queue_options());
    let participant = {
        let (url, s) = (proxy.url(&tls_query)?, shutdown.clone());
        tokio::spawn(async move { participant.run_forever(&url, s.cancelled()).await })
    };

    let id = engine.start("noted", json!({})).await?.id;
    let done = engine
        .wait_terminal(id, Duration::from_secs(30))
        .await?
        .context("the instance")?
        .instance;
    assert_eq!(done.status, Status::Completed, "{done:?}");
    let (notes,): (i64,) = sqlx::query_as("SELECT count(*) FROM notes WHERE id = $1")
        .bind(id)
        .fetch_one(&part)
        .await?;
    assert_eq!(notes, 1);
    // The orchestrator's publisher and reply consumer, and the participant.
    assert!(proxy.handshakes() >= 3, "{} handshakes", proxy.handshakes());

    shutdown.cancel();
    runner.await??;
    participant.await??;
    orch.close().await;
    part.close().await;
    delete_amqp(&topology, &[PARTICIPANT], &[]).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_over_tls_refuses_another_ca_and_another_name_with_a_clear_error() -> Result<()>
{
    let ca = TestCa::new("sagas test CA")?;
    let other = TestCa::new("another CA")?;
    let pg = start_postgres(&ca)?;
    let connect = |url: String| async move {
        PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    };

    let right = pg_url(&pg, "postgres@localhost", "postgres", &ca.cert_file());
    assert_eq!(connect(right).await, Ok(()));
    let wrong_ca = pg_url(&pg, "postgres@localhost", "postgres", &other.cert_file());
    let err = connect(wrong_ca).await.unwrap_err();
    assert!(
        err.contains("invalid peer certificate: UnknownIssuer"),
        "{err}"
    );
    // verify-full checks the name: the certificate is for localhost, not 127.0.0.1.
    let wrong_name = pg_url(&pg, "postgres@127.0.0.1", "postgres", &ca.cert_file());
    let err = connect(wrong_name).await.unwrap_err();
    assert!(
        err.contains(r#"invalid peer certificate: certificate not valid for name "127.0.0.1""#),
        "{err}"
    );
    // The server takes TLS connections only.
    let plain = format!("postgres://postgres@localhost:{}/postgres", pg.port());
    let err = connect(format!("{plain}?sslmode=disable"))
        .await
        .unwrap_err();
    assert!(err.contains("no encryption"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_database_without_an_sslmode_is_connected_plain_and_an_sslmode_brings_tls_back()
-> Result<()> {
    use sagas::participant::config::database_options;
    let connect = |url: String| async move {
        let options = database_options(&url)?;
        anyhow::Ok(
            PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options)
                .await?,
        )
    };
    // The machine's server takes plain and TLS connections (if it offers TLS at all).
    let local = "postgres://postgres@127.0.0.1:5432/postgres";
    let pool = connect(local.to_owned()).await?;
    assert!(!server_sees_tls(&pool).await?, "loopback without sslmode");
    pool.close().await;

    // A server of its own that takes TLS connections only: the plain default is refused, in
    // words that say so, and naming an sslmode connects over TLS.
    let ca = TestCa::new("sagas test CA")?;
    let pg = start_postgres(&ca)?;
    let plain = format!("postgres://postgres@localhost:{}/postgres", pg.port());
    let err = connect(plain.clone()).await.unwrap_err().to_string();
    assert!(err.contains("no encryption"), "{err}");
    let pool = connect(format!("{plain}?sslmode=require")).await?;
    assert!(server_sees_tls(&pool).await?, "sslmode=require");
    pool.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_over_tls_refuses_another_ca_or_a_missing_client_certificate_with_a_clear_error()
-> Result<()> {
    let ca = TestCa::new("sagas test CA")?;
    let other = TestCa::new("another CA")?;
    let proxy = TlsProxy::start(&ca.issue(&["localhost"])?, Some(&ca)).await?;
    let client = ca.issue(&["client"])?;
    let with = |ca: &Path| {
        proxy.url(&[
            ("cacertfile", ca),
            ("certfile", &client.cert),
            ("keyfile", &client.key),
        ])
    };
    let connect = |url: String| async move {
        sagas::participant::amqp::connect(&url)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    };
    let broker = format!("TLS connection to the broker at localhost:{}", proxy.port());

    let err = connect(with(&other.cert_file())?).await.unwrap_err();
    assert!(err.contains(&broker), "{err}");
    assert!(
        err.contains("trusting the system's roots and cacertfile"),
        "{err}"
    );
    assert!(
        err.contains("invalid peer certificate: UnknownIssuer"),
        "{err}"
    );
    let err = connect(proxy.url::<&Path>(&[])?).await.unwrap_err();
    assert!(
        err.contains("the system's roots only (no cacertfile)"),
        "{err}"
    );
    assert!(err.contains("UnknownIssuer"), "{err}");
    let err = connect(proxy.url(&[("cacertfile", &ca.cert_file())])?)
        .await
        .unwrap_err();
    assert!(
        err.contains(&broker) && err.contains("CertificateRequired"),
        "{err}"
    );
    assert_eq!(proxy.handshakes(), 0);

    // The orchestrator's transport says the same, and a participant refuses to start on a CA
    // file it cannot read.
    let topology = unique_topology();
    let transport = AmqpTransport::new(amqp_config(with(&other.cert_file())?, &topology));
    let err = transport.ping().await.unwrap_err().to_string();
    assert!(
        err.contains(&broker) && err.contains("UnknownIssuer"),
        "{err}"
    );
    let missing = other.cert_file().with_file_name("missing.pem");
    let pool = PgPoolOptions::new().connect_lazy(&sagas_test_support::admin_url())?;
    let participant = Participant::new(
        PARTICIPANT,
        topology,
        pool,
        Arc::new(Router::new().route("note", Saga(Note))),
    );
    let refused = participant
        .run_forever(&with(&missing)?, std::future::pending())
        .await;
    match refused {
        Err(RuntimeError::InvalidUrl(why)) => {
            assert!(
                why.contains("cacertfile=") && why.contains("cannot be read"),
                "{why}"
            );
        }
        other => panic!("expected an invalid URL, got {other:?}"),
    }

    // With the right CA and a client certificate, it connects.
    connect(with(&ca.cert_file())?)
        .await
        .map_err(anyhow::Error::msg)?;
    assert_eq!(proxy.handshakes(), 1);
    Ok(())
}
