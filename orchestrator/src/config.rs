//! Process configuration from the environment.

use std::fmt;

use chrono::Duration;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use sagas_participant::amqp::QueueOptions;
use sagas_participant::protocol::{MAX_BATCH, Topology};

/// What a `sagad`-style process needs to run.
#[derive(Debug, Clone)]
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
    /// Most commands carried by one AMQP message (`SAGAS_AMQP_COMMAND_BATCH`, default 1: every
    /// command alone). Above 1, only once every participant accepts batches
    /// (docs/protocol.md, "Batches").
    pub command_batch: usize,
    /// Queues vanish after this long unused (`SAGAS_QUEUE_EXPIRES_MS`); for tests and demos only.
    pub queue_expires_ms: Option<u64>,
    /// Bearer tokens of the HTTP API (`SAGAS_API_TOKENS`); empty: the API is unauthenticated and
    /// may only listen on loopback.
    pub api_tokens: Vec<ApiToken>,
    /// Largest accepted request body in bytes (`SAGAS_BODY_LIMIT`, default 1 MiB).
    pub body_limit: usize,
    /// Finished instances are deleted this long after they finished (`SAGAS_RETENTION`, e.g.
    /// `30d`; unset or `0`: kept for ever).
    pub retention: Option<std::time::Duration>,
    /// Values of the environment that could not be used; [`Config::check`] refuses to start.
    pub invalid: Vec<String>,
}

/// The default database URL (local PostgreSQL, trust auth).
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// The default broker URL (local RabbitMQ).
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
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
    let mut tokens: Vec<ApiToken> = Vec::new();
    for (i, entry) in raw.split(',').map(str::trim).enumerate() {
        if entry.is_empty() {
            continue;
        }
        let n = i + 1;
        let parts: Vec<&str> = entry.splitn(3, ':').collect();
        let (role, name, token) = match parts.as_slice() {
            [role, token] => (*role, *role, *token),
            [role, name, token] => (*role, *name, *token),
            _ => {
                return Err(format!(
                    "SAGAS_API_TOKENS entry {n} is not role:token or role:name:token"
                ));
            }
        };
        let role = match role {
            "read" => Role::Read,
            "operate" => Role::Operate,
            _ => {
                return Err(format!(
                    "SAGAS_API_TOKENS entry {n}: role must be read or operate"
                ));
            }
        };
        if name.is_empty()
            || name.len() > 100
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c))
        {
            return Err(format!(
                "SAGAS_API_TOKENS entry {n}: the name must be 1 to 100 letters, digits or ._-@"
            ));
        }
        if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "SAGAS_API_TOKENS entry {n}: the token must be at least {MIN_TOKEN_LEN} visible ASCII characters"
            ));
        }
        if tokens.iter().any(|t| t.token == token) {
            return Err(format!(
                "SAGAS_API_TOKENS entry {n} repeats the token of an earlier entry"
            ));
        }
        tokens.push(ApiToken {
            role,
            name: name.to_owned(),
            token: token.to_owned(),
        });
    }
    Ok(tokens)
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

/// Parses `SAGAS_RETENTION`: a duration such as `30d`, `12h` or `1d12h` (`0`: none).
pub fn parse_retention(raw: &str) -> Result<Option<std::time::Duration>, String> {
    if raw.trim() == "0" {
        return Ok(None);
    }
    let retention = parse_duration(raw).map_err(|e| format!("SAGAS_RETENTION: {e}"))?;
    Ok(retention.to_std().ok().filter(|d| !d.is_zero()))
}

/// Parses `90s`, `15m`, `1h30m`, `7d`, `2w`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (examples: 60s, 15m, 1h30m, 7d)");
    let mut total = Duration::zero();
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
            "ms" => Duration::try_milliseconds(n),
            "s" => Duration::try_seconds(n),
            "m" => Duration::try_minutes(n),
            "h" => Duration::try_hours(n),
            "d" => Duration::try_days(n),
            "w" => Duration::try_weeks(n),
            _ => None,
        }
        .ok_or_else(bad)?;
        total = total.checked_add(&part).ok_or_else(bad)?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// Parses `SAGAS_AMQP_COMMAND_BATCH`: the most commands per AMQP message, 1 to [`MAX_BATCH`].
pub fn parse_command_batch(raw: &str) -> Result<usize, String> {
    match raw.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_BATCH).contains(&n) => Ok(n),
        _ => Err(format!(
            "SAGAS_AMQP_COMMAND_BATCH={raw:?} is not a number from 1 to {MAX_BATCH}"
        )),
    }
}

impl Config {
    /// Reads the configuration from the environment, with loopback defaults. Unusable values
    /// are kept in [`Config::invalid`] for [`Config::check`] to report.
    pub fn from_env() -> Config {
        let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
        let mut invalid = Vec::new();
        let api_tokens = match std::env::var("SAGAS_API_TOKENS") {
            Ok(raw) => parse_api_tokens(&raw).unwrap_or_else(|e| {
                invalid.push(e);
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        let body_limit = match std::env::var("SAGAS_BODY_LIMIT") {
            Ok(raw) => match raw.trim().parse::<usize>() {
                Ok(n) if n > 0 => n,
                _ => {
                    invalid.push(format!(
                        "SAGAS_BODY_LIMIT={raw:?} is not a positive number of bytes"
                    ));
                    DEFAULT_BODY_LIMIT
                }
            },
            Err(_) => DEFAULT_BODY_LIMIT,
        };
        let command_batch = match std::env::var("SAGAS_AMQP_COMMAND_BATCH") {
            Ok(raw) => parse_command_batch(&raw).unwrap_or_else(|e| {
                invalid.push(e);
                1
            }),
            Err(_) => 1,
        };
        let retention = match std::env::var("SAGAS_RETENTION") {
            Ok(raw) => parse_retention(&raw).unwrap_or_else(|e| {
                invalid.push(e);
                None
            }),
            Err(_) => None,
        };
        Config {
            database_url: var("DATABASE_URL", DEFAULT_DATABASE_URL),
            amqp_url: var("AMQP_URL", DEFAULT_AMQP_URL),
            bind: var("SAGAS_BIND", "127.0.0.1:8080"),
            amqp_prefix: var("SAGAS_AMQP_PREFIX", "sagas"),
            quorum_queues: matches!(var("SAGAS_QUORUM_QUEUES", "0").as_str(), "1" | "true"),
            db_pool: var("SAGAS_DB_POOL", "16").parse().unwrap_or(16),
            command_batch,
            queue_expires_ms: std::env::var("SAGAS_QUEUE_EXPIRES_MS")
                .ok()
                .and_then(|v| v.parse().ok()),
            api_tokens,
            body_limit,
            retention,
            invalid,
        }
    }

    /// Refuses a configuration the server must not start with: unusable values, or an
    /// unauthenticated API on an address other hosts can reach.
    pub fn check(&self) -> Result<(), String> {
        if !self.invalid.is_empty() {
            return Err(self.invalid.join("; "));
        }
        if self.api_tokens.is_empty() && !is_loopback(&self.bind) {
            return Err(format!(
                "SAGAS_BIND={} is not a loopback address and SAGAS_API_TOKENS is empty: \
                 set tokens (role:token or role:name:token) before exposing the API",
                self.bind
            ));
        }
        Ok(())
    }

    /// The AMQP topology.
    pub fn topology(&self) -> Topology {
        Topology::new(self.amqp_prefix.clone())
    }

    /// Queue declaration options.
    pub fn queue_options(&self) -> QueueOptions {
        QueueOptions {
            quorum: self.quorum_queues,
            expires: self.queue_expires_ms.map(std::time::Duration::from_millis),
        }
    }
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

/// Parses an HTTP timeout variable (`name`): whole milliseconds, 1 to [`MAX_HTTP_TIMEOUT_MS`].
pub fn parse_http_timeout(name: &str, raw: &str) -> Result<std::time::Duration, String> {
    match raw.trim().parse::<u64>() {
        Ok(n) if (1..=MAX_HTTP_TIMEOUT_MS).contains(&n) => Ok(std::time::Duration::from_millis(n)),
        _ => Err(format!(
            "{name}={raw:?} is not a number of milliseconds from 1 to {MAX_HTTP_TIMEOUT_MS}"
        )),
    }
}

/// Parses `SAGAS_HTTP_MAX_CONNECTIONS`: 1 to 1,000,000 connections.
pub fn parse_http_max_connections(raw: &str) -> Result<usize, String> {
    match raw.trim().parse::<usize>() {
        Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
        _ => Err(format!(
            "SAGAS_HTTP_MAX_CONNECTIONS={raw:?} is not a number from 1 to 1000000"
        )),
    }
}

impl HttpLimits {
    /// Reads the limits from the environment (defaults for unset variables); an unusable value
    /// is an error naming its variable.
    pub fn from_env() -> Result<HttpLimits, String> {
        let mut invalid = Vec::new();
        let mut limits = HttpLimits::default();
        if let Ok(raw) = std::env::var("SAGAS_HTTP_HEADER_TIMEOUT_MS") {
            match parse_http_timeout("SAGAS_HTTP_HEADER_TIMEOUT_MS", &raw) {
                Ok(d) => limits.header_timeout = d,
                Err(e) => invalid.push(e),
            }
        }
        if let Ok(raw) = std::env::var("SAGAS_HTTP_BODY_TIMEOUT_MS") {
            match parse_http_timeout("SAGAS_HTTP_BODY_TIMEOUT_MS", &raw) {
                Ok(d) => limits.body_timeout = d,
                Err(e) => invalid.push(e),
            }
        }
        if let Ok(raw) = std::env::var("SAGAS_HTTP_MAX_CONNECTIONS") {
            match parse_http_max_connections(&raw) {
                Ok(n) => limits.max_connections = n,
                Err(e) => invalid.push(e),
            }
        }
        if invalid.is_empty() {
            Ok(limits)
        } else {
            Err(invalid.join("; "))
        }
    }
}

#[cfg(test)]
mod http_limits_tests {
    use super::*;

    #[test]
    fn http_timeouts_and_the_connection_cap_refuse_values_out_of_range_naming_the_variable() {
        let t = |raw: &str| parse_http_timeout("SAGAS_HTTP_BODY_TIMEOUT_MS", raw);
        assert_eq!(t("1"), Ok(std::time::Duration::from_millis(1)));
        assert_eq!(t(" 2500 "), Ok(std::time::Duration::from_millis(2500)));
        for bad in ["0", "-1", "1.5", "10s", "", "3600001"] {
            let err = t(bad).unwrap_err();
            assert!(err.contains("SAGAS_HTTP_BODY_TIMEOUT_MS"), "{bad}: {err}");
        }
        assert_eq!(parse_http_max_connections("64"), Ok(64));
        for bad in ["0", "-3", "many", "1000001"] {
            let err = parse_http_max_connections(bad).unwrap_err();
            assert!(err.contains("SAGAS_HTTP_MAX_CONNECTIONS"), "{bad}: {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_batches_are_between_one_and_the_protocol_limit() {
        assert_eq!(parse_command_batch("1"), Ok(1));
        assert_eq!(parse_command_batch(" 16 "), Ok(16));
        assert_eq!(parse_command_batch(&MAX_BATCH.to_string()), Ok(MAX_BATCH));
        for bad in ["0", "-1", "many", "", &(MAX_BATCH + 1).to_string()] {
            let err = parse_command_batch(bad).unwrap_err();
            assert!(err.contains("SAGAS_AMQP_COMMAND_BATCH"), "{bad}: {err}");
        }
    }

    fn config(bind: &str, tokens: &str) -> Config {
        Config {
            database_url: DEFAULT_DATABASE_URL.into(),
            amqp_url: DEFAULT_AMQP_URL.into(),
            bind: bind.into(),
            amqp_prefix: "sagas".into(),
            quorum_queues: false,
            db_pool: 1,
            command_batch: 1,
            queue_expires_ms: None,
            api_tokens: parse_api_tokens(tokens).unwrap(),
            body_limit: DEFAULT_BODY_LIMIT,
            retention: None,
            invalid: Vec::new(),
        }
    }

    #[test]
    fn a_retention_is_a_duration_with_a_unit_and_zero_keeps_everything() {
        let day = std::time::Duration::from_secs(86_400);
        assert_eq!(parse_retention("30d"), Ok(Some(30 * day)));
        assert_eq!(parse_retention(" 12h "), Ok(Some(day / 2)));
        assert_eq!(parse_retention("1d12h"), Ok(Some(day + day / 2)));
        assert_eq!(parse_retention("0"), Ok(None));
        assert_eq!(parse_retention("0s"), Ok(None));
        for bad in ["30", "thirty days", "-1d", "", "1.5d"] {
            let err = parse_retention(bad).unwrap_err();
            assert!(err.contains("SAGAS_RETENTION"), "{bad}: {err}");
        }
    }

    #[test]
    fn without_tokens_only_loopback_addresses_may_be_bound() {
        for bind in ["127.0.0.1:8080", "[::1]:8080", "localhost:0", "127.1.2.3:1"] {
            assert!(config(bind, "").check().is_ok(), "{bind}");
        }
        for bind in ["0.0.0.0:8080", "[::]:8080", "10.1.2.3:80", "nonsense"] {
            let err = config(bind, "").check().unwrap_err();
            assert!(err.contains("SAGAS_API_TOKENS"), "{bind}: {err}");
        }
        let with_tokens = config("0.0.0.0:8080", "read:0123456789abcdef");
        assert!(with_tokens.check().is_ok());
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
        }
        assert!(Role::Operate.allows(Role::Read));
        assert!(!Role::Read.allows(Role::Operate));
        assert!(!format!("{:?}", tokens[0]).contains("rrrr"));
    }
}
