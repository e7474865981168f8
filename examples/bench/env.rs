//! Scratch databases (`sagas_bench_*`), connection URLs and database statistics.

use anyhow::{Context, Result};
use sagas::participant::config::database_options;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// Connection settings of the run.
#[derive(Debug, Clone)]
pub struct Urls {
    /// Admin database URL (`DATABASE_URL`); scratch databases are created through it.
    pub admin: String,
    /// Broker URL (`AMQP_URL`).
    pub amqp: String,
}

impl Urls {
    /// The URL of database `db` on the admin URL's server.
    pub fn database(&self, db: &str) -> String {
        let (base, query) = match self.admin.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (self.admin.as_str(), String::new()),
        };
        let server = base.rsplit_once('/').map(|(s, _)| s).unwrap_or(base);
        format!("{server}/{db}{query}")
    }

    /// One connection to the admin database.
    pub async fn admin_pool(&self) -> Result<PgPool> {
        PgPoolOptions::new()
            .max_connections(2)
            .connect_with(database_options(&self.admin)?)
            .await
            .context("connecting to DATABASE_URL")
    }
}

/// A scratch database, dropped by [`Scratch::drop_all`].
#[derive(Debug, Clone)]
pub struct Scratch {
    /// Database name.
    pub name: String,
    /// Its URL.
    pub url: String,
}

/// Creates database `name` (dropping a leftover of the same name first).
pub async fn create_db(urls: &Urls, name: &str) -> Result<Scratch> {
    let admin = urls.admin_pool().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&admin)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&admin)
        .await
        .with_context(|| format!("creating database {name}"))?;
    admin.close().await;
    Ok(Scratch {
        name: name.to_owned(),
        url: urls.database(name),
    })
}

/// Drops the scratch databases; errors are reported, not returned.
pub async fn drop_all(urls: &Urls, dbs: &[Scratch]) {
    let Ok(admin) = urls.admin_pool().await else {
        eprintln!("warning: cannot connect to drop the scratch databases");
        return;
    };
    for db in dbs {
        if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            db.name
        )))
        .execute(&admin)
        .await
        {
            eprintln!("warning: dropping {}: {e}", db.name);
        }
    }
    admin.close().await;
}

/// Committed transactions of a database so far (`pg_stat_database.xact_commit`). Backends
/// report their counts when they exit or, while connected, at most once a second, so read it
/// after the pools that matter are closed.
pub async fn xact_commit(admin: &PgPool, db: &str) -> Result<i64> {
    // A fresh snapshot of the statistics (the default `stats_fetch_consistency` caches them
    // for the transaction; each query here is its own transaction anyway).
    let (n,): (i64,) = sqlx::query_as(
        "SELECT coalesce((SELECT xact_commit FROM pg_stat_database WHERE datname = $1), 0)",
    )
    .bind(db)
    .fetch_one(admin)
    .await?;
    Ok(n)
}

/// Cluster-wide WAL counters (`pg_stat_wal`): `(records, bytes, syncs, full-page images)`.
pub async fn wal(admin: &PgPool) -> Result<(i64, i64, i64, i64)> {
    let row: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT wal_records::bigint, wal_bytes::bigint, wal_sync::bigint, wal_fpi::bigint
         FROM pg_stat_wal",
    )
    .fetch_one(admin)
    .await?;
    Ok(row)
}

/// Rows inserted, updated (HOT and not) and deleted per table of a database, from
/// `pg_stat_user_tables`, as `(table, ins, upd, hot_upd, del)`.
pub async fn table_writes(url: &str) -> Result<Vec<(String, i64, i64, i64, i64)>> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(database_options(url)?)
        .await?;
    let rows = sqlx::query_as(
        "SELECT relname::text, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del
         FROM pg_stat_user_tables ORDER BY relname",
    )
    .fetch_all(&pool)
    .await?;
    pool.close().await;
    Ok(rows)
}
