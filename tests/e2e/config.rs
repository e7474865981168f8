//! `sagad`'s configuration: `--help` and `--version`, malformed variables, `check-config`
//! against the local services and unreachable ones, and the tokens file. Each test runs the
//! built binary with an environment of its own (nothing inherited).

use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::process::Command;

use crate::helpers::{self, TestEnv, amqp_url};

/// The longest any run of `sagad` here may take before it is killed and the test fails.
const BOUND: Duration = Duration::from_secs(30);

/// `sagad` with `args` and only the variables `vars` (and `RUST_LOG`).
fn sagad(args: &[&str], vars: &[(&str, &str)]) -> Result<Command> {
    let mut cmd = Command::new(helpers::built_binary("sagad")?);
    cmd.args(args)
        .env_clear()
        .env("RUST_LOG", "warn")
        .envs(vars.iter().copied())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    Ok(cmd)
}

/// Runs it to completion within [`BOUND`].
async fn run(args: &[&str], vars: &[(&str, &str)]) -> Result<Output> {
    tokio::time::timeout(BOUND, sagad(args, vars)?.output())
        .await
        .with_context(|| format!("sagad {args:?} still running after {BOUND:?}"))?
        .context("running sagad")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A local port nothing listens on.
fn closed_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[tokio::test]
async fn help_and_version_print_and_exit_zero_without_reading_the_environment_or_serving()
-> Result<()> {
    // Malformed variables and unreachable services: a run that read or served would fail.
    let port = closed_port()?;
    let db = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let vars = [("SAGAS_DB_POOL", "lots"), ("DATABASE_URL", db.as_str())];
    for args in [&["--help"][..], &["help"], &["check-config", "--help"]] {
        let out = run(args, &vars).await?;
        assert!(out.status.success(), "{args:?}: {out:?}");
        let help = text(&out.stdout);
        assert!(help.contains("check-config"), "{args:?}: {help}");
    }
    let help = text(&run(&["--help"], &vars).await?.stdout);
    for var in [
        "DATABASE_URL",
        "AMQP_URL",
        "SAGAS_API_TOKENS_FILE",
        "docs/operations.md",
    ] {
        assert!(help.contains(var), "{var} missing from {help}");
    }
    let out = run(&["--version"], &vars).await?;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        text(&out.stdout).trim(),
        format!("sagad {}", env!("CARGO_PKG_VERSION"))
    );
    Ok(())
}

#[tokio::test]
async fn malformed_variables_stop_sagad_with_exit_code_2_naming_every_one() -> Result<()> {
    let vars = [
        ("SAGAS_DB_POOL", "lots"),
        ("SAGAS_QUORUM_QUEUES", "maybe"),
        ("SAGAS_QUEUE_EXPIRES_MS", "10m"),
        ("SAGAS_API_TOKENS", "admin:ssssssssssssssss"),
    ];
    for args in [&[][..], &["serve"], &["check-config"]] {
        let started = Instant::now();
        let out = run(args, &vars).await?;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = text(&out.stderr);
        for (var, _) in vars {
            assert!(err.contains(var), "{args:?}: {var} missing from {err}");
        }
        assert!(!err.contains("ssssssss"), "a token quoted: {err}");
        // Refused before connecting to anything.
        assert!(started.elapsed() < Duration::from_secs(10), "{args:?}");
    }
    Ok(())
}

#[tokio::test]
async fn check_config_passes_against_the_local_services() -> Result<()> {
    let (db, mq) = (sagas_test_support::admin_url(), amqp_url());
    let out = run(
        &["check-config"],
        &[("DATABASE_URL", db.as_str()), ("AMQP_URL", mq.as_str())],
    )
    .await?;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "environment: ok",
            "postgresql (DATABASE_URL): ok",
            "rabbitmq (AMQP_URL): ok"
        ],
        "{stdout}"
    );
    Ok(())
}

#[tokio::test]
async fn check_config_names_an_unreachable_broker_and_database_and_fails() -> Result<()> {
    let db = sagas_test_support::admin_url();
    let closed = format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed_port()?);
    let out = run(
        &["check-config"],
        &[("DATABASE_URL", db.as_str()), ("AMQP_URL", closed.as_str())],
    )
    .await?;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stdout.contains("postgresql (DATABASE_URL): ok"), "{stdout}");
    assert!(stdout.contains("rabbitmq (AMQP_URL): error"), "{stdout}");
    assert!(!stdout.contains("guest:guest"), "{stdout}");

    let closed_db = format!(
        "postgres://postgres:pw-secret@127.0.0.1:{}/x",
        closed_port()?
    );
    let mq = amqp_url();
    let out = run(
        &["check-config"],
        &[
            ("DATABASE_URL", closed_db.as_str()),
            ("AMQP_URL", mq.as_str()),
        ],
    )
    .await?;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stdout.contains("postgresql (DATABASE_URL): error"),
        "{stdout}"
    );
    assert!(stdout.contains("rabbitmq (AMQP_URL): ok"), "{stdout}");
    assert!(!stdout.contains("pw-secret"), "{stdout}");
    Ok(())
}

#[tokio::test]
async fn check_config_gives_up_on_a_silent_broker_after_its_timeout() -> Result<()> {
    // Accepts TCP connections (the kernel's backlog) but never speaks AMQP.
    let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
    let url = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        silent.local_addr()?.port()
    );
    let db = sagas_test_support::admin_url();
    let started = Instant::now();
    let out = run(
        &["check-config", "--timeout", "1s"],
        &[("DATABASE_URL", db.as_str()), ("AMQP_URL", url.as_str())],
    )
    .await?;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stdout.contains("rabbitmq (AMQP_URL): error: no connection within 1s"),
        "{stdout}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    drop(silent);
    Ok(())
}

/// A tokens file of its own, removed when dropped.
struct TokensFile(std::path::PathBuf);

impl TokensFile {
    fn new(text: &str) -> Result<TokensFile> {
        let path = std::env::temp_dir().join(format!("sagas-e2e-tokens-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, text)?;
        Ok(TokensFile(path))
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("a UTF-8 temporary path")
    }
}

impl Drop for TokensFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagad_serves_with_the_tokens_of_a_tokens_file() -> Result<()> {
    let env = TestEnv::new().await?;
    let tokens =
        TokensFile::new("# operators\noperate:alice:aaaaaaaaaaaaaaaa\n\nread:rrrrrrrrrrrrrrrr\n")?;
    let port = closed_port()?;
    let bind = format!("127.0.0.1:{port}");
    let mq = amqp_url();
    let vars = [
        ("DATABASE_URL", env.orch_url.as_str()),
        ("AMQP_URL", mq.as_str()),
        ("SAGAS_BIND", bind.as_str()),
        ("SAGAS_AMQP_PREFIX", env.topology.prefix()),
        ("SAGAS_QUEUE_EXPIRES_MS", "600000"),
        ("SAGAS_API_TOKENS_FILE", tokens.path()),
    ];
    let mut child = sagad(&[], &vars)?.spawn()?;
    let http = reqwest::Client::new();
    let base = format!("http://{bind}");
    let deadline = Instant::now() + BOUND;
    loop {
        if let Ok(r) = http.get(format!("{base}/healthz")).send().await
            && r.status().is_success()
        {
            break;
        }
        anyhow::ensure!(
            child.try_wait()?.is_none(),
            "sagad exited: {:?}",
            child.wait_with_output().await?
        );
        anyhow::ensure!(Instant::now() < deadline, "sagad not healthy in {BOUND:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let list = |token: Option<&str>| {
        let mut req = http.get(format!("{base}/v1/sagas"));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        req.send()
    };
    assert_eq!(list(None).await?.status(), 401);
    assert_eq!(list(Some("wwwwwwwwwwwwwwww")).await?.status(), 401);
    assert_eq!(list(Some("rrrrrrrrrrrrrrrr")).await?.status(), 200);
    assert_eq!(list(Some("aaaaaaaaaaaaaaaa")).await?.status(), 200);
    child.kill().await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_tokens_file_that_cannot_be_read_or_is_set_with_the_tokens_stops_sagad_naming_it()
-> Result<()> {
    let missing = std::env::temp_dir().join(format!("sagas-e2e-missing-{}", uuid::Uuid::new_v4()));
    let missing = missing.to_str().expect("a UTF-8 temporary path");
    let out = run(&["check-config"], &[("SAGAS_API_TOKENS_FILE", missing)]).await?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains("SAGAS_API_TOKENS_FILE") && err.contains(missing),
        "{err}"
    );

    let tokens = TokensFile::new("read:rrrrrrrrrrrrrrrr\n")?;
    let out = run(
        &["check-config"],
        &[
            ("SAGAS_API_TOKENS_FILE", tokens.path()),
            ("SAGAS_API_TOKENS", "read:tttttttttttttttt"),
        ],
    )
    .await?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = text(&out.stderr);
    assert!(err.contains("SAGAS_API_TOKENS_FILE"), "{err}");
    assert!(
        !err.contains("tttttttt") && !err.contains("rrrrrrrr"),
        "{err}"
    );
    Ok(())
}

/// Reads `sagad`'s standard output (a pipe, not a terminal) until a line satisfies `done`,
/// within [`BOUND`]; answers every line read.
async fn log_lines(vars: &[(&str, &str)], done: impl Fn(&str) -> bool) -> Result<Vec<String>> {
    use tokio::io::AsyncBufReadExt;
    let mut child = sagad(&[], vars)?
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut read = Vec::new();
    let found = tokio::time::timeout(BOUND, async {
        while let Some(line) = lines.next_line().await? {
            let hit = done(&line);
            read.push(line);
            if hit {
                return anyhow::Ok(true);
            }
        }
        anyhow::Ok(false)
    })
    .await;
    child.kill().await?;
    anyhow::ensure!(
        matches!(found, Ok(Ok(true))),
        "no such log line within {BOUND:?}: {read:?}"
    );
    Ok(read)
}

#[tokio::test]
async fn logs_written_to_a_pipe_carry_no_colour_codes_and_can_be_json_lines() -> Result<()> {
    let env = TestEnv::new().await?;
    let bind = format!("127.0.0.1:{}", closed_port()?);
    let mq = amqp_url();
    let vars = |format: &'static str| {
        vec![
            ("DATABASE_URL", env.orch_url.clone()),
            ("AMQP_URL", mq.clone()),
            ("SAGAS_BIND", bind.clone()),
            ("SAGAS_AMQP_PREFIX", env.topology.prefix().to_owned()),
            ("SAGAS_QUEUE_EXPIRES_MS", "600000".to_owned()),
            ("SAGAS_LOG_FORMAT", format.to_owned()),
            ("RUST_LOG", "info".to_owned()),
        ]
    };
    for format in ["text", "json"] {
        let owned = vars(format);
        let vars: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let lines = log_lines(&vars, |line| line.contains("HTTP API listening")).await?;
        assert!(
            lines.iter().all(|l| !l.contains('\u{1b}')),
            "{format}: colour codes in a pipe: {lines:?}"
        );
        if format == "json" {
            for line in &lines {
                let value: serde_json::Value = serde_json::from_str(line)
                    .with_context(|| format!("not a JSON line: {line}"))?;
                assert!(value["level"].is_string(), "{line}");
            }
        }
    }
    env.cleanup().await;
    Ok(())
}
