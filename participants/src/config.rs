//! Configuration from the environment, read strictly: a variable that is set must be usable.
//!
//! [`Env`] reads variables (from the process, or from a map in tests) through typed getters.
//! An unset or empty variable takes its default; a malformed one is recorded as a
//! [`VarError`] naming the variable, the problem and the accepted form, and
//! [`Env::finish`] returns every error at once, so that a process refuses to start with the
//! whole list rather than one mistake at a time, and never with a silent default.
//!
//! [`ParticipantConfig`] is a participant process's configuration, read with it
//! (docs/operations.md lists the variables); the orchestrator's `Config` reads its own with the
//! same reader.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};

use crate::amqp::{self, QueueOptions};
use crate::handler::Handler;
use crate::linger::{DEFAULT_PARTICIPANT_LINGER, MAX_LINGER};
use crate::protocol::Topology;
use crate::runtime::{
    DEFAULT_BARRIER_RETENTION, DEFAULT_CONCURRENCY, DEFAULT_PREFETCH, DEFAULT_SHUTDOWN_TIMEOUT,
    MAX_BATCH_SIZE, Participant, RuntimeError,
};
use crate::start::StartRelay;

/// The exit code of a process that refuses to start for its configuration.
pub const EXIT_CONFIG: i32 = 2;

/// The default database URL (local PostgreSQL, trust authentication).
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// The default broker URL (local RabbitMQ).
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The default prefix of exchange and queue names.
pub const DEFAULT_AMQP_PREFIX: &str = "sagas";
/// The largest database pool either process accepts.
pub const MAX_DB_POOL: u32 = 1000;
/// How long [`ParticipantConfig::set_up`] waits for a database that is not up.
pub const SETUP_DEADLINE: Duration = Duration::from_secs(60);
/// The longest accepted queue expiry, in milliseconds (`SAGAS_QUEUE_EXPIRES_MS`).
pub const MAX_QUEUE_EXPIRES_MS: u64 = u32::MAX as u64;

/// One unusable variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VarError {
    /// The variable's name.
    pub var: String,
    /// What is wrong and what is accepted; quotes the value only when it is no secret.
    pub problem: String,
}

impl fmt::Display for VarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.var, self.problem)
    }
}

/// Every unusable variable of a configuration, one per line in its message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:{}", list(.errors))]
pub struct ConfigError {
    /// The variables, in the order they were read.
    pub errors: Vec<VarError>,
}

fn list(errors: &[VarError]) -> String {
    errors.iter().map(|e| format!("\n  {e}")).collect()
}

impl ConfigError {
    /// Whether `var` is among the unusable variables.
    pub fn names(&self, var: &str) -> bool {
        self.errors.iter().any(|e| e.var == var)
    }

    /// Prints the error to stderr and exits with [`EXIT_CONFIG`]: for a binary's `main`.
    pub fn exit(&self) -> ! {
        eprintln!("{self}");
        std::process::exit(EXIT_CONFIG)
    }
}

/// A strict reader of environment variables; see the [module](self) documentation.
#[derive(Debug)]
pub struct Env {
    /// `None`: the process environment.
    vars: Option<HashMap<String, String>>,
    errors: Vec<VarError>,
}

impl Env {
    /// Reads the process environment.
    pub fn from_process() -> Env {
        Env {
            vars: None,
            errors: Vec::new(),
        }
    }

    /// Reads `vars` only (for tests).
    pub fn from_map<K: Into<String>, V: Into<String>>(
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Env {
        Env {
            vars: Some(
                vars.into_iter()
                    .map(|(k, v)| (k.into(), v.into()))
                    .collect(),
            ),
            errors: Vec::new(),
        }
    }

    /// The value of `name`, or `None` when it is unset or blank. A value that is not UTF-8 is
    /// an error (and `None`).
    pub fn raw(&mut self, name: &str) -> Option<String> {
        let value = match &self.vars {
            Some(vars) => vars.get(name).cloned(),
            None => match std::env::var(name) {
                Ok(v) => Some(v),
                Err(std::env::VarError::NotPresent) => None,
                Err(std::env::VarError::NotUnicode(_)) => {
                    self.invalid(name, "is not valid UTF-8");
                    None
                }
            },
        };
        value.filter(|v| !v.trim().is_empty())
    }

    /// Records that `name` is unusable because of `problem`.
    pub fn invalid(&mut self, name: &str, problem: impl Into<String>) {
        self.errors.push(VarError {
            var: name.to_owned(),
            problem: problem.into(),
        });
    }

    /// The value of `name` through `parse` (given the trimmed value), or `default` when it is
    /// unset or unusable (then an error). `parse`'s error is the problem and the accepted form.
    pub fn parse<T>(
        &mut self,
        name: &str,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> T {
        match self.raw(name) {
            None => default,
            Some(raw) => match parse(raw.trim()) {
                Ok(value) => value,
                Err(problem) => {
                    self.invalid(name, problem);
                    default
                }
            },
        }
    }

    /// A string (`default` when unset or blank).
    pub fn string(&mut self, name: &str, default: &str) -> String {
        self.raw(name)
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| default.to_owned())
    }

    /// A whole number in `range`.
    pub fn number<T>(&mut self, name: &str, default: T, range: RangeInclusive<T>) -> T
    where
        T: FromStr + PartialOrd + fmt::Display,
    {
        self.parse(name, default, |raw| parse_number(raw, &range))
    }

    /// A whole number in `range`, or `None` when unset.
    pub fn optional_number<T>(&mut self, name: &str, range: RangeInclusive<T>) -> Option<T>
    where
        T: FromStr + PartialOrd + fmt::Display,
    {
        self.parse(name, None, |raw| parse_number(raw, &range).map(Some))
    }

    /// A yes/no: `1`, `true`, `yes`, `on` or `0`, `false`, `no`, `off` (any case).
    pub fn flag(&mut self, name: &str, default: bool) -> bool {
        self.parse(name, default, parse_flag)
    }

    /// A positive duration with units ([`parse_duration`]).
    pub fn duration(&mut self, name: &str, default: Duration) -> Duration {
        self.parse(name, default, |raw| match parse_std_duration(raw)? {
            d if d.is_zero() => Err(format!(
                "{raw:?} is not a positive duration (examples: 500ms, 30s, 5m)"
            )),
            d => Ok(d),
        })
    }

    /// A duration with units ([`parse_duration`]), or `0` (with or without a unit) for none.
    pub fn duration_or_off(&mut self, name: &str, default: Option<Duration>) -> Option<Duration> {
        self.parse(name, default, |raw| {
            parse_duration_or_zero(raw).map(|d| Some(d).filter(|d| !d.is_zero()))
        })
    }

    /// How long a batch waits for more ([`crate::linger`]): a duration up to
    /// [`MAX_LINGER`], or `0` (with or without a unit) for not at all; `default` when unset.
    pub fn linger(&mut self, name: &str, default: Duration) -> Duration {
        self.parse(name, default, |raw| {
            let linger = parse_duration_or_zero(raw)?;
            if linger > MAX_LINGER {
                return Err(format!(
                    "{raw:?} is longer than {} ms, the longest a batch may wait",
                    MAX_LINGER.as_millis()
                ));
            }
            Ok(linger)
        })
    }

    /// A PostgreSQL URL (checked, not connected to). Errors do not quote it: it may hold a
    /// password.
    pub fn postgres_url(&mut self, name: &str, default: &str) -> String {
        self.parse(name, default.to_owned(), |raw| {
            check_postgres_url(raw).map(|()| raw.to_owned())
        })
    }

    /// An AMQP URL, checked as [`amqp::check_url`] does (its TLS files read). Errors do not
    /// quote it: it may hold a password.
    pub fn amqp_url(&mut self, name: &str, default: &str) -> String {
        self.parse(name, default.to_owned(), |raw| {
            amqp::check_url(raw).map(|()| raw.to_owned()).map_err(|e| {
                format!("is not a usable AMQP URL (amqp[s]://user:password@host:port/vhost): {e}")
            })
        })
    }

    /// The errors so far, or `Ok` without any.
    pub fn finish(self) -> Result<(), ConfigError> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError {
                errors: self.errors,
            })
        }
    }

    /// `value` without errors so far, or every error.
    pub fn finish_with<T>(self, value: T) -> Result<T, ConfigError> {
        self.finish().map(|()| value)
    }
}

fn parse_number<T>(raw: &str, range: &RangeInclusive<T>) -> Result<T, String>
where
    T: FromStr + PartialOrd + fmt::Display,
{
    match raw.parse::<T>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(format!(
            "{raw:?} is not a whole number from {} to {}",
            range.start(),
            range.end()
        )),
    }
}

/// Parses a yes/no: `1`, `true`, `yes`, `on` or `0`, `false`, `no`, `off`, in any case.
pub fn parse_flag(raw: &str) -> Result<bool, String> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!(
            "{raw:?} is not a yes/no (1, true, yes, on or 0, false, no, off)"
        )),
    }
}

/// How long a pooled connection may have sat idle before it is checked (one round trip to the
/// server) as it is taken again.
pub const IDLE_CHECK_AFTER: Duration = Duration::from_secs(1);

/// The options of every pool of the orchestrator and of the participant runtime: at most
/// `max_connections`, and a connection that sat idle for [`IDLE_CHECK_AFTER`] or longer checked
/// before it is handed out, one that did not handed out at once.
///
/// sqlx's default checks every connection it hands out, a round trip to PostgreSQL before every
/// transaction: on the user path ≈ 7 per saga at low load, on the path of every step
/// (docs/performance.md). A connection that was used a moment ago is as alive as the check
/// would show; one that sat idle (the case after the server restarted while nothing ran) is
/// still checked, and replaced if it is dead, as PgBouncer checks its server connections only
/// after `server_check_delay`. A connection that breaks while in use fails that use either
/// way, and the callers handle it as any lost connection.
pub fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= IDLE_CHECK_AFTER {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

/// The connection options of a PostgreSQL URL, as every pool of the orchestrator and of the
/// participant runtime reads it: the URL's own, except that a loopback host (`localhost`,
/// 127.0.0.0/8, `::1`) is connected without TLS when neither the URL nor `PGSSLMODE` names an
/// `sslmode`.
///
/// The default (`prefer`) encrypts whenever the server offers TLS, loopback included, where it
/// protects nothing: the traffic never leaves the host, and `prefer` would accept a plain
/// connection anyway. There it cost about a tenth of all the CPU of a saga (docs/performance.md);
/// libpq's own default for a local server, a Unix socket, has no TLS either. Name an `sslmode`
/// (e.g. `require`) to have it on loopback too.
pub fn database_options(url: &str) -> Result<PgConnectOptions, sqlx::Error> {
    database_options_with(url, std::env::var_os("PGSSLMODE").is_some())
}

/// [`database_options`], told whether `PGSSLMODE` is set.
fn database_options_with(url: &str, env_ssl_mode: bool) -> Result<PgConnectOptions, sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?;
    let named = url.split_once('?').is_some_and(|(_, query)| {
        query
            .split('&')
            .any(|pair| matches!(pair.split('=').next(), Some("sslmode" | "ssl-mode")))
    });
    let host = options
        .get_host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    Ok(if named || env_ssl_mode || !loopback {
        options
    } else {
        options.ssl_mode(PgSslMode::Disable)
    })
}

/// Checks a PostgreSQL URL as the pool reads it, without connecting; the error does not quote
/// the URL.
pub fn check_postgres_url(raw: &str) -> Result<(), String> {
    postgres_options(raw).map(drop)
}

fn postgres_options(raw: &str) -> Result<PgConnectOptions, String> {
    // Other schemes would parse as a socket path or fail later, less clearly.
    if !(raw.starts_with("postgres://") || raw.starts_with("postgresql://")) {
        return Err(
            "is not a PostgreSQL URL (postgres://user:password@host:port/database)".to_owned(),
        );
    }
    PgConnectOptions::from_str(raw).map_err(|e| {
        format!("is not a usable PostgreSQL URL (postgres://user:password@host:port/database): {e}")
    })
}

/// Parses `90s`, `15m`, `1h30m`, `7d`, `2w`, `500ms`: whole numbers, each with a unit (ms, s,
/// m, h, d, w), summed.
pub fn parse_duration(s: &str) -> Result<chrono::Duration, String> {
    let bad = || format!("{s:?} is not a duration (examples: 60s, 15m, 1h30m, 7d)");
    let mut total = chrono::Duration::zero();
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: i64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let part = match &rest[..unit_len] {
            "ms" => chrono::Duration::try_milliseconds(n),
            "s" => chrono::Duration::try_seconds(n),
            "m" => chrono::Duration::try_minutes(n),
            "h" => chrono::Duration::try_hours(n),
            "d" => chrono::Duration::try_days(n),
            "w" => chrono::Duration::try_weeks(n),
            _ => None,
        }
        .ok_or_else(bad)?;
        total = total.checked_add(&part).ok_or_else(bad)?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// A duration with units, or `0` (without a unit) for none: a zero duration either way.
fn parse_duration_or_zero(raw: &str) -> Result<Duration, String> {
    if raw == "0" {
        return Ok(Duration::ZERO);
    }
    parse_std_duration(raw).map_err(|e| format!("{e}, or 0 for none"))
}

/// [`parse_duration`] as a [`std::time::Duration`].
pub fn parse_std_duration(s: &str) -> Result<Duration, String> {
    parse_duration(s)?
        .to_std()
        .map_err(|_| format!("{s:?} is not a duration (examples: 60s, 15m, 1h30m, 7d)"))
}

/// The broker settings both sides read alike, and must set alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerSettings {
    /// `AMQP_URL` (default [`DEFAULT_AMQP_URL`]).
    pub amqp_url: String,
    /// `SAGAS_AMQP_PREFIX` (default `sagas`).
    pub amqp_prefix: String,
    /// `SAGAS_QUORUM_QUEUES` (default no).
    pub quorum_queues: bool,
    /// `SAGAS_QUEUE_EXPIRES_MS` (default unset: queues never expire).
    pub queue_expires_ms: Option<u64>,
}

impl BrokerSettings {
    /// Reads them from `env`.
    pub fn read(env: &mut Env) -> BrokerSettings {
        BrokerSettings {
            amqp_url: env.amqp_url("AMQP_URL", DEFAULT_AMQP_URL),
            amqp_prefix: env.parse(
                "SAGAS_AMQP_PREFIX",
                DEFAULT_AMQP_PREFIX.to_owned(),
                check_prefix,
            ),
            quorum_queues: env.flag("SAGAS_QUORUM_QUEUES", false),
            queue_expires_ms: env
                .optional_number("SAGAS_QUEUE_EXPIRES_MS", 1..=MAX_QUEUE_EXPIRES_MS),
        }
    }

    /// The AMQP names.
    pub fn topology(&self) -> Topology {
        Topology::new(self.amqp_prefix.clone())
    }

    /// How queues are declared.
    pub fn queue_options(&self) -> QueueOptions {
        QueueOptions {
            quorum: self.quorum_queues,
            expires: self.queue_expires_ms.map(Duration::from_millis),
        }
    }
}

/// An AMQP name prefix: 1 to 200 visible ASCII characters (queue names are at most 255 bytes).
fn check_prefix(raw: &str) -> Result<String, String> {
    if raw.len() <= 200 && raw.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(raw.to_owned())
    } else {
        Err(format!(
            "{raw:?} is not a name prefix (1 to 200 visible ASCII characters, e.g. sagas)"
        ))
    }
}

/// What a participant process needs to run, from its environment (docs/operations.md,
/// "Participants").
#[derive(Clone, PartialEq, Eq)]
pub struct ParticipantConfig {
    /// The participant's name: its routing key and queue suffix.
    pub name: String,
    /// Its own database (`DATABASE_URL`, or the variable given to
    /// [`ParticipantConfig::from_env_with_database_var`]).
    pub database_url: String,
    /// The broker, prefix and queue options (`AMQP_URL`, `SAGAS_AMQP_PREFIX`,
    /// `SAGAS_QUORUM_QUEUES`, `SAGAS_QUEUE_EXPIRES_MS`): the same as the orchestrator's.
    pub broker: BrokerSettings,
    /// Database connections (`SAGAS_PARTICIPANT_DB_POOL`; default: the concurrency plus one,
    /// for the barrier cleanup).
    pub db_pool: u32,
    /// Unacknowledged commands the broker may push (`SAGAS_PARTICIPANT_PREFETCH`, default 32).
    pub prefetch: u16,
    /// Commands in flight at once (`SAGAS_PARTICIPANT_CONCURRENCY`, default 16).
    pub concurrency: usize,
    /// Most commands in one database transaction (`SAGAS_PARTICIPANT_BATCH`, default 16, 1 to
    /// [`MAX_BATCH_SIZE`]).
    pub batch_size: usize,
    /// How long a take of commands waits for more after a take of several
    /// (`SAGAS_PARTICIPANT_BATCH_LINGER`, default `0`: not at all; at most 100ms).
    pub batch_linger: Duration,
    /// Longest time one command may take (`SAGAS_HANDLER_TIMEOUT`; default unset: no limit).
    pub handler_timeout: Option<Duration>,
    /// How long barrier rows are kept (`SAGAS_BARRIER_RETENTION`, default 30d; `0`: kept for
    /// ever).
    pub barrier_retention: Option<Duration>,
    /// Time handlers in flight get after the shutdown signal (`SAGAS_SHUTDOWN_TIMEOUT`, default
    /// 25s).
    pub shutdown_timeout: Duration,
    /// Where [`ParticipantConfig::serve`] serves the participant's counters at `/metrics`
    /// (`SAGAS_PARTICIPANT_METRICS_BIND`, e.g. `0.0.0.0:9464`; default unset: not served).
    pub metrics_bind: Option<SocketAddr>,
    /// Whether the participant also runs the start relay of its database's start outbox
    /// (`SAGAS_RELAY_STARTS`, default no; [`crate::start`]).
    pub relay_starts: bool,
}

impl fmt::Debug for ParticipantConfig {
    // The URLs may hold passwords: they never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParticipantConfig")
            .field("name", &self.name)
            .field("database_url", &"<redacted>")
            .field("amqp_url", &"<redacted>")
            .field("amqp_prefix", &self.broker.amqp_prefix)
            .field("quorum_queues", &self.broker.quorum_queues)
            .field("queue_expires_ms", &self.broker.queue_expires_ms)
            .field("db_pool", &self.db_pool)
            .field("prefetch", &self.prefetch)
            .field("concurrency", &self.concurrency)
            .field("batch_size", &self.batch_size)
            .field("batch_linger", &self.batch_linger)
            .field("handler_timeout", &self.handler_timeout)
            .field("barrier_retention", &self.barrier_retention)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("metrics_bind", &self.metrics_bind)
            .field("relay_starts", &self.relay_starts)
            .finish()
    }
}

/// The most commands in flight a participant process accepts.
pub const MAX_CONCURRENCY: usize = 10_000;

impl ParticipantConfig {
    /// Reads the configuration of the participant `name` from the process environment, its
    /// database from `DATABASE_URL`.
    pub fn from_env(name: impl Into<String>) -> Result<ParticipantConfig, ConfigError> {
        ParticipantConfig::from_env_with_database_var(name, "DATABASE_URL")
    }

    /// As [`ParticipantConfig::from_env`], its database from `database_var` (for processes
    /// that reach several databases, such as the examples' `ACCOUNTS_DATABASE_URL`).
    pub fn from_env_with_database_var(
        name: impl Into<String>,
        database_var: &str,
    ) -> Result<ParticipantConfig, ConfigError> {
        let mut env = Env::from_process();
        let config = ParticipantConfig::read(&mut env, name, database_var);
        env.finish_with(config)
    }

    /// Reads the configuration from `env`, its errors recorded there.
    pub fn read(env: &mut Env, name: impl Into<String>, database_var: &str) -> ParticipantConfig {
        let database_url = env.postgres_url(database_var, DEFAULT_DATABASE_URL);
        let broker = BrokerSettings::read(env);
        let prefetch = env.number("SAGAS_PARTICIPANT_PREFETCH", DEFAULT_PREFETCH, 1..=u16::MAX);
        let concurrency = env.number(
            "SAGAS_PARTICIPANT_CONCURRENCY",
            DEFAULT_CONCURRENCY,
            1..=MAX_CONCURRENCY,
        );
        let batch_size = env.number(
            "SAGAS_PARTICIPANT_BATCH",
            crate::runtime::DEFAULT_BATCH_SIZE,
            1..=MAX_BATCH_SIZE,
        );
        let batch_linger = env.linger("SAGAS_PARTICIPANT_BATCH_LINGER", DEFAULT_PARTICIPANT_LINGER);
        let default_pool = u32::try_from(concurrency + 1)
            .unwrap_or(MAX_DB_POOL)
            .min(MAX_DB_POOL);
        let db_pool = env.number("SAGAS_PARTICIPANT_DB_POOL", default_pool, 1..=MAX_DB_POOL);
        let handler_timeout = env.duration_or_off("SAGAS_HANDLER_TIMEOUT", None);
        let barrier_retention =
            env.duration_or_off("SAGAS_BARRIER_RETENTION", Some(DEFAULT_BARRIER_RETENTION));
        let shutdown_timeout = env.duration("SAGAS_SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT);
        let metrics_bind = env.parse("SAGAS_PARTICIPANT_METRICS_BIND", None, |raw| {
            raw.parse::<SocketAddr>()
                .map(Some)
                .map_err(|_| format!("{raw:?} is not an address and port such as 0.0.0.0:9464"))
        });
        let relay_starts = env.flag("SAGAS_RELAY_STARTS", false);
        ParticipantConfig {
            name: name.into(),
            database_url,
            broker,
            db_pool,
            prefetch,
            concurrency,
            batch_size,
            batch_linger,
            handler_timeout,
            barrier_retention,
            shutdown_timeout,
            metrics_bind,
            relay_starts,
        }
    }

    /// The AMQP names.
    pub fn topology(&self) -> Topology {
        self.broker.topology()
    }

    /// How queues are declared.
    pub fn queue_options(&self) -> QueueOptions {
        self.broker.queue_options()
    }

    /// A pool on the participant's database that connects when first used: a database that is
    /// down at start-up does not stop the process. An error only for an unusable URL.
    pub fn pool(&self) -> Result<PgPool, sqlx::Error> {
        let options = database_options(&self.database_url)?;
        Ok(pool_options(self.db_pool).connect_lazy_with(options))
    }

    /// `participant` with these settings (prefetch, concurrency, batch size and linger, queue options,
    /// handler timeout, barrier retention, shutdown timeout).
    pub fn apply(&self, participant: Participant) -> Participant {
        let participant = participant
            .prefetch(self.prefetch)
            .concurrency(self.concurrency)
            .batch_size(self.batch_size)
            .batch_linger(self.batch_linger)
            .queue_options(self.queue_options())
            .barrier_retention(self.barrier_retention)
            .shutdown_timeout(self.shutdown_timeout);
        match self.handler_timeout {
            Some(limit) => participant.handler_timeout(limit),
            None => participant,
        }
    }

    /// A [`Participant`] with these settings, on `pool`, answering with `handler` (and
    /// relaying the starts of `pool`'s start outbox with `SAGAS_RELAY_STARTS`).
    pub fn participant(&self, pool: PgPool, handler: Arc<dyn Handler>) -> Participant {
        let relay = self.relay_starts.then(|| {
            StartRelay::new(self.name.clone(), self.topology(), pool.clone())
                .queue_options(self.queue_options())
        });
        let participant = self.apply(Participant::new(
            self.name.clone(),
            self.topology(),
            pool,
            handler,
        ));
        match relay {
            Some(relay) => participant.relay_starts(relay),
            None => participant,
        }
    }

    /// Runs `setup` (creating the service's own tables, say) until it succeeds: a database
    /// that is not up yet or restarting is waited for, with the delays of a reconnection
    /// (100 ms doubling to 5 s), each failure logged with `what`, for at most
    /// [`SETUP_DEADLINE`]; then the last error. A process that starts beside a restarting
    /// database comes up instead of exiting, as [`ParticipantConfig::serve`] does for the
    /// barrier's table.
    pub async fn set_up<T, E, Fut>(&self, what: &str, setup: impl FnMut() -> Fut) -> Result<T, E>
    where
        Fut: Future<Output = Result<T, E>>,
        E: fmt::Display,
    {
        self.set_up_within(SETUP_DEADLINE, what, setup).await
    }

    /// [`ParticipantConfig::set_up`] for at most `limit`.
    async fn set_up_within<T, E, Fut>(
        &self,
        limit: Duration,
        what: &str,
        mut setup: impl FnMut() -> Fut,
    ) -> Result<T, E>
    where
        Fut: Future<Output = Result<T, E>>,
        E: fmt::Display,
    {
        let deadline = tokio::time::Instant::now() + limit;
        let mut delays =
            amqp::Backoff::new(Duration::from_millis(100), Duration::from_secs(5)).delays();
        loop {
            match setup().await {
                Ok(done) => return Ok(done),
                Err(error) => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(5));
                    if tokio::time::Instant::now() + delay > deadline {
                        return Err(error);
                    }
                    tracing::warn!(participant = %self.name, %error, retry_in_ms = delay.as_millis() as u64, "{what} failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Serves the participant until `shutdown` ([`Participant::run_forever`]): connects to the
    /// broker and reconnects after every failure. `pool` is usually [`ParticipantConfig::pool`].
    ///
    /// ```no_run
    /// # async fn main_(handler: std::sync::Arc<dyn sagas_participant::Handler>) -> Result<(), Box<dyn std::error::Error>> {
    /// use sagas_participant::config::ParticipantConfig;
    /// let config = ParticipantConfig::from_env("accounts").unwrap_or_else(|e| e.exit());
    /// let pool = config.pool()?;
    /// config
    ///     .serve(pool, handler, sagas_participant::runtime::shutdown_signal())
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn serve(
        &self,
        pool: PgPool,
        handler: Arc<dyn Handler>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), RuntimeError> {
        tracing::info!(participant = %self.name, prefix = %self.broker.amqp_prefix, "participant starting");
        let participant = self.participant(pool, handler);
        let metrics = match self.metrics_bind {
            None => None,
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| RuntimeError::Metrics(format!("binding {addr}: {e}")))?;
                tracing::info!(%addr, "serving the participant's metrics at /metrics");
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let serve = crate::runtime::metrics::serve_metrics(
                    listener,
                    self.name.clone(),
                    participant.stats(),
                    async {
                        let _ = stopped.await;
                    },
                );
                Some((stop, tokio::spawn(serve)))
            }
        };
        let served = participant
            .run_forever(&self.broker.amqp_url, shutdown)
            .await;
        if let Some((stop, task)) = metrics {
            let _ = stop.send(());
            let _ = task.await;
        }
        served
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loopback_database_is_connected_without_tls_unless_an_sslmode_is_named() {
        let mode = |url: &str, env: bool| database_options_with(url, env).unwrap().get_ssl_mode();
        for url in [
            "postgres://u@127.0.0.1:5432/db",
            "postgres://u@127.0.0.2/db",
            "postgres://u@localhost/db",
            "postgresql://u@[::1]:5432/db?application_name=x",
        ] {
            assert!(matches!(mode(url, false), PgSslMode::Disable), "{url}");
            assert!(
                matches!(mode(url, true), PgSslMode::Prefer),
                "{url}, PGSSLMODE set"
            );
        }
        assert!(matches!(
            mode("postgres://u@127.0.0.1/db?sslmode=prefer", false),
            PgSslMode::Prefer
        ));
        assert!(matches!(
            mode(
                "postgres://u@localhost/db?application_name=x&sslmode=require",
                false
            ),
            PgSslMode::Require
        ));
        assert!(matches!(
            mode("postgres://u@db.internal:5432/db", false),
            PgSslMode::Prefer
        ));
        assert!(matches!(
            mode("postgres://u@10.0.0.7/db", false),
            PgSslMode::Prefer
        ));
    }

    fn env(vars: &[(&str, &str)]) -> Env {
        Env::from_map(vars.iter().copied())
    }

    #[test]
    fn unset_and_blank_variables_take_their_defaults() {
        let mut e = env(&[("SAGAS_PARTICIPANT_PREFETCH", "  ")]);
        assert_eq!(e.number("SAGAS_PARTICIPANT_PREFETCH", 7u16, 1..=10), 7);
        assert_eq!(e.number("UNSET", 3u32, 1..=10), 3);
        assert!(e.flag("UNSET", true));
        assert_eq!(e.string("UNSET", "x"), "x");
        assert!(e.finish().is_ok());
    }

    #[test]
    fn numbers_must_be_whole_and_in_range_and_the_error_names_the_variable_and_the_range() {
        let mut e = env(&[
            ("A", " 12 "),
            ("B", "0"),
            ("C", "1.5"),
            ("D", "-1"),
            ("E", "11"),
        ]);
        assert_eq!(e.number("A", 1u32, 1..=100), 12);
        assert_eq!(e.number("B", 5u32, 1..=100), 5);
        e.number("C", 5u32, 1..=100);
        e.number("D", 5u32, 1..=100);
        e.number("E", 5u32, 1..=10);
        let err = e.finish().unwrap_err();
        let vars: Vec<&str> = err.errors.iter().map(|e| e.var.as_str()).collect();
        assert_eq!(vars, ["B", "C", "D", "E"]);
        assert!(err.errors[0].problem.contains("from 1 to 100"), "{err}");
        assert!(
            err.to_string()
                .contains("E: \"11\" is not a whole number from 1 to 10"),
            "{err}"
        );
    }

    #[test]
    fn flags_accept_the_usual_spellings_in_any_case_and_nothing_else() {
        for yes in ["1", "true", "TRUE", "Yes", "on"] {
            assert_eq!(parse_flag(yes), Ok(true), "{yes}");
        }
        for no in ["0", "false", "No", "OFF"] {
            assert_eq!(parse_flag(no), Ok(false), "{no}");
        }
        for bad in ["2", "y", "enabled", "tru"] {
            assert!(parse_flag(bad).unwrap_err().contains("yes/no"), "{bad}");
        }
    }

    #[test]
    fn durations_need_a_unit_and_zero_means_off_only_where_off_is_allowed() {
        assert_eq!(parse_duration("90s"), Ok(chrono::Duration::seconds(90)));
        assert_eq!(parse_duration("1h30m"), Ok(chrono::Duration::minutes(90)));
        assert_eq!(parse_std_duration("500ms"), Ok(Duration::from_millis(500)));
        for bad in ["", "h", "10", "10x", "1.5h", "-1h"] {
            assert!(parse_duration(bad).unwrap_err().contains("60s"), "{bad}");
        }
        let mut e = env(&[
            ("OFF", "0"),
            ("OFF_S", "0s"),
            ("ON", "2h"),
            ("ZERO", "0s"),
            ("BARE", "30"),
        ]);
        assert_eq!(e.duration_or_off("OFF", Some(Duration::from_secs(1))), None);
        assert_eq!(
            e.duration_or_off("OFF_S", Some(Duration::from_secs(1))),
            None
        );
        assert_eq!(
            e.duration_or_off("ON", None),
            Some(Duration::from_secs(7200))
        );
        assert_eq!(
            e.duration("ZERO", Duration::from_secs(3)),
            Duration::from_secs(3)
        );
        e.duration_or_off("BARE", None);
        let err = e.finish().unwrap_err();
        assert!(err.names("ZERO") && err.names("BARE"), "{err}");
        assert!(err.to_string().contains("or 0 for none"), "{err}");
    }

    #[test]
    fn a_linger_is_a_duration_up_to_its_limit_and_zero_turns_it_off() {
        let mut e = env(&[
            ("OFF", "0"),
            ("OFF_MS", "0ms"),
            ("FIVE", "5ms"),
            ("MOST", "100ms"),
            ("TOO_LONG", "1s"),
            ("BARE", "2"),
        ]);
        let two = Duration::from_millis(2);
        assert_eq!(e.linger("NOT_SET", two), two);
        assert_eq!(e.linger("OFF", two), Duration::ZERO);
        assert_eq!(e.linger("OFF_MS", two), Duration::ZERO);
        assert_eq!(e.linger("FIVE", two), Duration::from_millis(5));
        assert_eq!(e.linger("MOST", two), MAX_LINGER);
        assert_eq!(e.linger("TOO_LONG", two), two);
        e.linger("BARE", two);
        let err = e.finish().unwrap_err();
        assert_eq!(err.errors.len(), 2, "{err}");
        assert!(err.names("TOO_LONG") && err.names("BARE"), "{err}");
        assert!(err.to_string().contains("longer than 100 ms"), "{err}");
        assert!(err.to_string().contains("or 0 for none"), "{err}");
    }

    #[test]
    fn urls_are_checked_without_quoting_them() {
        let mut e = env(&[
            ("DATABASE_URL", "mysql://root:hunter2secret@db/x"),
            ("OTHER_DB", "postgres://u:hunter2secret@db:notaport/x"),
            ("AMQP_URL", "http://guest:hunter2secret@mq"),
        ]);
        e.postgres_url("DATABASE_URL", DEFAULT_DATABASE_URL);
        e.postgres_url("OTHER_DB", DEFAULT_DATABASE_URL);
        e.amqp_url("AMQP_URL", DEFAULT_AMQP_URL);
        let err = e.finish().unwrap_err();
        assert_eq!(err.errors.len(), 3, "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let mut ok = env(&[(
            "DATABASE_URL",
            "postgresql://a:b@localhost:5433/x?sslmode=disable",
        )]);
        ok.postgres_url("DATABASE_URL", DEFAULT_DATABASE_URL);
        ok.amqp_url("AMQP_URL", DEFAULT_AMQP_URL);
        assert!(ok.finish().is_ok());
    }

    #[test]
    fn a_participant_config_has_the_runtime_defaults_when_nothing_is_set() {
        let mut e = env(&[]);
        let c = ParticipantConfig::read(&mut e, "accounts", "DATABASE_URL");
        e.finish().unwrap();
        assert_eq!(c.database_url, DEFAULT_DATABASE_URL);
        assert_eq!(c.broker.amqp_url, DEFAULT_AMQP_URL);
        assert_eq!(c.topology(), Topology::new("sagas"));
        assert_eq!(c.queue_options(), QueueOptions::default());
        assert_eq!(c.prefetch, DEFAULT_PREFETCH);
        assert_eq!(c.concurrency, DEFAULT_CONCURRENCY);
        assert_eq!(c.db_pool, DEFAULT_CONCURRENCY as u32 + 1);
        assert_eq!(c.barrier_retention, Some(DEFAULT_BARRIER_RETENTION));
        assert_eq!(c.shutdown_timeout, DEFAULT_SHUTDOWN_TIMEOUT);
        assert_eq!(c.handler_timeout, None);
        assert_eq!(c.batch_linger, DEFAULT_PARTICIPANT_LINGER);
        assert_eq!(c.metrics_bind, None);
        assert!(!c.relay_starts);
    }

    #[tokio::test]
    async fn a_set_up_is_tried_again_until_it_succeeds_and_its_last_error_returned_after_its_limit()
    {
        let config = ParticipantConfig::read(&mut env(&[]), "accounts", "DATABASE_URL");
        let tries = std::cell::Cell::new(0);
        let flaky = || {
            tries.set(tries.get() + 1);
            let n = tries.get();
            async move {
                if n < 3 {
                    Err(format!("down {n}"))
                } else {
                    Ok(n)
                }
            }
        };
        assert_eq!(config.set_up("creating tables", flaky).await, Ok(3));
        let never = || async { Err::<(), _>("still down") };
        let limit = Duration::from_millis(250);
        assert_eq!(
            config.set_up_within(limit, "creating tables", never).await,
            Err("still down")
        );
    }

    #[test]
    fn a_participant_config_reads_every_variable() {
        let mut e = env(&[
            (
                "ACCOUNTS_DATABASE_URL",
                "postgres://postgres@127.0.0.1/accounts",
            ),
            ("AMQP_URL", "amqp://u:p@mq:5673/v"),
            ("SAGAS_AMQP_PREFIX", "t-1"),
            ("SAGAS_QUORUM_QUEUES", "yes"),
            ("SAGAS_QUEUE_EXPIRES_MS", "600000"),
            ("SAGAS_PARTICIPANT_PREFETCH", "64"),
            ("SAGAS_PARTICIPANT_CONCURRENCY", "8"),
            ("SAGAS_PARTICIPANT_BATCH", "4"),
            ("SAGAS_PARTICIPANT_BATCH_LINGER", "0"),
            ("SAGAS_PARTICIPANT_DB_POOL", "5"),
            ("SAGAS_HANDLER_TIMEOUT", "10s"),
            ("SAGAS_BARRIER_RETENTION", "0"),
            ("SAGAS_SHUTDOWN_TIMEOUT", "5s"),
            ("SAGAS_PARTICIPANT_METRICS_BIND", "127.0.0.1:9464"),
            ("SAGAS_RELAY_STARTS", "yes"),
        ]);
        let c = ParticipantConfig::read(&mut e, "accounts", "ACCOUNTS_DATABASE_URL");
        e.finish().unwrap();
        assert_eq!(c.database_url, "postgres://postgres@127.0.0.1/accounts");
        assert_eq!(c.topology(), Topology::new("t-1"));
        assert_eq!(
            c.queue_options(),
            QueueOptions {
                quorum: true,
                expires: Some(Duration::from_secs(600))
            }
        );
        assert_eq!(
            (c.prefetch, c.concurrency, c.batch_size, c.db_pool),
            (64, 8, 4, 5)
        );
        assert_eq!(c.handler_timeout, Some(Duration::from_secs(10)));
        assert_eq!(c.batch_linger, Duration::ZERO);
        assert_eq!(c.barrier_retention, None);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(c.metrics_bind, Some("127.0.0.1:9464".parse().unwrap()));
        assert!(c.relay_starts);
        assert!(!format!("{c:?}").contains("u:p@"));
    }

    #[test]
    fn every_malformed_participant_variable_is_reported_at_once_by_name() {
        let bad = [
            ("DATABASE_URL", "not a url"),
            ("AMQP_URL", "nope://x"),
            ("SAGAS_AMQP_PREFIX", "has space"),
            ("SAGAS_QUORUM_QUEUES", "maybe"),
            ("SAGAS_QUEUE_EXPIRES_MS", "10m"),
            ("SAGAS_PARTICIPANT_PREFETCH", "70000"),
            ("SAGAS_PARTICIPANT_CONCURRENCY", "0"),
            ("SAGAS_PARTICIPANT_BATCH", &(MAX_BATCH_SIZE + 1).to_string()),
            ("SAGAS_PARTICIPANT_BATCH_LINGER", "2"),
            ("SAGAS_PARTICIPANT_DB_POOL", "lots"),
            ("SAGAS_HANDLER_TIMEOUT", "5"),
            ("SAGAS_BARRIER_RETENTION", "30"),
            ("SAGAS_SHUTDOWN_TIMEOUT", "0"),
            ("SAGAS_PARTICIPANT_METRICS_BIND", "everywhere"),
        ];
        let mut e = env(&bad);
        ParticipantConfig::read(&mut e, "accounts", "DATABASE_URL");
        let err = e.finish().unwrap_err();
        for (var, _) in bad {
            assert!(err.names(var), "{var} missing from {err}");
        }
        assert_eq!(err.errors.len(), bad.len(), "{err}");
    }
}
