//! Process configuration from the environment, read strictly: every variable that is set must
//! be usable, or the process refuses to start naming it (docs/operations.md, "Configuration").
//! The reader is the participant SDK's ([`sagas_participant::config::Env`]), so both kinds of
//! process accept the same forms.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use sagas_participant::amqp::QueueOptions;
pub use sagas_participant::config::BrokerSettings;
use sagas_participant::config::MAX_DB_POOL;
pub use sagas_participant::config::{ConfigError, EXIT_CONFIG, Env, VarError, parse_duration};
use sagas_participant::linger::DEFAULT_LINGER;
use sagas_participant::protocol::{MAX_BATCH, Topology};

use crate::breaker::BreakerPolicy;
use crate::transport::CommandBatch;

/// What a `sagad`-style process needs to run.
#[derive(Clone)]
pub struct Config {
    /// PostgreSQL URL of the orchestrator's database (`DATABASE_URL`).
    pub database_url: String,
    /// Broker URL (`AMQP_URL`).
    pub amqp_url: String,
    /// HTTP listen address (`SAGAS_BIND`, default `127.0.0.1:8080`).
    pub bind: String,
    /// Prefix of every exchange and queue name (`SAGAS_AMQP_PREFIX`, default `sagas`).
    pub amqp_prefix: String,
    /// Declare quorum queues (`SAGAS_QUORUM_QUEUES=1`), for RabbitMQ clusters.
    pub quorum_queues: bool,
    /// Database connections (`SAGAS_DB_POOL`, default 16).
    pub db_pool: u32,
    /// Whether commands for one participant share AMQP messages (`SAGAS_AMQP_COMMAND_BATCH`):
    /// unset, batches of up to 16 to the participants that announce them; `1`, never; `N`,
    /// batches of up to N to every participant (docs/protocol.md, "Batches").
    pub command_batch: CommandBatch,
    /// How long a batch of replies or starts waits for more after a batch of several
    /// (`SAGAS_BATCH_LINGER`, default 5ms, at most 100ms; `0`: not at all; see
    /// [`crate::engine::EngineConfig::batch_linger`]).
    pub batch_linger: std::time::Duration,
    /// Queues vanish after this long unused (`SAGAS_QUEUE_EXPIRES_MS`); for tests and demos only.
    pub queue_expires_ms: Option<u64>,
    /// Bearer tokens of the HTTP API (`SAGAS_API_TOKENS` or the file `SAGAS_API_TOKENS_FILE`
    /// names); empty: the API is unauthenticated and may only listen on loopback.
    pub api_tokens: Vec<ApiToken>,
    /// Largest accepted request body in bytes (`SAGAS_BODY_LIMIT`, default 1 MiB).
    pub body_limit: usize,
    /// Finished instances are deleted this long after they finished (`SAGAS_RETENTION`, e.g.
    /// `30d`; unset or `0`: kept for ever).
    pub retention: Option<std::time::Duration>,
    /// Tell the other orchestrator processes on the database which transactions settled, and
    /// hear theirs, so that a `?wait` is woken at once whichever process settles its
    /// transaction (`SAGAS_WAIT_NOTIFY`, default yes; see
    /// [`crate::engine::EngineConfig::wait_notify`]).
    pub wait_notify: bool,
    /// Read timeouts and connection cap of the HTTP server (`SAGAS_HTTP_*`).
    pub http: HttpLimits,
    /// How log lines are written (`SAGAS_LOG_FORMAT`, `text` or `json`, default `text`).
    pub log_format: LogFormat,
    /// The participants' circuit breakers (`SAGAS_BREAKER`, default off, and
    /// `SAGAS_BREAKER_*`); `None` when off.
    pub breakers: Option<BreakerPolicy>,
    /// Commands per second this process publishes to each participant named in
    /// `SAGAS_RATE_LIMITS` (`participant=rate,…`) at most.
    pub rate_limits: BTreeMap<String, f64>,
}

/// How log lines are written (`SAGAS_LOG_FORMAT`): colour codes only on a terminal either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One line of text per event (`text`).
    #[default]
    Text,
    /// One JSON object per line, for log collectors (`json`).
    Json,
}

impl LogFormat {
    /// Reads `SAGAS_LOG_FORMAT` from `env`, its error recorded there.
    pub fn read(env: &mut Env) -> LogFormat {
        env.parse("SAGAS_LOG_FORMAT", LogFormat::Text, |raw| {
            match raw.trim().to_ascii_lowercase().as_str() {
                "text" => Ok(LogFormat::Text),
                "json" => Ok(LogFormat::Json),
                _ => Err(format!("{raw:?} is neither text nor json")),
            }
        })
    }
}

impl fmt::Debug for Config {
    // The URLs may hold passwords: they never reach a log line (the tokens redact themselves).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &"<redacted>")
            .field("amqp_url", &"<redacted>")
            .field("bind", &self.bind)
            .field("amqp_prefix", &self.amqp_prefix)
            .field("quorum_queues", &self.quorum_queues)
            .field("db_pool", &self.db_pool)
            .field("command_batch", &self.command_batch)
            .field("batch_linger", &self.batch_linger)
            .field("queue_expires_ms", &self.queue_expires_ms)
            .field("api_tokens", &self.api_tokens)
            .field("body_limit", &self.body_limit)
            .field("retention", &self.retention)
            .field("wait_notify", &self.wait_notify)
            .field("http", &self.http)
            .field("log_format", &self.log_format)
            .field("breakers", &self.breakers)
            .field("rate_limits", &self.rate_limits)
            .finish()
    }
}

pub use sagas_participant::config::{DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL};
/// The default HTTP listen address.
pub const DEFAULT_BIND: &str = "127.0.0.1:8080";
/// The default number of database connections (`SAGAS_DB_POOL`).
pub const DEFAULT_DB_POOL: u32 = 16;
/// The largest accepted request body limit (1 GiB).
pub const MAX_BODY_LIMIT: usize = 1 << 30;
/// The default request body limit (1 MiB).
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;
/// Shortest accepted API token: shorter ones are guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Read instances, events, definitions.
    Read,
    /// Everything `read` allows, plus starting transactions and operator actions.
    Operate,
}

impl Role {
    /// The configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Operate => "operate",
        }
    }

    /// Whether a holder of `self` may do what needs `needed`.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

/// One API token: who holds it and what it allows.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken {
    /// What the token allows.
    pub role: Role,
    /// The caller's name, recorded as the actor of operator actions.
    pub name: String,
    /// The secret.
    pub token: String,
}

impl fmt::Debug for ApiToken {
    // The secret never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiToken")
            .field("role", &self.role)
            .field("name", &self.name)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// Parses `SAGAS_API_TOKENS`: comma-separated `role:token` or `role:name:token` entries.
///
/// The role is `read` or `operate`; the name (default: the role) is what operator actions
/// record as their actor. A token containing `:` needs the three-part form. Errors never
/// quote a token.
pub fn parse_api_tokens(raw: &str) -> Result<Vec<ApiToken>, String> {
    parse_token_entries(
        raw.split(',')
            .enumerate()
            .map(|(i, entry)| (format!("entry {}", i + 1), entry)),
    )
}

/// Parses the contents of `SAGAS_API_TOKENS_FILE`: the entries of [`parse_api_tokens`], one
/// per line or comma-separated; blank lines and lines starting with `#` are ignored. Errors
/// name the line, never a token.
pub fn parse_api_tokens_file(text: &str) -> Result<Vec<ApiToken>, String> {
    parse_token_entries(
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim_start().starts_with('#'))
            .flat_map(|(i, line)| {
                line.split(',')
                    .map(move |entry| (format!("line {}", i + 1), entry))
            }),
    )
}

/// Parses token entries, each with where it was (for errors).
fn parse_token_entries<'a>(
    entries: impl Iterator<Item = (String, &'a str)>,
) -> Result<Vec<ApiToken>, String> {
    let mut tokens: Vec<ApiToken> = Vec::new();
    for (at, entry) in entries {
        let entry = entry.trim();
        if entry.is_empty() {
            continue;
        }
        let parts: Vec<&str> = entry.splitn(3, ':').collect();
        let (role, name, token) = match parts.as_slice() {
            [role, token] => (*role, *role, *token),
            [role, name, token] => (*role, *name, *token),
            _ => return Err(format!("{at} is not role:token or role:name:token")),
        };
        let role = match role {
            "read" => Role::Read,
            "operate" => Role::Operate,
            _ => return Err(format!("{at}: the role must be read or operate")),
        };
        if name.is_empty()
            || name.len() > 100
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c))
        {
            return Err(format!(
                "{at}: the name must be 1 to 100 letters, digits or ._-@"
            ));
        }
        if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "{at}: the token must be at least {MIN_TOKEN_LEN} visible ASCII characters"
            ));
        }
        if tokens.iter().any(|t| t.token == token) {
            return Err(format!("{at} repeats the token of an earlier entry"));
        }
        tokens.push(ApiToken {
            role,
            name: name.to_owned(),
            token: token.to_owned(),
        });
    }
    Ok(tokens)
}

/// Reads the API tokens from `SAGAS_API_TOKENS` or from the file `SAGAS_API_TOKENS_FILE`
/// names (not both).
fn read_api_tokens(env: &mut Env) -> Vec<ApiToken> {
    let inline = env.raw("SAGAS_API_TOKENS");
    let file = env.raw("SAGAS_API_TOKENS_FILE");
    let parsed = match (inline, file) {
        (None, None) => return Vec::new(),
        (Some(_), Some(_)) => Err((
            "SAGAS_API_TOKENS_FILE",
            "is set together with SAGAS_API_TOKENS: set one of them".to_owned(),
        )),
        (Some(raw), None) => parse_api_tokens(&raw).map_err(|e| ("SAGAS_API_TOKENS", e)),
        (None, Some(path)) => {
            let path = path.trim();
            std::fs::read_to_string(path)
                .map_err(|e| format!("{path} cannot be read: {e}"))
                .and_then(|text| parse_api_tokens_file(&text).map_err(|e| format!("{path}: {e}")))
                .map_err(|e| ("SAGAS_API_TOKENS_FILE", e))
        }
    };
    parsed.unwrap_or_else(|(var, problem)| {
        env.invalid(var, problem);
        Vec::new()
    })
}

/// Checks `SAGAS_BIND`: `host:port` (`[v6]:port` for IPv6 addresses).
fn check_bind(raw: &str) -> Result<String, String> {
    let bad =
        || format!("{raw:?} is not host:port (examples: 127.0.0.1:8080, [::1]:8080, 0.0.0.0:80)");
    if raw.parse::<SocketAddr>().is_ok() {
        return Ok(raw.to_owned());
    }
    let (host, port) = raw.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || host.contains(':') || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(raw.to_owned())
}

/// Whether every address `bind` resolves to is a loopback address.
pub fn is_loopback(bind: &str) -> bool {
    let addrs: Vec<SocketAddr> = match bind.to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(_) => return false,
    };
    !addrs.is_empty()
        && addrs.iter().all(|a| match a.ip() {
            IpAddr::V4(ip) => ip.is_loopback(),
            IpAddr::V6(ip) => {
                ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
        })
}

impl Default for Config {
    /// Every variable unset: loopback defaults.
    fn default() -> Config {
        let mut env = Env::from_map(std::iter::empty::<(String, String)>());
        Config::read(&mut env)
    }
}

impl Config {
    /// Reads the configuration from the environment. Every unusable variable is an error, all
    /// of them at once; so is an unauthenticated API on an address other hosts can reach.
    ///
    /// A binary's `main` can stop with exit code 2 and the list:
    /// `Config::from_env().unwrap_or_else(|e| e.exit())`.
    pub fn from_env() -> Result<Config, ConfigError> {
        let mut env = Env::from_process();
        let config = Config::read(&mut env);
        env.finish_with(config)
    }

    /// Reads the configuration from `env`, its errors recorded there.
    pub fn read(env: &mut Env) -> Config {
        let database_url = env.postgres_url("DATABASE_URL", DEFAULT_DATABASE_URL);
        let broker = BrokerSettings::read(env);
        let bind = env.parse("SAGAS_BIND", DEFAULT_BIND.to_owned(), check_bind);
        let db_pool = env.number("SAGAS_DB_POOL", DEFAULT_DB_POOL, 1..=MAX_DB_POOL);
        let command_batch = env
            .optional_number("SAGAS_AMQP_COMMAND_BATCH", 1..=MAX_BATCH)
            .map_or_else(CommandBatch::default, CommandBatch::from);
        let batch_linger = env.linger("SAGAS_BATCH_LINGER", DEFAULT_LINGER);
        let api_tokens = read_api_tokens(env);
        let body_limit = env.number("SAGAS_BODY_LIMIT", DEFAULT_BODY_LIMIT, 1..=MAX_BODY_LIMIT);
        let retention = env.duration_or_off("SAGAS_RETENTION", None);
        let wait_notify = env.flag("SAGAS_WAIT_NOTIFY", true);
        let http = HttpLimits::read(env);
        let log_format = LogFormat::read(env);
        let breakers = read_breakers(env);
        let rate_limits = env.parse("SAGAS_RATE_LIMITS", BTreeMap::new(), parse_rate_limits);
        let config = Config {
            database_url,
            amqp_url: broker.amqp_url,
            bind,
            amqp_prefix: broker.amqp_prefix,
            quorum_queues: broker.quorum_queues,
            db_pool,
            command_batch,
            batch_linger,
            queue_expires_ms: broker.queue_expires_ms,
            api_tokens,
            body_limit,
            retention,
            wait_notify,
            http,
            log_format,
            breakers,
            rate_limits,
        };
        if let Err(problem) = config.check_exposure() {
            env.invalid("SAGAS_BIND", problem);
        }
        config
    }

    /// Refuses a configuration the server must not start with: an unauthenticated API on an
    /// address other hosts can reach. ([`Config::from_env`] checks this too; this is for
    /// configurations built in code.)
    pub fn check(&self) -> Result<(), String> {
        self.check_exposure()
            .map_err(|problem| format!("SAGAS_BIND: {problem}"))
    }

    fn check_exposure(&self) -> Result<(), String> {
        if self.api_tokens.is_empty() && !is_loopback(&self.bind) {
            return Err(format!(
                "{} is not a loopback address and no API token is set (SAGAS_API_TOKENS or \
                 SAGAS_API_TOKENS_FILE): set tokens (role:token or role:name:token) before \
                 exposing the API",
                self.bind
            ));
        }
        Ok(())
    }

    /// The broker settings, as a participant reads them.
    pub fn broker(&self) -> BrokerSettings {
        BrokerSettings {
            amqp_url: self.amqp_url.clone(),
            amqp_prefix: self.amqp_prefix.clone(),
            quorum_queues: self.quorum_queues,
            queue_expires_ms: self.queue_expires_ms,
        }
    }

    /// The AMQP topology.
    pub fn topology(&self) -> Topology {
        self.broker().topology()
    }

    /// Queue declaration options.
    pub fn queue_options(&self) -> QueueOptions {
        self.broker().queue_options()
    }
}

// --- Circuit breakers and rate limits (SAGAS_BREAKER*, SAGAS_RATE_LIMITS) ------------------------

/// Reads `SAGAS_BREAKER` (on or off, default off) and, when on, `SAGAS_BREAKER_WINDOW`,
/// `SAGAS_BREAKER_MIN_VOLUME`, `SAGAS_BREAKER_FAILURE_PERCENT`, `SAGAS_BREAKER_PROBE` and
/// `SAGAS_BREAKER_PROBE_MAX` (every one is checked either way).
fn read_breakers(env: &mut Env) -> Option<BreakerPolicy> {
    let on = env.flag("SAGAS_BREAKER", false);
    let d = BreakerPolicy::default();
    let window = env.duration("SAGAS_BREAKER_WINDOW", d.window);
    let min_volume = env.number("SAGAS_BREAKER_MIN_VOLUME", d.min_volume, 1..=1_000_000);
    let default_percent = (d.failure_share * 100.0).round() as u32;
    let percent: u32 = env.number("SAGAS_BREAKER_FAILURE_PERCENT", default_percent, 1..=100);
    let probe_interval = env.duration("SAGAS_BREAKER_PROBE", d.probe_interval);
    let max_probe_interval = env.duration("SAGAS_BREAKER_PROBE_MAX", d.max_probe_interval);
    if max_probe_interval < probe_interval {
        env.invalid(
            "SAGAS_BREAKER_PROBE_MAX",
            "is shorter than SAGAS_BREAKER_PROBE".to_owned(),
        );
    }
    on.then_some(BreakerPolicy {
        window,
        min_volume,
        failure_share: f64::from(percent) / 100.0,
        probe_interval,
        max_probe_interval,
    })
}

/// Parses `SAGAS_RATE_LIMITS`: comma-separated `participant=rate` entries, the rate in commands
/// per second (a positive number, fractions allowed), each participant once.
pub fn parse_rate_limits(raw: &str) -> Result<BTreeMap<String, f64>, String> {
    let mut limits = BTreeMap::new();
    for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, rate) = entry
            .split_once('=')
            .map(|(n, r)| (n.trim(), r.trim()))
            .filter(|(n, _)| !n.is_empty())
            .ok_or_else(|| format!("{entry:?} is not participant=rate"))?;
        let rate: f64 = rate
            .parse()
            .ok()
            .filter(|r: &f64| r.is_finite() && *r > 0.0)
            .ok_or_else(|| {
                format!("{entry:?}: the rate is not a positive number of commands per second")
            })?;
        if limits.insert(name.to_owned(), rate).is_some() {
            return Err(format!("participant {name} is named twice"));
        }
    }
    Ok(limits)
}

// --- HTTP server limits (SAGAS_HTTP_*) -----------------------------------------------------------

/// The default time a client has to send a request's headers, and the longest a kept-alive
/// connection may stay idle (10 s).
pub const DEFAULT_HTTP_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The default time a client has to send a whole request body once its headers are in (30 s).
pub const DEFAULT_HTTP_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// The default most HTTP connections served at once (512).
pub const DEFAULT_HTTP_MAX_CONNECTIONS: usize = 512;
/// The longest accepted HTTP timeout (1 hour).
pub const MAX_HTTP_TIMEOUT_MS: u64 = 3_600_000;
/// The most HTTP connections one may allow (`SAGAS_HTTP_MAX_CONNECTIONS`).
pub const MAX_HTTP_CONNECTIONS: usize = 1_000_000;

/// How the HTTP server bounds what clients may hold: read timeouts and a connection cap
/// (`SAGAS_HTTP_HEADER_TIMEOUT_MS`, `SAGAS_HTTP_BODY_TIMEOUT_MS`, `SAGAS_HTTP_MAX_CONNECTIONS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Time to send a request's headers; also the longest idle time between two requests of a
    /// kept-alive connection. The connection is closed when it runs out.
    pub header_timeout: std::time::Duration,
    /// Time to send a whole request body once the handler reads it; 408 and the connection
    /// closed when it runs out.
    pub body_timeout: std::time::Duration,
    /// Most connections served at once; more wait in the listen backlog until one closes.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: DEFAULT_HTTP_HEADER_TIMEOUT,
            body_timeout: DEFAULT_HTTP_BODY_TIMEOUT,
            max_connections: DEFAULT_HTTP_MAX_CONNECTIONS,
        }
    }
}

impl HttpLimits {
    /// Reads the limits from the environment (defaults for unset variables); every unusable
    /// value is an error naming its variable.
    pub fn from_env() -> Result<HttpLimits, ConfigError> {
        let mut env = Env::from_process();
        let limits = HttpLimits::read(&mut env);
        env.finish_with(limits)
    }

    /// Reads the limits from `env`, its errors recorded there.
    pub fn read(env: &mut Env) -> HttpLimits {
        let timeout = |env: &mut Env, name: &str, default: std::time::Duration| {
            let default_ms = u64::try_from(default.as_millis()).unwrap_or(MAX_HTTP_TIMEOUT_MS);
            std::time::Duration::from_millis(env.number(name, default_ms, 1..=MAX_HTTP_TIMEOUT_MS))
        };
        HttpLimits {
            header_timeout: timeout(
                env,
                "SAGAS_HTTP_HEADER_TIMEOUT_MS",
                DEFAULT_HTTP_HEADER_TIMEOUT,
            ),
            body_timeout: timeout(env, "SAGAS_HTTP_BODY_TIMEOUT_MS", DEFAULT_HTTP_BODY_TIMEOUT),
            max_connections: env.number(
                "SAGAS_HTTP_MAX_CONNECTIONS",
                DEFAULT_HTTP_MAX_CONNECTIONS,
                1..=MAX_HTTP_CONNECTIONS,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut env = Env::from_map(vars.iter().copied());
        let config = Config::read(&mut env);
        env.finish_with(config)
    }

    const TOKEN: &str = "read:0123456789abcdef";

    #[test]
    fn with_nothing_set_the_configuration_is_the_loopback_defaults() {
        let c = read(&[]).unwrap();
        assert_eq!(c.database_url, DEFAULT_DATABASE_URL);
        assert_eq!(c.amqp_url, DEFAULT_AMQP_URL);
        assert_eq!(c.bind, DEFAULT_BIND);
        assert_eq!(c.topology(), Topology::new("sagas"));
        assert_eq!(c.queue_options(), QueueOptions::default());
        assert_eq!(
            (c.db_pool, c.command_batch, c.body_limit),
            (16, CommandBatch::default(), DEFAULT_BODY_LIMIT)
        );
        assert_eq!(c.retention, None);
        assert!(c.wait_notify);
        assert_eq!(c.http, HttpLimits::default());
        assert!(c.api_tokens.is_empty());
        assert_eq!(c.breakers, None);
        assert!(c.rate_limits.is_empty());
    }

    #[test]
    fn breakers_are_off_unless_asked_for_and_their_settings_are_checked_either_way() {
        let c = read(&[
            ("SAGAS_BREAKER", "on"),
            ("SAGAS_BREAKER_WINDOW", "30s"),
            ("SAGAS_BREAKER_MIN_VOLUME", "5"),
            ("SAGAS_BREAKER_FAILURE_PERCENT", "80"),
            ("SAGAS_BREAKER_PROBE", "2s"),
            ("SAGAS_BREAKER_PROBE_MAX", "1m"),
        ])
        .unwrap();
        let b = c.breakers.unwrap();
        assert_eq!(b.window, std::time::Duration::from_secs(30));
        assert_eq!((b.min_volume, b.failure_share), (5, 0.8));
        assert_eq!(b.probe_interval, std::time::Duration::from_secs(2));
        assert_eq!(b.max_probe_interval, std::time::Duration::from_secs(60));
        let err = read(&[
            ("SAGAS_BREAKER_FAILURE_PERCENT", "0"),
            ("SAGAS_BREAKER_PROBE", "10s"),
            ("SAGAS_BREAKER_PROBE_MAX", "5s"),
        ])
        .unwrap_err();
        assert!(err.names("SAGAS_BREAKER_FAILURE_PERCENT"), "{err}");
        assert!(err.names("SAGAS_BREAKER_PROBE_MAX"), "{err}");
        assert!(
            read(&[("SAGAS_BREAKER", "maybe")])
                .unwrap_err()
                .names("SAGAS_BREAKER")
        );
    }

    #[test]
    fn rate_limits_are_participant_rate_pairs_with_positive_rates() {
        let c = read(&[("SAGAS_RATE_LIMITS", "payments=5, shipping = 0.5,")]).unwrap();
        assert_eq!(
            c.rate_limits.into_iter().collect::<Vec<_>>(),
            vec![("payments".to_owned(), 5.0), ("shipping".to_owned(), 0.5)]
        );
        for bad in [
            "payments",
            "=5",
            "payments=0",
            "payments=-1",
            "payments=x",
            "a=1,a=2",
        ] {
            let err = read(&[("SAGAS_RATE_LIMITS", bad)]).unwrap_err();
            assert!(err.names("SAGAS_RATE_LIMITS"), "{bad}: {err}");
        }
    }

    #[test]
    fn every_variable_is_read() {
        let c = read(&[
            ("DATABASE_URL", "postgres://o@db:5432/orch"),
            ("AMQP_URL", "amqp://u:p@mq:5672/v"),
            ("SAGAS_BIND", "0.0.0.0:9000"),
            ("SAGAS_AMQP_PREFIX", "t-x"),
            ("SAGAS_QUORUM_QUEUES", "TRUE"),
            ("SAGAS_DB_POOL", "4"),
            ("SAGAS_AMQP_COMMAND_BATCH", "16"),
            ("SAGAS_BATCH_LINGER", "5ms"),
            ("SAGAS_QUEUE_EXPIRES_MS", "600000"),
            ("SAGAS_API_TOKENS", TOKEN),
            ("SAGAS_BODY_LIMIT", "2048"),
            ("SAGAS_RETENTION", "1d12h"),
            ("SAGAS_WAIT_NOTIFY", "off"),
            ("SAGAS_HTTP_HEADER_TIMEOUT_MS", "2500"),
            ("SAGAS_HTTP_BODY_TIMEOUT_MS", "1"),
            ("SAGAS_HTTP_MAX_CONNECTIONS", "64"),
        ])
        .unwrap();
        assert_eq!(c.bind, "0.0.0.0:9000");
        assert!(c.quorum_queues);
        assert_eq!(c.queue_expires_ms, Some(600_000));
        assert_eq!(
            (c.db_pool, c.command_batch, c.body_limit),
            (4, CommandBatch::Forced(16), 2048)
        );
        assert_eq!(c.retention, Some(std::time::Duration::from_secs(36 * 3600)));
        assert_eq!(c.batch_linger, std::time::Duration::from_millis(5));
        assert!(!c.wait_notify);
        assert_eq!(
            c.http.header_timeout,
            std::time::Duration::from_millis(2500)
        );
        assert_eq!(c.http.max_connections, 64);
        assert_eq!(c.api_tokens.len(), 1);
        assert!(!format!("{c:?}").contains("u:p@"));
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn every_malformed_variable_is_reported_at_once_by_name() {
        let bad = [
            ("DATABASE_URL", "postgres//nowhere"),
            ("AMQP_URL", "amqp://h:notaport"),
            ("SAGAS_BIND", "8080"),
            ("SAGAS_AMQP_PREFIX", "a b"),
            ("SAGAS_QUORUM_QUEUES", "2"),
            ("SAGAS_DB_POOL", "sixteen"),
            ("SAGAS_AMQP_COMMAND_BATCH", "257"),
            ("SAGAS_BATCH_LINGER", "101ms"),
            ("SAGAS_QUEUE_EXPIRES_MS", "-5"),
            ("SAGAS_API_TOKENS", "admin:ssssssssssssssss"),
            ("SAGAS_BODY_LIMIT", "0"),
            ("SAGAS_RETENTION", "30"),
            ("SAGAS_WAIT_NOTIFY", "sometimes"),
            ("SAGAS_HTTP_HEADER_TIMEOUT_MS", "10s"),
            ("SAGAS_HTTP_BODY_TIMEOUT_MS", "3600001"),
            ("SAGAS_HTTP_MAX_CONNECTIONS", "0"),
        ];
        let err = read(&bad).unwrap_err();
        for (var, _) in bad {
            assert!(err.names(var), "{var} missing from {err}");
        }
        let text = err.to_string();
        assert!(
            text.contains("SAGAS_DB_POOL: \"sixteen\" is not a whole number from 1 to"),
            "{text}"
        );
        assert!(!text.contains("ssssssss"), "{text}");
    }

    #[test]
    fn log_lines_are_text_or_json_and_anything_else_names_the_variable() {
        let format = |raw: &str| read(&[("SAGAS_LOG_FORMAT", raw)]).map(|c| c.log_format);
        assert_eq!(read(&[]).unwrap().log_format, LogFormat::Text);
        assert_eq!(format("text").unwrap(), LogFormat::Text);
        assert_eq!(format("JSON").unwrap(), LogFormat::Json);
        for bad in ["logfmt", "yaml", "text json"] {
            assert!(
                format(bad).unwrap_err().names("SAGAS_LOG_FORMAT"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn command_batches_are_automatic_unless_set_off_with_one_or_forced_up_to_the_protocol_limit() {
        let batch = |raw: &str| read(&[("SAGAS_AMQP_COMMAND_BATCH", raw)]).map(|c| c.command_batch);
        assert_eq!(batch(""), Ok(CommandBatch::Auto(16)), "blank is unset");
        assert_eq!(batch("1"), Ok(CommandBatch::Off));
        assert_eq!(batch(" 16 "), Ok(CommandBatch::Forced(16)));
        assert_eq!(
            batch(&MAX_BATCH.to_string()),
            Ok(CommandBatch::Forced(MAX_BATCH))
        );
        for bad in ["0", "-1", "many", "auto", &(MAX_BATCH + 1).to_string()] {
            assert!(
                batch(bad).unwrap_err().names("SAGAS_AMQP_COMMAND_BATCH"),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_retention_is_a_duration_with_a_unit_and_zero_keeps_everything() {
        let retention = |raw: &str| read(&[("SAGAS_RETENTION", raw)]).map(|c| c.retention);
        let day = std::time::Duration::from_secs(86_400);
        assert_eq!(retention("30d"), Ok(Some(30 * day)));
        assert_eq!(retention(" 12h "), Ok(Some(day / 2)));
        assert_eq!(retention("0"), Ok(None));
        assert_eq!(retention("0s"), Ok(None));
        for bad in ["30", "thirty days", "-1d", "1.5d"] {
            assert!(
                retention(bad).unwrap_err().names("SAGAS_RETENTION"),
                "{bad}"
            );
        }
    }

    #[test]
    fn without_tokens_only_loopback_addresses_may_be_bound() {
        for bind in ["127.0.0.1:8080", "[::1]:8080", "localhost:0", "127.1.2.3:1"] {
            assert!(read(&[("SAGAS_BIND", bind)]).is_ok(), "{bind}");
        }
        for bind in ["0.0.0.0:8080", "[::]:8080", "10.1.2.3:80"] {
            let err = read(&[("SAGAS_BIND", bind)]).unwrap_err();
            assert!(err.names("SAGAS_BIND"), "{bind}: {err}");
            assert!(
                err.to_string().contains("SAGAS_API_TOKENS"),
                "{bind}: {err}"
            );
            let built = Config {
                bind: bind.to_owned(),
                ..Config::default()
            };
            assert!(built.check().unwrap_err().contains("SAGAS_BIND"), "{bind}");
        }
        assert!(read(&[("SAGAS_BIND", "0.0.0.0:8080"), ("SAGAS_API_TOKENS", TOKEN)]).is_ok());
    }

    #[test]
    fn tokens_parse_with_an_optional_name_and_bad_entries_are_refused_without_quoting_them() {
        let tokens = parse_api_tokens(
            " read:rrrrrrrrrrrrrrrr , operate:oncall-bot:oooooooooooooooo:with:colons,",
        )
        .unwrap();
        assert_eq!(tokens.len(), 2);
        assert_eq!(
            (
                tokens[0].role,
                tokens[0].name.as_str(),
                tokens[0].token.as_str()
            ),
            (Role::Read, "read", "rrrrrrrrrrrrrrrr")
        );
        assert_eq!(
            (
                tokens[1].role,
                tokens[1].name.as_str(),
                tokens[1].token.as_str()
            ),
            (Role::Operate, "oncall-bot", "oooooooooooooooo:with:colons")
        );
        assert!(parse_api_tokens("").unwrap().is_empty());
        for bad in [
            "admin:ssssssssssssssss",
            "read:short",
            "justatokenwithoutrole",
            "read:bad name:ssssssssssssssss",
            "read:ssssssssssssssss,operate:ssssssssssssssss",
        ] {
            let err = parse_api_tokens(bad).unwrap_err();
            assert!(!err.contains("ssssssss"), "{err}");
            let err = read(&[("SAGAS_API_TOKENS", bad)]).unwrap_err();
            assert!(err.names("SAGAS_API_TOKENS"), "{err}");
            assert!(!err.to_string().contains("ssssssss"), "{err}");
        }
        assert!(Role::Operate.allows(Role::Read));
        assert!(!Role::Read.allows(Role::Operate));
        assert!(!format!("{:?}", tokens[0]).contains("rrrr"));
    }

    /// A file of its own in the temporary directory, removed when dropped.
    struct TempFile(std::path::PathBuf);

    impl TempFile {
        fn new(text: &str) -> TempFile {
            let path = std::env::temp_dir().join(format!(
                "sagas-tokens-{}-{}",
                std::process::id(),
                uuid::Uuid::new_v4().simple()
            ));
            std::fs::write(&path, text).unwrap();
            TempFile(path)
        }

        fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn a_tokens_file_holds_entries_per_line_or_comma_separated_with_comments() {
        let file = TempFile::new(
            "# operators\n\noperate:alice:aaaaaaaaaaaaaaaa\n  # readers\nread:rrrrrrrrrrrrrrrr, read:bob:bbbbbbbbbbbbbbbb\n",
        );
        let c = read(&[("SAGAS_API_TOKENS_FILE", file.path())]).unwrap();
        let names: Vec<&str> = c.api_tokens.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["alice", "read", "bob"]);
        assert_eq!(c.api_tokens[0].role, Role::Operate);
    }

    #[test]
    fn a_bad_tokens_file_is_refused_naming_the_line_or_the_path_but_never_a_token() {
        let file = TempFile::new("read:rrrrrrrrrrrrrrrr\n\nadmin:ssssssssssssssss\n");
        let err = read(&[("SAGAS_API_TOKENS_FILE", file.path())]).unwrap_err();
        assert!(err.names("SAGAS_API_TOKENS_FILE"), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("line 3") && text.contains(file.path()),
            "{text}"
        );
        assert!(
            !text.contains("ssssssss") && !text.contains("rrrrrrrr"),
            "{text}"
        );

        let missing = format!("{}-missing", file.path());
        let err = read(&[("SAGAS_API_TOKENS_FILE", missing.as_str())]).unwrap_err();
        assert!(err.names("SAGAS_API_TOKENS_FILE"), "{err}");
        assert!(err.to_string().contains(&missing), "{err}");

        let good = TempFile::new("read:rrrrrrrrrrrrrrrr\n");
        let err = read(&[
            ("SAGAS_API_TOKENS_FILE", good.path()),
            ("SAGAS_API_TOKENS", "read:tttttttttttttttt"),
        ])
        .unwrap_err();
        assert!(err.names("SAGAS_API_TOKENS_FILE"), "{err}");
        assert!(!err.to_string().contains("tttttttt"), "{err}");
    }
}
