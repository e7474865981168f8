//! The bank transfer demo: an orchestrator with two transfer definitions (TCC and saga), the
//! accounts participant, and one-shot tools to seed, close accounts and audit the books.
//!
//! ```text
//! cargo run --example bank_transfer -- seed --accounts 10 --balance 10000
//! cargo run --example bank_transfer -- accounts &
//! cargo run --example bank_transfer -- orchestrator &
//! curl -s -XPOST localhost:8080/v1/sagas/transfer_tcc -H 'content-type: application/json' \
//!      -d '{"input": {"from": "acct-1", "to": "acct-2", "amount": 250}}'
//! cargo run --example bank_transfer -- audit
//! ```

mod bank;

use sagas::participant::config::database_options;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sagas::orchestrator::config::{Config, DEFAULT_DATABASE_URL};
use sagas::orchestrator::server;
use sagas::participant::config::ParticipantConfig;
use sqlx::PgPool;

#[derive(Parser)]
#[command(
    name = "bank_transfer",
    about = "Money transfers with sagas (TCC and saga)"
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the orchestrator (engine + HTTP API) with `transfer_tcc` and `transfer_saga`.
    /// Env: DATABASE_URL, AMQP_URL, SAGAS_BIND (default 127.0.0.1:8080), SAGAS_AMQP_PREFIX.
    Orchestrator,
    /// Runs the accounts participant. Env: ACCOUNTS_DATABASE_URL, AMQP_URL, SAGAS_AMQP_PREFIX and
    /// the other participant variables (docs/operations.md).
    Accounts {
        /// Pause inside every handler, in milliseconds (to watch transfers in flight).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// Creates accounts acct-1..acct-N with the same balance (cents), replacing existing ones.
    Seed {
        /// How many accounts.
        #[arg(long, default_value_t = 10)]
        accounts: u32,
        /// Balance of each, in cents.
        #[arg(long, default_value_t = 10_000)]
        balance: i64,
    },
    /// Marks an account closed: credits to it fail as a business failure.
    Close {
        /// The account id, e.g. acct-3.
        #[arg(long)]
        account: String,
    },
    /// Prints the total of all money and exits non-zero if it differs from what was seeded.
    Audit,
}

async fn accounts_pool() -> anyhow::Result<PgPool> {
    let url =
        std::env::var("ACCOUNTS_DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.into());
    PgPool::connect_with(database_options(&url)?)
        .await
        .with_context(|| "connecting to the accounts database (ACCOUNTS_DATABASE_URL)")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    server::init_tracing();
    match Args::parse().command {
        Cmd::Orchestrator => {
            let config = Config::from_env().unwrap_or_else(|e| e.exit());
            server::serve(config, bank::registry()?, None).await?
        }
        Cmd::Accounts { delay_ms } => {
            let config = ParticipantConfig::from_env_with_database_var(
                bank::PARTICIPANT,
                "ACCOUNTS_DATABASE_URL",
            )
            .unwrap_or_else(|e| e.exit());
            let pool = config.pool()?;
            config
                .set_up("creating the accounts tables", || bank::install(&pool))
                .await
                .context("creating the accounts tables (ACCOUNTS_DATABASE_URL)")?;
            let handler = bank::shared_handler(bank::Accounts {
                delay: Duration::from_millis(delay_ms),
            });
            config
                .serve(pool, handler, server::wait_for_signal())
                .await?;
        }
        Cmd::Seed { accounts, balance } => {
            let total = bank::seed(&accounts_pool().await?, accounts, balance).await?;
            println!("seeded {accounts} accounts with {balance} each; total {total}");
        }
        Cmd::Close { account } => {
            bank::close(&accounts_pool().await?, &account).await?;
            println!("closed {account}");
        }
        Cmd::Audit => {
            let a = bank::audit(&accounts_pool().await?).await?;
            println!(
                "seeded {} | available {} + frozen {} + pending {} = total {} | {}",
                a.seeded,
                a.available,
                a.frozen,
                a.pending,
                a.total,
                if a.holds() { "OK" } else { "MISMATCH" }
            );
            if !a.holds() {
                std::process::exit(1);
            }
        }
    }
    server::shutdown_tracing();
    Ok(())
}
