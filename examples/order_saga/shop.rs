//! The shop: an order saga across three participants (orders, inventory, payment) with two
//! steps in parallel, and the seed / audit tools. Shared by `main.rs` and the tests.
//!
//! ```text
//! create_order ──┬── reserve_stock ──┬── commit_stock
//!                └── charge_payment ─┴── confirm_order
//! ```
//! Compensation follows the reverse: refund and release (in parallel), then cancel the order.

use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use sagas::orchestrator::{Definition, Registry, RetryPolicy};
use sagas::participant::{Command, HandlerError, Router, Saga, SagaHandler};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};

/// The saga's input.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Order {
    /// Who orders.
    pub customer: String,
    /// What.
    pub sku: String,
    /// How many (positive).
    pub qty: i32,
    /// Price in cents (positive).
    pub amount: i64,
    /// Demo switch for the payment participant: `fail` declines the card, `hang` makes the
    /// charge outlast its timeout.
    #[serde(default)]
    pub simulate: Option<String>,
}

/// The participants' names.
pub const ORDERS: &str = "orders";
/// The inventory participant.
pub const INVENTORY: &str = "inventory";
/// The payment participant.
pub const PAYMENT: &str = "payment";

/// How long the payment participant hangs when told to.
pub const HANG: Duration = Duration::from_secs(3);

fn validate(o: &Order) -> Result<(), String> {
    if o.qty <= 0 || o.amount <= 0 {
        return Err("qty and amount must be positive".into());
    }
    match o.simulate.as_deref() {
        None | Some("fail") | Some("hang") => Ok(()),
        Some(other) => Err(format!("simulate must be fail or hang, not {other:?}")),
    }
}

/// `order` version 1.
pub fn registry() -> anyhow::Result<Registry> {
    let quick = RetryPolicy::exponential(3, Duration::from_millis(100), Duration::from_secs(1));
    let order = Definition::saga::<Order>("order", 1)
        .validate(validate)
        .step("create_order", ORDERS, |s| {
            s.command(|o, _| json!({"customer": o.customer, "sku": o.sku, "qty": o.qty, "amount": o.amount}))
                .retry(quick)
        })
        .step("reserve_stock", INVENTORY, |s| {
            s.command(|o, _| json!({"sku": o.sku, "qty": o.qty}))
                .after(["create_order"])
                .retry(quick)
        })
        .step("charge_payment", PAYMENT, |s| {
            s.command(|o, _| json!({"amount": o.amount, "simulate": o.simulate}))
                .after(["create_order"])
                .timeout(Duration::from_secs(1))
                .retry(RetryPolicy::exponential(
                    2,
                    Duration::from_millis(100),
                    Duration::from_millis(200),
                ))
        })
        .step("commit_stock", INVENTORY, |s| {
            s.command(|o, _| json!({"sku": o.sku, "qty": o.qty}))
                .after(["reserve_stock", "charge_payment"])
                .retry(quick)
        })
        .step("confirm_order", ORDERS, |s| {
            s.command(|_, _| json!({}))
                .after(["reserve_stock", "charge_payment"])
                .retry(quick)
        })
        .build()?;
    Ok(Registry::new().with(order)?)
}

#[derive(Deserialize)]
struct Stock {
    sku: String,
    qty: i32,
}

fn payload<T: for<'de> Deserialize<'de>>(cmd: &Command) -> Result<T, HandlerError> {
    serde_json::from_value(cmd.payload.clone())
        .map_err(|e| HandlerError::business(format!("malformed command payload: {e}")))
}

async fn set_order_status(
    tx: &mut PgConnection,
    cmd: &Command,
    from: &str,
    to: &str,
) -> Result<Value, HandlerError> {
    let done = sqlx::query("UPDATE shop_orders SET status = $3 WHERE id = $1 AND status = $2")
        .bind(cmd.transaction_id)
        .bind(from)
        .bind(to)
        .execute(&mut *tx)
        .await?;
    if done.rows_affected() == 1 {
        Ok(json!({"status": to}))
    } else {
        Err(HandlerError::business(format!(
            "order {} is not {from}",
            cmd.transaction_id
        )))
    }
}

struct CreateOrder;
struct ConfirmOrder;

#[async_trait]
impl SagaHandler for CreateOrder {
    async fn action(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        #[derive(Deserialize)]
        struct New {
            customer: String,
            sku: String,
            qty: i32,
            amount: i64,
        }
        let o: New = payload(cmd)?;
        sqlx::query(
            "INSERT INTO shop_orders (id, customer, sku, qty, amount, status)
             VALUES ($1, $2, $3, $4, $5, 'pending')",
        )
        .bind(cmd.transaction_id)
        .bind(&o.customer)
        .bind(&o.sku)
        .bind(o.qty)
        .bind(o.amount)
        .execute(&mut *tx)
        .await?;
        Ok(json!({"order": cmd.transaction_id}))
    }
    async fn compensate(
        &self,
        cmd: &Command,
        tx: &mut PgConnection,
    ) -> Result<Value, HandlerError> {
        set_order_status(tx, cmd, "pending", "cancelled").await
    }
}

#[async_trait]
impl SagaHandler for ConfirmOrder {
    async fn action(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        set_order_status(tx, cmd, "pending", "confirmed").await
    }
    async fn compensate(
        &self,
        cmd: &Command,
        tx: &mut PgConnection,
    ) -> Result<Value, HandlerError> {
        set_order_status(tx, cmd, "confirmed", "pending").await
    }
}

/// How many times a reservation re-reads the stock row after losing an optimistic-lock race.
pub const STOCK_ATTEMPTS: u32 = 3;

/// Moves `qty` of `sku` between two stock columns with an optimistic lock on `version`.
async fn move_stock(
    tx: &mut PgConnection,
    stock: &Stock,
    from: &'static str,
    to: &'static str,
) -> Result<Value, HandlerError> {
    for _ in 0..STOCK_ATTEMPTS {
        let row: Option<(i32, i32, i32, i32, i64)> = sqlx::query_as(
            "SELECT available, reserved, sold, 0, version FROM shop_stock WHERE sku = $1",
        )
        .bind(&stock.sku)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((available, reserved, sold, _, version)) = row else {
            return Err(HandlerError::business(format!("unknown sku {}", stock.sku)));
        };
        let have = match from {
            "available" => available,
            "reserved" => reserved,
            _ => sold,
        };
        if have < stock.qty {
            return Err(HandlerError::business(format!(
                "out of stock: {} has {have} {from}, {} wanted",
                stock.sku, stock.qty
            )));
        }
        // Column names come from this file's constants, never from input.
        let sql = match (from, to) {
            ("available", "reserved") => {
                "UPDATE shop_stock SET available = available - $2, reserved = reserved + $2, version = version + 1 WHERE sku = $1 AND version = $3"
            }
            ("reserved", "available") => {
                "UPDATE shop_stock SET reserved = reserved - $2, available = available + $2, version = version + 1 WHERE sku = $1 AND version = $3"
            }
            ("reserved", "sold") => {
                "UPDATE shop_stock SET reserved = reserved - $2, sold = sold + $2, version = version + 1 WHERE sku = $1 AND version = $3"
            }
            ("sold", "reserved") => {
                "UPDATE shop_stock SET sold = sold - $2, reserved = reserved + $2, version = version + 1 WHERE sku = $1 AND version = $3"
            }
            _ => return Err(HandlerError::business("unsupported stock move")),
        };
        let done = sqlx::query(sql)
            .bind(&stock.sku)
            .bind(stock.qty)
            .bind(version)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 1 {
            return Ok(json!({"sku": stock.sku, "qty": stock.qty, "version": version + 1}));
        }
    }
    // Lost the race every time: let the orchestrator retry the step later.
    Err(HandlerError::transient(format!(
        "stock row {} kept changing ({STOCK_ATTEMPTS} attempts)",
        stock.sku
    )))
}

struct ReserveStock;
struct CommitStock;

/// The stock row a command moves units of: its lock key, so that batches of commands lock
/// SKUs in one order and never deadlock (`Handler::lock_key`).
fn sku_of(cmd: &Command) -> Option<String> {
    payload::<Stock>(cmd).ok().map(|stock| stock.sku)
}

#[async_trait]
impl SagaHandler for ReserveStock {
    async fn action(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        move_stock(tx, &payload(cmd)?, "available", "reserved").await
    }
    async fn compensate(
        &self,
        cmd: &Command,
        tx: &mut PgConnection,
    ) -> Result<Value, HandlerError> {
        move_stock(tx, &payload(cmd)?, "reserved", "available").await
    }
    fn lock_key(&self, cmd: &Command) -> Option<String> {
        sku_of(cmd)
    }
}

#[async_trait]
impl SagaHandler for CommitStock {
    async fn action(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        move_stock(tx, &payload(cmd)?, "reserved", "sold").await
    }
    async fn compensate(
        &self,
        cmd: &Command,
        tx: &mut PgConnection,
    ) -> Result<Value, HandlerError> {
        move_stock(tx, &payload(cmd)?, "sold", "reserved").await
    }
    fn lock_key(&self, cmd: &Command) -> Option<String> {
        sku_of(cmd)
    }
}

struct ChargePayment;

#[async_trait]
impl SagaHandler for ChargePayment {
    async fn action(&self, cmd: &Command, tx: &mut PgConnection) -> Result<Value, HandlerError> {
        #[derive(Deserialize)]
        struct Charge {
            amount: i64,
            simulate: Option<String>,
        }
        let c: Charge = payload(cmd)?;
        match c.simulate.as_deref() {
            Some("fail") => return Err(HandlerError::business("card declined")),
            Some("hang") => tokio::time::sleep(HANG).await,
            _ => {}
        }
        sqlx::query(
            "INSERT INTO shop_payments (order_id, amount, status) VALUES ($1, $2, 'charged')",
        )
        .bind(cmd.transaction_id)
        .bind(c.amount)
        .execute(&mut *tx)
        .await?;
        Ok(json!({"charged": c.amount}))
    }
    async fn compensate(
        &self,
        cmd: &Command,
        tx: &mut PgConnection,
    ) -> Result<Value, HandlerError> {
        let done = sqlx::query(
            "UPDATE shop_payments SET status = 'refunded' WHERE order_id = $1 AND status = 'charged'",
        )
        .bind(cmd.transaction_id)
        .execute(&mut *tx)
        .await?;
        Ok(json!({"refunded": done.rows_affected() == 1}))
    }
}

/// The orders participant's handler.
pub fn orders() -> Router {
    Router::new()
        .route("create_order", Saga(CreateOrder))
        .route("confirm_order", Saga(ConfirmOrder))
}

/// The inventory participant's handler.
pub fn inventory() -> Router {
    Router::new()
        .route("reserve_stock", Saga(ReserveStock))
        .route("commit_stock", Saga(CommitStock))
}

/// The payment participant's handler.
pub fn payment() -> Router {
    Router::new().route("charge_payment", Saga(ChargePayment))
}

/// Creates the shop's tables (idempotent) and the barrier table.
pub async fn install(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS shop_orders (
             id uuid PRIMARY KEY, customer text NOT NULL, sku text NOT NULL, qty int NOT NULL,
             amount bigint NOT NULL,
             status text NOT NULL CHECK (status IN ('pending', 'confirmed', 'cancelled')));
         CREATE TABLE IF NOT EXISTS shop_stock (
             sku text PRIMARY KEY,
             available int NOT NULL CHECK (available >= 0),
             reserved int NOT NULL DEFAULT 0 CHECK (reserved >= 0),
             sold int NOT NULL DEFAULT 0 CHECK (sold >= 0),
             version bigint NOT NULL DEFAULT 0);
         CREATE TABLE IF NOT EXISTS shop_stock_seed (sku text PRIMARY KEY, units int NOT NULL);
         CREATE TABLE IF NOT EXISTS shop_checkouts (
             id text PRIMARY KEY, customer text NOT NULL, amount bigint NOT NULL,
             placed_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE IF NOT EXISTS shop_payments (
             order_id uuid PRIMARY KEY, amount bigint NOT NULL,
             status text NOT NULL CHECK (status IN ('charged', 'refunded')));",
    )
    .execute(pool)
    .await
    .context("creating the shop schema")?;
    sagas::participant::barrier::install(pool)
        .await
        .context("creating the barrier table")?;
    Ok(())
}

/// A checkout: the shop's own row and the start of its `order` saga, in one transaction of
/// the orders database (`start_in`): both are committed, or neither. The orders participant
/// run with `SAGAS_RELAY_STARTS=1` delivers the start. Returns the start request's id.
pub async fn place(pool: &PgPool, checkout: &str, order: &Order) -> anyhow::Result<uuid::Uuid> {
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO shop_checkouts (id, customer, amount) VALUES ($1, $2, $3)")
        .bind(checkout)
        .bind(&order.customer)
        .bind(order.amount)
        .execute(&mut *tx)
        .await
        .context("recording the checkout")?;
    let request = sagas::participant::start_in(&mut tx, "order", order, Some(checkout)).await?;
    tx.commit().await?;
    Ok(request)
}

/// Sets the stock of `sku` to `units` available (and records it for the audit).
pub async fn seed(pool: &PgPool, sku: &str, units: i32) -> anyhow::Result<()> {
    install(pool).await?;
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO shop_stock (sku, available) VALUES ($1, $2)
         ON CONFLICT (sku) DO UPDATE SET available = $2, reserved = 0, sold = 0, version = 0",
    )
    .bind(sku)
    .bind(units)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO shop_stock_seed (sku, units) VALUES ($1, $2)
         ON CONFLICT (sku) DO UPDATE SET units = $2",
    )
    .bind(sku)
    .bind(units)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// What the audit found; `problems` is empty when the books agree.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Audit {
    /// Orders by status.
    pub orders: Vec<(String, i64)>,
    /// Every inconsistency, one sentence each.
    pub problems: Vec<String>,
}

/// Checks that stock is conserved, sold stock matches confirmed orders, every confirmed order
/// is charged and every cancelled order refunded or never charged. Run it when no order is in
/// flight. `orders`, `inventory` and `payment` are the participants' databases (may be one).
pub async fn audit(orders: &PgPool, inventory: &PgPool, payment: &PgPool) -> anyhow::Result<Audit> {
    let mut audit = Audit {
        orders: sqlx::query_as(
            "SELECT status, count(*) FROM shop_orders GROUP BY status ORDER BY status",
        )
        .fetch_all(orders)
        .await?,
        ..Audit::default()
    };
    let stock: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT s.sku, s.available::bigint, s.reserved::bigint, s.sold::bigint, seed.units::bigint
         FROM shop_stock s JOIN shop_stock_seed seed USING (sku)",
    )
    .fetch_all(inventory)
    .await?;
    let confirmed: Vec<(uuid::Uuid, String, i64, i64)> = sqlx::query_as(
        "SELECT id, sku, qty::bigint, amount FROM shop_orders WHERE status = 'confirmed'",
    )
    .fetch_all(orders)
    .await?;
    let pending: (i64,) =
        sqlx::query_as("SELECT count(*) FROM shop_orders WHERE status = 'pending'")
            .fetch_one(orders)
            .await?;
    if pending.0 > 0 {
        audit
            .problems
            .push(format!("{} orders are still pending", pending.0));
    }
    for (sku, available, reserved, sold, units) in &stock {
        if available + reserved + sold != *units {
            audit.problems.push(format!(
                "{sku}: available {available} + reserved {reserved} + sold {sold} != seeded {units}"
            ));
        }
        if *reserved != 0 {
            audit
                .problems
                .push(format!("{sku}: {reserved} units still reserved"));
        }
        let sold_by_orders: i64 = confirmed.iter().filter(|o| &o.1 == sku).map(|o| o.2).sum();
        if *sold != sold_by_orders {
            audit.problems.push(format!(
                "{sku}: {sold} units sold but confirmed orders account for {sold_by_orders}"
            ));
        }
    }
    let payments: Vec<(uuid::Uuid, i64, String)> =
        sqlx::query_as("SELECT order_id, amount, status FROM shop_payments")
            .fetch_all(payment)
            .await?;
    for (id, _, _, amount) in &confirmed {
        match payments.iter().find(|p| p.0 == *id) {
            Some((_, charged, status)) if status == "charged" && charged == amount => {}
            other => audit.problems.push(format!(
                "confirmed order {id} is not charged {amount}: {other:?}"
            )),
        }
    }
    let cancelled: Vec<(uuid::Uuid,)> =
        sqlx::query_as("SELECT id FROM shop_orders WHERE status = 'cancelled'")
            .fetch_all(orders)
            .await?;
    for (id,) in &cancelled {
        if let Some((_, _, status)) = payments.iter().find(|p| p.0 == *id)
            && status != "refunded"
        {
            audit
                .problems
                .push(format!("cancelled order {id} was charged and not refunded"));
        }
    }
    Ok(audit)
}
