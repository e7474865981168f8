//! `sagactl`: operate and reconcile sagas from the command line.

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sagactl", version, about = "Operate and reconcile sagas")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Applies the orchestrator's database migrations.
    ///
    /// Example: `DATABASE_URL=postgres://postgres@127.0.0.1/sagas sagactl migrate`
    Migrate {
        /// The orchestrator database.
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Migrate { database_url } => {
            let pool = sqlx::PgPool::connect(&database_url)
                .await
                .context("connecting to DATABASE_URL")?;
            sagas_orchestrator::store::PgStore::new(pool)
                .migrate()
                .await
                .context("applying migrations")?;
            println!("migrations applied");
        }
    }
    Ok(())
}
