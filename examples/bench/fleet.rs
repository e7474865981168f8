//! The processes of `--topology processes`: started with their environment, waited for until
//! they serve, read, and stopped. None outlives the run: each is killed when its handle is
//! dropped (`kill_on_drop`, and [`Fleet`]'s own `Drop` on every path out of a run), and each
//! also stops by itself when this process's end closes its standard input.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lapin::{Connection, ConnectionProperties};
use sagas::orchestrator::config::{Config, Env};
use sagas::orchestrator::server;
use sagas::orchestrator::transport::CommandBatch;
use sagas::participant::Topology;
use sagas::participant::amqp::look_at_queue;
use sagas::participant::config::ParticipantConfig;
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::env::{Scratch, Urls};
use crate::participants;
use crate::roles::{ParticipantReport, Role};
use crate::run::{self, Place};
use crate::scrape::Scrape;
use crate::sys::{self, Children};
use crate::{Args, Workload};

/// How long the processes have to serve once started.
const READY_WITHIN: Duration = Duration::from_secs(60);
/// How long each has to stop once its standard input is closed, before it is killed.
const STOP_WITHIN: Duration = Duration::from_secs(30);
/// Variables of this process that the children do not inherit: the clients send no token, so
/// the orchestrators serve their loopback port unauthenticated, as `sagad` does by default.
const NOT_INHERITED: &[&str] = &["SAGAS_API_TOKENS", "SAGAS_API_TOKENS_FILE"];

/// One process of the fleet.
struct Proc {
    child: Child,
    pid: u32,
    name: String,
    stdin: Option<ChildStdin>,
    stdout: Option<ChildStdout>,
}

/// The orchestrator processes and one process per participant.
#[derive(Default)]
pub struct Fleet {
    orchestrators: Vec<Proc>,
    participants: Vec<Proc>,
    /// The orchestrators' base URLs, in order.
    bases: Vec<String>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Whatever was not stopped: an error or a panic on the way.
        for p in self.orchestrators.iter_mut().chain(&mut self.participants) {
            let _ = p.child.start_kill();
        }
    }
}

impl Fleet {
    /// Starts one process per participant of `workload` and `--orchestrators` orchestrator
    /// processes on free loopback ports.
    pub fn start(args: &Args, place: &Place<'_>, workload: Workload) -> Result<Fleet> {
        let exe = std::env::current_exe().context("finding this benchmark's binary")?;
        let mut fleet = Fleet::default();
        for name in participants::names(workload, args.steps) {
            let vars = vars(args, Role::Participant, place, 0);
            let p = spawn(
                &exe,
                &["--participant", &name],
                Role::Participant,
                vars,
                &name,
            )?;
            fleet.participants.push(p);
        }
        let steps = args.steps.to_string();
        let mut role_args = vec!["--workload", workload.as_str(), "--steps", &steps];
        let timeout = args.step_timeout_secs.map(|s| s.to_string());
        if let Some(t) = &timeout {
            role_args.extend(["--step-timeout-secs", t]);
        }
        for i in 0..args.orchestrators {
            // A port the system gave out and took back: free unless someone races for it.
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let vars = vars(args, Role::Orchestrator, place, port);
            let name = format!("orchestrator {}", i + 1);
            let p = spawn(&exe, &role_args, Role::Orchestrator, vars, &name)?;
            fleet.orchestrators.push(p);
            fleet.bases.push(format!("http://127.0.0.1:{port}"));
        }
        Ok(fleet)
    }

    /// The orchestrators' base URLs.
    pub fn bases(&self) -> &[String] {
        &self.bases
    }

    /// The pids by group.
    pub fn children(&self) -> Children {
        let pids = |ps: &[Proc]| ps.iter().map(|p| p.pid).collect();
        Children {
            orchestrators: pids(&self.orchestrators),
            participants: pids(&self.participants),
        }
    }

    /// Waits (at most [`READY_WITHIN`]) until every orchestrator answers `/healthz` and
    /// consumes the replies queue, and every participant consumes its queue.
    pub async fn ready(&mut self, place: &Place<'_>, http: &reqwest::Client) -> Result<()> {
        let deadline = Instant::now() + READY_WITHIN;
        for i in 0..self.bases.len() {
            let url = format!("{}/healthz", self.bases[i]);
            while !http
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                self.wait_a_little(deadline, &url).await?;
            }
        }
        let conn = Connection::connect(&place.urls.amqp, ConnectionProperties::default()).await?;
        let mut queues = vec![(place.topology.replies_queue(), self.orchestrators.len())];
        for p in &self.participants {
            queues.push((place.topology.participant_queue(&p.name), 1));
        }
        for (queue, want) in queues {
            while consumers(&conn, &queue).await.unwrap_or(0) < want {
                self.wait_a_little(deadline, &format!("{want} consumer(s) of {queue}"))
                    .await?;
            }
        }
        let _ = conn.close(200, "ready".into()).await;
        Ok(())
    }

    /// Fails when a process exited or the deadline passed, else pauses 50 ms.
    async fn wait_a_little(&mut self, deadline: Instant, waiting_for: &str) -> Result<()> {
        for p in self.orchestrators.iter_mut().chain(&mut self.participants) {
            if let Some(status) = p.child.try_wait()? {
                anyhow::bail!("{} exited before it served ({status})", p.name);
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no {waiting_for} within {} s",
            READY_WITHIN.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(())
    }

    /// Every orchestrator's `/metrics`, in order.
    pub async fn scrape(&self, http: &reqwest::Client) -> Result<Vec<Scrape>> {
        let mut all = Vec::with_capacity(self.bases.len());
        for base in &self.bases {
            all.push(Scrape::read(http, base).await?);
        }
        Ok(all)
    }

    /// Resets every process's peak RSS to its current RSS.
    pub fn reset_peak_rss(&self) {
        for p in self.orchestrators.iter().chain(&self.participants) {
            sys::reset_peak_rss(&p.pid.to_string());
        }
    }

    /// Peak RSS of each orchestrator and of each participant process (MiB).
    pub fn peak_rss_mib(&self) -> (Vec<f64>, Vec<f64>) {
        let peaks = |ps: &[Proc]| {
            ps.iter()
                .map(|p| sys::peak_rss_mib(&p.pid.to_string()))
                .collect()
        };
        (peaks(&self.orchestrators), peaks(&self.participants))
    }

    /// Closes every process's standard input, waits for each to exit (killing the ones that
    /// take longer than [`STOP_WITHIN`]), and returns what the participants reported.
    pub async fn stop(mut self) -> Vec<ParticipantReport> {
        let mut all: Vec<Proc> = std::mem::take(&mut self.participants);
        all.append(&mut self.orchestrators);
        for p in &mut all {
            drop(p.stdin.take());
        }
        let mut reports = Vec::new();
        for mut p in all {
            let mut out = String::new();
            let stopped = tokio::time::timeout(STOP_WITHIN, async {
                if let Some(stdout) = &mut p.stdout {
                    let _ = stdout.read_to_string(&mut out).await;
                }
                p.child.wait().await
            })
            .await;
            match stopped {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => eprintln!("warning: {} exited with {status}", p.name),
                Ok(Err(e)) => eprintln!("warning: waiting for {}: {e}", p.name),
                Err(_) => {
                    eprintln!(
                        "warning: {} did not stop within {} s; killed",
                        p.name,
                        STOP_WITHIN.as_secs()
                    );
                    let _ = p.child.kill().await;
                }
            }
            if p.stdout.is_some() {
                match out.lines().find_map(|l| serde_json::from_str(l).ok()) {
                    Some(report) => reports.push(report),
                    None => eprintln!("warning: {} reported no counters", p.name),
                }
            }
        }
        reports
    }
}

/// Starts this binary as `role`; its standard input is kept open (closing it stops the
/// process), a participant's standard output is read at the end, everything else is inherited.
fn spawn(
    exe: &std::path::Path,
    args: &[&str],
    role: Role,
    vars: Vec<(&'static str, String)>,
    name: &str,
) -> Result<Proc> {
    let mut cmd = Command::new(exe);
    cmd.args(["--role", role.as_str()])
        .args(args)
        .envs(vars)
        .stdin(Stdio::piped())
        .stdout(match role {
            Role::Participant => Stdio::piped(),
            Role::Orchestrator => Stdio::null(),
        })
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for var in NOT_INHERITED {
        cmd.env_remove(var);
    }
    let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    let pid = child.id().context("a child that has no pid")?;
    Ok(Proc {
        stdin: child.stdin.take(),
        stdout: child.stdout.take(),
        child,
        pid,
        name: name.to_owned(),
    })
}

/// The variables a process of `role` gets on top of this process's environment: its
/// database, the broker and the run's names, its port, and the settings given on the command
/// line (everything else is the default, or what this environment says).
fn vars(args: &Args, role: Role, place: &Place<'_>, port: u16) -> Vec<(&'static str, String)> {
    let queues = run::queue_options();
    let database = match role {
        Role::Orchestrator => &place.orch.url,
        Role::Participant => &place.part.url,
    };
    let mut vars = vec![
        ("DATABASE_URL", database.clone()),
        ("AMQP_URL", place.urls.amqp.clone()),
        ("SAGAS_AMQP_PREFIX", place.topology.prefix().to_owned()),
        // The queues as `run::prepare` declared them.
        (
            "SAGAS_QUORUM_QUEUES",
            if queues.quorum { "yes" } else { "no" }.into(),
        ),
    ];
    if let Some(expires) = queues.expires {
        vars.push(("SAGAS_QUEUE_EXPIRES_MS", expires.as_millis().to_string()));
    }
    let given = |id: &str| args.given(id);
    match role {
        Role::Orchestrator => {
            vars.push(("SAGAS_BIND", format!("127.0.0.1:{port}")));
            if given("db_pool") {
                vars.push(("SAGAS_DB_POOL", args.db_pool.to_string()));
            }
            if let Some(n) = args.command_batch {
                vars.push(("SAGAS_AMQP_COMMAND_BATCH", n.to_string()));
            }
            if let Some(secs) = args.retention_secs {
                vars.push(("SAGAS_RETENTION", format!("{secs}s")));
            }
        }
        Role::Participant => {
            if given("participant_pool") {
                vars.push((
                    "SAGAS_PARTICIPANT_DB_POOL",
                    args.participant_pool.to_string(),
                ));
            }
            if given("participant_concurrency") {
                vars.push((
                    "SAGAS_PARTICIPANT_CONCURRENCY",
                    args.participant_concurrency.to_string(),
                ));
            }
        }
    }
    vars
}

/// Consumers of `queue` now (`run::prepare` declared it).
async fn consumers(conn: &Connection, queue: &str) -> Result<usize> {
    Ok(look_at_queue(conn, queue).await?.consumer_count() as usize)
}

/// The settings the processes run with, as they read them from their environment.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub orchestrator: OrchestratorSettings,
    pub participant: ParticipantSettings,
}

/// Serialises a value as its text (`Display`).
fn as_text<T: std::fmt::Display, S: serde::Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

/// An orchestrator's: `Config::from_env`, and the engine's tuning `sagad` runs with
/// (`server::engine_config`).
#[derive(Debug, Clone, Serialize)]
pub struct OrchestratorSettings {
    pub db_pool: u32,
    #[serde(serialize_with = "as_text")]
    pub command_batch: CommandBatch,
    pub retention_s: Option<u64>,
    pub body_limit: usize,
    pub http_max_connections: usize,
    pub http_header_timeout_ms: u64,
    pub http_body_timeout_ms: u64,
    pub reply_slots: usize,
    pub reply_batch: usize,
    pub batch_linger_ms: u64,
    pub reply_prefetch: u16,
    pub timer_concurrency: usize,
    pub timer_poll_ms: u64,
    pub relay_poll_ms: u64,
    pub retention_poll_ms: u64,
}

/// A participant's: `ParticipantConfig::from_env`.
#[derive(Debug, Clone, Serialize)]
pub struct ParticipantSettings {
    pub db_pool: u32,
    pub prefetch: u16,
    pub concurrency: usize,
    pub batch_size: usize,
    pub batch_linger_ms: u64,
    pub handler_timeout_ms: Option<u64>,
    pub barrier_retention_s: Option<u64>,
    pub shutdown_timeout_ms: u64,
}

impl Settings {
    /// Reads them as the processes will: this environment with [`vars`] on top (a run's
    /// databases and names do not change them).
    pub fn effective(args: &Args, urls: &Urls) -> Result<Settings> {
        let scratch = Scratch {
            name: "settings".into(),
            url: urls.admin.clone(),
        };
        let topology = Topology::new("bench");
        let place = &Place {
            urls,
            orch: &scratch,
            part: &scratch,
            topology: &topology,
        };
        let env_with = |role: Role| {
            let inherited = std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .filter(|(k, _)| !NOT_INHERITED.contains(&k.as_str()));
            let own = vars(args, role, place, 0)
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v));
            // Later entries win: the children's own variables over the inherited ones.
            Env::from_map(inherited.chain(own))
        };
        let mut env = env_with(Role::Orchestrator);
        let config = Config::read(&mut env);
        let o = env
            .finish_with(config)
            .map_err(|e| anyhow::anyhow!("the orchestrators' environment: {e}"))?;
        let engine = server::engine_config(&o);
        let mut env = env_with(Role::Participant);
        let config = ParticipantConfig::read(&mut env, "settings", "DATABASE_URL");
        let p = env
            .finish_with(config)
            .map_err(|e| anyhow::anyhow!("the participants' environment: {e}"))?;
        Ok(Settings {
            orchestrator: OrchestratorSettings {
                db_pool: o.db_pool,
                command_batch: o.command_batch,
                retention_s: o.retention.map(|r| r.as_secs()),
                body_limit: o.body_limit,
                http_max_connections: o.http.max_connections,
                http_header_timeout_ms: o.http.header_timeout.as_millis() as u64,
                http_body_timeout_ms: o.http.body_timeout.as_millis() as u64,
                reply_slots: engine.reply_concurrency,
                reply_batch: engine.reply_batch,
                batch_linger_ms: engine.batch_linger.as_millis() as u64,
                reply_prefetch: engine.prefetch,
                timer_concurrency: engine.timer_concurrency,
                timer_poll_ms: engine.timer_poll.as_millis() as u64,
                relay_poll_ms: engine.relay_poll.as_millis() as u64,
                retention_poll_ms: engine.retention_poll.as_millis() as u64,
            },
            participant: ParticipantSettings {
                db_pool: p.db_pool,
                prefetch: p.prefetch,
                concurrency: p.concurrency,
                batch_size: p.batch_size,
                batch_linger_ms: p.batch_linger.as_millis() as u64,
                handler_timeout_ms: p.handler_timeout.map(|t| t.as_millis() as u64),
                barrier_retention_s: p.barrier_retention.map(|r| r.as_secs()),
                shutdown_timeout_ms: p.shutdown_timeout.as_millis() as u64,
            },
        })
    }
}
