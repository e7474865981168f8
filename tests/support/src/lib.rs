//! Test support shared by the end-to-end tests (`tests/e2e`) and the participant SDK's
//! integration tests (`participants/tests/it`): where PostgreSQL and RabbitMQ are, a database
//! of its own per test, and AMQP names of its own per test, so that tests run in parallel, in
//! one process or several, against one server and one broker. [`tls`] adds certificates made
//! on the spot, a PostgreSQL of a test's own with TLS, and a TLS proxy in front of the broker.
//!
//! It depends on the participant SDK (for its AMQP names and declarations) and not on the
//! orchestrator, so that the SDK's tests do not build the orchestrator.

pub mod proxy;
pub mod rng;
pub mod tls;

use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result};
use lapin::Connection;
use sagas_participant::amqp::{QueueOptions, delete_topology};
use sagas_participant::protocol::Topology;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection as _, PgConnection, PgPool};
use uuid::Uuid;

/// Polls `condition` every 20 ms for up to 10 s; panics naming `what` if it never held.
pub async fn eventually(what: &str, condition: impl Fn() -> bool) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not within 10 s: {what}");
}

/// The admin database URL (`DATABASE_URL`, default: local PostgreSQL). Its role must be able
/// to create databases.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// The broker URL (`AMQP_URL`, default: local RabbitMQ).
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// A tag of its own for one test. It names the test's databases (`sagas_t_<tag>…`, the names
/// `scripts/test` drops when a crashed run left them behind) and its AMQP prefix (`t-<tag>`).
pub fn unique_tag() -> String {
    Uuid::new_v4().simple().to_string()
}

/// The AMQP names of the test tagged `tag`: every exchange and queue starts with `t-<tag>`.
pub fn topology(tag: &str) -> Topology {
    Topology::new(format!("t-{tag}"))
}

/// A topology of its own, for a test that needs no database named alike.
pub fn unique_topology() -> Topology {
    topology(&unique_tag())
}

/// Queue options for tests: classic queues, and the leftovers of a crashed test expire once
/// unused for ten minutes (longer than any test waits).
pub fn queue_options() -> QueueOptions {
    QueueOptions {
        quorum: false,
        expires: Some(Duration::from_secs(600)),
    }
}

/// Connects to the broker at `AMQP_URL`. Each try gives up after the SDK's connect timeout (a
/// handshake the broker never completes would otherwise hold a test for ever), and a try that
/// failed is made again, up to three, as the orchestrator and the participants do.
pub async fn connect_broker() -> Result<Connection> {
    let mut tries = 0;
    loop {
        tries += 1;
        match sagas_participant::amqp::connect(&amqp_url()).await {
            Ok(conn) => return Ok(conn),
            Err(error) if tries < 3 => {
                eprintln!("connecting to AMQP_URL failed ({error}); trying again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => {
                return Err(error).context(format!("connecting to AMQP_URL ({tries} tries)"));
            }
        }
    }
}

/// Closes a test's broker connection, waiting at most 10 s for the broker's answer.
pub async fn close_broker(conn: &Connection) {
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.close(200, "done".into())).await;
}

/// Deletes what `topology` declared for `participants` (their queues, the replies queue and
/// the exchanges), and the extra `queues`; best effort, for the end of a test.
/// Gives up after 30 s: what is left expires (see [`queue_options`]).
pub async fn delete_amqp(topology: &Topology, participants: &[&str], queues: &[String]) {
    let delete = async {
        let Ok(conn) = connect_broker().await else {
            return;
        };
        if let Ok(ch) = conn.create_channel().await {
            let _ = delete_topology(&ch, topology, participants).await;
            for queue in queues {
                let _ = ch
                    .queue_delete(queue.as_str().into(), Default::default())
                    .await;
            }
        }
        close_broker(&conn).await;
    };
    if tokio::time::timeout(Duration::from_secs(30), delete)
        .await
        .is_err()
    {
        eprintln!(
            "deleting the AMQP names of {} took over 30 s; left to expire",
            topology.prefix()
        );
    }
}

/// A connection to the admin database.
pub async fn admin() -> Result<PgConnection> {
    let options = PgConnectOptions::from_str(&admin_url()).context("parsing DATABASE_URL")?;
    PgConnection::connect_with(&options)
        .await
        .context("connecting to DATABASE_URL")
}

/// A database of its own for one test, and a pool on it. Dropped (with any connection still
/// open on it) by [`TestDatabase::remove`], or else when the value is dropped, also when the
/// test fails.
pub struct TestDatabase {
    /// Its name, `sagas_t_…`.
    pub name: String,
    /// Its URL: the admin URL with this database.
    pub url: String,
    pub pool: PgPool,
    removed: bool,
}

impl TestDatabase {
    /// Creates database `name` (which should start with `sagas_t_`) and a pool of at most
    /// `max_connections` on it.
    pub async fn create(name: &str, max_connections: u32) -> Result<TestDatabase> {
        let mut admin = admin().await?;
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await
            .with_context(|| format!("creating database {name}"))?;
        admin.close().await.ok();
        let options = PgConnectOptions::from_str(&admin_url())?.database(name);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .connect_with(options)
            .await
            .with_context(|| format!("connecting to database {name}"))?;
        Ok(TestDatabase {
            name: name.to_owned(),
            url: with_database(&admin_url(), name),
            pool,
            removed: false,
        })
    }

    /// Closes the pool and drops the database now. A connection still checked out after 10 s
    /// (a task of the test that did not stop) is not waited for: the drop ends it.
    pub async fn remove(mut self) {
        self.removed = true;
        if tokio::time::timeout(Duration::from_secs(10), self.pool.close())
            .await
            .is_err()
        {
            eprintln!("a connection to {} was still in use after 10 s", self.name);
        }
        if drop_database(&self.name).await.is_err() {
            eprintln!("could not drop test database {}", self.name);
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        // A thread and a runtime of its own, so that this also works while a failed test
        // unwinds, inside or outside a runtime.
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|runtime| runtime.block_on(drop_database(&name)))
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}", self.name);
        }
    }
}

/// Gives up after 30 s: `scripts/test` drops what is left at its next run.
async fn drop_database(name: &str) -> Result<()> {
    let drop = async {
        let mut admin = admin().await?;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await?;
        admin.close().await.ok();
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(30), drop)
        .await
        .with_context(|| format!("dropping database {name} took over 30 s"))?
}

/// `url` with its database replaced by `db` (the query string kept).
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let (server, _) = base.rsplit_once('/').expect("database URL with a path");
    format!("{server}/{db}{query}")
}
