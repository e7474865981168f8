//! The Python reference participant (examples/python_participant) doing the bank's work for
//! `sagad` running the bank transfer as definition documents (examples/definitions), both as
//! child processes on the test's own databases and AMQP prefix. Transfers of both definitions are started over HTTP, good ones and ones that
//! must be undone (insufficient funds, a closed account, an unknown account); meanwhile the
//! Python process is killed with SIGKILL and started again, its database refuses it for a
//! while, and its broker connection is closed by the broker. At the end every transfer has its
//! expected status, every balance is what the completed transfers make it, the bank's audit
//! holds, `sagactl reconcile` with the barrier cross-check finds nothing, and a malformed
//! command is in the dead-letter queue with its reason. A second test sends it commands by
//! hand, as an orchestrator never would in that order, and checks each answer against the
//! barrier rules; a third runs its own unit tests.
//!
//! Python comes from `SAGAS_PYTHON`, by default the virtualenv that scripts/test makes
//! (`target/python-venv`, with examples/python_participant/requirements.txt).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command as Process, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use lapin::BasicProperties;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use sagas::participant::{Command, Operation, Outcome, Reply};
use serde_json::{Value, json};
use sqlx::AssertSqlSafe;
use tokio::time::Instant;
use uuid::Uuid;

use crate::examples::bank;
use crate::helpers::{self, RawPeer, TestEnv, amqp_url, close_broker, connect_broker};

/// Accounts `acct-1`..`acct-ACCOUNTS`; the last one is closed.
const ACCOUNTS: u32 = 5;
const BALANCE: i64 = 1_000_000;
const TRANSFERS: usize = 48;
/// The longest any one wait of this test takes.
const WITHIN: Duration = Duration::from_secs(120);

/// The interpreter: `SAGAS_PYTHON`, or the virtualenv scripts/test makes.
fn python() -> Result<PathBuf> {
    let path = match std::env::var_os("SAGAS_PYTHON") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/python-venv/bin/python"),
    };
    anyhow::ensure!(
        path.exists(),
        "{} is missing: scripts/test makes it (`bash examples/python_participant/venv.sh`), or \
         set SAGAS_PYTHON to a Python 3.11 with examples/python_participant/requirements.txt",
        path.display()
    );
    Ok(path)
}

/// What a transfer must end as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Completed,
    /// Compensated (cancelled, for TCC): a step was refused.
    Undone,
}

#[derive(Debug, Clone)]
struct Planned {
    definition: &'static str,
    from: String,
    to: String,
    amount: i64,
    expect: Expect,
}

/// Both definitions in turn; of every six transfers three are good, and one each lacks funds,
/// credits the closed account, or names an account that does not exist.
fn plan() -> Vec<Planned> {
    let acct = |n: usize| format!("acct-{n}");
    (0..TRANSFERS)
        .map(|i| {
            let definition = if i % 2 == 0 {
                "transfer_tcc"
            } else {
                "transfer_saga"
            };
            let (from, to) = (acct(1 + i % 4), acct(1 + (i + 1) % 4));
            let (from, to, amount, expect) = match (i / 2) % 6 {
                0..=2 => (from, to, 1 + i as i64, Expect::Completed),
                3 => (from, to, BALANCE * 1_000, Expect::Undone),
                4 => (from, acct(ACCOUNTS as usize), 7, Expect::Undone),
                _ if (i / 12) % 2 == 0 => ("acct-404".to_owned(), to, 7, Expect::Undone),
                _ => (from, "acct-404".to_owned(), 7, Expect::Undone),
            };
            Planned {
                definition,
                from,
                to,
                amount,
                expect,
            }
        })
        .collect()
}

/// The orchestrator and the Python participant, killed when dropped (also when the test
/// fails).
struct Processes {
    orchestrator: Option<Child>,
    python: Option<Child>,
    base: String,
    port: u16,
    logs: PathBuf,
    env: Vec<(&'static str, String)>,
}

impl Processes {
    fn new(env: &TestEnv) -> Result<Processes> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let logs = std::env::temp_dir().join(format!("sagas-python-{}", env.topology.prefix()));
        std::fs::create_dir_all(&logs)?;
        Ok(Processes {
            orchestrator: None,
            python: None,
            base: format!("http://127.0.0.1:{port}"),
            port,
            logs,
            // Shared by both, as the protocol requires: the broker, the prefix, queue expiry.
            env: vec![
                ("AMQP_URL", amqp_url()),
                ("SAGAS_AMQP_PREFIX", env.topology.prefix().to_owned()),
                ("SAGAS_QUEUE_EXPIRES_MS", "600000".to_owned()),
            ],
        })
    }

    /// `program` with the shared settings, its output appended to `log`.
    fn command(&self, program: PathBuf, log: &str) -> Result<Process> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(log))?;
        let mut cmd = Process::new(program);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        Ok(cmd)
    }

    /// `sagad` with the bank transfer as definition documents (examples/definitions): no Rust
    /// in the transaction's definition nor in its participant.
    fn spawn_orchestrator(&mut self, env: &TestEnv) -> Result<()> {
        let definitions = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/definitions");
        let child = self
            .command(helpers::built_binary("sagad")?, "orchestrator.log")?
            .arg("--definitions")
            .arg(definitions)
            .env("DATABASE_URL", &env.orch_url)
            .env("SAGAS_BIND", format!("127.0.0.1:{}", self.port))
            .env("RUST_LOG", "warn")
            .spawn()?;
        self.orchestrator = Some(child);
        Ok(())
    }

    /// The participant pauses 20 ms in every handler, so that a kill finds work in flight.
    fn spawn_python(&mut self, env: &TestEnv) -> Result<()> {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("examples/python_participant/participant.py");
        let child = self
            .command(python()?, "python.log")?
            .arg(script)
            .args(["--delay-ms", "20"])
            .env("ACCOUNTS_DATABASE_URL", &env.bank_url)
            .spawn()?;
        self.python = Some(child);
        Ok(())
    }

    /// Fails if a process exited by itself.
    fn check_alive(&mut self) -> Result<()> {
        for (name, slot) in [
            ("orchestrator", &mut self.orchestrator),
            ("python", &mut self.python),
        ] {
            if let Some(child) = slot
                && let Some(status) = child.try_wait()?
            {
                anyhow::bail!(
                    "the {name} process exited by itself ({status}); see {}/{name}.log",
                    self.logs.display()
                );
            }
        }
        Ok(())
    }

    /// The last `n` lines of each process's log, for a failure's message.
    fn tails(&self, n: usize) -> String {
        let mut out = String::new();
        for name in ["python", "orchestrator"] {
            let log =
                std::fs::read_to_string(self.logs.join(format!("{name}.log"))).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            out += &format!("\n--- {name}.log, last lines:\n");
            out += &lines[lines.len().saturating_sub(n)..].join("\n");
        }
        out
    }

    async fn wait_healthy(&mut self, http: &reqwest::Client) -> Result<()> {
        let deadline = Instant::now() + WITHIN;
        loop {
            if let Ok(r) = http.get(format!("{}/readyz", self.base)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            self.check_alive()?;
            anyhow::ensure!(
                Instant::now() < deadline,
                "orchestrator not ready (/readyz)"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        helpers::kill_child(&mut self.python);
        helpers::kill_child(&mut self.orchestrator);
    }
}

/// Runs the bank example's one-shot tool on the test's accounts database.
fn bank_tool(env: &TestEnv, args: &[&str]) -> Result<std::process::Output> {
    Ok(
        Process::new(helpers::built_binary("examples/bank_transfer")?)
            .args(args)
            .env("ACCOUNTS_DATABASE_URL", &env.bank_url)
            .output()?,
    )
}

/// Starts every transfer, one every 80 ms, and returns their transaction ids in order.
async fn start_all(base: String, transfers: Vec<Planned>) -> Result<Vec<Uuid>> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let mut tick = tokio::time::interval(Duration::from_millis(80));
    let mut ids = Vec::with_capacity(transfers.len());
    for t in &transfers {
        tick.tick().await;
        let res = http
            .post(format!("{base}/v1/sagas/{}", t.definition))
            .json(&json!({"input": {"from": t.from, "to": t.to, "amount": t.amount}}))
            .send()
            .await?;
        let status = res.status();
        let body: Value = res.json().await?;
        anyhow::ensure!(status == 202, "start of {t:?} answered {status}: {body}");
        ids.push(body["id"].as_str().context("no id")?.parse()?);
    }
    Ok(ids)
}

/// How many transactions are no longer running or compensating; fails on a stuck one.
async fn finished(env: &TestEnv) -> Result<i64> {
    let counts: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM sagas_instances GROUP BY status")
            .fetch_all(&env.orch)
            .await?;
    let counts: BTreeMap<String, i64> = counts.into_iter().collect();
    anyhow::ensure!(!counts.contains_key("stuck"), "stuck: {counts:?}");
    Ok(counts
        .iter()
        .filter(|(status, _)| !matches!(status.as_str(), "running" | "compensating"))
        .map(|(_, n)| n)
        .sum())
}

/// Waits (bounded) until at least `n` transactions have finished.
async fn wait_finished(env: &TestEnv, procs: &mut Processes, n: i64) -> Result<()> {
    let deadline = Instant::now() + WITHIN;
    loop {
        let done = finished(env).await?;
        if done >= n {
            return Ok(());
        }
        procs.check_alive()?;
        if Instant::now() > deadline {
            let open: Vec<(Uuid, String)> = sqlx::query_as(
                "SELECT id, definition FROM sagas_instances
                 WHERE status IN ('running', 'compensating') ORDER BY created_at LIMIT 5",
            )
            .fetch_all(&env.orch)
            .await?;
            anyhow::bail!(
                "only {done} of {n} transactions finished; open: {open:?}; logs in {}{}",
                procs.logs.display(),
                procs.tails(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `rabbitmqctl` (bounded) and returns its output.
async fn rabbitmqctl(args: &[&str]) -> Result<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("rabbitmqctl")
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("rabbitmqctl took over 60 s")?
    .context("running rabbitmqctl")?;
    anyhow::ensure!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Closes the Python participant's broker connection from the broker's side, as a broker
/// going away would (it names its connection `sagas-python-participant {prefix}`).
async fn cut_broker_connection(env: &TestEnv) -> Result<()> {
    let name = format!("\"sagas-python-participant {}\"", env.topology.prefix());
    let deadline = Instant::now() + WITHIN;
    loop {
        let listed = rabbitmqctl(&["list_connections", "-q", "pid", "client_properties"]).await?;
        if let Some(line) = listed.lines().find(|l| l.contains(&name)) {
            let pid = line.split('\t').next().unwrap_or_default();
            rabbitmqctl(&["close_connection", pid, "closed by the test"]).await?;
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no broker connection named {name}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The accounts database refusing the Python participant: new sessions refused, and its
/// session ended by the server, as a database restart would look to it.
struct DatabaseAway {
    name: String,
    /// How many times its log said so before.
    before: usize,
}

/// How many times the Python participant's log says that the database is unavailable.
fn unavailable_in_log(procs: &Processes) -> Result<usize> {
    let log = std::fs::read_to_string(procs.logs.join("python.log"))?;
    Ok(log.matches("database unavailable").count())
}

fn allow_connections(name: &str, yes: bool) -> sqlx::RawSql {
    sqlx::raw_sql(AssertSqlSafe(format!(
        "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS {yes}"
    )))
}

/// Ends the Python participant's database sessions; true if it had one.
async fn end_sessions(env: &TestEnv, name: &str) -> Result<bool> {
    // Run from the orchestrator's database: the test's own sessions on the accounts database
    // are left alone.
    let (ended,): (i64,) = sqlx::query_as(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE application_name = 'sagas-python-participant' AND datname = $1",
    )
    .bind(name)
    .fetch_one(&env.orch)
    .await?;
    Ok(ended > 0)
}

/// Takes the accounts database away from the Python participant.
async fn database_away(env: &TestEnv, procs: &Processes) -> Result<DatabaseAway> {
    let name = env
        .bank_url
        .split('?')
        .next()
        .and_then(|url| url.rsplit('/').next())
        .context("no database in the accounts URL")?
        .to_owned();
    let before = unavailable_in_log(procs)?;
    allow_connections(&name, false).execute(&env.orch).await?;
    let deadline = Instant::now() + WITHIN;
    while !end_sessions(env, &name).await? {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the participant has no database session"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(DatabaseAway { name, before })
}

/// Gives the database back once the participant has found it unavailable `tries` times
/// (the loss, then refused connections); commands must be arriving meanwhile.
async fn database_back(
    env: &TestEnv,
    procs: &Processes,
    away: DatabaseAway,
    tries: usize,
) -> Result<()> {
    let deadline = Instant::now() + WITHIN;
    let waited = loop {
        match unavailable_in_log(procs) {
            Ok(n) if n >= away.before + tries => break Ok(()),
            Ok(_) if Instant::now() < deadline => {}
            Ok(n) => {
                break Err(anyhow::anyhow!(
                    "the participant found the database unavailable {} times, not {tries}; \
                     logs in {}{}",
                    n - away.before,
                    procs.logs.display(),
                    procs.tails(30)
                ));
            }
            Err(error) => break Err(error),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    allow_connections(&away.name, true)
        .execute(&env.orch)
        .await?;
    waited
}

/// Publishes a command of attempt 0 (malformed: attempts count from 1) to the participant.
async fn publish_malformed_command(env: &TestEnv) -> Result<()> {
    let conn = connect_broker().await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let body = json!({
        "protocol": 1,
        "transaction_id": Uuid::new_v4(),
        "definition": "transfer_tcc",
        "step": "debit",
        "operation": "try",
        "attempt": 0,
        "payload": {"account": "acct-1", "amount": 1},
    });
    let confirm = ch
        .basic_publish(
            env.topology.commands_exchange().as_str().into(),
            bank::PARTICIPANT.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &serde_json::to_vec(&body)?,
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_reply_to(env.topology.replies_queue().as_str().into()),
        )
        .await?
        .await?;
    anyhow::ensure!(confirm.is_ack(), "command not confirmed");
    anyhow::ensure!(confirm.take_message().is_none(), "command unroutable");
    let _ = ch.close(200, "sent".into()).await;
    close_broker(&conn).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_participant_moves_the_money_exactly_once_through_kills_and_cut_connections()
-> Result<()> {
    let python = python()?;
    let env = TestEnv::new().await?;
    let mut procs = Processes::new(&env)?;
    let (balance, closed) = (BALANCE.to_string(), format!("acct-{ACCOUNTS}"));
    let accounts = ACCOUNTS.to_string();
    for args in [
        &["seed", "--accounts", &accounts, "--balance", &balance][..],
        &["close", "--account", &closed][..],
    ] {
        let out = bank_tool(&env, args)?;
        anyhow::ensure!(out.status.success(), "bank_transfer {args:?}: {out:?}");
    }
    let http = reqwest::Client::new();
    procs.spawn_orchestrator(&env)?;
    procs.spawn_python(&env)?;
    procs.wait_healthy(&http).await?;
    println!(
        "python {}; process logs in {}",
        python.display(),
        procs.logs.display()
    );

    let transfers = plan();
    let (first, second) = transfers.split_at(TRANSFERS / 2);
    let client = tokio::spawn(start_all(procs.base.clone(), first.to_vec()));

    // A SIGKILL with work in flight, then a fresh process.
    wait_finished(&env, &mut procs, 8).await?;
    helpers::kill_child(&mut procs.python);
    procs.spawn_python(&env)?;
    let mut ids = client.await??;
    // The database taken away, and the second half started, so that commands arrive while
    // it is away; given back once the participant has found it away three times. Then its
    // broker connection is closed by the broker.
    wait_finished(&env, &mut procs, 16).await?;
    let away = database_away(&env, &procs).await?;
    let client = tokio::spawn(start_all(procs.base.clone(), second.to_vec()));
    database_back(&env, &procs, away, 3).await?;
    wait_finished(&env, &mut procs, 32).await?;
    cut_broker_connection(&env).await?;
    ids.extend(client.await??);

    wait_finished(&env, &mut procs, TRANSFERS as i64).await?;
    procs.check_alive()?;

    // Every transfer ended as planned; the books and `sagactl reconcile` (which reads the
    // Python participant's barrier table) agree.
    let mut expected = vec![BALANCE; ACCOUNTS as usize + 1];
    for (t, id) in transfers.iter().zip(&ids) {
        let (status,): (String,) =
            sqlx::query_as("SELECT status FROM sagas_instances WHERE id = $1")
                .bind(id)
                .fetch_one(&env.orch)
                .await?;
        let want = match t.expect {
            Expect::Completed => "completed",
            Expect::Undone => "compensated",
        };
        assert_eq!(status, want, "transaction {id}: {t:?}");
        if t.expect == Expect::Completed {
            let index = |a: &str| a["acct-".len()..].parse::<usize>().unwrap();
            expected[index(&t.from)] -= t.amount;
            expected[index(&t.to)] += t.amount;
        }
    }
    helpers::check_bank_books(&env, &expected).await?;
    let rows: (i64,) = sqlx::query_as("SELECT count(*) FROM sagas_barrier")
        .fetch_one(&env.bank)
        .await?;
    assert!(rows.0 >= TRANSFERS as i64, "barrier rows: {rows:?}");

    // A malformed command is dead-lettered with its reason, and listed by the orchestrator.
    publish_malformed_command(&env).await?;
    let deadline = Instant::now() + WITHIN;
    let letter = loop {
        let page: Value = http
            .get(format!("{}/v1/dead-letters?limit=10", procs.base))
            .send()
            .await?
            .json()
            .await?;
        if let Some(letter) = page["items"].as_array().and_then(|items| items.first()) {
            break letter.clone();
        }
        procs.check_alive()?;
        anyhow::ensure!(Instant::now() < deadline, "no dead letter: {page}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        letter["reason"], "invalid command: attempt 0 (attempts count from 1)",
        "{letter}"
    );
    assert_eq!(
        letter["queue"],
        env.topology.participant_queue(bank::PARTICIPANT).as_str(),
        "{letter}"
    );

    drop(procs);
    let logs = std::env::temp_dir().join(format!("sagas-python-{}", env.topology.prefix()));
    let _ = std::fs::remove_dir_all(logs);
    env.cleanup().await;
    Ok(())
}

/// A command of the bank's definitions for `account`.
fn command(id: Uuid, definition: &str, step: &str, operation: Operation, account: &str) -> Command {
    Command {
        protocol: 1,
        transaction_id: id,
        definition: definition.to_owned(),
        step: step.to_owned(),
        operation,
        attempt: 1,
        payload: json!({"account": account, "amount": 250}),
        output: None,
        deadline: None,
        traceparent: None,
    }
}

/// Sends `cmd` and returns the outcome of its reply, which must answer it.
async fn ask(peer: &mut RawPeer, cmd: &Command) -> Result<Outcome> {
    peer.send(bank::PARTICIPANT, cmd).await?;
    let reply = peer.next_reply().await?;
    anyhow::ensure!(
        reply == cmd.reply(reply.outcome.clone()),
        "{reply:?} does not answer {cmd:?}"
    );
    Ok(reply.outcome)
}

/// `(available, frozen, pending)` of `account`.
async fn account(env: &TestEnv, account: &str) -> Result<(i64, i64, i64)> {
    Ok(
        sqlx::query_as("SELECT available, frozen, pending FROM bank_accounts WHERE id = $1")
            .bind(account)
            .fetch_one(&env.bank)
            .await?,
    )
}

/// `(operation, origin)` of every barrier row of transaction `id`'s step `step`, by operation.
async fn barrier_rows(env: &TestEnv, id: Uuid, step: &str) -> Result<Vec<(String, String)>> {
    Ok(sqlx::query_as(
        "SELECT operation, origin FROM sagas_barrier
         WHERE transaction_id = $1 AND step = $2 ORDER BY operation",
    )
    .bind(id)
    .bind(step)
    .fetch_all(&env.bank)
    .await?)
}

/// Takes one message from `queue` (bounded wait), acknowledged.
async fn take(ch: &lapin::Channel, queue: &str) -> Result<lapin::message::BasicGetMessage> {
    let deadline = Instant::now() + WITHIN;
    loop {
        let options = BasicGetOptions { no_ack: true };
        if let Some(message) = ch.basic_get(queue.into(), options).await? {
            return Ok(message);
        }
        anyhow::ensure!(Instant::now() < deadline, "nothing in {queue}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_participants_barrier_answers_duplicates_late_tries_undos_and_batches_as_the_protocol_says()
-> Result<()> {
    python()?;
    let env = TestEnv::new().await?;
    let out = bank_tool(&env, &["seed", "--accounts", "2", "--balance", "10000"])?;
    anyhow::ensure!(out.status.success(), "bank_transfer seed: {out:?}");
    let mut peer = RawPeer::new(&env, bank::PARTICIPANT).await?;
    let mut procs = Processes::new(&env)?;
    procs.spawn_python(&env)?;
    let (tcc, saga) = ("transfer_tcc", "transfer_saga");
    let null_compensation = Outcome::succeeded(json!({"null_compensation": true}));

    // A duplicate (a later attempt of the same try) gets the stored reply; the money moves once.
    let id = Uuid::new_v4();
    let try_ = command(id, tcc, "debit", Operation::Try, "acct-1");
    let first = ask(&mut peer, &try_).await?;
    let frozen = Outcome::succeeded(json!({"account": "acct-1", "available": 9750}));
    assert_eq!(first, frozen);
    let again = Command {
        attempt: 2,
        ..try_.clone()
    };
    assert_eq!(ask(&mut peer, &again).await?, frozen);
    assert_eq!(account(&env, "acct-1").await?, (9750, 250, 0));
    let cancel = command(id, tcc, "debit", Operation::Cancel, "acct-1");
    let released = Outcome::succeeded(json!({"account": "acct-1", "available": 10000}));
    assert_eq!(ask(&mut peer, &cancel).await?, released);
    assert_eq!(account(&env, "acct-1").await?, (10000, 0, 0));

    // A cancel that overtakes its try: a null compensation, and the late try is refused.
    let id = Uuid::new_v4();
    let cancel = command(id, tcc, "credit", Operation::Cancel, "acct-2");
    assert_eq!(ask(&mut peer, &cancel).await?, null_compensation);
    let late = command(id, tcc, "credit", Operation::Try, "acct-2");
    assert_eq!(
        ask(&mut peer, &late).await?,
        Outcome::failed("try refused: it arrived after its cancel (anti-hanging)")
    );
    assert_eq!(account(&env, "acct-2").await?, (10000, 0, 0));
    let rows = barrier_rows(&env, id, "credit").await?;
    assert_eq!(
        rows,
        [
            ("cancel".to_owned(), "null_compensation".to_owned()),
            ("try".to_owned(), "guard".to_owned())
        ]
    );

    // A failed action is stored; its compensation does nothing.
    let id = Uuid::new_v4();
    let action = command(id, saga, "debit", Operation::Action, "acct-404");
    let refused = Outcome::failed("acct-404: insufficient funds or no such account");
    assert_eq!(ask(&mut peer, &action).await?, refused);
    assert_eq!(ask(&mut peer, &action).await?, refused);
    let compensate = command(id, saga, "debit", Operation::Compensate, "acct-404");
    assert_eq!(ask(&mut peer, &compensate).await?, null_compensation);

    // A compensation that fails is not stored: once it can succeed, it runs.
    let id = Uuid::new_v4();
    let action = command(id, saga, "credit", Operation::Action, "acct-2");
    let credited = Outcome::succeeded(json!({"account": "acct-2", "available": 10250}));
    assert_eq!(ask(&mut peer, &action).await?, credited);
    let wrong = Command {
        payload: json!({"account": "acct-404", "amount": 250}),
        ..command(id, saga, "credit", Operation::Compensate, "acct-2")
    };
    assert_eq!(
        ask(&mut peer, &wrong).await?,
        Outcome::failed("acct-404: no such account")
    );
    assert_eq!(
        barrier_rows(&env, id, "credit").await?.len(),
        1,
        "no compensate row"
    );
    let compensate = Command {
        attempt: 2,
        ..command(id, saga, "credit", Operation::Compensate, "acct-2")
    };
    let taken_back = Outcome::succeeded(json!({"account": "acct-2", "available": 10000}));
    assert_eq!(ask(&mut peer, &compensate).await?, taken_back);

    // Steps it does not have, and operations a step does not have, are business failures.
    let id = Uuid::new_v4();
    let other_mode = command(id, saga, "debit", Operation::Try, "acct-1");
    assert_eq!(
        ask(&mut peer, &other_mode).await?,
        Outcome::failed(
            r#"step "debit" of "transfer_saga" is a saga step and does not support try"#
        )
    );
    let unknown = command(id, tcc, "fee", Operation::Try, "acct-1");
    assert_eq!(
        ask(&mut peer, &unknown).await?,
        Outcome::failed(r#"no handler for step "fee" of "transfer_tcc""#)
    );

    // A command batch: each element on its own, the malformed one dead-lettered alone, one
    // reply batch for the others, with the announcement.
    let conn = connect_broker().await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let replies = format!("{}.batch-replies", env.topology.prefix());
    ch.queue_declare(
        replies.as_str().into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    let id = Uuid::new_v4();
    let try_ = command(id, tcc, "debit", Operation::Try, "acct-1");
    let malformed = json!({"protocol": 1, "transaction_id": id, "definition": tcc,
        "step": "debit", "operation": "try", "attempt": 0, "payload": null});
    let batch = json!([
        try_,
        malformed,
        Command {
            attempt: 2,
            ..try_.clone()
        }
    ]);
    let confirm = ch
        .basic_publish(
            env.topology.commands_exchange().as_str().into(),
            bank::PARTICIPANT.into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&batch)?,
            BasicProperties::default()
                .with_content_type("application/vnd.sagas.batch+json".into())
                .with_delivery_mode(2)
                .with_reply_to(replies.as_str().into()),
        )
        .await?
        .await?;
    anyhow::ensure!(confirm.is_ack(), "batch not confirmed");
    let answer = take(&ch, &replies).await?;
    let properties = &answer.delivery.properties;
    assert_eq!(
        properties.content_type().as_ref().map(|c| c.as_str()),
        Some("application/vnd.sagas.batch+json")
    );
    let headers = properties.headers().clone().unwrap_or_default();
    let header = |name: &str| headers.inner().get(name).cloned();
    assert_eq!(
        header("x-saga-participant"),
        Some(AMQPValue::LongString("accounts".into()))
    );
    assert!(
        matches!(
            header("x-saga-accepts-batch"),
            Some(AMQPValue::LongInt(16) | AMQPValue::LongLongInt(16))
        ),
        "{headers:?}"
    );
    let got: Vec<Reply> = serde_json::from_slice(&answer.delivery.data)?;
    let frozen = Outcome::succeeded(json!({"account": "acct-1", "available": 9750}));
    assert_eq!(
        got,
        [
            try_.reply(frozen.clone()),
            Command {
                attempt: 2,
                ..try_.clone()
            }
            .reply(frozen)
        ]
    );
    let dead = take(&ch, &env.topology.dead_letter_queue()).await?;
    let body: Value = serde_json::from_slice(&dead.delivery.data)?;
    assert_eq!(body, malformed);
    let headers = dead
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    assert_eq!(
        headers.inner().get("x-sagas-reason"),
        Some(&AMQPValue::LongString(
            "invalid command: attempt 0 (attempts count from 1)".into()
        ))
    );
    procs.check_alive()?;

    close_broker(&conn).await;
    peer.close().await;
    drop(procs);
    let logs = std::env::temp_dir().join(format!("sagas-python-{}", env.topology.prefix()));
    let _ = std::fs::remove_dir_all(logs);
    env.cleanup().await;
    Ok(())
}

/// The Python participant's own unit tests (examples/python_participant/test_protocol.py):
/// its command validation against the protocol's table, without a broker or a database.
#[test]
fn the_python_participants_command_validation_follows_the_protocols_table() -> Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/python_participant");
    let out = Process::new("timeout")
        .arg("120")
        .arg(python()?)
        .args(["-m", "unittest", "discover", "-v", "-s"])
        .arg(&dir)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "python -m unittest: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
