//! The order saga demo: create order -> (reserve stock || charge payment) -> (commit stock ||
//! confirm order), each participant its own process.
//!
//! ```text
//! cargo run --example order_saga -- seed --sku widget --units 10
//! cargo run --example order_saga -- orders &
//! cargo run --example order_saga -- inventory &
//! cargo run --example order_saga -- payment &
//! cargo run --example order_saga -- orchestrator &
//! curl -s -XPOST localhost:8080/v1/sagas/order -H 'content-type: application/json' \
//!      -d '{"input": {"customer": "ada", "sku": "widget", "qty": 2, "amount": 1999}}'
//! cargo run --example order_saga -- audit
//! ```
//! Or start the saga in the shop's own transaction (transactional start): run the orders
//! participant with `SAGAS_RELAY_STARTS=1` and
//! `cargo run --example order_saga -- place --checkout c-1 --customer ada --sku widget --qty 2 --amount 1999`.
//! Add `"simulate": "fail"` (card declined) or `"simulate": "hang"` (the charge outlasts its
//! timeout) to the input to watch compensation.

mod shop;

use sagas::participant::config::database_options;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sagas::orchestrator::config::{Config, DEFAULT_DATABASE_URL};
use sagas::orchestrator::server;
use sagas::participant::Handler;
use sagas::participant::config::ParticipantConfig;
use sqlx::PgPool;

#[derive(Parser)]
#[command(name = "order_saga", about = "An order / inventory / payment saga")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the orchestrator (engine + HTTP API) with the `order` definition.
    /// Env: DATABASE_URL, AMQP_URL, SAGAS_BIND (default 127.0.0.1:8080), SAGAS_AMQP_PREFIX.
    Orchestrator,
    /// Runs the orders participant (env ORDERS_DATABASE_URL, AMQP_URL and the other participant
    /// variables of docs/operations.md; the same for the two below).
    Orders,
    /// Runs the inventory participant (env INVENTORY_DATABASE_URL).
    Inventory,
    /// Runs the payment participant (env PAYMENT_DATABASE_URL).
    Payment,
    /// Sets the stock of a SKU (and creates every participant's tables in its database).
    Seed {
        /// The SKU.
        #[arg(long, default_value = "widget")]
        sku: String,
        /// Units available.
        #[arg(long, default_value_t = 10)]
        units: i32,
    },
    /// Records a checkout in the orders database and starts its `order` saga in the same
    /// transaction (`start_in`); the orders participant with `SAGAS_RELAY_STARTS=1` delivers
    /// it. Env ORDERS_DATABASE_URL.
    Place {
        /// The checkout's id: also the start's idempotency key.
        #[arg(long)]
        checkout: String,
        /// Who orders.
        #[arg(long)]
        customer: String,
        /// What.
        #[arg(long, default_value = "widget")]
        sku: String,
        /// How many.
        #[arg(long, default_value_t = 1)]
        qty: i32,
        /// Price in cents.
        #[arg(long)]
        amount: i64,
        /// `fail` or `hang` (see the payment participant).
        #[arg(long)]
        simulate: Option<String>,
    },
    /// Checks that stock is conserved and every order is charged or refunded as it should be;
    /// exits non-zero on any problem. Run it when no order is in flight.
    Audit,
}

async fn pool(var: &str) -> anyhow::Result<PgPool> {
    let url = std::env::var(var).unwrap_or_else(|_| DEFAULT_DATABASE_URL.into());
    PgPool::connect_with(database_options(&url)?)
        .await
        .with_context(|| format!("connecting to {var}"))
}

async fn participant(name: &str, var: &str, handler: Arc<dyn Handler>) -> anyhow::Result<()> {
    let config =
        ParticipantConfig::from_env_with_database_var(name, var).unwrap_or_else(|e| e.exit());
    let pool = config.pool()?;
    config
        .set_up("creating the shop's tables", || shop::install(&pool))
        .await
        .with_context(|| format!("creating the shop's tables ({var})"))?;
    config
        .serve(pool, handler, server::wait_for_signal())
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    server::init_tracing();
    match Args::parse().command {
        Cmd::Orchestrator => {
            let config = Config::from_env().unwrap_or_else(|e| e.exit());
            server::serve(config, shop::registry()?, None).await?
        }
        Cmd::Orders => {
            participant(
                shop::ORDERS,
                "ORDERS_DATABASE_URL",
                Arc::new(shop::orders()),
            )
            .await?
        }
        Cmd::Inventory => {
            participant(
                shop::INVENTORY,
                "INVENTORY_DATABASE_URL",
                Arc::new(shop::inventory()),
            )
            .await?
        }
        Cmd::Payment => {
            participant(
                shop::PAYMENT,
                "PAYMENT_DATABASE_URL",
                Arc::new(shop::payment()),
            )
            .await?
        }
        Cmd::Seed { sku, units } => {
            for var in ["ORDERS_DATABASE_URL", "PAYMENT_DATABASE_URL"] {
                shop::install(&pool(var).await?).await?;
            }
            shop::seed(&pool("INVENTORY_DATABASE_URL").await?, &sku, units).await?;
            println!("{sku}: {units} units available");
        }
        Cmd::Place {
            checkout,
            customer,
            sku,
            qty,
            amount,
            simulate,
        } => {
            let pool = pool("ORDERS_DATABASE_URL").await?;
            shop::install(&pool).await?;
            sagas::participant::start::install(&pool).await?;
            let order = shop::Order {
                customer,
                sku,
                qty,
                amount,
                simulate,
            };
            let request = shop::place(&pool, &checkout, &order).await?;
            println!("checkout {checkout} recorded; start request {request} committed with it");
        }
        Cmd::Audit => {
            let a = shop::audit(
                &pool("ORDERS_DATABASE_URL").await?,
                &pool("INVENTORY_DATABASE_URL").await?,
                &pool("PAYMENT_DATABASE_URL").await?,
            )
            .await?;
            for (status, n) in &a.orders {
                println!("{status}: {n}");
            }
            if a.problems.is_empty() {
                println!(
                    "OK: stock conserved, every confirmed order charged, every cancelled order refunded"
                );
            } else {
                for p in &a.problems {
                    println!("PROBLEM: {p}");
                }
                std::process::exit(1);
            }
        }
    }
    server::shutdown_tracing();
    Ok(())
}
