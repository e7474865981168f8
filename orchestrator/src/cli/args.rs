//! The command line: clap structs, with environment fallbacks, and the parsers of durations
//! and times.

use chrono::{Duration, NaiveDate, Utc};
use clap::{Args, Parser, Subcommand, ValueEnum};
use uuid::Uuid;

use crate::machine::Time;

const ABOUT: &str = "Operate and reconcile sagas.

`reconcile` reads the orchestrator's database directly and checks every transaction's log;
the other commands (except `migrate`) go through the HTTP API of a running sagad, so that every
operator action is authenticated and logged by the server with who and why.";

const EXAMPLES: &str = "Examples:
  sagactl reconcile --since 24h --participant accounts=postgres://127.0.0.1/accounts
  sagactl list --status stuck
  sagactl show 01890a5d-ac96-774b-bcce-b302099a8057
  sagactl retry 01890a5d-ac96-774b-bcce-b302099a8057 --reason 'ledger is back up'
  sagactl dead-letters list
  sagactl completions bash > /etc/bash_completion.d/sagactl";

/// `sagactl`: operate and reconcile sagas.
#[derive(Debug, Parser)]
#[command(name = "sagactl", version, about = "Operate and reconcile sagas", long_about = ABOUT, after_help = EXAMPLES)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check every transaction's log and report where it is inconsistent.
    ///
    /// Replays each log through the state machine and compares it with the stored projection,
    /// checks timers, stuck steps, the outbox and (with --participant) the participants'
    /// barrier tables. Exit 0 if consistent, 1 with findings, 2 if it could not run.
    #[command(after_help = "Examples:
  sagactl reconcile --since 24h
  sagactl reconcile --definition transfer_tcc --participant accounts=postgres://127.0.0.1/accounts
  sagactl reconcile --since 2026-11-01 --until 2026-11-02 --format csv > findings.csv")]
    Reconcile(ReconcileArgs),
    /// List transactions, newest first (through the HTTP API).
    #[command(after_help = "Examples:
  sagactl list --status stuck
  sagactl list --definition transfer_tcc --limit 20
  sagactl list --status compensating --all --format json")]
    List(ListArgs),
    /// Show one transaction with its steps, what is still in flight for it, and the timeline
    /// of its log; with --participant, which of its operations each participant applied.
    #[command(after_help = "Examples:
  sagactl show 01890a5d-ac96-774b-bcce-b302099a8057
  sagactl show 01890a5d-ac96-774b-bcce-b302099a8057 --participant accounts=postgres://127.0.0.1/accounts")]
    Show {
        /// The transaction id.
        id: Uuid,
        #[command(flatten)]
        api: ApiArgs,
        /// Read participant NAME's barrier table: NAME=POSTGRES_URL (repeatable).
        #[arg(long = "participant", value_name = "NAME=POSTGRES_URL", value_parser = parse_participant)]
        participants: Vec<(String, String)>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Stuck transactions grouped by definition, step, participant and reason, largest first.
    #[command(after_help = "Examples:
  sagactl stuck
  sagactl stuck --definition transfer_saga --format json")]
    Stuck {
        /// Only this definition.
        #[arg(long)]
        definition: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Send stuck or backing-off operations of a transaction again now, with a fresh budget.
    #[command(after_help = "Example:
  sagactl retry 01890a5d-ac96-774b-bcce-b302099a8057 --reason 'ledger service redeployed'")]
    Retry(ActionArgs),
    /// Compensate (or cancel) a transaction that is still in its forward phase.
    #[command(after_help = "Example:
  sagactl abort 01890a5d-ac96-774b-bcce-b302099a8057 --reason 'customer withdrew the order'")]
    Abort(ActionArgs),
    /// Mark a stuck transaction as resolved by hand (after fixing the participant's data).
    #[command(after_help = "Example:
  sagactl resolve 01890a5d-ac96-774b-bcce-b302099a8057 --reason 'refund booked manually, ticket OPS-42'")]
    Resolve(ActionArgs),
    /// Deliver a signal to the wait step of a transaction that waits for it.
    ///
    /// The data becomes the step's output. Without --id, the signal's id is derived from the
    /// transaction, the name and the data, so running the same command again changes nothing.
    #[command(after_help = "Example:
  sagactl signal 01890a5d-ac96-774b-bcce-b302099a8057 3ds --data '{\"authorized\": true}'")]
    Signal(SignalArgs),
    /// Show the messages in the dead-letter queue, and requeue or drop one (through the HTTP
    /// API).
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
    /// List the definitions (and versions) the orchestrator runs; register definition
    /// documents, see what registering one would change, show one.
    #[command(after_help = "Examples:
  sagactl definitions --format json
  sagactl definitions apply -f examples/definitions/
  sagactl definitions diff -f transfer.yaml
  sagactl definitions show transfer_saga --version 1")]
    Definitions {
        /// What to do (default: list).
        #[command(subcommand)]
        action: Option<DefinitionsCommand>,
        #[command(flatten)]
        api: ApiArgs,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Show each participant's circuit breaker (off, closed or open, since when, the next
    /// probe) and rate limit, as the orchestrator answering sees them.
    Participants {
        #[command(flatten)]
        api: ApiArgs,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Delete finished transactions older than a duration, with their logs, timers and outbox
    /// rows (as SAGAS_RETENTION does in every sagad), optionally exporting them first.
    ///
    /// Only completed, compensated and resolved transactions that finished before then are
    /// deleted, in batches (one transaction each); open ones never are. With --export, each
    /// batch is appended to FILE as JSON Lines (one transaction with its state and log per line)
    /// and synced to disk before its delete commits. Exit 0 when done, 2 if it could not run.
    #[command(after_help = "Examples:
  sagactl prune --older-than 30d --dry-run
  sagactl prune --older-than 90d --export /backup/sagas-2026-12.jsonl")]
    Prune(PruneArgs),
    /// Apply the orchestrator's database migrations.
    #[command(after_help = "Example:
  DATABASE_URL=postgres://postgres@127.0.0.1/sagas sagactl migrate")]
    Migrate {
        /// The orchestrator database.
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
    /// Print a shell completion script.
    #[command(after_help = "Example:
  sagactl completions bash > ~/.local/share/bash-completion/completions/sagactl")]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// `dead-letters …`.
#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// List the first messages of the dead-letter queue, oldest first, with their id, origin
    /// queue and reason; they stay in the queue.
    #[command(after_help = "Examples:
  sagactl dead-letters list
  sagactl dead-letters list --limit 5 --format json")]
    List {
        /// How many to show (1 to 500).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        api: ApiArgs,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Publish a dead letter again to the queue it came from, then remove it from the
    /// dead-letter queue.
    #[command(after_help = "Example:
  sagactl dead-letters requeue h3f2a9c0d1e2b4a67 --reason 'participant fixed, reply is valid now'")]
    Requeue(DeadLetterArgs),
    /// Remove a dead letter for good.
    #[command(after_help = "Example:
  sagactl dead-letters drop h3f2a9c0d1e2b4a67 --reason 'test message sent by hand'")]
    Drop(DeadLetterArgs),
}

/// `dead-letters requeue|drop`.
#[derive(Debug, Clone, Args)]
pub struct DeadLetterArgs {
    /// The dead letter's id, as listed.
    pub id: String,
    /// Why; logged by the server with who asked.
    #[arg(long)]
    pub reason: String,
    #[command(flatten)]
    pub api: ApiArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// `prune`.
#[derive(Debug, Clone, Args)]
pub struct PruneArgs {
    /// The orchestrator database.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// Delete what finished longer ago than this (`30d`, `12h`, `1d12h`).
    #[arg(long, value_parser = parse_duration)]
    pub older_than: Duration,
    /// Only count what would be deleted.
    #[arg(long, conflicts_with = "export")]
    pub dry_run: bool,
    /// Append what is deleted to this file first, as JSON Lines.
    #[arg(long, value_name = "FILE")]
    pub export: Option<std::path::PathBuf>,
    /// Transactions deleted per database transaction.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch: u32,
    /// No progress bar on stderr.
    #[arg(long)]
    pub no_progress: bool,
}

/// Where the HTTP API is and who is asking.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// Base URL of the orchestrator's HTTP API [default: `http://` and `SAGAS_BIND` when that
    /// is set, as for `sagad` (a wildcard host becomes loopback), else http://127.0.0.1:8080].
    #[arg(long, env = "SAGAS_URL")]
    pub url: Option<String>,
    /// Bearer token sent as `Authorization: Bearer <token>`.
    #[arg(long, env = "SAGAS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Who acts, sent as `X-Sagas-Actor` and recorded with operator actions (default: $USER).
    #[arg(long, env = "SAGAS_ACTOR")]
    pub actor: Option<String>,
}

/// `sagactl definitions …`.
#[derive(Debug, Subcommand)]
pub enum DefinitionsCommand {
    /// Register definition documents (YAML or JSON): FILE, or every *.yaml, *.yml and *.json
    /// of DIR. Exit 0 when every one is registered (or was, the same), 1 when one is refused.
    Apply {
        /// A document, or a directory of them.
        #[arg(short = 'f', long = "file", value_name = "FILE|DIR")]
        path: std::path::PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// What registering the document FILE would change: nothing (exit 0), a new version (exit
    /// 0, with what differs from the newest registered one), or a refusal (exit 1, with what
    /// differs from the one registered under its name and version).
    Diff {
        /// The document.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        path: std::path::PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one definition (its newest version unless --version names one), with its document.
    Show {
        /// The definition's name.
        name: String,
        /// Its version.
        #[arg(long)]
        version: Option<u32>,
        #[command(flatten)]
        api: ApiArgs,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

/// `retry`, `abort`, `resolve`.
#[derive(Debug, Clone, Args)]
pub struct ActionArgs {
    /// The transaction id.
    pub id: Uuid,
    /// Why; recorded in the transaction's log.
    #[arg(long)]
    pub reason: String,
    #[command(flatten)]
    pub api: ApiArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// `signal`.
#[derive(Debug, Clone, Args)]
pub struct SignalArgs {
    /// The transaction id.
    pub id: Uuid,
    /// The signal's name, as the wait step names it.
    pub name: String,
    /// The signal's data (JSON); null when left out.
    #[arg(long, value_parser = parse_json)]
    pub data: Option<serde_json::Value>,
    /// The signal's id (1 to 200 visible ASCII characters); by default derived from the
    /// transaction, the name and the data.
    #[arg(long = "id", value_name = "SIGNAL_ID")]
    pub signal_id: Option<String>,
    #[command(flatten)]
    pub api: ApiArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

fn parse_json(raw: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(raw).map_err(|e| format!("not JSON: {e}"))
}

/// `list`.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Only this status (running, compensating, stuck, completed, compensated, resolved).
    #[arg(long)]
    pub status: Option<String>,
    /// Only this definition.
    #[arg(long)]
    pub definition: Option<String>,
    /// Only transactions created at or after this RFC 3339 time.
    #[arg(long)]
    pub created_after: Option<String>,
    /// Only transactions created before this RFC 3339 time.
    #[arg(long)]
    pub created_before: Option<String>,
    /// Page size (1 to 500).
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Start after this cursor (printed at the end of the previous page).
    #[arg(long)]
    pub cursor: Option<String>,
    /// Follow the cursors to the last page.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub api: ApiArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// `reconcile`.
#[derive(Debug, Clone, Args)]
pub struct ReconcileArgs {
    /// The orchestrator database.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// Only instances created since then: a duration ago (`24h`, `7d`, `90m`) or a time
    /// (`2026-11-01`, RFC 3339). Open instances created earlier are always included.
    #[arg(long, value_parser = parse_when)]
    pub since: Option<When>,
    /// Only instances created before then (same forms as --since).
    #[arg(long, value_parser = parse_when)]
    pub until: Option<When>,
    /// Only instances of this definition (any version).
    #[arg(long)]
    pub definition: Option<String>,
    /// Instances have no deadline of their own yet: report a running or compensating one that
    /// has not changed for this long.
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    pub stale_after: Duration,
    /// Report outbox rows unpublished for longer than this.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub outbox_threshold: Duration,
    /// Report reply deadlines and retry times passed by more than this with nothing logged.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub overdue_grace: Duration,
    /// Cross-check a participant's barrier table: NAME=POSTGRES_URL (repeatable).
    #[arg(long = "participant", value_name = "NAME=POSTGRES_URL", value_parser = parse_participant)]
    pub participants: Vec<(String, String)>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
    /// Never draw a progress bar (it is drawn only when stderr is a terminal anyway).
    #[arg(long)]
    pub no_progress: bool,
    /// Instances read per batch.
    #[arg(long, default_value_t = 1_000, hide = true)]
    pub batch_size: u32,
    /// Make the report as of this time instead of now (RFC 3339), for reproducible reports.
    #[arg(long, value_parser = parse_time, hide = true)]
    pub now: Option<Time>,
}

/// Output of list/show/definitions and operator actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// JSON, as the API answers.
    Json,
}

/// Output of `reconcile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    /// Summary and findings as aligned columns.
    Table,
    /// The whole report as one JSON document.
    Json,
    /// The findings only, one per row, with a header.
    Csv,
}

/// A point in time given on the command line: absolute, or a duration before now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// This time.
    At(Time),
    /// This long before now.
    Ago(Duration),
}

impl When {
    /// The time it means at `now`.
    pub fn at(self, now: Time) -> Time {
        match self {
            When::At(t) => t,
            When::Ago(d) => now - d,
        }
    }
}

/// Parses `90s`, `15m`, `1h30m`, `7d`, `2w`, `500ms` (as `SAGAS_RETENTION`).
pub use crate::config::parse_duration;

/// Parses an RFC 3339 time or a date (midnight UTC).
pub fn parse_time(s: &str) -> Result<Time, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight").and_utc());
    }
    Err(format!(
        "{s:?} is not a time (examples: 2026-11-01, 2026-11-01T08:00:00Z)"
    ))
}

/// Parses a duration ago or a time.
pub fn parse_when(s: &str) -> Result<When, String> {
    parse_duration(s)
        .map(When::Ago)
        .or_else(|_| parse_time(s).map(When::At))
        .map_err(|_| {
            format!("{s:?} is neither a duration ago (24h, 7d) nor a time (2026-11-01, RFC 3339)")
        })
}

/// Parses `NAME=POSTGRES_URL`.
pub fn parse_participant(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, url)) if !name.is_empty() && !url.is_empty() => {
            Ok((name.to_owned(), url.to_owned()))
        }
        _ => Err(format!(
            "{s:?} is not NAME=POSTGRES_URL (example: accounts=postgres://127.0.0.1/accounts)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_times_and_participants_parse_and_garbage_is_refused_with_an_example() {
        assert_eq!(parse_duration("90s"), Ok(Duration::seconds(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::minutes(90)));
        assert_eq!(parse_duration("7d"), Ok(Duration::days(7)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::milliseconds(500)));
        for bad in ["", "h", "10", "10x", "1.5h", "-1h"] {
            assert!(parse_duration(bad).unwrap_err().contains("60s"), "{bad}");
        }
        assert_eq!(
            parse_time("2026-11-01").unwrap().to_rfc3339(),
            "2026-11-01T00:00:00+00:00"
        );
        assert_eq!(parse_when("24h"), Ok(When::Ago(Duration::hours(24))));
        assert!(matches!(
            parse_when("2026-11-01T08:00:00+01:00"),
            Ok(When::At(_))
        ));
        assert!(parse_when("yesterday").is_err());
        assert_eq!(
            parse_participant("accounts=postgres://x/y"),
            Ok(("accounts".into(), "postgres://x/y".into()))
        );
        assert!(parse_participant("accounts").is_err());
    }
}
