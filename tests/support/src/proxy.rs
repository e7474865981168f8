//! A TCP proxy on a free port of 127.0.0.1, to put between a client and PostgreSQL or the
//! broker and cut the network on command: every open connection reset at once, new ones
//! refused (accepted and reset) until told otherwise, or each new one reset after a number of
//! bytes from the server (to cut a handshake at a chosen point). The real server is never
//! touched, so tests sharing it are not disturbed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The proxy; it stops, resetting every connection through it, when dropped.
pub struct Proxy {
    port: u16,
    state: Arc<State>,
    /// Every connection watches it: [`Proxy::cut`] bumps it.
    generation: watch::Sender<u64>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct State {
    /// Whether new connections are reset at once.
    refusing: AtomicBool,
    /// Reset each new connection once this many bytes came from the server (`u64::MAX`: never).
    cut_after: AtomicU64,
    /// Connections passed through to the server so far.
    accepted: AtomicU64,
    /// Connections refused so far.
    refused: AtomicU64,
    /// Connections reset after their byte limit so far.
    cut_short: AtomicU64,
    /// Bytes from the server on the latest connection passed through.
    last_server_bytes: AtomicU64,
}

impl Proxy {
    /// Starts a proxy to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(State {
            cut_after: AtomicU64::new(u64::MAX),
            ..State::default()
        });
        let (generation, _) = watch::channel(0u64);
        let upstream = upstream.to_owned();
        let task = tokio::spawn({
            let (state, generation) = (state.clone(), generation.clone());
            async move {
                let mut connections = tokio::task::JoinSet::new();
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    while connections.try_join_next().is_some() {}
                    if state.refusing.load(Ordering::SeqCst) {
                        state.refused.fetch_add(1, Ordering::SeqCst);
                        reset(client);
                        continue;
                    }
                    let limit = state.cut_after.load(Ordering::SeqCst);
                    let cut = generation.subscribe();
                    connections.spawn(pass(client, upstream.clone(), limit, cut, state.clone()));
                }
            }
        });
        Ok(Proxy {
            port,
            state,
            generation,
            task,
        })
    }

    /// Starts a proxy to the server of `url` (`postgres://…`, `amqp://…`; `default_port` when
    /// it names none).
    pub async fn in_front_of(url: &str, default_port: u16) -> Result<Proxy> {
        Proxy::start(&address_of(url, default_port)?).await
    }

    /// `url` through the proxy: its host and port replaced by the proxy's.
    pub fn url(&self, url: &str) -> Result<String> {
        let mut parsed = url::Url::parse(url).with_context(|| format!("parsing {url}"))?;
        parsed
            .set_host(Some("127.0.0.1"))
            .context("setting the host")?;
        parsed
            .set_port(Some(self.port))
            .map_err(|()| anyhow::anyhow!("{url} cannot have a port"))?;
        Ok(parsed.into())
    }

    /// The proxy's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Resets every connection open through the proxy.
    pub fn cut(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// From now on, new connections are reset as soon as they are accepted.
    pub fn refuse(&self) {
        self.state.refusing.store(true, Ordering::SeqCst);
    }

    /// From now on, new connections go through (with the byte limit, if one is set).
    pub fn accept(&self) {
        self.state.refusing.store(false, Ordering::SeqCst);
    }

    /// From now on, each new connection is reset once `bytes` came from the server (`None`:
    /// no limit).
    pub fn cut_after(&self, bytes: Option<u64>) {
        self.state
            .cut_after
            .store(bytes.unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    /// Connections passed through to the server so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Connections refused so far.
    pub fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// Connections reset after their byte limit so far.
    pub fn cut_short(&self) -> u64 {
        self.state.cut_short.load(Ordering::SeqCst)
    }

    /// The bytes the server sent on the latest connection passed through (so far).
    pub fn last_server_bytes(&self) -> u64 {
        self.state.last_server_bytes.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// Closes `stream` with a reset (as a peer that went away does), not an orderly shutdown.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Passes bytes both ways between `client` and a new connection to `upstream` until either
/// side closes, the proxy cuts it, or `limit` bytes came from the server.
async fn pass(
    client: TcpStream,
    upstream: String,
    limit: u64,
    mut cut: watch::Receiver<u64>,
    state: Arc<State>,
) {
    let Ok(server) = TcpStream::connect(&upstream).await else {
        reset(client);
        return;
    };
    state.accepted.fetch_add(1, Ordering::SeqCst);
    state.last_server_bytes.store(0, Ordering::SeqCst);
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up = tokio::io::copy(&mut client_read, &mut server_write);
    let down = async {
        let mut passed = 0u64;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if passed >= limit {
                state.cut_short.fetch_add(1, Ordering::SeqCst);
                return;
            }
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let n = n.min(usize::try_from(limit - passed).unwrap_or(usize::MAX));
            if client_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
            passed += n as u64;
            state.last_server_bytes.store(passed, Ordering::SeqCst);
        }
    };
    tokio::select! {
        _ = up => {}
        () = down => {}
        _ = cut.changed() => {}
    }
    // Both halves of both sockets go here: reset them.
    if let (Ok(client), Ok(server)) = (
        client_read.reunite(client_write),
        server_read.reunite(server_write),
    ) {
        reset(client);
        reset(server);
    }
}

/// The `host:port` of a URL (`postgres://…`, `amqp://…`), with `default_port` when it names
/// none.
fn address_of(url: &str, default_port: u16) -> Result<String> {
    let parsed = url::Url::parse(url).with_context(|| format!("parsing {url}"))?;
    let host = parsed.host_str().context("a URL without a host")?;
    Ok(format!("{host}:{}", parsed.port().unwrap_or(default_port)))
}
