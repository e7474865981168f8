//! The bank: two transfer definitions (TCC and saga), the accounts participant that serves
//! both, and the seed / close / audit tools. Shared by `main.rs` and the end-to-end tests.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use sagas::orchestrator::{Definition, Registry, RetryPolicy};
use sagas::participant::{Command, HandlerError, Router, Saga, SagaHandler, Tcc, TccHandler};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};

/// The input of both transfer definitions.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transfer {
    /// Account debited.
    pub from: String,
    /// Account credited.
    pub to: String,
    /// Amount in cents (positive).
    pub amount: i64,
}

/// The participant's name (its AMQP routing key).
pub const PARTICIPANT: &str = "accounts";

fn leg(account: &str, amount: i64) -> Value {
    json!({ "account": account, "amount": amount })
}

fn retry() -> RetryPolicy {
    RetryPolicy::exponential(5, Duration::from_millis(200), Duration::from_secs(2))
}

fn validate(t: &Transfer) -> Result<(), String> {
    if t.amount <= 0 {
        Err(format!("amount must be positive, got {}", t.amount))
    } else if t.from == t.to {
        Err("from and to must differ".to_owned())
    } else {
        Ok(())
    }
}

/// `transfer_tcc` and `transfer_saga`, version 1.
pub fn registry() -> anyhow::Result<Registry> {
    let tcc = Definition::tcc::<Transfer>("transfer_tcc", 1)
        .validate(validate)
        .step("debit", PARTICIPANT, |s| {
            s.command(|t, _| leg(&t.from, t.amount))
                .retry(retry())
                .timeout(Duration::from_secs(5))
        })
        .step("credit", PARTICIPANT, |s| {
            s.command(|t, _| leg(&t.to, t.amount))
                .retry(retry())
                .timeout(Duration::from_secs(5))
        })
        .build()?;
    let saga = Definition::saga::<Transfer>("transfer_saga", 1)
        .validate(validate)
        .step("debit", PARTICIPANT, |s| {
            s.command(|t, _| leg(&t.from, t.amount))
                .retry(retry())
                .timeout(Duration::from_secs(5))
        })
        .step("credit", PARTICIPANT, |s| {
            s.command(|t, _| leg(&t.to, t.amount))
                .retry(retry())
                .timeout(Duration::from_secs(5))
        })
        .build()?;
    Ok(Registry::new().with(tcc)?.with(saga)?)
}

#[derive(Deserialize)]
struct Leg {
    account: String,
    amount: i64,
}

fn leg_of(cmd: &Command) -> Result<Leg, HandlerError> {
    serde_json::from_value(cmd.payload.clone())
        .map_err(|e| HandlerError::business(format!("malformed command payload: {e}")))
}

/// The account row a command updates: its lock key, so that batches of commands lock accounts
/// in one order and never deadlock (`Handler::lock_key`).
fn account_of(cmd: &Command) -> Option<String> {
    leg_of(cmd).ok().map(|leg| leg.account)
}

/// Runs `sql` on one account row and fails for good if no row matched, with `why`.
async fn change(
    tx: &mut PgConnection,
    sql: &'static str,
    leg: &Leg,
    why: &str,
) -> Result<Value, HandlerError> {
    let row: Option<(i64,)> = sqlx::query_as(sql)
        .bind(&leg.account)
        .bind(leg.amount)
        .fetch_optional(&mut *tx)
        .await?;
    match row {
        Some((available,)) => Ok(json!({ "account": leg.account, "available": available })),
        None => Err(HandlerError::business(format!("{}: {why}", leg.account))),
    }
}

/// Test hook: a pause inside every handler, so that transactions are in flight for longer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Accounts {
    /// Pause inside each handler.
    pub delay: Duration,
}

impl Accounts {
    /// Applies `sql` to the account the command names, after the test pause.
    async fn apply(
        &self,
        tx: &mut PgConnection,
        cmd: &Command,
        sql: &'static str,
        why: &str,
    ) -> Result<Value, HandlerError> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        change(tx, sql, &leg_of(cmd)?, why).await
    }
}

const DEBIT: &str = "UPDATE bank_accounts SET available = available - $2
                     WHERE id = $1 AND available >= $2 RETURNING available";
const REFUND: &str = "UPDATE bank_accounts SET available = available + $2
                      WHERE id = $1 RETURNING available";
const CREDIT: &str = "UPDATE bank_accounts SET available = available + $2
                      WHERE id = $1 AND NOT closed RETURNING available";
const TAKE_BACK: &str = "UPDATE bank_accounts SET available = available - $2
                         WHERE id = $1 RETURNING available";
const FREEZE: &str = "UPDATE bank_accounts SET available = available - $2, frozen = frozen + $2
                      WHERE id = $1 AND available >= $2 RETURNING available";
const SPEND_FROZEN: &str = "UPDATE bank_accounts SET frozen = frozen - $2
                            WHERE id = $1 RETURNING available";
const UNFREEZE: &str = "UPDATE bank_accounts SET frozen = frozen - $2, available = available + $2
                        WHERE id = $1 RETURNING available";
const EXPECT: &str = "UPDATE bank_accounts SET pending = pending + $2
                      WHERE id = $1 AND NOT closed RETURNING available";
const RECEIVE: &str = "UPDATE bank_accounts SET pending = pending - $2, available = available + $2
                       WHERE id = $1 RETURNING available";
const FORGET: &str = "UPDATE bank_accounts SET pending = pending - $2
                      WHERE id = $1 RETURNING available";

struct SagaDebit(Accounts);
struct SagaCredit(Accounts);
struct TccDebit(Accounts);
struct TccCredit(Accounts);

#[async_trait]
impl SagaHandler for SagaDebit {
    async fn action(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        self.0
            .apply(tx, cmd, DEBIT, "insufficient funds or no such account")
            .await
    }
    async fn compensate(
        &self,
        cmd: &Command,
        tx: &mut PgConnection,
    ) -> Result<Value, HandlerError> {
        self.0.apply(tx, cmd, REFUND, "no such account").await
    }
    fn lock_key(&self, cmd: &Command) -> Option<String> {
        account_of(cmd)
    }
}

#[async_trait]
impl SagaHandler for SagaCredit {
    async fn action(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        self.0
            .apply(tx, cmd, CREDIT, "account closed or unknown")
            .await
    }
    async fn compensate(
        &self,
        cmd: &Command,
        tx: &mut PgConnection,
    ) -> Result<Value, HandlerError> {
        self.0.apply(tx, cmd, TAKE_BACK, "no such account").await
    }
    fn lock_key(&self, cmd: &Command) -> Option<String> {
        account_of(cmd)
    }
}

#[async_trait]
impl TccHandler for TccDebit {
    async fn try_(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        self.0
            .apply(tx, cmd, FREEZE, "insufficient funds or no such account")
            .await
    }
    async fn confirm(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        self.0.apply(tx, cmd, SPEND_FROZEN, "no such account").await
    }
    async fn cancel(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        self.0.apply(tx, cmd, UNFREEZE, "no such account").await
    }
    fn lock_key(&self, cmd: &Command) -> Option<String> {
        account_of(cmd)
    }
}

#[async_trait]
impl TccHandler for TccCredit {
    async fn try_(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        self.0
            .apply(tx, cmd, EXPECT, "account closed or unknown")
            .await
    }
    async fn confirm(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        self.0.apply(tx, cmd, RECEIVE, "no such account").await
    }
    async fn cancel(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        self.0.apply(tx, cmd, FORGET, "no such account").await
    }
    fn lock_key(&self, cmd: &Command) -> Option<String> {
        account_of(cmd)
    }
}

/// The accounts participant's handler: both definitions' steps.
pub fn handler(accounts: Accounts) -> Router {
    Router::new()
        .route_in("transfer_saga", "debit", Saga(SagaDebit(accounts)))
        .route_in("transfer_saga", "credit", Saga(SagaCredit(accounts)))
        .route_in("transfer_tcc", "debit", Tcc(TccDebit(accounts)))
        .route_in("transfer_tcc", "credit", Tcc(TccCredit(accounts)))
}

/// Creates the accounts schema (idempotent).
pub async fn install(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS bank_accounts (
             id        text    PRIMARY KEY,
             available bigint  NOT NULL CHECK (available >= 0),
             frozen    bigint  NOT NULL DEFAULT 0 CHECK (frozen >= 0),
             pending   bigint  NOT NULL DEFAULT 0 CHECK (pending >= 0),
             closed    boolean NOT NULL DEFAULT false
         );
         CREATE TABLE IF NOT EXISTS bank_seed (id int PRIMARY KEY CHECK (id = 1), total bigint NOT NULL);",
    )
    .execute(pool)
    .await
    .context("creating the accounts schema")?;
    sagas::participant::barrier::install(pool)
        .await
        .context("creating the barrier table")?;
    Ok(())
}

/// Replaces every account by `acct-1`..`acct-N` with `balance` each and records the total.
pub async fn seed(pool: &PgPool, accounts: u32, balance: i64) -> anyhow::Result<i64> {
    install(pool).await?;
    let mut tx = pool.begin().await?;
    sqlx::query("DELETE FROM bank_accounts")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO bank_accounts (id, available)
         SELECT 'acct-' || n, $2 FROM generate_series(1, $1) AS n",
    )
    .bind(accounts as i32)
    .bind(balance)
    .execute(&mut *tx)
    .await?;
    let total = i64::from(accounts) * balance;
    sqlx::query(
        "INSERT INTO bank_seed (id, total) VALUES (1, $1)
         ON CONFLICT (id) DO UPDATE SET total = EXCLUDED.total",
    )
    .bind(total)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(total)
}

/// Marks an account closed, so that credits to it fail.
pub async fn close(pool: &PgPool, account: &str) -> anyhow::Result<()> {
    let done = sqlx::query("UPDATE bank_accounts SET closed = true WHERE id = $1")
        .bind(account)
        .execute(pool)
        .await?;
    anyhow::ensure!(done.rows_affected() == 1, "no account {account}");
    Ok(())
}

/// What the audit found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Audit {
    /// Money seeded.
    pub seeded: i64,
    /// Sum of available balances.
    pub available: i64,
    /// Sum of frozen amounts (TCC debits tried, not yet confirmed or cancelled).
    pub frozen: i64,
    /// Sum of pending credits (TCC credits tried, not yet confirmed or cancelled).
    pub pending: i64,
    /// available + frozen + pending.
    pub total: i64,
}

impl Audit {
    /// True when the total equals what was seeded.
    pub fn holds(&self) -> bool {
        self.total == self.seeded
    }
}

/// Adds up all the money.
pub async fn audit(pool: &PgPool) -> anyhow::Result<Audit> {
    let (seeded,): (i64,) = sqlx::query_as("SELECT total FROM bank_seed WHERE id = 1")
        .fetch_one(pool)
        .await
        .context("no seed recorded: run `seed` first")?;
    let (available, frozen, pending): (i64, i64, i64) = sqlx::query_as(
        "SELECT COALESCE(SUM(available), 0)::bigint, COALESCE(SUM(frozen), 0)::bigint,
                COALESCE(SUM(pending), 0)::bigint FROM bank_accounts",
    )
    .fetch_one(pool)
    .await?;
    Ok(Audit {
        seeded,
        available,
        frozen,
        pending,
        total: available + frozen + pending,
    })
}

/// The accounts participant's handler, shared.
pub fn shared_handler(accounts: Accounts) -> Arc<Router> {
    Arc::new(handler(accounts))
}
