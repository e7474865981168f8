//! TLS for tests, with real handshakes: a certificate authority made on the spot, a PostgreSQL
//! of the test's own that accepts TLS connections only, and a TLS-terminating proxy in front of
//! the broker of `AMQP_URL` (the shared broker has no TLS listener, and must not get one).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use anyhow::{Context, Result, bail, ensure};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::aws_lc_rs;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};

use crate::amqp_url;

/// A certificate authority of the test's own. It and what it issues are PEM files in a
/// directory removed when it is dropped.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: tempfile::TempDir,
    issued: AtomicU32,
}

/// A certificate and its private key, as PEM files.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Result<TestCa> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let dir = tempfile::Builder::new().prefix("sagas-tls-").tempdir()?;
        std::fs::write(dir.path().join("ca.pem"), issuer.pem())?;
        Ok(TestCa {
            issuer,
            dir,
            issued: AtomicU32::new(0),
        })
    }

    /// The CA's certificate (PEM): what a client trusts.
    pub fn cert_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issues a certificate for `names` (DNS names or IP addresses), usable by a server and by
    /// a client; the first name is also its common name (a PostgreSQL user, for a client).
    pub fn issue(&self, names: &[&str]) -> Result<Issued> {
        let owned: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(owned)?;
        params
            .distinguished_name
            .push(DnType::CommonName, *names.first().context("a name")?);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        let issued = Issued {
            cert: self.dir.path().join(format!("{n}.pem")),
            key: self.dir.path().join(format!("{n}.key")),
        };
        std::fs::write(&issued.cert, cert.pem())?;
        std::fs::write(&issued.key, key.serialize_pem())?;
        Ok(issued)
    }
}

/// A PostgreSQL server of the test's own on a free port of 127.0.0.1, with `ssl=on`. Its
/// `pg_hba.conf` accepts TLS connections only: `postgres` without a password, any other user
/// with a client certificate of the CA whose common name is the user's name. Stopped, and its
/// files removed, when dropped (also when the test fails).
///
/// It needs PostgreSQL's server binaries (`/usr/lib/postgresql/<version>/bin`, Debian's
/// layout); run as root, it runs them as the `postgres` user.
pub struct TlsPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl TlsPostgres {
    /// Creates and starts a server presenting `server` and trusting `ca` for client
    /// certificates. Blocks for about a second.
    pub fn start(ca: &TestCa, server: &Issued) -> Result<TlsPostgres> {
        let bin = server_binaries()?;
        let as_postgres = is_root()?;
        let dir = tempfile::Builder::new().prefix("sagas-tls-pg-").tempdir()?;
        let path = dir.path().to_owned();
        std::fs::copy(&server.cert, path.join("server.crt"))?;
        std::fs::copy(&server.key, path.join("server.key"))?;
        std::fs::copy(ca.cert_file(), path.join("ca.crt"))?;
        set_mode(&path.join("server.key"), 0o600)?;
        if as_postgres {
            let (uid, gid) = (postgres_id("-u")?, postgres_id("-g")?);
            for file in ["", "server.crt", "server.key", "ca.crt"] {
                std::os::unix::fs::chown(path.join(file), Some(uid), Some(gid))?;
            }
        }
        let mut pg = TlsPostgres {
            dir,
            bin,
            port: 0,
            as_postgres,
        };
        let data = pg.data();
        pg.run(
            "initdb",
            &[
                "-D",
                path_str(&data)?,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "--no-locale",
                "-E",
                "UTF8",
            ],
        )?;
        std::fs::write(
            data.join("pg_hba.conf"),
            "hostssl all postgres 127.0.0.1/32 trust\nhostssl all all 127.0.0.1/32 cert\n",
        )?;
        let settings = format!(
            "\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{dir}'\n\
             ssl = on\nssl_cert_file = '{dir}/server.crt'\nssl_key_file = '{dir}/server.key'\n\
             ssl_ca_file = '{dir}/ca.crt'\nfsync = off\nshared_buffers = 16MB\n\
             max_connections = 40\n",
            dir = path_str(&path)?,
        );
        append(&data.join("postgresql.conf"), &settings)?;
        // A port that was free a moment ago may be taken by the time the server binds it.
        let mut last = None;
        for _ in 0..3 {
            pg.port = free_port()?;
            append(
                &data.join("postgresql.conf"),
                &format!("port = {}\n", pg.port),
            )?;
            let log = path.join("log");
            match pg.run(
                "pg_ctl",
                &[
                    "-D",
                    path_str(&data)?,
                    "-l",
                    path_str(&log)?,
                    "-w",
                    "-t",
                    "30",
                    "start",
                ],
            ) {
                Ok(()) => return Ok(pg),
                Err(e) => {
                    let tail = std::fs::read_to_string(&log).unwrap_or_default();
                    last = Some(e.context(tail));
                }
            }
        }
        Err(last
            .expect("three attempts")
            .context("starting PostgreSQL with ssl=on"))
    }

    /// The port it listens on (127.0.0.1 only).
    pub fn port(&self) -> u16 {
        self.port
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs the server binary `name` with `args`, as `postgres` when we are root.
    fn run(&self, name: &str, args: &[&str]) -> Result<()> {
        let program = self.bin.join(name);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let output = command
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .with_context(|| format!("running {}", program.display()))?;
        ensure!(
            output.status.success(),
            "{name} {args:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        if self.port == 0 {
            return;
        }
        let data = self.data();
        let Some(data) = data.to_str() else { return };
        if let Err(e) = self.run("pg_ctl", &["-D", data, "-m", "immediate", "-w", "stop"]) {
            eprintln!("could not stop the test's PostgreSQL: {e:#}");
        }
    }
}

/// The directory of the newest PostgreSQL server binaries installed (Debian's layout).
fn server_binaries() -> Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path())))
        .filter(|(_, p)| p.join("bin/initdb").exists())
        .max();
    match newest {
        Some((_, path)) => Ok(path.join("bin")),
        None => bail!(
            "no PostgreSQL server binaries in /usr/lib/postgresql/<version>/bin (scripts/services \
             installs them, as root)"
        ),
    }
}

fn is_root() -> Result<bool> {
    Ok(id(&["-u"])? == 0)
}

fn postgres_id(flag: &str) -> Result<u32> {
    id(&[flag, "postgres"])
}

fn id(args: &[&str]) -> Result<u32> {
    let out = Command::new("id")
        .args(args)
        .output()
        .context("running id")?;
    ensure!(out.status.success(), "id {args:?} failed");
    Ok(String::from_utf8(out.stdout)?.trim().parse()?)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().append(true).open(path)?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().context("a temporary path that is not UTF-8")
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A TLS-terminating proxy on a free port of 127.0.0.1 in front of the broker of `AMQP_URL`:
/// it presents a certificate and forwards what it decrypts. Stopped, with every connection
/// through it, when dropped.
pub struct TlsProxy {
    port: u16,
    handshakes: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl TlsProxy {
    /// Starts a proxy presenting `server`; with `client_ca`, it also requires a client
    /// certificate issued by that CA.
    pub async fn start(server: &Issued, client_ca: Option<&TestCa>) -> Result<TlsProxy> {
        let provider = Arc::new(aws_lc_rs::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                roots.add(CertificateDer::from_pem_file(ca.cert_file())?)?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let chain = CertificateDer::pem_file_iter(&server.cert)?.collect::<Result<Vec<_>, _>>()?;
        let config = builder.with_single_cert(chain, PrivateKeyDer::from_pem_file(&server.key)?)?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let upstream = broker_address()?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let handshakes = Arc::new(AtomicU64::new(0));
        let counted = handshakes.clone();
        let task = tokio::spawn(async move {
            // Dropped with this task: aborts every connection through the proxy.
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                while connections.try_join_next().is_some() {}
                let (acceptor, upstream, counted) =
                    (acceptor.clone(), upstream.clone(), counted.clone());
                connections.spawn(async move {
                    let Ok(mut client) = acceptor.accept(client).await else {
                        return;
                    };
                    counted.fetch_add(1, Ordering::Relaxed);
                    let Ok(mut broker) = TcpStream::connect(upstream.as_str()).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
                });
            }
        });
        Ok(TlsProxy {
            port,
            handshakes,
            task,
        })
    }

    /// The `amqps://` URL of the broker through the proxy, with the user and vhost of
    /// `AMQP_URL`, host `localhost` (a name its certificate must carry), and `query` added
    /// (e.g. `("cacertfile", path)`).
    pub fn url<P: AsRef<Path>>(&self, query: &[(&str, P)]) -> Result<String> {
        let mut url = url::Url::parse(&amqp_url())?;
        url.set_scheme("amqps")
            .map_err(|()| anyhow::anyhow!("AMQP_URL cannot become amqps"))?;
        url.set_host(Some("localhost"))?;
        url.set_port(Some(self.port))
            .map_err(|()| anyhow::anyhow!("AMQP_URL has no port to set"))?;
        url.set_query(None);
        for (name, path) in query {
            url.query_pairs_mut()
                .append_pair(name, path_str(path.as_ref())?);
        }
        Ok(url.into())
    }

    /// The port it listens on (127.0.0.1 only).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// TLS handshakes completed so far (a connection refused during its handshake does not
    /// count).
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::Relaxed)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `host:port` of the broker of `AMQP_URL`.
fn broker_address() -> Result<String> {
    let url = url::Url::parse(&amqp_url())?;
    let host = url.host_str().context("AMQP_URL has no host")?;
    Ok(format!("{host}:{}", url.port().unwrap_or(5672)))
}
