//! The machine's ceilings, measured with the same kind of connections the engine uses:
//! single-row INSERT commits through a sqlx pool, and persistent AMQP round trips
//! (publish with confirm, consume, ack) through lapin. At concurrency 1 also one client's
//! statements on a bare connection, for a lone saga's chain floor.

use sagas::participant::config::database_options;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde::Serialize;
use sqlx::postgres::PgPoolOptions;
use sqlx::{ConnectOptions, Connection as _, PgConnection};
use tokio::sync::Semaphore;

use crate::env::{self, Urls};
use crate::sys::CpuSnapshot;

/// What the ceilings measured.
#[derive(Debug, Clone, Serialize)]
pub struct Ceilings {
    /// Requests in flight for both measurements.
    pub concurrency: usize,
    /// Length of each measurement.
    pub seconds: f64,
    /// Single-row INSERT commits per second (autocommit, sqlx pool of `concurrency`).
    pub pg_commits_per_s: f64,
    /// Persistent publish-confirm-consume-ack round trips per second on one durable queue.
    pub amqp_round_trips_per_s: f64,
    /// Messages published but not consumed when the measurement stopped (0 expected).
    pub amqp_unconsumed: u64,
    /// Share of the machine's busy time used by other processes (not PostgreSQL, RabbitMQ or
    /// this one) while measuring; high values mean the ceilings are understated.
    pub other_cpu_share: f64,
    /// At concurrency 1 only: one client's statements on a bare connection.
    pub bare: Option<BareStatements>,
}

/// One client's statements one after the other on one connection outside any pool (so
/// without the check a pool makes when a connection comes back), each prepared once, as
/// `pgbench -M prepared` runs them: what PostgreSQL itself needs per statement on this
/// machine, the parts of a lone saga's chain ([`crate::run::chain_floor_ms`]).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BareStatements {
    /// A single-row INSERT in its own transaction (its commit waits for the WAL flush), ms.
    pub commit_ms: f64,
    /// `SELECT 1`, ms: a statement's round trip without a commit to flush.
    pub statement_ms: f64,
}

/// Measures both ceilings (PostgreSQL first), `secs` each, at `concurrency`.
pub async fn measure(
    urls: &Urls,
    tag: &str,
    concurrency: usize,
    secs: f64,
    prefix: &str,
) -> Result<Ceilings> {
    let db = env::create_db(urls, &format!("sagas_bench_{tag}_ceiling")).await?;
    let cpu_0 = CpuSnapshot::take();
    let pg = pg_commits(&db.url, concurrency, secs).await;
    let bare = match pg {
        Ok(_) if concurrency == 1 => Some(bare_statements(&db.url, secs / 2.0).await),
        _ => None,
    };
    env::drop_all(urls, std::slice::from_ref(&db)).await;
    let pg = pg?;
    let bare = bare.transpose()?;
    let (amqp, unconsumed) = amqp_round_trips(&urls.amqp, prefix, concurrency, secs).await?;
    let cpu = cpu_0.until(&CpuSnapshot::take());
    let other = (cpu.cpu.machine - cpu.cpu.ours()).max(0.0);
    Ok(Ceilings {
        concurrency,
        seconds: secs,
        pg_commits_per_s: pg,
        amqp_round_trips_per_s: amqp,
        amqp_unconsumed: unconsumed,
        other_cpu_share: other / cpu.cpu.machine.max(1e-9),
        bare,
    })
}

/// [`BareStatements`], `secs` for each statement, on the table [`pg_commits`] made.
async fn bare_statements(url: &str, secs: f64) -> Result<BareStatements> {
    let mut conn = database_options(url)?.connect().await?;
    let commit_ms = mean_ms(&mut conn, "INSERT INTO ceiling (v) VALUES ('bare')", secs).await?;
    let statement_ms = mean_ms(&mut conn, "SELECT 1", secs).await?;
    conn.close().await?;
    Ok(BareStatements {
        commit_ms,
        statement_ms,
    })
}

/// The mean time of `sql` run one after the other on `conn` for `secs` (after one run that
/// prepares it), in ms.
async fn mean_ms(conn: &mut PgConnection, sql: &'static str, secs: f64) -> Result<f64> {
    sqlx::query(sql).execute(&mut *conn).await?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let mut runs = 0u64;
    while Instant::now() < deadline {
        sqlx::query(sql).execute(&mut *conn).await?;
        runs += 1;
    }
    Ok(started.elapsed().as_secs_f64() * 1000.0 / runs.max(1) as f64)
}

async fn pg_commits(url: &str, concurrency: usize, secs: f64) -> Result<f64> {
    let pool = PgPoolOptions::new()
        .max_connections(concurrency as u32)
        .min_connections(concurrency as u32)
        .connect_with(database_options(url)?)
        .await?;
    sqlx::query("CREATE TABLE ceiling (id bigserial PRIMARY KEY, v text NOT NULL)")
        .execute(&pool)
        .await?;
    // Warm every connection (and its prepared statement) before timing.
    let warm: Vec<_> = (0..concurrency)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                sqlx::query("INSERT INTO ceiling (v) VALUES ($1)")
                    .bind("warm")
                    .execute(&pool)
                    .await
            })
        })
        .collect();
    for w in warm {
        w.await??;
    }
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let workers: Vec<_> = (0..concurrency)
        .map(|i| {
            let pool = pool.clone();
            let count = count.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let v = format!("worker-{i}");
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    sqlx::query("INSERT INTO ceiling (v) VALUES ($1)")
                        .bind(&v)
                        .execute(&pool)
                        .await?;
                    count.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            })
        })
        .collect();
    tokio::time::sleep_until(deadline.into()).await;
    let n = count.load(Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await??;
    }
    pool.close().await;
    Ok(n as f64 / elapsed)
}

async fn amqp_round_trips(
    url: &str,
    prefix: &str,
    concurrency: usize,
    secs: f64,
) -> Result<(f64, u64)> {
    // Like the engine: one connection publishes on a confirm-mode channel, another consumes.
    let publisher_conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .context("connecting to AMQP_URL")?;
    let consumer_conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let queue = format!("{prefix}.ceiling");
    let publisher = publisher_conn.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongLongInt(600_000));
    publisher
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let consumer_ch = consumer_conn.create_channel().await?;
    consumer_ch
        .basic_qos(
            concurrency.min(u16::MAX as usize) as u16,
            BasicQosOptions::default(),
        )
        .await?;
    let mut consumer = consumer_ch
        .basic_consume(
            queue.as_str().into(),
            "bench-ceiling".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let permits = Arc::new(Semaphore::new(concurrency));
    let consumed = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(AtomicBool::new(false));
    let counted = Arc::new(AtomicU64::new(0));
    let consume_task = {
        let permits = permits.clone();
        let consumed = consumed.clone();
        let counting = counting.clone();
        let counted = counted.clone();
        tokio::spawn(async move {
            while let Some(delivery) = consumer.next().await {
                let delivery = delivery?;
                delivery.acker.ack(BasicAckOptions::default()).await?;
                consumed.fetch_add(1, Ordering::Relaxed);
                if counting.load(Ordering::Relaxed) {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
                permits.add_permits(1);
            }
            anyhow::Ok(())
        })
    };

    let payload = vec![b'x'; 400]; // about the size of a command
    let warmup = Duration::from_secs_f64((secs / 5.0).min(1.0));
    let begin = Instant::now();
    let mut measure_start = None;
    let total = begin + warmup + Duration::from_secs_f64(secs);
    let mut published = 0u64;
    let mut confirms = futures_util::stream::FuturesUnordered::new();
    while Instant::now() < total {
        if measure_start.is_none() && begin.elapsed() >= warmup {
            counting.store(true, Ordering::Relaxed);
            measure_start = Some(Instant::now());
        }
        let permit = tokio::select! {
            p = permits.acquire() => p?,
            Some(c) = confirms.next(), if !confirms.is_empty() => {
                let c: Result<lapin::Confirmation, lapin::Error> = c;
                anyhow::ensure!(c?.is_ack(), "the broker nacked a ceiling message");
                continue;
            }
            () = tokio::time::sleep_until(total.into()) => break,
        };
        permit.forget();
        let confirm = publisher
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &payload,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        published += 1;
        confirms.push(confirm);
    }
    let n = counted.load(Ordering::Relaxed);
    let elapsed = measure_start
        .map(|s| s.elapsed().as_secs_f64())
        .unwrap_or(0.0);
    // Drain (bounded): every published message should come back.
    let drain = Instant::now() + Duration::from_secs(10);
    while let Some(c) = tokio::time::timeout_at(drain.into(), confirms.next())
        .await
        .ok()
        .flatten()
    {
        anyhow::ensure!(c?.is_ack(), "the broker nacked a ceiling message");
    }
    while consumed.load(Ordering::Relaxed) < published && Instant::now() < drain {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let unconsumed = published.saturating_sub(consumed.load(Ordering::Relaxed));
    let _ = publisher
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = publisher_conn.close(200, "done".into()).await;
    let _ = consumer_conn.close(200, "done".into()).await;
    consume_task.abort();
    anyhow::ensure!(elapsed > 0.0, "the AMQP ceiling measured nothing");
    Ok((n as f64 / elapsed, unconsumed))
}
