//! Connecting to the broker (over TLS with `amqps://`) and staying connected: sessions, with a
//! backoff between them.

use std::fmt::Display;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use lapin::options::ConfirmSelectOptions;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Channel, Connection, ConnectionProperties, DefaultConnectionBuilder};
use tokio_util::task::AbortOnDropHandle;

/// Connects to the broker at `uri`: `amqp://user:password@host:port/vhost`, or
/// `amqps://…` for TLS.
///
/// Over TLS the broker's certificate is always verified, against the system's roots and the
/// CA certificates (PEM) of the file the query parameter `cacertfile` names; `certfile` and
/// `keyfile` (PEM, together) give a client certificate. These are RabbitMQ's own URI
/// parameters. The files are read at every connection, so renewed certificates take effect
/// at the next reconnection.
///
/// A broker that takes the TCP connection and never completes the handshake (one still
/// starting, or a black hole in between) is given up on after [`CONNECT_TIMEOUT`], with an
/// error of kind `TimedOut`: every caller (the orchestrator's publishing link, which others
/// wait for, the reply consumer, participants) then retries with its backoff instead of
/// waiting for ever.
pub async fn connect(uri: &str) -> Result<Connection, lapin::Error> {
    connect_within(uri, CONNECT_TIMEOUT).await
}

/// How long [`connect`] waits for TCP, TLS and the AMQP handshake together: RabbitMQ's own
/// `handshake_timeout` is 10 s.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// [`connect`] with a limit of `limit`.
pub async fn connect_within(uri: &str, limit: Duration) -> Result<Connection, lapin::Error> {
    let tls = tls_config(uri).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let custom_ca = tls.cert_chain.is_some();
    let builder = DefaultConnectionBuilder::new()?
        .with_uri_str(uri.to_owned())
        .with_properties(ConnectionProperties::default())
        .with_tls_config(tls);
    match tokio::time::timeout(limit, builder.connect()).await {
        Ok(connected) => connected.map_err(|e| explain_tls_failure(uri, custom_ca, e)),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the broker did not complete the connection within {} ms",
                limit.as_millis()
            ),
        )
        .into()),
    }
}

/// Checks `uri` as [`connect`] reads it, without connecting: that it parses, and that the
/// TLS files it names can be read and hold what they should. For a process to refuse to
/// start with a broken broker URL rather than retry it.
pub fn check_url(uri: &str) -> Result<(), String> {
    uri.parse::<AMQPUri>()?;
    tls_config(uri).map(drop)
}

/// The TLS settings named by the query of `uri` (none for a URL that does not parse: connecting
/// reports that).
fn tls_config(uri: &str) -> Result<OwnedTLSConfig, String> {
    let Ok(url) = url::Url::parse(uri) else {
        return Ok(OwnedTLSConfig::default());
    };
    let param = |name: &str| {
        url.query_pairs()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.into_owned())
    };
    let (ca, cert, key) = (param("cacertfile"), param("certfile"), param("keyfile"));
    if let Some(verify) = param("verify")
        && verify != "verify_peer"
    {
        return Err(format!(
            "verify={verify} is not supported: the broker's certificate is always verified"
        ));
    }
    let tls_params = ca.is_some() || cert.is_some() || key.is_some();
    if tls_params && url.scheme() != "amqps" {
        return Err("cacertfile, certfile and keyfile need an amqps:// URL".to_owned());
    }
    let cert_chain = ca
        .map(|path| read_pem("cacertfile", &path, "CERTIFICATE"))
        .transpose()?;
    let identity = match (cert, key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: read_pem("certfile", &cert, "CERTIFICATE")?.into_bytes(),
            key: read_pem("keyfile", &key, "PRIVATE KEY")?.into_bytes(),
        }),
        _ => return Err("certfile and keyfile go together".to_owned()),
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

/// The PEM file at `path`, which must hold at least one block whose label ends with `label`
/// (`CERTIFICATE`; `PRIVATE KEY` also matches `RSA PRIVATE KEY` and `EC PRIVATE KEY`).
fn read_pem(param: &str, path: &str, label: &str) -> Result<String, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{param}={path} cannot be read: {e}"))?;
    let holds = text.lines().any(|line| {
        line.strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
            .is_some_and(|found| found.ends_with(label))
    });
    if !holds {
        return Err(format!("{param}={path} holds no PEM {label}"));
    }
    Ok(text)
}

/// Says that a failure to connect over TLS is about TLS, to which broker and trusting what,
/// without the URL's password.
fn explain_tls_failure(uri: &str, custom_ca: bool, error: lapin::Error) -> lapin::Error {
    let (Ok(parsed), lapin::ErrorKind::IOError(cause)) = (uri.parse::<AMQPUri>(), error.kind())
    else {
        return error;
    };
    if parsed.scheme != AMQPScheme::AMQPS {
        return error;
    }
    let trusted = if custom_ca {
        "the system's roots and cacertfile"
    } else {
        "the system's roots only (no cacertfile)"
    };
    let (host, port) = (&parsed.authority.host, parsed.authority.port);
    io::Error::new(
        cause.kind(),
        format!("TLS connection to the broker at {host}:{port}, trusting {trusted}: {cause}"),
    )
    .into()
}

/// Opens a channel in publisher-confirm mode: every publish on it is confirmed (or not) by
/// the broker.
pub async fn confirm_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// The delays between reconnection attempts: from `initial`, doubling up to `max`, without
/// jitter and without end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
}

impl Default for Backoff {
    /// 100 ms doubling up to 5 s.
    fn default() -> Backoff {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

impl Backoff {
    /// Delays from `initial` (at least 1 ms) doubling up to `max` (at least `initial`).
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        let initial = initial.max(Duration::from_millis(1));
        Backoff {
            initial,
            max: max.max(initial),
        }
    }

    /// The first delay.
    pub fn initial(&self) -> Duration {
        self.initial
    }

    /// The longest delay; a session that served longer than this starts the delays over.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The delays, first to last (they never end).
    pub(crate) fn delays(&self) -> ExponentialBackoff {
        ExponentialBuilder::new()
            .with_min_delay(self.initial)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .without_max_times()
            .build()
    }
}

/// The waits of one [`keep_serving`]: the next delay of its backoff after each failure,
/// started over after a session that served longer than the maximum. The failures from one
/// start over to the next are one outage.
struct Waits {
    backoff: Backoff,
    delays: ExponentialBackoff,
    /// Whether the last failure belongs to an outage that is still going on.
    in_outage: bool,
}

impl Waits {
    fn new(backoff: Backoff) -> Waits {
        Waits {
            backoff,
            delays: backoff.delays(),
            in_outage: false,
        }
    }

    /// The wait after a failure, and whether the failure starts an outage; `served` is how
    /// long the session served (zero when the connection failed).
    fn after(&mut self, served: Duration) -> (Duration, bool) {
        if served > self.backoff.max {
            self.delays = self.backoff.delays();
            self.in_outage = false;
        }
        let starts = !self.in_outage;
        self.in_outage = true;
        (self.delays.next().unwrap_or(self.backoff.max), starts)
    }
}

/// What [`keep_serving`] runs: sessions, each on a connection of its own.
pub trait Sessions<S> {
    /// What a session serves on.
    type Connection;
    /// Why connecting or a session failed.
    type Error: Display;

    /// Makes a connection.
    fn connect(&mut self) -> impl Future<Output = Result<Self::Connection, Self::Error>>;

    /// Serves on `connection` until `shutdown` completes (`Ok`) or something fails.
    fn serve(
        &mut self,
        connection: Self::Connection,
        shutdown: Pin<&mut S>,
    ) -> impl Future<Output = Result<(), Self::Error>>;
}

/// Runs the future `serve` makes on a task of the Tokio runtime, not in the caller's future,
/// and passes `shutdown` on to it as [`Stopped`]; dropping the returned future aborts the task.
/// Awaited in `#[tokio::main]`, a loop run in the caller's future would run on the main
/// thread, outside the runtime's worker threads, and every message would wake that thread
/// before a worker took its work. A panic of the task is resumed here; `None` when the task
/// was aborted (the runtime shutting down).
pub(crate) async fn on_a_task<T, F>(
    serve: impl FnOnce(Stopped) -> F,
    shutdown: impl Future<Output = ()>,
) -> Option<T>
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut task = AbortOnDropHandle::new(tokio::spawn(serve(Stopped(stopped))));
    let ended = tokio::select! {
        biased;
        ended = &mut task => ended,
        () = shutdown => {
            let _ = stop.send(());
            (&mut task).await
        }
    };
    match ended {
        Ok(value) => Some(value),
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => None,
    }
}

/// The shutdown [`on_a_task`] passes on: completes once the caller's has (or the caller's
/// future was dropped).
pub(crate) struct Stopped(tokio::sync::oneshot::Receiver<()>);

impl Future for Stopped {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}

/// Runs `sessions` until one ends because `shutdown` completed, reconnecting after every
/// failure, of a connection attempt or of a session.
///
/// After a failure it waits for the next delay of `backoff` and connects again; a session
/// that served longer than [`Backoff::max`] first starts the delays over, so that a broker
/// that fails now and then is reconnected to after the shortest delay, and one that keeps
/// failing is not hammered. `shutdown` also ends a connection attempt or a wait. `name` says whose
/// sessions these are, in the logs: a warning when an outage starts (its first failure), the
/// failures after it at debug level, until a session serves longer than the maximum.
pub async fn keep_serving<S, T>(
    name: &str,
    backoff: Backoff,
    mut shutdown: Pin<&mut S>,
    sessions: &mut T,
) where
    S: Future<Output = ()>,
    T: Sessions<S>,
{
    let mut waits = Waits::new(backoff);
    loop {
        let connected = tokio::select! {
            biased;
            () = shutdown.as_mut() => return,
            connected = sessions.connect() => connected,
        };
        let (failure, served) = match connected {
            Ok(connection) => {
                let started = tokio::time::Instant::now();
                match sessions.serve(connection, shutdown.as_mut()).await {
                    Ok(()) => return,
                    Err(failure) => (failure, started.elapsed()),
                }
            }
            Err(failure) => (failure, Duration::ZERO),
        };
        let (wait, starts) = waits.after(served);
        let retry_in_ms = wait.as_millis() as u64;
        if starts {
            tracing::warn!(
                %name,
                error = %failure,
                retry_in_ms,
                "cannot serve (broker or database unreachable, or the connection lost); \
                 retrying with backoff until it works"
            );
        } else {
            tracing::debug!(%name, error = %failure, retry_in_ms, "still cannot serve; retrying");
        }
        tokio::select! {
            biased;
            () = shutdown.as_mut() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_broker_that_takes_the_connection_and_never_answers_is_given_up_on() {
        // Accepts TCP connections and holds them without a byte of AMQP.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open.push(socket);
            }
        });
        let uri = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
        let error = connect_within(&uri, Duration::from_millis(300))
            .await
            .expect_err("a silent broker cannot connect");
        match error.kind() {
            lapin::ErrorKind::IOError(cause) => {
                assert_eq!(cause.kind(), io::ErrorKind::TimedOut, "{error}");
                assert!(cause.to_string().contains("within 300 ms"), "{error}");
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        held.abort();
    }

    /// A file of its own holding `text`, removed with the directory when the test ends.
    fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    }

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN EC PRIVATE KEY-----\nMHc\n-----END EC PRIVATE KEY-----\n";

    #[test]
    fn an_amqps_url_names_its_ca_and_client_certificate_in_rabbitmqs_query_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = (
            file(&dir, "ca.pem", CERT),
            file(&dir, "client.pem", CERT),
            file(&dir, "client.key", KEY),
        );
        let url = format!(
            "amqps://u:p@broker:5671/%2f?cacertfile={ca}&certfile={cert}&keyfile={key}&verify=verify_peer"
        );
        let tls = tls_config(&url).unwrap();
        assert_eq!(tls.cert_chain.as_deref(), Some(CERT));
        assert_eq!(
            tls.identity,
            Some(OwnedIdentity::PKCS8 {
                pem: CERT.into(),
                key: KEY.into()
            })
        );
        assert_eq!(check_url(&url), Ok(()));
        let plain = tls_config("amqps://u:p@broker/%2f").unwrap();
        assert_eq!(plain, OwnedTLSConfig::default(), "the system's roots only");
        assert_eq!(
            tls_config("amqp://u:p@broker/%2f").unwrap(),
            OwnedTLSConfig::default()
        );
    }

    #[test]
    fn tls_parameters_that_cannot_be_used_are_refused_with_the_parameter_named() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, empty) = (
            file(&dir, "client.pem", CERT),
            file(&dir, "client.key", KEY),
            file(&dir, "empty.pem", "nothing here\n"),
        );
        let missing = dir.path().join("missing.pem");
        let missing = missing.to_str().unwrap();
        let refused = |url: String, expected: &str| {
            let err = check_url(&url).unwrap_err();
            assert!(err.contains(expected), "{url}: {err}");
            assert!(!err.contains("secret"), "{err}");
        };
        refused(
            format!("amqps://u:secret@b/%2f?cacertfile={missing}"),
            &format!("cacertfile={missing} cannot be read"),
        );
        refused(
            format!("amqps://u:secret@b/%2f?cacertfile={empty}"),
            "holds no PEM CERTIFICATE",
        );
        refused(
            format!("amqps://u:secret@b/%2f?certfile={cert}&keyfile={cert}"),
            "keyfile=",
        );
        refused(
            format!("amqps://u:secret@b/%2f?certfile={cert}"),
            "certfile and keyfile go together",
        );
        refused(
            format!("amqps://u:secret@b/%2f?keyfile={key}"),
            "certfile and keyfile go together",
        );
        refused(
            format!("amqp://u:secret@b/%2f?cacertfile={cert}"),
            "need an amqps:// URL",
        );
        refused(
            "amqps://u:secret@b/%2f?verify=verify_none".to_owned(),
            "always verified",
        );
        assert!(check_url("no url at all").is_err());
    }

    fn millis(delays: impl Iterator<Item = Duration>, n: usize) -> Vec<u128> {
        delays.take(n).map(|d| d.as_millis()).collect()
    }

    #[test]
    fn reconnection_delays_double_from_the_initial_delay_and_stay_at_the_maximum() {
        let backoff = Backoff::default();
        assert_eq!(
            millis(backoff.delays(), 9),
            [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]
        );
        let custom = Backoff::new(Duration::from_millis(50), Duration::from_millis(200));
        assert_eq!(millis(custom.delays(), 5), [50, 100, 200, 200, 200]);
    }

    #[test]
    fn an_outage_is_its_failures_until_a_session_serves_longer_than_the_maximum() {
        let mut waits = Waits::new(Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
        ));
        let mut starts = |served_ms| waits.after(Duration::from_millis(served_ms)).1;
        assert!(starts(5_000), "the first failure starts an outage");
        assert!(!starts(0), "a refused reconnection is the same outage");
        assert!(!starts(900), "and so is a short session");
        assert!(
            starts(1_001),
            "a failure after a long session starts another"
        );
        assert!(!starts(0));
    }

    #[test]
    fn reconnection_delays_never_end() {
        let backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(2));
        assert_eq!(backoff.delays().take(10_000).count(), 10_000);
    }

    #[test]
    fn a_backoff_waits_at_least_a_millisecond_and_its_maximum_is_never_below_its_start() {
        let backoff = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(backoff.initial(), Duration::from_millis(1));
        assert_eq!(backoff.max(), Duration::from_millis(1));
        let inverted = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(millis(inverted.delays(), 3), [2000, 2000, 2000]);
    }

    #[test]
    fn after_a_failure_the_wait_grows_and_only_a_session_longer_than_the_maximum_starts_it_over() {
        let mut waits = Waits::new(Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
        ));
        let mut after = |served_ms| waits.after(Duration::from_millis(served_ms)).0.as_millis();
        assert_eq!(after(0), 100, "a refused connection");
        assert_eq!(after(0), 200);
        assert_eq!(
            after(1_000),
            400,
            "a session of exactly the maximum is short"
        );
        assert_eq!(after(0), 800);
        assert_eq!(after(0), 1_000);
        assert_eq!(after(1_001), 100, "a long session starts over");
        assert_eq!(after(0), 200);
    }
}
