//! `sagactl`, the operator's command line: `args` (clap), `commands` (what each does),
//! `client` (the HTTP API), `output` (tables, JSON, CSV). The binary only calls [`main`].

pub mod args;
pub mod client;
pub mod commands;
pub mod output;

use clap::Parser;

use args::{Cli, Command, DeadLetterCommand, DefinitionsCommand};

/// Exit code: consistent / done.
pub const EXIT_OK: u8 = 0;
/// Exit code: findings (reconcile), or the server refused the request (other commands).
pub const EXIT_FINDINGS: u8 = 1;
/// Exit code: could not run; the reason is on stderr.
pub const EXIT_FAILED: u8 = 2;

/// Parses the command line, runs the command, and answers the process exit code.
pub async fn main() -> u8 {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Reconcile(a) => commands::reconcile(a).await,
        Command::List(a) => commands::list(a).await,
        Command::Show {
            id,
            api,
            participants,
            format,
        } => commands::show(id, api, participants, format).await,
        Command::Stuck {
            definition,
            api,
            format,
        } => commands::stuck(definition, api, format).await,
        Command::Retry(a) => commands::act("retry", a).await,
        Command::Abort(a) => commands::act("abort", a).await,
        Command::Resolve(a) => commands::act("resolve", a).await,
        Command::Signal(a) => commands::signal(a).await,
        Command::DeadLetters(DeadLetterCommand::List { limit, api, format }) => {
            commands::dead_letters(limit, api, format).await
        }
        Command::DeadLetters(DeadLetterCommand::Requeue(a)) => {
            commands::dead_letter_act("requeue", a).await
        }
        Command::DeadLetters(DeadLetterCommand::Drop(a)) => {
            commands::dead_letter_act("drop", a).await
        }
        Command::Definitions {
            action: None,
            api,
            format,
        } => commands::definitions(api, format).await,
        Command::Participants { api, format } => commands::participants(api, format).await,
        Command::Definitions {
            action: Some(DefinitionsCommand::Apply { path, api }),
            ..
        } => commands::definitions_apply(&path, api).await,
        Command::Definitions {
            action: Some(DefinitionsCommand::Diff { path, api }),
            ..
        } => commands::definitions_diff(&path, api).await,
        Command::Definitions {
            action:
                Some(DefinitionsCommand::Show {
                    name,
                    version,
                    api,
                    format,
                }),
            ..
        } => commands::definitions_show(&name, version, api, format).await,
        Command::Prune(a) => commands::prune(a).await,
        Command::Migrate { database_url } => commands::migrate(&database_url).await,
        Command::Completions { shell } => commands::completions(shell),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sagactl: {e:#}");
            EXIT_FAILED
        }
    }
}
