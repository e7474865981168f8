//! What each command does. Every command returns the exit code, or an error that means "could
//! not run" (exit 2).

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::Context;
use clap::CommandFactory;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};

use super::args::{
    ActionArgs, ApiArgs, Cli, DeadLetterArgs, Format, ListArgs, PruneArgs, ReconcileArgs,
    ReportFormat, SignalArgs,
};
use super::client::{Client, ClientError};
use super::output;
use super::{EXIT_FINDINGS, EXIT_OK};
use crate::definition::{Definition, Source};
use crate::document;
use crate::reconcile::{self, Options, ParticipantDb};
use std::path::Path;

/// Writes to stdout; a closed pipe (`| head`) is not an error worth a message.
fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing to stdout"),
    }
}

async fn connect(url: &str, what: &str) -> anyhow::Result<sqlx::PgPool> {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(sagas_participant::config::database_options(url)?)
        .await
        .with_context(|| format!("connecting to the {what} database"))
}

/// The options of a reconciliation as the command line gives them (participants connected).
pub async fn reconcile_options(args: &ReconcileArgs) -> anyhow::Result<Options> {
    let now = args.now.unwrap_or_else(chrono::Utc::now);
    let mut options = Options::new(now);
    options.since = args.since.map(|w| w.at(now));
    options.until = args.until.map(|w| w.at(now));
    if let (Some(s), Some(u)) = (options.since, options.until) {
        anyhow::ensure!(s < u, "--since must be before --until");
    }
    options.definition = args.definition.clone();
    options.stale_after = args.stale_after;
    options.outbox_threshold = args.outbox_threshold;
    options.overdue_grace = args.overdue_grace;
    options.batch_size = args.batch_size.max(1);
    for (name, url) in &args.participants {
        options.participants.push(ParticipantDb {
            name: name.clone(),
            pool: connect(url, &format!("participant {name}")).await?,
        });
    }
    Ok(options)
}

/// `sagactl reconcile`.
pub async fn reconcile(args: ReconcileArgs) -> anyhow::Result<u8> {
    let pool = connect(&args.database_url, "orchestrator").await?;
    let options = reconcile_options(&args).await?;
    let bar = progress_bar(
        "{spinner} reconciling [{bar:30}] {pos}/{len} instances, {per_sec}, eta {eta}",
        args.no_progress,
    );
    let report = reconcile::run(&pool, &options, |p| {
        bar.set_length(p.total);
        bar.set_position(p.done);
    })
    .await;
    bar.finish_and_clear();
    let report = report?;
    print(&match args.format {
        ReportFormat::Table => output::report_table(&report),
        ReportFormat::Json => output::report_json(&report),
        ReportFormat::Csv => output::report_csv(&report),
    })?;
    Ok(if report.is_consistent() {
        EXIT_OK
    } else {
        EXIT_FINDINGS
    })
}

/// Turns a refusal into exit code 1 with the server's message, other errors into "could not run".
fn refused(e: ClientError) -> anyhow::Result<u8> {
    match e {
        ClientError::Refused { .. } => {
            eprintln!("sagactl: {e}");
            Ok(EXIT_FINDINGS)
        }
        ClientError::Failed(_) => Err(e.into()),
    }
}

/// `sagactl list`.
pub async fn list(args: ListArgs) -> anyhow::Result<u8> {
    let client = Client::new(&args.api)?;
    let mut cursor = args.cursor.clone();
    let mut items: Vec<Value> = Vec::new();
    let mut next: Option<String>;
    loop {
        let mut query = vec![("limit", args.limit.to_string())];
        if let Some(s) = &args.status {
            query.push(("status", s.clone()));
        }
        if let Some(t) = &args.created_after {
            query.push(("created_after", t.clone()));
        }
        if let Some(t) = &args.created_before {
            query.push(("created_before", t.clone()));
        }
        if let Some(d) = &args.definition {
            query.push(("definition", d.clone()));
        }
        if let Some(c) = &cursor {
            query.push(("cursor", c.clone()));
        }
        let page = match client.get("/v1/sagas", &query).await {
            Ok(p) => p,
            Err(e) => return refused(e),
        };
        items.extend(page["items"].as_array().cloned().unwrap_or_default());
        next = page["next_cursor"].as_str().map(str::to_owned);
        if !args.all || next.is_none() {
            break;
        }
        cursor = next.clone();
    }
    let page = json!({ "items": items, "next_cursor": next });
    match args.format {
        Format::Json => print(&output::json(&page))?,
        Format::Table => {
            print(&output::saga_list(&page))?;
            if let Some(c) = &next {
                eprintln!("more: sagactl list --cursor {c} (or --all)");
            }
        }
    }
    Ok(EXIT_OK)
}

/// `sagactl show`.
pub async fn show(
    id: uuid::Uuid,
    api: ApiArgs,
    participants: Vec<(String, String)>,
    format: Format,
) -> anyhow::Result<u8> {
    let client = Client::new(&api)?;
    let saga = match client.get(&format!("/v1/sagas/{id}"), &[]).await {
        Ok(s) => s,
        Err(e) => return refused(e),
    };
    let events = match client.get(&format!("/v1/sagas/{id}/events"), &[]).await {
        Ok(e) => e,
        Err(e) => return refused(e),
    };
    let mut barriers = Vec::new();
    for (name, url) in &participants {
        let pool = connect(url, &format!("participant {name}")).await?;
        let rows = reconcile::barrier::rows(&pool, &[id])
            .await
            .with_context(|| format!("reading participant {name}'s barrier table"))?;
        pool.close().await;
        barriers.push((name.as_str(), rows));
    }
    match format {
        Format::Json => {
            let mut doc = json!({ "saga": saga, "events": events });
            if !barriers.is_empty() {
                let at: serde_json::Map<String, Value> = (barriers.iter())
                    .map(|(name, rows)| (name.to_string(), output::applied(&saga, name, rows)))
                    .collect();
                doc["participants"] = Value::Object(at);
            }
            print(&output::json(&doc))?
        }
        Format::Table => {
            let mut text = output::saga_detail(&saga, &events);
            for (name, rows) in &barriers {
                text.push('\n');
                text.push_str(&output::applied_table(&saga, name, rows));
            }
            print(&text)?
        }
    }
    Ok(EXIT_OK)
}

/// `sagactl stuck`.
pub async fn stuck(definition: Option<String>, api: ApiArgs, format: Format) -> anyhow::Result<u8> {
    let client = Client::new(&api)?;
    let query: Vec<(&str, String)> = definition.into_iter().map(|d| ("definition", d)).collect();
    let groups = match client.get("/v1/stuck", &query).await {
        Ok(g) => g,
        Err(e) => return refused(e),
    };
    match format {
        Format::Json => print(&output::json(&groups))?,
        Format::Table => print(&output::stuck_groups(&groups))?,
    }
    Ok(EXIT_OK)
}

/// `sagactl retry|abort|resolve`.
pub async fn act(action: &str, args: ActionArgs) -> anyhow::Result<u8> {
    let path = format!("/v1/sagas/{}/{action}", args.id);
    let body = json!({ "reason": args.reason });
    post_to_saga(&args.api, &path, &body, args.format, action).await
}

/// `sagactl signal`.
pub async fn signal(args: SignalArgs) -> anyhow::Result<u8> {
    let data = args.data.unwrap_or(Value::Null);
    let signal_id = args.signal_id.unwrap_or_else(|| {
        document::content_hash(&json!({"transaction": args.id, "signal": args.name, "data": data}))
    });
    let path = format!("/v1/sagas/{}/signals/{}", args.id, args.name);
    let body = json!({ "signal_id": signal_id, "data": data });
    let what = format!("signal {} ({signal_id})", args.name);
    post_to_saga(&args.api, &path, &body, args.format, &what).await
}

/// Posts `body` to `path`, a request answered with the transaction, and prints it (`json`) or
/// `what` and the transaction's new status (`table`).
async fn post_to_saga(
    api: &ApiArgs,
    path: &str,
    body: &Value,
    format: Format,
    what: &str,
) -> anyhow::Result<u8> {
    let client = Client::new(api)?;
    let saga = match client.post(path, body).await {
        Ok(s) => s,
        Err(e) => return refused(e),
    };
    match format {
        Format::Json => print(&output::json(&saga))?,
        Format::Table => print(&format!(
            "{what}: transaction {} is now {}\n",
            output_str(&saga["id"]),
            output_str(&saga["status"])
        ))?,
    }
    Ok(EXIT_OK)
}

fn output_str(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

/// `sagactl definitions`.
pub async fn definitions(api: ApiArgs, format: Format) -> anyhow::Result<u8> {
    get_and_print(api, "/v1/definitions", format, output::definitions).await
}

/// `sagactl participants`: each participant's circuit breaker and rate limit.
pub async fn participants(api: ApiArgs, format: Format) -> anyhow::Result<u8> {
    get_and_print(api, "/v1/participants", format, output::participants).await
}

/// `GET path`, printed as JSON or as `table` makes it.
async fn get_and_print(
    api: ApiArgs,
    path: &str,
    format: Format,
    table: fn(&Value) -> String,
) -> anyhow::Result<u8> {
    let client = Client::new(&api)?;
    let answer = match client.get(path, &[]).await {
        Ok(a) => a,
        Err(e) => return refused(e),
    };
    match format {
        Format::Json => print(&output::json(&answer))?,
        Format::Table => print(&table(&answer))?,
    }
    Ok(EXIT_OK)
}

/// The documents of `path` (a file or a directory) that compile, each with its file name and
/// its definition; those that do not are reported, and set `code` to 1.
fn documents(path: &Path, code: &mut u8) -> anyhow::Result<Vec<(String, Value, Definition)>> {
    let docs = document::read_path(path)?;
    if docs.is_empty() {
        anyhow::bail!("{}: no *.yaml, *.yml or *.json document", path.display());
    }
    let mut compiled = Vec::with_capacity(docs.len());
    for (file, doc) in docs {
        let file = file.display().to_string();
        match doc.and_then(|doc| document::compile(&doc).map(|def| (doc, def))) {
            Ok((doc, def)) => compiled.push((file, doc, def)),
            Err(e) => {
                eprintln!("{file}: {e}");
                *code = EXIT_FINDINGS;
            }
        }
    }
    Ok(compiled)
}

/// `sagactl definitions apply -f FILE|DIR`.
pub async fn definitions_apply(path: &Path, api: ApiArgs) -> anyhow::Result<u8> {
    let client = Client::new(&api)?;
    let mut code = EXIT_OK;
    for (file, doc, def) in documents(path, &mut code)? {
        let (name, version) = (def.name(), def.version());
        let put = format!("/v1/definitions/{name}/versions/{version}");
        match client.put(&put, &doc).await {
            Ok((status, _)) if status.as_u16() == 201 => {
                print(&format!("{file}: {name} v{version} registered\n"))?
            }
            Ok(_) => print(&format!("{file}: {name} v{version} unchanged\n"))?,
            Err(ClientError::Refused { message, .. }) => {
                eprintln!("{file}: {message}");
                code = EXIT_FINDINGS;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(code)
}

/// The plan of a definition the API shows, when it was registered as a document.
fn registered_plan(view: &Value) -> Option<Definition> {
    document::compile(view.get("document")?).ok()
}

/// `sagactl definitions diff -f FILE`.
pub async fn definitions_diff(path: &Path, api: ApiArgs) -> anyhow::Result<u8> {
    let client = Client::new(&api)?;
    let listed = client.get("/v1/definitions", &[]).await?;
    let items = listed["items"].as_array().cloned().unwrap_or_default();
    let mut code = EXIT_OK;
    for (file, _, def) in documents(path, &mut code)? {
        let (name, version) = (def.name(), def.version());
        let hash = match def.source() {
            Source::Document { hash, .. } => hash.clone(),
            Source::Code => String::new(),
        };
        let of = |v: u32| {
            items
                .iter()
                .find(|i| i["name"] == name && i["version"].as_u64() == Some(u64::from(v)))
        };
        let show = |v: u32| format!("/v1/definitions/{name}/versions/{v}");
        if let Some(same) = of(version) {
            if same["content_hash"].as_str() == Some(hash.as_str()) {
                print(&format!("{file}: {name} v{version} unchanged\n"))?;
                continue;
            }
            code = EXIT_FINDINGS;
            let registered = client.get(&show(version), &[]).await?;
            let differences = match registered_plan(&registered) {
                Some(theirs) => theirs.plan().differences(def.plan()),
                None => vec![format!("{name} v{version} is defined in code")],
            };
            let differences = if differences.is_empty() {
                vec![
                    "the same plan, another document (command templates or input schema)"
                        .to_owned(),
                ]
            } else {
                differences
            };
            print(&format!(
                "{file}: {name} v{version} would be refused, another one is registered under \
                 this version:\n{}",
                output::bullets(&differences)
            ))?;
            continue;
        }
        let newest = items
            .iter()
            .filter(|i| i["name"] == name)
            .filter_map(|i| i["version"].as_u64())
            .max();
        print(&format!(
            "{file}: {name} v{version} would be registered (new)\n"
        ))?;
        if let Some(newest) = newest.and_then(|v| u32::try_from(v).ok()) {
            let registered = client.get(&show(newest), &[]).await?;
            if let Some(theirs) = registered_plan(&registered) {
                let differences = theirs.plan().differences(def.plan());
                if !differences.is_empty() {
                    print(&format!(
                        "  against v{newest}:\n{}",
                        output::bullets(&differences)
                    ))?;
                }
            }
        }
    }
    Ok(code)
}

/// `sagactl definitions show NAME [--version V]`.
pub async fn definitions_show(
    name: &str,
    version: Option<u32>,
    api: ApiArgs,
    format: Format,
) -> anyhow::Result<u8> {
    let client = Client::new(&api)?;
    let version = match version {
        Some(v) => v,
        None => {
            let listed = client.get("/v1/definitions", &[]).await?;
            let newest = listed["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|i| i["name"] == name)
                .filter_map(|i| i["version"].as_u64())
                .max();
            match newest.and_then(|v| u32::try_from(v).ok()) {
                Some(v) => v,
                None => {
                    eprintln!("sagactl: no definition named {name} is registered");
                    return Ok(EXIT_FINDINGS);
                }
            }
        }
    };
    let view = match client
        .get(&format!("/v1/definitions/{name}/versions/{version}"), &[])
        .await
    {
        Ok(v) => v,
        Err(e) => return refused(e),
    };
    match format {
        Format::Json => print(&output::json(&view))?,
        Format::Table => print(&output::definition(&view))?,
    }
    Ok(EXIT_OK)
}

/// `sagactl dead-letters list`.
pub async fn dead_letters(limit: u32, api: ApiArgs, format: Format) -> anyhow::Result<u8> {
    let client = Client::new(&api)?;
    let page = match client
        .get("/v1/dead-letters", &[("limit", limit.to_string())])
        .await
    {
        Ok(p) => p,
        Err(e) => return refused(e),
    };
    match format {
        Format::Json => print(&output::json(&page))?,
        Format::Table => print(&output::dead_letters(&page))?,
    }
    Ok(EXIT_OK)
}

/// `sagactl dead-letters requeue|drop`.
pub async fn dead_letter_act(action: &str, args: DeadLetterArgs) -> anyhow::Result<u8> {
    let client = Client::new(&args.api)?;
    // The ids the API gives out need no escaping; any other is not one of them (404).
    let id: String = url_segment(&args.id);
    let path = format!("/v1/dead-letters/{id}/{action}");
    let letter = match client.post(&path, &json!({ "reason": args.reason })).await {
        Ok(l) => l,
        Err(e) => return refused(e),
    };
    match args.format {
        Format::Json => print(&output::json(&letter))?,
        Format::Table => print(&format!(
            "{action}: dead letter {} from {}\n",
            output_str(&letter["id"]),
            output_str(&letter["queue"])
        ))?,
    }
    Ok(EXIT_OK)
}

/// `text` as one path segment: every byte but unreserved ones percent-encoded.
fn url_segment(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A progress bar on stderr when it is a terminal and not turned off.
fn progress_bar(template: &str, hidden: bool) -> ProgressBar {
    if hidden || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar
}

/// `sagactl prune`.
pub async fn prune(args: PruneArgs) -> anyhow::Result<u8> {
    let pool = connect(&args.database_url, "orchestrator").await?;
    let store = crate::store::PgStore::new(pool);
    let before = chrono::Utc::now() - args.older_than;
    let due = store.count_prunable(before).await?;
    if args.dry_run {
        print(&format!(
            "{due} finished transaction(s) finished before {} would be deleted\n",
            before.to_rfc3339()
        ))?;
        return Ok(EXIT_OK);
    }
    let mut file = match &args.export {
        None => None,
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {} to export to", path.display()))?,
        ),
    };
    // Each batch is on disk before its delete commits.
    let mut write = |batch: &[String]| -> std::io::Result<()> {
        if let Some(file) = file.as_mut() {
            let mut lines = String::new();
            for document in batch {
                lines.push_str(document);
                lines.push('\n');
            }
            file.write_all(lines.as_bytes())?;
            file.sync_data()?;
        }
        Ok(())
    };
    let bar = progress_bar(
        "{spinner} pruning [{bar:30}] {pos}/{len} transactions, {per_sec}, eta {eta}",
        args.no_progress,
    );
    bar.set_length(due);
    let mut deleted = 0u64;
    let mut waited = false;
    loop {
        match store
            .prune_exporting(before, args.batch, Some(&mut write))
            .await
        {
            Ok(crate::store::Pruned::Deleted(n)) => {
                deleted += n;
                bar.set_position(deleted.min(due));
                if n < u64::from(args.batch) {
                    break;
                }
            }
            Ok(crate::store::Pruned::Busy) => {
                if !waited {
                    bar.suspend(|| eprintln!("sagactl: another process is pruning; waiting"));
                    waited = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                bar.finish_and_clear();
                return Err(e).context(format!("pruning (after deleting {deleted})"));
            }
        }
    }
    bar.finish_and_clear();
    let exported = match &args.export {
        Some(path) => format!(", exported to {}", path.display()),
        None => String::new(),
    };
    print(&format!(
        "deleted {deleted} transaction(s) finished before {}{exported}\n",
        before.to_rfc3339()
    ))?;
    Ok(EXIT_OK)
}

/// `sagactl migrate`.
pub async fn migrate(database_url: &str) -> anyhow::Result<u8> {
    let pool = connect(database_url, "orchestrator").await?;
    crate::store::PgStore::new(pool)
        .migrate()
        .await
        .context("applying migrations")?;
    print("migrations applied\n")?;
    Ok(EXIT_OK)
}

/// `sagactl completions SHELL`.
pub fn completions(shell: clap_complete::Shell) -> anyhow::Result<u8> {
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "sagactl", &mut buf);
    print(&String::from_utf8_lossy(&buf))?;
    Ok(EXIT_OK)
}
